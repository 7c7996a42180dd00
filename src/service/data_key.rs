//! `wrapd.v1.DataKeyService`: generate, wrap, unwrap and re-wrap data keys.

use std::sync::Arc;
use std::time::Instant;

use tonic::{Request, Response, Status};
use tracing::instrument;
use zeroize::Zeroizing;

use super::{blocking, context, key_ref, optional_key_ref, peer};
use crate::keystore::Keystore;
use crate::proto::data_key_service_server::DataKeyService;
use crate::proto::{
    GenerateDataKeyRequest, GenerateDataKeyResponse, GenerateDataKeyWithoutPlaintextResponse,
    ReWrapRequest, ReWrapResponse, UnwrapRequest, UnwrapResponse, WrapRequest, WrapResponse,
};

/// The data-plane service.
pub struct DataKeyApi {
    keystore: Arc<Keystore>,
}

impl DataKeyApi {
    /// A service over `keystore`.
    pub fn new(keystore: Arc<Keystore>) -> Self {
        Self { keystore }
    }
}

fn done<T>(op: &str, started: Instant, result: &Result<T, Status>) {
    let micros = started.elapsed().as_micros() as u64;
    match result {
        Ok(_) => tracing::debug!(op, micros, "ok"),
        Err(status) => {
            tracing::info!(op, micros, code = ?status.code(), message = status.message(), "failed")
        }
    }
}

#[tonic::async_trait]
impl DataKeyService for DataKeyApi {
    #[instrument(level = "debug", skip_all, fields(peer = %peer(&request), key = %request.get_ref().key_id))]
    async fn generate_data_key(
        &self,
        request: Request<GenerateDataKeyRequest>,
    ) -> Result<Response<GenerateDataKeyResponse>, Status> {
        let started = Instant::now();
        let result = async {
            let req = request.into_inner();
            let key = key_ref(&req.key_id)?;
            let ctx = context(req.encryption_context)?;
            let mut generated = blocking(&self.keystore, move |ks| {
                ks.generate_data_key(&key, req.number_of_bytes, &ctx)
            })
            .await?;
            tracing::debug!(key_id = %generated.wrapped.key_id, version = generated.wrapped.key_version);
            Ok(Response::new(GenerateDataKeyResponse {
                // Moved, not copied; the response buffer is beyond our reach once sent.
                plaintext: std::mem::take(&mut *generated.plaintext),
                ciphertext_blob: generated.wrapped.blob,
                key_id: generated.wrapped.key_id.to_string(),
                key_version: generated.wrapped.key_version,
            }))
        }
        .await;
        done("GenerateDataKey", started, &result);
        result
    }

    #[instrument(level = "debug", skip_all, fields(peer = %peer(&request), key = %request.get_ref().key_id))]
    async fn generate_data_key_without_plaintext(
        &self,
        request: Request<GenerateDataKeyRequest>,
    ) -> Result<Response<GenerateDataKeyWithoutPlaintextResponse>, Status> {
        let started = Instant::now();
        let result = async {
            let req = request.into_inner();
            let key = key_ref(&req.key_id)?;
            let ctx = context(req.encryption_context)?;
            let generated = blocking(&self.keystore, move |ks| {
                ks.generate_data_key(&key, req.number_of_bytes, &ctx)
            })
            .await?;
            // `generated.plaintext` is zeroized when dropped here.
            Ok(Response::new(GenerateDataKeyWithoutPlaintextResponse {
                ciphertext_blob: generated.wrapped.blob,
                key_id: generated.wrapped.key_id.to_string(),
                key_version: generated.wrapped.key_version,
            }))
        }
        .await;
        done("GenerateDataKeyWithoutPlaintext", started, &result);
        result
    }

    #[instrument(level = "debug", skip_all, fields(peer = %peer(&request), key = %request.get_ref().key_id))]
    async fn wrap(&self, request: Request<WrapRequest>) -> Result<Response<WrapResponse>, Status> {
        let started = Instant::now();
        let result = async {
            let req = request.into_inner();
            let plaintext = Zeroizing::new(req.plaintext);
            let key = key_ref(&req.key_id)?;
            let ctx = context(req.encryption_context)?;
            let wrapped =
                blocking(&self.keystore, move |ks| ks.wrap(&key, &plaintext, &ctx)).await?;
            Ok(Response::new(WrapResponse {
                ciphertext_blob: wrapped.blob,
                key_id: wrapped.key_id.to_string(),
                key_version: wrapped.key_version,
            }))
        }
        .await;
        done("Wrap", started, &result);
        result
    }

    #[instrument(level = "debug", skip_all, fields(peer = %peer(&request)))]
    async fn unwrap(
        &self,
        request: Request<UnwrapRequest>,
    ) -> Result<Response<UnwrapResponse>, Status> {
        let started = Instant::now();
        let result = async {
            let req = request.into_inner();
            let expected = optional_key_ref(&req.key_id)?;
            let ctx = context(req.encryption_context)?;
            let blob = req.ciphertext_blob;
            let mut unwrapped = blocking(&self.keystore, move |ks| {
                ks.unwrap(&blob, &ctx, expected.as_ref())
            })
            .await?;
            tracing::debug!(key_id = %unwrapped.key_id, version = unwrapped.key_version);
            Ok(Response::new(UnwrapResponse {
                plaintext: std::mem::take(&mut *unwrapped.plaintext),
                key_id: unwrapped.key_id.to_string(),
                key_version: unwrapped.key_version,
            }))
        }
        .await;
        done("Unwrap", started, &result);
        result
    }

    #[instrument(level = "debug", skip_all, fields(peer = %peer(&request), destination = %request.get_ref().destination_key_id))]
    async fn re_wrap(
        &self,
        request: Request<ReWrapRequest>,
    ) -> Result<Response<ReWrapResponse>, Status> {
        let started = Instant::now();
        let result = async {
            let req = request.into_inner();
            let destination = optional_key_ref(&req.destination_key_id)?;
            let source_ctx = context(req.source_encryption_context)?;
            let destination_ctx = context(req.destination_encryption_context)?;
            let blob = req.ciphertext_blob;
            let rewrapped = blocking(&self.keystore, move |ks| {
                ks.rewrap(&blob, &source_ctx, destination.as_ref(), &destination_ctx)
            })
            .await?;
            Ok(Response::new(ReWrapResponse {
                ciphertext_blob: rewrapped.wrapped.blob,
                source_key_id: rewrapped.source_key_id.to_string(),
                key_id: rewrapped.wrapped.key_id.to_string(),
                key_version: rewrapped.wrapped.key_version,
                source_key_version: rewrapped.source_key_version,
            }))
        }
        .await;
        done("ReWrap", started, &result);
        result
    }
}
