//! The gate every call passes: policy checks, and the audit line.
//!
//! [`Gate::run`] takes a [`Call`] and a job (validation, [`Gate::check`] before touching a
//! key, the key store operation), runs the job and hands the call's audit line (for
//! successes, failures and denials alike) to the group commit; the caller gets the result
//! once the line is durable. Data-plane calls run on the operation workers
//! ([`super::workers`]), or, on a local token, one at a time when no other call is in
//! flight, on the tokio thread that received them; others on tokio's blocking pool. The
//! caller cannot cancel any of it: when a deadline fires or a client resets its stream, the
//! front end drops its future, but the job runs on and its line is written, so no state
//! change ever goes unaudited. If the audit line cannot be written, the caller gets
//! [`Error::Unavailable`] instead of the result: the log fails closed. Each call is logged
//! once, here.

use std::panic::{AssertUnwindSafe, catch_unwind};
use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::Instant;

use parking_lot::Mutex;
use tokio::sync::oneshot;

use super::Call;
use super::refusals::{Admit, LINES_PER_WINDOW, RefusalBudget, WINDOW};
use super::workers::{Job, Workers};
use crate::audit::{AuditLog, AuditRecord, AuditWriter};
use crate::auth::{Group, Identity, Operation, PolicyHandle, Target};
use crate::context::EncryptionContext;
use crate::error::{Error, ErrorKind, Result};
use crate::hsm::with_deadline;
use crate::keystore::Keystore;

/// Policy and audit for every front end. Share it in an `Arc`.
pub struct Gate {
    policy: Arc<PolicyHandle>,
    audit: Option<Arc<AuditLog>>,
    instance: Option<String>,
    /// The data plane's threads; without them (unit tests), every job goes to the blocking
    /// pool.
    workers: Option<Workers>,
    /// The fewest items of a batch worth a job of their own (see `batch_jobs`).
    batch_share: usize,
    /// Whether the HSM answers from this host (a lone call's token call then takes tens of
    /// microseconds, not a network round trip: see [`Gate::run`]).
    local_token: bool,
    /// Calls taken whose callers do not have their answer yet or whose jobs are not done
    /// (a data-plane call runs inline while this is zero: see [`Gate::run`]).
    in_flight: AtomicUsize,
    /// Group commit, when lines wait for `fdatasync`; without it, the job's thread appends
    /// its line itself and waits.
    writer: Option<AuditWriter>,
    /// How many unauthenticated refusals get a line of their own.
    refusals: RefusalBudget,
    /// The account of callers without an ARN of their own, for key policies.
    account: String,
}

impl Gate {
    /// A gate with this policy and (optional) audit log.
    pub fn new(policy: Arc<PolicyHandle>, audit: Option<Arc<AuditLog>>) -> Self {
        Self {
            policy,
            audit,
            instance: None,
            workers: None,
            batch_share: LOCAL_BATCH_SHARE,
            local_token: false,
            in_flight: AtomicUsize::new(0),
            writer: None,
            refusals: RefusalBudget::default(),
            account: super::key_policies::DEFAULT_ACCOUNT.to_owned(),
        }
    }

    /// Puts callers without an ARN of their own in `account` (`[aws] account`), for key
    /// policies.
    pub fn with_account(mut self, account: impl Into<String>) -> Self {
        self.account = account.into();
        self
    }

    /// The account of callers without an ARN of their own.
    pub fn account(&self) -> &str {
        &self.account
    }

    /// Runs data-plane jobs on `threads` worker threads of their own (one per HSM session),
    /// and, when audit lines wait for `fdatasync`, has them written by group commit
    /// ([`AuditWriter`]) so that a job's thread does not wait for the disk while another
    /// thread is writing. On a `networked` HSM a batch's items spread over every worker,
    /// since each waits for its round trip rather than for a core.
    pub fn with_workers(mut self, threads: usize, networked: bool) -> Result<Self> {
        self.workers = Some(Workers::start(threads)?);
        self.batch_share = if networked { 1 } else { LOCAL_BATCH_SHARE };
        self.local_token = !networked;
        if let Some(audit) = self.audit.as_ref().filter(|audit| audit.syncs()) {
            self.writer = Some(AuditWriter::new(audit.clone()));
        }
        Ok(self)
    }

    /// Finishes every queued job (and its audit line), and stops the worker threads
    /// (graceful shutdown; blocks). Calls that come later run on the blocking pool.
    pub fn shutdown(&self) {
        if let Some(workers) = &self.workers {
            workers.shutdown();
        }
    }

    /// Names this daemon's instance (in a fleet) on every audit line.
    pub fn with_instance(mut self, instance: Option<String>) -> Self {
        self.instance = instance;
        self
    }

