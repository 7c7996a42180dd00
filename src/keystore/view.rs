//! The view: what this daemon knows of the metadata store, as the token's holds and alias
//! tickets let it stand (`tickets.rs`), and how it follows a store other daemons share
//! (notifications, the periodic re-read, the read-through of names it lacks).

use super::*;

impl Keystore {
    pub(super) fn usable(&self, key: &KeyRecord) -> Result<()> {
        usable_at(key, || self.clock.now())
    }

    /// Re-reads every key and alias from the store, as the token lets them stand.
    pub(super) fn reload(&self) -> Result<()> {
        let keys = self.store.all_keys()?;
        let aliases = self.store.all_aliases()?;
        let anchors = tickets::Anchors::read(&*self.token)?;
        let keys = keys
            .into_iter()
            .map(|k| Ok((k.id.clone(), Arc::new(self.anchored(k, Some(&anchors))?))))
            .collect::<Result<HashMap<_, _>>>()?;
        let aliases = self.anchored_aliases(aliases, Some(&anchors))?;
        let mut view = self.view.write();
        view.keys = keys;
        view.aliases = aliases.into_iter().collect();
        drop(view);
        self.read_through.forget_misses();
        Ok(())
    }

    /// True when the version's token object was found missing at reconciliation.
    pub fn is_missing(&self, key_id: &KeyId, version: u32) -> bool {
        self.missing
            .read()
            .contains(&ObjectId::new(key_id.clone(), version))
    }

    /// Re-reads everything from the store (a fleet's safety net, and after lost
    /// notifications).
    pub fn resync(&self) -> Result<()> {
        self.reload()
    }

    /// Follows what other daemons change in a shared store until `stop` is set: each
    /// notification refreshes the keys it names (or everything), and everything is re-read
    /// every `resync` as the safety net. Blocks; run it on a thread of its own. A store
    /// error is logged and retried after a pause.
    ///
    /// The view counts as confirmed (for `max_staleness`) as of a wait whose changes were
    /// all applied by queries that succeeded, never merely because a wait ended. A re-read
    /// of everything asked for by notifications (a payload wrapd does not send: any role
    /// that can connect may NOTIFY) runs at most once per [`MIN_RESYNC_GAP`].
    pub fn follow_store(&self, resync: Duration, stop: &std::sync::atomic::AtomicBool) {
        use std::sync::atomic::Ordering;
        use std::time::Instant;
        let min_gap = MIN_RESYNC_GAP.min(resync);
        // The first re-read (asked for by the first LISTEN) is not held back.
        let mut last_resync = Instant::now()
            .checked_sub(min_gap)
            .unwrap_or_else(Instant::now);
        // A re-read of everything is due (asked for, or after an error).
        let mut owed = false;
        // Refreshes notifications asked for in the current second (any role may NOTIFY:
        // beyond the budget, they wait for the next rate-limited re-read of everything).
        let mut window = Instant::now();
        let mut spent = 0usize;
        while !stop.load(Ordering::Relaxed) {
            let due_in = if owed { min_gap } else { resync };
            let wait = due_in
                .saturating_sub(last_resync.elapsed())
                .min(Duration::from_millis(500));
            let asked = Instant::now();
            let applied = self.store.wait_for_changes(wait).and_then(|changes| {
                owed |= changes.everything;
                let since = last_resync.elapsed();
                if since >= resync || (owed && since >= min_gap) {
                    last_resync = Instant::now();
                    self.resync()?;
                    owed = false;
                    return Ok(true);
                }
                if window.elapsed() >= Duration::from_secs(1) {
                    window = Instant::now();
                    spent = 0;
                }
                let cost = changes.keys.len() + usize::from(changes.aliases) * ALIAS_REFRESH_COST;
                if spent + cost > REFRESH_BUDGET {
                    owed = true;
                }
                if owed {
                    // Rate-limited: the view waits for its re-read to be confirmed.
                    return Ok(false);
                }
                spent += cost;
                for id in &changes.keys {
                    self.refresh(id)?;
                }
                if changes.aliases {
                    self.refresh_aliases()?;
                }
                Ok(true)
            });
            match applied {
                Ok(true) => *self.last_sync.lock() = asked,
                Ok(false) => {}
                Err(err) => {
                    tracing::warn!(error = %err, "cannot follow the metadata store; retrying");
                    std::thread::sleep(Duration::from_secs(1));
                    owed = true;
                }
            }
        }
    }

