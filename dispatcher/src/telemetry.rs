//! Logging to stderr and, when configured, OpenTelemetry traces exported
//! over OTLP/HTTP.
//!
//! Traces are off unless an endpoint is configured: `[otel] endpoint` in the
//! config file, or the standard `OTEL_EXPORTER_OTLP_ENDPOINT` (or
//! `OTEL_EXPORTER_OTLP_TRACES_ENDPOINT`) variable, which wins. The other
//! standard variables hold as the OpenTelemetry SDK reads them:
//! `OTEL_SERVICE_NAME` (else `[otel] service_name`, else `switchboard`),
//! `OTEL_RESOURCE_ATTRIBUTES`, `OTEL_TRACES_SAMPLER` and `_ARG` (else
//! `[otel] sampler`), `OTEL_BSP_*` for the batch processor, and
//! `OTEL_SDK_DISABLED=true` turns it all off.
//!
//! The spans are `tracing` spans of the target [`switchboard_engine::otel::TARGET`],
//! which only the OpenTelemetry layer takes: they never reach the log, and
//! with traces off no layer is interested in them, so creating one costs a
//! check of its call site's cached interest and nothing more.

use std::time::Duration;

use serde::Deserialize;
use tracing_subscriber::Layer;
use tracing_subscriber::layer::SubscriberExt;
use tracing_subscriber::util::SubscriberInitExt;

/// `[otel]`
#[derive(Debug, Clone, Default, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct OtelConfig {
    /// The OTLP/HTTP endpoint's base URL (`http://collector:4318`): spans go
    /// to `{endpoint}/v1/traces` as protobuf. Unset: no traces (unless
    /// `OTEL_EXPORTER_OTLP_ENDPOINT` is set).
    pub endpoint: Option<String>,
    /// The `service.name` of the spans (default `switchboard`;
    /// `OTEL_SERVICE_NAME` wins).
    pub service_name: Option<String>,
    /// Which traces are kept: `parentbased_always_on` (the default: a
    /// worker's sampled trace is continued, a new one is kept),
    /// `always_on`, `always_off`, `parentbased_always_off`,
    /// `traceidratio` or `parentbased_traceidratio` with `sampler_ratio`.
    /// `OTEL_TRACES_SAMPLER` wins.
    pub sampler: Option<String>,
    /// The fraction of new traces a ratio sampler keeps (0.0–1.0).
    pub sampler_ratio: Option<f64>,
}

impl OtelConfig {
    /// Checks the sampler's name and ratio.
    pub fn check(&self) -> Result<(), String> {
        self.sampler().map(|_| ())
    }

    fn sampler(&self) -> Result<Option<opentelemetry_sdk::trace::Sampler>, String> {
        use opentelemetry_sdk::trace::Sampler;
        let ratio = || match self.sampler_ratio {
            Some(r) if (0.0..=1.0).contains(&r) => Ok(r),
            Some(r) => Err(format!(
                "otel.sampler_ratio is a fraction from 0.0 to 1.0, not {r}"
            )),
            None => Err(format!(
                "otel.sampler = {:?} needs otel.sampler_ratio (a fraction from 0.0 to 1.0)",
                self.sampler.as_deref().unwrap_or_default()
            )),
        };
        Ok(Some(match self.sampler.as_deref() {
            None => return Ok(None),
            Some("always_on") => Sampler::AlwaysOn,
            Some("always_off") => Sampler::AlwaysOff,
            Some("parentbased_always_on") => Sampler::ParentBased(Box::new(Sampler::AlwaysOn)),
            Some("parentbased_always_off") => Sampler::ParentBased(Box::new(Sampler::AlwaysOff)),
            Some("traceidratio") => Sampler::TraceIdRatioBased(ratio()?),
            Some("parentbased_traceidratio") => {
                Sampler::ParentBased(Box::new(Sampler::TraceIdRatioBased(ratio()?)))
            }
            Some(other) => {
                return Err(format!(
                    "otel.sampler is one of always_on, always_off, parentbased_always_on, \
                     parentbased_always_off, traceidratio, parentbased_traceidratio; not {other:?}"
                ));
            }
        }))
    }

    /// Where spans go, if anywhere: the standard variables first, then the
    /// config file.
    fn traces_endpoint(&self) -> Option<String> {
        let var = |name: &str| std::env::var(name).ok().filter(|v| !v.trim().is_empty());
        if var("OTEL_SDK_DISABLED").is_some_and(|v| v.trim().eq_ignore_ascii_case("true")) {
            return None;
        }
        let base = |url: String| format!("{}/v1/traces", url.trim_end_matches('/'));
        var("OTEL_EXPORTER_OTLP_TRACES_ENDPOINT")
            .or_else(|| var("OTEL_EXPORTER_OTLP_ENDPOINT").map(base))
            .or_else(|| self.endpoint.clone().filter(|e| !e.is_empty()).map(base))
    }
}

