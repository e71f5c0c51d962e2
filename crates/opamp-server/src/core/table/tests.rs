//! The table on a virtual clock: no sockets, no sleeps (the clock's origin is the only real
//! `Instant` here).
use super::*;

fn uid(n: u8) -> InstanceUid {
    InstanceUid::from_array([n; 16])
}

fn config() -> TableConfig {
    TableConfig {
        max_sessions: 3,
        idle_timeout: Duration::from_secs(120),
        heartbeat_timeout_factor: 3,
        new_session_burst: 100,
        new_session_rate: 10,
    }
}

fn addr(n: u8) -> Option<SocketAddr> {
    Some(SocketAddr::from(([10, 0, 0, n], 4000)))
}

/// Admits `uid` as session `n` (the handle is the number) and counts its first poll.
fn admit(t: &mut SessionTable<u8>, now: Instant, n: u8) -> Result<u8, Refusal> {
    let r = t.admit(now, uid(n), addr(1), || n, |_| true);
    if r.is_ok() {
        t.handle_request(now, &uid(n));
    }
    r
}

fn events(t: &mut SessionTable<u8>) -> Vec<(u8, EndReason)> {
    std::iter::from_fn(|| t.poll_event())
        .map(|e| (e.session, e.reason))
        .collect()
}

/// Runs the table's timers up to `until`, as a driver does.
fn run_until(t: &mut SessionTable<u8>, until: Instant) {
    while let Some(at) = t.poll_timeout().filter(|at| *at <= until) {
        t.handle_timeout(at);
    }
}

#[test]
fn hb_5_idle_session_ends_after_the_idle_timeout_and_a_request_restarts_it() {
    let t0 = Instant::now();
    let mut t = SessionTable::new(config());
    admit(&mut t, t0, 1).unwrap();
    admit(&mut t, t0, 2).unwrap();
    assert_eq!(
        t.poll_timeout(),
        Some(t0 + Duration::from_secs(30)),
        "idle / 4"
    );
    // Session 2 polls again at 100 s; session 1 does not.
    run_until(&mut t, t0 + Duration::from_secs(100));
    t.handle_request(t0 + Duration::from_secs(100), &uid(2));
    run_until(&mut t, t0 + Duration::from_secs(120));
    assert!(events(&mut t).is_empty(), "not past the limit yet");
    run_until(&mut t, t0 + Duration::from_secs(150));
    assert_eq!(events(&mut t), [(1, EndReason::Idle)]);
    assert!(t.get(&uid(1)).is_none());
    run_until(&mut t, t0 + Duration::from_secs(250));
    assert_eq!(events(&mut t), [(2, EndReason::Idle)]);
    assert!(t.is_empty());
    assert_eq!(t.poll_timeout(), None, "no sessions, no sweeps");
}

#[test]
fn hb_5_offered_polling_interval_extends_the_idle_limit() {
    let t0 = Instant::now();
    let mut t = SessionTable::new(config());
    admit(&mut t, t0, 1).unwrap();
    admit(&mut t, t0, 2).unwrap();
    // 60 s x 3 = 180 s > 120 s; 10 s x 3 = 30 s < 120 s keeps 120 s.
    t.set_polling_interval(&uid(1), Duration::from_secs(60));
    t.set_polling_interval(&uid(2), Duration::from_secs(10));
    run_until(&mut t, t0 + Duration::from_secs(150));
    assert_eq!(events(&mut t), [(2, EndReason::Idle)]);
    run_until(&mut t, t0 + Duration::from_secs(210));
    assert_eq!(events(&mut t), [(1, EndReason::Idle)]);
}

#[test]
fn thr_5_full_table_of_known_agents_refuses_and_strangers_make_room() {
    let t0 = Instant::now();
    let mut t = SessionTable::new(config());
    for n in 1..=2 {
        admit(&mut t, t0, n).unwrap();
        t.handle_request(t0, &uid(n)); // second poll: known
    }
    admit(&mut t, t0, 3).unwrap(); // a stranger
    // Full: the stranger makes room for the next one, and so on.
    admit(&mut t, t0, 4).unwrap();
    assert_eq!(events(&mut t), [(3, EndReason::Evicted)]);
    admit(&mut t, t0, 5).unwrap();
    assert_eq!(events(&mut t), [(4, EndReason::Evicted)]);
    assert_eq!(t.len(), 3);
    // A stranger that is busy (not evictable) keeps its place: refused.
    assert_eq!(
        t.admit(t0, uid(6), addr(1), || 6, |_| false),
        Err(Refusal::Full)
    );
    // Known agents are never evicted.
    t.handle_request(t0, &uid(5));
    assert_eq!(admit(&mut t, t0, 7), Err(Refusal::Full));
    assert!(events(&mut t).is_empty());
    for n in [1, 2, 5] {
        assert_eq!(t.get(&uid(n)), Some(&n));
    }
}

