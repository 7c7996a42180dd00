//! The [`MetadataStore`] (and audit [`HeadStore`]) contract, written once and run against
//! every backend: SQLite now, PostgreSQL next. A backend's test module calls
//! [`metadata_store_conformance!`](crate::metadata_store_conformance) with an expression that
//! makes a fresh, empty store.
//!
//! Times are compared at millisecond precision: backends keep at least that much.

use std::time::{Duration, SystemTime, UNIX_EPOCH};

use super::metadata::{
    Cursor, ImportedMaterial, KeyOrigin, KeyRecord, KeyState, MetadataStore, RotationSchedule,
    VersionDestruction, VersionRecord, VersionUsage,
};
use crate::audit::{ChainHead, HeadStore};
use crate::error::{Error, ErrorKind};
use crate::ids::{AliasName, KeyId};

/// What a backend under test is.
pub trait Store: MetadataStore + HeadStore {}
impl<T: MetadataStore + HeadStore> Store for T {}

fn millis(t: SystemTime) -> SystemTime {
    let ms = t.duration_since(UNIX_EPOCH).unwrap().as_millis() as u64;
    UNIX_EPOCH + Duration::from_millis(ms)
}

fn record(state: KeyState) -> KeyRecord {
    let now = millis(SystemTime::now());
    KeyRecord {
        id: KeyId::generate(),
        description: "test".into(),
        state,
        created_at: now,
        deletion_date: None,
        versions: vec![VersionRecord::new(1, now, false)],
        aliases: vec![],
        rotation: None,
        tags: Default::default(),
        origin: Default::default(),
        material: None,
        policy: None,
        grants: Default::default(),
    }
}

fn alias(name: &str) -> AliasName {
    AliasName::parse(name).unwrap()
}

/// Keys round-trip, a taken alias fails the whole creation, pages follow creation order.
pub fn keys_aliases_and_pages(store: &impl Store) {
    let a = record(KeyState::Enabled);
    let b = record(KeyState::Enabled);
    store.create_key(&a, Some(&alias("alias/a"))).unwrap();
    assert!(matches!(
        store.create_key(&b, Some(&alias("alias/a"))),
        Err(Error::AlreadyExists(_))
    ));
    assert!(store.key(&b.id).unwrap().is_none(), "nothing half-made");
    store.create_key(&b, None).unwrap();

    let loaded = store.key(&a.id).unwrap().unwrap();
    assert_eq!(loaded.aliases, vec![alias("alias/a")]);
    assert_eq!(
        KeyRecord {
            aliases: vec![],
            ..loaded
        },
        a,
        "every field round-trips"
    );
    assert_eq!(store.all_keys().unwrap().len(), 2);

    let page = store.list_keys(&Cursor::default(), 1).unwrap();
    assert_eq!(page.len(), 1);
    assert_eq!(page[0].1.id, a.id);
    let next = store.list_keys(&page[0].0, 10).unwrap();
    assert_eq!(next.len(), 1);
    assert_eq!(next[0].1.id, b.id);
    assert!(store.list_keys(&next[0].0, 10).unwrap().is_empty());
}

/// Aliases: create, re-point, list (all or per key, sorted, paged), delete.
pub fn aliases(store: &impl Store) {
    let a = record(KeyState::Enabled);
    let b = record(KeyState::Enabled);
    store.create_key(&a, None).unwrap();
    store.create_key(&b, None).unwrap();
    store.create_alias(&alias("alias/z"), &a.id).unwrap();
    store.create_alias(&alias("alias/m"), &a.id).unwrap();
    assert!(matches!(
        store.create_alias(&alias("alias/m"), &b.id),
        Err(Error::AlreadyExists(_))
    ));
    assert!(matches!(
        store.create_alias(&alias("alias/x"), &KeyId::generate()),
        Err(e) if e.kind() == ErrorKind::NotFound
    ));
    assert!(matches!(
        store.update_alias(&alias("alias/none"), &a.id),
        Err(Error::AliasNotFound(_))
    ));
    store.update_alias(&alias("alias/z"), &b.id).unwrap();
    let all = store.list_aliases(None, &Cursor::default(), 10).unwrap();
    assert_eq!(
        all,
        vec![
            (alias("alias/m"), a.id.clone()),
            (alias("alias/z"), b.id.clone())
        ]
    );
    let of_b = store
        .list_aliases(Some(&b.id), &Cursor::default(), 10)
        .unwrap();
    assert_eq!(of_b, vec![(alias("alias/z"), b.id.clone())]);
    let after_m = store
        .list_aliases(None, &Cursor("alias/m".into()), 10)
        .unwrap();
    assert_eq!(after_m.len(), 1);
    assert_eq!(
        store.key(&b.id).unwrap().unwrap().aliases,
        vec![alias("alias/z")]
    );
    assert_eq!(
        store.delete_alias(&alias("alias/z")).unwrap(),
        Some(b.id.clone())
    );
    assert_eq!(store.delete_alias(&alias("alias/z")).unwrap(), None);
    assert_eq!(store.all_aliases().unwrap().len(), 1);
}

