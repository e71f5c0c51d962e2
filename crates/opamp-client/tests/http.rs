//! The plain-HTTP driver over real loopback sockets, against small (and hostile) test servers.
#![allow(clippy::unwrap_used)]

mod common;

use std::io::Write;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant, SystemTime};

use bytes::Bytes;
use common::*;
use http::Response;
use http_body_util::Full;
use opamp_client::OpampClient;
use opamp_proto::{
    AgentCapabilitySet, AgentConfigMap, AgentConfigObject, AgentRemoteConfig, AgentToServer,
    ComponentHealth, InstanceUid, Message, RemoteConfigStatus, RemoteConfigStatuses,
    ServerErrorResponse, ServerErrorResponseType, ServerToAgent,
};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::sync::mpsc;

type Seen = (usize, http::request::Parts, AgentToServer, Instant);

fn caps() -> AgentCapabilitySet {
    AgentCapabilitySet::REPORTS_STATUS
        | AgentCapabilitySet::REPORTS_HEALTH
        | AgentCapabilitySet::ACCEPTS_REMOTE_CONFIG
}

fn health(healthy: bool) -> ComponentHealth {
    ComponentHealth {
        healthy,
        ..Default::default()
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn http_7_polls_http_10_one_in_flight_and_changes_go_at_once() {
    let (tx, mut seen) = mpsc::unbounded_channel::<Seen>();
    let in_flight = Arc::new(AtomicUsize::new(0));
    let max_in_flight = Arc::new(AtomicUsize::new(0));
    let (inf, maxf) = (in_flight.clone(), max_in_flight.clone());
    let addr = http_server(move |n, parts, body| {
        let tx = tx.clone();
        let (inf, maxf) = (inf.clone(), maxf.clone());
        async move {
            let now = inf.fetch_add(1, Ordering::SeqCst) + 1;
            maxf.fetch_max(now, Ordering::SeqCst);
            let msg = decode_request(&parts, &body);
            let reply = ack(&msg);
            let _ = tx.send((n, parts, msg, Instant::now()));
            // A slow server: requests would pile up if the client did not wait.
            tokio::time::sleep(Duration::from_millis(100)).await;
            inf.fetch_sub(1, Ordering::SeqCst);
            ok(&reply)
        }
    })
    .await;
    let uid = InstanceUid::new_v7();
    let (cb, mut cbs) = Recorder::new();
    let client = OpampClient::start(
        settings(format!("http://{addr}/v1/opamp"))
            .with_instance_uid(uid)
            .with_capabilities(caps())
            .with_agent_description(description())
            .with_heartbeat_interval(Duration::from_millis(400)),
        cb,
    )
    .unwrap();

    let (_, parts, first, _) = recv(&mut seen).await;
    assert_eq!(parts.method, http::Method::POST);
    assert_eq!(parts.uri.path(), "/v1/opamp");
    // HTTP-2, HTTP-4, HTTP-5.
    assert_eq!(parts.headers["content-type"], "application/x-protobuf");
    assert_eq!(parts.headers["accept-encoding"], "gzip");
    assert_eq!(
        parts.headers["opamp-instance-uid"],
        uid.to_string().as_str()
    );
    assert!(parts.headers.get("content-encoding").is_none());
    assert_eq!(first.sequence_num, 0);
    assert!(first.agent_description.is_some(), "REP-1");
    expect_cb(&mut cbs, |c| matches!(c, Cb::Connect).then_some(())).await;

    // Changes while a request is in flight wait for its answer, then go at once.
    for i in 0..20 {
        client.set_health(health(i % 2 == 1)).unwrap();
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
    // The last status request carries the latest value; then come polls with only the uid
    // and capabilities (HTTP-7).
    let mut last = first;
    let poll = loop {
        let (_, _, m, _) = recv(&mut seen).await;
        assert_eq!(m.sequence_num, last.sequence_num + 1, "SEQ-1");
        assert!(m.agent_description.is_none(), "CMP-1");
        if m.health.is_none() {
            assert_eq!(last.health, Some(health(true)));
            break m;
        }
        last = m;
    };
    assert_eq!(poll.instance_uid, uid.to_bytes());
    assert_eq!(max_in_flight.load(Ordering::SeqCst), 1, "HTTP-10");

    // HTTP-11: the last request carries agent_disconnect.
    client.stop().await.unwrap();
    loop {
        let (_, _, m, _) = recv(&mut seen).await;
        if m.agent_disconnect.is_some() {
            break;
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn http_3_http_4_gzip_both_ways() {
    let (tx, mut seen) = mpsc::unbounded_channel::<Seen>();
    let addr = http_server(move |n, parts, body| {
        let tx = tx.clone();
        async move {
            let msg = decode_request(&parts, &body);
            let mut config = AgentConfigMap::default();
            config.config_map.insert(
                String::new(),
                AgentConfigObject {
                    body: Bytes::from(vec![b'a'; 10_000]),
                    content_type: "text/yaml".into(),
                    ..Default::default()
                },
            );
            let reply = ServerToAgent {
                remote_config: Some(AgentRemoteConfig {
                    config: Some(config),
                    config_hash: Bytes::from_static(b"hash"),
                }),
                ..ack(&msg)
            };
            let _ = tx.send((n, parts, msg, Instant::now()));
            let packed = opamp_transport::gzip::compress(&reply.encode_to_vec());
            Response::builder()
                .header("content-encoding", "gzip")
                .body(Full::new(Bytes::from(packed)))
                .unwrap()
        }
    })
    .await;
    let (cb, mut cbs) = Recorder::new();
    let client = OpampClient::start(
        settings(format!("http://{addr}/"))
            .with_capabilities(caps())
            .with_compression(true),
        cb,
    )
    .unwrap();
    let (_, parts, msg, _) = recv(&mut seen).await;
    assert_eq!(parts.headers["content-encoding"], "gzip");
    assert_eq!(msg.sequence_num, 0);
    let data = expect_cb(&mut cbs, |c| match c {
        Cb::Message(d) => Some(d.clone()),
        _ => None,
    })
    .await;
    let config = data.remote_config.unwrap();
    assert_eq!(config.config_hash, Bytes::from_static(b"hash"));
    assert_eq!(config.config.unwrap().config_map[""].body.len(), 10_000);
    client.stop().await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn thr_5_503_retry_after_seconds_and_http_date_are_honoured() {
    let (tx, mut seen) = mpsc::unbounded_channel::<Seen>();
    let addr = http_server(move |n, parts, body| {
        let tx = tx.clone();
        async move {
            let msg = decode_request(&parts, &body);
            let reply = ack(&msg);
            let _ = tx.send((n, parts, msg, Instant::now()));
            match n {
                0 => Response::builder()
                    .status(503)
                    .header("retry-after", "1")
                    .body(Full::default())
                    .unwrap(),
                1 => Response::builder()
                    .status(429)
                    .header(
                        "retry-after",
                        httpdate::fmt_http_date(SystemTime::now() + Duration::from_secs(2)),
                    )
                    .body(Full::default())
                    .unwrap(),
                _ => ok(&reply),
            }
        }
    })
    .await;
    let (cb, mut cbs) = Recorder::new();
    *cb.effective_config.lock().unwrap() = None;
    let client = OpampClient::start(
        settings(format!("http://{addr}/")).with_capabilities(caps()),
        cb,
    )
    .unwrap();
    let (_, _, _, t0) = recv(&mut seen).await;
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
    let (_, _, _, t1) = recv(&mut seen).await;
    assert!(t1 - t0 >= Duration::from_secs(1));
    let status = expect_cb(&mut cbs, |c| match c {
        Cb::ConnectFailed(_, s) => Some(*s),
        _ => None,
    })
    .await
    .unwrap();
    assert_eq!(status.0, http::StatusCode::TOO_MANY_REQUESTS);
    // An HTTP-date 2 s ahead (whole seconds): at least 1 s once parsed.
    assert!(status.1.unwrap() >= Duration::from_secs(1));
    let (_, _, full, t2) = recv(&mut seen).await;
    assert!(t2 - t1 >= Duration::from_secs(1));
    // RETRY-1: after failures the full state goes again.
    assert_eq!(full.capabilities, caps().bits());
    expect_cb(&mut cbs, |c| matches!(c, Cb::Connect).then_some(())).await;
    client.stop().await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn http_14_413_and_retry_3_bad_request_are_not_retried() {
    let (tx, mut seen) = mpsc::unbounded_channel::<Seen>();
    let addr = http_server(move |n, parts, body| {
        let tx = tx.clone();
        async move {
            let msg = decode_request(&parts, &body);
            let reply = ack(&msg);
            let has_health = msg.health.is_some();
            let _ = tx.send((n, parts, msg, Instant::now()));
            if has_health && n == 1 {
                return Response::builder()
                    .status(413)
                    .body(Full::default())
                    .unwrap();
            }
            if has_health {
                return ok(&ServerToAgent {
                    error_response: Some(ServerErrorResponse {
                        r#type: ServerErrorResponseType::BadRequest as i32,
                        error_message: "no".into(),
                        details: None,
                    }),
                    ..Default::default()
                });
            }
            ok(&reply)
        }
    })
    .await;
    let (cb, mut cbs) = Recorder::new();
    let client = OpampClient::start(
        settings(format!("http://{addr}/"))
            .with_capabilities(caps())
            .with_heartbeat_interval(Duration::from_millis(300)),
        cb,
    )
    .unwrap();
    let (_, _, first, _) = recv(&mut seen).await;
    assert!(first.health.is_none());
    expect_cb(&mut cbs, |c| matches!(c, Cb::Connect).then_some(())).await;
    client.set_health(health(true)).unwrap();
    let (n, _, m, _) = recv(&mut seen).await;
    assert_eq!(n, 1);
    assert!(m.health.is_some());
    let status = expect_cb(&mut cbs, |c| match c {
        Cb::ConnectFailed(_, s) => Some(*s),
        _ => None,
    })
    .await;
    assert_eq!(status, Some((http::StatusCode::PAYLOAD_TOO_LARGE, None)));
    // Not retried: the next request is a poll without the health.
    let (_, _, poll, _) = recv(&mut seen).await;
    assert!(poll.health.is_none());
    assert_eq!(poll.sequence_num, m.sequence_num + 1);

    client.set_health(health(false)).unwrap();
    let (_, _, m, _) = recv(&mut seen).await;
    assert!(m.health.is_some());
    let err = expect_cb(&mut cbs, |c| match c {
        Cb::Error(e) => Some(e.clone()),
        _ => None,
    })
    .await;
    assert_eq!(err.r#type, ServerErrorResponseType::BadRequest as i32);
    let (_, _, poll, _) = recv(&mut seen).await;
    assert!(poll.health.is_none(), "RETRY-3");
    client.stop().await.unwrap();
}

fn gzip_bomb(size: usize) -> Vec<u8> {
    let mut e = flate2::write::GzEncoder::new(Vec::new(), flate2::Compression::best());
    e.write_all(&vec![0u8; size]).unwrap();
    e.finish().unwrap()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn hostile_http_server_garbage_oversized_bombs_and_drops_then_recovers() {
    // Raw TCP, to send whatever we like. Per connection (the client reconnects after each
    // failure): 0 drop; 1 garbage 200 body; 2 Content-Length of 1 GiB announced and nothing
    // sent (must be refused from the header, not by a timeout); 3 an endless chunked body;
    // 4 a gzip bomb; 5 and later a proper answer.
    let (tx, mut seen) = mpsc::unbounded_channel::<usize>();
    let addr = tcp_server(move |n, mut s| {
        let tx = tx.clone();
        async move {
            let mut buf = vec![0u8; 64 * 1024];
            let mut got = Vec::new();
            // Read the head and the body (Content-Length framed).
            loop {
                let k = match s.read(&mut buf).await {
                    Ok(0) | Err(_) => return,
                    Ok(k) => k,
                };
                got.extend_from_slice(&buf[..k]);
                if let Some(pos) = got.windows(4).position(|w| w == b"\r\n\r\n") {
                    let head = String::from_utf8_lossy(&got[..pos]).to_lowercase();
                    let len: usize = head
                        .lines()
                        .find_map(|l| l.strip_prefix("content-length:"))
                        .map(|v| v.trim().parse().unwrap())
                        .unwrap_or(0);
                    if got.len() >= pos + 4 + len {
                        break;
                    }
                }
            }
            let _ = tx.send(n);
            let _ = match n {
                0 => return,
                1 => {
                    s.write_all(b"HTTP/1.1 200 OK\r\nContent-Length: 4\r\n\r\n\xff\xff\xff\xff")
                        .await
                }
                2 => {
                    let r = s
                        .write_all(b"HTTP/1.1 200 OK\r\nContent-Length: 1073741824\r\n\r\n")
                        .await;
                    // Hold the connection open: only the header can end this exchange.
                    tokio::time::sleep(Duration::from_secs(30)).await;
                    r
                }
                3 => {
                    let _ = s
                        .write_all(b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n")
                        .await;
                    let chunk = format!("{:x}\r\n{}\r\n", 4096, "z".repeat(4096));
                    loop {
                        if s.write_all(chunk.as_bytes()).await.is_err() {
                            break Ok(());
                        }
                    }
                }
                4 => {
                    let bomb = gzip_bomb(16 << 20);
                    let head = format!(
                        "HTTP/1.1 200 OK\r\nContent-Encoding: gzip\r\nContent-Length: {}\r\n\r\n",
                        bomb.len()
                    );
                    let _ = s.write_all(head.as_bytes()).await;
                    s.write_all(&bomb).await
                }
                _ => {
                    let body = ServerToAgent {
                        capabilities: 1,
                        ..Default::default()
                    }
                    .encode_to_vec();
                    let head = format!("HTTP/1.1 200 OK\r\nContent-Length: {}\r\n\r\n", body.len());
                    let _ = s.write_all(head.as_bytes()).await;
                    s.write_all(&body).await
                }
            };
            // Keep-alive is not needed by these tests: one exchange per connection.
        }
    })
    .await;
    let (cb, mut cbs) = Recorder::new();
    let client = OpampClient::start(
        settings(format!("http://{addr}/"))
            .with_max_message_size(64 * 1024)
            // Long enough that only the size checks can end exchanges 2 and 3 in time.
            .with_request_timeout(Duration::from_secs(20)),
        cb,
    )
    .unwrap();
    let mut failures = vec![];
    while failures.len() < 5 {
        let f = expect_cb(&mut cbs, |c| match c {
            Cb::ConnectFailed(e, _) => Some(e.clone()),
            _ => None,
        })
        .await;
        failures.push(f);
    }
    assert!(
        failures[0].contains("HTTP error") || failures[0].contains("I/O"),
        "{failures:?}"
    );
    assert!(failures[1].contains("malformed"), "{failures:?}");
    assert!(failures[2].contains("exceeds the limit"), "{failures:?}");
    assert!(failures[3].contains("exceeds the limit"), "{failures:?}");
    assert!(failures[4].contains("exceeds the limit"), "{failures:?}");
    expect_cb(&mut cbs, |c| matches!(c, Cb::Connect).then_some(())).await;
    assert!(client.is_connected());
    let mut ns = vec![];
    while ns.len() < 6 {
        ns.push(recv(&mut seen).await);
    }
    assert_eq!(ns, vec![0, 1, 2, 3, 4, 5]);
    client.stop().await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn uid_7_server_assigned_uid_is_adopted_for_body_and_header() {
    let new_uid = InstanceUid::new_v7();
    let (tx, mut seen) = mpsc::unbounded_channel::<Seen>();
    let addr = http_server(move |n, parts, body| {
        let tx = tx.clone();
        async move {
            let msg = decode_request(&parts, &body);
            let mut reply = ack(&msg);
            if n == 0 {
                reply.agent_identification = Some(opamp_proto::AgentIdentification {
                    new_instance_uid: new_uid.to_bytes(),
                });
            }
            let _ = tx.send((n, parts, msg, Instant::now()));
            ok(&reply)
        }
    })
    .await;
    let (cb, mut cbs) = Recorder::new();
    let client = OpampClient::start(
        settings(format!("http://{addr}/"))
            .with_flags(opamp_proto::AgentToServerFlagSet::REQUEST_INSTANCE_UID)
            .with_heartbeat_interval(Duration::from_millis(50)),
        cb,
    )
    .unwrap();
    let (_, _, first, _) = recv(&mut seen).await;
    assert_eq!(first.flags, 1, "UID-5");
    let data = expect_cb(&mut cbs, |c| match c {
        Cb::Message(d) => Some(d.clone()),
        _ => None,
    })
    .await;
    assert_eq!(data.new_instance_uid, Some(new_uid));
    let (_, parts, next, _) = recv(&mut seen).await;
    assert_eq!(next.instance_uid, new_uid.to_bytes());
    assert_eq!(next.flags, 0);
    assert_eq!(
        parts.headers["opamp-instance-uid"],
        new_uid.to_string().as_str()
    );
    assert_eq!(client.instance_uid(), new_uid);
    client.stop().await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn stop_is_bounded_when_the_server_hangs() {
    // Answers the first request, then never answers again.
    let answered = Arc::new(Mutex::new(false));
    let addr = http_server(move |_, parts, body| {
        let answered = answered.clone();
        async move {
            let msg = decode_request(&parts, &body);
            let first = !std::mem::replace(&mut *answered.lock().unwrap(), true);
            if !first {
                tokio::time::sleep(Duration::from_secs(3600)).await;
            }
            ok(&ack(&msg))
        }
    })
    .await;
    let (cb, mut cbs) = Recorder::new();
    let client = OpampClient::start(
        settings(format!("http://{addr}/"))
            .with_capabilities(caps())
            .with_stop_timeout(Duration::from_millis(300)),
        cb,
    )
    .unwrap();
    expect_cb(&mut cbs, |c| matches!(c, Cb::Connect).then_some(())).await;
    client.set_health(health(true)).unwrap();
    tokio::time::sleep(Duration::from_millis(50)).await;
    let t = Instant::now();
    let _ = client.stop().await;
    assert!(t.elapsed() < Duration::from_secs(2));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn http_12_idle_keep_alive_connections_closed_by_the_server_are_not_failures() {
    // Answers one request per connection, keeps it open briefly, then closes it while idle
    // (an idle timeout), without `Connection: close`.
    let (tx, mut seen) = mpsc::unbounded_channel::<usize>();
    let addr = tcp_server(move |n, mut s| {
        let tx = tx.clone();
        async move {
            let mut buf = vec![0u8; 64 * 1024];
            let mut got = Vec::new();
            loop {
                let k = match s.read(&mut buf).await {
                    Ok(0) | Err(_) => return,
                    Ok(k) => k,
                };
                got.extend_from_slice(&buf[..k]);
                if let Some(pos) = got.windows(4).position(|w| w == b"\r\n\r\n") {
                    let head = String::from_utf8_lossy(&got[..pos]).to_lowercase();
                    let len: usize = head
                        .lines()
                        .find_map(|l| l.strip_prefix("content-length:"))
                        .map(|v| v.trim().parse().unwrap())
                        .unwrap_or(0);
                    if got.len() >= pos + 4 + len {
                        break;
                    }
                }
            }
            let body = ServerToAgent {
                capabilities: 1,
                ..Default::default()
            }
            .encode_to_vec();
            let head = format!("HTTP/1.1 200 OK\r\nContent-Length: {}\r\n\r\n", body.len());
            let _ = s.write_all(head.as_bytes()).await;
            let _ = s.write_all(&body).await;
            let _ = tx.send(n);
            tokio::time::sleep(Duration::from_millis(30)).await;
        }
    })
    .await;
    let (cb, mut cbs) = Recorder::new();
    let client = OpampClient::start(
        settings(format!("http://{addr}/")).with_heartbeat_interval(Duration::from_millis(100)),
        cb,
    )
    .unwrap();
    for i in 0..4 {
        assert_eq!(recv(&mut seen).await, i);
    }
    client.stop().await.unwrap();
    drop(client);
    // Connected once, and not a single failure.
    let mut connects = 0;
    while let Ok(cb) = cbs.try_recv() {
        match cb {
            Cb::Connect => connects += 1,
            Cb::ConnectFailed(e, _) => panic!("unexpected failure: {e}"),
            _ => {}
        }
    }
    assert_eq!(connects, 1);
}

/// GEN-8, THR-8 with RETRY-3 / HTTP-14: an endpoint that answers 400 to every POST from the
/// start (the link never comes up) gets requests at growing, backed-off intervals, not a
/// tight loop; and the refused status is not resent.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn gen_8_retry_3_server_refusing_every_request_is_not_flooded() {
    let (tx, mut seen) = mpsc::unbounded_channel::<Seen>();
    let addr = http_server(move |n, parts, body| {
        let tx = tx.clone();
        async move {
            let msg = decode_request(&parts, &body);
            let _ = tx.send((n, parts, msg, Instant::now()));
            Response::builder()
                .status(400)
                .body(Full::default())
                .unwrap()
        }
    })
    .await;
    let (cb, _cbs) = Recorder::new();
    let client = OpampClient::start(
        settings(format!("http://{addr}/"))
            .with_capabilities(caps())
            .with_agent_description(description()),
        cb,
    )
    .unwrap();
    let (_, _, first, _) = recv(&mut seen).await;
    assert!(first.agent_description.is_some());
    // fast_backoff(): 10 ms growing to 50 ms, ±50 %: a couple of dozen requests in 700 ms.
    tokio::time::sleep(Duration::from_millis(700)).await;
    client.stop().await.unwrap();
    let mut requests = vec![];
    while let Ok((_, _, m, at)) = seen.try_recv() {
        requests.push((m, at));
    }
    assert!(
        requests.len() < 60,
        "{} requests in 700 ms: the server is flooded",
        requests.len() + 1
    );
    assert!(requests.len() >= 3, "the client kept trying");
    for (m, _) in &requests {
        assert!(
            m.agent_description.is_none(),
            "RETRY-3: the refused status resent"
        );
    }
}

/// Item 5 (HTTP-5): a malformed `OpAMP-Instance-UID` header in the server's answer (not a
/// UUID, obs-text bytes, control characters) never stops the client: the header is not the
/// client's to trust (the body's `instance_uid` is), and a response hyper cannot parse is a
/// failure retried with backoff. The client keeps polling and recovers.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn http_5_malformed_instance_uid_header_from_the_server_is_not_fatal() {
    let (tx, mut seen) = mpsc::unbounded_channel::<usize>();
    let counter = Arc::new(AtomicUsize::new(0));
    let addr = tcp_server(move |_, mut s| {
        let tx = tx.clone();
        let counter = counter.clone();
        async move {
            let mut buf = vec![0u8; 64 * 1024];
            // One connection may carry several requests (keep-alive): answer each.
            while let Ok(len) = s.read(&mut buf).await {
                if len == 0 {
                    return;
                }
                let k = counter.fetch_add(1, Ordering::SeqCst);
                let _ = tx.send(k);
                let body = ServerToAgent {
                    capabilities: 1,
                    ..Default::default()
                }
                .encode_to_vec();
                let header: &[u8] = match k % 4 {
                    0 => b"OpAMP-Instance-UID: not-a-uuid\r\n",
                    1 => b"OpAMP-Instance-UID: \xff\xfe\x80\r\n",
                    2 => b"OpAMP-Instance-UID: \x01\x02\r\n",
                    _ => b"OpAMP-Instance-UID: 00000000-0000-0000-0000-000000000000-extra\r\n",
                };
                let mut head = b"HTTP/1.1 200 OK\r\n".to_vec();
                head.extend_from_slice(header);
                head.extend_from_slice(
                    format!("Content-Length: {}\r\n\r\n", body.len()).as_bytes(),
                );
                head.extend_from_slice(&body);
                if s.write_all(&head).await.is_err() {
                    return;
                }
            }
        }
    })
    .await;
    let (cb, mut cbs) = Recorder::new();
    let client = OpampClient::start(
        settings(format!("http://{addr}/")).with_heartbeat_interval(Duration::from_millis(50)),
        cb,
    )
    .unwrap();
    expect_cb(&mut cbs, |c| matches!(c, Cb::Connect).then_some(())).await;
    // Every variant is seen and the client goes on polling past all of them.
    let mut kinds = std::collections::BTreeSet::new();
    let mut requests = 0;
    while kinds.len() < 4 || requests < 12 {
        kinds.insert(recv(&mut seen).await % 4);
        requests += 1;
        assert!(requests < 1000, "{kinds:?}");
    }
    assert!(!client.server_capabilities().is_empty());
    client.stop().await.unwrap();
}

/// Item 8: a plain-HTTP answer redirecting to the same URL is a failure with backoff (the
/// client follows no redirects), not a tight loop.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn gen_8_http_redirect_loop_is_a_failure_with_backoff() {
    let count = Arc::new(AtomicUsize::new(0));
    let counted = count.clone();
    let addr = http_server(move |_, _, _| {
        counted.fetch_add(1, Ordering::SeqCst);
        async move {
            Response::builder()
                .status(307)
                .header("location", "/")
                .body(Full::default())
                .unwrap()
        }
    })
    .await;
    let (cb, mut cbs) = Recorder::new();
    let client = OpampClient::start(
        settings(format!("http://{addr}/")).with_backoff(
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
    assert_eq!(
        status.map(|s| s.0),
        Some(http::StatusCode::TEMPORARY_REDIRECT)
    );
    tokio::time::sleep(Duration::from_secs(3)).await;
    let n = count.load(Ordering::SeqCst);
    client.stop().await.ok();
    assert!((2..=8).contains(&n), "{n} requests in 3 s");
}

/// Item 8 (THR-5): `Retry-After: 999999999` is capped by `max_retry_after` (default 1 hour;
/// here 300 ms so the test can see the retry), not obeyed for 31 years.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn thr_5_huge_retry_after_is_capped() {
    let (tx, mut seen) = mpsc::unbounded_channel::<Seen>();
    let addr = http_server(move |n, parts, body| {
        let tx = tx.clone();
        async move {
            let msg = decode_request(&parts, &body);
            let reply = ack(&msg);
            let _ = tx.send((n, parts, msg, Instant::now()));
            if n == 0 {
                Response::builder()
                    .status(503)
                    .header("retry-after", "999999999")
                    .body(Full::default())
                    .unwrap()
            } else {
                ok(&reply)
            }
        }
    })
    .await;
    let (cb, mut cbs) = Recorder::new();
    let client = OpampClient::start(
        settings(format!("http://{addr}/"))
            .with_backoff(fast_backoff().with_max_retry_after(Duration::from_millis(300))),
        cb,
    )
    .unwrap();
    let (_, _, _, t0) = recv(&mut seen).await;
    let status = expect_cb(&mut cbs, |c| match c {
        Cb::ConnectFailed(_, s) => Some(*s),
        _ => None,
    })
    .await;
    assert_eq!(
        status,
        Some((
            http::StatusCode::SERVICE_UNAVAILABLE,
            Some(Duration::from_secs(999_999_999))
        ))
    );
    let (_, _, _, t1) = recv(&mut seen).await;
    assert!(t1 - t0 >= Duration::from_millis(300));
    expect_cb(&mut cbs, |c| matches!(c, Cb::Connect).then_some(())).await;
    client.stop().await.unwrap();
}

/// A plain-HTTP answer that decodes into more elements than the client's limit (2,000
/// config files, limit 1,000) is refused before decoding and retried; the next answer's
/// offer (one file) is delivered, the big one never.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn answer_with_too_many_elements_is_refused_and_retried() {
    let addr = http_server(move |n, parts, body| async move {
        let msg = decode_request(&parts, &body);
        ok(&if n == 0 {
            config_offer(&msg, 2000, b"big")
        } else {
            config_offer(&msg, 1, b"small")
        })
    })
    .await;
    let (cb, mut cbs) = Recorder::new();
    let client = OpampClient::start(
        settings(format!("http://{addr}/"))
            .with_capabilities(caps() | AgentCapabilitySet::ACCEPTS_REMOTE_CONFIG)
            .with_max_message_elements(1000),
        cb,
    )
    .unwrap();
    let hash = expect_cb(&mut cbs, |c| match c {
        Cb::Message(d) => d.remote_config.as_ref().map(|r| r.config_hash.clone()),
        _ => None,
    })
    .await;
    assert_eq!(&hash[..], b"small");
    client.stop().await.unwrap();
}

/// RC-3, RC-6: a status given at start (the one persisted before a restart) is in the first
/// message, not UNSET.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn rc_3_status_given_at_start_is_in_the_first_message() {
    let (tx, mut seen) = mpsc::unbounded_channel::<AgentToServer>();
    let addr = http_server(move |_, parts, body| {
        let tx = tx.clone();
        async move {
            let msg = decode_request(&parts, &body);
            let reply = ack(&msg);
            let _ = tx.send(msg);
            ok(&reply)
        }
    })
    .await;
    let status = RemoteConfigStatus {
        last_remote_config_hash: Bytes::from_static(b"kept"),
        status: RemoteConfigStatuses::Applied as i32,
        error_message: String::new(),
    };
    let (cb, _cbs) = Recorder::new();
    let client = OpampClient::start(
        settings(format!("http://{addr}/"))
            .with_capabilities(caps() | AgentCapabilitySet::REPORTS_REMOTE_CONFIG)
            .with_remote_config_status(status.clone()),
        cb,
    )
    .unwrap();
    let first = recv(&mut seen).await;
    assert_eq!(first.sequence_num, 0);
    assert_eq!(first.remote_config_status, Some(status));
    client.stop().await.unwrap();
}
