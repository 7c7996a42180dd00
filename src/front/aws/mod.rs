//! The AWS KMS-compatible JSON API (docs/DESIGN.md §9): a second front end of the same
//! daemon, so that the AWS CLI, the AWS SDKs, the Encryption SDK's KMS keyrings and the S3
//! Encryption Client reach wrapd with a change of endpoint and credentials.
//!
//! `POST /` with `X-Amz-Target: TrentService.<Operation>` and a JSON body
//! (`application/x-amz-json-1.1`), signed with SigV4 ([`crate::front::sigv4`]). Each request becomes a
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
//! | `UpdateKeyDescription` | the same name |
//! | `ListKeyRotations`, `GetKeyRotationStatus`, `ListResourceTags` | `DescribeKey` |
//! | `GetParametersForImport`, `ImportKeyMaterial`, `DeleteImportedKeyMaterial` | the same names |
//! | `GetKeyPolicy`, `PutKeyPolicy`, `ListKeyPolicies` | the same names |
//! | `CreateGrant`, `ListGrants`, `ListRetirableGrants`, `RetireGrant`, `RevokeGrant` | the same names |
//!
//! What wrapd does not offer is refused, never ignored: other key specs and usages than `SYMMETRIC_DEFAULT` / `ENCRYPT_DECRYPT`,
//! multi-Region keys, custom key stores, `DryRun`, Nitro `Recipient`s, and the operations not
//! in the table (`UnsupportedOperationException`). `GrantTokens` are checked (a token wrapd
//! did not issue is `InvalidGrantTokenException`) and make their grants count at once on
//! every daemon of a fleet. Data keys are 1 to 64 bytes (AWS allows 1,024), so that a blob
//! stays under 1 KiB.
//!
//! A request is decoded first, then executed: `request.rs` turns the target and body into
//! one [`KmsRequest`] with its policy operation (pure, fuzzed whole, the one table of the
//! operations), a refused one is audited in one place ([`AwsApi::handle`]), and
//! `AwsApi::execute` runs each operation and answers as AWS KMS does.
//!
//! Files: `arn.rs` (key names), `model.rs` (request bodies), `validation.rs` (requests
//! checked against AWS's service model, `proto/aws-kms/`), `request.rs` (decoding),
//! `error.rs` (error types and HTTP statuses). Signatures are
//! checked by [`crate::front::sigv4`], shared with the XKS proxy API; the HTTP listener is
//! `server/http.rs`.

pub mod arn;
pub mod error;
pub mod model;
pub mod request;
pub mod validation;

use crate::auth::key_policy::POLICY_NAME;
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

use crate::auth::{Refusal, Transport, aws_identity};
use crate::config::AwsConfig;
use crate::error::Error;
use crate::front::sigv4::{self, AccessKeys, Scope};
use crate::keystore::{KeyOrigin, KeyState};
use crate::ops::{Call, KeyView, Ops};
use error::json_response;
use request::SYMMETRIC_DEFAULT;
pub use request::{DescribeView, KmsRequest, VersionChange, decode, decode_extension};

/// The SigV4 service name of AWS KMS.
pub const SERVICE: &str = "kms";

/// The `X-Amz-Target` prefix of AWS KMS.
pub const TARGET_PREFIX: &str = "TrentService.";

/// The `X-Amz-Target` prefix of wrapd's extensions (key versions), kept out of AWS's
/// namespace so that no future AWS operation can collide with one.
pub const EXTENSION_PREFIX: &str = "WrapdService.";

