//! DataKeyService against a real daemon on a real SoftHSM token: round trips, rotation,
//! ReWrap, and every kind of bad input with its gRPC code.

use crate::common;

use common::{DevDaemon, assert_code, create_key, ctx, generate};
use tonic::Code;
use wrapd::proto::{
    GenerateDataKeyRequest, KeyRef, ReWrapRequest, ScheduleKeyDeletionRequest, UnwrapRequest,
    WrapRequest,
};

fn unwrap_req(blob: &[u8], context: &[(&str, &str)]) -> UnwrapRequest {
    UnwrapRequest {
        ciphertext_blob: blob.to_vec(),
        encryption_context: ctx(context),
        key_id: String::new(),
    }
}

#[tokio::test]
async fn every_data_plane_rpc_round_trips() {
    let daemon = DevDaemon::start();
    let mut keys = daemon.keys().await;
    let mut data = daemon.data().await;
    let a = create_key(&mut keys, "alias/app-a").await;
    let b = create_key(&mut keys, "").await;
    let context = [("tenant", "acme"), ("purpose", "test")];

    // GenerateDataKey: default 32 bytes, and the bounds 1 and 64.
    for (asked, expected) in [(0, 32), (1, 1), (64, 64), (17, 17)] {
        let generated = data
            .generate_data_key(GenerateDataKeyRequest {
                key_id: "alias/app-a".into(),
                encryption_context: ctx(&context),
                number_of_bytes: asked,
            })
            .await
            .unwrap()
            .into_inner();
        assert_eq!(generated.plaintext.len(), expected);
        assert_eq!(generated.key_id, a.key_id, "canonical id, not the alias");
        assert_eq!(generated.key_version, 1);
        assert!(generated.ciphertext_blob.len() < 1024);
        let unwrapped = data
            .unwrap(unwrap_req(&generated.ciphertext_blob, &context))
            .await
            .unwrap()
            .into_inner();
        assert_eq!(unwrapped.plaintext, generated.plaintext);
        assert_eq!(unwrapped.key_id, a.key_id);
        assert_eq!(unwrapped.key_version, 1);
    }

    // Two data keys are never equal (they come from the token's RNG).
    let one = data
        .generate_data_key(GenerateDataKeyRequest {
            key_id: a.key_id.clone(),
            ..Default::default()
        })
        .await
        .unwrap()
        .into_inner();
    let two = data
        .generate_data_key(GenerateDataKeyRequest {
            key_id: a.key_id.clone(),
            ..Default::default()
        })
        .await
        .unwrap()
        .into_inner();
    assert_ne!(one.plaintext, two.plaintext);
    assert_ne!(one.ciphertext_blob, two.ciphertext_blob);

    // GenerateDataKeyWithoutPlaintext, then Unwrap gives a 32-byte key.
    let blind = data
        .generate_data_key_without_plaintext(GenerateDataKeyRequest {
            key_id: b.key_id.clone(),
            encryption_context: ctx(&context),
            number_of_bytes: 0,
        })
        .await
        .unwrap()
        .into_inner();
    assert_eq!(blind.key_id, b.key_id);
    let plain = data
        .unwrap(unwrap_req(&blind.ciphertext_blob, &context))
        .await
        .unwrap()
        .into_inner();
    assert_eq!(plain.plaintext.len(), 32);

    // Wrap at both size bounds, with and without context.
    for (len, context) in [(1usize, &[][..]), (4096, &context[..])] {
        let plaintext: Vec<u8> = (0..len).map(|i| (i * 7 + 3) as u8).collect();
        let wrapped = data
            .wrap(WrapRequest {
                key_id: b.key_id.clone(),
                plaintext: plaintext.clone(),
                encryption_context: ctx(context),
            })
            .await
            .unwrap()
            .into_inner();
        let unwrapped = data
            .unwrap(unwrap_req(&wrapped.ciphertext_blob, context))
            .await
            .unwrap()
            .into_inner();
        assert_eq!(unwrapped.plaintext, plaintext);
    }

    // Unwrap with key_id set: by id and by alias both accepted when they match.
    for key_id in [a.key_id.clone(), "alias/app-a".to_owned()] {
        let mut request = unwrap_req(&one.ciphertext_blob, &[]);
        request.key_id = key_id;
        let unwrapped = data.unwrap(request).await.unwrap().into_inner();
        assert_eq!(unwrapped.plaintext, one.plaintext);
    }

    // ReWrap to another key and another context; the source blob still works too.
    let moved = data
        .re_wrap(ReWrapRequest {
            ciphertext_blob: one.ciphertext_blob.clone(),
            source_encryption_context: ctx(&[]),
            destination_key_id: b.key_id.clone(),
            destination_encryption_context: ctx(&[("moved", "yes")]),
        })
        .await
        .unwrap()
        .into_inner();
    assert_eq!(moved.source_key_id, a.key_id);
    assert_eq!(moved.key_id, b.key_id);
    let unwrapped = data
        .unwrap(unwrap_req(&moved.ciphertext_blob, &[("moved", "yes")]))
        .await
        .unwrap()
        .into_inner();
    assert_eq!(unwrapped.plaintext, one.plaintext);
    assert_eq!(unwrapped.key_id, b.key_id);
    assert_code(
        data.unwrap(unwrap_req(&moved.ciphertext_blob, &[])).await,
        Code::InvalidArgument,
    );
}

