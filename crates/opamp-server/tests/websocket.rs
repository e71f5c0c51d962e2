//! WebSocket transport over real loopback sockets.
#![allow(clippy::unwrap_used)]

mod common;

use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::Duration;

use bytes::Bytes;
use common::*;
use futures_util::{SinkExt, StreamExt};
use opamp_proto::{
    AgentRemoteConfig, AgentToServerFlagSet, ServerCapabilitySet, ServerErrorResponseType,
    ServerToAgent, ServerToAgentFlagSet, framing, server_error_response::Details,
};
use opamp_server::{Server, Transport, unavailable};
use tokio_tungstenite::tungstenite::Message as WsMessage;

const PATH: &str = "/v1/opamp";

async fn start(recorder: &Recorder) -> Server {
    Server::bind(
        loopback_config().build().unwrap(),
        recorder.server_callbacks(),
    )
    .await
    .unwrap()
}

fn remote_config(hash: &'static [u8]) -> ServerToAgent {
    ServerToAgent {
        remote_config: Some(AgentRemoteConfig {
            config: None,
            config_hash: Bytes::from_static(hash),
        }),
        ..Default::default()
    }
}

#[tokio::test]
async fn ws_upgrade_and_first_exchange() {
    let (rec, mut events) = Recorder::new();
    let server = start(&rec).await;
    let mut ws = ws_connect(server.local_addr(), PATH).await;
    let Event::Connected(conn) = next_event(&mut events).await else {
        panic!("expected Connected")
    };
    assert_eq!(conn.transport(), Transport::WebSocket);
    assert!(conn.remote_addr().unwrap().ip().is_loopback());
    assert_eq!(conn.instance_uid(), None);

    // An unknown agent without full state is asked for it (SEQ-2); CAP-3 in the first reply.
    ws_send(&mut ws, &report(uid(1), 5)).await;
    let reply = ws_recv(&mut ws).await;
    assert_eq!(&reply.instance_uid[..], uid(1).as_array(), "UID-6");
    let caps = ServerCapabilitySet::from_bits_retain(reply.capabilities);
    assert!(caps.contains(ServerCapabilitySet::ACCEPTS_STATUS), "CAP-3");
    assert!(
        ServerToAgentFlagSet::from_bits_retain(reply.flags)
            .contains(ServerToAgentFlagSet::REPORT_FULL_STATE)
    );
    let Event::Message(c, msg) = next_event(&mut events).await else {
        panic!("expected Message")
    };
    assert_eq!(msg.sequence_num, 5);
    assert_eq!(c.instance_uid(), Some(uid(1)));

    // REP-4: the next message is acknowledged; capabilities only in the first (CAP-3).
    ws_send(&mut ws, &first_report(uid(1))).await;
    let reply = ws_recv(&mut ws).await;
    assert_eq!(reply.capabilities, 0);
    assert_eq!(&reply.instance_uid[..], uid(1).as_array());

    ws.close(None).await.unwrap();
    assert!(matches!(
        next_non_message(&mut events).await,
        Event::Closed(_)
    ));
    assert_eq!(
        rec.overlaps(),
        0,
        "callbacks of one connection never overlap"
    );
    drop(ws);
    server.shutdown().await;
}

#[tokio::test]
async fn uid_5_server_assigns_instance_uid_over_websocket() {
    let (rec, _events) = Recorder::new();
    let server = start(&rec).await;
    let mut ws = ws_connect(server.local_addr(), PATH).await;
    let mut msg = first_report(uid(2));
    msg.flags = AgentToServerFlagSet::REQUEST_INSTANCE_UID.bits();
    ws_send(&mut ws, &msg).await;
    let reply = ws_recv(&mut ws).await;
    let new = reply.agent_identification.expect("UID-5").new_instance_uid;
    assert_eq!(new.len(), 16);
    assert_ne!(&new[..], uid(2).as_array());
    drop(ws);
    server.shutdown().await;
}

