//! Item 9, client memory: what a large message costs the client while it is handled and
//! after, as RSS figures from `/proc/self/status` (`VmRSS`, and `VmHWM` reset through
//! `clear_refs`) around one big `ServerToAgent` delivered over a loopback WebSocket and over
//! plain HTTP. Figures, not assertions; run one test per process, e.g.
//! `cargo test -p opamp-client --test memory -- --ignored --nocapture --exact ws_one_big_file`.
//! (The regression test that the core keeps nothing of a handled message is
//! `memory_core_keeps_no_reference_to_a_handled_message`, in the core's tests.)
#![allow(clippy::unwrap_used)]

mod common;

use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::Duration;

use async_trait::async_trait;
use bytes::Bytes;
use common::*;
use opamp_client::{Callbacks, MessageData, OpampClient};
use opamp_proto::{
    AgentCapabilitySet, AgentConfigMap, AgentConfigObject, AgentRemoteConfig, AgentToServer,
    Message as _, RemoteConfigStatus, ServerToAgent, framing,
};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::sync::{mpsc, watch};

const MIB: usize = 1 << 20;

/// `VmRSS` and `VmHWM` (peak RSS) of this process, in bytes.
fn rss() -> (usize, usize) {
    let status = std::fs::read_to_string("/proc/self/status").unwrap();
    let field = |name: &str| {
        status
            .lines()
            .find_map(|l| l.strip_prefix(name))
            .and_then(|v| v.trim().trim_end_matches("kB").trim().parse::<usize>().ok())
            .unwrap_or(0)
            * 1024
    };
    (field("VmRSS:"), field("VmHWM:"))
}

/// Resets `VmHWM` to the current RSS (Linux `clear_refs`, value 5).
fn reset_peak() {
    let _ = std::fs::write("/proc/self/clear_refs", "5");
}

/// An agent that reports the config's hash (RC-5), as real agents do, and drops the rest.
struct Agent {
    client: std::sync::OnceLock<OpampClient>,
    done: mpsc::UnboundedSender<usize>,
}

#[async_trait]
impl Callbacks for Agent {
    async fn on_message(&self, data: MessageData) {
        if let Some(config) = data.remote_config {
            let size = config.encoded_len();
            let client = self.client.get().unwrap();
            client
                .set_remote_config_status(RemoteConfigStatus {
                    last_remote_config_hash: config.config_hash.clone(),
                    status: 1,
                    ..Default::default()
                })
                .unwrap();
            drop(config);
            let _ = self.done.send(size);
        }
    }
}

fn one_big_file(size: usize) -> ServerToAgent {
    let mut map = AgentConfigMap::default();
    map.config_map.insert(
        String::new(),
        AgentConfigObject {
            body: Bytes::from(vec![b'x'; size]),
            content_type: "text/yaml".into(),
            ..Default::default()
        },
    );
    offer(map)
}

fn many_files(n: usize) -> ServerToAgent {
    let mut map = AgentConfigMap::default();
    for i in 0..n {
        map.config_map.insert(
            format!("f{i}"),
            AgentConfigObject {
                body: Bytes::from_static(b"k: v"),
                content_type: String::new(),
                ..Default::default()
            },
        );
    }
    offer(map)
}

fn offer(map: AgentConfigMap) -> ServerToAgent {
    ServerToAgent {
        capabilities: 0x7f,
        remote_config: Some(AgentRemoteConfig {
            config: Some(map),
            config_hash: Bytes::from_static(b"0123456789abcdef0123456789abcdef"),
        }),
        ..Default::default()
    }
}

