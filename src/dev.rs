//! `wrapd dev`: a self-contained development setup in one directory.
//!
//! On first run it creates, in the state directory (default `./.wrapd-dev`): a SoftHSM
//! configuration and token directory, a random user PIN and SO PIN (mode 0600), a dev PKI
//! (`pki/`: `ca.pem`, `server.pem`/`.key` for localhost, `client.pem`/`.key` naming the
//! invoking user as `spiffe://wrapd-dev/user/NAME`), a policy granting that user everything
//! (`policy.toml`), and a daemon config (`wrapd.toml`) using all of it with a SQLite store,
//! an audit log, the unix socket `wrapd.sock`, mutual TLS on `127.0.0.1` (a free port), and
//! the AWS KMS-compatible API on `127.0.0.1` (a free port) with an access key for the
//! invoking user acting as the dev client certificate's principal (`aws/credentials`,
//! `aws/secret`; `aws/config` is rewritten at each start with that run's endpoint), and the
//! XKS proxy API on `127.0.0.1` (a free port) with a key store under the prefix `dev`, its
//! credential in `xks/`, and a key for it (`alias/xks-dev`); `xks/dev.env` is rewritten at
//! each start with that run's endpoint, the credential and the key.
//! Later runs reuse everything, so keys and blobs survive restarts. Nothing here is meant for
//! production: see `softhsm-config/cloudhsm.toml` for that.

use std::fs;
use std::os::unix::fs::DirBuilderExt;
use std::path::{Path, PathBuf};

use rand::RngCore;
use zeroize::Zeroizing;

use crate::config::Config;
use crate::error::{Error, Result};
use crate::files::{write_new, write_replace};
use crate::hsm::{Pin, provision_softhsm_token};
use crate::ids::{AliasName, KeyRef};
use crate::keystore::Keystore;
use crate::pki;

/// Label of the dev token.
pub const DEV_TOKEN_LABEL: &str = "wrapd-dev";
/// The key behind the dev KMS plugin socket.
pub const KUBERNETES_ALIAS: &str = "alias/kubernetes";
/// The policy principal the dev KMS plugin acts as.
pub const KMS_PRINCIPAL: &str = "wrapd:kubernetes-kms";
/// The region of the dev AWS KMS API (in ARNs and the SigV4 scope).
pub const AWS_REGION: &str = "us-east-1";
/// The account of the dev AWS KMS API's ARNs.
pub const AWS_ACCOUNT: &str = "111122223333";
/// The profile of `DIR/aws/credentials` and `DIR/aws/config`.
pub const AWS_PROFILE: &str = "wrapd-dev";
/// The URI path prefix of the dev XKS key store.
pub const XKS_PREFIX: &str = "dev";
/// The principal the dev XKS key store acts as.
pub const XKS_PRINCIPAL: &str = "xks:dev";
/// The key usable through the dev XKS key store (created on first run).
pub const XKS_ALIAS: &str = "alias/xks-dev";

/// The policy grant of the dev XKS key store (added to a dev policy from before it).
const XKS_GRANT: &str = r#"
[[grant]]
description = "dev: AWS KMS, through the XKS proxy API's key store dev, may use every key"
principals = ["xks:dev"]
operations = ["xks"]
keys = ["*"]
"#;

/// With this set to the path of the project's CloudHSM simulator
/// (`libwrapd_cloudhsm_sim.so`), a new `wrapd dev` state directory runs the daemon on it with
/// `profile = "cloudhsm"` (the test suite's CloudHSM pass).
pub const CLOUDHSM_SIM_ENV: &str = "WRAPD_DEV_CLOUDHSM_SIM";

/// The crypto user name of the simulator's `USER:PASSWORD` PIN.
const CLOUDHSM_SIM_USER: &str = "wrapd";

