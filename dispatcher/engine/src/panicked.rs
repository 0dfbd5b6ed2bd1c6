//! Panics caught on the event path. A panic in a handler, or in the engine
//! while it handles an event, must not take the worker with it: the worker
//! holds every later event of its conversations, and a worker gone would
//! stop the consume loop while the API still answered.

use std::any::Any;
use std::future::Future;
use std::panic::AssertUnwindSafe;

use futures::FutureExt as _;

/// Runs `future` to its end, or to its panic, which comes back as the
/// panic's message.
///
/// Unwind safety is asserted, not proven: what a panic may leave half done
/// is the caller's to settle (a step that panicked fails for good; a pass
/// that panicked is handled again). The engine's locks guard short sections
/// that call no handler, so a handler's panic leaves none of them poisoned.
pub(crate) async fn caught<T>(future: impl Future<Output = T>) -> Result<T, String> {
    AssertUnwindSafe(future)
        .catch_unwind()
        .await
        .map_err(|payload| message(&*payload))
}

/// What a panic said, when it said it in words (`panic!` with a literal or
/// a format string, `expect`, `unwrap`).
fn message(payload: &(dyn Any + Send)) -> String {
    if let Some(text) = payload.downcast_ref::<&'static str>() {
        (*text).to_string()
    } else if let Some(text) = payload.downcast_ref::<String>() {
        text.clone()
    } else {
        "a panic without a message".to_string()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn a_panic_comes_back_as_its_message() {
        assert_eq!(caught(async { 7 }).await, Ok(7));
        let literal = caught(async { panic!("out of range") }).await;
        assert_eq!(literal, Err::<(), _>("out of range".to_string()));
        let formatted = caught(async {
            let at = 3;
            panic!("index {at} out of range")
        })
        .await;
        assert_eq!(formatted, Err::<(), _>("index 3 out of range".to_string()));
        let other = caught(async { std::panic::panic_any(42_u8) }).await;
        assert_eq!(other, Err::<(), _>("a panic without a message".to_string()));
    }
}
