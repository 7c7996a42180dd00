//! The config file as written: one `Raw*` type per section, with serde's defaults, and
//! unknown keys refused. [`super::Config::parse`] turns them into the resolved types.

use super::*;

/// The file as written.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub(super) struct RawConfig {
    pub(super) hsm: RawHsm,
    pub(super) store: RawStore,
    pub(super) unix: Option<RawUnix>,
    pub(super) tcp: Option<RawTcp>,
    pub(super) policy: Option<RawPolicyRef>,
    pub(super) audit: Option<RawAudit>,
    pub(super) kms: Option<RawKms>,
    pub(super) aws: Option<RawAws>,
    pub(super) xks: Option<RawXks>,
    pub(super) metrics: Option<RawMetrics>,
    pub(super) tracing: Option<RawTracing>,
    #[serde(default)]
    pub(super) keys: RawKeys,
    #[serde(default)]
    pub(super) log: RawLog,
    #[serde(default)]
    pub(super) limits: RawLimits,
    #[serde(default)]
    pub(super) process: ProcessConfig,
}

/// `[process]`: how the daemon treats its own process.
#[derive(Debug, Clone, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ProcessConfig {
    /// `wrapd serve` refuses to run as root unless this is true (`wrapd dev` only warns).
    #[serde(default)]
    pub allow_root: bool,
    /// Lock memory so secrets never reach swap (see [`crate::hardening`]).
    #[serde(default)]
    pub lock_memory: LockMemory,
}

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub(super) struct RawLimits {
    pub(super) max_connections: Option<usize>,
    pub(super) handshake_timeout_ms: Option<u64>,
    pub(super) idle_timeout_ms: Option<u64>,
    pub(super) max_concurrent_streams: Option<u32>,
    pub(super) tcp_keepalive_secs: Option<u64>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub(super) struct RawHsm {
    pub(super) module: PathBuf,
    pub(super) token_label: String,
    pub(super) pin_file: Option<PathBuf>,
    pub(super) pin_env: Option<String>,
    pub(super) profile: HsmProfile,
    /// Default: [`HsmProfile::default_max_sessions`].
    pub(super) max_sessions: Option<usize>,
    #[serde(default = "default_session_wait_ms")]
    pub(super) session_wait_ms: u64,
    /// Default: [`HsmProfile::default_session_keepalive_ms`].
    pub(super) session_keepalive_ms: Option<u64>,
    pub(super) softhsm2_conf: Option<PathBuf>,
}

pub(super) fn default_session_wait_ms() -> u64 {
    5_000
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub(super) struct RawStore {
    pub(super) sqlite: Option<PathBuf>,
    pub(super) postgres: Option<String>,
    pub(super) password_file: Option<PathBuf>,
    pub(super) password_env: Option<String>,
    pub(super) instance: Option<String>,
    pub(super) instance_env: Option<String>,
    pub(super) resync_interval_ms: Option<u64>,
    pub(super) max_staleness_ms: Option<u64>,
    pub(super) tls_ca_file: Option<PathBuf>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub(super) struct RawUnix {
    pub(super) path: PathBuf,
    #[serde(default = "default_socket_mode")]
    pub(super) mode: String,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub(super) struct RawTcp {
    pub(super) listen: String,
    pub(super) cert: PathBuf,
    pub(super) key: PathBuf,
    pub(super) client_ca: PathBuf,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub(super) struct RawPolicyRef {
    pub(super) file: PathBuf,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub(super) struct RawAudit {
    pub(super) file: PathBuf,
    #[serde(default)]
    pub(super) fsync: FsyncPolicy,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub(super) struct RawKms {
    pub(super) path: PathBuf,
    #[serde(default = "default_socket_mode")]
    pub(super) mode: String,
    pub(super) key: String,
    pub(super) principal: String,
    #[serde(default = "default_healthz_cache_ms")]
    pub(super) healthz_cache_ms: u64,
    #[serde(default)]
    pub(super) bind_principal: bool,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub(super) struct RawMetrics {
    #[serde(default = "default_metrics_listen")]
    pub(super) listen: String,
    pub(super) per_key_series: Option<bool>,
}

pub(super) fn default_metrics_listen() -> String {
    "127.0.0.1:9464".to_owned()
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub(super) struct RawTracing {
    pub(super) otlp_endpoint: String,
    pub(super) service_name: Option<String>,
    pub(super) sample_ratio: Option<f64>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub(super) struct RawAws {
    pub(super) listen: String,
    pub(super) cert: PathBuf,
    pub(super) key: PathBuf,
    pub(super) region: String,
    #[serde(default)]
    pub(super) regions: Vec<String>,
    pub(super) account: String,
    #[serde(default, rename = "access_key")]
    pub(super) access_keys: Vec<RawAccessKey>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub(super) struct RawAccessKey {
    pub(super) id: String,
    pub(super) secret_file: Option<PathBuf>,
    pub(super) secret_env: Option<String>,
    pub(super) principal: Option<String>,
    pub(super) arn: Option<String>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub(super) struct RawXks {
    pub(super) listen: String,
    pub(super) cert: PathBuf,
    pub(super) key: PathBuf,
    pub(super) client_ca: Option<PathBuf>,
    pub(super) client_subject: Option<String>,
    #[serde(default, rename = "keystore")]
    pub(super) keystores: Vec<RawXksKeystore>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub(super) struct RawXksKeystore {
    #[serde(default)]
    pub(super) uri_prefix: String,
    pub(super) region: String,
    pub(super) principal: Option<String>,
    pub(super) requests_per_second: Option<u32>,
    #[serde(default, rename = "credential")]
    pub(super) credentials: Vec<RawXksCredential>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub(super) struct RawXksCredential {
    pub(super) id: String,
    pub(super) secret_file: Option<PathBuf>,
    pub(super) secret_env: Option<String>,
}

pub(super) fn default_healthz_cache_ms() -> u64 {
    10_000
}

pub(super) fn default_socket_mode() -> String {
    "0600".to_owned()
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub(super) struct RawKeys {
    #[serde(default = "default_max_wraps")]
    pub(super) max_wraps_per_version: u64,
    #[serde(default = "default_deletion_check_secs")]
    pub(super) deletion_check_interval_secs: u64,
    #[serde(default)]
    pub(super) retirement: Vec<RawRetirement>,
}

impl Default for RawKeys {
    fn default() -> Self {
        Self {
            max_wraps_per_version: default_max_wraps(),
            deletion_check_interval_secs: default_deletion_check_secs(),
            retirement: Vec::new(),
        }
    }
}

/// `[[keys.retirement]]`: a key whose unused versions are retired automatically.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub(super) struct RawRetirement {
    pub(super) key: String,
    pub(super) retire_unused_after_days: u32,
}

pub(super) fn default_max_wraps() -> u64 {
    KeystoreConfig::default().max_wraps_per_version
}

pub(super) fn default_deletion_check_secs() -> u64 {
    300
}

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub(super) struct RawLog {
    pub(super) filter: Option<String>,
    #[serde(default)]
    pub(super) format: LogFormat,
}
