//! A bounded pool of logged-in PKCS#11 sessions over one shared context.
//!
//! Sessions are values (`cryptoki::Session` is `Send`, not `Sync`): a caller checks one out,
//! uses it alone, and checks it back in with how the call went. A session whose call failed
//! at the session level is dropped, not returned. A device fault retires the whole context:
//! the next checkout, once every old session is back, finalizes it and initializes a new one,
//! which is how CloudHSM fails over and how a token that came back is picked up again.

use std::time::Instant;

use cryptoki::context::Pkcs11;
use cryptoki::session::Session;
use cryptoki::slot::Slot;
use parking_lot::{Condvar, Mutex, MutexGuard};

use crate::error::{Error, Pkcs11Fault, Result};

/// A live PKCS#11 context and the slot of our token.
#[derive(Clone)]
pub(super) struct Context {
    pub pkcs11: Pkcs11,
    pub slot: Slot,
}

/// How a checked-out session's call ended, which decides its fate.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) enum Outcome {
    /// The session is fine: back to the pool.
    Healthy,
    /// The session is unusable: close it.
    SessionBroken,
    /// The token or library failed: close it and re-initialize the context.
    DeviceFault,
}

struct State {
    context: Option<Context>,
    /// A retired context, finalized once its last session is gone.
    retired: Option<Pkcs11>,
    generation: u64,
    /// Idle sessions, each with the time it was checked in (the newest last).
    idle: Vec<(Session, Instant)>,
    /// Sessions idle or checked out.
    open: usize,
}

/// The pool. `connect` opens a new context, `open_session` a logged-in session on it.
pub(super) struct Pool {
    state: Mutex<State>,
    freed: Condvar,
    max_sessions: usize,
}

/// The slot of a session on loan, given back if the loan is lost ([`Pool::slot`]).
pub(super) struct LoanSlot<'p> {
    pool: &'p Pool,
}

impl LoanSlot<'_> {
    /// The loan was checked in: nothing to give back.
    pub fn returned(self) {
        std::mem::forget(self);
    }
}

impl Drop for LoanSlot<'_> {
    fn drop(&mut self) {
        let mut state = self.pool.lock();
        state.open = state.open.saturating_sub(1);
        Pool::report(&state);
        drop(state);
        self.pool.freed.notify_one();
    }
}

/// A session on loan, with the context generation it belongs to.
pub(super) struct Loan {
    pub session: Session,
    generation: u64,
}

impl Pool {
    pub fn new(max_sessions: usize) -> Self {
        Self {
            state: Mutex::new(State {
                context: None,
                retired: None,
                generation: 0,
                idle: Vec::new(),
                open: 0,
            }),
            freed: Condvar::new(),
            max_sessions: max_sessions.max(1),
        }
    }

    /// Sessions in use and idle, for the metrics.
    fn report(state: &State) {
        let idle = state.idle.len();
        metrics::gauge!("wrapd_hsm_sessions", "state" => "in_use")
            .set(state.open.saturating_sub(idle) as f64);
        metrics::gauge!("wrapd_hsm_sessions", "state" => "idle").set(idle as f64);
    }

