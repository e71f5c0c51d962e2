//! Plain-HTTP transport over real loopback sockets.
#![allow(clippy::unwrap_used)]

mod common;

use std::time::Duration;

use bytes::Bytes;
use common::*;
use http::{Request, StatusCode};
use http_body_util::Full;
use opamp_proto::{
    AgentDisconnect, AgentRemoteConfig, AgentToServerFlagSet, Message, ServerCapabilitySet,
    ServerToAgent, ServerToAgentFlagSet,
};
use opamp_server::{Server, Transport, unavailable};

const PATH: &str = "/v1/opamp";

async fn start(recorder: &Recorder) -> Server {
    Server::bind(
        loopback_config().build().unwrap(),
        recorder.server_callbacks(),
    )
    .await
    .unwrap()
}

fn remote_config(hash: &'static [u8], body_len: usize) -> ServerToAgent {
    ServerToAgent {
        remote_config: Some(AgentRemoteConfig {
            config: Some(opamp_proto::AgentConfigMap {
                config_map: [(
                    "main".to_owned(),
                    opamp_proto::AgentConfigObject {
                        body: Bytes::from(vec![b'a'; body_len]),
                        content_type: "text/yaml".to_owned(),
                        ..Default::default()
                    },
                )]
                .into(),
            }),
            config_hash: Bytes::from_static(hash),
        }),
        ..Default::default()
    }
}

#[tokio::test]
async fn http_1_poll_exchange_and_session_callbacks() {
    let (rec, mut events) = Recorder::new();
    let server = start(&rec).await;
    let addr = server.local_addr();

    let resp = http_post(addr, post(PATH, report(uid(1), 3).encode_to_vec(), &[])).await;
    assert_eq!(resp.status, StatusCode::OK);
    assert_eq!(
        resp.headers["content-type"], "application/x-protobuf",
        "exactly"
    );
    assert!(
        resp.headers.get("content-encoding").is_none(),
        "HTTP-4: not asked for"
    );
    let reply = resp.message();
    assert_eq!(&reply.instance_uid[..], uid(1).as_array(), "UID-6");
    assert!(
        ServerCapabilitySet::from_bits_retain(reply.capabilities)
            .contains(ServerCapabilitySet::ACCEPTS_STATUS),
        "CAP-3"
    );
    assert!(
        ServerToAgentFlagSet::from_bits_retain(reply.flags)
            .contains(ServerToAgentFlagSet::REPORT_FULL_STATE),
        "SEQ-2: unknown agent without description"
    );
    let Event::Connected(conn) = next_event(&mut events).await else {
        panic!("expected Connected")
    };
    assert_eq!(conn.transport(), Transport::PlainHttp);
    assert_eq!(conn.instance_uid(), Some(uid(1)));
    assert!(matches!(next_event(&mut events).await, Event::Message(..)));

    // The next poll is the same session: no new on_connected; capabilities again (CAP-3).
    let reply = poll(addr, PATH, &first_report(uid(1))).await;
    assert_ne!(reply.capabilities, 0);
    assert_eq!(reply.flags, 0);
    let Event::Message(c, _) = next_event(&mut events).await else {
        panic!("expected Message")
    };
    assert!(c.same_connection(&conn));
    assert_eq!(server.service().plain_http_sessions(), 1);

    // DIS-2: agent_disconnect ends the session after the reply.
    let mut bye = report(uid(1), 1);
    bye.agent_disconnect = Some(AgentDisconnect {});
    poll(addr, PATH, &bye).await;
    assert!(matches!(next_event(&mut events).await, Event::Message(..)));
    let Event::Closed(c) = next_event(&mut events).await else {
        panic!("expected Closed")
    };
    assert!(c.same_connection(&conn));
    assert_eq!(server.service().plain_http_sessions(), 0);
    assert_eq!(rec.overlaps(), 0);
    server.shutdown().await;
}

#[tokio::test]
async fn http_9_push_is_delivered_on_the_next_poll_coalesced() {
    let (rec, mut events) = Recorder::new();
    let server = start(&rec).await;
    let addr = server.local_addr();
    poll(addr, PATH, &first_report(uid(2))).await;
    let Event::Connected(conn) = next_event(&mut events).await else {
        panic!()
    };
    conn.send(remote_config(b"old", 10)).unwrap();
    conn.send(remote_config(b"new", 10)).unwrap();
    let reply = poll(addr, PATH, &report(uid(2), 1)).await;
    assert_eq!(
        reply.remote_config.unwrap().config_hash,
        Bytes::from_static(b"new"),
        "later send replaced the pending one"
    );
    let reply = poll(addr, PATH, &report(uid(2), 2)).await;
    assert!(reply.remote_config.is_none(), "delivered once");
    server.shutdown().await;
}

