//! S3 objects encrypted on the client: the S3 Encryption Client's formats (`s3ec`), with
//! data keys from wrapd over gRPC or its AWS KMS-compatible API, and the S3 calls made by the
//! official AWS SDK for Rust (standard credential and region resolution, a custom endpoint,
//! path-style addressing for S3-compatible servers). `wrapctl s3` is built on it.
//!
//! Uploads ([`put`]) stream the file through AES-256-GCM: a single `PutObject` up to the
//! multipart threshold, else a multipart upload whose parts are encrypted in order and sent
//! a few at a time (memory: parts in flight × part size). Downloads ([`get`]) stream the
//! body through the decryptor into an [`Output`] moved into place only once the tag checks
//! out. With SSE-C, S3 encrypts with a fresh data key from wrapd, stored wrapped in an
//! object tag.
//!
//! `put.rs` uploads, `get.rs` downloads, `rewrap.rs` re-wraps and counts objects' data keys
//! without their bodies; the data keys, the clients and the options are here.

use std::collections::BTreeMap;
use std::path::Path;

use aws_sdk_s3::Client;
use serde::Serialize;
use tonic::transport::Channel;
use zeroize::Zeroizing;

pub use get::{GetRequest, get};
pub use put::{PutRequest, put};
pub use rewrap::{Listed, RewrapOptions, census, list, rewrap_object};

use super::s3ec::{self, ContentEncryptor};
use super::{ClientError, DataKeyServiceClient, Failure, Output};
use crate::proto::{GenerateDataKeyRequest, UnwrapRequest};

pub(super) const MIB: u64 = 1024 * 1024;
/// S3's smallest part (but the last) and most parts.
pub(super) const MIN_PART: u64 = 5 * MIB;
pub(super) const MAX_PARTS: u64 = 10_000;
/// Parts uploading at once.
pub(super) const PARTS_IN_FLIGHT: usize = 4;

/// The object tag holding an SSE-C object's wrapped key: tags, unlike metadata, can be read
/// without the SSE-C key (S3 refuses `HeadObject` and `GetObject` of an SSE-C object without
/// it, metadata included), and are written atomically with the object.
pub const SSE_C_TAG: &str = "wrapd-sse-c-key";
/// The encryption context entry that binds an SSE-C data key to its use.
pub const SSE_C_CONTEXT_KEY: &str = "wrapctl:s3-sse-c";

/// An SSE-C key as S3 takes it: base64 of the 32 bytes, and of their MD5.
pub(super) struct SseC {
    key: Zeroizing<String>,
    md5: String,
}

