//! Key import in-process, on the real SoftHSM token, with a clock the tests move: known
//! answers per wrapping algorithm, every refusal leaving nothing behind, deletion and expiry,
//! and the objects' attributes read through PKCS#11 itself. The AWS CLI + openssl flow and
//! `wrapctl keys import` are in `aws_kms_api.rs` and `wrapctl_cli.rs`.

use std::sync::{Arc, Mutex, MutexGuard};
use std::time::{Duration, SystemTime};

use cryptoki::context::{CInitializeArgs, CInitializeFlags, Pkcs11};
use cryptoki::error::{Error as CkError, RvError};
use cryptoki::object::{Attribute, AttributeType, ObjectClass, ObjectHandle};
use cryptoki::session::{Session, UserType};
use cryptoki::types::AuthPin;
use ring::aead::{AES_256_GCM, Aad, LessSafeKey, Nonce, UnboundKey};
use tempfile::TempDir;
use wrapd::blob::Blob;
use wrapd::context::EncryptionContext;
use wrapd::error::ErrorKind;
use wrapd::hsm::{ImportAlgorithm, ObjectId, Ticket, Token, WrappingKeyId};
use wrapd::ids::{KeyId, KeyRef};
use wrapd::key_import::wrap_key_material;
use wrapd::keystore::{
    ImportParameters, KeyOrigin, KeyRecord, KeyState, Keystore, KeystoreConfig, ManualClock,
    SqliteStore,
};

use crate::keystore_in_process::{token, token_access};

/// The known key of the known-answer tests (the RFC 5649 test key, 256 bits).
const KNOWN: [u8; 32] = [
    0x00, 0x01, 0x02, 0x03, 0x04, 0x05, 0x06, 0x07, 0x08, 0x09, 0x0a, 0x0b, 0x0c, 0x0d, 0x0e, 0x0f,
    0x10, 0x11, 0x12, 0x13, 0x14, 0x15, 0x16, 0x17, 0x18, 0x19, 0x1a, 0x1b, 0x1c, 0x1d, 0x1e, 0x1f,
];

/// Import tests count objects without a wrapd `CKA_ID` (intermediate keys): they run one at
/// a time so that one test's intermediate objects never show in another's count.
fn serial() -> MutexGuard<'static, ()> {
    static LOCK: Mutex<()> = Mutex::new(());
    LOCK.lock().unwrap_or_else(|e| e.into_inner())
}

struct Fixture {
    _dir: TempDir,
    clock: Arc<ManualClock>,
    keystore: Keystore,
}

fn fixture() -> Fixture {
    let dir = tempfile::tempdir().unwrap();
    let clock = Arc::new(ManualClock::new(SystemTime::now()));
    let keystore = Keystore::open(
        token(),
        Arc::new(SqliteStore::open(&dir.path().join("meta.db")).unwrap()),
        clock.clone(),
        KeystoreConfig::default(),
    )
    .unwrap();
    Fixture {
        _dir: dir,
        clock,
        keystore,
    }
}

fn external(f: &Fixture) -> Arc<KeyRecord> {
    f.keystore
        .create_key_from("imported", None, &Default::default(), KeyOrigin::External)
        .unwrap()
}

fn by_id(key: &KeyRecord) -> KeyRef {
    KeyRef::Id(key.id.clone())
}

fn params(f: &Fixture, key: &KeyRecord, algorithm: ImportAlgorithm) -> ImportParameters {
    f.keystore
        .import_parameters(&by_id(key), algorithm, 3072)
        .unwrap()
}

/// Import parameters for `key` and `material` wrapped for them, as the key owner makes it.
fn wrapped_for(
    f: &Fixture,
    key: &KeyRecord,
    algorithm: ImportAlgorithm,
    material: &[u8; 32],
) -> (ImportParameters, Vec<u8>) {
    let p = params(f, key, algorithm);
    let wrapped = wrap_key_material(&p.public_key, algorithm, material).unwrap();
    (p, wrapped)
}

fn import(
    f: &Fixture,
    key: &KeyRecord,
    algorithm: ImportAlgorithm,
    material: &[u8; 32],
) -> wrapd::Result<Arc<KeyRecord>> {
    let (p, wrapped) = wrapped_for(f, key, algorithm, material);
    f.keystore
        .import_key_material(&by_id(key), &p.import_token, &wrapped, None)
}

fn ctx() -> EncryptionContext {
    EncryptionContext::from_entries([("tenant".to_owned(), "acme".to_owned())]).unwrap()
}

/// Opens the blob locally with `key`, by the documented blob format (AES-256-GCM, AAD =
/// header || canonical context).
fn open_locally(key: &[u8; 32], blob: &[u8], context: &EncryptionContext) -> Option<Vec<u8>> {
    let blob = Blob::parse(blob).ok()?;
    let aad = Blob::aad(&blob.key_id, blob.key_version, &context.serialize());
    let sealing = LessSafeKey::new(UnboundKey::new(&AES_256_GCM, key).unwrap());
    let mut data = blob.ciphertext.clone();
    let plaintext = sealing
        .open_in_place(
            Nonce::assume_unique_for_key(blob.iv),
            Aad::from(&aad),
            &mut data,
        )
        .ok()?;
    Some(plaintext.to_vec())
}

/// A blob made locally with `key`, the same way wrapd makes them.
fn seal_locally(
    key: &[u8; 32],
    key_id: &KeyId,
    plaintext: &[u8],
    context: &EncryptionContext,
) -> Vec<u8> {
    let iv = [7u8; 12];
    let aad = Blob::aad(key_id, 1, &context.serialize());
    let sealing = LessSafeKey::new(UnboundKey::new(&AES_256_GCM, key).unwrap());
    let mut data = plaintext.to_vec();
    sealing
        .seal_in_place_append_tag(Nonce::assume_unique_for_key(iv), Aad::from(&aad), &mut data)
        .unwrap();
    Blob {
        key_id: key_id.clone(),
        key_version: 1,
        iv,
        ciphertext: data,
    }
    .encode()
}

