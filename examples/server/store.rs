//! The reference server's in-memory fleet state: what each agent reported, the config the
//! server offers it, and its JSON form for the API. State lives in memory only: a restart of
//! the server forgets the fleet, and agents re-report in full when asked (SEQ-2).

use std::collections::BTreeMap;
use std::sync::{Mutex, MutexGuard};
use std::time::{SystemTime, UNIX_EPOCH};

use bytes::Bytes;
use opamp::proto::{
    AgentCapabilitySet, AgentConfigMap, AgentDescription, AgentRemoteConfig, AgentToServer,
    AnyValue, ComponentHealth, InstanceUid, KeyValue, Message, RemoteConfigStatus,
    RemoteConfigStatuses, ServerToAgent, any_value,
};
use serde_json::{Map, Value, json};
use sha2::{Digest, Sha256};

/// One agent as the server knows it.
#[derive(Debug, Default)]
pub(crate) struct AgentRecord {
    pub(crate) connected: bool,
    pub(crate) transport: Option<&'static str>,
    pub(crate) remote_addr: Option<String>,
    pub(crate) last_seen: Option<SystemTime>,
    pub(crate) sequence_num: u64,
    pub(crate) capabilities: u64,
    pub(crate) description: Option<AgentDescription>,
    pub(crate) health: Option<ComponentHealth>,
    pub(crate) effective_config: Option<AgentConfigMap>,
    pub(crate) remote_config_status: Option<RemoteConfigStatus>,
    /// The config the server wants this agent to run.
    pub(crate) offered: Option<AgentRemoteConfig>,
}

impl AgentRecord {
    fn accepts_remote_config(&self) -> bool {
        AgentCapabilitySet::from_bits_retain(self.capabilities)
            .contains(AgentCapabilitySet::ACCEPTS_REMOTE_CONFIG)
    }

    /// The remote config to send when the agent does not report the offered hash (RC-6).
    fn pending_config(&self) -> Option<AgentRemoteConfig> {
        let offered = self.offered.as_ref()?;
        let reported = self
            .remote_config_status
            .as_ref()
            .map(|s| &s.last_remote_config_hash);
        (self.accepts_remote_config() && reported != Some(&offered.config_hash))
            .then(|| offered.clone())
    }

    /// Whether `value` equals the attribute `key` of this agent's description.
    fn matches(&self, key: &str, value: &str) -> bool {
        let Some(d) = &self.description else {
            return false;
        };
        d.identifying_attributes
            .iter()
            .chain(&d.non_identifying_attributes)
            .any(|kv| {
                kv.key == key && kv.value.as_ref().map(any_to_string).as_deref() == Some(value)
            })
    }
}

/// Locks `m`. A panic while holding the lock leaves plain data behind; keep serving it.
pub(crate) fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|e| e.into_inner())
}

/// At most this many agents are remembered; past it, the disconnected agent seen longest ago
/// is forgotten to make room (connected agents are bounded by the server's own limits).
const MAX_AGENTS: usize = 100_000;

/// The fleet: every agent seen since the server started (up to [`MAX_AGENTS`]), by uid.
#[derive(Debug, Default)]
pub(crate) struct Fleet {
    agents: Mutex<BTreeMap<InstanceUid, AgentRecord>>,
}

