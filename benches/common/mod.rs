//! The typical messages the benchmarks measure, shared by every bench.

use bytes::Bytes;
use opamp::proto::{
    AgentCapabilitySet, AgentConfigMap, AgentDescription, AgentRemoteConfig, AgentToServer,
    ComponentHealth, EffectiveConfig, InstanceUid, KeyValue, RemoteConfigStatus, ServerToAgent,
};

/// A config body of `size` bytes; `salt` makes bodies of the same size differ.
pub(crate) fn config_map(size: usize, salt: &str) -> AgentConfigMap {
    let line = "exporters: { otlphttp: { endpoint: https://collector.example:4318 } }\n";
    let mut body = format!("# {salt}\n");
    while body.len() < size {
        body.push_str(line);
    }
    body.truncate(size);
    AgentConfigMap::single(body, "text/yaml")
}

/// The capabilities of a typical collector-like agent.
pub(crate) fn capabilities() -> u64 {
    (AgentCapabilitySet::REPORTS_STATUS
        | AgentCapabilitySet::ACCEPTS_REMOTE_CONFIG
        | AgentCapabilitySet::REPORTS_REMOTE_CONFIG
        | AgentCapabilitySet::REPORTS_EFFECTIVE_CONFIG
        | AgentCapabilitySet::REPORTS_HEALTH
        | AgentCapabilitySet::REPORTS_HEARTBEAT)
        .bits()
}

/// A heartbeat: instance uid, sequence number and capabilities (HB-4).
pub(crate) fn heartbeat(uid: InstanceUid) -> AgentToServer {
    AgentToServer {
        instance_uid: uid.to_bytes(),
        sequence_num: 1,
        capabilities: capabilities(),
        ..Default::default()
    }
}

/// A full status: 20-attribute description, health with 3 components, 10 KiB effective
/// config, remote config status.
pub(crate) fn full_status(uid: InstanceUid) -> AgentToServer {
    let mut ident = vec![
        KeyValue::new("service.name", "io.opentelemetry.collector"),
        KeyValue::new("service.version", "0.115.0"),
        KeyValue::new("service.instance.id", uid.to_string()),
    ];
    ident.extend(
        (0..7).map(|i| KeyValue::new(format!("deployment.label.{i}"), "production-eu-west-1")),
    );
    let non_ident = (0..10)
        .map(|i| KeyValue::new(format!("host.attr.{i}"), "ip-10-0-0-1.internal"))
        .collect();
    let component = || ComponentHealth {
        healthy: true,
        status: "StatusOK".into(),
        ..Default::default()
    };
    let mut health = component();
    for name in ["receiver/otlp", "processor/batch", "exporter/otlphttp"] {
        health.component_health_map.insert(name.into(), component());
    }
    AgentToServer {
        agent_description: Some(AgentDescription {
            identifying_attributes: ident,
            non_identifying_attributes: non_ident,
        }),
        health: Some(health),
        effective_config: Some(EffectiveConfig {
            config_map: Some(config_map(10 * 1024, "effective")),
        }),
        remote_config_status: Some(RemoteConfigStatus {
            last_remote_config_hash: Bytes::from_static(&[7; 32]),
            status: 1,
            error_message: String::new(),
        }),
        ..heartbeat(uid)
    }
}

/// A remote config offer of `size` bytes.
pub(crate) fn remote_config(size: usize, salt: &str) -> ServerToAgent {
    ServerToAgent {
        instance_uid: InstanceUid::new_v7().to_bytes(),
        remote_config: Some(AgentRemoteConfig {
            config: Some(config_map(size, salt)),
            config_hash: Bytes::from_static(&[9; 32]),
        }),
        ..Default::default()
    }
}
