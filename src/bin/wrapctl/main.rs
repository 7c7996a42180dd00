//! `wrapctl`: the command-line client of wrapd.
//!
//! | file | what |
//! |---|---|
//! | `main.rs` | the command line and dispatch |
//! | `connection.rs` | the shared connection flags (`--socket`, `--endpoint`, `--tls-*`) |
//! | `keys.rs`, `aliases.rs`, `key_policy.rs`, `grants.rs`, `datakey.rs`, `audit.rs` | one command group each |
//! | `files.rs` | `encrypt` / `decrypt` of files and pipes |
//! | `rewrap.rs`, `census.rs` | `rewrap` and `census` of stored messages (and their report, shared by `s3 rewrap`) |
//! | `tree.rs` | the files under the paths a command names |
//! | `bench.rs` | `wrapctl bench` |
//! | `s3.rs` | `wrapctl s3 put` / `get`: objects in the S3 Encryption Client format (feature `s3`) |
//! | `output.rs` | results as JSON (`--json`, from `Serialize`) or tables for people |
//! | `error.rs` | the typed error and its exit codes |

mod aliases;
mod audit;
mod bench;
mod census;
mod connection;
mod datakey;
mod error;
mod files;
mod grants;
mod key_policy;
mod keys;
mod output;
mod rewrap;
#[cfg(feature = "s3")]
mod s3;
mod tree;

use std::collections::HashMap;
use std::path::PathBuf;
use std::process::ExitCode;

use clap::{Args, Parser, Subcommand};
use tonic::transport::Channel;

use crate::connection::ConnectionArgs;
use crate::error::{CliError, Failure};
use crate::output::ErasedReport;

