//! Grants, as AWS KMS has them (`CreateGrant`): a key's holder lets one principal (the
//! grantee, by ARN) make some operations on that key, optionally only with a given
//! encryption context, until the grant is retired or revoked.
//!
//! This module is the grant as data and what it permits, with no I/O: the key store keeps
//! grants with their key (`keystore`), the gate consults them after the key policy and the
//! policy file (`ops::key_grants`), the front ends read and write them. A grant permits an
//! operation when the caller's ARN is the grantee, the operation is one of the grant's, and
//! the call's encryption context meets the grant's constraints. As in AWS KMS, constraint
//! keys are compared without regard to case and values exactly, and constraints do not
//! apply to operations that take no encryption context (`DescribeKey`, `CreateGrant`,
//! `RetireGrant`); a grant holding `CreateGrant` lets its grantee make grants of no more
//! operations and no weaker constraints than its own.

use std::collections::BTreeMap;
use std::time::SystemTime;

use crate::context::EncryptionContext;

/// Most grants on one key (AWS KMS allows 50,000; every daemon of a fleet keeps each key's
/// grants in memory, so wrapd keeps fewer).
pub const MAX_GRANTS_PER_KEY: usize = 10_000;

/// Most grants for one grantee on one key (AWS KMS's quota).
pub const MAX_GRANTS_PER_GRANTEE: usize = 500;

/// Most bytes of a grant's constraints, keys and values of both together: with the grant
/// limits, a bound on what a key's grants hold in every daemon's memory.
pub const MAX_CONSTRAINT_BYTES: usize = 4096;

/// Most entries in a constraint's encryption context (AWS KMS's limit).
pub const MAX_CONSTRAINT_ENTRIES: usize = 8;

/// Longest constraint value, in characters (AWS KMS's limit).
pub const MAX_CONSTRAINT_VALUE_CHARS: usize = 384;

/// Longest grantee or retiring principal, in characters (AWS KMS's limit).
pub const MAX_PRINCIPAL_CHARS: usize = 256;

/// Longest grant name, in characters (AWS KMS's limit).
pub const MAX_NAME_CHARS: usize = 256;

macro_rules! grant_operations {
    ($($name:ident $(: $context:ident)?),* $(,)?) => {
        /// An operation a grant can allow: those of AWS KMS's `GrantOperation` that apply to
        /// a symmetric encryption key.
        #[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
        #[allow(missing_docs)]
        pub enum GrantOperation { $($name),* }

        impl GrantOperation {
            /// Every operation, in AWS KMS's order.
            pub const ALL: &'static [GrantOperation] = &[$(GrantOperation::$name),*];

            /// The name AWS KMS gives it (also its key-policy action without `kms:`).
            pub fn name(self) -> &'static str {
                match self { $(GrantOperation::$name => stringify!($name)),* }
            }

            /// Whether the operation takes an encryption context, and so whether a grant's
            /// constraints apply to it.
            pub fn takes_context(self) -> bool {
                match self { $(GrantOperation::$name => grant_operations!(@context $($context)?)),* }
            }
        }
    };
    (@context context) => { true };
    (@context) => { false };
}

grant_operations! {
    Decrypt: context,
    Encrypt: context,
    GenerateDataKey: context,
    GenerateDataKeyWithoutPlaintext: context,
    ReEncryptFrom: context,
    ReEncryptTo: context,
    CreateGrant,
    RetireGrant,
    DescribeKey,
}

impl GrantOperation {
    /// The operation named `name` (AWS KMS's spelling, exactly).
    pub fn parse(name: &str) -> Option<Self> {
        Self::ALL.iter().copied().find(|op| op.name() == name)
    }

    /// The operation a key-policy action (`kms:Decrypt`) names, if a grant can allow it.
    pub fn of_action(action: &str) -> Option<Self> {
        Self::parse(action.strip_prefix("kms:")?)
    }
}

/// AWS KMS's grant operations that do not apply to a symmetric encryption key: refused by
/// name rather than as unknown values.
pub const OTHER_KEY_USAGE_OPERATIONS: &[&str] = &[
    "Sign",
    "Verify",
    "GetPublicKey",
    "GenerateDataKeyPair",
    "GenerateDataKeyPairWithoutPlaintext",
    "GenerateMac",
    "VerifyMac",
    "DeriveSharedSecret",
];

/// A grant's encryption-context constraints (either, both, or none).
#[derive(Debug, Clone, Default, PartialEq, Eq, Hash)]
pub struct Constraints {
    /// `EncryptionContextEquals`: the call's context must be exactly this.
    pub equals: Option<BTreeMap<String, String>>,
    /// `EncryptionContextSubset`: the call's context must include this.
    pub subset: Option<BTreeMap<String, String>>,
}

