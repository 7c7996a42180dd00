//! The key-management operations: keys, their states, rotation, tags, imported material and
//! aliases, each checked on the key's names (an alias change on the alias's own name) and
//! audited; and the maintenance passes that run as `wrapd:daemon`.

use super::*;
use crate::auth::key_policy::{KeyPolicy, POLICY_NAME};

/// Checks an alias operation: on the alias's own name, never on the other names of the key it
/// points at, and on every key involved: the key it names now (if any) and the key it is to
/// name (if given). As in AWS KMS, each is required, so that a grant on some aliases never
/// lets a caller change an alias outside them, even one naming the same key.
pub(super) fn check_alias(
    gate: &Gate,
    ks: &Keystore,
    call: &Call,
    alias: &AliasName,
    new_key: Option<&KeyRef>,
) -> Result<()> {
    gate.check(call, &Target::named(vec![alias.to_string()]), None)?;
    let current = KeyRef::Alias(alias.clone());
    if ks.resolve(&current).is_ok() {
        gate.check(call, &target_of(ks, &current), None)?;
    }
    // And every key the token records the name for, which the view may not show (a row a
    // store writer removed or moved): taking a name over needs rights on what it named.
    for recorded in ks.alias_ticket_keys(alias)? {
        gate.check(call, &target_of(ks, &KeyRef::Id(recorded)), None)?;
    }
    if let Some(key) = new_key {
        gate.check(call, &target_of(ks, key), None)?;
    }
    Ok(())
}

/// The key a read-only call names, checked and recorded on the call.
fn read_key(gate: &Gate, ks: &Keystore, call: &mut Call, key_id: &str) -> Result<Arc<KeyRecord>> {
    let (key, _) = named_key(gate, ks, call, key_id, None)?;
    let key = ks.resolve(&key)?;
    call.key(key.id.to_string(), Some(key.current_version()));
    Ok(key)
}

/// AWS KMS's refusal of a key policy that would lock its author out.
const LOCKOUT: &str =
    "The new key policy will not allow you to update the key policy in the future.";

/// A key's policy name: `default` (or empty, which means it), its only one.
fn policy_name(name: &str) -> Result<()> {
    if name.is_empty() || name == POLICY_NAME {
        Ok(())
    } else {
        Err(Error::KeyNotFound(format!(
            "no key policy named {:?}: a key's one policy is \"{POLICY_NAME}\"",
            name.chars().take(128).collect::<String>()
        )))
    }
}

