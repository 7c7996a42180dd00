//! The Kubernetes KMS v2 plugin (`v2.KeyManagementService`) on its own unix socket: the
//! wire side of [`crate::ops::KmsPlugin`], whose docs say what each call does. Calls act as
//! the configured internal principal and are audited with the apiserver's `uid` as the
//! request id.

use tonic::{Request, Response, Status};
use tracing::instrument;
use zeroize::Zeroizing;

use super::{status, unix_peer};
use crate::auth::{Operation, kms_plugin_identity};
use crate::kms_proto::key_management_service_server::KeyManagementService;
use crate::kms_proto::{
    DecryptRequest, DecryptResponse, EncryptRequest, EncryptResponse, StatusRequest, StatusResponse,
};
use crate::ops::{Call, KmsPlugin};

/// The KMS v2 plugin service.
pub struct KmsApi {
    plugin: KmsPlugin,
    principal: String,
}

impl KmsApi {
    /// The service for `plugin`, acting as `principal`.
    pub fn new(plugin: KmsPlugin, principal: String) -> Self {
        Self { plugin, principal }
    }

    fn call<T>(&self, request: &Request<T>, op: Operation, uid: &str) -> Call {
        let identity = kms_plugin_identity(&self.principal, unix_peer(request));
        Call::new(Ok(identity), op, Some(uid), None)
    }
}

#[tonic::async_trait]
impl KeyManagementService for KmsApi {
    #[instrument(level = "debug", skip_all)]
    async fn status(
        &self,
        _request: Request<StatusRequest>,
    ) -> Result<Response<StatusResponse>, Status> {
        let (key_id, healthz) = self.plugin.status().await;
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
        let call = self.call(&request, Operation::Wrap, &request.get_ref().uid);
        let plaintext = Zeroizing::new(request.into_inner().plaintext);
        let sealed = self.plugin.encrypt(call, plaintext).await.map_err(status)?;
        Ok(Response::new(EncryptResponse {
            key_id: sealed.key_id,
            ciphertext: sealed.ciphertext,
            annotations: Default::default(),
        }))
    }

    #[instrument(level = "debug", skip_all)]
    async fn decrypt(
        &self,
        request: Request<DecryptRequest>,
    ) -> Result<Response<DecryptResponse>, Status> {
        let call = self.call(&request, Operation::Unwrap, &request.get_ref().uid);
        let req = request.into_inner();
        let annotations = req.annotations.iter().map(|(k, v)| k.len() + v.len()).sum();
        let mut plaintext = self
            .plugin
            .decrypt(call, req.ciphertext, req.key_id, annotations)
            .await
            .map_err(status)?;
        Ok(Response::new(DecryptResponse {
            plaintext: std::mem::take(&mut *plaintext),
        }))
    }
}