/// Where SoftHSM's module is usually installed; `WRAPD_PKCS11_MODULE` overrides.
const SOFTHSM_MODULE_PATHS: &[&str] = &[
    "/usr/lib/softhsm/libsofthsm2.so",
    "/usr/lib/x86_64-linux-gnu/softhsm/libsofthsm2.so",
    "/usr/lib/aarch64-linux-gnu/softhsm/libsofthsm2.so",
    "/usr/lib64/softhsm/libsofthsm2.so",
    "/usr/lib64/pkcs11/libsofthsm2.so",
    "/usr/local/lib/softhsm/libsofthsm2.so",
    "/opt/homebrew/lib/softhsm/libsofthsm2.so",
];

/// The files of a dev state directory.
#[derive(Debug, Clone)]
pub struct DevSetup {
    /// The state directory (absolute).
    pub dir: PathBuf,
    /// The daemon config.
    pub config: PathBuf,
    /// The SO PIN file.
    pub so_pin: PathBuf,
    /// What was rewritten in the files an earlier release's `wrapd dev` generated (logged
    /// once logging has started).
    pub migrated: Vec<String>,
}

impl DevSetup {
    /// The AWS shared config file (`DIR/aws/config`), rewritten at each start with the
    /// endpoint of that run.
    pub fn aws_config_file(&self) -> PathBuf {
        self.dir.join("aws").join("config")
    }

    /// The AWS shared credentials file (`DIR/aws/credentials`, mode 0600).
    pub fn aws_credentials_file(&self) -> PathBuf {
        self.dir.join("aws").join("credentials")
    }

    /// The XKS environment file (`DIR/xks/dev.env`, mode 0600), rewritten at each start.
    pub fn xks_env_file(&self) -> PathBuf {
        self.dir.join("xks").join("dev.env")
    }

    /// Writes `DIR/xks/dev.env`: shell assignments of what an XKS client (the AWS test client
    /// `test-xks-proxy`, curl) needs to call this run's XKS proxy API with the dev key
    /// store's credential on `key` (a key id).
    pub fn write_xks_env(
        &self,
        address: std::net::SocketAddr,
        key: &crate::ids::KeyId,
    ) -> Result<()> {
        let read = |name: &str| {
            let path = self.dir.join("xks").join(name);
            fs::read_to_string(&path)
                .map(|text| Zeroizing::new(text.trim().to_owned()))
                .map_err(|e| Error::Config(format!("cannot read {}: {e}", path.display())))
        };
        let (id, secret) = (read("access-key-id")?, read("secret")?);
        let key = key
            .as_str()
            .strip_prefix(crate::ids::KeyId::PREFIX)
            .unwrap_or(key.as_str());
        let text = Zeroizing::new(format!(
            "# Written by `wrapd dev` at each start: the dev XKS key store of this run.\nXKS_PROXY_HOST={address}\nURI_PREFIX={XKS_PREFIX}\nSIGV4_ACCESS_KEY_ID={}\nSIGV4_SECRET_ACCESS_KEY={}\nXKS_REGION={AWS_REGION}\nXKS_CA={}\nKEY_ID={key}\n",
            id.as_str(),
            secret.as_str(),
            self.dir.join("pki").join("ca.pem").display()
        ));
        write_replace(&self.xks_env_file(), text.as_bytes(), 0o600)
    }

    /// Writes `DIR/aws/config`: profile `wrapd-dev` with the region, the endpoint of this
    /// run and the dev CA, so that `AWS_CONFIG_FILE=DIR/aws/config
    /// AWS_SHARED_CREDENTIALS_FILE=DIR/aws/credentials AWS_PROFILE=wrapd-dev aws kms …`
    /// works (AWS CLI versions before 2.13 ignore `endpoint_url`: pass `--endpoint-url`).
    pub fn write_aws_config(&self, endpoint: &str) -> Result<()> {
        let text = format!(
            "# Written by `wrapd dev` at each start (the port changes).\n[profile {AWS_PROFILE}]\nregion = {AWS_REGION}\nendpoint_url = {endpoint}\nca_bundle = {}\n",
            self.dir.join("pki").join("ca.pem").display()
        );
        write_replace(&self.aws_config_file(), text.as_bytes(), 0o644)
    }
}

