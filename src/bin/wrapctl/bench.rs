//! `wrapctl bench`: the thin client's throughput, with its baselines measured in the same run.
//!
//! 1. **Baseline**: `openssl speed -evp aes-256-gcm -bytes 16384` on one core and on every
//!    core (`-multi N`), best of three 3-second runs.
//! 2. **Library**: `message::encrypt_stream` / `decrypt_stream` of `--mib` MiB held in memory
//!    into a byte-counting sink, on a one-thread and on an all-core rayon pool (best of 3).
//! 3. **wrapctl with files**: this binary's own `encrypt` / `decrypt` of a `--mib` MiB file
//!    (one and all cores, `RAYON_NUM_THREADS`; whole processes, including the daemon call;
//!    best of five),
//!    next to a plain 1 MiB read/write copy of the same file, which bounds what any
//!    file-to-file tool can do here. Before each run the output is removed and `sync` runs
//!    (untimed), so no run pays for another's writeback.
//! 4. **Small messages**: 1 KiB messages per second from `--concurrency` callers for
//!    `--seconds`, through the daemon, without and with the data key cache (encrypt:
//!    GenerateDataKey per message or a cached DEK; decrypt: Unwrap per message or cached),
//!    and decrypting 64 messages per `Keyring::decrypt_all` call (one BatchUnwrap).

use std::io::{Read, Write};
use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::Arc;
use std::time::{Duration, Instant};

use clap::Args;
use serde_json::{Value, json};
use tonic::transport::Channel;
use wrapd::client::cache::{CacheLimits, CachingKeyring};
use wrapd::client::keyring::{Keyring, WrapdKey};
use wrapd::client::message::{self, DEFAULT_FRAME_LENGTH, EncryptedDataKey, PROVIDER_ID};
use wrapd::client::{DataKeyServiceClient, KeyServiceClient};
use wrapd::context::EncryptionContext;
use wrapd::proto::{CreateKeyRequest, KeyRef};
use zeroize::Zeroizing;

/// Options of `wrapctl bench`.
#[derive(Args, Debug)]
pub struct BenchArgs {
    /// Bulk data size in MiB (library and file parts).
    #[arg(long, default_value_t = 1024)]
    mib: usize,
    /// Frame length of the bulk messages.
    #[arg(long, default_value_t = DEFAULT_FRAME_LENGTH)]
    frame_length: u32,
    /// Key (id or alias) for the parts that need a daemon; `alias/wrapctl-bench` is created
    /// if missing.
    #[arg(long, default_value = "alias/wrapctl-bench")]
    key: String,
    /// Directory for the file part (default: the system temp dir).
    #[arg(long)]
    dir: Option<PathBuf>,
    /// Seconds per small-message measurement.
    #[arg(long, default_value_t = 3.0)]
    seconds: f64,
    /// Concurrent callers for small messages.
    #[arg(long, default_value_t = 16)]
    concurrency: usize,
    /// Only the parts that need no daemon (baseline and library).
    #[arg(long)]
    offline: bool,
    /// Seconds per `openssl speed` run.
    #[arg(long, default_value_t = 3)]
    openssl_seconds: u32,
}

impl BenchArgs {
    /// True if only the parts that need no daemon run.
    pub fn offline(&self) -> bool {
        self.offline
    }
}

const MB: f64 = 1e9;

fn gbps(bytes: u64, elapsed: Duration) -> f64 {
    bytes as f64 / elapsed.as_secs_f64() / MB
}

/// `openssl speed` AES-256-GCM at 16 KiB, in GB/s, on `processes` cores.
fn openssl_speed(processes: usize, seconds: u32) -> Option<f64> {
    let mut cmd = Command::new("openssl");
    let seconds = seconds.to_string();
    cmd.args([
        "speed",
        "-evp",
        "aes-256-gcm",
        "-bytes",
        "16384",
        "-seconds",
        &seconds,
    ]);
    if processes > 1 {
        cmd.args(["-multi", &processes.to_string()]);
    }
    let out = cmd.output().ok()?;
    let text = String::from_utf8_lossy(&out.stdout);
    // The last line reads: "aes-256-gcm  3851233.96k" (1000s of bytes per second).
    let line = text
        .lines()
        .rev()
        .find(|l| l.to_lowercase().contains("gcm"))?;
    let figure = line.split_whitespace().last()?.trim_end_matches('k');
    Some(figure.parse::<f64>().ok()? * 1000.0 / MB)
}

