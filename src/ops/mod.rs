//! The operation layer: every key operation, once, for every front end.
//!
//! A front end (the gRPC services, the Kubernetes KMS v2 plugin, and next the AWS KMS JSON
//! API) decodes its request, builds a [`Call`] (the caller's identity from its connection,
//! a request id, a deadline) and calls a method of [`Ops`] with plain values. The method
//! validates them, checks the policy, runs the key store operation and writes the audit
//! line, all as one job the caller cannot cancel ([`Gate::run`]), and returns a domain
//! value or an [`Error`] whose [`crate::error::ErrorKind`] the front end maps to its wire
//! format. Nothing here knows a transport: no module below the front ends imports tonic.
//!
//! `call.rs` is the call record, `gate.rs` the policy checks, the job runner and the audit
//! line, `kms.rs` the operations of the Kubernetes KMS v2 plugin.

mod call;
mod gate;
mod kms;
mod refusals;
mod workers;

use std::collections::HashMap;
use std::sync::Arc;
use std::time::SystemTime;

use zeroize::Zeroizing;

pub use call::Call;
pub use gate::{
    Gate, MAX_AUDIT_MESSAGE, REFUSAL_SUMMARY, REQUEST_SPAN_TARGET, UNSUPPORTED_OPERATION,
    outcome_name,
};
pub use kms::{KMS_CONTEXT, KmsPlugin, MAX_ANNOTATIONS, MAX_CIPHERTEXT, MAX_PLAINTEXT};
pub use refusals::LINES_PER_WINDOW as REFUSAL_BUDGET_PER_WINDOW;

use crate::auth::{Operation, Target};
use crate::blob::Blob;
use crate::context::EncryptionContext;
use crate::error::{Error, Result};
use crate::hsm::ImportAlgorithm;
use crate::ids::{AliasName, KeyId, KeyRef};
use crate::keystore::{
    GeneratedKey, ImportParameters, KeyOrigin, KeyRecord, Keystore, Page, Rewrapped, Unwrapped,
    Wrapped,
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
                available: key.has_material() && !keystore.is_missing(&key.id, v.version),
                automatic: v.automatic,
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
        Ok(record) => Target::Key(
            std::iter::once(record.id.to_string())
                .chain(record.aliases.iter().map(ToString::to_string))
                .collect(),
        ),
        Err(_) => Target::Key(vec![key.to_string()]),
    }
}

/// The key a blob names, if the blob parses.
fn blob_key(blob: &[u8]) -> Option<KeyRef> {
    Blob::parse(blob).ok().map(|b| KeyRef::Id(b.key_id))
}

/// Checks an alias operation: on the alias's own name, never on the other names of the key it
/// points at, and on every key involved: the key it names now (if any) and the key it is to
/// name (if given). As in AWS KMS, each is required, so that a grant on some aliases never
/// lets a caller change an alias outside them, even one naming the same key.
fn check_alias(
    gate: &Gate,
    ks: &Keystore,
    call: &Call,
    alias: &AliasName,
    new_key: Option<&KeyRef>,
) -> Result<()> {
    gate.check(call, &Target::Key(vec![alias.to_string()]), None)?;
    let current = KeyRef::Alias(alias.clone());
    if ks.resolve(&current).is_ok() {
        gate.check(call, &target_of(ks, &current), None)?;
    }
    if let Some(key) = new_key {
        gate.check(call, &target_of(ks, key), None)?;
    }
    Ok(())
}

/// Most items in one batch call.
pub const MAX_BATCH: usize = 1000;

/// A batch's items, each with its own call (request id `ID.INDEX`).
fn batch_items<I>(call: &Call, items: Vec<I>) -> Result<Vec<(Call, I)>> {
    if items.is_empty() || items.len() > MAX_BATCH {
        return Err(Error::invalid(format!(
            "a batch has 1 to {MAX_BATCH} items, not {}",
            items.len()
        )));
    }
    Ok(items
        .into_iter()
        .enumerate()
        .map(|(i, item)| (call.item(i), item))
        .collect())
}