impl Fleet {
    fn lock(&self) -> MutexGuard<'_, BTreeMap<InstanceUid, AgentRecord>> {
        lock(&self.agents)
    }

    /// The record of `uid`, made room for if it is new.
    fn record(
        agents: &mut BTreeMap<InstanceUid, AgentRecord>,
        uid: InstanceUid,
    ) -> &mut AgentRecord {
        if !agents.contains_key(&uid) && agents.len() >= MAX_AGENTS {
            let oldest = agents
                .iter()
                .filter(|(_, a)| !a.connected)
                .min_by_key(|(_, a)| a.last_seen)
                .map(|(uid, _)| *uid);
            if let Some(oldest) = oldest {
                agents.remove(&oldest);
            }
        }
        agents.entry(uid).or_default()
    }

    /// Marks an agent connected over `transport` from `remote_addr`.
    pub(crate) fn connected(
        &self,
        uid: InstanceUid,
        transport: &'static str,
        remote_addr: Option<String>,
    ) {
        let mut agents = self.lock();
        let agent = Self::record(&mut agents, uid);
        agent.connected = true;
        agent.transport = Some(transport);
        agent.remote_addr = remote_addr;
        agent.last_seen = Some(SystemTime::now());
    }

    /// Marks an agent disconnected.
    pub(crate) fn disconnected(&self, uid: InstanceUid) {
        if let Some(agent) = self.lock().get_mut(&uid) {
            agent.connected = false;
            agent.last_seen = Some(SystemTime::now());
        }
    }

    /// Merges a status report into the agent's record (an absent sub-message means
    /// "unchanged", CMP-4) and returns the reply the server has for it: the offered remote
    /// config when the agent does not report its hash yet (RC-6).
    pub(crate) fn report(&self, uid: InstanceUid, msg: &AgentToServer) -> Option<ServerToAgent> {
        let mut agents = self.lock();
        let agent = Self::record(&mut agents, uid);
        agent.connected = msg.agent_disconnect.is_none();
        agent.last_seen = Some(SystemTime::now());
        agent.sequence_num = msg.sequence_num;
        if msg.capabilities != 0 {
            agent.capabilities = msg.capabilities;
        }
        if let Some(d) = &msg.agent_description {
            agent.description = Some(d.clone());
        }
        if let Some(h) = &msg.health {
            agent.health = Some(h.clone());
        }
        if let Some(e) = &msg.effective_config {
            agent.effective_config = e.config_map.clone();
        }
        if let Some(s) = &msg.remote_config_status {
            agent.remote_config_status = Some(s.clone());
        }
        let remote_config = agent.pending_config()?;
        Some(ServerToAgent {
            remote_config: Some(remote_config),
            ..Default::default()
        })
    }

    /// Whether the agent declared AcceptsRestartCommand (CMD-2).
    pub(crate) fn accepts_restart(&self, uid: InstanceUid) -> bool {
        self.lock().get(&uid).is_some_and(|a| {
            AgentCapabilitySet::from_bits_retain(a.capabilities)
                .contains(AgentCapabilitySet::ACCEPTS_RESTART_COMMAND)
        })
    }

    /// Sets the config offered to one agent; returns its hash, or `None` for an unknown agent.
    pub(crate) fn offer_to(&self, uid: InstanceUid, config: &AgentRemoteConfig) -> Option<()> {
        let mut agents = self.lock();
        agents.get_mut(&uid)?.offered = Some(config.clone());
        Some(())
    }

    /// Sets the config offered to every agent whose attribute `key` equals `value` (every agent
    /// when `selector` is `None`); returns the uids of the agents targeted.
    pub(crate) fn offer_matching(
        &self,
        selector: Option<(&str, &str)>,
        config: &AgentRemoteConfig,
    ) -> Vec<InstanceUid> {
        let mut agents = self.lock();
        let mut targeted = Vec::new();
        for (uid, agent) in agents.iter_mut() {
            if selector.is_none_or(|(k, v)| agent.matches(k, v)) {
                agent.offered = Some(config.clone());
                targeted.push(*uid);
            }
        }
        targeted
    }

    /// The JSON form of every agent.
    pub(crate) fn list_json(&self) -> Value {
        Value::Array(
            self.lock()
                .iter()
                .map(|(uid, a)| agent_json(uid, a))
                .collect(),
        )
    }

    /// The JSON form of one agent.
    pub(crate) fn agent_json(&self, uid: InstanceUid) -> Option<Value> {
        self.lock().get(&uid).map(|a| agent_json(&uid, a))
    }
}

/// A remote config of one object under the key `""` (RC-9: single-file agents use one entry),
/// with its hash: SHA-256 of the deterministic encoding of the config map (RC-4).
pub(crate) fn remote_config(body: Bytes, content_type: String) -> AgentRemoteConfig {
    let map = AgentConfigMap::single(body, content_type);
    let hash = Sha256::digest(map.encode_to_vec());
    AgentRemoteConfig {
        config: Some(map),
        config_hash: Bytes::copy_from_slice(&hash),
    }
}

