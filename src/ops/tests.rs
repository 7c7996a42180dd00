//! The operation layer in process: authorization per item and per end, refusals and their
//! audit lines, reserved context keys.

use super::*;
use crate::auth::{Identity, Policy, PolicyHandle, Transport};
use crate::error::ErrorKind;
use crate::hsm::memory::MemoryToken;
use crate::keystore::{KeystoreConfig, SqliteStore, SystemClock};

/// Operations over an in-memory token with `policy`, and a call maker for `unix:uid=7`.
fn ops(policy: &str) -> Ops {
    let keystore = Keystore::open(
        Arc::new(MemoryToken::default()),
        Arc::new(SqliteStore::in_memory().unwrap()),
        Arc::new(SystemClock),
        KeystoreConfig::default(),
    )
    .unwrap();
    let policy = PolicyHandle::fixed(Policy::parse(policy).unwrap());
    Ops::new(
        Arc::new(keystore),
        Arc::new(Gate::new(Arc::new(policy), None)),
    )
}

fn call(op: Operation) -> Call {
    let identity = Identity {
        principals: vec!["unix:uid=7".to_owned()].into(),
        transport: Transport::Unix,
        peer: "pid=1".into(),
        access_key: None,
    };
    Call::new(Ok(identity), op, None, None)
}

const ADMIN: &str =
    "[[grant]]\nprincipals = [\"unix:uid=7\"]\noperations = [\"all\"]\nkeys = [\"*\"]\n";

#[tokio::test]
async fn each_item_of_a_batch_is_authorized_on_its_own_key() {
    let admin = ops(ADMIN);
    let mut blobs = Vec::new();
    for alias in ["alias/mine", "alias/theirs"] {
        admin
            .create_key(
                call(Operation::CreateKey),
                String::new(),
                alias.into(),
                Default::default(),
                KeyOrigin::Hsm,
            )
            .await
            .unwrap();
        let generated = admin
            .generate_data_key(
                call(Operation::GenerateDataKey),
                alias.into(),
                HashMap::new(),
                32,
            )
            .await
            .unwrap();
        blobs.push(generated.wrapped.blob);
    }
    // The same key store, a policy that grants Unwrap on alias/mine only.
    let limited = Ops::new(
        admin.keystore().clone(),
        Arc::new(Gate::new(
            Arc::new(PolicyHandle::fixed(
                Policy::parse(
                    "[[grant]]\nprincipals = [\"unix:uid=7\"]\noperations = [\"Unwrap\"]\nkeys = [\"alias/mine\"]\n",
                )
                .unwrap(),
            )),
            None,
        )),
    );
    let items = blobs
        .into_iter()
        .map(|b| (b, HashMap::new(), String::new()))
        .collect();
    let results = limited
        .batch_unwrap(&call(Operation::Unwrap), items)
        .await
        .unwrap();
    assert!(results[0].is_ok());
    assert_eq!(
        results[1].as_ref().unwrap_err().kind(),
        ErrorKind::PermissionDenied
    );
}

/// Operations with `policy` over an in-memory token and an audit log in `dir`.
fn audited_ops(policy: &str, dir: &std::path::Path) -> Ops {
    let plain = ops(ADMIN);
    let audit = Arc::new(
        crate::audit::AuditLog::open(&dir.join("audit.log"), crate::audit::FsyncPolicy::Never)
            .unwrap(),
    );
    let policy = PolicyHandle::fixed(Policy::parse(policy).unwrap());
    Ops::new(
        plain.keystore().clone(),
        Arc::new(Gate::new(Arc::new(policy), Some(audit))),
    )
}

fn audit_lines(dir: &std::path::Path) -> Vec<serde_json::Value> {
    std::fs::read_to_string(dir.join("audit.log"))
        .unwrap()
        .lines()
        .map(|line| serde_json::from_str(line).unwrap())
        .collect()
}

#[tokio::test]
async fn a_batch_from_a_caller_with_no_grant_is_refused_with_one_audit_line() {
    let dir = tempfile::tempdir().unwrap();
    let ops = audited_ops("", dir.path());
    let items = (0..MAX_BATCH)
        .map(|i| (vec![i as u8; 80], HashMap::new(), String::new()))
        .collect();
    let err = ops
        .batch_unwrap(&call(Operation::Unwrap), items)
        .await
        .unwrap_err();
    assert_eq!(err.kind(), ErrorKind::PermissionDenied);
    let lines = audit_lines(dir.path());
    assert_eq!(lines.len(), 1, "{lines:#?}");
    assert_eq!(lines[0]["outcome"], "PERMISSION_DENIED");
}

