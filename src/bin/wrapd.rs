//! `wrapd`: the key daemon. Parses arguments, loads the config, calls into the library.

use std::path::{Path, PathBuf};
use std::process::ExitCode;
use std::time::Duration;

use clap::{Parser, Subcommand};
use wrapd::bench::{self, BenchOp, BenchOptions};
use wrapd::config::Config;
use wrapd::server::{Daemon, init_logging, init_logging_and_tracing, shutdown_signal};
use wrapd::{Error, Result, dev};

#[derive(Parser)]
#[command(
    version,
    about = "wrapd: an HSM-rooted key daemon for envelope encryption"
)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Serve with a configuration file.
    Serve {
        /// The TOML configuration (see softhsm-config/*.toml).
        #[arg(long)]
        config: PathBuf,
        #[command(flatten)]
        recovery: Recovery,
    },
    /// Serve a self-contained development setup: SoftHSM token, PIN, store and config in DIR.
    Dev {
        /// Where the dev token, PIN, store and config live (created on first run).
        #[arg(long, default_value = ".wrapd-dev")]
        state_dir: PathBuf,
        /// Keep a new state directory's metadata in this PostgreSQL database instead of
        /// SQLite (postgresql://user@host:port/db), e.g. to try a fleet.
        #[arg(long)]
        postgres: Option<String>,
        #[command(flatten)]
        recovery: Recovery,
    },
    /// Ask a running daemon whether it serves, for container probes: exits 0 if it does,
    /// 1 if not or if it cannot be reached (the reason on standard error).
    Health {
        /// The daemon's unix socket: its gRPC health service must say SERVING (the token
        /// answers, the audit log can be written, a fleet's view of the store is fresh).
        #[arg(long, required_unless_present = "kms", conflicts_with = "kms")]
        socket: Option<PathBuf>,
        /// The KMS v2 plugin socket: its Status must say healthz "ok", as the kube-apiserver
        /// sees it.
        #[arg(long)]
        kms: Option<PathBuf>,
        /// Any answer will do (liveness: the daemon is up, serving or not).
        #[arg(long)]
        alive: bool,
        /// Give up after this many milliseconds.
        #[arg(long, default_value_t = 3000)]
        timeout_ms: u64,
    },
    /// Configuration tools.
    #[command(subcommand)]
    Config(ConfigCommand),
    /// Offline audit log tools.
    #[command(subcommand)]
    Audit(AuditCommand),
    /// Move a single daemon's metadata (keys, versions, wrap counts, aliases, rotation
    /// schedules, tags) from its SQLite file into an empty PostgreSQL database, to run it as
    /// the first daemon of a fleet. Stop the daemon first.
    MigrateStore {
        /// `sqlite:PATH`
        #[arg(long)]
        from: String,
        /// `postgres:postgresql://user@host:port/db`
        #[arg(long)]
        to: String,
        /// The environment variable holding the database password, if it needs one.
        #[arg(long)]
        password_env: Option<String>,
    },
    /// Soak a running daemon: mixed GenerateDataKey/Unwrap/ReWrap from many clients while keys
    /// rotate; prints errors, latency percentiles and the daemon's memory at start and end.
    Soak {
        /// The running daemon's configuration (its unix socket).
        #[arg(long)]
        config: PathBuf,
        /// Concurrent clients.
        #[arg(long, default_value_t = 32)]
        concurrency: usize,
        /// Seconds to run.
        #[arg(long, default_value_t = 120)]
        seconds: u64,
        /// Keys to spread the load over.
        #[arg(long, default_value_t = 4)]
        keys: usize,
        /// Milliseconds between rotations.
        #[arg(long, default_value_t = 500)]
        rotate_every_ms: u64,
    },
    /// Issue certificates for mutual TLS: a CA, server and client certificates (rcgen).
    #[command(subcommand)]
    Pki(PkiCommand),
    /// Measure a running daemon (ops/s, latency percentiles) against the raw PKCS#11 rate, a
    /// bare gRPC echo and the two in series, in one run.
    Bench {
        /// The running daemon's configuration (socket and token).
        #[arg(long)]
        config: PathBuf,
        /// Key id or alias to use; a new key is created when absent.
        #[arg(long)]
        key: Option<String>,
        /// Concurrent callers (repeatable); default: 1 and 64.
        #[arg(long)]
        concurrency: Vec<usize>,
        /// Seconds per figure.
        #[arg(long, default_value_t = 5)]
        seconds: u64,
        /// Operations to measure (repeatable); default: unwrap, generate and batch-unwrap.
        #[arg(long = "op", value_enum)]
        ops: Vec<BenchOp>,
        /// Skip the bad-ciphertext flood (half the callers sending blobs that fail in the
        /// token).
        #[arg(long)]
        no_flood: bool,
        /// Measure everything this many times, and print each figure's range.
        #[arg(long, default_value_t = 1)]
        rounds: usize,
        /// The XKS listener's address (`--op xks-encrypt`), when the config's `[xks] listen`
        /// has port 0: the `xks=` address of the daemon's ready line, without `https://`.
        #[arg(long)]
        xks_endpoint: Option<std::net::SocketAddr>,
        /// On the project's CloudHSM simulator: its control file (`WRAPD_SIM_CONTROL`, the
        /// same for the daemon and this bench). Every row is measured a second time with
        /// one HSM of the cluster down.
        #[arg(long)]
        hsm_down_control: Option<PathBuf>,
    },
}

