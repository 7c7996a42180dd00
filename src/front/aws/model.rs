//! Request bodies of the AWS KMS JSON API, as the AWS SDKs send them (PascalCase members,
//! blobs in base64). Unknown members are refused (`ValidationException`): a parameter
//! wrapd would not honour is never silently dropped. The members that make no sense for
//! wrapd but are harmless are accepted and documented where they are read.
//!
//! The members are the AWS KMS API's own, documented in its API reference.

#![allow(missing_docs)]

use std::collections::HashMap;

use base64::Engine;
use base64::engine::general_purpose::STANDARD;
use serde::Deserialize;
use zeroize::Zeroizing;

use super::error::AwsError;

/// A base64 blob member that holds no secret (ciphertexts).
#[derive(Debug, Default, Deserialize)]
#[serde(transparent)]
pub struct Blob(String);

impl Blob {
    /// The decoded bytes, or a `ValidationException` naming the member.
    pub fn decode(&self, member: &str) -> Result<Vec<u8>, AwsError> {
        STANDARD
            .decode(&self.0)
            .map_err(|_| AwsError::validation(format!("{member} is not valid base64")))
    }
}

/// A base64 blob member that holds a secret (plaintext): zeroized when dropped.
#[derive(Default, Deserialize)]
#[serde(transparent)]
pub struct SecretBlob(Zeroizing<String>);

impl SecretBlob {
    /// The decoded bytes, zeroizing.
    pub fn decode(&self, member: &str) -> Result<Zeroizing<Vec<u8>>, AwsError> {
        let mut bytes = Zeroizing::new(Vec::with_capacity(self.0.len() * 3 / 4 + 3));
        STANDARD
            .decode_vec(self.0.as_bytes(), &mut bytes)
            .map_err(|_| AwsError::validation(format!("{member} is not valid base64")))?;
        Ok(bytes)
    }
}

impl std::fmt::Debug for SecretBlob {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("<redacted>")
    }
}

/// An encryption context member.
pub type Context = Option<HashMap<String, String>>;

/// One tag.
#[derive(Debug, Deserialize)]
#[serde(rename_all = "PascalCase", deny_unknown_fields)]
pub struct Tag {
    /// Its key.
    pub tag_key: String,
    /// Its value.
    pub tag_value: String,
}

/// `CreateKey`.
#[derive(Debug, Default, Deserialize)]
#[serde(rename_all = "PascalCase", deny_unknown_fields)]
pub struct CreateKey {
    pub description: Option<String>,
    pub key_usage: Option<String>,
    pub key_spec: Option<String>,
    pub customer_master_key_spec: Option<String>,
    pub origin: Option<String>,
    pub policy: Option<String>,
    pub bypass_policy_lockout_safety_check: Option<bool>,
    pub tags: Option<Vec<Tag>>,
    pub multi_region: Option<bool>,
    pub custom_key_store_id: Option<String>,
    pub xks_key_id: Option<String>,
}

/// The operations that take one key and nothing else (`DescribeKey`, `EnableKey`, …).
#[derive(Debug, Default, Deserialize)]
#[serde(rename_all = "PascalCase", deny_unknown_fields)]
pub struct KeyOnly {
    pub key_id: String,
    /// Checked and honoured by the front end before the request runs.
    pub grant_tokens: Option<Vec<String>>,
}

/// wrapd's extensions that take a key and one of its versions (`RetireKeyVersion`, …).
#[derive(Debug, Default, Deserialize)]
#[serde(rename_all = "PascalCase", deny_unknown_fields)]
pub struct KeyVersion {
    pub key_id: String,
    pub version: u32,
}

/// wrapd's extension `ScheduleKeyVersionDestruction`.
#[derive(Debug, Default, Deserialize)]
#[serde(rename_all = "PascalCase", deny_unknown_fields)]
pub struct ScheduleKeyVersionDestruction {
    pub key_id: String,
    pub version: u32,
    pub pending_window_in_days: Option<u32>,
}

/// `GetParametersForImport`.
#[derive(Debug, Default, Deserialize)]
#[serde(rename_all = "PascalCase", deny_unknown_fields)]
pub struct GetParametersForImport {
    pub key_id: String,
    pub wrapping_algorithm: String,
    pub wrapping_key_spec: String,
}

