//! A worker process: holds a range of agents (WebSocket or plain HTTP, `--transport`) and
//! obeys one command per line on stdin, answering one line on stdout. The orchestrator (`orchestrator.rs`) drives one or more
//! workers, so that the load can be split over processes (each has its own file limit).
//!
//! Commands and answers (numbers are decimal, times are Unix nanoseconds):
//!
//! ```text
//! connect N          -> ok <admitted now> <gave up> <elapsed ms>
//! probe SECS         -> ok <answered> <live>           every live agent sends one heartbeat
//! throughput SECS    -> ok <replies> <histogram>       closed loop of status reports
//! quiet              -> ok                             heartbeats pause (config push); plain
//!                                                      HTTP: polls every --poll-during-config
//! storm              -> ok                             as quiet; closes are expected
//! wait_config SECS   -> ok <done> <received> <last done ns>
//! wait_storm SECS    -> ok <readmitted> <closed> <last admit ns>
//! idle               -> ok                             heartbeats resume
//! counters           -> ok <name=value ...>
//! quit               -> ok
//! ```

use std::net::SocketAddr;
use std::sync::Arc;
use std::sync::atomic::Ordering::Relaxed;
use std::sync::atomic::{AtomicU32, AtomicU64};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use tokio::io::{AsyncBufReadExt, BufReader};
use tokio::sync::{mpsc, watch};

use crate::Transport;
use crate::agent::{self, Agent};
use crate::hist::AtomicHist;
use crate::http_agent::HttpAgent;
use crate::ws_agent::WsAgent;

/// What every agent of the worker is doing.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Phase {
    /// Heartbeats (plain HTTP: polls) every interval.
    Idle,
    /// Status reports in a closed loop until `until`.
    Throughput { until: Instant },
    /// Every live agent sends one heartbeat (the generation tells answers apart).
    Probe(u32),
    /// No heartbeats: a config push is being measured (plain HTTP: fast polls).
    Quiet,
    /// No heartbeats, and a closed connection is expected: a reconnect storm (plain HTTP:
    /// fast polls; the server ends the sessions).
    Storm,
    /// Close and stop.
    Quit,
}

/// Counters shared by the worker's agents.
#[derive(Debug, Default)]
pub(crate) struct Counters {
    pub(crate) live: AtomicU64,
    pub(crate) admitted_total: AtomicU64,
    pub(crate) last_admit_ns: AtomicU64,
    pub(crate) gave_up: AtomicU64,
    pub(crate) rejected: AtomicU64,
    pub(crate) connect_failed: AtomicU64,
    pub(crate) ws_errors: AtomicU64,
    pub(crate) error_responses: AtomicU64,
    pub(crate) drops: AtomicU64,
    pub(crate) storm_closed: AtomicU64,
    pub(crate) heartbeats: AtomicU64,
    pub(crate) heartbeats_ok: AtomicU64,
    pub(crate) probe_ok: AtomicU64,
    pub(crate) status_ok: AtomicU64,
    pub(crate) pushes: AtomicU64,
    pub(crate) config_received: AtomicU64,
    pub(crate) config_done: AtomicU64,
    pub(crate) config_last_ns: AtomicU64,
    pub(crate) full_state_requests: AtomicU64,
    /// Plain HTTP: non-200 answers other than 429/503, and undecodable bodies.
    pub(crate) http_errors: AtomicU64,
    /// Plain HTTP: keep-alive connections the server closed while the agent was idle.
    pub(crate) http_idle_closed: AtomicU64,
    /// Plain HTTP: requests sent again because their connection closed before the answer.
    pub(crate) http_resent: AtomicU64,
}

