//! The thin client's data key cache against a real daemon: the daemon's audit log counts
//! the GenerateDataKey and Unwrap calls the cache let through.

use crate::common;

use std::sync::Arc;
use std::time::Duration;

use common::{DevDaemon, create_key, eventually};
use wrapd::client::cache::{CacheLimits, CachingKeyring};
use wrapd::client::keyring::{Keyring, WrapdKey};
use wrapd::client::message;
use wrapd::context::EncryptionContext;

fn context(tenant: &str) -> EncryptionContext {
    EncryptionContext::from_entries([("tenant".to_owned(), tenant.to_owned())]).unwrap()
}

async fn keyring(daemon: &DevDaemon, alias: &str) -> Keyring {
    create_key(&mut daemon.keys().await, alias).await;
    Keyring::new(vec![WrapdKey {
        client: daemon.data().await,
        key_id: alias.to_owned(),
    }])
    .unwrap()
}

fn calls(daemon: &DevDaemon, operation: &str) -> usize {
    daemon
        .audit_lines()
        .iter()
        .filter(|r| r.operation == operation && r.outcome == "OK")
        .count()
}

/// The wrapped DEK a message carries: equal blobs mean the same cached DEK.
fn blob(message: &[u8]) -> Vec<u8> {
    message::peek_header(message).unwrap().data_keys[0]
        .ciphertext
        .clone()
}

