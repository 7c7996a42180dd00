//! The daemon on a simulated CloudHSM cluster (the project's PKCS#11 module,
//! `cloudhsm-sim/`, in front of SoftHSM, `profile = "cloudhsm"`): a key just made on one HSM
//! is usable at once while it replicates to the other, one HSM taken down under 64 callers
//! costs no call, and a busy HSM slows callers down instead of failing them.

use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

use wrapd::proto::{CreateKeyRequest, GenerateDataKeyRequest, UnwrapRequest};

use crate::common::DevDaemon;

/// A dev daemon on the simulator with `settings` (`WRAPD_SIM_*`), and the simulator's
/// control file.
fn on_cluster(settings: &[(&str, &str)]) -> (DevDaemon, std::path::PathBuf, tempfile::TempDir) {
    let sim = std::path::Path::new(env!("CARGO_BIN_EXE_wrapd"))
        .with_file_name("libwrapd_cloudhsm_sim.so");
    assert!(
        sim.exists(),
        "{} is missing: cargo build -p wrapd-cloudhsm-sim",
        sim.display()
    );
    let controls = tempfile::tempdir().unwrap();
    let control = controls.path().join("control");
    std::fs::write(&control, "").unwrap();
    let mut env: Vec<(&str, &str)> = vec![
        ("WRAPD_DEV_CLOUDHSM_SIM", sim.to_str().unwrap()),
        ("WRAPD_SIM_CONTROL", control.to_str().unwrap()),
    ];
    env.extend_from_slice(settings);
    let daemon = DevDaemon::start_with_env(&env);
    let config = std::fs::read_to_string(daemon.config_path()).unwrap();
    assert!(config.contains("profile = \"cloudhsm\""), "{config}");
    (daemon, control, controls)
}

async fn new_key(daemon: &DevDaemon) -> String {
    daemon
        .keys()
        .await
        .create_key(CreateKeyRequest {
            description: "cluster".into(),
            ..Default::default()
        })
        .await
        .unwrap()
        .into_inner()
        .key_id
}

/// A data key's blob under `key`.
async fn new_blob(daemon: &DevDaemon, key: &str) -> Vec<u8> {
    daemon
        .data()
        .await
        .generate_data_key(generate(key))
        .await
        .unwrap()
        .into_inner()
        .ciphertext_blob
}

