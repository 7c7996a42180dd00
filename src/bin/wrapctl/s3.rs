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
    self, ContentDecryptor, ContentEncryptor, Envelope, EnvelopeV3, Format, INSTRUCTION_SUFFIX,
    UNENCRYPTED_LENGTH,
};
use wrapd::proto::{GenerateDataKeyRequest, UnwrapRequest};
use zeroize::Zeroizing;

use crate::connection::ConnectionArgs;
use crate::error::{CliError, Failure};
use crate::output::{ErasedReport, Report, fields};
use wrapd::client::Output;

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
}

/// The object tag holding an SSE-C object's wrapped key: tags, unlike metadata, can be read
/// without the SSE-C key (S3 refuses `HeadObject` and `GetObject` of an SSE-C object without
/// it, metadata included), and are written atomically with the object.
pub const SSE_C_TAG: &str = "wrapd-sse-c-key";
/// The encryption context entry that binds an SSE-C data key to its use.
pub const SSE_C_CONTEXT_KEY: &str = "wrapctl:s3-sse-c";

/// An SSE-C key as S3 takes it: base64 of the 32 bytes, and of their MD5.
struct SseC {
    key: Zeroizing<String>,
    md5: String,
}

impl SseC {
    fn new(key: &[u8]) -> Self {
        use base64::Engine;
        use md5::Digest;
        let engine = base64::engine::general_purpose::STANDARD;
        Self {
            key: Zeroizing::new(engine.encode(key)),
            md5: engine.encode(md5::Md5::digest(key)),
        }
    }
}

/// Adds the SSE-C headers to a request builder (each S3 call of an SSE-C object needs them).
macro_rules! with_sse_c {
    ($builder:expr, $sse:expr) => {
        match $sse {
            Some(sse) => $builder
                .sse_customer_algorithm("AES256")
                .sse_customer_key(sse.key.as_str())
                .sse_customer_key_md5(&sse.md5),
            None => $builder,
        }
    };
}

/// Refuses `--sse-c` toward a plain `http://` S3 endpoint that is not on this host: every
/// request of an SSE-C object carries its key, which must not cross a network in clear.
/// `endpoint`: the one the client resolved (`None`: AWS itself, https).
fn check_sse_c_endpoint(endpoint: Option<&str>) -> Result<(), CliError> {
    let Some(endpoint) = endpoint else {
        return Ok(());
    };
    let uri: http::Uri = endpoint
        .parse()
        .map_err(|_| CliError::usage(format!("the S3 endpoint {endpoint:?} is not a URL")))?;
    let loopback = uri.host().is_some_and(|host| {
        host == "localhost"
            || host
                .trim_start_matches('[')
                .trim_end_matches(']')
                .parse::<std::net::IpAddr>()
                .is_ok_and(|ip| ip.is_loopback())
    });
    if uri.scheme_str() == Some("https") || loopback {
        return Ok(());
    }
    Err(CliError::usage(format!(
        "--sse-c sends the object's key with every request, and the S3 endpoint {endpoint} is not https:// (plain HTTP is allowed only to this host)"
    )))
}

/// The context of an SSE-C data key: the caller's entries and the reserved one.
fn sse_c_context(user: &BTreeMap<String, String>) -> Result<BTreeMap<String, String>, CliError> {
    if user.contains_key(SSE_C_CONTEXT_KEY) {
        return Err(CliError::usage(format!(
            "the encryption context entry {SSE_C_CONTEXT_KEY} is reserved"
        )));
    }
    let mut context = user.clone();
    context.insert(SSE_C_CONTEXT_KEY.to_owned(), "AES256".to_owned());
    Ok(context)
}

/// Percent-encodes a base64 tag value for the `x-amz-tagging` header (a URL query).
fn tag_value(b64: &str) -> String {
    b64.replace('+', "%2B")
        .replace('/', "%2F")
        .replace('=', "%3D")
}

