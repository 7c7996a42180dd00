//! AWS Signature Version 4 on every request, verified with the configured access keys.
//!
//! The canonicalisation and the signature check are `scratchstack-aws-signature`'s (a
//! maintained verifier that ships the AWS SigV4 test suite and compares signatures in
//! constant time); this module adds the rules of this API on top:
//!
//! - the `Authorization` header is parsed strictly ([`parse_authorization`]): exactly one
//!   `Credential`, `SignedHeaders` and `Signature`, nothing else, each well formed; the
//!   header is not signed, so a second credential slipped into it must never be read by
//!   anyone. The request's identity is the access key whose secret the verifier used;
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
use std::sync::{Arc, OnceLock};

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

/// The algorithm of every signature this API accepts.
const ALGORITHM: &str = "AWS4-HMAC-SHA256";

/// The parameters of an `Authorization` header, parsed strictly: each of `Credential`,
/// `SignedHeaders` and `Signature` exactly once, nothing else.
///
/// The header is not itself signed, so anything in it an attacker can add is only safe if
/// the verifier and this daemon can never read it two ways. The verifier reads the last
/// value of a repeated parameter and ignores unknown ones; a header this parser refuses is
/// never handed to it, and the identity of a request is the access key whose secret the
/// verifier actually used ([`verify`]), never a value read from the header here.
#[derive(Debug, PartialEq, Eq)]
pub struct Authorization<'a> {
    /// The access key id (the first element of the credential).
    pub access_key: &'a str,
    /// The whole credential: `ID/YYYYMMDD/REGION/SERVICE/aws4_request`.
    pub credential: &'a str,
    /// The signed header names, `;`-separated.
    pub signed_headers: &'a str,
    /// The signature, 64 lowercase hex digits.
    pub signature: &'a str,
}

/// Parses an `Authorization` header value; the error says what is wrong with it.
pub fn parse_authorization(value: &str) -> Result<Authorization<'_>, String> {
    let Some(params) = value
        .strip_prefix(ALGORITHM)
        .filter(|rest| rest.starts_with(' '))
    else {
        return Err(format!(
            "the Authorization header must start with {ALGORITHM} and a space"
        ));
    };
    let (mut credential, mut signed_headers, mut signature) = (None, None, None);
    for param in params.split(',') {
        let param = param.trim_matches(' ');
        let Some((name, value)) = param.split_once('=') else {
            return Err("each Authorization parameter must be Name=value".to_owned());
        };
        let slot = match name {
            "Credential" => &mut credential,
            "SignedHeaders" => &mut signed_headers,
            "Signature" => &mut signature,
            _ => {
                return Err(
                    "the Authorization header takes only Credential, SignedHeaders and Signature"
                        .to_owned(),
                );
            }
        };
        if slot.replace(value).is_some() {
            return Err(format!(
                "the Authorization header names {name} more than once"
            ));
        }
    }
    let (Some(credential), Some(signed_headers), Some(signature)) =
        (credential, signed_headers, signature)
    else {
        return Err(
            "the Authorization header must have Credential, SignedHeaders and Signature".to_owned(),
        );
    };
    let mut scope = credential.split('/');
    let access_key = scope.next().unwrap_or_default();
    let mut parts = 0;
    let scope_ok = scope.all(|part| {
        parts += 1;
        !part.is_empty() && part.bytes().all(|b| b.is_ascii_graphic())
    }) && parts == 4;
    let key_ok = (1..=128).contains(&access_key.len())
        && access_key.bytes().all(|b| b.is_ascii_alphanumeric());
    if !scope_ok || !key_ok {
        return Err(
            "Credential must be ACCESS_KEY_ID/YYYYMMDD/REGION/SERVICE/aws4_request".to_owned(),
        );
    }
    let header_name = |h: &str| {
        !h.is_empty()
            && h.bytes()
                .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b"-_.".contains(&b))
    };
    if !signed_headers.split(';').all(header_name) {
        return Err("SignedHeaders must be lowercase header names separated by ;".to_owned());
    }
    if signature.len() != 64
        || !signature
            .bytes()
            .all(|b| b.is_ascii_digit() || (b'a'..=b'f').contains(&b))
    {
        return Err("Signature must be 64 lowercase hexadecimal digits".to_owned());
    }
    Ok(Authorization {
        access_key,
        credential,
        signed_headers,
        signature,
    })
}

