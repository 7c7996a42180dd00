//! The audit writer: group commit for the lines of every call and batch, so that at most
//! one thread at a time waits for the disk and the threads doing key operations go on.
//!
//! A submitter queues its records with a completion. If no thread is writing, the submitter
//! becomes the writer: it takes everything queued (up to [`MAX_LINES`] lines), writes it with
//! one `write` and one `fdatasync` ([`AuditLog::append_all`]), calls each completion with
//! the outcome, and goes on while more is queued. Otherwise it returns at once: the current
//! writer takes its records in its next round. A result is therefore still returned only
//! after its line is durable; one `fdatasync` covers every line queued while the previous
//! one ran; under load one operation worker at a time writes while the others go on with key
//! operations; and with a single caller, the line is written on the job's own thread, with
//! no hand-off to a writer thread and back (a hand-off to an idle thread costs tens of
//! microseconds here).

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};

use parking_lot::Mutex;

use super::{AuditLog, AuditRecord};
use crate::error::{Error, ErrorKind, Result};

/// Most lines written with one `fdatasync`.
pub const MAX_LINES: usize = 4096;

/// What a submitter is told when its lines are durable (or cannot be).
pub type Completion = Box<dyn FnOnce(Result<()>) + Send + 'static>;

/// The queue and the writer's token.
pub struct AuditWriter {
    log: Arc<AuditLog>,
    queue: Mutex<Vec<(Vec<AuditRecord>, Completion)>>,
    /// Held by the thread that is writing.
    writing: AtomicBool,
}

impl AuditWriter {
    /// A writer for `log`.
    pub fn new(log: Arc<AuditLog>) -> Self {
        Self {
            log,
            queue: Mutex::new(Vec::new()),
            writing: AtomicBool::new(false),
        }
    }

    /// Queues `records` (written in this order, with no other lines between them); `done`
    /// is called once they are durable, or with the error that keeps them from being so,
    /// on this thread or on the thread that is writing. Blocks only while this thread is the
    /// writer.
    pub fn submit(&self, records: Vec<AuditRecord>, done: Completion) {
        self.queue.lock().push((records, done));
        self.drain();
    }

    /// Like [`AuditWriter::submit`], but a thread that becomes the writer writes one round
    /// (its own lines among them) and stops: for a thread that must not stay the writer
    /// while others keep queueing (a tokio thread). Returns true if lines were left queued
    /// with no writer: the caller must then have [`AuditWriter::drain`] called elsewhere.
    pub fn submit_one_round(&self, records: Vec<AuditRecord>, done: Completion) -> bool {
        self.queue.lock().push((records, done));
        if self
            .writing
            .compare_exchange(false, true, Ordering::Acquire, Ordering::Relaxed)
            .is_err()
        {
            return false; // the writer takes ours in its next round
        }
        let batch = self.take();
        if !batch.is_empty() {
            write_batch(&self.log, batch);
        }
        self.writing.store(false, Ordering::Release);
        !self.queue.lock().is_empty()
    }

    /// Becomes the writer, unless a thread is writing, and writes until nothing is queued.
    pub fn drain(&self) {
        loop {
            if self
                .writing
                .compare_exchange(false, true, Ordering::Acquire, Ordering::Relaxed)
                .is_err()
            {
                return; // the writer takes ours in its next round
            }
            loop {
                let batch = self.take();
                if batch.is_empty() {
                    break;
                }
                write_batch(&self.log, batch);
            }
            self.writing.store(false, Ordering::Release);
            // Something queued between our last look and the release found the token
            // taken: write it, unless another thread has become the writer meanwhile.
            if self.queue.lock().is_empty() {
                return;
            }
        }
    }

    /// The queued submissions, up to [`MAX_LINES`] lines (at least one submission).
    fn take(&self) -> Vec<(Vec<AuditRecord>, Completion)> {
        let mut queue = self.queue.lock();
        let mut lines = 0;
        let count = queue
            .iter()
            .take_while(|(records, _)| {
                let take = lines == 0 || lines + records.len() <= MAX_LINES;
                lines += records.len();
                take
            })
            .count();
        queue.drain(..count).collect()
    }
}

/// Writes a batch with one `fdatasync` and completes its submitters.
fn write_batch(log: &AuditLog, batch: Vec<(Vec<AuditRecord>, Completion)>) {
    let mut records = Vec::with_capacity(batch.iter().map(|(r, _)| r.len()).sum());
    let mut completions = Vec::with_capacity(batch.len());
    for (lines, done) in batch {
        records.extend(lines);
        completions.push(done);
    }
    crate::metrics::record_audit_sync(records.len());
    let appended = log.append_all(records);
    for done in completions {
        done(match &appended {
            Ok(()) => Ok(()),
            Err(err) => Err(shared(err)),
        });
    }
}

/// The error every submitter of a failed batch gets.
fn shared(err: &Error) -> Error {
    match err.kind() {
        ErrorKind::Unavailable => {
            Error::Unavailable("the audit log cannot be written; key operations are refused".into())
        }
        _ => Error::Internal(format!("audit log: {err}")),
    }
}

#[cfg(test)]
mod tests {
    use std::sync::mpsc;

    use super::*;
    use crate::audit::FsyncPolicy;

