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
//!
//! Three more kinds keep a store writer from widening what a key may be used for or by whom:
//! a *hold* (DisableKey, ScheduleKeyDeletion; removed by EnableKey) keeps a key unusable
//! whatever state the store gives it, and an *alias* ticket (CreateAlias, UpdateAlias;
//! removed by UpdateAlias and DeleteAlias) is what makes an alias row name a key at all; a
//! *retired* ticket (RetireKeyVersion; removed by RestoreKeyVersion) keeps a version from
//! unwrapping whatever the store says of it. A *version destruction* ticket
//! (ScheduleKeyVersionDestruction; removed by CancelKeyVersionDestruction and once carried
//! out) is to one retired version what a deletion ticket is to a key.

use sha2::{Digest, Sha256};

use crate::ids::{AliasName, KeyId};

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
    /// DisableKey or ScheduleKeyDeletion, and no EnableKey since: the key is not usable,
    /// whatever state the store gives it.
    Hold {
        /// The key.
        key_id: KeyId,
    },
    /// CreateAlias or UpdateAlias pointed the alias at the key (and nothing has moved or
    /// deleted it since): an alias row the token has no such ticket for names nothing.
    Alias {
        /// SHA-256 of the alias name: a `CKA_ID` of bounded length whatever the name.
        name_digest: [u8; 32],
        /// The key.
        key_id: KeyId,
    },
    /// RetireKeyVersion, and no RestoreKeyVersion since: the version unwraps nothing,
    /// whatever the store says of it.
    Retired {
        /// The key.
        key_id: KeyId,
        /// The version.
        version: u32,
    },
    /// ScheduleKeyVersionDestruction: the retired version's object may be destroyed from
    /// `due` (Unix seconds).
    VersionDestruction {
        /// The key.
        key_id: KeyId,
        /// The version.
        version: u32,
        /// When, in Unix seconds.
        due: u64,
    },
    /// The store's pending deletions and expiries were adopted as tickets, once, when a
    /// release with tickets first started on this token (see `Keystore::open`).
    Adopted,
    /// The store's disabled keys and aliases were adopted as holds and alias tickets, once,
    /// when a release with them first started on this token.
    AdoptedHoldsAndAliases,
}

impl Ticket {
    /// The `CKA_LABEL` of every ticket.
    pub const LABEL: &'static [u8] = b"wrapd ticket";
    const ADOPTED: &'static str = "ticket:adopted:v1";
    const ADOPTED_HOLDS_AND_ALIASES: &'static str = "ticket:adopted:holds-aliases:v1";

    /// The ticket that lets `alias` name `key_id`.
    pub fn alias(alias: &AliasName, key_id: &KeyId) -> Self {
        Self::Alias {
            name_digest: Self::alias_digest(alias),
            key_id: key_id.clone(),
        }
    }

    /// What an alias ticket records of the alias's name.
    pub fn alias_digest(alias: &AliasName) -> [u8; 32] {
        Sha256::digest(alias.as_str().as_bytes()).into()
    }

    /// The key this ticket lets the alias of `alias_digest` name, if it is one of its.
    pub fn names_for(&self, alias_digest: &[u8; 32]) -> Option<&KeyId> {
        match self {
            Self::Alias {
                name_digest,
                key_id,
            } if name_digest == alias_digest => Some(key_id),
            _ => None,
        }
    }

    /// The key a ticket is about (`None` for the adoption markers).
    pub fn key_id(&self) -> Option<&KeyId> {
        match self {
            Self::Deletion { key_id, .. }
            | Self::Expiry { key_id, .. }
            | Self::Hold { key_id }
            | Self::Retired { key_id, .. }
            | Self::VersionDestruction { key_id, .. }
            | Self::Alias { key_id, .. } => Some(key_id),
            Self::Adopted | Self::AdoptedHoldsAndAliases => None,
        }
    }

