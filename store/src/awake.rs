//! Time that goes on while the machine sleeps.

use std::time::Duration;

/// A moment on a clock that also counts the time the machine spent
/// suspended (`CLOCK_BOOTTIME` on Linux), unlike [`std::time::Instant`]
/// there (`CLOCK_MONOTONIC`): a replica whose machine slept for a day was
/// out of touch for that day. Elsewhere, the monotonic clock.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
pub(crate) struct Moment(Duration);

impl Moment {
    /// Now.
    pub(crate) fn now() -> Self {
        #[cfg(target_os = "linux")]
        {
            let t = rustix::time::clock_gettime(rustix::time::ClockId::Boottime);
            let (secs, nanos) = (u64::try_from(t.tv_sec), u32::try_from(t.tv_nsec));
            Self(Duration::new(
                secs.expect("boot time is positive"),
                nanos.expect("nanoseconds are below a second"),
            ))
        }
        #[cfg(not(target_os = "linux"))]
        {
            static START: std::sync::OnceLock<std::time::Instant> = std::sync::OnceLock::new();
            Self(START.get_or_init(std::time::Instant::now).elapsed())
        }
    }

    /// How long ago this moment was.
    pub(crate) fn elapsed(self) -> Duration {
        Self::now().0.saturating_sub(self.0)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The clock goes forward with time, at its pace.
    #[test]
    fn moments_go_forward_with_time() {
        let (then, started) = (Moment::now(), std::time::Instant::now());
        std::thread::sleep(Duration::from_millis(30));
        let (elapsed, passed) = (then.elapsed(), started.elapsed());
        assert!(Moment::now() > then);
        assert!(elapsed >= Duration::from_millis(30), "{elapsed:?}");
        assert!(
            elapsed <= passed + Duration::from_millis(5),
            "{elapsed:?} > {passed:?}"
        );
    }
}
