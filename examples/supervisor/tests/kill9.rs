//! The `opamp-supervisor` program killed with `kill -9` and started again: the same instance
//! uid, the agent the killed one left running is stopped, and exactly one agent runs. The
//! agent is `/bin/sh` (any process will do; the supervisor is what is tested), and the server
//! is unreachable throughout: the supervisor runs its agent without one.
#![cfg(target_os = "linux")]
#![allow(clippy::unwrap_used)]

use std::path::Path;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

const STEP: Duration = Duration::from_secs(20);

fn wait_until(what: &str, mut f: impl FnMut() -> bool) {
    let deadline = Instant::now() + STEP;
    while !f() {
        assert!(Instant::now() < deadline, "timed out waiting for {what}");
        std::thread::sleep(Duration::from_millis(20));
    }
}

/// Alive and not a zombie.
fn running(pid: u32) -> bool {
    std::fs::read_to_string(format!("/proc/{pid}/stat")).is_ok_and(|stat| {
        stat.rsplit_once(')')
            .and_then(|(_, rest)| rest.split_whitespace().next())
            .is_some_and(|state| state != "Z" && state != "X")
    })
}

fn pids(file: &Path) -> Vec<u32> {
    std::fs::read_to_string(file)
        .unwrap_or_default()
        .lines()
        .filter_map(|l| l.trim().parse().ok())
        .collect()
}

fn supervisor(config: &Path, log: &Path) -> Child {
    Command::new(env!("CARGO_BIN_EXE_opamp-supervisor"))
        .arg("--config")
        .arg(config)
        .stdout(Stdio::null())
        .stderr(std::fs::File::create(log).unwrap())
        .spawn()
        .unwrap()
}

/// Kills what the test started if it fails half-way.
struct Cleanup(Vec<u32>);

impl Drop for Cleanup {
    fn drop(&mut self) {
        for &pid in &self.0 {
            if let Some(pid) = rustix::process::Pid::from_raw(pid as i32) {
                let _ = rustix::process::kill_process_group(pid, rustix::process::Signal::KILL);
                let _ = rustix::process::kill_process(pid, rustix::process::Signal::KILL);
            }
        }
    }
}

#[test]
fn kill_9_and_restart_is_the_same_agent_with_one_agent_process() {
    let dir = tempfile::tempdir().unwrap();
    let pid_file = dir.path().join("agent-pids");
    let state = dir.path().join("state");
    let unreachable = std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap();
    let config = dir.path().join("supervisor.yaml");
    std::fs::write(
        &config,
        format!(
            r#"server:
  endpoint: ws://{unreachable}/v1/opamp
agent:
  executable: /bin/sh
  args: ["-c", 'echo $$ >> "$PIDS"; while :; do sleep 1; done', "agent"]
  env:
    PIDS: {pids}
  stop_timeout: 5s
storage:
  directory: {state}
"#,
            pids = pid_file.display(),
            state = state.display(),
        ),
    )
    .unwrap();
    let mut cleanup = Cleanup(Vec::new());

    let mut first = supervisor(&config, &dir.path().join("first.log"));
    cleanup.0.push(first.id());
    wait_until("the first agent", || pids(&pid_file).len() == 1);
    let uid = std::fs::read_to_string(state.join("instance_uid")).unwrap();
    let orphan = pids(&pid_file)[0];
    cleanup.0.push(orphan);

    first.kill().unwrap(); // SIGKILL: no chance to stop its agent
    first.wait().unwrap();
    assert!(
        running(orphan),
        "the killed supervisor's agent is left running"
    );

    let mut second = supervisor(&config, &dir.path().join("second.log"));
    cleanup.0.push(second.id());
    wait_until("the second agent", || pids(&pid_file).len() == 2);
    let agent = pids(&pid_file)[1];
    cleanup.0.push(agent);
    assert_ne!(agent, orphan);
    wait_until("the leftover agent to be gone", || !running(orphan));
    assert!(running(agent));
    assert_eq!(
        std::fs::read_to_string(state.join("instance_uid")).unwrap(),
        uid,
        "the same agent"
    );

    // SIGTERM stops the supervisor and, first, its agent.
    let pid = rustix::process::Pid::from_raw(second.id() as i32).unwrap();
    rustix::process::kill_process(pid, rustix::process::Signal::TERM).unwrap();
    let deadline = Instant::now() + STEP;
    let status = loop {
        if let Some(status) = second.try_wait().unwrap() {
            break status;
        }
        assert!(Instant::now() < deadline, "the supervisor did not stop");
        std::thread::sleep(Duration::from_millis(20));
    };
    assert!(status.success(), "{status:?}");
    assert!(!running(agent));
    let log = std::fs::read_to_string(dir.path().join("second.log")).unwrap();
    assert!(log.contains("earlier supervisor is still running"), "{log}");
    std::mem::forget(cleanup);
}
