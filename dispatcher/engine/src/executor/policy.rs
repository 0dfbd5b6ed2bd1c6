//! The executor's decisions, as plain functions over data: whether an event
//! is handled at all, what a failed attempt leads to, and how soon a step's
//! record must be written and made durable. No I/O here, so each rule is
//! tested by a table.

use std::time::Duration;

use switchboard_handlers::Effects;
use switchboard_rules::{OnError, RetrySpec};
use time::OffsetDateTime;

/// Whether an event taken off the bus is handled.
#[derive(Debug, Clone, PartialEq)]
pub enum Admission {
    /// Run its chains.
    Handle,
    /// Its `expires_at` has passed and none of its chains has started: drop it.
    Expired,
    /// Its lineage is deeper than the limit: dead letters, with the reason.
    TooDeep(String),
}

/// What the event carries that admission looks at.
#[derive(Clone, Copy)]
pub struct Lineage<'a> {
    /// When it expires, if it does.
    pub expires_at: Option<OffsetDateTime>,
    /// Its depth in its lineage (0 for a root).
    pub depth: u32,
    /// The root of its lineage, for the error.
    pub root_id: &'a dyn std::fmt::Display,
    /// Its type, for the error.
    pub event_type: &'a str,
}

/// Decides whether an event is handled: an event whose chains have started
/// is finished whatever its expiry; one past its expiry otherwise is
/// dropped; one deeper than `max_depth` goes to dead letters (checked after
/// expiry: an expired loop is merely dropped).
pub fn admit(event: Lineage<'_>, started: bool, now: OffsetDateTime, max_depth: u32) -> Admission {
    if !started && event.expires_at.is_some_and(|at| at <= now) {
        return Admission::Expired;
    }
    if event.depth > max_depth {
        return Admission::TooDeep(format!(
            "event depth {} is over the limit of {max_depth}: a chain probably emits the event \
             that triggers it (root event {}, event type {})",
            event.depth, event.root_id, event.event_type
        ));
    }
    Admission::Handle
}

/// Whether a chain of an event that expires at `expires_at` stops before
/// its next step at `now`: the time to live holds at every step, including
/// one after a pause or a retry's wait.
pub fn expired_before_step(expires_at: Option<OffsetDateTime>, now: OffsetDateTime) -> bool {
    expires_at.is_some_and(|at| at <= now)
}

/// How an attempt at a step failed.
#[derive(Debug, Clone, PartialEq)]
pub enum Failure {
    /// Worth trying again; `after` is the delay the peer asked for.
    Retryable {
        /// What went wrong.
        message: String,
        /// The delay the peer asked for (`Retry-After`), if it did.
        after: Option<Duration>,
    },
    /// Trying again cannot help.
    Permanent {
        /// What went wrong.
        message: String,
    },
}

/// What a failed attempt leads to.
#[derive(Debug, Clone, PartialEq)]
pub enum Verdict {
    /// Try the step again after the delay; the event goes back to the bus.
    Retry(Duration),
    /// Record the failure and go on with the next step (`on_error = "continue"`).
    Continue(String),
    /// End the chain; the event goes to dead letters with the message.
    DeadLetter(String),
}

/// Decides what failed attempt number `attempts` of a step leads to. A
/// retryable failure is retried while attempts remain, after the delay the
/// peer asked for or else the policy's backoff scaled by `jitter` (a factor
/// in 0.8–1.2, so that many events' retries do not move in lockstep); once
/// they are used up, or for a permanent failure, `on_error` decides.
pub fn after_failure(
    failure: Failure,
    attempts: u32,
    retry: &RetrySpec,
    on_error: OnError,
    jitter: f64,
) -> Verdict {
    let message = match failure {
        Failure::Retryable { after, .. } if attempts < retry.max_attempts => {
            return Verdict::Retry(after.unwrap_or_else(|| retry.delay(attempts).mul_f64(jitter)));
        }
        Failure::Retryable { message, .. } => {
            format!("{message} (gave up after {attempts} attempts)")
        }
        Failure::Permanent { message } => message,
    };
    match on_error {
        OnError::Continue => Verdict::Continue(message),
        OnError::Stop => Verdict::DeadLetter(message),
    }
}

/// When a finished step's record is written.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Recording {
    /// With the event's end, in the pass's one write: running the step
    /// again after a crash repeats nothing that matters.
    WithTheEnd,
    /// At once, not flushed: the step's own writes are in the same store
    /// log, which keeps the record only if it keeps what came before it.
    Now,
    /// With the pass's next write, and durable before the next step with
    /// outside effects starts (and before the ack): a crash repeats at most
    /// one such step per worker. Written no sooner than that, since a write
    /// that is not flushed is not promised to outlast a crash; so a pass
    /// whose one outside step is its last writes its record once.
    BeforeTheNextEffect,
}

/// When the record of a finished step with `effects` is written. (A step's
/// idempotency key needs nothing here: it was claimed before the step ran,
/// by the event, which finds it its own if it runs the step again.)
pub fn recording(effects: Effects) -> Recording {
    match effects {
        Effects::External => Recording::BeforeTheNextEffect,
        Effects::Local => Recording::Now,
        Effects::None | Effects::LocalRepeatable => Recording::WithTheEnd,
    }
}

/// Whether the store must be flushed before a step with `effects` starts,
/// given whether an earlier outside effect's record may not be durable yet.
pub fn flush_before(effects: Effects, earlier_not_durable: bool) -> bool {
    effects == Effects::External && earlier_not_durable
}

/// A jitter factor in 0.8–1.2 from the clock's nanoseconds.
pub fn jitter() -> f64 {
    let nanos = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|t| t.subsec_nanos())
        .unwrap_or(0);
    0.8 + f64::from(nanos % 1000) / 1000.0 * 0.4
}