/// Operator decisions for a start-up that found something wrong (each is logged).
#[derive(clap::Args)]
struct Recovery {
    /// Start although the audit log does not reach the chain head recorded in the metadata
    /// store (lines removed, file replaced or deleted): the gap is written into the log as
    /// an `AuditGap` record, which `wrapctl audit verify` reports.
    #[arg(long)]
    accept_audit_gap: bool,
    /// Start although the token holds versions of known keys that the metadata store does
    /// not list (a store restored from an older backup): add them to the metadata, as
    /// unwrap-only versions, instead of refusing. No key material is ever destroyed.
    #[arg(long)]
    adopt_unknown_versions: bool,
}

impl Recovery {
    fn apply(&self, config: &mut Config) {
        config.keystore.adopt_unknown_versions = self.adopt_unknown_versions;
        if let Some(audit) = &mut config.audit {
            if self.accept_audit_gap {
                audit.gaps = wrapd::audit::GapPolicy::Record;
            }
        }
    }
}

#[derive(Subcommand)]
enum ConfigCommand {
    /// Show (as a diff) what a release renamed in the policy file a config names, and with
    /// --write rewrite it (the old file kept as FILE.bak). A policy `wrapd dev` generated is
    /// migrated by `wrapd dev` itself.
    Migrate {
        /// The daemon's configuration (its [policy] file is migrated).
        #[arg(long)]
        config: PathBuf,
        /// Rewrite the file instead of only showing the diff.
        #[arg(long)]
        write: bool,
    },
}

#[derive(Subcommand)]
enum AuditCommand {
    /// Print the audit chain head recorded in the metadata store (`SEQ:HASH`), to check a
    /// log with `wrapctl audit verify --head`.
    Head {
        /// The daemon's configuration (its store and audit log).
        #[arg(long)]
        config: PathBuf,
    },
}

#[derive(Subcommand)]
enum PkiCommand {
    /// Create a CA (DIR/ca.pem, DIR/ca.key) unless one exists.
    Init {
        /// Where the CA lives.
        #[arg(long)]
        dir: PathBuf,
        /// Validity in days.
        #[arg(long, default_value_t = 365)]
        days: u32,
    },
    /// Issue a certificate signed by the CA in DIR (writes DIR/OUT.pem and DIR/OUT.key).
    Issue {
        /// Where the CA lives.
        #[arg(long)]
        dir: PathBuf,
        /// Validity in days.
        #[arg(long, default_value_t = 365)]
        days: u32,
        #[command(subcommand)]
        kind: IssueKind,
    },
}

#[derive(Subcommand)]
enum IssueKind {
    /// A server certificate for DNS names and IP addresses.
    Server {
        /// A DNS name or IP address (repeatable).
        #[arg(long = "name", required = true)]
        names: Vec<String>,
        /// File name stem.
        #[arg(long, default_value = "server")]
        out: String,
    },
    /// A client certificate naming a principal: a URI SAN, a DNS SAN, or a common name.
    Client {
        /// URI SAN, e.g. spiffe://example.org/payments (principal: tls:uri=URI).
        #[arg(long, group = "principal")]
        uri: Option<String>,
        /// DNS SAN (principal: tls:dns=NAME).
        #[arg(long, group = "principal")]
        dns: Option<String>,
        /// Common name only (principal: tls:cn=NAME).
        #[arg(long, group = "principal")]
        cn: Option<String>,
        /// File name stem.
        #[arg(long)]
        out: String,
    },
}

