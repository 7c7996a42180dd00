//! `wrapd bench` measures every path (raw PKCS#11, the gRPC echo, their ceiling, the daemon
//! and the bad-ciphertext flood) against a real daemon and prints every figure (a smoke
//! test with one-second figures: the figures are for people, not assertions; speed is
//! never asserted).

use crate::common;

use common::DevDaemon;

#[test]
fn wrapd_bench_prints_raw_echo_ceiling_wrapd_and_the_flood_for_every_round() {
    let daemon = DevDaemon::start();
    let out = std::process::Command::new(env!("CARGO_BIN_EXE_wrapd"))
        .arg("bench")
        .arg("--config")
        .arg(daemon.config_path())
        .args([
            "--op",
            "unwrap",
            "--op",
            "batch-unwrap",
            "--concurrency",
            "1",
            "--concurrency",
            "2",
            "--seconds",
            "1",
            "--rounds",
            "2",
        ])
        .output()
        .unwrap();
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success(),
        "{stdout}{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert_eq!(stdout.matches("round ").count(), 2, "{stdout}");
    // Every measured row: raw, echo, ceiling and wrapd rates above zero, no errors.
    let (rounds, summary) = stdout.split_once("over 2 rounds").expect("a summary");
    let rows: Vec<Vec<&str>> = rounds
        .lines()
        .filter(|l| l.starts_with("Unwrap ") || l.starts_with("BatchUnwrap x64 "))
        .map(|l| l.split_whitespace().collect())
        .collect();
    assert_eq!(
        rows.len(),
        2 * 4,
        "2 operations x 2 caller counts x 2 rounds: {stdout}"
    );
    for row in &rows {
        // operation (1 or 2 words), callers, raw, echo, ceiling, wrapd, share, p50, p99, errors
        let figures = &row[row.len() - 9..];
        for rate in &figures[1..5] {
            assert!(rate.parse::<f64>().unwrap() > 0.0, "{row:?}");
        }
        assert_eq!(*figures.last().unwrap(), "0", "no errors: {row:?}");
    }
    // The flood: two callers, one of them sending bad ciphertexts, answered without errors,
    // next to the same flood on the token alone.
    let floods: Vec<Vec<&str>> = rounds
        .lines()
        .filter(|l| l.starts_with("Unwrap, half bad"))
        .map(|l| l.split_whitespace().collect())
        .collect();
    assert_eq!(floods.len(), 2, "{stdout}");
    for flood in &floods {
        assert_eq!(flood[3], "2", "{flood:?}");
        assert!(
            flood[7].parse::<f64>().unwrap() > 0.0,
            "bad answers/s: {flood:?}"
        );
        assert_eq!(flood[flood.len() - 2], "0", "no errors: {flood:?}");
        // The token alone, half its threads decrypting the bad ciphertext: the refusals
        // count as answers.
        assert!(
            flood.last().unwrap().parse::<f64>().unwrap() > 0.0,
            "the token's own flood ratio: {flood:?}"
        );
    }
    assert!(summary.contains("flooded / good only"), "{stdout}");
    assert!(summary.contains("the token alone"), "{stdout}");
    // The bad ciphertexts are audited as such, and no daemon log line was written per call.
    let audit = daemon.audit_lines();
    assert!(
        audit
            .iter()
            .any(|l| l.operation == "Unwrap" && l.outcome == "INVALID_ARGUMENT")
    );
    assert!(
        !daemon.log().contains("failed"),
        "caller errors are logged at debug"
    );
}

#[test]
fn wrapd_bench_measures_the_xks_api_against_its_https_echo() {
    let daemon = DevDaemon::start();
    let endpoint = daemon.xks.strip_prefix("https://").unwrap();
    let out = std::process::Command::new(env!("CARGO_BIN_EXE_wrapd"))
        .arg("bench")
        .arg("--config")
        .arg(daemon.config_path())
        .args(["--op", "xks-encrypt", "--xks-endpoint", endpoint])
        .args(["--concurrency", "1", "--concurrency", "4", "--seconds", "1"])
        .arg("--no-flood")
        .output()
        .unwrap();
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success(),
        "{stdout}{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let rows: Vec<Vec<&str>> = stdout
        .lines()
        .filter(|l| l.starts_with("XKS Encrypt "))
        .map(|l| l.split_whitespace().collect())
        .collect();
    assert_eq!(rows.len(), 2, "{stdout}");
    for row in &rows {
        let figures = &row[row.len() - 9..];
        for rate in &figures[1..5] {
            assert!(rate.parse::<f64>().unwrap() > 0.0, "{row:?}");
        }
        assert_eq!(*figures.last().unwrap(), "0", "no errors: {row:?}");
    }
    // Every daemon call was a real, audited XKS Encrypt.
    let audited = daemon
        .audit_lines()
        .iter()
        .filter(|l| l.operation == "XksEncrypt" && l.outcome == "OK")
        .count();
    assert!(audited > 0);
}
