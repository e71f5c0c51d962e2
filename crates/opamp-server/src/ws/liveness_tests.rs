//! The WebSocket driver's timers (ConnectionLimits) on tokio's paused clock, over an
//! in-memory stream: every deadline is exact and no test sleeps in real time.
#![allow(clippy::unwrap_used)]

use std::sync::Arc;
use std::time::Duration;

use futures_util::{SinkExt, StreamExt};
use opamp_proto::{
    AgentCapabilitySet, AgentToServer, ConnectionSettingsOffers, InstanceUid,
    OpAmpConnectionSettings, ServerToAgent, framing,
};
use tokio::io::{AsyncReadExt, AsyncWriteExt, DuplexStream};
use tokio::task::JoinHandle;
use tokio::time::Instant;
use tokio_tungstenite::WebSocketStream;
use tokio_tungstenite::tungstenite::Message;
use tokio_tungstenite::tungstenite::protocol::Role;

use super::*;
use crate::config::ConnectionLimits;
use crate::{OpampService, ServerConfig};

/// Replies to every message with `reply` (an ack when `None`).
struct Replier(Option<ServerToAgent>);

#[async_trait::async_trait]
impl ConnectionCallbacks for Replier {
    async fn on_message(&self, _: &Connection, _: AgentToServer) -> Option<ServerToAgent> {
        self.0.clone()
    }
}

/// Runs the server side of one connection over a duplex stream; returns the other end.
async fn serve(
    limits: ConnectionLimits,
    reply: Option<ServerToAgent>,
) -> (DuplexStream, JoinHandle<()>) {
    let config = ServerConfig::builder().limits(limits).build().unwrap();
    let service = OpampService::new(config, Arc::new(crate::tests_support::Reject));
    let (a, b) = tokio::io::duplex(1 << 20);
    let task = tokio::spawn(async move {
        let ws = accept_stream(a, config_for(&service.shared), &service.shared).await;
        let (conn, rx) = Connection::websocket(PeerInfo::default(), 4);
        run(
            &service.shared,
            ws,
            conn,
            rx,
            Arc::new(Replier(reply)),
            None,
        )
        .await;
    });
    (b, task)
}

async fn client(io: DuplexStream) -> WebSocketStream<DuplexStream> {
    WebSocketStream::from_raw_socket(io, Role::Client, None).await
}

fn report(caps: AgentCapabilitySet) -> AgentToServer {
    AgentToServer {
        instance_uid: InstanceUid::from_array([7; 16]).to_bytes(),
        capabilities: caps.bits(),
        ..Default::default()
    }
}

async fn exchange(ws: &mut WebSocketStream<DuplexStream>, msg: &AgentToServer) -> ServerToAgent {
    ws.send(Message::Binary(framing::encode(msg)))
        .await
        .unwrap();
    loop {
        match ws.next().await {
            Some(Ok(Message::Binary(data))) => return framing::decode(&data, 1 << 20).unwrap(),
            Some(Ok(Message::Ping(_) | Message::Pong(_))) => continue,
            other => panic!("expected a reply, got {other:?}"),
        }
    }
}

/// Reads until the server's Close and returns its code; counts the pings on the way. Fails
/// after an hour of virtual time (a missing timer would otherwise hang the test).
async fn close_code(ws: &mut WebSocketStream<DuplexStream>) -> (u16, usize) {
    tokio::time::timeout(Duration::from_secs(3600), close_code_inner(ws))
        .await
        .expect("no Close within an hour")
}

async fn close_code_inner(ws: &mut WebSocketStream<DuplexStream>) -> (u16, usize) {
    let mut pings = 0;
    loop {
        match ws.next().await {
            Some(Ok(Message::Close(frame))) => {
                while let Some(Ok(_)) = ws.next().await {}
                return (frame.map_or(0, |f| f.code.into()), pings);
            }
            Some(Ok(Message::Ping(_))) => pings += 1,
            Some(Ok(Message::Pong(_))) => {}
            Some(Ok(other)) => panic!("unexpected {other:?}"),
            other => panic!("stream ended without a Close: {other:?}"),
        }
    }
}

fn heartbeating() -> AgentCapabilitySet {
    AgentCapabilitySet::REPORTS_STATUS | AgentCapabilitySet::REPORTS_HEARTBEAT
}

/// HB-7 with the spec's default interval (WS-14): an agent that reports heartbeats and keeps
/// sending them every 30 s stays; once it goes silent it is closed (1001) after exactly 3 x
/// 30 s. Before the fix a silent WebSocket lived for ever.
#[tokio::test(start_paused = true)]
async fn hb_7_silent_heartbeating_agent_is_closed_after_three_intervals() {
    let (io, task) = serve(ConnectionLimits::default(), None).await;
    let mut ws = client(io).await;
    exchange(&mut ws, &report(heartbeating())).await;
    for _ in 0..10 {
        tokio::time::sleep(Duration::from_secs(30)).await;
        exchange(&mut ws, &report(heartbeating())).await;
    }
    assert!(!task.is_finished(), "a heartbeating agent stays connected");
    let silent_since = Instant::now();
    // Frozen: read raw, so the ping sent at 60 s gets no Pong.
    let code = frozen_close_code(ws.get_mut()).await;
    assert_eq!(code, 1001, "idle timeout closes with Going Away");
    let after = silent_since.elapsed();
    assert!(
        after >= Duration::from_secs(90) && after < Duration::from_secs(91),
        "{after:?}"
    );
    task.await.unwrap();
}

