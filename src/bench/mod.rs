//! `wrapd bench`: the daemon's throughput and latency over its unix socket, next to what
//! this machine can do at best, all measured in one run; and `wrapd soak` ([`soak`]).
//!
//! For each operation and number of callers, one round measures:
//!
//! - **raw PKCS#11**: the same token calls in-process (AES-GCM `C_Decrypt` for Unwrap,
//!   `C_GenerateRandom` + `C_Encrypt` for GenerateDataKey, with the same AAD), on as many
//!   threads and sessions as there are callers, at most one per core: no gRPC, no metadata,
//!   no scheduling in between. On a networked HSM, a thread per caller (the HSM's capacity);
//!   for one caller's batch there, the batch's token calls spread over as many threads as
//!   the daemon has sessions, one batch at a time: what the calls alone take, the batch's
//!   floor;
//! - **echo**: a bare tonic `DataKeyService` (`bench/echo.rs`) answering the same requests with
//!   fixed messages of the same sizes, over a unix socket, from the same number of callers:
//!   the gRPC floor;
//! - **ceiling**: the two in series, `1 / (1/raw + 1/echo)`: a daemon that did nothing but
//!   gRPC and the token call, one after the other, would reach this;
//! - **wrapd**: the daemon, and its share of the ceiling;
//! - **bad-ciphertext flood** (Unwrap, two callers or more): half the callers send blobs
//!   whose GCM tag fails in the token, next to the same number of callers all sending good
//!   ones: answers per second in all, as a ratio (a bad ciphertext must not cost more than a
//!   good one); and the same ratio for the token alone, half the raw threads decrypting the
//!   bad blob (what a bad tag costs the token itself).
//!
//! Raw, echo and wrapd take turns, one second each, until each has run for `--seconds`, so
//! that the machine's slow spells fall on all three alike; so do the flood's good-only and
//! flooded periods, on the daemon and on the token alone. Batch operations count data keys
//! per second; their latency is per call. Repeated rounds (`--rounds`) show the noise; the
//! summary gives each figure's range over the rounds.

mod echo;
mod soak;
mod xks;

use std::collections::HashMap;
use std::path::Path;
use std::sync::Arc;
use std::time::{Duration, Instant};

use hdrhistogram::Histogram;
use tonic::transport::Channel;

pub use soak::{SoakOptions, SoakReport, format_soak, soak};

use crate::blob::Blob;
use crate::client::{DataKeyServiceClient, KeyServiceClient, connect_unix};
use crate::config::Config;
use crate::context::EncryptionContext;
use crate::error::{Error, ErrorKind, Result};
use crate::hsm::{ObjectId, Pkcs11Token, Token};
use crate::proto::{
    BatchGenerateDataKeyRequest, BatchUnwrapRequest, CreateKeyRequest, GenerateDataKeyRequest,
    UnwrapRequest, batch_generate_data_key_result, batch_unwrap_result,
};

/// Which operation to measure.
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum BenchOp {
    /// Unwrap of a 32-byte data key.
    Unwrap,
    /// GenerateDataKey of 32 bytes.
    Generate,
    /// BatchUnwrap of [`BENCH_BATCH`] items per call.
    BatchUnwrap,
    /// BatchGenerateDataKey of [`BENCH_BATCH`] items per call.
    BatchGenerate,
    /// The XKS proxy API's Encrypt of a 32-byte data key, as AWS KMS sends it for a
    /// GenerateDataKey (HTTPS, SigV4, with an integrity value); its echo is the same HTTPS
    /// listener answering a fixed body.
    XksEncrypt,
}

impl BenchOp {
    /// The operation's name in the tables.
    pub fn name(self) -> &'static str {
        match self {
            Self::Unwrap => "Unwrap",
            Self::Generate => "GenerateDataKey",
            Self::BatchUnwrap => "BatchUnwrap x64",
            Self::BatchGenerate => "BatchGenerateDataKey x64",
            Self::XksEncrypt => "XKS Encrypt",
        }
    }

    /// Data keys per call.
    fn items(self) -> usize {
        match self {
            Self::Unwrap | Self::Generate | Self::XksEncrypt => 1,
            Self::BatchUnwrap | Self::BatchGenerate => BENCH_BATCH,
        }
    }
}

/// Items per batch call in the bench.
pub const BENCH_BATCH: usize = 64;

/// How long each path of a row runs before the next takes its turn (see `measure_row`).
pub const SLICE: Duration = Duration::from_secs(1);

/// Bench parameters.
#[derive(Debug, Clone)]
pub struct BenchOptions {
    /// Caller counts to measure (each caller is a task with its own connection).
    pub callers: Vec<usize>,
    /// Measuring time per figure.
    pub duration: Duration,
    /// Operations to measure.
    pub ops: Vec<BenchOp>,
    /// Key to use; a new one is created when `None`.
    pub key: Option<String>,
    /// Also measure the bad-ciphertext flood (for each caller count of 2 or more).
    pub flood: bool,
    /// How many times to measure everything.
    pub rounds: usize,
    /// The XKS listener's address, when `--op xks-encrypt` is measured and the config's
    /// `[xks] listen` has port 0 (the ready line names the one bound).
    pub xks: Option<std::net::SocketAddr>,
    /// The CloudHSM simulator's control file: every row is measured again with one HSM
    /// down (`down 1` written to it, emptied afterwards).
    pub hsm_down_control: Option<std::path::PathBuf>,
}

/// One measured rate.
#[derive(Debug, Clone, Copy, Default)]
pub struct Rate {
    /// Completed calls.
    pub calls: u64,
    /// Calls that did not give the expected answer (should be 0).
    pub errors: u64,
    /// Data keys per second (calls per second for single calls).
    pub per_sec: f64,
    /// Latency per call, 50th percentile, microseconds.
    pub p50_us: u64,
    /// Latency per call, 99th percentile, microseconds.
    pub p99_us: u64,
}

