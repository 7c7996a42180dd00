//! The daemon's TOML configuration: parsed, validated and resolved once at start-up.
//!
//! Relative paths are relative to the config file's directory. The PIN is never inline:
//! it comes from a file (`pin_file`, which should be mode 0600) or an environment variable
//! (`pin_env`), and is held in a zeroizing [`Pin`]. See `softhsm-config/*.toml` for
//! commented examples.

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::time::Duration;

use serde::Deserialize;
use zeroize::Zeroizing;

use crate::audit::{FsyncPolicy, GapPolicy};
use crate::error::{Error, Result};
use crate::hardening::LockMemory;
use crate::hsm::{HsmConfig, HsmProfile, Pin};
use crate::ids::KeyRef;
use crate::keystore::KeystoreConfig;

/// The file as written.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawConfig {
    hsm: RawHsm,
    store: RawStore,
    unix: Option<RawUnix>,
    tcp: Option<RawTcp>,
    policy: Option<RawPolicyRef>,
    audit: Option<RawAudit>,
    kms: Option<RawKms>,
    aws: Option<RawAws>,
    metrics: Option<RawMetrics>,
    tracing: Option<RawTracing>,
    #[serde(default)]
    keys: RawKeys,
    #[serde(default)]
    log: RawLog,
    #[serde(default)]
    limits: RawLimits,
    #[serde(default)]
    process: ProcessConfig,
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
struct RawLimits {
    max_connections: Option<usize>,
    handshake_timeout_ms: Option<u64>,
    idle_timeout_ms: Option<u64>,
    max_concurrent_streams: Option<u32>,
    tcp_keepalive_secs: Option<u64>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawHsm {
    module: PathBuf,
    token_label: String,
    pin_file: Option<PathBuf>,
    pin_env: Option<String>,
    profile: HsmProfile,
    #[serde(default = "default_max_sessions")]
    max_sessions: usize,
    #[serde(default = "default_session_wait_ms")]
    session_wait_ms: u64,
    softhsm2_conf: Option<PathBuf>,
}

fn default_max_sessions() -> usize {
    8
}

fn default_session_wait_ms() -> u64 {
    5_000
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawStore {
    sqlite: Option<PathBuf>,
    postgres: Option<String>,
    password_file: Option<PathBuf>,
    password_env: Option<String>,
    instance: Option<String>,
    instance_env: Option<String>,
    resync_interval_ms: Option<u64>,
    max_staleness_ms: Option<u64>,
    tls_ca_file: Option<PathBuf>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawUnix {
    path: PathBuf,
    #[serde(default = "default_socket_mode")]
    mode: String,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawTcp {
    listen: String,
    cert: PathBuf,
    key: PathBuf,
    client_ca: PathBuf,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawPolicyRef {
    file: PathBuf,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawAudit {
    file: PathBuf,
    #[serde(default)]
    fsync: FsyncPolicy,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawKms {
    path: PathBuf,
    #[serde(default = "default_socket_mode")]
    mode: String,
    key: String,
    principal: String,
    #[serde(default = "default_healthz_cache_ms")]
    healthz_cache_ms: u64,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawMetrics {
    #[serde(default = "default_metrics_listen")]
    listen: String,
    per_key_series: Option<bool>,
}

fn default_metrics_listen() -> String {
    "127.0.0.1:9464".to_owned()
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawTracing {
    otlp_endpoint: String,
    service_name: Option<String>,
    sample_ratio: Option<f64>,
}

/// `[tracing]`: OpenTelemetry export of one span per request.
#[derive(Debug, Clone)]
pub struct TracingConfig {
    /// The OTLP/gRPC collector, `http://HOST:4317` (usually an agent or collector on the
    /// same host).
    pub otlp_endpoint: String,
    /// `service.name` of the spans (default `wrapd`).
    pub service_name: String,
    /// Share of requests traced, 0.0 to 1.0 (default 1.0).
    pub sample_ratio: f64,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawAws {
    listen: String,
    cert: PathBuf,
    key: PathBuf,
    region: String,
    account: String,
    #[serde(default, rename = "access_key")]
    access_keys: Vec<RawAccessKey>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawAccessKey {
    id: String,
    secret_file: Option<PathBuf>,
    secret_env: Option<String>,
    principal: Option<String>,
}

/// `[limits]`, each within a sane range (defaults: [`Limits::default`]).
fn limits(raw: &RawLimits) -> Result<Limits> {
    let defaults = Limits::default();
    let ranged =
        |name: &str, value: Option<u64>, default: u64, range: std::ops::RangeInclusive<u64>| {
            let value = value.unwrap_or(default);
            if range.contains(&value) {
                Ok(value)
            } else {
                Err(Error::Config(format!(
                    "limits.{name} must be {} to {}",
                    range.start(),
                    range.end()
                )))
            }
        };
    Ok(Limits {
        max_connections: ranged(
            "max_connections",
            raw.max_connections.map(|v| v as u64),
            defaults.max_connections as u64,
            1..=1_000_000,
        )? as usize,
        handshake_timeout: Duration::from_millis(ranged(
            "handshake_timeout_ms",
            raw.handshake_timeout_ms,
            defaults.handshake_timeout.as_millis() as u64,
            100..=300_000,
        )?),
        idle_timeout: Duration::from_millis(ranged(
            "idle_timeout_ms",
            raw.idle_timeout_ms,
            defaults.idle_timeout.as_millis() as u64,
            100..=86_400_000,
        )?),
        max_concurrent_streams: ranged(
            "max_concurrent_streams",
            raw.max_concurrent_streams.map(u64::from),
            u64::from(defaults.max_concurrent_streams),
            1..=10_000,
        )? as u32,
        tcp_keepalive: Duration::from_secs(ranged(
            "tcp_keepalive_secs",
            raw.tcp_keepalive_secs,
            defaults.tcp_keepalive.as_secs(),
            1..=7_200,
        )?),
    })
}

fn default_healthz_cache_ms() -> u64 {
    10_000
}

fn default_socket_mode() -> String {
    "0600".to_owned()
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawKeys {
    #[serde(default = "default_max_wraps")]
    max_wraps_per_version: u64,
    #[serde(default = "default_deletion_check_secs")]
    deletion_check_interval_secs: u64,
}

impl Default for RawKeys {
    fn default() -> Self {
        Self {
            max_wraps_per_version: default_max_wraps(),
            deletion_check_interval_secs: default_deletion_check_secs(),
        }
    }
}

fn default_max_wraps() -> u64 {
    KeystoreConfig::default().max_wraps_per_version
}

fn default_deletion_check_secs() -> u64 {
    300
}

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawLog {
    filter: Option<String>,
    #[serde(default)]
    format: LogFormat,
}

/// How log lines are written (to stderr).
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum LogFormat {
    /// Human-readable lines.
    #[default]
    Text,
    /// One JSON object per line.
    Json,
}

/// Limits applied to every listener (`[limits]` in the config).
#[derive(Debug, Clone)]
pub struct Limits {
    /// Most open connections per listener.
    pub max_connections: usize,
    /// Longest a TLS handshake may take.
    pub handshake_timeout: Duration,
    /// A connection with no traffic for this long is closed.
    pub idle_timeout: Duration,
    /// Most concurrent HTTP/2 streams (calls) per connection.
    pub max_concurrent_streams: u32,
    /// TCP keepalive idle time (dead peers are found after it plus a few probes).
    pub tcp_keepalive: Duration,
}

impl Default for Limits {
    fn default() -> Self {
        Self {
            max_connections: 1024,
            handshake_timeout: Duration::from_secs(10),
            idle_timeout: Duration::from_secs(300),
            max_concurrent_streams: 128,
            tcp_keepalive: Duration::from_secs(60),
        }
    }
}

/// The unix socket listener.
#[derive(Debug, Clone)]
pub struct UnixListenerConfig {
    /// Socket path.
    pub path: PathBuf,
    /// File mode set on the socket after binding.
    pub mode: u32,
}

/// The TCP listener: mutual TLS, always.
#[derive(Debug, Clone)]
pub struct TcpListenerConfig {
    /// Address to bind (port 0 picks a free port, reported in the ready line).
    pub listen: SocketAddr,
    /// Server certificate chain (PEM).
    pub cert: PathBuf,
    /// Server private key (PEM).
    pub key: PathBuf,
    /// CA certificates that client certificates must chain to (PEM).
    pub client_ca: PathBuf,
}

/// The audit log.
#[derive(Debug, Clone)]
pub struct AuditConfig {
    /// The JSON-lines file.
    pub file: PathBuf,
    /// When lines reach the disk.
    pub fsync: FsyncPolicy,
    /// What to do when the log does not reach the head recorded in the metadata store (not
    /// in the file: set by `--accept-audit-gap`).
    pub gaps: GapPolicy,
}

/// The Kubernetes KMS v2 plugin endpoint.
#[derive(Debug, Clone)]
pub struct KmsConfig {
    /// Its own unix socket.
    pub socket: UnixListenerConfig,
    /// The wrapd key (id or alias) that wraps the apiserver's DEKs.
    pub key: KeyRef,
    /// The policy principal the plugin acts as.
    pub principal: String,
    /// How long a successful (or failed) token round trip answers Status.
    pub healthz_cache: Duration,
}

/// The metadata store (`[store]`): an SQLite file for one daemon, or PostgreSQL for a fleet.
#[derive(Debug, Clone)]
pub enum StoreConfig {
    /// `sqlite = "path"`.
    Sqlite(PathBuf),
    /// `postgres = "postgresql://user@host:port/db"`.
    Postgres {
        /// Where, who, and this daemon's instance name.
        options: crate::keystore::PostgresOptions,
        /// How often the in-memory view is re-read in full, besides notifications.
        resync_interval: Duration,
        /// How long the data plane serves from the view while the database is unreachable.
        max_staleness: Duration,
    },
}

impl StoreConfig {
    /// This daemon's instance name in a fleet (`None` for SQLite).
    pub fn instance(&self) -> Option<&str> {
        match self {
            Self::Sqlite(_) => None,
            Self::Postgres { options, .. } => Some(&options.instance),
        }
    }
}

/// `[store]`: exactly one backend; the PostgreSQL password from a file or an environment
/// variable.
fn store_config(
    raw: RawStore,
    resolve: &dyn Fn(&Path) -> PathBuf,
    secret_envs: &mut Vec<String>,
) -> Result<StoreConfig> {
    match (raw.sqlite, raw.postgres) {
        (Some(path), None) => {
            let fleet_only = raw.password_file.is_some()
                || raw.password_env.is_some()
                || raw.instance.is_some()
                || raw.instance_env.is_some()
                || raw.resync_interval_ms.is_some()
                || raw.max_staleness_ms.is_some()
                || raw.tls_ca_file.is_some();
            if fleet_only {
                return Err(Error::Config(
                    "store: password_file, password_env, instance, instance_env, resync_interval_ms, max_staleness_ms and tls_ca_file are for postgres".into(),
                ));
            }
            Ok(StoreConfig::Sqlite(resolve(&path)))
        }
        (None, Some(url)) => {
            let password = match (&raw.password_file, &raw.password_env) {
                (Some(file), None) => {
                    let path = resolve(file);
                    let text = read_secret_file(&path, "store.password_file")?;
                    Some(Zeroizing::new(
                        text.trim_end_matches(['\n', '\r']).to_owned(),
                    ))
                }
                (None, Some(var)) => {
                    let value = std::env::var(var).map_err(|_| {
                        Error::Config(format!("store.password_env: {var} is not set"))
                    })?;
                    secret_envs.push(var.clone());
                    Some(Zeroizing::new(value))
                }
                (None, None) => None,
                _ => {
                    return Err(Error::Config(
                        "store: set at most one of password_file and password_env".into(),
                    ));
                }
            };
            // The name from the config, from an environment variable (in Kubernetes, the
            // downward API's node or pod name), or the host's.
            let (instance, from) = match (raw.instance, raw.instance_env) {
                (Some(name), None) => (name, "store.instance".to_owned()),
                (None, Some(var)) => {
                    let name = std::env::var(&var).map_err(|_| {
                        Error::Config(format!("store.instance_env: {var} is not set"))
                    })?;
                    (name, format!("store.instance_env ({var})"))
                }
                (None, None) => (
                    nix::unistd::gethostname()
                        .ok()
                        .and_then(|h| h.into_string().ok())
                        .unwrap_or_else(|| "wrapd".to_owned()),
                    "the host name (store.instance unset)".to_owned(),
                ),
                (Some(_), Some(_)) => {
                    return Err(Error::Config(
                        "store: set at most one of instance and instance_env".into(),
                    ));
                }
            };
            // 253: a Kubernetes node name (a DNS subdomain) fits.
            let instance_ok = !instance.is_empty()
                && instance.len() <= 253
                && instance
                    .bytes()
                    .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'-' | b'_' | b'.'));
            if !instance_ok {
                return Err(Error::Config(format!(
                    "{from} {instance:?} must be 1 to 253 of A-Z a-z 0-9 - _ ."
                )));
            }
            let resync_ms = raw.resync_interval_ms.unwrap_or(10_000);
            if !(100..=3_600_000).contains(&resync_ms) {
                return Err(Error::Config(
                    "store.resync_interval_ms must be 100 to 3600000".into(),
                ));
            }
            let staleness_ms = raw.max_staleness_ms.unwrap_or(60_000);
            if !(1_000..=86_400_000).contains(&staleness_ms) {
                return Err(Error::Config(
                    "store.max_staleness_ms must be 1000 to 86400000".into(),
                ));
            }
            Ok(StoreConfig::Postgres {
                options: crate::keystore::PostgresOptions {
                    url,
                    password,
                    instance,
                    tls_ca: raw
                        .tls_ca_file
                        .map(|file| {
                            let path = resolve(&file);
                            std::fs::read(&path).map_err(|e| {
                                Error::Config(format!("store.tls_ca_file {}: {e}", path.display()))
                            })
                        })
                        .transpose()?,
                },
                resync_interval: Duration::from_millis(resync_ms),
                max_staleness: Duration::from_millis(staleness_ms),
            })
        }
        _ => Err(Error::Config(
            "store: set exactly one of sqlite = \"path\" and postgres = \"postgresql://…\"".into(),
        )),
    }
}

/// The AWS KMS-compatible JSON API (`[aws]`): HTTPS, SigV4 access keys.
#[derive(Debug, Clone)]
pub struct AwsConfig {
    /// Address to bind (port 0 picks a free port, reported in the ready line).
    pub listen: SocketAddr,
    /// Server certificate chain (PEM).
    pub cert: PathBuf,
    /// Server private key (PEM).
    pub key: PathBuf,
    /// The region in ARNs and in the SigV4 credential scope.
    pub region: String,
    /// The 12-digit account id in ARNs.
    pub account: String,
    /// The access keys requests may be signed with.
    pub access_keys: Vec<AwsAccessKey>,
}

/// One access key of the AWS KMS API (`[[aws.access_key]]`).
#[derive(Clone)]
pub struct AwsAccessKey {
    /// The access key id (`AKIA…`), 16 to 128 of A-Z a-z 0-9.
    pub id: String,
    /// The secret access key; never logged.
    pub secret: Zeroizing<String>,
    /// The principal requests signed with it act as (besides `aws:access-key=ID`).
    pub principal: Option<String>,
}

impl std::fmt::Debug for AwsAccessKey {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("AwsAccessKey")
            .field("id", &self.id)
            .field("secret", &"<redacted>")
            .field("principal", &self.principal)
            .finish()
    }
}

/// The validated configuration.
#[derive(Debug)]
pub struct Config {
    /// PKCS#11 settings, PIN loaded.
    pub hsm: HsmConfig,
    /// Exported as `SOFTHSM2_CONF` before the module loads (SoftHSM only).
    pub softhsm2_conf: Option<PathBuf>,
    /// The metadata store.
    pub store: StoreConfig,
    /// The unix socket listener.
    pub unix: Option<UnixListenerConfig>,
    /// The TCP listener (mutual TLS).
    pub tcp: Option<TcpListenerConfig>,
    /// The policy file; `None` denies everything.
    pub policy_file: Option<PathBuf>,
    /// The audit log; `None` disables auditing (a warning at start-up).
    pub audit: Option<AuditConfig>,
    /// The Kubernetes KMS v2 plugin endpoint.
    pub kms: Option<KmsConfig>,
    /// The AWS KMS-compatible JSON API.
    pub aws: Option<AwsConfig>,
    /// Prometheus metrics (`[metrics]`, plain HTTP, no authentication).
    pub metrics: Option<MetricsConfig>,
    /// OpenTelemetry span export (`[tracing]`); `None`: no spans leave the daemon.
    pub tracing: Option<TracingConfig>,
    /// Environment variables secrets were read from (PIN, access key secrets): the daemon
    /// wipes them from its environment once read.
    pub secret_envs: Vec<String>,
    /// The files secrets were read from (PIN, database password, access key secrets), each
    /// with the config key that names it.
    pub secret_files: Vec<(String, PathBuf)>,
    /// Key store settings.
    pub keystore: KeystoreConfig,
    /// How often due deletions are carried out.
    pub deletion_check_interval: Duration,
    /// Log filter (`RUST_LOG` syntax); `RUST_LOG` wins when set.
    pub log_filter: String,
    /// Log line format.
    pub log_format: LogFormat,
    /// Connection limits of every listener.
    pub limits: Limits,
    /// Process settings (root, memory locking).
    pub process: ProcessConfig,
    /// The environment variable the PIN came from, if any: the daemon wipes it from its
    /// environment once read.
    pub pin_env: Option<String>,
}

impl Config {
    /// A warning for each secret file group or others can read (the daemon logs them once
    /// logging has started; the PIN file, the database password and the access keys'
    /// secrets get the same check).
    pub fn shared_secret_files(&self) -> Vec<String> {
        use std::os::unix::fs::PermissionsExt;
        self.secret_files
            .iter()
            .filter(|(_, path)| {
                std::fs::metadata(path).is_ok_and(|meta| meta.permissions().mode() & 0o077 != 0)
            })
            .map(|(what, path)| {
                format!(
                    "{what} {} is readable by group or others; chmod 600 it",
                    path.display()
                )
            })
            .collect()
    }

    /// Checks the names and types of the keys in config text, which may be a fragment (a
    /// missing `[hsm]` or `[store]` section is filled in), without reading any file it
    /// names: how the documentation's config snippets are kept true to the code.
    pub fn check_keys(text: &str) -> Result<()> {
        let mut table: toml::Table =
            toml::from_str(text).map_err(|e| Error::Config(e.message().replace('\n', " ")))?;
        let placeholder = |text: &str| toml::from_str::<toml::Table>(text).map(toml::Value::Table);
        if !table.contains_key("hsm") {
            let hsm = "module = \"m\"\ntoken_label = \"t\"\nprofile = \"softhsm\"";
            table.insert(
                "hsm".into(),
                placeholder(hsm).map_err(|e| Error::Internal(e.to_string()))?,
            );
        }
        if !table.contains_key("store") {
            table.insert("store".into(), toml::Value::Table(toml::Table::new()));
        }
        RawConfig::deserialize(table)
            .map(|_| ())
            .map_err(|e| Error::Config(e.message().replace('\n', " ")))
    }

    /// Reads and validates a config file.
    pub fn load(path: &Path) -> Result<Self> {
        let text = std::fs::read_to_string(path)
            .map_err(|e| Error::Config(format!("cannot read {}: {e}", path.display())))?;
        let base = path.parent().unwrap_or(Path::new("."));
        Self::parse(&text, base)
            .map_err(|e| Error::Config(format!("{}: {}", path.display(), e.detail())))
    }

    /// Parses config text; relative paths are resolved against `base`.
    pub fn parse(text: &str, base: &Path) -> Result<Self> {
        let raw: RawConfig = toml::from_str(text).map_err(|e| {
            // One line: "line N: message" (toml's own rendering spans several lines).
            let line = e.span().map(|span| {
                text.as_bytes()[..span.start.min(text.len())]
                    .iter()
                    .filter(|b| **b == b'\n')
                    .count()
                    + 1
            });
            let message = e.message().replace('\n', " ");
            Error::Config(match line {
                Some(line) => format!("line {line}: {message}"),
                None => message,
            })
        })?;
        let resolve = |p: &Path| {
            if p.is_absolute() {
                p.to_owned()
            } else {
                base.join(p)
            }
        };

        let pin = match (&raw.hsm.pin_file, &raw.hsm.pin_env) {
            (Some(file), None) => read_pin_file(&resolve(file))?,
            (None, Some(var)) => {
                let value = Zeroizing::new(std::env::var(var).map_err(|_| {
                    Error::Config(format!(
                        "hsm.pin_env: environment variable {var} is not set"
                    ))
                })?);
                Pin::new(&value)
            }
            _ => {
                return Err(Error::Config(
                    "hsm: set exactly one of pin_file and pin_env (the PIN is never inline)".into(),
                ));
            }
        };
        if raw.hsm.token_label.is_empty() || raw.hsm.token_label.len() > 32 {
            return Err(Error::Config(
                "hsm.token_label must be 1 to 32 bytes".into(),
            ));
        }
        if !(1..=1024).contains(&raw.hsm.max_sessions) {
            return Err(Error::Config("hsm.max_sessions must be 1 to 1024".into()));
        }
        if raw.keys.max_wraps_per_version == 0 || raw.keys.max_wraps_per_version > 1 << 32 {
            return Err(Error::Config(
                "keys.max_wraps_per_version must be 1 to 2^32 (random GCM IVs)".into(),
            ));
        }
        if raw.keys.deletion_check_interval_secs == 0 {
            return Err(Error::Config(
                "keys.deletion_check_interval_secs must be at least 1".into(),
            ));
        }
        let unix = raw
            .unix
            .map(|u| {
                Ok::<_, Error>(UnixListenerConfig {
                    path: resolve(&u.path),
                    mode: parse_mode("unix.mode", &u.mode)?,
                })
            })
            .transpose()?;
        let kms = raw
            .kms
            .map(|k| {
                // An internal principal: no socket peer or certificate can take one.
                if k.principal.len() <= "wrapd:".len() || !k.principal.starts_with("wrapd:") {
                    return Err(Error::Config(format!(
                        "kms.principal {:?} must be an internal principal, wrapd:NAME (e.g. \"wrapd:kubernetes-kms\")",
                        k.principal
                    )));
                }
                Ok::<_, Error>(KmsConfig {
                    socket: UnixListenerConfig {
                        path: resolve(&k.path),
                        mode: parse_mode("kms.mode", &k.mode)?,
                    },
                    key: KeyRef::parse(&k.key)
                        .map_err(|e| Error::Config(format!("kms.key: {e}")))?,
                    principal: k.principal,
                    healthz_cache: Duration::from_millis(k.healthz_cache_ms),
                })
            })
            .transpose()?;
        let tcp = raw
            .tcp
            .map(|t| {
                Ok::<_, Error>(TcpListenerConfig {
                    listen: t.listen.parse().map_err(|_| {
                        Error::Config(format!(
                            "tcp.listen {:?} is not an address like 127.0.0.1:8443",
                            t.listen
                        ))
                    })?,
                    cert: resolve(&t.cert),
                    key: resolve(&t.key),
                    client_ca: resolve(&t.client_ca),
                })
            })
            .transpose()?;
        let mut secret_files = Vec::new();
        if let Some(file) = &raw.hsm.pin_file {
            secret_files.push(("hsm.pin_file".to_owned(), resolve(file)));
        }
        if let Some(file) = &raw.store.password_file {
            secret_files.push(("store.password_file".to_owned(), resolve(file)));
        }
        for (i, key) in raw
            .aws
            .iter()
            .flat_map(|a| a.access_keys.iter())
            .enumerate()
        {
            if let Some(file) = &key.secret_file {
                let at = format!("aws.access_key[{}].secret_file", i + 1);
                secret_files.push((at, resolve(file)));
            }
        }
        let mut secret_envs: Vec<String> = raw.hsm.pin_env.iter().cloned().collect();
        let aws = raw
            .aws
            .map(|a| aws_config(a, &resolve, &mut secret_envs))
            .transpose()?;
        let store = store_config(raw.store, &resolve, &mut secret_envs)?;
        let max_view_staleness = match &store {
            StoreConfig::Postgres { max_staleness, .. } => Some(*max_staleness),
            StoreConfig::Sqlite(_) => None,
        };
        if unix.is_none() && tcp.is_none() {
            return Err(Error::Config(
                "no listener configured: add a [unix] or [tcp] section".into(),
            ));
        }
        Ok(Self {
            hsm: HsmConfig {
                module: resolve(&raw.hsm.module),
                token_label: raw.hsm.token_label,
                pin,
                profile: raw.hsm.profile,
                max_sessions: raw.hsm.max_sessions,
                session_wait: Duration::from_millis(raw.hsm.session_wait_ms),
                reset_on_missing_object: max_view_staleness.is_none(),
            },
            softhsm2_conf: raw.hsm.softhsm2_conf.as_deref().map(resolve),
            store,
            unix,
            tcp,
            policy_file: raw.policy.map(|p| resolve(&p.file)),
            kms,
            aws,
            metrics: raw.metrics.map(metrics_config).transpose()?,
            tracing: raw.tracing.map(tracing_config).transpose()?,
            secret_envs,
            secret_files,
            audit: raw.audit.map(|a| AuditConfig {
                file: resolve(&a.file),
                fsync: a.fsync,
                gaps: GapPolicy::Refuse,
            }),
            limits: limits(&raw.limits)?,
            process: raw.process,
            pin_env: raw.hsm.pin_env,
            keystore: KeystoreConfig {
                max_wraps_per_version: raw.keys.max_wraps_per_version,
                adopt_unknown_versions: false,
                max_view_staleness,
            },
            deletion_check_interval: Duration::from_secs(raw.keys.deletion_check_interval_secs),
            log_filter: raw.log.filter.unwrap_or_else(|| "info".to_owned()),
            log_format: raw.log.format,
        })
    }
}

/// `[aws]`: addresses, names and access keys checked, secrets read.
fn aws_config(
    raw: RawAws,
    resolve: &dyn Fn(&Path) -> PathBuf,
    secret_envs: &mut Vec<String>,
) -> Result<AwsConfig> {
    let listen = raw.listen.parse().map_err(|_| {
        Error::Config(format!(
            "aws.listen {:?} is not an address like 127.0.0.1:4443",
            raw.listen
        ))
    })?;
    let region_ok = !raw.region.is_empty()
        && raw.region.len() <= 32
        && raw
            .region
            .bytes()
            .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'-');
    if !region_ok {
        return Err(Error::Config(format!(
            "aws.region {:?} is not a region name like us-east-1",
            raw.region
        )));
    }
    if raw.account.len() != 12 || !raw.account.bytes().all(|b| b.is_ascii_digit()) {
        return Err(Error::Config(format!(
            "aws.account {:?} must be 12 digits",
            raw.account
        )));
    }
    let mut access_keys: Vec<AwsAccessKey> = Vec::new();
    for (i, key) in raw.access_keys.into_iter().enumerate() {
        let at = format!("aws.access_key[{}]", i + 1);
        let id_ok =
            (16..=128).contains(&key.id.len()) && key.id.bytes().all(|b| b.is_ascii_alphanumeric());
        if !id_ok {
            return Err(Error::Config(format!(
                "{at}.id {:?} must be 16 to 128 of A-Z a-z 0-9",
                key.id
            )));
        }
        if access_keys.iter().any(|k| k.id == key.id) {
            return Err(Error::Config(format!(
                "{at}.id {:?} is listed twice",
                key.id
            )));
        }
        let secret = match (&key.secret_file, &key.secret_env) {
            (Some(file), None) => {
                let path = resolve(file);
                let text = read_secret_file(&path, &format!("{at}.secret_file"))?;
                Zeroizing::new(text.trim().to_owned())
            }
            (None, Some(var)) => {
                let value =
                    Zeroizing::new(std::env::var(var).map_err(|_| {
                        Error::Config(format!("{at}.secret_env: {var} is not set"))
                    })?);
                secret_envs.push(var.clone());
                Zeroizing::new(value.trim().to_owned())
            }
            _ => {
                return Err(Error::Config(format!(
                    "{at}: set exactly one of secret_file and secret_env (secrets are never inline)"
                )));
            }
        };
        // AWS secret access keys are 40 characters, and the SigV4 verifier takes exactly 40.
        if secret.len() != 40 || !secret.bytes().all(|b| b.is_ascii_graphic()) {
            return Err(Error::Config(format!(
                "{at}: the secret must be 40 printable ASCII characters, as AWS secret access keys are"
            )));
        }
        if let Some(principal) = &key.principal {
            let namespaced = ["unix:", "tls:", "aws:"]
                .iter()
                .any(|ns| principal.len() > ns.len() && principal.starts_with(ns));
            if !namespaced {
                return Err(Error::Config(format!(
                    "{at}.principal {principal:?} must be a unix:, tls: or aws: principal (wrapd: principals are the daemon's own)"
                )));
            }
        }
        access_keys.push(AwsAccessKey {
            id: key.id,
            secret,
            principal: key.principal,
        });
    }
    Ok(AwsConfig {
        listen,
        cert: resolve(&raw.cert),
        key: resolve(&raw.key),
        region: raw.region,
        account: raw.account,
        access_keys,
    })
}

fn parse_mode(field: &str, mode: &str) -> Result<u32> {
    u32::from_str_radix(mode.trim_start_matches("0o"), 8)
        .ok()
        .filter(|m| *m <= 0o777)
        .ok_or_else(|| Error::Config(format!("{field} {mode:?} is not an octal file mode")))
}

impl Error {
    fn detail(&self) -> String {
        match self {
            Error::Config(detail) => detail.clone(),
            other => other.to_string(),
        }
    }
}

fn read_pin_file(path: &Path) -> Result<Pin> {
    let bytes = Zeroizing::new(
        std::fs::read(path)
            .map_err(|e| Error::Config(format!("cannot read PIN file {}: {e}", path.display())))?,
    );
    let text = std::str::from_utf8(&bytes)
        .map_err(|_| Error::Config(format!("PIN file {} is not UTF-8", path.display())))?;
    let pin = Pin::new(text);
    if pin.expose().is_empty() {
        return Err(Error::Config(format!(
            "PIN file {} is empty",
            path.display()
        )));
    }
    Ok(pin)
}

/// A file holding a secret (a password, an access key's secret), read into a zeroizing
/// string; `what` names it in errors. Its mode is checked by
/// [`Config::shared_secret_files`], like every secret file's.
fn read_secret_file(path: &Path, what: &str) -> Result<Zeroizing<String>> {
    Ok(Zeroizing::new(std::fs::read_to_string(path).map_err(
        |e| Error::Config(format!("{what}: cannot read {}: {e}", path.display())),
    )?))
}

/// Prometheus metrics (`[metrics]`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct MetricsConfig {
    /// Where they are served (`listen`, default `127.0.0.1:9464`).
    pub listen: SocketAddr,
    /// Whether the per-key series (`wrapd_key_wrap_share{key_id}`) are served. They name
    /// every key to whoever can scrape, so they default to on only on a loopback address.
    pub per_key_series: bool,
}

fn metrics_config(raw: RawMetrics) -> Result<MetricsConfig> {
    let listen: SocketAddr = raw.listen.parse().map_err(|_| {
        Error::Config(format!(
            "metrics.listen {:?} is not an address like 127.0.0.1:9464",
            raw.listen
        ))
    })?;
    Ok(MetricsConfig {
        listen,
        per_key_series: raw
            .per_key_series
            .unwrap_or_else(|| listen.ip().is_loopback()),
    })
}

fn tracing_config(raw: RawTracing) -> Result<TracingConfig> {
    let endpoint = raw.otlp_endpoint.trim().to_owned();
    if !(endpoint.starts_with("http://") || endpoint.starts_with("https://")) {
        return Err(Error::Config(format!(
            "tracing.otlp_endpoint {endpoint:?} must be an http:// or https:// URL of an OTLP/gRPC collector"
        )));
    }
    let sample_ratio = raw.sample_ratio.unwrap_or(1.0);
    if !(0.0..=1.0).contains(&sample_ratio) {
        return Err(Error::Config(
            "tracing.sample_ratio must be between 0.0 and 1.0".into(),
        ));
    }
    Ok(TracingConfig {
        otlp_endpoint: endpoint,
        service_name: raw.service_name.unwrap_or_else(|| "wrapd".to_owned()),
        sample_ratio,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn write_pin(dir: &Path) {
        std::fs::write(dir.join("pin"), "1234\n").unwrap();
    }

    const GOOD: &str = r#"
        [hsm]
        module = "/usr/lib/softhsm/libsofthsm2.so"
        token_label = "wrapd"
        pin_file = "pin"
        profile = "softhsm"
        [store]
        sqlite = "wrapd.db"
        [unix]
        path = "wrapd.sock"
        mode = "0660"
    "#;

    #[test]
    fn parses_and_resolves_paths() {
        let dir = tempfile::tempdir().unwrap();
        write_pin(dir.path());
        let config = Config::parse(GOOD, dir.path()).unwrap();
        assert_eq!(config.hsm.pin.expose(), "1234");
        assert!(
            matches!(&config.store, StoreConfig::Sqlite(path) if *path == dir.path().join("wrapd.db"))
        );
        let unix = config.unix.unwrap();
        assert_eq!(unix.mode, 0o660);
        assert_eq!(config.hsm.max_sessions, 8);
        // The PIN never shows in Debug output.
        assert!(!format!("{:?}", config.hsm).contains("1234"));
    }

    #[test]
    fn rejects_inline_pin_unknown_fields_and_bad_values() {
        let dir = tempfile::tempdir().unwrap();
        write_pin(dir.path());
        let inline = GOOD.replace("pin_file = \"pin\"", "pin = \"1234\"");
        assert!(Config::parse(&inline, dir.path()).is_err());
        let both = GOOD.replace("pin_file = \"pin\"", "pin_file = \"pin\"\npin_env = \"X\"");
        assert!(Config::parse(&both, dir.path()).is_err());
        let mode = GOOD.replace("0660", "rw-rw----");
        assert!(Config::parse(&mode, dir.path()).is_err());
        let profile = GOOD.replace("softhsm\"", "luna\"");
        assert!(Config::parse(&profile, dir.path()).is_err());
        assert!(Config::parse("not toml [", dir.path()).is_err());
    }

    #[test]
    fn tracing_takes_an_otlp_url_and_a_ratio_between_0_and_1() {
        let dir = tempfile::tempdir().unwrap();
        write_pin(dir.path());
        let with =
            |section: &str| Config::parse(&format!("{GOOD}\n[tracing]\n{section}"), dir.path());
        let config = with("otlp_endpoint = \"http://127.0.0.1:4317\"").unwrap();
        let tracing = config.tracing.unwrap();
        assert_eq!(tracing.service_name, "wrapd");
        assert_eq!(tracing.sample_ratio, 1.0);
        assert!(with("otlp_endpoint = \"127.0.0.1:4317\"").is_err());
        assert!(with("otlp_endpoint = \"http://c:4317\"\nsample_ratio = 1.5").is_err());
        assert!(Config::parse(GOOD, dir.path()).unwrap().tracing.is_none());
    }

    #[test]
    fn the_example_configs_and_policy_are_valid() {
        let dir = tempfile::tempdir().unwrap();
        write_pin(dir.path());
        for example in [
            include_str!("../softhsm-config/softhsm.toml"),
            include_str!("../softhsm-config/cloudhsm.toml"),
        ] {
            // Point the PIN at a file that exists here; everything else as shipped.
            let text: String = example
                .lines()
                .map(|l| {
                    if l.starts_with("pin_file") || l.starts_with("pin_env") {
                        "pin_file = \"pin\""
                    } else {
                        l
                    }
                })
                .collect::<Vec<_>>()
                .join("\n");
            let config = Config::parse(&text, dir.path()).unwrap();
            assert!(config.tcp.is_some() && config.audit.is_some() && config.policy_file.is_some());
        }
        let policy =
            crate::auth::Policy::parse(include_str!("../softhsm-config/policy.toml")).unwrap();
        assert_eq!(policy.len(), 3);
    }

    #[test]
    fn config_errors_do_not_echo_the_pin() {
        let dir = tempfile::tempdir().unwrap();
        std::fs::write(dir.path().join("pin"), "s3cret-pin\n").unwrap();
        let bad = GOOD.replace("[store]", "[store]\nbogus = 1");
        let err = Config::parse(&bad, dir.path()).unwrap_err().to_string();
        assert!(!err.contains("s3cret-pin"), "{err}");
    }

    const AWS: &str = r#"
        [aws]
        listen = "127.0.0.1:0"
        cert = "server.pem"
        key = "server.key"
        region = "eu-west-3"
        account = "111122223333"

        [[aws.access_key]]
        id = "AKIAEXAMPLEEXAMPLE00"
        secret_file = "aws-secret"
        principal = "tls:uri=spiffe://example.org/app"
    "#;

    fn aws_dir() -> tempfile::TempDir {
        let dir = tempfile::tempdir().unwrap();
        write_pin(dir.path());
        std::fs::write(
            dir.path().join("aws-secret"),
            "wJalrXUtnFEMI/K7MDENG+bPxRfiCYEXAMPLEKEY\n",
        )
        .unwrap();
        dir
    }

    #[test]
    fn an_aws_access_key_reads_its_secret_from_a_file() {
        let dir = aws_dir();
        let config = Config::parse(&format!("{GOOD}{AWS}"), dir.path()).unwrap();
        let aws = config.aws.unwrap();
        assert_eq!(aws.region, "eu-west-3");
        let key = &aws.access_keys[0];
        assert_eq!(
            key.secret.as_str(),
            "wJalrXUtnFEMI/K7MDENG+bPxRfiCYEXAMPLEKEY"
        );
        assert!(
            !format!("{key:?}").contains("EXAMPLEKEY"),
            "Debug redacts the secret"
        );
    }

    #[test]
    fn every_secret_file_readable_by_others_is_named() {
        use std::os::unix::fs::PermissionsExt;
        let dir = aws_dir();
        for file in ["pin", "aws-secret"] {
            let path = dir.path().join(file);
            std::fs::set_permissions(&path, std::fs::Permissions::from_mode(0o600)).unwrap();
        }
        let config = Config::parse(&format!("{GOOD}{AWS}"), dir.path()).unwrap();
        assert!(config.shared_secret_files().is_empty());
        for file in ["pin", "aws-secret"] {
            let path = dir.path().join(file);
            std::fs::set_permissions(&path, std::fs::Permissions::from_mode(0o644)).unwrap();
        }
        let warnings = config.shared_secret_files();
        assert_eq!(warnings.len(), 2, "{warnings:?}");
        assert!(warnings[0].starts_with("hsm.pin_file"), "{warnings:?}");
        assert!(
            warnings[1].starts_with("aws.access_key[1].secret_file"),
            "{warnings:?}"
        );
    }

    #[test]
    fn metrics_listen_on_loopback_by_default_and_name_keys_only_there_unless_asked() {
        let dir = aws_dir();
        let parse = |metrics: &str| {
            Config::parse(&format!("{GOOD}\n[metrics]\n{metrics}\n"), dir.path())
                .unwrap()
                .metrics
                .unwrap()
        };
        let default = parse("");
        assert_eq!(default.listen, "127.0.0.1:9464".parse().unwrap());
        assert!(default.per_key_series);
        assert!(!parse("listen = \"0.0.0.0:9464\"").per_key_series);
        assert!(parse("listen = \"0.0.0.0:9464\"\nper_key_series = true").per_key_series);
    }

    #[test]
    fn a_fleet_instance_name_can_come_from_the_environment() {
        let dir = aws_dir();
        // Cargo sets CARGO_PKG_NAME for the tests it runs.
        let text = GOOD.replace(
            "sqlite = \"wrapd.db\"",
            "postgres = \"postgresql://wrapd@127.0.0.1/wrapd\"\ninstance_env = \"CARGO_PKG_NAME\"",
        );
        let config = Config::parse(&text, dir.path()).unwrap();
        assert_eq!(config.store.instance(), Some("wrapd"));
        let both = text.replace("instance_env", "instance = \"a\"\ninstance_env");
        let err = Config::parse(&both, dir.path()).unwrap_err().to_string();
        assert!(err.contains("at most one"), "{err}");
        let unset = text.replace("CARGO_PKG_NAME", "WRAPD_TEST_UNSET_VARIABLE");
        let err = Config::parse(&unset, dir.path()).unwrap_err().to_string();
        assert!(
            err.contains("WRAPD_TEST_UNSET_VARIABLE is not set"),
            "{err}"
        );
    }

    #[test]
    fn an_inline_aws_secret_is_refused() {
        let dir = aws_dir();
        let inline = AWS.replace(
            "secret_file = \"aws-secret\"",
            "secret = \"wJalrXUtnFEMI/K7MDENG+bPxRfiCYEXAMPLEKEY\"",
        );
        let err = Config::parse(&format!("{GOOD}{inline}"), dir.path())
            .unwrap_err()
            .to_string();
        assert!(err.contains("secret"), "{err}");
        assert!(
            !err.contains("EXAMPLEKEY"),
            "the error does not echo the secret: {err}"
        );
    }

    #[test]
    fn an_access_key_cannot_act_as_an_internal_principal() {
        let dir = aws_dir();
        let internal = AWS.replace("tls:uri=spiffe://example.org/app", "wrapd:daemon");
        let err = Config::parse(&format!("{GOOD}{internal}"), dir.path()).unwrap_err();
        assert!(err.to_string().contains("wrapd:"), "{err}");
    }

    #[test]
    fn an_aws_account_is_twelve_digits() {
        let dir = aws_dir();
        let bad = AWS.replace("111122223333", "12345");
        assert!(Config::parse(&format!("{GOOD}{bad}"), dir.path()).is_err());
    }
}
