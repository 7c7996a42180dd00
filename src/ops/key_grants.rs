//! The gate's key-grant step: after the key policy and the policy file, a key's grants
//! (AWS KMS's `CreateGrant`, [`crate::grant`]) may allow a call their grantee makes.
//!
//! A grant allows a call when the caller's ARN (as key policies see it,
//! [`super::key_policies::caller_arn`]) is its grantee, the call's action is one of its
//! operations and the encryption context meets its constraints. A `Deny` of the key policy
//! still wins. Grants live in the metadata store, which a fleet shares and wrapd does not
//! fully trust, so with `key_policies = "restrict"` (the default) a grant allows only where
//! the policy file has a grant with `require_key_grant = true` for the caller, operation and
//! key; with `key_policies = "grant"` it allows on its own, as in AWS KMS. `RetireGrant` is
//! never allowed here: a grant lets its grantee retire that grant only, which the operation
//! itself checks.

use base64::Engine;
use base64::engine::general_purpose::URL_SAFE_NO_PAD;
use rand::RngCore;

use crate::auth::{Identity, KeyPolicies, Operation, Policy, RequestAttributes, Target};
use crate::context::EncryptionContext;
use crate::error::{Error, Result};
use crate::grant::{Grant, GrantOperation};
use crate::ids::KeyId;

/// Whether one of the key's grants allows the call (see the module docs).
pub(super) fn allow(
    policy: &Policy,
    account: &str,
    identity: &Identity,
    (op, action): (Operation, Option<&str>),
    target: &Target,
    context: Option<&EncryptionContext>,
    attributes: &RequestAttributes,
) -> bool {
    let Target::Key { grants, .. } = target else {
        return false;
    };
    if grants.is_empty() || op == Operation::RetireGrant {
        return false;
    }
    let Some(operation) = action.and_then(GrantOperation::of_action) else {
        return false;
    };
    let arn = super::key_policies::caller_arn(identity, account);
    if !grants.iter().any(|g| g.permits(&arn, operation, context)) {
        return false;
    }
    match policy.key_policies() {
        KeyPolicies::Grant => true,
        KeyPolicies::Restrict => {
            policy.allows_with_key_grant(&identity.principals, op, target, context, attributes)
        }
    }
}

/// The grants of `grants` the caller holds that let it hand on a grant of `operations` with
/// `constraints` (a grant holding `CreateGrant`, [`Grant::covers`]).
pub(super) fn covering<'a>(
    grants: &'a [Grant],
    caller_arn: &str,
    operations: &[GrantOperation],
    constraints: &crate::grant::Constraints,
) -> Option<&'a Grant> {
    grants
        .iter()
        .find(|g| g.grantee == caller_arn && g.covers(operations, constraints))
}

/// A new grant id: 64 hex digits, as AWS KMS's.
pub(super) fn new_grant_id() -> String {
    let mut bytes = [0u8; 32];
    rand::rng().fill_bytes(&mut bytes);
    hex::encode(bytes)
}

/// The prefix of wrapd's grant tokens (after base64url decoding).
const TOKEN_PREFIX: &str = "wrapd-grant-1:";

/// A grant token for a grant of `key`: names the key and grant, with random bytes so that
/// each `CreateGrant` answer has a token of its own, as AWS KMS's do. It carries no right:
/// it only tells a daemon of the fleet that has not heard of the grant yet to read the key
/// from the store before deciding.
pub(super) fn token(key: &KeyId, grant_id: &str) -> String {
    let mut nonce = [0u8; 16];
    rand::rng().fill_bytes(&mut nonce);
    URL_SAFE_NO_PAD.encode(format!(
        "{TOKEN_PREFIX}{key}:{grant_id}:{}",
        hex::encode(nonce)
    ))
}

/// The key and grant a grant token names; [`Error::InvalidGrantToken`] for any other text.
pub fn parse_token(token: &str) -> Result<(KeyId, String)> {
    let invalid = || Error::InvalidGrantToken("the grant token is not valid".into());
    if token.len() > 8192 {
        return Err(invalid());
    }
    let text = URL_SAFE_NO_PAD
        .decode(token.trim_end_matches('='))
        .ok()
        .and_then(|bytes| String::from_utf8(bytes).ok())
        .ok_or_else(invalid)?;
    let rest = text.strip_prefix(TOKEN_PREFIX).ok_or_else(invalid)?;
    let mut parts = rest.split(':');
    let (Some(key), Some(grant), Some(_nonce), None) =
        (parts.next(), parts.next(), parts.next(), parts.next())
    else {
        return Err(invalid());
    };
    let key = KeyId::parse(key).map_err(|_| invalid())?;
    if !is_grant_id(grant) {
        return Err(invalid());
    }
    Ok((key, grant.to_owned()))
}

/// Whether `id` has the form of a grant id (64 hex digits).
pub fn is_grant_id(id: &str) -> bool {
    id.len() == 64 && id.bytes().all(|b| b.is_ascii_hexdigit())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_token_names_its_key_and_grant_and_differs_each_time() {
        let key = KeyId::generate();
        let grant = new_grant_id();
        let a = token(&key, &grant);
        let b = token(&key, &grant);
        assert_ne!(a, b);
        assert_eq!(parse_token(&a).unwrap(), (key.clone(), grant.clone()));
        assert_eq!(parse_token(&b).unwrap(), (key, grant));
    }

    #[test]
    fn anything_else_is_an_invalid_grant_token() {
        for bad in [
            "",
            "abc",
            &URL_SAFE_NO_PAD.encode("wrapd-grant-1:nothex:x:y"),
            &URL_SAFE_NO_PAD.encode(format!(
                "wrapd-grant-1:{}:{}:n:extra",
                KeyId::generate(),
                new_grant_id()
            )),
            &"A".repeat(9000),
        ] {
            let err = parse_token(bad).unwrap_err();
            assert_eq!(
                err.kind(),
                crate::error::ErrorKind::InvalidGrantToken,
                "{bad:?}"
            );
        }
    }
}
