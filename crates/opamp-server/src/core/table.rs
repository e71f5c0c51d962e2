//! The plain-HTTP session table, free of I/O ([`SessionTable`]).

use std::collections::{HashMap, VecDeque};
use std::net::SocketAddr;
use std::time::{Duration, Instant};

use opamp_proto::InstanceUid;

use crate::admission::SourceBuckets;
use crate::config::MAX_TIMEOUT;

/// Polls after which a session's agent is known (it came back): admission never evicts it.
const KNOWN_AFTER_POLLS: u8 = 2;

/// The rules of a [`SessionTable`]; the drivers derive them from the
/// [`ServerConfig`](crate::ServerConfig).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[non_exhaustive]
pub struct TableConfig {
    /// Sessions at most (THR-5).
    pub max_sessions: usize,
    /// A session without a request for this long ends (HB-5), unless the agent was offered
    /// a longer polling interval (see [`SessionTable::set_polling_interval`]).
    pub idle_timeout: Duration,
    /// An agent offered a polling interval keeps its session this many intervals (HB-5).
    pub heartbeat_timeout_factor: u32,
    /// New sessions one source address may open at once.
    pub new_session_burst: u32,
    /// New sessions per second one source address may open after its burst.
    pub new_session_rate: u32,
}

impl Default for TableConfig {
    /// The rules of the default [`ServerConfig`](crate::ServerConfig): 100 000 sessions,
    /// 120 s idle timeout, 3 polling intervals, 1000 new sessions per source at once and
    /// 100 per second after.
    fn default() -> Self {
        Self::from_server_config(&crate::ServerConfig::default())
    }
}

impl TableConfig {
    /// The rules of `config`.
    pub fn from_server_config(config: &crate::ServerConfig) -> Self {
        Self {
            max_sessions: config.max_http_sessions(),
            idle_timeout: config.http_idle_timeout(),
            heartbeat_timeout_factor: config.limits().heartbeat_timeout_factor(),
            new_session_burst: config.http_new_session_burst(),
            new_session_rate: config.http_new_session_rate(),
        }
    }
}

/// Why [`SessionTable::admit`] created no session.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[non_exhaustive]
pub enum Refusal {
    /// `max_sessions` are alive, all of known agents (THR-5: 503 with `Retry-After`).
    Full,
    /// The source address spent its new-session budget; one is available after this long
    /// (THR-5: 429 with `Retry-After`).
    RateLimited(Duration),
}

/// Why a session left the table.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[non_exhaustive]
pub enum EndReason {
    /// No request within its idle limit (HB-5).
    Idle,
    /// Its place went to a new session (admission, step 2).
    Evicted,
    /// A new session took its uid (the old one was closed).
    Replaced,
    /// The driver removed it ([`SessionTable::remove`], [`SessionTable::retain`]).
    Removed,
}

/// A session that left the table, from [`SessionTable::poll_event`]: end it (the
/// application's `on_connection_close`).
#[derive(Debug)]
#[non_exhaustive]
pub struct TableEvent<V> {
    /// The driver's handle of the session.
    pub session: V,
    /// Why it left.
    pub reason: EndReason,
}

#[derive(Debug)]
struct Entry<V> {
    value: V,
    /// The uids that find this session: its agent's, and a uid assigned to it (UID-5).
    uids: [Option<InstanceUid>; 2],
    last_request: Instant,
    /// The idle limit: `idle_timeout`, or more after an offered polling interval (HB-5).
    idle_limit: Duration,
    polls: u8,
}

/// The plain-HTTP session table, free of I/O: beside the per-agent [`AgentSession`]s as
/// quinn's `Endpoint` is beside its `Connection`s.
///
/// Plain HTTP has no connection: a session per instance uid stands in for it, found by the
/// uid of each request (HTTP-1, HTTP-5). The table owns the rules about these sessions:
/// which uid finds which session (also under a uid the server assigned, UID-5, UID-7), how
/// many there may be and who gets a place when they are all taken (THR-5, see
/// [admission](#admission)), and when an idle one ends (HB-5). It holds the driver's handle
/// of each session (`V`, e.g. an `Arc` of the session's state) and hands ended ones back
/// as [`TableEvent`]s; the clock is the driver's (`now`), the table reads none.
///
/// # Admission
///
/// 1. **Known agents are never displaced.** A session that has served two polls or more
///    belongs to an agent that came back; only the idle timeout, `agent_disconnect` or the
///    application end it.
/// 2. **Strangers make room for each other.** A session that has served one poll only is
///    on probation. When the table is full, a new session takes the place of the oldest
///    one on probation (it is ended) instead of being refused; only a table full of known
///    agents refuses ([`Refusal::Full`], 503, THR-5).
/// 3. **New sessions are rate-limited per source address** (a token bucket per IP address,
///    per /64 for IPv6): [`TableConfig::new_session_burst`] at once, then
///    [`TableConfig::new_session_rate`] per second; over it, [`Refusal::RateLimited`] (429
///    with `Retry-After`, THR-5).
///
/// [`AgentSession`]: super::AgentSession
#[derive(Debug)]
pub struct SessionTable<V> {
    config: TableConfig,
    entries: HashMap<u64, Entry<V>>,
    by_uid: HashMap<InstanceUid, u64>,
    next_id: u64,
    /// Sessions on probation (one poll so far), oldest first; ids that ended or became
    /// known are skipped when reached and pruned at each sweep.
    probation: VecDeque<u64>,
    sources: SourceBuckets,
    next_sweep: Option<Instant>,
    events: VecDeque<TableEvent<V>>,
}

