//! `wrapctl`: the command-line client of wrapd.
//!
//! This file: the command line, connecting (`--socket`, `--endpoint`, `KEY@DAEMON`) and the
//! key, alias, data key and audit commands. `files.rs`: `encrypt` / `decrypt` of files and
//! pipes. `bench.rs`: `wrapctl bench`.

use std::collections::HashMap;
use std::path::PathBuf;
use std::process::ExitCode;

use base64::Engine;
use base64::engine::general_purpose::STANDARD as B64;
use clap::{Args, Parser, Subcommand};
use serde_json::{Value, json};
use tonic::transport::Channel;
use wrapd::client::{DataKeyServiceClient, KeyServiceClient, TlsFiles, connect_tls, connect_unix};
use wrapd::proto::{
    Alias, AliasRequest, CreateKeyRequest, GenerateDataKeyRequest, KeyMetadata, KeyRef, KeyState,
    ListAliasesRequest, ListKeysRequest, ReWrapRequest, ScheduleKeyDeletionRequest, UnwrapRequest,
    WrapRequest,
};

#[derive(Parser)]
#[command(
    version,
    about = "wrapctl: manage keys and data keys on a wrapd daemon"
)]
struct Cli {
    /// The daemon's unix socket (used unless --endpoint is given).
    #[arg(
        long,
        env = "WRAPD_SOCKET",
        global = true,
        default_value = ".wrapd-dev/wrapd.sock"
    )]
    socket: PathBuf,
    /// The daemon's TCP endpoint, e.g. https://127.0.0.1:8443 (mutual TLS).
    #[arg(long, env = "WRAPD_ENDPOINT", global = true)]
    endpoint: Option<String>,
    /// CA certificate for --endpoint (PEM).
    #[arg(
        long = "tls-ca",
        env = "WRAPD_CA",
        global = true,
        default_value = ".wrapd-dev/pki/ca.pem"
    )]
    tls_ca: PathBuf,
    /// Client certificate for --endpoint (PEM).
    #[arg(
        long = "tls-cert",
        env = "WRAPD_CERT",
        global = true,
        default_value = ".wrapd-dev/pki/client.pem"
    )]
    tls_cert: PathBuf,
    /// Client key for --endpoint (PEM).
    #[arg(
        long = "tls-key",
        env = "WRAPD_KEY",
        global = true,
        default_value = ".wrapd-dev/pki/client.key"
    )]
    tls_key: PathBuf,
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
    Keys(KeysCommand),
    /// Manage aliases.
    #[command(subcommand)]
    Aliases(AliasesCommand),
    /// Generate, wrap, unwrap and re-wrap data keys.
    #[command(subcommand)]
    Datakey(DatakeyCommand),
    /// Work with audit logs (offline).
    #[command(subcommand)]
    Audit(AuditCommand),
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
    /// Measure thin-client throughput next to `openssl speed` (library, files, 1 KiB
    /// messages with and without the data key cache).
    Bench(bench::BenchArgs),
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

#[derive(Subcommand)]
enum AuditCommand {
    /// Verify an audit log's hash chain; report the first broken, edited, reordered or
    /// missing line.
    Verify {
        /// The audit log file.
        file: PathBuf,
        /// What the first line must follow (default: whatever it names; 64 zeros for a new
        /// log, the previous file's last hash after a rotation).
        #[arg(long)]
        anchor: Option<String>,
        /// The hash the last line must have (a value recorded earlier: detects truncation).
        #[arg(long)]
        expect_last: Option<String>,
        /// A chain head recorded earlier, `SEQ:HASH` (`wrapd audit head` prints the one in
        /// the metadata store): the file must reach it.
        #[arg(long)]
        head: Option<String>,
        /// Succeed although the log holds `AuditGap` records (gaps an operator accepted at
        /// start-up); they are still listed.
        #[arg(long)]
        allow_gaps: bool,
    },
}

