//! The crate's one error type and its one mapping to `tonic::Status` (DESIGN.md §4).
//!
//! Messages in [`Error`] reach callers, so they never contain key bytes, plaintext or PINs;
//! the PKCS#11 cause of a device fault is kept for the log and replaced by a generic message
//! on the wire.

use std::fmt;

/// Everything that can go wrong in wrapd, classified by what the caller should do about it.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum Error {
    /// A request field is malformed or out of range (INVALID_ARGUMENT).
    #[error("{0}")]
    InvalidArgument(String),
    /// A ciphertext blob did not unwrap: tampered, truncated, wrong context or wrong key.
    /// Always the same message, so that the reason is no oracle (INVALID_ARGUMENT).
    #[error("the ciphertext is invalid, or does not match the key or encryption context")]
    InvalidCiphertext,
    /// The key or alias does not exist (NOT_FOUND).
    #[error("{0}")]
    NotFound(String),
    /// The object to create exists already, such as a duplicate alias (ALREADY_EXISTS).
    #[error("{0}")]
    AlreadyExists(String),
    /// The key's state forbids the operation: disabled or pending deletion (FAILED_PRECONDITION).
    #[error("{0}")]
    FailedPrecondition(String),
    /// The caller has no identity (UNAUTHENTICATED).
    #[error("{0}")]
    Unauthenticated(String),
    /// The caller may not do this (PERMISSION_DENIED). The message never says whether the
    /// key exists.
    #[error("{0}")]
    PermissionDenied(String),
    /// The token cannot serve right now: absent, device error, no free session (UNAVAILABLE).
    #[error("{0}")]
    Unavailable(String),
    /// A PKCS#11 call failed. `function` is the PKCS#11 function, `rv` its return value.
    #[error("PKCS#11 {function} failed: {rv}")]
    Pkcs11 {
        /// The PKCS#11 function that failed, e.g. `C_Encrypt`.
        function: String,
        /// The return value (e.g. `CKR_DeviceError`) or the library error.
        rv: String,
        /// What failed: the device, the session, or the call itself.
        fault: Pkcs11Fault,
    },
    /// The metadata store failed (INTERNAL).
    #[error("metadata store: {0}")]
    Store(String),
    /// The configuration is invalid; only returned at start-up.
    #[error("configuration: {0}")]
    Config(String),
    /// Anything else (INTERNAL).
    #[error("internal error: {0}")]
    Internal(String),
}

/// Where a PKCS#11 failure lies, which decides what is retried and re-initialized.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Pkcs11Fault {
    /// The token, the library or the connection to the HSM: re-initialize the context
    /// (UNAVAILABLE to callers).
    Device,
    /// One session is unusable: replace it (UNAVAILABLE to callers).
    Session,
    /// The call itself was refused (a bug or a misconfiguration: INTERNAL).
    Call,
}

/// Shorthand used throughout the crate.
pub type Result<T, E = Error> = std::result::Result<T, E>;

impl Error {
    /// Builds an [`Error::InvalidArgument`] from anything printable.
    pub fn invalid(message: impl fmt::Display) -> Self {
        Self::InvalidArgument(message.to_string())
    }

    /// The gRPC code this error maps to (DESIGN.md §4).
    #[cfg(any(feature = "server", feature = "client"))]
    pub fn code(&self) -> tonic::Code {
        use tonic::Code;
        match self {
            Self::InvalidArgument(_) | Self::InvalidCiphertext => Code::InvalidArgument,
            Self::NotFound(_) => Code::NotFound,
            Self::AlreadyExists(_) => Code::AlreadyExists,
            Self::FailedPrecondition(_) => Code::FailedPrecondition,
            Self::Unavailable(_) => Code::Unavailable,
            Self::Unauthenticated(_) => Code::Unauthenticated,
            Self::PermissionDenied(_) => Code::PermissionDenied,
            Self::Pkcs11 { fault, .. } => match fault {
                Pkcs11Fault::Device | Pkcs11Fault::Session => Code::Unavailable,
                Pkcs11Fault::Call => Code::Internal,
            },
            Self::Store(_) | Self::Config(_) | Self::Internal(_) => Code::Internal,
        }
    }
}

impl From<Error> for tonic::Status {
    fn from(err: Error) -> Self {
        let code = err.code();
        let message = match code {
            tonic::Code::Internal => {
                tracing::error!(error = %err, "internal error");
                "internal error (see the daemon log)".to_owned()
            }
            tonic::Code::Unavailable => {
                tracing::warn!(error = %err, "token unavailable");
                match &err {
                    Error::Unavailable(message) => message.clone(),
                    _ => "the key store is unavailable, retry later".to_owned(),
                }
            }
            _ => err.to_string(),
        };
        tonic::Status::new(code, message)
    }
}
