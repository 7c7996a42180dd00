//! The AWS KMS-compatible API driven by the real clients nobody here wrote: the
//! distribution's AWS CLI (`/usr/bin/aws`), boto3, the official AWS Encryption SDK for Python
//! with its KMS master-key provider and its `aws-encryption-cli`, each pointed at a `wrapd
//! dev` daemon by the standard endpoint and credential settings only.

use std::path::{Path, PathBuf};
use std::process::Command;

use serde_json::{Value, json};
use wrapd::proto::{UnwrapRequest, WrapRequest};

use crate::common::{DevDaemon, ctx, eventually};

/// The AWS CLI as Debian ships it (2.9: no `AWS_ENDPOINT_URL`, so `--endpoint-url`).
const AWS_CLI: &str = "/usr/bin/aws";

fn python_script(name: &str) -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("tests/python")
        .join(name)
}

/// The environment every AWS client gets: the dev profile's files, the dev CA (the
/// environment's `AWS_CA_BUNDLE` would win over the profile's `ca_bundle`), and nothing
/// from the machine's own AWS setup.
pub(crate) fn aws_env(daemon: &DevDaemon, command: &mut Command) {
    let dir = daemon.dir();
    for var in [
        "AWS_ACCESS_KEY_ID",
        "AWS_SECRET_ACCESS_KEY",
        "AWS_SESSION_TOKEN",
        "AWS_DEFAULT_REGION",
        "AWS_REGION",
        "AWS_ENDPOINT_URL",
    ] {
        command.env_remove(var);
    }
    command
        .env("AWS_CONFIG_FILE", dir.join("aws/config"))
        .env("AWS_SHARED_CREDENTIALS_FILE", dir.join("aws/credentials"))
        .env("AWS_PROFILE", "wrapd-dev")
        .env("AWS_CA_BUNDLE", dir.join("pki/ca.pem"))
        .env("AWS_EC2_METADATA_DISABLED", "true")
        .env("AWS_ENDPOINT_URL_KMS", &daemon.aws)
        .env("WRAPD_AWS_URL", &daemon.aws);
}

/// Runs `aws kms ARGS` and returns its JSON output, or its stderr on failure.
pub(crate) fn aws_cli<S: AsRef<std::ffi::OsStr>>(
    daemon: &DevDaemon,
    args: &[S],
) -> Result<Value, String> {
    let mut command = Command::new(AWS_CLI);
    aws_env(daemon, &mut command);
    let out = command
        .args(["kms", "--endpoint-url", &daemon.aws, "--output", "json"])
        .args(args)
        .output()
        .expect("run /usr/bin/aws (softhsm-config/install-deps.sh installs it)");
    if !out.status.success() {
        return Err(String::from_utf8_lossy(&out.stderr).into_owned());
    }
    let stdout = String::from_utf8_lossy(&out.stdout);
    if stdout.trim().is_empty() {
        return Ok(Value::Null);
    }
    Ok(serde_json::from_str(&stdout).unwrap_or_else(|e| panic!("{e}: {stdout}")))
}

#[track_caller]
pub(crate) fn aws_ok<S: AsRef<std::ffi::OsStr> + std::fmt::Debug>(
    daemon: &DevDaemon,
    args: &[S],
) -> Value {
    aws_cli(daemon, args).unwrap_or_else(|err| panic!("aws kms {args:?}: {err}"))
}

/// Runs a boto3 scenario of `tests/python/aws_kms_boto3.py`; returns its JSON line.
pub(crate) fn boto3(daemon: &DevDaemon, scenario: &str, env: &[(&str, &str)]) -> Value {
    let mut command = Command::new("python3");
    aws_env(daemon, &mut command);
    for (k, v) in env {
        command.env(k, v);
    }
    let out = command
        .arg(python_script("aws_kms_boto3.py"))
        .arg(scenario)
        .output()
        .expect("python3");
    assert!(
        out.status.success(),
        "boto3 scenario {scenario} failed:\n{}\ndaemon log:\n{}",
        String::from_utf8_lossy(&out.stderr),
        daemon.log()
    );
    let stdout = String::from_utf8_lossy(&out.stdout);
    serde_json::from_str(stdout.lines().last().unwrap_or("")).expect("the scenario's JSON line")
}

/// Replaces `key`'s policy with `policy` (JSON) through the AWS CLI.
pub(crate) fn put_key_policy(daemon: &DevDaemon, key: &str, policy: &str) {
    aws_ok(
        daemon,
        &[
            "put-key-policy",
            "--key-id",
            key,
            "--policy-name",
            "default",
            "--policy",
            policy,
        ],
    );
}