/// A blob wrapd makes opens locally with the known key, and a blob made locally with the
/// known key unwraps in wrapd.
fn assert_known_answer(f: &Fixture, key: &KeyRecord) {
    let wrapped = f
        .keystore
        .wrap(&by_id(key), b"sixteen byte dek", &ctx())
        .unwrap();
    assert_eq!(
        open_locally(&KNOWN, &wrapped.blob, &ctx()).as_deref(),
        Some(&b"sixteen byte dek"[..]),
        "wrapd's blob opens with the known key"
    );
    let local = seal_locally(&KNOWN, &key.id, b"made outside wrapd", &ctx());
    let unwrapped = f.keystore.unwrap(&local, &ctx(), None).unwrap();
    assert_eq!(&unwrapped.plaintext[..], b"made outside wrapd");
}

// ---- PKCS#11, from the test's own session ---------------------------------------------------

fn session() -> Session {
    let access = token_access();
    let pkcs11 = Pkcs11::new(&access.module).unwrap();
    match pkcs11.initialize(CInitializeArgs::new(CInitializeFlags::OS_LOCKING_OK)) {
        Ok(()) | Err(CkError::Pkcs11(RvError::CryptokiAlreadyInitialized, _)) => {}
        Err(err) => panic!("C_Initialize: {err}"),
    }
    let slot = pkcs11
        .get_slots_with_token()
        .unwrap()
        .into_iter()
        .find(|s| pkcs11.get_token_info(*s).unwrap().label() == access.label)
        .unwrap();
    let session = pkcs11.open_ro_session(slot).unwrap();
    match session.login(UserType::User, Some(&AuthPin::from(access.pin.clone()))) {
        Ok(()) | Err(CkError::Pkcs11(RvError::UserAlreadyLoggedIn, _)) => {}
        Err(err) => panic!("C_Login: {err}"),
    }
    session
}

/// Objects of this process without a wrapd `CKA_ID` (session objects of every session are
/// visible to the whole application): the intermediate keys an import must not leave.
fn unnamed_objects(session: &Session) -> usize {
    session
        .find_objects(&[])
        .unwrap()
        .into_iter()
        .filter(|handle| {
            let id = session
                .get_attributes(*handle, &[AttributeType::Id])
                .ok()
                .and_then(|attrs| {
                    attrs.into_iter().find_map(|a| match a {
                        Attribute::Id(id) => Some(id),
                        _ => None,
                    })
                })
                .unwrap_or_default();
            ObjectId::from_cka_id(&id).is_none()
                && WrappingKeyId::parse(&id).is_none()
                && Ticket::parse(&id).is_none()
                && !id.starts_with(b"wraps:")
        })
        .count()
}

fn find(session: &Session, class: ObjectClass, id: Vec<u8>) -> Vec<ObjectHandle> {
    session
        .find_objects(&[Attribute::Class(class), Attribute::Id(id)])
        .unwrap()
}

fn flags(session: &Session, handle: ObjectHandle) -> Vec<(AttributeType, bool)> {
    let types = [
        AttributeType::Token,
        AttributeType::Private,
        AttributeType::Sensitive,
        AttributeType::Extractable,
        AttributeType::Encrypt,
        AttributeType::Decrypt,
        AttributeType::Wrap,
        AttributeType::Unwrap,
    ];
    session
        .get_attributes(handle, &types)
        .unwrap()
        .into_iter()
        .filter_map(|a| {
            Some(match a {
                Attribute::Token(v) => (AttributeType::Token, v),
                Attribute::Private(v) => (AttributeType::Private, v),
                Attribute::Sensitive(v) => (AttributeType::Sensitive, v),
                Attribute::Extractable(v) => (AttributeType::Extractable, v),
                Attribute::Encrypt(v) => (AttributeType::Encrypt, v),
                Attribute::Decrypt(v) => (AttributeType::Decrypt, v),
                Attribute::Wrap(v) => (AttributeType::Wrap, v),
                Attribute::Unwrap(v) => (AttributeType::Unwrap, v),
                _ => return None,
            })
        })
        .collect()
}

fn key_objects(key: &KeyRecord) -> usize {
    token()
        .list_keys()
        .unwrap()
        .iter()
        .filter(|o| o.key_id == key.id)
        .count()
}

// ---- known answers ---------------------------------------------------------------------------

#[test]
fn material_imported_with_rsaes_oaep_sha_1_matches_a_known_answer() {
    let _serial = serial();
    let f = fixture();
    let key = external(&f);
    assert_eq!(key.state, KeyState::PendingImport);
    let imported = import(&f, &key, ImportAlgorithm::RsaesOaepSha1, &KNOWN).unwrap();
    assert_eq!(imported.state, KeyState::Enabled);
    assert_known_answer(&f, &key);
}

#[test]
fn material_imported_with_rsa_aes_key_wrap_sha_1_matches_a_known_answer() {
    let _serial = serial();
    let f = fixture();
    let key = external(&f);
    import(&f, &key, ImportAlgorithm::RsaAesKeyWrapSha1, &KNOWN).unwrap();
    assert_known_answer(&f, &key);
}

/// SoftHSM 2.6 (Debian's) does RSA-OAEP with SHA-1 only; newer SoftHSM and CloudHSM do
/// SHA-256. Whichever this token is, the SHA-256 algorithms either import by the known
/// answer, or are refused at GetParametersForImport, before anyone wraps material for them,
/// with an error that names the SHA-1 alternative.
#[test]
fn sha_256_wrapping_imports_where_the_token_can_and_is_refused_clearly_where_it_cannot() {
    let _serial = serial();
    let f = fixture();
    for algorithm in [
        ImportAlgorithm::RsaesOaepSha256,
        ImportAlgorithm::RsaAesKeyWrapSha256,
    ] {
        let key = external(&f);
        match f.keystore.import_parameters(&by_id(&key), algorithm, 3072) {
            Ok(p) => {
                let wrapped = wrap_key_material(&p.public_key, algorithm, &KNOWN).unwrap();
                f.keystore
                    .import_key_material(&by_id(&key), &p.import_token, &wrapped, None)
                    .unwrap();
                assert_known_answer(&f, &key);
            }
            Err(err) => {
                assert_eq!(err.kind(), ErrorKind::Unsupported, "{err}");
                assert!(err.to_string().contains("_SHA_1"), "{err}");
                assert!(
                    token()
                        .wrapping_keys()
                        .unwrap()
                        .iter()
                        .all(|w| w.key_id != key.id),
                    "the refused wrapping key is not kept"
                );
            }
        }
    }
}

