//! The key store's side of tickets (`crate::hsm::Ticket`): key material is destroyed only
//! when the token's record of an audited call says it is due, never on the metadata store's
//! word alone.
//!
//! Scheduling a deletion and importing material with an expiry record a ticket before the
//! store changes; cancelling and re-importing without expiry remove it first. Maintenance
//! destroys a key (or imported material) only when its latest ticket of that kind is due and
//! the store agrees. A ticket whose key the store no longer shows pending is dropped: that
//! only gives up a destruction. The first time a release with tickets starts on a token, the
//! deletions and expiries pending in the store become tickets, due no sooner than
//! [`ADOPTION_FLOOR`] from then (trust on first use; the [`Ticket::Adopted`] marker keeps a
//! later store edit from being adopted).
//!
//! Holds and alias tickets are laid over every record read from the store before the view,
//! a listing or a policy check sees it ([`Anchors`]): a key with a hold is disabled even if
//! the store says enabled, and an alias row names its key only if the token holds the
//! ticket CreateAlias or UpdateAlias made for that pair. A store writer can still make keys
//! unusable or aliases vanish; it cannot make a key usable, or give it a name (and with it
//! the grants on that name), that no audited call did. These too are adopted from the store
//! once, at the first start of a release with them.

use std::collections::HashSet;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use super::metadata::KeyRecord;
use super::{KeyState, Keystore};
use crate::error::Result;
use crate::hsm::{Ticket, Token};
use crate::ids::{AliasName, KeyId};

/// The soonest a deletion or expiry adopted from the store at the first start can be
/// carried out (the shortest deletion window).
pub const ADOPTION_FLOOR: Duration = Duration::from_secs(7 * 86_400);

/// Seconds since the Unix epoch (0 before it).
pub(super) fn unix_seconds(t: SystemTime) -> u64 {
    t.duration_since(UNIX_EPOCH).map_or(0, |d| d.as_secs())
}

/// Which kind of ticket.
#[derive(Clone, Copy, PartialEq, Eq)]
pub(super) enum Kind {
    Deletion,
    Expiry,
}

impl Kind {
    fn due_of(self, ticket: &Ticket) -> Option<(&KeyId, u64)> {
        match (self, ticket) {
            (Self::Deletion, Ticket::Deletion { key_id, due })
            | (Self::Expiry, Ticket::Expiry { key_id, due }) => Some((key_id, *due)),
            _ => None,
        }
    }
}

/// The keys whose latest ticket of `kind` is due at `now` (Unix seconds).
pub(super) fn due_keys(tickets: &[Ticket], kind: Kind, now: u64) -> Vec<KeyId> {
    let mut latest: std::collections::BTreeMap<&KeyId, u64> = std::collections::BTreeMap::new();
    for (key_id, due) in tickets.iter().filter_map(|t| kind.due_of(t)) {
        let entry = latest.entry(key_id).or_insert(due);
        *entry = (*entry).max(due);
    }
    latest
        .into_iter()
        .filter(|(_, due)| *due <= now)
        .map(|(key_id, _)| key_id.clone())
        .collect()
}

/// Whether `id`'s latest ticket of `kind` is due at `now`.
pub(super) fn is_due(tickets: &[Ticket], kind: Kind, id: &KeyId, now: u64) -> bool {
    tickets
        .iter()
        .filter_map(|t| kind.due_of(t))
        .filter(|(key_id, _)| *key_id == id)
        .map(|(_, due)| due)
        .max()
        .is_some_and(|due| due <= now)
}

/// How many disagreements between the store and the token are remembered so that each is
/// logged once (beyond, they are no longer logged one by one: a store writer must not be
/// able to grow the log or the memory without bound; the metric
/// `wrapd_metadata_disagreements_total{kind}` counts every one).
const MAX_REPORTED: usize = 4096;

/// Beyond this many aliases, a record is checked against every ticket read at once.
const MAX_LOOKUPS_PER_RECORD: usize = 4;

