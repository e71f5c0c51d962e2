//! The fleet load generator: N lightweight OpAMP agents over WebSocket (default) or plain
//! HTTP (`--transport http`: polling, one keep-alive connection per agent) against one server.
//!
//! ```sh
//! # the reference server, with its soft file limit raised to the hard one:
//! (ulimit -n $(ulimit -Hn); target/release/examples/server) &
//! cargo run --release --example fleet -- --agents 10000 --procs 2 --server-pid $!
//! ```
//!
//! `benches/fleet.sh` does all of it (build, server, generator, stop); BENCHMARKS.md has the
//! figures. One run goes through the phases chosen with `--phases` and stops by itself:
//!
//! - `connect`: N/2 agents, settle, server RSS; the other N/2, settle, RSS again; the RSS per
//!   agent is the slope between the two sizes;
//! - `hold`: idle agents with heartbeats for `--hold` seconds, then every agent must answer a
//!   probe heartbeat;
//! - `throughput`: every agent sends status reports in a closed loop for `--duration` seconds
//!   (messages per second, round-trip p50/p99, server CPU time per message);
//! - `config`: `PUT /api/v1/configs/fleet` of a `--config-size` config to every agent, timed until every
//!   agent has the server's reply to its APPLIED report (plain HTTP: the agents poll every
//!   `--poll-during-config` seconds meanwhile, which bounds the time from below);
//! - `storm`: `POST /api/v1/agents/disconnect`, timed until every agent is admitted again;
//!   handshake failures, HTTP rejections and errors are counted, and the fleet must then hold
//!   (plain HTTP: the server ends the sessions; each agent's next poll opens a new one, which
//!   asks for a full report, and its answer is the re-admission).
//!
//! The agents run in `--procs` worker processes (this program started again with
//! `--worker`), each with its own file limit and its own share of agents; each worker is a
//! tokio runtime with 2 threads and one task per agent. Every socket is bound to a source
//! address in 127.2.0.0/16 (1000 agents per address) to stay clear of the ephemeral-port
//! limit of one address pair.

mod agent;
mod control;
mod hist;
mod http_agent;
mod orchestrator;
mod worker;
mod ws_agent;

use std::net::SocketAddr;
use std::time::Duration;

const USAGE: &str = "usage: fleet [--url ws://HOST:PORT/PATH] [--api http://HOST:PORT] [--transport ws|http]
             [--agents N] [--procs K] [--server-pid PID] [--phases connect,hold,throughput,config,storm]
             [--heartbeat SECS] [--settle SECS] [--hold SECS] [--duration SECS]
             [--config-size BYTES] [--connect-concurrency N] [--max-attempts N]
             [--poll-during-config SECS]
  defaults: --url ws://127.0.0.1:4320/v1/opamp --api http://127.0.0.1:4321 --transport ws
            --agents 1000 --procs 1 --heartbeat 30 --settle 5 --hold 35 --duration 10
            --config-size 4096 --connect-concurrency 256 --max-attempts 20
            --poll-during-config 1; every phase.
  --url takes ws:// or http:// (host, port and path; --transport picks the protocol).
  --heartbeat is the plain-HTTP polling interval too; --poll-during-config is the plain-HTTP
  polling interval while a config push or a storm is measured.
  Loopback only: the server and the API must be on 127.0.0.0/8.";

/// How the agents reach the server.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Transport {
    /// One WebSocket per agent.
    Ws,
    /// Plain-HTTP polling, one keep-alive connection per agent.
    Http,
}

impl Transport {
    pub(crate) fn flag(self) -> &'static str {
        match self {
            Self::Ws => "ws",
            Self::Http => "http",
        }
    }

    /// For tables and logs.
    pub(crate) fn name(self) -> &'static str {
        match self {
            Self::Ws => "WebSocket",
            Self::Http => "plain-HTTP",
        }
    }
}

/// Settings of the whole run.
#[derive(Debug, Clone)]
pub(crate) struct Args {
    pub(crate) server: SocketAddr,
    pub(crate) path: String,
    pub(crate) api: SocketAddr,
    pub(crate) transport: Transport,
    pub(crate) agents: u32,
    pub(crate) procs: u32,
    pub(crate) server_pid: Option<u32>,
    pub(crate) phases: Vec<String>,
    pub(crate) heartbeat: Duration,
    pub(crate) settle: Duration,
    pub(crate) hold: Duration,
    pub(crate) duration: Duration,
    pub(crate) config_size: usize,
    pub(crate) connect_concurrency: usize,
    pub(crate) max_attempts: u32,
    pub(crate) poll_during_config: Duration,
    /// Set in worker processes: the number of the first agent of this worker.
    pub(crate) worker_first_agent: Option<u32>,
}

fn parse_host_port(text: &str, what: &str) -> Result<SocketAddr, String> {
    let addr: SocketAddr = text
        .parse()
        .map_err(|e| format!("{what}: {text}: {e} (use an IP address and a port)"))?;
    if !addr.ip().is_loopback() {
        return Err(format!("{what}: {addr} is not a loopback address"));
    }
    Ok(addr)
}