// ---- refusals --------------------------------------------------------------------------------

/// Checks that a refused import left the key pending import with no object in the token.
fn assert_nothing_imported(f: &Fixture, key: &KeyRecord) {
    let now = f.keystore.resolve(&by_id(key)).unwrap();
    assert_eq!(now.state, KeyState::PendingImport);
    assert_eq!(now.material, None);
    assert_eq!(key_objects(key), 0, "no key object in the token");
}

#[test]
fn an_import_token_of_another_key_is_refused_and_creates_nothing() {
    let _serial = serial();
    let f = fixture();
    let (key, other) = (external(&f), external(&f));
    let (p, wrapped) = wrapped_for(&f, &other, ImportAlgorithm::RsaesOaepSha1, &KNOWN);
    let err = f
        .keystore
        .import_key_material(&by_id(&key), &p.import_token, &wrapped, None)
        .unwrap_err();
    assert_eq!(err.kind(), ErrorKind::InvalidImportToken, "{err}");
    assert_nothing_imported(&f, &key);
    assert_nothing_imported(&f, &other);
}

#[test]
fn a_forged_import_token_is_refused_and_creates_nothing() {
    let _serial = serial();
    let f = fixture();
    let key = external(&f);
    let (p, wrapped) = wrapped_for(&f, &key, ImportAlgorithm::RsaesOaepSha1, &KNOWN);
    let mut forged = WrappingKeyId::parse(&p.import_token).unwrap();
    forged.nonce[0] ^= 1;
    for token in [forged.to_bytes(), b"not a token".to_vec()] {
        let err = f
            .keystore
            .import_key_material(&by_id(&key), &token, &wrapped, None)
            .unwrap_err();
        assert_eq!(err.kind(), ErrorKind::InvalidImportToken, "{err}");
    }
    assert_nothing_imported(&f, &key);
}

#[test]
fn an_expired_import_token_is_refused_and_its_wrapping_key_is_purged() {
    let _serial = serial();
    let f = fixture();
    let key = external(&f);
    let (p, wrapped) = wrapped_for(&f, &key, ImportAlgorithm::RsaesOaepSha1, &KNOWN);
    f.clock.advance(Duration::from_secs(24 * 3600 + 1));
    let err = f
        .keystore
        .import_key_material(&by_id(&key), &p.import_token, &wrapped, None)
        .unwrap_err();
    assert_eq!(err.kind(), ErrorKind::ExpiredImportToken, "{err}");
    assert_nothing_imported(&f, &key);
    let wrapping = WrappingKeyId::parse(&p.import_token).unwrap();
    assert!(token().wrapping_keys().unwrap().contains(&wrapping));
    assert!(f.keystore.purge_wrapping_keys().unwrap() >= 1);
    assert!(!token().wrapping_keys().unwrap().contains(&wrapping));
}

#[test]
fn material_of_the_wrong_size_is_refused_and_creates_nothing() {
    use rsa::pkcs8::DecodePublicKey;
    let _serial = serial();
    let f = fixture();
    let key = external(&f);
    for len in [16usize, 24, 48] {
        let p = params(&f, &key, ImportAlgorithm::RsaesOaepSha1);
        // wrap_key_material refuses these itself: wrap them by hand.
        let public = rsa::RsaPublicKey::from_public_key_der(&p.public_key).unwrap();
        let wrapped = public
            .encrypt(
                &mut rsa::rand_core::OsRng,
                rsa::Oaep::new::<sha1::Sha1>(),
                &vec![0x42; len],
            )
            .unwrap();
        let err = f
            .keystore
            .import_key_material(&by_id(&key), &p.import_token, &wrapped, None)
            .unwrap_err();
        assert_eq!(err.kind(), ErrorKind::InvalidArgument, "{len} bytes: {err}");
        assert!(err.to_string().contains("256-bit"), "{err}");
    }
    assert_nothing_imported(&f, &key);
    assert_eq!(unnamed_objects(&session()), 0, "no object left behind");
}

#[test]
fn tampered_wrapped_material_is_refused_and_creates_nothing() {
    let _serial = serial();
    let f = fixture();
    let key = external(&f);
    for algorithm in [
        ImportAlgorithm::RsaesOaepSha1,
        ImportAlgorithm::RsaAesKeyWrapSha1,
    ] {
        let (p, wrapped) = wrapped_for(&f, &key, algorithm, &KNOWN);
        // A byte of the RSA part, the last byte (the RFC 5649 part, where there is one), and
        // a truncation.
        let mut cases = vec![wrapped[..wrapped.len() - 1].to_vec()];
        for index in [10, wrapped.len() - 1] {
            let mut tampered = wrapped.clone();
            tampered[index] ^= 0x01;
            cases.push(tampered);
        }
        for case in cases {
            let err = f
                .keystore
                .import_key_material(&by_id(&key), &p.import_token, &case, None)
                .unwrap_err();
            assert_eq!(
                err.kind(),
                ErrorKind::InvalidCiphertext,
                "{}: {err}",
                algorithm.name()
            );
        }
    }
    assert_nothing_imported(&f, &key);
    assert_eq!(unnamed_objects(&session()), 0, "no object left behind");
}

#[test]
fn different_material_on_reimport_is_refused_and_the_key_keeps_its_own() {
    let _serial = serial();
    let f = fixture();
    let key = external(&f);
    import(&f, &key, ImportAlgorithm::RsaesOaepSha1, &KNOWN).unwrap();
    f.keystore.delete_imported_material(&by_id(&key)).unwrap();
    let mut other = KNOWN;
    other[31] ^= 0x80;
    let err = import(&f, &key, ImportAlgorithm::RsaAesKeyWrapSha1, &other).unwrap_err();
    assert_eq!(err.kind(), ErrorKind::IncorrectKeyMaterial, "{err}");
    assert_eq!(key_objects(&key), 0, "the other material was not placed");
    import(&f, &key, ImportAlgorithm::RsaAesKeyWrapSha1, &KNOWN).unwrap();
    assert_known_answer(&f, &key);
}

#[test]
fn keys_generated_in_the_hsm_take_no_imported_material() {
    let _serial = serial();
    let f = fixture();
    let key = f.keystore.create_key("generated", None).unwrap();
    let err = f
        .keystore
        .import_parameters(&by_id(&key), ImportAlgorithm::RsaesOaepSha1, 3072)
        .unwrap_err();
    assert_eq!(err.kind(), ErrorKind::Unsupported, "{err}");
}

