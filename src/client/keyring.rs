//! Keyrings: which wrapd keys protect a message's data key.
//!
//! Encryption asks the first key's daemon for a fresh DEK (`GenerateDataKey`) and wraps the
//! same DEK under every other key (`Wrap`), each bound to the message's encryption context;
//! each wrapped copy becomes an encrypted data key entry (provider `wrapd`, provider info =
//! the canonical key id, ciphertext = the daemon's blob). Decryption offers each `wrapd`
//! entry to each key's daemon (`Unwrap` with the message's context) until one answers.
//! Every call has a deadline (10 s) and is retried twice on UNAVAILABLE; a daemon still
//! unavailable after that is not asked about the remaining entries. When no entry unwraps,
//! the error lists why each attempt failed.

use std::time::Duration;

use tonic::transport::Channel;
use zeroize::Zeroizing;

use super::message::{AWS_KMS_PROVIDER_ID, EncryptedDataKey, Header, PROVIDER_ID};
use crate::client::DataKeyServiceClient;
use crate::context::EncryptionContext;
use crate::error::{Error, ErrorKind, Result};
use crate::proto::{
    BatchUnwrapRequest, GenerateDataKeyRequest, UnwrapRequest, WrapRequest, batch_unwrap_result,
};

/// Most data keys per `BatchUnwrap` call (the daemon's limit).
pub const MAX_BATCH: usize = 1000;

/// One wrapd key on one daemon.
#[derive(Clone)]
pub struct WrapdKey {
    /// The daemon.
    pub client: DataKeyServiceClient<Channel>,
    /// Key id or alias, or its AWS KMS ARN (then the entries are `aws-kms` ones).
    pub key_id: String,
}

impl WrapdKey {
    /// The name the gRPC API takes (`key/…` or `alias/…`), and the ARN prefix
    /// (`arn:aws:kms:REGION:ACCOUNT:`) when the key was named by an ARN.
    fn names(&self) -> (&str, Option<&str>) {
        match split_arn(&self.key_id) {
            Some((prefix, resource)) => (resource, Some(prefix)),
            None => (&self.key_id, None),
        }
    }

    /// The entry for a blob this key's daemon made under `key_id` (canonical).
    fn entry(&self, key_id: String, blob: Vec<u8>) -> EncryptedDataKey {
        match self.names().1 {
            Some(prefix) => EncryptedDataKey {
                provider_id: AWS_KMS_PROVIDER_ID.to_owned(),
                provider_info: entry_arn(&self.key_id, prefix, &key_id).into_bytes(),
                ciphertext: blob,
            },
            None => EncryptedDataKey {
                provider_id: PROVIDER_ID.to_owned(),
                provider_info: key_id.into_bytes(),
                ciphertext: blob,
            },
        }
    }
}

/// The ARN an `aws-kms` entry names key `key_id` (canonical, `key/HEX`) by, for a keyring
/// that named its key `named` with ARN prefix `prefix`: `named` itself if it is a key ARN of
/// that key (in whichever spelling: the Encryption SDK compares the entry with the ARN its
/// keyring was given), else the key ARN as AWS KMS writes it (`key/UUID`).
pub fn entry_arn(named: &str, prefix: &str, key_id: &str) -> String {
    let Ok(key) = crate::ids::KeyId::parse_named(key_id) else {
        return format!("{prefix}{key_id}");
    };
    let same_key = split_arn(named).is_some_and(|(_, resource)| {
        crate::ids::KeyId::parse_named(resource).is_ok_and(|k| k == key)
    });
    if same_key {
        named.to_owned()
    } else {
        format!("{prefix}{}{}", crate::ids::KeyId::PREFIX, key.uuid())
    }
}

/// Splits an AWS KMS ARN into its prefix (`arn:PARTITION:kms:REGION:ACCOUNT:`) and its
/// resource (`key/…` or `alias/…`).
pub fn split_arn(arn: &str) -> Option<(&str, &str)> {
    if !arn.starts_with("arn:") {
        return None;
    }
    let mut colons = arn.match_indices(':').map(|(i, _)| i);
    let end = colons.nth(4)?;
    let (prefix, resource) = arn.split_at(end + 1);
    let service = prefix.split(':').nth(2)?;
    (service == "kms" && (resource.starts_with("key/") || resource.starts_with("alias/")))
        .then_some((prefix, resource))
}