#[derive(Parser)]
#[command(
    version,
    about = "wrapctl: manage keys and data keys on a wrapd daemon",
    after_help = "Exit codes: 0 ok, 1 other, 2 usage, 3 not found, 4 denied, 5 invalid input or ciphertext, 6 unavailable, 7 wrong key state."
)]
struct Cli {
    #[command(flatten)]
    connection: ConnectionArgs,
    /// Print machine-readable JSON (bytes as base64).
    #[arg(long, global = true)]
    json: bool,
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Manage master keys.
    #[command(subcommand)]
    Keys(keys::KeysCommand),
    /// Manage aliases.
    #[command(subcommand)]
    Aliases(aliases::AliasesCommand),
    /// Read and replace key policies.
    #[command(subcommand)]
    KeyPolicy(key_policy::KeyPolicyCommand),
    /// Make, list, retire and revoke grants.
    #[command(subcommand)]
    Grants(grants::GrantsCommand),
    /// Generate, wrap, unwrap and re-wrap data keys.
    #[command(subcommand)]
    Datakey(datakey::DatakeyCommand),
    /// Work with audit logs (offline).
    #[command(subcommand)]
    Audit(audit::AuditCommand),
    /// Encrypt a file into an AWS Encryption SDK message under one or more wrapd keys.
    Encrypt {
        /// Key id or alias (repeatable: the data key is wrapped under each). KEY@DAEMON names
        /// a key on another daemon: a unix socket path or an https:// URL (mutual TLS with
        /// the --tls-* files).
        #[arg(long = "key", required = true)]
        keys: Vec<String>,
        /// Encryption context entry K=V (repeatable).
        #[arg(long = "context", value_parser = parse_entry)]
        context: Vec<(String, String)>,
        #[command(flatten)]
        files: FileArgs,
        /// Plaintext bytes per frame (a multiple of 16).
        #[arg(long, default_value_t = wrapd::client::message::DEFAULT_FRAME_LENGTH)]
        frame_length: u32,
    },
    /// Decrypt an AWS Encryption SDK message; a failed decrypt leaves no output file.
    Decrypt {
        /// Entry K=V the message's encryption context must contain (repeatable).
        #[arg(long = "context", value_parser = parse_entry)]
        context: Vec<(String, String)>,
        /// Another daemon to offer the message's data keys to if the first cannot unwrap
        /// (repeatable): a unix socket path or an https:// URL. With --daemon, an unreachable
        /// daemon is skipped as long as one is reachable.
        #[arg(long = "daemon")]
        daemons: Vec<String>,
        /// Refuse messages with more encrypted data keys than this (as the official SDKs'
        /// max_encrypted_data_keys).
        #[arg(long, default_value_t = 10)]
        max_encrypted_data_keys: u16,
        #[command(flatten)]
        files: FileArgs,
    },
    /// Re-wrap the data keys of stored Encryption SDK messages under their key's current
    /// version (or --to KEY), after a rotation: only the header changes, every frame byte
    /// stays, and each file is replaced atomically (a rerun skips what is up to date).
    /// Signed messages (the official SDKs' default suite) cannot be re-wrapped.
    Rewrap {
        /// Files, or directories (walked recursively; links inside them are not followed).
        #[arg(required = true)]
        paths: Vec<PathBuf>,
        /// Move the data keys under --from KEY to this key (id or alias) instead.
        #[arg(long, requires = "from")]
        to: Option<String>,
        /// With --to: the key whose data keys move (no other key's do).
        #[arg(long, requires = "to")]
        from: Option<String>,
        /// Say what would be re-wrapped; change nothing.
        #[arg(long)]
        dry_run: bool,
        /// Refuse messages with more encrypted data keys than this.
        #[arg(long, default_value_t = 10)]
        max_encrypted_data_keys: u16,
    },
    /// Count the objects and bytes each key version protects, from headers alone (no
    /// decryption, no daemon): Encryption SDK messages under PATH, or S3 Encryption Client
    /// and SSE-C objects under s3://BUCKET/PREFIX.
    Census {
        /// Files or directories, or s3://BUCKET/PREFIX.
        #[arg(required = true)]
        paths: Vec<String>,
        /// Count messages with at most this many encrypted data keys (others are not
        /// recognized).
        #[arg(long, default_value_t = 10)]
        max_encrypted_data_keys: u16,
        #[cfg(feature = "s3")]
        #[command(flatten)]
        s3: s3::S3Args,
    },
    /// Measure thin-client throughput next to `openssl speed` (library, files, 1 KiB
    /// messages with and without the data key cache).
    Bench(bench::BenchArgs),
    /// Client-side encrypted objects in S3, compatible with the official S3 Encryption
    /// Clients (V2 format).
    #[cfg(feature = "s3")]
    #[command(subcommand)]
    S3(s3::S3Command),
}

/// Where `encrypt` and `decrypt` read and write.
#[derive(Args)]
struct FileArgs {
    /// Input file, or - for stdin.
    #[arg(long)]
    input: String,
    /// Output file, or - for stdout.
    #[arg(long)]
    output: String,
}

/// `K=V`.
pub(crate) fn parse_entry(s: &str) -> Result<(String, String), String> {
    s.split_once('=')
        .map(|(k, v)| (k.to_owned(), v.to_owned()))
        .ok_or_else(|| format!("expected K=V, got {s:?}"))
}

/// A daemon's error as `Code: message` (the bench's own errors).
pub(crate) fn status(s: tonic::Status) -> String {
    format!("{:?}: {}", s.code(), s.message())
}

#[tokio::main]
async fn main() -> ExitCode {
    let cli = Cli::parse();
    match run(cli).await {
        Ok(()) => ExitCode::SUCCESS,
        Err(err) => {
            eprintln!("wrapctl: error: {err}");
            error::exit_code(&err)
        }
    }
}