/// The uid and user name of whoever runs `wrapd dev`.
fn invoking_user() -> (u32, String) {
    let uid = nix::unistd::getuid();
    let name = nix::unistd::User::from_uid(uid)
        .ok()
        .flatten()
        .map_or_else(|| format!("uid-{uid}"), |u| u.name);
    (uid.as_raw(), name)
}

/// Finds SoftHSM's PKCS#11 module.
pub fn find_softhsm_module() -> Result<PathBuf> {
    if let Some(path) = std::env::var_os("WRAPD_PKCS11_MODULE") {
        return Ok(PathBuf::from(path));
    }
    SOFTHSM_MODULE_PATHS
        .iter()
        .map(PathBuf::from)
        .find(|p| p.exists())
        .ok_or_else(|| {
            Error::Config(
                "SoftHSM2 is not installed (libsofthsm2.so not found); install it with \
                 `apt-get install -y softhsm2` or set WRAPD_PKCS11_MODULE"
                    .into(),
            )
        })
}

/// Creates whatever is missing in `dir` (see the module docs) and returns the paths.
pub fn prepare(dir: &Path) -> Result<DevSetup> {
    prepare_with(dir, None)
}

/// How every file `wrapd dev` generates begins (and how it knows it may rewrite one).
const GENERATED: &str = "# Generated by `wrapd dev`";

/// Rewrites what a release renamed in a policy file `wrapd dev` generated (a hand-edited
/// dev policy keeps the header and is rewritten the same way: only renames change), keeping
/// the old text beside it as `policy.toml.bak`. Returns what changed.
fn migrate_generated_policy(policy: &Path) -> Result<Vec<String>> {
    let text = fs::read_to_string(policy)
        .map_err(|e| Error::Config(format!("cannot read {}: {e}", policy.display())))?;
    if !text.starts_with(GENERATED) {
        return Ok(Vec::new());
    }
    let (new, changes) = crate::auth::migrate_policy_text(&text)?;
    if changes.is_empty() {
        return Ok(Vec::new());
    }
    let backup = policy.with_extension("toml.bak");
    if !backup.exists() {
        write_new(&backup, text.as_bytes(), 0o600)?;
    }
    write_replace(policy, new.as_bytes(), 0o600)?;
    Ok(changes
        .into_iter()
        .map(|c| {
            format!(
                "{}:{}: {} -> {} ({}; the old file is {})",
                policy.display(),
                c.line,
                c.old,
                c.new,
                c.why,
                backup.display()
            )
        })
        .collect())
}

