//! The AWS KMS-compatible JSON API (docs/DESIGN.md §9): a second front end of the same
//! daemon, so that the AWS CLI, the AWS SDKs, the Encryption SDK's KMS keyrings and the S3
//! Encryption Client reach wrapd with a change of endpoint and credentials.
//!
//! `POST /` with `X-Amz-Target: TrentService.<Operation>` and a JSON body
//! (`application/x-amz-json-1.1`), signed with SigV4 (`sigv4.rs`). Each request becomes a
//! [`Call`] of the operation layer, like a gRPC call: the same identity → policy → audit
//! gate (one audit line per request, transport `aws-kms`, with the access key id and the
//! KMS operation name), the same key store, the same blobs: a `CiphertextBlob` is a wrapd
//! blob, so a blob made through either API unwraps through the other.
//!
//! KMS operations and the wrapd policy operations they need:
//!
//! | KMS | wrapd policy operation |
//! |---|---|
//! | `GenerateDataKey` | `GenerateDataKey` |
//! | `GenerateDataKeyWithoutPlaintext` | `GenerateDataKeyWithoutPlaintext` |
//! | `Encrypt` | `Wrap` |
//! | `Decrypt` | `Unwrap` |
//! | `ReEncrypt` | `ReWrapFrom` on the source key and `ReWrapTo` on the destination |
//! | `GenerateRandom` | `GenerateRandom` (names no key: a grant needs `keys = ["*"]`) |
//! | `CreateKey`, `DescribeKey`, `ListKeys`, `EnableKey`, `DisableKey`, `ScheduleKeyDeletion`, `CancelKeyDeletion`, `CreateAlias`, `UpdateAlias`, `DeleteAlias`, `ListAliases` | the same name |
//! | `RotateKeyOnDemand` | `RotateKey` |
//! | `EnableKeyRotation`, `DisableKeyRotation` | the same names |
//! | `TagResource` / `UntagResource` | `TagKey` / `UntagKey` |
//! | `ListKeyRotations`, `GetKeyRotationStatus`, `ListResourceTags` | `DescribeKey` |
//! | `GetParametersForImport`, `ImportKeyMaterial`, `DeleteImportedKeyMaterial` | the same names |
//!
//! What wrapd does not offer is refused, never ignored: key policies (`Policy`: the policy
//! file decides), other key specs and usages than `SYMMETRIC_DEFAULT` / `ENCRYPT_DECRYPT`,
//! multi-Region keys, custom key stores, `DryRun`, Nitro `Recipient`s, and the operations not
//! in the table (`UnsupportedOperationException`). `GrantTokens` are accepted and unused:
//! wrapd has no grants. Data keys are 1 to 64 bytes (AWS allows 1,024), so that a blob
//! stays under 1 KiB.
//!
//! Files: `arn.rs` (key names), `sigv4.rs` (authentication), `model.rs` (request bodies),
//! `error.rs` (error types and HTTP statuses). The HTTP listener is `server/http.rs`.

pub mod arn;
pub mod error;
pub mod model;
pub mod sigv4;

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::{SystemTime, UNIX_EPOCH};

use base64::Engine;
use base64::engine::general_purpose::STANDARD;
use bytes::Bytes;
use http::{Method, Request, Response, StatusCode};
use rand::RngCore;
use serde_json::{Value, json};
use zeroize::Zeroizing;

pub use arn::Arns;
pub use error::AwsError;
pub use sigv4::AccessKeys;

use crate::auth::{Operation, Refusal, Transport, aws_identity};
use crate::config::AwsConfig;
use crate::error::Error;
use crate::hsm::ImportAlgorithm;
use crate::keystore::{KeyOrigin, KeyState, MAX_PAGE_SIZE};
use crate::ops::{Call, KeyView, Ops};
use error::json_response;

/// The `X-Amz-Target` prefix of AWS KMS.
pub const TARGET_PREFIX: &str = "TrentService.";

/// Largest request body read (the largest valid one, ReEncrypt with two large contexts, is
/// far smaller).
pub const MAX_BODY: usize = 256 * 1024;

/// The encryption algorithm of every wrapd key.
const SYMMETRIC_DEFAULT: &str = "SYMMETRIC_DEFAULT";

/// The AWS KMS API over the operation layer.
pub struct AwsApi {
    ops: Ops,
    arns: Arns,
    keys: Arc<AccessKeys>,
}

/// What a handler returns: a JSON body, or an error.
type Answer = Result<Value, AwsError>;

impl AwsApi {
    /// The API for `config`'s region, account and access keys.
    pub fn new(ops: Ops, config: &AwsConfig) -> Self {
        Self {
            ops,
            arns: Arns::new(&config.region, &config.account),
            keys: Arc::new(AccessKeys::new(config.access_keys.iter().cloned())),
        }
    }

