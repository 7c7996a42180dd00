//! Keyrings across several daemons: the DEK is wrapped under a key on each (one reached over
//! the unix socket, one over TCP with mutual TLS), and a message decrypts while any one of
//! them can unwrap: with a key disabled, with a daemon down, and not at all once both fail.

mod common;

use common::{DevDaemon, create_key};
use wrapd::client::DataKeyServiceClient;
use wrapd::client::keyring::{Keyring, WrapdKey};
use wrapd::client::message;
use wrapd::context::EncryptionContext;
use wrapd::proto::KeyRef;

fn context() -> EncryptionContext {
    EncryptionContext::from_entries([("tenant".to_owned(), "acme".to_owned())]).unwrap()
}

async fn decrypt(keyring: &Keyring, sealed: &[u8]) -> wrapd::Result<Vec<u8>> {
    let header = message::peek_header(sealed)?;
    let dek = keyring.unwrap(&header).await?;
    Ok(message::decrypt(sealed, |_| Ok(dek))?.1.to_vec())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_message_decrypts_while_any_daemon_can_unwrap() {
    let mut a = DevDaemon::start();
    let b = DevDaemon::start();
    let key_a = create_key(&mut a.keys().await, "alias/ring-a").await;
    let key_b = create_key(&mut b.keys().await, "alias/ring-b").await;
    let tls_b = b
        .tls_channel(&b.dir().join("pki"), "client", None)
        .await
        .expect("mutual TLS to daemon b");
    let keyring = Keyring::new(vec![
        WrapdKey {
            client: a.data().await,
            key_id: "alias/ring-a".into(),
        },
        WrapdKey {
            client: DataKeyServiceClient::new(tls_b.clone()),
            key_id: "alias/ring-b".into(),
        },
    ])
    .unwrap();
    let data_key = keyring.generate(&context()).await.unwrap();
    let ids: Vec<String> = data_key
        .data_keys
        .iter()
        .map(|k| String::from_utf8(k.provider_info.clone()).unwrap())
        .collect();
    assert_eq!(ids, vec![key_a.key_id.clone(), key_b.key_id.clone()]);
    let plaintext = vec![0x5a; 20_000];
    let sealed = message::encrypt(
        &plaintext,
        &data_key.dek,
        &context(),
        data_key.data_keys.clone(),
        4096,
    )
    .unwrap();

    // Each daemon alone can open it.
    for client in [a.data().await, DataKeyServiceClient::new(tls_b.clone())] {
        let alone = Keyring::for_decryption(vec![client]).unwrap();
        assert_eq!(decrypt(&alone, &sealed).await.unwrap(), plaintext);
    }
    // Key a disabled: daemon a refuses, daemon b opens it.
    a.keys()
        .await
        .disable_key(KeyRef {
            key_id: "alias/ring-a".into(),
        })
        .await
        .unwrap();
    assert!(
        decrypt(
            &Keyring::for_decryption(vec![a.data().await]).unwrap(),
            &sealed
        )
        .await
        .is_err()
    );
    assert_eq!(decrypt(&keyring, &sealed).await.unwrap(), plaintext);
    // Daemon a down (UNAVAILABLE, retried, then the next daemon): still opens.
    a.stop();
    assert_eq!(decrypt(&keyring, &sealed).await.unwrap(), plaintext);
    // Daemon b's key disabled too: nobody can, and the error says why.
    b.keys()
        .await
        .disable_key(KeyRef {
            key_id: "alias/ring-b".into(),
        })
        .await
        .unwrap();
    let err = decrypt(&keyring, &sealed).await.unwrap_err();
    assert!(
        matches!(
            err,
            wrapd::Error::FailedPrecondition(_) | wrapd::Error::Unavailable(_)
        ),
        "{err:?}"
    );
}