fn pki(command: PkiCommand) -> Result<()> {
    use wrapd::pki::{self, ClientName, Validity};
    match command {
        PkiCommand::Init { dir, days } => {
            pki::init(&dir, Validity::days(days))?;
            println!("{}", dir.join("ca.pem").display());
        }
        PkiCommand::Issue { dir, days, kind } => {
            let ca = pki::read(&dir, "ca")?;
            let validity = Validity::days(days);
            let (out, pem) = match kind {
                IssueKind::Server { names, out } => {
                    (out, pki::issue_server(&ca, &names, validity)?)
                }
                IssueKind::Client { uri, dns, cn, out } => {
                    let name = match (uri, dns, cn) {
                        (Some(uri), _, _) => ClientName::Uri(uri),
                        (_, Some(dns), _) => ClientName::Dns(dns),
                        (_, _, Some(cn)) => ClientName::CommonName(cn),
                        _ => return Err(Error::Config("give --uri, --dns or --cn".into())),
                    };
                    (out, pki::issue_client(&ca, &name, validity)?)
                }
            };
            let (cert, key) = pki::write(&dir, &out, &pem)?;
            println!("{} {}", cert.display(), key.display());
        }
    }
    Ok(())
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    match run(cli.command) {
        Ok(()) => ExitCode::SUCCESS,
        Err(err) => {
            eprintln!("wrapd: error: {err}");
            ExitCode::FAILURE
        }
    }
}

