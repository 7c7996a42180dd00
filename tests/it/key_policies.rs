//! Key policies, driven by boto3 and the AWS CLI against a real daemon: the default policy,
//! a policy that denies Decrypt without a context value, the lockout check, the Terraform
//! sequence, a policy kept across a restart, the policy file's say (`key_policies`), and a
//! key policy applying to gRPC callers too.

use serde_json::json;
use wrapd::proto::{GenerateDataKeyRequest, GetKeyPolicyRequest, PutKeyPolicyRequest};

use crate::aws_kms_api::{aws_ok, boto3, env_refs, put_key_policy, with_outsider_key};
use crate::common::DevDaemon;

const ACCOUNT: &str = "111122223333";

#[test]
fn key_policies_are_kept_evaluated_and_guarded_as_aws_does_it() {
    let mut daemon = DevDaemon::start();
    let out = boto3(&daemon, "key_policies", &[("WRAPD_ACCOUNT", ACCOUNT)]);
    assert_eq!(out["default_name"], "default", "{out}");
    assert_eq!(
        out["default_principal"],
        format!("arn:aws:iam::{ACCOUNT}:root"),
        "the default policy hands the key to the account: {out}"
    );
    assert_eq!(out["names"], json!(["default"]));
    assert_eq!(out["truncated"], false);
    assert_eq!(out["decrypt_with_tenant"], true, "{out}");
    assert_eq!(
        out["decrypt_without_tenant"], "AccessDeniedException",
        "{out}"
    );
    assert_eq!(out["stored"], "tenant");
    assert_eq!(out["lockout"], "MalformedPolicyDocumentException", "{out}");
    assert_eq!(out["after_refused_lockout"], "Enabled");
    assert_eq!(out["locked_out"], "AccessDeniedException", "{out}");
    assert_eq!(out["malformed"], "MalformedPolicyDocumentException");
    assert_eq!(out["lockout_at_create"], "MalformedPolicyDocumentException");
    assert_eq!(out["terraform"], "ok");
    // Every change is audited.
    let puts = daemon
        .audit_lines()
        .into_iter()
        .filter(|l| l.operation == "PutKeyPolicy")
        .map(|l| l.outcome)
        .collect::<Vec<_>>();
    assert_eq!(puts.iter().filter(|o| *o == "OK").count(), 3, "{puts:?}");
    assert!(puts.iter().any(|o| o == "INVALID_ARGUMENT"), "{puts:?}");

    // Kept across a restart, and read by the AWS CLI.
    let key = out["key"].as_str().unwrap().to_owned();
    daemon.restart();
    let got = aws_ok(
        &daemon,
        &[
            "get-key-policy",
            "--key-id",
            &key,
            "--policy-name",
            "default",
        ],
    );
    let policy: serde_json::Value = serde_json::from_str(got["Policy"].as_str().unwrap()).unwrap();
    assert_eq!(policy["Statement"][1]["Sid"], "tenant", "{policy}");
}

#[tokio::test]
async fn a_key_policy_applies_to_grpc_callers_under_their_wrapd_arn() {
    let daemon = DevDaemon::start();
    let mut keys = daemon.keys().await;
    let key = keys
        .create_key(wrapd::proto::CreateKeyRequest::default())
        .await
        .unwrap()
        .into_inner()
        .key_id;
    // The unix-socket caller (root here) may do everything but generate data keys.
    let me = format!("arn:aws:iam::{ACCOUNT}:wrapd/unix:uid=0");
    let policy = json!({
        "Version": "2012-10-17",
        "Statement": [
            {"Effect": "Allow", "Principal": {"AWS": format!("arn:aws:iam::{ACCOUNT}:root")},
             "Action": "kms:*", "Resource": "*"},
            {"Effect": "Deny", "Principal": {"AWS": me}, "Action": "kms:GenerateDataKey*",
             "Resource": "*"},
        ]
    })
    .to_string();
    keys.put_key_policy(PutKeyPolicyRequest {
        key_id: key.clone(),
        policy: policy.clone(),
        ..Default::default()
    })
    .await
    .expect("the policy still lets its author replace it");
    let denied = daemon
        .data()
        .await
        .generate_data_key(GenerateDataKeyRequest {
            key_id: key.clone(),
            number_of_bytes: 32,
            ..Default::default()
        })
        .await
        .unwrap_err();
    assert_eq!(denied.code(), tonic::Code::PermissionDenied, "{denied:?}");
    let read = keys
        .get_key_policy(GetKeyPolicyRequest {
            key_id: key.clone(),
            policy_name: "default".into(),
        })
        .await
        .unwrap()
        .into_inner();
    assert_eq!(read.policy, policy);
    // A policy that would take PutKeyPolicy from its author is refused.
    let locking = json!({
        "Version": "2012-10-17",
        "Statement": [{"Effect": "Allow", "Principal": {"AWS": "999999999999"},
                       "Action": "kms:*", "Resource": "*"}]
    })
    .to_string();
    let refused = keys
        .put_key_policy(PutKeyPolicyRequest {
            key_id: key,
            policy: locking,
            ..Default::default()
        })
        .await
        .unwrap_err();
    assert_eq!(refused.code(), tonic::Code::InvalidArgument, "{refused:?}");
    assert!(
        refused.message().contains("will not allow you"),
        "{refused:?}"
    );
}

#[test]
fn an_allow_naming_the_caller_needs_a_grant_unless_the_policy_file_says_grant() {
    let mut daemon = DevDaemon::start();
    let outsider_arn = format!("arn:aws:iam::{ACCOUNT}:wrapd/tls:uri=spiffe://elsewhere/outsider");
    let key = aws_ok(&daemon, &["create-key"])["KeyMetadata"]["KeyId"]
        .as_str()
        .unwrap()
        .to_owned();
    let policy = json!({
        "Version": "2012-10-17",
        "Statement": [
            {"Effect": "Allow", "Principal": {"AWS": format!("arn:aws:iam::{ACCOUNT}:root")},
             "Action": "kms:*", "Resource": "*"},
            {"Effect": "Allow", "Principal": {"AWS": outsider_arn}, "Action": "kms:Encrypt",
             "Resource": "*"},
        ]
    })
    .to_string();
    put_key_policy(&daemon, &key, &policy);
    let mut env = with_outsider_key(&mut daemon);
    env.push(("WRAPD_KEY", key.clone()));
    // Restrict (the default): the key policy alone gives the outsider nothing.
    let restricted = boto3(&daemon, "outsider_encrypt", &env_refs(&env));
    assert_eq!(restricted["code"], "AccessDeniedException", "{restricted}");
    // Grant: as on AWS, the statement naming it is enough.
    let policy_file = daemon.dir().join("policy.toml");
    let text = std::fs::read_to_string(&policy_file).unwrap();
    std::fs::write(&policy_file, format!("key_policies = \"grant\"\n{text}")).unwrap();
    daemon.reload_policy();
    let granted = boto3(&daemon, "outsider_encrypt", &env_refs(&env));
    assert_eq!(granted["code"], "OK", "{granted}");
}
