//! OpenTelemetry (feature `otel`): the operation layer opens one span per request (target
//! [`REQUEST_SPAN_TARGET`], level TRACE: invisible to the log filter unless asked for, and
//! free when no layer wants it) carrying the request id of its audit line, and they are
//! exported in batches over OTLP/gRPC by `tracing-opentelemetry` and `opentelemetry-otlp`.

use std::io::IsTerminal;

use opentelemetry::KeyValue;
use opentelemetry::trace::TracerProvider as _;
use opentelemetry_otlp::WithExportConfig;
use opentelemetry_sdk::Resource;
use opentelemetry_sdk::trace::{Sampler, SdkTracerProvider};
use tracing_subscriber::Layer;
use tracing_subscriber::filter::Targets;
use tracing_subscriber::layer::SubscriberExt;
use tracing_subscriber::util::SubscriberInitExt;

use super::logging::env_filter;
use crate::config::{LogFormat, TracingConfig};
use crate::error::{Error, Result};
use crate::ops::REQUEST_SPAN_TARGET;

/// Exports request spans until dropped; dropping it flushes what is buffered.
pub struct SpanExport {
    provider: SdkTracerProvider,
}

impl Drop for SpanExport {
    fn drop(&mut self) {
        if let Err(err) = self.provider.shutdown() {
            tracing::warn!(error = %err, "flushing the last spans failed");
        }
    }
}

/// Installs the global subscriber: logs as [`super::init_logging`] does, and request spans exported
/// to `tracing.otlp_endpoint`. Call it inside the tokio runtime (the exporter's gRPC channel
/// lives there), and keep the guard until the runtime stops.
pub fn init_logging_and_tracing(
    filter: &str,
    format: LogFormat,
    tracing: &TracingConfig,
) -> Result<SpanExport> {
    let exporter = opentelemetry_otlp::SpanExporter::builder()
        .with_tonic()
        .with_endpoint(&tracing.otlp_endpoint)
        .build()
        .map_err(|err| Error::Config(format!("tracing.otlp_endpoint: {err}")))?;
    let host = nix::unistd::gethostname()
        .ok()
        .and_then(|h| h.into_string().ok())
        .unwrap_or_default();
    let resource = Resource::builder()
        .with_service_name(tracing.service_name.clone())
        .with_attributes([
            KeyValue::new("service.version", env!("CARGO_PKG_VERSION")),
            KeyValue::new("host.name", host),
        ])
        .build();
    let provider = SdkTracerProvider::builder()
        .with_batch_exporter(exporter)
        .with_sampler(Sampler::ParentBased(Box::new(Sampler::TraceIdRatioBased(
            tracing.sample_ratio,
        ))))
        .with_resource(resource)
        .build();
    let spans = tracing_opentelemetry::layer()
        .with_tracer(provider.tracer("wrapd"))
        .with_filter(Targets::new().with_target(REQUEST_SPAN_TARGET, tracing::Level::TRACE));
    let logs = tracing_subscriber::fmt::layer()
        .with_ansi(std::io::stderr().is_terminal())
        .with_writer(std::io::stderr);
    let logs = match format {
        LogFormat::Text => logs.boxed(),
        LogFormat::Json => logs.json().boxed(),
    };
    tracing_subscriber::registry()
        .with(logs.with_filter(env_filter(filter)))
        .with(spans)
        .try_init()
        .map_err(|err| Error::Internal(format!("cannot install the tracing subscriber: {err}")))?;
    tracing::info!(endpoint = %tracing.otlp_endpoint, sample_ratio = tracing.sample_ratio, "exporting request spans over OTLP");
    Ok(SpanExport { provider })
}
