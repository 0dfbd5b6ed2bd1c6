//! The per-account ingest rate limit of `POST /v1/events`: a token bucket per
//! account, refilled at `limits.ingest_rate` events a second up to
//! `limits.ingest_burst`.

use std::collections::HashMap;
use std::sync::Mutex;
use std::time::{Duration, Instant};

/// Token buckets by account.
#[derive(Debug)]
pub struct RateLimiter {
    /// Events a second; 0 turns the limit off.
    rate: f64,
    burst: f64,
    buckets: Mutex<HashMap<String, Bucket>>,
}

#[derive(Debug, Clone, Copy)]
struct Bucket {
    tokens: f64,
    at: Instant,
}

impl RateLimiter {
    /// `rate` events a second per account with bursts of `burst` (at least
    /// one); a rate of 0 admits everything.
    pub fn new(rate: u32, burst: u32) -> Self {
        Self {
            rate: f64::from(rate),
            burst: f64::from(burst.max(1)),
            buckets: Mutex::new(HashMap::new()),
        }
    }

    /// Takes one event's worth for `account`, or says how long until one is
    /// available.
    pub fn take(&self, account: &str) -> Result<(), Duration> {
        self.take_at(account, Instant::now())
    }

    /// Takes `n` events' worth for `account` at once (a batch), or none
    /// and says how long until that many are available; a batch larger
    /// than the burst can never pass, and says so with `None`.
    pub fn take_many(&self, account: &str, n: usize) -> Result<(), Option<Duration>> {
        self.take_n_at(account, n as f64, Instant::now())
    }

    fn take_at(&self, account: &str, now: Instant) -> Result<(), Duration> {
        self.take_n_at(account, 1.0, now)
            .map_err(|wait| wait.unwrap_or(Duration::MAX))
    }

    fn take_n_at(&self, account: &str, n: f64, now: Instant) -> Result<(), Option<Duration>> {
        if self.rate <= 0.0 {
            return Ok(());
        }
        let mut buckets = self.buckets.lock().expect("rate limiter lock");
        let bucket = buckets.entry(account.to_string()).or_insert(Bucket {
            tokens: self.burst,
            at: now,
        });
        let elapsed = now.saturating_duration_since(bucket.at).as_secs_f64();
        bucket.tokens = (bucket.tokens + elapsed * self.rate).min(self.burst);
        bucket.at = now;
        if bucket.tokens >= n {
            bucket.tokens -= n;
            Ok(())
        } else if n > self.burst {
            Err(None)
        } else {
            Err(Some(Duration::from_secs_f64(
                (n - bucket.tokens) / self.rate,
            )))
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_burst_passes_then_the_rate_holds_per_account() {
        let limiter = RateLimiter::new(10, 3);
        let t0 = Instant::now();
        for _ in 0..3 {
            assert_eq!(limiter.take_at("a", t0), Ok(()));
        }
        let wait = limiter.take_at("a", t0).expect_err("the burst is spent");
        assert!(
            wait > Duration::from_millis(90) && wait <= Duration::from_millis(100),
            "{wait:?}"
        );
        // Another account has its own bucket.
        assert_eq!(limiter.take_at("b", t0), Ok(()));
        // A tenth of a second later one more event fits.
        assert_eq!(
            limiter.take_at("a", t0 + Duration::from_millis(100)),
            Ok(())
        );
        assert!(
            limiter
                .take_at("a", t0 + Duration::from_millis(100))
                .is_err()
        );
    }

    #[test]
    fn a_rate_of_zero_admits_everything() {
        let limiter = RateLimiter::new(0, 0);
        for _ in 0..10_000 {
            assert_eq!(limiter.take("a"), Ok(()));
        }
    }
}
