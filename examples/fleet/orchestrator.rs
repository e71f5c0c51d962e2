//! The orchestrator: starts the worker processes, runs the phases, reads the server's
//! figures from /proc, triggers pushes and storms through the reference server's API, and
//! prints the table of targets.

use std::process::Stdio;
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use tokio::io::{AsyncBufReadExt, AsyncWriteExt, BufReader, Lines};
use tokio::process::{Child, ChildStdin, ChildStdout};

use crate::control::{self, json_array_len, json_str, proc_cpu_secs, proc_status_kib};
use crate::hist::Hist;
use crate::{Args, Transport};

type Error = Box<dyn std::error::Error>;

struct Worker {
    child: Child,
    stdin: ChildStdin,
    stdout: Lines<BufReader<ChildStdout>>,
    agents: u32,
}

impl Worker {
    async fn send(&mut self, command: &str) -> Result<(), Error> {
        self.stdin.write_all(command.as_bytes()).await?;
        self.stdin.write_all(b"\n").await?;
        self.stdin.flush().await?;
        Ok(())
    }

    async fn answer(&mut self) -> Result<Vec<String>, Error> {
        let line = self
            .stdout
            .next_line()
            .await?
            .ok_or("a worker exited early (see its stderr above)")?;
        let words: Vec<String> = line.split_whitespace().map(String::from).collect();
        match words.first().map(String::as_str) {
            Some("ok") | Some("hello") => Ok(words[1..].to_vec()),
            _ => Err(format!("worker: {line}").into()),
        }
    }
}

/// Sends `command` to every worker (each with its own argument), then collects the answers.
async fn all(
    workers: &mut [Worker],
    command: impl Fn(&Worker) -> String,
) -> Result<Vec<Vec<String>>, Error> {
    for w in workers.iter_mut() {
        let c = command(w);
        w.send(&c).await?;
    }
    let mut answers = Vec::new();
    for w in workers.iter_mut() {
        answers.push(w.answer().await?);
    }
    Ok(answers)
}

fn num(words: &[String], i: usize) -> u64 {
    words.get(i).and_then(|w| w.parse().ok()).unwrap_or(0)
}

fn sum(answers: &[Vec<String>], i: usize) -> u64 {
    answers.iter().map(|a| num(a, i)).sum()
}

fn max(answers: &[Vec<String>], i: usize) -> u64 {
    answers.iter().map(|a| num(a, i)).max().unwrap_or(0)
}

/// Sums the `name=value` counters of every worker.
fn counters(answers: &[Vec<String>]) -> std::collections::BTreeMap<String, u64> {
    let mut out = std::collections::BTreeMap::new();
    for a in answers {
        for w in a {
            if let Some((k, v)) = w.split_once('=') {
                *out.entry(k.to_owned()).or_insert(0) += v.parse::<u64>().unwrap_or(0);
            }
        }
    }
    out
}

fn unix_nanos() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.as_nanos() as u64)
}

/// One line of the final table.
struct Row {
    what: String,
    target: String,
    measured: String,
    pass: Option<bool>,
}

fn mib(kib: u64) -> f64 {
    kib as f64 / 1024.0
}

