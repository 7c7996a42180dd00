//! `wrapd.v1.KeyService`: the lifecycle of master keys and their aliases.

use tonic::{Request, Response, Status};
use tracing::instrument;

use super::{call_of, grants, status};
use crate::auth::Operation;
use crate::auth::key_policy::POLICY_NAME;
use crate::hsm::ImportAlgorithm;
use crate::keystore::{KeyOrigin, KeyState};
use crate::ops::{AliasEntry, KeyView, Ops};
use crate::proto::key_service_server::KeyService;
use crate::proto::{
    self, Alias, AliasRequest, CreateGrantRequest, CreateGrantResponse, CreateKeyRequest,
    EnableKeyRotationRequest, GetKeyPolicyRequest, GetKeyPolicyResponse,
    GetParametersForImportRequest, GetParametersForImportResponse, ImportKeyMaterialRequest,
    KeyMetadata, KeyRef, KeyVersionRequest, ListAliasesRequest, ListAliasesResponse,
    ListGrantsRequest, ListGrantsResponse, ListKeyPoliciesResponse, ListKeysRequest,
    ListKeysResponse, ListRetirableGrantsRequest, PutKeyPolicyRequest, RetireGrantRequest,
    RetireGrantResponse, RevokeGrantRequest, ScheduleKeyDeletionRequest,
    ScheduleKeyVersionDestructionRequest, TagKeyRequest, UntagKeyRequest,
    UpdateKeyDescriptionRequest, WrappingAlgorithm,
};

/// The control-plane service.
pub struct KeyApi {
    ops: Ops,
}

/// The wire form of a key.
pub fn key_metadata(view: &KeyView) -> KeyMetadata {
    let key = &view.key;
    KeyMetadata {
        key_id: key.id.to_string(),
        state: match key.state {
            KeyState::Enabled => proto::KeyState::Enabled,
            KeyState::Disabled => proto::KeyState::Disabled,
            KeyState::PendingDeletion => proto::KeyState::PendingDeletion,
            KeyState::PendingImport => proto::KeyState::PendingImport,
        } as i32,
        description: key.description.clone(),
        current_version: key.current_version(),
        aliases: key.aliases.iter().map(ToString::to_string).collect(),
        created_at: Some(key.created_at.into()),
        deletion_date: key.deletion_date.map(Into::into),
        versions: view
            .versions
            .iter()
            .map(|v| proto::KeyVersion {
                version: v.version,
                created_at: Some(v.created_at.into()),
                wrap_count: v.wrap_count,
                available: v.available,
                automatic: v.automatic,
                usage: v.usage.map(|u| proto::KeyVersionUsage {
                    wraps: u.wraps,
                    unwraps: u.unwraps,
                    first_used: u.first_used.map(Into::into),
                    last_used: u.last_used.map(Into::into),
                }),
                retired: v.retired,
                destruction_date: v.destruction_date.map(Into::into),
                destroyed_at: v.destroyed_at.map(Into::into),
            })
            .collect(),
        rotation_period_days: key.rotation.map_or(0, |r| r.period_days),
        next_rotation: key.rotation.map(|r| r.next.into()),
        tags: key.tags.clone().into_iter().collect(),
        origin: match key.origin {
            KeyOrigin::Hsm => proto::KeyOrigin::Hsm,
            KeyOrigin::External => proto::KeyOrigin::External,
        } as i32,
        valid_to: key.material.and_then(|m| m.valid_to).map(Into::into),
    }
}

fn alias_message((alias, key): AliasEntry) -> Alias {
    Alias {
        alias_name: alias.to_string(),
        key_id: key.to_string(),
    }
}

fn metadata(view: crate::Result<KeyView>) -> Result<Response<KeyMetadata>, Status> {
    view.map(|v| Response::new(key_metadata(&v)))
        .map_err(status)
}

fn alias(entry: crate::Result<AliasEntry>) -> Result<Response<Alias>, Status> {
    entry
        .map(|e| Response::new(alias_message(e)))
        .map_err(status)
}

impl KeyApi {
    /// The service over `ops`.
    pub fn new(ops: Ops) -> Self {
        Self { ops }
    }
}

/// A protobuf timestamp as a time; `None` for one out of range.
fn time_of(t: prost_types::Timestamp) -> Option<std::time::SystemTime> {
    let seconds = u64::try_from(t.seconds).ok()?;
    let nanos = u32::try_from(t.nanos).ok().filter(|n| *n < 1_000_000_000)?;
    std::time::UNIX_EPOCH.checked_add(std::time::Duration::new(seconds, nanos))
}

