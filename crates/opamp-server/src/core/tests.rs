//! Deterministic tests of the protocol core: no sockets, no sleeps; `now` is a virtual clock.

use std::time::{Duration, Instant};

use bytes::Bytes;
use opamp_proto::{
    AgentCapabilitySet as A, AgentDescription, AgentDisconnect, AgentRemoteConfig, AgentToServer,
    AgentToServerFlagSet, ConnectionSettingsOffers, InstanceUid, OpAmpConnectionSettings,
    PackageStatuses, PackagesAvailable, RemoteConfigStatus, ServerCapabilitySet as S,
    ServerToAgent, ServerToAgentCommand, ServerToAgentFlagSet as F, TelemetryConnectionSettings,
};

use super::*;
use crate::bad_request;

const UID: [u8; 16] = [7; 16];

/// A virtual clock.
struct Clock(Instant);

impl Clock {
    fn new() -> Self {
        Self(Instant::now())
    }
    fn now(&self) -> Instant {
        self.0
    }
    fn advance(&mut self, d: Duration) {
        self.0 += d;
    }
}

fn caps() -> A {
    A::REPORTS_STATUS | A::ACCEPTS_REMOTE_CONFIG | A::REPORTS_REMOTE_CONFIG
}

fn report(seq: u64) -> AgentToServer {
    AgentToServer {
        instance_uid: Bytes::from_static(&UID),
        sequence_num: seq,
        capabilities: caps().bits(),
        ..Default::default()
    }
}

fn full_report(seq: u64) -> AgentToServer {
    AgentToServer {
        agent_description: Some(AgentDescription::default()),
        ..report(seq)
    }
}

fn ws_session() -> AgentSession {
    AgentSession::new(SessionConfig::websocket(crate::DEFAULT_SERVER_CAPABILITIES))
}

fn full_state(m: &ServerToAgent) -> bool {
    F::from_bits_retain(m.flags).contains(F::REPORT_FULL_STATE)
}