    /// Answers one HTTP request whose body has been read (at most [`MAX_BODY`] bytes).
    pub async fn handle(
        &self,
        request: Request<Bytes>,
        remote: Option<SocketAddr>,
    ) -> Response<Bytes> {
        let request_id = request_id();
        let (parts, body) = request.into_parts();
        let target = parts
            .headers
            .get("x-amz-target")
            .and_then(|v| v.to_str().ok())
            .and_then(|t| t.strip_prefix(TARGET_PREFIX))
            .map(str::to_owned);
        if parts.method != Method::POST || parts.uri.path() != "/" {
            return AwsError::new(
                "UnknownOperationException",
                StatusCode::BAD_REQUEST,
                "the AWS KMS API is POST / with X-Amz-Target: TrentService.<Operation>",
            )
            .response(&request_id);
        }
        let Some(target) = target else {
            return AwsError::new(
                "UnknownOperationException",
                StatusCode::BAD_REQUEST,
                "missing or foreign X-Amz-Target: expected TrentService.<Operation>",
            )
            .response(&request_id);
        };
        let operation = policy_operation(&target);
        let api_name = format!("{TARGET_PREFIX}{target}");

        let verified = sigv4::verify(
            &self.keys,
            self.arns.region(),
            self.arns.account(),
            &parts,
            body.clone(),
            chrono::Utc::now(),
        )
        .await;
        let access_key = match verified {
            Ok(access_key) => access_key,
            Err(failure) => {
                // At debug: callers without credentials must not grow the daemon's log (the
                // audit log has the refusal, within its budget, and the metrics count it).
                tracing::debug!(remote = ?remote, code = failure.error.code, access_key = ?failure.claimed_key,
                    "AWS KMS API: signature refused");
                if let Some(op) = operation {
                    let refusal = Refusal {
                        reason: failure.error.message.clone(),
                        transport: Some(Transport::AwsKms),
                        peer: remote.map_or_else(|| "?".to_owned(), |a| a.to_string()),
                        access_key: failure.claimed_key.clone(),
                    };
                    let call = Call::new(Err(refusal), op, Some(&request_id), None)
                        .with_api_operation(&api_name);
                    // The line is written; if it cannot be, the answer is still a refusal.
                    let _ = self
                        .ops
                        .reject(call, Error::Unauthenticated(failure.error.message.clone()))
                        .await;
                }
                return failure.error.response(&request_id);
            }
        };
        let principal = self.keys.get(&access_key).and_then(|k| k.principal.clone());
        let identity = aws_identity(&access_key, principal.as_deref(), remote);
        let Some(operation) = operation else {
            let name = arn::truncate(&target);
            let message = format!("wrapd does not implement the AWS KMS operation {name}");
            let err = self
                .ops
                .reject_unsupported(
                    identity,
                    request_id.clone(),
                    format!("{TARGET_PREFIX}{name}"),
                    message,
                )
                .await;
            return AwsError::from_error(&err).response(&request_id);
        };
        let call = Call::new(Ok(identity), operation, Some(&request_id), None)
            .with_api_operation(&api_name);
        match self.dispatch(&target, call, &body).await {
            Ok(value) => {
                let body = Zeroizing::new(value.to_string());
                json_response(StatusCode::OK, body.as_bytes().to_vec(), &request_id)
            }
            Err(err) => err.response(&request_id),
        }
    }

    async fn dispatch(&self, target: &str, call: Call, body: &[u8]) -> Answer {
        match target {
            "CreateKey" => self.create_key(call, body).await,
            "DescribeKey" => self.describe_key(call, body).await,
            "ListKeys" => self.list_keys(call, body).await,
            "EnableKey" => self.enable_or_disable(call, body, true).await,
            "DisableKey" => self.enable_or_disable(call, body, false).await,
            "CancelKeyDeletion" => self.cancel_key_deletion(call, body).await,
            "ScheduleKeyDeletion" => self.schedule_key_deletion(call, body).await,
            "RotateKeyOnDemand" => self.rotate_key_on_demand(call, body).await,
            "ListKeyRotations" => self.list_key_rotations(call, body).await,
            "GetKeyRotationStatus" => self.get_key_rotation_status(call, body).await,
            "EnableKeyRotation" => self.set_key_rotation(call, body, true).await,
            "DisableKeyRotation" => self.set_key_rotation(call, body, false).await,
            "TagResource" => self.tag_resource(call, body).await,
            "UntagResource" => self.untag_resource(call, body).await,
            "ListResourceTags" => self.list_resource_tags(call, body).await,
            "CreateAlias" => self.point_alias(call, body, false).await,
            "UpdateAlias" => self.point_alias(call, body, true).await,
            "DeleteAlias" => self.delete_alias(call, body).await,
            "ListAliases" => self.list_aliases(call, body).await,
            "GenerateDataKey" | "GenerateDataKeyWithoutPlaintext" => {
                self.generate_data_key(call, body, target == "GenerateDataKey")
                    .await
            }
            "Encrypt" => self.encrypt(call, body).await,
            "Decrypt" => self.decrypt(call, body).await,
            "ReEncrypt" => self.re_encrypt(call, body).await,
            "GenerateRandom" => self.generate_random(call, body).await,
            "GetParametersForImport" => self.get_parameters_for_import(call, body).await,
            "ImportKeyMaterial" => self.import_key_material(call, body).await,
            "DeleteImportedKeyMaterial" => self.delete_imported_key_material(call, body).await,
            other => Err(self
                .reject(
                    call,
                    AwsError::unsupported(format!(
                        "wrapd does not implement the AWS KMS operation {other} yet"
                    )),
                )
                .await),
        }
    }

