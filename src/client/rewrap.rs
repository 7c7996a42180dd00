//! Re-wrapping stored data keys after a rotation, without touching the data: the engine
//! [`Rewrapper`] decides for each wrapped data key whether it is behind (not under its
//! destination key's current version) and re-wraps it with the daemon's `ReWrap`, so the
//! plaintext data key never leaves the daemon for that step; [`rewrap_message_file`] applies
//! it to an AWS Encryption SDK message on disk (the S3 objects are in `s3/rewrap.rs`).
//!
//! A message file is replaced atomically: the new header and the original frames, byte for
//! byte, go to an unnamed file in the same directory, which gets the original's owner, group
//! and permission bits and is synced, checked against the original (unchanged since it was
//! read, or the file is left alone), renamed over it, and the directory synced. A run killed
//! at any point leaves every file either as it was or re-wrapped, and a second run skips what
//! is already up to date. Files reached through a symbolic link, or with several hard links,
//! are refused. Extended attributes and ACLs are not carried over.

use std::collections::HashMap;
use std::fs::File;
use std::io::{BufReader, Seek, SeekFrom, Write};
use std::os::unix::fs::{MetadataExt, OpenOptionsExt};
use std::path::Path;
use std::time::Duration;

use serde::Serialize;
use tonic::transport::Channel;
use zeroize::Zeroizing;

use super::keyring::split_arn;
use super::message::{AWS_KMS_PROVIDER_ID, EncryptedDataKey, Found, PROVIDER_ID, StoredHeader};
use super::{ClientError, DataKeyServiceClient, Failure, KeyServiceClient, Output};
use crate::blob::Blob;
use crate::context::EncryptionContext;
use crate::proto::{KeyRef, ReWrapRequest, UnwrapRequest};

/// Deadline of each daemon call.
const CALL_TIMEOUT: Duration = Duration::from_secs(30);

/// A key and one of its versions, as `key/…` and a number.
#[derive(Debug, Clone, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize)]
pub struct KeyVersion {
    /// The canonical key id.
    pub key_id: String,
    /// The version.
    pub version: u32,
}

impl std::fmt::Display for KeyVersion {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{} v{}", self.key_id, self.version)
    }
}

/// The key and version a wrapd blob names (read from its clear header; nothing is
/// authenticated), or `None` for bytes that are no wrapd blob.
pub fn blob_key_version(blob: &[u8]) -> Option<KeyVersion> {
    Blob::parse(blob).ok().map(|b| KeyVersion {
        key_id: b.key_id.to_string(),
        version: b.key_version,
    })
}

/// Whether an Encryption SDK data key entry is wrapd's (written by wrapctl, the client
/// library, or the official SDKs' KMS keyrings through wrapd's AWS KMS API).
pub fn is_wrapd_entry(entry: &EncryptedDataKey) -> bool {
    entry.provider_id == PROVIDER_ID || entry.provider_id == AWS_KMS_PROVIDER_ID
}

/// Re-wraps data keys on one daemon, under their own key's current version, or those of one
/// key under another key.
pub struct Rewrapper {
    data: DataKeyServiceClient<Channel>,
    keys: KeyServiceClient<Channel>,
    /// `(from, to)`: only data keys under `from` move, to `to`.
    moving: Option<(String, String)>,
    /// Current version of each key asked about, by the name it was asked by.
    current: HashMap<String, KeyVersion>,
}

fn call<T>(message: T) -> tonic::Request<T> {
    let mut request = tonic::Request::new(message);
    request.set_timeout(CALL_TIMEOUT);
    request
}

fn wire(context: &EncryptionContext) -> HashMap<String, String> {
    context
        .iter()
        .map(|(k, v)| (k.to_owned(), v.to_owned()))
        .collect()
}

impl Rewrapper {
    /// A re-wrapper on `channel`. With `moving = (FROM, TO)` (ids or aliases), the data
    /// keys under FROM move to TO and no other moves: naming the source is what keeps a
    /// planted object from getting another key's data key re-wrapped under TO by whoever
    /// runs the re-wrap.
    pub fn new(channel: Channel, moving: Option<(String, String)>) -> Self {
        Self {
            data: DataKeyServiceClient::new(channel.clone()),
            keys: KeyServiceClient::new(channel),
            moving,
            current: HashMap::new(),
        }
    }