// ---- deletion, expiry ------------------------------------------------------------------------

#[test]
fn deleting_imported_material_makes_blobs_fail_until_the_same_material_returns() {
    let _serial = serial();
    let f = fixture();
    let key = external(&f);
    import(&f, &key, ImportAlgorithm::RsaesOaepSha1, &KNOWN).unwrap();
    let blob = f
        .keystore
        .wrap(&by_id(&key), b"data key", &ctx())
        .unwrap()
        .blob;
    let deleted = f.keystore.delete_imported_material(&by_id(&key)).unwrap();
    assert_eq!(deleted.state, KeyState::PendingImport);
    assert_eq!(
        key_objects(&key),
        0,
        "the material is destroyed in the token"
    );
    let err = f.keystore.unwrap(&blob, &ctx(), None).unwrap_err();
    assert_eq!(err.kind(), ErrorKind::WrongState, "{err}");
    import(&f, &key, ImportAlgorithm::RsaesOaepSha1, &KNOWN).unwrap();
    let back = f.keystore.unwrap(&blob, &ctx(), None).unwrap();
    assert_eq!(&back.plaintext[..], b"data key");
}

#[test]
fn expired_material_is_refused_then_destroyed_and_a_reimport_brings_it_back() {
    let _serial = serial();
    let f = fixture();
    let key = external(&f);
    let (p, wrapped) = wrapped_for(&f, &key, ImportAlgorithm::RsaAesKeyWrapSha1, &KNOWN);
    let valid_to = f.clock_now() + Duration::from_secs(3600);
    f.keystore
        .import_key_material(&by_id(&key), &p.import_token, &wrapped, Some(valid_to))
        .unwrap();
    let blob = f
        .keystore
        .wrap(&by_id(&key), b"data key", &ctx())
        .unwrap()
        .blob;
    f.clock.advance(Duration::from_secs(3601));
    // Refused at once, before the maintenance task runs.
    let err = f.keystore.unwrap(&blob, &ctx(), None).unwrap_err();
    assert_eq!(err.kind(), ErrorKind::WrongState, "{err}");
    let audited = Mutex::new(Vec::new());
    let expired = f
        .keystore
        .expire_material(|k| {
            audited.lock().unwrap().push(k.id.clone());
            Ok(())
        })
        .unwrap();
    assert_eq!(expired, vec![key.id.clone()]);
    assert_eq!(
        *audited.lock().unwrap(),
        vec![key.id.clone()],
        "audited first"
    );
    assert_eq!(key_objects(&key), 0, "expired material is destroyed");
    assert_eq!(
        f.keystore.resolve(&by_id(&key)).unwrap().state,
        KeyState::PendingImport
    );
    import(&f, &key, ImportAlgorithm::RsaesOaepSha1, &KNOWN).unwrap();
    assert_eq!(
        &f.keystore.unwrap(&blob, &ctx(), None).unwrap().plaintext[..],
        b"data key"
    );
}

#[test]
fn imported_keys_are_not_rotated() {
    let _serial = serial();
    let f = fixture();
    let key = external(&f);
    import(&f, &key, ImportAlgorithm::RsaesOaepSha1, &KNOWN).unwrap();
    let err = f.keystore.rotate_key(&by_id(&key)).unwrap_err();
    assert_eq!(err.kind(), ErrorKind::Unsupported, "{err}");
    let err = f
        .keystore
        .set_rotation(&by_id(&key), Some(365))
        .unwrap_err();
    assert_eq!(err.kind(), ErrorKind::Unsupported, "{err}");
}

// ---- through PKCS#11 itself ------------------------------------------------------------------

#[test]
fn imported_objects_are_sensitive_never_extractable_and_leave_no_intermediate_object() {
    let _serial = serial();
    let f = fixture();
    let session = session();
    assert_eq!(unnamed_objects(&session), 0);
    let key = external(&f);
    let (p, wrapped) = wrapped_for(&f, &key, ImportAlgorithm::RsaAesKeyWrapSha1, &KNOWN);
    f.keystore
        .import_key_material(&by_id(&key), &p.import_token, &wrapped, None)
        .unwrap();
    assert_eq!(
        unnamed_objects(&session),
        0,
        "the ephemeral AES key, the check object and the public key are gone"
    );

    let object = ObjectId::new(key.id.clone(), 1);
    let [handle] = find(&session, ObjectClass::SECRET_KEY, object.cka_id())[..] else {
        panic!("one key object");
    };
    let mut expected = vec![
        (AttributeType::Token, true),
        (AttributeType::Private, true),
        (AttributeType::Sensitive, true),
        (AttributeType::Extractable, false),
        (AttributeType::Encrypt, true),
        (AttributeType::Decrypt, true),
        (AttributeType::Wrap, false),
        (AttributeType::Unwrap, false),
    ];
    assert_eq!(flags(&session, handle), expected);
    // The value cannot be read.
    assert!(
        session
            .get_attributes(handle, &[AttributeType::Value])
            .map_or(true, |attrs| !attrs
                .iter()
                .any(|a| matches!(a, Attribute::Value(_)))),
        "CKA_VALUE of the imported key is not readable"
    );

    let [private] = find(&session, ObjectClass::PRIVATE_KEY, p.import_token.clone())[..] else {
        panic!("one wrapping key");
    };
    expected = vec![
        (AttributeType::Token, true),
        (AttributeType::Private, true),
        (AttributeType::Sensitive, true),
        (AttributeType::Extractable, false),
        (AttributeType::Decrypt, false),
        (AttributeType::Unwrap, true),
    ];
    let wrapping_flags = flags(&session, private);
    for flag in &expected {
        assert!(
            wrapping_flags.contains(flag),
            "{flag:?} in {wrapping_flags:?}"
        );
    }
    assert!(
        find(&session, ObjectClass::PUBLIC_KEY, p.import_token.clone()).is_empty(),
        "the public half is not kept"
    );
}

impl Fixture {
    fn clock_now(&self) -> SystemTime {
        wrapd::keystore::Clock::now(&*self.clock)
    }
}

// ---- through a daemon: wrapctl, gRPC, the AWS CLI + openssl -----------------------------------

mod daemon {
    use std::process::Command;

