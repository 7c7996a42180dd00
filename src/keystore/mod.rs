//! The key store: master keys (metadata + token objects) and the data-key operations on them.
//!
//! [`Keystore`] is what the gRPC services call. It owns the rules (states, versions, aliases,
//! wrap limits, deletion) and talks to two things below it: a [`Token`] holding key material
//! and a [`MetadataStore`] holding everything else. Writes go to the store first and are then
//! reflected in an in-memory view, so the data-plane hot path (resolve the key, check its
//! state, one token call) never touches the database.
//!
//! With a store shared by a fleet (PostgreSQL, `postgres.rs`), other daemons change it too:
//! [`Keystore::follow_store`] refreshes the view on the store's notifications and re-reads
//! everything periodically; a key or version the view does not know is looked up in the
//! store before it is called unknown; version numbers and wrap blocks are claimed in the
//! store, and deletions and automatic rotations run under a fleet-wide lock.
//!
//! Every method blocks (token and database calls): run them off the async executor.

#[doc(hidden)]
pub mod conformance;
mod import;
mod metadata;
mod postgres;
mod read_through;
mod sqlite;
mod tickets;

use std::collections::{BTreeMap, HashMap, HashSet};
use std::sync::Arc;
use std::time::{Duration, SystemTime};

use parking_lot::{Mutex, RwLock};
use zeroize::Zeroizing;

pub use import::{ImportParameters, MAX_IMPORT_TOKENS_PER_KEY};
pub use metadata::{
    Cursor, ImportedMaterial, KeyOrigin, KeyRecord, KeyState, MetadataStore, RotationSchedule,
    StoreChanges, VersionRecord,
};
pub use postgres::{INSTANCE_WAIT, PostgresOptions, PostgresStore};
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