pub(crate) fn b64(value: &Value) -> Vec<u8> {
    use base64::Engine;
    base64::engine::general_purpose::STANDARD
        .decode(value.as_str().expect("a base64 string"))
        .unwrap()
}

fn create_key(daemon: &DevDaemon) -> Value {
    aws_ok(daemon, &["create-key", "--description", "test"])["KeyMetadata"].clone()
}

#[test]
fn the_aws_cli_generates_a_data_key_that_decrypts_only_with_its_context() {
    let daemon = DevDaemon::start();
    let key = create_key(&daemon);
    let arn = key["Arn"].as_str().unwrap();
    aws_ok(
        &daemon,
        &[
            "create-alias",
            "--alias-name",
            "alias/cli",
            "--target-key-id",
            arn,
        ],
    );
    let generated = aws_ok(
        &daemon,
        &[
            "generate-data-key",
            "--key-id",
            "alias/cli",
            "--key-spec",
            "AES_256",
            "--encryption-context",
            "tenant=acme",
        ],
    );
    assert_eq!(generated["KeyId"], arn);
    let blob = daemon.dir().join("blob");
    std::fs::write(&blob, b64(&generated["CiphertextBlob"])).unwrap();
    let blob_arg = format!("fileb://{}", blob.display());
    let decrypted = aws_ok(
        &daemon,
        &[
            "decrypt",
            "--ciphertext-blob",
            &blob_arg,
            "--encryption-context",
            "tenant=acme",
        ],
    );
    assert_eq!(decrypted["Plaintext"], generated["Plaintext"]);
    assert_eq!(decrypted["KeyId"], arn);
    let wrong = aws_cli(
        &daemon,
        &[
            "decrypt",
            "--ciphertext-blob",
            &blob_arg,
            "--encryption-context",
            "tenant=other",
        ],
    )
    .unwrap_err();
    assert!(wrong.contains("InvalidCiphertextException"), "{wrong}");
}

#[test]
fn the_aws_cli_encrypts_re_encrypts_and_decrypts() {
    let daemon = DevDaemon::start();
    let (first, second) = (create_key(&daemon), create_key(&daemon));
    let (a, b) = (
        first["Arn"].as_str().unwrap(),
        second["Arn"].as_str().unwrap(),
    );
    let plaintext = daemon.dir().join("plain");
    std::fs::write(&plaintext, b"the launch codes").unwrap();
    let encrypted = aws_ok(
        &daemon,
        &[
            "encrypt",
            "--key-id",
            first["KeyId"].as_str().unwrap(),
            "--plaintext",
            &format!("fileb://{}", plaintext.display()),
        ],
    );
    assert_eq!(encrypted["KeyId"], a);
    let blob = daemon.dir().join("blob");
    std::fs::write(&blob, b64(&encrypted["CiphertextBlob"])).unwrap();
    let re = aws_ok(
        &daemon,
        &[
            "re-encrypt",
            "--ciphertext-blob",
            &format!("fileb://{}", blob.display()),
            "--destination-key-id",
            b,
        ],
    );
    assert_eq!(
        (re["SourceKeyId"].as_str(), re["KeyId"].as_str()),
        (Some(a), Some(b))
    );
    std::fs::write(&blob, b64(&re["CiphertextBlob"])).unwrap();
    let decrypted = aws_ok(
        &daemon,
        &[
            "decrypt",
            "--ciphertext-blob",
            &format!("fileb://{}", blob.display()),
        ],
    );
    assert_eq!(decrypted["KeyId"], b);
    assert_eq!(b64(&decrypted["Plaintext"]), b"the launch codes");
}

