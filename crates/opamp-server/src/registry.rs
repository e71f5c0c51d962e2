//! The live instance uids across connections, for duplicate detection (UID-8).
//!
//! # How detection works
//!
//! Every WebSocket connection and plain-HTTP session *claims* the uid its agent uses, at
//! its first message and whenever the uid changes. A claim of a uid that another live
//! connection holds takes the uid over and marks the other holder *displaced*; nothing else
//! happens yet: the newcomer may well be the same agent reconnecting while the server still
//! believes its old connection alive (a half-open TCP connection, a rebooted host). The
//! proof comes when a displaced holder sends a message: a dead connection never does, so
//! two agents are live under one uid. The application's
//! [`on_duplicate_uid`](crate::ServerCallbacks::on_duplicate_uid) then decides (reassign the
//! newcomer by default). Two plain-HTTP pollers with one uid share one session; its protocol
//! core tells them apart by their sequence numbers ([`AgentSession`](crate::AgentSession),
//! "Duplicate uids").
//!
//! # Cost
//!
//! The map is split into shards by uid, each behind its own lock, taken only when a claim
//! is made or released (once per connection, or per uid change); the per-message check is
//! one atomic load of the holder's own flag.

use std::collections::HashMap;
use std::sync::atomic::{AtomicU8, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};

use opamp_proto::{AgentIdentification, InstanceUid, ServerToAgent};

use crate::callbacks::DuplicateUid;
use crate::connection::Connection;
use crate::core::DuplicateUidPolicy;
use crate::service::Shared;

/// Number of shards; a power of two.
const SHARDS: usize = 64;

/// The live uid claims of one server.
pub(crate) struct UidRegistry {
    shards: Box<[Mutex<HashMap<InstanceUid, Holder>>]>,
}

struct Holder {
    conn: Connection,
    flag: Arc<AtomicU8>,
}

/// The claim holds the uid (or shares it with the application's consent).
const HOLDING: u8 = 0;
/// Another live connection claimed the uid since.
const DISPLACED: u8 = 1;
/// This connection lost a duplicate dispute: it was told to switch uid, or disconnected.
const EVICTED: u8 = 2;

/// A connection's claim on a uid; [`UidRegistry::release`] gives it back.
#[derive(Debug)]
pub(crate) struct Claim {
    uid: InstanceUid,
    state: Arc<AtomicU8>,
}

impl Claim {
    pub(crate) fn uid(&self) -> InstanceUid {
        self.uid
    }

    /// Another live connection took this uid after this one claimed it, and this one was
    /// not told to leave it: a message now proves two live agents (UID-8).
    pub(crate) fn is_displaced(&self) -> bool {
        self.state.load(Ordering::Relaxed) == DISPLACED
    }
}

/// The other side of a duplicate: the live connection that holds the uid now.
pub(crate) struct Rival {
    pub(crate) conn: Connection,
    state: Arc<AtomicU8>,
}

fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|poisoned| poisoned.into_inner())
}

impl Default for UidRegistry {
    fn default() -> Self {
        Self {
            shards: (0..SHARDS).map(|_| Mutex::default()).collect(),
        }
    }
}

impl UidRegistry {
    fn shard(&self, uid: &InstanceUid) -> &Mutex<HashMap<InstanceUid, Holder>> {
        // The last byte: random in a UUID v7 (the first ones are a timestamp).
        &self.shards[usize::from(uid.as_array()[15]) % SHARDS]
    }

    /// Claims `uid` for `conn`; a live other holder is marked displaced.
    pub(crate) fn claim(&self, uid: InstanceUid, conn: &Connection) -> Claim {
        let flag = Arc::new(AtomicU8::new(HOLDING));
        let previous = lock(self.shard(&uid)).insert(
            uid,
            Holder {
                conn: conn.clone(),
                flag: flag.clone(),
            },
        );
        if let Some(previous) = previous
            && !previous.conn.is_closed()
            && !previous.conn.same_connection(conn)
        {
            // An evicted holder stays evicted: it was already told to leave the uid.
            let _ = previous.flag.compare_exchange(
                HOLDING,
                DISPLACED,
                Ordering::Relaxed,
                Ordering::Relaxed,
            );
        }
        Claim { uid, state: flag }
    }

