//! `wrapd.v1.KeyService`: the lifecycle of master keys and their aliases.

use std::sync::Arc;

use tonic::{Request, Response, Status};
use tracing::instrument;

use super::{Call, Gate, optional_key_ref, target_of};
use crate::auth::{Operation, Target};
use crate::error::Result;
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
        f: impl FnOnce(&Keystore, &KeyName) -> Result<Arc<KeyRecord>> + Send + 'static,
    ) -> Result<Response<KeyMetadata>, Status> {
        let call = self.gate.begin(&request, op);
        let key_id = request.into_inner().key_id;
        self.metadata(call, move |gate, ks, call| {
            gate.check_some(call, call.op())?;
            let key = KeyName::parse(&key_id)?;
            call.key(key.to_string(), None);
            gate.check(call, &target_of(ks, &key), None)?;
            f(ks, &key)
        })
        .await
    }

    /// Runs a job that returns a key, answering with its metadata.
    async fn metadata(
        &self,
        call: Call,
        job: impl FnOnce(&Gate, &Keystore, &mut Call) -> Result<Arc<KeyRecord>> + Send + 'static,
    ) -> Result<Response<KeyMetadata>, Status> {
        let metadata = self
            .gate
            .run(&self.keystore, call, move |gate, ks, call| {
                let key = job(gate, ks, call)?;
                let metadata = key_metadata(ks, &key);
                call.key(metadata.key_id.clone(), Some(metadata.current_version));
                Ok(metadata)
            })
            .await?;
        Ok(Response::new(metadata))
    }

    /// Runs an alias job, answering with the alias and its key.
    async fn alias(
        &self,
        call: Call,
        job: impl FnOnce(&Gate, &Keystore, &mut Call) -> Result<(AliasName, KeyId)> + Send + 'static,
    ) -> Result<Response<Alias>, Status> {
        let pointed = self
            .gate
            .run(&self.keystore, call, move |gate, ks, call| {
                let pointed = job(gate, ks, call)?;
                call.key(pointed.1.to_string(), None);
                Ok(pointed)
            })
            .await?;
        Ok(Response::new(alias_message(pointed)))
    }
}

/// Checks an alias operation (security review finding 4): on the alias's own name, never on
/// the other names of the key it points at, and on every key involved: the key it names now
/// (if any) and the key it is to name (if given). As in AWS KMS, each is required.
fn check_alias(
    gate: &Gate,
    ks: &Keystore,
    call: &Call,
    alias: &AliasName,
    new_key: Option<&KeyName>,
) -> Result<()> {
    gate.check(call, &Target::Key(vec![alias.to_string()]), None)?;
    let current = KeyName::Alias(alias.clone());
    if ks.resolve(&current).is_ok() {
        gate.check(call, &target_of(ks, &current), None)?;
    }
    if let Some(key) = new_key {
        gate.check(call, &target_of(ks, key), None)?;
    }
    Ok(())
}

#[tonic::async_trait]
impl KeyService for KeyApi {
    #[instrument(level = "debug", skip_all)]
    async fn create_key(
        &self,
        request: Request<CreateKeyRequest>,
    ) -> Result<Response<KeyMetadata>, Status> {
        let call = self.gate.begin(&request, Operation::CreateKey);
        let req = request.into_inner();
        self.metadata(call, move |gate, ks, call| {
            gate.check_some(call, call.op())?;
            let alias = if req.alias.is_empty() {
                None
            } else {
                Some(AliasName::parse(&req.alias)?)
            };
            let target = match &alias {
                Some(alias) => Target::Key(vec![alias.to_string()]),
                None => Target::Any,
            };
            gate.check(call, &target, None)?;
            ks.create_key(&req.description, alias.as_ref())
        })
        .await
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
        let req = request.into_inner();
        let response = self
            .gate
            .run(&self.keystore, call, move |gate, ks, call| {
                gate.check(call, &Target::Any, None)?;
                let page = ks.list_keys(req.page_size, &req.page_token)?;
                Ok(ListKeysResponse {
                    keys: page.items.iter().map(|k| key_metadata(ks, k)).collect(),
                    next_page_token: page.next_page_token,
                })
            })
            .await?;
        Ok(Response::new(response))
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
        let call = self.gate.begin(&request, Operation::ScheduleKeyDeletion);
        let req = request.into_inner();
        self.metadata(call, move |gate, ks, call| {
            gate.check_some(call, call.op())?;
            let key = KeyName::parse(&req.key_id)?;
            call.key(key.to_string(), None);
            gate.check(call, &target_of(ks, &key), None)?;
            ks.schedule_deletion(&key, req.pending_window_days)
        })
        .await
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

    #[instrument(level = "debug", skip_all)]
    async fn create_alias(
        &self,
        request: Request<AliasRequest>,
    ) -> Result<Response<Alias>, Status> {
        let call = self.gate.begin(&request, Operation::CreateAlias);
        let req = request.into_inner();
        self.alias(call, move |gate, ks, call| {
            gate.check_some(call, call.op())?;
            let alias = AliasName::parse(&req.alias_name)?;
            let key = KeyName::parse(&req.key_id)?;
            call.key(key.to_string(), None);
            check_alias(gate, ks, call, &alias, Some(&key))?;
            ks.create_alias(&alias, &key)
        })
        .await
    }

    #[instrument(level = "debug", skip_all)]
    async fn update_alias(
        &self,
        request: Request<AliasRequest>,
    ) -> Result<Response<Alias>, Status> {
        let call = self.gate.begin(&request, Operation::UpdateAlias);
        let req = request.into_inner();
        self.alias(call, move |gate, ks, call| {
            gate.check_some(call, call.op())?;
            let alias = AliasName::parse(&req.alias_name)?;
            let key = KeyName::parse(&req.key_id)?;
            call.key(key.to_string(), None);
            check_alias(gate, ks, call, &alias, Some(&key))?;
            ks.update_alias(&alias, &key)
        })
        .await
    }

    #[instrument(level = "debug", skip_all)]
    async fn delete_alias(
        &self,
        request: Request<AliasRequest>,
    ) -> Result<Response<Alias>, Status> {
        let call = self.gate.begin(&request, Operation::DeleteAlias);
        let req = request.into_inner();
        self.alias(call, move |gate, ks, call| {
            gate.check_some(call, call.op())?;
            let alias = AliasName::parse(&req.alias_name)?;
            check_alias(gate, ks, call, &alias, None)?;
            ks.delete_alias(&alias)
        })
        .await
    }

    #[instrument(level = "debug", skip_all)]
    async fn list_aliases(
        &self,
        request: Request<ListAliasesRequest>,
    ) -> Result<Response<ListAliasesResponse>, Status> {
        let call = self.gate.begin(&request, Operation::ListAliases);
        let req = request.into_inner();
        let response = self
            .gate
            .run(&self.keystore, call, move |gate, ks, call| {
                gate.check_some(call, call.op())?;
                let key = optional_key_ref(&req.key_id)?;
                let target = match &key {
                    Some(key) => {
                        call.key(key.to_string(), None);
                        target_of(ks, key)
                    }
                    None => Target::Any,
                };
                gate.check(call, &target, None)?;
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
