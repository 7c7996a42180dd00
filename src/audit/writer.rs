//! The audit writer: one thread that appends the lines of every call and batch and runs the
//! group commit, so that the threads doing key operations never wait for the disk.
//!
//! A submitter hands over its records with a completion; the writer takes everything queued
//! (up to [`MAX_LINES`] lines), writes it with one `write` and one `fdatasync`
//! ([`AuditLog::append_all`]), then calls each completion with the outcome. A result is
//! therefore still returned only after its line is durable, while the HSM workers go on to
//! the next call, and one `fdatasync` covers every line queued while the previous one ran.
//!
//! After [`AuditWriter::shutdown`], submissions are appended on the submitting thread
//! (nothing is lost at shutdown; the caller then blocks like [`AuditLog::append`]).

use std::sync::Arc;
use std::thread::JoinHandle;

use crossbeam_channel::{Receiver, Sender};
use parking_lot::{Mutex, RwLock};

use super::{AuditLog, AuditRecord};
use crate::error::{Error, ErrorKind, Result};

/// Most lines written with one `fdatasync`.
pub const MAX_LINES: usize = 4096;

/// What a submitter is told when its lines are durable (or cannot be).
pub type Completion = Box<dyn FnOnce(Result<()>) + Send + 'static>;

enum Message {
    Append(Vec<AuditRecord>, Completion),
    Stop,
}

/// The writer thread and its queue.
pub struct AuditWriter {
    log: Arc<AuditLog>,
    sender: Sender<Message>,
    receiver: Receiver<Message>,
    /// True once stopped; held for reading while a message is sent, so that nothing is sent
    /// after the writer's last read.
    closed: RwLock<bool>,
    thread: Mutex<Option<JoinHandle<()>>>,
}

impl AuditWriter {
    /// Starts the writer thread (`wrapd-audit`) for `log`.
    pub fn start(log: Arc<AuditLog>) -> Result<Self> {
        let (sender, receiver) = crossbeam_channel::unbounded();
        let thread = {
            let (log, receiver) = (log.clone(), receiver.clone());
            std::thread::Builder::new()
                .name("wrapd-audit".into())
                .spawn(move || write_loop(&log, &receiver))
                .map_err(|e| Error::Internal(format!("cannot start the audit writer: {e}")))?
        };
        Ok(Self {
            log,
            sender,
            receiver,
            closed: RwLock::new(false),
            thread: Mutex::new(Some(thread)),
        })
    }

    /// Queues `records` (written in this order, with no other lines between them) and
    /// calls `done` once they are durable, or with the error that keeps them from being so.
    pub fn submit(&self, records: Vec<AuditRecord>, done: Completion) {
        {
            let closed = self.closed.read();
            if !*closed {
                // The receiver lives in `self`: sending cannot fail.
                let _ = self.sender.send(Message::Append(records, done));
                return;
            }
        }
        done(self.log.append_all(records));
    }

    /// Writes what is queued, stops the thread and waits for it. Later submissions are
    /// appended on the submitting thread.
    pub fn shutdown(&self) {
        {
            let mut closed = self.closed.write();
            if *closed {
                return;
            }
            *closed = true;
            let _ = self.sender.send(Message::Stop);
        }
        if let Some(thread) = self.thread.lock().take() {
            if thread.join().is_err() {
                tracing::error!("the audit writer thread panicked");
            }
        }
        // Whatever the thread did not take (it panicked): written here.
        let rest: Vec<Message> = self.receiver.try_iter().collect();
        write_batch(&self.log, rest);
    }
}

impl Drop for AuditWriter {
    fn drop(&mut self) {
        self.shutdown();
    }
}

fn write_loop(log: &AuditLog, receiver: &Receiver<Message>) {
    while let Ok(first) = receiver.recv() {
        let mut batch = vec![first];
        let mut lines = batch_lines(&batch);
        while lines < MAX_LINES {
            match receiver.try_recv() {
                Ok(message) => {
                    lines += batch_lines(std::slice::from_ref(&message));
                    batch.push(message);
                }
                Err(_) => break,
            }
        }
        if !write_batch(log, batch) {
            return;
        }
    }
}

fn batch_lines(batch: &[Message]) -> usize {
    batch
        .iter()
        .map(|m| match m {
            Message::Append(records, _) => records.len(),
            Message::Stop => 0,
        })
        .sum()
}

/// Writes a batch with one `fdatasync` and completes its submitters; false once the batch
/// held the stop message (the loop ends).
fn write_batch(log: &AuditLog, batch: Vec<Message>) -> bool {
    let mut records = Vec::with_capacity(batch_lines(&batch));
    let mut completions = Vec::with_capacity(batch.len());
    let mut go_on = true;
    for message in batch {
        match message {
            Message::Append(lines, done) => {
                records.extend(lines);
                completions.push(done);
            }
            Message::Stop => go_on = false,
        }
    }
    if !completions.is_empty() {
        let appended = log.append_all(records);
        for done in completions {
            done(match &appended {
                Ok(()) => Ok(()),
                Err(err) => Err(shared(err)),
            });
        }
    }
    go_on
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
        let writer = AuditWriter::start(log.clone()).unwrap();
        let (tx, rx) = mpsc::channel();
        for i in 0..200 {
            let (tx, path) = (tx.clone(), path.clone());
            let records = vec![record(&format!("a{i}")), record(&format!("b{i}"))];
            writer.submit(
                records,
                Box::new(move |result| {
                    // At completion, both lines are in the file.
                    let text = std::fs::read_to_string(&path).unwrap();
                    let ok = result.is_ok()
                        && text.contains(&format!("\"a{i}\""))
                        && text.contains(&format!("\"b{i}\""));
                    tx.send(ok).unwrap();
                }),
            );
        }
        drop(tx);
        let outcomes: Vec<bool> = rx.iter().collect();
        assert_eq!(outcomes.len(), 200);
        assert!(outcomes.iter().all(|ok| *ok));
        let written = lines(&path);
        assert_eq!(written.len(), 400);
        // A submission's records are adjacent, in order.
        for pair in written.chunks(2) {
            assert_eq!(pair[0].operation.replace('a', "b"), pair[1].operation);
        }
    }

    #[test]
    fn submissions_after_shutdown_are_written_on_the_caller_thread() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("audit.log");
        let log = Arc::new(AuditLog::open(&path, FsyncPolicy::Always).unwrap());
        let writer = AuditWriter::start(log).unwrap();
        writer.shutdown();
        let (tx, rx) = mpsc::channel();
        writer.submit(
            vec![record("late")],
            Box::new(move |result| tx.send(result.is_ok()).unwrap()),
        );
        assert!(rx.try_recv().unwrap(), "completed before submit returned");
        assert_eq!(lines(&path)[0].operation, "late");
    }
}
