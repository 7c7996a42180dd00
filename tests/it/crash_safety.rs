//! Crash safety: `kill -9` while keys are created and rotated and data keys are generated;
//! after a restart every blob the daemon returned still unwraps, every key it reported exists
//! with its versions, metadata and token agree, and the SQLite store is intact. And a
//! graceful shutdown under load finishes what is in flight and refuses the rest cleanly.

use crate::common;

use std::collections::HashMap;
use std::time::Duration;

use common::{DevDaemon, create_key, ctx};
use tonic::Code;
use wrapd::proto::{CreateKeyRequest, GenerateDataKeyRequest, KeyRef, UnwrapRequest};

type Context = HashMap<String, String>;

/// What the daemon acknowledged before it died.
#[derive(Default)]
struct Acknowledged {
    /// (blob, context, plaintext)
    blobs: Vec<(Vec<u8>, Context, Vec<u8>)>,
    /// key id -> highest version the daemon reported
    keys: HashMap<String, u32>,
}

impl Acknowledged {
    fn merge(&mut self, other: Acknowledged) {
        self.blobs.extend(other.blobs);
        for (k, v) in other.keys {
            let e = self.keys.entry(k).or_default();
            *e = (*e).max(v);
        }
    }
}

/// Starts data-plane and control-plane load; the tasks end when the daemon stops answering.
async fn start_load(
    daemon: &DevDaemon,
    seed_key: &str,
) -> Vec<tokio::task::JoinHandle<Acknowledged>> {
    let mut tasks = Vec::new();
    for i in 0..4u32 {
        let mut data = daemon.data().await;
        let key = seed_key.to_owned();
        tasks.push(tokio::spawn(async move {
            let mut acked = Acknowledged::default();
            for n in 0.. {
                let context = ctx(&[("task", &i.to_string()), ("n", &n.to_string())]);
                let request = GenerateDataKeyRequest {
                    key_id: key.clone(),
                    encryption_context: context.clone(),
                    number_of_bytes: 32,
                };
                match data.generate_data_key(request).await {
                    Ok(r) => {
                        let r = r.into_inner();
                        acked.blobs.push((r.ciphertext_blob, context, r.plaintext));
                    }
                    Err(_) => break, // the daemon is gone
                }
            }
            acked
        }));
    }
    let mut keys = daemon.keys().await;
    let seed = seed_key.to_owned();
    tasks.push(tokio::spawn(async move {
        let mut acked = Acknowledged::default();
        loop {
            let Ok(created) = keys.create_key(CreateKeyRequest::default()).await else {
                break;
            };
            let created = created.into_inner();
            acked.keys.insert(created.key_id, created.current_version);
            let Ok(rotated) = keys
                .rotate_key(KeyRef {
                    key_id: seed.clone(),
                })
                .await
            else {
                break;
            };
            let rotated = rotated.into_inner();
            acked.keys.insert(rotated.key_id, rotated.current_version);
        }
        acked
    }));
    tasks
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn kill_dash_nine_loses_nothing_acknowledged() {
    let mut daemon = DevDaemon::start();
    let seed = create_key(&mut daemon.keys().await, "alias/crash")
        .await
        .key_id;
    let mut all = Acknowledged::default();
    for round in 0..3 {
        let tasks = start_load(&daemon, &seed).await;
        tokio::time::sleep(Duration::from_millis(700)).await;
        daemon.kill();
        for task in tasks {
            all.merge(task.await.unwrap());
        }
        assert!(
            !all.blobs.is_empty() && !all.keys.is_empty(),
            "round {round}: no load ran"
        );

        // The store is intact (opened while the daemon is down).
        let db = rusqlite::Connection::open(daemon.dir().join("wrapd.db")).unwrap();
        let check: String = db
            .query_row("PRAGMA integrity_check", [], |r| r.get(0))
            .unwrap();
        assert_eq!(check, "ok");
        drop(db);

        daemon.restart_stopped();
        let mut keys = daemon.keys().await;
        let mut data = daemon.data().await;
        for (key_id, version) in &all.keys {
            let described = keys
                .describe_key(KeyRef {
                    key_id: key_id.clone(),
                })
                .await
                .unwrap_or_else(|s| panic!("acknowledged key {key_id} lost: {s:?}"))
                .into_inner();
            assert!(
                described.current_version >= *version,
                "{key_id} lost a version"
            );
            assert!(
                described.versions.iter().all(|v| v.available),
                "{key_id}: a version has no key material"
            );
        }
        for (blob, context, plaintext) in &all.blobs {
            let unwrapped = data
                .unwrap(UnwrapRequest {
                    ciphertext_blob: blob.clone(),
                    encryption_context: context.clone(),
                    key_id: String::new(),
                })
                .await
                .unwrap_or_else(|s| {
                    let log = daemon.log();
                    let errors: Vec<&str> = log.lines().filter(|l| l.contains("ERROR")).collect();
                    panic!(
                        "an acknowledged blob no longer unwraps: {s:?}\n{}",
                        errors.join("\n")
                    )
                })
                .into_inner();
            assert_eq!(&unwrapped.plaintext, plaintext);
        }
        // Metadata never points at missing key material (objects made just before the crash
        // and never committed are reported as orphans, which is harmless).
        assert!(
            !daemon.log().contains("has no object in the token"),
            "missing key material after a crash"
        );
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn graceful_shutdown_under_load() {
    let mut daemon = DevDaemon::start();
    let key = create_key(&mut daemon.keys().await, "").await.key_id;
    let mut tasks = Vec::new();
    for _ in 0..8 {
        let mut data = daemon.data().await;
        let key = key.clone();
        tasks.push(tokio::spawn(async move {
            let (mut ok, mut refused) = (0u32, 0u32);
            loop {
                let request = GenerateDataKeyRequest {
                    key_id: key.clone(),
                    ..Default::default()
                };
                match data.generate_data_key(request).await {
                    Ok(r) => {
                        assert_eq!(r.into_inner().plaintext.len(), 32);
                        ok += 1;
                    }
                    Err(status) => {
                        // Refused cleanly: UNAVAILABLE from the daemon, or the connection
                        // closing under the client (GOAWAY; the client library reports it with
                        // a transport error as its source). Never an error the daemon made.
                        let from_transport = std::error::Error::source(&status).is_some();
                        assert!(
                            from_transport
                                || matches!(
                                    status.code(),
                                    Code::Unavailable | Code::Cancelled | Code::Unknown
                                ),
                            "unexpected failure during shutdown: {status:?}"
                        );
                        refused += 1;
                        if refused > 3 {
                            break;
                        }
                    }
                }
            }
            ok
        }));
    }
    tokio::time::sleep(Duration::from_millis(500)).await;
    let status = tokio::task::spawn_blocking(move || {
        let status = daemon.stop();
        (status, daemon)
    })
    .await
    .unwrap();
    assert!(status.0.success(), "clean exit under load: {:?}", status.0);
    let mut served = 0;
    for task in tasks {
        served += task.await.unwrap();
    }
    assert!(served > 0);
    let daemon = status.1;
    assert!(!daemon.socket.exists(), "the socket is removed on shutdown");
    assert!(daemon.log().contains("draining in-flight calls"));
}