impl Ops {
    /// Runs a job that returns a key, answering with its view.
    pub(super) async fn key_job(
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
    pub(super) async fn on_key(
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
        self.create_key_with_policy(call, description, alias, tags, origin, None, false)
            .await
    }

    /// [`Ops::create_key`] with a key policy document (`None`: AWS's default policy). Unless
    /// `bypass_lockout`, the policy must let the creator change it later (the key-policy
    /// part of the check: the policy file cannot be asked about a key that does not exist
    /// yet), as AWS KMS checks.
    #[allow(clippy::too_many_arguments)]
    pub async fn create_key_with_policy(
        &self,
        call: Call,
        description: String,
        alias: String,
        tags: std::collections::BTreeMap<String, String>,
        origin: KeyOrigin,
        policy: Option<String>,
        bypass_lockout: bool,
    ) -> Result<KeyView> {
        self.key_job(call, move |gate, ks, call| {
            gate.check_some(call, call.op())?;
            let alias = if alias.is_empty() {
                None
            } else {
                Some(AliasName::parse(&alias)?)
            };
            let target = match &alias {
                Some(alias) => Target::named(vec![alias.to_string()]),
                None => Target::Any,
            };
            gate.check(call, &target, None)?;
            if let Some(policy) = &policy {
                let parsed = KeyPolicy::parse(policy).map_err(Error::MalformedPolicy)?;
                if !bypass_lockout && gate.key_policy_locks_out(call, &parsed) {
                    return Err(Error::MalformedPolicy(LOCKOUT.into()));
                }
            }
            ks.create_key_with_policy(
                &description,
                alias.as_ref(),
                &tags,
                origin,
                policy.as_deref(),
            )
        })
        .await
    }

    /// The key's policy document (`name` must be `default`, AWS KMS's one policy name): the
    /// stored one, or AWS's default policy for a key made without one.
    pub async fn get_key_policy(&self, call: Call, key_id: String, name: String) -> Result<String> {
        self.run(call, move |gate, ks, call| {
            let key = read_key(gate, ks, call, &key_id)?;
            policy_name(&name)?;
            Ok(key
                .policy
                .clone()
                .unwrap_or_else(|| KeyPolicy::default_document(gate.account())))
        })
        .await
    }

    /// The names of the key's policies: `default`, its only one.
    pub async fn list_key_policies(&self, call: Call, key_id: String) -> Result<Vec<String>> {
        self.run(call, move |gate, ks, call| {
            read_key(gate, ks, call, &key_id)?;
            Ok(vec![POLICY_NAME.to_owned()])
        })
        .await
    }

    /// Replaces the key's policy document. Unless `bypass_lockout`, the new policy (with the
    /// policy file) must still let the caller replace it, as AWS KMS checks; else
    /// [`Error::MalformedPolicy`].
    pub async fn put_key_policy(
        &self,
        call: Call,
        key_id: String,
        name: String,
        policy: String,
        bypass_lockout: bool,
    ) -> Result<KeyView> {
        self.key_job(call, move |gate, ks, call| {
            let (key, _) = named_key(gate, ks, call, &key_id, None)?;
            policy_name(&name)?;
            let parsed = Arc::new(KeyPolicy::parse(&policy).map_err(Error::MalformedPolicy)?);
            if !bypass_lockout {
                let after = match target_of(ks, &key) {
                    Target::Key { names, grants, .. } => Target::Key {
                        names,
                        policy: Some(parsed),
                        grants,
                    },
                    Target::Any => Target::Any,
                };
                match gate.check_as(call, Operation::PutKeyPolicy, &after, None) {
                    Ok(()) => {}
                    Err(err) if err.kind() == crate::error::ErrorKind::PermissionDenied => {
                        return Err(Error::MalformedPolicy(LOCKOUT.into()));
                    }
                    Err(err) => return Err(err),
                }
            }
            ks.put_key_policy(&key, &policy)
        })
        .await
    }

    /// A key, by id or alias.
    pub async fn describe_key(&self, call: Call, key_id: String) -> Result<KeyView> {
        self.describe_key_with(call, key_id, false).await
    }

    /// DescribeKey with each version's usage (one store read): the gRPC answer. If the store
    /// cannot answer, the key is described without it (logged), as from the view.
    pub async fn describe_key_with_usage(&self, call: Call, key_id: String) -> Result<KeyView> {
        self.describe_key_with(call, key_id, true).await
    }

    async fn describe_key_with(&self, call: Call, key_id: String, usage: bool) -> Result<KeyView> {
        self.run(call, move |gate, ks, call| {
            let key = read_key(gate, ks, call, &key_id)?;
            let used = match usage.then(|| ks.version_usage(&key)).transpose() {
                Ok(used) => used,
                Err(err) => {
                    tracing::warn!(key_id = %key.id, error = %err, "DescribeKey without version usage: the metadata store did not answer");
                    None
                }
            };
            let mut view = KeyView::of(ks, key);
            if let Some(used) = used {
                for version in &mut view.versions {
                    version.usage = used.get(&version.version).copied();
                }
            }
            Ok(view)
        })
        .await
    }

    /// Retires (`retire`) or restores a version of a key; the audit line names the version.
    pub async fn set_key_version_retired(
        &self,
        call: Call,
        key_id: String,
        version: u32,
        retire: bool,
    ) -> Result<KeyView> {
        self.on_version(call, key_id, version, move |ks, key| {
            if retire {
                ks.retire_version(key, version)
            } else {
                ks.restore_version(key, version)
            }
        })
        .await
    }

    /// Schedules the destruction of a retired version after `days` (7..=30; 0 means 30).
    pub async fn schedule_key_version_destruction(
        &self,
        call: Call,
        key_id: String,
        version: u32,
        days: u32,
    ) -> Result<KeyView> {
        self.on_version(call, key_id, version, move |ks, key| {
            ks.schedule_version_destruction(key, version, days)
        })
        .await
    }

    /// Cancels the scheduled destruction of a version (it stays retired).
    pub async fn cancel_key_version_destruction(
        &self,
        call: Call,
        key_id: String,
        version: u32,
    ) -> Result<KeyView> {
        self.on_version(call, key_id, version, move |ks, key| {
            ks.cancel_version_destruction(key, version)
        })
        .await
    }

    /// Runs a change of one version of a key; the audit line names the version.
    async fn on_version(
        &self,
        call: Call,
        key_id: String,
        version: u32,
        change: impl FnOnce(&Keystore, &KeyRef) -> Result<Arc<KeyRecord>> + Send + 'static,
    ) -> Result<KeyView> {
        self.run(call, move |gate, ks, call| {
            let (key, _) = named_key(gate, ks, call, &key_id, None)?;
            call.key(key.to_string(), Some(version));
            let record = change(ks, &key)?;
            call.key(record.id.to_string(), Some(version));
            Ok(KeyView::of(ks, record))
        })
        .await
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

    /// Replaces a key's description.
    pub async fn update_key_description(
        &self,
        call: Call,
        key_id: String,
        description: String,
    ) -> Result<KeyView> {
        self.on_key(call, key_id, move |ks, key| {
            ks.update_description(key, &description)
        })
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

    /// Retires, for each `[[keys.retirement]]` rule, the versions unused for longer than its
    /// period, each audited first as a `RetireKeyVersion` by `wrapd:daemon`. A key a rule
    /// names that does not exist is logged and skipped. Blocks.
    pub fn retire_unused(
        &self,
        rules: &[crate::config::RetireUnused],
    ) -> Result<Vec<(KeyId, u32)>> {
        let mut retired = Vec::new();
        for rule in rules {
            let done = self
                .keystore
                .retire_unused(&rule.key, rule.after_days, |key, version| {
                    self.gate
                        .record_internal("RetireKeyVersion", key.id.as_str(), version)
                });
            match done {
                Ok(versions) => {
                    let id = self.keystore.resolve(&rule.key)?.id.clone();
                    retired.extend(versions.into_iter().map(|v| (id.clone(), v)));
                }
                Err(err) if err.kind() == crate::error::ErrorKind::NotFound => {
                    tracing::warn!(key = %rule.key, "keys.retirement names no key");
                }
                Err(err) => return Err(err),
            }
        }
        Ok(retired)
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
    pub(super) async fn alias_job(
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
    pub(super) async fn point_alias(
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
