//! `wrapd.v1.KeyService`: the lifecycle of master keys and their aliases.

use std::sync::Arc;

use tonic::{Request, Response, Status};
use tracing::instrument;

use super::{Call, Gate, blocking, key_ref, optional_key_ref, target_of};
use crate::auth::{Operation, Target};
use crate::ids::{AliasName, KeyId, KeyRef as KeyName};
use crate::keystore::{KeyRecord, KeyState, Keystore};
use crate::proto::key_service_server::KeyService;
use crate::proto::{
    self, Alias, AliasRequest, CreateKeyRequest, KeyMetadata, KeyRef, ListAliasesRequest,
    ListAliasesResponse, ListKeysRequest, ListKeysResponse, ScheduleKeyDeletionRequest,
};

/// The control-plane service.
pub struct KeyApi {
    keystore: Arc<Keystore>,
    gate: Arc<Gate>,
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
    /// A service over `keystore`, guarded by `gate`.
    pub fn new(keystore: Arc<Keystore>, gate: Arc<Gate>) -> Self {
        Self { keystore, gate }
    }

    /// The common shape of the calls on one key that answer with its metadata.
    async fn on_key(
        &self,
        request: Request<KeyRef>,
        op: Operation,
        f: impl FnOnce(&Keystore, &KeyName) -> crate::Result<Arc<KeyRecord>> + Send + 'static,
    ) -> Result<Response<KeyMetadata>, Status> {
        let mut call = self.gate.begin(&request, op);
        let result = async {
            self.gate.check_some(&call)?;
            let key = key_ref(&request.get_ref().key_id)?;
            call.key(key.to_string(), None);
            self.gate
                .check(&call, &target_of(&self.keystore, &key), None)?;
            self.metadata(&mut call, move |ks| f(ks, &key)).await
        }
        .await;
        self.gate.finish(call, result).await
    }

    /// Runs a key store call that returns a key, answering with its metadata.
    async fn metadata(
        &self,
        call: &mut Call,
        f: impl FnOnce(&Keystore) -> crate::Result<Arc<KeyRecord>> + Send + 'static,
    ) -> Result<Response<KeyMetadata>, Status> {
        let metadata = blocking(&self.keystore, call.deadline(), move |ks| {
            f(ks).map(|key| key_metadata(ks, &key))
        })
        .await?;
        call.key(metadata.key_id.clone(), Some(metadata.current_version));
        Ok(Response::new(metadata))
    }

    /// CreateAlias and UpdateAlias: point an alias at a key.
    async fn point_alias(
        &self,
        request: Request<AliasRequest>,
        op: Operation,
        f: impl FnOnce(&Keystore, &AliasName, &KeyName) -> crate::Result<(AliasName, KeyId)>
        + Send
        + 'static,
    ) -> Result<Response<Alias>, Status> {
        let mut call = self.gate.begin(&request, op);
        let result = async {
            self.gate.check_some(&call)?;
            let req = request.into_inner();
            let alias = alias_name(&req.alias_name)?;
            let key = key_ref(&req.key_id)?;
            call.key(key.to_string(), None);
            self.check_alias(&call, &alias, Some(&key))?;
            let pointed = blocking(&self.keystore, call.deadline(), move |ks| {
                f(ks, &alias, &key)
            })
            .await?;
            call.key(pointed.1.to_string(), None);
            Ok(Response::new(alias_message(pointed)))
        }
        .await;
        self.gate.finish(call, result).await
    }

    /// Checks an alias operation: on the alias (and the key it names now), and on the key
    /// it is to name.
    fn check_alias(
        &self,
        call: &Call,
        alias: &AliasName,
        key: Option<&KeyName>,
    ) -> Result<(), Status> {
        self.gate.check(
            call,
            &target_of(&self.keystore, &KeyName::Alias(alias.clone())),
            None,
        )?;
        if let Some(key) = key {
            self.gate
                .check(call, &target_of(&self.keystore, key), None)?;
        }
        Ok(())
    }
}

#[tonic::async_trait]
impl KeyService for KeyApi {
    #[instrument(level = "debug", skip_all)]
    async fn create_key(
        &self,
        request: Request<CreateKeyRequest>,
    ) -> Result<Response<KeyMetadata>, Status> {
        let mut call = self.gate.begin(&request, Operation::CreateKey);
        let result = async {
            self.gate.check_some(&call)?;
            let req = request.into_inner();
            let alias = if req.alias.is_empty() {
                None
            } else {
                Some(alias_name(&req.alias)?)
            };
            let target = match &alias {
                Some(alias) => Target::Key(vec![alias.to_string()]),
                None => Target::Any,
            };
            self.gate.check(&call, &target, None)?;
            self.metadata(&mut call, move |ks| {
                ks.create_key(&req.description, alias.as_ref())
            })
            .await
        }
        .await;
        self.gate.finish(call, result).await
    }

    async fn describe_key(
        &self,
        request: Request<KeyRef>,
    ) -> Result<Response<KeyMetadata>, Status> {
        self.on_key(request, Operation::DescribeKey, |ks, key| ks.resolve(key))
            .await
    }