#[tonic::async_trait]
impl KeyService for KeyApi {
    #[instrument(level = "debug", skip_all)]
    async fn get_parameters_for_import(
        &self,
        request: Request<GetParametersForImportRequest>,
    ) -> Result<Response<GetParametersForImportResponse>, Status> {
        let call = call_of(&request, Operation::GetParametersForImport);
        let req = request.into_inner();
        let algorithm = match WrappingAlgorithm::try_from(req.wrapping_algorithm) {
            Ok(WrappingAlgorithm::RsaesOaepSha1) => ImportAlgorithm::RsaesOaepSha1,
            Ok(WrappingAlgorithm::RsaesOaepSha256) => ImportAlgorithm::RsaesOaepSha256,
            Ok(WrappingAlgorithm::RsaAesKeyWrapSha1) => ImportAlgorithm::RsaAesKeyWrapSha1,
            Ok(WrappingAlgorithm::RsaAesKeyWrapSha256) => ImportAlgorithm::RsaAesKeyWrapSha256,
            _ => {
                return Err(status(crate::Error::invalid(
                    "wrapping_algorithm must be RSAES_OAEP_SHA_1, RSAES_OAEP_SHA_256, RSA_AES_KEY_WRAP_SHA_1 or RSA_AES_KEY_WRAP_SHA_256",
                )));
            }
        };
        let bits = match req.wrapping_key_bits {
            0 => 4096,
            n => n,
        };
        let parameters = self
            .ops
            .get_parameters_for_import(call, req.key_id, algorithm, bits)
            .await
            .map_err(status)?;
        Ok(Response::new(GetParametersForImportResponse {
            key_id: parameters.key_id.to_string(),
            import_token: parameters.import_token,
            public_key: parameters.public_key,
            parameters_valid_to: Some(parameters.valid_to.into()),
        }))
    }

    #[instrument(level = "debug", skip_all)]
    async fn import_key_material(
        &self,
        request: Request<ImportKeyMaterialRequest>,
    ) -> Result<Response<KeyMetadata>, Status> {
        let call = call_of(&request, Operation::ImportKeyMaterial);
        let req = request.into_inner();
        let valid_to = match req.valid_to {
            None => None,
            Some(t) => Some(
                time_of(t)
                    .ok_or_else(|| status(crate::Error::invalid("valid_to is out of range")))?,
            ),
        };
        metadata(
            self.ops
                .import_key_material(
                    call,
                    req.key_id,
                    req.import_token,
                    req.encrypted_key_material,
                    valid_to,
                )
                .await,
        )
    }

    #[instrument(level = "debug", skip_all)]
    async fn retire_key_version(
        &self,
        request: Request<KeyVersionRequest>,
    ) -> Result<Response<KeyMetadata>, Status> {
        let call = call_of(&request, Operation::RetireKeyVersion);
        let req = request.into_inner();
        metadata(
            self.ops
                .set_key_version_retired(call, req.key_id, req.version, true)
                .await,
        )
    }

    #[instrument(level = "debug", skip_all)]
    async fn restore_key_version(
        &self,
        request: Request<KeyVersionRequest>,
    ) -> Result<Response<KeyMetadata>, Status> {
        let call = call_of(&request, Operation::RestoreKeyVersion);
        let req = request.into_inner();
        metadata(
            self.ops
                .set_key_version_retired(call, req.key_id, req.version, false)
                .await,
        )
    }

    #[instrument(level = "debug", skip_all)]
    async fn schedule_key_version_destruction(
        &self,
        request: Request<ScheduleKeyVersionDestructionRequest>,
    ) -> Result<Response<KeyMetadata>, Status> {
        let call = call_of(&request, Operation::ScheduleKeyVersionDestruction);
        let req = request.into_inner();
        metadata(
            self.ops
                .schedule_key_version_destruction(
                    call,
                    req.key_id,
                    req.version,
                    req.pending_window_days,
                )
                .await,
        )
    }

    #[instrument(level = "debug", skip_all)]
    async fn cancel_key_version_destruction(
        &self,
        request: Request<KeyVersionRequest>,
    ) -> Result<Response<KeyMetadata>, Status> {
        let call = call_of(&request, Operation::CancelKeyVersionDestruction);
        let req = request.into_inner();
        metadata(
            self.ops
                .cancel_key_version_destruction(call, req.key_id, req.version)
                .await,
        )
    }

