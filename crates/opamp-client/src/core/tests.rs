//! The core on a virtual clock: a base instant plus offsets, no sleeps.

use std::time::{Duration, Instant};

use bytes::Bytes;
use opamp_proto::{
    AgentDescription, AgentIdentification, AnyValue, ComponentDetails, ConnectionSettingsOffers,
    KeyValue, OpAmpConnectionSettings, RetryInfo, ServerToAgentCommand, any_value,
};

use super::*;

fn secs(s: f64) -> Duration {
    Duration::from_secs_f64(s)
}

fn uid() -> InstanceUid {
    InstanceUid::from_array([7; 16])
}

fn core(transport: TransportKind, caps: AgentCapabilitySet, t0: Instant) -> ClientCore {
    let mut config = CoreConfig::new(uid(), caps, transport);
    config.jitter_seed = Some(42);
    ClientCore::new(config, t0)
}

fn all_caps() -> AgentCapabilitySet {
    AgentCapabilitySet::all()
}

fn description(name: &str) -> AgentDescription {
    AgentDescription {
        identifying_attributes: vec![KeyValue {
            key: "service.name".into(),
            value: Some(AnyValue {
                value: Some(any_value::Value::StringValue(name.into())),
            }),
        }],
        non_identifying_attributes: vec![],
    }
}

fn health(healthy: bool) -> ComponentHealth {
    ComponentHealth {
        healthy,
        ..Default::default()
    }
}

fn ack() -> ServerToAgent {
    ServerToAgent {
        instance_uid: uid().to_bytes(),
        capabilities: ServerCapabilitySet::all().bits(),
        ..Default::default()
    }
}

fn events(core: &mut ClientCore) -> Vec<Event> {
    std::iter::from_fn(|| core.poll_event()).collect()
}

/// A WebSocket core, connected at `t0`, whose first message has gone out.
fn ws_up(caps: AgentCapabilitySet, t0: Instant) -> ClientCore {
    let mut c = core(TransportKind::WebSocket, caps, t0);
    c.handle_connected(t0);
    c.poll_transmit(t0).expect("first message");
    c.handle_message(t0, ack());
    events(&mut c);
    c
}

/// A plain-HTTP core whose first request has been answered at `t0`.
fn http_up(caps: AgentCapabilitySet, t0: Instant) -> ClientCore {
    let mut c = core(TransportKind::Http, caps, t0);
    c.poll_transmit(t0).expect("first request");
    c.handle_message(t0, ack());
    events(&mut c);
    c
}

fn is_heartbeat(m: &AgentToServer) -> bool {
    m.agent_description.is_none()
        && m.health.is_none()
        && m.effective_config.is_none()
        && m.remote_config_status.is_none()
        && m.package_statuses.is_none()
        && m.custom_capabilities.is_none()
        && m.available_components.is_none()
        && m.connection_settings_status.is_none()
        && m.custom_message.is_none()
}

#[test]
fn rep_1_first_message_carries_full_state_and_seq_1_counts_up() {
    let t0 = Instant::now();
    let mut c = core(TransportKind::WebSocket, all_caps(), t0);
    c.set_agent_description(description("a")).unwrap();
    c.set_health(health(true)).unwrap();
    c.set_effective_config(EffectiveConfig::default()).unwrap();
    c.set_remote_config_status(RemoteConfigStatus::default())
        .unwrap();
    c.set_package_statuses(PackageStatuses::default()).unwrap();
    c.set_custom_capabilities(CustomCapabilities {
        capabilities: vec!["io.example.x".into()],
    })
    .unwrap();
    c.set_connection_settings_status(ConnectionSettingsStatus::default())
        .unwrap();
    c.set_available_components(AvailableComponents {
        hash: Bytes::from_static(b"h"),
        ..Default::default()
    })
    .unwrap();
    // WS: nothing goes out before the connection is up.
    assert_eq!(c.poll_transmit(t0), None);
    c.handle_connected(t0);
    assert_eq!(events(&mut c), vec![Event::Connected]);

    let first = c.poll_transmit(t0).unwrap();
    assert_eq!(first.sequence_num, 0);
    assert_eq!(first.instance_uid, uid().to_bytes());
    assert_eq!(first.capabilities, all_caps().bits());
    assert!(first.agent_description.is_some());
    assert!(first.health.is_some());
    assert!(first.effective_config.is_some());
    assert!(first.remote_config_status.is_some());
    assert!(first.package_statuses.is_some());
    assert!(first.custom_capabilities.is_some());
    assert!(first.connection_settings_status.is_some());
    assert!(first.available_components.is_some());
    // REP-7: nothing changed, nothing more to send.
    assert_eq!(c.poll_transmit(t0), None);

    // CMP-1: later messages carry only what changed.
    c.set_health(health(false)).unwrap();
    let second = c.poll_transmit(t0 + secs(1.0)).unwrap();
    assert_eq!(second.sequence_num, 1);
    assert_eq!(second.health, Some(health(false)));
    assert!(second.agent_description.is_none());
    assert!(second.effective_config.is_none());
    assert_eq!(second.capabilities, all_caps().bits(), "CAP-1: always set");
    assert_eq!(second.instance_uid, uid().to_bytes(), "UID-4: always set");
}

#[test]
fn cap_1_reports_status_is_always_declared() {
    let c = core(
        TransportKind::Http,
        AgentCapabilitySet::REPORTS_HEALTH,
        Instant::now(),
    );
    assert!(
        c.capabilities()
            .contains(AgentCapabilitySet::REPORTS_STATUS)
    );
}

#[test]
fn retry_4_a_burst_of_setters_becomes_one_message() {
    let t0 = Instant::now();
    let mut c = ws_up(all_caps(), t0);
    let seq = c.next_sequence_num();
    for i in 0..100 {
        c.set_health(health(i % 2 == 0)).unwrap();
        c.set_agent_description(description(&format!("agent-{i}")))
            .unwrap();
    }
    c.set_remote_config_status(RemoteConfigStatus {
        last_remote_config_hash: Bytes::from_static(b"x"),
        ..Default::default()
    })
    .unwrap();
    let m = c.poll_transmit(t0).unwrap();
    assert_eq!(m.sequence_num, seq);
    assert_eq!(m.health, Some(health(false)), "the latest value wins");
    assert_eq!(m.agent_description, Some(description("agent-99")));
    assert!(m.remote_config_status.is_some());
    assert_eq!(c.poll_transmit(t0), None, "exactly one message");
}

#[test]
fn rep_7_setting_an_unchanged_value_sends_nothing() {
    let t0 = Instant::now();
    let mut c = core(TransportKind::WebSocket, all_caps(), t0);
    c.set_health(health(true)).unwrap();
    c.handle_connected(t0);
    c.poll_transmit(t0).unwrap();
    c.set_health(health(true)).unwrap();
    assert_eq!(c.poll_transmit(t0), None);
    // Nor does processing a server message that changes nothing.
    c.handle_message(t0, ack());
    assert_eq!(c.poll_transmit(t0), None);
}

#[test]
fn seq_3_report_full_state_resends_everything() {
    let t0 = Instant::now();
    let mut c = core(TransportKind::WebSocket, all_caps(), t0);
    c.set_agent_description(description("a")).unwrap();
    c.set_health(health(true)).unwrap();
    c.handle_connected(t0);
    c.poll_transmit(t0).unwrap();
    c.handle_message(
        t0,
        ServerToAgent {
            flags: ServerToAgentFlagSet::REPORT_FULL_STATE.bits(),
            ..ack()
        },
    );
    let Some(Event::Message(data)) = events(&mut c).pop() else {
        panic!("flags are reported")
    };
    assert_eq!(data.flags, ServerToAgentFlagSet::REPORT_FULL_STATE);
    let full = c.poll_transmit(t0).unwrap();
    assert_eq!(full.agent_description, Some(description("a")));
    assert_eq!(full.health, Some(health(true)));
    assert_eq!(full.sequence_num, 1);
}

#[test]
fn rep_3_full_state_after_a_websocket_reconnect() {
    let t0 = Instant::now();
    let mut c = core(TransportKind::WebSocket, all_caps(), t0);
    c.set_health(health(true)).unwrap();
    c.handle_connected(t0);
    c.poll_transmit(t0).unwrap();
    let delay = c.handle_disconnected(t0 + secs(5.0));
    assert_eq!(c.connect_at(), Some(t0 + secs(5.0) + delay));
    assert!(!c.is_connected());
    c.handle_connected(t0 + secs(6.0));
    let m = c.poll_transmit(t0 + secs(6.0)).unwrap();
    assert_eq!(m.health, Some(health(true)));
    assert_eq!(m.sequence_num, 1, "SEQ-1: continues across reconnects");
}

#[test]
fn hb_3_websocket_heartbeat_every_30s_from_the_last_message() {
    let t0 = Instant::now();
    let mut c = ws_up(all_caps(), t0);
    assert_eq!(c.poll_timeout(), Some(t0 + secs(30.0)));
    assert_eq!(c.poll_transmit(t0 + secs(29.999)), None);
    let hb = c.poll_transmit(t0 + secs(30.0)).unwrap();
    assert!(is_heartbeat(&hb));
    assert_eq!(hb.sequence_num, 1);
    assert_eq!(c.poll_timeout(), Some(t0 + secs(60.0)));

    // HB-4: any message resets the timer.
    c.set_health(health(false)).unwrap();
    c.poll_transmit(t0 + secs(45.0)).unwrap();
    assert_eq!(c.poll_timeout(), Some(t0 + secs(75.0)));
    assert_eq!(c.poll_transmit(t0 + secs(60.0)), None);
}

#[test]
fn hb_1_no_websocket_heartbeats_without_the_capability() {
    let t0 = Instant::now();
    let caps = all_caps() - AgentCapabilitySet::REPORTS_HEARTBEAT;
    let mut c = ws_up(caps, t0);
    assert_eq!(c.poll_timeout(), None);
    assert_eq!(c.poll_transmit(t0 + secs(3600.0)), None);
}

fn offer(heartbeat_seconds: u64) -> ServerToAgent {
    ServerToAgent {
        connection_settings: Some(ConnectionSettingsOffers {
            // One hash per offer (CS-2): a repeat of a hash is not handled again.
            hash: if heartbeat_seconds == 5 {
                Bytes::from_static(b"offer")
            } else {
                Bytes::from(format!("offer-{heartbeat_seconds}"))
            },
            opamp: Some(OpAmpConnectionSettings {
                heartbeat_interval_seconds: heartbeat_seconds,
                ..Default::default()
            }),
            ..Default::default()
        }),
        ..ack()
    }
}

