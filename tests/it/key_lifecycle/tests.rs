//! KeyService against a real daemon: lifecycle, aliases, pagination, restart persistence,
//! health and reflection.

use crate::common;

use std::collections::HashSet;
use std::time::{Duration, SystemTime};

use common::{DevDaemon, assert_code, create_key, ctx, generate};

/// A daemon on this module's metadata store backend.
fn daemon() -> DevDaemon {
    super::daemon_for(module_path!())
}
use tonic::Code;
use wrapd::proto::{
    AliasRequest, GenerateDataKeyRequest, KeyRef, KeyState, ListAliasesRequest, ListKeysRequest,
    ScheduleKeyDeletionRequest, UnwrapRequest,
};

fn key_ref(id: &str) -> KeyRef {
    KeyRef { key_id: id.into() }
}

#[tokio::test]
async fn lifecycle_states_and_deletion_windows() {
    let daemon = daemon();
    let mut keys = daemon.keys().await;
    let created = keys
        .create_key(wrapd::proto::CreateKeyRequest {
            description: "payments DEKs".into(),
            alias: "alias/payments".into(),
            ..Default::default()
        })
        .await
        .unwrap()
        .into_inner();
    assert!(created.key_id.starts_with("key/"));
    assert_eq!(created.state(), KeyState::Enabled);
    assert_eq!(created.description, "payments DEKs");
    assert_eq!(created.current_version, 1);
    assert_eq!(created.aliases, vec!["alias/payments".to_owned()]);
    assert!(created.created_at.is_some());
    assert!(created.deletion_date.is_none());

    // Describe by id and by alias give the same key.
    let by_alias = keys
        .describe_key(key_ref("alias/payments"))
        .await
        .unwrap()
        .into_inner();
    assert_eq!(
        by_alias,
        keys.describe_key(key_ref(&created.key_id))
            .await
            .unwrap()
            .into_inner()
    );

    let disabled = keys
        .disable_key(key_ref("alias/payments"))
        .await
        .unwrap()
        .into_inner();
    assert_eq!(disabled.state(), KeyState::Disabled);
    let enabled = keys
        .enable_key(key_ref(&created.key_id))
        .await
        .unwrap()
        .into_inner();
    assert_eq!(enabled.state(), KeyState::Enabled);

    for days in [1, 6, 31, 365] {
        assert_code(
            keys.schedule_key_deletion(ScheduleKeyDeletionRequest {
                key_id: created.key_id.clone(),
                pending_window_days: days,
            })
            .await,
            Code::InvalidArgument,
        );
    }
    let before = SystemTime::now();
    let pending = keys
        .schedule_key_deletion(ScheduleKeyDeletionRequest {
            key_id: created.key_id.clone(),
            pending_window_days: 7,
        })
        .await
        .unwrap()
        .into_inner();
    assert_eq!(pending.state(), KeyState::PendingDeletion);
    let date: SystemTime = pending.deletion_date.unwrap().try_into().unwrap();
    let week = Duration::from_secs(7 * 86_400);
    assert!(date >= before + week - Duration::from_secs(5) && date <= SystemTime::now() + week);
    assert_code(
        keys.schedule_key_deletion(ScheduleKeyDeletionRequest {
            key_id: created.key_id.clone(),
            pending_window_days: 30,
        })
        .await,
        Code::FailedPrecondition,
    );
    assert_code(
        keys.disable_key(key_ref(&created.key_id)).await,
        Code::FailedPrecondition,
    );

    // Cancelling brings the key back disabled (as AWS KMS does).
    let cancelled = keys
        .cancel_key_deletion(key_ref("alias/payments"))
        .await
        .unwrap()
        .into_inner();
    assert_eq!(cancelled.state(), KeyState::Disabled);
    assert!(cancelled.deletion_date.is_none());
    assert_code(
        keys.cancel_key_deletion(key_ref(&created.key_id)).await,
        Code::FailedPrecondition,
    );
}

