//! The message format: round trips at frame and batch boundaries, tampering, the official
//! SDK's bytes, and the reader's limits.

use super::*;

/// Decryption refuses more encrypted data keys than allowed (default 10), before any of
/// them reaches a keyring.
#[test]
fn more_encrypted_data_keys_than_allowed_are_refused() {
    let dek = [7u8; 32];
    let eleven = vec![edk(); 11];
    let message = encrypt(b"x", &dek, &ctx(), eleven, 16).unwrap();
    let mut called = false;
    let err = decrypt(&message, |_| {
        called = true;
        Ok(Zeroizing::new(dek.to_vec()))
    })
    .unwrap_err();
    assert!(err.to_string().contains("max_encrypted_data_keys"), "{err}");
    assert!(!called, "no data key was offered to the keyring");
    let mut out = Vec::new();
    let limits = DecryptLimits {
        max_encrypted_data_keys: 11,
    };
    decrypt_stream_with(&mut &message[..], &mut out, limits, |_| {
        Ok(Zeroizing::new(dek.to_vec()))
    })
    .unwrap();
    assert_eq!(out, b"x");
}

fn edk() -> EncryptedDataKey {
    EncryptedDataKey {
        provider_id: PROVIDER_ID.into(),
        provider_info: b"key/00112233445566778899aabbccddeeff".to_vec(),
        ciphertext: vec![7; 106],
    }
}

fn ctx() -> EncryptionContext {
    EncryptionContext::from_entries([("tenant".to_owned(), "acme".to_owned())]).unwrap()
}

#[test]
fn round_trips_at_frame_boundaries() {
    let dek = [9u8; 32];
    for len in [0usize, 1, 15, 16, 17, 32, 100] {
        let plaintext: Vec<u8> = (0..len).map(|i| i as u8).collect();
        let message = encrypt(&plaintext, &dek, &ctx(), vec![edk()], 16).unwrap();
        assert!(encrypt(&plaintext, &dek, &ctx(), vec![edk()], 15).is_err());
        let (header, out) = decrypt(&message, |h| {
            assert_eq!(h.data_keys, vec![edk()]);
            Ok(Zeroizing::new(dek.to_vec()))
        })
        .unwrap();
        assert_eq!(&*out, &plaintext, "len {len}");
        assert_eq!(header.context, ctx());
        assert_eq!(header.frame_length, 16);
    }
}

#[test]
fn many_batches_keep_frame_order() {
    let dek = [5u8; 32];
    let plaintext: Vec<u8> = (0..50_000u32).map(|i| (i % 251) as u8).collect();
    let message = encrypt(&plaintext, &dek, &ctx(), vec![edk()], 16).unwrap();
    let (_, out) = decrypt(&message, |_| Ok(Zeroizing::new(dek.to_vec()))).unwrap();
    assert_eq!(&*out, &plaintext);
    // Swapping two frames in the middle of the body is caught.
    let frame = 4 + 12 + 16 + 16;
    // 50 000 is a multiple of 16: the final frame is empty.
    let final_frame = 4 + 4 + 12 + 4 + 16;
    let body = message.len() - frame * (50_000 / 16) - final_frame;
    let mut swapped = message.clone();
    let (a, b) = (body + 100 * frame, body + 101 * frame);
    let first = swapped[a..a + frame].to_vec();
    swapped.copy_within(b..b + frame, a);
    swapped[b..b + frame].copy_from_slice(&first);
    assert!(decrypt(&swapped, |_| Ok(Zeroizing::new(dek.to_vec()))).is_err());
}

#[test]
fn round_trips_across_batch_boundaries() {
    // Default frames: a first batch of 16 frames (64 KiB), then batches of 256 (1 MiB).
    let dek = [4u8; 32];
    let (first, batch) = (64 * 1024, 1024 * 1024);
    for len in [
        first - 1,
        first,
        first + 1,
        first + batch,
        first + batch + 5,
        first + 3 * batch + 3 * 4096 + 7,
    ] {
        let plaintext: Vec<u8> = (0..len).map(|i| (i % 253) as u8).collect();
        let message = encrypt(&plaintext, &dek, &ctx(), vec![edk()], 4096).unwrap();
        let frames = len / 4096;
        let expected_len = message.len() - frames * (4096 + 32) - (len % 4096 + 40);
        assert_eq!(
            peek_header(&message).unwrap().body().unwrap().len() + 16,
            expected_len
        );
        let (_, out) = decrypt(&message, |_| Ok(Zeroizing::new(dek.to_vec()))).unwrap();
        assert!(*out == plaintext, "len {len}");
        // Cutting the message at any batch boundary is caught.
        for cut in [expected_len + 16 * 4128, message.len() - 1] {
            assert!(decrypt(&message[..cut], |_| Ok(Zeroizing::new(dek.to_vec()))).is_err());
        }
    }
}

