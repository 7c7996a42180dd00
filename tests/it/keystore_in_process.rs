//! The key store in-process on a real SoftHSM token, with an injectable clock: scheduled
//! deletion of keys and of key versions, reconciliation with the token, and the per-version
//! wrap limit.

use std::sync::{Arc, OnceLock};
use std::time::{Duration, SystemTime};

use tempfile::TempDir;
use wrapd::Error;
use wrapd::config::Config;
use wrapd::context::EncryptionContext;
use wrapd::hsm::{ObjectId, Pkcs11Token, Token};
use wrapd::ids::{AliasName, KeyId, KeyRef};
use wrapd::keystore::{Clock, Keystore, KeystoreConfig, ManualClock, SqliteStore};

const DAY: Duration = Duration::from_secs(86_400);

/// What a test needs to open a PKCS#11 session of its own on the in-process token.
pub(crate) struct TokenAccess {
    pub module: std::path::PathBuf,
    pub label: String,
    pub pin: String,
}

/// One SoftHSM token per test process (PKCS#11 is initialized once per process).
pub(crate) fn token() -> Arc<Pkcs11Token> {
    shared_token().1.clone()
}

/// The in-process token's module, label and PIN.
pub(crate) fn token_access() -> &'static TokenAccess {
    &shared_token().2
}

#[allow(unsafe_code)] // sets SOFTHSM2_CONF before SoftHSM loads; see the SAFETY comment
fn shared_token() -> &'static (TempDir, Arc<Pkcs11Token>, TokenAccess) {
    static TOKEN: OnceLock<(TempDir, Arc<Pkcs11Token>, TokenAccess)> = OnceLock::new();
    TOKEN.get_or_init(|| {
        let dir = tempfile::tempdir().unwrap();
        let setup = wrapd::dev::prepare(dir.path()).unwrap();
        let config = Config::load(&setup.config).unwrap();
        // SAFETY: set once, before this process first loads SoftHSM (which reads it in
        // C_Initialize); Rust's own environment accesses are serialized by std.
        unsafe { std::env::set_var("SOFTHSM2_CONF", config.softhsm2_conf.as_ref().unwrap()) };
        wrapd::dev::provision(&setup, &config).unwrap();
        let pin = std::fs::read_to_string(setup.dir.join("pin"))
            .map(|p| p.trim().to_owned())
            .unwrap_or_default();
        let access = TokenAccess {
            module: config.hsm.module.clone(),
            label: config.hsm.token_label.clone(),
            pin,
        };
        let token = Pkcs11Token::open(config.hsm).unwrap();
        (dir, Arc::new(token), access)
    })
}

struct Fixture {
    _dir: TempDir,
    db: std::path::PathBuf,
    clock: Arc<ManualClock>,
    keystore: Keystore,
}

fn fixture(config: KeystoreConfig) -> Fixture {
    let dir = tempfile::tempdir().unwrap();
    let db = dir.path().join("meta.db");
    let clock = Arc::new(ManualClock::new(SystemTime::now()));
    let keystore = open(&db, clock.clone(), config);
    Fixture {
        _dir: dir,
        db,
        clock,
        keystore,
    }
}

fn open(db: &std::path::Path, clock: Arc<ManualClock>, config: KeystoreConfig) -> Keystore {
    Keystore::open(
        token(),
        Arc::new(SqliteStore::open(db).unwrap()),
        clock,
        config,
    )
    .unwrap()
}

fn ctx() -> EncryptionContext {
    EncryptionContext::from_entries([("app".to_owned(), "test".to_owned())]).unwrap()
}

/// Milliseconds since the epoch: what the metadata store keeps of a time.
fn millis(t: SystemTime) -> u128 {
    t.duration_since(std::time::UNIX_EPOCH).unwrap().as_millis()
}

fn objects_of(id: &KeyId) -> Vec<ObjectId> {
    token()
        .list_keys()
        .unwrap()
        .into_iter()
        .filter(|o| &o.key_id == id)
        .collect()
}