#[derive(Subcommand)]
enum KeysCommand {
    /// Create a key (AES-256 in the token), optionally with an alias.
    Create {
        /// Free-text description.
        #[arg(long, default_value = "")]
        description: String,
        /// An alias to create with it (alias/NAME).
        #[arg(long)]
        alias: Option<String>,
    },
    /// List keys (all pages, or one page with --page-size/--page-token).
    List {
        /// Keys per page.
        #[arg(long, default_value_t = 0)]
        page_size: u32,
        /// Start from this page token (prints only that page).
        #[arg(long)]
        page_token: Option<String>,
    },
    /// Describe a key by id or alias.
    Describe {
        /// Key id or alias.
        key: String,
    },
    /// Add a new version to a key.
    Rotate {
        /// Key id or alias.
        key: String,
    },
    /// Enable a key.
    Enable {
        /// Key id or alias.
        key: String,
    },
    /// Disable a key.
    Disable {
        /// Key id or alias.
        key: String,
    },
    /// Schedule a key's destruction after 7 to 30 days.
    ScheduleDeletion {
        /// Key id or alias.
        key: String,
        /// Waiting period in days.
        #[arg(long, default_value_t = 30)]
        days: u32,
    },
    /// Cancel a scheduled deletion (the key comes back disabled).
    CancelDeletion {
        /// Key id or alias.
        key: String,
    },
}

#[derive(Subcommand)]
enum AliasesCommand {
    /// Create an alias for a key.
    Create {
        /// alias/NAME.
        alias: String,
        /// Key id or alias.
        key: String,
    },
    /// Point an alias at another key.
    Update {
        /// alias/NAME.
        alias: String,
        /// Key id or alias.
        key: String,
    },
    /// Delete an alias.
    Delete {
        /// alias/NAME.
        alias: String,
    },
    /// List aliases, optionally only those of one key.
    List {
        /// Key id or alias.
        #[arg(long)]
        key: Option<String>,
    },
}

#[derive(Args)]
struct ContextArgs {
    /// Encryption context entry K=V (repeatable).
    #[arg(long = "context", value_parser = parse_entry)]
    context: Vec<(String, String)>,
}

#[derive(Subcommand)]
enum DatakeyCommand {
    /// Generate a data key: plaintext and wrapped.
    Generate {
        /// Key id or alias.
        key: String,
        /// Length in bytes (1 to 64).
        #[arg(long, default_value_t = 32)]
        bytes: u32,
        /// Return only the wrapped key.
        #[arg(long)]
        no_plaintext: bool,
        #[command(flatten)]
        context: ContextArgs,
    },
    /// Wrap plaintext (base64, 1 to 4096 bytes).
    Wrap {
        /// Key id or alias.
        key: String,
        /// The plaintext, base64.
        #[arg(long)]
        plaintext: String,
        #[command(flatten)]
        context: ContextArgs,
    },
    /// Unwrap a blob (base64).
    Unwrap {
        /// The ciphertext blob, base64.
        #[arg(long)]
        blob: String,
        /// Require the blob to be wrapped under this key.
        #[arg(long)]
        key: Option<String>,
        #[command(flatten)]
        context: ContextArgs,
    },
    /// Re-wrap a blob under the newest version of a key, without exposing the plaintext.
    Rewrap {
        /// The ciphertext blob, base64.
        #[arg(long)]
        blob: String,
        /// Destination key (default: the blob's own key).
        #[arg(long)]
        to: Option<String>,
        /// Source context entry K=V (repeatable).
        #[arg(long = "source-context", value_parser = parse_entry)]
        source_context: Vec<(String, String)>,
        /// Destination context entry K=V (repeatable; default: the source context).
        #[arg(long = "destination-context", value_parser = parse_entry)]
        destination_context: Vec<(String, String)>,
    },
}

fn parse_entry(s: &str) -> Result<(String, String), String> {
    s.split_once('=')
        .map(|(k, v)| (k.to_owned(), v.to_owned()))
        .ok_or_else(|| format!("expected K=V, got {s:?}"))
}

fn to_map(entries: Vec<(String, String)>) -> HashMap<String, String> {
    entries.into_iter().collect()
}

fn decode(what: &str, s: &str) -> Result<Vec<u8>, String> {
    B64.decode(s.trim())
        .map_err(|e| format!("--{what} is not valid base64: {e}"))
}

#[tokio::main]
async fn main() -> ExitCode {
    let cli = Cli::parse();
    match run(cli).await {
        Ok(()) => ExitCode::SUCCESS,
        Err(message) => {
            eprintln!("wrapctl: error: {message}");
            ExitCode::FAILURE
        }
    }
}