#[test]
fn every_bit_flip_and_truncation_fails() {
    let dek = [3u8; 32];
    let message = encrypt(&[0x61; 40], &dek, &ctx(), vec![edk()], 16).unwrap();
    let open = |m: &[u8]| decrypt(m, |_| Ok(Zeroizing::new(dek.to_vec())));
    for i in 0..message.len() {
        let mut bad = message.clone();
        bad[i] ^= 0x01;
        // Flipping a byte inside the EDK ciphertext changes the header: the tag catches it.
        assert!(open(&bad).is_err(), "flip at {i}");
    }
    for len in 0..message.len() {
        assert!(open(&message[..len]).is_err(), "truncated to {len}");
    }
    let mut longer = message.clone();
    longer.push(0);
    assert!(open(&longer).is_err());
}

/// The official SDK's known-answer vectors (tests/vectors, see generate.py there): with
/// the same data key and message id, the bytes written are the SDK's, header and frames.
#[test]
fn writes_the_official_sdks_bytes() {
    let file: serde_json::Value =
        serde_json::from_str(include_str!("../../../tests/vectors/esdk-v2.json")).unwrap();
    let hex = |v: &serde_json::Value| hex::decode(v.as_str().unwrap()).unwrap();
    let mut checked = 0;
    for v in file["vectors"].as_array().unwrap() {
        if v["suite"] != "0478" {
            continue; // signatures are randomized
        }
        let len = v["plaintext_length"].as_u64().unwrap() as usize;
        let plaintext: Vec<u8> = (0..len).map(|i| (i * 31 % 251) as u8).collect();
        let context = EncryptionContext::from_entries(
            v["encryption_context"]
                .as_object()
                .unwrap()
                .iter()
                .map(|(k, v)| (k.clone(), v.as_str().unwrap().to_owned())),
        )
        .unwrap();
        let edk = EncryptedDataKey {
            provider_id: PROVIDER_ID.to_owned(),
            provider_info: v["provider_info"].as_str().unwrap().as_bytes().to_vec(),
            ciphertext: hex(&v["edk"]),
        };
        let expected = hex(&v["message"]);
        let mut out = Vec::new();
        encrypt_stream_with_id(
            &mut &plaintext[..],
            &mut out,
            &hex(&v["dek"]),
            &context,
            vec![edk],
            v["frame_length"].as_u64().unwrap() as u32,
            hex(&v["message_id"]).try_into().unwrap(),
        )
        .unwrap();
        let header_len = Header::read(
            &mut StreamSource {
                inner: &expected[..],
                recorded: None,
                hashed: None,
            },
            10,
        )
        .unwrap()
        .body()
        .unwrap()
        .len()
            + TAG_LEN;
        assert_eq!(
            hex::encode(&out[..header_len]),
            hex::encode(&expected[..header_len]),
            "{}: header",
            v["name"]
        );
        assert!(out == expected, "{}: frames", v["name"]);
        checked += 1;
    }
    assert!(checked >= 3);
}

#[test]
fn a_wrong_key_fails_on_the_commitment() {
    let message = encrypt(b"x", &[1u8; 32], &ctx(), vec![edk()], 16).unwrap();
    let err = decrypt(&message, |_| Ok(Zeroizing::new(vec![2u8; 32]))).unwrap_err();
    assert!(err.to_string().contains("commitment"), "{err}");
}

