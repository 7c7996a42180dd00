//! The XKS proxy API driven by clients nobody here wrote: AWS's own XKS proxy test client
//! (`tests/xks-test-client`, bash over curl) and Debian's `curl --aws-sigv4`, against a
//! `wrapd dev` daemon, configured only from `DIR/xks/dev.env`.

use std::collections::HashMap;
use std::os::unix::fs::PermissionsExt;
use std::path::Path;
use std::process::Command;

use base64::Engine;
use base64::engine::general_purpose::STANDARD as B64;
use serde_json::{Value, json};
use wrapd::proto::{GenerateDataKeyRequest, KeyRef};

use crate::common::{DevDaemon, eventually};

/// `DIR/xks/dev.env`, parsed (`NAME=value` lines).
fn dev_env(daemon: &DevDaemon) -> HashMap<String, String> {
    let path = daemon.dir().join("xks/dev.env");
    let text = std::fs::read_to_string(&path).expect("wrapd dev writes xks/dev.env");
    text.lines()
        .filter(|line| !line.starts_with('#') && !line.is_empty())
        .filter_map(|line| line.split_once('='))
        .map(|(k, v)| (k.to_owned(), v.to_owned()))
        .collect()
}

/// The request metadata AWS KMS sends, for `operation`.
fn request_metadata(operation: &str, via: &str) -> Value {
    json!({
        "awsPrincipalArn": "arn:aws:iam::111122223333:role/app",
        "kmsKeyArn": "arn:aws:kms:us-east-1:111122223333:key/1234abcd-12ab-34cd-56ef-1234567890ab",
        "kmsOperation": operation,
        "kmsRequestId": format!("test-{operation}-{via}"),
        "kmsViaService": via,
    })
}

/// POSTs `body` to `PATH` (after the key store's prefix) with `curl --aws-sigv4`, signed
/// with the dev credential; returns the HTTP status and the JSON body.
fn xks(daemon: &DevDaemon, method: &str, path: &str, body: &Value) -> (u16, Value) {
    let env = dev_env(daemon);
    let url = format!(
        "https://{}/{}/{path}",
        env["XKS_PROXY_HOST"], env["URI_PREFIX"]
    );
    let out = Command::new("curl")
        .args(["--silent", "--show-error", "-X", method])
        .args(["--cacert", &env["XKS_CA"]])
        .args(["-H", "Content-Type:application/json"])
        .args([
            "--aws-sigv4",
            &format!("aws:amz:{}:kms-xks-proxy", env["XKS_REGION"]),
        ])
        .args([
            "--user",
            &format!(
                "{}:{}",
                env["SIGV4_ACCESS_KEY_ID"], env["SIGV4_SECRET_ACCESS_KEY"]
            ),
        ])
        .args(["--data-binary", &body.to_string()])
        .args(["-w", "\n%{http_code}", &url])
        .output()
        .expect("curl (softhsm-config/install-deps.sh installs it)");
    let stdout = String::from_utf8_lossy(&out.stdout);
    let (json_text, status) = stdout.rsplit_once('\n').expect("curl's status line");
    let status: u16 = status.trim().parse().expect("an HTTP status");
    let value = serde_json::from_str(json_text).unwrap_or(Value::String(json_text.to_owned()));
    (status, value)
}

fn encrypt(daemon: &DevDaemon, key: &str, plaintext: &[u8], aad: &[u8], via: &str) -> (u16, Value) {
    let mut body = json!({
        "requestMetadata": request_metadata("Encrypt", via),
        "plaintext": B64.encode(plaintext),
        "encryptionAlgorithm": "AES_GCM",
        "ciphertextDataIntegrityValueAlgorithm": "SHA_256",
    });
    if !aad.is_empty() {
        body["additionalAuthenticatedData"] = json!(B64.encode(aad));
    }
    xks(
        daemon,
        "POST",
        &format!("kms/xks/v1/keys/{key}/encrypt"),
        &body,
    )
}

