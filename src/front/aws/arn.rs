//! Names of keys as the AWS KMS API spells them: bare key ids, key ARNs, alias names and
//! alias ARNs, and their translation to wrapd's own (`key/<32 hex>`, `alias/NAME`).
//!
//! A wrapd key `key/0123456789abcdef0123456789abcdef` has, as AWS KMS writes key ids, the
//! bare id `01234567-89ab-cdef-0123-456789abcdef` (the same 16 bytes as a UUID) and the ARN
//! `arn:aws:kms:<region>:<account>:key/01234567-89ab-cdef-0123-456789abcdef`; an alias
//! `alias/NAME` has the ARN `arn:aws:kms:<region>:<account>:alias/NAME`. Every `KeyId`
//! parameter takes any of the four forms, with the id as a UUID or as its 32 hex digits (and
//! wrapd's own `key/…`), where AWS takes all four ([`Arns::key_ref`]); where AWS takes only a
//! key id or key ARN (key management: rotation, tags, state, deletion, import, an alias's
//! target, grants), so does wrapd ([`Arns::key_id_ref`]), so that code developed against
//! wrapd does not break on AWS.
//!
//! An endpoint answers for one or more regions (`[aws] region` and `regions`): an ARN of
//! any of them names the key, and answers are written in the region the request was signed
//! for ([`Arns::in_region`]). Where a data-plane answer names the key the request named by a
//! key ARN, it echoes that ARN as written ([`Arns::answer_arn`]), because the Encryption SDK
//! compares the `KeyId` of a Decrypt answer with the ARN it stored in the message, which
//! may be spelled the older way (32 hex digits) or in another configured region.

use std::sync::Arc;

use super::error::AwsError;
use crate::ids::{AliasName, KeyId};

/// The partition in every ARN.
pub const PARTITION: &str = "aws";

/// The regions and account of this daemon's ARNs, and the region answers are written in.
#[derive(Debug, Clone)]
pub struct Arns {
    region: String,
    regions: Arc<[String]>,
    account: String,
}

impl Arns {
    /// ARNs in `region` alone and `account` (both checked by the config).
    pub fn new(region: impl Into<String>, account: impl Into<String>) -> Self {
        let region = region.into();
        Self {
            regions: Arc::from(vec![region.clone()]),
            region,
            account: account.into(),
        }
    }

    /// ARNs in each of `regions` (the first is the one answers are written in until
    /// [`Arns::in_region`] says otherwise; at least one) and `account`.
    pub fn with_regions(regions: &[String], account: impl Into<String>) -> Self {
        Self {
            region: regions.first().cloned().unwrap_or_default(),
            regions: Arc::from(regions.to_vec()),
            account: account.into(),
        }
    }

    /// The same ARNs, with answers written in `region` (one of [`Arns::regions`]: the
    /// region a request was signed for).
    pub fn in_region(&self, region: &str) -> Self {
        Self {
            region: region.to_owned(),
            ..self.clone()
        }
    }

    /// The region answers are written in.
    pub fn region(&self) -> &str {
        &self.region
    }

    /// Every region the endpoint answers for.
    pub fn regions(&self) -> &[String] {
        &self.regions
    }

    /// The account id.
    pub fn account(&self) -> &str {
        &self.account
    }

    fn prefix(&self) -> String {
        format!("arn:{PARTITION}:kms:{}:{}:", self.region, self.account)
    }

    /// The key's ARN: `arn:aws:kms:REGION:ACCOUNT:key/UUID`.
    pub fn key_arn(&self, id: &KeyId) -> String {
        format!("{}{}{}", self.prefix(), KeyId::PREFIX, id.uuid())
    }

    /// The ARN a data-plane answer names key `id` by: `named`, the `KeyId` parameter as the
    /// caller wrote it, if that is a key ARN of this key (in whichever form and configured
    /// region), else [`Arns::key_arn`].
    pub fn answer_arn(&self, named: Option<&str>, id: &KeyId) -> String {
        match named {
            Some(arn)
                if arn.starts_with("arn:")
                    && self.key_ref(arn).is_ok_and(|key| key == id.as_str()) =>
            {
                arn.to_owned()
            }
            _ => self.key_arn(id),
        }
    }

    /// The alias's ARN: `arn:aws:kms:REGION:ACCOUNT:alias/NAME`.
    pub fn alias_arn(&self, alias: &AliasName) -> String {
        format!("{}{}", self.prefix(), alias.as_str())
    }