/// How the content is protected on its way to S3.
enum Protection {
    /// The S3 Encryption Client format: encrypted here.
    ClientSide(ContentEncryptor),
    /// SSE-C: S3 encrypts with this key.
    SseC(SseC),
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

/// Where data keys come from: wrapd over gRPC, or its AWS KMS-compatible API. The blobs are
/// the same either way.
enum DataKeys {
    Grpc(DataKeyServiceClient<Channel>),
    Kms(aws_sdk_kms::Client),
}

/// A data key: plaintext, wrapped, and the key that wraps it.
struct DataKey {
    plaintext: Zeroizing<Vec<u8>>,
    blob: Vec<u8>,
    key_id: String,
}

fn kms_error<E, R>(what: &str, err: aws_sdk_kms::error::SdkError<E, R>) -> CliError
where
    E: aws_sdk_kms::error::ProvideErrorMetadata + std::error::Error + 'static,
    R: std::fmt::Debug,
{
    match err.as_service_error() {
        Some(service) if service.code().is_some() => {
            let code = service.code().unwrap_or("error");
            let failure = match code {
                "NotFoundException" => Failure::NotFound,
                "AccessDeniedException" | "UnrecognizedClientException" => Failure::Denied,
                "InvalidCiphertextException" | "IncorrectKeyException" | "ValidationException" => {
                    Failure::Invalid
                }
                "DisabledException" | "KMSInvalidStateException" => Failure::WrongState,
                _ => Failure::Other,
            };
            CliError::new(
                failure,
                format!("KMS {what}: {code}: {}", service.message().unwrap_or("")),
            )
        }
        _ => CliError::new(
            Failure::Unavailable,
            format!(
                "KMS {what}: {}",
                aws_sdk_kms::error::DisplayErrorContext(&err)
            ),
        ),
    }
}

impl DataKeys {
    async fn open(connection: &ConnectionArgs, args: &S3Args) -> Result<Self, CliError> {
        let Some(endpoint) = &args.kms_endpoint else {
            return Ok(Self::Grpc(DataKeyServiceClient::new(
                connection.connect().await?,
            )));
        };
        let mut loader =
            aws_config::defaults(aws_config::BehaviorVersion::latest()).endpoint_url(endpoint);
        let bundle = args
            .kms_ca_bundle
            .clone()
            .or_else(|| std::env::var_os("AWS_CA_BUNDLE").map(Into::into));
        loader = loader.http_client(https_client(bundle.as_deref())?);
        let mut shared = loader.load().await;
        if shared.region().is_none() {
            shared = shared
                .into_builder()
                .region(aws_config::Region::new("us-east-1"))
                .build();
        }
        Ok(Self::Kms(aws_sdk_kms::Client::new(&shared)))
    }

    async fn generate(
        &mut self,
        key: &str,
        context: &BTreeMap<String, String>,
    ) -> Result<DataKey, CliError> {
        match self {
            Self::Grpc(client) => {
                // An ARN names the same key as its resource part (`key/…`, `alias/…`).
                let key = wrapd::client::keyring::split_arn(key)
                    .map_or_else(|| key.to_owned(), |(_, resource)| resource.to_owned());
                let generated = client
                    .generate_data_key(GenerateDataKeyRequest {
                        key_id: key,
                        encryption_context: context.clone().into_iter().collect(),
                        number_of_bytes: s3ec::DATA_KEY_LEN as u32,
                    })
                    .await?
                    .into_inner();
                Ok(DataKey {
                    plaintext: Zeroizing::new(generated.plaintext),
                    blob: generated.ciphertext_blob,
                    key_id: generated.key_id,
                })
            }
            Self::Kms(client) => {
                let generated = client
                    .generate_data_key()
                    .key_id(key)
                    .set_encryption_context(Some(context.clone().into_iter().collect()))
                    .number_of_bytes(s3ec::DATA_KEY_LEN as i32)
                    .send()
                    .await
                    .map_err(|e| kms_error("GenerateDataKey", e))?;
                let plaintext = Zeroizing::new(
                    generated
                        .plaintext()
                        .map(|b| b.as_ref().to_vec())
                        .unwrap_or_default(),
                );
                Ok(DataKey {
                    plaintext,
                    blob: generated
                        .ciphertext_blob()
                        .map(|b| b.as_ref().to_vec())
                        .unwrap_or_default(),
                    key_id: generated.key_id().unwrap_or_default().to_owned(),
                })
            }
        }
    }

