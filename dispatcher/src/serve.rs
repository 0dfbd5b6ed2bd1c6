//! The API's HTTP server: hyper's HTTP/1 connections over the router, with
//! what a port open to the world needs and `axum::serve` does not give: a
//! cap on connections open at once, a time limit on a request's head (and
//! on a kept-alive connection's wait for its next one), and one on its
//! body. Without them a client that opens connections and sends nothing,
//! or a body a byte at a time, holds a task, a socket and its buffers for
//! as long as it likes.

use std::convert::Infallible;
use std::sync::Arc;
use std::time::Duration;

use hyper::body::Incoming;
use hyper_util::rt::{TokioIo, TokioTimer};
use hyper_util::server::graceful::GracefulShutdown;
use switchboard_http::deadline::Deadline;
use tokio::net::TcpListener;
use tokio::sync::{Semaphore, watch};
use tokio::task::{JoinHandle, JoinSet};

use crate::config::HttpConfig;

/// How long connections still open at a stop get to finish their requests.
const DRAIN: Duration = Duration::from_secs(5);

/// The limits the server holds each connection to.
#[derive(Debug, Clone, Copy)]
pub struct Limits {
    /// Connections open at once.
    pub max_connections: usize,
    /// A request's whole head must arrive within this, and a kept-alive
    /// connection's next one within it.
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
/// then stops taking connections, gives those open [`DRAIN`] to finish
/// their requests, and closes the rest; the task ends once none is left.
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
        // Each connection's task (its requests' handlers run in it).
        let mut connections = JoinSet::new();
        loop {
            // A connection past the cap waits in the listen backlog; the
            // tasks of connections that ended are reaped meanwhile.
            let permit = tokio::select! {
                () = &mut stop => break,
                Some(_) = connections.join_next(), if !connections.is_empty() => continue,
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
            connections.spawn(async move {
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
            while connections.try_join_next().is_some() {}
            tracing::info!(
                after = ?DRAIN,
                open = connections.len(),
                "HTTP connections still busy at the stop are closed, their requests cut short"
            );
            connections.abort_all();
        }
        // None is left running when the server's task ends. (A write a
        // handler handed to the blocking pool finishes there even so.)
        while connections.join_next().await.is_some() {}
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
