//! The reference server's in-memory fleet state: what each agent connected to this node
//! reported, the config the server offers it, its drift baseline, and its JSON form for the
//! API. The durable copy is in the database (`crate::db`): [`Fleet::take_dirty`] gives the
//! records that changed since the last write, as rows, and [`Fleet::restore`] reads one back
//! when its agent reconnects.

use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use bytes::Bytes;
use opamp::proto::{
    AgentCapabilitySet, AgentConfigMap, AgentConfigObject, AgentDescription, AgentRemoteConfig,
    AgentToServer, AnyValue, ComponentHealth, ConnectionSettingsOffers, ConnectionSettingsStatus,
    ConnectionSettingsStatuses, InstanceUid, KeyValue, Message, PackageStatus, PackageStatusEnum,
    PackageStatuses, RemoteConfigStatus, RemoteConfigStatuses, ServerToAgent, any_value,
};
use opamp::server::connection_settings::{OfferState, OfferTracking};
use serde_json::{Map, Value, json};
use sha2::{Digest, Sha256};

/// What the store keeps at most, per agent and in total. Everything an agent reports is copied
/// into the store within these bounds (never a slice of the received message, which would keep
/// the whole message alive); what does not fit is cut and named in the agent's `truncated`.
#[derive(Debug, Clone)]
pub(crate) struct Limits {
    /// Identifying attributes of one agent: bytes (keys, values, per-entry overhead).
    pub(crate) identifying_bytes: usize,
    /// Non-identifying attributes of one agent: bytes.
    pub(crate) non_identifying_bytes: usize,
    /// Entries of one attribute list, nested array and kvlist values counted.
    pub(crate) attributes: usize,
    /// Nesting of array / kvlist attribute values.
    pub(crate) value_depth: usize,
    /// Depth of the health tree below the agent's own node.
    pub(crate) health_depth: usize,
    /// Nodes of the health tree, their attribute entries counted.
    pub(crate) health_nodes: usize,
    /// Bytes of the health tree.
    pub(crate) health_bytes: usize,
    /// One string (status, last error, error message, content type, role, names, values).
    pub(crate) text: usize,
    /// Bytes of one agent's effective config (every object's body and names).
    pub(crate) effective_config_bytes: usize,
    /// Objects of one agent's effective config.
    pub(crate) config_objects: usize,
    /// Bytes accounted for the whole fleet; past it, departed agents are forgotten first and
    /// then new parts are refused (named in `truncated`).
    pub(crate) total_bytes: usize,
    /// Packages of one agent's package statuses.
    pub(crate) package_statuses: usize,
    /// Agents remembered, connected or not.
    pub(crate) max_agents: usize,
    /// Departed (disconnected) agents remembered; the one that left first goes first.
    pub(crate) max_departed: usize,
    /// How long a departed agent is remembered.
    pub(crate) departed_ttl: Duration,
}

impl Default for Limits {
    fn default() -> Self {
        Self {
            identifying_bytes: 8 * 1024,
            non_identifying_bytes: 56 * 1024,
            attributes: 512,
            value_depth: 4,
            health_depth: 8,
            health_nodes: 1024,
            health_bytes: 256 * 1024,
            text: 4 * 1024,
            effective_config_bytes: 1024 * 1024,
            config_objects: 64,
            package_statuses: 64,
            total_bytes: 512 * 1024 * 1024,
            max_agents: 100_000,
            max_departed: 10_000,
            departed_ttl: Duration::from_secs(3600),
        }
    }
}

impl Limits {
    /// The most one agent can account for.
    #[cfg(test)]
    pub(crate) fn agent_bytes(&self) -> usize {
        RECORD_OVERHEAD
            + self.identifying_bytes
            + self.non_identifying_bytes
            + self.health_bytes
            + self.effective_config_bytes
            + 2 * self.text
            + self.package_statuses * (size_of::<PackageStatus>() + 4 * self.text + 256)
            + self.text
            + 64
            + size_of::<OfferTracking>()
            + 64
            + self.text
    }
}

/// Fixed cost of one record: the struct, its map entry and index entries.
const RECORD_OVERHEAD: usize = size_of::<AgentRecord>() + size_of::<InstanceUid>() + 128;

/// One agent as the server knows it.
#[derive(Debug, Default)]
pub(crate) struct AgentRecord {
    pub(crate) connected: bool,
    pub(crate) transport: Option<&'static str>,
    pub(crate) remote_addr: Option<String>,
    pub(crate) last_seen: Option<SystemTime>,
    /// When it left, while it is gone (the key of [`Inner::departed`]).
    departed_at: Option<SystemTime>,
    pub(crate) sequence_num: u64,
    pub(crate) capabilities: u64,
    pub(crate) description: Option<AgentDescription>,
    pub(crate) health: Option<ComponentHealth>,
    pub(crate) effective_config: Option<AgentConfigMap>,
    pub(crate) remote_config_status: Option<RemoteConfigStatus>,
    /// The packages the agent reported (PKG-13..PKG-20), bounded.
    pub(crate) package_statuses: Option<PackageStatuses>,
    /// The config the server wants this agent to run (shared by every agent it was pushed
    /// to; bounded by the API's request body limit).
    pub(crate) offered: Option<AgentRemoteConfig>,
    /// The OpAMP connection settings offered to this agent through the API and what it last
    /// reported about connection settings (CSS-1), boxed: few agents have either.
    connection_settings: Option<Box<OfferTracking>>,
    /// What was cut from this agent's reports, by part, and why.
    pub(crate) truncated: BTreeMap<&'static str, String>,
    /// Where the offered config comes from (`None`: nothing is offered).
    pub(crate) desired: Option<Box<DesiredInfo>>,
    /// The control plane's generation of desired state `offered` was computed at.
    pub(crate) offer_epoch: u64,
    /// SHA-256 of the encoded effective config last reported.
    effective_hash: Option<[u8; 32]>,
    /// Drift baseline (boxed: most of a fleet's records carry it, but it must not widen the
    /// record of those that do not).
    baseline: Option<Box<Baseline>>,
    /// When the record was last written to the database.
    written_at: Option<SystemTime>,
    /// Accounted bytes of each stored part.
    cost: Costs,
}

/// The config hash an agent last reported APPLIED for while the server offered it, and the
/// hash of the effective config it reported with or after that (`None` until one came).
#[derive(Debug, Clone, PartialEq, Eq)]
struct Baseline {
    config_hash: Bytes,
    effective: Option<[u8; 32]>,
}

/// Where an agent's offered config comes from, for the API.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct DesiredInfo {
    pub(crate) source: crate::desired::Source,
    pub(crate) outranked: Vec<String>,
}

/// What changed in a record since it was last written to the database.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
enum Dirty {
    /// Only `last_seen` and the sequence number: written at most every [`SEEN_INTERVAL`].
    Seen,
    /// Anything else.
    Full,
}

/// How often a record whose only change is liveness (a heartbeat) is written.
const SEEN_INTERVAL: Duration = Duration::from_secs(15);

/// Accounted bytes of a record's parts.
#[derive(Debug, Default, Clone, Copy)]
struct Costs {
    description: usize,
    health: usize,
    effective_config: usize,
    status: usize,
    remote_addr: usize,
    packages: usize,
    connection_settings: usize,
}

impl Costs {
    fn total(&self) -> usize {
        RECORD_OVERHEAD
            + self.description
            + self.health
            + self.effective_config
            + self.status
            + self.remote_addr
            + self.packages
            + self.connection_settings
    }
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

    /// Whether every `selector` attribute equals this agent's (an empty selector matches).
    fn matches_all(&self, selector: &BTreeMap<String, String>) -> bool {
        selector.iter().all(|(k, v)| self.matches(k, v))
    }

    fn accepts_packages(&self) -> bool {
        AgentCapabilitySet::from_bits_retain(self.capabilities)
            .contains(AgentCapabilitySet::ACCEPTS_PACKAGES)
    }

    fn accepts_connection_settings(&self) -> bool {
        AgentCapabilitySet::from_bits_retain(self.capabilities)
            .contains(AgentCapabilitySet::ACCEPTS_OPAMP_CONNECTION_SETTINGS)
    }

    /// The connection settings offer to send: while the agent has not reported its hash
    /// (CSS-2), and only to an agent that accepts OpAMP connection settings (CS-OP-1).
    fn pending_connection_settings(&self) -> Option<ConnectionSettingsOffers> {
        let tracking = self.connection_settings.as_deref()?;
        self.accepts_connection_settings()
            .then(|| tracking.to_send().cloned())
            .flatten()
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

    /// Whether the agent drifted from its desired state, and why.
    pub(crate) fn drift(&self) -> Option<&'static str> {
        let offered = self.offered.as_ref().map(|c| &c.config_hash);
        match self
            .baseline
            .as_deref()
            .map(|b| (&b.config_hash, b.effective))
        {
            // The agent applied what is offered now; its effective config then is the baseline.
            Some((applied, Some(baseline))) if offered == Some(applied) => (self.effective_hash
                != Some(baseline))
            .then_some("its effective config changed since it reported the offered config APPLIED"),
            _ if self.desired.is_none() && self.effective_config.is_some() => {
                Some("it runs a config that no named config or override gives it")
            }
            _ => None,
        }
    }

