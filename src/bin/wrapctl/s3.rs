//! `wrapctl s3 put` / `wrapctl s3 get`: the command line of the client library's S3 transfers
//! (`wrapd::client::s3`): objects in the S3 Encryption Client's formats, with data keys from
//! wrapd over gRPC (or its AWS KMS-compatible API), and a progress bar on a terminal.

use std::collections::BTreeMap;
use std::sync::Arc;

use clap::{Args, Subcommand};
use wrapd::client::DataKeyServiceClient;
use wrapd::client::census::Census;
use wrapd::client::rewrap::Rewrapper;
use wrapd::client::s3::{self as transfer, DataKeys, GetRequest, PutRequest, S3Options};

use crate::connection::ConnectionArgs;
use crate::error::CliError;
use crate::output::{ErasedReport, Report, fields};

const MIB: u64 = 1024 * 1024;

/// `wrapctl s3 ...`
#[derive(Subcommand)]
pub enum S3Command {
    /// Encrypt FILE and upload it to s3://BUCKET/KEY (S3 Encryption Client V2 format).
    Put {
        /// The file to upload.
        file: std::path::PathBuf,
        /// s3://BUCKET/KEY
        url: String,
        /// wrapd key id or alias for the object's data key, or its AWS KMS ARN (as the
        /// official clients name it).
        #[arg(long)]
        key: String,
        /// Encryption context entry K=V (repeatable); readers must give the same.
        #[arg(long = "context", value_parser = crate::parse_entry)]
        context: Vec<(String, String)>,
        /// Put the envelope in KEY.instruction instead of the object's metadata.
        #[arg(long, conflicts_with = "sse_c")]
        instruction_file: bool,
        /// Server-side encryption with a key from wrapd instead: S3 encrypts with a fresh
        /// data key sent as the SSE-C key; only its wrapped form is stored (an object tag).
        #[arg(long)]
        sse_c: bool,
        /// The object format: v2 (read by every S3 Encryption Client) or v3 (key
        /// commitment; read by the V3/V4 releases only).
        #[arg(long, value_enum, default_value_t = ObjectFormat::V2)]
        format: ObjectFormat,
        #[command(flatten)]
        s3: S3Args,
    },
    /// Download s3://BUCKET/KEY and decrypt it into FILE; nothing is written unless the
    /// whole object authenticates.
    Get {
        /// s3://BUCKET/KEY
        url: String,
        /// Where to write the plaintext.
        file: std::path::PathBuf,
        /// Encryption context entry K=V (repeatable): must equal the object's.
        #[arg(long = "context", value_parser = crate::parse_entry)]
        context: Vec<(String, String)>,
        /// The object was put with --sse-c: unwrap its SSE-C key and send it.
        #[arg(long)]
        sse_c: bool,
        /// Read only objects whose format commits to its data key (V3), as the official
        /// clients' REQUIRE_ENCRYPT_REQUIRE_DECRYPT commitment policy does: a V2 object is
        /// refused before its key is unwrapped.
        #[arg(long, conflicts_with = "sse_c")]
        require_commitment: bool,
        #[command(flatten)]
        s3: S3Args,
    },
    /// Re-wrap the data keys of the objects under s3://BUCKET/PREFIX under their key's
    /// current version (or --to KEY), after a rotation. Bodies are never downloaded: the
    /// metadata (a conditional copy onto itself), the instruction file or the SSE-C tag is
    /// rewritten; an object changed meanwhile is left alone.
    Rewrap(S3RewrapArgs),
}

/// `wrapctl s3 rewrap`.
#[derive(Args)]
pub struct S3RewrapArgs {
    /// s3://BUCKET/PREFIX (or s3://BUCKET for every object).
    url: String,
    /// Move the data keys under --from KEY to this key (id or alias) instead.
    #[arg(long, requires = "from")]
    to: Option<String>,
    /// With --to: the key whose data keys move (no other key's do).
    #[arg(long, requires = "to")]
    from: Option<String>,
    /// Say what would be re-wrapped; change nothing.
    #[arg(long)]
    dry_run: bool,
    /// The encryption context the SSE-C objects were put with, K=V (repeatable): an SSE-C
    /// object's context is not stored with it.
    #[arg(long = "context", value_parser = crate::parse_entry)]
    context: Vec<(String, String)>,
    #[command(flatten)]
    s3: S3Args,
}

