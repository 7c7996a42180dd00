//! Key import ("bring your own key", issue 11): the key store's side of
//! `GetParametersForImport`, `ImportKeyMaterial`, `DeleteImportedKeyMaterial` and the expiry
//! of imported material.
//!
//! The material is unwrapped inside the token ([`Token::import_key`]): wrapd's memory never
//! holds it in clear. An import first unwraps into a session object to learn the material's
//! key check value, compares it (in constant time) with the check value of the material the
//! key had before, if any, and only then unwraps again into the key's token object; so a key's
//! material never changes, and refused material leaves nothing in the token.
//!
//! The import token is the wrapping key's own name ([`WrappingKeyId`]): the token is valid
//! while the token holds that object, which the maintenance task destroys 24 hours after it
//! was made. Imported keys have one version and are never rotated (see
//! `refuse_imported_rotation`).

use std::sync::Arc;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use super::{ImportedMaterial, KeyOrigin, KeyRecord, KeyState, Keystore, MaintenanceLock};
use crate::error::{Error, Result};
use crate::hsm::{ImportAlgorithm, KeyCheckValue, ObjectId, WrappingKeyId};
use crate::ids::{KeyId, KeyRef};

/// How long an import token (and its wrapping key) lives, as in AWS KMS.
pub const IMPORT_TOKEN_LIFETIME: Duration = Duration::from_secs(24 * 3600);

/// The RSA sizes a wrapping key may have.
pub const WRAPPING_KEY_BITS: [u32; 2] = [3072, 4096];

/// Most unexpired import tokens (each a private key in the token for 24 hours) one key may
/// have at once: a loop of GetParametersForImport cannot fill the token.
pub const MAX_IMPORT_TOKENS_PER_KEY: usize = 10;

/// Largest wrapped material accepted, in bytes (AWS KMS's bound on `EncryptedKeyMaterial`).
pub const MAX_WRAPPED_MATERIAL_LEN: usize = 6144;

/// What `GetParametersForImport` returns.
#[derive(Debug, Clone)]
pub struct ImportParameters {
    /// The key the parameters are for.
    pub key_id: KeyId,
    /// The import token to pass back to `ImportKeyMaterial`.
    pub import_token: Vec<u8>,
    /// The wrapping public key, DER `SubjectPublicKeyInfo`.
    pub public_key: Vec<u8>,
    /// When the token and the public key expire.
    pub valid_to: SystemTime,
}

fn unix_seconds(t: SystemTime) -> u64 {
    t.duration_since(UNIX_EPOCH).map_or(0, |d| d.as_secs())
}

fn same_check_value(a: &KeyCheckValue, b: &KeyCheckValue) -> bool {
    // Constant time: the check value is a function of the key.
    a.iter().zip(b).fold(0u8, |acc, (x, y)| acc | (x ^ y)) == 0
}

/// Only `EXTERNAL` keys take imported material.
fn require_external(key: &KeyRecord) -> Result<()> {
    if key.origin != KeyOrigin::External {
        return Err(Error::Unsupported(format!(
            "key {} was generated in the HSM; only keys created with origin EXTERNAL take imported material",
            key.id
        )));
    }
    if key.state == KeyState::PendingDeletion {
        return Err(Error::WrongState(format!(
            "key {} is pending deletion",
            key.id
        )));
    }
    Ok(())
}

impl Keystore {
    /// Makes an RSA wrapping key (`bits`: 3072 or 4096) for importing material into `key`
    /// with `algorithm`, and an import token for it, both valid for 24 hours.
    pub fn import_parameters(
        &self,
        key: &KeyRef,
        algorithm: ImportAlgorithm,
        bits: u32,
    ) -> Result<ImportParameters> {
        if !WRAPPING_KEY_BITS.contains(&bits) {
            return Err(Error::invalid(
                "the wrapping key spec must be RSA_3072 or RSA_4096",
            ));
        }
        let key = self.resolve(key)?;
        require_external(&key)?;
        // Counted and made one at a time, so that requests at once cannot pass the cap.
        let _one_at_a_time = self.import_parameters.lock();
        let now = unix_seconds(self.clock.now());
        let outstanding = self
            .token
            .wrapping_keys()?
            .iter()
            .filter(|w| w.key_id == key.id && w.expires > now)
            .count();
        if outstanding >= MAX_IMPORT_TOKENS_PER_KEY {
            return Err(Error::LimitReached(format!(
                "key {} has {MAX_IMPORT_TOKENS_PER_KEY} unexpired import tokens, the most it may have; import with one of them, or wait for the oldest to expire (24 hours after it was made)",
                key.id
            )));
        }
        let valid_to = self.clock.now() + IMPORT_TOKEN_LIFETIME;
        let nonce = self.token.random(16)?;
        let id = WrappingKeyId {
            key_id: key.id.clone(),
            algorithm,
            bits,
            expires: unix_seconds(valid_to),
            nonce: nonce
                .as_slice()
                .try_into()
                .map_err(|_| Error::Internal("C_GenerateRandom returned a short buffer".into()))?,
        };
        let public_key = self.token.create_wrapping_key(&id)?;
        tracing::info!(key_id = %key.id, algorithm = algorithm.name(), bits, "wrapping key for an import created");
        Ok(ImportParameters {
            key_id: key.id.clone(),
            import_token: id.to_bytes(),
            public_key,
            valid_to: UNIX_EPOCH + Duration::from_secs(id.expires),
        })
    }