/// A fresh data key and its encrypted data key entries, one per wrapping key.
pub struct DataKey {
    /// The plaintext DEK (32 bytes).
    pub dek: Zeroizing<Vec<u8>>,
    /// The header entries: the DEK wrapped under each key of the keyring.
    pub data_keys: Vec<EncryptedDataKey>,
}

impl std::fmt::Debug for DataKey {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("DataKey")
            .field("dek", &"<redacted>")
            .field("data_keys", &self.data_keys.len())
            .finish()
    }
}

/// One or more wrapd keys, possibly on different daemons.
#[derive(Clone)]
pub struct Keyring {
    keys: Vec<WrapdKey>,
}

fn call_error(what: &str, status: tonic::Status) -> Error {
    use tonic::Code;
    let kind = match status.code() {
        Code::NotFound => ErrorKind::NotFound,
        Code::InvalidArgument | Code::OutOfRange => ErrorKind::InvalidArgument,
        Code::AlreadyExists => ErrorKind::AlreadyExists,
        Code::FailedPrecondition => ErrorKind::WrongState,
        Code::PermissionDenied => ErrorKind::PermissionDenied,
        Code::Unauthenticated => ErrorKind::Unauthenticated,
        Code::Unavailable | Code::DeadlineExceeded => ErrorKind::Unavailable,
        _ => ErrorKind::Internal,
    };
    Error::Remote {
        kind,
        message: format!("{what}: {}", status.message()),
    }
}

/// Per-attempt deadline of a keyring call, and how often an UNAVAILABLE answer is retried.
const CALL_TIMEOUT: Duration = Duration::from_secs(10);
const ATTEMPTS: u32 = 3;

/// Runs a call with a deadline, retrying UNAVAILABLE (the daemon's "retry later": token
/// fault, busy sessions) with a short backoff.
async fn retrying<T, F, Fut>(mut call: F) -> std::result::Result<T, tonic::Status>
where
    F: FnMut(Duration) -> Fut,
    Fut: std::future::Future<Output = std::result::Result<T, tonic::Status>>,
{
    let mut attempt = 1;
    loop {
        match call(CALL_TIMEOUT).await {
            Err(status) if status.code() == tonic::Code::Unavailable && attempt < ATTEMPTS => {
                tokio::time::sleep(Duration::from_millis(100 * 4u64.pow(attempt - 1))).await;
                attempt += 1;
            }
            other => return other,
        }
    }
}

fn request<T>(message: T, timeout: Duration) -> tonic::Request<T> {
    let mut request = tonic::Request::new(message);
    request.set_timeout(timeout);
    request
}

fn wire(context: &EncryptionContext) -> std::collections::HashMap<String, String> {
    context
        .iter()
        .map(|(k, v)| (k.to_owned(), v.to_owned()))
        .collect()
}

impl Keyring {
    /// A keyring over these keys; the first generates the data keys.
    pub fn new(keys: Vec<WrapdKey>) -> Result<Self> {
        if keys.is_empty() {
            return Err(Error::invalid("a keyring needs at least one key"));
        }
        Ok(Self { keys })
    }

    /// A keyring that only decrypts: it offers every `wrapd` entry to these daemons, whatever
    /// key the entry names (each daemon's policy decides).
    pub fn for_decryption(clients: Vec<DataKeyServiceClient<Channel>>) -> Result<Self> {
        Self::new(
            clients
                .into_iter()
                .map(|client| WrapdKey {
                    client,
                    key_id: String::new(),
                })
                .collect(),
        )
    }