    /// Audits a request refused by this front end (malformed body, a parameter value
    /// wrapd does not offer), and returns the answer: `err`, or what the gate says first
    /// (denied, audit log unwritable).
    async fn reject(&self, call: Call, err: AwsError) -> AwsError {
        let outcome = match err.code {
            "NotFoundException" => Error::KeyNotFound(err.message.clone()),
            _ => Error::InvalidArgument(err.message.clone()),
        };
        let gate = self.ops.reject(call, outcome).await;
        match gate.kind() {
            crate::error::ErrorKind::NotFound | crate::error::ErrorKind::InvalidArgument => err,
            _ => AwsError::from_error(&gate),
        }
    }

    /// Parses the body; a bad one is rejected (and audited).
    async fn parse<'a, T: serde::Deserialize<'a>>(
        &self,
        call: Call,
        body: &'a [u8],
    ) -> Result<(Call, T), AwsError> {
        match model::parse::<T>(body) {
            Ok(request) => Ok((call, request)),
            Err(err) => Err(self.reject(call, err).await),
        }
    }

    /// A `KeyId` parameter in wrapd's form; a bad one is rejected (and audited).
    async fn key_param(&self, call: Call, param: &str) -> Result<(Call, String), AwsError> {
        match self.arns.key_ref(param) {
            Ok(key) => Ok((call, key)),
            Err(err) => Err(self.reject(call, err).await),
        }
    }

    /// An optional `KeyId` parameter in wrapd's form (empty when absent).
    async fn optional_key_param(
        &self,
        call: Call,
        param: Option<&str>,
    ) -> Result<(Call, String), AwsError> {
        match param {
            Some(param) => self.key_param(call, param).await,
            None => Ok((call, String::new())),
        }
    }

    /// Checks a parameter wrapd does not offer; a bad one is rejected (and audited).
    async fn check(&self, call: Call, refusal: Option<AwsError>) -> Result<Call, AwsError> {
        match refusal {
            None => Ok(call),
            Some(err) => Err(self.reject(call, err).await),
        }
    }

    // ---- keys -----------------------------------------------------------------------------

    /// `KeyMetadata` as AWS KMS returns it.
    fn key_metadata(&self, view: &KeyView) -> Value {
        let key = &view.key;
        let mut metadata = json!({
            "AWSAccountId": self.arns.account(),
            "KeyId": arn::bare_id(&key.id),
            "Arn": self.arns.key_arn(&key.id),
            "CreationDate": epoch(key.created_at),
            "Enabled": key.state == KeyState::Enabled,
            "Description": key.description,
            "KeyUsage": "ENCRYPT_DECRYPT",
            "KeyState": key_state(key.state),
            "Origin": match key.origin {
                KeyOrigin::Hsm => "AWS_KMS",
                KeyOrigin::External => "EXTERNAL",
            },
            "KeyManager": "CUSTOMER",
            "CustomerMasterKeySpec": SYMMETRIC_DEFAULT,
            "KeySpec": SYMMETRIC_DEFAULT,
            "EncryptionAlgorithms": [SYMMETRIC_DEFAULT],
            "MultiRegion": false,
        });
        if let Some(date) = key.deletion_date {
            metadata["DeletionDate"] = json!(epoch(date));
        }
        if key.origin == KeyOrigin::External {
            let valid_to = key.material.and_then(|m| m.valid_to);
            metadata["ExpirationModel"] = json!(if valid_to.is_some() {
                "KEY_MATERIAL_EXPIRES"
            } else {
                "KEY_MATERIAL_DOES_NOT_EXPIRE"
            });
            if let Some(valid_to) = valid_to {
                metadata["ValidTo"] = json!(epoch(valid_to));
            }
        }
        metadata
    }

    async fn create_key(&self, call: Call, body: &[u8]) -> Answer {
        let (call, req) = self.parse::<model::CreateKey>(call, body).await?;
        let refusal = create_key_refusal(&req);
        let call = self.check(call, refusal).await?;
        let tags = tag_map(req.tags.unwrap_or_default());
        let origin = match req.origin.as_deref() {
            Some("EXTERNAL") => KeyOrigin::External,
            _ => KeyOrigin::Hsm,
        };
        let view = self
            .ops
            .create_key(
                call,
                req.description.unwrap_or_default(),
                String::new(),
                tags,
                origin,
            )
            .await?;
        Ok(json!({ "KeyMetadata": self.key_metadata(&view) }))
    }

    async fn describe_key(&self, call: Call, body: &[u8]) -> Answer {
        let (call, req) = self.parse::<model::KeyOnly>(call, body).await?;
        let (call, key) = self.key_param(call, &req.key_id).await?;
        let view = self.ops.describe_key(call, key).await?;
        Ok(json!({ "KeyMetadata": self.key_metadata(&view) }))
    }

    async fn enable_or_disable(&self, call: Call, body: &[u8], enable: bool) -> Answer {
        let (call, req) = self.parse::<model::KeyOnly>(call, body).await?;
        let (call, key) = self.key_param(call, &req.key_id).await?;
        if enable {
            self.ops.enable_key(call, key).await?;
        } else {
            self.ops.disable_key(call, key).await?;
        }
        Ok(json!({}))
    }

