//! The gate every call passes: identity, policy, and the audit line.
//!
//! A handler opens a [`Call`] with [`Gate::begin`] (identity, request id, deadline) and hands
//! [`Gate::run`] a job: validation, [`Gate::check`] before touching a key, and the key store
//! operation. `run` runs the job and then the audit append (for successes, failures and
//! denials alike) as one task on the blocking pool. The caller cannot cancel it: when a
//! deadline fires or the client resets the stream, tonic drops the handler, but the task
//! runs on and writes its line, so no state change ever goes unaudited (security review
//! finding 11). It is also one thread hand-off per call, not three. If the audit line cannot
//! be written, the caller gets UNAVAILABLE instead of the result: the log fails closed.

use std::sync::Arc;
use std::time::Instant;

use rand::RngCore;
use tonic::{Request, Status};

use crate::audit::{AuditLog, AuditRecord, sha256_hex};
use crate::auth::{Identity, Operation, PolicyHandle, Target, identity_of};
use crate::context::EncryptionContext;
use crate::error::{Error, Result};
use crate::hsm::with_deadline;
use crate::keystore::Keystore;

/// Identity, policy and audit for the services. Share it in an `Arc`.
pub struct Gate {
    policy: Arc<PolicyHandle>,
    audit: Option<Arc<AuditLog>>,
}

/// One call in progress: who, what, and what to write in the audit line.
pub struct Call {
    /// The caller, or why it has no identity.
    identity: Result<Identity, String>,
    op: Operation,
    request_id: String,
    started: Instant,
    deadline: Option<Instant>,
    key_id: Option<String>,
    key_version: Option<u32>,
    context: Option<(Vec<String>, String)>,
}

impl Call {
    /// Records the key (and version) acted on, for the audit line.
    pub fn key(&mut self, key_id: impl Into<String>, version: Option<u32>) {
        self.key_id = Some(key_id.into());
        if version.is_some() {
            self.key_version = version;
        }
    }

    /// Records the encryption context (its keys and hash; never the values).
    pub fn context(&mut self, context: &EncryptionContext) {
        self.context = Some((
            context.iter().map(|(k, _)| k.to_owned()).collect(),
            sha256_hex(&context.serialize()),
        ));
    }

    /// The RPC.
    pub fn op(&self) -> Operation {
        self.op
    }

    /// The caller's deadline, if it sent one.
    pub fn deadline(&self) -> Option<Instant> {
        self.deadline
    }

    /// The caller, for log fields.
    pub fn who(&self) -> String {
        match &self.identity {
            Ok(identity) => identity.to_string(),
            Err(_) => "unauthenticated".to_owned(),
        }
    }
}

fn request_id<T>(request: &Request<T>) -> String {
    let given = request
        .metadata()
        .get("x-request-id")
        .and_then(|v| v.to_str().ok())
        .filter(|v| !v.is_empty() && v.len() <= 128 && v.bytes().all(|b| b.is_ascii_graphic()));
    match given {
        Some(id) => id.to_owned(),
        None => {
            let mut bytes = [0u8; 12];
            rand::rng().fill_bytes(&mut bytes);
            hex::encode(bytes)
        }
    }
}

impl Gate {
    /// A gate with this policy and (optional) audit log.
    pub fn new(policy: Arc<PolicyHandle>, audit: Option<Arc<AuditLog>>) -> Self {
        Self { policy, audit }
    }

    /// Starts a call: identifies the caller (the error, if any, is reported by `check`).
    pub fn begin<T>(&self, request: &Request<T>, op: Operation) -> Call {
        Call {
            identity: identity_of(request).map_err(|e| e.to_string()),
            op,
            request_id: request_id(request),
            started: Instant::now(),
            deadline: super::deadline_of(request),
            key_id: None,
            key_version: None,
            context: None,
        }
    }

