//! Decoding: a KMS request's target and JSON body become one [`KmsRequest`], checked against
//! what wrapd offers, with the policy operation it needs. Pure and synchronous (no call, no
//! I/O), so that it is fuzzed whole; the one table of the operations wrapd implements.

use std::collections::BTreeMap;
use std::time::{SystemTime, UNIX_EPOCH};

use serde_json::Value;
use zeroize::Zeroizing;

use super::arn::Arns;
use super::error::AwsError;
use super::model;
use crate::auth::Operation;
use crate::grant::{Constraints, GrantOperation, OTHER_KEY_USAGE_OPERATIONS};
use crate::hsm::ImportAlgorithm;
use crate::keystore::{KeyOrigin, MAX_PAGE_SIZE};
use crate::ops::{NewGrant, RetiredGrant};

/// The encryption algorithm of every wrapd key.
pub const SYMMETRIC_DEFAULT: &str = "SYMMETRIC_DEFAULT";

/// A key named by a request, in wrapd's form (`key/…` or `alias/…`; empty: none named).
type KeyName = String;

/// A decoded request: everything the operation layer needs, in its terms.
pub enum KmsRequest {
    /// `CreateKey`.
    CreateKey {
        /// `Description`.
        description: String,
        /// `Tags`.
        tags: BTreeMap<String, String>,
        /// `Origin`.
        origin: KeyOrigin,
        /// `Policy` (`None`: the default policy).
        policy: Option<String>,
        /// `BypassPolicyLockoutSafetyCheck`.
        bypass_lockout: bool,
    },
    /// `GetKeyPolicy`.
    GetKeyPolicy {
        /// The key.
        key: KeyName,
        /// `PolicyName` (empty: `default`).
        name: String,
    },
    /// `PutKeyPolicy`.
    PutKeyPolicy {
        /// The key.
        key: KeyName,
        /// `PolicyName` (empty: `default`).
        name: String,
        /// `Policy`.
        policy: String,
        /// `BypassPolicyLockoutSafetyCheck`.
        bypass_lockout: bool,
    },
    /// `ListKeyPolicies`.
    ListKeyPolicies {
        /// The key.
        key: KeyName,
    },
    /// `CreateGrant` (its `KeyId` in wrapd's form).
    CreateGrant(NewGrant),
    /// `ListGrants`.
    ListGrants {
        /// The key.
        key: KeyName,
        /// `GrantId`.
        grant_id: Option<String>,
        /// `GranteePrincipal`.
        grantee: Option<String>,
        /// `Limit`.
        limit: usize,
        /// The index `Marker` names.
        start: usize,
    },
    /// `ListRetirableGrants`.
    ListRetirableGrants {
        /// `RetiringPrincipal`.
        retiring: String,
        /// `Limit`.
        limit: usize,
        /// The index `Marker` names.
        start: usize,
    },
    /// `RetireGrant`.
    RetireGrant(RetiredGrant),
    /// `RevokeGrant`.
    RevokeGrant {
        /// The key.
        key: KeyName,
        /// `GrantId`.
        grant_id: String,
    },
    /// `DescribeKey`, and the operations that read what it returns.
    DescribeKey {
        /// The key.
        key: KeyName,
        /// Which answer.
        view: DescribeView,
    },
    /// `ListKeys`.
    ListKeys {
        /// `Limit`.
        limit: u32,
        /// `Marker`.
        marker: String,
    },
    /// `EnableKey` or `DisableKey`.
    SetKeyEnabled {
        /// The key.
        key: KeyName,
        /// Enable, or disable.
        enable: bool,
    },
    /// `CancelKeyDeletion`.
    CancelKeyDeletion {
        /// The key.
        key: KeyName,
    },
    /// `ScheduleKeyDeletion`.
    ScheduleKeyDeletion {
        /// The key.
        key: KeyName,
        /// `PendingWindowInDays`.
        days: u32,
    },
    /// `RotateKeyOnDemand`.
    RotateKeyOnDemand {
        /// The key.
        key: KeyName,
    },
    /// `EnableKeyRotation` (a period) or `DisableKeyRotation` (none).
    SetKeyRotation {
        /// The key.
        key: KeyName,
        /// `RotationPeriodInDays`.
        period: Option<u32>,
    },
    /// `TagResource` (tags to set) or `UntagResource` (tag keys to remove).
    Tag {
        /// The key.
        key: KeyName,
        /// The tags (to remove: keys with empty values).
        tags: BTreeMap<String, String>,
        /// Remove instead of set.
        remove: bool,
    },
    /// wrapd's extension `ListKeyVersions`: the versions with their usage.
    ListKeyVersions {
        /// The key.
        key: KeyName,
    },
    /// wrapd's extensions that change one version of a key.
    ChangeKeyVersion {
        /// The key.
        key: KeyName,
        /// `Version`.
        version: u32,
        /// What happens to it.
        change: VersionChange,
    },
    /// `UpdateKeyDescription`.
    UpdateKeyDescription {
        /// The key.
        key: KeyName,
        /// `Description`.
        description: String,
    },
    /// `CreateAlias` or `UpdateAlias`.
    PointAlias {
        /// `AliasName`.
        alias: String,
        /// `TargetKeyId`.
        key: KeyName,
        /// Update an existing alias.
        update: bool,
    },
    /// `DeleteAlias`.
    DeleteAlias {
        /// `AliasName`.
        alias: String,
    },
    /// `ListAliases`.
    ListAliases {
        /// `KeyId` (empty: every alias).
        key: KeyName,
        /// `Limit`.
        limit: u32,
        /// `Marker`.
        marker: String,
    },
    /// `GenerateDataKey` and `GenerateDataKeyWithoutPlaintext`.
    GenerateDataKey {
        /// The key.
        key: KeyName,
        /// `EncryptionContext`.
        context: std::collections::HashMap<String, String>,
        /// `NumberOfBytes`, or what `KeySpec` means.
        bytes: u32,
        /// Whether the answer carries the plaintext.
        with_plaintext: bool,
        /// `KeyId` as written (the answer echoes a key ARN, [`Arns::answer_arn`]).
        named: Option<String>,
    },
    /// `Encrypt`.
    Encrypt {
        /// The key.
        key: KeyName,
        /// `Plaintext`.
        plaintext: Zeroizing<Vec<u8>>,
        /// `EncryptionContext`.
        context: std::collections::HashMap<String, String>,
        /// `KeyId` as written.
        named: Option<String>,
    },
    /// `Decrypt`.
    Decrypt {
        /// `CiphertextBlob`.
        blob: Vec<u8>,
        /// `EncryptionContext`.
        context: std::collections::HashMap<String, String>,
        /// `KeyId` (empty: the blob's).
        key: KeyName,
        /// `KeyId` as written.
        named: Option<String>,
    },
    /// `ReEncrypt`.
    ReEncrypt {
        /// `CiphertextBlob`.
        blob: Vec<u8>,
        /// `SourceEncryptionContext`.
        source_context: std::collections::HashMap<String, String>,
        /// `SourceKeyId` (empty: the blob's).
        source: KeyName,
        /// `DestinationKeyId`.
        destination: KeyName,
        /// `DestinationEncryptionContext`.
        destination_context: std::collections::HashMap<String, String>,
        /// `SourceKeyId` and `DestinationKeyId` as written.
        named: (Option<String>, Option<String>),
    },
    /// `GenerateRandom`.
    GenerateRandom {
        /// `NumberOfBytes`.
        bytes: u32,
    },
    /// `GetParametersForImport`.
    GetParametersForImport {
        /// The key.
        key: KeyName,
        /// `WrappingAlgorithm`.
        algorithm: ImportAlgorithm,
        /// `WrappingKeySpec`, in bits.
        bits: u32,
    },
    /// `ImportKeyMaterial`.
    ImportKeyMaterial {
        /// The key.
        key: KeyName,
        /// `ImportToken`.
        token: Vec<u8>,
        /// `EncryptedKeyMaterial`.
        material: Vec<u8>,
        /// `ValidTo` (`None`: never expires).
        valid_to: Option<SystemTime>,
    },
    /// `DeleteImportedKeyMaterial`.
    DeleteImportedKeyMaterial {
        /// The key.
        key: KeyName,
    },
}