#[test]
fn scheduled_deletion_destroys_the_key_material_when_due() {
    let f = fixture(KeystoreConfig::default());
    let alias = AliasName::parse("alias/doomed").unwrap();
    let key = f.keystore.create_key("doomed", Some(&alias)).unwrap();
    let id = KeyRef::Id(key.id.clone());
    f.keystore.rotate_key(&id).unwrap();
    let blob = f
        .keystore
        .wrap(&id, b"secret data key", &ctx())
        .unwrap()
        .blob;
    assert_eq!(objects_of(&key.id).len(), 2);

    f.keystore.schedule_deletion(&id, 7).unwrap();
    f.clock.advance(7 * DAY - Duration::from_secs(1));
    assert!(
        f.keystore.purge_due(|_| Ok(())).unwrap().is_empty(),
        "not due yet"
    );
    assert_eq!(objects_of(&key.id).len(), 2);

    f.clock.advance(Duration::from_secs(2));
    assert_eq!(
        f.keystore.purge_due(|_| Ok(())).unwrap(),
        vec![key.id.clone()]
    );
    assert!(objects_of(&key.id).is_empty(), "token objects destroyed");
    assert!(matches!(
        f.keystore.resolve(&id),
        Err(Error::KeyNotFound(_))
    ));
    assert!(matches!(
        f.keystore.resolve(&KeyRef::Alias(alias)),
        Err(Error::AliasNotFound(_))
    ));
    assert!(matches!(
        f.keystore.unwrap(&blob, &ctx(), None),
        Err(Error::InvalidCiphertext)
    ));
    assert!(
        f.keystore.purge_due(|_| Ok(())).unwrap().is_empty(),
        "purging is idempotent"
    );

    // Gone for good: also after reopening the store.
    let reopened = open(&f.db, f.clock.clone(), KeystoreConfig::default());
    assert!(matches!(
        reopened.unwrap(&blob, &ctx(), None),
        Err(Error::InvalidCiphertext)
    ));
    assert!(matches!(reopened.resolve(&id), Err(Error::KeyNotFound(_))));
}

#[test]
fn a_retired_version_scheduled_for_destruction_loses_its_object_when_due_and_only_then() {
    let f = fixture(KeystoreConfig::default());
    let key = f.keystore.create_key("", None).unwrap();
    let id = KeyRef::Id(key.id.clone());
    let old = f.keystore.wrap(&id, b"old data key", &ctx()).unwrap().blob;
    f.keystore.rotate_key(&id).unwrap();
    let new = f.keystore.wrap(&id, b"new data key", &ctx()).unwrap().blob;

    // Only a retired version can be scheduled, and a scheduled one cannot be restored.
    let refused = f.keystore.schedule_version_destruction(&id, 1, 7);
    assert!(
        matches!(&refused, Err(Error::WrongState(m)) if m.contains("not retired")),
        "{refused:?}"
    );
    f.keystore.retire_version(&id, 1).unwrap();
    assert!(matches!(
        f.keystore.schedule_version_destruction(&id, 1, 6),
        Err(Error::InvalidArgument(_))
    ));
    let scheduled = f.keystore.schedule_version_destruction(&id, 1, 7).unwrap();
    assert_eq!(
        scheduled.versions[0].destruction_date.map(millis),
        Some(millis(f.clock.now() + 7 * DAY))
    );
    assert!(matches!(
        f.keystore.restore_version(&id, 1),
        Err(Error::WrongState(_))
    ));

    f.clock.advance(7 * DAY - Duration::from_secs(1));
    assert!(
        f.keystore
            .destroy_due_versions(|_, _| Ok(()))
            .unwrap()
            .is_empty()
    );
    assert_eq!(objects_of(&key.id).len(), 2, "not due yet");

    f.clock.advance(Duration::from_secs(2));
    let refused = f
        .keystore
        .destroy_due_versions(|_, _| Err(Error::Unavailable("audit log down".into())));
    assert!(refused.is_err());
    assert_eq!(objects_of(&key.id).len(), 2, "nothing destroyed unaudited");
    let destroyed = f
        .keystore
        .destroy_due_versions(|k, v| {
            assert_eq!((&k.id, v), (&key.id, 1));
            Ok(())
        })
        .unwrap();
    assert_eq!(destroyed, vec![(key.id.clone(), 1)]);
    // Through PKCS#11: version 1's object is gone, version 2's is there.
    assert_eq!(objects_of(&key.id), vec![ObjectId::new(key.id.clone(), 2)]);
    let err = f.keystore.unwrap(&old, &ctx(), None).unwrap_err();
    assert!(
        matches!(&err, Error::WrongState(m) if m.contains("version 1") && m.contains("destroyed")),
        "{err:?}"
    );
    assert_eq!(
        &*f.keystore.unwrap(&new, &ctx(), None).unwrap().plaintext,
        b"new data key"
    );
    assert!(
        f.keystore
            .destroy_due_versions(|_, _| Ok(()))
            .unwrap()
            .is_empty()
    );
    assert!(matches!(
        f.keystore.restore_version(&id, 1),
        Err(Error::WrongState(_))
    ));

    // After reopening: the version is still known as destroyed, not reported missing.
    let reopened = open(&f.db, f.clock.clone(), KeystoreConfig::default());
    assert!(reopened.reconcile().unwrap().missing.is_empty());
    let record = reopened.resolve(&id).unwrap();
    assert_eq!(
        record.versions[0].destroyed_at.map(millis),
        Some(millis(f.clock.now()))
    );
    assert!(matches!(
        reopened.unwrap(&old, &ctx(), None),
        Err(Error::WrongState(_))
    ));
}

