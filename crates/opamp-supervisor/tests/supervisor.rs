//! The supervisor with a real agent process (the `opamp-supervisor-test-agent` binary of this
//! package) against the workspace's own `opamp-server` on loopback.
//!
//! Every wait is for a condition, bounded by [`STEP`]; no test passes by sleeping.
#![cfg(unix)]
#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use async_trait::async_trait;
use bytes::Bytes;
use opamp_proto::{
    AgentConfigMap, AgentRemoteConfig, AgentToServer, CommandType, ComponentHealth,
    EffectiveConfig, RemoteConfigStatus, RemoteConfigStatuses, ServerToAgent, ServerToAgentCommand,
};
use opamp_server::{
    Connection, ConnectionCallbacks, ConnectionResponse, Server, ServerCallbacks, ServerConfig,
};
use opamp_supervisor::{Supervisor, SupervisorConfig};
use tokio::sync::watch;

const STEP: Duration = Duration::from_secs(20);
const AGENT: &str = env!("CARGO_BIN_EXE_opamp-supervisor-test-agent");

/// Everything the server has seen of the agent, accumulated over messages.
#[derive(Debug, Clone, Default)]
struct Seen {
    conn: Option<Connection>,
    uid: Option<Bytes>,
    statuses: Vec<RemoteConfigStatus>,
    effective: Option<EffectiveConfig>,
    healths: Vec<ComponentHealth>,
}

impl Seen {
    fn status_of(&self, hash: &[u8]) -> Vec<i32> {
        self.statuses
            .iter()
            .filter(|s| s.last_remote_config_hash == hash)
            .map(|s| s.status)
            .collect()
    }

    fn last_status(&self, hash: &[u8]) -> Option<&RemoteConfigStatus> {
        self.statuses
            .iter()
            .rev()
            .find(|s| s.last_remote_config_hash == hash)
    }

    fn effective_bodies(&self) -> Vec<String> {
        self.effective
            .as_ref()
            .and_then(|e| e.config_map.as_ref())
            .map(|m| {
                m.config_map
                    .values()
                    .map(|o| String::from_utf8_lossy(&o.body).into_owned())
                    .collect()
            })
            .unwrap_or_default()
    }
}

#[derive(Clone)]
struct Recorder(
    Arc<watch::Sender<Seen>>,
    Arc<std::sync::Mutex<Option<ServerToAgent>>>,
);

#[async_trait]
impl ServerCallbacks for Recorder {
    async fn on_connecting(&self, _request: &http::request::Parts) -> ConnectionResponse {
        ConnectionResponse::accept(Arc::new(self.clone()))
    }
}

#[async_trait]
impl ConnectionCallbacks for Recorder {
    async fn on_connected(&self, conn: &Connection) {
        let conn = conn.clone();
        self.0.send_modify(|s| s.conn = Some(conn));
    }

    async fn on_message(&self, _conn: &Connection, msg: AgentToServer) -> Option<ServerToAgent> {
        self.0.send_modify(|s| {
            s.uid = Some(msg.instance_uid.clone());
            if let Some(status) = msg.remote_config_status {
                s.statuses.push(status);
            }
            if let Some(effective) = msg.effective_config {
                s.effective = Some(effective);
            }
            if let Some(health) = msg.health {
                s.healths.push(health);
            }
        });
        // A reply set by the test goes out with the next answer (plain HTTP has no push).
        self.1.lock().unwrap().take()
    }
}

struct Harness {
    server: Option<Server>,
    seen: watch::Receiver<Seen>,
    recorder: Recorder,
    dir: tempfile::TempDir,
}

impl Harness {
    async fn new() -> Self {
        let (tx, seen) = watch::channel(Seen::default());
        let recorder = Recorder(Arc::new(tx), Arc::default());
        let config = ServerConfig::builder()
            .listen_addr("127.0.0.1:0".parse().unwrap())
            .build()
            .unwrap();
        let server = Server::bind(config, Arc::new(recorder.clone()))
            .await
            .unwrap();
        let dir = tempfile::tempdir().unwrap();
        std::fs::write(dir.path().join("base.yaml"), "base: true\n").unwrap();
        Self {
            server: Some(server),
            seen,
            recorder,
            dir,
        }
    }

    fn endpoint(&self) -> String {
        let addr = self.server.as_ref().unwrap().local_addr();
        format!("ws://{addr}/v1/opamp")
    }

    fn agent_log(&self) -> PathBuf {
        self.dir.path().join("agent.log")
    }