/// One operation at one caller count, every path measured in the same round.
#[derive(Debug, Clone)]
pub struct Row {
    /// The operation.
    pub op: BenchOp,
    /// Concurrent callers.
    pub callers: usize,
    /// Threads (and sessions) of the raw baseline.
    pub raw_threads: usize,
    /// Whether the raw baseline ran in bursts of one batch's token calls spread over its
    /// threads (one caller's batch on a networked HSM): then its p50 is a burst's latency,
    /// the floor of one batch call.
    pub raw_bursts: bool,
    /// Whether the token waits on the network (CloudHSM): then the raw baseline runs as many
    /// threads as callers, and measures the HSM's capacity rather than this machine's cores.
    pub networked: bool,
    /// Measured with one HSM of the simulated cluster down.
    pub hsm_down: bool,
    /// Raw PKCS#11, in-process.
    pub raw: Rate,
    /// The bare tonic echo, same transport and callers.
    pub echo: Rate,
    /// The daemon.
    pub wrapd: Rate,
    /// The daemon's CPU time per data key while it was measured, microseconds (from its
    /// `/proc/PID/stat`; `None` where that cannot be read): a figure the load generator
    /// sharing the cores does not move.
    pub wrapd_cpu_us: Option<f64>,
    /// This process's CPU time per data key during the raw token calls, microseconds: the
    /// token's own cost.
    pub raw_cpu_us: Option<f64>,
}

impl Row {
    /// The row's name in the tables: the operation, and whether an HSM was down.
    pub fn label(&self) -> String {
        if self.hsm_down {
            format!("{}, 1 HSM down", self.op.name())
        } else {
            self.op.name().to_owned()
        }
    }

    /// A lone caller's floor, p50 in microseconds: the gRPC round trip (echo), the token
    /// call (raw) and, when each line is synced, the audit line's `fdatasync`, in series.
    pub fn floor_p50_us(&self, fsync_p50_us: Option<u64>) -> u64 {
        self.echo.p50_us + self.raw.p50_us + fsync_p50_us.unwrap_or(0)
    }

    /// Raw and echo in series: `1 / (1/raw + 1/echo)` data keys per second.
    pub fn ceiling(&self) -> f64 {
        in_series(self.raw.per_sec, self.echo.per_sec)
    }

    /// The daemon's share of the ceiling.
    pub fn share(&self) -> f64 {
        ratio(self.wrapd.per_sec, self.ceiling())
    }
}

/// The bad-ciphertext flood at one caller count.
#[derive(Debug, Clone)]
pub struct FloodRow {
    /// Concurrent callers in all.
    pub callers: usize,
    /// All callers sending good blobs, in turns with the flooded periods.
    pub good_only: Rate,
    /// Half the callers, sending good blobs during the flood.
    pub good: Rate,
    /// The other half, sending blobs whose GCM tag fails (a success is an INVALID_ARGUMENT).
    pub bad: Rate,
    /// The token alone (the raw threads), every thread decrypting the good ciphertext.
    pub raw_good_only: Rate,
    /// The token alone, half the raw threads decrypting the bad ciphertext (its refusal
    /// counts as an answer).
    pub raw_flooded: Rate,
}

impl FloodRow {
    /// Answers per second during the flood over answers per second without it.
    pub fn ratio(&self) -> f64 {
        ratio(self.good.per_sec + self.bad.per_sec, self.good_only.per_sec)
    }

    /// The same ratio for the token alone: what a bad tag costs the token itself (SoftHSM
    /// logs every failed decryption to syslog, for one), which no daemon can save.
    pub fn raw_ratio(&self) -> f64 {
        ratio(self.raw_flooded.per_sec, self.raw_good_only.per_sec)
    }
}

/// Everything measured once.
#[derive(Debug, Clone, Default)]
pub struct Round {
    /// One row per operation and caller count.
    pub rows: Vec<Row>,
    /// One audit line's write and `fdatasync` in the audit log's directory, p50 in
    /// microseconds (`None`: the daemon does not sync each line).
    pub fsync_p50_us: Option<u64>,
    /// One row per caller count of 2 or more, when asked for.
    pub floods: Vec<FloodRow>,
}

fn in_series(a: f64, b: f64) -> f64 {
    if a <= 0.0 || b <= 0.0 {
        0.0
    } else {
        1.0 / (1.0 / a + 1.0 / b)
    }
}

fn ratio(a: f64, b: f64) -> f64 {
    if b > 0.0 { a / b } else { 0.0 }
}

pub(crate) fn histogram() -> Histogram<u64> {
    // 1 µs .. 60 s at 3 significant digits: constant bounds that are valid, so this cannot fail.
    Histogram::new_with_bounds(1, 60_000_000, 3).expect("valid histogram bounds")
}

/// Records one call that started at `started`: its latency if it went as expected, else
/// an error.
fn tally(hist: &mut Histogram<u64>, errors: &mut u64, started: Instant, ok: bool) {
    if ok {
        let _ = hist.record(started.elapsed().as_micros().max(1) as u64);
    } else {
        *errors += 1;
    }
}

fn rate(hist: &Histogram<u64>, errors: u64, elapsed: Duration, items: usize) -> Rate {
    Rate {
        calls: hist.len(),
        errors,
        per_sec: (hist.len() * items as u64) as f64 / elapsed.as_secs_f64(),
        p50_us: hist.value_at_quantile(0.50),
        p99_us: hist.value_at_quantile(0.99),
    }
}

