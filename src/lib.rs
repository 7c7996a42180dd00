//! wrapd: an HSM-rooted key daemon for envelope encryption.
//!
//! Master keys are generated inside a PKCS#11 token and never leave it; wrapd generates,
//! wraps, unwraps and re-wraps data keys for callers over gRPC. See `README.md` for running
//! it and `docs/DESIGN.md` for the contract.
//!
//! # Layout
//!
//! Requests flow one way, and a module only uses the ones below it (`tests/it/architecture.rs`
//! enforces it):
//!
//! ```text
//! server (listeners: accept loops, limits, unix peers, TLS)
//!   -> front (gRPC services, KMS v2 plugin, AWS KMS JSON API, XKS proxy API: decode, build
//!      the Call, map results and errors)
//!   -> ops (the operation layer: validation, policy, key store call, audit line; one job)
//!   -> keystore (keys, versions, aliases, states; metadata store)  ->  hsm (PKCS#11)
//! beside them: auth (identities from connection records, policy), audit (the log)
//! ```
//!
//! | module | what lives there |
//! |---|---|
//! | [`server`] | the daemon: opening the token and store, listeners (accept loops with connection caps and timeouts, unix peer identities), health, reflection, background tasks, graceful shutdown, logging |
//! | [`front`] | the front ends: `wrapd.v1.DataKeyService`, `wrapd.v1.KeyService`, the Kubernetes KMS v2 plugin (the only gRPC server code), the AWS KMS JSON API (`front::aws`: ARNs, AWS error types, requests checked against AWS's service model), the XKS proxy API for AWS KMS external key stores (`front::xks`), the SigV4 verifier both HTTPS front ends share (`front::sigv4`), and each one's error mapping |
//! | [`ops`] | the transport-neutral operation layer every front end calls: the [`ops::Call`] record, the gate (policy checks, the uncancellable job, the audit line), the data plane's worker threads, the KMS plugin's rules |
//! | [`metrics`] | What is measured and the recording calls: a leaf the audit log, ops and hsm use (the recorder, the scrape and its listener are in `server`) |
//! | [`auth`] | caller identities (the authenticator turns a connection record into an [`auth::Identity`]), the policy file, and key policies (`auth::key_policy`: parsing and evaluation) |
//! | [`audit`] | the hash-chained audit log, its group commit ([`audit::writer`]) and its verifier (the verifier is client-side too) |
//! | [`pki`] | `wrapd pki`: a small CA for mutual TLS |
//! | [`keystore`] | keys and data-key operations, one file per part (view, lifecycle, rotation, aliases, data plane, raw AES-GCM for the XKS API, import, tickets); the [`keystore::MetadataStore`] boundary and its SQLite and PostgreSQL implementations |
//! | [`hsm`] | the only PKCS#11 code: the [`hsm::Token`] trait, its cryptoki implementation, the session pool, dev token provisioning |
//! | [`blob`] | the ciphertext blob format |
//! | [`context`] | encryption context validation and canonical serialization |
//! | [`ids`] | key ids, aliases, key references |
//! | [`grant`] | grants (AWS KMS's `CreateGrant`) as data, and what one permits: kept by the keystore, consulted by the gate |
//! | [`key_import`] | key import formats shared by daemon and client: the wrapping algorithms, and wrapping material for import (client) |
//! | [`config`] | the daemon's TOML configuration |
//! | [`dev`] | `wrapd dev`: the self-contained development setup |
//! | [`hardening`] | process hardening at start-up: no core dumps, locked memory, the PIN's environment variable wiped |
//! | [`bench`](mod@bench) | `wrapd bench`: the daemon's throughput against the raw PKCS#11 rate, a bare gRPC echo and the two in series; `wrapd soak` |
//! | [`client`] | the thin client (no server dependencies): connecting to a daemon, the AWS Encryption SDK message format ([`client::message`]), keyrings ([`client::keyring`]), the data key cache ([`client::cache`]), re-wrapping stored data keys after a rotation ([`client::rewrap`]) and the census of what each version protects ([`client::census`]), the S3 Encryption Client object format (`client::s3ec`, feature `s3ec`, part of `s3`) |
//! | [`error`] | the crate's error type and its transport-neutral [`error::ErrorKind`] |
//! | [`proto`] | code generated from `proto/wrapd/v1/*.proto` |
//! | [`kms_proto`] | code generated from `proto/kms/v2/api.proto` (the Kubernetes KMS v2 plugin API, served by [`front::grpc::KmsApi`]) |
//!
//! Binaries are thin: `src/bin/wrapd.rs` (daemon) and `src/bin/wrapctl/` (CLI, one file per
//! command group).

#[cfg(feature = "client")]
pub mod audit;
pub mod blob;
pub mod context;
pub mod error;
pub mod ids;
pub mod key_import;

#[cfg(feature = "server")]
pub mod auth;
#[cfg(feature = "server")]
pub mod bench;
#[cfg(feature = "client")]
pub mod client;
#[cfg(feature = "server")]
pub mod config;
#[cfg(feature = "server")]
pub mod dev;
#[cfg(feature = "server")]
mod files;
#[cfg(feature = "server")]
pub mod front;
#[cfg(feature = "server")]
pub mod grant;
#[cfg(feature = "server")]
pub mod hardening;
#[cfg(feature = "server")]
pub mod hsm;
#[cfg(feature = "server")]
pub mod keystore;
#[cfg(feature = "server")]
pub mod metrics;
#[cfg(feature = "server")]
pub mod ops;
#[cfg(feature = "server")]
pub mod pki;
#[cfg(feature = "server")]
pub mod server;

pub use error::{Error, Result};

/// Code generated from `proto/wrapd/v1/*.proto` (package `wrapd.v1`).
#[allow(missing_docs, clippy::all)]
pub mod proto {
    tonic::include_proto!("wrapd.v1");

    /// The encoded file descriptor set of `wrapd.v1` and `v2` (KMS), for gRPC reflection.
    pub const FILE_DESCRIPTOR_SET: &[u8] =
        include_bytes!(concat!(env!("OUT_DIR"), "/wrapd_descriptor.bin"));
}

/// Code generated from `proto/kms/v2/api.proto`: the Kubernetes KMS v2 plugin API
/// (package `v2`).
#[allow(missing_docs, clippy::all)]
pub mod kms_proto {
    tonic::include_proto!("v2");
}
