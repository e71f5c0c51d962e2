//! Random operation sequences against the client's sans-IO core (both transports), with
//! random server messages. Never a panic, and every outgoing message keeps the spec's
//! invariants:
//! - UID-1: a 16-byte instance uid;
//! - SEQ-1: sequence numbers go up by one from message to message (a retry may repeat one);
//! - CAP-1, CAP-5: no capability bit the spec does not define;
//! - WS-12: no message over the size limit.
#![no_main]

use std::time::{Duration, Instant};

use libfuzzer_sys::fuzz_target;
use opamp_client::core::{ClientCore, CoreConfig, DriverAction, Event, Failure, TransportKind};
use opamp_fuzz::Input;
use opamp_proto::{
    AgentCapabilitySet, AgentToServer, ComponentHealth, InstanceUid, Message, RemoteConfigStatus,
    ServerToAgent,
};

const LIMIT: usize = 1 << 16;

fuzz_target!(|data: &[u8]| {
    let mut input = Input::new(data);
    let transport = if input.byte() & 1 == 1 {
        TransportKind::Http
    } else {
        TransportKind::WebSocket
    };
    let caps = AgentCapabilitySet::from_bits_retain(u64::from(input.u16()) | 1);
    let mut config = CoreConfig::new(InstanceUid::from([7; 16]), caps, transport);
    config.max_message_size = LIMIT;
    config.jitter_seed = Some(1);
    let mut now = Instant::now();
    let mut core = ClientCore::new(config, now);
    let mut last_seq: Option<u64> = None;
    while !input.is_empty() {
        match input.byte() % 10 {
            0 => core.handle_connected(now),
            1 | 2 => {
                if let Ok(msg) = ServerToAgent::decode(input.chunk()) {
                    core.handle_message(now, msg);
                }
            }
            3 => core.handle_timeout(now),
            4 => {
                let _ = core.handle_disconnected(now);
            }
            5 => {
                let _ = core.handle_connect_failure(now, Failure::Transport);
            }
            6 => {
                let _ = core.set_health(ComponentHealth {
                    healthy: input.byte() & 1 == 1,
                    status: String::from_utf8_lossy(input.chunk()).into_owned(),
                    ..Default::default()
                });
                let _ = core.set_remote_config_status(RemoteConfigStatus {
                    last_remote_config_hash: input.chunk().to_vec().into(),
                    ..Default::default()
                });
            }
            7 => {
                // The embedder's decisions on connection settings offers (CS-4), and the
                // driver's goodbye before it tries accepted ones (CS-OP-3).
                while let Some(event) = core.poll_event() {
                    let yes = input.byte() & 1 == 1;
                    match event {
                        Event::OpampConnectionSettings {
                            settings,
                            offer_hash,
                        } if yes => {
                            core.accept_opamp_connection_settings(now, &offer_hash, &settings)
                        }
                        Event::OpampConnectionSettings { offer_hash, .. } => {
                            core.reject_opamp_connection_settings(now, &offer_hash, "no")
                        }
                        Event::TelemetryConnectionSettings { offer_hash, .. } if yes => {
                            core.accept_telemetry_connection_settings(now, &offer_hash)
                        }
                        Event::TelemetryConnectionSettings { offer_hash, .. } => {
                            core.reject_telemetry_connection_settings(now, &offer_hash, "no")
                        }
                        _ => {}
                    }
                }
                if let Some(DriverAction::SwitchConnection | DriverAction::Reconnect) =
                    core.poll_driver_action()
                {
                    let bye = core.disconnect_message(now);
                    check(&bye, &mut last_seq);
                }
            }
            8 => core.handle_activity(now),
            _ => now += Duration::from_millis(u64::from(input.u16()) * 50),
        }
        while let Some(msg) = core.poll_transmit(now) {
            check(&msg, &mut last_seq);
            // The answer the transport would get: over HTTP one request is in flight until
            // then; an empty acknowledgement keeps the exchange going.
            if input.byte() & 1 == 1 {
                core.handle_message(now, ServerToAgent::default());
            }
            if input.is_empty() {
                break;
            }
        }
    }
});

/// The invariants of every outgoing message.
fn check(msg: &AgentToServer, last_seq: &mut Option<u64>) {
    assert_eq!(msg.instance_uid.len(), 16, "UID-1");
    if let Some(prev) = *last_seq {
        assert!(
            msg.sequence_num == prev || msg.sequence_num == prev.wrapping_add(1),
            "SEQ-1: {prev} then {}",
            msg.sequence_num
        );
    }
    *last_seq = Some(msg.sequence_num);
    assert_eq!(
        msg.capabilities & !AgentCapabilitySet::all().bits(),
        0,
        "CAP-1, CAP-5"
    );
    assert!(1 + msg.encoded_len() <= LIMIT, "WS-12");
}
