//! Names of keys: canonical key ids (`key/<32 hex>`) and aliases (`alias/NAME`).
//!
//! Parsed once at the edge ("parse, don't validate"), so the layers below only ever see
//! well-formed names.

use std::fmt;

use rand::RngCore;

use crate::error::{Error, Result};

/// A canonical key id: `key/` followed by 32 lowercase hex digits (128 random bits).
#[derive(Debug, Clone, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct KeyId(String);

impl KeyId {
    /// The prefix every key id starts with.
    pub const PREFIX: &'static str = "key/";

    /// A fresh random key id.
    pub fn generate() -> Self {
        let mut bytes = [0u8; 16];
        rand::rng().fill_bytes(&mut bytes);
        Self(format!("{}{}", Self::PREFIX, hex::encode(bytes)))
    }

    /// Parses a key id in its one canonical form, `key/` and 32 lowercase hex digits, as
    /// wrapd writes it (blobs, token objects, the store, tokens it issues); anything else is
    /// INVALID_ARGUMENT. Each key id has one encoding there, so that no stored byte string
    /// has a second form that parses to the same key.
    pub fn parse(s: &str) -> Result<Self> {
        let valid = s.strip_prefix(Self::PREFIX).is_some_and(|hex| {
            hex.len() == 32 && hex.bytes().all(|b| matches!(b, b'0'..=b'9' | b'a'..=b'f'))
        });
        if valid {
            Ok(Self(s.to_owned()))
        } else {
            Err(Error::invalid(format!(
                "malformed key id {:?}: expected key/<32 hex digits> or alias/NAME",
                truncate(s)
            )))
        }
    }

    /// Parses a key id as a caller may name a key: the canonical form, or the same 16 bytes
    /// written as a UUID (`key/1234abcd-12ab-34cd-56ef-1234567890ab`, as AWS KMS writes key
    /// ids), which is turned into the canonical form.
    pub fn parse_named(s: &str) -> Result<Self> {
        let uuid = s.strip_prefix(Self::PREFIX).filter(|id| {
            let dashes = [8, 13, 18, 23];
            id.len() == 36
                && id
                    .char_indices()
                    .all(|(i, c)| (c == '-') == dashes.contains(&i))
        });
        match uuid {
            Some(id) => Self::parse(&format!("{}{}", Self::PREFIX, id.replace('-', ""))),
            None => Self::parse(s),
        }
        .map_err(|_| {
            Error::invalid(format!(
                "malformed key id {:?}: expected key/<32 hex digits>, key/<UUID> or alias/NAME",
                truncate(s)
            ))
        })
    }

    /// The id's 16 bytes as a UUID (8-4-4-4-12 hex digits), as AWS KMS writes key ids.
    pub fn uuid(&self) -> String {
        let hex = &self.0[Self::PREFIX.len()..];
        format!(
            "{}-{}-{}-{}-{}",
            &hex[..8],
            &hex[8..12],
            &hex[12..16],
            &hex[16..20],
            &hex[20..]
        )
    }

    /// The id as text.
    pub fn as_str(&self) -> &str {
        &self.0
    }
}

impl fmt::Display for KeyId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

/// An alias: `alias/` + 1..=250 characters of `[A-Za-z0-9/_-]`, not under `alias/aws/` or
/// `alias/wrapd/` (reserved, as in AWS KMS).
#[derive(Debug, Clone, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct AliasName(String);

impl AliasName {
    /// The prefix every alias starts with.
    pub const PREFIX: &'static str = "alias/";

