//! Key import ("bring your own key"): the key store's side of `GetParametersForImport`,
//! `ImportKeyMaterial`, `DeleteImportedKeyMaterial` and the expiry of imported material.
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

use super::tickets::{Kind, due_keys, unix_seconds};
use super::{
    ImportedMaterial, KeyOrigin, KeyRecord, KeyState, Keystore, MAINTENANCE_LOCK_WAIT,
    MaintenanceLock,
};
use crate::error::{Error, Result};
use crate::hsm::{ImportAlgorithm, KeyCheckValue, ObjectId, Ticket, WrappingKeyId};
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
    ///
    /// Nothing is ever destroyed here. One import at a time in a fleet (the maintenance lock),
    /// and the key is read from the store, not the view (which may not yet show another
    /// daemon's import); the store records the material only over the check value read. An
    /// object the token holds with other material than the store records (another daemon's
    /// import, a restored metadata backup) is live material: refused, never replaced.
    pub fn import_key_material(
        &self,
        key: &KeyRef,
        import_token: &[u8],
        wrapped: &[u8],
        valid_to: Option<SystemTime>,
    ) -> Result<Arc<KeyRecord>> {
        let id = self.resolve(key)?.id.clone();
        let _fleet = MaintenanceLock::wait(&*self.store, MAINTENANCE_LOCK_WAIT)?;
        let _admin = self.admin.lock();
        let key = self
            .store
            .key(&id)?
            .ok_or_else(|| Error::KeyNotFound(id.to_string()))?;
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
        let before = key.material.map(|m| m.check_value);
        if let Some(before) = &before {
            if !same_check_value(before, &check) {
                return Err(Error::IncorrectKeyMaterial(format!(
                    "the key material differs from the material imported into key {} before",
                    key.id
                )));
            }
        }
        // A key with imported material has one version, never rotated: a store listing others
        // (an edit) must not get material placed under a version of its choosing.
        if key.versions.len() != 1 || key.current_version() != 1 {
            return Err(Error::WrongState(format!(
                "the metadata store lists versions other than 1 for key {}, which has imported material (an edited store?): nothing imported",
                key.id
            )));
        }
        let object = ObjectId::new(key.id.clone(), key.current_version());
        // Whether the material was really gone (expired, deleted): only then does an import
        // enable a key, whatever state the store gives it.
        let material_was_absent = !self.token.contains(&object)?;
        self.place_material(&wrapping, wrapped, &object, &check)?;
        // The expiry as a ticket (see `tickets.rs`): the new one before the commit, so that
        // a recorded expiry is always in the token; without expiry, the old ones go first.
        let new_ticket = valid_to.map(|t| Ticket::Expiry {
            key_id: key.id.clone(),
            due: unix_seconds(t),
        });
        match &new_ticket {
            Some(ticket) => self.token.create_ticket(ticket)?,
            None => self.destroy_tickets(&key.id, Some(Kind::Expiry), |_| false)?,
        }
        let state = match key.state {
            KeyState::PendingImport => KeyState::Enabled,
            other => other,
        };
        let material = ImportedMaterial {
            check_value: check,
            present: true,
            valid_to,
        };
        if let Err(err) = self
            .store
            .set_material(&key.id, before.as_ref(), state, &material)
        {
            // Nothing destroyed: the object holds exactly the checked material, and this
            // import, repeated, finds and keeps it.
            if let Some(ticket) = &new_ticket {
                if let Err(cleanup) = self.token.destroy_ticket(ticket) {
                    tracing::warn!(key_id = %key.id, error = %cleanup, "could not remove the expiry ticket of an import that was not recorded");
                }
            }
            return Err(err);
        }
        if let Some(ticket) = &new_ticket {
            // Only the latest expiry counts; older ones go once the new one is recorded.
            if let Err(err) = self.destroy_tickets(&key.id, Some(Kind::Expiry), |t| t == ticket) {
                tracing::warn!(key_id = %key.id, error = %err, "could not remove an older expiry ticket (the latest one counts)");
            }
        }
        if key.state == KeyState::PendingImport && material_was_absent {
            // The key's hold (it was disabled, or its deletion cancelled, before its material
            // went) goes once the import is recorded: an import enables it, as in AWS KMS. A
            // key the store merely calls pending import keeps its hold.
            self.token.destroy_ticket(&Ticket::Hold {
                key_id: key.id.clone(),
            })?;
            self.store
                .set_material(&key.id, Some(&check), state, &material)?;
        }
        self.missing.write().remove(&object);
        tracing::info!(key_id = %key.id, algorithm = wrapping.algorithm.name(), expires = valid_to.is_some(), "key material imported");
        self.refresh(&key.id)?
            .ok_or_else(|| Error::Internal("key vanished after import".into()))
    }

    /// Puts the checked material into the key's token object, unless the token holds it
    /// already (a re-import that changes the expiry, or an import whose commit failed).
    /// Never destroys: an object with other material is refused.
    fn place_material(
        &self,
        wrapping: &WrappingKeyId,
        wrapped: &[u8],
        object: &ObjectId,
        check: &KeyCheckValue,
    ) -> Result<()> {
        if self.token.contains(object)? {
            if same_check_value(&self.token.key_check_value(object)?, check) {
                return Ok(());
            }
            return Err(Error::IncorrectKeyMaterial(format!(
                "the token already holds different key material for {object} that the metadata store does not record (an import on another daemon, or a restored metadata backup); nothing was destroyed. Import the material imported before, or import into a new key"
            )));
        }
        let placed = self.token.import_key(wrapping, wrapped, Some(object))?;
        if !same_check_value(&placed, check) {
            tracing::error!(object = %object, "the material unwrapped twice gave two check values; the object is left for inspection");
            return Err(Error::Internal(
                "the material unwrapped twice gave two check values".into(),
            ));
        }
        Ok(())
    }

    /// Deletes a key's imported material from the token: the key becomes `PENDING_IMPORT`
    /// and its blobs fail until the same material is imported again. Repeating it after a
    /// failure finishes the destruction.
    pub fn delete_imported_material(&self, key: &KeyRef) -> Result<Arc<KeyRecord>> {
        let id = self.resolve(key)?.id.clone();
        let _fleet = MaintenanceLock::wait(&*self.store, MAINTENANCE_LOCK_WAIT)?;
        let _admin = self.admin.lock();
        let key = self
            .store
            .key(&id)?
            .ok_or_else(|| Error::KeyNotFound(id.to_string()))?;
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

    /// Records the material as gone (store first, over the check value read: from then on
    /// no daemon uses it), then destroys its object and its expiry tickets. Caller holds the
    /// admin lock.
    fn withdraw_material(
        &self,
        key: &KeyRecord,
        material: ImportedMaterial,
        state: KeyState,
    ) -> Result<()> {
        // The store's word that this key holds imported material is not enough to destroy
        // it: an imported key has one version, and the token's object must hold the very
        // material the store records (a store writer cannot know a generated key's check
        // value, so cannot pass a generated key off as imported).
        if key.versions.len() != 1 {
            return Err(Error::Internal(format!(
                "key {} is recorded as imported but has {} versions; nothing destroyed",
                key.id,
                key.versions.len()
            )));
        }
        let object = ObjectId::new(key.id.clone(), key.versions[0].version);
        if self.token.contains(&object)?
            && !same_check_value(&self.token.key_check_value(&object)?, &material.check_value)
        {
            return Err(Error::Internal(format!(
                "the token object of {object} does not hold the material the metadata store records; nothing destroyed"
            )));
        }
        let gone = ImportedMaterial {
            present: false,
            valid_to: None,
            ..material
        };
        self.store
            .set_material(&key.id, Some(&material.check_value), state, &gone)?;
        self.refresh(&key.id)?;
        for v in &key.versions {
            self.token
                .destroy_key(&ObjectId::new(key.id.clone(), v.version))?;
        }
        self.destroy_tickets(&key.id, Some(Kind::Expiry), |_| false)?;
        Ok(())
    }

    /// Destroys imported material whose expiry is due by the token's expiry ticket *and*
    /// the store (see `tickets.rs`), each after `before` returns (the audit line; an error
    /// there leaves the key for the next pass; the data plane refuses expired material
    /// meanwhile). Keys become `PENDING_IMPORT` (a key pending deletion stays so). Returns
    /// the keys whose material expired.
    pub fn expire_material(&self, before: impl Fn(&KeyRecord) -> Result<()>) -> Result<Vec<KeyId>> {
        let Some(_maintenance) = MaintenanceLock::take(&*self.store)? else {
            return Ok(Vec::new());
        };
        let now = self.clock.now();
        let seconds = unix_seconds(now);
        let tickets = self.token.tickets()?;
        let mut expired = Vec::new();
        for id in due_keys(&tickets, Kind::Expiry, seconds) {
            let _admin = self.admin.lock();
            let Some(key) = self.store.key(&id)? else {
                continue; // not in this store
            };
            let Some(material) = key
                .material
                .filter(|m| m.present && m.valid_to.is_some_and(|t| t <= now))
            else {
                // The store does not show it expired (re-imported, deleted, or edited): the
                // due ticket is dropped, which only gives up a destruction.
                tracing::warn!(key_id = %id, "an expiry recorded in the token that the metadata store does not show due; nothing destroyed, the record dropped");
                self.destroy_tickets(
                    &id,
                    Some(Kind::Expiry),
                    |t| !matches!(t, Ticket::Expiry { due, .. } if *due <= seconds),
                )?;
                continue;
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