    fn note(&mut self, part: &'static str, cut: Option<String>) {
        match cut {
            Some(why) => self.truncated.insert(part, why),
            None => self.truncated.remove(part),
        };
    }
}

/// Locks `m`. A panic while holding the lock leaves plain data behind; keep serving it.
pub(crate) fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|e| e.into_inner())
}

/// The store's time source: the system clock, or a virtual one in tests.
pub(crate) type Clock = Arc<dyn Fn() -> SystemTime + Send + Sync>;

#[derive(Debug, Default)]
struct Inner {
    agents: BTreeMap<InstanceUid, AgentRecord>,
    /// Records changed since they were last written.
    dirty: HashMap<InstanceUid, Dirty>,
    /// Departed agents by the time they left: the retention order.
    departed: BTreeSet<(SystemTime, InstanceUid)>,
    /// Sum of every record's accounted bytes.
    total_bytes: usize,
}

impl Inner {
    fn mark(&mut self, uid: InstanceUid, what: Dirty) {
        let d = self.dirty.entry(uid).or_insert(what);
        *d = (*d).max(what);
    }

    fn forget(&mut self, uid: InstanceUid) {
        self.dirty.remove(&uid);
        if let Some(a) = self.agents.remove(&uid) {
            self.total_bytes -= a.cost.total();
            if let Some(t) = a.departed_at {
                self.departed.remove(&(t, uid));
            }
        }
    }

    /// Forgets departed agents past the count or the age limit.
    fn prune(&mut self, limits: &Limits, now: SystemTime) {
        while let Some(&(left, uid)) = self.departed.first() {
            let too_old = now
                .duration_since(left)
                .is_ok_and(|age| age > limits.departed_ttl);
            if self.departed.len() > limits.max_departed || too_old {
                self.forget(uid);
            } else {
                break;
            }
        }
    }

    /// Makes room for `extra` more bytes by forgetting departed agents (oldest first, never
    /// `keep`); whether they fit the fleet's budget.
    fn make_room(&mut self, limits: &Limits, extra: usize, keep: InstanceUid) -> bool {
        while self.total_bytes + extra > limits.total_bytes {
            let Some(&(_, uid)) = self.departed.iter().find(|(_, uid)| *uid != keep) else {
                return false;
            };
            self.forget(uid);
        }
        true
    }

    fn set_connected(&mut self, uid: InstanceUid, connected: bool, now: SystemTime) {
        let Some(a) = self.agents.get_mut(&uid) else {
            return;
        };
        let changed = a.connected != connected;
        a.connected = connected;
        a.last_seen = Some(now);
        match (connected, a.departed_at) {
            (true, Some(left)) => {
                a.departed_at = None;
                self.departed.remove(&(left, uid));
            }
            (false, None) => {
                a.departed_at = Some(now);
                self.departed.insert((now, uid));
            }
            _ => {}
        }
        self.mark(uid, if changed { Dirty::Full } else { Dirty::Seen });
    }

    /// The record of `uid`, made room for if it is new.
    fn record(&mut self, limits: &Limits, uid: InstanceUid, now: SystemTime) -> &mut AgentRecord {
        if !self.agents.contains_key(&uid) {
            if self.agents.len() >= limits.max_agents
                && let Some(&(_, oldest)) = self.departed.first()
            {
                self.forget(oldest);
            }
            let record = AgentRecord {
                last_seen: Some(now),
                ..Default::default()
            };
            self.total_bytes += record.cost.total();
            self.agents.insert(uid, record);
        }
        self.agents.entry(uid).or_default()
    }

    /// Replaces one part's accounted cost; `false` (nothing changed) if the fleet's budget has
    /// no room for it even after forgetting departed agents.
    fn charge(
        &mut self,
        limits: &Limits,
        uid: InstanceUid,
        part: fn(&mut Costs) -> &mut usize,
        new: usize,
    ) -> bool {
        let Some(old) = self.agents.get_mut(&uid).map(|a| *part(&mut a.cost)) else {
            return false;
        };
        if new > old && !self.make_room(limits, new - old, uid) {
            return false;
        }
        if let Some(a) = self.agents.get_mut(&uid) {
            *part(&mut a.cost) = new;
            self.total_bytes = self.total_bytes - old + new;
            true
        } else {
            false
        }
    }
}

/// The fleet: every agent seen (within [`Limits`]), by uid.
pub(crate) struct Fleet {
    inner: Mutex<Inner>,
    limits: Limits,
    clock: Clock,
}

impl std::fmt::Debug for Fleet {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Fleet")
            .field("limits", &self.limits)
            .finish_non_exhaustive()
    }
}

impl Default for Fleet {
    fn default() -> Self {
        Self::new(Limits::default(), Arc::new(SystemTime::now))
    }
}

/// The reason given for a part refused because the fleet's budget is spent.
const FLEET_FULL: &str = "not kept: the server's store is full";

impl Fleet {
    /// A fleet within `limits`, on `clock`.
    pub(crate) fn new(limits: Limits, clock: Clock) -> Self {
        Self {
            inner: Mutex::default(),
            limits,
            clock,
        }
    }

