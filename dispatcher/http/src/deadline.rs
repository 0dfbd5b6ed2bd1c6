//! A request body that must arrive whole by a deadline (`http.body_timeout`):
//! the server wraps every request's body in [`Deadline`], and an extractor
//! that reads a body tells a large one ([`too_large`]) from a late one.

use std::future::Future;
use std::pin::Pin;
use std::task::{Context, Poll};
use std::time::Duration;

use axum::body::Bytes;
use http_body::{Body, Frame, SizeHint};
use tokio::time::{Instant, Sleep};

/// A request body that fails once it has not arrived whole by its
/// deadline. The timer is made only when the body is first waited for (a
/// request without a body, or whose body came with its head, makes none).
#[derive(Debug)]
pub struct Deadline<B> {
    inner: B,
    deadline: Instant,
    timeout: Duration,
    sleep: Option<Pin<Box<Sleep>>>,
}

impl<B> Deadline<B> {
    /// `inner`, to arrive whole within `timeout` from now.
    pub fn new(inner: B, timeout: Duration) -> Self {
        Self {
            inner,
            deadline: Instant::now() + timeout,
            timeout,
            sleep: None,
        }
    }
}

/// The error of a body that did not arrive in time.
#[derive(Debug, thiserror::Error)]
#[error("the request's body did not arrive whole within {0:?} of its head (http.body_timeout)")]
pub struct TooSlow(Duration);

/// Whether reading a body (`axum::body::to_bytes`) failed because it was
/// over the limit read; any other failure (too slow, cut short) is the
/// request's, not its size's.
pub fn too_large(e: &(dyn std::error::Error + 'static)) -> bool {
    std::iter::successors(Some(e), |e| e.source())
        .any(|e| e.is::<http_body_util::LengthLimitError>())
}

impl<B> Body for Deadline<B>
where
    B: Body<Data = Bytes> + Unpin,
    B::Error: Into<axum::BoxError>,
{
    type Data = Bytes;
    type Error = axum::BoxError;

    fn poll_frame(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, Self::Error>>> {
        let this = &mut *self;
        if let Poll::Ready(frame) = Pin::new(&mut this.inner).poll_frame(cx) {
            return Poll::Ready(frame.map(|f| f.map_err(Into::into)));
        }
        let deadline = this.deadline;
        let sleep = this
            .sleep
            .get_or_insert_with(|| Box::pin(tokio::time::sleep_until(deadline)));
        match sleep.as_mut().poll(cx) {
            Poll::Ready(()) => Poll::Ready(Some(Err(TooSlow(this.timeout).into()))),
            Poll::Pending => Poll::Pending,
        }
    }

    fn is_end_stream(&self) -> bool {
        self.inner.is_end_stream()
    }

    fn size_hint(&self) -> SizeHint {
        self.inner.size_hint()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use axum::body::Body as AxumBody;

    fn too_slow(e: &(dyn std::error::Error + 'static)) -> bool {
        std::iter::successors(Some(e), |e| e.source()).any(|e| e.is::<TooSlow>())
    }

    #[tokio::test(start_paused = true)]
    async fn a_body_late_past_its_deadline_fails_and_is_told_from_a_large_one() {
        let never =
            AxumBody::from_stream(futures::stream::pending::<Result<Bytes, std::io::Error>>());
        let late = Deadline::new(never, Duration::from_secs(2));
        let e = axum::body::to_bytes(AxumBody::new(late), 1024)
            .await
            .expect_err("the body never came");
        assert!(too_slow(&e) && !too_large(&e), "{e}");
        // A body over the limit is not a late one.
        let large = Deadline::new(AxumBody::from(vec![0u8; 2048]), Duration::from_secs(2));
        let e = axum::body::to_bytes(AxumBody::new(large), 1024)
            .await
            .expect_err("over the limit");
        assert!(too_large(&e) && !too_slow(&e), "{e}");
        // One that came in time is read whole.
        let prompt = Deadline::new(AxumBody::from("whole"), Duration::from_secs(2));
        let read = axum::body::to_bytes(AxumBody::new(prompt), 1024)
            .await
            .unwrap();
        assert_eq!(&read[..], b"whole");
    }
}
