//! A key's life: creation, tags, enabling and disabling, and deletion (scheduled, cancelled
//! and carried out only when the token's ticket and the store agree, see `tickets.rs`).

use super::*;

impl Keystore {
    /// Creates a key with one version, and optionally an alias for it.
    pub fn create_key(
        &self,
        description: &str,
        alias: Option<&AliasName>,
    ) -> Result<Arc<KeyRecord>> {
        self.create_key_tagged(description, alias, &BTreeMap::new())
    }

    /// Creates a key with tags (checked as [`Keystore::tag_key`] checks them).
    pub fn create_key_tagged(
        &self,
        description: &str,
        alias: Option<&AliasName>,
        tags: &BTreeMap<String, String>,
    ) -> Result<Arc<KeyRecord>> {
        self.create_key_from(description, alias, tags, KeyOrigin::Hsm)
    }

    /// Creates a key whose material is generated in the token ([`KeyOrigin::Hsm`]) or
    /// imported later ([`KeyOrigin::External`]: the key starts `PENDING_IMPORT`, its one
    /// version without an object until [`Keystore::import_key_material`]).
    pub fn create_key_from(
        &self,
        description: &str,
        alias: Option<&AliasName>,
        tags: &BTreeMap<String, String>,
        origin: KeyOrigin,
    ) -> Result<Arc<KeyRecord>> {
        self.create_key_with_policy(description, alias, tags, origin, None)
    }

    /// [`Keystore::create_key_from`] with a key policy document (checked by the caller;
    /// `None`: AWS's default policy), written with the key in one step.
    pub fn create_key_with_policy(
        &self,
        description: &str,
        alias: Option<&AliasName>,
        tags: &BTreeMap<String, String>,
        origin: KeyOrigin,
        policy: Option<&str>,
    ) -> Result<Arc<KeyRecord>> {
        let tags = checked_tags(&BTreeMap::new(), tags, false)?;
        if description.len() > MAX_DESCRIPTION_LEN {
            return Err(Error::invalid(format!(
                "description is longer than {MAX_DESCRIPTION_LEN} bytes"
            )));
        }
        let _admin = self.admin.lock();
        if let Some(alias) = alias {
            if self.read_view().aliases.contains_key(alias) {
                return Err(Error::AlreadyExists(format!(
                    "alias {alias} already exists"
                )));
            }
            self.refuse_recorded_alias(alias)?;
        }
        let now = self.clock.now();
        let id = KeyId::generate();
        // Token object first: a crash before the metadata commit leaves an orphan object
        // (reported at start-up), never metadata without key material.
        let object = ObjectId::new(id.clone(), 1);
        if origin == KeyOrigin::Hsm {
            self.token.generate_key(&object)?;
        }
        let record = KeyRecord {
            id: id.clone(),
            description: description.to_owned(),
            state: match origin {
                KeyOrigin::Hsm => KeyState::Enabled,
                KeyOrigin::External => KeyState::PendingImport,
            },
            origin,
            material: None,
            created_at: now,
            deletion_date: None,
            versions: vec![VersionRecord::new(1, now, false)],
            aliases: alias.into_iter().cloned().collect(),
            rotation: None,
            tags,
            policy: policy.map(str::to_owned),
            grants: Default::default(),
        };
        // The alias's ticket before the store's row: a row without its ticket names nothing.
        let alias_ticket = alias.map(|alias| Ticket::alias(alias, &id));
        if let Some(ticket) = &alias_ticket {
            self.token.create_ticket(ticket)?;
        }
        if let Err(err) = self.store.create_key(&record, alias) {
            if let Some(ticket) = &alias_ticket {
                if let Err(cleanup) = self.token.destroy_ticket(ticket) {
                    tracing::warn!(key_id = %id, error = %cleanup, "could not remove the alias ticket of a key that failed to commit");
                }
            }
            if origin == KeyOrigin::External {
                return Err(err);
            }
            if let Err(cleanup) = self.token.destroy_key(&object) {
                tracing::warn!(object = %object, error = %cleanup, "could not destroy the object of a key that failed to commit");
            }
            return Err(err);
        }
        if alias.is_some() {
            self.refresh_aliases()?;
        }
        tracing::info!(key_id = %id, "key created");
        self.refresh(&id)?
            .ok_or_else(|| Error::Internal("key vanished after create".into()))
    }

