//! AWS Signature Version 4 on every request, verified with the configured access keys.
//!
//! The canonicalisation and the signature check are `scratchstack-aws-signature`'s (a
//! maintained verifier that ships the AWS SigV4 test suite and compares signatures in
//! constant time); this module adds the rules of this API on top:
//!
//! - only the `Authorization` header is accepted (no pre-signed query strings), with
//!   `host`, `x-amz-date`, and, when the request has them, `content-type` and `x-amz-target`
//!   among the signed headers: the operation a signature covers cannot be swapped;
//! - the credential scope must be this daemon's region and the service `kms`;
//! - the request time (`X-Amz-Date`) within ±5 minutes of the daemon's clock, as AWS;
//! - no session tokens (wrapd has no STS), refused as an unrecognized client.
//!
//! The secret is kept in a zeroizing string; the verifier derives the day's signing key
//! from it for each request, in its own (plain) stack values.

use std::collections::HashMap;
use std::str::FromStr;
use std::sync::Arc;

use bytes::Bytes;
use chrono::{DateTime, NaiveDateTime, Utc};
use http::StatusCode;
use scratchstack_aws_signature::principal::User;
use scratchstack_aws_signature::{
    ConstSignedHeaderRequirements, GetSigningKeyRequest, GetSigningKeyResponse, KSecretKey,
    SignatureError, SignatureOptions, sigv4_validate_request,
};
use std::borrow::Cow;
use tower::BoxError;

use super::arn::PARTITION;
use super::error::AwsError;
use crate::config::AwsAccessKey;

/// The SigV4 service name of AWS KMS.
pub const SERVICE: &str = "kms";

/// How far a request's time may be from the daemon's clock.
pub const MAX_CLOCK_SKEW: chrono::Duration = chrono::Duration::minutes(5);

/// Headers every signature must cover; and those it must cover when present.
const REQUIRED_HEADERS: ConstSignedHeaderRequirements = ConstSignedHeaderRequirements::new(
    &[Cow::Borrowed("host"), Cow::Borrowed("x-amz-date")],
    &[Cow::Borrowed("content-type"), Cow::Borrowed("x-amz-target")],
    &[],
);

/// The access keys requests may be signed with, by id.
#[derive(Clone, Default)]
pub struct AccessKeys {
    keys: HashMap<String, AwsAccessKey>,
}

impl AccessKeys {
    /// The configured keys.
    pub fn new(keys: impl IntoIterator<Item = AwsAccessKey>) -> Self {
        Self {
            keys: keys.into_iter().map(|k| (k.id.clone(), k)).collect(),
        }
    }

    /// The key with this id.
    pub fn get(&self, id: &str) -> Option<&AwsAccessKey> {
        self.keys.get(id)
    }
}

/// A refused signature: the answer, and the access key id the request claimed (for the
/// audit line), when it named a plausible one.
#[derive(Debug)]
pub struct AuthFailure {
    /// The error to answer.
    pub error: AwsError,
    /// The claimed access key id.
    pub claimed_key: Option<String>,
}

fn failure(code: &'static str, message: impl Into<String>, claimed: Option<String>) -> AuthFailure {
    AuthFailure {
        error: AwsError::new(code, StatusCode::BAD_REQUEST, message),
        claimed_key: claimed,
    }
}

/// The access key id named in an `Authorization` header (`Credential=ID/…`), if it looks
/// like one.
pub fn claimed_access_key(authorization: &str) -> Option<String> {
    let start = authorization.find("Credential=")? + "Credential=".len();
    let rest = &authorization[start..];
    let id = &rest[..rest.find('/')?];
    ((1..=128).contains(&id.len()) && id.bytes().all(|b| b.is_ascii_alphanumeric()))
        .then(|| id.to_owned())
}

/// Parses `X-Amz-Date` (`YYYYMMDDTHHMMSSZ`).
pub fn parse_amz_date(value: &str) -> Option<DateTime<Utc>> {
    NaiveDateTime::parse_from_str(value, "%Y%m%dT%H%M%SZ")
        .ok()
        .map(|t| t.and_utc())
}