    /// May this caller do the call's operation to `target`? Fails closed while the audit log
    /// is unwritable.
    pub fn check(
        &self,
        call: &Call,
        target: &Target,
        context: Option<&EncryptionContext>,
    ) -> Result<()> {
        self.check_as(call, call.op, target, context)
    }

    /// Like [`Gate::check`], for a permission other than the RPC's own (ReWrap's two ends).
    pub fn check_as(
        &self,
        call: &Call,
        op: Operation,
        target: &Target,
        context: Option<&EncryptionContext>,
    ) -> Result<()> {
        let identity = self.caller(call)?;
        match self.verdict(identity, call, op, target, context, true) {
            Ok(()) => Ok(()),
            Err(why) => {
                if let Some(why) = why {
                    let _ = call.denial.set(why);
                }
                Err(denied(op))
            }
        }
    }

    /// Whether the key policy and the policy file alone allow the call, without the key's
    /// grants (and without recording anything on the call): whether a `CreateGrant` a key
    /// grant allowed must stay within that grant.
    pub fn allows_without_key_grants(&self, call: &Call, op: Operation, target: &Target) -> bool {
        self.caller(call).is_ok_and(|identity| {
            self.verdict(identity, call, op, target, None, false)
                .is_ok()
        })
    }

    /// The call's authenticated caller, while the audit log can be written (calls fail
    /// closed while it cannot).
    pub fn caller<'c>(&self, call: &'c Call) -> Result<&'c crate::auth::Identity> {
        let identity = call
            .identity
            .as_ref()
            .map_err(|refusal| Error::Unauthenticated(refusal.reason.clone()))?;
        if !self.audit_healthy() {
            return Err(Error::Unavailable(
                "the audit log cannot be written; key operations are refused".into(),
            ));
        }
        Ok(identity)
    }

    /// The decision: the key policy first (it may deny, allow on its own with
    /// `key_policies = "grant"`, or leave the call to the policy file), then the policy
    /// file, then (`key_grants`) the key's grants. A refusal says why, when it can.
    fn verdict(
        &self,
        identity: &crate::auth::Identity,
        call: &Call,
        op: Operation,
        target: &Target,
        context: Option<&EncryptionContext>,
        key_grants: bool,
    ) -> std::result::Result<(), Option<String>> {
        let policy = self.policy.current();
        let mut file_decides = true;
        if let Target::Key {
            policy: key_policy, ..
        } = target
        {
            use super::key_policies::{Outcome, decide, default_policy};
            let action = super::key_policies::action_of(call.api_operation.as_deref(), op);
            let outcome = match key_policy {
                Some(key_policy) => decide(
                    key_policy,
                    policy.key_policies(),
                    &self.account,
                    identity,
                    action,
                    context,
                ),
                None => default_policy(&self.account, identity),
            };
            match outcome {
                Outcome::Allowed => return Ok(()),
                Outcome::Denied => return Err(Some("the key policy".into())),
                Outcome::NotAllowed => file_decides = false,
                Outcome::FileDecides => {}
            }
        }
        let attributes = &call.attributes;
        if file_decides && policy.allows(&identity.principals, op, target, context, attributes) {
            return Ok(());
        }
        if key_grants
            && super::key_grants::allow(
                &policy,
                &self.account,
                identity,
                (
                    op,
                    super::key_policies::action_of(call.api_operation.as_deref(), op),
                ),
                target,
                context,
                attributes,
            )
        {
            return Ok(());
        }
        if !file_decides {
            return Err(Some("the key policy".into()));
        }
        Err(policy.explain_denial(&identity.principals, op, target, context, attributes))
    }

    /// Whether `policy`, as a new key's, would deny its creator `PutKeyPolicy` on it (the
    /// key policy alone: the key does not exist for the policy file yet).
    pub fn key_policy_locks_out(
        &self,
        call: &Call,
        policy: &crate::auth::key_policy::KeyPolicy,
    ) -> bool {
        let Ok(identity) = call.identity.as_ref() else {
            return true;
        };
        use super::key_policies::Outcome;
        matches!(
            super::key_policies::decide(
                policy,
                self.policy.current().key_policies(),
                &self.account,
                identity,
                super::key_policies::action(Operation::PutKeyPolicy),
                None,
            ),
            Outcome::Denied | Outcome::NotAllowed
        )
    }

    /// [`Gate::check_some`] by the policy file alone, for batches: a caller whose rights come
    /// only from key policies (`key_policies = "grant"`) makes single calls, so that a caller
    /// with no grant cannot have a thousand items audited per call.
    pub fn check_some_by_file(&self, call: &Call, op: Operation) -> Result<()> {
        let identity = call
            .identity
            .as_ref()
            .map_err(|refusal| Error::Unauthenticated(refusal.reason.clone()))?;
        if self.policy.current().allows_some(&identity.principals, op) {
            Ok(())
        } else {
            Err(denied(op))
        }
    }

    /// For a call whose key cannot be known yet (or at all: an unparseable blob): allowed to
    /// go on (and fail on its input) only if the caller may do `op` on some key. With
    /// `key_policies = "grant"` any key's policy may allow it, which only the key's own check
    /// can tell: every authenticated caller goes on to that check.
    pub fn check_some(&self, call: &Call, op: Operation) -> Result<()> {
        let grant = self.policy.current().key_policies() == crate::auth::KeyPolicies::Grant;
        match self.check_some_by_file(call, op) {
            Err(err) if grant && err.kind() == crate::error::ErrorKind::PermissionDenied => Ok(()),
            other => other,
        }
    }

    /// False while the audit log cannot be written (calls are refused, health and the KMS
    /// plugin's healthz say so).
    pub fn audit_healthy(&self) -> bool {
        self.audit.as_ref().is_none_or(|audit| audit.is_healthy())
    }

    /// Writes an audit line for something the daemon does on its own (no caller), as the
    /// internal principal `wrapd:daemon`. Blocks until the line is durable; an error means
    /// the action must not happen.
    pub fn record_internal(&self, operation: &str, key_id: &str, version: u32) -> Result<()> {
        tracing::info!(operation, key_id, "internal operation");
        metrics::counter!(
            "wrapd_requests_total",
            "service" => "internal",
            "operation" => operation.to_owned(),
            "outcome" => "OK"
        )
        .increment(1);
        let Some(audit) = &self.audit else {
            return Ok(());
        };
        audit.append(AuditRecord {
            request_id: format!("{operation}-{key_id}"),
            principal: crate::audit::DAEMON_PRINCIPAL.to_owned(),
            transport: "internal".to_owned(),
            operation: operation.to_owned(),
            key_id: Some(key_id.to_owned()),
            key_version: Some(version),
            outcome: "OK".to_owned(),
            instance: self.instance.clone(),
            ..Default::default()
        })
    }

    /// Writes the audit line of an authenticated call of an operation wrapd does not have
    /// (no policy operation names it, so no check applies): every signed request leaves a
    /// line. Blocks until the line is durable.
    pub fn record_unsupported(
        &self,
        identity: &Identity,
        request_id: &str,
        api_operation: &str,
        message: &str,
    ) -> Result<()> {
        let Some(audit) = &self.audit else {
            return Ok(());
        };
        audit.append(AuditRecord {
            request_id: request_id.to_owned(),
            principal: identity.principal().to_owned(),
            transport: identity.transport.as_str().to_owned(),
            peer: identity.peer.clone(),
            operation: UNSUPPORTED_OPERATION.to_owned(),
            api_operation: Some(api_operation.to_owned()),
            access_key_id: identity.access_key.clone(),
            outcome: outcome_name(ErrorKind::Unsupported).to_owned(),
            error: Some(bounded_message(message.to_owned())),
            instance: self.instance.clone(),
            ..Default::default()
        })
    }

    /// Whether an unauthenticated refusal gets its own audit line (see `refusals.rs`):
    /// `None` if it is only counted, else the count of the last window's summary line to
    /// write first, if one is due.
    pub(super) fn admit_refusal(&self) -> Option<Option<u64>> {
        match self.refusals.admit(Instant::now()) {
            Admit::Count => None,
            Admit::Audit { summary } => Some(summary),
        }
    }

    /// Writes the summary line of a window of unauthenticated refusals that is over, if
    /// it had refusals without a line (the maintenance pass; blocks).
    pub fn summarize_refusals(&self) {
        if let Some(count) = self.refusals.finished_summary(Instant::now()) {
            self.write_refusal_summary(count);
        }
    }

    /// One line for `count` unauthenticated refusals that had none of their own; kept for
    /// the next summary if it cannot be written.
    pub(super) fn write_refusal_summary(&self, count: u64) {
        tracing::warn!(
            count,
            "unauthenticated requests refused without an audit line each (summarized)"
        );
        let Some(audit) = &self.audit else {
            return;
        };
        let written = audit.append(AuditRecord {
            request_id: format!("refusals-{}", chrono::Utc::now().format("%Y%m%dT%H%M%SZ")),
            principal: crate::audit::DAEMON_PRINCIPAL.to_owned(),
            transport: "internal".to_owned(),
            operation: REFUSAL_SUMMARY.to_owned(),
            outcome: "UNAUTHENTICATED".to_owned(),
            error: Some(format!(
                "{count} unauthenticated requests were refused without an audit line each (more than {LINES_PER_WINDOW} in {} s)",
                WINDOW.as_secs()
            )),
            instance: self.instance.clone(),
            ..Default::default()
        });
        if written.is_err() {
            self.refusals.restore(count);
        }
    }

    /// Runs `job` and then has the call's audit line written, on a thread the caller cannot
    /// cancel (see the module docs), and returns the result once the line is durable. The
    /// caller's deadline bounds the wait for an HSM session.
    pub async fn run<T: Send + 'static>(
        self: &Arc<Self>,
        keystore: &Arc<Keystore>,
        mut call: Call,
        job: impl FnOnce(&Gate, &Keystore, &mut Call) -> Result<T> + Send + 'static,
    ) -> Result<T> {
        let (done, answer) = oneshot::channel();
        let gate = self.clone();
        let keystore = keystore.clone();
        // Data-plane and XKS calls run on the workers (one HSM session each); the admin
        // operations on tokio's blocking pool, so that they never queue behind data keys.
        let on_workers = call.op.group() != Group::Admin;
        let span = request_span(&call, &call.request_id);
        // A data-plane call that finds no other in flight on a local token runs here, on the
        // tokio thread that received it: the hand-over to a worker thread and the wake-up
        // back cost a lone caller more than the token call itself. It holds this thread for
        // the token call and the audit line's `fdatasync`, one call at a time: every call
        // counts as in flight (key management and batches too) until its caller has the
        // answer and its job is done, so the next one goes to the workers and a call run here
        // never waits for a session or a lock another call holds. Never on a networked HSM,
        // whose round trip would hold the thread for a millisecond or more (measured, doing so
        // gained a lone caller nothing on a calm machine), nor with a shared store, whose
        // synchronous PostgreSQL client runs a runtime of its own, which cannot be entered
        // from a tokio thread.
        let (in_flight, alone) = InFlight::enter(self);
        let here = alone
            && on_workers
            && self.local_token
            && self.workers.is_some()
            && !keystore.store_is_shared();
        let job_in_flight = in_flight.clone();
        let task: Job = Box::new(move || {
            let result = {
                let _entered = span.enter();
                // A data-plane or XKS call whose caller has given up before it started does
                // no token work (it would change nothing); an admin call, once accepted,
                // always runs, so that whether it took effect never depends on a queue.
                if on_workers
                    && call
                        .deadline
                        .is_some_and(|deadline| Instant::now() >= deadline)
                {
                    Err(Error::Unavailable(
                        "the call's deadline passed before it could start".into(),
                    ))
                } else {
                    guarded(|| with_deadline(call.deadline, || job(&gate, &keystore, &mut call)))
                }
            };
            record_key(&span, &call);
            gate.log(&call, &result);
            let record = gate.audit.is_some().then(|| gate.record(call, &result));
            let parent = span.clone();
            gate.append(
                &parent,
                record.into_iter().collect(),
                here,
                move |appended| {
                    let result = appended.and(result);
                    record_outcome(&span, &result);
                    let _ = done.send(result);
                },
            );
            drop(job_in_flight);
        });
        if here {
            // Whatever this task woke last waits in this thread's LIFO slot, which the other
            // workers cannot take: let it run before this thread is held. A caller gone
            // meanwhile leaves the job to the workers, which run it and write its line.
            let pending = PendingJob {
                gate: self.clone(),
                job: Some(task),
            };
            tokio::task::yield_now().await;
            pending.run();
        } else {
            self.dispatch(on_workers, task);
        }
        let answer = answered(answer.await);
        drop(in_flight);
        answer
    }

    /// Runs `job` once per call of a batch (each item its own call: policy checks, result,
    /// audit line), in jobs the caller cannot cancel, and has every item's audit line
    /// written with one `fdatasync`. If the lines cannot be written, the whole batch fails
    /// with [`Error::Unavailable`] (the log fails closed).
    ///
    /// A batch of more than `LOCAL_BATCH_SHARE` (16) items is worked on by several jobs at
    /// once (on a networked HSM, every batch of two or more), up to one per worker thread
    /// (each thread holds its own HSM session): each job takes the next item not yet taken
    /// until none is left, so a job that is slow (its thread waits for the token, or starts
    /// late behind other calls) leaves its share to the others.
    /// With one job per batch, a lone caller's batch stayed at about half of the raw PKCS#11
    /// rate (as `wrapd bench` measures it), and on a networked HSM (CloudHSM) it would wait
    /// for each item's round trip in turn. The last job to finish gathers the results and
    /// lines in item order and hands the lines to the group commit.
    pub async fn run_batch<T: Send + 'static, I: Send + 'static>(
        self: &Arc<Self>,
        keystore: &Arc<Keystore>,
        items: Vec<(Call, I)>,
        job: impl Fn(&Gate, &Keystore, &mut Call, I) -> Result<T> + Send + Sync + 'static,
    ) -> Result<Vec<Result<T>>> {
        let (done, answer) = oneshot::channel();
        let data_plane = items.iter().all(|(call, _)| call.op.is_data_plane());
        // One span for the batch (the request id its items' ids extend), one per item.
        let span = items.first().map_or_else(tracing::Span::none, |(call, _)| {
            let id = call.request_id.rsplit_once('.').map_or("", |(id, _)| id);
            request_span(call, id)
        });
        let helpers = self.batch_jobs(data_plane, items.len());
        let (in_flight, _) = InFlight::enter(self);
        let batch = Arc::new(BatchRun {
            _in_flight: in_flight,
            gate: self.clone(),
            keystore: keystore.clone(),
            job,
            span,
            outcomes: items.iter().map(|_| Mutex::new(None)).collect(),
            queue: Mutex::new(items.into_iter().enumerate()),
            running: AtomicUsize::new(helpers),
            done: Mutex::new(Some(done)),
        });
        for _ in 0..helpers {
            let batch = batch.clone();
            self.dispatch(data_plane, Box::new(move || batch.work()));
        }
        drop(batch);
        answered(answer.await)
    }

    /// How many jobs work on a batch of `len` items at once.
    fn batch_jobs(&self, data_plane: bool, len: usize) -> usize {
        match &self.workers {
            Some(workers) if data_plane => {
                workers.count().min(len.div_ceil(self.batch_share)).max(1)
            }
            _ => 1,
        }
    }

    /// Runs a job on the data plane's workers, or on the blocking pool.
    fn dispatch(&self, data_plane: bool, job: Job) {
        match &self.workers {
            Some(workers) if data_plane => workers.submit(job),
            _ => drop(tokio::task::spawn_blocking(job)),
        }
    }

    /// Has `records` written (on this thread, or by the thread writing now) and calls `done` once
    /// they are durable, or with the error that keeps them from being so. With `one_round`
    /// (a tokio thread), this thread writes at most one round of the group commit; lines
    /// queued behind it are written by a worker.
    fn append(
        self: &Arc<Self>,
        request: &tracing::Span,
        records: Vec<AuditRecord>,
        one_round: bool,
        done: impl FnOnce(Result<()>) + Send + 'static,
    ) {
        let Some(audit) = self.audit.as_ref().filter(|_| !records.is_empty()) else {
            return done(Ok(()));
        };
        // The span a result waits in for its line (queue, write, fdatasync).
        let span = tracing::span!(
            target: REQUEST_SPAN_TARGET,
            parent: request,
            tracing::Level::TRACE,
            "audit.append"
        );
        let started = Instant::now();
        let complete = move |appended: Result<()>| {
            crate::metrics::record_audit_append(started.elapsed());
            drop(span);
            done(appended);
        };
        match &self.writer {
            Some(writer) if one_round => {
                if writer.submit_one_round(records, Box::new(complete)) {
                    let gate = self.clone();
                    self.dispatch(
                        true,
                        Box::new(move || {
                            if let Some(writer) = &gate.writer {
                                writer.drain();
                            }
                        }),
                    );
                }
            }
            Some(writer) => writer.submit(records, Box::new(complete)),
            None => {
                let appended = audit.append_all(records);
                complete(appended);
            }
        }
    }

    /// The daemon log's line for a call (and its metrics).
    fn log<R>(&self, call: &Call, result: &Result<R>) {
        let latency = call.started.elapsed();
        crate::metrics::record_call(
            call.identity
                .as_ref()
                .map_or("unauthenticated", |id| id.transport.as_str()),
            call.op.name(),
            match result {
                Ok(_) => "OK",
                Err(err) => outcome_name(err.kind()),
            },
            latency,
        );
        let latency_us = u64::try_from(latency.as_micros()).unwrap_or(u64::MAX);
        match result {
            Ok(_) => tracing::debug!(op = call.op.name(), who = %call.who(), latency_us, "ok"),
            Err(err) if err.kind() == ErrorKind::Internal => {
                tracing::error!(op = call.op.name(), who = %call.who(), latency_us,
                    error = %err, "failed: internal error");
            }
            Err(err) if err.kind() == ErrorKind::Unavailable => {
                tracing::warn!(op = call.op.name(), who = %call.who(), latency_us,
                    error = %err, "failed: unavailable");
            }
            // The caller's errors (bad input, denied, unknown key) at debug: the audit log
            // has every one and the metrics count them, and a flood of bad requests must
            // not cost more than good ones nor fill the daemon's log.
            Err(err) => tracing::debug!(op = call.op.name(), who = %call.who(), latency_us,
                outcome = outcome_name(err.kind()), message = %err, "failed"),
        }
    }

    /// The audit line of a call.
    fn record<R>(&self, call: Call, result: &Result<R>) -> AuditRecord {
        let latency_us = u64::try_from(call.started.elapsed().as_micros()).unwrap_or(u64::MAX);
        let outcome = match result {
            Ok(_) => "OK",
            Err(err) => outcome_name(err.kind()),
        };
        let (principal, transport, peer, access_key_id) = match &call.identity {
            Ok(id) => (
                id.principal().to_owned(),
                id.transport.as_str().to_owned(),
                id.peer.clone(),
                id.access_key.clone(),
            ),
            Err(refusal) => (
                String::new(),
                refusal
                    .transport
                    .map(|t| t.as_str().to_owned())
                    .unwrap_or_default(),
                refusal.peer.clone(),
                refusal.access_key.clone(),
            ),
        };
        let (context_keys, context_hash) = match call.context {
            Some((keys, hash)) => (keys, Some(hash)),
            None => (Vec::new(), None),
        };
        AuditRecord {
            request_id: call.request_id,
            principal,
            transport,
            peer,
            operation: call.op.name().to_owned(),
            api_operation: call.api_operation,
            access_key_id,
            key_id: call.key_id,
            key_version: call.key_version,
            context_keys,
            context_hash,
            outcome: outcome.to_owned(),
            error: result.as_ref().err().map(|err| {
                bounded_message(match call.denial.get() {
                    Some(why) => format!("{}: {why}", err.public_message()),
                    None => err.public_message(),
                })
            }),
            latency_us,
            instance: self.instance.clone(),
            request_metadata: (!call.attributes.is_empty()).then_some(call.attributes),
            ..Default::default()
        }
    }
}

