//! AWS Signature Version 4, verified with configured access keys: the authentication of
//! both HTTPS front ends, the AWS KMS API (service `kms`) and the XKS proxy API (service
//! `kms-xks-proxy`, whose secrets are 43 to 64 characters).
//!
//! The signature itself is computed by `aws-sigv4`, the AWS SDK for Rust's signer: the
//! request as received (its signed headers, path, query and body) is signed again with the
//! secret of the access key it names, and the two signatures are compared in constant time.
//! This module adds the rules on top:
//!
//! - the `Authorization` header is parsed strictly ([`parse_authorization`]): exactly one
//!   `Credential`, `SignedHeaders` and `Signature`, nothing else, each well formed; the
//!   header is not signed, so a second credential slipped into it must never be read by
//!   anyone. The request's identity is the access key whose secret produced the signature;
//! - only the `Authorization` header is accepted (no pre-signed query strings), with
//!   `host`, `x-amz-date`, and, when the request has them, `content-type` and `x-amz-target`
//!   among the signed headers: the operation a signature covers cannot be swapped;
//! - the credential scope must be the request's date, the front end's region and service,
//!   and `aws4_request`;
//! - the request time (`X-Amz-Date`) within ±5 minutes of the daemon's clock, as AWS;
//! - no session tokens (wrapd has no STS), refused as an unrecognized client.
//!
//! The secrets are kept in zeroizing strings; the signer derives the day's signing key from
//! one for each request.

use std::collections::HashMap;
use std::time::SystemTime;

use aws_credential_types::Credentials;
use aws_sigv4::http_request::{SignableBody, SignableRequest, SigningSettings, sign};
use aws_sigv4::sign::v4;
use chrono::{DateTime, NaiveDateTime, Utc};
use subtle::ConstantTimeEq;

use crate::config::AwsAccessKey;

/// Where a signature must be scoped (the front end's region and SigV4 service name), and
/// the headers it must cover when a request has them (besides `host` and `x-amz-date`,
/// always).
#[derive(Debug, Clone, Copy)]
pub struct Scope<'a> {
    /// The regions a signature may be scoped to, e.g. `["us-east-1"]`.
    pub regions: &'a [&'a str],
    /// The service, e.g. `kms`.
    pub service: &'a str,
    /// Headers the signature must cover when present: the AWS KMS API's operation header
    /// (`x-amz-target`) and content type; none for the XKS API, whose operation is in the
    /// (signed) path and whose caller, AWS KMS, signs `host;x-amz-date` only.
    pub signed_when_present: &'a [&'a str],
}

/// Most headers a signature may name: the SDKs sign a handful, and every name costs the
/// canonicalization.
pub const MAX_SIGNED_HEADERS: usize = 32;

/// How far a request's time may be from the daemon's clock.
pub const MAX_CLOCK_SKEW: chrono::Duration = chrono::Duration::minutes(5);

/// A request whose signature verified: the access key that signed it, and the region its
/// credential was scoped to (one of [`Scope::regions`]).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Verified {
    /// The access key id.
    pub access_key: String,
    /// The region.
    pub region: String,
}

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

/// A refused signature: the AWS error type and message (each front end answers them in its
/// own form), and the access key id the request claimed (for the audit line), when it named
/// a plausible one.
#[derive(Debug)]
pub struct AuthFailure {
    /// The AWS error type, e.g. `InvalidSignatureException`.
    pub code: &'static str,
    /// What is wrong, in AWS's wording where AWS has one.
    pub message: String,
    /// The claimed access key id.
    pub claimed_key: Option<String>,
}

fn failure(code: &'static str, message: impl Into<String>, claimed: Option<String>) -> AuthFailure {
    AuthFailure {
        code,
        message: message.into(),
        claimed_key: claimed,
    }
}

/// The algorithm of every signature this API accepts.
const ALGORITHM: &str = "AWS4-HMAC-SHA256";

/// The terminator of every credential scope.
const TERMINATOR: &str = "aws4_request";