#[tokio::test]
async fn unauthenticated_refusals_beyond_the_budget_are_summarized_not_lined() {
    let dir = tempfile::tempdir().unwrap();
    let ops = audited_ops(ADMIN, dir.path());
    let long_reason = "x".repeat(64 * 1024);
    for _ in 0..(refusals::LINES_PER_WINDOW + 50) {
        let refusal = crate::auth::Refusal::from(long_reason.clone());
        let call = Call::new(Err(refusal), Operation::ListKeys, None, None);
        let err = ops
            .reject(call, Error::Unauthenticated(long_reason.clone()))
            .await;
        assert_eq!(err.kind(), ErrorKind::Unauthenticated);
    }
    let lines = audit_lines(dir.path());
    assert_eq!(lines.len(), refusals::LINES_PER_WINDOW as usize);
    for line in &lines {
        let message = line["error"].as_str().unwrap();
        assert!(message.len() <= MAX_AUDIT_MESSAGE, "{}", message.len());
        assert!(message.ends_with('…'));
    }
}

#[tokio::test]
async fn reserved_context_keys_are_refused_on_every_data_plane_call() {
    let ops = ops(ADMIN);
    let key = ops
        .create_key(
            call(Operation::CreateKey),
            String::new(),
            "alias/k".into(),
            Default::default(),
            KeyOrigin::Hsm,
        )
        .await
        .unwrap();
    let reserved = HashMap::from([("wrapd:purpose".to_owned(), "x".to_owned())]);
    let err = ops
        .generate_data_key(
            call(Operation::GenerateDataKey),
            "alias/k".into(),
            reserved.clone(),
            0,
        )
        .await
        .unwrap_err();
    assert_eq!(err.kind(), ErrorKind::InvalidArgument);
    let blob = ops
        .wrap(
            call(Operation::Wrap),
            key.key.id.to_string(),
            Zeroizing::new(b"x".to_vec()),
            HashMap::new(),
        )
        .await
        .unwrap()
        .blob;
    let err = ops
        .unwrap(call(Operation::Unwrap), blob, reserved, String::new())
        .await
        .unwrap_err();
    assert_eq!(err.kind(), ErrorKind::InvalidArgument);
}

#[tokio::test]
async fn an_alias_is_authorized_on_its_own_name() {
    let ops = ops(ADMIN);
    let billing = ops
        .create_key(
            call(Operation::CreateKey),
            String::new(),
            "alias/billing".into(),
            Default::default(),
            KeyOrigin::Hsm,
        )
        .await
        .unwrap();
    ops.create_alias(
        call(Operation::CreateAlias),
        "alias/team-a-x".into(),
        billing.key.id.to_string(),
    )
    .await
    .unwrap();
    let scoped = Ops::new(
        ops.keystore().clone(),
        Arc::new(Gate::new(
            Arc::new(PolicyHandle::fixed(
                Policy::parse("[[grant]]\nprincipals = [\"unix:uid=7\"]\noperations = [\"admin\"]\nkeys = [\"alias/team-a-*\"]\n")
                    .unwrap(),
            )),
            None,
        )),
    );
    let err = scoped
        .delete_alias(call(Operation::DeleteAlias), "alias/billing".into())
        .await
        .unwrap_err();
    assert_eq!(err.kind(), ErrorKind::PermissionDenied);
    scoped
        .delete_alias(call(Operation::DeleteAlias), "alias/team-a-x".into())
        .await
        .unwrap();
}

#[tokio::test]
async fn rewrap_needs_both_ends() {
    let ops = ops(
        "[[grant]]\nprincipals = [\"unix:uid=7\"]\noperations = [\"CreateKey\", \"Wrap\", \"ReWrapTo\"]\nkeys = [\"*\"]\n",
    );
    ops.create_key(
        call(Operation::CreateKey),
        String::new(),
        "alias/a".into(),
        Default::default(),
        KeyOrigin::Hsm,
    )
    .await
    .unwrap();
    let blob = ops
        .wrap(
            call(Operation::Wrap),
            "alias/a".into(),
            Zeroizing::new(b"x".to_vec()),
            HashMap::new(),
        )
        .await
        .unwrap()
        .blob;
    let err = ops
        .rewrap(
            call(Operation::ReWrap),
            blob,
            HashMap::new(),
            "alias/a".into(),
            HashMap::new(),
            String::new(),
        )
        .await
        .unwrap_err();
    assert_eq!(err.kind(), ErrorKind::PermissionDenied);
}

