//! Downloads: the object's envelope (metadata, instruction file, or the SSE-C tag), its data
//! key unwrapped by wrapd with the caller's context, and the body decrypted into an
//! [`Output`] that appears only once the whole object authenticated.

use std::collections::{BTreeMap, HashMap};
use std::io::Write;
use std::path::Path;

use aws_sdk_s3::Client;
use zeroize::Zeroizing;

use super::*;
use crate::client::s3ec::{ContentDecryptor, Envelope, EnvelopeV3, Format, INSTRUCTION_SUFFIX};

/// What `get` reads, and how.
pub struct GetRequest<'a> {
    /// The bucket.
    pub bucket: &'a str,
    /// The object's key.
    pub object: &'a str,
    /// Where to write the plaintext (a file: the object authenticates only at its end).
    pub file: &'a Path,
    /// The encryption context, which must equal the object's.
    pub expected: &'a BTreeMap<String, String>,
    /// The object was put with SSE-C.
    pub sse_c: bool,
    /// Refuse objects in a format without key commitment (V2).
    pub require_commitment: bool,
}

/// Downloads and decrypts an object (see the module docs). `endpoint`: the S3 endpoint the
/// client resolved ([`client`]), which SSE-C requires to be https or on this host.
pub async fn get(
    client: &Client,
    endpoint: Option<&str>,
    keys: &mut DataKeys,
    request: GetRequest<'_>,
    progress: &std::sync::Arc<dyn Progress>,
) -> Result<Transfer, ClientError> {
    if request.file.as_os_str() == "-" {
        // GCM authenticates the whole object at its end: nothing may be released before,
        // so the output is a file renamed into place once it verified.
        return Err(ClientError::usage(
            "s3 get writes to a file (not stdout): the object authenticates only at its end",
        ));
    }
    if request.sse_c {
        check_sse_c_endpoint(endpoint)?;
        download_sse_c(client, keys, &request, progress).await
    } else {
        download(client, keys, &request, progress).await
    }
}

/// `get --sse-c`: reads the wrapped SSE-C key from the object's tag, unwraps it with the
/// caller's context, and downloads the object with the SSE-C headers (S3 checks the key
/// against the one the object was written with and decrypts).
async fn download_sse_c(
    client: &Client,
    keys: &mut DataKeys,
    request: &GetRequest<'_>,
    progress: &std::sync::Arc<dyn Progress>,
) -> Result<Transfer, ClientError> {
    use base64::Engine;
    let (bucket, object, file, expected) = (
        request.bucket,
        request.object,
        request.file,
        request.expected,
    );
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
            ClientError::new(
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
    let bytes = save_body(response, file, None, progress).await?;
    Ok(Transfer {
        status: "downloaded",
        bucket: bucket.to_owned(),
        key: object.to_owned(),
        bytes,
        key_id,
        format: "sse-c",
        envelope: "tag",
        parts: 0,
    })
}

/// Streams an object's body into `file` under a temporary name, renamed into place once all
/// of it arrived: through `decryptor` when the content was encrypted here (then only once
/// its tag verified), as it comes for SSE-C. Returns the bytes written.
async fn save_body(
    response: aws_sdk_s3::operation::get_object::GetObjectOutput,
    file: &Path,
    mut decryptor: Option<ContentDecryptor>,
    progress: &std::sync::Arc<dyn Progress>,
) -> Result<u64, ClientError> {
    let (output, mut writer) =
        Output::open(&file.to_string_lossy()).map_err(|e| ClientError::new(Failure::Usage, e))?;
    progress.start(response.content_length().unwrap_or(0).max(0) as u64);
    let mut body = response.body;
    let mut plaintext = Zeroizing::new(Vec::new());
    let mut bytes = 0u64;
    while let Some(chunk) = body.next().await {
        let chunk = chunk.map_err(|e| {
            ClientError::new(Failure::Unavailable, format!("S3 GetObject body: {e}"))
        })?;
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
            .map_err(|e| ClientError::other(e.to_string()))?;
        bytes += out.len() as u64;
        progress.advance(chunk.len() as u64);
    }
    if let Some(decryptor) = decryptor {
        decryptor.finish()?;
    }
    writer
        .flush()
        .map_err(|e| ClientError::other(e.to_string()))?;
    drop(writer);
    output.commit().map_err(ClientError::other)?;
    progress.finish();
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
    fn check_context(&self, expected: &BTreeMap<String, String>) -> Result<(), ClientError> {
        match self {
            Self::V2(e) => e.check_context(expected)?,
            Self::V3(e) => e.check_context(expected)?,
        }
        Ok(())
    }

    /// The content decryptor for the unwrapped data key (V3: after the commitment check).
    fn decryptor(&self, data_key: &[u8]) -> Result<ContentDecryptor, ClientError> {
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
pub(super) async fn instruction_entries(
    client: &Client,
    bucket: &str,
    object: &str,
) -> Result<HashMap<String, String>, ClientError> {
    let instruction = client
        .get_object()
        .bucket(bucket)
        .key(format!("{object}{INSTRUCTION_SUFFIX}"))
        .send()
        .await
        .map_err(|e| {
            let cause = s3_error("GetObject (instruction file)", e);
            ClientError::new(
                Failure::Invalid,
                format!(
                    "the object's encryption envelope is not (all) in its metadata, and its instruction file cannot be read ({cause})"
                ),
            )
        })?;
    // Its size is checked before any of it is read, and again as it is read: a server (or
    // whoever wrote the bucket) may announce one length and send more.
    let too_large = || {
        ClientError::new(
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
            ClientError::new(Failure::Unavailable, format!("S3 instruction file: {e}"))
        })?;
        if body.len() + chunk.len() > MAX_INSTRUCTION_FILE {
            return Err(too_large());
        }
        body.extend_from_slice(&chunk);
    }
    serde_json::from_slice(&body).map_err(|_| {
        ClientError::new(
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
) -> Result<(Found, &'static str), ClientError> {
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
        Format::V1 => Err(ClientError::new(
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

async fn download(
    client: &Client,
    keys: &mut DataKeys,
    request: &GetRequest<'_>,
    progress: &std::sync::Arc<dyn Progress>,
) -> Result<Transfer, ClientError> {
    let (bucket, object, file, expected) = (
        request.bucket,
        request.object,
        request.file,
        request.expected,
    );
    let require_commitment = request.require_commitment;
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
        return Err(ClientError::new(
            Failure::Invalid,
            "the object is in the V2 format, which does not commit to its data key; --require-commitment reads V3 objects only",
        ));
    }
    envelope.check_context(expected)?;
    let (data_key, key_id) = keys
        .unwrap(envelope.encrypted_key(), envelope.context())
        .await?;
    let decryptor = envelope.decryptor(&data_key)?;
    let bytes = save_body(response, file, Some(decryptor), progress).await?;
    Ok(Transfer {
        status: "downloaded",
        bucket: bucket.to_owned(),
        key: object.to_owned(),
        bytes,
        key_id,
        format: envelope.format(),
        envelope: placement,
        parts: 0,
    })
}
