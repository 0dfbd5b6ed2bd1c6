//! Step idempotency keys: a step with `idempotency = { key, window }` is
//! skipped when another event claimed its rendered key for the same chain
//! and step less than `window` ago.
//!
//! The key is claimed *before* the step runs, by the event running it, in
//! one compare-and-set: of two events running the step at once with the
//! same key, one runs it and the other is skipped. The claimant's own later
//! attempts (a retry, a redelivery after a crash) find the claim theirs and
//! run; a step that fails for good gives its claim back. A claim holds its
//! time, the end of its window and its claimant, so keys past their window
//! are removed by a sweep.

use std::time::Duration;

use switchboard_sdk::AccountKey;

use super::RecordError;

/// Whether a key first recorded at `recorded_at` (Unix seconds) is still
/// within `window` at `now` (Unix seconds).
pub fn within_window(recorded_at: i64, now: i64, window: Duration) -> bool {
    now - recorded_at < window.as_secs() as i64
}

/// A stored claim on a key.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Claim {
    /// When it was made (Unix seconds).
    pub at: i64,
    /// When its window ends (Unix seconds); `None` for a key recorded by an
    /// earlier release, which kept only its time (its step's window counts).
    pub until: Option<i64>,
    /// The event that made it; `None` for an earlier release's key.
    pub claimant: Option<String>,
}

impl Claim {
    /// A claim by `claimant` at `now` for `window`.
    pub fn new(now: i64, window: Duration, claimant: &str) -> Self {
        Self {
            at: now,
            until: Some(now.saturating_add(window.as_secs() as i64)),
            claimant: Some(claimant.to_string()),
        }
    }

    /// Its stored form: the time and the window's end (8 bytes each, big
    /// endian), then the claimant.
    pub fn encode(&self) -> Vec<u8> {
        let mut out = self.at.to_be_bytes().to_vec();
        if let Some(until) = self.until {
            out.extend_from_slice(&until.to_be_bytes());
            out.extend_from_slice(self.claimant.as_deref().unwrap_or_default().as_bytes());
        }
        out
    }

    /// Reads a stored claim (8 bytes: an earlier release's key).
    pub fn decode(bytes: &[u8]) -> Option<Self> {
        let at = i64::from_be_bytes(bytes.get(..8)?.try_into().ok()?);
        if bytes.len() == 8 {
            return Some(Self {
                at,
                until: None,
                claimant: None,
            });
        }
        let until = i64::from_be_bytes(bytes.get(8..16)?.try_into().ok()?);
        let claimant = std::str::from_utf8(&bytes[16..]).ok()?.to_string();
        Some(Self {
            at,
            until: Some(until),
            claimant: Some(claimant),
        })
    }

    /// Whether `claimant` may run the step at `now`: the claim is its own,
    /// or its window (`window` for an earlier release's key) has ended.
    pub fn yields_to(&self, claimant: &str, now: i64, window: Duration) -> bool {
        if self.claimant.as_deref() == Some(claimant) {
            return true;
        }
        match self.until {
            Some(until) => now >= until,
            None => !within_window(self.at, now, window),
        }
    }

    /// Whether the sweep removes it at `now`: its window has ended (an
    /// earlier release's key, whose window is its step's, stays until a
    /// claim replaces it).
    pub fn expired(&self, now: i64) -> bool {
        self.until.is_some_and(|until| now >= until)
    }
}

/// Idempotency keys of every account's steps.
pub trait IdempotencyKeys: Send + Sync + std::fmt::Debug {
    /// Claims `rendered` for this step on behalf of `claimant` (the event
    /// running the step) for `window`: `true` if the step may run (no claim
    /// within its window, or `claimant`'s own), `false` if another event's
    /// claim holds the key.
    fn claim(
        &self,
        account: &AccountKey,
        chain: &str,
        step: &str,
        rendered: &str,
        window: Duration,
        claimant: &str,
    ) -> Result<bool, RecordError>;

    /// Gives `claimant`'s claim on `rendered` back (its step failed for
    /// good), so that another event may run the step with the key.
    fn release(
        &self,
        account: &AccountKey,
        chain: &str,
        step: &str,
        rendered: &str,
        claimant: &str,
    ) -> Result<(), RecordError>;

    /// As [`IdempotencyKeys::release`], for a key known by its SHA-256 in
    /// hex (what a message record keeps of its template's key).
    fn release_hashed(
        &self,
        account: &AccountKey,
        chain: &str,
        step: &str,
        hashed: &str,
        claimant: &str,
    ) -> Result<(), RecordError>;

    /// Removes the claims whose window ended before `now` (Unix seconds);
    /// returns how many.
    fn expire(&self, now: i64) -> Result<usize, Box<dyn std::error::Error + Send + Sync>>;
}

#[cfg(test)]
mod tests {
    use super::*;

    const NOW: i64 = 1_800_000_000;

    fn check(age_secs: i64, window_secs: u64, seen: bool) {
        assert_eq!(
            within_window(NOW - age_secs, NOW, Duration::from_secs(window_secs)),
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

    #[test]
    fn a_claim_yields_to_its_claimant_and_to_others_once_its_window_ends() {
        let minute = Duration::from_secs(60);
        let claim = Claim::new(NOW, minute, "event-a");
        let check = |claimant: &str, at: i64, yields: bool| {
            assert_eq!(
                claim.yields_to(claimant, at, minute),
                yields,
                "{claimant} at +{}",
                at - NOW
            );
        };
        check("event-a", NOW, true);
        check("event-a", NOW + 30, true);
        check("event-b", NOW, false);
        check("event-b", NOW + 59, false);
        check("event-b", NOW + 60, true);
        assert!(!claim.expired(NOW + 59));
        assert!(claim.expired(NOW + 60));
        // Stored and read back.
        assert_eq!(Claim::decode(&claim.encode()), Some(claim.clone()));
        // An earlier release's key: its time only, the step's window counts,
        // nobody's own, never swept.
        let old = Claim::decode(&NOW.to_be_bytes()).expect("8 bytes");
        assert_eq!(old.until, None);
        assert!(!old.yields_to("event-a", NOW + 59, minute));
        assert!(old.yields_to("event-a", NOW + 60, minute));
        assert!(!old.expired(NOW + 1_000_000));
        assert_eq!(Claim::decode(&[1, 2, 3]), None);
    }
}