/// `ImportKeyMaterial`. `ValidTo` is epoch seconds, as the JSON protocol carries
/// timestamps.
#[derive(Debug, Default, Deserialize)]
#[serde(rename_all = "PascalCase", deny_unknown_fields)]
pub struct ImportKeyMaterial {
    pub key_id: String,
    pub import_token: Blob,
    pub encrypted_key_material: Blob,
    pub valid_to: Option<f64>,
    pub expiration_model: Option<String>,
    /// Refused when `NEW_KEY_MATERIAL`: imported keys are not rotated.
    pub import_type: Option<String>,
    /// Refused: wrapd keeps one material per key.
    pub key_material_description: Option<String>,
    pub key_material_id: Option<String>,
}

/// `DeleteImportedKeyMaterial`.
#[derive(Debug, Default, Deserialize)]
#[serde(rename_all = "PascalCase", deny_unknown_fields)]
pub struct DeleteImportedKeyMaterial {
    pub key_id: String,
    /// Refused: wrapd keeps one material per key.
    pub key_material_id: Option<String>,
}

/// `EnableKeyRotation`.
#[derive(Debug, Default, Deserialize)]
#[serde(rename_all = "PascalCase", deny_unknown_fields)]
pub struct EnableKeyRotation {
    pub key_id: String,
    pub rotation_period_in_days: Option<u32>,
}

/// `ListKeys`.
#[derive(Debug, Default, Deserialize)]
#[serde(rename_all = "PascalCase", deny_unknown_fields)]
pub struct ListKeys {
    pub limit: Option<u32>,
    pub marker: Option<String>,
}

/// `ListAliases`.
#[derive(Debug, Default, Deserialize)]
#[serde(rename_all = "PascalCase", deny_unknown_fields)]
pub struct ListAliases {
    pub key_id: Option<String>,
    pub limit: Option<u32>,
    pub marker: Option<String>,
}

/// `ListKeyRotations` and `ListResourceTags`.
#[derive(Debug, Default, Deserialize)]
#[serde(rename_all = "PascalCase", deny_unknown_fields)]
pub struct ListOfKey {
    pub key_id: String,
    pub limit: Option<u32>,
    pub marker: Option<String>,
}

/// `CreateAlias`, `UpdateAlias`.
#[derive(Debug, Default, Deserialize)]
#[serde(rename_all = "PascalCase", deny_unknown_fields)]
pub struct PointAlias {
    pub alias_name: String,
    pub target_key_id: String,
}

/// `DeleteAlias`.
#[derive(Debug, Default, Deserialize)]
#[serde(rename_all = "PascalCase", deny_unknown_fields)]
pub struct DeleteAlias {
    pub alias_name: String,
}

/// `ScheduleKeyDeletion`.
#[derive(Debug, Default, Deserialize)]
#[serde(rename_all = "PascalCase", deny_unknown_fields)]
pub struct ScheduleKeyDeletion {
    pub key_id: String,
    pub pending_window_in_days: Option<u32>,
}

/// `GenerateDataKey`, `GenerateDataKeyWithoutPlaintext`.
#[derive(Debug, Default, Deserialize)]
#[serde(rename_all = "PascalCase", deny_unknown_fields)]
pub struct GenerateDataKey {
    pub key_id: String,
    pub encryption_context: Context,
    pub number_of_bytes: Option<u32>,
    pub key_spec: Option<String>,
    /// Checked and honoured by the front end before the request runs.
    pub grant_tokens: Option<Vec<String>>,
    pub dry_run: Option<bool>,
    pub recipient: Option<serde_json::Value>,
}

/// `Encrypt`.
#[derive(Debug, Default, Deserialize)]
#[serde(rename_all = "PascalCase", deny_unknown_fields)]
pub struct Encrypt {
    pub key_id: String,
    pub plaintext: SecretBlob,
    pub encryption_context: Context,
    pub encryption_algorithm: Option<String>,
    /// Checked and honoured by the front end before the request runs.
    pub grant_tokens: Option<Vec<String>>,
    pub dry_run: Option<bool>,
}

