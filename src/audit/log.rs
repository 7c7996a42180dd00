//! The audit log writer: appends hash-chained lines, fails closed, anchors its chain in the
//! metadata store.
//!
//! Locks, always taken in this order: `state` (the file lines are written to, the chain's
//! tail), then `sync` (the file `fdatasync` runs on), then `written` (a leaf: the last line
//! written). [`AuditLog::append`] takes `state` to write and then `sync` to wait for the
//! disk, never both at once; [`AuditLog::reopen`] takes both, in that order. (In the other
//! order, a SIGHUP under load deadlocks the daemon.)
//!
//! The chain head (seq + hash of the last durable line) is recorded in the metadata store
//! ([`HeadStore`]) at open, at every reopen, every second by the daemon's background task
//! ([`AuditLog::record_head`]) and at shutdown. At start-up the file must reach the recorded
//! head; if it does not (a truncated tail, a file replaced or deleted while the daemon was
//! stopped), the daemon refuses to start unless the operator accepts the gap, which is then
//! written into the chain as an explicit [`GAP`] record that `wrapctl audit verify` reports.
//! A torn last line (a crash with `fsync = "never"`, a partial write on ENOSPC) is cut off
//! rather than glued to the next record.

use sha2::{Digest, Sha256};
use std::fs::{File, OpenOptions};
use std::io::{BufRead, BufReader, Read, Seek, SeekFrom, Write};
use std::os::unix::fs::OpenOptionsExt;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::SystemTime;

use parking_lot::Mutex;
use serde::Deserialize;
use tokio::sync::watch;

use super::{AuditRecord, ChainHead, DAEMON_PRINCIPAL, GAP, GENESIS, REOPENED};
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

/// Where the daemon records its chain head, outside the audit file (the metadata store).
/// `chain` names the log (its absolute path), so that each daemon of a fleet keeps its own.
pub trait HeadStore: Send + Sync + 'static {
    /// The head recorded for `chain`, if any.
    fn audit_head(&self, chain: &str) -> Result<Option<ChainHead>>;
    /// Records the head of `chain` (it only moves forward).
    fn record_audit_head(&self, chain: &str, head: &ChainHead) -> Result<()>;
    /// The daemon's name in a fleet, which every line of its log carries (`None`: one
    /// daemon).
    fn instance(&self) -> Option<&str> {
        None
    }
}

/// How [`AuditLog::open`] treats a log that does not reach its recorded head.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum GapPolicy {
    /// Refuse to open (start-up fails with the reason and the way out).
    #[default]
    Refuse,
    /// Write a [`GAP`] record saying what is missing, and continue.
    Record,
}

struct State {
    file: Option<File>,
    seq: u64,
    prev: String,
    /// Length of a regular file up to the end of its last complete line; `None` for a
    /// device or pipe (nothing to cut).
    len: Option<u64>,
    /// A failed write may have left a partial line past `len`: cut it before the next one.
    torn: bool,
}

/// Group commit: one `fdatasync` covers every line written before it started.
struct SyncState {
    file: Option<File>,
    synced: u64,
    /// The newest line known to be on disk (or written, with [`FsyncPolicy::Never`]).
    durable: Option<ChainHead>,
}

