//! The Encryption SDK message reader: whole messages from files and stdin.
//!
//! Input starting with 0: the rest is a message as is (key 0x42..). Otherwise the input
//! drives a valid message (frame length, plaintext) and then changes to it (position, xor
//! pairs), so the fuzzer reaches the frame and batch code behind the key commitment: the
//! unchanged message must decrypt to its plaintext, and no change may panic.
#![no_main]

use libfuzzer_sys::fuzz_target;
use wrapd::client::message::{self, EncryptedDataKey};
use wrapd::context::EncryptionContext;
use zeroize::Zeroizing;

const DEK: [u8; 32] = [0x42; 32];

fuzz_target!(|data: &[u8]| {
    let open = |m: &[u8]| message::decrypt(m, |_| Ok(Zeroizing::new(DEK.to_vec())));
    let Some((&mode, rest)) = data.split_first() else {
        return;
    };
    if mode == 0 {
        let _ = open(rest);
        return;
    }
    let Some((&frames, rest)) = rest.split_first() else {
        return;
    };
    let frame_length = 16 * (u32::from(frames % 8) + 1);
    let (plaintext, edits) = rest.split_at(rest.len() / 2);
    let context = EncryptionContext::from_entries([("k".to_owned(), "v".to_owned())]).unwrap();
    let edk = EncryptedDataKey {
        provider_id: "wrapd".into(),
        provider_info: b"key/fuzz".to_vec(),
        ciphertext: vec![1; 8],
    };
    let sealed = message::encrypt(plaintext, &DEK, &context, vec![edk], frame_length).unwrap();
    let (_, out) = open(&sealed).unwrap();
    assert_eq!(&out[..], plaintext);
    let mut changed = sealed.clone();
    for pair in edits.chunks_exact(3) {
        let at = usize::from(u16::from_be_bytes([pair[0], pair[1]])) % changed.len();
        changed[at] ^= pair[2];
    }
    let cut = edits.first().map_or(0, |b| usize::from(*b));
    let result = open(&changed[..changed.len().saturating_sub(cut % 4)]);
    if changed != sealed || cut % 4 != 0 {
        assert!(result.is_err(), "a changed message decrypted");
    }
});