    fn lock(&self) -> MutexGuard<'_, Inner> {
        lock(&self.inner)
    }

    /// Bytes the store accounts for, the whole fleet.
    #[cfg(test)]
    pub(crate) fn accounted_bytes(&self) -> usize {
        self.lock().total_bytes
    }

    /// Agents remembered, connected or not.
    #[cfg(test)]
    pub(crate) fn len(&self) -> usize {
        self.lock().agents.len()
    }

    /// Marks an agent connected over `transport` from `remote_addr`.
    pub(crate) fn connected(
        &self,
        uid: InstanceUid,
        transport: &'static str,
        remote_addr: Option<String>,
    ) {
        let now = (self.clock)();
        let mut inner = self.lock();
        inner.prune(&self.limits, now);
        inner.record(&self.limits, uid, now);
        inner.set_connected(uid, true, now);
        let addr = remote_addr.map(|a| cut_str(&a, self.limits.text).0);
        let cost = addr.as_ref().map_or(0, String::len);
        if inner.charge(&self.limits, uid, |c| &mut c.remote_addr, cost)
            && let Some(agent) = inner.agents.get_mut(&uid)
        {
            agent.transport = Some(transport);
            agent.remote_addr = addr;
        }
    }

    /// Marks an agent disconnected.
    pub(crate) fn disconnected(&self, uid: InstanceUid) {
        let now = (self.clock)();
        let mut inner = self.lock();
        inner.set_connected(uid, false, now);
        inner.prune(&self.limits, now);
    }

    /// Merges a status report into the agent's record (an absent sub-message means
    /// "unchanged", CMP-4) and returns the reply the server has for it: the offered remote
    /// config when the agent does not report its hash yet (RC-6). What is kept is bounded by
    /// [`Limits`]; what was cut is named in the record's `truncated`.
    pub(crate) fn report(&self, uid: InstanceUid, msg: &AgentToServer) -> Option<ServerToAgent> {
        let limits = &self.limits;
        let now = (self.clock)();
        let mut inner = self.lock();
        inner.prune(limits, now);
        let agent = inner.record(limits, uid, now);
        agent.sequence_num = msg.sequence_num;
        let caps_changed = msg.capabilities != 0 && agent.capabilities != msg.capabilities;
        if msg.capabilities != 0 {
            agent.capabilities = msg.capabilities;
        }
        inner.set_connected(uid, msg.agent_disconnect.is_none(), now);
        let parts = msg.agent_description.is_some()
            || msg.health.is_some()
            || msg.effective_config.is_some()
            || msg.remote_config_status.is_some()
            || msg.package_statuses.is_some()
            || msg.connection_settings_status.is_some();
        if parts || caps_changed {
            inner.mark(uid, Dirty::Full);
        }

        if let Some(d) = &msg.agent_description {
            let (kept, cost, cut) = keep_description(d, limits);
            let fits = inner.charge(limits, uid, |c| &mut c.description, cost);
            let agent = inner.agents.get_mut(&uid)?;
            if fits {
                agent.description = Some(kept);
                agent.note("identifying_attributes", cut.0);
                agent.note("non_identifying_attributes", cut.1);
            } else {
                agent.note("identifying_attributes", Some(FLEET_FULL.into()));
            }
        }
        if let Some(h) = &msg.health {
            let mut budget = Budget::new(limits.health_bytes, limits.health_nodes, limits);
            // The root node always fits: the budget is far larger than one node.
            budget.take(size_of::<ComponentHealth>(), "health tree");
            let kept = keep_health(h, &mut budget, limits.health_depth);
            let (cost, cut) = budget.finish();
            let fits = inner.charge(limits, uid, |c| &mut c.health, cost);
            let agent = inner.agents.get_mut(&uid)?;
            if fits {
                agent.health = Some(kept);
                agent.note("health", cut);
            } else {
                agent.note("health", Some(FLEET_FULL.into()));
            }
        }
        if let Some(e) = &msg.effective_config {
            let (kept, cost, cut) = match &e.config_map {
                Some(map) => {
                    let (kept, cost, cut) = keep_config(map, limits);
                    (Some(kept), cost, cut)
                }
                None => (None, 0, None),
            };
            let fits = inner.charge(limits, uid, |c| &mut c.effective_config, cost);
            let agent = inner.agents.get_mut(&uid)?;
            if fits {
                agent.effective_hash = kept
                    .as_ref()
                    .map(|m| Sha256::digest(m.encode_to_vec()).into());
                agent.effective_config = kept;
                agent.note("effective_config", cut);
            } else {
                agent.note("effective_config", Some(FLEET_FULL.into()));
            }
        }
        if let Some(s) = &msg.remote_config_status {
            let (error_message, cut) = cut_str(&s.error_message, limits.text);
            let hash = &s.last_remote_config_hash;
            let hash = Bytes::copy_from_slice(&hash[..hash.len().min(64)]);
            let kept = RemoteConfigStatus {
                last_remote_config_hash: hash,
                status: s.status,
                error_message,
            };
            let cost = kept.error_message.len() + kept.last_remote_config_hash.len();
            let fits = inner.charge(limits, uid, |c| &mut c.status, cost);
            let agent = inner.agents.get_mut(&uid)?;
            if fits {
                agent.remote_config_status = Some(kept);
                agent.note(
                    "remote_config_status.error_message",
                    cut.then(|| format!("cut to {} bytes", limits.text)),
                );
            } else {
                agent.note("remote_config_status", Some(FLEET_FULL.into()));
            }
        }
        if let Some(p) = &msg.package_statuses {
            let (kept, cost, cut) = keep_package_statuses(p, limits);
            let fits = inner.charge(limits, uid, |c| &mut c.packages, cost);
            let agent = inner.agents.get_mut(&uid)?;
            if fits {
                agent.package_statuses = Some(kept);
                agent.note("package_statuses", cut);
            } else {
                agent.note("package_statuses", Some(FLEET_FULL.into()));
            }
        }
        if let Some(s) = &msg.connection_settings_status {
            // Bounded like the remote config status: the reason cut to `text`, the hash to 64.
            let (error_message, cut) = cut_str(&s.error_message, limits.text);
            let hash = &s.last_connection_settings_hash;
            let kept = AgentToServer {
                connection_settings_status: Some(ConnectionSettingsStatus {
                    last_connection_settings_hash: Bytes::copy_from_slice(
                        &hash[..hash.len().min(64)],
                    ),
                    status: s.status,
                    error_message,
                }),
                ..Default::default()
            };
            let cost = size_of::<OfferTracking>()
                + hash.len().min(64)
                + s.error_message.len().min(limits.text);
            let fits = inner.charge(limits, uid, |c| &mut c.connection_settings, cost);
            let agent = inner.agents.get_mut(&uid)?;
            if fits {
                agent
                    .connection_settings
                    .get_or_insert_default()
                    .observe(&kept);
                agent.note(
                    "connection_settings_status.error_message",
                    cut.then(|| format!("cut to {} bytes", limits.text)),
                );
            } else {
                agent.note("connection_settings_status", Some(FLEET_FULL.into()));
            }
        }
        let agent = inner.agents.get_mut(&uid)?;
        // The drift baseline: APPLIED for the offered hash starts a new one (RC-7), completed
        // by the effective config that comes with it or after it.
        if let (Some(s), Some(offered)) = (&msg.remote_config_status, &agent.offered)
            && s.status == RemoteConfigStatuses::Applied as i32
            && s.last_remote_config_hash == offered.config_hash
            && agent.baseline.as_ref().map(|b| &b.config_hash) != Some(&offered.config_hash)
        {
            agent.baseline = Some(Box::new(Baseline {
                config_hash: offered.config_hash.clone(),
                effective: None,
            }));
        }
        let effective = agent.effective_hash;
        if let Some(b) = agent.baseline.as_deref_mut()
            && b.effective.is_none()
            && msg.effective_config.is_some()
        {
            b.effective = effective;
        }
        self.pending_reply_of(agent)
    }

    fn pending_reply_of(&self, agent: &AgentRecord) -> Option<ServerToAgent> {
        let remote_config = agent.pending_config();
        let connection_settings = agent.pending_connection_settings();
        (remote_config.is_some() || connection_settings.is_some()).then(|| ServerToAgent {
            remote_config,
            connection_settings,
            ..Default::default()
        })
    }

    /// Offers `offers` to `uid` (replacing an earlier offer) and returns the message to push
    /// now. Refused for an agent this node does not hold or that did not declare
    /// AcceptsOpAMPConnectionSettings (CS-OP-1). Offers are in memory: a server restart
    /// forgets what was offered (not what the agent reported).
    pub(crate) fn offer_connection_settings(
        &self,
        uid: InstanceUid,
        offers: ConnectionSettingsOffers,
    ) -> Result<ServerToAgent, String> {
        let limits = &self.limits;
        let mut inner = self.lock();
        let Some(agent) = inner.agents.get(&uid) else {
            return Err(format!("agent {uid} is not connected to this server"));
        };
        if !agent.connected {
            return Err(format!("agent {uid} is not connected to this server"));
        }
        if !agent.accepts_connection_settings() {
            return Err(format!(
                "agent {uid} does not accept OpAMP connection settings (AcceptsOpAMPConnectionSettings)"
            ));
        }
        let old = agent.cost.connection_settings;
        let cost = old.max(size_of::<OfferTracking>()) + offers.encoded_len();
        if !inner.charge(limits, uid, |c| &mut c.connection_settings, cost) {
            return Err(FLEET_FULL.into());
        }
        let agent = inner
            .agents
            .get_mut(&uid)
            .ok_or_else(|| format!("agent {uid} is gone"))?;
        agent
            .connection_settings
            .get_or_insert_default()
            .offer(offers.clone());
        Ok(ServerToAgent {
            connection_settings: Some(offers),
            ..Default::default()
        })
    }

    /// The reply the server has for `uid` now: its offered config unless it reported that
    /// hash (RC-6).
    pub(crate) fn pending_reply(&self, uid: InstanceUid) -> Option<ServerToAgent> {
        let inner = self.lock();
        self.pending_reply_of(inner.agents.get(&uid)?)
    }

    /// Whether `uid` is in this node's memory.
    pub(crate) fn contains(&self, uid: InstanceUid) -> bool {
        self.lock().agents.contains_key(&uid)
    }

    /// The agent's attributes (identifying over non-identifying), for selectors and templates.
    pub(crate) fn attributes(&self, uid: InstanceUid) -> Option<crate::desired::Attributes> {
        let inner = self.lock();
        let a = inner.agents.get(&uid)?;
        Some(attributes_of(a))
    }

    /// The agents whose desired config is older than `epoch` (or every connected one with
    /// `all`), with their attributes: what the control plane recomputes after a change.
    pub(crate) fn stale(&self, epoch: u64) -> Vec<(InstanceUid, crate::desired::Attributes)> {
        self.lock()
            .agents
            .iter()
            .filter(|(_, a)| a.connected && a.offer_epoch < epoch)
            .map(|(uid, a)| (*uid, attributes_of(a)))
            .collect()
    }

    /// The offer epoch of `uid` (0 for an unknown agent).
    pub(crate) fn offer_epoch(&self, uid: InstanceUid) -> u64 {
        self.lock().agents.get(&uid).map_or(0, |a| a.offer_epoch)
    }

    /// Sets what the server offers `uid` (computed at `epoch`); the config to push now when
    /// the offer changed and the agent accepts remote config and does not run it yet.
    pub(crate) fn set_desired(
        &self,
        uid: InstanceUid,
        epoch: u64,
        desired: Option<crate::desired::Desired>,
    ) -> Option<AgentRemoteConfig> {
        let mut inner = self.lock();
        let a = inner.agents.get_mut(&uid)?;
        a.offer_epoch = a.offer_epoch.max(epoch);
        let (info, config) = match desired {
            Some(d) => (
                Some(Box::new(DesiredInfo {
                    source: d.source,
                    outranked: d.outranked,
                })),
                Some(d.remote_config),
            ),
            None => (None, None),
        };
        let changed_info = a.desired != info;
        a.desired = info;
        let before = a.offered.as_ref().map(|c| c.config_hash.clone());
        let after = config.as_ref().map(|c| c.config_hash.clone());
        if before == after {
            if changed_info {
                inner.mark(uid, Dirty::Full);
            }
            return None;
        }
        a.offered = config;
        let push = a.pending_config();
        inner.mark(uid, Dirty::Full);
        push
    }

    /// The records changed since the last call, as database rows of `node` (a record whose
    /// only change is liveness at most every 15 s).
    pub(crate) fn take_dirty(&self, node: &str) -> Vec<crate::db::AgentRow> {
        let now = (self.clock)();
        let mut inner = self.lock();
        let due: Vec<InstanceUid> = inner
            .dirty
            .iter()
            .filter(|(uid, d)| {
                **d == Dirty::Full
                    || inner
                        .agents
                        .get(uid)
                        .and_then(|a| a.written_at)
                        .is_none_or(|t| now.duration_since(t).is_ok_and(|age| age >= SEEN_INTERVAL))
            })
            .map(|(uid, _)| *uid)
            .collect();
        let mut rows = Vec::with_capacity(due.len());
        for uid in due {
            inner.dirty.remove(&uid);
            if let Some(a) = inner.agents.get_mut(&uid) {
                a.written_at = Some(now);
                rows.push(row_of(uid, a, node));
            }
        }
        // A burst (a fleet connecting) leaves a large empty table behind otherwise.
        if inner.dirty.capacity() > 1024 && inner.dirty.capacity() > 8 * inner.dirty.len() {
            inner.dirty.shrink_to_fit();
        }
        rows
    }

    /// Marks the agents of `rows` changed again (their write failed).
    pub(crate) fn mark_dirty(&self, uids: impl IntoIterator<Item = InstanceUid>) {
        let mut inner = self.lock();
        for uid in uids {
            inner.mark(uid, Dirty::Full);
        }
    }

    /// Takes an agent's saved record back into memory (its agent reconnected): its reports,
    /// within [`Limits`], and its drift baseline.
    pub(crate) fn restore(&self, uid: InstanceUid, row: &crate::db::AgentRow) {
        let Ok(saved) = AgentToServer::decode(row.state.as_slice()) else {
            tracing::warn!(%uid, "a saved agent record does not decode; ignored");
            return;
        };
        let _ = self.report(uid, &saved);
        let mut inner = self.lock();
        if let Some(a) = inner.agents.get_mut(&uid) {
            a.baseline = row.applied_config_hash.clone().map(|h| {
                Box::new(Baseline {
                    config_hash: Bytes::from(h),
                    effective: row
                        .applied_effective_hash
                        .as_deref()
                        .and_then(|h| <[u8; 32]>::try_from(h).ok()),
                })
            });
            a.transport = match row.transport.as_deref() {
                Some("websocket") => Some("websocket"),
                Some("http") => Some("http"),
                _ => None,
            };
        }
        inner.dirty.remove(&uid);
    }

    /// Takes the drift baseline of a saved record back for an agent that reconnected, unless
    /// the record has one already (it reported APPLIED again meanwhile): what the agent
    /// reports itself is fresher than the row and is kept.
    pub(crate) fn restore_baseline(&self, uid: InstanceUid, row: &crate::db::AgentRow) {
        let mut inner = self.lock();
        let Some(a) = inner.agents.get_mut(&uid) else {
            return;
        };
        if a.baseline.is_some() {
            return;
        }
        a.baseline = row.applied_config_hash.clone().map(|h| {
            Box::new(Baseline {
                config_hash: Bytes::from(h),
                effective: row
                    .applied_effective_hash
                    .as_deref()
                    .and_then(|h| <[u8; 32]>::try_from(h).ok()),
            })
        });
        if a.baseline.is_some() {
            inner.mark(uid, Dirty::Full);
        }
    }

    /// The JSON form of a saved record (an agent not connected to this node), `full` or slim.
    pub(crate) fn row_json(&self, row: &crate::db::AgentRow, full: bool) -> Option<Value> {
        let uid: InstanceUid = row.uid.parse().ok()?;
        let scratch = Fleet::new(self.limits.clone(), self.clock.clone());
        scratch.restore(uid, row);
        let mut inner = scratch.lock();
        let a = inner.agents.get_mut(&uid)?;
        a.connected = row.connected;
        a.remote_addr = row.remote_addr.clone();
        a.last_seen = Some(UNIX_EPOCH + Duration::from_millis(row.last_seen_ms.max(0) as u64));
        let mut v = agent_value(&uid, a, full);
        v["node"] = json!(row.node);
        // What the node holding it knows (desired config, drift, the offered hash), as that
        // node last wrote it; not known for a record written before it did.
        let view: Value = row
            .view
            .as_deref()
            .and_then(|v| serde_json::from_str(v).ok())
            .unwrap_or(Value::Null);
        for key in ["remote_config", "desired_config", "drift"] {
            v[key] = view.get(key).cloned().unwrap_or(Value::Null);
        }
        Some(v)
    }

    /// Whether the agent declared AcceptsRestartCommand (CMD-2).
    pub(crate) fn accepts_restart(&self, uid: InstanceUid) -> bool {
        self.lock().agents.get(&uid).is_some_and(|a| {
            AgentCapabilitySet::from_bits_retain(a.capabilities)
                .contains(AgentCapabilitySet::ACCEPTS_RESTART_COMMAND)
        })
    }

    /// Whether the agent declared AcceptsPackages and its attributes match `selector`.
    pub(crate) fn package_target(
        &self,
        uid: InstanceUid,
        selector: &BTreeMap<String, String>,
    ) -> bool {
        self.lock()
            .agents
            .get(&uid)
            .is_some_and(|a| a.accepts_packages() && a.matches_all(selector))
    }

    /// Whether the agent declared AcceptsPackages.
    pub(crate) fn accepts_packages(&self, uid: InstanceUid) -> bool {
        self.lock()
            .agents
            .get(&uid)
            .is_some_and(AgentRecord::accepts_packages)
    }

    /// The connected agents that accept packages and match `selector`.
    pub(crate) fn package_targets(&self, selector: &BTreeMap<String, String>) -> Vec<InstanceUid> {
        self.lock()
            .agents
            .iter()
            .filter(|(_, a)| a.connected && a.accepts_packages() && a.matches_all(selector))
            .map(|(uid, _)| *uid)
            .collect()
    }

    /// Sets the config offered to one agent; `None` for an unknown agent (tests: the control
    /// plane sets offers with [`set_desired`](Self::set_desired)).
    #[cfg(test)]
    pub(crate) fn offer_to(&self, uid: InstanceUid, config: &AgentRemoteConfig) -> Option<()> {
        let mut inner = self.lock();
        inner.agents.get_mut(&uid)?.offered = Some(config.clone());
        Some(())
    }

    /// One page of the slim listing (no config bodies, no non-identifying attributes, no
    /// health components): at most `n` agents after `after`, each as a JSON text, and the
    /// last uid of the page (`None` when the listing is done).
    #[cfg(test)]
    pub(crate) fn list_page(
        &self,
        after: Option<InstanceUid>,
        n: usize,
    ) -> (Vec<String>, Option<InstanceUid>) {
        use std::ops::Bound::{Excluded, Unbounded};
        let now = (self.clock)();
        let mut inner = self.lock();
        inner.prune(&self.limits, now);
        let lower = after.map_or(Unbounded, Excluded);
        let page: Vec<(InstanceUid, String)> = inner
            .agents
            .range((lower, Unbounded))
            .take(n)
            .map(|(uid, a)| (*uid, summary_json(uid, a).to_string()))
            .collect();
        let last = (page.len() == n)
            .then(|| page.last().map(|(uid, _)| *uid))
            .flatten();
        (page.into_iter().map(|(_, json)| json).collect(), last)
    }

    /// The JSON form of every agent, slim (see [`list_page`](Self::list_page)); tests only,
    /// the API streams the pages.
    #[cfg(test)]
    pub(crate) fn list_json(&self) -> Value {
        let mut all = Vec::new();
        let mut after = None;
        loop {
            let (page, last) = self.list_page(after, 100);
            all.extend(
                page.iter()
                    .map(|j| serde_json::from_str::<Value>(j).unwrap()),
            );
            match last {
                Some(uid) => after = Some(uid),
                None => return Value::Array(all),
            }
        }
    }

    /// The JSON form of one agent, in full.
    pub(crate) fn agent_json(&self, uid: InstanceUid) -> Option<Value> {
        self.lock().agents.get(&uid).map(|a| agent_json(&uid, a))
    }

    /// Where each connected agent's desired config comes from.
    pub(crate) fn desired_sources(&self) -> Vec<(InstanceUid, Option<DesiredInfo>)> {
        self.lock()
            .agents
            .iter()
            .filter(|(_, a)| a.connected)
            .map(|(uid, a)| (*uid, a.desired.as_deref().cloned()))
            .collect()
    }

    /// The slim JSON of every agent connected to this node (`node`), by uid.
    pub(crate) fn connected_json(&self, node: &str) -> BTreeMap<String, Value> {
        let now = (self.clock)();
        let mut inner = self.lock();
        inner.prune(&self.limits, now);
        inner
            .agents
            .iter()
            .filter(|(_, a)| a.connected)
            .map(|(uid, a)| {
                let mut v = summary_json(uid, a);
                v["node"] = json!(node);
                (uid.to_string(), v)
            })
            .collect()
    }

    /// One agent in full if it is connected to this node.
    pub(crate) fn connected_agent_json(&self, uid: InstanceUid, node: &str) -> Option<Value> {
        let inner = self.lock();
        let a = inner.agents.get(&uid).filter(|a| a.connected)?;
        let mut v = agent_json(&uid, a);
        v["node"] = json!(node);
        Some(v)
    }

    /// The attributes and reported remote config status (hash, status name, error) of a
    /// saved record.
    pub(crate) fn row_attributes(
        row: &crate::db::AgentRow,
    ) -> Option<(crate::desired::Attributes, Option<RemoteConfigStatus>)> {
        let saved = AgentToServer::decode(row.state.as_slice()).ok()?;
        let record = AgentRecord {
            description: saved.agent_description,
            ..Default::default()
        };
        Some((attributes_of(&record), saved.remote_config_status))
    }

    /// The remote config status `uid` reported, if it is connected here.
    pub(crate) fn connected_status(&self, uid: InstanceUid) -> Option<Option<RemoteConfigStatus>> {
        let inner = self.lock();
        let a = inner.agents.get(&uid).filter(|a| a.connected)?;
        Some(a.remote_config_status.clone())
    }
}