/// Headers every signature must cover.
const ALWAYS_SIGNED: [&str; 2] = ["host", "x-amz-date"];
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
    // Sorted and each once, as SigV4 writes them: a name listed twice would have every value
    // of its header signed twice over, and a list out of order is not one a signer wrote.
    let names: Vec<&str> = signed_headers.split(';').collect();
    if names.len() > MAX_SIGNED_HEADERS || names.windows(2).any(|pair| pair[0] >= pair[1]) {
        return Err(format!(
            "SignedHeaders must list at most {MAX_SIGNED_HEADERS} header names, sorted, each once"
        ));
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

/// Verifies the request's signature at time `now` for `scope`; returns the access key id
/// it was signed with.
pub fn verify(
    keys: &AccessKeys,
    scope: Scope<'_>,
    parts: &http::request::Parts,
    body: &[u8],
    now: DateTime<Utc>,
) -> Result<Verified, AuthFailure> {
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
    let parsed = match parse_authorization(authorization) {
        Ok(parsed) => parsed,
        Err(message) => {
            return Err(failure("IncompleteSignatureException", message, None));
        }
    };
    let claimed = Some(parsed.access_key.to_owned());
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
    let region = check_scope(&parsed, date, scope)
        .map_err(|(code, message)| failure(code, message, claimed.clone()))?;
    let signed: Vec<&str> = parsed.signed_headers.split(';').collect();
    let unsigned = ALWAYS_SIGNED
        .iter()
        .chain(
            scope
                .signed_when_present
                .iter()
                .filter(|h| parts.headers.contains_key(**h)),
        )
        .find(|h| !signed.contains(h));
    if let Some(name) = unsigned {
        return Err(failure(
            "IncompleteSignatureException",
            format!("the signature must cover the {name} header (SignedHeaders)"),
            claimed,
        ));
    }
    if let Some(name) = signed.iter().find(|h| !parts.headers.contains_key(**h)) {
        return Err(failure(
            "IncompleteSignatureException",
            format!("SignedHeaders names {name}, which the request does not carry"),
            claimed,
        ));
    }
    let Some(key) = keys.get(parsed.access_key) else {
        return Err(failure(
            "UnrecognizedClientException",
            "The security token included in the request is invalid.",
            claimed,
        ));
    };
    let expected = expected_signature(key, scope, region, at.into(), parts, &signed, body)
        .map_err(|message| failure("IncompleteSignatureException", message, claimed.clone()))?;
    if bool::from(expected.as_bytes().ct_eq(parsed.signature.as_bytes())) {
        Ok(Verified {
            access_key: key.id.clone(),
            region: region.to_owned(),
        })
    } else {
        Err(failure(
            "InvalidSignatureException",
            "The request signature we calculated does not match the signature you provided. Check your AWS Secret Access Key and signing method.",
            claimed,
        ))
    }
}

/// Checks the credential scope (`DATE/REGION/SERVICE/aws4_request`) against the request's
/// date and the front end's scope, and returns its region; the error is the AWS type and
/// message.
fn check_scope<'a>(
    parsed: &Authorization<'_>,
    date: &str,
    scope: Scope<'a>,
) -> Result<&'a str, (&'static str, String)> {
    let parts: Vec<&str> = parsed.credential.split('/').skip(1).collect();
    let [day, region, service, terminator] = parts.as_slice() else {
        return Err((
            "IncompleteSignatureException",
            "Credential must be ACCESS_KEY_ID/YYYYMMDD/REGION/SERVICE/aws4_request".to_owned(),
        ));
    };
    if *terminator != TERMINATOR {
        return Err((
            "IncompleteSignatureException",
            format!(
                "Credential should be scoped with a valid terminator: '{TERMINATOR}', not '{terminator}'."
            ),
        ));
    }
    let request_day = date.get(..8).unwrap_or_default();
    if *day != request_day {
        return Err((
            "InvalidSignatureException",
            format!(
                "Date in Credential scope does not match YYYYMMDD from ISO-8601 version of date from HTTP: '{day}' != '{request_day}', from '{date}'."
            ),
        ));
    }
    let Some(region) = scope.regions.iter().find(|own| **own == *region) else {
        return Err((
            "InvalidSignatureException",
            format!("Credential should be scoped to a valid region, not '{region}'."),
        ));
    };
    if *service != scope.service {
        return Err((
            "InvalidSignatureException",
            format!(
                "Credential should be scoped to correct service: '{}'.",
                scope.service
            ),
        ));
    }
    Ok(region)
}