/// Handles `msg` and accepts every OpAMP connection-settings offer it carries, as the driver
/// does when the callback returns `Ok`; returns the other events.
fn handle_and_accept(c: &mut ClientCore, msg: ServerToAgent, now: Instant) -> Vec<Event> {
    c.handle_message(now, msg);
    let mut rest = vec![];
    for e in events(c) {
        match e {
            Event::OpampConnectionSettings {
                settings,
                offer_hash,
            } => c.accept_opamp_connection_settings(now, &offer_hash, &settings),
            other => rest.push(other),
        }
    }
    rest
}

#[test]
fn hb_2_server_offered_interval_is_honoured_and_0_turns_ws_heartbeats_off() {
    let t0 = Instant::now();
    let mut c = ws_up(all_caps(), t0);
    c.handle_message(t0, offer(5));
    let ev = events(&mut c);
    let Some(Event::OpampConnectionSettings {
        settings,
        offer_hash,
    }) = ev.into_iter().find(
        |e| matches!(e, Event::OpampConnectionSettings { settings, .. } if settings.heartbeat_interval_seconds == 5),
    )
    else {
        panic!("the offer is passed on")
    };
    assert_eq!(offer_hash, Bytes::from_static(b"offer"));
    c.accept_opamp_connection_settings(t0, &offer_hash, &settings);
    assert_eq!(c.heartbeat_interval(), Some(secs(5.0)));
    assert_eq!(c.poll_timeout(), Some(t0 + secs(5.0)));
    assert!(c.poll_transmit(t0 + secs(5.0)).is_some());

    handle_and_accept(&mut c, offer(0), t0 + secs(5.0));
    assert_eq!(c.heartbeat_interval(), None);
    // CSS-1: the new offer's status goes out; then nothing more.
    assert!(
        c.poll_transmit(t0 + secs(5.0))
            .unwrap()
            .connection_settings_status
            .is_some()
    );
    c.handle_message(t0 + secs(5.0), ack());
    assert_eq!(c.poll_timeout(), None);
    assert_eq!(c.poll_transmit(t0 + secs(1000.0)), None);
}

#[test]
fn hb_2_offer_ignored_without_reports_heartbeat() {
    let t0 = Instant::now();
    let caps = AgentCapabilitySet::REPORTS_STATUS;
    let mut c = http_up(caps, t0);
    c.handle_message(t0, offer(5));
    assert_eq!(c.heartbeat_interval(), Some(secs(30.0)));
    // Nor is the offer passed on without AcceptsOpAMPConnectionSettings.
    let ev = events(&mut c);
    assert!(
        !ev.iter()
            .any(|e| matches!(e, Event::OpampConnectionSettings { .. }))
    );
}

#[test]
fn http_7_polls_at_the_interval_and_keeps_polling_when_offered_0() {
    let t0 = Instant::now();
    let mut c = http_up(all_caps(), t0);
    assert_eq!(c.poll_timeout(), Some(t0 + secs(30.0)));
    assert_eq!(c.poll_transmit(t0 + secs(29.0)), None);
    let poll = c.poll_transmit(t0 + secs(30.0)).unwrap();
    assert!(is_heartbeat(&poll));
    assert_eq!(poll.instance_uid, uid().to_bytes());
    handle_and_accept(&mut c, offer(10), t0 + secs(30.1));
    // The APPLIED status (CSS-1) goes at once; polling goes on from there.
    c.poll_transmit(t0 + secs(30.1)).unwrap();
    c.handle_message(t0 + secs(30.1), ack());
    assert_eq!(c.poll_timeout(), Some(t0 + secs(40.1)), "HB-5");
    c.poll_transmit(t0 + secs(40.1)).unwrap();
    // Checklist 4.2.2: 0 does not stop HTTP polling.
    handle_and_accept(&mut c, offer(0), t0 + secs(40.2));
    assert_eq!(c.heartbeat_interval(), Some(secs(10.0)));
    assert_eq!(c.poll_timeout(), Some(t0 + secs(50.1)));
}

#[test]
fn http_10_at_most_one_request_in_flight_and_changes_go_at_once_after() {
    let t0 = Instant::now();
    let mut c = http_up(all_caps(), t0);
    c.set_health(health(true)).unwrap();
    // Changes go at once, without waiting for the poll interval.
    let first = c.poll_transmit(t0 + secs(1.0)).unwrap();
    assert_eq!(first.health, Some(health(true)));
    // In flight: nothing else, even when something changes or the poll is due.
    c.set_health(health(false)).unwrap();
    assert_eq!(c.poll_transmit(t0 + secs(2.0)), None);
    assert_eq!(c.poll_transmit(t0 + secs(100.0)), None);
    assert_eq!(c.poll_timeout(), None);
    // The answer arrives: the change goes immediately.
    c.handle_message(t0 + secs(100.0), ack());
    let next = c.poll_transmit(t0 + secs(100.0)).unwrap();
    assert_eq!(next.health, Some(health(false)));
    assert_eq!(next.sequence_num, first.sequence_num + 1);
}

#[test]
fn gen_8_backoff_sequence_within_jitter_bounds_and_no_traffic_while_down() {
    let t0 = Instant::now();
    let mut c = core(TransportKind::Http, all_caps(), t0);
    let mut now = t0;
    let mut base: f64 = 0.5;
    for _ in 0..20 {
        let m = c.poll_transmit(now).expect("the retry is due");
        assert!(m.sequence_num < 100);
        let delay = c.handle_connect_failure(now, Failure::Transport);
        let d = delay.as_secs_f64();
        assert!(
            d >= base * 0.5 - 1e-9 && d <= base * 1.5 + 1e-9,
            "{d} vs {base}"
        );
        assert_eq!(c.connect_at(), Some(now + delay));
        assert_eq!(c.poll_timeout(), Some(now + delay));
        // HB-6, THR-6: nothing at all before the retry time, even with changes.
        c.set_health(health(now == t0)).unwrap();
        assert_eq!(c.poll_transmit(now + delay - secs(0.001)), None);
        now += delay;
        base = (base * 1.5).min(60.0);
    }
    // The retry after recovery carries the full state (RETRY-1).
    let m = c.poll_transmit(now).unwrap();
    assert!(m.health.is_some());
    c.handle_message(now, ack());
    assert_eq!(events(&mut c), vec![Event::Connected]);
    // A valid answer resets the backoff.
    c.poll_transmit(now + secs(30.0)).unwrap();
    let d = c.handle_connect_failure(now + secs(30.0), Failure::Transport);
    assert!(d <= secs(0.75));
}

#[test]
fn ws_18_accept_and_drop_servers_see_growing_delays() {
    let t0 = Instant::now();
    let mut c = core(TransportKind::WebSocket, all_caps(), t0);
    let mut now = t0;
    let mut delays = vec![];
    for _ in 0..12 {
        c.handle_connected(now);
        c.poll_transmit(now).unwrap();
        // Dropped before any answer.
        let d = c.handle_disconnected(now);
        delays.push(d);
        now = c.connect_at().unwrap();
    }
    assert!(delays[11] > secs(20.0), "{delays:?}");
}

#[test]
fn thr_5_retry_after_is_honoured_and_thr_7_minimum_without_it() {
    let t0 = Instant::now();
    let mut c = core(TransportKind::Http, all_caps(), t0);
    c.poll_transmit(t0).unwrap();
    let d = c.handle_connect_failure(
        t0,
        Failure::Throttled {
            retry_after: Some(secs(120.0)),
        },
    );
    assert_eq!(d, secs(120.0));
    assert_eq!(c.poll_transmit(t0 + secs(119.9)), None);
    assert!(c.poll_transmit(t0 + secs(120.0)).is_some());
    let d = c.handle_connect_failure(t0 + secs(120.0), Failure::Throttled { retry_after: None });
    assert!(d >= secs(30.0));
}

#[test]
fn thr_2_unavailable_with_retry_info_disconnects_and_waits() {
    let t0 = Instant::now();
    let mut c = ws_up(all_caps(), t0);
    c.handle_message(
        t0,
        ServerToAgent {
            instance_uid: uid().to_bytes(),
            error_response: Some(ServerErrorResponse {
                r#type: ServerErrorResponseType::Unavailable as i32,
                error_message: "busy".into(),
                details: Some(server_error_response::Details::RetryInfo(RetryInfo {
                    retry_after_nanoseconds: 90_000_000_000,
                })),
            }),
            ..Default::default()
        },
    );
    let ev = events(&mut c);
    assert!(matches!(ev[0], Event::ServerError(_)));
    assert_eq!(c.poll_driver_action(), Some(DriverAction::Reconnect));
    assert_eq!(c.poll_driver_action(), None, "taken once");
    assert_eq!(c.connect_at(), Some(t0 + secs(90.0)));
    assert_eq!(c.poll_transmit(t0 + secs(89.0)), None);
    // WS-19: the driver sends agent_disconnect before closing.
    let bye = c.disconnect_message(t0);
    assert_eq!(bye.agent_disconnect, Some(AgentDisconnect {}));
}

#[test]
fn retry_3_bad_request_is_not_retried() {
    let t0 = Instant::now();
    let mut c = http_up(all_caps(), t0);
    c.set_health(health(true)).unwrap();
    let m = c.poll_transmit(t0).unwrap();
    assert!(m.health.is_some());
    c.handle_message(
        t0 + secs(1.0),
        ServerToAgent {
            error_response: Some(ServerErrorResponse {
                r#type: ServerErrorResponseType::BadRequest as i32,
                ..Default::default()
            }),
            ..Default::default()
        },
    );
    assert!(matches!(events(&mut c)[..], [Event::ServerError(_)]));
    assert!(c.is_connected());
    // No resend: the next message is the regular poll, without the rejected health.
    assert_eq!(c.poll_transmit(t0 + secs(2.0)), None);
    let poll = c.poll_transmit(t0 + secs(30.0)).unwrap();
    assert!(is_heartbeat(&poll));

    // HTTP-14: the same after a 413.
    c.handle_request_rejected(t0 + secs(31.0));
    assert_eq!(c.poll_transmit(t0 + secs(31.0)), None);
    assert_eq!(c.poll_timeout(), Some(t0 + secs(60.0)));
}

#[test]
fn uid_7_new_instance_uid_is_adopted_and_reported() {
    let t0 = Instant::now();
    let mut c = ws_up(all_caps(), t0);
    c.set_flags(AgentToServerFlagSet::REQUEST_INSTANCE_UID)
        .unwrap();
    let m = c.poll_transmit(t0).unwrap();
    assert_eq!(m.flags, AgentToServerFlagSet::REQUEST_INSTANCE_UID.bits());
    let new = InstanceUid::from_array([9; 16]);
    c.handle_message(
        t0,
        ServerToAgent {
            agent_identification: Some(AgentIdentification {
                new_instance_uid: new.to_bytes(),
            }),
            ..ack()
        },
    );
    let Some(Event::Message(data)) = events(&mut c).pop() else {
        panic!()
    };
    assert_eq!(data.new_instance_uid, Some(new));
    assert_eq!(c.instance_uid(), new);
    let m = c.poll_transmit(t0).unwrap();
    assert_eq!(m.instance_uid, new.to_bytes());
    assert_eq!(m.flags, 0, "RequestInstanceUid cleared");

    // Not 16 bytes: ignored.
    c.handle_message(
        t0,
        ServerToAgent {
            instance_uid: Bytes::new(),
            agent_identification: Some(AgentIdentification {
                new_instance_uid: Bytes::from_static(&[1; 5]),
            }),
            ..ack()
        },
    );
    assert_eq!(c.instance_uid(), new);
}