    async fn unwrap(
        &mut self,
        blob: &[u8],
        context: &BTreeMap<String, String>,
    ) -> Result<(Zeroizing<Vec<u8>>, String), CliError> {
        match self {
            Self::Grpc(client) => {
                let unwrapped = client
                    .unwrap(UnwrapRequest {
                        ciphertext_blob: blob.to_vec(),
                        encryption_context: context.clone().into_iter().collect(),
                        key_id: String::new(),
                    })
                    .await?
                    .into_inner();
                Ok((Zeroizing::new(unwrapped.plaintext), unwrapped.key_id))
            }
            Self::Kms(client) => {
                let decrypted = client
                    .decrypt()
                    .ciphertext_blob(aws_sdk_kms::primitives::Blob::new(blob.to_vec()))
                    .set_encryption_context(Some(context.clone().into_iter().collect()))
                    .send()
                    .await
                    .map_err(|e| kms_error("Decrypt", e))?;
                Ok((
                    Zeroizing::new(
                        decrypted
                            .plaintext()
                            .map(|b| b.as_ref().to_vec())
                            .unwrap_or_default(),
                    ),
                    decrypted.key_id().unwrap_or_default().to_owned(),
                ))
            }
        }
    }
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

/// The AWS SDKs' HTTPS client: rustls with ring (the build's one crypto provider), trusting
/// the system's roots, or only the CA certificates of `bundle`.
fn https_client(
    bundle: Option<&std::path::Path>,
) -> Result<aws_sdk_s3::config::SharedHttpClient, CliError> {
    use aws_smithy_http_client::tls;
    let trust = match bundle {
        None => tls::TrustStore::default(),
        Some(bundle) => {
            let pem = std::fs::read(bundle)
                .map_err(|e| CliError::usage(format!("{}: {e}", bundle.display())))?;
            tls::TrustStore::empty()
                .with_native_roots(false)
                .with_pem_certificate(pem)
        }
    };
    let context = tls::TlsContext::builder()
        .with_trust_store(trust)
        .build()
        .map_err(|e| CliError::usage(format!("TLS trust store: {e}")))?;
    Ok(aws_smithy_http_client::Builder::new()
        .tls_provider(tls::Provider::Rustls(
            tls::rustls_provider::CryptoMode::Ring,
        ))
        .tls_context(context)
        .build_https())
}

/// The S3 client, and the endpoint it uses when it is not AWS's own: `--s3-endpoint`, the
/// environment (`AWS_ENDPOINT_URL_S3`, `AWS_ENDPOINT_URL`) or the shared config's
/// `endpoint_url`.
async fn client(args: &S3Args) -> Result<(Client, Option<String>), CliError> {
    let mut loader = aws_config::defaults(aws_config::BehaviorVersion::latest())
        .http_client(https_client(None)?);
    if let Some(endpoint) = &args.s3_endpoint {
        loader = loader.endpoint_url(endpoint);
    }
    if let Some(region) = &args.region {
        loader = loader.region(aws_config::Region::new(region.clone()));
    }
    let mut shared = loader.load().await;
    let endpoint = args
        .s3_endpoint
        .clone()
        .or_else(|| std::env::var("AWS_ENDPOINT_URL_S3").ok())
        .or_else(|| std::env::var("AWS_ENDPOINT_URL").ok())
        .or_else(|| shared.endpoint_url().map(str::to_owned));
    let custom_endpoint = endpoint.is_some();
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
    Ok((Client::from_conf(config.build()), endpoint))
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
            let (bucket, object) = parse_url(&url)?;
            let user: BTreeMap<String, String> = context.into_iter().collect();
            let full = if sse_c {
                sse_c_context(&user)?
            } else if format == ObjectFormat::V3 {
                s3ec::context_for_v3(&user)?
            } else {
                s3ec::context_for(&user)?
            };
            let mut keys = DataKeys::open(connection, &s3).await?;
            let generated = keys.generate(&key, &full).await?;
            if generated.plaintext.len() != s3ec::DATA_KEY_LEN {
                return Err(CliError::other(
                    "the key service returned a wrong-sized data key",
                ));
            }
            let data_key = generated.plaintext;
            let (client, endpoint) = client(&s3).await?;
            if sse_c {
                check_sse_c_endpoint(endpoint.as_deref())?;
            }
            let size = std::fs::metadata(&file)
                .map_err(|e| CliError::other(format!("{}: {e}", file.display())))?
                .len();
            let mut target = Target {
                bucket: bucket.clone(),
                object: object.clone(),
                metadata: HashMap::from([(UNENCRYPTED_LENGTH.to_owned(), size.to_string())]),
                tagging: None,
            };
            let (protection, format, placement) = if sse_c {
                use base64::Engine;
                let blob = base64::engine::general_purpose::STANDARD.encode(&generated.blob);
                target.tagging = Some(format!("{SSE_C_TAG}={}", tag_value(&blob)));
                target.metadata.clear();
                (Protection::SseC(SseC::new(&data_key)), "sse-c", "tag")
            } else if format == ObjectFormat::V3 {
                let mut message_id = [0u8; s3ec::V3_NONCE_LEN];
                rand::RngCore::fill_bytes(&mut rand::rng(), &mut message_id);
                let (envelope, content_key) =
                    EnvelopeV3::new(generated.blob, &data_key, &user, message_id)?;
                if instruction_file {
                    let (in_metadata, file_body) = envelope.split_for_instruction_file();
                    client
                        .put_object()
                        .bucket(&bucket)
                        .key(format!("{object}{INSTRUCTION_SUFFIX}"))
                        .body(ByteStream::from(file_body))
                        .send()
                        .await
                        .map_err(|e| s3_error("PutObject (instruction file)", e))?;
                    target.metadata.extend(in_metadata);
                } else {
                    target.metadata.extend(envelope.entries());
                }
                let encryptor =
                    ContentEncryptor::with_aad(&*content_key, &s3ec::IV_V3, &s3ec::SUITE_V3)?;
                let placement = if instruction_file {
                    "instruction-file"
                } else {
                    "metadata"
                };
                (Protection::ClientSide(encryptor), "v3", placement)
            } else {
                let mut iv = [0u8; s3ec::IV_LEN];
                rand::RngCore::fill_bytes(&mut rand::rng(), &mut iv);
                let envelope = Envelope::new(generated.blob, iv, &user)?;
                if instruction_file {
                    // First, as the official clients do: an object is never without its
                    // envelope.
                    client
                        .put_object()
                        .bucket(&bucket)
                        .key(format!("{object}{INSTRUCTION_SUFFIX}"))
                        .body(ByteStream::from(envelope.to_instruction_file()))
                        .send()
                        .await
                        .map_err(|e| s3_error("PutObject (instruction file)", e))?;
                } else {
                    target.metadata.extend(envelope.entries());
                }
                let encryptor = ContentEncryptor::new(&data_key, &iv)?;
                let placement = if instruction_file {
                    "instruction-file"
                } else {
                    "metadata"
                };
                (Protection::ClientSide(encryptor), "v2", placement)
            };
            let parts = upload(&client, &target, &file, size, protection, &s3).await?;
            Ok(Box::new(Transfer {
                status: "uploaded",
                bucket,
                key: object,
                bytes: size,
                key_id: generated.key_id,
                format,
                envelope: placement,
                parts,
            }))
        }
        S3Command::Get {
            url,
            file,
            context,
            sse_c,
            require_commitment,
            s3,
        } => {
            let (bucket, object) = parse_url(&url)?;
            if file.as_os_str() == "-" {
                // GCM authenticates the whole object at its end: nothing may be released
                // before, so the output is a file renamed into place once it verified.
                return Err(CliError::usage(
                    "s3 get writes to a file (not stdout): the object authenticates only at its end",
                ));
            }
            let expected: BTreeMap<String, String> = context.into_iter().collect();
            let (client, endpoint) = client(&s3).await?;
            if sse_c {
                check_sse_c_endpoint(endpoint.as_deref())?;
            }
            let mut keys = DataKeys::open(connection, &s3).await?;
            if sse_c {
                download_sse_c(&client, &mut keys, &bucket, &object, &file, &expected).await
            } else {
                let read = GetRequest {
                    bucket: &bucket,
                    object: &object,
                    file: &file,
                    expected: &expected,
                    require_commitment,
                };
                download(&client, &mut keys, read).await
            }
        }
    }
}