    /// The `CKA_ID`.
    pub fn to_bytes(&self) -> Vec<u8> {
        match self {
            Self::Deletion { key_id, due } => format!("ticket:delete:{key_id}:{due}"),
            Self::Expiry { key_id, due } => format!("ticket:expire:{key_id}:{due}"),
            Self::Hold { key_id } => format!("ticket:hold:{key_id}"),
            Self::Retired { key_id, version } => format!("ticket:retired:{key_id}:{version}"),
            Self::VersionDestruction {
                key_id,
                version,
                due,
            } => format!("ticket:destroy-version:{key_id}:{version}:{due}"),
            Self::Alias {
                name_digest,
                key_id,
            } => format!("ticket:alias:{}:{key_id}", hex::encode(name_digest)),
            Self::Adopted => Self::ADOPTED.to_owned(),
            Self::AdoptedHoldsAndAliases => Self::ADOPTED_HOLDS_AND_ALIASES.to_owned(),
        }
        .into_bytes()
    }

    /// Parses a `CKA_ID`; `None` for anything else.
    pub fn parse(bytes: &[u8]) -> Option<Self> {
        let text = std::str::from_utf8(bytes).ok()?;
        match text {
            Self::ADOPTED => return Some(Self::Adopted),
            Self::ADOPTED_HOLDS_AND_ALIASES => return Some(Self::AdoptedHoldsAndAliases),
            _ => {}
        }
        let (kind, rest) = text.strip_prefix("ticket:")?.split_once(':')?;
        match kind {
            "hold" => Some(Self::Hold {
                key_id: KeyId::parse(rest).ok()?,
            }),
            "alias" => {
                let (digest, key) = rest.split_once(':')?;
                let mut name_digest = [0u8; 32];
                hex::decode_to_slice(digest, &mut name_digest).ok()?;
                Some(Self::Alias {
                    name_digest,
                    key_id: KeyId::parse(key).ok()?,
                })
            }
            "retired" => {
                let (key, version) = rest.rsplit_once(':')?;
                Some(Self::Retired {
                    key_id: KeyId::parse(key).ok()?,
                    version: version.parse().ok()?,
                })
            }
            "destroy-version" => {
                let (rest, due) = rest.rsplit_once(':')?;
                let (key, version) = rest.rsplit_once(':')?;
                Some(Self::VersionDestruction {
                    key_id: KeyId::parse(key).ok()?,
                    version: version.parse().ok()?,
                    due: due.parse().ok()?,
                })
            }
            "delete" | "expire" => {
                let (key, due) = rest.rsplit_once(':')?;
                let (key_id, due) = (KeyId::parse(key).ok()?, due.parse().ok()?);
                Some(if kind == "delete" {
                    Self::Deletion { key_id, due }
                } else {
                    Self::Expiry { key_id, due }
                })
            }
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
            Ticket::Expiry {
                key_id: key_id.clone(),
                due: 7,
            },
            Ticket::Hold {
                key_id: key_id.clone(),
            },
            Ticket::alias(&AliasName::parse("alias/app").unwrap(), &key_id),
            Ticket::Retired {
                key_id: key_id.clone(),
                version: 3,
            },
            Ticket::VersionDestruction {
                key_id: key_id.clone(),
                version: 2,
                due: 1_800_000_000,
            },
            Ticket::Adopted,
            Ticket::AdoptedHoldsAndAliases,
        ] {
            let bytes = ticket.to_bytes();
            assert_eq!(Ticket::parse(&bytes), Some(ticket));
            assert!(ObjectId::from_cka_id(&bytes).is_none());
            assert!(WrappingKeyId::parse(&bytes).is_none());
        }
        assert_eq!(Ticket::parse(b"ticket:delete:key/x:1"), None);
        assert_eq!(Ticket::parse(b"import:whatever"), None);
        assert_eq!(Ticket::parse(b"ticket:hold:key/x"), None);
        assert_eq!(Ticket::parse(b"ticket:destroy-version:key/x:1"), None);
        assert_eq!(Ticket::parse(b"ticket:alias:00:key/x"), None);
    }
}