fn audit_verify(
    file: &PathBuf,
    anchor: Option<&str>,
    expect_last: Option<&str>,
    head: Option<&str>,
    allow_gaps: bool,
) -> Result<Value, String> {
    let head = head
        .map(|h| {
            wrapd::audit::ChainHead::parse(h)
                .ok_or_else(|| format!("--head must be SEQ:HASH (64 hex digits), not {h:?}"))
        })
        .transpose()?;
    let reader = std::fs::File::open(file)
        .map(std::io::BufReader::new)
        .map_err(|e| format!("cannot open {}: {e}", file.display()))?;
    let options = wrapd::audit::VerifyOptions {
        anchor,
        expect_last,
        head: head.as_ref(),
    };
    match wrapd::audit::verify_with(reader, &options) {
        Ok(verified) => {
            let gaps: Vec<Value> = verified
                .gaps
                .iter()
                .map(|(line, what)| json!({ "line": line, "missing": what }))
                .collect();
            if !gaps.is_empty() && !allow_gaps {
                let first = &verified.gaps[0];
                return Err(format!(
                    "{}: the chain is linked, but holds {} accepted gap(s); first at line {}: {} (--allow-gaps to accept)",
                    file.display(),
                    gaps.len(),
                    first.0,
                    first.1
                ));
            }
            Ok(json!({
                "status": if gaps.is_empty() { "intact" } else { "intact-with-gaps" },
                "records": verified.records,
                "anchor": verified.anchor,
                "last_seq": verified.last_seq,
                "last_hash": verified.last_hash,
                "gaps": gaps,
            }))
        }
        Err(broken) => Err(format!("{}: broken at {broken}", file.display())),
    }
}

mod bench;
mod files;

fn status(s: tonic::Status) -> String {
    format!("{:?}: {}", s.code(), s.message())
}

/// Where and how to reach the daemon.
struct Target {
    socket: PathBuf,
    endpoint: Option<String>,
    tls: TlsFiles,
}

impl Target {
    /// The command-line flags that reach this target (for child `wrapctl` processes).
    fn args(&self) -> Vec<String> {
        let mut args = vec!["--socket".to_owned(), self.socket.display().to_string()];
        if let Some(endpoint) = &self.endpoint {
            for (flag, value) in [
                ("--endpoint", endpoint.clone()),
                ("--tls-ca", self.tls.ca.display().to_string()),
                ("--tls-cert", self.tls.cert.display().to_string()),
                ("--tls-key", self.tls.key.display().to_string()),
            ] {
                args.push(flag.to_owned());
                args.push(value);
            }
        }
        args
    }
}

/// Connects to a daemon named on the command line: an https:// URL (mutual TLS with `tls`)
/// or a unix socket path.
async fn connect_daemon(daemon: &str, tls: &TlsFiles) -> Result<Channel, String> {
    if daemon.starts_with("https://") {
        connect_tls(daemon, tls).await
    } else {
        connect_unix(daemon).await
    }
    .map_err(|e| e.to_string())
}

async fn connect(target: &Target) -> Result<Channel, String> {
    match &target.endpoint {
        Some(endpoint) => connect_tls(endpoint, &target.tls).await,
        None => connect_unix(&target.socket).await,
    }
    .map_err(|e| e.to_string())
}

async fn run(cli: Cli) -> Result<(), String> {
    let cli_json = cli.json;
    let is_bench = matches!(&cli.command, Command::Bench(_));
    let writes_data_to_stdout = matches!(
        &cli.command,
        Command::Encrypt { files, .. } | Command::Decrypt { files, .. } if files.output == "-"
    );
    let target = Target {
        socket: cli.socket,
        endpoint: cli.endpoint,
        tls: TlsFiles {
            ca: cli.tls_ca,
            cert: cli.tls_cert,
            key: cli.tls_key,
        },
    };
    let out = match cli.command {
        Command::Audit(AuditCommand::Verify {
            ref file,
            ref anchor,
            ref expect_last,
            ref head,
            allow_gaps,
        }) => audit_verify(
            file,
            anchor.as_deref(),
            expect_last.as_deref(),
            head.as_deref(),
            allow_gaps,
        )?,
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
                            None => connect(&target).await?,
                            Some(daemon) => connect_daemon(daemon, &target.tls).await?,
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
            match connect(&target).await {
                Ok(channel) => channels.push(channel),
                Err(e) if daemons.is_empty() => return Err(e),
                Err(e) => failures.push(e),
            }
            for daemon in &daemons {
                match connect_daemon(daemon, &target.tls).await {
                    Ok(channel) => channels.push(channel),
                    Err(e) => failures.push(e),
                }
            }
            if channels.is_empty() {
                return Err(failures.join("; "));
            }
            let limits = wrapd::client::message::DecryptLimits {
                max_encrypted_data_keys,
            };
            files::decrypt(channels, context, limits, &io.input, &io.output).await?
        }
        Command::Bench(args) => {
            let channel = if args.offline() {
                None
            } else {
                Some(connect(&target).await?)
            };
            bench::run(args, channel, target.args()).await?
        }
        Command::Keys(cmd) => keys(connect(&target).await?, cmd).await?,
        Command::Aliases(cmd) => aliases(connect(&target).await?, cmd).await?,
        Command::Datakey(cmd) => datakey(connect(&target).await?, cmd).await?,
    };
    if writes_data_to_stdout {
        // stdout carries the data; the summary would corrupt it.
    } else if cli_json {
        println!("{out}");
    } else if is_bench {
        bench::print_table(&out);
    } else {
        print_human(&out);
    }
    Ok(())
}