/// Verifies the request's signature at time `now`; returns the access key id it was signed
/// with.
pub async fn verify(
    keys: &Arc<AccessKeys>,
    region: &str,
    account: &str,
    parts: &http::request::Parts,
    body: Bytes,
    now: DateTime<Utc>,
) -> Result<String, AuthFailure> {
    let header = |name: &str| parts.headers.get(name).and_then(|v| v.to_str().ok());
    let Some(authorization) = header("authorization") else {
        return Err(failure(
            "MissingAuthenticationTokenException",
            "Missing Authentication Token: sign every request with AWS Signature Version 4 in the Authorization header",
            None,
        ));
    };
    let claimed = claimed_access_key(authorization);
    if parts.headers.contains_key("x-amz-security-token") {
        return Err(failure(
            "UnrecognizedClientException",
            "The security token included in the request is invalid: wrapd accepts long-term access keys only, not session tokens",
            claimed,
        ));
    }
    let Some(date) = header("x-amz-date") else {
        return Err(failure(
            "IncompleteSignatureException",
            "The request must carry an X-Amz-Date header, and sign it",
            claimed,
        ));
    };
    let Some(at) = parse_amz_date(date) else {
        return Err(failure(
            "IncompleteSignatureException",
            "X-Amz-Date must be in ISO 8601 basic format, YYYYMMDDTHHMMSSZ",
            claimed,
        ));
    };
    if (at - now).abs() > MAX_CLOCK_SKEW {
        return Err(failure(
            "InvalidSignatureException",
            format!(
                "Signature expired: {date} is more than 5 minutes from the server's time {}",
                now.format("%Y%m%dT%H%M%SZ")
            ),
            claimed,
        ));
    }

    let mut request = http::Request::builder()
        .method(parts.method.clone())
        .uri(parts.uri.clone())
        .version(parts.version)
        .body(body)
        .map_err(|e| {
            failure(
                "IncompleteSignatureException",
                e.to_string(),
                claimed.clone(),
            )
        })?;
    *request.headers_mut() = parts.headers.clone();

    let lookup = Arc::new((keys.clone(), account.to_owned()));
    let mut signing_keys = tower::service_fn(move |req: GetSigningKeyRequest| {
        let lookup = lookup.clone();
        async move { signing_key(&lookup.0, &lookup.1, &req) }
    });
    let verified = sigv4_validate_request(
        request,
        region,
        SERVICE,
        &mut signing_keys,
        now,
        &REQUIRED_HEADERS,
        SignatureOptions::default(),
    )
    .await;
    match verified {
        Ok(_) => claimed.ok_or_else(|| {
            failure(
                "IncompleteSignatureException",
                "the credential does not name an access key",
                None,
            )
        }),
        Err(err) => Err(match err.downcast::<SignatureError>() {
            Ok(err) => signature_failure(*err, claimed),
            Err(other) => failure("IncompleteSignatureException", other.to_string(), claimed),
        }),
    }
}

/// The day's signing key of the access key a request names (the verifier's callback).
fn signing_key(
    keys: &AccessKeys,
    account: &str,
    req: &GetSigningKeyRequest,
) -> Result<GetSigningKeyResponse, BoxError> {
    let key = keys
        .get(req.access_key())
        .ok_or_else(|| SignatureError::InvalidClientTokenId(String::new()))?;
    let secret = KSecretKey::from_str(&key.secret)
        .map_err(|_| SignatureError::InvalidClientTokenId(String::new()))?;
    let user = User::new(PARTITION, account, "/", "wrapd")?;
    Ok(GetSigningKeyResponse::builder()
        .principal(user)
        .signing_key(secret.to_ksigning(req.request_date(), req.region(), req.service()))
        .build()?)
}