    fn config(&self) -> SupervisorConfig {
        self.config_for(&self.endpoint())
    }

    fn config_for(&self, endpoint: &str) -> SupervisorConfig {
        let mut c = SupervisorConfig::new(endpoint, AGENT, self.dir.path().join("state"));
        c.capabilities.accepts_remote_config = true;
        c.capabilities.reports_remote_config = true;
        c.capabilities.accepts_restart_command = true;
        c.agent.config_files = vec![self.dir.path().join("base.yaml").display().to_string()];
        c.agent.env.insert(
            "TEST_AGENT_LOG".into(),
            self.agent_log().display().to_string(),
        );
        c.agent.config_apply_timeout = Duration::from_millis(700);
        c.agent.stop_timeout = Duration::from_secs(5);
        c.agent.restart_policy.initial_interval = Duration::from_millis(100);
        c.agent.restart_policy.max_interval = Duration::from_secs(2);
        c
    }

    async fn wait(&mut self, what: &str, mut f: impl FnMut(&Seen) -> bool) -> Seen {
        let found = tokio::time::timeout(STEP, self.seen.wait_for(|s| f(s)))
            .await
            .ok()
            .and_then(Result::ok)
            .map(|seen| seen.clone());
        found.unwrap_or_else(|| {
            panic!(
                "timed out waiting for {what}; seen: {:#?}",
                *self.seen.borrow()
            )
        })
    }

    /// Sends `message` to the agent once it is connected.
    async fn send(&mut self, message: ServerToAgent) {
        let conn = self
            .wait("a connection", |s| s.conn.is_some())
            .await
            .conn
            .unwrap();
        conn.send(message).unwrap();
    }

    async fn push(&mut self, body: &str, hash: &'static [u8]) {
        self.send(config_message(body, hash)).await;
    }

    fn starts(&self) -> Vec<Start> {
        log_lines(&self.agent_log())
            .iter()
            .filter_map(|l| Start::parse(l))
            .collect()
    }

    fn stops(&self) -> Vec<u32> {
        log_lines(&self.agent_log())
            .iter()
            .filter_map(|l| l.strip_prefix("stop pid=")?.parse().ok())
            .collect()
    }

    /// Waits until the agent's log satisfies `f`.
    async fn wait_log(&self, what: &str, f: impl Fn(&Harness) -> bool) {
        let deadline = tokio::time::Instant::now() + STEP;
        while !f(self) {
            assert!(
                tokio::time::Instant::now() < deadline,
                "timed out waiting for {what}; agent log:\n{}",
                log_lines(&self.agent_log()).join("\n")
            );
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }
}

fn config_message(body: &str, hash: &'static [u8]) -> ServerToAgent {
    ServerToAgent {
        remote_config: Some(AgentRemoteConfig {
            config: Some(AgentConfigMap::single(body.to_owned(), "text/yaml")),
            config_hash: Bytes::from_static(hash),
        }),
        ..Default::default()
    }
}

fn log_lines(path: &Path) -> Vec<String> {
    std::fs::read_to_string(path)
        .unwrap_or_default()
        .lines()
        .map(str::to_owned)
        .collect()
}

#[derive(Debug, Clone)]
struct Start {
    pid: u32,
    at_ms: u128,
    configs: Vec<PathBuf>,
}

impl Start {
    fn parse(line: &str) -> Option<Self> {
        let rest = line.strip_prefix("start ")?;
        let mut pid = None;
        let mut at_ms = None;
        let mut configs = Vec::new();
        for part in rest.split(' ') {
            if let Some(v) = part.strip_prefix("pid=") {
                pid = v.parse().ok();
            } else if let Some(v) = part.strip_prefix("at_ms=") {
                at_ms = v.parse().ok();
            } else if let Some(v) = part.strip_prefix("configs=") {
                configs = v
                    .split(',')
                    .filter(|s| !s.is_empty())
                    .map(PathBuf::from)
                    .collect();
            }
        }
        Some(Self {
            pid: pid?,
            at_ms: at_ms?,
            configs,
        })
    }