    /// Imports key material wrapped for the wrapping key of `import_token` into `key`, to
    /// expire at `valid_to` (`None`: never). The first import fixes the key's material; a
    /// later one (after expiry or deletion, or to change the expiry) must bring the same.
    /// A key pending import becomes enabled.
    pub fn import_key_material(
        &self,
        key: &KeyRef,
        import_token: &[u8],
        wrapped: &[u8],
        valid_to: Option<SystemTime>,
    ) -> Result<Arc<KeyRecord>> {
        let _admin = self.admin.lock();
        let key = self.resolve(key)?;
        require_external(&key)?;
        let now = self.clock.now();
        let wrapping = WrappingKeyId::parse(import_token)
            .ok_or_else(|| Error::InvalidImportToken("the import token is malformed".into()))?;
        if wrapping.key_id != key.id {
            return Err(Error::InvalidImportToken(format!(
                "the import token was issued for another key, not {}",
                key.id
            )));
        }
        if wrapping.expires <= unix_seconds(now) {
            return Err(Error::ExpiredImportToken(format!(
                "the import token for key {} has expired; call GetParametersForImport again",
                key.id
            )));
        }
        if valid_to.is_some_and(|t| t <= now) {
            return Err(Error::invalid("valid_to must be in the future"));
        }
        if wrapped.is_empty() || wrapped.len() > MAX_WRAPPED_MATERIAL_LEN {
            return Err(Error::invalid(format!(
                "the encrypted key material must be 1 to {MAX_WRAPPED_MATERIAL_LEN} bytes"
            )));
        }
        // A check first, into a session object: nothing in the token changes unless the
        // material is right.
        let check = self.token.import_key(&wrapping, wrapped, None)?;
        if let Some(before) = key.material {
            if !same_check_value(&before.check_value, &check) {
                return Err(Error::IncorrectKeyMaterial(format!(
                    "the key material differs from the material imported into key {} before",
                    key.id
                )));
            }
        }
        let object = ObjectId::new(key.id.clone(), key.current_version());
        let created = self.place_material(&key, &wrapping, wrapped, &object, &check)?;
        let state = match key.state {
            KeyState::PendingImport => KeyState::Enabled,
            other => other,
        };
        let material = ImportedMaterial {
            check_value: check,
            present: true,
            valid_to,
        };
        if let Err(err) = self.store.set_material(&key.id, state, &material) {
            if created {
                if let Err(cleanup) = self.token.destroy_key(&object) {
                    tracing::warn!(object = %object, error = %cleanup, "could not destroy imported material that failed to commit");
                }
            }
            return Err(err);
        }
        self.missing.write().remove(&object);
        tracing::info!(key_id = %key.id, algorithm = wrapping.algorithm.name(), expires = valid_to.is_some(), "key material imported");
        self.refresh(&key.id)?
            .ok_or_else(|| Error::Internal("key vanished after import".into()))
    }

    /// Puts the checked material into the key's token object, unless the token holds it
    /// already (a re-import that changes the expiry, or an import whose commit crashed).
    /// Returns whether an object was created.
    fn place_material(
        &self,
        key: &KeyRecord,
        wrapping: &WrappingKeyId,
        wrapped: &[u8],
        object: &ObjectId,
        check: &KeyCheckValue,
    ) -> Result<bool> {
        if self.token.contains(object)? {
            let existing = self.token.key_check_value(object)?;
            if same_check_value(&existing, check) {
                return Ok(false);
            }
            if key.material.is_some() {
                // The metadata says this object holds the key's material, yet it differs.
                return Err(Error::Internal(format!(
                    "the token object of {object} does not hold the key's recorded material"
                )));
            }
            // Left by a first import that crashed before its commit: no blob was ever made
            // with it (the key never left PENDING_IMPORT), so it may go.
            tracing::warn!(object = %object, "replacing the material of an import that never committed");
            self.token.destroy_key(object)?;
        }
        let placed = self.token.import_key(wrapping, wrapped, Some(object))?;
        if !same_check_value(&placed, check) {
            self.token.destroy_key(object)?;
            return Err(Error::Internal(
                "the material unwrapped twice gave two check values".into(),
            ));
        }
        Ok(true)
    }

