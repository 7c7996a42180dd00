//! `wrapd bench`: throughput and latency of the daemon over its unix socket, next to the raw
//! in-process PKCS#11 rate of the same operation on the same token, measured in one run.
//!
//! The raw baseline is what the daemon cannot beat: the same AES-GCM `C_Decrypt` (Unwrap) or
//! `C_GenerateRandom` + `C_Encrypt` (GenerateDataKey) with the same AAD, on the same number of
//! sessions and threads, with no gRPC, no metadata and no scheduling in between.

use std::collections::HashMap;
use std::sync::Arc;

use std::time::{Duration, Instant};

use hdrhistogram::Histogram;

use crate::blob::Blob;
use crate::client::{DataKeyServiceClient, KeyServiceClient, connect_unix};
use crate::config::Config;
use crate::context::EncryptionContext;
use crate::error::{Error, Result};
use crate::hsm::{ObjectId, Pkcs11Token, Token};
use crate::proto::{
    BatchUnwrapRequest, CreateKeyRequest, GenerateDataKeyRequest, UnwrapRequest,
    batch_unwrap_result,
};

/// Which operation to measure.
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum BenchOp {
    /// Unwrap of a 32-byte data key.
    Unwrap,
    /// GenerateDataKey of 32 bytes.
    Generate,
    /// BatchUnwrap of 64 items per call (rows count data keys, latency is per call).
    BatchUnwrap,
}

/// Items per BatchUnwrap call in the bench.
pub const BENCH_BATCH: usize = 64;

/// Bench parameters.
#[derive(Debug, Clone)]
pub struct BenchOptions {
    /// Concurrent callers (tasks for the daemon, threads and sessions for the baseline).
    pub concurrency: usize,
    /// Measuring time per operation and path.
    pub duration: Duration,
    /// Operations to measure.
    pub ops: Vec<BenchOp>,
    /// Key to use; a new one is created when `None`.
    pub key: Option<String>,
}

/// One measured row.
#[derive(Debug)]
pub struct BenchResult {
    /// Operation name.
    pub op: &'static str,
    /// `daemon` or `raw pkcs11`.
    pub path: &'static str,
    /// Completed operations.
    pub ops: u64,
    /// Errors seen (should be 0).
    pub errors: u64,
    /// Operations per second.
    pub ops_per_sec: f64,
    /// Latency percentiles in microseconds: p50, p99, p99.9.
    pub p50_us: u64,
    /// See `p50_us`.
    pub p99_us: u64,
    /// See `p50_us`.
    pub p999_us: u64,
}

fn histogram() -> Histogram<u64> {
    // 1 µs .. 60 s at 3 significant digits: constant bounds that are valid, so this cannot fail.
    Histogram::new_with_bounds(1, 60_000_000, 3).expect("valid histogram bounds")
}

fn result(
    op: &'static str,
    path: &'static str,
    hist: &Histogram<u64>,
    errors: u64,
    elapsed: Duration,
) -> BenchResult {
    BenchResult {
        op,
        path,
        ops: hist.len(),
        errors,
        ops_per_sec: hist.len() as f64 / elapsed.as_secs_f64(),
        p50_us: hist.value_at_quantile(0.50),
        p99_us: hist.value_at_quantile(0.99),
        p999_us: hist.value_at_quantile(0.999),
    }
}

fn bench_context() -> Result<EncryptionContext> {
    EncryptionContext::new(HashMap::from([("purpose".to_owned(), "bench".to_owned())]))
}