    /// A fresh 32-byte DEK and its encrypted data key entries, one per key.
    pub async fn generate(&self, context: &EncryptionContext) -> Result<DataKey> {
        let first = &self.keys[0];
        let generated = retrying(|timeout| {
            let mut client = first.client.clone();
            let message = GenerateDataKeyRequest {
                key_id: first.names().0.to_owned(),
                encryption_context: wire(context),
                number_of_bytes: 32,
            };
            async move { client.generate_data_key(request(message, timeout)).await }
        })
        .await
        .map_err(|s| call_error(&format!("GenerateDataKey with {}", first.key_id), s))?
        .into_inner();
        let dek = Zeroizing::new(generated.plaintext);
        let mut entries = vec![first.entry(generated.key_id, generated.ciphertext_blob)];
        for key in &self.keys[1..] {
            let wrapped = retrying(|timeout| {
                let mut client = key.client.clone();
                let message = WrapRequest {
                    key_id: key.names().0.to_owned(),
                    plaintext: dek.to_vec(),
                    encryption_context: wire(context),
                };
                async move { client.wrap(request(message, timeout)).await }
            })
            .await
            .map_err(|s| call_error(&format!("Wrap with {}", key.key_id), s))?
            .into_inner();
            entries.push(key.entry(wrapped.key_id, wrapped.ciphertext_blob));
        }
        Ok(DataKey {
            dek,
            data_keys: entries,
        })
    }

    /// The DEK of a message: the first `wrapd` or `aws-kms` entry any of the keys' daemons
    /// unwraps.
    pub async fn unwrap(&self, header: &Header) -> Result<Zeroizing<Vec<u8>>> {
        let mut failures: Vec<String> = Vec::new();
        let mut last_code = None;
        // A daemon still UNAVAILABLE after its retries is not asked about further entries.
        let mut down = vec![false; self.keys.len()];
        for entry in header
            .data_keys
            .iter()
            .filter(|e| e.provider_id == PROVIDER_ID || e.provider_id == AWS_KMS_PROVIDER_ID)
        {
            for (i, key) in self.keys.iter().enumerate() {
                if down[i] {
                    continue;
                }
                let answer = retrying(|timeout| {
                    let mut client = key.client.clone();
                    let message = UnwrapRequest {
                        ciphertext_blob: entry.ciphertext.clone(),
                        encryption_context: wire(&header.context),
                        key_id: String::new(),
                    };
                    async move { client.unwrap(request(message, timeout)).await }
                })
                .await;
                let entry_key = String::from_utf8_lossy(&entry.provider_info);
                match answer {
                    Ok(response) => {
                        let dek = Zeroizing::new(response.into_inner().plaintext);
                        if dek.len() == 32 {
                            return Ok(dek);
                        }
                        last_code = Some(tonic::Code::InvalidArgument);
                        failures.push(format!("{entry_key}: the data key is not 32 bytes"));
                    }
                    Err(status) => {
                        down[i] = status.code() == tonic::Code::Unavailable;
                        last_code = Some(status.code());
                        failures.push(format!("{entry_key}: {}", status.message()));
                    }
                }
            }
        }
        match last_code {
            None => Err(Error::Remote {
                kind: ErrorKind::NotFound,
                message: "the message has no data key entry for wrapd (provider wrapd or aws-kms)"
                    .into(),
            }),
            // Every attempt, so the caller sees why each entry failed (the code is the last
            // one's).
            Some(code) => Err(call_error(
                "Unwrap",
                tonic::Status::new(code, failures.join("; ")),
            )),
        }
    }

    /// The DEKs of many messages with as few calls as possible: each message's first `wrapd`
    /// or `aws-kms` entry goes to the first key's daemon in `BatchUnwrap` calls of up to
    /// [`MAX_BATCH`] items. A message whose item fails there (an entry for another key or
    /// daemon, a daemon without batch calls) falls back to [`Keyring::unwrap`], which offers
    /// every entry to every daemon; so the answers are those of [`Keyring::unwrap`], in the
    /// order of `headers`, for one call per thousand messages when all goes well.
    pub async fn unwrap_all(&self, headers: &[Header]) -> Vec<Result<Zeroizing<Vec<u8>>>> {
        let mut deks: Vec<Option<Zeroizing<Vec<u8>>>> = headers.iter().map(|_| None).collect();
        let items: Vec<(usize, UnwrapRequest)> = headers
            .iter()
            .enumerate()
            .filter_map(|(i, header)| {
                let entry = header.data_keys.iter().find(|e| {
                    e.provider_id == PROVIDER_ID || e.provider_id == AWS_KMS_PROVIDER_ID
                })?;
                Some((
                    i,
                    UnwrapRequest {
                        ciphertext_blob: entry.ciphertext.clone(),
                        encryption_context: wire(&header.context),
                        key_id: String::new(),
                    },
                ))
            })
            .collect();
        let first = &self.keys[0];
        for chunk in items.chunks(MAX_BATCH) {
            let answer = retrying(|timeout| {
                let mut client = first.client.clone();
                let message = BatchUnwrapRequest {
                    items: chunk.iter().map(|(_, item)| item.clone()).collect(),
                };
                async move { client.batch_unwrap(request(message, timeout)).await }
            })
            .await;
            let Ok(response) = answer else {
                continue; // every item of the chunk falls back
            };
            let results = response.into_inner().results;
            if results.len() != chunk.len() {
                continue;
            }
            for ((i, _), result) in chunk.iter().zip(results) {
                if let Some(batch_unwrap_result::Result::Ok(ok)) = result.result {
                    let dek = Zeroizing::new(ok.plaintext);
                    if dek.len() == 32 {
                        deks[*i] = Some(dek);
                    }
                }
            }
        }
        let mut out = Vec::with_capacity(headers.len());
        for (header, dek) in headers.iter().zip(deks) {
            out.push(match dek {
                Some(dek) => Ok(dek),
                None => self.unwrap(header).await,
            });
        }
        out
    }

