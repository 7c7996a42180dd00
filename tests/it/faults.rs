//! Token faults against a real SoftHSM token, through a fault-injecting hook in the PKCS#11
//! adapter: invalid sessions are replaced, device errors re-initialize the context, callers
//! beyond the session cap wait and then get UNAVAILABLE, and service resumes by itself.
//!
//! The test runs in a child process of the test binary (`common::run_isolated`): it points
//! SoftHSM at a token of its own through `SOFTHSM2_CONF` and re-initializes PKCS#11.

use std::sync::Arc;
use std::time::{Duration, SystemTime};

use wrapd::config::Config;
use wrapd::context::EncryptionContext;
use wrapd::hsm::{Fault, Pkcs11Token};
use wrapd::ids::KeyRef;
use wrapd::keystore::{Keystore, KeystoreConfig, ManualClock, SqliteStore};

use crate::common;

#[test]
fn the_daemon_core_rides_out_token_faults() {
    common::run_isolated("faults::isolated_token_faults", &[]);
}

#[test]
#[ignore = "runs in its own process: see the_daemon_core_rides_out_token_faults"]
#[allow(unsafe_code)] // sets SOFTHSM2_CONF before SoftHSM loads; see the SAFETY comment
fn isolated_token_faults() {
    if !common::isolated() {
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let setup = wrapd::dev::prepare(dir.path()).unwrap();
    let mut config = Config::load(&setup.config).unwrap();
    // SAFETY: the only test in this process, before SoftHSM is loaded.
    unsafe { std::env::set_var("SOFTHSM2_CONF", config.softhsm2_conf.as_ref().unwrap()) };
    wrapd::dev::provision(&setup, &config).unwrap();
    config.hsm.max_sessions = 2;
    config.hsm.session_wait = Duration::from_millis(300);
    let token = Arc::new(Pkcs11Token::open(config.hsm).unwrap());
    let keystore = Arc::new(
        Keystore::open(
            token.clone(),
            Arc::new(SqliteStore::open(&dir.path().join("meta.db")).unwrap()),
            Arc::new(ManualClock::new(SystemTime::now())),
            KeystoreConfig::default(),
        )
        .unwrap(),
    );
    let ctx = EncryptionContext::default();
    let key = KeyRef::Id(keystore.create_key("faults", None).unwrap().id.clone());
    let blob = keystore.wrap(&key, b"survivor", &ctx).unwrap().blob;
    let unwraps = |keystore: &Keystore| {
        keystore
            .unwrap(&blob, &ctx, None)
            .map(|u| u.plaintext.to_vec())
    };
    assert_eq!(token.contexts_initialized(), 1);

    // A session that became invalid is dropped; the call is retried on a fresh one.
    token.inject(Fault::SessionInvalid, 1);
    assert_eq!(unwraps(&keystore).unwrap(), b"survivor");
    assert_eq!(
        token.contexts_initialized(),
        1,
        "a session fault does not re-initialize"
    );

    // A device error retires the context; the retry runs on a new one.
    token.inject(Fault::DeviceError, 1);
    assert_eq!(unwraps(&keystore).unwrap(), b"survivor");
    assert_eq!(token.contexts_initialized(), 2, "re-initialized once");

    // Faults that outlast the retry: UNAVAILABLE (callers may retry), then service resumes.
    token.inject(Fault::DeviceError, 2);
    let err = unwraps(&keystore).unwrap_err();
    assert_eq!(err.kind(), wrapd::error::ErrorKind::Unavailable, "{err}");
    assert!(!err.to_string().contains("survivor"));
    assert_eq!(unwraps(&keystore).unwrap(), b"survivor");
    token.inject(Fault::SessionInvalid, 2);
    assert_eq!(
        keystore.wrap(&key, b"x", &ctx).unwrap_err().kind(),
        wrapd::error::ErrorKind::Unavailable
    );
    keystore.wrap(&key, b"x", &ctx).unwrap();

    // The session cap: two calls hold both sessions; a third waits, then gets UNAVAILABLE.
    token.inject(Fault::Stall(Duration::from_millis(1500)), 2);
    let slow: Vec<_> = (0..2)
        .map(|_| {
            let keystore = keystore.clone();
            let key = key.clone();
            std::thread::spawn(move || keystore.wrap(&key, b"slow", &EncryptionContext::default()))
        })
        .collect();
    std::thread::sleep(Duration::from_millis(200));
    let waited = keystore.wrap(&key, b"fast", &ctx).unwrap_err();
    assert_eq!(waited.kind(), wrapd::error::ErrorKind::Unavailable);
    assert!(waited.to_string().contains("busy"), "{waited}");
    for call in slow {
        call.join().unwrap().expect("the stalled calls complete");
    }
    keystore.wrap(&key, b"fast", &ctx).unwrap();

    // Key creation under a device fault is not retried blindly (it is not idempotent), and
    // leaves nothing half-made: no metadata without its object.
    token.inject(Fault::DeviceError, 1);
    assert_eq!(
        keystore
            .create_key("during a fault", None)
            .unwrap_err()
            .kind(),
        wrapd::error::ErrorKind::Unavailable
    );
    let report = keystore.reconcile().unwrap();
    assert!(report.missing.is_empty(), "{report:?}");
    assert_eq!(unwraps(&keystore).unwrap(), b"survivor");
}
