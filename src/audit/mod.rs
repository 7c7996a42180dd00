//! The tamper-evident audit log: one JSON line per key operation and per denial.
//!
//! Each line carries `prev`, the `hash` of the line before it, and its own `hash`: the
//! SHA-256 (hex) of the line's JSON with `hash` set to `""`. The first line of a file
//! anchors to a recorded value: 64 zeros for a new log, or the last hash of the previous
//! file after a rotation (logged by the daemon when it reopens the file). `seq` counts
//! records across files. Editing, deleting, inserting or reordering a line breaks the chain
//! at that line, which [`verify`] (and `wrapctl audit verify`) reports. Removing lines from
//! the end of the newest file is only detectable against a recorded last hash
//! (`--expect-last`).
//!
//! Records hold who, what, which key, the encryption context's keys and a hash of the whole
//! context, the outcome and the latency; never plaintext, key bytes or PINs.
//!
//! The log file is written by `log.rs`, with the group commit of `writer.rs` in front of it
//! (both server only).

#[cfg(feature = "server")]
mod log;
#[cfg(feature = "server")]
pub mod writer;

use std::io::BufRead;

use serde::{Deserialize, Serialize};
use sha2::{Digest, Sha256};

#[cfg(feature = "server")]
pub use log::{AuditLog, FsyncPolicy, GapPolicy, HeadStore};
#[cfg(feature = "server")]
pub use writer::AuditWriter;

/// The anchor of a brand-new log.
pub const GENESIS: &str = "0000000000000000000000000000000000000000000000000000000000000000";

/// One audit line. A call fills in everything but `seq`, `time`, `prev` and `hash`, which
/// the log sets when it appends the line.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct AuditRecord {
    /// Sequence number, +1 per record.
    pub seq: u64,
    /// RFC 3339 UTC time.
    pub time: String,
    /// Request id (the caller's `x-request-id`, or generated).
    pub request_id: String,
    /// The caller's main principal (empty if unauthenticated).
    pub principal: String,
    /// `unix`, `tcp`, `kms`, `aws-kms`, `xks` or `internal`.
    pub transport: String,
    /// `pid=N` or the remote address.
    pub peer: String,
    /// The RPC name (the policy operation).
    pub operation: String,
    /// The front end's own name of the call when it differs from `operation`, e.g.
    /// `TrentService.Decrypt` on the AWS KMS API (whose `operation` is `Unwrap`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub api_operation: Option<String>,
    /// The AWS access key id a request was signed with (AWS KMS API only).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub access_key_id: Option<String>,
    /// The daemon that wrote the line, in a fleet (`[store] instance`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub instance: Option<String>,
    /// The request metadata of an XKS proxy API call (who in AWS asked, for which KMS key,
    /// through which service), as AWS KMS sent it.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub request_metadata: Option<std::collections::BTreeMap<String, String>>,
    /// The key acted on, when known.
    pub key_id: Option<String>,
    /// Its version, when known.
    pub key_version: Option<u32>,
    /// The keys of the encryption context (values are not logged).
    pub context_keys: Vec<String>,
    /// SHA-256 (hex) of the canonical encryption context, when one was given.
    pub context_hash: Option<String>,
    /// `OK`, or the gRPC code name of the failure (`PERMISSION_DENIED` for a denial).
    pub outcome: String,
    /// The error message returned to the caller, if any.
    pub error: Option<String>,
    /// Time spent, in microseconds.
    pub latency_us: u64,
    /// Hash of the previous record (see the module docs).
    pub prev: String,
    /// Hash of this record.
    pub hash: String,
}

impl AuditRecord {
    /// The SHA-256 of the record with `hash` emptied, hex.
    pub fn compute_hash(&self) -> String {
        let mut unhashed = self.clone();
        unhashed.hash = String::new();
        // Serializing a plain struct of strings and numbers cannot fail.
        let json = serde_json::to_vec(&unhashed).unwrap_or_default();
        hex::encode(Sha256::digest(&json))
    }
}

/// SHA-256 (hex) of bytes: used for the encryption-context hash.
pub fn sha256_hex(bytes: &[u8]) -> String {
    hex::encode(Sha256::digest(bytes))
}

/// The operation name of the record the daemon writes when it reopens its log (SIGHUP):
/// the first line of every rotated-in file, so that a new file is never empty and a file
/// deleted while the daemon is stopped is noticed at start-up.
pub const REOPENED: &str = "AuditLogReopened";

