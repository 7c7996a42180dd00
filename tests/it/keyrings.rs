//! Keyrings across several daemons: the DEK is wrapped under a key on each (one reached over
//! the unix socket, one over TCP with mutual TLS), and a message decrypts while any one of
//! them can unwrap: with a key disabled, with a daemon down, and not at all once both fail.

use crate::common;

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
            err.kind(),
            wrapd::error::ErrorKind::WrongState | wrapd::error::ErrorKind::Unavailable
        ),
        "{err:?}"
    );
    // The error says why each entry failed.
    let text = err.to_string();
    assert!(
        text.contains(&key_a.key_id) && text.contains(&key_b.key_id),
        "{text}"
    );
}

fn wrapctl(args: &[&str]) -> (bool, String) {
    let out = std::process::Command::new(env!("CARGO_BIN_EXE_wrapctl"))
        .args(args)
        .output()
        .unwrap();
    let stderr = String::from_utf8_lossy(&out.stderr).into_owned();
    assert!(!stderr.contains("panicked"), "{stderr}");
    (out.status.success(), stderr)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn wrapctl_wraps_under_keys_on_two_daemons() {
    let mut a = DevDaemon::start();
    let b = DevDaemon::start();
    create_key(&mut a.keys().await, "alias/cli-a").await;
    create_key(&mut b.keys().await, "alias/cli-b").await;
    let dir = tempfile::tempdir().unwrap();
    let path = |name: &str| dir.path().join(name).to_str().unwrap().to_owned();
    std::fs::write(path("plain"), vec![7u8; 300_000]).unwrap();
    let socket_a = a.socket.to_str().unwrap().to_owned();
    let socket_b = b.socket.to_str().unwrap().to_owned();
    let pki_b = b.dir().join("pki");
    let pki = |f: &str| pki_b.join(f).to_str().unwrap().to_owned();
    let key_b = format!("alias/cli-b@https://{}", b.tcp);
    // Key a on the main daemon (unix socket), key b on daemon b over mutual TLS.
    let (ok, err) = wrapctl(&[
        "--socket",
        &socket_a,
        "--tls-ca",
        &pki("ca.pem"),
        "--tls-cert",
        &pki("client.pem"),
        "--tls-key",
        &pki("client.key"),
        "encrypt",
        "--key",
        "alias/cli-a",
        "--key",
        &key_b,
        "--context",
        "tenant=acme",
        "--input",
        &path("plain"),
        "--output",
        &path("sealed"),
    ]);
    assert!(ok, "{err}");
    let header = message::peek_header(&std::fs::read(path("sealed")).unwrap()).unwrap();
    assert_eq!(header.data_keys.len(), 2);
    // A key on an unreachable daemon: a clear error, no output.
    let (ok, err) = wrapctl(&[
        "--socket",
        &socket_a,
        "encrypt",
        "--key",
        "alias/cli-a",
        "--key",
        "alias/cli-b@/nonexistent/wrapd.sock",
        "--input",
        &path("plain"),
        "--output",
        &path("never"),
    ]);
    assert!(!ok && err.contains("/nonexistent/wrapd.sock"), "{err}");
    assert!(!dir.path().join("never").exists());
    // Daemon b alone decrypts it.
    let (ok, err) = wrapctl(&[
        "--socket",
        &socket_b,
        "decrypt",
        "--input",
        &path("sealed"),
        "--output",
        &path("b"),
    ]);
    assert!(ok, "{err}");
    assert_eq!(std::fs::read(path("b")).unwrap(), vec![7u8; 300_000]);
    // Daemon a stopped: with --daemon b the file still decrypts; without, a clear error.
    a.stop();
    let (ok, err) = wrapctl(&[
        "--socket",
        &socket_a,
        "decrypt",
        "--daemon",
        &socket_b,
        "--input",
        &path("sealed"),
        "--output",
        &path("a-down"),
    ]);
    assert!(ok, "{err}");
    assert_eq!(std::fs::read(path("a-down")).unwrap(), vec![7u8; 300_000]);
    let (ok, err) = wrapctl(&[
        "--socket",
        &socket_a,
        "decrypt",
        "--input",
        &path("sealed"),
        "--output",
        &path("x"),
    ]);
    assert!(!ok && err.contains("cannot connect"), "{err}");
    assert!(!dir.path().join("x").exists());
}

/// Many small messages open with one `BatchUnwrap` call (one audit line per message, all
/// items of one batch); a tampered message and bytes that are no message fail alone, next to
/// the good ones.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn many_messages_decrypt_with_one_batch_call_and_bad_ones_fail_alone() {
    let daemon = DevDaemon::start();
    create_key(&mut daemon.keys().await, "alias/many").await;
    let keyring = Keyring::new(vec![WrapdKey {
        client: daemon.data().await,
        key_id: "alias/many".into(),
    }])
    .unwrap();
    let mut sealed = Vec::new();
    for i in 0..20 {
        let key = keyring.generate(&context()).await.unwrap();
        let plaintext = format!("message {i}");
        sealed.push(
            message::encrypt(
                plaintext.as_bytes(),
                &key.dek,
                &context(),
                key.data_keys.clone(),
                4096,
            )
            .unwrap(),
        );
    }
    // Message 5: its last byte (signature or tag) flipped: its data key unwraps, the
    // message does not open. Message 7: no message at all.
    *sealed[5].last_mut().unwrap() ^= 0x01;
    sealed[7] = b"not a message".to_vec();

    let before = daemon.audit_lines().len();
    let messages: Vec<&[u8]> = sealed.iter().map(Vec::as_slice).collect();
    let results = keyring.decrypt_all(&messages).await;
    assert_eq!(results.len(), 20);
    for (i, result) in results.iter().enumerate() {
        match i {
            5 | 7 => assert!(result.is_err(), "message {i} must fail"),
            _ => assert_eq!(
                &result.as_ref().expect("a good message opens").1[..],
                format!("message {i}").as_bytes()
            ),
        }
    }
    let lines = &daemon.audit_lines()[before..];
    assert_eq!(lines.len(), 19, "one Unwrap line per message with a header");
    let batch = lines[0]
        .request_id
        .rsplit_once('.')
        .expect("a batch item's request id is ID.INDEX")
        .0;
    for line in lines {
        assert_eq!(line.operation, "Unwrap");
        assert_eq!(line.outcome, "OK");
        assert_eq!(line.request_id.rsplit_once('.').map(|p| p.0), Some(batch));
    }
}
