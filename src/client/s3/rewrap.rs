//! S3 objects re-wrapped and counted without downloading a body: the wrapped data key is
//! found where the object keeps it (its metadata, its instruction file, or for SSE-C objects
//! put by wrapctl its tag), and only that is read or replaced.
//!
//! - **Metadata**: the object is copied onto itself with the one metadata entry replaced
//!   (`CopyObject`, `REPLACE`, its content headers, storage class and server-side encryption
//!   carried over), on condition that its ETag is still the one read
//!   (`x-amz-copy-source-if-match`). S3 copies at most 5 GiB in one call; larger objects are
//!   refused, left as they are.
//! - **Instruction file**: the file is written again with the one entry replaced, on
//!   condition of its ETag (`If-Match`).
//! - **SSE-C tag**: the tag is written again, the object's other tags kept. S3 has no
//!   condition on tagging: the tags are read again just before and the write is skipped if
//!   they changed.
//!
//! Before each write the object (or instruction file, or tag set) is read again and compared
//! too, so a server that ignores the conditions still leaves a changed object alone, but for
//! the moment between that read and the write.

use std::collections::{BTreeMap, HashMap};

use aws_sdk_s3::Client;
use base64::Engine;
use base64::engine::general_purpose::STANDARD;

use super::get::instruction_entries;
use super::*;
use crate::client::census::Census;
use crate::client::rewrap::{Outcome, Rewrapper, blob_key_version};
use crate::client::s3ec::{
    Envelope, EnvelopeV3, Format, INSTRUCTION_SUFFIX, KEY_V2, KEY_V3, V3_METADATA_ONLY,
};
use crate::context::EncryptionContext;

/// The most bytes S3 copies in one `CopyObject`.
const MAX_COPY: u64 = 5 * 1024 * MIB;

/// An object found by a listing.
#[derive(Debug, Clone)]
pub struct Listed {
    /// Its key.
    pub key: String,
    /// Its stored size.
    pub size: u64,
}

/// Every object under `prefix`, instruction files left out (each belongs to its object).
pub async fn list(client: &Client, bucket: &str, prefix: &str) -> Result<Vec<Listed>, ClientError> {
    let mut out = Vec::new();
    let mut pages = client
        .list_objects_v2()
        .bucket(bucket)
        .prefix(prefix)
        .into_paginator()
        .send();
    while let Some(page) = pages.next().await {
        let page = page.map_err(|e| s3_error("ListObjectsV2", e))?;
        for object in page.contents() {
            let Some(key) = object.key() else { continue };
            if key.ends_with(INSTRUCTION_SUFFIX) {
                continue;
            }
            out.push(Listed {
                key: key.to_owned(),
                size: object.size().unwrap_or(0).max(0) as u64,
            });
        }
    }
    Ok(out)
}

/// Where an object keeps its wrapped data key.
enum Located {
    /// In its metadata, under `field`.
    Metadata {
        head: Box<aws_sdk_s3::operation::head_object::HeadObjectOutput>,
        field: &'static str,
        blob: Vec<u8>,
        context: BTreeMap<String, String>,
    },
    /// In its instruction file, under `field`.
    InstructionFile {
        entries: HashMap<String, String>,
        etag: Option<String>,
        field: &'static str,
        blob: Vec<u8>,
        context: BTreeMap<String, String>,
    },
    /// In its SSE-C tag (the object put by `wrapctl s3 put --sse-c`).
    SseCTag {
        tags: Vec<aws_sdk_s3::types::Tag>,
        blob: Vec<u8>,
    },
    /// Nowhere: not an object wrapd's data keys protect.
    Nowhere,
}

impl Located {
    fn blob(&self) -> Option<&[u8]> {
        match self {
            Self::Metadata { blob, .. }
            | Self::InstructionFile { blob, .. }
            | Self::SseCTag { blob, .. } => Some(blob),
            Self::Nowhere => None,
        }
    }
}