/// WS-14 "unless locally configured otherwise": a heartbeating agent whose own interval is
/// longer than the server assumes is pinged once a heartbeat is overdue (every 60 s of
/// silence at the default 30 s x 3) and kept while it answers the pings.
#[tokio::test(start_paused = true)]
async fn hb_7_heartbeating_agent_with_a_long_local_interval_is_kept_by_pongs() {
    let (io, task) = serve(ConnectionLimits::default(), None).await;
    let mut ws = client(io).await;
    exchange(&mut ws, &report(heartbeating())).await;
    let mut pings = 0;
    let _ = tokio::time::timeout(Duration::from_secs(610), async {
        while let Some(Ok(msg)) = ws.next().await {
            match msg {
                Message::Ping(_) => pings += 1,
                other => panic!("unexpected {other:?}"),
            }
        }
    })
    .await;
    assert_eq!(pings, 10, "a ping per 60 s of silence");
    assert!(!task.is_finished());
    exchange(&mut ws, &report(heartbeating())).await;
}

/// HB-2: the interval the server offered (`heartbeat_interval_seconds` = 60) sets the idle
/// timeout (3 x 60 s); an offer of 1 s is held to the floor (30 s).
#[tokio::test(start_paused = true)]
async fn hb_2_offered_heartbeat_interval_sets_the_idle_timeout() {
    for (offered, expected) in [(60, 180), (1, 30)] {
        let offer = ServerToAgent {
            connection_settings: Some(ConnectionSettingsOffers {
                hash: bytes::Bytes::from_static(b"h"),
                opamp: Some(OpAmpConnectionSettings {
                    heartbeat_interval_seconds: offered,
                    ..Default::default()
                }),
                ..Default::default()
            }),
            ..Default::default()
        };
        let (io, task) = serve(ConnectionLimits::default(), Some(offer)).await;
        let mut ws = client(io).await;
        let caps = heartbeating() | AgentCapabilitySet::ACCEPTS_OPAMP_CONNECTION_SETTINGS;
        let reply = exchange(&mut ws, &report(caps)).await;
        let got = reply.connection_settings.unwrap().opamp.unwrap();
        assert_eq!(got.heartbeat_interval_seconds, offered);
        let silent_since = Instant::now();
        let code = frozen_close_code(ws.get_mut()).await;
        assert_eq!(code, 1001);
        let after = silent_since.elapsed();
        assert!(
            after >= Duration::from_secs(expected) && after < Duration::from_secs(expected + 1),
            "offered {offered}: {after:?}"
        );
        task.await.unwrap();
    }
}

/// WS-15 (extra: pings are not in OpAMP): an agent without heartbeats (HB-1) is pinged after
/// each 30 s of silence and kept while it answers; a frozen agent (it stops reading, no FIN)
/// is closed 3 x 30 s after its last Pong.
#[tokio::test(start_paused = true)]
async fn ws_15_agent_without_heartbeats_is_pinged_and_frozen_one_closed() {
    let (io, task) = serve(ConnectionLimits::default(), None).await;
    let mut ws = client(io).await;
    exchange(&mut ws, &report(AgentCapabilitySet::REPORTS_STATUS)).await;
    let mut pings = 0;
    // Pings at 30 s, 60 s, ... 300 s, each answered at once.
    let _ = tokio::time::timeout(Duration::from_secs(315), async {
        while let Some(Ok(msg)) = ws.next().await {
            match msg {
                Message::Ping(_) => pings += 1,
                other => panic!("unexpected {other:?}"),
            }
        }
    })
    .await;
    assert_eq!(pings, 10, "one ping per 30 s of silence");
    assert!(!task.is_finished(), "an agent answering pings stays");
    // Frozen from 315 s: nothing is read (so no Pong); the last Pong was at 300 s.
    tokio::time::sleep(Duration::from_secs(70)).await;
    assert!(
        !task.is_finished(),
        "not closed before 3 x 30 s after the last Pong"
    );
    tokio::time::sleep(Duration::from_secs(10)).await;
    let (code, pings) = close_code(&mut ws).await;
    assert_eq!(code, 1001);
    assert_eq!(pings, 2, "pings sent while frozen");
    task.await.unwrap();
}

/// With pings off, an agent without heartbeats has no idle timeout (it is not expected to
/// send anything, HB-1).
#[tokio::test(start_paused = true)]
async fn hb_1_no_pings_and_no_heartbeats_means_no_idle_timeout() {
    let limits = ConnectionLimits::default().with_ws_ping_interval(None);
    let (io, task) = serve(limits, None).await;
    let mut ws = client(io).await;
    exchange(&mut ws, &report(AgentCapabilitySet::REPORTS_STATUS)).await;
    tokio::time::sleep(Duration::from_secs(3600)).await;
    assert!(!task.is_finished());
    exchange(&mut ws, &report(AgentCapabilitySet::REPORTS_STATUS)).await;
}

