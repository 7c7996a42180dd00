//! The audit log over a real daemon: every RPC leaves a line with the right principal and
//! outcome, tampering is caught by `wrapctl audit verify`, and an unwritable log fails closed.

use crate::common;

use std::process::Command;

use base64::Engine;
use base64::engine::general_purpose::STANDARD as B64;
use common::{DevDaemon, assert_code, ctx, eventually};
use tonic::Code;
use tonic_health::pb::HealthCheckRequest;
use tonic_health::pb::health_check_response::ServingStatus;
use tonic_health::pb::health_client::HealthClient;
use wrapd::proto::{
    AliasRequest, CreateKeyRequest, GenerateDataKeyRequest, KeyRef, ListAliasesRequest,
    ListKeysRequest, ReWrapRequest, ScheduleKeyDeletionRequest, UnwrapRequest, WrapRequest,
};

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_rpc_is_audited_and_tampering_is_caught() {
    let daemon = DevDaemon::start();
    let mut keys = daemon.keys().await;
    let mut data = daemon.data().await;
    // (operation, expected outcome), in call order.
    let mut expected: Vec<(&str, &str)> = Vec::new();
    let mut secrets: Vec<Vec<u8>> = Vec::new();
    let context = ctx(&[("tenant", "acme"), ("purpose", "audit")]);

    let key = keys
        .create_key(CreateKeyRequest {
            description: "audited".into(),
            alias: "alias/audited".into(),
            ..Default::default()
        })
        .await
        .unwrap()
        .into_inner();
    expected.push(("CreateKey", "OK"));
    keys.describe_key(KeyRef {
        key_id: "alias/audited".into(),
    })
    .await
    .unwrap();
    expected.push(("DescribeKey", "OK"));
    keys.list_keys(ListKeysRequest::default()).await.unwrap();
    expected.push(("ListKeys", "OK"));
    let generated = data
        .generate_data_key(GenerateDataKeyRequest {
            key_id: key.key_id.clone(),
            encryption_context: context.clone(),
            number_of_bytes: 32,
        })
        .await
        .unwrap()
        .into_inner();
    secrets.push(generated.plaintext.clone());
    expected.push(("GenerateDataKey", "OK"));
    data.generate_data_key_without_plaintext(GenerateDataKeyRequest {
        key_id: key.key_id.clone(),
        encryption_context: context.clone(),
        number_of_bytes: 16,
    })
    .await
    .unwrap();
    expected.push(("GenerateDataKeyWithoutPlaintext", "OK"));
    let plaintext = b"audit me not 0xdeadbeef".to_vec();
    secrets.push(plaintext.clone());
    let wrapped = data
        .wrap(WrapRequest {
            key_id: key.key_id.clone(),
            plaintext,
            encryption_context: context.clone(),
        })
        .await
        .unwrap()
        .into_inner();
    expected.push(("Wrap", "OK"));
    data.unwrap(UnwrapRequest {
        ciphertext_blob: generated.ciphertext_blob.clone(),
        encryption_context: context.clone(),
        key_id: String::new(),
    })
    .await
    .unwrap();
    expected.push(("Unwrap", "OK"));
    assert_code(
        data.unwrap(UnwrapRequest {
            ciphertext_blob: wrapped.ciphertext_blob.clone(),
            encryption_context: ctx(&[]),
            key_id: String::new(),
        })
        .await,
        Code::InvalidArgument,
    );
    expected.push(("Unwrap", "INVALID_ARGUMENT"));
    data.re_wrap(ReWrapRequest {
        ciphertext_blob: wrapped.ciphertext_blob.clone(),
        source_encryption_context: context.clone(),
        destination_key_id: String::new(),
        destination_encryption_context: context.clone(),
    })
    .await
    .unwrap();
    expected.push(("ReWrap", "OK"));
    keys.rotate_key(KeyRef {
        key_id: key.key_id.clone(),
    })
    .await
    .unwrap();
    expected.push(("RotateKey", "OK"));
    keys.disable_key(KeyRef {
        key_id: key.key_id.clone(),
    })
    .await
    .unwrap();
    expected.push(("DisableKey", "OK"));
    keys.enable_key(KeyRef {
        key_id: key.key_id.clone(),
    })
    .await
    .unwrap();
    expected.push(("EnableKey", "OK"));
    keys.create_alias(AliasRequest {
        alias_name: "alias/second".into(),
        key_id: key.key_id.clone(),
    })
    .await
    .unwrap();
    expected.push(("CreateAlias", "OK"));
    assert_code(
        keys.create_alias(AliasRequest {
            alias_name: "alias/second".into(),
            key_id: key.key_id.clone(),
        })
        .await,
        Code::AlreadyExists,
    );
    expected.push(("CreateAlias", "ALREADY_EXISTS"));
    keys.update_alias(AliasRequest {
        alias_name: "alias/second".into(),
        key_id: key.key_id.clone(),
    })
    .await
    .unwrap();
    expected.push(("UpdateAlias", "OK"));
    keys.list_aliases(ListAliasesRequest::default())
        .await
        .unwrap();
    expected.push(("ListAliases", "OK"));
    keys.delete_alias(AliasRequest {
        alias_name: "alias/second".into(),
        key_id: String::new(),
    })
    .await
    .unwrap();
    expected.push(("DeleteAlias", "OK"));
    keys.schedule_key_deletion(ScheduleKeyDeletionRequest {
        key_id: key.key_id.clone(),
        pending_window_days: 7,
    })
    .await
    .unwrap();
    expected.push(("ScheduleKeyDeletion", "OK"));
    keys.cancel_key_deletion(KeyRef {
        key_id: key.key_id.clone(),
    })
    .await
    .unwrap();
    expected.push(("CancelKeyDeletion", "OK"));
    assert_code(
        keys.describe_key(KeyRef {
            key_id: "alias/missing".into(),
        })
        .await,
        Code::NotFound,
    );
    expected.push(("DescribeKey", "NOT_FOUND"));

    let lines = daemon.audit_lines();
    let got: Vec<(&str, &str)> = lines
        .iter()
        .map(|r| (r.operation.as_str(), r.outcome.as_str()))
        .collect();
    assert_eq!(
        got, expected,
        "one line per call, in order, with its outcome"
    );
    for (i, record) in lines.iter().enumerate() {
        assert_eq!(record.seq, i as u64 + 1);
        assert_eq!(record.principal, "unix:uid=0");
        assert_eq!(record.transport, "unix");
        assert!(!record.request_id.is_empty());
    }
    let generate = lines
        .iter()
        .find(|r| r.operation == "GenerateDataKey")
        .unwrap();
    assert_eq!(generate.key_id.as_deref(), Some(key.key_id.as_str()));
    assert_eq!(generate.key_version, Some(1));
    assert_eq!(generate.context_keys, ["purpose", "tenant"]);
    assert_eq!(generate.context_hash.as_ref().unwrap().len(), 64);

    // No plaintext, data key or context value in the file, in any common encoding.
    let text = std::fs::read_to_string(daemon.dir().join("audit.log")).unwrap();
    assert!(!text.contains("acme"), "a context value was logged");
    for secret in &secrets {
        for form in [
            hex::encode(secret),
            B64.encode(secret),
            String::from_utf8_lossy(secret).into_owned(),
        ] {
            assert!(
                !text.contains(&form),
                "a secret reached the audit log as {form:?}"
            );
        }
    }

    // `wrapctl audit verify`: intact, then edited, deleted and reordered lines.
    let verify = |content: &str| {
        let path = daemon.dir().join("audit-copy.log");
        std::fs::write(&path, content).unwrap();
        let out = Command::new(env!("CARGO_BIN_EXE_wrapctl"))
            .args(["audit", "verify"])
            .arg(&path)
            .output()
            .unwrap();
        (
            out.status.success(),
            String::from_utf8_lossy(&out.stdout).into_owned()
                + &String::from_utf8_lossy(&out.stderr),
        )
    };
    let (ok, out) = verify(&text);
    assert!(ok, "{out}");
    assert!(
        out.contains(&format!("records: {}", expected.len())),
        "{out}"
    );
    let original: Vec<&str> = text.lines().collect();
    let join = |l: &[&str]| l.join("\n") + "\n";

    let mut edited = original.clone();
    let changed = original[3].replace("\"outcome\":\"OK\"", "\"outcome\":\"PERMISSION_DENIED\"");
    assert_ne!(changed, original[3]);
    edited[3] = &changed;
    let (ok, out) = verify(&join(&edited));
    assert!(!ok && out.contains("line 4"), "edit: {out}");

    let mut deleted = original.clone();
    deleted.remove(5);
    let (ok, out) = verify(&join(&deleted));
    assert!(!ok && out.contains("line 6"), "deletion: {out}");

    let mut reordered = original.clone();
    reordered.swap(7, 8);
    let (ok, out) = verify(&join(&reordered));
    assert!(!ok && out.contains("line 8"), "reorder: {out}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_unwritable_audit_log_fails_closed() {
    let daemon = DevDaemon::start();
    let mut keys = daemon.keys().await;
    let data = daemon.data().await;
    let health = HealthClient::new(daemon.channel().await);
    let key = keys
        .create_key(CreateKeyRequest::default())
        .await
        .unwrap()
        .into_inner();
    let audit = daemon.dir().join("audit.log");
    let status = |mut health: HealthClient<tonic::transport::Channel>| async move {
        health
            .check(HealthCheckRequest {
                service: String::new(),
            })
            .await
            .unwrap()
            .into_inner()
            .status
    };
    let generate = || GenerateDataKeyRequest {
        key_id: key.key_id.clone(),
        ..Default::default()
    };

    for broken in ["directory", "device"] {
        // Rotate the log away and put something unwritable in its place, then reopen.
        std::fs::rename(&audit, daemon.dir().join(format!("audit.log.{broken}"))).unwrap();
        match broken {
            "directory" => std::fs::create_dir(&audit).unwrap(),
            _ => std::os::unix::fs::symlink("/dev/full", &audit).unwrap(),
        }
        daemon.signal(libc::SIGHUP);
        eventually("operations fail closed", || {
            let mut data = data.clone();
            let request = generate();
            async move {
                matches!(data.generate_data_key(request).await, Err(s) if s.code() == Code::Unavailable)
            }
        })
        .await;
        let refused = assert_code(
            keys.rotate_key(KeyRef {
                key_id: key.key_id.clone(),
            })
            .await,
            Code::Unavailable,
        );
        assert!(refused.message().contains("audit"), "{}", refused.message());
        eventually("health says NOT_SERVING", || {
            let health = health.clone();
            async move { status(health).await == ServingStatus::NotServing as i32 }
        })
        .await;

        // Repair and reopen: service resumes, health follows.
        if broken == "directory" {
            std::fs::remove_dir(&audit).unwrap();
        } else {
            std::fs::remove_file(&audit).unwrap();
        }
        daemon.signal(libc::SIGHUP);
        eventually("operations resume", || {
            let mut data = data.clone();
            let request = generate();
            async move { data.generate_data_key(request).await.is_ok() }
        })
        .await;
        eventually("health says SERVING", || {
            let health = health.clone();
            async move { status(health).await == ServingStatus::Serving as i32 }
        })
        .await;
    }

    // The rotated-away file and the new one each verify; the new one anchors to the old end.
    let old = std::fs::read_to_string(daemon.dir().join("audit.log.directory")).unwrap();
    let old = wrapd::audit::verify(old.as_bytes(), Some(wrapd::audit::GENESIS), None).unwrap();
    let mid = std::fs::read_to_string(daemon.dir().join("audit.log.device")).unwrap();
    let mid = wrapd::audit::verify(mid.as_bytes(), Some(&old.last_hash), None).unwrap();
    let new = std::fs::read_to_string(&audit).unwrap();
    wrapd::audit::verify(new.as_bytes(), Some(&mid.last_hash), None).unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_read_only_audit_file_fails_closed() {
    // Root ignores file modes; without CAP_DAC_OVERRIDE it obeys them like anyone else.
    let daemon = DevDaemon::start_with(
        &[],
        &[
            "setpriv",
            "--bounding-set",
            "-dac_override,-dac_read_search",
            "--",
        ],
    );
    let mut keys = daemon.keys().await;
    let key = keys
        .create_key(CreateKeyRequest::default())
        .await
        .unwrap()
        .into_inner();
    let audit = daemon.dir().join("audit.log");
    std::fs::set_permissions(&audit, std::os::unix::fs::PermissionsExt::from_mode(0o444)).unwrap();
    daemon.signal(libc::SIGHUP);
    // Poll with a read-only call, so nothing changes while the reopen is pending.
    eventually("operations fail closed on a read-only audit file", || {
        let mut keys = keys.clone();
        let key_id = key.key_id.clone();
        async move {
            matches!(keys.describe_key(KeyRef { key_id }).await, Err(s) if s.code() == Code::Unavailable)
        }
    })
    .await;
    assert_code(
        keys.rotate_key(KeyRef {
            key_id: key.key_id.clone(),
        })
        .await,
        Code::Unavailable,
    );
    let mut data = daemon.data().await;
    assert_code(
        data.generate_data_key(GenerateDataKeyRequest {
            key_id: key.key_id.clone(),
            ..Default::default()
        })
        .await,
        Code::Unavailable,
    );
    // Nothing was done behind the log's back: the rotation was refused before it happened.
    std::fs::set_permissions(&audit, std::os::unix::fs::PermissionsExt::from_mode(0o600)).unwrap();
    daemon.signal(libc::SIGHUP);
    eventually("operations resume", || {
        let mut keys = keys.clone();
        let key_id = key.key_id.clone();
        async move { keys.describe_key(KeyRef { key_id }).await.is_ok() }
    })
    .await;
    let described = keys
        .describe_key(KeyRef {
            key_id: key.key_id.clone(),
        })
        .await
        .unwrap()
        .into_inner();
    assert_eq!(described.current_version, 1);
    let text = std::fs::read_to_string(&audit).unwrap();
    wrapd::audit::verify(text.as_bytes(), Some(wrapd::audit::GENESIS), None).unwrap();
}

/// Log rotation (move the file + SIGHUP, again and again) under 32 concurrent callers never
/// hangs the daemon or fails a call, and the chain runs on across every file.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn rotation_under_load_never_hangs_and_the_chain_spans_the_files() {
    use std::sync::Arc;
    use std::sync::atomic::{AtomicBool, Ordering};
    use std::time::Duration;

    let daemon = DevDaemon::start();
    let mut keys = daemon.keys().await;
    let key = common::create_key(&mut keys, "").await.key_id;
    let stop = Arc::new(AtomicBool::new(false));
    let mut callers = Vec::new();
    for _ in 0..32 {
        let mut data = daemon.data().await;
        let (stop, key) = (stop.clone(), key.clone());
        callers.push(tokio::spawn(async move {
            let (mut ok, mut failed) = (0u64, Vec::new());
            while !stop.load(Ordering::Relaxed) {
                let call = data.generate_data_key(GenerateDataKeyRequest {
                    key_id: key.clone(),
                    ..Default::default()
                });
                // A caller stops at its first failure (a stuck or dead daemon must fail
                // the test, not make it spin).
                match tokio::time::timeout(Duration::from_secs(10), call).await {
                    Ok(Ok(_)) => ok += 1,
                    Ok(Err(status)) => {
                        failed.push(format!("{status:?}"));
                        break;
                    }
                    Err(_) => {
                        failed.push("no answer within 10 s".to_owned());
                        break;
                    }
                }
            }
            (ok, failed)
        }));
    }
    let audit = daemon.dir().join("audit.log");
    let rotations = 60;
    for i in 0..rotations {
        std::fs::rename(&audit, daemon.dir().join(format!("audit.log.{i}"))).unwrap();
        daemon.signal(libc::SIGHUP);
        let audit = audit.clone();
        eventually("the daemon reopens its log", move || {
            let exists = audit.exists();
            async move { exists }
        })
        .await;
        tokio::time::sleep(Duration::from_millis(15)).await;
    }
    stop.store(true, Ordering::Relaxed);
    let mut total = 0;
    for caller in callers {
        let (ok, failed) = tokio::time::timeout(Duration::from_secs(30), caller)
            .await
            .expect("every caller finishes")
            .unwrap();
        assert!(failed.is_empty(), "failed calls: {failed:?}");
        total += ok;
    }
    assert!(total > 0);
    // The control plane answers too.
    tokio::time::timeout(
        Duration::from_secs(5),
        keys.list_keys(ListKeysRequest::default()),
    )
    .await
    .expect("ListKeys answers after the rotations")
    .unwrap();

    // Every file verifies, each anchored to the end of the one before.
    let mut anchor = wrapd::audit::GENESIS.to_owned();
    let mut records = 0;
    for i in 0..=rotations {
        let path = if i == rotations {
            audit.clone()
        } else {
            daemon.dir().join(format!("audit.log.{i}"))
        };
        let text = std::fs::read_to_string(&path).unwrap();
        let verified = wrapd::audit::verify(text.as_bytes(), Some(&anchor), None)
            .unwrap_or_else(|e| panic!("{}: {e}", path.display()));
        records += verified.records;
        anchor = verified.last_hash;
    }
    let generated = total + 1; // + CreateKey
    assert!(
        records >= generated + rotations as u64,
        "{records} lines for {generated} calls and {rotations} reopen markers"
    );
}

/// The daemon anchors its chain in the metadata store. A log whose tail was cut while it was
/// stopped makes start-up fail with the way out; with `--accept-audit-gap` it starts and the
/// gap is in the chain, where `wrapctl audit verify` reports it.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_log_truncated_while_stopped_is_refused_then_recorded_as_a_gap() {
    let mut daemon = DevDaemon::start();
    let mut keys = daemon.keys().await;
    for _ in 0..3 {
        keys.create_key(CreateKeyRequest::default()).await.unwrap();
    }
    drop(keys);
    assert!(daemon.stop().success());
    let audit = daemon.dir().join("audit.log");
    let text = std::fs::read_to_string(&audit).unwrap();
    let kept: String = text.lines().take(1).map(|l| format!("{l}\n")).collect();
    std::fs::write(&audit, kept).unwrap();

    let refused = daemon.start_fails();
    assert!(
        refused.contains("does not reach the head") && refused.contains("--accept-audit-gap"),
        "{refused}"
    );

    daemon.set_args(&["--accept-audit-gap"]);
    daemon.restart_stopped();
    let mut keys = daemon.keys().await;
    keys.create_key(CreateKeyRequest::default()).await.unwrap();
    let lines = daemon.audit_lines();
    assert_eq!(lines[1].operation, wrapd::audit::GAP);
    let verify = |extra: &[&str]| {
        Command::new(env!("CARGO_BIN_EXE_wrapctl"))
            .args(["audit", "verify"])
            .arg(&audit)
            .args(extra)
            .output()
            .unwrap()
    };
    let strict = verify(&[]);
    assert!(!strict.status.success());
    assert!(
        String::from_utf8_lossy(&strict.stderr).contains("gap"),
        "{}",
        String::from_utf8_lossy(&strict.stderr)
    );
    assert!(verify(&["--allow-gaps"]).status.success());

    // `wrapd audit head` prints what the store recorded; the file reaches it.
    daemon.stop();
    let head = Command::new(env!("CARGO_BIN_EXE_wrapd"))
        .args(["audit", "head", "--config"])
        .arg(daemon.config_path())
        .output()
        .unwrap();
    assert!(
        head.status.success(),
        "{}",
        String::from_utf8_lossy(&head.stderr)
    );
    let head = String::from_utf8(head.stdout).unwrap();
    let reached = verify(&["--allow-gaps", "--head", head.trim()]);
    assert!(
        reached.status.success(),
        "{head}: {}",
        String::from_utf8_lossy(&reached.stderr)
    );
    let last = daemon.audit_lines().last().unwrap().seq;
    let beyond = format!("{}:{}", last + 5, "ab".repeat(32));
    assert!(
        !verify(&["--allow-gaps", "--head", &beyond])
            .status
            .success()
    );
}