/// Counts bytes, keeps none.
struct Sink(u64);

impl Write for Sink {
    fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        self.0 += buf.len() as u64;
        Ok(buf.len())
    }
    fn flush(&mut self) -> std::io::Result<()> {
        Ok(())
    }
}

fn best_of(
    runs: usize,
    mut f: impl FnMut() -> Result<Duration, String>,
) -> Result<Duration, String> {
    let mut best = Duration::MAX;
    for _ in 0..runs {
        best = best.min(f()?);
    }
    Ok(best)
}

fn bench_edk() -> EncryptedDataKey {
    EncryptedDataKey {
        provider_id: PROVIDER_ID.into(),
        provider_info: b"key/bench".to_vec(),
        ciphertext: vec![0; 100],
    }
}

/// The library part: in-memory plaintext into a counting sink.
fn library(args: &BenchArgs, cores: usize) -> Result<Vec<Value>, String> {
    let size = args.mib * 1024 * 1024;
    let plaintext: Vec<u8> = (0..size).map(|i| (i % 251) as u8).collect();
    let dek = [0x42u8; 32];
    let context = EncryptionContext::from_entries([("bench".to_owned(), "library".to_owned())])
        .map_err(|e| e.to_string())?;
    let ciphertext = message::encrypt(
        &plaintext,
        &dek,
        &context,
        vec![bench_edk()],
        args.frame_length,
    )
    .map_err(|e| e.to_string())?;
    let mut rows = Vec::new();
    for threads in thread_counts(cores) {
        let pool = rayon::ThreadPoolBuilder::new()
            .num_threads(threads)
            .build()
            .map_err(|e| e.to_string())?;
        let encrypt = pool.install(|| {
            best_of(3, || {
                let start = Instant::now();
                message::encrypt_stream(
                    &mut &plaintext[..],
                    &mut Sink(0),
                    &dek,
                    &context,
                    vec![bench_edk()],
                    args.frame_length,
                )
                .map_err(|e| e.to_string())?;
                Ok(start.elapsed())
            })
        })?;
        let decrypt = pool.install(|| {
            best_of(3, || {
                let start = Instant::now();
                let mut sink = Sink(0);
                message::decrypt_stream(&mut &ciphertext[..], &mut sink, |_| {
                    Ok(Zeroizing::new(dek.to_vec()))
                })
                .map_err(|e| e.to_string())?;
                if sink.0 != size as u64 {
                    return Err("decrypt returned the wrong length".into());
                }
                Ok(start.elapsed())
            })
        })?;
        rows.push(json!({
            "part": "library", "threads": threads,
            "encrypt_gbps": gbps(size as u64, encrypt), "decrypt_gbps": gbps(size as u64, decrypt),
        }));
    }
    Ok(rows)
}

fn thread_counts(cores: usize) -> Vec<usize> {
    if cores > 1 { vec![1, cores] } else { vec![1] }
}

/// Copies a file with 1 MiB reads and writes: the I/O floor of a file-to-file transform.
fn copy_file(from: &Path, to: &Path) -> Result<Duration, String> {
    let start = Instant::now();
    let mut input = std::fs::File::open(from).map_err(|e| e.to_string())?;
    let mut output = std::fs::File::create(to).map_err(|e| e.to_string())?;
    let mut buf = vec![0u8; 1024 * 1024];
    loop {
        let n = input.read(&mut buf).map_err(|e| e.to_string())?;
        if n == 0 {
            break;
        }
        output.write_all(&buf[..n]).map_err(|e| e.to_string())?;
    }
    output.flush().map_err(|e| e.to_string())?;
    Ok(start.elapsed())
}

/// Runs per file measurement: the page cache makes single runs vary by tens of percent.
const FILE_RUNS: usize = 5;