impl<V: Clone> SessionTable<V> {
    /// An empty table.
    pub fn new(config: TableConfig) -> Self {
        Self {
            config,
            entries: HashMap::new(),
            by_uid: HashMap::new(),
            next_id: 0,
            probation: VecDeque::new(),
            sources: SourceBuckets::default(),
            next_sweep: None,
            events: VecDeque::new(),
        }
    }

    /// The rules of this table.
    pub fn config(&self) -> &TableConfig {
        &self.config
    }

    /// The session `uid` finds.
    pub fn get(&self, uid: &InstanceUid) -> Option<&V> {
        self.by_uid
            .get(uid)
            .and_then(|id| self.entries.get(id))
            .map(|e| &e.value)
    }

    /// Number of sessions.
    pub fn len(&self) -> usize {
        self.entries.len()
    }

    /// Whether the table holds no session.
    pub fn is_empty(&self) -> bool {
        self.entries.is_empty()
    }

    /// Creates a session for `uid`, a request from `source` at `now`, if admission lets it
    /// in (see [admission](SessionTable#admission)); `make` builds the driver's handle. A session
    /// that `uid` finds already is replaced (the driver asks for a new one only when that
    /// one is closed) and handed back as [`EndReason::Replaced`]. `evictable` says whether a
    /// stranger's session may be evicted now (e.g. not while it serves a request); an
    /// evicted one is handed back as [`EndReason::Evicted`].
    pub fn admit(
        &mut self,
        now: Instant,
        uid: InstanceUid,
        source: Option<SocketAddr>,
        make: impl FnOnce() -> V,
        mut evictable: impl FnMut(&V) -> bool,
    ) -> Result<V, Refusal> {
        self.schedule(now);
        // The source's budget first: a refused stranger displaces nobody.
        self.sources
            .take(
                source,
                now,
                self.config.new_session_burst,
                self.config.new_session_rate,
            )
            .map_err(Refusal::RateLimited)?;
        if let Some(&old) = self.by_uid.get(&uid) {
            self.end(old, EndReason::Replaced);
        }
        if self.entries.len() >= self.config.max_sessions {
            // Full: take the place of the oldest stranger (one poll, never seen again).
            let mut freed = false;
            while let Some(id) = self.probation.pop_front() {
                if let Some(e) = self.entries.get(&id)
                    && e.polls < KNOWN_AFTER_POLLS
                    && evictable(&e.value)
                {
                    self.end(id, EndReason::Evicted);
                    freed = true;
                    break;
                }
            }
            if !freed {
                return Err(Refusal::Full);
            }
        }
        let id = self.next_id;
        self.next_id += 1;
        let value = make();
        self.entries.insert(
            id,
            Entry {
                value: value.clone(),
                uids: [Some(uid), None],
                last_request: now,
                idle_limit: self.config.idle_timeout,
                polls: 0,
            },
        );
        self.by_uid.insert(uid, id);
        self.probation.push_back(id);
        if self.probation.len() > self.config.max_sessions.saturating_mul(2) {
            self.prune_probation();
        }
        Ok(value)
    }

    /// A request reached the session `uid` finds, at `now`: its idle time starts over, and
    /// from its second poll its agent is known (never evicted).
    pub fn handle_request(&mut self, now: Instant, uid: &InstanceUid) {
        if let Some(e) = self.by_uid.get(uid).and_then(|id| self.entries.get_mut(id)) {
            e.last_request = now;
            e.polls = e.polls.saturating_add(1).min(KNOWN_AFTER_POLLS);
        }
    }

    /// HB-5: the agent of the session `uid` finds was offered this polling interval
    /// (`heartbeat_interval_seconds`); its session then lives
    /// [`heartbeat_timeout_factor`](TableConfig::heartbeat_timeout_factor) intervals
    /// without a request, as a WebSocket agent does, and at least
    /// [`idle_timeout`](TableConfig::idle_timeout).
    pub fn set_polling_interval(&mut self, uid: &InstanceUid, interval: Duration) {
        let idle = interval
            .saturating_mul(self.config.heartbeat_timeout_factor)
            .min(MAX_TIMEOUT)
            .max(self.config.idle_timeout);
        if let Some(e) = self.by_uid.get(uid).and_then(|id| self.entries.get_mut(id)) {
            e.idle_limit = idle;
        }
    }