/// Runs the bench against the daemon configured in `config` (which must be running) and the
/// raw token, and returns the rows in the order measured.
pub async fn run(config: Config, options: BenchOptions) -> Result<Vec<BenchResult>> {
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
        None => {
            KeyServiceClient::new(channel.clone())
                .create_key(CreateKeyRequest {
                    description: "wrapd bench".into(),
                    alias: String::new(),
                    ..Default::default()
                })
                .await
                .map_err(|s| Error::Unavailable(format!("CreateKey: {}", s.message())))?
                .into_inner()
                .key_id
        }
    };
    let context = bench_context()?;
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
    let object = ObjectId::new(blob.key_id.clone(), blob.key_version);
    let aad = Blob::aad(&blob.key_id, blob.key_version, &context.serialize());

    let mut hsm = config.hsm;
    hsm.max_sessions = options.concurrency;
    let token = Arc::new(
        tokio::task::spawn_blocking(move || Pkcs11Token::open(hsm))
            .await
            .map_err(|e| Error::Internal(e.to_string()))??,
    );

    let mut rows = Vec::new();
    for op in &options.ops {
        let name = match op {
            BenchOp::Unwrap => "Unwrap",
            BenchOp::Generate => "GenerateDataKey",
            BenchOp::BatchUnwrap => "BatchUnwrap x64 (keys/s, latency per call)",
        };
        // Daemon: N tasks over one HTTP/2 connection each.
        let mut tasks = Vec::new();
        let started = Instant::now();
        let deadline = started + options.duration;
        for _ in 0..options.concurrency {
            let mut client = DataKeyServiceClient::new(
                connect_unix(&socket)
                    .await
                    .map_err(|e| Error::Unavailable(e.to_string()))?,
            );
            let (op, key_id, ctx, blob) = (
                *op,
                key_id.clone(),
                wire_context.clone(),
                sample.ciphertext_blob.clone(),
            );
            tasks.push(tokio::spawn(async move {
                let mut hist = histogram();
                let mut errors = 0u64;
                while Instant::now() < deadline {
                    let t = Instant::now();
                    let ok = match op {
                        BenchOp::Unwrap => client
                            .unwrap(UnwrapRequest {
                                ciphertext_blob: blob.clone(),
                                encryption_context: ctx.clone(),
                                key_id: String::new(),
                            })
                            .await
                            .is_ok(),
                        BenchOp::Generate => client
                            .generate_data_key(GenerateDataKeyRequest {
                                key_id: key_id.clone(),
                                encryption_context: ctx.clone(),
                                number_of_bytes: 32,
                            })
                            .await
                            .is_ok(),
                        BenchOp::BatchUnwrap => {
                            let item = UnwrapRequest {
                                ciphertext_blob: blob.clone(),
                                encryption_context: ctx.clone(),
                                key_id: String::new(),
                            };
                            client
                                .batch_unwrap(BatchUnwrapRequest {
                                    items: vec![item; BENCH_BATCH],
                                })
                                .await
                                .is_ok_and(|r| {
                                    r.into_inner().results.iter().all(|r| {
                                        matches!(r.result, Some(batch_unwrap_result::Result::Ok(_)))
                                    })
                                })
                        }
                    };
                    if ok {
                        let _ = hist.record(t.elapsed().as_micros().max(1) as u64);
                    } else {
                        errors += 1;
                    }
                }
                (hist, errors)
            }));
        }
        let mut hist = histogram();
        let mut errors = 0;
        for task in tasks {
            let (h, e) = task.await.map_err(|e| Error::Internal(e.to_string()))?;
            let _ = hist.add(&h);
            errors += e;
        }
        let mut row = result(
            name,
            "daemon (unix socket)",
            &hist,
            errors,
            started.elapsed(),
        );
        if *op == BenchOp::BatchUnwrap {
            row.ops *= BENCH_BATCH as u64;
            row.ops_per_sec *= BENCH_BATCH as f64;
        }
        rows.push(row);

        // Raw: N threads calling the token directly.
        let started = Instant::now();
        let deadline = started + options.duration;
        let mut threads = Vec::new();
        for _ in 0..options.concurrency {
            let (token, object, aad, blob, op) = (
                token.clone(),
                object.clone(),
                aad.clone(),
                blob.clone(),
                *op,
            );
            threads.push(tokio::task::spawn_blocking(move || {
                let mut hist = histogram();
                let mut errors = 0u64;
                while Instant::now() < deadline {
                    let t = Instant::now();
                    let ok = match op {
                        BenchOp::Unwrap | BenchOp::BatchUnwrap => token
                            .decrypt(&object, &blob.iv, &blob.ciphertext, &aad)
                            .is_ok(),
                        BenchOp::Generate => token.generate_and_encrypt(&object, 32, &aad).is_ok(),
                    };
                    if ok {
                        let _ = hist.record(t.elapsed().as_micros().max(1) as u64);
                    } else {
                        errors += 1;
                    }
                }
                (hist, errors)
            }));
        }
        let mut hist = histogram();
        let mut errors = 0;
        for thread in threads {
            let (h, e) = thread.await.map_err(|e| Error::Internal(e.to_string()))?;
            let _ = hist.add(&h);
            errors += e;
        }
        rows.push(result(
            name,
            "raw pkcs11 (in-process)",
            &hist,
            errors,
            started.elapsed(),
        ));
    }
    token.close();
    Ok(rows)
}

