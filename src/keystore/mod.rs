//! The key store: master keys (metadata + token objects) and the data-key operations on them.
//!
//! [`Keystore`] is what the gRPC services call. It owns the rules (states, versions, aliases,
//! wrap limits, deletion) and talks to two things below it: a [`Token`] holding key material
//! and a [`MetadataStore`] holding everything else. Writes go to the store first and are then
//! reflected in an in-memory view, so the data-plane hot path (resolve the key, check its
//! state, one token call) never touches the database.
//!
//! With a store shared by a fleet (PostgreSQL, `postgres/`), other daemons change it too:
//! [`Keystore::follow_store`] refreshes the view on the store's notifications and re-reads
//! everything periodically; a key or version the view does not know is looked up in the
//! store before it is called unknown; version numbers and wrap blocks are claimed in the
//! store, and deletions and automatic rotations run under a fleet-wide lock.
//!
//! Every method blocks (token and database calls): run them off the async executor.
//!
//! One file per part: `view.rs` (the view and following a shared store), `lifecycle.rs`
//! (create, enable, disable, delete), `rotation.rs` (versions), `retirement.rs` (retiring and
//! restoring versions), `aliases.rs`, `grants.rs`,
//! `data_plane.rs` (generate, wrap, unwrap, re-wrap, wrap counts), `external.rs` (raw
//! AES-GCM for the XKS proxy API), `import.rs` (imported key material), `tickets.rs` (what
//! the token records out of the store's reach), `usage.rs` (how each version is used); the
//! store boundary in `metadata.rs` with `sqlite.rs` and `postgres/`; start-up and health here.

mod aliases;
#[doc(hidden)]
#[cfg(any(test, feature = "test-support"))]
pub mod conformance;
mod data_plane;
mod external;
mod grants;
mod import;
mod lifecycle;
mod metadata;
#[cfg(feature = "postgres")]
mod postgres;
mod postgres_options;
mod read_through;
mod retirement;
mod rotation;
mod sqlite;
mod tickets;
mod usage;
mod view;

use std::collections::{BTreeMap, HashMap, HashSet};
use std::sync::Arc;
use std::time::{Duration, SystemTime};

use parking_lot::{Mutex, RwLock};
use zeroize::Zeroizing;

pub use external::{ExternalSealed, MAX_EXTERNAL_AAD, MAX_EXTERNAL_PLAINTEXT};
pub use import::{ImportParameters, MAX_IMPORT_TOKENS_PER_KEY};
pub use metadata::{
    Cursor, ImportedMaterial, KeyOrigin, KeyRecord, KeyState, MetadataStore, RotationSchedule,
    StoreChanges, VersionDestruction, VersionRecord, VersionUsage,
};
#[cfg(feature = "postgres")]
pub use postgres::{INSTANCE_WAIT, PostgresStore};
pub use postgres_options::PostgresOptions;
pub use sqlite::SqliteStore;

use crate::blob::{Blob, MAX_PLAINTEXT_LEN};
use crate::context::EncryptionContext;
use crate::error::{Error, ErrorKind, Result};
use crate::hsm::{ObjectId, Ticket, Token};
use crate::ids::{AliasName, KeyId, KeyRef};

/// Largest data key GenerateDataKey makes, in bytes.
pub const MAX_DATA_KEY_LEN: u32 = 64;

/// Automatic rotation periods, in days (as in AWS KMS).
pub const ROTATION_PERIOD_DAYS: std::ops::RangeInclusive<u32> = 90..=2560;

/// Copies every key (with its versions, wrap counts, rotation schedule, tags, policy and
/// grants) and alias from `from` into `to`, which must hold no key (`wrapd migrate-store`). Returns the
/// numbers of keys and aliases copied. Pending version claims are not copied: finish or
/// abandon rotations before migrating (stop the daemon cleanly).
pub fn copy_metadata(from: &dyn MetadataStore, to: &dyn MetadataStore) -> Result<(usize, usize)> {
    if !to.all_keys()?.is_empty() {
        return Err(Error::Config(
            "the target store already holds keys; migrate into an empty database".into(),
        ));
    }
    let keys = from.all_keys()?;
    for key in &keys {
        to.create_key(
            &KeyRecord {
                aliases: Vec::new(),
                grants: Default::default(),
                ..key.clone()
            },
            None,
        )?;
    }
    for key in &keys {
        for grant in key.grants.iter() {
            to.add_grant(&key.id, grant)?;
        }
    }
    let aliases = from.all_aliases()?;
    for (alias, key) in &aliases {
        to.create_alias(alias, key)?;
    }
    Ok((keys.len(), aliases.len()))
}

