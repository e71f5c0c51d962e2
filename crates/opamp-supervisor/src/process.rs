//! The agent process: started with its arguments and `--config` files, its stderr's last lines
//! kept, stopped with SIGTERM and, after a grace period, SIGKILL.

use std::collections::VecDeque;
use std::ffi::OsString;
use std::path::PathBuf;
use std::process::{ExitStatus, Stdio};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant, SystemTime};

use tokio::io::{AsyncRead, AsyncReadExt};
use tokio::process::{Child, Command};
use tokio::task::JoinHandle;

/// The longest stderr line kept; the rest of a longer line is dropped.
const MAX_LINE: usize = 4096;

/// How long to wait, after the agent exited, for the rest of what it wrote to stderr.
const STDERR_DRAIN: Duration = Duration::from_millis(500);

/// How to start the agent.
#[derive(Debug, Clone)]
pub struct LaunchSpec {
    /// The executable.
    pub executable: PathBuf,
    /// All arguments, the `--config` ones included.
    pub args: Vec<OsString>,
    /// Added environment variables.
    pub env: Vec<(String, String)>,
    /// How many stderr lines to keep.
    pub stderr_lines: usize,
    /// Copy stdout and stderr lines into the supervisor's log.
    pub passthrough_logs: bool,
}

/// How the agent ended.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Exit {
    /// Its exit code, if it exited.
    pub code: Option<i32>,
    /// The signal that ended it, if one did (Unix).
    pub signal: Option<i32>,
    /// How long it ran.
    pub uptime: Duration,
    /// Its last stderr lines.
    pub stderr: Vec<String>,
}

impl Exit {
    /// "exited with code 3", "killed by signal 9".
    pub fn describe(&self) -> String {
        match (self.code, self.signal) {
            (Some(code), _) => format!("exited with code {code}"),
            (None, Some(signal)) => format!("killed by signal {signal}"),
            (None, None) => "exited".into(),
        }
    }
}

/// A running agent.
#[derive(Debug)]
pub struct AgentProcess {
    child: Child,
    pid: Option<u32>,
    started: Instant,
    started_at: SystemTime,
    tail: Arc<Mutex<VecDeque<String>>>,
    readers: Vec<JoinHandle<()>>,
}

impl AgentProcess {
    /// Starts the agent in a process group of its own (so a Ctrl-C at the terminal reaches
    /// the supervisor, which then stops the agent itself). The process is killed if this
    /// value is dropped without [`stop`](Self::stop).
    pub fn spawn(spec: &LaunchSpec) -> std::io::Result<Self> {
        let mut command = Command::new(&spec.executable);
        command
            .args(&spec.args)
            .envs(spec.env.iter().map(|(k, v)| (k, v)))
            .stdin(Stdio::null())
            .stdout(if spec.passthrough_logs {
                Stdio::piped()
            } else {
                Stdio::null()
            })
            .stderr(Stdio::piped())
            .kill_on_drop(true);
        #[cfg(unix)]
        command.process_group(0);
        let mut child = command.spawn()?;
        let tail = Arc::new(Mutex::new(VecDeque::with_capacity(spec.stderr_lines)));
        let mut readers = Vec::new();
        if let Some(stderr) = child.stderr.take() {
            readers.push(tokio::spawn(read_lines(
                stderr,
                Some((tail.clone(), spec.stderr_lines)),
                spec.passthrough_logs.then_some("stderr"),
            )));
        }
        if let Some(stdout) = child.stdout.take() {
            readers.push(tokio::spawn(read_lines(stdout, None, Some("stdout"))));
        }
        let pid = child.id();
        tracing::info!(pid, executable = %spec.executable.display(), "agent started");
        Ok(Self {
            child,
            pid,
            started: Instant::now(),
            started_at: SystemTime::now(),
            tail,
            readers,
        })
    }

    /// The process id.
    pub fn pid(&self) -> Option<u32> {
        self.pid
    }

    /// When it started.
    pub fn started_at(&self) -> SystemTime {
        self.started_at
    }

    /// How long it has been running.
    pub fn uptime(&self) -> Duration {
        self.started.elapsed()
    }

    /// Waits until the agent exits. Cancel-safe.
    pub async fn wait(&mut self) -> Exit {
        let status = self.child.wait().await;
        self.exit(status).await
    }

    async fn exit(&mut self, status: std::io::Result<ExitStatus>) -> Exit {
        // What the agent wrote just before exiting may still be in the pipe.
        // Each reader is awaited once; one not done by then keeps filling `tail` unobserved.
        for reader in std::mem::take(&mut self.readers) {
            let _ = tokio::time::timeout(STDERR_DRAIN, reader).await;
        }
        let (code, signal) = match status {
            Ok(status) => (status.code(), signal_of(&status)),
            Err(e) => {
                tracing::warn!("waiting for the agent failed: {e}");
                (None, None)
            }
        };
        let exit = Exit {
            code,
            signal,
            uptime: self.started.elapsed(),
            stderr: self.stderr_tail(),
        };
        tracing::info!(pid = self.pid, "agent {}", exit.describe());
        exit
    }

    /// The last stderr lines so far.
    pub fn stderr_tail(&self) -> Vec<String> {
        match self.tail.lock() {
            Ok(tail) => tail.iter().cloned().collect(),
            Err(poisoned) => poisoned.into_inner().iter().cloned().collect(),
        }
    }

