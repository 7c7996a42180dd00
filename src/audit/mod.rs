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
//! The writer is in `log.rs` (server only).

#[cfg(feature = "server")]
mod log;

use std::io::BufRead;

use serde::{Deserialize, Serialize};
use sha2::{Digest, Sha256};

#[cfg(feature = "server")]
pub use log::{AuditLog, FsyncPolicy};

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
    /// `unix` or `tcp`.
    pub transport: String,
    /// `pid=N` or the remote address.
    pub peer: String,
    /// The RPC name.
    pub operation: String,
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

/// A chain that verified.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Verified {
    /// Records checked.
    pub records: u64,
    /// What the first record anchors to.
    pub anchor: String,
    /// The last record's hash (record it to detect truncation later).
    pub last_hash: String,
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

/// Verifies an audit file's chain. `anchor`, when given, is what the first line must follow;
/// `expect_last`, when given, is the hash the last line must have.
pub fn verify(
    reader: impl BufRead,
    anchor: Option<&str>,
    expect_last: Option<&str>,
) -> Result<Verified, Broken> {
    let mut previous: Option<AuditRecord> = None;
    let mut first_anchor = None;
    let mut count = 0u64;
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
                if let Some(anchor) = anchor {
                    if record.prev != anchor {
                        return Err(broken(format!(
                            "does not anchor to {anchor} (it follows {})",
                            record.prev
                        )));
                    }
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
                if record.seq != before.seq + 1 {
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
        count += 1;
        previous = Some(record);
    }
    let last_hash = previous.map(|r| r.hash).unwrap_or_default();
    if let Some(expected) = expect_last {
        if last_hash != expected {
            return Err(Broken {
                line: count + 1,
                reason: format!(
                    "the log ends at {last_hash}, not at {expected}: lines are missing at the end"
                ),
            });
        }
    }
    Ok(Verified {
        records: count,
        anchor: first_anchor.unwrap_or_else(|| GENESIS.to_owned()),
        last_hash,
    })
}