/// Largest request body read (the largest valid one, ReEncrypt with two large contexts, is
/// far smaller).
pub const MAX_BODY: usize = 256 * 1024;

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
            arns: Arns::with_regions(&config.regions, &config.account),
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
        let named = parts
            .headers
            .get("x-amz-target")
            .and_then(|v| v.to_str().ok())
            .and_then(|t| {
                [TARGET_PREFIX, EXTENSION_PREFIX]
                    .into_iter()
                    .find_map(|ns| t.strip_prefix(ns).map(|op| (ns, op.to_owned())))
            });
        let (namespace, target) = match named {
            Some((namespace, target)) => (namespace, Some(target)),
            None => (TARGET_PREFIX, None),
        };
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
                "missing or foreign X-Amz-Target: expected TrentService.<Operation> (or wrapd's WrapdService.<Operation>)",
            )
            .response(&request_id);
        };
        // Decoded before the signature is checked (pure, and the body is bounded), so that
        // even a refusal of the signature is audited under its operation; acted on only after.
        let decoded = if namespace == EXTENSION_PREFIX {
            request::decode_extension(&target, &body, &self.arns)
        } else {
            request::decode(&target, &body, &self.arns)
        };
        let operation = decoded.as_ref().map(|(operation, _)| *operation);
        let api_name = format!("{namespace}{target}");

        let regions: Vec<&str> = self.arns.regions().iter().map(String::as_str).collect();
        let scope = Scope {
            regions: &regions,
            service: SERVICE,
            signed_when_present: &["content-type", "x-amz-target"],
        };
        let verified = sigv4::verify(&self.keys, scope, &parts, &body, chrono::Utc::now());
        let (access_key, region) = match verified {
            Ok(verified) => (verified.access_key, verified.region),
            Err(failure) => {
                // At debug: callers without credentials must not grow the daemon's log (the
                // audit log has the refusal, within its budget, and the metrics count it).
                tracing::debug!(remote = ?remote, code = failure.code, access_key = ?failure.claimed_key,
                    "AWS KMS API: signature refused");
                if let Some(op) = operation {
                    let refusal = Refusal {
                        reason: failure.message.clone(),
                        transport: Some(Transport::AwsKms),
                        peer: remote.map_or_else(|| "?".to_owned(), |a| a.to_string()),
                        access_key: failure.claimed_key.clone(),
                    };
                    let call = Call::new(Err(refusal), op, Some(&request_id), None)
                        .with_api_operation(&api_name);
                    // The line is written; if it cannot be, the answer is still a refusal.
                    let _ = self
                        .ops
                        .reject(call, Error::Unauthenticated(failure.message.clone()))
                        .await;
                }
                return AwsError::new(failure.code, StatusCode::BAD_REQUEST, failure.message)
                    .response(&request_id);
            }
        };
        let principal = self.keys.get(&access_key).and_then(|k| k.principal.clone());
        let arn = self.keys.get(&access_key).and_then(|k| k.arn.clone());
        let identity = aws_identity(&access_key, principal.as_deref(), arn.as_deref(), remote);
        let Some((operation, request)) = decoded else {
            let name = arn::truncate(&target);
            let message = format!("wrapd does not implement the AWS KMS operation {name}");
            let err = self
                .ops
                .reject_unsupported(
                    identity,
                    request_id.clone(),
                    format!("{namespace}{name}"),
                    message,
                )
                .await;
            return AwsError::from_error(&err).response(&request_id);
        };
        // The grants its tokens name count at once, even on a daemon of the fleet that has
        // not heard of them yet (the tokens were checked when the request was decoded).
        let call = Call::new(Ok(identity), operation, Some(&request_id), None)
            .with_api_operation(&api_name)
            .with_grant_tokens(request::grant_tokens(&body).unwrap_or_default());
        // Answers name keys in the region the request was signed for.
        let arns = self.arns.in_region(&region);
        let answer = match request {
            Ok(request) => self.execute(call, request, &arns).await,
            Err(err) => Err(self.reject(call, err).await),
        };
        match answer {
            Ok(value) => {
                let body = Zeroizing::new(value.to_string());
                json_response(StatusCode::OK, body.as_bytes().to_vec(), &request_id)
            }
            Err(err) => err.response(&request_id),
        }
    }

    /// Runs a decoded request through the operation layer (which checks the policy and
    /// writes the audit line) and answers as AWS KMS does.
    async fn execute(&self, call: Call, request: KmsRequest, arns: &Arns) -> Answer {
        let ops = &self.ops;
        match request {
            KmsRequest::CreateKey {
                description,
                tags,
                origin,
                policy,
                bypass_lockout,
            } => {
                let view = ops
                    .create_key_with_policy(
                        call,
                        description,
                        String::new(),
                        tags,
                        origin,
                        policy,
                        bypass_lockout,
                    )
                    .await?;
                Ok(json!({ "KeyMetadata": self.key_metadata(arns, &view) }))
            }
            KmsRequest::GetKeyPolicy { key, name } => {
                let policy = ops.get_key_policy(call, key, name).await?;
                Ok(json!({ "Policy": policy, "PolicyName": POLICY_NAME }))
            }
            KmsRequest::PutKeyPolicy {
                key,
                name,
                policy,
                bypass_lockout,
            } => {
                ops.put_key_policy(call, key, name, policy, bypass_lockout)
                    .await?;
                Ok(json!({}))
            }
            KmsRequest::ListKeyPolicies { key } => {
                let names = ops.list_key_policies(call, key).await?;
                Ok(json!({ "PolicyNames": names, "Truncated": false }))
            }
            KmsRequest::CreateGrant(new) => {
                let created = ops.create_grant(call, new).await?;
                Ok(json!({ "GrantToken": created.token, "GrantId": created.grant_id }))
            }
            KmsRequest::ListGrants {
                key,
                grant_id,
                grantee,
                limit,
                start,
            } => {
                let (key_id, grants) = ops.list_grants(call, key, grant_id, grantee).await?;
                let entries = grants
                    .iter()
                    .map(|grant| self.grant_entry(arns, &key_id, grant))
                    .collect::<Vec<_>>();
                page(entries, start, limit, "Grants")
            }
            KmsRequest::ListRetirableGrants {
                retiring,
                limit,
                start,
            } => {
                let grants = ops.list_retirable_grants(call, retiring).await?;
                let entries = grants
                    .iter()
                    .map(|found| self.grant_entry(arns, &found.key_id, &found.grant))
                    .collect::<Vec<_>>();
                page(entries, start, limit, "Grants")
            }
            KmsRequest::RetireGrant(which) => {
                ops.retire_grant(call, which).await?;
                Ok(json!({}))
            }
            KmsRequest::RevokeGrant { key, grant_id } => {
                ops.revoke_grant(call, key, grant_id).await?;
                Ok(json!({}))
            }
            KmsRequest::DescribeKey { key, view } => {
                let described = ops.describe_key(call, key).await?;
                self.describe(arns, &described, view)
            }
            KmsRequest::ListKeys { limit, marker } => {
                let page = ops.list_keys(call, limit, marker).await?;
                let keys: Vec<Value> = page
                    .items
                    .iter()
                    .map(|view| {
                        json!({
                            "KeyId": arn::bare_id(&view.key.id),
                            "KeyArn": arns.key_arn(&view.key.id),
                        })
                    })
                    .collect();
                Ok(listing("Keys", keys, page.next_page_token))
            }
            KmsRequest::SetKeyEnabled { key, enable } => {
                if enable {
                    ops.enable_key(call, key).await?;
                } else {
                    ops.disable_key(call, key).await?;
                }
                Ok(json!({}))
            }
            KmsRequest::CancelKeyDeletion { key } => {
                let view = ops.cancel_key_deletion(call, key).await?;
                Ok(json!({ "KeyId": arns.key_arn(&view.key.id) }))
            }
            KmsRequest::ScheduleKeyDeletion { key, days } => {
                let view = ops.schedule_key_deletion(call, key, days).await?;
                Ok(json!({
                    "KeyId": arns.key_arn(&view.key.id),
                    "DeletionDate": view.key.deletion_date.map(epoch),
                    "KeyState": key_state(view.key.state),
                    "PendingWindowInDays": days,
                }))
            }
            KmsRequest::ListKeyVersions { key } => {
                let view = ops.describe_key_with_usage(call, key).await?;
                Ok(self.key_versions(arns, &view))
            }
            KmsRequest::ChangeKeyVersion {
                key,
                version,
                change,
            } => {
                let view = match change {
                    VersionChange::Retire => {
                        ops.set_key_version_retired(call, key, version, true)
                            .await?
                    }
                    VersionChange::Restore => {
                        ops.set_key_version_retired(call, key, version, false)
                            .await?
                    }
                    VersionChange::ScheduleDestruction(days) => {
                        ops.schedule_key_version_destruction(call, key, version, days)
                            .await?
                    }
                    VersionChange::CancelDestruction => {
                        ops.cancel_key_version_destruction(call, key, version)
                            .await?
                    }
                };
                Ok(self.key_versions(arns, &view))
            }
            KmsRequest::RotateKeyOnDemand { key } => {
                let view = ops.rotate_key(call, key).await?;
                Ok(json!({ "KeyId": arns.key_arn(&view.key.id) }))
            }
            KmsRequest::SetKeyRotation { key, period } => {
                ops.set_key_rotation(call, key, period).await?;
                Ok(json!({}))
            }
            KmsRequest::Tag { key, tags, remove } => {
                ops.tag_key(call, key, tags, remove).await?;
                Ok(json!({}))
            }
            KmsRequest::UpdateKeyDescription { key, description } => {
                ops.update_key_description(call, key, description).await?;
                Ok(json!({}))
            }
            KmsRequest::PointAlias { alias, key, update } => {
                if update {
                    ops.update_alias(call, alias, key).await?;
                } else {
                    ops.create_alias(call, alias, key).await?;
                }
                Ok(json!({}))
            }
            KmsRequest::DeleteAlias { alias } => {
                ops.delete_alias(call, alias).await?;
                Ok(json!({}))
            }
            KmsRequest::ListAliases { key, limit, marker } => {
                let page = ops.list_aliases(call, key, limit, marker).await?;
                let aliases: Vec<Value> = page
                    .items
                    .iter()
                    .map(|(alias, key)| {
                        json!({
                            "AliasName": alias.as_str(),
                            "AliasArn": arns.alias_arn(alias),
                            "TargetKeyId": arn::bare_id(key),
                        })
                    })
                    .collect();
                Ok(listing("Aliases", aliases, page.next_page_token))
            }
            KmsRequest::GenerateDataKey {
                key,
                context,
                bytes,
                with_plaintext,
                named,
            } => {
                let generated = ops.generate_data_key(call, key, context, bytes).await?;
                let mut answer = json!({
                    "CiphertextBlob": STANDARD.encode(&generated.wrapped.blob),
                    "KeyId": arns.answer_arn(named.as_deref(), &generated.wrapped.key_id),
                });
                if with_plaintext {
                    let plaintext = Zeroizing::new(STANDARD.encode(&*generated.plaintext));
                    answer["Plaintext"] = Value::String(plaintext.as_str().to_owned());
                }
                Ok(answer)
            }
            KmsRequest::Encrypt {
                key,
                plaintext,
                context,
                named,
            } => {
                let wrapped = ops.wrap(call, key, plaintext, context).await?;
                Ok(json!({
                    "CiphertextBlob": STANDARD.encode(&wrapped.blob),
                    "KeyId": arns.answer_arn(named.as_deref(), &wrapped.key_id),
                    "EncryptionAlgorithm": SYMMETRIC_DEFAULT,
                }))
            }
            KmsRequest::Decrypt {
                blob,
                context,
                key,
                named,
            } => {
                let unwrapped = ops.unwrap(call, blob, context, key).await?;
                let plaintext = Zeroizing::new(STANDARD.encode(&*unwrapped.plaintext));
                Ok(json!({
                    "KeyId": arns.answer_arn(named.as_deref(), &unwrapped.key_id),
                    "Plaintext": plaintext.as_str(),
                    "EncryptionAlgorithm": SYMMETRIC_DEFAULT,
                }))
            }
            KmsRequest::ReEncrypt {
                blob,
                source_context,
                source,
                destination,
                destination_context,
                named: (source_named, destination_named),
            } => {
                let rewrapped = ops
                    .rewrap(
                        call,
                        blob,
                        source_context,
                        destination,
                        destination_context,
                        source,
                    )
                    .await?;
                Ok(json!({
                    "CiphertextBlob": STANDARD.encode(&rewrapped.wrapped.blob),
                    "SourceKeyId": arns.answer_arn(source_named.as_deref(), &rewrapped.source_key_id),
                    "KeyId": arns.answer_arn(destination_named.as_deref(), &rewrapped.wrapped.key_id),
                    "SourceEncryptionAlgorithm": SYMMETRIC_DEFAULT,
                    "DestinationEncryptionAlgorithm": SYMMETRIC_DEFAULT,
                }))
            }
            KmsRequest::GenerateRandom { bytes } => {
                let random = ops.generate_random(call, bytes).await?;
                let plaintext = Zeroizing::new(STANDARD.encode(&*random));
                Ok(json!({ "Plaintext": plaintext.as_str() }))
            }
            KmsRequest::GetParametersForImport {
                key,
                algorithm,
                bits,
            } => {
                let parameters = ops
                    .get_parameters_for_import(call, key, algorithm, bits)
                    .await?;
                Ok(json!({
                    "KeyId": arns.key_arn(&parameters.key_id),
                    "ImportToken": STANDARD.encode(&parameters.import_token),
                    "PublicKey": STANDARD.encode(&parameters.public_key),
                    "ParametersValidTo": epoch(parameters.valid_to),
                }))
            }
            KmsRequest::ImportKeyMaterial {
                key,
                token,
                material,
                valid_to,
            } => {
                ops.import_key_material(call, key, token, material, valid_to)
                    .await?;
                Ok(json!({}))
            }
            KmsRequest::DeleteImportedKeyMaterial { key } => {
                ops.delete_imported_key_material(call, key).await?;
                Ok(json!({}))
            }
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

    /// A `GrantListEntry`.
    fn grant_entry(
        &self,
        arns: &Arns,
        key: &crate::ids::KeyId,
        grant: &crate::grant::Grant,
    ) -> Value {
        let issuing_account = grant.issuer.split(':').nth(4).unwrap_or(arns.account());
        let mut entry = json!({
            "KeyId": arns.key_arn(key),
            "GrantId": grant.id,
            "CreationDate": epoch(grant.created_at),
            "GranteePrincipal": grant.grantee,
            "IssuingAccount": format!("arn:aws:iam::{issuing_account}:root"),
            "Operations": grant.operations.iter().map(|op| op.name()).collect::<Vec<_>>(),
        });
        if !grant.name.is_empty() {
            entry["Name"] = json!(grant.name);
        }
        if let Some(retiring) = &grant.retiring {
            entry["RetiringPrincipal"] = json!(retiring);
        }
        let mut constraints = serde_json::Map::new();
        if let Some(equals) = &grant.constraints.equals {
            constraints.insert("EncryptionContextEquals".into(), json!(equals));
        }
        if let Some(subset) = &grant.constraints.subset {
            constraints.insert("EncryptionContextSubset".into(), json!(subset));
        }
        if !constraints.is_empty() {
            entry["Constraints"] = Value::Object(constraints);
        }
        entry
    }

    // ---- keys -----------------------------------------------------------------------------

    /// `KeyMetadata` as AWS KMS returns it.
    fn key_metadata(&self, arns: &Arns, view: &KeyView) -> Value {
        let key = &view.key;
        let mut metadata = json!({
            "AWSAccountId": arns.account(),
            "KeyId": arn::bare_id(&key.id),
            "Arn": arns.key_arn(&key.id),
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

    /// The answers read from a key's description.
    fn describe(&self, arns: &Arns, described: &KeyView, view: DescribeView) -> Answer {
        let key = &described.key;
        match view {
            DescribeView::Metadata => {
                Ok(json!({ "KeyMetadata": self.key_metadata(arns, described) }))
            }
            DescribeView::RotationStatus => {
                let mut answer = json!({
                    "KeyId": arns.key_arn(&key.id),
                    "KeyRotationEnabled": key.rotation.is_some(),
                });
                if let Some(rotation) = key.rotation {
                    answer["RotationPeriodInDays"] = json!(rotation.period_days);
                    answer["NextRotationDate"] = json!(epoch(rotation.next));
                }
                Ok(answer)
            }
            DescribeView::Rotations { limit, start } => {
                let arn = arns.key_arn(&key.id);
                // Every version after the first is a rotation: on the key's schedule (or at
                // a version's wrap limit), or asked for.
                let rotations: Vec<Value> = described
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
            DescribeView::Tags { limit, start } => {
                let tags: Vec<Value> = key
                    .tags
                    .iter()
                    .map(|(k, v)| json!({ "TagKey": k, "TagValue": v }))
                    .collect();
                page(tags, start, limit, "Tags")
            }
        }
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
impl AwsApi {
    /// The answer of wrapd's key version extensions: the key and each version's state (and,
    /// from `ListKeyVersions`, its usage).
    fn key_versions(&self, arns: &Arns, view: &KeyView) -> Value {
        let versions: Vec<Value> = view
            .versions
            .iter()
            .map(|v| {
                let mut entry = json!({
                    "Version": v.version,
                    "CreationDate": epoch(v.created_at),
                    "Current": v.version == view.key.current_version(),
                    "Retired": v.retired,
                    "Available": v.available,
                });
                if let Some(date) = v.destruction_date {
                    entry["DestructionDate"] = json!(epoch(date));
                }
                if let Some(at) = v.destroyed_at {
                    entry["DestroyedDate"] = json!(epoch(at));
                }
                if let Some(usage) = v.usage {
                    entry["Wraps"] = json!(usage.wraps);
                    entry["Unwraps"] = json!(usage.unwraps);
                    if let Some(first) = usage.first_used {
                        entry["FirstUsedDate"] = json!(epoch(first));
                    }
                    if let Some(last) = usage.last_used {
                        entry["LastUsedDate"] = json!(epoch(last));
                    }
                }
                entry
            })
            .collect();
        json!({
            "KeyId": arns.key_arn(&view.key.id),
            "CurrentVersion": view.key.current_version(),
            "Versions": versions,
        })
    }
}

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