    #[instrument(level = "debug", skip_all)]
    async fn delete_imported_key_material(
        &self,
        request: Request<KeyRef>,
    ) -> Result<Response<KeyMetadata>, Status> {
        let call = call_of(&request, Operation::DeleteImportedKeyMaterial);
        metadata(
            self.ops
                .delete_imported_key_material(call, request.into_inner().key_id)
                .await,
        )
    }

    #[instrument(level = "debug", skip_all)]
    async fn enable_key_rotation(
        &self,
        request: Request<EnableKeyRotationRequest>,
    ) -> Result<Response<KeyMetadata>, Status> {
        let call = call_of(&request, Operation::EnableKeyRotation);
        let req = request.into_inner();
        metadata(
            self.ops
                .set_key_rotation(call, req.key_id, Some(req.rotation_period_days))
                .await,
        )
    }

    #[instrument(level = "debug", skip_all)]
    async fn disable_key_rotation(
        &self,
        request: Request<KeyRef>,
    ) -> Result<Response<KeyMetadata>, Status> {
        let call = call_of(&request, Operation::DisableKeyRotation);
        metadata(
            self.ops
                .set_key_rotation(call, request.into_inner().key_id, None)
                .await,
        )
    }

    #[instrument(level = "debug", skip_all)]
    async fn tag_key(
        &self,
        request: Request<TagKeyRequest>,
    ) -> Result<Response<KeyMetadata>, Status> {
        let call = call_of(&request, Operation::TagKey);
        let req = request.into_inner();
        metadata(
            self.ops
                .tag_key(call, req.key_id, req.tags.into_iter().collect(), false)
                .await,
        )
    }

    #[instrument(level = "debug", skip_all)]
    async fn update_key_description(
        &self,
        request: Request<UpdateKeyDescriptionRequest>,
    ) -> Result<Response<KeyMetadata>, Status> {
        let call = call_of(&request, Operation::UpdateKeyDescription);
        let req = request.into_inner();
        metadata(
            self.ops
                .update_key_description(call, req.key_id, req.description)
                .await,
        )
    }

    #[instrument(level = "debug", skip_all)]
    async fn untag_key(
        &self,
        request: Request<UntagKeyRequest>,
    ) -> Result<Response<KeyMetadata>, Status> {
        let call = call_of(&request, Operation::UntagKey);
        let req = request.into_inner();
        let names = req
            .tag_keys
            .into_iter()
            .map(|k| (k, String::new()))
            .collect();
        metadata(self.ops.tag_key(call, req.key_id, names, true).await)
    }

    #[instrument(level = "debug", skip_all)]
    async fn create_key(
        &self,
        request: Request<CreateKeyRequest>,
    ) -> Result<Response<KeyMetadata>, Status> {
        let call = call_of(&request, Operation::CreateKey);
        let req = request.into_inner();
        let origin = match proto::KeyOrigin::try_from(req.origin) {
            Ok(proto::KeyOrigin::Unspecified | proto::KeyOrigin::Hsm) => KeyOrigin::Hsm,
            Ok(proto::KeyOrigin::External) => KeyOrigin::External,
            Err(_) => return Err(status(crate::Error::invalid("unknown origin"))),
        };
        metadata(
            self.ops
                .create_key_with_policy(
                    call,
                    req.description,
                    req.alias,
                    Default::default(),
                    origin,
                    (!req.policy.is_empty()).then_some(req.policy),
                    req.bypass_lockout_check,
                )
                .await,
        )
    }

    #[instrument(level = "debug", skip_all)]
    async fn get_key_policy(
        &self,
        request: Request<GetKeyPolicyRequest>,
    ) -> Result<Response<GetKeyPolicyResponse>, Status> {
        let call = call_of(&request, Operation::GetKeyPolicy);
        let req = request.into_inner();
        let policy = self
            .ops
            .get_key_policy(call, req.key_id, req.policy_name)
            .await
            .map_err(status)?;
        Ok(Response::new(GetKeyPolicyResponse {
            policy,
            policy_name: POLICY_NAME.to_owned(),
        }))
    }