    /// The session `uid` finds is also found by `other` from now on: a uid the server
    /// assigned (UID-5), which the agent's next poll carries. A session has two uids at
    /// most; a third replaces the older alias.
    pub fn add_uid(&mut self, uid: &InstanceUid, other: InstanceUid) {
        let Some(&id) = self.by_uid.get(uid) else {
            return;
        };
        if self.by_uid.get(&other) == Some(&id) {
            return;
        }
        if let Some(&elsewhere) = self.by_uid.get(&other) {
            // The uid finds another session: that one ends (its agent uses it no more).
            self.end(elsewhere, EndReason::Replaced);
        }
        let Some(e) = self.entries.get_mut(&id) else {
            return;
        };
        // `uid` stays; `other` takes the other place (an older alias leaves).
        let other_slot = if e.uids[0] == Some(*uid) { 1 } else { 0 };
        if let Some(old) = e.uids[other_slot].replace(other)
            && self.by_uid.get(&old) == Some(&id)
        {
            self.by_uid.remove(&old);
        }
        self.by_uid.insert(other, id);
    }

    /// The session no longer answers to `uid` (UID-7: the agent switched to the assigned
    /// uid; the old one is free).
    pub fn remove_uid(&mut self, uid: &InstanceUid) {
        let Some(id) = self.by_uid.remove(uid) else {
            return;
        };
        if let Some(e) = self.entries.get_mut(&id) {
            for u in &mut e.uids {
                if *u == Some(*uid) {
                    *u = None;
                }
            }
            if e.uids.iter().all(Option::is_none) {
                // No uid finds it any more: it has ended.
                self.end(id, EndReason::Removed);
            }
        }
    }

    /// Removes the session `uid` finds, under all its uids (DIS-2: the agent said goodbye);
    /// it is handed back as [`EndReason::Removed`].
    pub fn remove(&mut self, uid: &InstanceUid) {
        if let Some(&id) = self.by_uid.get(uid) {
            self.end(id, EndReason::Removed);
        }
    }

    /// Removes the sessions `keep` refuses (e.g. closed by the application); they are handed
    /// back as [`EndReason::Removed`].
    pub fn retain(&mut self, mut keep: impl FnMut(&V) -> bool) {
        let gone: Vec<u64> = self
            .entries
            .iter()
            .filter(|(_, e)| !keep(&e.value))
            .map(|(id, _)| *id)
            .collect();
        for id in gone {
            self.end(id, EndReason::Removed);
        }
    }

    /// Removes every session (server shutdown), handed back as [`EndReason::Removed`].
    pub fn clear(&mut self) {
        self.retain(|_| false);
    }

    /// Ends the sessions idle past their limit (HB-5) when the sweep is due.
    pub fn handle_timeout(&mut self, now: Instant) {
        if self.next_sweep.is_none_or(|at| now < at) {
            return;
        }
        self.next_sweep = None;
        let expired: Vec<u64> = self
            .entries
            .iter()
            .filter(|(_, e)| now.saturating_duration_since(e.last_request) > e.idle_limit)
            .map(|(id, _)| *id)
            .collect();
        for id in expired {
            self.end(id, EndReason::Idle);
        }
        self.prune_probation();
        if !self.entries.is_empty() {
            self.schedule(now);
        }
    }

    /// When [`handle_timeout`](Self::handle_timeout) next has something to do: the next
    /// sweep, every quarter of the idle timeout while there are sessions. A session thus
    /// ends between its idle limit and a quarter of the idle timeout later.
    #[must_use]
    pub fn poll_timeout(&self) -> Option<Instant> {
        self.next_sweep
    }

    /// The next session that left the table.
    #[must_use]
    pub fn poll_event(&mut self) -> Option<TableEvent<V>> {
        self.events.pop_front()
    }

    /// Plans a sweep a quarter of the idle timeout from `now`, unless one is planned.
    fn schedule(&mut self, now: Instant) {
        if self.next_sweep.is_none() {
            let period = (self.config.idle_timeout / 4).max(Duration::from_millis(10));
            self.next_sweep = Some(now + period);
        }
    }

    fn end(&mut self, id: u64, reason: EndReason) {
        if let Some(e) = self.entries.remove(&id) {
            for uid in e.uids.iter().flatten() {
                if self.by_uid.get(uid) == Some(&id) {
                    self.by_uid.remove(uid);
                }
            }
            self.events.push_back(TableEvent {
                session: e.value,
                reason,
            });
        }
    }

    fn prune_probation(&mut self) {
        let entries = &self.entries;
        self.probation
            .retain(|id| entries.get(id).is_some_and(|e| e.polls < KNOWN_AFTER_POLLS));
    }
}

#[cfg(test)]
mod tests;
