//! The API's HTTP server: hyper's HTTP/1 connections over the router, with
//! what a port open to the world needs and `axum::serve` does not give: a
//! cap on connections open at once, a time limit on a request's head (and
//! on a kept-alive connection's wait for its next one), and one on its
//! body. Without them a client that opens connections and sends nothing,
//! or a body a byte at a time, holds a task, a socket and its buffers for
//! as long as it likes.

use std::convert::Infallible;
use std::future::Future;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::Duration;

use axum::body::Bytes;
use http_body::{Body, Frame, SizeHint};
use hyper::body::Incoming;
use hyper_util::rt::{TokioIo, TokioTimer};
use hyper_util::server::graceful::GracefulShutdown;
use tokio::net::TcpListener;
use tokio::sync::{Semaphore, watch};
use tokio::task::JoinHandle;
use tokio::time::{Instant, Sleep};

use crate::config::HttpConfig;

/// How long connections still open at a stop get to finish their requests.
const DRAIN: Duration = Duration::from_secs(5);

/// The limits the server holds each connection to.
#[derive(Debug, Clone, Copy)]
pub struct Limits {
    /// Connections open at once.
    pub max_connections: usize,
    /// A request's head must arrive within this, and a kept-alive
    /// connection's next request begin within it.
    pub header_timeout: Duration,
    /// A request's body must have arrived whole this long after its head.
    pub body_timeout: Duration,
}

impl From<&HttpConfig> for Limits {
    fn from(http: &HttpConfig) -> Self {
        Self {
            max_connections: http.max_connections,
            header_timeout: http.header_timeout,
            body_timeout: http.body_timeout,
        }
    }
}

/// Serves `app` on `listener` within `limits` until `stopped` turns true;
/// then stops taking connections and gives those open [`DRAIN`] to finish.
pub fn serve(
    listener: TcpListener,
    app: axum::Router,
    limits: Limits,
    mut stopped: watch::Receiver<bool>,
) -> JoinHandle<()> {
    tokio::spawn(async move {
        let open = Arc::new(Semaphore::new(limits.max_connections));
        let graceful = GracefulShutdown::new();
        let mut http = hyper::server::conn::http1::Builder::new();
        http.timer(TokioTimer::new())
            .header_read_timeout(limits.header_timeout);
        let mut stop = std::pin::pin!(async move {
            let _ = stopped.wait_for(|s| *s).await;
        });
        loop {
            // A connection past the cap waits in the listen backlog.
            let permit = tokio::select! {
                () = &mut stop => break,
                permit = open.clone().acquire_owned() => permit.expect("the semaphore is never closed"),
            };
            let (stream, _) = tokio::select! {
                () = &mut stop => break,
                accepted = listener.accept() => match accepted {
                    Ok(accepted) => accepted,
                    Err(e) => {
                        accept_failed(&e).await;
                        continue;
                    }
                },
            };
            let app = app.clone();
            let body_timeout = limits.body_timeout;
            let service = hyper::service::service_fn(move |request: hyper::Request<Incoming>| {
                let mut app = app.clone();
                let request = request.map(|body| Deadline::new(body, body_timeout));
                async move {
                    let response: axum::response::Response =
                        tower_service::Service::call(&mut app, request).await?;
                    Ok::<_, Infallible>(response)
                }
            });
            let connection = http.serve_connection(TokioIo::new(stream), service);
            let connection = graceful.watch(connection);
            tokio::spawn(async move {
                if let Err(e) = connection.await {
                    tracing::debug!(error = %e, "an HTTP connection ended in an error");
                }
                drop(permit);
            });
        }
        drop(listener);
        if tokio::time::timeout(DRAIN, graceful.shutdown())
            .await
            .is_err()
        {
            tracing::info!(
                after = ?DRAIN,
                "HTTP connections still open at the stop were closed"
            );
        }
    })
}

/// After a failed accept: a connection reset before it was taken is
/// nothing; anything else (out of file descriptors) is logged, and the
/// next accept waits a second, as it would likely fail the same way.
async fn accept_failed(e: &std::io::Error) {
    use std::io::ErrorKind::{ConnectionAborted, ConnectionRefused, ConnectionReset};
    if matches!(
        e.kind(),
        ConnectionAborted | ConnectionRefused | ConnectionReset
    ) {
        return;
    }
    tracing::error!(error = %e, "accepting an HTTP connection failed");
    tokio::time::sleep(Duration::from_secs(1)).await;
}

/// A request body that fails once it has not arrived whole by its
/// deadline. The timer is made only when the body is first waited for (a
/// request without a body, or whose body came with its head, makes none).
struct Deadline<B> {
    inner: B,
    deadline: Instant,
    timeout: Duration,
    sleep: Option<Pin<Box<Sleep>>>,
}

impl<B> Deadline<B> {
    fn new(inner: B, timeout: Duration) -> Self {
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
struct TooSlow(Duration);

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
