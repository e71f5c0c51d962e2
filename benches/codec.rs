//! Encode and decode of typical OpAMP messages, and WebSocket framing.
//!
//! Run: `cargo bench --bench codec`. Figures and the machine are in BENCHMARKS.md.

use std::hint::black_box;

use bytes::Bytes;
use criterion::{Criterion, Throughput, criterion_group, criterion_main};
use opamp::proto::{
    AgentCapabilitySet, AgentConfigMap, AgentConfigObject, AgentDescription, AgentRemoteConfig,
    AgentToServer, ComponentHealth, EffectiveConfig, InstanceUid, KeyValue, Message,
    RemoteConfigStatus, ServerToAgent, framing,
};

fn config_map(size: usize) -> AgentConfigMap {
    let line = "receivers: { otlp: { protocols: { grpc: {}, http: {} } } }\n";
    let body = line.repeat(size / line.len() + 1)[..size].to_owned();
    let mut map = AgentConfigMap::default();
    map.config_map.insert(
        String::new(),
        AgentConfigObject {
            body: Bytes::from(body),
            content_type: "text/yaml".into(),
        },
    );
    map
}

/// A heartbeat: instance uid, sequence number and capabilities only (HB-4).
fn heartbeat() -> AgentToServer {
    AgentToServer {
        instance_uid: InstanceUid::new_v7().to_bytes(),
        sequence_num: 12345,
        capabilities: AgentCapabilitySet::all().bits(),
        ..Default::default()
    }
}

/// A full status: 20-attribute description, health with components, 10 KiB effective config.
fn full_status() -> AgentToServer {
    let mut ident = vec![
        KeyValue::new("service.name", "io.opentelemetry.collector"),
        KeyValue::new("service.version", "0.115.0"),
        KeyValue::new(
            "service.instance.id",
            "5d1c3a9e-1c55-4a3e-8f0e-2b1b1a2c3d4e",
        ),
    ];
    ident.extend(
        (0..7).map(|i| KeyValue::new(format!("deployment.label.{i}"), "production-eu-west-1")),
    );
    let non_ident = (0..10)
        .map(|i| KeyValue::new(format!("host.attr.{i}"), "ip-10-0-0-1.internal"))
        .collect();
    let mut health = ComponentHealth {
        healthy: true,
        status: "StatusOK".into(),
        ..Default::default()
    };
    for name in ["receiver/otlp", "processor/batch", "exporter/otlphttp"] {
        health.component_health_map.insert(
            name.into(),
            ComponentHealth {
                healthy: true,
                status: "StatusOK".into(),
                ..Default::default()
            },
        );
    }
    AgentToServer {
        agent_description: Some(AgentDescription {
            identifying_attributes: ident,
            non_identifying_attributes: non_ident,
        }),
        health: Some(health),
        effective_config: Some(EffectiveConfig {
            config_map: Some(config_map(10 * 1024)),
        }),
        remote_config_status: Some(RemoteConfigStatus {
            last_remote_config_hash: Bytes::from_static(&[7; 32]),
            status: 1,
            error_message: String::new(),
        }),
        ..heartbeat()
    }
}

fn remote_config(size: usize) -> ServerToAgent {
    ServerToAgent {
        instance_uid: InstanceUid::new_v7().to_bytes(),
        remote_config: Some(AgentRemoteConfig {
            config: Some(config_map(size)),
            config_hash: Bytes::from_static(&[9; 32]),
        }),
        ..Default::default()
    }
}

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
    bench_message(c, "heartbeat", &heartbeat());
    bench_message(c, "full_status_10k", &full_status());
    bench_message(c, "remote_config_4k", &remote_config(4 * 1024));
    bench_message(c, "remote_config_64k", &remote_config(64 * 1024));
}

fn framing(c: &mut Criterion) {
    let msg = full_status();
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
