//! `wrapd.v1.DataKeyService`: generate, wrap, unwrap and re-wrap data keys.

use std::sync::Arc;

use tonic::{Request, Response, Status};
use tracing::instrument;
use zeroize::Zeroizing;

use super::{Gate, blob_key, caller_context, optional_key_ref, target_of};
use crate::auth::Operation;
use crate::error::Result;
use crate::ids::KeyRef;
use crate::keystore::{GeneratedKey, Keystore};
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

    /// GenerateDataKey and GenerateDataKeyWithoutPlaintext: the same job.
    async fn generate(
        &self,
        request: Request<GenerateDataKeyRequest>,
        op: Operation,
    ) -> Result<GeneratedKey, Status> {
        let call = self.gate.begin(&request, op);
        let req = request.into_inner();
        self.gate
            .run(&self.keystore, call, move |gate, ks, call| {
                gate.check_some(call, call.op())?;
                let key = KeyRef::parse(&req.key_id)?;
                call.key(key.to_string(), None);
                let ctx = caller_context(req.encryption_context)?;
                call.context(&ctx);
                gate.check(call, &target_of(ks, &key), Some(&ctx))?;
                let generated = ks.generate_data_key(&key, req.number_of_bytes, &ctx)?;
                call.key(
                    generated.wrapped.key_id.to_string(),
                    Some(generated.wrapped.key_version),
                );
                Ok(generated)
            })
            .await
    }
}

#[tonic::async_trait]
impl DataKeyService for DataKeyApi {
    #[instrument(level = "debug", skip_all)]
    async fn generate_data_key(
        &self,
        request: Request<GenerateDataKeyRequest>,
    ) -> Result<Response<GenerateDataKeyResponse>, Status> {
        let mut generated = self.generate(request, Operation::GenerateDataKey).await?;
        Ok(Response::new(GenerateDataKeyResponse {
            // Moved, not copied; the response buffer is beyond our reach once sent.
            plaintext: std::mem::take(&mut *generated.plaintext),
            ciphertext_blob: generated.wrapped.blob,
            key_id: generated.wrapped.key_id.to_string(),
            key_version: generated.wrapped.key_version,
        }))
    }

    #[instrument(level = "debug", skip_all)]
    async fn generate_data_key_without_plaintext(
        &self,
        request: Request<GenerateDataKeyRequest>,
    ) -> Result<Response<GenerateDataKeyWithoutPlaintextResponse>, Status> {
        let generated = self
            .generate(request, Operation::GenerateDataKeyWithoutPlaintext)
            .await?;
        // `generated.plaintext` is zeroized when dropped here.
        Ok(Response::new(GenerateDataKeyWithoutPlaintextResponse {
            ciphertext_blob: generated.wrapped.blob,
            key_id: generated.wrapped.key_id.to_string(),
            key_version: generated.wrapped.key_version,
        }))
    }

    #[instrument(level = "debug", skip_all)]
    async fn wrap(&self, request: Request<WrapRequest>) -> Result<Response<WrapResponse>, Status> {
        let call = self.gate.begin(&request, Operation::Wrap);
        let req = request.into_inner();
        let plaintext = Zeroizing::new(req.plaintext);
        let wrapped = self
            .gate
            .run(&self.keystore, call, move |gate, ks, call| {
                gate.check_some(call, call.op())?;
                let key = KeyRef::parse(&req.key_id)?;
                call.key(key.to_string(), None);
                let ctx = caller_context(req.encryption_context)?;
                call.context(&ctx);
                gate.check(call, &target_of(ks, &key), Some(&ctx))?;
                let wrapped = ks.wrap(&key, &plaintext, &ctx)?;
                call.key(wrapped.key_id.to_string(), Some(wrapped.key_version));
                Ok(wrapped)
            })
            .await?;
        Ok(Response::new(WrapResponse {
            ciphertext_blob: wrapped.blob,
            key_id: wrapped.key_id.to_string(),
            key_version: wrapped.key_version,
        }))
    }

    #[instrument(level = "debug", skip_all)]
    async fn unwrap(
        &self,
        request: Request<UnwrapRequest>,
    ) -> Result<Response<UnwrapResponse>, Status> {
        let call = self.gate.begin(&request, Operation::Unwrap);
        let req = request.into_inner();
        let mut unwrapped = self
            .gate
            .run(&self.keystore, call, move |gate, ks, call| {
                gate.check_some(call, call.op())?;
                let expected = optional_key_ref(&req.key_id)?;
                let ctx = caller_context(req.encryption_context)?;
                call.context(&ctx);
                // An unparseable blob names no key: it fails as invalid below.
                if let Some(key) = blob_key(&req.ciphertext_blob) {
                    call.key(key.to_string(), None);
                    gate.check(call, &target_of(ks, &key), Some(&ctx))?;
                }
                let unwrapped = ks.unwrap(&req.ciphertext_blob, &ctx, expected.as_ref())?;
                call.key(unwrapped.key_id.to_string(), Some(unwrapped.key_version));
                Ok(unwrapped)
            })
            .await?;
        Ok(Response::new(UnwrapResponse {
            plaintext: std::mem::take(&mut *unwrapped.plaintext),
            key_id: unwrapped.key_id.to_string(),
            key_version: unwrapped.key_version,
        }))
    }

    #[instrument(level = "debug", skip_all)]
    async fn re_wrap(
        &self,
        request: Request<ReWrapRequest>,
    ) -> Result<Response<ReWrapResponse>, Status> {
        let call = self.gate.begin(&request, Operation::ReWrap);
        let req = request.into_inner();
        let rewrapped = self
            .gate
            .run(&self.keystore, call, move |gate, ks, call| {
                gate.check_some(call, Operation::ReWrapFrom)?;
                let destination = optional_key_ref(&req.destination_key_id)?;
                let source_ctx = caller_context(req.source_encryption_context)?;
                let destination_ctx = caller_context(req.destination_encryption_context)?;
                call.context(&destination_ctx);
                // Each end needs its own permission (security review finding 5): ReWrapFrom
                // on the source with its context, ReWrapTo on the destination with its.
                let source = blob_key(&req.ciphertext_blob);
                if let Some(source) = &source {
                    gate.check_as(
                        call,
                        Operation::ReWrapFrom,
                        &target_of(ks, source),
                        Some(&source_ctx),
                    )?;
                }
                if let Some(to) = destination.as_ref().or(source.as_ref()) {
                    call.key(to.to_string(), None);
                    gate.check_as(
                        call,
                        Operation::ReWrapTo,
                        &target_of(ks, to),
                        Some(&destination_ctx),
                    )?;
                }
                let rewrapped = ks.rewrap(
                    &req.ciphertext_blob,
                    &source_ctx,
                    destination.as_ref(),
                    &destination_ctx,
                )?;
                call.key(
                    rewrapped.wrapped.key_id.to_string(),
                    Some(rewrapped.wrapped.key_version),
                );
                Ok(rewrapped)
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
}
