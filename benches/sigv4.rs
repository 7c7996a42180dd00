//! The cost of SigV4 verification per AWS KMS API request: `sigv4::verify` (canonical
//! request, SHA-256 of the body, the day's signing key derived from the secret, HMAC,
//! constant-time compare) on a request botocore signed (tests/vectors/sigv4-kms.json),
//! next to the baseline measured in the same run: parsing that request's JSON body, which
//! every request pays anyway. Compare the two within one run, never across runs.
//!
//! `cargo bench --bench sigv4` (divan: median and spread per call, one thread).

use std::sync::LazyLock;

use bytes::Bytes;
use wrapd::config::AwsAccessKey;
use wrapd::front::aws::model;
use wrapd::front::sigv4::{self, AccessKeys};
use zeroize::Zeroizing;

fn main() {
    divan::main();
}

/// The botocore-signed request and what verifying it needs.
struct Signed {
    parts: http::request::Parts,
    body: Bytes,
    keys: AccessKeys,
    now: chrono::DateTime<chrono::Utc>,
}

static SIGNED: LazyLock<Signed> = LazyLock::new(|| {
    let fixture: serde_json::Value =
        serde_json::from_str(include_str!("../tests/vectors/sigv4-kms.json")).unwrap();
    let mut builder = http::Request::post("/");
    for (name, value) in fixture["headers"].as_object().unwrap() {
        builder = builder.header(name.as_str(), value.as_str().unwrap());
    }
    let (parts, ()) = builder.body(()).unwrap().into_parts();
    Signed {
        parts,
        body: Bytes::from(fixture["body"].as_str().unwrap().to_owned()),
        keys: AccessKeys::new([AwsAccessKey {
            id: fixture["access_key"].as_str().unwrap().into(),
            secret: Zeroizing::new(fixture["secret"].as_str().unwrap().into()),
            principal: None,
            arn: None,
        }]),
        now: sigv4::parse_amz_date("20261123T100000Z").unwrap(),
    }
});

/// The baseline: parsing the request's JSON body.
#[divan::bench]
fn baseline_parse_json_body() -> model::Decrypt {
    model::parse::<model::Decrypt>(divan::black_box(&SIGNED.body)).unwrap()
}

/// Verifying the request's signature.
#[divan::bench]
fn sigv4_verify() -> String {
    let signed = &*SIGNED;
    sigv4::verify(
        &signed.keys,
        sigv4::Scope {
            regions: &["us-east-1"],
            service: "kms",
            signed_when_present: &["content-type", "x-amz-target"],
        },
        &signed.parts,
        &signed.body,
        signed.now,
    )
    .unwrap()
    .access_key
}