/// The fleet-wide maintenance lock, released on drop.
struct MaintenanceLock<'a>(&'a dyn MetadataStore);

impl<'a> MaintenanceLock<'a> {
    fn take(store: &'a dyn MetadataStore) -> Result<Option<Self>> {
        Ok(store.try_lock_maintenance()?.then_some(Self(store)))
    }

    /// The lock, waiting up to `within` for another daemon of the fleet to release it.
    fn wait(store: &'a dyn MetadataStore, within: Duration) -> Result<Self> {
        let deadline = std::time::Instant::now() + within;
        loop {
            if let Some(lock) = Self::take(store)? {
                return Ok(lock);
            }
            if std::time::Instant::now() >= deadline {
                return Err(Error::Unavailable(
                    "another daemon of the fleet holds the maintenance lock; try again".into(),
                ));
            }
            std::thread::sleep(Duration::from_millis(50));
        }
    }
}

impl Drop for MaintenanceLock<'_> {
    fn drop(&mut self) {
        self.0.unlock_maintenance();
    }
}

/// How long a key store change that needs the fleet's maintenance lock (scheduling or
/// cancelling a deletion, importing or deleting material) waits for another daemon's pass.
const MAINTENANCE_LOCK_WAIT: Duration = Duration::from_secs(5);

/// How long a version claim of another daemon is waited for before the number is skipped.
const STUCK_CLAIM: Duration = Duration::from_secs(10);

/// The refreshes notifications may ask for in a second, in key reads (an alias refresh,
/// which reads every alias, counts [`ALIAS_REFRESH_COST`]); beyond, they wait for the next
/// re-read of everything (see [`Keystore::follow_store`]).
const REFRESH_BUDGET: usize = 64;
const ALIAS_REFRESH_COST: usize = 16;

/// Least time between two re-reads of the whole store that notifications ask for (see
/// [`Keystore::follow_store`]).
pub const MIN_RESYNC_GAP: Duration = Duration::from_secs(1);

/// Most tags on one key (as in AWS KMS).
pub const MAX_TAGS: usize = 50;

/// `current` with `changes` added (or, with `remove`, the tags they name removed), checked.
fn checked_tags(
    current: &BTreeMap<String, String>,
    changes: &BTreeMap<String, String>,
    remove: bool,
) -> Result<BTreeMap<String, String>> {
    let mut updated = current.clone();
    for (name, value) in changes {
        if name.is_empty() || name.chars().count() > 128 || name.starts_with("aws:") {
            return Err(Error::invalid(
                "a tag key is 1 to 128 characters and does not start with aws:",
            ));
        }
        if remove {
            updated.remove(name);
        } else {
            if value.chars().count() > 256 {
                return Err(Error::invalid("a tag value is at most 256 characters"));
            }
            updated.insert(name.clone(), value.clone());
        }
    }
    if updated.len() > MAX_TAGS {
        return Err(Error::LimitReached(format!(
            "a key has at most {MAX_TAGS} tags"
        )));
    }
    Ok(updated)
}

/// Imported keys are never rotated, by hand, on a schedule or at the wrap limit: a new
/// version would need new material from the owner's ceremony, and wrapd cannot make it.
/// Rotate them as AWS KMS long documented: import the new material into a new key, point
/// the alias at it, and move blobs with ReWrap.
fn refuse_imported_rotation(key: &KeyRecord) -> Result<()> {
    if key.origin == KeyOrigin::External {
        return Err(Error::Unsupported(format!(
            "key {} has imported key material and is not rotated: import new material into a new key and re-point its alias (ReWrap moves blobs)",
            key.id
        )));
    }
    Ok(())
}

fn days_of(days: u32) -> Duration {
    Duration::from_secs(u64::from(days) * 86_400)
}
/// Data key length when the request says 0.
pub const DEFAULT_DATA_KEY_LEN: u32 = 32;
/// Longest key description, in bytes.
pub const MAX_DESCRIPTION_LEN: usize = 8192;
/// Default and largest page sizes of the list operations.
pub const DEFAULT_PAGE_SIZE: u32 = 100;
/// See [`DEFAULT_PAGE_SIZE`].
pub const MAX_PAGE_SIZE: u32 = 1000;
/// Wraps reserved in the store at a time per version (one store write per this many wraps).
const WRAP_RESERVATION_BLOCK: u64 = 4096;

