//! W3C trace context (`traceparent`, `tracestate`) on the wire (feature
//! `otel`).
//!
//! The emitters put the current OpenTelemetry context on what they publish
//! (NATS message headers, HTTP request headers), so that the dispatcher's
//! spans continue the worker's trace. The current context is
//! OpenTelemetry's: a span entered through `tracing` with
//! `tracing-opentelemetry`'s layer (which activates its context on entry),
//! or one attached with the OpenTelemetry API directly. Outside any span,
//! nothing is added.
//!
//! ```
//! use switchboard_sdk::trace_context;
//!
//! let headers = [("traceparent", "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01")];
//! let parent = trace_context::extract(headers).expect("a valid traceparent");
//! assert_eq!(
//!     trace_context::headers_of(&parent)[0].1,
//!     "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01"
//! );
//! ```

use opentelemetry::Context;
use opentelemetry::propagation::{Extractor, Injector, TextMapPropagator};
use opentelemetry::trace::TraceContextExt;
use opentelemetry_sdk::propagation::TraceContextPropagator;

/// The W3C `traceparent` header.
pub const TRACEPARENT: &str = "traceparent";
/// The W3C `tracestate` header.
pub const TRACESTATE: &str = "tracestate";

/// The longest `tracestate` carried on (W3C: at least 512 characters are
/// kept); a longer one is left behind.
const MAX_TRACESTATE: usize = 512;

/// The current OpenTelemetry context as W3C headers: `traceparent`, and
/// `tracestate` when it is not empty. Empty when there is no valid span.
pub fn current_headers() -> Vec<(&'static str, String)> {
    headers_of(&Context::current())
}

/// `cx`'s span as W3C headers; empty when it has no valid span.
pub fn headers_of(cx: &Context) -> Vec<(&'static str, String)> {
    struct Collect(Vec<(&'static str, String)>);
    impl Injector for Collect {
        fn set(&mut self, key: &str, value: String) {
            match key {
                TRACEPARENT => self.0.push((TRACEPARENT, value)),
                TRACESTATE if !value.is_empty() && value.len() <= MAX_TRACESTATE => {
                    self.0.push((TRACESTATE, value));
                }
                _ => {}
            }
        }
    }
    if !cx.span().span_context().is_valid() {
        return Vec::new();
    }
    let mut headers = Collect(Vec::with_capacity(2));
    TraceContextPropagator::new().inject_context(cx, &mut headers);
    headers.0
}

/// The remote span context that `headers` carry (names compared without
/// regard to case; a CloudEvent's `ce-traceparent` and `ce-tracestate`,
/// its distributed-tracing extension, count too), as the parent context
/// of a span. `None` without a valid `traceparent`.
pub fn extract<'a>(headers: impl IntoIterator<Item = (&'a str, &'a str)>) -> Option<Context> {
    struct Headers<'a>([Option<&'a str>; 2]);
    impl Extractor for Headers<'_> {
        fn get(&self, key: &str) -> Option<&str> {
            match key {
                TRACEPARENT => self.0[0],
                TRACESTATE => self.0[1],
                _ => None,
            }
        }
        fn keys(&self) -> Vec<&str> {
            vec![TRACEPARENT, TRACESTATE]
        }
    }
    // The plain headers first, then a CloudEvent's, whatever their order.
    let (mut plain, mut cloudevent) = (Headers([None, None]), Headers([None, None]));
    for (name, value) in headers {
        let (found, name) = match name.get(..3) {
            Some(p) if p.eq_ignore_ascii_case("ce-") => (&mut cloudevent, &name[3..]),
            _ => (&mut plain, name),
        };
        if name.eq_ignore_ascii_case(TRACEPARENT) {
            found.0[0].get_or_insert(value);
        } else if name.eq_ignore_ascii_case(TRACESTATE) && value.len() <= MAX_TRACESTATE {
            found.0[1].get_or_insert(value);
        }
    }
    let found = if plain.0[0].is_some() {
        plain
    } else {
        cloudevent
    };
    found.0[0]?;
    let cx = TraceContextPropagator::new().extract(&found);
    cx.span().span_context().is_valid().then_some(cx)
}

#[cfg(test)]
mod tests {
    use super::*;

    const PARENT: &str = "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01";

    #[test]
    fn a_traceparent_and_its_state_go_through_unchanged() {
        let cx = extract([("TraceParent", PARENT), ("tracestate", "vendor=1")]).unwrap();
        assert_eq!(
            headers_of(&cx),
            vec![
                (TRACEPARENT, PARENT.to_string()),
                (TRACESTATE, "vendor=1".to_string())
            ]
        );
        let span = cx.span().span_context().clone();
        assert!(span.is_remote());
        assert_eq!(
            span.trace_id().to_string(),
            "4bf92f3577b34da6a3ce929d0e0e4736"
        );
    }

    #[test]
    fn a_cloudevents_extension_attribute_counts_but_the_header_comes_first() {
        let other = "00-0af7651916cd43dd8448eb211c80319c-b7ad6b7169203331-01";
        let cx = extract([("ce-traceparent", other)]).unwrap();
        assert!(
            headers_of(&cx)[0]
                .1
                .contains("0af7651916cd43dd8448eb211c80319c")
        );
        let cx = extract([("traceparent", PARENT), ("ce-traceparent", other)]).unwrap();
        assert_eq!(headers_of(&cx)[0].1, PARENT);
        let cx = extract([("ce-traceparent", other), ("traceparent", PARENT)]).unwrap();
        assert_eq!(headers_of(&cx)[0].1, PARENT);
    }

    #[test]
    fn an_oversize_tracestate_is_left_behind() {
        let state = format!("vendor={}", "x".repeat(600));
        let cx = extract([("traceparent", PARENT), ("tracestate", state.as_str())]).unwrap();
        assert_eq!(headers_of(&cx), vec![(TRACEPARENT, PARENT.to_string())]);
    }

    #[test]
    fn no_or_a_malformed_traceparent_is_no_context() {
        assert!(extract([("content-type", "application/json")]).is_none());
        assert!(extract([("traceparent", "00-nothex-00f067aa0ba902b7-01")]).is_none());
        // An all-zero trace id is invalid by the W3C spec.
        assert!(
            extract([(
                "traceparent",
                "00-00000000000000000000000000000000-00f067aa0ba902b7-01"
            )])
            .is_none()
        );
        assert!(current_headers().is_empty());
    }
}