    /// Keys in creation order, one page at a time.
    pub fn list_keys(
        &self,
        page_size_requested: u32,
        page_token: &str,
    ) -> Result<Page<Arc<KeyRecord>>> {
        let limit = page_size(page_size_requested)?;
        let after = decode_page_token("k:", page_token)?;
        let mut rows = self.store.list_keys(&after, limit + 1)?;
        let next_page_token = if rows.len() > limit {
            rows.truncate(limit);
            rows.last()
                .map(|(cursor, _)| encode_page_token("k:", cursor))
                .unwrap_or_default()
        } else {
            String::new()
        };
        let anchors = tickets::Anchors::read(&*self.token)?;
        let items = rows
            .into_iter()
            .map(|(_, k)| Ok(Arc::new(self.anchored(k, Some(&anchors))?)))
            .collect::<Result<_>>()?;
        Ok(Page {
            items,
            next_page_token,
        })
    }

    /// Adds tags to a key (replacing the values of tags it has), or with `remove`, removes
    /// the tags named by `tags`' keys. Tag keys are 1 to 128 characters and do not start
    /// with `aws:` (reserved, as in AWS KMS), values at most 256; a key has at most 50 tags.
    pub fn tag_key(
        &self,
        key: &KeyRef,
        tags: &BTreeMap<String, String>,
        remove: bool,
    ) -> Result<Arc<KeyRecord>> {
        self.change_metadata(key, |store, key| {
            let updated = checked_tags(&key.tags, tags, remove)?;
            store.set_tags(&key.id, &updated)
        })
    }

    /// Changes what the store records of a key that is not pending deletion (tags, the
    /// description, the key policy), under the admin lock, and answers with the key re-read.
    pub(super) fn change_metadata(
        &self,
        key: &KeyRef,
        write: impl FnOnce(&dyn MetadataStore, &KeyRecord) -> Result<()>,
    ) -> Result<Arc<KeyRecord>> {
        let _admin = self.admin.lock();
        let key = self.resolve(key)?;
        if key.state == KeyState::PendingDeletion {
            return Err(Error::WrongState(format!(
                "key {} is pending deletion",
                key.id
            )));
        }
        write(self.store.as_ref(), &key)?;
        self.refresh(&key.id)?
            .ok_or_else(|| Error::Internal("key vanished".into()))
    }

    /// Replaces a key's description (at most [`MAX_DESCRIPTION_LEN`] bytes).
    pub fn update_description(&self, key: &KeyRef, description: &str) -> Result<Arc<KeyRecord>> {
        if description.len() > MAX_DESCRIPTION_LEN {
            return Err(Error::invalid(format!(
                "description is longer than {MAX_DESCRIPTION_LEN} bytes"
            )));
        }
        self.change_metadata(key, |store, key| {
            store.set_description(&key.id, description)
        })
    }

    /// Replaces the key policy document (checked by the caller).
    pub fn put_key_policy(&self, key: &KeyRef, policy: &str) -> Result<Arc<KeyRecord>> {
        self.change_metadata(key, |store, key| store.set_policy(&key.id, policy))
    }

    /// Enables a disabled key.
    pub fn enable_key(&self, key: &KeyRef) -> Result<Arc<KeyRecord>> {
        self.set_state(key, KeyState::Enabled)
    }

    /// Disables a key: no data-plane operation until enabled again.
    pub fn disable_key(&self, key: &KeyRef) -> Result<Arc<KeyRecord>> {
        self.set_state(key, KeyState::Disabled)
    }