/// Items per job a batch is split for ([`Gate::run_batch`]) on a local token: a batch of `n`
/// items gets at most `n / 16` jobs (rounded up), since for fewer items handing work to
/// another thread costs more than running it there gains. On a networked HSM each item is
/// worth a job: an item waits about a millisecond for its round trip, a hand-over costs
/// microseconds.
const LOCAL_BATCH_SHARE: usize = 16;

/// The audit line's operation for a call of an operation wrapd does not have.
pub const UNSUPPORTED_OPERATION: &str = "Unsupported";

/// The audit line's operation for a summary of unauthenticated refusals.
pub const REFUSAL_SUMMARY: &str = "UnauthenticatedRefusals";

/// Longest error message an audit line keeps, in bytes. Messages can carry what a caller
/// sent (a verifier quoting a header of up to 64 KiB), and every line is written durably.
pub const MAX_AUDIT_MESSAGE: usize = 512;

/// `message`, cut to at most [`MAX_AUDIT_MESSAGE`] bytes at a character boundary (marked
/// with `…` when cut).
fn bounded_message(mut message: String) -> String {
    if message.len() > MAX_AUDIT_MESSAGE {
        let mut end = MAX_AUDIT_MESSAGE - '…'.len_utf8();
        while !message.is_char_boundary(end) {
            end -= 1;
        }
        message.truncate(end);
        message.push('…');
    }
    message
}

