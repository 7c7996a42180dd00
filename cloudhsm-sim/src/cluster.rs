//! The simulated cluster: HSMs that each serve a bounded number of calls at once after a
//! network round trip, each call routed to the least busy HSM that is up (as the Client SDK
//! balances operations over the cluster by each HSM's capacity), objects that reach the
//! other HSMs only after a replication delay, and the controls a test uses to take an HSM
//! down, slow it or make it throttle.

use std::collections::{HashMap, HashSet};
use std::path::PathBuf;
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::sync::{Condvar, Mutex, MutexGuard};
use std::time::{Duration, Instant, SystemTime};

use cryptoki_sys::{CK_OBJECT_HANDLE, CK_RV, CKR_OBJECT_HANDLE_INVALID};

use crate::codes;

/// The cluster's shape and timing, from the environment (see the crate docs).
#[derive(Debug, Clone)]
pub struct Settings {
    /// HSMs in the cluster.
    pub hsms: usize,
    /// The round trip of every call that reaches an HSM, the HSM's own work included.
    pub latency: Duration,
    /// Calls one HSM serves at once.
    pub concurrency: usize,
    /// How long a call waits for a busy HSM before it is answered as throttled.
    pub queue: Duration,
    /// How long an object made on one HSM takes to reach the others.
    pub replication: Duration,
    /// Sessions the application may have open.
    pub max_sessions: usize,
    /// The file of controls, re-read when it changes.
    pub control: Option<PathBuf>,
    /// How long a session may sit unused before it is dropped (`None`: never).
    pub session_idle: Option<Duration>,
}

impl Settings {
    /// From `WRAPD_SIM_*` (defaults: 2 HSMs, no latency, 8 calls at once per HSM, a 1 s
    /// queue, no replication delay, 1,024 sessions, no control file).
    pub fn from_env() -> Self {
        let number = |name: &str, default: u64| {
            std::env::var(name)
                .ok()
                .and_then(|v| v.trim().parse::<u64>().ok())
                .unwrap_or(default)
        };
        Self {
            hsms: number("WRAPD_SIM_HSMS", 2).clamp(1, 16) as usize,
            latency: Duration::from_micros(number("WRAPD_SIM_LATENCY_US", 0)),
            concurrency: number("WRAPD_SIM_CONCURRENCY", 8).max(1) as usize,
            queue: Duration::from_millis(number("WRAPD_SIM_QUEUE_MS", 1000)),
            replication: Duration::from_millis(number("WRAPD_SIM_REPLICATION_MS", 0)),
            max_sessions: number("WRAPD_SIM_MAX_SESSIONS", 1024).max(1) as usize,
            control: std::env::var_os("WRAPD_SIM_CONTROL").map(PathBuf::from),
            session_idle: Some(number("WRAPD_SIM_SESSION_IDLE_MS", 0))
                .filter(|ms| *ms > 0)
                .map(Duration::from_millis),
        }
    }
}

/// What the control file says: `down N`, `slow N MICROSECONDS`, `throttle N`, one per line
/// (HSMs numbered from 0; `#` starts a comment), and `report PATH`: write the cluster's
/// counters ([`Cluster::report`]) to PATH when the file is read.
#[derive(Debug, Default, Clone, PartialEq, Eq)]
pub struct Controls {
    down: HashSet<usize>,
    throttled: HashSet<usize>,
    slow: HashMap<usize, Duration>,
    report: Option<PathBuf>,
}

impl Controls {
    /// Parses the control file's text; lines it does not understand are ignored.
    pub fn parse(text: &str) -> Self {
        let mut controls = Self::default();
        for line in text.lines() {
            let line = line.split('#').next().unwrap_or("");
            let words: Vec<&str> = line.split_whitespace().collect();
            let hsm = |i: usize| words.get(i).and_then(|w| w.parse::<usize>().ok());
            match (words.first().copied(), hsm(1)) {
                (Some("down"), Some(n)) => {
                    controls.down.insert(n);
                }
                (Some("throttle"), Some(n)) => {
                    controls.throttled.insert(n);
                }
                (Some("slow"), Some(n)) => {
                    if let Some(us) = words.get(2).and_then(|w| w.parse::<u64>().ok()) {
                        controls.slow.insert(n, Duration::from_micros(us));
                    }
                }
                (Some("report"), _) => {
                    controls.report = words.get(1).map(PathBuf::from);
                }
                _ => {}
            }
        }
        controls
    }
}

/// One HSM: how many calls it is serving.
struct Hsm {
    busy: Mutex<usize>,
    freed: Condvar,
}

/// Where an object was made, and when (`None` for a session object, which never leaves its
/// HSM).
#[derive(Debug, Clone, Copy)]
struct Origin {
    hsm: usize,
    at: Option<Instant>,
}

