//! Known-answer vectors made by the official AWS Encryption SDK (Python), committed in
//! `tests/vectors/esdk-v2.json` (see `tests/vectors/generate.py`): wrapd must parse every
//! header field, derive the same data key and commitment and decrypt the frames. (That it
//! writes the very same bytes given the same data key and message id is a unit test in
//! `src/client/message/`: choosing a message id is deliberately not public.)
//! Then tamper tests: every field of a header, a frame, the final frame and the footer,
//! changed on its own, is refused with the error that names it.

use serde_json::Value;
use wrapd::client::message::{
    self, EncryptedDataKey, Header, PROVIDER_ID, SUITE_COMMIT_KEY, SUITE_COMMIT_KEY_ECDSA_P384,
};
use wrapd::context::EncryptionContext;
use zeroize::Zeroizing;

struct Vector {
    name: String,
    suite: u16,
    frame_length: u32,
    plaintext: Vec<u8>,
    context: EncryptionContext,
    dek: Vec<u8>,
    message_id: [u8; 32],
    edk: EncryptedDataKey,
    derived_key: Vec<u8>,
    commitment: Vec<u8>,
    message: Vec<u8>,
}

fn vectors() -> Vec<Vector> {
    let file: Value = serde_json::from_str(include_str!("../vectors/esdk-v2.json")).unwrap();
    let hex = |v: &Value| hex::decode(v.as_str().unwrap()).unwrap();
    file["vectors"]
        .as_array()
        .unwrap()
        .iter()
        .map(|v| {
            let len = v["plaintext_length"].as_u64().unwrap() as usize;
            Vector {
                name: v["name"].as_str().unwrap().to_owned(),
                suite: u16::from_str_radix(v["suite"].as_str().unwrap(), 16).unwrap(),
                frame_length: v["frame_length"].as_u64().unwrap() as u32,
                plaintext: (0..len).map(|i| (i * 31 % 251) as u8).collect(),
                context: EncryptionContext::from_entries(
                    v["encryption_context"]
                        .as_object()
                        .unwrap()
                        .iter()
                        .map(|(k, v)| (k.clone(), v.as_str().unwrap().to_owned())),
                )
                .unwrap(),
                dek: hex(&v["dek"]),
                message_id: hex(&v["message_id"]).try_into().unwrap(),
                edk: EncryptedDataKey {
                    provider_id: PROVIDER_ID.to_owned(),
                    provider_info: v["provider_info"].as_str().unwrap().as_bytes().to_vec(),
                    ciphertext: hex(&v["edk"]),
                },
                derived_key: hex(&v["derived_key"]),
                commitment: hex(&v["commitment"]),
                message: hex(&v["message"]),
            }
        })
        .collect()
}

fn open(v: &Vector, message: &[u8]) -> wrapd::Result<(Header, Zeroizing<Vec<u8>>)> {
    message::decrypt(message, |_| Ok(Zeroizing::new(v.dek.clone())))
}

#[test]
fn key_derivation_and_commitment_match_the_vectors() {
    for v in vectors() {
        let [derived, commitment] =
            message::derive_keys_for_tests(v.suite, &v.message_id, &v.dek).unwrap();
        assert_eq!(&derived[..], &v.derived_key[..], "{}: derived key", v.name);
        assert_eq!(&commitment[..], &v.commitment[..], "{}: commitment", v.name);
    }
}

#[test]
fn headers_and_frames_of_the_official_sdk_decrypt() {
    let vectors = vectors();
    assert!(vectors.iter().any(|v| v.suite == SUITE_COMMIT_KEY));
    assert!(
        vectors
            .iter()
            .any(|v| v.suite == SUITE_COMMIT_KEY_ECDSA_P384)
    );
    for v in &vectors {
        let peeked = message::peek_header(&v.message).unwrap();
        let (header, plaintext) = open(v, &v.message).unwrap();
        assert_eq!(peeked, header);
        assert_eq!(header.suite, v.suite, "{}", v.name);
        assert_eq!(header.message_id, v.message_id, "{}", v.name);
        assert_eq!(header.context, v.context, "{}", v.name);
        assert_eq!(header.data_keys, vec![v.edk.clone()], "{}", v.name);
        assert_eq!(header.frame_length, v.frame_length, "{}", v.name);
        assert_eq!(&header.commitment[..], &v.commitment[..], "{}", v.name);
        assert!(*plaintext == v.plaintext, "{}: plaintext", v.name);
    }
}

/// Byte ranges of every field of a message, from its layout.
struct Layout {
    fields: Vec<(String, std::ops::Range<usize>)>,
}

struct Cursor {
    fields: Vec<(String, std::ops::Range<usize>)>,
    at: usize,
}

impl Cursor {
    fn field(&mut self, name: &str, len: usize) {
        self.fields.push((name.to_owned(), self.at..self.at + len));
        self.at += len;
    }
}

