//! Agent identity over real loopback sockets: duplicate uids (UID-8) across WebSocket
//! connections and plain-HTTP sessions, unusable uids (UID-2), the uid header (HTTP-5).
#![allow(clippy::unwrap_used)]

mod common;

use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::Duration;

use bytes::Bytes;
use common::*;
use opamp_proto::{InstanceUid, Message, ServerErrorResponseType, ServerToAgent};
use opamp_server::{
    ConnectionResponse, DuplicateUid, DuplicateUidPolicy, Server, ServerCallbacks, async_trait,
};

const PATH: &str = "/v1/opamp";

/// The recorder's callbacks with a duplicate-uid policy, counting the hook's calls.
struct WithPolicy {
    recorder: Recorder,
    policy: DuplicateUidPolicy,
    calls: AtomicUsize,
}

#[async_trait]
impl ServerCallbacks for WithPolicy {
    async fn on_connecting(&self, request: &http::request::Parts) -> ConnectionResponse {
        self.recorder.on_connecting(request).await
    }

    async fn on_duplicate_uid(&self, duplicate: &DuplicateUid) -> DuplicateUidPolicy {
        assert_eq!(duplicate.kept.instance_uid(), Some(duplicate.instance_uid));
        self.calls.fetch_add(1, Ordering::SeqCst);
        self.policy
    }
}

async fn start_with(
    policy: Option<DuplicateUidPolicy>,
) -> (
    Server,
    Option<Arc<WithPolicy>>,
    tokio::sync::mpsc::UnboundedReceiver<Event>,
) {
    let (recorder, events) = Recorder::new();
    let config = loopback_config().build().unwrap();
    match policy {
        None => {
            let server = Server::bind(config, recorder.server_callbacks())
                .await
                .unwrap();
            (server, None, events)
        }
        Some(policy) => {
            let callbacks = Arc::new(WithPolicy {
                recorder,
                policy,
                calls: AtomicUsize::new(0),
            });
            let server = Server::bind(config, callbacks.clone()).await.unwrap();
            (server, Some(callbacks), events)
        }
    }
}

fn new_uid_of(reply: &ServerToAgent) -> Option<InstanceUid> {
    reply
        .agent_identification
        .as_ref()
        .map(|id| InstanceUid::try_from(&id.new_instance_uid[..]).expect("UID-7: 16 bytes"))
}

/// The next message within a short time, or `None`.
async fn ws_try_recv(ws: &mut Ws) -> Option<ServerToAgent> {
    tokio::time::timeout(Duration::from_secs(3), ws_recv(ws))
        .await
        .ok()
}

/// UID-8: two live WebSocket connections with one uid (a cloned VM). The newcomer is served
/// until the older connection proves itself live; then the newcomer is told a new uid and
/// switches (UID-7), and the original keeps its uid, with no ReportFullState loop.
#[tokio::test]
async fn uid8_two_websocket_connections_with_one_uid_newcomer_gets_a_new_uid() {
    let (server, _, _events) = start_with(None).await;
    let addr = server.local_addr();
    let mut original = ws_connect(addr, PATH).await;
    ws_send(&mut original, &first_report(uid(1))).await;
    assert!(new_uid_of(&ws_recv(&mut original).await).is_none());

    let mut clone = ws_connect(addr, PATH).await;
    ws_send(&mut clone, &first_report(uid(1))).await;
    assert!(
        new_uid_of(&ws_recv(&mut clone).await).is_none(),
        "not proven yet"
    );

    // The original is live: its message proves the duplicate.
    ws_send(&mut original, &report(uid(1), 1)).await;
    let reply = ws_recv(&mut original).await;
    assert!(new_uid_of(&reply).is_none(), "the original keeps its uid");
    let push = ws_try_recv(&mut clone).await.expect("UID-8: newcomer told");
    assert_eq!(&push.instance_uid[..], uid(1).as_array(), "UID-6");
    let new = new_uid_of(&push).expect("UID-8: new_instance_uid");
    assert_ne!(new, uid(1));

    // The clone switches; both go on without disputes or full-state requests.
    let mut seq = 1;
    for _ in 0..3 {
        seq += 1;
        ws_send(&mut clone, &report(new, seq)).await;
        let r = ws_recv(&mut clone).await;
        assert_eq!(&r.instance_uid[..], new.as_array());
        assert!(r.agent_identification.is_none());
        ws_send(&mut original, &report(uid(1), seq)).await;
        let r = ws_recv(&mut original).await;
        assert!(r.agent_identification.is_none());
        assert_eq!(r.flags, 0, "no ReportFullState loop");
    }
    drop((original, clone));
    server.shutdown().await;
}