#[tokio::test]
async fn ws_1_text_frame_is_malformed_and_gets_bad_request() {
    let (rec, mut events) = Recorder::new();
    let server = start(&rec).await;
    let mut ws = ws_connect(server.local_addr(), PATH).await;
    next_event(&mut events).await;
    within(ws.send(WsMessage::Text("hello".into())))
        .await
        .unwrap();
    let reply = ws_recv(&mut ws).await;
    let err = reply.error_response.expect("ERR-1");
    assert_eq!(err.r#type(), ServerErrorResponseType::BadRequest);
    assert!(matches!(
        next_event(&mut events).await,
        Event::ReadError(opamp_server::ReadMessageError::TextFrame)
    ));
    // The connection stays usable.
    ws_send(&mut ws, &first_report(uid(3))).await;
    assert!(ws_recv(&mut ws).await.error_response.is_none());
    drop(ws);
    server.shutdown().await;
}

#[tokio::test]
async fn ws_4_non_zero_header_and_garbage_get_bad_request() {
    let (rec, mut events) = Recorder::new();
    let server = start(&rec).await;
    let mut ws = ws_connect(server.local_addr(), PATH).await;
    next_event(&mut events).await;
    ws_send(&mut ws, &first_report(uid(4))).await;
    ws_recv(&mut ws).await;
    next_event(&mut events).await;

    for bad in [
        vec![0x01, 0x0a, 0x00],          // header 1 (WS-4)
        vec![0x80],                      // truncated header
        vec![0x00, 0xff, 0xff, 0xff],    // undecodable protobuf
        vec![],                          // empty message
        vec![0x00, 0x0a, 0x03, 1, 2, 3], // instance_uid of 3 bytes (UID-2)
    ] {
        within(ws.send(WsMessage::Binary(Bytes::from(bad.clone()))))
            .await
            .unwrap();
        let reply = ws_recv(&mut ws).await;
        let err = reply.error_response.unwrap_or_else(|| panic!("{bad:?}"));
        assert_eq!(err.r#type(), ServerErrorResponseType::BadRequest);
        assert_eq!(&reply.instance_uid[..], uid(4).as_array());
        assert!(matches!(next_event(&mut events).await, Event::ReadError(_)));
    }
    drop(ws);
    server.shutdown().await;
}

#[tokio::test]
async fn ws_9_oversized_message_closes_with_1009() {
    let (rec, mut events) = Recorder::new();
    let config = loopback_config().max_message_size(1024).build().unwrap();
    let server = Server::bind(config, rec.server_callbacks()).await.unwrap();
    let mut ws = ws_connect(server.local_addr(), PATH).await;
    next_event(&mut events).await;
    within(ws.send(WsMessage::Binary(Bytes::from(vec![0u8; 2048]))))
        .await
        .unwrap();
    assert_eq!(ws_close_code(&mut ws).await, Some(1009));
    assert!(matches!(
        next_event(&mut events).await,
        Event::ReadError(opamp_server::ReadMessageError::Decode(
            opamp_proto::DecodeError::TooLarge(_)
        ))
    ));
    assert!(matches!(next_event(&mut events).await, Event::Closed(_)));

    // A message exactly at the limit is fine (WS-8 counts the header).
    let mut ws = ws_connect(server.local_addr(), PATH).await;
    let mut msg = first_report(uid(5));
    let base = framing::encode(&msg).len();
    msg.agent_description = Some(opamp_proto::AgentDescription {
        identifying_attributes: vec![opamp_proto::KeyValue {
            key: "k".repeat(1024 - base - 8),
            value: None,
        }],
        ..Default::default()
    });
    let len = framing::encode(&msg).len();
    assert!(len <= 1024 && len > 1000, "{len}");
    ws_send(&mut ws, &msg).await;
    assert!(ws_recv(&mut ws).await.error_response.is_none());
    drop(ws);
    server.shutdown().await;
}

#[tokio::test]
async fn ws_15_pings_are_answered() {
    let (rec, _events) = Recorder::new();
    let server = start(&rec).await;
    let mut ws = ws_connect(server.local_addr(), PATH).await;
    within(ws.send(WsMessage::Ping(Bytes::from_static(b"hi"))))
        .await
        .unwrap();
    match within(ws.next()).await {
        Some(Ok(WsMessage::Pong(data))) => assert_eq!(&data[..], b"hi"),
        other => panic!("expected a pong, got {other:?}"),
    }
    drop(ws);
    server.shutdown().await;
}

#[tokio::test]
async fn ws_push_through_connection_send_is_gated_and_deduplicated() {
    let (rec, mut events) = Recorder::new();
    let server = start(&rec).await;
    let mut ws = ws_connect(server.local_addr(), PATH).await;
    let Event::Connected(conn) = next_event(&mut events).await else {
        panic!()
    };
    // Before the first message, a push is held and rides on the first reply.
    conn.send(remote_config(b"h1")).unwrap();
    ws_send(&mut ws, &first_report(uid(6))).await;
    let first = ws_recv(&mut ws).await;
    assert_eq!(
        first.remote_config.unwrap().config_hash,
        Bytes::from_static(b"h1")
    );
    assert_ne!(first.capabilities, 0);

    // RC-4: the same config again is not re-sent; a new one is pushed at once.
    conn.send(remote_config(b"h1")).unwrap();
    conn.send(remote_config(b"h2")).unwrap();
    let pushed = ws_recv(&mut ws).await;
    assert_eq!(
        pushed.remote_config.unwrap().config_hash,
        Bytes::from_static(b"h2")
    );
    assert_eq!(&pushed.instance_uid[..], uid(6).as_array());
    drop(ws);
    server.shutdown().await;
}

#[tokio::test]
async fn thr_1_unavailable_reply_with_retry_info() {
    let (rec, _events) =
        Recorder::with_reply(|_, _| Some(unavailable("busy", Some(Duration::from_secs(3)))));
    let server = start(&rec).await;
    let mut ws = ws_connect(server.local_addr(), PATH).await;
    ws_send(&mut ws, &first_report(uid(7))).await;
    let reply = ws_recv(&mut ws).await;
    let err = reply.error_response.unwrap();
    assert_eq!(err.r#type(), ServerErrorResponseType::Unavailable);
    assert_eq!(
        err.details,
        Some(Details::RetryInfo(opamp_proto::RetryInfo {
            retry_after_nanoseconds: 3_000_000_000
        }))
    );
    assert_eq!(reply.capabilities, 0, "S2A-1: error is exclusive");
    drop(ws);
    server.shutdown().await;
}

#[tokio::test]
async fn auth_2_upgrade_rejected_with_401_and_503_retry_after() {
    let (rec, _events) = Recorder::new();
    let server = start(&rec).await;
    let err = ws_connect_with(server.local_addr(), PATH, Some("Bearer bad"))
        .await
        .unwrap_err();
    match err {
        tokio_tungstenite::tungstenite::Error::Http(resp) => assert_eq!(resp.status(), 401),
        other => panic!("{other:?}"),
    }
    let err = ws_connect_with(server.local_addr(), PATH, Some("Bearer busy"))
        .await
        .unwrap_err();
    match err {
        tokio_tungstenite::tungstenite::Error::Http(resp) => {
            assert_eq!(resp.status(), 503);
            assert_eq!(resp.headers()["retry-after"], "7", "THR-5");
        }
        other => panic!("{other:?}"),
    }
    server.shutdown().await;
}

#[tokio::test]
async fn ws_17_disconnect_sends_close_1000_and_stop_sends_1001() {
    let (rec, mut events) = Recorder::new();
    let server = start(&rec).await;
    let mut ws = ws_connect(server.local_addr(), PATH).await;
    let Event::Connected(conn) = next_event(&mut events).await else {
        panic!()
    };
    conn.disconnect();
    assert_eq!(ws_close_code(&mut ws).await, Some(1000));
    assert!(matches!(next_event(&mut events).await, Event::Closed(_)));
    assert!(matches!(
        conn.send(ServerToAgent::default()),
        Err(opamp_server::SendError::Closed(_))
    ));

    // Graceful stop: Close 1001 to every agent, then no new connections.
    let mut a = ws_connect(server.local_addr(), PATH).await;
    let mut b = ws_connect(server.local_addr(), PATH).await;
    ws_send(&mut a, &first_report(uid(8))).await;
    ws_recv(&mut a).await;
    let addr = server.local_addr();
    let stopping = tokio::spawn(server.shutdown());
    assert_eq!(ws_close_code(&mut a).await, Some(1001));
    assert_eq!(ws_close_code(&mut b).await, Some(1001));
    within(stopping).await.unwrap();
    assert!(tokio::net::TcpStream::connect(addr).await.is_err());
}

#[tokio::test]
async fn stop_from_inside_a_callback_does_not_deadlock() {
    let handle_slot: Arc<std::sync::OnceLock<opamp_server::ServerHandle>> = Arc::default();
    let slot = handle_slot.clone();
    let (rec, mut events) = Recorder::with_reply(move |_, _| {
        slot.get().unwrap().stop();
        None
    });
    let server = start(&rec).await;
    handle_slot.set(server.handle()).unwrap();
    let mut ws = ws_connect(server.local_addr(), PATH).await;
    ws_send(&mut ws, &first_report(uid(9))).await;
    // The reply of the callback in flight still goes out, then the close.
    let reply = ws_recv(&mut ws).await;
    assert_eq!(&reply.instance_uid[..], uid(9).as_array());
    assert_eq!(ws_close_code(&mut ws).await, Some(1001));
    within(server.shutdown()).await;
    let mut closed = false;
    while let Ok(e) = events.try_recv() {
        closed |= matches!(e, Event::Closed(_));
    }
    assert!(closed);
}

#[tokio::test]
async fn ws_send_queue_is_bounded_for_a_slow_reader() {
    // The agent never reads; the server must not buffer without bound.
    let (rec, mut events) = Recorder::new();
    let config = loopback_config()
        .outbound_queue_capacity(4)
        .build()
        .unwrap();
    let server = Server::bind(config, rec.server_callbacks()).await.unwrap();
    let mut ws = ws_connect(server.local_addr(), PATH).await;
    let Event::Connected(conn) = next_event(&mut events).await else {
        panic!()
    };
    ws_send(&mut ws, &first_report(uid(10))).await;
    ws_recv(&mut ws).await;
    let big = ServerToAgent {
        remote_config: Some(AgentRemoteConfig {
            config: Some(opamp_proto::AgentConfigMap {
                config_map: [(
                    String::new(),
                    opamp_proto::AgentConfigObject {
                        body: Bytes::from(vec![b'x'; 256 * 1024]),
                        content_type: String::new(),
                        ..Default::default()
                    },
                )]
                .into(),
            }),
            config_hash: Bytes::new(), // no hash: never deduplicated
        }),
        ..Default::default()
    };
    let mut full = false;
    for _ in 0..10_000 {
        match conn.send(big.clone()) {
            Ok(()) => tokio::task::yield_now().await,
            Err(opamp_server::SendError::QueueFull(_)) => {
                full = true;
                break;
            }
            Err(e) => panic!("{e}"),
        }
    }
    assert!(full, "the queue filled up instead of growing");
    drop(ws);
    server.shutdown().await;
}

#[tokio::test]
async fn ws_send_races_replies_without_corrupting_frames() {
    const AGENTS: usize = 20;
    const MESSAGES: u64 = 50;
    const PUSHES: usize = 50;
    let (rec, mut events) = Recorder::with_reply(|_, msg| {
        // Every reply carries a remote config whose hash names the sequence number.
        Some(ServerToAgent {
            remote_config: Some(AgentRemoteConfig {
                config: None,
                config_hash: Bytes::from(format!("reply-{}", msg.sequence_num)),
            }),
            ..Default::default()
        })
    });
    let server = start(&rec).await;
    let addr = server.local_addr();

    let pushers = tokio::spawn(async move {
        let mut tasks = Vec::new();
        for _ in 0..AGENTS {
            let Event::Connected(conn) = next_non_message(&mut events).await else {
                panic!()
            };
            tasks.push(tokio::spawn(async move {
                // Pushes before the first message would be coalesced into the first reply;
                // start once the agent is known.
                within(async {
                    while conn.instance_uid().is_none() {
                        tokio::task::yield_now().await;
                    }
                })
                .await;
                for i in 0..PUSHES {
                    let push = ServerToAgent {
                        remote_config: Some(AgentRemoteConfig {
                            config: None,
                            config_hash: Bytes::from(format!("push-{i}")),
                        }),
                        ..Default::default()
                    };
                    conn.send_async(push).await.unwrap();
                }
            }));
        }
        for t in tasks {
            t.await.unwrap();
        }
    });

    let mut agents = Vec::new();
    for n in 0..AGENTS {
        agents.push(tokio::spawn(async move {
            let id = uid(100 + n as u8);
            let mut ws = ws_connect(addr, PATH).await;
            let (mut replies, mut pushes) = (0u64, 0usize);
            ws_send(&mut ws, &first_report(id)).await;
            let mut seq = 0;
            while replies < MESSAGES || pushes < PUSHES {
                // Every frame decodes; replies come in order, one per message.
                let msg = ws_recv(&mut ws).await;
                assert_eq!(&msg.instance_uid[..], id.as_array());
                let hash = msg.remote_config.expect("payload").config_hash;
                let hash = std::str::from_utf8(&hash).unwrap().to_owned();
                if let Some(n) = hash.strip_prefix("reply-") {
                    assert_eq!(n.parse::<u64>().unwrap(), seq);
                    replies += 1;
                    if replies < MESSAGES {
                        seq += 1;
                        ws_send(&mut ws, &report(id, seq)).await;
                    }
                } else {
                    assert_eq!(hash, format!("push-{pushes}"), "pushes keep their order");
                    pushes += 1;
                }
            }
        }));
    }
    for a in agents {
        within(a).await.unwrap();
    }
    within(pushers).await.unwrap();
    server.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn ws_1000_concurrent_agents_exchange_messages() {
    const AGENTS: usize = 1000;
    let (rec, mut events) = Recorder::quiet();
    let server = start(&rec).await;
    let addr = server.local_addr();
    let done = Arc::new(AtomicUsize::new(0));
    let barrier = Arc::new(tokio::sync::Barrier::new(AGENTS));

    let mut agents = Vec::with_capacity(AGENTS);
    for n in 0..AGENTS {
        let done = done.clone();
        let barrier = barrier.clone();
        agents.push(tokio::spawn(async move {
            let mut bytes = [0u8; 16];
            bytes[..8].copy_from_slice(&(n as u64).to_be_bytes());
            let id = opamp_proto::InstanceUid::from_array(bytes);
            let mut ws = ws_connect(addr, PATH).await;
            // All connected at once before anyone talks.
            barrier.wait().await;
            for seq in 0..3 {
                let msg = if seq == 0 {
                    first_report(id)
                } else {
                    report(id, seq)
                };
                ws_send(&mut ws, &msg).await;
                let reply = ws_recv(&mut ws).await;
                assert_eq!(&reply.instance_uid[..], id.as_array());
                assert!(reply.error_response.is_none());
            }
            done.fetch_add(1, Ordering::SeqCst);
            barrier.wait().await;
            ws.close(None).await.unwrap();
        }));
    }
    let mut connected = 0;
    while connected < AGENTS {
        if let Event::Connected(_) = next_event(&mut events).await {
            connected += 1;
        }
    }
    assert!(server.service().active_connections() >= AGENTS);
    for a in agents {
        within(a).await.unwrap();
    }
    assert_eq!(done.load(Ordering::SeqCst), AGENTS);
    within(server.shutdown()).await;
}

/// A config encoded once reaches every agent with the agent's own uid, and a large one goes
/// out in frames no larger than the default fragment size: these clients refuse any frame
/// over it, yet receive a 64 KiB config whole.
#[tokio::test]
async fn shared_push_reaches_every_agent_fragmented_and_intact() {
    use opamp_proto::{AgentConfigMap, AgentConfigObject, Message};
    use tokio_tungstenite::tungstenite::protocol::WebSocketConfig;

    let (rec, mut events) = Recorder::new();
    let server = start(&rec).await;
    let addr = server.local_addr();
    let mut agents = Vec::new();
    for n in 0..3u8 {
        let tcp = within(tokio::net::TcpStream::connect(addr)).await.unwrap();
        let config = WebSocketConfig::default()
            .max_frame_size(Some(opamp_server::DEFAULT_WS_WRITE_FRAGMENT_SIZE))
            .max_message_size(Some(1 << 20));
        let (mut ws, _) = within(tokio_tungstenite::client_async_with_config(
            format!("ws://{addr}{PATH}"),
            tcp,
            Some(config),
        ))
        .await
        .unwrap();
        ws_send(&mut ws, &first_report(uid(100 + n))).await;
        let _ack = ws_recv(&mut ws).await;
        agents.push(ws);
    }
    let mut conns = Vec::new();
    while conns.len() < 3 {
        if let Event::Connected(conn) = next_event(&mut events).await {
            conns.push(conn);
        }
    }

    let body: Vec<u8> = (0..64 * 1024).map(|i| (i % 251) as u8).collect();
    let mut map = AgentConfigMap::default();
    map.config_map.insert(
        String::new(),
        AgentConfigObject {
            body: Bytes::from(body.clone()),
            content_type: "text/plain".into(),
            ..Default::default()
        },
    );
    let shared = opamp_server::SharedMessage::new(ServerToAgent {
        remote_config: Some(AgentRemoteConfig {
            config: Some(map),
            config_hash: Bytes::from_static(b"big"),
        }),
        ..Default::default()
    });
    for conn in &conns {
        conn.send_shared(&shared).unwrap();
    }
    let mut seen = Vec::new();
    for ws in &mut agents {
        let msg = ws_recv(ws).await;
        let rc = msg.remote_config.clone().unwrap();
        assert_eq!(rc.config_hash, Bytes::from_static(b"big"));
        assert_eq!(
            rc.config.unwrap().config_map[""].body,
            Bytes::from(body.clone())
        );
        // The bytes on the wire decode the same with our prost types re-encoding them: the
        // per-agent fields and the shared ones do not overlap.
        assert_eq!(
            ServerToAgent::decode(&msg.encode_to_vec()[..]).unwrap(),
            msg
        );
        seen.push(InstanceUidBytes(msg.instance_uid));
    }
    seen.sort_by(|a, b| a.0.cmp(&b.0));
    let want: Vec<_> = (0..3u8)
        .map(|n| InstanceUidBytes(uid(100 + n).to_bytes()))
        .collect();
    assert_eq!(seen, want, "UID-6: each agent gets its own uid");
    drop(agents);
    server.shutdown().await;
}

#[derive(Debug, PartialEq)]
struct InstanceUidBytes(Bytes);

/// S2A-2 over WebSocket: a reply carrying a Restart command and a config sends the command
/// alone, and the config follows at once in its own message, without waiting for the agent
/// to speak again.
#[tokio::test]
async fn s2a2_ws_config_pushed_out_by_restart_follows_at_once() {
    use opamp_proto::{AgentCapabilitySet, ServerToAgentCommand};
    let (rec, _events) = Recorder::with_reply(|_, msg| {
        (msg.sequence_num == 0).then(|| ServerToAgent {
            command: Some(ServerToAgentCommand::default()),
            ..remote_config(b"after-restart")
        })
    });
    let server = start(&rec).await;
    let mut ws = ws_connect(server.local_addr(), PATH).await;
    let mut first = first_report(uid(40));
    first.capabilities = (caps() | AgentCapabilitySet::ACCEPTS_RESTART_COMMAND).bits();
    ws_send(&mut ws, &first).await;
    let reply = ws_recv(&mut ws).await;
    assert!(reply.command.is_some(), "the command goes first");
    assert!(
        reply.remote_config.is_none(),
        "S2A-2: the command goes alone"
    );
    // The agent says nothing more: the deferred config must still arrive.
    let next = within(ws_recv(&mut ws)).await;
    assert!(next.command.is_none());
    assert_eq!(
        next.remote_config.expect("the config follows").config_hash,
        Bytes::from_static(b"after-restart")
    );
    drop(ws);
    server.shutdown().await;
}

/// S2A-1 over WebSocket: a config queued with an error response goes out right after it.
#[tokio::test]
async fn s2a1_ws_config_pushed_out_by_error_follows_at_once() {
    let (rec, _events) = Recorder::with_reply(|_, msg| {
        (msg.sequence_num == 0).then(|| ServerToAgent {
            error_response: unavailable("busy", None).error_response,
            ..remote_config(b"after-error")
        })
    });
    let server = start(&rec).await;
    let mut ws = ws_connect(server.local_addr(), PATH).await;
    ws_send(&mut ws, &first_report(uid(41))).await;
    let reply = ws_recv(&mut ws).await;
    assert!(reply.error_response.is_some());
    assert!(reply.remote_config.is_none(), "S2A-1: the error goes alone");
    let next = within(ws_recv(&mut ws)).await;
    assert!(next.error_response.is_none());
    assert_eq!(
        next.remote_config.expect("the config follows").config_hash,
        Bytes::from_static(b"after-error")
    );
    drop(ws);
    server.shutdown().await;
}
