//! One step of the server's protocol core, `AgentSession`, without I/O: handling one
//! `AgentToServer` and preparing the reply, for a heartbeat and for a full status report;
//! the same with the WebSocket decode and encode around it (all the CPU the server spends on
//! a message apart from the socket, the callback and the runtime); and the per-agent cost of
//! a fleet-wide push of a 4 KiB config whose body is shared, not copied, between agents.
//!
//! Run: `cargo bench --bench server_core`. Figures and the machine are in BENCHMARKS.md.

// Each bench uses part of the shared fixtures.
#[allow(dead_code)]
mod common;

use std::hint::black_box;
use std::time::Instant;

use bytes::Bytes;
use common::{config_map, full_status, heartbeat};
use criterion::{Criterion, criterion_group, criterion_main};
use opamp::proto::{
    AgentRemoteConfig, AgentToServer, InstanceUid, ServerCapabilitySet, ServerToAgent, framing,
};
use opamp::server::{AgentSession, DEFAULT_SERVER_CAPABILITIES, SessionConfig, Transmit};

fn session() -> AgentSession {
    AgentSession::new(SessionConfig::websocket(
        DEFAULT_SERVER_CAPABILITIES | ServerCapabilitySet::ACCEPTS_STATUS,
    ))
}

/// A session that has seen the agent's first report, as on a live connection.
fn established(uid: InstanceUid) -> AgentSession {
    let mut s = session();
    let now = Instant::now();
    s.handle_message(now, &full_status(uid))
        .expect("valid first message");
    s.respond(None);
    while s.poll_transmit(now).is_some() {}
    s
}

fn bench_step(c: &mut Criterion, name: &str, msg: AgentToServer) {
    let uid = InstanceUid::try_from(&msg.instance_uid[..]).expect("16 bytes");
    let mut group = c.benchmark_group(format!("server_core/{name}"));

    // The core alone: sequence check, capabilities, offer hashes; then the reply.
    group.bench_function("handle+reply", |b| {
        let mut s = established(uid);
        let mut msg = msg.clone();
        let mut seq = 1u64;
        let now = Instant::now();
        b.iter(|| {
            seq += 1;
            msg.sequence_num = seq;
            let received = s.handle_message(now, black_box(&msg)).expect("valid");
            black_box(received);
            black_box(s.prepare_reply(now, None))
        })
    });

    // The same through the handle/poll contract the drivers use.
    group.bench_function("handle+respond+poll_transmit", |b| {
        let mut s = established(uid);
        let mut msg = msg.clone();
        let mut seq = 1u64;
        let now = Instant::now();
        b.iter(|| {
            seq += 1;
            msg.sequence_num = seq;
            let received = s.handle_message(now, black_box(&msg)).expect("valid");
            black_box(received);
            s.respond(None);
            black_box(s.poll_transmit(now).expect("the reply"))
        })
    });

    // What the WebSocket driver does per message apart from I/O and the callback:
    // unframe + decode (sharing the frame's bytes), the core, encode + frame the reply.
    let frame = framing::encode(&msg);
    group.bench_function("decode+handle+reply+encode", |b| {
        let mut s = established(uid);
        let mut seq = 1u64;
        let now = Instant::now();
        b.iter(|| {
            let mut msg: AgentToServer =
                framing::decode_bytes(black_box(frame.clone()), framing::DEFAULT_MAX_MESSAGE_SIZE)
                    .expect("valid");
            seq += 1;
            msg.sequence_num = seq;
            s.handle_message(now, &msg).expect("valid");
            s.respond(None);
            let frame = s.poll_transmit_with(now, |t| match t {
                Transmit::Message(m) => framing::encode(m),
                _ => unreachable!("a reply is one message"),
            });
            black_box(frame.expect("the reply"))
        })
    });
    group.finish();
}

/// The per-agent work of a fleet-wide config push: the `ServerToAgent` holds a clone of one
/// `AgentRemoteConfig` (the body is a shared `Bytes`, not copied), the session gates it and
/// fills in the agent's uid, and the driver frames it for that agent. Two configs alternate
/// so that neither is stripped as already sent (RC-4).
fn bench_push(c: &mut Criterion) {
    let uid = InstanceUid::new_v7();
    let configs: Vec<AgentRemoteConfig> = ["a", "b"]
        .iter()
        .enumerate()
        .map(|(i, salt)| AgentRemoteConfig {
            config: Some(config_map(4 * 1024, salt)),
            config_hash: Bytes::from(vec![i as u8 + 1; 32]),
        })
        .collect();
    let mut group = c.benchmark_group("server_core/push_4k_config");
    group.bench_function("prepare_push", |b| {
        let mut s = established(uid);
        let now = Instant::now();
        let mut i = 0;
        b.iter(|| {
            i ^= 1;
            let push = ServerToAgent {
                remote_config: Some(configs[i].clone()),
                ..Default::default()
            };
            black_box(s.prepare_push(now, push).expect("not redundant"))
        })
    });
    // The old driver's path for comparison with the next one: the push arrives boxed (the
    // WebSocket queue's item), is moved out and prepared.
    group.bench_function("box+prepare_push", |b| {
        let mut s = established(uid);
        let now = Instant::now();
        let mut i = 0;
        b.iter(|| {
            i ^= 1;
            let push = Box::new(ServerToAgent {
                remote_config: Some(configs[i].clone()),
                ..Default::default()
            });
            black_box(
                s.prepare_push(now, *black_box(push))
                    .expect("not redundant"),
            )
        })
    });
    // The driver's path now: the boxed push is queued as it is and polled out.
    group.bench_function("queue+poll_transmit", |b| {
        let mut s = established(uid);
        let now = Instant::now();
        let mut i = 0;
        b.iter(|| {
            i ^= 1;
            s.queue(ServerToAgent {
                remote_config: Some(configs[i].clone()),
                ..Default::default()
            });
            black_box(s.poll_transmit(now).expect("not redundant"))
        })
    });
    group.bench_function("prepare_push+encode", |b| {
        let mut s = established(uid);
        let now = Instant::now();
        let mut i = 0;
        b.iter(|| {
            i ^= 1;
            let push = ServerToAgent {
                remote_config: Some(configs[i].clone()),
                ..Default::default()
            };
            let out = s.prepare_push(now, push).expect("not redundant");
            black_box(framing::encode(&out))
        })
    });
    group.finish();
}

fn core(c: &mut Criterion) {
    bench_step(c, "heartbeat", heartbeat(InstanceUid::new_v7()));
    bench_step(c, "full_status_10k", full_status(InstanceUid::new_v7()));
    bench_push(c);
}

criterion_group!(benches, core);
criterion_main!(benches);