/// UID-8 detection does not take a reconnect for a duplicate: the old connection of the
/// same agent (still open on the server, as after a half-open TCP loss) never sends again,
/// so the new connection keeps the uid.
#[tokio::test]
async fn uid8_reconnect_while_the_old_connection_lingers_is_no_duplicate() {
    let (server, _, _events) = start_with(None).await;
    let addr = server.local_addr();
    let mut old = ws_connect(addr, PATH).await;
    ws_send(&mut old, &first_report(uid(2))).await;
    ws_recv(&mut old).await;
    let mut new = ws_connect(addr, PATH).await;
    for seq in 1..4 {
        ws_send(&mut new, &report(uid(2), seq)).await;
        let r = ws_recv(&mut new).await;
        assert!(r.agent_identification.is_none(), "seq {seq}");
    }
    assert!(ws_try_recv(&mut new).await.is_none(), "nothing pushed");
    drop((old, new));
    server.shutdown().await;
}

/// UID-8: a WebSocket agent and a plain-HTTP poller with one uid; the poller came second
/// and gets the new uid with its next poll.
#[tokio::test]
async fn uid8_websocket_and_plain_http_with_one_uid() {
    let (server, _, _events) = start_with(None).await;
    let addr = server.local_addr();
    let mut ws = ws_connect(addr, PATH).await;
    ws_send(&mut ws, &first_report(uid(3))).await;
    ws_recv(&mut ws).await;
    let r = poll(addr, PATH, &first_report(uid(3))).await;
    assert!(new_uid_of(&r).is_none(), "not proven yet");
    ws_send(&mut ws, &report(uid(3), 1)).await;
    assert!(new_uid_of(&ws_recv(&mut ws).await).is_none());
    let r = poll(addr, PATH, &report(uid(3), 1)).await;
    let new = new_uid_of(&r).expect("UID-8: the poller is told a new uid");
    assert_ne!(new, uid(3));
    // It switches; the WebSocket agent keeps its uid.
    let r = poll(addr, PATH, &report(new, 2)).await;
    assert!(r.agent_identification.is_none());
    ws_send(&mut ws, &report(uid(3), 2)).await;
    assert!(new_uid_of(&ws_recv(&mut ws).await).is_none());
    drop(ws);
    server.shutdown().await;
}

/// UID-8: two plain-HTTP pollers with one uid interleave their sequence numbers in one
/// session. The one that jumped in is told a new uid; its polls do not reach the
/// application as the original's, and the original gets no endless ReportFullState.
#[tokio::test]
async fn uid8_two_plain_http_pollers_with_one_uid() {
    let (server, _, mut events) = start_with(None).await;
    let addr = server.local_addr();
    let mut a = first_report(uid(4));
    a.sequence_num = 10;
    poll(addr, PATH, &a).await;
    poll(addr, PATH, &report(uid(4), 11)).await;
    // The clone starts at its own number (taken for a restart of the original).
    let mut b = first_report(uid(4));
    b.sequence_num = 3;
    assert!(new_uid_of(&poll(addr, PATH, &b).await).is_none());
    assert!(new_uid_of(&poll(addr, PATH, &report(uid(4), 12)).await).is_none());
    let r = poll(addr, PATH, &report(uid(4), 4)).await;
    let new = new_uid_of(&r).expect("UID-8: the clone is told a new uid");
    assert_eq!(&r.instance_uid[..], uid(4).as_array(), "UID-6");
    let r = poll(addr, PATH, &report(new, 5)).await;
    assert_eq!(&r.instance_uid[..], new.as_array());
    for seq in 13..16 {
        let r = poll(addr, PATH, &report(uid(4), seq)).await;
        assert_eq!(r.flags, 0, "no ReportFullState loop at {seq}");
        assert!(r.agent_identification.is_none());
    }
    assert_eq!(server.service().plain_http_sessions(), 2);
    // The application never saw the clone's message 4 under the original's uid.
    let mut seen = Vec::new();
    while let Ok(e) = events.try_recv() {
        if let Event::Message(c, m) = e
            && c.instance_uid() == Some(uid(4))
        {
            seen.push(m.sequence_num);
        }
    }
    assert!(!seen.contains(&4), "{seen:?}");
    server.shutdown().await;
}