    /// Starts a call for a caller identified by other means (the KMS plugin socket), with the
    /// caller's own request id (the apiserver's uid).
    pub fn begin_as<T>(
        &self,
        request: &Request<T>,
        op: Operation,
        identity: Identity,
        request_id: &str,
    ) -> Call {
        let mut call = self.begin(request, op);
        call.identity = Ok(identity);
        if !request_id.is_empty()
            && request_id.len() <= 128
            && request_id.bytes().all(|b| b.is_ascii_graphic())
        {
            call.request_id = request_id.to_owned();
        }
        call
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
            .map_err(|reason| Error::Unauthenticated(reason.clone()))?;
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
            .map_err(|reason| Error::Unauthenticated(reason.clone()))?;
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

    /// Runs `job` (validation, checks, the key store operation) and then writes the call's
    /// audit line, as one task on the blocking pool that the caller cannot cancel (see the
    /// module docs). The caller's deadline bounds the wait for an HSM session.
    pub async fn run<T: Send + 'static>(
        self: &Arc<Self>,
        keystore: &Arc<Keystore>,
        mut call: Call,
        job: impl FnOnce(&Gate, &Keystore, &mut Call) -> Result<T> + Send + 'static,
    ) -> Result<T, Status> {
        let gate = self.clone();
        let keystore = keystore.clone();
        let task = tokio::task::spawn_blocking(move || {
            let result = with_deadline(call.deadline, || job(&gate, &keystore, &mut call))
                .map_err(Status::from);
            gate.finish(call, result)
        });
        match task.await {
            Ok(result) => result,
            // A panic in the job: INTERNAL for this request, not a dead daemon.
            Err(join) => Err(Status::from(Error::Internal(format!(
                "key store task failed: {join}"
            )))),
        }
    }

    /// Ends a call: writes its audit line (blocking until it is durable), then returns the
    /// result, or UNAVAILABLE if the line could not be written.
    fn finish<R>(&self, call: Call, result: Result<R, Status>) -> Result<R, Status> {
        let latency_us = u64::try_from(call.started.elapsed().as_micros()).unwrap_or(u64::MAX);
        let outcome = match &result {
            Ok(_) => "OK".to_owned(),
            Err(status) => code_name(status.code()).to_owned(),
        };
        match &result {
            Ok(_) => tracing::debug!(op = call.op.name(), who = %call.who(), latency_us, "ok"),
            Err(status) => tracing::info!(op = call.op.name(), who = %call.who(), latency_us,
                code = outcome, message = status.message(), "failed"),
        }
        let Some(audit) = &self.audit else {
            return result;
        };
        let (principal, transport, peer) = match &call.identity {
            Ok(id) => (
                id.principal().to_owned(),
                id.transport.as_str().to_owned(),
                id.peer.clone(),
            ),
            Err(_) => (String::new(), String::new(), String::new()),
        };
        let (context_keys, context_hash) = match call.context {
            Some((keys, hash)) => (keys, Some(hash)),
            None => (Vec::new(), None),
        };
        let entry = AuditRecord {
            request_id: call.request_id,
            principal,
            transport,
            peer,
            operation: call.op.name().to_owned(),
            key_id: call.key_id,
            key_version: call.key_version,
            context_keys,
            context_hash,
            outcome,
            error: result.as_ref().err().map(|s| s.message().to_owned()),
            latency_us,
            ..Default::default()
        };
        match audit.append(entry) {
            Ok(()) => result,
            Err(err) => Err(Status::from(err)),
        }
    }
}

fn denied(op: Operation) -> Error {
    // The same message whether or not the key exists.
    Error::PermissionDenied(format!("not allowed to {} this key", op.name()))
}

/// The canonical gRPC name of a code (`INVALID_ARGUMENT`).
pub fn code_name(code: tonic::Code) -> &'static str {
    use tonic::Code;
    match code {
        Code::Ok => "OK",
        Code::Cancelled => "CANCELLED",
        Code::Unknown => "UNKNOWN",
        Code::InvalidArgument => "INVALID_ARGUMENT",
        Code::DeadlineExceeded => "DEADLINE_EXCEEDED",
        Code::NotFound => "NOT_FOUND",
        Code::AlreadyExists => "ALREADY_EXISTS",
        Code::PermissionDenied => "PERMISSION_DENIED",
        Code::ResourceExhausted => "RESOURCE_EXHAUSTED",
        Code::FailedPrecondition => "FAILED_PRECONDITION",
        Code::Aborted => "ABORTED",
        Code::OutOfRange => "OUT_OF_RANGE",
        Code::Unimplemented => "UNIMPLEMENTED",
        Code::Internal => "INTERNAL",
        Code::Unavailable => "UNAVAILABLE",
        Code::DataLoss => "DATA_LOSS",
        Code::Unauthenticated => "UNAUTHENTICATED",
    }
}
