//! Raw AES-256-GCM under a key's versions, for the XKS proxy API: AWS KMS sends the
//! plaintext and AAD, and keeps the IV, ciphertext and tag wrapd answers with. The
//! encryption is the token's, under the key's current version (counted against the
//! version's wrap limit like any wrap, and rotating it there); decryption names the version
//! that encrypted.
//!
//! The same key objects seal wrapd blobs, so the two uses must never be confused: a blob's
//! AAD starts with the blob magic (`WRPD`), and an AAD starting with it is refused here. An
//! XKS caller can therefore neither decrypt a blob's ciphertext (its AAD would have to be
//! the blob's) nor make ciphertext that unwraps as a blob.

use super::*;
use crate::blob::{IV_LEN, MAGIC, TAG_LEN};

/// Largest plaintext encrypted (what the XKS specification requires a proxy to take).
pub const MAX_EXTERNAL_PLAINTEXT: usize = 4300;

/// Largest AAD taken (the specification's 8,192 bytes of caller AAD, with its length
/// prefix and up to 20 bytes of ciphertext metadata with theirs).
pub const MAX_EXTERNAL_AAD: usize = 8192 + 2 + 1 + 20;

/// An encryption's output, as the XKS API returns it.
#[derive(Debug)]
pub struct ExternalSealed {
    /// The key version that encrypted.
    pub version: u32,
    /// The 12-byte GCM IV (drawn from the token, or chosen by the HSM).
    pub iv: [u8; IV_LEN],
    /// The ciphertext (as long as the plaintext).
    pub ciphertext: Vec<u8>,
    /// The 16-byte GCM tag.
    pub tag: [u8; TAG_LEN],
}

fn check_external_aad(aad: &[u8]) -> Result<()> {
    if aad.starts_with(MAGIC) {
        return Err(Error::invalid(
            "the AAD must not start with the wrapd blob magic",
        ));
    }
    if aad.len() > MAX_EXTERNAL_AAD {
        return Err(Error::Unsupported(format!(
            "the AAD is longer than {MAX_EXTERNAL_AAD} bytes"
        )));
    }
    Ok(())
}

impl Keystore {
    /// Encrypts `plaintext` (up to [`MAX_EXTERNAL_PLAINTEXT`] bytes) under the current
    /// version of `key`, with the AAD `aad_for` builds for that version (the XKS API binds
    /// the version, named in the ciphertext metadata, into the AAD).
    pub fn encrypt_external(
        &self,
        key: &KeyId,
        plaintext: &[u8],
        aad_for: &dyn Fn(u32) -> Vec<u8>,
    ) -> Result<ExternalSealed> {
        if plaintext.len() > MAX_EXTERNAL_PLAINTEXT {
            return Err(Error::Unsupported(format!(
                "the plaintext is longer than {MAX_EXTERNAL_PLAINTEXT} bytes"
            )));
        }
        let (record, version) = self.wrapping_version(&KeyRef::Id(key.clone()))?;
        let aad = aad_for(version);
        check_external_aad(&aad)?;
        let sealed =
            self.token
                .encrypt(&ObjectId::new(record.id.clone(), version), plaintext, &aad)?;
        let Some(split) = sealed.ciphertext.len().checked_sub(TAG_LEN) else {
            return Err(Error::Internal("the token returned no GCM tag".into()));
        };
        let mut tag = [0u8; TAG_LEN];
        tag.copy_from_slice(&sealed.ciphertext[split..]);
        let mut ciphertext = sealed.ciphertext;
        ciphertext.truncate(split);
        self.record_use(&record.id, version, true);
        Ok(ExternalSealed {
            version,
            iv: sealed.iv,
            ciphertext,
            tag,
        })
    }

    /// Decrypts what [`Keystore::encrypt_external`] made with `version` of `key`. A version
    /// the key does not have, an IV that is not 12 bytes and a tag mismatch are all
    /// [`Error::InvalidCiphertext`]; a key that is not usable is its state's error.
    pub fn decrypt_external(
        &self,
        key: &KeyId,
        version: u32,
        iv: &[u8],
        ciphertext: &[u8],
        tag: &[u8],
        aad: &[u8],
    ) -> Result<Zeroizing<Vec<u8>>> {
        let plaintext = self.check_external(key, version, iv, ciphertext, tag, aad)?;
        self.record_use(key, version, false);
        Ok(plaintext)
    }

    /// [`Keystore::decrypt_external`] without counting the use: the check of an encryption's
    /// output before it is answered, which is the daemon's, not a caller's.
    pub fn check_external(
        &self,
        key: &KeyId,
        version: u32,
        iv: &[u8],
        ciphertext: &[u8],
        tag: &[u8],
        aad: &[u8],
    ) -> Result<Zeroizing<Vec<u8>>> {
        check_external_aad(aad)?;
        self.check_fresh()?;
        let record = self.resolve(&KeyRef::Id(key.clone()))?;
        self.usable(&record)?;
        let known = record.versions.iter().any(|v| v.version == version);
        if !known || iv.len() != IV_LEN || tag.len() != TAG_LEN {
            return Err(Error::InvalidCiphertext);
        }
        if ciphertext.len() > MAX_EXTERNAL_PLAINTEXT {
            return Err(Error::Unsupported(format!(
                "the ciphertext is longer than {MAX_EXTERNAL_PLAINTEXT} bytes"
            )));
        }
        retirement::check_not_destroyed(&record, version)?;
        let mut sealed = Vec::with_capacity(ciphertext.len() + TAG_LEN);
        sealed.extend_from_slice(ciphertext);
        sealed.extend_from_slice(tag);
        let plaintext =
            self.token
                .decrypt(&ObjectId::new(record.id.clone(), version), iv, &sealed, aad)?;
        // Only once the tag verified: a forgery must not learn which versions are retired.
        if retirement::is_retired(&record, version) {
            return Err(retirement::retired(&record.id, version));
        }
        Ok(plaintext)
    }

    /// The key for the XKS API's metadata answer (resolved like any use, read through the
    /// shared store in a fleet).
    pub fn external_key(&self, key: &KeyId) -> Result<Arc<KeyRecord>> {
        self.check_fresh()?;
        self.resolve(&KeyRef::Id(key.clone()))
    }

    /// Whether `key` may be used now (enabled, material present and unexpired).
    pub fn is_usable(&self, key: &KeyRecord) -> bool {
        self.usable(key).is_ok()
    }
}
