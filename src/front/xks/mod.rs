//! The AWS KMS External Key Store (XKS) proxy API, version 1 (docs/DESIGN.md §12;
//! aws/aws-kms-xksproxy-api-spec): the third HTTPS front end, for AWS KMS itself. An AWS KMS
//! key in an external key store names a wrapd key (its `externalKeyId`), and every
//! encryption and decryption AWS services ask of that KMS key (S3, EBS, RDS, ... through
//! SSE-KMS) becomes a call here: AES-256-GCM inside the token, under the same policy and
//! into the same audit log as every other call.
//!
//! `POST [/PREFIX]/kms/xks/v1/keys/{externalKeyId}/metadata|encrypt|decrypt` and
//! `POST [/PREFIX]/kms/xks/v1/health`, JSON, signed with SigV4 (service `kms-xks-proxy`,
//! [`crate::front::sigv4`]). Each configured prefix is a logical key store with its own
//! region, credentials (several at once, so that they rotate), principal (`xks:NAME`) and
//! optional request quota (`ThrottlingException` beyond it).
//! `GET` on those paths is 405; any other path is `InvalidUriPathException`. `GET /ping`
//! answers a load balancer without credentials: 200 when the token and the audit log
//! serve, 503 otherwise.
//!
//! | XKS | wrapd policy operation |
//! |---|---|
//! | `GetKeyMetadata` | `XksGetKeyMetadata` |
//! | `Encrypt` | `XksEncrypt` |
//! | `Decrypt` | `XksDecrypt` |
//! | `GetHealthStatus` | none: the specification excludes it from authorization (audited as `XksGetHealthStatus`) |
//!
//! Keys are named by id only (the 32 hex digits of `key/…`, or the same as a UUID), never by
//! alias: AWS KMS binds a KMS key to its `externalKeyId` for good, and an alias re-pointed
//! to another key would make every ciphertext of that KMS key undecryptable.
//!
//! The ciphertext metadata (5 bytes) names the key version that encrypted, so that
//! rotation works: new encryptions use the current version, older ciphertexts decrypt with
//! theirs. The AAD given to the token is the specification's (both lengths included), and
//! the integrity value, when asked, is computed over the output before that output is
//! decrypted again to check it ([`crate::ops::Ops::xks_encrypt`]). `model.rs` holds these
//! formats and the request bodies, `error.rs` the error names and statuses; the listener
//! is `server/http.rs`.

pub mod error;
pub mod model;

use std::net::SocketAddr;
use std::time::{Duration, Instant};

use base64::Engine;
use base64::engine::general_purpose::STANDARD;
use bytes::Bytes;
use http::{Method, Request, Response, StatusCode};
use serde_json::json;
use zeroize::Zeroizing;

pub use error::XksError;

use crate::auth::{Operation, Refusal, Transport, xks_identity};
use crate::config::{XksConfig, XksKeystore};
use crate::error::Error;
use crate::front::sigv4::{self, AccessKeys, Scope};
use crate::ids::KeyId;
use crate::keystore::KeyState;
use crate::ops::{Call, Ops};
use model::Required;

/// The SigV4 service name of the XKS proxy API.
pub const SERVICE: &str = "kms-xks-proxy";

/// The path every API URI has after its key store's prefix.
pub const API_PATH: &str = "kms/xks/v1";

/// Largest request body read: the largest valid one (a Decrypt with 4,300 bytes of
/// ciphertext, 8,192 of AAD and seven metadata values of 2,048 characters) is about 33 KiB.
pub const MAX_BODY: usize = 64 * 1024;

/// How long a call may wait for an HSM session: AWS KMS gives up on a proxy after 250 ms,
/// and an answer after that is wasted, so a call that cannot start by then fails with
/// `DependencyTimeoutException` instead.
pub const SESSION_WAIT: Duration = Duration::from_millis(200);

/// The vendor and model the health answer reports.
const VENDOR: &str = "wrapd";

/// One logical key store: its prefix, scope, credentials, principal and quota.
struct Store {
    prefix: String,
    region: String,
    principal: String,
    keys: AccessKeys,
    quota: Option<governor::DefaultDirectRateLimiter>,
}