/// The cluster.
pub struct Cluster {
    settings: Settings,
    hsms: Vec<Hsm>,
    sessions: AtomicUsize,
    /// Objects made through this module until they have reached every HSM (session objects
    /// for as long as they exist).
    objects: Mutex<HashMap<CK_OBJECT_HANDLE, Origin>>,
    next: AtomicUsize,
    controls: Mutex<(Option<SystemTime>, Instant, Controls)>,
    /// Calls that reached an HSM (took a slot), since the module was loaded.
    round_trips: AtomicU64,
    /// Calls holding a slot now, on every HSM.
    in_flight: AtomicUsize,
    /// The most calls that held a slot at once since the last report.
    peak_in_flight: AtomicUsize,
}

/// A call being served by an HSM: it holds one of the HSM's slots until dropped. The HSM's
/// work (the forwarded call) is done within the round trip: the answer arrives when the
/// round trip is over ([`Serving::answer`]), or when the guard is dropped.
pub struct Serving<'a> {
    cluster: &'a Cluster,
    /// The HSM serving the call.
    pub hsm: usize,
    /// When the round trip is over.
    due: Instant,
    /// Whether the answer has arrived (the round trip waited out).
    answered: bool,
}

impl Serving<'_> {
    /// The call's answer `rv`, once the round trip is over; a call whose HSM went down
    /// meanwhile fails instead.
    pub fn answer(mut self, rv: CK_RV) -> CK_RV {
        self.arrive();
        if self.cluster.controls().down.contains(&self.hsm) {
            codes::HSM_UNREACHABLE
        } else {
            rv
        }
    }

    /// Waits out what is left of the round trip.
    fn arrive(&mut self) {
        if !self.answered {
            self.answered = true;
            let left = self.due.saturating_duration_since(Instant::now());
            if !left.is_zero() {
                sleep_precisely(left);
            }
        }
    }
}

impl Drop for Serving<'_> {
    fn drop(&mut self) {
        self.arrive();
        let hsm = &self.cluster.hsms[self.hsm];
        let mut busy = lock(&hsm.busy);
        *busy = busy.saturating_sub(1);
        self.cluster.in_flight.fetch_sub(1, Ordering::AcqRel);
        hsm.freed.notify_one();
    }
}

fn lock<T>(mutex: &Mutex<T>) -> MutexGuard<'_, T> {
    // A panic elsewhere must not wedge the module: the data stays consistent per call.
    mutex
        .lock()
        .unwrap_or_else(|poisoned| poisoned.into_inner())
}

impl Cluster {
    /// A cluster of `settings.hsms` HSMs, all up.
    pub fn new(settings: Settings) -> Self {
        let hsms = (0..settings.hsms)
            .map(|_| Hsm {
                busy: Mutex::new(0),
                freed: Condvar::new(),
            })
            .collect();
        Self {
            settings,
            hsms,
            sessions: AtomicUsize::new(0),
            objects: Mutex::new(HashMap::new()),
            next: AtomicUsize::new(0),
            controls: Mutex::new((None, Instant::now(), Controls::default())),
            round_trips: AtomicU64::new(0),
            in_flight: AtomicUsize::new(0),
            peak_in_flight: AtomicUsize::new(0),
        }
    }

    /// The counters a test reads (`report PATH` in the control file): `round_trips N` (calls
    /// that reached an HSM so far) and `peak_in_flight N` (the most calls served at once
    /// since the last report, which starts the next period).
    pub fn report(&self) -> String {
        let peak = self
            .peak_in_flight
            .swap(self.in_flight.load(Ordering::Acquire), Ordering::AcqRel);
        format!(
            "round_trips {}\npeak_in_flight {peak}\n",
            self.round_trips.load(Ordering::Acquire)
        )
    }

    /// The controls now (the file is looked at no more than every 20 ms).
    pub fn controls(&self) -> Controls {
        let mut cached = lock(&self.controls);
        let Some(path) = &self.settings.control else {
            return cached.2.clone();
        };
        if cached.1.elapsed() >= Duration::from_millis(20) || cached.0.is_none() {
            cached.1 = Instant::now();
            let modified = std::fs::metadata(path).and_then(|m| m.modified()).ok();
            if modified != cached.0 || modified.is_none() {
                cached.0 = modified;
                cached.2 = std::fs::read_to_string(path)
                    .map(|t| Controls::parse(&t))
                    .unwrap_or_default();
                if let Some(report) = &cached.2.report {
                    // Best effort: a test that cannot read it fails on its own.
                    let _ = std::fs::write(report, self.report());
                }
            }
        }
        cached.2.clone()
    }

