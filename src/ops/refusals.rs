//! How many refusals of unauthenticated callers get an audit line of their own.
//!
//! A refusal of a caller the daemon could not authenticate (an unsigned or badly signed AWS
//! KMS API request) costs whoever sends it nothing, and each audit line costs the daemon a
//! durable write. Unbounded, a caller with no credentials could fill the disk the audit log
//! is on, and a full disk stops every operation on every transport. So the first
//! [`LINES_PER_WINDOW`] such refusals of each [`WINDOW`] are audited one by one, and the
//! rest are counted: the count goes on one summary line when the window is over (written by
//! the next refusal, or by the maintenance pass if the flood has stopped), and into the
//! metric `wrapd_audit_refusals_summarized_total` at once. Nothing is dropped unseen.
//! Authenticated callers are audited line by line: what they cost is bounded by their grants
//! and by the batch check of [`super::Ops`].

use std::time::{Duration, Instant};

use parking_lot::Mutex;

/// How long one window of the budget lasts.
pub const WINDOW: Duration = Duration::from_secs(60);

/// Unauthenticated refusals audited one by one in each window.
pub const LINES_PER_WINDOW: u32 = 100;

/// What to do with one unauthenticated refusal.
#[derive(Debug, PartialEq, Eq)]
pub enum Admit {
    /// Audit it; first write a summary of this many refusals the last window counted.
    Audit { summary: Option<u64> },
    /// Count it only (the window's summary line will include it).
    Count,
}

/// The budget of audit lines for unauthenticated refusals (see the module docs).
#[derive(Debug)]
pub struct RefusalBudget {
    window: Mutex<Window>,
}

#[derive(Debug)]
struct Window {
    started: Instant,
    audited: u32,
    counted: u64,
}

impl Default for RefusalBudget {
    fn default() -> Self {
        Self {
            window: Mutex::new(Window {
                started: Instant::now(),
                audited: 0,
                counted: 0,
            }),
        }
    }
}

impl RefusalBudget {
    /// Decides about one refusal at `now`.
    pub fn admit(&self, now: Instant) -> Admit {
        let mut window = self.window.lock();
        let summary = window.roll(now);
        if window.audited < LINES_PER_WINDOW {
            window.audited += 1;
            Admit::Audit { summary }
        } else {
            // A window that just started has its whole budget left: `summary` is None here.
            window.counted += 1;
            metrics::counter!("wrapd_audit_refusals_summarized_total").increment(1);
            Admit::Count
        }
    }

    /// The count of a window that is over and had refusals without a line, to be written
    /// as its summary now (the maintenance pass, when no refusal came since).
    pub fn finished_summary(&self, now: Instant) -> Option<u64> {
        let mut window = self.window.lock();
        window.roll(now)
    }

    /// Puts back a summary that could not be written, to be written with the next one.
    pub fn restore(&self, count: u64) {
        let mut window = self.window.lock();
        window.counted += count;
    }
}

impl Window {
    /// Starts a new window if this one is over; returns the count the old one leaves to
    /// summarize.
    fn roll(&mut self, now: Instant) -> Option<u64> {
        if now.saturating_duration_since(self.started) < WINDOW {
            return None;
        }
        let counted = std::mem::take(&mut self.counted);
        self.started = now;
        self.audited = 0;
        (counted > 0).then_some(counted)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_flood_gets_a_bounded_number_of_lines_and_one_summary_per_window() {
        let budget = RefusalBudget::default();
        let start = Instant::now();
        let audited = (0..1000)
            .filter(|_| matches!(budget.admit(start), Admit::Audit { .. }))
            .count();
        assert_eq!(audited, LINES_PER_WINDOW as usize);
        assert_eq!(
            budget.finished_summary(start),
            None,
            "the window is not over"
        );
        // The first refusal of the next window is audited after the summary of the last.
        assert_eq!(
            budget.admit(start + WINDOW),
            Admit::Audit {
                summary: Some(1000 - u64::from(LINES_PER_WINDOW))
            }
        );
        assert_eq!(budget.finished_summary(start + WINDOW * 2), None);
    }

    #[test]
    fn a_flood_that_stops_is_summarized_by_the_maintenance_pass() {
        let budget = RefusalBudget::default();
        let start = Instant::now();
        for _ in 0..(LINES_PER_WINDOW + 7) {
            budget.admit(start);
        }
        assert_eq!(budget.finished_summary(start + WINDOW), Some(7));
        assert_eq!(budget.finished_summary(start + WINDOW * 3), None);
        budget.restore(7);
        assert_eq!(budget.finished_summary(start + WINDOW * 4), Some(7));
    }
}
