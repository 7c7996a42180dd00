//! Version usage: every wrap and unwrap a caller makes is counted in memory per key version
//! (with its first and last use), and the counts are added to the metadata store in batches
//! ([`Keystore::flush_usage`], every few seconds and at shutdown), so that no call waits for a
//! store write and a fleet's store holds the sum of its daemons' counts. The health probe's
//! calls are not counted: they are the daemon's, not a caller's.
//!
//! The counts are evidence for an operator deciding whether a version is still needed, not a
//! guarantee: a daemon killed before its flush loses its last few seconds of counts (its
//! last use may be later than the store says), and a store writer can change them.

use super::*;

impl Keystore {
    /// Counts one use of `version` of `key` now: a wrap, or an unwrap.
    pub(super) fn record_use(&self, key: &KeyId, version: u32, wrap: bool) {
        // At the store's precision, so that a use reads the same before and after a flush.
        let now = metadata::from_millis(metadata::to_millis(self.clock.now()));
        let mut pending = self.usage.lock();
        let entry = pending.entry((key.clone(), version)).or_default();
        if wrap {
            entry.wraps += 1;
        } else {
            entry.unwraps += 1;
        }
        entry.add(&VersionUsage {
            first_used: Some(now),
            last_used: Some(now),
            ..VersionUsage::default()
        });
    }

    /// Adds the counts since the last flush to the store; how many versions they were for.
    /// If the store fails, the counts are kept for the next flush.
    pub fn flush_usage(&self) -> Result<usize> {
        let batch: Vec<(KeyId, u32, VersionUsage)> = std::mem::take(&mut *self.usage.lock())
            .into_iter()
            .map(|((key, version), usage)| (key, version, usage))
            .collect();
        if batch.is_empty() {
            return Ok(0);
        }
        if let Err(err) = self.store.add_usage(&batch) {
            let mut pending = self.usage.lock();
            for (key, version, usage) in batch {
                pending.entry((key, version)).or_default().add(&usage);
            }
            return Err(err);
        }
        Ok(batch.len())
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
        let pending = self.usage.lock();
        for (version, entry) in usage.iter_mut() {
            if let Some(unflushed) = pending.get(&(key.id.clone(), *version)) {
                entry.add(unflushed);
            }
        }
        Ok(usage)
    }
}
