//! Encode and decode of typical OpAMP messages, and WebSocket framing.
//!
//! Run: `cargo bench --bench codec`. Figures and the machine are in BENCHMARKS.md.

// Each bench uses part of the shared fixtures.
#[allow(dead_code)]
mod common;

use std::hint::black_box;

use bytes::Bytes;
use common::{full_status, heartbeat, remote_config};
use criterion::{Criterion, Throughput, criterion_group, criterion_main};
use opamp::proto::{AgentToServer, InstanceUid, Message, framing};

fn bench_message<M: Message + Default>(c: &mut Criterion, name: &str, msg: &M) {
    let encoded = Bytes::from(msg.encode_to_vec());
    let mut group = c.benchmark_group(name);
    group.throughput(Throughput::Bytes(encoded.len() as u64));
    group.bench_function("encode", |b| {
        let mut buf = Vec::with_capacity(encoded.len());
        b.iter(|| {
            buf.clear();
            black_box(msg).encode(&mut buf).expect("buffer has room");
            black_box(&buf);
        })
    });
    group.bench_function("decode", |b| {
        b.iter(|| M::decode(black_box(encoded.clone())).expect("valid"))
    });
    group.finish();
}

fn codec(c: &mut Criterion) {
    bench_message(c, "heartbeat", &heartbeat(InstanceUid::new_v7()));
    bench_message(c, "full_status_10k", &full_status(InstanceUid::new_v7()));
    bench_message(c, "remote_config_4k", &remote_config(4 * 1024, "a"));
    bench_message(c, "remote_config_64k", &remote_config(64 * 1024, "a"));
}

fn framing(c: &mut Criterion) {
    let msg = full_status(InstanceUid::new_v7());
    let frame = framing::encode(&msg);
    let mut group = c.benchmark_group("ws_framing_full_status");
    group.throughput(Throughput::Bytes(frame.len() as u64));
    group.bench_function("frame", |b| b.iter(|| framing::encode(black_box(&msg))));
    group.bench_function("unframe_decode", |b| {
        b.iter(|| {
            framing::decode_bytes::<AgentToServer>(
                black_box(frame.clone()),
                framing::DEFAULT_MAX_MESSAGE_SIZE,
            )
            .expect("valid")
        })
    });
    group.finish();
}

criterion_group!(benches, codec, framing);
criterion_main!(benches);