/// The audit log. When a line cannot be written, [`AuditLog::append`] fails (the caller
/// then fails the operation) and the log reports itself unhealthy until a write succeeds
/// again (after the disk is fixed, or a reopen).
pub struct AuditLog {
    path: PathBuf,
    chain: String,
    fsync: FsyncPolicy,
    state: Mutex<State>,
    sync: Mutex<SyncState>,
    written: Mutex<ChainHead>,
    heads: Option<Arc<dyn HeadStore>>,
    /// The fleet instance every line names, also the log's own (a reopen, a gap).
    instance: Option<String>,
    recorded: Mutex<u64>,
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

/// The longest audit line: records are small (the context's keys are bounded by the 8 KiB
/// context limit), so a file whose last newline is further back than this is not a log.
const MAX_LINE: u64 = 256 * 1024;

/// Cuts a torn last line (bytes after the last newline) off a regular file; returns the
/// length of the file afterwards and how many bytes were cut.
fn cut_torn_tail(file: &mut File) -> std::io::Result<(u64, u64)> {
    let len = file.seek(SeekFrom::End(0))?;
    if len == 0 {
        return Ok((0, 0));
    }
    let start = len.saturating_sub(MAX_LINE);
    file.seek(SeekFrom::Start(start))?;
    let mut tail = Vec::new();
    file.take(MAX_LINE).read_to_end(&mut tail)?;
    let keep = match tail.iter().rposition(|b| *b == b'\n') {
        Some(i) => start + i as u64 + 1,
        None if start == 0 => 0,
        None => {
            return Err(std::io::Error::other(
                "no line end in the last 256 KiB: not an audit log",
            ));
        }
    };
    if keep < len {
        file.set_len(keep)?;
        file.sync_data()?;
    }
    Ok((keep, len - keep))
}

/// The last line of a file (after [`cut_torn_tail`]) as a record. `Err` if it does not
/// parse: an edited log the daemon must not extend.
fn last_record(file: &mut File, len: u64) -> std::io::Result<Option<AuditRecord>> {
    if len == 0 {
        return Ok(None);
    }
    let start = len.saturating_sub(MAX_LINE);
    file.seek(SeekFrom::Start(start))?;
    let mut tail = Vec::new();
    file.take(len - start).read_to_end(&mut tail)?;
    let body = tail.strip_suffix(b"\n").unwrap_or(&tail);
    let line = match body.iter().rposition(|b| *b == b'\n') {
        Some(i) => &body[i + 1..],
        None => body,
    };
    serde_json::from_slice(line)
        .map(Some)
        .map_err(|e| std::io::Error::other(format!("its last line is not an audit record ({e})")))
}

/// Whether the file (a regular file) holds the recorded head: the record with its seq and
/// hash, or a first record that follows it directly.
fn reaches(file: &File, head: &ChainHead) -> std::io::Result<bool> {
    let mut reader = BufReader::new(file.try_clone()?);
    reader.seek(SeekFrom::Start(0))?;
    let mut first = true;
    for line in reader.lines() {
        let Ok(record) = serde_json::from_str::<AuditRecord>(&line?) else {
            return Ok(false);
        };
        if first && record.prev == head.hash && head.seq.checked_add(1) == Some(record.seq) {
            return Ok(true);
        }
        first = false;
        if record.seq == head.seq {
            return Ok(record.hash == head.hash);
        }
    }
    Ok(false)
}

impl AuditLog {
    /// Opens (creating, mode 0600) the log without a head store (tests, tools).
    pub fn open(path: &Path, fsync: FsyncPolicy) -> Result<Self> {
        Self::open_anchored(path, fsync, None, GapPolicy::Refuse)
    }