/// States and deletion: due dates, deletion cascades to versions and aliases.
pub fn deletion_due_and_cascade(store: &impl Store) {
    let key = record(KeyState::Enabled);
    store.create_key(&key, Some(&alias("alias/x"))).unwrap();
    let when = millis(SystemTime::now() + Duration::from_secs(3600));
    store
        .set_state(&key.id, KeyState::PendingDeletion, Some(when))
        .unwrap();
    let loaded = store.key(&key.id).unwrap().unwrap();
    assert_eq!(loaded.state, KeyState::PendingDeletion);
    assert_eq!(loaded.deletion_date, Some(when));
    assert!(
        store
            .keys_due_for_deletion(SystemTime::now())
            .unwrap()
            .is_empty()
    );
    assert_eq!(
        store.keys_due_for_deletion(when).unwrap(),
        vec![key.id.clone()]
    );
    assert!(matches!(
        store.set_state(&KeyId::generate(), KeyState::Disabled, None),
        Err(Error::KeyNotFound(_))
    ));
    store.delete_key(&key.id, when).unwrap();
    assert!(store.key(&key.id).unwrap().is_none());
    assert!(store.all_aliases().unwrap().is_empty());
}

/// Versions: appended in order; a pending version is remembered until added or ended.
pub fn versions_and_pending_versions(store: &impl Store) {
    let key = record(KeyState::Enabled);
    store.create_key(&key, None).unwrap();
    store.begin_version(&key.id, 2).unwrap();
    store.begin_version(&key.id, 2).unwrap(); // resumed
    assert_eq!(store.pending_versions().unwrap(), vec![(key.id.clone(), 2)]);
    let v2 = VersionRecord::new(2, millis(SystemTime::now()), true);
    store.add_version(&key.id, &v2).unwrap();
    assert!(
        store.pending_versions().unwrap().is_empty(),
        "added: no longer pending"
    );
    let loaded = store.key(&key.id).unwrap().unwrap();
    assert_eq!(loaded.versions.len(), 2);
    assert_eq!(loaded.versions[1], v2);
    assert_eq!(loaded.current_version(), 2);
    store.begin_version(&key.id, 3).unwrap();
    store.end_version(&key.id, 3).unwrap();
    assert!(store.pending_versions().unwrap().is_empty());
}

/// A rotation schedule and tags round-trip, are replaced whole, and go with the key.
pub fn rotation_schedules_and_tags(store: &impl Store) {
    let mut key = record(KeyState::Enabled);
    key.tags.insert("team".into(), "payments".into());
    key.rotation = Some(RotationSchedule {
        period_days: 90,
        next: millis(SystemTime::now() + Duration::from_secs(90 * 86_400)),
    });
    store.create_key(&key, None).unwrap();
    assert_eq!(
        store.key(&key.id).unwrap().unwrap(),
        key,
        "created with both"
    );

    let later = RotationSchedule {
        period_days: 365,
        next: millis(SystemTime::now() + Duration::from_secs(365 * 86_400)),
    };
    store.set_rotation(&key.id, Some(&later)).unwrap();
    let tags = [("env".to_owned(), "prod".to_owned())]
        .into_iter()
        .collect();
    store.set_tags(&key.id, &tags).unwrap();
    let loaded = store.key(&key.id).unwrap().unwrap();
    assert_eq!(loaded.rotation, Some(later));
    assert_eq!(loaded.tags, tags, "tags are replaced, not merged");

    store.set_rotation(&key.id, None).unwrap();
    assert_eq!(store.key(&key.id).unwrap().unwrap().rotation, None);
    let unknown = KeyId::generate();
    assert_eq!(
        store.set_tags(&unknown, &tags).unwrap_err().kind(),
        ErrorKind::NotFound
    );
    assert_eq!(
        store.set_rotation(&unknown, None).unwrap_err().kind(),
        ErrorKind::NotFound
    );
    store.set_description(&key.id, "rewritten").unwrap();
    assert_eq!(
        store.key(&key.id).unwrap().unwrap().description,
        "rewritten"
    );
    assert_eq!(
        store.set_description(&unknown, "x").unwrap_err().kind(),
        ErrorKind::NotFound
    );
    // The key policy: none for a key made without one, then the document as written.
    assert_eq!(store.key(&key.id).unwrap().unwrap().policy, None);
    store.set_policy(&key.id, "{\"Statement\":[]}").unwrap();
    assert_eq!(
        store.key(&key.id).unwrap().unwrap().policy.as_deref(),
        Some("{\"Statement\":[]}")
    );
    assert_eq!(
        store.set_policy(&unknown, "{}").unwrap_err().kind(),
        ErrorKind::NotFound
    );
    let mut with_policy = record(KeyState::Enabled);
    with_policy.policy = Some("{\"Id\":\"made with it\"}".into());
    store.create_key(&with_policy, None).unwrap();
    assert_eq!(
        store.key(&with_policy.id).unwrap().unwrap().policy,
        with_policy.policy
    );
}

