//! Helpers of the reference server's process tests: the server and agent binaries, child
//! processes killed at the end, scratch directories, a plain HTTP/1.1 API client, polling.

// Test helpers outside `#[test]` functions: a failed unwrap is a failed test.
#![allow(clippy::unwrap_used, dead_code, unreachable_pub)]

use std::io::{BufRead, BufReader, Read, Write};
use std::net::TcpStream;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::mpsc;
use std::time::{Duration, Instant};

use serde_json::Value;

/// The reference server, built by cargo for this test.
pub fn server_bin() -> PathBuf {
    PathBuf::from(env!("CARGO_BIN_EXE_opamp-reference-server"))
}

/// The reference agent (`opamp-reference-agent`, another package of the workspace), built
/// first: a no-op when it is up to date.
pub fn agent_bin() -> PathBuf {
    static BUILT: std::sync::Once = std::sync::Once::new();
    let exe = std::env::current_exe().expect("current_exe");
    // target/<profile>/deps/<test> -> target/<profile>
    let profile_dir = exe.parent().and_then(Path::parent).expect("target dir");
    BUILT.call_once(|| {
        let cargo = option_env!("CARGO").unwrap_or("cargo");
        let manifest = Path::new(env!("CARGO_MANIFEST_DIR")).join("../../Cargo.toml");
        let mut build = Command::new(cargo);
        build
            .arg("build")
            .arg("--manifest-path")
            .arg(&manifest)
            .args(["-p", "opamp-reference-agent"]);
        if profile_dir.ends_with("release") {
            build.arg("--release");
        }
        // What cargo set for this test's own crate would look like a changed environment to
        // build scripts (and make the two builds rebuild each other's dependencies).
        for (key, _) in std::env::vars_os() {
            let key = key.to_string_lossy().into_owned();
            let crate_var = [
                "CARGO_PKG_",
                "CARGO_MANIFEST_",
                "CARGO_CRATE_",
                "CARGO_BIN_",
                "CARGO_PRIMARY_PACKAGE",
                "CARGO_TARGET_TMPDIR",
                "CARGO_RUSTC_CURRENT_DIR",
            ]
            .iter()
            .any(|p| key.starts_with(p));
            if crate_var {
                build.env_remove(&key);
            }
        }
        let status = build.status().expect("run cargo build for the agent");
        assert!(status.success(), "building opamp-reference-agent failed");
    });
    let path = profile_dir.join(format!(
        "opamp-reference-agent{}",
        std::env::consts::EXE_SUFFIX
    ));
    assert!(
        path.exists(),
        "{} is missing after the build",
        path.display()
    );
    path
}

/// A child process killed when the test ends, passed or not.
pub struct Proc(pub Child);

