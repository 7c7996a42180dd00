//! The ciphertext blob: a self-describing, versioned wrapped data key.
//!
//! ```text
//! header (authenticated as AAD, followed by the canonical encryption context):
//!   4  magic "WRPD"
//!   1  format version (1)
//!   1  key id length n
//!   n  key id (`key/<32 hex>`)
//!   4  key version, big-endian, >= 1
//! body:
//!   12 IV (random, or written by the HSM on CloudHSM)
//!   .. ciphertext || 16-byte GCM tag
//! ```
//! The IV is not part of the AAD because CloudHSM chooses it during `C_Encrypt`, after the
//! AAD is fixed; GCM authenticates it anyway. A 64-byte DEK makes a 138-byte blob, well under
//! the 1 KiB Kubernetes allows.

use crate::error::{Error, Result};
use crate::ids::KeyId;

/// Leading bytes of every blob.
pub const MAGIC: &[u8; 4] = b"WRPD";
/// The only format version so far.
pub const FORMAT_VERSION: u8 = 1;
/// GCM IV length in bytes.
pub const IV_LEN: usize = 12;
/// GCM tag length in bytes.
pub const TAG_LEN: usize = 16;
/// Largest plaintext wrapd wraps, so the largest blob is bounded too.
pub const MAX_PLAINTEXT_LEN: usize = 4096;

/// A parsed blob. Parsing checks the framing only; authenticity is the HSM's GCM check.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Blob {
    /// The key the blob is wrapped under.
    pub key_id: KeyId,
    /// The version of that key.
    pub key_version: u32,
    /// The GCM IV.
    pub iv: [u8; IV_LEN],
    /// Ciphertext followed by the tag.
    pub ciphertext: Vec<u8>,
}

impl Blob {
    /// The authenticated header: everything before the IV.
    pub fn header(key_id: &KeyId, key_version: u32) -> Vec<u8> {
        let id = key_id.as_str().as_bytes();
        let mut out = Vec::with_capacity(10 + id.len());
        out.extend_from_slice(MAGIC);
        out.push(FORMAT_VERSION);
        // Key ids are 36 bytes by construction (see `KeyId::parse`).
        out.push(id.len() as u8);
        out.extend_from_slice(id);
        out.extend_from_slice(&key_version.to_be_bytes());
        out
    }

    /// The AAD for GCM: header || canonical encryption context.
    pub fn aad(key_id: &KeyId, key_version: u32, context: &[u8]) -> Vec<u8> {
        let mut aad = Self::header(key_id, key_version);
        aad.extend_from_slice(context);
        aad
    }

    /// Serializes the blob.
    pub fn encode(&self) -> Vec<u8> {
        let mut out = Self::header(&self.key_id, self.key_version);
        out.extend_from_slice(&self.iv);
        out.extend_from_slice(&self.ciphertext);
        out
    }

    /// Parses untrusted bytes. Every failure is [`Error::InvalidCiphertext`], so the reason
    /// is no oracle.
    ///
    /// ```
    /// use wrapd::blob::Blob;
    /// use wrapd::ids::KeyId;
    ///
    /// let blob = Blob {
    ///     key_id: KeyId::generate(),
    ///     key_version: 3,
    ///     iv: [7; 12],
    ///     ciphertext: vec![0; 32 + 16],
    /// };
    /// let bytes = blob.encode();
    /// assert_eq!(Blob::parse(&bytes)?, blob);
    /// assert!(Blob::parse(&bytes[..bytes.len() - 40]).is_err());
    /// # Ok::<(), wrapd::Error>(())
    /// ```
    pub fn parse(bytes: &[u8]) -> Result<Self> {
        Self::parse_inner(bytes).ok_or(Error::InvalidCiphertext)
    }

    fn parse_inner(bytes: &[u8]) -> Option<Self> {
        let rest = bytes.strip_prefix(MAGIC)?;
        let (&version, rest) = rest.split_first()?;
        if version != FORMAT_VERSION {
            return None;
        }
        let (&id_len, rest) = rest.split_first()?;
        let (id, rest) = rest.split_at_checked(usize::from(id_len))?;
        let key_id = KeyId::parse(std::str::from_utf8(id).ok()?).ok()?;
        let (key_version, rest) = rest.split_first_chunk::<4>()?;
        let key_version = u32::from_be_bytes(*key_version);
        if key_version == 0 {
            return None;
        }
        let (iv, ciphertext) = rest.split_first_chunk::<IV_LEN>()?;
        if ciphertext.len() <= TAG_LEN || ciphertext.len() > MAX_PLAINTEXT_LEN + TAG_LEN {
            return None;
        }
        Some(Self {
            key_id,
            key_version,
            iv: *iv,
            ciphertext: ciphertext.to_vec(),
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn sample() -> Blob {
        Blob {
            key_id: KeyId::parse("key/00112233445566778899aabbccddeeff").unwrap(),
            key_version: 7,
            iv: [9; IV_LEN],
            ciphertext: vec![0xab; 32 + TAG_LEN],
        }
    }

    #[test]
    fn known_layout() {
        let bytes = sample().encode();
        assert_eq!(&bytes[..4], b"WRPD");
        assert_eq!(bytes[4], 1);
        assert_eq!(bytes[5], 36);
        assert_eq!(&bytes[6..42], b"key/00112233445566778899aabbccddeeff");
        assert_eq!(&bytes[42..46], &[0, 0, 0, 7]);
        assert_eq!(&bytes[46..58], &[9; 12]);
        assert_eq!(bytes.len(), 58 + 48);
        // A 64-byte DEK stays far below the 1 KiB Kubernetes limit.
        const { assert!(58 + 64 + TAG_LEN < 1024) };
    }

    #[test]
    fn round_trip() {
        let blob = sample();
        assert_eq!(Blob::parse(&blob.encode()).unwrap(), blob);
    }

    #[test]
    fn every_truncation_fails() {
        let bytes = sample().encode();
        for len in 0..bytes.len() - 32 {
            assert!(Blob::parse(&bytes[..len]).is_err(), "len {len}");
        }
    }

    #[test]
    fn framing_mutations_fail() {
        let good = sample().encode();
        // magic, version, id length, an id byte, version zero
        for (i, v) in [(0, b'X'), (4, 2), (5, 35), (10, b'Z'), (45, 0)] {
            let mut bad = good.clone();
            bad[i] = v;
            if i == 45 {
                bad[42..46].copy_from_slice(&[0, 0, 0, 0]);
            }
            assert!(
                matches!(Blob::parse(&bad), Err(Error::InvalidCiphertext)),
                "{i}"
            );
        }
        let mut too_long = good.clone();
        too_long.extend(std::iter::repeat_n(0, MAX_PLAINTEXT_LEN));
        assert!(Blob::parse(&too_long).is_err());
    }
}
