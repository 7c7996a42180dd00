//! The message format against the official AWS Encryption SDK (Python): files wrapd's format
//! code writes decrypt with the official SDK, and files the official SDK writes (suites
//! 0x0478 and its default 0x0578, signed) decrypt here. A static data key isolates the format from key management.

use std::path::Path;
use std::process::Command;

use wrapd::client::message::{self, EncryptedDataKey, PROVIDER_ID};
use wrapd::context::EncryptionContext;
use zeroize::Zeroizing;

const DEK: [u8; 32] = [0x42; 32];

fn python(args: &[&str]) {
    let script = Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/python/esdk_static_key.py");
    let out = Command::new("python3")
        .arg(script)
        .args(args)
        .output()
        .expect("python3");
    assert!(
        out.status.success(),
        "the official SDK failed: {}",
        String::from_utf8_lossy(&out.stderr)
    );
}

fn plaintexts() -> Vec<Vec<u8>> {
    [0usize, 1, 4095, 4096, 4097, 3 * 4096, 100_000]
        .iter()
        .map(|&n| (0..n).map(|i| (i * 31 % 251) as u8).collect())
        .collect()
}

#[test]
fn wrapd_messages_decrypt_with_the_official_sdk() {
    let dir = tempfile::tempdir().unwrap();
    let context = EncryptionContext::from_entries([
        ("tenant".to_owned(), "acme".to_owned()),
        ("purpose".to_owned(), "interop".to_owned()),
    ])
    .unwrap();
    for (i, plaintext) in plaintexts().iter().enumerate() {
        for frame in [4096u32, 1024] {
            let edk = EncryptedDataKey {
                provider_id: PROVIDER_ID.into(),
                provider_info: b"key/00112233445566778899aabbccddeeff".to_vec(),
                ciphertext: b"static-edk".to_vec(),
            };
            let encrypted = message::encrypt(plaintext, &DEK, &context, vec![edk], frame).unwrap();
            let (src, dst) = (
                dir.path().join(format!("w{i}-{frame}")),
                dir.path().join(format!("w{i}-{frame}.out")),
            );
            std::fs::write(&src, &encrypted).unwrap();
            python(&[
                "decrypt",
                &hex::encode(DEK),
                src.to_str().unwrap(),
                dst.to_str().unwrap(),
            ]);
            assert_eq!(
                &std::fs::read(&dst).unwrap(),
                plaintext,
                "plaintext {i}, frame {frame}"
            );
        }
    }
}

#[test]
fn official_sdk_messages_decrypt_with_wrapd() {
    let dir = tempfile::tempdir().unwrap();
    for (i, plaintext) in plaintexts().iter().enumerate() {
        for (frame, suite) in [
            ("4096", "0478"),
            ("1024", "0478"),
            ("4096", "0578"),
            ("1024", "0578"),
        ] {
            let (src, dst) = (
                dir.path().join(format!("p{i}-{frame}-{suite}")),
                dir.path().join(format!("p{i}-{frame}-{suite}.esdk")),
            );
            std::fs::write(&src, plaintext).unwrap();
            python(&[
                "encrypt",
                &hex::encode(DEK),
                src.to_str().unwrap(),
                dst.to_str().unwrap(),
                frame,
                suite,
            ]);
            let encrypted = std::fs::read(&dst).unwrap();
            let (header, out) = message::decrypt(&encrypted, |h| {
                assert_eq!(h.data_keys[0].provider_id, "wrapd");
                Ok(Zeroizing::new(DEK.to_vec()))
            })
            .unwrap_or_else(|e| panic!("plaintext {i}, frame {frame}: {e}"));
            assert_eq!(&*out, plaintext, "plaintext {i}, frame {frame}");
            assert_eq!(header.context.get("tenant"), Some("acme"));
            let expected_suite = if suite == "0578" {
                message::SUITE_COMMIT_KEY_ECDSA_P384
            } else {
                message::SUITE_COMMIT_KEY
            };
            assert_eq!(header.suite, expected_suite);
            if suite == "0578" {
                // A changed signature byte (the message's last byte) is caught.
                let mut forged = encrypted.clone();
                let last = forged.len() - 1;
                forged[last] ^= 1;
                assert!(message::decrypt(&forged, |_| Ok(Zeroizing::new(DEK.to_vec()))).is_err());
            }
        }
    }
}
