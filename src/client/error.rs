//! The thin client's error: a message and what kind of failure it is, whichever service
//! (wrapd over gRPC, its AWS KMS API, S3) it came from. `wrapctl` turns the kind into its
//! exit code:
//!
//! | exit code | meaning |
//! |---|---|
//! | 0 | success |
//! | 1 | anything else (I/O, internal) |
//! | 2 | usage: the command line is wrong (clap's own code too) |
//! | 3 | not found: no such key or alias |
//! | 4 | denied: no identity, or not allowed |
//! | 5 | invalid: bad input, or a ciphertext/message that does not decrypt |
//! | 6 | unavailable: the daemon cannot be reached or asks to retry |
//! | 7 | wrong state: the key is disabled or pending deletion, or a limit was reached |

use std::fmt;

use crate::error::ErrorKind;

/// What kind of failure, for the exit code.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Failure {
    /// Anything else.
    Other,
    /// The command line is wrong.
    Usage,
    /// No such key or alias.
    NotFound,
    /// No identity, or not allowed.
    Denied,
    /// Bad input, or a ciphertext that does not decrypt.
    Invalid,
    /// The daemon cannot be reached or asks to retry.
    Unavailable,
    /// The key's state (or a limit) forbids it.
    WrongState,
}

/// A failed client call.
#[derive(Debug)]
pub struct ClientError {
    /// What kind of failure.
    pub failure: Failure,
    /// What to tell the user.
    pub message: String,
}

impl ClientError {
    /// A failure of `failure` kind.
    pub fn new(failure: Failure, message: impl Into<String>) -> Self {
        Self {
            failure,
            message: message.into(),
        }
    }

    /// Any other failure (I/O, a remote service).
    pub fn other(message: impl Into<String>) -> Self {
        Self::new(Failure::Other, message)
    }

    /// A usage error.
    pub fn usage(message: impl Into<String>) -> Self {
        Self::new(Failure::Usage, message)
    }

    /// The same failure, its message prefixed with what was being done.
    pub fn context(self, what: &str) -> Self {
        Self::new(self.failure, format!("{what}: {}", self.message))
    }
}

impl fmt::Display for ClientError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.message)
    }
}

/// A daemon's answer: `Code: message`, classified by its gRPC code.
impl From<tonic::Status> for ClientError {
    fn from(status: tonic::Status) -> Self {
        use tonic::Code;
        let failure = match status.code() {
            Code::NotFound => Failure::NotFound,
            Code::PermissionDenied | Code::Unauthenticated => Failure::Denied,
            Code::InvalidArgument | Code::OutOfRange | Code::AlreadyExists => Failure::Invalid,
            Code::Unavailable | Code::DeadlineExceeded => Failure::Unavailable,
            Code::FailedPrecondition => Failure::WrongState,
            _ => Failure::Other,
        };
        Self::new(
            failure,
            format!("{:?}: {}", status.code(), status.message()),
        )
    }
}

impl From<crate::Error> for ClientError {
    fn from(err: crate::Error) -> Self {
        let failure = match err.kind() {
            ErrorKind::NotFound => Failure::NotFound,
            ErrorKind::PermissionDenied | ErrorKind::Unauthenticated => Failure::Denied,
            ErrorKind::InvalidArgument
            | ErrorKind::InvalidCiphertext
            | ErrorKind::IncorrectKey
            | ErrorKind::InvalidImportToken
            | ErrorKind::ExpiredImportToken
            | ErrorKind::IncorrectKeyMaterial
            | ErrorKind::MalformedPolicy
            | ErrorKind::InvalidGrantToken
            | ErrorKind::InvalidGrantId
            | ErrorKind::AlreadyExists => Failure::Invalid,
            ErrorKind::Unavailable => Failure::Unavailable,
            ErrorKind::WrongState
            | ErrorKind::Disabled
            | ErrorKind::LimitReached
            | ErrorKind::Unsupported => Failure::WrongState,
            _ => Failure::Other,
        };
        Self::new(failure, err.to_string())
    }
}

impl From<super::ConnectError> for ClientError {
    fn from(err: super::ConnectError) -> Self {
        Self::new(Failure::Unavailable, err.to_string())
    }
}

/// Anything else with a message.
impl From<String> for ClientError {
    fn from(message: String) -> Self {
        Self::new(Failure::Other, message)
    }
}
