//! The data plane: generating, wrapping, unwrapping and re-wrapping data keys, and the wrap
//! counts that keep each version under its random-IV bound (blocks reserved in the store,
//! marks recorded in the token ahead of use).

use super::*;

impl Keystore {
    /// Generates a data key of `len` bytes (0 means 32) in the token and wraps it.
    pub fn generate_data_key(
        &self,
        key: &KeyRef,
        len: u32,
        context: &EncryptionContext,
    ) -> Result<GeneratedKey> {
        let len = match len {
            0 => DEFAULT_DATA_KEY_LEN,
            n if n <= MAX_DATA_KEY_LEN => n,
            _ => {
                return Err(Error::invalid(format!(
                    "number_of_bytes must be between 1 and {MAX_DATA_KEY_LEN}"
                )));
            }
        };
        let (key, version) = self.wrapping_version(key)?;
        let aad = Blob::aad(&key.id, version, &context.serialize());
        let (plaintext, sealed) = self.token.generate_and_encrypt(
            &ObjectId::new(key.id.clone(), version),
            len as usize,
            &aad,
        )?;
        let blob = Blob {
            key_id: key.id.clone(),
            key_version: version,
            iv: sealed.iv,
            ciphertext: sealed.ciphertext,
        };
        self.record_use(&key.id, version, true);
        Ok(GeneratedKey {
            plaintext,
            wrapped: Wrapped {
                blob: blob.encode(),
                key_id: key.id.clone(),
                key_version: version,
            },
        })
    }

    /// [`Keystore::wrap`] without counting the use: the daemon's own health round trips.
    pub fn wrap_uncounted(
        &self,
        key: &KeyRef,
        plaintext: &[u8],
        context: &EncryptionContext,
    ) -> Result<Wrapped> {
        let (key, version) = self.wrapping_version(key)?;
        self.seal_uncounted(&key.id, version, plaintext, context)
    }

    /// Wraps caller-supplied plaintext (1..=4096 bytes).
    pub fn wrap(
        &self,
        key: &KeyRef,
        plaintext: &[u8],
        context: &EncryptionContext,
    ) -> Result<Wrapped> {
        if plaintext.is_empty() || plaintext.len() > MAX_PLAINTEXT_LEN {
            return Err(Error::invalid(format!(
                "plaintext must be 1 to {MAX_PLAINTEXT_LEN} bytes"
            )));
        }
        let (key, version) = self.wrapping_version(key)?;
        self.seal(&key.id, version, plaintext, context)
    }

    pub(super) fn seal(
        &self,
        key_id: &KeyId,
        version: u32,
        plaintext: &[u8],
        context: &EncryptionContext,
    ) -> Result<Wrapped> {
        let wrapped = self.seal_uncounted(key_id, version, plaintext, context)?;
        self.record_use(key_id, version, true);
        Ok(wrapped)
    }

    /// [`Keystore::seal`] without counting the use (the health probe's).
    pub(super) fn seal_uncounted(
        &self,
        key_id: &KeyId,
        version: u32,
        plaintext: &[u8],
        context: &EncryptionContext,
    ) -> Result<Wrapped> {
        let aad = Blob::aad(key_id, version, &context.serialize());
        let sealed =
            self.token
                .encrypt(&ObjectId::new(key_id.clone(), version), plaintext, &aad)?;
        let blob = Blob {
            key_id: key_id.clone(),
            key_version: version,
            iv: sealed.iv,
            ciphertext: sealed.ciphertext,
        };
        Ok(Wrapped {
            blob: blob.encode(),
            key_id: key_id.clone(),
            key_version: version,
        })
    }

    /// Resolves a key for a new wrap, counts the wrap against its newest version and rotates
    /// the key first when that version has reached its wrap limit.
    pub(super) fn wrapping_version(&self, key: &KeyRef) -> Result<(Arc<KeyRecord>, u32)> {
        self.check_fresh()?;
        for _ in 0..3 {
            let record = self.resolve(key)?;
            self.usable(&record)?;
            let version = record.current_version();
            if retirement::is_retired(&record, version) {
                // Only an edited store makes the current version a retired one.
                return Err(retirement::retired(&record.id, version));
            }
            if self.count_wrap(&record, version)? {
                return Ok((record, version));
            }
            if record.origin == KeyOrigin::External {
                return Err(Error::LimitReached(format!(
                    "key {} has made as many wraps as one key version may; its material is imported, so it cannot rotate: import into a new key",
                    record.id
                )));
            }
            let _admin = self.admin.lock();
            // Another caller may have rotated while we waited for the lock.
            let current = self.resolve(&KeyRef::Id(record.id.clone()))?;
            if current.current_version() == version {
                tracing::info!(key_id = %record.id, version, "wrap limit reached: rotating automatically");
                self.add_version(&current, true)?;
            }
        }
        Err(Error::Unavailable("the key is being rotated; retry".into()))
    }