impl Constraints {
    /// Whether there is no constraint.
    pub fn is_empty(&self) -> bool {
        self.equals.is_none() && self.subset.is_none()
    }

    /// Whether `context` (none: the empty one) meets every constraint. Keys are compared
    /// without regard to case; a context with two keys that differ only in case never meets
    /// a constraint on that key, so that neither can hide the other.
    pub fn hold_for(&self, context: Option<&EncryptionContext>) -> bool {
        let folded = fold(context);
        let Some(folded) = folded else {
            return self.is_empty();
        };
        if let Some(equals) = &self.equals
            && fold_map(equals).as_ref() != Some(&folded)
        {
            return false;
        }
        if let Some(subset) = &self.subset {
            let Some(subset) = fold_map(subset) else {
                return false;
            };
            if !includes(&folded, &subset) {
                return false;
            }
        }
        true
    }

    /// Whether every context that meets `self` meets `weaker` too: a grant made through a
    /// `CreateGrant` grant must be at least as strict as that grant. Constraints with keys
    /// that differ only in case are never called strict (they are refused when made).
    pub fn at_least_as_strict_as(&self, weaker: &Constraints) -> bool {
        let own_subset = match &self.subset {
            Some(subset) => match fold_map(subset) {
                Some(folded) => Some(folded),
                None => return false,
            },
            None => None,
        };
        match &self.equals {
            // The one context that meets `self`, if it includes `subset`.
            Some(equals) => {
                let Some(folded) = fold_map(equals) else {
                    return false;
                };
                if own_subset.is_some_and(|s| !includes(&folded, &s)) {
                    // No context meets `self`: nothing it allows is outside `weaker`.
                    return true;
                }
                EncryptionContext::from_entries(equals.clone())
                    .is_ok_and(|context| weaker.hold_for(Some(&context)))
            }
            // Every context including `own_subset` (any context, without one): `weaker`
            // can ask for no exact context and for no entry outside it.
            None => {
                let own = own_subset.unwrap_or_default();
                weaker.equals.is_none()
                    && weaker
                        .subset
                        .as_ref()
                        .is_none_or(|w| fold_map(w).is_some_and(|w| includes(&own, &w)))
            }
        }
    }
}

/// Whether `outer` has every entry of `inner`.
fn includes(outer: &BTreeMap<String, String>, inner: &BTreeMap<String, String>) -> bool {
    inner.iter().all(|(k, v)| outer.get(k) == Some(v))
}

/// A context's entries with keys in lower case; `None` if two keys differ only in case.
fn fold(context: Option<&EncryptionContext>) -> Option<BTreeMap<String, String>> {
    let mut folded = BTreeMap::new();
    if let Some(context) = context {
        for (k, v) in context.iter() {
            if folded.insert(k.to_lowercase(), v.to_owned()).is_some() {
                return None;
            }
        }
    }
    Some(folded)
}

/// [`fold`] of a map.
fn fold_map(map: &BTreeMap<String, String>) -> Option<BTreeMap<String, String>> {
    let mut folded = BTreeMap::new();
    for (k, v) in map {
        if folded.insert(k.to_lowercase(), v.clone()).is_some() {
            return None;
        }
    }
    Some(folded)
}

/// One grant on one key.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Grant {
    /// `GrantId`: 64 hex digits.
    pub id: String,
    /// `Name` (empty: none), which makes `CreateGrant` idempotent.
    pub name: String,
    /// `GranteePrincipal`: the ARN the grant is for.
    pub grantee: String,
    /// `RetiringPrincipal`: who may retire it besides the grantee (with `RetireGrant`).
    pub retiring: Option<String>,
    /// `Operations`, sorted, without repeats.
    pub operations: Vec<GrantOperation>,
    /// `Constraints`.
    pub constraints: Constraints,
    /// The ARN of the caller that made it.
    pub issuer: String,
    /// When it was made.
    pub created_at: SystemTime,
}

impl Grant {
    /// Whether a key's `grants` leave room for this grant, else why not (the limits
    /// [`MAX_GRANTS_PER_KEY`] and [`MAX_GRANTS_PER_GRANTEE`]).
    pub fn over_limit(&self, grants: &[Grant]) -> Option<String> {
        if grants.len() >= MAX_GRANTS_PER_KEY {
            return Some(format!(
                "the key has {MAX_GRANTS_PER_KEY} grants, the most it may have"
            ));
        }
        let mine = grants.iter().filter(|g| g.grantee == self.grantee).count();
        (mine >= MAX_GRANTS_PER_GRANTEE).then(|| {
            format!(
                "the grantee has {MAX_GRANTS_PER_GRANTEE} grants on the key, the most it may have"
            )
        })
    }