#[test]
fn the_aws_cli_manages_the_key_lifecycle() {
    let daemon = DevDaemon::start();
    let key = create_key(&daemon);
    let arn = key["Arn"].as_str().unwrap();
    assert_eq!(key["KeyState"], "Enabled");
    let listed = aws_ok(&daemon, &["list-keys"]);
    assert!(
        listed["Keys"]
            .as_array()
            .unwrap()
            .iter()
            .any(|k| k["KeyArn"] == arn),
        "{listed}"
    );
    aws_ok(
        &daemon,
        &[
            "create-alias",
            "--alias-name",
            "alias/life",
            "--target-key-id",
            arn,
        ],
    );
    let aliases = aws_ok(&daemon, &["list-aliases", "--key-id", arn]);
    assert_eq!(
        aliases["Aliases"][0]["AliasName"], "alias/life",
        "{aliases}"
    );
    // Key management takes a key id or ARN only, as on AWS; DescribeKey takes the alias.
    let by_alias = aws_cli(&daemon, &["disable-key", "--key-id", "alias/life"]).unwrap_err();
    assert!(by_alias.contains("NotFoundException"), "{by_alias}");
    aws_ok(&daemon, &["disable-key", "--key-id", arn]);
    let described = aws_ok(&daemon, &["describe-key", "--key-id", "alias/life"]);
    assert_eq!(described["KeyMetadata"]["KeyState"], "Disabled");
    assert_eq!(described["KeyMetadata"]["Enabled"], false);
    aws_ok(&daemon, &["enable-key", "--key-id", arn]);
    aws_ok(
        &daemon,
        &[
            "update-key-description",
            "--key-id",
            arn,
            "--description",
            "renamed by the CLI",
        ],
    );
    let described = aws_ok(&daemon, &["describe-key", "--key-id", arn]);
    assert_eq!(
        described["KeyMetadata"]["Description"],
        "renamed by the CLI"
    );
    let scheduled = aws_ok(
        &daemon,
        &[
            "schedule-key-deletion",
            "--key-id",
            arn,
            "--pending-window-in-days",
            "7",
        ],
    );
    assert_eq!(scheduled["KeyState"], "PendingDeletion");
    let described = aws_ok(&daemon, &["describe-key", "--key-id", arn]);
    assert_eq!(described["KeyMetadata"]["KeyState"], "PendingDeletion");
    assert!(
        described["KeyMetadata"]["DeletionDate"].is_string(),
        "{described}"
    );
}

#[test]
fn boto3_drives_every_operation() {
    let daemon = DevDaemon::start();
    let facts = boto3(&daemon, "operations", &[]);
    // Every call is in the audit log, as an aws-kms call by the dev access key.
    let lines = daemon.audit_lines();
    let aws: Vec<_> = lines.iter().filter(|l| l.transport == "aws-kms").collect();
    assert!(aws.len() > 30, "{} aws-kms audit lines", aws.len());
    let access_key = std::fs::read_to_string(daemon.dir().join("aws/access-key-id")).unwrap();
    assert!(
        aws.iter()
            .all(|l| l.access_key_id.as_deref() == Some(access_key.trim()))
    );
    let decrypt = aws
        .iter()
        .find(|l| l.api_operation.as_deref() == Some("TrentService.Decrypt"))
        .expect("a Decrypt line");
    assert_eq!(decrypt.operation, "Unwrap");
    assert!(
        decrypt
            .principal
            .starts_with("tls:uri=spiffe://wrapd-dev/user/")
    );
    assert!(
        facts["key"]
            .as_str()
            .unwrap()
            .starts_with("arn:aws:kms:us-east-1:111122223333:key/")
    );
}

#[test]
fn boto3_pages_through_keys_and_aliases_one_at_a_time() {
    let daemon = DevDaemon::start();
    let facts = boto3(&daemon, "pagination", &[]);
    // 3 keys made by the scenario + the dev Kubernetes and XKS keys.
    assert_eq!(facts["pages"], 5, "{facts}");
}

#[test]
fn boto3_sees_each_error_type_with_its_http_status() {
    let daemon = DevDaemon::start();
    let statuses = boto3(&daemon, "errors", &[]);
    let expected = [
        ("NotFoundException", 400),
        ("InvalidCiphertextException", 400),
        ("IncorrectKeyException", 400),
        ("ValidationException", 400),
        ("AlreadyExistsException", 400),
        ("UnsupportedOperationException", 400),
        ("InvalidAliasNameException", 400),
        ("InvalidMarkerException", 400),
        ("DisabledException", 400),
        ("KMSInvalidStateException", 400),
    ];
    for (code, status) in expected {
        assert_eq!(statuses[code], status, "{code}: {statuses}");
    }
}

#[test]
fn boto3_is_refused_an_alias_where_aws_takes_only_a_key_id_or_arn() {
    let daemon = DevDaemon::start();
    let refused = boto3(&daemon, "key_id_forms", &[]);
    let refused = refused.as_object().expect("a JSON object");
    // Six key-management calls and an alias target, each with an alias name and an alias ARN.
    assert_eq!(refused.len(), 14, "{refused:?}");
    for (call, code) in refused {
        assert_eq!(code, "NotFoundException", "{call}");
    }
}