fn run(command: Command) -> Result<()> {
    match command {
        Command::Serve { config, recovery } => {
            let mut config = load(&config, Logging::ForServe)?;
            recovery.apply(&mut config);
            serve(config, None)
        }
        Command::Dev {
            state_dir,
            postgres,
            recovery,
        } => {
            let setup = dev::prepare_with(&state_dir, postgres.as_deref())?;
            let mut config = load(&setup.config, Logging::ForServe)?;
            for change in &setup.migrated {
                eprintln!("wrapd: migrated {change}");
            }
            recovery.apply(&mut config);
            dev::provision(&setup, &config)?;
            serve(config, Some(&setup))
        }
        Command::Health {
            socket,
            kms,
            alive,
            timeout_ms,
        } => health(socket, kms, alive, Duration::from_millis(timeout_ms)),
        Command::Config(ConfigCommand::Migrate { config, write }) => migrate_config(&config, write),
        Command::Audit(AuditCommand::Head { config }) => {
            use wrapd::audit::HeadStore;
            let config = Config::load(&config)?;
            let audit = config
                .audit
                .ok_or_else(|| Error::Config("no [audit] in this configuration".into()))?;
            let chain = std::path::absolute(&audit.file)
                .map_err(|e| Error::Config(format!("{}: {e}", audit.file.display())))?;
            let chain = chain.display().to_string();
            let head = match &config.store {
                wrapd::config::StoreConfig::Sqlite(path) => {
                    wrapd::keystore::SqliteStore::open(path)?.audit_head(&chain)?
                }
                #[cfg(feature = "postgres")]
                wrapd::config::StoreConfig::Postgres { options, .. } => {
                    wrapd::keystore::PostgresStore::open(options)?
                        .audit_head(&format!("{}:{chain}", options.instance))?
                }
                #[cfg(not(feature = "postgres"))]
                wrapd::config::StoreConfig::Postgres { .. } => {
                    return Err(wrapd::server::without_postgres());
                }
            };
            match head {
                Some(head) => println!("{head}"),
                None => return Err(Error::Config("no chain head recorded for this log".into())),
            }
            Ok(())
        }
        Command::Pki(command) => pki(command),
        Command::MigrateStore {
            from,
            to,
            password_env,
        } => {
            init_logging("info", wrapd::config::LogFormat::Text);
            let path = from
                .strip_prefix("sqlite:")
                .ok_or_else(|| Error::Config("--from must be sqlite:PATH".into()))?;
            let url = to
                .strip_prefix("postgres:")
                .ok_or_else(|| Error::Config("--to must be postgres:postgresql://…".into()))?;
            let password = password_env
                .map(|var| {
                    std::env::var(&var)
                        .map(zeroize::Zeroizing::new)
                        .map_err(|_| Error::Config(format!("{var} is not set")))
                })
                .transpose()?;
            if !std::path::Path::new(path).exists() {
                return Err(Error::Config(format!("{path} does not exist")));
            }
            let source = wrapd::keystore::SqliteStore::open(std::path::Path::new(path))?;
            let options = wrapd::keystore::PostgresOptions {
                url: url.to_owned(),
                password,
                instance: "migrate-store".into(),
                tls_ca: None,
            };
            #[cfg(feature = "postgres")]
            {
                let target = wrapd::keystore::PostgresStore::open(&options)?;
                let (keys, aliases) = wrapd::keystore::copy_metadata(&source, &target)?;
                println!("migrated {keys} keys and {aliases} aliases into PostgreSQL");
                Ok(())
            }
            #[cfg(not(feature = "postgres"))]
            {
                let _ = (source, options);
                Err(wrapd::server::without_postgres())
            }
        }
        Command::Soak {
            config,
            concurrency,
            seconds,
            keys,
            rotate_every_ms,
        } => {
            let config = load(&config, Logging::Now)?;
            let options = bench::SoakOptions {
                concurrency: concurrency.clamp(1, 1024),
                duration: Duration::from_secs(seconds.max(1)),
                keys: keys.clamp(1, 100),
                rotate_every: Duration::from_millis(rotate_every_ms.max(10)),
            };
            let report = runtime()?.block_on(bench::soak(config, options))?;
            print!("{}", bench::format_soak(&report));
            if report.errors.is_empty() {
                Ok(())
            } else {
                Err(Error::Internal("the soak saw errors".into()))
            }
        }
        Command::Bench {
            config,
            key,
            concurrency,
            seconds,
            ops,
            no_flood,
            rounds,
            xks_endpoint,
            hsm_down_control,
        } => {
            let config = load(&config, Logging::Now)?;
            let options = BenchOptions {
                callers: if concurrency.is_empty() {
                    vec![1, 64]
                } else {
                    concurrency.iter().map(|c| (*c).clamp(1, 1024)).collect()
                },
                duration: Duration::from_secs(seconds.max(1)),
                ops: if ops.is_empty() {
                    vec![BenchOp::Unwrap, BenchOp::Generate, BenchOp::BatchUnwrap]
                } else {
                    ops
                },
                key,
                flood: !no_flood,
                rounds: rounds.clamp(1, 100),
                xks: xks_endpoint,
                hsm_down_control,
            };
            let rounds = runtime()?.block_on(bench::run(config, options))?;
            for (i, round) in rounds.iter().enumerate() {
                println!("round {} of {}:", i + 1, rounds.len());
                print!("{}", bench::format_round(round));
                println!();
            }
            if rounds.len() > 1 {
                print!("{}", bench::format_summary(&rounds));
            }
            Ok(())
        }
    }
}

/// When [`load`] starts logging.
#[derive(PartialEq)]
enum Logging {
    /// At once, logs only.
    Now,
    /// For `serve`: at once, unless the config exports spans (`[tracing]`); then `serve`
    /// starts logging and the span export together, inside its runtime.
    ForServe,
}

/// Loads the config, wipes the secrets' environment variables (PIN, access keys), starts
/// logging and points SoftHSM at its config file.
#[allow(unsafe_code)] // sets SOFTHSM2_CONF before SoftHSM loads; see the SAFETY comment
fn load(path: &Path, logging: Logging) -> Result<Config> {
    let config = Config::load(path)?;
    for var in &config.secret_envs {
        // SAFETY: no other thread exists yet (the tokio runtime is built later).
        unsafe { wrapd::hardening::scrub_env_var(var) };
    }
    if logging == Logging::Now || config.tracing.is_none() {
        init_logging(&config.log_filter, config.log_format);
    }
    // Logged once logging has started (with span export, `serve` starts it; these lines
    // then go to standard error, which the daemon's log also is).
    for warning in config.shared_secret_files() {
        if logging == Logging::Now || config.tracing.is_none() {
            tracing::warn!("{warning}");
        } else {
            eprintln!("wrapd: warning: {warning}");
        }
    }
    if let Some(conf) = &config.softhsm2_conf {
        // SAFETY: no other thread exists yet (the tokio runtime is built after this), so
        // nothing can read the environment concurrently.
        unsafe { std::env::set_var("SOFTHSM2_CONF", conf) };
    }
    Ok(config)
}

