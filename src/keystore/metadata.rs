//! The metadata store boundary: key records, versions, states and aliases.
//!
//! The token holds only key material (CloudHSM has no data objects and no attribute edits),
//! so everything else lives behind [`MetadataStore`]. SQLite ([`super::SqliteStore`]) is the
//! default; a shared PostgreSQL store for several daemons on one HSM cluster is meant to be a
//! second implementation of this trait, nothing more.

use std::collections::BTreeMap;
use std::sync::Arc;
use std::time::{Duration, SystemTime};

use crate::error::Result;
use crate::grant::{Constraints, Grant, GrantOperation};
use crate::ids::{AliasName, KeyId};

/// The lifecycle state of a key.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum KeyState {
    /// Usable for every operation.
    Enabled,
    /// Usable for no data-plane operation until enabled again.
    Disabled,
    /// Usable for nothing; destroyed at `deletion_date` unless cancelled.
    PendingDeletion,
    /// An `EXTERNAL` key without key material: never imported, expired, or deleted with
    /// `DeleteImportedKeyMaterial`. Usable again once the material is imported.
    PendingImport,
}

impl KeyState {
    /// The stored name.
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Enabled => "ENABLED",
            Self::Disabled => "DISABLED",
            Self::PendingDeletion => "PENDING_DELETION",
            Self::PendingImport => "PENDING_IMPORT",
        }
    }

    /// Parses a stored name.
    pub fn parse(s: &str) -> Option<Self> {
        match s {
            "ENABLED" => Some(Self::Enabled),
            "DISABLED" => Some(Self::Disabled),
            "PENDING_DELETION" => Some(Self::PendingDeletion),
            "PENDING_IMPORT" => Some(Self::PendingImport),
            _ => None,
        }
    }
}

/// Where a key's material comes from.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum KeyOrigin {
    /// Generated inside the token by wrapd (AWS KMS's `AWS_KMS` origin).
    #[default]
    Hsm,
    /// Imported by its owner: `CreateKey` makes it `PENDING_IMPORT`, with one version whose
    /// object appears when the material is imported. Never rotated.
    External,
}

impl KeyOrigin {
    /// The stored name.
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Hsm => "HSM",
            Self::External => "EXTERNAL",
        }
    }

    /// Parses a stored name.
    pub fn parse(s: &str) -> Option<Self> {
        match s {
            "HSM" => Some(Self::Hsm),
            "EXTERNAL" => Some(Self::External),
            _ => None,
        }
    }
}

/// The imported material of an `EXTERNAL` key, once some was imported.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ImportedMaterial {
    /// The key check value of the material imported first: a later import must match it
    /// (compared in constant time), so a key's material never changes.
    pub check_value: crate::hsm::KeyCheckValue,
    /// Whether the token holds it now: false after it expired or was deleted.
    pub present: bool,
    /// When it expires (and is destroyed); `None`: never.
    pub valid_to: Option<SystemTime>,
}

/// One version of a key.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct VersionRecord {
    /// 1 for the first version, then +1 per rotation.
    pub version: u32,
    /// When the version was created.
    pub created_at: SystemTime,
    /// Wraps reserved for this version so far: an upper bound on the wraps made with it,
    /// persisted in blocks so that a crash never under-counts.
    pub wraps_reserved: u64,
    /// True when the daemon made it on the key's rotation schedule, false when a caller
    /// asked (or for the first version).
    pub automatic: bool,
    /// Retired (RetireKeyVersion): nothing unwraps with it until RestoreKeyVersion.
    pub retired: bool,
    /// Set while the version's destruction is scheduled (ScheduleKeyVersionDestruction):
    /// when its object may be destroyed.
    pub destruction_date: Option<SystemTime>,
    /// Set once the version's object was destroyed: its blobs can never be unwrapped again.
    pub destroyed_at: Option<SystemTime>,
}

