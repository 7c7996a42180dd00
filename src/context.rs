//! Encryption context: the non-secret key/value pairs bound to a wrapped data key.
//!
//! The canonical form is the AWS Encryption SDK's serialization: empty for an empty context,
//! else a big-endian u16 entry count followed by each entry, sorted by the UTF-8 bytes of its
//! key, as u16 length + key bytes, u16 length + value bytes. It is part of the AAD of every
//! wrap, so an unwrap with any other context fails.

use std::collections::{BTreeMap, HashMap};

use crate::error::{Error, Result};

/// Largest accepted serialized context, in bytes.
pub const MAX_SERIALIZED_LEN: usize = 8 * 1024;

/// A validated encryption context. Entries are kept sorted by key bytes (`String`'s `Ord`
/// is byte-wise), which is the canonical order.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct EncryptionContext(BTreeMap<String, String>);

impl EncryptionContext {
    /// Validates a context taken from a request: keys non-empty, at most
    /// [`MAX_SERIALIZED_LEN`] bytes once serialized.
    pub fn new(entries: HashMap<String, String>) -> Result<Self> {
        Self::from_entries(entries)
    }

    /// Like [`EncryptionContext::new`], from any iterator of entries.
    pub fn from_entries(entries: impl IntoIterator<Item = (String, String)>) -> Result<Self> {
        let map: BTreeMap<String, String> = entries.into_iter().collect();
        if map.len() > usize::from(u16::MAX) {
            return Err(Error::invalid("encryption context has too many entries"));
        }
        let mut len = if map.is_empty() { 0 } else { 2 };
        for (key, value) in &map {
            if key.is_empty() {
                return Err(Error::invalid("encryption context keys must not be empty"));
            }
            len += 4 + key.len() + value.len();
            if len > MAX_SERIALIZED_LEN {
                return Err(Error::invalid(format!(
                    "encryption context is larger than {MAX_SERIALIZED_LEN} bytes serialized"
                )));
            }
        }
        Ok(Self(map))
    }

    /// The canonical serialization (see the module docs).
    ///
    /// ```
    /// use wrapd::context::EncryptionContext;
    ///
    /// let ctx = EncryptionContext::from_entries([
    ///     ("tenant".to_owned(), "acme".to_owned()),
    ///     ("app".to_owned(), "db".to_owned()),
    /// ])?;
    /// // u16 count, then (u16 len, key, u16 len, value) sorted by key bytes.
    /// assert_eq!(
    ///     ctx.serialize(),
    ///     b"\x00\x02\x00\x03app\x00\x02db\x00\x06tenant\x00\x04acme"
    /// );
    /// # Ok::<(), wrapd::Error>(())
    /// ```
    pub fn serialize(&self) -> Vec<u8> {
        let mut out = Vec::new();
        self.serialize_into(&mut out);
        out
    }

    /// Appends the canonical serialization to `out`.
    pub fn serialize_into(&self, out: &mut Vec<u8>) {
        if self.0.is_empty() {
            return;
        }
        // Lengths fit: `from_entries` bounds the whole serialization to 8 KiB.
        out.extend_from_slice(&(self.0.len() as u16).to_be_bytes());
        for (key, value) in &self.0 {
            out.extend_from_slice(&(key.len() as u16).to_be_bytes());
            out.extend_from_slice(key.as_bytes());
            out.extend_from_slice(&(value.len() as u16).to_be_bytes());
            out.extend_from_slice(value.as_bytes());
        }
    }

