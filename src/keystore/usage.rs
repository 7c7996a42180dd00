//! Version usage: every wrap and unwrap a caller makes is counted in memory per key version
//! (with its first and last use), and the counts are added to the metadata store in batches
//! ([`Keystore::flush_usage`], every few seconds and at shutdown), so that no call waits for a
//! store write and a fleet's store holds the sum of its daemons' counts. The health probe's
//! calls are not counted: they are the daemon's, not a caller's.
//!
//! The counts are evidence for an operator deciding whether a version is still needed, not a
//! guarantee: a daemon killed before its flush loses its last few seconds of counts (its
//! last use may be later than the store says), a batch whose commit was acknowledged to no
//! one may be counted twice, and a store writer can change them.

use super::*;

impl Keystore {
    /// Counts one use of `version` of `key` now: a wrap, or an unwrap.
    pub(super) fn record_use(&self, key: &KeyId, version: u32, wrap: bool) {
        // At the store's precision, so that a use reads the same before and after a flush.
        let now = metadata::from_millis(metadata::to_millis(self.clock.now()));
        let used = VersionUsage {
            wraps: u64::from(wrap),
            unwraps: u64::from(!wrap),
            first_used: Some(now),
            last_used: Some(now),
        };
        let mut pending = self.usage.lock();
        // The key id is cloned (allocated) only for a key's first use since the last flush.
        let versions = match pending.get_mut(key) {
            Some(versions) => versions,
            None => pending.entry(key.clone()).or_default(),
        };
        versions.entry(version).or_default().add(&used);
    }

    /// Records a RestoreKeyVersion as the version's last use, with no count: automatic
    /// retirement judges a version by its last use, and a version an operator just brought
    /// back must not be retired again at the next pass.
    pub(super) fn record_restore(&self, key: &KeyId, version: u32) {
        let now = metadata::from_millis(metadata::to_millis(self.clock.now()));
        let restored = VersionUsage {
            last_used: Some(now),
            ..VersionUsage::default()
        };
        let mut pending = self.usage.lock();
        pending
            .entry(key.clone())
            .or_default()
            .entry(version)
            .or_default()
            .add(&restored);
    }

    /// Adds the counts since the last flush to the store; how many versions they were for.
    /// If the store fails, the counts are kept for the next flush.
    pub fn flush_usage(&self) -> Result<usize> {
        let mut batch: Vec<(KeyId, u32, VersionUsage)> = std::mem::take(&mut *self.usage.lock())
            .into_iter()
            .flat_map(|(key, versions)| {
                versions
                    .into_iter()
                    .map(move |(version, usage)| (key.clone(), version, usage))
            })
            .collect();
        // In one order on every daemon, so that two flushing at once never deadlock on rows.
        batch.sort_by(|a, b| (&a.0, a.1).cmp(&(&b.0, b.1)));
        if batch.is_empty() {
            return Ok(0);
        }
        if let Err(err) = self.store.add_usage(&batch) {
            let mut pending = self.usage.lock();
            for (key, version, usage) in batch {
                pending
                    .entry(key)
                    .or_default()
                    .entry(version)
                    .or_default()
                    .add(&usage);
            }
            return Err(err);
        }
        let mut flushed = self.flushed_usage.lock();
        for (key, version, usage) in &batch {
            let total = flushed
                .entry(ObjectId::new(key.clone(), *version))
                .or_default();
            total.0 += usage.wraps;
            total.1 += usage.unwraps;
        }
        Ok(batch.len())
    }

    /// This daemon's wraps and unwraps of each version of the keys that exist now, since it
    /// started, as of the last flush (the per-version metrics: a version's series ends with
    /// the version, or its key).
    pub fn flushed_usage(&self) -> Vec<(KeyId, u32, u64, u64)> {
        let mut flushed = self.flushed_usage.lock();
        let view = self.read_view();
        flushed.retain(|object, _| {
            view.keys.get(&object.key_id).is_some_and(|k| {
                k.versions
                    .iter()
                    .any(|v| v.version == object.version && v.destroyed_at.is_none())
            })
        });
        let mut out: Vec<_> = flushed
            .iter()
            .map(|(o, (w, u))| (o.key_id.clone(), o.version, *w, *u))
            .collect();
        out.sort();
        out
    }

    /// The usage of each of `key`'s versions: the store's, with this daemon's counts not yet
    /// flushed added. Versions never used have the default (zero) usage.
    pub fn version_usage(&self, key: &KeyRecord) -> Result<BTreeMap<u32, VersionUsage>> {
        let mut usage: BTreeMap<u32, VersionUsage> = key
            .versions
            .iter()
            .map(|v| (v.version, VersionUsage::default()))
            .collect();
        for (version, recorded) in self.store.usage(&key.id)? {
            if let Some(entry) = usage.get_mut(&version) {
                entry.add(&recorded);
            }
        }
        if let Some(unflushed) = self.usage.lock().get(&key.id) {
            for (version, entry) in usage.iter_mut() {
                if let Some(more) = unflushed.get(version) {
                    entry.add(more);
                }
            }
        }
        Ok(usage)
    }
}
