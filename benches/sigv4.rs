//! The cost of SigV4 verification per AWS KMS API request: `sigv4::verify` (canonical
//! request, SHA-256 of the body, the day's signing key derived from the secret, HMAC,
//! constant-time compare) on a request botocore signed (tests/vectors/sigv4-kms.json),
//! next to the baseline measured in the same run: parsing that request's JSON body, which
//! every request pays anyway.
//!
//! `cargo bench --bench sigv4` prints ops/s and latency percentiles for both.

use std::sync::Arc;
use std::time::{Duration, Instant};

use bytes::Bytes;
use hdrhistogram::Histogram;
use wrapd::config::AwsAccessKey;
use wrapd::front::aws::{AccessKeys, model, sigv4};
use zeroize::Zeroizing;

const RUN: Duration = Duration::from_secs(3);

fn measure(name: &str, mut op: impl FnMut()) {
    for _ in 0..1000 {
        op(); // warm-up
    }
    let mut histogram = Histogram::<u64>::new(3).unwrap();
    let start = Instant::now();
    let mut count = 0u64;
    while start.elapsed() < RUN {
        let t = Instant::now();
        op();
        histogram
            .record(t.elapsed().as_nanos().max(1) as u64)
            .unwrap();
        count += 1;
    }
    let secs = start.elapsed().as_secs_f64();
    println!(
        "{name:<28} {:>10.0} ops/s   p50 {:>6.2} µs   p99 {:>6.2} µs   p99.9 {:>6.2} µs",
        count as f64 / secs,
        histogram.value_at_quantile(0.50) as f64 / 1000.0,
        histogram.value_at_quantile(0.99) as f64 / 1000.0,
        histogram.value_at_quantile(0.999) as f64 / 1000.0,
    );
}

fn main() {
    let fixture: serde_json::Value =
        serde_json::from_str(include_str!("../tests/vectors/sigv4-kms.json")).unwrap();
    let mut builder = http::Request::post("/");
    for (name, value) in fixture["headers"].as_object().unwrap() {
        builder = builder.header(name.as_str(), value.as_str().unwrap());
    }
    let (parts, ()) = builder.body(()).unwrap().into_parts();
    let body = Bytes::from(fixture["body"].as_str().unwrap().to_owned());
    let keys = Arc::new(AccessKeys::new([AwsAccessKey {
        id: fixture["access_key"].as_str().unwrap().into(),
        secret: Zeroizing::new(fixture["secret"].as_str().unwrap().into()),
        principal: None,
    }]));
    let now = sigv4::parse_amz_date("20261123T100000Z").unwrap();
    let runtime = tokio::runtime::Builder::new_current_thread()
        .build()
        .unwrap();

    println!(
        "SigV4 verification of one Decrypt request ({} body bytes), one thread:",
        body.len()
    );
    measure("baseline: parse JSON body", || {
        let request = model::parse::<model::Decrypt>(&body).unwrap();
        std::hint::black_box(request);
    });
    measure("sigv4::verify", || {
        let key = runtime
            .block_on(sigv4::verify(
                &keys,
                "us-east-1",
                "111122223333",
                &parts,
                body.clone(),
                now,
            ))
            .unwrap();
        std::hint::black_box(key);
    });
}