    /// Where a data key under `source` belongs: its own key's current version, or with a
    /// move, the destination's for data keys under its source (`None`: it stays where it
    /// is). Asked once per key and run.
    pub async fn destination(
        &mut self,
        source: &KeyVersion,
    ) -> Result<Option<KeyVersion>, ClientError> {
        let name = match self.moving.clone() {
            None => source.key_id.clone(),
            Some((from, to)) => {
                if self.current_of(&from).await?.key_id != source.key_id {
                    return Ok(None);
                }
                to
            }
        };
        self.current_of(&name).await.map(Some)
    }

    /// The current version of the key `name` names.
    async fn current_of(&mut self, name: &str) -> Result<KeyVersion, ClientError> {
        let name = name.to_owned();
        if let Some(known) = self.current.get(&name) {
            return Ok(known.clone());
        }
        let key = self
            .keys
            .describe_key(call(KeyRef {
                key_id: name.clone(),
            }))
            .await
            .map_err(|s| ClientError::from(s).context(&format!("DescribeKey {name}")))?
            .into_inner();
        let current = KeyVersion {
            key_id: key.key_id,
            version: key.current_version,
        };
        self.current.insert(name, current.clone());
        Ok(current)
    }

    /// The plaintext data key of `blob` (to authenticate a header again with it).
    pub async fn unwrap(
        &mut self,
        blob: &[u8],
        context: &EncryptionContext,
    ) -> Result<Zeroizing<Vec<u8>>, ClientError> {
        let answer = self
            .data
            .unwrap(call(UnwrapRequest {
                ciphertext_blob: blob.to_vec(),
                encryption_context: wire(context),
                key_id: String::new(),
            }))
            .await
            .map_err(|s| ClientError::from(s).context("Unwrap"))?;
        Ok(Zeroizing::new(answer.into_inner().plaintext))
    }

    /// `blob` wrapped again under `destination` (same encryption context), by the daemon.
    pub async fn rewrap(
        &mut self,
        blob: &[u8],
        context: &EncryptionContext,
        destination: &KeyVersion,
    ) -> Result<(Vec<u8>, KeyVersion), ClientError> {
        let answer = self
            .data
            .re_wrap(call(ReWrapRequest {
                ciphertext_blob: blob.to_vec(),
                source_encryption_context: wire(context),
                destination_key_id: destination.key_id.clone(),
                destination_encryption_context: wire(context),
            }))
            .await
            .map_err(|s| ClientError::from(s).context("ReWrap"))?
            .into_inner();
        Ok((
            answer.ciphertext_blob,
            KeyVersion {
                key_id: answer.key_id,
                version: answer.key_version,
            },
        ))
    }
}

/// What became of one object.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
#[serde(tag = "status", rename_all = "kebab-case")]
pub enum Outcome {
    /// Its data keys were re-wrapped (`from` → `to`).
    Rewrapped {
        /// The versions its re-wrapped data keys were under.
        from: Vec<KeyVersion>,
        /// The versions they are under now.
        to: Vec<KeyVersion>,
    },
    /// `--dry-run`: its data keys would be re-wrapped.
    WouldRewrap {
        /// The versions its data keys are under.
        from: Vec<KeyVersion>,
        /// The versions they would move to.
        to: Vec<KeyVersion>,
    },
    /// Every wrapd data key is already under its destination's current version.
    UpToDate,
    /// Not something to re-wrap (not a message, no wrapd data key).
    Skipped {
        /// Why.
        reason: String,
    },
    /// It could not be re-wrapped and was left as it was.
    Failed {
        /// Why.
        reason: String,
    },
}

impl Outcome {
    fn failed(err: impl std::fmt::Display) -> Self {
        Self::Failed {
            reason: err.to_string(),
        }
    }

    /// The one-word status.
    pub fn status(&self) -> &'static str {
        match self {
            Self::Rewrapped { .. } => "rewrapped",
            Self::WouldRewrap { .. } => "would-rewrap",
            Self::UpToDate => "up-to-date",
            Self::Skipped { .. } => "skipped",
            Self::Failed { .. } => "failed",
        }
    }
}