/// One caller's request, and what counts as the expected answer.
#[derive(Clone)]
enum Load {
    Unwrap(UnwrapRequest),
    /// An Unwrap whose blob fails in the token: INVALID_ARGUMENT is the expected answer.
    BadUnwrap(UnwrapRequest),
    Generate(GenerateDataKeyRequest),
    BatchUnwrap(BatchUnwrapRequest),
    BatchGenerate(BatchGenerateDataKeyRequest),
}

impl Load {
    async fn call(&self, client: &mut DataKeyServiceClient<Channel>) -> bool {
        match self {
            Self::Unwrap(request) => client.unwrap(request.clone()).await.is_ok(),
            Self::BadUnwrap(request) => matches!(
                client.unwrap(request.clone()).await,
                Err(status) if status.code() == tonic::Code::InvalidArgument
            ),
            Self::Generate(request) => client.generate_data_key(request.clone()).await.is_ok(),
            Self::BatchUnwrap(request) => {
                client.batch_unwrap(request.clone()).await.is_ok_and(|r| {
                    let results = r.into_inner().results;
                    results.len() == request.items.len()
                        && results
                            .iter()
                            .all(|r| matches!(r.result, Some(batch_unwrap_result::Result::Ok(_))))
                })
            }
            Self::BatchGenerate(request) => client
                .batch_generate_data_key(request.clone())
                .await
                .is_ok_and(|r| {
                    let results = r.into_inner().results;
                    results.len() == request.items.len()
                        && results.iter().all(|r| {
                            matches!(
                                r.result,
                                Some(batch_generate_data_key_result::Result::Ok(_))
                            )
                        })
                }),
        }
    }
}

/// Runs one caller per load, each on its own connection to `socket`, for `duration`, and
/// returns each caller's latencies and errors, and the time it took.
async fn drive(
    socket: &Path,
    loads: Vec<Load>,
    duration: Duration,
) -> Result<(Vec<(Histogram<u64>, u64)>, Duration)> {
    let mut clients = Vec::with_capacity(loads.len());
    for _ in &loads {
        clients.push(DataKeyServiceClient::new(
            connect_unix(socket)
                .await
                .map_err(|e| Error::Unavailable(e.to_string()))?,
        ));
    }
    let started = Instant::now();
    let deadline = started + duration;
    let tasks: Vec<_> = loads
        .into_iter()
        .zip(clients)
        .map(|(load, mut client)| {
            tokio::spawn(async move {
                let mut hist = histogram();
                let mut errors = 0u64;
                while Instant::now() < deadline {
                    let t = Instant::now();
                    let ok = load.call(&mut client).await;
                    tally(&mut hist, &mut errors, t, ok);
                }
                (hist, errors)
            })
        })
        .collect();
    let mut out = Vec::with_capacity(tasks.len());
    for task in tasks {
        out.push(task.await.map_err(|e| Error::Internal(e.to_string()))?);
    }
    Ok((out, started.elapsed()))
}

/// Merges the callers' results into one rate.
fn merge(results: &[(Histogram<u64>, u64)], elapsed: Duration, items: usize) -> Rate {
    let mut hist = histogram();
    let mut errors = 0;
    for (h, e) in results {
        let _ = hist.add(h);
        errors += e;
    }
    rate(&hist, errors, elapsed, items)
}

/// What the raw baseline calls on the token.
struct RawTarget {
    token: Arc<Pkcs11Token>,
    object: ObjectId,
    aad: Vec<u8>,
    blob: Blob,
    /// The blob's ciphertext with its GCM tag's last byte flipped (the flood's).
    bad_ciphertext: Vec<u8>,
    /// The AAD of the XKS Encrypt the bench sends, as the daemon builds it.
    xks_aad: Vec<u8>,
}

/// The XKS paths of a row: the daemon's listener, the echo, and the body every caller sends.
struct XksPaths {
    daemon: xks::XksEndpoint,
    echo: xks::XksEcho,
    body: bytes::Bytes,
}

/// One token call of `op` as the raw baseline makes it (with the flood's bad ciphertext
/// when `bad`, where the token's refusal counts as the answer): whether it gave the expected
/// answer.
fn token_call(target: &RawTarget, op: BenchOp, bad: bool) -> bool {
    match op {
        BenchOp::Unwrap | BenchOp::BatchUnwrap if bad => target
            .token
            .decrypt(
                &target.object,
                &target.blob.iv,
                &target.bad_ciphertext,
                &target.aad,
            )
            .is_err_and(|e| e.kind() == ErrorKind::InvalidCiphertext),
        BenchOp::Unwrap | BenchOp::BatchUnwrap => target
            .token
            .decrypt(
                &target.object,
                &target.blob.iv,
                &target.blob.ciphertext,
                &target.aad,
            )
            .is_ok(),
        BenchOp::Generate | BenchOp::BatchGenerate => target
            .token
            .generate_and_encrypt(&target.object, 32, &target.aad)
            .is_ok(),
        BenchOp::XksEncrypt => target
            .token
            .encrypt(&target.object, &[7u8; 32], &target.xks_aad)
            .is_ok(),
    }
}