fn decode(value: Option<&String>) -> Option<Vec<u8>> {
    value.and_then(|v| STANDARD.decode(v).ok())
}

/// The object's envelope (metadata first, then the SSE-C tag, then the instruction file).
async fn locate(client: &Client, bucket: &str, key: &str) -> Result<Located, ClientError> {
    // S3 refuses HeadObject of an SSE-C object without its key: then only the tag can tell.
    let head = client.head_object().bucket(bucket).key(key).send().await;
    let head = match head {
        Ok(head) => Some(head),
        Err(err)
            if err
                .raw_response()
                .is_some_and(|r| r.status().as_u16() == 400) =>
        {
            None
        }
        Err(err) => return Err(s3_error("HeadObject", err)),
    };
    let metadata = head
        .as_ref()
        .and_then(|h| h.metadata().cloned())
        .unwrap_or_default();
    if let Some(head) = head {
        match s3ec::detect(&metadata) {
            Format::V2 => {
                let envelope = Envelope::from_entries(&metadata)?;
                return Ok(Located::Metadata {
                    head: Box::new(head),
                    field: KEY_V2,
                    blob: envelope.encrypted_key,
                    context: envelope.context,
                });
            }
            Format::V3 if metadata.contains_key(KEY_V3) => {
                let envelope = EnvelopeV3::from_entries(&metadata)?;
                return Ok(Located::Metadata {
                    head: Box::new(head),
                    field: KEY_V3,
                    blob: envelope.encrypted_key,
                    context: envelope.context,
                });
            }
            Format::V1 => return Ok(Located::Nowhere),
            Format::V3 | Format::None => {}
        }
    }
    let tags = client
        .get_object_tagging()
        .bucket(bucket)
        .key(key)
        .send()
        .await
        .map_err(|e| s3_error("GetObjectTagging", e))?
        .tag_set()
        .to_vec();
    if let Some(tag) = tags.iter().find(|t| t.key() == SSE_C_TAG) {
        if let Some(blob) = decode(Some(&tag.value().to_owned())) {
            return Ok(Located::SseCTag { tags, blob });
        }
    }
    let instruction = format!("{key}{INSTRUCTION_SUFFIX}");
    let etag = match client
        .head_object()
        .bucket(bucket)
        .key(&instruction)
        .send()
        .await
    {
        Ok(head) => head.e_tag().map(str::to_owned),
        // Only a missing file means "no envelope": any other failure (no permission, a
        // server error) must not make an object look unprotected.
        Err(err)
            if err
                .raw_response()
                .is_some_and(|r| r.status().as_u16() == 404) =>
        {
            return Ok(Located::Nowhere);
        }
        Err(err) => return Err(s3_error("HeadObject (instruction file)", err)),
    };
    let entries = instruction_entries(client, bucket, key).await?;
    let v3 = matches!(s3ec::detect(&metadata), Format::V3);
    if v3 {
        // x-amz-c, x-amz-d and x-amz-i stay in the metadata; the rest is in the file.
        let mut all = entries.clone();
        for (k, v) in &metadata {
            if V3_METADATA_ONLY.contains(&k.as_str()) {
                all.insert(k.clone(), v.clone());
            }
        }
        let envelope = EnvelopeV3::from_entries(&all)?;
        return Ok(Located::InstructionFile {
            entries,
            etag,
            field: KEY_V3,
            blob: envelope.encrypted_key,
            context: envelope.context,
        });
    }
    let envelope = Envelope::from_entries(&entries)?;
    Ok(Located::InstructionFile {
        entries,
        etag,
        field: KEY_V2,
        blob: envelope.encrypted_key,
        context: envelope.context,
    })
}