fn print_human(value: &Value) {
    match value {
        Value::Object(map) => {
            for (k, v) in map {
                match v {
                    Value::String(s) => println!("{k}: {s}"),
                    Value::Array(items) => {
                        println!("{k}:");
                        for item in items {
                            match item {
                                Value::Object(_) => {
                                    let line = item
                                        .as_object()
                                        .map(|m| {
                                            m.iter()
                                                .map(|(k, v)| format!("{k}={}", plain(v)))
                                                .collect::<Vec<_>>()
                                                .join(" ")
                                        })
                                        .unwrap_or_default();
                                    println!("  {line}");
                                }
                                other => println!("  {}", plain(other)),
                            }
                        }
                    }
                    other => println!("{k}: {other}"),
                }
            }
        }
        other => println!("{other}"),
    }
}

fn plain(v: &Value) -> String {
    match v {
        Value::String(s) => s.clone(),
        other => other.to_string(),
    }
}

fn timestamp(t: &Option<prost_types::Timestamp>) -> Value {
    t.as_ref()
        .map_or(Value::Null, |t| Value::String(t.to_string()))
}

fn key_json(k: &KeyMetadata) -> Value {
    json!({
        "key_id": k.key_id,
        "state": KeyState::try_from(k.state).map_or("UNKNOWN", |s| s.as_str_name()),
        "description": k.description,
        "current_version": k.current_version,
        "aliases": k.aliases,
        "created_at": timestamp(&k.created_at),
        "deletion_date": timestamp(&k.deletion_date),
        "versions": k.versions.iter().map(|v| json!({
            "version": v.version,
            "created_at": timestamp(&v.created_at),
            "wrap_count": v.wrap_count,
            "available": v.available,
        })).collect::<Vec<_>>(),
    })
}

fn alias_json(a: &Alias) -> Value {
    json!({ "alias_name": a.alias_name, "key_id": a.key_id })
}

async fn keys(channel: Channel, cmd: KeysCommand) -> Result<Value, String> {
    let mut client = KeyServiceClient::new(channel);
    let key_ref = |key: String| KeyRef { key_id: key };
    let metadata = match cmd {
        KeysCommand::Create { description, alias } => {
            client
                .create_key(CreateKeyRequest {
                    description,
                    alias: alias.unwrap_or_default(),
                })
                .await
        }
        KeysCommand::Describe { key } => client.describe_key(key_ref(key)).await,
        KeysCommand::Rotate { key } => client.rotate_key(key_ref(key)).await,
        KeysCommand::Enable { key } => client.enable_key(key_ref(key)).await,
        KeysCommand::Disable { key } => client.disable_key(key_ref(key)).await,
        KeysCommand::ScheduleDeletion { key, days } => {
            client
                .schedule_key_deletion(ScheduleKeyDeletionRequest {
                    key_id: key,
                    pending_window_days: days,
                })
                .await
        }
        KeysCommand::CancelDeletion { key } => client.cancel_key_deletion(key_ref(key)).await,
        KeysCommand::List {
            page_size,
            page_token,
        } => {
            let one_page = page_token.is_some();
            let mut token = page_token.unwrap_or_default();
            let mut keys = Vec::new();
            loop {
                let page = client
                    .list_keys(ListKeysRequest {
                        page_size,
                        page_token: token,
                    })
                    .await
                    .map_err(status)?
                    .into_inner();
                keys.extend(page.keys.iter().map(key_json));
                token = page.next_page_token;
                if token.is_empty() || one_page {
                    break;
                }
            }
            return Ok(
                json!({ "keys": keys, "next_page_token": if one_page { token } else { String::new() } }),
            );
        }
    };
    Ok(key_json(&metadata.map_err(status)?.into_inner()))
}

