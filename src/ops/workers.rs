//! The operation layer's own threads for data-plane calls.
//!
//! A fixed set of threads (`wrapd-op-N`, as many as the token has sessions,
//! `hsm.max_sessions`) takes jobs from one queue: a call's checks, its key store work and
//! the hand-over of its audit line to the group commit ([`crate::audit::AuditWriter`]). At
//! most one of them at a time waits for the disk, and with no more threads than sessions they
//! never wait for a session; under load they go from one job to the next without parking. This
//! replaced a `spawn_blocking` per call, whose pool grew a thread per call in flight, each
//! parked in turn on a session and on the `fdatasync` (a profile showed the kernel's futex
//! wake-ups costing more than the HSM).
//!
//! Control-plane calls (key management, with metadata writes that may wait on PostgreSQL)
//! stay on tokio's blocking pool, so they never hold up a data key. A data-plane call that
//! finds no other in flight on a local token with the SQLite store skips these threads and
//! runs where it was received ([`super::Gate::run`]).

use std::panic::{AssertUnwindSafe, catch_unwind};
use std::thread::JoinHandle;

use crossbeam_channel::{Receiver, Sender};
use parking_lot::{Mutex, RwLock};

use crate::error::{Error, Result};

/// A job: it reports its own outcome.
pub type Job = Box<dyn FnOnce() + Send + 'static>;

enum Message {
    Run(Job),
    Stop,
}

/// The worker threads and their queue.
pub struct Workers {
    sender: Sender<Message>,
    receiver: Receiver<Message>,
    /// True once stopped; held for reading while a job is sent.
    closed: RwLock<bool>,
    threads: Mutex<Vec<JoinHandle<()>>>,
    /// How many threads were started.
    count: usize,
}

impl Workers {
    /// Starts `count` (at least one) worker threads.
    pub fn start(count: usize) -> Result<Self> {
        let (sender, receiver) = crossbeam_channel::unbounded();
        let mut threads = Vec::with_capacity(count.max(1));
        for n in 0..count.max(1) {
            let receiver = receiver.clone();
            let thread = std::thread::Builder::new()
                .name(format!("wrapd-op-{n}"))
                .spawn(move || work(&receiver))
                .map_err(|e| Error::Internal(format!("cannot start an operation worker: {e}")))?;
            threads.push(thread);
        }
        Ok(Self {
            sender,
            receiver,
            closed: RwLock::new(false),
            count: threads.len(),
            threads: Mutex::new(threads),
        })
    }

    /// How many worker threads were started.
    pub fn count(&self) -> usize {
        self.count
    }

    /// Queues `job`. After [`Workers::shutdown`] the job runs on tokio's blocking pool
    /// instead (must be called within a tokio runtime then).
    pub fn submit(&self, job: Job) {
        {
            let closed = self.closed.read();
            if !*closed {
                // The receiver lives in `self`: sending cannot fail.
                let _ = self.sender.send(Message::Run(job));
                return;
            }
        }
        drop(tokio::task::spawn_blocking(job));
    }

    /// Runs every queued job, then stops the threads and waits for them (blocking).
    pub fn shutdown(&self) {
        {
            let mut closed = self.closed.write();
            if *closed {
                return;
            }
            *closed = true;
            let threads = self.threads.lock().len();
            for _ in 0..threads {
                let _ = self.sender.send(Message::Stop);
            }
        }
        let this = std::thread::current().id();
        for thread in self.threads.lock().drain(..) {
            // The last owner may be a job on one of the workers: it does not wait for itself.
            if thread.thread().id() != this {
                let _ = thread.join();
            }
        }
        // Jobs no thread took (none, unless a thread died): run here.
        for message in self.receiver.try_iter() {
            if let Message::Run(job) = message {
                run(job);
            }
        }
    }
}

impl Drop for Workers {
    fn drop(&mut self) {
        self.shutdown();
    }
}

fn work(receiver: &Receiver<Message>) {
    while let Ok(Message::Run(job)) = receiver.recv() {
        run(job);
    }
}

/// Runs a job; a panic ends the job, not the thread (jobs catch their own panics to report
/// them: this is the last resort).
fn run(job: Job) {
    if catch_unwind(AssertUnwindSafe(job)).is_err() {
        tracing::error!("an operation job panicked");
    }
}

#[cfg(test)]
mod tests {
    use std::sync::Arc;
    use std::sync::atomic::{AtomicUsize, Ordering};

    use super::*;

    #[test]
    fn every_job_queued_before_shutdown_runs() {
        let workers = Workers::start(3).unwrap();
        let done = Arc::new(AtomicUsize::new(0));
        for _ in 0..1000 {
            let done = done.clone();
            workers.submit(Box::new(move || {
                done.fetch_add(1, Ordering::Relaxed);
            }));
        }
        workers.shutdown();
        assert_eq!(done.load(Ordering::Relaxed), 1000);
    }

    #[test]
    fn the_workers_can_be_dropped_by_one_of_their_own_jobs() {
        let workers = Arc::new(Workers::start(2).unwrap());
        let (tx, rx) = std::sync::mpsc::channel();
        let last = workers.clone();
        drop(workers);
        let holder = Arc::new(Mutex::new(Some(last)));
        let job_holder = holder.clone();
        holder.lock().as_ref().unwrap().submit(Box::new(move || {
            // The job drops the last handle: shutdown runs on a worker thread.
            drop(job_holder.lock().take());
            tx.send(()).unwrap();
        }));
        drop(holder);
        rx.recv_timeout(std::time::Duration::from_secs(10))
            .expect("the job finished: no worker waited for itself");
    }

    #[test]
    fn a_panicking_job_leaves_its_thread_serving() {
        let workers = Workers::start(1).unwrap();
        workers.submit(Box::new(|| panic!("job panics")));
        let (tx, rx) = std::sync::mpsc::channel();
        workers.submit(Box::new(move || {
            tx.send(std::thread::current().name().map(str::to_owned))
                .unwrap()
        }));
        let name = rx.recv_timeout(std::time::Duration::from_secs(10)).unwrap();
        assert_eq!(name.as_deref(), Some("wrapd-op-0"));
    }
}