#[test]
fn a_cancelled_version_destruction_keeps_the_version_retired_and_its_object() {
    let f = fixture(KeystoreConfig::default());
    let key = f.keystore.create_key("", None).unwrap();
    let id = KeyRef::Id(key.id.clone());
    let old = f.keystore.wrap(&id, b"k", &ctx()).unwrap().blob;
    f.keystore.rotate_key(&id).unwrap();
    f.keystore.retire_version(&id, 1).unwrap();
    f.keystore.schedule_version_destruction(&id, 1, 7).unwrap();
    f.clock.advance(6 * DAY);
    let cancelled = f.keystore.cancel_version_destruction(&id, 1).unwrap();
    assert!(cancelled.versions[0].retired);
    assert_eq!(cancelled.versions[0].destruction_date, None);
    f.clock.advance(30 * DAY);
    assert!(
        f.keystore
            .destroy_due_versions(|_, _| Ok(()))
            .unwrap()
            .is_empty()
    );
    assert_eq!(objects_of(&key.id).len(), 2);
    f.keystore.restore_version(&id, 1).unwrap();
    assert_eq!(
        &*f.keystore.unwrap(&old, &ctx(), None).unwrap().plaintext,
        b"k"
    );
}

#[test]
fn cancelled_deletion_keeps_the_key() {
    let f = fixture(KeystoreConfig::default());
    let key = f.keystore.create_key("", None).unwrap();
    let id = KeyRef::Id(key.id.clone());
    let blob = f.keystore.wrap(&id, b"k", &ctx()).unwrap().blob;
    f.keystore.schedule_deletion(&id, 7).unwrap();
    f.clock.advance(6 * DAY);
    f.keystore.cancel_deletion(&id).unwrap();
    f.clock.advance(30 * DAY);
    assert!(f.keystore.purge_due(|_| Ok(())).unwrap().is_empty());
    f.keystore.enable_key(&id).unwrap();
    let unwrapped = f.keystore.unwrap(&blob, &ctx(), None).unwrap();
    assert_eq!(&*unwrapped.plaintext, b"k");
    assert_eq!(objects_of(&key.id).len(), 1);
}

