//! `tracing` set-up: structured logs on stderr, text or JSON, filtered by `RUST_LOG` or the
//! config. Nothing secret is ever recorded as a field, so any level is safe to enable.
//!
//! With `[tracing]` (feature `otel`), also OpenTelemetry: see `otel.rs`.

use std::io::IsTerminal;

use tracing_subscriber::EnvFilter;

use crate::config::LogFormat;
#[cfg(not(feature = "otel"))]
use crate::config::TracingConfig;
#[cfg(not(feature = "otel"))]
use crate::error::{Error, Result};

pub(super) fn env_filter(filter: &str) -> EnvFilter {
    EnvFilter::try_from_default_env()
        .or_else(|_| EnvFilter::try_new(filter))
        .unwrap_or_else(|_| EnvFilter::new("info"))
}

/// Installs the global subscriber (logs only); later calls are ignored.
pub fn init_logging(filter: &str, format: LogFormat) {
    let builder = tracing_subscriber::fmt()
        .with_env_filter(env_filter(filter))
        .with_ansi(std::io::stderr().is_terminal())
        .with_writer(std::io::stderr);
    let _ = match format {
        LogFormat::Text => builder.try_init(),
        LogFormat::Json => builder.json().try_init(),
    };
}

/// Without the `otel` feature there is nothing to export spans with.
#[cfg(not(feature = "otel"))]
pub struct SpanExport;

/// Without the `otel` feature, `[tracing]` is refused: the build cannot export spans.
#[cfg(not(feature = "otel"))]
pub fn init_logging_and_tracing(
    _filter: &str,
    _format: LogFormat,
    _tracing: &TracingConfig,
) -> Result<SpanExport> {
    Err(Error::Config(
        "[tracing]: this wrapd was built without the `otel` feature (cargo build --features otel)"
            .into(),
    ))
}
