//! `wrapctl s3 put` / `wrapctl s3 get`: objects in the S3 Encryption Client's V2 format
//! (`wrapd::client::s3ec`), with data keys from wrapd over gRPC and the S3 calls made by the
//! official AWS SDK for Rust (standard credential and region resolution, `--s3-endpoint` or
//! `AWS_ENDPOINT_URL_S3`, path-style addressing for S3-compatible servers).
//!
//! Uploads stream the file through AES-256-GCM: a single `PutObject` up to the multipart
//! threshold, else a multipart upload whose parts are encrypted in order and sent a few at a
//! time (memory: parts in flight × part size). Downloads stream the body through the
//! decryptor into a temporary file that is renamed into place only once the tag checks out.

use std::collections::{BTreeMap, HashMap};
use std::io::{Read, Write};
use std::path::Path;

use aws_sdk_s3::Client;
use aws_sdk_s3::primitives::ByteStream;
use aws_sdk_s3::types::{CompletedMultipartUpload, CompletedPart};
use clap::{Args, Subcommand};
use serde::Serialize;
use tonic::transport::Channel;
use wrapd::client::DataKeyServiceClient;
use wrapd::client::s3ec::{
    self, ContentDecryptor, ContentEncryptor, Envelope, Format, INSTRUCTION_SUFFIX,
    UNENCRYPTED_LENGTH,
};
use wrapd::proto::{GenerateDataKeyRequest, UnwrapRequest};
use zeroize::Zeroizing;

use crate::error::{CliError, Failure};
use crate::files::Output;
use crate::output::{ErasedReport, Report, fields};

const MIB: u64 = 1024 * 1024;
/// S3's smallest part (but the last) and most parts.
const MIN_PART: u64 = 5 * MIB;
const MAX_PARTS: u64 = 10_000;
/// Parts uploading at once.
const PARTS_IN_FLIGHT: usize = 4;

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
        #[arg(long)]
        instruction_file: bool,
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
        #[command(flatten)]
        s3: S3Args,
    },
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
}

fn parse_url(url: &str) -> Result<(String, String), CliError> {
    url.strip_prefix("s3://")
        .and_then(|rest| rest.split_once('/'))
        .filter(|(bucket, key)| !bucket.is_empty() && !key.is_empty())
        .map(|(b, k)| (b.to_owned(), k.to_owned()))
        .ok_or_else(|| CliError::new(Failure::Usage, format!("{url:?} is not s3://BUCKET/KEY")))
}

/// An S3 failure: the service's error code and message, or the transport's cause.
fn s3_error<E, R>(what: &str, err: aws_sdk_s3::error::SdkError<E, R>) -> CliError
where
    E: aws_sdk_s3::error::ProvideErrorMetadata + std::error::Error + 'static,
    R: std::fmt::Debug,
{
    match err.as_service_error() {
        Some(service) if service.code().is_some() => {
            let code = service.code().unwrap_or("error");
            let failure = match code {
                "NoSuchKey" | "NoSuchBucket" | "NotFound" => Failure::NotFound,
                "AccessDenied" | "InvalidAccessKeyId" | "SignatureDoesNotMatch" => Failure::Denied,
                _ => Failure::Other,
            };
            CliError::new(
                failure,
                format!("S3 {what}: {code}: {}", service.message().unwrap_or("")),
            )
        }
        _ => CliError::new(
            Failure::Unavailable,
            format!(
                "S3 {what}: {}",
                aws_sdk_s3::error::DisplayErrorContext(&err)
            ),
        ),
    }
}

async fn client(args: &S3Args) -> Client {
    let mut loader = aws_config::defaults(aws_config::BehaviorVersion::latest());
    if let Some(endpoint) = &args.s3_endpoint {
        loader = loader.endpoint_url(endpoint);
    }
    if let Some(region) = &args.region {
        loader = loader.region(aws_config::Region::new(region.clone()));
    }
    let mut shared = loader.load().await;
    let custom_endpoint = args.s3_endpoint.is_some()
        || std::env::var_os("AWS_ENDPOINT_URL_S3").is_some()
        || std::env::var_os("AWS_ENDPOINT_URL").is_some();
    if custom_endpoint && shared.region().is_none() {
        // S3-compatible servers mostly ignore the region, but SigV4 needs one.
        shared = shared
            .into_builder()
            .region(aws_config::Region::new("us-east-1"))
            .build();
    }
    let mut config = aws_sdk_s3::config::Builder::from(&shared);
    if custom_endpoint || args.path_style {
        config = config.force_path_style(true);
    }
    if custom_endpoint {
        // S3-compatible servers may not know the flexible checksums the SDK now sends by
        // default; send and check them only where the API requires them.
        use aws_sdk_s3::config::{RequestChecksumCalculation, ResponseChecksumValidation};
        config = config
            .request_checksum_calculation(RequestChecksumCalculation::WhenRequired)
            .response_checksum_validation(ResponseChecksumValidation::WhenRequired);
    }
    Client::from_conf(config.build())
}