/// What is left to keep of one part: bytes and entries.
struct Budget {
    bytes: usize,
    items: usize,
    start: usize,
    text: usize,
    /// The first reason something was cut.
    cut: Option<String>,
}

impl Budget {
    fn new(bytes: usize, items: usize, limits: &Limits) -> Self {
        Self {
            bytes,
            items,
            start: bytes,
            text: limits.text,
            cut: None,
        }
    }

    fn cut(&mut self, why: impl FnOnce() -> String) {
        if self.cut.is_none() {
            self.cut = Some(why());
        }
    }

    /// Takes one entry of `bytes`; `false` (and marks the cut) if it does not fit.
    fn take(&mut self, bytes: usize, what: &str) -> bool {
        if self.items == 0 || bytes > self.bytes {
            let (start, what) = (self.start, what.to_owned());
            self.cut(|| format!("{what} over {start} bytes or the entry limit: the rest dropped"));
            return false;
        }
        self.items -= 1;
        self.bytes -= bytes;
        true
    }

    /// A string within the text limit, noting a cut.
    fn text(&mut self, s: &str, what: &str) -> String {
        let (kept, cut) = cut_str(s, self.text);
        if cut {
            let (limit, what) = (self.text, what.to_owned());
            self.cut(|| format!("{what} cut to {limit} bytes"));
        }
        kept
    }