/// The file part: this binary's `encrypt` and `decrypt` commands.
fn files(
    args: &BenchArgs,
    connection: &[String],
    key: &str,
    cores: usize,
) -> Result<Vec<Value>, String> {
    let dir = tempfile_dir(args.dir.as_deref())?;
    let plain = dir.join("plain");
    let sealed = dir.join("sealed");
    let opened = dir.join("opened");
    let size = (args.mib * 1024 * 1024) as u64;
    {
        let mut f =
            std::io::BufWriter::new(std::fs::File::create(&plain).map_err(|e| e.to_string())?);
        let chunk: Vec<u8> = (0..1024 * 1024).map(|i| (i % 251) as u8).collect();
        for _ in 0..args.mib {
            f.write_all(&chunk).map_err(|e| e.to_string())?;
        }
        f.flush().map_err(|e| e.to_string())?;
    }
    let exe = std::env::current_exe().map_err(|e| e.to_string())?;
    // Each run writes a new file with the page cache's dirty pages written back first, so
    // runs do not pay for each other's writeback or for freeing the previous output.
    let settle = |output: &Path| {
        let _ = std::fs::remove_file(output);
        let _ = Command::new("sync").status();
    };
    let run = |threads: usize, cmd: &[&str], output: &Path| -> Result<Duration, String> {
        settle(output);
        let start = Instant::now();
        let out = Command::new(&exe)
            .args(connection)
            .args(cmd)
            .env("RAYON_NUM_THREADS", threads.to_string())
            .output()
            .map_err(|e| e.to_string())?;
        if !out.status.success() {
            return Err(format!(
                "wrapctl {}: {}",
                cmd.join(" "),
                String::from_utf8_lossy(&out.stderr)
            ));
        }
        Ok(start.elapsed())
    };
    let frame = args.frame_length.to_string();
    let (p, s, o) = (
        plain.display().to_string(),
        sealed.display().to_string(),
        opened.display().to_string(),
    );
    let copy = best_of(FILE_RUNS, || {
        settle(&opened);
        copy_file(&plain, &opened)
    })?;
    let mut rows = vec![json!({
        "part": "file copy (read+write, no crypto)", "threads": 1,
        "encrypt_gbps": gbps(size, copy), "decrypt_gbps": gbps(size, copy),
    })];
    for threads in thread_counts(cores) {
        let encrypt = best_of(FILE_RUNS, || {
            run(
                threads,
                &[
                    "encrypt",
                    "--key",
                    key,
                    "--context",
                    "bench=files",
                    "--input",
                    &p,
                    "--output",
                    &s,
                    "--frame-length",
                    &frame,
                ],
                &sealed,
            )
        })?;
        let decrypt = best_of(FILE_RUNS, || {
            run(
                threads,
                &[
                    "decrypt",
                    "--context",
                    "bench=files",
                    "--input",
                    &s,
                    "--output",
                    &o,
                ],
                &opened,
            )
        })?;
        // The share of the plain copy's rate, measured in the same run.
        let of_copy = |took: Duration| copy.as_secs_f64() / took.as_secs_f64().max(1e-9);
        rows.push(json!({
            "part": "wrapctl files", "threads": threads,
            "encrypt_gbps": gbps(size, encrypt), "decrypt_gbps": gbps(size, decrypt),
            "encrypt_of_copy": of_copy(encrypt), "decrypt_of_copy": of_copy(decrypt),
        }));
    }
    let same = files_equal(&plain, &opened)?;
    let _ = std::fs::remove_dir_all(&dir);
    if !same {
        return Err("wrapctl decrypt did not return the original file".into());
    }
    Ok(rows)
}

fn tempfile_dir(base: Option<&Path>) -> Result<PathBuf, String> {
    let base = base.map_or_else(std::env::temp_dir, Path::to_path_buf);
    let dir = base.join(format!("wrapctl-bench-{}", std::process::id()));
    std::fs::create_dir_all(&dir).map_err(|e| format!("{}: {e}", dir.display()))?;
    Ok(dir)
}