#[test]
fn uid_6_message_for_another_agent_is_ignored() {
    let t0 = Instant::now();
    let mut c = ws_up(AgentCapabilitySet::all(), t0);
    c.handle_message(
        t0,
        ServerToAgent {
            instance_uid: Bytes::from_static(&[1; 16]),
            flags: ServerToAgentFlagSet::REPORT_FULL_STATE.bits(),
            ..Default::default()
        },
    );
    assert!(events(&mut c).is_empty());
    assert_eq!(c.poll_transmit(t0), None);
}

#[test]
fn cap_3_last_non_zero_server_capabilities_are_kept() {
    let t0 = Instant::now();
    let mut c = ws_up(all_caps(), t0);
    assert_eq!(c.server_capabilities(), ServerCapabilitySet::all());
    c.handle_message(
        t0,
        ServerToAgent {
            capabilities: 0,
            ..ack()
        },
    );
    assert_eq!(c.server_capabilities(), ServerCapabilitySet::all());
    c.handle_message(
        t0,
        ServerToAgent {
            capabilities: ServerCapabilitySet::ACCEPTS_STATUS.bits(),
            ..ack()
        },
    );
    assert_eq!(c.server_capabilities(), ServerCapabilitySet::ACCEPTS_STATUS);
    // CAP-4: the CSR flow needs the server's capability.
    let req = ConnectionSettingsRequest {
        opamp: Some(Default::default()),
    };
    assert_eq!(
        c.request_connection_settings(req),
        Err(ClientError::ServerLacksCapability(
            ServerCapabilitySet::ACCEPTS_CONNECTION_SETTINGS_REQUEST
        ))
    );
}

#[test]
fn setters_check_capabilities_and_stop() {
    let t0 = Instant::now();
    let mut c = core(
        TransportKind::WebSocket,
        AgentCapabilitySet::REPORTS_STATUS,
        t0,
    );
    assert_eq!(
        c.set_health(health(true)),
        Err(ClientError::MissingCapability(
            AgentCapabilitySet::REPORTS_HEALTH
        ))
    );
    assert!(matches!(
        c.set_effective_config(EffectiveConfig::default()),
        Err(ClientError::MissingCapability(_))
    ));
    assert!(matches!(
        c.request_effective_config(),
        Err(ClientError::MissingCapability(_))
    ));
    assert!(matches!(
        c.set_remote_config_status(RemoteConfigStatus::default()),
        Err(ClientError::MissingCapability(_))
    ));
    assert!(matches!(
        c.set_package_statuses(PackageStatuses::default()),
        Err(ClientError::MissingCapability(_))
    ));
    assert!(matches!(
        c.set_available_components(AvailableComponents::default()),
        Err(ClientError::MissingCapability(_))
    ));
    assert!(matches!(
        c.set_connection_settings_status(ConnectionSettingsStatus::default()),
        Err(ClientError::MissingCapability(_))
    ));
    assert!(matches!(
        c.request_connection_settings(ConnectionSettingsRequest::default()),
        Err(ClientError::MissingCapability(_))
    ));
    assert!(matches!(
        c.set_agent_description(AgentDescription::default()),
        Err(ClientError::InvalidArgument(_))
    ));
    c.set_agent_description(description("x")).unwrap();
    assert_eq!(c.stop(t0), None, "not connected: nothing to say goodbye on");
    assert!(c.is_stopped());
    assert_eq!(
        c.set_agent_description(description("y")),
        Err(ClientError::Stopped)
    );
    assert_eq!(c.set_flags(Default::default()), Err(ClientError::Stopped));
    assert_eq!(c.poll_transmit(t0), None);
    assert_eq!(c.poll_timeout(), None);
}

#[test]
fn dis_1_stop_returns_a_disconnect_message_when_connected() {
    let t0 = Instant::now();
    let mut c = ws_up(all_caps(), t0);
    c.set_health(health(false)).unwrap();
    let bye = c.stop(t0).unwrap();
    assert_eq!(bye.agent_disconnect, Some(AgentDisconnect {}));
    assert_eq!(
        bye.health,
        Some(health(false)),
        "pending status goes with it"
    );
    assert_eq!(bye.sequence_num, 1);
}

#[test]
fn cus_custom_messages_need_a_declared_capability_and_one_waits_at_a_time() {
    let t0 = Instant::now();
    let mut c = ws_up(all_caps(), t0);
    let msg = CustomMessage {
        capability: "io.example.pause".into(),
        r#type: "pause".into(),
        data: Bytes::new(),
    };
    assert_eq!(
        c.send_custom_message(msg.clone()),
        Err(ClientError::UndeclaredCustomCapability(
            "io.example.pause".into()
        ))
    );
    c.set_custom_capabilities(CustomCapabilities {
        capabilities: vec!["io.example.pause".into()],
    })
    .unwrap();
    c.send_custom_message(msg.clone()).unwrap();
    assert_eq!(
        c.send_custom_message(msg.clone()),
        Err(ClientError::CustomMessagePending)
    );
    let m = c.poll_transmit(t0).unwrap();
    assert_eq!(m.custom_message, Some(msg.clone()));
    assert!(m.custom_capabilities.is_some());
    assert!(!c.custom_message_pending());
    c.send_custom_message(msg).unwrap();
}

#[test]
fn avc_3_hash_only_until_the_server_asks_for_the_map() {
    let t0 = Instant::now();
    let mut c = ws_up(all_caps(), t0);
    let mut components = AvailableComponents {
        hash: Bytes::from_static(b"h1"),
        ..Default::default()
    };
    components
        .components
        .insert("receiver/otlp".into(), ComponentDetails::default());
    c.set_available_components(components.clone()).unwrap();
    let m = c.poll_transmit(t0).unwrap();
    let sent = m.available_components.unwrap();
    assert_eq!(sent.hash, components.hash);
    assert!(sent.components.is_empty());
    c.handle_message(
        t0,
        ServerToAgent {
            flags: ServerToAgentFlagSet::REPORT_AVAILABLE_COMPONENTS.bits(),
            ..ack()
        },
    );
    let m = c.poll_transmit(t0).unwrap();
    assert_eq!(m.available_components, Some(components));
    // Only once.
    c.set_health(health(true)).unwrap();
    assert!(c.poll_transmit(t0).unwrap().available_components.is_none());
}

#[test]
fn s2a_2_command_stands_alone() {
    let t0 = Instant::now();
    let mut c = ws_up(all_caps(), t0);
    c.handle_message(
        t0,
        ServerToAgent {
            command: Some(ServerToAgentCommand::default()),
            flags: ServerToAgentFlagSet::REPORT_FULL_STATE.bits(),
            ..ack()
        },
    );
    assert_eq!(
        events(&mut c),
        vec![Event::Command(ServerToAgentCommand::default())]
    );
    assert_eq!(c.poll_transmit(t0), None, "the flag was ignored");

    // CMD-2: without the capability the command is ignored and the rest processed.
    let mut c = ws_up(all_caps() - AgentCapabilitySet::ACCEPTS_RESTART_COMMAND, t0);
    c.handle_message(
        t0,
        ServerToAgent {
            command: Some(ServerToAgentCommand::default()),
            flags: ServerToAgentFlagSet::REPORT_FULL_STATE.bits(),
            ..ack()
        },
    );
    assert!(matches!(events(&mut c)[..], [Event::Message(_)]));
}

#[test]
fn cap_2_offers_for_undeclared_capabilities_are_dropped() {
    let t0 = Instant::now();
    let mut c = ws_up(AgentCapabilitySet::REPORTS_STATUS, t0);
    c.handle_message(
        t0,
        ServerToAgent {
            remote_config: Some(Default::default()),
            packages_available: Some(Default::default()),
            connection_settings: Some(ConnectionSettingsOffers {
                own_metrics: Some(Default::default()),
                ..Default::default()
            }),
            ..ack()
        },
    );
    assert!(events(&mut c).is_empty());

    let mut c = ws_up(all_caps(), t0);
    c.handle_message(
        t0,
        ServerToAgent {
            remote_config: Some(Default::default()),
            packages_available: Some(Default::default()),
            ..ack()
        },
    );
    let Some(Event::Message(data)) = events(&mut c).pop() else {
        panic!()
    };
    assert!(data.remote_config.is_some());
    assert!(data.packages_available.is_some());
}

#[test]
fn ws_12_oversized_outgoing_status_is_dropped_but_the_message_goes() {
    let t0 = Instant::now();
    let mut config = CoreConfig::new(uid(), all_caps(), TransportKind::Http);
    config.max_message_size = 200;
    let mut c = ClientCore::new(config, t0);
    let mut cfg = EffectiveConfig {
        config_map: Some(Default::default()),
    };
    if let Some(map) = cfg.config_map.as_mut() {
        map.config_map.insert(
            String::new(),
            opamp_proto::AgentConfigObject {
                body: Bytes::from(vec![b'x'; 1000]),
                content_type: String::new(),
                ..Default::default()
            },
        );
    }
    c.set_effective_config(cfg).unwrap();
    let m = c.poll_transmit(t0).unwrap();
    assert!(m.effective_config.is_none());
    assert!(m.encoded_len() < 200);
    assert_eq!(c.dropped_outgoing(), 1);
    assert_eq!(m.sequence_num, 0);
}

#[test]
fn effective_config_is_requested_at_start_and_on_demand() {
    let t0 = Instant::now();
    let mut c = core(TransportKind::Http, all_caps(), t0);
    assert!(c.take_effective_config_request());
    assert!(!c.take_effective_config_request());
    c.request_effective_config().unwrap();
    assert!(c.take_effective_config_request());
    let c = core(TransportKind::Http, AgentCapabilitySet::REPORTS_STATUS, t0);
    let mut c = c;
    assert!(!c.take_effective_config_request());
}

#[test]
fn disconnect_then_reconnect_sends_full_state_again() {
    let t0 = Instant::now();
    let mut c = core(TransportKind::WebSocket, all_caps(), t0);
    c.set_health(health(true)).unwrap();
    c.handle_connected(t0);
    c.poll_transmit(t0).unwrap();
    let bye = c.disconnect_message(t0);
    assert!(bye.health.is_none());
    c.handle_disconnected(t0);
    c.handle_connected(t0 + secs(1.0));
    assert!(c.poll_transmit(t0 + secs(1.0)).unwrap().health.is_some());
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
}

