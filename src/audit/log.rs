//! The audit log writer: appends hash-chained lines, fails closed.

use std::fs::{File, OpenOptions};
use std::io::{Read, Seek, SeekFrom, Write};
use std::os::unix::fs::OpenOptionsExt;
use std::path::{Path, PathBuf};
use std::sync::Mutex;
use std::time::SystemTime;

use serde::Deserialize;
use tokio::sync::watch;

use super::{AuditRecord, GENESIS};
use crate::error::{Error, Result};

/// When lines reach the disk.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum FsyncPolicy {
    /// `fdatasync` after every line: a returned result is always on disk.
    #[default]
    Always,
    /// Leave it to the OS: faster, a crash can lose the last lines.
    Never,
}

struct State {
    file: Option<File>,
    seq: u64,
    prev: String,
}

/// Group commit: one `fdatasync` covers every line written before it started.
struct SyncState {
    file: Option<File>,
    synced: u64,
}

/// The audit log. When a line cannot be written, [`AuditLog::append`] fails (the caller
/// then fails the operation) and the log reports itself unhealthy until a write succeeds
/// again (after the disk is fixed, or a reopen).
pub struct AuditLog {
    path: PathBuf,
    fsync: FsyncPolicy,
    state: Mutex<State>,
    sync: Mutex<SyncState>,
    healthy: watch::Sender<bool>,
}

fn open_append(path: &Path) -> std::io::Result<File> {
    OpenOptions::new()
        .create(true)
        .append(true)
        .read(true)
        .mode(0o600)
        .open(path)
}

/// The last record of a file that parses, if any.
fn last_record(file: &mut File) -> std::io::Result<Option<AuditRecord>> {
    if !file.metadata()?.is_file() {
        return Ok(None); // a device or pipe: nothing to continue from
    }
    const TAIL: u64 = 64 * 1024;
    let len = file.seek(SeekFrom::End(0))?;
    file.seek(SeekFrom::Start(len.saturating_sub(TAIL)))?;
    let mut tail = Vec::new();
    file.take(TAIL).read_to_end(&mut tail)?;
    let text = String::from_utf8_lossy(&tail);
    Ok(text
        .lines()
        .rev()
        .find_map(|line| serde_json::from_str::<AuditRecord>(line).ok()))
}

impl AuditLog {
    /// Opens (creating, mode 0600) the log and continues its chain.
    pub fn open(path: &Path, fsync: FsyncPolicy) -> Result<Self> {
        let mut file = open_append(path)
            .map_err(|e| Error::Config(format!("cannot open audit log {}: {e}", path.display())))?;
        let last = last_record(&mut file)
            .map_err(|e| Error::Config(format!("cannot read audit log {}: {e}", path.display())))?;
        let (seq, prev) = last.map_or((0, GENESIS.to_owned()), |r| (r.seq, r.hash));
        tracing::info!(path = %path.display(), seq, anchor = %prev, "audit log open");
        let sync_file = file
            .try_clone()
            .map_err(|e| Error::Config(format!("audit log {}: {e}", path.display())))?;
        Ok(Self {
            path: path.to_owned(),
            fsync,
            state: Mutex::new(State {
                file: Some(file),
                seq,
                prev,
            }),
            sync: Mutex::new(SyncState {
                file: Some(sync_file),
                synced: seq,
            }),
            healthy: watch::channel(true).0,
        })
    }

    /// Reopens the file (after log rotation: the new file's first line anchors to the last
    /// hash written, which is logged). On failure the log is unhealthy until it succeeds.
    pub fn reopen(&self) -> Result<()> {
        let mut state = self.state.lock().unwrap_or_else(|e| e.into_inner());
        match open_append(&self.path).and_then(|f| Ok((f.try_clone()?, f))) {
            Ok((sync_file, file)) => {
                state.file = Some(file);
                let mut sync = self.sync.lock().unwrap_or_else(|e| e.into_inner());
                sync.file = Some(sync_file);
                tracing::info!(path = %self.path.display(), anchor = %state.prev, seq = state.seq, "audit log reopened");
                self.healthy.send_replace(true);
                Ok(())
            }
            Err(e) => {
                state.file = None;
                self.healthy.send_replace(false);
                Err(Error::Unavailable(format!(
                    "the audit log cannot be opened: {e}"
                )))
            }
        }
    }

    /// Appends one record (its `seq`, `time`, `prev` and `hash` are set here) and, with
    /// [`FsyncPolicy::Always`], waits until it is on disk
    /// (concurrent callers share one `fdatasync`). An error means the record may not be
    /// durable and the operation must fail.
    pub fn append(&self, record: AuditRecord) -> Result<()> {
        let seq = self.write(record)?;
        if self.fsync == FsyncPolicy::Always {
            self.sync_through(seq)?;
        }
        Ok(())
    }

    fn sync_through(&self, seq: u64) -> Result<()> {
        let mut sync = self.sync.lock().unwrap_or_else(|e| e.into_inner());
        if sync.synced >= seq {
            return Ok(()); // another caller's fdatasync covered this line
        }
        // Everything written so far is covered by the sync below.
        let target = self.state.lock().unwrap_or_else(|e| e.into_inner()).seq;
        let result = match sync.file.as_ref() {
            Some(file) => file.sync_data(),
            None => Err(std::io::Error::other("not open")),
        };
        match result {
            Ok(()) => {
                sync.synced = target;
                Ok(())
            }
            Err(e) => Err(self.failed(&e)),
        }
    }