#[test]
fn reconciliation_reports_missing_and_orphan_objects() {
    let f = fixture(KeystoreConfig::default());
    let key = f.keystore.create_key("", None).unwrap();
    let id = KeyRef::Id(key.id.clone());
    let blob = f.keystore.wrap(&id, b"k", &ctx()).unwrap().blob;
    let healthy = f.keystore.create_key("", None).unwrap();

    // The token loses one key's object; another object appears that no metadata knows.
    token()
        .destroy_key(&ObjectId::new(key.id.clone(), 1))
        .unwrap();
    let orphan = ObjectId::new(KeyId::generate(), 1);
    token().generate_key(&orphan).unwrap();

    let reopened = open(&f.db, f.clock.clone(), KeystoreConfig::default());
    let report = reopened.reconcile().unwrap();
    assert!(report.missing.contains(&ObjectId::new(key.id.clone(), 1)));
    assert!(!report.missing.iter().any(|o| o.key_id == healthy.id));
    assert!(report.orphans.contains(&orphan));
    assert!(reopened.is_missing(&key.id, 1));

    // The damaged key fails cleanly with UNAVAILABLE; the healthy one works.
    let err = reopened.unwrap(&blob, &ctx(), None).expect_err("must fail");
    assert_eq!(err.kind(), wrapd::error::ErrorKind::Unavailable, "{err}");
    let err = reopened.wrap(&id, b"k", &ctx()).expect_err("must fail");
    assert_eq!(err.kind(), wrapd::error::ErrorKind::Unavailable, "{err}");
    reopened
        .wrap(&KeyRef::Id(healthy.id.clone()), b"k", &ctx())
        .unwrap();
    token().destroy_key(&orphan).unwrap();
}

#[test]
fn the_wrap_limit_rotates_the_key() {
    let f = fixture(KeystoreConfig {
        max_wraps_per_version: 3,
        ..Default::default()
    });
    let key = f.keystore.create_key("", None).unwrap();
    let id = KeyRef::Id(key.id.clone());
    let mut blobs = Vec::new();
    for i in 0..7u8 {
        let wrapped = f.keystore.wrap(&id, &[i], &ctx()).unwrap();
        assert_eq!(wrapped.key_version, u32::from(i / 3) + 1, "wrap {i}");
        blobs.push(wrapped.blob);
    }
    assert_eq!(f.keystore.resolve(&id).unwrap().current_version(), 3);
    for (i, blob) in blobs.iter().enumerate() {
        assert_eq!(
            &*f.keystore.unwrap(blob, &ctx(), None).unwrap().plaintext,
            &[i as u8]
        );
    }
    // Counts persist conservatively: a reopened store never starts below what was used.
    let reopened = open(
        &f.db,
        f.clock.clone(),
        KeystoreConfig {
            max_wraps_per_version: 3,
            ..Default::default()
        },
    );
    let wrapped = reopened.wrap(&id, b"after restart", &ctx()).unwrap();
    assert!(
        wrapped.key_version >= 4,
        "version 3 had a reservation, so a new version is used"
    );
}

proptest::proptest! {
    #![proptest_config(proptest::prelude::ProptestConfig::with_cases(64))]

    /// Against the real token: any change to a blob (bytes flipped anywhere, cut, extended)
    /// or to its context fails authentication, with the one uniform error.
    #[test]
    fn any_mutation_fails_authentication(
        flips in proptest::collection::vec((proptest::prelude::any::<proptest::sample::Index>(), 1u8..), 0..4),
        cut in 0usize..3,
        extra in proptest::collection::vec(proptest::prelude::any::<u8>(), 0..3),
        other_context in proptest::prelude::any::<bool>(),
    ) {
        static FIXTURE: OnceLock<(Fixture, Vec<u8>)> = OnceLock::new();
        let (f, blob) = FIXTURE.get_or_init(|| {
            let f = fixture(KeystoreConfig::default());
            let key = f.keystore.create_key("", None).unwrap();
            let blob = f.keystore.wrap(&KeyRef::Id(key.id.clone()), b"property", &ctx()).unwrap().blob;
            (f, blob)
        });
        let mut mutated = blob.clone();
        for (index, xor) in &flips {
            let i = index.index(mutated.len());
            mutated[i] ^= xor;
        }
        mutated.truncate(mutated.len() - cut);
        mutated.extend(&extra);
        let context = if other_context {
            EncryptionContext::from_entries([("app".to_owned(), "other".to_owned())]).unwrap()
        } else {
            ctx()
        };
        let changed = mutated != *blob || other_context;
        match f.keystore.unwrap(&mutated, &context, None) {
            Ok(unwrapped) => {
                proptest::prop_assert!(!changed, "a changed blob or context unwrapped");
                proptest::prop_assert_eq!(&*unwrapped.plaintext, b"property");
            }
            Err(err) => {
                proptest::prop_assert!(changed);
                proptest::prop_assert!(matches!(err, Error::InvalidCiphertext), "{}", err);
            }
        }
    }
}

