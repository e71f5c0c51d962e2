//! Duplicate-uid detection across connections (UID-8), free of I/O ([`UidRegistry`]).

use std::collections::HashMap;
use std::fmt;
use std::sync::atomic::{AtomicU8, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};

use opamp_proto::InstanceUid;

use super::DuplicateUidPolicy;

/// The driver's handle of a connection (or plain-HTTP session), as the registry needs it.
pub trait UidHolder: Clone {
    /// Whether the connection is closed: a closed holder is never a rival.
    fn is_closed(&self) -> bool;
    /// Whether two handles refer to the same connection.
    fn same_holder(&self, other: &Self) -> bool;
}

/// Number of shards; a power of two.
const SHARDS: usize = 64;

/// The live instance uids across connections, for duplicate detection (UID-8), free of
/// I/O: generic over the driver's connection handle ([`UidHolder`]).
///
/// # How detection works
///
/// Every WebSocket connection and plain-HTTP session *claims* the uid its agent uses, at
/// its first message and whenever the uid changes ([`UidRegistry::note`]). A claim of a uid
/// that another live connection holds takes the uid over and marks the other holder
/// *displaced*; nothing else happens yet: the newcomer may well be the same agent
/// reconnecting while the server still believes its old connection alive (a half-open TCP
/// connection, a rebooted host). The proof comes when a displaced holder sends a message
/// (`note` returns `true`): a dead connection never does, so two agents are live under one
/// uid. The application's [`DuplicateUidPolicy`] then decides, and
/// [`UidRegistry::resolve`] says what to do with the newcomer. Two plain-HTTP pollers with
/// one uid share one session; its protocol core tells them apart by their sequence numbers
/// ([`AgentSession`](super::AgentSession), "Duplicate uids").
///
/// # Cost
///
/// The map is split into shards by uid, each behind its own lock, taken only when a claim
/// is made or released (once per connection, or per uid change); the per-message check is
/// one atomic load of the holder's own flag.
pub struct UidRegistry<H> {
    shards: Box<[Shard<H>]>,
}

type Shard<H> = Mutex<HashMap<InstanceUid, Holder<H>>>;

impl<H> fmt::Debug for UidRegistry<H> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("UidRegistry").finish_non_exhaustive()
    }
}

struct Holder<H> {
    conn: H,
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
pub struct Claim {
    uid: InstanceUid,
    state: Arc<AtomicU8>,
}

impl Claim {
    /// The claimed uid.
    pub fn uid(&self) -> InstanceUid {
        self.uid
    }

    /// Another live connection took this uid after this one claimed it, and this one was
    /// not told to leave it: a message now proves two live agents (UID-8).
    pub fn is_displaced(&self) -> bool {
        self.state.load(Ordering::Relaxed) == DISPLACED
    }
}

/// The other side of a duplicate: the live connection that holds the uid now.
#[derive(Debug)]
pub struct Rival<H> {
    /// Its handle.
    pub conn: H,
    state: Arc<AtomicU8>,
}

/// What to do with the newcomer of a duplicate, from [`UidRegistry::resolve`].
#[derive(Debug)]
#[non_exhaustive]
pub enum Resolution<H> {
    /// Nothing: the agents share the uid (`Allow`).
    Share,
    /// Close the newcomer's connection (`Reject`).
    Disconnect(H),
    /// Send the newcomer `agent_identification.new_instance_uid` with a fresh uid through
    /// its own session (`Reassign`, UID-8, UID-7); if it cannot take it, it is simply not
    /// reassigned.
    Reassign(H),
}

fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|poisoned| poisoned.into_inner())
}

impl<H> Default for UidRegistry<H> {
    fn default() -> Self {
        Self {
            shards: (0..SHARDS).map(|_| Mutex::default()).collect(),
        }
    }
}

impl<H: UidHolder> UidRegistry<H> {
    fn shard(&self, uid: &InstanceUid) -> &Shard<H> {
        // The last byte: random in a UUID v7 (the first ones are a timestamp).
        &self.shards[usize::from(uid.as_array()[15]) % SHARDS]
    }