impl Proc {
    /// `kill -9`: the process gets no chance to clean up.
    pub fn kill9(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

impl Drop for Proc {
    fn drop(&mut self) {
        self.kill9();
    }
}

/// A scratch directory removed at the end.
pub struct Scratch(pub PathBuf);

impl Scratch {
    /// A new empty directory under the system's temporary directory.
    pub fn new(what: &str) -> Self {
        let dir = std::env::temp_dir().join(format!(
            "opamp-{what}-{}-{}",
            std::process::id(),
            std::time::SystemTime::now()
                .duration_since(std::time::UNIX_EPOCH)
                .unwrap()
                .as_nanos()
        ));
        std::fs::create_dir_all(&dir).unwrap();
        Self(dir)
    }

    pub fn path(&self) -> &Path {
        &self.0
    }
}

impl Drop for Scratch {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

pub fn hex(bytes: &[u8]) -> String {
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}

/// One HTTP/1.1 request to the API; returns the status and the JSON answer (`Null` when the
/// body is not JSON).
pub fn api(
    addr: &str,
    method: &str,
    path: &str,
    headers: &[(&str, &str)],
    body: &[u8],
) -> (u16, Value) {
    let (status, body) = api_raw(addr, method, path, headers, body);
    (status, serde_json::from_slice(&body).unwrap_or(Value::Null))
}

/// One HTTP/1.1 request; the status and the raw body.
pub fn api_raw(
    addr: &str,
    method: &str,
    path: &str,
    headers: &[(&str, &str)],
    body: &[u8],
) -> (u16, Vec<u8>) {
    let mut s = TcpStream::connect(addr).expect("connect to the API");
    s.set_read_timeout(Some(Duration::from_secs(30))).unwrap();
    let mut req = format!(
        "{method} {path} HTTP/1.1\r\nHost: {addr}\r\nConnection: close\r\nContent-Length: {}\r\n",
        body.len()
    );
    for (k, v) in headers {
        req.push_str(&format!("{k}: {v}\r\n"));
    }
    req.push_str("\r\n");
    s.write_all(req.as_bytes()).unwrap();
    s.write_all(body).unwrap();
    let mut answer = Vec::new();
    s.read_to_end(&mut answer).unwrap();
    let split = answer
        .windows(4)
        .position(|w| w == b"\r\n\r\n")
        .expect("an HTTP answer");
    let head = String::from_utf8_lossy(&answer[..split]).to_string();
    let status = head[9..12].parse().expect("status");
    let mut body = answer[split + 4..].to_vec();
    if head
        .to_ascii_lowercase()
        .contains("transfer-encoding: chunked")
    {
        body = dechunk(&body);
    }
    (status, body)
}

fn dechunk(mut b: &[u8]) -> Vec<u8> {
    let mut out = Vec::new();
    loop {
        let Some(eol) = b.windows(2).position(|w| w == b"\r\n") else {
            return out;
        };
        let size =
            usize::from_str_radix(String::from_utf8_lossy(&b[..eol]).trim(), 16).unwrap_or(0);
        if size == 0 {
            return out;
        }
        let start = eol + 2;
        out.extend_from_slice(&b[start..start + size]);
        b = &b[start + size + 2..];
    }
}

/// `PUT`/`POST` of a JSON body.
pub fn send_json(addr: &str, method: &str, path: &str, body: &Value) -> (u16, Value) {
    api(
        addr,
        method,
        path,
        &[("Content-Type", "application/json")],
        body.to_string().as_bytes(),
    )
}

/// Polls `probe` until it returns `Some`, or fails with `what`, the last value and the logs.
pub fn wait_for<T>(what: &str, logs: &[&Path], mut probe: impl FnMut() -> (Option<T>, Value)) -> T {
    // Generous: a bound for a stuck test on a loaded machine, not a timing check.
    let deadline = Instant::now() + Duration::from_secs(120);
    loop {
        let (got, last) = probe();
        if let Some(v) = got {
            return v;
        }
        if Instant::now() > deadline {
            let logs: Vec<String> = logs
                .iter()
                .map(|p| {
                    format!(
                        "--- {}\n{}",
                        p.display(),
                        std::fs::read_to_string(p).unwrap_or_default()
                    )
                })
                .collect();
            panic!(
                "timed out waiting for {what}; last: {last}\n{}",
                logs.join("\n")
            );
        }
        std::thread::sleep(Duration::from_millis(100));
    }
}

/// `GET /api/v1/agents/{uid}`, `Null` unless 200.
pub fn agent_json(ui: &str, uid: &str) -> Value {
    let (status, v) = api(ui, "GET", &format!("/api/v1/agents/{uid}"), &[], b"");
    if status == 200 { v } else { Value::Null }
}

/// A running reference server and what it printed at start.
pub struct Server {
    pub proc: Proc,
    /// `ws://ADDR/v1/opamp`
    pub endpoint: String,
    /// `ADDR` of the UI and API
    pub ui: String,
    /// The package signing public key (hex).
    pub package_key: String,
    pub log: PathBuf,
}

/// Starts the reference server with `args` (OpAMP and UI on free ports unless `args` say
/// otherwise), its stderr in `log`; waits for its start lines.
pub fn start_server(args: &[&str], log: &Path, env: &[(&str, &str)]) -> Server {
    let mut cmd = Command::new(server_bin());
    if !args.contains(&"--opamp-addr") {
        cmd.args(["--opamp-addr", "127.0.0.1:0"]);
    }
    if !args.contains(&"--ui-addr") {
        cmd.args(["--ui-addr", "127.0.0.1:0"]);
    }
    if !args.contains(&"--database") {
        let db = log.with_extension("db");
        cmd.arg("--database")
            .arg(format!("sqlite://{}", db.display()));
    }
    cmd.args(args)
        .env("RUST_LOG", "warn")
        .envs(env.iter().copied())
        .stdout(Stdio::piped())
        .stderr(std::fs::File::create(log).unwrap());
    let mut child = cmd.spawn().expect("start the reference server");
    let stdout = child.stdout.take().expect("piped stdout");
    let proc = Proc(child);
    let (tx, rx) = mpsc::channel();
    std::thread::spawn(move || {
        for line in BufReader::new(stdout).lines().map_while(Result::ok) {
            let _ = tx.send(line);
        }
    });
    let (mut endpoint, mut ui, mut key) = (None, None, None);
    while endpoint.is_none() || ui.is_none() || key.is_none() {
        let Ok(line) = rx.recv_timeout(Duration::from_secs(30)) else {
            panic!(
                "the server's start lines did not come; its log:\n{}",
                std::fs::read_to_string(log).unwrap_or_default()
            );
        };
        if let Some(rest) = line.strip_prefix("OpAMP endpoint: ") {
            endpoint = rest.split_whitespace().next().map(str::to_owned);
        } else if let Some(rest) = line.strip_prefix("web UI: http://") {
            ui = Some(rest.trim_end_matches('/').to_owned());
        } else if let Some(rest) = line.strip_prefix("package signing public key: ") {
            key = rest.split_whitespace().next().map(str::to_owned);
        }
    }
    Server {
        proc,
        endpoint: endpoint.unwrap(),
        ui: ui.unwrap(),
        package_key: key.unwrap(),
        log: log.to_owned(),
    }
}

/// Starts a reference agent `name` (its `service.name`) against `endpoint` with `extra`
/// flags; its state in `dir/name`, its log in `dir/name.log`. Returns the process and the
/// agent's own state directory.
pub fn start_agent(dir: &Path, name: &str, endpoint: &str, extra: &[&str]) -> (Proc, PathBuf) {
    let state = dir.join(name);
    let log = dir.join(format!("{name}.log"));
    let child = Command::new(agent_bin())
        .arg("--endpoint")
        .arg(endpoint)
        .arg("--name")
        .arg(name)
        .arg("--state-dir")
        .arg(&state)
        .arg("--heartbeat")
        .arg("1")
        .args(extra)
        .stdout(Stdio::null())
        .stderr(std::fs::File::create(&log).unwrap())
        .spawn()
        .expect("start the reference agent");
    (Proc(child), state.join("agent-0"))
}

/// The instance uid the agent in `agent_dir` wrote.
pub fn uid_of(agent_dir: &Path, log: &Path) -> String {
    wait_for("the agent's instance_uid file", &[log], || {
        let uid = std::fs::read_to_string(agent_dir.join("instance_uid")).ok();
        (uid.map(|u| u.trim().to_owned()), Value::Null)
    })
}
