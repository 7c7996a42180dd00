//! Uploads: the object's data key from wrapd, its envelope (metadata, instruction file or,
//! for SSE-C, a tag), and the content encrypted here (or by S3, for SSE-C) in one PUT or a
//! multipart upload.

use std::collections::{BTreeMap, HashMap};
use std::io::Read;
use std::path::Path;

use aws_sdk_s3::Client;
use aws_sdk_s3::primitives::ByteStream;
use aws_sdk_s3::types::{CompletedMultipartUpload, CompletedPart};
use zeroize::Zeroizing;

use super::*;
use crate::client::s3ec::{Envelope, EnvelopeV3, INSTRUCTION_SUFFIX, UNENCRYPTED_LENGTH};

/// What `put` uploads, and how.
pub struct PutRequest<'a> {
    /// The file to upload.
    pub file: &'a Path,
    /// The bucket.
    pub bucket: &'a str,
    /// The object's key.
    pub object: &'a str,
    /// The wrapd key (id, alias, or as AWS KMS names it) for the object's data key.
    pub key: &'a str,
    /// The encryption context readers must give.
    pub context: &'a BTreeMap<String, String>,
    /// Put the envelope in KEY.instruction instead of the object's metadata.
    pub instruction_file: bool,
    /// Server-side encryption with a key from wrapd (SSE-C) instead.
    pub sse_c: bool,
    /// The format written (client-side encryption).
    pub format: ObjectFormat,
}

/// Encrypts a file and uploads it (see the module docs). `endpoint`: the S3 endpoint the
/// client resolved ([`client`]), which SSE-C requires to be https or on this host.
pub async fn put(
    client: &Client,
    endpoint: Option<&str>,
    keys: &mut DataKeys,
    request: PutRequest<'_>,
    options: &S3Options,
    progress: &std::sync::Arc<dyn Progress>,
) -> Result<Transfer, ClientError> {
    let PutRequest {
        file,
        bucket,
        object,
        key,
        context: user,
        instruction_file,
        sse_c,
        format,
    } = request;
    let (bucket, object) = (bucket.to_owned(), object.to_owned());

    let full = if sse_c {
        sse_c_context(user)?
    } else if format == ObjectFormat::V3 {
        s3ec::context_for_v3(user)?
    } else {
        s3ec::context_for(user)?
    };
    let generated = keys.generate(key, &full).await?;
    if generated.plaintext.len() != s3ec::DATA_KEY_LEN {
        return Err(ClientError::other(
            "the key service returned a wrong-sized data key",
        ));
    }
    let data_key = generated.plaintext;
    if sse_c {
        check_sse_c_endpoint(endpoint)?;
    }
    let size = std::fs::metadata(file)
        .map_err(|e| ClientError::other(format!("{}: {e}", file.display())))?
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
        let (envelope, content_key) = EnvelopeV3::new(generated.blob, &data_key, user, message_id)?;
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
        let encryptor = ContentEncryptor::with_aad(&*content_key, &s3ec::IV_V3, &s3ec::SUITE_V3)?;
        let placement = if instruction_file {
            "instruction-file"
        } else {
            "metadata"
        };
        (Protection::ClientSide(encryptor), "v3", placement)
    } else {
        let mut iv = [0u8; s3ec::IV_LEN];
        rand::RngCore::fill_bytes(&mut rand::rng(), &mut iv);
        let envelope = Envelope::new(generated.blob, iv, user)?;
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
    let parts = upload(client, &target, file, size, protection, options, progress).await?;
    Ok(Transfer {
        status: "uploaded",
        bucket,
        key: object,
        bytes: size,
        key_id: generated.key_id,
        format,
        envelope: placement,
        parts,
    })
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
    options: &S3Options,
    progress: &std::sync::Arc<dyn Progress>,
) -> Result<usize, ClientError> {
    let mut input = std::fs::File::open(file)
        .map_err(|e| ClientError::other(format!("{}: {e}", file.display())))?;
    progress.start(size);
    let read_error = |e: std::io::Error| ClientError::other(format!("{}: {e}", file.display()));
    let (mut encryptor, sse) = match protection {
        Protection::ClientSide(encryptor) => (Some(encryptor), None),
        Protection::SseC(sse) => (None, Some(sse)),
    };
    let (bucket, object) = (target.bucket.as_str(), target.object.as_str());
    if size <= options.multipart_threshold {
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
        progress.finish();
        return Ok(1);
    }
    let part_size = options
        .part_size
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
        .ok_or_else(|| ClientError::other("S3 gave no upload id"))?
        .to_owned();
    let upload = Upload {
        client,
        bucket,
        object,
        upload_id: &upload_id,
        sse: sse.as_ref(),
    };
    let parts = match upload
        .parts(&mut input, part_size, encryptor, progress)
        .await
    {
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
    progress.finish();
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
        progress: &std::sync::Arc<dyn Progress>,
    ) -> Result<Vec<CompletedPart>, ClientError> {
        let mut in_flight = tokio::task::JoinSet::new();
        let mut done = Vec::new();
        let mut number = 0i32;
        let mut plaintext = Zeroizing::new(vec![0u8; part_size as usize]);
        loop {
            let mut filled = 0;
            while filled < plaintext.len() {
                let n = input
                    .read(&mut plaintext[filled..])
                    .map_err(|e| ClientError::other(e.to_string()))?;
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
            let progress = progress.clone();
            let len = filled as u64;
            in_flight.spawn(async move {
                let sent = request
                    .send()
                    .await
                    .map_err(|e| s3_error("UploadPart", e))?;
                progress.advance(len);
                Ok::<_, ClientError>(
                    CompletedPart::builder()
                        .set_e_tag(sent.e_tag().map(str::to_owned))
                        .part_number(part_number)
                        .build(),
                )
            });
            while in_flight.len() >= PARTS_IN_FLIGHT || (last && !in_flight.is_empty()) {
                if let Some(joined) = in_flight.join_next().await {
                    done.push(joined.map_err(|e| ClientError::other(e.to_string()))??);
                }
            }
            if last {
                break;
            }
        }
        while let Some(joined) = in_flight.join_next().await {
            done.push(joined.map_err(|e| ClientError::other(e.to_string()))??);
        }
        done.sort_by_key(|p| p.part_number());
        Ok(done)
    }
}