/// Formats rows as a table, with the daemon/raw ratio per operation.
pub fn format_table(rows: &[BenchResult], concurrency: usize) -> String {
    let mut out = format!(
        "{:<16} {:<24} {:>5} {:>9} {:>7} {:>10} {:>9} {:>9} {:>9}\n",
        "operation", "path", "conc", "ops", "errors", "ops/s", "p50 µs", "p99 µs", "p999 µs"
    );
    for row in rows {
        out.push_str(&format!(
            "{:<16} {:<24} {:>5} {:>9} {:>7} {:>10.0} {:>9} {:>9} {:>9}\n",
            row.op,
            row.path,
            concurrency,
            row.ops,
            row.errors,
            row.ops_per_sec,
            row.p50_us,
            row.p99_us,
            row.p999_us
        ));
    }
    for pair in rows.chunks(2) {
        if let [daemon, raw] = pair {
            if raw.ops_per_sec > 0.0 {
                out.push_str(&format!(
                    "{}: daemon reaches {:.0}% of the raw PKCS#11 rate\n",
                    daemon.op,
                    100.0 * daemon.ops_per_sec / raw.ops_per_sec
                ));
            }
        }
    }
    out
}

/// Soak parameters.
#[derive(Debug, Clone)]
pub struct SoakOptions {
    /// Concurrent clients.
    pub concurrency: usize,
    /// How long to run.
    pub duration: Duration,
    /// Keys the load spreads over (each rotated now and then).
    pub keys: usize,
    /// Time between two rotations (of one of the keys, in turn).
    pub rotate_every: Duration,
}

/// What a soak run saw.
#[derive(Debug, Default)]
pub struct SoakReport {
    /// Latencies per operation.
    pub latencies: Vec<(&'static str, Histogram<u64>)>,
    /// Unexpected errors, by "operation: code".
    pub errors: HashMap<String, u64>,
    /// Rotations done.
    pub rotations: u64,
    /// The daemon's resident memory (kB) at the start, the end, and the most seen.
    pub rss_kb: (u64, u64, u64),
    /// Wall time.
    pub elapsed: Duration,
}

fn rss_kb(pid: Option<i32>) -> u64 {
    let Some(pid) = pid else { return 0 };
    std::fs::read_to_string(format!("/proc/{pid}/status"))
        .ok()
        .and_then(|s| {
            s.lines()
                .find_map(|l| l.strip_prefix("VmRSS:"))
                .and_then(|v| v.trim().trim_end_matches("kB").trim().parse().ok())
        })
        .unwrap_or(0)
}

/// Drives mixed GenerateDataKey / Unwrap / ReWrap from many clients over the unix socket
/// while keys rotate, and reports errors, latency percentiles and the daemon's memory.
pub async fn soak(config: Config, options: SoakOptions) -> Result<SoakReport> {
    use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};

