//! Reconnect backoff: exponential, with jitter, never giving up (GEN-8, THR-4, THR-8).

use std::time::Duration;

use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};

/// How long the client waits between failed connection attempts (GEN-8, THR-4, THR-8).
///
/// The defaults are those of opamp-go (cenkalti/backoff): the first retry waits about
/// 500 ms, each further failure multiplies the interval by 1.5 up to 60 s, and every delay is
/// drawn uniformly within ±50 % of the current interval (the jitter), so a fleet restarted at
/// once does not reconnect in lock step. The client never gives up: only
/// [`OpampClient::stop`](crate::OpampClient::stop) ends the retries.
///
/// Throttling responses (HTTP 429/503 and `ServerErrorResponse` UNAVAILABLE) without a retry
/// time wait at least [`throttle_min_interval`](Self::throttle_min_interval), 30 s by default
/// (THR-7). A server-provided `Retry-After` / `retry_info` is used when it is longer than the
/// computed delay, capped at [`max_retry_after`](Self::max_retry_after) so that a hostile or
/// broken server cannot park the client forever.
///
/// The interval is reset to its initial value when the server answers with a valid message,
/// not merely when a TCP or WebSocket connection is established: a server that accepts and
/// drops connections sees growing delays, never a tight reconnect loop.
#[derive(Debug, Clone, PartialEq)]
#[non_exhaustive]
pub struct BackoffPolicy {
    /// The interval before the first retry. Default 500 ms.
    pub initial_interval: Duration,
    /// The factor applied to the interval after each failure. Default 1.5; values below 1 are
    /// treated as 1.
    pub multiplier: f64,
    /// The jitter: each delay is drawn uniformly from `interval * (1 ± randomization_factor)`.
    /// Default 0.5; clamped to `0..=1`.
    pub randomization_factor: f64,
    /// The largest interval (before jitter). Default 60 s.
    pub max_interval: Duration,
    /// The shortest wait after a throttling response that carries no retry time (THR-7).
    /// Default 30 s.
    pub throttle_min_interval: Duration,
    /// The longest wait the client accepts from `Retry-After` or `retry_info`. Default 1 hour.
    pub max_retry_after: Duration,
}

impl Default for BackoffPolicy {
    fn default() -> Self {
        Self {
            initial_interval: Duration::from_millis(500),
            multiplier: 1.5,
            randomization_factor: 0.5,
            max_interval: Duration::from_secs(60),
            throttle_min_interval: Duration::from_secs(30),
            max_retry_after: Duration::from_secs(3600),
        }
    }
}

impl BackoffPolicy {
    /// Sets [`initial_interval`](Self::initial_interval).
    pub fn with_initial_interval(mut self, interval: Duration) -> Self {
        self.initial_interval = interval;
        self
    }

    /// Sets [`multiplier`](Self::multiplier).
    pub fn with_multiplier(mut self, multiplier: f64) -> Self {
        self.multiplier = multiplier;
        self
    }

    /// Sets [`randomization_factor`](Self::randomization_factor).
    pub fn with_randomization_factor(mut self, factor: f64) -> Self {
        self.randomization_factor = factor;
        self
    }

    /// Sets [`max_interval`](Self::max_interval).
    pub fn with_max_interval(mut self, interval: Duration) -> Self {
        self.max_interval = interval;
        self
    }

    /// Sets [`throttle_min_interval`](Self::throttle_min_interval).
    pub fn with_throttle_min_interval(mut self, interval: Duration) -> Self {
        self.throttle_min_interval = interval;
        self
    }

    /// Sets [`max_retry_after`](Self::max_retry_after).
    pub fn with_max_retry_after(mut self, max: Duration) -> Self {
        self.max_retry_after = max;
        self
    }

    fn factor(&self) -> f64 {
        if self.randomization_factor.is_finite() {
            self.randomization_factor.clamp(0.0, 1.0)
        } else {
            0.0
        }
    }

    fn growth(&self) -> f64 {
        if self.multiplier.is_finite() && self.multiplier >= 1.0 {
            self.multiplier
        } else {
            1.0
        }
    }
}

/// The state of a backoff sequence: the current interval and the jitter source.
#[derive(Debug)]
pub(crate) struct Backoff {
    policy: BackoffPolicy,
    current: Duration,
    rng: StdRng,
}

impl Backoff {
    /// A sequence at its initial interval. `seed` makes the jitter deterministic (tests);
    /// `None` seeds from the operating system.
    pub(crate) fn new(policy: BackoffPolicy, seed: Option<u64>) -> Self {
        let rng = match seed {
            Some(seed) => StdRng::seed_from_u64(seed),
            None => StdRng::from_os_rng(),
        };
        Self {
            current: policy.initial_interval,
            policy,
            rng,
        }
    }