/// One item's result and audit line (none without an audit log).
type ItemOutcome<T> = (Result<T>, Option<AuditRecord>);

/// Where a batch's answer goes: every item's result, or the error that kept the lines from
/// being written.
type BatchAnswer<T> = oneshot::Sender<Result<Vec<Result<T>>>>;

/// A data-plane job about to run on the tokio thread: run here, or, if the caller's future
/// is dropped first, by the workers, so that the call still has its line.
struct PendingJob {
    gate: Arc<Gate>,
    job: Option<Job>,
}

impl PendingJob {
    fn run(mut self) {
        if let Some(job) = self.job.take() {
            job();
        }
    }
}

impl Drop for PendingJob {
    fn drop(&mut self) {
        if let Some(job) = self.job.take() {
            self.gate.dispatch(true, job);
        }
    }
}

/// One call counted in [`Gate`]'s `in_flight` for as long as any clone lives (the caller's
/// future holds one, its job another).
struct InFlight(Arc<Gate>);

impl InFlight {
    /// Counts a call in flight; true if no other was.
    fn enter(gate: &Arc<Gate>) -> (Arc<Self>, bool) {
        let alone = gate.in_flight.fetch_add(1, Ordering::AcqRel) == 0;
        (Arc::new(Self(gate.clone())), alone)
    }
}

