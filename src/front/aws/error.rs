//! AWS KMS errors: an error type name (`__type`), a message and an HTTP status, as the AWS
//! SDKs parse them (they key on `__type`). The statuses are AWS KMS's own, as its API
//! reference lists them for each error: 400 for every error of the caller's, 500 for the
//! service's (`DependencyTimeoutException`, `KMSInternalException`); the service model
//! (botocore's) does not give them.
//!
//! One table maps wrapd's [`ErrorKind`] onto them:
//!
//! | wrapd | AWS KMS | HTTP |
//! |---|---|---|
//! | invalid argument | `ValidationException` | 400 |
//! | invalid ciphertext | `InvalidCiphertextException` | 400 |
//! | blob under another key than the one named | `IncorrectKeyException` | 400 |
//! | not found | `NotFoundException` | 400 |
//! | already exists | `AlreadyExistsException` | 400 |
//! | key disabled | `DisabledException` | 400 |
//! | other wrong state (pending deletion) | `KMSInvalidStateException` | 400 |
//! | wrap limit of a version reached | `LimitExceededException` | 400 |
//! | import token unknown / expired | `InvalidImportTokenException` / `ExpiredImportTokenException` | 400 |
//! | imported material differs from the key's | `IncorrectKeyMaterialException` | 400 |
//! | a key policy that does not parse or would lock its author out | `MalformedPolicyDocumentException` | 400 |
//! | a grant token wrapd did not issue / a grant id of the wrong form | `InvalidGrantTokenException` / `InvalidGrantIdException` | 400 |
//! | not offered (e.g. a wrapping algorithm the token lacks) | `UnsupportedOperationException` | 400 |
//! | permission denied | `AccessDeniedException` | 400 |
//! | unauthenticated | `UnrecognizedClientException` | 400 |
//! | token or audit log unavailable | `DependencyTimeoutException` | 500 |
//! | internal | `KMSInternalException` | 500 |
//!
//! Signature failures have their own types (`MissingAuthenticationTokenException`,
//! `IncompleteSignatureException`, `InvalidSignatureException`,
//! `UnrecognizedClientException`), named by [`crate::front::sigv4`].

use bytes::Bytes;
use http::{HeaderValue, Response, StatusCode};

use crate::error::{Error, ErrorKind};

/// An error as the AWS KMS API answers it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct AwsError {
    /// The error type, e.g. `NotFoundException`.
    pub code: &'static str,
    /// The HTTP status.
    pub status: StatusCode,
    /// The message (never key material or secrets).
    pub message: String,
}

impl AwsError {
    /// An error of type `code` with `status`.
    pub fn new(code: &'static str, status: StatusCode, message: impl Into<String>) -> Self {
        Self {
            code,
            status,
            message: message.into(),
        }
    }

    /// `ValidationException` (400): a parameter is missing, malformed or out of range.
    pub fn validation(message: impl Into<String>) -> Self {
        Self::new("ValidationException", StatusCode::BAD_REQUEST, message)
    }

    /// `ValidationException` for a value outside a member's enumeration, worded as AWS
    /// words it (scripts match the wording).
    pub fn not_in_enum(member: &str, value: &str, allowed: &[&str]) -> Self {
        Self::validation(format!(
            "1 validation error detected: Value '{}' at '{member}' failed to satisfy constraint: Member must satisfy enum value set: [{}]",
            super::arn::truncate(value),
            allowed.join(", ")
        ))
    }

    /// `InvalidMarkerException` (400): a pagination marker this listing did not give.
    pub fn invalid_marker() -> Self {
        Self::new(
            "InvalidMarkerException",
            StatusCode::BAD_REQUEST,
            "The request contains an invalid marker.",
        )
    }

    /// `NotFoundException` (400).
    pub fn not_found(message: impl Into<String>) -> Self {
        Self::new("NotFoundException", StatusCode::BAD_REQUEST, message)
    }

    /// `UnsupportedOperationException` (400): an operation, or a parameter value, that
    /// wrapd does not offer; never silently ignored.
    pub fn unsupported(message: impl Into<String>) -> Self {
        Self::new(
            "UnsupportedOperationException",
            StatusCode::BAD_REQUEST,
            message,
        )
    }

