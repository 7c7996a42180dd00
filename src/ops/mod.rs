//! The operation layer: every key operation, once, for every front end.
//!
//! A front end (the gRPC services, the Kubernetes KMS v2 plugin, the AWS KMS JSON API, the
//! XKS proxy API)
//! decodes its request, builds a [`Call`] (the caller's identity from its connection,
//! a request id, a deadline) and calls a method of [`Ops`] with plain values. The method
//! validates them, checks the policy, runs the key store operation and writes the audit
//! line, all as one job the caller cannot cancel ([`Gate::run`]), and returns a domain
//! value or an [`Error`] whose [`crate::error::ErrorKind`] the front end maps to its wire
//! format. Nothing here knows a transport: no module below the front ends imports tonic.
//!
//! `call.rs` is the call record, `gate.rs` the policy checks, the job runner and the audit
//! line, `key_policies.rs` the gate's key-policy step (how a call looks to a key policy),
//! `key_grants.rs` its key-grant step (and grant ids and tokens), `data_plane.rs`,
//! `key_management.rs` and `grant_operations.rs` the operations, `kms.rs` those of the
//! Kubernetes KMS v2 plugin, `xks.rs` those of the XKS proxy API, `refusals.rs` the budget for audit lines of refused callers and
//! `workers.rs` the threads that run jobs.

mod call;
mod data_plane;
mod gate;
mod grant_operations;
mod key_grants;
mod key_management;
pub mod key_policies;
mod kms;
mod refusals;
mod workers;
mod xks;

use std::collections::HashMap;
use std::sync::Arc;
use std::time::SystemTime;

use zeroize::Zeroizing;

pub use call::Call;
pub use gate::{
    Gate, MAX_AUDIT_MESSAGE, REFUSAL_SUMMARY, REQUEST_SPAN_TARGET, UNSUPPORTED_OPERATION,
    outcome_name,
};
pub use grant_operations::{CreatedGrant, GrantOnKey, NewGrant, RetiredGrant};
pub use key_grants::parse_token as parse_grant_token;
pub use kms::{
    KMS_CONTEXT, KMS_PRINCIPAL, KmsPlugin, MAX_ANNOTATIONS, MAX_CIPHERTEXT, MAX_PLAINTEXT,
};
pub use refusals::LINES_PER_WINDOW as REFUSAL_BUDGET_PER_WINDOW;
pub use xks::Checked;

use crate::auth::{Operation, Target};
use crate::blob::Blob;
use crate::context::EncryptionContext;
use crate::error::{Error, Result};
use crate::hsm::ImportAlgorithm;
use crate::ids::{AliasName, KeyId, KeyRef};
use crate::keystore::{
    GeneratedKey, ImportParameters, KeyOrigin, KeyRecord, Keystore, Page, Rewrapped, Unwrapped,
    VersionUsage, Wrapped,
};

/// Encryption-context keys with this prefix are reserved for wrapd's own bindings (the
/// KMS plugin binds its blobs with one), so that no caller can produce or open a blob bound
/// that way.
pub const RESERVED_CONTEXT_PREFIX: &str = "wrapd:";

/// A key as callers see it: its record and, per version, what only the key store knows.
#[derive(Debug, Clone)]
pub struct KeyView {
    /// The key.
    pub key: Arc<KeyRecord>,
    /// Its versions, oldest first.
    pub versions: Vec<VersionView>,
}

/// One version of a [`KeyView`].
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct VersionView {
    /// The version number.
    pub version: u32,
    /// When it was created.
    pub created_at: SystemTime,
    /// Wraps made with it (an upper bound after a restart).
    pub wrap_count: u64,
    /// False when its key material was missing from the token at start-up.
    pub available: bool,
    /// Made on the key's rotation schedule (or at the wrap limit), not by a caller.
    pub automatic: bool,
    /// How it has been used, fleet-wide (DescribeKey only; `None` in other answers).
    pub usage: Option<VersionUsage>,
    /// Retired: it unwraps nothing until restored.
    pub retired: bool,
    /// While its destruction is scheduled: when.
    pub destruction_date: Option<SystemTime>,
    /// Once destroyed: when.
    pub destroyed_at: Option<SystemTime>,
}