/// UID-8 policies: Reject closes the newcomer's WebSocket; Allow leaves both alone. The
/// hook is asked once per dispute.
#[tokio::test]
async fn uid8_policy_hook_reject_and_allow() {
    for policy in [DuplicateUidPolicy::Reject, DuplicateUidPolicy::Allow] {
        let (server, callbacks, _events) = start_with(Some(policy)).await;
        let callbacks = callbacks.unwrap();
        let addr = server.local_addr();
        let mut original = ws_connect(addr, PATH).await;
        ws_send(&mut original, &first_report(uid(5))).await;
        ws_recv(&mut original).await;
        let mut clone = ws_connect(addr, PATH).await;
        ws_send(&mut clone, &first_report(uid(5))).await;
        ws_recv(&mut clone).await;
        for seq in 1..4 {
            ws_send(&mut original, &report(uid(5), seq)).await;
            assert!(new_uid_of(&ws_recv(&mut original).await).is_none());
        }
        assert_eq!(callbacks.calls.load(Ordering::SeqCst), 1, "{policy:?}");
        match policy {
            DuplicateUidPolicy::Reject => {
                assert_eq!(ws_close_code(&mut clone).await, Some(1000), "closed");
            }
            _ => {
                ws_send(&mut clone, &report(uid(5), 1)).await;
                let r = ws_recv(&mut clone).await;
                assert!(r.agent_identification.is_none(), "Allow: shared");
            }
        }
        drop((original, clone));
        server.shutdown().await;
    }
}

/// UID-2, UID-8: the all-zero uid is 16 bytes but no identity: both transports answer it
/// with a new uid, and no session or application callback sees it.
#[tokio::test]
async fn uid2_nil_uid_gets_a_new_uid_and_is_never_listed() {
    let (server, _, mut events) = start_with(None).await;
    let addr = server.local_addr();
    let nil = InstanceUid::from_array([0; 16]);
    for _ in 0..2 {
        let r = poll(addr, PATH, &first_report(nil)).await;
        let new = new_uid_of(&r).expect("new uid");
        assert!(opamp_server::is_usable_instance_uid(&new));
    }
    assert_eq!(server.service().plain_http_sessions(), 0);

    let mut ws = ws_connect(addr, PATH).await;
    ws_send(&mut ws, &first_report(nil)).await;
    let r = ws_recv(&mut ws).await;
    assert_eq!(&r.instance_uid[..], nil.as_array(), "UID-6");
    let new = new_uid_of(&r).expect("new uid");
    ws_send(&mut ws, &first_report(new)).await;
    let r = ws_recv(&mut ws).await;
    assert_eq!(&r.instance_uid[..], new.as_array());
    assert!(r.agent_identification.is_none());
    let Event::Connected(_) = next_event(&mut events).await else {
        panic!("expected the WebSocket connection")
    };
    let Event::Message(conn, msg) = next_event(&mut events).await else {
        panic!("expected the message of the new uid")
    };
    assert_eq!(
        &msg.instance_uid[..],
        new.as_array(),
        "the nil one never arrived"
    );
    assert_eq!(conn.instance_uid(), Some(new));
    drop(ws);
    server.shutdown().await;
}

/// UID-2 over the wire: wrong lengths get BAD_REQUEST (WebSocket) or 400 (plain HTTP) and
/// harm no other agent.
#[tokio::test]
async fn uid2_wrong_length_uids_get_bad_request_others_unharmed() {
    let (server, _, _events) = start_with(None).await;
    let addr = server.local_addr();
    poll(addr, PATH, &first_report(uid(6))).await;
    let mut ws = ws_connect(addr, PATH).await;
    for len in [0usize, 15, 17] {
        let mut msg = first_report(uid(6));
        msg.instance_uid = Bytes::from(vec![6; len]);
        let resp = http_post(addr, post(PATH, msg.encode_to_vec(), &[])).await;
        assert_eq!(resp.status, http::StatusCode::BAD_REQUEST, "{len}");
        ws_send(&mut ws, &msg).await;
        let r = ws_recv(&mut ws).await;
        assert_eq!(
            r.error_response.unwrap().r#type(),
            ServerErrorResponseType::BadRequest,
            "{len}"
        );
    }
    let r = poll(addr, PATH, &report(uid(6), 1)).await;
    assert_eq!(r.flags, 0, "the agent's session is intact");
    assert_eq!(server.service().plain_http_sessions(), 1);
    drop(ws);
    server.shutdown().await;
}