#[tokio::test]
async fn rotation_keeps_old_blobs_and_rewrap_moves_to_the_newest_version() {
    let daemon = DevDaemon::start();
    let mut keys = daemon.keys().await;
    let mut data = daemon.data().await;
    let key = create_key(&mut keys, "alias/rotating").await;
    let context = [("k", "v")];

    let v1 = generate(&mut data, &key.key_id, &context).await;
    assert_eq!(v1.key_version, 1);

    let rotated = keys
        .rotate_key(KeyRef {
            key_id: "alias/rotating".into(),
        })
        .await
        .unwrap()
        .into_inner();
    assert_eq!(rotated.current_version, 2);
    assert_eq!(rotated.versions.len(), 2);
    keys.rotate_key(KeyRef {
        key_id: key.key_id.clone(),
    })
    .await
    .unwrap();

    // New wraps use version 3.
    let v3 = data
        .wrap(WrapRequest {
            key_id: key.key_id.clone(),
            plaintext: b"fresh".to_vec(),
            encryption_context: ctx(&context),
        })
        .await
        .unwrap()
        .into_inner();
    assert_eq!(v3.key_version, 3);

    // The version-1 blob still unwraps.
    let old = data
        .unwrap(unwrap_req(&v1.ciphertext_blob, &context))
        .await
        .unwrap()
        .into_inner();
    assert_eq!(old.plaintext, v1.plaintext);
    assert_eq!(old.key_version, 1);

    // ReWrap with no destination moves it to the newest version of its own key.
    let moved = data
        .re_wrap(ReWrapRequest {
            ciphertext_blob: v1.ciphertext_blob.clone(),
            source_encryption_context: ctx(&context),
            destination_key_id: String::new(),
            destination_encryption_context: ctx(&context),
        })
        .await
        .unwrap()
        .into_inner();
    assert_eq!(moved.source_key_id, key.key_id);
    assert_eq!(moved.source_key_version, 1);
    assert_eq!(moved.key_id, key.key_id);
    assert_eq!(moved.key_version, 3);
    let again = data
        .unwrap(unwrap_req(&moved.ciphertext_blob, &context))
        .await
        .unwrap()
        .into_inner();
    assert_eq!(again.plaintext, v1.plaintext);
    assert_eq!(again.key_version, 3);
}

