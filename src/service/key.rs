//! `wrapd.v1.KeyService`: the lifecycle of master keys and their aliases.

use std::sync::Arc;

use tonic::{Request, Response, Status};
use tracing::instrument;

use super::{blocking, key_ref, optional_key_ref, peer};
use crate::ids::{AliasName, KeyId};
use crate::keystore::{KeyRecord, KeyState, Keystore};
use crate::proto::key_service_server::KeyService;
use crate::proto::{
    self, Alias, AliasRequest, CreateKeyRequest, KeyMetadata, KeyRef, ListAliasesRequest,
    ListAliasesResponse, ListKeysRequest, ListKeysResponse, ScheduleKeyDeletionRequest,
};

/// The control-plane service.
pub struct KeyApi {
    keystore: Arc<Keystore>,
}

impl KeyApi {
    /// A service over `keystore`.
    pub fn new(keystore: Arc<Keystore>) -> Self {
        Self { keystore }
    }
}

/// The wire form of a key.
pub fn key_metadata(keystore: &Keystore, key: &KeyRecord) -> KeyMetadata {
    KeyMetadata {
        key_id: key.id.to_string(),
        state: match key.state {
            KeyState::Enabled => proto::KeyState::Enabled,
            KeyState::Disabled => proto::KeyState::Disabled,
            KeyState::PendingDeletion => proto::KeyState::PendingDeletion,
        } as i32,
        description: key.description.clone(),
        current_version: key.current_version(),
        aliases: key.aliases.iter().map(ToString::to_string).collect(),
        created_at: Some(key.created_at.into()),
        deletion_date: key.deletion_date.map(Into::into),
        versions: key
            .versions
            .iter()
            .map(|v| proto::KeyVersion {
                version: v.version,
                created_at: Some(v.created_at.into()),
                wrap_count: keystore.wrap_count(key, v),
                available: !keystore.is_missing(&key.id, v.version),
            })
            .collect(),
    }
}

fn alias_message((alias, key): (AliasName, KeyId)) -> Alias {
    Alias {
        alias_name: alias.to_string(),
        key_id: key.to_string(),
    }
}

fn alias_name(s: &str) -> Result<AliasName, Status> {
    AliasName::parse(s).map_err(Status::from)
}

impl KeyApi {
    /// Runs a key store call that returns a key, answering with its metadata.
    async fn key_call(
        &self,
        f: impl FnOnce(&Keystore) -> crate::Result<Arc<KeyRecord>> + Send + 'static,
    ) -> Result<Response<KeyMetadata>, Status> {
        let metadata = blocking(&self.keystore, move |ks| {
            f(ks).map(|key| key_metadata(ks, &key))
        })
        .await?;
        Ok(Response::new(metadata))
    }
}

#[tonic::async_trait]
impl KeyService for KeyApi {
    #[instrument(skip_all, fields(peer = %peer(&request)))]
    async fn create_key(
        &self,
        request: Request<CreateKeyRequest>,
    ) -> Result<Response<KeyMetadata>, Status> {
        let req = request.into_inner();
        let alias = if req.alias.is_empty() {
            None
        } else {
            Some(alias_name(&req.alias)?)
        };
        self.key_call(move |ks| ks.create_key(&req.description, alias.as_ref()))
            .await
    }

    #[instrument(skip_all, fields(peer = %peer(&request), key = %request.get_ref().key_id))]
    async fn describe_key(
        &self,
        request: Request<KeyRef>,
    ) -> Result<Response<KeyMetadata>, Status> {
        let key = key_ref(&request.into_inner().key_id)?;
        self.key_call(move |ks| ks.resolve(&key)).await
    }

    #[instrument(skip_all, fields(peer = %peer(&request)))]
    async fn list_keys(
        &self,
        request: Request<ListKeysRequest>,
    ) -> Result<Response<ListKeysResponse>, Status> {
        let req = request.into_inner();
        let response = blocking(&self.keystore, move |ks| {
            let page = ks.list_keys(req.page_size, &req.page_token)?;
            Ok(ListKeysResponse {
                keys: page.items.iter().map(|k| key_metadata(ks, k)).collect(),
                next_page_token: page.next_page_token,
            })
        })
        .await?;
        Ok(Response::new(response))
    }