/// The bucket and prefix of `s3://BUCKET/PREFIX` (or `s3://BUCKET`).
fn bucket_and_prefix(url: &str) -> Result<(String, String), CliError> {
    let rest = url
        .strip_prefix("s3://")
        .ok_or_else(|| CliError::usage(format!("{url:?} is not s3://BUCKET/PREFIX")))?;
    let (bucket, prefix) = rest.split_once('/').unwrap_or((rest, ""));
    if bucket.is_empty() {
        return Err(CliError::usage(format!("{url:?} names no bucket")));
    }
    Ok((bucket.to_owned(), prefix.to_owned()))
}

/// `wrapctl s3 rewrap`: every object under the prefix, one at a time.
pub async fn rewrap(
    connection: &ConnectionArgs,
    args: S3RewrapArgs,
) -> Result<crate::rewrap::RewrapReport, CliError> {
    let (bucket, prefix) = bucket_and_prefix(&args.url)?;
    let (client, _) = transfer::client(&args.s3.options()).await?;
    let mut rewrapper = Rewrapper::new(connection.connect().await?, args.from.zip(args.to));
    let objects = transfer::list(&client, &bucket, &prefix).await?;
    let context: BTreeMap<String, String> = args.context.into_iter().collect();
    let options = transfer::RewrapOptions {
        dry_run: args.dry_run,
        sse_c_context: &context,
    };
    let bar = crate::rewrap::progress(objects.len() as u64);
    let mut items = Vec::with_capacity(objects.len());
    for object in &objects {
        bar.set_message(object.key.clone());
        let outcome =
            transfer::rewrap_object(&client, &bucket, object, &mut rewrapper, &options).await;
        items.push(crate::rewrap::Item {
            path: format!("s3://{bucket}/{}", object.key),
            outcome,
        });
        bar.inc(1);
    }
    bar.finish_and_clear();
    Ok(crate::rewrap::RewrapReport::new(args.dry_run, items))
}

/// `wrapctl census s3://BUCKET/PREFIX`: counts the objects under the prefix.
pub async fn census(census: &mut Census, url: &str, s3: &S3Args) -> Result<(), CliError> {
    let (bucket, prefix) = bucket_and_prefix(url)?;
    let (client, _) = transfer::client(&s3.options()).await?;
    transfer::census(&client, &bucket, &prefix, census).await
}

/// The S3 Encryption Client format written.
#[derive(Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum ObjectFormat {
    /// AES-GCM under the data key (the default: every client reads it).
    V2,
    /// Key commitment (ALG_AES_256_GCM_HKDF_SHA512_COMMIT_KEY).
    V3,
}

/// Where S3 is and how to address it.
#[derive(Args)]
pub struct S3Args {
    /// S3 endpoint URL (default: AWS, or AWS_ENDPOINT_URL_S3 / AWS_ENDPOINT_URL); a custom
    /// endpoint is addressed path-style.
    #[arg(long)]
    s3_endpoint: Option<String>,
    /// Address buckets path-style (s3.example/BUCKET/KEY) even on AWS.
    #[arg(long)]
    path_style: bool,
    /// The bucket's region (default: the standard AWS resolution; with a custom endpoint
    /// and none resolved, us-east-1).
    #[arg(long)]
    region: Option<String>,
    /// Files larger than this many MiB are uploaded in parts.
    #[arg(long, default_value_t = 8)]
    multipart_threshold_mib: u64,
    /// Part size in MiB (at least 5; grown to keep within 10,000 parts).
    #[arg(long, default_value_t = 8)]
    part_size_mib: u64,
    /// Get data keys through wrapd's AWS KMS-compatible API at this URL (as the official
    /// clients do) instead of over gRPC; credentials and region from the standard AWS
    /// settings. `--key` is then an ARN, key id or alias as AWS KMS takes them.
    #[arg(long, env = "WRAPD_KMS_ENDPOINT")]
    kms_endpoint: Option<String>,
    /// PEM file of the CA(s) to trust for --kms-endpoint (default: AWS_CA_BUNDLE, else the
    /// system's roots).
    #[arg(long)]
    kms_ca_bundle: Option<std::path::PathBuf>,
}