/// Sends `msg` and returns the completed acknowledgement.
fn exchange(s: &mut AgentSession, msg: &AgentToServer, now: Instant) -> ServerToAgent {
    s.handle_message(now, msg).unwrap();
    s.prepare_reply(now, None)
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

#[test]
fn rep_4_every_message_gets_a_reply_with_its_instance_uid() {
    let clock = Clock::new();
    let mut s = ws_session();
    let r = exchange(&mut s, &full_report(0), clock.now());
    assert_eq!(&r.instance_uid[..], &UID, "UID-6");
    assert!(r.error_response.is_none());
}

#[test]
fn cap_3_capabilities_in_first_reply_only_on_websocket() {
    let clock = Clock::new();
    let mut s = ws_session();
    let first = exchange(&mut s, &full_report(0), clock.now());
    let caps = S::from_bits_retain(first.capabilities);
    assert!(caps.contains(S::ACCEPTS_STATUS));
    assert_eq!(caps, crate::DEFAULT_SERVER_CAPABILITIES);
    let second = exchange(&mut s, &report(1), clock.now());
    assert_eq!(second.capabilities, 0, "0 means unchanged after the first");
}

#[test]
fn cap_3_capabilities_in_every_plain_http_reply() {
    let clock = Clock::new();
    let mut s = AgentSession::new(SessionConfig::plain_http(S::OFFERS_REMOTE_CONFIG));
    for seq in 0..3 {
        let msg = if seq == 0 {
            full_report(0)
        } else {
            report(seq)
        };
        let r = exchange(&mut s, &msg, clock.now());
        assert_eq!(
            r.capabilities,
            (S::ACCEPTS_STATUS | S::OFFERS_REMOTE_CONFIG).bits(),
            "poll {seq}"
        );
    }
}

#[test]
fn cap_3_first_reply_capabilities_survive_a_push_before_it() {
    let clock = Clock::new();
    let mut s = ws_session();
    s.handle_message(clock.now(), &full_report(0)).unwrap();
    let push = s.prepare_push(clock.now(), remote_config(b"h1")).unwrap();
    assert_ne!(push.capabilities, 0, "the push is the first ServerToAgent");
    let reply = s.prepare_reply(clock.now(), None);
    assert_eq!(reply.capabilities, 0);
}

#[test]
fn seq_2_unknown_agent_without_full_state_is_asked_for_it() {
    let clock = Clock::new();
    let mut s = ws_session();
    let r = exchange(&mut s, &report(41), clock.now());
    assert!(full_state(&r));
    // The complete report that answers it does not trigger another request.
    let r = exchange(&mut s, &full_report(42), clock.now());
    assert!(!full_state(&r));
}

#[test]
fn seq_2_first_message_with_description_is_not_asked_again() {
    let clock = Clock::new();
    let mut s = ws_session();
    let r = exchange(&mut s, &full_report(0), clock.now());
    assert!(!full_state(&r));
}

#[test]
fn seq_2_consecutive_numbers_need_nothing() {
    let clock = Clock::new();
    let mut s = ws_session();
    exchange(&mut s, &full_report(0), clock.now());
    for seq in 1..20 {
        assert!(!full_state(&exchange(&mut s, &report(seq), clock.now())));
    }
}

#[test]
fn seq_2_gap_asks_for_full_state() {
    let mut clock = Clock::new();
    let mut s = ws_session();
    exchange(&mut s, &full_report(0), clock.now());
    exchange(&mut s, &report(1), clock.now());
    clock.advance(Duration::from_secs(60));
    let r = exchange(&mut s, &report(3), clock.now());
    assert!(full_state(&r), "message 2 was lost");
    assert!(!s.full_state_pending());
}

#[test]
fn seq_2_counter_reset_after_agent_restart_asks_for_full_state() {
    let clock = Clock::new();
    let mut s = ws_session();
    exchange(&mut s, &full_report(10), clock.now());
    let r = exchange(&mut s, &report(0), clock.now());
    assert!(full_state(&r));
}

#[test]
fn retry_2_repeated_number_is_answered_and_triggers_nothing() {
    // The PyPI Python client repeats numbers.
    let clock = Clock::new();
    let mut s = ws_session();
    exchange(&mut s, &full_report(0), clock.now());
    exchange(&mut s, &report(1), clock.now());
    let received = s.handle_message(clock.now(), &report(1)).unwrap();
    assert!(received.repeated);
    let r = s.prepare_reply(clock.now(), None);
    assert!(!full_state(&r));
    assert_eq!(&r.instance_uid[..], &UID);
    // And the sequence continues normally.
    assert!(!full_state(&exchange(&mut s, &report(2), clock.now())));
}

#[test]
fn seq_2_skip_asks_once_not_in_a_loop() {
    // A client that skips numbers, including in the report answering ReportFullState, is
    // asked once per interval, not at every message.
    let mut clock = Clock::new();
    let mut s = ws_session();
    exchange(&mut s, &full_report(0), clock.now());
    let r = exchange(&mut s, &report(2), clock.now());
    assert!(full_state(&r), "first skip asks");
    let mut asks = 0;
    let mut seq = 2;
    for _ in 0..10 {
        clock.advance(Duration::from_secs(1));
        seq += 2; // keeps skipping, answering with full state
        let r = exchange(&mut s, &full_report(seq), clock.now());
        asks += usize::from(full_state(&r));
    }
    assert_eq!(asks, 0, "no loop within the minimum interval");
    // Past the interval, a new loss is asked about again (once).
    clock.advance(crate::DEFAULT_FULL_STATE_MIN_INTERVAL);
    seq += 5;
    assert!(full_state(&exchange(&mut s, &report(seq), clock.now())));
    seq += 5;
    assert!(!full_state(&exchange(&mut s, &report(seq), clock.now())));
}

#[test]
fn seq_2_gap_inside_the_rate_limit_window_is_asked_for_later_not_dropped() {
    // The first message lacks a description: full state is asked for. Five seconds later a
    // message is lost. That gap MUST still be asked for (SEQ-2): once the window has passed,
    // with the next message the agent gets, even if it arrives in order.
    let mut clock = Clock::new();
    let mut s = ws_session();
    assert!(full_state(&exchange(&mut s, &report(0), clock.now())));
    clock.advance(Duration::from_secs(1));
    exchange(&mut s, &full_report(1), clock.now());
    clock.advance(Duration::from_secs(4));
    assert!(
        !full_state(&exchange(&mut s, &report(3), clock.now())),
        "inside the window"
    );
    clock.advance(crate::DEFAULT_FULL_STATE_MIN_INTERVAL);
    assert!(
        full_state(&exchange(&mut s, &report(4), clock.now())),
        "asked once the window passed"
    );
    clock.advance(Duration::from_secs(1));
    assert!(
        !full_state(&exchange(&mut s, &report(5), clock.now())),
        "and only once"
    );
}

#[test]
fn seq_2_full_state_request_waits_behind_an_error_reply() {
    // S2A-1: an error reply carries nothing else; the owed flag goes with the next reply.
    let clock = Clock::new();
    let mut s = ws_session();
    s.handle_message(clock.now(), &report(5)).unwrap();
    let r = s.prepare_reply(clock.now(), Some(bad_request("no")));
    assert!(r.error_response.is_some());
    assert_eq!(r.flags, 0);
    assert_eq!(
        r.capabilities, 0,
        "checklist ambiguity 24: no capabilities with an error"
    );
    assert_eq!(&r.instance_uid[..], &UID);
    let r = exchange(&mut s, &report(6), clock.now());
    assert!(full_state(&r));
    assert_ne!(r.capabilities, 0);
}

#[test]
fn uid_5_request_instance_uid_is_answered_with_a_new_uid() {
    let clock = Clock::new();
    let mut s = ws_session();
    let mut msg = full_report(0);
    msg.flags = AgentToServerFlagSet::REQUEST_INSTANCE_UID.bits();
    s.handle_message(clock.now(), &msg).unwrap();
    assert!(s.needs_instance_uid(), "the core asks the driver for a uid");
    s.provide_instance_uid(InstanceUid::from_array([0x5a; 16]));
    assert!(!s.needs_instance_uid());
    let r = s.prepare_reply(clock.now(), None);
    assert_eq!(
        &r.instance_uid[..],
        &UID,
        "UID-6: the reply names the old uid"
    );
    let new = r.agent_identification.expect("UID-5").new_instance_uid;
    let new = InstanceUid::try_from(&new[..]).expect("UID-7: 16 bytes");
    assert_ne!(new.as_array(), &UID);
    assert_eq!(s.assigned_instance_uid(), Some(new));

    assert_eq!(new, InstanceUid::from_array([0x5a; 16]), "the provided uid");

    // A repeated request before switching gets the same uid.
    msg.sequence_num = 1;
    s.handle_message(clock.now(), &msg).unwrap();
    assert!(!s.needs_instance_uid(), "one uid until the agent switches");
    s.provide_instance_uid(InstanceUid::from_array([0x6b; 16]));
    let r = s.prepare_reply(clock.now(), None);
    assert_eq!(
        &r.agent_identification.unwrap().new_instance_uid[..],
        new.as_array()
    );

    // UID-7: the agent switches; the session follows it without asking for full state.
    let mut next = report(2);
    next.instance_uid = new.to_bytes();
    let received = s.handle_message(clock.now(), &next).unwrap();
    assert_eq!(received.switched_from, Some(InstanceUid::from_array(UID)));
    let r = s.prepare_reply(clock.now(), None);
    assert_eq!(&r.instance_uid[..], new.as_array());
    assert!(!full_state(&r));
    assert!(r.agent_identification.is_none());
    assert_eq!(s.assigned_instance_uid(), None);
}

#[test]
fn uid_7_application_chosen_uid_is_used_and_invalid_one_dropped() {
    let clock = Clock::new();
    let mut s = ws_session();
    let mut msg = full_report(0);
    msg.flags = AgentToServerFlagSet::REQUEST_INSTANCE_UID.bits();
    s.handle_message(clock.now(), &msg).unwrap();
    s.provide_instance_uid(InstanceUid::from_array([0x5a; 16]));
    let bad = ServerToAgent {
        agent_identification: Some(opamp_proto::AgentIdentification {
            new_instance_uid: Bytes::from_static(&[1; 5]),
        }),
        ..Default::default()
    };
    let r = s.prepare_reply(clock.now(), Some(bad));
    let got = r
        .agent_identification
        .expect("replaced by a valid generated uid");
    assert_eq!(got.new_instance_uid.len(), 16);

    let mut s = ws_session();
    s.handle_message(clock.now(), &msg).unwrap();
    let chosen = ServerToAgent {
        agent_identification: Some(opamp_proto::AgentIdentification {
            new_instance_uid: Bytes::from_static(&[9; 16]),
        }),
        ..Default::default()
    };
    let r = s.prepare_reply(clock.now(), Some(chosen));
    assert_eq!(
        &r.agent_identification.unwrap().new_instance_uid[..],
        &[9; 16]
    );
    assert_eq!(
        s.assigned_instance_uid(),
        Some(InstanceUid::from_array([9; 16]))
    );
}

#[test]
fn uid_2_wrong_length_uid_is_an_error() {
    let clock = Clock::new();
    let mut s = ws_session();
    let mut msg = report(0);
    msg.instance_uid = Bytes::from_static(b"short");
    assert!(matches!(
        s.handle_message(clock.now(), &msg),
        Err(crate::ReadMessageError::InstanceUid(_))
    ));
    assert_eq!(s.instance_uid(), None);
}

#[test]
fn ws_21_another_uid_on_the_stream_starts_over() {
    let clock = Clock::new();
    let mut s = ws_session();
    exchange(&mut s, &full_report(0), clock.now());
    let mut other = report(100);
    other.instance_uid = Bytes::from_static(&[8; 16]);
    let received = s.handle_message(clock.now(), &other).unwrap();
    assert!(received.first);
    let r = s.prepare_reply(clock.now(), None);
    assert!(full_state(&r), "unknown agent without description");
    assert_ne!(r.capabilities, 0, "first reply to this agent");
}

#[test]
fn cap_4_offers_are_gated_on_agent_capabilities() {
    let clock = Clock::new();
    let mut s = ws_session();
    let mut msg = full_report(0);
    msg.capabilities = A::REPORTS_STATUS.bits(); // accepts nothing
    s.handle_message(clock.now(), &msg).unwrap();
    let offer = ServerToAgent {
        packages_available: Some(PackagesAvailable::default()),
        command: Some(ServerToAgentCommand::default()),
        connection_settings: Some(ConnectionSettingsOffers {
            opamp: Some(OpAmpConnectionSettings::default()),
            own_metrics: Some(TelemetryConnectionSettings::default()),
            ..Default::default()
        }),
        flags: F::REPORT_AVAILABLE_COMPONENTS.bits(),
        ..remote_config(b"h")
    };
    let r = s.prepare_reply(clock.now(), Some(offer.clone()));
    assert!(r.remote_config.is_none());
    assert!(r.packages_available.is_none());
    assert!(r.command.is_none());
    assert!(r.connection_settings.is_none());
    assert_eq!(r.flags, 0);

    // CAP-2: new capabilities are honoured from the next message on.
    let mut msg = report(1);
    msg.capabilities = (A::REPORTS_STATUS
        | A::ACCEPTS_REMOTE_CONFIG
        | A::ACCEPTS_PACKAGES
        | A::ACCEPTS_OPAMP_CONNECTION_SETTINGS)
        .bits();
    s.handle_message(clock.now(), &msg).unwrap();
    let mut offer = offer;
    offer.command = None;
    let r = s.prepare_reply(clock.now(), Some(offer));
    assert!(r.remote_config.is_some());
    assert!(r.packages_available.is_some());
    let cs = r.connection_settings.expect("opamp settings accepted");
    assert!(cs.opamp.is_some());
    assert!(cs.own_metrics.is_none(), "ReportsOwnMetrics missing");
}

#[test]
fn cap_4_heartbeat_interval_needs_reports_heartbeat() {
    let clock = Clock::new();
    let mut s = ws_session();
    let mut msg = full_report(0);
    msg.capabilities = (A::REPORTS_STATUS | A::ACCEPTS_OPAMP_CONNECTION_SETTINGS).bits();
    s.handle_message(clock.now(), &msg).unwrap();
    let offer = ServerToAgent {
        connection_settings: Some(ConnectionSettingsOffers {
            hash: Bytes::from_static(b"cs"),
            opamp: Some(OpAmpConnectionSettings {
                heartbeat_interval_seconds: 10,
                ..Default::default()
            }),
            ..Default::default()
        }),
        ..Default::default()
    };
    let r = s.prepare_reply(clock.now(), Some(offer));
    assert_eq!(
        r.connection_settings
            .unwrap()
            .opamp
            .unwrap()
            .heartbeat_interval_seconds,
        0
    );
}

#[test]
fn cap_4_offers_the_server_did_not_advertise_are_removed() {
    let clock = Clock::new();
    let mut s = AgentSession::new(SessionConfig::websocket(S::ACCEPTS_STATUS));
    s.handle_message(clock.now(), &full_report(0)).unwrap();
    let r = s.prepare_reply(clock.now(), Some(remote_config(b"h")));
    assert!(r.remote_config.is_none());
}

#[test]
fn rc_6_config_the_agent_reports_is_not_resent() {
    let clock = Clock::new();
    let mut s = ws_session();
    let mut msg = full_report(0);
    msg.remote_config_status = Some(RemoteConfigStatus {
        last_remote_config_hash: Bytes::from_static(b"h1"),
        ..Default::default()
    });
    s.handle_message(clock.now(), &msg).unwrap();
    let r = s.prepare_reply(clock.now(), Some(remote_config(b"h1")));
    assert!(r.remote_config.is_none(), "agent already has h1");
    // A different hash differs from what the agent reports: it MUST be included (RC-6).
    s.handle_message(clock.now(), &report(1)).unwrap();
    let r = s.prepare_reply(clock.now(), Some(remote_config(b"h2")));
    assert!(r.remote_config.is_some());
}

#[test]
fn rc_4_config_is_not_resent_while_unchanged() {
    let clock = Clock::new();
    let mut s = ws_session();
    s.handle_message(clock.now(), &full_report(0)).unwrap();
    assert!(
        s.prepare_reply(clock.now(), Some(remote_config(b"h1")))
            .remote_config
            .is_some()
    );
    // The application returns the same desired config at every message.
    s.handle_message(clock.now(), &report(1)).unwrap();
    assert!(
        s.prepare_reply(clock.now(), Some(remote_config(b"h1")))
            .remote_config
            .is_none()
    );
    assert!(s.prepare_push(clock.now(), remote_config(b"h1")).is_none());
    // The agent reports APPLYING h1: still not resent.
    let mut msg = report(2);
    msg.remote_config_status = Some(RemoteConfigStatus {
        last_remote_config_hash: Bytes::from_static(b"h1"),
        ..Default::default()
    });
    s.handle_message(clock.now(), &msg).unwrap();
    assert!(
        s.prepare_reply(clock.now(), Some(remote_config(b"h1")))
            .remote_config
            .is_none()
    );
    // The agent reports another hash (it lost h1, e.g. rolled back): RC-6 resends.
    let mut msg = report(3);
    msg.remote_config_status = Some(RemoteConfigStatus {
        last_remote_config_hash: Bytes::from_static(b"old"),
        ..Default::default()
    });
    s.handle_message(clock.now(), &msg).unwrap();
    assert!(
        s.prepare_reply(clock.now(), Some(remote_config(b"h1")))
            .remote_config
            .is_some()
    );
}

#[test]
fn rc_4_config_without_hash_is_always_sent() {
    let clock = Clock::new();
    let mut s = ws_session();
    s.handle_message(clock.now(), &full_report(0)).unwrap();
    for _ in 0..2 {
        assert!(
            s.prepare_reply(clock.now(), Some(remote_config(b"")))
                .remote_config
                .is_some()
        );
    }
}

#[test]
fn pkg_15_packages_with_reported_hash_are_not_resent() {
    let clock = Clock::new();
    let mut s = ws_session();
    let mut msg = full_report(0);
    msg.capabilities |= A::ACCEPTS_PACKAGES.bits();
    msg.package_statuses = Some(PackageStatuses {
        server_provided_all_packages_hash: Bytes::from_static(b"p1"),
        ..Default::default()
    });
    s.handle_message(clock.now(), &msg).unwrap();
    let offer = |h: &'static [u8]| ServerToAgent {
        packages_available: Some(PackagesAvailable {
            all_packages_hash: Bytes::from_static(h),
            ..Default::default()
        }),
        ..Default::default()
    };
    assert!(
        s.prepare_reply(clock.now(), Some(offer(b"p1")))
            .packages_available
            .is_none()
    );
    let mut next = report(1);
    next.capabilities |= A::ACCEPTS_PACKAGES.bits();
    s.handle_message(clock.now(), &next).unwrap();
    assert!(
        s.prepare_reply(clock.now(), Some(offer(b"p2")))
            .packages_available
            .is_some()
    );
}