    async fn cancel_key_deletion(&self, call: Call, body: &[u8]) -> Answer {
        let (call, req) = self.parse::<model::KeyOnly>(call, body).await?;
        let (call, key) = self.key_param(call, &req.key_id).await?;
        let view = self.ops.cancel_key_deletion(call, key).await?;
        Ok(json!({ "KeyId": self.arns.key_arn(&view.key.id) }))
    }

    async fn schedule_key_deletion(&self, call: Call, body: &[u8]) -> Answer {
        let (call, req) = self.parse::<model::ScheduleKeyDeletion>(call, body).await?;
        let days = req.pending_window_in_days.unwrap_or(30);
        let refusal = (!(7..=30).contains(&days))
            .then(|| AwsError::validation("PendingWindowInDays must be 7 to 30"));
        let call = self.check(call, refusal).await?;
        let (call, key) = self.key_param(call, &req.key_id).await?;
        let view = self.ops.schedule_key_deletion(call, key, days).await?;
        Ok(json!({
            "KeyId": self.arns.key_arn(&view.key.id),
            "DeletionDate": view.key.deletion_date.map(epoch),
            "KeyState": key_state(view.key.state),
            "PendingWindowInDays": days,
        }))
    }

    async fn get_parameters_for_import(&self, call: Call, body: &[u8]) -> Answer {
        let (call, req) = self
            .parse::<model::GetParametersForImport>(call, body)
            .await?;
        let (call, key) = self.key_param(call, &req.key_id).await?;
        let bits = match req.wrapping_key_spec.as_str() {
            "RSA_3072" => Some(3072),
            "RSA_4096" => Some(4096),
            _ => None,
        };
        let (algorithm, bits) = match (ImportAlgorithm::parse(&req.wrapping_algorithm), bits) {
            (Some(algorithm), Some(bits)) => (algorithm, bits),
            (None, _) => {
                let err = AwsError::unsupported(
                    "WrappingAlgorithm: wrapd offers RSAES_OAEP_SHA_1, RSAES_OAEP_SHA_256, RSA_AES_KEY_WRAP_SHA_1 and RSA_AES_KEY_WRAP_SHA_256",
                );
                return Err(self.reject(call, err).await);
            }
            (_, None) => {
                let err =
                    AwsError::unsupported("WrappingKeySpec: wrapd offers RSA_3072 and RSA_4096");
                return Err(self.reject(call, err).await);
            }
        };
        let parameters = self
            .ops
            .get_parameters_for_import(call, key, algorithm, bits)
            .await?;
        Ok(json!({
            "KeyId": self.arns.key_arn(&parameters.key_id),
            "ImportToken": STANDARD.encode(&parameters.import_token),
            "PublicKey": STANDARD.encode(&parameters.public_key),
            "ParametersValidTo": epoch(parameters.valid_to),
        }))
    }

    async fn import_key_material(&self, call: Call, body: &[u8]) -> Answer {
        let (call, req) = self.parse::<model::ImportKeyMaterial>(call, body).await?;
        let (call, key) = self.key_param(call, &req.key_id).await?;
        let (token, material, valid_to) = match import_members(&req) {
            Ok(parsed) => parsed,
            Err(err) => return Err(self.reject(call, err).await),
        };
        self.ops
            .import_key_material(call, key, token, material, valid_to)
            .await?;
        Ok(json!({}))
    }

    async fn delete_imported_key_material(&self, call: Call, body: &[u8]) -> Answer {
        let (call, req) = self
            .parse::<model::DeleteImportedKeyMaterial>(call, body)
            .await?;
        let (call, key) = self.key_param(call, &req.key_id).await?;
        let refusal = req
            .key_material_id
            .is_some()
            .then(|| AwsError::unsupported("KeyMaterialId: wrapd keeps one key material per key"));
        let call = self.check(call, refusal).await?;
        self.ops.delete_imported_key_material(call, key).await?;
        Ok(json!({}))
    }

    async fn rotate_key_on_demand(&self, call: Call, body: &[u8]) -> Answer {
        let (call, req) = self.parse::<model::KeyOnly>(call, body).await?;
        let (call, key) = self.key_param(call, &req.key_id).await?;
        let view = self.ops.rotate_key(call, key).await?;
        Ok(json!({ "KeyId": self.arns.key_arn(&view.key.id) }))
    }

    async fn list_key_rotations(&self, call: Call, body: &[u8]) -> Answer {
        let (call, req) = self.parse::<model::ListOfKey>(call, body).await?;
        let (limit, start) = match list_position(req.limit, req.marker.as_deref()) {
            Ok(position) => position,
            Err(err) => return Err(self.reject(call, err).await),
        };
        let (call, key) = self.key_param(call, &req.key_id).await?;
        let view = self.ops.describe_key(call, key).await?;
        let arn = self.arns.key_arn(&view.key.id);
        // Every version after the first is a rotation: on the key's schedule (or at a
        // version's wrap limit), or asked for.
        let rotations: Vec<Value> = view
            .versions
            .iter()
            .skip(1)
            .map(|v| {
                json!({
                    "KeyId": arn,
                    "RotationDate": epoch(v.created_at),
                    "RotationType": if v.automatic { "AUTOMATIC" } else { "ON_DEMAND" },
                })
            })
            .collect();
        page(rotations, start, limit, "Rotations")
    }

