//! `wrapd`: the key daemon. Parses arguments, loads the config, calls into the library.

use std::path::{Path, PathBuf};
use std::process::ExitCode;
use std::time::Duration;

use clap::{Parser, Subcommand};
use wrapd::bench::{self, BenchOp, BenchOptions};
use wrapd::config::Config;
use wrapd::server::{Daemon, init_logging, shutdown_signal};
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
    },
    /// Serve a self-contained development setup: SoftHSM token, PIN, store and config in DIR.
    Dev {
        /// Where the dev token, PIN, store and config live (created on first run).
        #[arg(long, default_value = ".wrapd-dev")]
        state_dir: PathBuf,
    },
    /// Measure a running daemon (ops/s, latency percentiles) against the raw PKCS#11 rate.
    Bench {
        /// The running daemon's configuration (socket and token).
        #[arg(long)]
        config: PathBuf,
        /// Key id or alias to use; a new key is created when absent.
        #[arg(long)]
        key: Option<String>,
        /// Concurrent callers.
        #[arg(long, default_value_t = 16)]
        concurrency: usize,
        /// Seconds per operation and path.
        #[arg(long, default_value_t = 5)]
        seconds: u64,
        /// Operations to measure (repeatable); default: unwrap and generate.
        #[arg(long = "op", value_enum)]
        ops: Vec<BenchOp>,
    },
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
        Command::Serve { config } => {
            let config = load(&config)?;
            serve(config, None)
        }
        Command::Dev { state_dir } => {
            let setup = dev::prepare(&state_dir)?;
            let config = load(&setup.config)?;
            dev::provision(&setup, &config)?;
            serve(config, Some(&setup))
        }
        Command::Bench {
            config,
            key,
            concurrency,
            seconds,
            ops,
        } => {
            let config = load(&config)?;
            let options = BenchOptions {
                concurrency: concurrency.clamp(1, 1024),
                duration: Duration::from_secs(seconds.max(1)),
                ops: if ops.is_empty() {
                    vec![BenchOp::Unwrap, BenchOp::Generate]
                } else {
                    ops
                },
                key,
            };
            let rows = runtime()?.block_on(bench::run(config, options.clone()))?;
            print!("{}", bench::format_table(&rows, options.concurrency));
            Ok(())
        }
    }
}

/// Loads the config, starts logging and points SoftHSM at its config file.
fn load(path: &Path) -> Result<Config> {
    let config = Config::load(path)?;
    init_logging(&config.log_filter, config.log_format);
    if let Some(conf) = &config.softhsm2_conf {
        // SAFETY: no other thread exists yet (the tokio runtime is built after this), so
        // nothing can read the environment concurrently.
        unsafe { std::env::set_var("SOFTHSM2_CONF", conf) };
    }
    Ok(config)
}

fn runtime() -> Result<tokio::runtime::Runtime> {
    tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
        .map_err(|e| Error::Internal(format!("cannot start the runtime: {e}")))
}

fn serve(config: Config, dev: Option<&dev::DevSetup>) -> Result<()> {
    if let Some(setup) = dev {
        tracing::info!(dir = %setup.dir.display(), config = %setup.config.display(), "dev mode");
    }
    runtime()?.block_on(async {
        let shutdown = shutdown_signal()?;
        let daemon = Daemon::open(config).await?;
        daemon
            .serve(shutdown, |ready| {
                use std::io::Write;
                let mut out = std::io::stdout().lock();
                // The ready line is the contract with supervisors and tests.
                let _ = writeln!(out, "{}", ready.line());
                let _ = out.flush();
            })
            .await
    })
}
