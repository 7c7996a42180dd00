//! The AWS Encryption SDK message format, version 2, with the committing algorithm suite
//! 0x0478 (`AES_256_GCM_HKDF_SHA512_COMMIT_KEY`): the container the thin client writes and
//! reads around data encrypted locally with a DEK from wrapd.
//!
//! ```text
//! header:  0x02 | suite u16 | message id [32] | context len u16 | context
//!          | EDK count u16 | (provider id, provider info, ciphertext: u16 len + bytes)*
//!          | content type 0x02 (framed) | frame length u32 | commitment key [32]
//!          | header auth tag [16]        (AES-GCM, IV 0, AAD = the header before it)
//! frames:  seq u32 | IV [12] | ciphertext [frame length] | tag [16]
//! final:   0xFFFFFFFF | seq u32 | IV [12] | length u32 | ciphertext | tag [16]
//! ```
//! Keys: `derived = HKDF-SHA512(salt = message id, ikm = DEK, info = suite || "DERIVEKEY")`,
//! `commitment = HKDF-SHA512(salt = message id, ikm = DEK, info = "COMMITKEY")`, both 32 bytes;
//! decryption checks the commitment (constant time) before anything else. Frame IVs are the
//! sequence number, big-endian, left-padded with zeros; frame AAD is
//! `message id || "AWSKMSEncryptionClient Frame" (or "... Final Frame") || seq u32 || len u64`.
//!
//! [`encrypt_stream`] and [`decrypt_stream`] hold one batch of frames in memory at a time
//! (at most 8 MiB of plaintext) and seal or open the frames of a batch in parallel on all
//! cores; the whole-message [`encrypt`] and [`decrypt`] wrap them. Parallel frames, keyrings and
//! `wrapctl encrypt/decrypt` build on this. Messages of the signed suite 0x0578 (the
//! official SDKs' default) are read too: the footer's ECDSA P-384 signature over header and
//! body is checked with the key in the `aws-crypto-public-key` context entry.
//!
//! Here: the constants, the header's type and the key derivations; `header.rs` reads and
//! writes the header, `seal.rs` encrypts, `open.rs` decrypts, `rewrap.rs` replaces a stored
//! message's encrypted data keys without touching its frames.

mod header;
mod open;
mod rewrap;
mod seal;

use header::*;
pub use open::*;
pub use rewrap::*;
pub use seal::*;

use std::io::{Read, Write};

use p384::ecdsa::signature::hazmat::PrehashVerifier;
use p384::ecdsa::{Signature, VerifyingKey};
use rayon::prelude::*;
use ring::aead::{AES_256_GCM, Aad, LessSafeKey, Nonce, Tag, UnboundKey};
use ring::hkdf::{HKDF_SHA512, KeyType, Salt};
use sha2::{Digest, Sha384};
use zeroize::Zeroizing;

use crate::context::EncryptionContext;
use crate::error::{Error, Result};

/// `AES_256_GCM_HKDF_SHA512_COMMIT_KEY`: what the client writes.
pub const SUITE_COMMIT_KEY: u16 = 0x0478;
/// `AES_256_GCM_HKDF_SHA512_COMMIT_KEY_ECDSA_P384`: read (the official SDKs' default).
pub const SUITE_COMMIT_KEY_ECDSA_P384: u16 = 0x0578;
/// The default frame length.
pub const DEFAULT_FRAME_LENGTH: u32 = 4096;
/// Largest frame length read: one frame is held in memory, so a hostile header must not be
/// able to ask for gigabytes.
pub const MAX_READ_FRAME_LENGTH: u32 = 64 * 1024 * 1024;
/// The context key under which signed messages carry their verification key.
pub const PUBLIC_KEY_CONTEXT_KEY: &str = "aws-crypto-public-key";
/// The provider id wrapd's encrypted data keys carry.
pub const PROVIDER_ID: &str = "wrapd";

/// The provider id of the entries the official Encryption SDKs' KMS keyrings write (provider
/// info = the key's ARN); wrapd's AWS KMS API unwraps their blobs.
pub const AWS_KMS_PROVIDER_ID: &str = "aws-kms";

const VERSION: u8 = 0x02;
const CONTENT_FRAMED: u8 = 0x02;
const FINAL_FRAME: u32 = 0xFFFF_FFFF;
const TAG_LEN: usize = 16;
const IV_LEN: usize = 12;
const FRAME_AAD: &[u8] = b"AWSKMSEncryptionClient Frame";
const FINAL_FRAME_AAD: &[u8] = b"AWSKMSEncryptionClient Final Frame";