    /// Opens (creating, mode 0600) the log and continues its chain, checking it against the
    /// head recorded in `heads` (see the module docs).
    pub fn open_anchored(
        path: &Path,
        fsync: FsyncPolicy,
        heads: Option<Arc<dyn HeadStore>>,
        gaps: GapPolicy,
    ) -> Result<Self> {
        let config = |what: &str, e: &dyn std::fmt::Display| {
            Error::Config(format!("audit log {}: {what}: {e}", path.display()))
        };
        let mut file = open_append(path).map_err(|e| config("cannot open", &e))?;
        let regular = file.metadata().map_err(|e| config("stat", &e))?.is_file();
        let chain = std::path::absolute(path)
            .unwrap_or_else(|_| path.to_owned())
            .display()
            .to_string();
        let mut len = None;
        let mut last = None;
        if regular {
            let (kept, cut) = cut_torn_tail(&mut file).map_err(|e| config("cannot repair", &e))?;
            if cut > 0 {
                tracing::warn!(path = %path.display(), bytes = cut, "audit log: cut a torn last line (a write that never completed)");
            }
            last = last_record(&mut file, kept).map_err(|e| {
                config(
                    "refusing to extend it (check it with `wrapctl audit verify`, move it aside)",
                    &e,
                )
            })?;
            len = Some(kept);
        }
        let (seq, prev) = last
            .as_ref()
            .map_or((0, GENESIS.to_owned()), |r| (r.seq, r.hash.clone()));
        let sync_file = file.try_clone().map_err(|e| config("cannot clone", &e))?;
        let log = Self {
            path: path.to_owned(),
            instance: heads.as_ref().and_then(|h| h.instance()).map(str::to_owned),
            chain,
            fsync,
            state: Mutex::new(State {
                file: Some(file),
                seq,
                prev: prev.clone(),
                len,
                torn: false,
            }),
            sync: Mutex::new(SyncState {
                file: Some(sync_file),
                synced: seq,
                durable: None,
            }),
            written: Mutex::new(ChainHead {
                seq,
                hash: prev.clone(),
            }),
            heads,
            recorded: Mutex::new(0),
            healthy: watch::channel(true).0,
        };
        if regular {
            log.check_head(seq, &prev, gaps)?;
        }
        tracing::info!(path = %path.display(), seq, anchor = %prev, "audit log open");
        Ok(log)
    }

    /// Start-up: the file must reach the head recorded in the store.
    fn check_head(&self, seq: u64, last_hash: &str, gaps: GapPolicy) -> Result<()> {
        let Some(heads) = &self.heads else {
            return Ok(());
        };
        let recorded = heads.audit_head(&self.chain)?;
        let Some(head) = recorded else {
            if seq > 0 {
                tracing::warn!(path = %self.path.display(), "no chain head recorded for this audit log yet: recording it from now on");
            }
            return self.record_head();
        };
        let reached = (seq == head.seq && last_hash == head.hash)
            || (seq > head.seq && {
                let state = self.state.lock();
                state
                    .file
                    .as_ref()
                    .map(|f| reaches(f, &head))
                    .transpose()
                    .map_err(|e| Error::Config(format!("audit log: {e}")))?
                    .unwrap_or(false)
            });
        if !reached {
            let what = format!(
                "the audit log {} ends at seq {seq} (hash {last_hash}) and does not reach the head recorded in the metadata store, seq {} (hash {}): lines were removed, or the file was replaced or deleted",
                self.path.display(),
                head.seq,
                head.hash
            );
            match gaps {
                GapPolicy::Refuse => {
                    return Err(Error::Config(format!(
                        "{what}. Keep the file for investigation; to go on, start wrapd with --accept-audit-gap, which records the gap in the log"
                    )));
                }
                GapPolicy::Record => {
                    tracing::error!("{what}; recording the gap (--accept-audit-gap)");
                    // The gap record takes the number after the recorded head, so that
                    // sequence numbers never repeat; it says what it skips.
                    {
                        let mut state = self.state.lock();
                        state.seq = state.seq.max(head.seq);
                    }
                    self.append(AuditRecord {
                        request_id: format!("gap-{}-{}", head.seq, seq),
                        principal: DAEMON_PRINCIPAL.to_owned(),
                        transport: "internal".to_owned(),
                        operation: GAP.to_owned(),
                        outcome: "OK".to_owned(),
                        error: Some(what),
                        ..Default::default()
                    })?;
                }
            }
        }
        self.record_head()
    }

    /// The log's file.
    pub fn path(&self) -> &Path {
        &self.path
    }