    /// Decrypts many whole messages (AWS Encryption SDK format), their data keys unwrapped
    /// with [`Keyring::unwrap_all`]: the way to open many small messages. Each answer is the
    /// message's header and plaintext, or why it could not be opened.
    pub async fn decrypt_all(
        &self,
        messages: &[&[u8]],
    ) -> Vec<Result<(Header, Zeroizing<Vec<u8>>)>> {
        let mut headers = Vec::with_capacity(messages.len());
        let mut parsed = Vec::with_capacity(messages.len());
        for message in messages {
            match super::message::peek_header(message) {
                Ok(header) => {
                    parsed.push(Ok(headers.len()));
                    headers.push(header);
                }
                Err(err) => parsed.push(Err(err)),
            }
        }
        let mut deks = self.unwrap_all(&headers).await.into_iter();
        messages
            .iter()
            .zip(parsed)
            .map(|(message, parsed)| {
                parsed?;
                let dek = deks
                    .next()
                    .unwrap_or_else(|| Err(Error::Internal("a data key went missing".into())))?;
                super::message::decrypt(message, |_| Ok(dek))
            })
            .collect()
    }
}

#[cfg(test)]
mod tests {
    use std::sync::atomic::{AtomicU32, Ordering};

    use super::*;

    #[test]
    fn an_aws_kms_arn_splits_into_prefix_and_wrapd_name() {
        let hex = "0123456789abcdef0123456789abcdef";
        let arn = format!("arn:aws:kms:us-east-1:111122223333:key/{hex}");
        assert_eq!(
            split_arn(&arn),
            Some((
                "arn:aws:kms:us-east-1:111122223333:",
                &*format!("key/{hex}")
            ))
        );
        assert_eq!(
            split_arn("arn:aws:kms:us-east-1:111122223333:alias/app"),
            Some(("arn:aws:kms:us-east-1:111122223333:", "alias/app"))
        );
        for not_kms in [
            "key/abc",
            "alias/app",
            "arn:aws:s3:::bucket/key/x",
            "arn:aws:kms:us-east-1",
            "arn:aws:kms:us-east-1:111122223333:grant/x",
        ] {
            assert_eq!(split_arn(not_kms), None, "{not_kms}");
        }
    }

    #[tokio::test]
    async fn retries_unavailable_only() {
        let calls = AtomicU32::new(0);
        let result: std::result::Result<(), _> = retrying(|timeout| {
            assert_eq!(timeout, CALL_TIMEOUT);
            calls.fetch_add(1, Ordering::Relaxed);
            async { Err(tonic::Status::unavailable("busy")) }
        })
        .await;
        assert_eq!(result.unwrap_err().code(), tonic::Code::Unavailable);
        assert_eq!(calls.load(Ordering::Relaxed), ATTEMPTS);

        calls.store(0, Ordering::Relaxed);
        let result: std::result::Result<(), _> = retrying(|_| {
            calls.fetch_add(1, Ordering::Relaxed);
            async { Err(tonic::Status::not_found("no such key")) }
        })
        .await;
        assert_eq!(result.unwrap_err().code(), tonic::Code::NotFound);
        assert_eq!(calls.load(Ordering::Relaxed), 1);
    }
}
