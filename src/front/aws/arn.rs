//! Names of keys as the AWS KMS API spells them: bare key ids, key ARNs, alias names and
//! alias ARNs, and their translation to wrapd's own (`key/<32 hex>`, `alias/NAME`).
//!
//! A wrapd key `key/2f6c…` has the bare id `2f6c…` and the ARN
//! `arn:aws:kms:<region>:<account>:key/2f6c…`; an alias `alias/NAME` has the ARN
//! `arn:aws:kms:<region>:<account>:alias/NAME`. Every `KeyId` parameter takes any of the four
//! forms (and wrapd's own `key/…`) where AWS takes all four ([`Arns::key_ref`]); where AWS
//! takes only a key id or key ARN (key management: rotation, tags, state, deletion, import,
//! an alias's target), so does wrapd ([`Arns::key_id_ref`]), so that code developed against
//! wrapd does not break on AWS. Every response names a key by its ARN, always spelled
//! the same way, because the Encryption SDK compares the `KeyId` of a Decrypt answer with
//! the ARN it stored in the message.

use super::error::AwsError;
use crate::ids::{AliasName, KeyId};

/// The partition in every ARN.
pub const PARTITION: &str = "aws";

/// The region and account of this daemon's ARNs.
#[derive(Debug, Clone)]
pub struct Arns {
    region: String,
    account: String,
}

impl Arns {
    /// ARNs in `region` and `account` (both checked by the config).
    pub fn new(region: impl Into<String>, account: impl Into<String>) -> Self {
        Self {
            region: region.into(),
            account: account.into(),
        }
    }

    /// The region.
    pub fn region(&self) -> &str {
        &self.region
    }

    /// The account id.
    pub fn account(&self) -> &str {
        &self.account
    }

    fn prefix(&self) -> String {
        format!("arn:{PARTITION}:kms:{}:{}:", self.region, self.account)
    }

    /// The key's ARN: `arn:aws:kms:REGION:ACCOUNT:key/HEX`.
    pub fn key_arn(&self, id: &KeyId) -> String {
        format!("{}{}", self.prefix(), id.as_str())
    }

    /// The alias's ARN: `arn:aws:kms:REGION:ACCOUNT:alias/NAME`.
    pub fn alias_arn(&self, alias: &AliasName) -> String {
        format!("{}{}", self.prefix(), alias.as_str())
    }

    /// A `KeyId` parameter in wrapd's form (`key/HEX` or `alias/NAME`), for the operation
    /// layer. An ARN of another partition, region or account names no key here.
    pub fn key_ref(&self, param: &str) -> Result<String, AwsError> {
        if param.is_empty() {
            return Err(AwsError::validation("KeyId must not be empty"));
        }
        let resource = if param.starts_with("arn:") {
            let mut parts = param.splitn(6, ':');
            let (_, partition, service, region, account, resource) = (
                parts.next(),
                parts.next(),
                parts.next(),
                parts.next(),
                parts.next(),
                parts.next(),
            );
            if partition != Some(PARTITION) || service != Some("kms") {
                return Err(AwsError::not_found(format!(
                    "Invalid arn {}",
                    truncate(param)
                )));
            }
            if region != Some(self.region.as_str()) || account != Some(self.account.as_str()) {
                return Err(AwsError::not_found(format!(
                    "{} is not in this region and account ({}, {})",
                    truncate(param),
                    self.region,
                    self.account
                )));
            }
            resource.unwrap_or_default()
        } else {
            param
        };
        if resource.starts_with(AliasName::PREFIX) {
            return Ok(resource.to_owned());
        }
        let hex = resource.strip_prefix(KeyId::PREFIX).unwrap_or(resource);
        let id = KeyId::parse(&format!("{}{hex}", KeyId::PREFIX))
            .map_err(|_| AwsError::not_found(format!("Invalid keyId {}", truncate(param))))?;
        Ok(id.to_string())
    }
}