/// `Decrypt`.
#[derive(Debug, Default, Deserialize)]
#[serde(rename_all = "PascalCase", deny_unknown_fields)]
pub struct Decrypt {
    pub ciphertext_blob: Blob,
    pub encryption_context: Context,
    pub key_id: Option<String>,
    pub encryption_algorithm: Option<String>,
    /// Checked and honoured by the front end before the request runs.
    pub grant_tokens: Option<Vec<String>>,
    pub dry_run: Option<bool>,
    pub recipient: Option<serde_json::Value>,
}

/// `ReEncrypt`.
#[derive(Debug, Default, Deserialize)]
#[serde(rename_all = "PascalCase", deny_unknown_fields)]
pub struct ReEncrypt {
    pub ciphertext_blob: Blob,
    pub source_encryption_context: Context,
    pub source_key_id: Option<String>,
    pub destination_key_id: String,
    pub destination_encryption_context: Context,
    pub source_encryption_algorithm: Option<String>,
    pub destination_encryption_algorithm: Option<String>,
    /// Checked and honoured by the front end before the request runs.
    pub grant_tokens: Option<Vec<String>>,
    pub dry_run: Option<bool>,
}

/// `GenerateRandom`.
#[derive(Debug, Default, Deserialize)]
#[serde(rename_all = "PascalCase", deny_unknown_fields)]
pub struct GenerateRandom {
    pub number_of_bytes: Option<u32>,
    pub custom_key_store_id: Option<String>,
    pub recipient: Option<serde_json::Value>,
}

/// `TagResource`.
#[derive(Debug, Default, Deserialize)]
#[serde(rename_all = "PascalCase", deny_unknown_fields)]
pub struct TagResource {
    pub key_id: String,
    pub tags: Vec<Tag>,
}

/// `GetKeyPolicy`.
#[derive(Debug, Default, Deserialize)]
#[serde(rename_all = "PascalCase", deny_unknown_fields)]
pub struct GetKeyPolicy {
    pub key_id: String,
    pub policy_name: Option<String>,
}

/// `PutKeyPolicy`.
#[derive(Debug, Default, Deserialize)]
#[serde(rename_all = "PascalCase", deny_unknown_fields)]
pub struct PutKeyPolicy {
    pub key_id: String,
    pub policy_name: Option<String>,
    pub policy: String,
    pub bypass_policy_lockout_safety_check: Option<bool>,
}

/// `ListKeyPolicies`.
#[derive(Debug, Default, Deserialize)]
#[serde(rename_all = "PascalCase", deny_unknown_fields)]
pub struct ListKeyPolicies {
    pub key_id: String,
    pub limit: Option<u32>,
    pub marker: Option<String>,
}

/// `UpdateKeyDescription`.
#[derive(Debug, Default, Deserialize)]
#[serde(rename_all = "PascalCase", deny_unknown_fields)]
pub struct UpdateKeyDescription {
    pub key_id: String,
    pub description: String,
}

/// `UntagResource`.
#[derive(Debug, Default, Deserialize)]
#[serde(rename_all = "PascalCase", deny_unknown_fields)]
pub struct UntagResource {
    pub key_id: String,
    pub tag_keys: Vec<String>,
}

/// Parses a request body (empty means `{}`): malformed JSON is a `SerializationException`,
/// a missing, unknown or mistyped member a `ValidationException`.
pub fn parse<'a, T: Deserialize<'a>>(body: &'a [u8]) -> Result<T, AwsError> {
    if body.iter().all(u8::is_ascii_whitespace) {
        return serde_json::from_slice(b"{}").map_err(data_error);
    }
    serde_json::from_slice(body).map_err(|e| match e.classify() {
        serde_json::error::Category::Data => data_error(e),
        _ => AwsError::new(
            "SerializationException",
            http::StatusCode::BAD_REQUEST,
            "the request body is not valid JSON",
        ),
    })
}

