//! The gate's key-policy step: a call on a key with a key policy, as the policy sees it
//! (action, caller ARN and account, condition keys), and what the verdict means for the
//! call ([`crate::auth::key_policy`] evaluates; the policy file's `key_policies` decides
//! whether an `Allow` naming the caller is enough).
//!
//! Callers of the AWS KMS API whose access key names an ARN (`[[aws.access_key]] arn`) are
//! that ARN; every other caller (gRPC, the unix socket, the Kubernetes plugin, an access key
//! without an ARN) is `arn:aws:iam::ACCOUNT:wrapd/PRINCIPAL`, its main wrapd principal in
//! the daemon's account (`[aws] account`), e.g.
//! `arn:aws:iam::111122223333:wrapd/unix:uid=1000`, so that one key policy can name callers
//! of every front end.

use std::collections::{BTreeMap, HashMap};
use std::sync::{Arc, LazyLock};

use parking_lot::Mutex;

use crate::auth::key_policy::{KeyPolicy, Request, Verdict};
use crate::auth::{Identity, KeyPolicies, Operation};
use crate::context::EncryptionContext;
use crate::ids::KeyId;
use crate::keystore::KeyRecord;

/// The account of callers that have no ARN of their own, when the daemon has no `[aws]`
/// section.
pub const DEFAULT_ACCOUNT: &str = "000000000000";

/// Most parsed key policies kept at once.
const CACHE: usize = 10_000;

/// A key's policy text and what it parses to.
type Parsed = (String, Arc<KeyPolicy>);

/// Parsed key policies, by key, with the text each was parsed from: a memo of a pure
/// function, shared by the process.
static PARSED: LazyLock<Mutex<HashMap<KeyId, Parsed>>> =
    LazyLock::new(|| Mutex::new(HashMap::new()));

/// The key's policy, parsed (`None`: the default policy). Parsed once per text. A stored
/// document that does not parse (written into the store by something other than wrapd)
/// denies every call on the key, and the error is logged.
pub fn parsed(key: &KeyRecord) -> Option<Arc<KeyPolicy>> {
    let text = key.policy.as_deref()?;
    let mut cache = PARSED.lock();
    if let Some((cached, policy)) = cache.get(&key.id)
        && cached == text
    {
        return Some(policy.clone());
    }
    if cache.len() >= CACHE {
        // Keys deleted since stay in the cache until it fills: start afresh then.
        cache.clear();
    }
    let policy = Arc::new(KeyPolicy::parse(text).unwrap_or_else(|err| {
        tracing::error!(key_id = %key.id, error = %err, "the stored key policy does not parse; every call on the key is denied");
        KeyPolicy::deny_all()
    }));
    cache.insert(key.id.clone(), (text.to_owned(), policy.clone()));
    Some(policy)
}

/// What the gate does after the key policy.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) enum Outcome {
    /// Allowed by the key policy alone.
    Allowed,
    /// Denied by a `Deny` of the key policy: nothing else can allow it.
    Denied,
    /// Not allowed by the key policy: only a key grant can allow it.
    NotAllowed,
    /// The policy file decides (or a key grant).
    FileDecides,
}