    fn failed(&self, e: &std::io::Error) -> Error {
        if *self.healthy.borrow() {
            tracing::error!(path = %self.path.display(), error = %e, "cannot write the audit log: failing closed");
        }
        self.healthy.send_replace(false);
        Error::Unavailable("the audit log cannot be written; key operations are refused".into())
    }

    /// Writes one line; returns its sequence number.
    fn write(&self, mut record: AuditRecord) -> Result<u64> {
        let mut state = self.state.lock().unwrap_or_else(|e| e.into_inner());
        record.seq = state.seq + 1;
        record.time = prost_types::Timestamp::from(SystemTime::now()).to_string();
        record.prev = state.prev.clone();
        record.hash = record.compute_hash();
        let mut line = serde_json::to_vec(&record)
            .map_err(|e| Error::Internal(format!("audit record: {e}")))?;
        line.push(b'\n');
        let written = match state.file.as_mut() {
            None => Err(std::io::Error::other("not open")),
            Some(file) => file.write_all(&line),
        };
        match written {
            Ok(()) => {
                state.seq = record.seq;
                state.prev = record.hash;
                if !*self.healthy.borrow() {
                    tracing::info!("audit log writable again");
                    self.healthy.send_replace(true);
                }
                Ok(record.seq)
            }
            Err(e) => Err(self.failed(&e)),
        }
    }

    /// True when appends wait for `fdatasync` ([`FsyncPolicy::Always`]).
    pub fn syncs(&self) -> bool {
        self.fsync == FsyncPolicy::Always
    }

    /// Whether the last write succeeded.
    pub fn is_healthy(&self) -> bool {
        *self.healthy.borrow()
    }

    /// Changes of health, for the health service.
    pub fn subscribe(&self) -> watch::Receiver<bool> {
        self.healthy.subscribe()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::audit::verify;

    fn entry(op: &str) -> AuditRecord {
        AuditRecord {
            request_id: "r".into(),
            principal: "unix:uid=0".into(),
            transport: "unix".into(),
            operation: op.into(),
            outcome: "OK".into(),
            ..Default::default()
        }
    }

    #[test]
    fn chain_continues_across_reopen_and_restart() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("audit.log");
        let log = AuditLog::open(&path, FsyncPolicy::Always).unwrap();
        log.append(entry("CreateKey")).unwrap();
        log.append(entry("Wrap")).unwrap();
        drop(log);
        let log = AuditLog::open(&path, FsyncPolicy::Never).unwrap();
        log.append(entry("Unwrap")).unwrap();
        let text = std::fs::read_to_string(&path).unwrap();
        let verified = verify(text.as_bytes(), Some(GENESIS), None).unwrap();
        assert_eq!(verified.records, 3);

        // Rotation: move the file away, reopen, continue; the new file anchors to the old end.
        std::fs::rename(&path, dir.path().join("audit.log.1")).unwrap();
        log.reopen().unwrap();
        log.append(entry("ReWrap")).unwrap();
        let new = std::fs::read_to_string(&path).unwrap();
        assert!(verify(new.as_bytes(), Some(&verified.last_hash), None).is_ok());
        assert!(verify(new.as_bytes(), Some(GENESIS), None).is_err());
    }

    #[test]
    fn tampering_is_found_at_the_right_line() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("audit.log");
        let log = AuditLog::open(&path, FsyncPolicy::Never).unwrap();
        for op in ["a", "b", "c", "d"] {
            log.append(entry(op)).unwrap();
        }
        let text = std::fs::read_to_string(&path).unwrap();
        let lines: Vec<&str> = text.lines().collect();
        let check = |lines: &[&str]| verify(lines.join("\n").as_bytes(), Some(GENESIS), None);
        let good = check(&lines).unwrap();
        assert_eq!(good.records, 4);

        let mut edited = lines.clone();
        let changed = lines[1].replace("\"outcome\":\"OK\"", "\"outcome\":\"PERMISSION_DENIED\"");
        edited[1] = &changed;
        assert_eq!(check(&edited).unwrap_err().line, 2);

        let mut deleted = lines.clone();
        deleted.remove(2);
        assert_eq!(check(&deleted).unwrap_err().line, 3);

        let mut reordered = lines.clone();
        reordered.swap(1, 2);
        assert_eq!(check(&reordered).unwrap_err().line, 2);

        assert_eq!(
            check(&lines[1..]).unwrap_err().line,
            1,
            "first line removed"
        );
        let truncated = verify(
            lines[..3].join("\n").as_bytes(),
            None,
            Some(&good.last_hash),
        );
        assert_eq!(truncated.unwrap_err().line, 4);
    }

    #[test]
    fn unwritable_log_fails_closed_and_recovers() {
        let log = AuditLog::open(Path::new("/dev/full"), FsyncPolicy::Never).unwrap();
        assert!(log.append(entry("Wrap")).is_err());
        assert!(!log.is_healthy());
    }
}
