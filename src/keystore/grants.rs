//! A key's grants: added and removed in the store first, then in the view, like every
//! other change of a key's metadata. What a grant permits is [`crate::grant`]'s; who may
//! add or remove one is the operation layer's.

use super::*;
use crate::grant::Grant;

impl Keystore {
    /// Adds a grant to a key that is not pending deletion (a retried grant of the same name
    /// and parameters answers with the grant made first). Returns the grant kept.
    pub fn add_grant(&self, key: &KeyRef, grant: Grant) -> Result<(Arc<KeyRecord>, Grant)> {
        let mut kept = None;
        let record = self.change_metadata(key, |store, key| {
            kept = Some(store.add_grant(&key.id, &grant)?);
            Ok(())
        })?;
        let kept = kept.ok_or_else(|| Error::Internal("grant not kept".into()))?;
        Ok((record, kept))
    }

    /// Removes a grant of a key, whatever the key's state; [`Error::KeyNotFound`] naming
    /// the grant if the key has no such grant.
    pub fn remove_grant(&self, key: &KeyId, grant_id: &str) -> Result<Arc<KeyRecord>> {
        let _admin = self.admin.lock();
        if !self.store.remove_grant(key, grant_id)? {
            return Err(Error::KeyNotFound(format!(
                "grant {grant_id} of key {key} does not exist"
            )));
        }
        self.refresh(key)?
            .ok_or_else(|| Error::KeyNotFound(key.to_string()))
    }

    /// The key `id` as the view has it, or, if that lacks the grant `grant_id` (made by
    /// another daemon of the fleet a moment ago: the caller holds its grant token), as the
    /// store has it, within the read-through budget: a key whose store record lacked a
    /// grant asked for is not read again for that reason for a second, whichever grant.
    pub fn with_grant(&self, id: &KeyId, grant_id: &str) -> Result<Arc<KeyRecord>> {
        let record = self.resolve(&KeyRef::Id(id.clone()))?;
        if record.grants.iter().any(|g| g.id == grant_id) {
            return Ok(record);
        }
        let name = format!("grants-of:{id}");
        let now = std::time::Instant::now();
        if !self.store.is_shared() || !self.read_through.may_ask(&name, now) {
            return Ok(record);
        }
        let fresh = self
            .refresh(id)?
            .ok_or_else(|| Error::KeyNotFound(id.to_string()))?;
        if !fresh.grants.iter().any(|g| g.id == grant_id) {
            self.read_through.missed(&name, now);
        }
        Ok(fresh)
    }
}