/// The key policy's say on `action` (of [`action_of`]) by `identity`, with `context`.
pub(super) fn decide(
    policy: &KeyPolicy,
    mode: KeyPolicies,
    account: &str,
    identity: &Identity,
    action: Option<&str>,
    context: Option<&EncryptionContext>,
) -> Outcome {
    let Some(action) = action else {
        // The XKS API's operations (AWS KMS calls them on its own behalf, under its own key
        // policy): the policy file alone.
        return Outcome::FileDecides;
    };
    let arn = caller_arn(identity, account);
    let caller_account = arn_account(&arn).unwrap_or(account).to_owned();
    let mut keys: BTreeMap<String, Vec<String>> = BTreeMap::new();
    keys.insert("aws:principalarn".into(), vec![arn.clone()]);
    keys.insert("aws:principalaccount".into(), vec![caller_account.clone()]);
    keys.insert("kms:calleraccount".into(), vec![caller_account.clone()]);
    if let Ok(address) = identity.peer.parse::<std::net::SocketAddr>() {
        // An IPv4 client of a dual-stack listener as the IPv4 address policies name.
        keys.insert(
            "aws:sourceip".into(),
            vec![address.ip().to_canonical().to_string()],
        );
    }
    if let Some(context) = context {
        let names: Vec<String> = context.iter().map(|(k, _)| k.to_owned()).collect();
        for (k, v) in context.iter() {
            // Condition key names are case-insensitive: entries whose keys differ only in
            // case all count, so that neither can hide the other from a condition.
            keys.entry(format!("kms:encryptioncontext:{}", k.to_ascii_lowercase()))
                .or_default()
                .push(v.to_owned());
        }
        if !names.is_empty() {
            keys.insert("kms:encryptioncontextkeys".into(), names);
        }
    }
    let verdict = policy.evaluate(&Request {
        action,
        principal_arn: &arn,
        account: &caller_account,
        keys: &keys,
    });
    match (verdict, mode) {
        (Verdict::Deny, _) => Outcome::Denied,
        (Verdict::NoMatch, _) => Outcome::NotAllowed,
        (Verdict::Allow, KeyPolicies::Grant) => Outcome::Allowed,
        (Verdict::Allow | Verdict::Delegate, _) => Outcome::FileDecides,
    }
}

/// The default policy's say, without evaluating its document: it hands every action to
/// the account, so a caller of the account goes to the policy file and any other is denied.
/// Every call on a key without a stored policy comes here, so nothing is allocated: only an
/// access key's own ARN can be of another account.
pub(super) fn default_policy(account: &str, identity: &Identity) -> Outcome {
    let own_arn = identity
        .principals
        .iter()
        .find_map(|p| p.strip_prefix("aws:arn="));
    match own_arn.and_then(arn_account) {
        Some(other) if other != account => Outcome::NotAllowed,
        _ => Outcome::FileDecides,
    }
}

/// The caller's ARN: the one its access key names, else its main principal's wrapd ARN.
pub fn caller_arn(identity: &Identity, account: &str) -> String {
    identity
        .principals
        .iter()
        .find_map(|p| p.strip_prefix("aws:arn="))
        .map_or_else(
            || format!("arn:aws:iam::{account}:wrapd/{}", identity.principal()),
            str::to_owned,
        )
}

/// The account of an IAM ARN.
fn arn_account(arn: &str) -> Option<&str> {
    arn.split(':').nth(4).filter(|a| !a.is_empty())
}

/// The AWS KMS action of a call of `op`: the AWS KMS API's calls that read a key's rotation
/// status, rotations or tags need the policy operation `DescribeKey` of the policy file but
/// are their own actions for key policies and grants, as in AWS KMS (a grant of
/// `DescribeKey` does not cover `ListResourceTags`).
pub fn action_of(api_operation: Option<&str>, op: Operation) -> Option<&'static str> {
    let api = api_operation.and_then(|name| name.strip_prefix("TrentService."));
    match (op, api) {
        (Operation::DescribeKey, Some("GetKeyRotationStatus")) => Some("kms:GetKeyRotationStatus"),
        (Operation::DescribeKey, Some("ListKeyRotations")) => Some("kms:ListKeyRotations"),
        (Operation::DescribeKey, Some("ListResourceTags")) => Some("kms:ListResourceTags"),
        _ => action(op),
    }
}