#[test]
fn connection_settings_hash_is_not_resent() {
    let clock = Clock::new();
    let mut s = ws_session();
    let mut msg = full_report(0);
    msg.capabilities |= A::ACCEPTS_OPAMP_CONNECTION_SETTINGS.bits();
    s.handle_message(clock.now(), &msg).unwrap();
    let offer = ServerToAgent {
        connection_settings: Some(ConnectionSettingsOffers {
            hash: Bytes::from_static(b"c1"),
            opamp: Some(OpAmpConnectionSettings::default()),
            ..Default::default()
        }),
        ..Default::default()
    };
    assert!(
        s.prepare_reply(clock.now(), Some(offer.clone()))
            .connection_settings
            .is_some()
    );
    let mut next = report(1);
    next.capabilities |= A::ACCEPTS_OPAMP_CONNECTION_SETTINGS.bits();
    s.handle_message(clock.now(), &next).unwrap();
    assert!(
        s.prepare_reply(clock.now(), Some(offer))
            .connection_settings
            .is_none()
    );
}

#[test]
fn s2a_2_command_goes_alone_and_owed_items_wait() {
    let clock = Clock::new();
    let mut s = ws_session();
    let mut msg = report(3); // unknown agent without description: full state owed
    msg.capabilities |= A::ACCEPTS_RESTART_COMMAND.bits();
    s.handle_message(clock.now(), &msg).unwrap();
    let r = s.prepare_reply(
        clock.now(),
        Some(ServerToAgent {
            command: Some(ServerToAgentCommand::default()),
            ..remote_config(b"h1")
        }),
    );
    assert!(r.command.is_some());
    assert!(r.remote_config.is_none());
    assert_eq!(r.flags, 0);
    assert_ne!(r.capabilities, 0, "capabilities may accompany a command");
    // The config was not recorded as sent, and the flag is still owed.
    s.handle_message(clock.now(), &report(4)).unwrap();
    let r = s.prepare_reply(clock.now(), Some(remote_config(b"h1")));
    assert!(r.remote_config.is_some());
    assert!(full_state(&r));
}

#[test]
fn push_with_nothing_left_is_not_sent() {
    let clock = Clock::new();
    let mut s = ws_session();
    let mut msg = full_report(0);
    msg.capabilities = A::REPORTS_STATUS.bits();
    s.handle_message(clock.now(), &msg).unwrap();
    let _ = s.prepare_reply(clock.now(), None);
    assert!(s.prepare_push(clock.now(), remote_config(b"h")).is_none());
    assert!(
        s.prepare_push(clock.now(), bad_request("x"))
            .is_some_and(|m| m.error_response.is_some())
    );
}

#[test]
fn dis_2_agent_disconnect_is_reported() {
    let clock = Clock::new();
    let mut s = ws_session();
    let mut msg = full_report(0);
    msg.agent_disconnect = Some(AgentDisconnect {});
    assert!(s.handle_message(clock.now(), &msg).unwrap().disconnect);
}

#[test]
fn cap_1_zero_capabilities_keep_the_last_set() {
    let clock = Clock::new();
    let mut s = ws_session();
    s.handle_message(clock.now(), &full_report(0)).unwrap();
    let mut poll = report(1);
    poll.capabilities = 0;
    s.handle_message(clock.now(), &poll).unwrap();
    assert_eq!(s.agent_capabilities(), caps());
}

#[test]
fn shared_push_goes_out_shared_behind_per_agent_fields() {
    let clock = Clock::new();
    let mut s = ws_session();
    exchange(&mut s, &full_report(0), clock.now());
    let shared = remote_config(b"h1");
    match s.prepare_shared_push(clock.now(), &shared) {
        PushPlan::Shared(own) => {
            assert_eq!(&own.instance_uid[..], &UID, "UID-6: the agent's own uid");
            assert!(
                own.remote_config.is_none(),
                "the offer itself is in the shared bytes"
            );
        }
        other => panic!("expected a shared plan, got {other:?}"),
    }
    // RC-4: the same config again is not re-sent.
    assert_eq!(s.prepare_shared_push(clock.now(), &shared), PushPlan::Skip);
}