/// The XKS proxy API over the operation layer.
pub struct XksApi {
    ops: Ops,
    /// Replaced whole on SIGHUP ([`XksApi::reload`]); a request uses the set it started with.
    stores: arc_swap::ArcSwap<Vec<Store>>,
    hsm_model: String,
    fleet_size: u32,
    /// The last load balancer check, reused for a second: `/ping` takes no credentials.
    last_ping: parking_lot::Mutex<Option<(Instant, bool)>>,
    /// Held while a check runs: one at a time, the others answer from the last one.
    pinging: tokio::sync::Mutex<()>,
}

/// What a request asks for, from its path.
#[derive(Debug, Clone, PartialEq, Eq)]
enum Route {
    Health,
    Key(String, KeyOperation),
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum KeyOperation {
    Metadata,
    Encrypt,
    Decrypt,
}

impl Route {
    fn operation(&self) -> Operation {
        match self {
            Self::Health => Operation::XksGetHealthStatus,
            Self::Key(_, KeyOperation::Metadata) => Operation::XksGetKeyMetadata,
            Self::Key(_, KeyOperation::Encrypt) => Operation::XksEncrypt,
            Self::Key(_, KeyOperation::Decrypt) => Operation::XksDecrypt,
        }
    }

    fn api_name(&self) -> &'static str {
        match self {
            Self::Health => "xks.GetHealthStatus",
            Self::Key(_, KeyOperation::Metadata) => "xks.GetKeyMetadata",
            Self::Key(_, KeyOperation::Encrypt) => "xks.Encrypt",
            Self::Key(_, KeyOperation::Decrypt) => "xks.Decrypt",
        }
    }
}

/// A value shortened for a message.
pub(crate) fn truncate(value: &str) -> &str {
    match value.char_indices().nth(64) {
        Some((i, _)) => &value[..i],
        None => value,
    }
}

/// The wrapd key an `externalKeyId` names: 32 lowercase hex digits, or the same 16 bytes
/// as a lowercase UUID.
pub fn key_id(external: &str) -> Option<KeyId> {
    KeyId::parse_named(&format!("{}{external}", KeyId::PREFIX)).ok()
}

impl XksApi {
    /// The API for `config`'s key stores; `hsm_model` names the token for the health answer
    /// and `fleet_size` is how many daemons serve it.
    pub fn new(ops: Ops, config: &XksConfig, hsm_model: String, fleet_size: u32) -> Self {
        Self {
            ops,
            stores: arc_swap::ArcSwap::from_pointee(
                config.keystores.iter().map(Store::new).collect(),
            ),
            hsm_model,
            fleet_size: fleet_size.max(1),
            last_ping: parking_lot::Mutex::new(None),
            pinging: tokio::sync::Mutex::new(()),
        }
    }

    /// Replaces the key stores (prefixes, regions, principals, credentials) with those of
    /// `config`: SIGHUP, so that SigV4 credentials rotate without a restart. The listener
    /// and its TLS settings stay as they started.
    pub fn reload(&self, config: &XksConfig) {
        self.stores.store(std::sync::Arc::new(
            config.keystores.iter().map(Store::new).collect(),
        ));
    }