    /// What the agent's config files hold now, concatenated.
    fn config_text(&self) -> String {
        self.configs
            .iter()
            .map(|f| {
                std::fs::read_to_string(f).unwrap_or_else(|_| format!("<{} gone>", f.display()))
            })
            .collect::<Vec<_>>()
            .join("")
    }
}

const APPLYING: i32 = RemoteConfigStatuses::Applying as i32;
const APPLIED: i32 = RemoteConfigStatuses::Applied as i32;
const FAILED: i32 = RemoteConfigStatuses::Failed as i32;

fn alive(pid: u32) -> bool {
    let pid = rustix::process::Pid::from_raw(pid as i32).unwrap();
    rustix::process::test_kill_process(pid).is_ok()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn rc_3_rc_5_config_applied_after_the_grace_and_effective_config_reported() {
    let mut h = Harness::new().await;
    let sup = Supervisor::start(h.config()).unwrap();
    h.wait("a healthy agent", |s| s.healths.iter().any(|h| h.healthy))
        .await;
    h.wait_log("the first start", |h| h.starts().len() == 1)
        .await;
    let first = h.starts()[0].clone();
    assert_eq!(first.configs.len(), 1, "only the local file at first");

    h.push("pipeline: good\n", b"h1").await;
    let seen = h
        .wait("APPLIED for h1", |s| s.status_of(b"h1").contains(&APPLIED))
        .await;
    // RC-5: APPLYING first, then APPLIED.
    assert_eq!(seen.status_of(b"h1"), [APPLYING, APPLIED]);
    // The old agent was stopped with SIGTERM (it logged its graceful stop), the new one runs
    // with the local file and then the remote one.
    assert!(
        h.stops().contains(&first.pid),
        "graceful stop of {}",
        first.pid
    );
    let starts = h.starts();
    let now = starts.last().unwrap();
    assert_eq!(now.configs.len(), 2);
    assert_eq!(now.configs[0], h.dir.path().join("base.yaml"));
    assert_eq!(now.config_text(), "base: true\npipeline: good\n");
    assert!(alive(now.pid));
    assert_eq!(sup.status().pid, Some(now.pid));
    // EFF-1: the effective config is what the agent was given.
    let seen = h
        .wait("the new effective config", |s| {
            s.effective_bodies().iter().any(|b| b == "pipeline: good\n")
        })
        .await;
    let mut bodies = seen.effective_bodies();
    bodies.sort();
    assert_eq!(bodies, ["base: true\n", "pipeline: good\n"]);

    // The same config again (e.g. after a reconnect) is not applied again.
    h.push("pipeline: good\n", b"h1").await;
    h.push("pipeline: other\n", b"h2").await;
    h.wait("APPLIED for h2", |s| s.status_of(b"h2").contains(&APPLIED))
        .await;
    assert_eq!(h.seen.borrow().status_of(b"h1"), [APPLYING, APPLIED]);
    sup.stop().await.unwrap();
    h.server.take().unwrap().shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn rc_7_bad_config_fails_with_the_agents_stderr_and_rolls_back() {
    let mut h = Harness::new().await;
    let sup = Supervisor::start(h.config()).unwrap();
    h.push("pipeline: good\n", b"good").await;
    h.wait("APPLIED", |s| s.status_of(b"good").contains(&APPLIED))
        .await;
    let good_pid = h.starts().last().unwrap().pid;

    h.push("pipeline: CRASH\n", b"bad").await;
    let seen = h
        .wait("FAILED", |s| s.status_of(b"bad").contains(&FAILED))
        .await;
    assert_eq!(seen.status_of(b"bad"), [APPLYING, FAILED]);
    let failed = seen.last_status(b"bad").unwrap();
    // The agent's own words are in the status.
    assert!(
        failed
            .error_message
            .contains("error: the config contains CRASH"),
        "{}",
        failed.error_message
    );
    assert!(
        failed.error_message.contains("code 3"),
        "{}",
        failed.error_message
    );

    // Rolled back: the agent runs again with the good config.
    h.wait_log("the rollback start", |h| {
        let s = h.starts();
        s.len() >= 4 && s.last().unwrap().config_text() == "base: true\npipeline: good\n"
    })
    .await;
    let starts = h.starts();
    let rolled_back = starts.last().unwrap();
    assert!(h.stops().contains(&good_pid));
    // Starts: the first, the good config, the bad one, the rollback; the bad one's files
    // are removed once it failed.
    assert!(starts.len() >= 4, "{starts:?}");
    let bad = &starts[starts.len() - 2];
    assert_ne!(bad.pid, good_pid);
    assert!(bad.config_text().contains("gone"), "{}", bad.config_text());
    let status = sup.subscribe();
    let pid = tokio::time::timeout(STEP, async {
        let mut status = status;
        status
            .wait_for(|s| s.pid == Some(rolled_back.pid))
            .await
            .map(|s| s.pid)
    })
    .await
    .unwrap()
    .unwrap();
    assert!(alive(pid.unwrap()));
    // The effective config still is the good one.
    let bodies = h.seen.borrow().effective_bodies();
    assert!(
        bodies.contains(&"pipeline: good\n".to_owned()),
        "{bodies:?}"
    );
    assert!(!bodies.iter().any(|b| b.contains("CRASH")), "{bodies:?}");

    // A crash-looping config that was FAILED is not tried again when resent.
    let before = h.starts().len();
    h.push("pipeline: CRASH\n", b"bad").await;
    h.push("pipeline: fine\n", b"fine").await;
    h.wait("APPLIED for the next one", |s| {
        s.status_of(b"fine").contains(&APPLIED)
    })
    .await;
    assert_eq!(h.seen.borrow().status_of(b"bad"), [APPLYING, FAILED]);
    // One start for "fine" only.
    assert_eq!(h.starts().len(), before + 1);
    sup.stop().await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn hlt_crash_is_restarted_with_exponential_backoff() {
    let mut h = Harness::new().await;
    std::fs::write(h.dir.path().join("base.yaml"), "EXIT_AFTER_MS=100\n").unwrap();
    let mut config = h.config();
    config.agent.restart_policy.initial_interval = Duration::from_millis(150);
    config.agent.restart_policy.multiplier = 2.0;
    config.agent.restart_policy.reset_after = Duration::from_secs(60);
    let sup = Supervisor::start(config).unwrap();
    h.wait_log("four starts", |h| h.starts().len() >= 4).await;
    let starts = h.starts();
    // Start i+1 comes at least 100 ms (the agent's run) plus the i-th delay (150, 300, 600
    // ms) after start i. Lower bounds only: a slow machine makes gaps longer, never shorter.
    for (i, pair) in starts.windows(2).take(3).enumerate() {
        let gap = pair[1].at_ms - pair[0].at_ms;
        let delay = 150u128 << i;
        assert!(
            gap + 5 >= 100 + delay,
            "gap {i} is {gap} ms, backoff {delay} ms: {starts:?}"
        );
    }
    // HLT-1: the crash is reported with its exit code and the agent's last words.
    let seen = h
        .wait("an unhealthy report", |s| {
            s.healths.iter().any(|h| !h.healthy)
        })
        .await;
    let crashed = seen.healths.iter().find(|h| !h.healthy).unwrap();
    assert!(crashed.status.contains("exited with code 4"), "{crashed:?}");
    assert!(crashed.last_error.contains("EXIT_AFTER_MS"), "{crashed:?}");
    let restarts = sup.status().crash_restarts;
    assert!(restarts >= 3, "{restarts}");
    sup.stop().await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn cmd_1_restart_command_restarts_the_agent() {
    let mut h = Harness::new().await;
    let sup = Supervisor::start(h.config()).unwrap();
    h.wait_log("the first start", |h| h.starts().len() == 1)
        .await;
    let first = h.starts()[0].pid;
    h.send(ServerToAgent {
        command: Some(ServerToAgentCommand {
            r#type: CommandType::Restart as i32,
        }),
        ..Default::default()
    })
    .await;
    h.wait_log("a second start", |h| h.starts().len() == 2)
        .await;
    assert!(h.stops().contains(&first), "SIGTERM first");
    let second = h.starts()[1].clone();
    assert_ne!(second.pid, first);
    assert_eq!(second.configs.len(), 1, "same config");
    assert!(!alive(first));
    assert!(alive(second.pid));
    sup.stop().await.unwrap();
    assert!(h.stops().contains(&second.pid), "stop is graceful");
    assert!(!alive(second.pid));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn uid_3_restarted_supervisor_is_the_same_agent_with_the_last_good_config() {
    let mut h = Harness::new().await;
    let sup = Supervisor::start(h.config()).unwrap();
    let uid = sup.instance_uid();
    assert_eq!(uid.as_array()[6] >> 4, 7, "UUID v7");
    h.push("pipeline: kept\n", b"kept").await;
    h.wait("APPLIED", |s| s.status_of(b"kept").contains(&APPLIED))
        .await;
    assert_eq!(h.seen.borrow().uid.as_deref(), Some(&uid.as_array()[..]));
    sup.stop().await.unwrap();

    // Without a server: the agent runs with the last good config all the same.
    let unreachable = {
        let l = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        l.local_addr().unwrap()
    };
    let before = h.starts().len();
    let sup = Supervisor::start(h.config_for(&format!("ws://{unreachable}/v1/opamp"))).unwrap();
    assert_eq!(sup.instance_uid(), uid);
    h.wait_log("a start without the server", |h| {
        h.starts().len() == before + 1
    })
    .await;
    assert_eq!(
        h.starts().last().unwrap().config_text(),
        "base: true\npipeline: kept\n"
    );
    sup.stop().await.unwrap();

    // With the server again: same uid, the config is not re-applied, its status is reported.
    h.recorder.0.send_modify(|s| *s = Seen::default());
    let sup = Supervisor::start(h.config()).unwrap();
    // The first report already carries the stored status (RC-3), never UNSET first.
    let set = |s: &Seen| -> Vec<RemoteConfigStatus> { s.statuses.clone() };
    let seen = h
        .wait("the status after the restart", |s| !set(s).is_empty())
        .await;
    assert_eq!(seen.uid.as_deref(), Some(&uid.as_array()[..]));
    assert_eq!(set(&seen)[0].status, APPLIED);
    assert_eq!(&set(&seen)[0].last_remote_config_hash[..], b"kept");
    h.push("pipeline: kept\n", b"kept").await;
    h.push("pipeline: next\n", b"next").await;
    h.wait("APPLIED for next", |s| {
        s.status_of(b"next").contains(&APPLIED)
    })
    .await;
    assert!(
        h.seen
            .borrow()
            .status_of(b"kept")
            .iter()
            .all(|&s| s == APPLIED)
    );
    sup.stop().await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn stop_escalates_to_sigkill_after_the_grace() {
    let h = Harness::new().await;
    std::fs::write(h.dir.path().join("base.yaml"), "IGNORE_SIGTERM\n").unwrap();
    let mut config = h.config();
    config.agent.stop_timeout = Duration::from_millis(300);
    let sup = Supervisor::start(config).unwrap();
    h.wait_log("the start", |h| h.starts().len() == 1).await;
    let pid = h.starts()[0].pid;
    let status = sup.subscribe();
    tokio::time::timeout(STEP, sup.stop())
        .await
        .unwrap()
        .unwrap();
    assert!(!alive(pid));
    assert!(h.stops().is_empty(), "it ignored SIGTERM");
    let exit = status.borrow().last_exit.clone().unwrap();
    assert_eq!(exit.signal, Some(9), "{exit:?}");
}

/// Kills a process the test started by hand if the test fails before it is gone.
struct KillOnDrop(u32);

impl Drop for KillOnDrop {
    fn drop(&mut self) {
        if let Some(pid) = rustix::process::Pid::from_raw(self.0 as i32) {
            let _ = rustix::process::kill_process(pid, rustix::process::Signal::KILL);
        }
    }
}

/// A supervisor killed with `kill -9` leaves its agent running; the next one stops that agent
/// before it starts its own, so there are never two.
#[cfg(target_os = "linux")]
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn leftover_agent_of_a_killed_supervisor_is_stopped_first() {
    let h = Harness::new().await;
    let config = h.config();
    // The state a killed supervisor leaves: its agent running and recorded in agent.pid.
    use std::os::unix::process::CommandExt;
    let mut orphan = std::process::Command::new(AGENT)
        .process_group(0)
        .arg("--config")
        .arg(h.dir.path().join("base.yaml"))
        .env("TEST_AGENT_LOG", h.agent_log())
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::null())
        .spawn()
        .unwrap();
    let orphan_pid = orphan.id();
    let cleanup = KillOnDrop(orphan_pid);
    // Reaped as soon as it exits, as init would reap a real orphan.
    let reaper = std::thread::spawn(move || orphan.wait().unwrap());
    h.wait_log("the orphan's start", |h| h.starts().len() == 1)
        .await;
    opamp_supervisor::Storage::open(&config.storage.directory)
        .unwrap()
        .save_agent_pid(orphan_pid, Path::new(AGENT))
        .unwrap();

    let sup = Supervisor::start(config).unwrap();
    h.wait_log("the supervisor's own start", |h| h.starts().len() == 2)
        .await;
    assert!(
        h.stops().contains(&orphan_pid),
        "the orphan got SIGTERM first"
    );
    assert!(reaper.join().unwrap().success());
    // Reaped: its pid may belong to another process from now on.
    std::mem::forget(cleanup);
    let own = h.starts()[1].pid;
    assert_ne!(own, orphan_pid);
    assert!(alive(own));
    sup.stop().await.unwrap();
}

/// Over plain HTTP the config comes in a poll's answer, and APPLYING, APPLIED and the new
/// effective config go out at once (HTTP-7: a change is sent without waiting for the poll).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn http_config_applied_over_plain_http() {
    let mut h = Harness::new().await;
    *h.recorder.1.lock().unwrap() = Some(config_message("pipeline: http\n", b"http"));
    let endpoint = h.endpoint().replace("ws://", "http://");
    let sup = Supervisor::start(h.config_for(&endpoint)).unwrap();
    let seen = h
        .wait("APPLIED over HTTP", |s| {
            s.status_of(b"http").contains(&APPLIED)
        })
        .await;
    assert_eq!(seen.status_of(b"http"), [APPLYING, APPLIED]);
    h.wait("the effective config over HTTP", |s| {
        s.effective_bodies().iter().any(|b| b == "pipeline: http\n")
    })
    .await;
    assert_eq!(
        h.starts().last().unwrap().config_text(),
        "base: true\npipeline: http\n"
    );
    sup.stop().await.unwrap();
}

/// HLT: with a health endpoint, the agent is healthy only while it answers 2xx, and a config
/// that leaves it running but unhealthy is FAILED with the endpoint's answer and rolled back.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn hlt_health_endpoint_decides_health_and_apply() {
    let mut h = Harness::new().await;
    let port = std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port();
    std::fs::write(
        h.dir.path().join("base.yaml"),
        format!("HEALTH_PORT={port}\n"),
    )
    .unwrap();
    let mut config = h.config();
    config.agent.health_check.endpoint = Some(format!("http://127.0.0.1:{port}/"));
    config.agent.health_check.interval = Duration::from_millis(100);
    let sup = Supervisor::start(config).unwrap();
    let component_ok = |h: &ComponentHealth| {
        h.healthy
            && h.component_health_map
                .get("health_check")
                .is_some_and(|c| c.healthy && c.status == "200 OK: ok")
    };
    h.wait("healthy through the endpoint", |s| {
        s.healths.iter().any(component_ok)
    })
    .await;

    h.push("pipeline: UNHEALTHY\n", b"sick").await;
    let seen = h
        .wait("FAILED for the unhealthy config", |s| {
            s.status_of(b"sick").contains(&FAILED)
        })
        .await;
    let failed = seen.last_status(b"sick").unwrap();
    assert!(
        failed.error_message.contains("health check")
            && failed
                .error_message
                .contains("503 Service Unavailable: pipeline broken"),
        "{}",
        failed.error_message
    );
    // Rolled back to the local config only, and healthy again.
    h.wait_log("the rollback", |h| {
        h.starts().last().is_some_and(|s| s.configs.len() == 1) && h.starts().len() >= 3
    })
    .await;
    let before = seen.healths.len();
    h.wait("healthy again", |s| {
        s.healths[before..].iter().any(component_ok)
    })
    .await;

    h.push("pipeline: fine\n", b"fine").await;
    h.wait("APPLIED", |s| s.status_of(b"fine").contains(&APPLIED))
        .await;
    sup.stop().await.unwrap();
}

/// RC-7: a supervisor stopped while applying (e.g. `kill -9`) left APPLYING stored; the next
/// one applies that config again instead of leaving it half done.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn rc_7_an_interrupted_apply_is_done_again_after_a_restart() {
    let mut h = Harness::new().await;
    let config = h.config();
    let storage = opamp_supervisor::Storage::open(&config.storage.directory).unwrap();
    let remote = AgentRemoteConfig {
        config: Some(AgentConfigMap::single(
            "pipeline: interrupted\n",
            "text/yaml",
        )),
        config_hash: Bytes::from_static(b"again"),
    };
    storage.save_last_remote_config(&remote).unwrap();
    storage
        .save_remote_config_status(&RemoteConfigStatus {
            last_remote_config_hash: Bytes::from_static(b"again"),
            status: APPLYING,
            error_message: String::new(),
        })
        .unwrap();
    let sup = Supervisor::start(config).unwrap();
    h.wait("APPLIED for the interrupted config", |s| {
        s.status_of(b"again").contains(&APPLIED)
    })
    .await;
    assert_eq!(
        h.starts().last().unwrap().config_text(),
        "base: true\npipeline: interrupted\n"
    );
    assert_eq!(storage.good_remote_config(), Some(remote));
    sup.stop().await.unwrap();
}