/// Where an upload goes, and what goes with it.
struct Target {
    bucket: String,
    object: String,
    metadata: HashMap<String, String>,
    /// `x-amz-tagging` (URL-encoded).
    tagging: Option<String>,
}

/// Uploads `file` into the object, protected as `protection` says: one PutObject, or a
/// multipart upload. Returns the number of parts (1 for a single PUT).
async fn upload(
    client: &Client,
    target: &Target,
    file: &Path,
    size: u64,
    protection: Protection,
    args: &S3Args,
) -> Result<usize, CliError> {
    let mut input = std::fs::File::open(file)
        .map_err(|e| CliError::other(format!("{}: {e}", file.display())))?;
    let bar = progress(size);
    let read_error = |e: std::io::Error| CliError::other(format!("{}: {e}", file.display()));
    let (mut encryptor, sse) = match protection {
        Protection::ClientSide(encryptor) => (Some(encryptor), None),
        Protection::SseC(sse) => (None, Some(sse)),
    };
    let (bucket, object) = (target.bucket.as_str(), target.object.as_str());
    if size <= args.multipart_threshold_mib.saturating_mul(MIB) {
        let mut plaintext = Zeroizing::new(Vec::with_capacity(size as usize));
        input.read_to_end(&mut plaintext).map_err(read_error)?;
        let body = match encryptor.take() {
            Some(mut encryptor) => {
                let mut body = Vec::with_capacity(plaintext.len() + s3ec::TAG_LEN);
                encryptor.update(&plaintext, &mut body)?;
                body.extend_from_slice(&encryptor.finish()?);
                body
            }
            None => plaintext.to_vec(),
        };
        let request = client
            .put_object()
            .bucket(bucket)
            .key(object)
            .set_metadata(Some(target.metadata.clone()))
            .set_tagging(target.tagging.clone())
            .body(ByteStream::from(body));
        with_sse_c!(request, sse.as_ref())
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
    let request = client
        .create_multipart_upload()
        .bucket(bucket)
        .key(object)
        .set_metadata(Some(target.metadata.clone()))
        .set_tagging(target.tagging.clone());
    let created = with_sse_c!(request, sse.as_ref())
        .send()
        .await
        .map_err(|e| s3_error("CreateMultipartUpload", e))?;
    let upload_id = created
        .upload_id()
        .ok_or_else(|| CliError::other("S3 gave no upload id"))?
        .to_owned();
    let upload = Upload {
        client,
        bucket,
        object,
        upload_id: &upload_id,
        sse: sse.as_ref(),
    };
    let parts = match upload.parts(&mut input, part_size, encryptor, &bar).await {
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
    let request = client
        .complete_multipart_upload()
        .bucket(bucket)
        .key(object)
        .upload_id(&upload_id)
        .multipart_upload(
            CompletedMultipartUpload::builder()
                .set_parts(Some(parts))
                .build(),
        );
    with_sse_c!(request, sse.as_ref())
        .send()
        .await
        .map_err(|e| s3_error("CompleteMultipartUpload", e))?;
    bar.finish_and_clear();
    Ok(count)
}

/// A multipart upload under way.
struct Upload<'a> {
    client: &'a Client,
    bucket: &'a str,
    object: &'a str,
    upload_id: &'a str,
    sse: Option<&'a SseC>,
}

impl Upload<'_> {
    /// Reads the file part by part, encrypting in order where the content is encrypted here
    /// (GCM is sequential), and uploads up to [`PARTS_IN_FLIGHT`] parts at once. The tag ends
    /// the last part (which may hold only the tag when the file fills its parts exactly: S3
    /// takes a small last part).
    async fn parts(
        &self,
        input: &mut std::fs::File,
        part_size: u64,
        mut encryptor: Option<ContentEncryptor>,
        bar: &indicatif::ProgressBar,
    ) -> Result<Vec<CompletedPart>, CliError> {
        let mut in_flight = tokio::task::JoinSet::new();
        let mut done = Vec::new();
        let mut number = 0i32;
        let mut plaintext = Zeroizing::new(vec![0u8; part_size as usize]);
        loop {
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
            let last = filled < plaintext.len();
            let body = match encryptor.as_mut() {
                Some(enc) => {
                    let mut body = Vec::with_capacity(filled + s3ec::TAG_LEN);
                    enc.update(&plaintext[..filled], &mut body)?;
                    if last {
                        if let Some(enc) = encryptor.take() {
                            body.extend_from_slice(&enc.finish()?);
                        }
                    }
                    body
                }
                None if filled == 0 && number > 0 => break, // SSE-C: nothing left
                None => plaintext[..filled].to_vec(),
            };
            number += 1;
            let request = self
                .client
                .upload_part()
                .bucket(self.bucket)
                .key(self.object)
                .upload_id(self.upload_id)
                .part_number(number)
                .body(ByteStream::from(body));
            let request = with_sse_c!(request, self.sse);
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
            if last {
                break;
            }
        }
        while let Some(joined) = in_flight.join_next().await {
            done.push(joined.map_err(|e| CliError::other(e.to_string()))??);
        }
        done.sort_by_key(|p| p.part_number());
        Ok(done)
    }
}