async fn aliases(channel: Channel, cmd: AliasesCommand) -> Result<Value, String> {
    let mut client = KeyServiceClient::new(channel);
    let alias = match cmd {
        AliasesCommand::Create { alias, key } => {
            client
                .create_alias(AliasRequest {
                    alias_name: alias,
                    key_id: key,
                })
                .await
        }
        AliasesCommand::Update { alias, key } => {
            client
                .update_alias(AliasRequest {
                    alias_name: alias,
                    key_id: key,
                })
                .await
        }
        AliasesCommand::Delete { alias } => {
            client
                .delete_alias(AliasRequest {
                    alias_name: alias,
                    key_id: String::new(),
                })
                .await
        }
        AliasesCommand::List { key } => {
            let mut token = String::new();
            let mut aliases = Vec::new();
            loop {
                let page = client
                    .list_aliases(ListAliasesRequest {
                        key_id: key.clone().unwrap_or_default(),
                        page_size: 0,
                        page_token: token,
                    })
                    .await
                    .map_err(status)?
                    .into_inner();
                aliases.extend(page.aliases.iter().map(alias_json));
                token = page.next_page_token;
                if token.is_empty() {
                    break;
                }
            }
            return Ok(json!({ "aliases": aliases }));
        }
    };
    Ok(alias_json(&alias.map_err(status)?.into_inner()))
}

async fn datakey(channel: Channel, cmd: DatakeyCommand) -> Result<Value, String> {
    let mut client = DataKeyServiceClient::new(channel);
    match cmd {
        DatakeyCommand::Generate {
            key,
            bytes,
            no_plaintext,
            context,
        } => {
            let request = GenerateDataKeyRequest {
                key_id: key,
                encryption_context: to_map(context.context),
                number_of_bytes: bytes,
            };
            if no_plaintext {
                let r = client
                    .generate_data_key_without_plaintext(request)
                    .await
                    .map_err(status)?
                    .into_inner();
                Ok(json!({
                    "ciphertext_blob": B64.encode(&r.ciphertext_blob),
                    "key_id": r.key_id,
                    "key_version": r.key_version,
                }))
            } else {
                let r = client
                    .generate_data_key(request)
                    .await
                    .map_err(status)?
                    .into_inner();
                Ok(json!({
                    "plaintext": B64.encode(&r.plaintext),
                    "ciphertext_blob": B64.encode(&r.ciphertext_blob),
                    "key_id": r.key_id,
                    "key_version": r.key_version,
                }))
            }
        }
        DatakeyCommand::Wrap {
            key,
            plaintext,
            context,
        } => {
            let r = client
                .wrap(WrapRequest {
                    key_id: key,
                    plaintext: decode("plaintext", &plaintext)?,
                    encryption_context: to_map(context.context),
                })
                .await
                .map_err(status)?
                .into_inner();
            Ok(json!({
                "ciphertext_blob": B64.encode(&r.ciphertext_blob),
                "key_id": r.key_id,
                "key_version": r.key_version,
            }))
        }
        DatakeyCommand::Unwrap { blob, key, context } => {
            let r = client
                .unwrap(UnwrapRequest {
                    ciphertext_blob: decode("blob", &blob)?,
                    encryption_context: to_map(context.context),
                    key_id: key.unwrap_or_default(),
                })
                .await
                .map_err(status)?
                .into_inner();
            Ok(json!({
                "plaintext": B64.encode(&r.plaintext),
                "key_id": r.key_id,
                "key_version": r.key_version,
            }))
        }
        DatakeyCommand::Rewrap {
            blob,
            to,
            source_context,
            destination_context,
        } => {
            let destination_context = if destination_context.is_empty() {
                source_context.clone()
            } else {
                destination_context
            };
            let r = client
                .re_wrap(ReWrapRequest {
                    ciphertext_blob: decode("blob", &blob)?,
                    source_encryption_context: to_map(source_context),
                    destination_key_id: to.unwrap_or_default(),
                    destination_encryption_context: to_map(destination_context),
                })
                .await
                .map_err(status)?
                .into_inner();
            Ok(json!({
                "ciphertext_blob": B64.encode(&r.ciphertext_blob),
                "source_key_id": r.source_key_id,
                "source_key_version": r.source_key_version,
                "key_id": r.key_id,
                "key_version": r.key_version,
            }))
        }
    }
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
