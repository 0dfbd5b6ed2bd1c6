//! The API's server holds each connection to its limits: one that sends no
//! request (or half of one) is closed after `http.header_timeout`, a body
//! that has not arrived whole within `http.body_timeout` is refused, and
//! connections past `http.max_connections` wait until one closes.

use std::time::{Duration, Instant};

use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;

use crate::util::Dispatcher;

async fn connect(d: &Dispatcher) -> TcpStream {
    let addr = d.url().trim_start_matches("http://").trim_end_matches('/');
    TcpStream::connect(addr)
        .await
        .unwrap_or_else(|e| panic!("connecting to {addr}: {e}"))
}

/// What `stream` receives until the server closes it or `within` passes,
/// and whether it closed.
async fn read_for(stream: &mut TcpStream, within: Duration) -> (String, bool) {
    let mut got = Vec::new();
    let mut buf = [0u8; 4096];
    let deadline = tokio::time::Instant::now() + within;
    let closed = loop {
        match tokio::time::timeout_at(deadline, stream.read(&mut buf)).await {
            Err(_) => break false,
            Ok(Ok(0) | Err(_)) => break true,
            Ok(Ok(n)) => got.extend_from_slice(&buf[..n]),
        }
    };
    (String::from_utf8_lossy(&got).into_owned(), closed)
}

const HEALTH: &[u8] = b"GET /healthz HTTP/1.1\r\nHost: switchboard\r\n\r\n";

#[tokio::test]
async fn a_connection_without_a_whole_request_head_is_closed_after_the_header_timeout() {
    let d = Dispatcher::with_config(None, "[http]\nheader_timeout = \"1s\"\n");
    let started = Instant::now();
    let mut silent = connect(&d).await;
    let mut half = connect(&d).await;
    half.write_all(b"GET /healthz HTTP/1.1\r\nHost: switchboard\r\n")
        .await
        .unwrap();
    let mut kept = connect(&d).await;
    kept.write_all(HEALTH).await.unwrap();

    let (nothing, closed) = read_for(&mut silent, Duration::from_secs(15)).await;
    assert!(closed && nothing.is_empty(), "{nothing:?}");
    let (nothing, closed) = read_for(&mut half, Duration::from_secs(15)).await;
    assert!(closed && nothing.is_empty(), "{nothing:?}");
    // Answered, then closed once it had waited the timeout for its next.
    let (answer, closed) = read_for(&mut kept, Duration::from_secs(15)).await;
    assert!(answer.starts_with("HTTP/1.1 200"), "{answer:?}");
    assert!(closed, "the kept-alive connection stayed open");
    assert!(
        started.elapsed() >= Duration::from_millis(900),
        "closed before the timeout: {:?}",
        started.elapsed()
    );
}

#[tokio::test]
async fn a_body_that_has_not_arrived_within_the_body_timeout_is_refused() {
    let d = Dispatcher::with_config(None, "[http]\nbody_timeout = \"1s\"\n");
    let event = serde_json::to_string(&crate::util::event(
        "acme",
        "survey",
        "poll_complete",
        "c-1",
        serde_json::json!({}),
    ))
    .unwrap();
    let head = |length: usize| {
        format!(
            "POST /v1/events HTTP/1.1\r\nHost: switchboard\r\nAuthorization: Bearer {}\r\n\
             Content-Type: application/json\r\nContent-Length: {length}\r\n\r\n",
            d.admin_token()
        )
    };
    // Half the body, then nothing.
    let mut slow = connect(&d).await;
    let started = Instant::now();
    slow.write_all(head(event.len()).as_bytes()).await.unwrap();
    slow.write_all(&event.as_bytes()[..event.len() / 2])
        .await
        .unwrap();
    let (answer, _) = read_for(&mut slow, Duration::from_secs(15)).await;
    assert!(answer.starts_with("HTTP/1.1 400"), "{answer:?}");
    assert!(answer.contains(r#""code":"invalid_body""#), "{answer:?}");
    assert!(answer.contains("http.body_timeout"), "{answer:?}");
    assert!(
        started.elapsed() >= Duration::from_millis(900),
        "refused before the timeout: {:?}",
        started.elapsed()
    );
    // A body in time is taken.
    let mut prompt = connect(&d).await;
    prompt
        .write_all(format!("{}{event}", head(event.len())).as_bytes())
        .await
        .unwrap();
    let (answer, _) = read_for(&mut prompt, Duration::from_secs(3)).await;
    assert!(answer.starts_with("HTTP/1.1 202"), "{answer:?}");
}

#[tokio::test]
async fn connections_past_the_cap_wait_until_one_closes() {
    let d = Dispatcher::with_config(None, "[http]\nmax_connections = 2\n");
    let first = connect(&d).await;
    let mut second = connect(&d).await;
    second.write_all(HEALTH).await.unwrap();
    let (answer, _) = read_for(&mut second, Duration::from_secs(5)).await;
    assert!(answer.starts_with("HTTP/1.1 200"), "{answer:?}");
    // The third is connected (the listen backlog) but not taken up.
    let mut third = connect(&d).await;
    third.write_all(HEALTH).await.unwrap();
    let (nothing, closed) = read_for(&mut third, Duration::from_secs(2)).await;
    assert!(nothing.is_empty() && !closed, "{nothing:?}");
    // One closes: the third is answered.
    drop(first);
    let (answer, _) = read_for(&mut third, Duration::from_secs(5)).await;
    assert!(answer.starts_with("HTTP/1.1 200"), "{answer:?}");
}