    #[instrument(level = "debug", skip_all)]
    async fn put_key_policy(
        &self,
        request: Request<PutKeyPolicyRequest>,
    ) -> Result<Response<KeyMetadata>, Status> {
        let call = call_of(&request, Operation::PutKeyPolicy);
        let req = request.into_inner();
        metadata(
            self.ops
                .put_key_policy(
                    call,
                    req.key_id,
                    req.policy_name,
                    req.policy,
                    req.bypass_lockout_check,
                )
                .await,
        )
    }

    #[instrument(level = "debug", skip_all)]
    async fn list_key_policies(
        &self,
        request: Request<KeyRef>,
    ) -> Result<Response<ListKeyPoliciesResponse>, Status> {
        let call = call_of(&request, Operation::ListKeyPolicies);
        let policy_names = self
            .ops
            .list_key_policies(call, request.into_inner().key_id)
            .await
            .map_err(status)?;
        Ok(Response::new(ListKeyPoliciesResponse { policy_names }))
    }

    #[instrument(level = "debug", skip_all)]
    async fn create_grant(
        &self,
        request: Request<CreateGrantRequest>,
    ) -> Result<Response<CreateGrantResponse>, Status> {
        let call = call_of(&request, Operation::CreateGrant);
        let new = match grants::new_grant(request.into_inner()) {
            Ok(new) => new,
            Err(err) => return Err(status(self.ops.reject(call, err).await)),
        };
        let created = self.ops.create_grant(call, new).await.map_err(status)?;
        Ok(Response::new(CreateGrantResponse {
            grant_id: created.grant_id,
            grant_token: created.token,
        }))
    }

    #[instrument(level = "debug", skip_all)]
    async fn list_grants(
        &self,
        request: Request<ListGrantsRequest>,
    ) -> Result<Response<ListGrantsResponse>, Status> {
        let call = call_of(&request, Operation::ListGrants);
        let req = request.into_inner();
        let position = match grants::page_position(req.page_size, &req.page_token) {
            Ok(position) => position,
            Err(err) => return Err(status(self.ops.reject(call, err).await)),
        };
        let nonempty = |s: String| (!s.is_empty()).then_some(s);
        let (key_id, found) = self
            .ops
            .list_grants(
                call,
                req.key_id,
                nonempty(req.grant_id),
                nonempty(req.grantee_principal),
            )
            .await
            .map_err(status)?;
        let messages = found
            .iter()
            .map(|grant| grants::grant_message(&key_id, grant))
            .collect();
        Ok(Response::new(grants::page(messages, position)))
    }

    #[instrument(level = "debug", skip_all)]
    async fn list_retirable_grants(
        &self,
        request: Request<ListRetirableGrantsRequest>,
    ) -> Result<Response<ListGrantsResponse>, Status> {
        let call = call_of(&request, Operation::ListRetirableGrants);
        let req = request.into_inner();
        let position = match grants::page_position(req.page_size, &req.page_token) {
            Ok(position) => position,
            Err(err) => return Err(status(self.ops.reject(call, err).await)),
        };
        let found = self
            .ops
            .list_retirable_grants(call, req.retiring_principal)
            .await
            .map_err(status)?;
        let messages = found
            .iter()
            .map(|g| grants::grant_message(&g.key_id, &g.grant))
            .collect();
        Ok(Response::new(grants::page(messages, position)))
    }

    #[instrument(level = "debug", skip_all)]
    async fn retire_grant(
        &self,
        request: Request<RetireGrantRequest>,
    ) -> Result<Response<RetireGrantResponse>, Status> {
        let call = call_of(&request, Operation::RetireGrant);
        let which = match grants::retired_grant(request.into_inner()) {
            Ok(which) => which,
            Err(err) => return Err(status(self.ops.reject(call, err).await)),
        };
        self.ops.retire_grant(call, which).await.map_err(status)?;
        Ok(Response::new(RetireGrantResponse {}))
    }

    #[instrument(level = "debug", skip_all)]
    async fn revoke_grant(
        &self,
        request: Request<RevokeGrantRequest>,
    ) -> Result<Response<RetireGrantResponse>, Status> {
        let call = call_of(&request, Operation::RevokeGrant);
        let req = request.into_inner();
        self.ops
            .revoke_grant(call, req.key_id, req.grant_id)
            .await
            .map_err(status)?;
        Ok(Response::new(RetireGrantResponse {}))
    }