/// The raw baseline: `threads` threads calling the token directly for `duration`, the
/// first `bad_threads` of them (Unwrap only) with the flood's bad ciphertext, where the
/// token's refusal counts as the answer; each thread's latencies and errors, and the time
/// it took.
async fn raw(
    target: &Arc<RawTarget>,
    op: BenchOp,
    threads: usize,
    bad_threads: usize,
    duration: Duration,
) -> (Vec<(Histogram<u64>, u64)>, Duration) {
    let started = Instant::now();
    let deadline = started + duration;
    let workers: Vec<_> = (0..threads)
        .map(|thread| {
            let target = target.clone();
            let bad = thread < bad_threads;
            tokio::task::spawn_blocking(move || {
                let mut hist = histogram();
                let mut errors = 0u64;
                while Instant::now() < deadline {
                    let t = Instant::now();
                    let ok = token_call(&target, op, bad);
                    tally(&mut hist, &mut errors, t, ok);
                }
                (hist, errors)
            })
        })
        .collect();
    let mut results = Vec::with_capacity(workers.len());
    for worker in workers {
        if let Ok(result) = worker.await {
            results.push(result);
        }
    }
    (results, started.elapsed())
}

/// A lone batch's raw baseline on a networked HSM: bursts of [`BENCH_BATCH`] token calls
/// for `duration`, one burst at a time, each spread over `threads` threads (the daemon's
/// sessions), every thread taking the next call not yet taken until none is left; each
/// burst's latency, and the time it took. What the same calls cost on this machine with
/// nothing in between: the floor of one caller's batch.
async fn raw_bursts(
    target: &Arc<RawTarget>,
    op: BenchOp,
    threads: usize,
    duration: Duration,
) -> (Vec<(Histogram<u64>, u64)>, Duration) {
    use std::sync::Barrier;
    use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering};

    let target = target.clone();
    let threads = threads.clamp(1, BENCH_BATCH);
    let measured = tokio::task::spawn_blocking(move || {
        let started = Instant::now();
        let deadline = started + duration;
        let next = AtomicUsize::new(0);
        let errors = AtomicU64::new(0);
        let stop = AtomicBool::new(false);
        let burst = Barrier::new(threads);
        let mut hist = histogram();
        let work = || {
            loop {
                let index = next.fetch_add(1, Ordering::AcqRel);
                if index >= BENCH_BATCH {
                    break;
                }
                if !token_call(&target, op, false) {
                    errors.fetch_add(1, Ordering::Relaxed);
                }
            }
        };
        std::thread::scope(|scope| {
            for _ in 1..threads {
                let (burst, stop, work) = (&burst, &stop, &work);
                scope.spawn(move || {
                    loop {
                        burst.wait();
                        if stop.load(Ordering::Acquire) {
                            break;
                        }
                        work();
                        burst.wait();
                    }
                });
            }
            // This thread times each burst, from releasing the others to the last call's
            // end, and ends the run between bursts.
            loop {
                burst.wait();
                if stop.load(Ordering::Acquire) {
                    break;
                }
                let t = Instant::now();
                work();
                burst.wait();
                let _ = hist.record(t.elapsed().as_micros().max(1) as u64);
                next.store(0, Ordering::Release);
                if Instant::now() >= deadline {
                    stop.store(true, Ordering::Release);
                }
            }
        });
        ((hist, errors.into_inner()), started.elapsed())
    })
    .await;
    match measured {
        Ok((result, elapsed)) => (vec![result], elapsed),
        Err(_) => (Vec::new(), duration),
    }
}

/// Latencies, errors and time of one path, added up over the slices of a row.
#[derive(Default)]
struct Tally {
    results: Vec<(Histogram<u64>, u64)>,
    elapsed: Duration,
}

impl Tally {
    fn add(&mut self, (results, elapsed): (Vec<(Histogram<u64>, u64)>, Duration)) {
        self.results.extend(results);
        self.elapsed += elapsed;
    }

    fn rate(&self, items: usize) -> Rate {
        merge(&self.results, self.elapsed, items)
    }
}

/// A new key for a bench or soak run (described as `description`); its id.
pub(crate) async fn create_key(
    client: &mut KeyServiceClient<Channel>,
    description: &str,
) -> Result<String> {
    Ok(client
        .create_key(CreateKeyRequest {
            description: description.into(),
            alias: String::new(),
            ..Default::default()
        })
        .await
        .map_err(|s| Error::Unavailable(format!("CreateKey: {}", s.message())))?
        .into_inner()
        .key_id)
}

/// `duration` cut into turns of about [`SLICE`]: how many, and how long each.
fn slices(duration: Duration) -> (u32, Duration) {
    let count = u32::try_from(duration.as_millis().div_ceil(SLICE.as_millis()))
        .unwrap_or(u32::MAX)
        .max(1);
    (count, duration / count)
}