#[tokio::test]
async fn an_unwritable_audit_log_is_a_dependency_timeout() {
    let daemon = DevDaemon::start();
    let audit = daemon.dir().join("audit.log");
    std::fs::rename(&audit, daemon.dir().join("audit.log.old")).unwrap();
    std::os::unix::fs::symlink("/dev/full", &audit).unwrap();
    daemon.signal(libc::SIGHUP);
    let data = daemon.data().await;
    eventually("operations fail closed", || {
        let mut data = data.clone();
        async move {
            data.wrap(WrapRequest {
                key_id: "alias/kubernetes".into(),
                plaintext: b"x".to_vec(),
                ..Default::default()
            })
            .await
            .is_err_and(|s| s.code() == tonic::Code::Unavailable)
        }
    })
    .await;
    let facts = boto3(&daemon, "unavailable", &[]);
    assert_eq!(facts["code"], json!(["DependencyTimeoutException", 500]));
}

#[test]
fn bad_signatures_unknown_keys_unsigned_and_skewed_requests_are_refused_and_audited() {
    let daemon = DevDaemon::start();
    let facts = boto3(&daemon, "auth", &[]);
    let refused: Vec<_> = daemon
        .audit_lines()
        .into_iter()
        .filter(|l| l.transport == "aws-kms" && l.outcome == "UNAUTHENTICATED")
        .collect();
    assert_eq!(refused.len(), 4, "{refused:#?}");
    assert!(
        refused
            .iter()
            .all(|l| l.api_operation.as_deref() == Some("TrentService.ListKeys"))
    );
    assert!(refused.iter().all(|l| l.principal.is_empty()));
    let claimed: Vec<_> = refused.iter().map(|l| l.access_key_id.clone()).collect();
    let real = facts["access_key"].as_str().unwrap().to_owned();
    assert_eq!(
        claimed,
        [
            Some(real.clone()),
            Some("AKIAUNKNOWNUNKNOWN00".to_owned()),
            None,
            Some(real)
        ]
    );
}

/// Adds a second access key to `daemon`, acting as a principal the dev policy grants
/// nothing, and restarts it; returns the environment that makes boto3 use that key.
pub(crate) fn with_outsider_key(daemon: &mut DevDaemon) -> Vec<(&'static str, String)> {
    let dir = daemon.dir().to_owned();
    std::fs::write(
        dir.join("aws/outsider-secret"),
        "outsider-secret-0123456789abcdef01234567",
    )
    .unwrap();
    let mut config = std::fs::read_to_string(daemon.config_path()).unwrap();
    config.push_str(
        "\n[[aws.access_key]]\nid = \"AKIAOUTSIDER00000000\"\nsecret_file = \"aws/outsider-secret\"\nprincipal = \"tls:uri=spiffe://elsewhere/outsider\"\n",
    );
    std::fs::write(daemon.config_path(), config).unwrap();
    daemon.restart();
    let credentials = dir.join("aws/outsider-credentials");
    std::fs::write(
        &credentials,
        "[outsider]\naws_access_key_id = AKIAOUTSIDER00000000\naws_secret_access_key = outsider-secret-0123456789abcdef01234567\n",
    )
    .unwrap();
    vec![
        (
            "AWS_SHARED_CREDENTIALS_FILE",
            credentials.to_str().unwrap().to_owned(),
        ),
        ("AWS_PROFILE", "outsider".to_owned()),
        ("AWS_CONFIG_FILE", "/dev/null".to_owned()),
    ]
}