/// Headers a request may carry once only: the verifier reads the first of each, and a
/// second one could be read differently by another part of the request's path.
const SINGLE_HEADERS: [http::HeaderName; 3] = [
    http::header::AUTHORIZATION,
    http::HeaderName::from_static("x-amz-date"),
    http::HeaderName::from_static("x-amz-target"),
];

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
    if let Some(name) = SINGLE_HEADERS
        .iter()
        .find(|name| parts.headers.get_all(*name).iter().nth(1).is_some())
    {
        return Err(failure(
            "IncompleteSignatureException",
            format!("the request carries more than one {name} header"),
            None,
        ));
    }
    let claimed = match parse_authorization(authorization) {
        Ok(parsed) => parsed.access_key.to_owned(),
        Err(message) => {
            return Err(failure("IncompleteSignatureException", message, None));
        }
    };
    let claimed = Some(claimed);
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

    // The identity of the request is the access key whose secret the verifier used.
    let lookup = Arc::new((keys.clone(), account.to_owned(), OnceLock::new()));
    let used = lookup.clone();
    let mut signing_keys = tower::service_fn(move |req: GetSigningKeyRequest| {
        let lookup = lookup.clone();
        async move {
            let key = signing_key(&lookup.0, &lookup.1, &req)?;
            lookup
                .2
                .set(req.access_key().to_owned())
                .map_err(|_| SignatureError::InvalidClientTokenId(String::new()))?;
            Ok(key)
        }
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
        Ok(_) => match (used.2.get(), claimed) {
            (Some(used), Some(claimed)) if *used == claimed => Ok(claimed),
            _ => Err(failure(
                "IncompleteSignatureException",
                "the signature was not verified with the access key the credential names",
                None,
            )),
        },
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

    const GOOD: &str = "AWS4-HMAC-SHA256 Credential=AKIDEXAMPLE/20150830/us-east-1/kms/aws4_request, SignedHeaders=host;x-amz-date, Signature=5d672d79c15b13162d9279b0855cfba6789a8edb4c82c400e06b5924a6f2b5d7";

    #[test]
    fn a_well_formed_authorization_header_parses_into_its_three_parameters() {
        let parsed = parse_authorization(GOOD).unwrap();
        assert_eq!(parsed.access_key, "AKIDEXAMPLE");
        assert_eq!(
            parsed.credential,
            "AKIDEXAMPLE/20150830/us-east-1/kms/aws4_request"
        );
        assert_eq!(parsed.signed_headers, "host;x-amz-date");
        // Separators with and without spaces, as different SDKs write them.
        let compact = GOOD.replace(", ", ",");
        assert_eq!(parse_authorization(&compact).unwrap(), parsed);
    }

    #[test]
    fn an_authorization_header_that_could_be_read_two_ways_is_refused() {
        let credential = "Credential=AKIDVICTIM/x, ";
        let tricks = [
            // A second credential in front of the real one, bare or inside another name.
            GOOD.replacen(
                "AWS4-HMAC-SHA256 ",
                &format!("AWS4-HMAC-SHA256 {credential}"),
                1,
            ),
            GOOD.replacen(
                "AWS4-HMAC-SHA256 ",
                &format!("AWS4-HMAC-SHA256 Foo={credential}"),
                1,
            ),
            format!("{GOOD}, Credential=AKIDVICTIM/20150830/us-east-1/kms/aws4_request"),
            // Repeated, unknown, differently cased or missing parameters.
            format!("{GOOD}, SignedHeaders=host"),
            format!("{GOOD}, Signature={}", "0".repeat(64)),
            format!("{GOOD}, Foo=bar"),
            GOOD.replace("Credential=", "credential="),
            GOOD.replace("Signature=", "signature="),
            GOOD.replace(", Signature=", ", X=").replace("X=", "Sig="),
            GOOD.replace("AWS4-HMAC-SHA256", "aws4-hmac-sha256"),
            GOOD.replace("AWS4-HMAC-SHA256 ", "AWS4-HMAC-SHA256,"),
            GOOD.replace(", SignedHeaders=host;x-amz-date", ""),
            // Malformed values.
            GOOD.replace(", Signature", " Signature"),
            GOOD.replace("Credential=AKIDEXAMPLE/", "Credential=AKID EXAMPLE/"),
            GOOD.replace("Credential=AKIDEXAMPLE/", "Credential=/"),
            GOOD.replace("/aws4_request", ""),
            GOOD.replace("/aws4_request", "/aws4_request/x"),
            GOOD.replace("host;x-amz-date", "host;;x-amz-date"),
            GOOD.replace("host;x-amz-date", "Host;x-amz-date"),
            GOOD.replace("5d672d79", "5D672D79"),
            GOOD.replace("5d672d79", "5d672d7"),
            GOOD.replace("Signature=", "Signature=\t"),
            String::new(),
            "garbage".to_owned(),
            "AWS4-HMAC-SHA256".to_owned(),
        ];
        for trick in &tricks {
            assert!(parse_authorization(trick).is_err(), "accepted: {trick}");
        }
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
    async fn a_signature_for_one_key_is_never_credited_to_another() {
        let victim = "AKIAVICTIMVICTIM0001";
        for prefix in ["", "Foo="] {
            let (keys, parts, body) = botocore_request(|headers, _| {
                let auth = headers["authorization"].to_str().unwrap().replacen(
                    "AWS4-HMAC-SHA256 ",
                    &format!("AWS4-HMAC-SHA256 {prefix}Credential={victim}/x, "),
                    1,
                );
                headers.insert("authorization", auth.parse().unwrap());
            });
            let mut all: Vec<AwsAccessKey> = keys.keys.values().cloned().collect();
            all.push(AwsAccessKey {
                id: victim.into(),
                secret: Zeroizing::new("v".repeat(40)),
                principal: Some("unix:uid=0".into()),
            });
            let keys = Arc::new(AccessKeys::new(all));
            let err = verify(&keys, "us-east-1", "111122223333", &parts, body, now())
                .await
                .unwrap_err();
            assert_eq!(err.error.code, "IncompleteSignatureException", "{err:?}");
            assert_eq!(err.claimed_key, None);
        }
    }

    #[tokio::test]
    async fn a_request_with_two_authorization_headers_is_refused() {
        let (keys, parts, body) = botocore_request(|headers, _| {
            let auth = headers["authorization"].clone();
            headers.append("authorization", auth);
        });
        let err = verify(&keys, "us-east-1", "111122223333", &parts, body, now())
            .await
            .unwrap_err();
        assert_eq!(err.error.code, "IncompleteSignatureException", "{err:?}");
        assert!(err.error.message.contains("more than one"), "{err:?}");
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
