//! The crate's one error type, and its transport-neutral classification ([`ErrorKind`]).
//!
//! Every front end maps an [`ErrorKind`] to its own wire form in one place: the gRPC
//! services to `tonic::Status` codes (`front::grpc::status`, the table of docs/DESIGN.md §4),
//! the AWS KMS API to error types and HTTP statuses, the KMS v2 plugin to gRPC codes.
//!
//! Messages in [`Error`] reach callers, so they never contain key bytes, plaintext or PINs;
//! the PKCS#11 cause of a device fault is kept for the log and replaced by a generic message
//! on the wire.

use std::fmt;

/// Everything that can go wrong in wrapd, classified by what the caller should do about it.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum Error {
    /// A request field is malformed or out of range.
    #[error("{0}")]
    InvalidArgument(String),
    /// A ciphertext blob did not unwrap: tampered, truncated, wrong context or wrong key.
    /// Always the same message, so that the reason is no oracle.
    #[error("the ciphertext is invalid, or does not match the key or encryption context")]
    InvalidCiphertext,
    /// A blob is wrapped under another key than the one the caller named (AWS KMS's
    /// `IncorrectKeyException`). The same message as [`Error::InvalidCiphertext`]: the key a
    /// blob names is in its clear header, but the gRPC API keeps one message for every
    /// unwrap failure.
    #[error("the ciphertext is invalid, or does not match the key or encryption context")]
    IncorrectKey,
    /// No key has this id.
    #[error("key {0} not found")]
    KeyNotFound(String),
    /// No alias has this name.
    #[error("alias {0} not found")]
    AliasNotFound(String),
    /// The object to create exists already, such as a duplicate alias.
    #[error("{0}")]
    AlreadyExists(String),
    /// The key is disabled. The message names the key.
    #[error("{0}")]
    Disabled(String),
    /// The key's state forbids the operation: pending deletion, or (later) pending import.
    /// The message names the key and the state.
    #[error("{0}")]
    WrongState(String),
    /// A limit was reached: versions of a key, wraps of a version while it rotates.
    #[error("{0}")]
    LimitReached(String),
    /// An import token that names no wrapping key of this key (forged, of another key, or
    /// already cleaned up).
    #[error("{0}")]
    InvalidImportToken(String),
    /// An import token past its expiry (24 hours after `GetParametersForImport`).
    #[error("{0}")]
    ExpiredImportToken(String),
    /// Key material that differs from the material imported into the key before.
    #[error("{0}")]
    IncorrectKeyMaterial(String),
    /// A key policy document that does not parse, or that would lock its author out.
    #[error("{0}")]
    MalformedPolicy(String),
    /// A grant token wrapd did not issue.
    #[error("{0}")]
    InvalidGrantToken(String),
    /// A grant id that is not one (64 hex digits).
    #[error("{0}")]
    InvalidGrantId(String),
    /// Something wrapd or the token does not offer (a wrapping algorithm the token's PKCS#11
    /// library cannot unwrap with). The message names the alternative.
    #[error("{0}")]
    Unsupported(String),
    /// The caller has no identity.
    #[error("{0}")]
    Unauthenticated(String),
    /// The caller may not do this. The message never says whether the key exists.
    #[error("{0}")]
    PermissionDenied(String),
    /// The token or the audit log cannot serve right now: absent, device error, no free
    /// session, key material missing, audit log unwritable.
    #[error("{0}")]
    Unavailable(String),
    /// A PKCS#11 function failed: the function and its return value, as values.
    #[cfg(feature = "server")]
    #[error("PKCS#11 C_{function:?} failed: {rv}")]
    Pkcs11 {
        /// The PKCS#11 function that failed.
        function: cryptoki::context::Function,
        /// Its return value.
        rv: cryptoki::error::RvError,
        /// What failed: the device, the session, or the call itself.
        fault: Pkcs11Fault,
    },
    /// The PKCS#11 library failed outside a PKCS#11 function (loading the module, a check
    /// of the cryptoki crate), or a fault injected by the test hook.
    #[error("PKCS#11 library: {message}")]
    Pkcs11Library {
        /// What happened.
        message: String,
        /// What failed: the device, the session, or the call itself.
        fault: Pkcs11Fault,
    },
    /// A daemon answered a client call with an error (thin client side).
    #[error("{message}")]
    Remote {
        /// What the daemon's answer means.
        kind: ErrorKind,
        /// The call and the daemon's message.
        message: String,
    },
    /// The metadata store failed.
    #[error("metadata store: {0}")]
    Store(String),
    /// The configuration is invalid; only returned at start-up.
    #[error("configuration: {0}")]
    Config(String),
    /// Anything else.
    #[error("internal error: {0}")]
    Internal(String),
}

/// Where a PKCS#11 failure lies, which decides what is retried and re-initialized.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Pkcs11Fault {
    /// The token, the library or the connection to the HSM: re-initialize the context.
    Device,
    /// One session is unusable: replace it.
    Session,
    /// The call itself was refused (a bug or a misconfiguration).
    Call,
}

impl Pkcs11Fault {
    fn kind(self) -> ErrorKind {
        match self {
            Self::Device | Self::Session => ErrorKind::Unavailable,
            Self::Call => ErrorKind::Internal,
        }
    }
}