    /// The live connection that holds `uid`, unless it is `except`.
    pub(crate) fn rival(&self, uid: &InstanceUid, except: &Connection) -> Option<Rival> {
        lock(self.shard(uid))
            .get(uid)
            .filter(|h| !h.conn.is_closed() && !h.conn.same_connection(except))
            .map(|h| Rival {
                conn: h.conn.clone(),
                state: h.flag.clone(),
            })
    }

    /// The live connection that holds `uid` now, if any.
    pub(crate) fn get(&self, uid: &InstanceUid) -> Option<Connection> {
        lock(self.shard(uid))
            .get(uid)
            .filter(|h| !h.conn.is_closed())
            .map(|h| h.conn.clone())
    }

    /// Every live connection that holds a uid, one per uid.
    pub(crate) fn all(&self) -> Vec<Connection> {
        self.shards
            .iter()
            .flat_map(|shard| {
                lock(shard)
                    .values()
                    .filter(|h| !h.conn.is_closed())
                    .map(|h| h.conn.clone())
                    .collect::<Vec<_>>()
            })
            .collect()
    }

    /// The claim's holder shares the uid with the current holder (the application allowed
    /// it): no more disputes between these two.
    pub(crate) fn tolerate(&self, claim: &Claim) {
        claim.state.store(HOLDING, Ordering::Relaxed);
    }

    /// Takes the uid back for `claim`'s connection from `rival`, which lost the dispute.
    pub(crate) fn win(&self, claim: &mut Claim, conn: &Connection, rival: &Rival) {
        *claim = self.claim(claim.uid, conn);
        rival.state.store(EVICTED, Ordering::Relaxed);
    }

    /// Gives the claim back, if it is still the uid's holder.
    pub(crate) fn release(&self, claim: &Claim) {
        let mut shard = lock(self.shard(&claim.uid));
        if shard
            .get(&claim.uid)
            .is_some_and(|h| Arc::ptr_eq(&h.flag, &claim.state))
        {
            shard.remove(&claim.uid);
        }
    }
}

/// A displaced holder (`conn`, holding `claim`) sent a message: two agents are live under
/// one uid (UID-8). Asks the application and applies its answer to the newcomer.
pub(crate) async fn resolve(shared: &Shared, conn: &Connection, claim: &mut Claim) {
    let uid = claim.uid();
    let Some(rival) = shared.uids.rival(&uid, conn) else {
        // The newcomer is gone already: take the uid back.
        *claim = shared.uids.claim(uid, conn);
        return;
    };
    let duplicate = DuplicateUid {
        instance_uid: uid,
        kept: conn.clone(),
        newcomer: Some(rival.conn.clone()),
    };
    let policy = shared.callbacks.on_duplicate_uid(&duplicate).await;
    tracing::info!(instance_uid = %uid, ?policy, "duplicate instance uid (UID-8)");
    match policy {
        DuplicateUidPolicy::Allow => shared.uids.tolerate(claim),
        DuplicateUidPolicy::Reject => {
            shared.uids.win(claim, conn, &rival);
            rival.conn.disconnect();
        }
        // Reassign, and any policy added later.
        _ => {
            shared.uids.win(claim, conn, &rival);
            // Goes through the newcomer's own session, which follows it to the new uid
            // (UID-7); if its queue is full or it closed, it is simply not reassigned.
            let _ = rival.conn.send(ServerToAgent {
                agent_identification: Some(AgentIdentification {
                    new_instance_uid: InstanceUid::new_v7().to_bytes(),
                }),
                ..ServerToAgent::default()
            });
        }
    }
}

/// Keeps `claim` on the uid a connection's agent uses now (`uid`, from its latest message):
/// claims it at the first message and when it changes. Returns whether the claim was
/// displaced: then call [`resolve`] (the message proves a duplicate).
pub(crate) fn note(
    shared: &Shared,
    conn: &Connection,
    claim: &mut Option<Claim>,
    uid: InstanceUid,
) -> bool {
    match claim {
        Some(c) if c.uid() == uid => c.is_displaced(),
        _ => {
            if let Some(old) = claim.take() {
                shared.uids.release(&old);
            }
            *claim = Some(shared.uids.claim(uid, conn));
            false
        }
    }
}
