//! Prometheus metrics (`[metrics]`, `listen` by default `127.0.0.1:9464`, `GET /metrics`,
//! plain HTTP without authentication on a listener of its own; keep it on a private
//! interface).
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
//!   label). Rendered at scrape time from the keys that exist then, so a deleted key's series
//!   is gone; served only with `per_key_series` (by default only on a loopback address: the
//!   series name every key to whoever can scrape);
//! - `wrapd_hsm_call_duration_seconds`, `wrapd_hsm_session_wait_seconds`,
//!   `wrapd_hsm_errors_total{kind}` (`device`, `session`, `call`, `session_wait`; a bad
//!   ciphertext is not an HSM error), `wrapd_hsm_sessions{state}` (`in_use`, `idle`);
//! - `wrapd_connections{listener}` (open now) and `wrapd_connections_total{listener}`;
//! - `wrapd_metadata_disagreements_total{kind}` (`hold`, `alias`): records of the metadata
//!   store the token's holds or alias tickets overrule (an edited or restored store; see
//!   `keystore/tickets.rs`), counted each time one is read;
//! - `wrapd_build_info{version}`: 1.
//!
//! Without `[metrics]` no recorder is installed and recording costs nothing.
//!
//! This module is a leaf: the audit log, the operation layer and the HSM adapter record
//! through it, and it imports none of them. The recorder and the scrape, which read the
//! keystore, live with the server (`server/prometheus.rs`).

use std::time::Duration;

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