    /// Counts one wrap with `version`; false when the version has reached its limit.
    pub(super) fn count_wrap(&self, key: &KeyRecord, version: u32) -> Result<bool> {
        let object = ObjectId::new(key.id.clone(), version);
        let mut counters = self.counters.lock();
        let counter = counters.entry(object).or_insert_with(|| {
            // After a restart, count from the persisted reservation: it may over-count the
            // wraps done before, never under-count them.
            let reserved = key
                .versions
                .iter()
                .find(|v| v.version == version)
                .map_or(0, |v| v.wraps_reserved);
            WrapCounter {
                used: reserved,
                reserved,
                mark: None,
            }
        });
        if counter.used >= self.config.max_wraps_per_version {
            return Ok(false);
        }
        if counter.used >= counter.reserved {
            // A block of its own: in a fleet, the other daemons' blocks lie elsewhere.
            let total = self.claim_wrap_block(&object_of(key, version), counter)?;
            counter.used = total.saturating_sub(WRAP_RESERVATION_BLOCK);
            counter.reserved = total;
            if counter.used >= self.config.max_wraps_per_version {
                return Ok(false);
            }
        }
        counter.used += 1;
        Ok(true)
    }

    /// Claims the next block of [`WRAP_RESERVATION_BLOCK`] wraps of a key version; returns
    /// the count the block ends at. The store's count is checked against the highest count
    /// recorded in the token (a wrap mark) and against this process's own last block: a
    /// store rolled back to fewer wraps (an edit, a restored backup) is moved past both
    /// before any wrap is made, so the random-IV bound per version holds whatever the store
    /// says. Marks are recorded ahead of use, [`WRAP_MARK_AHEAD`] at a time, so the token is
    /// asked (and written, under its exclusive lock) once per many blocks, not per block.
    pub(super) fn claim_wrap_block(
        &self,
        object: &ObjectId,
        counter: &mut WrapCounter,
    ) -> Result<u64> {
        let (id, version) = (&object.key_id, object.version);
        let mut total = self
            .store
            .claim_wraps(id, version, WRAP_RESERVATION_BLOCK)?;
        let start = total.saturating_sub(WRAP_RESERVATION_BLOCK);
        // Other daemons' claims only move the count forward: below our own last block, the
        // store went back.
        let went_back = start < counter.reserved;
        if !went_back && counter.mark.is_some_and(|mark| total <= mark) {
            return Ok(total);
        }
        let marks = self.token.wrap_marks(object)?;
        let floor = marks
            .iter()
            .copied()
            .max()
            .unwrap_or(0)
            .max(counter.reserved);
        if start < floor {
            // A mark is recorded up to WRAP_MARK_AHEAD past the wraps claimed, so after a
            // restart the store is normally below it by less than that: counted on from the
            // mark without alarm. Further below, the store lost claims it had made.
            if floor - start > WRAP_MARK_AHEAD + WRAP_RESERVATION_BLOCK {
                tracing::error!(key_id = %id, version, store = start, recorded = floor, "the metadata store counts fewer wraps than were made (an edited or restored store?): counting on from the record");
            } else {
                tracing::debug!(key_id = %id, version, store = start, recorded = floor, "counting on from the wrap mark recorded ahead in the token");
            }
            total = self.store.claim_wraps(id, version, floor - start)?;
        }
        let mark = marks.iter().copied().max().unwrap_or(0);
        if total > mark {
            let ahead = total + WRAP_MARK_AHEAD;
            self.token.record_wrap_mark(object, ahead)?;
            for older in marks {
                if let Err(err) = self.token.destroy_wrap_mark(object, older) {
                    tracing::debug!(error = %err, "an older wrap mark stays (the highest counts)");
                }
            }
            counter.mark = Some(ahead);
        } else {
            counter.mark = Some(mark);
        }
        Ok(total)
    }