    /// Parses a canonical serialization (as found in an Encryption SDK message header):
    /// every field bounded by the input, no duplicate keys, entries in canonical order, UTF-8.
    pub fn parse(bytes: &[u8]) -> Result<Self> {
        let bad = |what: &str| Error::invalid(format!("malformed encryption context: {what}"));
        if bytes.is_empty() {
            return Ok(Self::default());
        }
        let (count, mut rest) = bytes
            .split_first_chunk::<2>()
            .ok_or_else(|| bad("truncated count"))?;
        let count = u16::from_be_bytes(*count);
        if count == 0 {
            return Err(bad("zero entries in a non-empty context"));
        }
        let field = |rest: &mut &[u8]| -> Result<String> {
            let (len, tail) = rest
                .split_first_chunk::<2>()
                .ok_or_else(|| bad("truncated length"))?;
            let (value, tail) = tail
                .split_at_checked(usize::from(u16::from_be_bytes(*len)))
                .ok_or_else(|| bad("truncated field"))?;
            *rest = tail;
            String::from_utf8(value.to_vec()).map_err(|_| bad("not UTF-8"))
        };
        let mut map = BTreeMap::new();
        let mut last: Option<String> = None;
        for _ in 0..count {
            let key = field(&mut rest)?;
            let value = field(&mut rest)?;
            if last.as_ref().is_some_and(|l| *l >= key) {
                return Err(bad("entries not in canonical order or duplicated"));
            }
            last = Some(key.clone());
            map.insert(key, value);
        }
        if !rest.is_empty() {
            return Err(bad("trailing bytes"));
        }
        Ok(Self(map))
    }

    /// The value of `key`, if present.
    pub fn get(&self, key: &str) -> Option<&str> {
        self.0.get(key).map(String::as_str)
    }

    /// The entries, in canonical order.
    pub fn iter(&self) -> impl Iterator<Item = (&str, &str)> {
        self.0.iter().map(|(k, v)| (k.as_str(), v.as_str()))
    }

    /// True when the context has no entries.
    pub fn is_empty(&self) -> bool {
        self.0.is_empty()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ctx(entries: &[(&str, &str)]) -> Result<EncryptionContext> {
        EncryptionContext::from_entries(entries.iter().map(|(k, v)| (k.to_string(), v.to_string())))
    }

    #[test]
    fn empty_context_serializes_to_nothing() {
        assert!(ctx(&[]).unwrap().serialize().is_empty());
    }

    #[test]
    fn known_answer() {
        // Same bytes as the AWS Encryption SDK: count, then sorted (len, key, len, value).
        let got = ctx(&[("b", "2"), ("a", "1")]).unwrap().serialize();
        assert_eq!(
            got,
            [0, 2, 0, 1, b'a', 0, 1, b'1', 0, 1, b'b', 0, 1, b'2'].to_vec()
        );
    }

    #[test]
    fn sorts_by_utf8_bytes() {
        // 'Z' (0x5a) < 'a' (0x61) < 'é' (0xc3 0xa9).
        let c = ctx(&[("é", ""), ("a", ""), ("Z", "")]).unwrap();
        let keys: Vec<_> = c.iter().map(|(k, _)| k).collect();
        assert_eq!(keys, ["Z", "a", "é"]);
    }

    #[test]
    fn parse_inverts_serialize_and_rejects_junk() {
        let c = ctx(&[("b", "2"), ("a", "1"), ("é", "")]).unwrap();
        assert_eq!(EncryptionContext::parse(&c.serialize()).unwrap(), c);
        assert!(EncryptionContext::parse(&[]).unwrap().is_empty());
        for bad in [
            &[0u8][..],
            &[0, 0],
            &[0, 1, 0, 5, b'a'],
            &[0, 2, 0, 1, b'b', 0, 0, 0, 1, b'a', 0, 0],
            &[0, 1, 0, 1, b'a', 0, 0, 9],
            &[0, 1, 0, 1, 0xff, 0, 0],
        ] {
            assert!(EncryptionContext::parse(bad).is_err(), "{bad:?}");
        }
    }

    #[test]
    fn rejects_empty_key_and_oversize() {
        assert!(ctx(&[("", "v")]).is_err());
        let big = "x".repeat(MAX_SERIALIZED_LEN);
        assert!(ctx(&[("k", &big)]).is_err());
        let fits = "x".repeat(MAX_SERIALIZED_LEN - 2 - 4 - 1);
        assert_eq!(
            ctx(&[("k", &fits)]).unwrap().serialize().len(),
            MAX_SERIALIZED_LEN
        );
    }
}