    async fn get_key_rotation_status(&self, call: Call, body: &[u8]) -> Answer {
        let (call, req) = self.parse::<model::KeyOnly>(call, body).await?;
        let (call, key) = self.key_param(call, &req.key_id).await?;
        let view = self.ops.describe_key(call, key).await?;
        let mut answer = json!({
            "KeyId": self.arns.key_arn(&view.key.id),
            "KeyRotationEnabled": view.key.rotation.is_some(),
        });
        if let Some(rotation) = view.key.rotation {
            answer["RotationPeriodInDays"] = json!(rotation.period_days);
            answer["NextRotationDate"] = json!(epoch(rotation.next));
        }
        Ok(answer)
    }

    async fn set_key_rotation(&self, call: Call, body: &[u8], enable: bool) -> Answer {
        let (call, key_id, period) = if enable {
            let (call, req) = self.parse::<model::EnableKeyRotation>(call, body).await?;
            let period = req
                .rotation_period_in_days
                .unwrap_or(crate::ops::DEFAULT_ROTATION_DAYS);
            (call, req.key_id, Some(period))
        } else {
            let (call, req) = self.parse::<model::KeyOnly>(call, body).await?;
            (call, req.key_id, None)
        };
        let (call, key) = self.key_param(call, &key_id).await?;
        self.ops.set_key_rotation(call, key, period).await?;
        Ok(json!({}))
    }

    async fn tag_resource(&self, call: Call, body: &[u8]) -> Answer {
        let (call, req) = self.parse::<model::TagResource>(call, body).await?;
        let (call, key) = self.key_param(call, &req.key_id).await?;
        self.ops
            .tag_key(call, key, tag_map(req.tags), false)
            .await?;
        Ok(json!({}))
    }

    async fn untag_resource(&self, call: Call, body: &[u8]) -> Answer {
        let (call, req) = self.parse::<model::UntagResource>(call, body).await?;
        let (call, key) = self.key_param(call, &req.key_id).await?;
        let names = req
            .tag_keys
            .into_iter()
            .map(|k| (k, String::new()))
            .collect();
        self.ops.tag_key(call, key, names, true).await?;
        Ok(json!({}))
    }

    async fn list_resource_tags(&self, call: Call, body: &[u8]) -> Answer {
        let (call, req) = self.parse::<model::ListOfKey>(call, body).await?;
        let (limit, start) = match list_position(req.limit, req.marker.as_deref()) {
            Ok(position) => position,
            Err(err) => return Err(self.reject(call, err).await),
        };
        let (call, key) = self.key_param(call, &req.key_id).await?;
        let view = self.ops.describe_key(call, key).await?;
        let tags: Vec<Value> = view
            .key
            .tags
            .iter()
            .map(|(k, v)| json!({ "TagKey": k, "TagValue": v }))
            .collect();
        page(tags, start, limit, "Tags")
    }

    async fn list_keys(&self, call: Call, body: &[u8]) -> Answer {
        let (call, req) = self.parse::<model::ListKeys>(call, body).await?;
        let limit = match limit(req.limit) {
            Ok(limit) => limit,
            Err(err) => return Err(self.reject(call, err).await),
        };
        let page = self
            .ops
            .list_keys(call, limit as u32, req.marker.unwrap_or_default())
            .await?;
        let keys: Vec<Value> = page
            .items
            .iter()
            .map(|view| {
                json!({
                    "KeyId": arn::bare_id(&view.key.id),
                    "KeyArn": self.arns.key_arn(&view.key.id),
                })
            })
            .collect();
        Ok(listing("Keys", keys, page.next_page_token))
    }

    // ---- aliases --------------------------------------------------------------------------

    async fn point_alias(&self, call: Call, body: &[u8], update: bool) -> Answer {
        let (call, req) = self.parse::<model::PointAlias>(call, body).await?;
        let (call, key) = self.key_param(call, &req.target_key_id).await?;
        if update {
            self.ops.update_alias(call, req.alias_name, key).await?;
        } else {
            self.ops.create_alias(call, req.alias_name, key).await?;
        }
        Ok(json!({}))
    }

    async fn delete_alias(&self, call: Call, body: &[u8]) -> Answer {
        let (call, req) = self.parse::<model::DeleteAlias>(call, body).await?;
        self.ops.delete_alias(call, req.alias_name).await?;
        Ok(json!({}))
    }

    async fn list_aliases(&self, call: Call, body: &[u8]) -> Answer {
        let (call, req) = self.parse::<model::ListAliases>(call, body).await?;
        let limit = match limit(req.limit) {
            Ok(limit) => limit,
            Err(err) => return Err(self.reject(call, err).await),
        };
        let (call, key) = self.optional_key_param(call, req.key_id.as_deref()).await?;
        let page = self
            .ops
            .list_aliases(call, key, limit as u32, req.marker.unwrap_or_default())
            .await?;
        let aliases: Vec<Value> = page
            .items
            .iter()
            .map(|(alias, key)| {
                json!({
                    "AliasName": alias.as_str(),
                    "AliasArn": self.arns.alias_arn(alias),
                    "TargetKeyId": arn::bare_id(key),
                })
            })
            .collect();
        Ok(listing("Aliases", aliases, page.next_page_token))
    }

    // ---- data plane -----------------------------------------------------------------------