/// The signature `key` gives the request as received: its `signed` headers (every value of
/// each), method, path, query and body, at `at`, in `scope`.
fn expected_signature(
    key: &AwsAccessKey,
    scope: Scope<'_>,
    region: &str,
    at: SystemTime,
    parts: &http::request::Parts,
    signed: &[&str],
    body: &[u8],
) -> Result<String, String> {
    let identity =
        Credentials::new(key.id.as_str(), key.secret.as_str(), None, None, "wrapd").into();
    let mut settings = SigningSettings::default();
    // Sign exactly the headers the caller signed: none is left out by name.
    settings.excluded_headers = Some(Vec::new());
    let params = v4::SigningParams::builder()
        .identity(&identity)
        .region(region)
        .name(scope.service)
        .time(at)
        .settings(settings)
        .build()
        .map_err(|e| e.to_string())?
        .into();
    let mut headers = Vec::new();
    for name in signed {
        for value in parts.headers.get_all(*name) {
            let value = value
                .to_str()
                .map_err(|_| format!("the signed header {name} is not visible ASCII"))?;
            headers.push((*name, value));
        }
    }
    // The host the signature names is the Host header's (signed, required); the URI's
    // authority is only a placeholder the signer's parser wants.
    let path = parts.uri.path_and_query().map_or("/", |p| p.as_str());
    let request = SignableRequest::new(
        parts.method.as_str(),
        format!("https://wrapd.invalid{path}"),
        headers.into_iter(),
        SignableBody::Bytes(body),
    )
    .map_err(|e| format!("the request cannot be canonicalized: {e}"))?;
    let (_, signature) = sign(request, &params)
        .map_err(|e| format!("the request cannot be canonicalized: {e}"))?
        .into_parts();
    Ok(signature)
}

#[cfg(test)]
mod tests {
    use super::*;
    use bytes::Bytes;
    use zeroize::Zeroizing;

