//! The end of a key version: retiring it (RetireKeyVersion), restoring it
//! (RestoreKeyVersion), and destroying it (ScheduleKeyVersionDestruction, then maintenance).
//!
//! A retired version unwraps nothing (blobs, re-wrap sources, XKS ciphertexts), with an error
//! naming the version and how to restore it; new wraps never use it, since the current
//! version cannot be retired. The token records the retirement (a *retired* ticket) before
//! the store does, so that a store writer can never put a retired version back in use; the
//! store's flag tells the other daemons of a fleet and shows the state.
//!
//! Only a retired version can be scheduled for destruction, after a waiting period of 7 to 30
//! days like a key's deletion, and it cannot be restored while the destruction is pending.
//! As for keys, the token's *version destruction* ticket and the store must agree (and the
//! token must still hold the version retired) before maintenance destroys the object, after
//! the `DestroyKeyVersion` audit line. The version's record stays, marked destroyed, so that
//! its blobs fail with an error that says so instead of looking forged, and its usage and
//! history stay readable.

use super::*;

impl Keystore {
    /// Retires `version` of `key`. The current version cannot be retired: rotate first.
    pub fn retire_version(&self, key: &KeyRef, version: u32) -> Result<Arc<KeyRecord>> {
        self.set_retired(key, version, true)
    }

    /// Restores a retired version.
    pub fn restore_version(&self, key: &KeyRef, version: u32) -> Result<Arc<KeyRecord>> {
        self.set_retired(key, version, false)
    }

    fn set_retired(&self, key: &KeyRef, version: u32, retired: bool) -> Result<Arc<KeyRecord>> {
        // Under the fleet's lock, like a key's state: the ticket and the store's flag change
        // together, never interleaved with another daemon's change of the version.
        let _fleet = MaintenanceLock::wait(&*self.store, MAINTENANCE_LOCK_WAIT)?;
        let _admin = self.admin.lock();
        // The store's record, read under the fleet lock: the current version as the fleet
        // knows it, not as this daemon's view last did.
        let id = self.resolve(key)?.id.clone();
        let record = self
            .refresh(&id)?
            .ok_or_else(|| Error::KeyNotFound(id.to_string()))?;
        if !record.versions.iter().any(|v| v.version == version) {
            return Err(Error::KeyNotFound(format!(
                "{} version {version}",
                record.id
            )));
        }
        let state = record.versions.iter().find(|v| v.version == version);
        if let Some(state) =
            state.filter(|v| v.destruction_date.is_some() || v.destroyed_at.is_some())
        {
            if !retired || state.destroyed_at.is_some() {
                return Err(Error::WrongState(match state.destroyed_at {
                    Some(_) => format!("version {version} of key {} was destroyed", record.id),
                    None => format!(
                        "the destruction of version {version} of key {} is scheduled: cancel it first (CancelKeyVersionDestruction)",
                        record.id
                    ),
                }));
            }
        }
        if retired && version == record.current_version() {
            return Err(Error::WrongState(format!(
                "version {version} is the current version of key {}: rotate the key first, then retire it",
                record.id
            )));
        }
        let ticket = Ticket::Retired {
            key_id: record.id.clone(),
            version,
        };
        if retired {
            // The ticket first: retired from now on, whatever the store says.
            let had = self.token.has_ticket(&ticket)?;
            self.token.create_ticket(&ticket)?;
            if let Err(err) = self.store.set_version_retired(&record.id, version, true) {
                if !had {
                    if let Err(cleanup) = self.token.destroy_ticket(&ticket) {
                        tracing::warn!(key_id = %record.id, version, error = %cleanup, "could not remove the ticket of a RetireKeyVersion that was not recorded");
                    }
                }
                return Err(err);
            }
        } else {
            // A destruction the token still records (one the store no longer shows: a
            // writer's edit) must not stand over a version back in use.
            self.destroy_version_tickets(&record.id, version)?;
            // The ticket first, then the store once: the fleet, told by the write, reads a
            // version the token no longer holds retired. If the write fails, the store still
            // says retired, and so does every view.
            self.token.destroy_ticket(&ticket)?;
            self.store.set_version_retired(&record.id, version, false)?;
            // A restore counts as a use for automatic retirement (`retire_unused`), which
            // would otherwise retire the version again at its next pass.
            self.record_restore(&record.id, version);
        }
        tracing::info!(key_id = %record.id, version, retired, "key version retirement changed");
        self.refresh(&record.id)?
            .ok_or_else(|| Error::Internal("key vanished after a version change".into()))
    }
}