#[tokio::test]
async fn bad_input_gets_the_documented_codes() {
    let daemon = DevDaemon::start();
    let mut keys = daemon.keys().await;
    let mut data = daemon.data().await;
    let key = create_key(&mut keys, "alias/bad-input").await;
    let other = create_key(&mut keys, "alias/other").await;
    let context = [("tenant", "acme")];
    let generated = generate(&mut data, &key.key_id, &context).await;
    let blob = generated.ciphertext_blob.clone();

    // Sizes.
    let wrap = |plaintext: Vec<u8>| WrapRequest {
        key_id: key.key_id.clone(),
        plaintext,
        encryption_context: ctx(&[]),
    };
    assert_code(data.wrap(wrap(vec![])).await, Code::InvalidArgument);
    assert_code(data.wrap(wrap(vec![0; 4097])).await, Code::InvalidArgument);
    assert_code(
        data.generate_data_key(GenerateDataKeyRequest {
            key_id: key.key_id.clone(),
            encryption_context: ctx(&[]),
            number_of_bytes: 65,
        })
        .await,
        Code::InvalidArgument,
    );
    // An encryption context over 8 KiB serialized, and one with an empty key.
    let big = "x".repeat(8 * 1024);
    assert_code(
        data.generate_data_key(GenerateDataKeyRequest {
            key_id: key.key_id.clone(),
            encryption_context: ctx(&[("k", &big)]),
            number_of_bytes: 32,
        })
        .await,
        Code::InvalidArgument,
    );
    assert_code(
        data.unwrap(unwrap_req(&blob, &[("", "v")])).await,
        Code::InvalidArgument,
    );

    // Every unwrap failure: same code, same message (no oracle).
    let mut messages = std::collections::HashSet::new();
    let mut expect_invalid = |status: tonic::Status| {
        assert_eq!(status.code(), Code::InvalidArgument, "{}", status.message());
        messages.insert(status.message().to_owned());
    };
    for len in [0, 1, 4, 5, 6, 20, 42, 46, 58, blob.len() - 1] {
        expect_invalid(
            data.unwrap(unwrap_req(&blob[..len], &context))
                .await
                .unwrap_err(),
        );
    }
    let mut longer = blob.clone();
    longer.push(0);
    expect_invalid(
        data.unwrap(unwrap_req(&longer, &context))
            .await
            .unwrap_err(),
    );
    // Every single-bit flip anywhere in the blob.
    for i in 0..blob.len() {
        for bit in 0..8 {
            let mut flipped = blob.clone();
            flipped[i] ^= 1 << bit;
            let result = data.unwrap(unwrap_req(&flipped, &context)).await;
            expect_invalid(result.expect_err(&format!("flip of byte {i} bit {bit} unwrapped")));
        }
    }
    // Wrong, extra and missing context entries.
    for wrong in [
        &[("tenant", "acme2")][..],
        &[("tenant", "acme"), ("x", "y")][..],
        &[][..],
        &[("Tenant", "acme")][..],
    ] {
        expect_invalid(data.unwrap(unwrap_req(&blob, wrong)).await.unwrap_err());
    }
    // key_id naming a different (existing) key.
    let mut request = unwrap_req(&blob, &context);
    request.key_id = other.key_id.clone();
    expect_invalid(data.unwrap(request).await.unwrap_err());
    let mut request = unwrap_req(&blob, &context);
    request.key_id = "alias/other".into();
    expect_invalid(data.unwrap(request).await.unwrap_err());
    assert_eq!(
        messages.len(),
        1,
        "unwrap failures must not differ: {messages:?}"
    );

    // The blob was never damaged by any of this.
    let ok = data
        .unwrap(unwrap_req(&blob, &context))
        .await
        .unwrap()
        .into_inner();
    assert_eq!(ok.plaintext, generated.plaintext);

    // Unknown and malformed keys.
    let unknown = "key/00000000000000000000000000000000";
    for key_id in [unknown, "alias/nope"] {
        assert_code(
            data.wrap(WrapRequest {
                key_id: key_id.into(),
                plaintext: vec![1],
                encryption_context: ctx(&[]),
            })
            .await,
            Code::NotFound,
        );
        let mut request = unwrap_req(&blob, &context);
        request.key_id = key_id.into();
        assert_code(data.unwrap(request).await, Code::NotFound);
        assert_code(
            keys.describe_key(KeyRef {
                key_id: key_id.into(),
            })
            .await,
            Code::NotFound,
        );
    }
    for key_id in [
        "",
        "key/xyz",
        "arn:aws:kms:whatever",
        "alias/",
        "alias/has space",
    ] {
        assert_code(
            data.wrap(WrapRequest {
                key_id: key_id.into(),
                plaintext: vec![1],
                encryption_context: ctx(&[]),
            })
            .await,
            Code::InvalidArgument,
        );
    }

    // A duplicate alias.
    assert_code(
        keys.create_key(wrapd::proto::CreateKeyRequest {
            description: String::new(),
            alias: "alias/other".into(),
            ..Default::default()
        })
        .await,
        Code::AlreadyExists,
    );
    assert_code(
        keys.create_alias(wrapd::proto::AliasRequest {
            alias_name: "alias/other".into(),
            key_id: key.key_id.clone(),
        })
        .await,
        Code::AlreadyExists,
    );

    // A disabled key: every data-plane call is FAILED_PRECONDITION, then works again.
    keys.disable_key(KeyRef {
        key_id: key.key_id.clone(),
    })
    .await
    .unwrap();
    assert_code(data.wrap(wrap(vec![1])).await, Code::FailedPrecondition);
    assert_code(
        data.generate_data_key(GenerateDataKeyRequest {
            key_id: key.key_id.clone(),
            ..Default::default()
        })
        .await,
        Code::FailedPrecondition,
    );
    assert_code(
        data.unwrap(unwrap_req(&blob, &context)).await,
        Code::FailedPrecondition,
    );
    assert_code(
        data.re_wrap(ReWrapRequest {
            ciphertext_blob: blob.clone(),
            source_encryption_context: ctx(&context),
            destination_key_id: other.key_id.clone(),
            destination_encryption_context: ctx(&[]),
        })
        .await,
        Code::FailedPrecondition,
    );
    // ... also as a ReWrap destination.
    let other_blob = data
        .wrap(WrapRequest {
            key_id: other.key_id.clone(),
            plaintext: vec![9; 16],
            encryption_context: ctx(&[]),
        })
        .await
        .unwrap()
        .into_inner()
        .ciphertext_blob;
    assert_code(
        data.re_wrap(ReWrapRequest {
            ciphertext_blob: other_blob,
            source_encryption_context: ctx(&[]),
            destination_key_id: key.key_id.clone(),
            destination_encryption_context: ctx(&[]),
        })
        .await,
        Code::FailedPrecondition,
    );
    keys.enable_key(KeyRef {
        key_id: key.key_id.clone(),
    })
    .await
    .unwrap();
    data.unwrap(unwrap_req(&blob, &context)).await.unwrap();

    // A key pending deletion.
    keys.schedule_key_deletion(ScheduleKeyDeletionRequest {
        key_id: key.key_id.clone(),
        pending_window_days: 7,
    })
    .await
    .unwrap();
    assert_code(data.wrap(wrap(vec![1])).await, Code::FailedPrecondition);
    assert_code(
        data.unwrap(unwrap_req(&blob, &context)).await,
        Code::FailedPrecondition,
    );
    assert_code(
        keys.enable_key(KeyRef {
            key_id: key.key_id.clone(),
        })
        .await,
        Code::FailedPrecondition,
    );
    assert_code(
        keys.rotate_key(KeyRef {
            key_id: key.key_id.clone(),
        })
        .await,
        Code::FailedPrecondition,
    );
}