    /// A `KeyId` parameter in wrapd's form (`key/HEX` or `alias/NAME`), for the operation
    /// layer. An ARN of another partition, account or region than the endpoint's names no
    /// key here.
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
            let ours = region.is_some_and(|r| self.regions.iter().any(|own| own == r));
            if !ours || account != Some(self.account.as_str()) {
                return Err(AwsError::not_found(format!(
                    "{} is not in this endpoint's regions and account",
                    truncate(param)
                )));
            }
            // An ARN's resource is `key/ID` or `alias/NAME`, never a bare id.
            let resource = resource.unwrap_or_default();
            if !resource.starts_with(KeyId::PREFIX) && !resource.starts_with(AliasName::PREFIX) {
                return Err(AwsError::not_found(format!(
                    "Invalid arn {}",
                    truncate(param)
                )));
            }
            resource
        } else {
            param
        };
        if resource.starts_with(AliasName::PREFIX) {
            return Ok(resource.to_owned());
        }
        let id = resource.strip_prefix(KeyId::PREFIX).unwrap_or(resource);
        let id = KeyId::parse_named(&format!("{}{id}", KeyId::PREFIX))
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

/// The bare key id, as AWS KMS writes key ids: the id's 16 bytes as a UUID.
pub fn bare_id(id: &KeyId) -> String {
    id.uuid()
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

    const UUID: &str = "01234567-89ab-cdef-0123-456789abcdef";

    #[test]
    fn every_form_of_a_key_id_names_the_same_key() {
        let arns = arns();
        let key = format!("key/{HEX}");
        for form in [
            HEX.to_owned(),
            UUID.to_owned(),
            key.clone(),
            format!("key/{UUID}"),
            format!("arn:aws:kms:eu-west-3:111122223333:key/{HEX}"),
            format!("arn:aws:kms:eu-west-3:111122223333:key/{UUID}"),
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
        assert_eq!(
            arn,
            format!("arn:aws:kms:eu-west-3:111122223333:key/{UUID}")
        );
        assert_eq!(arns.key_ref(&arn).unwrap(), id.to_string());
        assert_eq!(bare_id(&id), UUID);
    }

    #[test]
    fn an_answer_echoes_a_key_arn_as_the_caller_wrote_it() {
        let arns = Arns::with_regions(&["eu-west-3".into(), "us-east-2".into()], "111122223333");
        let id = KeyId::parse(&format!("key/{HEX}")).unwrap();
        let hex_arn = format!("arn:aws:kms:eu-west-3:111122223333:key/{HEX}");
        let other_region = format!("arn:aws:kms:us-east-2:111122223333:key/{UUID}");
        assert_eq!(arns.answer_arn(Some(&hex_arn), &id), hex_arn);
        assert_eq!(arns.answer_arn(Some(&other_region), &id), other_region);
        let canonical = format!("arn:aws:kms:eu-west-3:111122223333:key/{UUID}");
        assert_eq!(arns.answer_arn(Some("alias/app"), &id), canonical);
        assert_eq!(arns.answer_arn(Some(HEX), &id), canonical);
        assert_eq!(arns.answer_arn(None, &id), canonical);
        let another = format!("arn:aws:kms:eu-west-3:111122223333:key/{}", "f".repeat(32));
        assert_eq!(
            arns.answer_arn(Some(&another), &id),
            canonical,
            "another key"
        );
        assert_eq!(
            arns.in_region("us-east-2").key_arn(&id),
            other_region,
            "answers in the region a request was signed for"
        );
    }

    #[test]
    fn an_arn_of_any_configured_region_names_the_key() {
        let arns = Arns::with_regions(&["eu-west-3".into(), "us-east-2".into()], "111122223333");
        for region in ["eu-west-3", "us-east-2"] {
            let arn = format!("arn:aws:kms:{region}:111122223333:key/{UUID}");
            assert_eq!(arns.key_ref(&arn).unwrap(), format!("key/{HEX}"), "{arn}");
        }
        let elsewhere = format!("arn:aws:kms:ap-south-1:111122223333:key/{UUID}");
        assert_eq!(
            arns.key_ref(&elsewhere).unwrap_err().code,
            "NotFoundException"
        );
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
            format!("arn:aws:kms:eu-west-3:111122223333:{HEX}"),
            "not-hex".to_owned(),
        ] {
            let err = arns.key_ref(&other).unwrap_err();
            assert_eq!(err.code, "NotFoundException", "{other}");
        }
        assert_eq!(arns.key_ref("").unwrap_err().code, "ValidationException");
    }
}