    use serde_json::Value;
    use tonic::Code;
    use wrapd::proto::{
        CreateKeyRequest, GenerateDataKeyRequest, GetParametersForImportRequest,
        ImportKeyMaterialRequest, KeyOrigin, KeyRef as KeyRefMessage, UnwrapRequest,
        WrappingAlgorithm,
    };

    use super::{KNOWN, ctx, open_locally, seal_locally};
    use crate::aws_kms_api::{aws_cli, aws_ok, b64};
    use crate::common::{DevDaemon, assert_code};

    fn wrapctl(daemon: &DevDaemon, args: &[&str]) -> Result<Value, String> {
        let out = Command::new(env!("CARGO_BIN_EXE_wrapctl"))
            .arg("--json")
            .arg("--socket")
            .arg(&daemon.socket)
            .args(args)
            .output()
            .unwrap();
        let stderr = String::from_utf8_lossy(&out.stderr).into_owned();
        assert!(!stderr.contains("panicked"), "wrapctl panicked: {stderr}");
        if out.status.success() {
            Ok(serde_json::from_slice(&out.stdout).expect("JSON output"))
        } else {
            Err(stderr)
        }
    }

    /// The daemon's log and audit log never hold the material, in any encoding.
    fn assert_material_never_logged(daemon: &DevDaemon) {
        use base64::Engine;
        let log = daemon.log();
        let audit = std::fs::read_to_string(daemon.dir().join("audit.log")).unwrap_or_default();
        for text in [&log, &audit] {
            assert!(!text.contains(&hex::encode(KNOWN)));
            assert!(!text.contains(&base64::engine::general_purpose::STANDARD.encode(KNOWN)));
        }
    }

    #[tokio::test]
    async fn wrapctl_imports_material_that_wrapd_then_uses_by_the_known_answer() {
        let daemon = DevDaemon::start();
        let created = wrapctl(
            &daemon,
            &["keys", "create", "--external", "--alias", "alias/byok"],
        )
        .unwrap();
        assert_eq!(created["state"], "PENDING_IMPORT");
        assert_eq!(created["origin"], "EXTERNAL");
        let material = daemon.dir().join("material.bin");
        std::fs::write(&material, KNOWN).unwrap();
        let path = material.to_str().unwrap();
        for algorithm in ["RSAES_OAEP_SHA_1", "RSA_AES_KEY_WRAP_SHA_1"] {
            let imported = wrapctl(
                &daemon,
                &[
                    "keys",
                    "import",
                    "alias/byok",
                    "--material",
                    path,
                    "--algorithm",
                    algorithm,
                ],
            )
            .unwrap_or_else(|e| panic!("{algorithm}: {e}"));
            assert_eq!(imported["state"], "ENABLED");
        }
        // A wrong-sized material file is refused by wrapctl before anything is sent.
        std::fs::write(&material, [0u8; 16]).unwrap();
        let err = wrapctl(
            &daemon,
            &[
                "keys",
                "import",
                "alias/byok",
                "--material",
                path,
                "--algorithm",
                "RSAES_OAEP_SHA_1",
            ],
        )
        .unwrap_err();
        assert!(err.contains("32 raw bytes"), "{err}");

        let mut data = daemon.data().await;
        let generated = data
            .generate_data_key(GenerateDataKeyRequest {
                key_id: "alias/byok".into(),
                encryption_context: crate::common::ctx(&[("tenant", "acme")]),
                number_of_bytes: 32,
            })
            .await
            .unwrap()
            .into_inner();
        assert_eq!(
            open_locally(&KNOWN, &generated.ciphertext_blob, &ctx()).as_deref(),
            Some(&generated.plaintext[..]),
            "the blob opens with the imported key"
        );
        let key_id = wrapd::ids::KeyId::parse(&generated.key_id).unwrap();
        let local = seal_locally(&KNOWN, &key_id, b"from the ceremony", &ctx());
        let unwrapped = data
            .unwrap(UnwrapRequest {
                ciphertext_blob: local,
                encryption_context: crate::common::ctx(&[("tenant", "acme")]),
                key_id: String::new(),
            })
            .await
            .unwrap()
            .into_inner();
        assert_eq!(unwrapped.plaintext, b"from the ceremony");

        let deleted = wrapctl(&daemon, &["keys", "delete-material", "alias/byok"]).unwrap();
        assert_eq!(deleted["state"], "PENDING_IMPORT");
        let audit = daemon.audit_lines();
        for op in [
            "GetParametersForImport",
            "ImportKeyMaterial",
            "DeleteImportedKeyMaterial",
        ] {
            assert!(
                audit.iter().any(|r| r.operation == op
                    && r.outcome == "OK"
                    && r.key_id.as_deref() == Some(generated.key_id.as_str())),
                "an audit line for {op}"
            );
        }
        assert_material_never_logged(&daemon);
    }