    /// Accounted bytes, and the cut (if any).
    fn finish(self) -> (usize, Option<String>) {
        (self.start - self.bytes, self.cut)
    }
}

/// `s` cut to at most `max` bytes on a character boundary; whether it was cut.
fn cut_str(s: &str, max: usize) -> (String, bool) {
    if s.len() <= max {
        return (s.to_owned(), false);
    }
    let mut end = max;
    while !s.is_char_boundary(end) {
        end -= 1;
    }
    (s[..end].to_owned(), true)
}

fn keep_description(
    d: &AgentDescription,
    limits: &Limits,
) -> (AgentDescription, usize, (Option<String>, Option<String>)) {
    let mut ident = Budget::new(limits.identifying_bytes, limits.attributes, limits);
    let identifying_attributes =
        keep_attrs(&d.identifying_attributes, &mut ident, limits.value_depth);
    let mut non = Budget::new(limits.non_identifying_bytes, limits.attributes, limits);
    let non_identifying_attributes =
        keep_attrs(&d.non_identifying_attributes, &mut non, limits.value_depth);
    let (a, cut_a) = ident.finish();
    let (b, cut_b) = non.finish();
    let kept = AgentDescription {
        identifying_attributes,
        non_identifying_attributes,
    };
    (kept, a + b, (cut_a, cut_b))
}

fn keep_attrs(src: &[KeyValue], budget: &mut Budget, depth: usize) -> Vec<KeyValue> {
    let mut out = Vec::new();
    for kv in src {
        match keep_kv(kv, budget, depth) {
            Some(kv) => out.push(kv),
            None => break,
        }
    }
    out
}

fn keep_kv(kv: &KeyValue, budget: &mut Budget, depth: usize) -> Option<KeyValue> {
    if kv.key.len() > budget.text {
        let limit = budget.text;
        budget.cut(|| format!("an attribute key over {limit} bytes: the rest dropped"));
        return None;
    }
    if !budget.take(size_of::<KeyValue>() + kv.key.len(), "attributes") {
        return None;
    }
    let value = match &kv.value {
        Some(v) => Some(keep_any(v, budget, depth)?),
        None => None,
    };
    Some(KeyValue {
        key: kv.key.clone(),
        value,
    })
}

fn keep_any(v: &AnyValue, budget: &mut Budget, depth: usize) -> Option<AnyValue> {
    use any_value::Value as V;
    let value = match &v.value {
        None => None,
        Some(V::StringValue(s)) => {
            let s = budget.text(s, "an attribute value");
            if !budget.take(size_of::<AnyValue>() + s.len(), "attributes") {
                return None;
            }
            Some(V::StringValue(s))
        }
        Some(V::BytesValue(b)) => {
            let n = b.len().min(budget.text);
            if n < b.len() {
                let limit = budget.text;
                budget.cut(|| format!("an attribute value cut to {limit} bytes"));
            }
            if !budget.take(size_of::<AnyValue>() + n, "attributes") {
                return None;
            }
            Some(V::BytesValue(Bytes::copy_from_slice(&b[..n])))
        }
        Some(V::ArrayValue(a)) => {
            if depth == 0 {
                budget.cut(|| "attribute values nested too deep: the rest dropped".into());
                return None;
            }
            if !budget.take(size_of::<AnyValue>(), "attributes") {
                return None;
            }
            let mut values = Vec::new();
            for x in &a.values {
                match keep_any(x, budget, depth - 1) {
                    Some(x) => values.push(x),
                    None => break,
                }
            }
            Some(V::ArrayValue(opamp::proto::ArrayValue { values }))
        }
        Some(V::KvlistValue(kv)) => {
            if depth == 0 {
                budget.cut(|| "attribute values nested too deep: the rest dropped".into());
                return None;
            }
            if !budget.take(size_of::<AnyValue>(), "attributes") {
                return None;
            }
            let values = keep_attrs(&kv.values, budget, depth - 1);
            Some(V::KvlistValue(opamp::proto::KeyValueList { values }))
        }
        Some(scalar) => {
            if !budget.take(size_of::<AnyValue>(), "attributes") {
                return None;
            }
            Some(scalar.clone())
        }
    };
    Some(AnyValue { value })
}

/// The health tree below `h` within the budget and `depth` more levels. The caller paid for
/// `h`'s node itself.
fn keep_health(h: &ComponentHealth, budget: &mut Budget, depth: usize) -> ComponentHealth {
    let mut status = budget.text(&h.status, "a health status");
    let mut last_error = budget.text(&h.last_error, "a health last_error");
    let strings = status.len() + last_error.len();
    if strings > budget.bytes {
        status.clear();
        last_error.clear();
        budget.cut(|| "health tree over its size limit: the rest dropped".into());
    } else {
        budget.bytes -= strings;
    }
    let attributes = keep_attrs(&h.attributes, budget, 1);
    let mut component_health_map = BTreeMap::new();
    if !h.component_health_map.is_empty() && depth == 0 {
        budget.cut(|| "health tree deeper than its depth limit: deeper components dropped".into());
    } else {
        for (name, child) in &h.component_health_map {
            if name.len() > budget.text {
                budget
                    .cut(|| "a health component name over the text limit: the rest dropped".into());
                break;
            }
            let node = size_of::<ComponentHealth>() + size_of::<String>() + name.len();
            if !budget.take(node, "health tree") {
                break;
            }
            let kept = keep_health(child, budget, depth - 1);
            component_health_map.insert(name.clone(), kept);
        }
    }
    ComponentHealth {
        healthy: h.healthy,
        start_time_unix_nano: h.start_time_unix_nano,
        status_time_unix_nano: h.status_time_unix_nano,
        status,
        last_error,
        component_health_map,
        attributes,
    }
}

/// The effective config within the per-agent limit: objects in name order, bodies copied, a
/// body that does not fit cut to what is left.
fn keep_config(map: &AgentConfigMap, limits: &Limits) -> (AgentConfigMap, usize, Option<String>) {
    let mut budget = Budget::new(limits.effective_config_bytes, limits.config_objects, limits);
    let mut out = AgentConfigMap::default();
    for (name, obj) in &map.config_map {
        let fixed = size_of::<AgentConfigObject>()
            + size_of::<String>()
            + name.len()
            + obj.content_type.len()
            + obj.role.len();
        if name.len().max(obj.content_type.len()).max(obj.role.len()) > limits.text {
            budget.cut(|| {
                format!(
                    "a config name, content type or role over {} bytes",
                    limits.text
                )
            });
            continue;
        }
        if !budget.take(fixed, "effective config") {
            break;
        }
        let n = obj.body.len().min(budget.bytes);
        if n < obj.body.len() {
            budget.cut(|| {
                format!(
                    "effective config over {} bytes: body of {name:?} cut to {n} of {} bytes",
                    limits.effective_config_bytes,
                    obj.body.len()
                )
            });
        }
        budget.bytes -= n;
        out.config_map.insert(
            name.clone(),
            AgentConfigObject {
                body: Bytes::copy_from_slice(&obj.body[..n]),
                content_type: obj.content_type.clone(),
                role: obj.role.clone(),
            },
        );
    }
    let (cost, cut) = budget.finish();
    (out, cost, cut)
}