    #[instrument(level = "debug", skip_all)]
    async fn list_keys(
        &self,
        request: Request<ListKeysRequest>,
    ) -> Result<Response<ListKeysResponse>, Status> {
        let call = self.gate.begin(&request, Operation::ListKeys);
        let result = async {
            self.gate.check(&call, &Target::Any, None)?;
            let req = request.into_inner();
            let response = blocking(&self.keystore, call.deadline(), move |ks| {
                let page = ks.list_keys(req.page_size, &req.page_token)?;
                Ok(ListKeysResponse {
                    keys: page.items.iter().map(|k| key_metadata(ks, k)).collect(),
                    next_page_token: page.next_page_token,
                })
            })
            .await?;
            Ok(Response::new(response))
        }
        .await;
        self.gate.finish(call, result).await
    }

    async fn rotate_key(&self, request: Request<KeyRef>) -> Result<Response<KeyMetadata>, Status> {
        self.on_key(request, Operation::RotateKey, |ks, key| ks.rotate_key(key))
            .await
    }

    async fn enable_key(&self, request: Request<KeyRef>) -> Result<Response<KeyMetadata>, Status> {
        self.on_key(request, Operation::EnableKey, |ks, key| ks.enable_key(key))
            .await
    }

    async fn disable_key(&self, request: Request<KeyRef>) -> Result<Response<KeyMetadata>, Status> {
        self.on_key(request, Operation::DisableKey, |ks, key| {
            ks.disable_key(key)
        })
        .await
    }

    #[instrument(level = "debug", skip_all)]
    async fn schedule_key_deletion(
        &self,
        request: Request<ScheduleKeyDeletionRequest>,
    ) -> Result<Response<KeyMetadata>, Status> {
        let mut call = self.gate.begin(&request, Operation::ScheduleKeyDeletion);
        let result = async {
            self.gate.check_some(&call)?;
            let req = request.into_inner();
            let key = key_ref(&req.key_id)?;
            call.key(key.to_string(), None);
            self.gate
                .check(&call, &target_of(&self.keystore, &key), None)?;
            self.metadata(&mut call, move |ks| {
                ks.schedule_deletion(&key, req.pending_window_days)
            })
            .await
        }
        .await;
        self.gate.finish(call, result).await
    }

    async fn cancel_key_deletion(
        &self,
        request: Request<KeyRef>,
    ) -> Result<Response<KeyMetadata>, Status> {
        self.on_key(request, Operation::CancelKeyDeletion, |ks, key| {
            ks.cancel_deletion(key)
        })
        .await
    }

    async fn create_alias(
        &self,
        request: Request<AliasRequest>,
    ) -> Result<Response<Alias>, Status> {
        self.point_alias(request, Operation::CreateAlias, |ks, alias, key| {
            ks.create_alias(alias, key)
        })
        .await
    }

    async fn update_alias(
        &self,
        request: Request<AliasRequest>,
    ) -> Result<Response<Alias>, Status> {
        self.point_alias(request, Operation::UpdateAlias, |ks, alias, key| {
            ks.update_alias(alias, key)
        })
        .await
    }

    #[instrument(level = "debug", skip_all)]
    async fn delete_alias(
        &self,
        request: Request<AliasRequest>,
    ) -> Result<Response<Alias>, Status> {
        let mut call = self.gate.begin(&request, Operation::DeleteAlias);
        let result = async {
            self.gate.check_some(&call)?;
            let alias = alias_name(&request.get_ref().alias_name)?;
            self.check_alias(&call, &alias, None)?;
            let deleted = blocking(&self.keystore, call.deadline(), move |ks| {
                ks.delete_alias(&alias)
            })
            .await?;
            call.key(deleted.1.to_string(), None);
            Ok(Response::new(alias_message(deleted)))
        }
        .await;
        self.gate.finish(call, result).await
    }

    #[instrument(level = "debug", skip_all)]
    async fn list_aliases(
        &self,
        request: Request<ListAliasesRequest>,
    ) -> Result<Response<ListAliasesResponse>, Status> {
        let mut call = self.gate.begin(&request, Operation::ListAliases);
        let result = async {
            self.gate.check_some(&call)?;
            let req = request.into_inner();
            let key = optional_key_ref(&req.key_id)?;
            let target = match &key {
                Some(key) => {
                    call.key(key.to_string(), None);
                    target_of(&self.keystore, key)
                }
                None => Target::Any,
            };
            self.gate.check(&call, &target, None)?;
            let response = blocking(&self.keystore, call.deadline(), move |ks| {
                let page = ks.list_aliases(key.as_ref(), req.page_size, &req.page_token)?;
                Ok(ListAliasesResponse {
                    aliases: page.items.into_iter().map(alias_message).collect(),
                    next_page_token: page.next_page_token,
                })
            })
            .await?;
            Ok(Response::new(response))
        }
        .await;
        self.gate.finish(call, result).await
    }
}
