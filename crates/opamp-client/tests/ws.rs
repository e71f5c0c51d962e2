//! The WebSocket driver over real loopback sockets, against small (and hostile) test servers.
#![allow(
    clippy::unwrap_used,
    clippy::large_enum_variant,
    clippy::result_large_err
)]

mod common;

use std::sync::Arc;
use std::time::{Duration, Instant};

use common::*;
use futures_util::{SinkExt, StreamExt};
use opamp_client::{ClientError, OpampClient};
use opamp_proto::{
    AgentCapabilitySet, AgentToServer, ComponentHealth, ServerErrorResponse,
    ServerErrorResponseType, ServerToAgent, framing, server_error_response,
};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;
use tokio::sync::mpsc;
use tokio_tungstenite::tungstenite::Message;
use tokio_tungstenite::tungstenite::handshake::server::{Request, Response};
use tokio_tungstenite::tungstenite::protocol::frame::coding::CloseCode;

/// What a test WebSocket server saw.
#[derive(Debug)]
enum Seen {
    Handshake(http::HeaderMap),
    Msg(usize, AgentToServer),
    Close(usize, Option<CloseCode>),
}

async fn accept(
    n: usize,
    stream: TcpStream,
    tx: &mpsc::UnboundedSender<Seen>,
) -> tokio_tungstenite::WebSocketStream<TcpStream> {
    let tx2 = tx.clone();
    let _ = n;
    tokio_tungstenite::accept_hdr_async(stream, move |req: &Request, resp: Response| {
        let _ = tx2.send(Seen::Handshake(req.headers().clone()));
        Ok(resp)
    })
    .await
    .unwrap()
}

/// Serves each connection: answers every message with an ack, reports everything.
async fn well_behaved(n: usize, stream: TcpStream, tx: mpsc::UnboundedSender<Seen>) {
    serve(n, stream, tx, ack).await;
}

/// Serves connection `n`: answers every message with `reply(message)`, reports everything.
async fn serve(
    n: usize,
    stream: TcpStream,
    tx: mpsc::UnboundedSender<Seen>,
    reply: impl Fn(&AgentToServer) -> ServerToAgent,
) {
    let mut ws = accept(n, stream, &tx).await;
    while let Some(Ok(frame)) = ws.next().await {
        match frame {
            Message::Binary(data) => {
                let msg: AgentToServer = framing::decode(&data, 1 << 20).unwrap();
                let reply = reply(&msg);
                let _ = tx.send(Seen::Msg(n, msg));
                if ws
                    .send(Message::Binary(framing::encode(&reply)))
                    .await
                    .is_err()
                {
                    break;
                }
            }
            Message::Close(frame) => {
                let _ = tx.send(Seen::Close(n, frame.map(|f| f.code)));
                // Finish the close handshake.
                let _ = ws.close(None).await;
                break;
            }
            _ => {}
        }
    }
}

async fn next_msg(rx: &mut mpsc::UnboundedReceiver<Seen>) -> (usize, AgentToServer) {
    loop {
        if let Seen::Msg(n, m) = recv(rx).await {
            return (n, m);
        }
    }
}