    /// The cluster's settings.
    pub fn settings(&self) -> &Settings {
        &self.settings
    }

    /// Counts a new session, or refuses it: no HSM up, or the session limit reached.
    pub fn open_session(&self) -> Result<(), CK_RV> {
        let controls = self.controls();
        if (0..self.hsms.len()).all(|h| controls.down.contains(&h)) {
            return Err(codes::HSM_UNREACHABLE);
        }
        let open = self.sessions.fetch_add(1, Ordering::AcqRel);
        if open >= self.settings.max_sessions {
            self.sessions.fetch_sub(1, Ordering::AcqRel);
            return Err(codes::SESSION_LIMIT);
        }
        Ok(())
    }

    /// Counts a closed session.
    pub fn close_session(&self) {
        let _ = self
            .sessions
            .fetch_update(Ordering::AcqRel, Ordering::Acquire, |n| n.checked_sub(1));
    }

    /// Forgets every session (C_CloseAllSessions, C_Finalize).
    pub fn close_all(&self) {
        self.sessions.store(0, Ordering::Release);
    }

    /// Sends a call to an HSM: the one holding `object` if it is a session object, else
    /// the least busy HSM that is up. Refused if that HSM throttles, or if `object` has not
    /// reached it; queued while it is busy (answered as throttled after the queue time).
    /// The returned guard holds the HSM's slot for the call and starts its round trip: the
    /// caller does the HSM's work, then waits for the answer with [`Serving::answer`], which
    /// fails the call if its HSM went down meanwhile.
    pub fn serve(&self, object: Option<CK_OBJECT_HANDLE>) -> Result<Serving<'_>, CK_RV> {
        let controls = self.controls();
        let pinned = object.and_then(|o| {
            lock(&self.objects)
                .get(&o)
                .filter(|origin| origin.at.is_none())
                .map(|origin| origin.hsm)
        });
        let index = match pinned {
            Some(hsm) if controls.down.contains(&hsm) => return Err(codes::HSM_UNREACHABLE),
            Some(hsm) => hsm,
            None => self.least_busy(&controls)?,
        };
        if controls.throttled.contains(&index) {
            return Err(codes::THROTTLED);
        }
        if let Some(object) = object
            && !self.visible_on(index, object)
        {
            return Err(CKR_OBJECT_HANDLE_INVALID);
        }
        let hsm = &self.hsms[index];
        {
            let deadline = Instant::now() + self.settings.queue;
            let mut busy = lock(&hsm.busy);
            while *busy >= self.settings.concurrency {
                let left = deadline.saturating_duration_since(Instant::now());
                if left.is_zero() {
                    return Err(codes::THROTTLED);
                }
                busy = hsm
                    .freed
                    .wait_timeout(busy, left)
                    .unwrap_or_else(|p| p.into_inner())
                    .0;
            }
            *busy += 1;
        }
        self.round_trips.fetch_add(1, Ordering::AcqRel);
        let now = self.in_flight.fetch_add(1, Ordering::AcqRel) + 1;
        self.peak_in_flight.fetch_max(now, Ordering::AcqRel);
        let delay = self.settings.latency + controls.slow.get(&index).copied().unwrap_or_default();
        Ok(Serving {
            cluster: self,
            hsm: index,
            due: Instant::now() + delay,
            answered: delay.is_zero(),
        })
    }

    /// The least busy HSM that is up (ties taken in turn).
    fn least_busy(&self, controls: &Controls) -> Result<usize, CK_RV> {
        let n = self.hsms.len();
        let start = self.next.fetch_add(1, Ordering::Relaxed);
        (0..n)
            .map(|i| (start + i) % n)
            .filter(|h| !controls.down.contains(h))
            .min_by_key(|h| *lock(&self.hsms[*h].busy))
            .ok_or(codes::HSM_UNREACHABLE)
    }

    /// Records an object made on `hsm` now: a token object reaches the others after the
    /// replication delay, a session object never.
    pub fn made(&self, hsm: usize, object: CK_OBJECT_HANDLE, token: bool) {
        if self.hsms.len() < 2 || (token && self.settings.replication.is_zero()) {
            return;
        }
        lock(&self.objects).insert(
            object,
            Origin {
                hsm,
                at: token.then(Instant::now),
            },
        );
    }

    /// Forgets a destroyed object.
    pub fn destroyed(&self, object: CK_OBJECT_HANDLE) {
        lock(&self.objects).remove(&object);
    }

    /// Whether `object` is on `hsm` (objects the module did not see being made were there
    /// before: they are everywhere).
    pub fn visible_on(&self, hsm: usize, object: CK_OBJECT_HANDLE) -> bool {
        let mut objects = lock(&self.objects);
        match objects.get(&object) {
            None => true,
            Some(origin) if origin.hsm == hsm => true,
            Some(Origin { at: Some(at), .. }) if at.elapsed() >= self.settings.replication => {
                objects.remove(&object);
                true
            }
            Some(_) => false,
        }
    }
}