/// What a `DescribeKey`-backed operation answers with.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum DescribeView {
    /// `DescribeKey`: the key's metadata.
    Metadata,
    /// `GetKeyRotationStatus`.
    RotationStatus,
    /// `ListKeyRotations`: a page from `start`.
    Rotations {
        /// `Limit`.
        limit: usize,
        /// The index `Marker` names.
        start: usize,
    },
    /// `ListResourceTags`: a page from `start`.
    Tags {
        /// `Limit`.
        limit: usize,
        /// The index `Marker` names.
        start: usize,
    },
}

/// What a wrapd extension does to a key version.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum VersionChange {
    /// `RetireKeyVersion`.
    Retire,
    /// `RestoreKeyVersion`.
    Restore,
    /// `ScheduleKeyVersionDestruction` after this many days.
    ScheduleDestruction(u32),
    /// `CancelKeyVersionDestruction`.
    CancelDestruction,
}

/// Decodes a request to one of wrapd's extensions, `WrapdService.<target>` (the rest of the
/// key version life, which AWS KMS does not have): `None` for a name it does not know.
pub fn decode_extension(
    target: &str,
    body: &[u8],
    arns: &Arns,
) -> Option<(Operation, Result<KmsRequest, AwsError>)> {
    use Operation as Op;
    let change = |change: VersionChange| {
        model::parse::<model::KeyVersion>(body).and_then(|req| {
            Ok(KmsRequest::ChangeKeyVersion {
                key: arns.key_ref(&req.key_id)?,
                version: req.version,
                change,
            })
        })
    };
    Some(match target {
        "ListKeyVersions" => (
            Op::DescribeKey,
            model::parse::<model::KeyOnly>(body).and_then(|req| {
                Ok(KmsRequest::ListKeyVersions {
                    key: arns.key_ref(&req.key_id)?,
                })
            }),
        ),
        "RetireKeyVersion" => (Op::RetireKeyVersion, change(VersionChange::Retire)),
        "RestoreKeyVersion" => (Op::RestoreKeyVersion, change(VersionChange::Restore)),
        "CancelKeyVersionDestruction" => (
            Op::CancelKeyVersionDestruction,
            change(VersionChange::CancelDestruction),
        ),
        "ScheduleKeyVersionDestruction" => (
            Op::ScheduleKeyVersionDestruction,
            model::parse::<model::ScheduleKeyVersionDestruction>(body).and_then(|req| {
                let days = req.pending_window_in_days.unwrap_or(30);
                if !(7..=30).contains(&days) {
                    return Err(AwsError::validation("PendingWindowInDays must be 7 to 30"));
                }
                Ok(KmsRequest::ChangeKeyVersion {
                    key: arns.key_ref(&req.key_id)?,
                    version: req.version,
                    change: VersionChange::ScheduleDestruction(days),
                })
            }),
        ),
        _ => return None,
    })
}