    /// The next delay: the current interval with jitter; then the interval grows (THR-8).
    pub(crate) fn next_delay(&mut self) -> Duration {
        let base = self.current.min(self.policy.max_interval);
        let factor = self.policy.factor();
        let jitter = if factor > 0.0 {
            self.rng.random_range(-factor..=factor)
        } else {
            0.0
        };
        let delay = mul(base, 1.0 + jitter);
        self.current = mul(base, self.policy.growth()).min(self.policy.max_interval);
        delay
    }

    /// Back to the initial interval, after the server answered properly.
    pub(crate) fn reset(&mut self) {
        self.current = self.policy.initial_interval;
    }

    /// The delay after a failure that may carry a server-given retry time.
    ///
    /// `throttled` marks throttling responses (429/503, UNAVAILABLE): without a retry time
    /// they wait at least `throttle_min_interval` (THR-7). A retry time longer than the
    /// computed delay wins (THR-3, THR-5), capped at `max_retry_after`.
    pub(crate) fn delay_after_failure(
        &mut self,
        throttled: bool,
        retry_after: Option<Duration>,
    ) -> Duration {
        let computed = self.next_delay();
        match retry_after {
            Some(server) => computed.max(server.min(self.policy.max_retry_after)),
            None if throttled => computed.max(self.policy.throttle_min_interval),
            None => computed,
        }
    }
}

/// `d * f`, saturating instead of panicking on overflow (`f` is finite and non-negative).
fn mul(d: Duration, f: f64) -> Duration {
    Duration::try_from_secs_f64(d.as_secs_f64() * f).unwrap_or(Duration::MAX)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn within(d: Duration, base: f64) -> bool {
        let s = d.as_secs_f64();
        s >= base * 0.5 - 1e-9 && s <= base * 1.5 + 1e-9
    }

    #[test]
    fn thr_8_sequence_grows_within_jitter_bounds_and_caps() {
        for seed in 0..20 {
            let mut b = Backoff::new(BackoffPolicy::default(), Some(seed));
            let mut base: f64 = 0.5;
            for _ in 0..30 {
                let d = b.next_delay();
                assert!(
                    within(d, base),
                    "seed {seed}: {d:?} not within ±50% of {base}"
                );
                base = (base * 1.5).min(60.0);
            }
            // Capped at 60 s before jitter: never more than 90 s.
            assert!(b.next_delay() <= Duration::from_secs(90));
        }
    }

    #[test]
    fn same_seed_same_sequence_and_jitter_actually_varies() {
        let seq = |seed| {
            let mut b = Backoff::new(BackoffPolicy::default(), Some(seed));
            (0..8).map(|_| b.next_delay()).collect::<Vec<_>>()
        };
        assert_eq!(seq(7), seq(7));
        assert_ne!(seq(7), seq(8));
    }

    #[test]
    fn reset_returns_to_initial_interval() {
        let mut b = Backoff::new(BackoffPolicy::default(), Some(1));
        for _ in 0..10 {
            b.next_delay();
        }
        b.reset();
        assert!(within(b.next_delay(), 0.5));
    }

    #[test]
    fn thr_5_longer_retry_after_wins_and_is_capped() {
        let mut b = Backoff::new(BackoffPolicy::default(), Some(3));
        assert_eq!(
            b.delay_after_failure(true, Some(Duration::from_secs(120))),
            Duration::from_secs(120)
        );
        // A shorter Retry-After than the computed delay does not shorten it.
        let mut b = Backoff::new(
            BackoffPolicy::default().with_initial_interval(Duration::from_secs(10)),
            Some(3),
        );
        let d = b.delay_after_failure(true, Some(Duration::from_millis(1)));
        assert!(d >= Duration::from_secs(5));
        // Absurd values are capped.
        let mut b = Backoff::new(BackoffPolicy::default(), Some(3));
        assert_eq!(
            b.delay_after_failure(true, Some(Duration::from_secs(10_000_000))),
            Duration::from_secs(3600)
        );
    }

    #[test]
    fn thr_7_throttling_without_retry_after_waits_at_least_30s() {
        let mut b = Backoff::new(BackoffPolicy::default(), Some(3));
        assert_eq!(b.delay_after_failure(true, None), Duration::from_secs(30));
        assert!(b.delay_after_failure(false, None) < Duration::from_secs(2));
    }

    #[test]
    fn odd_policies_do_not_panic() {
        let policy = BackoffPolicy::default()
            .with_multiplier(f64::NAN)
            .with_randomization_factor(7.0)
            .with_initial_interval(Duration::ZERO);
        let mut b = Backoff::new(policy, Some(0));
        for _ in 0..5 {
            assert_eq!(b.next_delay(), Duration::ZERO);
        }
    }
}