    /// Wraps used so far with a version in this process's view (for DescribeKey).
    pub fn wrap_count(&self, key: &KeyRecord, version: &VersionRecord) -> u64 {
        self.counters
            .lock()
            .get(&ObjectId::new(key.id.clone(), version.version))
            .map_or(version.wraps_reserved, |c| c.used)
    }

    /// Unwraps a blob. Every failure to authenticate is [`Error::InvalidCiphertext`]; `expected`
    /// (if given) must name the key the blob is wrapped under.
    pub fn unwrap(
        &self,
        blob: &[u8],
        context: &EncryptionContext,
        expected: Option<&KeyRef>,
    ) -> Result<Unwrapped> {
        let unwrapped = self.unwrap_uncounted(blob, context, expected)?;
        self.record_use(&unwrapped.key_id, unwrapped.key_version, false);
        Ok(unwrapped)
    }

    /// [`Keystore::unwrap`] without counting the use: the daemon's own health round trips.
    pub fn unwrap_uncounted(
        &self,
        blob: &[u8],
        context: &EncryptionContext,
        expected: Option<&KeyRef>,
    ) -> Result<Unwrapped> {
        let blob = Blob::parse(blob)?;
        self.check_fresh()?;
        if let Some(expected) = expected {
            if self.resolve(expected)?.id != blob.key_id {
                return Err(Error::IncorrectKey);
            }
        }
        // A blob naming an unknown (or destroyed) key, or a version the key never had, is
        // an invalid ciphertext like any other tampering. In a fleet, another daemon may
        // have made the key or version a moment ago: the store is asked once first.
        let known = |key: &KeyRecord| key.versions.iter().any(|v| v.version == blob.key_version);
        let mut key = self.read_view().keys.get(&blob.key_id).cloned();
        if !key.as_deref().is_some_and(known) {
            key = self.read_through(&blob.key_id)?.or(key);
        }
        let key = key.ok_or(Error::InvalidCiphertext)?;
        self.usable(&key)?;
        if !known(&key) {
            return Err(Error::InvalidCiphertext);
        }
        // A destroyed version has no object to check the tag with: every blob naming it gets
        // the same answer, forged or not.
        retirement::check_not_destroyed(&key, blob.key_version)?;
        let aad = Blob::aad(&blob.key_id, blob.key_version, &context.serialize());
        let decrypted = self.token.decrypt(
            &ObjectId::new(blob.key_id.clone(), blob.key_version),
            &blob.iv,
            &blob.ciphertext,
            &aad,
        );
        let plaintext = match decrypted {
            // In a fleet, the object may be gone because another daemon just carried out
            // the key's scheduled deletion: the shared metadata says so.
            Err(err) if self.store.is_shared() && err.kind() == ErrorKind::Unavailable => {
                match self.refresh(&blob.key_id)? {
                    None => return Err(Error::InvalidCiphertext),
                    Some(key) => {
                        self.usable(&key)?;
                        return Err(err);
                    }
                }
            }
            other => other?,
        };
        // Only once the tag verified: a forged blob must not learn which versions are retired.
        if retirement::is_retired(&key, blob.key_version) {
            return Err(retirement::retired(&key.id, blob.key_version));
        }
        Ok(Unwrapped {
            plaintext,
            key_id: blob.key_id,
            key_version: blob.key_version,
        })
    }

    /// Unwraps and wraps again under the newest version of `destination` (or of the source
    /// key when `None`). The plaintext stays in this function and is zeroized.
    pub fn rewrap(
        &self,
        blob: &[u8],
        source_context: &EncryptionContext,
        destination: Option<&KeyRef>,
        destination_context: &EncryptionContext,
    ) -> Result<Rewrapped> {
        let source = self.unwrap(blob, source_context, None)?;
        let destination = match destination {
            Some(key) => key.clone(),
            None => KeyRef::Id(source.key_id.clone()),
        };
        let (key, version) = self.wrapping_version(&destination)?;
        let wrapped = self.seal(&key.id, version, &source.plaintext, destination_context)?;
        Ok(Rewrapped {
            wrapped,
            source_key_id: source.key_id.clone(),
            source_key_version: source.key_version,
        })
    }
}