    #[tokio::test]
    async fn refused_imports_have_their_grpc_codes() {
        let daemon = DevDaemon::start();
        let mut keys = daemon.keys().await;
        let create = |origin: KeyOrigin| CreateKeyRequest {
            description: "byok".into(),
            origin: origin as i32,
            ..Default::default()
        };
        let external = keys
            .create_key(create(KeyOrigin::External))
            .await
            .unwrap()
            .into_inner();
        let generated = keys
            .create_key(create(KeyOrigin::Hsm))
            .await
            .unwrap()
            .into_inner();
        let parameters =
            |key_id: &str, algorithm: WrappingAlgorithm| GetParametersForImportRequest {
                key_id: key_id.to_owned(),
                wrapping_algorithm: algorithm as i32,
                wrapping_key_bits: 3072,
            };
        assert_code(
            keys.get_parameters_for_import(parameters(
                &generated.key_id,
                WrappingAlgorithm::RsaesOaepSha1,
            ))
            .await,
            Code::FailedPrecondition,
        );
        assert_code(
            keys.get_parameters_for_import(parameters(
                &external.key_id,
                WrappingAlgorithm::Unspecified,
            ))
            .await,
            Code::InvalidArgument,
        );
        let mut bad_bits = parameters(&external.key_id, WrappingAlgorithm::RsaesOaepSha1);
        bad_bits.wrapping_key_bits = 2048;
        assert_code(
            keys.get_parameters_for_import(bad_bits).await,
            Code::InvalidArgument,
        );
        let p = keys
            .get_parameters_for_import(parameters(
                &external.key_id,
                WrappingAlgorithm::RsaesOaepSha1,
            ))
            .await
            .unwrap()
            .into_inner();
        let wrapped = wrapd::key_import::wrap_key_material(
            &p.public_key,
            wrapd::hsm::ImportAlgorithm::RsaesOaepSha1,
            &KNOWN,
        )
        .unwrap();
        let import = |token: Vec<u8>, material: Vec<u8>| ImportKeyMaterialRequest {
            key_id: external.key_id.clone(),
            import_token: token,
            encrypted_key_material: material,
            valid_to: None,
        };
        assert_code(
            keys.import_key_material(import(b"forged".to_vec(), wrapped.clone()))
                .await,
            Code::InvalidArgument,
        );
        let mut tampered = wrapped.clone();
        tampered[5] ^= 1;
        assert_code(
            keys.import_key_material(import(p.import_token.clone(), tampered))
                .await,
            Code::InvalidArgument,
        );
        let key = keys
            .describe_key(KeyRefMessage {
                key_id: external.key_id.clone(),
            })
            .await
            .unwrap()
            .into_inner();
        assert_eq!(key.state, wrapd::proto::KeyState::PendingImport as i32);
        assert!(!key.versions[0].available, "no material yet");
        // Data-plane calls on a key pending import: FAILED_PRECONDITION.
        let mut data = daemon.data().await;
        assert_code(
            data.generate_data_key(GenerateDataKeyRequest {
                key_id: external.key_id.clone(),
                ..Default::default()
            })
            .await,
            Code::FailedPrecondition,
        );
        keys.import_key_material(import(p.import_token.clone(), wrapped))
            .await
            .unwrap();
        assert_material_never_logged(&daemon);
    }

    /// AWS's documented flow: the distribution's AWS CLI for the API calls, openssl for the
    /// wrapping (`pkeyutl` RSA-OAEP, `enc -id-aes256-wrap-pad` for RFC 5649).
    #[test]
    fn the_aws_cli_and_openssl_import_material_as_aws_documents() {
        let daemon = DevDaemon::start();
        let dir = daemon.dir().join("byok");
        std::fs::create_dir_all(&dir).unwrap();
        let file = |name: &str| dir.join(name);
        let fileb = |name: &str| format!("fileb://{}", dir.join(name).display());
        let (encrypted, token) = (fileb("encrypted.bin"), fileb("token.bin"));
        let import_args = |arn: &str| {
            [
                "import-key-material",
                "--key-id",
                arn,
                "--encrypted-key-material",
                &encrypted,
                "--import-token",
                &token,
                "--expiration-model",
                "KEY_MATERIAL_DOES_NOT_EXPIRE",
            ]
            .map(str::to_owned)
        };
        std::fs::write(file("material.bin"), KNOWN).unwrap();
        let openssl = |args: &[&str]| {
            let out = Command::new("openssl")
                .current_dir(&dir)
                .args(args)
                .output()
                .unwrap();
            assert!(
                out.status.success(),
                "openssl {args:?}: {}",
                String::from_utf8_lossy(&out.stderr)
            );
        };
        let rsa_encrypt = |input: &str, output: &str| {
            openssl(&[
                "pkeyutl",
                "-encrypt",
                "-in",
                input,
                "-out",
                output,
                "-inkey",
                "public.der",
                "-keyform",
                "DER",
                "-pubin",
                "-pkeyopt",
                "rsa_padding_mode:oaep",
                "-pkeyopt",
                "rsa_oaep_md:sha1",
                "-pkeyopt",
                "rsa_mgf1_md:sha1",
            ]);
        };
        for algorithm in ["RSAES_OAEP_SHA_1", "RSA_AES_KEY_WRAP_SHA_1"] {
            let key =
                aws_ok(&daemon, &["create-key", "--origin", "EXTERNAL"])["KeyMetadata"].clone();
            assert_eq!(key["Origin"], "EXTERNAL");
            assert_eq!(key["KeyState"], "PendingImport");
            let arn = key["Arn"].as_str().unwrap().to_owned();
            let p = aws_ok(
                &daemon,
                &[
                    "get-parameters-for-import",
                    "--key-id",
                    &arn,
                    "--wrapping-algorithm",
                    algorithm,
                    "--wrapping-key-spec",
                    "RSA_3072",
                ],
            );
            std::fs::write(file("public.der"), b64(&p["PublicKey"])).unwrap();
            std::fs::write(file("token.bin"), b64(&p["ImportToken"])).unwrap();
            if algorithm == "RSAES_OAEP_SHA_1" {
                rsa_encrypt("material.bin", "encrypted.bin");
            } else {
                openssl(&["rand", "-out", "aes.bin", "32"]);
                let aes = hex::encode(std::fs::read(file("aes.bin")).unwrap());
                openssl(&[
                    "enc",
                    "-id-aes256-wrap-pad",
                    "-K",
                    &aes,
                    "-iv",
                    "A65959A6",
                    "-in",
                    "material.bin",
                    "-out",
                    "wrapped.bin",
                ]);
                rsa_encrypt("aes.bin", "aes.enc");
                let mut joined = std::fs::read(file("aes.enc")).unwrap();
                joined.extend(std::fs::read(file("wrapped.bin")).unwrap());
                std::fs::write(file("encrypted.bin"), joined).unwrap();
            }
            aws_ok(&daemon, &import_args(&arn));
            let described =
                aws_ok(&daemon, &["describe-key", "--key-id", &arn])["KeyMetadata"].clone();
            assert_eq!(described["KeyState"], "Enabled", "{algorithm}");
            assert_eq!(described["ExpirationModel"], "KEY_MATERIAL_DOES_NOT_EXPIRE");
            std::fs::write(file("plain.bin"), b"sixteen byte dek").unwrap();
            let encrypted = aws_ok(
                &daemon,
                &[
                    "encrypt",
                    "--key-id",
                    &arn,
                    "--plaintext",
                    &fileb("plain.bin"),
                ],
            );
            assert_eq!(
                open_locally(
                    &KNOWN,
                    &b64(&encrypted["CiphertextBlob"]),
                    &Default::default()
                )
                .as_deref(),
                Some(&b"sixteen byte dek"[..]),
                "{algorithm}: the blob opens with the known key"
            );
            std::fs::write(file("blob.bin"), b64(&encrypted["CiphertextBlob"])).unwrap();
            aws_ok(&daemon, &["delete-imported-key-material", "--key-id", &arn]);
            let err = aws_cli(
                &daemon,
                &["decrypt", "--ciphertext-blob", &fileb("blob.bin")],
            )
            .unwrap_err();
            assert!(err.contains("KMSInvalidStateException"), "{err}");
            // The same material again brings the blob back; the import token still holds.
            aws_ok(&daemon, &import_args(&arn));
            let decrypted = aws_ok(
                &daemon,
                &["decrypt", "--ciphertext-blob", &fileb("blob.bin")],
            );
            assert_eq!(b64(&decrypted["Plaintext"]), b"sixteen byte dek");
        }
        // Errors by AWS's names: an import token of another key, a generated key.
        let other = aws_ok(&daemon, &["create-key", "--origin", "EXTERNAL"])["KeyMetadata"]["Arn"]
            .as_str()
            .unwrap()
            .to_owned();
        let err = aws_cli(&daemon, &import_args(&other)).unwrap_err();
        assert!(err.contains("InvalidImportTokenException"), "{err}");
        let generated = aws_ok(&daemon, &["create-key"])["KeyMetadata"]["Arn"]
            .as_str()
            .unwrap()
            .to_owned();
        let err = aws_cli(
            &daemon,
            &[
                "get-parameters-for-import",
                "--key-id",
                &generated,
                "--wrapping-algorithm",
                "RSAES_OAEP_SHA_1",
                "--wrapping-key-spec",
                "RSA_3072",
            ],
        )
        .unwrap_err();
        assert!(err.contains("UnsupportedOperationException"), "{err}");
    }
}

