//! How often a fleet daemon asks the shared store about a key, alias or version its view
//! does not have.
//!
//! In a fleet, a name missing from the view may have been made by another daemon a moment
//! ago (its notification not applied yet), so the store is asked before the name is called
//! unknown. Unbounded, that would let any caller with some data-plane grant turn each item
//! of a batch of random key ids into a database round trip. So: a name the store did not
//! know is not asked about again for [`MISS_TTL`], and the daemon asks at most
//! [`ASKS_PER_SECOND`] times a second; beyond, an unknown name is answered from the view
//! (counted in `wrapd_store_read_through_refused_total`). A name made elsewhere reaches the
//! view by its notification within milliseconds, or by the next re-read at the latest.

use std::collections::HashMap;
use std::time::{Duration, Instant};

use parking_lot::Mutex;

/// How long a name the store did not know is answered from the view.
pub const MISS_TTL: Duration = Duration::from_secs(1);

/// Most store lookups of names missing from the view, per second.
pub const ASKS_PER_SECOND: u32 = 200;

/// Most remembered misses (a flood of distinct names ages out; it cannot grow memory).
const MAX_MISSES: usize = 4096;

/// The read-through budget (see the module docs).
#[derive(Debug)]
pub struct ReadThrough {
    state: Mutex<State>,
}

#[derive(Debug)]
struct State {
    misses: HashMap<String, Instant>,
    second_started: Instant,
    asked: u32,
}

impl Default for ReadThrough {
    fn default() -> Self {
        Self {
            state: Mutex::new(State {
                misses: HashMap::new(),
                second_started: Instant::now(),
                asked: 0,
            }),
        }
    }
}

impl ReadThrough {
    /// Whether the store may be asked about `name` at `now` (and counts the ask).
    pub fn may_ask(&self, name: &str, now: Instant) -> bool {
        let mut state = self.state.lock();
        if state
            .misses
            .get(name)
            .is_some_and(|at| now.saturating_duration_since(*at) < MISS_TTL)
        {
            return false;
        }
        if now.saturating_duration_since(state.second_started) >= Duration::from_secs(1) {
            state.second_started = now;
            state.asked = 0;
        }
        if state.asked >= ASKS_PER_SECOND {
            metrics::counter!("wrapd_store_read_through_refused_total").increment(1);
            return false;
        }
        state.asked += 1;
        true
    }

    /// The store did not know `name` at `now`.
    pub fn missed(&self, name: &str, now: Instant) {
        let mut state = self.state.lock();
        if state.misses.len() >= MAX_MISSES {
            state
                .misses
                .retain(|_, at| now.saturating_duration_since(*at) < MISS_TTL);
            if state.misses.len() >= MAX_MISSES {
                state.misses.clear();
            }
        }
        state.misses.insert(name.to_owned(), now);
    }

    /// Forgets every miss (the view was just re-read, or names changed).
    pub fn forget_misses(&self) {
        self.state.lock().misses.clear();
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_miss_is_not_asked_again_until_it_ages_out() {
        let budget = ReadThrough::default();
        let now = Instant::now();
        assert!(budget.may_ask("key/a", now));
        budget.missed("key/a", now);
        assert!(!budget.may_ask("key/a", now + MISS_TTL / 2));
        assert!(budget.may_ask("key/a", now + MISS_TTL));
        budget.missed("key/a", now + MISS_TTL);
        budget.forget_misses();
        assert!(budget.may_ask("key/a", now + MISS_TTL));
    }

    #[test]
    fn distinct_names_are_asked_about_at_most_so_often_a_second() {
        let budget = ReadThrough::default();
        let now = Instant::now();
        let asked = (0..10_000)
            .filter(|i| budget.may_ask(&format!("key/{i}"), now))
            .count();
        assert_eq!(asked, ASKS_PER_SECOND as usize);
        assert!(budget.may_ask("key/next", now + Duration::from_secs(1)));
        for i in 0..10_000 {
            budget.missed(&format!("key/{i}"), now);
        }
        assert!(budget.state.lock().misses.len() <= MAX_MISSES);
    }
}