fn files_equal(a: &Path, b: &Path) -> Result<bool, String> {
    let (mut a, mut b) = (
        std::io::BufReader::new(std::fs::File::open(a).map_err(|e| e.to_string())?),
        std::io::BufReader::new(std::fs::File::open(b).map_err(|e| e.to_string())?),
    );
    let (mut x, mut y) = (vec![0u8; 1 << 20], vec![0u8; 1 << 20]);
    loop {
        let n = a.read(&mut x).map_err(|e| e.to_string())?;
        let mut filled = 0;
        while filled < n {
            let m = b.read(&mut y[filled..n]).map_err(|e| e.to_string())?;
            if m == 0 {
                return Ok(false);
            }
            filled += m;
        }
        if x[..n] != y[..n] {
            return Ok(false);
        }
        if n == 0 {
            return Ok(b.read(&mut y).map_err(|e| e.to_string())? == 0);
        }
    }
}

/// Latency percentiles (µs) and rate of one small-message run.
fn summarize(name: &str, cached: bool, mut micros: Vec<u64>, elapsed: Duration) -> Value {
    micros.sort_unstable();
    let pct = |p: f64| {
        micros
            .get(((micros.len() as f64 * p) as usize).min(micros.len().saturating_sub(1)))
            .copied()
            .unwrap_or(0)
    };
    json!({
        "part": name, "cache": cached, "messages": micros.len(),
        "messages_per_s": micros.len() as f64 / elapsed.as_secs_f64(),
        "p50_us": pct(0.50), "p99_us": pct(0.99),
    })
}

/// The small-message part: 1 KiB messages through the daemon, without and with the cache.
async fn small_messages(
    args: &BenchArgs,
    channel: Channel,
    key: &str,
) -> Result<Vec<Value>, String> {
    let keyring = Keyring::new(vec![WrapdKey {
        client: DataKeyServiceClient::new(channel),
        key_id: key.to_owned(),
    }])
    .map_err(|e| e.to_string())?;
    let context = EncryptionContext::from_entries([("bench".to_owned(), "small".to_owned())])
        .map_err(|e| e.to_string())?;
    let plaintext = Arc::new(vec![0x61u8; 1024]);
    let duration = Duration::from_secs_f64(args.seconds);
    let mut rows = Vec::new();
    for cached in [false, true] {
        let cache = CachingKeyring::new(
            keyring.clone(),
            CacheLimits {
                max_messages: 10_000,
                ..CacheLimits::new(Duration::from_secs(60))
            },
        )
        .map_err(|e| e.to_string())?;
        // Encrypt: one message per iteration, each caller in its own task.
        let start = Instant::now();
        let mut tasks = Vec::new();
        for _ in 0..args.concurrency {
            let (keyring, cache, context, plaintext) = (
                keyring.clone(),
                cache.clone(),
                context.clone(),
                Arc::clone(&plaintext),
            );
            tasks.push(tokio::spawn(async move {
                let mut micros = Vec::new();
                let mut sample = None;
                while start.elapsed() < duration {
                    let t = Instant::now();
                    let key = if cached {
                        cache.data_key(&context, Some(1024)).await?
                    } else {
                        Arc::new(keyring.generate(&context).await?)
                    };
                    let sealed = message::encrypt(
                        &plaintext,
                        &key.dek,
                        &context,
                        key.data_keys.clone(),
                        4096,
                    )?;
                    micros.push(t.elapsed().as_micros() as u64);
                    sample.get_or_insert(sealed);
                }
                Ok::<_, wrapd::Error>((micros, sample))
            }));
        }
        let mut micros = Vec::new();
        let mut samples = Vec::new();
        for task in tasks {
            let (m, sample) = task
                .await
                .map_err(|e| e.to_string())?
                .map_err(|e| e.to_string())?;
            micros.extend(m);
            samples.extend(sample);
        }
        rows.push(summarize("1 KiB encrypt", cached, micros, start.elapsed()));

        // Decrypt: the same few messages over and over (one per caller).
        let start = Instant::now();
        let mut tasks = Vec::new();
        for sealed in samples.clone() {
            let (keyring, cache) = (keyring.clone(), cache.clone());
            tasks.push(tokio::spawn(async move {
                let mut micros = Vec::new();
                while start.elapsed() < duration {
                    let t = Instant::now();
                    let header = message::peek_header(&sealed)?;
                    let dek = if cached {
                        cache.unwrap(&header).await?
                    } else {
                        keyring.unwrap(&header).await?
                    };
                    let (_, plain) = message::decrypt(&sealed, |_| Ok(dek))?;
                    if plain.len() != 1024 {
                        return Err(wrapd::Error::Internal("wrong plaintext".into()));
                    }
                    micros.push(t.elapsed().as_micros() as u64);
                }
                Ok::<_, wrapd::Error>(micros)
            }));
        }
        let micros = join_micros(tasks).await?;
        rows.push(summarize("1 KiB decrypt", cached, micros, start.elapsed()));
        if !cached {
            rows.push(decrypt_in_batches(&keyring, &samples, duration).await?);
        }
    }
    Ok(rows)
}