impl VersionRecord {
    /// A new version, in use.
    pub fn new(version: u32, created_at: SystemTime, automatic: bool) -> Self {
        Self {
            version,
            created_at,
            wraps_reserved: 0,
            automatic,
            retired: false,
            destruction_date: None,
            destroyed_at: None,
        }
    }
}

/// What [`MetadataStore::set_version_destruction`] records of a version.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum VersionDestruction {
    /// No destruction scheduled (CancelKeyVersionDestruction).
    None,
    /// Destruction scheduled for this date.
    Scheduled(SystemTime),
    /// The object was destroyed at this time.
    Destroyed(SystemTime),
}

impl VersionDestruction {
    /// The `destruction_date` and `destroyed_at` columns, in Unix milliseconds.
    pub(super) fn columns(self) -> (Option<i64>, Option<i64>) {
        match self {
            Self::None => (None, None),
            Self::Scheduled(date) => (Some(to_millis(date)), None),
            Self::Destroyed(at) => (None, Some(to_millis(at))),
        }
    }
}

/// How a key version was used: wraps and unwraps counted, first and last use. Each daemon
/// counts its own calls and adds them to the store in batches ([`MetadataStore::add_usage`]),
/// so that the store holds the fleet's sum.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct VersionUsage {
    /// Wraps (data keys generated or wrapped, XKS encryptions).
    pub wraps: u64,
    /// Unwraps (blobs unwrapped, re-wrap sources, XKS decryptions).
    pub unwraps: u64,
    /// The first use recorded.
    pub first_used: Option<SystemTime>,
    /// The last use recorded.
    pub last_used: Option<SystemTime>,
}

impl VersionUsage {
    /// Adds `other` to this: counts summed, the earliest first use and the latest last use.
    pub fn add(&mut self, other: &VersionUsage) {
        self.wraps = self.wraps.saturating_add(other.wraps);
        self.unwraps = self.unwraps.saturating_add(other.unwraps);
        self.first_used = match (self.first_used, other.first_used) {
            (Some(a), Some(b)) => Some(a.min(b)),
            (a, b) => a.or(b),
        };
        self.last_used = match (self.last_used, other.last_used) {
            (Some(a), Some(b)) => Some(a.max(b)),
            (a, b) => a.or(b),
        };
    }
}

/// What other daemons changed, as a shared store reports it.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct StoreChanges {
    /// Keys created, changed or deleted.
    pub keys: Vec<KeyId>,
    /// Aliases changed.
    pub aliases: bool,
    /// Anything may have changed (notifications were lost): re-read everything.
    pub everything: bool,
}

/// A key's automatic rotation: every `period_days`, next at `next`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct RotationSchedule {
    /// Days between rotations (90 to 2560, as in AWS KMS).
    pub period_days: u32,
    /// When the next rotation is due.
    pub next: SystemTime,
}

/// A key as stored.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct KeyRecord {
    /// Canonical id.
    pub id: KeyId,
    /// Free text from the creator.
    pub description: String,
    /// Lifecycle state.
    pub state: KeyState,
    /// Creation time.
    pub created_at: SystemTime,
    /// When the key is destroyed, while `state` is `PendingDeletion`.
    pub deletion_date: Option<SystemTime>,
    /// Versions, oldest first; never empty.
    pub versions: Vec<VersionRecord>,
    /// Aliases pointing at the key, sorted.
    pub aliases: Vec<AliasName>,
    /// Automatic rotation, when enabled.
    pub rotation: Option<RotationSchedule>,
    /// The key's tags (sorted by key).
    pub tags: BTreeMap<String, String>,
    /// Generated in the token, or imported.
    pub origin: KeyOrigin,
    /// For `EXTERNAL` keys that had material imported.
    pub material: Option<ImportedMaterial>,
    /// The key policy document (`None`: a key made before key policies, which has AWS's
    /// default policy, [`crate::auth::key_policy::KeyPolicy::default_document`]).
    pub policy: Option<String>,
    /// The key's grants, oldest first.
    pub grants: Arc<[Grant]>,
}

