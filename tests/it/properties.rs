//! Property tests of the formats: the ciphertext blob, the encryption context, the audit
//! chain, and the loaders of untrusted text (config, policy), which must never panic.

use proptest::prelude::*;
use wrapd::audit::{AuditRecord, GENESIS, verify};
use wrapd::blob::{Blob, IV_LEN, TAG_LEN};
use wrapd::context::EncryptionContext;
use wrapd::ids::KeyId;

fn key_id() -> impl Strategy<Value = KeyId> {
    "[0-9a-f]{32}".prop_map(|hex| KeyId::parse(&format!("key/{hex}")).unwrap())
}

fn blob() -> impl Strategy<Value = Blob> {
    (
        key_id(),
        1u32..,
        any::<[u8; IV_LEN]>(),
        proptest::collection::vec(any::<u8>(), TAG_LEN + 1..TAG_LEN + 4097),
    )
        .prop_map(|(key_id, key_version, iv, ciphertext)| Blob {
            key_id,
            key_version,
            iv,
            ciphertext,
        })
}

proptest! {
    #[test]
    fn blobs_round_trip(blob in blob()) {
        prop_assert_eq!(Blob::parse(&blob.encode()).unwrap(), blob);
    }

    #[test]
    fn blob_parsing_never_panics(bytes in proptest::collection::vec(any::<u8>(), 0..600)) {
        let _ = Blob::parse(&bytes);
    }

    /// Parsing is injective: a changed byte never parses to the same blob. Changes in the
    /// header or IV are then caught by the GCM tag (the header is AAD, the IV is the nonce);
    /// the integration tests check that against the token.
    #[test]
    fn any_mutation_changes_or_breaks_the_blob(
        blob in blob(),
        index in any::<prop::sample::Index>(),
        xor in 1u8..,
    ) {
        let mut bytes = blob.encode();
        let i = index.index(bytes.len());
        bytes[i] ^= xor;
        if let Ok(parsed) = Blob::parse(&bytes) {
            prop_assert_ne!(parsed, blob);
        }
    }

    #[test]
    fn truncation_or_extension_never_yields_the_same_blob(blob in blob(), cut in 1usize..64, extra in proptest::collection::vec(any::<u8>(), 1..64)) {
        let bytes = blob.encode();
        let shorter = &bytes[..bytes.len().saturating_sub(cut)];
        if let Ok(parsed) = Blob::parse(shorter) {
            prop_assert_ne!(parsed, blob.clone());
        }
        let longer = [bytes.as_slice(), &extra].concat();
        if let Ok(parsed) = Blob::parse(&longer) {
            prop_assert_ne!(parsed, blob);
        }
    }

    /// The canonical context does not depend on insertion order and differs for different
    /// contexts.
    #[test]
    fn context_serialization_is_canonical_and_injective(
        a in proptest::collection::btree_map("[a-zA-Z0-9é]{1,8}", "[a-z0-9 ]{0,8}", 0..6),
        b in proptest::collection::btree_map("[a-zA-Z0-9é]{1,8}", "[a-z0-9 ]{0,8}", 0..6),
    ) {
        let forward = EncryptionContext::from_entries(a.clone()).unwrap().serialize();
        let backward = EncryptionContext::from_entries(a.clone().into_iter().rev()).unwrap().serialize();
        prop_assert_eq!(&forward, &backward);
        let other = EncryptionContext::from_entries(b.clone()).unwrap().serialize();
        prop_assert_eq!(forward == other, a == b);
    }

    #[test]
    fn context_validation_never_panics(entries in proptest::collection::vec((".{0,40}", ".{0,40}"), 0..20)) {
        let _ = EncryptionContext::from_entries(entries);
    }

    #[test]
    fn untrusted_config_and_policy_text_never_panics(text in ".{0,400}") {
        let dir = std::env::temp_dir();
        let _ = wrapd::config::Config::parse(&text, &dir);
        let _ = wrapd::auth::Policy::parse(&text);
    }

    /// Any single edit, deletion or swap in an audit chain is reported at the right line.
    #[test]
    fn audit_chain_catches_every_single_change(
        n in 3usize..12,
        target in any::<prop::sample::Index>(),
        change in 0u8..3,
    ) {
        let lines = chain(n);
        let i = target.index(n - 1); // not the last line: a cut end needs --expect-last
        let mut tampered = lines.clone();
        match change {
            0 => tampered[i] = tampered[i].replace("\"outcome\":\"OK\"", "\"outcome\":\"DENIED\""),
            1 => { tampered.remove(i); }
            _ => tampered.swap(i, i + 1),
        }
        let broken = verify(tampered.join("\n").as_bytes(), Some(GENESIS), None).unwrap_err();
        prop_assert_eq!(broken.line, i as u64 + 1);
    }
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(64))]

    /// Encryption SDK messages: any plaintext and frame length round-trip; any changed,
    /// removed or added byte fails, and nothing is returned.
    #[test]
    fn messages_round_trip_and_every_change_fails(
        plaintext in proptest::collection::vec(any::<u8>(), 0..3000),
        frames in 1u32..8,
        index in any::<prop::sample::Index>(),
        xor in 1u8..,
        cut in 1usize..40,
    ) {
        use wrapd::client::message::{self, EncryptedDataKey};
        let dek = [0x24u8; 32];
        let context = EncryptionContext::from_entries([("k".to_owned(), "v".to_owned())]).unwrap();
        let edk = EncryptedDataKey { provider_id: "wrapd".into(), provider_info: b"key/x".to_vec(), ciphertext: vec![1; 20] };
        let sealed = message::encrypt(&plaintext, &dek, &context, vec![edk], frames * 16).unwrap();
        let open = |m: &[u8]| message::decrypt(m, |_| Ok(zeroize::Zeroizing::new(dek.to_vec())));
        let (header, out) = open(&sealed).unwrap();
        prop_assert_eq!(&*out, &plaintext);
        prop_assert_eq!(header.context, context);

        let mut flipped = sealed.clone();
        let i = index.index(flipped.len());
        flipped[i] ^= xor;
        prop_assert!(open(&flipped).is_err(), "flip at {} accepted", i);
        prop_assert!(open(&sealed[..sealed.len().saturating_sub(cut)]).is_err());
        let mut longer = sealed.clone();
        longer.push(xor);
        prop_assert!(open(&longer).is_err());
    }

    /// Streaming over readers that hand out a few bytes at a time, and across batch
    /// boundaries (frames of 16 bytes: a first batch of 4096 frames, then 65,536 a batch):
    /// the stream functions agree with the whole-message ones.
    #[test]
    fn streams_read_in_small_pieces_round_trip(
        len in prop_oneof![0usize..200, 65_000usize..70_000, 1_100_000usize..1_200_000],
        piece in 1usize..5000,
    ) {
        use wrapd::client::message::{self, EncryptedDataKey};
        struct Trickle<'a>(&'a [u8], usize);
        impl std::io::Read for Trickle<'_> {
            fn read(&mut self, buf: &mut [u8]) -> std::io::Result<usize> {
                let n = self.1.min(buf.len()).min(self.0.len());
                buf[..n].copy_from_slice(&self.0[..n]);
                self.0 = &self.0[n..];
                Ok(n)
            }
        }
        let plaintext: Vec<u8> = (0..len).map(|i| (i % 249) as u8).collect();
        let dek = [0x77u8; 32];
        let context = EncryptionContext::from_entries([("k".to_owned(), "v".to_owned())]).unwrap();
        let edk = EncryptedDataKey { provider_id: "wrapd".into(), provider_info: b"key/x".to_vec(), ciphertext: vec![1; 20] };
        let mut sealed = Vec::new();
        let n = message::encrypt_stream(&mut Trickle(&plaintext, piece), &mut sealed, &dek, &context, vec![edk], 16).unwrap();
        prop_assert_eq!(n, len as u64);
        let mut opened = Vec::new();
        message::decrypt_stream(&mut Trickle(&sealed, piece), &mut opened, |_| Ok(zeroize::Zeroizing::new(dek.to_vec()))).unwrap();
        prop_assert!(opened == plaintext);
        let (_, whole) = message::decrypt(&sealed, |_| Ok(zeroize::Zeroizing::new(dek.to_vec()))).unwrap();
        prop_assert!(*whole == plaintext);
    }

    #[test]
    fn message_parsing_never_panics(bytes in proptest::collection::vec(any::<u8>(), 0..400)) {
        let _ = wrapd::client::message::decrypt(&bytes, |_| Ok(zeroize::Zeroizing::new(vec![0; 32])));
    }
}

/// A valid audit chain of `n` records.
fn chain(n: usize) -> Vec<String> {
    let mut prev = GENESIS.to_owned();
    (1..=n as u64)
        .map(|seq| {
            let mut record = AuditRecord {
                seq,
                time: "2026-01-01T00:00:00Z".into(),
                request_id: format!("r{seq}"),
                principal: "unix:uid=0".into(),
                transport: "unix".into(),
                peer: "pid=1".into(),
                operation: "Wrap".into(),
                key_id: None,
                key_version: None,
                context_keys: vec![],
                context_hash: None,
                outcome: "OK".into(),
                error: None,
                latency_us: seq,
                prev: prev.clone(),
                hash: String::new(),
                ..Default::default()
            };
            record.hash = record.compute_hash();
            prev = record.hash.clone();
            serde_json::to_string(&record).unwrap()
        })
        .collect()
}

#[test]
fn a_fresh_chain_verifies() {
    let lines = chain(5);
    let verified = verify(lines.join("\n").as_bytes(), Some(GENESIS), None).unwrap();
    assert_eq!(verified.records, 5);
}