impl Drop for InFlight {
    fn drop(&mut self) {
        self.0.in_flight.fetch_sub(1, Ordering::AcqRel);
    }
}

/// A batch in flight, shared by the jobs working on it ([`Gate::run_batch`]).
struct BatchRun<T, I, F> {
    /// Counts the batch in flight until its last job is done.
    _in_flight: Arc<InFlight>,
    gate: Arc<Gate>,
    keystore: Arc<Keystore>,
    job: F,
    /// The batch's span (each item has its own inside it).
    span: tracing::Span,
    /// The items no job has taken yet, with their indexes.
    queue: Mutex<std::iter::Enumerate<std::vec::IntoIter<(Call, I)>>>,
    /// Each item's result and audit line, filled in as it is done.
    outcomes: Vec<Mutex<Option<ItemOutcome<T>>>>,
    /// Jobs still working: the one that brings it to zero finishes the batch.
    running: AtomicUsize,
    done: Mutex<Option<BatchAnswer<T>>>,
}

impl<T, I, F> BatchRun<T, I, F>
where
    T: Send + 'static,
    F: Fn(&Gate, &Keystore, &mut Call, I) -> Result<T>,
{
    /// One job's part: the next item not yet taken, until none is left; the last job to
    /// stop finishes the batch.
    fn work(&self) {
        {
            let _batch = self.span.enter();
            loop {
                let next = self.queue.lock().next();
                let Some((index, (call, item))) = next else {
                    break;
                };
                let outcome = self.run_item(call, item);
                if let Some(out) = self.outcomes.get(index) {
                    *out.lock() = Some(outcome);
                }
            }
        }
        if self.running.fetch_sub(1, Ordering::AcqRel) == 1 {
            self.finish();
        }
    }

    /// One item: its job, log line and audit record.
    fn run_item(&self, mut call: Call, item: I) -> ItemOutcome<T> {
        let gate = &self.gate;
        let span = request_span(&call, &call.request_id);
        let _entered = span.enter();
        let result = guarded(|| {
            with_deadline(call.deadline, || {
                (self.job)(gate, &self.keystore, &mut call, item)
            })
        });
        record_key(&span, &call);
        record_outcome(&span, &result);
        gate.log(&call, &result);
        let record = gate.audit.is_some().then(|| gate.record(call, &result));
        (result, record)
    }

    /// Gathers the results and lines in item order and has the lines written; answers the
    /// caller once they are durable.
    fn finish(&self) {
        let Some(done) = self.done.lock().take() else {
            return;
        };
        let mut results = Vec::with_capacity(self.outcomes.len());
        let mut records = Vec::with_capacity(self.outcomes.len());
        for outcome in &self.outcomes {
            let (result, record) = outcome.lock().take().unwrap_or_else(|| {
                (
                    Err(Error::Internal(
                        "the operation ended without an answer".into(),
                    )),
                    None,
                )
            });
            results.push(result);
            records.extend(record);
        }
        let span = self.span.clone();
        self.gate
            .append(&self.span, records, false, move |appended| {
                let result = appended.map(|()| results);
                record_outcome(&span, &result);
                let _ = done.send(result);
            });
    }
}