#[tokio::test]
async fn http_3_gzip_request_and_http_4_gzip_response() {
    let (rec, _events) = Recorder::with_reply(|_, _| Some(remote_config(b"h", 4096)));
    let server = start(&rec).await;
    let addr = server.local_addr();
    let body = opamp_transport::gzip::compress(&first_report(uid(3)).encode_to_vec());

    // gzip request, no Accept-Encoding: plain response.
    let resp = http_post(
        addr,
        post(PATH, body.clone(), &[("content-encoding", "gzip")]),
    )
    .await;
    assert!(resp.headers.get("content-encoding").is_none());
    assert!(resp.message().remote_config.is_some());

    // Accept-Encoding: gzip: gzip response that decodes.
    let resp = http_post(
        addr,
        post(
            PATH,
            report(uid(4), 0).encode_to_vec(),
            &[("accept-encoding", "gzip")],
        ),
    )
    .await;
    assert_eq!(resp.headers["content-encoding"], "gzip");
    assert!(resp.body.len() < 4096, "compressed");
    assert_eq!(&resp.message().instance_uid[..], uid(4).as_array());

    // q=0 refuses gzip.
    let resp = http_post(
        addr,
        post(
            PATH,
            report(uid(5), 0).encode_to_vec(),
            &[("accept-encoding", "gzip;q=0")],
        ),
    )
    .await;
    assert!(resp.headers.get("content-encoding").is_none());
    server.shutdown().await;
}

#[tokio::test]
async fn http_14_oversized_bodies_get_413_gzip_bomb_included() {
    let (rec, mut events) = Recorder::new();
    let config = loopback_config()
        .max_message_size(64 * 1024)
        .build()
        .unwrap();
    let server = Server::bind(config, rec.server_callbacks()).await.unwrap();
    let addr = server.local_addr();

    let resp = http_post(addr, post(PATH, vec![0u8; 100 * 1024], &[])).await;
    assert_eq!(resp.status, StatusCode::PAYLOAD_TOO_LARGE);

    // 10 MiB of zeros gzip to ~10 KiB: under the limit on the wire, over it unpacked.
    let bomb = opamp_transport::gzip::compress(&vec![0u8; 10 * 1024 * 1024]);
    assert!(bomb.len() < 64 * 1024);
    let resp = http_post(addr, post(PATH, bomb, &[("content-encoding", "gzip")])).await;
    assert_eq!(resp.status, StatusCode::PAYLOAD_TOO_LARGE);
    for _ in 0..2 {
        assert!(matches!(
            next_event(&mut events).await,
            Event::ReadError(opamp_server::ReadMessageError::Decode(
                opamp_proto::DecodeError::TooLarge(_)
            ))
        ));
    }
    server.shutdown().await;
}

#[tokio::test]
async fn http_2_requests_that_are_neither_get_clear_4xx() {
    let (rec, _events) = Recorder::new();
    let server = start(&rec).await;
    let addr = server.local_addr();

    let wrong_type = Request::post(PATH)
        .header("host", "localhost")
        .header("content-type", "application/json")
        .body(Full::new(Bytes::from_static(b"{}")))
        .unwrap();
    assert_eq!(
        http_post(addr, wrong_type).await.status,
        StatusCode::UNSUPPORTED_MEDIA_TYPE
    );
    let no_type = Request::post(PATH)
        .header("host", "localhost")
        .body(Full::new(Bytes::new()))
        .unwrap();
    assert_eq!(
        http_post(addr, no_type).await.status,
        StatusCode::UNSUPPORTED_MEDIA_TYPE
    );
    let plain_get = Request::get(PATH)
        .header("host", "localhost")
        .body(Full::new(Bytes::new()))
        .unwrap();
    let resp = http_post(addr, plain_get).await;
    assert_eq!(resp.status, StatusCode::UPGRADE_REQUIRED);
    assert_eq!(resp.headers["upgrade"], "websocket");
    let put = Request::put(PATH)
        .header("host", "localhost")
        .body(Full::new(Bytes::new()))
        .unwrap();
    assert_eq!(
        http_post(addr, put).await.status,
        StatusCode::METHOD_NOT_ALLOWED
    );
    let other_path = post("/elsewhere", report(uid(1), 0).encode_to_vec(), &[]);
    assert_eq!(
        http_post(addr, other_path).await.status,
        StatusCode::NOT_FOUND
    );
    let unknown_encoding = post(PATH, vec![1, 2, 3], &[("content-encoding", "br")]);
    assert_eq!(
        http_post(addr, unknown_encoding).await.status,
        StatusCode::UNSUPPORTED_MEDIA_TYPE
    );
    server.shutdown().await;
}