pub(crate) fn hex(bytes: &[u8]) -> String {
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}

fn any_to_string(v: &AnyValue) -> String {
    v.as_str()
        .map_or_else(|| any_to_json(v).to_string(), str::to_owned)
}

fn any_to_json(v: &AnyValue) -> Value {
    use any_value::Value as V;
    match &v.value {
        None => Value::Null,
        Some(V::StringValue(s)) => json!(s),
        Some(V::BoolValue(b)) => json!(b),
        Some(V::IntValue(i)) => json!(i),
        Some(V::DoubleValue(d)) => json!(d),
        Some(V::BytesValue(b)) => json!(hex(b)),
        Some(V::ArrayValue(a)) => Value::Array(a.values.iter().map(any_to_json).collect()),
        Some(V::KvlistValue(kv)) => attrs_json(&kv.values),
    }
}

fn attrs_json(kvs: &[KeyValue]) -> Value {
    let mut m = Map::new();
    for kv in kvs {
        m.insert(
            kv.key.clone(),
            kv.value.as_ref().map(any_to_json).unwrap_or(Value::Null),
        );
    }
    Value::Object(m)
}

fn health_json(h: &ComponentHealth) -> Value {
    json!({
        "healthy": h.healthy,
        "status": h.status,
        "last_error": h.last_error,
        "start_time_unix_nano": h.start_time_unix_nano,
        "status_time_unix_nano": h.status_time_unix_nano,
        "components": h.component_health_map.iter()
            .map(|(k, v)| (k.clone(), health_json(v))).collect::<Map<_, _>>(),
    })
}

fn config_map_json(map: &AgentConfigMap) -> Value {
    map.config_map
        .iter()
        .map(|(name, obj)| {
            let body = String::from_utf8_lossy(&obj.body).into_owned();
            (
                name.clone(),
                json!({ "content_type": obj.content_type, "role": obj.role, "body": body }),
            )
        })
        .collect::<Map<_, _>>()
        .into()
}

fn status_name(status: i32) -> &'static str {
    match RemoteConfigStatuses::try_from(status) {
        Ok(RemoteConfigStatuses::Applied) => "APPLIED",
        Ok(RemoteConfigStatuses::Applying) => "APPLYING",
        Ok(RemoteConfigStatuses::Failed) => "FAILED",
        _ => "UNSET",
    }
}

fn agent_json(uid: &InstanceUid, a: &AgentRecord) -> Value {
    let (ident, non_ident) = a.description.as_ref().map_or((json!({}), json!({})), |d| {
        (
            attrs_json(&d.identifying_attributes),
            attrs_json(&d.non_identifying_attributes),
        )
    });
    let attr = |key: &str| {
        ident
            .get(key)
            .or_else(|| non_ident.get(key))
            .and_then(Value::as_str)
            .map(str::to_owned)
    };
    let caps = AgentCapabilitySet::from_bits_retain(a.capabilities);
    json!({
        "instance_uid": uid.to_string(),
        "connected": a.connected,
        "transport": a.transport,
        "remote_addr": a.remote_addr,
        "last_seen_unix_ms": a.last_seen
            .and_then(|t| t.duration_since(UNIX_EPOCH).ok())
            .map(|d| d.as_millis() as u64),
        "sequence_num": a.sequence_num,
        "capabilities": caps.iter_names().map(|(n, _)| n).collect::<Vec<_>>(),
        "service_name": attr("service.name"),
        "service_version": attr("service.version"),
        "host": attr("host.name"),
        "identifying_attributes": ident,
        "non_identifying_attributes": non_ident,
        "health": a.health.as_ref().map(health_json),
        "remote_config_status": a.remote_config_status.as_ref().map(|s| json!({
            "status": status_name(s.status),
            "hash": hex(&s.last_remote_config_hash),
            "error_message": s.error_message,
        })),
        "effective_config": a.effective_config.as_ref().map(config_map_json),
        "remote_config": a.offered.as_ref().map(|c| json!({
            "hash": hex(&c.config_hash),
            "config": c.config.as_ref().map(config_map_json),
        })),
    })
}