impl SseC {
    pub(super) fn new(key: &[u8]) -> Self {
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
// Declared after the macro, which they use.
mod get;
mod put;
mod rewrap;

/// Refuses `--sse-c` toward a plain `http://` S3 endpoint that is not on this host: every
/// request of an SSE-C object carries its key, which must not cross a network in clear.
/// `endpoint`: the one the client resolved (`None`: AWS itself, https).
pub(super) fn check_sse_c_endpoint(endpoint: Option<&str>) -> Result<(), ClientError> {
    let Some(endpoint) = endpoint else {
        return Ok(());
    };
    let uri: http::Uri = endpoint
        .parse()
        .map_err(|_| ClientError::usage(format!("the S3 endpoint {endpoint:?} is not a URL")))?;
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
    Err(ClientError::usage(format!(
        "--sse-c sends the object's key with every request, and the S3 endpoint {endpoint} is not https:// (plain HTTP is allowed only to this host)"
    )))
}

/// The context of an SSE-C data key: the caller's entries and the reserved one.
pub(super) fn sse_c_context(
    user: &BTreeMap<String, String>,
) -> Result<BTreeMap<String, String>, ClientError> {
    if user.contains_key(SSE_C_CONTEXT_KEY) {
        return Err(ClientError::usage(format!(
            "the encryption context entry {SSE_C_CONTEXT_KEY} is reserved"
        )));
    }
    let mut context = user.clone();
    context.insert(SSE_C_CONTEXT_KEY.to_owned(), "AES256".to_owned());
    Ok(context)
}

/// Percent-encodes a base64 tag value for the `x-amz-tagging` header (a URL query).
pub(super) fn tag_value(b64: &str) -> String {
    b64.replace('+', "%2B")
        .replace('/', "%2F")
        .replace('=', "%3D")
}

/// How the content is protected on its way to S3.
pub(super) enum Protection {
    /// The S3 Encryption Client format: encrypted here.
    ClientSide(ContentEncryptor),
    /// SSE-C: S3 encrypts with this key.
    SseC(SseC),
}

/// The S3 Encryption Client format written.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ObjectFormat {
    /// AES-GCM under the data key (read by every S3 Encryption Client).
    V2,
    /// Key commitment (ALG_AES_256_GCM_HKDF_SHA512_COMMIT_KEY; read by the V3/V4 releases).
    V3,
}

/// Where S3 is and how to address it, and how uploads are cut.
#[derive(Debug, Clone)]
pub struct S3Options {
    /// The S3 endpoint URL (`None`: AWS, or `AWS_ENDPOINT_URL_S3` / `AWS_ENDPOINT_URL`); a
    /// custom endpoint is addressed path-style.
    pub endpoint: Option<String>,
    /// Address buckets path-style even on AWS.
    pub path_style: bool,
    /// The bucket's region (`None`: the standard AWS resolution; with a custom endpoint and
    /// none resolved, us-east-1).
    pub region: Option<String>,
    /// Files larger than this many bytes are uploaded in parts.
    pub multipart_threshold: u64,
    /// Part size in bytes (at least 5 MiB; grown to keep within 10,000 parts).
    pub part_size: u64,
}

/// What a transfer reports of its progress, in bytes (`wrapctl` draws a bar).
pub trait Progress: Send + Sync {
    /// The transfer of `total` bytes starts.
    fn start(&self, total: u64);
    /// `bytes` more are done.
    fn advance(&self, bytes: u64);
    /// The transfer is over.
    fn finish(&self);
}

/// No progress shown.
pub struct NoProgress;

impl Progress for NoProgress {
    fn start(&self, _: u64) {}
    fn advance(&self, _: u64) {}
    fn finish(&self) {}
}

/// What a `put` or `get` did.
#[derive(Debug, Clone, Serialize)]
pub struct Transfer {
    /// `uploaded` or `downloaded`.
    pub status: &'static str,
    /// The bucket.
    pub bucket: String,
    /// The object's key.
    pub key: String,
    /// Plaintext bytes moved.
    pub bytes: u64,
    /// The wrapd key that wraps the object's data key.
    pub key_id: String,
    /// `v2`, `v3` or `sse-c`.
    pub format: &'static str,
    /// Where the envelope is: `metadata`, `instruction-file` or `tag`.
    pub envelope: &'static str,
    /// Parts uploaded (1 for a single PUT, 0 for a download).
    pub parts: usize,
}

/// Where data keys come from: wrapd over gRPC, or its AWS KMS-compatible API. The blobs are
/// the same either way.
pub enum DataKeys {
    /// wrapd over gRPC.
    Grpc(DataKeyServiceClient<Channel>),
    /// wrapd's AWS KMS-compatible API, through the official AWS SDK.
    Kms(aws_sdk_kms::Client),
}

/// A data key: plaintext, wrapped, and the key that wraps it.
pub(super) struct DataKey {
    plaintext: Zeroizing<Vec<u8>>,
    blob: Vec<u8>,
    key_id: String,
}

fn kms_error<E, R>(what: &str, err: aws_sdk_kms::error::SdkError<E, R>) -> ClientError
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
            ClientError::new(
                failure,
                format!("KMS {what}: {code}: {}", service.message().unwrap_or("")),
            )
        }
        _ => ClientError::new(
            Failure::Unavailable,
            format!(
                "KMS {what}: {}",
                aws_sdk_kms::error::DisplayErrorContext(&err)
            ),
        ),
    }
}