impl Keystore {
    /// Schedules the destruction of a retired `version` of `key` after `days` (7..=30; 0
    /// means 30).
    pub fn schedule_version_destruction(
        &self,
        key: &KeyRef,
        version: u32,
        days: u32,
    ) -> Result<Arc<KeyRecord>> {
        let days = if days == 0 { 30 } else { days };
        if !(7..=30).contains(&days) {
            return Err(Error::invalid(
                "pending_window_days must be between 7 and 30",
            ));
        }
        let _fleet = MaintenanceLock::wait(&*self.store, MAINTENANCE_LOCK_WAIT)?;
        let _admin = self.admin.lock();
        let record = self.version_of(key, version)?;
        let state = version_record(&record, version)?;
        if state.destroyed_at.is_some() {
            return Err(Error::WrongState(format!(
                "version {version} of key {} was already destroyed",
                record.id
            )));
        }
        if state.destruction_date.is_some() {
            return Err(Error::WrongState(format!(
                "the destruction of version {version} of key {} is already scheduled",
                record.id
            )));
        }
        // Retired in the token, not only in the store's word: the retirement is what the
        // destruction stands on.
        let retired = Ticket::Retired {
            key_id: record.id.clone(),
            version,
        };
        if !state.retired || !self.token.has_ticket(&retired)? {
            return Err(Error::WrongState(format!(
                "version {version} of key {} is not retired: retire it first (RetireKeyVersion), and destroy it only once nothing uses it",
                record.id
            )));
        }
        let when = self.clock.now() + Duration::from_secs(u64::from(days) * 86_400);
        // The token first: a destruction the token does not record is never carried out.
        let ticket = Ticket::VersionDestruction {
            key_id: record.id.clone(),
            version,
            due: tickets::unix_seconds(when),
        };
        self.token.create_ticket(&ticket)?;
        if let Err(err) = self.store.set_version_destruction(
            &record.id,
            version,
            VersionDestruction::Scheduled(when),
        ) {
            if let Err(cleanup) = self.token.destroy_ticket(&ticket) {
                tracing::warn!(key_id = %record.id, version, error = %cleanup, "could not remove the ticket of a version destruction that was not recorded");
            }
            return Err(err);
        }
        tracing::warn!(key_id = %record.id, version, days, "key version destruction scheduled");
        self.refresh(&record.id)?
            .ok_or_else(|| Error::Internal("key vanished after a version change".into()))
    }

    /// Cancels the scheduled destruction of `version` of `key`; the version stays retired.
    pub fn cancel_version_destruction(&self, key: &KeyRef, version: u32) -> Result<Arc<KeyRecord>> {
        let _fleet = MaintenanceLock::wait(&*self.store, MAINTENANCE_LOCK_WAIT)?;
        let _admin = self.admin.lock();
        let record = self.version_of(key, version)?;
        let state = version_record(&record, version)?;
        // Pending by the store or by the token: a ticket the store no longer shows (a
        // writer's edit) is cancelled too, so that no later edit can bring it into force.
        let ticketed = self.token.tickets()?.iter().any(|t| {
            matches!(t, Ticket::VersionDestruction { key_id, version: v, .. } if *key_id == record.id && *v == version)
        });
        if state.destroyed_at.is_some() || (state.destruction_date.is_none() && !ticketed) {
            return Err(Error::WrongState(format!(
                "the destruction of version {version} of key {} is not pending",
                record.id
            )));
        }
        // The tickets first: once they are gone, no daemon destroys the version, whatever
        // the store says.
        self.destroy_version_tickets(&record.id, version)?;
        self.store
            .set_version_destruction(&record.id, version, VersionDestruction::None)?;
        tracing::info!(key_id = %record.id, version, "key version destruction cancelled");
        self.refresh(&record.id)?
            .ok_or_else(|| Error::Internal("key vanished after a version change".into()))
    }