/// Copies every key (with its versions, wrap counts, rotation schedule and tags) and alias
/// from `from` into `to`, which must hold no key (`wrapd migrate-store`). Returns the
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
                ..key.clone()
            },
            None,
        )?;
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
    fn usable(&self, key: &KeyRecord) -> Result<()> {
        usable_at(key, || self.clock.now())
    }

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
            reported: Mutex::new(HashSet::new()),
        };
        keystore.adopt_holds_and_aliases_once()?;
        keystore.reload()?;
        let report = keystore.reconcile()?;
        keystore.settle_unknown_versions(&report)?;
        keystore.adopt_tickets_once()?;
        Ok(keystore)
    }

    /// Start-up: what to do with objects in the token that are versions of known keys the
    /// metadata does not list (as after the metadata store is restored from an older backup).
    /// Key material is never destroyed: an object left by this daemon's own unfinished
    /// rotation (its version was recorded as pending) is adopted; any other is an error
    /// naming the way out, unless [`KeystoreConfig::adopt_unknown_versions`] is set. Adopted
    /// versions unwrap their blobs but take no new wraps (their wrap counts are unknown): the
    /// next wrap rotates.
    fn settle_unknown_versions(&self, report: &ReconcileReport) -> Result<()> {
        let pending: HashSet<(KeyId, u32)> = self.store.pending_versions()?.into_iter().collect();
        let mut unknown = Vec::new();
        for object in &report.orphans {
            let Some(key) = self.read_view().keys.get(&object.key_id).cloned() else {
                continue; // a key no metadata knows: reported as an orphan
            };
            if key.versions.iter().any(|v| v.version == object.version) {
                continue;
            }
            if pending.contains(&(object.key_id.clone(), object.version)) {
                tracing::warn!(object = %object, "adopting the key object of a rotation interrupted by a crash (it takes no new wraps)");
                self.adopt(&key.id, object.version)?;
            } else {
                unknown.push(object.clone());
            }
        }
        for (id, version) in &pending {
            if !report
                .orphans
                .contains(&ObjectId::new(id.clone(), *version))
            {
                self.store.end_version(id, *version)?; // never generated, or adopted above
            }
        }
        if unknown.is_empty() {
            return Ok(());
        }
        let names: Vec<String> = unknown.iter().map(ToString::to_string).collect();
        if !self.config.adopt_unknown_versions {
            return Err(Error::Config(format!(
                "the token holds key versions the metadata store does not know: {}. The store is older than the token (restored from a backup?) or was edited; blobs may exist under these versions, so nothing was destroyed. Restore the newest metadata backup, or start with --adopt-unknown-versions to add them to the metadata (they unwrap their blobs; new wraps go to a fresh version)",
                names.join(", ")
            )));
        }
        for object in unknown {
            tracing::warn!(object = %object, "adopting a key version the metadata did not know (--adopt-unknown-versions)");
            self.adopt(&object.key_id, object.version)?;
        }
        Ok(())
    }

    /// Adds a version whose object exists in the token, as used up for wrapping.
    fn adopt(&self, id: &KeyId, version: u32) -> Result<()> {
        self.store.add_version(
            id,
            &VersionRecord {
                version,
                created_at: self.clock.now(),
                wraps_reserved: self.config.max_wraps_per_version,
                automatic: false,
            },
        )?;
        self.refresh(id)?;
        Ok(())
    }

    /// The token below (health checks, benchmarks).
    pub fn token(&self) -> &Arc<dyn Token> {
        &self.token
    }

    /// Re-reads every key and alias from the store, as the token lets them stand.
    fn reload(&self) -> Result<()> {
        let keys = self.store.all_keys()?;
        let aliases = self.store.all_aliases()?;
        let anchors = tickets::Anchors::read(&*self.token)?;
        let keys = keys
            .into_iter()
            .map(|k| Ok((k.id.clone(), Arc::new(self.anchored(k, Some(&anchors))?))))
            .collect::<Result<HashMap<_, _>>>()?;
        let aliases = self.anchored_aliases(aliases, Some(&anchors))?;
        let mut view = self.view.write();
        view.keys = keys;
        view.aliases = aliases.into_iter().collect();
        drop(view);
        self.read_through.forget_misses();
        Ok(())
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
            match self.unwrap(&blob, &context, None) {
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
        let wrapped = self.wrap(&KeyRef::Id(id), b"wrapd health probe", &context)?;
        self.unwrap(&wrapped.blob, &context, None)?;
        *self.probe.lock() = Some(wrapped.blob);
        Ok(())
    }

    /// True when the version's token object was found missing at reconciliation.
    pub fn is_missing(&self, key_id: &KeyId, version: u32) -> bool {
        self.missing
            .read()
            .contains(&ObjectId::new(key_id.clone(), version))
    }

    /// Re-reads everything from the store (a fleet's safety net, and after lost
    /// notifications).
    pub fn resync(&self) -> Result<()> {
        self.reload()
    }

    /// Follows what other daemons change in a shared store until `stop` is set: each
    /// notification refreshes the keys it names (or everything), and everything is re-read
    /// every `resync` as the safety net. Blocks; run it on a thread of its own. A store
    /// error is logged and retried after a pause.
    ///
    /// The view counts as confirmed (for `max_staleness`) as of a wait whose changes were
    /// all applied by queries that succeeded, never merely because a wait ended. A re-read
    /// of everything asked for by notifications (a payload wrapd does not send: any role
    /// that can connect may NOTIFY) runs at most once per [`MIN_RESYNC_GAP`].
    pub fn follow_store(&self, resync: Duration, stop: &std::sync::atomic::AtomicBool) {
        use std::sync::atomic::Ordering;
        use std::time::Instant;
        let min_gap = MIN_RESYNC_GAP.min(resync);
        // The first re-read (asked for by the first LISTEN) is not held back.
        let mut last_resync = Instant::now()
            .checked_sub(min_gap)
            .unwrap_or_else(Instant::now);
        // A re-read of everything is due (asked for, or after an error).
        let mut owed = false;
        // Refreshes notifications asked for in the current second (any role may NOTIFY:
        // beyond the budget, they wait for the next rate-limited re-read of everything).
        let mut window = Instant::now();
        let mut spent = 0usize;
        while !stop.load(Ordering::Relaxed) {
            let due_in = if owed { min_gap } else { resync };
            let wait = due_in
                .saturating_sub(last_resync.elapsed())
                .min(Duration::from_millis(500));
            let asked = Instant::now();
            let applied = self.store.wait_for_changes(wait).and_then(|changes| {
                owed |= changes.everything;
                let since = last_resync.elapsed();
                if since >= resync || (owed && since >= min_gap) {
                    last_resync = Instant::now();
                    self.resync()?;
                    owed = false;
                    return Ok(true);
                }
                if window.elapsed() >= Duration::from_secs(1) {
                    window = Instant::now();
                    spent = 0;
                }
                let cost = changes.keys.len() + usize::from(changes.aliases) * ALIAS_REFRESH_COST;
                if spent + cost > REFRESH_BUDGET {
                    owed = true;
                }
                if owed {
                    // Rate-limited: the view waits for its re-read to be confirmed.
                    return Ok(false);
                }
                spent += cost;
                for id in &changes.keys {
                    self.refresh(id)?;
                }
                if changes.aliases {
                    self.refresh_aliases()?;
                }
                Ok(true)
            });
            match applied {
                Ok(true) => *self.last_sync.lock() = asked,
                Ok(false) => {}
                Err(err) => {
                    tracing::warn!(error = %err, "cannot follow the metadata store; retrying");
                    std::thread::sleep(Duration::from_secs(1));
                    owed = true;
                }
            }
        }
    }

    /// Refuses to serve from a view the shared store has not confirmed for longer than
    /// `max_view_staleness`.
    fn check_fresh(&self) -> Result<()> {
        let Some(max) = self.config.max_view_staleness else {
            return Ok(());
        };
        let age = self.last_sync.lock().elapsed();
        if self.store.is_shared() && age > max {
            return Err(Error::Unavailable(format!(
                "the metadata store has not answered for {} s; refusing to serve from a stale view",
                age.as_secs()
            )));
        }
        Ok(())
    }

    /// Every key in the view (metrics).
    pub fn keys(&self) -> Vec<Arc<KeyRecord>> {
        self.read_view().keys.values().cloned().collect()
    }

    /// The wrap limit of one key version.
    pub fn max_wraps_per_version(&self) -> u64 {
        self.config.max_wraps_per_version
    }

    /// Whether the metadata store is shared by a fleet.
    pub fn store_is_shared(&self) -> bool {
        self.store.is_shared()
    }

    fn read_view(&self) -> parking_lot::RwLockReadGuard<'_, View> {
        self.view.read()
    }

    /// Re-reads one key from the store into the view.
    fn refresh(&self, id: &KeyId) -> Result<Option<Arc<KeyRecord>>> {
        let record = match self.store.key(id)? {
            Some(record) => Some(Arc::new(self.anchored(record, None)?)),
            None => None,
        };
        let mut view = self.view.write();
        match &record {
            Some(r) => view.keys.insert(id.clone(), r.clone()),
            None => view.keys.remove(id),
        };
        Ok(record)
    }

    fn refresh_aliases(&self) -> Result<()> {
        let aliases = self.store.all_aliases()?;
        let anchors = tickets::Anchors::read(&*self.token)?;
        let aliases = self.anchored_aliases(aliases, Some(&anchors))?;
        self.view.write().aliases = aliases.into_iter().collect();
        self.read_through.forget_misses();
        Ok(())
    }

    /// In a fleet, re-reads a key the view lacks (or lacks a version of) from the store,
    /// within the read-through budget (`read_through.rs`); `None` if the store does not
    /// know it or the budget says not to ask.
    fn read_through(&self, id: &KeyId) -> Result<Option<Arc<KeyRecord>>> {
        let name = id.to_string();
        let now = std::time::Instant::now();
        if !self.store.is_shared() || !self.read_through.may_ask(&name, now) {
            return Ok(None);
        }
        let record = self.refresh(id)?;
        if record.is_none() {
            self.read_through.missed(&name, now);
        }
        Ok(record)
    }

    /// The key a reference names. In a fleet, a name the view lacks may have been made by
    /// another daemon a moment ago: the store is asked (within the read-through budget)
    /// before it is called unknown.
    pub fn resolve(&self, key: &KeyRef) -> Result<Arc<KeyRecord>> {
        let id = match key {
            KeyRef::Id(id) => id.clone(),
            KeyRef::Alias(alias) => match self.read_view().aliases.get(alias).cloned() {
                Some(id) => id,
                None => self
                    .alias_read_through(alias)?
                    .ok_or_else(|| Error::AliasNotFound(alias.to_string()))?,
            },
        };
        if let Some(record) = self.read_view().keys.get(&id).cloned() {
            return Ok(record);
        }
        self.read_through(&id)?
            .ok_or_else(|| Error::KeyNotFound(id.to_string()))
    }

    /// The key an alias the view lacks names in the shared store (not put in the view: the
    /// follower keeps the alias map).
    fn alias_read_through(&self, alias: &AliasName) -> Result<Option<KeyId>> {
        let name = alias.to_string();
        let now = std::time::Instant::now();
        if !self.store.is_shared() || !self.read_through.may_ask(&name, now) {
            return Ok(None);
        }
        let id = match self.store.alias(alias)? {
            Some(id)
                if self
                    .anchored_aliases(vec![(alias.clone(), id.clone())], None)?
                    .is_empty() =>
            {
                None
            }
            found => found,
        };
        if id.is_none() {
            self.read_through.missed(&name, now);
        }
        Ok(id)
    }

    // ---- control plane -------------------------------------------------------------------

    /// Creates a key with one version, and optionally an alias for it.
    pub fn create_key(
        &self,
        description: &str,
        alias: Option<&AliasName>,
    ) -> Result<Arc<KeyRecord>> {
        self.create_key_tagged(description, alias, &BTreeMap::new())
    }

    /// Creates a key with tags (checked as [`Keystore::tag_key`] checks them).
    pub fn create_key_tagged(
        &self,
        description: &str,
        alias: Option<&AliasName>,
        tags: &BTreeMap<String, String>,
    ) -> Result<Arc<KeyRecord>> {
        self.create_key_from(description, alias, tags, KeyOrigin::Hsm)
    }

    /// Creates a key whose material is generated in the token ([`KeyOrigin::Hsm`]) or
    /// imported later ([`KeyOrigin::External`]: the key starts `PENDING_IMPORT`, its one
    /// version without an object until [`Keystore::import_key_material`]).
    pub fn create_key_from(
        &self,
        description: &str,
        alias: Option<&AliasName>,
        tags: &BTreeMap<String, String>,
        origin: KeyOrigin,
    ) -> Result<Arc<KeyRecord>> {
        let tags = checked_tags(&BTreeMap::new(), tags, false)?;
        if description.len() > MAX_DESCRIPTION_LEN {
            return Err(Error::invalid(format!(
                "description is longer than {MAX_DESCRIPTION_LEN} bytes"
            )));
        }
        let _admin = self.admin.lock();
        if let Some(alias) = alias {
            if self.read_view().aliases.contains_key(alias) {
                return Err(Error::AlreadyExists(format!(
                    "alias {alias} already exists"
                )));
            }
        }
        let now = self.clock.now();
        let id = KeyId::generate();
        // Token object first: a crash before the metadata commit leaves an orphan object
        // (reported at start-up), never metadata without key material.
        let object = ObjectId::new(id.clone(), 1);
        if origin == KeyOrigin::Hsm {
            self.token.generate_key(&object)?;
        }
        let record = KeyRecord {
            id: id.clone(),
            description: description.to_owned(),
            state: match origin {
                KeyOrigin::Hsm => KeyState::Enabled,
                KeyOrigin::External => KeyState::PendingImport,
            },
            origin,
            material: None,
            created_at: now,
            deletion_date: None,
            versions: vec![VersionRecord {
                version: 1,
                created_at: now,
                wraps_reserved: 0,
                automatic: false,
            }],
            aliases: alias.into_iter().cloned().collect(),
            rotation: None,
            tags,
        };
        // The alias's ticket before the store's row: a row without its ticket names nothing.
        let alias_ticket = alias.map(|alias| Ticket::alias(alias, &id));
        if let Some(ticket) = &alias_ticket {
            self.token.create_ticket(ticket)?;
        }
        if let Err(err) = self.store.create_key(&record, alias) {
            if let Some(ticket) = &alias_ticket {
                if let Err(cleanup) = self.token.destroy_ticket(ticket) {
                    tracing::warn!(key_id = %id, error = %cleanup, "could not remove the alias ticket of a key that failed to commit");
                }
            }
            if origin == KeyOrigin::External {
                return Err(err);
            }
            if let Err(cleanup) = self.token.destroy_key(&object) {
                tracing::warn!(object = %object, error = %cleanup, "could not destroy the object of a key that failed to commit");
            }
            return Err(err);
        }
        if alias.is_some() {
            self.refresh_aliases()?;
        }
        tracing::info!(key_id = %id, "key created");
        self.refresh(&id)?
            .ok_or_else(|| Error::Internal("key vanished after create".into()))
    }

    /// Keys in creation order, one page at a time.
    pub fn list_keys(
        &self,
        page_size_requested: u32,
        page_token: &str,
    ) -> Result<Page<Arc<KeyRecord>>> {
        let limit = page_size(page_size_requested)?;
        let after = decode_page_token("k:", page_token)?;
        let mut rows = self.store.list_keys(&after, limit + 1)?;
        let next_page_token = if rows.len() > limit {
            rows.truncate(limit);
            rows.last()
                .map(|(cursor, _)| encode_page_token("k:", cursor))
                .unwrap_or_default()
        } else {
            String::new()
        };
        let anchors = tickets::Anchors::read(&*self.token)?;
        let items = rows
            .into_iter()
            .map(|(_, k)| Ok(Arc::new(self.anchored(k, Some(&anchors))?)))
            .collect::<Result<_>>()?;
        Ok(Page {
            items,
            next_page_token,
        })
    }

    /// Adds a version; new wraps use it.
    pub fn rotate_key(&self, key: &KeyRef) -> Result<Arc<KeyRecord>> {
        let _admin = self.admin.lock();
        let key = self.resolve(key)?;
        self.usable(&key)?;
        self.add_version(&key, false)
    }

    /// Turns automatic rotation on (every `period_days`, 90 to 2560, the first one
    /// `period_days` from now) or, with `None`, off. The key must be enabled (as in AWS KMS).
    pub fn set_rotation(&self, key: &KeyRef, period_days: Option<u32>) -> Result<Arc<KeyRecord>> {
        let _admin = self.admin.lock();
        let key = self.resolve(key)?;
        self.usable(&key)?;
        if period_days.is_some() {
            refuse_imported_rotation(&key)?;
        }
        let schedule = match period_days {
            Some(days) if ROTATION_PERIOD_DAYS.contains(&days) => Some(RotationSchedule {
                period_days: days,
                next: self.clock.now() + days_of(days),
            }),
            Some(_) => {
                return Err(Error::invalid(format!(
                    "the rotation period must be {} to {} days",
                    ROTATION_PERIOD_DAYS.start(),
                    ROTATION_PERIOD_DAYS.end()
                )));
            }
            None => None,
        };
        self.store.set_rotation(&key.id, schedule.as_ref())?;
        tracing::info!(key_id = %key.id, period_days, "automatic rotation set");
        self.refresh(&key.id)?
            .ok_or_else(|| Error::Internal("key vanished".into()))
    }

    /// Adds tags to a key (replacing the values of tags it has), or with `remove`, removes
    /// the tags named by `tags`' keys. Tag keys are 1 to 128 characters and do not start
    /// with `aws:` (reserved, as in AWS KMS), values at most 256; a key has at most 50 tags.
    pub fn tag_key(
        &self,
        key: &KeyRef,
        tags: &BTreeMap<String, String>,
        remove: bool,
    ) -> Result<Arc<KeyRecord>> {
        let _admin = self.admin.lock();
        let key = self.resolve(key)?;
        if key.state == KeyState::PendingDeletion {
            return Err(Error::WrongState(format!(
                "key {} is pending deletion",
                key.id
            )));
        }
        let updated = checked_tags(&key.tags, tags, remove)?;
        self.store.set_tags(&key.id, &updated)?;
        self.refresh(&key.id)?
            .ok_or_else(|| Error::Internal("key vanished".into()))
    }

    /// Rotates every enabled key whose automatic rotation is due, each after `before`
    /// returns (the audit line; an error there skips the key until the next pass). Disabled
    /// keys wait until they are enabled again. Returns the keys rotated.
    pub fn rotate_due(&self, before: impl Fn(&KeyRecord) -> Result<()>) -> Result<Vec<KeyId>> {
        let Some(_maintenance) = MaintenanceLock::take(&*self.store)? else {
            return Ok(Vec::new()); // another daemon of the fleet is at it
        };
        let now = self.clock.now();
        let due: Vec<Arc<KeyRecord>> = self
            .read_view()
            .keys
            .values()
            .filter(|k| k.state == KeyState::Enabled)
            .filter(|k| k.rotation.is_some_and(|r| r.next <= now))
            .cloned()
            .collect();
        let mut rotated = Vec::new();
        for key in due {
            let _admin = self.admin.lock();
            // Re-read under the lock: another path may have changed it.
            let Some(key) = self.read_view().keys.get(&key.id).cloned() else {
                continue;
            };
            let Some(schedule) = key.rotation.filter(|r| r.next <= now) else {
                continue;
            };
            if key.state != KeyState::Enabled {
                continue;
            }
            before(&key)?;
            self.add_version(&key, true)?;
            // The next one a period after this one (not a burst of catch-up rotations
            // after a long stop).
            let next = RotationSchedule {
                period_days: schedule.period_days,
                next: now + days_of(schedule.period_days),
            };
            self.store.set_rotation(&key.id, Some(&next))?;
            self.refresh(&key.id)?;
            rotated.push(key.id.clone());
        }
        Ok(rotated)
    }

    /// Adds a version to `key` (`automatic`: on its rotation schedule). Caller holds the
    /// admin lock.
    fn add_version(&self, key: &KeyRecord, automatic: bool) -> Result<Arc<KeyRecord>> {
        refuse_imported_rotation(key)?;
        let (version, resumed) = self.claim_next_version(&key.id)?;
        let object = ObjectId::new(key.id.clone(), version);
        // Never destroy an object the metadata cannot prove is an orphan: after a metadata
        // restore, this CKA_ID can be live key material.
        if self.token.contains(&object)? {
            if resumed {
                // This daemon generated it for this very version and never committed it.
                self.adopt(&key.id, version)?;
                return self
                    .refresh(&key.id)?
                    .ok_or_else(|| Error::Internal("key vanished after rotate".into()));
            }
            self.store.end_version(&key.id, version)?;
            return Err(Error::WrongState(format!(
                "the token already holds key material for {object} that the metadata store does not know (restored from an older backup?); nothing was destroyed: restart wrapd to see the reconciliation report"
            )));
        }
        self.token.generate_key(&object)?;
        self.store.add_version(
            &key.id,
            &VersionRecord {
                version,
                created_at: self.clock.now(),
                wraps_reserved: 0,
                automatic,
            },
        )?;
        tracing::info!(key_id = %key.id, version, automatic, "key rotated");
        self.refresh(&key.id)?
            .ok_or_else(|| Error::Internal("key vanished after rotate".into()))
    }

    /// Claims the next version number of a key in the store, where a fleet's races are
    /// decided: the newest version the store knows + 1, waiting while another daemon holds
    /// the claim on it (it is generating that version's object). A claim held for longer
    /// than [`STUCK_CLAIM`] belongs to a daemon that died mid-rotation: the number is
    /// skipped (a gap in the version numbers, never two objects for one version). Returns
    /// the version and whether the claim was this daemon's already.
    fn claim_next_version(&self, id: &KeyId) -> Result<(u32, bool)> {
        let latest = |ks: &Self| -> Result<u32> {
            Ok(ks
                .store
                .key(id)?
                .ok_or_else(|| Error::KeyNotFound(id.to_string()))?
                .current_version())
        };
        let next = |v: u32| {
            v.checked_add(1)
                .ok_or_else(|| Error::LimitReached(format!("key {id} has too many versions")))
        };
        let mut candidate = next(latest(self)?)?;
        let mut waiting_since = std::time::Instant::now();
        loop {
            match self.store.begin_version(id, candidate) {
                Ok(resumed) => return Ok((candidate, resumed)),
                Err(Error::AlreadyExists(_)) => {
                    let newest = latest(self)?;
                    if newest >= candidate {
                        candidate = next(newest)?;
                        waiting_since = std::time::Instant::now();
                    } else if waiting_since.elapsed() > STUCK_CLAIM {
                        tracing::warn!(key_id = %id, version = candidate, "skipping a version claimed by a daemon that never finished it");
                        candidate = next(candidate)?;
                        waiting_since = std::time::Instant::now();
                    } else {
                        std::thread::sleep(Duration::from_millis(5));
                    }
                }
                Err(err) => return Err(err),
            }
        }
    }

    /// Enables a disabled key.
    pub fn enable_key(&self, key: &KeyRef) -> Result<Arc<KeyRecord>> {
        self.set_state(key, KeyState::Enabled)
    }

    /// Disables a key: no data-plane operation until enabled again.
    pub fn disable_key(&self, key: &KeyRef) -> Result<Arc<KeyRecord>> {
        self.set_state(key, KeyState::Disabled)
    }

    fn set_state(&self, key: &KeyRef, state: KeyState) -> Result<Arc<KeyRecord>> {
        let _admin = self.admin.lock();
        let key = self.resolve(key)?;
        if key.state == KeyState::PendingDeletion {
            return Err(Error::WrongState(format!(
                "key {} is pending deletion; cancel the deletion first",
                key.id
            )));
        }
        if key.state == KeyState::PendingImport {
            return Err(Error::WrongState(format!(
                "key {} is pending import; import its key material first",
                key.id
            )));
        }
        // Disabling: the hold first, so that the key is disabled whatever the store says
        // afterwards. Enabling: the store first, so that a failure leaves it disabled.
        let hold = Ticket::Hold {
            key_id: key.id.clone(),
        };
        if state == KeyState::Enabled {
            self.store.set_state(&key.id, state, None)?;
            self.token.destroy_ticket(&hold)?;
        } else {
            let held = self.token.has_ticket(&hold)?;
            self.token.create_ticket(&hold)?;
            if let Err(err) = self.store.set_state(&key.id, state, None) {
                if !held {
                    if let Err(cleanup) = self.token.destroy_ticket(&hold) {
                        tracing::warn!(key_id = %key.id, error = %cleanup, "could not remove the hold of a DisableKey that was not recorded");
                    }
                }
                return Err(err);
            }
        }
        tracing::info!(key_id = %key.id, state = state.as_str(), "key state changed");
        self.refresh(&key.id)?
            .ok_or_else(|| Error::Internal("key vanished after state change".into()))
    }

    /// Schedules the destruction of every version after `days` (7..=30; 0 means 30).
    pub fn schedule_deletion(&self, key: &KeyRef, days: u32) -> Result<Arc<KeyRecord>> {
        let days = if days == 0 { 30 } else { days };
        if !(7..=30).contains(&days) {
            return Err(Error::invalid(
                "pending_window_days must be between 7 and 30",
            ));
        }
        // Under the fleet's maintenance lock, like the purge and imports: a purge never
        // sees the token and the store half-changed by another daemon.
        let _fleet = MaintenanceLock::wait(&*self.store, MAINTENANCE_LOCK_WAIT)?;
        let _admin = self.admin.lock();
        let key = self.resolve(key)?;
        if key.state == KeyState::PendingDeletion {
            return Err(Error::WrongState(format!(
                "key {} is already pending deletion",
                key.id
            )));
        }
        let when = self.clock.now() + Duration::from_secs(u64::from(days) * 86_400);
        // The token first: a deletion the token does not record is never carried out.
        let ticket = Ticket::Deletion {
            key_id: key.id.clone(),
            due: tickets::unix_seconds(when),
        };
        // And a hold: a store writer who cancels the deletion does not make the key usable.
        let hold = Ticket::Hold {
            key_id: key.id.clone(),
        };
        let held = self.token.has_ticket(&hold)?;
        self.token.create_ticket(&hold)?;
        self.token.create_ticket(&ticket)?;
        if let Err(err) = self
            .store
            .set_state(&key.id, KeyState::PendingDeletion, Some(when))
        {
            let made = std::iter::once(&ticket).chain((!held).then_some(&hold));
            for made in made {
                if let Err(cleanup) = self.token.destroy_ticket(made) {
                    tracing::warn!(key_id = %key.id, error = %cleanup, "could not remove a ticket of a deletion that was not recorded");
                }
            }
            return Err(err);
        }
        tracing::warn!(key_id = %key.id, days, "key deletion scheduled");
        self.refresh(&key.id)?
            .ok_or_else(|| Error::Internal("key vanished after scheduling deletion".into()))
    }

    /// Cancels a scheduled deletion; the key comes back disabled (or, without its imported
    /// material, pending import), as in AWS KMS.
    pub fn cancel_deletion(&self, key: &KeyRef) -> Result<Arc<KeyRecord>> {
        let _fleet = MaintenanceLock::wait(&*self.store, MAINTENANCE_LOCK_WAIT)?;
        let _admin = self.admin.lock();
        let key = self.resolve(key)?;
        if key.state != KeyState::PendingDeletion {
            return Err(Error::WrongState(format!(
                "key {} is not pending deletion",
                key.id
            )));
        }
        // An imported key whose material expired or was deleted meanwhile comes back
        // pending import.
        let state = if key.has_material() {
            KeyState::Disabled
        } else {
            KeyState::PendingImport
        };
        // The tickets first: once they are gone, no daemon destroys the key, whatever the
        // store says.
        self.destroy_tickets(&key.id, Some(tickets::Kind::Deletion), |_| false)?;
        self.store.set_state(&key.id, state, None)?;
        tracing::info!(key_id = %key.id, state = state.as_str(), "key deletion cancelled");
        self.refresh(&key.id)?
            .ok_or_else(|| Error::Internal("key vanished after cancelling deletion".into()))
    }

    /// Destroys the keys whose deletion is due, by the token's deletion ticket *and* the
    /// metadata store (see `tickets.rs`): token objects first, then the metadata. Safe to
    /// repeat after a crash (destroying a missing object is no error). `before_destroy` runs
    /// for each key before anything of it is destroyed (the daemon writes the key's audit
    /// line there); if it fails, the key is left alone.
    pub fn purge_due(
        &self,
        before_destroy: impl Fn(&KeyRecord) -> Result<()>,
    ) -> Result<Vec<KeyId>> {
        let Some(_maintenance) = MaintenanceLock::take(&*self.store)? else {
            return Ok(Vec::new()); // another daemon of the fleet is at it
        };
        let now = self.clock.now();
        let seconds = tickets::unix_seconds(now);
        let tickets = self.token.tickets()?;
        // What the store calls due and the token does not: an edited or restored store.
        for id in self.store.keys_due_for_deletion(now)? {
            if !tickets::is_due(&tickets, tickets::Kind::Deletion, &id, seconds) {
                tracing::warn!(key_id = %id, "the metadata store shows this key due for deletion, but the token records no such deletion (an edited or restored store?): nothing destroyed");
            }
        }
        // A deletion ticket whose key the store does not show pending is left by a
        // scheduling that failed half-way (they run under this lock, so none is under
        // way): dropped, so that no later store edit can bring it into force.
        for id in tickets::due_keys(&tickets, tickets::Kind::Deletion, u64::MAX) {
            let _admin = self.admin.lock();
            if let Some(key) = self.store.key(&id)? {
                if key.state != KeyState::PendingDeletion {
                    tracing::warn!(key_id = %id, "a deletion recorded in the token for a key that is not pending deletion: the record dropped, nothing destroyed");
                    self.destroy_tickets(&id, Some(tickets::Kind::Deletion), |_| false)?;
                }
            }
        }
        let tickets = self.token.tickets()?;
        let mut purged = Vec::new();
        for id in tickets::due_keys(&tickets, tickets::Kind::Deletion, seconds) {
            let _admin = self.admin.lock();
            let Some(key) = self.store.key(&id)? else {
                // Not in this store (a purge that stopped after deleting the row, or another
                // store on the same token): nothing to destroy here.
                continue;
            };
            if key.state != KeyState::PendingDeletion || key.deletion_date.is_none_or(|d| d > now) {
                // The store does not show it due: the deletion is given up (a store writer
                // can hold a deletion back, never cause one).
                tracing::warn!(key_id = %id, state = key.state.as_str(), "a deletion recorded in the token that the metadata store does not show due; nothing destroyed, the record dropped");
                self.destroy_tickets(&id, Some(tickets::Kind::Deletion), |_| false)?;
                continue;
            }
            before_destroy(&key)?;
            for v in &key.versions {
                let object = ObjectId::new(id.clone(), v.version);
                self.token.destroy_key(&object)?;
                for mark in self.token.wrap_marks(&object)? {
                    self.token.destroy_wrap_mark(&object, mark)?;
                }
            }
            self.store.delete_key(&id, now)?;
            self.destroy_tickets(&id, None, |_| false)?;
            self.refresh(&id)?;
            self.refresh_aliases()?;
            self.counters.lock().retain(|object, _| object.key_id != id);
            tracing::warn!(key_id = %id, versions = key.versions.len(), "key destroyed");
            purged.push(id);
        }
        Ok(purged)
    }

    /// Creates an alias for a key.
    pub fn create_alias(&self, alias: &AliasName, key: &KeyRef) -> Result<(AliasName, KeyId)> {
        let _admin = self.admin.lock();
        let key = self.resolve(key)?;
        // The ticket before the row: a row without its ticket names nothing.
        self.make_alias_ticket(alias, &key.id, |store| store.create_alias(alias, &key.id))?;
        self.refresh_aliases()?;
        self.refresh(&key.id)?;
        Ok((alias.clone(), key.id.clone()))
    }

    /// Points an existing alias at another key.
    pub fn update_alias(&self, alias: &AliasName, key: &KeyRef) -> Result<(AliasName, KeyId)> {
        let _admin = self.admin.lock();
        let key = self.resolve(key)?;
        // The row's own target, not the view's: the view leaves out a row without its ticket.
        let old = self.store.alias(alias)?;
        self.make_alias_ticket(alias, &key.id, |store| store.update_alias(alias, &key.id))?;
        if let Some(old) = old.as_ref().filter(|old| **old != key.id) {
            // The former target's ticket goes, so that no store edit can point the alias back.
            self.token.destroy_ticket(&Ticket::alias(alias, old))?;
        }
        self.refresh_aliases()?;
        if let Some(old) = old {
            self.refresh(&old)?;
        }
        self.refresh(&key.id)?;
        Ok((alias.clone(), key.id.clone()))
    }

    /// Deletes an alias, returning the key it pointed at.
    pub fn delete_alias(&self, alias: &AliasName) -> Result<(AliasName, KeyId)> {
        let _admin = self.admin.lock();
        // The ticket first: once it is gone, the alias names nothing, whatever the store says.
        if let Some(current) = self.store.alias(alias)? {
            self.token.destroy_ticket(&Ticket::alias(alias, &current))?;
        }
        let key = self
            .store
            .delete_alias(alias)?
            .ok_or_else(|| Error::AliasNotFound(alias.to_string()))?;
        self.token.destroy_ticket(&Ticket::alias(alias, &key))?;
        self.refresh_aliases()?;
        self.refresh(&key)?;
        Ok((alias.clone(), key))
    }

    /// Records the ticket that lets `alias` name `id`, then runs `write` on the store; if the
    /// store refuses, a ticket made here is removed again.
    fn make_alias_ticket(
        &self,
        alias: &AliasName,
        id: &KeyId,
        write: impl FnOnce(&dyn MetadataStore) -> Result<()>,
    ) -> Result<()> {
        let ticket = Ticket::alias(alias, id);
        let had = self.token.has_ticket(&ticket)?;
        self.token.create_ticket(&ticket)?;
        if let Err(err) = write(&*self.store) {
            if !had {
                if let Err(cleanup) = self.token.destroy_ticket(&ticket) {
                    tracing::warn!(alias = %alias, error = %cleanup, "could not remove the ticket of an alias change that was not recorded");
                }
            }
            return Err(err);
        }
        Ok(())
    }

    /// Aliases sorted by name, optionally only those of one key.
    pub fn list_aliases(
        &self,
        key: Option<&KeyRef>,
        page_size_requested: u32,
        page_token: &str,
    ) -> Result<Page<(AliasName, KeyId)>> {
        let limit = page_size(page_size_requested)?;
        let after = decode_page_token("a:", page_token)?;
        let key = key.map(|k| self.resolve(k)).transpose()?;
        let mut rows = self
            .store
            .list_aliases(key.as_ref().map(|k| &k.id), &after, limit + 1)?;
        let next_page_token = if rows.len() > limit {
            rows.truncate(limit);
            rows.last()
                .map(|(alias, _)| encode_page_token("a:", &Cursor(alias.as_str().to_owned())))
                .unwrap_or_default()
        } else {
            String::new()
        };
        let anchors = tickets::Anchors::read(&*self.token)?;
        Ok(Page {
            items: self.anchored_aliases(rows, Some(&anchors))?,
            next_page_token,
        })
    }

    // ---- data plane ----------------------------------------------------------------------

    /// Generates a data key of `len` bytes (0 means 32) in the token and wraps it.
    pub fn generate_data_key(
        &self,
        key: &KeyRef,
        len: u32,
        context: &EncryptionContext,
    ) -> Result<GeneratedKey> {
        let len = match len {
            0 => DEFAULT_DATA_KEY_LEN,
            n if n <= MAX_DATA_KEY_LEN => n,
            _ => {
                return Err(Error::invalid(format!(
                    "number_of_bytes must be between 1 and {MAX_DATA_KEY_LEN}"
                )));
            }
        };
        let (key, version) = self.wrapping_version(key)?;
        let aad = Blob::aad(&key.id, version, &context.serialize());
        let (plaintext, sealed) = self.token.generate_and_encrypt(
            &ObjectId::new(key.id.clone(), version),
            len as usize,
            &aad,
        )?;
        let blob = Blob {
            key_id: key.id.clone(),
            key_version: version,
            iv: sealed.iv,
            ciphertext: sealed.ciphertext,
        };
        Ok(GeneratedKey {
            plaintext,
            wrapped: Wrapped {
                blob: blob.encode(),
                key_id: key.id.clone(),
                key_version: version,
            },
        })
    }

    /// Wraps caller-supplied plaintext (1..=4096 bytes).
    pub fn wrap(
        &self,
        key: &KeyRef,
        plaintext: &[u8],
        context: &EncryptionContext,
    ) -> Result<Wrapped> {
        if plaintext.is_empty() || plaintext.len() > MAX_PLAINTEXT_LEN {
            return Err(Error::invalid(format!(
                "plaintext must be 1 to {MAX_PLAINTEXT_LEN} bytes"
            )));
        }
        let (key, version) = self.wrapping_version(key)?;
        self.seal(&key.id, version, plaintext, context)
    }

    fn seal(
        &self,
        key_id: &KeyId,
        version: u32,
        plaintext: &[u8],
        context: &EncryptionContext,
    ) -> Result<Wrapped> {
        let aad = Blob::aad(key_id, version, &context.serialize());
        let sealed =
            self.token
                .encrypt(&ObjectId::new(key_id.clone(), version), plaintext, &aad)?;
        let blob = Blob {
            key_id: key_id.clone(),
            key_version: version,
            iv: sealed.iv,
            ciphertext: sealed.ciphertext,
        };
        Ok(Wrapped {
            blob: blob.encode(),
            key_id: key_id.clone(),
            key_version: version,
        })
    }

    /// Resolves a key for a new wrap, counts the wrap against its newest version and rotates
    /// the key first when that version has reached its wrap limit.
    fn wrapping_version(&self, key: &KeyRef) -> Result<(Arc<KeyRecord>, u32)> {
        self.check_fresh()?;
        for _ in 0..3 {
            let record = self.resolve(key)?;
            self.usable(&record)?;
            let version = record.current_version();
            if self.count_wrap(&record, version)? {
                return Ok((record, version));
            }
            if record.origin == KeyOrigin::External {
                return Err(Error::LimitReached(format!(
                    "key {} has made as many wraps as one key version may; its material is imported, so it cannot rotate: import into a new key",
                    record.id
                )));
            }
            let _admin = self.admin.lock();
            // Another caller may have rotated while we waited for the lock.
            let current = self.resolve(&KeyRef::Id(record.id.clone()))?;
            if current.current_version() == version {
                tracing::info!(key_id = %record.id, version, "wrap limit reached: rotating automatically");
                self.add_version(&current, true)?;
            }
        }
        Err(Error::Unavailable("the key is being rotated; retry".into()))
    }

    /// Counts one wrap with `version`; false when the version has reached its limit.
    fn count_wrap(&self, key: &KeyRecord, version: u32) -> Result<bool> {
        let object = ObjectId::new(key.id.clone(), version);
        let mut counters = self.counters.lock();
        let counter = counters.entry(object).or_insert_with(|| {
            // After a restart, count from the persisted reservation: it may over-count the
            // wraps done before, never under-count them.
            let reserved = key
                .versions
                .iter()
                .find(|v| v.version == version)
                .map_or(0, |v| v.wraps_reserved);
            WrapCounter {
                used: reserved,
                reserved,
                mark: None,
            }
        });
        if counter.used >= self.config.max_wraps_per_version {
            return Ok(false);
        }
        if counter.used >= counter.reserved {
            // A block of its own: in a fleet, the other daemons' blocks lie elsewhere.
            let total = self.claim_wrap_block(&object_of(key, version), counter)?;
            counter.used = total.saturating_sub(WRAP_RESERVATION_BLOCK);
            counter.reserved = total;
            if counter.used >= self.config.max_wraps_per_version {
                return Ok(false);
            }
        }
        counter.used += 1;
        Ok(true)
    }

    /// Claims the next block of [`WRAP_RESERVATION_BLOCK`] wraps of a key version; returns
    /// the count the block ends at. The store's count is checked against the highest count
    /// recorded in the token (a wrap mark) and against this process's own last block: a
    /// store rolled back to fewer wraps (an edit, a restored backup) is moved past both
    /// before any wrap is made, so the random-IV bound per version holds whatever the store
    /// says. Marks are recorded ahead of use, [`WRAP_MARK_AHEAD`] at a time, so the token is
    /// asked (and written, under its exclusive lock) once per many blocks, not per block.
    fn claim_wrap_block(&self, object: &ObjectId, counter: &mut WrapCounter) -> Result<u64> {
        let (id, version) = (&object.key_id, object.version);
        let mut total = self
            .store
            .claim_wraps(id, version, WRAP_RESERVATION_BLOCK)?;
        let start = total.saturating_sub(WRAP_RESERVATION_BLOCK);
        // Other daemons' claims only move the count forward: below our own last block, the
        // store went back.
        let went_back = start < counter.reserved;
        if !went_back && counter.mark.is_some_and(|mark| total <= mark) {
            return Ok(total);
        }
        let marks = self.token.wrap_marks(object)?;
        let floor = marks
            .iter()
            .copied()
            .max()
            .unwrap_or(0)
            .max(counter.reserved);
        if start < floor {
            tracing::error!(key_id = %id, version, store = start, recorded = floor, "the metadata store counts fewer wraps than were made (an edited or restored store?): counting on from the record");
            total = self.store.claim_wraps(id, version, floor - start)?;
        }
        let mark = marks.iter().copied().max().unwrap_or(0);
        if total > mark {
            let ahead = total + WRAP_MARK_AHEAD;
            self.token.record_wrap_mark(object, ahead)?;
            for older in marks {
                if let Err(err) = self.token.destroy_wrap_mark(object, older) {
                    tracing::debug!(error = %err, "an older wrap mark stays (the highest counts)");
                }
            }
            counter.mark = Some(ahead);
        } else {
            counter.mark = Some(mark);
        }
        Ok(total)
    }

    /// Wraps used so far with a version in this process's view (for DescribeKey).
    pub fn wrap_count(&self, key: &KeyRecord, version: &VersionRecord) -> u64 {
        self.counters
            .lock()
            .get(&ObjectId::new(key.id.clone(), version.version))
            .map_or(version.wraps_reserved, |c| c.used)
    }

    /// Unwraps a blob. Every failure to authenticate is [`Error::InvalidCiphertext`]; `expected`
    /// (if given) must name the key the blob is wrapped under.
    pub fn unwrap(
        &self,
        blob: &[u8],
        context: &EncryptionContext,
        expected: Option<&KeyRef>,
    ) -> Result<Unwrapped> {
        let blob = Blob::parse(blob)?;
        self.check_fresh()?;
        if let Some(expected) = expected {
            if self.resolve(expected)?.id != blob.key_id {
                return Err(Error::IncorrectKey);
            }
        }
        // A blob naming an unknown (or destroyed) key, or a version the key never had, is
        // an invalid ciphertext like any other tampering. In a fleet, another daemon may
        // have made the key or version a moment ago: the store is asked once first.
        let known = |key: &KeyRecord| key.versions.iter().any(|v| v.version == blob.key_version);
        let mut key = self.read_view().keys.get(&blob.key_id).cloned();
        if !key.as_deref().is_some_and(known) {
            key = self.read_through(&blob.key_id)?.or(key);
        }
        let key = key.ok_or(Error::InvalidCiphertext)?;
        self.usable(&key)?;
        if !known(&key) {
            return Err(Error::InvalidCiphertext);
        }
        let aad = Blob::aad(&blob.key_id, blob.key_version, &context.serialize());
        let decrypted = self.token.decrypt(
            &ObjectId::new(blob.key_id.clone(), blob.key_version),
            &blob.iv,
            &blob.ciphertext,
            &aad,
        );
        let plaintext = match decrypted {
            // In a fleet, the object may be gone because another daemon just carried out
            // the key's scheduled deletion: the shared metadata says so.
            Err(err) if self.store.is_shared() && err.kind() == ErrorKind::Unavailable => {
                match self.refresh(&blob.key_id)? {
                    None => return Err(Error::InvalidCiphertext),
                    Some(key) => {
                        self.usable(&key)?;
                        return Err(err);
                    }
                }
            }
            other => other?,
        };
        Ok(Unwrapped {
            plaintext,
            key_id: blob.key_id,
            key_version: blob.key_version,
        })
    }

    /// Unwraps and wraps again under the newest version of `destination` (or of the source
    /// key when `None`). The plaintext stays in this function and is zeroized.
    pub fn rewrap(
        &self,
        blob: &[u8],
        source_context: &EncryptionContext,
        destination: Option<&KeyRef>,
        destination_context: &EncryptionContext,
    ) -> Result<Rewrapped> {
        let source = self.unwrap(blob, source_context, None)?;
        let destination = match destination {
            Some(key) => key.clone(),
            None => KeyRef::Id(source.key_id.clone()),
        };
        let (key, version) = self.wrapping_version(&destination)?;
        let wrapped = self.seal(&key.id, version, &source.plaintext, destination_context)?;
        Ok(Rewrapped {
            wrapped,
            source_key_id: source.key_id.clone(),
            source_key_version: source.key_version,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::hsm::memory::MemoryToken;

    fn keystore(max_wraps: u64) -> (Keystore, Arc<MemoryToken>) {
        let token = Arc::new(MemoryToken::default());
        let keystore = Keystore::open(
            token.clone(),
            Arc::new(SqliteStore::in_memory().unwrap()),
            Arc::new(SystemClock),
            KeystoreConfig {
                max_wraps_per_version: max_wraps,
                ..Default::default()
            },
        )
        .unwrap();
        (keystore, token)
    }

    fn ctx(value: &str) -> EncryptionContext {
        EncryptionContext::from_entries([("tenant".to_owned(), value.to_owned())]).unwrap()
    }

    #[test]
    fn automatic_rotation_adds_a_version_when_due_and_schedules_the_next() {
        let token = Arc::new(MemoryToken::default());
        // Whole milliseconds: the store keeps that much.
        let start = std::time::UNIX_EPOCH + Duration::from_millis(1_800_000_000_000);
        let clock = Arc::new(ManualClock::new(start));
        let ks = Keystore::open(
            token,
            Arc::new(SqliteStore::in_memory().unwrap()),
            clock.clone(),
            KeystoreConfig::default(),
        )
        .unwrap();
        let key = KeyRef::Id(ks.create_key("", None).unwrap().id.clone());
        assert_eq!(
            ks.set_rotation(&key, Some(89)).unwrap_err().kind(),
            ErrorKind::InvalidArgument
        );
        let scheduled = ks.set_rotation(&key, Some(90)).unwrap();
        assert_eq!(scheduled.rotation.unwrap().next, start + days_of(90));
        let audited = std::sync::atomic::AtomicUsize::new(0);
        let count = |_: &KeyRecord| {
            audited.fetch_add(1, std::sync::atomic::Ordering::SeqCst);
            Ok(())
        };

        clock.advance(days_of(89));
        assert!(ks.rotate_due(count).unwrap().is_empty(), "not due yet");
        clock.advance(days_of(2));
        assert_eq!(ks.rotate_due(count).unwrap().len(), 1);
        let rotated = ks.resolve(&key).unwrap();
        assert_eq!(rotated.current_version(), 2);
        assert!(rotated.versions[1].automatic);
        assert_eq!(rotated.rotation.unwrap().next, clock.now() + days_of(90));
        assert!(ks.rotate_due(count).unwrap().is_empty(), "once per period");
        assert_eq!(
            audited.load(std::sync::atomic::Ordering::SeqCst),
            1,
            "each rotation audited first"
        );

        // A disabled key waits; turned off, nothing rotates.
        ks.disable_key(&key).unwrap();
        clock.advance(days_of(91));
        assert!(ks.rotate_due(count).unwrap().is_empty());
        ks.enable_key(&key).unwrap();
        ks.set_rotation(&key, None).unwrap();
        clock.advance(days_of(400));
        assert!(ks.rotate_due(count).unwrap().is_empty());
        assert_eq!(ks.resolve(&key).unwrap().current_version(), 2);
    }

    #[test]
    fn tags_are_added_replaced_and_removed() {
        let (ks, _) = keystore(1 << 30);
        let key = KeyRef::Id(ks.create_key("", None).unwrap().id.clone());
        let tags = |pairs: &[(&str, &str)]| -> BTreeMap<String, String> {
            pairs
                .iter()
                .map(|(k, v)| (k.to_string(), v.to_string()))
                .collect()
        };
        ks.tag_key(&key, &tags(&[("team", "a"), ("env", "dev")]), false)
            .unwrap();
        ks.tag_key(&key, &tags(&[("env", "prod")]), false).unwrap();
        let tagged = ks.tag_key(&key, &tags(&[("team", "")]), true).unwrap();
        assert_eq!(tagged.tags, tags(&[("env", "prod")]));
        assert_eq!(
            ks.tag_key(&key, &tags(&[("aws:reserved", "x")]), false)
                .unwrap_err()
                .kind(),
            ErrorKind::InvalidArgument
        );
    }

    #[test]
    fn rotation_keeps_every_version_unwrapping() {
        let (ks, _) = keystore(1 << 30);
        let key = KeyRef::Id(ks.create_key("", None).unwrap().id.clone());
        let old = ks.wrap(&key, b"v1", &ctx("a")).unwrap();
        ks.rotate_key(&key).unwrap();
        let new = ks.wrap(&key, b"v2", &ctx("a")).unwrap();
        assert_eq!((old.key_version, new.key_version), (1, 2));
        assert_eq!(
            &*ks.unwrap(&old.blob, &ctx("a"), None).unwrap().plaintext,
            b"v1"
        );
        assert_eq!(
            &*ks.unwrap(&new.blob, &ctx("a"), None).unwrap().plaintext,
            b"v2"
        );
        assert!(matches!(
            ks.unwrap(&old.blob, &ctx("b"), None),
            Err(Error::InvalidCiphertext)
        ));
    }

    #[test]
    fn a_disabled_key_is_refused_as_disabled_by_the_data_plane() {
        let (ks, _) = keystore(1 << 30);
        let key = KeyRef::Id(ks.create_key("", None).unwrap().id.clone());
        let blob = ks.wrap(&key, b"x", &ctx("a")).unwrap().blob;
        ks.disable_key(&key).unwrap();
        assert!(matches!(
            ks.wrap(&key, b"x", &ctx("a")),
            Err(Error::Disabled(_))
        ));
        assert!(matches!(
            ks.unwrap(&blob, &ctx("a"), None),
            Err(Error::Disabled(_))
        ));
        ks.schedule_deletion(&key, 7).unwrap();
        assert!(matches!(ks.enable_key(&key), Err(Error::WrongState(_))));
        ks.cancel_deletion(&key).unwrap();
        ks.enable_key(&key).unwrap();
        ks.unwrap(&blob, &ctx("a"), None).unwrap();
    }

    #[test]
    fn the_wrap_limit_rotates_before_it_is_passed() {
        let (ks, _) = keystore(2);
        let key = KeyRef::Id(ks.create_key("", None).unwrap().id.clone());
        let versions: Vec<u32> = (0..5)
            .map(|_| ks.wrap(&key, b"x", &ctx("a")).unwrap().key_version)
            .collect();
        assert_eq!(versions, [1, 1, 2, 2, 3]);
    }

    #[test]
    fn rotation_never_replaces_key_material_the_metadata_does_not_know() {
        let (ks, token) = keystore(1 << 30);
        let record = ks.create_key("", None).unwrap();
        let key = KeyRef::Id(record.id.clone());
        // Key material for version 2 that no metadata records (a restored backup).
        token
            .generate_key(&ObjectId::new(record.id.clone(), 2))
            .unwrap();
        assert!(matches!(ks.rotate_key(&key), Err(Error::WrongState(_))));
        assert!(
            token
                .contains(&ObjectId::new(record.id.clone(), 2))
                .unwrap()
        );
    }

    #[test]
    fn a_due_key_is_destroyed_only_after_its_hook_succeeds() {
        let token = Arc::new(MemoryToken::default());
        let clock = Arc::new(ManualClock::new(SystemTime::now()));
        let ks = Keystore::open(
            token.clone(),
            Arc::new(SqliteStore::in_memory().unwrap()),
            clock.clone(),
            KeystoreConfig::default(),
        )
        .unwrap();
        let id = ks.create_key("", None).unwrap().id.clone();
        ks.schedule_deletion(&KeyRef::Id(id.clone()), 7).unwrap();
        clock.advance(Duration::from_secs(8 * 86_400));
        let object = ObjectId::new(id.clone(), 1);
        let refused = ks.purge_due(|_| Err(Error::Unavailable("audit log down".into())));
        assert!(refused.is_err());
        assert!(
            token.contains(&object).unwrap(),
            "nothing destroyed unaudited"
        );
        let seen = Mutex::new(Vec::new());
        let purged = ks
            .purge_due(|key| {
                assert!(token.contains(&object).unwrap(), "the hook runs first");
                seen.lock().push(key.id.clone());
                Ok(())
            })
            .unwrap();
        assert_eq!(purged, vec![id.clone()]);
        assert_eq!(*seen.lock(), vec![id]);
        assert!(!token.contains(&object).unwrap());
    }

    /// A key store on a memory token and an in-memory SQLite store, the store kept as a
    /// "writer" that edits rows behind the key store's back, and a manual clock.
    fn with_writer() -> (
        Keystore,
        Arc<MemoryToken>,
        Arc<SqliteStore>,
        Arc<ManualClock>,
    ) {
        let token = Arc::new(MemoryToken::default());
        let store = Arc::new(SqliteStore::in_memory().unwrap());
        let clock = Arc::new(ManualClock::new(SystemTime::now()));
        let ks = Keystore::open(
            token.clone(),
            store.clone(),
            clock.clone(),
            KeystoreConfig::default(),
        )
        .unwrap();
        (ks, token, store, clock)
    }

    #[test]
    fn a_deletion_written_only_in_the_store_destroys_nothing() {
        let (ks, token, store, clock) = with_writer();
        let id = ks.create_key("", None).unwrap().id.clone();
        store
            .set_state(&id, KeyState::PendingDeletion, Some(clock.now()))
            .unwrap();
        clock.advance(Duration::from_secs(31 * 86_400));
        let purged = ks.purge_due(|_| panic!("nothing is due")).unwrap();
        assert!(purged.is_empty());
        assert!(token.contains(&ObjectId::new(id, 1)).unwrap());
    }

    #[test]
    fn a_deletion_date_moved_earlier_in_the_store_waits_for_the_scheduled_one() {
        let (ks, token, store, clock) = with_writer();
        let id = ks.create_key("", None).unwrap().id.clone();
        ks.schedule_deletion(&KeyRef::Id(id.clone()), 30).unwrap();
        store
            .set_state(&id, KeyState::PendingDeletion, Some(clock.now()))
            .unwrap();
        clock.advance(Duration::from_secs(8 * 86_400));
        assert!(ks.purge_due(|_| Ok(())).unwrap().is_empty());
        assert!(token.contains(&ObjectId::new(id.clone(), 1)).unwrap());
        clock.advance(Duration::from_secs(23 * 86_400));
        assert_eq!(ks.purge_due(|_| Ok(())).unwrap(), vec![id.clone()]);
        assert!(!token.contains(&ObjectId::new(id, 1)).unwrap());
    }

    #[test]
    fn a_cancelled_deletion_replayed_into_the_store_destroys_nothing() {
        let (ks, token, store, clock) = with_writer();
        let id = ks.create_key("", None).unwrap().id.clone();
        let scheduled = ks.schedule_deletion(&KeyRef::Id(id.clone()), 7).unwrap();
        ks.cancel_deletion(&KeyRef::Id(id.clone())).unwrap();
        // A backup taken while the deletion was pending, restored.
        store
            .set_state(&id, KeyState::PendingDeletion, scheduled.deletion_date)
            .unwrap();
        clock.advance(Duration::from_secs(8 * 86_400));
        assert!(ks.purge_due(|_| Ok(())).unwrap().is_empty());
        assert!(token.contains(&ObjectId::new(id, 1)).unwrap());
    }

    #[test]
    fn a_scheduled_deletion_is_carried_out_by_a_restarted_keystore() {
        let (ks, token, store, clock) = with_writer();
        let id = ks.create_key("", None).unwrap().id.clone();
        ks.schedule_deletion(&KeyRef::Id(id.clone()), 7).unwrap();
        drop(ks);
        let reopened = Keystore::open(
            token.clone(),
            store,
            clock.clone(),
            KeystoreConfig::default(),
        )
        .unwrap();
        clock.advance(Duration::from_secs(8 * 86_400));
        assert_eq!(reopened.purge_due(|_| Ok(())).unwrap(), vec![id.clone()]);
        assert!(!token.contains(&ObjectId::new(id, 1)).unwrap());
    }

    #[test]
    fn deletions_pending_before_the_upgrade_wait_seven_days_after_it() {
        // A store written by a release without tickets: a deletion already due in it.
        let token = Arc::new(MemoryToken::default());
        let store = Arc::new(SqliteStore::in_memory().unwrap());
        let clock = Arc::new(ManualClock::new(SystemTime::now()));
        let old = Keystore::open(
            token.clone(),
            store.clone(),
            clock.clone(),
            KeystoreConfig::default(),
        )
        .unwrap();
        let id = old.create_key("", None).unwrap().id.clone();
        drop(old);
        let fresh_token = Arc::new(MemoryToken::default());
        for object in token.list_keys().unwrap() {
            fresh_token.generate_key(&object).unwrap();
        }
        store
            .set_state(&id, KeyState::PendingDeletion, Some(clock.now()))
            .unwrap();
        let upgraded = Keystore::open(
            fresh_token.clone(),
            store.clone(),
            clock.clone(),
            KeystoreConfig::default(),
        )
        .unwrap();
        assert!(upgraded.purge_due(|_| Ok(())).unwrap().is_empty());
        clock.advance(tickets::ADOPTION_FLOOR);
        assert_eq!(upgraded.purge_due(|_| Ok(())).unwrap(), vec![id]);
        // Adopted once: a deletion written in the store later is not.
        let later = upgraded.create_key("", None).unwrap().id.clone();
        store
            .set_state(&later, KeyState::PendingDeletion, Some(clock.now()))
            .unwrap();
        drop(upgraded);
        let again = Keystore::open(
            fresh_token.clone(),
            store,
            clock.clone(),
            KeystoreConfig::default(),
        )
        .unwrap();
        clock.advance(tickets::ADOPTION_FLOOR * 2);
        assert!(again.purge_due(|_| Ok(())).unwrap().is_empty());
        assert!(fresh_token.contains(&ObjectId::new(later, 1)).unwrap());
    }

    #[test]
    fn a_wrap_count_rolled_back_in_the_store_is_counted_on_from_the_token() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("meta.db");
        let token = Arc::new(MemoryToken::default());
        let open = || {
            Keystore::open(
                token.clone(),
                Arc::new(SqliteStore::open(&path).unwrap()),
                Arc::new(SystemClock),
                KeystoreConfig::default(),
            )
            .unwrap()
        };
        let ks = open();
        let key = ks.create_key("", None).unwrap();
        let object = ObjectId::new(key.id.clone(), 1);
        ks.wrap(&KeyRef::Id(key.id.clone()), b"dek", &ctx("a"))
            .unwrap();
        let first_mark = WRAP_RESERVATION_BLOCK + WRAP_MARK_AHEAD;
        assert_eq!(token.wrap_marks(&object).unwrap(), vec![first_mark]);
        drop(ks);
        // The store is rolled back to no wraps at all (a restored backup, an edit).
        rusqlite::Connection::open(&path)
            .unwrap()
            .execute("UPDATE key_versions SET wraps_reserved = 0", [])
            .unwrap();
        let ks = open();
        ks.wrap(&KeyRef::Id(key.id.clone()), b"dek", &ctx("a"))
            .unwrap();
        // The block claimed starts where the token's record ended, not at 0.
        let stored = SqliteStore::open(&path)
            .unwrap()
            .key(&key.id)
            .unwrap()
            .unwrap();
        let reserved = stored.versions[0].wraps_reserved;
        assert_eq!(reserved, first_mark + WRAP_RESERVATION_BLOCK);
        assert_eq!(
            token.wrap_marks(&object).unwrap(),
            vec![reserved + WRAP_MARK_AHEAD]
        );
    }

    #[test]
    fn unknown_names_are_typed_not_found() {
        let (ks, _) = keystore(1 << 30);
        assert!(matches!(
            ks.resolve(&KeyRef::parse("alias/none").unwrap()),
            Err(Error::AliasNotFound(_))
        ));
        assert!(matches!(
            ks.resolve(&KeyRef::Id(KeyId::generate())),
            Err(Error::KeyNotFound(_))
        ));
    }
}
