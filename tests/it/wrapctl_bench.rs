//! `wrapctl bench` runs every part against a real daemon and reports every figure (a smoke
//! test with tiny sizes: the figures themselves are for people, not assertions).

use crate::common;

use common::DevDaemon;

#[test]
fn bench_reports_every_part() {
    let daemon = DevDaemon::start();
    let dir = tempfile::tempdir().unwrap();
    let out = std::process::Command::new(env!("CARGO_BIN_EXE_wrapctl"))
        .arg("--socket")
        .arg(&daemon.socket)
        .args([
            "--json",
            "bench",
            "--mib",
            "4",
            "--seconds",
            "0.3",
            "--concurrency",
            "2",
            "--openssl-seconds",
            "1",
            "--dir",
        ])
        .arg(dir.path())
        .output()
        .unwrap();
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(out.status.success(), "{stderr}");
    let report: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    let rows = report["rows"].as_array().unwrap();
    let row = |part: &str, key: &str, value: serde_json::Value| {
        rows.iter()
            .find(|r| r["part"].as_str().unwrap().starts_with(part) && r[key] == value)
            .unwrap_or_else(|| panic!("no {part} row with {key}={value}: {report}"))
    };
    for part in ["library", "wrapctl files", "file copy"] {
        let r = row(part, "threads", 1.into());
        assert!(r["encrypt_gbps"].as_f64().unwrap() > 0.0, "{r}");
        assert!(r["decrypt_gbps"].as_f64().unwrap() > 0.0, "{r}");
    }
    // The files' rate as a share of the plain copy's, measured in the same run.
    let files = row("wrapctl files", "threads", 1.into());
    for share in ["encrypt_of_copy", "decrypt_of_copy"] {
        assert!(files[share].as_f64().unwrap() > 0.0, "{files}");
    }
    row("openssl", "threads", 1.into());
    for part in ["1 KiB encrypt", "1 KiB decrypt"] {
        for cache in [false, true] {
            let r = row(part, "cache", cache.into());
            assert!(r["messages"].as_u64().unwrap() > 0, "{r}");
        }
    }
    let batched = row("1 KiB decrypt, 64 per BatchUnwrap", "cache", false.into());
    assert!(batched["messages"].as_u64().unwrap() >= 64, "{batched}");
    // The bench's key was created on the daemon, and its temp files are gone.
    assert!(std::fs::read_dir(dir.path()).unwrap().next().is_none());
}
