//! The Kubernetes KMS v2 plugin socket, driven by a client generated from the same proto as
//! a kube-apiserver's: status, rotation, round trips, bad ciphertexts, an unavailable token.

use crate::common;

use common::{DevDaemon, assert_code, eventually};
use tonic::Code;
use tonic::transport::Channel;
use tonic_health::pb::HealthCheckRequest;
use tonic_health::pb::health_check_response::ServingStatus;
use tonic_health::pb::health_client::HealthClient;
use wrapd::client::connect_unix;
use wrapd::kms_proto::key_management_service_client::KeyManagementServiceClient;
use wrapd::kms_proto::{DecryptRequest, EncryptRequest, StatusRequest, StatusResponse};
use wrapd::proto::KeyRef;

async fn kms(daemon: &DevDaemon) -> KeyManagementServiceClient<Channel> {
    KeyManagementServiceClient::new(connect_unix(daemon.kms_socket()).await.unwrap())
}

async fn status(client: &mut KeyManagementServiceClient<Channel>) -> StatusResponse {
    client.status(StatusRequest {}).await.unwrap().into_inner()
}

fn decrypt(ciphertext: &[u8], key_id: &str, uid: &str) -> DecryptRequest {
    DecryptRequest {
        ciphertext: ciphertext.to_vec(),
        uid: uid.into(),
        key_id: key_id.into(),
        annotations: Default::default(),
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn status_encrypt_decrypt_across_rotations() {
    let daemon = DevDaemon::start();
    let mut client = kms(&daemon).await;
    let mut keys = daemon.keys().await;
    let key = keys
        .describe_key(KeyRef {
            key_id: "alias/kubernetes".into(),
        })
        .await
        .expect("wrapd dev creates alias/kubernetes")
        .into_inner();

    let first = status(&mut client).await;
    assert_eq!(first.version, "v2");
    assert_eq!(first.healthz, "ok");
    assert_eq!(first.key_id, format!("{}:1", key.key_id));

    // Encrypt/decrypt across two rotations; every earlier ciphertext keeps decrypting.
    let mut issued = Vec::new();
    for round in 1..=3u32 {
        let dek = vec![round as u8; 32];
        let encrypted = client
            .encrypt(EncryptRequest {
                plaintext: dek.clone(),
                uid: format!("uid-enc-{round}"),
            })
            .await
            .unwrap()
            .into_inner();
        assert_eq!(encrypted.key_id, format!("{}:{round}", key.key_id));
        assert!(encrypted.ciphertext.len() < 1024 && encrypted.key_id.len() < 1024);
        for name in encrypted.annotations.keys() {
            assert!(
                name.contains('.'),
                "annotation keys are fully qualified: {name}"
            );
        }
        issued.push((dek, encrypted));
        if round < 3 {
            keys.rotate_key(KeyRef {
                key_id: "alias/kubernetes".into(),
            })
            .await
            .unwrap();
            let after = status(&mut client).await;
            assert_eq!(
                after.key_id,
                format!("{}:{}", key.key_id, round + 1),
                "key_id follows rotation"
            );
            assert_eq!(after.healthz, "ok");
        }
    }
    for (i, (dek, encrypted)) in issued.iter().enumerate() {
        let plaintext = client
            .decrypt(decrypt(
                &encrypted.ciphertext,
                &encrypted.key_id,
                &format!("uid-dec-{i}"),
            ))
            .await
            .unwrap()
            .into_inner()
            .plaintext;
        assert_eq!(&plaintext, dek);
    }

    // A corrupted ciphertext, a key_id that does not go with it, an unknown key_id.
    let (_, encrypted) = &issued[0];
    let mut corrupted = encrypted.ciphertext.clone();
    let last = corrupted.len() - 1;
    corrupted[last] ^= 0x01;
    assert_code(
        client
            .decrypt(decrypt(&corrupted, &encrypted.key_id, "u"))
            .await,
        Code::InvalidArgument,
    );
    assert_code(
        client
            .decrypt(decrypt(&encrypted.ciphertext, &issued[1].1.key_id, "u"))
            .await,
        Code::InvalidArgument,
    );
    assert_code(
        client
            .decrypt(decrypt(
                &encrypted.ciphertext,
                "key/00000000000000000000000000000000:1",
                "u",
            ))
            .await,
        Code::InvalidArgument,
    );
    assert_code(
        client
            .decrypt(decrypt(b"not a blob", &encrypted.key_id, "u"))
            .await,
        Code::InvalidArgument,
    );
    // Requests larger than the API allows.
    assert_code(
        client
            .encrypt(EncryptRequest {
                plaintext: vec![0; 4096],
                uid: "big".into(),
            })
            .await,
        Code::InvalidArgument,
    );
    assert_code(
        client
            .encrypt(EncryptRequest {
                plaintext: vec![],
                uid: "empty".into(),
            })
            .await,
        Code::InvalidArgument,
    );
    let huge = client
        .decrypt(decrypt(&vec![0; 200 * 1024], &encrypted.key_id, "huge"))
        .await
        .expect_err("an oversized message must be refused");
    assert!(
        matches!(
            huge.code(),
            Code::ResourceExhausted | Code::InvalidArgument | Code::OutOfRange
        ),
        "{huge:?}"
    );

    // The apiserver's uid is the audit request id, under the plugin's principal.
    let audit = daemon.audit_lines();
    let decrypted = audit
        .iter()
        .find(|r| r.request_id == "uid-dec-0")
        .expect("uid audited");
    assert_eq!(decrypted.operation, "Unwrap");
    assert_eq!(decrypted.principal, wrapd::dev::KMS_PRINCIPAL);
    assert_eq!(decrypted.transport, "kms");
    assert_eq!(decrypted.outcome, "OK");
    assert!(
        audit.iter().any(|r| r.request_id == "uid-enc-3"
            && r.operation == "Wrap"
            && r.key_version == Some(3))
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn healthz_is_not_ok_when_the_key_cannot_be_used() {
    let mut daemon = DevDaemon::start();
    // A short health cache so that the test sees changes quickly.
    daemon.stop();
    let config = std::fs::read_to_string(daemon.config_path()).unwrap();
    std::fs::write(
        daemon.config_path(),
        config.replace("healthz_cache_ms = 5000", "healthz_cache_ms = 50"),
    )
    .unwrap();
    daemon.restart_stopped();
    let mut client = kms(&daemon).await;
    assert_eq!(status(&mut client).await.healthz, "ok");

    // The token loses the key material (the object files disappear from the token dir):
    // the round trip fails, healthz says why, and Encrypt is UNAVAILABLE.
    let tokens = daemon.dir().join("tokens");
    let moved = daemon.dir().join("tokens-away");
    std::fs::rename(&tokens, &moved).unwrap();
    eventually("healthz reports the token problem", || {
        let mut client = client.clone();
        async move { status(&mut client).await.healthz != "ok" }
    })
    .await;
    let encrypted = client
        .encrypt(EncryptRequest {
            plaintext: vec![7; 32],
            uid: "u".into(),
        })
        .await;
    assert!(
        encrypted.is_err(),
        "encrypt must fail while the token is away"
    );
    let health = HealthClient::new(daemon.channel().await);
    let serving = |health: HealthClient<Channel>| async move {
        let mut health = health;
        health
            .check(HealthCheckRequest {
                service: String::new(),
            })
            .await
            .map(|r| r.into_inner().status == ServingStatus::Serving as i32)
            .unwrap_or(false)
    };
    eventually("gRPC health says NOT_SERVING", || {
        let health = health.clone();
        async move { !serving(health).await }
    })
    .await;

    // The token comes back: healthy again, without a restart.
    std::fs::rename(&moved, &tokens).unwrap();
    eventually("healthz is ok again", || {
        let mut client = client.clone();
        async move { status(&mut client).await.healthz == "ok" }
    })
    .await;
    eventually("gRPC health says SERVING again", || {
        let health = health.clone();
        async move { serving(health).await }
    })
    .await;

    // A disabled key is not healthy either.
    let mut keys = daemon.keys().await;
    keys.disable_key(KeyRef {
        key_id: "alias/kubernetes".into(),
    })
    .await
    .unwrap();
    eventually("healthz reports the disabled key", || {
        let mut client = client.clone();
        async move { status(&mut client).await.healthz.contains("disabled") }
    })
    .await;
}

async fn encrypt(
    client: &mut KeyManagementServiceClient<Channel>,
    dek: &[u8],
) -> (Vec<u8>, String) {
    let encrypted = client
        .encrypt(EncryptRequest {
            plaintext: dek.to_vec(),
            uid: "uid-enc".into(),
        })
        .await
        .unwrap()
        .into_inner();
    (encrypted.ciphertext, encrypted.key_id)
}

/// The plugin binds its blobs to a reserved context, so a principal with Unwrap on the key
/// over the main API cannot open the apiserver's DEK seeds, and no main-API caller can name
/// the reserved context.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn main_api_callers_cannot_unwrap_the_plugins_blobs() {
    let daemon = DevDaemon::start();
    let mut client = kms(&daemon).await;
    let (blob, _) = encrypt(&mut client, &[7u8; 32]).await;
    // The dev user may do everything on every key over the main API.
    let mut data = daemon.data().await;
    let unwrap = |context: &[(&str, &str)]| wrapd::proto::UnwrapRequest {
        ciphertext_blob: blob.clone(),
        encryption_context: common::ctx(context),
        key_id: String::new(),
    };
    assert_code(data.unwrap(unwrap(&[])).await, Code::InvalidArgument);
    let reserved = assert_code(
        data.unwrap(unwrap(&[("wrapd:purpose", "kubernetes-kms-v2")]))
            .await,
        Code::InvalidArgument,
    );
    assert!(
        reserved.message().contains("reserved"),
        "{}",
        reserved.message()
    );
    assert_code(
        data.generate_data_key(wrapd::proto::GenerateDataKeyRequest {
            key_id: "alias/kubernetes".into(),
            encryption_context: common::ctx(&[("wrapd:x", "y")]),
            number_of_bytes: 32,
        })
        .await,
        Code::InvalidArgument,
    );
}

/// After `alias/kubernetes` is re-pointed to another key, the plugin still decrypts every
/// blob it issued under the old key (the shipped policy grants the plugin only
/// `alias/kubernetes`), and encrypts under the new one.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn blobs_issued_before_the_alias_moved_still_decrypt() {
    let daemon = DevDaemon::start();
    let mut client = kms(&daemon).await;
    let (old_blob, old_key_id) = encrypt(&mut client, &[1u8; 32]).await;
    let mut keys = daemon.keys().await;
    let new_key = common::create_key(&mut keys, "").await;
    keys.update_alias(wrapd::proto::AliasRequest {
        alias_name: "alias/kubernetes".into(),
        key_id: new_key.key_id.clone(),
    })
    .await
    .unwrap();
    let plaintext = client
        .decrypt(decrypt(&old_blob, &old_key_id, "uid-dec"))
        .await
        .expect("a blob the plugin issued before the alias moved")
        .into_inner()
        .plaintext;
    assert_eq!(plaintext, [1u8; 32]);
    let (new_blob, new_key_id) = encrypt(&mut client, &[2u8; 32]).await;
    assert_eq!(new_key_id, format!("{}:1", new_key.key_id));
    let back = client
        .decrypt(decrypt(&new_blob, &new_key_id, "uid-dec-2"))
        .await
        .unwrap()
        .into_inner()
        .plaintext;
    assert_eq!(back, [2u8; 32]);
}

/// Status is not healthy while the audit log fails closed.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn status_is_unhealthy_while_the_audit_log_fails_closed() {
    let daemon = DevDaemon::start();
    let mut client = kms(&daemon).await;
    assert_eq!(status(&mut client).await.healthz, "ok");
    let audit = daemon.dir().join("audit.log");
    std::fs::rename(&audit, daemon.dir().join("audit.log.1")).unwrap();
    std::fs::create_dir(&audit).unwrap();
    daemon.signal(libc::SIGHUP);
    eventually("healthz reports the audit log", || {
        let mut client = client.clone();
        async move { status(&mut client).await.healthz.contains("audit log") }
    })
    .await;
    std::fs::remove_dir(&audit).unwrap();
    daemon.signal(libc::SIGHUP);
    eventually("healthz recovers", || {
        let mut client = client.clone();
        async move { status(&mut client).await.healthz == "ok" }
    })
    .await;
}

/// Each version of `alias/kubernetes` and its unwraps so far, as DescribeKey reports them.
async fn unwraps(daemon: &DevDaemon) -> Vec<(u32, u64)> {
    daemon
        .keys()
        .await
        .describe_key(KeyRef {
            key_id: "alias/kubernetes".into(),
        })
        .await
        .unwrap()
        .into_inner()
        .versions
        .iter()
        .map(|v| (v.version, v.usage.map_or(0, |u| u.unwraps)))
        .collect()
}

/// Rotation end to end for the API server: secrets written before a rotation decrypt after
/// it; once a storage migration has re-encrypted them (what `kubectl get secrets -A -o json |
/// kubectl replace -f -` makes the API server do), reads no longer touch the old version,
/// the version usage shows it, and retiring the old version breaks nothing.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn after_a_rotation_and_a_storage_migration_the_old_version_is_unused_and_retires_safely() {
    let mut daemon = DevDaemon::start();
    let mut client = kms(&daemon).await;
    let mut secrets = Vec::new();
    for i in 0..5u8 {
        secrets.push((vec![i; 32], encrypt(&mut client, &[i; 32]).await));
    }
    let key_id = status(&mut client).await.key_id;
    daemon
        .keys()
        .await
        .rotate_key(KeyRef {
            key_id: "alias/kubernetes".into(),
        })
        .await
        .unwrap();
    // Status names the new version: the API server re-encrypts on its next write.
    let rotated = status(&mut client).await.key_id;
    assert_ne!(rotated, key_id);
    assert!(rotated.ends_with(":2"), "{rotated}");

    // The storage migration: every secret read (old version) and written again (new).
    let mut migrated = Vec::new();
    for (dek, (ciphertext, key_id)) in &secrets {
        let read = client
            .decrypt(decrypt(ciphertext, key_id, "migrate"))
            .await
            .expect("written before the rotation")
            .into_inner()
            .plaintext;
        assert_eq!(&read, dek);
        let (ciphertext, key_id) = encrypt(&mut client, &read).await;
        assert!(key_id.ends_with(":2"), "{key_id}");
        migrated.push((dek.clone(), ciphertext, key_id));
    }
    // Counted at shutdown: the old version served exactly the migration's reads.
    daemon.restart();
    let after_migration = unwraps(&daemon).await;
    assert_eq!(after_migration, vec![(1, 5), (2, 0)]);

    // Reads after the migration use the new version only.
    let mut client = kms(&daemon).await;
    for (dek, ciphertext, key_id) in &migrated {
        let read = client
            .decrypt(decrypt(ciphertext, key_id, "read"))
            .await
            .unwrap()
            .into_inner()
            .plaintext;
        assert_eq!(&read, dek);
    }
    daemon.restart();
    assert_eq!(
        unwraps(&daemon).await,
        vec![(1, 5), (2, 5)],
        "version 1 is no longer used"
    );

    // Retiring it breaks nothing the API server still reads.
    daemon
        .keys()
        .await
        .retire_key_version(wrapd::proto::KeyVersionRequest {
            key_id: "alias/kubernetes".into(),
            version: 1,
        })
        .await
        .unwrap();
    let mut client = kms(&daemon).await;
    for (dek, ciphertext, key_id) in &migrated {
        let read = client
            .decrypt(decrypt(ciphertext, key_id, "after-retire"))
            .await
            .expect("migrated secrets read after the old version is retired")
            .into_inner()
            .plaintext;
        assert_eq!(&read, dek);
    }
    assert_eq!(status(&mut client).await.healthz, "ok");
}