    pub(super) fn set_state(&self, key: &KeyRef, state: KeyState) -> Result<Arc<KeyRecord>> {
        // Under the fleet's lock, like the other state changes: a hold and the store's state
        // are changed together, never interleaved with another daemon's change of the key.
        let _fleet = MaintenanceLock::wait(&*self.store, MAINTENANCE_LOCK_WAIT)?;
        let _admin = self.admin.lock();
        let key = self.resolve(key)?;
        if key.state == KeyState::PendingDeletion {
            return Err(Error::WrongState(format!(
                "key {} is pending deletion; cancel the deletion first",
                key.id
            )));
        }
        if key.state == KeyState::PendingImport {
            return Err(Error::WrongState(format!(
                "key {} is pending import; import its key material first",
                key.id
            )));
        }
        // Disabling: the hold first, so that the key is disabled whatever the store says
        // afterwards. Enabling: the store first, so that a failure leaves it disabled.
        let hold = Ticket::Hold {
            key_id: key.id.clone(),
        };
        if state == KeyState::Enabled {
            self.store.set_state(&key.id, state, None)?;
            self.token.destroy_ticket(&hold)?;
            // Written again once the hold is gone, so that the other daemons of a fleet,
            // told by the first write, read the key again after it.
            self.store.set_state(&key.id, state, None)?;
        } else {
            let held = self.token.has_ticket(&hold)?;
            self.token.create_ticket(&hold)?;
            if let Err(err) = self.store.set_state(&key.id, state, None) {
                if !held {
                    if let Err(cleanup) = self.token.destroy_ticket(&hold) {
                        tracing::warn!(key_id = %key.id, error = %cleanup, "could not remove the hold of a DisableKey that was not recorded");
                    }
                }
                return Err(err);
            }
        }
        tracing::info!(key_id = %key.id, state = state.as_str(), "key state changed");
        self.refresh(&key.id)?
            .ok_or_else(|| Error::Internal("key vanished after state change".into()))
    }

    /// Schedules the destruction of every version after `days` (7..=30; 0 means 30).
    pub fn schedule_deletion(&self, key: &KeyRef, days: u32) -> Result<Arc<KeyRecord>> {
        let days = if days == 0 { 30 } else { days };
        if !(7..=30).contains(&days) {
            return Err(Error::invalid(
                "pending_window_days must be between 7 and 30",
            ));
        }
        // Under the fleet's maintenance lock, like the purge and imports: a purge never
        // sees the token and the store half-changed by another daemon.
        let _fleet = MaintenanceLock::wait(&*self.store, MAINTENANCE_LOCK_WAIT)?;
        let _admin = self.admin.lock();
        let key = self.resolve(key)?;
        if key.state == KeyState::PendingDeletion {
            return Err(Error::WrongState(format!(
                "key {} is already pending deletion",
                key.id
            )));
        }
        let when = self.clock.now() + Duration::from_secs(u64::from(days) * 86_400);
        // The token first: a deletion the token does not record is never carried out.
        let ticket = Ticket::Deletion {
            key_id: key.id.clone(),
            due: tickets::unix_seconds(when),
        };
        // And a hold: a store writer who cancels the deletion does not make the key usable.
        let hold = Ticket::Hold {
            key_id: key.id.clone(),
        };
        let held = self.token.has_ticket(&hold)?;
        self.token.create_ticket(&hold)?;
        self.token.create_ticket(&ticket)?;
        if let Err(err) = self
            .store
            .set_state(&key.id, KeyState::PendingDeletion, Some(when))
        {
            let made = std::iter::once(&ticket).chain((!held).then_some(&hold));
            for made in made {
                if let Err(cleanup) = self.token.destroy_ticket(made) {
                    tracing::warn!(key_id = %key.id, error = %cleanup, "could not remove a ticket of a deletion that was not recorded");
                }
            }
            return Err(err);
        }
        tracing::warn!(key_id = %key.id, days, "key deletion scheduled");
        self.refresh(&key.id)?
            .ok_or_else(|| Error::Internal("key vanished after scheduling deletion".into()))
    }

