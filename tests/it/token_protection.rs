//! The master keys are really protected: checked through PKCS#11 itself, outside the daemon.
//!
//! The PKCS#11 part runs in a child process of the test binary (`common::run_isolated`): it
//! points SoftHSM at the daemon's token through `SOFTHSM2_CONF`.

use crate::common;

use common::{DevDaemon, create_key};
use cryptoki::context::{CInitializeArgs, CInitializeFlags, Pkcs11};
use cryptoki::mechanism::Mechanism;
use cryptoki::object::{Attribute, AttributeType, KeyType, ObjectClass};
use cryptoki::session::UserType;
use cryptoki::types::AuthPin;
use wrapd::proto::KeyRef;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn key_objects_are_sensitive_and_never_extractable() {
    let mut daemon = DevDaemon::start();
    let mut keys = daemon.keys().await;
    let key = create_key(&mut keys, "").await;
    keys.rotate_key(KeyRef {
        key_id: key.key_id.clone(),
    })
    .await
    .unwrap();
    drop(keys);
    assert!(daemon.stop().success());
    common::run_isolated(
        "token_protection::isolated_inspection",
        &[
            ("WRAPD_TEST_STATE_DIR", &daemon.dir().display().to_string()),
            ("WRAPD_TEST_KEY_ID", &key.key_id),
        ],
    );
}

#[test]
#[ignore = "runs in its own process: see key_objects_are_sensitive_and_never_extractable"]
#[allow(unsafe_code)] // sets SOFTHSM2_CONF before SoftHSM loads; see the SAFETY comment
fn isolated_inspection() {
    if !common::isolated() {
        return;
    }
    let dir = std::path::PathBuf::from(std::env::var("WRAPD_TEST_STATE_DIR").unwrap());
    let key_id = std::env::var("WRAPD_TEST_KEY_ID").unwrap();
    // SAFETY: the only test in this process; no other thread reads the environment now.
    unsafe { std::env::set_var("SOFTHSM2_CONF", dir.join("softhsm2.conf")) };
    let module = wrapd::dev::find_softhsm_module().unwrap();
    let pkcs11 = Pkcs11::new(module).unwrap();
    pkcs11
        .initialize(CInitializeArgs::new(CInitializeFlags::OS_LOCKING_OK))
        .unwrap();
    let slot = pkcs11
        .get_slots_with_token()
        .unwrap()
        .into_iter()
        .find(|s| pkcs11.get_token_info(*s).unwrap().label() == wrapd::dev::DEV_TOKEN_LABEL)
        .expect("dev token");
    let session = pkcs11.open_rw_session(slot).unwrap();
    let pin = std::fs::read_to_string(dir.join("pin")).unwrap();
    session
        .login(UserType::User, Some(&AuthPin::from(pin.trim().to_owned())))
        .unwrap();

    for version in [1, 2] {
        let id = format!("{key_id}:{version}");
        let handles = session
            .find_objects(&[
                Attribute::Class(ObjectClass::SECRET_KEY),
                Attribute::Id(id.clone().into_bytes()),
            ])
            .unwrap();
        assert_eq!(handles.len(), 1, "one object for {id}");
        let handle = handles[0];

        // CKA_VALUE cannot be read.
        let info = session
            .get_attribute_info(handle, &[AttributeType::Value])
            .unwrap();
        assert!(
            matches!(info[0], cryptoki::object::AttributeInfo::Sensitive),
            "CKA_VALUE must be sensitive, got {:?}",
            info[0]
        );
        let values = session
            .get_attributes(handle, &[AttributeType::Value])
            .unwrap();
        assert!(
            !values.iter().any(|a| matches!(a, Attribute::Value(_))),
            "CKA_VALUE was returned"
        );

        let attributes = session
            .get_attributes(
                handle,
                &[
                    AttributeType::Sensitive,
                    AttributeType::Extractable,
                    AttributeType::AlwaysSensitive,
                    AttributeType::NeverExtractable,
                    AttributeType::Token,
                    AttributeType::Private,
                    AttributeType::KeyType,
                    AttributeType::ValueLen,
                    AttributeType::Wrap,
                    AttributeType::Encrypt,
                ],
            )
            .unwrap();
        let mut checked = 0;
        for attribute in attributes {
            match attribute {
                Attribute::Sensitive(v) => assert!(v, "CKA_SENSITIVE"),
                Attribute::Extractable(v) => assert!(!v, "CKA_EXTRACTABLE"),
                Attribute::AlwaysSensitive(v) => assert!(v, "CKA_ALWAYS_SENSITIVE"),
                Attribute::NeverExtractable(v) => assert!(v, "CKA_NEVER_EXTRACTABLE"),
                Attribute::Token(v) => assert!(v, "CKA_TOKEN"),
                Attribute::Private(v) => assert!(v, "CKA_PRIVATE"),
                Attribute::KeyType(t) => assert_eq!(t, KeyType::AES),
                Attribute::ValueLen(len) => assert_eq!(u64::from(len), 32),
                Attribute::Wrap(v) => assert!(!v, "CKA_WRAP"),
                Attribute::Encrypt(v) => assert!(v, "CKA_ENCRYPT"),
                other => panic!("unexpected attribute {other:?}"),
            }
            checked += 1;
        }
        assert_eq!(checked, 10);

        // Nor can it be wrapped out under another key: it is not extractable.
        let wrapping = session
            .generate_key(
                &Mechanism::AesKeyGen,
                &[
                    Attribute::Class(ObjectClass::SECRET_KEY),
                    Attribute::KeyType(KeyType::AES),
                    Attribute::ValueLen(32.into()),
                    Attribute::Token(false),
                    Attribute::Wrap(true),
                ],
            )
            .unwrap();
        assert!(
            session
                .wrap_key(&Mechanism::AesKeyWrapPad, wrapping, handle)
                .is_err(),
            "C_WrapKey of a master key must fail"
        );
    }
}
