//! The gRPC floor of `wrapd bench`: a bare tonic `DataKeyService` on a unix socket that
//! answers `Unwrap`, `GenerateDataKey` and the batch calls with fixed messages of the sizes
//! wrapd returns, doing no work at all.
//!
//! It runs with tonic's defaults (no limits, no `:authority` rewriter, no identities) in the
//! bench process, so a load generator calling it over the same transport, at the same
//! concurrency and with the same messages as the daemon measures what gRPC alone costs on
//! this machine: no daemon can answer faster.

use std::path::Path;

use tokio::net::UnixListener;
use tokio::sync::oneshot;
use tokio_stream::wrappers::UnixListenerStream;
use tonic::{Request, Response, Status};

use crate::error::{Error, Result};
use crate::proto::data_key_service_server::{DataKeyService, DataKeyServiceServer};
use crate::proto::{
    BatchGenerateDataKeyRequest, BatchGenerateDataKeyResponse, BatchGenerateDataKeyResult,
    BatchUnwrapRequest, BatchUnwrapResponse, BatchUnwrapResult, GenerateDataKeyRequest,
    GenerateDataKeyResponse, GenerateDataKeyWithoutPlaintextResponse, ReWrapRequest,
    ReWrapResponse, UnwrapRequest, UnwrapResponse, WrapRequest, WrapResponse,
    batch_generate_data_key_result, batch_unwrap_result,
};

/// The echo service: fixed answers shaped like wrapd's.
struct Echo {
    /// A ciphertext blob of the size wrapd returns (answers carry it back).
    blob: Vec<u8>,
}

impl Echo {
    fn unwrapped() -> UnwrapResponse {
        UnwrapResponse {
            plaintext: vec![0x5a; 32],
            key_id: "00000000-0000-4000-8000-000000000000".into(),
            key_version: 1,
        }
    }

    fn generated(&self) -> GenerateDataKeyResponse {
        GenerateDataKeyResponse {
            plaintext: vec![0x5a; 32],
            ciphertext_blob: self.blob.clone(),
            key_id: "00000000-0000-4000-8000-000000000000".into(),
            key_version: 1,
        }
    }
}

fn unimplemented() -> Status {
    Status::unimplemented("the bench's echo service answers Unwrap, GenerateDataKey and batches")
}

#[tonic::async_trait]
impl DataKeyService for Echo {
    async fn generate_data_key(
        &self,
        _request: Request<GenerateDataKeyRequest>,
    ) -> std::result::Result<Response<GenerateDataKeyResponse>, Status> {
        Ok(Response::new(self.generated()))
    }

    async fn generate_data_key_without_plaintext(
        &self,
        _request: Request<GenerateDataKeyRequest>,
    ) -> std::result::Result<Response<GenerateDataKeyWithoutPlaintextResponse>, Status> {
        Err(unimplemented())
    }

    async fn wrap(
        &self,
        _request: Request<WrapRequest>,
    ) -> std::result::Result<Response<WrapResponse>, Status> {
        Err(unimplemented())
    }

    async fn unwrap(
        &self,
        _request: Request<UnwrapRequest>,
    ) -> std::result::Result<Response<UnwrapResponse>, Status> {
        Ok(Response::new(Self::unwrapped()))
    }

    async fn re_wrap(
        &self,
        _request: Request<ReWrapRequest>,
    ) -> std::result::Result<Response<ReWrapResponse>, Status> {
        Err(unimplemented())
    }

    async fn batch_unwrap(
        &self,
        request: Request<BatchUnwrapRequest>,
    ) -> std::result::Result<Response<BatchUnwrapResponse>, Status> {
        let results = request
            .into_inner()
            .items
            .iter()
            .map(|_| BatchUnwrapResult {
                result: Some(batch_unwrap_result::Result::Ok(Self::unwrapped())),
            })
            .collect();
        Ok(Response::new(BatchUnwrapResponse { results }))
    }

    async fn batch_generate_data_key(
        &self,
        request: Request<BatchGenerateDataKeyRequest>,
    ) -> std::result::Result<Response<BatchGenerateDataKeyResponse>, Status> {
        let results = request
            .into_inner()
            .items
            .iter()
            .map(|_| BatchGenerateDataKeyResult {
                result: Some(batch_generate_data_key_result::Result::Ok(self.generated())),
            })
            .collect();
        Ok(Response::new(BatchGenerateDataKeyResponse { results }))
    }
}

/// A running echo server; dropping it stops the server.
pub struct EchoServer {
    _stop: oneshot::Sender<()>,
}

impl EchoServer {
    /// Serves the echo service on a new unix socket at `path` (in a directory the caller
    /// owns); generated data keys carry `blob` as their ciphertext.
    pub fn start(path: &Path, blob: Vec<u8>) -> Result<Self> {
        let listener = UnixListener::bind(path)
            .map_err(|e| Error::Config(format!("cannot bind {}: {e}", path.display())))?;
        let (stop, stopped) = oneshot::channel::<()>();
        let server = tonic::transport::Server::builder()
            .add_service(DataKeyServiceServer::new(Echo { blob }))
            .serve_with_incoming_shutdown(UnixListenerStream::new(listener), async {
                let _ = stopped.await;
            });
        tokio::spawn(async move {
            if let Err(err) = server.await {
                tracing::warn!(error = %err, "the bench's echo server stopped");
            }
        });
        Ok(Self { _stop: stop })
    }
}