/// The AWS KMS action of an operation, for key policies.
pub fn action(op: Operation) -> Option<&'static str> {
    use Operation as Op;
    Some(match op {
        Op::GenerateDataKey => "kms:GenerateDataKey",
        Op::GenerateDataKeyWithoutPlaintext => "kms:GenerateDataKeyWithoutPlaintext",
        Op::Wrap => "kms:Encrypt",
        Op::Unwrap => "kms:Decrypt",
        Op::ReWrap | Op::ReWrapFrom => "kms:ReEncryptFrom",
        Op::ReWrapTo => "kms:ReEncryptTo",
        Op::DescribeKey => "kms:DescribeKey",
        Op::RotateKey => "kms:RotateKeyOnDemand",
        Op::EnableKey => "kms:EnableKey",
        Op::DisableKey => "kms:DisableKey",
        Op::ScheduleKeyDeletion => "kms:ScheduleKeyDeletion",
        Op::CancelKeyDeletion => "kms:CancelKeyDeletion",
        Op::CreateAlias => "kms:CreateAlias",
        Op::UpdateAlias => "kms:UpdateAlias",
        Op::DeleteAlias => "kms:DeleteAlias",
        Op::EnableKeyRotation => "kms:EnableKeyRotation",
        Op::DisableKeyRotation => "kms:DisableKeyRotation",
        Op::TagKey => "kms:TagResource",
        Op::UntagKey => "kms:UntagResource",
        Op::UpdateKeyDescription => "kms:UpdateKeyDescription",
        Op::GetParametersForImport => "kms:GetParametersForImport",
        Op::ImportKeyMaterial => "kms:ImportKeyMaterial",
        Op::DeleteImportedKeyMaterial => "kms:DeleteImportedKeyMaterial",
        Op::GetKeyPolicy => "kms:GetKeyPolicy",
        Op::PutKeyPolicy => "kms:PutKeyPolicy",
        Op::ListKeyPolicies => "kms:ListKeyPolicies",
        Op::CreateGrant => "kms:CreateGrant",
        Op::ListGrants => "kms:ListGrants",
        Op::RetireGrant => "kms:RetireGrant",
        Op::RevokeGrant => "kms:RevokeGrant",
        // wrapd's key version extensions, which AWS KMS does not have: actions of the same
        // names, so that `kms:*` covers them as it covers every other key operation.
        Op::RetireKeyVersion => "kms:RetireKeyVersion",
        Op::RestoreKeyVersion => "kms:RestoreKeyVersion",
        Op::ScheduleKeyVersionDestruction => "kms:ScheduleKeyVersionDestruction",
        Op::CancelKeyVersionDestruction => "kms:CancelKeyVersionDestruction",
        _ => return None,
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::auth::Transport;

    fn caller(principals: &[&str]) -> Identity {
        Identity {
            principals: principals.iter().map(|p| p.to_string()).collect(),
            transport: Transport::AwsKms,
            peer: "[::ffff:192.0.2.7]:4000".into(),
            access_key: None,
        }
    }

    #[test]
    fn reading_tags_or_rotations_is_an_action_of_its_own() {
        let describe = Operation::DescribeKey;
        assert_eq!(
            action_of(Some("TrentService.ListResourceTags"), describe),
            Some("kms:ListResourceTags")
        );
        assert_eq!(
            action_of(Some("TrentService.GetKeyRotationStatus"), describe),
            Some("kms:GetKeyRotationStatus")
        );
        assert_eq!(
            action_of(Some("TrentService.DescribeKey"), describe),
            Some("kms:DescribeKey")
        );
        assert_eq!(action_of(None, describe), Some("kms:DescribeKey"));
    }

    #[test]
    fn without_a_stored_policy_only_a_caller_of_another_account_is_denied() {
        let own = caller(&["tls:uri=spiffe://a/b"]);
        let same = caller(&["tls:uri=x", "aws:arn=arn:aws:iam::111122223333:user/alice"]);
        let other = caller(&[
            "tls:uri=x",
            "aws:arn=arn:aws:iam::999999999999:user/mallory",
        ]);
        assert_eq!(default_policy("111122223333", &own), Outcome::FileDecides);
        assert_eq!(default_policy("111122223333", &same), Outcome::FileDecides);
        assert_eq!(default_policy("111122223333", &other), Outcome::NotAllowed);
    }

    #[test]
    fn a_caller_without_an_arn_is_its_principal_in_the_account_and_its_ipv4_address_canonical() {
        let identity = caller(&["unix:uid=1000"]);
        assert_eq!(
            caller_arn(&identity, "111122223333"),
            "arn:aws:iam::111122223333:wrapd/unix:uid=1000"
        );
        let policy = KeyPolicy::parse(
            r#"{"Statement":{"Effect":"Deny","Principal":"*","Action":"kms:*","Resource":"*",
                "Condition":{"IpAddress":{"aws:SourceIp":"192.0.2.0/24"}}}}"#,
        )
        .unwrap();
        let outcome = decide(
            &policy,
            KeyPolicies::Restrict,
            "111122223333",
            &identity,
            action(Operation::Unwrap),
            None,
        );
        assert_eq!(
            outcome,
            Outcome::Denied,
            "an IPv4 client of a dual-stack listener"
        );
    }
}