/// What a hostile or careless server may send, extreme durations included.
fn random_server_message(rng: &mut Rng) -> ServerToAgent {
    let mut m = ack();
    match rng.next() % 8 {
        0 => m.capabilities = 0,
        1 => {
            m.connection_settings = Some(ConnectionSettingsOffers {
                opamp: Some(OpAmpConnectionSettings {
                    heartbeat_interval_seconds: match rng.next() % 4 {
                        0 => 0,
                        1 => u64::MAX,
                        2 => u64::MAX / 1_000_000_000 + 1,
                        _ => rng.next() % 100,
                    },
                    ..Default::default()
                }),
                ..Default::default()
            })
        }
        2 => {
            m = ServerToAgent {
                instance_uid: uid().to_bytes(),
                error_response: Some(opamp_proto::ServerErrorResponse {
                    r#type: (rng.next() % 4) as i32,
                    error_message: String::new(),
                    details: rng.chance(70).then(|| {
                        opamp_proto::server_error_response::Details::RetryInfo(RetryInfo {
                            retry_after_nanoseconds: if rng.chance(30) {
                                u64::MAX
                            } else {
                                rng.next() % 10_000_000_000
                            },
                        })
                    }),
                }),
                ..Default::default()
            }
        }
        3 => {
            let len = if rng.chance(50) {
                16
            } else {
                (rng.next() % 20) as usize
            };
            m.agent_identification = Some(AgentIdentification {
                new_instance_uid: Bytes::from(vec![9u8; len]),
            })
        }
        4 => m.flags = rng.next(),
        5 => {
            m.command = Some(ServerToAgentCommand {
                r#type: (rng.next() % 3) as i32,
            })
        }
        6 => m.instance_uid = Bytes::from_static(b"short"),
        _ => {}
    }
    m
}

/// Seeded sequences of setters, messages from a hostile server, failures with extreme
/// Retry-After values, and time: the core never panics (no `Instant` overflow), every
/// message it sends keeps the rules, and sequence numbers go up by exactly one.
#[test]
fn random_operation_sequences_keep_the_client_rules() {
    for seed in 0..40u64 {
        let mut rng = Rng(seed);
        let transport = if seed % 2 == 0 {
            TransportKind::WebSocket
        } else {
            TransportKind::Http
        };
        let mut now = Instant::now();
        let mut c = core(transport, all_caps(), now);
        let mut last_seq: Option<u64> = None;
        c.handle_connected(now);
        for step in 0..1_500 {
            match rng.next() % 7 {
                0 => {
                    let _ = c.set_health(health(rng.chance(50)));
                }
                1 => {
                    let _ = c.set_agent_description(description(if rng.chance(50) {
                        "a"
                    } else {
                        "b"
                    }));
                }
                2 => c.handle_message(now, random_server_message(&mut rng)),
                3 => {
                    let failure = if rng.chance(50) {
                        Failure::Transport
                    } else {
                        Failure::Throttled {
                            retry_after: rng.chance(70).then(|| match rng.next() % 3 {
                                0 => Duration::MAX,
                                1 => Duration::from_secs(u64::MAX),
                                _ => Duration::from_secs(rng.next() % 120),
                            }),
                        }
                    };
                    let _ = c.handle_connect_failure(now, failure);
                }
                4 => {
                    let _ = c.handle_disconnected(now);
                }
                5 => c.handle_connected(now),
                _ => {}
            }
            while let Some(msg) = c.poll_transmit(now) {
                let ctx = format!("seed {seed} step {step}: {msg:?}");
                assert_eq!(msg.instance_uid.len(), 16, "UID-2 {ctx}");
                assert!(
                    AgentCapabilitySet::from_bits_retain(msg.capabilities)
                        .contains(AgentCapabilitySet::REPORTS_STATUS),
                    "CAP-1 {ctx}"
                );
                if let Some(prev) = last_seq {
                    assert_eq!(msg.sequence_num, prev.wrapping_add(1), "SEQ-1 {ctx}");
                }
                last_seq = Some(msg.sequence_num);
            }
            let _ = c.poll_timeout();
            while c.poll_event().is_some() {}
            now += Duration::from_millis(rng.next() % 20_000);
        }
    }
}

/// Finding 4 (GEN-8, THR-8, RETRY-3, HTTP-14): a server that answers 400/413 to every request
/// while the link is down is not flooded. Each rejection reschedules the next attempt with
/// backoff (growing delays within the jitter bounds), never two requests at the same instant,
/// and the rejected message itself is not retried.
#[test]
fn gen_8_retry_3_rejections_while_down_back_off_instead_of_flooding() {
    let t0 = Instant::now();
    let mut c = core(TransportKind::Http, all_caps(), t0);
    c.set_health(health(true)).unwrap();
    let mut now = t0;
    let mut base: f64 = 0.5;
    let mut sent_at: Vec<Instant> = vec![];
    for i in 0..20 {
        let m = c.poll_transmit(now).expect("the attempt is due");
        if i == 0 {
            assert!(
                m.health.is_some(),
                "the first request carries the full state"
            );
        } else {
            // RETRY-3: the rejected message is not retried; the next attempt is a bare poll.
            assert!(
                is_heartbeat(&m),
                "attempt {i} resent the rejected status: {m:?}"
            );
        }
        sent_at.push(now);
        c.handle_request_rejected(now);
        assert!(!c.is_connected());
        // No second request at the same instant.
        assert_eq!(c.poll_transmit(now), None, "attempt {i}: flooding");
        let next = c.poll_timeout().expect("a next attempt is scheduled");
        assert_eq!(c.connect_at(), Some(next));
        let d = (next - now).as_secs_f64();
        assert!(
            d >= base * 0.5 - 1e-9 && d <= base * 1.5 + 1e-9,
            "attempt {i}: delay {d} vs {base}"
        );
        assert_eq!(c.poll_transmit(next - secs(0.001)), None);
        now = next;
        base = (base * 1.5).min(60.0);
    }
    sent_at.dedup();
    assert_eq!(sent_at.len(), 20, "two requests at the same instant");
    // A change made meanwhile goes with the next attempt, after the backoff.
    c.set_health(health(false)).unwrap();
    let m = c.poll_transmit(now).unwrap();
    assert_eq!(m.health, Some(health(false)));
    // Once the server answers, the link is up and the backoff starts over.
    c.handle_message(now, ack());
    assert!(c.is_connected());
    assert!(c.poll_transmit(now + secs(1.0)).is_none());
    c.poll_transmit(now + secs(30.0)).unwrap();
    let d = c.handle_connect_failure(now + secs(30.0), Failure::Transport);
    assert!(d <= secs(0.75));
}

/// Finding 5 (UID-7, UID-8, UID-6): a server-assigned uid, even unprompted, is announced at
/// once, and pushes the server addresses to the previous uid until it has learned the new one
/// are processed, not dropped.
#[test]
fn uid_7_uid_8_unprompted_new_uid_is_announced_at_once_and_old_uid_pushes_accepted() {
    let t0 = Instant::now();
    // WebSocket without ReportsHeartbeat: the agent would otherwise send nothing for long.
    let caps = all_caps() - AgentCapabilitySet::REPORTS_HEARTBEAT;
    let mut c = ws_up(caps, t0);
    assert_eq!(c.poll_transmit(t0), None);
    let old = uid();
    let new = InstanceUid::from_array([9; 16]);
    // UID-8: unprompted (RequestInstanceUid was never set).
    c.handle_message(
        t0,
        ServerToAgent {
            agent_identification: Some(AgentIdentification {
                new_instance_uid: new.to_bytes(),
            }),
            ..ack()
        },
    );
    events(&mut c);
    assert_eq!(c.instance_uid(), new);

    // A push addressed to the old uid, before the server learned the new one: processed.
    let config = opamp_proto::AgentRemoteConfig {
        config_hash: Bytes::from_static(b"h1"),
        ..Default::default()
    };
    c.handle_message(
        t0,
        ServerToAgent {
            instance_uid: old.to_bytes(),
            remote_config: Some(config.clone()),
            ..Default::default()
        },
    );
    let Some(Event::Message(data)) = events(&mut c).pop() else {
        panic!("a push addressed to the previous uid was dropped")
    };
    assert_eq!(data.remote_config, Some(config));

    // The new uid goes out at once (UID-7), although nothing else changed.
    let m = c
        .poll_transmit(t0)
        .expect("the new uid is announced at once");
    assert_eq!(m.instance_uid, new.to_bytes());
    assert!(is_heartbeat(&m));
    assert_eq!(c.poll_transmit(t0), None, "announced once");

    // Once the server addresses the new uid, the old one is another agent's again (UID-6).
    c.handle_message(t0, ack_for(new));
    events(&mut c);
    c.handle_message(
        t0,
        ServerToAgent {
            instance_uid: old.to_bytes(),
            flags: ServerToAgentFlagSet::REPORT_FULL_STATE.bits(),
            ..Default::default()
        },
    );
    assert!(events(&mut c).is_empty());
    assert_eq!(c.poll_transmit(t0), None);
}

/// Finding 5 over plain HTTP: the uid change is reported by the very next request, without
/// waiting for the polling interval.
#[test]
fn uid_7_http_new_uid_is_reported_without_waiting_for_the_poll() {
    let t0 = Instant::now();
    let mut c = http_up(all_caps(), t0);
    let new = InstanceUid::from_array([9; 16]);
    assert_eq!(c.poll_transmit(t0 + secs(1.0)), None);
    c.poll_transmit(t0 + secs(30.0)).unwrap();
    c.handle_message(
        t0 + secs(30.0),
        ServerToAgent {
            agent_identification: Some(AgentIdentification {
                new_instance_uid: new.to_bytes(),
            }),
            ..ack()
        },
    );
    let m = c
        .poll_transmit(t0 + secs(30.0))
        .expect("the new uid is reported at once");
    assert_eq!(m.instance_uid, new.to_bytes());
}

fn ack_for(uid: InstanceUid) -> ServerToAgent {
    ServerToAgent {
        instance_uid: uid.to_bytes(),
        ..ack()
    }
}

// ---- wire correctness: RC-6, CS-4, CAP-*, nothing lost, hostile servers -------------------

fn no_server_caps_but_status() -> ServerToAgent {
    ServerToAgent {
        capabilities: ServerCapabilitySet::ACCEPTS_STATUS.bits(),
        ..ack()
    }
}

