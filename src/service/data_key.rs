//! `wrapd.v1.DataKeyService`: generate, wrap, unwrap and re-wrap data keys.

use std::sync::Arc;

use tonic::{Request, Response, Status};
use tracing::instrument;
use zeroize::Zeroizing;

use super::{Gate, blob_key, blocking, context, key_ref, optional_key_ref, target_of};
use crate::auth::Operation;
use crate::keystore::Keystore;
use crate::proto::data_key_service_server::DataKeyService;
use crate::proto::{
    GenerateDataKeyRequest, GenerateDataKeyResponse, GenerateDataKeyWithoutPlaintextResponse,
    ReWrapRequest, ReWrapResponse, UnwrapRequest, UnwrapResponse, WrapRequest, WrapResponse,
};

/// The data-plane service.
pub struct DataKeyApi {
    keystore: Arc<Keystore>,
    gate: Arc<Gate>,
}

impl DataKeyApi {
    /// A service over `keystore`, guarded by `gate`.
    pub fn new(keystore: Arc<Keystore>, gate: Arc<Gate>) -> Self {
        Self { keystore, gate }
    }
}

#[tonic::async_trait]
impl DataKeyService for DataKeyApi {
    #[instrument(level = "debug", skip_all)]
    async fn generate_data_key(
        &self,
        request: Request<GenerateDataKeyRequest>,
    ) -> Result<Response<GenerateDataKeyResponse>, Status> {
        let mut call = self.gate.begin(&request, Operation::GenerateDataKey);
        let result = async {
            self.gate.check_some(&call)?;
            let req = request.into_inner();
            let key = key_ref(&req.key_id)?;
            call.key(key.to_string(), None);
            let ctx = context(req.encryption_context)?;
            call.context(&ctx);
            self.gate
                .check(&call, &target_of(&self.keystore, &key), Some(&ctx))?;
            let mut generated = blocking(&self.keystore, call.deadline(), move |ks| {
                ks.generate_data_key(&key, req.number_of_bytes, &ctx)
            })
            .await?;
            call.key(
                generated.wrapped.key_id.to_string(),
                Some(generated.wrapped.key_version),
            );
            Ok(Response::new(GenerateDataKeyResponse {
                // Moved, not copied; the response buffer is beyond our reach once sent.
                plaintext: std::mem::take(&mut *generated.plaintext),
                ciphertext_blob: generated.wrapped.blob,
                key_id: generated.wrapped.key_id.to_string(),
                key_version: generated.wrapped.key_version,
            }))
        }
        .await;
        self.gate.finish(call, result).await
    }

    #[instrument(level = "debug", skip_all)]
    async fn generate_data_key_without_plaintext(
        &self,
        request: Request<GenerateDataKeyRequest>,
    ) -> Result<Response<GenerateDataKeyWithoutPlaintextResponse>, Status> {
        let mut call = self
            .gate
            .begin(&request, Operation::GenerateDataKeyWithoutPlaintext);
        let result = async {
            self.gate.check_some(&call)?;
            let req = request.into_inner();
            let key = key_ref(&req.key_id)?;
            call.key(key.to_string(), None);
            let ctx = context(req.encryption_context)?;
            call.context(&ctx);
            self.gate
                .check(&call, &target_of(&self.keystore, &key), Some(&ctx))?;
            let generated = blocking(&self.keystore, call.deadline(), move |ks| {
                ks.generate_data_key(&key, req.number_of_bytes, &ctx)
            })
            .await?;
            call.key(
                generated.wrapped.key_id.to_string(),
                Some(generated.wrapped.key_version),
            );
            // `generated.plaintext` is zeroized when dropped here.
            Ok(Response::new(GenerateDataKeyWithoutPlaintextResponse {
                ciphertext_blob: generated.wrapped.blob,
                key_id: generated.wrapped.key_id.to_string(),
                key_version: generated.wrapped.key_version,
            }))
        }
        .await;
        self.gate.finish(call, result).await
    }