/// Measures one row: raw, echo and wrapd, taking turns [`SLICE`] at a time for
/// `duration` each, so that a slow spell of the machine falls on all three alike rather
/// than on whichever was measured during it (a shared 2-core machine drifts by tens of
/// percent within seconds).
#[allow(clippy::too_many_arguments)]
async fn measure_row(
    target: &Arc<RawTarget>,
    op: BenchOp,
    callers: usize,
    raw_shape: RawShape,
    sockets: (&Path, &Path),
    request: &Load,
    xks_paths: Option<&XksPaths>,
    duration: Duration,
) -> Result<Row> {
    let (echo_socket, socket) = sockets;
    let (slices, slice) = slices(duration);
    let daemon = daemon_pid(socket).await;
    let mut raw_tally = Tally::default();
    let mut echo_tally = Tally::default();
    let mut wrapd_tally = Tally::default();
    let (mut raw_ticks, mut wrapd_ticks) = (Some(0u64), Some(0u64));
    for _ in 0..slices {
        let before = cpu_ticks(None);
        raw_tally.add(match raw_shape {
            RawShape::Threads(threads) => raw(target, op, threads, 0, slice).await,
            RawShape::Bursts(threads) => raw_bursts(target, op, threads, slice).await,
        });
        raw_ticks = add_ticks(raw_ticks, before, cpu_ticks(None));
        let before = match (op, xks_paths) {
            (BenchOp::XksEncrypt, Some(paths)) => {
                echo_tally
                    .add(xks::drive(&paths.echo.endpoint, callers, &paths.body, slice).await?);
                let before = daemon.and_then(|pid| cpu_ticks(Some(pid)));
                wrapd_tally.add(xks::drive(&paths.daemon, callers, &paths.body, slice).await?);
                before
            }
            _ => {
                echo_tally.add(drive(echo_socket, vec![request.clone(); callers], slice).await?);
                let before = daemon.and_then(|pid| cpu_ticks(Some(pid)));
                wrapd_tally.add(drive(socket, vec![request.clone(); callers], slice).await?);
                before
            }
        };
        wrapd_ticks = add_ticks(
            wrapd_ticks,
            before,
            daemon.and_then(|pid| cpu_ticks(Some(pid))),
        );
    }
    // A token call is per data key: its rate is in data keys already, a burst's is not.
    let (raw_threads, raw_bursts, raw_items) = match raw_shape {
        RawShape::Threads(threads) => (threads, false, 1),
        RawShape::Bursts(threads) => (threads, true, BENCH_BATCH),
    };
    let raw = raw_tally.rate(raw_items);
    let wrapd = wrapd_tally.rate(op.items());
    let per_key = |ticks: Option<u64>, keys: u64| {
        ticks
            .filter(|_| keys > 0)
            .map(|t| t as f64 * 1e6 / USER_HZ / keys as f64)
    };
    Ok(Row {
        op,
        callers,
        raw_threads,
        raw_bursts,
        networked: false,
        hsm_down: false,
        raw_cpu_us: per_key(raw_ticks, raw.calls * raw_items as u64),
        wrapd_cpu_us: per_key(wrapd_ticks, wrapd.calls * op.items() as u64),
        raw,
        echo: echo_tally.rate(op.items()),
        wrapd,
    })
}

/// How a row's raw baseline calls the token.
#[derive(Debug, Clone, Copy)]
enum RawShape {
    /// This many threads, each calling in a loop ([`raw`]).
    Threads(usize),
    /// One batch's calls at a time, spread over this many threads ([`raw_bursts`]).
    Bursts(usize),
}

/// The unit of `/proc/PID/stat`'s CPU times: Linux reports them in USER_HZ, 100 a second on
/// every architecture it exports to user space that way.
const USER_HZ: f64 = 100.0;

/// User plus system CPU time of a process (`None`: this one) so far, in USER_HZ ticks.
fn cpu_ticks(pid: Option<i32>) -> Option<u64> {
    let path = pid.map_or_else(
        || "/proc/self/stat".to_owned(),
        |p| format!("/proc/{p}/stat"),
    );
    let stat = std::fs::read_to_string(path).ok()?;
    // The command name is in parentheses and may hold spaces: count fields after it.
    let after = &stat[stat.rfind(')')? + 1..];
    let fields: Vec<&str> = after.split_whitespace().collect();
    // utime and stime are the 14th and 15th fields of the line, the 12th and 13th here.
    let user: u64 = fields.get(11)?.parse().ok()?;
    let system: u64 = fields.get(12)?.parse().ok()?;
    Some(user + system)
}

/// Adds the ticks between two readings to a sum; any missing reading makes it unknown.
fn add_ticks(sum: Option<u64>, before: Option<u64>, after: Option<u64>) -> Option<u64> {
    Some(sum? + after?.saturating_sub(before?))
}

/// The daemon's process id, from the credentials of a connection to its socket.
async fn daemon_pid(socket: &Path) -> Option<i32> {
    let stream = tokio::net::UnixStream::connect(socket).await.ok()?;
    stream.peer_cred().ok()?.pid()
}

/// The request of `op` for the bench's key, context and sample blob.
fn load(op: BenchOp, key_id: &str, context: &HashMap<String, String>, blob: &[u8]) -> Load {
    let unwrap = UnwrapRequest {
        ciphertext_blob: blob.to_vec(),
        encryption_context: context.clone(),
        key_id: String::new(),
    };
    let generate = GenerateDataKeyRequest {
        key_id: key_id.to_owned(),
        encryption_context: context.clone(),
        number_of_bytes: 32,
    };
    match op {
        // XKS rows send their own requests (`xks.rs`); this one is never sent.
        BenchOp::Unwrap | BenchOp::XksEncrypt => Load::Unwrap(unwrap),
        BenchOp::Generate => Load::Generate(generate),
        BenchOp::BatchUnwrap => Load::BatchUnwrap(BatchUnwrapRequest {
            items: vec![unwrap; BENCH_BATCH],
        }),
        BenchOp::BatchGenerate => Load::BatchGenerate(BatchGenerateDataKeyRequest {
            items: vec![generate; BENCH_BATCH],
        }),
    }
}

