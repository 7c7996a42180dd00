//! The gate every call passes: policy checks, and the audit line.
//!
//! [`Gate::run`] takes a [`Call`] and a job (validation, [`Gate::check`] before touching a
//! key, the key store operation) and runs the job and then the audit append (for successes,
//! failures and denials alike) as one task on the blocking pool. The caller cannot cancel
//! it: when a deadline fires or a client resets its stream, the front end drops its future,
//! but the task runs on and writes its line, so no state change ever goes unaudited
//! (security review finding 11). It is one thread hand-off per call. If the audit line
//! cannot be written, the caller gets [`Error::Unavailable`] instead of the result: the log
//! fails closed. Each call is logged once, here.

use std::sync::Arc;

use super::Call;
use crate::audit::{AuditLog, AuditRecord};
use crate::auth::{Operation, PolicyHandle, Target};
use crate::context::EncryptionContext;
use crate::error::{Error, ErrorKind, Result};
use crate::hsm::with_deadline;
use crate::keystore::Keystore;

/// Policy and audit for every front end. Share it in an `Arc`.
pub struct Gate {
    policy: Arc<PolicyHandle>,
    audit: Option<Arc<AuditLog>>,
    instance: Option<String>,
}

impl Gate {
    /// A gate with this policy and (optional) audit log.
    pub fn new(policy: Arc<PolicyHandle>, audit: Option<Arc<AuditLog>>) -> Self {
        Self {
            policy,
            audit,
            instance: None,
        }
    }

    /// Names this daemon's instance (in a fleet) on every audit line.
    pub fn with_instance(mut self, instance: Option<String>) -> Self {
        self.instance = instance;
        self
    }

    /// May this caller do the call's operation to `target`? Fails closed while the audit log
    /// is unwritable.
    pub fn check(
        &self,
        call: &Call,
        target: &Target,
        context: Option<&EncryptionContext>,
    ) -> Result<()> {
        self.check_as(call, call.op, target, context)
    }

    /// Like [`Gate::check`], for a permission other than the RPC's own (ReWrap's two ends).
    pub fn check_as(
        &self,
        call: &Call,
        op: Operation,
        target: &Target,
        context: Option<&EncryptionContext>,
    ) -> Result<()> {
        let identity = call
            .identity
            .as_ref()
            .map_err(|refusal| Error::Unauthenticated(refusal.reason.clone()))?;
        if !self.audit_healthy() {
            return Err(Error::Unavailable(
                "the audit log cannot be written; key operations are refused".into(),
            ));
        }
        if self
            .policy
            .current()
            .allows(&identity.principals, op, target, context)
        {
            Ok(())
        } else {
            Err(denied(op))
        }
    }

    /// For a call whose key cannot be known yet (or at all: an unparseable blob): allowed to
    /// go on (and fail on its input) only if the caller may do `op` on some key.
    pub fn check_some(&self, call: &Call, op: Operation) -> Result<()> {
        let identity = call
            .identity
            .as_ref()
            .map_err(|refusal| Error::Unauthenticated(refusal.reason.clone()))?;
        if self.policy.current().allows_some(&identity.principals, op) {
            Ok(())
        } else {
            Err(denied(op))
        }
    }

    /// False while the audit log cannot be written (calls are refused, health and the KMS
    /// plugin's healthz say so).
    pub fn audit_healthy(&self) -> bool {
        self.audit.as_ref().is_none_or(|audit| audit.is_healthy())
    }

    /// Writes an audit line for something the daemon does on its own (no caller), as the
    /// internal principal `wrapd:daemon`. Blocks until the line is durable; an error means
    /// the action must not happen.
    pub fn record_internal(&self, operation: &str, key_id: &str, version: u32) -> Result<()> {
        tracing::info!(operation, key_id, "internal operation");
        metrics::counter!(
            "wrapd_requests_total",
            "service" => "internal",
            "operation" => operation.to_owned(),
            "outcome" => "OK"
        )
        .increment(1);
        let Some(audit) = &self.audit else {
            return Ok(());
        };
        audit.append(AuditRecord {
            request_id: format!("{operation}-{key_id}"),
            principal: crate::audit::DAEMON_PRINCIPAL.to_owned(),
            transport: "internal".to_owned(),
            operation: operation.to_owned(),
            key_id: Some(key_id.to_owned()),
            key_version: Some(version),
            outcome: "OK".to_owned(),
            instance: self.instance.clone(),
            ..Default::default()
        })
    }