/// The package statuses within the limits: at most `limits.package_statuses` packages, strings
/// cut to the text limit, hashes to 64 bytes.
fn keep_package_statuses(
    p: &PackageStatuses,
    limits: &Limits,
) -> (PackageStatuses, usize, Option<String>) {
    let mut cut = None;
    let mut text = |s: &str| {
        let (kept, was_cut) = cut_str(s, limits.text);
        if was_cut {
            cut = Some(format!("strings cut to {} bytes", limits.text));
        }
        kept
    };
    let hash = |b: &Bytes| Bytes::copy_from_slice(&b[..b.len().min(64)]);
    let mut packages = BTreeMap::new();
    let mut cost = 0;
    for (name, s) in p.packages.iter().take(limits.package_statuses) {
        let kept = PackageStatus {
            name: text(name),
            agent_has_version: text(&s.agent_has_version),
            agent_has_hash: hash(&s.agent_has_hash),
            server_offered_version: text(&s.server_offered_version),
            server_offered_hash: hash(&s.server_offered_hash),
            status: s.status,
            error_message: text(&s.error_message),
            download_details: s.download_details,
        };
        cost += size_of::<PackageStatus>()
            + 2 * kept.name.len()
            + kept.agent_has_version.len()
            + kept.server_offered_version.len()
            + kept.error_message.len()
            + kept.agent_has_hash.len()
            + kept.server_offered_hash.len();
        packages.insert(kept.name.clone(), kept);
    }
    let error_message = text(&p.error_message);
    if p.packages.len() > limits.package_statuses {
        cut = Some(format!(
            "{} packages reported, the first {} kept",
            p.packages.len(),
            limits.package_statuses
        ));
    }
    let kept = PackageStatuses {
        packages,
        server_provided_all_packages_hash: hash(&p.server_provided_all_packages_hash),
        error_message,
    };
    cost += kept.error_message.len() + kept.server_provided_all_packages_hash.len();
    (kept, cost, cut)
}

fn package_status_name(status: i32) -> &'static str {
    match PackageStatusEnum::try_from(status) {
        Ok(PackageStatusEnum::Installed) => "INSTALLED",
        Ok(PackageStatusEnum::InstallPending) => "INSTALL_PENDING",
        Ok(PackageStatusEnum::Installing) => "INSTALLING",
        Ok(PackageStatusEnum::InstallFailed) => "INSTALL_FAILED",
        Ok(PackageStatusEnum::Downloading) => "DOWNLOADING",
        Err(_) => "UNKNOWN",
    }
}