impl KeyView {
    fn of(keystore: &Keystore, key: Arc<KeyRecord>) -> Self {
        let versions = key
            .versions
            .iter()
            .map(|v| VersionView {
                version: v.version,
                created_at: v.created_at,
                wrap_count: keystore.wrap_count(&key, v),
                available: key.has_material()
                    && v.destroyed_at.is_none()
                    && !keystore.is_missing(&key.id, v.version),
                automatic: v.automatic,
                usage: None,
                retired: v.retired,
                destruction_date: v.destruction_date,
                destroyed_at: v.destroyed_at,
            })
            .collect();
        Self { key, versions }
    }
}

/// The automatic rotation period when a caller names none (as in AWS KMS).
pub const DEFAULT_ROTATION_DAYS: u32 = 365;

/// Most bytes one GenerateRandom call returns (as in AWS KMS).
pub const MAX_RANDOM_BYTES: u32 = 1024;

/// The audit operation of a scheduled deletion carried out.
pub const DESTROY_KEY: &str = "DestroyKey";

/// The audit operation of a scheduled version destruction carried out.
pub const DESTROY_KEY_VERSION: &str = "DestroyKeyVersion";

/// What one maintenance pass destroyed.
#[derive(Debug, Default)]
pub struct Purged {
    /// Keys deleted.
    pub keys: Vec<KeyId>,
    /// Key versions destroyed.
    pub versions: Vec<(KeyId, u32)>,
}

/// An alias and the key it names.
pub type AliasEntry = (AliasName, KeyId);

/// The key operations, for every front end. Cheap to clone.
#[derive(Clone)]
pub struct Ops {
    keystore: Arc<Keystore>,
    gate: Arc<Gate>,
}

/// A caller's encryption context: valid, and without reserved keys.
fn caller_context(entries: HashMap<String, String>) -> Result<EncryptionContext> {
    if let Some(key) = entries
        .keys()
        .find(|k| k.starts_with(RESERVED_CONTEXT_PREFIX))
    {
        return Err(Error::invalid(format!(
            "encryption context key {key:?}: keys starting with {RESERVED_CONTEXT_PREFIX:?} are reserved"
        )));
    }
    EncryptionContext::new(entries)
}

fn optional_key_ref(s: &str) -> Result<Option<KeyRef>> {
    if s.is_empty() {
        Ok(None)
    } else {
        KeyRef::parse(s).map(Some)
    }
}

/// The policy target of a key reference: all the key's names when it exists, else the name
/// as requested (so a denial looks the same either way).
fn target_of(keystore: &Keystore, key: &KeyRef) -> Target {
    match keystore.resolve(key) {
        Ok(record) => Target::Key {
            names: std::iter::once(record.id.to_string())
                .chain(record.aliases.iter().map(ToString::to_string))
                .collect(),
            policy: key_policies::parsed(&record),
            grants: record.grants.clone(),
        },
        Err(_) => Target::named(vec![key.to_string()]),
    }
}

/// Makes the grants the call's grant tokens name on `key` count: a grant of the key the view
/// does not have yet (made on another daemon of the fleet a moment ago) is read from the
/// store. Called after the caller passed [`Gate::check_some`], so that a caller without any
/// right to the operation cannot make the daemon read the store with made-up tokens; the
/// reads are bounded by the read-through budget, once a second per key for grants the store
/// does not have either.
fn honor_grant_tokens(ks: &Keystore, call: &Call, key: &KeyRef) {
    if call.grant_tokens.is_empty() {
        return;
    }
    let Ok(record) = ks.resolve(key) else {
        return;
    };
    for (id, grant) in &call.grant_tokens {
        if *id == record.id && !record.grants.iter().any(|g| &g.id == grant) {
            if let Err(err) = ks.with_grant(id, grant) {
                tracing::debug!(key_id = %id, error = %err, "a grant token's grant could not be read");
            }
        }
    }
}

/// The key a blob names, if the blob parses.
fn blob_key(blob: &[u8]) -> Option<KeyRef> {
    Blob::parse(blob).ok().map(|b| KeyRef::Id(b.key_id))
}

/// Most items in one batch call.
pub const MAX_BATCH: usize = 1000;