    /// Destroys the objects of the versions whose destruction is due by the token's ticket
    /// *and* the store (and which the token still holds retired): each after
    /// `before_destroy` (the audit line) succeeds. Safe to repeat after a crash.
    pub fn destroy_due_versions(
        &self,
        before_destroy: impl Fn(&KeyRecord, u32) -> Result<()>,
    ) -> Result<Vec<(KeyId, u32)>> {
        let Some(_maintenance) = MaintenanceLock::take(&*self.store)? else {
            return Ok(Vec::new()); // another daemon of the fleet is at it
        };
        let now = self.clock.now();
        let seconds = tickets::unix_seconds(now);
        let tickets = self.token.tickets()?;
        let mut due: BTreeMap<(KeyId, u32), u64> = BTreeMap::new();
        for ticket in &tickets {
            if let Ticket::VersionDestruction {
                key_id,
                version,
                due: at,
            } = ticket
            {
                let latest = due.entry((key_id.clone(), *version)).or_insert(*at);
                *latest = (*latest).max(*at);
            }
        }
        let mut destroyed = Vec::new();
        for ((id, version), at) in due {
            let _admin = self.admin.lock();
            let Some(key) = self.store.key(&id)? else {
                continue; // the key itself was deleted, or another store on the same token
            };
            let key = self.anchored(key, None)?;
            let Some(state) = key.versions.iter().find(|v| v.version == version) else {
                continue;
            };
            let retired = tickets.contains(&Ticket::Retired {
                key_id: id.clone(),
                version,
            });
            match (state.destroyed_at, state.destruction_date) {
                (Some(_), _) => {
                    // Destroyed by a run that stopped before dropping its ticket.
                    self.destroy_version_tickets(&id, version)?;
                    continue;
                }
                (None, Some(_)) if !retired => {
                    tracing::warn!(key_id = %id, version, "a version destruction recorded in the token for a version the token no longer holds retired; nothing destroyed, the record dropped");
                    self.destroy_version_tickets(&id, version)?;
                    continue;
                }
                (None, None) => {
                    // A scheduling that failed half-way, or a store writer: a store writer
                    // can hold a destruction back, never cause one.
                    tracing::warn!(key_id = %id, version, "a version destruction recorded in the token that the metadata store does not show pending; nothing destroyed, the record dropped");
                    self.destroy_version_tickets(&id, version)?;
                    continue;
                }
                (None, Some(date)) if date > now || at > seconds => continue, // not yet due
                (None, Some(_)) => {}
            }
            if version == key.current_version() {
                // Only an edited store makes a retired version current; never destroyed.
                tracing::warn!(key_id = %id, version, "a version due for destruction is the key's current version in the metadata store (an edited store?): nothing destroyed");
                continue;
            }
            before_destroy(&key, version)?;
            let object = ObjectId::new(id.clone(), version);
            self.token.destroy_key(&object)?;
            for mark in self.token.wrap_marks(&object)? {
                self.token.destroy_wrap_mark(&object, mark)?;
            }
            self.store
                .set_version_destruction(&id, version, VersionDestruction::Destroyed(now))?;
            self.destroy_version_tickets(&id, version)?;
            self.counters.lock().remove(&object);
            self.missing.write().remove(&object);
            self.refresh(&id)?;
            tracing::warn!(key_id = %id, version, "key version destroyed");
            destroyed.push((id, version));
        }
        Ok(destroyed)
    }

