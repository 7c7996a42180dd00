//! `wrapd soak`: sustained load, mixed calls from many clients while keys rotate, with the
//! errors, latency percentiles and the daemon's memory it saw.

use std::collections::HashMap;
use std::sync::Arc;
use std::time::{Duration, Instant};

use hdrhistogram::Histogram;

use super::histogram;
use crate::client::{DataKeyServiceClient, KeyServiceClient, connect_unix};
use crate::config::Config;
use crate::error::{Error, Result};
use crate::proto::{GenerateDataKeyRequest, UnwrapRequest};
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
        keys.push(super::create_key(&mut admin, "wrapd soak").await?);
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