fn denied(op: Operation) -> Error {
    // The same message whether or not the key exists.
    Error::PermissionDenied(format!("not allowed to {} this key", op.name()))
}

/// The `tracing` target of request spans (the OpenTelemetry export, `[tracing]`): only the
/// OpenTelemetry layer enables it, so without `[tracing]` the spans cost nothing.
pub const REQUEST_SPAN_TARGET: &str = "wrapd::otel";

/// The span of one request (or batch item), named after its operation, with the request
/// id its audit line carries. Key and outcome are recorded when known.
fn request_span(call: &Call, request_id: &str) -> tracing::Span {
    let transport = call.identity.as_ref().map_or_else(
        |refusal| refusal.transport.map_or("", |t| t.as_str()),
        |id| id.transport.as_str(),
    );
    tracing::span!(
        target: REQUEST_SPAN_TARGET,
        tracing::Level::TRACE,
        "request",
        otel.name = call.op.name(),
        otel.kind = "server",
        otel.status_code = tracing::field::Empty,
        request_id = request_id,
        wrapd.operation = call.op.name(),
        wrapd.api_operation = call.api_operation.as_deref(),
        wrapd.transport = transport,
        wrapd.key_id = tracing::field::Empty,
        wrapd.key_version = tracing::field::Empty,
        wrapd.outcome = tracing::field::Empty,
    )
}