    /// Parses an alias name; anything else is INVALID_ARGUMENT.
    pub fn parse(s: &str) -> Result<Self> {
        let Some(name) = s.strip_prefix(Self::PREFIX) else {
            return Err(Error::invalid(format!(
                "malformed alias {:?}: expected alias/NAME",
                truncate(s)
            )));
        };
        let valid = !name.is_empty()
            && name.len() <= 250
            && name
                .bytes()
                .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'/' | b'_' | b'-'));
        if !valid {
            return Err(Error::invalid(format!(
                "malformed alias {:?}: NAME is 1 to 250 of A-Z a-z 0-9 / _ -",
                truncate(s)
            )));
        }
        if name.starts_with("aws/") || name.starts_with("wrapd/") {
            return Err(Error::invalid(
                "aliases under alias/aws/ and alias/wrapd/ are reserved",
            ));
        }
        Ok(Self(s.to_owned()))
    }

    /// The alias as text, with its `alias/` prefix.
    pub fn as_str(&self) -> &str {
        &self.0
    }
}

impl fmt::Display for AliasName {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

/// How a request names a key: by id or by alias.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum KeyRef {
    /// A canonical key id.
    Id(KeyId),
    /// An alias, resolved by the key store.
    Alias(AliasName),
}

impl KeyRef {
    /// Parses `key/...` (either form of [`KeyId::parse_named`]) or `alias/...`; an empty
    /// string is INVALID_ARGUMENT.
    pub fn parse(s: &str) -> Result<Self> {
        if s.is_empty() {
            Err(Error::invalid("key_id is required (key/... or alias/...)"))
        } else if s.starts_with(AliasName::PREFIX) {
            AliasName::parse(s).map(Self::Alias)
        } else {
            KeyId::parse_named(s).map(Self::Id)
        }
    }
}

impl fmt::Display for KeyRef {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Self::Id(id) => id.fmt(f),
            Self::Alias(alias) => alias.fmt(f),
        }
    }
}

/// Caps untrusted text echoed in an error message.
fn truncate(s: &str) -> &str {
    match s.char_indices().nth(80) {
        Some((i, _)) => &s[..i],
        None => s,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn key_ids_round_trip_and_reject_junk() {
        let id = KeyId::generate();
        assert_eq!(KeyId::parse(id.as_str()).unwrap(), id);
        for bad in [
            "",
            "key/",
            "key/ABCDEF0123456789abcdef0123456789",
            "key/0123",
            "kee/0123456789abcdef0123456789abcdef",
            "key/0123456-789a-bcde-f012-3456789abcdef",
            "key/01234567_89ab_cdef_0123_456789abcdef",
            "key/01234567-89AB-cdef-0123-456789abcdef",
            "key/01234567-89ab-cdef-0123-456789abcde-",
        ] {
            assert!(KeyId::parse(bad).is_err(), "{bad}");
            assert!(KeyId::parse_named(bad).is_err(), "{bad}");
        }
    }

    #[test]
    fn a_key_id_written_as_a_uuid_names_the_same_key() {
        let id = KeyId::parse("key/0123456789abcdef0123456789abcdef").unwrap();
        assert_eq!(id.uuid(), "01234567-89ab-cdef-0123-456789abcdef");
        assert_eq!(
            KeyId::parse_named(&format!("key/{}", id.uuid())).unwrap(),
            id
        );
        assert_eq!(
            KeyId::parse_named("key/01234567-89ab-cdef-0123-456789abcdef")
                .unwrap()
                .as_str(),
            "key/0123456789abcdef0123456789abcdef",
            "kept in one form"
        );
        assert!(
            KeyId::parse(&format!("key/{}", id.uuid())).is_err(),
            "stored forms have one encoding"
        );
    }

    #[test]
    fn aliases() {
        assert!(AliasName::parse("alias/payments-prod/db_1").is_ok());
        for bad in ["alias/", "alias/a b", "payments", "alias/aws/x", "alias/é"] {
            assert!(AliasName::parse(bad).is_err(), "{bad}");
        }
        assert!(AliasName::parse(&format!("alias/{}", "a".repeat(251))).is_err());
    }

    #[test]
    fn key_ref_dispatches_on_prefix() {
        assert!(matches!(
            KeyRef::parse("alias/x").unwrap(),
            KeyRef::Alias(_)
        ));
        assert!(KeyRef::parse("").is_err());
        // Multi-byte input is truncated on a char boundary, not mid-character.
        assert!(KeyRef::parse(&"é".repeat(200)).is_err());
    }
}