/// What identifies a file's content for the check before it is replaced.
#[derive(PartialEq, Eq)]
struct Identity {
    dev: u64,
    ino: u64,
    len: u64,
    mtime: (i64, i64),
}

impl Identity {
    fn of(meta: &std::fs::Metadata) -> Self {
        Self {
            dev: meta.dev(),
            ino: meta.ino(),
            len: meta.len(),
            mtime: (meta.mtime(), meta.mtime_nsec()),
        }
    }
}

/// Re-wraps the Encryption SDK message at `path` in place (see the module docs), or with
/// `dry_run` says what it would do. Files that are not messages are [`Outcome::Skipped`];
/// every failure leaves the file as it was.
pub async fn rewrap_message_file(
    path: &Path,
    rewrapper: &mut Rewrapper,
    max_data_keys: u16,
    dry_run: bool,
) -> Outcome {
    match rewrap_file(path, rewrapper, max_data_keys, dry_run).await {
        Ok(outcome) => outcome,
        Err(err) => Outcome::failed(err),
    }
}

async fn rewrap_file(
    path: &Path,
    rewrapper: &mut Rewrapper,
    max_data_keys: u16,
    dry_run: bool,
) -> Result<Outcome, ClientError> {
    let display = path.display();
    // Not through a symbolic link: the file is replaced by name, so the name must be the
    // file's own.
    let mut file = std::fs::OpenOptions::new()
        .read(true)
        .custom_flags(rustix::fs::OFlags::NOFOLLOW.bits() as i32)
        .open(path)
        .map_err(|e| format!("cannot open {display}: {e}"))?;
    let meta = file
        .metadata()
        .map_err(|e| format!("cannot read {display}: {e}"))?;
    let before = Identity::of(&meta);
    let stored = match Found::read(
        &mut BufReader::with_capacity(64 * 1024, &mut file),
        max_data_keys,
    ) {
        Found::Message(stored) => stored,
        // A message, refused by the caller's limit: it may hold data keys to move.
        Found::OverLimit(err) => return Err(err.into()),
        Found::NotAMessage(reason) => return Ok(Outcome::Skipped { reason }),
    };
    let header = &stored.header;
    // Each wrapd entry, where it is and where it belongs.
    let mut moves = Vec::new();
    for (i, entry) in header.data_keys.iter().enumerate() {
        if !is_wrapd_entry(entry) {
            continue;
        }
        let Some(source) = blob_key_version(&entry.ciphertext) else {
            continue;
        };
        let destination = rewrapper.destination(&source).await?;
        let destination = destination.unwrap_or_else(|| source.clone());
        moves.push((i, source, destination));
    }
    if moves.is_empty() {
        return Ok(Outcome::Skipped {
            reason: "no wrapd data key".into(),
        });
    }
    let behind: Vec<_> = moves.iter().filter(|(_, s, d)| s != d).collect();
    if behind.is_empty() {
        return Ok(Outcome::UpToDate);
    }
    if stored.is_signed() {
        return Err(ClientError::new(
            Failure::Invalid,
            "a signed message (algorithm suite 0x0578) cannot be re-wrapped: its signature covers the header, and the signing key was discarded when it was written",
        ));
    }
    let from: Vec<KeyVersion> = behind.iter().map(|(_, s, _)| s.clone()).collect();
    if meta.nlink() > 1 {
        return Err(ClientError::new(
            Failure::WrongState,
            "the file has several hard links: replacing it would leave the other names under the old version",
        ));
    }
    if dry_run {
        return Ok(Outcome::WouldRewrap {
            from,
            to: behind.iter().map(|(_, _, d)| d.clone()).collect(),
        });
    }
    // The data key, from any wrapd entry: it authenticates the header before anything is
    // re-wrapped, and the new header after.
    let dek = rewrapper
        .unwrap(&header.data_keys[moves[0].0].ciphertext, &header.context)
        .await?;
    stored.verify(&dek)?;
    let mut entries = header.data_keys.clone();
    let mut to = Vec::new();
    for (i, source, destination) in &behind {
        // Every entry moved must hold the message's own data key: a planted entry (another
        // key's data key, under this message's context) is never re-wrapped.
        if *i != moves[0].0 {
            let other = rewrapper
                .unwrap(&entries[*i].ciphertext, &header.context)
                .await?;
            if !constant_time_eq(&other, &dek) {
                return Err(ClientError::new(
                    Failure::Invalid,
                    "the message's data key entries do not all hold its data key; left as it is",
                ));
            }
        }
        let moving_key = source.key_id != destination.key_id;
        let arn_prefix = {
            let info = String::from_utf8_lossy(&entries[*i].provider_info).into_owned();
            split_arn(&info).map(|(prefix, _)| prefix.to_owned())
        };
        if entries[*i].provider_id != PROVIDER_ID && moving_key && arn_prefix.is_none() {
            return Err(ClientError::new(
                Failure::Invalid,
                "an aws-kms data key entry that does not name its key by ARN cannot move to another key",
            ));
        }
        let (blob, now) = rewrapper
            .rewrap(&entries[*i].ciphertext, &header.context, destination)
            .await?;
        let entry = &mut entries[*i];
        if entry.provider_id == PROVIDER_ID {
            entry.provider_info = now.key_id.clone().into_bytes();
        } else if !names_key(&entry.provider_info, &now.key_id) {
            // An AWS KMS keyring's entry names its key by ARN: the same ARN prefix, the new
            // key, as AWS KMS writes it. (Under the same key, the ARN is kept as written,
            // in whichever spelling: the SDK compares it.)
            if let Some(prefix) = &arn_prefix {
                entry.provider_info =
                    crate::client::keyring::entry_arn("", prefix, &now.key_id).into_bytes();
            }
        }
        entry.ciphertext = blob;
        to.push(now);
    }
    // Several entries moved to one key (`--to`) are one entry.
    let mut seen = std::collections::HashSet::new();
    entries.retain(|e| seen.insert((e.provider_id.clone(), e.provider_info.clone())));
    let new_header = stored.with_data_keys(&dek, &entries)?;
    drop(dek);
    replace(path, &mut file, &stored, &new_header, &before)?;
    Ok(Outcome::Rewrapped { from, to })
}