impl KeyRecord {
    /// Whether the token should hold the key's objects: always for generated keys; for
    /// imported ones, while their material is imported and not deleted or expired.
    pub fn has_material(&self) -> bool {
        self.origin == KeyOrigin::Hsm || self.material.is_some_and(|m| m.present)
    }

    /// The newest version (used for new wraps).
    pub fn current_version(&self) -> u32 {
        self.versions.last().map_or(0, |v| v.version)
    }
}

/// Position in a listing: the listing continues after this point.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Cursor(pub String);

/// Durable metadata. Every method is atomic; implementations block.
pub trait MetadataStore: Send + Sync + 'static {
    /// Inserts a new key, with its first version and optional alias, atomically.
    /// A taken alias is [`crate::Error::AlreadyExists`].
    fn create_key(&self, key: &KeyRecord, alias: Option<&AliasName>) -> Result<()>;
    /// One key, with versions and aliases.
    fn key(&self, id: &KeyId) -> Result<Option<KeyRecord>>;
    /// Every key (start-up cache fill).
    fn all_keys(&self) -> Result<Vec<KeyRecord>>;
    /// Keys in creation order after `after`, at most `limit`, with the cursor of each.
    fn list_keys(&self, after: &Cursor, limit: usize) -> Result<Vec<(Cursor, KeyRecord)>>;
    /// Appends a version (and forgets it as pending, see [`MetadataStore::begin_version`]).
    fn add_version(&self, id: &KeyId, version: &VersionRecord) -> Result<()>;
    /// Claims a version number, before its key object is generated: after a crash before
    /// [`MetadataStore::add_version`], the claim proves the object in the token is this
    /// daemon's own unfinished rotation, not key material the metadata lost; and in a fleet,
    /// no two daemons ever generate an object for one version (the store decides the race).
    /// Returns true when this daemon had claimed it already (an interrupted rotation of its
    /// own), false for a new claim; [`crate::Error::AlreadyExists`] when the version exists or
    /// another daemon holds the claim.
    fn begin_version(&self, id: &KeyId, version: u32) -> Result<bool>;
    /// Versions this daemon claimed and never added.
    fn pending_versions(&self) -> Result<Vec<(KeyId, u32)>>;
    /// Forgets a pending version.
    fn end_version(&self, id: &KeyId, version: u32) -> Result<()>;
    /// Sets (or, with `None`, turns off) the key's automatic rotation.
    fn set_rotation(&self, id: &KeyId, rotation: Option<&RotationSchedule>) -> Result<()>;
    /// Replaces the key's tags.
    fn set_tags(&self, id: &KeyId, tags: &BTreeMap<String, String>) -> Result<()>;
    /// Replaces a key's description; [`crate::Error::KeyNotFound`] if it does not exist.
    fn set_description(&self, id: &KeyId, description: &str) -> Result<()>;
    /// Replaces the key policy document.
    fn set_policy(&self, id: &KeyId, policy: &str) -> Result<()>;
    /// Adds a grant to a key, unless the key holds a grant of the same name and parameters
    /// ([`Grant::same_as`]: a retried `CreateGrant`), which is answered instead. Atomic, so
    /// that two daemons making the same named grant at once make one;
    /// [`crate::Error::LimitReached`] past [`Grant::over_limit`]'s limits,
    /// [`crate::Error::KeyNotFound`] without the key.
    fn add_grant(&self, id: &KeyId, grant: &Grant) -> Result<Grant>;
    /// Removes a grant of a key; false if the key has no such grant.
    fn remove_grant(&self, id: &KeyId, grant_id: &str) -> Result<bool>;
    /// Sets the state and the imported material's record of an `EXTERNAL` key, atomically.
    ///
    /// Only if the recorded check value is still `expected` (`None`: none recorded):
    /// otherwise nothing changes and the answer is [`crate::Error::IncorrectKeyMaterial`]
    /// (another import recorded other material first), or [`crate::Error::KeyNotFound`].
    fn set_material(
        &self,
        id: &KeyId,
        expected: Option<&crate::hsm::KeyCheckValue>,
        state: KeyState,
        material: &ImportedMaterial,
    ) -> Result<()>;
    /// Sets the state and deletion date.
    fn set_state(
        &self,
        id: &KeyId,
        state: KeyState,
        deletion_date: Option<SystemTime>,
    ) -> Result<()>;
    /// Claims the next `block` wraps of a version, atomically: adds `block` to its persisted
    /// reservation and returns the new total, so the caller owns wraps `total - block ..
    /// total` and no two daemons ever use one block.
    fn claim_wraps(&self, id: &KeyId, version: u32, block: u64) -> Result<u64>;
    /// Removes a key, its versions and aliases (after its token objects are destroyed).
    fn delete_key(&self, id: &KeyId, deleted_at: SystemTime) -> Result<()>;
    /// Keys pending deletion whose date is at or before `now`.
    fn keys_due_for_deletion(&self, now: SystemTime) -> Result<Vec<KeyId>>;
    /// Every alias and its key.
    fn all_aliases(&self) -> Result<Vec<(AliasName, KeyId)>>;
    /// Retires or restores a version (KeyNotFound if the key has no such version).
    fn set_version_retired(&self, id: &KeyId, version: u32, retired: bool) -> Result<()>;
    /// Records a version's destruction: scheduled, cancelled or carried out.
    fn set_version_destruction(
        &self,
        id: &KeyId,
        version: u32,
        destruction: VersionDestruction,
    ) -> Result<()>;
    /// Adds usage counted by this daemon to each version's (one transaction; a version that
    /// no longer exists is skipped).
    fn add_usage(&self, usage: &[(KeyId, u32, VersionUsage)]) -> Result<()>;
    /// The usage recorded for a key's versions (versions never used are absent).
    fn usage(&self, id: &KeyId) -> Result<Vec<(u32, VersionUsage)>>;
    /// The key one alias names.
    fn alias(&self, alias: &AliasName) -> Result<Option<KeyId>> {
        Ok(self
            .all_aliases()?
            .into_iter()
            .find_map(|(name, key)| (&name == alias).then_some(key)))
    }
    /// Creates an alias; [`crate::Error::AlreadyExists`] if taken.
    fn create_alias(&self, alias: &AliasName, key: &KeyId) -> Result<()>;
    /// Re-points an alias; [`crate::Error::AliasNotFound`] if it does not exist.
    fn update_alias(&self, alias: &AliasName, key: &KeyId) -> Result<()>;
    /// Deletes an alias, returning the key it pointed at.
    fn delete_alias(&self, alias: &AliasName) -> Result<Option<KeyId>>;
    /// Whether several daemons share this store (then the key store follows its changes, see
    /// [`MetadataStore::wait_for_changes`]).
    fn is_shared(&self) -> bool {
        false
    }
    /// Blocks until other daemons changed something, or `timeout` passes. Only called when
    /// [`MetadataStore::is_shared`].
    fn wait_for_changes(&self, timeout: std::time::Duration) -> Result<StoreChanges> {
        std::thread::sleep(timeout);
        Ok(StoreChanges::default())
    }
    /// Takes the fleet-wide maintenance lock (scheduled deletions and automatic rotations
    /// run on one daemon at a time): false when another daemon holds it. A single daemon's
    /// store always grants it.
    fn try_lock_maintenance(&self) -> Result<bool> {
        Ok(true)
    }
    /// Releases the maintenance lock.
    fn unlock_maintenance(&self) {}
    /// Aliases sorted by name after `after`, optionally of one key, at most `limit`.
    fn list_aliases(
        &self,
        key: Option<&KeyId>,
        after: &Cursor,
        limit: usize,
    ) -> Result<Vec<(AliasName, KeyId)>>;
}