/// Runs the bench against the daemon configured in `config` (which must be running), the
/// echo server and the raw token, and returns every round.
pub async fn run(config: Config, options: BenchOptions) -> Result<Vec<Round>> {
    let socket = config
        .unix
        .as_ref()
        .map(|u| u.path.clone())
        .ok_or_else(|| Error::Config("the config has no [unix] listener to bench".into()))?;
    let channel = connect_unix(&socket)
        .await
        .map_err(|e| Error::Unavailable(e.to_string()))?;
    let key_id = match &options.key {
        Some(key) => key.clone(),
        None => create_key(&mut KeyServiceClient::new(channel.clone()), "wrapd bench").await?,
    };
    let context =
        EncryptionContext::new(HashMap::from([("purpose".to_owned(), "bench".to_owned())]))?;
    let wire_context: HashMap<String, String> = context
        .iter()
        .map(|(k, v)| (k.to_owned(), v.to_owned()))
        .collect();
    let sample = DataKeyServiceClient::new(channel.clone())
        .generate_data_key_without_plaintext(GenerateDataKeyRequest {
            key_id: key_id.clone(),
            encryption_context: wire_context.clone(),
            number_of_bytes: 32,
        })
        .await
        .map_err(|s| Error::Unavailable(format!("GenerateDataKey: {}", s.message())))?
        .into_inner();
    let blob = Blob::parse(&sample.ciphertext_blob)?;
    // The flood's blob: the same with its GCM tag's last byte flipped, so that it parses,
    // passes every check before the token, and fails in the token.
    let mut bad_blob = blob.clone();
    if let Some(last) = bad_blob.ciphertext.last_mut() {
        *last ^= 0x01;
    }
    let bad_blob = bad_blob.encode();

    let cores = std::thread::available_parallelism().map_or(2, |n| n.get());
    let most = options.callers.iter().copied().max().unwrap_or(1);
    // On a local token the raw baseline is bound by the cores: more threads than cores only
    // queue for them. A networked HSM's calls wait on the network, so the baseline runs a
    // thread per caller and measures the HSM's capacity.
    let networked = config.hsm.profile.is_networked();
    let raw_threads = move |callers: usize| {
        if networked {
            callers
        } else {
            callers.min(cores).max(1)
        }
    };
    // One caller's batch on a networked HSM is spread over the daemon's sessions: its
    // baseline is the same calls spread over as many threads, one batch at a time.
    let batch_sessions = config.hsm.max_sessions.clamp(1, BENCH_BATCH);
    let raw_shape = move |op: BenchOp, callers: usize| {
        if networked && callers == 1 && op.items() > 1 {
            RawShape::Bursts(batch_sessions)
        } else {
            RawShape::Threads(raw_threads(callers))
        }
    };
    let mut hsm = config.hsm;
    hsm.max_sessions = raw_threads(most).max(if networked { batch_sessions } else { 1 });
    let token = tokio::task::spawn_blocking(move || Pkcs11Token::open(hsm))
        .await
        .map_err(|e| Error::Internal(e.to_string()))??;
    let target = Arc::new(RawTarget {
        token: Arc::new(token),
        object: ObjectId::new(blob.key_id.clone(), blob.key_version),
        aad: Blob::aad(&blob.key_id, blob.key_version, &context.serialize()),
        bad_ciphertext: Blob::parse(&bad_blob)?.ciphertext,
        xks_aad: xks::token_aad(blob.key_version),
        blob,
    });
    let xks_paths = if options.ops.contains(&BenchOp::XksEncrypt) {
        let xks_config = config.xks.as_ref().ok_or_else(|| {
            Error::Config("--op xks-encrypt needs the daemon's [xks] section".into())
        })?;
        let addr = match options.xks {
            Some(addr) => addr,
            None if xks_config.listen.port() != 0 => xks_config.listen,
            None => {
                return Err(Error::Config(
                    "[xks] listens on port 0: give the address of its ready line with --xks-endpoint"
                        .into(),
                ));
            }
        };
        let external = target
            .blob
            .key_id
            .as_str()
            .strip_prefix(crate::ids::KeyId::PREFIX)
            .unwrap_or_default()
            .to_owned();
        Some(XksPaths {
            daemon: xks::XksEndpoint::daemon(addr, xks_config, &external)?,
            echo: xks::XksEcho::start().await?,
            body: xks::encrypt_body(),
        })
    } else {
        None
    };

    let echo_dir = tempfile::Builder::new()
        .prefix("wrapd-bench-")
        .tempdir()
        .map_err(|e| Error::Config(format!("cannot create a directory for the echo: {e}")))?;
    let echo_socket = echo_dir.path().join("echo.sock");
    let _echo = echo::EchoServer::start(&echo_socket, sample.ciphertext_blob.clone())?;

    let synced_dir = config
        .audit
        .as_ref()
        .filter(|audit| audit.fsync == crate::audit::FsyncPolicy::Always)
        .map(|audit| {
            audit
                .file
                .parent()
                .filter(|dir| !dir.as_os_str().is_empty())
                .map_or_else(
                    || std::path::PathBuf::from("."),
                    std::path::Path::to_path_buf,
                )
        });
    let mut rounds = Vec::with_capacity(options.rounds);
    for _ in 0..options.rounds.max(1) {
        let mut round = Round::default();
        if let Some(dir) = &synced_dir {
            let dir = dir.clone();
            round.fsync_p50_us = Some(
                tokio::task::spawn_blocking(move || fdatasync_p50_us(&dir))
                    .await
                    .map_err(|e| Error::Internal(e.to_string()))??,
            );
        }
        let passes: &[bool] = if options.hsm_down_control.is_some() {
            &[false, true]
        } else {
            &[false]
        };
        for &hsm_down in passes {
            if let Some(control) = &options.hsm_down_control {
                set_hsm_down(control, hsm_down)?;
            }
            let measured = measure_rows(
                &target,
                &options,
                (&echo_socket, &socket),
                xks_paths.as_ref(),
                |op| load(op, &key_id, &wire_context, &sample.ciphertext_blob),
                raw_shape,
            )
            .await;
            if hsm_down && let Some(control) = &options.hsm_down_control {
                set_hsm_down(control, false)?;
            }
            for mut row in measured? {
                row.networked = networked;
                row.hsm_down = hsm_down;
                round.rows.push(row);
            }
        }
        if options.flood {
            for &callers in options.callers.iter().filter(|&&c| c >= 2) {
                let good = load(
                    BenchOp::Unwrap,
                    &key_id,
                    &wire_context,
                    &sample.ciphertext_blob,
                );
                let bad = UnwrapRequest {
                    ciphertext_blob: bad_blob.clone(),
                    encryption_context: wire_context.clone(),
                    key_id: String::new(),
                };
                // Good only and flooded take turns, like a row's three paths: the
                // machine's drift does not count as the flood's cost.
                let half = callers / 2;
                let mut flooded = vec![good.clone(); callers - half];
                flooded.extend(vec![Load::BadUnwrap(bad); half]);
                let (count, slice) = slices(options.duration);
                let raw_threads = raw_threads(callers);
                let mut good_only = Tally::default();
                let mut good_flooded = Tally::default();
                let mut bad_flooded = Tally::default();
                let mut raw_good_only = Tally::default();
                let mut raw_flooded = Tally::default();
                for _ in 0..count {
                    raw_good_only.add(raw(&target, BenchOp::Unwrap, raw_threads, 0, slice).await);
                    raw_flooded.add(
                        raw(
                            &target,
                            BenchOp::Unwrap,
                            raw_threads,
                            raw_threads / 2,
                            slice,
                        )
                        .await,
                    );
                    good_only.add(drive(&socket, vec![good.clone(); callers], slice).await?);
                    let (mut results, elapsed) = drive(&socket, flooded.clone(), slice).await?;
                    let bad_results = results.split_off(callers - half);
                    good_flooded.add((results, elapsed));
                    bad_flooded.add((bad_results, elapsed));
                }
                round.floods.push(FloodRow {
                    callers,
                    good_only: good_only.rate(1),
                    good: good_flooded.rate(1),
                    bad: bad_flooded.rate(1),
                    raw_good_only: raw_good_only.rate(1),
                    raw_flooded: raw_flooded.rate(1),
                });
            }
        }
        rounds.push(round);
    }
    target.token.close();
    Ok(rounds)
}