    /// Whether the grant lets `caller` (an ARN) make `operation` with `context`.
    pub fn permits(
        &self,
        caller: &str,
        operation: GrantOperation,
        context: Option<&EncryptionContext>,
    ) -> bool {
        self.grantee == caller
            && self.operations.contains(&operation)
            && (!operation.takes_context() || self.constraints.hold_for(context))
    }

    /// Whether a grant with `operations` and `constraints` is within what this one lets its
    /// grantee hand on with `CreateGrant`.
    pub fn covers(&self, operations: &[GrantOperation], constraints: &Constraints) -> bool {
        self.operations.contains(&GrantOperation::CreateGrant)
            && operations.iter().all(|op| self.operations.contains(op))
            && constraints.at_least_as_strict_as(&self.constraints)
    }

    /// Whether `caller` may retire it: its retiring principal, or its grantee if it allows
    /// `RetireGrant`.
    pub fn retirable_by(&self, caller: &str) -> bool {
        self.retiring.as_deref() == Some(caller)
            || (self.grantee == caller && self.operations.contains(&GrantOperation::RetireGrant))
    }

    /// Whether a new grant has this grant's name and parameters (a retried `CreateGrant`
    /// with the same `Name` answers with this grant instead of making another).
    pub fn same_as(&self, new: &Grant) -> bool {
        !self.name.is_empty()
            && self.name == new.name
            && self.grantee == new.grantee
            && self.retiring == new.retiring
            && self.operations == new.operations
            && self.constraints == new.constraints
    }
}

/// Operations sorted, without repeats (how a grant keeps them).
pub fn normalized(mut operations: Vec<GrantOperation>) -> Vec<GrantOperation> {
    operations.sort();
    operations.dedup();
    operations
}

#[cfg(test)]
mod tests {
    use super::*;

    fn map(entries: &[(&str, &str)]) -> BTreeMap<String, String> {
        entries
            .iter()
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .collect()
    }

    fn context(entries: &[(&str, &str)]) -> EncryptionContext {
        EncryptionContext::from_entries(map(entries)).unwrap()
    }

    fn grant(operations: &[GrantOperation], constraints: Constraints) -> Grant {
        Grant {
            id: "0".repeat(64),
            name: String::new(),
            grantee: "arn:aws:iam::111122223333:role/worker".into(),
            retiring: Some("arn:aws:iam::111122223333:role/app".into()),
            operations: normalized(operations.to_vec()),
            constraints,
            issuer: "arn:aws:iam::111122223333:role/app".into(),
            created_at: SystemTime::UNIX_EPOCH,
        }
    }

    const WORKER: &str = "arn:aws:iam::111122223333:role/worker";

    #[test]
    fn a_grant_permits_only_its_grantee_and_its_operations() {
        let g = grant(&[GrantOperation::Decrypt], Constraints::default());
        assert!(g.permits(WORKER, GrantOperation::Decrypt, None));
        assert!(!g.permits(WORKER, GrantOperation::Encrypt, None));
        assert!(!g.permits(
            "arn:aws:iam::111122223333:role/other",
            GrantOperation::Decrypt,
            None
        ));
        assert!(
            !g.permits(
                "arn:aws:iam::111122223333:role/Worker",
                GrantOperation::Decrypt,
                None
            ),
            "ARNs are compared exactly"
        );
    }

    #[test]
    fn equals_needs_exactly_the_context_with_keys_in_any_case() {
        let g = grant(
            &[GrantOperation::Decrypt],
            Constraints {
                equals: Some(map(&[("Tenant", "acme")])),
                subset: None,
            },
        );
        let ok = context(&[("tenant", "acme")]);
        assert!(g.permits(WORKER, GrantOperation::Decrypt, Some(&ok)));
        let value_case = context(&[("tenant", "ACME")]);
        assert!(!g.permits(WORKER, GrantOperation::Decrypt, Some(&value_case)));
        let more = context(&[("tenant", "acme"), ("x", "y")]);
        assert!(!g.permits(WORKER, GrantOperation::Decrypt, Some(&more)));
        assert!(!g.permits(WORKER, GrantOperation::Decrypt, None));
    }

    #[test]
    fn subset_needs_the_entries_and_allows_more() {
        let g = grant(
            &[GrantOperation::Decrypt, GrantOperation::DescribeKey],
            Constraints {
                equals: None,
                subset: Some(map(&[("tenant", "acme")])),
            },
        );
        let more = context(&[("TENANT", "acme"), ("x", "y")]);
        assert!(g.permits(WORKER, GrantOperation::Decrypt, Some(&more)));
        assert!(!g.permits(WORKER, GrantOperation::Decrypt, None));
        let other = context(&[("tenant", "globex")]);
        assert!(!g.permits(WORKER, GrantOperation::Decrypt, Some(&other)));
        assert!(
            g.permits(WORKER, GrantOperation::DescribeKey, None),
            "constraints do not apply to operations without a context"
        );
    }