/// Wrap reservations only ever grow.
pub fn wrap_blocks_never_overlap(store: &impl Store) {
    let key = record(KeyState::Enabled);
    store.create_key(&key, None).unwrap();
    assert_eq!(store.claim_wraps(&key.id, 1, 4096).unwrap(), 4096);
    assert_eq!(store.claim_wraps(&key.id, 1, 4096).unwrap(), 8192);
    assert_eq!(
        store.key(&key.id).unwrap().unwrap().versions[0].wraps_reserved,
        8192
    );
    assert_eq!(
        store.claim_wraps(&key.id, 9, 1).unwrap_err().kind(),
        ErrorKind::NotFound
    );
}

/// A version number is claimed once: claiming it again is a resumption; a version that
/// exists cannot be claimed.
pub fn version_claims(store: &impl Store) {
    let key = record(KeyState::Enabled);
    store.create_key(&key, None).unwrap();
    assert_eq!(
        store.begin_version(&key.id, 1).unwrap_err().kind(),
        ErrorKind::AlreadyExists,
        "version 1 exists"
    );
    assert!(!store.begin_version(&key.id, 2).unwrap(), "a new claim");
    assert!(
        store.begin_version(&key.id, 2).unwrap(),
        "our own claim, resumed"
    );
}

/// An imported key's origin, state and material record round-trip and change atomically,
/// and only over the check value the caller expects (two imports at once cannot both win).
pub fn imported_material(store: &impl Store) {
    let mut key = record(KeyState::PendingImport);
    key.origin = KeyOrigin::External;
    store.create_key(&key, None).unwrap();
    assert_eq!(store.key(&key.id).unwrap().unwrap(), key, "pending import");

    let material = ImportedMaterial {
        check_value: [0x5a; 16],
        present: true,
        valid_to: Some(millis(SystemTime::now() + Duration::from_secs(3600))),
    };
    store
        .set_material(&key.id, None, KeyState::Enabled, &material)
        .unwrap();
    // Another import that read the key before this one recorded its material: refused,
    // and the row keeps the first material.
    let other = ImportedMaterial {
        check_value: [0x33; 16],
        ..material
    };
    assert_eq!(
        store
            .set_material(&key.id, None, KeyState::Enabled, &other)
            .unwrap_err()
            .kind(),
        ErrorKind::IncorrectKeyMaterial
    );
    let loaded = store.key(&key.id).unwrap().unwrap();
    assert_eq!(loaded.state, KeyState::Enabled);
    assert_eq!(loaded.origin, KeyOrigin::External);
    assert_eq!(loaded.material, Some(material));

    let gone = ImportedMaterial {
        present: false,
        valid_to: None,
        ..material
    };
    store
        .set_material(
            &key.id,
            Some(&material.check_value),
            KeyState::PendingImport,
            &gone,
        )
        .unwrap();
    let loaded = store.key(&key.id).unwrap().unwrap();
    assert_eq!(
        (loaded.state, loaded.material),
        (KeyState::PendingImport, Some(gone))
    );
    assert_eq!(
        store
            .set_material(&KeyId::generate(), None, KeyState::Enabled, &material)
            .unwrap_err()
            .kind(),
        ErrorKind::NotFound
    );
    let generated = record(KeyState::Enabled);
    store.create_key(&generated, None).unwrap();
    let loaded = store.key(&generated.id).unwrap().unwrap();
    assert_eq!((loaded.origin, loaded.material), (KeyOrigin::Hsm, None));
}

/// Audit chain heads: one per chain, only moving forward.
pub fn audit_heads_only_move_forward(store: &impl Store) {
    let head = |seq, c: char| ChainHead {
        seq,
        hash: c.to_string().repeat(64),
    };
    assert_eq!(store.audit_head("/var/log/a").unwrap(), None);
    store
        .record_audit_head("/var/log/a", &head(5, 'a'))
        .unwrap();
    store
        .record_audit_head("/var/log/a", &head(3, 'b'))
        .unwrap();
    store
        .record_audit_head("/var/log/b", &head(1, 'c'))
        .unwrap();
    assert_eq!(store.audit_head("/var/log/a").unwrap(), Some(head(5, 'a')));
    assert_eq!(store.audit_head("/var/log/b").unwrap(), Some(head(1, 'c')));
    store
        .record_audit_head("/var/log/a", &head(9, 'd'))
        .unwrap();
    assert_eq!(store.audit_head("/var/log/a").unwrap(), Some(head(9, 'd')));
}

