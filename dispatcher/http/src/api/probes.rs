//! The probes and the metrics: `/healthz`, `/readyz`, `/metrics` (no token).

use super::*;

pub(super) async fn healthz() -> Json<Health> {
    Json(Health {
        status: "ok".to_string(),
    })
}

pub(super) async fn readyz(State(s): State<ApiState>) -> Response {
    let bus = s.bus.is_ready();
    // The store answers reads (it is open and its files are readable).
    let store = s
        .store
        .get(switchboard_store::Collection::Chains, b"")
        .is_ok();
    let started = s.ready.load(std::sync::atomic::Ordering::SeqCst);
    let caught_up = s.store.is_caught_up();
    let ready = started && bus && store && caught_up;
    let status = if ready {
        StatusCode::OK
    } else {
        StatusCode::SERVICE_UNAVAILABLE
    };
    (
        status,
        Json(Readiness {
            ready,
            bus: s.bus.kind().to_string(),
            bus_connected: bus,
            store_open: store,
            started,
            replicated: s.store.is_replicated(),
            caught_up,
            partitions: s.partitions.as_ref().map(|p| p.borrow().clone()),
            state_partitions: s.store.held_partitions(),
        }),
    )
        .into_response()
}

pub(super) async fn metrics(State(s): State<ApiState>, headers: HeaderMap) -> Response {
    use switchboard_engine::metrics::{CONTENT_TYPE, PROMETHEUS_CONTENT_TYPE};
    let gauges = Gauges {
        bus_lag: s.bus.lag().await,
        rhai_operations: s.registry.runtime().operations_total(),
        store_flushes: s.store.flushes(),
        changelog_undecodable: s.store.undecodable_records(),
        timers_pending: s.timers.pending(),
        digests_open: switchboard_engine::executor::open_windows(&s.store),
        runtime_worker_threads: tokio::runtime::Handle::current().metrics().num_workers() as u64,
        runtime_event_threads: s.event_threads as u64,
    };
    // OpenMetrics when asked for (as Prometheus asks), else the older
    // Prometheus text that every scraper reads.
    let openmetrics = headers
        .get_all(header::ACCEPT)
        .iter()
        .filter_map(|v| v.to_str().ok())
        .any(|v| v.contains("application/openmetrics-text"));
    if openmetrics {
        (
            [(header::CONTENT_TYPE, CONTENT_TYPE)],
            s.metrics.render(&gauges),
        )
            .into_response()
    } else {
        (
            [(header::CONTENT_TYPE, PROMETHEUS_CONTENT_TYPE)],
            s.metrics.render_prometheus(&gauges),
        )
            .into_response()
    }
}
