//! Liveness and resource limits over real loopback sockets (ConnectionLimits): connection
//! exhaustion, half-sent messages and bodies, floods, slow-loris, pipelining. The timer rules
//! themselves are tested on a paused clock in `src/ws/liveness_tests.rs`.
#![allow(clippy::unwrap_used)]

mod common;

use std::net::SocketAddr;
use std::time::Duration;

use bytes::Bytes;
use common::*;
use futures_util::SinkExt;
use opamp_proto::{AgentDescription, AnyValue, KeyValue, Message, any_value, framing};
use opamp_server::{ConnectionLimits, Server};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;
use tokio_tungstenite::tungstenite::Message as WsMessage;
use tokio_tungstenite::tungstenite::protocol::frame::Frame;
use tokio_tungstenite::tungstenite::protocol::frame::coding::{Data, OpCode};

const PATH: &str = "/v1/opamp";

async fn start(limits: ConnectionLimits) -> (Server, tokio::sync::mpsc::UnboundedReceiver<Event>) {
    let (rec, events) = Recorder::quiet();
    let config = loopback_config().limits(limits).build().unwrap();
    (
        Server::bind(config, rec.server_callbacks()).await.unwrap(),
        events,
    )
}

/// One well-behaved WebSocket exchange on a fresh connection.
async fn good_ws_agent(addr: SocketAddr, n: u8) -> Ws {
    let mut ws = ws_connect(addr, PATH).await;
    ws_send(&mut ws, &first_report(uid(n))).await;
    let reply = ws_recv(&mut ws).await;
    assert_eq!(&reply.instance_uid[..], uid(n).as_array());
    ws
}

async fn still_served(ws: &mut Ws, n: u8) {
    ws_send(ws, &report(uid(n), 1)).await;
    let reply = ws_recv(ws).await;
    assert_eq!(&reply.instance_uid[..], uid(n).as_array());
}

/// Waits (bounded by the test step) until `cond` holds.
async fn eventually(mut cond: impl FnMut() -> bool) {
    within(async {
        while !cond() {
            tokio::time::sleep(Duration::from_millis(5)).await;
        }
    })
    .await;
}

/// Connection exhaustion: at `max_connections` the oldest WebSockets that never sent a
/// message are closed (1013) to admit new agents; real agents are never shed, and when
/// every connection is a real agent the newcomer is refused. Before the fix the silent
/// sockets stayed and took every slot.
#[tokio::test]
async fn connection_limit_sheds_the_oldest_silent_websockets_first() {
    let (rec, _events) = Recorder::quiet();
    let server = loopback_config()
        .max_connections(12)
        .bind(rec.server_callbacks())
        .await
        .unwrap();
    let addr = server.local_addr();
    let mut agents = Vec::new();
    for n in 1..=4 {
        agents.push(good_ws_agent(addr, n).await);
    }
    let mut silent = Vec::new();
    for _ in 0..8 {
        silent.push(ws_connect(addr, PATH).await);
    }
    // Full (12). Each new agent sheds the oldest silent socket.
    for n in 5..=8 {
        agents.push(good_ws_agent(addr, n).await);
    }
    for ws in &mut silent[..4] {
        assert_eq!(
            ws_close_code(ws).await,
            Some(1013),
            "the oldest silent are shed"
        );
    }
    // The younger silent ones are still connected, and become agents.
    for (i, ws) in silent[4..].iter_mut().enumerate() {
        let n = 20 + u8::try_from(i).unwrap();
        ws_send(ws, &first_report(uid(n))).await;
        assert_eq!(&ws_recv(ws).await.instance_uid[..], uid(n).as_array());
    }
    for (i, ws) in agents.iter_mut().enumerate() {
        still_served(ws, u8::try_from(i + 1).unwrap()).await;
    }
    // Twelve real agents: a thirteenth connection is closed at once.
    let tcp = within(TcpStream::connect(addr)).await.unwrap();
    assert!(
        ws_handshake(tcp, &format!("ws://{addr}{PATH}"), None)
            .await
            .is_err()
    );
    drop((agents, silent));
    server.shutdown().await;
}