#[tokio::test]
async fn err_1_garbage_bodies_get_400_and_never_panic() {
    let (rec, mut events) = Recorder::new();
    let server = start(&rec).await;
    let addr = server.local_addr();
    let mut short_uid = report(uid(1), 0);
    short_uid.instance_uid = Bytes::from_static(b"abc");
    for body in [
        vec![0xff, 0xff, 0xff, 0xff],
        b"definitely not protobuf".to_vec(),
        short_uid.encode_to_vec(),
        Vec::new(), // empty message: no instance uid
    ] {
        let resp = http_post(addr, post(PATH, body.clone(), &[])).await;
        assert_eq!(resp.status, StatusCode::BAD_REQUEST, "{body:?}");
        assert!(matches!(next_event(&mut events).await, Event::ReadError(_)));
    }
    let bad_gzip = post(PATH, b"not gzip".to_vec(), &[("content-encoding", "gzip")]);
    assert_eq!(
        http_post(addr, bad_gzip).await.status,
        StatusCode::BAD_REQUEST
    );
    // The server still serves.
    poll(addr, PATH, &first_report(uid(9))).await;
    server.shutdown().await;
}

#[tokio::test]
async fn auth_2_and_thr_5_rejections() {
    let (rec, _events) = Recorder::new();
    let server = start(&rec).await;
    let addr = server.local_addr();
    let body = first_report(uid(1)).encode_to_vec();
    let resp = http_post(
        addr,
        post(PATH, body.clone(), &[("authorization", "Bearer bad")]),
    )
    .await;
    assert_eq!(resp.status, StatusCode::UNAUTHORIZED);
    let resp = http_post(addr, post(PATH, body, &[("authorization", "Bearer busy")])).await;
    assert_eq!(resp.status, StatusCode::SERVICE_UNAVAILABLE);
    assert_eq!(resp.headers["retry-after"], "7");
    assert_eq!(server.service().plain_http_sessions(), 0);
    server.shutdown().await;
}

#[tokio::test]
async fn thr_5_unavailable_reply_becomes_503_with_retry_after() {
    let (rec, _events) =
        Recorder::with_reply(|_, _| Some(unavailable("busy", Some(Duration::from_millis(2500)))));
    let server = start(&rec).await;
    let resp = http_post(
        server.local_addr(),
        post(PATH, first_report(uid(1)).encode_to_vec(), &[]),
    )
    .await;
    assert_eq!(resp.status, StatusCode::SERVICE_UNAVAILABLE);
    assert_eq!(resp.headers["retry-after"], "3");
    server.shutdown().await;
}

#[tokio::test]
async fn uid_5_assigned_uid_keeps_the_session() {
    let (rec, mut events) = Recorder::new();
    let server = start(&rec).await;
    let addr = server.local_addr();
    let mut msg = first_report(uid(1));
    msg.flags = AgentToServerFlagSet::REQUEST_INSTANCE_UID.bits();
    let reply = poll(addr, PATH, &msg).await;
    let new = opamp_proto::InstanceUid::try_from(
        &reply.agent_identification.expect("UID-5").new_instance_uid[..],
    )
    .unwrap();
    let Event::Connected(conn) = next_event(&mut events).await else {
        panic!()
    };
    next_event(&mut events).await;
    // UID-7: the agent switches; same session, no full-state request.
    let reply = poll(addr, PATH, &report(new, 1)).await;
    assert_eq!(reply.flags, 0);
    let Event::Message(c, _) = next_event(&mut events).await else {
        panic!("no new on_connected expected")
    };
    assert!(c.same_connection(&conn));
    assert_eq!(conn.instance_uid(), Some(new));
    assert_eq!(server.service().plain_http_sessions(), 1);
    server.shutdown().await;
}