#[test]
fn a_rewrapped_header_opens_the_same_frames_left_byte_identical() {
    let dek = [7u8; 32];
    let plaintext: Vec<u8> = (0..10_000u32).map(|i| i as u8).collect();
    let message = encrypt(&plaintext, &dek, &ctx(), vec![edk()], 4096).unwrap();
    let stored = StoredHeader::read(&mut &message[..], 10).unwrap();
    let new_key = EncryptedDataKey {
        provider_id: PROVIDER_ID.into(),
        provider_info: b"key/another".to_vec(),
        ciphertext: vec![9; 120],
    };
    let header = stored
        .with_data_keys(&dek, std::slice::from_ref(&new_key))
        .unwrap();
    let mut rewrapped = header.clone();
    rewrapped.extend_from_slice(&message[stored.len()..]);

    let (read, opened) = decrypt(&rewrapped, |h| {
        assert_eq!(h.data_keys, vec![new_key.clone()]);
        Ok(Zeroizing::new(dek.to_vec()))
    })
    .unwrap();
    assert_eq!(&opened[..], &plaintext[..]);
    assert_eq!(read.context, ctx());
    // Everything after the header is the original's, byte for byte.
    let new_stored = StoredHeader::read(&mut &rewrapped[..], 10).unwrap();
    assert_eq!(
        &rewrapped[new_stored.len()..],
        &message[stored.len()..],
        "frames untouched"
    );
}

#[test]
fn a_tampered_header_or_a_wrong_data_key_is_never_authenticated_again() {
    let dek = [7u8; 32];
    let message = encrypt(b"data", &dek, &ctx(), vec![edk()], 4096).unwrap();
    // A wrong data key: refused on the commitment.
    let stored = StoredHeader::read(&mut &message[..], 10).unwrap();
    assert!(stored.with_data_keys(&[8u8; 32], &[edk()]).is_err());
    // A flipped bit in the encryption context's value ("acme" at 49..53, after the
    // fixed fields, the entry count and the key): the old tag no longer verifies.
    let mut tampered = message.clone();
    tampered[49] ^= 1;
    let forged = StoredHeader::read(&mut &tampered[..], 10).unwrap();
    assert_ne!(forged.header.context, ctx());
    let err = forged.with_data_keys(&dek, &[edk()]).unwrap_err();
    assert!(err.to_string().contains("authenticate"), "{err}");
    // No data keys at all: refused.
    assert!(stored.with_data_keys(&dek, &[]).is_err());
}

/// Runs [`seal::pipeline`] over `batches` numbered batches on a pool of `threads`; `work`
/// fails on batch `bad_work` and `write` on batch `bad_write`. What was written, in order,
/// and the outcome.
fn run_pipeline(
    threads: usize,
    batches: u32,
    bad_work: Option<u32>,
    bad_write: Option<u32>,
) -> (Vec<u32>, Result<()>) {
    let pool = rayon::ThreadPoolBuilder::new()
        .num_threads(threads)
        .build()
        .unwrap();
    let mut next = 0u32;
    let mut written = Vec::new();
    let outcome = pool.install(|| {
        seal::pipeline(
            (0u32, false),
            || (0u32, false),
            |batch| {
                *batch = (next, false);
                next += 1;
                Ok(next == batches)
            },
            |batch| {
                if Some(batch.0) == bad_work {
                    return Err(Error::InvalidCiphertext);
                }
                batch.1 = true;
                Ok(())
            },
            |batch| {
                assert!(batch.1, "batch {} written before it was worked", batch.0);
                if Some(batch.0) == bad_write {
                    return Err(Error::invalid("disk full"));
                }
                written.push(batch.0);
                Ok(())
            },
        )
    });
    (written, outcome)
}

#[test]
fn the_pipeline_writes_every_batch_once_in_order_on_one_thread_and_on_several() {
    for threads in [1, 2, 4] {
        for batches in [1, 2, 3, 50] {
            let (written, outcome) = run_pipeline(threads, batches, None, None);
            outcome.unwrap();
            assert_eq!(
                written,
                (0..batches).collect::<Vec<_>>(),
                "{threads} threads"
            );
        }
    }
}

#[test]
fn a_batch_that_fails_to_open_stops_the_pipeline_with_nothing_written_from_it_on() {
    for threads in [1, 2] {
        let (written, outcome) = run_pipeline(threads, 50, Some(20), None);
        assert!(
            matches!(outcome, Err(Error::InvalidCiphertext)),
            "{outcome:?}"
        );
        assert_eq!(written, (0..20).collect::<Vec<_>>(), "{threads} threads");
    }
}

#[test]
fn a_write_error_stops_the_pipeline_and_is_the_error_reported() {
    for threads in [1, 2] {
        let (written, outcome) = run_pipeline(threads, 50, None, Some(7));
        let message = outcome.unwrap_err().to_string();
        assert!(message.contains("disk full"), "{message}");
        assert_eq!(written, (0..7).collect::<Vec<_>>(), "{threads} threads");
    }
}
