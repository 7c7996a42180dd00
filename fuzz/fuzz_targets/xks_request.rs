//! The XKS proxy API's parsing of untrusted requests: every body form (GetKeyMetadata and
//! GetHealthStatus metadata, Encrypt, Decrypt with its ciphertext metadata), the
//! `externalKeyId` forms, and the SigV4 check with the XKS scope. None may panic, whatever
//! the bytes. The input is split at the first NUL byte into the `Authorization` value and the
//! body.
#![no_main]

use libfuzzer_sys::fuzz_target;
use wrapd::front::sigv4::{self, AccessKeys};
use wrapd::front::xks::{key_id, model};

fuzz_target!(|data: &[u8]| {
    let mut parts = data.splitn(2, |b| *b == 0);
    let (authorization, body) = (
        parts.next().unwrap_or_default(),
        parts.next().unwrap_or_default(),
    );

    if let Ok(parsed) = model::parse::<model::MetadataOnly>(body) {
        if let Ok(metadata) = model::metadata(parsed.request_metadata) {
            for required in [
                model::Required::Health,
                model::Required::Metadata,
                model::Required::Crypto,
            ] {
                let _ = metadata.attributes(required);
            }
        }
    }
    if let Ok(encrypt) = model::parse::<model::EncryptBody>(body) {
        let _ = encrypt.request();
    }
    if let Ok(decrypt) = model::parse::<model::DecryptBody>(body) {
        if let Ok(request) = decrypt.request() {
            let _ = model::aad(&request.aad, &request.metadata);
        }
    }
    let _ = model::key_version(body);
    let _ = key_id(&String::from_utf8_lossy(body));

    let mut request = http::Request::post("https://127.0.0.1/dev/kms/xks/v1/health")
        .header("host", "127.0.0.1")
        .header("x-amz-date", "20261123T100000Z")
        .header("content-type", "application/json");
    if let Ok(value) = http::HeaderValue::from_bytes(authorization) {
        request = request.header("authorization", value);
    }
    let Ok(request) = request.body(()) else {
        return;
    };
    let (parts, ()) = request.into_parts();
    let scope = sigv4::Scope {
        regions: &["us-east-1"],
        service: "kms-xks-proxy",
        signed_when_present: &[],
    };
    let now = sigv4::parse_amz_date("20261123T100000Z").unwrap_or_else(chrono::Utc::now);
    let _ = sigv4::verify(&AccessKeys::default(), scope, &parts, body, now);
});