    /// Finds the key store and route of a path: `/[PREFIX/]kms/xks/v1/ROUTE`. The longest
    /// matching prefix wins.
    fn route<'a>(stores: &'a [Store], path: &str) -> Option<(&'a Store, Route)> {
        let path = path.strip_prefix('/')?;
        stores
            .iter()
            .filter_map(|store| {
                let rest = if store.prefix.is_empty() {
                    path
                } else {
                    path.strip_prefix(store.prefix.as_str())?
                        .strip_prefix('/')?
                };
                let rest = rest.strip_prefix(API_PATH)?.strip_prefix('/')?;
                let route = match rest.split('/').collect::<Vec<_>>().as_slice() {
                    ["health"] => Route::Health,
                    ["keys", id, operation] if !id.is_empty() => {
                        let operation = match *operation {
                            "metadata" => KeyOperation::Metadata,
                            "encrypt" => KeyOperation::Encrypt,
                            "decrypt" => KeyOperation::Decrypt,
                            _ => return None,
                        };
                        Route::Key((*id).to_owned(), operation)
                    }
                    _ => return None,
                };
                Some((store, route))
            })
            .max_by_key(|(store, _)| store.prefix.len())
    }

    /// Answers one HTTP request whose body has been read (at most [`MAX_BODY`] bytes).
    pub async fn handle(
        &self,
        request: Request<Bytes>,
        remote: Option<SocketAddr>,
    ) -> Response<Bytes> {
        let (parts, body) = request.into_parts();
        if parts.uri.path() == "/ping" && parts.method == Method::GET {
            return self.ping().await;
        }
        let stores = self.stores.load_full();
        let Some((store, route)) = Self::route(&stores, parts.uri.path()) else {
            return XksError::invalid_path().response();
        };
        if parts.method != Method::POST {
            let mut response = XksError::new(
                "ValidationException",
                StatusCode::METHOD_NOT_ALLOWED,
                "the XKS proxy API takes POST only",
            )
            .response();
            response
                .headers_mut()
                .insert(http::header::ALLOW, http::HeaderValue::from_static("POST"));
            return response;
        }
        let deadline = Some(Instant::now() + SESSION_WAIT);
        let operation = route.operation();
        let scope = Scope {
            regions: &[store.region.as_str()],
            service: SERVICE,
            signed_when_present: &[],
        };
        let credential = match sigv4::verify(&store.keys, scope, &parts, &body, chrono::Utc::now())
        {
            Ok(verified) => verified.access_key,
            Err(failure) => {
                tracing::debug!(remote = ?remote, code = failure.code, access_key = ?failure.claimed_key,
                    "XKS proxy API: signature refused");
                let refusal = Refusal {
                    reason: failure.message.clone(),
                    transport: Some(Transport::Xks),
                    peer: remote.map_or_else(|| "?".to_owned(), |a| a.to_string()),
                    access_key: failure.claimed_key.clone(),
                };
                // No deadline: the refusal's line is written however long the queue is.
                let call = Call::new(Err(refusal), operation, None, None)
                    .with_api_operation(route.api_name());
                let _ = self
                    .ops
                    .reject(call, Error::Unauthenticated(failure.message.clone()))
                    .await;
                // The reason is in the audit line; the caller learns no more than that the
                // signature did not verify (not which part, the region or the clock).
                return XksError::authentication(
                    "The request signature could not be verified with the key store's credentials.",
                )
                .response();
            }
        };
        let identity = xks_identity(&store.principal, &credential, remote);
        // After the signature: requests without the key store's credentials never use up
        // its quota.
        if store
            .quota
            .as_ref()
            .is_some_and(|quota| quota.check().is_err())
        {
            let message = "the key store's request quota is exceeded; retry later";
            let call =
                Call::new(Ok(identity), operation, None, None).with_api_operation(route.api_name());
            let refused = self
                .ops
                .reject(call, Error::Unavailable(message.into()))
                .await;
            if refused.kind() != crate::error::ErrorKind::Unavailable {
                return XksError::from_error(&refused).response();
            }
            return XksError::new(
                "ThrottlingException",
                StatusCode::TOO_MANY_REQUESTS,
                message,
            )
            .response();
        }
        let answer = self
            .execute(identity, deadline, &route, &body)
            .await
            .map(|value| {
                let body = Zeroizing::new(value.to_string());
                error::json_response(StatusCode::OK, body.as_bytes().to_vec())
            });
        answer.unwrap_or_else(|err| err.response())
    }

    /// Decodes the body of an authenticated request and runs it.
    async fn execute(
        &self,
        identity: crate::auth::Identity,
        deadline: Option<Instant>,
        route: &Route,
        body: &[u8],
    ) -> Result<serde_json::Value, XksError> {
        let required = match route {
            Route::Health => Required::Health,
            Route::Key(_, KeyOperation::Metadata) => Required::Metadata,
            Route::Key(..) => Required::Crypto,
        };
        // The request metadata first: it names the request (its id and attributes) for the
        // audit line of every outcome after this one. Only that member is read here (the
        // rest of the body, with any plaintext, is skipped, not copied).
        let parsed: Result<model::MetadataOnly, XksError> = model::parse(body);
        let request_metadata = parsed.and_then(|parsed| model::metadata(parsed.request_metadata));
        let request_id = request_metadata
            .as_ref()
            .ok()
            .and_then(|m| m.request_id())
            .map(str::to_owned);
        let call = Call::new(
            Ok(identity),
            route.operation(),
            request_id.as_deref(),
            deadline,
        )
        .with_api_operation(route.api_name());
        let checked = request_metadata.and_then(|m| m.attributes(required));
        let attributes = match checked {
            Ok(attributes) => attributes,
            Err(err) => return Err(self.reject(call, err).await),
        };
        let call = call.with_attributes(attributes);
        match route {
            Route::Health => self.health(call).await,
            Route::Key(external, operation) => {
                let Some(key) = key_id(external) else {
                    let err =
                        XksError::from_error(&Error::KeyNotFound(truncate(external).to_owned()));
                    return Err(self.reject(call, err).await);
                };
                match operation {
                    KeyOperation::Metadata => self.key_metadata(call, key).await,
                    KeyOperation::Encrypt => self.encrypt(call, key, body).await,
                    KeyOperation::Decrypt => self.decrypt(call, key, body).await,
                }
            }
        }
    }

    /// Audits a request refused before the operation layer saw it (malformed body, unknown
    /// key id form), and returns the answer: `err`, or what the gate says first.
    async fn reject(&self, call: Call, err: XksError) -> XksError {
        let outcome = match err.name {
            "KeyNotFoundException" => Error::KeyNotFound(err.message.clone()),
            "UnsupportedOperationException" => Error::Unsupported(err.message.clone()),
            "InvalidCiphertextException" => Error::InvalidCiphertext,
            _ => Error::InvalidArgument(err.message.clone()),
        };
        let gate = self.ops.reject(call, outcome).await;
        match gate.kind() {
            crate::error::ErrorKind::NotFound
            | crate::error::ErrorKind::InvalidArgument
            | crate::error::ErrorKind::InvalidCiphertext
            | crate::error::ErrorKind::Unsupported => err,
            _ => XksError::from_error(&gate),
        }
    }

    async fn key_metadata(&self, call: Call, key: KeyId) -> Result<serde_json::Value, XksError> {
        let record = self.ops.xks_key_metadata(call, key).await?;
        let enabled = record.state == KeyState::Enabled && self.ops.keystore().is_usable(&record);
        Ok(json!({
            "keySpec": "AES_256",
            "keyUsage": ["ENCRYPT", "DECRYPT"],
            "keyStatus": if enabled { "ENABLED" } else { "DISABLED" },
        }))
    }

    async fn encrypt(
        &self,
        call: Call,
        key: KeyId,
        body: &[u8],
    ) -> Result<serde_json::Value, XksError> {
        let request = match model::parse::<model::EncryptBody>(body).and_then(|b| b.request()) {
            Ok(request) => request,
            Err(err) => return Err(self.reject(call, err).await),
        };
        // The metadata names the version, which only the key store knows when it encrypts:
        // the AAD is built there from the version it chose.
        let caller_aad = request.aad;
        let integrity = request.integrity.then(|| {
            let caller_aad = caller_aad.clone();
            move |sealed: &crate::keystore::ExternalSealed| {
                let metadata = model::ciphertext_metadata(sealed.version);
                model::integrity_value(&caller_aad, &metadata, sealed)
            }
        });
        let aad_for = move |version| model::aad(&caller_aad, &model::ciphertext_metadata(version));
        let checked = self
            .ops
            .xks_encrypt(call, key, request.plaintext, aad_for, integrity)
            .await?;
        let sealed = checked.sealed;
        let metadata = model::ciphertext_metadata(sealed.version);
        let mut answer = json!({
            "ciphertext": STANDARD.encode(&sealed.ciphertext),
            "ciphertextMetadata": STANDARD.encode(&metadata),
            "initializationVector": STANDARD.encode(sealed.iv),
            "authenticationTag": STANDARD.encode(sealed.tag),
        });
        if let Some(value) = checked.integrity {
            answer["ciphertextDataIntegrityValue"] = json!(STANDARD.encode(value));
        }
        Ok(answer)
    }

    async fn decrypt(
        &self,
        call: Call,
        key: KeyId,
        body: &[u8],
    ) -> Result<serde_json::Value, XksError> {
        let request = match model::parse::<model::DecryptBody>(body).and_then(|b| b.request()) {
            Ok(request) => request,
            Err(err) => return Err(self.reject(call, err).await),
        };
        let aad = model::aad(&request.aad, &request.metadata);
        let plaintext = self
            .ops
            .xks_decrypt(
                call,
                key,
                request.version,
                request.iv,
                request.ciphertext,
                request.tag,
                aad,
            )
            .await?;
        let encoded = Zeroizing::new(STANDARD.encode(&*plaintext));
        Ok(json!({ "plaintext": encoded.as_str() }))
    }

    async fn health(&self, call: Call) -> Result<serde_json::Value, XksError> {
        let status = match self.ops.xks_health(call).await {
            Ok(()) => "ACTIVE",
            Err(err) if err.kind() == crate::error::ErrorKind::Unavailable => "UNAVAILABLE",
            Err(err) => return Err(XksError::from_error(&err)),
        };
        Ok(json!({
            "xksProxyFleetSize": self.fleet_size,
            "xksProxyVendor": VENDOR,
            "xksProxyModel": format!("wrapd {}", env!("CARGO_PKG_VERSION")),
            "ekmVendor": VENDOR,
            "ekmFleetDetails": [{
                "id": "token",
                "model": self.hsm_model,
                "healthStatus": status,
            }],
        }))
    }

    /// The load balancer check: no credentials, no audit line; the same probe as the
    /// health answer, at most one at a time and once a second, bounded like a call (so that
    /// callers without credentials can never keep the token's sessions busy).
    async fn ping(&self) -> Response<Bytes> {
        let cached = *self.last_ping.lock();
        let fresh = |at: Instant| at.elapsed() < Duration::from_secs(1);
        let ok = match (cached, self.pinging.try_lock()) {
            (Some((at, ok)), _) if fresh(at) => ok,
            // A check is running: the last answer (none yet: not healthy).
            (cached, Err(_)) => cached.is_some_and(|(_, ok)| ok),
            (_, Ok(_running)) => {
                let keystore = self.ops.keystore().clone();
                let deadline = Some(Instant::now() + SESSION_WAIT);
                let probed = tokio::task::spawn_blocking(move || {
                    crate::hsm::with_deadline(deadline, || keystore.probe())
                })
                .await;
                let ok = matches!(probed, Ok(Ok(()))) && self.ops.gate().audit_healthy();
                *self.last_ping.lock() = Some((Instant::now(), ok));
                ok
            }
        };
        let (status, text) = if ok {
            (StatusCode::OK, "pong\n")
        } else {
            (StatusCode::SERVICE_UNAVAILABLE, "unavailable\n")
        };
        let mut response = Response::new(Bytes::from_static(text.as_bytes()));
        *response.status_mut() = status;
        response
    }
}

impl Store {
    fn new(config: &XksKeystore) -> Self {
        Self {
            prefix: config.uri_prefix.clone(),
            region: config.region.clone(),
            principal: config.principal.clone(),
            keys: AccessKeys::new(config.credentials.iter().cloned()),
            quota: config
                .requests_per_second
                .map(|n| governor::RateLimiter::direct(governor::Quota::per_second(n))),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn external_key_ids_are_the_hex_of_a_key_id_or_the_same_as_a_uuid() {
        let id = KeyId::generate();
        let hex = id.as_str().strip_prefix(KeyId::PREFIX).unwrap().to_owned();
        assert_eq!(key_id(&hex), Some(id.clone()));
        assert_eq!(key_id(&id.uuid()), Some(id.clone()));
        for bad in [
            "foo",
            "non_existing_key",
            "",
            &hex.to_uppercase(),
            &format!("{hex}0"),
        ] {
            assert_eq!(key_id(bad), None, "{bad}");
        }
        assert_eq!(key_id(&id.uuid().replace('-', "_")), None);
    }
}
