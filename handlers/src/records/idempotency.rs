//! Step idempotency keys: a step with `idempotency = { key, window }` is
//! skipped when its rendered key was recorded for the same chain and step
//! less than `window` ago.

use std::time::Duration;

use switchboard_sdk::AccountKey;

use super::RecordError;

/// Whether a key first recorded at `recorded_at` (Unix seconds) is still
/// within `window` at `now` (Unix seconds).
pub fn within_window(recorded_at: i64, now: i64, window: Duration) -> bool {
    now - recorded_at < window.as_secs() as i64
}

/// Idempotency keys of every account's steps.
pub trait IdempotencyKeys: Send + Sync + std::fmt::Debug {
    /// Whether `rendered` was recorded for this step less than `window` ago
    /// ([`within_window`]).
    fn seen(
        &self,
        account: &AccountKey,
        chain: &str,
        step: &str,
        rendered: &str,
        window: Duration,
    ) -> Result<bool, RecordError>;

    /// Records `rendered` for this step, now.
    fn record(
        &self,
        account: &AccountKey,
        chain: &str,
        step: &str,
        rendered: &str,
    ) -> Result<(), RecordError>;
}

#[cfg(test)]
mod tests {
    use super::*;

    fn check(age_secs: i64, window_secs: u64, seen: bool) {
        let now = 1_800_000_000;
        assert_eq!(
            within_window(now - age_secs, now, Duration::from_secs(window_secs)),
            seen,
            "{age_secs} s old, window {window_secs} s"
        );
    }

    #[test]
    fn a_key_is_seen_until_its_window_has_passed() {
        check(0, 60, true);
        check(59, 60, true);
        check(60, 60, false);
        check(3_600, 60, false);
        check(0, 0, false);
        // Recorded "in the future" (clocks of two replicas apart): seen.
        check(-5, 60, true);
    }
}