    /// Runs `job` and then writes the call's audit line, as one task on the blocking pool
    /// that the caller cannot cancel (see the module docs). The caller's deadline bounds the
    /// wait for an HSM session.
    pub async fn run<T: Send + 'static>(
        self: &Arc<Self>,
        keystore: &Arc<Keystore>,
        mut call: Call,
        job: impl FnOnce(&Gate, &Keystore, &mut Call) -> Result<T> + Send + 'static,
    ) -> Result<T> {
        let gate = self.clone();
        let keystore = keystore.clone();
        let span = request_span(&call, &call.request_id);
        let task = tokio::task::spawn_blocking(move || {
            let _entered = span.enter();
            let result = with_deadline(call.deadline, || job(&gate, &keystore, &mut call));
            record_key(&span, &call);
            let result = gate.finish(call, result);
            record_outcome(&span, &result);
            result
        });
        match task.await {
            Ok(result) => result,
            // A panic in the job: INTERNAL for this request, not a dead daemon.
            Err(join) => Err(Error::Internal(format!("key store task failed: {join}"))),
        }
    }

    /// Runs `job` once per call of a batch (each item its own call: policy checks, result,
    /// audit line), all in one task on the blocking pool that the caller cannot cancel, and
    /// then writes every item's audit line with one `fdatasync`. If the lines cannot be
    /// written, the whole batch fails with [`Error::Unavailable`] (the log fails closed).
    pub async fn run_batch<T: Send + 'static, I: Send + 'static>(
        self: &Arc<Self>,
        keystore: &Arc<Keystore>,
        items: Vec<(Call, I)>,
        job: impl Fn(&Gate, &Keystore, &mut Call, I) -> Result<T> + Send + 'static,
    ) -> Result<Vec<Result<T>>> {
        let gate = self.clone();
        let keystore = keystore.clone();
        // One span for the batch (the request id its items' ids extend), one per item.
        let batch = items.first().map_or_else(tracing::Span::none, |(call, _)| {
            let id = call.request_id.rsplit_once('.').map_or("", |(id, _)| id);
            request_span(call, id)
        });
        let task = tokio::task::spawn_blocking(move || {
            let _batch = batch.enter();
            let mut results = Vec::with_capacity(items.len());
            let mut records = Vec::with_capacity(items.len());
            for (mut call, item) in items {
                let span = request_span(&call, &call.request_id);
                let _entered = span.enter();
                let result =
                    with_deadline(call.deadline, || job(&gate, &keystore, &mut call, item));
                record_key(&span, &call);
                record_outcome(&span, &result);
                gate.log(&call, &result);
                records.push(gate.record(call, &result));
                results.push(result);
            }
            let appended = match &gate.audit {
                Some(audit) => {
                    let _append = audit_span();
                    let started = std::time::Instant::now();
                    let appended = audit.append_all(records);
                    crate::metrics::record_audit_append(started.elapsed());
                    appended.map(|()| results)
                }
                None => Ok(results),
            };
            record_outcome(&batch, &appended);
            appended
        });
        match task.await {
            Ok(result) => result,
            Err(join) => Err(Error::Internal(format!("key store task failed: {join}"))),
        }
    }

    /// Ends a call: logs it, writes its audit line (blocking until it is durable), then
    /// returns the result, or [`Error::Unavailable`] if the line could not be written.
    fn finish<R>(&self, call: Call, result: Result<R>) -> Result<R> {
        self.log(&call, &result);
        let Some(audit) = &self.audit else {
            return result;
        };
        let record = self.record(call, &result);
        let _append = audit_span();
        let started = std::time::Instant::now();
        let appended = audit.append(record);
        crate::metrics::record_audit_append(started.elapsed());
        match appended {
            Ok(()) => result,
            Err(err) => Err(err),
        }
    }

    /// The daemon log's line for a call (and its metrics).
    fn log<R>(&self, call: &Call, result: &Result<R>) {
        let latency = call.started.elapsed();
        crate::metrics::record_call(
            call.identity
                .as_ref()
                .map_or("unauthenticated", |id| id.transport.as_str()),
            call.op.name(),
            match result {
                Ok(_) => "OK",
                Err(err) => outcome_name(err.kind()),
            },
            latency,
        );
        let latency_us = u64::try_from(latency.as_micros()).unwrap_or(u64::MAX);
        match result {
            Ok(_) => tracing::debug!(op = call.op.name(), who = %call.who(), latency_us, "ok"),
            Err(err) if err.kind() == ErrorKind::Internal => {
                tracing::error!(op = call.op.name(), who = %call.who(), latency_us,
                    error = %err, "failed: internal error");
            }
            Err(err) if err.kind() == ErrorKind::Unavailable => {
                tracing::warn!(op = call.op.name(), who = %call.who(), latency_us,
                    error = %err, "failed: unavailable");
            }
            Err(err) => tracing::info!(op = call.op.name(), who = %call.who(), latency_us,
                outcome = outcome_name(err.kind()), message = %err, "failed"),
        }
    }

    /// The audit line of a call.
    fn record<R>(&self, call: Call, result: &Result<R>) -> AuditRecord {
        let latency_us = u64::try_from(call.started.elapsed().as_micros()).unwrap_or(u64::MAX);
        let outcome = match result {
            Ok(_) => "OK",
            Err(err) => outcome_name(err.kind()),
        };
        let (principal, transport, peer, access_key_id) = match &call.identity {
            Ok(id) => (
                id.principal().to_owned(),
                id.transport.as_str().to_owned(),
                id.peer.clone(),
                id.access_key.clone(),
            ),
            Err(refusal) => (
                String::new(),
                refusal
                    .transport
                    .map(|t| t.as_str().to_owned())
                    .unwrap_or_default(),
                refusal.peer.clone(),
                refusal.access_key.clone(),
            ),
        };
        let (context_keys, context_hash) = match call.context {
            Some((keys, hash)) => (keys, Some(hash)),
            None => (Vec::new(), None),
        };
        AuditRecord {
            request_id: call.request_id,
            principal,
            transport,
            peer,
            operation: call.op.name().to_owned(),
            api_operation: call.api_operation,
            access_key_id,
            key_id: call.key_id,
            key_version: call.key_version,
            context_keys,
            context_hash,
            outcome: outcome.to_owned(),
            error: result.as_ref().err().map(Error::public_message),
            latency_us,
            instance: self.instance.clone(),
            ..Default::default()
        }
    }
}