/// The operation name of the record the daemon writes when an operator accepted a gap at
/// start-up (`--accept-audit-gap`): the log ended before the head recorded in the metadata
/// store. Its `error` says which records are missing. [`verify`] reports every gap record.
pub const GAP: &str = "AuditGap";

/// The principal of records the daemon writes about its own log.
pub const DAEMON_PRINCIPAL: &str = "wrapd:daemon";

/// A position in the chain: a record's sequence number and hash. The daemon records its
/// chain head in the metadata store; `wrapd audit head` prints it as `SEQ:HASH`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ChainHead {
    /// The record's `seq`.
    pub seq: u64,
    /// The record's `hash`.
    pub hash: String,
}

impl ChainHead {
    /// Parses `SEQ:HASH`.
    pub fn parse(text: &str) -> Option<Self> {
        let (seq, hash) = text.split_once(':')?;
        let hash_ok = hash.len() == 64 && hash.bytes().all(|b| b.is_ascii_hexdigit());
        Some(Self {
            seq: seq.parse().ok()?,
            hash: hash_ok.then(|| hash.to_ascii_lowercase())?,
        })
    }
}

impl std::fmt::Display for ChainHead {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{}:{}", self.seq, self.hash)
    }
}

/// A chain that verified.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Verified {
    /// Records checked.
    pub records: u64,
    /// What the first record anchors to.
    pub anchor: String,
    /// The last record's hash (record it to detect truncation later).
    pub last_hash: String,
    /// The last record's `seq` (0 for an empty file).
    pub last_seq: u64,
    /// Gap records ([`GAP`]) found: their line numbers and what they say is missing.
    pub gaps: Vec<(u64, String)>,
}

/// Where and why a chain broke. `line` is 1-based.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("line {line}: {reason}")]
pub struct Broken {
    /// The first bad line.
    pub line: u64,
    /// What is wrong with it.
    pub reason: String,
}

/// What [`verify_with`] checks beyond the chain itself.
#[derive(Debug, Clone, Default)]
pub struct VerifyOptions<'a> {
    /// What the first line must follow.
    pub anchor: Option<&'a str>,
    /// The hash the last line must have.
    pub expect_last: Option<&'a str>,
    /// A head recorded earlier (the metadata store's, see `wrapd audit head`): the file must
    /// reach it, i.e. hold the record with that `seq` and hash, or start right after it.
    pub head: Option<&'a ChainHead>,
}

/// Verifies an audit file's chain. `anchor`, when given, is what the first line must follow;
/// `expect_last`, when given, is the hash the last line must have.
pub fn verify(
    reader: impl BufRead,
    anchor: Option<&str>,
    expect_last: Option<&str>,
) -> Result<Verified, Broken> {
    verify_with(
        reader,
        &VerifyOptions {
            anchor,
            expect_last,
            head: None,
        },
    )
}