    /// Stops the agent: SIGTERM, then SIGKILL if it is still running after `grace`.
    pub async fn stop(mut self, grace: Duration) -> Exit {
        if let Ok(Some(status)) = self.child.try_wait() {
            return self.exit(Ok(status)).await;
        }
        if terminate(self.pid) {
            if let Ok(status) = tokio::time::timeout(grace, self.child.wait()).await {
                return self.exit(status).await;
            }
            tracing::warn!(
                pid = self.pid,
                "agent still running {grace:?} after SIGTERM; killing it"
            );
        }
        let _ = self.child.start_kill();
        let status = self.child.wait().await;
        self.exit(status).await
    }
}

impl Drop for AgentProcess {
    fn drop(&mut self) {
        for reader in &self.readers {
            reader.abort();
        }
    }
}

/// Stops an agent that an earlier supervisor left running (it was killed with `kill -9`):
/// if process `pid` still runs `executable` (checked through `/proc/<pid>/exe`, so Linux
/// only: elsewhere nothing is done, as the pid may have been reused), SIGTERM, then SIGKILL
/// after `grace`. Returns whether there was such a process.
pub async fn stop_leftover(pid: u32, executable: &std::path::Path, grace: Duration) -> bool {
    #[cfg(target_os = "linux")]
    {
        let Ok(running) = std::fs::read_link(format!("/proc/{pid}/exe")) else {
            return false;
        };
        let Ok(expected) = std::fs::canonicalize(executable) else {
            return false;
        };
        let Some(raw) = i32::try_from(pid)
            .ok()
            .and_then(rustix::process::Pid::from_raw)
        else {
            return false;
        };
        if running != expected {
            return false;
        }
        tracing::warn!(
            pid,
            "an agent of an earlier supervisor is still running; stopping it"
        );
        let gone = || rustix::process::test_kill_process(raw).is_err() || !is_running(pid);
        let _ = rustix::process::kill_process(raw, rustix::process::Signal::TERM);
        let deadline = Instant::now() + grace;
        while !gone() && Instant::now() < deadline {
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        if !gone() {
            let _ = rustix::process::kill_process(raw, rustix::process::Signal::KILL);
            let deadline = Instant::now() + Duration::from_secs(2);
            while !gone() && Instant::now() < deadline {
                tokio::time::sleep(Duration::from_millis(20)).await;
            }
        }
        true
    }
    #[cfg(not(target_os = "linux"))]
    {
        let _ = (pid, executable, grace);
        false
    }
}

/// Whether `pid` is a live process (not a zombie waiting for its parent).
#[cfg(target_os = "linux")]
fn is_running(pid: u32) -> bool {
    match std::fs::read_to_string(format!("/proc/{pid}/stat")) {
        // The state follows the parenthesised command name.
        Ok(stat) => stat
            .rsplit_once(')')
            .and_then(|(_, rest)| rest.split_whitespace().next())
            .is_some_and(|state| state != "Z" && state != "X"),
        Err(_) => false,
    }
}

/// Sends SIGTERM; false if it could not be sent (then the caller kills).
#[cfg(unix)]
fn terminate(pid: Option<u32>) -> bool {
    let Some(pid) = pid
        .and_then(|p| i32::try_from(p).ok())
        .and_then(rustix::process::Pid::from_raw)
    else {
        return false;
    };
    rustix::process::kill_process(pid, rustix::process::Signal::TERM).is_ok()
}

#[cfg(not(unix))]
fn terminate(_pid: Option<u32>) -> bool {
    false
}

#[cfg(unix)]
fn signal_of(status: &ExitStatus) -> Option<i32> {
    std::os::unix::process::ExitStatusExt::signal(status)
}

#[cfg(not(unix))]
fn signal_of(_status: &ExitStatus) -> Option<i32> {
    None
}

type Tail = (Arc<Mutex<VecDeque<String>>>, usize);

/// Reads lines (bounded in length) until EOF, keeping the last ones in `tail` and logging
/// them under `log` if set.
async fn read_lines(mut pipe: impl AsyncRead + Unpin, tail: Option<Tail>, log: Option<&str>) {
    let mut buf = [0u8; 8192];
    let mut line = Vec::new();
    let emit = |line: &mut Vec<u8>| {
        let text = String::from_utf8_lossy(line)
            .trim_end_matches('\r')
            .to_owned();
        line.clear();
        if let Some(stream) = log {
            tracing::info!(target: "opamp_supervisor::agent", stream, "{text}");
        }
        if let Some((tail, cap)) = &tail {
            if *cap == 0 {
                return;
            }
            let mut tail = match tail.lock() {
                Ok(t) => t,
                Err(poisoned) => poisoned.into_inner(),
            };
            if tail.len() == *cap {
                tail.pop_front();
            }
            tail.push_back(text);
        }
    };
    loop {
        let n = match pipe.read(&mut buf).await {
            Ok(0) | Err(_) => break,
            Ok(n) => n,
        };
        for &b in &buf[..n] {
            if b == b'\n' {
                emit(&mut line);
            } else if line.len() < MAX_LINE {
                line.push(b);
            }
        }
    }
    if !line.is_empty() {
        emit(&mut line);
    }
}