    /// Reopens the file (after log rotation: the new file's first line, a [`REOPENED`]
    /// record, anchors to the last hash of the old one). Lines already written to the old
    /// file are synced before the swap. On failure the log is unhealthy until it succeeds.
    pub fn reopen(&self) -> Result<()> {
        let mut state = self.state.lock();
        if let Some(old) = &state.file {
            if let Err(e) = old.sync_data() {
                tracing::warn!(error = %e, "audit log: cannot sync the file being rotated away");
            }
        }
        let opened = open_append(&self.path).and_then(|f| {
            let len = if f.metadata()?.is_file() {
                Some(f.metadata()?.len())
            } else {
                None
            };
            Ok((f.try_clone()?, f, len))
        });
        match opened {
            Ok((sync_file, file, len)) => {
                if len.is_some_and(|l| l > 0) {
                    tracing::warn!(path = %self.path.display(), "audit log reopened onto a file that is not empty; appending to it");
                }
                state.file = Some(file);
                state.len = len;
                state.torn = false;
                {
                    let mut sync = self.sync.lock();
                    sync.file = Some(sync_file);
                    // Everything written before was synced above (or is lost with the
                    // old file's disk, which a retry here could not help).
                    sync.synced = state.seq;
                    sync.durable = Some(self.written.lock().clone());
                }
                tracing::info!(path = %self.path.display(), anchor = %state.prev, seq = state.seq, "audit log reopened");
                let marker = AuditRecord {
                    request_id: format!("reopen-{}", state.seq),
                    principal: DAEMON_PRINCIPAL.to_owned(),
                    transport: "internal".to_owned(),
                    operation: REOPENED.to_owned(),
                    outcome: "OK".to_owned(),
                    ..Default::default()
                };
                let seq = self.write_locked(&mut state, vec![marker])?;
                drop(state);
                if self.fsync == FsyncPolicy::Always {
                    self.sync_through(seq)?;
                }
                if let Err(err) = self.record_head() {
                    tracing::warn!(error = %err, "cannot record the audit chain head");
                }
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
        self.append_all(vec![record])
    }

    /// Appends records in order (a batch call's items, the audit writer's queue) with one
    /// `write` and, with [`FsyncPolicy::Always`], waits until the last is on disk: one
    /// `fdatasync` covers them all. An error means none is written (a partial write is cut
    /// back) or none may be durable.
    pub fn append_all(&self, records: Vec<AuditRecord>) -> Result<()> {
        if records.is_empty() {
            return Ok(());
        }
        let seq = {
            let mut state = self.state.lock();
            self.write_locked(&mut state, records)?
        };
        if self.fsync == FsyncPolicy::Always {
            self.sync_through(seq)?;
        }
        Ok(())
    }

    /// Waits until line `seq` is on disk. Takes only the `sync` lock.
    fn sync_through(&self, seq: u64) -> Result<()> {
        let mut sync = self.sync.lock();
        if sync.synced >= seq {
            return Ok(()); // another caller's fdatasync covered this line
        }
        // Everything written so far is covered by the sync below.
        let target = self.written.lock().clone();
        let result = match sync.file.as_ref() {
            Some(file) => file.sync_data(),
            None => Err(std::io::Error::other("not open")),
        };
        match result {
            Ok(()) => {
                sync.synced = target.seq;
                sync.durable = Some(target);
                Ok(())
            }
            Err(e) => Err(self.failed(&e)),
        }
    }

    fn failed(&self, e: &std::io::Error) -> Error {
        metrics::counter!("wrapd_audit_failures_total").increment(1);
        if *self.healthy.borrow() {
            tracing::error!(path = %self.path.display(), error = %e, "cannot write the audit log: failing closed");
        }
        self.healthy.send_replace(false);
        Error::Unavailable("the audit log cannot be written; key operations are refused".into())
    }

    /// Writes the records' lines with `state` held, in one `write`; returns the last one's
    /// sequence number. Nothing changes in `state` unless every line is written.
    fn write_locked(&self, state: &mut State, records: Vec<AuditRecord>) -> Result<u64> {
        let mut seq = state.seq;
        let mut prev = state.prev.clone();
        let mut lines = Vec::with_capacity(records.len() * 512);
        for mut record in records {
            seq = seq
                .checked_add(1)
                .ok_or_else(|| Error::Internal("audit sequence exhausted".into()))?;
            if record.instance.is_none() {
                record.instance.clone_from(&self.instance);
            }
            record.seq = seq;
            record.time = prost_types::Timestamp::from(SystemTime::now()).to_string();
            record.prev = prev;
            prev = Self::encode_line(record, &mut lines)?;
        }
        let written = match state.file.as_mut() {
            None => Err(std::io::Error::other("not open")),
            Some(file) => Self::write_line(file, state.len, &mut state.torn, &lines),
        };
        match written {
            Ok(()) => {
                if let Some(len) = &mut state.len {
                    *len += lines.len() as u64;
                }
                state.seq = seq;
                state.prev = prev.clone();
                {
                    let mut written = self.written.lock();
                    written.seq = seq;
                    written.hash = prev;
                }
                if self.fsync == FsyncPolicy::Never {
                    self.sync.lock().durable = Some(self.written.lock().clone());
                }
                if !*self.healthy.borrow() {
                    tracing::info!("audit log writable again");
                    self.healthy.send_replace(true);
                }
                Ok(seq)
            }
            Err(e) => Err(self.failed(&e)),
        }
    }

    /// Appends the line of `record` (with its `seq`, `time` and `prev` set) to `out`, and
    /// returns its hash.
    fn encode_line(mut record: AuditRecord, out: &mut Vec<u8>) -> Result<String> {
        // One serialization: the record with `hash` empty is what the hash covers
        // (`AuditRecord::compute_hash`); `hash` is its last field, so the line is that text
        // with the hash put between the final quotes.
        record.hash = String::new();
        let start = out.len();
        serde_json::to_writer(&mut *out, &record)
            .map_err(|e| Error::Internal(format!("audit record: {e}")))?;
        let hash = hex::encode(Sha256::digest(&out[start..]));
        if !out.ends_with(br#""hash":""}"#) {
            out.truncate(start);
            return Err(Error::Internal(
                "audit record: hash is not the last field".into(),
            ));
        }
        out.truncate(out.len() - 2);
        out.extend_from_slice(hash.as_bytes());
        out.extend_from_slice(b"\"}\n");
        debug_assert_eq!(
            {
                record.hash = hash.clone();
                record.compute_hash()
            },
            hash
        );
        Ok(hash)
    }

    /// Writes `line` at the end of `file`. A partial line left by an earlier failed write is
    /// cut first (`len` is where the last complete line ends), so that every record starts a
    /// line of its own; a write that fails now is cut back at once if possible.
    fn write_line(
        file: &mut File,
        len: Option<u64>,
        torn: &mut bool,
        line: &[u8],
    ) -> std::io::Result<()> {
        if *torn {
            if let Some(len) = len {
                file.set_len(len)?;
            }
            *torn = false;
        }
        let result = file.write_all(line);
        if result.is_err() {
            if let Some(len) = len {
                *torn = file.set_len(len).is_err();
            }
        }
        result
    }

    /// Records the newest durable line as the chain head in the store, if it moved.
    /// The daemon calls this every second, and at reopen and shutdown.
    pub fn record_head(&self) -> Result<()> {
        let Some(heads) = &self.heads else {
            return Ok(());
        };
        let head = {
            let sync = self.sync.lock();
            match &sync.durable {
                Some(head) => head.clone(),
                None => self.written.lock().clone(),
            }
        };
        let mut recorded = self.recorded.lock();
        if head.seq == 0 || head.seq <= *recorded {
            return Ok(());
        }
        heads.record_audit_head(&self.chain, &head)?;
        *recorded = head.seq;
        Ok(())
    }

    /// Syncs what was written and records the head (graceful shutdown).
    pub fn close(&self) -> Result<()> {
        let seq = self.state.lock().seq;
        self.sync_through(seq)?;
        self.record_head()
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

    /// An in-memory head store.
    #[derive(Default)]
    struct Heads(Mutex<std::collections::HashMap<String, ChainHead>>);

    impl HeadStore for Heads {
        fn audit_head(&self, chain: &str) -> Result<Option<ChainHead>> {
            Ok(self.0.lock().get(chain).cloned())
        }
        fn record_audit_head(&self, chain: &str, head: &ChainHead) -> Result<()> {
            self.0.lock().insert(chain.to_owned(), head.clone());
            Ok(())
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
        let after = verify(new.as_bytes(), Some(&verified.last_hash), None).unwrap();
        assert_eq!(after.records, 2, "the reopen marker and the new line");
        assert!(new.lines().next().unwrap().contains(REOPENED));
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

    /// A torn last line is cut off, not glued to the next record.
    #[test]
    fn a_torn_last_line_is_cut_and_the_chain_goes_on() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("audit.log");
        let log = AuditLog::open(&path, FsyncPolicy::Always).unwrap();
        log.append(entry("Wrap")).unwrap();
        drop(log);
        let mut file = OpenOptions::new().append(true).open(&path).unwrap();
        file.write_all(b"{\"seq\":2,\"time\":\"20").unwrap();
        drop(file);
        let log = AuditLog::open(&path, FsyncPolicy::Always).unwrap();
        log.append(entry("Unwrap")).unwrap();
        let text = std::fs::read_to_string(&path).unwrap();
        assert_eq!(
            verify(text.as_bytes(), Some(GENESIS), None)
                .unwrap()
                .records,
            2
        );
    }

    /// A log whose tail was cut while the daemon was stopped is refused at start-up, and
    /// accepted only as an explicit, verifiable gap.
    #[test]
    fn a_truncated_log_is_refused_then_recorded_as_a_gap() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("audit.log");
        let heads: Arc<dyn HeadStore> = Arc::new(Heads::default());
        let log = AuditLog::open_anchored(
            &path,
            FsyncPolicy::Always,
            Some(heads.clone()),
            GapPolicy::Refuse,
        )
        .unwrap();
        for op in ["a", "b", "c"] {
            log.append(entry(op)).unwrap();
        }
        log.close().unwrap();
        drop(log);
        let text = std::fs::read_to_string(&path).unwrap();
        let first_two: String = text.lines().take(2).map(|l| format!("{l}\n")).collect();
        std::fs::write(&path, first_two).unwrap();

        let refused = AuditLog::open_anchored(
            &path,
            FsyncPolicy::Always,
            Some(heads.clone()),
            GapPolicy::Refuse,
        )
        .err()
        .expect("a truncated log is refused");
        assert!(
            refused.to_string().contains("--accept-audit-gap"),
            "{refused}"
        );

        let log = AuditLog::open_anchored(
            &path,
            FsyncPolicy::Always,
            Some(heads.clone()),
            GapPolicy::Record,
        )
        .unwrap();
        log.append(entry("d")).unwrap();
        let text = std::fs::read_to_string(&path).unwrap();
        let verified = verify(text.as_bytes(), Some(GENESIS), None).unwrap();
        assert_eq!(verified.gaps.len(), 1, "the gap is in the chain");
        assert!(verified.gaps[0].1.contains("seq 3"), "{:?}", verified.gaps);
        // A deleted file is refused the same way.
        drop(log);
        std::fs::remove_file(&path).unwrap();
        assert!(
            AuditLog::open_anchored(&path, FsyncPolicy::Always, Some(heads), GapPolicy::Refuse)
                .is_err()
        );
    }

    /// An acknowledged line written to the old file just before a reopen is synced before
    /// the swap.
    #[test]
    fn reopen_syncs_the_old_file_and_records_the_head() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("audit.log");
        let heads: Arc<dyn HeadStore> = Arc::new(Heads::default());
        let log = AuditLog::open_anchored(
            &path,
            FsyncPolicy::Always,
            Some(heads.clone()),
            GapPolicy::Refuse,
        )
        .unwrap();
        log.append(entry("a")).unwrap();
        std::fs::rename(&path, dir.path().join("old")).unwrap();
        log.reopen().unwrap();
        let head = heads.audit_head(&log.chain).unwrap().unwrap();
        assert_eq!(head.seq, 2, "the reopen marker is the head");
    }
}
