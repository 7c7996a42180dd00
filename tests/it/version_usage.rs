//! Key versions: what a known workload did to each version, counted exactly, shown by
//! DescribeKey and `wrapctl keys versions`, kept across a restart (the daemon's own health
//! probes never counted); and retiring a version, which stops its blobs until it is restored.

use std::collections::HashMap;
use std::process::Command;
use std::time::Duration;

use serde_json::Value;
use wrapd::proto::{
    CreateKeyRequest, GenerateDataKeyRequest, KeyRef, KeyVersionRequest, KeyVersionUsage,
    UnwrapRequest,
};

use crate::common::DevDaemon;

/// Each version's usage, as DescribeKey answers it.
async fn usage(daemon: &DevDaemon, key: &str) -> Vec<(u32, KeyVersionUsage)> {
    daemon
        .keys()
        .await
        .describe_key(KeyRef {
            key_id: key.to_owned(),
        })
        .await
        .unwrap()
        .into_inner()
        .versions
        .into_iter()
        .map(|v| (v.version, v.usage.expect("DescribeKey carries the usage")))
        .collect()
}

fn counts(usage: &[(u32, KeyVersionUsage)]) -> Vec<(u32, u64, u64)> {
    usage
        .iter()
        .map(|(v, u)| (*v, u.wraps, u.unwraps))
        .collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn version_usage_counts_exactly_what_a_known_workload_did_across_a_restart() {
    let mut daemon = DevDaemon::start();
    let key = daemon
        .keys()
        .await
        .create_key(CreateKeyRequest {
            description: "usage".into(),
            ..Default::default()
        })
        .await
        .unwrap()
        .into_inner()
        .key_id;
    let mut data = daemon.data().await;
    let generate = GenerateDataKeyRequest {
        key_id: key.clone(),
        encryption_context: HashMap::new(),
        number_of_bytes: 32,
    };
    let mut blobs = Vec::new();
    for _ in 0..3 {
        blobs.push(
            data.generate_data_key(generate.clone())
                .await
                .unwrap()
                .into_inner()
                .ciphertext_blob,
        );
    }
    let unwrap = |blob: &Vec<u8>| UnwrapRequest {
        ciphertext_blob: blob.clone(),
        encryption_context: HashMap::new(),
        key_id: String::new(),
    };
    data.unwrap(unwrap(&blobs[0])).await.unwrap();
    data.unwrap(unwrap(&blobs[1])).await.unwrap();
    // A failed unwrap (wrong context) uses nothing.
    let mut wrong = unwrap(&blobs[2]);
    wrong.encryption_context.insert("x".into(), "y".into());
    assert!(data.unwrap(wrong).await.is_err());
    daemon
        .keys()
        .await
        .rotate_key(KeyRef {
            key_id: key.clone(),
        })
        .await
        .unwrap();
    data.generate_data_key(generate.clone()).await.unwrap();
    data.unwrap(unwrap(&blobs[2])).await.unwrap();

    let before = usage(&daemon, &key).await;
    assert_eq!(counts(&before), vec![(1, 3, 3), (2, 1, 0)]);
    for (_, used) in &before {
        let (first, last) = (used.first_used.unwrap(), used.last_used.unwrap());
        assert!((first.seconds, first.nanos) <= (last.seconds, last.nanos));
    }

    // wrapctl shows the same, as a table and as JSON.
    let versions = Command::new(env!("CARGO_BIN_EXE_wrapctl"))
        .arg("--json")
        .arg("--socket")
        .arg(&daemon.socket)
        .args(["keys", "versions", &key])
        .output()
        .unwrap();
    assert!(versions.status.success(), "{versions:?}");
    let json: Value = serde_json::from_slice(&versions.stdout).unwrap();
    assert_eq!(json["current_version"], 2);
    assert_eq!(json["versions"][0]["usage"]["wraps"], 3);
    assert_eq!(json["versions"][0]["usage"]["unwraps"], 3);
    assert_eq!(json["versions"][1]["usage"]["wraps"], 1);
    let table = Command::new(env!("CARGO_BIN_EXE_wrapctl"))
        .arg("--socket")
        .arg(&daemon.socket)
        .args(["keys", "versions", &key])
        .output()
        .unwrap();
    let table = String::from_utf8_lossy(&table.stdout);
    assert!(
        table.contains("UNWRAPS") && table.contains("LAST USED"),
        "{table}"
    );

    // Kept across a restart (the counts are flushed at shutdown).
    daemon.restart();
    let after = usage(&daemon, &key).await;
    assert_eq!(counts(&after), counts(&before));
    assert_eq!(after[0].1.first_used, before[0].1.first_used);

    // The health probe (a token round trip every 2 s, through the oldest enabled key) is
    // the daemon's own: alias/kubernetes, which no caller used, stays unused.
    tokio::time::sleep(Duration::from_secs(3)).await;
    let probe_key = usage(&daemon, "alias/kubernetes").await;
    assert_eq!(counts(&probe_key), vec![(1, 0, 0)]);
    assert!(probe_key[0].1.first_used.is_none());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_retired_version_unwraps_nothing_until_restored() {
    let mut daemon = DevDaemon::start();
    let mut keys = daemon.keys().await;
    let key = keys
        .create_key(CreateKeyRequest {
            description: "retire".into(),
            ..Default::default()
        })
        .await
        .unwrap()
        .into_inner()
        .key_id;
    let mut data = daemon.data().await;
    let generate = GenerateDataKeyRequest {
        key_id: key.clone(),
        encryption_context: HashMap::new(),
        number_of_bytes: 32,
    };
    let old = data
        .generate_data_key(generate.clone())
        .await
        .unwrap()
        .into_inner();
    keys.rotate_key(KeyRef {
        key_id: key.clone(),
    })
    .await
    .unwrap();
    let version = |v: u32| KeyVersionRequest {
        key_id: key.clone(),
        version: v,
    };
    // The current version cannot be retired; a version the key lacks is not found.
    let err = keys.retire_key_version(version(2)).await.unwrap_err();
    assert_eq!(err.code(), tonic::Code::FailedPrecondition, "{err:?}");
    let err = keys.retire_key_version(version(7)).await.unwrap_err();
    assert_eq!(err.code(), tonic::Code::NotFound, "{err:?}");

    // Retired with wrapctl.
    let retired = Command::new(env!("CARGO_BIN_EXE_wrapctl"))
        .arg("--json")
        .arg("--socket")
        .arg(&daemon.socket)
        .args(["keys", "retire-version", &key, "1"])
        .output()
        .unwrap();
    assert!(retired.status.success(), "{retired:?}");
    let json: Value = serde_json::from_slice(&retired.stdout).unwrap();
    assert_eq!(json["versions"][0]["retired"], true);
    assert_eq!(json["versions"][1]["retired"], false);

    let unwrap = UnwrapRequest {
        ciphertext_blob: old.ciphertext_blob.clone(),
        encryption_context: HashMap::new(),
        key_id: String::new(),
    };
    let refused = |err: tonic::Status| {
        assert_eq!(err.code(), tonic::Code::FailedPrecondition, "{err:?}");
        assert!(
            err.message().contains("version 1") && err.message().contains("restore-version"),
            "{err:?}"
        );
    };
    refused(data.unwrap(unwrap.clone()).await.unwrap_err());
    refused(
        data.re_wrap(wrapd::proto::ReWrapRequest {
            ciphertext_blob: old.ciphertext_blob.clone(),
            source_encryption_context: HashMap::new(),
            destination_key_id: String::new(),
            destination_encryption_context: HashMap::new(),
        })
        .await
        .unwrap_err(),
    );
    // New data keys are unaffected (the current version).
    let new = data
        .generate_data_key(generate.clone())
        .await
        .unwrap()
        .into_inner();
    assert_eq!(new.key_version, 2);

    // Still retired after a restart; restored, the old blob unwraps again.
    daemon.restart();
    let mut data = daemon.data().await;
    refused(data.unwrap(unwrap.clone()).await.unwrap_err());
    daemon
        .keys()
        .await
        .restore_key_version(version(1))
        .await
        .unwrap();
    let unwrapped = data.unwrap(unwrap).await.unwrap().into_inner();
    assert_eq!(unwrapped.plaintext, old.plaintext);

    // Each change is audited with the version it changed.
    let lines = daemon.audit_lines();
    for op in ["RetireKeyVersion", "RestoreKeyVersion"] {
        let line = lines
            .iter()
            .find(|l| l.operation == op && l.outcome == "OK")
            .unwrap_or_else(|| panic!("no {op} line"));
        assert_eq!(line.key_version, Some(1), "{line:?}");
    }
    assert!(
        lines
            .iter()
            .any(|l| l.operation == "Unwrap" && l.outcome == "FAILED_PRECONDITION")
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_retired_version_is_destroyed_when_its_scheduled_destruction_falls_due_audited_first() {
    let mut daemon = DevDaemon::start();
    let mut keys = daemon.keys().await;
    let key = keys
        .create_key(CreateKeyRequest {
            description: "destroy a version".into(),
            ..Default::default()
        })
        .await
        .unwrap()
        .into_inner()
        .key_id;
    let mut data = daemon.data().await;
    let generate = GenerateDataKeyRequest {
        key_id: key.clone(),
        encryption_context: HashMap::new(),
        number_of_bytes: 32,
    };
    let old = data
        .generate_data_key(generate.clone())
        .await
        .unwrap()
        .into_inner();
    keys.rotate_key(KeyRef {
        key_id: key.clone(),
    })
    .await
    .unwrap();
    let new = data.generate_data_key(generate).await.unwrap().into_inner();
    let version = |v: u32| KeyVersionRequest {
        key_id: key.clone(),
        version: v,
    };
    let socket = daemon.socket.clone();
    let wrapctl = |args: &[&str]| {
        Command::new(env!("CARGO_BIN_EXE_wrapctl"))
            .arg("--json")
            .arg("--socket")
            .arg(&socket)
            .args(args)
            .output()
            .unwrap()
    };

    // A version in use cannot be scheduled.
    let refused = wrapctl(&[
        "keys",
        "schedule-version-destruction",
        &key,
        "1",
        "--days",
        "7",
    ]);
    assert!(!refused.status.success());
    assert!(
        String::from_utf8_lossy(&refused.stderr).contains("not retired"),
        "{refused:?}"
    );
    keys.retire_key_version(version(1)).await.unwrap();
    let scheduled = wrapctl(&[
        "keys",
        "schedule-version-destruction",
        &key,
        "1",
        "--days",
        "7",
    ]);
    assert!(scheduled.status.success(), "{scheduled:?}");
    let json: Value = serde_json::from_slice(&scheduled.stdout).unwrap();
    assert!(
        json["versions"][0]["destruction_date"].is_string(),
        "{json}"
    );
    // Pending destruction: not restorable until cancelled.
    let err = keys.restore_key_version(version(1)).await.unwrap_err();
    assert_eq!(err.code(), tonic::Code::FailedPrecondition, "{err:?}");
    let cancelled = keys
        .cancel_key_version_destruction(version(1))
        .await
        .unwrap()
        .into_inner();
    assert!(cancelled.versions[0].destruction_date.is_none());
    assert!(cancelled.versions[0].retired);
    keys.schedule_key_version_destruction(wrapd::proto::ScheduleKeyVersionDestructionRequest {
        key_id: key.clone(),
        version: 1,
        pending_window_days: 7,
    })
    .await
    .unwrap();

    // Eight days later (the daemon restarted with its clock ahead), maintenance destroys it.
    daemon.stop();
    daemon.set_env("WRAPD_FAULT_CLOCK_SKEW_S", &(8 * 86_400).to_string());
    daemon.restart_stopped();
    let keys = daemon.keys().await;
    crate::common::eventually("version 1 is destroyed", || {
        let mut keys = keys.clone();
        let key = key.clone();
        async move {
            keys.describe_key(KeyRef { key_id: key })
                .await
                .is_ok_and(|k| k.into_inner().versions[0].destroyed_at.is_some())
        }
    })
    .await;
    let mut data = daemon.data().await;
    let err = data
        .unwrap(UnwrapRequest {
            ciphertext_blob: old.ciphertext_blob,
            ..Default::default()
        })
        .await
        .unwrap_err();
    assert_eq!(err.code(), tonic::Code::FailedPrecondition, "{err:?}");
    assert!(err.message().contains("destroyed"), "{err:?}");
    let unwrapped = data
        .unwrap(UnwrapRequest {
            ciphertext_blob: new.ciphertext_blob,
            ..Default::default()
        })
        .await
        .unwrap()
        .into_inner();
    assert_eq!(unwrapped.plaintext, new.plaintext);
    let listed = wrapctl(&["keys", "versions", &key]);
    let json: Value = serde_json::from_slice(&listed.stdout).unwrap();
    assert!(json["versions"][0]["destroyed_at"].is_string(), "{json}");
    assert_eq!(json["versions"][0]["available"], false);

    // Every step audited with the version; the destruction by the daemon, once.
    let lines = daemon.audit_lines();
    for op in [
        "ScheduleKeyVersionDestruction",
        "CancelKeyVersionDestruction",
        "DestroyKeyVersion",
    ] {
        let line = lines
            .iter()
            .find(|l| l.operation == op && l.outcome == "OK")
            .unwrap_or_else(|| panic!("no {op} line"));
        assert_eq!(line.key_version, Some(1), "{line:?}");
    }
    let destroyed: Vec<_> = lines
        .iter()
        .filter(|l| l.operation == "DestroyKeyVersion")
        .collect();
    assert_eq!(destroyed.len(), 1);
    assert_eq!(destroyed[0].principal, "wrapd:daemon");
    assert!(
        !daemon.log().contains("no object in the token"),
        "{}",
        daemon.log()
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn versions_unused_for_retire_unused_after_days_are_retired_by_the_daemon_audited() {
    let mut daemon = DevDaemon::start();
    let mut keys = daemon.keys().await;
    let key = keys
        .create_key(CreateKeyRequest {
            description: "automatic retirement".into(),
            ..Default::default()
        })
        .await
        .unwrap()
        .into_inner()
        .key_id;
    let old = daemon
        .data()
        .await
        .generate_data_key(GenerateDataKeyRequest {
            key_id: key.clone(),
            encryption_context: HashMap::new(),
            number_of_bytes: 32,
        })
        .await
        .unwrap()
        .into_inner();
    keys.rotate_key(KeyRef {
        key_id: key.clone(),
    })
    .await
    .unwrap();
    let mut config = std::fs::read_to_string(daemon.config_path()).unwrap();
    config.push_str(&format!(
        "\n[[keys.retirement]]\nkey = \"{key}\"\nretire_unused_after_days = 30\n"
    ));
    std::fs::write(daemon.config_path(), config).unwrap();
    // 31 days later, the daemon retires version 1 at its first maintenance pass.
    daemon.stop();
    daemon.set_env("WRAPD_FAULT_CLOCK_SKEW_S", &(31 * 86_400).to_string());
    daemon.restart_stopped();
    let keys = daemon.keys().await;
    crate::common::eventually("version 1 is retired", || {
        let mut keys = keys.clone();
        let key = key.clone();
        async move {
            keys.describe_key(KeyRef { key_id: key })
                .await
                .is_ok_and(|k| k.into_inner().versions[0].retired)
        }
    })
    .await;
    let described = daemon
        .keys()
        .await
        .describe_key(KeyRef {
            key_id: key.clone(),
        })
        .await
        .unwrap()
        .into_inner();
    assert!(
        !described.versions[1].retired,
        "the current version never is"
    );
    assert!(
        described.versions[0].destroyed_at.is_none(),
        "never destroyed"
    );
    let err = daemon
        .data()
        .await
        .unwrap(UnwrapRequest {
            ciphertext_blob: old.ciphertext_blob,
            ..Default::default()
        })
        .await
        .unwrap_err();
    assert_eq!(err.code(), tonic::Code::FailedPrecondition, "{err:?}");
    let lines = daemon.audit_lines();
    let line = lines
        .iter()
        .find(|l| l.operation == "RetireKeyVersion")
        .expect("the retirement is audited");
    assert_eq!(line.principal, "wrapd:daemon");
    assert_eq!(line.key_version, Some(1));
}
