//! `wrapd.v1.DataKeyService`: generate, wrap, unwrap and re-wrap data keys.

use tonic::{Request, Response, Status};
use tracing::instrument;
use zeroize::Zeroizing;

use super::{call_of, code_of, status};
use crate::auth::Operation;
use crate::ops::Ops;
use crate::proto::data_key_service_server::DataKeyService;
use crate::proto::{
    BatchGenerateDataKeyRequest, BatchGenerateDataKeyResponse, BatchGenerateDataKeyResult,
    BatchUnwrapRequest, BatchUnwrapResponse, BatchUnwrapResult, GenerateDataKeyRequest,
    GenerateDataKeyResponse, GenerateDataKeyWithoutPlaintextResponse, ItemError, ReWrapRequest,
    ReWrapResponse, UnwrapRequest, UnwrapResponse, WrapRequest, WrapResponse,
    batch_generate_data_key_result, batch_unwrap_result,
};

/// The data-plane service.
pub struct DataKeyApi {
    ops: Ops,
}

impl DataKeyApi {
    /// The service over `ops`.
    pub fn new(ops: Ops) -> Self {
        Self { ops }
    }
}

/// The error of one batch item, as the single call's status would carry it.
fn item_error(err: &crate::Error) -> ItemError {
    ItemError {
        code: code_of(err.kind()) as i32,
        message: err.public_message(),
    }
}

#[tonic::async_trait]
impl DataKeyService for DataKeyApi {
    #[instrument(level = "debug", skip_all)]
    async fn batch_unwrap(
        &self,
        request: Request<BatchUnwrapRequest>,
    ) -> Result<Response<BatchUnwrapResponse>, Status> {
        let call = call_of(&request, Operation::Unwrap);
        let items = request
            .into_inner()
            .items
            .into_iter()
            .map(|i| (i.ciphertext_blob, i.encryption_context, i.key_id))
            .collect();
        let results = self.ops.batch_unwrap(&call, items).await.map_err(status)?;
        Ok(Response::new(BatchUnwrapResponse {
            results: results
                .into_iter()
                .map(|r| BatchUnwrapResult {
                    result: Some(match r {
                        Ok(mut u) => batch_unwrap_result::Result::Ok(UnwrapResponse {
                            plaintext: std::mem::take(&mut *u.plaintext),
                            key_id: u.key_id.to_string(),
                            key_version: u.key_version,
                        }),
                        Err(err) => batch_unwrap_result::Result::Error(item_error(&err)),
                    }),
                })
                .collect(),
        }))
    }

    #[instrument(level = "debug", skip_all)]
    async fn batch_generate_data_key(
        &self,
        request: Request<BatchGenerateDataKeyRequest>,
    ) -> Result<Response<BatchGenerateDataKeyResponse>, Status> {
        let call = call_of(&request, Operation::GenerateDataKey);
        let items = request
            .into_inner()
            .items
            .into_iter()
            .map(|i| (i.key_id, i.encryption_context, i.number_of_bytes))
            .collect();
        let results = self
            .ops
            .batch_generate_data_key(&call, items)
            .await
            .map_err(status)?;
        Ok(Response::new(BatchGenerateDataKeyResponse {
            results: results
                .into_iter()
                .map(|r| BatchGenerateDataKeyResult {
                    result: Some(match r {
                        Ok(mut g) => {
                            batch_generate_data_key_result::Result::Ok(GenerateDataKeyResponse {
                                plaintext: std::mem::take(&mut *g.plaintext),
                                ciphertext_blob: g.wrapped.blob,
                                key_id: g.wrapped.key_id.to_string(),
                                key_version: g.wrapped.key_version,
                            })
                        }
                        Err(err) => batch_generate_data_key_result::Result::Error(item_error(&err)),
                    }),
                })
                .collect(),
        }))
    }

    #[instrument(level = "debug", skip_all)]
    async fn generate_data_key(
        &self,
        request: Request<GenerateDataKeyRequest>,
    ) -> Result<Response<GenerateDataKeyResponse>, Status> {
        let call = call_of(&request, Operation::GenerateDataKey);
        let req = request.into_inner();
        let mut generated = self
            .ops
            .generate_data_key(
                call,
                req.key_id,
                req.encryption_context,
                req.number_of_bytes,
            )
            .await
            .map_err(status)?;
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
        let call = call_of(&request, Operation::GenerateDataKeyWithoutPlaintext);
        let req = request.into_inner();
        let generated = self
            .ops
            .generate_data_key(
                call,
                req.key_id,
                req.encryption_context,
                req.number_of_bytes,
            )
            .await
            .map_err(status)?;
        // `generated.plaintext` is zeroized when dropped here.
        Ok(Response::new(GenerateDataKeyWithoutPlaintextResponse {
            ciphertext_blob: generated.wrapped.blob,
            key_id: generated.wrapped.key_id.to_string(),
            key_version: generated.wrapped.key_version,
        }))
    }

    #[instrument(level = "debug", skip_all)]
    async fn wrap(&self, request: Request<WrapRequest>) -> Result<Response<WrapResponse>, Status> {
        let call = call_of(&request, Operation::Wrap);
        let req = request.into_inner();
        let wrapped = self
            .ops
            .wrap(
                call,
                req.key_id,
                Zeroizing::new(req.plaintext),
                req.encryption_context,
            )
            .await
            .map_err(status)?;
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
        let call = call_of(&request, Operation::Unwrap);
        let req = request.into_inner();
        let mut unwrapped = self
            .ops
            .unwrap(
                call,
                req.ciphertext_blob,
                req.encryption_context,
                req.key_id,
            )
            .await
            .map_err(status)?;
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
        let call = call_of(&request, Operation::ReWrap);
        let req = request.into_inner();
        let rewrapped = self
            .ops
            .rewrap(
                call,
                req.ciphertext_blob,
                req.source_encryption_context,
                req.destination_key_id,
                req.destination_encryption_context,
                String::new(),
            )
            .await
            .map_err(status)?;
        Ok(Response::new(ReWrapResponse {
            ciphertext_blob: rewrapped.wrapped.blob,
            source_key_id: rewrapped.source_key_id.to_string(),
            key_id: rewrapped.wrapped.key_id.to_string(),
            key_version: rewrapped.wrapped.key_version,
            source_key_version: rewrapped.source_key_version,
        }))
    }
}
