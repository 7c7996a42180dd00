//! Grants (AWS KMS's `CreateGrant` and the rest), driven by boto3 and the AWS CLI against a
//! real daemon: a worker's rights from a grant, usable at once with its token, within the
//! grant's operations and context constraint; idempotent names, pages, retiring and
//! revoking, narrower grants handed on; the policy file's bound on grants
//! (`require_key_grant`, `key_policies`); the same grants over gRPC; and every change
//! audited.

use crate::aws_kms_api::{aws_ok, boto3, env_refs, put_key_policy};
use crate::common::DevDaemon;

const WORKER_ID: &str = "AKIAWORKER0000000000";
const WORKER_SECRET: &str = "worker-secret-0123456789abcdef0123456789";
const WORKER_ARN: &str = "arn:aws:iam::111122223333:wrapd/tls:uri=spiffe://example.org/worker";

/// Adds an access key for a worker principal that has no grant of its own in the policy
/// file, and `rule` (a `[[grant]]` table, or nothing) to the policy file; restarts.
fn with_worker(daemon: &mut DevDaemon, rule: &str) -> Vec<(&'static str, String)> {
    std::fs::write(daemon.dir().join("aws/worker-secret"), WORKER_SECRET).unwrap();
    let mut config = std::fs::read_to_string(daemon.config_path()).unwrap();
    config.push_str(&format!(
        "\n[[aws.access_key]]\nid = \"{WORKER_ID}\"\nsecret_file = \"aws/worker-secret\"\nprincipal = \"tls:uri=spiffe://example.org/worker\"\n"
    ));
    std::fs::write(daemon.config_path(), config).unwrap();
    let policy_file = daemon.dir().join("policy.toml");
    let policy = std::fs::read_to_string(&policy_file).unwrap();
    std::fs::write(&policy_file, format!("{policy}\n{rule}\n")).unwrap();
    daemon.restart();
    vec![
        ("WRAPD_WORKER_ID", WORKER_ID.to_owned()),
        ("WRAPD_WORKER_SECRET", WORKER_SECRET.to_owned()),
        ("WRAPD_WORKER_ARN", WORKER_ARN.to_owned()),
    ]
}

/// The policy file rule that lets key grants give the worker data-plane rights and the
/// right to hand narrower grants on.
const WORKER_BY_GRANT: &str = r#"
[[grant]]
description = "the worker: what key grants give it"
principals = ["tls:uri=spiffe://example.org/worker"]
operations = ["data-plane", "CreateGrant"]
keys = ["*"]
require_key_grant = true
"#;

#[test]
fn a_grant_gives_its_grantee_its_operations_within_its_constraint_until_retired() {
    let mut daemon = DevDaemon::start();
    let env = with_worker(&mut daemon, WORKER_BY_GRANT);
    let out = boto3(&daemon, "grants", &env_refs(&env));
    assert_eq!(out["before"], "AccessDeniedException", "{out}");
    assert_eq!(out["decrypt"], true, "usable at once with its token: {out}");
    assert_eq!(out["other_tenant"], "AccessDeniedException", "{out}");
    assert_eq!(out["no_context"], "AccessDeniedException", "{out}");
    assert_eq!(out["not_granted"], "AccessDeniedException", "{out}");
    assert_eq!(out["foreign_token"], "InvalidGrantTokenException", "{out}");
    assert_eq!(out["same_id"], true, "a retried named grant: {out}");
    assert_eq!(out["new_token"], true, "{out}");
    assert_eq!(out["other_params_new_id"], true, "{out}");
    assert_eq!(out["listed"], 5, "{out}");
    assert_eq!(out["pages"], 3, "{out}");
    assert_eq!(out["distinct"], true, "{out}");
    assert_eq!(out["by_grantee"], 2, "{out}");
    assert_eq!(out["by_id"], true, "{out}");
    assert_eq!(out["bad_marker"], "InvalidMarkerException", "{out}");
    assert_eq!(out["alias_refused"], "NotFoundException", "{out}");
    assert_eq!(
        out["retirable"],
        serde_json::json!(["arn:aws:iam::111122223333:role/r9"]),
        "{out}"
    );
    assert_eq!(out["retired_by_retiring_principal"], true, "{out}");
    assert_eq!(out["after_retire"], "AccessDeniedException", "{out}");
    assert_eq!(out["worker_revoke"], "AccessDeniedException", "{out}");
    assert_eq!(
        out["worker_retire_other"], "AccessDeniedException",
        "a grant lets its grantee retire that grant only: {out}"
    );
    assert_eq!(out["revoked_again"], "NotFoundException", "{out}");
    assert_eq!(out["bad_grant_id"], "InvalidGrantIdException", "{out}");
    assert_eq!(out["sign_refused"], "ValidationException", "{out}");
    assert_eq!(out["unknown_op"], "ValidationException", "{out}");
    assert_eq!(out["narrower"], true, "{out}");
    assert_eq!(out["wider"], "AccessDeniedException", "{out}");
    assert_eq!(out["unconstrained"], "AccessDeniedException", "{out}");

    // Every change is audited, with the grant it made or removed.
    let lines = daemon.audit_lines();
    let made: Vec<_> = lines
        .iter()
        .filter(|l| l.operation == "CreateGrant" && l.outcome == "OK")
        .collect();
    assert_eq!(made.len(), 9, "{made:?}");
    assert!(made.iter().all(|l| {
        l.request_metadata
            .as_ref()
            .is_some_and(|m| m.get("grantId").is_some_and(|id| id.len() == 64))
    }));
    assert!(
        made.iter().any(|l| {
            l.request_metadata.as_ref().is_some_and(|m| {
                m.get("granteePrincipal").map(String::as_str) == Some(WORKER_ARN)
                    && m.get("operations").map(String::as_str)
                        == Some("Decrypt,Encrypt,RetireGrant")
                    && m.get("constraints").is_some_and(|c| c.contains("acme"))
            })
        }),
        "the audit line says what was granted: {made:?}"
    );
    for op in ["RetireGrant", "RevokeGrant"] {
        assert!(
            lines.iter().any(|l| l.operation == op && l.outcome == "OK"),
            "{op}"
        );
    }
}