    #[test]
    fn keys_that_differ_only_in_case_never_meet_a_constraint() {
        let g = grant(
            &[GrantOperation::Decrypt],
            Constraints {
                equals: None,
                subset: Some(map(&[("tenant", "acme")])),
            },
        );
        let both = context(&[("tenant", "acme"), ("Tenant", "globex")]);
        assert!(!g.permits(WORKER, GrantOperation::Decrypt, Some(&both)));
    }

    #[test]
    fn a_create_grant_grant_covers_only_narrower_grants() {
        let parent = grant(
            &[GrantOperation::Decrypt, GrantOperation::CreateGrant],
            Constraints {
                equals: None,
                subset: Some(map(&[("tenant", "acme")])),
            },
        );
        let same = parent.constraints.clone();
        assert!(parent.covers(&[GrantOperation::Decrypt], &same));
        assert!(
            !parent.covers(&[GrantOperation::Encrypt], &same),
            "more operations"
        );
        assert!(
            !parent.covers(&[GrantOperation::Decrypt], &Constraints::default()),
            "no constraint is weaker"
        );
        let stricter = Constraints {
            equals: None,
            subset: Some(map(&[("tenant", "acme"), ("region", "eu")])),
        };
        assert!(parent.covers(&[GrantOperation::Decrypt], &stricter));
        let equals = Constraints {
            equals: Some(map(&[("Tenant", "acme"), ("region", "eu")])),
            subset: None,
        };
        assert!(parent.covers(&[GrantOperation::Decrypt], &equals));
        let other_tenant = Constraints {
            equals: Some(map(&[("tenant", "globex")])),
            subset: None,
        };
        assert!(!parent.covers(&[GrantOperation::Decrypt], &other_tenant));
        let without = grant(&[GrantOperation::Decrypt], Constraints::default());
        assert!(
            !without.covers(&[GrantOperation::Decrypt], &same),
            "only a grant holding CreateGrant hands rights on"
        );
    }

    #[test]
    fn an_equals_parent_covers_only_the_same_context() {
        let parent = grant(
            &[GrantOperation::Encrypt, GrantOperation::CreateGrant],
            Constraints {
                equals: Some(map(&[("tenant", "acme")])),
                subset: None,
            },
        );
        let subset = Constraints {
            equals: None,
            subset: Some(map(&[("tenant", "acme")])),
        };
        assert!(!parent.covers(&[GrantOperation::Encrypt], &subset));
        assert!(parent.covers(&[GrantOperation::Encrypt], &parent.constraints.clone()));
    }

    #[test]
    fn retiring_takes_the_retiring_principal_or_a_grantee_allowed_to() {
        let g = grant(&[GrantOperation::Decrypt], Constraints::default());
        assert!(g.retirable_by("arn:aws:iam::111122223333:role/app"));
        assert!(!g.retirable_by(WORKER));
        let g = grant(
            &[GrantOperation::Decrypt, GrantOperation::RetireGrant],
            Constraints::default(),
        );
        assert!(g.retirable_by(WORKER));
    }

    #[test]
    fn a_key_holds_at_most_its_limits_of_grants() {
        let g = grant(&[GrantOperation::Decrypt], Constraints::default());
        let mine = vec![g.clone(); MAX_GRANTS_PER_GRANTEE];
        assert!(g.over_limit(&mine[..MAX_GRANTS_PER_GRANTEE - 1]).is_none());
        assert!(g.over_limit(&mine).is_some(), "per grantee");
        let mut other = g.clone();
        other.grantee = "arn:aws:iam::111122223333:role/other".into();
        assert!(other.over_limit(&mine).is_none());
        let full = vec![other; MAX_GRANTS_PER_KEY];
        assert!(g.over_limit(&full).is_some(), "per key");
    }

    #[test]
    fn operations_parse_by_exact_name_and_from_actions() {
        assert_eq!(
            GrantOperation::parse("GenerateDataKey"),
            Some(GrantOperation::GenerateDataKey)
        );
        assert_eq!(GrantOperation::parse("decrypt"), None);
        assert_eq!(
            GrantOperation::of_action("kms:ReEncryptTo"),
            Some(GrantOperation::ReEncryptTo)
        );
        assert_eq!(GrantOperation::of_action("kms:PutKeyPolicy"), None);
    }
}