    /// The answer to a wrapd error.
    pub fn from_error(err: &Error) -> Self {
        let (code, status) = match err.kind() {
            ErrorKind::InvalidArgument => ("ValidationException", StatusCode::BAD_REQUEST),
            ErrorKind::InvalidCiphertext => ("InvalidCiphertextException", StatusCode::BAD_REQUEST),
            ErrorKind::IncorrectKey => ("IncorrectKeyException", StatusCode::BAD_REQUEST),
            ErrorKind::NotFound => ("NotFoundException", StatusCode::BAD_REQUEST),
            ErrorKind::AlreadyExists => ("AlreadyExistsException", StatusCode::BAD_REQUEST),
            ErrorKind::Disabled => ("DisabledException", StatusCode::BAD_REQUEST),
            ErrorKind::WrongState => ("KMSInvalidStateException", StatusCode::BAD_REQUEST),
            ErrorKind::LimitReached => ("LimitExceededException", StatusCode::BAD_REQUEST),
            ErrorKind::InvalidImportToken => {
                ("InvalidImportTokenException", StatusCode::BAD_REQUEST)
            }
            ErrorKind::ExpiredImportToken => {
                ("ExpiredImportTokenException", StatusCode::BAD_REQUEST)
            }
            ErrorKind::IncorrectKeyMaterial => {
                ("IncorrectKeyMaterialException", StatusCode::BAD_REQUEST)
            }
            ErrorKind::InvalidGrantToken => ("InvalidGrantTokenException", StatusCode::BAD_REQUEST),
            ErrorKind::InvalidGrantId => ("InvalidGrantIdException", StatusCode::BAD_REQUEST),
            ErrorKind::MalformedPolicy => {
                ("MalformedPolicyDocumentException", StatusCode::BAD_REQUEST)
            }
            ErrorKind::Unsupported => ("UnsupportedOperationException", StatusCode::BAD_REQUEST),
            ErrorKind::PermissionDenied => ("AccessDeniedException", StatusCode::BAD_REQUEST),
            ErrorKind::Unauthenticated => ("UnrecognizedClientException", StatusCode::BAD_REQUEST),
            ErrorKind::Unavailable => (
                "DependencyTimeoutException",
                StatusCode::INTERNAL_SERVER_ERROR,
            ),
            _ => ("KMSInternalException", StatusCode::INTERNAL_SERVER_ERROR),
        };
        let message = match err.kind() {
            ErrorKind::IncorrectKey => {
                "The key ID in the request does not identify the KMS key that encrypted the ciphertext".to_owned()
            }
            _ => err.public_message(),
        };
        Self::new(code, status, message)
    }

    /// The HTTP response: `{"__type": CODE, "message": MESSAGE}`.
    pub fn response(&self, request_id: &str) -> Response<Bytes> {
        let body = serde_json::json!({ "__type": self.code, "message": self.message });
        json_response(self.status, body.to_string().into_bytes(), request_id)
    }
}

impl From<Error> for AwsError {
    fn from(err: Error) -> Self {
        Self::from_error(&err)
    }
}

/// The content type of every request and answer.
pub const CONTENT_TYPE: &str = "application/x-amz-json-1.1";

/// An `application/x-amz-json-1.1` response with the request id header the SDKs read.
pub fn json_response(status: StatusCode, body: Vec<u8>, request_id: &str) -> Response<Bytes> {
    let mut response = Response::new(Bytes::from(body));
    *response.status_mut() = status;
    let headers = response.headers_mut();
    headers.insert(
        http::header::CONTENT_TYPE,
        HeaderValue::from_static(CONTENT_TYPE),
    );
    if let Ok(id) = HeaderValue::from_str(request_id) {
        headers.insert("x-amzn-requestid", id);
    }
    response
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn each_error_kind_has_the_kms_type_and_status_of_the_service_model() {
        let cases = [
            (Error::invalid("x"), "ValidationException", 400),
            (Error::InvalidCiphertext, "InvalidCiphertextException", 400),
            (Error::IncorrectKey, "IncorrectKeyException", 400),
            (Error::KeyNotFound("k".into()), "NotFoundException", 400),
            (Error::AliasNotFound("a".into()), "NotFoundException", 400),
            (
                Error::AlreadyExists("a".into()),
                "AlreadyExistsException",
                400,
            ),
            (Error::Disabled("k".into()), "DisabledException", 400),
            (
                Error::WrongState("k".into()),
                "KMSInvalidStateException",
                400,
            ),
            (
                Error::PermissionDenied("no".into()),
                "AccessDeniedException",
                400,
            ),
            (
                Error::Unavailable("later".into()),
                "DependencyTimeoutException",
                500,
            ),
            (
                Error::Internal("secret detail".into()),
                "KMSInternalException",
                500,
            ),
        ];
        for (err, code, status) in cases {
            let aws = AwsError::from_error(&err);
            assert_eq!((aws.code, aws.status.as_u16()), (code, status), "{err:?}");
        }
    }

    #[test]
    fn an_internal_error_keeps_its_detail_out_of_the_answer() {
        let aws = AwsError::from_error(&Error::Internal("sqlite: disk I/O at /x".into()));
        assert!(!aws.message.contains("sqlite"), "{}", aws.message);
    }

    #[test]
    fn the_body_carries_type_and_message() {
        let response = AwsError::not_found("Key 'x' does not exist").response("rid-1");
        assert_eq!(response.status(), StatusCode::BAD_REQUEST);
        assert_eq!(response.headers()["x-amzn-requestid"], "rid-1");
        let body: serde_json::Value = serde_json::from_slice(response.body()).unwrap();
        assert_eq!(body["__type"], "NotFoundException");
        assert_eq!(body["message"], "Key 'x' does not exist");
    }
}