/// Like [`prepare`]; with `postgres` (a URL without password), a new state directory's
/// config keeps its metadata in that PostgreSQL database instead of SQLite (`wrapd dev
/// --postgres URL`, to try a fleet: start more daemons with configs like it). An existing
/// config is left as it is, but what a release renamed in the files `wrapd dev` generated is
/// rewritten (see [`DevSetup::migrated`]).
pub fn prepare_with(dir: &Path, postgres: Option<&str>) -> Result<DevSetup> {
    let io = |what: &str, e: std::io::Error| Error::Config(format!("{what}: {e}"));
    fs::DirBuilder::new()
        .recursive(true)
        .mode(0o700)
        .create(dir)
        .map_err(|e| io(&format!("cannot create {}", dir.display()), e))?;
    let dir = dir
        .canonicalize()
        .map_err(|e| io(&format!("cannot resolve {}", dir.display()), e))?;
    let tokens = dir.join("tokens");
    fs::DirBuilder::new()
        .recursive(true)
        .mode(0o700)
        .create(&tokens)
        .map_err(|e| io("cannot create the token directory", e))?;

    let mut migrated = Vec::new();
    let softhsm_conf = dir.join("softhsm2.conf");
    let softhsm_text = format!(
        "{GENERATED}.\ndirectories.tokendir = {}\nobjectstore.backend = file\nlog.level = ERROR\nslots.removable = false\n",
        tokens.display()
    );
    if !softhsm_conf.exists() {
        write_new(&softhsm_conf, softhsm_text.as_bytes(), 0o600)?;
    } else {
        // A state directory moved or copied elsewhere: the generated file still names the
        // token directory where it was made.
        let text = fs::read_to_string(&softhsm_conf)
            .map_err(|e| io(&format!("cannot read {}", softhsm_conf.display()), e))?;
        let ours = format!("directories.tokendir = {}\n", tokens.display());
        if text.starts_with(GENERATED) && !text.contains(&ours) {
            write_replace(&softhsm_conf, softhsm_text.as_bytes(), 0o600)?;
            migrated.push(format!(
                "{}: the token directory is now {}",
                softhsm_conf.display(),
                tokens.display()
            ));
        }
    }
    for name in ["pin", "so-pin"] {
        let path = dir.join(name);
        if !path.exists() {
            let mut bytes = [0u8; 16];
            rand::rng().fill_bytes(&mut bytes);
            let pin = Zeroizing::new(hex::encode(bytes));
            write_new(&path, pin.as_bytes(), 0o600)?;
        }
    }
    let (uid, user) = invoking_user();
    let uri = format!("spiffe://wrapd-dev/user/{user}");
    let principal = format!("tls:uri={uri}");
    let pki_dir = dir.join("pki");
    if !pki_dir.join("client.pem").exists() {
        let validity = pki::Validity::days(365);
        let ca = pki::init(&pki_dir, validity)?;
        if !pki_dir.join("server.pem").exists() {
            let names = ["localhost", "127.0.0.1", "::1"].map(String::from);
            pki::write(
                &pki_dir,
                "server",
                &pki::issue_server(&ca, &names, validity)?,
            )?;
        }
        let client = pki::issue_client(&ca, &pki::ClientName::Uri(uri), validity)?;
        pki::write(&pki_dir, "client", &client)?;
    }
    let policy = dir.join("policy.toml");
    if policy.exists() {
        migrated.extend(migrate_generated_policy(&policy)?);
        // A dev policy from before the XKS proxy API: grant its dev key store.
        let text = fs::read_to_string(&policy)
            .map_err(|e| io(&format!("cannot read {}", policy.display()), e))?;
        if text.starts_with("# Generated by `wrapd dev`") && !text.contains(XKS_PRINCIPAL) {
            append(&policy, XKS_GRANT)?;
            migrated.push(format!(
                "{}: granted the dev XKS key store",
                policy.display()
            ));
        }
    } else {
        write_new(
            &policy,
            format!(
                r#"# Generated by `wrapd dev`. Deny by default; see softhsm-config/policy.toml for the syntax.
# Reload with SIGHUP after editing.

[[grant]]
description = "dev: the invoking user may do everything, on the unix socket and with pki/client.pem"
principals = ["unix:uid={uid}", "{principal}"]
operations = ["all"]
keys = ["*"]

[[grant]]
description = "dev: the Kubernetes KMS v2 plugin socket wraps and unwraps with alias/kubernetes"
principals = ["{KMS_PRINCIPAL}"]
operations = ["Wrap", "Unwrap"]
keys = ["{KUBERNETES_ALIAS}"]
{XKS_GRANT}"#
            )
            .as_bytes(),
            0o600,
        )?;
    }
    let aws_section = aws_credentials(&dir, &principal, &user)?;
    let xks_section = xks_credentials(&dir)?;
    let config = dir.join("wrapd.toml");
    if config.exists() {
        // A state directory from before the AWS KMS API or the XKS proxy API: add them.
        let text = fs::read_to_string(&config)
            .map_err(|e| io(&format!("cannot read {}", config.display()), e))?;
        if !text.contains("\n[aws]") {
            append(&config, &format!("\n{aws_section}"))?;
        }
        if !text.contains("\n[xks]") {
            append(&config, &format!("\n{xks_section}"))?;
        }
    } else {
        // On the project's CloudHSM simulator (tests): the token is still SoftHSM's, beneath
        // it; the daemon logs in with CloudHSM's USER:PASSWORD form.
        let (module, profile, pin_file) = match std::env::var_os(CLOUDHSM_SIM_ENV) {
            Some(sim) => {
                let pin = fs::read_to_string(dir.join("pin"))
                    .map_err(|e| io("cannot read the dev PIN", e))?;
                let user_pin = Zeroizing::new(format!("{CLOUDHSM_SIM_USER}:{}", pin.trim()));
                write_replace(&dir.join("cloudhsm-pin"), user_pin.as_bytes(), 0o600)?;
                (PathBuf::from(sim), "cloudhsm", "cloudhsm-pin")
            }
            None => (find_softhsm_module()?, "softhsm", "pin"),
        };
        let max_sessions = if profile == "cloudhsm" {
            crate::hsm::HsmProfile::Cloudhsm.default_max_sessions()
        } else {
            crate::hsm::HsmProfile::Softhsm.default_max_sessions()
        };
        write_new(
            &config,
            format!(
                r#"# Generated by `wrapd dev`: a development daemon on SoftHSM. Not for production.
# Relative paths are relative to this file.

[hsm]
module = "{module}"
token_label = "{DEV_TOKEN_LABEL}"
pin_file = "{pin_file}"
profile = "{profile}"
max_sessions = {max_sessions}
softhsm2_conf = "softhsm2.conf"

[store]
{store}

[unix]
path = "wrapd.sock"
mode = "0600"

# Mutual TLS on localhost; port 0 picks a free port (see the ready line).
# Client: pki/client.pem + pki/client.key, server CA: pki/ca.pem.
[tcp]
listen = "127.0.0.1:0"
cert = "pki/server.pem"
key = "pki/server.key"
client_ca = "pki/ca.pem"

# The Kubernetes KMS v2 plugin, backed by {KUBERNETES_ALIAS} (created on first run).
[kms]
path = "kms.sock"
mode = "0600"
key = "{KUBERNETES_ALIAS}"
principal = "{KMS_PRINCIPAL}"
healthz_cache_ms = 5000

{aws_section}
{xks_section}
[policy]
file = "policy.toml"

[audit]
file = "audit.log"
fsync = "always"

[keys]
deletion_check_interval_secs = 60

[log]
filter = "info"
{process}"#,
                module = module.display(),
                store = match postgres {
                    Some(url) => format!("postgres = {url:?}\ninstance = \"dev\""),
                    None => "sqlite = \"wrapd.db\"".to_owned(),
                },
                process = if crate::hardening::is_root() {
                    "\n# Generated by root: `wrapd serve` with this file runs as root too.\n[process]\nallow_root = true\n"
                } else {
                    ""
                }
            )
            .as_bytes(),
            0o600,
        )?;
    }
    Ok(DevSetup {
        migrated,
        config,
        so_pin: dir.join("so-pin"),
        dir,
    })
}

