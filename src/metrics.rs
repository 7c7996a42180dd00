//! Prometheus metrics (`[metrics] listen = "127.0.0.1:9464"`, `GET /metrics`, plain HTTP on
//! a listener of its own; put it on a private interface).
//!
//! What is measured, with label values drawn only from fixed sets (no key ids, principals
//! or context values, so cardinality stays bounded):
//!
//! - `wrapd_requests_total{service, operation, outcome}`: every call that reached the gate,
//!   by transport (`unix`, `tcp`, `kms`, `aws-kms`, `internal`), policy operation and
//!   outcome (`OK` or the gRPC code name, as in the audit log);
//! - `wrapd_request_duration_seconds{operation}`: latency histogram, gate to audit line;
//! - `wrapd_audit_append_duration_seconds`: writing (and, with `fsync = "always"`,
//!   syncing) audit lines; `wrapd_audit_failures_total`: writes or syncs that failed (the
//!   log then fails closed); `wrapd_audit_lines_per_sync`: lines each group commit covered
//!   with one `fdatasync` (with `fsync = "always"`; about 1 at low load, more under load);
//! - `wrapd_keys{state}`: keys by state, at scrape time;
//! - `wrapd_key_wrap_share{key_id}`: wraps made with each key's current version, as a share
//!   of the per-version limit (rotate before it reaches 1; key ids are the only per-key
//!   label);
//! - `wrapd_hsm_call_duration_seconds`, `wrapd_hsm_session_wait_seconds`,
//!   `wrapd_hsm_errors_total{kind}` (`device`, `session`, `call`, `session_wait`; a bad
//!   ciphertext is not an HSM error), `wrapd_hsm_sessions{state}` (`in_use`, `idle`);
//! - `wrapd_connections{listener}` (open now) and `wrapd_connections_total{listener}`;
//! - `wrapd_build_info{version}`: 1.
//!
//! Without `[metrics]` no recorder is installed and recording costs nothing.

use std::sync::Arc;
use std::time::Duration;

use metrics_exporter_prometheus::{PrometheusBuilder, PrometheusHandle};

use crate::error::{Error, Result};
use crate::keystore::{KeyState, Keystore};

/// The installed recorder and what scrapes read besides it.
#[derive(Clone)]
pub struct Metrics {
    handle: PrometheusHandle,
    keystore: Arc<Keystore>,
}

impl Metrics {
    /// Installs the process-wide Prometheus recorder.
    pub fn install(keystore: Arc<Keystore>) -> Result<Self> {
        let handle = PrometheusBuilder::new()
            .set_buckets(&[
                0.000_1, 0.000_25, 0.000_5, 0.001, 0.002_5, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25,
                0.5, 1.0, 2.5,
            ])
            .map_err(|e| Error::Internal(format!("metrics: {e}")))?
            .install_recorder()
            .map_err(|e| Error::Config(format!("metrics: {e}")))?;
        metrics::gauge!("wrapd_build_info", "version" => env!("CARGO_PKG_VERSION")).set(1.0);
        Ok(Self { handle, keystore })
    }

    /// The exposition text.
    pub fn render(&self) -> String {
        let mut counts = [0u64; 4];
        let limit = self.keystore.max_wraps_per_version() as f64;
        for key in self.keystore.keys() {
            if let Some(current) = key.versions.last() {
                let share = self.keystore.wrap_count(&key, current) as f64 / limit;
                metrics::gauge!("wrapd_key_wrap_share", "key_id" => key.id.to_string()).set(share);
            }
            counts[match key.state {
                KeyState::Enabled => 0,
                KeyState::Disabled => 1,
                KeyState::PendingDeletion => 2,
                KeyState::PendingImport => 3,
            }] += 1;
        }
        for (state, count) in ["ENABLED", "DISABLED", "PENDING_DELETION", "PENDING_IMPORT"]
            .iter()
            .zip(counts)
        {
            metrics::gauge!("wrapd_keys", "state" => *state).set(count as f64);
        }
        self.handle.render()
    }
}

/// Counts a call and its latency.
pub fn record_call(
    service: &'static str,
    operation: &'static str,
    outcome: &'static str,
    latency: Duration,
) {
    metrics::counter!(
        "wrapd_requests_total",
        "service" => service,
        "operation" => operation,
        "outcome" => outcome
    )
    .increment(1);
    metrics::histogram!("wrapd_request_duration_seconds", "operation" => operation)
        .record(latency.as_secs_f64());
}

/// Records the time spent appending audit lines.
pub fn record_audit_append(took: Duration) {
    metrics::histogram!("wrapd_audit_append_duration_seconds").record(took.as_secs_f64());
}

/// Records how many audit lines one group commit wrote with one `fdatasync`.
pub fn record_audit_sync(lines: usize) {
    metrics::histogram!("wrapd_audit_lines_per_sync").record(lines as f64);
}