/// How far ahead of the wraps claimed a wrap mark is recorded in the token (16 blocks): a
/// rollback of the store then skips at most that many of a version's 2^32 wraps.
const WRAP_MARK_AHEAD: u64 = 16 * WRAP_RESERVATION_BLOCK;

/// The time source, injectable so tests can move time forward (scheduled deletion).
pub trait Clock: Send + Sync + 'static {
    /// The current time.
    fn now(&self) -> SystemTime;
}

/// The system clock.
#[derive(Debug, Default, Clone, Copy)]
pub struct SystemClock;

impl Clock for SystemClock {
    fn now(&self) -> SystemTime {
        SystemTime::now()
    }
}

/// A clock that moves only when told to (tests).
#[derive(Debug)]
pub struct ManualClock(Mutex<SystemTime>);

impl ManualClock {
    /// A clock stopped at `start`.
    pub fn new(start: SystemTime) -> Self {
        Self(Mutex::new(start))
    }

    /// Moves the clock forward.
    pub fn advance(&self, by: Duration) {
        let mut now = self.0.lock();
        *now += by;
    }
}

impl Clock for ManualClock {
    fn now(&self) -> SystemTime {
        *self.0.lock()
    }
}

/// Key store settings.
#[derive(Debug, Clone)]
pub struct KeystoreConfig {
    /// Wraps allowed per key version before the key is rotated automatically. Random 96-bit
    /// GCM IVs bound a key to 2^32 encryptions; the default, 2^30, stays well below.
    pub max_wraps_per_version: u64,
    /// Add versions found in the token that the metadata does not know (a metadata store
    /// restored from a backup older than the token) instead of refusing to start. Set by
    /// `--adopt-unknown-versions`, never by the file.
    pub adopt_unknown_versions: bool,
    /// With a shared (fleet) store: how long the data plane keeps serving from the
    /// in-memory view after the store stopped answering; beyond it, UNAVAILABLE (and health
    /// NOT_SERVING), since another daemon may have disabled or deleted keys meanwhile.
    pub max_view_staleness: Option<Duration>,
}

impl Default for KeystoreConfig {
    fn default() -> Self {
        Self {
            max_wraps_per_version: 1 << 30,
            adopt_unknown_versions: false,
            max_view_staleness: None,
        }
    }
}

/// A wrapped data key.
#[derive(Debug, Clone)]
pub struct Wrapped {
    /// The ciphertext blob.
    pub blob: Vec<u8>,
    /// The canonical id of the wrapping key.
    pub key_id: KeyId,
    /// The version used.
    pub key_version: u32,
}

/// An unwrapped data key; the plaintext is zeroized on drop.
pub struct Unwrapped {
    /// The data key.
    pub plaintext: Zeroizing<Vec<u8>>,
    /// The key the blob was wrapped under.
    pub key_id: KeyId,
    /// Its version.
    pub key_version: u32,
}

impl std::fmt::Debug for Unwrapped {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Unwrapped")
            .field("plaintext", &"<redacted>")
            .field("key_id", &self.key_id)
            .field("key_version", &self.key_version)
            .finish()
    }
}

/// A fresh data key, in plaintext and wrapped.
pub struct GeneratedKey {
    /// The data key; zeroized on drop.
    pub plaintext: Zeroizing<Vec<u8>>,
    /// The same key wrapped.
    pub wrapped: Wrapped,
}

impl std::fmt::Debug for GeneratedKey {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("GeneratedKey")
            .field("plaintext", &"<redacted>")
            .field("wrapped", &self.wrapped)
            .finish()
    }
}

/// A ReWrap result.
#[derive(Debug)]
pub struct Rewrapped {
    /// The new blob, under the newest version of the destination key.
    pub wrapped: Wrapped,
    /// The key the input blob was wrapped under.
    pub source_key_id: KeyId,
    /// The version the input blob was wrapped under.
    pub source_key_version: u32,
}

/// One page of a listing.
#[derive(Debug)]
pub struct Page<T> {
    /// The items.
    pub items: Vec<T>,
    /// Token of the next page; empty on the last page.
    pub next_page_token: String,
}

