//! Tickets: what wrapd records in the token, out of the metadata store's reach, so that
//! nobody who can only write the store can make a daemon destroy key material.
//!
//! A ticket is a token object with no use at all (an AES key no mechanism may use) whose
//! `CKA_ID` is its content, found by its label: like an import token's wrapping key, it needs
//! no table, and every daemon of a fleet on the same HSM sees it. Only audited calls make
//! tickets: ScheduleKeyDeletion makes a deletion ticket, ImportKeyMaterial with an expiry an
//! expiry ticket; CancelKeyDeletion, a re-import without expiry and a carried-out destruction
//! remove them. A key's objects are destroyed only when its ticket is due *and* the store
//! agrees: either one can hold a destruction back, neither can cause one alone.

use crate::ids::KeyId;

/// A record in the token (see the module docs).
#[derive(Debug, Clone, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum Ticket {
    /// ScheduleKeyDeletion: the key's objects may be destroyed from `due` (Unix seconds).
    Deletion {
        /// The key.
        key_id: KeyId,
        /// When, in Unix seconds.
        due: u64,
    },
    /// ImportKeyMaterial with an expiry: the material may be destroyed from `due`.
    Expiry {
        /// The key.
        key_id: KeyId,
        /// When, in Unix seconds.
        due: u64,
    },
    /// The store's pending deletions and expiries were adopted as tickets, once, when a
    /// release with tickets first started on this token (see `Keystore::open`).
    Adopted,
}

impl Ticket {
    /// The `CKA_LABEL` of every ticket.
    pub const LABEL: &'static [u8] = b"wrapd ticket";
    const ADOPTED: &'static str = "ticket:adopted:v1";

    /// The key a deletion or expiry ticket is about.
    pub fn key_id(&self) -> Option<&KeyId> {
        match self {
            Self::Deletion { key_id, .. } | Self::Expiry { key_id, .. } => Some(key_id),
            Self::Adopted => None,
        }
    }

    /// The `CKA_ID`.
    pub fn to_bytes(&self) -> Vec<u8> {
        match self {
            Self::Deletion { key_id, due } => format!("ticket:delete:{key_id}:{due}"),
            Self::Expiry { key_id, due } => format!("ticket:expire:{key_id}:{due}"),
            Self::Adopted => Self::ADOPTED.to_owned(),
        }
        .into_bytes()
    }

    /// Parses a `CKA_ID`; `None` for anything else.
    pub fn parse(bytes: &[u8]) -> Option<Self> {
        let text = std::str::from_utf8(bytes).ok()?;
        if text == Self::ADOPTED {
            return Some(Self::Adopted);
        }
        let (kind, rest) = text.strip_prefix("ticket:")?.split_once(':')?;
        let (key, due) = rest.rsplit_once(':')?;
        let (key_id, due) = (KeyId::parse(key).ok()?, due.parse().ok()?);
        match kind {
            "delete" => Some(Self::Deletion { key_id, due }),
            "expire" => Some(Self::Expiry { key_id, due }),
            _ => None,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::hsm::{ObjectId, WrappingKeyId};

    #[test]
    fn tickets_round_trip_and_are_never_taken_for_key_objects_or_import_tokens() {
        let key_id = KeyId::generate();
        for ticket in [
            Ticket::Deletion {
                key_id: key_id.clone(),
                due: 1_800_000_000,
            },
            Ticket::Expiry { key_id, due: 7 },
            Ticket::Adopted,
        ] {
            let bytes = ticket.to_bytes();
            assert_eq!(Ticket::parse(&bytes), Some(ticket));
            assert!(ObjectId::from_cka_id(&bytes).is_none());
            assert!(WrappingKeyId::parse(&bytes).is_none());
        }
        assert_eq!(Ticket::parse(b"ticket:delete:key/x:1"), None);
        assert_eq!(Ticket::parse(b"import:whatever"), None);
    }
}