#[tokio::test]
async fn aliases_and_pagination() {
    let daemon = daemon();
    let mut keys = daemon.keys().await;
    let mut data = daemon.data().await;
    // `wrapd dev` made its own keys (alias/kubernetes, alias/xks-dev) first.
    let existing: Vec<String> = keys
        .list_keys(ListKeysRequest::default())
        .await
        .unwrap()
        .into_inner()
        .keys
        .into_iter()
        .map(|k| k.key_id)
        .collect();
    assert_eq!(existing.len(), 2);
    let mut ids = Vec::new();
    for _ in 0..4 {
        ids.push(create_key(&mut keys, "").await.key_id);
    }

    // Pages of 2: 2 + 2 + 2, in creation order, every key once.
    let mut seen = Vec::new();
    let mut token = String::new();
    let mut pages = 0;
    loop {
        let page = keys
            .list_keys(ListKeysRequest {
                page_size: 2,
                page_token: token,
            })
            .await
            .unwrap()
            .into_inner();
        pages += 1;
        assert!(page.keys.len() <= 2);
        seen.extend(page.keys.into_iter().map(|k| k.key_id));
        token = page.next_page_token;
        if token.is_empty() {
            break;
        }
    }
    assert_eq!(pages, 3);
    assert_eq!(seen, [existing, ids.clone()].concat());
    assert_code(
        keys.list_keys(ListKeysRequest {
            page_size: 2,
            page_token: "garbage".into(),
        })
        .await,
        Code::InvalidArgument,
    );
    assert_code(
        keys.list_keys(ListKeysRequest {
            page_size: 1001,
            page_token: String::new(),
        })
        .await,
        Code::InvalidArgument,
    );

    // Create, re-point and delete aliases; data calls follow the alias.
    let alias = |name: &str, key: &str| AliasRequest {
        alias_name: name.into(),
        key_id: key.into(),
    };
    let made = keys
        .create_alias(alias("alias/svc", &ids[0]))
        .await
        .unwrap()
        .into_inner();
    assert_eq!(made.key_id, ids[0]);
    keys.create_alias(alias("alias/svc-2", "alias/svc"))
        .await
        .unwrap();
    let generated = data
        .generate_data_key(GenerateDataKeyRequest {
            key_id: "alias/svc".into(),
            ..Default::default()
        })
        .await
        .unwrap()
        .into_inner();
    assert_eq!(generated.key_id, ids[0]);
    let updated = keys
        .update_alias(alias("alias/svc", &ids[1]))
        .await
        .unwrap()
        .into_inner();
    assert_eq!(updated.key_id, ids[1]);
    let generated = data
        .generate_data_key(GenerateDataKeyRequest {
            key_id: "alias/svc".into(),
            ..Default::default()
        })
        .await
        .unwrap()
        .into_inner();
    assert_eq!(generated.key_id, ids[1]);
    let described = keys
        .describe_key(key_ref(&ids[0]))
        .await
        .unwrap()
        .into_inner();
    assert_eq!(described.aliases, vec!["alias/svc-2".to_owned()]);
    let described = keys
        .describe_key(key_ref(&ids[1]))
        .await
        .unwrap()
        .into_inner();
    assert_eq!(described.aliases, vec!["alias/svc".to_owned()]);

    assert_code(
        keys.update_alias(alias("alias/missing", &ids[0])).await,
        Code::NotFound,
    );
    assert_code(
        keys.create_alias(alias("alias/x", "key/00000000000000000000000000000000"))
            .await,
        Code::NotFound,
    );
    assert_code(
        keys.create_alias(alias("alias/aws/reserved", &ids[0]))
            .await,
        Code::InvalidArgument,
    );
    assert_code(
        keys.create_alias(alias("not-an-alias", &ids[0])).await,
        Code::InvalidArgument,
    );

    let all = keys
        .list_aliases(ListAliasesRequest::default())
        .await
        .unwrap()
        .into_inner();
    let names: Vec<_> = all.aliases.iter().map(|a| a.alias_name.as_str()).collect();
    assert_eq!(
        names,
        [
            "alias/kubernetes",
            "alias/svc",
            "alias/svc-2",
            "alias/xks-dev"
        ]
    );
    let of_first = keys
        .list_aliases(ListAliasesRequest {
            key_id: ids[0].clone(),
            ..Default::default()
        })
        .await
        .unwrap()
        .into_inner();
    assert_eq!(of_first.aliases.len(), 1);
    assert_eq!(of_first.aliases[0].alias_name, "alias/svc-2");
    // One alias per page, four pages.
    let mut paged = Vec::new();
    let mut token = String::new();
    loop {
        let page = keys
            .list_aliases(ListAliasesRequest {
                page_size: 1,
                page_token: token,
                ..Default::default()
            })
            .await
            .unwrap()
            .into_inner();
        assert_eq!(page.aliases.len(), 1);
        paged.push(page.aliases[0].alias_name.clone());
        token = page.next_page_token;
        if token.is_empty() {
            break;
        }
    }
    assert_eq!(paged, names);

    let deleted = keys
        .delete_alias(alias("alias/svc", ""))
        .await
        .unwrap()
        .into_inner();
    assert_eq!(deleted.key_id, ids[1]);
    assert_code(
        keys.describe_key(key_ref("alias/svc")).await,
        Code::NotFound,
    );
    assert_code(
        keys.delete_alias(alias("alias/svc", "")).await,
        Code::NotFound,
    );
}

