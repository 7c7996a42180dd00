//! The daemon's TOML configuration: parsed, validated and resolved once at start-up.
//!
//! Relative paths are relative to the config file's directory. The PIN is never inline:
//! it comes from a file (`pin_file`, which should be mode 0600) or an environment variable
//! (`pin_env`), and is held in a zeroizing [`Pin`]. See `softhsm-config/*.toml` for
//! commented examples.
//!
//! `raw.rs` is the file as written (serde types), `sections.rs` resolves the sections that
//! read secret files or need more than a check; the resolved types and [`Config::parse`]
//! are here.

mod raw;
mod sections;

pub use raw::ProcessConfig;
use raw::*;
use sections::*;

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
    /// Whether Encrypt binds its blobs to `principal` too (see `ops/kms.rs`); Decrypt takes
    /// blobs bound either way.
    pub bind_principal: bool,
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
    /// Every region the endpoint answers for: `region` first, then `[aws] regions`. A
    /// request may be signed for any; its answers name keys in that region.
    pub regions: Vec<String>,
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
    /// The IAM ARN of whoever holds it (`arn:aws:iam::ACCOUNT:user/NAME` or `role/NAME`):
    /// requests signed with it also act as `aws:arn=ARN`, so that a policy (and, later, a
    /// key policy) can name callers as AWS does.
    pub arn: Option<String>,
}

impl std::fmt::Debug for AwsAccessKey {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("AwsAccessKey")
            .field("id", &self.id)
            .field("secret", &"<redacted>")
            .field("principal", &self.principal)
            .field("arn", &self.arn)
            .finish()
    }
}

/// The XKS proxy API (`[xks]`): HTTPS for AWS KMS's calls to an external key store.
#[derive(Debug, Clone)]
pub struct XksConfig {
    /// Address to bind (port 0 picks a free port, reported in the ready line).
    pub listen: SocketAddr,
    /// Server certificate chain (PEM).
    pub cert: PathBuf,
    /// Server private key (PEM).
    pub key: PathBuf,
    /// When set, clients must present a certificate chaining to this CA (PEM): mutual TLS,
    /// as AWS KMS offers it.
    pub client_ca: Option<PathBuf>,
    /// When set (with `client_ca`), the client certificate's subject common name must be
    /// this (AWS KMS presents `cks.kms.<region>.amazonaws.com`).
    pub client_subject: Option<String>,
    /// The logical key stores, one per URI path prefix.
    pub keystores: Vec<XksKeystore>,
    /// The config file it was read from, re-read for its key stores on SIGHUP.
    pub source: Option<PathBuf>,
}

/// One logical key store of the XKS proxy API (`[[xks.keystore]]`).
#[derive(Debug, Clone)]
pub struct XksKeystore {
    /// The path prefix before `/kms/xks/v1`, without its slashes (may be empty).
    pub uri_prefix: String,
    /// The region of the SigV4 credential scope.
    pub region: String,
    /// The principal its requests act as, `xks:NAME`.
    pub principal: String,
    /// Its request quota: authenticated requests beyond it (a second's worth at once) are
    /// answered `ThrottlingException`.
    pub requests_per_second: Option<std::num::NonZeroU32>,
    /// The SigV4 credentials AWS KMS may sign with (two at once while they rotate).
    pub credentials: Vec<AwsAccessKey>,
}