/// How long appending one audit-sized line (400 bytes) and `fdatasync` take in `dir`, p50 of
/// 200 in microseconds: the floor the audit log adds to each call with `fsync = "always"`.
/// One row per operation and caller count, in that order.
async fn measure_rows(
    target: &Arc<RawTarget>,
    options: &BenchOptions,
    sockets: (&Path, &Path),
    xks_paths: Option<&XksPaths>,
    request: impl Fn(BenchOp) -> Load,
    raw_shape: impl Fn(BenchOp, usize) -> RawShape,
) -> Result<Vec<Row>> {
    let mut rows = Vec::new();
    for &op in &options.ops {
        for &callers in &options.callers {
            rows.push(
                measure_row(
                    target,
                    op,
                    callers,
                    raw_shape(op, callers),
                    sockets,
                    &request(op),
                    xks_paths,
                    options.duration,
                )
                .await?,
            );
        }
    }
    Ok(rows)
}

/// Takes HSM 1 of the simulated cluster down (`down`) or brings it back, through the
/// simulator's control file, which the daemon's module and the bench's own read alike.
fn set_hsm_down(control: &Path, down: bool) -> Result<()> {
    let text = if down { "down 1\n" } else { "" };
    std::fs::write(control, text)
        .map_err(|e| Error::Config(format!("{}: {e}", control.display())))?;
    // The module notices the change on its next call; calls in flight on the HSM that went
    // down fail over to the other within their deadlines.
    std::thread::sleep(Duration::from_millis(100));
    Ok(())
}

fn fdatasync_p50_us(dir: &std::path::Path) -> Result<u64> {
    use std::io::Write;
    let io = |e: std::io::Error| Error::Config(format!("{}: {e}", dir.display()));
    let mut file = tempfile::NamedTempFile::new_in(dir).map_err(io)?;
    let line = [b'x'; 400];
    let mut hist = histogram();
    for _ in 0..200 {
        let started = Instant::now();
        file.write_all(&line).map_err(io)?;
        file.as_file().sync_data().map_err(io)?;
        let _ = hist.record(started.elapsed().as_micros().max(1) as u64);
    }
    Ok(hist.value_at_quantile(0.5))
}