// Multi-threaded: the clients must keep being polled while the test blocks on the restart.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn restart_keeps_keys_aliases_states_and_blobs() {
    let mut daemon = daemon();
    let mut blobs = Vec::new();
    let (a, b, c);
    {
        let mut keys = daemon.keys().await;
        let mut data = daemon.data().await;
        a = create_key(&mut keys, "alias/survivor").await;
        b = create_key(&mut keys, "").await;
        c = create_key(&mut keys, "").await;
        for key in [&a.key_id, &b.key_id] {
            let generated = generate(&mut data, key, &[("run", "1")]).await;
            blobs.push((generated.ciphertext_blob, generated.plaintext));
        }
        keys.rotate_key(key_ref(&a.key_id)).await.unwrap();
        let generated = generate(&mut data, &a.key_id, &[("run", "1")]).await;
        assert_eq!(generated.key_version, 2);
        blobs.push((generated.ciphertext_blob, generated.plaintext));
        keys.disable_key(key_ref(&b.key_id)).await.unwrap();
        keys.schedule_key_deletion(ScheduleKeyDeletionRequest {
            key_id: c.key_id.clone(),
            pending_window_days: 10,
        })
        .await
        .unwrap();
    }
    let before: Vec<_> = {
        let mut keys = daemon.keys().await;
        let mut all = Vec::new();
        for id in [&a.key_id, &b.key_id, &c.key_id] {
            all.push(keys.describe_key(key_ref(id)).await.unwrap().into_inner());
        }
        all
    };

    daemon.restart();
    assert!(daemon.socket.exists());

    let mut keys = daemon.keys().await;
    let mut data = daemon.data().await;
    for (i, id) in [&a.key_id, &b.key_id, &c.key_id].into_iter().enumerate() {
        let mut after = keys.describe_key(key_ref(id)).await.unwrap().into_inner();
        let mut expected = before[i].clone();
        // Wrap counts resume from the persisted reservation (never lower than before).
        for (x, y) in after.versions.iter_mut().zip(expected.versions.iter_mut()) {
            assert!(x.wrap_count >= y.wrap_count);
            x.wrap_count = 0;
            y.wrap_count = 0;
        }
        assert_eq!(after, expected);
    }
    assert_eq!(
        keys.describe_key(key_ref("alias/survivor"))
            .await
            .unwrap()
            .into_inner()
            .key_id,
        a.key_id
    );
    keys.enable_key(key_ref(&b.key_id)).await.unwrap();
    for (blob, plaintext) in &blobs {
        let unwrapped = data
            .unwrap(UnwrapRequest {
                ciphertext_blob: blob.clone(),
                encryption_context: ctx(&[("run", "1")]),
                key_id: String::new(),
            })
            .await
            .unwrap()
            .into_inner();
        assert_eq!(&unwrapped.plaintext, plaintext);
    }
    let log = daemon.log();
    assert!(
        !log.contains("no object in the token"),
        "reconciliation found missing objects:\n{log}"
    );
}

