//! The access policy: deny by default; grants of operations on keys to principals.
//!
//! ```toml
//! [[grant]]
//! description = "payments service: data keys under its own keys, for tenant acme only"
//! principals = ["tls:uri=spiffe://example.org/payments", "unix:group=payments"]
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
use std::sync::Arc;

use arc_swap::ArcSwap;
use globset::{Glob, GlobBuilder, GlobSet, GlobSetBuilder};
use serde::Deserialize;

use crate::context::EncryptionContext;
use crate::error::{Error, Result};

macro_rules! operations {
    ($($name:ident: $data_plane:expr),* $(,)?) => {
        /// Every RPC, and what the policy can grant. `ReWrap` is the RPC; its permission is split
/// as AWS KMS splits `ReEncryptFrom` / `ReEncryptTo`: the caller needs `ReWrapFrom` on the
/// source key and `ReWrapTo` on the destination key, so that a right to re-wrap into a
/// scratch key never covers every source.
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
    ReWrapFrom: true,
    ReWrapTo: true,
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
    GenerateRandom: true,
    EnableKeyRotation: false,
    DisableKeyRotation: false,
    TagKey: false,
    UntagKey: false,
    UpdateKeyDescription: false,
    GetParametersForImport: false,
    ImportKeyMaterial: false,
    DeleteImportedKeyMaterial: false,
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
    let grantable = || Operation::ALL.iter().filter(|o| **o != Operation::ReWrap);
    for name in names {
        match name.as_str() {
            "all" => set.extend(grantable()),
            "data-plane" => set.extend(grantable().filter(|o| o.is_data_plane())),
            "admin" => set.extend(grantable().filter(|o| !o.is_data_plane())),
            "ReWrap" => {
                return Err(Error::Config(format!(
                    "grant {index}: \"ReWrap\" is split: grant \"ReWrapFrom\" on the keys blobs may come from and \"ReWrapTo\" on the keys they may go to (`wrapd config migrate --config FILE --write` rewrites the policy)"
                )));
            }
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

/// The principal namespaces, one per way of calling: a principal of one can never be produced
/// by another. TLS principals are built by wrapd from certificate fields (`tls:uri=`,
/// `tls:dns=`, `tls:cn=`), so no certificate can name a `unix:` or internal `wrapd:` principal.
pub const PRINCIPAL_NAMESPACES: &[&str] = &["unix:", "tls:", "aws:", "wrapd:"];

/// Checks that a principal pattern can match a principal of some namespace. Forms from
/// before the namespaces (`spiffe://…`, `dns:…`, `cn:…`) are refused with what to write.
fn check_principal_pattern(pattern: &str, index: usize) -> Result<()> {
    let literal = pattern
        .find(['*', '?', '[', '{'])
        .map_or(pattern, |i| &pattern[..i]);
    let fits = PRINCIPAL_NAMESPACES
        .iter()
        .any(|ns| ns.starts_with(literal) || literal.starts_with(ns));
    if fits {
        return Ok(());
    }
    let Some(instead) = super::migrate::namespaced(pattern) else {
        return Err(Error::Config(format!(
            "grant {index}: principal {pattern:?} can never match: principals start with unix: (unix socket), tls: (client certificates: tls:uri=, tls:dns=, tls:cn=), aws: (AWS access keys: aws:access-key=ID) or wrapd: (internal)"
        )));
    };
    Err(Error::Config(format!(
        "grant {index}: principal {pattern:?} can no longer match (certificate principals are namespaced): write {instead:?} (`wrapd config migrate --config FILE --write` rewrites the policy)"
    )))
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
                for pattern in &g.principals {
                    check_principal_pattern(pattern, index)?;
                }
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
/// previous policy in force. Readers never wait: the policy is swapped atomically.
#[derive(Debug)]
pub struct PolicyHandle {
    path: Option<PathBuf>,
    current: ArcSwap<Policy>,
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
            current: ArcSwap::from_pointee(policy),
        })
    }

    /// A fixed policy (tests, embedding).
    pub fn fixed(policy: Policy) -> Self {
        Self {
            path: None,
            current: ArcSwap::from_pointee(policy),
        }
    }

    /// The policy in force.
    pub fn current(&self) -> Arc<Policy> {
        self.current.load_full()
    }

    /// Re-reads the file. On error the old policy stays in force and the error is returned.
    pub fn reload(&self) -> Result<usize> {
        let Some(path) = &self.path else {
            return Ok(self.current().len());
        };
        let policy = Policy::load(path)?;
        let grants = policy.len();
        self.current.store(Arc::new(policy));
        Ok(grants)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const POLICY: &str = r#"
        [[grant]]
        description = "payments: data plane on its keys, tenant acme only"
        principals = ["tls:uri=spiffe://example.org/payments"]
        operations = ["data-plane"]
        keys = ["alias/payments-*"]
        require_context = { tenant = "acme" }

        [[grant]]
        principals = ["unix:group=ops", "tls:cn=admin-*"]
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
        let payments = who("tls:uri=spiffe://example.org/payments");
        let key = names(&["key/aa", "alias/payments-db"]);
        let acme = ctx(&[("tenant", "acme"), ("extra", "ok")]);
        for op in Operation::ALL.iter().filter(|o| **o != Operation::ReWrap) {
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
                policy.allows(&who("tls:cn=admin-bob"), *op, &Target::Any, None),
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
        let payments = who("tls:uri=spiffe://example.org/payments");
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

    /// A policy written for un-namespaced certificate principals fails to load and says what
    /// to write instead.
    #[test]
    fn principals_of_no_namespace_are_refused_with_the_fix() {
        let grant = |p: &str| {
            format!("[[grant]]\nprincipals = [{p:?}]\noperations = [\"all\"]\nkeys = [\"*\"]")
        };
        for (old, fix) in [
            ("spiffe://example.org/x", "tls:uri=spiffe://example.org/x"),
            ("dns:svc.example.org", "tls:dns=svc.example.org"),
            ("cn:alice", "tls:cn=alice"),
        ] {
            let err = Policy::parse(&grant(old)).unwrap_err().to_string();
            assert!(err.contains(fix), "{err}");
        }
        assert!(Policy::parse(&grant("unx:uid=0")).is_err());
        for ok in [
            "*",
            "unix:uid=0",
            "tls:*",
            "t*",
            "wrapd:kubernetes-kms",
            "tls:uri=spiffe://x/*",
        ] {
            assert!(Policy::parse(&grant(ok)).is_ok(), "{ok}");
        }
    }

    /// ReWrap is granted per end.
    #[test]
    fn rewrap_is_granted_per_end() {
        let err = Policy::parse(
            "[[grant]]\nprincipals = [\"unix:uid=1\"]\noperations = [\"ReWrap\"]\nkeys = [\"*\"]",
        )
        .unwrap_err();
        assert!(err.to_string().contains("ReWrapFrom"), "{err}");
        let policy = Policy::parse(
            "[[grant]]\nprincipals = [\"unix:uid=1\"]\noperations = [\"ReWrapTo\"]\nkeys = [\"*\"]\n\
             [[grant]]\nprincipals = [\"unix:uid=1\"]\noperations = [\"ReWrapFrom\"]\nkeys = [\"alias/mine\"]",
        )
        .unwrap();
        let me = who("unix:uid=1");
        assert!(policy.allows(&me, Operation::ReWrapTo, &names(&["key/scratch"]), None));
        assert!(!policy.allows(&me, Operation::ReWrapFrom, &names(&["key/other"]), None));
        assert!(policy.allows(&me, Operation::ReWrapFrom, &names(&["alias/mine"]), None));
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