/// `get --sse-c`: reads the wrapped SSE-C key from the object's tag, unwraps it with the
/// caller's context, and downloads the object with the SSE-C headers (S3 checks the key
/// against the one the object was written with and decrypts).
async fn download_sse_c(
    client: &Client,
    keys: &mut DataKeys,
    bucket: &str,
    object: &str,
    file: &Path,
    expected: &BTreeMap<String, String>,
) -> Result<Box<dyn ErasedReport>, CliError> {
    use base64::Engine;
    let tags = client
        .get_object_tagging()
        .bucket(bucket)
        .key(object)
        .send()
        .await
        .map_err(|e| s3_error("GetObjectTagging", e))?;
    let blob = tags
        .tag_set()
        .iter()
        .find(|t| t.key() == SSE_C_TAG)
        .and_then(|t| {
            base64::engine::general_purpose::STANDARD
                .decode(t.value())
                .ok()
        })
        .ok_or_else(|| {
            CliError::new(
                Failure::Invalid,
                format!("the object has no {SSE_C_TAG} tag: it was not put with --sse-c"),
            )
        })?;
    let (data_key, key_id) = keys.unwrap(&blob, &sse_c_context(expected)?).await?;
    let sse = SseC::new(&data_key);
    let response = with_sse_c!(client.get_object().bucket(bucket).key(object), Some(&sse))
        .send()
        .await
        .map_err(|e| s3_error("GetObject", e))?;
    let bytes = save_body(response, file, None).await?;
    Ok(Box::new(Transfer {
        status: "downloaded",
        bucket: bucket.to_owned(),
        key: object.to_owned(),
        bytes,
        key_id,
        format: "sse-c",
        envelope: "tag",
        parts: 0,
    }))
}