    const KMS: Scope<'static> = Scope {
        regions: &["us-east-1"],
        service: "kms",
        signed_when_present: &["content-type", "x-amz-target"],
    };

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
    fn signed_headers_must_be_sorted_unique_and_few() {
        let with = |headers: &str| GOOD.replace("host;x-amz-date", headers);
        for bad in [
            with("x-amz-date;host"),
            with("host;host;x-amz-date"),
            with(&format!("{}host;x-amz-date", "a;".repeat(300))),
            with(
                &(0..40)
                    .map(|i| format!("h{i:02}"))
                    .collect::<Vec<_>>()
                    .join(";"),
            ),
        ] {
            assert!(parse_authorization(&bad).is_err(), "accepted: {bad}");
        }
        assert!(parse_authorization(&with("content-type;host;x-amz-date")).is_ok());
    }

    /// A request as AWS KMS signs an XKS call: `host;x-amz-date` only, a 64-character
    /// secret, and a `Content-Type` header it does not sign.
    fn xks_request(signed_at: DateTime<Utc>) -> (AccessKeys, http::request::Parts, Bytes) {
        let secret = "s".repeat(64);
        let key = AwsAccessKey {
            id: "AAAAAAAAAAAAAAAAAAAAAAAAAA".into(),
            secret: Zeroizing::new(secret.clone()),
            principal: None,
            arn: None,
        };
        let body = Bytes::from_static(br#"{"requestMetadata":{}}"#);
        let identity = Credentials::new(key.id.as_str(), secret.as_str(), None, None, "t").into();
        let params = v4::SigningParams::builder()
            .identity(&identity)
            .region("eu-west-1")
            .name("kms-xks-proxy")
            .time(signed_at.into())
            .settings(SigningSettings::default())
            .build()
            .unwrap()
            .into();
        let signable = SignableRequest::new(
            "POST",
            "https://xks.example.com/p/kms/xks/v1/health",
            [("host", "xks.example.com")].into_iter(),
            SignableBody::Bytes(&body),
        )
        .unwrap();
        let (instructions, _) = sign(signable, &params).unwrap().into_parts();
        let mut builder = http::Request::post("/p/kms/xks/v1/health")
            .header("host", "xks.example.com")
            .header("content-type", "application/json");
        for (name, value) in instructions.headers() {
            builder = builder.header(name, value);
        }
        let (parts, ()) = builder.body(()).unwrap().into_parts();
        (AccessKeys::new([key]), parts, body)
    }

    #[test]
    fn a_request_signed_as_aws_kms_signs_xks_calls_verifies_with_a_long_secret() {
        let (keys, parts, body) = xks_request(now());
        let xks = Scope {
            regions: &["eu-west-1"],
            service: "kms-xks-proxy",
            signed_when_present: &[],
        };
        assert_eq!(
            verify(&keys, xks, &parts, &body, now()).unwrap().access_key,
            "AAAAAAAAAAAAAAAAAAAAAAAAAA"
        );
        // Where the content type must be signed (the AWS KMS API), the same request is not.
        let strict = Scope {
            signed_when_present: &["content-type"],
            ..xks
        };
        let err = verify(&keys, strict, &parts, &body, now()).unwrap_err();
        assert!(err.message.contains("content-type"), "{err:?}");
        // Another service or body does not verify.
        let other = Scope {
            service: "kms",
            ..xks
        };
        assert!(verify(&keys, other, &parts, &body, now()).is_err());
        let err = verify(&keys, xks, &parts, &Bytes::from_static(b"{}"), now()).unwrap_err();
        assert_eq!(err.code, "InvalidSignatureException");
    }

    #[test]
    fn a_signed_header_the_request_lacks_is_refused() {
        let (keys, mut parts, body) = xks_request(now());
        let auth = parts.headers["authorization"].to_str().unwrap().replace(
            "SignedHeaders=host;x-amz-date",
            "SignedHeaders=host;x-amz-date;x-extra",
        );
        parts.headers.insert("authorization", auth.parse().unwrap());
        let xks = Scope {
            regions: &["eu-west-1"],
            service: "kms-xks-proxy",
            signed_when_present: &[],
        };
        let err = verify(&keys, xks, &parts, &body, now()).unwrap_err();
        assert!(err.message.contains("x-extra"), "{err:?}");
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

    fn keys() -> AccessKeys {
        AccessKeys::new([AwsAccessKey {
            id: "AKIDEXAMPLE0000001".into(),
            secret: Zeroizing::new("wJalrXUtnFEMI/K7MDENG+bPxRfiCYEXAMPLEKEY".into()),
            principal: None,
            arn: None,
        }])
    }

    fn now() -> DateTime<Utc> {
        parse_amz_date("20261123T100000Z").unwrap()
    }

    /// A request botocore signed (tests/vectors/sigv4_fixture.py), as parts and body.
    fn botocore_request(
        edit: impl FnOnce(&mut http::HeaderMap, &mut String),
    ) -> (AccessKeys, http::request::Parts, Bytes) {
        let fixture: serde_json::Value =
            serde_json::from_str(include_str!("../../tests/vectors/sigv4-kms.json")).unwrap();
        let mut builder = http::Request::post("/");
        for (name, value) in fixture["headers"].as_object().unwrap() {
            builder = builder.header(name.as_str(), value.as_str().unwrap());
        }
        let (mut parts, ()) = builder.body(()).unwrap().into_parts();
        let mut body = fixture["body"].as_str().unwrap().to_owned();
        edit(&mut parts.headers, &mut body);
        let keys = AccessKeys::new([AwsAccessKey {
            id: fixture["access_key"].as_str().unwrap().into(),
            secret: Zeroizing::new(fixture["secret"].as_str().unwrap().into()),
            principal: None,
            arn: None,
        }]);
        (keys, parts, Bytes::from(body))
    }

    #[test]
    fn a_request_signed_by_botocore_verifies() {
        let (keys, parts, body) = botocore_request(|_, _| {});
        let verified = verify(&keys, KMS, &parts, &body, now()).unwrap();
        assert_eq!(verified.access_key, "AKIAIOSFODNN7EXAMPLE");
        assert_eq!(verified.region, "us-east-1");
        // An endpoint of several regions takes the same request and says which it was for.
        let several = Scope {
            regions: &["eu-west-1", "us-east-1"],
            ..KMS
        };
        assert_eq!(
            verify(&keys, several, &parts, &body, now()).unwrap().region,
            "us-east-1"
        );
    }

    #[test]
    fn a_signature_for_one_key_is_never_credited_to_another() {
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
                arn: None,
            });
            let keys = AccessKeys::new(all);
            let err = verify(&keys, KMS, &parts, &body, now()).unwrap_err();
            assert_eq!(err.code, "IncompleteSignatureException", "{err:?}");
            assert_eq!(err.claimed_key, None);
        }
    }

    #[test]
    fn a_request_with_two_authorization_headers_is_refused() {
        let (keys, parts, body) = botocore_request(|headers, _| {
            let auth = headers["authorization"].clone();
            headers.append("authorization", auth);
        });
        let err = verify(&keys, KMS, &parts, &body, now()).unwrap_err();
        assert_eq!(err.code, "IncompleteSignatureException", "{err:?}");
        assert!(err.message.contains("more than one"), "{err:?}");
    }

    #[test]
    fn a_signed_request_with_another_operation_or_body_does_not_verify() {
        let (keys, parts, body) = botocore_request(|headers, _| {
            headers.insert("x-amz-target", "TrentService.Encrypt".parse().unwrap());
        });
        let err = verify(&keys, KMS, &parts, &body, now()).unwrap_err();
        assert_eq!(err.code, "InvalidSignatureException");
        let (keys, parts, body) = botocore_request(|_, body| body.push(' '));
        let err = verify(&keys, KMS, &parts, &body, now()).unwrap_err();
        assert_eq!(err.code, "InvalidSignatureException");
    }

    #[test]
    fn a_request_whose_target_is_not_signed_is_refused() {
        // The operation header is required among the signed headers when present.
        let (keys, parts, body) = botocore_request(|headers, _| {
            let auth = headers["authorization"].to_str().unwrap().replace(
                "SignedHeaders=content-type;host;x-amz-date;x-amz-target",
                "SignedHeaders=content-type;host;x-amz-date",
            );
            headers.insert("authorization", auth.parse().unwrap());
        });
        let err = verify(&keys, KMS, &parts, &body, now()).unwrap_err();
        assert_ne!(err.claimed_key, None);
        assert!(err.message.contains("x-amz-target"), "{err:?}");
    }

    #[test]
    fn a_request_dated_ten_minutes_off_is_refused_before_its_signature() {
        let parts = signed("20261123T101000Z");
        let err = verify(&keys(), KMS, &parts, &[], now()).unwrap_err();
        assert_eq!(err.code, "InvalidSignatureException");
        assert_eq!(err.claimed_key.as_deref(), Some("AKIDEXAMPLE0000001"));
    }

    #[test]
    fn a_wrong_signature_is_an_invalid_signature() {
        let parts = signed("20261123T100100Z");
        let err = verify(&keys(), KMS, &parts, &[], now()).unwrap_err();
        assert_eq!(err.code, "InvalidSignatureException", "{err:?}");
    }

    #[test]
    fn an_unknown_access_key_is_an_unrecognized_client() {
        let parts = signed("20261123T100100Z");
        let err = verify(&AccessKeys::default(), KMS, &parts, &[], now()).unwrap_err();
        assert_eq!(err.code, "UnrecognizedClientException", "{err:?}");
    }

    #[test]
    fn a_scope_of_another_region_is_refused() {
        let parts = signed("20261123T100100Z");
        let err = verify(
            &keys(),
            Scope {
                regions: &["eu-west-1"],
                ..KMS
            },
            &parts,
            &[],
            now(),
        )
        .unwrap_err();
        assert_eq!(err.code, "InvalidSignatureException", "{err:?}");
        assert!(err.message.contains("region"), "{err:?}");
    }

    #[test]
    fn an_unsigned_request_is_missing_its_token() {
        let (parts, ()) = http::Request::post("https://127.0.0.1/")
            .body(())
            .unwrap()
            .into_parts();
        let err = verify(&keys(), KMS, &parts, &[], now()).unwrap_err();
        assert_eq!(err.code, "MissingAuthenticationTokenException");
    }
}