#[tokio::test]
async fn an_unauthenticated_call_is_refused_before_anything() {
    let ops = ops(ADMIN);
    let anonymous = Call::new(
        Err(String::from("no credentials").into()),
        Operation::ListKeys,
        None,
        None,
    );
    let err = ops
        .list_keys(anonymous, 0, String::new())
        .await
        .unwrap_err();
    assert_eq!(err.kind(), ErrorKind::Unauthenticated);
}

#[test]
fn reserved_context_keys_are_refused() {
    let entries = |k: &str| HashMap::from([(k.to_owned(), "v".to_owned())]);
    let err = caller_context(entries("wrapd:purpose")).unwrap_err();
    assert!(err.to_string().contains("reserved"), "{err}");
    assert!(caller_context(entries("tenant")).is_ok());
    assert!(
        caller_context(entries("wrapd")).is_ok(),
        "only the prefix with its colon"
    );
}

/// A call of the KMS plugin acting as `principal`.
fn plugin_call(principal: &str, op: Operation) -> Call {
    Call::new(
        Ok(crate::auth::kms_plugin_identity(principal, None)),
        op,
        Some("uid"),
        None,
    )
}

/// A KMS Decrypt by `plugin`, acting as `principal`.
async fn plugin_decrypt(
    plugin: &KmsPlugin,
    principal: &str,
    blob: Vec<u8>,
    key_id: String,
) -> Result<Zeroizing<Vec<u8>>> {
    plugin
        .decrypt(plugin_call(principal, Operation::Unwrap), blob, key_id, 0)
        .await
}

/// Two clusters' plugins served by one daemon's keys, each granted Wrap and Unwrap on its
/// own alias only.
#[tokio::test]
async fn blobs_bound_to_a_plugins_principal_cannot_be_opened_by_a_plugin_acting_as_another() {
    let policy = format!(
        "{ADMIN}[[grant]]\nprincipals = [\"wrapd:cluster-a\"]\noperations = [\"Wrap\", \"Unwrap\"]\n\
         keys = [\"alias/cluster-a\"]\n[[grant]]\nprincipals = [\"wrapd:cluster-b\"]\n\
         operations = [\"Wrap\", \"Unwrap\"]\nkeys = [\"alias/cluster-b\"]\n"
    );
    let ops = ops(&policy);
    for alias in ["alias/cluster-a", "alias/cluster-b"] {
        ops.create_key(
            call(Operation::CreateKey),
            String::new(),
            alias.into(),
            Default::default(),
            KeyOrigin::Hsm,
        )
        .await
        .unwrap();
    }
    let plugin = |principal: &str, alias: &str| {
        KmsPlugin::new(
            ops.clone(),
            KeyRef::parse(alias).unwrap(),
            (principal, true),
            std::time::Duration::from_secs(10),
        )
        .unwrap()
    };
    let a = plugin("wrapd:cluster-a", "alias/cluster-a");
    let b = plugin("wrapd:cluster-b", "alias/cluster-b");
    let seed = || Zeroizing::new(vec![7u8; 32]);
    let sealed = a
        .encrypt(plugin_call("wrapd:cluster-a", Operation::Wrap), seed())
        .await
        .unwrap();
    let opened = plugin_decrypt(
        &a,
        "wrapd:cluster-a",
        sealed.ciphertext.clone(),
        sealed.key_id.clone(),
    )
    .await
    .unwrap();
    assert_eq!(*opened, vec![7u8; 32]);
    assert!(
        plugin_decrypt(&b, "wrapd:cluster-b", sealed.ciphertext, sealed.key_id)
            .await
            .is_err(),
        "cluster B's plugin opened a DEK seed of cluster A's"
    );

    // A blob from before the principal was bound (the reserved purpose alone) still opens.
    let key_a = ops
        .keystore()
        .resolve(&KeyRef::parse("alias/cluster-a").unwrap())
        .unwrap();
    let unbound =
        EncryptionContext::from_entries([(KMS_CONTEXT.0.to_owned(), KMS_CONTEXT.1.to_owned())])
            .unwrap();
    let old = ops
        .keystore()
        .wrap(&KeyRef::Id(key_a.id.clone()), &[9u8; 32], &unbound)
        .unwrap();
    let old_key_id = format!("{}:{}", old.key_id, old.key_version);
    let opened = plugin_decrypt(&a, "wrapd:cluster-a", old.blob, old_key_id)
        .await
        .unwrap();
    assert_eq!(*opened, vec![9u8; 32]);
}