#[tokio::test]
async fn idle_session_is_forgotten_and_closed() {
    let (rec, mut events) = Recorder::new();
    let config = loopback_config()
        .http_idle_timeout(Duration::from_millis(200))
        .build()
        .unwrap();
    let server = Server::bind(config, rec.server_callbacks()).await.unwrap();
    poll(server.local_addr(), PATH, &first_report(uid(1))).await;
    let Event::Connected(conn) = next_event(&mut events).await else {
        panic!()
    };
    next_event(&mut events).await;
    // The sweeper ends the session: on_connection_close, later sends fail.
    let Event::Closed(c) = next_event(&mut events).await else {
        panic!("expected Closed")
    };
    assert!(c.same_connection(&conn));
    assert!(conn.send(ServerToAgent::default()).is_err());
    assert_eq!(server.service().plain_http_sessions(), 0);
    server.shutdown().await;
}

#[tokio::test]
async fn shutdown_closes_plain_http_sessions() {
    let (rec, mut events) = Recorder::new();
    let server = start(&rec).await;
    poll(server.local_addr(), PATH, &first_report(uid(1))).await;
    within(server.shutdown()).await;
    let mut closed = false;
    while let Ok(e) = events.try_recv() {
        closed |= matches!(e, Event::Closed(_));
    }
    assert!(closed);
}

/// Review finding 1 / THR-5: a client posting fresh instance uids cannot grow the session map
/// without bound; over `max_http_sessions` of known agents (two polls or more) a new uid
/// gets 503 with `Retry-After` and no session, while agents that have one keep polling.
#[tokio::test]
async fn thr_5_new_sessions_over_max_http_sessions_get_503_existing_keep_polling() {
    let (rec, mut events) = Recorder::new();
    let config = loopback_config().max_http_sessions(2).build().unwrap();
    let server = Server::bind(config, rec.server_callbacks()).await.unwrap();
    let addr = server.local_addr();
    poll(addr, PATH, &first_report(uid(1))).await;
    poll(addr, PATH, &first_report(uid(2))).await;
    // Both come back: known agents, never displaced by strangers.
    poll(addr, PATH, &report(uid(1), 1)).await;
    poll(addr, PATH, &report(uid(2), 1)).await;
    for n in 3..6 {
        let resp = http_post(addr, post(PATH, first_report(uid(n)).encode_to_vec(), &[])).await;
        assert_eq!(resp.status, StatusCode::SERVICE_UNAVAILABLE, "THR-5");
        let secs: u64 = resp.headers["retry-after"]
            .to_str()
            .unwrap()
            .parse()
            .unwrap();
        assert!(secs >= 1, "THR-5, THR-7");
    }
    // A RequestInstanceUid poll of a known agent adds no session either.
    let mut msg = report(uid(1), 2);
    msg.flags = AgentToServerFlagSet::REQUEST_INSTANCE_UID.bits();
    poll(addr, PATH, &msg).await;
    assert_eq!(server.service().plain_http_sessions(), 2);
    poll(addr, PATH, &report(uid(2), 2)).await;

    // Only the two admitted agents connected.
    let mut connected = 0;
    while let Ok(e) = events.try_recv() {
        connected += usize::from(matches!(e, Event::Connected(_)));
    }
    assert_eq!(connected, 2);

    // DIS-2: a session that ends frees its place.
    let mut bye = report(uid(2), 3);
    bye.agent_disconnect = Some(AgentDisconnect {});
    poll(addr, PATH, &bye).await;
    poll(addr, PATH, &first_report(uid(3))).await;
    assert_eq!(server.service().plain_http_sessions(), 2);
    server.shutdown().await;
}

/// Review finding 2a / HTTP-5: the header uid (which `on_connecting` may have authorized)
/// must equal the body uid, or a tenant could poll another agent's session and take its push.
#[tokio::test]
async fn http_5_header_uid_differing_from_body_gets_400_and_push_stays() {
    let (rec, mut events) = Recorder::new();
    let server = start(&rec).await;
    let addr = server.local_addr();
    poll(addr, PATH, &first_report(uid(1))).await;
    let Event::Connected(conn) = next_event(&mut events).await else {
        panic!("expected Connected")
    };
    next_event(&mut events).await;
    conn.send(remote_config(b"secret", 10)).unwrap();

    let body = report(uid(1), 1).encode_to_vec();
    let other = uid(2).to_string();
    for header in [other.as_str(), "not-a-uuid"] {
        let resp = http_post(
            addr,
            post(PATH, body.clone(), &[("opamp-instance-uid", header)]),
        )
        .await;
        assert_eq!(resp.status, StatusCode::BAD_REQUEST, "HTTP-5: {header}");
        assert!(matches!(
            next_event(&mut events).await,
            Event::ReadError(opamp_server::ReadMessageError::InstanceUidHeader)
        ));
    }
    // The real agent still gets its push.
    let reply = poll(addr, PATH, &report(uid(1), 1)).await;
    assert_eq!(
        reply.remote_config.expect("HTTP-9: push kept").config_hash,
        Bytes::from_static(b"secret")
    );
    assert_eq!(server.service().plain_http_sessions(), 1);
    server.shutdown().await;
}