/// A client against a raw WebSocket server (frames written by hand, so no server-side copy
/// of the big message lands in this process's figures) that sends `msg`, encoded up front,
/// once told to go.
async fn ws_cost(msg: ServerToAgent) -> (usize, usize, usize) {
    let frame = framing::encode(&msg);
    drop(msg);
    let size = frame.len();
    let (ready_tx, mut ready) = mpsc::unbounded_channel::<()>();
    let (go_tx, go) = watch::channel(false);
    let addr = tcp_server(move |_, mut s| {
        let frame = frame.clone();
        let ready_tx = ready_tx.clone();
        let mut go = go.clone();
        async move {
            raw_handshake(&mut s).await;
            let Some(first) = read_client_frame(&mut s).await else {
                return;
            };
            let first: AgentToServer = framing::decode(&first, MIB).unwrap();
            write_frame(&mut s, &framing::encode(&ack(&first))).await;
            let _ = ready_tx.send(());
            let (mut r, mut w) = s.into_split();
            let writer = tokio::spawn(async move {
                let _ = go.wait_for(|g| *g).await;
                write_frame(&mut w, &frame).await;
                w
            });
            // Answer whatever comes, until the client goes.
            let mut w = writer.await.unwrap();
            while let Some(m) = read_client_frame(&mut r).await {
                if let Ok(m) = framing::decode::<AgentToServer>(&m, MIB) {
                    write_frame(&mut w, &framing::encode(&ack(&m))).await;
                }
            }
        }
    })
    .await;
    run(format!("ws://{addr}/v1/opamp"), size, &mut ready, go_tx).await
}

async fn raw_handshake(s: &mut tokio::net::TcpStream) {
    let mut buf = Vec::new();
    let mut byte = [0u8; 1];
    while !buf.ends_with(b"\r\n\r\n") {
        s.read_exact(&mut byte).await.unwrap();
        buf.push(byte[0]);
    }
    let text = String::from_utf8(buf).unwrap();
    let key = text
        .lines()
        .find_map(|l| {
            let (k, v) = l.split_once(':')?;
            k.eq_ignore_ascii_case("sec-websocket-key")
                .then(|| v.trim().to_owned())
        })
        .unwrap();
    let accept = tokio_tungstenite::tungstenite::handshake::derive_accept_key(key.as_bytes());
    let resp = format!(
        "HTTP/1.1 101 Switching Protocols\r\nUpgrade: websocket\r\nConnection: Upgrade\r\nSec-WebSocket-Accept: {accept}\r\n\r\n"
    );
    s.write_all(resp.as_bytes()).await.unwrap();
}

/// One masked client frame's payload; `None` at the end or on a Close frame.
async fn read_client_frame(s: &mut (impl AsyncReadExt + Unpin)) -> Option<Vec<u8>> {
    let mut h = [0u8; 2];
    s.read_exact(&mut h).await.ok()?;
    let mut len = u64::from(h[1] & 0x7f);
    if len == 126 {
        let mut b = [0u8; 2];
        s.read_exact(&mut b).await.ok()?;
        len = u64::from(u16::from_be_bytes(b));
    } else if len == 127 {
        let mut b = [0u8; 8];
        s.read_exact(&mut b).await.ok()?;
        len = u64::from_be_bytes(b);
    }
    let mut mask = [0u8; 4];
    s.read_exact(&mut mask).await.ok()?;
    let mut payload = vec![0u8; usize::try_from(len).ok()?.min(MIB)];
    s.read_exact(&mut payload).await.ok()?;
    for (i, b) in payload.iter_mut().enumerate() {
        *b ^= mask[i % 4];
    }
    (h[0] & 0x0f != 8).then_some(payload)
}

/// One unmasked binary server frame.
async fn write_frame(s: &mut (impl AsyncWriteExt + Unpin), payload: &[u8]) {
    let mut head = vec![0x82u8];
    match payload.len() {
        n if n < 126 => head.push(n as u8),
        n if n <= usize::from(u16::MAX) => {
            head.push(126);
            head.extend_from_slice(&(n as u16).to_be_bytes());
        }
        n => {
            head.push(127);
            head.extend_from_slice(&(n as u64).to_be_bytes());
        }
    }
    let _ = s.write_all(&head).await;
    let _ = s.write_all(payload).await;
}