fn layout(m: &[u8]) -> Layout {
    let mut c = Cursor {
        fields: Vec::new(),
        at: 0,
    };
    let u16_at = |i: usize| usize::from(u16::from_be_bytes([m[i], m[i + 1]]));
    let u32_at = |i: usize| u32::from_be_bytes(m[i..i + 4].try_into().unwrap()) as usize;
    c.field("version", 1);
    c.field("suite", 2);
    let signed = u16_at(1) == usize::from(SUITE_COMMIT_KEY_ECDSA_P384);
    c.field("message id", 32);
    let ctx_len = u16_at(c.at);
    c.field("context length", 2);
    c.field("context", ctx_len);
    let count = u16_at(c.at);
    c.field("data key count", 2);
    for _ in 0..count {
        for name in ["provider id", "provider info", "data key ciphertext"] {
            let len = u16_at(c.at);
            c.field(&format!("{name} length"), 2);
            c.field(name, len);
        }
    }
    c.field("content type", 1);
    let frame = u32_at(c.at);
    c.field("frame length", 4);
    c.field("commitment", 32);
    c.field("header tag", 16);
    loop {
        if u32_at(c.at) == 0xFFFF_FFFF {
            c.field("final marker", 4);
            c.field("final seq", 4);
            c.field("final IV", 12);
            let len = u32_at(c.at);
            c.field("final length", 4);
            c.field("final ciphertext", len);
            c.field("final tag", 16);
            break;
        }
        c.field("frame seq", 4);
        c.field("frame IV", 12);
        c.field("frame ciphertext", frame);
        c.field("frame tag", 16);
    }
    if signed {
        let len = u16_at(c.at);
        c.field("signature length", 2);
        c.field("signature", len);
    }
    assert_eq!(c.at, m.len(), "the layout covers the whole message");
    Layout { fields: c.fields }
}

/// The error a change to each field must produce: one-bit flips in the field's last byte
/// (the low bit, so lengths and counts change by one).
fn expected_error(field: &str, signed: bool) -> &'static [&'static str] {
    match field {
        "version" => &["version 2"],
        // 0x0478 -> 0x0479 / 0x0578 -> 0x0579: neither is read.
        "suite" => &["unsupported algorithm suite"],
        // The message id salts the key derivation.
        "message id" => &["commitment does not match"],
        // One byte more or less of context: the entries no longer parse.
        "context length" => &["malformed encryption context"],
        // Every vector has one data key: 1 -> 0.
        "data key count" => &["no encrypted data keys"],
        "context" if signed => &["public key", "does not authenticate"],
        "context" | "provider id" | "provider info" | "data key ciphertext" => &[
            "header does not authenticate",
            "encryption context",
            "not UTF-8",
        ],
        // The fields after it shift: the header runs out or its content type is wrong.
        "provider id length" | "provider info length" | "data key ciphertext length" => {
            &["truncated", "only framed content"]
        }
        "content type" => &["only framed content"],
        "frame length" => &["header does not authenticate"],
        "commitment" => &["commitment does not match"],
        "header tag" => &["header does not authenticate"],
        "frame seq" | "final seq" | "final marker" => &["frames out of order"],
        "frame IV" | "final IV" => &["unexpected frame IV"],
        "frame ciphertext" | "frame tag" | "final ciphertext" | "final tag" => {
            &["a frame does not authenticate"]
        }
        "final length" => &[
            "truncated",
            "longer than the frame length",
            "does not authenticate",
        ],
        "signature length" => &["truncated", "malformed signature", "trailing bytes"],
        "signature" => &["signature does not verify", "malformed signature"],
        other => panic!("no expectation for {other}"),
    }
}

#[test]
fn every_field_changed_alone_is_refused_with_its_error() {
    for v in vectors() {
        let layout = layout(&v.message);
        let signed = v.suite == SUITE_COMMIT_KEY_ECDSA_P384;
        let mut seen = std::collections::BTreeSet::new();
        for (name, range) in &layout.fields {
            if range.is_empty() {
                continue; // an empty final frame has no ciphertext
            }
            seen.insert(name.clone());
            let mut bad = v.message.clone();
            bad[range.end - 1] ^= 0x01;
            let err = open(&v, &bad)
                .err()
                .unwrap_or_else(|| panic!("{}: a changed {name} was accepted", v.name))
                .to_string();
            let expected = expected_error(name, signed);
            assert!(
                expected.iter().any(|e| err.contains(e)),
                "{}: changing the {name} gave {err:?}, expected one of {expected:?}",
                v.name
            );
        }
        // Truncated anywhere, or with a byte appended: refused too.
        for cut in [1, 16, v.message.len() / 2, v.message.len() - 1] {
            assert!(
                open(&v, &v.message[..cut]).is_err(),
                "{}: cut at {cut}",
                v.name
            );
        }
        let mut longer = v.message.clone();
        longer.push(0);
        assert!(open(&v, &longer).is_err());
        if v.name == "three-frames" {
            for field in [
                "frame seq",
                "frame IV",
                "frame ciphertext",
                "frame tag",
                "final tag",
            ] {
                assert!(seen.contains(field), "{field} not covered");
            }
        }
        if signed {
            assert!(seen.contains("signature"));
        }
    }
}

#[test]
fn swapped_and_dropped_frames_are_refused() {
    let v = vectors()
        .into_iter()
        .find(|v| v.name == "three-frames")
        .unwrap();
    let layout = layout(&v.message);
    let frames: Vec<std::ops::Range<usize>> = layout
        .fields
        .iter()
        .filter(|(n, _)| n == "frame seq")
        .map(|(_, r)| r.start..r.start + 4 + 12 + v.frame_length as usize + 16)
        .collect();
    assert_eq!(frames.len(), 2);
    let (a, b) = (frames[0].clone(), frames[1].clone());
    let mut swapped = v.message[..a.start].to_vec();
    swapped.extend_from_slice(&v.message[b.clone()]);
    swapped.extend_from_slice(&v.message[a.clone()]);
    swapped.extend_from_slice(&v.message[b.end..]);
    assert!(
        open(&v, &swapped)
            .unwrap_err()
            .to_string()
            .contains("out of order")
    );
    let mut dropped = v.message[..a.start].to_vec();
    dropped.extend_from_slice(&v.message[b.clone()]);
    dropped.extend_from_slice(&v.message[b.end..]);
    assert!(
        open(&v, &dropped)
            .unwrap_err()
            .to_string()
            .contains("out of order")
    );
    // The final frame cut off entirely: the message ends after a regular frame.
    assert!(
        open(&v, &v.message[..b.end])
            .unwrap_err()
            .to_string()
            .contains("truncated")
    );
}