/// What [`init`] set up: flushes the spans still buffered at
/// [`Telemetry::shutdown`].
#[derive(Debug, Default)]
pub struct Telemetry {
    provider: Option<opentelemetry_sdk::trace::SdkTracerProvider>,
}

impl Telemetry {
    /// Exports what is buffered and stops the exporter (waiting at most a
    /// few seconds for the collector).
    pub async fn shutdown(self) {
        let Some(provider) = self.provider else {
            return;
        };
        let done = tokio::task::spawn_blocking(move || {
            provider.shutdown_with_timeout(Duration::from_secs(5))
        })
        .await;
        if let Ok(Err(e)) = done {
            tracing::warn!(error = %e, "exporting the last spans failed");
        }
    }
}

/// Whether log lines are coloured: only on a terminal, and never with
/// `NO_COLOR` set to anything but the empty string (no-color.org).
fn colour() -> bool {
    use std::io::IsTerminal;
    std::io::stderr().is_terminal() && std::env::var_os("NO_COLOR").is_none_or(|v| v.is_empty())
}

/// Sets up logging to stderr (human-readable text, or JSON lines with
/// `json`; `RUST_LOG` overrides `default_filter`, e.g. `info`) and, when
/// `otel` (or the environment) names an endpoint, the export of spans.
/// An exporter that cannot be built is reported and left out: traces are
/// not worth refusing to start over.
pub fn init(json: bool, default_filter: &str, otel: Option<&OtelConfig>) -> Telemetry {
    use tracing_subscriber::EnvFilter;
    use tracing_subscriber::filter::{LevelFilter, Targets};
    type Boxed = Box<dyn Layer<tracing_subscriber::Registry> + Send + Sync>;

    let mut filter =
        EnvFilter::try_from_default_env().unwrap_or_else(|_| EnvFilter::new(default_filter));
    // The spans for OpenTelemetry never go to the log.
    if let Ok(off) = format!("{}=off", switchboard_engine::otel::TARGET).parse() {
        filter = filter.add_directive(off);
    }
    let log = tracing_subscriber::fmt::layer()
        .with_ansi(colour())
        .with_writer(std::io::stderr);
    let log: Boxed = if json {
        log.json().with_filter(filter).boxed()
    } else {
        log.with_filter(filter).boxed()
    };
    let (provider, problem) = match otel.map(exporter).unwrap_or(Ok(None)) {
        Ok(provider) => (provider, None),
        Err(e) => (None, Some(e)),
    };
    let (provider, endpoint) = provider.unzip();
    let spans: Option<Boxed> = provider.as_ref().map(|provider| {
        use opentelemetry::trace::TracerProvider as _;
        tracing_opentelemetry::layer()
            .with_tracer(provider.tracer("switchboard"))
            .with_location(false)
            .with_threads(false)
            .with_filter(
                Targets::new().with_target(switchboard_engine::otel::TARGET, LevelFilter::TRACE),
            )
            .boxed()
    });
    let _ = tracing_subscriber::registry()
        .with(
            vec![Some(log), spans]
                .into_iter()
                .flatten()
                .collect::<Vec<_>>(),
        )
        .try_init();
    if let Some(problem) = problem {
        tracing::error!(error = %problem, "OpenTelemetry traces are off");
    }
    if let Some(endpoint) = endpoint {
        tracing::info!(endpoint, "exporting OpenTelemetry traces");
    }
    Telemetry { provider }
}

/// The tracer provider exporting to the configured endpoint, and the endpoint.
fn exporter(
    config: &OtelConfig,
) -> Result<Option<(opentelemetry_sdk::trace::SdkTracerProvider, String)>, String> {
    use opentelemetry_otlp::{Protocol, WithExportConfig};
    let Some(endpoint) = config.traces_endpoint() else {
        return Ok(None);
    };
    let exporter = opentelemetry_otlp::SpanExporter::builder()
        .with_http()
        .with_protocol(Protocol::HttpBinary)
        .with_endpoint(endpoint.clone())
        .build()
        .map_err(|e| format!("the OTLP exporter to {endpoint}: {e}"))?;
    let mut resource = opentelemetry_sdk::Resource::builder();
    if std::env::var_os("OTEL_SERVICE_NAME").is_none() {
        resource = resource.with_service_name(
            config
                .service_name
                .clone()
                .unwrap_or_else(|| "switchboard".to_string()),
        );
    }
    let mut provider = opentelemetry_sdk::trace::SdkTracerProvider::builder()
        .with_batch_exporter(exporter)
        .with_resource(resource.build());
    if std::env::var_os("OTEL_TRACES_SAMPLER").is_none()
        && let Some(sampler) = config.sampler()?
    {
        provider = provider.with_sampler(sampler);
    }
    Ok(Some((provider.build(), endpoint)))
}