/// Creates (once) the dev access key of the AWS KMS API for the invoking user: its secret
/// in `aws/secret` and the AWS shared credentials file `aws/credentials` (both 0600).
/// Returns the `[aws]` config section that serves it, acting as `principal`, with the IAM
/// ARN of the invoking user `user` (`arn:aws:iam::ACCOUNT:user/NAME`).
fn aws_credentials(dir: &Path, principal: &str, user: &str) -> Result<String> {
    let aws = dir.join("aws");
    fs::DirBuilder::new()
        .recursive(true)
        .mode(0o700)
        .create(&aws)
        .map_err(|e| Error::Config(format!("cannot create {}: {e}", aws.display())))?;
    let (id_file, secret_file, credentials) = (
        aws.join("access-key-id"),
        aws.join("secret"),
        aws.join("credentials"),
    );
    if !secret_file.exists() {
        const UPPER: &[u8] = b"ABCDEFGHIJKLMNOPQRSTUVWXYZ234567";
        const SECRET: &[u8] = b"ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789+/";
        let mut random = Zeroizing::new([0u8; 56]);
        rand::rng().fill_bytes(&mut *random);
        let id: String = std::iter::once('A')
            .chain("KIA".chars())
            .chain(
                random[..16]
                    .iter()
                    .map(|b| UPPER[usize::from(*b) % 32] as char),
            )
            .collect();
        let secret = Zeroizing::new(
            random[16..]
                .iter()
                .map(|b| SECRET[usize::from(*b) % 64] as char)
                .collect::<String>(),
        );
        // An id without a secret is what an interrupted first run leaves: start over.
        let _ = fs::remove_file(&id_file);
        let _ = fs::remove_file(&credentials);
        write_new(&id_file, id.as_bytes(), 0o600)?;
        write_new(&secret_file, secret.as_bytes(), 0o600)?;
    }
    let read = |path: &Path| {
        fs::read_to_string(path)
            .map(Zeroizing::new)
            .map_err(|e| Error::Config(format!("cannot read {}: {e}", path.display())))
    };
    if !credentials.exists() {
        let (id, secret) = (read(&id_file)?, read(&secret_file)?);
        let text = Zeroizing::new(format!(
            "# Written by `wrapd dev`: the dev access key of the AWS KMS API (acts as {principal}).\n[{AWS_PROFILE}]\naws_access_key_id = {}\naws_secret_access_key = {}\n",
            id.trim(),
            secret.trim()
        ));
        write_new(&credentials, text.as_bytes(), 0o600)?;
    }
    let id = read(&id_file)?;
    Ok(format!(
        r#"# The AWS KMS-compatible API (HTTPS + SigV4) on a free port of localhost (see the ready
# line). Credentials: aws/credentials, profile {AWS_PROFILE}; aws/config is rewritten at each start.
[aws]
listen = "127.0.0.1:0"
cert = "pki/server.pem"
key = "pki/server.key"
region = "{AWS_REGION}"
account = "{AWS_ACCOUNT}"

[[aws.access_key]]
id = "{id}"
secret_file = "aws/secret"
principal = "{principal}"
arn = "arn:aws:iam::{AWS_ACCOUNT}:user/{iam_user}"
"#,
        id = id.trim(),
        // IAM user names are A-Z a-z 0-9 + = , . @ _ -; anything else in a login name becomes -.
        iam_user = user
            .chars()
            .map(|c| if c.is_ascii_alphanumeric() || "+=,.@_-".contains(c) {
                c
            } else {
                '-'
            })
            .collect::<String>()
    ))
}