#[test]
fn rc_6_first_message_reports_unset_remote_config_status_when_none_was_set() {
    let t0 = Instant::now();
    for caps in [
        AgentCapabilitySet::ACCEPTS_REMOTE_CONFIG,
        AgentCapabilitySet::ACCEPTS_REMOTE_CONFIG | AgentCapabilitySet::REPORTS_REMOTE_CONFIG,
    ] {
        let mut c = core(TransportKind::Http, caps, t0);
        let first = c.poll_transmit(t0).unwrap();
        let status = first
            .remote_config_status
            .expect("RC-6: a status, so the server can tell no config arrived");
        assert_eq!(status.status, RemoteConfigStatuses::Unset as i32);
        assert!(status.last_remote_config_hash.is_empty());
        // Once answered, it is not repeated (CMP-1), but it is part of every full report.
        c.handle_message(t0, ack());
        events(&mut c);
        assert!(
            c.poll_transmit(t0 + secs(30.0))
                .unwrap()
                .remote_config_status
                .is_none()
        );
    }
    // A status set by the embedder replaces it.
    let mut c = core(TransportKind::Http, all_caps(), t0);
    let set = RemoteConfigStatus {
        last_remote_config_hash: Bytes::from_static(b"h"),
        status: RemoteConfigStatuses::Applied as i32,
        ..Default::default()
    };
    c.set_remote_config_status(set.clone()).unwrap();
    assert_eq!(c.poll_transmit(t0).unwrap().remote_config_status, Some(set));
    // Without AcceptsRemoteConfig, nothing is made up.
    let mut c = core(TransportKind::Http, AgentCapabilitySet::REPORTS_STATUS, t0);
    assert!(c.poll_transmit(t0).unwrap().remote_config_status.is_none());
}

#[test]
fn cs_4_rejected_offer_applies_nothing_and_reports_failed_with_the_hash() {
    let t0 = Instant::now();
    let mut c = ws_up(all_caps(), t0);
    c.handle_message(t0, offer(5));
    let Some((settings, offer_hash)) = events(&mut c).into_iter().find_map(|e| match e {
        Event::OpampConnectionSettings {
            settings,
            offer_hash,
        } => Some((settings, offer_hash)),
        _ => None,
    }) else {
        panic!("the offer is passed on for a decision")
    };
    // Nothing is applied before the decision.
    assert_eq!(
        c.heartbeat_interval(),
        Some(secs(30.0)),
        "applied before the decision"
    );
    assert_eq!(c.poll_transmit(t0), None);
    c.reject_opamp_connection_settings(t0, &offer_hash, "not from this server");
    assert_eq!(settings.heartbeat_interval_seconds, 5);
    assert_eq!(
        c.heartbeat_interval(),
        Some(secs(30.0)),
        "applied after a rejection"
    );
    let m = c.poll_transmit(t0).unwrap();
    assert_eq!(
        m.connection_settings_status,
        Some(ConnectionSettingsStatus {
            last_connection_settings_hash: Bytes::from_static(b"offer"),
            status: ConnectionSettingsStatuses::Failed as i32,
            error_message: "not from this server".into(),
        }),
        "CSS-1"
    );

    // Without ReportsConnectionSettingsStatus the rejection is only not applied.
    let caps = all_caps() - AgentCapabilitySet::REPORTS_CONNECTION_SETTINGS_STATUS;
    let mut c = ws_up(caps, t0);
    c.handle_message(t0, offer(5));
    events(&mut c);
    c.reject_opamp_connection_settings(t0, b"offer", "no");
    assert_eq!(c.poll_transmit(t0), None);
}

#[test]
fn cs_4_accepted_heartbeat_offer_is_applied_and_reported_applied() {
    let t0 = Instant::now();
    let mut c = ws_up(all_caps(), t0);
    handle_and_accept(&mut c, offer(5), t0);
    assert_eq!(c.heartbeat_interval(), Some(secs(5.0)));
    let m = c.poll_transmit(t0).unwrap();
    let status = m.connection_settings_status.unwrap();
    assert_eq!(status.status, ConnectionSettingsStatuses::Applied as i32);
    assert_eq!(
        status.last_connection_settings_hash,
        Bytes::from_static(b"offer")
    );
}

// ---- connection settings offers: candidate, trial, rollback (CS-OP-*, CSS-1) -------------

/// An offer moving the agent to `endpoint`, with a 5 s heartbeat, under `hash`.
fn moving_offer(hash: &'static [u8], endpoint: &str) -> ServerToAgent {
    ServerToAgent {
        connection_settings: Some(ConnectionSettingsOffers {
            hash: Bytes::from_static(hash),
            opamp: Some(OpAmpConnectionSettings {
                destination_endpoint: endpoint.into(),
                heartbeat_interval_seconds: 5,
                ..Default::default()
            }),
            ..Default::default()
        }),
        ..ack()
    }
}

fn status_of(m: &AgentToServer) -> (i32, Bytes, String) {
    let s = m
        .connection_settings_status
        .clone()
        .expect("a connection settings status");
    (s.status, s.last_connection_settings_hash, s.error_message)
}

fn applying(hash: &'static [u8]) -> (i32, Bytes, String) {
    (
        ConnectionSettingsStatuses::Applying as i32,
        Bytes::from_static(hash),
        String::new(),
    )
}

/// Starts the trial of `moving_offer(hash, ...)` at `now`: accepted, APPLYING in the goodbye.
fn start_trial(c: &mut ClientCore, hash: &'static [u8], now: Instant) {
    let rest = handle_and_accept(c, moving_offer(hash, "ws://b.example/v1/opamp"), now);
    assert!(rest.is_empty(), "{rest:?}");
    assert!(c.is_trying_connection_settings());
    assert_eq!(c.poll_driver_action(), Some(DriverAction::SwitchConnection));
    assert!(!c.is_connected());
    assert_eq!(c.connect_at(), Some(now), "the candidate is tried at once");
    let bye = c.disconnect_message(now);
    assert!(bye.agent_disconnect.is_some(), "CS-OP-3: agent_disconnect");
    assert_eq!(status_of(&bye), applying(hash), "CS-OP-3: APPLYING");
}

#[test]
fn cs_op_5_ws_candidate_is_kept_only_once_the_new_server_answers() {
    let t0 = Instant::now();
    let mut c = ws_up(all_caps(), t0);
    start_trial(&mut c, b"move", t0);
    // Not applied before verification: the heartbeat of the offer waits too.
    assert_eq!(c.heartbeat_interval(), Some(secs(30.0)));
    let t1 = t0 + secs(0.1);
    c.handle_connected(t1);
    let first = c.poll_transmit(t1).unwrap();
    assert!(
        first.remote_config_status.is_some(),
        "full state to the new server"
    );
    assert_eq!(status_of(&first), applying(b"move"));
    assert!(
        c.is_trying_connection_settings(),
        "switched before an answer"
    );
    c.handle_message(t1, ack());
    let ev = events(&mut c);
    assert!(
        ev.iter().any(|e| matches!(e, Event::OpampConnectionSettingsApplied { offer_hash, settings }
            if offer_hash[..] == b"move"[..] && settings.destination_endpoint == "ws://b.example/v1/opamp")),
        "{ev:?}"
    );
    assert!(!c.is_trying_connection_settings());
    assert_eq!(c.heartbeat_interval(), Some(secs(5.0)));
    let m = c.poll_transmit(t1).unwrap();
    assert_eq!(
        status_of(&m),
        (
            ConnectionSettingsStatuses::Applied as i32,
            Bytes::from_static(b"move"),
            String::new()
        ),
        "CS-OP-5: APPLIED"
    );
    assert_eq!(c.poll_driver_action(), None);
}

#[test]
fn cs_op_6_ws_candidate_that_cannot_connect_rolls_back_at_once_and_reports_failed() {
    let t0 = Instant::now();
    let mut c = ws_up(all_caps(), t0);
    start_trial(&mut c, b"dead", t0);
    let t1 = t0 + secs(1.0);
    let delay = c.handle_connect_error(t1, Failure::Transport, "connection refused");
    assert_eq!(delay, Duration::ZERO, "the old settings are tried at once");
    assert_eq!(c.connect_at(), Some(t1));
    assert!(!c.is_trying_connection_settings());
    let ev = events(&mut c);
    assert!(
        ev.iter().any(
            |e| matches!(e, Event::OpampConnectionSettingsFailed { offer_hash, reason }
            if offer_hash[..] == b"dead"[..] && reason == "connection refused")
        ),
        "{ev:?}"
    );
    // Back on the old server: FAILED with the reason, nothing of the offer applied.
    c.handle_connected(t1);
    let m = c.poll_transmit(t1).unwrap();
    assert_eq!(
        status_of(&m),
        (
            ConnectionSettingsStatuses::Failed as i32,
            Bytes::from_static(b"dead"),
            "connection refused".into()
        )
    );
    assert_eq!(c.heartbeat_interval(), Some(secs(30.0)));
    // The server repeating the failed offer changes nothing (CS-2).
    events(&mut c);
    c.handle_message(t1, moving_offer(b"dead", "ws://b.example/v1/opamp"));
    assert!(events(&mut c).is_empty());
    assert!(!c.is_trying_connection_settings());
}

#[test]
fn cs_op_6_ws_candidate_closing_before_an_answer_fails() {
    let t0 = Instant::now();
    let mut c = ws_up(all_caps(), t0);
    start_trial(&mut c, b"m", t0);
    c.handle_connected(t0);
    c.poll_transmit(t0).unwrap();
    assert_eq!(
        c.handle_connection_lost(t0, "closed by the server"),
        Duration::ZERO
    );
    assert!(!c.is_trying_connection_settings());
    c.handle_connected(t0);
    let (status, _, reason) = status_of(&c.poll_transmit(t0).unwrap());
    assert_eq!(status, ConnectionSettingsStatuses::Failed as i32);
    assert_eq!(reason, "closed by the server");
}

#[test]
fn cs_op_6_ws_silent_candidate_fails_at_the_timeout_on_the_virtual_clock() {
    let t0 = Instant::now();
    let mut c = ws_up(all_caps(), t0);
    start_trial(&mut c, b"m", t0);
    c.handle_connected(t0 + secs(1.0));
    c.poll_transmit(t0 + secs(1.0)).unwrap();
    // The default 30 s from the acceptance bounds the wait.
    assert_eq!(c.poll_timeout(), Some(t0 + secs(30.0)));
    c.handle_timeout(t0 + secs(29.9));
    assert!(c.is_trying_connection_settings());
    c.handle_timeout(t0 + secs(30.0));
    assert!(!c.is_trying_connection_settings());
    assert_eq!(c.poll_driver_action(), Some(DriverAction::DropConnection));
    assert_eq!(c.connect_at(), Some(t0 + secs(30.0)));
    let ev = events(&mut c);
    assert!(
        ev.iter().any(
            |e| matches!(e, Event::OpampConnectionSettingsFailed { reason, .. }
            if reason.contains("did not answer"))
        ),
        "{ev:?}"
    );
}