    async fn generate_data_key(&self, call: Call, body: &[u8], with_plaintext: bool) -> Answer {
        let (call, req) = self.parse::<model::GenerateDataKey>(call, body).await?;
        let bytes = match (req.number_of_bytes, req.key_spec.as_deref()) {
            (Some(n), None) => Ok(n),
            (None, Some("AES_256")) => Ok(32),
            (None, Some("AES_128")) => Ok(16),
            (None, Some(other)) => Err(AwsError::validation(format!(
                "KeySpec {} is not AES_256 or AES_128",
                arn::truncate(other)
            ))),
            (None, None) => Err(AwsError::validation(
                "Please specify either number of bytes or key spec.",
            )),
            (Some(_), Some(_)) => Err(AwsError::validation(
                "Please specify either number of bytes or key spec, not both.",
            )),
        };
        let bytes = match bytes {
            Ok(0) => Err(AwsError::validation("NumberOfBytes must be 1 to 64")),
            other => other,
        };
        let refusal = bytes
            .as_ref()
            .err()
            .cloned()
            .or_else(|| data_plane_refusal(req.dry_run, req.recipient.as_ref(), None));
        let call = self.check(call, refusal).await?;
        let (call, key) = self.key_param(call, &req.key_id).await?;
        let generated = self
            .ops
            .generate_data_key(
                call,
                key,
                req.encryption_context.unwrap_or_default(),
                bytes.unwrap_or(32),
            )
            .await?;
        let mut answer = json!({
            "CiphertextBlob": STANDARD.encode(&generated.wrapped.blob),
            "KeyId": self.arns.key_arn(&generated.wrapped.key_id),
        });
        if with_plaintext {
            let plaintext = Zeroizing::new(STANDARD.encode(&*generated.plaintext));
            answer["Plaintext"] = Value::String(plaintext.as_str().to_owned());
        }
        Ok(answer)
    }

    async fn encrypt(&self, call: Call, body: &[u8]) -> Answer {
        let (call, req) = self.parse::<model::Encrypt>(call, body).await?;
        let plaintext = req.plaintext.decode("Plaintext");
        let refusal =
            plaintext.as_ref().err().cloned().or_else(|| {
                data_plane_refusal(req.dry_run, None, req.encryption_algorithm.as_deref())
            });
        let call = self.check(call, refusal).await?;
        let (call, key) = self.key_param(call, &req.key_id).await?;
        let wrapped = self
            .ops
            .wrap(
                call,
                key,
                plaintext.unwrap_or_default(),
                req.encryption_context.unwrap_or_default(),
            )
            .await?;
        Ok(json!({
            "CiphertextBlob": STANDARD.encode(&wrapped.blob),
            "KeyId": self.arns.key_arn(&wrapped.key_id),
            "EncryptionAlgorithm": SYMMETRIC_DEFAULT,
        }))
    }

    async fn decrypt(&self, call: Call, body: &[u8]) -> Answer {
        let (call, req) = self.parse::<model::Decrypt>(call, body).await?;
        let blob = req.ciphertext_blob.decode("CiphertextBlob");
        let refusal = blob.as_ref().err().cloned().or_else(|| {
            data_plane_refusal(
                req.dry_run,
                req.recipient.as_ref(),
                req.encryption_algorithm.as_deref(),
            )
        });
        let call = self.check(call, refusal).await?;
        let (call, key) = self.optional_key_param(call, req.key_id.as_deref()).await?;
        let unwrapped = self
            .ops
            .unwrap(
                call,
                blob.unwrap_or_default(),
                req.encryption_context.unwrap_or_default(),
                key,
            )
            .await?;
        let plaintext = Zeroizing::new(STANDARD.encode(&*unwrapped.plaintext));
        Ok(json!({
            "KeyId": self.arns.key_arn(&unwrapped.key_id),
            "Plaintext": plaintext.as_str(),
            "EncryptionAlgorithm": SYMMETRIC_DEFAULT,
        }))
    }

    async fn re_encrypt(&self, call: Call, body: &[u8]) -> Answer {
        let (call, req) = self.parse::<model::ReEncrypt>(call, body).await?;
        let blob = req.ciphertext_blob.decode("CiphertextBlob");
        let refusal = blob
            .as_ref()
            .err()
            .cloned()
            .or_else(|| {
                data_plane_refusal(
                    req.dry_run,
                    None,
                    req.source_encryption_algorithm.as_deref(),
                )
            })
            .or_else(|| {
                data_plane_refusal(None, None, req.destination_encryption_algorithm.as_deref())
            });
        let call = self.check(call, refusal).await?;
        let (call, destination) = self.key_param(call, &req.destination_key_id).await?;
        let (call, source) = self
            .optional_key_param(call, req.source_key_id.as_deref())
            .await?;
        let rewrapped = self
            .ops
            .rewrap(
                call,
                blob.unwrap_or_default(),
                req.source_encryption_context.unwrap_or_default(),
                destination,
                req.destination_encryption_context.unwrap_or_default(),
                source,
            )
            .await?;
        Ok(json!({
            "CiphertextBlob": STANDARD.encode(&rewrapped.wrapped.blob),
            "SourceKeyId": self.arns.key_arn(&rewrapped.source_key_id),
            "KeyId": self.arns.key_arn(&rewrapped.wrapped.key_id),
            "SourceEncryptionAlgorithm": SYMMETRIC_DEFAULT,
            "DestinationEncryptionAlgorithm": SYMMETRIC_DEFAULT,
        }))
    }

