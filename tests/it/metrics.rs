//! Prometheus metrics: after a known workload, the counters moved by exactly what the
//! workload did, and no label carries a principal.

use std::io::{Read, Write};

use crate::common::{DevDaemon, create_key, generate};
use wrapd::proto::UnwrapRequest;

/// `GET /metrics` over a plain TCP connection.
pub(crate) fn scrape(url: &str) -> String {
    let address = url
        .strip_prefix("http://")
        .and_then(|rest| rest.strip_suffix("/metrics"))
        .expect("http://ADDR/metrics");
    let mut stream = std::net::TcpStream::connect(address).unwrap();
    write!(
        stream,
        "GET /metrics HTTP/1.1\r\nHost: {address}\r\nConnection: close\r\n\r\n"
    )
    .unwrap();
    let mut response = String::new();
    stream.read_to_string(&mut response).unwrap();
    assert!(response.starts_with("HTTP/1.1 200"), "{response}");
    response
}

/// The value of the sample whose line starts with `series` (name and labels as rendered).
pub(crate) fn value(text: &str, series: &str) -> f64 {
    text.lines()
        .find(|l| l.starts_with(series))
        .and_then(|l| l.rsplit(' ').next())
        .and_then(|v| v.parse().ok())
        .unwrap_or(0.0)
}

#[tokio::test]
async fn counters_move_by_exactly_the_workload() {
    let mut daemon = DevDaemon::start();
    let mut config = std::fs::read_to_string(daemon.config_path()).unwrap();
    config.push_str("\n[metrics]\nlisten = \"127.0.0.1:0\"\n");
    std::fs::write(daemon.config_path(), config).unwrap();
    daemon.restart();
    let url = daemon.metrics.clone().expect("metrics= in the ready line");
    let before = scrape(&url);

    let mut keys = daemon.keys().await;
    let mut data = daemon.data().await;
    let key = create_key(&mut keys, "").await;
    for _ in 0..3 {
        generate(&mut data, &key.key_id, &[]).await;
    }
    for _ in 0..2 {
        let refused = data
            .unwrap(UnwrapRequest {
                ciphertext_blob: b"not a blob".to_vec(),
                ..Default::default()
            })
            .await;
        assert!(refused.is_err());
    }
    let after = scrape(&url);
    let moved = |series: &str| value(&after, series) - value(&before, series);
    let requests = |op: &str, outcome: &str| {
        format!("wrapd_requests_total{{service=\"unix\",operation=\"{op}\",outcome=\"{outcome}\"}}")
    };
    assert_eq!(moved(&requests("CreateKey", "OK")), 1.0, "{after}");
    assert_eq!(moved(&requests("GenerateDataKey", "OK")), 3.0, "{after}");
    assert_eq!(
        moved(&requests("Unwrap", "INVALID_ARGUMENT")),
        2.0,
        "{after}"
    );
    assert_eq!(
        moved("wrapd_request_duration_seconds_count{operation=\"GenerateDataKey\"}"),
        3.0
    );
    assert_eq!(moved("wrapd_audit_append_duration_seconds_count"), 6.0);
    // Group commit (`fsync = "always"`, the dev default): the six lines, each call waiting
    // for its own, in one to six fdatasyncs.
    assert_eq!(moved("wrapd_audit_lines_per_sync_sum"), 6.0, "{after}");
    let syncs = moved("wrapd_audit_lines_per_sync_count");
    assert!((1.0..=6.0).contains(&syncs), "{after}");
    // The dev Kubernetes and XKS keys, and the new one.
    assert_eq!(value(&after, "wrapd_keys{state=\"ENABLED\"}"), 3.0);
    assert!(after.contains("wrapd_build_info{version="));
    let share = format!("wrapd_key_wrap_share{{key_id=\"{}\"}}", key.key_id);
    assert!(value(&after, &share) > 0.0, "{after}");
    // The HSM calls behind the workload, and the scraper's own connection is not counted
    // (metrics have a listener of their own, outside the caps).
    assert!(
        moved("wrapd_hsm_call_duration_seconds_count") >= 3.0,
        "{after}"
    );
    assert!(
        value(&after, "wrapd_connections{listener=\"unix\"}") >= 1.0,
        "{after}"
    );
    // No principal, no context value in any label.
    assert!(
        !after.contains("unix:uid") && !after.contains("spiffe"),
        "{after}"
    );
}
