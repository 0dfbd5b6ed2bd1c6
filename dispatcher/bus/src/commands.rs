//! Commands to transport workers (`send_sms` through a `nats` provider):
//! the bus backend provides the handlers' command port, since commands
//! travel on its NATS connection (or, on the embedded bus, cannot travel).

use async_nats::jetstream;
use switchboard_handlers::ports::CommandPort;
use tracing::Instrument;

/// The name of the stream that keeps outbound commands until transport
/// workers take them.
pub const OUTBOUND_STREAM: &str = "VUMI_OUTBOUND";

/// Commands published to JetStream (stream `VUMI_OUTBOUND`, `{prefix}.outbound.>`),
/// each with its message id as `Nats-Msg-Id`.
#[derive(Debug, Clone)]
pub struct NatsCommands {
    js: jetstream::Context,
    prefix: String,
}

impl NatsCommands {
    /// Makes sure the outbound stream exists (kept on `replicas` servers).
    pub async fn new(
        client: async_nats::Client,
        prefix: &str,
        replicas: usize,
    ) -> Result<Self, String> {
        let js = jetstream::new(client);
        crate::nats::ensure_stream(
            &js,
            jetstream::stream::Config {
                name: switchboard_sdk::nats::stream_name(prefix, OUTBOUND_STREAM),
                subjects: vec![format!("{prefix}.outbound.>")],
                duplicate_window: switchboard_sdk::nats::DUPLICATE_WINDOW,
                num_replicas: replicas,
                ..Default::default()
            },
        )
        .await?;
        Ok(Self {
            js,
            prefix: prefix.to_string(),
        })
    }
}

#[async_trait::async_trait]
impl CommandPort for NatsCommands {
    async fn publish(&self, subject: &str, payload: Vec<u8>, msg_id: &str) -> Result<(), String> {
        let subject = self.subject(subject);
        let span = tracing::info_span!(
            target: switchboard_engine::otel::TARGET,
            "publish",
            otel.name = %format_args!("publish {subject}"),
            otel.kind = "producer",
            otel.status_code = tracing::field::Empty,
            otel.status_description = tracing::field::Empty,
            messaging.system = "nats",
            messaging.operation.type = "send",
            messaging.operation.name = "publish",
            messaging.destination.name = %subject,
            messaging.message.id = msg_id,
        );
        let publish = async {
            // The command carries the span's trace context to the worker.
            let mut publish = jetstream::message::PublishMessage::build()
                .payload(payload.into())
                .message_id(msg_id);
            for (name, value) in switchboard_sdk::trace_context::current_headers() {
                publish = publish.header(name, value.as_str());
            }
            self.js
                .send_publish(subject, publish)
                .await
                .map_err(|e| e.to_string())?
                .await
                .map(|_| ())
                .map_err(|e| e.to_string())
        };
        let published = publish.instrument(span.clone()).await;
        if let Err(e) = &published {
            switchboard_engine::otel::failed(&span, e);
        }
        published
    }

    fn subject(&self, suffix: &str) -> String {
        format!("{}.{suffix}", self.prefix)
    }
}

/// Commands on the embedded bus: there is no transport worker to take them.
#[derive(Debug, Clone)]
pub struct NoCommands;

#[async_trait::async_trait]
impl CommandPort for NoCommands {
    async fn publish(&self, subject: &str, _: Vec<u8>, _: &str) -> Result<(), String> {
        Err(format!(
            "{subject}: commands to workers need the dispatcher on NATS (run with --nats); this one runs on the embedded bus"
        ))
    }

    fn subject(&self, suffix: &str) -> String {
        suffix.to_string()
    }
}