    #[instrument(skip_all, fields(peer = %peer(&request), key = %request.get_ref().key_id))]
    async fn rotate_key(&self, request: Request<KeyRef>) -> Result<Response<KeyMetadata>, Status> {
        let key = key_ref(&request.into_inner().key_id)?;
        self.key_call(move |ks| ks.rotate_key(&key)).await
    }

    #[instrument(skip_all, fields(peer = %peer(&request), key = %request.get_ref().key_id))]
    async fn enable_key(&self, request: Request<KeyRef>) -> Result<Response<KeyMetadata>, Status> {
        let key = key_ref(&request.into_inner().key_id)?;
        self.key_call(move |ks| ks.enable_key(&key)).await
    }

    #[instrument(skip_all, fields(peer = %peer(&request), key = %request.get_ref().key_id))]
    async fn disable_key(&self, request: Request<KeyRef>) -> Result<Response<KeyMetadata>, Status> {
        let key = key_ref(&request.into_inner().key_id)?;
        self.key_call(move |ks| ks.disable_key(&key)).await
    }

    #[instrument(skip_all, fields(peer = %peer(&request), key = %request.get_ref().key_id))]
    async fn schedule_key_deletion(
        &self,
        request: Request<ScheduleKeyDeletionRequest>,
    ) -> Result<Response<KeyMetadata>, Status> {
        let req = request.into_inner();
        let key = key_ref(&req.key_id)?;
        self.key_call(move |ks| ks.schedule_deletion(&key, req.pending_window_days))
            .await
    }

    #[instrument(skip_all, fields(peer = %peer(&request), key = %request.get_ref().key_id))]
    async fn cancel_key_deletion(
        &self,
        request: Request<KeyRef>,
    ) -> Result<Response<KeyMetadata>, Status> {
        let key = key_ref(&request.into_inner().key_id)?;
        self.key_call(move |ks| ks.cancel_deletion(&key)).await
    }

    #[instrument(skip_all, fields(peer = %peer(&request), alias = %request.get_ref().alias_name))]
    async fn create_alias(
        &self,
        request: Request<AliasRequest>,
    ) -> Result<Response<Alias>, Status> {
        let req = request.into_inner();
        let alias = alias_name(&req.alias_name)?;
        let key = key_ref(&req.key_id)?;
        let created = blocking(&self.keystore, move |ks| ks.create_alias(&alias, &key)).await?;
        Ok(Response::new(alias_message(created)))
    }

    #[instrument(skip_all, fields(peer = %peer(&request), alias = %request.get_ref().alias_name))]
    async fn update_alias(
        &self,
        request: Request<AliasRequest>,
    ) -> Result<Response<Alias>, Status> {
        let req = request.into_inner();
        let alias = alias_name(&req.alias_name)?;
        let key = key_ref(&req.key_id)?;
        let updated = blocking(&self.keystore, move |ks| ks.update_alias(&alias, &key)).await?;
        Ok(Response::new(alias_message(updated)))
    }

    #[instrument(skip_all, fields(peer = %peer(&request), alias = %request.get_ref().alias_name))]
    async fn delete_alias(
        &self,
        request: Request<AliasRequest>,
    ) -> Result<Response<Alias>, Status> {
        let alias = alias_name(&request.into_inner().alias_name)?;
        let deleted = blocking(&self.keystore, move |ks| ks.delete_alias(&alias)).await?;
        Ok(Response::new(alias_message(deleted)))
    }

    #[instrument(skip_all, fields(peer = %peer(&request)))]
    async fn list_aliases(
        &self,
        request: Request<ListAliasesRequest>,
    ) -> Result<Response<ListAliasesResponse>, Status> {
        let req = request.into_inner();
        let key = optional_key_ref(&req.key_id)?;
        let response = blocking(&self.keystore, move |ks| {
            let page = ks.list_aliases(key.as_ref(), req.page_size, &req.page_token)?;
            Ok(ListAliasesResponse {
                aliases: page.items.into_iter().map(alias_message).collect(),
                next_page_token: page.next_page_token,
            })
        })
        .await?;
        Ok(Response::new(response))
    }
}
