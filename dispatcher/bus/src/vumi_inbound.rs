//! Vumi inbound messages on NATS: what transport workers publish on
//! `{prefix}.inbound.{transport}` when a person texts one of their
//! numbers. The stream `VUMI_INBOUND` keeps them (for a week, acked or
//! not: an operator can read what was received), and one durable consumer,
//! shared by every replica, hands each to one dispatcher, which makes it a
//! reply of the number's owner.

use std::time::Duration;

use async_nats::jetstream;
use async_nats::jetstream::consumer::pull;
use futures::StreamExt as _;

/// The stream of inbound messages.
pub const INBOUND_STREAM: &str = "VUMI_INBOUND";

/// The consumer every dispatcher shares.
const CONSUMER: &str = "switchboard-replies";

/// How long the stream keeps a message.
const KEPT_FOR: Duration = Duration::from_secs(7 * 24 * 3600);

/// One inbound message: its transport (from the subject) and its bytes.
pub struct Inbound {
    /// The transport worker's name (`{prefix}.inbound.{transport}`).
    pub transport: String,
    /// The Vumi message as published.
    pub payload: Vec<u8>,
    message: jetstream::Message,
}

impl std::fmt::Debug for Inbound {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Inbound")
            .field("transport", &self.transport)
            .finish_non_exhaustive()
    }
}

impl Inbound {
    /// Taken: the stream need not hand it out again.
    pub async fn done(self) {
        if let Err(e) = self.message.double_ack().await {
            tracing::warn!(transport = self.transport, error = %e,
                "acknowledging an inbound message failed: it comes again, and is the same event");
        }
    }

    /// Not taken now: handed out again after `delay`.
    pub async fn later(self, delay: Duration) {
        let nak = jetstream::AckKind::Nak(Some(delay));
        if let Err(e) = self.message.ack_with(nak).await {
            tracing::warn!(transport = self.transport, error = %e, "refusing an inbound message failed");
        }
    }
}

/// The inbound messages of every transport.
#[derive(Debug)]
pub struct VumiInbound {
    consumer: jetstream::consumer::Consumer<pull::Config>,
    prefix: String,
}

impl VumiInbound {
    /// Makes sure the stream (on `replicas` servers) and the consumer exist.
    pub async fn open(
        client: async_nats::Client,
        prefix: &str,
        replicas: usize,
    ) -> Result<Self, String> {
        let js = jetstream::new(client);
        let name = switchboard_sdk::nats::stream_name(prefix, INBOUND_STREAM);
        crate::nats::ensure_stream(
            &js,
            jetstream::stream::Config {
                name: name.clone(),
                subjects: vec![format!("{prefix}.inbound.>")],
                max_age: KEPT_FOR,
                duplicate_window: switchboard_sdk::nats::DUPLICATE_WINDOW,
                num_replicas: replicas,
                ..Default::default()
            },
        )
        .await?;
        let stream = js
            .get_stream(&name)
            .await
            .map_err(|e| format!("reading stream {name}: {e}"))?;
        let consumer = stream
            .get_or_create_consumer(
                CONSUMER,
                pull::Config {
                    durable_name: Some(CONSUMER.to_string()),
                    ack_wait: Duration::from_secs(30),
                    ..Default::default()
                },
            )
            .await
            .map_err(|e| format!("the consumer {CONSUMER} of stream {name}: {e}"))?;
        Ok(Self {
            consumer,
            prefix: prefix.to_string(),
        })
    }

    /// Hands each inbound message to `take` until the connection ends.
    pub async fn run<F, Fut>(&self, mut take: F) -> Result<(), String>
    where
        F: FnMut(Inbound) -> Fut,
        Fut: std::future::Future<Output = ()>,
    {
        let mut messages = self
            .consumer
            .messages()
            .await
            .map_err(|e| format!("reading {CONSUMER}: {e}"))?;
        let subject_start = format!("{}.inbound.", self.prefix);
        while let Some(message) = messages.next().await {
            let message = match message {
                Ok(m) => m,
                Err(e) => {
                    tracing::warn!(error = %e, "reading inbound messages");
                    continue;
                }
            };
            let transport = message
                .subject
                .as_str()
                .strip_prefix(&subject_start)
                .unwrap_or_default()
                .to_string();
            take(Inbound {
                transport,
                payload: message.payload.to_vec(),
                message,
            })
            .await;
        }
        Ok(())
    }
}