/// `wrapd config migrate`: the policy file a config names, with what releases renamed
/// rewritten (shown as a diff; with `write`, written, the old file kept as `FILE.bak`).
/// Only the `[policy] file` is read from the config: the rest (a PIN, say) need not be at
/// hand.
fn migrate_config(config: &Path, write: bool) -> Result<()> {
    use std::io::Write;
    let read = |path: &Path| {
        std::fs::read_to_string(path)
            .map_err(|e| Error::Config(format!("cannot read {}: {e}", path.display())))
    };
    let table: toml::Table = toml::from_str(&read(config)?)
        .map_err(|e| Error::Config(format!("{}: {}", config.display(), e.message())))?;
    let Some(file) = table
        .get("policy")
        .and_then(|p| p.get("file"))
        .and_then(|f| f.as_str())
    else {
        println!("{}: no [policy] file; nothing to migrate", config.display());
        return Ok(());
    };
    let policy = config.parent().unwrap_or(Path::new(".")).join(file);
    let text = read(&policy)?;
    let (new, changes) = wrapd::auth::migrate_policy_text(&text)?;
    if changes.is_empty() {
        println!("{}: nothing to migrate", policy.display());
        return Ok(());
    }
    print!(
        "{}",
        wrapd::auth::line_diff(&policy.display().to_string(), &text, &new)
    );
    for change in &changes {
        println!("# line {}: {}", change.line, change.why);
    }
    if let Err(err) = wrapd::auth::Policy::parse(&new) {
        println!("# still to fix by hand: {err}");
    }
    if !write {
        println!("# run again with --write to rewrite {}", policy.display());
        return Ok(());
    }
    let io = |what: &str, e: std::io::Error| Error::Config(format!("{what}: {e}"));
    let backup = policy.with_extension(format!(
        "{}.bak",
        policy.extension().and_then(|e| e.to_str()).unwrap_or("")
    ));
    std::fs::OpenOptions::new()
        .write(true)
        .create_new(true)
        .open(&backup)
        .and_then(|mut f| f.write_all(text.as_bytes()))
        .map_err(|e| {
            io(
                &format!("cannot keep the old file as {}", backup.display()),
                e,
            )
        })?;
    let mode = std::fs::metadata(&policy)
        .map_err(|e| io(&format!("{}", policy.display()), e))?
        .permissions();
    let dir = policy.parent().unwrap_or(Path::new("."));
    let mut staged = tempfile::NamedTempFile::new_in(dir)
        .map_err(|e| io(&format!("cannot write in {}", dir.display()), e))?;
    staged
        .write_all(new.as_bytes())
        .and_then(|()| staged.as_file().sync_all())
        .and_then(|()| staged.as_file().set_permissions(mode))
        .map_err(|e| io("cannot write the new policy", e))?;
    staged
        .persist(&policy)
        .map_err(|e| io(&format!("cannot replace {}", policy.display()), e.error))?;
    println!(
        "# {} rewritten; the old file is {}",
        policy.display(),
        backup.display()
    );
    Ok(())
}

/// `wrapd health`: one health question to a running daemon, over its unix socket or its KMS
/// plugin socket. No logging and no hardening: it runs every few seconds as a probe.
fn health(
    socket: Option<PathBuf>,
    kms: Option<PathBuf>,
    alive: bool,
    within: Duration,
) -> Result<()> {
    let unavailable = |what: String| Error::Unavailable(what);
    let asked = async {
        match (socket, kms) {
            (Some(socket), _) => {
                use tonic_health::pb::health_check_response::ServingStatus;
                use tonic_health::pb::{HealthCheckRequest, health_client::HealthClient};
                let channel = wrapd::client::connect_unix(&socket)
                    .await
                    .map_err(|e| unavailable(format!("cannot reach {}: {e}", socket.display())))?;
                let answer = HealthClient::new(channel)
                    .check(HealthCheckRequest {
                        service: String::new(),
                    })
                    .await
                    .map_err(|s| unavailable(format!("health check: {}", s.message())))?
                    .into_inner();
                let serving = answer.status == ServingStatus::Serving as i32;
                if serving || alive {
                    Ok(())
                } else {
                    Err(unavailable(
                        "the daemon is not serving (see its log)".into(),
                    ))
                }
            }
            (None, Some(kms)) => {
                use wrapd::kms_proto::StatusRequest;
                use wrapd::kms_proto::key_management_service_client::KeyManagementServiceClient;
                let channel = wrapd::client::connect_unix(&kms)
                    .await
                    .map_err(|e| unavailable(format!("cannot reach {}: {e}", kms.display())))?;
                let answer = KeyManagementServiceClient::new(channel)
                    .status(StatusRequest {})
                    .await
                    .map_err(|s| unavailable(format!("KMS plugin status: {}", s.message())))?
                    .into_inner();
                if answer.healthz == "ok" || alive {
                    Ok(())
                } else {
                    Err(unavailable(format!(
                        "the KMS plugin's healthz is {:?}",
                        answer.healthz
                    )))
                }
            }
            (None, None) => Err(Error::Config("give --socket or --kms".into())),
        }
    };
    tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .map_err(|e| Error::Internal(format!("cannot start the runtime: {e}")))?
        .block_on(async {
            tokio::time::timeout(within, asked)
                .await
                .unwrap_or_else(|_| {
                    Err(unavailable(format!(
                        "no answer within {} ms",
                        within.as_millis()
                    )))
                })
        })
}