pub(crate) fn env_refs<'a>(env: &'a [(&'static str, String)]) -> Vec<(&'a str, &'a str)> {
    env.iter().map(|(k, v)| (*k, v.as_str())).collect()
}

#[test]
fn a_signed_call_of_an_operation_wrapd_does_not_have_is_audited() {
    let daemon = DevDaemon::start();
    boto3(&daemon, "unsupported", &[]);
    let lines: Vec<_> = daemon
        .audit_lines()
        .into_iter()
        .filter(|l| l.operation == "Unsupported")
        .collect();
    let names: Vec<_> = lines.iter().map(|l| l.api_operation.clone()).collect();
    assert_eq!(
        names,
        [
            Some("TrentService.GetPublicKey".to_owned()),
            Some("TrentService.Sign".to_owned())
        ]
    );
    assert!(
        lines
            .iter()
            .all(|l| l.outcome == "FAILED_PRECONDITION" && !l.principal.is_empty())
    );
}

#[test]
fn a_flood_of_unsigned_requests_cannot_grow_the_audit_log_without_bound() {
    let mut daemon = DevDaemon::start();
    let mut config = std::fs::read_to_string(daemon.config_path()).unwrap();
    config.push_str("\n[metrics]\nlisten = \"127.0.0.1:0\"\n");
    std::fs::write(daemon.config_path(), config).unwrap();
    daemon.restart();
    let flood = wrapd::ops::REFUSAL_BUDGET_PER_WINDOW as usize + 60;
    boto3(
        &daemon,
        "unsigned_flood",
        &[("WRAPD_FLOOD", &flood.to_string())],
    );
    let refused = daemon
        .audit_lines()
        .into_iter()
        .filter(|l| l.outcome == "UNAUTHENTICATED")
        .count();
    assert_eq!(refused, wrapd::ops::REFUSAL_BUDGET_PER_WINDOW as usize);
    // The rest are counted where an operator sees them.
    let metrics = crate::metrics::scrape(daemon.metrics.as_deref().unwrap());
    assert_eq!(
        crate::metrics::value(&metrics, "wrapd_audit_refusals_summarized_total"),
        60.0,
        "{metrics}"
    );
}

#[test]
fn a_principal_without_a_grant_is_denied_whether_or_not_the_key_exists() {
    let mut daemon = DevDaemon::start();
    let key = create_key(&daemon);
    let mut env = with_outsider_key(&mut daemon);
    env.push((
        "WRAPD_EXISTING_KEY",
        key["Arn"].as_str().unwrap().to_owned(),
    ));
    let codes = boto3(&daemon, "denied", &env_refs(&env));
    assert_eq!(codes["existing"], codes["missing"]);
    let denied = daemon
        .audit_lines()
        .into_iter()
        .filter(|l| l.outcome == "PERMISSION_DENIED")
        .count();
    assert_eq!(denied, 4);
}

#[test]
fn a_signature_for_one_key_is_never_credited_to_another() {
    let mut daemon = DevDaemon::start();
    let victim = std::fs::read_to_string(daemon.dir().join("aws/access-key-id")).unwrap();
    let victim = victim.trim().to_owned();
    let mut env = with_outsider_key(&mut daemon);
    env.push(("WRAPD_VICTIM_KEY_ID", victim.clone()));
    // boto3 signs with the outsider's key, then a second credential naming the dev key is
    // slipped into the (unsigned) Authorization header: refused, never run as the dev key.
    boto3(&daemon, "impersonate", &env_refs(&env));
    let lines: Vec<_> = daemon
        .audit_lines()
        .into_iter()
        .filter(|l| l.transport == "aws-kms")
        .collect();
    assert!(
        lines
            .iter()
            .all(|l| l.access_key_id.as_deref() != Some(&victim)),
        "{lines:#?}"
    );
    assert!(lines.iter().all(|l| l.outcome != "OK"), "{lines:#?}");
    let refused = lines
        .iter()
        .filter(|l| l.outcome == "UNAUTHENTICATED")
        .count();
    assert_eq!(refused, 2, "{lines:#?}");
}

#[tokio::test]
async fn a_blob_from_either_api_unwraps_through_the_other() {
    let daemon = DevDaemon::start();
    let key = create_key(&daemon);
    let arn = key["Arn"].as_str().unwrap();
    let mut data = daemon.data().await;
    // KMS API -> gRPC.
    let generated = aws_ok(
        &daemon,
        &[
            "generate-data-key",
            "--key-id",
            arn,
            "--number-of-bytes",
            "32",
            "--encryption-context",
            "app=cross",
        ],
    );
    let unwrapped = data
        .unwrap(UnwrapRequest {
            ciphertext_blob: b64(&generated["CiphertextBlob"]),
            encryption_context: ctx(&[("app", "cross")]),
            key_id: String::new(),
        })
        .await
        .unwrap()
        .into_inner();
    assert_eq!(unwrapped.plaintext, b64(&generated["Plaintext"]));
    // The AWS API's key id (a UUID) is the same 16 bytes as the gRPC API's.
    let uuid = key["KeyId"].as_str().unwrap();
    assert_eq!(uuid.len(), 36, "{uuid}");
    assert_eq!(
        wrapd::ids::KeyId::parse_named(&format!("key/{uuid}"))
            .unwrap()
            .to_string(),
        unwrapped.key_id
    );
    // gRPC -> KMS API.
    let wrapped = data
        .wrap(WrapRequest {
            key_id: unwrapped.key_id.clone(),
            plaintext: b"from grpc".to_vec(),
            encryption_context: ctx(&[("app", "cross")]),
        })
        .await
        .unwrap()
        .into_inner();
    let blob = daemon.dir().join("grpc-blob");
    std::fs::write(&blob, &wrapped.ciphertext_blob).unwrap();
    let decrypted = aws_ok(
        &daemon,
        &[
            "decrypt",
            "--ciphertext-blob",
            &format!("fileb://{}", blob.display()),
            "--encryption-context",
            "app=cross",
        ],
    );
    assert_eq!(b64(&decrypted["Plaintext"]), b"from grpc");
    assert_eq!(decrypted["KeyId"], arn);
}

/// Runs the official SDK's KMS master-key provider (`aws_kms_esdk.py`).
fn esdk(daemon: &DevDaemon, args: &[&str]) {
    let mut command = Command::new("python3");
    aws_env(daemon, &mut command);
    let out = command
        .arg(python_script("aws_kms_esdk.py"))
        .args(args)
        .output()
        .expect("python3");
    assert!(
        out.status.success(),
        "the official Encryption SDK failed: {}",
        String::from_utf8_lossy(&out.stderr)
    );
}

fn wrapctl(daemon: &DevDaemon, args: &[&str]) {
    let out = Command::new(env!("CARGO_BIN_EXE_wrapctl"))
        .arg("--socket")
        .arg(&daemon.socket)
        .args(args)
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "wrapctl {args:?}: {}",
        String::from_utf8_lossy(&out.stderr)
    );
}