fn generate(key: &str) -> GenerateDataKeyRequest {
    GenerateDataKeyRequest {
        key_id: key.to_owned(),
        encryption_context: Default::default(),
        number_of_bytes: 32,
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_key_just_made_on_one_hsm_is_usable_at_once_while_it_replicates() {
    let (daemon, _control, _dir) =
        on_cluster(&[("WRAPD_SIM_HSMS", "2"), ("WRAPD_SIM_REPLICATION_MS", "300")]);
    let mut data = daemon.data().await;
    let mut keys = daemon.keys().await;
    for _ in 0..4 {
        // Made on one HSM; the calls right after it are spread over both.
        let key = new_key(&daemon).await;
        for _ in 0..4 {
            let generated = data
                .generate_data_key(generate(&key))
                .await
                .expect("usable at once, never missing")
                .into_inner();
            let unwrapped = data
                .unwrap(UnwrapRequest {
                    ciphertext_blob: generated.ciphertext_blob,
                    ..Default::default()
                })
                .await
                .expect("never an invalid ciphertext")
                .into_inner();
            assert_eq!(unwrapped.plaintext, generated.plaintext);
        }
        // A rotation's new version, the same.
        keys.rotate_key(wrapd::proto::KeyRef {
            key_id: key.clone(),
        })
        .await
        .unwrap();
        let generated = data
            .generate_data_key(generate(&key))
            .await
            .expect("the new version usable at once")
            .into_inner();
        assert_eq!(generated.key_version, 2);
    }
    assert!(
        !daemon.log().contains("re-initializing the PKCS#11 context"),
        "{}",
        daemon.log()
    );
}

/// `callers` tasks unwrapping `blob` until `stop`; the calls made and the failures.
async fn unwrap_load(
    daemon: &DevDaemon,
    blob: Vec<u8>,
    callers: usize,
    run: Duration,
    during: impl FnOnce() + Send + 'static,
) -> (u64, Vec<String>) {
    let done = Arc::new(AtomicU64::new(0));
    let failures = Arc::new(parking_lot::Mutex::new(Vec::new()));
    let stop = Instant::now() + run;
    let mut tasks = Vec::new();
    for _ in 0..callers {
        let mut data = daemon.data().await;
        let (blob, done, failures) = (blob.clone(), done.clone(), failures.clone());
        tasks.push(tokio::spawn(async move {
            while Instant::now() < stop {
                let request = UnwrapRequest {
                    ciphertext_blob: blob.clone(),
                    ..Default::default()
                };
                match data.unwrap(request).await {
                    Ok(_) => {
                        done.fetch_add(1, Ordering::Relaxed);
                    }
                    Err(status) => failures.lock().push(format!("{status:?}")),
                }
            }
        }));
    }
    let controller = tokio::task::spawn_blocking(during);
    for task in tasks {
        task.await.unwrap();
    }
    controller.await.unwrap();
    let failures = failures.lock().clone();
    (done.load(Ordering::Relaxed), failures)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn one_hsm_taken_down_under_64_callers_costs_no_call_and_is_used_again_when_back() {
    let (daemon, control, _dir) = on_cluster(&[
        ("WRAPD_SIM_HSMS", "2"),
        ("WRAPD_SIM_LATENCY_US", "1000"),
        ("WRAPD_SIM_CONCURRENCY", "8"),
    ]);
    let key = new_key(&daemon).await;
    let blob = new_blob(&daemon, &key).await;
    let flip = control.clone();
    let (done, failures) = unwrap_load(&daemon, blob, 64, Duration::from_secs(3), move || {
        std::thread::sleep(Duration::from_millis(800));
        // Slow first, so that calls are surely in flight on it when it goes down, however
        // the machine schedules the callers.
        std::fs::write(&flip, "slow 1 300000\n").unwrap();
        std::thread::sleep(Duration::from_millis(150));
        std::fs::write(&flip, "down 1\n").unwrap();
        std::thread::sleep(Duration::from_millis(1200));
        std::fs::write(&flip, "").unwrap();
    })
    .await;
    assert!(
        failures.is_empty(),
        "{} failed: {:?}",
        failures.len(),
        &failures[..failures.len().min(5)]
    );
    assert!(done > 100, "{done} calls");
    assert!(
        daemon.log().contains("retrying once on a fresh session"),
        "calls in flight on the HSM that went down failed and were sent again: {}",
        daemon.log()
    );
    // Back: with the other HSM down now, calls still go through (to the one that returned).
    std::fs::write(&control, "down 0\n").unwrap();
    std::thread::sleep(Duration::from_millis(50));
    let generated = daemon
        .data()
        .await
        .generate_data_key(generate(&key))
        .await
        .expect("served by the HSM that came back");
    assert_eq!(generated.into_inner().plaintext.len(), 32);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_busy_hsm_slows_callers_down_instead_of_failing_them() {
    // One HSM serving one call at a time, answering "busy" after 5 ms of queueing.
    let (mut daemon, _control, _dir) = on_cluster(&[
        ("WRAPD_SIM_HSMS", "1"),
        ("WRAPD_SIM_LATENCY_US", "2000"),
        ("WRAPD_SIM_CONCURRENCY", "1"),
        ("WRAPD_SIM_QUEUE_MS", "5"),
    ]);
    let mut config = std::fs::read_to_string(daemon.config_path()).unwrap();
    config.push_str("\n[metrics]\nlisten = \"127.0.0.1:0\"\n");
    std::fs::write(daemon.config_path(), config).unwrap();
    daemon.restart();
    let key = new_key(&daemon).await;
    let blob = new_blob(&daemon, &key).await;
    let (done, failures) = unwrap_load(&daemon, blob, 16, Duration::from_secs(2), || {}).await;
    assert!(
        failures.is_empty(),
        "{} failed: {:?}",
        failures.len(),
        &failures[..failures.len().min(5)]
    );
    assert!(done > 50, "{done} calls");
    let metrics = crate::metrics::scrape(
        daemon
            .metrics
            .as_deref()
            .expect("metrics= in the ready line"),
    );
    let retries: f64 = metrics
        .lines()
        .find_map(|l| l.strip_prefix("wrapd_hsm_transient_retries_total "))
        .and_then(|v| v.trim().parse().ok())
        .unwrap_or(0.0);
    assert!(
        retries > 0.0,
        "the HSM was busy and the calls waited: {metrics}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_hsm_busy_until_the_callers_deadline_is_unavailable_not_an_internal_error() {
    let (daemon, control, _dir) = on_cluster(&[("WRAPD_SIM_HSMS", "1")]);
    let key = new_key(&daemon).await;
    let blob = new_blob(&daemon, &key).await;
    let unwrap = || UnwrapRequest {
        ciphertext_blob: blob.clone(),
        ..Default::default()
    };
    std::fs::write(&control, "throttle 0\n").unwrap();
    // The module looks at the control file at most every 20 ms.
    tokio::time::sleep(Duration::from_millis(30)).await;
    let mut data = daemon.data().await;
    let mut request = tonic::Request::new(unwrap());
    request.set_timeout(Duration::from_millis(400));
    let status = data
        .unwrap(request)
        .await
        .expect_err("the only HSM answers busy to every call");
    // UNAVAILABLE is what a client retries; INTERNAL would say the daemon failed, and an
    // INVALID_ARGUMENT that the blob is bad.
    assert_eq!(status.code(), tonic::Code::Unavailable, "{status:?}");
    assert!(status.message().contains("busy"), "{status:?}");
    std::fs::write(&control, "").unwrap();
    tokio::time::sleep(Duration::from_millis(30)).await;
    data.unwrap(unwrap())
        .await
        .expect("served once the HSM is no longer busy");
}

/// The simulator's counters (`report PATH` in its control file): calls that reached an HSM
/// so far, and the most served at once since the last report. `probe` is unwrapped once, so
/// that the module reads the control file (that call is not counted in the report it writes,
/// but in the next one).
async fn cluster_report(
    daemon: &DevDaemon,
    control: &std::path::Path,
    dir: &std::path::Path,
    probe: &UnwrapRequest,
) -> (u64, u64) {
    let report = dir.join("report");
    let _ = std::fs::remove_file(&report);
    std::fs::write(control, format!("report {}\n", report.display())).unwrap();
    // The module looks at the control file at most every 20 ms.
    tokio::time::sleep(Duration::from_millis(30)).await;
    daemon.data().await.unwrap(probe.clone()).await.unwrap();
    let text = std::fs::read_to_string(&report).expect("the simulator wrote its report");
    let value = |name: &str| -> u64 {
        text.lines()
            .find_map(|l| l.strip_prefix(name))
            .and_then(|v| v.trim().parse().ok())
            .unwrap_or_else(|| panic!("{name} in {text:?}"))
    };
    (value("round_trips "), value("peak_in_flight "))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_unwrap_and_a_generate_data_key_each_take_one_round_trip_to_the_hsm() {
    let (daemon, control, dir) = on_cluster(&[("WRAPD_SIM_HSMS", "2")]);
    let key = new_key(&daemon).await;
    let mut data = daemon.data().await;
    let blob = new_blob(&daemon, &key).await;
    let unwrap = UnwrapRequest {
        ciphertext_blob: blob,
        ..Default::default()
    };
    const CALLS: u64 = 40;
    let (before, _) = cluster_report(&daemon, &control, dir.path(), &unwrap).await;
    for _ in 0..CALLS {
        data.unwrap(unwrap.clone()).await.unwrap();
    }
    let (after, _) = cluster_report(&daemon, &control, dir.path(), &unwrap).await;
    // The probe that triggered the first report is counted in the second.
    let unwraps = after - before - 1;
    assert!(
        (CALLS..CALLS + CALLS / 4).contains(&unwraps),
        "{unwraps} round trips for {CALLS} Unwraps (a length query first would make it {})",
        2 * CALLS
    );

    let (before, _) = cluster_report(&daemon, &control, dir.path(), &unwrap).await;
    for _ in 0..CALLS {
        data.generate_data_key(generate(&key)).await.unwrap();
    }
    let (after, _) = cluster_report(&daemon, &control, dir.path(), &unwrap).await;
    let generates = after - before - 1;
    assert!(
        (CALLS..CALLS + CALLS / 4).contains(&generates),
        "{generates} round trips for {CALLS} GenerateDataKeys (random bytes drawn per call \
         would make it {})",
        2 * CALLS
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_lone_callers_batch_is_spread_over_the_clusters_slots() {
    let (daemon, control, dir) = on_cluster(&[
        ("WRAPD_SIM_HSMS", "2"),
        ("WRAPD_SIM_LATENCY_US", "1000"),
        ("WRAPD_SIM_CONCURRENCY", "8"),
    ]);
    let key = new_key(&daemon).await;
    let mut data = daemon.data().await;
    let blob = new_blob(&daemon, &key).await;
    let item = UnwrapRequest {
        ciphertext_blob: blob,
        ..Default::default()
    };
    let batch = wrapd::proto::BatchUnwrapRequest {
        items: vec![item.clone(); 64],
    };
    cluster_report(&daemon, &control, dir.path(), &item).await;
    let results = data.batch_unwrap(batch).await.unwrap().into_inner().results;
    assert_eq!(results.len(), 64);
    let (_, peak) = cluster_report(&daemon, &control, dir.path(), &item).await;
    // 16 slots in all; one job per 16 items (as on a local token) would keep at most 4 busy.
    assert!(
        peak >= 12,
        "at most {peak} of the 16 slots were busy at once during a batch of 64"
    );
}

/// `wrapd bench` with `args` (with `--hsm-down-control` last if `hsm_down`) against a dev
/// daemon on a cluster of 2 HSMs, 300 µs per call and 4 calls at once each; its standard
/// output once it succeeded, and the simulator's control file (in the returned directory).
/// The bench's own token calls go through a simulator with the same settings and the same
/// control file.
fn wrapd_bench_on_cluster(
    args: &[&str],
    hsm_down: bool,
) -> (String, std::path::PathBuf, tempfile::TempDir) {
    let settings = [
        ("WRAPD_SIM_HSMS", "2"),
        ("WRAPD_SIM_LATENCY_US", "300"),
        ("WRAPD_SIM_CONCURRENCY", "4"),
    ];
    let (daemon, control, dir) = on_cluster(&settings);
    let mut bench = std::process::Command::new(env!("CARGO_BIN_EXE_wrapd"));
    bench
        .envs(settings)
        .env("WRAPD_SIM_CONTROL", &control)
        .arg("bench")
        .arg("--config")
        .arg(daemon.config_path())
        .args(args);
    if hsm_down {
        bench.arg("--hsm-down-control").arg(&control);
    }
    let out = bench.output().unwrap();
    let stdout = String::from_utf8_lossy(&out.stdout).into_owned();
    assert!(
        out.status.success(),
        "{stdout}{}",
        String::from_utf8_lossy(&out.stderr)
    );
    (stdout, control, dir)
}

#[test]
fn wrapd_bench_on_the_cluster_measures_its_capacity_and_every_row_again_with_one_hsm_down() {
    let (stdout, control, _dir) = wrapd_bench_on_cluster(
        &[
            "--op",
            "unwrap",
            "--concurrency",
            "1",
            "--concurrency",
            "8",
            "--seconds",
            "1",
            "--no-flood",
        ],
        true,
    );
    let rows = |name: &str| -> Vec<Vec<String>> {
        stdout
            .lines()
            .filter(|l| {
                l.starts_with(name) && l[name.len()..].trim_start().starts_with(char::is_numeric)
            })
            .map(|l| l.split_whitespace().map(str::to_owned).collect())
            .collect()
    };
    let up = rows("Unwrap");
    let down = rows("Unwrap, 1 HSM down");
    assert_eq!((up.len(), down.len()), (2, 2), "{stdout}");
    for row in up.iter().chain(&down) {
        // ... raw, echo, ceiling, wrapd, share, p50, p99, errors
        let figures = &row[row.len() - 8..];
        for rate in &figures[..4] {
            assert!(rate.parse::<f64>().unwrap() > 0.0, "{row:?}");
        }
        assert_eq!(figures[7], "0", "no errors, with an HSM down too: {row:?}");
    }
    assert!(
        stdout.contains("networked HSM: its capacity"),
        "the capacity section: {stdout}"
    );
    assert_eq!(
        std::fs::read_to_string(&control).unwrap(),
        "",
        "the HSM is brought back afterwards"
    );
}

#[test]
fn wrapd_bench_times_a_lone_batch_against_the_same_token_calls_spread_over_the_sessions() {
    let (stdout, _control, _dir) = wrapd_bench_on_cluster(
        &[
            "--op",
            "batch-unwrap",
            "--concurrency",
            "1",
            "--seconds",
            "1",
            "--no-flood",
        ],
        false,
    );
    // "  BatchUnwrap x64  echo N + token N + fdatasync N = floor N  wrapd N  overhead N"
    let floor: Vec<&str> = stdout
        .lines()
        .find(|l| l.trim_start().starts_with("BatchUnwrap x64") && l.contains(" = floor "))
        .unwrap_or_else(|| panic!("no floor line for the lone batch: {stdout}"))
        .split_whitespace()
        .collect();
    let figure = |name: &str| -> u64 {
        let at = floor.iter().position(|w| *w == name).unwrap();
        floor[at + 1].parse().unwrap()
    };
    // The token figure is a whole batch's 64 calls: over 8 slots of 300 µs, at least 8
    // round trips one after the other.
    assert!(figure("token") >= 8 * 300, "{floor:?}");
    assert!(
        figure("floor") >= figure("echo") + figure("token"),
        "{floor:?}"
    );
    assert!(figure("wrapd") > 0, "{floor:?}");
}

/// A cluster whose client library drops sessions idle for 400 ms, and a daemon whose
/// keep-alive calls sessions idle for `keepalive_ms` (0: never).
fn with_idle_limit(keepalive_ms: u64) -> (DevDaemon, std::path::PathBuf, tempfile::TempDir) {
    let (mut daemon, control, dir) = on_cluster(&[("WRAPD_SIM_SESSION_IDLE_MS", "400")]);
    let config = std::fs::read_to_string(daemon.config_path()).unwrap();
    let config = config.replacen(
        "profile = \"cloudhsm\"\n",
        &format!("profile = \"cloudhsm\"\nsession_keepalive_ms = {keepalive_ms}\n"),
        1,
    );
    std::fs::write(daemon.config_path(), config).unwrap();
    daemon.restart();
    (daemon, control, dir)
}

/// Uses several sessions at once (so the pool keeps several idle), waits three idle limits,
/// and makes the calls again.
async fn calls_around_a_quiet_spell(daemon: &DevDaemon) {
    let key = new_key(daemon).await;
    for round in 0..2 {
        if round == 1 {
            tokio::time::sleep(Duration::from_millis(1200)).await;
        }
        let mut calls = Vec::new();
        for _ in 0..8 {
            let mut data = daemon.data().await;
            let request = generate(&key);
            calls.push(tokio::spawn(async move {
                data.generate_data_key(request).await.map(|_| ())
            }));
        }
        for call in calls {
            call.await
                .unwrap()
                .expect("no call fails after a quiet spell");
        }
        new_key(daemon).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn idle_sessions_are_kept_open_so_that_calls_after_a_quiet_spell_find_them_alive() {
    let (daemon, _control, _dir) = with_idle_limit(150);
    calls_around_a_quiet_spell(&daemon).await;
    let log = daemon.log();
    assert!(
        !log.contains("the HSM session was gone") && !log.contains("failed its keep-alive call"),
        "no session was dropped: {log}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn without_the_keep_alive_dropped_sessions_cost_retries_but_no_call() {
    let (daemon, _control, _dir) = with_idle_limit(0);
    calls_around_a_quiet_spell(&daemon).await;
    let log = daemon.log();
    assert!(
        log.contains("the HSM session was gone; retrying on another"),
        "the calls after the quiet spell found dropped sessions and went again: {log}"
    );
}