fn caps() -> AgentCapabilitySet {
    AgentCapabilitySet::REPORTS_STATUS
        | AgentCapabilitySet::REPORTS_HEALTH
        | AgentCapabilitySet::REPORTS_HEARTBEAT
        | AgentCapabilitySet::REPORTS_EFFECTIVE_CONFIG
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn ws_report_coalesce_heartbeat_and_ws_16_stop() {
    let (tx, mut seen) = mpsc::unbounded_channel();
    let addr = tcp_server(move |n, s| well_behaved(n, s, tx.clone())).await;
    let (cb, mut cbs) = Recorder::new();
    *cb.effective_config.lock().unwrap() = Some(Default::default());
    let client = OpampClient::start(
        settings(format!("ws://{addr}/v1/opamp"))
            .with_capabilities(caps())
            .with_agent_description(description())
            .with_heartbeat_interval(Duration::from_millis(300))
            .with_header(
                http::header::AUTHORIZATION,
                http::HeaderValue::from_static("Bearer static"),
            ),
        cb.clone(),
    )
    .unwrap();

    let Seen::Handshake(headers) = recv(&mut seen).await else {
        panic!("handshake first")
    };
    assert_eq!(headers["authorization"], "Bearer static");
    // REP-1: full state first, sequence numbers from 0.
    let (_, first) = next_msg(&mut seen).await;
    assert_eq!(first.sequence_num, 0);
    assert!(first.agent_description.is_some());
    assert!(first.effective_config.is_some());
    assert_eq!(first.capabilities, caps().bits());
    expect_cb(&mut cbs, |c| matches!(c, Cb::Connect).then_some(())).await;

    // A burst of setter calls: coalesced; only the health goes.
    for i in 0..50 {
        client
            .set_health(ComponentHealth {
                healthy: i % 2 == 1,
                ..Default::default()
            })
            .unwrap();
    }
    let (_, m) = next_msg(&mut seen).await;
    assert_eq!(m.sequence_num, 1);
    assert!(m.agent_description.is_none(), "CMP-1");
    assert!(m.health.is_some());
    let mut last = m;
    // Whatever followed the burst ends with the latest value; then heartbeats (HB-4).
    loop {
        let (_, m) = next_msg(&mut seen).await;
        assert_eq!(m.sequence_num, last.sequence_num + 1, "SEQ-1");
        if m.health.is_none() {
            assert_eq!(last.health.as_ref().map(|h| h.healthy), Some(true));
            break;
        }
        last = m;
    }

    // A setter for an undeclared capability fails.
    assert!(matches!(
        client.set_package_statuses(Default::default()),
        Err(ClientError::MissingCapability(_))
    ));

    // WS-16: agent_disconnect, then a close frame.
    let t = Instant::now();
    client.stop().await.unwrap();
    assert!(t.elapsed() < Duration::from_secs(3));
    loop {
        match recv(&mut seen).await {
            Seen::Msg(_, m) if m.agent_disconnect.is_some() => break,
            Seen::Msg(..) => {}
            other => panic!("unexpected {other:?}"),
        }
    }
    match recv(&mut seen).await {
        Seen::Close(_, code) => assert_eq!(code, Some(CloseCode::Normal)),
        other => panic!("expected close, got {other:?}"),
    }
    assert_eq!(
        client.set_health(Default::default()),
        Err(ClientError::Stopped)
    );
    assert_eq!(
        client.stop().await,
        Err(opamp_client::StopError::AlreadyStopped)
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn stop_from_inside_a_callback_does_not_deadlock() {
    let (tx, mut seen) = mpsc::unbounded_channel();
    let addr = tcp_server(move |n, s| well_behaved(n, s, tx.clone())).await;
    let (tx_cb, mut cbs) = mpsc::unbounded_channel();
    let cb = Arc::new(Recorder {
        tx: tx_cb,
        client: Default::default(),
        stop_on_connect: true,
        effective_config: Default::default(),
    });
    let client = OpampClient::start(settings(format!("ws://{addr}/")), cb.clone()).unwrap();
    cb.client.set(client.clone()).unwrap();
    expect_cb(&mut cbs, |c| matches!(c, Cb::Connect).then_some(())).await;
    // The goodbye still happens after the callback returned.
    loop {
        match recv(&mut seen).await {
            Seen::Msg(_, m) if m.agent_disconnect.is_some() => break,
            Seen::Close(..) => panic!("close before agent_disconnect"),
            _ => {}
        }
    }
    assert!(matches!(recv(&mut seen).await, Seen::Close(..)));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn thr_5_handshake_503_with_retry_after_is_honoured() {
    let (tx, mut seen) = mpsc::unbounded_channel();
    let times = Arc::new(std::sync::Mutex::new(Vec::new()));
    let times2 = times.clone();
    let addr = tcp_server(move |n, mut s| {
        let tx = tx.clone();
        times2.lock().unwrap().push(Instant::now());
        async move {
            if n == 0 {
                // Refuse the upgrade.
                let mut buf = [0u8; 4096];
                let _ = s.read(&mut buf).await;
                let _ = s
                    .write_all(
                        b"HTTP/1.1 503 Service Unavailable\r\nRetry-After: 1\r\nContent-Length: 0\r\n\r\n",
                    )
                    .await;
                let _ = tx.send(Seen::Close(n, None));
                return;
            }
            well_behaved(n, s, tx).await;
        }
    })
    .await;
    let (cb, mut cbs) = Recorder::new();
    let client = OpampClient::start(settings(format!("ws://{addr}/")), cb).unwrap();
    let status = expect_cb(&mut cbs, |c| match c {
        Cb::ConnectFailed(_, s) => Some(*s),
        _ => None,
    })
    .await;
    assert_eq!(
        status,
        Some((
            http::StatusCode::SERVICE_UNAVAILABLE,
            Some(Duration::from_secs(1))
        ))
    );
    expect_cb(&mut cbs, |c| matches!(c, Cb::Connect).then_some(())).await;
    let (n, _) = next_msg(&mut seen).await;
    assert_eq!(n, 1);
    // The backoff alone would have retried after ~10 ms. (Both instants are taken by the
    // server: the second accept comes at least 1 s after the first.)
    let times = times.lock().unwrap().clone();
    assert!(times[1] - times[0] >= Duration::from_secs(1));
    client.stop().await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn thr_2_unavailable_disconnects_with_agent_disconnect_and_waits_retry_info() {
    let (tx, mut seen) = mpsc::unbounded_channel();
    let times = Arc::new(std::sync::Mutex::new(Vec::new()));
    let times2 = times.clone();
    let addr = tcp_server(move |n, stream| {
        let tx = tx.clone();
        let times = times2.clone();
        async move {
            if n > 0 {
                times.lock().unwrap().push(Instant::now());
                return well_behaved(n, stream, tx).await;
            }
            let mut ws = accept(n, stream, &tx).await;
            while let Some(Ok(frame)) = ws.next().await {
                match frame {
                    Message::Binary(data) => {
                        let msg: AgentToServer = framing::decode(&data, 1 << 20).unwrap();
                        let bye = msg.agent_disconnect.is_some();
                        let _ = tx.send(Seen::Msg(n, msg));
                        if bye {
                            continue;
                        }
                        let busy = ServerToAgent {
                            error_response: Some(ServerErrorResponse {
                                r#type: ServerErrorResponseType::Unavailable as i32,
                                error_message: "busy".into(),
                                details: Some(server_error_response::Details::RetryInfo(
                                    opamp_proto::RetryInfo {
                                        retry_after_nanoseconds: 700_000_000,
                                    },
                                )),
                            }),
                            ..Default::default()
                        };
                        times.lock().unwrap().push(Instant::now());
                        let _ = ws.send(Message::Binary(framing::encode(&busy))).await;
                    }
                    Message::Close(f) => {
                        let _ = tx.send(Seen::Close(n, f.map(|f| f.code)));
                        let _ = ws.close(None).await;
                        break;
                    }
                    _ => {}
                }
            }
        }
    })
    .await;
    let (cb, mut cbs) = Recorder::new();
    let client = OpampClient::start(settings(format!("ws://{addr}/")), cb).unwrap();
    let (n, first) = next_msg(&mut seen).await;
    assert_eq!((n, first.sequence_num), (0, 0));
    let err = expect_cb(&mut cbs, |c| match c {
        Cb::Error(e) => Some(e.clone()),
        _ => None,
    })
    .await;
    assert_eq!(err.r#type, ServerErrorResponseType::Unavailable as i32);
    // WS-19: agent_disconnect, then close, then the new connection.
    let (n, bye) = next_msg(&mut seen).await;
    assert_eq!(n, 0);
    assert!(bye.agent_disconnect.is_some());
    loop {
        if let Seen::Close(0, _) = recv(&mut seen).await {
            break;
        }
    }
    let (n, again) = next_msg(&mut seen).await;
    assert_eq!(n, 1);
    // Server-side instants: the busy answer, then the next accept 700 ms later at least.
    let times = times.lock().unwrap().clone();
    assert!(times[1] - times[0] >= Duration::from_millis(700));
    assert_eq!(again.sequence_num, bye.sequence_num + 1);
    client.stop().await.unwrap();
}

/// Reads one masked client frame; returns (opcode, unmasked payload).
async fn read_client_frame(s: &mut TcpStream) -> Option<(u8, Vec<u8>)> {
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
    let mut payload = vec![0u8; usize::try_from(len).ok()?.min(1 << 20)];
    s.read_exact(&mut payload).await.ok()?;
    for (i, b) in payload.iter_mut().enumerate() {
        *b ^= mask[i % 4];
    }
    Some((h[0] & 0x0f, payload))
}

/// Reads client frames until its Close frame (or the end of the connection): the OpAMP
/// messages seen before it, and the close code, if a Close frame came.
async fn read_until_close(s: &mut TcpStream) -> (Vec<AgentToServer>, Option<u16>) {
    let mut msgs = vec![];
    while let Some((op, payload)) = read_client_frame(s).await {
        match op {
            2 => msgs.push(framing::decode(&payload, 1 << 20).unwrap()),
            8 => {
                let code =
                    (payload.len() >= 2).then(|| u16::from_be_bytes([payload[0], payload[1]]));
                return (msgs, code);
            }
            _ => {}
        }
    }
    (msgs, None)
}

/// A raw WebSocket handshake, so hostile frames can be written by hand.
async fn raw_handshake(s: &mut TcpStream) {
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

/// WS-10, and WS-16 / WS-19 for the way out: each protocol error ends with agent_disconnect,
/// then a Close frame with the matching code.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn hostile_ws_server_drops_garbage_and_oversized_then_client_recovers() {
    // Connection 0: accepted and dropped at once. 1: garbage binary (non-zero header).
    // 2: a text frame. 3: a frame header announcing 1 GiB, and nothing after it: the client
    // must refuse it from the header alone (nothing buffered) and close with 1009.
    // 4 and later: well behaved.
    let (tx, mut seen) = mpsc::unbounded_channel();
    let (close_tx, mut closes) = mpsc::unbounded_channel();
    let addr = tcp_server(move |n, mut s| {
        let tx = tx.clone();
        let close_tx = close_tx.clone();
        async move {
            match n {
                0 => drop(s),
                1..=3 => {
                    raw_handshake(&mut s).await;
                    // The client's first report.
                    let (op, _) = read_client_frame(&mut s).await.unwrap();
                    assert_eq!(op, 2);
                    match n {
                        1 => s.write_all(&[0x82, 3, 0x05, 0xff, 0xff]).await.unwrap(),
                        2 => s.write_all(&[0x81, 2, b'h', b'i']).await.unwrap(),
                        _ => {
                            let mut frame = vec![0x82, 127];
                            frame.extend_from_slice(&(1u64 << 30).to_be_bytes());
                            frame.extend_from_slice(&[0; 16]);
                            s.write_all(&frame).await.unwrap();
                        }
                    }
                    // WS-16, WS-19: agent_disconnect, then a close frame carrying a code.
                    let (msgs, code) = read_until_close(&mut s).await;
                    let bye = msgs.last().is_some_and(|m| m.agent_disconnect.is_some());
                    if let Some(code) = code {
                        let _ = close_tx.send((n, code, bye));
                    }
                }
                _ => well_behaved(n, s, tx).await,
            }
        }
    })
    .await;
    let (cb, mut cbs) = Recorder::new();
    let client = OpampClient::start(
        settings(format!("ws://{addr}/")).with_max_message_size(1024),
        cb,
    )
    .unwrap();
    let mut codes = vec![
        recv(&mut closes).await,
        recv(&mut closes).await,
        recv(&mut closes).await,
    ];
    codes.sort();
    assert_eq!(
        codes,
        vec![(1, 1007, true), (2, 1003, true), (3, 1009, true)],
        "(connection, close code, agent_disconnect before the close)"
    );
    let (n, m) = next_msg(&mut seen).await;
    assert_eq!(n, 4);
    assert!(m.capabilities != 0);
    // on_connect ran once per successful handshake: 1, 2, 3 and 4.
    for _ in 0..4 {
        expect_cb(&mut cbs, |c| matches!(c, Cb::Connect).then_some(())).await;
    }
    assert!(client.is_connected());
    client.stop().await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn header_fn_is_called_for_every_handshake() {
    let (tx, mut seen) = mpsc::unbounded_channel();
    let addr = tcp_server(move |n, s| {
        let tx = tx.clone();
        async move {
            if n == 0 {
                // Drop after the handshake, to force a second one.
                let _ = accept(n, s, &tx).await;
                return;
            }
            well_behaved(n, s, tx).await
        }
    })
    .await;
    let counter = Arc::new(std::sync::atomic::AtomicUsize::new(0));
    let c2 = counter.clone();
    let (cb, _cbs) = Recorder::new();
    let client = OpampClient::start(
        settings(format!("ws://{addr}/")).with_header_fn(move || {
            let n = c2.fetch_add(1, std::sync::atomic::Ordering::SeqCst);
            let mut h = http::HeaderMap::new();
            h.insert(
                http::header::AUTHORIZATION,
                format!("Bearer token-{n}").parse().unwrap(),
            );
            h
        }),
        cb,
    )
    .unwrap();
    let mut tokens = vec![];
    while tokens.len() < 2 {
        if let Seen::Handshake(h) = recv(&mut seen).await {
            tokens.push(h["authorization"].to_str().unwrap().to_owned());
        }
    }
    assert_eq!(tokens, vec!["Bearer token-0", "Bearer token-1"]);
    client.stop().await.unwrap();
}

/// WS-16, WS-19 (MUST): a server that sends a text frame (WS-1) makes the client drop the
/// connection; it says agent_disconnect first, then sends the Close frame (1003).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn ws_16_ws_19_text_frame_gets_agent_disconnect_before_close() {
    let (tx, mut seen) = mpsc::unbounded_channel();
    let (out_tx, mut outs) = mpsc::unbounded_channel();
    let addr = tcp_server(move |n, mut s| {
        let tx = tx.clone();
        let out_tx = out_tx.clone();
        async move {
            if n > 0 {
                return well_behaved(n, s, tx).await;
            }
            raw_handshake(&mut s).await;
            let (op, _) = read_client_frame(&mut s).await.unwrap();
            assert_eq!(op, 2);
            s.write_all(&[0x81, 2, b'h', b'i']).await.unwrap();
            let _ = out_tx.send(read_until_close(&mut s).await);
        }
    })
    .await;
    let (cb, _cbs) = Recorder::new();
    let client = OpampClient::start(settings(format!("ws://{addr}/")), cb).unwrap();
    let (msgs, code) = recv(&mut outs).await;
    assert_eq!(
        code,
        Some(1003),
        "a Close frame with 1003 (unsupported data)"
    );
    assert_eq!(
        msgs.len(),
        1,
        "exactly one message before the Close: {msgs:?}"
    );
    assert!(
        msgs[0].agent_disconnect.is_some(),
        "WS-16: agent_disconnect first"
    );
    // The client reconnects, and the next connection starts with the next sequence number.
    let (n, m) = next_msg(&mut seen).await;
    assert_eq!(n, 1);
    assert_eq!(m.sequence_num, msgs[0].sequence_num + 1);
    client.stop().await.unwrap();
}

/// WS-17 (RFC 6455 closing handshake): a Close frame from the server is answered with the
/// client's Close frame before the client drops the connection and reconnects.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn ws_17_server_close_is_answered_with_a_close_frame() {
    let (tx, mut seen) = mpsc::unbounded_channel();
    let (out_tx, mut outs) = mpsc::unbounded_channel();
    let addr = tcp_server(move |n, mut s| {
        let tx = tx.clone();
        let out_tx = out_tx.clone();
        async move {
            if n > 0 {
                return well_behaved(n, s, tx).await;
            }
            raw_handshake(&mut s).await;
            let (op, _) = read_client_frame(&mut s).await.unwrap();
            assert_eq!(op, 2);
            // Close, 1001 (going away). Then keep the TCP connection open: the client must
            // answer without waiting for the end of the connection.
            s.write_all(&[0x88, 2, 0x03, 0xe9]).await.unwrap();
            let _ = out_tx.send(read_until_close(&mut s).await);
        }
    })
    .await;
    let (cb, _cbs) = Recorder::new();
    let client = OpampClient::start(settings(format!("ws://{addr}/")), cb).unwrap();
    let (msgs, code) = recv(&mut outs).await;
    assert!(
        msgs.is_empty(),
        "no data after the server's Close: {msgs:?}"
    );
    assert!(code.is_some(), "the client's Close frame never came");
    let (n, _) = next_msg(&mut seen).await;
    assert_eq!(n, 1);
    client.stop().await.unwrap();
}

/// Item 7a (GEN-8, WS-18): a server that answers the first message and then closes each
/// WebSocket at once must not get a tight reconnect loop: sessions that die young do not
/// reset the backoff. With 100 ms growing by 2x up to 1 s, 3 s allow about 8 connections;
/// without backoff it would be hundreds.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn gen_8_ws_18_server_closing_every_session_at_once_gets_backoff() {
    let count = Arc::new(std::sync::atomic::AtomicUsize::new(0));
    let counted = count.clone();
    let addr = tcp_server(move |_, stream| {
        let counted = counted.clone();
        async move {
            let Ok(mut ws) = tokio_tungstenite::accept_async(stream).await else {
                return;
            };
            counted.fetch_add(1, std::sync::atomic::Ordering::SeqCst);
            // Answer the first report properly, then close.
            if let Some(Ok(Message::Binary(data))) = ws.next().await {
                let msg: AgentToServer = framing::decode(&data, 1 << 20).unwrap();
                let _ = ws.send(Message::Binary(framing::encode(&ack(&msg)))).await;
            }
            let _ = ws.close(None).await;
        }
    })
    .await;
    let (cb, _cbs) = Recorder::new();
    let client = OpampClient::start(
        settings(format!("ws://{addr}/v1/opamp"))
            .with_capabilities(caps())
            .with_backoff(
                opamp_client::BackoffPolicy::default()
                    .with_initial_interval(Duration::from_millis(100))
                    .with_multiplier(2.0)
                    .with_randomization_factor(0.0)
                    .with_max_interval(Duration::from_secs(1)),
            ),
        cb,
    )
    .unwrap();
    tokio::time::sleep(Duration::from_secs(3)).await;
    let n = count.load(std::sync::atomic::Ordering::SeqCst);
    client.stop().await.ok();
    assert!((2..=12).contains(&n), "{n} connections in 3 s");
}

/// Item 6 (REP-4, HB-7): a server that accepts the WebSocket, reads the first report and then
/// goes silent without closing (no FIN: a half-open connection) is detected after two
/// heartbeat intervals without an answer, and the client reconnects.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn rep_4_half_open_server_that_goes_silent_is_detected_and_reconnected() {
    let (tx, mut rx) = mpsc::unbounded_channel::<(usize, Instant)>();
    let held = Arc::new(std::sync::Mutex::new(Vec::new()));
    let held2 = held.clone();
    let addr = tcp_server(move |n, stream| {
        let tx = tx.clone();
        let held = held2.clone();
        async move {
            let Ok(mut ws) = tokio_tungstenite::accept_async(stream).await else {
                return;
            };
            if let Some(Ok(Message::Binary(_))) = ws.next().await {
                let _ = tx.send((n, Instant::now()));
            }
            // Silent from now on; the socket stays open (kept alive by the test).
            held.lock().unwrap().push(ws);
        }
    })
    .await;
    let (cb, _cbs) = Recorder::new();
    let client = OpampClient::start(
        settings(format!("ws://{addr}/v1/opamp"))
            .with_capabilities(caps())
            .with_heartbeat_interval(Duration::from_millis(200)),
        cb,
    )
    .unwrap();
    let (n0, t0) = recv(&mut rx).await;
    let (n1, t1) = recv(&mut rx).await;
    assert_eq!((n0, n1), (0, 1), "a new connection after the silent one");
    // Not before two heartbeat intervals of silence.
    assert!(t1 - t0 >= Duration::from_millis(400), "{:?}", t1 - t0);
    client.stop().await.ok();
}

/// Item 8: a WebSocket upgrade answered with a redirect to itself is a failure with backoff,
/// not a tight loop (redirects are not followed).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn gen_8_ws_upgrade_redirect_loop_is_a_failure_with_backoff() {
    let count = Arc::new(std::sync::atomic::AtomicUsize::new(0));
    let counted = count.clone();
    let addr = tcp_server(move |_, mut s| {
        let counted = counted.clone();
        async move {
            let mut buf = [0u8; 4096];
            let _ = s.read(&mut buf).await;
            counted.fetch_add(1, std::sync::atomic::Ordering::SeqCst);
            let addr = s.local_addr().unwrap();
            let resp = format!(
                "HTTP/1.1 302 Found\r\nLocation: ws://{addr}/v1/opamp\r\nContent-Length: 0\r\n\r\n"
            );
            let _ = s.write_all(resp.as_bytes()).await;
        }
    })
    .await;
    let (cb, mut cbs) = Recorder::new();
    let client = OpampClient::start(
        settings(format!("ws://{addr}/v1/opamp")).with_backoff(
            opamp_client::BackoffPolicy::default()
                .with_initial_interval(Duration::from_millis(100))
                .with_multiplier(2.0)
                .with_randomization_factor(0.0)
                .with_max_interval(Duration::from_secs(1)),
        ),
        cb,
    )
    .unwrap();
    let status = expect_cb(&mut cbs, |c| match c {
        Cb::ConnectFailed(_, s) => Some(*s),
        _ => None,
    })
    .await;
    assert_eq!(status.map(|s| s.0), Some(http::StatusCode::FOUND));
    tokio::time::sleep(Duration::from_secs(3)).await;
    let n = count.load(std::sync::atomic::Ordering::SeqCst);
    client.stop().await.ok();
    assert!((2..=8).contains(&n), "{n} upgrade attempts in 3 s");
}

/// A message that decodes into more elements than the client's limit (2,000 config files,
/// limit 1,000) is refused before decoding: the client closes with 1009 and reconnects; the
/// offer of the next connection (one file) is delivered, the big one never.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn message_with_too_many_elements_is_refused_with_1009() {
    let (tx, mut seen) = mpsc::unbounded_channel();
    let addr = tcp_server(move |n, stream| {
        let tx = tx.clone();
        async move {
            let offer = move |msg: &AgentToServer| {
                if n == 0 {
                    config_offer(msg, 2000, b"big")
                } else {
                    config_offer(msg, 1, b"small")
                }
            };
            serve(n, stream, tx, offer).await;
        }
    })
    .await;
    let (cb, mut cbs) = Recorder::new();
    let client = OpampClient::start(
        settings(format!("ws://{addr}/"))
            .with_capabilities(caps() | AgentCapabilitySet::ACCEPTS_REMOTE_CONFIG)
            .with_max_message_elements(1000),
        cb,
    )
    .unwrap();
    let close = loop {
        if let Seen::Close(n, code) = recv(&mut seen).await {
            break (n, code);
        }
    };
    assert_eq!(close, (0, Some(CloseCode::Size)));
    let hash = expect_cb(&mut cbs, |c| match c {
        Cb::Message(d) => d.remote_config.as_ref().map(|r| r.config_hash.clone()),
        _ => None,
    })
    .await;
    assert_eq!(&hash[..], b"small");
    client.stop().await.unwrap();
}
