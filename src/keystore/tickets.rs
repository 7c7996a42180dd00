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

use std::time::{Duration, SystemTime, UNIX_EPOCH};

use super::{KeyState, Keystore};
use crate::error::Result;
use crate::hsm::Ticket;
use crate::ids::KeyId;

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

impl Keystore {
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