#[test]
fn a_key_has_a_bounded_number_of_unexpired_import_tokens() {
    let _serial = serial();
    let f = fixture();
    let key = external(&f);
    for _ in 0..wrapd::keystore::MAX_IMPORT_TOKENS_PER_KEY {
        params(&f, &key, ImportAlgorithm::RsaesOaepSha1);
    }
    let err = f
        .keystore
        .import_parameters(&by_id(&key), ImportAlgorithm::RsaesOaepSha1, 3072)
        .unwrap_err();
    assert_eq!(err.kind(), ErrorKind::LimitReached, "{err}");
    // Once they expire (and are purged), the key may have new ones.
    f.clock.advance(Duration::from_secs(24 * 3600 + 1));
    assert!(
        f.keystore.purge_wrapping_keys().unwrap() >= wrapd::keystore::MAX_IMPORT_TOKENS_PER_KEY
    );
    params(&f, &key, ImportAlgorithm::RsaesOaepSha1);
}

#[test]
fn unwraps_go_on_while_a_4096_bit_wrapping_key_is_generated() {
    let _serial = serial();
    let f = Arc::new(fixture());
    let key = external(&f);
    import(&f, &key, ImportAlgorithm::RsaesOaepSha1, &KNOWN).unwrap();
    let blob = f
        .keystore
        .wrap(&by_id(&key), &[7u8; 32], &ctx())
        .unwrap()
        .blob;
    let generating = {
        let (f, key) = (f.clone(), key.clone());
        std::thread::spawn(move || {
            f.keystore
                .import_parameters(&by_id(&key), ImportAlgorithm::RsaesOaepSha1, 4096)
                .unwrap()
        })
    };
    // Unwraps keep completing while the generation runs: the longest wait between two of
    // them is a small part of the generation. (Before, it held the token exclusively: one
    // wait was the whole generation.)
    let started = std::time::Instant::now();
    let mut last = started;
    let mut longest_wait = Duration::ZERO;
    while !generating.is_finished() {
        f.keystore.unwrap(&blob, &ctx(), None).unwrap();
        let now = std::time::Instant::now();
        longest_wait = longest_wait.max(now - last);
        last = now;
    }
    let parameters = generating.join().unwrap();
    let generation = started.elapsed();
    assert!(!parameters.public_key.is_empty());
    assert!(
        longest_wait < generation / 2,
        "an unwrap waited {longest_wait:?} of the generation's {generation:?}"
    );
}

// ---- the metadata store's writer cannot destroy material ----------------------------------

/// A second handle on the fixture's metadata store, as someone who edits it behind wrapd.
fn writer(f: &Fixture) -> SqliteStore {
    SqliteStore::open(&f._dir.path().join("meta.db")).unwrap()
}

const OTHER: [u8; 32] = [0x55; 32];

/// The fixture with its key store opened again on what the store holds now (after a
/// writer's edit, say).
fn reopened(f: Fixture) -> Fixture {
    let keystore = Keystore::open(
        token(),
        Arc::new(writer(&f)),
        f.clock.clone(),
        KeystoreConfig::default(),
    )
    .unwrap();
    Fixture { keystore, ..f }
}

#[test]
fn an_import_over_unrecorded_material_is_refused_and_destroys_nothing() {
    use wrapd::keystore::MetadataStore;
    let _serial = serial();
    let f = fixture();
    let key = external(&f);
    import(&f, &key, ImportAlgorithm::RsaesOaepSha1, &KNOWN).unwrap();
    let blob = f
        .keystore
        .wrap(&by_id(&key), b"sixteen byte dek", &ctx())
        .unwrap()
        .blob;
    // A metadata backup from before the import, restored: the row records no material.
    let restored = writer(&f);
    let mut row = restored.key(&key.id).unwrap().unwrap();
    row.material = None;
    restored.delete_key(&key.id, SystemTime::now()).unwrap();
    row.state = KeyState::PendingImport;
    restored.create_key(&row, None).unwrap();
    let f = reopened(f);
    let err = import(&f, &key, ImportAlgorithm::RsaesOaepSha1, &OTHER).unwrap_err();
    assert_eq!(err.kind(), ErrorKind::IncorrectKeyMaterial, "{err}");
    assert_eq!(key_objects(&key), 1);
    // The material imported before still works, and the blob with it.
    import(&f, &key, ImportAlgorithm::RsaesOaepSha1, &KNOWN).unwrap();
    let unwrapped = f.keystore.unwrap(&blob, &ctx(), None).unwrap();
    assert_eq!(&unwrapped.plaintext[..], b"sixteen byte dek");
}