impl Arns {
    /// A `KeyId` parameter that AWS takes only as a key id or key ARN, in wrapd's form
    /// (`key/HEX`): an alias name or alias ARN is `NotFoundException`, as an id that is not
    /// one.
    pub fn key_id_ref(&self, param: &str) -> Result<String, AwsError> {
        let key = self.key_ref(param)?;
        if key.starts_with(AliasName::PREFIX) {
            return Err(AwsError::not_found(format!(
                "Invalid keyId {}: this operation takes a key id or key ARN, not an alias",
                truncate(param)
            )));
        }
        Ok(key)
    }
}

/// The bare key id: the 32 hex digits of `key/HEX`.
pub fn bare_id(id: &KeyId) -> &str {
    id.as_str()
        .strip_prefix(KeyId::PREFIX)
        .unwrap_or(id.as_str())
}

/// A caller's string, cut for an error message.
pub(super) fn truncate(s: &str) -> String {
    const MAX: usize = 256;
    if s.len() <= MAX {
        return s.to_owned();
    }
    let mut end = MAX;
    while !s.is_char_boundary(end) {
        end -= 1;
    }
    format!("{}…", &s[..end])
}

#[cfg(test)]
mod tests {
    use super::*;

    const HEX: &str = "0123456789abcdef0123456789abcdef";

    fn arns() -> Arns {
        Arns::new("eu-west-3", "111122223333")
    }

    #[test]
    fn every_form_of_a_key_id_names_the_same_key() {
        let arns = arns();
        let key = format!("key/{HEX}");
        for form in [
            HEX.to_owned(),
            key.clone(),
            format!("arn:aws:kms:eu-west-3:111122223333:key/{HEX}"),
        ] {
            assert_eq!(arns.key_ref(&form).unwrap(), key, "{form}");
        }
        assert_eq!(arns.key_ref("alias/app").unwrap(), "alias/app");
        assert_eq!(
            arns.key_ref("arn:aws:kms:eu-west-3:111122223333:alias/app")
                .unwrap(),
            "alias/app"
        );
    }

    #[test]
    fn where_aws_takes_only_a_key_id_or_arn_an_alias_is_not_found() {
        let arns = arns();
        let key = format!("key/{HEX}");
        for form in [
            HEX.to_owned(),
            format!("arn:aws:kms:eu-west-3:111122223333:key/{HEX}"),
        ] {
            assert_eq!(arns.key_id_ref(&form).unwrap(), key, "{form}");
        }
        for alias in ["alias/app", "arn:aws:kms:eu-west-3:111122223333:alias/app"] {
            let err = arns.key_id_ref(alias).unwrap_err();
            assert_eq!(err.code, "NotFoundException", "{alias}");
            assert!(err.message.contains("not an alias"), "{}", err.message);
        }
    }

    #[test]
    fn a_key_arn_round_trips() {
        let arns = arns();
        let id = KeyId::parse(&format!("key/{HEX}")).unwrap();
        let arn = arns.key_arn(&id);
        assert_eq!(arn, format!("arn:aws:kms:eu-west-3:111122223333:key/{HEX}"));
        assert_eq!(arns.key_ref(&arn).unwrap(), id.to_string());
        assert_eq!(bare_id(&id), HEX);
    }

    #[test]
    fn an_arn_of_another_account_region_or_service_is_not_found() {
        let arns = arns();
        for other in [
            format!("arn:aws:kms:us-east-1:111122223333:key/{HEX}"),
            format!("arn:aws:kms:eu-west-3:999999999999:key/{HEX}"),
            format!("arn:aws:s3:eu-west-3:111122223333:key/{HEX}"),
            format!("arn:aws-cn:kms:eu-west-3:111122223333:key/{HEX}"),
            "arn:aws:kms".to_owned(),
            "not-hex".to_owned(),
        ] {
            let err = arns.key_ref(&other).unwrap_err();
            assert_eq!(err.code, "NotFoundException", "{other}");
        }
        assert_eq!(arns.key_ref("").unwrap_err().code, "ValidationException");
    }
}