/// The holds and alias tickets of the token, read at once for a pass over many records.
#[derive(Default)]
pub(super) struct Anchors {
    holds: HashSet<KeyId>,
    aliases: HashSet<Ticket>,
    retired: HashSet<(KeyId, u32)>,
}

impl Anchors {
    /// Every hold and alias ticket in `token`.
    pub(super) fn read(token: &dyn Token) -> Result<Self> {
        let mut anchors = Self::default();
        for ticket in token.tickets()? {
            match ticket {
                Ticket::Hold { key_id } => {
                    anchors.holds.insert(key_id);
                }
                Ticket::Alias { .. } => {
                    anchors.aliases.insert(ticket);
                }
                Ticket::Retired { key_id, version } => {
                    anchors.retired.insert((key_id, version));
                }
                _ => {}
            }
        }
        Ok(anchors)
    }
}

impl Keystore {
    /// Whether the token holds `id` (from `anchors` when given, else by asking the token).
    fn is_held(&self, id: &KeyId, anchors: Option<&Anchors>) -> Result<bool> {
        let hold = Ticket::Hold { key_id: id.clone() };
        match anchors {
            Some(anchors) => Ok(anchors.holds.contains(id)),
            None => self.token.has_ticket(&hold),
        }
    }

    /// Whether the token lets `alias` name `id`.
    fn names(&self, alias: &AliasName, id: &KeyId, anchors: Option<&Anchors>) -> Result<bool> {
        let ticket = Ticket::alias(alias, id);
        match anchors {
            Some(anchors) => Ok(anchors.aliases.contains(&ticket)),
            None => self.token.has_ticket(&ticket),
        }
    }

    /// Whether the token records `version` of `id` as retired.
    fn is_retired(&self, id: &KeyId, version: u32, anchors: Option<&Anchors>) -> Result<bool> {
        match anchors {
            Some(anchors) => Ok(anchors.retired.contains(&(id.clone(), version))),
            None => self.token.has_ticket(&Ticket::Retired {
                key_id: id.clone(),
                version,
            }),
        }
    }

    /// A record read from the store, as the token lets it stand: disabled if held, its
    /// versions retired if the token says so, and named only by the aliases the token records
    /// for it.
    pub(super) fn anchored(
        &self,
        mut record: KeyRecord,
        anchors: Option<&Anchors>,
    ) -> Result<KeyRecord> {
        // A record with many aliases reads every ticket once rather than asking per alias
        // (a store writer could add alias rows to make each refresh cost the HSM more).
        let read;
        let anchors = match anchors {
            None if record.aliases.len() > MAX_LOOKUPS_PER_RECORD => {
                read = Anchors::read(&*self.token)?;
                Some(&read)
            }
            anchors => anchors,
        };
        if record.state == KeyState::Enabled && self.is_held(&record.id, anchors)? {
            metrics::counter!("wrapd_metadata_disagreements_total", "kind" => "hold").increment(1);
            self.report(format!("hold {}", record.id), || {
                tracing::warn!(key_id = %record.id, "the metadata store shows this key enabled, but the token records it disabled (an edited or restored store?): it stays disabled until EnableKey");
            });
            record.state = KeyState::Disabled;
        }
        // Retired versions: the store's flag, or the token's ticket. Without the tickets at
        // hand, the token is asked only about a version this daemon's view holds retired and
        // the store no longer does (a RestoreKeyVersion, or an edited store): every other
        // version would cost a token call per refresh for nothing.
        let held_retired: HashSet<u32> = match anchors {
            Some(_) => HashSet::new(),
            None => self
                .read_view()
                .keys
                .get(&record.id)
                .map(|k| {
                    k.versions
                        .iter()
                        .filter(|v| v.retired)
                        .map(|v| v.version)
                        .collect()
                })
                .unwrap_or_default(),
        };
        for version in &mut record.versions {
            let ask = anchors.is_some() || held_retired.contains(&version.version);
            if !version.retired && ask && self.is_retired(&record.id, version.version, anchors)? {
                metrics::counter!("wrapd_metadata_disagreements_total", "kind" => "retired")
                    .increment(1);
                self.report(format!("retired {} {}", record.id, version.version), || {
                    tracing::warn!(key_id = %record.id, version = version.version, "the metadata store shows this version in use, but the token records it retired (an edited or restored store?): it stays retired until RestoreKeyVersion");
                });
                version.retired = true;
            }
        }
        let mut names = Vec::with_capacity(record.aliases.len());
        for alias in std::mem::take(&mut record.aliases) {
            if self.names(&alias, &record.id, anchors)? {
                names.push(alias);
            } else {
                self.report_unanchored_alias(&alias, &record.id);
            }
        }
        record.aliases = names;
        Ok(record)
    }