/// Counts the objects under `prefix` into `census` (one HEAD per object; a tag or
/// instruction file read only where the metadata holds no envelope).
pub async fn census(
    client: &Client,
    bucket: &str,
    prefix: &str,
    census: &mut Census,
) -> Result<(), ClientError> {
    for object in list(client, bucket, prefix).await? {
        match locate(client, bucket, &object.key).await {
            Ok(located) => census.count_blobs(located.blob(), object.size),
            Err(err) => {
                census.count_error(format!("s3://{bucket}/{}", object.key), err.to_string())
            }
        }
    }
    Ok(())
}

/// What `rewrap_object` needs besides the object.
pub struct RewrapOptions<'a> {
    /// Say what would change; change nothing.
    pub dry_run: bool,
    /// The encryption context SSE-C objects were put with (theirs is not stored with them).
    pub sse_c_context: &'a BTreeMap<String, String>,
}

/// Re-wraps one object's data key (see the module docs); every failure leaves it as it was.
pub async fn rewrap_object(
    client: &Client,
    bucket: &str,
    object: &Listed,
    rewrapper: &mut Rewrapper,
    options: &RewrapOptions<'_>,
) -> Outcome {
    match rewrap(client, bucket, object, rewrapper, options).await {
        Ok(outcome) => outcome,
        Err(err) => Outcome::Failed {
            reason: err.to_string(),
        },
    }
}

async fn rewrap(
    client: &Client,
    bucket: &str,
    object: &Listed,
    rewrapper: &mut Rewrapper,
    options: &RewrapOptions<'_>,
) -> Result<Outcome, ClientError> {
    let key = &object.key;
    let located = locate(client, bucket, key).await?;
    let Some(blob) = located.blob() else {
        return Ok(Outcome::Skipped {
            reason: "not an S3 Encryption Client or SSE-C object".into(),
        });
    };
    let Some(source) = blob_key_version(blob) else {
        return Ok(Outcome::Skipped {
            reason: "no wrapd data key".into(),
        });
    };
    let Some(destination) = rewrapper.destination(&source).await? else {
        return Ok(Outcome::Skipped {
            reason: "its data key is not under the key being moved".into(),
        });
    };
    if source == destination {
        return Ok(Outcome::UpToDate);
    }
    if options.dry_run {
        return Ok(Outcome::WouldRewrap {
            from: vec![source],
            to: vec![destination],
        });
    }
    if matches!(located, Located::Metadata { .. }) && object.size > MAX_COPY {
        return Err(ClientError::new(
            Failure::WrongState,
            "the object is larger than 5 GiB: S3 cannot rewrite its metadata in one CopyObject",
        ));
    }
    let context = match &located {
        Located::Metadata { context, .. } | Located::InstructionFile { context, .. } => {
            context.clone()
        }
        Located::SseCTag { .. } => sse_c_context(options.sse_c_context)?,
        Located::Nowhere => return Err(ClientError::other("the object has no envelope")),
    };
    let context = EncryptionContext::from_entries(context)?;
    let (new_blob, now) = rewrapper.rewrap(blob, &context, &destination).await?;
    let encoded = STANDARD.encode(&new_blob);
    match located {
        Located::Metadata { head, field, .. } => {
            replace_metadata(client, bucket, key, &head, field, encoded).await?
        }
        Located::InstructionFile {
            mut entries,
            etag,
            field,
            ..
        } => {
            let instruction = format!("{key}{INSTRUCTION_SUFFIX}");
            let current = client
                .head_object()
                .bucket(bucket)
                .key(&instruction)
                .send()
                .await
                .map_err(|e| s3_error("HeadObject (instruction file)", e))?;
            if current.e_tag() != etag.as_deref() {
                return Err(changed());
            }
            entries.insert(field.to_owned(), encoded);
            let body = serde_json::to_vec(&entries)
                .map_err(|e| ClientError::other(format!("instruction file: {e}")))?;
            client
                .put_object()
                .bucket(bucket)
                .key(&instruction)
                .body(aws_sdk_s3::primitives::ByteStream::from(body))
                .set_if_match(etag)
                .send()
                .await
                .map_err(|e| s3_error("PutObject (instruction file)", e))?;
        }
        Located::SseCTag { tags, .. } => {
            let current = client
                .get_object_tagging()
                .bucket(bucket)
                .key(key)
                .send()
                .await
                .map_err(|e| s3_error("GetObjectTagging", e))?;
            if current.tag_set() != tags.as_slice() {
                return Err(changed());
            }
            let tags = tags
                .into_iter()
                .map(|t| {
                    if t.key() == SSE_C_TAG {
                        aws_sdk_s3::types::Tag::builder()
                            .key(SSE_C_TAG)
                            .value(encoded.clone())
                            .build()
                            .map_err(|e| ClientError::other(e.to_string()))
                    } else {
                        Ok(t)
                    }
                })
                .collect::<Result<Vec<_>, _>>()?;
            let tagging = aws_sdk_s3::types::Tagging::builder()
                .set_tag_set(Some(tags))
                .build()
                .map_err(|e| ClientError::other(e.to_string()))?;
            client
                .put_object_tagging()
                .bucket(bucket)
                .key(key)
                .tagging(tagging)
                .send()
                .await
                .map_err(|e| s3_error("PutObjectTagging", e))?;
        }
        Located::Nowhere => {}
    }
    Ok(Outcome::Rewrapped {
        from: vec![source],
        to: vec![now],
    })
}