fn sample(dir: &Path) -> (PathBuf, Vec<u8>) {
    let data: Vec<u8> = (0..50_000u32).map(|i| (i * 7 % 251) as u8).collect();
    let path = dir.join("plain.bin");
    std::fs::write(&path, &data).unwrap();
    (path, data)
}

#[test]
fn the_official_encryption_sdk_with_a_kms_keyring_round_trips_through_wrapd() {
    let daemon = DevDaemon::start();
    let arn = create_key(&daemon)["Arn"].as_str().unwrap().to_owned();
    let (plain, data) = sample(daemon.dir());
    let (enc, dec) = (daemon.dir().join("esdk.enc"), daemon.dir().join("esdk.dec"));
    let s = |p: &Path| p.to_str().unwrap().to_owned();
    esdk(
        &daemon,
        &["encrypt", &arn, &s(&plain), &s(&enc), "tenant=acme"],
    );
    esdk(
        &daemon,
        &["decrypt", &arn, &s(&enc), &s(&dec), "tenant=acme"],
    );
    assert_eq!(std::fs::read(&dec).unwrap(), data);
}

#[test]
fn official_encryption_sdk_messages_decrypt_with_wrapctl() {
    let daemon = DevDaemon::start();
    let arn = create_key(&daemon)["Arn"].as_str().unwrap().to_owned();
    let (plain, data) = sample(daemon.dir());
    let (enc, dec) = (
        daemon.dir().join("esdk.enc"),
        daemon.dir().join("wrapctl.dec"),
    );
    let s = |p: &Path| p.to_str().unwrap().to_owned();
    esdk(
        &daemon,
        &["encrypt", &arn, &s(&plain), &s(&enc), "tenant=acme"],
    );
    wrapctl(
        &daemon,
        &[
            "decrypt",
            "--context",
            "tenant=acme",
            "--input",
            &s(&enc),
            "--output",
            &s(&dec),
        ],
    );
    assert_eq!(std::fs::read(&dec).unwrap(), data);
}

#[test]
fn wrapctl_files_for_a_key_arn_decrypt_with_the_official_encryption_sdk() {
    let daemon = DevDaemon::start();
    let arn = create_key(&daemon)["Arn"].as_str().unwrap().to_owned();
    let (plain, data) = sample(daemon.dir());
    let (enc, dec) = (
        daemon.dir().join("wrapctl.enc"),
        daemon.dir().join("esdk.dec"),
    );
    let s = |p: &Path| p.to_str().unwrap().to_owned();
    wrapctl(
        &daemon,
        &[
            "encrypt",
            "--key",
            &arn,
            "--context",
            "tenant=acme",
            "--input",
            &s(&plain),
            "--output",
            &s(&enc),
        ],
    );
    esdk(
        &daemon,
        &["decrypt", &arn, &s(&enc), &s(&dec), "tenant=acme"],
    );
    assert_eq!(std::fs::read(&dec).unwrap(), data);
}