fn decrypt(daemon: &DevDaemon, key: &str, sealed: &Value, aad: &[u8]) -> (u16, Value) {
    let mut body = json!({
        "requestMetadata": request_metadata("Decrypt", "s3"),
        "ciphertext": sealed["ciphertext"],
        "ciphertextMetadata": sealed["ciphertextMetadata"],
        "initializationVector": sealed["initializationVector"],
        "authenticationTag": sealed["authenticationTag"],
        "encryptionAlgorithm": "AES_GCM",
    });
    if !aad.is_empty() {
        body["additionalAuthenticatedData"] = json!(B64.encode(aad));
    }
    xks(
        daemon,
        "POST",
        &format!("kms/xks/v1/keys/{key}/decrypt"),
        &body,
    )
}

fn plaintext_of(answer: &Value) -> Vec<u8> {
    B64.decode(answer["plaintext"].as_str().expect("a plaintext"))
        .unwrap()
}

fn key_metadata(daemon: &DevDaemon, key: &str) -> (u16, Value) {
    let body = json!({ "requestMetadata": request_metadata("DescribeKey", "") });
    xks(
        daemon,
        "POST",
        &format!("kms/xks/v1/keys/{key}/metadata"),
        &body,
    )
}

/// Runs AWS's XKS proxy test client with `env` (dev.env's variables), and with `mtls` (a
/// client key and certificate) when given; returns its summary line.
fn run_test_client(env: &HashMap<String, String>, mtls: Option<(&Path, &Path)>) -> String {
    let client = Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/xks-test-client");
    let mut command = Command::new("bash");
    // Its output goes through a pipe: it writes headers to /dev/stderr, which would
    // truncate a file shared with stdout.
    command
        .arg("-c")
        .arg("./test-xks-proxy 2>&1 | cat")
        .current_dir(&client)
        .envs(env)
        .env("REGION", &env["XKS_REGION"])
        .env("SECURE", format!("--cacert {}", env["XKS_CA"]))
        .env("ANSI_ESCAPE", "0");
    if let Some((key, cert)) = mtls {
        command.env(
            "MTLS",
            format!("--key {} --cert {}", key.display(), cert.display()),
        );
    }
    let out = command.output().expect("bash");
    let output = String::from_utf8_lossy(&out.stdout);
    let summary = output
        .lines()
        .rev()
        .find(|line| line.contains("tests PASSED") || line.contains("tests FAILED"))
        .unwrap_or_else(|| panic!("no summary from the test client:\n{output}"));
    let failed: Vec<&str> = output.lines().filter(|l| l.contains("FAILED")).collect();
    assert!(failed.is_empty(), "{}\n{output}", failed.join("\n"));
    summary.trim().to_owned()
}

