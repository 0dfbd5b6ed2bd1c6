//! The payment gateway of the chains that end in `payment_webhook`: an
//! HTTP/1.1 server with keep-alive on loopback in this program, which
//! answers every webhook 200 and notes when each arrived. The dispatchers
//! may call it because they run with `--outbound-allow 127.0.0.1`.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use anyhow::bail;
use axum::extract::State;
use axum::http::StatusCode;
use bytes::Bytes;
use switchboard_sdk::VumiApiEvent;

use crate::common::Dispatcher;

/// The account secret the webhooks are signed with, by its name in the
/// `payment_webhook` steps.
pub const SECRET_NAME: &str = "gateway";
const SECRET: &str = "whsec_MfKQ9r8GKYqrTwjUPD8ILPZIo2LaLaSw";

/// Gives `account` the secret [`SECRET_NAME`], through the dispatcher's API.
pub async fn put_secret(dispatcher: &Dispatcher, account: &str) -> anyhow::Result<()> {
    dispatcher
        .put_text(
            &format!("/v1/accounts/{account}/secrets/{SECRET_NAME}"),
            SECRET.into(),
            "text/plain",
        )
        .await?;
    Ok(())
}

/// When each of a run's events was first seen arriving (a webhook, an
/// emitted event), by the id it refers to, and how many arrived again.
#[derive(Debug, Default)]
pub struct Arrivals {
    first: HashMap<String, Instant>,
    repeats: u64,
}

impl Arrivals {
    /// `reference` arrived at `at`.
    pub fn note(&mut self, reference: String, at: Instant) {
        match self.first.entry(reference) {
            std::collections::hash_map::Entry::Occupied(_) => self.repeats += 1,
            std::collections::hash_map::Entry::Vacant(v) => {
                v.insert(at);
            }
        }
    }

    /// How many arrived again.
    pub fn repeats(&self) -> u64 {
        self.repeats
    }
}

/// Waits until every one of `events` has arrived in `arrivals` (what
/// arrives is `what`, for the error when none comes for a while); returns
/// their arrivals.
pub async fn wait_for(
    arrivals: &Mutex<Arrivals>,
    what: &str,
    events: &[VumiApiEvent],
    dispatchers: &mut [Dispatcher],
) -> anyhow::Result<HashMap<String, Instant>> {
    const STALL: Duration = Duration::from_secs(60);
    let ids: Vec<String> = events.iter().map(|e| e.id.to_string()).collect();
    let mut seen = 0;
    let mut progressed = Instant::now();
    loop {
        {
            let arrivals = arrivals.lock().expect("arrivals");
            let arrived = ids
                .iter()
                .filter(|id| arrivals.first.contains_key(*id))
                .count();
            if arrived == ids.len() {
                return Ok(ids
                    .into_iter()
                    .map(|id| {
                        let at = arrivals.first[&id];
                        (id, at)
                    })
                    .collect());
            }
            if arrived > seen {
                seen = arrived;
                progressed = Instant::now();
            }
        }
        for d in dispatchers.iter_mut() {
            d.check_alive()?;
        }
        if progressed.elapsed() > STALL {
            let logs: Vec<String> = dispatchers.iter().map(Dispatcher::log_tail).collect();
            bail!(
                "no {what} for {STALL:?} at {seen} of {}:\n{}",
                ids.len(),
                logs.join("\n--\n")
            );
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

/// The payment gateway: an HTTP/1.1 server with keep-alive that answers every
/// webhook 200 and notes when it arrived.
#[derive(Debug)]
pub struct Receiver {
    pub addr: std::net::SocketAddr,
    arrivals: Arc<Mutex<Arrivals>>,
    task: tokio::task::JoinHandle<()>,
}

impl Receiver {
    pub async fn start() -> anyhow::Result<Self> {
        let arrivals = Arc::new(Mutex::new(Arrivals::default()));
        let app = axum::Router::new()
            .route("/payments", axum::routing::post(payment))
            .with_state(arrivals.clone());
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await?;
        let addr = listener.local_addr()?;
        let task = tokio::spawn(async move {
            let _ = axum::serve(listener, app).await;
        });
        Ok(Self {
            addr,
            arrivals,
            task,
        })
    }

    /// Webhooks that arrived again for an event.
    pub fn repeats(&self) -> u64 {
        self.arrivals.lock().expect("arrivals").repeats
    }

    /// Events with a webhook.
    pub fn arrived(&self) -> usize {
        self.arrivals.lock().expect("arrivals").first.len()
    }

    /// Waits until every one of `events` has arrived; returns their arrivals.
    pub async fn wait_for(
        &self,
        events: &[VumiApiEvent],
        dispatchers: &mut [Dispatcher],
    ) -> anyhow::Result<HashMap<String, Instant>> {
        wait_for(&self.arrivals, "webhook", events, dispatchers).await
    }
}

impl Drop for Receiver {
    fn drop(&mut self) {
        self.task.abort();
    }
}

async fn payment(State(arrivals): State<Arc<Mutex<Arrivals>>>, body: Bytes) -> StatusCode {
    let at = Instant::now();
    let Some(reference) = serde_json::from_slice::<serde_json::Value>(&body)
        .ok()
        .and_then(|v| v["reference"].as_str().map(str::to_string))
    else {
        return StatusCode::BAD_REQUEST;
    };
    arrivals.lock().expect("arrivals").note(reference, at);
    StatusCode::OK
}