impl Counters {
    fn line(&self) -> String {
        let all = [
            ("live", &self.live),
            ("admitted_total", &self.admitted_total),
            ("gave_up", &self.gave_up),
            ("rejected", &self.rejected),
            ("connect_failed", &self.connect_failed),
            ("ws_errors", &self.ws_errors),
            ("error_responses", &self.error_responses),
            ("drops", &self.drops),
            ("storm_closed", &self.storm_closed),
            ("heartbeats", &self.heartbeats),
            ("heartbeats_ok", &self.heartbeats_ok),
            ("pushes", &self.pushes),
            ("full_state_requests", &self.full_state_requests),
            ("http_errors", &self.http_errors),
            ("http_idle_closed", &self.http_idle_closed),
            ("http_resent", &self.http_resent),
        ];
        all.iter()
            .map(|(k, v)| format!("{k}={}", v.load(Relaxed)))
            .collect::<Vec<_>>()
            .join(" ")
    }
}

/// What the agents of one worker share.
#[derive(Debug)]
pub(crate) struct Shared {
    pub(crate) server: SocketAddr,
    /// The WebSocket URL.
    pub(crate) url: String,
    /// Plain HTTP: the request target (the OpAMP path) and the `Host` header.
    pub(crate) path_uri: http::Uri,
    pub(crate) host: http::HeaderValue,
    pub(crate) heartbeat: Duration,
    /// Plain HTTP: the polling interval while a push or a storm is measured.
    pub(crate) poll_during_config: Duration,
    pub(crate) max_attempts: u32,
    pub(crate) started_unix_nanos: u64,
    pub(crate) phase: watch::Sender<Phase>,
    pub(crate) probe_generation: AtomicU32,
    pub(crate) c: Counters,
    pub(crate) hist: AtomicHist,
}

/// Settings of a worker, from the command line.
#[derive(Debug, Clone)]
pub(crate) struct WorkerArgs {
    pub(crate) server: SocketAddr,
    pub(crate) path: String,
    pub(crate) transport: Transport,
    pub(crate) first_agent: u32,
    pub(crate) heartbeat: Duration,
    pub(crate) poll_during_config: Duration,
    pub(crate) connect_concurrency: usize,
    pub(crate) max_attempts: u32,
}

fn unix_nanos() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.as_nanos() as u64)
}