/// Decodes a request to `TrentService.<target>`: `None` for an operation wrapd does not
/// implement, else the policy operation it needs and the request, or why it is refused.
pub fn decode(
    target: &str,
    body: &[u8],
    arns: &Arns,
) -> Option<(Operation, Result<KmsRequest, AwsError>)> {
    // Any of the four forms (key id, key ARN, alias name, alias ARN), or, where AWS takes
    // only the first two, those (`key_id`).
    let key = |param: &str| arns.key_ref(param);
    let key_id = |param: &str| arns.key_id_ref(param);
    let optional_key = |param: Option<&str>| param.map_or(Ok(String::new()), key);
    use KmsRequest as R;
    use Operation as Op;
    let (operation, request): (Operation, Result<KmsRequest, AwsError>) = match target {
        "CreateKey" => (
            Op::CreateKey,
            model::parse::<model::CreateKey>(body).and_then(|req| {
                refuse(create_key_refusal(&req))?;
                Ok(R::CreateKey {
                    tags: tag_map(req.tags.unwrap_or_default()),
                    origin: match req.origin.as_deref() {
                        Some("EXTERNAL") => KeyOrigin::External,
                        _ => KeyOrigin::Hsm,
                    },
                    description: req.description.unwrap_or_default(),
                    policy: req.policy,
                    bypass_lockout: req.bypass_policy_lockout_safety_check == Some(true),
                })
            }),
        ),
        "DescribeKey" | "GetKeyRotationStatus" => (
            Op::DescribeKey,
            model::parse::<model::KeyOnly>(body).and_then(|req| {
                Ok(R::DescribeKey {
                    key: if target == "DescribeKey" {
                        key(&req.key_id)?
                    } else {
                        key_id(&req.key_id)?
                    },
                    view: if target == "DescribeKey" {
                        DescribeView::Metadata
                    } else {
                        DescribeView::RotationStatus
                    },
                })
            }),
        ),
        "ListKeyRotations" | "ListResourceTags" => (
            Op::DescribeKey,
            model::parse::<model::ListOfKey>(body).and_then(|req| {
                let (limit, start) = list_position(req.limit, req.marker.as_deref())?;
                Ok(R::DescribeKey {
                    key: key_id(&req.key_id)?,
                    view: if target == "ListKeyRotations" {
                        DescribeView::Rotations { limit, start }
                    } else {
                        DescribeView::Tags { limit, start }
                    },
                })
            }),
        ),
        "ListKeys" => (
            Op::ListKeys,
            model::parse::<model::ListKeys>(body).and_then(|req| {
                Ok(R::ListKeys {
                    limit: limit(req.limit)? as u32,
                    marker: page_marker(req.marker)?,
                })
            }),
        ),
        "EnableKey" | "DisableKey" => (
            if target == "EnableKey" {
                Op::EnableKey
            } else {
                Op::DisableKey
            },
            model::parse::<model::KeyOnly>(body).and_then(|req| {
                Ok(R::SetKeyEnabled {
                    key: key_id(&req.key_id)?,
                    enable: target == "EnableKey",
                })
            }),
        ),
        "CancelKeyDeletion" => (
            Op::CancelKeyDeletion,
            model::parse::<model::KeyOnly>(body).and_then(|req| {
                Ok(R::CancelKeyDeletion {
                    key: key_id(&req.key_id)?,
                })
            }),
        ),
        "ScheduleKeyDeletion" => (
            Op::ScheduleKeyDeletion,
            model::parse::<model::ScheduleKeyDeletion>(body).and_then(|req| {
                let days = req.pending_window_in_days.unwrap_or(30);
                if !(7..=30).contains(&days) {
                    return Err(AwsError::validation("PendingWindowInDays must be 7 to 30"));
                }
                Ok(R::ScheduleKeyDeletion {
                    key: key_id(&req.key_id)?,
                    days,
                })
            }),
        ),
        "RotateKeyOnDemand" => (
            Op::RotateKey,
            model::parse::<model::KeyOnly>(body).and_then(|req| {
                Ok(R::RotateKeyOnDemand {
                    key: key_id(&req.key_id)?,
                })
            }),
        ),
        "EnableKeyRotation" => (
            Op::EnableKeyRotation,
            model::parse::<model::EnableKeyRotation>(body).and_then(|req| {
                Ok(R::SetKeyRotation {
                    key: key_id(&req.key_id)?,
                    period: Some(
                        req.rotation_period_in_days
                            .unwrap_or(crate::ops::DEFAULT_ROTATION_DAYS),
                    ),
                })
            }),
        ),
        "DisableKeyRotation" => (
            Op::DisableKeyRotation,
            model::parse::<model::KeyOnly>(body).and_then(|req| {
                Ok(R::SetKeyRotation {
                    key: key_id(&req.key_id)?,
                    period: None,
                })
            }),
        ),
        "TagResource" => (
            Op::TagKey,
            model::parse::<model::TagResource>(body).and_then(|req| {
                Ok(R::Tag {
                    key: key_id(&req.key_id)?,
                    tags: tag_map(req.tags),
                    remove: false,
                })
            }),
        ),
        "UntagResource" => (
            Op::UntagKey,
            model::parse::<model::UntagResource>(body).and_then(|req| {
                Ok(R::Tag {
                    key: key_id(&req.key_id)?,
                    tags: req
                        .tag_keys
                        .into_iter()
                        .map(|k| (k, String::new()))
                        .collect(),
                    remove: true,
                })
            }),
        ),
        "GetKeyPolicy" => (
            Op::GetKeyPolicy,
            model::parse::<model::GetKeyPolicy>(body).and_then(|req| {
                let name = req.policy_name.unwrap_or_default();
                refuse(policy_name_member(&name))?;
                Ok(R::GetKeyPolicy {
                    key: key_id(&req.key_id)?,
                    name,
                })
            }),
        ),
        "PutKeyPolicy" => (
            Op::PutKeyPolicy,
            model::parse::<model::PutKeyPolicy>(body).and_then(|req| {
                let name = req.policy_name.unwrap_or_default();
                refuse(policy_name_member(&name))?;
                refuse(policy_member(&req.policy))?;
                Ok(R::PutKeyPolicy {
                    key: key_id(&req.key_id)?,
                    name,
                    policy: req.policy,
                    bypass_lockout: req.bypass_policy_lockout_safety_check == Some(true),
                })
            }),
        ),
        "ListKeyPolicies" => (
            Op::ListKeyPolicies,
            model::parse::<model::ListKeyPolicies>(body).and_then(|req| {
                // One policy per key: any limit holds it, and no listing gives a marker.
                limit(req.limit)?;
                if let Some(marker) = req.marker {
                    if marker.is_empty() || marker.len() > 1024 {
                        return Err(AwsError::validation(
                            "Marker must be 1 to 1024 characters",
                        ));
                    }
                    return Err(AwsError::invalid_marker());
                }
                Ok(R::ListKeyPolicies {
                    key: key_id(&req.key_id)?,
                })
            }),
        ),
        "UpdateKeyDescription" => (
            Op::UpdateKeyDescription,
            model::parse::<model::UpdateKeyDescription>(body).and_then(|req| {
                if req.description.len() > 8192 {
                    return Err(AwsError::validation(
                        "Description is at most 8192 characters",
                    ));
                }
                Ok(R::UpdateKeyDescription {
                    key: key_id(&req.key_id)?,
                    description: req.description,
                })
            }),
        ),
        "CreateAlias" | "UpdateAlias" => (
            if target == "CreateAlias" {
                Op::CreateAlias
            } else {
                Op::UpdateAlias
            },
            model::parse::<model::PointAlias>(body).and_then(|req| {
                alias_name(&req.alias_name, target == "CreateAlias")?;
                Ok(R::PointAlias {
                    key: key_id(&req.target_key_id)?,
                    alias: req.alias_name,
                    update: target == "UpdateAlias",
                })
            }),
        ),
        "DeleteAlias" => (
            Op::DeleteAlias,
            model::parse::<model::DeleteAlias>(body).and_then(|req| {
                alias_name(&req.alias_name, false)?;
                Ok(R::DeleteAlias {
                    alias: req.alias_name,
                })
            }),
        ),
        "ListAliases" => (
            Op::ListAliases,
            model::parse::<model::ListAliases>(body).and_then(|req| {
                let limit = limit(req.limit)? as u32;
                Ok(R::ListAliases {
                    key: req.key_id.as_deref().map_or(Ok(String::new()), key_id)?,
                    limit,
                    marker: page_marker(req.marker)?,
                })
            }),
        ),
        "CreateGrant" => (
            Op::CreateGrant,
            model::parse::<model::CreateGrant>(body).and_then(|req| {
                refuse(data_plane_refusal(req.dry_run, None, None))?;
                let constraints = req.constraints.unwrap_or_default();
                Ok(R::CreateGrant(NewGrant {
                    key_id: key_id(&req.key_id)?,
                    grantee: req.grantee_principal,
                    retiring: req.retiring_principal,
                    operations: grant_operations(&req.operations)?,
                    constraints: Constraints {
                        equals: constraints.encryption_context_equals,
                        subset: constraints.encryption_context_subset,
                    },
                    name: req.name.unwrap_or_default(),
                }))
            }),
        ),
        "ListGrants" => (
            Op::ListGrants,
            model::parse::<model::ListGrants>(body).and_then(|req| {
                let (limit, start) = grant_list_position(req.limit, req.marker.as_deref())?;
                Ok(R::ListGrants {
                    key: key_id(&req.key_id)?,
                    grant_id: req.grant_id,
                    grantee: req.grantee_principal,
                    limit,
                    start,
                })
            }),
        ),
        "ListRetirableGrants" => (
            Op::ListRetirableGrants,
            model::parse::<model::ListRetirableGrants>(body).and_then(|req| {
                let (limit, start) = grant_list_position(req.limit, req.marker.as_deref())?;
                Ok(R::ListRetirableGrants {
                    retiring: req.retiring_principal,
                    limit,
                    start,
                })
            }),
        ),
        "RetireGrant" => (
            Op::RetireGrant,
            model::parse::<model::RetireGrant>(body).and_then(|req| {
                refuse(data_plane_refusal(req.dry_run, None, None))?;
                Ok(R::RetireGrant(match (req.grant_token, req.key_id, req.grant_id) {
                    (Some(token), _, _) => RetiredGrant::Token(token),
                    (None, Some(key), Some(grant_id)) => RetiredGrant::Id {
                        key_id: key_id(&key)?,
                        grant_id,
                    },
                    _ => {
                        return Err(AwsError::validation(
                            "Either GrantToken, or KeyId and GrantId, must be specified.",
                        ));
                    }
                }))
            }),
        ),
        "RevokeGrant" => (
            Op::RevokeGrant,
            model::parse::<model::RevokeGrant>(body).and_then(|req| {
                refuse(data_plane_refusal(req.dry_run, None, None))?;
                Ok(R::RevokeGrant {
                    key: key_id(&req.key_id)?,
                    grant_id: req.grant_id,
                })
            }),
        ),
        "GenerateDataKey" | "GenerateDataKeyWithoutPlaintext" => (
            if target == "GenerateDataKey" {
                Op::GenerateDataKey
            } else {
                Op::GenerateDataKeyWithoutPlaintext
            },
            model::parse::<model::GenerateDataKey>(body).and_then(|req| {
                let bytes = data_key_bytes(req.number_of_bytes, req.key_spec.as_deref())?;
                refuse(data_plane_refusal(req.dry_run, req.recipient.as_ref(), None))?;
                Ok(R::GenerateDataKey {
                    key: key(&req.key_id)?,
                    context: req.encryption_context.unwrap_or_default(),
                    bytes,
                    with_plaintext: target == "GenerateDataKey",
                    named: Some(req.key_id),
                })
            }),
        ),
        "Encrypt" => (
            Op::Wrap,
            model::parse::<model::Encrypt>(body).and_then(|req| {
                let plaintext = req.plaintext.decode("Plaintext")?;
                refuse(data_plane_refusal(
                    req.dry_run,
                    None,
                    req.encryption_algorithm.as_deref(),
                ))?;
                Ok(R::Encrypt {
                    key: key(&req.key_id)?,
                    plaintext,
                    context: req.encryption_context.unwrap_or_default(),
                    named: Some(req.key_id),
                })
            }),
        ),
        "Decrypt" => (
            Op::Unwrap,
            model::parse::<model::Decrypt>(body).and_then(|req| {
                let blob = req.ciphertext_blob.decode("CiphertextBlob")?;
                refuse(data_plane_refusal(
                    req.dry_run,
                    req.recipient.as_ref(),
                    req.encryption_algorithm.as_deref(),
                ))?;
                Ok(R::Decrypt {
                    blob,
                    context: req.encryption_context.unwrap_or_default(),
                    key: optional_key(req.key_id.as_deref())?,
                    named: req.key_id,
                })
            }),
        ),
        "ReEncrypt" => (
            Op::ReWrap,
            model::parse::<model::ReEncrypt>(body).and_then(|req| {
                let blob = req.ciphertext_blob.decode("CiphertextBlob")?;
                refuse(data_plane_refusal(
                    req.dry_run,
                    None,
                    req.source_encryption_algorithm.as_deref(),
                ))?;
                refuse(data_plane_refusal(
                    None,
                    None,
                    req.destination_encryption_algorithm.as_deref(),
                ))?;
                Ok(R::ReEncrypt {
                    blob,
                    destination: key(&req.destination_key_id)?,
                    source: optional_key(req.source_key_id.as_deref())?,
                    source_context: req.source_encryption_context.unwrap_or_default(),
                    destination_context: req.destination_encryption_context.unwrap_or_default(),
                    named: (req.source_key_id, Some(req.destination_key_id)),
                })
            }),
        ),
        "GenerateRandom" => (
            Op::GenerateRandom,
            model::parse::<model::GenerateRandom>(body).and_then(|req| {
                if req.custom_key_store_id.is_some() {
                    return Err(AwsError::unsupported("custom key stores are not supported"));
                }
                refuse(data_plane_refusal(None, req.recipient.as_ref(), None))?;
                let bytes = req
                    .number_of_bytes
                    .ok_or_else(|| AwsError::validation("NumberOfBytes is required"))?;
                Ok(R::GenerateRandom { bytes })
            }),
        ),
        "GetParametersForImport" => (
            Op::GetParametersForImport,
            model::parse::<model::GetParametersForImport>(body).and_then(|req| {
                let key = key_id(&req.key_id)?;
                let algorithm = ImportAlgorithm::parse(&req.wrapping_algorithm).ok_or_else(|| {
                    AwsError::unsupported(
                        "WrappingAlgorithm: wrapd offers RSAES_OAEP_SHA_1, RSAES_OAEP_SHA_256, RSA_AES_KEY_WRAP_SHA_1 and RSA_AES_KEY_WRAP_SHA_256",
                    )
                })?;
                let bits = match req.wrapping_key_spec.as_str() {
                    "RSA_3072" => 3072,
                    "RSA_4096" => 4096,
                    _ => {
                        return Err(AwsError::unsupported(
                            "WrappingKeySpec: wrapd offers RSA_3072 and RSA_4096",
                        ));
                    }
                };
                Ok(R::GetParametersForImport {
                    key,
                    algorithm,
                    bits,
                })
            }),
        ),
        "ImportKeyMaterial" => (
            Op::ImportKeyMaterial,
            model::parse::<model::ImportKeyMaterial>(body).and_then(|req| {
                let key = key_id(&req.key_id)?;
                let (token, material, valid_to) = import_members(&req)?;
                Ok(R::ImportKeyMaterial {
                    key,
                    token,
                    material,
                    valid_to,
                })
            }),
        ),
        "DeleteImportedKeyMaterial" => (
            Op::DeleteImportedKeyMaterial,
            model::parse::<model::DeleteImportedKeyMaterial>(body).and_then(|req| {
                let key = key_id(&req.key_id)?;
                if req.key_material_id.is_some() {
                    return Err(AwsError::unsupported(
                        "KeyMaterialId: wrapd keeps one key material per key",
                    ));
                }
                Ok(R::DeleteImportedKeyMaterial { key })
            }),
        ),
        _ => return None,
    };
    // AWS's service model first, as AWS KMS checks it: its constraints and wording win over
    // wrapd's own checks of the same request. Grant tokens are checked here too, so that a
    // request with one wrapd did not issue is refused (and audited) like any other.
    let request = super::validation::check(target, body)
        .and(request)
        .and_then(|request| grant_tokens(body).map(|_| request));
    Some((operation, request))
}

