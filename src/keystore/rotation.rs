//! Key versions: manual and automatic rotation, the fleet-wide claim of the next version
//! number, and what start-up does with versions the token holds and the store lacks.

use super::*;

impl Keystore {
    /// Adds a version; new wraps use it.
    pub fn rotate_key(&self, key: &KeyRef) -> Result<Arc<KeyRecord>> {
        let _admin = self.admin.lock();
        let key = self.resolve(key)?;
        self.usable(&key)?;
        self.add_version(&key, false)
    }

    /// Turns automatic rotation on (every `period_days`, 90 to 2560, the first one
    /// `period_days` from now) or, with `None`, off. The key must be enabled (as in AWS KMS).
    pub fn set_rotation(&self, key: &KeyRef, period_days: Option<u32>) -> Result<Arc<KeyRecord>> {
        let _admin = self.admin.lock();
        let key = self.resolve(key)?;
        self.usable(&key)?;
        if period_days.is_some() {
            refuse_imported_rotation(&key)?;
        }
        let schedule = match period_days {
            Some(days) if ROTATION_PERIOD_DAYS.contains(&days) => Some(RotationSchedule {
                period_days: days,
                next: self.clock.now() + days_of(days),
            }),
            Some(_) => {
                return Err(Error::invalid(format!(
                    "the rotation period must be {} to {} days",
                    ROTATION_PERIOD_DAYS.start(),
                    ROTATION_PERIOD_DAYS.end()
                )));
            }
            None => None,
        };
        self.store.set_rotation(&key.id, schedule.as_ref())?;
        tracing::info!(key_id = %key.id, period_days, "automatic rotation set");
        self.refresh(&key.id)?
            .ok_or_else(|| Error::Internal("key vanished".into()))
    }

    /// Rotates every enabled key whose automatic rotation is due, each after `before`
    /// returns (the audit line; an error there skips the key until the next pass). Disabled
    /// keys wait until they are enabled again. Returns the keys rotated.
    pub fn rotate_due(&self, before: impl Fn(&KeyRecord) -> Result<()>) -> Result<Vec<KeyId>> {
        let Some(_maintenance) = MaintenanceLock::take(&*self.store)? else {
            return Ok(Vec::new()); // another daemon of the fleet is at it
        };
        let now = self.clock.now();
        let due: Vec<Arc<KeyRecord>> = self
            .read_view()
            .keys
            .values()
            .filter(|k| k.state == KeyState::Enabled)
            .filter(|k| k.rotation.is_some_and(|r| r.next <= now))
            .cloned()
            .collect();
        let mut rotated = Vec::new();
        for key in due {
            let _admin = self.admin.lock();
            // Re-read under the lock: another path may have changed it.
            let Some(key) = self.read_view().keys.get(&key.id).cloned() else {
                continue;
            };
            let Some(schedule) = key.rotation.filter(|r| r.next <= now) else {
                continue;
            };
            if key.state != KeyState::Enabled {
                continue;
            }
            before(&key)?;
            self.add_version(&key, true)?;
            // The next one a period after this one (not a burst of catch-up rotations
            // after a long stop).
            let next = RotationSchedule {
                period_days: schedule.period_days,
                next: now + days_of(schedule.period_days),
            };
            self.store.set_rotation(&key.id, Some(&next))?;
            self.refresh(&key.id)?;
            rotated.push(key.id.clone());
        }
        Ok(rotated)
    }

    /// Adds a version to `key` (`automatic`: on its rotation schedule). Caller holds the
    /// admin lock.
    pub(super) fn add_version(&self, key: &KeyRecord, automatic: bool) -> Result<Arc<KeyRecord>> {
        refuse_imported_rotation(key)?;
        let (version, resumed) = self.claim_next_version(&key.id)?;
        let object = ObjectId::new(key.id.clone(), version);
        // Never destroy an object the metadata cannot prove is an orphan: after a metadata
        // restore, this CKA_ID can be live key material.
        if self.token.contains(&object)? {
            if resumed {
                // This daemon generated it for this very version and never committed it.
                self.adopt(&key.id, version)?;
                return self
                    .refresh(&key.id)?
                    .ok_or_else(|| Error::Internal("key vanished after rotate".into()));
            }
            self.store.end_version(&key.id, version)?;
            return Err(Error::WrongState(format!(
                "the token already holds key material for {object} that the metadata store does not know (restored from an older backup?); nothing was destroyed: restart wrapd to see the reconciliation report"
            )));
        }
        self.token.generate_key(&object)?;
        self.store.add_version(
            &key.id,
            &VersionRecord::new(version, self.clock.now(), automatic),
        )?;
        tracing::info!(key_id = %key.id, version, automatic, "key rotated");
        self.refresh(&key.id)?
            .ok_or_else(|| Error::Internal("key vanished after rotate".into()))
    }