/// GenerateDataKey's job (one call, or one item of a batch).
fn generate_job(
    gate: &Gate,
    ks: &Keystore,
    call: &mut Call,
    key_id: String,
    context: HashMap<String, String>,
    number_of_bytes: u32,
) -> Result<GeneratedKey> {
    let (key, ctx) = named_key(gate, ks, call, &key_id, Some(context))?;
    let ctx = ctx.unwrap_or_default();
    let generated = ks.generate_data_key(&key, number_of_bytes, &ctx)?;
    call.key(
        generated.wrapped.key_id.to_string(),
        Some(generated.wrapped.key_version),
    );
    Ok(generated)
}

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
    gate.check(call, &target_of(ks, &key), ctx.as_ref())?;
    Ok((key, ctx))
}

/// Unwrap's job (one call, or one item of a batch).
fn unwrap_job(
    gate: &Gate,
    ks: &Keystore,
    call: &mut Call,
    blob: Vec<u8>,
    context: HashMap<String, String>,
    key_id: String,
) -> Result<Unwrapped> {
    gate.check_some(call, call.op())?;
    let expected = optional_key_ref(&key_id)?;
    let ctx = caller_context(context)?;
    call.context(&ctx);
    // An unparseable blob names no key: it fails as invalid below.
    if let Some(key) = blob_key(&blob) {
        call.key(key.to_string(), None);
        gate.check(call, &target_of(ks, &key), Some(&ctx))?;
    }
    let unwrapped = ks.unwrap(&blob, &ctx, expected.as_ref())?;
    call.key(unwrapped.key_id.to_string(), Some(unwrapped.key_version));
    Ok(unwrapped)
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

    /// Carries out the scheduled deletions that are due. Each key's `DestroyKey` audit line
    /// (principal `wrapd:daemon`) is written before its material is destroyed; while the
    /// audit log cannot be written, nothing is destroyed. Blocks (the background task runs
    /// it on the blocking pool).
    pub fn purge_due(&self) -> Result<Vec<KeyId>> {
        self.keystore.purge_due(|key| {
            self.gate
                .record_internal(DESTROY_KEY, key.id.as_str(), key.current_version())
        })
    }

    // ---- data plane ----------------------------------------------------------------------

    /// A data key of `number_of_bytes` (0 means 32) under `key_id`, in plaintext and wrapped
    /// (GenerateDataKey, GenerateDataKeyWithoutPlaintext: the call's operation says which).
    pub async fn generate_data_key(
        &self,
        call: Call,
        key_id: String,
        context: HashMap<String, String>,
        number_of_bytes: u32,
    ) -> Result<GeneratedKey> {
        self.run(call, move |gate, ks, call| {
            generate_job(gate, ks, call, key_id, context, number_of_bytes)
        })
        .await
    }

    /// Refuses a whole batch, with one audit line, when its caller may do its operation on
    /// no key at all: each item would only be denied, and a caller with no grant must not
    /// cost the daemon a durable line per item.
    async fn may_batch(&self, call: &Call) -> Result<()> {
        match self.gate.check_some(call, call.op()) {
            Ok(()) => Ok(()),
            Err(err) => Err(self.reject(call.whole(), err).await),
        }
    }

    /// Up to [`MAX_BATCH`] GenerateDataKey items, shared by the workers: each item is its
    /// own call (policy, result, audit line), see [`Gate::run_batch`].
    pub async fn batch_generate_data_key(
        &self,
        call: &Call,
        items: Vec<(String, HashMap<String, String>, u32)>,
    ) -> Result<Vec<Result<GeneratedKey>>> {
        self.may_batch(call).await?;
        let items = batch_items(call, items)?;
        self.gate
            .run_batch(
                &self.keystore,
                items,
                |gate, ks, call, (key_id, context, n)| {
                    generate_job(gate, ks, call, key_id, context, n)
                },
            )
            .await
    }

    /// Wraps caller-supplied plaintext under `key_id`.
    pub async fn wrap(
        &self,
        call: Call,
        key_id: String,
        plaintext: Zeroizing<Vec<u8>>,
        context: HashMap<String, String>,
    ) -> Result<Wrapped> {
        self.run(call, move |gate, ks, call| {
            let (key, ctx) = named_key(gate, ks, call, &key_id, Some(context))?;
            let ctx = ctx.unwrap_or_default();
            let wrapped = ks.wrap(&key, &plaintext, &ctx)?;
            call.key(wrapped.key_id.to_string(), Some(wrapped.key_version));
            Ok(wrapped)
        })
        .await
    }

    /// Unwraps a blob; `key_id`, if not empty, must name the key it is wrapped under.
    pub async fn unwrap(
        &self,
        call: Call,
        blob: Vec<u8>,
        context: HashMap<String, String>,
        key_id: String,
    ) -> Result<Unwrapped> {
        self.run(call, move |gate, ks, call| {
            unwrap_job(gate, ks, call, blob, context, key_id)
        })
        .await
    }

    /// Up to [`MAX_BATCH`] Unwrap items, shared by the workers: each item is its own call
    /// (policy, result, audit line), see [`Gate::run_batch`].
    pub async fn batch_unwrap(
        &self,
        call: &Call,
        items: Vec<(Vec<u8>, HashMap<String, String>, String)>,
    ) -> Result<Vec<Result<Unwrapped>>> {
        self.may_batch(call).await?;
        let items = batch_items(call, items)?;
        self.gate
            .run_batch(
                &self.keystore,
                items,
                |gate, ks, call, (blob, context, key_id)| {
                    unwrap_job(gate, ks, call, blob, context, key_id)
                },
            )
            .await
    }

    /// Re-wraps a blob under the newest version of `destination_key_id` (empty: the source
    /// key). Needs `ReWrapFrom` on the source and `ReWrapTo` on the destination, so that a
    /// right to re-wrap into a scratch key never covers every source.
    ///
    /// `source_key_id`, if not empty, must name the key the blob is wrapped under (AWS KMS's
    /// `SourceKeyId`), else [`Error::IncorrectKey`].
    pub async fn rewrap(
        &self,
        call: Call,
        blob: Vec<u8>,
        source_context: HashMap<String, String>,
        destination_key_id: String,
        destination_context: HashMap<String, String>,
        source_key_id: String,
    ) -> Result<Rewrapped> {
        self.run(call, move |gate, ks, call| {
            gate.check_some(call, Operation::ReWrapFrom)?;
            let destination = optional_key_ref(&destination_key_id)?;
            let expected_source = optional_key_ref(&source_key_id)?;
            let source_ctx = caller_context(source_context)?;
            let destination_ctx = caller_context(destination_context)?;
            call.context(&destination_ctx);
            let source = blob_key(&blob);
            if let Some(source) = &source {
                gate.check_as(
                    call,
                    Operation::ReWrapFrom,
                    &target_of(ks, source),
                    Some(&source_ctx),
                )?;
            }
            if let Some(to) = destination.as_ref().or(source.as_ref()) {
                call.key(to.to_string(), None);
                gate.check_as(
                    call,
                    Operation::ReWrapTo,
                    &target_of(ks, to),
                    Some(&destination_ctx),
                )?;
            }
            if let (Some(expected), Some(source)) = (&expected_source, &source) {
                if ks.resolve(expected)?.id.to_string() != source.to_string() {
                    return Err(Error::IncorrectKey);
                }
            }
            let rewrapped =
                ks.rewrap(&blob, &source_ctx, destination.as_ref(), &destination_ctx)?;
            call.key(
                rewrapped.wrapped.key_id.to_string(),
                Some(rewrapped.wrapped.key_version),
            );
            Ok(rewrapped)
        })
        .await
    }

    /// `number_of_bytes` (1..=1024) random bytes from the token's generator. It names no key,
    /// so a grant needs `keys = ["*"]`.
    pub async fn generate_random(
        &self,
        call: Call,
        number_of_bytes: u32,
    ) -> Result<Zeroizing<Vec<u8>>> {
        self.run(call, move |gate, ks, call| {
            gate.check_some(call, call.op())?;
            if !(1..=MAX_RANDOM_BYTES).contains(&number_of_bytes) {
                return Err(Error::invalid(format!(
                    "number of random bytes must be 1 to {MAX_RANDOM_BYTES}"
                )));
            }
            gate.check(call, &Target::Any, None)?;
            ks.random(number_of_bytes as usize)
        })
        .await
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
                gate.check_some(call, call.op())?;
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

    // ---- control plane -------------------------------------------------------------------

    /// Runs a job that returns a key, answering with its view.
    async fn key_job(
        &self,
        call: Call,
        job: impl FnOnce(&Gate, &Keystore, &mut Call) -> Result<Arc<KeyRecord>> + Send + 'static,
    ) -> Result<KeyView> {
        self.run(call, move |gate, ks, call| {
            let key = job(gate, ks, call)?;
            call.key(key.id.to_string(), Some(key.current_version()));
            Ok(KeyView::of(ks, key))
        })
        .await
    }

    /// The common shape of the operations on one named key.
    async fn on_key(
        &self,
        call: Call,
        key_id: String,
        f: impl FnOnce(&Keystore, &KeyRef) -> Result<Arc<KeyRecord>> + Send + 'static,
    ) -> Result<KeyView> {
        self.key_job(call, move |gate, ks, call| {
            let (key, _) = named_key(gate, ks, call, &key_id, None)?;
            f(ks, &key)
        })
        .await
    }

    /// Creates a key, optionally with an alias (empty: none) and tags; with
    /// [`KeyOrigin::External`], a key pending the import of its material.
    pub async fn create_key(
        &self,
        call: Call,
        description: String,
        alias: String,
        tags: std::collections::BTreeMap<String, String>,
        origin: KeyOrigin,
    ) -> Result<KeyView> {
        self.key_job(call, move |gate, ks, call| {
            gate.check_some(call, call.op())?;
            let alias = if alias.is_empty() {
                None
            } else {
                Some(AliasName::parse(&alias)?)
            };
            let target = match &alias {
                Some(alias) => Target::Key(vec![alias.to_string()]),
                None => Target::Any,
            };
            gate.check(call, &target, None)?;
            ks.create_key_from(&description, alias.as_ref(), &tags, origin)
        })
        .await
    }

    /// A key, by id or alias.
    pub async fn describe_key(&self, call: Call, key_id: String) -> Result<KeyView> {
        self.on_key(call, key_id, |ks, key| ks.resolve(key)).await
    }

    /// Adds a version to a key.
    pub async fn rotate_key(&self, call: Call, key_id: String) -> Result<KeyView> {
        self.on_key(call, key_id, |ks, key| ks.rotate_key(key))
            .await
    }

    /// Enables a disabled key.
    pub async fn enable_key(&self, call: Call, key_id: String) -> Result<KeyView> {
        self.on_key(call, key_id, |ks, key| ks.enable_key(key))
            .await
    }

    /// Disables a key.
    pub async fn disable_key(&self, call: Call, key_id: String) -> Result<KeyView> {
        self.on_key(call, key_id, |ks, key| ks.disable_key(key))
            .await
    }

    /// Schedules a key's destruction after `days` (7..=30; 0 means 30).
    pub async fn schedule_key_deletion(
        &self,
        call: Call,
        key_id: String,
        days: u32,
    ) -> Result<KeyView> {
        self.on_key(call, key_id, move |ks, key| ks.schedule_deletion(key, days))
            .await
    }

    /// Cancels a scheduled deletion (the key comes back disabled).
    pub async fn cancel_key_deletion(&self, call: Call, key_id: String) -> Result<KeyView> {
        self.on_key(call, key_id, |ks, key| ks.cancel_deletion(key))
            .await
    }

    /// Turns automatic rotation on (`period_days`; 0 means 365) or, with `None`, off.
    pub async fn set_key_rotation(
        &self,
        call: Call,
        key_id: String,
        period_days: Option<u32>,
    ) -> Result<KeyView> {
        let period = period_days.map(|d| if d == 0 { DEFAULT_ROTATION_DAYS } else { d });
        self.on_key(call, key_id, move |ks, key| ks.set_rotation(key, period))
            .await
    }

    /// Adds tags, or with `remove`, removes the tags named by the keys of `tags`.
    pub async fn tag_key(
        &self,
        call: Call,
        key_id: String,
        tags: std::collections::BTreeMap<String, String>,
        remove: bool,
    ) -> Result<KeyView> {
        self.on_key(call, key_id, move |ks, key| ks.tag_key(key, &tags, remove))
            .await
    }

    /// A wrapping key and import token for importing material into an `EXTERNAL` key
    /// (`bits`: 3072 or 4096).
    pub async fn get_parameters_for_import(
        &self,
        call: Call,
        key_id: String,
        algorithm: ImportAlgorithm,
        bits: u32,
    ) -> Result<ImportParameters> {
        self.run(call, move |gate, ks, call| {
            let (key, _) = named_key(gate, ks, call, &key_id, None)?;
            let parameters = ks.import_parameters(&key, algorithm, bits)?;
            call.key(parameters.key_id.to_string(), None);
            Ok(parameters)
        })
        .await
    }

    /// Imports key material (wrapped for the wrapping key of `import_token`) into an
    /// `EXTERNAL` key, to expire at `valid_to` (`None`: never).
    pub async fn import_key_material(
        &self,
        call: Call,
        key_id: String,
        import_token: Vec<u8>,
        encrypted_material: Vec<u8>,
        valid_to: Option<SystemTime>,
    ) -> Result<KeyView> {
        self.on_key(call, key_id, move |ks, key| {
            ks.import_key_material(key, &import_token, &encrypted_material, valid_to)
        })
        .await
    }

    /// Deletes an `EXTERNAL` key's imported material (the key becomes pending import).
    pub async fn delete_imported_key_material(
        &self,
        call: Call,
        key_id: String,
    ) -> Result<KeyView> {
        self.on_key(call, key_id, |ks, key| ks.delete_imported_material(key))
            .await
    }

    /// Destroys imported material past its `valid_to`, each key's
    /// `DeleteImportedKeyMaterial` audit line (principal `wrapd:daemon`) first, and the
    /// wrapping keys of expired import tokens. Blocks (the background task runs it on the
    /// blocking pool).
    pub fn expire_imports(&self) -> Result<Vec<KeyId>> {
        let expired = self.keystore.expire_material(|key| {
            self.gate.record_internal(
                "DeleteImportedKeyMaterial",
                key.id.as_str(),
                key.current_version(),
            )
        })?;
        let purged = self.keystore.purge_wrapping_keys()?;
        if purged > 0 {
            tracing::info!(purged, "wrapping keys of expired import tokens destroyed");
        }
        Ok(expired)
    }

    /// Carries out the automatic rotations that are due, each audited first as a
    /// `RotateKey` by `wrapd:daemon`. Blocks (the background task runs it on the blocking
    /// pool).
    pub fn rotate_due(&self) -> Result<Vec<KeyId>> {
        self.keystore.rotate_due(|key| {
            self.gate
                .record_internal("RotateKey", key.id.as_str(), key.current_version() + 1)
        })
    }

    /// Keys in creation order, one page at a time.
    pub async fn list_keys(
        &self,
        call: Call,
        page_size: u32,
        page_token: String,
    ) -> Result<Page<KeyView>> {
        self.run(call, move |gate, ks, call| {
            gate.check(call, &Target::Any, None)?;
            let page = ks.list_keys(page_size, &page_token)?;
            Ok(Page {
                items: page.items.into_iter().map(|k| KeyView::of(ks, k)).collect(),
                next_page_token: page.next_page_token,
            })
        })
        .await
    }

    /// Runs an alias job.
    async fn alias_job(
        &self,
        call: Call,
        job: impl FnOnce(&Gate, &Keystore, &mut Call) -> Result<AliasEntry> + Send + 'static,
    ) -> Result<AliasEntry> {
        self.run(call, move |gate, ks, call| {
            let entry = job(gate, ks, call)?;
            call.key(entry.1.to_string(), None);
            Ok(entry)
        })
        .await
    }

    /// Creates an alias for a key.
    pub async fn create_alias(
        &self,
        call: Call,
        alias_name: String,
        key_id: String,
    ) -> Result<AliasEntry> {
        self.point_alias(call, alias_name, key_id, Keystore::create_alias)
            .await
    }

    /// Points an existing alias at another key.
    pub async fn update_alias(
        &self,
        call: Call,
        alias_name: String,
        key_id: String,
    ) -> Result<AliasEntry> {
        self.point_alias(call, alias_name, key_id, Keystore::update_alias)
            .await
    }

    /// CreateAlias and UpdateAlias: the same checks, then `point`.
    async fn point_alias(
        &self,
        call: Call,
        alias_name: String,
        key_id: String,
        point: fn(&Keystore, &AliasName, &KeyRef) -> Result<AliasEntry>,
    ) -> Result<AliasEntry> {
        self.alias_job(call, move |gate, ks, call| {
            gate.check_some(call, call.op())?;
            let alias = AliasName::parse(&alias_name)?;
            let key = KeyRef::parse(&key_id)?;
            call.key(key.to_string(), None);
            check_alias(gate, ks, call, &alias, Some(&key))?;
            point(ks, &alias, &key)
        })
        .await
    }

    /// Deletes an alias.
    pub async fn delete_alias(&self, call: Call, alias_name: String) -> Result<AliasEntry> {
        self.alias_job(call, move |gate, ks, call| {
            gate.check_some(call, call.op())?;
            let alias = AliasName::parse(&alias_name)?;
            check_alias(gate, ks, call, &alias, None)?;
            ks.delete_alias(&alias)
        })
        .await
    }

    /// Aliases sorted by name, optionally only those of one key (empty: all).
    pub async fn list_aliases(
        &self,
        call: Call,
        key_id: String,
        page_size: u32,
        page_token: String,
    ) -> Result<Page<AliasEntry>> {
        self.run(call, move |gate, ks, call| {
            gate.check_some(call, call.op())?;
            let key = optional_key_ref(&key_id)?;
            let target = match &key {
                Some(key) => {
                    call.key(key.to_string(), None);
                    target_of(ks, key)
                }
                None => Target::Any,
            };
            gate.check(call, &target, None)?;
            ks.list_aliases(key.as_ref(), page_size, &page_token)
        })
        .await
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::auth::{Identity, Policy, PolicyHandle, Transport};
    use crate::error::ErrorKind;
    use crate::hsm::memory::MemoryToken;
    use crate::keystore::{KeystoreConfig, SqliteStore, SystemClock};

    /// Operations over an in-memory token with `policy`, and a call maker for `unix:uid=7`.
    fn ops(policy: &str) -> Ops {
        let keystore = Keystore::open(
            Arc::new(MemoryToken::default()),
            Arc::new(SqliteStore::in_memory().unwrap()),
            Arc::new(SystemClock),
            KeystoreConfig::default(),
        )
        .unwrap();
        let policy = PolicyHandle::fixed(Policy::parse(policy).unwrap());
        Ops::new(
            Arc::new(keystore),
            Arc::new(Gate::new(Arc::new(policy), None)),
        )
    }

    fn call(op: Operation) -> Call {
        let identity = Identity {
            principals: vec!["unix:uid=7".to_owned()].into(),
            transport: Transport::Unix,
            peer: "pid=1".into(),
            access_key: None,
        };
        Call::new(Ok(identity), op, None, None)
    }

    const ADMIN: &str =
        "[[grant]]\nprincipals = [\"unix:uid=7\"]\noperations = [\"all\"]\nkeys = [\"*\"]\n";

    #[tokio::test]
    async fn each_item_of_a_batch_is_authorized_on_its_own_key() {
        let admin = ops(ADMIN);
        let mut blobs = Vec::new();
        for alias in ["alias/mine", "alias/theirs"] {
            admin
                .create_key(
                    call(Operation::CreateKey),
                    String::new(),
                    alias.into(),
                    Default::default(),
                    KeyOrigin::Hsm,
                )
                .await
                .unwrap();
            let generated = admin
                .generate_data_key(
                    call(Operation::GenerateDataKey),
                    alias.into(),
                    HashMap::new(),
                    32,
                )
                .await
                .unwrap();
            blobs.push(generated.wrapped.blob);
        }
        // The same key store, a policy that grants Unwrap on alias/mine only.
        let limited = Ops::new(
            admin.keystore().clone(),
            Arc::new(Gate::new(
                Arc::new(PolicyHandle::fixed(
                    Policy::parse(
                        "[[grant]]\nprincipals = [\"unix:uid=7\"]\noperations = [\"Unwrap\"]\nkeys = [\"alias/mine\"]\n",
                    )
                    .unwrap(),
                )),
                None,
            )),
        );
        let items = blobs
            .into_iter()
            .map(|b| (b, HashMap::new(), String::new()))
            .collect();
        let results = limited
            .batch_unwrap(&call(Operation::Unwrap), items)
            .await
            .unwrap();
        assert!(results[0].is_ok());
        assert_eq!(
            results[1].as_ref().unwrap_err().kind(),
            ErrorKind::PermissionDenied
        );
    }

    /// Operations with `policy` over an in-memory token and an audit log in `dir`.
    fn audited_ops(policy: &str, dir: &std::path::Path) -> Ops {
        let plain = ops(ADMIN);
        let audit = Arc::new(
            crate::audit::AuditLog::open(&dir.join("audit.log"), crate::audit::FsyncPolicy::Never)
                .unwrap(),
        );
        let policy = PolicyHandle::fixed(Policy::parse(policy).unwrap());
        Ops::new(
            plain.keystore().clone(),
            Arc::new(Gate::new(Arc::new(policy), Some(audit))),
        )
    }

    fn audit_lines(dir: &std::path::Path) -> Vec<serde_json::Value> {
        std::fs::read_to_string(dir.join("audit.log"))
            .unwrap()
            .lines()
            .map(|line| serde_json::from_str(line).unwrap())
            .collect()
    }

    #[tokio::test]
    async fn a_batch_from_a_caller_with_no_grant_is_refused_with_one_audit_line() {
        let dir = tempfile::tempdir().unwrap();
        let ops = audited_ops("", dir.path());
        let items = (0..MAX_BATCH)
            .map(|i| (vec![i as u8; 80], HashMap::new(), String::new()))
            .collect();
        let err = ops
            .batch_unwrap(&call(Operation::Unwrap), items)
            .await
            .unwrap_err();
        assert_eq!(err.kind(), ErrorKind::PermissionDenied);
        let lines = audit_lines(dir.path());
        assert_eq!(lines.len(), 1, "{lines:#?}");
        assert_eq!(lines[0]["outcome"], "PERMISSION_DENIED");
    }

    #[tokio::test]
    async fn unauthenticated_refusals_beyond_the_budget_are_summarized_not_lined() {
        let dir = tempfile::tempdir().unwrap();
        let ops = audited_ops(ADMIN, dir.path());
        let long_reason = "x".repeat(64 * 1024);
        for _ in 0..(refusals::LINES_PER_WINDOW + 50) {
            let refusal = crate::auth::Refusal::from(long_reason.clone());
            let call = Call::new(Err(refusal), Operation::ListKeys, None, None);
            let err = ops
                .reject(call, Error::Unauthenticated(long_reason.clone()))
                .await;
            assert_eq!(err.kind(), ErrorKind::Unauthenticated);
        }
        let lines = audit_lines(dir.path());
        assert_eq!(lines.len(), refusals::LINES_PER_WINDOW as usize);
        for line in &lines {
            let message = line["error"].as_str().unwrap();
            assert!(message.len() <= MAX_AUDIT_MESSAGE, "{}", message.len());
            assert!(message.ends_with('…'));
        }
    }

    #[tokio::test]
    async fn reserved_context_keys_are_refused_on_every_data_plane_call() {
        let ops = ops(ADMIN);
        let key = ops
            .create_key(
                call(Operation::CreateKey),
                String::new(),
                "alias/k".into(),
                Default::default(),
                KeyOrigin::Hsm,
            )
            .await
            .unwrap();
        let reserved = HashMap::from([("wrapd:purpose".to_owned(), "x".to_owned())]);
        let err = ops
            .generate_data_key(
                call(Operation::GenerateDataKey),
                "alias/k".into(),
                reserved.clone(),
                0,
            )
            .await
            .unwrap_err();
        assert_eq!(err.kind(), ErrorKind::InvalidArgument);
        let blob = ops
            .wrap(
                call(Operation::Wrap),
                key.key.id.to_string(),
                Zeroizing::new(b"x".to_vec()),
                HashMap::new(),
            )
            .await
            .unwrap()
            .blob;
        let err = ops
            .unwrap(call(Operation::Unwrap), blob, reserved, String::new())
            .await
            .unwrap_err();
        assert_eq!(err.kind(), ErrorKind::InvalidArgument);
    }

    #[tokio::test]
    async fn an_alias_is_authorized_on_its_own_name() {
        let ops = ops(ADMIN);
        let billing = ops
            .create_key(
                call(Operation::CreateKey),
                String::new(),
                "alias/billing".into(),
                Default::default(),
                KeyOrigin::Hsm,
            )
            .await
            .unwrap();
        ops.create_alias(
            call(Operation::CreateAlias),
            "alias/team-a-x".into(),
            billing.key.id.to_string(),
        )
        .await
        .unwrap();
        let scoped = Ops::new(
            ops.keystore().clone(),
            Arc::new(Gate::new(
                Arc::new(PolicyHandle::fixed(
                    Policy::parse("[[grant]]\nprincipals = [\"unix:uid=7\"]\noperations = [\"admin\"]\nkeys = [\"alias/team-a-*\"]\n")
                        .unwrap(),
                )),
                None,
            )),
        );
        let err = scoped
            .delete_alias(call(Operation::DeleteAlias), "alias/billing".into())
            .await
            .unwrap_err();
        assert_eq!(err.kind(), ErrorKind::PermissionDenied);
        scoped
            .delete_alias(call(Operation::DeleteAlias), "alias/team-a-x".into())
            .await
            .unwrap();
    }

    #[tokio::test]
    async fn rewrap_needs_both_ends() {
        let ops = ops(
            "[[grant]]\nprincipals = [\"unix:uid=7\"]\noperations = [\"CreateKey\", \"Wrap\", \"ReWrapTo\"]\nkeys = [\"*\"]\n",
        );
        ops.create_key(
            call(Operation::CreateKey),
            String::new(),
            "alias/a".into(),
            Default::default(),
            KeyOrigin::Hsm,
        )
        .await
        .unwrap();
        let blob = ops
            .wrap(
                call(Operation::Wrap),
                "alias/a".into(),
                Zeroizing::new(b"x".to_vec()),
                HashMap::new(),
            )
            .await
            .unwrap()
            .blob;
        let err = ops
            .rewrap(
                call(Operation::ReWrap),
                blob,
                HashMap::new(),
                "alias/a".into(),
                HashMap::new(),
                String::new(),
            )
            .await
            .unwrap_err();
        assert_eq!(err.kind(), ErrorKind::PermissionDenied);
    }

    #[tokio::test]
    async fn an_unauthenticated_call_is_refused_before_anything() {
        let ops = ops(ADMIN);
        let anonymous = Call::new(
            Err(String::from("no credentials").into()),
            Operation::ListKeys,
            None,
            None,
        );
        let err = ops
            .list_keys(anonymous, 0, String::new())
            .await
            .unwrap_err();
        assert_eq!(err.kind(), ErrorKind::Unauthenticated);
    }

    #[test]
    fn reserved_context_keys_are_refused() {
        let entries = |k: &str| HashMap::from([(k.to_owned(), "v".to_owned())]);
        let err = caller_context(entries("wrapd:purpose")).unwrap_err();
        assert!(err.to_string().contains("reserved"), "{err}");
        assert!(caller_context(entries("tenant")).is_ok());
        assert!(
            caller_context(entries("wrapd")).is_ok(),
            "only the prefix with its colon"
        );
    }
}