    /// Refuses to serve from a view the shared store has not confirmed for longer than
    /// `max_view_staleness`.
    pub(super) fn check_fresh(&self) -> Result<()> {
        let Some(max) = self.config.max_view_staleness else {
            return Ok(());
        };
        let age = self.last_sync.lock().elapsed();
        if self.store.is_shared() && age > max {
            return Err(Error::Unavailable(format!(
                "the metadata store has not answered for {} s; refusing to serve from a stale view",
                age.as_secs()
            )));
        }
        Ok(())
    }

    /// Every key in the view (metrics).
    pub fn keys(&self) -> Vec<Arc<KeyRecord>> {
        self.read_view().keys.values().cloned().collect()
    }

    /// The wrap limit of one key version.
    pub fn max_wraps_per_version(&self) -> u64 {
        self.config.max_wraps_per_version
    }

    /// Whether the metadata store is shared by a fleet.
    pub fn store_is_shared(&self) -> bool {
        self.store.is_shared()
    }

    pub(super) fn read_view(&self) -> parking_lot::RwLockReadGuard<'_, View> {
        self.view.read()
    }

    /// Re-reads one key from the store into the view.
    pub(super) fn refresh(&self, id: &KeyId) -> Result<Option<Arc<KeyRecord>>> {
        let record = match self.store.key(id)? {
            Some(record) => Some(Arc::new(self.anchored(record, None)?)),
            None => None,
        };
        let mut view = self.view.write();
        match &record {
            Some(r) => view.keys.insert(id.clone(), r.clone()),
            None => view.keys.remove(id),
        };
        Ok(record)
    }

    pub(super) fn refresh_aliases(&self) -> Result<()> {
        let aliases = self.store.all_aliases()?;
        let anchors = tickets::Anchors::read(&*self.token)?;
        let aliases = self.anchored_aliases(aliases, Some(&anchors))?;
        self.view.write().aliases = aliases.into_iter().collect();
        self.read_through.forget_misses();
        Ok(())
    }

    /// In a fleet, re-reads a key the view lacks (or lacks a version of) from the store,
    /// within the read-through budget (`read_through.rs`); `None` if the store does not
    /// know it or the budget says not to ask.
    pub(super) fn read_through(&self, id: &KeyId) -> Result<Option<Arc<KeyRecord>>> {
        let name = id.to_string();
        let now = std::time::Instant::now();
        if !self.store.is_shared() || !self.read_through.may_ask(&name, now) {
            return Ok(None);
        }
        let record = self.refresh(id)?;
        if record.is_none() {
            self.read_through.missed(&name, now);
        }
        Ok(record)
    }

    /// The key a reference names. In a fleet, a name the view lacks may have been made by
    /// another daemon a moment ago: the store is asked (within the read-through budget)
    /// before it is called unknown.
    pub fn resolve(&self, key: &KeyRef) -> Result<Arc<KeyRecord>> {
        let id = match key {
            KeyRef::Id(id) => id.clone(),
            KeyRef::Alias(alias) => match self.read_view().aliases.get(alias).cloned() {
                Some(id) => id,
                None => self
                    .alias_read_through(alias)?
                    .ok_or_else(|| Error::AliasNotFound(alias.to_string()))?,
            },
        };
        if let Some(record) = self.read_view().keys.get(&id).cloned() {
            return Ok(record);
        }
        self.read_through(&id)?
            .ok_or_else(|| Error::KeyNotFound(id.to_string()))
    }

    /// The key an alias the view lacks names in the shared store (not put in the view: the
    /// follower keeps the alias map).
    pub(super) fn alias_read_through(&self, alias: &AliasName) -> Result<Option<KeyId>> {
        let name = alias.to_string();
        let now = std::time::Instant::now();
        if !self.store.is_shared() || !self.read_through.may_ask(&name, now) {
            return Ok(None);
        }
        let id = match self.store.alias(alias)? {
            Some(id)
                if self
                    .anchored_aliases(vec![(alias.clone(), id.clone())], None)?
                    .is_empty() =>
            {
                None
            }
            found => found,
        };
        if id.is_none() {
            self.read_through.missed(&name, now);
        }
        Ok(id)
    }
}