async fn seal(cache: &CachingKeyring, ctx: &EncryptionContext, plaintext: &[u8]) -> Vec<u8> {
    let key = cache
        .data_key(ctx, Some(plaintext.len() as u64))
        .await
        .unwrap();
    message::encrypt(plaintext, &key.dek, ctx, key.data_keys.clone(), 4096).unwrap()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn message_and_byte_limits_and_context_partitions() {
    let daemon = DevDaemon::start();
    let keyring = keyring(&daemon, "alias/cache-limits").await;
    let cache = CachingKeyring::new(
        keyring,
        CacheLimits {
            max_messages: 3,
            max_bytes: 1000,
            ..CacheLimits::new(Duration::from_secs(600))
        },
    )
    .unwrap();
    let before = calls(&daemon, "GenerateDataKey");
    let (a, b) = (context("a"), context("b"));
    // Seven messages under one context, at most three per DEK.
    let mut blobs = Vec::new();
    for _ in 0..7 {
        blobs.push(blob(&seal(&cache, &a, b"small").await));
    }
    for (i, group) in blobs.chunks(3).enumerate() {
        assert!(
            group.iter().all(|b| *b == group[0]),
            "group {i} shares one DEK"
        );
    }
    assert_ne!(blobs[0], blobs[3]);
    assert_ne!(blobs[3], blobs[6]);
    // Another context never gets a cached DEK of the first.
    let other = blob(&seal(&cache, &b, b"small").await);
    assert!(blobs.iter().all(|b| *b != other));
    // Bytes: 400-byte messages, 1000 bytes per DEK: two per DEK.
    let c = context("c");
    let mut by_bytes = Vec::new();
    for _ in 0..4 {
        by_bytes.push(blob(&seal(&cache, &c, &[0u8; 400]).await));
    }
    assert_eq!(by_bytes[0], by_bytes[1]);
    assert_ne!(by_bytes[1], by_bytes[2]);
    assert_eq!(by_bytes[2], by_bytes[3]);
    // A message over the byte limit, or of unknown length, bypasses the cache.
    let big = cache.data_key(&c, Some(2000)).await.unwrap();
    let unknown = cache.data_key(&c, None).await.unwrap();
    assert_ne!(big.data_keys[0].ciphertext, by_bytes[3]);
    assert_ne!(unknown.data_keys[0].ciphertext, by_bytes[3]);
    assert_eq!(cache.stats().bypassed, 2);

    // Every message decrypts with the plain keyring (the cache changes nothing on the wire).
    let sealed = seal(&cache, &a, b"hello").await;
    let header = message::peek_header(&sealed).unwrap();
    let dek = cache.keyring().unwrap(&header).await.unwrap();
    let (_, plaintext) = message::decrypt(&sealed, |_| Ok(dek)).unwrap();
    assert_eq!(&plaintext[..], b"hello");

    // Daemon calls: DEKs for a (3, with refreshes started at the third use of each),
    // b (1), c (2 + refreshes) and the 2 bypasses: never more than one per DEK used plus
    // one refresh per DEK, and far fewer than the 14 messages.
    eventually("refreshes settle", || async {
        calls(&daemon, "GenerateDataKey") - before
            == (cache.stats().misses + cache.stats().refreshes + 2) as usize
    })
    .await;
    let generated = calls(&daemon, "GenerateDataKey") - before;
    assert!(generated < 14, "{generated} daemon calls for 14 messages");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn concurrent_misses_make_one_daemon_call() {
    let daemon = DevDaemon::start();
    let cache = CachingKeyring::new(
        keyring(&daemon, "alias/cache-flight").await,
        CacheLimits::new(Duration::from_secs(600)),
    )
    .unwrap();
    let before = calls(&daemon, "GenerateDataKey");
    let ctx = context("flight");
    let mut tasks = Vec::new();
    for _ in 0..32 {
        let (cache, ctx) = (cache.clone(), ctx.clone());
        tasks.push(tokio::spawn(async move {
            cache.data_key(&ctx, Some(10)).await.unwrap()
        }));
    }
    let mut keys: Vec<Arc<wrapd::client::keyring::DataKey>> = Vec::new();
    for task in tasks {
        keys.push(task.await.unwrap());
    }
    assert!(keys.iter().all(|k| k.data_keys == keys[0].data_keys));
    assert_eq!(calls(&daemon, "GenerateDataKey") - before, 1);
    assert_eq!(cache.stats().misses, 1);
    assert_eq!(cache.stats().hits, 31);

    // Decryption: 16 concurrent decrypts of one message make one Unwrap.
    let sealed = Arc::new(
        message::encrypt(b"x", &keys[0].dek, &ctx, keys[0].data_keys.clone(), 4096).unwrap(),
    );
    let unwraps = calls(&daemon, "Unwrap");
    let mut tasks = Vec::new();
    for _ in 0..16 {
        let (cache, sealed) = (cache.clone(), Arc::clone(&sealed));
        tasks.push(tokio::spawn(async move {
            let header = message::peek_header(&sealed).unwrap();
            let dek = cache.unwrap(&header).await.unwrap();
            message::decrypt(&sealed, |_| Ok(dek)).unwrap().1.to_vec()
        }));
    }
    for task in tasks {
        assert_eq!(task.await.unwrap(), b"x");
    }
    assert_eq!(calls(&daemon, "Unwrap") - unwraps, 1);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn entries_are_refreshed_before_they_expire() {
    let daemon = DevDaemon::start();
    let max_age = Duration::from_secs(4);
    let cache = CachingKeyring::new(
        keyring(&daemon, "alias/cache-age").await,
        CacheLimits::new(max_age),
    )
    .unwrap();
    let before = calls(&daemon, "GenerateDataKey");
    let ctx = context("age");
    let first = blob(&seal(&cache, &ctx, b"1").await);
    // Within the first three quarters: the same DEK, no refresh.
    let again = blob(&seal(&cache, &ctx, b"2").await);
    assert_eq!(first, again);
    assert_eq!(cache.stats().refreshes, 0);
    // In the last quarter: still the same DEK, and a refresh starts in the background.
    tokio::time::sleep(max_age.mul_f64(0.8)).await;
    let late = blob(&seal(&cache, &ctx, b"3").await);
    assert_eq!(first, late);
    assert_eq!(cache.stats().refreshes, 1);
    eventually("the refresh reaches the daemon", || async {
        calls(&daemon, "GenerateDataKey") - before == 2
    })
    .await;
    // After expiry: the refreshed DEK, without another daemon call.
    tokio::time::sleep(max_age.mul_f64(0.3)).await;
    let next = blob(&seal(&cache, &ctx, b"4").await);
    assert_ne!(next, first);
    assert_eq!(calls(&daemon, "GenerateDataKey") - before, 2);
    assert_eq!(cache.stats().misses, 1);
}