/// The result of `put` or `get`.
#[derive(Serialize)]
struct Transfer {
    status: &'static str,
    bucket: String,
    key: String,
    bytes: u64,
    key_id: String,
    format: &'static str,
    envelope: &'static str,
    parts: usize,
}

impl Report for Transfer {
    fn human(&self) -> String {
        fields(&[
            ("status", self.status.to_owned()),
            ("object", format!("s3://{}/{}", self.bucket, self.key)),
            ("bytes", self.bytes.to_string()),
            ("key_id", self.key_id.clone()),
            ("format", self.format.to_owned()),
            ("envelope", self.envelope.to_owned()),
            ("parts", self.parts.to_string()),
        ])
    }
}

fn progress(len: u64) -> indicatif::ProgressBar {
    // Drawn on a terminal only (indicatif hides itself elsewhere).
    let bar = indicatif::ProgressBar::new(len);
    if let Ok(style) = indicatif::ProgressStyle::with_template(
        "{bar:40} {bytes}/{total_bytes} {bytes_per_sec} {eta}",
    ) {
        bar.set_style(style);
    }
    bar
}

/// Runs an `s3` command.
pub async fn run(channel: Channel, cmd: S3Command) -> Result<Box<dyn ErasedReport>, CliError> {
    let mut data = DataKeyServiceClient::new(channel);
    match cmd {
        S3Command::Put {
            file,
            url,
            key,
            context,
            instruction_file,
            s3,
        } => {
            let (bucket, object) = parse_url(&url)?;
            let user: BTreeMap<String, String> = context.into_iter().collect();
            let full = s3ec::context_for(&user)?;
            // An ARN names the same key as its resource part (`key/…`, `alias/…`).
            let key = wrapd::client::keyring::split_arn(&key)
                .map_or_else(|| key.clone(), |(_, resource)| resource.to_owned());
            let generated = data
                .generate_data_key(GenerateDataKeyRequest {
                    key_id: key,
                    encryption_context: full.clone().into_iter().collect(),
                    number_of_bytes: s3ec::DATA_KEY_LEN as u32,
                })
                .await?
                .into_inner();
            let data_key = Zeroizing::new(generated.plaintext);
            let mut iv = [0u8; s3ec::IV_LEN];
            rand::RngCore::fill_bytes(&mut rand::rng(), &mut iv);
            let envelope = Envelope::new(generated.ciphertext_blob, iv, &user)?;
            let client = client(&s3).await;
            let size = std::fs::metadata(&file)
                .map_err(|e| CliError::other(format!("{}: {e}", file.display())))?
                .len();
            let mut metadata: HashMap<String, String> =
                HashMap::from([(UNENCRYPTED_LENGTH.to_owned(), size.to_string())]);
            if instruction_file {
                // First, as the official clients do: an object is never without its envelope.
                client
                    .put_object()
                    .bucket(&bucket)
                    .key(format!("{object}{INSTRUCTION_SUFFIX}"))
                    .body(ByteStream::from(envelope.to_instruction_file()))
                    .send()
                    .await
                    .map_err(|e| s3_error("PutObject (instruction file)", e))?;
            } else {
                metadata.extend(envelope.entries());
            }
            let encryptor = ContentEncryptor::new(&data_key, &iv)?;
            let parts = upload(
                &client, &bucket, &object, &file, size, metadata, encryptor, &s3,
            )
            .await?;
            Ok(Box::new(Transfer {
                status: "uploaded",
                bucket,
                key: object,
                bytes: size,
                key_id: generated.key_id,
                format: "v2",
                envelope: if instruction_file {
                    "instruction-file"
                } else {
                    "metadata"
                },
                parts,
            }))
        }
        S3Command::Get {
            url,
            file,
            context,
            s3,
        } => {
            let (bucket, object) = parse_url(&url)?;
            let expected: BTreeMap<String, String> = context.into_iter().collect();
            let client = client(&s3).await;
            download(&client, &mut data, &bucket, &object, &file, &expected).await
        }
    }
}