/// Every caller's latencies, or the first caller's error.
async fn join_micros(
    tasks: Vec<tokio::task::JoinHandle<wrapd::Result<Vec<u64>>>>,
) -> Result<Vec<u64>, String> {
    let mut micros = Vec::new();
    for task in tasks {
        micros.extend(
            task.await
                .map_err(|e| e.to_string())?
                .map_err(|e| e.to_string())?,
        );
    }
    Ok(micros)
}

/// Messages per `Keyring::decrypt_all` call in the bench.
const DECRYPT_BATCH: usize = 64;

/// 1 KiB messages decrypted [`DECRYPT_BATCH`] at a time (one `BatchUnwrap` per batch), one
/// caller per sample; every message's latency is its batch's.
async fn decrypt_in_batches(
    keyring: &Keyring,
    samples: &[Vec<u8>],
    duration: Duration,
) -> Result<Value, String> {
    let start = Instant::now();
    let mut tasks = Vec::new();
    for sealed in samples {
        let (keyring, batch) = (keyring.clone(), vec![sealed.clone(); DECRYPT_BATCH]);
        tasks.push(tokio::spawn(async move {
            let messages: Vec<&[u8]> = batch.iter().map(Vec::as_slice).collect();
            let mut micros = Vec::new();
            while start.elapsed() < duration {
                let t = Instant::now();
                for result in keyring.decrypt_all(&messages).await {
                    if result?.1.len() != 1024 {
                        return Err(wrapd::Error::Internal("wrong plaintext".into()));
                    }
                }
                let took = t.elapsed().as_micros() as u64;
                micros.extend(std::iter::repeat_n(took, DECRYPT_BATCH));
            }
            Ok::<_, wrapd::Error>(micros)
        }));
    }
    let micros = join_micros(tasks).await?;
    Ok(summarize(
        "1 KiB decrypt, 64 per BatchUnwrap",
        false,
        micros,
        start.elapsed(),
    ))
}

/// Resolves `--key`, creating `alias/wrapctl-bench` if that is the (missing) default.
async fn bench_key(channel: Channel, key: &str) -> Result<String, String> {
    let mut client = KeyServiceClient::new(channel);
    match client
        .describe_key(KeyRef {
            key_id: key.to_owned(),
        })
        .await
    {
        Ok(_) => Ok(key.to_owned()),
        Err(s) if s.code() == tonic::Code::NotFound && key == "alias/wrapctl-bench" => {
            client
                .create_key(CreateKeyRequest {
                    description: "wrapctl bench".into(),
                    alias: key.to_owned(),
                    ..Default::default()
                })
                .await
                .map_err(super::status)?;
            Ok(key.to_owned())
        }
        Err(s) => Err(super::status(s)),
    }
}

