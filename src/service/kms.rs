//! The Kubernetes KMS v2 plugin (`v2.KeyManagementService`), backed by one wrapd key.
//!
//! - `Encrypt` wraps the apiserver's DEK seed under the newest version of the key (empty
//!   encryption context) and answers the wrapd blob as the ciphertext, with
//!   `key_id = key/<hex>:<version>`; no annotations are needed (the blob names its key).
//! - `Decrypt` accepts blobs of every version of the key (and of the key the alias pointed
//!   to before, while it exists), after checking that the request's `key_id` is the one
//!   Encrypt returned with that ciphertext.
//! - `Status` answers `version: "v2"`, the current `key_id` (so a rotation changes it, which
//!   makes the apiserver use a new DEK), and `healthz: "ok"` only if a real wrap + unwrap
//!   round trip through the token succeeded within `healthz_cache`; otherwise the reason.
//!
//! Calls act as the configured policy principal, and are audited with the apiserver's `uid`
//! as the request id.

use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use tonic::{Request, Response, Status};
use tracing::instrument;
use zeroize::Zeroizing;

use super::{Gate, blob_key, blocking, target_of};
use crate::auth::{Operation, kms_identity};
use crate::blob::Blob;
use crate::context::EncryptionContext;
use crate::error::Error;
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
        if let Some((at, healthz)) = &*self.health.lock().unwrap_or_else(|e| e.into_inner()) {
            if at.elapsed() < self.healthz_cache {
                return healthz.clone();
            }
        }
        let key = self.key.clone();
        let healthz = match blocking(&self.keystore, None, move |ks| {
            let probe = Zeroizing::new(b"wrapd kms health probe".to_vec());
            let context = EncryptionContext::default();
            let wrapped = ks.wrap(&key, &probe, &context)?;
            let back = ks.unwrap(&wrapped.blob, &context, None)?;
            if back.plaintext == probe {
                Ok(())
            } else {
                Err(Error::Internal(
                    "the round trip returned other bytes".into(),
                ))
            }
        })
        .await
        {
            Ok(()) => "ok".to_owned(),
            Err(status) => format!("{:?}: {}", status.code(), status.message()),
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
        let mut call = self
            .gate
            .begin_as(&request, Operation::Wrap, identity, &uid);
        let result = async {
            let req = request.into_inner();
            let plaintext = Zeroizing::new(req.plaintext);
            if plaintext.is_empty() || plaintext.len() > MAX_PLAINTEXT {
                return Err(Status::from(Error::invalid(format!(
                    "plaintext must be 1 to {MAX_PLAINTEXT} bytes"
                ))));
            }
            call.key(self.key.to_string(), None);
            self.gate.check(
                &call,
                &target_of(&self.keystore, &self.key),
                Some(&EncryptionContext::default()),
            )?;
            let key = self.key.clone();
            let wrapped = blocking(&self.keystore, call.deadline(), move |ks| {
                ks.wrap(&key, &plaintext, &EncryptionContext::default())
            })
            .await?;
            call.key(wrapped.key_id.to_string(), Some(wrapped.key_version));
            Ok(Response::new(EncryptResponse {
                key_id: kms_key_id(&wrapped.key_id, wrapped.key_version),
                ciphertext: wrapped.blob,
                annotations: Default::default(),
            }))
        }
        .await;
        self.gate.finish(call, result).await
    }

    #[instrument(level = "debug", skip_all)]
    async fn decrypt(
        &self,
        request: Request<DecryptRequest>,
    ) -> Result<Response<DecryptResponse>, Status> {
        let identity = kms_identity(&request, &self.principal);
        let uid = request.get_ref().uid.clone();
        let mut call = self
            .gate
            .begin_as(&request, Operation::Unwrap, identity, &uid);
        let result = async {
            let req = request.into_inner();
            let annotations: usize = req.annotations.iter().map(|(k, v)| k.len() + v.len()).sum();
            if req.ciphertext.is_empty()
                || req.ciphertext.len() > MAX_CIPHERTEXT
                || req.key_id.len() > MAX_CIPHERTEXT
                || annotations > MAX_ANNOTATIONS
            {
                return Err(Status::from(Error::invalid(
                    "ciphertext, key_id or annotations out of the KMS v2 size limits",
                )));
            }
            let context = EncryptionContext::default();
            // The key_id must be the one Encrypt returned with this ciphertext.
            let blob = Blob::parse(&req.ciphertext).map_err(Status::from)?;
            if req.key_id != kms_key_id(&blob.key_id, blob.key_version) {
                return Err(Status::from(Error::InvalidCiphertext));
            }
            if let Some(key) = blob_key(&req.ciphertext) {
                call.key(key.to_string(), Some(blob.key_version));
                self.gate
                    .check(&call, &target_of(&self.keystore, &key), Some(&context))?;
            }
            let ciphertext = req.ciphertext;
            let mut unwrapped = blocking(&self.keystore, call.deadline(), move |ks| {
                ks.unwrap(&ciphertext, &context, None)
            })
            .await?;
            Ok(Response::new(DecryptResponse {
                plaintext: std::mem::take(&mut *unwrapped.plaintext),
            }))
        }
        .await;
        self.gate.finish(call, result).await
    }
}