/// Formats one round as tables.
pub fn format_round(round: &Round) -> String {
    let mut out = format!(
        "{:<30} {:>7} {:>9} {:>9} {:>9} {:>9} {:>6} {:>8} {:>8} {:>6}\n",
        "operation",
        "callers",
        "raw/s",
        "echo/s",
        "ceiling/s",
        "wrapd/s",
        "share",
        "p50 µs",
        "p99 µs",
        "errors"
    );
    for row in &round.rows {
        out.push_str(&format!(
            "{:<30} {:>7} {:>9.0} {:>9.0} {:>9.0} {:>9.0} {:>5.0}% {:>8} {:>8} {:>6}\n",
            row.label(),
            row.callers,
            row.raw.per_sec,
            row.echo.per_sec,
            row.ceiling(),
            row.wrapd.per_sec,
            100.0 * row.share(),
            row.wrapd.p50_us,
            row.wrapd.p99_us,
            row.raw.errors + row.echo.errors + row.wrapd.errors,
        ));
    }
    // Single calls only: a batch row's raw figure is per item, its daemon figure per call.
    let networked: Vec<&Row> = round
        .rows
        .iter()
        .filter(|r| r.networked && r.callers > 1)
        .collect();
    if !networked.is_empty() {
        out.push_str(
            "\nnetworked HSM: its capacity (raw, a thread per caller), this machine's in-series \
             ceiling, and the daemon's share of the lower, which bounds it\n",
        );
        for row in networked {
            let bound = row.raw.per_sec.min(row.ceiling());
            out.push_str(&format!(
                "  {:<28} {:>3} callers   capacity {:>7.0}/s   ceiling {:>7.0}/s   wrapd {:>7.0}/s = {:>3.0}% of capacity, {:>3.0}% of the {}\n",
                row.label(),
                row.callers,
                row.raw.per_sec,
                row.ceiling(),
                row.wrapd.per_sec,
                100.0 * ratio(row.wrapd.per_sec, row.raw.per_sec),
                100.0 * ratio(row.wrapd.per_sec, bound),
                if row.ceiling() < row.raw.per_sec { "ceiling" } else { "capacity" },
            ));
        }
    }
    let lone: Vec<&Row> = round
        .rows
        .iter()
        .filter(|r| r.callers == 1 && (r.op.items() == 1 || r.raw_bursts))
        .collect();
    if !lone.is_empty() {
        out.push_str(&format!(
            "\none caller, p50 µs: the floor (echo + token{}) and the daemon's overhead above it \
             (a batch's token figure: its {BENCH_BATCH} calls spread over the daemon's sessions)\n",
            if round.fsync_p50_us.is_some() {
                " + fdatasync"
            } else {
                ""
            }
        ));
        for row in lone {
            let floor = row.floor_p50_us(round.fsync_p50_us);
            out.push_str(&format!(
                "  {:<28} echo {:>6} + token {:>6} + fdatasync {:>6} = floor {:>6}   wrapd {:>6}   overhead {:>6}\n",
                row.label(),
                row.echo.p50_us,
                row.raw.p50_us,
                round.fsync_p50_us.unwrap_or(0),
                floor,
                row.wrapd.p50_us,
                row.wrapd.p50_us as i64 - floor as i64,
            ));
        }
    }
    let cpu: Vec<&Row> = round
        .rows
        .iter()
        .filter(|r| r.wrapd_cpu_us.is_some() && r.raw_cpu_us.is_some())
        .collect();
    if !cpu.is_empty() {
        out.push_str(
            "\nCPU per data key, µs: the daemon's (from /proc/PID/stat), and the token's own\n",
        );
        for row in cpu {
            out.push_str(&format!(
                "  {:<28} {:>3} callers   daemon {:>7.1}   token {:>7.1}\n",
                row.label(),
                row.callers,
                row.wrapd_cpu_us.unwrap_or(0.0),
                row.raw_cpu_us.unwrap_or(0.0),
            ));
        }
    }
    if !round.floods.is_empty() {
        out.push_str(&format!(
            "\n{:<25} {:>7} {:>12} {:>12} {:>9} {:>9} {:>6} {:>8} {:>6} {:>9}\n",
            "bad-ciphertext flood",
            "callers",
            "good only/s",
            "flooded/s",
            "good/s",
            "bad/s",
            "ratio",
            "p99 µs",
            "errors",
            "raw ratio"
        ));
        for flood in &round.floods {
            out.push_str(&format!(
                "{:<25} {:>7} {:>12.0} {:>12.0} {:>9.0} {:>9.0} {:>6.2} {:>8} {:>6} {:>9.2}\n",
                "Unwrap, half bad",
                flood.callers,
                flood.good_only.per_sec,
                flood.good.per_sec + flood.bad.per_sec,
                flood.good.per_sec,
                flood.bad.per_sec,
                flood.ratio(),
                flood.good.p99_us.max(flood.bad.p99_us),
                flood.good_only.errors + flood.good.errors + flood.bad.errors,
                flood.raw_ratio(),
            ));
        }
    }
    out
}

/// The range of each figure over the rounds.
pub fn format_summary(rounds: &[Round]) -> String {
    fn range(values: impl Iterator<Item = f64>) -> (f64, f64) {
        values.fold((f64::INFINITY, 0.0_f64), |(lo, hi), v| {
            (lo.min(v), hi.max(v))
        })
    }
    let Some(first) = rounds.first() else {
        return String::new();
    };
    let mut out = format!(
        "over {} rounds (lowest - highest):\n{:<30} {:>7} {:>19} {:>19} {:>13} {:>15}\n",
        rounds.len(),
        "operation",
        "callers",
        "ceiling/s",
        "wrapd/s",
        "share",
        "p99 µs"
    );
    for (i, row) in first.rows.iter().enumerate() {
        let rows: Vec<&Row> = rounds.iter().filter_map(|r| r.rows.get(i)).collect();
        let ceiling = range(rows.iter().map(|r| r.ceiling()));
        let wrapd = range(rows.iter().map(|r| r.wrapd.per_sec));
        let share = range(rows.iter().map(|r| 100.0 * r.share()));
        let p99 = range(rows.iter().map(|r| r.wrapd.p99_us as f64));
        out.push_str(&format!(
            "{:<30} {:>7} {:>9.0} - {:<7.0} {:>9.0} - {:<7.0} {:>5} - {:<5} {:>6.0} - {:<6.0}\n",
            row.label(),
            row.callers,
            ceiling.0,
            ceiling.1,
            wrapd.0,
            wrapd.1,
            format!("{:.0}%", share.0),
            format!("{:.0}%", share.1),
            p99.0,
            p99.1
        ));
    }
    for (i, flood) in first.floods.iter().enumerate() {
        let floods = || rounds.iter().filter_map(|r| r.floods.get(i));
        let ratios = range(floods().map(FloodRow::ratio));
        let raw_ratios = range(floods().map(FloodRow::raw_ratio));
        out.push_str(&format!(
            "{:<25} {:>7} flooded / good only: {:.2} - {:.2} (the token alone: {:.2} - {:.2})\n",
            "Unwrap, half bad", flood.callers, ratios.0, ratios.1, raw_ratios.0, raw_ratios.1
        ));
    }
    out
}