/// Checks an `AliasName` as AWS KMS does: a name that is not one, or is under the reserved
/// `alias/aws/` (or wrapd's `alias/wrapd/`), is `InvalidAliasNameException` for a new alias
/// and `NotFoundException` for one that is to exist already (no such alias can).
fn alias_name(name: &str, new: bool) -> Result<(), AwsError> {
    match crate::ids::AliasName::parse(name) {
        Ok(_) => Ok(()),
        Err(err) if new => Err(AwsError::new(
            "InvalidAliasNameException",
            http::StatusCode::BAD_REQUEST,
            err.to_string(),
        )),
        Err(err) => Err(AwsError::not_found(err.to_string())),
    }
}

/// `Err` of a refusal, if there is one.
fn refuse(refusal: Option<AwsError>) -> Result<(), AwsError> {
    refusal.map_or(Ok(()), Err)
}

/// `NumberOfBytes` or what `KeySpec` means (exactly one of them).
fn data_key_bytes(number_of_bytes: Option<u32>, key_spec: Option<&str>) -> Result<u32, AwsError> {
    let bytes = match (number_of_bytes, key_spec) {
        (Some(n), None) => n,
        (None, Some("AES_256")) => 32,
        (None, Some("AES_128")) => 16,
        (None, Some(other)) => {
            return Err(AwsError::not_in_enum(
                "keySpec",
                other,
                &["AES_256", "AES_128"],
            ));
        }
        (None, None) => {
            return Err(AwsError::validation(
                "Please specify either number of bytes or key spec.",
            ));
        }
        (Some(_), Some(_)) => {
            return Err(AwsError::validation(
                "Please specify either number of bytes or key spec, not both.",
            ));
        }
    };
    if bytes == 0 {
        return Err(AwsError::validation("NumberOfBytes must be 1 to 64"));
    }
    Ok(bytes)
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

/// AWS KMS's `KeySpec` values (botocore's service model); wrapd offers `SYMMETRIC_DEFAULT`.
const KEY_SPECS: &[&str] = &[
    "RSA_2048",
    "RSA_3072",
    "RSA_4096",
    "ECC_NIST_P256",
    "ECC_NIST_P384",
    "ECC_NIST_P521",
    "ECC_SECG_P256K1",
    "SYMMETRIC_DEFAULT",
    "HMAC_224",
    "HMAC_256",
    "HMAC_384",
    "HMAC_512",
    "SM2",
    "ML_DSA_44",
    "ML_DSA_65",
    "ML_DSA_87",
    "ECC_NIST_EDWARDS25519",
];

/// AWS KMS's `KeyUsage` values; wrapd offers `ENCRYPT_DECRYPT`.
const KEY_USAGES: &[&str] = &[
    "SIGN_VERIFY",
    "ENCRYPT_DECRYPT",
    "GENERATE_VERIFY_MAC",
    "KEY_AGREEMENT",
];

/// AWS KMS's `Origin` values; wrapd offers `AWS_KMS` and `EXTERNAL`.
const ORIGINS: &[&str] = &["AWS_KMS", "EXTERNAL", "AWS_CLOUDHSM", "EXTERNAL_KEY_STORE"];

/// Why a `CreateKey` asks for something wrapd does not offer, if it does: a value AWS KMS
/// does not know is a `ValidationException` as AWS words it; one AWS knows and wrapd does
/// not offer is an `UnsupportedOperationException` saying what wrapd offers.
fn create_key_refusal(req: &model::CreateKey) -> Option<AwsError> {
    let not = |what: &str| Some(AwsError::unsupported(what.to_owned()));
    if req.description.as_ref().is_some_and(|d| d.len() > 8192) {
        return Some(AwsError::validation(
            "Description is at most 8192 characters",
        ));
    }
    let members = [
        ("keyUsage", &req.key_usage, KEY_USAGES),
        ("keySpec", &req.key_spec, KEY_SPECS),
        (
            "customerMasterKeySpec",
            &req.customer_master_key_spec,
            KEY_SPECS,
        ),
        ("origin", &req.origin, ORIGINS),
    ];
    for (member, value, allowed) in members {
        if let Some(value) = value.as_deref().filter(|v| !allowed.contains(v)) {
            return Some(AwsError::not_in_enum(member, value, allowed));
        }
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
    if let Some(refusal) = req.policy.as_deref().and_then(policy_member) {
        return Some(refusal);
    }
    if req.multi_region == Some(true) {
        return not("MultiRegion: wrapd keys live in one HSM cluster");
    }
    if req.custom_key_store_id.is_some() || req.xks_key_id.is_some() {
        return not("custom key stores are not supported");
    }
    None
}

/// The `PolicyName` constraints of the service model (1 to 128 word characters; empty here
/// means the member was left out).
fn policy_name_member(name: &str) -> Option<AwsError> {
    let bad = name.len() > 128 || !name.chars().all(|c| c.is_alphanumeric() || c == '_');
    bad.then(|| {
        AwsError::validation(format!(
            "1 validation error detected: Value '{}' at 'policyName' failed to satisfy constraint: Member must satisfy regular expression pattern: [\\w]+",
            super::arn::truncate(name)
        ))
    })
}

/// The `Policy` constraints of the service model: 1 to 131,072 characters of tab, newline,
/// carriage return or U+0020 to U+00FF (the document itself is checked by the key policy
/// parser, within AWS KMS's 32 KB quota).
fn policy_member(policy: &str) -> Option<AwsError> {
    if policy.is_empty() || policy.chars().count() > 131_072 {
        return Some(AwsError::validation(
            "1 validation error detected: Value at 'policy' failed to satisfy constraint: Member must have length between 1 and 131072",
        ));
    }
    let allowed = |c: char| matches!(c, '\t' | '\n' | '\r' | '\u{20}'..='\u{ff}');
    (!policy.chars().all(allowed)).then(|| {
        AwsError::validation(
            "1 validation error detected: Value at 'policy' failed to satisfy constraint: Member must satisfy regular expression pattern: [\\u0009\\u000A\\u000D\\u0020-\\u00FF]+",
        )
    })
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
        Some(Err(_)) => return Err(AwsError::invalid_marker()),
    };
    Ok((limit, start))
}

/// A listing's `Marker` as the key store's page token (hex: anything else is no marker any
/// listing gave).
fn page_marker(marker: Option<String>) -> Result<String, AwsError> {
    let marker = marker.unwrap_or_default();
    if hex::decode(&marker).is_err() {
        return Err(AwsError::invalid_marker());
    }
    Ok(marker)
}

/// `Operations` of `CreateGrant`: AWS KMS's names; those of other key usages (`Sign`, …)
/// are refused as not valid for a symmetric encryption key.
fn grant_operations(names: &[String]) -> Result<Vec<GrantOperation>, AwsError> {
    if names.is_empty() {
        return Err(AwsError::validation(
            "1 validation error detected: Value '[]' at 'operations' failed to satisfy constraint: Member must have length greater than or equal to 1",
        ));
    }
    names
        .iter()
        .map(|name| {
            GrantOperation::parse(name).ok_or_else(|| {
                if OTHER_KEY_USAGE_OPERATIONS.contains(&name.as_str()) {
                    AwsError::validation(format!(
                        "Grant operation {name} is not valid for a symmetric encryption KMS key"
                    ))
                } else {
                    let mut all: Vec<&str> =
                        GrantOperation::ALL.iter().map(|op| op.name()).collect();
                    all.extend_from_slice(OTHER_KEY_USAGE_OPERATIONS);
                    AwsError::not_in_enum("operations.member", name, &all)
                }
            })
        })
        .collect()
}

/// `Limit` (1 to 100, default 50, as AWS KMS's grant listings) and `Marker` (the index
/// the previous page ended at) of a grant listing.
fn grant_list_position(
    limit_param: Option<u32>,
    marker: Option<&str>,
) -> Result<(usize, usize), AwsError> {
    let limit = match limit_param {
        None => 50,
        Some(n) if (1..=100).contains(&n) => n as usize,
        Some(n) => {
            return Err(AwsError::validation(format!(
                "1 validation error detected: Value '{n}' at 'limit' failed to satisfy constraint: Member must have value {}",
                if n == 0 {
                    "greater than or equal to 1"
                } else {
                    "less than or equal to 100"
                }
            )));
        }
    };
    let (_, start) = list_position(None, marker)?;
    Ok((limit, start))
}

/// The keys and grants the `GrantTokens` of a request body name (none if it has none): at
/// most 10, each a token wrapd issued ([`crate::ops::parse_grant_token`]), else
/// `ValidationException` or `InvalidGrantTokenException`. The body is read again only when
/// it names the member.
pub fn grant_tokens(body: &[u8]) -> Result<Vec<(crate::ids::KeyId, String)>, AwsError> {
    if !body
        .windows(b"GrantTokens".len())
        .any(|w| w == b"GrantTokens")
    {
        return Ok(Vec::new());
    }
    #[derive(serde::Deserialize)]
    #[serde(rename_all = "PascalCase")]
    struct Tokens {
        grant_tokens: Option<Vec<String>>,
    }
    let tokens = serde_json::from_slice::<Tokens>(body)
        .ok()
        .and_then(|t| t.grant_tokens)
        .unwrap_or_default();
    if tokens.len() > 10 {
        return Err(AwsError::validation(
            "1 validation error detected: Value at 'grantTokens' failed to satisfy constraint: Member must have length less than or equal to 10",
        ));
    }
    tokens
        .iter()
        .map(|token| crate::ops::parse_grant_token(token).map_err(|err| AwsError::from_error(&err)))
        .collect()
}

/// Tags as the API sends them, as a map (a repeated key: the last value wins).
fn tag_map(tags: Vec<model::Tag>) -> BTreeMap<String, String> {
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

#[cfg(test)]
mod tests {
    use super::*;

    fn arns() -> Arns {
        Arns::new("us-east-1", "111122223333")
    }

    #[test]
    fn every_operation_wrapd_implements_decodes_to_its_policy_operation() {
        // The operation does not depend on the body: a bad one is refused under it.
        let body = b"{}";
        let table = [
            ("CreateKey", Operation::CreateKey),
            ("DescribeKey", Operation::DescribeKey),
            ("ListKeyRotations", Operation::DescribeKey),
            ("GetKeyRotationStatus", Operation::DescribeKey),
            ("ListResourceTags", Operation::DescribeKey),
            ("ListKeys", Operation::ListKeys),
            ("EnableKey", Operation::EnableKey),
            ("DisableKey", Operation::DisableKey),
            ("CancelKeyDeletion", Operation::CancelKeyDeletion),
            ("ScheduleKeyDeletion", Operation::ScheduleKeyDeletion),
            ("RotateKeyOnDemand", Operation::RotateKey),
            ("EnableKeyRotation", Operation::EnableKeyRotation),
            ("DisableKeyRotation", Operation::DisableKeyRotation),
            ("TagResource", Operation::TagKey),
            ("UntagResource", Operation::UntagKey),
            ("UpdateKeyDescription", Operation::UpdateKeyDescription),
            ("CreateAlias", Operation::CreateAlias),
            ("UpdateAlias", Operation::UpdateAlias),
            ("DeleteAlias", Operation::DeleteAlias),
            ("ListAliases", Operation::ListAliases),
            ("GenerateDataKey", Operation::GenerateDataKey),
            (
                "GenerateDataKeyWithoutPlaintext",
                Operation::GenerateDataKeyWithoutPlaintext,
            ),
            ("Encrypt", Operation::Wrap),
            ("Decrypt", Operation::Unwrap),
            ("ReEncrypt", Operation::ReWrap),
            ("GenerateRandom", Operation::GenerateRandom),
            ("GetParametersForImport", Operation::GetParametersForImport),
            ("ImportKeyMaterial", Operation::ImportKeyMaterial),
            (
                "DeleteImportedKeyMaterial",
                Operation::DeleteImportedKeyMaterial,
            ),
            ("CreateGrant", Operation::CreateGrant),
            ("ListGrants", Operation::ListGrants),
            ("ListRetirableGrants", Operation::ListRetirableGrants),
            ("RetireGrant", Operation::RetireGrant),
            ("RevokeGrant", Operation::RevokeGrant),
        ];
        for (target, operation) in table {
            let (decoded, _) = decode(target, body, &arns()).expect(target);
            assert_eq!(decoded, operation, "{target}");
        }
        assert!(decode("Sign", body, &arns()).is_none());
        assert!(decode("", body, &arns()).is_none());
    }

    #[test]
    fn a_valid_request_decodes_into_wrapds_terms() {
        let body = br#"{"KeyId":"arn:aws:kms:us-east-1:111122223333:alias/app","KeySpec":"AES_128","EncryptionContext":{"a":"b"}}"#;
        let (_, request) = decode("GenerateDataKeyWithoutPlaintext", body, &arns()).unwrap();
        let Ok(KmsRequest::GenerateDataKey {
            key,
            context,
            bytes,
            with_plaintext,
            named,
        }) = request
        else {
            panic!("not a data key request");
        };
        assert_eq!(
            (key.as_str(), bytes, with_plaintext),
            ("alias/app", 16, false)
        );
        assert_eq!(
            named.as_deref(),
            Some("arn:aws:kms:us-east-1:111122223333:alias/app")
        );
        assert_eq!(context.get("a").map(String::as_str), Some("b"));
    }

    #[test]
    fn a_value_aws_does_not_know_is_a_validation_error_and_one_wrapd_lacks_is_unsupported() {
        let refused = |target: &str, body: &str| {
            let (_, request) = decode(target, body.as_bytes(), &arns()).unwrap();
            request.err().expect("refused")
        };
        let unknown = refused("CreateKey", r#"{"KeySpec":"AES_512"}"#);
        assert_eq!(unknown.code, "ValidationException");
        assert!(
            unknown.message.starts_with(
                "1 validation error detected: Value 'AES_512' at 'keySpec' failed to satisfy constraint: Member must satisfy enum value set: [RSA_2048,"
            ),
            "{}",
            unknown.message
        );
        assert_eq!(
            refused("CreateKey", r#"{"KeySpec":"RSA_2048"}"#).code,
            "UnsupportedOperationException"
        );
        assert_eq!(
            refused("CreateKey", r#"{"Origin":"SOMEWHERE"}"#).code,
            "ValidationException"
        );
        assert_eq!(
            refused("CreateKey", r#"{"Origin":"AWS_CLOUDHSM"}"#).code,
            "UnsupportedOperationException"
        );
        assert_eq!(
            refused("CreateKey", r#"{"KeyUsage":"WRAP"}"#).code,
            "ValidationException"
        );
        for (target, body) in [
            ("ListKeyRotations", r#"{"KeyId":"alias/x","Marker":"zz"}"#),
            ("ListKeys", r#"{"Marker":"zz"}"#),
            ("ListAliases", r#"{"Marker":"zz"}"#),
        ] {
            assert_eq!(
                refused(target, body).code,
                "InvalidMarkerException",
                "{target}"
            );
        }
    }

    #[test]
    fn a_request_asking_for_what_wrapd_does_not_offer_is_refused_at_decoding() {
        for (target, body) in [
            ("CreateKey", r#"{"KeySpec":"RSA_2048"}"#),
            ("CreateKey", r#"{"Policy":""}"#),
            ("CreateKey", r#"{"Policy":"{\u0100}"}"#),
            ("PutKeyPolicy", r#"{"KeyId":"alias/x","Policy":"{}"}"#),
            (
                "GetKeyPolicy",
                r#"{"KeyId":"0123456789abcdef0123456789abcdef","PolicyName":"a-b"}"#,
            ),
            (
                "ListKeyPolicies",
                r#"{"KeyId":"0123456789abcdef0123456789abcdef","Marker":"x"}"#,
            ),
            (
                "GenerateDataKey",
                r#"{"KeyId":"alias/x","NumberOfBytes":0}"#,
            ),
            (
                "GenerateDataKey",
                r#"{"KeyId":"alias/x","KeySpec":"AES_256","NumberOfBytes":32}"#,
            ),
            ("Decrypt", r#"{"CiphertextBlob":"AAAA","DryRun":true}"#),
            (
                "ScheduleKeyDeletion",
                r#"{"KeyId":"alias/x","PendingWindowInDays":6}"#,
            ),
            ("ListKeys", r#"{"Limit":0}"#),
            ("GenerateRandom", r#"{}"#),
            ("Encrypt", r#"{"KeyId":"","Plaintext":"AAAA"}"#),
            ("DescribeKey", r#"{"KeyId":1}"#),
        ] {
            let (_, request) = decode(target, body.as_bytes(), &arns()).expect(target);
            assert!(request.is_err(), "{target} {body}");
        }
    }
}
