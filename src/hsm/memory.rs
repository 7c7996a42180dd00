//! An in-memory [`Token`] for fast unit tests of the key store and operation rules: AES-256-GCM
//! keys held in process memory (ring), random IVs, the same error contract as the real token
//! (a tag mismatch is [`Error::InvalidCiphertext`], a missing object is unavailable). Never a
//! stand-in for the HSM in integration tests, which run on real SoftHSM tokens.

use std::collections::HashMap;

use parking_lot::Mutex;
use ring::aead::{AES_256_GCM, Aad, LessSafeKey, Nonce, UnboundKey};
use ring::rand::{SecureRandom, SystemRandom};
use zeroize::Zeroizing;

use super::{ObjectId, Sealed, Token};
use crate::blob::{IV_LEN, TAG_LEN};
use crate::error::{Error, Result};

/// Key objects in memory.
pub struct MemoryToken {
    keys: Mutex<HashMap<ObjectId, LessSafeKey>>,
    tickets: Mutex<std::collections::BTreeSet<super::Ticket>>,
    wrap_marks: Mutex<std::collections::BTreeSet<(ObjectId, u64)>>,
    rng: SystemRandom,
}

impl Default for MemoryToken {
    fn default() -> Self {
        Self {
            keys: Mutex::default(),
            tickets: Mutex::default(),
            wrap_marks: Mutex::default(),
            rng: SystemRandom::new(),
        }
    }
}

impl MemoryToken {
    fn key<T>(&self, object: &ObjectId, f: impl FnOnce(&LessSafeKey) -> Result<T>) -> Result<T> {
        let keys = self.keys.lock();
        let key = keys
            .get(object)
            .ok_or_else(|| Error::Unavailable(format!("the token has no object for {object}")))?;
        f(key)
    }

    fn fill(&self, buf: &mut [u8]) -> Result<()> {
        self.rng
            .fill(buf)
            .map_err(|_| Error::Internal("no randomness".into()))
    }
}

impl Token for MemoryToken {
    fn generate_key(&self, object: &ObjectId) -> Result<()> {
        let mut bytes = Zeroizing::new([0u8; 32]);
        self.fill(&mut *bytes)?;
        let key = UnboundKey::new(&AES_256_GCM, &*bytes)
            .map_err(|_| Error::Internal("AES-256 key".into()))?;
        self.keys
            .lock()
            .insert(object.clone(), LessSafeKey::new(key));
        Ok(())
    }

    fn encrypt(&self, object: &ObjectId, plaintext: &[u8], aad: &[u8]) -> Result<Sealed> {
        let mut iv = [0u8; IV_LEN];
        self.fill(&mut iv)?;
        self.key(object, |key| {
            let mut ciphertext = plaintext.to_vec();
            key.seal_in_place_append_tag(
                Nonce::assume_unique_for_key(iv),
                Aad::from(aad),
                &mut ciphertext,
            )
            .map_err(|_| Error::Internal("seal".into()))?;
            Ok(Sealed { iv, ciphertext })
        })
    }

    fn generate_and_encrypt(
        &self,
        object: &ObjectId,
        len: usize,
        aad: &[u8],
    ) -> Result<(Zeroizing<Vec<u8>>, Sealed)> {
        let mut plaintext = Zeroizing::new(vec![0u8; len]);
        self.fill(&mut plaintext)?;
        let sealed = self.encrypt(object, &plaintext, aad)?;
        Ok((plaintext, sealed))
    }

    fn random(&self, len: usize) -> Result<Zeroizing<Vec<u8>>> {
        let mut bytes = Zeroizing::new(vec![0u8; len]);
        self.fill(&mut bytes)?;
        Ok(bytes)
    }

    fn decrypt(
        &self,
        object: &ObjectId,
        iv: &[u8],
        ciphertext: &[u8],
        aad: &[u8],
    ) -> Result<Zeroizing<Vec<u8>>> {
        let iv: [u8; IV_LEN] = iv.try_into().map_err(|_| Error::InvalidCiphertext)?;
        if ciphertext.len() < TAG_LEN {
            return Err(Error::InvalidCiphertext);
        }
        self.key(object, |key| {
            let mut buffer = Zeroizing::new(ciphertext.to_vec());
            let len = key
                .open_in_place(
                    Nonce::assume_unique_for_key(iv),
                    Aad::from(aad),
                    &mut buffer,
                )
                .map_err(|_| Error::InvalidCiphertext)?
                .len();
            buffer.truncate(len);
            Ok(buffer)
        })
    }

    fn contains(&self, object: &ObjectId) -> Result<bool> {
        Ok(self.keys.lock().contains_key(object))
    }

    fn destroy_key(&self, object: &ObjectId) -> Result<()> {
        self.keys.lock().remove(object);
        Ok(())
    }

    fn list_keys(&self) -> Result<Vec<ObjectId>> {
        let mut objects: Vec<ObjectId> = self.keys.lock().keys().cloned().collect();
        objects.sort();
        Ok(objects)
    }

    fn ping(&self) -> Result<()> {
        Ok(())
    }

    // Key import needs RSA inside the token: tested on SoftHSM (tests/it/key_import.rs).
    fn create_wrapping_key(&self, _id: &super::WrappingKeyId) -> Result<Vec<u8>> {
        Err(Error::Unsupported(
            "the in-memory token imports no keys".into(),
        ))
    }

    fn import_key(
        &self,
        _id: &super::WrappingKeyId,
        _wrapped: &[u8],
        _into: Option<&ObjectId>,
    ) -> Result<super::KeyCheckValue> {
        Err(Error::Unsupported(
            "the in-memory token imports no keys".into(),
        ))
    }

    fn key_check_value(&self, _object: &ObjectId) -> Result<super::KeyCheckValue> {
        Err(Error::Unsupported(
            "the in-memory token imports no keys".into(),
        ))
    }

    fn wrapping_keys(&self) -> Result<Vec<super::WrappingKeyId>> {
        Ok(Vec::new())
    }

    fn destroy_wrapping_key(&self, _id: &super::WrappingKeyId) -> Result<()> {
        Ok(())
    }

    fn create_ticket(&self, ticket: &super::Ticket) -> Result<()> {
        self.tickets.lock().insert(ticket.clone());
        Ok(())
    }

    fn tickets(&self) -> Result<Vec<super::Ticket>> {
        Ok(self.tickets.lock().iter().cloned().collect())
    }

    fn has_ticket(&self, ticket: &super::Ticket) -> Result<bool> {
        Ok(self.tickets.lock().contains(ticket))
    }

    fn destroy_ticket(&self, ticket: &super::Ticket) -> Result<()> {
        self.tickets.lock().remove(ticket);
        Ok(())
    }

    fn wrap_marks(&self, object: &ObjectId) -> Result<Vec<u64>> {
        Ok(self
            .wrap_marks
            .lock()
            .iter()
            .filter(|(o, _)| o == object)
            .map(|(_, n)| *n)
            .collect())
    }

    fn record_wrap_mark(&self, object: &ObjectId, reserved: u64) -> Result<()> {
        self.wrap_marks.lock().insert((object.clone(), reserved));
        Ok(())
    }

    fn destroy_wrap_mark(&self, object: &ObjectId, reserved: u64) -> Result<()> {
        self.wrap_marks.lock().remove(&(object.clone(), reserved));
        Ok(())
    }
}