#[test]
fn two_keystores_importing_into_one_key_keep_the_first_material() {
    let _serial = serial();
    let f = fixture();
    let key = external(&f);
    // A second daemon on the same store and token, whose view has the key pending import.
    let other = Keystore::open(
        token(),
        Arc::new(writer(&f)),
        f.clock.clone(),
        KeystoreConfig::default(),
    )
    .unwrap();
    import(&f, &key, ImportAlgorithm::RsaesOaepSha1, &KNOWN).unwrap();
    let blob = f
        .keystore
        .wrap(&by_id(&key), b"sixteen byte dek", &ctx())
        .unwrap()
        .blob;
    let (p, wrapped) = wrapped_for(&f, &key, ImportAlgorithm::RsaesOaepSha1, &OTHER);
    let err = other
        .import_key_material(&by_id(&key), &p.import_token, &wrapped, None)
        .unwrap_err();
    assert_eq!(err.kind(), ErrorKind::IncorrectKeyMaterial, "{err}");
    assert_known_answer(&f, &key);
    let unwrapped = f.keystore.unwrap(&blob, &ctx(), None).unwrap();
    assert_eq!(&unwrapped.plaintext[..], b"sixteen byte dek");
}

#[test]
fn an_expiry_moved_earlier_in_the_store_destroys_nothing() {
    use wrapd::keystore::MetadataStore;
    let _serial = serial();
    let f = fixture();
    let key = external(&f);
    let (p, wrapped) = wrapped_for(&f, &key, ImportAlgorithm::RsaesOaepSha1, &KNOWN);
    let valid_to = SystemTime::now() + Duration::from_secs(30 * 86_400);
    f.keystore
        .import_key_material(&by_id(&key), &p.import_token, &wrapped, Some(valid_to))
        .unwrap();
    let store = writer(&f);
    let row = store.key(&key.id).unwrap().unwrap();
    let mut material = row.material.unwrap();
    material.valid_to = Some(SystemTime::now() - Duration::from_secs(60));
    store
        .set_material(
            &key.id,
            Some(&material.check_value),
            KeyState::Enabled,
            &material,
        )
        .unwrap();
    f.clock.advance(Duration::from_secs(3600));
    assert!(f.keystore.expire_material(|_| Ok(())).unwrap().is_empty());
    assert_eq!(key_objects(&key), 1);
    // The expiry that was imported still holds.
    f.clock.advance(Duration::from_secs(31 * 86_400));
    assert!(
        f.keystore
            .expire_material(|_| Ok(()))
            .unwrap()
            .contains(&key.id)
    );
    assert_eq!(key_objects(&key), 0);
}

#[test]
fn a_generated_key_passed_off_as_imported_in_the_store_is_not_destroyed() {
    use wrapd::keystore::{ImportedMaterial, MetadataStore};
    let _serial = serial();
    let f = fixture();
    let generated = f
        .keystore
        .create_key_from("generated", None, &Default::default(), KeyOrigin::Hsm)
        .unwrap();
    // The writer records made-up imported material for it.
    writer(&f)
        .set_material(
            &generated.id,
            None,
            KeyState::Enabled,
            &ImportedMaterial {
                check_value: [0x42; 16],
                present: true,
                valid_to: None,
            },
        )
        .unwrap();
    let f = reopened(f);
    assert!(
        f.keystore
            .delete_imported_material(&by_id(&generated))
            .is_err()
    );
    assert_eq!(key_objects(&generated), 1, "nothing destroyed");
}

#[test]
fn a_version_added_in_the_store_takes_no_imported_material() {
    use wrapd::keystore::{MetadataStore, VersionRecord};
    let _serial = serial();
    let f = fixture();
    let key = external(&f);
    import(&f, &key, ImportAlgorithm::RsaesOaepSha1, &KNOWN).unwrap();
    let blob = f
        .keystore
        .wrap(&by_id(&key), b"sixteen byte dek", &ctx())
        .unwrap()
        .blob;
    // The writer makes the key look as if it had no material and a second version, so
    // that an import would place known material under a version new wraps would use.
    let store = writer(&f);
    let original = store.key(&key.id).unwrap().unwrap();
    let mut row = original.clone();
    row.material = None;
    row.state = KeyState::PendingImport;
    store.delete_key(&key.id, SystemTime::now()).unwrap();
    store.create_key(&row, None).unwrap();
    store
        .add_version(&key.id, &VersionRecord::new(2, SystemTime::now(), false))
        .unwrap();
    let f = reopened(f);
    let err = import(&f, &key, ImportAlgorithm::RsaesOaepSha1, &OTHER).unwrap_err();
    assert_eq!(err.kind(), ErrorKind::WrongState, "{err}");
    assert_eq!(key_objects(&key), 1);
    // The row put back as wrapd wrote it, the key and its blob work as before.
    store.delete_key(&key.id, SystemTime::now()).unwrap();
    store.create_key(&original, None).unwrap();
    let f = reopened(f);
    let unwrapped = f.keystore.unwrap(&blob, &ctx(), None).unwrap();
    assert_eq!(&unwrapped.plaintext[..], b"sixteen byte dek");
}

#[test]
fn a_disabled_key_made_pending_import_in_the_store_stays_disabled_after_a_reimport() {
    use wrapd::keystore::MetadataStore;
    let _serial = serial();
    let f = fixture();
    let key = external(&f);
    import(&f, &key, ImportAlgorithm::RsaesOaepSha1, &KNOWN).unwrap();
    f.keystore.disable_key(&by_id(&key)).unwrap();
    writer(&f)
        .set_state(&key.id, KeyState::PendingImport, None)
        .unwrap();
    let f = reopened(f);
    // A routine re-import of the same material (to change its expiry, say) succeeds...
    import(&f, &key, ImportAlgorithm::RsaesOaepSha1, &KNOWN).unwrap();
    // ...and the key stays disabled: only EnableKey enables it.
    let refused = f.keystore.wrap(&by_id(&key), b"sixteen byte dek", &ctx());
    assert_eq!(refused.unwrap_err().kind(), ErrorKind::Disabled);
    f.keystore.enable_key(&by_id(&key)).unwrap();
    f.keystore
        .wrap(&by_id(&key), b"sixteen byte dek", &ctx())
        .unwrap();
}
