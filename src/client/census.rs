//! The census of stored data: how many objects and bytes each key version protects, read
//! from headers alone (the Encryption SDK message header, the S3 Encryption Client's
//! envelope or an SSE-C object's tag: the wrapped data key names its key and version in
//! clear). Nothing is decrypted and no daemon is asked: this is the evidence that a version
//! is no longer needed before it is retired, and it costs one header read per object.

use std::collections::{BTreeMap, BTreeSet};
use std::fs::File;
use std::io::BufReader;
use std::path::Path;

use serde::Serialize;

use super::message::Found;
use super::rewrap::{KeyVersion, blob_key_version, is_wrapd_entry};

/// Objects and their bytes.
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq, Serialize)]
pub struct Tally {
    /// How many objects.
    pub objects: u64,
    /// Their stored size in bytes.
    pub bytes: u64,
}

impl Tally {
    fn add(&mut self, bytes: u64) {
        self.objects += 1;
        self.bytes += bytes;
    }
}

/// What a census found (an object protected by several versions counts under each).
#[derive(Debug, Default, Clone, PartialEq, Eq)]
pub struct Census {
    /// Per key version.
    pub versions: BTreeMap<KeyVersion, Tally>,
    /// Objects in a format the census reads, protected by no wrapd key.
    pub without_wrapd_key: Tally,
    /// Objects in no format the census reads.
    pub unrecognized: Tally,
    /// Objects that could not be read (path and why): the census is incomplete.
    pub errors: Vec<(String, String)>,
}

/// One row of a census, as printed.
#[derive(Debug, Clone, Serialize)]
pub struct CensusRow {
    /// The key.
    pub key_id: String,
    /// The version.
    pub version: u32,
    /// Objects with a data key under it.
    pub objects: u64,
    /// Their bytes.
    pub bytes: u64,
}

impl Census {
    /// Counts one object of `bytes` protected by the versions of `blobs` (wrapd blobs;
    /// other bytes are ignored). An object without any is counted as without a wrapd key.
    pub fn count_blobs<'a>(&mut self, blobs: impl IntoIterator<Item = &'a [u8]>, bytes: u64) {
        let versions: BTreeSet<KeyVersion> =
            blobs.into_iter().filter_map(blob_key_version).collect();
        if versions.is_empty() {
            self.without_wrapd_key.add(bytes);
        }
        for version in versions {
            self.versions.entry(version).or_default().add(bytes);
        }
    }

    /// Counts one object in no format the census reads.
    pub fn count_unrecognized(&mut self, bytes: u64) {
        self.unrecognized.add(bytes);
    }

    /// Records an object that could not be read: the census cannot say what protects it.
    pub fn count_error(&mut self, object: String, reason: String) {
        self.errors.push((object, reason));
    }

    /// Counts the file at `path`: an Encryption SDK message (its header is read, with at
    /// most `max_data_keys` encrypted data keys), unrecognized, or an error (unreadable, or
    /// a message over the limit).
    pub fn count_message_file(&mut self, path: &Path, max_data_keys: u16) {
        let file = match File::open(path) {
            Ok(file) => file,
            Err(err) => return self.count_error(path.display().to_string(), err.to_string()),
        };
        let bytes = file.metadata().map_or(0, |m| m.len());
        let mut reader = BufReader::with_capacity(16 * 1024, file);
        match Found::read(&mut reader, max_data_keys) {
            Found::Message(stored) => self.count_blobs(
                stored
                    .header
                    .data_keys
                    .iter()
                    .filter(|e| is_wrapd_entry(e))
                    .map(|e| &e.ciphertext[..]),
                bytes,
            ),
            Found::OverLimit(err) => self.count_error(path.display().to_string(), err.to_string()),
            Found::NotAMessage(_) => self.count_unrecognized(bytes),
        }
    }

    /// The rows, by key and version.
    pub fn rows(&self) -> Vec<CensusRow> {
        self.versions
            .iter()
            .map(|(v, t)| CensusRow {
                key_id: v.key_id.clone(),
                version: v.version,
                objects: t.objects,
                bytes: t.bytes,
            })
            .collect()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::blob::Blob;
    use crate::ids::KeyId;

    fn blob(key: &KeyId, version: u32) -> Vec<u8> {
        Blob {
            key_id: key.clone(),
            key_version: version,
            iv: [0; 12],
            ciphertext: vec![0; 48],
        }
        .encode()
    }

    #[test]
    fn an_object_counts_once_under_each_version_that_protects_it() {
        let (a, b) = (KeyId::generate(), KeyId::generate());
        let mut census = Census::default();
        census.count_blobs([&blob(&a, 1)[..], &blob(&b, 2)[..]], 100);
        census.count_blobs([&blob(&a, 1)[..], &blob(&a, 1)[..]], 10);
        census.count_blobs([&b"not a blob"[..]], 7);
        census.count_unrecognized(3);
        let rows: Vec<_> = census
            .rows()
            .into_iter()
            .map(|r| (r.key_id, r.version, r.objects, r.bytes))
            .collect();
        let mut expected = vec![(a.to_string(), 1, 2, 110), (b.to_string(), 2, 1, 100)];
        expected.sort();
        assert_eq!(rows, expected);
        assert_eq!(
            census.without_wrapd_key,
            Tally {
                objects: 1,
                bytes: 7
            }
        );
        assert_eq!(
            census.unrecognized,
            Tally {
                objects: 1,
                bytes: 3
            }
        );
    }
}