#[test]
fn the_aws_encryption_cli_round_trips_and_its_files_decrypt_with_wrapctl() {
    let daemon = DevDaemon::start();
    let arn = create_key(&daemon)["Arn"].as_str().unwrap().to_owned();
    let (plain, data) = sample(daemon.dir());
    let (enc, dec) = (daemon.dir().join("cli.enc"), daemon.dir().join("cli.dec"));
    let cli = |mode: &str, input: &Path, output: &Path| {
        let mut command = Command::new("aws-encryption-cli");
        aws_env(&daemon, &mut command);
        let out = command
            .args([mode, "--input"])
            .arg(input)
            .arg("--output")
            .arg(output)
            .args(["--wrapping-keys", &format!("key={arn}")])
            .args(["--encryption-context", "tenant=acme"])
            .args(["--metadata-output", "/dev/null"])
            .args(["--commitment-policy", "require-encrypt-require-decrypt"])
            .output()
            .expect("aws-encryption-cli (softhsm-config/install-deps.sh installs it)");
        assert!(
            out.status.success(),
            "aws-encryption-cli {mode}: {}",
            String::from_utf8_lossy(&out.stderr)
        );
    };
    cli("--encrypt", &plain, &enc);
    cli("--decrypt", &enc, &dec);
    assert_eq!(std::fs::read(&dec).unwrap(), data);
    let mine = daemon.dir().join("wrapctl.dec");
    wrapctl(
        &daemon,
        &[
            "decrypt",
            "--context",
            "tenant=acme",
            "--input",
            enc.to_str().unwrap(),
            "--output",
            mine.to_str().unwrap(),
        ],
    );
    assert_eq!(std::fs::read(&mine).unwrap(), data);
}

#[test]
fn wrapd_dev_names_the_invoking_users_iam_arn_and_a_policy_can_grant_by_it() {
    let daemon = DevDaemon::start();
    let config = std::fs::read_to_string(daemon.config_path()).unwrap();
    let arn = config
        .lines()
        .find_map(|l| l.strip_prefix("arn = \""))
        .and_then(|l| l.strip_suffix('"'))
        .expect("an arn for the dev access key")
        .to_owned();
    assert!(arn.starts_with("arn:aws:iam::111122223333:user/"), "{arn}");
    // A policy that names the caller only by that ARN lets it list keys, and nothing else.
    std::fs::write(
        daemon.dir().join("policy.toml"),
        format!(
            "[[grant]]\nprincipals = [\"aws:arn={arn}\"]\noperations = [\"ListKeys\"]\nkeys = [\"*\"]\n"
        ),
    )
    .unwrap();
    daemon.signal(libc::SIGHUP);
    // The new policy is in force once CreateKey, which it does not grant, is denied.
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(10);
    loop {
        match aws_cli(&daemon, &["create-key"]) {
            Err(err) if err.contains("AccessDeniedException") => break,
            _ => assert!(
                std::time::Instant::now() < deadline,
                "the policy never reloaded"
            ),
        }
        std::thread::sleep(std::time::Duration::from_millis(100));
    }
    aws_ok(&daemon, &["list-keys"]);
}

/// Calls one of wrapd's extensions (`X-Amz-Target: WrapdService.OP`) with Debian's `curl
/// --aws-sigv4` and the dev credentials; the HTTP status and the JSON answer.
fn extension(daemon: &DevDaemon, op: &str, body: &Value) -> (u16, Value) {
    let credentials = std::fs::read_to_string(daemon.dir().join("aws/credentials")).unwrap();
    let field = |name: &str| {
        credentials
            .lines()
            .find_map(|l| {
                l.strip_prefix(name)?
                    .trim()
                    .strip_prefix('=')
                    .map(str::trim)
            })
            .unwrap()
            .to_owned()
    };
    let out = Command::new("curl")
        .args(["--silent", "--show-error"])
        .arg("--cacert")
        .arg(daemon.dir().join("pki/ca.pem"))
        .args(["-H", "Content-Type: application/x-amz-json-1.1"])
        .args(["-H", &format!("X-Amz-Target: WrapdService.{op}")])
        .args([
            "--aws-sigv4",
            &format!("aws:amz:{}:kms", wrapd::dev::AWS_REGION),
        ])
        .args([
            "--user",
            &format!(
                "{}:{}",
                field("aws_access_key_id"),
                field("aws_secret_access_key")
            ),
        ])
        .args(["--data-binary", &body.to_string()])
        .args(["-w", "\n%{http_code}", &format!("{}/", daemon.aws)])
        .output()
        .expect("curl (softhsm-config/install-deps.sh installs it)");
    let stdout = String::from_utf8_lossy(&out.stdout);
    let (text, status) = stdout.rsplit_once('\n').expect("curl's status line");
    (
        status.trim().parse().unwrap(),
        serde_json::from_str(text).unwrap_or(Value::Null),
    )
}

