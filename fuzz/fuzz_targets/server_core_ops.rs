//! Random operation sequences against the server's sans-IO session core (both transports),
//! with random agent messages and application replies. Never a panic, and every outgoing
//! message keeps the spec's invariants:
//! - UID-6: it names the session's agent (16 bytes) once the session has one;
//! - CAP-3: the first message carries the server's capabilities (every one over plain
//!   HTTP), unless it is an `error_response`, which goes alone (S2A-1): then the next one;
//! - S2A-1: an `error_response` goes alone;
//! - S2A-2: a `command` goes without offers or a custom message;
//! - CAP-4: no remote config or package offer to an agent without the capability.
//!
//! Half the runs drive the session through its handle/poll contract (`handle_message`,
//! `resolve_duplicate`, `respond`, `queue`, `queue_shared`, `handle_timeout`,
//! `handle_malformed` in; `poll_transmit` out), with a random size limit. Then also:
//! - `poll_transmit` ends (a bounded number of messages per input);
//! - WS-11, HTTP-16: nothing it gives is over the size limit;
//! - HTTP-9: over plain HTTP nothing goes out but answers to requests;
//! - a shared transmit's own part carries only per-agent fields.
#![no_main]

use std::time::{Duration, Instant};

use libfuzzer_sys::fuzz_target;
use opamp_fuzz::Input;
use opamp_proto::{
    AgentCapabilitySet, AgentToServer, InstanceUid, Message, ServerCapabilitySet, ServerToAgent,
};
use opamp_server::{AgentSession, DuplicateUidPolicy, SessionConfig, SharedMessage, Transmit};

/// `answering`: the uid of the message being answered, which a stateless answer (UID-8:
/// an unusable or duplicate uid) names instead of the session's agent (UID-6).
fn check(
    session: &AgentSession,
    out: &ServerToAgent,
    caps_sent: &mut bool,
    http: bool,
    answering: Option<InstanceUid>,
) {
    if let Some(uid) = session.instance_uid() {
        assert_eq!(out.instance_uid.len(), 16, "UID-6");
        let named = InstanceUid::try_from(&out.instance_uid[..]).unwrap();
        assert!(
            named == uid
                || session.assigned_instance_uid() == Some(named)
                || answering == Some(named),
            "UID-6: {named} is neither {uid}, the assigned uid nor the sender's"
        );
    }
    if out.error_response.is_none() && (!*caps_sent || http) {
        assert_ne!(out.capabilities, 0, "CAP-3: {out:?} (http {http})");
    }
    *caps_sent |= out.capabilities != 0;
    if out.error_response.is_some() {
        assert!(
            out.remote_config.is_none()
                && out.connection_settings.is_none()
                && out.packages_available.is_none()
                && out.command.is_none()
                && out.custom_message.is_none(),
            "S2A-1: {out:?}"
        );
    }
    if out.command.is_some() {
        assert!(
            out.remote_config.is_none()
                && out.connection_settings.is_none()
                && out.packages_available.is_none()
                && out.custom_message.is_none(),
            "S2A-2: {out:?}"
        );
    }
    let caps = session.agent_capabilities();
    if out.remote_config.is_some() {
        assert!(
            caps.contains(AgentCapabilitySet::ACCEPTS_REMOTE_CONFIG),
            "CAP-4"
        );
    }
    if out.packages_available.is_some() {
        assert!(caps.contains(AgentCapabilitySet::ACCEPTS_PACKAGES), "CAP-4");
    }
}

/// Everything `poll_transmit` gives now, checked.
fn drain(
    session: &mut AgentSession,
    now: Instant,
    caps_sent: &mut bool,
    http: bool,
    limit: usize,
    answering: Option<InstanceUid>,
) -> usize {
    let mut n = 0;
    while let Some(t) = session.poll_transmit(now) {
        n += 1;
        assert!(n <= 16, "poll_transmit does not end");
        if let Transmit::Shared { head, .. } = &t {
            assert!(
                head.remote_config.is_none()
                    && head.connection_settings.is_none()
                    && head.packages_available.is_none()
                    && head.command.is_none()
                    && head.custom_message.is_none()
                    && head.error_response.is_none(),
                "a shared transmit's own part: {head:?}"
            );
        }
        let out = t.into_message();
        let framing = usize::from(!http);
        assert!(
            framing + out.encoded_len() <= limit,
            "WS-11, HTTP-16: {} bytes over {limit}",
            out.encoded_len()
        );
        check(session, &out, caps_sent, http, answering);
    }
    n
}

