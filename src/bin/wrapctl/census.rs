//! `wrapctl census PATH|s3://BUCKET/PREFIX`: how many objects and bytes each key version
//! protects, from headers alone (`wrapd::client::census`).

use std::path::PathBuf;

use serde::Serialize;
use wrapd::client::census::{Census, CensusRow, Tally};

use crate::error::{CliError, Failure};
use crate::output::{Report, table};
use crate::tree::{self, Entry};

/// A census, as printed.
#[derive(Serialize)]
pub struct CensusReport {
    pub versions: Vec<CensusRow>,
    pub without_wrapd_key: Tally,
    pub unrecognized: Tally,
    /// Objects that could not be read: `{object, reason}`.
    pub errors: Vec<CensusError>,
}

/// An object the census could not read.
#[derive(Serialize)]
pub struct CensusError {
    pub object: String,
    pub reason: String,
}

impl From<&Census> for CensusReport {
    fn from(census: &Census) -> Self {
        Self {
            versions: census.rows(),
            without_wrapd_key: census.without_wrapd_key,
            unrecognized: census.unrecognized,
            errors: census
                .errors
                .iter()
                .map(|(object, reason)| CensusError {
                    object: object.clone(),
                    reason: reason.clone(),
                })
                .collect(),
        }
    }
}

impl CensusReport {
    /// The error naming every object that could not be read, if any: an incomplete census
    /// is no evidence that a version is unused.
    pub fn failure(&self) -> Option<CliError> {
        (!self.errors.is_empty()).then(|| {
            let listed: Vec<String> = self
                .errors
                .iter()
                .map(|e| format!("{}: {}", e.object, e.reason))
                .collect();
            CliError::new(
                Failure::Other,
                format!(
                    "the census is incomplete: {} could not be read:\n  {}",
                    listed.len(),
                    listed.join("\n  ")
                ),
            )
        })
    }
}

impl Report for CensusReport {
    fn human(&self) -> String {
        let mut rows: Vec<[String; 4]> = self
            .versions
            .iter()
            .map(|r| {
                [
                    r.key_id.clone(),
                    r.version.to_string(),
                    r.objects.to_string(),
                    r.bytes.to_string(),
                ]
            })
            .collect();
        for (what, tally) in [
            ("(no wrapd key)", self.without_wrapd_key),
            ("(not recognized)", self.unrecognized),
        ] {
            if tally.objects > 0 {
                rows.push([
                    what.to_owned(),
                    String::new(),
                    tally.objects.to_string(),
                    tally.bytes.to_string(),
                ]);
            }
        }
        let mut text = table(["KEY", "VERSION", "OBJECTS", "BYTES"], rows);
        if !self.errors.is_empty() {
            text.push_str(&format!(
                "\n\n{} could not be read (see below)",
                self.errors.len()
            ));
        }
        text
    }
}

/// Counts the files under `paths` into `census`.
pub fn count_files(census: &mut Census, paths: &[PathBuf], max_encrypted_data_keys: u16) {
    for entry in tree::files(paths) {
        match entry {
            Entry::File { path, .. } => census.count_message_file(&path, max_encrypted_data_keys),
            Entry::Unreadable { path, reason } => {
                census.count_error(path.display().to_string(), reason)
            }
        }
    }
}