#[test]
fn thr_5_new_sessions_are_rate_limited_per_source() {
    let t0 = Instant::now();
    let mut t = SessionTable::new(TableConfig {
        max_sessions: 100,
        new_session_burst: 2,
        new_session_rate: 1,
        ..config()
    });
    let from = |t: &mut SessionTable<u8>, now, n, a| t.admit(now, uid(n), addr(a), || n, |_| true);
    assert!(from(&mut t, t0, 1, 1).is_ok());
    assert!(from(&mut t, t0, 2, 1).is_ok());
    assert_eq!(
        from(&mut t, t0, 3, 1),
        Err(Refusal::RateLimited(Duration::from_secs(1)))
    );
    assert!(
        from(&mut t, t0, 4, 2).is_ok(),
        "another source is not affected"
    );
    assert!(
        from(&mut t, t0 + Duration::from_secs(1), 3, 1).is_ok(),
        "refilled"
    );
}

#[test]
fn uid_5_uid_7_assigned_uid_finds_the_session_until_the_old_one_is_dropped() {
    let t0 = Instant::now();
    let mut t = SessionTable::new(config());
    admit(&mut t, t0, 1).unwrap();
    t.add_uid(&uid(1), uid(9));
    assert_eq!(t.get(&uid(9)), Some(&1), "UID-5: the next poll carries it");
    assert_eq!(t.len(), 1, "one session under two uids");
    t.handle_request(t0, &uid(9));
    t.remove_uid(&uid(1)); // UID-7: switched
    assert!(t.get(&uid(1)).is_none());
    assert_eq!(t.get(&uid(9)), Some(&1));
    assert!(events(&mut t).is_empty(), "the session lives on");
    // A uid freed this way can be a new agent's.
    admit(&mut t, t0, 1).unwrap();
    assert_eq!(t.len(), 2);
    // DIS-2: removal takes every uid of the session.
    t.add_uid(&uid(9), uid(8));
    t.remove(&uid(8));
    assert_eq!(events(&mut t), [(1, EndReason::Removed)]);
    assert!(t.get(&uid(9)).is_none() && t.get(&uid(8)).is_none());
    assert_eq!(t.get(&uid(1)), Some(&1), "the other session is untouched");
}

#[test]
fn a_new_session_under_a_taken_uid_replaces_the_old_one() {
    let t0 = Instant::now();
    let mut t = SessionTable::new(config());
    t.admit(t0, uid(1), addr(1), || 10, |_| true).unwrap();
    t.admit(t0, uid(1), addr(1), || 11, |_| true).unwrap();
    assert_eq!(events(&mut t), [(10, EndReason::Replaced)]);
    assert_eq!(t.get(&uid(1)), Some(&11));
    assert_eq!(t.len(), 1);
    t.retain(|v| *v != 11);
    assert_eq!(events(&mut t), [(11, EndReason::Removed)]);
    assert!(t.is_empty());
}

/// Nothing from the wire grows the table without bound: fresh uids at any rate stay
/// within `max_sessions`, and the probation queue stays bounded too.
#[test]
fn a_flood_of_fresh_uids_stays_bounded() {
    let t0 = Instant::now();
    let mut t = SessionTable::new(TableConfig {
        new_session_burst: u32::MAX,
        ..config()
    });
    for n in 0..10_000u32 {
        let mut b = [0xab; 16];
        b[..4].copy_from_slice(&n.to_be_bytes());
        let _ = t.admit(t0, InstanceUid::from_array(b), addr(1), || 0, |_| true);
        assert!(t.len() <= 3);
        assert!(t.probation.len() <= 3 * 2 + 1);
        let _ = events(&mut t);
    }
}