/// Plain HTTP: the big answer goes with the first poll after `go`.
async fn http_cost(msg: ServerToAgent) -> (usize, usize, usize) {
    let body = Bytes::from(msg.encode_to_vec());
    drop(msg);
    let size = body.len();
    let (ready_tx, mut ready) = mpsc::unbounded_channel::<()>();
    let (go_tx, go) = watch::channel(false);
    let sent = Arc::new(AtomicUsize::new(0));
    let addr = http_server(move |_, parts, req| {
        let body = body.clone();
        let ready_tx = ready_tx.clone();
        let go = go.clone();
        let sent = sent.clone();
        async move {
            let msg = decode_request(&parts, &req);
            if *go.borrow() && sent.fetch_add(1, Ordering::SeqCst) == 0 {
                return http::Response::builder()
                    .header("content-type", "application/x-protobuf")
                    .body(http_body_util::Full::new(body))
                    .unwrap();
            }
            let _ = ready_tx.send(());
            ok(&ack(&msg))
        }
    })
    .await;
    run(format!("http://{addr}/v1/opamp"), size, &mut ready, go_tx).await
}

/// Returns (message size, peak RSS above the baseline while the client handled it, RSS above
/// the baseline after).
async fn run(
    url: String,
    size: usize,
    ready: &mut mpsc::UnboundedReceiver<()>,
    go: watch::Sender<bool>,
) -> (usize, usize, usize) {
    let (done_tx, mut done) = mpsc::unbounded_channel();
    let agent = Arc::new(Agent {
        client: std::sync::OnceLock::new(),
        done: done_tx,
    });
    let client = OpampClient::start(
        settings(url)
            .with_capabilities(
                AgentCapabilitySet::ACCEPTS_REMOTE_CONFIG
                    | AgentCapabilitySet::REPORTS_REMOTE_CONFIG,
            )
            .with_heartbeat_interval(Duration::from_millis(50))
            .with_request_timeout(Duration::from_secs(60))
            // What decoding costs is measured: a million files is past the default element
            // limit, which refuses such a message before decoding it.
            .with_max_message_elements(usize::MAX),
        agent.clone(),
    )
    .unwrap();
    let _ = agent.client.set(client.clone());
    recv(ready).await;
    // Let the first exchange settle.
    tokio::time::sleep(Duration::from_millis(200)).await;
    let (base, _) = rss();
    reset_peak();
    go.send_replace(true);
    tokio::time::timeout(Duration::from_secs(120), done.recv())
        .await
        .unwrap()
        .unwrap();
    // A few more exchanges (the status report, polls), then measure what stayed.
    tokio::time::sleep(Duration::from_millis(500)).await;
    let (now, peak) = rss();
    client.stop().await.ok();
    tokio::time::sleep(Duration::from_millis(200)).await;
    let (stopped, _) = rss();
    println!(
        "  RSS after stop (connection closed, core kept) +{:.1} MiB",
        stopped.saturating_sub(base) as f64 / MIB as f64
    );
    (size, peak.saturating_sub(base), now.saturating_sub(base))
}

fn print(what: &str, (size, peak, after): (usize, usize, usize)) {
    println!(
        "{what}: message {:.1} MiB, peak RSS while handled +{:.1} MiB ({:.2}x), RSS after +{:.1} MiB",
        size as f64 / MIB as f64,
        peak as f64 / MIB as f64,
        peak as f64 / size as f64,
        after as f64 / MIB as f64,
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[ignore = "a measurement: prints figures; run alone"]
async fn ws_one_big_file() {
    print("ws, one 60 MiB file", ws_cost(one_big_file(60 * MIB)).await);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[ignore = "a measurement: prints figures; run alone"]
async fn http_one_big_file() {
    print(
        "http, one 60 MiB file",
        http_cost(one_big_file(60 * MIB)).await,
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[ignore = "a measurement: prints figures; run alone"]
async fn ws_many_files() {
    print("ws, 1,000,000 files", ws_cost(many_files(1_000_000)).await);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[ignore = "a measurement: prints figures; run alone"]
async fn http_many_files() {
    print(
        "http, 1,000,000 files",
        http_cost(many_files(1_000_000)).await,
    );
}

/// The same message twice in one process: when the second costs (almost) nothing more, the
/// first one's memory was freed and is only kept by the allocator for reuse, not leaked.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[ignore = "a measurement: prints figures; run alone"]
async fn ws_many_files_twice() {
    print(
        "ws, 1,000,000 files, first",
        ws_cost(many_files(1_000_000)).await,
    );
    print(
        "ws, 1,000,000 files, second",
        ws_cost(many_files(1_000_000)).await,
    );
}