    #[instrument(level = "debug", skip_all)]
    async fn describe_key(
        &self,
        request: Request<KeyRef>,
    ) -> Result<Response<KeyMetadata>, Status> {
        let call = call_of(&request, Operation::DescribeKey);
        metadata(
            self.ops
                .describe_key_with_usage(call, request.into_inner().key_id)
                .await,
        )
    }

    #[instrument(level = "debug", skip_all)]
    async fn list_keys(
        &self,
        request: Request<ListKeysRequest>,
    ) -> Result<Response<ListKeysResponse>, Status> {
        let call = call_of(&request, Operation::ListKeys);
        let req = request.into_inner();
        let page = self
            .ops
            .list_keys(call, req.page_size, req.page_token)
            .await
            .map_err(status)?;
        Ok(Response::new(ListKeysResponse {
            keys: page.items.iter().map(key_metadata).collect(),
            next_page_token: page.next_page_token,
        }))
    }

    #[instrument(level = "debug", skip_all)]
    async fn rotate_key(&self, request: Request<KeyRef>) -> Result<Response<KeyMetadata>, Status> {
        let call = call_of(&request, Operation::RotateKey);
        metadata(self.ops.rotate_key(call, request.into_inner().key_id).await)
    }

    #[instrument(level = "debug", skip_all)]
    async fn enable_key(&self, request: Request<KeyRef>) -> Result<Response<KeyMetadata>, Status> {
        let call = call_of(&request, Operation::EnableKey);
        metadata(self.ops.enable_key(call, request.into_inner().key_id).await)
    }

    #[instrument(level = "debug", skip_all)]
    async fn disable_key(&self, request: Request<KeyRef>) -> Result<Response<KeyMetadata>, Status> {
        let call = call_of(&request, Operation::DisableKey);
        metadata(
            self.ops
                .disable_key(call, request.into_inner().key_id)
                .await,
        )
    }

    #[instrument(level = "debug", skip_all)]
    async fn schedule_key_deletion(
        &self,
        request: Request<ScheduleKeyDeletionRequest>,
    ) -> Result<Response<KeyMetadata>, Status> {
        let call = call_of(&request, Operation::ScheduleKeyDeletion);
        let req = request.into_inner();
        metadata(
            self.ops
                .schedule_key_deletion(call, req.key_id, req.pending_window_days)
                .await,
        )
    }

    #[instrument(level = "debug", skip_all)]
    async fn cancel_key_deletion(
        &self,
        request: Request<KeyRef>,
    ) -> Result<Response<KeyMetadata>, Status> {
        let call = call_of(&request, Operation::CancelKeyDeletion);
        metadata(
            self.ops
                .cancel_key_deletion(call, request.into_inner().key_id)
                .await,
        )
    }

    #[instrument(level = "debug", skip_all)]
    async fn create_alias(
        &self,
        request: Request<AliasRequest>,
    ) -> Result<Response<Alias>, Status> {
        let call = call_of(&request, Operation::CreateAlias);
        let req = request.into_inner();
        alias(
            self.ops
                .create_alias(call, req.alias_name, req.key_id)
                .await,
        )
    }

    #[instrument(level = "debug", skip_all)]
    async fn update_alias(
        &self,
        request: Request<AliasRequest>,
    ) -> Result<Response<Alias>, Status> {
        let call = call_of(&request, Operation::UpdateAlias);
        let req = request.into_inner();
        alias(
            self.ops
                .update_alias(call, req.alias_name, req.key_id)
                .await,
        )
    }

    #[instrument(level = "debug", skip_all)]
    async fn delete_alias(
        &self,
        request: Request<AliasRequest>,
    ) -> Result<Response<Alias>, Status> {
        let call = call_of(&request, Operation::DeleteAlias);
        alias(
            self.ops
                .delete_alias(call, request.into_inner().alias_name)
                .await,
        )
    }

    #[instrument(level = "debug", skip_all)]
    async fn list_aliases(
        &self,
        request: Request<ListAliasesRequest>,
    ) -> Result<Response<ListAliasesResponse>, Status> {
        let call = call_of(&request, Operation::ListAliases);
        let req = request.into_inner();
        let page = self
            .ops
            .list_aliases(call, req.key_id, req.page_size, req.page_token)
            .await
            .map_err(status)?;
        Ok(Response::new(ListAliasesResponse {
            aliases: page.items.into_iter().map(alias_message).collect(),
            next_page_token: page.next_page_token,
        }))
    }
}