/// Review finding 2b (AUTH): a session created under one mTLS client certificate is not
/// served to a request with another chain (or none): 403, and the session is untouched.
#[cfg(feature = "tls")]
#[tokio::test]
async fn auth_plain_http_session_is_bound_to_the_peer_certificates() {
    use http_body_util::BodyExt;
    use opamp_server::{OpampService, PeerCertificates};
    use rustls_pki_types::CertificateDer;

    let (rec, mut events) = Recorder::new();
    let service = OpampService::new(
        opamp_server::ServerConfig::default(),
        rec.server_callbacks(),
    );
    let certs = |b: u8| PeerCertificates::new(vec![CertificateDer::from(vec![b; 8])]);
    let request = |msg: &opamp_proto::AgentToServer, peer: Option<PeerCertificates>| {
        let mut req = post(PATH, msg.encode_to_vec(), &[]);
        if let Some(peer) = peer {
            req.extensions_mut().insert(peer);
        }
        req
    };
    let resp = within(service.handle(request(&first_report(uid(1)), Some(certs(1))))).await;
    assert_eq!(resp.status(), StatusCode::OK);
    let Event::Connected(conn) = next_event(&mut events).await else {
        panic!("expected Connected")
    };
    next_event(&mut events).await;
    conn.send(remote_config(b"secret", 10)).unwrap();

    for other in [Some(certs(2)), None] {
        let resp = within(service.handle(request(&report(uid(1), 1), other))).await;
        assert_eq!(resp.status(), StatusCode::FORBIDDEN);
    }
    assert!(
        events.try_recv().is_err(),
        "no callback for a refused request"
    );

    let resp = within(service.handle(request(&report(uid(1), 1), Some(certs(1))))).await;
    assert_eq!(resp.status(), StatusCode::OK);
    let body = resp.into_body().collect().await.unwrap().to_bytes();
    let reply = ServerToAgent::decode(body).unwrap();
    assert_eq!(
        reply.remote_config.expect("push kept").config_hash,
        Bytes::from_static(b"secret")
    );
    service.shutdown().await;
}

/// Sends the head of a POST declaring 1000 body bytes, and 500 of them; then stalls.
async fn stalled_post(addr: std::net::SocketAddr) -> tokio::net::TcpStream {
    use tokio::io::AsyncWriteExt;
    let mut tcp = within(tokio::net::TcpStream::connect(addr)).await.unwrap();
    let head = format!(
        "POST {PATH} HTTP/1.1\r\nhost: localhost\r\ncontent-type: application/x-protobuf\r\n\
         content-length: 1000\r\n\r\n"
    );
    tcp.write_all(head.as_bytes()).await.unwrap();
    tcp.write_all(&[0u8; 500]).await.unwrap();
    tcp.flush().await.unwrap();
    tcp
}

/// Reads what the server sends until it closes (or `limit` passes).
async fn read_response(tcp: &mut tokio::net::TcpStream, limit: Duration) -> String {
    use tokio::io::AsyncReadExt;
    let mut buf = Vec::new();
    let _ = tokio::time::timeout(limit, async {
        let mut chunk = [0u8; 1024];
        loop {
            match tcp.read(&mut chunk).await {
                Ok(0) | Err(_) => break,
                Ok(n) => {
                    buf.extend_from_slice(&chunk[..n]);
                    if buf.windows(4).any(|w| w == b"\r\n\r\n") {
                        break;
                    }
                }
            }
        }
    })
    .await;
    String::from_utf8_lossy(&buf).into_owned()
}

/// Review finding 3 (HTTP-14 resources): a body that stalls half way gets 408 once
/// `http_body_timeout` passes, instead of pinning a task and its buffer forever.
#[tokio::test]
async fn http_14_stalled_body_gets_408_after_http_body_timeout() {
    let (rec, _events) = Recorder::new();
    let config = loopback_config()
        .http_body_timeout(Duration::from_millis(300))
        .build()
        .unwrap();
    let server = Server::bind(config, rec.server_callbacks()).await.unwrap();
    let mut tcp = stalled_post(server.local_addr()).await;
    let response = read_response(&mut tcp, Duration::from_secs(5)).await;
    assert!(
        response.starts_with("HTTP/1.1 408"),
        "expected 408, got {response:?}"
    );
    assert_eq!(server.service().plain_http_sessions(), 0);
    tokio::time::timeout(Duration::from_secs(5), server.shutdown())
        .await
        .expect("shutdown completes");
}