/// What start-up reconciliation found.
#[derive(Debug, Default)]
pub struct ReconcileReport {
    /// Versions in the metadata whose token object is missing.
    pub missing: Vec<ObjectId>,
    /// wrapd objects in the token that no metadata refers to.
    pub orphans: Vec<ObjectId>,
}

#[derive(Default)]
struct View {
    keys: HashMap<KeyId, Arc<KeyRecord>>,
    aliases: HashMap<AliasName, KeyId>,
}

struct WrapCounter {
    used: u64,
    reserved: u64,
    /// The highest wrap mark in the token, as far as this process knows (see
    /// `claim_wrap_block`); `None` until read.
    mark: Option<u64>,
}

/// The key store. Share it in an `Arc`.
pub struct Keystore {
    token: Arc<dyn Token>,
    store: Arc<dyn MetadataStore>,
    clock: Arc<dyn Clock>,
    config: KeystoreConfig,
    view: RwLock<View>,
    counters: Mutex<HashMap<ObjectId, WrapCounter>>,
    missing: RwLock<HashSet<ObjectId>>,
    /// Serializes control-plane changes so that the view follows the store in order.
    admin: Mutex<()>,
    /// The health probe's blob (see `probe`).
    probe: Mutex<Option<Vec<u8>>>,
    /// When the shared store last answered the follower (see `follow_store`).
    last_sync: Mutex<std::time::Instant>,
    /// How often the shared store is asked about names the view lacks.
    read_through: read_through::ReadThrough,
    /// Serializes GetParametersForImport (see `import.rs`).
    import_parameters: Mutex<()>,
    /// Uses counted since the last flush to the store, per key version (see `usage.rs`).
    usage: Mutex<HashMap<KeyId, BTreeMap<u32, VersionUsage>>>,
    /// This daemon's wraps and unwraps per version since it started, as flushed (metrics).
    flushed_usage: Mutex<HashMap<ObjectId, (u64, u64)>>,
    /// Disagreements between the store and the token's holds and alias tickets already
    /// logged (see `tickets.rs`).
    reported: Mutex<HashSet<String>>,
}

fn object_of(key: &KeyRecord, version: u32) -> ObjectId {
    ObjectId::new(key.id.clone(), version)
}

fn page_size(requested: u32) -> Result<usize> {
    match requested {
        0 => Ok(DEFAULT_PAGE_SIZE as usize),
        n if n <= MAX_PAGE_SIZE => Ok(n as usize),
        _ => Err(Error::invalid(format!(
            "page_size must be at most {MAX_PAGE_SIZE}"
        ))),
    }
}

/// Page tokens are the hex of a cursor with a per-listing prefix: opaque to callers, and a
/// token of one listing is refused by another.
fn decode_page_token(prefix: &str, token: &str) -> Result<Cursor> {
    if token.is_empty() {
        return Ok(Cursor::default());
    }
    hex::decode(token)
        .ok()
        .and_then(|bytes| String::from_utf8(bytes).ok())
        .and_then(|text| text.strip_prefix(prefix).map(str::to_owned))
        .map(Cursor)
        .ok_or_else(|| Error::invalid("malformed page_token"))
}

fn encode_page_token(prefix: &str, cursor: &Cursor) -> String {
    hex::encode(format!("{prefix}{}", cursor.0))
}

/// Whether the data plane may use a key at `now`: enabled, and for an imported key, with
/// material that has not expired (the maintenance task destroys expired material; until it
/// runs, the expiry is enforced here).
fn usable_at(key: &KeyRecord, now: impl FnOnce() -> SystemTime) -> Result<()> {
    match key.state {
        KeyState::Enabled => {}
        KeyState::Disabled => return Err(Error::Disabled(format!("key {} is disabled", key.id))),
        KeyState::PendingDeletion => {
            return Err(Error::WrongState(format!(
                "key {} is pending deletion",
                key.id
            )));
        }
        KeyState::PendingImport => {
            return Err(Error::WrongState(format!(
                "key {} is pending import: it has no key material (import it first)",
                key.id
            )));
        }
    }
    if let Some(valid_to) = key.material.and_then(|m| m.valid_to) {
        if valid_to <= now() {
            return Err(Error::WrongState(format!(
                "the key material of key {} has expired",
                key.id
            )));
        }
    }
    Ok(())
}