/// Streams an object's body into `file` under a temporary name, renamed into place once all
/// of it arrived: through `decryptor` when the content was encrypted here (then only once
/// its tag verified), as it comes for SSE-C. Returns the bytes written.
async fn save_body(
    response: aws_sdk_s3::operation::get_object::GetObjectOutput,
    file: &Path,
    mut decryptor: Option<ContentDecryptor>,
) -> Result<u64, CliError> {
    let (output, mut writer) =
        Output::open(&file.to_string_lossy()).map_err(|e| CliError::new(Failure::Usage, e))?;
    let bar = progress(response.content_length().unwrap_or(0).max(0) as u64);
    let mut body = response.body;
    let mut plaintext = Zeroizing::new(Vec::new());
    let mut bytes = 0u64;
    while let Some(chunk) = body.next().await {
        let chunk = chunk
            .map_err(|e| CliError::new(Failure::Unavailable, format!("S3 GetObject body: {e}")))?;
        let out: &[u8] = match decryptor.as_mut() {
            Some(decryptor) => {
                plaintext.clear();
                decryptor.update(&chunk, &mut plaintext)?;
                &plaintext
            }
            None => &chunk,
        };
        writer
            .write_all(out)
            .map_err(|e| CliError::other(e.to_string()))?;
        bytes += out.len() as u64;
        bar.inc(chunk.len() as u64);
    }
    if let Some(decryptor) = decryptor {
        decryptor.finish()?;
    }
    writer.flush().map_err(|e| CliError::other(e.to_string()))?;
    drop(writer);
    output.commit().map_err(CliError::other)?;
    bar.finish_and_clear();
    Ok(bytes)
}