/// A new key and, made with the AWS CLI, a grant of Encrypt on it to the worker.
fn key_granting_encrypt_to_the_worker(daemon: &DevDaemon) -> (String, serde_json::Value) {
    let key = aws_ok(daemon, &["create-key"])["KeyMetadata"]["KeyId"]
        .as_str()
        .unwrap()
        .to_owned();
    let made = aws_ok(
        daemon,
        &[
            "create-grant",
            "--key-id",
            &key,
            "--grantee-principal",
            WORKER_ARN,
            "--operations",
            "Encrypt",
        ],
    );
    (key, made)
}

#[test]
fn without_a_policy_file_rule_a_grant_gives_nothing_unless_key_policies_is_grant() {
    let mut daemon = DevDaemon::start();
    let mut env = with_worker(&mut daemon, "");
    let (key, made) = key_granting_encrypt_to_the_worker(&daemon);
    assert_eq!(made["GrantId"].as_str().unwrap().len(), 64, "{made}");
    env.push(("WRAPD_KEY", key.clone()));
    // Restrict (the default): a grant, kept in the shared store, needs the policy file.
    let restricted = boto3(&daemon, "worker_encrypt", &env_refs(&env));
    assert_eq!(restricted["code"], "AccessDeniedException", "{restricted}");
    // Grant: as in AWS KMS, the grant alone is enough.
    let policy_file = daemon.dir().join("policy.toml");
    let text = std::fs::read_to_string(&policy_file).unwrap();
    std::fs::write(&policy_file, format!("key_policies = \"grant\"\n{text}")).unwrap();
    daemon.restart();
    let granted = boto3(&daemon, "worker_encrypt", &env_refs(&env));
    assert_eq!(granted["code"], "OK", "{granted}");
    // Listed by the AWS CLI; revoked, it gives nothing again.
    let listed = aws_ok(&daemon, &["list-grants", "--key-id", &key]);
    assert_eq!(listed["Grants"][0]["GrantId"], made["GrantId"], "{listed}");
    aws_ok(
        &daemon,
        &[
            "revoke-grant",
            "--key-id",
            &key,
            "--grant-id",
            made["GrantId"].as_str().unwrap(),
        ],
    );
    let revoked = boto3(&daemon, "worker_encrypt", &env_refs(&env));
    assert_eq!(revoked["code"], "AccessDeniedException", "{revoked}");
}

#[test]
fn a_key_policy_deny_beats_a_grant() {
    let mut daemon = DevDaemon::start();
    let mut env = with_worker(&mut daemon, WORKER_BY_GRANT);
    let (key, _) = key_granting_encrypt_to_the_worker(&daemon);
    env.push(("WRAPD_KEY", key.clone()));
    assert_eq!(
        boto3(&daemon, "worker_encrypt", &env_refs(&env))["code"],
        "OK"
    );
    let policy = serde_json::json!({
        "Version": "2012-10-17",
        "Statement": [
            {"Effect": "Allow", "Principal": {"AWS": "arn:aws:iam::111122223333:root"},
             "Action": "kms:*", "Resource": "*"},
            {"Effect": "Deny", "Principal": {"AWS": WORKER_ARN}, "Action": "kms:Encrypt",
             "Resource": "*"},
        ]
    })
    .to_string();
    put_key_policy(&daemon, &key, &policy);
    assert_eq!(
        boto3(&daemon, "worker_encrypt", &env_refs(&env))["code"],
        "AccessDeniedException"
    );
}

