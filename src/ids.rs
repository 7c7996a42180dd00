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

    /// Parses a key id; anything else is INVALID_ARGUMENT.
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
    /// Parses `key/...` or `alias/...`; an empty string is INVALID_ARGUMENT.
    pub fn parse(s: &str) -> Result<Self> {
        if s.is_empty() {
            Err(Error::invalid("key_id is required (key/... or alias/...)"))
        } else if s.starts_with(AliasName::PREFIX) {
            AliasName::parse(s).map(Self::Alias)
        } else {
            KeyId::parse(s).map(Self::Id)
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
        ] {
            assert!(KeyId::parse(bad).is_err(), "{bad}");
        }
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