    /// Claims `uid` for `conn`; a live other holder is marked displaced.
    pub fn claim(&self, uid: InstanceUid, conn: &H) -> Claim {
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
            && !previous.conn.same_holder(conn)
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

    /// Keeps `claim` on the uid a connection's agent uses now (`uid`, from its latest
    /// message): claims it at the first message and when it changes. Returns whether the
    /// claim was displaced: the message proves a duplicate; ask the application and
    /// [`resolve`](Self::resolve).
    pub fn note(&self, claim: &mut Option<Claim>, uid: InstanceUid, conn: &H) -> bool {
        match claim {
            Some(c) if c.uid() == uid => c.is_displaced(),
            _ => {
                if let Some(old) = claim.take() {
                    self.release(&old);
                }
                *claim = Some(self.claim(uid, conn));
                false
            }
        }
    }

    /// The live connection that holds `uid`, unless it is `except`.
    pub fn rival(&self, uid: &InstanceUid, except: &H) -> Option<Rival<H>> {
        lock(self.shard(uid))
            .get(uid)
            .filter(|h| !h.conn.is_closed() && !h.conn.same_holder(except))
            .map(|h| Rival {
                conn: h.conn.clone(),
                state: h.flag.clone(),
            })
    }

    /// Applies the application's `policy` to a duplicate that `conn` (holding the
    /// displaced `claim`) proved: the older connection keeps the uid unless the agents may
    /// share it; `rival` is the newcomer ([`rival`](Self::rival); `None` when it is gone:
    /// the uid is simply taken back).
    pub fn resolve(
        &self,
        claim: &mut Claim,
        conn: &H,
        rival: Option<&Rival<H>>,
        policy: DuplicateUidPolicy,
    ) -> Resolution<H> {
        let Some(rival) = rival else {
            *claim = self.claim(claim.uid, conn);
            return Resolution::Share;
        };
        match policy {
            DuplicateUidPolicy::Allow => {
                // No more disputes between these two.
                claim.state.store(HOLDING, Ordering::Relaxed);
                Resolution::Share
            }
            DuplicateUidPolicy::Reject => {
                self.win(claim, conn, rival);
                Resolution::Disconnect(rival.conn.clone())
            }
            DuplicateUidPolicy::Reassign => {
                self.win(claim, conn, rival);
                Resolution::Reassign(rival.conn.clone())
            }
        }
    }

    /// The live connection that holds `uid` now, if any.
    pub fn get(&self, uid: &InstanceUid) -> Option<H> {
        lock(self.shard(uid))
            .get(uid)
            .filter(|h| !h.conn.is_closed())
            .map(|h| h.conn.clone())
    }

    /// Every live connection that holds a uid, one per uid.
    pub fn all(&self) -> Vec<H> {
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

    /// Takes the uid back for `claim`'s connection from `rival`, which lost the dispute.
    fn win(&self, claim: &mut Claim, conn: &H, rival: &Rival<H>) {
        *claim = self.claim(claim.uid, conn);
        rival.state.store(EVICTED, Ordering::Relaxed);
    }

    /// Gives the claim back, if it is still the uid's holder.
    pub fn release(&self, claim: &Claim) {
        let mut shard = lock(self.shard(&claim.uid));
        if shard
            .get(&claim.uid)
            .is_some_and(|h| Arc::ptr_eq(&h.flag, &claim.state))
        {
            shard.remove(&claim.uid);
        }
    }
}

#[cfg(test)]
mod tests {
    use std::sync::atomic::AtomicBool;

    use super::*;

    /// A connection handle: a number and whether it closed.
    #[derive(Clone, Debug)]
    struct Conn(Arc<(u8, AtomicBool)>);

    impl Conn {
        fn new(n: u8) -> Self {
            Self(Arc::new((n, AtomicBool::new(false))))
        }
        fn close(&self) {
            self.0.1.store(true, Ordering::Relaxed);
        }
        fn n(&self) -> u8 {
            self.0.0
        }
    }

    impl UidHolder for Conn {
        fn is_closed(&self) -> bool {
            self.0.1.load(Ordering::Relaxed)
        }
        fn same_holder(&self, other: &Self) -> bool {
            Arc::ptr_eq(&self.0, &other.0)
        }
    }

    const UID: InstanceUid = InstanceUid::from_array([5; 16]);

    /// Connection `old` holds the uid, `new` claims it; then `old` sends again.
    fn dispute(policy: DuplicateUidPolicy) -> (UidRegistry<Conn>, Resolution<Conn>, Option<Claim>) {
        let reg = UidRegistry::default();
        let (old, new) = (Conn::new(1), Conn::new(2));
        let (mut a, mut b) = (None, None);
        assert!(
            !reg.note(&mut a, UID, &old),
            "a first message proves nothing"
        );
        assert!(
            !reg.note(&mut b, UID, &new),
            "the newcomer takes the uid over"
        );
        assert!(
            reg.note(&mut a, UID, &old),
            "UID-8: the displaced one is live"
        );
        let rival = reg.rival(&UID, &old).expect("the newcomer");
        assert_eq!(rival.conn.n(), 2);
        let claim = a.as_mut().expect("claimed");
        let r = reg.resolve(claim, &old, Some(&rival), policy);
        (reg, r, b)
    }

    #[test]
    fn uid_8_a_reconnect_is_not_a_duplicate() {
        let reg = UidRegistry::default();
        let (old, new) = (Conn::new(1), Conn::new(2));
        let (mut a, mut b) = (None, None);
        assert!(!reg.note(&mut a, UID, &old));
        old.close(); // the half-open connection is finally noticed
        assert!(!reg.note(&mut b, UID, &new));
        assert!(!reg.note(&mut b, UID, &new));
        assert_eq!(reg.get(&UID).map(|c| c.n()), Some(2));
    }

    #[test]
    fn uid_8_reassign_tells_the_newcomer_and_the_older_keeps_the_uid() {
        let (reg, r, newcomer) = dispute(DuplicateUidPolicy::Reassign);
        assert!(matches!(r, Resolution::Reassign(c) if c.n() == 2));
        assert_eq!(reg.get(&UID).map(|c| c.n()), Some(1));
        // The newcomer lost and was told: its messages under the uid prove nothing more.
        let claim = newcomer.expect("claimed");
        assert!(
            !claim.is_displaced(),
            "evicted, not displaced: no second dispute"
        );
    }

    #[test]
    fn uid_8_reject_disconnects_the_newcomer() {
        let (_, r, _) = dispute(DuplicateUidPolicy::Reject);
        assert!(matches!(r, Resolution::Disconnect(c) if c.n() == 2));
    }

    #[test]
    fn uid_8_allow_shares_the_uid_without_further_disputes() {
        let reg = UidRegistry::default();
        let (old, new) = (Conn::new(1), Conn::new(2));
        let (mut a, mut b) = (None, None);
        let _ = reg.note(&mut a, UID, &old);
        let _ = reg.note(&mut b, UID, &new);
        assert!(reg.note(&mut a, UID, &old));
        let rival = reg.rival(&UID, &old);
        let r = reg.resolve(
            a.as_mut().unwrap(),
            &old,
            rival.as_ref(),
            DuplicateUidPolicy::Allow,
        );
        assert!(matches!(r, Resolution::Share));
        assert!(!reg.note(&mut a, UID, &old), "tolerated");
        assert!(!reg.note(&mut b, UID, &new));
    }

    #[test]
    fn uid_8_a_newcomer_gone_meanwhile_gives_the_uid_back() {
        let reg = UidRegistry::default();
        let (old, new) = (Conn::new(1), Conn::new(2));
        let (mut a, mut b) = (None, None);
        let _ = reg.note(&mut a, UID, &old);
        let _ = reg.note(&mut b, UID, &new);
        new.close();
        assert!(reg.note(&mut a, UID, &old));
        let rival = reg.rival(&UID, &old);
        assert!(rival.is_none());
        let r = reg.resolve(
            a.as_mut().unwrap(),
            &old,
            None,
            DuplicateUidPolicy::Reassign,
        );
        assert!(matches!(r, Resolution::Share));
        assert_eq!(reg.get(&UID).map(|c| c.n()), Some(1));
        reg.release(a.as_ref().unwrap());
        assert!(reg.get(&UID).is_none());
    }
}