async fn run(cli: Cli) -> Result<(), CliError> {
    let writes_data_to_stdout = matches!(
        &cli.command,
        Command::Encrypt { files, .. } | Command::Decrypt { files, .. } if files.output == "-"
    );
    let connection = cli.connection;
    let report: Box<dyn ErasedReport> = match cli.command {
        Command::Keys(cmd) => keys::run(connection.connect().await?, cmd).await?,
        Command::Aliases(cmd) => aliases::run(connection.connect().await?, cmd).await?,
        Command::KeyPolicy(cmd) => key_policy::run(connection.connect().await?, cmd).await?,
        Command::Grants(cmd) => grants::run(connection.connect().await?, cmd).await?,
        Command::Datakey(cmd) => datakey::run(connection.connect().await?, cmd).await?,
        Command::Audit(cmd) => audit::run(cmd)?,
        Command::Encrypt {
            keys,
            context,
            files: io,
            frame_length,
        } => {
            // Several keys on one daemon share its connection.
            let mut channels: HashMap<Option<String>, Channel> = HashMap::new();
            let mut ring = Vec::new();
            for spec in keys {
                let (key, daemon) = match spec.split_once('@') {
                    Some((key, daemon)) => (key.to_owned(), Some(daemon.to_owned())),
                    None => (spec, None),
                };
                let channel = match channels.get(&daemon) {
                    Some(channel) => channel.clone(),
                    None => {
                        let channel = match &daemon {
                            None => connection.connect().await?,
                            Some(daemon) => connection.connect_daemon(daemon).await?,
                        };
                        channels.insert(daemon, channel.clone());
                        channel
                    }
                };
                ring.push((key, channel));
            }
            files::encrypt(ring, context, &io.input, &io.output, frame_length).await?
        }
        Command::Decrypt {
            context,
            daemons,
            max_encrypted_data_keys,
            files: io,
        } => {
            let mut channels = Vec::new();
            let mut failures = Vec::new();
            match connection.connect().await {
                Ok(channel) => channels.push(channel),
                Err(e) if daemons.is_empty() => return Err(e),
                Err(e) => failures.push(e.message),
            }
            for daemon in &daemons {
                match connection.connect_daemon(daemon).await {
                    Ok(channel) => channels.push(channel),
                    Err(e) => failures.push(e.message),
                }
            }
            if channels.is_empty() {
                return Err(CliError::new(Failure::Unavailable, failures.join("; ")));
            }
            let limits = wrapd::client::message::DecryptLimits {
                max_encrypted_data_keys,
            };
            files::decrypt(channels, context, limits, &io.input, &io.output).await?
        }
        #[cfg(feature = "s3")]
        Command::S3(cmd) => {
            if let s3::S3Command::Rewrap(args) = cmd {
                let report = s3::rewrap(&connection, args).await?;
                let failure = report.failure();
                output::print(&report, cli.json);
                return failure.map_or(Ok(()), Err);
            }
            s3::run(&connection, cmd).await?
        }
        Command::Rewrap {
            paths,
            to,
            from,
            dry_run,
            max_encrypted_data_keys,
        } => {
            let channel = connection.connect().await?;
            let moving = from.zip(to);
            let report =
                rewrap::run(channel, &paths, moving, dry_run, max_encrypted_data_keys).await;
            let failure = report.failure();
            output::print(&report, cli.json);
            return failure.map_or(Ok(()), Err);
        }
        Command::Census {
            paths,
            max_encrypted_data_keys,
            #[cfg(feature = "s3")]
            s3,
        } => {
            let mut census = wrapd::client::census::Census::default();
            let mut files = Vec::new();
            for path in paths {
                if path.starts_with("s3://") {
                    #[cfg(feature = "s3")]
                    s3::census(&mut census, &path, &s3).await?;
                    #[cfg(not(feature = "s3"))]
                    return Err(CliError::usage(
                        "this wrapctl was built without S3 support (feature s3)",
                    ));
                } else {
                    files.push(PathBuf::from(path));
                }
            }
            census::count_files(&mut census, &files, max_encrypted_data_keys);
            let report = census::CensusReport::from(&census);
            let failure = report.failure();
            output::print(&report, cli.json);
            return failure.map_or(Ok(()), Err);
        }
        Command::Bench(args) => {
            let channel = if args.offline() {
                None
            } else {
                Some(connection.connect().await?)
            };
            let rows = bench::run(args, channel, connection.args()).await?;
            Box::new(bench::BenchReport(rows))
        }
    };
    // With --output -, stdout carries the data; the summary would corrupt it.
    if !writes_data_to_stdout {
        output::print(&*report, cli.json);
    }
    Ok(())
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