fn changed() -> ClientError {
    ClientError::new(
        Failure::WrongState,
        "the object changed while it was re-wrapped; left as it is",
    )
}

/// Copies the object onto itself with `field` of its metadata set to `value`, on condition
/// that it is still what `head` read.
async fn replace_metadata(
    client: &Client,
    bucket: &str,
    key: &str,
    head: &aws_sdk_s3::operation::head_object::HeadObjectOutput,
    field: &str,
    value: String,
) -> Result<(), ClientError> {
    let etag = head
        .e_tag()
        .ok_or_else(|| ClientError::other("S3 HeadObject: no ETag"))?;
    let current = client
        .head_object()
        .bucket(bucket)
        .key(key)
        .send()
        .await
        .map_err(|e| s3_error("HeadObject", e))?;
    if current.e_tag() != Some(etag) || current.metadata() != head.metadata() {
        return Err(changed());
    }
    let mut metadata = head.metadata().cloned().unwrap_or_default();
    metadata.insert(field.to_owned(), value);
    let source = format!(
        "{bucket}/{}",
        percent_encoding::utf8_percent_encode(key, COPY_SOURCE)
    );
    client
        .copy_object()
        .bucket(bucket)
        .key(key)
        .copy_source(source)
        .copy_source_if_match(etag)
        .metadata_directive(aws_sdk_s3::types::MetadataDirective::Replace)
        .set_metadata(Some(metadata))
        .set_content_type(head.content_type().map(str::to_owned))
        .set_content_encoding(head.content_encoding().map(str::to_owned))
        .set_content_disposition(head.content_disposition().map(str::to_owned))
        .set_content_language(head.content_language().map(str::to_owned))
        .set_cache_control(head.cache_control().map(str::to_owned))
        .set_storage_class(
            head.storage_class()
                .map(|c| aws_sdk_s3::types::StorageClass::from(c.as_str())),
        )
        .set_server_side_encryption(head.server_side_encryption().cloned())
        .set_ssekms_key_id(head.ssekms_key_id().map(str::to_owned))
        .send()
        .await
        .map_err(|e| s3_error("CopyObject", e))?;
    Ok(())
}

/// What a copy source's key escapes: everything but unreserved characters and `/`.
const COPY_SOURCE: &percent_encoding::AsciiSet = &percent_encoding::NON_ALPHANUMERIC
    .remove(b'-')
    .remove(b'.')
    .remove(b'_')
    .remove(b'~')
    .remove(b'/');