#[test]
fn shared_push_is_skipped_when_the_agent_reports_the_hash_rc_6() {
    let clock = Clock::new();
    let mut s = ws_session();
    let mut msg = full_report(0);
    msg.remote_config_status = Some(RemoteConfigStatus {
        last_remote_config_hash: Bytes::from_static(b"h1"),
        ..Default::default()
    });
    exchange(&mut s, &msg, clock.now());
    assert_eq!(
        s.prepare_shared_push(clock.now(), &remote_config(b"h1")),
        PushPlan::Skip
    );
}

#[test]
fn shared_push_changed_for_one_agent_is_sent_as_its_own_message_cap_4() {
    let clock = Clock::new();
    let mut s = ws_session();
    // This agent does not accept remote config: the config is stripped, the command stays.
    let mut msg = full_report(0);
    msg.capabilities = (A::REPORTS_STATUS | A::ACCEPTS_RESTART_COMMAND).bits();
    exchange(&mut s, &msg, clock.now());
    let mut shared = remote_config(b"h1");
    shared.custom_capabilities = Some(opamp_proto::CustomCapabilities {
        capabilities: vec!["io.example.cap".into()],
    });
    match s.prepare_shared_push(clock.now(), &shared) {
        PushPlan::Owned(out) => {
            assert!(
                out.remote_config.is_none(),
                "stripped: no AcceptsRemoteConfig"
            );
            assert!(out.custom_capabilities.is_some());
            assert_eq!(&out.instance_uid[..], &UID);
        }
        other => panic!("expected an owned plan, got {other:?}"),
    }
}

/// splitmix64, for the seeded operation sequences below.
struct Rng(u64);

impl Rng {
    fn next(&mut self) -> u64 {
        self.0 = self.0.wrapping_add(0x9e37_79b9_7f4a_7c15);
        let mut z = self.0;
        z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
        z ^ (z >> 31)
    }
    fn chance(&mut self, percent: u64) -> bool {
        self.next() % 100 < percent
    }
    fn pick<T: Copy>(&mut self, items: &[T]) -> T {
        items[(self.next() % items.len() as u64) as usize]
    }
}