fn denied(op: Operation) -> Error {
    // The same message whether or not the key exists.
    Error::PermissionDenied(format!("not allowed to {} this key", op.name()))
}

/// The `tracing` target of request spans (the OpenTelemetry export, `[tracing]`): only the
/// OpenTelemetry layer enables it, so without `[tracing]` the spans cost nothing.
pub const REQUEST_SPAN_TARGET: &str = "wrapd::otel";

/// The span of one request (or batch item), named after its operation, with the request
/// id its audit line carries. Key and outcome are recorded when known.
fn request_span(call: &Call, request_id: &str) -> tracing::Span {
    let transport = call.identity.as_ref().map_or_else(
        |refusal| refusal.transport.map_or("", |t| t.as_str()),
        |id| id.transport.as_str(),
    );
    tracing::span!(
        target: REQUEST_SPAN_TARGET,
        tracing::Level::TRACE,
        "request",
        otel.name = call.op.name(),
        otel.kind = "server",
        otel.status_code = tracing::field::Empty,
        request_id = request_id,
        wrapd.operation = call.op.name(),
        wrapd.api_operation = call.api_operation.as_deref(),
        wrapd.transport = transport,
        wrapd.key_id = tracing::field::Empty,
        wrapd.key_version = tracing::field::Empty,
        wrapd.outcome = tracing::field::Empty,
    )
}

/// The span of an audit append (the fdatasync a result waits for).
fn audit_span() -> tracing::span::EnteredSpan {
    tracing::span!(target: REQUEST_SPAN_TARGET, tracing::Level::TRACE, "audit.append").entered()
}

fn record_key(span: &tracing::Span, call: &Call) {
    if span.is_disabled() {
        return;
    }
    if let Some(key) = &call.key_id {
        span.record("wrapd.key_id", key.as_str());
    }
    if let Some(version) = call.key_version {
        span.record("wrapd.key_version", version);
    }
}

fn record_outcome<T>(span: &tracing::Span, result: &Result<T>) {
    if span.is_disabled() {
        return;
    }
    match result {
        Ok(_) => span.record("wrapd.outcome", "OK"),
        Err(err) => {
            span.record("otel.status_code", "ERROR");
            span.record("wrapd.outcome", outcome_name(err.kind()))
        }
    };
}

/// The audit log's name of an outcome: the gRPC code name of docs/DESIGN.md §4, whatever the
/// transport, so that the log reads the same for every front end.
pub fn outcome_name(kind: ErrorKind) -> &'static str {
    match kind {
        ErrorKind::InvalidArgument
        | ErrorKind::InvalidCiphertext
        | ErrorKind::IncorrectKey
        | ErrorKind::InvalidImportToken
        | ErrorKind::ExpiredImportToken
        | ErrorKind::IncorrectKeyMaterial => "INVALID_ARGUMENT",
        ErrorKind::NotFound => "NOT_FOUND",
        ErrorKind::AlreadyExists => "ALREADY_EXISTS",
        ErrorKind::WrongState
        | ErrorKind::Disabled
        | ErrorKind::LimitReached
        | ErrorKind::Unsupported => "FAILED_PRECONDITION",
        ErrorKind::Unauthenticated => "UNAUTHENTICATED",
        ErrorKind::PermissionDenied => "PERMISSION_DENIED",
        ErrorKind::Unavailable => "UNAVAILABLE",
        _ => "INTERNAL",
    }
}