#[test]
fn cs_op_6_candidate_answering_with_an_error_fails() {
    let t0 = Instant::now();
    let mut c = ws_up(all_caps(), t0);
    start_trial(&mut c, b"m", t0);
    c.handle_connected(t0);
    c.poll_transmit(t0).unwrap();
    c.handle_message(
        t0,
        ServerToAgent {
            error_response: Some(ServerErrorResponse {
                r#type: ServerErrorResponseType::BadRequest as i32,
                error_message: "unknown agent".into(),
                details: None,
            }),
            ..ack()
        },
    );
    assert!(!c.is_trying_connection_settings());
    // Connected to the candidate server: the driver leaves it (goodbye, close).
    assert_eq!(c.poll_driver_action(), Some(DriverAction::Reconnect));
    assert_eq!(c.connect_at(), Some(t0));
    let ev = events(&mut c);
    assert!(ev.iter().any(
        |e| matches!(e, Event::OpampConnectionSettingsFailed { reason, .. }
        if reason.contains("unknown agent"))
    ));
}

#[test]
fn cs_op_http_candidate_is_tried_with_the_next_request_and_a_refusal_rolls_back() {
    let t0 = Instant::now();
    let mut c = http_up(all_caps(), t0);
    start_trial(&mut c, b"h", t0);
    // The next request is the attempt with the candidate: the full state, APPLYING.
    let m = c.poll_transmit(t0).unwrap();
    assert!(m.remote_config_status.is_some(), "full state");
    assert_eq!(status_of(&m), applying(b"h"));
    c.handle_message(t0, ack());
    assert!(
        events(&mut c)
            .iter()
            .any(|e| matches!(e, Event::OpampConnectionSettingsApplied { .. }))
    );
    let (status, ..) = status_of(&c.poll_transmit(t0).unwrap());
    assert_eq!(status, ConnectionSettingsStatuses::Applied as i32);

    // A candidate server that refuses the request (HTTP 400/413) fails the offer.
    let mut c = http_up(all_caps(), t0);
    start_trial(&mut c, b"h2", t0);
    c.poll_transmit(t0).unwrap();
    c.handle_request_rejected(t0);
    assert!(!c.is_trying_connection_settings());
    assert_eq!(c.connect_at(), Some(t0));
    let m = c.poll_transmit(t0).unwrap();
    let (status, hash, reason) = status_of(&m);
    assert_eq!(
        (status, &hash[..]),
        (ConnectionSettingsStatuses::Failed as i32, &b"h2"[..])
    );
    assert!(reason.contains("refused"), "{reason}");
}

#[test]
fn cs_4_vetoed_offer_changes_nothing_and_is_not_handed_over_again() {
    let t0 = Instant::now();
    let mut c = ws_up(all_caps(), t0);
    c.handle_message(t0, moving_offer(b"v", "ws://b.example/v1/opamp"));
    let Some(Event::OpampConnectionSettings { offer_hash, .. }) = events(&mut c).pop() else {
        panic!("offer handed over")
    };
    c.reject_opamp_connection_settings(t0, &offer_hash, "not trusted");
    assert!(!c.is_trying_connection_settings());
    assert_eq!(c.poll_driver_action(), None);
    assert!(c.is_connected());
    assert_eq!(c.heartbeat_interval(), Some(secs(30.0)));
    let (status, _, reason) = status_of(&c.poll_transmit(t0).unwrap());
    assert_eq!(
        (status, reason.as_str()),
        (ConnectionSettingsStatuses::Failed as i32, "not trusted")
    );
    // CS-2: the repeat (as a plain-HTTP server sends until the hash is reported) is deduplicated.
    for _ in 0..3 {
        c.handle_message(t0, moving_offer(b"v", "ws://b.example/v1/opamp"));
        assert!(events(&mut c).is_empty());
    }
    assert_eq!(c.poll_transmit(t0), None, "the status did not change");
    // A new hash is a new offer (after the guard's interval).
    c.handle_message(
        t0 + secs(5.0),
        moving_offer(b"v2", "ws://b.example/v1/opamp"),
    );
    assert!(matches!(
        events(&mut c)[..],
        [Event::OpampConnectionSettings { .. }]
    ));
}

#[test]
fn cs_2_offers_without_a_hash_are_deduplicated_by_content() {
    let t0 = Instant::now();
    let mut c = ws_up(all_caps(), t0);
    let unhashed = |endpoint: &str| {
        let mut m = moving_offer(b"", "");
        if let Some(o) = m
            .connection_settings
            .as_mut()
            .and_then(|o| o.opamp.as_mut())
        {
            o.destination_endpoint = endpoint.into();
        }
        m
    };
    c.handle_message(t0, unhashed("ws://b/"));
    assert_eq!(events(&mut c).len(), 1);
    c.handle_message(t0 + secs(5.0), unhashed("ws://b/"));
    assert!(events(&mut c).is_empty());
    c.handle_message(t0 + secs(5.0), unhashed("ws://c/"));
    assert_eq!(events(&mut c).len(), 1);
}

#[test]
fn cs_2_a_restored_status_marks_its_offer_as_handled() {
    let t0 = Instant::now();
    let mut c = core(TransportKind::WebSocket, all_caps(), t0);
    c.set_connection_settings_status(ConnectionSettingsStatus {
        last_connection_settings_hash: Bytes::from_static(b"persisted"),
        status: ConnectionSettingsStatuses::Applied as i32,
        error_message: String::new(),
    })
    .unwrap();
    c.handle_connected(t0);
    let (status, hash, _) = status_of(&c.poll_transmit(t0).unwrap());
    assert_eq!(
        (status, &hash[..]),
        (
            ConnectionSettingsStatuses::Applied as i32,
            &b"persisted"[..]
        )
    );
    events(&mut c);
    c.handle_message(t0, moving_offer(b"persisted", "ws://b/"));
    assert!(events(&mut c).is_empty(), "applied again after a restart");
}

#[test]
fn cs_op_an_offer_in_the_verifying_answer_is_handled_and_a_failed_one_is_not_tried_again() {
    let t0 = Instant::now();
    let mut c = ws_up(all_caps(), t0);
    start_trial(&mut c, b"first", t0);
    c.handle_connected(t0);
    c.poll_transmit(t0).unwrap();
    // The candidate server answers with another offer at once: the answer verifies the
    // candidate; the offer in it comes within the guard's interval, so it is handled at
    // the interval's end.
    c.handle_message(t0, moving_offer(b"second", "ws://c/"));
    let ev = events(&mut c);
    assert!(
        ev.iter()
            .any(|e| matches!(e, Event::OpampConnectionSettingsApplied { .. }))
    );
    assert_eq!(c.poll_timeout(), Some(t0 + secs(5.0)));
    c.handle_timeout(t0 + secs(5.0));
    let ev = events(&mut c);
    assert!(
        ev.iter().any(|e| matches!(e, Event::OpampConnectionSettings { offer_hash, .. } if offer_hash[..] == b"second"[..])),
        "{ev:?}"
    );

    let mut c = ws_up(all_caps(), t0);
    start_trial(&mut c, b"first", t0);
    // An offer that comes before the candidate answered (on the old connection, say).
    c.handle_connected(t0);
    c.poll_transmit(t0).unwrap();
    c.handle_connect_error(t0, Failure::Transport, "x");
    events(&mut c);
    c.handle_connected(t0);
    events(&mut c);
    c.handle_message(t0, moving_offer(b"first", "ws://b.example/v1/opamp"));
    assert!(
        events(&mut c).is_empty(),
        "a failed offer is not tried again"
    );
}

#[test]
fn own_1_css_3_telemetry_offers_go_to_the_embedder_and_their_status_is_reported() {
    let t0 = Instant::now();
    let telemetry = |hash: &'static [u8]| ServerToAgent {
        connection_settings: Some(ConnectionSettingsOffers {
            hash: Bytes::from_static(hash),
            own_metrics: Some(opamp_proto::TelemetryConnectionSettings {
                destination_endpoint: "https://otlp.example:4318/v1/metrics".into(),
                ..Default::default()
            }),
            own_logs: Some(Default::default()),
            other_connections: [("exporter".to_owned(), Default::default())].into(),
            ..Default::default()
        }),
        ..ack()
    };
    let mut c = ws_up(all_caps(), t0);
    c.handle_message(t0, telemetry(b"t"));
    let Some(Event::TelemetryConnectionSettings {
        settings,
        offer_hash,
    }) = events(&mut c).pop()
    else {
        panic!("telemetry offer handed over")
    };
    assert_eq!(
        settings.own_metrics.as_ref().unwrap().destination_endpoint,
        "https://otlp.example:4318/v1/metrics"
    );
    assert!(settings.own_logs.is_some() && settings.own_traces.is_none());
    assert_eq!(settings.other_connections.len(), 1);
    assert_eq!(c.poll_transmit(t0), None, "a status before the decision");
    c.accept_telemetry_connection_settings(t0, &offer_hash);
    let (status, hash, _) = status_of(&c.poll_transmit(t0).unwrap());
    assert_eq!(
        (status, &hash[..]),
        (ConnectionSettingsStatuses::Applied as i32, &b"t"[..])
    );

    c.handle_message(t0, telemetry(b"t2"));
    events(&mut c);
    c.reject_telemetry_connection_settings(t0, b"t2", "no OTLP exporter");
    let (status, _, reason) = status_of(&c.poll_transmit(t0).unwrap());
    assert_eq!(
        (status, reason.as_str()),
        (
            ConnectionSettingsStatuses::Failed as i32,
            "no OTLP exporter"
        )
    );

    // CAP-2: only the parts the agent declared; none declared, nothing handed over or
    // reported.
    let caps =
        all_caps() - AgentCapabilitySet::REPORTS_OWN_METRICS - AgentCapabilitySet::REPORTS_OWN_LOGS;
    let mut c = ws_up(caps, t0);
    c.handle_message(t0, telemetry(b"t"));
    let Some(Event::TelemetryConnectionSettings { settings, .. }) = events(&mut c).pop() else {
        panic!()
    };
    assert!(settings.own_metrics.is_none() && settings.own_logs.is_none());
    let caps = caps - AgentCapabilitySet::ACCEPTS_OTHER_CONNECTION_SETTINGS;
    let mut c = ws_up(caps, t0);
    c.handle_message(t0, telemetry(b"t"));
    assert!(events(&mut c).is_empty());
    assert_eq!(c.poll_transmit(t0), None);
}