fn secs(text: &str, flag: &str) -> Result<Duration, String> {
    text.parse::<f64>()
        .ok()
        .filter(|s| s.is_finite() && *s >= 0.0)
        .map(Duration::from_secs_f64)
        .ok_or_else(|| format!("{flag}: not a number of seconds: {text}"))
}

fn parse_args() -> Result<Args, String> {
    let mut args = Args {
        server: SocketAddr::from(([127, 0, 0, 1], 4320)),
        path: "/v1/opamp".into(),
        api: SocketAddr::from(([127, 0, 0, 1], 4321)),
        transport: Transport::Ws,
        agents: 1000,
        procs: 1,
        server_pid: None,
        phases: ["connect", "hold", "throughput", "config", "storm"]
            .map(String::from)
            .to_vec(),
        heartbeat: Duration::from_secs(30),
        settle: Duration::from_secs(5),
        hold: Duration::from_secs(35),
        duration: Duration::from_secs(10),
        config_size: 4096,
        connect_concurrency: 256,
        max_attempts: 20,
        poll_during_config: Duration::from_secs(1),
        worker_first_agent: None,
    };
    let mut it = std::env::args().skip(1);
    while let Some(flag) = it.next() {
        let mut value = || {
            it.next()
                .ok_or_else(|| format!("{flag} needs a value\n{USAGE}"))
        };
        let number = |v: String| -> Result<u64, String> {
            v.parse().map_err(|_| format!("{flag}: not a number: {v}"))
        };
        match flag.as_str() {
            "--url" => {
                let url = value()?;
                let rest = url
                    .strip_prefix("ws://")
                    .or_else(|| url.strip_prefix("http://"))
                    .ok_or("--url: only ws:// and http:// URLs are supported")?;
                let (host, path) = rest.split_at(rest.find('/').unwrap_or(rest.len()));
                args.server = parse_host_port(host, "--url")?;
                args.path = if path.is_empty() {
                    "/".into()
                } else {
                    path.into()
                };
            }
            "--api" => {
                let api = value()?;
                let host = api.strip_prefix("http://").unwrap_or(&api);
                args.api = parse_host_port(host.trim_end_matches('/'), "--api")?;
            }
            "--transport" => {
                args.transport = match value()?.as_str() {
                    "ws" => Transport::Ws,
                    "http" => Transport::Http,
                    other => return Err(format!("--transport: ws or http, not {other}")),
                }
            }
            "--poll-during-config" => {
                args.poll_during_config = secs(&value()?, &flag)?.max(Duration::from_millis(1))
            }
            "--agents" => args.agents = number(value()?)? as u32,
            "--procs" => args.procs = (number(value()?)? as u32).max(1),
            "--server-pid" => args.server_pid = Some(number(value()?)? as u32),
            "--phases" => args.phases = value()?.split(',').map(String::from).collect(),
            "--heartbeat" => args.heartbeat = secs(&value()?, &flag)?.max(Duration::from_millis(1)),
            "--settle" => args.settle = secs(&value()?, &flag)?,
            "--hold" => args.hold = secs(&value()?, &flag)?,
            "--duration" => args.duration = secs(&value()?, &flag)?,
            "--config-size" => args.config_size = number(value()?)? as usize,
            "--connect-concurrency" => {
                args.connect_concurrency = (number(value()?)? as usize).max(1)
            }
            "--max-attempts" => args.max_attempts = (number(value()?)? as u32).max(1),
            "--worker" => args.worker_first_agent = Some(number(value()?)? as u32),
            "-h" | "--help" => return Err(USAGE.into()),
            other => return Err(format!("unknown flag {other}\n{USAGE}")),
        }
    }
    for phase in &args.phases {
        if !["connect", "hold", "throughput", "config", "storm"].contains(&phase.as_str()) {
            return Err(format!("unknown phase {phase}\n{USAGE}"));
        }
    }
    Ok(args)
}

/// Raises the soft limit on open files to the hard limit; returns (soft, hard) after.
pub(crate) fn raise_nofile() -> (u64, u64) {
    if let Err(e) = rlimit::increase_nofile_limit(u64::MAX) {
        eprintln!("fleet: cannot raise RLIMIT_NOFILE: {e}");
    }
    rlimit::getrlimit(rlimit::Resource::NOFILE).unwrap_or((0, 0))
}

fn main() {
    let args = match parse_args() {
        Ok(args) => args,
        Err(msg) => {
            eprintln!("{msg}");
            std::process::exit(2);
        }
    };
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build();
    let runtime = match runtime {
        Ok(rt) => rt,
        Err(e) => {
            eprintln!("fleet: cannot start the runtime: {e}");
            std::process::exit(1);
        }
    };
    let result = match args.worker_first_agent {
        Some(first_agent) => runtime.block_on(worker::run(worker::WorkerArgs {
            server: args.server,
            path: args.path.clone(),
            transport: args.transport,
            first_agent,
            heartbeat: args.heartbeat,
            poll_during_config: args.poll_during_config,
            connect_concurrency: args.connect_concurrency,
            max_attempts: args.max_attempts,
        })),
        None => runtime.block_on(orchestrator::run(args)),
    };
    // Agents still running in worker tasks are dropped with the runtime.
    runtime.shutdown_timeout(Duration::from_secs(1));
    if let Err(e) = result {
        eprintln!("fleet: {e}");
        std::process::exit(1);
    }
}
