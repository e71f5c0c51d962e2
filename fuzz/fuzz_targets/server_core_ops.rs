//! Random operation sequences against the server's sans-IO session core (both transports),
//! with random agent messages and application replies. Never a panic, and every outgoing
//! message keeps the spec's invariants:
//! - UID-6: it names the session's agent (16 bytes) once the session has one;
//! - CAP-3: the first message carries the server's capabilities (every one over plain
//!   HTTP), unless it is an `error_response`, which goes alone (S2A-1): then the next one;
//! - S2A-1: an `error_response` goes alone;
//! - S2A-2: a `command` goes without offers or a custom message;
//! - CAP-4: no remote config or package offer to an agent without the capability.
#![no_main]

use std::time::{Duration, Instant};

use libfuzzer_sys::fuzz_target;
use opamp_fuzz::Input;
use opamp_proto::{
    AgentCapabilitySet, AgentToServer, InstanceUid, Message, ServerCapabilitySet, ServerToAgent,
};
use opamp_server::{AgentSession, SessionConfig};

fn check(session: &AgentSession, out: &ServerToAgent, caps_sent: &mut bool, http: bool) {
    if let Some(uid) = session.instance_uid() {
        assert_eq!(out.instance_uid.len(), 16, "UID-6");
        let named = InstanceUid::try_from(&out.instance_uid[..]).unwrap();
        assert!(
            named == uid || session.assigned_instance_uid() == Some(named),
            "UID-6: {named} is neither {uid} nor the assigned uid"
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

fuzz_target!(|data: &[u8]| {
    let mut input = Input::new(data);
    let http = input.byte() & 1 == 1;
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
                check(&session, &out, &mut caps_sent, http);
            }
            // A push from the application: only to a known agent (the calling contract; the
            // drivers hold pushes until the agent's first message).
            2 | 3 if session.instance_uid().is_none() => {}
            2 => {
                let Ok(msg) = ServerToAgent::decode(input.chunk()) else {
                    continue;
                };
                if let Some(out) = session.prepare_push(now, msg) {
                    check(&session, &out, &mut caps_sent, http);
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