/// The handle/poll contract, random operations.
fn contract(mut input: Input<'_>, http: bool) {
    let caps = ServerCapabilitySet::all();
    let limit = match input.byte() {
        0..=127 => opamp_proto::DEFAULT_MAX_MESSAGE_SIZE,
        b => 16 + usize::from(b) * 8,
    };
    let config = if http {
        SessionConfig::plain_http(caps)
    } else {
        SessionConfig::websocket(caps)
    }
    .with_full_state_min_interval(Duration::from_secs(u64::from(input.byte())))
    .with_max_message_size(limit);
    let mut session = AgentSession::new(config);
    let mut now = Instant::now();
    let mut caps_sent = false;
    let mut uid_counter = 0u8;
    let mut provide = |session: &mut AgentSession| {
        if session.needs_instance_uid() {
            uid_counter = uid_counter.wrapping_add(1);
            session.provide_instance_uid(InstanceUid::from([0xa0 | (uid_counter & 0xf); 16]));
        }
    };
    let mut answering = None;
    while !input.is_empty() {
        let op = input.byte() % 9;
        let answers = matches!(op, 0 | 1 | 5 | 6);
        match op {
            // An agent message; answered at once or by a later op.
            0 | 1 => {
                let Ok(mut msg) = AgentToServer::decode(input.chunk()) else {
                    continue;
                };
                match input.byte() % 4 {
                    0 => msg.instance_uid = vec![0; 16].into(), // unusable (UID-8)
                    1 => {}
                    _ => msg.instance_uid = vec![input.byte() % 3 + 1; 16].into(),
                }
                answering = InstanceUid::try_from(&msg.instance_uid[..]).ok();
                let received = match session.handle_message(now, &msg) {
                    Ok(r) => r,
                    Err(e) => {
                        session.handle_malformed(&e);
                        drain(&mut session, now, &mut caps_sent, http, limit, answering);
                        continue;
                    }
                };
                if received.duplicate {
                    let policy = match input.byte() % 3 {
                        0 => DuplicateUidPolicy::Reassign,
                        1 => DuplicateUidPolicy::Reject,
                        _ => DuplicateUidPolicy::Allow,
                    };
                    session.resolve_duplicate(received.instance_uid, policy);
                }
                provide(&mut session);
                if input.byte() & 1 == 0 {
                    session.respond(ServerToAgent::decode(input.chunk()).ok());
                }
            }
            2 => {
                let Ok(msg) = ServerToAgent::decode(input.chunk()) else {
                    continue;
                };
                session.queue(msg);
            }
            3 => {
                let Ok(msg) = ServerToAgent::decode(input.chunk()) else {
                    continue;
                };
                session.queue_shared(&SharedMessage::new(msg));
            }
            // The application answers a message handled earlier (ignored if none waits).
            5 => session.respond(ServerToAgent::decode(input.chunk()).ok()),
            6 => session.handle_malformed(&opamp_server::ReadMessageError::TextFrame),
            7 => session.handle_timeout(now),
            _ => now += Duration::from_millis(u64::from(input.u16()) * 100),
        }
        let sent = drain(&mut session, now, &mut caps_sent, http, limit, answering);
        if http && !answers {
            assert_eq!(sent, 0, "HTTP-9: plain HTTP only answers requests");
        }
    }
}

fuzz_target!(|data: &[u8]| {
    let mut input = Input::new(data);
    let mode = input.byte();
    let http = mode & 1 == 1;
    if mode & 2 == 2 {
        contract(input, http);
        return;
    }
    let caps = ServerCapabilitySet::all();
    let config = if http {
        SessionConfig::plain_http(caps)
    } else {
        SessionConfig::websocket(caps)
    }
    .with_full_state_min_interval(Duration::from_secs(u64::from(input.byte())));
    let mut session = AgentSession::new(config);
    let start = Instant::now();
    let mut now = start;
    let mut caps_sent = false;
    let mut uid_counter = 0u8;
    while !input.is_empty() {
        match input.byte() % 6 {
            // An agent message, then the reply to it.
            0 | 1 => {
                let Ok(mut msg) = AgentToServer::decode(input.chunk()) else {
                    continue;
                };
                if input.byte() & 1 == 0 {
                    // Mostly a valid uid of a small set, so sessions go on.
                    msg.instance_uid = vec![input.byte() % 3 + 1; 16].into();
                }
                if session.handle_message(now, &msg).is_err() {
                    continue;
                }
                if session.needs_instance_uid() {
                    uid_counter = uid_counter.wrapping_add(1);
                    session
                        .provide_instance_uid(InstanceUid::from([0xa0 | (uid_counter & 0xf); 16]));
                }
                let reply = ServerToAgent::decode(input.chunk()).ok();
                let out = session.prepare_reply(now, reply);
                check(&session, &out, &mut caps_sent, http, None);
            }
            // A push from the application: only to a known agent (the calling contract; the
            // drivers hold pushes until the agent's first message).
            2 | 3 if session.instance_uid().is_none() => {}
            2 => {
                let Ok(msg) = ServerToAgent::decode(input.chunk()) else {
                    continue;
                };
                if let Some(out) = session.prepare_push(now, msg) {
                    check(&session, &out, &mut caps_sent, http, None);
                }
            }
            // A shared push.
            3 => {
                let Ok(msg) = ServerToAgent::decode(input.chunk()) else {
                    continue;
                };
                let _ = session.prepare_shared_push(now, &msg);
            }
            // Time passes.
            _ => now += Duration::from_millis(u64::from(input.u16()) * 100),
        }
    }
});