/// Verifies an audit file's chain against `options`. Gap records do not break the chain
/// (they are linked like any record) but are returned in [`Verified::gaps`].
pub fn verify_with(reader: impl BufRead, options: &VerifyOptions<'_>) -> Result<Verified, Broken> {
    let mut previous: Option<AuditRecord> = None;
    let mut first_anchor = None;
    let mut count = 0u64;
    let mut gaps = Vec::new();
    let mut head_seen = false;
    for (index, line) in reader.lines().enumerate() {
        let number = index as u64 + 1;
        let broken = |reason: String| Broken {
            line: number,
            reason,
        };
        let line = line.map_err(|e| broken(format!("unreadable: {e}")))?;
        let record: AuditRecord = serde_json::from_str(&line)
            .map_err(|e| broken(format!("not an audit record ({e})")))?;
        match &previous {
            None => {
                if let Some(anchor) = options.anchor {
                    if record.prev != anchor {
                        return Err(broken(format!(
                            "does not anchor to {anchor} (it follows {})",
                            record.prev
                        )));
                    }
                }
                if let Some(head) = options.head {
                    // A file that starts right after the head (a rotation at the head).
                    head_seen |=
                        record.prev == head.hash && head.seq.checked_add(1) == Some(record.seq);
                }
                first_anchor = Some(record.prev.clone());
            }
            Some(before) => {
                if record.prev != before.hash {
                    return Err(broken(
                        "does not follow the line before it: a line was deleted, inserted, reordered or edited"
                            .into(),
                    ));
                }
                // A gap record skips the numbers of the records it says are missing.
                let in_sequence = before.seq.checked_add(1) == Some(record.seq)
                    || (record.operation == GAP && record.seq > before.seq);
                if !in_sequence {
                    return Err(broken(format!(
                        "sequence {} after {}: a line is missing",
                        record.seq, before.seq
                    )));
                }
            }
        }
        if record.compute_hash() != record.hash {
            return Err(broken(
                "its content does not match its hash: the line was edited".into(),
            ));
        }
        if let Some(head) = options.head {
            if record.seq == head.seq {
                if record.hash != head.hash {
                    return Err(broken(format!(
                        "record {} has hash {}, but {} was recorded: the log was replaced",
                        record.seq, record.hash, head.hash
                    )));
                }
                head_seen = true;
            }
        }
        if record.operation == GAP {
            gaps.push((number, record.error.clone().unwrap_or_default()));
        }
        count += 1;
        previous = Some(record);
    }
    let (last_hash, last_seq) = previous.map(|r| (r.hash, r.seq)).unwrap_or_default();
    if let Some(expected) = options.expect_last {
        if last_hash != expected {
            return Err(Broken {
                line: count + 1,
                reason: format!(
                    "the log ends at {last_hash}, not at {expected}: lines are missing at the end"
                ),
            });
        }
    }
    if let Some(head) = options.head {
        if !head_seen {
            return Err(Broken {
                line: count + 1,
                reason: format!(
                    "the log ends at seq {last_seq} and never reaches the recorded head {head}: lines are missing at the end, or the file was replaced"
                ),
            });
        }
    }
    Ok(Verified {
        records: count,
        anchor: first_anchor.unwrap_or_else(|| GENESIS.to_owned()),
        last_hash,
        last_seq,
        gaps,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn chain(n: u64, first_seq: u64, anchor: &str) -> Vec<AuditRecord> {
        let mut prev = anchor.to_owned();
        (0..n)
            .map(|i| {
                let mut record = AuditRecord {
                    seq: first_seq.wrapping_add(i),
                    prev: prev.clone(),
                    operation: "Wrap".into(),
                    outcome: "OK".into(),
                    ..Default::default()
                };
                record.hash = record.compute_hash();
                prev = record.hash.clone();
                record
            })
            .collect()
    }

    fn text(records: &[AuditRecord]) -> String {
        records
            .iter()
            .map(|r| serde_json::to_string(r).unwrap() + "\n")
            .collect()
    }

    /// A crafted `seq` must not overflow the verifier.
    #[test]
    fn a_crafted_maximal_seq_is_reported_not_overflowed() {
        let records = chain(2, u64::MAX, GENESIS);
        let err = verify(text(&records).as_bytes(), None, None).unwrap_err();
        assert_eq!(err.line, 2);
        assert!(err.reason.contains("sequence"), "{err}");
    }

    /// A file is checked against a recorded head.
    #[test]
    fn a_file_must_reach_the_recorded_head() {
        let records = chain(5, 1, GENESIS);
        let full = text(&records);
        let head = |i: usize| ChainHead {
            seq: records[i].seq,
            hash: records[i].hash.clone(),
        };
        let with_head = |text: &str, head: &ChainHead| {
            verify_with(
                text.as_bytes(),
                &VerifyOptions {
                    head: Some(head),
                    ..Default::default()
                },
            )
        };
        assert!(with_head(&full, &head(4)).is_ok());
        assert!(
            with_head(&full, &head(2)).is_ok(),
            "the head may lag the file"
        );
        let truncated = text(&records[..3]);
        assert!(with_head(&truncated, &head(4)).is_err(), "truncated tail");
        let rotated = text(&records[3..]);
        assert!(
            with_head(&rotated, &head(2)).is_ok(),
            "a file starting right after it"
        );
        let replaced = text(&chain(5, 1, GENESIS)[..]).replace("Wrap", "Unwrap");
        assert!(with_head(&replaced, &head(4)).is_err(), "another chain");
        assert_eq!(ChainHead::parse(&head(4).to_string()), Some(head(4)));
        assert_eq!(ChainHead::parse("1:abc"), None);
    }
}