/// Runs a worker until `quit` or the end of stdin.
pub(crate) async fn run(args: WorkerArgs) -> Result<(), Box<dyn std::error::Error>> {
    let (soft, hard) = crate::raise_nofile();
    let (phase, _) = watch::channel(Phase::Idle);
    let path_uri: http::Uri = args.path.parse()?;
    let host = http::HeaderValue::from_str(&args.server.to_string())?;
    let shared = Arc::new(Shared {
        server: args.server,
        url: format!("ws://{}{}", args.server, args.path),
        path_uri,
        host,
        heartbeat: args.heartbeat,
        poll_during_config: args.poll_during_config,
        max_attempts: args.max_attempts,
        started_unix_nanos: unix_nanos(),
        phase,
        probe_generation: AtomicU32::new(0),
        c: Counters::default(),
        hist: AtomicHist::new(),
    });
    println!("hello {soft} {hard}");
    let mut next_agent = args.first_agent;
    let mut storm_target = 0;
    let mut lines = BufReader::new(tokio::io::stdin()).lines();
    while let Some(line) = lines.next_line().await? {
        let mut words = line.split_whitespace();
        let cmd = words.next().unwrap_or("");
        let arg: f64 = words.next().and_then(|w| w.parse().ok()).unwrap_or(0.0);
        let c = &shared.c;
        let answer = match cmd {
            "connect" => {
                let n = arg as u32;
                let started = Instant::now();
                let (tx, mut rx) = mpsc::channel::<bool>(n.max(1) as usize);
                let gave_up_before = c.gave_up.load(Relaxed);
                // A bounded number of handshakes in flight: the connect phase measures
                // admission, not the listen backlog.
                let mut in_flight = 0usize;
                let mut done = 0u32;
                for i in 0..n {
                    if in_flight >= args.connect_concurrency {
                        let _ = rx.recv().await;
                        in_flight -= 1;
                        done += 1;
                    }
                    let agent = Agent::new(next_agent + i, shared.clone());
                    match args.transport {
                        Transport::Ws => tokio::spawn(agent::run(WsAgent(agent), tx.clone())),
                        Transport::Http => {
                            tokio::spawn(agent::run(HttpAgent::new(agent), tx.clone()))
                        }
                    };
                    in_flight += 1;
                }
                next_agent += n;
                while done < n {
                    if rx.recv().await.is_none() {
                        break;
                    }
                    done += 1;
                }
                format!(
                    "ok {} {} {}",
                    c.live.load(Relaxed),
                    c.gave_up.load(Relaxed) - gave_up_before,
                    started.elapsed().as_millis()
                )
            }
            "probe" => {
                let generation = shared.probe_generation.fetch_add(1, Relaxed) + 1;
                c.probe_ok.store(0, Relaxed);
                shared.phase.send_replace(Phase::Probe(generation));
                let target = c.live.load(Relaxed);
                let deadline = Instant::now() + Duration::from_secs_f64(arg);
                while c.probe_ok.load(Relaxed) < target && Instant::now() < deadline {
                    tokio::time::sleep(Duration::from_millis(10)).await;
                }
                shared.phase.send_replace(Phase::Idle);
                format!("ok {} {}", c.probe_ok.load(Relaxed), c.live.load(Relaxed))
            }
            "throughput" => {
                shared.hist.reset();
                let until = Instant::now() + Duration::from_secs_f64(arg);
                shared.phase.send_replace(Phase::Throughput { until });
                tokio::time::sleep_until(until.into()).await;
                // Let the last round trips finish; their replies still count.
                tokio::time::sleep(Duration::from_millis(500)).await;
                shared.phase.send_replace(Phase::Idle);
                format!(
                    "ok {} {}",
                    c.status_ok.swap(0, Relaxed),
                    shared.hist.serialize()
                )
            }
            "quiet" | "storm" => {
                c.config_done.store(0, Relaxed);
                c.config_received.store(0, Relaxed);
                c.config_last_ns.store(0, Relaxed);
                c.last_admit_ns.store(0, Relaxed);
                c.storm_closed.store(0, Relaxed);
                c.admitted_total.store(0, Relaxed);
                storm_target = c.live.load(Relaxed);
                shared.phase.send_replace(if cmd == "quiet" {
                    Phase::Quiet
                } else {
                    Phase::Storm
                });
                "ok".into()
            }
            "wait_config" => {
                let target = c.live.load(Relaxed);
                let deadline = Instant::now() + Duration::from_secs_f64(arg);
                while c.config_done.load(Relaxed) < target && Instant::now() < deadline {
                    tokio::time::sleep(Duration::from_millis(5)).await;
                }
                format!(
                    "ok {} {} {}",
                    c.config_done.load(Relaxed),
                    c.config_received.load(Relaxed),
                    c.config_last_ns.load(Relaxed)
                )
            }
            "wait_storm" => {
                let deadline = Instant::now() + Duration::from_secs_f64(arg);
                // Wait until every live agent was closed and came back.
                loop {
                    let closed = c.storm_closed.load(Relaxed);
                    let back = c.admitted_total.load(Relaxed);
                    if (closed >= storm_target && back >= storm_target)
                        || Instant::now() >= deadline
                    {
                        break;
                    }
                    tokio::time::sleep(Duration::from_millis(5)).await;
                }
                format!(
                    "ok {} {} {}",
                    c.admitted_total.load(Relaxed),
                    c.storm_closed.load(Relaxed),
                    c.last_admit_ns.load(Relaxed)
                )
            }
            "idle" => {
                shared.phase.send_replace(Phase::Idle);
                "ok".into()
            }
            "counters" => format!("ok {}", c.line()),
            "quit" => {
                shared.phase.send_replace(Phase::Quit);
                tokio::time::sleep(Duration::from_millis(500)).await;
                println!("ok");
                return Ok(());
            }
            other => format!("error unknown command {other}"),
        };
        println!("{answer}");
    }
    Ok(())
}