#[test]
fn aws_xks_proxy_test_client_passes_against_wrapd_dev() {
    let daemon = DevDaemon::start();
    let env_file = daemon.dir().join("xks/dev.env");
    let mode = std::fs::metadata(&env_file).unwrap().permissions().mode();
    assert_eq!(mode & 0o777, 0o600, "xks/dev.env holds a secret");
    let env = dev_env(&daemon);
    for name in [
        "XKS_PROXY_HOST",
        "URI_PREFIX",
        "SIGV4_ACCESS_KEY_ID",
        "SIGV4_SECRET_ACCESS_KEY",
        "XKS_REGION",
        "XKS_CA",
        "KEY_ID",
    ] {
        assert!(
            env.get(name).is_some_and(|v| !v.is_empty()),
            "{name} in {env:?}"
        );
    }
    assert_eq!(
        format!("https://{}", env["XKS_PROXY_HOST"]),
        daemon.xks,
        "the ready line and dev.env name the same listener"
    );
    assert_eq!(run_test_client(&env, None), "All 35 tests PASSED.");
    // Every request the client made is audited with its request metadata, never the
    // plaintext.
    let lines = daemon.audit_lines();
    let xks_lines: Vec<_> = lines.iter().filter(|l| l.transport == "xks").collect();
    assert!(xks_lines.len() >= 30, "{} XKS audit lines", xks_lines.len());
    let decrypt = xks_lines
        .iter()
        .find(|l| l.operation == "XksDecrypt" && l.outcome == "OK")
        .expect("an audited decrypt");
    let metadata = decrypt.request_metadata.as_ref().expect("request metadata");
    assert_eq!(metadata["kmsViaService"], "ebs");
    assert_eq!(
        metadata["awsPrincipalArn"],
        "arn:aws:iam::123456789012:user/Alice"
    );
    assert_eq!(decrypt.principal, "xks:dev");
    let audit = std::fs::read_to_string(daemon.dir().join("audit.log")).unwrap();
    assert!(
        !audit.contains("SGVsbG8gV29ybGQh"),
        "a plaintext reached the audit log"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn ciphertexts_made_before_a_rotation_decrypt_after_it_with_their_version() {
    let daemon = DevDaemon::start();
    let key = dev_env(&daemon)["KEY_ID"].clone();
    let (status, before) = encrypt(&daemon, &key, b"data key one", b"bucket=a", "s3");
    assert_eq!(status, 200, "{before}");
    daemon
        .keys()
        .await
        .rotate_key(KeyRef {
            key_id: format!("key/{key}"),
        })
        .await
        .unwrap();
    let (status, after) = encrypt(&daemon, &key, b"data key two", b"bucket=a", "s3");
    assert_eq!(status, 200, "{after}");
    assert_ne!(
        before["ciphertextMetadata"], after["ciphertextMetadata"],
        "the metadata names the version that encrypted"
    );
    for (sealed, plaintext) in [
        (&before, &b"data key one"[..]),
        (&after, &b"data key two"[..]),
    ] {
        let (status, answer) = decrypt(&daemon, &key, sealed, b"bucket=a");
        assert_eq!(status, 200, "{answer}");
        assert_eq!(plaintext_of(&answer), plaintext);
    }
    // The metadata is bound into the tag: naming the other version fails as tampering.
    let mut swapped = before.clone();
    swapped["ciphertextMetadata"] = after["ciphertextMetadata"].clone();
    let (status, answer) = decrypt(&daemon, &key, &swapped, b"bucket=a");
    assert_eq!(
        (status, answer["errorName"].as_str()),
        (400, Some("InvalidCiphertextException"))
    );
    // The same key by its UUID form.
    let uuid = format!(
        "{}-{}-{}-{}-{}",
        &key[..8],
        &key[8..12],
        &key[12..16],
        &key[16..20],
        &key[20..]
    );
    let (status, answer) = decrypt(&daemon, &uuid, &after, b"bucket=a");
    assert_eq!(status, 200, "{answer}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_disabled_key_is_reported_disabled_and_refuses_use_with_invalid_state() {
    let daemon = DevDaemon::start();
    let key = dev_env(&daemon)["KEY_ID"].clone();
    let (status, answer) = key_metadata(&daemon, &key);
    assert_eq!(status, 200, "{answer}");
    assert_eq!(
        answer,
        json!({"keySpec": "AES_256", "keyUsage": ["ENCRYPT", "DECRYPT"], "keyStatus": "ENABLED"})
    );
    let (_, sealed) = encrypt(&daemon, &key, b"secret", b"", "s3");
    let mut keys = daemon.keys().await;
    keys.disable_key(KeyRef {
        key_id: format!("key/{key}"),
    })
    .await
    .unwrap();
    let (status, answer) = key_metadata(&daemon, &key);
    assert_eq!(
        (status, answer["keyStatus"].as_str()),
        (200, Some("DISABLED"))
    );
    for (status, answer) in [
        encrypt(&daemon, &key, b"secret", b"", "s3"),
        decrypt(&daemon, &key, &sealed, b""),
    ] {
        assert_eq!(
            (status, answer["errorName"].as_str()),
            (400, Some("InvalidStateException")),
            "{answer}"
        );
    }
    keys.enable_key(KeyRef {
        key_id: format!("key/{key}"),
    })
    .await
    .unwrap();
    let (status, answer) = decrypt(&daemon, &key, &sealed, b"");
    assert_eq!(status, 200, "{answer}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_policy_can_require_request_metadata_and_a_denial_names_the_grant() {
    let daemon = DevDaemon::start();
    let key = dev_env(&daemon)["KEY_ID"].clone();
    let policy_path = daemon.dir().join("policy.toml");
    let policy = std::fs::read_to_string(&policy_path).unwrap();
    let start = policy
        .find("\n[[grant]]\ndescription = \"dev: AWS KMS")
        .expect("the dev XKS grant");
    let restricted = format!(
        "{}\n[[grant]]\ndescription = \"S3 in account 111122223333\"\nprincipals = [\"xks:dev\"]\noperations = [\"xks\"]\nkeys = [\"key/*\"]\nrequire_request = {{ kmsViaService = \"s3\", awsPrincipalArn = \"arn:aws:iam::111122223333:*\" }}\n",
        &policy[..start]
    );
    std::fs::write(&policy_path, restricted).unwrap();
    daemon.signal(libc::SIGHUP);
    eventually("the restricted policy is in force", || async {
        encrypt(&daemon, &key, b"x", b"", "ebs").0 == 403
    })
    .await;
    let (status, answer) = encrypt(&daemon, &key, b"x", b"", "ebs");
    assert_eq!(answer["errorName"], "AccessDeniedException");
    assert_eq!(status, 403);
    // The caller learns nothing of the policy: no grant, no pattern.
    let message = answer["errorMessage"].as_str().unwrap();
    assert!(
        !message.contains("grant") && !message.contains("111122223333"),
        "{message}"
    );
    let (status, answer) = encrypt(&daemon, &key, b"x", b"", "s3");
    assert_eq!(status, 200, "{answer}");
    // The denial's audit line says which grant refused it, with the request metadata.
    let lines = daemon.audit_lines();
    let denial = lines
        .iter()
        .rev()
        .find(|l| l.operation == "XksEncrypt" && l.outcome == "PERMISSION_DENIED")
        .expect("the denial is audited");
    let why = denial.error.as_deref().unwrap_or_default();
    assert!(
        why.contains("grant 3") && why.contains("S3 in account") && why.contains("kmsViaService"),
        "{denial:?}"
    );
    assert_eq!(
        denial.request_metadata.as_ref().unwrap()["kmsViaService"],
        "ebs"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_wrapd_blobs_ciphertext_cannot_be_decrypted_through_the_xks_api() {
    let daemon = DevDaemon::start();
    let key = dev_env(&daemon)["KEY_ID"].clone();
    let generated = daemon
        .data()
        .await
        .generate_data_key(GenerateDataKeyRequest {
            key_id: format!("key/{key}"),
            encryption_context: HashMap::new(),
            number_of_bytes: 32,
        })
        .await
        .unwrap()
        .into_inner();
    let blob = wrapd::blob::Blob::parse(&generated.ciphertext_blob).unwrap();
    let (ciphertext, tag) = blob.ciphertext.split_at(blob.ciphertext.len() - 16);
    let header = wrapd::blob::Blob::header(&blob.key_id, blob.key_version);
    // Whatever AAD the caller offers (the blob's own included), the XKS API binds its own
    // lengths and metadata around it: the tag never verifies.
    for aad in [Vec::new(), header.clone(), header[2..].to_vec()] {
        let sealed = json!({
            "ciphertext": B64.encode(ciphertext),
            "ciphertextMetadata": B64.encode([1, 0, 0, 0, 1]),
            "initializationVector": B64.encode(blob.iv),
            "authenticationTag": B64.encode(tag),
        });
        let (status, answer) = decrypt(&daemon, &key, &sealed, &aad);
        assert_eq!(
            (status, answer["errorName"].as_str()),
            (400, Some("InvalidCiphertextException")),
            "{answer}"
        );
    }
}

#[test]
fn paths_methods_and_the_load_balancer_check_answer_as_the_specification_says() {
    let daemon = DevDaemon::start();
    let key = dev_env(&daemon)["KEY_ID"].clone();
    let body = json!({ "requestMetadata": request_metadata("DescribeKey", "") });
    let (status, answer) = xks(
        &daemon,
        "GET",
        &format!("kms/xks/v1/keys/{key}/metadata"),
        &body,
    );
    assert_eq!(status, 405, "{answer}");
    let (status, answer) = xks(
        &daemon,
        "POST",
        &format!("kms/xks/v1/keys/{key}/sign"),
        &body,
    );
    assert_eq!(
        (status, answer["errorName"].as_str()),
        (404, Some("InvalidUriPathException"))
    );
    let (status, answer) = xks(&daemon, "POST", "kms/xks/v2/health", &body);
    assert_eq!(
        (status, answer["errorName"].as_str()),
        (404, Some("InvalidUriPathException"))
    );
    // A key named by alias is not found: AWS KMS binds a key id for good.
    let (status, answer) = key_metadata(&daemon, "alias-xks-dev");
    assert_eq!(
        (status, answer["errorName"].as_str()),
        (404, Some("KeyNotFoundException"))
    );
    let env = dev_env(&daemon);
    let ping = Command::new("curl")
        .args(["--silent", "--cacert", &env["XKS_CA"], "-w", "%{http_code}"])
        .arg(format!("https://{}/ping", env["XKS_PROXY_HOST"]))
        .output()
        .unwrap();
    assert_eq!(String::from_utf8_lossy(&ping.stdout), "pong\n200");
    // The health answer reports the token's real state.
    let health =
        json!({ "requestMetadata": { "kmsOperation": "KmsHealthCheck", "kmsRequestId": "h1" } });
    let (status, answer) = xks(&daemon, "POST", "kms/xks/v1/health", &health);
    assert_eq!(status, 200, "{answer}");
    assert_eq!(answer["ekmFleetDetails"][0]["healthStatus"], "ACTIVE");
    assert!(answer["xksProxyFleetSize"].as_u64().unwrap() >= 1);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_key_stores_credentials_rotate_on_sighup_with_two_accepted_at_once() {
    let daemon = DevDaemon::start();
    let env = dev_env(&daemon);
    let health =
        json!({ "requestMetadata": { "kmsOperation": "KmsHealthCheck", "kmsRequestId": "h1" } });
    let url = format!(
        "https://{}/{}/kms/xks/v1/health",
        env["XKS_PROXY_HOST"], env["URI_PREFIX"]
    );
    let status = |id: &str, secret: &str| {
        let out = Command::new("curl")
            .args(["--silent", "--cacert", &env["XKS_CA"], "-o", "/dev/null"])
            .args(["-w", "%{http_code}", "-H", "Content-Type:application/json"])
            .args(["--aws-sigv4", "aws:amz:us-east-1:kms-xks-proxy"])
            .args(["--user", &format!("{id}:{secret}")])
            .args(["--data-binary", &health.to_string(), &url])
            .output()
            .unwrap();
        String::from_utf8_lossy(&out.stdout).into_owned()
    };
    let (first_id, first_secret) = (
        env["SIGV4_ACCESS_KEY_ID"].clone(),
        env["SIGV4_SECRET_ACCESS_KEY"].clone(),
    );
    let (second_id, second_secret) = (
        "SECONDCREDENTIAL2345ABCD",
        "SecondSecretOfFortyThreeOrMoreCharacters0123456789",
    );
    let second_file = daemon.dir().join("xks/second");
    std::fs::write(&second_file, second_secret).unwrap();
    std::fs::set_permissions(&second_file, std::fs::Permissions::from_mode(0o600)).unwrap();
    assert_eq!(
        status(second_id, second_secret),
        "401",
        "not configured yet"
    );

    // The specification's rotation, step 1: both credentials accepted, without a restart.
    let config_path = daemon.config_path();
    let first_block =
        format!("[[xks.keystore.credential]]\nid = \"{first_id}\"\nsecret_file = \"xks/secret\"\n");
    let second_block = format!(
        "[[xks.keystore.credential]]\nid = \"{second_id}\"\nsecret_file = \"xks/second\"\n"
    );
    let config = std::fs::read_to_string(&config_path).unwrap();
    assert!(config.contains(&first_block), "{config}");
    std::fs::write(
        &config_path,
        config.replace(&first_block, &format!("{first_block}\n{second_block}")),
    )
    .unwrap();
    daemon.signal(libc::SIGHUP);
    eventually("the second credential is accepted", || async {
        status(second_id, second_secret) == "200"
    })
    .await;
    assert_eq!(status(&first_id, &first_secret), "200");
    assert_eq!(
        status(second_id, &first_secret),
        "401",
        "each id with its own secret"
    );

    // Step 4: the old one removed.
    let config = std::fs::read_to_string(&config_path).unwrap();
    std::fs::write(
        &config_path,
        config.replace(&format!("{first_block}\n"), ""),
    )
    .unwrap();
    daemon.signal(libc::SIGHUP);
    eventually("the first credential is refused", || async {
        status(&first_id, &first_secret) == "401"
    })
    .await;
    assert_eq!(status(second_id, second_secret), "200");

    // An invalid [xks] section leaves the key stores in force.
    let config = std::fs::read_to_string(&config_path).unwrap();
    std::fs::write(&config_path, config.replace(second_id, "SHORT")).unwrap();
    daemon.signal(libc::SIGHUP);
    eventually("the reload is refused", || async {
        daemon
            .log()
            .contains("the previous key stores stay in force")
    })
    .await;
    assert_eq!(status(second_id, second_secret), "200");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_key_store_over_its_request_quota_is_answered_throttling() {
    let daemon = DevDaemon::start();
    let key = dev_env(&daemon)["KEY_ID"].clone();
    let config_path = daemon.config_path();
    let config = std::fs::read_to_string(&config_path).unwrap();
    std::fs::write(
        &config_path,
        config.replace(
            "principal = \"xks:dev\"\n",
            "principal = \"xks:dev\"\nrequests_per_second = 1\n",
        ),
    )
    .unwrap();
    daemon.signal(libc::SIGHUP);
    eventually("the quota is in force", || async {
        daemon.log().contains("SIGHUP: XKS key stores reloaded")
    })
    .await;
    let answers: Vec<(u16, Value)> = (0..10).map(|_| key_metadata(&daemon, &key)).collect();
    assert_eq!(answers[0].0, 200, "{:?}", answers[0]);
    let throttled = answers
        .iter()
        .filter(|(status, answer)| *status == 429 && answer["errorName"] == "ThrottlingException")
        .count();
    assert!(throttled >= 1, "{answers:?}");
    assert!(
        answers
            .iter()
            .all(|(status, _)| *status == 200 || *status == 429),
        "{answers:?}"
    );
}

#[test]
fn with_mutual_tls_only_aws_kmss_subject_completes_a_handshake() {
    let mut daemon = DevDaemon::start();
    let pki = daemon.dir().join("pki");
    let subject = "cks.kms.us-east-1.amazonaws.com";
    let issued = Command::new(env!("CARGO_BIN_EXE_wrapd"))
        .args(["pki", "issue", "--dir"])
        .arg(&pki)
        .args(["client", "--cn", subject, "--out", "kms"])
        .output()
        .unwrap();
    assert!(issued.status.success(), "{issued:?}");
    let config_path = daemon.config_path();
    let config = std::fs::read_to_string(&config_path).unwrap();
    let listener = "key = \"pki/server.key\"\n\n[[xks.keystore]]";
    assert!(config.contains(listener), "{config}");
    std::fs::write(
        &config_path,
        config.replace(
            listener,
            &format!("key = \"pki/server.key\"\nclient_ca = \"pki/ca.pem\"\nclient_subject = \"{subject}\"\n\n[[xks.keystore]]"),
        ),
    )
    .unwrap();
    daemon.restart();
    let env = dev_env(&daemon);
    // AWS's client, with the certificate AWS KMS would present: its 35 tests, and its two
    // negative ones (an expired and a self-signed certificate end the handshake).
    let summary = run_test_client(&env, Some((&pki.join("kms.key"), &pki.join("kms.pem"))));
    assert_eq!(summary, "All 37 tests PASSED.");
    // A certificate of the same CA naming another subject, and none at all, are refused.
    for cert in [Some("client"), None] {
        let mut curl = Command::new("curl");
        curl.args(["--silent", "--cacert", &env["XKS_CA"], "-o", "/dev/null"]);
        if let Some(name) = cert {
            curl.arg("--cert")
                .arg(pki.join(format!("{name}.pem")))
                .arg("--key")
                .arg(pki.join(format!("{name}.key")));
        }
        let out = curl
            .arg(format!("https://{}/ping", env["XKS_PROXY_HOST"]))
            .output()
            .unwrap();
        assert!(!out.status.success(), "{cert:?} completed a handshake");
    }
}
