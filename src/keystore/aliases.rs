//! Aliases: each change records its ticket in the token first, so that an alias row the
//! token does not back names no key (`tickets.rs`).

use super::*;

impl Keystore {
    /// Creates an alias for a key.
    pub fn create_alias(&self, alias: &AliasName, key: &KeyRef) -> Result<(AliasName, KeyId)> {
        let _admin = self.admin.lock();
        let key = self.resolve(key)?;
        // The ticket before the row: a row without its ticket names nothing.
        self.make_alias_ticket(alias, &key.id, |store| store.create_alias(alias, &key.id))?;
        self.refresh_aliases()?;
        self.refresh(&key.id)?;
        Ok((alias.clone(), key.id.clone()))
    }

    /// Points an existing alias at another key.
    pub fn update_alias(&self, alias: &AliasName, key: &KeyRef) -> Result<(AliasName, KeyId)> {
        let _admin = self.admin.lock();
        let key = self.resolve(key)?;
        // The row's own target, not the view's: the view leaves out a row without its ticket.
        let old = self.store.alias(alias)?;
        self.make_alias_ticket(alias, &key.id, |store| store.update_alias(alias, &key.id))?;
        if let Some(old) = old.as_ref().filter(|old| **old != key.id) {
            // The former target's ticket goes, so that no store edit can point the alias back.
            self.token.destroy_ticket(&Ticket::alias(alias, old))?;
        }
        self.refresh_aliases()?;
        if let Some(old) = old {
            self.refresh(&old)?;
        }
        self.refresh(&key.id)?;
        Ok((alias.clone(), key.id.clone()))
    }

    /// Deletes an alias, returning the key it pointed at.
    pub fn delete_alias(&self, alias: &AliasName) -> Result<(AliasName, KeyId)> {
        let _admin = self.admin.lock();
        // The ticket first: once it is gone, the alias names nothing, whatever the store says.
        if let Some(current) = self.store.alias(alias)? {
            self.token.destroy_ticket(&Ticket::alias(alias, &current))?;
        }
        let key = self
            .store
            .delete_alias(alias)?
            .ok_or_else(|| Error::AliasNotFound(alias.to_string()))?;
        self.token.destroy_ticket(&Ticket::alias(alias, &key))?;
        self.refresh_aliases()?;
        self.refresh(&key)?;
        Ok((alias.clone(), key))
    }

    /// Records the ticket that lets `alias` name `id`, then runs `write` on the store; if the
    /// store refuses, a ticket made here is removed again.
    pub(super) fn make_alias_ticket(
        &self,
        alias: &AliasName,
        id: &KeyId,
        write: impl FnOnce(&dyn MetadataStore) -> Result<()>,
    ) -> Result<()> {
        let ticket = Ticket::alias(alias, id);
        let had = self.token.has_ticket(&ticket)?;
        self.token.create_ticket(&ticket)?;
        if let Err(err) = write(&*self.store) {
            if !had {
                if let Err(cleanup) = self.token.destroy_ticket(&ticket) {
                    tracing::warn!(alias = %alias, error = %cleanup, "could not remove the ticket of an alias change that was not recorded");
                }
            }
            return Err(err);
        }
        Ok(())
    }

    /// Aliases sorted by name, optionally only those of one key.
    pub fn list_aliases(
        &self,
        key: Option<&KeyRef>,
        page_size_requested: u32,
        page_token: &str,
    ) -> Result<Page<(AliasName, KeyId)>> {
        let limit = page_size(page_size_requested)?;
        let after = decode_page_token("a:", page_token)?;
        let key = key.map(|k| self.resolve(k)).transpose()?;
        let mut rows = self
            .store
            .list_aliases(key.as_ref().map(|k| &k.id), &after, limit + 1)?;
        let next_page_token = if rows.len() > limit {
            rows.truncate(limit);
            rows.last()
                .map(|(alias, _)| encode_page_token("a:", &Cursor(alias.as_str().to_owned())))
                .unwrap_or_default()
        } else {
            String::new()
        };
        let anchors = tickets::Anchors::read(&*self.token)?;
        Ok(Page {
            items: self.anchored_aliases(rows, Some(&anchors))?,
            next_page_token,
        })
    }
}
