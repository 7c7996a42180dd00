//! The XKS proxy API's operations: a key's metadata, and raw AES-256-GCM encryption and
//! decryption under its versions for AWS KMS (an external key store's keys). Each is one
//! call like any other: the policy (operations `XksGetKeyMetadata`, `XksEncrypt`,
//! `XksDecrypt`; `require_request` can match the call's request metadata), the key store,
//! one audit line with the request metadata. The wire format (the AAD's construction, the
//! ciphertext metadata, the integrity value) is the front end's.

use super::*;
use crate::keystore::ExternalSealed;

/// What an encryption checked before it answered, when asked: the integrity value the front
/// end computed over the output, then a decryption of that output that gave the plaintext
/// back.
#[derive(Debug)]
pub struct Checked<T> {
    /// The encryption's output.
    pub sealed: ExternalSealed,
    /// What the front end's function computed over it, before it was decrypted again.
    pub integrity: Option<T>,
}

/// The job's check of its key (by id: the XKS API names keys by id only).
fn external_key(gate: &Gate, ks: &Keystore, call: &mut Call, key: &KeyId) -> Result<()> {
    call.key(key.to_string(), None);
    gate.check(call, &target_of(ks, &KeyRef::Id(key.clone())), None)
}

impl Ops {
    /// GetHealthStatus: the key store's probe (a real token call, and a fresh view in a
    /// fleet). Authenticated, audited, and never checked against the policy: the
    /// specification excludes health from authorization.
    pub async fn xks_health(&self, call: Call) -> Result<()> {
        self.run(call, |gate, ks, _| {
            if !gate.audit_healthy() {
                return Err(Error::Unavailable("the audit log cannot be written".into()));
            }
            ks.probe()
        })
        .await
    }

    /// The key, for GetKeyMetadata (its state decides the answer's status).
    pub async fn xks_key_metadata(&self, call: Call, key: KeyId) -> Result<Arc<KeyRecord>> {
        self.run(call, move |gate, ks, call| {
            external_key(gate, ks, call, &key)?;
            ks.external_key(&key)
        })
        .await
    }

    /// Encrypts `plaintext` under the current version of `key`, with the AAD `aad_for`
    /// builds for that version. With `integrity`, the function is applied to the output,
    /// and the output is then decrypted and compared with the plaintext before it is
    /// returned: a value that vouches for the output is only given for an output known to
    /// decrypt.
    pub async fn xks_encrypt<T: Send + 'static>(
        &self,
        call: Call,
        key: KeyId,
        plaintext: Zeroizing<Vec<u8>>,
        aad_for: impl Fn(u32) -> Vec<u8> + Send + 'static,
        integrity: Option<impl FnOnce(&ExternalSealed) -> T + Send + 'static>,
    ) -> Result<Checked<T>> {
        self.run(call, move |gate, ks, call| {
            external_key(gate, ks, call, &key)?;
            let sealed = ks.encrypt_external(&key, &plaintext, &aad_for)?;
            call.key(key.to_string(), Some(sealed.version));
            let Some(integrity) = integrity else {
                return Ok(Checked {
                    sealed,
                    integrity: None,
                });
            };
            let value = integrity(&sealed);
            let decrypted = ks.check_external(
                &key,
                sealed.version,
                &sealed.iv,
                &sealed.ciphertext,
                &sealed.tag,
                &aad_for(sealed.version),
            )?;
            if decrypted.as_slice() != plaintext.as_slice() {
                return Err(Error::Internal(
                    "an encryption did not decrypt to its plaintext".into(),
                ));
            }
            Ok(Checked {
                sealed,
                integrity: Some(value),
            })
        })
        .await
    }

    /// Decrypts what [`Ops::xks_encrypt`] made with `version` of `key`.
    #[allow(clippy::too_many_arguments)]
    pub async fn xks_decrypt(
        &self,
        call: Call,
        key: KeyId,
        version: u32,
        iv: Vec<u8>,
        ciphertext: Vec<u8>,
        tag: Vec<u8>,
        aad: Vec<u8>,
    ) -> Result<Zeroizing<Vec<u8>>> {
        self.run(call, move |gate, ks, call| {
            external_key(gate, ks, call, &key)?;
            call.key(key.to_string(), Some(version));
            ks.decrypt_external(&key, version, &iv, &ciphertext, &tag, &aad)
        })
        .await
    }
}