/// Runs a job; a panic in it becomes [`Error::Internal`] for this call (audited like any
/// failure), not a dead worker.
fn guarded<T>(job: impl FnOnce() -> Result<T>) -> Result<T> {
    catch_unwind(AssertUnwindSafe(job))
        .unwrap_or_else(|_| Err(Error::Internal("the operation failed unexpectedly".into())))
}

/// The answer of a job, or INTERNAL if its thread dropped it unanswered.
fn answered<T>(answer: std::result::Result<Result<T>, oneshot::error::RecvError>) -> Result<T> {
    answer.unwrap_or_else(|_| {
        Err(Error::Internal(
            "the operation ended without an answer".into(),
        ))
    })
}

fn record_key(span: &tracing::Span, call: &Call) {
    if span.is_disabled() {
        return;
    }
    if let Some(key) = &call.key_id {
        span.record("wrapd.key_id", key.as_str());
    }
    if let Some(version) = call.key_version {
        span.record("wrapd.key_version", version);
    }
}

fn record_outcome<T>(span: &tracing::Span, result: &Result<T>) {
    if span.is_disabled() {
        return;
    }
    match result {
        Ok(_) => span.record("wrapd.outcome", "OK"),
        Err(err) => {
            span.record("otel.status_code", "ERROR");
            span.record("wrapd.outcome", outcome_name(err.kind()))
        }
    };
}