/// Connection exhaustion: a WebSocket that sends nothing after the upgrade is closed with
/// 1008 once `first_message_timeout` passes (paused-clock test of the deadline itself:
/// `silent_upgrade_is_closed_after_first_message_timeout`).
#[tokio::test]
async fn silent_websocket_is_closed_with_1008_after_the_first_message_timeout() {
    let limits = ConnectionLimits::default().with_first_message_timeout(Duration::from_millis(300));
    let (server, _events) = start(limits).await;
    let mut silent = ws_connect(server.local_addr(), PATH).await;
    let mut agent = good_ws_agent(server.local_addr(), 1).await;
    assert_eq!(ws_close_code(&mut silent).await, Some(1008));
    still_served(&mut agent, 1).await;
    drop(agent);
    server.shutdown().await;
}

/// Slow-loris: an upgrade request whose head is trickled a byte at a time is dropped at the
/// first-message timeout, before its head is complete; a good agent is served meanwhile.
/// Before the fix the trickle had hyper's header timeout (the 120 s HTTP idle timeout).
#[tokio::test]
async fn slow_loris_upgrade_is_dropped_at_the_first_message_timeout() {
    let limits = ConnectionLimits::default().with_first_message_timeout(Duration::from_millis(500));
    let (server, _events) = start(limits).await;
    let addr = server.local_addr();
    let head = format!(
        "GET {PATH} HTTP/1.1\r\nhost: localhost\r\nconnection: upgrade\r\nupgrade: websocket\r\n\
         sec-websocket-version: 13\r\nsec-websocket-key: dGhlIHNhbXBsZSBub25jZQ==\r\n\r\n"
    );
    let mut tcp = within(TcpStream::connect(addr)).await.unwrap();
    let trickle = async {
        for byte in head.as_bytes() {
            if tcp.write_all(&[*byte]).await.is_err() {
                return true;
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
            // The server closing shows as a readable EOF.
            let mut probe = [0u8; 1];
            if let Ok(Ok(0)) =
                tokio::time::timeout(Duration::from_millis(1), tcp.read(&mut probe)).await
            {
                return true;
            }
        }
        false
    };
    let (dropped, mut agent) = tokio::join!(within(trickle), good_ws_agent(addr, 1));
    assert!(dropped, "the server dropped the trickling connection early");
    still_served(&mut agent, 1).await;
    drop(agent);
    server.shutdown().await;
}

/// The raw TCP stream under a client WebSocket, for frames tungstenite would not send.
fn raw(ws: &mut Ws) -> &mut TcpStream {
    ws.get_mut()
}

/// A masked binary frame header announcing `len` payload bytes.
fn frame_header(len: u64) -> Vec<u8> {
    let mut h = vec![0x82, 0x80 | 127];
    h.extend_from_slice(&len.to_be_bytes());
    h.extend_from_slice(&[1, 2, 3, 4]);
    h
}

/// A first report of about `size` bytes (one large attribute), masked by tungstenite.
fn large_report(n: u8, size: usize) -> opamp_proto::AgentToServer {
    let mut msg = first_report(uid(n));
    msg.agent_description = Some(AgentDescription {
        identifying_attributes: vec![KeyValue {
            key: "blob".into(),
            value: Some(AnyValue {
                value: Some(any_value::Value::StringValue("x".repeat(size))),
            }),
        }],
        non_identifying_attributes: vec![],
    });
    msg
}

/// Half-sent messages and the global budget: with 1 MiB for incomplete messages, one socket
/// holding 900 KiB of a message leaves no room for another large one (closed with 1013);
/// small messages of good agents still pass; once the stalled socket is gone, a large
/// legitimate message within the budget works. Before the fix nothing was refused.
#[tokio::test]
async fn ws_budget_refuses_large_incomplete_messages_with_1013() {
    let limits = ConnectionLimits::default().with_max_incomplete_bytes(1 << 20);
    let (server, _events) = start(limits).await;
    let addr = server.local_addr();
    let service = server.service().clone();

    let mut stalled = ws_connect(addr, PATH).await;
    raw(&mut stalled)
        .write_all(&frame_header(4 << 20))
        .await
        .unwrap();
    raw(&mut stalled)
        .write_all(&vec![0u8; 900 << 10])
        .await
        .unwrap();
    eventually(|| service.incomplete_bytes() >= 900 << 10).await;

    // A second large message would pass the budget: refused. The server closes with 1013;
    // bytes it had no room to read make the kernel reset the socket, so a reset counts too.
    let mut second = ws_connect(addr, PATH).await;
    raw(&mut second)
        .write_all(&frame_header(4 << 20))
        .await
        .unwrap();
    let _ = raw(&mut second).write_all(&vec![0u8; 200 << 10]).await;
    let code = ws_close_code(&mut second).await;
    assert!(matches!(code, Some(1013) | None), "{code:?}");
    eventually(|| service.incomplete_bytes() < 1 << 20).await;

    // A good agent's small messages pass while the budget is held.
    let mut agent = good_ws_agent(addr, 1).await;
    still_served(&mut agent, 1).await;

    drop(stalled);
    eventually(|| service.incomplete_bytes() == 0).await;
    // A large legitimate message within the budget.
    let mut big = ws_connect(addr, PATH).await;
    ws_send(&mut big, &large_report(2, 900 << 10)).await;
    assert_eq!(&ws_recv(&mut big).await.instance_uid[..], uid(2).as_array());
    drop((agent, big, second));
    server.shutdown().await;
}

/// Half-sent messages over the wire: a stalled partial message is closed (1008) once it
/// falls behind the pace floor; its bytes leave the budget.
#[tokio::test]
async fn ws_stalled_partial_message_is_closed_with_1008_at_the_pace_floor() {
    let limits = ConnectionLimits::default()
        .with_read_grace(Duration::from_millis(200))
        .with_min_read_rate(1 << 20);
    let (server, _events) = start(limits).await;
    let service = server.service().clone();
    let mut stalled = ws_connect(server.local_addr(), PATH).await;
    raw(&mut stalled)
        .write_all(&frame_header(4 << 20))
        .await
        .unwrap();
    raw(&mut stalled)
        .write_all(&vec![0u8; 300 << 10])
        .await
        .unwrap();
    assert_eq!(ws_close_code(&mut stalled).await, Some(1008));
    eventually(|| service.incomplete_bytes() == 0).await;
    server.shutdown().await;
}

/// A message whose first bytes came fast (a large average-pace credit) and then stop is
/// closed once the gap since its last byte passes `read_grace`, not after the credit.
#[tokio::test]
async fn ws_partial_message_stalled_after_a_fast_start_is_closed_at_the_gap_bound() {
    // The average-pace bound alone would allow 0.5 s + 64 KiB / (1 KiB/s) = 64.5 s.
    let limits = ConnectionLimits::default()
        .with_read_grace(Duration::from_millis(500))
        .with_min_read_rate(1 << 10);
    let (server, _events) = start(limits).await;
    let mut stalled = ws_connect(server.local_addr(), PATH).await;
    raw(&mut stalled)
        .write_all(&frame_header(1 << 20))
        .await
        .unwrap();
    raw(&mut stalled)
        .write_all(&vec![0u8; 64 << 10])
        .await
        .unwrap();
    assert_eq!(ws_close_code(&mut stalled).await, Some(1008));
    eventually(|| server.service().incomplete_bytes() == 0).await;
    server.shutdown().await;
}

/// Sends the head of a POST declaring `declared` body bytes, and `sent` of them.
async fn partial_post(addr: SocketAddr, declared: usize, sent: usize) -> TcpStream {
    let mut tcp = within(TcpStream::connect(addr)).await.unwrap();
    let head = format!(
        "POST {PATH} HTTP/1.1\r\nhost: localhost\r\ncontent-type: application/x-protobuf\r\n\
         content-length: {declared}\r\n\r\n"
    );
    tcp.write_all(head.as_bytes()).await.unwrap();
    tcp.write_all(&vec![0u8; sent]).await.unwrap();
    tcp
}

/// Reads until the end of a response head (or EOF).
async fn response_head(tcp: &mut TcpStream) -> String {
    let mut buf = Vec::new();
    within(async {
        let mut chunk = [0u8; 1024];
        while !buf.windows(4).any(|w| w == b"\r\n\r\n") {
            match tcp.read(&mut chunk).await {
                Ok(0) | Err(_) => break,
                Ok(n) => buf.extend_from_slice(&chunk[..n]),
            }
        }
    })
    .await;
    String::from_utf8_lossy(&buf).into_owned()
}

/// Stalled POST bodies hold the budget: a new large body is refused with 503 and
/// `Retry-After` (THR-5) while small polls pass; afterwards a large legitimate body works.
#[tokio::test]
async fn http_budget_refuses_large_bodies_with_503_retry_after() {
    let limits = ConnectionLimits::default().with_max_incomplete_bytes(1 << 20);
    let (server, _events) = start(limits).await;
    let addr = server.local_addr();
    let service = server.service().clone();
    let stalled = partial_post(addr, 1000 << 10, 900 << 10).await;
    eventually(|| service.incomplete_bytes() >= 900 << 10).await;

    let mut refused = partial_post(addr, 300 << 10, 0).await;
    let head = response_head(&mut refused).await;
    assert!(head.starts_with("HTTP/1.1 503"), "{head:?}");
    assert!(
        head.to_ascii_lowercase().contains("retry-after: 30"),
        "{head:?}"
    );

    poll(addr, PATH, &first_report(uid(1))).await;

    drop(stalled);
    eventually(|| service.incomplete_bytes() == 0).await;
    let msg = large_report(2, 900 << 10);
    let resp = http_post(addr, post(PATH, msg.encode_to_vec(), &[])).await;
    assert_eq!(&resp.message().instance_uid[..], uid(2).as_array());
    server.shutdown().await;
}

/// A stalled POST body gets 408 once it falls behind the pace floor, well before the
/// 30 s `http_body_timeout`.
#[tokio::test]
async fn http_stalled_body_gets_408_at_the_pace_floor() {
    let limits = ConnectionLimits::default()
        .with_read_grace(Duration::from_millis(200))
        .with_min_read_rate(1 << 20);
    let (server, _events) = start(limits).await;
    let mut tcp = partial_post(server.local_addr(), 1 << 20, 100 << 10).await;
    let head = response_head(&mut tcp).await;
    assert!(head.starts_with("HTTP/1.1 408"), "{head:?}");
    eventually(|| server.service().incomplete_bytes() == 0).await;
    server.shutdown().await;
}

/// A body whose first bytes came fast and then stop gets 408 once the gap since its last
/// byte passes `read_grace`, not after its average-pace credit (64 s here) or the 30 s
/// `http_body_timeout`.
#[tokio::test]
async fn http_body_stalled_after_a_fast_start_gets_408_at_the_gap_bound() {
    let limits = ConnectionLimits::default()
        .with_read_grace(Duration::from_millis(500))
        .with_min_read_rate(1 << 10);
    let (server, _events) = start(limits).await;
    let mut tcp = partial_post(server.local_addr(), 1 << 20, 64 << 10).await;
    let head = response_head(&mut tcp).await;
    assert!(head.starts_with("HTTP/1.1 408"), "{head:?}");
    eventually(|| server.service().incomplete_bytes() == 0).await;
    server.shutdown().await;
}

/// Floods: a message in 1-byte fragments is assembled and answered; a flood of pings is
/// answered; a good agent is served meanwhile.
#[tokio::test]
async fn ws_tiny_frame_and_ping_floods_keep_the_server_serving() {
    let (server, _events) = start(ConnectionLimits::default()).await;
    let addr = server.local_addr();
    let mut flood = ws_connect(addr, PATH).await;
    let frame = framing::encode(&large_report(1, 4000));
    let last = frame.len() - 1;
    let flooding = async {
        for (i, byte) in frame.iter().enumerate() {
            let opcode = if i == 0 { Data::Binary } else { Data::Continue };
            let f = Frame::message(
                Bytes::copy_from_slice(&[*byte]),
                OpCode::Data(opcode),
                i == last,
            );
            flood.feed(WsMessage::Frame(f)).await.unwrap();
        }
        for _ in 0..10_000 {
            flood.feed(WsMessage::Ping(Bytes::new())).await.unwrap();
        }
        flood.flush().await.unwrap();
        let reply = ws_recv(&mut flood).await;
        assert_eq!(&reply.instance_uid[..], uid(1).as_array());
        // The Pongs come back, then an answer to the next message.
        ws_send(&mut flood, &report(uid(1), 1)).await;
        let reply = ws_recv(&mut flood).await;
        assert_eq!(&reply.instance_uid[..], uid(1).as_array());
    };
    let agent = async {
        let mut agent = good_ws_agent(addr, 2).await;
        still_served(&mut agent, 2).await;
    };
    within(async { tokio::join!(flooding, agent) }).await;
    drop(flood);
    server.shutdown().await;
}

/// Reads until EOF or `count` response heads were seen.
async fn responses(tcp: &mut TcpStream, count: usize) -> String {
    let mut buf = Vec::new();
    within(async {
        let mut chunk = [0u8; 4096];
        loop {
            let text = String::from_utf8_lossy(&buf).into_owned();
            if text.matches("HTTP/1.").count() >= count {
                break;
            }
            match tcp.read(&mut chunk).await {
                Ok(0) | Err(_) => break,
                Ok(n) => buf.extend_from_slice(&chunk[..n]),
            }
        }
    })
    .await;
    String::from_utf8_lossy(&buf).into_owned()
}

/// Pipelined requests get their answers in order; a body in one-byte chunks is assembled;
/// an HTTP/1.0 poll is answered; an HTTP/1.0 upgrade is refused with 400 (RFC 6455 needs
/// HTTP/1.1; it used to get 500).
#[tokio::test]
async fn http_pipelined_and_http_1_0_requests() {
    let (server, _events) = start(ConnectionLimits::default()).await;
    let addr = server.local_addr();
    let mut pipelined = Vec::new();
    for n in 1..=3u8 {
        let body = first_report(uid(n)).encode_to_vec();
        pipelined.extend_from_slice(
            format!(
                "POST {PATH} HTTP/1.1\r\nhost: localhost\r\ncontent-type: application/x-protobuf\r\n\
                 content-length: {}\r\n\r\n",
                body.len()
            )
            .as_bytes(),
        );
        pipelined.extend_from_slice(&body);
    }
    let mut tcp = within(TcpStream::connect(addr)).await.unwrap();
    tcp.write_all(&pipelined).await.unwrap();
    let text = responses(&mut tcp, 3).await;
    assert_eq!(text.matches("HTTP/1.1 200 OK").count(), 3, "{text:?}");
    assert_eq!(server.service().plain_http_sessions(), 3);

    // A body in one-byte chunks is assembled.
    let body = large_report(5, 3000).encode_to_vec();
    let mut chunked = format!(
        "POST {PATH} HTTP/1.1\r\nhost: localhost\r\ncontent-type: application/x-protobuf\r\n\
         transfer-encoding: chunked\r\n\r\n"
    )
    .into_bytes();
    for byte in &body {
        chunked.extend_from_slice(b"1\r\n");
        chunked.push(*byte);
        chunked.extend_from_slice(b"\r\n");
    }
    chunked.extend_from_slice(b"0\r\n\r\n");
    let mut tcp = within(TcpStream::connect(addr)).await.unwrap();
    tcp.write_all(&chunked).await.unwrap();
    let text = responses(&mut tcp, 1).await;
    assert!(text.starts_with("HTTP/1.1 200 OK"), "{text:?}");
    assert_eq!(server.service().plain_http_sessions(), 4);

    let body = first_report(uid(4)).encode_to_vec();
    let mut tcp = within(TcpStream::connect(addr)).await.unwrap();
    tcp.write_all(
        format!(
            "POST {PATH} HTTP/1.0\r\ncontent-type: application/x-protobuf\r\ncontent-length: {}\r\n\r\n",
            body.len()
        )
        .as_bytes(),
    )
    .await
    .unwrap();
    tcp.write_all(&body).await.unwrap();
    let text = responses(&mut tcp, 2).await;
    assert!(text.contains(" 200 OK"), "{text:?}");

    let mut tcp = within(TcpStream::connect(addr)).await.unwrap();
    tcp.write_all(
        format!(
            "GET {PATH} HTTP/1.0\r\nhost: localhost\r\nconnection: upgrade\r\nupgrade: websocket\r\n\
             sec-websocket-version: 13\r\nsec-websocket-key: dGhlIHNhbXBsZSBub25jZQ==\r\n\r\n"
        )
        .as_bytes(),
    )
    .await
    .unwrap();
    let text = responses(&mut tcp, 2).await;
    assert!(
        text.starts_with("HTTP/1.0 400") || text.starts_with("HTTP/1.1 400"),
        "{text:?}"
    );
    server.shutdown().await;
}

/// Decompression bombs: `Content-Encoding: deflate` (not an OpAMP coding, HTTP-3) gets 415
/// whatever it holds; gzip inside gzip is decompressed once (bounded) and is then invalid
/// (400); a gzip bomb gets 413 (HTTP-14). A good poll is served after them.
#[tokio::test]
async fn http_3_deflate_and_nested_gzip_bombs_are_refused() {
    let (rec, _events) = Recorder::quiet();
    let config = loopback_config().max_message_size(1 << 20).build().unwrap();
    let server = Server::bind(config, rec.server_callbacks()).await.unwrap();
    let addr = server.local_addr();
    let bomb = opamp_transport::gzip::compress(&vec![0u8; 16 << 20]);
    for (coding, body, status) in [
        ("deflate", bomb.clone(), 415),
        ("deflate, gzip", bomb.clone(), 415),
        ("gzip", opamp_transport::gzip::compress(&bomb), 400),
        ("gzip", bomb.clone(), 413),
    ] {
        let resp = http_post(addr, post(PATH, body, &[("content-encoding", coding)])).await;
        assert_eq!(resp.status.as_u16(), status, "{coding}");
    }
    poll(addr, PATH, &first_report(uid(1))).await;
    server.shutdown().await;
}

/// HB-5: a plain-HTTP agent polls at the heartbeat interval the server offered; its session
/// lives `heartbeat_timeout_factor` such intervals (as a WebSocket agent's read-idle timeout
/// does), not just `http_idle_timeout`. Before the fix an offer of 10 s against a 300 ms idle
/// timeout had the session forgotten between every two polls.
#[tokio::test]
async fn hb_5_plain_http_session_lives_as_long_as_the_offered_polling_interval() {
    use opamp_proto::{
        AgentCapabilitySet, ConnectionSettingsOffers, OpAmpConnectionSettings, ServerToAgent,
    };
    let (rec, mut events) = Recorder::with_reply(|_, msg| {
        (msg.instance_uid[..] == uid(1).as_array()[..]).then(|| ServerToAgent {
            connection_settings: Some(ConnectionSettingsOffers {
                hash: Bytes::from_static(b"h"),
                opamp: Some(OpAmpConnectionSettings {
                    heartbeat_interval_seconds: 10,
                    ..Default::default()
                }),
                ..Default::default()
            }),
            ..Default::default()
        })
    });
    let config = loopback_config()
        .http_idle_timeout(Duration::from_millis(300))
        .build()
        .unwrap();
    let server = Server::bind(config, rec.server_callbacks()).await.unwrap();
    let addr = server.local_addr();
    let mut msg = first_report(uid(1));
    msg.capabilities |= (AgentCapabilitySet::REPORTS_HEARTBEAT
        | AgentCapabilitySet::ACCEPTS_OPAMP_CONNECTION_SETTINGS)
        .bits();
    let reply = poll(addr, PATH, &msg).await;
    let offered = reply.connection_settings.unwrap().opamp.unwrap();
    assert_eq!(offered.heartbeat_interval_seconds, 10);
    let Event::Connected(agent) = next_non_message(&mut events).await else {
        panic!("expected Connected")
    };
    // A second agent, offered nothing, expires after 300 ms: the sweeper has looked at both.
    poll(addr, PATH, &first_report(uid(2))).await;
    assert!(matches!(
        next_non_message(&mut events).await,
        Event::Connected(_)
    ));
    let Event::Closed(expired) = next_non_message(&mut events).await else {
        panic!("expected Closed")
    };
    assert_eq!(expired.instance_uid(), Some(uid(2)));
    assert!(
        !agent.is_closed(),
        "the agent polling every 10 s keeps its session"
    );
    assert_eq!(server.service().plain_http_sessions(), 1);
    server.shutdown().await;
}

/// A report of `n` tiny attributes: about 15 bytes each on the wire, ten times that decoded.
fn many_attributes_report(id: u8, n: usize) -> opamp_proto::AgentToServer {
    let mut msg = first_report(uid(id));
    msg.agent_description = Some(AgentDescription {
        identifying_attributes: vec![],
        non_identifying_attributes: (0..n)
            .map(|i| KeyValue {
                key: format!("{i:06x}"),
                value: Some(AnyValue {
                    value: Some(any_value::Value::StringValue("b".into())),
                }),
            })
            .collect(),
    });
    msg
}

/// A message within the size limit that decodes into more elements than
/// `max_message_elements` is refused before it is decoded: BAD_REQUEST over WebSocket (the
/// connection goes on), 400 over plain HTTP; the same agent's normal report then works.
/// Before the fix a 60 MiB message of 4 million attributes was decoded (~600 MiB).
#[tokio::test]
async fn messages_with_too_many_elements_are_refused_before_decoding() {
    let (rec, _events) = Recorder::quiet();
    let config = loopback_config()
        .max_message_elements(1000)
        .build()
        .unwrap();
    let server = Server::bind(config, rec.server_callbacks()).await.unwrap();
    let addr = server.local_addr();

    let mut ws = ws_connect(addr, PATH).await;
    ws_send(&mut ws, &many_attributes_report(1, 2000)).await;
    let reply = ws_recv(&mut ws).await;
    let error = reply.error_response.expect("an error response");
    assert_eq!(
        error.r#type,
        opamp_proto::ServerErrorResponseType::BadRequest as i32
    );
    assert!(error.error_message.contains("1000 elements"), "{error:?}");
    ws_send(&mut ws, &many_attributes_report(1, 100)).await;
    let reply = ws_recv(&mut ws).await;
    assert!(reply.error_response.is_none(), "{reply:?}");
    assert_eq!(&reply.instance_uid[..], uid(1).as_array());

    let resp = http_post(
        addr,
        post(PATH, many_attributes_report(2, 2000).encode_to_vec(), &[]),
    )
    .await;
    assert_eq!(resp.status, 400);
    let msg = poll(addr, PATH, &many_attributes_report(2, 100)).await;
    assert_eq!(&msg.instance_uid[..], uid(2).as_array());
    drop(ws);
    server.shutdown().await;
}