/// An object's envelope, either format.
enum Found {
    V2(Envelope),
    V3(EnvelopeV3),
}

impl Found {
    fn encrypted_key(&self) -> &[u8] {
        match self {
            Self::V2(e) => &e.encrypted_key,
            Self::V3(e) => &e.encrypted_key,
        }
    }

    fn context(&self) -> &BTreeMap<String, String> {
        match self {
            Self::V2(e) => &e.context,
            Self::V3(e) => &e.context,
        }
    }

    /// The caller's context must equal the object's (less the reserved entry).
    fn check_context(&self, expected: &BTreeMap<String, String>) -> Result<(), CliError> {
        match self {
            Self::V2(e) => e.check_context(expected)?,
            Self::V3(e) => e.check_context(expected)?,
        }
        Ok(())
    }

    /// The content decryptor for the unwrapped data key (V3: after the commitment check).
    fn decryptor(&self, data_key: &[u8]) -> Result<ContentDecryptor, CliError> {
        Ok(match self {
            Self::V2(e) => ContentDecryptor::new(data_key, &e.iv)?,
            Self::V3(e) => {
                let key = e.content_key(data_key)?;
                ContentDecryptor::with_aad(&*key, &s3ec::IV_V3, &s3ec::SUITE_V3)?
            }
        })
    }

    fn format(&self) -> &'static str {
        match self {
            Self::V2(_) => "v2",
            Self::V3(_) => "v3",
        }
    }
}

/// The largest instruction file read (an envelope is well under 4 KiB).
const MAX_INSTRUCTION_FILE: usize = 64 * 1024;

