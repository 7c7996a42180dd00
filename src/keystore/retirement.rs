//! Retiring a key version (RetireKeyVersion) and restoring it (RestoreKeyVersion): a retired
//! version unwraps nothing (blobs, re-wrap sources, XKS ciphertexts), with an error naming
//! the version and how to restore it; new wraps never use it, since the current version
//! cannot be retired. The token records the retirement (a *retired* ticket) before the store
//! does, so that a store writer can never put a retired version back in use; the store's
//! flag tells the other daemons of a fleet and shows the state.

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
            // The ticket first, then the store once: the fleet, told by the write, reads a
            // version the token no longer holds retired. If the write fails, the store still
            // says retired, and so does every view.
            self.token.destroy_ticket(&ticket)?;
            self.store.set_version_retired(&record.id, version, false)?;
        }
        tracing::info!(key_id = %record.id, version, retired, "key version retirement changed");
        self.refresh(&record.id)?
            .ok_or_else(|| Error::Internal("key vanished after a version change".into()))
    }
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