fn constant_time_eq(a: &[u8], b: &[u8]) -> bool {
    a.len() == b.len() && a.iter().zip(b).fold(0u8, |acc, (x, y)| acc | (x ^ y)) == 0
}

/// Whether an `aws-kms` entry's ARN names key `key_id` (canonical), in either spelling of
/// the id.
fn names_key(info: &[u8], key_id: &str) -> bool {
    let info = String::from_utf8_lossy(info);
    split_arn(&info).is_some_and(|(_, resource)| {
        crate::ids::KeyId::parse_named(resource).is_ok_and(|k| k.as_str() == key_id)
    })
}

/// Writes `new_header` and the original's frames to an unnamed file beside `path`, syncs
/// it, and renames it over `path` if the original is still what was read.
fn replace(
    path: &Path,
    original: &mut File,
    stored: &StoredHeader,
    new_header: &[u8],
    before: &Identity,
) -> Result<(), ClientError> {
    let display = path.display();
    let target = path
        .to_str()
        .ok_or_else(|| format!("{display}: not a UTF-8 path"))?;
    let (output, mut writer) = Output::open(target)?;
    original
        .seek(SeekFrom::Start(stored.len() as u64))
        .map_err(|e| format!("cannot read {display}: {e}"))?;
    writer
        .write_all(new_header)
        .and_then(|()| std::io::copy(original, &mut writer).map(drop))
        .and_then(|()| writer.flush())
        .map_err(|e| format!("cannot write the re-wrapped {display}: {e}"))?;
    drop(writer);
    let now = std::fs::symlink_metadata(path).map_err(|e| format!("cannot read {display}: {e}"))?;
    if Identity::of(&now) != *before {
        return Err(ClientError::new(
            Failure::WrongState,
            format!("{display} changed while it was re-wrapped; left as it is"),
        ));
    }
    // The file's owner, group and permission bits (set-user-id and set-group-id dropped):
    // the service that reads it must still be able to.
    let mode = now.mode() & 0o1777;
    output.commit_durable(Some(mode), Some((now.uid(), now.gid())))?;
    Ok(())
}
