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
    /// Append stdout and stderr lines to this file, rotated (see [`LogFile`]).
    pub log_file: Option<Arc<LogFile>>,
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
            .stdout(if spec.passthrough_logs || spec.log_file.is_some() {
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
                spec.log_file.clone(),
            )));
        }
        if let Some(stdout) = child.stdout.take() {
            readers.push(tokio::spawn(read_lines(
                stdout,
                None,
                spec.passthrough_logs.then_some("stdout"),
                spec.log_file.clone(),
            )));
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

    /// Stops the agent: SIGTERM, then SIGKILL if it is still running after `grace`. The
    /// signals go to the agent's process group (on Unix), so processes it started go too.
    pub async fn stop(mut self, grace: Duration) -> Exit {
        if let Ok(Some(status)) = self.child.try_wait() {
            return self.exit(Ok(status)).await;
        }
        if signal_group(self.pid, Sig::Term) {
            if let Ok(status) = tokio::time::timeout(grace, self.child.wait()).await {
                return self.exit(status).await;
            }
            tracing::warn!(
                pid = self.pid,
                "agent still running {grace:?} after SIGTERM; killing it"
            );
        }
        signal_group(self.pid, Sig::Kill);
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
        // Its group, as a supervisor started it; the process alone if it leads none.
        let signal = |sig: Sig, raw_sig| {
            if !signal_group(Some(pid), sig) {
                let _ = rustix::process::kill_process(raw, raw_sig);
            }
        };
        signal(Sig::Term, rustix::process::Signal::TERM);
        let deadline = Instant::now()
            .checked_add(grace.min(Duration::from_secs(86400)))
            .unwrap_or_else(Instant::now);
        while !gone() && Instant::now() < deadline {
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        if !gone() {
            signal(Sig::Kill, rustix::process::Signal::KILL);
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

#[derive(Debug, Clone, Copy)]
enum Sig {
    Term,
    Kill,
}

/// Sends the signal to the process group `pid` leads (the agent was started as a group
/// leader); false if it could not be sent (then the caller kills the process itself).
#[cfg(unix)]
fn signal_group(pid: Option<u32>, sig: Sig) -> bool {
    let Some(pid) = pid
        .and_then(|p| i32::try_from(p).ok())
        .and_then(rustix::process::Pid::from_raw)
    else {
        return false;
    };
    let sig = match sig {
        Sig::Term => rustix::process::Signal::TERM,
        Sig::Kill => rustix::process::Signal::KILL,
    };
    rustix::process::kill_process_group(pid, sig).is_ok()
}

#[cfg(not(unix))]
fn signal_group(_pid: Option<u32>, _sig: Sig) -> bool {
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

/// Reads lines (bounded in length) until EOF, keeping the last ones in `tail`, logging them
/// under `log` and appending them to `file` if set.
async fn read_lines(
    mut pipe: impl AsyncRead + Unpin,
    tail: Option<Tail>,
    log: Option<&str>,
    file: Option<Arc<LogFile>>,
) {
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
        if let Some(file) = &file {
            file.append(&text);
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

/// The agent's output kept in a file, rotated by size: once `path` would grow past
/// `max_bytes` it becomes `path.1` (and `path.1` becomes `path.2`, ... up to `keep` old
/// files, the oldest dropped). Lines of stdout and stderr go in as they come. A write that
/// fails is logged once and given up on until the next rotation: the agent runs on.
#[derive(Debug)]
pub struct LogFile {
    path: std::path::PathBuf,
    max_bytes: u64,
    keep: usize,
    state: Mutex<Option<(std::fs::File, u64)>>,
}

impl LogFile {
    /// A log at `path` of at most `max_bytes` per file, keeping `keep` rotated files.
    pub fn new(path: impl Into<std::path::PathBuf>, max_bytes: u64, keep: usize) -> Self {
        Self {
            path: path.into(),
            max_bytes: max_bytes.max(1),
            keep,
            state: Mutex::new(None),
        }
    }

    /// The file's path.
    pub fn path(&self) -> &std::path::Path {
        &self.path
    }

    fn open(&self) -> std::io::Result<(std::fs::File, u64)> {
        let file = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(&self.path)?;
        let size = file.metadata()?.len();
        Ok((file, size))
    }

    fn rotated(&self, n: usize) -> std::path::PathBuf {
        let mut name = self.path.clone().into_os_string();
        name.push(format!(".{n}"));
        name.into()
    }

    fn rotate(&self) {
        if self.keep == 0 {
            let _ = std::fs::remove_file(&self.path);
            return;
        }
        let _ = std::fs::remove_file(self.rotated(self.keep));
        for n in (1..self.keep).rev() {
            let _ = std::fs::rename(self.rotated(n), self.rotated(n + 1));
        }
        let _ = std::fs::rename(&self.path, self.rotated(1));
    }

    /// Appends one line.
    pub fn append(&self, line: &str) {
        use std::io::Write as _;
        let mut state = match self.state.lock() {
            Ok(s) => s,
            Err(poisoned) => poisoned.into_inner(),
        };
        let len = line.len() as u64 + 1;
        if let Some((_, size)) = &*state {
            if *size > 0 && size + len > self.max_bytes {
                *state = None;
                self.rotate();
            }
        }
        if state.is_none() {
            match self.open() {
                Ok((file, size)) if size > 0 && size + len > self.max_bytes => {
                    drop(file);
                    self.rotate();
                    *state = self.open().ok();
                }
                Ok(opened) => *state = Some(opened),
                Err(e) => {
                    tracing::warn!(path = %self.path.display(), "cannot open the agent log: {e}");
                    return;
                }
            }
        }
        if let Some((file, size)) = &mut *state {
            let mut buf = Vec::with_capacity(line.len() + 1);
            buf.extend_from_slice(line.as_bytes());
            buf.push(b'\n');
            match file.write_all(&buf) {
                Ok(()) => *size += len,
                Err(e) => {
                    tracing::warn!(path = %self.path.display(), "cannot write the agent log: {e}");
                    *state = None;
                }
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn log_file_rotates_by_size_and_keeps_the_newest() {
        let dir = tempfile::tempdir().unwrap();
        let log = LogFile::new(dir.path().join("agent.log"), 20, 2);
        for i in 0..10 {
            log.append(&format!("line {i:02} ......")); // 16 bytes with the newline
        }
        let read = |name: &str| std::fs::read_to_string(dir.path().join(name)).unwrap_or_default();
        assert_eq!(read("agent.log"), "line 09 ......\n");
        assert_eq!(read("agent.log.1"), "line 08 ......\n");
        assert_eq!(read("agent.log.2"), "line 07 ......\n");
        assert!(!dir.path().join("agent.log.3").exists());
        // A new LogFile on the same path (a restarted supervisor) goes on from the file's size.
        let again = LogFile::new(dir.path().join("agent.log"), 40, 2);
        again.append("next");
        assert_eq!(read("agent.log"), "line 09 ......\nnext\n");
    }
}