fn signature_failure(err: SignatureError, claimed: Option<String>) -> AuthFailure {
    match err {
        SignatureError::InvalidClientTokenId(_) => failure(
            "UnrecognizedClientException",
            "The security token included in the request is invalid.",
            claimed,
        ),
        SignatureError::MissingAuthenticationToken(message) => {
            failure("MissingAuthenticationTokenException", message, claimed)
        }
        SignatureError::SignatureDoesNotMatch(message) => failure(
            "InvalidSignatureException",
            message.unwrap_or_else(|| {
                "The request signature we calculated does not match the signature you provided. Check your AWS Secret Access Key and signing method.".to_owned()
            }),
            claimed,
        ),
        SignatureError::IncompleteSignature(message) => {
            failure("IncompleteSignatureException", message, claimed)
        }
        other => failure("IncompleteSignatureException", other.to_string(), claimed),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use zeroize::Zeroizing;

    #[test]
    fn the_claimed_access_key_is_read_from_the_credential() {
        let header = "AWS4-HMAC-SHA256 Credential=AKIDEXAMPLE/20150830/us-east-1/kms/aws4_request, SignedHeaders=host;x-amz-date, Signature=abc";
        assert_eq!(claimed_access_key(header).as_deref(), Some("AKIDEXAMPLE"));
        assert_eq!(
            claimed_access_key("AWS4-HMAC-SHA256 Credential=a b/x"),
            None
        );
        assert_eq!(claimed_access_key("garbage"), None);
    }

    #[test]
    fn amz_dates_parse_in_basic_format_only() {
        assert!(parse_amz_date("20150830T123600Z").is_some());
        assert!(parse_amz_date("2015-08-30T12:36:00Z").is_none());
        assert!(parse_amz_date("").is_none());
    }

    /// A request dated `date` whose signature is wrong (the real clients' signatures are
    /// checked by the integration tests with the AWS CLI and boto3).
    fn signed(date: &str) -> http::request::Parts {
        let (parts, ()) = http::Request::post("https://127.0.0.1/")
            .header("host", "127.0.0.1")
            .header("x-amz-date", date)
            .header(
                "authorization",
                format!("AWS4-HMAC-SHA256 Credential=AKIDEXAMPLE0000001/{}/us-east-1/kms/aws4_request, SignedHeaders=host;x-amz-date, Signature=0000000000000000000000000000000000000000000000000000000000000000", &date[..8]),
            )
            .body(())
            .unwrap()
            .into_parts();
        parts
    }

    fn keys() -> Arc<AccessKeys> {
        Arc::new(AccessKeys::new([AwsAccessKey {
            id: "AKIDEXAMPLE0000001".into(),
            secret: Zeroizing::new("wJalrXUtnFEMI/K7MDENG+bPxRfiCYEXAMPLEKEY".into()),
            principal: None,
        }]))
    }

    fn now() -> DateTime<Utc> {
        parse_amz_date("20261123T100000Z").unwrap()
    }

    /// A request botocore signed (tests/vectors/sigv4_fixture.py), as parts and body.
    fn botocore_request(
        edit: impl FnOnce(&mut http::HeaderMap, &mut String),
    ) -> (Arc<AccessKeys>, http::request::Parts, Bytes) {
        let fixture: serde_json::Value =
            serde_json::from_str(include_str!("../../../tests/vectors/sigv4-kms.json")).unwrap();
        let mut builder = http::Request::post("/");
        for (name, value) in fixture["headers"].as_object().unwrap() {
            builder = builder.header(name.as_str(), value.as_str().unwrap());
        }
        let (mut parts, ()) = builder.body(()).unwrap().into_parts();
        let mut body = fixture["body"].as_str().unwrap().to_owned();
        edit(&mut parts.headers, &mut body);
        let keys = Arc::new(AccessKeys::new([AwsAccessKey {
            id: fixture["access_key"].as_str().unwrap().into(),
            secret: Zeroizing::new(fixture["secret"].as_str().unwrap().into()),
            principal: None,
        }]));
        (keys, parts, Bytes::from(body))
    }

    #[tokio::test]
    async fn a_request_signed_by_botocore_verifies() {
        let (keys, parts, body) = botocore_request(|_, _| {});
        let key = verify(&keys, "us-east-1", "111122223333", &parts, body, now())
            .await
            .unwrap();
        assert_eq!(key, "AKIAIOSFODNN7EXAMPLE");
    }

    #[tokio::test]
    async fn a_signed_request_with_another_operation_or_body_does_not_verify() {
        let (keys, parts, body) = botocore_request(|headers, _| {
            headers.insert("x-amz-target", "TrentService.Encrypt".parse().unwrap());
        });
        let err = verify(&keys, "us-east-1", "111122223333", &parts, body, now())
            .await
            .unwrap_err();
        assert_eq!(err.error.code, "InvalidSignatureException");
        let (keys, parts, body) = botocore_request(|_, body| body.push(' '));
        let err = verify(&keys, "us-east-1", "111122223333", &parts, body, now())
            .await
            .unwrap_err();
        assert_eq!(err.error.code, "InvalidSignatureException");
    }

    #[tokio::test]
    async fn a_request_whose_target_is_not_signed_is_refused() {
        // The operation header is required among the signed headers when present.
        let (keys, parts, body) = botocore_request(|headers, _| {
            let auth = headers["authorization"].to_str().unwrap().replace(
                "SignedHeaders=content-type;host;x-amz-date;x-amz-target",
                "SignedHeaders=content-type;host;x-amz-date",
            );
            headers.insert("authorization", auth.parse().unwrap());
        });
        let err = verify(&keys, "us-east-1", "111122223333", &parts, body, now())
            .await
            .unwrap_err();
        assert_ne!(err.claimed_key, None);
        assert!(err.error.message.contains("x-amz-target"), "{err:?}");
    }

    #[tokio::test]
    async fn a_request_dated_ten_minutes_off_is_refused_before_its_signature() {
        let parts = signed("20261123T101000Z");
        let err = verify(
            &keys(),
            "us-east-1",
            "111122223333",
            &parts,
            Bytes::new(),
            now(),
        )
        .await
        .unwrap_err();
        assert_eq!(err.error.code, "InvalidSignatureException");
        assert_eq!(err.claimed_key.as_deref(), Some("AKIDEXAMPLE0000001"));
    }

    #[tokio::test]
    async fn a_wrong_signature_is_an_invalid_signature() {
        let parts = signed("20261123T100100Z");
        let err = verify(
            &keys(),
            "us-east-1",
            "111122223333",
            &parts,
            Bytes::new(),
            now(),
        )
        .await
        .unwrap_err();
        assert_eq!(err.error.code, "InvalidSignatureException", "{err:?}");
    }

    #[tokio::test]
    async fn an_unknown_access_key_is_an_unrecognized_client() {
        let parts = signed("20261123T100100Z");
        let err = verify(
            &Arc::new(AccessKeys::default()),
            "us-east-1",
            "111122223333",
            &parts,
            Bytes::new(),
            now(),
        )
        .await
        .unwrap_err();
        assert_eq!(err.error.code, "UnrecognizedClientException", "{err:?}");
    }

    #[tokio::test]
    async fn a_scope_of_another_region_is_refused() {
        let parts = signed("20261123T100100Z");
        let err = verify(
            &keys(),
            "eu-west-1",
            "111122223333",
            &parts,
            Bytes::new(),
            now(),
        )
        .await
        .unwrap_err();
        assert_eq!(err.error.code, "InvalidSignatureException", "{err:?}");
        assert!(err.error.message.contains("region"), "{err:?}");
    }

    #[tokio::test]
    async fn an_unsigned_request_is_missing_its_token() {
        let (parts, ()) = http::Request::post("https://127.0.0.1/")
            .body(())
            .unwrap()
            .into_parts();
        let err = verify(
            &keys(),
            "us-east-1",
            "111122223333",
            &parts,
            Bytes::new(),
            now(),
        )
        .await
        .unwrap_err();
        assert_eq!(err.error.code, "MissingAuthenticationTokenException");
    }
}