/// Appends `text` to a file.
fn append(path: &Path, text: &str) -> Result<()> {
    let mut file = fs::OpenOptions::new()
        .append(true)
        .open(path)
        .map_err(|e| Error::Config(format!("cannot open {}: {e}", path.display())))?;
    std::io::Write::write_all(&mut file, text.as_bytes())
        .map_err(|e| Error::Config(format!("cannot write {}: {e}", path.display())))
}

/// Creates (once) the credential of the dev XKS key store: its id in `xks/access-key-id`
/// (26 of A-Z 2-7) and its secret in `xks/secret` (64 of A-Z a-z 0-9 + /), both 0600.
/// Returns the `[xks]` config section that serves it.
fn xks_credentials(dir: &Path) -> Result<String> {
    let xks = dir.join("xks");
    fs::DirBuilder::new()
        .recursive(true)
        .mode(0o700)
        .create(&xks)
        .map_err(|e| Error::Config(format!("cannot create {}: {e}", xks.display())))?;
    let (id_file, secret_file) = (xks.join("access-key-id"), xks.join("secret"));
    if !secret_file.exists() {
        const UPPER: &[u8] = b"ABCDEFGHIJKLMNOPQRSTUVWXYZ234567";
        const SECRET: &[u8] = b"ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789+/";
        let mut random = Zeroizing::new([0u8; 90]);
        rand::rng().fill_bytes(&mut *random);
        let id: String = random[..26]
            .iter()
            .map(|b| UPPER[usize::from(*b) % 32] as char)
            .collect();
        let secret = Zeroizing::new(
            random[26..]
                .iter()
                .map(|b| SECRET[usize::from(*b) % 64] as char)
                .collect::<String>(),
        );
        let _ = fs::remove_file(&id_file);
        write_new(&id_file, id.as_bytes(), 0o600)?;
        write_new(&secret_file, secret.as_bytes(), 0o600)?;
    }
    let id = fs::read_to_string(&id_file)
        .map_err(|e| Error::Config(format!("cannot read {}: {e}", id_file.display())))?;
    Ok(format!(
        r#"# The XKS proxy API (HTTPS + SigV4, for AWS KMS's external key stores) on a free port of
# localhost (see the ready line); xks/dev.env is rewritten at each start with what a client needs.
[xks]
listen = "127.0.0.1:0"
cert = "pki/server.pem"
key = "pki/server.key"

[[xks.keystore]]
uri_prefix = "{XKS_PREFIX}"
region = "{AWS_REGION}"
principal = "{XKS_PRINCIPAL}"

[[xks.keystore.credential]]
id = "{id}"
secret_file = "xks/secret"
"#,
        id = id.trim()
    ))
}

