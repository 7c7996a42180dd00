//! A call cancelled by its deadline (or a client reset) after it started a key store
//! operation still writes its audit line, so every state change is in the audit log. The
//! daemon runs with every PKCS#11 call slowed by the fault hook (`WRAPD_FAULT_STALL_MS`,
//! feature `fault-injection`), its callers with deadlines far shorter than that.

use crate::common;

use std::time::Duration;

use common::{DevDaemon, create_key};
use wrapd::proto::{CreateKeyRequest, KeyRef, ListKeysRequest, ScheduleKeyDeletionRequest};

fn hurried<T>(message: T) -> tonic::Request<T> {
    let mut request = tonic::Request::new(message);
    request.set_timeout(Duration::from_millis(30));
    request
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_state_change_of_a_cancelled_call_is_audited() {
    let daemon = DevDaemon::start_with_env(&[("WRAPD_FAULT_STALL_MS", "150")]);
    let mut keys = daemon.keys().await;
    let rotated = create_key(&mut keys, "").await.key_id;
    let doomed = create_key(&mut keys, "").await.key_id;
    let state_changes = |lines: &[wrapd::audit::AuditRecord]| {
        lines
            .iter()
            .filter(|r| {
                ["CreateKey", "RotateKey", "ScheduleKeyDeletion"].contains(&r.operation.as_str())
            })
            .count()
    };
    let before = state_changes(&daemon.audit_lines());

    for _ in 0..3 {
        let key_id = rotated.clone();
        let answer = keys.rotate_key(hurried(KeyRef { key_id })).await;
        assert!(
            answer.is_err(),
            "the deadline is far shorter than the token"
        );
    }
    for _ in 0..2 {
        let answer = keys.create_key(hurried(CreateKeyRequest::default())).await;
        assert!(answer.is_err());
    }
    let answer = keys
        .schedule_key_deletion(hurried(ScheduleKeyDeletionRequest {
            key_id: doomed.clone(),
            pending_window_days: 7,
        }))
        .await;
    assert!(answer.is_err());

    // The operations run on; wait until each of the six cancelled calls has its line.
    common::eventually("every cancelled call's audit line", || {
        let made = state_changes(&daemon.audit_lines());
        async move { made >= before + 6 }
    })
    .await;
    let version = keys
        .describe_key(KeyRef {
            key_id: rotated.clone(),
        })
        .await
        .unwrap()
        .into_inner()
        .current_version;
    let listed = keys
        .list_keys(ListKeysRequest::default())
        .await
        .unwrap()
        .into_inner()
        .keys;
    let doomed_state = listed.iter().find(|k| k.key_id == doomed).unwrap().state;

    let audit = daemon.audit_lines();
    let ok = |op: &str, key: Option<&str>| {
        audit
            .iter()
            .filter(|r| {
                r.operation == op
                    && r.outcome == "OK"
                    && key.is_none_or(|k| r.key_id.as_deref() == Some(k))
            })
            .count()
    };
    assert!(version > 1, "a cancelled rotation still took effect");
    assert_eq!(
        ok("RotateKey", Some(&rotated)),
        version as usize - 1,
        "one RotateKey line per version added"
    );
    // alias/kubernetes and alias/xks-dev (made by `wrapd dev`, unaudited), `rotated`,
    // `doomed`, and the keys of the cancelled CreateKeys.
    assert_eq!(
        ok("CreateKey", None) + 2,
        listed.len(),
        "one CreateKey line per key"
    );
    assert_eq!(doomed_state, wrapd::proto::KeyState::PendingDeletion as i32);
    assert_eq!(ok("ScheduleKeyDeletion", Some(&doomed)), 1);
}