    fn lock(&self) -> MutexGuard<'_, State> {
        self.state.lock()
    }

    /// Checks out a session, opening one (and the context) when needed, waiting until
    /// `deadline` when all `max_sessions` are busy.
    pub fn checkout(
        &self,
        deadline: Instant,
        connect: impl Fn() -> Result<Context>,
        open_session: impl Fn(&Context) -> Result<Session>,
    ) -> Result<Loan> {
        let mut state = self.lock();
        loop {
            if let Some(context) = state.context.clone() {
                if let Some((session, _)) = state.idle.pop() {
                    let generation = state.generation;
                    Self::report(&state);
                    return Ok(Loan {
                        session,
                        generation,
                    });
                }
                if state.open < self.max_sessions {
                    state.open += 1;
                    let generation = state.generation;
                    drop(state);
                    return match open_session(&context) {
                        Ok(session) => Ok(Loan {
                            session,
                            generation,
                        }),
                        Err(err) => {
                            let fault = matches!(
                                err,
                                Error::Pkcs11 {
                                    fault: Pkcs11Fault::Device,
                                    ..
                                } | Error::Pkcs11Library {
                                    fault: Pkcs11Fault::Device,
                                    ..
                                }
                            );
                            let mut state = self.lock();
                            state.open -= 1;
                            if fault {
                                Self::retire(&mut state, generation);
                            }
                            self.freed.notify_all();
                            Err(err)
                        }
                    };
                }
            } else if state.open == 0 {
                // Nobody uses the library now: safe to finalize the old context and start
                // a new one. Holding the lock keeps it that way.
                if let Some(old) = state.retired.take() {
                    if let Err(err) = old.finalize() {
                        tracing::warn!(error = %err, "C_Finalize of the retired context failed");
                    }
                }
                state.context = Some(connect()?);
                continue;
            }
            let now = Instant::now();
            if now >= deadline {
                return Err(Error::Unavailable(format!(
                    "all {} HSM sessions are busy; retry later",
                    self.max_sessions
                )));
            }
            self.freed.wait_for(&mut state, deadline - now);
        }
    }

    /// A guard for the slot of a loan just checked out: if it is dropped before being
    /// [disarmed](LoanSlot::returned), the call panicked, and the slot is given back. Declare it
    /// before the loan, so that the loan, dropped first while unwinding, closes its session
    /// before the slot is free for another. Without it the pool would count that session open
    /// for good: one slot lost per panic, and after a device fault, a pool whose count never
    /// comes down to zero never initializes the context again.
    pub fn slot(&self) -> LoanSlot<'_> {
        LoanSlot { pool: self }
    }

    /// Returns a loan with the outcome of its call.
    pub fn checkin(&self, loan: Loan, outcome: Outcome) {
        let mut state = self.lock();
        let current = loan.generation == state.generation && state.context.is_some();
        let retired = if outcome == Outcome::Healthy && current {
            state.idle.push((loan.session, Instant::now()));
            false
        } else {
            state.open -= 1;
            drop(loan.session);
            if outcome == Outcome::DeviceFault {
                Self::retire(&mut state, loan.generation);
            }
            outcome == Outcome::DeviceFault
        };
        Self::report(&state);
        drop(state);
        // One session came free: one waiter can have it (waking them all would have every
        // one of them take the lock to find nothing). A retired context concerns them all.
        if retired {
            self.freed.notify_all();
        } else {
            self.freed.notify_one();
        }
    }

    /// Drops every idle session and marks the context of `generation` for re-initialization.
    pub fn retire_context(&self) {
        let mut state = self.lock();
        let generation = state.generation;
        Self::retire(&mut state, generation);
        drop(state);
        self.freed.notify_all();
    }

    fn retire(state: &mut State, generation: u64) {
        if generation != state.generation {
            return; // already retired by another caller
        }
        state.generation += 1;
        state.open -= state.idle.len();
        state.idle.clear();
        if let Some(old) = state.context.take() {
            tracing::warn!("retiring the PKCS#11 context; it is re-initialized on next use");
            state.retired = Some(old.pkcs11);
        }
    }

    /// Checks out every session idle for `idle_for` or longer (the oldest first), to be used
    /// and checked in again ([`Pool::checkin`]): the keep-alive's.
    pub fn take_idle_for(&self, idle_for: std::time::Duration) -> Vec<Loan> {
        let mut state = self.lock();
        if state.context.is_none() {
            return Vec::new();
        }
        let generation = state.generation;
        // Checked in last, used first: the stale ones are at the front.
        let stale = state
            .idle
            .iter()
            .take_while(|(_, since)| since.elapsed() >= idle_for)
            .count();
        let taken = state
            .idle
            .drain(..stale)
            .map(|(session, _)| Loan {
                session,
                generation,
            })
            .collect();
        Self::report(&state);
        taken
    }

    /// Closes every idle session (graceful shutdown).
    pub fn close_idle(&self) {
        let mut state = self.lock();
        state.open -= state.idle.len();
        state.idle.clear();
    }
}