/// Review finding 3: a graceful stop does not wait for a stalled body (default timeout).
#[tokio::test]
async fn shutdown_is_not_held_by_a_stalled_body() {
    let (rec, _events) = Recorder::new();
    let server = start(&rec).await;
    let mut tcp = stalled_post(server.local_addr()).await;
    // Let the server start reading the body.
    tokio::time::sleep(Duration::from_millis(200)).await;
    tokio::time::timeout(Duration::from_secs(5), server.shutdown())
        .await
        .expect("shutdown must not wait for the stalled body");
    let response = read_response(&mut tcp, Duration::from_secs(5)).await;
    assert!(
        response.is_empty() || response.starts_with("HTTP/1.1 503"),
        "{response:?}"
    );
}

/// RC-6 over the wire: an application that offers its config while the agent reports
/// another hash (as the reference server does). The response carrying it is lost once;
/// the next poll must carry it again.
#[tokio::test]
async fn rc6_config_reoffered_after_lost_http_response() {
    let (rec, _events) = Recorder::with_reply(|_, msg| {
        let reported = msg
            .remote_config_status
            .as_ref()
            .map(|s| s.last_remote_config_hash.clone());
        (reported.as_deref() != Some(b"h1".as_slice())).then(|| remote_config(b"h1", 10))
    });
    let server = start(&rec).await;
    let addr = server.local_addr();
    let lost = poll(addr, PATH, &first_report(uid(1))).await;
    assert!(lost.remote_config.is_some(), "offered (and then lost)");
    for seq in 1..3 {
        let reply = poll(addr, PATH, &report(uid(1), seq)).await;
        assert_eq!(
            reply
                .remote_config
                .expect("RC-6: offered again")
                .config_hash,
            Bytes::from_static(b"h1"),
            "poll {seq}"
        );
    }
    let mut applied = report(uid(1), 3);
    applied.remote_config_status = Some(opamp_proto::RemoteConfigStatus {
        last_remote_config_hash: Bytes::from_static(b"h1"),
        status: opamp_proto::RemoteConfigStatuses::Applied as i32,
        ..Default::default()
    });
    assert!(poll(addr, PATH, &applied).await.remote_config.is_none());
    server.shutdown().await;
}

/// Posts `msg` from a client socket bound to `source` (another loopback address is another
/// source for the per-source budget).
async fn post_from(
    source: [u8; 4],
    addr: std::net::SocketAddr,
    msg: &opamp_proto::AgentToServer,
) -> HttpResponse {
    let socket = tokio::net::TcpSocket::new_v4().unwrap();
    socket
        .bind(std::net::SocketAddr::from((source, 0)))
        .unwrap();
    let tcp = within(socket.connect(addr)).await.unwrap();
    http_request(tcp, post(PATH, msg.encode_to_vec(), &[])).await
}

fn stranger(n: u32) -> opamp_proto::AgentToServer {
    let mut bytes = [0xAB; 16];
    bytes[..4].copy_from_slice(&n.to_be_bytes());
    first_report(opamp_proto::InstanceUid::from_array(bytes))
}

/// Session-table admission: with a small table, a flood of strangers (fresh uids that poll
/// once) takes the places of older strangers, never of a known agent, and a new agent's
/// first poll is admitted at once instead of getting 503.
#[tokio::test]
async fn thr_5_stranger_flood_does_not_lock_out_known_or_new_agents() {
    let (rec, mut events) = Recorder::new();
    let config = loopback_config().max_http_sessions(4).build().unwrap();
    let server = Server::bind(config, rec.server_callbacks()).await.unwrap();
    let addr = server.local_addr();
    poll(addr, PATH, &first_report(uid(1))).await;
    poll(addr, PATH, &report(uid(1), 1)).await;
    let Event::Connected(known) = next_event(&mut events).await else {
        panic!("expected Connected")
    };
    for n in 0..50 {
        let resp = http_post(addr, post(PATH, stranger(n).encode_to_vec(), &[])).await;
        assert_eq!(resp.status, StatusCode::OK, "stranger {n}");
        assert!(server.service().plain_http_sessions() <= 4);
    }
    // The known agent still has its session: no new on_connected, no full-state request.
    let reply = poll(addr, PATH, &report(uid(1), 2)).await;
    assert_eq!(reply.flags, 0);
    assert!(!known.is_closed());
    // A new agent is admitted at once, and is known from its second poll.
    poll(addr, PATH, &first_report(uid(2))).await;
    poll(addr, PATH, &report(uid(2), 1)).await;
    for n in 50..60 {
        let resp = http_post(addr, post(PATH, stranger(n).encode_to_vec(), &[])).await;
        assert_eq!(resp.status, StatusCode::OK, "stranger {n}");
    }
    assert_eq!(poll(addr, PATH, &report(uid(2), 2)).await.flags, 0, "kept");
    assert_eq!(server.service().plain_http_sessions(), 4);
    // Evicted strangers are ended properly: 60 strangers, 2 places left for them.
    let mut closed = 0;
    while closed < 58 {
        closed += usize::from(matches!(next_event(&mut events).await, Event::Closed(_)));
    }
    assert!(!known.is_closed());
    server.shutdown().await;
}