    /// Claims the next version number of a key in the store, where a fleet's races are
    /// decided: the newest version the store knows + 1, waiting while another daemon holds
    /// the claim on it (it is generating that version's object). A claim held for longer
    /// than [`STUCK_CLAIM`] belongs to a daemon that died mid-rotation: the number is
    /// skipped (a gap in the version numbers, never two objects for one version). Returns
    /// the version and whether the claim was this daemon's already.
    pub(super) fn claim_next_version(&self, id: &KeyId) -> Result<(u32, bool)> {
        let latest = |ks: &Self| -> Result<u32> {
            Ok(ks
                .store
                .key(id)?
                .ok_or_else(|| Error::KeyNotFound(id.to_string()))?
                .current_version())
        };
        let next = |v: u32| {
            v.checked_add(1)
                .ok_or_else(|| Error::LimitReached(format!("key {id} has too many versions")))
        };
        let mut candidate = next(latest(self)?)?;
        let mut waiting_since = std::time::Instant::now();
        loop {
            match self.store.begin_version(id, candidate) {
                Ok(resumed) => return Ok((candidate, resumed)),
                Err(Error::AlreadyExists(_)) => {
                    let newest = latest(self)?;
                    if newest >= candidate {
                        candidate = next(newest)?;
                        waiting_since = std::time::Instant::now();
                    } else if waiting_since.elapsed() > STUCK_CLAIM {
                        tracing::warn!(key_id = %id, version = candidate, "skipping a version claimed by a daemon that never finished it");
                        candidate = next(candidate)?;
                        waiting_since = std::time::Instant::now();
                    } else {
                        std::thread::sleep(Duration::from_millis(5));
                    }
                }
                Err(err) => return Err(err),
            }
        }
    }

    /// Start-up: what to do with objects in the token that are versions of known keys the
    /// metadata does not list (as after the metadata store is restored from an older backup).
    /// Key material is never destroyed: an object left by this daemon's own unfinished
    /// rotation (its version was recorded as pending) is adopted; any other is an error
    /// naming the way out, unless [`KeystoreConfig::adopt_unknown_versions`] is set. Adopted
    /// versions unwrap their blobs but take no new wraps (their wrap counts are unknown): the
    /// next wrap rotates.
    pub(super) fn settle_unknown_versions(&self, report: &ReconcileReport) -> Result<()> {
        let pending: HashSet<(KeyId, u32)> = self.store.pending_versions()?.into_iter().collect();
        let mut unknown = Vec::new();
        for object in &report.orphans {
            let Some(key) = self.read_view().keys.get(&object.key_id).cloned() else {
                continue; // a key no metadata knows: reported as an orphan
            };
            if key.versions.iter().any(|v| v.version == object.version) {
                continue;
            }
            if pending.contains(&(object.key_id.clone(), object.version)) {
                tracing::warn!(object = %object, "adopting the key object of a rotation interrupted by a crash (it takes no new wraps)");
                self.adopt(&key.id, object.version)?;
            } else {
                unknown.push(object.clone());
            }
        }
        for (id, version) in &pending {
            if !report
                .orphans
                .contains(&ObjectId::new(id.clone(), *version))
            {
                self.store.end_version(id, *version)?; // never generated, or adopted above
            }
        }
        if unknown.is_empty() {
            return Ok(());
        }
        let names: Vec<String> = unknown.iter().map(ToString::to_string).collect();
        if !self.config.adopt_unknown_versions {
            return Err(Error::Config(format!(
                "the token holds key versions the metadata store does not know: {}. The store is older than the token (restored from a backup?) or was edited; blobs may exist under these versions, so nothing was destroyed. Restore the newest metadata backup, or start with --adopt-unknown-versions to add them to the metadata (they unwrap their blobs; new wraps go to a fresh version)",
                names.join(", ")
            )));
        }
        for object in unknown {
            tracing::warn!(object = %object, "adopting a key version the metadata did not know (--adopt-unknown-versions)");
            self.adopt(&object.key_id, object.version)?;
        }
        Ok(())
    }

    /// Adds a version whose object exists in the token, as used up for wrapping.
    pub(super) fn adopt(&self, id: &KeyId, version: u32) -> Result<()> {
        self.store.add_version(
            id,
            &VersionRecord {
                wraps_reserved: self.config.max_wraps_per_version,
                ..VersionRecord::new(version, self.clock.now(), false)
            },
        )?;
        self.refresh(id)?;
        Ok(())
    }
}
