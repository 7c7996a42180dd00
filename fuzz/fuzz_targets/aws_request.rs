//! The AWS KMS API's parsing of untrusted requests: the decoding of every operation's JSON
//! body (`decode`), the `KeyId` forms, and the SigV4 headers (`Authorization`, `X-Amz-Date`) with the body, up to
//! and including the signature check. None may panic, whatever the bytes. The input is split
//! at the first two NUL bytes into the `Authorization` value, the `X-Amz-Date` value and the
//! body.
#![no_main]

use libfuzzer_sys::fuzz_target;
use wrapd::front::aws::{Arns, decode};
use wrapd::front::sigv4::{self, AccessKeys};

/// Every operation wrapd decodes, and one it does not.
const TARGETS: &[&str] = &[
    "CreateKey", "DescribeKey", "ListKeyRotations", "GetKeyRotationStatus", "ListResourceTags",
    "ListKeys", "EnableKey", "DisableKey", "CancelKeyDeletion", "ScheduleKeyDeletion",
    "RotateKeyOnDemand", "EnableKeyRotation", "DisableKeyRotation", "TagResource",
    "UntagResource", "UpdateKeyDescription", "GetKeyPolicy", "PutKeyPolicy", "ListKeyPolicies", "CreateAlias", "UpdateAlias", "DeleteAlias", "ListAliases",
    "GenerateDataKey", "GenerateDataKeyWithoutPlaintext", "Encrypt", "Decrypt", "ReEncrypt",
    "GenerateRandom", "GetParametersForImport", "ImportKeyMaterial",
    "DeleteImportedKeyMaterial", "CreateGrant",
];

fuzz_target!(|data: &[u8]| {
    let mut parts = data.splitn(3, |b| *b == 0);
    let (authorization, date, body) = (
        parts.next().unwrap_or_default(),
        parts.next().unwrap_or_default(),
        parts.next().unwrap_or_default(),
    );

    let arns = Arns::new("us-east-1", "111122223333");
    for target in TARGETS {
        let _ = decode(target, body, &arns);
    }
    let _ = Arns::new("us-east-1", "111122223333").key_ref(&String::from_utf8_lossy(body));

    let mut request = http::Request::post("https://127.0.0.1/")
        .header("host", "127.0.0.1")
        .header("x-amz-target", "TrentService.ListKeys");
    if let Ok(value) = http::HeaderValue::from_bytes(authorization) {
        request = request.header("authorization", value);
    }
    if let Ok(value) = http::HeaderValue::from_bytes(date) {
        request = request.header("x-amz-date", value);
    }
    let Ok(request) = request.body(()) else {
        return;
    };
    let (parts, ()) = request.into_parts();
    let keys = AccessKeys::default();
    let now = sigv4::parse_amz_date(&String::from_utf8_lossy(date)).unwrap_or_else(chrono::Utc::now);
    let scope = sigv4::Scope {
        regions: &["us-east-1"],
        service: "kms",
        signed_when_present: &["content-type", "x-amz-target"],
    };
    let _ = sigv4::verify(&keys, scope, &parts, body, now);
});