impl S3Args {
    /// The library's options.
    fn options(&self) -> S3Options {
        S3Options {
            endpoint: self.s3_endpoint.clone(),
            path_style: self.path_style,
            region: self.region.clone(),
            multipart_threshold: self.multipart_threshold_mib.saturating_mul(MIB),
            part_size: self.part_size_mib.saturating_mul(MIB),
        }
    }

    /// Where data keys come from: `--kms-endpoint`, else wrapd over gRPC.
    async fn data_keys(&self, connection: &ConnectionArgs) -> Result<DataKeys, CliError> {
        match &self.kms_endpoint {
            Some(endpoint) => DataKeys::kms(endpoint, self.kms_ca_bundle.as_deref()).await,
            None => Ok(DataKeys::Grpc(DataKeyServiceClient::new(
                connection.connect().await?,
            ))),
        }
    }
}

/// The result of `put` or `get`.
struct Transfer(transfer::Transfer);

impl serde::Serialize for Transfer {
    fn serialize<S: serde::Serializer>(&self, serializer: S) -> Result<S::Ok, S::Error> {
        self.0.serialize(serializer)
    }
}

impl Report for Transfer {
    fn human(&self) -> String {
        let t = &self.0;
        fields(&[
            ("status", t.status.to_owned()),
            ("object", format!("s3://{}/{}", t.bucket, t.key)),
            ("bytes", t.bytes.to_string()),
            ("key_id", t.key_id.clone()),
            ("format", t.format.to_owned()),
            ("envelope", t.envelope.to_owned()),
            ("parts", t.parts.to_string()),
        ])
    }
}

/// A progress bar, drawn on a terminal only (indicatif hides itself elsewhere).
struct Bar(indicatif::ProgressBar);

impl Bar {
    fn shared() -> Arc<dyn transfer::Progress> {
        let bar = indicatif::ProgressBar::new(0);
        if let Ok(style) = indicatif::ProgressStyle::with_template(
            "{bar:40} {bytes}/{total_bytes} {bytes_per_sec} {eta}",
        ) {
            bar.set_style(style);
        }
        Arc::new(Self(bar))
    }
}

impl transfer::Progress for Bar {
    fn start(&self, total: u64) {
        self.0.set_length(total);
    }

    fn advance(&self, bytes: u64) {
        self.0.inc(bytes);
    }

    fn finish(&self) {
        self.0.finish_and_clear();
    }
}

/// Runs an `s3` command.
pub async fn run(
    connection: &ConnectionArgs,
    cmd: S3Command,
) -> Result<Box<dyn ErasedReport>, CliError> {
    match cmd {
        S3Command::Put {
            file,
            url,
            key,
            context,
            instruction_file,
            sse_c,
            format,
            s3,
        } => {
            let (bucket, object) = transfer::parse_url(&url)?;
            let context: BTreeMap<String, String> = context.into_iter().collect();
            let mut keys = s3.data_keys(connection).await?;
            let options = s3.options();
            let (client, endpoint) = transfer::client(&options).await?;
            let request = PutRequest {
                file: &file,
                bucket: &bucket,
                object: &object,
                key: &key,
                context: &context,
                instruction_file,
                sse_c,
                format: match format {
                    ObjectFormat::V2 => transfer::ObjectFormat::V2,
                    ObjectFormat::V3 => transfer::ObjectFormat::V3,
                },
            };
            let done = transfer::put(
                &client,
                endpoint.as_deref(),
                &mut keys,
                request,
                &options,
                &Bar::shared(),
            )
            .await?;
            Ok(Box::new(Transfer(done)))
        }
        S3Command::Get {
            url,
            file,
            context,
            sse_c,
            require_commitment,
            s3,
        } => {
            let (bucket, object) = transfer::parse_url(&url)?;
            let expected: BTreeMap<String, String> = context.into_iter().collect();
            let (client, endpoint) = transfer::client(&s3.options()).await?;
            let request = GetRequest {
                bucket: &bucket,
                object: &object,
                file: &file,
                expected: &expected,
                sse_c,
                require_commitment,
            };
            let mut keys = s3.data_keys(connection).await?;
            let done = transfer::get(
                &client,
                endpoint.as_deref(),
                &mut keys,
                request,
                &Bar::shared(),
            )
            .await?;
            Ok(Box::new(Transfer(done)))
        }
        S3Command::Rewrap(args) => Ok(Box::new(rewrap(connection, args).await?)),
    }
}