/// HTTP-5: an `OpAMP-Instance-UID` header with bytes that are not text, a wrong format or
/// another uid gets 400; the agent's session is unharmed: its next good poll continues
/// its sequence with no full-state request and its pending push.
#[tokio::test]
async fn http5_bad_instance_uid_header_gets_400_and_session_is_unharmed() {
    let (server, _, mut events) = start_with(None).await;
    let addr = server.local_addr();
    poll(addr, PATH, &first_report(uid(7))).await;
    let Event::Connected(conn) = next_event(&mut events).await else {
        panic!("expected Connected")
    };
    conn.send(ServerToAgent {
        custom_message: Some(opamp_proto::CustomMessage {
            capability: "x".into(),
            r#type: "t".into(),
            data: Bytes::from_static(b"kept"),
        }),
        ..Default::default()
    })
    .unwrap();
    let body = report(uid(7), 1).encode_to_vec();
    let malformed = "not a hyphenated UUID";
    let bad: Vec<(http::HeaderValue, &str)> = vec![
        (
            http::HeaderValue::from_bytes(b"\xff\xfe-not-text").unwrap(),
            malformed,
        ),
        (
            http::HeaderValue::from_static("07070707070707070707070707070707"),
            malformed,
        ),
        (
            http::HeaderValue::from_static("{07070707-0707-0707-0707-070707070707}"),
            malformed,
        ),
        (http::HeaderValue::from_static(""), malformed),
        (
            http::HeaderValue::from_str(&uid(8).to_string()).unwrap(),
            "differs from instance_uid",
        ),
    ];
    for (value, says) in bad {
        let mut request = post(PATH, body.clone(), &[]);
        request
            .headers_mut()
            .insert("opamp-instance-uid", value.clone());
        let resp = http_post(addr, request).await;
        assert_eq!(resp.status, http::StatusCode::BAD_REQUEST, "{value:?}");
        let text = String::from_utf8_lossy(&resp.body);
        assert!(
            text.contains(says),
            "{value:?}: a clear answer, got {text:?}"
        );
    }
    let r = poll(addr, PATH, &report(uid(7), 1)).await;
    assert_eq!(r.flags, 0, "sequence intact: no ReportFullState");
    assert_eq!(
        r.custom_message.expect("pending push kept").data,
        Bytes::from_static(b"kept")
    );
    assert_eq!(server.service().plain_http_sessions(), 1);
    server.shutdown().await;
}

/// The connection registry by instance uid: `connection(uid)` finds a WebSocket agent and a
/// plain-HTTP session once they sent their first message; `connections()` lists both;
/// `broadcast` reaches both, encoded once (the HTTP agent with the answer to its next
/// poll); a closed WebSocket leaves the registry.
#[tokio::test]
async fn registry_finds_connections_by_uid_and_broadcasts() {
    use opamp_proto::ServerToAgentFlagSet;
    use opamp_server::{SharedMessage, Transport};
    let (rec, _events) = Recorder::quiet();
    let server = Server::bind(loopback_config().build().unwrap(), rec.server_callbacks())
        .await
        .unwrap();
    let addr = server.local_addr();
    let service = server.service().clone();
    let mut ws = ws_connect(addr, PATH).await;
    ws_send(&mut ws, &first_report(uid(1))).await;
    ws_recv(&mut ws).await;
    poll(addr, PATH, &first_report(uid(2))).await;

    let one = service.connection(&uid(1)).expect("the WebSocket agent");
    assert_eq!(one.instance_uid(), Some(uid(1)));
    assert_eq!(one.transport(), Transport::WebSocket);
    let two = service.connection(&uid(2)).expect("the plain-HTTP session");
    assert_eq!(two.transport(), Transport::PlainHttp);
    assert!(service.connection(&uid(3)).is_none());
    let mut listed: Vec<InstanceUid> = service
        .connections()
        .iter()
        .filter_map(|c| c.instance_uid())
        .collect();
    listed.sort_by_key(|u| *u.as_array());
    assert_eq!(listed, vec![uid(1), uid(2)]);

    let ask = SharedMessage::new(ServerToAgent {
        flags: ServerToAgentFlagSet::REPORT_FULL_STATE.bits(),
        ..Default::default()
    });
    let outcome = service.broadcast(&ask);
    assert_eq!((outcome.queued, outcome.refused), (2, 0));
    let pushed = ws_recv(&mut ws).await;
    assert_eq!(pushed.flags, ServerToAgentFlagSet::REPORT_FULL_STATE.bits());
    let answer = poll(addr, PATH, &report(uid(2), 1)).await;
    assert_ne!(
        answer.flags & ServerToAgentFlagSet::REPORT_FULL_STATE.bits(),
        0,
        "the broadcast rides on the next poll"
    );

    drop(ws);
    within(async {
        while service.connection(&uid(1)).is_some() {
            tokio::time::sleep(Duration::from_millis(5)).await;
        }
    })
    .await;
    assert_eq!(service.connections().len(), 1);
    server.shutdown().await;
}
