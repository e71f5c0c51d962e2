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