    /// Cancels a scheduled deletion; the key comes back disabled (or, without its imported
    /// material, pending import), as in AWS KMS.
    pub fn cancel_deletion(&self, key: &KeyRef) -> Result<Arc<KeyRecord>> {
        let _fleet = MaintenanceLock::wait(&*self.store, MAINTENANCE_LOCK_WAIT)?;
        let _admin = self.admin.lock();
        let key = self.resolve(key)?;
        if key.state != KeyState::PendingDeletion {
            return Err(Error::WrongState(format!(
                "key {} is not pending deletion",
                key.id
            )));
        }
        // An imported key whose material expired or was deleted meanwhile comes back
        // pending import.
        let state = if key.has_material() {
            KeyState::Disabled
        } else {
            KeyState::PendingImport
        };
        // The tickets first: once they are gone, no daemon destroys the key, whatever the
        // store says.
        self.destroy_tickets(&key.id, Some(tickets::Kind::Deletion), |_| false)?;
        self.store.set_state(&key.id, state, None)?;
        tracing::info!(key_id = %key.id, state = state.as_str(), "key deletion cancelled");
        self.refresh(&key.id)?
            .ok_or_else(|| Error::Internal("key vanished after cancelling deletion".into()))
    }

    /// Destroys the keys whose deletion is due, by the token's deletion ticket *and* the
    /// metadata store (see `tickets.rs`): token objects first, then the metadata. Safe to
    /// repeat after a crash (destroying a missing object is no error). `before_destroy` runs
    /// for each key before anything of it is destroyed (the daemon writes the key's audit
    /// line there); if it fails, the key is left alone.
    pub fn purge_due(
        &self,
        before_destroy: impl Fn(&KeyRecord) -> Result<()>,
    ) -> Result<Vec<KeyId>> {
        let Some(_maintenance) = MaintenanceLock::take(&*self.store)? else {
            return Ok(Vec::new()); // another daemon of the fleet is at it
        };
        let now = self.clock.now();
        let seconds = tickets::unix_seconds(now);
        let tickets = self.token.tickets()?;
        // What the store calls due and the token does not: an edited or restored store.
        for id in self.store.keys_due_for_deletion(now)? {
            if !tickets::is_due(&tickets, tickets::Kind::Deletion, &id, seconds) {
                tracing::warn!(key_id = %id, "the metadata store shows this key due for deletion, but the token records no such deletion (an edited or restored store?): nothing destroyed");
            }
        }
        // A deletion ticket whose key the store does not show pending is left by a
        // scheduling that failed half-way (they run under this lock, so none is under
        // way): dropped, so that no later store edit can bring it into force.
        for id in tickets::due_keys(&tickets, tickets::Kind::Deletion, u64::MAX) {
            let _admin = self.admin.lock();
            if let Some(key) = self.store.key(&id)? {
                if key.state != KeyState::PendingDeletion {
                    tracing::warn!(key_id = %id, "a deletion recorded in the token for a key that is not pending deletion: the record dropped, nothing destroyed");
                    self.destroy_tickets(&id, Some(tickets::Kind::Deletion), |_| false)?;
                }
            }
        }
        let tickets = self.token.tickets()?;
        let mut purged = Vec::new();
        for id in tickets::due_keys(&tickets, tickets::Kind::Deletion, seconds) {
            let _admin = self.admin.lock();
            let Some(key) = self.store.key(&id)? else {
                // Not in this store (a purge that stopped after deleting the row, or another
                // store on the same token): nothing to destroy here.
                continue;
            };
            if key.state != KeyState::PendingDeletion || key.deletion_date.is_none_or(|d| d > now) {
                // The store does not show it due: the deletion is given up (a store writer
                // can hold a deletion back, never cause one).
                tracing::warn!(key_id = %id, state = key.state.as_str(), "a deletion recorded in the token that the metadata store does not show due; nothing destroyed, the record dropped");
                self.destroy_tickets(&id, Some(tickets::Kind::Deletion), |_| false)?;
                continue;
            }
            before_destroy(&key)?;
            for v in &key.versions {
                let object = ObjectId::new(id.clone(), v.version);
                self.token.destroy_key(&object)?;
                for mark in self.token.wrap_marks(&object)? {
                    self.token.destroy_wrap_mark(&object, mark)?;
                }
            }
            self.store.delete_key(&id, now)?;
            self.destroy_tickets(&id, None, |_| false)?;
            self.refresh(&id)?;
            self.refresh_aliases()?;
            self.counters.lock().retain(|object, _| object.key_id != id);
            tracing::warn!(key_id = %id, versions = key.versions.len(), "key destroyed");
            purged.push(id);
        }
        Ok(purged)
    }
}
