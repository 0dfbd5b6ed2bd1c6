//! The OpenTelemetry spans of an event's handling, following the
//! messaging semantic conventions: a `process` span (kind consumer) per
//! delivery of an event, a span per chain it runs, a span per step, and a
//! `publish` span (kind producer) per child event put on the bus; the
//! outbound ports add a client span per call (HTTP, SMTP, NATS commands).
//!
//! They are `tracing` spans of the target [`TARGET`], which only the
//! OpenTelemetry layer takes (`switchboard-dispatcher`'s telemetry sets it
//! up when traces are configured): with traces off, no subscriber is
//! interested in them and creating one is a check of its call site's
//! cached interest.
//!
//! A delivery's W3C trace context (NATS headers, or the ingest request's,
//! carried by the bus) is the `process` span's parent. Its first pass
//! writes the span's context into the event's journal record; a later pass
//! (a retry, a redelivery after a crash, a replay from dead letters, a
//! paused chain going on) links to it, and continues its trace when the
//! delivery carries none.
//!
//! Numbers go into spans as `i64`: the OpenTelemetry layer would keep an
//! unsigned one as text.

use opentelemetry::trace::TraceContextExt;
use switchboard_sdk::{VumiApiEvent, trace_context};
use tracing::Span;
use tracing::field::Empty;
use tracing_opentelemetry::OpenTelemetrySpanExt;

/// The target of the spans meant for OpenTelemetry.
pub const TARGET: &str = "otel";

/// The consumer group the dispatchers form, in `messaging.consumer.group.name`.
const CONSUMER_GROUP: &str = "switchboard";

/// The `process` span of one delivery of `event`: its parent is the trace
/// context the delivery carried, else the one the event's first pass
/// recorded (`recorded`, a `traceparent`), which it links to as well.
pub fn process(
    event: &VumiApiEvent,
    delivery: (&str, u32, &[(String, String)]),
    system: &str,
    prefix: &str,
    recorded: Option<&str>,
) -> Span {
    let (subject, attempt, headers) = delivery;
    let span = tracing::info_span!(
        target: TARGET,
        "process",
        otel.name = %format_args!("process {}", events_template(prefix)),
        otel.kind = "consumer",
        otel.status_code = Empty,
        otel.status_description = Empty,
        messaging.system = system,
        messaging.operation.type = "process",
        messaging.operation.name = "process",
        messaging.destination.name = subject,
        messaging.destination.template = %events_template(prefix),
        messaging.message.id = %event.id,
        messaging.message.conversation_id = %event.conversation_key,
        messaging.consumer.group.name = CONSUMER_GROUP,
        switchboard.account = %event.account_key,
        switchboard.conversation_type = %event.conversation_type,
        switchboard.event_type = %event.event_type,
        switchboard.depth = i64::from(event.depth),
        switchboard.attempt = i64::from(attempt),
        switchboard.outcome = Empty,
    );
    if span.is_disabled() {
        return span;
    }
    let incoming = trace_context::extract(headers.iter().map(|(n, v)| (n.as_str(), v.as_str())));
    let earlier =
        recorded.and_then(|tp| trace_context::extract([(trace_context::TRACEPARENT, tp)]));
    if let Some(parent) = incoming.or_else(|| earlier.clone()) {
        let _ = span.set_parent(parent);
    }
    if let Some(earlier) = earlier {
        span.add_link(earlier.span().span_context().clone());
    }
    span
}

/// The current span's trace context as a `traceparent`, if traces are on
/// (for the journal, on an event's first pass).
pub fn current_traceparent() -> Option<String> {
    if !on() {
        return None;
    }
    let cx = Span::current().context();
    trace_context::headers_of(&cx)
        .into_iter()
        .find(|(name, _)| *name == trace_context::TRACEPARENT)
        .map(|(_, value)| value)
}

/// The events subjects' template, `messaging.destination.template`.
fn events_template(prefix: &str) -> String {
    format!("{prefix}.events.{{account}}.{{conversation_type}}.{{event_type}}")
}

/// Records how the pass over the event ended on its `process` span.
pub fn outcome(span: &Span, outcome: &str, error: bool) {
    span.record("switchboard.outcome", outcome);
    if error {
        span.record("otel.status_code", "ERROR");
    }
}

/// Marks `span` failed, with `error` as its status description (a span
/// made with `otel.status_code` and `otel.status_description` declared).
pub fn failed(span: &Span, error: &dyn std::fmt::Display) {
    span.record("otel.status_code", "ERROR");
    span.record("otel.status_description", tracing::field::display(error));
}

/// The span of one chain's run in a pass.
pub fn chain(name: &str, version: u64) -> Span {
    tracing::info_span!(
        target: TARGET,
        "chain",
        otel.name = %format_args!("chain {name}"),
        switchboard.chain = name,
        switchboard.chain_version = i64::try_from(version).unwrap_or(i64::MAX),
        switchboard.outcome = Empty,
    )
}

/// The span of one attempt at a step.
pub fn step(chain: &str, step: &str, handler: &str) -> Span {
    tracing::info_span!(
        target: TARGET,
        "step",
        otel.name = %format_args!("step {step}"),
        otel.status_code = Empty,
        otel.status_description = Empty,
        switchboard.chain = chain,
        switchboard.step = step,
        switchboard.handler = handler,
        switchboard.attempt = Empty,
        switchboard.outcome = Empty,
    )
}

/// Records an attempt's end on its step span: which attempt it was, its
/// outcome (`ok`, `stopped`, `skipped`, `retry`, `failed`, `continued`)
/// and, for a failure, the error.
pub fn step_ended(span: &Span, attempt: u32, outcome: &str, error: Option<&str>) {
    span.record("switchboard.attempt", i64::from(attempt));
    span.record("switchboard.outcome", outcome);
    if let Some(error) = error {
        failed(span, &error);
    }
}

/// The `publish` span (kind producer) of a child event put on the bus:
/// the child carries its context, so the child's `process` span is its child.
pub fn publish(child: &VumiApiEvent, system: &str, prefix: &str) -> Span {
    tracing::info_span!(
        target: TARGET,
        "publish",
        otel.name = %format_args!("publish {}", events_template(prefix)),
        otel.kind = "producer",
        messaging.system = system,
        messaging.operation.type = "send",
        messaging.operation.name = "publish",
        messaging.destination.name = %child.subject(prefix),
        messaging.message.id = %child.id,
        messaging.message.conversation_id = %child.conversation_key,
        switchboard.account = %child.account_key,
        switchboard.event_type = %child.event_type,
    )
}

/// The trace id of the current span, when traces are on and it is sampled:
/// the step-duration histogram's exemplar.
/// (OpenTelemetry's current context, read in place: with traces off, one
/// look at a thread-local that holds nothing.)
pub fn current_trace_id() -> Option<String> {
    opentelemetry::Context::map_current(|cx| {
        let span = cx.span();
        let context = span.span_context();
        (context.is_valid() && context.is_sampled()).then(|| context.trace_id().to_string())
    })
}

/// Whether anything takes these spans: a check of a call site's cached
/// interest, so that with traces off nothing else is done.
pub fn on() -> bool {
    tracing::enabled!(target: TARGET, tracing::Level::INFO)
}
