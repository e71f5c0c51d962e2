//! Per-source token buckets for new plain-HTTP sessions: step 3 of the session table's
//! admission ([`SessionTable`](crate::SessionTable), "Admission").
//!
//! Limits: many agents behind one NAT address share one bucket (raise the burst for
//! them); a flood from very many addresses (more than [`TRACKED_SOURCES`] at once share
//! one overflow bucket) can still evict a new agent's probation session before its second
//! poll, after which it is admitted again as new (not locked out, but not known either).
//! Requests without a known address ([`Connection::remote_addr`](crate::Connection::remote_addr)
//! is `None`) share one bucket.

use std::collections::HashMap;
use std::net::{IpAddr, SocketAddr};
use std::time::{Duration, Instant};

/// Source addresses tracked at once; beyond, new sources share one overflow bucket.
pub(crate) const TRACKED_SOURCES: usize = 4096;

/// Per-source token buckets for new sessions.
#[derive(Debug, Default)]
pub(crate) struct SourceBuckets {
    buckets: HashMap<Option<IpAddr>, Bucket>,
    overflow: Option<Bucket>,
    last_purge: Option<Instant>,
}

#[derive(Debug, Clone, Copy)]
struct Bucket {
    tokens: f64,
    at: Instant,
}

impl Bucket {
    fn full(burst: u32, now: Instant) -> Self {
        Self {
            tokens: f64::from(burst),
            at: now,
        }
    }

    fn refill(&mut self, now: Instant, burst: u32, rate: u32) {
        let elapsed = now.saturating_duration_since(self.at).as_secs_f64();
        self.tokens = (self.tokens + elapsed * f64::from(rate)).min(f64::from(burst));
        self.at = now;
    }

    fn take(&mut self, rate: u32) -> Result<(), Duration> {
        if self.tokens >= 1.0 {
            self.tokens -= 1.0;
            Ok(())
        } else {
            Err(Duration::from_secs_f64(
                (1.0 - self.tokens) / f64::from(rate.max(1)),
            ))
        }
    }
}

/// The bucket key of an address: the IP (an IPv4-mapped IPv6 address as IPv4), IPv6 by
/// /64, which one host typically has in full.
fn source_key(addr: SocketAddr) -> IpAddr {
    match addr.ip() {
        IpAddr::V4(v4) => IpAddr::V4(v4),
        IpAddr::V6(v6) => match v6.to_ipv4_mapped() {
            Some(v4) => IpAddr::V4(v4),
            None => IpAddr::V6((u128::from(v6) & !((1u128 << 64) - 1)).into()),
        },
    }
}

impl SourceBuckets {
    /// Takes one new-session token of `addr`'s source, or says how long until one.
    pub(crate) fn take(
        &mut self,
        addr: Option<SocketAddr>,
        now: Instant,
        burst: u32,
        rate: u32,
    ) -> Result<(), Duration> {
        let key = addr.map(source_key);
        if !self.buckets.contains_key(&key) && self.buckets.len() >= TRACKED_SOURCES {
            // A bucket that has refilled carries no information: forget those, at most
            // once a second (the scan is over all tracked sources).
            if self
                .last_purge
                .is_none_or(|at| now.saturating_duration_since(at) >= Duration::from_secs(1))
            {
                self.last_purge = Some(now);
                self.buckets.retain(|_, b| {
                    b.refill(now, burst, rate);
                    b.tokens < f64::from(burst)
                });
            }
            if self.buckets.len() >= TRACKED_SOURCES {
                let bucket = self
                    .overflow
                    .get_or_insert_with(|| Bucket::full(burst, now));
                bucket.refill(now, burst, rate);
                return bucket.take(rate);
            }
        }
        let bucket = self
            .buckets
            .entry(key)
            .or_insert_with(|| Bucket::full(burst, now));
        bucket.refill(now, burst, rate);
        bucket.take(rate)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn at(ip: [u8; 4]) -> Option<SocketAddr> {
        Some(SocketAddr::from((ip, 1234)))
    }

    #[test]
    fn thr_5_new_sessions_per_source_burst_then_rate() {
        let t0 = Instant::now();
        let mut b = SourceBuckets::default();
        for _ in 0..3 {
            assert!(b.take(at([10, 0, 0, 1]), t0, 3, 2).is_ok());
        }
        let wait = b.take(at([10, 0, 0, 1]), t0, 3, 2).unwrap_err();
        assert_eq!(wait, Duration::from_millis(500), "one token at 2/s");
        // Another source is not affected; another port of the same source is.
        assert!(b.take(at([10, 0, 0, 2]), t0, 3, 2).is_ok());
        assert!(
            b.take(Some(SocketAddr::from(([10, 0, 0, 1], 9))), t0, 3, 2)
                .is_err()
        );
        let t1 = t0 + Duration::from_millis(500);
        assert!(b.take(at([10, 0, 0, 1]), t1, 3, 2).is_ok(), "refilled");
        assert!(b.take(at([10, 0, 0, 1]), t1, 3, 2).is_err());
        // IPv6 by /64; IPv4-mapped as IPv4.
        let v6 = |s: &str| Some(SocketAddr::new(s.parse().unwrap(), 1));
        assert!(b.take(v6("2001:db8::1"), t0, 1, 1).is_ok());
        assert!(
            b.take(v6("2001:db8::ffff:2"), t0, 1, 1).is_err(),
            "same /64"
        );
        assert!(b.take(v6("::ffff:10.0.0.2"), t0, 3, 2).is_ok());
    }

    #[test]
    fn tracked_sources_stay_bounded() {
        let t0 = Instant::now();
        let mut b = SourceBuckets::default();
        for n in 0..(TRACKED_SOURCES as u32 + 100) {
            let _ = b.take(Some(SocketAddr::from((n.to_be_bytes(), 1))), t0, 2, 1);
        }
        assert!(b.buckets.len() <= TRACKED_SOURCES);
        // Once their buckets refill, old sources are forgotten to make room.
        let later = t0 + Duration::from_secs(10);
        assert!(b.take(at([192, 168, 0, 1]), later, 2, 1).is_ok());
        assert!(b.buckets.len() < 10, "{}", b.buckets.len());
    }
}