/// The preamble of every operation on one named key: the caller may do this operation on
/// some key at all (a refusal names no key), the name parses, the call records it, the
/// context (if the operation takes one) is valid and recorded, and the policy allows the
/// operation on every name of that key.
fn named_key(
    gate: &Gate,
    ks: &Keystore,
    call: &mut Call,
    key_id: &str,
    context: Option<HashMap<String, String>>,
) -> Result<(KeyRef, Option<EncryptionContext>)> {
    gate.check_some(call, call.op())?;
    let key = KeyRef::parse(key_id)?;
    call.key(key.to_string(), None);
    let ctx = context.map(caller_context).transpose()?;
    if let Some(ctx) = &ctx {
        call.context(ctx);
    }
    honor_grant_tokens(ks, call, &key);
    gate.check(call, &target_of(ks, &key), ctx.as_ref())?;
    Ok((key, ctx))
}

impl Ops {
    /// The operations on `keystore`, guarded by `gate`.
    pub fn new(keystore: Arc<Keystore>, gate: Arc<Gate>) -> Self {
        Self { keystore, gate }
    }

    /// The key store (status answers that need no call, benchmarks).
    pub fn keystore(&self) -> &Arc<Keystore> {
        &self.keystore
    }

    /// The gate (health).
    pub fn gate(&self) -> &Arc<Gate> {
        &self.gate
    }

    async fn run<T: Send + 'static>(
        &self,
        call: Call,
        job: impl FnOnce(&Gate, &Keystore, &mut Call) -> Result<T> + Send + 'static,
    ) -> Result<T> {
        self.gate.run(&self.keystore, call, job).await
    }

    /// Carries out the scheduled deletions and version destructions that are due. Each
    /// key's `DestroyKey` (each version's `DestroyKeyVersion`) audit line, principal
    /// `wrapd:daemon`, is written before its material is destroyed; while the audit log
    /// cannot be written, nothing is destroyed. Blocks (the background task runs it on the
    /// blocking pool). Returns the keys deleted and the versions destroyed.
    pub fn purge_due(&self) -> Result<Purged> {
        let keys = self.keystore.purge_due(|key| {
            self.gate
                .record_internal(DESTROY_KEY, key.id.as_str(), key.current_version())
        });
        // The versions' pass runs even when the keys' failed: it is also what drops stale
        // version tickets.
        let versions = self.keystore.destroy_due_versions(|key, version| {
            self.gate
                .record_internal(DESTROY_KEY_VERSION, key.id.as_str(), version)
        });
        Ok(Purged {
            keys: keys?,
            versions: versions?,
        })
    }

    /// Audits a call its front end refuses before any operation (a bad signature, an
    /// unknown access key, a malformed parameter) with `outcome`, so that every call has
    /// its audit line. Returns `outcome`, unless the call is refused for a reason that comes
    /// first: no identity, an operation the caller may do on no key, the audit log
    /// unwritable.
    ///
    /// A refusal of an unauthenticated caller gets its own line only within the budget of
    /// `refusals.rs`; beyond it, it is counted and summarized.
    pub async fn reject(&self, call: Call, outcome: Error) -> Error {
        let mut summary = None;
        if call.identity.is_err() {
            match self.gate.admit_refusal() {
                None => return outcome,
                Some(due) => summary = due,
            }
        }
        let result = self
            .run(call, move |gate, _, call| {
                if let Some(count) = summary {
                    gate.write_refusal_summary(count);
                }
                if call.op().is_authorized() {
                    gate.check_some(call, call.op().granted_as())?;
                }
                Err::<(), _>(outcome)
            })
            .await;
        match result {
            Err(err) => err,
            Ok(()) => Error::Internal("a rejected call passed".into()),
        }
    }

    /// Audits an authenticated call of an operation wrapd does not have, and returns the
    /// answer: [`Error::Unsupported`] with `message`, or [`Error::Unavailable`] if the line
    /// cannot be written.
    pub async fn reject_unsupported(
        &self,
        identity: crate::auth::Identity,
        request_id: String,
        api_operation: String,
        message: String,
    ) -> Error {
        let gate = self.gate.clone();
        let written = tokio::task::spawn_blocking(move || {
            gate.record_unsupported(&identity, &request_id, &api_operation, &message)
                .map(|()| message)
        })
        .await;
        match written {
            Ok(Ok(message)) => Error::Unsupported(message),
            Ok(Err(_)) | Err(_) => Error::Unavailable(
                "the audit log cannot be written; key operations are refused".into(),
            ),
        }
    }
}

#[cfg(test)]
mod tests;