/// `[[keys.retirement]]`: a key whose versions, but the current one, are retired once
/// unused for `after_days`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RetireUnused {
    /// The key (id or alias, resolved at each check).
    pub key: KeyRef,
    /// Days without a use.
    pub after_days: u32,
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
    /// The XKS proxy API.
    pub xks: Option<XksConfig>,
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
    /// `[[keys.retirement]]`: keys whose versions unused for so many days are retired by
    /// the daemon (off unless listed).
    pub retire_unused: Vec<RetireUnused>,
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
        let mut config = Self::parse(&text, base)
            .map_err(|e| Error::Config(format!("{}: {}", path.display(), e.detail())))?;
        if let Some(xks) = &mut config.xks {
            xks.source = Some(path.to_owned());
        }
        Ok(config)
    }

    /// Re-reads only the `[xks]` section of the config file `path` (SIGHUP: key stores and
    /// their credentials change without a restart). Credentials must come from files then:
    /// the environment variables of `secret_env` were wiped once read at start.
    pub fn reload_xks(path: &Path) -> Result<Option<XksConfig>> {
        let text = std::fs::read_to_string(path)
            .map_err(|e| Error::Config(format!("cannot read {}: {e}", path.display())))?;
        let raw: RawConfig = toml::from_str(&text).map_err(|e| {
            Error::Config(format!(
                "{}: {}",
                path.display(),
                e.message().replace('\n', " ")
            ))
        })?;
        let base = path.parent().unwrap_or(Path::new("."));
        let resolve = |p: &Path| base.join(p);
        let mut secret_envs = Vec::new();
        let xks = raw
            .xks
            .map(|x| xks_config(x, &resolve, &mut secret_envs))
            .transpose()
            .map_err(|e| Error::Config(format!("{}: {}", path.display(), e.detail())))?;
        Ok(xks.map(|mut xks| {
            xks.source = Some(path.to_owned());
            xks
        }))
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
        let max_sessions = raw
            .hsm
            .max_sessions
            .unwrap_or_else(|| raw.hsm.profile.default_max_sessions());
        let session_keepalive_ms = raw
            .hsm
            .session_keepalive_ms
            .unwrap_or_else(|| raw.hsm.profile.default_session_keepalive_ms());
        if session_keepalive_ms != 0 && !(100..=3_600_000).contains(&session_keepalive_ms) {
            return Err(Error::Config(
                "hsm.session_keepalive_ms must be 0 (off) or 100 to 3,600,000".into(),
            ));
        }
        if !(1..=1024).contains(&max_sessions) {
            return Err(Error::Config("hsm.max_sessions must be 1 to 1024".into()));
        }
        if raw.keys.max_wraps_per_version == 0 || raw.keys.max_wraps_per_version > 1 << 32 {
            return Err(Error::Config(
                "keys.max_wraps_per_version must be 1 to 2^32 (random GCM IVs)".into(),
            ));
        }
        let retire_unused = raw
            .keys
            .retirement
            .iter()
            .map(|r| {
                let key = KeyRef::parse(&r.key)
                    .map_err(|e| Error::Config(format!("keys.retirement key {:?}: {e}", r.key)))?;
                if !(1..=3650).contains(&r.retire_unused_after_days) {
                    return Err(Error::Config(format!(
                        "keys.retirement {}: retire_unused_after_days must be 1 to 3650",
                        r.key
                    )));
                }
                Ok(RetireUnused {
                    key,
                    after_days: r.retire_unused_after_days,
                })
            })
            .collect::<Result<Vec<_>>>()?;
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
                    bind_principal: k.bind_principal,
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
        for (i, keystore) in raw.xks.iter().flat_map(|x| x.keystores.iter()).enumerate() {
            for (j, credential) in keystore.credentials.iter().enumerate() {
                if let Some(file) = &credential.secret_file {
                    let at = format!("xks.keystore[{}].credential[{}].secret_file", i + 1, j + 1);
                    secret_files.push((at, resolve(file)));
                }
            }
        }
        let mut secret_envs: Vec<String> = raw.hsm.pin_env.iter().cloned().collect();
        let aws = raw
            .aws
            .map(|a| aws_config(a, &resolve, &mut secret_envs))
            .transpose()?;
        let xks = raw
            .xks
            .map(|x| xks_config(x, &resolve, &mut secret_envs))
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
                max_sessions,
                session_wait: Duration::from_millis(raw.hsm.session_wait_ms),
                session_keepalive: (session_keepalive_ms > 0)
                    .then(|| Duration::from_millis(session_keepalive_ms)),
                reset_on_missing_object: max_view_staleness.is_none(),
            },
            softhsm2_conf: raw.hsm.softhsm2_conf.as_deref().map(resolve),
            store,
            unix,
            tcp,
            policy_file: raw.policy.map(|p| resolve(&p.file)),
            kms,
            aws,
            xks,
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
            retire_unused,
            log_filter: raw.log.filter.unwrap_or_else(|| "info".to_owned()),
            log_format: raw.log.format,
        })
    }
}

impl Error {
    fn detail(&self) -> String {
        match self {
            Error::Config(detail) => detail.clone(),
            other => other.to_string(),
        }
    }
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

#[cfg(test)]
mod tests;
