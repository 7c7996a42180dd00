//! Aliases: each change records its ticket in the token first, so that an alias row the
//! token does not back names no key (`tickets.rs`). The token's tickets for a name are the
//! authority on it: an alias is created only when the token records none for the name (a
//! row a store writer removed does not free the name), and an update or a deletion removes
//! every ticket of the name but the new one (no former target can be pointed back at).

use super::*;

impl Keystore {
    /// Creates an alias for a key.
    pub fn create_alias(&self, alias: &AliasName, key: &KeyRef) -> Result<(AliasName, KeyId)> {
        let _admin = self.admin.lock();
        let key = self.resolve(key)?;
        self.refuse_recorded_alias(alias)?;
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
        // Every other ticket of the name goes, so that no store edit can point the alias back
        // at a former target.
        let former = self.destroy_alias_tickets(alias, Some(&key.id))?;
        self.refresh_aliases()?;
        for old in old.into_iter().chain(former) {
            self.refresh(&old)?;
        }
        self.refresh(&key.id)?;
        Ok((alias.clone(), key.id.clone()))
    }

    /// Deletes an alias, returning the key it pointed at.
    pub fn delete_alias(&self, alias: &AliasName) -> Result<(AliasName, KeyId)> {
        let _admin = self.admin.lock();
        // The tickets first: once they are gone, the alias names nothing, whatever the store
        // says. A name the token records without a row (a row a writer removed, a creation
        // that failed half-way) is deleted too, so that it can be created again.
        let recorded = self.destroy_alias_tickets(alias, None)?;
        let key = match (self.store.delete_alias(alias)?, recorded.first()) {
            (Some(key), _) => key,
            (None, Some(key)) => key.clone(),
            (None, None) => return Err(Error::AliasNotFound(alias.to_string())),
        };
        self.refresh_aliases()?;
        for id in recorded.iter().chain(std::iter::once(&key)) {
            self.refresh(id)?;
        }
        Ok((alias.clone(), key))
    }

    /// The keys the token records `alias` as naming: one, normally; none for a name that is
    /// free; more only after a change that failed half-way.
    pub fn alias_ticket_keys(&self, alias: &AliasName) -> Result<Vec<KeyId>> {
        let digest = Ticket::alias_digest(alias);
        Ok(self
            .token
            .tickets()?
            .iter()
            .filter_map(|t| t.names_for(&digest).cloned())
            .collect())
    }

    /// `AlreadyExists` if the token records the name (whatever the store says).
    pub(super) fn refuse_recorded_alias(&self, alias: &AliasName) -> Result<()> {
        if self.alias_ticket_keys(alias)?.is_empty() {
            Ok(())
        } else {
            Err(Error::AlreadyExists(format!(
                "alias {alias} already exists"
            )))
        }
    }

    /// Destroys every ticket of `alias` but `keep`'s; returns the keys they named.
    fn destroy_alias_tickets(&self, alias: &AliasName, keep: Option<&KeyId>) -> Result<Vec<KeyId>> {
        let mut destroyed = Vec::new();
        for id in self.alias_ticket_keys(alias)? {
            if Some(&id) != keep {
                self.token.destroy_ticket(&Ticket::alias(alias, &id))?;
                destroyed.push(id);
            }
        }
        Ok(destroyed)
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