/// The audit log's name of an outcome: the gRPC code name of docs/DESIGN.md §4, whatever the
/// transport, so that the log reads the same for every front end.
pub fn outcome_name(kind: ErrorKind) -> &'static str {
    kind.status().1
}

#[cfg(test)]
mod tests {
    use std::collections::HashSet;

    use super::*;
    use crate::audit::FsyncPolicy;
    use crate::auth::{Identity, Policy, Transport};
    use crate::hsm::memory::MemoryToken;
    use crate::keystore::{KeystoreConfig, SqliteStore, SystemClock};

    /// A gate with `workers` worker threads on a local (in-memory) token, its audit log at
    /// `audit` synced line by line, and a key store with the SQLite store.
    fn gate_on_local_token(audit: &std::path::Path, workers: usize) -> (Arc<Gate>, Arc<Keystore>) {
        let audit = Arc::new(AuditLog::open(audit, FsyncPolicy::Always).unwrap());
        let policy = PolicyHandle::fixed(Policy::parse("").unwrap());
        let gate = Arc::new(
            Gate::new(Arc::new(policy), Some(audit))
                .with_workers(workers, false)
                .unwrap(),
        );
        let keystore = Arc::new(
            Keystore::open(
                Arc::new(MemoryToken::default()),
                Arc::new(SqliteStore::in_memory().unwrap()),
                Arc::new(SystemClock),
                KeystoreConfig::default(),
            )
            .unwrap(),
        );
        (gate, keystore)
    }

    /// An Unwrap call of `unix:uid=7` with request id `id`.
    fn unwrap_call(id: &str) -> Call {
        let identity = Identity {
            principals: vec!["unix:uid=7".to_owned()].into(),
            transport: Transport::Unix,
            peer: "pid=1".into(),
            access_key: None,
        };
        Call::new(Ok(identity), Operation::Unwrap, Some(id), None)
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn a_large_batch_is_shared_by_several_workers_and_answered_in_item_order() {
        let dir = tempfile::tempdir().unwrap();
        let (gate, keystore) = gate_on_local_token(&dir.path().join("audit.log"), 4);
        let call = unwrap_call("b");
        let items: Vec<_> = (0..200).map(|i| (call.item(i), i)).collect();
        let results = gate
            .run_batch(&keystore, items, |_, _, _, i: usize| {
                // Long enough per item that one thread cannot take them all before the
                // others start.
                std::thread::sleep(std::time::Duration::from_micros(200));
                let thread = std::thread::current().name().map(str::to_owned);
                Ok((i, thread))
            })
            .await
            .unwrap();
        let order: Vec<usize> = results.iter().map(|r| r.as_ref().unwrap().0).collect();
        assert_eq!(order, (0..200).collect::<Vec<_>>());
        let threads: HashSet<_> = results
            .iter()
            .map(|r| r.as_ref().unwrap().1.clone())
            .collect();
        assert!(threads.len() > 1, "one thread ran every item: {threads:?}");
        let text = std::fs::read_to_string(dir.path().join("audit.log")).unwrap();
        let ids: Vec<String> = text
            .lines()
            .filter_map(|line| {
                let value: serde_json::Value = serde_json::from_str(line).ok()?;
                value["request_id"].as_str().map(str::to_owned)
            })
            .filter(|id| id.starts_with("b."))
            .collect();
        let expected: Vec<String> = (0..200).map(|i| format!("b.{i}")).collect();
        assert_eq!(ids, expected, "one audit line per item, in item order");
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn a_lone_call_whose_caller_goes_before_it_ran_in_place_still_runs_and_is_audited() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("audit.log");
        let (gate, keystore) = gate_on_local_token(&path, 2);
        let call = unwrap_call("gone");
        let (ran, job_ran) = std::sync::mpsc::channel();
        let mut future = Box::pin(gate.run(&keystore, call, move |_, _, _| {
            let _ = ran.send(std::thread::current().name().map(str::to_owned));
            Ok(())
        }));
        // The first poll stops at the yield before the job would run in place; the caller
        // then goes away.
        let first = std::future::poll_fn(|cx| std::task::Poll::Ready(future.as_mut().poll(cx)));
        assert!(first.await.is_pending());
        drop(future);
        let thread = job_ran
            .recv_timeout(std::time::Duration::from_secs(5))
            .expect("the job ran");
        assert!(
            thread.is_some_and(|name| name.starts_with("wrapd-op-")),
            "on a worker"
        );
        let started = std::time::Instant::now();
        while !std::fs::read_to_string(&path).is_ok_and(|text| text.contains("\"gone\"")) {
            assert!(
                started.elapsed().as_secs() < 5,
                "no audit line for the call"
            );
            tokio::time::sleep(std::time::Duration::from_millis(10)).await;
        }
    }
}