    async fn generate_random(&self, call: Call, body: &[u8]) -> Answer {
        let (call, req) = self.parse::<model::GenerateRandom>(call, body).await?;
        let refusal = if req.custom_key_store_id.is_some() {
            Some(AwsError::unsupported("custom key stores are not supported"))
        } else {
            data_plane_refusal(None, req.recipient.as_ref(), None)
        };
        let call = self.check(call, refusal).await?;
        let Some(n) = req.number_of_bytes else {
            return Err(self
                .reject(call, AwsError::validation("NumberOfBytes is required"))
                .await);
        };
        let bytes = self.ops.generate_random(call, n).await?;
        let plaintext = Zeroizing::new(STANDARD.encode(&*bytes));
        Ok(json!({ "Plaintext": plaintext.as_str() }))
    }
}

/// The members of an `ImportKeyMaterial`: import token, encrypted material, expiry; or why
/// the request is refused.
#[allow(clippy::type_complexity)]
fn import_members(
    req: &model::ImportKeyMaterial,
) -> Result<(Vec<u8>, Vec<u8>, Option<SystemTime>), AwsError> {
    let token = req.import_token.decode("ImportToken")?;
    let material = req.encrypted_key_material.decode("EncryptedKeyMaterial")?;
    let valid_to = match req.valid_to {
        None => None,
        Some(t) if t.is_finite() && t > 0.0 && t < 1e11 => {
            Some(UNIX_EPOCH + std::time::Duration::from_secs_f64(t))
        }
        Some(_) => return Err(AwsError::validation("ValidTo is out of range")),
    };
    match (req.expiration_model.as_deref(), valid_to) {
        (None, _) | (Some("KEY_MATERIAL_EXPIRES"), Some(_)) => {}
        (Some("KEY_MATERIAL_DOES_NOT_EXPIRE"), None) => {}
        (Some("KEY_MATERIAL_EXPIRES"), None) => {
            return Err(AwsError::validation(
                "ValidTo is required when ExpirationModel is KEY_MATERIAL_EXPIRES",
            ));
        }
        (Some("KEY_MATERIAL_DOES_NOT_EXPIRE"), Some(_)) => {
            return Err(AwsError::validation(
                "ValidTo must be absent when ExpirationModel is KEY_MATERIAL_DOES_NOT_EXPIRE",
            ));
        }
        (Some(_), _) => return Err(AwsError::validation("ExpirationModel is not valid")),
    }
    match req.import_type.as_deref() {
        None | Some("EXISTING_KEY_MATERIAL") => {}
        Some("NEW_KEY_MATERIAL") => {
            return Err(AwsError::unsupported(
                "ImportType NEW_KEY_MATERIAL: keys with imported material are not rotated in wrapd; import into a new key",
            ));
        }
        Some(_) => return Err(AwsError::validation("ImportType is not valid")),
    }
    if req.key_material_description.is_some() || req.key_material_id.is_some() {
        return Err(AwsError::unsupported(
            "KeyMaterialDescription, KeyMaterialId: wrapd keeps one key material per key",
        ));
    }
    Ok((token, material, valid_to))
}

/// The wrapd policy operation of a KMS operation (the table in the module docs); `None` for
/// an operation wrapd does not implement.
pub fn policy_operation(target: &str) -> Option<Operation> {
    Some(match target {
        "CreateKey" => Operation::CreateKey,
        "DescribeKey" | "ListKeyRotations" | "GetKeyRotationStatus" | "ListResourceTags" => {
            Operation::DescribeKey
        }
        "EnableKeyRotation" => Operation::EnableKeyRotation,
        "DisableKeyRotation" => Operation::DisableKeyRotation,
        "TagResource" => Operation::TagKey,
        "UntagResource" => Operation::UntagKey,
        "ListKeys" => Operation::ListKeys,
        "EnableKey" => Operation::EnableKey,
        "DisableKey" => Operation::DisableKey,
        "ScheduleKeyDeletion" => Operation::ScheduleKeyDeletion,
        "CancelKeyDeletion" => Operation::CancelKeyDeletion,
        "RotateKeyOnDemand" => Operation::RotateKey,
        "CreateAlias" => Operation::CreateAlias,
        "UpdateAlias" => Operation::UpdateAlias,
        "DeleteAlias" => Operation::DeleteAlias,
        "ListAliases" => Operation::ListAliases,
        "GenerateDataKey" => Operation::GenerateDataKey,
        "GenerateDataKeyWithoutPlaintext" => Operation::GenerateDataKeyWithoutPlaintext,
        "Encrypt" => Operation::Wrap,
        "Decrypt" => Operation::Unwrap,
        "ReEncrypt" => Operation::ReWrap,
        "GenerateRandom" => Operation::GenerateRandom,
        "GetParametersForImport" => Operation::GetParametersForImport,
        "ImportKeyMaterial" => Operation::ImportKeyMaterial,
        "DeleteImportedKeyMaterial" => Operation::DeleteImportedKeyMaterial,
        _ => return None,
    })
}