fn data_error(e: serde_json::Error) -> AwsError {
    // "unknown field `Foo`" and "missing field `KeyId`" name a member, which helps the
    // caller; "invalid type: integer `123`…" and "invalid value…" would echo a value (a
    // plaintext, a context value) into the answer and the audit log, so they are replaced.
    let message = e.to_string();
    let message = message.split(" at line ").next().unwrap_or(&message);
    let names_a_member =
        message.starts_with("unknown field") || message.starts_with("missing field");
    AwsError::validation(if names_a_member {
        message.to_owned()
    } else {
        "a member has the wrong type or an invalid value".to_owned()
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn an_unknown_member_is_a_validation_error_naming_it() {
        let err = parse::<KeyOnly>(br#"{"KeyId":"x","Frobnicate":true}"#).unwrap_err();
        assert_eq!(err.code, "ValidationException");
        assert!(err.message.contains("Frobnicate"), "{}", err.message);
    }

    #[test]
    fn a_missing_member_is_a_validation_error() {
        let err = parse::<KeyOnly>(b"{}").unwrap_err();
        assert_eq!(err.code, "ValidationException");
        assert!(err.message.contains("KeyId"), "{}", err.message);
    }

    #[test]
    fn a_mistyped_member_is_refused_without_echoing_its_value() {
        let err =
            parse::<GenerateDataKey>(br#"{"KeyId":"k","EncryptionContext":{"tenant":12345678}}"#)
                .unwrap_err();
        assert_eq!(err.code, "ValidationException");
        assert!(!err.message.contains("12345678"), "{}", err.message);
    }

    #[test]
    fn malformed_json_is_a_serialization_error() {
        let err = parse::<KeyOnly>(b"{\"KeyId\":").unwrap_err();
        assert_eq!(err.code, "SerializationException");
    }

    #[test]
    fn an_empty_body_is_an_empty_object() {
        let req = parse::<ListKeys>(b"").unwrap();
        assert!(req.limit.is_none());
    }

    #[test]
    fn a_plaintext_member_decodes_and_a_bad_one_is_refused() {
        let req = parse::<Encrypt>(br#"{"KeyId":"k","Plaintext":"aGVsbG8="}"#).unwrap();
        assert_eq!(&**req.plaintext.decode("Plaintext").unwrap(), b"hello");
        let req = parse::<Encrypt>(br#"{"KeyId":"k","Plaintext":"!!"}"#).unwrap();
        assert_eq!(
            req.plaintext.decode("Plaintext").unwrap_err().code,
            "ValidationException"
        );
    }
}

/// `CreateGrant`'s `Constraints`.
#[derive(Debug, Default, Deserialize)]
#[serde(rename_all = "PascalCase", deny_unknown_fields)]
pub struct GrantConstraints {
    pub encryption_context_subset: Option<std::collections::BTreeMap<String, String>>,
    pub encryption_context_equals: Option<std::collections::BTreeMap<String, String>>,
}

/// `CreateGrant`.
#[derive(Debug, Default, Deserialize)]
#[serde(rename_all = "PascalCase", deny_unknown_fields)]
pub struct CreateGrant {
    pub key_id: String,
    pub grantee_principal: String,
    pub retiring_principal: Option<String>,
    pub operations: Vec<String>,
    pub constraints: Option<GrantConstraints>,
    /// Checked and honoured by the front end before the request runs.
    pub grant_tokens: Option<Vec<String>>,
    pub name: Option<String>,
    pub dry_run: Option<bool>,
}

/// `ListGrants`.
#[derive(Debug, Default, Deserialize)]
#[serde(rename_all = "PascalCase", deny_unknown_fields)]
pub struct ListGrants {
    pub key_id: String,
    pub limit: Option<u32>,
    pub marker: Option<String>,
    pub grant_id: Option<String>,
    pub grantee_principal: Option<String>,
}

/// `ListRetirableGrants`.
#[derive(Debug, Default, Deserialize)]
#[serde(rename_all = "PascalCase", deny_unknown_fields)]
pub struct ListRetirableGrants {
    pub retiring_principal: String,
    pub limit: Option<u32>,
    pub marker: Option<String>,
}

/// `RetireGrant`.
#[derive(Debug, Default, Deserialize)]
#[serde(rename_all = "PascalCase", deny_unknown_fields)]
pub struct RetireGrant {
    pub grant_token: Option<String>,
    pub key_id: Option<String>,
    pub grant_id: Option<String>,
    pub dry_run: Option<bool>,
}

/// `RevokeGrant`.
#[derive(Debug, Default, Deserialize)]
#[serde(rename_all = "PascalCase", deny_unknown_fields)]
pub struct RevokeGrant {
    pub key_id: String,
    pub grant_id: String,
    pub dry_run: Option<bool>,
}