/// A key policy that gives the account everything but Encrypt: a caller's Encrypt can then
/// come only from a grant.
fn all_but_encrypt() -> String {
    serde_json::json!({
        "Version": "2012-10-17",
        "Statement": [{"Effect": "Allow",
                       "Principal": {"AWS": "arn:aws:iam::111122223333:root"},
                       "NotAction": "kms:Encrypt", "Resource": "*"}]
    })
    .to_string()
}

#[tokio::test]
async fn grpc_callers_make_list_use_and_retire_grants_under_their_wrapd_arn() {
    use wrapd::proto::{
        CreateGrantRequest, CreateKeyRequest, GrantConstraints, ListGrantsRequest,
        PutKeyPolicyRequest, RetireGrantRequest, WrapRequest,
    };
    let daemon = DevDaemon::start();
    let mut keys = daemon.keys().await;
    let mut data = daemon.data().await;
    let key = keys
        .create_key(CreateKeyRequest::default())
        .await
        .unwrap()
        .into_inner()
        .key_id;
    keys.put_key_policy(PutKeyPolicyRequest {
        key_id: key.clone(),
        policy: all_but_encrypt(),
        ..Default::default()
    })
    .await
    .unwrap();
    let wrap = |tenant: &str| WrapRequest {
        key_id: key.clone(),
        plaintext: vec![7; 32],
        encryption_context: [("tenant".to_owned(), tenant.to_owned())].into(),
    };
    let denied = data.wrap(wrap("acme")).await.unwrap_err();
    assert_eq!(denied.code(), tonic::Code::PermissionDenied, "{denied:?}");

    // The unix-socket caller (root here) is arn:aws:iam::ACCOUNT:wrapd/unix:uid=0.
    let me = "arn:aws:iam::111122223333:wrapd/unix:uid=0";
    let made = keys
        .create_grant(CreateGrantRequest {
            key_id: key.clone(),
            grantee_principal: me.into(),
            operations: vec!["Encrypt".into()],
            constraints: Some(GrantConstraints {
                encryption_context_subset: [("tenant".to_owned(), "acme".to_owned())].into(),
                has_encryption_context_subset: true,
                ..Default::default()
            }),
            ..Default::default()
        })
        .await
        .unwrap()
        .into_inner();
    // The caller's ordinary policy-file grant does not let a key grant give it what its key
    // policy leaves out: only a rule with require_key_grant does.
    let bounded = data.wrap(wrap("acme")).await.unwrap_err();
    assert_eq!(bounded.code(), tonic::Code::PermissionDenied, "{bounded:?}");
    let policy_file = daemon.dir().join("policy.toml");
    let policy = std::fs::read_to_string(&policy_file).unwrap();
    std::fs::write(
        &policy_file,
        format!("{policy}\n[[grant]]\nprincipals = [\"unix:uid=0\"]\noperations = [\"Wrap\"]\nkeys = [\"*\"]\nrequire_key_grant = true\n"),
    )
    .unwrap();
    daemon.reload_policy();
    data.wrap(wrap("acme"))
        .await
        .expect("the grant allows Encrypt with tenant=acme");
    let other = data.wrap(wrap("globex")).await.unwrap_err();
    assert_eq!(other.code(), tonic::Code::PermissionDenied, "{other:?}");

    let listed = keys
        .list_grants(ListGrantsRequest {
            key_id: key.clone(),
            ..Default::default()
        })
        .await
        .unwrap()
        .into_inner();
    assert_eq!(listed.grants.len(), 1);
    let grant = &listed.grants[0];
    assert_eq!(grant.grant_id, made.grant_id);
    assert_eq!(grant.grantee_principal, me);
    assert_eq!(grant.issuer, me);
    assert_eq!(grant.operations, ["Encrypt"]);
    assert!(
        grant
            .constraints
            .as_ref()
            .unwrap()
            .has_encryption_context_subset
    );

    let unknown = keys
        .create_grant(CreateGrantRequest {
            key_id: key.clone(),
            grantee_principal: me.into(),
            operations: vec!["Sign".into()],
            ..Default::default()
        })
        .await
        .unwrap_err();
    assert_eq!(unknown.code(), tonic::Code::InvalidArgument, "{unknown:?}");

    keys.retire_grant(RetireGrantRequest {
        grant_token: made.grant_token,
        ..Default::default()
    })
    .await
    .expect("the account may retire a grant of its key");
    let after = data.wrap(wrap("acme")).await.unwrap_err();
    assert_eq!(after.code(), tonic::Code::PermissionDenied, "{after:?}");
}
