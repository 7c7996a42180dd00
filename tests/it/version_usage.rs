//! Version usage: what a known workload did to each version of a key, counted exactly, shown
//! by DescribeKey and `wrapctl keys versions`, kept across a restart; the daemon's own health
//! probes never counted.

use std::collections::HashMap;
use std::process::Command;
use std::time::Duration;

use serde_json::Value;
use wrapd::proto::{
    CreateKeyRequest, GenerateDataKeyRequest, KeyRef, KeyVersionUsage, UnwrapRequest,
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