/// Session-table admission: new sessions are rate-limited per source address, so a flood
/// from one address gets 429 with `Retry-After` past its burst, while a new agent at another
/// address is admitted at once and keeps its session to its second poll.
#[tokio::test]
async fn thr_5_new_sessions_are_rate_limited_per_source_address() {
    let (rec, _events) = Recorder::new();
    let config = loopback_config()
        .max_http_sessions(100)
        .http_new_session_burst(5)
        .http_new_session_rate(1)
        .build()
        .unwrap();
    let server = Server::bind(config, rec.server_callbacks()).await.unwrap();
    let addr = server.local_addr();
    let mut refused = 0;
    let started = std::time::Instant::now();
    for n in 0..20 {
        let resp = post_from([127, 0, 0, 1], addr, &stranger(n)).await;
        if resp.status == StatusCode::TOO_MANY_REQUESTS {
            refused += 1;
            let secs: u64 = resp.headers["retry-after"]
                .to_str()
                .unwrap()
                .parse()
                .unwrap();
            assert!((1..=2).contains(&secs), "one token at 1/s: {secs}");
        } else {
            assert_eq!(resp.status, StatusCode::OK);
        }
    }
    // 5 at once, plus one per second the loop took (a slow machine refills more).
    let refills = usize::try_from(started.elapsed().as_secs()).unwrap() + 1;
    let accepted = 20 - refused;
    assert!(
        (5..=5 + refills).contains(&accepted),
        "{accepted} in {refills} s"
    );
    let sessions = server.service().plain_http_sessions();
    // Another address is not held back, and its second poll finds its session.
    let resp = post_from([127, 0, 0, 2], addr, &first_report(uid(9))).await;
    assert_eq!(resp.status, StatusCode::OK);
    let resp = post_from([127, 0, 0, 2], addr, &report(uid(9), 1)).await;
    assert_eq!(resp.message().flags, 0, "same session, in sequence");
    assert_eq!(server.service().plain_http_sessions(), sessions + 1);
    // Polls of existing sessions are never limited, whatever the source.
    let resp = post_from([127, 0, 0, 1], addr, &report(uid(9), 2)).await;
    assert_eq!(resp.status, StatusCode::OK);
    server.shutdown().await;
}

/// S2A-2 over plain HTTP: a Restart command goes alone in its response and the config the
/// application returned with it rides on the next response.
#[tokio::test]
async fn s2a2_http_config_pushed_out_by_restart_rides_on_next_poll() {
    use opamp_proto::{AgentCapabilitySet, ServerToAgentCommand};
    let (rec, _events) = Recorder::with_reply(|_, msg| {
        (msg.sequence_num == 0).then(|| ServerToAgent {
            command: Some(ServerToAgentCommand::default()),
            ..remote_config(b"after-restart", 10)
        })
    });
    let server = start(&rec).await;
    let addr = server.local_addr();
    let with_restart = (caps() | AgentCapabilitySet::ACCEPTS_RESTART_COMMAND).bits();
    let mut first = first_report(uid(42));
    first.capabilities = with_restart;
    let reply = poll(addr, PATH, &first).await;
    assert!(reply.command.is_some());
    assert!(
        reply.remote_config.is_none(),
        "S2A-2: the command goes alone"
    );
    let mut next = report(uid(42), 1);
    next.capabilities = with_restart;
    let reply = poll(addr, PATH, &next).await;
    assert!(reply.command.is_none());
    assert_eq!(
        reply.remote_config.expect("the config follows").config_hash,
        Bytes::from_static(b"after-restart")
    );
    server.shutdown().await;
}