/// What an error means to a caller, whatever the transport. Each front end maps it to its
/// wire form (gRPC code, AWS error type and HTTP status).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
#[non_exhaustive]
pub enum ErrorKind {
    /// Bad input (gRPC INVALID_ARGUMENT).
    InvalidArgument,
    /// A blob that does not unwrap (gRPC INVALID_ARGUMENT, one message for every cause).
    InvalidCiphertext,
    /// A blob under another key than the one named (gRPC INVALID_ARGUMENT, the same message
    /// as [`ErrorKind::InvalidCiphertext`]).
    IncorrectKey,
    /// The key is disabled (FAILED_PRECONDITION).
    Disabled,
    /// No such key or alias (NOT_FOUND).
    NotFound,
    /// It exists already (ALREADY_EXISTS).
    AlreadyExists,
    /// The key's state forbids it (FAILED_PRECONDITION).
    WrongState,
    /// A limit was reached (FAILED_PRECONDITION).
    LimitReached,
    /// An import token that is not one of this key's (INVALID_ARGUMENT).
    InvalidImportToken,
    /// An expired import token (INVALID_ARGUMENT).
    ExpiredImportToken,
    /// Imported material that differs from the key's (INVALID_ARGUMENT).
    IncorrectKeyMaterial,
    /// A key policy that does not parse or would lock its author out (INVALID_ARGUMENT).
    MalformedPolicy,
    /// A grant token wrapd did not issue (INVALID_ARGUMENT).
    InvalidGrantToken,
    /// A grant id of the wrong form (INVALID_ARGUMENT).
    InvalidGrantId,
    /// Not offered by wrapd or its token (FAILED_PRECONDITION).
    Unsupported,
    /// No identity (UNAUTHENTICATED).
    Unauthenticated,
    /// Not allowed (PERMISSION_DENIED).
    PermissionDenied,
    /// Retry later: token, session or audit log (UNAVAILABLE).
    Unavailable,
    /// Everything else; details only in the log (INTERNAL).
    Internal,
}

impl ErrorKind {
    /// The kind's canonical status, as a gRPC status code number and name: what the gRPC
    /// front end sends, and the outcome the audit log, the metrics and the traces record.
    /// One table, so that the wire and the record cannot disagree.
    pub fn status(self) -> (i32, &'static str) {
        match self {
            Self::InvalidArgument
            | Self::InvalidCiphertext
            | Self::IncorrectKey
            | Self::InvalidImportToken
            | Self::ExpiredImportToken
            | Self::IncorrectKeyMaterial
            | Self::MalformedPolicy
            | Self::InvalidGrantToken
            | Self::InvalidGrantId => (3, "INVALID_ARGUMENT"),
            Self::NotFound => (5, "NOT_FOUND"),
            Self::AlreadyExists => (6, "ALREADY_EXISTS"),
            Self::PermissionDenied => (7, "PERMISSION_DENIED"),
            Self::WrongState | Self::Disabled | Self::LimitReached | Self::Unsupported => {
                (9, "FAILED_PRECONDITION")
            }
            Self::Internal => (13, "INTERNAL"),
            Self::Unavailable => (14, "UNAVAILABLE"),
            Self::Unauthenticated => (16, "UNAUTHENTICATED"),
        }
    }
}

/// Shorthand used throughout the crate.
pub type Result<T, E = Error> = std::result::Result<T, E>;

impl Error {
    /// Builds an [`Error::InvalidArgument`] from anything printable.
    pub fn invalid(message: impl fmt::Display) -> Self {
        Self::InvalidArgument(message.to_string())
    }

    /// What the error means to a caller.
    pub fn kind(&self) -> ErrorKind {
        match self {
            Self::InvalidArgument(_) => ErrorKind::InvalidArgument,
            Self::InvalidCiphertext => ErrorKind::InvalidCiphertext,
            Self::KeyNotFound(_) | Self::AliasNotFound(_) => ErrorKind::NotFound,
            Self::AlreadyExists(_) => ErrorKind::AlreadyExists,
            Self::IncorrectKey => ErrorKind::IncorrectKey,
            Self::Disabled(_) => ErrorKind::Disabled,
            Self::WrongState(_) => ErrorKind::WrongState,
            Self::LimitReached(_) => ErrorKind::LimitReached,
            Self::InvalidImportToken(_) => ErrorKind::InvalidImportToken,
            Self::ExpiredImportToken(_) => ErrorKind::ExpiredImportToken,
            Self::IncorrectKeyMaterial(_) => ErrorKind::IncorrectKeyMaterial,
            Self::MalformedPolicy(_) => ErrorKind::MalformedPolicy,
            Self::InvalidGrantToken(_) => ErrorKind::InvalidGrantToken,
            Self::InvalidGrantId(_) => ErrorKind::InvalidGrantId,
            Self::Unsupported(_) => ErrorKind::Unsupported,
            Self::Unauthenticated(_) => ErrorKind::Unauthenticated,
            Self::PermissionDenied(_) => ErrorKind::PermissionDenied,
            Self::Unavailable(_) => ErrorKind::Unavailable,
            #[cfg(feature = "server")]
            Self::Pkcs11 { fault, .. } => fault.kind(),
            Self::Pkcs11Library { fault, .. } => fault.kind(),
            Self::Remote { kind, .. } => *kind,
            Self::Store(_) | Self::Config(_) | Self::Internal(_) => ErrorKind::Internal,
        }
    }

    /// The message a caller gets: the error's own, except for internal errors and device
    /// faults, whose detail stays in the log.
    pub fn public_message(&self) -> String {
        match (self.kind(), self) {
            (ErrorKind::Internal, _) => "internal error (see the daemon log)".to_owned(),
            (ErrorKind::Unavailable, Self::Unavailable(message)) => message.clone(),
            (ErrorKind::Unavailable, _) => "the key store is unavailable, retry later".to_owned(),
            _ => self.to_string(),
        }
    }
}