/// With `[kms] bind_principal`, a blob names the plugin's principal: a daemon whose plugin
/// acts as another principal (another cluster's, granted the same key) cannot open it,
/// while it still opens the blobs made before, which name none.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_blob_bound_to_the_plugins_principal_opens_only_for_that_principal() {
    let mut daemon = DevDaemon::start();
    let (unbound, unbound_key_id) = encrypt(&mut kms(&daemon).await, &[1u8; 32]).await;
    let config = std::fs::read_to_string(daemon.config_path()).unwrap();
    let bound_config = config.replacen("[kms]\n", "[kms]\nbind_principal = true\n", 1);
    assert_ne!(bound_config, config, "{config}");
    std::fs::write(daemon.config_path(), &bound_config).unwrap();
    daemon.restart();
    let mut client = kms(&daemon).await;
    let (bound, bound_key_id) = encrypt(&mut client, &[2u8; 32]).await;
    for (blob, key_id, dek) in [(&bound, &bound_key_id, 2u8), (&unbound, &unbound_key_id, 1)] {
        let plaintext = client
            .decrypt(decrypt(blob, key_id, "uid-same"))
            .await
            .expect("its own blobs, bound or from before")
            .into_inner()
            .plaintext;
        assert_eq!(plaintext, [dek; 32]);
    }

    // Another cluster's plugin: another principal, granted the same alias.
    let principal = bound_config
        .lines()
        .skip_while(|l| *l != "[kms]")
        .find_map(|l| l.strip_prefix("principal = "))
        .unwrap()
        .trim_matches('"')
        .to_owned();
    std::fs::write(
        daemon.config_path(),
        bound_config.replacen(
            &format!("principal = \"{principal}\""),
            "principal = \"wrapd:other-cluster\"",
            1,
        ),
    )
    .unwrap();
    let policy = daemon.dir().join("policy.toml");
    let mut text = std::fs::read_to_string(&policy).unwrap();
    text.push_str(
        "\n[[grant]]\nprincipals = [\"wrapd:other-cluster\"]\noperations = [\"Wrap\", \
         \"Unwrap\"]\nkeys = [\"alias/kubernetes\"]\n",
    );
    std::fs::write(&policy, text).unwrap();
    daemon.restart();
    let mut other = kms(&daemon).await;
    let refused = other
        .decrypt(decrypt(&bound, &bound_key_id, "uid-other"))
        .await
        .expect_err("a blob bound to another plugin's principal");
    assert_ne!(refused.code(), Code::Ok);
    let plaintext = other
        .decrypt(decrypt(&unbound, &unbound_key_id, "uid-other-2"))
        .await
        .expect("a blob that names no principal: any plugin granted its key")
        .into_inner()
        .plaintext;
    assert_eq!(plaintext, [1u8; 32]);
}

