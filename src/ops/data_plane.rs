//! The data-plane operations: generating, wrapping, unwrapping and re-wrapping data keys,
//! one at a time or in batches whose items are each authorized and audited on their own.

use super::*;

/// A batch's items, each with its own call (request id `ID.INDEX`).
pub(super) fn batch_items<I>(call: &Call, items: Vec<I>) -> Result<Vec<(Call, I)>> {
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
pub(super) fn generate_job(
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

/// Unwrap's job (one call, or one item of a batch).
pub(super) fn unwrap_job(
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
        honor_grant_tokens(ks, call, &key);
        gate.check(call, &target_of(ks, &key), Some(&ctx))?;
    }
    let unwrapped = ks.unwrap(&blob, &ctx, expected.as_ref())?;
    call.key(unwrapped.key_id.to_string(), Some(unwrapped.key_version));
    Ok(unwrapped)
}

impl Ops {
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
    pub(super) async fn may_batch(&self, call: &Call) -> Result<()> {
        match self.gate.check_some_by_file(call, call.op()) {
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
            gate.check_some(call, call.op().granted_as())?;
            let destination = optional_key_ref(&destination_key_id)?;
            let expected_source = optional_key_ref(&source_key_id)?;
            let source_ctx = caller_context(source_context)?;
            let destination_ctx = caller_context(destination_context)?;
            call.context(&destination_ctx);
            let source = blob_key(&blob);
            if let Some(source) = &source {
                honor_grant_tokens(ks, call, source);
                gate.check_as(
                    call,
                    Operation::ReWrapFrom,
                    &target_of(ks, source),
                    Some(&source_ctx),
                )?;
            }
            if let Some(to) = destination.as_ref().or(source.as_ref()) {
                call.key(to.to_string(), None);
                honor_grant_tokens(ks, call, to);
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
}
