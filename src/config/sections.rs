//! Resolving the sections that need more than a check: the metadata store, the AWS access
//! keys, limits, metrics and tracing, and the secret files they name (read once, refused
//! when unreadable).

use super::*;

/// `[limits]`, each within a sane range (defaults: [`Limits::default`]).
pub(super) fn limits(raw: &RawLimits) -> Result<Limits> {
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

/// `[store]`: exactly one backend; the PostgreSQL password from a file or an environment
/// variable.
pub(super) fn store_config(
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

/// `[aws]`: addresses, names and access keys checked, secrets read.
pub(super) fn aws_config(
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
    if !is_region(&raw.region) {
        return Err(Error::Config(format!(
            "aws.region {:?} is not a region name like us-east-1",
            raw.region
        )));
    }
    let mut regions = vec![raw.region.clone()];
    for region in &raw.regions {
        if !is_region(region) {
            return Err(Error::Config(format!(
                "aws.regions: {region:?} is not a region name like us-east-1"
            )));
        }
        if !regions.contains(region) {
            regions.push(region.clone());
        }
    }
    if regions.len() > MAX_AWS_REGIONS {
        return Err(Error::Config(format!(
            "aws.regions: at most {MAX_AWS_REGIONS} regions"
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
        let secret = access_key_secret(
            &at,
            key.secret_file.as_deref(),
            key.secret_env.as_deref(),
            resolve,
            secret_envs,
        )?;
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
        let arn = key
            .arn
            .map(|arn| iam_arn(&arn, &raw.account).map(|()| arn))
            .transpose()
            .map_err(|why| Error::Config(format!("{at}.arn: {why}")))?;
        access_keys.push(AwsAccessKey {
            id: key.id,
            secret,
            principal: key.principal,
            arn,
        });
    }
    Ok(AwsConfig {
        listen,
        cert: resolve(&raw.cert),
        key: resolve(&raw.key),
        region: raw.region,
        regions,
        account: raw.account,
        access_keys,
    })
}

/// An access key's secret, from its file or environment variable (exactly one), trimmed.
fn access_key_secret(
    at: &str,
    file: Option<&Path>,
    env: Option<&str>,
    resolve: &dyn Fn(&Path) -> PathBuf,
    secret_envs: &mut Vec<String>,
) -> Result<Zeroizing<String>> {
    match (file, env) {
        (Some(file), None) => {
            let path = resolve(file);
            let text = read_secret_file(&path, &format!("{at}.secret_file"))?;
            Ok(Zeroizing::new(text.trim().to_owned()))
        }
        (None, Some(var)) => {
            let value = Zeroizing::new(
                std::env::var(var)
                    .map_err(|_| Error::Config(format!("{at}.secret_env: {var} is not set")))?,
            );
            secret_envs.push(var.to_owned());
            Ok(Zeroizing::new(value.trim().to_owned()))
        }
        _ => Err(Error::Config(format!(
            "{at}: set exactly one of secret_file and secret_env (secrets are never inline)"
        ))),
    }
}

/// Checks an IAM principal ARN: `arn:aws:iam::ACCOUNT:user/NAME` or `role/NAME` (with an
/// optional path), in `account`, the one account of wrapd's AWS API.
fn iam_arn(arn: &str, account: &str) -> std::result::Result<(), String> {
    let form = "must be arn:aws:iam::ACCOUNT:user/NAME or arn:aws:iam::ACCOUNT:role/NAME";
    let rest = arn.strip_prefix("arn:aws:iam::").ok_or(form)?;
    let (in_account, resource) = rest.split_once(':').ok_or(form)?;
    let name = resource
        .strip_prefix("user/")
        .or_else(|| resource.strip_prefix("role/"))
        .ok_or(form)?;
    let name_ok = !name.is_empty()
        && name.len() <= 512
        && name
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || b"+=,.@_/-".contains(&b));
    if !name_ok {
        return Err(format!(
            "{form}; NAME is 1 to 512 of A-Z a-z 0-9 + = , . @ _ / -"
        ));
    }
    if in_account != account {
        return Err(format!(
            "names account {in_account:?}, but aws.account is {account:?} (wrapd's AWS API has one account)"
        ));
    }
    Ok(())
}

/// Most regions one AWS KMS API endpoint answers for.
const MAX_AWS_REGIONS: usize = 32;

/// Whether `region` is a region name like `us-east-1`.
fn is_region(region: &str) -> bool {
    !region.is_empty()
        && region.len() <= 32
        && region
            .bytes()
            .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'-')
}

/// `[xks]`: the listener, and each key store's prefix, region, principal and credentials,
/// checked against what the XKS specification allows (AWS KMS refuses anything else).
pub(super) fn xks_config(
    raw: RawXks,
    resolve: &dyn Fn(&Path) -> PathBuf,
    secret_envs: &mut Vec<String>,
) -> Result<XksConfig> {
    let listen = raw.listen.parse().map_err(|_| {
        Error::Config(format!(
            "xks.listen {:?} is not an address like 127.0.0.1:4444",
            raw.listen
        ))
    })?;
    if raw.client_subject.is_some() && raw.client_ca.is_none() {
        return Err(Error::Config(
            "xks.client_subject needs xks.client_ca: the subject of a client certificate is checked only once its chain is".into(),
        ));
    }
    if raw.keystores.is_empty() {
        return Err(Error::Config(
            "[xks] needs at least one [[xks.keystore]]".into(),
        ));
    }
    let mut keystores: Vec<XksKeystore> = Vec::new();
    for (i, keystore) in raw.keystores.into_iter().enumerate() {
        let at = format!("xks.keystore[{}]", i + 1);
        let prefix = keystore.uri_prefix.trim_matches('/').to_owned();
        let prefix_ok = prefix
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || b"/-_".contains(&b))
            && !prefix.contains("//")
            && format!("/{prefix}/kms/xks/v1").len() <= 128;
        if !prefix_ok {
            return Err(Error::Config(format!(
                "{at}.uri_prefix {:?}: a path of A-Z a-z 0-9 / - _ that keeps the whole path (with /kms/xks/v1) within 128 characters, as AWS KMS requires",
                keystore.uri_prefix
            )));
        }
        if keystores.iter().any(|k| k.uri_prefix == prefix) {
            return Err(Error::Config(format!(
                "{at}.uri_prefix {prefix:?} is listed twice"
            )));
        }
        if !is_region(&keystore.region) {
            return Err(Error::Config(format!(
                "{at}.region {:?} is not a region name like us-east-1",
                keystore.region
            )));
        }
        let principal = match keystore.principal {
            None if prefix.is_empty() => "xks:default".to_owned(),
            None => format!("xks:{prefix}"),
            Some(p) if p.starts_with("xks:") && p.len() > 4 => p,
            Some(p) if !p.is_empty() && !p.contains(':') => format!("xks:{p}"),
            Some(p) => {
                return Err(Error::Config(format!(
                    "{at}.principal {p:?} must be a name, or xks:NAME"
                )));
            }
        };
        if keystores.iter().any(|k| k.principal == principal) {
            return Err(Error::Config(format!(
                "{at}.principal {principal:?} is another key store's: each key store needs a principal of its own, or they share every grant"
            )));
        }
        if keystore.credentials.is_empty() {
            return Err(Error::Config(format!(
                "{at} needs at least one [[xks.keystore.credential]]"
            )));
        }
        let mut credentials: Vec<AwsAccessKey> = Vec::new();
        for (j, credential) in keystore.credentials.into_iter().enumerate() {
            let at = format!("{at}.credential[{}]", j + 1);
            let id_ok = (20..=30).contains(&credential.id.len())
                && credential
                    .id
                    .bytes()
                    .all(|b| b.is_ascii_uppercase() || (b'2'..=b'7').contains(&b));
            if !id_ok {
                return Err(Error::Config(format!(
                    "{at}.id {:?} must be 20 to 30 of A-Z 2-7, as AWS KMS requires of an XKS access key id",
                    credential.id
                )));
            }
            if credentials.iter().any(|c| c.id == credential.id) {
                return Err(Error::Config(format!(
                    "{at}.id {:?} is listed twice",
                    credential.id
                )));
            }
            let secret = access_key_secret(
                &at,
                credential.secret_file.as_deref(),
                credential.secret_env.as_deref(),
                resolve,
                secret_envs,
            )?;
            let secret_ok = (43..=64).contains(&secret.len())
                && secret
                    .bytes()
                    .all(|b| b.is_ascii_alphanumeric() || b"/+=".contains(&b));
            if !secret_ok {
                return Err(Error::Config(format!(
                    "{at}: the secret must be 43 to 64 of A-Z a-z 0-9 / + =, as AWS KMS requires of an XKS secret access key"
                )));
            }
            credentials.push(AwsAccessKey {
                id: credential.id,
                secret,
                principal: None,
                arn: None,
            });
        }
        let requests_per_second = match keystore.requests_per_second {
            None => None,
            Some(n) => Some(std::num::NonZeroU32::new(n).ok_or_else(|| {
                Error::Config(format!(
                    "{at}.requests_per_second must be at least 1 (leave it out for no quota)"
                ))
            })?),
        };
        keystores.push(XksKeystore {
            uri_prefix: prefix,
            region: keystore.region,
            principal,
            requests_per_second,
            credentials,
        });
    }
    Ok(XksConfig {
        listen,
        cert: resolve(&raw.cert),
        key: resolve(&raw.key),
        client_ca: raw.client_ca.as_deref().map(resolve),
        client_subject: raw.client_subject,
        keystores,
        source: None,
    })
}

pub(super) fn parse_mode(field: &str, mode: &str) -> Result<u32> {
    u32::from_str_radix(mode.trim_start_matches("0o"), 8)
        .ok()
        .filter(|m| *m <= 0o777)
        .ok_or_else(|| Error::Config(format!("{field} {mode:?} is not an octal file mode")))
}

pub(super) fn read_pin_file(path: &Path) -> Result<Pin> {
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
pub(super) fn read_secret_file(path: &Path, what: &str) -> Result<Zeroizing<String>> {
    Ok(Zeroizing::new(std::fs::read_to_string(path).map_err(
        |e| Error::Config(format!("{what}: cannot read {}: {e}", path.display())),
    )?))
}

pub(super) fn metrics_config(raw: RawMetrics) -> Result<MetricsConfig> {
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

pub(super) fn tracing_config(raw: RawTracing) -> Result<TracingConfig> {
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