#[test]
fn css_1_status_of_an_offer_with_both_parts_follows_both_decisions() {
    let t0 = Instant::now();
    let both = ServerToAgent {
        connection_settings: Some(ConnectionSettingsOffers {
            hash: Bytes::from_static(b"both"),
            opamp: Some(OpAmpConnectionSettings {
                heartbeat_interval_seconds: 7,
                ..Default::default()
            }),
            own_traces: Some(Default::default()),
            ..Default::default()
        }),
        ..ack()
    };
    let mut c = ws_up(all_caps(), t0);
    c.handle_message(t0, both.clone());
    assert_eq!(events(&mut c).len(), 2);
    c.accept_opamp_connection_settings(
        t0,
        b"both",
        &OpAmpConnectionSettings {
            heartbeat_interval_seconds: 7,
            ..Default::default()
        },
    );
    assert_eq!(
        c.poll_transmit(t0),
        None,
        "APPLIED before the telemetry part was decided"
    );
    c.reject_telemetry_connection_settings(t0, b"both", "no traces here");
    let (status, _, reason) = status_of(&c.poll_transmit(t0).unwrap());
    assert_eq!(
        (status, reason.as_str()),
        (ConnectionSettingsStatuses::Failed as i32, "no traces here")
    );
    assert_eq!(c.heartbeat_interval(), Some(secs(7.0)));
}

#[test]
fn cap_4_parts_the_server_cannot_take_are_held_back_until_one_can() {
    let t0 = Instant::now();
    let mut c = core(TransportKind::WebSocket, all_caps(), t0);
    c.handle_connected(t0);
    c.poll_transmit(t0).unwrap();
    // The server takes status only.
    c.handle_message(t0, no_server_caps_but_status());
    events(&mut c);
    c.set_effective_config(EffectiveConfig::default()).unwrap();
    c.set_package_statuses(PackageStatuses::default()).unwrap();
    c.set_connection_settings_status(ConnectionSettingsStatus::default())
        .unwrap();
    assert_eq!(
        c.poll_transmit(t0),
        None,
        "sent what the server cannot take"
    );
    c.set_health(health(true)).unwrap();
    let m = c.poll_transmit(t0).unwrap();
    assert!(m.health.is_some());
    assert!(
        m.effective_config.is_none(),
        "CAP-4: AcceptsEffectiveConfig"
    );
    assert!(m.package_statuses.is_none(), "CAP-4: AcceptsPackagesStatus");
    assert!(
        m.connection_settings_status.is_none(),
        "CAP-4: OffersConnectionSettings"
    );
    // Nor in a full report.
    c.handle_message(
        t0,
        ServerToAgent {
            flags: ServerToAgentFlagSet::REPORT_FULL_STATE.bits(),
            ..no_server_caps_but_status()
        },
    );
    events(&mut c);
    let full = c.poll_transmit(t0).unwrap();
    assert!(full.health.is_some());
    assert!(full.effective_config.is_none() && full.package_statuses.is_none());
    // A server that can take them gets them, without any change on the agent's side.
    c.handle_message(t0 + secs(1.0), ack());
    events(&mut c);
    let m = c
        .poll_transmit(t0 + secs(1.0))
        .expect("the held-back parts go now");
    assert!(m.effective_config.is_some());
    assert!(m.package_statuses.is_some());
    assert!(m.connection_settings_status.is_some());
    assert_eq!(c.poll_transmit(t0 + secs(1.0)), None);
}

#[test]
fn cap_1_cap_5_undefined_capability_and_flag_bits_are_never_sent() {
    let t0 = Instant::now();
    let mut config = CoreConfig::new(
        uid(),
        AgentCapabilitySet::from_bits_retain(u64::MAX),
        TransportKind::Http,
    );
    config.jitter_seed = Some(1);
    let mut c = ClientCore::new(config, t0);
    c.set_flags(AgentToServerFlagSet::from_bits_retain(u64::MAX))
        .unwrap();
    let m = c.poll_transmit(t0).unwrap();
    assert_eq!(m.capabilities, AgentCapabilitySet::all().bits());
    assert_eq!(m.flags, AgentToServerFlagSet::all().bits());
}

fn config_of(len: usize) -> EffectiveConfig {
    let mut cfg = EffectiveConfig {
        config_map: Some(Default::default()),
    };
    if let Some(map) = cfg.config_map.as_mut() {
        map.config_map.insert(
            String::new(),
            opamp_proto::AgentConfigObject {
                body: Bytes::from(vec![b'x'; len]),
                content_type: String::new(),
                ..Default::default()
            },
        );
    }
    cfg
}

#[test]
fn ws_12_oversized_report_is_split_and_nothing_queued_is_lost() {
    let t0 = Instant::now();
    let mut config = CoreConfig::new(uid(), all_caps(), TransportKind::WebSocket);
    config.max_message_size = 300;
    config.jitter_seed = Some(1);
    let mut c = ClientCore::new(config, t0);
    c.set_custom_capabilities(CustomCapabilities {
        capabilities: vec!["io.example.x".into()],
    })
    .unwrap();
    c.handle_connected(t0);
    c.poll_transmit(t0).unwrap();
    c.handle_message(t0, ack());
    events(&mut c);
    // Each part fits alone, not together.
    c.set_effective_config(config_of(200)).unwrap();
    c.set_package_statuses(PackageStatuses {
        server_provided_all_packages_hash: Bytes::from(vec![b'p'; 200]),
        ..Default::default()
    })
    .unwrap();
    c.send_custom_message(CustomMessage {
        capability: "io.example.x".into(),
        r#type: "t".into(),
        data: Bytes::from(vec![b'd'; 200]),
    })
    .unwrap();
    let mut got = (0, 0, 0);
    let mut sent = 0;
    while let Some(m) = c.poll_transmit(t0) {
        assert!(m.encoded_len() < 300, "WS-12");
        got.0 += usize::from(m.effective_config.is_some());
        got.1 += usize::from(m.package_statuses.is_some());
        got.2 += usize::from(m.custom_message.is_some());
        sent += 1;
        assert!(sent <= 3, "more messages than parts");
    }
    assert_eq!(got, (1, 1, 1), "a queued part was lost");
    assert_eq!(c.dropped_outgoing(), 0);
    assert!(events(&mut c).is_empty());
}

#[test]
fn ws_12_part_over_the_limit_alone_is_surfaced_as_report_too_large() {
    let t0 = Instant::now();
    let mut config = CoreConfig::new(uid(), all_caps(), TransportKind::Http);
    config.max_message_size = 200;
    let mut c = ClientCore::new(config, t0);
    c.set_effective_config(config_of(1000)).unwrap();
    c.set_health(health(true)).unwrap();
    let m = c.poll_transmit(t0).unwrap();
    assert!(m.effective_config.is_none());
    assert!(m.health.is_some(), "the rest of the report goes");
    let ev = events(&mut c);
    assert!(
        matches!(&ev[..], [Event::ReportTooLarge(e)] if e.part == "effective_config" && e.limit == 200),
        "{ev:?}"
    );
    assert_eq!(c.dropped_outgoing(), 1);
    // Not retried in a loop: only once it changes.
    c.handle_message(t0, ack());
    events(&mut c);
    assert_eq!(c.poll_transmit(t0), None);
}

#[test]
fn half_open_ws_server_silent_after_a_message_is_dropped_and_reconnected() {
    let t0 = Instant::now();
    let mut c = ws_up(all_caps(), t0);
    // A heartbeat at 30 s, unanswered; another at 60 s, unanswered.
    assert!(c.poll_transmit(t0 + secs(30.0)).is_some());
    c.handle_timeout(t0 + secs(30.0));
    assert!(events(&mut c).is_empty());
    assert_eq!(c.poll_timeout(), Some(t0 + secs(60.0)));
    assert!(c.poll_transmit(t0 + secs(60.0)).is_some());
    // Silent for two heartbeat intervals since the first unanswered message.
    assert_eq!(c.poll_timeout(), Some(t0 + secs(90.0)));
    c.handle_timeout(t0 + secs(89.9));
    assert!(events(&mut c).is_empty());
    c.handle_timeout(t0 + secs(90.0));
    assert_eq!(events(&mut c), vec![]);
    assert_eq!(c.poll_driver_action(), Some(DriverAction::DropConnection));
    assert!(!c.is_connected());
    let at = c.connect_at().expect("a reconnect is scheduled");
    assert!(at > t0 + secs(90.0), "with backoff");
    // The next connection starts clean and sends the full state.
    c.handle_connected(at);
    assert!(c.poll_transmit(at).unwrap().remote_config_status.is_some());

    // A server that answers is never taken for half-open.
    let mut c = ws_up(all_caps(), t0);
    for i in 1..20 {
        let now = t0 + secs(30.0 * f64::from(i));
        assert!(c.poll_transmit(now).is_some());
        c.handle_message(now + secs(1.0), ack());
        c.handle_timeout(now + secs(29.0));
        assert!(events(&mut c).is_empty());
    }
    assert!(c.is_connected());
}

#[test]
fn gen_8_ws_18_sessions_that_die_young_do_not_reset_the_backoff() {
    let t0 = Instant::now();
    let mut c = core(TransportKind::WebSocket, all_caps(), t0);
    let mut now = t0;
    let mut delays = vec![];
    for _ in 0..12 {
        c.handle_connected(now);
        c.poll_transmit(now).unwrap();
        // The server answers, then closes at once.
        c.handle_message(now, ack());
        events(&mut c);
        let d = c.handle_disconnected(now + secs(0.01));
        delays.push(d);
        now = c.connect_at().unwrap();
    }
    assert!(delays[11] > secs(20.0), "{delays:?}");
    // A session that lasted starts the backoff over.
    c.handle_connected(now);
    c.poll_transmit(now).unwrap();
    c.handle_message(now, ack());
    let d = c.handle_disconnected(now + secs(3600.0));
    assert!(d <= secs(0.75), "{d:?}");
}

#[test]
fn seq_3_report_full_state_in_every_answer_is_rate_limited() {
    let t0 = Instant::now();
    let mut c = core(TransportKind::WebSocket, all_caps(), t0);
    c.set_agent_description(description("a")).unwrap();
    c.handle_connected(t0);
    let mut full = 0;
    let mut sent = 0;
    let mut now = t0;
    // A server asking for the full state in every answer, for 20 s, 10 ms a step.
    for _ in 0..2000 {
        while let Some(m) = c.poll_transmit(now) {
            sent += 1;
            full += usize::from(m.agent_description.is_some());
            c.handle_message(
                now,
                ServerToAgent {
                    flags: ServerToAgentFlagSet::REPORT_FULL_STATE.bits(),
                    ..ack()
                },
            );
            events(&mut c);
            assert!(sent < 100, "a report loop");
        }
        now += secs(0.01);
    }
    // The first report, then one per 5 s.
    assert!((4..=6).contains(&full), "{full} full reports in 20 s");
    // A deferred request is honoured, not lost.
    assert!(c.poll_timeout().is_some());
}