#[test]
fn the_key_version_extensions_retire_and_schedule_destruction_and_list_usage() {
    let daemon = DevDaemon::start();
    let arn = create_key(&daemon)["Arn"].as_str().unwrap().to_owned();
    let generated = aws_ok(
        &daemon,
        &[
            "generate-data-key",
            "--key-id",
            &arn,
            "--key-spec",
            "AES_256",
        ],
    );
    assert!(generated["CiphertextBlob"].is_string());
    wrapctl(
        &daemon,
        &["keys", "rotate", arn.rsplit_once(':').unwrap().1],
    );

    let (status, listed) = extension(&daemon, "ListKeyVersions", &json!({ "KeyId": arn }));
    assert_eq!(status, 200, "{listed}");
    assert_eq!(listed["KeyId"], arn);
    assert_eq!(listed["CurrentVersion"], 2);
    assert_eq!(listed["Versions"][0]["Wraps"], 1, "{listed}");
    assert_eq!(listed["Versions"][1]["Current"], true);

    // Only a retired version can be scheduled; the current one cannot be retired.
    let key_version = |v: u32| json!({ "KeyId": arn, "Version": v });
    let (status, refused) = extension(&daemon, "RetireKeyVersion", &key_version(2));
    assert_ne!(status, 200, "{refused}");
    assert_eq!(refused["__type"], "KMSInvalidStateException", "{refused}");
    let schedule = json!({ "KeyId": arn, "Version": 1, "PendingWindowInDays": 7 });
    let (status, refused) = extension(&daemon, "ScheduleKeyVersionDestruction", &schedule);
    assert_eq!(refused["__type"], "KMSInvalidStateException", "{refused}");
    assert_ne!(status, 200);
    let (status, retired) = extension(&daemon, "RetireKeyVersion", &key_version(1));
    assert_eq!(status, 200, "{retired}");
    assert_eq!(retired["Versions"][0]["Retired"], true);
    let (status, scheduled) = extension(&daemon, "ScheduleKeyVersionDestruction", &schedule);
    assert_eq!(status, 200, "{scheduled}");
    assert!(scheduled["Versions"][0]["DestructionDate"].is_number());
    let (status, cancelled) = extension(&daemon, "CancelKeyVersionDestruction", &key_version(1));
    assert_eq!(status, 200, "{cancelled}");
    assert!(cancelled["Versions"][0].get("DestructionDate").is_none());
    let (status, restored) = extension(&daemon, "RestoreKeyVersion", &key_version(1));
    assert_eq!(status, 200, "{restored}");
    assert_eq!(restored["Versions"][0]["Retired"], false);

    // An unknown extension is refused like an unknown AWS operation; audited under its name.
    let (status, unknown) = extension(&daemon, "DestroyEverything", &json!({}));
    assert_eq!(status, 400);
    assert_eq!(
        unknown["__type"], "UnsupportedOperationException",
        "{unknown}"
    );
    let lines = daemon.audit_lines();
    assert!(
        lines
            .iter()
            .any(|l| l.operation == "ScheduleKeyVersionDestruction" && l.outcome == "OK"),
        "{lines:?}"
    );
}

#[test]
fn key_ids_are_uuids_the_hex_spelling_is_echoed_and_a_second_region_sees_every_key() {
    let mut daemon = DevDaemon::start();
    let config = std::fs::read_to_string(daemon.config_path()).unwrap();
    let config = config.replacen(
        "region = \"us-east-1\"\n",
        "region = \"us-east-1\"\nregions = [\"eu-central-1\"]\n",
        1,
    );
    std::fs::write(daemon.config_path(), config).unwrap();
    daemon.restart();
    let out = boto3(
        &daemon,
        "uuid_ids_and_regions",
        &[("WRAPD_SECOND_REGION", "eu-central-1")],
    );
    for fact in [
        "uuid",
        "arn_ends_with_id",
        "described_by_hex",
        "encrypt_echoes",
        "decrypt_echoes",
        "decrypt_without_key",
        "generate_by_id",
        "far_describe",
        "far_decrypts",
        "far_takes_home_arn",
        "home_takes_far_arn",
    ] {
        assert_eq!(out[fact], true, "{fact}: {out}");
    }
    assert_eq!(out["other_region"], "InvalidSignatureException", "{out}");
    assert_eq!(out["other_region_arn"], "NotFoundException", "{out}");
}

#[test]
fn every_constraint_of_the_service_model_is_a_validation_error_in_aws_wording() {
    let daemon = DevDaemon::start();
    let model = concat!(env!("CARGO_MANIFEST_DIR"), "/proto/aws-kms/service-2.json");
    let out = boto3(&daemon, "model_constraints", &[("WRAPD_KMS_MODEL", model)]);
    let failures = out["failures"].as_array().unwrap();
    assert!(
        failures.is_empty(),
        "{} of {} cases:\n{}",
        failures.len(),
        out["cases"],
        failures
            .iter()
            .map(|f| f.as_str().unwrap_or_default())
            .collect::<Vec<_>>()
            .join("\n")
    );
    // The model's constraints on the top-level members of the operations wrapd answers.
    assert!(out["cases"].as_u64().unwrap() >= 150, "{out}");
}