#[cfg(test)]
mod tests {
    use super::*;
    use time::macros::datetime;

    const NOW: OffsetDateTime = datetime!(2026-12-02 12:00 UTC);

    #[test]
    fn the_time_to_live_holds_before_every_step() {
        let check = |expires_at, expected| {
            assert_eq!(
                expired_before_step(expires_at, NOW),
                expected,
                "{expires_at:?}"
            );
        };
        check(None, false);
        check(Some(datetime!(2026-12-02 12:00:01 UTC)), false);
        check(Some(NOW), true);
        check(Some(datetime!(2026-12-01 12:00 UTC)), true);
    }

    #[test]
    fn admission() {
        fn check(expires_at: Option<OffsetDateTime>, depth: u32, started: bool, expected: &str) {
            let lineage = Lineage {
                expires_at,
                depth,
                root_id: &"r1",
                event_type: "poll_complete",
            };
            let got = match admit(lineage, started, NOW, 8) {
                Admission::Handle => "handle".to_string(),
                Admission::Expired => "expired".to_string(),
                Admission::TooDeep(e) => format!("too deep: {e}"),
            };
            assert_eq!(
                got, expected,
                "{expires_at:?}, depth {depth}, started {started}"
            );
        }
        let past = Some(datetime!(2026-12-02 11:59 UTC));
        let future = Some(datetime!(2026-12-02 12:01 UTC));
        check(None, 0, false, "handle");
        check(future, 8, false, "handle");
        check(past, 0, false, "expired");
        check(Some(NOW), 0, false, "expired");
        // Started chains are taken up: each stops before its next step
        // (`expired_before_step`), which the trace shows.
        check(past, 0, true, "handle");
        // Expiry first: an expired loop is dropped, not dead-lettered.
        check(past, 9, false, "expired");
        check(
            None,
            9,
            false,
            "too deep: event depth 9 is over the limit of 8: a chain probably emits the event \
             that triggers it (root event r1, event type poll_complete)",
        );
        check(
            past,
            9,
            true,
            "too deep: event depth 9 is over the limit of 8: a chain probably \
             emits the event that triggers it (root event r1, event type poll_complete)",
        );
    }

    #[test]
    fn failures() {
        let retry = RetrySpec {
            max_attempts: 3,
            initial: Duration::from_millis(200),
            max: Duration::from_secs(1),
            multiplier: 2.0,
        };
        let retryable = |after: Option<u64>| Failure::Retryable {
            message: "HTTP 503".into(),
            after: after.map(Duration::from_millis),
        };
        let permanent = Failure::Permanent {
            message: "HTTP 400".into(),
        };
        let check =
            |failure: Failure, attempts: u32, on_error: OnError, jitter: f64, expected: Verdict| {
                assert_eq!(
                    after_failure(failure.clone(), attempts, &retry, on_error, jitter),
                    expected,
                    "{failure:?} at attempt {attempts}, {on_error:?}"
                );
            };
        let ms = Duration::from_millis;
        // Backoff: 200 ms, then ×2, capped at 1 s, scaled by the jitter.
        check(
            retryable(None),
            1,
            OnError::Stop,
            1.0,
            Verdict::Retry(ms(200)),
        );
        check(
            retryable(None),
            2,
            OnError::Stop,
            1.0,
            Verdict::Retry(ms(400)),
        );
        check(
            retryable(None),
            2,
            OnError::Stop,
            1.2,
            Verdict::Retry(ms(480)),
        );
        check(
            retryable(None),
            2,
            OnError::Continue,
            0.8,
            Verdict::Retry(ms(320)),
        );
        // The peer's Retry-After wins over the backoff, unjittered.
        check(
            retryable(Some(5000)),
            1,
            OnError::Stop,
            1.2,
            Verdict::Retry(ms(5000)),
        );
        // Out of attempts: on_error decides, and the message says so.
        let gave_up = "HTTP 503 (gave up after 3 attempts)".to_string();
        check(
            retryable(None),
            3,
            OnError::Stop,
            1.0,
            Verdict::DeadLetter(gave_up.clone()),
        );
        check(
            retryable(Some(10)),
            3,
            OnError::Continue,
            1.0,
            Verdict::Continue(gave_up),
        );
        // Permanent: never retried.
        check(
            permanent.clone(),
            1,
            OnError::Stop,
            1.0,
            Verdict::DeadLetter("HTTP 400".into()),
        );
        check(
            permanent,
            1,
            OnError::Continue,
            1.0,
            Verdict::Continue("HTTP 400".into()),
        );
    }

    #[test]
    fn recording_and_flushing() {
        let check = |effects: Effects, expected: Recording| {
            assert_eq!(recording(effects), expected, "{effects:?}");
        };
        check(Effects::None, Recording::WithTheEnd);
        check(Effects::Local, Recording::Now);
        check(Effects::LocalRepeatable, Recording::WithTheEnd);
        check(Effects::External, Recording::BeforeTheNextEffect);

        for (effects, earlier, expected) in [
            (Effects::External, true, true),
            (Effects::External, false, false),
            (Effects::Local, true, false),
            (Effects::LocalRepeatable, true, false),
            (Effects::None, true, false),
        ] {
            assert_eq!(
                flush_before(effects, earlier),
                expected,
                "{effects:?}, {earlier}"
            );
        }
    }

    #[test]
    fn jitter_stays_within_a_fifth() {
        for _ in 0..100 {
            let j = jitter();
            assert!((0.8..=1.2).contains(&j), "{j}");
        }
    }
}
