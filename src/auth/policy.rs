//! The access policy: deny by default; grants of operations on keys to principals.
//!
//! ```toml
//! [[grant]]
//! description = "payments service: data keys under its own keys, for tenant acme only"
//! principals = ["spiffe://example.org/payments", "unix:group=payments"]
//! operations = ["data-plane"]            # RPC names, or "data-plane", "admin", "all"
//! keys = ["alias/payments-*"]           # globs over key ids and aliases
//! require_context = { tenant = "acme" } # entries the encryption context must contain
//! ```
//!
//! A grant matches a call when one of the caller's principals matches a `principals` glob,
//! the operation is listed, one of the key's names (its id and every alias pointing at it)
//! matches a `keys` glob, and, if `require_context` is set, the call's encryption context
//! contains every entry. Because aliases are matched as the key's current names, a grant on
//! an alias follows the alias when it is re-pointed. Calls that name no key (`ListKeys`,
//! `ListAliases` without a key, `CreateKey` without an alias) match only a `keys` glob that
//! matches `*` itself, i.e. `"*"`. Grants with `require_context` never match calls without
//! an encryption context (the admin operations).

use std::collections::{BTreeMap, HashSet};
use std::path::{Path, PathBuf};
use std::sync::{Arc, RwLock};

use globset::{Glob, GlobBuilder, GlobSet, GlobSetBuilder};
use serde::Deserialize;

use crate::context::EncryptionContext;
use crate::error::{Error, Result};

macro_rules! operations {
    ($($name:ident: $data_plane:expr),* $(,)?) => {
        /// Every RPC that the policy can grant.
        #[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
        #[allow(missing_docs)]
        pub enum Operation { $($name),* }

        impl Operation {
            /// All operations.
            pub const ALL: &'static [Operation] = &[$(Operation::$name),*];

            /// The RPC name.
            pub fn name(self) -> &'static str {
                match self { $(Operation::$name => stringify!($name)),* }
            }

            /// True for `DataKeyService` RPCs.
            pub fn is_data_plane(self) -> bool {
                match self { $(Operation::$name => $data_plane),* }
            }
        }
    };
}

operations! {
    GenerateDataKey: true,
    GenerateDataKeyWithoutPlaintext: true,
    Wrap: true,
    Unwrap: true,
    ReWrap: true,
    CreateKey: false,
    DescribeKey: false,
    ListKeys: false,
    RotateKey: false,
    EnableKey: false,
    DisableKey: false,
    ScheduleKeyDeletion: false,
    CancelKeyDeletion: false,
    CreateAlias: false,
    UpdateAlias: false,
    DeleteAlias: false,
    ListAliases: false,
}