#[tokio::test]
async fn health_and_reflection_are_served() {
    use tonic_health::pb::HealthCheckRequest;
    use tonic_health::pb::health_client::HealthClient;
    use tonic_reflection::pb::v1::ServerReflectionRequest;
    use tonic_reflection::pb::v1::server_reflection_client::ServerReflectionClient;
    use tonic_reflection::pb::v1::server_reflection_request::MessageRequest;
    use tonic_reflection::pb::v1::server_reflection_response::MessageResponse;

    let daemon = daemon();
    let mut health = HealthClient::new(daemon.channel().await);
    for service in ["", "wrapd.v1.DataKeyService", "wrapd.v1.KeyService"] {
        let status = health
            .check(HealthCheckRequest {
                service: service.into(),
            })
            .await
            .unwrap()
            .into_inner()
            .status;
        assert_eq!(
            status,
            tonic_health::pb::health_check_response::ServingStatus::Serving as i32
        );
    }

    let mut reflection = ServerReflectionClient::new(daemon.channel().await);
    let request = ServerReflectionRequest {
        host: String::new(),
        message_request: Some(MessageRequest::ListServices(String::new())),
    };
    let mut stream = reflection
        .server_reflection_info(tokio_stream::iter([request]))
        .await
        .unwrap()
        .into_inner();
    let response = stream.message().await.unwrap().unwrap();
    let Some(MessageResponse::ListServicesResponse(list)) = response.message_response else {
        panic!("unexpected reflection response");
    };
    let names: HashSet<_> = list.service.into_iter().map(|s| s.name).collect();
    for expected in [
        "wrapd.v1.DataKeyService",
        "wrapd.v1.KeyService",
        "grpc.health.v1.Health",
    ] {
        assert!(
            names.contains(expected),
            "{expected} missing from {names:?}"
        );
    }
}

#[tokio::test]
async fn automatic_rotation_is_scheduled_and_turned_off_over_grpc() {
    let daemon = daemon();
    let mut keys = daemon.keys().await;
    let key = create_key(&mut keys, "alias/scheduled").await;
    let too_short = keys
        .enable_key_rotation(wrapd::proto::EnableKeyRotationRequest {
            key_id: key.key_id.clone(),
            rotation_period_days: 30,
        })
        .await;
    assert_code(too_short, Code::InvalidArgument);
    let before = SystemTime::now();
    let on = keys
        .enable_key_rotation(wrapd::proto::EnableKeyRotationRequest {
            key_id: "alias/scheduled".into(),
            rotation_period_days: 0,
        })
        .await
        .unwrap()
        .into_inner();
    assert_eq!(on.rotation_period_days, 365, "0 means the default period");
    let next: SystemTime = on.next_rotation.unwrap().try_into().unwrap();
    let due_in = next.duration_since(before).unwrap();
    assert!(
        due_in >= Duration::from_secs(364 * 86_400) && due_in <= Duration::from_secs(366 * 86_400)
    );
    let off = keys
        .disable_key_rotation(key_ref(&key.key_id))
        .await
        .unwrap()
        .into_inner();
    assert_eq!(off.rotation_period_days, 0);
    assert!(off.next_rotation.is_none());
}

#[tokio::test]
async fn tags_are_set_and_removed_over_grpc() {
    let daemon = daemon();
    let mut keys = daemon.keys().await;
    let key = create_key(&mut keys, "").await;
    let tagged = keys
        .tag_key(wrapd::proto::TagKeyRequest {
            key_id: key.key_id.clone(),
            tags: ctx(&[("team", "payments"), ("env", "prod")]),
        })
        .await
        .unwrap()
        .into_inner();
    assert_eq!(tagged.tags, ctx(&[("team", "payments"), ("env", "prod")]));
    let untagged = keys
        .untag_key(wrapd::proto::UntagKeyRequest {
            key_id: key.key_id.clone(),
            tag_keys: vec!["team".into()],
        })
        .await
        .unwrap()
        .into_inner();
    assert_eq!(untagged.tags, ctx(&[("env", "prod")]));
    let reserved = keys
        .tag_key(wrapd::proto::TagKeyRequest {
            key_id: key.key_id,
            tags: ctx(&[("aws:x", "y")]),
        })
        .await;
    assert_code(reserved, Code::InvalidArgument);
}

#[tokio::test]
async fn a_description_is_replaced_over_grpc_and_bounded() {
    let daemon = daemon();
    let mut keys = daemon.keys().await;
    let key = create_key(&mut keys, "").await;
    let updated = keys
        .update_key_description(wrapd::proto::UpdateKeyDescriptionRequest {
            key_id: key.key_id.clone(),
            description: "payments, rewritten".into(),
        })
        .await
        .unwrap()
        .into_inner();
    assert_eq!(updated.description, "payments, rewritten");
    let described = keys.describe_key(key_ref(&key.key_id)).await.unwrap();
    assert_eq!(described.into_inner().description, "payments, rewritten");
    let too_long = keys
        .update_key_description(wrapd::proto::UpdateKeyDescriptionRequest {
            key_id: key.key_id,
            description: "x".repeat(8193),
        })
        .await;
    assert_code(too_long, Code::InvalidArgument);
}