/// A context the key policy refuses is passed over, not the end of the Decrypt: with the
/// principal-bound context denied, a blob from before binding still opens, and a bound one is
/// refused as denied (not as a bad ciphertext).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_context_the_key_policy_refuses_leaves_the_others_to_open_the_blob() {
    let mut daemon = DevDaemon::start();
    let mut client = kms(&daemon).await;
    let (unbound, unbound_key_id) = encrypt(&mut client, &[1u8; 32]).await;
    let key_id = unbound_key_id.rsplit_once(':').unwrap().0.to_owned();
    let policy = serde_json::json!({
        "Version": "2012-10-17",
        "Statement": [
            {"Effect": "Allow", "Principal": {"AWS": "arn:aws:iam::111122223333:root"},
             "Action": "kms:*", "Resource": "*"},
            {"Effect": "Deny", "Principal": "*", "Action": "kms:Decrypt", "Resource": "*",
             "Condition": {"Null": {"kms:EncryptionContext:wrapd:kms-principal": "false"}}},
        ]
    });
    daemon
        .keys()
        .await
        .put_key_policy(wrapd::proto::PutKeyPolicyRequest {
            key_id,
            policy: policy.to_string(),
            bypass_lockout_check: true,
            ..Default::default()
        })
        .await
        .unwrap();
    let config = std::fs::read_to_string(daemon.config_path()).unwrap();
    std::fs::write(
        daemon.config_path(),
        config.replacen("[kms]\n", "[kms]\nbind_principal = true\n", 1),
    )
    .unwrap();
    daemon.restart();
    let mut client = kms(&daemon).await;
    let plaintext = client
        .decrypt(decrypt(&unbound, &unbound_key_id, "uid-unbound"))
        .await
        .expect("the unbound context is allowed, though the bound one, tried first, is not")
        .into_inner()
        .plaintext;
    assert_eq!(plaintext, [1u8; 32]);
    let (bound, bound_key_id) = encrypt(&mut client, &[2u8; 32]).await;
    assert_code(
        client
            .decrypt(decrypt(&bound, &bound_key_id, "uid-bound"))
            .await,
        Code::PermissionDenied,
    );
}