    #[instrument(level = "debug", skip_all)]
    async fn wrap(&self, request: Request<WrapRequest>) -> Result<Response<WrapResponse>, Status> {
        let mut call = self.gate.begin(&request, Operation::Wrap);
        let result = async {
            self.gate.check_some(&call)?;
            let req = request.into_inner();
            let plaintext = Zeroizing::new(req.plaintext);
            let key = key_ref(&req.key_id)?;
            call.key(key.to_string(), None);
            let ctx = context(req.encryption_context)?;
            call.context(&ctx);
            self.gate
                .check(&call, &target_of(&self.keystore, &key), Some(&ctx))?;
            let wrapped = blocking(&self.keystore, call.deadline(), move |ks| {
                ks.wrap(&key, &plaintext, &ctx)
            })
            .await?;
            call.key(wrapped.key_id.to_string(), Some(wrapped.key_version));
            Ok(Response::new(WrapResponse {
                ciphertext_blob: wrapped.blob,
                key_id: wrapped.key_id.to_string(),
                key_version: wrapped.key_version,
            }))
        }
        .await;
        self.gate.finish(call, result).await
    }

    #[instrument(level = "debug", skip_all)]
    async fn unwrap(
        &self,
        request: Request<UnwrapRequest>,
    ) -> Result<Response<UnwrapResponse>, Status> {
        let mut call = self.gate.begin(&request, Operation::Unwrap);
        let result = async {
            self.gate.check_some(&call)?;
            let req = request.into_inner();
            let expected = optional_key_ref(&req.key_id)?;
            let ctx = context(req.encryption_context)?;
            call.context(&ctx);
            // An unparseable blob names no key: it fails as invalid below.
            if let Some(key) = blob_key(&req.ciphertext_blob) {
                call.key(key.to_string(), None);
                self.gate
                    .check(&call, &target_of(&self.keystore, &key), Some(&ctx))?;
            }
            let blob = req.ciphertext_blob;
            let mut unwrapped = blocking(&self.keystore, call.deadline(), move |ks| {
                ks.unwrap(&blob, &ctx, expected.as_ref())
            })
            .await?;
            call.key(unwrapped.key_id.to_string(), Some(unwrapped.key_version));
            Ok(Response::new(UnwrapResponse {
                plaintext: std::mem::take(&mut *unwrapped.plaintext),
                key_id: unwrapped.key_id.to_string(),
                key_version: unwrapped.key_version,
            }))
        }
        .await;
        self.gate.finish(call, result).await
    }

    #[instrument(level = "debug", skip_all)]
    async fn re_wrap(
        &self,
        request: Request<ReWrapRequest>,
    ) -> Result<Response<ReWrapResponse>, Status> {
        let mut call = self.gate.begin(&request, Operation::ReWrap);
        let result = async {
            self.gate.check_some(&call)?;
            let req = request.into_inner();
            let destination = optional_key_ref(&req.destination_key_id)?;
            let source_ctx = context(req.source_encryption_context)?;
            let destination_ctx = context(req.destination_encryption_context)?;
            call.context(&destination_ctx);
            // Both ends are checked: the source with its context, the destination with its.
            let source = blob_key(&req.ciphertext_blob);
            if let Some(source) = &source {
                self.gate
                    .check(&call, &target_of(&self.keystore, source), Some(&source_ctx))?;
            }
            if let Some(to) = destination.as_ref().or(source.as_ref()) {
                call.key(to.to_string(), None);
                self.gate.check(
                    &call,
                    &target_of(&self.keystore, to),
                    Some(&destination_ctx),
                )?;
            }
            let blob = req.ciphertext_blob;
            let rewrapped = blocking(&self.keystore, call.deadline(), move |ks| {
                ks.rewrap(&blob, &source_ctx, destination.as_ref(), &destination_ctx)
            })
            .await?;
            call.key(
                rewrapped.wrapped.key_id.to_string(),
                Some(rewrapped.wrapped.key_version),
            );
            Ok(Response::new(ReWrapResponse {
                ciphertext_blob: rewrapped.wrapped.blob,
                source_key_id: rewrapped.source_key_id.to_string(),
                key_id: rewrapped.wrapped.key_id.to_string(),
                key_version: rewrapped.wrapped.key_version,
                source_key_version: rewrapped.source_key_version,
            }))
        }
        .await;
        self.gate.finish(call, result).await
    }
}