    /// Retires each version of `key` but the current one that is neither retired nor
    /// destroyed and was last used (fleet-wide, as the version usage says; a restore counts
    /// as a use; a version never used: its creation) more than `days` ago. Under the fleet's
    /// maintenance lock (one daemon at a time; none if another holds it), each version read
    /// again from the store before `before_retire` (the daemon's audit line) and the
    /// retirement. Never destroys anything.
    pub fn retire_unused(
        &self,
        key: &KeyRef,
        days: u32,
        before_retire: impl Fn(&KeyRecord, u32) -> Result<()>,
    ) -> Result<Vec<u32>> {
        let Some(_maintenance) = MaintenanceLock::take(&*self.store)? else {
            return Ok(Vec::new()); // another daemon of the fleet is at it
        };
        let id = self.resolve(key)?.id.clone();
        let Some(record) = self.refresh(&id)? else {
            return Err(Error::KeyNotFound(id.to_string()));
        };
        let usage = self.version_usage(&record)?;
        let horizon = self
            .clock
            .now()
            .checked_sub(Duration::from_secs(u64::from(days) * 86_400))
            .unwrap_or(std::time::UNIX_EPOCH);
        let mut retired = Vec::new();
        for version in &record.versions {
            if version.version == record.current_version()
                || version.retired
                || version.destroyed_at.is_some()
            {
                continue;
            }
            let last = usage
                .get(&version.version)
                .and_then(|u| u.last_used)
                .unwrap_or(version.created_at);
            if last >= horizon {
                continue;
            }
            before_retire(&record, version.version)?;
            self.retire_version(&KeyRef::Id(record.id.clone()), version.version)?;
            tracing::warn!(key_id = %record.id, version = version.version, days, "key version retired: unused for longer than retire_unused_after_days");
            retired.push(version.version);
        }
        Ok(retired)
    }

    /// The key of a version call, read from the store under the fleet lock (the fleet's
    /// current state, not this daemon's last view), with the version checked to exist.
    fn version_of(&self, key: &KeyRef, version: u32) -> Result<Arc<KeyRecord>> {
        let id = self.resolve(key)?.id.clone();
        let record = self
            .refresh(&id)?
            .ok_or_else(|| Error::KeyNotFound(id.to_string()))?;
        version_record(&record, version)?;
        Ok(record)
    }

    fn destroy_version_tickets(&self, id: &KeyId, version: u32) -> Result<()> {
        for ticket in self.token.tickets()? {
            if matches!(&ticket, Ticket::VersionDestruction { key_id, version: v, .. } if key_id == id && *v == version)
            {
                self.token.destroy_ticket(&ticket)?;
            }
        }
        Ok(())
    }
}

fn version_record(key: &KeyRecord, version: u32) -> Result<&VersionRecord> {
    key.versions
        .iter()
        .find(|v| v.version == version)
        .ok_or_else(|| Error::KeyNotFound(format!("{} version {version}", key.id)))
}

/// Refuses a use of a destroyed version.
pub(super) fn check_not_destroyed(key: &KeyRecord, version: u32) -> Result<()> {
    if key
        .versions
        .iter()
        .any(|v| v.version == version && v.destroyed_at.is_some())
    {
        return Err(Error::WrongState(format!(
            "version {version} of key {} was destroyed (ScheduleKeyVersionDestruction): what it wrapped can no longer be unwrapped",
            key.id
        )));
    }
    Ok(())
}

/// The error of a use of a retired version: which version, and how to bring it back.
pub(super) fn retired(key: &KeyId, version: u32) -> Error {
    Error::WrongState(format!(
        "version {version} of key {key} is retired: restore it with RestoreKeyVersion (wrapctl keys restore-version {key} {version}) to unwrap with it"
    ))
}

/// Whether `version` of `key` is retired (a version it does not have is not).
pub(super) fn is_retired(key: &KeyRecord, version: u32) -> bool {
    key.versions
        .iter()
        .any(|v| v.version == version && v.retired)
}