/// Connection exhaustion: an upgraded WebSocket that sends no message is closed with 1008
/// once the first-message timeout (default 15 s) passes. Before the fix it lived for ever.
#[tokio::test(start_paused = true)]
async fn silent_upgrade_is_closed_after_first_message_timeout() {
    let (io, task) = serve(ConnectionLimits::default(), None).await;
    let start = Instant::now();
    let mut ws = client(io).await;
    // A Ping is not an OpAMP message: it does not meet the deadline.
    ws.send(Message::Ping(bytes::Bytes::new())).await.unwrap();
    let (code, _) = close_code(&mut ws).await;
    assert_eq!(code, 1008);
    let after = start.elapsed();
    assert!(
        after >= Duration::from_secs(15) && after < Duration::from_secs(16),
        "{after:?}"
    );
    task.await.unwrap();
}

/// A masked binary frame header announcing `len` payload bytes (client to server).
fn frame_header(len: u64) -> Vec<u8> {
    let mut h = vec![0x82, 0x80 | 127];
    h.extend_from_slice(&len.to_be_bytes());
    h.extend_from_slice(&[1, 2, 3, 4]);
    h
}

/// The code of the server's Close, read raw (so nothing answers the server's pings, as with
/// a frozen agent); fails after an hour of virtual time.
async fn frozen_close_code(io: &mut DuplexStream) -> u16 {
    tokio::time::timeout(Duration::from_secs(3600), raw_close_code(io))
        .await
        .expect("no Close within an hour")
}

/// Reads raw server frames until a Close and returns its code.
async fn raw_close_code(io: &mut DuplexStream) -> u16 {
    let mut buf = Vec::new();
    let mut chunk = [0u8; 4096];
    loop {
        let n = io.read(&mut chunk).await.unwrap();
        assert!(n > 0, "closed without a Close frame: {buf:?}");
        buf.extend_from_slice(&chunk[..n]);
        // Server frames are unmasked; every frame here is short (7-bit length).
        let mut at = 0;
        while at + 2 <= buf.len() {
            let len = usize::from(buf[at + 1] & 0x7f);
            if at + 2 + len > buf.len() {
                break;
            }
            if buf[at] & 0x0f == 0x8 {
                return u16::from_be_bytes([buf[at + 2], buf[at + 3]]);
            }
            at += 2 + len;
        }
    }
}

/// Half-sent messages: 600 KiB of a 1 MiB message, then silence, or one byte every 5 s.
/// The message must keep the pace floor (256 KiB/s on average after a 10 s grace) and no
/// gap between its bytes may pass the grace: silence is closed with 1008 at 10 s after the
/// last byte (not on the credit of 600 KiB sent fast); a trickle is closed at 10 s +
/// 600/256 s after the first byte. Its bytes leave the budget. Before the fix a stalled
/// message was held for ever.
async fn half_message_closed_after(trickle: bool) -> Duration {
    let config = ServerConfig::default();
    let service = OpampService::new(config, Arc::new(crate::tests_support::Reject));
    let shared = service.shared.clone();
    let (a, mut b) = tokio::io::duplex(4 << 20);
    let task = tokio::spawn(async move {
        let ws = accept_stream(a, config_for(&service.shared), &service.shared).await;
        let (conn, rx) = Connection::websocket(PeerInfo::default(), 4);
        run(&service.shared, ws, conn, rx, Arc::new(Replier(None)), None).await;
    });
    let start = Instant::now();
    b.write_all(&frame_header(1 << 20)).await.unwrap();
    b.write_all(&vec![0u8; 600 << 10]).await.unwrap();
    tokio::time::sleep(Duration::from_secs(1)).await;
    assert!(
        shared.budget.used() >= 600 << 10,
        "the partial message is counted"
    );
    if trickle {
        for _ in 0..2 {
            tokio::time::sleep(Duration::from_secs(5)).await;
            b.write_all(&[0]).await.unwrap();
        }
    }
    let code = frozen_close_code(&mut b).await;
    assert_eq!(code, 1008);
    let after = start.elapsed();
    drop(b);
    task.await.unwrap();
    assert_eq!(shared.budget.used(), 0, "the budget got its bytes back");
    after
}

#[tokio::test(start_paused = true)]
async fn stalled_half_message_is_closed_at_the_gap_bound() {
    let after = half_message_closed_after(false).await;
    let expected = Duration::from_secs(10);
    assert!(
        after >= expected && after < expected + Duration::from_millis(50),
        "{after:?}"
    );
}

#[tokio::test(start_paused = true)]
async fn trickled_half_message_is_closed_at_the_pace_floor() {
    let after = half_message_closed_after(true).await;
    let expected = Duration::from_secs(10) + Duration::from_secs_f64(600.0 / 256.0);
    assert!(
        after >= expected && after < expected + Duration::from_millis(50),
        "{after:?}"
    );
}
