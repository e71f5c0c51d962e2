//! The agent the supervisor's tests run: it reads its `--config FILE` arguments and
//!
//! - exits with code 3 at once, after writing why to stderr, when a file contains `CRASH`;
//! - exits with code 4 after N milliseconds when a file contains `EXIT_AFTER_MS=N`;
//! - otherwise runs until SIGTERM (then exits 0), or ignores SIGTERM when a file contains
//!   `IGNORE_SIGTERM` (so only SIGKILL ends it);
//! - with `HEALTH_PORT=N` in a file, serves a health endpoint on 127.0.0.1:N: 200 `ok`, or
//!   503 `pipeline broken` when a file contains `UNHEALTHY`.
//!
//! Each start appends a line to the file named by `TEST_AGENT_LOG`:
//! `start pid=<pid> at_ms=<unix ms> configs=<file>,<file>` and each exit on SIGTERM
//! `stop pid=<pid>`; the tests read it to see starts, configs and graceful stops.
#![allow(clippy::unwrap_used)]

#[cfg(unix)]
use std::io::Write;
#[cfg(unix)]
use std::time::{Duration, SystemTime, UNIX_EPOCH};

#[cfg(unix)]
fn log(line: &str) {
    if let Ok(path) = std::env::var("TEST_AGENT_LOG") {
        let mut f = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(path)
            .unwrap();
        writeln!(f, "{line}").unwrap();
    }
}

#[cfg(not(unix))]
fn main() {
    eprintln!("test-agent: Unix only");
    std::process::exit(2);
}

#[cfg(unix)]
#[tokio::main(flavor = "current_thread")]
async fn main() {
    let mut files = Vec::new();
    let mut args = std::env::args().skip(1);
    while let Some(arg) = args.next() {
        if arg == "--config" {
            files.push(args.next().expect("--config needs a file"));
        }
    }
    let mut text = String::new();
    for file in &files {
        match std::fs::read_to_string(file) {
            Ok(t) => text.push_str(&t),
            Err(e) => {
                eprintln!("test-agent: cannot read {file}: {e}");
                std::process::exit(2);
            }
        }
    }
    let pid = std::process::id();
    let now_ms = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .unwrap()
        .as_millis();
    log(&format!(
        "start pid={pid} at_ms={now_ms} configs={}",
        files.join(",")
    ));
    // Registered before anything else can happen: from here SIGTERM is ours to handle.
    let mut term =
        tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate()).unwrap();
    eprintln!("test-agent: started with {} config file(s)", files.len());
    if text.contains("CRASH") {
        eprintln!("test-agent: loading the pipeline");
        eprintln!("test-agent: error: the config contains CRASH, giving up");
        std::process::exit(3);
    }
    let exit_after = text
        .split_whitespace()
        .find_map(|w| w.strip_prefix("EXIT_AFTER_MS="))
        .map(|ms| Duration::from_millis(ms.parse().unwrap()));
    let ignore_term = text.contains("IGNORE_SIGTERM");
    if let Some(port) = text
        .split_whitespace()
        .find_map(|w| w.strip_prefix("HEALTH_PORT="))
    {
        let port: u16 = port.parse().unwrap();
        let healthy = !text.contains("UNHEALTHY");
        // The agent before this one may have just let the port go.
        let mut listener = None;
        for _ in 0..100 {
            match tokio::net::TcpListener::bind(("127.0.0.1", port)).await {
                Ok(l) => {
                    listener = Some(l);
                    break;
                }
                Err(_) => tokio::time::sleep(Duration::from_millis(20)).await,
            }
        }
        let listener = listener.expect("health port");
        tokio::spawn(async move {
            use tokio::io::{AsyncReadExt, AsyncWriteExt};
            while let Ok((mut conn, _)) = listener.accept().await {
                tokio::spawn(async move {
                    let mut buf = [0u8; 1024];
                    let _ = conn.read(&mut buf).await;
                    let (status, body) = if healthy {
                        ("200 OK", "ok")
                    } else {
                        ("503 Service Unavailable", "pipeline broken")
                    };
                    let answer = format!(
                        "HTTP/1.1 {status}\r\nContent-Length: {}\r\nConnection: close\r\n\r\n{body}",
                        body.len()
                    );
                    let _ = conn.write_all(answer.as_bytes()).await;
                });
            }
        });
    }
    let deadline = async {
        match exit_after {
            Some(d) => tokio::time::sleep(d).await,
            None => std::future::pending().await,
        }
    };
    tokio::pin!(deadline);
    loop {
        tokio::select! {
            _ = term.recv() => {
                if ignore_term {
                    eprintln!("test-agent: ignoring SIGTERM");
                    continue;
                }
                log(&format!("stop pid={pid}"));
                std::process::exit(0);
            }
            () = &mut deadline => {
                eprintln!("test-agent: exiting as told (EXIT_AFTER_MS)");
                std::process::exit(4);
            }
        }
    }
}
