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
use futures_util::{SinkExt, StreamExt};
use opamp_client::{Callbacks, MessageData, OpampClient};
use opamp_proto::{
    AgentCapabilitySet, AgentConfigMap, AgentConfigObject, AgentRemoteConfig, AgentToServer,
    Message as _, RemoteConfigStatus, ServerToAgent, framing,
};
use tokio::sync::{mpsc, watch};
use tokio_tungstenite::tungstenite::Message;

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

/// A client against a WebSocket server that sends `msg` (encoded up front, so the server's
/// copy is in the baseline) once told to go.
async fn ws_cost(msg: ServerToAgent) -> (usize, usize, usize) {
    let frame = Bytes::from(framing::encode(&msg));
    drop(msg);
    let size = frame.len();
    let (ready_tx, mut ready) = mpsc::unbounded_channel::<()>();
    let (go_tx, go) = watch::channel(false);
    let addr = tcp_server(move |_, stream| {
        let frame = frame.clone();
        let ready_tx = ready_tx.clone();
        let mut go = go.clone();
        async move {
            let mut ws = tokio_tungstenite::accept_async(stream).await.unwrap();
            let Some(Ok(Message::Binary(data))) = ws.next().await else {
                return;
            };
            let first: AgentToServer = framing::decode(&data, MIB).unwrap();
            ws.send(Message::Binary(framing::encode(&ack(&first))))
                .await
                .unwrap();
            let _ = ready_tx.send(());
            let _ = go.wait_for(|g| *g).await;
            ws.send(Message::Binary(frame)).await.unwrap();
            // Answer whatever comes, until the client goes.
            while let Some(Ok(m)) = ws.next().await {
                if let Message::Binary(data) = m {
                    let m: AgentToServer = framing::decode(&data, MIB).unwrap();
                    let _ = ws.send(Message::Binary(framing::encode(&ack(&m)))).await;
                }
            }
        }
    })
    .await;
    run(format!("ws://{addr}/v1/opamp"), size, &mut ready, go_tx).await
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
            .with_request_timeout(Duration::from_secs(60)),
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
    print("http, one 60 MiB file", http_cost(one_big_file(60 * MIB)).await);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[ignore = "a measurement: prints figures; run alone"]
async fn ws_many_files() {
    print("ws, 1,000,000 files", ws_cost(many_files(1_000_000)).await);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[ignore = "a measurement: prints figures; run alone"]
async fn http_many_files() {
    print("http, 1,000,000 files", http_cost(many_files(1_000_000)).await);
}