/// Creates the dev token if it does not exist yet. `SOFTHSM2_CONF` must already point at
/// the state directory's `softhsm2.conf`.
pub fn provision(setup: &DevSetup, config: &Config) -> Result<()> {
    let so_pin = Zeroizing::new(
        fs::read_to_string(&setup.so_pin)
            .map_err(|e| Error::Config(format!("cannot read {}: {e}", setup.so_pin.display())))?,
    );
    // On the CloudHSM simulator the token is made on SoftHSM beneath it, with the password
    // part of the USER:PASSWORD PIN.
    let (module, user_pin) = match config.hsm.profile {
        crate::hsm::HsmProfile::Cloudhsm => {
            let pin = config.hsm.pin.expose();
            let password = pin.split_once(':').map_or(pin, |(_, password)| password);
            (find_softhsm_module()?, Pin::new(password))
        }
        crate::hsm::HsmProfile::Softhsm => {
            (config.hsm.module.clone(), Pin::new(config.hsm.pin.expose()))
        }
    };
    let created = provision_softhsm_token(
        &module,
        &config.hsm.token_label,
        &Pin::new(&so_pin),
        &user_pin,
    )?;
    if created {
        tracing::info!(label = %config.hsm.token_label, "created the dev token");
    }
    Ok(())
}

/// Creates the key behind the dev KMS plugin (`alias/kubernetes`) unless it exists.
pub fn ensure_kubernetes_key(keystore: &Keystore) -> Result<()> {
    ensure_key(
        keystore,
        KUBERNETES_ALIAS,
        "Kubernetes KMS v2 plugin (wrapd dev)",
    )
    .map(|_| ())
}

/// Creates the key of the dev XKS key store (`alias/xks-dev`) unless it exists; returns its
/// id (the `externalKeyId` is its hex).
pub fn ensure_xks_key(keystore: &Keystore) -> Result<crate::ids::KeyId> {
    ensure_key(keystore, XKS_ALIAS, "XKS proxy API key (wrapd dev)")
}

fn ensure_key(keystore: &Keystore, alias: &str, description: &str) -> Result<crate::ids::KeyId> {
    let alias_name = AliasName::parse(alias)?;
    match keystore.resolve(&KeyRef::Alias(alias_name.clone())) {
        Ok(key) => Ok(key.id.clone()),
        Err(Error::AliasNotFound(_)) => {
            let key = keystore.create_key(description, Some(&alias_name))?;
            tracing::info!(key_id = %key.id, alias, "created a dev key");
            Ok(key.id.clone())
        }
        Err(err) => Err(err),
    }
}