    /// Deletes a key's imported material from the token: the key becomes `PENDING_IMPORT`
    /// and its blobs fail until the same material is imported again. Repeating it after a
    /// failure finishes the destruction.
    pub fn delete_imported_material(&self, key: &KeyRef) -> Result<Arc<KeyRecord>> {
        let _admin = self.admin.lock();
        let key = self.resolve(key)?;
        require_external(&key)?;
        let Some(material) = key.material else {
            return Err(Error::WrongState(format!(
                "key {} has no imported key material",
                key.id
            )));
        };
        self.withdraw_material(&key, material, KeyState::PendingImport)?;
        tracing::warn!(key_id = %key.id, "imported key material deleted");
        self.refresh(&key.id)?
            .ok_or_else(|| Error::Internal("key vanished".into()))
    }

    /// Records the material as gone (store first: from then on no daemon uses it), then
    /// destroys its object. Caller holds the admin lock.
    fn withdraw_material(
        &self,
        key: &KeyRecord,
        material: ImportedMaterial,
        state: KeyState,
    ) -> Result<()> {
        let gone = ImportedMaterial {
            present: false,
            valid_to: None,
            ..material
        };
        self.store.set_material(&key.id, state, &gone)?;
        self.refresh(&key.id)?;
        for v in &key.versions {
            self.token
                .destroy_key(&ObjectId::new(key.id.clone(), v.version))?;
        }
        Ok(())
    }

    /// Destroys imported material whose `valid_to` has passed, each after `before` returns
    /// (the audit line; an error there leaves the key for the next pass; the data plane
    /// refuses expired material meanwhile). Keys become `PENDING_IMPORT` (a key pending
    /// deletion stays so). Returns the keys whose material expired.
    pub fn expire_material(&self, before: impl Fn(&KeyRecord) -> Result<()>) -> Result<Vec<KeyId>> {
        let Some(_maintenance) = MaintenanceLock::take(&*self.store)? else {
            return Ok(Vec::new());
        };
        let now = self.clock.now();
        let due: Vec<KeyId> = self
            .read_view()
            .keys
            .values()
            .filter(|k| {
                k.material
                    .is_some_and(|m| m.present && m.valid_to.is_some_and(|t| t <= now))
            })
            .map(|k| k.id.clone())
            .collect();
        let mut expired = Vec::new();
        for id in due {
            let _admin = self.admin.lock();
            let Some(key) = self.store.key(&id)? else {
                continue;
            };
            let Some(material) = key
                .material
                .filter(|m| m.present && m.valid_to.is_some_and(|t| t <= now))
            else {
                continue; // re-imported with a later expiry meanwhile
            };
            before(&key)?;
            let state = match key.state {
                KeyState::PendingDeletion => KeyState::PendingDeletion,
                _ => KeyState::PendingImport,
            };
            self.withdraw_material(&key, material, state)?;
            tracing::warn!(key_id = %id, "imported key material expired and was destroyed");
            expired.push(id);
        }
        Ok(expired)
    }

    /// Destroys the wrapping keys whose import tokens have expired. Returns how many.
    pub fn purge_wrapping_keys(&self) -> Result<usize> {
        let now = unix_seconds(self.clock.now());
        let mut purged = 0;
        for id in self.token.wrapping_keys()? {
            if id.expires <= now {
                self.token.destroy_wrapping_key(&id)?;
                purged += 1;
            }
        }
        Ok(purged)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn check_values_compare_equal_only_when_every_byte_is() {
        let a = [7u8; 16];
        let mut b = a;
        assert!(same_check_value(&a, &b));
        b[15] ^= 1;
        assert!(!same_check_value(&a, &b));
    }

    #[test]
    fn import_tokens_round_trip_and_refuse_other_text() {
        let id = WrappingKeyId {
            key_id: KeyId::generate(),
            algorithm: ImportAlgorithm::RsaAesKeyWrapSha256,
            bits: 4096,
            expires: 1_900_000_000,
            nonce: [0xab; 16],
        };
        assert_eq!(WrappingKeyId::parse(&id.to_bytes()), Some(id.clone()));
        for bad in [
            &b"import:key/00:RSAES_OAEP_SHA_1:3072:1:00"[..],
            b"",
            b"\xff\xfe",
            b"import:key/00112233445566778899aabbccddeeff:RSAES_PKCS1_V1_5:3072:1:abababababababababababababababab",
        ] {
            assert_eq!(WrappingKeyId::parse(bad), None);
        }
    }
}