/// Encrypts `file` into the object: one PutObject, or a multipart upload. Returns the
/// number of parts (1 for a single PUT).
#[allow(clippy::too_many_arguments)]
async fn upload(
    client: &Client,
    bucket: &str,
    object: &str,
    file: &Path,
    size: u64,
    metadata: HashMap<String, String>,
    mut encryptor: ContentEncryptor,
    args: &S3Args,
) -> Result<usize, CliError> {
    let mut input = std::fs::File::open(file)
        .map_err(|e| CliError::other(format!("{}: {e}", file.display())))?;
    let bar = progress(size);
    let read_error = |e: std::io::Error| CliError::other(format!("{}: {e}", file.display()));
    if size <= args.multipart_threshold_mib.saturating_mul(MIB) {
        let mut plaintext = Zeroizing::new(Vec::with_capacity(size as usize));
        input.read_to_end(&mut plaintext).map_err(read_error)?;
        let mut body = Vec::with_capacity(plaintext.len() + s3ec::TAG_LEN);
        encryptor.update(&plaintext, &mut body)?;
        body.extend_from_slice(&encryptor.finish()?);
        client
            .put_object()
            .bucket(bucket)
            .key(object)
            .set_metadata(Some(metadata))
            .body(ByteStream::from(body))
            .send()
            .await
            .map_err(|e| s3_error("PutObject", e))?;
        bar.finish_and_clear();
        return Ok(1);
    }
    let part_size = args
        .part_size_mib
        .saturating_mul(MIB)
        .max(MIN_PART)
        .max(size.div_ceil(MAX_PARTS - 1));
    let created = client
        .create_multipart_upload()
        .bucket(bucket)
        .key(object)
        .set_metadata(Some(metadata))
        .send()
        .await
        .map_err(|e| s3_error("CreateMultipartUpload", e))?;
    let upload_id = created
        .upload_id()
        .ok_or_else(|| CliError::other("S3 gave no upload id"))?
        .to_owned();
    let parts = upload_parts(
        client, bucket, object, &upload_id, &mut input, part_size, encryptor, &bar,
    )
    .await;
    let parts = match parts {
        Ok(parts) => parts,
        Err(err) => {
            let _ = client
                .abort_multipart_upload()
                .bucket(bucket)
                .key(object)
                .upload_id(&upload_id)
                .send()
                .await;
            return Err(err);
        }
    };
    let count = parts.len();
    client
        .complete_multipart_upload()
        .bucket(bucket)
        .key(object)
        .upload_id(&upload_id)
        .multipart_upload(
            CompletedMultipartUpload::builder()
                .set_parts(Some(parts))
                .build(),
        )
        .send()
        .await
        .map_err(|e| s3_error("CompleteMultipartUpload", e))?;
    bar.finish_and_clear();
    Ok(count)
}

/// Encrypts the file part by part (GCM is sequential) and uploads up to
/// [`PARTS_IN_FLIGHT`] parts at once; the tag ends the last part (which may hold only the
/// tag when the file fills its parts exactly: S3 takes a small last part).
#[allow(clippy::too_many_arguments)]
async fn upload_parts(
    client: &Client,
    bucket: &str,
    object: &str,
    upload_id: &str,
    input: &mut std::fs::File,
    part_size: u64,
    encryptor: ContentEncryptor,
    bar: &indicatif::ProgressBar,
) -> Result<Vec<CompletedPart>, CliError> {
    let mut in_flight = tokio::task::JoinSet::new();
    let mut done = Vec::new();
    let mut number = 0i32;
    let mut encryptor = Some(encryptor);
    let mut plaintext = Zeroizing::new(vec![0u8; part_size as usize]);
    while let Some(enc) = encryptor.as_mut() {
        let mut filled = 0;
        while filled < plaintext.len() {
            let n = input
                .read(&mut plaintext[filled..])
                .map_err(|e| CliError::other(e.to_string()))?;
            if n == 0 {
                break;
            }
            filled += n;
        }
        let mut body = Vec::with_capacity(filled + s3ec::TAG_LEN);
        enc.update(&plaintext[..filled], &mut body)?;
        let last = filled < plaintext.len();
        if last {
            if let Some(enc) = encryptor.take() {
                body.extend_from_slice(&enc.finish()?);
            }
        }
        number += 1;
        let request = client
            .upload_part()
            .bucket(bucket)
            .key(object)
            .upload_id(upload_id)
            .part_number(number)
            .body(ByteStream::from(body));
        let part_number = number;
        let bar = bar.clone();
        let len = filled as u64;
        in_flight.spawn(async move {
            let sent = request
                .send()
                .await
                .map_err(|e| s3_error("UploadPart", e))?;
            bar.inc(len);
            Ok::<_, CliError>(
                CompletedPart::builder()
                    .set_e_tag(sent.e_tag().map(str::to_owned))
                    .part_number(part_number)
                    .build(),
            )
        });
        while in_flight.len() >= PARTS_IN_FLIGHT || (last && !in_flight.is_empty()) {
            if let Some(joined) = in_flight.join_next().await {
                done.push(joined.map_err(|e| CliError::other(e.to_string()))??);
            }
        }
    }
    done.sort_by_key(|p| p.part_number());
    Ok(done)
}

