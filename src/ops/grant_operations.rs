//! The grant operations (AWS KMS's `CreateGrant`, `ListGrants`, `ListRetirableGrants`,
//! `RetireGrant`, `RevokeGrant`; the gRPC `KeyService` calls of the same names), each checked
//! and audited like every other call; what a grant permits is [`crate::grant`]'s and the
//! gate's key-grant step is `key_grants.rs`.
//!
//! Who may do what:
//! - `CreateGrant`, `ListGrants`, `RevokeGrant`: the policy operations of the same names on
//!   the key (key policy, policy file). A grantee whose grant holds `CreateGrant` may also
//!   make grants, of no more operations and no weaker constraints than that grant's.
//! - `RetireGrant`: the grant's retiring principal, or its grantee if the grant holds
//!   `RetireGrant` (neither needs anything else, as in AWS KMS: retiring only takes rights
//!   away), or a caller the policy operation `RetireGrant` on the key allows (the part AWS
//!   KMS gives the key's account).
//! - `ListRetirableGrants`: the policy operation of that name on `keys = ["*"]` (it lists
//!   grants of every key).

use std::collections::BTreeMap;

use super::key_grants::{covering, is_grant_id, new_grant_id, parse_token, token};
use super::key_policies::caller_arn;
use super::*;
use crate::grant::{
    Constraints, Grant, GrantOperation, MAX_CONSTRAINT_BYTES, MAX_CONSTRAINT_ENTRIES,
    MAX_CONSTRAINT_VALUE_CHARS, MAX_NAME_CHARS, MAX_PRINCIPAL_CHARS, normalized,
};

/// What `CreateGrant` asks for.
#[derive(Debug, Clone, Default)]
pub struct NewGrant {
    /// The key (id, or a form the front end turned into one).
    pub key_id: String,
    /// `GranteePrincipal`.
    pub grantee: String,
    /// `RetiringPrincipal`.
    pub retiring: Option<String>,
    /// `Operations`.
    pub operations: Vec<GrantOperation>,
    /// `Constraints`.
    pub constraints: Constraints,
    /// `Name` (empty: none).
    pub name: String,
}

/// `CreateGrant`'s answer.
#[derive(Debug, Clone)]
pub struct CreatedGrant {
    /// The key.
    pub key_id: KeyId,
    /// `GrantId` (a retried named grant's: the first one's).
    pub grant_id: String,
    /// `GrantToken`, new for each answer.
    pub token: String,
}

/// A grant and the key it is on.
#[derive(Debug, Clone)]
pub struct GrantOnKey {
    /// The key.
    pub key_id: KeyId,
    /// The grant.
    pub grant: Grant,
}

/// How `RetireGrant` names the grant.
#[derive(Debug, Clone)]
pub enum RetiredGrant {
    /// `GrantToken`.
    Token(String),
    /// `KeyId` and `GrantId`.
    Id {
        /// The key.
        key_id: String,
        /// The grant.
        grant_id: String,
    },
}

/// Checks a principal named in a grant: an ARN or a service principal, as AWS KMS's
/// `PrincipalIdType` (1 to 256 of `[\w+=,.@:/-]`).
fn check_principal(what: &str, principal: &str) -> Result<()> {
    let fits = !principal.is_empty()
        && principal.chars().count() <= MAX_PRINCIPAL_CHARS
        && principal
            .chars()
            .all(|c| c.is_alphanumeric() || c == '_' || "+=,.@:/-".contains(c));
    if fits {
        Ok(())
    } else {
        Err(Error::invalid(format!(
            "{what} must be 1 to {MAX_PRINCIPAL_CHARS} characters of letters, digits and _+=,.@:/-"
        )))
    }
}

/// Checks one constraint's context.
fn check_constraint(what: &str, map: &BTreeMap<String, String>) -> Result<()> {
    if map.len() > MAX_CONSTRAINT_ENTRIES {
        return Err(Error::invalid(format!(
            "{what} has {} entries; a constraint has at most {MAX_CONSTRAINT_ENTRIES}",
            map.len()
        )));
    }
    let mut folded = std::collections::HashSet::new();
    for (k, v) in map {
        if k.is_empty() {
            return Err(Error::invalid(format!("{what} has an empty key")));
        }
        if v.chars().count() > MAX_CONSTRAINT_VALUE_CHARS
            || k.chars().count() > MAX_CONSTRAINT_VALUE_CHARS
        {
            return Err(Error::invalid(format!(
                "{what} has an entry longer than {MAX_CONSTRAINT_VALUE_CHARS} characters"
            )));
        }
        if !folded.insert(k.to_lowercase()) {
            return Err(Error::invalid(format!(
                "{what} has keys that differ only in case, which a grant constraint cannot tell apart"
            )));
        }
    }
    Ok(())
}