/// Version usage: batches add up (counts summed, the earliest first and latest last use), a
/// version that does not exist is skipped, and the usage goes with the key.
pub fn version_usage_adds_up(store: &impl Store) {
    let key = record(KeyState::Enabled);
    store.create_key(&key, None).unwrap();
    let t = |s: u64| millis(SystemTime::UNIX_EPOCH + Duration::from_secs(1_800_000_000 + s));
    let used = |wraps, unwraps, first, last| VersionUsage {
        wraps,
        unwraps,
        first_used: Some(t(first)),
        last_used: Some(t(last)),
    };
    assert!(store.usage(&key.id).unwrap().is_empty(), "never used");
    store
        .add_usage(&[
            (key.id.clone(), 1, used(3, 1, 10, 20)),
            // Another daemon's batch for a version no store row has: skipped, no error.
            (key.id.clone(), 9, used(5, 5, 1, 2)),
        ])
        .unwrap();
    store
        .add_usage(&[(key.id.clone(), 1, used(2, 4, 5, 15))])
        .unwrap();
    assert_eq!(
        store.usage(&key.id).unwrap(),
        vec![(1, used(5, 5, 5, 20))],
        "summed: the earliest first use, the latest last use"
    );
    store.delete_key(&key.id, SystemTime::now()).unwrap();
    assert!(store.usage(&key.id).unwrap().is_empty());
}

/// A version's retirement and destruction round-trip; a version the key lacks is not found.
pub fn version_retirement_and_destruction(store: &impl Store) {
    let key = record(KeyState::Enabled);
    store.create_key(&key, None).unwrap();
    let version =
        |store: &dyn MetadataStore| store.key(&key.id).unwrap().unwrap().versions[0].clone();
    let when = millis(SystemTime::UNIX_EPOCH + Duration::from_secs(1_800_000_000));
    store.set_version_retired(&key.id, 1, true).unwrap();
    store
        .set_version_destruction(&key.id, 1, VersionDestruction::Scheduled(when))
        .unwrap();
    let v = version(store);
    assert!(v.retired);
    assert_eq!((v.destruction_date, v.destroyed_at), (Some(when), None));
    store
        .set_version_destruction(&key.id, 1, VersionDestruction::Destroyed(when))
        .unwrap();
    let v = version(store);
    assert_eq!((v.destruction_date, v.destroyed_at), (None, Some(when)));
    store
        .set_version_destruction(&key.id, 1, VersionDestruction::None)
        .unwrap();
    let v = version(store);
    assert_eq!((v.destruction_date, v.destroyed_at), (None, None));
    assert!(matches!(
        store.set_version_destruction(&key.id, 2, VersionDestruction::None),
        Err(Error::KeyNotFound(_))
    ));
    assert!(matches!(
        store.set_version_retired(&key.id, 2, true),
        Err(Error::KeyNotFound(_))
    ));
}

/// Generates the conformance tests for a backend: `$make` makes a fresh, empty store.
#[macro_export]
#[doc(hidden)]
macro_rules! metadata_store_conformance {
    ($make:expr) => {
        mod conformance {
            #[allow(unused_imports)]
            use super::*;
            use $crate::keystore::conformance as suite;

            #[test]
            fn keys_aliases_and_pages() {
                suite::keys_aliases_and_pages(&$make);
            }
            #[test]
            fn aliases() {
                suite::aliases(&$make);
            }
            #[test]
            fn deletion_due_and_cascade() {
                suite::deletion_due_and_cascade(&$make);
            }
            #[test]
            fn versions_and_pending_versions() {
                suite::versions_and_pending_versions(&$make);
            }
            #[test]
            fn rotation_schedules_and_tags() {
                suite::rotation_schedules_and_tags(&$make);
            }
            #[test]
            fn wrap_blocks_never_overlap() {
                suite::wrap_blocks_never_overlap(&$make);
            }
            #[test]
            fn version_claims() {
                suite::version_claims(&$make);
            }
            #[test]
            fn imported_material() {
                suite::imported_material(&$make);
            }
            #[test]
            fn version_usage_adds_up() {
                suite::version_usage_adds_up(&$make);
            }
            #[test]
            fn version_retirement_and_destruction() {
                suite::version_retirement_and_destruction(&$make);
            }
            #[test]
            fn audit_heads_only_move_forward() {
                suite::audit_heads_only_move_forward(&$make);
            }
        }
    };
}