pub(crate) async fn run(args: Args) -> Result<(), Error> {
    let (soft, hard) = crate::raise_nofile();
    let pid = args.server_pid;
    let scheme = match args.transport {
        Transport::Ws => "ws",
        Transport::Http => "http",
    };
    let transport = args.transport.name();
    println!(
        "fleet: {} {transport} agents over {} worker process(es) -> {scheme}://{}{}; API http://{}; server pid {}",
        args.agents,
        args.procs,
        args.server,
        args.path,
        args.api,
        pid.map_or("unknown (no RSS/CPU figures)".into(), |p| p.to_string())
    );
    println!("fleet: orchestrator RLIMIT_NOFILE soft={soft} hard={hard}");
    if let Some(pid) = pid {
        let limits = std::fs::read_to_string(format!("/proc/{pid}/limits")).unwrap_or_default();
        if let Some(line) = limits.lines().find(|l| l.starts_with("Max open files")) {
            println!("fleet: server {line}");
        }
    }
    let rss = |what: &str| -> u64 {
        let Some(pid) = pid else { return 0 };
        let kib = proc_status_kib(pid, "VmRSS").unwrap_or(0);
        println!(
            "fleet: server VmRSS {what}: {kib} KiB ({:.1} MiB)",
            mib(kib)
        );
        kib
    };

    // Workers: disjoint ranges of agent numbers (so disjoint source addresses).
    let exe = std::env::current_exe()?;
    let mut workers = Vec::new();
    let mut first = 0u32;
    for i in 0..args.procs {
        let agents = args.agents / args.procs + u32::from(i < args.agents % args.procs);
        let mut child = tokio::process::Command::new(&exe)
            .arg("--worker")
            .arg(first.to_string())
            .arg("--url")
            .arg(format!("{scheme}://{}{}", args.server, args.path))
            .arg("--transport")
            .arg(args.transport.flag())
            .arg("--heartbeat")
            .arg(args.heartbeat.as_secs_f64().to_string())
            .arg("--poll-during-config")
            .arg(args.poll_during_config.as_secs_f64().to_string())
            .arg("--connect-concurrency")
            .arg(args.connect_concurrency.to_string())
            .arg("--max-attempts")
            .arg(args.max_attempts.to_string())
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(Stdio::inherit())
            .kill_on_drop(true)
            .spawn()?;
        let stdin = child.stdin.take().ok_or("no worker stdin")?;
        let stdout = BufReader::new(child.stdout.take().ok_or("no worker stdout")?).lines();
        let mut w = Worker {
            child,
            stdin,
            stdout,
            agents,
        };
        let hello = w.answer().await?;
        println!(
            "fleet: worker {i}: agents {first}..{} RLIMIT_NOFILE soft={} hard={}",
            first + agents,
            num(&hello, 0),
            num(&hello, 1)
        );
        first += agents;
        workers.push(w);
    }

    let phase = |name: &str| args.phases.iter().any(|p| p == name);
    let mut rows: Vec<Row> = Vec::new();
    let mut errors_during_hold = 0u64;
    let rss0 = rss("before connecting");

    // Phase: connect, with the RSS at two sizes.
    let mut live = 0;
    if phase("connect") {
        let started = Instant::now();
        let a = all(&mut workers, |w| format!("connect {}", w.agents / 2)).await?;
        let n1 = sum(&a, 0);
        println!(
            "fleet: connected {n1} agents in {:.2} s ({} gave up)",
            started.elapsed().as_secs_f64(),
            sum(&a, 1)
        );
        tokio::time::sleep(args.settle).await;
        let rss1 = rss(&format!("at {n1} agents"));
        let started = Instant::now();
        let a = all(&mut workers, |w| {
            format!("connect {}", w.agents - w.agents / 2)
        })
        .await?;
        let n2 = sum(&a, 0);
        let gave_up = sum(&a, 1);
        println!(
            "fleet: connected {} more agents in {:.2} s, {n2} live ({gave_up} gave up)",
            n2.saturating_sub(n1),
            started.elapsed().as_secs_f64()
        );
        tokio::time::sleep(args.settle).await;
        let rss2 = rss(&format!("at {n2} agents"));
        live = n2;
        if pid.is_some() && n2 > n1 {
            let slope = (rss2 as f64 - rss1 as f64) / (n2 - n1) as f64;
            let overall = (rss2 as f64 - rss0 as f64) / n2 as f64;
            println!(
                "fleet: server RSS per agent: {slope:.2} KiB (slope {n1}->{n2}), {overall:.2} KiB (from 0 to {n2})"
            );
            let projected = rss0 as f64 + slope * 1_000_000.0;
            rows.push(Row {
                what: format!("server RSS per idle {transport} agent"),
                target: "<= 8 KiB".into(),
                measured: format!(
                    "{slope:.2} KiB (slope {n1}->{n2}); 1M agents -> {:.1} GiB",
                    projected / 1024.0 / 1024.0
                ),
                pass: Some(slope <= 8.0),
            });
        }
        if let Some(pid) = pid
            && let Some(fds) = control::proc_fds(pid)
        {
            println!("fleet: server open file descriptors: {fds}");
        }
        // The generator's own memory, to check that ~10k agents fit in one worker.
        for (i, w) in workers.iter().enumerate() {
            let kib = w
                .child
                .id()
                .and_then(|p| proc_status_kib(p, "VmRSS"))
                .unwrap_or(0);
            let per_agent = kib as f64 / f64::from(w.agents.max(1));
            println!(
                "fleet: worker {i} VmRSS {kib} KiB ({:.1} MiB) for {} agents = {per_agent:.1} KiB per agent",
                mib(kib),
                w.agents
            );
        }
    }

    // Phase: idle hold with heartbeats, then a probe every agent must answer.
    if phase("hold") && live > 0 {
        let before = counters(&all(&mut workers, |_| "counters".into()).await?);
        println!(
            "fleet: holding {live} idle agents for {:.0} s (heartbeat/poll every {:.0} s)",
            args.hold.as_secs_f64(),
            args.heartbeat.as_secs_f64()
        );
        tokio::time::sleep(args.hold).await;
        let a = all(&mut workers, |_| "probe 30".into()).await?;
        let answered = sum(&a, 0);
        let now_live = sum(&a, 1);
        let after = counters(&all(&mut workers, |_| "counters".into()).await?);
        let delta = |k: &str| after.get(k).unwrap_or(&0) - before.get(k).unwrap_or(&0);
        let hb = delta("heartbeats");
        let hb_ok = delta("heartbeats_ok");
        errors_during_hold = delta("drops")
            + delta("ws_errors")
            + delta("http_errors")
            + delta("error_responses")
            + delta("connect_failed")
            + delta("rejected")
            + (live - answered.min(live));
        println!(
            "fleet: hold: {hb} heartbeats sent, {hb_ok} answered; probe answered by {answered} of {now_live} live; drops {} ws errors {} error responses {}",
            delta("drops"),
            delta("ws_errors"),
            delta("error_responses")
        );
        if args.transport == Transport::Http {
            println!(
                "fleet: hold (plain HTTP): {} HTTP errors, {} rejections; {} keep-alive connections closed by the server while idle, {} requests re-sent on a new connection, {} failed attempts",
                delta("http_errors"),
                delta("rejected"),
                delta("http_idle_closed"),
                delta("http_resent"),
                delta("connect_failed")
            );
        }
        rss("after the hold");
    }
    if phase("connect") {
        let c = counters(&all(&mut workers, |_| "counters".into()).await?);
        let failures = c.get("gave_up").copied().unwrap_or(0);
        let connect_errors =
            c.get("connect_failed").copied().unwrap_or(0) + c.get("rejected").copied().unwrap_or(0);
        rows.insert(
            0,
            Row {
                what: format!(
                    "concurrent {transport} agents, {:.0} s heartbeats, held {:.0} s",
                    args.heartbeat.as_secs_f64(),
                    args.hold.as_secs_f64()
                ),
                target: format!("{} (all requested), no errors", args.agents),
                measured: format!(
                    "{live} held; {failures} never admitted, {connect_errors} failed attempts, {errors_during_hold} errors in the hold"
                ),
                pass: Some(live == u64::from(args.agents) && failures == 0 && errors_during_hold == 0),
            },
        );
    }

    // Phase: throughput.
    if phase("throughput") && live > 0 {
        let cpu0 = pid.and_then(proc_cpu_secs);
        let started = Instant::now();
        let secs = args.duration.as_secs_f64();
        let a = all(&mut workers, |_| format!("throughput {secs}")).await?;
        let wall = started.elapsed().as_secs_f64();
        let cpu1 = pid.and_then(proc_cpu_secs);
        let msgs = sum(&a, 0);
        let mut hist = Hist::new();
        for w in &a {
            hist.merge_serialized(w.get(1).map_or("-", String::as_str))?;
        }
        let rate = msgs as f64 / secs;
        let p50 = hist.quantile(0.50) as f64 / 1000.0;
        let p99 = hist.quantile(0.99) as f64 / 1000.0;
        let max = hist.max() as f64 / 1000.0;
        let cpu = match (cpu0, cpu1) {
            (Some(a), Some(b)) if msgs > 0 => {
                let per_msg = (b - a) / msgs as f64 * 1e6;
                format!(
                    "; server CPU {:.2} s in {wall:.1} s wall = {per_msg:.1} µs/msg",
                    b - a
                )
            }
            _ => String::new(),
        };
        println!(
            "fleet: throughput: {msgs} status replies in {secs:.1} s = {rate:.0} msg/s; RTT p50 {p50:.2} ms p99 {p99:.2} ms max {max:.2} ms ({} samples){cpu}",
            hist.count()
        );
        rows.push(Row {
            what: format!("status messages/s at {live} agents (closed loop)"),
            target: ">= 100k/s at 10k agents".into(),
            measured: format!("{rate:.0}/s, RTT p50 {p50:.1} ms, p99 {p99:.1} ms{cpu}"),
            pass: (live >= 10_000).then_some(rate >= 100_000.0),
        });
        rss("after the throughput phase");
    }

    // Phase: a config pushed to every agent, until every APPLIED report is answered.
    if phase("config") && live > 0 {
        all(&mut workers, |_| "quiet".into()).await?;
        if args.transport == Transport::Http {
            println!(
                "fleet: config (plain HTTP): agents poll every {:.3} s now; the server can only deliver the config in the answer to a poll, so the push takes at least up to one poll interval",
                args.poll_during_config.as_secs_f64()
            );
        }
        // Heartbeats in flight get their replies before the push.
        tokio::time::sleep(Duration::from_millis(300)).await;
        let line = "receivers: { otlp: { protocols: { grpc: {}, http: {} } } } # fleet bench\n";
        let marker = format!("# run {}\n", unix_nanos());
        let mut body = marker.into_bytes();
        while body.len() < args.config_size {
            body.extend_from_slice(line.as_bytes());
        }
        body.truncate(args.config_size);
        let t0 = unix_nanos();
        // One named config for every agent (an empty selector).
        let config = serde_json::json!({
            "selector": {},
            "content_type": "text/yaml",
            "body": String::from_utf8_lossy(&body),
        })
        .to_string();
        let (status, response) = control::request(
            args.api,
            "PUT",
            "/api/v1/configs/fleet",
            "application/json",
            config.as_bytes(),
        )
        .await?;
        let api_ms = (unix_nanos() - t0) as f64 / 1e6;
        let targeted = json_array_len(&response, "agents").unwrap_or(0);
        println!(
            "fleet: PUT /api/v1/configs/fleet ({} bytes): HTTP {status}, hash {}, {targeted} agents targeted, answered in {api_ms:.1} ms",
            body.len(),
            json_str(&response, "config_hash").unwrap_or("?")
        );
        let a = all(&mut workers, |_| "wait_config 30".into()).await?;
        let done = sum(&a, 0);
        let received = sum(&a, 1);
        let last = max(&a, 2);
        let ms = last.saturating_sub(t0) as f64 / 1e6;
        println!(
            "fleet: config: {received} agents received it, {done} APPLIED reports answered; last at {ms:.1} ms after the PUT"
        );
        all(&mut workers, |_| "idle".into()).await?;
        rows.push(Row {
            what: format!(
                "{} B config pushed to {live} agents, all APPLIED acked",
                args.config_size
            ),
            target: "<= 1 s at 10k agents".into(),
            measured: format!("{ms:.0} ms ({done}/{live} acked)"),
            pass: (live >= 10_000).then_some(done == live && ms <= 1000.0),
        });
        rss("after the config push");
    }

    // Phase: the server drops every agent; they reconnect at once.
    if phase("storm") && live > 0 {
        let before = counters(&all(&mut workers, |_| "counters".into()).await?);
        all(&mut workers, |_| "storm".into()).await?;
        if args.transport == Transport::Http {
            println!(
                "fleet: storm (plain HTTP): the server ends every session; agents poll every {:.3} s, and a poll after the end opens a new session, which asks for a full report; re-admitted = that report answered",
                args.poll_during_config.as_secs_f64()
            );
        }
        tokio::time::sleep(Duration::from_millis(300)).await;
        let t0 = unix_nanos();
        let (status, response) = control::request(
            args.api,
            "POST",
            "/api/v1/agents/disconnect",
            "application/json",
            b"",
        )
        .await?;
        println!(
            "fleet: POST /api/v1/agents/disconnect: HTTP {status} {}",
            response.trim()
        );
        let a = all(&mut workers, |_| "wait_storm 60".into()).await?;
        let readmitted = sum(&a, 0);
        let closed = sum(&a, 1);
        let last = max(&a, 2);
        let ms = last.saturating_sub(t0) as f64 / 1e6;
        all(&mut workers, |_| "idle".into()).await?;
        // The re-admitted fleet must hold: settle, then every agent answers a probe.
        tokio::time::sleep(args.settle).await;
        let p = all(&mut workers, |_| "probe 30".into()).await?;
        let answered = sum(&p, 0);
        let after = counters(&all(&mut workers, |_| "counters".into()).await?);
        let delta = |k: &str| after.get(k).unwrap_or(&0) - before.get(k).unwrap_or(&0);
        let rejections = delta("rejected");
        let failed = delta("connect_failed");
        let dropped = delta("drops") + delta("gave_up");
        println!(
            "fleet: storm: {closed} closed by the server, {readmitted} re-admitted, last after {ms:.1} ms; \
             {rejections} HTTP rejections, {failed} failed attempts (TCP/handshake/timeout), \
             {dropped} dropped after re-admission; probe answered by {answered}"
        );
        rows.push(Row {
            what: match args.transport {
                Transport::Ws => format!("reconnect storm of {live} agents re-admitted"),
                Transport::Http => format!(
                    "{live} sessions ended by the server, re-admitted at the next poll ({:.0} ms interval)",
                    args.poll_during_config.as_secs_f64() * 1000.0
                ),
            },
            target: "<= 5 s at 10k agents, none dropped".into(),
            measured: format!(
                "{ms:.0} ms ({readmitted}/{live}); {rejections} rejected, {failed} failed attempts, {dropped} dropped, probe {answered}/{live}"
            ),
            pass: (live >= 10_000)
                .then_some(readmitted >= live && ms <= 5000.0 && dropped == 0 && answered == live),
        });
        rss("after the storm");
    }

    if let Some(pid) = pid {
        if let Some(hwm) = proc_status_kib(pid, "VmHWM") {
            println!(
                "fleet: server VmHWM (peak RSS): {hwm} KiB ({:.1} MiB)",
                mib(hwm)
            );
        }
    }
    let c = counters(&all(&mut workers, |_| "counters".into()).await?);
    println!(
        "fleet: totals: {}",
        c.iter()
            .map(|(k, v)| format!("{k}={v}"))
            .collect::<Vec<_>>()
            .join(" ")
    );
    for w in workers.iter_mut() {
        w.send("quit").await?;
    }
    for w in workers.iter_mut() {
        let _ = tokio::time::timeout(Duration::from_secs(5), w.answer()).await;
        let _ = tokio::time::timeout(Duration::from_secs(5), w.child.wait()).await;
    }

    println!();
    println!("| measurement | target | measured | result |");
    println!("|---|---|---|---|");
    for r in &rows {
        let result = match r.pass {
            _ if args.transport == Transport::Http => "n/a (targets are for WebSocket)",
            Some(true) => "PASS",
            Some(false) => "MISS",
            None => "n/a (fewer than 10k agents)",
        };
        println!("| {} | {} | {} | {result} |", r.what, r.target, r.measured);
    }
    Ok(())
}