/// Checks what `CreateGrant` asks for (the front ends check their wire forms first).
fn check_new_grant(new: &NewGrant) -> Result<()> {
    check_principal("GranteePrincipal", &new.grantee)?;
    if let Some(retiring) = &new.retiring {
        check_principal("RetiringPrincipal", retiring)?;
    }
    if new.operations.is_empty() {
        return Err(Error::invalid("a grant needs at least one operation"));
    }
    if let Some(equals) = &new.constraints.equals {
        check_constraint("EncryptionContextEquals", equals)?;
    }
    if let Some(subset) = &new.constraints.subset {
        check_constraint("EncryptionContextSubset", subset)?;
    }
    let bytes: usize = [&new.constraints.equals, &new.constraints.subset]
        .into_iter()
        .flatten()
        .flat_map(|map| map.iter())
        .map(|(k, v)| k.len() + v.len())
        .sum();
    if bytes > MAX_CONSTRAINT_BYTES {
        return Err(Error::invalid(format!(
            "a grant's constraints hold at most {MAX_CONSTRAINT_BYTES} bytes of keys and values"
        )));
    }
    let name_fits = new.name.chars().count() <= MAX_NAME_CHARS
        && new
            .name
            .chars()
            .all(|c| c.is_ascii_alphanumeric() || ":/_-".contains(c));
    if !name_fits {
        return Err(Error::invalid(format!(
            "a grant name is at most {MAX_NAME_CHARS} characters of letters, digits and :/_-"
        )));
    }
    Ok(())
}

/// A grant id as a request gives it.
fn grant_id(id: &str) -> Result<&str> {
    if is_grant_id(id) {
        Ok(id)
    } else {
        Err(Error::InvalidGrantId(format!(
            "{:?} is not a grant id (64 hex digits)",
            id.chars().take(80).collect::<String>()
        )))
    }
}

/// Puts what a grant is on the call's audit line: the store that keeps it is not trusted to
/// say later what was granted.
fn record_grant(call: &mut Call, grant: &Grant) {
    let attributes = &mut call.attributes;
    attributes.insert("grantId".into(), grant.id.clone());
    attributes.insert("granteePrincipal".into(), grant.grantee.clone());
    if let Some(retiring) = &grant.retiring {
        attributes.insert("retiringPrincipal".into(), retiring.clone());
    }
    let operations: Vec<&str> = grant.operations.iter().map(|op| op.name()).collect();
    attributes.insert("operations".into(), operations.join(","));
    let constraints = &grant.constraints;
    if !constraints.is_empty() {
        let json = serde_json::json!({
            "EncryptionContextEquals": constraints.equals,
            "EncryptionContextSubset": constraints.subset,
        });
        attributes.insert("constraints".into(), json.to_string());
    }
}

/// The grant `grant_id` of `record`.
fn find<'a>(record: &'a KeyRecord, grant_id: &str) -> Result<&'a Grant> {
    record
        .grants
        .iter()
        .find(|g| g.id == grant_id)
        .ok_or_else(|| {
            Error::KeyNotFound(format!(
                "grant {grant_id} of key {} does not exist",
                record.id
            ))
        })
}

impl Ops {
    /// Makes a grant on a key (see the module docs for who may).
    pub async fn create_grant(&self, call: Call, new: NewGrant) -> Result<CreatedGrant> {
        self.run(call, move |gate, ks, call| {
            let (key, _) = named_key(gate, ks, call, &new.key_id, None)?;
            check_new_grant(&new)?;
            let mut new = new;
            // An empty subset asks for nothing: no constraint (so that every form of "none"
            // is judged alike when a grant is handed on).
            if new.constraints.subset.as_ref().is_some_and(BTreeMap::is_empty) {
                new.constraints.subset = None;
            }
            let record = ks.resolve(&key)?;
            call.key(record.id.to_string(), None);
            let operations = normalized(new.operations);
            let identity = gate.caller(call)?;
            let issuer = caller_arn(identity, gate.account());
            // Allowed by a grant of the caller's alone: the new grant must be within one.
            let without_grants = match target_of(ks, &key) {
                Target::Key { names, policy, .. } => Target::Key {
                    names,
                    policy,
                    grants: Default::default(),
                },
                Target::Any => Target::Any,
            };
            if !gate.allows_without_key_grants(call, Operation::CreateGrant, &without_grants)
                && covering(&record.grants, &issuer, &operations, &new.constraints).is_none()
            {
                let _ = call.denial.set(
                    "a grant lets its grantee make grants of no more operations and no weaker constraints than its own".into(),
                );
                return Err(Error::PermissionDenied(
                    "not allowed to make this grant".into(),
                ));
            }
            let grant = Grant {
                id: new_grant_id(),
                name: new.name,
                grantee: new.grantee,
                retiring: new.retiring,
                operations,
                constraints: new.constraints,
                issuer,
                created_at: SystemTime::now(),
            };
            let (record, kept) = ks.add_grant(&KeyRef::Id(record.id.clone()), grant)?;
            record_grant(call, &kept);
            Ok(CreatedGrant {
                token: token(&record.id, &kept.id),
                key_id: record.id.clone(),
                grant_id: kept.id,
            })
        })
        .await
    }