/// Runs every part and returns the rows (also printed as a table unless `--json`).
pub async fn run(
    args: BenchArgs,
    channel: Option<Channel>,
    connection: Vec<String>,
) -> Result<Value, String> {
    let cores = std::thread::available_parallelism().map_or(1, |n| n.get());
    let mut rows = Vec::new();
    for processes in thread_counts(cores) {
        // Best of three, as for our own figures.
        let seconds = args.openssl_seconds;
        let figure = tokio::task::spawn_blocking(move || {
            (0..3)
                .filter_map(|_| openssl_speed(processes, seconds))
                .max_by(f64::total_cmp)
        })
        .await
        .map_err(|e| e.to_string())?;
        rows.push(json!({
            "part": "openssl speed -evp aes-256-gcm (16 KiB)", "threads": processes,
            "encrypt_gbps": figure,
        }));
    }
    let library_args = BenchArgs {
        dir: args.dir.clone(),
        key: args.key.clone(),
        ..args
    };
    let (args, library_rows) = tokio::task::spawn_blocking(move || {
        let rows = library(&library_args, cores);
        (library_args, rows)
    })
    .await
    .map_err(|e| e.to_string())?;
    rows.extend(library_rows?);
    if let (Some(channel), false) = (channel, args.offline) {
        let key = bench_key(channel.clone(), &args.key).await?;
        let (args, file_rows) = {
            let key = key.clone();
            tokio::task::spawn_blocking(move || {
                let rows = files(&args, &connection, &key, cores);
                (args, rows)
            })
            .await
            .map_err(|e| e.to_string())?
        };
        rows.extend(file_rows?);
        rows.extend(small_messages(&args, channel, &key).await?);
    }
    Ok(json!({ "cores": cores, "rows": rows }))
}

/// The rows of [`run`] as two tables (bulk throughput, small messages).
pub fn table_text(result: &Value) -> String {
    use std::fmt::Write;
    let mut out = String::new();
    let rows = result["rows"].as_array().cloned().unwrap_or_default();
    let openssl = |threads: &Value| {
        rows.iter()
            .find(|r| {
                r["part"].as_str().is_some_and(|p| p.starts_with("openssl"))
                    && r["threads"] == *threads
            })
            .and_then(|r| r["encrypt_gbps"].as_f64())
    };
    let figure = |v: &Value| v.as_f64().map_or("-".to_owned(), |g| format!("{g:.2}"));
    let _ = writeln!(out, "cores: {}", result["cores"]);
    let _ = writeln!(
        out,
        "{:<42} {:>7} {:>13} {:>13} {:>14} {:>17}",
        "bulk", "threads", "encrypt GB/s", "decrypt GB/s", "enc vs openssl", "enc/dec vs copy"
    );
    for r in rows.iter().filter(|r| r.get("threads").is_some()) {
        let part = r["part"].as_str().unwrap_or("");
        let ratio = match (r["encrypt_gbps"].as_f64(), openssl(&r["threads"])) {
            (Some(g), Some(o)) if !part.starts_with("openssl") => format!("{:.2}x", g / o),
            _ => String::new(),
        };
        // The share of the plain copy of the same file, what any file-to-file tool can
        // reach here.
        let of_copy = match (r["encrypt_of_copy"].as_f64(), r["decrypt_of_copy"].as_f64()) {
            (Some(e), Some(d)) => format!("{e:.2}x / {d:.2}x"),
            _ => String::new(),
        };
        let _ = writeln!(
            out,
            "{:<42} {:>7} {:>13} {:>13} {:>14} {:>17}",
            part,
            r["threads"],
            figure(&r["encrypt_gbps"]),
            figure(&r["decrypt_gbps"]),
            ratio,
            of_copy
        );
    }
    let small: Vec<&Value> = rows.iter().filter(|r| r.get("cache").is_some()).collect();
    if !small.is_empty() {
        let _ = writeln!(
            out,
            "\n{:<42} {:>7} {:>13} {:>13} {:>14}",
            "small messages", "cache", "messages/s", "p50 µs", "p99 µs"
        );
        for r in small {
            let _ = writeln!(
                out,
                "{:<42} {:>7} {:>13.0} {:>13} {:>14}",
                r["part"].as_str().unwrap_or(""),
                if r["cache"] == true { "on" } else { "off" },
                r["messages_per_s"].as_f64().unwrap_or(0.0),
                r["p50_us"],
                r["p99_us"]
            );
        }
    }
    out
}

/// `wrapctl bench`'s result: its rows as JSON, its tables for people.
#[derive(serde::Serialize)]
#[serde(transparent)]
pub struct BenchReport(pub Value);

impl crate::output::Report for BenchReport {
    fn human(&self) -> String {
        table_text(&self.0)
    }
}
