//! The Kubernetes KMS v2 plugin (`v2.KeyManagementService`), backed by one wrapd key.
//!
//! - `Encrypt` wraps the apiserver's DEK seed under the newest version of the key, bound to
//!   the reserved encryption context [`KMS_CONTEXT`] that no caller of the main API can
//!   supply (its `wrapd:` prefix is refused there), so a principal with Unwrap on the key
//!   over the main API still cannot open the apiserver's DEK seeds. It answers the wrapd
//!   blob as the ciphertext, with `key_id = key/<hex>:<version>`; no annotations are needed.
//! - `Decrypt` accepts every blob the plugin ever issued: of every version of the key, and
//!   of keys the configured alias pointed at before it was re-pointed. Such a blob is
//!   authorized by the plugin's grant on its configured key, because only the plugin can
//!   make a blob bound to [`KMS_CONTEXT`] (security review finding 8). Blobs from before
//!   the reserved context (bound to the empty context) still decrypt, checked against the
//!   policy on the blob's own key. The request's `key_id` must be the one Encrypt returned
//!   with that ciphertext.
//! - `Status` answers `version: "v2"`, the current `key_id` (so a rotation changes it, which
//!   makes the apiserver use a new DEK), and `healthz: "ok"` only while the audit log is
//!   writable and a real wrap + unwrap round trip through the token succeeded within
//!   `healthz_cache`; otherwise the reason.
//!
//! Calls act as the configured policy principal, and are audited with the apiserver's `uid`
//! as the request id.

use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use tonic::{Request, Response, Status};
use tracing::instrument;
use zeroize::Zeroizing;

use super::{Gate, target_of};
use crate::auth::{Operation, Target, kms_identity};
use crate::blob::Blob;
use crate::context::EncryptionContext;
use crate::error::{Error, Result};
use crate::ids::KeyRef;
use crate::keystore::Keystore;
use crate::kms_proto::key_management_service_server::KeyManagementService;
use crate::kms_proto::{
    DecryptRequest, DecryptResponse, EncryptRequest, EncryptResponse, StatusRequest, StatusResponse,
};

/// Largest DEK (seed) Encrypt takes: its ciphertext stays under the 1 KiB the API allows.
pub const MAX_PLAINTEXT: usize = 512;
/// Largest ciphertext and key id Decrypt takes (the API's limits).
pub const MAX_CIPHERTEXT: usize = 1024;
/// Largest total size of the annotations Decrypt takes.
pub const MAX_ANNOTATIONS: usize = 32 * 1024;
/// The encryption context every blob of the plugin is bound to: one reserved entry.
pub const KMS_CONTEXT: (&str, &str) = ("wrapd:purpose", "kubernetes-kms-v2");

/// The KMS v2 plugin service.
pub struct KmsApi {
    keystore: Arc<Keystore>,
    gate: Arc<Gate>,
    key: KeyRef,
    principal: String,
    healthz_cache: Duration,
    health: Mutex<Option<(Instant, String)>>,
}

/// `key/<hex>:<version>`, the KMS key id of a key version.
fn kms_key_id(key_id: &impl std::fmt::Display, version: u32) -> String {
    format!("{key_id}:{version}")
}

/// The plugin's reserved context.
fn kms_context() -> EncryptionContext {
    EncryptionContext::from_entries([(KMS_CONTEXT.0.to_owned(), KMS_CONTEXT.1.to_owned())])
        // Two short valid strings: cannot fail.
        .unwrap_or_default()
}

impl KmsApi {
    /// A plugin over `key`, acting as `principal`.
    pub fn new(
        keystore: Arc<Keystore>,
        gate: Arc<Gate>,
        key: KeyRef,
        principal: String,
        healthz_cache: Duration,
    ) -> Self {
        Self {
            keystore,
            gate,
            key,
            principal,
            healthz_cache,
            health: Mutex::new(None),
        }
    }

    /// "ok", or why not: from the cache, or a fresh round trip through the token.
    async fn healthz(&self) -> String {
        if !self.gate.audit_healthy() {
            return "the audit log cannot be written; key operations are refused".to_owned();
        }
        if let Some((at, healthz)) = &*self.health.lock().unwrap_or_else(|e| e.into_inner()) {
            if at.elapsed() < self.healthz_cache {
                return healthz.clone();
            }
        }
        let key = self.key.clone();
        let keystore = self.keystore.clone();
        let probe = tokio::task::spawn_blocking(move || -> Result<()> {
            let probe = Zeroizing::new(b"wrapd kms health probe".to_vec());
            let context = kms_context();
            let wrapped = keystore.wrap(&key, &probe, &context)?;
            let back = keystore.unwrap(&wrapped.blob, &context, None)?;
            if back.plaintext == probe {
                Ok(())
            } else {
                Err(Error::Internal(
                    "the round trip returned other bytes".into(),
                ))
            }
        })
        .await
        .unwrap_or_else(|e| Err(Error::Internal(format!("health probe task: {e}"))));
        let healthz = match probe {
            Ok(()) => "ok".to_owned(),
            Err(err) => {
                let status = Status::from(err);
                format!("{:?}: {}", status.code(), status.message())
            }
        };
        if healthz != "ok" {
            tracing::warn!(%healthz, "KMS plugin health probe failed");
        }
        *self.health.lock().unwrap_or_else(|e| e.into_inner()) =
            Some((Instant::now(), healthz.clone()));
        healthz
    }
}