/// Why a `CreateKey` asks for something wrapd does not offer, if it does.
fn create_key_refusal(req: &model::CreateKey) -> Option<AwsError> {
    let not = |what: &str| Some(AwsError::unsupported(what.to_owned()));
    if req.description.as_ref().is_some_and(|d| d.len() > 8192) {
        return Some(AwsError::validation(
            "Description is at most 8192 characters",
        ));
    }
    if req
        .key_usage
        .as_deref()
        .is_some_and(|u| u != "ENCRYPT_DECRYPT")
    {
        return not("KeyUsage: wrapd keys are ENCRYPT_DECRYPT");
    }
    for spec in [&req.key_spec, &req.customer_master_key_spec] {
        if spec.as_deref().is_some_and(|s| s != SYMMETRIC_DEFAULT) {
            return not("KeySpec: wrapd keys are SYMMETRIC_DEFAULT (AES-256-GCM in the HSM)");
        }
    }
    match req.origin.as_deref() {
        None | Some("AWS_KMS") => {}
        Some("EXTERNAL") => {}
        Some(_) => {
            return not(
                "Origin: wrapd keys are generated in its HSM (AWS_KMS) or imported (EXTERNAL)",
            );
        }
    }
    if req.policy.is_some() || req.bypass_policy_lockout_safety_check == Some(true) {
        return not(
            "Policy: key policies are not supported; wrapd's policy file decides who may use a key",
        );
    }
    if req.multi_region == Some(true) {
        return not("MultiRegion: wrapd keys live in one HSM cluster");
    }
    if req.custom_key_store_id.is_some() || req.xks_key_id.is_some() {
        return not("custom key stores are not supported");
    }
    None
}

/// Why a data-plane request asks for something wrapd does not offer, if it does.
fn data_plane_refusal(
    dry_run: Option<bool>,
    recipient: Option<&Value>,
    algorithm: Option<&str>,
) -> Option<AwsError> {
    if dry_run == Some(true) {
        return Some(AwsError::unsupported("DryRun is not supported"));
    }
    if recipient.is_some() {
        return Some(AwsError::unsupported(
            "Recipient (Nitro Enclaves attestation) is not supported",
        ));
    }
    if algorithm.is_some_and(|a| a != SYMMETRIC_DEFAULT) {
        return Some(AwsError::validation(
            "EncryptionAlgorithm must be SYMMETRIC_DEFAULT for a symmetric key",
        ));
    }
    None
}

/// A listing's `Limit` and the index its `Marker` names (in-memory listings).
fn list_position(
    limit_param: Option<u32>,
    marker: Option<&str>,
) -> Result<(usize, usize), AwsError> {
    let limit = limit(limit_param)?;
    let start = match marker.map(str::parse::<usize>) {
        None => 0,
        Some(Ok(start)) => start,
        Some(Err(_)) => return Err(AwsError::validation("invalid Marker")),
    };
    Ok((limit, start))
}

/// Tags as the API sends them, as a map (a repeated key: the last value wins).
fn tag_map(tags: Vec<model::Tag>) -> std::collections::BTreeMap<String, String> {
    tags.into_iter().map(|t| (t.tag_key, t.tag_value)).collect()
}

/// `Limit`: 1 to 1000, default 100.
fn limit(limit: Option<u32>) -> Result<usize, AwsError> {
    match limit {
        None => Ok(100),
        Some(n) if (1..=MAX_PAGE_SIZE).contains(&n) => Ok(n as usize),
        Some(_) => Err(AwsError::validation(format!(
            "Limit must be 1 to {MAX_PAGE_SIZE}"
        ))),
    }
}

/// A listing answer: the items, `Truncated`, and `NextMarker` when truncated.
fn listing(member: &str, items: Vec<Value>, next: String) -> Value {
    let mut answer = json!({ member: items, "Truncated": !next.is_empty() });
    if !next.is_empty() {
        answer["NextMarker"] = Value::String(next);
    }
    answer
}

/// One page of an in-memory list; the marker is the index of the next item.
fn page(items: Vec<Value>, start: usize, limit: usize, member: &str) -> Answer {
    let end = start.saturating_add(limit).min(items.len());
    let next = if end < items.len() {
        end.to_string()
    } else {
        String::new()
    };
    let items = items
        .get(start..end)
        .map(<[Value]>::to_vec)
        .unwrap_or_default();
    Ok(listing(member, items, next))
}

/// AWS KMS's names of key states.
fn key_state(state: KeyState) -> &'static str {
    match state {
        KeyState::Enabled => "Enabled",
        KeyState::Disabled => "Disabled",
        KeyState::PendingDeletion => "PendingDeletion",
        KeyState::PendingImport => "PendingImport",
    }
}

/// A timestamp as the JSON protocol carries it: seconds since the epoch.
fn epoch(time: SystemTime) -> f64 {
    time.duration_since(UNIX_EPOCH)
        .map_or(0.0, |d| d.as_millis() as f64 / 1000.0)
}

/// A request id in the form AWS uses (a random UUID).
fn request_id() -> String {
    let mut b = [0u8; 16];
    rand::rng().fill_bytes(&mut b);
    b[6] = (b[6] & 0x0f) | 0x40;
    b[8] = (b[8] & 0x3f) | 0x80;
    let h = hex::encode(b);
    format!(
        "{}-{}-{}-{}-{}",
        &h[..8],
        &h[8..12],
        &h[12..16],
        &h[16..20],
        &h[20..]
    )
}