/// The error of a conditional material update whose condition no longer held.
pub(super) fn other_material(id: &KeyId) -> crate::Error {
    crate::Error::IncorrectKeyMaterial(format!(
        "another import recorded different key material for key {id} first; nothing changed"
    ))
}

/// Parses a stored key check value (hex).
pub(super) fn decode_check_value(text: &str) -> Option<crate::hsm::KeyCheckValue> {
    hex::decode(text).ok()?.try_into().ok()
}

// ---- conversions both stores use ----------------------------------------------------------

/// A time as the stores keep it: milliseconds since the Unix epoch (0 before it, saturating).
pub(super) fn to_millis(t: SystemTime) -> i64 {
    t.duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| i64::try_from(d.as_millis()).unwrap_or(i64::MAX))
}

/// A stored time (a negative one reads as the epoch).
pub(super) fn from_millis(ms: i64) -> SystemTime {
    std::time::UNIX_EPOCH + Duration::from_millis(u64::try_from(ms).unwrap_or(0))
}

/// A stored value wrapd did not write.
pub(super) fn corrupt(what: &str, value: &str) -> crate::Error {
    crate::Error::Store(format!("corrupt metadata: {what} {value:?}"))
}

/// What adding `grant` to a key that holds `grants` does, for both stores: answer with the
/// same named grant already there (`Some`), make it (`None`), or refuse it past
/// [`Grant::over_limit`]'s limits.
pub(super) fn grant_to_add(id: &KeyId, grants: &[Grant], grant: &Grant) -> Result<Option<Grant>> {
    if let Some(same) = grants.iter().find(|g| g.same_as(grant)) {
        return Ok(Some(same.clone()));
    }
    match grant.over_limit(grants) {
        Some(why) => Err(crate::Error::LimitReached(format!("key {id}: {why}"))),
        None => Ok(None),
    }
}