fn package_statuses_json(p: &PackageStatuses) -> Value {
    p.packages
        .iter()
        .map(|(name, s)| {
            (
                name.clone(),
                json!({
                    "status": package_status_name(s.status),
                    "agent_has_version": s.agent_has_version,
                    "agent_has_hash": hex(&s.agent_has_hash),
                    "server_offered_version": s.server_offered_version,
                    "error_message": s.error_message,
                    "download_percent": s.download_details.map(|d| d.download_percent),
                }),
            )
        })
        .collect::<Map<_, _>>()
        .into()
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

fn health_json(h: &ComponentHealth, components: bool) -> Value {
    let mut v = json!({
        "healthy": h.healthy,
        "status": h.status,
        "last_error": h.last_error,
        "start_time_unix_nano": h.start_time_unix_nano,
        "status_time_unix_nano": h.status_time_unix_nano,
    });
    if components {
        v["attributes"] = attrs_json(&h.attributes);
        v["components"] = h
            .component_health_map
            .iter()
            .map(|(k, v)| (k.clone(), health_json(v, true)))
            .collect::<Map<_, _>>()
            .into();
    }
    v
}

/// A config map by name; with `bodies`, each object's body (lossy UTF-8), else its size.
fn config_map_json(map: &AgentConfigMap, bodies: bool) -> Value {
    map.config_map
        .iter()
        .map(|(name, obj)| {
            let mut v = json!({
                "content_type": obj.content_type,
                "role": obj.role,
                "size": obj.body.len(),
            });
            if bodies {
                v["body"] = String::from_utf8_lossy(&obj.body).into_owned().into();
            }
            (name.clone(), v)
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

/// The JSON form of an agent: in full, or (`full == false`) the slim form of the listing,
/// without non-identifying attributes, health components or config bodies.
fn agent_value(uid: &InstanceUid, a: &AgentRecord, full: bool) -> Value {
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
    let mut v = json!({
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
        "health": a.health.as_ref().map(|h| health_json(h, full)),
        "remote_config_status": a.remote_config_status.as_ref().map(|s| json!({
            "status": status_name(s.status),
            "hash": hex(&s.last_remote_config_hash),
            "error_message": s.error_message,
        })),
        "effective_config": a.effective_config.as_ref().map(|m| config_map_json(m, full)),
        "remote_config": a.offered.as_ref().map(|c| {
            let mut v = json!({ "hash": hex(&c.config_hash) });
            if full {
                v["config"] = c.config.as_ref().map(|m| config_map_json(m, true)).into();
            }
            v
        }),
        "connection_settings_status": a.connection_settings.as_deref()
            .and_then(OfferTracking::reported)
            .map(|s| json!({
                "status": ConnectionSettingsStatuses::try_from(s.status)
                    .map_or("UNSET", |s| s.as_str_name()
                        .trim_start_matches("ConnectionSettingsStatuses_")),
                "hash": hex(&s.last_connection_settings_hash),
                "error_message": s.error_message,
            })),
        "connection_settings_offer": a.connection_settings.as_deref()
            .and_then(|t| t.offered().map(|o| (t, o)))
            .map(|(t, o)| offer_json(&t.state(), o)),
        "truncated": a.truncated,
        "desired_config": desired_json(a),
        "drift": drift_json(a),
    });
    if full {
        v["package_statuses"] = a
            .package_statuses
            .as_ref()
            .map_or(Value::Null, package_statuses_json);
        v["package_sync"] = a.package_statuses.as_ref().map_or(Value::Null, |p| {
            json!({
                "server_provided_all_packages_hash": hex(&p.server_provided_all_packages_hash),
                "error_message": p.error_message,
            })
        });
    }
    v["identifying_attributes"] = ident;
    if full {
        v["non_identifying_attributes"] = non_ident;
    }
    v
}

/// The connection settings this server offered an agent and what became of them.
fn offer_json(state: &OfferState, o: &ConnectionSettingsOffers) -> Value {
    let (name, error) = match state {
        OfferState::Applying => ("APPLYING", None),
        OfferState::Applied => ("APPLIED", None),
        OfferState::Failed(reason) => ("FAILED", Some(reason.as_str())),
        _ => ("PENDING", None),
    };
    json!({
        "hash": hex(&o.hash),
        "state": name,
        "error_message": error,
        "endpoint": o.opamp.as_ref().map(|s| s.destination_endpoint.as_str()),
    })
}

fn agent_json(uid: &InstanceUid, a: &AgentRecord) -> Value {
    agent_value(uid, a, true)
}

/// The agent's attributes as strings, identifying over non-identifying.
fn attributes_of(a: &AgentRecord) -> crate::desired::Attributes {
    let mut out = crate::desired::Attributes::new();
    if let Some(d) = &a.description {
        for kv in d
            .non_identifying_attributes
            .iter()
            .chain(&d.identifying_attributes)
        {
            if let Some(v) = &kv.value {
                out.insert(kv.key.clone(), any_to_string(v));
            }
        }
    }
    out
}

/// A record as its database row: every reported part in one encoded `AgentToServer`.
fn row_of(uid: InstanceUid, a: &AgentRecord, node: &str) -> crate::db::AgentRow {
    let state = AgentToServer {
        instance_uid: uid.to_bytes(),
        sequence_num: a.sequence_num,
        capabilities: a.capabilities,
        agent_description: a.description.clone(),
        health: a.health.clone(),
        effective_config: a
            .effective_config
            .clone()
            .map(|m| opamp::proto::EffectiveConfig {
                config_map: Some(m),
            }),
        remote_config_status: a.remote_config_status.clone(),
        package_statuses: a.package_statuses.clone(),
        connection_settings_status: a
            .connection_settings
            .as_deref()
            .and_then(OfferTracking::reported)
            .cloned(),
        ..Default::default()
    };
    let view = json!({
        "desired_config": desired_json(a),
        "drift": drift_json(a),
        "remote_config": a.offered.as_ref().map(|c| json!({ "hash": hex(&c.config_hash) })),
    })
    .to_string();
    crate::db::AgentRow {
        uid: uid.to_string(),
        node: node.to_owned(),
        connected: a.connected,
        last_seen_ms: a
            .last_seen
            .and_then(|t| t.duration_since(UNIX_EPOCH).ok())
            .map_or(0, |d| d.as_millis() as i64),
        transport: a.transport.map(str::to_owned),
        remote_addr: a.remote_addr.clone(),
        state: state.encode_to_vec(),
        applied_config_hash: a.baseline.as_ref().map(|b| b.config_hash.to_vec()),
        applied_effective_hash: a
            .baseline
            .as_ref()
            .and_then(|b| b.effective)
            .map(|h| h.to_vec()),
        view: Some(view),
    }
}

fn drift_json(a: &AgentRecord) -> Value {
    match a.drift() {
        Some(reason) => json!({ "drifted": true, "reason": reason }),
        None => json!({ "drifted": false }),
    }
}

fn desired_json(a: &AgentRecord) -> Value {
    use crate::desired::Source;
    match a.desired.as_deref() {
        None => Value::Null,
        Some(d) => {
            let mut v = match &d.source {
                Source::Override => json!({ "source": "override" }),
                Source::Named {
                    name,
                    version,
                    priority,
                } => json!({
                    "source": "config",
                    "name": name,
                    "version": version,
                    "priority": priority,
                }),
            };
            v["outranked"] = json!(d.outranked);
            v
        }
    }
}

fn summary_json(uid: &InstanceUid, a: &AgentRecord) -> Value {
    agent_value(uid, a, false)
}

#[cfg(test)]
mod tests {
    use super::*;
    use opamp::proto::{AgentDisconnect, EffectiveConfig};
    use std::sync::atomic::{AtomicU64, Ordering};

    /// A virtual clock: seconds since the epoch, moved by the test.
    fn clock() -> (Clock, Arc<AtomicU64>) {
        let secs = Arc::new(AtomicU64::new(1_700_000_000));
        let s = secs.clone();
        let clock: Clock =
            Arc::new(move || UNIX_EPOCH + Duration::from_secs(s.load(Ordering::SeqCst)));
        (clock, secs)
    }

    fn uid(n: u8) -> InstanceUid {
        let mut b = [0u8; 16];
        b[15] = n;
        b[0] = 1;
        InstanceUid::try_from(&b[..]).unwrap()
    }

    fn report(n: u8) -> AgentToServer {
        AgentToServer {
            instance_uid: uid(n).to_bytes(),
            sequence_num: 1,
            capabilities: AgentCapabilitySet::REPORTS_STATUS.bits(),
            agent_description: Some(AgentDescription {
                identifying_attributes: vec![KeyValue::new("service.name", format!("a{n}"))],
                non_identifying_attributes: vec![KeyValue::new("host.name", "h")],
            }),
            ..Default::default()
        }
    }

    fn with_config(n: u8, body: Bytes) -> AgentToServer {
        AgentToServer {
            effective_config: Some(EffectiveConfig {
                config_map: Some(AgentConfigMap::single(body, "text/yaml")),
            }),
            ..report(n)
        }
    }

    fn leave(fleet: &Fleet, n: u8) {
        let bye = AgentToServer {
            agent_disconnect: Some(AgentDisconnect {}),
            ..report(n)
        };
        fleet.report(uid(n), &bye);
    }

    #[test]
    fn a_million_tiny_attributes_are_cut_and_the_store_stays_bounded() {
        let fleet = Fleet::default();
        let limits = Limits::default();
        let tiny: Vec<KeyValue> = (0..1_000_000)
            .map(|i| KeyValue::new(format!("k{i}"), "v"))
            .collect();
        let msg = AgentToServer {
            agent_description: Some(AgentDescription {
                identifying_attributes: tiny.clone(),
                non_identifying_attributes: tiny,
            }),
            ..report(1)
        };
        fleet.report(uid(1), &msg);
        let a = fleet.agent_json(uid(1)).unwrap();
        let ident = a["identifying_attributes"].as_object().unwrap().len();
        let non = a["non_identifying_attributes"].as_object().unwrap().len();
        assert!(
            ident > 0 && ident <= limits.attributes,
            "{ident} identifying kept"
        );
        assert!(
            non > 0 && non <= limits.attributes,
            "{non} non-identifying kept"
        );
        let truncated = a["truncated"].as_object().unwrap();
        assert!(
            truncated.contains_key("identifying_attributes"),
            "{truncated:?}"
        );
        assert!(
            truncated.contains_key("non_identifying_attributes"),
            "{truncated:?}"
        );
        let accounted = fleet.accounted_bytes();
        assert!(
            accounted <= limits.agent_bytes(),
            "{accounted} > {}",
            limits.agent_bytes()
        );
        // The accounting is not a token: it covers what was kept.
        let kept_json = a["identifying_attributes"].to_string().len()
            + a["non_identifying_attributes"].to_string().len();
        assert!(
            accounted >= kept_json / 2,
            "{accounted} for {kept_json} bytes of JSON"
        );
    }

    #[test]
    fn big_attribute_values_and_deep_values_are_cut() {
        let fleet = Fleet::default();
        let limits = Limits::default();
        let mut deep = AnyValue::from("leaf");
        for _ in 0..50 {
            deep = AnyValue {
                value: Some(any_value::Value::ArrayValue(opamp::proto::ArrayValue {
                    values: vec![deep],
                })),
            };
        }
        let msg = AgentToServer {
            agent_description: Some(AgentDescription {
                identifying_attributes: vec![
                    KeyValue::new("service.name", "x".repeat(1 << 20)),
                    KeyValue::new("deep", deep),
                ],
                non_identifying_attributes: vec![],
            }),
            ..report(1)
        };
        fleet.report(uid(1), &msg);
        let a = fleet.agent_json(uid(1)).unwrap();
        let name = a["service_name"].as_str().unwrap();
        assert_eq!(name.len(), limits.text);
        assert!(a["truncated"]["identifying_attributes"].is_string());
        assert!(a.to_string().len() < 64 * 1024);
    }

    #[test]
    fn effective_config_bodies_are_cut_copied_and_forgotten_with_departed_agents() {
        let (clock, secs) = clock();
        let limits = Limits {
            effective_config_bytes: 64 * 1024,
            ..Limits::default()
        };
        let fleet = Fleet::new(limits.clone(), clock);
        // Eight agents with 40 MiB effective configs, decoded from one wire buffer each.
        let big = Bytes::from(vec![b'a'; 40 << 20]);
        for n in 0..8 {
            let wire = Bytes::from(with_config(n, big.clone()).encode_to_vec());
            let msg = AgentToServer::decode(wire.clone()).unwrap();
            fleet.report(uid(n), &msg);
            let a = fleet.agent_json(uid(n)).unwrap();
            let body = a["effective_config"][""]["body"].as_str().unwrap();
            assert_eq!(body.len(), 64 * 1024 - a_config_overhead());
            assert!(
                a["truncated"]["effective_config"]
                    .as_str()
                    .unwrap()
                    .contains("cut")
            );
            // What is kept is a copy: the wire buffer is not pinned by the store.
            let inner = fleet.lock();
            let kept = &inner.agents[&uid(n)]
                .effective_config
                .as_ref()
                .unwrap()
                .config_map[""];
            let range = wire.as_ptr() as usize..wire.as_ptr() as usize + wire.len();
            assert!(!range.contains(&(kept.body.as_ptr() as usize)));
        }
        let accounted = fleet.accounted_bytes();
        assert!(accounted <= 8 * limits.agent_bytes(), "{accounted}");
        assert!(
            accounted >= 8 * 60 * 1024,
            "{accounted}: the bodies are accounted"
        );
        for n in 0..8 {
            leave(&fleet, n);
        }
        assert_eq!(fleet.len(), 8, "departed agents are remembered a while");
        secs.fetch_add(limits.departed_ttl.as_secs() + 1, Ordering::SeqCst);
        assert_eq!(fleet.list_json().as_array().unwrap().len(), 0);
        assert_eq!(fleet.len(), 0);
        assert_eq!(
            fleet.accounted_bytes(),
            0,
            "nothing is kept of departed agents"
        );
    }

    /// The fixed part of one config object counted against the effective-config budget.
    fn a_config_overhead() -> usize {
        size_of::<AgentConfigObject>() + size_of::<String>() + "text/yaml".len()
    }

    fn cs_status(hash: &[u8], status: ConnectionSettingsStatuses, msg: &str) -> AgentToServer {
        AgentToServer {
            capabilities: (AgentCapabilitySet::REPORTS_STATUS
                | AgentCapabilitySet::ACCEPTS_OPAMP_CONNECTION_SETTINGS
                | AgentCapabilitySet::REPORTS_CONNECTION_SETTINGS_STATUS)
                .bits(),
            connection_settings_status: Some(ConnectionSettingsStatus {
                last_connection_settings_hash: Bytes::copy_from_slice(hash),
                status: status as i32,
                error_message: msg.into(),
            }),
            ..report(1)
        }
    }

    #[test]
    fn css_1_css_2_an_offer_rides_on_replies_until_reported_and_the_status_is_bounded_and_saved() {
        use opamp::server::connection_settings::{ConnectionSettingsOffer, OpampSettings};
        let fleet = Fleet::default();
        let limits = Limits::default();
        // CS-OP-1: not to an agent without AcceptsOpAMPConnectionSettings.
        fleet.report(uid(1), &report(1));
        let offers = ConnectionSettingsOffer::new()
            .opamp(OpampSettings::new().endpoint("ws://b:4320/v1/opamp"))
            .build();
        assert!(
            fleet
                .offer_connection_settings(uid(1), offers.clone())
                .is_err()
        );
        assert!(
            fleet
                .offer_connection_settings(uid(9), offers.clone())
                .is_err(),
            "unknown agent"
        );
        fleet.report(
            uid(1),
            &cs_status(b"", ConnectionSettingsStatuses::Unset, ""),
        );
        let push = fleet
            .offer_connection_settings(uid(1), offers.clone())
            .unwrap();
        assert_eq!(push.connection_settings.as_ref(), Some(&offers));
        // CSS-2: repeated until the agent reports its hash.
        let plain = AgentToServer {
            connection_settings_status: None,
            ..cs_status(b"", ConnectionSettingsStatuses::Unset, "")
        };
        let reply = fleet.report(uid(1), &plain).unwrap();
        assert_eq!(reply.connection_settings.as_ref(), Some(&offers));
        let applying = cs_status(&offers.hash, ConnectionSettingsStatuses::Applying, "");
        assert!(fleet.report(uid(1), &applying).is_none());
        let v = fleet.agent_json(uid(1)).unwrap();
        assert_eq!(v["connection_settings_offer"]["state"], "APPLYING");
        assert_eq!(
            v["connection_settings_offer"]["endpoint"],
            "ws://b:4320/v1/opamp"
        );
        // FAILED with a reason from the wire far over the limit: cut, and named.
        let long = "x".repeat(1 << 20);
        let failed = cs_status(&offers.hash, ConnectionSettingsStatuses::Failed, &long);
        assert!(fleet.report(uid(1), &failed).is_none(), "not offered again");
        let v = fleet.agent_json(uid(1)).unwrap();
        let s = &v["connection_settings_status"];
        assert_eq!(s["status"], "FAILED");
        assert_eq!(s["hash"], hex(&offers.hash));
        assert_eq!(s["error_message"].as_str().unwrap().len(), limits.text);
        assert!(v["truncated"]["connection_settings_status.error_message"].is_string());
        assert_eq!(v["connection_settings_offer"]["state"], "FAILED");
        assert!(fleet.accounted_bytes() < limits.agent_bytes());
        // The reported status is saved with the record and comes back from it.
        let rows = fleet.take_dirty("n");
        let row = rows.iter().find(|r| r.uid == uid(1).to_string()).unwrap();
        let other = Fleet::default();
        other.restore(uid(1), row);
        let v = other.agent_json(uid(1)).unwrap();
        assert_eq!(v["connection_settings_status"]["status"], "FAILED");
        assert_eq!(
            v["connection_settings_offer"],
            Value::Null,
            "offers are not saved"
        );
    }

    #[test]
    fn departed_agents_are_pruned_by_count_oldest_first() {
        let (clock, secs) = clock();
        let limits = Limits {
            max_departed: 3,
            ..Limits::default()
        };
        let fleet = Fleet::new(limits, clock);
        for n in 0..6 {
            fleet.report(uid(n), &report(n));
        }
        for n in 0..5 {
            secs.fetch_add(1, Ordering::SeqCst);
            leave(&fleet, n);
        }
        let left: Vec<String> = fleet
            .list_json()
            .as_array()
            .unwrap()
            .iter()
            .map(|a| a["service_name"].as_str().unwrap().to_owned())
            .collect();
        assert_eq!(
            left,
            ["a2", "a3", "a4", "a5"],
            "the 3 last to leave and the connected one"
        );
    }

    #[test]
    fn departed_agents_are_pruned_by_age_and_a_returning_agent_is_kept() {
        let (clock, secs) = clock();
        let limits = Limits {
            departed_ttl: Duration::from_secs(60),
            ..Limits::default()
        };
        let fleet = Fleet::new(limits, clock);
        for n in 0..3 {
            fleet.report(uid(n), &report(n));
            leave(&fleet, n);
        }
        secs.fetch_add(30, Ordering::SeqCst);
        fleet.report(uid(1), &report(1)); // back again
        secs.fetch_add(31, Ordering::SeqCst);
        assert_eq!(fleet.list_json().as_array().unwrap().len(), 1);
        assert!(
            fleet.agent_json(uid(1)).unwrap()["connected"]
                .as_bool()
                .unwrap()
        );
        fleet.disconnected(uid(1));
        secs.fetch_add(61, Ordering::SeqCst);
        assert_eq!(fleet.list_json().as_array().unwrap().len(), 0);
        assert_eq!(fleet.accounted_bytes(), 0);
    }

    #[test]
    fn the_fleet_budget_forgets_departed_agents_first_then_refuses_parts() {
        let (clock, secs) = clock();
        let limits = Limits {
            effective_config_bytes: 100_000,
            total_bytes: 350_000,
            ..Limits::default()
        };
        let fleet = Fleet::new(limits.clone(), clock);
        let body = Bytes::from(vec![b'c'; 90_000]);
        for n in 0..3 {
            fleet.report(uid(n), &with_config(n, body.clone()));
        }
        secs.fetch_add(1, Ordering::SeqCst);
        leave(&fleet, 0);
        // A fourth needs room: the departed agent goes.
        fleet.report(uid(3), &with_config(3, body.clone()));
        assert!(fleet.agent_json(uid(0)).is_none());
        assert!(fleet.agent_json(uid(3)).unwrap()["effective_config"].is_object());
        // A fifth finds no departed agent to forget: its config is refused and named.
        fleet.report(uid(4), &with_config(4, body.clone()));
        let a = fleet.agent_json(uid(4)).unwrap();
        assert!(a["effective_config"].is_null());
        assert_eq!(a["truncated"]["effective_config"], FLEET_FULL);
        assert!(fleet.accounted_bytes() <= limits.total_bytes);
    }

    #[test]
    fn the_health_tree_is_bounded_in_depth_and_size() {
        let fleet = Fleet::default();
        let limits = Limits::default();
        // A chain 90 deep, and a root with 100k children.
        let mut chain = ComponentHealth::default();
        for _ in 0..90 {
            let mut parent = ComponentHealth::default();
            parent.component_health_map.insert("c".into(), chain);
            chain = parent;
        }
        let mut wide = ComponentHealth::default();
        for i in 0..100_000 {
            wide.component_health_map
                .insert(format!("component-{i}"), ComponentHealth::default());
        }
        wide.component_health_map.insert("chain".into(), chain);
        let msg = AgentToServer {
            health: Some(wide),
            ..report(1)
        };
        fleet.report(uid(1), &msg);
        let a = fleet.agent_json(uid(1)).unwrap();
        let children = a["health"]["components"].as_object().unwrap().len();
        assert!(children < limits.health_nodes, "{children}");
        fn depth(v: &Value) -> usize {
            v["components"]
                .as_object()
                .map_or(0, |c| c.values().map(|v| 1 + depth(v)).max().unwrap_or(0))
        }
        assert!(depth(&a["health"]) <= limits.health_depth);
        assert!(a["truncated"]["health"].is_string());
        assert!(fleet.accounted_bytes() <= limits.agent_bytes());
    }

    #[test]
    fn package_statuses_are_bounded_and_shown_by_name() {
        use opamp::proto::PackageDownloadDetails;
        let fleet = Fleet::default();
        let limits = Limits::default();
        let mut statuses = PackageStatuses {
            error_message: "e".repeat(1 << 20),
            ..Default::default()
        };
        for i in 0..10_000 {
            statuses.packages.insert(
                format!("p{i:05}"),
                PackageStatus {
                    name: format!("p{i:05}"),
                    agent_has_version: "1".into(),
                    server_offered_version: "2".into(),
                    status: PackageStatusEnum::Downloading as i32,
                    error_message: "x".repeat(1 << 16),
                    download_details: Some(PackageDownloadDetails {
                        download_percent: 42.0,
                        download_bytes_per_second: 1.0,
                    }),
                    ..Default::default()
                },
            );
        }
        let msg = AgentToServer {
            package_statuses: Some(statuses),
            ..report(1)
        };
        fleet.report(uid(1), &msg);
        let a = fleet.agent_json(uid(1)).unwrap();
        let shown = a["package_statuses"].as_object().unwrap();
        assert_eq!(shown.len(), limits.package_statuses);
        let p = &shown["p00000"];
        assert_eq!(p["status"], "DOWNLOADING");
        assert_eq!(p["download_percent"], 42.0);
        assert_eq!(p["agent_has_version"], "1");
        assert_eq!(p["error_message"].as_str().unwrap().len(), limits.text);
        assert!(a["truncated"]["package_statuses"].is_string());
        assert!(fleet.accounted_bytes() <= limits.agent_bytes());
        assert!(
            fleet.accounted_bytes() >= limits.package_statuses * limits.text,
            "the statuses are accounted"
        );
    }

    #[test]
    fn the_listing_is_slim_and_the_agent_has_everything() {
        let fleet = Fleet::default();
        let mut map = AgentConfigMap::single("receivers: {}", "text/yaml");
        map.config_map.get_mut("").unwrap().role = "collector".into();
        let msg = AgentToServer {
            effective_config: Some(EffectiveConfig {
                config_map: Some(map),
            }),
            health: Some(ComponentHealth {
                healthy: true,
                component_health_map: [("x".to_owned(), ComponentHealth::default())].into(),
                ..Default::default()
            }),
            ..report(1)
        };
        fleet.report(uid(1), &msg);
        fleet.offer_to(
            uid(1),
            &remote_config(Bytes::from_static(b"offered: {}"), "text/yaml".into()),
        );
        let list = fleet.list_json();
        let slim = &list[0];
        assert!(!slim.to_string().contains("receivers"), "{slim}");
        assert!(!slim.to_string().contains("offered"), "{slim}");
        assert_eq!(slim["effective_config"][""]["size"], 13);
        assert_eq!(slim["effective_config"][""]["role"], "collector");
        assert!(slim["health"]["healthy"].as_bool().unwrap());
        assert!(slim["health"].get("components").is_none());
        assert!(slim.get("non_identifying_attributes").is_none());
        assert_eq!(slim["identifying_attributes"]["service.name"], "a1");
        assert!(slim["remote_config"]["hash"].is_string());
        let full = fleet.agent_json(uid(1)).unwrap();
        assert_eq!(full["effective_config"][""]["body"], "receivers: {}");
        assert_eq!(full["effective_config"][""]["role"], "collector");
        assert_eq!(full["remote_config"]["config"][""]["body"], "offered: {}");
        assert_eq!(full["remote_config"]["config"][""]["role"], "");
        assert!(full["health"]["components"]["x"].is_object());
        assert_eq!(full["non_identifying_attributes"]["host.name"], "h");
        assert!(full["truncated"].as_object().unwrap().is_empty());
    }
}