#[tokio::test]
async fn concurrent_callers_beyond_the_session_cap_all_succeed() {
    let daemon = DevDaemon::start();
    let mut keys = daemon.keys().await;
    let key = create_key(&mut keys, "").await;
    let mut tasks = Vec::new();
    // 64 callers on 8 sessions (the dev config's cap).
    for i in 0..64u8 {
        let mut data = daemon.data().await;
        let key_id = key.key_id.clone();
        tasks.push(tokio::spawn(async move {
            for j in 0..10u8 {
                let plaintext = vec![i, j, 42];
                let context = ctx(&[("caller", &i.to_string())]);
                let wrapped = data
                    .wrap(WrapRequest {
                        key_id: key_id.clone(),
                        plaintext: plaintext.clone(),
                        encryption_context: context.clone(),
                    })
                    .await
                    .unwrap()
                    .into_inner();
                let unwrapped = data
                    .unwrap(UnwrapRequest {
                        ciphertext_blob: wrapped.ciphertext_blob,
                        encryption_context: context,
                        key_id: String::new(),
                    })
                    .await
                    .unwrap()
                    .into_inner();
                assert_eq!(unwrapped.plaintext, plaintext);
            }
        }));
    }
    for task in tasks {
        task.await.unwrap();
    }
    let described = keys
        .describe_key(KeyRef {
            key_id: key.key_id.clone(),
        })
        .await
        .unwrap()
        .into_inner();
    assert_eq!(described.versions[0].wrap_count, 640);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn rotations_under_load_cause_no_errors() {
    let daemon = DevDaemon::start();
    let mut keys = daemon.keys().await;
    let key = create_key(&mut keys, "alias/busy").await;
    let stop = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
    let mut tasks = Vec::new();
    for i in 0..8u8 {
        let mut data = daemon.data().await;
        let stop = stop.clone();
        tasks.push(tokio::spawn(async move {
            let mut done = 0u32;
            while !stop.load(std::sync::atomic::Ordering::Relaxed) {
                let generated = data
                    .generate_data_key(GenerateDataKeyRequest {
                        key_id: "alias/busy".into(),
                        encryption_context: ctx(&[("i", &i.to_string())]),
                        number_of_bytes: 32,
                    })
                    .await
                    .expect("GenerateDataKey during rotation")
                    .into_inner();
                let unwrapped = data
                    .unwrap(unwrap_req(
                        &generated.ciphertext_blob,
                        &[("i", &i.to_string())],
                    ))
                    .await
                    .expect("Unwrap during rotation")
                    .into_inner();
                assert_eq!(unwrapped.plaintext, generated.plaintext);
                done += 1;
            }
            done
        }));
    }
    for _ in 0..20 {
        keys.rotate_key(KeyRef {
            key_id: "alias/busy".into(),
        })
        .await
        .unwrap();
        let _ = keys
            .create_key(wrapd::proto::CreateKeyRequest::default())
            .await
            .unwrap();
    }
    stop.store(true, std::sync::atomic::Ordering::Relaxed);
    let mut total = 0;
    for task in tasks {
        total += task.await.unwrap();
    }
    assert!(total > 0);
    let described = keys
        .describe_key(KeyRef { key_id: key.key_id })
        .await
        .unwrap()
        .into_inner();
    assert_eq!(described.current_version, 21);
}

#[tokio::test]
async fn batch_unwrap_answers_each_item_on_its_own_with_one_audit_line_each() {
    use wrapd::proto::batch_unwrap_result::Result as Item;
    let daemon = DevDaemon::start();
    let mut keys = daemon.keys().await;
    let mut data = daemon.data().await;
    let key = create_key(&mut keys, "").await;
    let mut items = Vec::new();
    let mut plaintexts = Vec::new();
    for i in 0..3 {
        let tenant = format!("t{i}");
        let generated = generate(&mut data, &key.key_id, &[("tenant", &tenant)]).await;
        plaintexts.push(generated.plaintext);
        items.push(unwrap_req(
            &generated.ciphertext_blob,
            &[("tenant", &tenant)],
        ));
    }
    let mut tampered = items[0].clone();
    *tampered.ciphertext_blob.last_mut().unwrap() ^= 1;
    let mut wrong_context = items[1].clone();
    wrong_context.encryption_context = ctx(&[("tenant", "other")]);
    items.push(tampered);
    items.push(wrong_context);
    let before = daemon.audit_lines().len();
    let results = data
        .batch_unwrap(wrapd::proto::BatchUnwrapRequest { items })
        .await
        .unwrap()
        .into_inner()
        .results;
    assert_eq!(results.len(), 5);
    for (i, plaintext) in plaintexts.iter().enumerate() {
        match &results[i].result {
            Some(Item::Ok(ok)) => assert_eq!(&ok.plaintext, plaintext),
            other => panic!("item {i}: {other:?}"),
        }
    }
    for result in &results[3..] {
        match &result.result {
            Some(Item::Error(e)) => assert_eq!(e.code, Code::InvalidArgument as i32),
            other => panic!("{other:?}"),
        }
    }
    let lines = daemon.audit_lines();
    let batch = &lines[before..];
    assert_eq!(batch.len(), 5, "one audit line per item");
    assert!(batch.iter().all(|l| l.operation == "Unwrap"));
    let outcomes: Vec<&str> = batch.iter().map(|l| l.outcome.as_str()).collect();
    assert_eq!(
        outcomes,
        ["OK", "OK", "OK", "INVALID_ARGUMENT", "INVALID_ARGUMENT"]
    );
    let ids: Vec<&str> = batch.iter().map(|l| l.request_id.as_str()).collect();
    let prefix = ids[0].strip_suffix(".0").expect("request id ID.INDEX");
    for (i, id) in ids.iter().enumerate() {
        assert_eq!(*id, format!("{prefix}.{i}"));
    }
}

#[tokio::test]
async fn batch_generate_data_key_makes_keys_that_unwrap_one_by_one() {
    use wrapd::proto::batch_generate_data_key_result::Result as Item;
    let daemon = DevDaemon::start();
    let mut keys = daemon.keys().await;
    let mut data = daemon.data().await;
    let key = create_key(&mut keys, "alias/batch").await;
    let items: Vec<GenerateDataKeyRequest> = (0..64)
        .map(|i| GenerateDataKeyRequest {
            key_id: "alias/batch".into(),
            encryption_context: ctx(&[("n", &i.to_string())]),
            number_of_bytes: 32,
        })
        .chain(std::iter::once(GenerateDataKeyRequest {
            key_id: "alias/missing".into(),
            ..Default::default()
        }))
        .collect();
    let results = data
        .batch_generate_data_key(wrapd::proto::BatchGenerateDataKeyRequest { items })
        .await
        .unwrap()
        .into_inner()
        .results;
    assert_eq!(results.len(), 65);
    for (i, result) in results[..64].iter().enumerate() {
        let Some(Item::Ok(generated)) = &result.result else {
            panic!("item {i}: {result:?}");
        };
        assert_eq!(generated.key_id, key.key_id);
        let unwrapped = data
            .unwrap(unwrap_req(
                &generated.ciphertext_blob,
                &[("n", &i.to_string())],
            ))
            .await
            .unwrap()
            .into_inner();
        assert_eq!(unwrapped.plaintext, generated.plaintext);
    }
    match &results[64].result {
        Some(Item::Error(e)) => assert_eq!(e.code, Code::NotFound as i32),
        other => panic!("{other:?}"),
    }
}

#[tokio::test]
async fn a_batch_of_no_items_or_more_than_a_thousand_is_refused() {
    let daemon = DevDaemon::start();
    let mut data = daemon.data().await;
    assert_code(
        data.batch_unwrap(wrapd::proto::BatchUnwrapRequest { items: vec![] })
            .await,
        Code::InvalidArgument,
    );
    let items = vec![unwrap_req(b"x", &[]); 1001];
    assert_code(
        data.batch_unwrap(wrapd::proto::BatchUnwrapRequest { items })
            .await,
        Code::InvalidArgument,
    );
}