    /// The alias rows the token lets stand.
    pub(super) fn anchored_aliases(
        &self,
        rows: Vec<(AliasName, KeyId)>,
        anchors: Option<&Anchors>,
    ) -> Result<Vec<(AliasName, KeyId)>> {
        let mut kept = Vec::with_capacity(rows.len());
        for (alias, id) in rows {
            if self.names(&alias, &id, anchors)? {
                kept.push((alias, id));
            } else {
                self.report_unanchored_alias(&alias, &id);
            }
        }
        Ok(kept)
    }

    fn report_unanchored_alias(&self, alias: &AliasName, id: &KeyId) {
        metrics::counter!("wrapd_metadata_disagreements_total", "kind" => "alias").increment(1);
        self.report(format!("alias {alias} {id}"), || {
            tracing::warn!(alias = %alias, key_id = %id, "the metadata store points this alias at this key, but no CreateAlias or UpdateAlias did (an edited or restored store?): the alias names nothing");
        });
    }

    /// Runs `log` the first time this process meets `disagreement` (see [`MAX_REPORTED`]).
    fn report(&self, disagreement: String, log: impl FnOnce()) {
        let mut reported = self.reported.lock();
        if reported.len() < MAX_REPORTED && reported.insert(disagreement) {
            log();
        }
    }

    /// At the first start of a release with holds and alias tickets on this token: the
    /// store's disabled and pending-deletion keys get holds and its aliases get tickets, as
    /// they stand (trust on first use; the marker keeps a later store edit from being
    /// adopted). Runs before the view is first read, from the store itself.
    pub(super) fn adopt_holds_and_aliases_once(&self) -> Result<()> {
        if self.token.has_ticket(&Ticket::AdoptedHoldsAndAliases)? {
            return Ok(());
        }
        let mut holds = 0usize;
        for key in self.store.all_keys()? {
            if matches!(key.state, KeyState::Disabled | KeyState::PendingDeletion) {
                self.token.create_ticket(&Ticket::Hold { key_id: key.id })?;
                holds += 1;
            }
        }
        let aliases = self.store.all_aliases()?;
        for (alias, id) in &aliases {
            self.token.create_ticket(&Ticket::alias(alias, id))?;
        }
        if holds + aliases.len() > 0 {
            tracing::warn!(
                holds,
                aliases = aliases.len(),
                "the disabled keys and the aliases of the metadata store are recorded in the token (first start of a release with holds and alias tickets)"
            );
        }
        self.token.create_ticket(&Ticket::AdoptedHoldsAndAliases)
    }

    /// Destroys `id`'s tickets of `kind` (every kind: `None`) that `keep` does not keep.
    pub(super) fn destroy_tickets(
        &self,
        id: &KeyId,
        kind: Option<Kind>,
        keep: impl Fn(&Ticket) -> bool,
    ) -> Result<()> {
        for ticket in self.token.tickets()? {
            let of_kind = match kind {
                Some(kind) => kind.due_of(&ticket).is_some(),
                None => true,
            };
            if ticket.key_id() == Some(id) && of_kind && !keep(&ticket) {
                self.token.destroy_ticket(&ticket)?;
            }
        }
        Ok(())
    }