#[test]
fn a_rotation_interrupted_by_a_crash_is_adopted_not_destroyed() {
    use wrapd::keystore::MetadataStore;
    let f = fixture(KeystoreConfig::default());
    let key = f.keystore.create_key("", None).unwrap();
    let id = KeyRef::Id(key.id.clone());
    // What a crash between C_GenerateKey and the metadata commit leaves behind: the
    // version recorded as pending, and its object.
    SqliteStore::open(&f.db)
        .unwrap()
        .begin_version(&key.id, 2)
        .unwrap();
    token()
        .generate_key(&ObjectId::new(key.id.clone(), 2))
        .unwrap();

    // Start-up adopts it as version 2 (unwrap-only); the next wrap rotates to version 3.
    let reopened = open(&f.db, f.clock.clone(), KeystoreConfig::default());
    assert_eq!(reopened.resolve(&id).unwrap().current_version(), 2);
    let wrapped = reopened.wrap(&id, b"after", &ctx()).unwrap();
    assert_eq!(wrapped.key_version, 3);
    assert_eq!(objects_of(&key.id).len(), 3, "one object per version");
    assert_eq!(
        &*reopened
            .unwrap(&wrapped.blob, &ctx(), None)
            .unwrap()
            .plaintext,
        b"after"
    );
}

/// After the metadata store is restored from a backup older than the token, start-up refuses
/// with the way out instead of a later rotation destroying live key material; with
/// `adopt_unknown_versions` the versions come back and their blobs unwrap, and rotation
/// goes past them.
#[test]
fn a_restored_metadata_backup_never_costs_key_material() {
    let f = fixture(KeystoreConfig::default());
    let key = f.keystore.create_key("", None).unwrap();
    let id = KeyRef::Id(key.id.clone());
    let Fixture {
        _dir: dir,
        db,
        clock,
        keystore,
    } = f;
    drop(keystore); // the last connection checkpoints the WAL into the file
    let backup = dir.path().join("backup.db");
    std::fs::copy(&db, &backup).unwrap();

    let keystore = open(&db, clock.clone(), KeystoreConfig::default());
    keystore.rotate_key(&id).unwrap();
    let blob = keystore.wrap(&id, b"live under v2", &ctx()).unwrap();
    assert_eq!(blob.key_version, 2);
    drop(keystore);
    std::fs::copy(&backup, &db).unwrap();

    let refused = Keystore::open(
        token(),
        Arc::new(SqliteStore::open(&db).unwrap()),
        clock.clone(),
        KeystoreConfig::default(),
    )
    .err()
    .expect("versions the metadata does not know are a start-up error");
    let message = refused.to_string();
    assert!(
        message.contains(&format!("{}:2", key.id)) && message.contains("--adopt-unknown-versions"),
        "{message}"
    );
    assert_eq!(objects_of(&key.id).len(), 2, "nothing was destroyed");

    let keystore = open(
        &db,
        clock,
        KeystoreConfig {
            adopt_unknown_versions: true,
            ..Default::default()
        },
    );
    keystore.rotate_key(&id).unwrap();
    assert_eq!(
        &*keystore.unwrap(&blob.blob, &ctx(), None).unwrap().plaintext,
        b"live under v2"
    );
    assert_eq!(keystore.resolve(&id).unwrap().current_version(), 3);
}