/// Reads the instruction file's entries.
async fn instruction_entries(
    client: &Client,
    bucket: &str,
    object: &str,
) -> Result<HashMap<String, String>, CliError> {
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
                    "the object's encryption envelope is not (all) in its metadata, and its instruction file cannot be read ({cause})"
                ),
            )
        })?;
    // Its size is checked before any of it is read, and again as it is read: a server (or
    // whoever wrote the bucket) may announce one length and send more.
    let too_large = || {
        CliError::new(
            Failure::Invalid,
            format!("the instruction file is larger than {MAX_INSTRUCTION_FILE} bytes"),
        )
    };
    if instruction
        .content_length()
        .is_some_and(|len| len < 0 || len as u64 > MAX_INSTRUCTION_FILE as u64)
    {
        return Err(too_large());
    }
    let mut stream = instruction.body;
    let mut body = Vec::new();
    while let Some(chunk) = stream.next().await {
        let chunk = chunk.map_err(|e| {
            CliError::new(Failure::Unavailable, format!("S3 instruction file: {e}"))
        })?;
        if body.len() + chunk.len() > MAX_INSTRUCTION_FILE {
            return Err(too_large());
        }
        body.extend_from_slice(&chunk);
    }
    serde_json::from_slice(&body).map_err(|_| {
        CliError::new(
            Failure::Invalid,
            "S3 encryption envelope: the instruction file is not a JSON object of strings",
        )
    })
}

/// Reads the object's envelope: from its metadata, else (or, for V3, also) from its
/// instruction file.
async fn envelope_of(
    client: &Client,
    bucket: &str,
    object: &str,
    metadata: &HashMap<String, String>,
) -> Result<(Found, &'static str), CliError> {
    match s3ec::detect(metadata) {
        Format::V2 => Ok((Found::V2(Envelope::from_entries(metadata)?), "metadata")),
        Format::V3 if metadata.contains_key("x-amz-3") => {
            Ok((Found::V3(EnvelopeV3::from_entries(metadata)?), "metadata"))
        }
        Format::V3 => {
            // x-amz-c, x-amz-d and x-amz-i stay in the metadata; the rest is in the file.
            let mut entries = instruction_entries(client, bucket, object).await?;
            for (k, v) in metadata {
                if s3ec::V3_METADATA_ONLY.contains(&k.as_str()) {
                    entries.insert(k.clone(), v.clone());
                }
            }
            Ok((
                Found::V3(EnvelopeV3::from_entries(&entries)?),
                "instruction-file",
            ))
        }
        Format::V1 => Err(CliError::new(
            Failure::Invalid,
            "the object is in the legacy V1 format (unauthenticated modes), which wrapctl refuses to read",
        )),
        Format::None => {
            let entries = instruction_entries(client, bucket, object).await?;
            Ok((
                Found::V2(Envelope::from_entries(&entries)?),
                "instruction-file",
            ))
        }
    }
}

/// What `s3 get` reads, and how.
struct GetRequest<'a> {
    bucket: &'a str,
    object: &'a str,
    file: &'a Path,
    expected: &'a BTreeMap<String, String>,
    /// Refuse objects in a format without key commitment (V2).
    require_commitment: bool,
}

async fn download(
    client: &Client,
    keys: &mut DataKeys,
    read: GetRequest<'_>,
) -> Result<Box<dyn ErasedReport>, CliError> {
    let GetRequest {
        bucket,
        object,
        file,
        expected,
        require_commitment,
    } = read;
    let response = client
        .get_object()
        .bucket(bucket)
        .key(object)
        .send()
        .await
        .map_err(|e| s3_error("GetObject", e))?;
    let metadata = response.metadata().cloned().unwrap_or_default();
    let (envelope, placement) = envelope_of(client, bucket, object, &metadata).await?;
    if require_commitment && matches!(envelope, Found::V2(_)) {
        return Err(CliError::new(
            Failure::Invalid,
            "the object is in the V2 format, which does not commit to its data key; --require-commitment reads V3 objects only",
        ));
    }
    envelope.check_context(expected)?;
    let (data_key, key_id) = keys
        .unwrap(envelope.encrypted_key(), envelope.context())
        .await?;
    let decryptor = envelope.decryptor(&data_key)?;
    let bytes = save_body(response, file, Some(decryptor)).await?;
    Ok(Box::new(Transfer {
        status: "downloaded",
        bucket: bucket.to_owned(),
        key: object.to_owned(),
        bytes,
        key_id,
        format: envelope.format(),
        envelope: placement,
        parts: 0,
    }))
}