    /// At the first start of a release with tickets on this token: the store's pending
    /// deletions and expiries become tickets, due no sooner than [`ADOPTION_FLOOR`] from
    /// now (see the module docs). Daemons of a fleet starting at once make identical
    /// tickets: harmless.
    pub(super) fn adopt_tickets_once(&self) -> Result<()> {
        if self.token.tickets()?.contains(&Ticket::Adopted) {
            return Ok(());
        }
        let floor = unix_seconds(self.clock.now() + ADOPTION_FLOOR);
        for key in self.keys() {
            if let (KeyState::PendingDeletion, Some(date)) = (key.state, key.deletion_date) {
                let due = unix_seconds(date).max(floor);
                tracing::warn!(key_id = %key.id, due, "a deletion pending in the metadata store is recorded in the token (first start of a release with tickets)");
                self.token.create_ticket(&Ticket::Deletion {
                    key_id: key.id.clone(),
                    due,
                })?;
            }
            let expiry = key
                .material
                .as_ref()
                .filter(|m| m.present)
                .and_then(|m| m.valid_to);
            if let Some(valid_to) = expiry {
                self.token.create_ticket(&Ticket::Expiry {
                    key_id: key.id.clone(),
                    due: unix_seconds(valid_to).max(floor),
                })?;
            }
        }
        self.token.create_ticket(&Ticket::Adopted)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::context::EncryptionContext;
    use crate::error::{Error, ErrorKind};
    use crate::hsm::memory::MemoryToken;
    use crate::ids::KeyRef;
    use crate::keystore::metadata::MetadataStore;
    use crate::keystore::sqlite::SqliteStore;
    use crate::keystore::{KeystoreConfig, ManualClock};
    use std::sync::Arc;

    fn open(token: &Arc<MemoryToken>, store: &Arc<SqliteStore>) -> Keystore {
        Keystore::open(
            token.clone(),
            store.clone(),
            Arc::new(ManualClock::new(SystemTime::now())),
            KeystoreConfig::default(),
        )
        .unwrap()
    }

    fn fresh() -> (Keystore, Arc<MemoryToken>, Arc<SqliteStore>) {
        let token = Arc::new(MemoryToken::default());
        let store = Arc::new(SqliteStore::in_memory().unwrap());
        (open(&token, &store), token, store)
    }

    fn alias(name: &str) -> AliasName {
        AliasName::parse(name).unwrap()
    }

    fn wraps(ks: &Keystore, key: &KeyRef) -> Result<()> {
        let ctx = EncryptionContext::default();
        ks.wrap(key, b"x", &ctx).map(|_| ())
    }

    #[test]
    fn a_key_enabled_only_in_the_store_stays_disabled() {
        let (ks, _, store) = fresh();
        let id = ks.create_key("", None).unwrap().id.clone();
        let key = KeyRef::Id(id.clone());
        ks.disable_key(&key).unwrap();
        store.set_state(&id, KeyState::Enabled, None).unwrap();
        ks.resync().unwrap();
        assert!(matches!(wraps(&ks, &key), Err(Error::Disabled(_))));
        assert_eq!(ks.resolve(&key).unwrap().state, KeyState::Disabled);
        let listed = ks.list_keys(0, "").unwrap().items;
        assert_eq!(listed[0].state, KeyState::Disabled);
        // EnableKey, the audited call, is what makes it usable again.
        ks.enable_key(&key).unwrap();
        wraps(&ks, &key).unwrap();
    }

    #[test]
    fn a_version_restored_only_in_the_store_stays_retired() {
        let (ks, token, store) = fresh();
        let key = ks.create_key("k", None).unwrap();
        let id = KeyRef::Id(key.id.clone());
        let ctx = EncryptionContext::default();
        let old = ks.wrap(&id, b"data", &ctx).unwrap();
        ks.rotate_key(&id).unwrap();
        assert_eq!(
            ks.retire_version(&id, 2).unwrap_err().kind(),
            ErrorKind::WrongState,
            "the current version cannot be retired"
        );
        ks.retire_version(&id, 1).unwrap();
        let err = ks.unwrap(&old.blob, &ctx, None).unwrap_err();
        assert_eq!(err.kind(), ErrorKind::WrongState);
        assert!(
            err.to_string().contains("version 1") && err.to_string().contains("RestoreKeyVersion")
        );
        // A store writer puts the version back in use: the token's ticket keeps it retired,
        // on this daemon's refresh and after a restart alike.
        store.set_version_retired(&key.id, 1, false).unwrap();
        ks.refresh(&key.id).unwrap();
        assert_eq!(
            ks.unwrap(&old.blob, &ctx, None).unwrap_err().kind(),
            ErrorKind::WrongState
        );
        let reopened = open(&token, &store);
        assert_eq!(
            reopened.unwrap(&old.blob, &ctx, None).unwrap_err().kind(),
            ErrorKind::WrongState
        );
        // RestoreKeyVersion brings it back; new wraps were never affected.
        reopened.wrap(&id, b"new", &ctx).unwrap();
        reopened.restore_version(&id, 1).unwrap();
        assert_eq!(
            &*reopened.unwrap(&old.blob, &ctx, None).unwrap().plaintext,
            b"data"
        );
        assert_eq!(
            reopened.retire_version(&id, 9).unwrap_err().kind(),
            ErrorKind::NotFound
        );
    }

    #[test]
    fn a_deletion_cancelled_only_in_the_store_leaves_the_key_unusable() {
        let (ks, token, store) = fresh();
        let id = ks.create_key("", None).unwrap().id.clone();
        let key = KeyRef::Id(id.clone());
        ks.schedule_deletion(&key, 7).unwrap();
        store.set_state(&id, KeyState::Enabled, None).unwrap();
        // A daemon started afterwards reads the store edit: the hold still stands.
        let restarted = open(&token, &store);
        assert!(matches!(wraps(&restarted, &key), Err(Error::Disabled(_))));
    }

    #[test]
    fn an_alias_written_only_in_the_store_names_nothing() {
        let (ks, _, store) = fresh();
        let payments = ks.create_key("", Some(&alias("alias/payments"))).unwrap();
        let other = ks.create_key("", None).unwrap().id.clone();
        // The writer adds a name under a glob someone is granted, and moves another.
        store
            .create_alias(&alias("alias/payments-x"), &other)
            .unwrap();
        store
            .update_alias(&alias("alias/payments"), &other)
            .unwrap();
        ks.resync().unwrap();
        for name in ["alias/payments-x", "alias/payments"] {
            let found = ks.resolve(&KeyRef::Alias(alias(name)));
            assert!(matches!(found, Err(Error::AliasNotFound(_))), "{name}");
        }
        // The names a policy matches against do not include the forged ones.
        assert!(
            ks.resolve(&KeyRef::Id(other.clone()))
                .unwrap()
                .aliases
                .is_empty()
        );
        assert!(ks.list_aliases(None, 0, "").unwrap().items.is_empty());
        // Put back as CreateAlias left it, the alias names its key again.
        store
            .update_alias(&alias("alias/payments"), &payments.id)
            .unwrap();
        ks.resync().unwrap();
        let resolved = ks.resolve(&KeyRef::Alias(alias("alias/payments"))).unwrap();
        assert_eq!(resolved.id, payments.id);
    }

    #[test]
    fn an_alias_moved_by_update_alias_cannot_be_pointed_back_in_the_store() {
        let (ks, _, store) = fresh();
        let name = alias("alias/app");
        let first = ks.create_key("", Some(&name)).unwrap().id.clone();
        let second = ks.create_key("", None).unwrap().id.clone();
        ks.update_alias(&name, &KeyRef::Id(second.clone())).unwrap();
        store.update_alias(&name, &first).unwrap();
        ks.resync().unwrap();
        assert!(matches!(
            ks.resolve(&KeyRef::Alias(name.clone())),
            Err(Error::AliasNotFound(_))
        ));
        // UpdateAlias puts it right; a deleted alias cannot be brought back either.
        ks.update_alias(&name, &KeyRef::Id(second.clone())).unwrap();
        let resolved = ks.resolve(&KeyRef::Alias(name.clone())).unwrap();
        assert_eq!(resolved.id, second);
        ks.delete_alias(&name).unwrap();
        store.create_alias(&name, &second).unwrap();
        ks.resync().unwrap();
        assert!(matches!(
            ks.resolve(&KeyRef::Alias(name)),
            Err(Error::AliasNotFound(_))
        ));
    }

    #[test]
    fn a_name_whose_row_a_writer_removed_is_not_free_until_deleted() {
        let (ks, _, store) = fresh();
        let name = alias("alias/app");
        let first = ks.create_key("", Some(&name)).unwrap().id.clone();
        let second = KeyRef::Id(ks.create_key("", None).unwrap().id.clone());
        store.delete_alias(&name).unwrap();
        ks.resync().unwrap();
        // The token still records the name: it is not taken over by a create.
        let taken = ks.create_alias(&name, &second);
        assert!(matches!(taken, Err(Error::AlreadyExists(_))), "{taken:?}");
        assert_eq!(ks.alias_ticket_keys(&name).unwrap(), vec![first.clone()]);
        // DeleteAlias (audited, and checked on the recorded key) frees it.
        assert_eq!(ks.delete_alias(&name).unwrap().1, first);
        ks.create_alias(&name, &second).unwrap();
    }

    #[test]
    fn disabled_keys_and_aliases_from_before_the_upgrade_are_adopted_once() {
        // A store and token written by a release without holds and alias tickets.
        let (old, token, store) = fresh();
        let named = old
            .create_key("", Some(&alias("alias/app")))
            .unwrap()
            .id
            .clone();
        let disabled = old.create_key("", None).unwrap().id.clone();
        drop(old);
        store
            .set_state(&disabled, KeyState::Disabled, None)
            .unwrap();
        let fresh_token = Arc::new(MemoryToken::default());
        for object in token.list_keys().unwrap() {
            fresh_token.generate_key(&object).unwrap();
        }
        let upgraded = open(&fresh_token, &store);
        let resolved = upgraded
            .resolve(&KeyRef::Alias(alias("alias/app")))
            .unwrap();
        assert_eq!(resolved.id, named);
        // Adopted as disabled: enabling it in the store alone does nothing.
        store.set_state(&disabled, KeyState::Enabled, None).unwrap();
        store
            .create_alias(&alias("alias/later"), &disabled)
            .unwrap();
        drop(upgraded);
        let again = open(&fresh_token, &store);
        let key = KeyRef::Id(disabled);
        assert!(matches!(wraps(&again, &key), Err(Error::Disabled(_))));
        assert!(matches!(
            again.resolve(&KeyRef::Alias(alias("alias/later"))),
            Err(Error::AliasNotFound(_))
        ));
    }

    #[test]
    fn a_key_is_due_only_when_its_latest_ticket_is() {
        let (a, b) = (KeyId::generate(), KeyId::generate());
        let tickets = [
            Ticket::Deletion {
                key_id: a.clone(),
                due: 10,
            },
            Ticket::Deletion {
                key_id: a.clone(),
                due: 30,
            },
            Ticket::Deletion {
                key_id: b.clone(),
                due: 10,
            },
            Ticket::Expiry {
                key_id: b.clone(),
                due: 50,
            },
            Ticket::Adopted,
        ];
        assert_eq!(due_keys(&tickets, Kind::Deletion, 20), vec![b.clone()]);
        assert!(!is_due(&tickets, Kind::Deletion, &a, 20));
        assert!(is_due(&tickets, Kind::Deletion, &a, 30));
        assert!(due_keys(&tickets, Kind::Expiry, 49).is_empty());
        assert_eq!(due_keys(&tickets, Kind::Expiry, 50), vec![b]);
    }
}