/// Reads the object's envelope: from its metadata, else from its instruction file.
async fn envelope_of(
    client: &Client,
    bucket: &str,
    object: &str,
    metadata: &HashMap<String, String>,
) -> Result<(Envelope, &'static str), CliError> {
    match s3ec::detect(metadata) {
        Format::V2 => Ok((Envelope::from_entries(metadata)?, "metadata")),
        Format::V3 => Err(CliError::new(
            Failure::Invalid,
            "the object is in the S3 Encryption Client V3 format (key commitment), which wrapctl does not read yet",
        )),
        Format::V1 => Err(CliError::new(
            Failure::Invalid,
            "the object is in the legacy V1 format (unauthenticated modes), which wrapctl refuses to read",
        )),
        Format::None => {
            let instruction = client
                .get_object()
                .bucket(bucket)
                .key(format!("{object}{INSTRUCTION_SUFFIX}"))
                .send()
                .await
                .map_err(|e| {
                    let cause = s3_error("GetObject (instruction file)", e);
                    CliError::new(
                        Failure::Invalid,
                        format!(
                            "the object has no encryption envelope in its metadata, and its instruction file cannot be read ({cause})"
                        ),
                    )
                })?;
            let body = instruction
                .body
                .collect()
                .await
                .map_err(|e| {
                    CliError::new(Failure::Unavailable, format!("S3 instruction file: {e}"))
                })?
                .into_bytes();
            if body.len() > 64 * 1024 {
                return Err(CliError::new(
                    Failure::Invalid,
                    "the instruction file is too large",
                ));
            }
            Ok((Envelope::from_instruction_file(&body)?, "instruction-file"))
        }
    }
}

async fn download(
    client: &Client,
    data: &mut DataKeyServiceClient<Channel>,
    bucket: &str,
    object: &str,
    file: &Path,
    expected: &BTreeMap<String, String>,
) -> Result<Box<dyn ErasedReport>, CliError> {
    let response = client
        .get_object()
        .bucket(bucket)
        .key(object)
        .send()
        .await
        .map_err(|e| s3_error("GetObject", e))?;
    let metadata = response.metadata().cloned().unwrap_or_default();
    let (envelope, placement) = envelope_of(client, bucket, object, &metadata).await?;
    envelope.check_context(expected)?;
    let unwrapped = data
        .unwrap(UnwrapRequest {
            ciphertext_blob: envelope.encrypted_key.clone(),
            encryption_context: envelope.context.clone().into_iter().collect(),
            key_id: String::new(),
        })
        .await?
        .into_inner();
    let data_key = Zeroizing::new(unwrapped.plaintext);
    let mut decryptor = ContentDecryptor::new(&data_key, &envelope.iv)?;
    let (output, mut writer) =
        Output::open(&file.to_string_lossy()).map_err(|e| CliError::new(Failure::Usage, e))?;
    let total = response.content_length().unwrap_or(0).max(0) as u64;
    let bar = progress(total);
    let mut body = response.body;
    let mut plaintext = Zeroizing::new(Vec::new());
    let mut bytes = 0u64;
    while let Some(chunk) = body.next().await {
        let chunk = chunk
            .map_err(|e| CliError::new(Failure::Unavailable, format!("S3 GetObject body: {e}")))?;
        plaintext.clear();
        decryptor.update(&chunk, &mut plaintext)?;
        writer
            .write_all(&plaintext)
            .map_err(|e| CliError::other(e.to_string()))?;
        bytes += plaintext.len() as u64;
        bar.inc(chunk.len() as u64);
    }
    decryptor.finish()?;
    writer.flush().map_err(|e| CliError::other(e.to_string()))?;
    drop(writer);
    output.commit().map_err(CliError::other)?;
    bar.finish_and_clear();
    Ok(Box::new(Transfer {
        status: "downloaded",
        bucket: bucket.to_owned(),
        key: object.to_owned(),
        bytes,
        key_id: unwrapped.key_id,
        format: "v2",
        envelope: placement,
        parts: 0,
    }))
}