fn runtime() -> Result<tokio::runtime::Runtime> {
    tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
        .map_err(|e| Error::Internal(format!("cannot start the runtime: {e}")))
}

fn serve(config: Config, dev: Option<&dev::DevSetup>) -> Result<()> {
    let runtime = runtime()?;
    let spans = match &config.tracing {
        Some(tracing) => {
            let _inside = runtime.enter();
            Some(init_logging_and_tracing(
                &config.log_filter,
                config.log_format,
                tracing,
            )?)
        }
        None => None,
    };
    let served = serve_on(&runtime, config, dev);
    if let Some(spans) = spans {
        let _inside = runtime.enter();
        // Without `otel` there is nothing to flush, and the guard holds nothing.
        #[cfg_attr(not(feature = "otel"), allow(clippy::drop_non_drop))]
        drop(spans); // flushes the last spans while the runtime still runs
    }
    served
}

fn serve_on(
    runtime: &tokio::runtime::Runtime,
    config: Config,
    dev: Option<&dev::DevSetup>,
) -> Result<()> {
    if let Some(setup) = dev {
        tracing::info!(dir = %setup.dir.display(), config = %setup.config.display(), "dev mode");
    }
    if wrapd::hardening::is_root() {
        if dev.is_some() {
            tracing::warn!("running as root: fine for a dev setup, never in production");
        } else if !config.process.allow_root {
            return Err(Error::Config(
                "refusing to run as root: run wrapd as its own user (see softhsm-config/cloudhsm.toml), or set [process] allow_root = true".into(),
            ));
        }
    }
    wrapd::hardening::harden(config.process.lock_memory)?;
    runtime.block_on(async {
        let shutdown = shutdown_signal()?;
        let daemon = Daemon::open(config).await?;
        let mut xks_key = None;
        if dev.is_some() {
            let keystore = daemon.keystore().clone();
            xks_key = tokio::task::spawn_blocking(move || {
                dev::ensure_kubernetes_key(&keystore)?;
                dev::ensure_xks_key(&keystore)
            })
            .await
            .map_err(|e| Error::Internal(e.to_string()))?
            .map(Some)?;
        }
        daemon
            .serve(shutdown, |ready| {
                use std::io::Write;
                if let (Some(setup), Some(aws)) = (dev, ready.aws) {
                    if let Err(err) = setup.write_aws_config(&format!("https://{aws}")) {
                        tracing::warn!(error = %err, "cannot write the dev AWS config file");
                    }
                }
                if let (Some(setup), Some(xks), Some(key)) = (dev, ready.xks, &xks_key) {
                    if let Err(err) = setup.write_xks_env(xks, key) {
                        tracing::warn!(error = %err, "cannot write the dev XKS environment file");
                    }
                }
                let mut out = std::io::stdout().lock();
                // The ready line is the contract with supervisors and tests.
                let _ = writeln!(out, "{}", ready.line());
                let _ = out.flush();
            })
            .await
    })
}

#[cfg(test)]
mod tests {
    use clap::CommandFactory;

    #[test]
    fn the_command_line_is_consistent() {
        // Catches clashing argument names and other definition errors clap reports at runtime.
        super::Cli::command().debug_assert();
    }
}