#[tonic::async_trait]
impl KeyManagementService for KmsApi {
    #[instrument(level = "debug", skip_all)]
    async fn status(
        &self,
        _request: Request<StatusRequest>,
    ) -> Result<Response<StatusResponse>, Status> {
        let key_id = match self.keystore.resolve(&self.key) {
            Ok(key) => kms_key_id(&key.id, key.current_version()),
            Err(_) => String::new(),
        };
        let healthz = if key_id.is_empty() {
            format!("the configured key {} does not exist", self.key)
        } else {
            self.healthz().await
        };
        Ok(Response::new(StatusResponse {
            version: "v2".to_owned(),
            healthz,
            key_id,
        }))
    }

    #[instrument(level = "debug", skip_all)]
    async fn encrypt(
        &self,
        request: Request<EncryptRequest>,
    ) -> Result<Response<EncryptResponse>, Status> {
        let identity = kms_identity(&request, &self.principal);
        let uid = request.get_ref().uid.clone();
        let call = self
            .gate
            .begin_as(&request, Operation::Wrap, identity, &uid);
        let plaintext = Zeroizing::new(request.into_inner().plaintext);
        let key = self.key.clone();
        let wrapped = self
            .gate
            .run(&self.keystore, call, move |gate, ks, call| {
                if plaintext.is_empty() || plaintext.len() > MAX_PLAINTEXT {
                    return Err(Error::invalid(format!(
                        "plaintext must be 1 to {MAX_PLAINTEXT} bytes"
                    )));
                }
                let context = kms_context();
                call.key(key.to_string(), None);
                call.context(&context);
                gate.check(call, &target_of(ks, &key), Some(&context))?;
                let wrapped = ks.wrap(&key, &plaintext, &context)?;
                call.key(wrapped.key_id.to_string(), Some(wrapped.key_version));
                Ok(wrapped)
            })
            .await?;
        Ok(Response::new(EncryptResponse {
            key_id: kms_key_id(&wrapped.key_id, wrapped.key_version),
            ciphertext: wrapped.blob,
            annotations: Default::default(),
        }))
    }

    #[instrument(level = "debug", skip_all)]
    async fn decrypt(
        &self,
        request: Request<DecryptRequest>,
    ) -> Result<Response<DecryptResponse>, Status> {
        let identity = kms_identity(&request, &self.principal);
        let uid = request.get_ref().uid.clone();
        let call = self
            .gate
            .begin_as(&request, Operation::Unwrap, identity, &uid);
        let req = request.into_inner();
        let configured = self.key.clone();
        let mut unwrapped = self
            .gate
            .run(&self.keystore, call, move |gate, ks, call| {
                let annotations: usize =
                    req.annotations.iter().map(|(k, v)| k.len() + v.len()).sum();
                if req.ciphertext.is_empty()
                    || req.ciphertext.len() > MAX_CIPHERTEXT
                    || req.key_id.len() > MAX_CIPHERTEXT
                    || annotations > MAX_ANNOTATIONS
                {
                    return Err(Error::invalid(
                        "ciphertext, key_id or annotations out of the KMS v2 size limits",
                    ));
                }
                // The key_id must be the one Encrypt returned with this ciphertext.
                let blob = Blob::parse(&req.ciphertext)?;
                if req.key_id != kms_key_id(&blob.key_id, blob.key_version) {
                    return Err(Error::InvalidCiphertext);
                }
                let key = KeyRef::Id(blob.key_id.clone());
                call.key(key.to_string(), Some(blob.key_version));
                // A blob bound to the reserved context was issued by this plugin: the
                // grant on the configured key covers it, whichever key wrapped it.
                let context = kms_context();
                call.context(&context);
                gate.check(
                    call,
                    &issued_by_plugin(ks, &configured, &key),
                    Some(&context),
                )?;
                match ks.unwrap(&req.ciphertext, &context, None) {
                    Err(Error::InvalidCiphertext) => {}
                    other => return other,
                }
                // A blob from before the reserved context: the policy on its own key decides.
                let legacy = EncryptionContext::default();
                call.context(&legacy);
                gate.check(call, &target_of(ks, &key), Some(&legacy))?;
                ks.unwrap(&req.ciphertext, &legacy, None)
            })
            .await?;
        Ok(Response::new(DecryptResponse {
            plaintext: std::mem::take(&mut *unwrapped.plaintext),
        }))
    }
}

/// The policy target of a Decrypt of a blob the plugin issued: the configured key's names
/// and the blob key's own, so the plugin's grant on its configured key (e.g. on
/// `alias/kubernetes`) covers blobs of keys the alias pointed at before.
fn issued_by_plugin(ks: &Keystore, configured: &KeyRef, blob_key: &KeyRef) -> Target {
    let mut names = vec![configured.to_string()];
    for target in [target_of(ks, configured), target_of(ks, blob_key)] {
        if let Target::Key(more) = target {
            names.extend(more);
        }
    }
    Target::Key(names)
}