/// HTTP-9: two custom messages sent between polls both arrive, one per response, in order
/// (a later one no longer replaces an earlier one in the pending slot).
#[tokio::test]
async fn http_9_custom_messages_between_polls_all_arrive_in_order() {
    let (rec, mut events) = Recorder::new();
    let server = start(&rec).await;
    let addr = server.local_addr();
    poll(addr, PATH, &first_report(uid(43))).await;
    let Event::Connected(conn) = next_event(&mut events).await else {
        panic!()
    };
    for data in [&b"one"[..], &b"two"[..]] {
        conn.send(ServerToAgent {
            custom_message: Some(opamp_proto::CustomMessage {
                capability: "io.example.chat".to_owned(),
                r#type: "line".to_owned(),
                data: Bytes::from_static(data),
            }),
            ..Default::default()
        })
        .unwrap();
    }
    let mut got = Vec::new();
    for seq in 1..=3 {
        let reply = poll(addr, PATH, &report(uid(43), seq)).await;
        if let Some(c) = reply.custom_message {
            got.push(c.data);
        }
    }
    assert_eq!(got, [&b"one"[..], &b"two"[..]]);
    server.shutdown().await;
}

/// A tower layer for the builder test: answers 401 to requests without `x-tenant`.
#[derive(Clone)]
struct RequireTenant<S>(S);

impl<S, B> tower_service::Service<Request<B>> for RequireTenant<S>
where
    S: tower_service::Service<Request<B>, Response = http::Response<opamp_server::ResponseBody>>,
    S::Future: Send + 'static,
{
    type Response = S::Response;
    type Error = S::Error;
    type Future =
        std::pin::Pin<Box<dyn std::future::Future<Output = Result<S::Response, S::Error>> + Send>>;

    fn poll_ready(
        &mut self,
        cx: &mut std::task::Context<'_>,
    ) -> std::task::Poll<Result<(), S::Error>> {
        self.0.poll_ready(cx)
    }

    fn call(&mut self, req: Request<B>) -> Self::Future {
        if req.headers().contains_key("x-tenant") {
            Box::pin(self.0.call(req))
        } else {
            let mut resp = http::Response::new(Full::new(Bytes::new()));
            *resp.status_mut() = StatusCode::UNAUTHORIZED;
            Box::pin(async move { Ok(resp) })
        }
    }
}

/// The standalone server's builder (the configuration split): the listener's settings
/// (address, path) and a tower layer around the service are the builder's, the protocol
/// limits the `ServerConfig`'s; a bad path is refused at bind.
#[tokio::test]
async fn server_builder_sets_listener_path_and_a_tower_layer() {
    let (rec, _events) = Recorder::new();
    let server = Server::builder()
        .listen(std::net::SocketAddr::from(([127, 0, 0, 1], 0)))
        .path("/custom")
        .max_http_sessions(1)
        .layer(tower_layer::layer_fn(RequireTenant))
        .bind(rec.server_callbacks())
        .await
        .unwrap();
    let addr = server.local_addr();
    let body = || first_report(uid(1)).encode_to_vec();
    let resp = http_post(addr, post("/custom", body(), &[])).await;
    assert_eq!(resp.status, StatusCode::UNAUTHORIZED, "the layer answered");
    let resp = http_post(addr, post("/custom", body(), &[("x-tenant", "a")])).await;
    assert_eq!(
        resp.status,
        StatusCode::OK,
        "through the layer to the service"
    );
    let resp = http_post(addr, post(PATH, body(), &[("x-tenant", "a")])).await;
    assert_eq!(
        resp.status,
        StatusCode::NOT_FOUND,
        "the builder's path only"
    );
    // The protocol limit came through the builder: with the one place taken by a known
    // agent (two polls), a second agent is refused (THR-5).
    let again = report(uid(1), 1).encode_to_vec();
    let resp = http_post(addr, post("/custom", again, &[("x-tenant", "a")])).await;
    assert_eq!(resp.status, StatusCode::OK);
    let other = first_report(uid(2)).encode_to_vec();
    let resp = http_post(addr, post("/custom", other, &[("x-tenant", "a")])).await;
    assert_eq!(resp.status, StatusCode::SERVICE_UNAVAILABLE);
    server.shutdown().await;

    let refused = Server::builder()
        .path("no-slash")
        .bind(rec.server_callbacks())
        .await;
    assert!(matches!(
        refused,
        Err(opamp_server::ServerError::Config(
            opamp_server::ConfigError::InvalidPath(_)
        ))
    ));
}