/// What a call acts on.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Target {
    /// A key, by all its names: id and aliases (or, for a key that does not exist, the
    /// name as requested, so that a denial does not reveal whether it exists).
    Key(Vec<String>),
    /// No key in particular.
    Any,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawPolicy {
    #[serde(default, rename = "grant")]
    grants: Vec<RawGrant>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawGrant {
    #[serde(default)]
    #[allow(dead_code)] // documentation for humans; kept so the parser accepts it
    description: Option<String>,
    principals: Vec<String>,
    operations: Vec<String>,
    keys: Vec<String>,
    #[serde(default)]
    require_context: BTreeMap<String, String>,
}

#[derive(Debug)]
struct Grant {
    principals: GlobSet,
    operations: HashSet<Operation>,
    keys: GlobSet,
    require_context: BTreeMap<String, String>,
}

/// A parsed policy. The empty policy denies everything.
#[derive(Debug, Default)]
pub struct Policy {
    grants: Vec<Grant>,
}

fn glob(pattern: &str) -> Result<Glob> {
    GlobBuilder::new(pattern)
        .literal_separator(false)
        .build()
        .map_err(|e| Error::Config(format!("bad pattern {pattern:?}: {e}")))
}

fn glob_set(patterns: &[String], what: &str, index: usize) -> Result<GlobSet> {
    if patterns.is_empty() {
        return Err(Error::Config(format!(
            "grant {index}: {what} must not be empty"
        )));
    }
    let mut builder = GlobSetBuilder::new();
    for pattern in patterns {
        builder.add(glob(pattern)?);
    }
    builder
        .build()
        .map_err(|e| Error::Config(format!("grant {index}: {what}: {e}")))
}

fn operations(names: &[String], index: usize) -> Result<HashSet<Operation>> {
    if names.is_empty() {
        return Err(Error::Config(format!(
            "grant {index}: operations must not be empty"
        )));
    }
    let mut set = HashSet::new();
    for name in names {
        match name.as_str() {
            "all" => set.extend(Operation::ALL),
            "data-plane" => set.extend(Operation::ALL.iter().filter(|o| o.is_data_plane())),
            "admin" => set.extend(Operation::ALL.iter().filter(|o| !o.is_data_plane())),
            other => {
                let op = Operation::ALL
                    .iter()
                    .find(|o| o.name() == other)
                    .ok_or_else(|| {
                        Error::Config(format!(
                            "grant {index}: unknown operation {other:?} (use an RPC name, \"data-plane\", \"admin\" or \"all\")"
                        ))
                    })?;
                set.insert(*op);
            }
        }
    }
    Ok(set)
}

impl Policy {
    /// Parses policy text (TOML, see the module docs).
    pub fn parse(text: &str) -> Result<Self> {
        let raw: RawPolicy =
            toml::from_str(text).map_err(|e| Error::Config(e.message().replace('\n', " ")))?;
        let grants = raw
            .grants
            .into_iter()
            .enumerate()
            .map(|(i, g)| {
                let index = i + 1;
                Ok(Grant {
                    principals: glob_set(&g.principals, "principals", index)?,
                    operations: operations(&g.operations, index)?,
                    keys: glob_set(&g.keys, "keys", index)?,
                    require_context: g.require_context,
                })
            })
            .collect::<Result<Vec<_>>>()?;
        Ok(Self { grants })
    }

    /// Reads and parses a policy file.
    pub fn load(path: &Path) -> Result<Self> {
        let text = std::fs::read_to_string(path)
            .map_err(|e| Error::Config(format!("cannot read policy {}: {e}", path.display())))?;
        Self::parse(&text).map_err(|e| match e {
            Error::Config(m) => Error::Config(format!("policy {}: {m}", path.display())),
            other => other,
        })
    }

    /// Number of grants.
    pub fn len(&self) -> usize {
        self.grants.len()
    }

    /// True when the policy has no grant (denies everything).
    pub fn is_empty(&self) -> bool {
        self.grants.is_empty()
    }

    /// Whether any grant allows `op` on `target` to a caller with `principals`.
    pub fn allows(
        &self,
        principals: &[String],
        op: Operation,
        target: &Target,
        context: Option<&EncryptionContext>,
    ) -> bool {
        self.grants.iter().any(|grant| {
            grant.operations.contains(&op)
                && principals.iter().any(|p| grant.principals.is_match(p))
                && match target {
                    Target::Key(names) => names.iter().any(|n| grant.keys.is_match(n)),
                    Target::Any => grant.keys.is_match("*"),
                }
                && (grant.require_context.is_empty()
                    || context.is_some_and(|ctx| {
                        grant
                            .require_context
                            .iter()
                            .all(|(k, v)| ctx.get(k) == Some(v.as_str()))
                    }))
        })
    }

    /// Whether any grant allows `op` to these principals at all (on any key).
    pub fn allows_some(&self, principals: &[String], op: Operation) -> bool {
        self.grants.iter().any(|grant| {
            grant.operations.contains(&op)
                && principals.iter().any(|p| grant.principals.is_match(p))
        })
    }
}

/// The policy in force, reloadable (SIGHUP). A policy file that fails to load leaves the
/// previous policy in force.
#[derive(Debug)]
pub struct PolicyHandle {
    path: Option<PathBuf>,
    current: RwLock<Arc<Policy>>,
}

impl PolicyHandle {
    /// Loads the policy file; `None` means no policy, which denies everything.
    pub fn load(path: Option<PathBuf>) -> Result<Self> {
        let policy = match &path {
            Some(path) => Policy::load(path)?,
            None => Policy::default(),
        };
        Ok(Self {
            path,
            current: RwLock::new(Arc::new(policy)),
        })
    }

    /// A fixed policy (tests, embedding).
    pub fn fixed(policy: Policy) -> Self {
        Self {
            path: None,
            current: RwLock::new(Arc::new(policy)),
        }
    }

    /// The policy in force.
    pub fn current(&self) -> Arc<Policy> {
        self.current
            .read()
            .unwrap_or_else(|e| e.into_inner())
            .clone()
    }

    /// Re-reads the file. On error the old policy stays in force and the error is returned.
    pub fn reload(&self) -> Result<usize> {
        let Some(path) = &self.path else {
            return Ok(self.current().len());
        };
        let policy = Policy::load(path)?;
        let grants = policy.len();
        *self.current.write().unwrap_or_else(|e| e.into_inner()) = Arc::new(policy);
        Ok(grants)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const POLICY: &str = r#"
        [[grant]]
        description = "payments: data plane on its keys, tenant acme only"
        principals = ["spiffe://example.org/payments"]
        operations = ["data-plane"]
        keys = ["alias/payments-*"]
        require_context = { tenant = "acme" }

        [[grant]]
        principals = ["unix:group=ops", "cn:admin-*"]
        operations = ["admin"]
        keys = ["*"]

        [[grant]]
        principals = ["unix:user=reader"]
        operations = ["DescribeKey", "Unwrap"]
        keys = ["key/0123*"]
    "#;

    fn names(n: &[&str]) -> Target {
        Target::Key(n.iter().map(|s| s.to_string()).collect())
    }

    fn ctx(entries: &[(&str, &str)]) -> EncryptionContext {
        EncryptionContext::from_entries(entries.iter().map(|(k, v)| (k.to_string(), v.to_string())))
            .unwrap()
    }

    fn who(p: &str) -> Vec<String> {
        vec![p.to_owned()]
    }

    #[test]
    fn every_operation_is_granted_and_denied_somewhere() {
        let policy = Policy::parse(POLICY).unwrap();
        let payments = who("spiffe://example.org/payments");
        let key = names(&["key/aa", "alias/payments-db"]);
        let acme = ctx(&[("tenant", "acme"), ("extra", "ok")]);
        for op in Operation::ALL {
            // Data plane: payments yes (with context), ops group no.
            // Admin: ops group yes, payments no.
            let data = op.is_data_plane();
            assert_eq!(
                policy.allows(&payments, *op, &key, Some(&acme)),
                data,
                "{op:?}"
            );
            assert_eq!(
                policy.allows(&who("unix:group=ops"), *op, &key, Some(&acme)),
                !data,
                "{op:?}"
            );
            assert_eq!(
                policy.allows(&who("cn:admin-bob"), *op, &Target::Any, None),
                !data,
                "{op:?}"
            );
            assert!(
                !policy.allows(&who("unix:user=nobody"), *op, &key, Some(&acme)),
                "{op:?}"
            );
        }
    }

    #[test]
    fn globs_aliases_and_context() {
        let policy = Policy::parse(POLICY).unwrap();
        let payments = who("spiffe://example.org/payments");
        let acme = ctx(&[("tenant", "acme")]);
        let op = Operation::GenerateDataKey;
        // The grant follows the alias: any key currently named alias/payments-*.
        assert!(policy.allows(
            &payments,
            op,
            &names(&["key/ff", "alias/payments-x"]),
            Some(&acme)
        ));
        assert!(!policy.allows(&payments, op, &names(&["key/ff"]), Some(&acme)));
        assert!(!policy.allows(&payments, op, &names(&["alias/other"]), Some(&acme)));
        // Required context: present with the value, else denied.
        let key = names(&["alias/payments-x"]);
        assert!(!policy.allows(&payments, op, &key, Some(&ctx(&[("tenant", "evil")]))));
        assert!(!policy.allows(&payments, op, &key, Some(&ctx(&[]))));
        assert!(!policy.allows(&payments, op, &key, None));
        // Single operations and id globs.
        let reader = who("unix:user=reader");
        assert!(policy.allows(&reader, Operation::Unwrap, &names(&["key/0123ab"]), None));
        assert!(!policy.allows(&reader, Operation::Wrap, &names(&["key/0123ab"]), None));
        assert!(!policy.allows(&reader, Operation::Unwrap, &names(&["key/9999"]), None));
        // "No key in particular" needs a "*" grant.
        assert!(!policy.allows(&reader, Operation::DescribeKey, &Target::Any, None));
        assert!(policy.allows_some(&reader, Operation::Unwrap));
        assert!(!policy.allows_some(&reader, Operation::Wrap));
    }

    #[test]
    fn bad_policies_are_rejected() {
        for bad in [
            "[[grant]]\nprincipals = []\noperations = [\"all\"]\nkeys = [\"*\"]",
            "[[grant]]\nprincipals = [\"x\"]\noperations = [\"Fly\"]\nkeys = [\"*\"]",
            "[[grant]]\nprincipals = [\"x\"]\noperations = [\"all\"]\nkeys = [\"[\"]",
            "[[grant]]\nprincipals = [\"x\"]\noperations = [\"all\"]\nkeys = [\"*\"]\nsurprise = 1",
            "not toml",
        ] {
            assert!(Policy::parse(bad).is_err(), "{bad}");
        }
        assert!(Policy::parse("").unwrap().is_empty());
    }
}