#[test]
fn rc_3_config_changing_in_every_message_is_handed_over_at_most_once_per_interval() {
    let t0 = Instant::now();
    let mut c = ws_up(all_caps(), t0);
    let mut delivered = vec![];
    let mut now = t0;
    let config = |i: u32| opamp_proto::AgentRemoteConfig {
        config_hash: Bytes::from(i.to_be_bytes().to_vec()),
        ..Default::default()
    };
    for i in 0..1000 {
        c.handle_timeout(now);
        c.handle_message(
            now,
            ServerToAgent {
                remote_config: Some(config(i)),
                ..ack()
            },
        );
        for e in events(&mut c) {
            if let Event::Message(data) = e {
                delivered.extend(data.remote_config);
            }
        }
        now += secs(0.01);
    }
    // 10 s: one per second.
    assert!((9..=11).contains(&delivered.len()), "{}", delivered.len());
    // The latest is handed over when its time comes (coalesced, not lost).
    let due = c.poll_timeout().unwrap();
    c.handle_timeout(due);
    let Some(Event::Message(data)) = events(&mut c).pop() else {
        panic!("the latest config was lost")
    };
    assert_eq!(data.remote_config, Some(config(999)));
    assert_eq!(
        c.poll_timeout(),
        Some(t0 + secs(10.0) + secs(30.0) - secs(10.0))
    );
}

#[test]
fn cmd_1_command_in_every_message_is_delivered_at_most_once_per_interval() {
    let t0 = Instant::now();
    let mut c = ws_up(all_caps(), t0);
    let mut commands = 0;
    let mut now = t0;
    for _ in 0..3000 {
        c.handle_message(
            now,
            ServerToAgent {
                command: Some(ServerToAgentCommand::default()),
                ..ack()
            },
        );
        commands += events(&mut c)
            .iter()
            .filter(|e| matches!(e, Event::Command(_)))
            .count();
        now += secs(0.01);
    }
    // 30 s: one per 10 s.
    assert!((3..=4).contains(&commands), "{commands} commands in 30 s");
}

#[test]
fn memory_core_keeps_no_reference_to_a_handled_message() {
    let t0 = Instant::now();
    let mut c = ws_up(all_caps(), t0);
    let mut config = opamp_proto::AgentConfigMap::default();
    config.config_map.insert(
        String::new(),
        opamp_proto::AgentConfigObject {
            body: Bytes::from(vec![b'x'; 1 << 20]),
            content_type: String::new(),
            ..Default::default()
        },
    );
    let msg = ServerToAgent {
        remote_config: Some(opamp_proto::AgentRemoteConfig {
            config: Some(config),
            config_hash: Bytes::from_static(b"0123456789abcdef0123456789abcdef"),
        }),
        connection_settings: Some(ConnectionSettingsOffers {
            hash: Bytes::from_static(b"offer-hash"),
            opamp: Some(OpAmpConnectionSettings::default()),
            ..Default::default()
        }),
        ..ack()
    };
    let frame = opamp_proto::framing::encode(&msg);
    let decoded: ServerToAgent =
        opamp_proto::framing::decode_bytes(frame.clone(), usize::MAX).unwrap();
    c.handle_message(t0, decoded);
    for e in events(&mut c) {
        match e {
            Event::Message(data) => {
                // The embedder reports the hash it was given (RC-5), then drops the config.
                let hash = data.remote_config.unwrap().config_hash;
                c.set_remote_config_status(RemoteConfigStatus {
                    last_remote_config_hash: hash.clone(),
                    status: RemoteConfigStatuses::Applied as i32,
                    ..Default::default()
                })
                .unwrap();
            }
            Event::OpampConnectionSettings {
                settings,
                offer_hash,
            } => {
                c.reject_opamp_connection_settings(t0, &offer_hash, &settings.destination_endpoint)
            }
            _ => {}
        }
    }
    c.poll_transmit(t0).unwrap();
    let mut frame = frame;
    assert!(
        frame.is_unique(),
        "the core still holds (part of) the 1 MiB message it handled"
    );
    let _ = frame.split_off(0);
}

#[test]
fn rep_4_bytes_in_transit_are_not_taken_for_silence() {
    let t0 = Instant::now();
    let mut c = ws_up(all_caps(), t0);
    assert!(c.poll_transmit(t0 + secs(30.0)).is_some());
    // A large message is arriving: bytes, but no whole message yet.
    c.handle_activity(t0 + secs(80.0));
    c.handle_timeout(t0 + secs(90.0));
    assert!(
        events(&mut c).is_empty(),
        "a message in transit is not silence"
    );
    assert_eq!(c.poll_timeout(), Some(t0 + secs(60.0)));
    c.handle_timeout(t0 + secs(140.0));
    assert_eq!(events(&mut c), vec![]);
    assert_eq!(c.poll_driver_action(), Some(DriverAction::DropConnection));
    // Without anything outstanding, activity changes nothing.
    let mut c = ws_up(all_caps() - AgentCapabilitySet::REPORTS_HEARTBEAT, t0);
    c.handle_activity(t0);
    assert_eq!(c.poll_timeout(), None);
}

#[test]
fn gen_8_long_session_without_any_answer_does_not_reset_the_backoff() {
    let t0 = Instant::now();
    let mut c = core(TransportKind::WebSocket, all_caps(), t0);
    let mut now = t0;
    let mut delays = vec![];
    for _ in 0..12 {
        c.handle_connected(now);
        c.poll_transmit(now).unwrap();
        // Held open for a minute, never answered, then dropped.
        let d = c.handle_disconnected(now + secs(60.0));
        delays.push(d);
        now = c.connect_at().unwrap();
    }
    assert!(delays[11] > secs(20.0), "{delays:?}");
}

#[test]
fn cs_4_offers_changing_in_every_message_are_handled_at_most_once_per_interval() {
    let t0 = Instant::now();
    let mut c = ws_up(all_caps(), t0);
    let offer_events = |c: &mut ClientCore| -> Vec<Bytes> {
        events(c)
            .into_iter()
            .filter_map(|e| match e {
                Event::OpampConnectionSettings { offer_hash, .. } => Some(offer_hash),
                _ => None,
            })
            .collect()
    };
    c.handle_message(t0, moving_offer(b"o1", "ws://dead-1/"));
    assert_eq!(offer_events(&mut c), [Bytes::from_static(b"o1")]);
    c.reject_opamp_connection_settings(t0, b"o1", "no");
    // A hostile server offers a new endpoint in every answer.
    c.handle_message(t0 + secs(1.0), moving_offer(b"o2", "ws://dead-2/"));
    c.handle_message(t0 + secs(2.0), moving_offer(b"o3", "ws://dead-3/"));
    assert!(
        offer_events(&mut c).is_empty(),
        "handled within the interval"
    );
    // The latest is handled at the end of the default 5 s.
    assert_eq!(c.poll_timeout(), Some(t0 + secs(5.0)));
    c.handle_timeout(t0 + secs(4.9));
    assert!(offer_events(&mut c).is_empty());
    c.handle_timeout(t0 + secs(5.0));
    assert_eq!(offer_events(&mut c), [Bytes::from_static(b"o3")]);
    // A repeat of the handled offer is not deferred either: nothing is due.
    c.reject_opamp_connection_settings(t0 + secs(5.0), b"o3", "no");
    c.handle_message(t0 + secs(6.0), moving_offer(b"o3", "ws://dead-3/"));
    c.handle_timeout(t0 + secs(20.0));
    assert!(offer_events(&mut c).is_empty());
}

#[test]
fn cs_4_an_offer_deferred_during_a_trial_waits_for_its_end_without_busy_waking() {
    let t0 = Instant::now();
    let mut c = ws_up(all_caps(), t0);
    start_trial(&mut c, b"t", t0);
    c.handle_connected(t0);
    c.poll_transmit(t0).unwrap();
    // While tried, only the trial's deadline wakes the driver.
    assert_eq!(c.poll_timeout(), Some(t0 + secs(30.0)));
}

#[test]
fn csr_2_a_request_goes_only_to_a_server_that_advertised_it() {
    let t0 = Instant::now();
    let req = || ConnectionSettingsRequest {
        opamp: Some(opamp_proto::OpAmpConnectionSettingsRequest {
            certificate_request: Some(opamp_proto::CertificateRequest {
                csr: Bytes::from_static(b"CSR"),
            }),
        }),
    };
    // Unknown capabilities: held, not in the first message.
    let mut c = core(TransportKind::WebSocket, all_caps(), t0);
    c.request_connection_settings(req()).unwrap();
    c.handle_connected(t0);
    assert!(
        c.poll_transmit(t0)
            .unwrap()
            .connection_settings_request
            .is_none()
    );
    // The server announces it: sent at once, once.
    c.handle_message(t0, ack());
    let m = c.poll_transmit(t0).unwrap();
    assert_eq!(m.connection_settings_request, Some(req()));
    assert_eq!(c.poll_transmit(t0), None);

    // A server that announces capabilities without it: dropped.
    let mut c = core(TransportKind::WebSocket, all_caps(), t0);
    c.request_connection_settings(req()).unwrap();
    c.handle_connected(t0);
    c.poll_transmit(t0).unwrap();
    c.handle_message(t0, no_server_caps_but_status());
    c.handle_message(t0, ack());
    assert_eq!(
        c.poll_transmit(t0),
        None,
        "sent to a server that did not advertise it"
    );
}

#[test]
fn csr_8_csr_9_renewal_comes_once_at_its_time_or_at_once_after_a_new_uid() {
    let t0 = Instant::now();
    let mut c = ws_up(all_caps(), t0);
    let renewals = |c: &mut ClientCore| {
        events(c)
            .iter()
            .filter(|e| matches!(e, Event::RenewClientCertificate))
            .count()
    };
    // A 90-day certificate renewed at two thirds: 60 days in.
    let at = t0 + secs(60.0 * 86400.0);
    c.schedule_certificate_renewal(at);
    assert_eq!(
        c.poll_timeout(),
        Some(t0 + secs(30.0)),
        "heartbeats still first"
    );
    c.handle_timeout(at - secs(1.0));
    assert_eq!(renewals(&mut c), 0);
    c.handle_timeout(at);
    assert_eq!(renewals(&mut c), 1);
    c.handle_timeout(at + secs(3600.0));
    assert_eq!(renewals(&mut c), 0, "once");

    // CSR-9: the server assigns a new uid: the certificate names the old one.
    c.schedule_certificate_renewal(at + secs(86400.0));
    c.handle_message(
        t0,
        ServerToAgent {
            agent_identification: Some(AgentIdentification {
                new_instance_uid: InstanceUid::from_array([9; 16]).to_bytes(),
            }),
            ..ack()
        },
    );
    assert_eq!(renewals(&mut c), 1);
    c.handle_timeout(at + secs(2.0 * 86400.0));
    assert_eq!(renewals(&mut c), 0, "the schedule went with the old uid");
    // Without a CSR certificate a new uid asks for nothing.
    c.handle_message(
        t0,
        ServerToAgent {
            instance_uid: InstanceUid::from_array([9; 16]).to_bytes(),
            agent_identification: Some(AgentIdentification {
                new_instance_uid: InstanceUid::from_array([10; 16]).to_bytes(),
            }),
            ..ack()
        },
    );
    assert_eq!(renewals(&mut c), 0);
}
