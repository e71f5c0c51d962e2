//! A real PostgreSQL server for tests, on loopback, in a temporary data directory.
//!
//! `OPAMP_TEST_POSTGRES_URL` (a `postgres://` URL of a server the tests may create databases
//! on) is used when set; otherwise the first test that asks starts its own server with the
//! machine's `initdb` and `postgres` (on `PATH` or under `/usr/lib/postgresql/*/bin`; as root,
//! as the `postgres` user). That server lives as long as the test process: it runs under a
//! shell that stops it when the test process's end closes its stdin. Each caller gets a
//! database of its own. No PostgreSQL on the machine is a test failure that says so.

#![allow(dead_code)]

use std::io::Write;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::{Mutex, OnceLock};
use std::time::{Duration, Instant};

struct Running {
    /// `postgres://USER@127.0.0.1:PORT`, without a database.
    base: String,
    _shell: Option<Child>,
}

static SERVER: OnceLock<Result<Mutex<Running>, String>> = OnceLock::new();

fn find(tool: &str) -> Option<PathBuf> {
    if let Ok(path) = std::env::var("PATH") {
        for dir in std::env::split_paths(&path) {
            let p = dir.join(tool);
            if p.is_file() {
                return Some(p);
            }
        }
    }
    let mut found: Vec<PathBuf> = std::fs::read_dir("/usr/lib/postgresql")
        .ok()?
        .filter_map(|e| e.ok())
        .map(|e| e.path().join("bin").join(tool))
        .filter(|p| p.is_file())
        .collect();
    found.sort();
    found.pop()
}

fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .and_then(|l| l.local_addr())
        .map(|a| a.port())
        .unwrap_or(55432)
}

fn is_root() -> bool {
    Command::new("id")
        .arg("-u")
        .output()
        .map(|o| String::from_utf8_lossy(&o.stdout).trim() == "0")
        .unwrap_or(false)
}

fn as_pg_user(root: bool, program: &Path) -> Command {
    if root {
        let mut c = Command::new("runuser");
        c.args(["-u", "postgres", "--"]).arg(program);
        c
    } else {
        Command::new(program)
    }
}

fn start() -> Result<Running, String> {
    if let Ok(url) = std::env::var("OPAMP_TEST_POSTGRES_URL") {
        return Ok(Running {
            base: url.trim_end_matches('/').to_owned(),
            _shell: None,
        });
    }
    let initdb = find("initdb").ok_or("PostgreSQL's initdb is not installed (Debian: apt-get install postgresql), and OPAMP_TEST_POSTGRES_URL is not set")?;
    let postgres = find("postgres").ok_or("PostgreSQL's postgres binary is not installed")?;
    let root = is_root();
    let dir = std::env::temp_dir().join(format!(
        "opamp-test-pg-{}-{}",
        std::process::id(),
        Instant::now().elapsed().as_nanos()
    ));
    std::fs::create_dir_all(&dir).map_err(|e| format!("{}: {e}", dir.display()))?;
    if root {
        let ok = Command::new("chown")
            .args(["postgres:postgres"])
            .arg(&dir)
            .status()
            .map_err(|e| e.to_string())?
            .success();
        if !ok {
            return Err("chown of the PostgreSQL data directory to postgres failed".into());
        }
    }
    let data = dir.join("data");
    let out = as_pg_user(root, &initdb)
        .arg("-D")
        .arg(&data)
        .args(["-U", "opamp", "--auth=trust", "-E", "UTF8", "--no-sync"])
        .output()
        .map_err(|e| format!("initdb: {e}"))?;
    if !out.status.success() {
        return Err(format!(
            "initdb failed: {}{}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        ));
    }
    let port = free_port();
    // `read` returns when the test process ends (its end of the pipe closes); then the shell
    // stops the server (fast shutdown) and removes the data directory.
    let script = format!(
        "\"$0\" -D \"$1\" -p {port} -k \"$2\" -h 127.0.0.1 -c fsync=off -c max_connections=200 \
         >\"$2/log\" 2>&1 & pid=$!; read _; kill -INT $pid; wait $pid; rm -rf \"$2\""
    );
    let mut sh = as_pg_user(root, Path::new("/bin/sh"));
    let shell = sh
        .arg("-c")
        .arg(script)
        .arg(&postgres)
        .arg(&data)
        .arg(&dir)
        .stdin(Stdio::piped())
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .map_err(|e| format!("starting postgres: {e}"))?;
    let base = format!("postgres://opamp@127.0.0.1:{port}");
    let deadline = Instant::now() + Duration::from_secs(30);
    while std::net::TcpStream::connect(("127.0.0.1", port)).is_err() {
        if Instant::now() > deadline {
            let log = std::fs::read_to_string(dir.join("log")).unwrap_or_default();
            return Err(format!("postgres did not start on port {port}: {log}"));
        }
        std::thread::sleep(Duration::from_millis(50));
    }
    // Accepting TCP is not yet accepting logins: wait for psql-free readiness by a real query
    // in `database()`.
    let mut shell = shell;
    if let Some(stdin) = shell.stdin.as_mut() {
        let _ = stdin.flush();
    }
    Ok(Running {
        base,
        _shell: Some(shell),
    })
}

/// A new, empty database on the test server: its `postgres://` URL.
pub(crate) fn database() -> String {
    let running = SERVER.get_or_init(|| start().map(Mutex::new));
    let running = match running {
        Ok(r) => r.lock().unwrap_or_else(|e| e.into_inner()),
        Err(e) => panic!("no PostgreSQL for the test: {e}"),
    };
    static N: std::sync::atomic::AtomicU64 = std::sync::atomic::AtomicU64::new(0);
    let name = format!(
        "opamp_t{}_{}_{}",
        std::process::id(),
        N.fetch_add(1, std::sync::atomic::Ordering::Relaxed),
        std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map_or(0, |d| d.subsec_nanos())
    );
    let base = running.base.clone();
    drop(running);
    let admin = format!("{base}/postgres");
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .expect("a runtime");
    rt.block_on(async {
        let deadline = Instant::now() + Duration::from_secs(30);
        loop {
            match tokio_postgres::connect(&admin, tokio_postgres::NoTls).await {
                Ok((client, conn)) => {
                    let task = tokio::spawn(conn);
                    client
                        .batch_execute(&format!("CREATE DATABASE {name}"))
                        .await
                        .expect("CREATE DATABASE");
                    drop(client);
                    let _ = task.await;
                    return;
                }
                Err(e) if Instant::now() > deadline => panic!("PostgreSQL at {admin}: {e}"),
                Err(_) => tokio::time::sleep(Duration::from_millis(100)).await,
            }
        }
    });
    format!("{base}/{name}")
}
