//! `wrapctl`'s error is the client library's ([`wrapd::client::ClientError`]): a message
//! and what kind of failure it is, which decides the exit code.
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

use std::process::ExitCode;

pub use wrapd::client::{ClientError as CliError, Failure};

/// The process exit code of a failure.
pub fn exit_code(err: &CliError) -> ExitCode {
    ExitCode::from(match err.failure {
        Failure::Other => 1,
        Failure::Usage => 2,
        Failure::NotFound => 3,
        Failure::Denied => 4,
        Failure::Invalid => 5,
        Failure::Unavailable => 6,
        Failure::WrongState => 7,
    })
}