    fn record(op: &str) -> AuditRecord {
        AuditRecord {
            request_id: format!("r-{op}"),
            operation: op.to_owned(),
            outcome: "OK".to_owned(),
            ..Default::default()
        }
    }

    fn lines(path: &std::path::Path) -> Vec<AuditRecord> {
        let text = std::fs::read_to_string(path).unwrap();
        let verified = crate::audit::verify(text.as_bytes(), None, None);
        assert!(verified.is_ok(), "the chain holds: {verified:?}");
        text.lines()
            .map(|l| serde_json::from_str(l).unwrap())
            .collect()
    }

    #[test]
    fn every_submission_is_durable_in_order_before_its_completion() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("audit.log");
        let log = Arc::new(AuditLog::open(&path, FsyncPolicy::Always).unwrap());
        let writer = Arc::new(AuditWriter::new(log));
        let (tx, rx) = mpsc::channel();
        let threads: Vec<_> = (0..8)
            .map(|t| {
                let (writer, tx, path) = (writer.clone(), tx.clone(), path.clone());
                std::thread::spawn(move || {
                    for i in 0..50 {
                        let (tx, path) = (tx.clone(), path.clone());
                        let name = format!("{t}-{i}");
                        let records =
                            vec![record(&format!("a{name}")), record(&format!("b{name}"))];
                        writer.submit(
                            records,
                            Box::new(move |result| {
                                // At completion, both lines are in the file.
                                let text = std::fs::read_to_string(&path).unwrap();
                                let ok = result.is_ok()
                                    && text.contains(&format!("\"a{name}\""))
                                    && text.contains(&format!("\"b{name}\""));
                                tx.send(ok).unwrap();
                            }),
                        );
                    }
                })
            })
            .collect();
        for thread in threads {
            thread.join().unwrap();
        }
        drop(tx);
        let outcomes: Vec<bool> = rx.iter().collect();
        assert_eq!(outcomes.len(), 400, "every submission completed");
        assert!(outcomes.iter().all(|ok| *ok));
        let written = lines(&path);
        assert_eq!(written.len(), 800);
        // A submission's records are adjacent, in order.
        for pair in written.chunks(2) {
            assert_eq!(pair[0].operation.replacen('a', "b", 1), pair[1].operation);
        }
    }

    #[test]
    fn submissions_queued_during_a_write_go_with_the_next_writers_batch() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("audit.log");
        let log = Arc::new(AuditLog::open(&path, FsyncPolicy::Always).unwrap());
        let writer = AuditWriter::new(log);
        // Another thread holds the writer's token: submissions only queue.
        writer.writing.store(true, Ordering::Release);
        let (tx, rx) = mpsc::channel();
        for op in ["one", "two"] {
            let tx = tx.clone();
            writer.submit(
                vec![record(op)],
                Box::new(move |r| tx.send(r.is_ok()).unwrap()),
            );
        }
        assert!(
            rx.try_recv().is_err(),
            "nothing completes while another thread writes"
        );
        assert!(!path.exists() || std::fs::read_to_string(&path).unwrap().is_empty());
        // The token is free again: the next submitter writes everything queued, in order.
        writer.writing.store(false, Ordering::Release);
        writer.submit(
            vec![record("three")],
            Box::new(move |r| tx.send(r.is_ok()).unwrap()),
        );
        assert_eq!(rx.try_iter().collect::<Vec<_>>(), vec![true, true, true]);
        let ops: Vec<String> = lines(&path).into_iter().map(|r| r.operation).collect();
        assert_eq!(ops, ["one", "two", "three"]);
    }

    #[test]
    fn a_one_round_writer_writes_one_round_and_leaves_the_rest_to_a_drain() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("audit.log");
        let log = Arc::new(AuditLog::open(&path, FsyncPolicy::Always).unwrap());
        let writer = AuditWriter::new(log);
        let (tx, rx) = mpsc::channel();
        // Queued while another thread holds the token: a full round, then one more line.
        writer.writing.store(true, Ordering::Release);
        let full: Vec<_> = (0..MAX_LINES)
            .map(|i| record(&format!("full{i}")))
            .collect();
        for (name, records) in [("full", full), ("next", vec![record("next")])] {
            let tx = tx.clone();
            writer.submit(
                records,
                Box::new(move |r| tx.send((name, r.is_ok())).unwrap()),
            );
        }
        writer.writing.store(false, Ordering::Release);
        let tx_own = tx.clone();
        let left = writer.submit_one_round(
            vec![record("own")],
            Box::new(move |r| tx_own.send(("own", r.is_ok())).unwrap()),
        );
        assert!(left, "what did not fit in the round is left queued");
        assert_eq!(rx.try_iter().collect::<Vec<_>>(), vec![("full", true)]);
        assert!(!writer.writing.load(Ordering::Acquire), "the token is free");
        writer.drain();
        assert_eq!(
            rx.try_iter().collect::<Vec<_>>(),
            vec![("next", true), ("own", true)]
        );
        assert_eq!(lines(&path).len(), MAX_LINES + 2);
        // With nothing queued behind it, one round is all there is.
        let left = writer.submit_one_round(
            vec![record("alone")],
            Box::new(move |r| tx.send(("alone", r.is_ok())).unwrap()),
        );
        assert!(!left);
        assert_eq!(rx.try_iter().collect::<Vec<_>>(), vec![("alone", true)]);
    }
}