impl Keystore {
    /// Opens the key store: loads the metadata and reconciles it with the token.
    pub fn open(
        token: Arc<dyn Token>,
        store: Arc<dyn MetadataStore>,
        clock: Arc<dyn Clock>,
        config: KeystoreConfig,
    ) -> Result<Self> {
        let keystore = Self {
            token,
            store,
            clock,
            config,
            view: RwLock::new(View::default()),
            counters: Mutex::new(HashMap::new()),
            missing: RwLock::new(HashSet::new()),
            admin: Mutex::new(()),
            probe: Mutex::new(None),
            last_sync: Mutex::new(std::time::Instant::now()),
            read_through: read_through::ReadThrough::default(),
            import_parameters: Mutex::new(()),
            usage: Mutex::new(HashMap::new()),
            flushed_usage: Mutex::new(HashMap::new()),
            reported: Mutex::new(HashSet::new()),
        };
        keystore.adopt_holds_and_aliases_once()?;
        keystore.reload()?;
        let report = keystore.reconcile()?;
        keystore.settle_unknown_versions(&report)?;
        keystore.adopt_tickets_once()?;
        Ok(keystore)
    }

    /// The token below (health checks, benchmarks).
    pub fn token(&self) -> &Arc<dyn Token> {
        &self.token
    }

    /// Compares the metadata with the token's objects. A version without its object makes
    /// operations on that version fail with UNAVAILABLE (logged); orphans are reported.
    pub fn reconcile(&self) -> Result<ReconcileReport> {
        let in_token: HashSet<ObjectId> = self.token.list_keys()?.into_iter().collect();
        let mut expected = HashSet::new();
        let mut report = ReconcileReport::default();
        for key in self.read_view().keys.values() {
            for v in &key.versions {
                let object = ObjectId::new(key.id.clone(), v.version);
                if v.destroyed_at.is_some() {
                    continue; // neither missing nor expected: its object was destroyed
                }
                if !key.has_material() {
                    // An imported key without material has no object (or one left by an
                    // import that crashed before its commit, which the next import checks).
                    expected.insert(object);
                    continue;
                }
                if !in_token.contains(&object) {
                    tracing::error!(key_id = %key.id, version = v.version,
                        "key version has no object in the token: this version is unavailable");
                    report.missing.push(object.clone());
                }
                expected.insert(object);
            }
        }
        for object in in_token.difference(&expected) {
            tracing::warn!(object = %object, "orphan key object in the token (no metadata refers to it)");
            report.orphans.push(object.clone());
        }
        report.missing.sort();
        report.orphans.sort();
        *self.missing.write() = report.missing.iter().cloned().collect();
        Ok(report)
    }

    /// `len` random bytes from the token's generator.
    pub fn random(&self, len: usize) -> Result<Zeroizing<Vec<u8>>> {
        self.token.random(len)
    }

    /// A real check that the token can serve, for the health service: unwraps a probe blob
    /// (made once, by one counted wrap with some enabled key) through the token, so that a
    /// token that lost its objects shows as NOT_SERVING. Without any enabled key, a session
    /// check. Token faults are errors; a probe key that was disabled or deleted is replaced.
    pub fn probe(&self) -> Result<()> {
        self.check_fresh()?;
        let context = EncryptionContext::default();
        let cached = self.probe.lock().clone();
        if let Some(blob) = cached {
            match self.unwrap_uncounted(&blob, &context, None) {
                Ok(_) => return Ok(()),
                Err(err) if err.kind() == ErrorKind::Unavailable => return Err(err),
                Err(_) => *self.probe.lock() = None, // the probe key changed state: replace it
            }
        }
        let key = self
            .read_view()
            .keys
            .values()
            .filter(|k| k.state == KeyState::Enabled)
            .min_by_key(|k| k.created_at)
            .map(|k| k.id.clone());
        let Some(id) = key else {
            return self.token.ping();
        };
        let (key, version) = self.wrapping_version(&KeyRef::Id(id))?;
        let wrapped = self.seal_uncounted(&key.id, version, b"wrapd health probe", &context)?;
        self.unwrap_uncounted(&wrapped.blob, &context, None)?;
        *self.probe.lock() = Some(wrapped.blob);
        Ok(())
    }
}

#[cfg(test)]
mod tests;