fn random_server_message(rng: &mut Rng) -> Option<ServerToAgent> {
    let hashes: [&'static [u8]; 3] = [b"h1", b"h2", b"h3"];
    let mut m = ServerToAgent::default();
    match rng.next() % 9 {
        0 => return None,
        1 => m = remote_config(rng.pick(&hashes)),
        2 => m = bad_request("no"),
        3 => m = crate::unavailable("busy", Some(Duration::from_secs(rng.next() % 100))),
        4 => m.command = Some(ServerToAgentCommand::default()),
        5 => {
            m.connection_settings = Some(ConnectionSettingsOffers {
                hash: Bytes::from_static(rng.pick(&hashes)),
                opamp: Some(OpAmpConnectionSettings {
                    heartbeat_interval_seconds: rng.next() % 3 * 30,
                    ..Default::default()
                }),
                own_metrics: rng.chance(50).then(TelemetryConnectionSettings::default),
                ..Default::default()
            })
        }
        6 => {
            m.packages_available = Some(PackagesAvailable {
                all_packages_hash: Bytes::from_static(rng.pick(&hashes)),
                ..Default::default()
            })
        }
        7 => m.flags = F::REPORT_FULL_STATE.bits(),
        _ => {
            m = remote_config(rng.pick(&hashes));
            m.custom_message = Some(opamp_proto::CustomMessage::default());
        }
    }
    Some(m)
}

fn random_agent_message(rng: &mut Rng, seq: &mut u64) -> AgentToServer {
    let uids: [&'static [u8]; 3] = [&[1; 16], &[2; 16], &[3; 5]];
    let hashes: [&'static [u8]; 4] = [b"", b"h1", b"h2", b"h3"];
    *seq = match rng.next() % 10 {
        0 => *seq,                      // a repeat (RETRY-2)
        1 => rng.next() % 1000,         // a jump, backwards or forwards
        2 => u64::MAX - rng.next() % 2, // the edge of the counter
        _ => seq.wrapping_add(1),
    };
    let mut caps = A::from_bits_truncate(rng.next()) | A::REPORTS_STATUS;
    if rng.chance(20) {
        caps = A::from_bits_retain(rng.next()); // undefined bits from a newer agent
    }
    AgentToServer {
        instance_uid: Bytes::from_static(if rng.chance(95) {
            rng.pick(&uids[..2])
        } else {
            uids[2]
        }),
        sequence_num: *seq,
        capabilities: caps.bits(),
        flags: if rng.chance(10) {
            AgentToServerFlagSet::REQUEST_INSTANCE_UID.bits()
        } else {
            0
        },
        agent_description: rng.chance(30).then(AgentDescription::default),
        remote_config_status: rng.chance(30).then(|| RemoteConfigStatus {
            last_remote_config_hash: Bytes::from_static(rng.pick(&hashes)),
            ..Default::default()
        }),
        package_statuses: rng.chance(10).then(|| PackageStatuses {
            server_provided_all_packages_hash: Bytes::from_static(rng.pick(&hashes)),
            ..Default::default()
        }),
        agent_disconnect: rng.chance(3).then(AgentDisconnect::default),
        ..Default::default()
    }
}

/// The rules every message the core lets out must keep, whatever came before.
fn check_outgoing(s: &AgentSession, m: &ServerToAgent, agent_caps: A, step: usize) {
    let ctx = || format!("step {step}: {m:?}");
    if let Some(uid) = s.instance_uid() {
        assert_eq!(&m.instance_uid[..], uid.as_array(), "UID-6 {}", ctx());
    }
    assert!(
        S::all().contains(S::from_bits_retain(m.capabilities)),
        "CAP-3 undefined bits {}",
        ctx()
    );
    assert!(
        F::all().contains(F::from_bits_retain(m.flags)),
        "undefined flags {}",
        ctx()
    );
    if m.error_response.is_some() {
        let rest = ServerToAgent {
            instance_uid: Bytes::new(),
            error_response: None,
            ..m.clone()
        };
        assert_eq!(
            rest,
            ServerToAgent::default(),
            "S2A-1 error is exclusive {}",
            ctx()
        );
    }
    if m.command.is_some() {
        let rest = ServerToAgent {
            instance_uid: Bytes::new(),
            capabilities: 0,
            command: None,
            ..m.clone()
        };
        assert_eq!(
            rest,
            ServerToAgent::default(),
            "S2A-2 command goes alone {}",
            ctx()
        );
    }
    if m.remote_config.is_some() {
        assert!(
            agent_caps.contains(A::ACCEPTS_REMOTE_CONFIG),
            "CAP-4 remote config {}",
            ctx()
        );
    }
    if m.packages_available.is_some() {
        assert!(
            agent_caps.contains(A::ACCEPTS_PACKAGES),
            "CAP-4 packages {}",
            ctx()
        );
    }
    if let Some(cs) = &m.connection_settings {
        if cs.opamp.is_some() {
            assert!(
                agent_caps.contains(A::ACCEPTS_OPAMP_CONNECTION_SETTINGS),
                "CAP-4 opamp {}",
                ctx()
            );
        }
        if cs.own_metrics.is_some() {
            assert!(
                agent_caps.contains(A::REPORTS_OWN_METRICS),
                "CAP-4 own metrics {}",
                ctx()
            );
        }
    }
    if let Some(id) = &m.agent_identification {
        assert_eq!(id.new_instance_uid.len(), 16, "UID-7 {}", ctx());
    }
}

/// Sequences of session operations (messages, replies, pushes, shared pushes, time) in a
/// seeded random order: the core never panics and every message it produces keeps the rules.
#[test]
fn random_operation_sequences_keep_the_protocol_rules() {
    for seed in 0..40u64 {
        let mut rng = Rng(seed);
        let mut clock = Clock::new();
        let mut s = if seed % 2 == 0 {
            ws_session()
        } else {
            AgentSession::new(SessionConfig::plain_http(
                crate::DEFAULT_SERVER_CAPABILITIES,
            ))
        };
        let mut seq = 0;
        let mut agent_caps = A::empty();
        for step in 0..2_000 {
            match rng.next() % 4 {
                0 | 1 => {
                    let msg = random_agent_message(&mut rng, &mut seq);
                    // A message flagged as a second agent's (UID-8) is answered by the
                    // driver without the session (reassign_reply).
                    if s.handle_message(clock.now(), &msg)
                        .is_ok_and(|r| !r.duplicate)
                    {
                        if msg.capabilities != 0 {
                            agent_caps = A::from_bits_retain(msg.capabilities);
                        }
                        let reply = random_server_message(&mut rng);
                        let out = s.prepare_reply(clock.now(), reply);
                        check_outgoing(&s, &out, agent_caps, step);
                    }
                }
                2 => {
                    if let Some(push) = random_server_message(&mut rng)
                        && s.instance_uid().is_some()
                        && let Some(out) = s.prepare_push(clock.now(), push)
                    {
                        check_outgoing(&s, &out, agent_caps, step);
                    }
                }
                _ => {
                    if let Some(push) = random_server_message(&mut rng)
                        && s.instance_uid().is_some()
                    {
                        match s.prepare_shared_push(clock.now(), &push) {
                            PushPlan::Shared(own) => {
                                // What the agent receives: its own fields, then the shared ones.
                                let mut full = push.clone();
                                full.instance_uid = own.instance_uid.clone();
                                full.capabilities = own.capabilities;
                                full.flags = own.flags;
                                full.agent_identification = own.agent_identification.clone();
                                check_outgoing(&s, &full, agent_caps, step);
                            }
                            PushPlan::Owned(out) => check_outgoing(&s, &out, agent_caps, step),
                            _ => {}
                        }
                    }
                }
            }
            clock.advance(Duration::from_millis(rng.next() % 40_000));
        }
    }
}

fn http_session() -> AgentSession {
    AgentSession::new(SessionConfig::plain_http(
        crate::DEFAULT_SERVER_CAPABILITIES,
    ))
}

fn with_rc_hash(mut msg: AgentToServer, hash: &'static [u8]) -> AgentToServer {
    msg.remote_config_status = Some(RemoteConfigStatus {
        last_remote_config_hash: Bytes::from_static(hash),
        ..Default::default()
    });
    msg
}

/// RC-6: over plain HTTP a response can be lost; the offer goes out with every reply
/// until the agent reports its hash, with or without an (UNSET) status before.
#[test]
fn rc_6_config_reoffered_after_lost_http_response() {
    let clock = Clock::new();
    for unset_first in [false, true] {
        let mut s = http_session();
        let first = if unset_first {
            with_rc_hash(full_report(0), b"")
        } else {
            full_report(0)
        };
        s.handle_message(clock.now(), &first).unwrap();
        let r = s.prepare_reply(clock.now(), Some(remote_config(b"h1")));
        assert!(r.remote_config.is_some(), "offered");
        // That response is lost: the agent polls again without the hash.
        for seq in 1..3 {
            s.handle_message(clock.now(), &report(seq)).unwrap();
            let r = s.prepare_reply(clock.now(), Some(remote_config(b"h1")));
            assert!(r.remote_config.is_some(), "RC-6: reoffered at poll {seq}");
        }
        // An agent still reporting its old config gets it too.
        s.handle_message(clock.now(), &with_rc_hash(report(3), b"old"))
            .unwrap();
        let r = s.prepare_reply(clock.now(), Some(remote_config(b"h1")));
        assert!(r.remote_config.is_some());
        // Once it reports h1, it is not sent again (RC-4).
        s.handle_message(clock.now(), &with_rc_hash(report(4), b"h1"))
            .unwrap();
        let r = s.prepare_reply(clock.now(), Some(remote_config(b"h1")));
        assert!(r.remote_config.is_none());
    }
    // Within one WebSocket stream, sent is delivered: no resend (RC-4).
    let mut s = ws_session();
    exchange(&mut s, &full_report(0), clock.now());
    assert!(
        s.prepare_push(clock.now(), remote_config(b"h1"))
            .is_some_and(|m| m.remote_config.is_some())
    );
    s.handle_message(clock.now(), &report(1)).unwrap();
    let r = s.prepare_reply(clock.now(), Some(remote_config(b"h1")));
    assert!(r.remote_config.is_none());
}

/// RC-6's reasoning for the other hashed offers: over plain HTTP, connection settings and
/// packages are offered until the agent reports their hash.
#[test]
fn rc_6_connection_settings_and_packages_reoffered_over_http() {
    let clock = Clock::new();
    let mut s = http_session();
    let caps = caps() | A::ACCEPTS_PACKAGES | A::ACCEPTS_OPAMP_CONNECTION_SETTINGS;
    let offer = ServerToAgent {
        connection_settings: Some(ConnectionSettingsOffers {
            hash: Bytes::from_static(b"c1"),
            opamp: Some(OpAmpConnectionSettings::default()),
            ..Default::default()
        }),
        packages_available: Some(PackagesAvailable {
            all_packages_hash: Bytes::from_static(b"p1"),
            ..Default::default()
        }),
        ..Default::default()
    };
    for seq in 0..3 {
        let mut msg = full_report(seq);
        msg.capabilities = caps.bits();
        s.handle_message(clock.now(), &msg).unwrap();
        let r = s.prepare_reply(clock.now(), Some(offer.clone()));
        assert!(r.connection_settings.is_some(), "poll {seq}");
        assert!(r.packages_available.is_some(), "poll {seq}");
    }
    let mut msg = report(3);
    msg.capabilities = caps.bits();
    msg.package_statuses = Some(PackageStatuses {
        server_provided_all_packages_hash: Bytes::from_static(b"p1"),
        ..Default::default()
    });
    msg.connection_settings_status = Some(opamp_proto::ConnectionSettingsStatus {
        last_connection_settings_hash: Bytes::from_static(b"c1"),
        ..Default::default()
    });
    s.handle_message(clock.now(), &msg).unwrap();
    let r = s.prepare_reply(clock.now(), Some(offer));
    assert!(r.connection_settings.is_none());
    assert!(r.packages_available.is_none());
}

/// UID-8: two agents polling with one uid interleave their sequence numbers; the second
/// one's messages are flagged and leave the first one's session alone.
#[test]
fn uid_8_interleaving_sequences_flag_the_second_agent() {
    let mut clock = Clock::new();
    let mut s = http_session();
    // Agent A polls 10, 11; its clone B starts at 3 (looks like a restart).
    exchange(&mut s, &full_report(10), clock.now());
    exchange(&mut s, &report(11), clock.now());
    let r = s.handle_message(clock.now(), &full_report(3)).unwrap();
    assert!(!r.duplicate, "a jump alone is a restart");
    let _ = s.prepare_reply(clock.now(), None);
    // A continues its sequence: the interleaving shows.
    clock.advance(Duration::from_secs(60));
    let r = s.handle_message(clock.now(), &report(12)).unwrap();
    assert!(!r.duplicate, "A keeps the session");
    let reply = s.prepare_reply(clock.now(), None);
    assert!(full_state(&reply), "A's state may have been overwritten");
    // B's next messages (and retries) are flagged; A's are not, and no full-state loop.
    for round in 0..20u64 {
        let r = s.handle_message(clock.now(), &report(4 + round)).unwrap();
        assert!(r.duplicate, "B round {round}");
        let r = s.handle_message(clock.now(), &report(4 + round)).unwrap();
        assert!(r.duplicate && r.repeated, "B retry round {round}");
        let r = s.handle_message(clock.now(), &report(13 + round)).unwrap();
        assert!(!r.duplicate, "A round {round}");
        let reply = s.prepare_reply(clock.now(), None);
        assert!(
            !full_state(&reply),
            "no ReportFullState loop (round {round})"
        );
    }
    // A WebSocket session carries one agent: it does not do this.
    let mut s = ws_session();
    for seq in [10, 11, 3, 12, 4, 13, 5] {
        assert!(
            !s.handle_message(clock.now(), &full_report(seq))
                .unwrap()
                .duplicate
        );
        let _ = s.prepare_reply(clock.now(), None);
    }
    let reassign = reassign_reply(
        InstanceUid::from_array(UID),
        InstanceUid::from_array([9; 16]),
        S::OFFERS_REMOTE_CONFIG,
    );
    assert_eq!(&reassign.instance_uid[..], &UID, "UID-6");
    assert_eq!(
        &reassign.agent_identification.unwrap().new_instance_uid[..],
        &[9; 16],
        "UID-7"
    );
    assert_eq!(
        reassign.capabilities,
        (S::ACCEPTS_STATUS | S::OFFERS_REMOTE_CONFIG).bits()
    );
}

/// UID-8 detection never mistakes one agent for two: a restart (counter reset), lost
/// messages and retries do not return to an old sequence.
#[test]
fn uid_8_restart_loss_and_retries_are_not_duplicates() {
    let clock = Clock::new();
    let mut s = http_session();
    let mut seqs: Vec<u64> = vec![100, 101, 101, 105, 106, 0, 1, 2, 2, 3, 9, 10];
    // Counting back up past the old numbers after a restart is no duplicate either.
    seqs.extend(11..120);
    for seq in seqs {
        let r = s.handle_message(clock.now(), &full_report(seq)).unwrap();
        assert!(!r.duplicate, "seq {seq}");
        let _ = s.prepare_reply(clock.now(), None);
    }
}

/// SEQ-2 at the edges: numbers going backwards ask for full state; u64::MAX wraps to 0
/// as the next number (no panic, no request).
#[test]
fn seq_2_backwards_and_u64_max_sequence_numbers() {
    let mut clock = Clock::new();
    let mut s = ws_session();
    exchange(&mut s, &full_report(u64::MAX - 1), clock.now());
    assert!(!full_state(&exchange(
        &mut s,
        &report(u64::MAX),
        clock.now()
    )));
    assert!(
        !full_state(&exchange(&mut s, &report(0), clock.now())),
        "wraps"
    );
    clock.advance(Duration::from_secs(60));
    assert!(
        full_state(&exchange(&mut s, &report(u64::MAX), clock.now())),
        "backwards: SEQ-2"
    );
    let mut s = ws_session();
    exchange(&mut s, &full_report(50), clock.now());
    clock.advance(Duration::from_secs(60));
    assert!(full_state(&exchange(&mut s, &report(49), clock.now())));
    assert_eq!(
        &exchange(&mut s, &report(50), clock.now()).instance_uid[..],
        &UID
    );
}

/// UID-2: the nil and max UUIDs are 16 bytes but identify no agent; wrong lengths are
/// errors (BAD_REQUEST), of every length around 16.
#[test]
fn uid_2_nil_uid_is_unusable_and_wrong_lengths_are_errors() {
    assert!(!is_usable_instance_uid(&InstanceUid::from_array([0; 16])));
    assert!(!is_usable_instance_uid(&InstanceUid::from_array(
        [0xff; 16]
    )));
    assert!(is_usable_instance_uid(&InstanceUid::from_array(UID)));
    assert!(is_usable_instance_uid(&InstanceUid::new_v7()));
    let clock = Clock::new();
    let mut s = ws_session();
    for len in [0usize, 1, 15, 17, 32] {
        let mut msg = report(0);
        msg.instance_uid = Bytes::from(vec![1; len]);
        assert!(
            matches!(
                s.handle_message(clock.now(), &msg),
                Err(crate::ReadMessageError::InstanceUid(_))
            ),
            "{len}"
        );
    }
    assert_eq!(s.instance_uid(), None, "no state from bad messages");
}

/// S2A-2: a command goes alone; a config queued with it goes out with the next message.
#[test]
fn s2a2_config_queued_with_restart_goes_out_next() {
    use opamp_proto::{AgentRemoteConfig, ServerToAgentCommand};
    let now = Instant::now();
    let mut s = AgentSession::new(SessionConfig::websocket(
        ServerCapabilitySet::OFFERS_REMOTE_CONFIG,
    ));
    let msg = AgentToServer {
        instance_uid: InstanceUid::from_array([7; 16]).to_bytes(),
        capabilities: (AgentCapabilitySet::ACCEPTS_REMOTE_CONFIG
            | AgentCapabilitySet::ACCEPTS_RESTART_COMMAND)
            .bits(),
        ..AgentToServer::default()
    };
    s.handle_message(now, &msg).unwrap();
    let out = s.prepare_reply(
        now,
        Some(ServerToAgent {
            remote_config: Some(AgentRemoteConfig {
                config: None,
                config_hash: Bytes::from_static(b"h"),
            }),
            command: Some(ServerToAgentCommand::default()),
            ..ServerToAgent::default()
        }),
    );
    assert!(out.command.is_some());
    assert!(out.remote_config.is_none(), "S2A-2: the command goes alone");
    assert!(s.has_deferred());
    let next = s
        .prepare_push(now, ServerToAgent::default())
        .expect("the config follows");
    assert_eq!(
        next.remote_config.unwrap().config_hash,
        Bytes::from_static(b"h")
    );
    assert!(!s.has_deferred());
}

// ---- The handle/poll contract: `handle_message`, `respond`, `queue`, `handle_timeout` in;
// ---- `poll_transmit`, `poll_timeout` out. Every test runs on the virtual clock.

/// All that `poll_transmit` gives now, as plain messages.
fn drain(s: &mut AgentSession, now: Instant) -> Vec<ServerToAgent> {
    let mut out = Vec::new();
    while let Some(t) = s.poll_transmit(now) {
        out.push(t.into_message());
        assert!(out.len() < 100, "poll_transmit does not end");
    }
    out
}

fn custom(data: &'static [u8]) -> ServerToAgent {
    ServerToAgent {
        custom_message: Some(opamp_proto::CustomMessage {
            capability: "io.example".to_owned(),
            r#type: "t".to_owned(),
            data: Bytes::from_static(data),
        }),
        ..Default::default()
    }
}

/// CAP-4: before the agent's first message its capabilities are unknown, so a push is held
/// (nothing goes out, nothing is stripped) and rides on the first reply, with CAP-3's
/// capabilities; later pushes go out on their own (WebSocket).
#[test]
fn cap_4_pushes_before_the_first_message_are_held_and_ride_on_the_first_reply() {
    let clock = Clock::new();
    let mut s = ws_session();
    s.queue(remote_config(b"h1"));
    s.queue(ServerToAgent {
        flags: F::REPORT_AVAILABLE_COMPONENTS.bits(),
        ..Default::default()
    });
    assert!(drain(&mut s, clock.now()).is_empty(), "held: no agent yet");
    s.handle_message(clock.now(), &full_report(0)).unwrap();
    assert!(
        drain(&mut s, clock.now()).is_empty(),
        "held until the first reply, which the application has not given yet"
    );
    s.respond(None);
    let out = drain(&mut s, clock.now());
    assert_eq!(
        out.len(),
        1,
        "one message: the reply carries the held pushes"
    );
    assert_eq!(&out[0].instance_uid[..], &UID, "UID-6");
    assert_eq!(
        out[0].capabilities,
        crate::DEFAULT_SERVER_CAPABILITIES.bits()
    );
    assert_eq!(
        out[0].remote_config.as_ref().unwrap().config_hash,
        &b"h1"[..],
        "merged, not replaced, by the later flag-only push"
    );
    // After the first reply a push goes out at once, alone.
    s.queue(remote_config(b"h2"));
    let out = drain(&mut s, clock.now());
    assert_eq!(out.len(), 1);
    assert_eq!(
        out[0].remote_config.as_ref().unwrap().config_hash,
        &b"h2"[..]
    );
    assert_eq!(out[0].capabilities, 0, "CAP-3: only the first message");
}

/// WebSocket: a push while the application is still answering goes out before the reply;
/// the reply follows once given (REP-4: exactly one reply per message).
#[test]
fn rep_4_ws_push_during_the_callback_goes_out_and_the_reply_follows() {
    let clock = Clock::new();
    let mut s = ws_session();
    s.handle_message(clock.now(), &full_report(0)).unwrap();
    s.respond(None);
    assert_eq!(drain(&mut s, clock.now()).len(), 1);
    s.handle_message(clock.now(), &report(1)).unwrap();
    s.queue(remote_config(b"h"));
    let pushed = drain(&mut s, clock.now());
    assert_eq!(pushed.len(), 1);
    assert!(pushed[0].remote_config.is_some());
    s.respond(None);
    let replies = drain(&mut s, clock.now());
    assert_eq!(replies.len(), 1, "the reply");
    assert!(replies[0].remote_config.is_none(), "RC-4: sent already");
    // A second respond without a message is ignored: still one reply per message.
    s.respond(Some(remote_config(b"x")));
    assert!(drain(&mut s, clock.now()).is_empty());
}

/// S2A-2 over WebSocket: the command goes alone with the reply; what it kept out follows at
/// once, in its own message, without waiting for the agent to speak again.
#[test]
fn s2a_2_ws_what_a_command_kept_out_follows_at_once() {
    let clock = Clock::new();
    let mut s = ws_session();
    let mut msg = full_report(0);
    msg.capabilities |= A::ACCEPTS_RESTART_COMMAND.bits();
    s.handle_message(clock.now(), &msg).unwrap();
    s.respond(Some(ServerToAgent {
        command: Some(ServerToAgentCommand::default()),
        ..remote_config(b"h1")
    }));
    let out = drain(&mut s, clock.now());
    assert_eq!(out.len(), 2, "{out:?}");
    assert!(out[0].command.is_some() && out[0].remote_config.is_none());
    assert!(out[1].command.is_none() && out[1].remote_config.is_some());
    assert!(!s.has_deferred());
}

/// S2A-1 over plain HTTP: an error goes alone; what it kept out rides on the next response
/// (plain HTTP never sends on its own, HTTP-9).
#[test]
fn s2a_1_http_what_an_error_kept_out_rides_on_the_next_response() {
    let clock = Clock::new();
    let mut s = http_session();
    s.handle_message(clock.now(), &full_report(0)).unwrap();
    s.respond(Some(ServerToAgent {
        error_response: bad_request("no").error_response,
        ..remote_config(b"h1")
    }));
    let out = drain(&mut s, clock.now());
    assert_eq!(out.len(), 1, "one response per request");
    assert!(out[0].error_response.is_some() && out[0].remote_config.is_none());
    assert!(s.has_deferred());
    assert!(
        drain(&mut s, clock.now()).is_empty(),
        "nothing without a request"
    );
    s.handle_message(clock.now(), &report(1)).unwrap();
    s.respond(None);
    let out = drain(&mut s, clock.now());
    assert_eq!(out.len(), 1);
    assert!(out[0].remote_config.is_some());
}

/// HTTP-9: pushes ride on the next response, merged with the reply; the reply's own fields
/// win, and a second custom message is not dropped but goes out with the next response.
#[test]
fn http_9_pushes_ride_on_the_reply_and_a_second_custom_message_waits() {
    let clock = Clock::new();
    let mut s = http_session();
    s.handle_message(clock.now(), &full_report(0)).unwrap();
    s.respond(None);
    let _ = drain(&mut s, clock.now());
    s.queue(ServerToAgent {
        flags: F::REPORT_FULL_STATE.bits(),
        ..custom(b"pushed")
    });
    assert!(
        drain(&mut s, clock.now()).is_empty(),
        "no request, no response"
    );
    s.handle_message(clock.now(), &report(1)).unwrap();
    s.respond(Some(custom(b"reply")));
    let out = drain(&mut s, clock.now());
    assert_eq!(out.len(), 1);
    assert_eq!(out[0].custom_message.as_ref().unwrap().data, &b"reply"[..]);
    assert!(full_state(&out[0]), "the push's flag rides along");
    s.handle_message(clock.now(), &report(2)).unwrap();
    s.respond(None);
    let out = drain(&mut s, clock.now());
    assert_eq!(
        out[0].custom_message.as_ref().unwrap().data,
        &b"pushed"[..],
        "the pushed custom message comes next"
    );
}

/// UID-8: a nil uid is answered with a new one (from the driver: the core draws no
/// randomness), and leaves the session as it was.
#[test]
fn uid_8_unusable_uid_is_reassigned_without_touching_the_session() {
    let clock = Clock::new();
    for mut s in [ws_session(), http_session()] {
        let msg = AgentToServer {
            instance_uid: Bytes::from_static(&[0; 16]),
            ..full_report(0)
        };
        let r = s.handle_message(clock.now(), &msg).unwrap();
        assert!(r.unusable_uid);
        assert_eq!(s.instance_uid(), None);
        assert!(drain(&mut s, clock.now()).is_empty(), "waits for the uid");
        assert!(s.needs_instance_uid());
        s.provide_instance_uid(InstanceUid::from_array([9; 16]));
        let out = drain(&mut s, clock.now());
        assert_eq!(out.len(), 1);
        assert_eq!(&out[0].instance_uid[..], &[0; 16], "UID-6: the uid it sent");
        assert_eq!(
            &out[0]
                .agent_identification
                .as_ref()
                .unwrap()
                .new_instance_uid[..],
            &[9; 16]
        );
        assert_eq!(s.instance_uid(), None, "still no agent");
        assert_eq!(s.assigned_instance_uid(), None);
    }
}

/// Two pollers with one uid over plain HTTP (UID-8), and the three policies.
fn interleaved(policy: DuplicateUidPolicy) -> (AgentSession, Vec<ServerToAgent>) {
    let clock = Clock::new();
    let mut s = http_session();
    let mut answers = Vec::new();
    // Agent A counts 10, 11, ...; agent B (same uid) 0, 1, ...
    let mut step = |s: &mut AgentSession, seq: u64| {
        let r = s.handle_message(clock.now(), &report(seq)).unwrap();
        if r.duplicate {
            s.resolve_duplicate(r.instance_uid, policy);
            if s.needs_instance_uid() {
                s.provide_instance_uid(InstanceUid::from_array([0xd0; 16]));
            }
            if policy == DuplicateUidPolicy::Allow {
                s.respond(None);
            }
        } else {
            s.respond(None);
        }
        answers.extend(drain(s, clock.now()));
        r.duplicate
    };
    let mut duplicates = Vec::new();
    for seq in [10, 11, 0, 12, 1] {
        duplicates.push(step(&mut s, seq));
    }
    assert_eq!(
        duplicates,
        [false, false, false, false, true],
        "B's second message proves it"
    );
    (s, answers)
}

#[test]
fn uid_8_duplicate_reassigned_gets_a_new_uid_and_the_session_is_untouched() {
    let (s, answers) = interleaved(DuplicateUidPolicy::Reassign);
    let last = answers.last().unwrap();
    assert_eq!(
        &last.agent_identification.as_ref().unwrap().new_instance_uid[..],
        &[0xd0; 16]
    );
    assert_eq!(s.assigned_instance_uid(), None, "not the session's agent's");
    assert_eq!(s.instance_uid(), Some(InstanceUid::from_array(UID)));
}

#[test]
fn uid_8_duplicate_rejected_gets_bad_request() {
    let (_, answers) = interleaved(DuplicateUidPolicy::Reject);
    let last = answers.last().unwrap();
    assert!(last.error_response.is_some());
    assert_eq!(&last.instance_uid[..], &UID);
}

#[test]
fn uid_8_duplicate_allowed_is_answered_as_the_sessions_agent() {
    let (_, answers) = interleaved(DuplicateUidPolicy::Allow);
    assert_eq!(answers.len(), 5, "every message answered once (REP-4)");
    let last = answers.last().unwrap();
    assert!(last.error_response.is_none() && last.agent_identification.is_none());
}

/// SEQ-2 over WebSocket: a gap inside the rate-limit window is asked for when the window
/// ends, on the session's timer, in a message of its own (it used to wait for the next
/// message the agent got).
#[test]
fn seq_2_ws_rate_limited_full_state_request_goes_out_at_the_timer() {
    let mut clock = Clock::new();
    let mut s = AgentSession::new(
        SessionConfig::websocket(crate::DEFAULT_SERVER_CAPABILITIES)
            .with_full_state_min_interval(Duration::from_secs(5)),
    );
    s.handle_message(clock.now(), &report(0)).unwrap(); // no description: asked
    s.respond(None);
    assert!(full_state(&drain(&mut s, clock.now())[0]));
    assert_eq!(s.poll_timeout(), None);
    clock.advance(Duration::from_secs(1));
    s.handle_message(clock.now(), &full_report(5)).unwrap(); // a gap, within the window
    s.respond(None);
    assert!(!full_state(&drain(&mut s, clock.now())[0]), "rate-limited");
    let at = s.poll_timeout().expect("a timer for the deferred request");
    assert_eq!(at, clock.now() + Duration::from_secs(4));
    clock.advance(Duration::from_secs(3));
    s.handle_timeout(clock.now());
    assert!(drain(&mut s, clock.now()).is_empty(), "not yet");
    clock.advance(Duration::from_secs(1));
    s.handle_timeout(clock.now());
    let out = drain(&mut s, clock.now());
    assert_eq!(out.len(), 1);
    assert!(full_state(&out[0]));
    assert_eq!(s.poll_timeout(), None);
}

/// WS-11, HTTP-16: a message over the limit is replaced by a bare acknowledgement, and its
/// offer counts as not sent, so it is offered again (RC-6) rather than stranded.
#[test]
fn ws_11_oversized_message_becomes_a_bare_ack_and_the_offer_is_not_recorded() {
    let clock = Clock::new();
    let mut s = AgentSession::new(
        SessionConfig::websocket(crate::DEFAULT_SERVER_CAPABILITIES).with_max_message_size(64),
    );
    s.handle_message(clock.now(), &full_report(0)).unwrap();
    let big = ServerToAgent {
        remote_config: Some(AgentRemoteConfig {
            config: Some(opamp_proto::AgentConfigMap::single(
                "x".repeat(100),
                "text/yaml",
            )),
            config_hash: Bytes::from_static(b"big"),
        }),
        ..Default::default()
    };
    s.respond(Some(big.clone()));
    let out = drain(&mut s, clock.now());
    assert!(out[0].remote_config.is_none());
    assert_eq!(&out[0].instance_uid[..], &UID);
    assert_ne!(out[0].capabilities, 0, "what was owed still goes out");
    // Not recorded as sent: the same offer is not stripped as redundant.
    s.queue(remote_config(b"big"));
    let out = drain(&mut s, clock.now());
    assert_eq!(out.len(), 1, "offered again");
}

/// A shared push goes out as the shared encoding behind this agent's own fields.
#[test]
fn shared_push_through_poll_transmit_keeps_the_shared_encoding() {
    let clock = Clock::new();
    let mut s = ws_session();
    s.handle_message(clock.now(), &full_report(0)).unwrap();
    s.respond(None);
    let _ = drain(&mut s, clock.now());
    let shared = SharedMessage::new(remote_config(b"h"));
    s.queue_shared(&shared);
    match s.poll_transmit(clock.now()) {
        Some(Transmit::Shared { head, shared: body }) => {
            assert_eq!(&head.instance_uid[..], &UID);
            assert!(head.remote_config.is_none(), "the body is shared");
            assert!(std::ptr::eq(
                body.encoded().as_ptr(),
                shared.encoded().as_ptr()
            ));
        }
        other => panic!("expected a shared transmit, got {other:?}"),
    }
    s.queue_shared(&shared);
    assert!(s.poll_transmit(clock.now()).is_none(), "RC-4: sent already");
}

/// ERR-1: a malformed message is answered BAD_REQUEST, addressed to the known agent.
#[test]
fn err_1_malformed_message_is_answered_bad_request() {
    let clock = Clock::new();
    let mut s = ws_session();
    s.handle_message(clock.now(), &full_report(0)).unwrap();
    s.respond(None);
    let _ = drain(&mut s, clock.now());
    s.handle_malformed(&crate::ReadMessageError::TextFrame);
    let out = drain(&mut s, clock.now());
    assert_eq!(out.len(), 1);
    assert!(out[0].error_response.is_some());
    assert_eq!(&out[0].instance_uid[..], &UID);
}

/// HB-2: the interval the session offered is the agent's heartbeat interval from then on.
#[test]
fn hb_2_offered_heartbeat_interval_is_tracked_by_the_session() {
    let clock = Clock::new();
    let mut s = ws_session();
    let mut msg = full_report(0);
    msg.capabilities |= (A::REPORTS_HEARTBEAT | A::ACCEPTS_OPAMP_CONNECTION_SETTINGS).bits();
    s.handle_message(clock.now(), &msg).unwrap();
    assert_eq!(
        s.agent_heartbeat_interval(),
        Some(crate::DEFAULT_AGENT_HEARTBEAT_INTERVAL)
    );
    s.respond(Some(ServerToAgent {
        connection_settings: Some(ConnectionSettingsOffers {
            hash: Bytes::from_static(b"cs"),
            opamp: Some(OpAmpConnectionSettings {
                heartbeat_interval_seconds: 7,
                ..Default::default()
            }),
            ..Default::default()
        }),
        ..Default::default()
    }));
    let _ = drain(&mut s, clock.now());
    assert_eq!(s.agent_heartbeat_interval(), Some(Duration::from_secs(7)));
    assert_eq!(s.offered_heartbeat_interval(), Some(Duration::from_secs(7)));
}

/// `respond_now` is `respond` + `poll_transmit` in one step: the same reply, carrying the
/// held push (HTTP-9), and nothing left behind.
#[test]
fn http_9_respond_now_is_respond_then_poll_transmit() {
    let clock = Clock::new();
    let mut a = http_session();
    let mut b = http_session();
    for s in [&mut a, &mut b] {
        s.handle_message(clock.now(), &full_report(0)).unwrap();
        s.queue(remote_config(b"h"));
    }
    a.respond(Some(custom(b"r")));
    let via_poll = drain(&mut a, clock.now());
    let now = b
        .respond_now(clock.now(), Some(custom(b"r")))
        .map(Transmit::into_message);
    assert_eq!(via_poll, now.into_iter().collect::<Vec<_>>());
    assert!(via_poll[0].remote_config.is_some());
    assert!(b.poll_transmit(clock.now()).is_none());
    assert!(
        b.respond_now(clock.now(), None).is_none(),
        "no message awaits a reply"
    );
}

/// HB-7, WS-14: the session's liveness rule. Without heartbeats: idle after 3 ping
/// intervals, pinged every interval of silence; with heartbeats (30 s by default): idle
/// after 3 heartbeats, pinged only once one is overdue; without pings nor heartbeats: none.
#[test]
fn hb_7_ws_liveness_follows_the_agents_heartbeat() {
    let clock = Clock::new();
    let limits = crate::ConnectionLimits::default();
    let mut s = ws_session();
    s.handle_message(clock.now(), &full_report(0)).unwrap();
    let secs = |n| Some(Duration::from_secs(n));
    assert_eq!(
        s.ws_liveness(&limits),
        (secs(90), secs(30)),
        "no heartbeats"
    );
    let mut msg = report(1);
    msg.capabilities |= (A::REPORTS_HEARTBEAT | A::ACCEPTS_OPAMP_CONNECTION_SETTINGS).bits();
    s.handle_message(clock.now(), &msg).unwrap();
    assert_eq!(
        s.ws_liveness(&limits),
        (secs(90), secs(60)),
        "30 s heartbeats"
    );
    s.respond(Some(ServerToAgent {
        connection_settings: Some(ConnectionSettingsOffers {
            hash: Bytes::from_static(b"cs0"),
            opamp: Some(OpAmpConnectionSettings {
                heartbeat_interval_seconds: 0,
                ..Default::default()
            }),
            ..Default::default()
        }),
        ..Default::default()
    }));
    let _ = drain(&mut s, clock.now());
    assert_eq!(
        s.ws_liveness(&limits),
        (secs(90), secs(30)),
        "HB-2: told to stop"
    );
    assert_eq!(
        s.ws_liveness(&limits.with_ws_ping_interval(None)),
        (None, None)
    );
}

/// `poll_transmit_with` gives what `poll_transmit` gives, by reference.
#[test]
fn poll_transmit_with_is_poll_transmit_by_reference() {
    let clock = Clock::new();
    let mut a = ws_session();
    let mut b = ws_session();
    for s in [&mut a, &mut b] {
        s.queue(remote_config(b"h"));
        s.handle_message(clock.now(), &full_report(0)).unwrap();
        s.respond(Some(custom(b"c")));
    }
    let by_value: Vec<_> = std::iter::from_fn(|| a.poll_transmit(clock.now()))
        .map(Transmit::into_message)
        .collect();
    let by_ref: Vec<_> =
        std::iter::from_fn(|| b.poll_transmit_with(clock.now(), |t| t.clone().into_message()))
            .collect();
    assert_eq!(by_value, by_ref);
    assert_eq!(by_value.len(), 1);
    assert!(by_value[0].remote_config.is_some() && by_value[0].custom_message.is_some());
}
