//! XKS proxy API errors: `{"errorName": NAME, "errorMessage": MESSAGE}` with the HTTP status
//! the specification gives each name. AWS KMS keys on the name (and turns it into its own
//! exception and message for its caller); the message goes to the customer's CloudWatch
//! logs, so it is printable ASCII under 512 characters, as the specification requires.
//!
//! | wrapd | XKS | HTTP |
//! |---|---|---|
//! | invalid argument | `ValidationException` | 400 |
//! | invalid ciphertext (any cause) | `InvalidCiphertextException` | 400 |
//! | key disabled, pending deletion or import, expired material, wrap limit of imported material | `InvalidStateException` | 400 |
//! | unauthenticated (any signature failure) | `AuthenticationFailedException` | 401 |
//! | permission denied | `AccessDeniedException` | 403 |
//! | no such key | `KeyNotFoundException` | 404 |
//! | unknown path | `InvalidUriPathException` | 404 |
//! | over the key store's request quota | `ThrottlingException` | 429 |
//! | not offered (an algorithm other than `AES_GCM`, a value beyond wrapd's sizes) | `UnsupportedOperationException` | 501 |
//! | token, session or audit log unavailable | `DependencyTimeoutException` | 503 |
//! | internal | `InternalException` | 500 |

use bytes::Bytes;
use http::{HeaderValue, Response, StatusCode};

use crate::error::{Error, ErrorKind};

/// Longest `errorMessage` (the specification's bound is "less than 512").
pub const MAX_MESSAGE: usize = 511;

/// An error as the XKS proxy API answers it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct XksError {
    /// The error name, e.g. `KeyNotFoundException`.
    pub name: &'static str,
    /// The HTTP status.
    pub status: StatusCode,
    /// The message (never key material or secrets).
    pub message: String,
}

impl XksError {
    /// An error named `name` with `status`.
    pub fn new(name: &'static str, status: StatusCode, message: impl Into<String>) -> Self {
        Self {
            name,
            status,
            message: message.into(),
        }
    }

    /// `ValidationException` (400).
    pub fn validation(message: impl Into<String>) -> Self {
        Self::new("ValidationException", StatusCode::BAD_REQUEST, message)
    }

    /// `InvalidUriPathException` (404).
    pub fn invalid_path() -> Self {
        Self::new(
            "InvalidUriPathException",
            StatusCode::NOT_FOUND,
            "The request was rejected because the specified URI path is not valid.",
        )
    }

    /// `AuthenticationFailedException` (401).
    pub fn authentication(message: impl Into<String>) -> Self {
        Self::new(
            "AuthenticationFailedException",
            StatusCode::UNAUTHORIZED,
            message,
        )
    }

    /// The answer to a wrapd error.
    pub fn from_error(err: &Error) -> Self {
        let (name, status) = match err.kind() {
            ErrorKind::InvalidArgument => ("ValidationException", StatusCode::BAD_REQUEST),
            ErrorKind::InvalidCiphertext | ErrorKind::IncorrectKey => {
                ("InvalidCiphertextException", StatusCode::BAD_REQUEST)
            }
            ErrorKind::Disabled | ErrorKind::WrongState | ErrorKind::LimitReached => {
                ("InvalidStateException", StatusCode::BAD_REQUEST)
            }
            ErrorKind::NotFound => ("KeyNotFoundException", StatusCode::NOT_FOUND),
            ErrorKind::PermissionDenied => ("AccessDeniedException", StatusCode::FORBIDDEN),
            ErrorKind::Unauthenticated => {
                ("AuthenticationFailedException", StatusCode::UNAUTHORIZED)
            }
            ErrorKind::Unsupported => {
                ("UnsupportedOperationException", StatusCode::NOT_IMPLEMENTED)
            }
            ErrorKind::Unavailable => (
                "DependencyTimeoutException",
                StatusCode::SERVICE_UNAVAILABLE,
            ),
            _ => ("InternalException", StatusCode::INTERNAL_SERVER_ERROR),
        };
        Self::new(name, status, err.public_message())
    }

    /// The HTTP response.
    pub fn response(&self) -> Response<Bytes> {
        let body = serde_json::json!({
            "errorName": self.name,
            "errorMessage": printable(&self.message),
        });
        json_response(self.status, body.to_string().into_bytes())
    }
}

impl From<Error> for XksError {
    fn from(err: Error) -> Self {
        Self::from_error(&err)
    }
}

/// A message as the specification allows it: printable ASCII (0x20 to 0x7e), at most
/// [`MAX_MESSAGE`] characters.
pub fn printable(message: &str) -> String {
    message
        .chars()
        .map(|c| if (' '..='~').contains(&c) { c } else { '?' })
        .take(MAX_MESSAGE)
        .collect()
}

/// A JSON response with `status`.
pub fn json_response(status: StatusCode, body: Vec<u8>) -> Response<Bytes> {
    let mut response = Response::new(Bytes::from(body));
    *response.status_mut() = status;
    response.headers_mut().insert(
        http::header::CONTENT_TYPE,
        HeaderValue::from_static("application/json"),
    );
    response
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn messages_are_printable_ascii_under_512_characters() {
        let message = format!("caf\u{e9}\n{}", "x".repeat(2000));
        let shown = printable(&message);
        assert_eq!(shown.len(), MAX_MESSAGE);
        assert!(shown.bytes().all(|b| (0x20..=0x7e).contains(&b)));
        assert!(shown.starts_with("caf??x"));
    }

    #[test]
    fn each_error_kind_has_the_name_and_status_the_specification_gives() {
        let cases = [
            (Error::invalid("x"), "ValidationException", 400),
            (Error::InvalidCiphertext, "InvalidCiphertextException", 400),
            (Error::Disabled("x".into()), "InvalidStateException", 400),
            (Error::KeyNotFound("x".into()), "KeyNotFoundException", 404),
            (
                Error::PermissionDenied("x".into()),
                "AccessDeniedException",
                403,
            ),
            (
                Error::Unauthenticated("x".into()),
                "AuthenticationFailedException",
                401,
            ),
            (
                Error::Unsupported("x".into()),
                "UnsupportedOperationException",
                501,
            ),
            (
                Error::Unavailable("x".into()),
                "DependencyTimeoutException",
                503,
            ),
            (
                Error::Internal("secret detail".into()),
                "InternalException",
                500,
            ),
        ];
        for (err, name, status) in cases {
            let answer = XksError::from_error(&err);
            assert_eq!(
                (answer.name, answer.status.as_u16()),
                (name, status),
                "{err:?}"
            );
        }
        // Internal details stay in the daemon's log.
        let internal = XksError::from_error(&Error::Internal("secret detail".into()));
        assert!(!internal.message.contains("secret"));
    }
}
