//! A log-linear latency histogram (HDR style) in microseconds: 32 sub-buckets per power of
//! two, so any recorded value is reported within about 3 %. Recording is a relaxed atomic
//! increment, so thousands of agent tasks share one histogram without a lock; histograms of
//! several worker processes merge by adding their bucket counts.

use std::sync::atomic::{AtomicU64, Ordering};

const SUB_BITS: u32 = 5;
const SUB: u64 = 1 << SUB_BITS;
/// Enough buckets for values up to 2^40 µs (12 days).
const BUCKETS: usize = (SUB as usize) * 37;

/// The bucket index of `v`.
fn index(v: u64) -> usize {
    if v < SUB {
        return v as usize;
    }
    let e = 63 - v.leading_zeros();
    let shift = e - SUB_BITS;
    let mantissa = v >> shift;
    ((shift as u64) * SUB + mantissa).min(BUCKETS as u64 - 1) as usize
}

/// The largest value that falls into bucket `i`.
fn upper(i: usize) -> u64 {
    let i = i as u64;
    if i < 2 * SUB {
        return i;
    }
    let shift = i / SUB - 1;
    let mantissa = i - shift * SUB;
    ((mantissa + 1) << shift) - 1
}

/// Shared, lock-free recording side.
#[derive(Debug)]
pub(crate) struct AtomicHist {
    counts: Box<[AtomicU64]>,
}

impl AtomicHist {
    pub(crate) fn new() -> Self {
        Self {
            counts: (0..BUCKETS).map(|_| AtomicU64::new(0)).collect(),
        }
    }

    pub(crate) fn record(&self, micros: u64) {
        self.counts[index(micros)].fetch_add(1, Ordering::Relaxed);
    }

    pub(crate) fn reset(&self) {
        for c in self.counts.iter() {
            c.store(0, Ordering::Relaxed);
        }
    }

    /// The non-empty buckets as `index:count,index:count`, for the worker's reply line.
    pub(crate) fn serialize(&self) -> String {
        let parts: Vec<String> = self
            .counts
            .iter()
            .enumerate()
            .filter_map(|(i, c)| {
                let n = c.load(Ordering::Relaxed);
                (n > 0).then(|| format!("{i}:{n}"))
            })
            .collect();
        if parts.is_empty() {
            "-".into()
        } else {
            parts.join(",")
        }
    }
}

/// Merged counts on the orchestrator's side.
#[derive(Debug, Clone)]
pub(crate) struct Hist {
    counts: Vec<u64>,
}

impl Hist {
    pub(crate) fn new() -> Self {
        Self {
            counts: vec![0; BUCKETS],
        }
    }

    /// Adds the buckets of one serialized histogram.
    pub(crate) fn merge_serialized(&mut self, text: &str) -> Result<(), String> {
        if text == "-" {
            return Ok(());
        }
        for part in text.split(',') {
            let (i, n) = part
                .split_once(':')
                .ok_or_else(|| format!("bad bucket {part}"))?;
            let i: usize = i.parse().map_err(|_| format!("bad bucket {part}"))?;
            let n: u64 = n.parse().map_err(|_| format!("bad bucket {part}"))?;
            *self
                .counts
                .get_mut(i)
                .ok_or_else(|| format!("bucket {i} out of range"))? += n;
        }
        Ok(())
    }

    pub(crate) fn count(&self) -> u64 {
        self.counts.iter().sum()
    }

    /// The value at quantile `q` (0..=1), in microseconds (bucket upper bound).
    pub(crate) fn quantile(&self, q: f64) -> u64 {
        let total = self.count();
        if total == 0 {
            return 0;
        }
        let rank = ((q * total as f64).ceil() as u64).clamp(1, total);
        let mut seen = 0;
        for (i, &n) in self.counts.iter().enumerate() {
            seen += n;
            if seen >= rank {
                return upper(i);
            }
        }
        upper(BUCKETS - 1)
    }

    pub(crate) fn max(&self) -> u64 {
        self.counts.iter().rposition(|&n| n > 0).map_or(0, upper)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn buckets_are_within_three_percent() {
        for v in (0..100_000u64).chain([1 << 20, 123_456_789]) {
            let u = upper(index(v));
            assert!(u >= v, "{v} -> {u}");
            assert!(u - v <= v / 32 + 1, "{v} -> {u}");
        }
    }
}
