//! The integration tests, one binary (linking one test binary per file dominated the suite
//! on two cores). Each module is one former test file; `common` is the harness: real `wrapd`
//! daemons on real SoftHSM tokens in temp dirs, over real sockets.
//!
//! PKCS#11 state is per process: `keystore_in_process` holds the one in-process token;
//! `faults` and `token_protection`, which need a token of their own in the test process,
//! re-run themselves in a child process of this binary ([`common::run_isolated`]).

mod common;

mod access_control;
mod architecture;
mod audit_log;
mod aws_kms_api;
#[cfg(feature = "fault-injection")]
mod cancellation;
mod cloudhsm;
mod crash_safety;
mod daemon_bench;
mod data_key_cache;
mod data_plane;
mod documentation;
mod esdk_interop;
mod esdk_vectors;
#[cfg(feature = "fault-injection")]
mod faults;
mod fleet;
mod grants;
mod grpc_clients;
mod hostile_input;
mod key_import;
mod key_lifecycle;
mod key_policies;
mod keyrings;
mod keystore_in_process;
mod kms_plugin;
mod kubernetes_manifests;
mod metrics;
mod packaging;
mod properties;
mod rewrap;
#[cfg(feature = "s3")]
mod s3_encryption;
mod startup_and_secrets;
mod token_protection;
mod tracing;
mod upgrade;
mod version_usage;
mod wrapctl_bench;
mod wrapctl_cli;
mod wrapctl_files;
mod xks;
