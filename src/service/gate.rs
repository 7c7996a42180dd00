//! The gate every call passes: identity, policy, and the audit line.
//!
//! A handler opens a [`Call`] with [`Gate::begin`], asks [`Gate::check`] before touching a
//! key, and ends with [`Gate::finish`], which writes the audit line (for successes, failures
//! and denials alike) before the result goes back. If the audit line cannot be written, the
//! caller gets UNAVAILABLE instead of the result: the log fails closed.

use std::sync::Arc;
use std::time::Instant;

use rand::RngCore;
use tonic::{Request, Status};

use crate::audit::{AuditLog, AuditRecord, sha256_hex};
use crate::auth::{Identity, Operation, PolicyHandle, Target, UnixNames, identity_of};
use crate::context::EncryptionContext;
use crate::error::Error;

/// Identity, policy and audit for the services.
pub struct Gate {
    policy: Arc<PolicyHandle>,
    audit: Option<Arc<AuditLog>>,
    names: UnixNames,
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
        Self {
            policy,
            audit,
            names: UnixNames::default(),
        }
    }

    /// Starts a call: identifies the caller (the error, if any, is reported by `check`).
    pub fn begin<T>(&self, request: &Request<T>, op: Operation) -> Call {
        Call {
            identity: identity_of(request, &self.names).map_err(|e| e.to_string()),
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

    /// May this caller do this to `target`? Fails closed while the audit log is unwritable.
    pub fn check(
        &self,
        call: &Call,
        target: &Target,
        context: Option<&EncryptionContext>,
    ) -> Result<(), Status> {
        let identity = call
            .identity
            .as_ref()
            .map_err(|reason| Status::from(Error::Unauthenticated(reason.clone())))?;
        if let Some(audit) = &self.audit {
            if !audit.is_healthy() {
                return Err(Status::from(Error::Unavailable(
                    "the audit log cannot be written; key operations are refused".into(),
                )));
            }
        }
        if self
            .policy
            .current()
            .allows(&identity.principals, call.op, target, context)
        {
            Ok(())
        } else {
            Err(denied(call.op))
        }
    }

    /// For a call whose key cannot be known (an unparseable blob): allowed to go on (and fail
    /// on its input) only if the caller may do this operation on some key.
    pub fn check_some(&self, call: &Call) -> Result<(), Status> {
        let identity = call
            .identity
            .as_ref()
            .map_err(|reason| Status::from(Error::Unauthenticated(reason.clone())))?;
        if self
            .policy
            .current()
            .allows_some(&identity.principals, call.op)
        {
            Ok(())
        } else {
            Err(denied(call.op))
        }
    }

    /// Ends a call: writes its audit line, then returns the result (or UNAVAILABLE if the
    /// line could not be written).
    pub async fn finish<R>(&self, call: Call, result: Result<R, Status>) -> Result<R, Status> {
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
        let Some(audit) = self.audit.clone() else {
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
        let written = if audit.syncs() {
            // The append waits for fdatasync: keep it off the async workers.
            tokio::task::spawn_blocking(move || audit.append(entry))
                .await
                .map_err(|e| Error::Internal(format!("audit task failed: {e}")))
                .and_then(|r| r)
        } else {
            // A buffered append is one short write(2).
            audit.append(entry)
        };
        match written {
            Ok(()) => result,
            Err(err) => Err(Status::from(err)),
        }
    }
}

fn denied(op: Operation) -> Status {
    // The same message whether or not the key exists.
    Status::from(Error::PermissionDenied(format!(
        "not allowed to {} this key",
        op.name()
    )))
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