impl DataKeys {
    /// Data keys through wrapd's AWS KMS-compatible API at `endpoint` (credentials and
    /// region from the standard AWS settings), trusting the CA certificates of `ca_bundle`
    /// (else `AWS_CA_BUNDLE`, else the system's roots).
    pub async fn kms(endpoint: &str, ca_bundle: Option<&Path>) -> Result<Self, ClientError> {
        let bundle = ca_bundle
            .map(Path::to_path_buf)
            .or_else(|| std::env::var_os("AWS_CA_BUNDLE").map(Into::into));
        let loader = aws_config::defaults(aws_config::BehaviorVersion::latest())
            .endpoint_url(endpoint)
            .http_client(https_client(bundle.as_deref())?);
        let mut shared = loader.load().await;
        if shared.region().is_none() {
            shared = shared
                .into_builder()
                .region(aws_config::Region::new("us-east-1"))
                .build();
        }
        Ok(Self::Kms(aws_sdk_kms::Client::new(&shared)))
    }

    pub(super) async fn generate(
        &mut self,
        key: &str,
        context: &BTreeMap<String, String>,
    ) -> Result<DataKey, ClientError> {
        match self {
            Self::Grpc(client) => {
                // An ARN names the same key as its resource part (`key/…`, `alias/…`).
                let key = super::keyring::split_arn(key)
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

    pub(super) async fn unwrap(
        &mut self,
        blob: &[u8],
        context: &BTreeMap<String, String>,
    ) -> Result<(Zeroizing<Vec<u8>>, String), ClientError> {
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

/// The bucket and key of `s3://BUCKET/KEY`.
pub fn parse_url(url: &str) -> Result<(String, String), ClientError> {
    url.strip_prefix("s3://")
        .and_then(|rest| rest.split_once('/'))
        .filter(|(bucket, key)| !bucket.is_empty() && !key.is_empty())
        .map(|(b, k)| (b.to_owned(), k.to_owned()))
        .ok_or_else(|| ClientError::new(Failure::Usage, format!("{url:?} is not s3://BUCKET/KEY")))
}

/// An S3 failure: the service's error code and message, or the transport's cause.
pub(super) fn s3_error<E, R>(what: &str, err: aws_sdk_s3::error::SdkError<E, R>) -> ClientError
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
            ClientError::new(
                failure,
                format!("S3 {what}: {code}: {}", service.message().unwrap_or("")),
            )
        }
        _ => ClientError::new(
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
) -> Result<aws_sdk_s3::config::SharedHttpClient, ClientError> {
    use aws_smithy_http_client::tls;
    let trust = match bundle {
        None => tls::TrustStore::default(),
        Some(bundle) => {
            let pem = std::fs::read(bundle)
                .map_err(|e| ClientError::usage(format!("{}: {e}", bundle.display())))?;
            tls::TrustStore::empty()
                .with_native_roots(false)
                .with_pem_certificate(pem)
        }
    };
    let context = tls::TlsContext::builder()
        .with_trust_store(trust)
        .build()
        .map_err(|e| ClientError::usage(format!("TLS trust store: {e}")))?;
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
pub async fn client(options: &S3Options) -> Result<(Client, Option<String>), ClientError> {
    let mut loader = aws_config::defaults(aws_config::BehaviorVersion::latest())
        .http_client(https_client(None)?);
    if let Some(endpoint) = &options.endpoint {
        loader = loader.endpoint_url(endpoint);
    }
    if let Some(region) = &options.region {
        loader = loader.region(aws_config::Region::new(region.clone()));
    }
    let mut shared = loader.load().await;
    let endpoint = options
        .endpoint
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
    if custom_endpoint || options.path_style {
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