/// One encrypted data key entry of a header.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct EncryptedDataKey {
    /// Who can decrypt it (`wrapd`).
    pub provider_id: String,
    /// Which key (wrapd: the canonical key id).
    pub provider_info: Vec<u8>,
    /// The wrapped DEK (wrapd: the ciphertext blob).
    pub ciphertext: Vec<u8>,
}

/// A parsed message header.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Header {
    /// The algorithm suite id.
    pub suite: u16,
    /// Random per message.
    pub message_id: [u8; 32],
    /// The encryption context, authenticated by the header tag.
    pub context: EncryptionContext,
    /// One entry per wrapping key.
    pub data_keys: Vec<EncryptedDataKey>,
    /// Plaintext bytes per frame.
    pub frame_length: u32,
    /// The key commitment.
    pub commitment: [u8; 32],
}

fn bad(what: &str) -> Error {
    Error::invalid(format!("not a valid encrypted message: {what}"))
}

struct Len32;

impl KeyType for Len32 {
    fn len(&self) -> usize {
        32
    }
}

fn hkdf(message_id: &[u8; 32], dek: &[u8], info: &[u8]) -> Result<Zeroizing<[u8; 32]>> {
    let mut out = Zeroizing::new([0u8; 32]);
    Salt::new(HKDF_SHA512, message_id)
        .extract(dek)
        .expand(&[info], Len32)
        .and_then(|okm| okm.fill(&mut out[..]))
        .map_err(|_| Error::Internal("HKDF failed".into()))?;
    Ok(out)
}

/// The derived data key and the commitment key of a message.
fn derive(
    suite: u16,
    message_id: &[u8; 32],
    dek: &[u8],
) -> Result<(LessSafeKey, Zeroizing<[u8; 32]>)> {
    if dek.len() != 32 {
        return Err(Error::invalid("the data key must be 32 bytes"));
    }
    let [derived, commitment] = derive_keys_for_tests(suite, message_id, dek)?;
    let key = UnboundKey::new(&AES_256_GCM, &derived[..])
        .map_err(|_| Error::Internal("AES-GCM key".into()))?;
    Ok((LessSafeKey::new(key), commitment))
}

/// The derived data key and the commitment key of a message, in that order, as bytes
/// ([`derive`] keys the cipher with the first). Public only for known-answer tests.
#[doc(hidden)]
pub fn derive_keys_for_tests(
    suite: u16,
    message_id: &[u8; 32],
    dek: &[u8],
) -> Result<[Zeroizing<[u8; 32]>; 2]> {
    let mut info = suite.to_be_bytes().to_vec();
    info.extend_from_slice(b"DERIVEKEY");
    Ok([
        hkdf(message_id, dek, &info)?,
        hkdf(message_id, dek, b"COMMITKEY")?,
    ])
}

fn frame_nonce(seq: u32) -> Nonce {
    Nonce::assume_unique_for_key(frame_iv(seq))
}

fn frame_iv(seq: u32) -> [u8; IV_LEN] {
    let mut iv = [0u8; IV_LEN];
    iv[8..].copy_from_slice(&seq.to_be_bytes());
    iv
}

/// A frame's AAD, on the stack: `message id || label || seq u32 || length u64`.
struct FrameAad {
    bytes: [u8; 32 + FINAL_FRAME_AAD.len() + 12],
    len: usize,
}

impl AsRef<[u8]> for FrameAad {
    fn as_ref(&self) -> &[u8] {
        &self.bytes[..self.len]
    }
}

fn frame_aad(message_id: &[u8; 32], last: bool, seq: u32, len: usize) -> Aad<FrameAad> {
    let label = if last { FINAL_FRAME_AAD } else { FRAME_AAD };
    let mut bytes = [0u8; 32 + FINAL_FRAME_AAD.len() + 12];
    bytes[..32].copy_from_slice(message_id);
    let mut at = 32;
    for part in [
        label,
        &seq.to_be_bytes()[..],
        &(len as u64).to_be_bytes()[..],
    ] {
        bytes[at..at + part.len()].copy_from_slice(part);
        at += part.len();
    }
    Aad::from(FrameAad { bytes, len: at })
}

fn constant_time_eq(a: &[u8], b: &[u8]) -> bool {
    a.len() == b.len() && a.iter().zip(b).fold(0u8, |acc, (x, y)| acc | (x ^ y)) == 0
}

#[cfg(test)]
mod tests;