    /// A key's grants, oldest first, optionally only the one `grant_id` or those of one
    /// grantee.
    pub async fn list_grants(
        &self,
        call: Call,
        key_id: String,
        grant_id: Option<String>,
        grantee: Option<String>,
    ) -> Result<(KeyId, Vec<Grant>)> {
        self.run(call, move |gate, ks, call| {
            let (key, _) = named_key(gate, ks, call, &key_id, None)?;
            if let Some(id) = &grant_id {
                self::grant_id(id)?;
            }
            let record = ks.resolve(&key)?;
            call.key(record.id.to_string(), None);
            let grants = record
                .grants
                .iter()
                .filter(|g| grant_id.as_ref().is_none_or(|id| &g.id == id))
                .filter(|g| grantee.as_ref().is_none_or(|p| &g.grantee == p))
                .cloned()
                .collect();
            Ok((record.id.clone(), grants))
        })
        .await
    }

    /// Every grant `retiring` may retire as their retiring principal, by key.
    pub async fn list_retirable_grants(
        &self,
        call: Call,
        retiring: String,
    ) -> Result<Vec<GrantOnKey>> {
        self.run(call, move |gate, ks, call| {
            gate.check(call, &Target::Any, None)?;
            check_principal("RetiringPrincipal", &retiring)?;
            let mut found = Vec::new();
            for record in ks.keys() {
                for grant in record.grants.iter() {
                    if grant.retiring.as_deref() == Some(retiring.as_str()) {
                        found.push(GrantOnKey {
                            key_id: record.id.clone(),
                            grant: grant.clone(),
                        });
                    }
                }
            }
            found.sort_by(|a, b| {
                (a.grant.created_at, &a.grant.id).cmp(&(b.grant.created_at, &b.grant.id))
            });
            Ok(found)
        })
        .await
    }

    /// Retires a grant (see the module docs for who may).
    pub async fn retire_grant(&self, call: Call, which: RetiredGrant) -> Result<()> {
        self.run(call, move |gate, ks, call| {
            let identity = gate.caller(call)?;
            let arn = caller_arn(identity, gate.account());
            let (key, grant_id) = match which {
                RetiredGrant::Token(text) => {
                    let (key, grant_id) = parse_token(&text)?;
                    (KeyRef::Id(key), grant_id)
                }
                RetiredGrant::Id { key_id, grant_id } => {
                    let key = KeyRef::parse(&key_id)?;
                    call.key(key.to_string(), None);
                    (key, self::grant_id(&grant_id)?.to_owned())
                }
            };
            call.key(key.to_string(), None);
            call.attributes.insert("grantId".into(), grant_id.clone());
            // The daemon's view first: the store is read only for a caller with the right
            // to retire any grant of the key, so that made-up tokens cost it nothing.
            let seen = ks.resolve(&key).ok();
            let retirable = seen
                .as_ref()
                .and_then(|record| find(record, &grant_id).ok())
                .is_some_and(|grant| grant.retirable_by(&arn));
            if !retirable {
                // The account's right: the policy operation on the key, never a key grant
                // (a grant lets its grantee retire that grant only). Checked before "not
                // found", so that no one without it learns which keys and grants exist.
                gate.check(call, &target_of(ks, &key), None)?;
            }
            let record = match seen {
                Some(record) => ks.with_grant(&record.id, &grant_id)?,
                None => return Err(Error::KeyNotFound(key.to_string())),
            };
            find(&record, &grant_id)?;
            call.key(record.id.to_string(), None);
            ks.remove_grant(&record.id, &grant_id)?;
            Ok(())
        })
        .await
    }

    /// Revokes a grant of a key.
    pub async fn revoke_grant(&self, call: Call, key_id: String, grant_id: String) -> Result<()> {
        self.run(call, move |gate, ks, call| {
            let (key, _) = named_key(gate, ks, call, &key_id, None)?;
            let grant_id = self::grant_id(&grant_id)?.to_owned();
            call.attributes.insert("grantId".into(), grant_id.clone());
            let record = ks.resolve(&key)?;
            call.key(record.id.to_string(), None);
            let record = ks.with_grant(&record.id, &grant_id)?;
            find(&record, &grant_id)?;
            ks.remove_grant(&record.id, &grant_id)?;
            Ok(())
        })
        .await
    }
}
