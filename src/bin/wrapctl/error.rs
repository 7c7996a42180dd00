//! `wrapctl`'s error: a message and what kind of failure it is, which decides the exit code.
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
use std::process::ExitCode;

use wrapd::error::ErrorKind;

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

/// A failed command.
#[derive(Debug)]
pub struct CliError {
    /// What kind of failure.
    pub failure: Failure,
    /// What to tell the user.
    pub message: String,
}

impl CliError {
    /// A failure of `failure` kind.
    pub fn new(failure: Failure, message: impl Into<String>) -> Self {
        Self {
            failure,
            message: message.into(),
        }
    }

    /// Any other failure (I/O, a remote service).
    #[cfg_attr(not(feature = "s3"), allow(dead_code))]
    pub fn other(message: impl Into<String>) -> Self {
        Self::new(Failure::Other, message)
    }

    /// A usage error.
    pub fn usage(message: impl Into<String>) -> Self {
        Self::new(Failure::Usage, message)
    }

    /// The process exit code.
    pub fn exit_code(&self) -> ExitCode {
        ExitCode::from(match self.failure {
            Failure::Other => 1,
            Failure::Usage => 2,
            Failure::NotFound => 3,
            Failure::Denied => 4,
            Failure::Invalid => 5,
            Failure::Unavailable => 6,
            Failure::WrongState => 7,
        })
    }
}

impl fmt::Display for CliError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.message)
    }
}

/// A daemon's answer: `Code: message`, classified by its gRPC code.
impl From<tonic::Status> for CliError {
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

impl From<wrapd::Error> for CliError {
    fn from(err: wrapd::Error) -> Self {
        let failure = match err.kind() {
            ErrorKind::NotFound => Failure::NotFound,
            ErrorKind::PermissionDenied | ErrorKind::Unauthenticated => Failure::Denied,
            ErrorKind::InvalidArgument
            | ErrorKind::InvalidCiphertext
            | ErrorKind::IncorrectKey
            | ErrorKind::InvalidImportToken
            | ErrorKind::ExpiredImportToken
            | ErrorKind::IncorrectKeyMaterial
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

impl From<wrapd::client::ConnectError> for CliError {
    fn from(err: wrapd::client::ConnectError) -> Self {
        Self::new(Failure::Unavailable, err.to_string())
    }
}

/// Anything else with a message.
impl From<String> for CliError {
    fn from(message: String) -> Self {
        Self::new(Failure::Other, message)
    }
}