/// Sleeps for `delay` with this thread's timer slack at its least meanwhile: a thread's
/// default slack (50 µs) would lengthen every simulated round trip by up to that much, a
/// delay that the network being modelled does not have.
#[cfg(target_os = "linux")]
fn sleep_precisely(delay: Duration) {
    // SAFETY: PR_GET_TIMERSLACK and PR_SET_TIMERSLACK read and set the calling thread's
    // timer slack, nothing else; the thread's own value is put back afterwards.
    let slack = unsafe { libc::prctl(libc::PR_GET_TIMERSLACK) };
    if slack <= 0 {
        return std::thread::sleep(delay);
    }
    unsafe { libc::prctl(libc::PR_SET_TIMERSLACK, 1 as libc::c_ulong) };
    std::thread::sleep(delay);
    unsafe { libc::prctl(libc::PR_SET_TIMERSLACK, slack as libc::c_ulong) };
}

/// Elsewhere, the kernel's timer slack is left as it is.
#[cfg(not(target_os = "linux"))]
fn sleep_precisely(delay: Duration) {
    std::thread::sleep(delay);
}

#[cfg(test)]
mod tests {
    use super::*;

    fn cluster(hsms: usize, concurrency: usize, queue_ms: u64, replication_ms: u64) -> Cluster {
        Cluster::new(Settings {
            hsms,
            latency: Duration::ZERO,
            concurrency,
            queue: Duration::from_millis(queue_ms),
            replication: Duration::from_millis(replication_ms),
            max_sessions: 4,
            control: None,
            session_idle: None,
        })
    }

    #[test]
    fn the_control_file_names_hsms_down_slow_and_throttling() {
        let controls = Controls::parse(
            "down 1\n# a comment\nslow 0 2500\nthrottle 2\nnonsense\nreport /tmp/counters\n",
        );
        assert_eq!(controls.report, Some(PathBuf::from("/tmp/counters")));
        assert!(controls.down.contains(&1));
        assert!(controls.throttled.contains(&2));
        assert_eq!(controls.slow.get(&0), Some(&Duration::from_micros(2500)));
        assert_eq!(Controls::parse(""), Controls::default());
    }

    #[test]
    fn an_object_reaches_the_other_hsms_only_after_the_replication_delay() {
        let cluster = cluster(2, 1, 0, 50);
        cluster.made(0, 77, true);
        cluster.made(0, 78, false);
        assert!(cluster.visible_on(0, 77), "at once where it was made");
        assert!(!cluster.visible_on(1, 77), "not yet on the other HSM");
        assert!(cluster.visible_on(1, 5), "older objects are everywhere");
        std::thread::sleep(Duration::from_millis(60));
        assert!(cluster.visible_on(1, 77));
        assert!(
            !cluster.visible_on(1, 78),
            "a session object stays on its HSM"
        );
        // Calls with a session object go to its HSM.
        for _ in 0..4 {
            assert_eq!(cluster.serve(Some(78)).unwrap().hsm, 0);
        }
    }

    #[test]
    fn calls_go_to_the_least_busy_hsm_and_a_full_cluster_throttles() {
        let cluster = cluster(2, 1, 20, 0);
        let first = cluster.serve(None).unwrap();
        let second = cluster.serve(None).unwrap();
        assert_ne!(first.hsm, second.hsm, "spread over the HSMs");
        assert_eq!(cluster.serve(None).err(), Some(codes::THROTTLED));
        drop(first);
        assert!(cluster.serve(None).is_ok());
    }

    #[test]
    fn the_report_counts_round_trips_and_the_most_calls_served_at_once() {
        let cluster = cluster(2, 2, 0, 0);
        let held: Vec<_> = (0..3).map(|_| cluster.serve(None).unwrap()).collect();
        drop(held);
        drop(cluster.serve(None).unwrap());
        assert_eq!(cluster.report(), "round_trips 4\npeak_in_flight 3\n");
        assert_eq!(
            cluster.report(),
            "round_trips 4\npeak_in_flight 0\n",
            "a report starts the next period"
        );
    }

    #[test]
    fn sessions_are_limited() {
        let cluster = cluster(1, 1, 0, 0);
        for _ in 0..4 {
            cluster.open_session().unwrap();
        }
        assert_eq!(cluster.open_session(), Err(codes::SESSION_LIMIT));
        cluster.close_session();
        assert!(cluster.open_session().is_ok());
    }
}