/// A grant as both stores keep it: operations as comma-separated names, constraints as JSON
/// objects.
pub(super) struct GrantRow {
    pub grant_id: String,
    pub name: String,
    pub grantee: String,
    pub retiring: Option<String>,
    pub operations: String,
    pub equals: Option<String>,
    pub subset: Option<String>,
    pub issuer: String,
    pub created_at: i64,
}

impl GrantRow {
    /// The row of a grant.
    pub(super) fn of(grant: &Grant) -> Self {
        let json = |map: &Option<BTreeMap<String, String>>| {
            map.as_ref()
                .map(|m| serde_json::to_string(m).unwrap_or_default())
        };
        Self {
            grant_id: grant.id.clone(),
            name: grant.name.clone(),
            grantee: grant.grantee.clone(),
            retiring: grant.retiring.clone(),
            operations: grant
                .operations
                .iter()
                .map(|op| op.name())
                .collect::<Vec<_>>()
                .join(","),
            equals: json(&grant.constraints.equals),
            subset: json(&grant.constraints.subset),
            issuer: grant.issuer.clone(),
            created_at: to_millis(grant.created_at),
        }
    }

    /// The grant a row holds.
    pub(super) fn into_grant(self) -> Result<Grant> {
        let operations = self
            .operations
            .split(',')
            .map(|name| GrantOperation::parse(name).ok_or_else(|| corrupt("grant operation", name)))
            .collect::<Result<Vec<_>>>()?;
        let map = |text: Option<String>| {
            text.map(|text| {
                serde_json::from_str::<BTreeMap<String, String>>(&text)
                    .map_err(|_| corrupt("grant constraint", &text))
            })
            .transpose()
        };
        Ok(Grant {
            id: self.grant_id,
            name: self.name,
            grantee: self.grantee,
            retiring: self.retiring,
            operations: crate::grant::normalized(operations),
            constraints: Constraints {
                equals: map(self.equals)?,
                subset: map(self.subset)?,
            },
            issuer: self.issuer,
            created_at: from_millis(self.created_at),
        })
    }
}
