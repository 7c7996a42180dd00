//! The key store's rules, in process: a `MemoryToken` and an in-memory SQLite store.

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

#[test]
fn a_version_destruction_written_only_in_the_store_destroys_nothing() {
    let (ks, token, store, clock) = with_writer();
    let id = ks.create_key("", None).unwrap().id.clone();
    let key = KeyRef::Id(id.clone());
    ks.rotate_key(&key).unwrap();
    // Retired and scheduled in the store alone: no ticket, nothing destroyed.
    store.set_version_retired(&id, 1, true).unwrap();
    store
        .set_version_destruction(&id, 1, VersionDestruction::Scheduled(clock.now()))
        .unwrap();
    clock.advance(Duration::from_secs(31 * 86_400));
    assert!(
        ks.destroy_due_versions(|_, _| panic!("nothing is due"))
            .unwrap()
            .is_empty()
    );
    assert!(token.contains(&ObjectId::new(id, 1)).unwrap());
}

#[test]
fn a_version_restored_in_the_store_while_its_destruction_is_due_is_not_destroyed() {
    let (ks, token, store, clock) = with_writer();
    let id = ks.create_key("", None).unwrap().id.clone();
    let key = KeyRef::Id(id.clone());
    ks.rotate_key(&key).unwrap();
    ks.retire_version(&key, 1).unwrap();
    ks.schedule_version_destruction(&key, 1, 7).unwrap();
    // A store writer cancels: the token's ticket alone does not destroy, and is dropped.
    store
        .set_version_destruction(&id, 1, VersionDestruction::None)
        .unwrap();
    clock.advance(Duration::from_secs(8 * 86_400));
    assert!(
        ks.destroy_due_versions(|_, _| panic!("not due by the store"))
            .unwrap()
            .is_empty()
    );
    assert!(token.contains(&ObjectId::new(id.clone(), 1)).unwrap());
    assert!(
        !token
            .tickets()
            .unwrap()
            .iter()
            .any(|t| matches!(t, Ticket::VersionDestruction { .. })),
        "the ticket is dropped"
    );
    // Written back by the writer later: still nothing, the token no longer records it.
    store
        .set_version_destruction(&id, 1, VersionDestruction::Scheduled(clock.now()))
        .unwrap();
    assert!(
        ks.destroy_due_versions(|_, _| panic!("no ticket"))
            .unwrap()
            .is_empty()
    );
    assert!(token.contains(&ObjectId::new(id, 1)).unwrap());
}

#[test]
fn versions_unused_for_the_period_are_retired_and_recently_used_ones_are_kept() {
    let (ks, _, _, clock) = with_writer();
    let key = KeyRef::Id(ks.create_key("", None).unwrap().id.clone());
    let context = ctx("a");
    let old = ks.wrap(&key, b"dek", &context).unwrap().blob;
    ks.rotate_key(&key).unwrap(); // version 2: never used
    ks.rotate_key(&key).unwrap(); // version 3: current
    clock.advance(Duration::from_secs(20 * 86_400));
    ks.unwrap(&old, &context, None).unwrap(); // version 1 used 20 days in
    clock.advance(Duration::from_secs(15 * 86_400));
    let audited = Mutex::new(Vec::new());
    let retired = ks
        .retire_unused(&key, 30, |_, version| {
            audited.lock().push(version);
            Ok(())
        })
        .unwrap();
    assert_eq!(
        retired,
        vec![2],
        "only the version idle for more than 30 days"
    );
    assert_eq!(*audited.lock(), vec![2]);
    let record = ks.resolve(&key).unwrap();
    let states: Vec<bool> = record.versions.iter().map(|v| v.retired).collect();
    assert_eq!(states, vec![false, true, false]);
    // Nothing is ever destroyed, and a second pass changes nothing.
    assert!(
        ks.retire_unused(&key, 30, |_, _| Ok(()))
            .unwrap()
            .is_empty()
    );
    assert!(record.versions.iter().all(|v| v.destroyed_at.is_none()));
}

#[test]
fn a_version_restored_after_automatic_retirement_is_not_retired_again() {
    let (ks, _, _, clock) = with_writer();
    let key = KeyRef::Id(ks.create_key("", None).unwrap().id.clone());
    ks.rotate_key(&key).unwrap();
    clock.advance(Duration::from_secs(31 * 86_400));
    assert_eq!(ks.retire_unused(&key, 30, |_, _| Ok(())).unwrap(), vec![1]);
    ks.restore_version(&key, 1).unwrap();
    // The restore counts as a use: the next passes leave it alone for the period.
    assert!(
        ks.retire_unused(&key, 30, |_, _| Ok(()))
            .unwrap()
            .is_empty()
    );
    clock.advance(Duration::from_secs(29 * 86_400));
    assert!(
        ks.retire_unused(&key, 30, |_, _| Ok(()))
            .unwrap()
            .is_empty()
    );
    clock.advance(Duration::from_secs(2 * 86_400));
    assert_eq!(ks.retire_unused(&key, 30, |_, _| Ok(())).unwrap(), vec![1]);
}

#[test]
fn a_version_destruction_the_store_hid_is_cancelled_by_a_restore_for_good() {
    let (ks, token, store, clock) = with_writer();
    let id = ks.create_key("", None).unwrap().id.clone();
    let key = KeyRef::Id(id.clone());
    ks.rotate_key(&key).unwrap();
    ks.retire_version(&key, 1).unwrap();
    ks.schedule_version_destruction(&key, 1, 7).unwrap();
    // A writer hides the pending destruction; the operator restores the version.
    store
        .set_version_destruction(&id, 1, VersionDestruction::None)
        .unwrap();
    ks.restore_version(&key, 1).unwrap();
    // Later retired again, and the writer puts the old date back: nothing is destroyed.
    ks.retire_version(&key, 1).unwrap();
    store
        .set_version_destruction(&id, 1, VersionDestruction::Scheduled(clock.now()))
        .unwrap();
    clock.advance(Duration::from_secs(8 * 86_400));
    assert!(
        ks.destroy_due_versions(|_, _| panic!("no ticket"))
            .unwrap()
            .is_empty()
    );
    assert!(token.contains(&ObjectId::new(id, 1)).unwrap());
}