    let socket = config
        .unix
        .as_ref()
        .map(|u| u.path.clone())
        .ok_or_else(|| Error::Config("the config has no [unix] listener to soak".into()))?;
    // The daemon's pid, from the socket's peer credentials.
    let pid = tokio::net::UnixStream::connect(&socket)
        .await
        .ok()
        .and_then(|s| s.peer_cred().ok())
        .and_then(|c| c.pid());
    let channel = connect_unix(&socket)
        .await
        .map_err(|e| Error::Unavailable(e.to_string()))?;
    let mut admin = KeyServiceClient::new(channel.clone());
    let mut keys = Vec::new();
    for _ in 0..options.keys.max(1) {
        keys.push(
            admin
                .create_key(CreateKeyRequest {
                    description: "wrapd soak".into(),
                    alias: String::new(),
                    ..Default::default()
                })
                .await
                .map_err(|s| Error::Unavailable(format!("CreateKey: {}", s.message())))?
                .into_inner()
                .key_id,
        );
    }
    let rss_start = rss_kb(pid);
    let rss_max = Arc::new(AtomicU64::new(rss_start));
    let stop = Arc::new(AtomicBool::new(false));
    let started = Instant::now();

    // Rotations, round robin over the keys.
    let rotator = {
        let (stop, keys, every) = (stop.clone(), keys.clone(), options.rotate_every);
        let mut admin = admin.clone();
        tokio::spawn(async move {
            let (mut done, mut errors) = (0u64, 0u64);
            for key in keys.iter().cycle() {
                if stop.load(Ordering::Relaxed) {
                    break;
                }
                tokio::time::sleep(every).await;
                match admin
                    .rotate_key(crate::proto::KeyRef {
                        key_id: key.clone(),
                    })
                    .await
                {
                    Ok(_) => done += 1,
                    Err(_) => errors += 1,
                }
            }
            (done, errors)
        })
    };
    // Memory sampling.
    let sampler = {
        let (stop, rss_max) = (stop.clone(), rss_max.clone());
        tokio::spawn(async move {
            while !stop.load(Ordering::Relaxed) {
                rss_max.fetch_max(rss_kb(pid), Ordering::Relaxed);
                tokio::time::sleep(Duration::from_millis(500)).await;
            }
        })
    };
    let mut clients = Vec::new();
    for i in 0..options.concurrency.max(1) {
        let mut data = DataKeyServiceClient::new(
            connect_unix(&socket)
                .await
                .map_err(|e| Error::Unavailable(e.to_string()))?,
        );
        let (stop, keys) = (stop.clone(), keys.clone());
        clients.push(tokio::spawn(async move {
            let mut hist: HashMap<&'static str, Histogram<u64>> = HashMap::new();
            let mut errors: HashMap<String, u64> = HashMap::new();
            let context: HashMap<String, String> =
                [("client".to_owned(), i.to_string())].into_iter().collect();
            let mut blobs: Vec<(Vec<u8>, Vec<u8>)> = Vec::new();
            let mut n = 0usize;
            while !stop.load(Ordering::Relaxed) {
                n += 1;
                let key = &keys[n % keys.len()];
                let t = Instant::now();
                let (op, result): (&'static str, std::result::Result<(), tonic::Status>) =
                    match (n % 20, blobs.is_empty()) {
                        (0..=9, _) | (_, true) => (
                            "GenerateDataKey",
                            data.generate_data_key(GenerateDataKeyRequest {
                                key_id: key.clone(),
                                encryption_context: context.clone(),
                                number_of_bytes: 32,
                            })
                            .await
                            .map(|r| {
                                let r = r.into_inner();
                                if blobs.len() < 64 {
                                    blobs.push((r.ciphertext_blob, r.plaintext));
                                }
                            }),
                        ),
                        (10..=16, false) => {
                            let (blob, plaintext) = &blobs[n % blobs.len()];
                            (
                                "Unwrap",
                                data.unwrap(UnwrapRequest {
                                    ciphertext_blob: blob.clone(),
                                    encryption_context: context.clone(),
                                    key_id: String::new(),
                                })
                                .await
                                .and_then(|r| {
                                    if &r.into_inner().plaintext == plaintext {
                                        Ok(())
                                    } else {
                                        Err(tonic::Status::data_loss("wrong plaintext"))
                                    }
                                }),
                            )
                        }
                        _ => {
                            let (blob, _) = &blobs[n % blobs.len()];
                            (
                                "ReWrap",
                                data.re_wrap(crate::proto::ReWrapRequest {
                                    ciphertext_blob: blob.clone(),
                                    source_encryption_context: context.clone(),
                                    destination_key_id: keys[(n + 1) % keys.len()].clone(),
                                    destination_encryption_context: context.clone(),
                                })
                                .await
                                .map(|_| ()),
                            )
                        }
                    };
                match result {
                    Ok(()) => {
                        let _ = hist
                            .entry(op)
                            .or_insert_with(histogram)
                            .record(t.elapsed().as_micros().max(1) as u64);
                    }
                    Err(status) => {
                        *errors
                            .entry(format!("{op}: {:?}", status.code()))
                            .or_default() += 1;
                    }
                }
            }
            (hist, errors)
        }));
    }
    tokio::time::sleep(options.duration).await;
    stop.store(true, Ordering::Relaxed);
    let mut report = SoakReport::default();
    let mut merged: HashMap<&'static str, Histogram<u64>> = HashMap::new();
    for client in clients {
        let (hist, errors) = client.await.map_err(|e| Error::Internal(e.to_string()))?;
        for (op, h) in hist {
            let _ = merged.entry(op).or_insert_with(histogram).add(&h);
        }
        for (e, n) in errors {
            *report.errors.entry(e).or_default() += n;
        }
    }
    let (rotations, rotation_errors) = rotator.await.map_err(|e| Error::Internal(e.to_string()))?;
    if rotation_errors > 0 {
        report.errors.insert("RotateKey".into(), rotation_errors);
    }
    sampler.abort();
    report.rotations = rotations;
    report.elapsed = started.elapsed();
    let rss_end = rss_kb(pid);
    report.rss_kb = (
        rss_start,
        rss_end,
        rss_max.load(Ordering::Relaxed).max(rss_end),
    );
    let mut latencies: Vec<_> = merged.into_iter().collect();
    latencies.sort_by_key(|(op, _)| *op);
    report.latencies = latencies;
    Ok(report)
}

/// Formats a soak report.
pub fn format_soak(report: &SoakReport) -> String {
    let secs = report.elapsed.as_secs_f64();
    let mut out = format!(
        "{:<16} {:>9} {:>9} {:>9} {:>9} {:>9}\n",
        "operation", "ops", "ops/s", "p50 µs", "p99 µs", "p999 µs"
    );
    for (op, h) in &report.latencies {
        out.push_str(&format!(
            "{:<16} {:>9} {:>9.0} {:>9} {:>9} {:>9}\n",
            op,
            h.len(),
            h.len() as f64 / secs,
            h.value_at_quantile(0.5),
            h.value_at_quantile(0.99),
            h.value_at_quantile(0.999)
        ));
    }
    out.push_str(&format!("rotations: {}\n", report.rotations));
    let (start, end, max) = report.rss_kb;
    out.push_str(&format!(
        "daemon RSS: start {start} kB, end {end} kB, max {max} kB\n"
    ));
    if report.errors.is_empty() {
        out.push_str("errors: none\n");
    } else {
        let mut errors: Vec<_> = report.errors.iter().collect();
        errors.sort();
        for (e, n) in errors {
            out.push_str(&format!("errors: {e}: {n}\n"));
        }
    }
    out
}
