//! The access policy: deny by default; grants of operations on keys to principals.
//!
//! ```toml
//! [[grant]]
//! description = "payments service: data keys under its own keys, for tenant acme only"
//! principals = ["tls:uri=spiffe://example.org/payments", "unix:group=payments"]
//! operations = ["data-plane"]            # RPC names, or "data-plane", "admin", "all"
//! keys = ["alias/payments-*"]           # globs over key ids and aliases
//! require_context = { tenant = "acme" } # entries the encryption context must contain
//!
//! [[grant]]
//! description = "AWS KMS, for S3 in account 111122223333 only"
//! principals = ["xks:dev"]
//! operations = ["xks"]                   # XksEncrypt, XksDecrypt, XksGetKeyMetadata
//!                                        # (XksGetHealthStatus is never checked)
//! keys = ["key/*"]
//! require_request = { kmsViaService = "s3", awsPrincipalArn = "arn:aws:iam::111122223333:*" }
//! ```
//!
//! A grant matches a call when one of the caller's principals matches a `principals` glob,
//! the operation is listed, one of the key's names (its id and every alias pointing at it)
//! matches a `keys` glob (a key id may be written `key/UUID`, as the AWS KMS API writes it),
//! and, if `require_context` is set, the call's encryption context
//! contains every entry. Because aliases are matched as the key's current names, a grant on
//! an alias follows the alias when it is re-pointed. Calls that name no key (`ListKeys`,
//! `ListAliases` without a key, `CreateKey` without an alias) match only a `keys` glob that
//! matches `*` itself, i.e. `"*"`. Grants with `require_context` never match calls without
//! an encryption context (the admin operations). `require_request` holds globs over the
//! attributes a front end records for a call: the XKS proxy API's request metadata
//! (`awsPrincipalArn`, `kmsKeyArn`, `kmsOperation`, `kmsRequestId`, `kmsViaService`,
//! `awsSourceVpc`, `awsSourceVpce`); a grant with it matches only calls whose attributes
//! match every entry (an absent attribute never does). A denied call that such a grant
//! would otherwise have allowed is told which grant and attribute refused it
//! ([`Policy::explain_denial`]). A grant with `require_key_grant = true` matches only calls
//! that a key grant (AWS KMS's `CreateGrant`, kept with the key in the metadata store) also
//! allows: with `key_policies = "restrict"`, the default, that is how this file lets key
//! grants give rights, within bounds it sets ([`Policy::allows_with_key_grant`]).

use std::collections::{BTreeMap, HashSet};
use std::path::{Path, PathBuf};
use std::sync::Arc;

use arc_swap::ArcSwap;
use globset::{Glob, GlobBuilder, GlobSet, GlobSetBuilder};
use serde::Deserialize;

use super::key_policy::KeyPolicy;
use crate::context::EncryptionContext;
use crate::error::{Error, Result};

/// The group an operation belongs to, for the `data-plane`, `admin` and `xks` shorthands
/// of a grant.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Group {
    /// `DataKeyService` RPCs.
    DataPlane,
    /// `KeyService` RPCs.
    Admin,
    /// The XKS proxy API's operations (AWS KMS's own calls).
    Xks,
}

macro_rules! operations {
    ($($name:ident: $group:ident),* $(,)?) => {
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

            /// Whether a call of it is checked against the policy: every operation but the
            /// XKS health check, which the XKS specification excludes from authorization.
            pub fn is_authorized(self) -> bool {
                !matches!(self, Operation::XksGetHealthStatus)
            }

            /// The operation's group.
            pub fn group(self) -> Group {
                match self { $(Operation::$name => Group::$group),* }
            }

            /// The operation a grant must name for a call of this one to go on at all: itself,
            /// but for `ReWrap`, which is granted as its two ends and checked first as
            /// `ReWrapFrom`.
            pub fn granted_as(self) -> Operation {
                match self {
                    Operation::ReWrap => Operation::ReWrapFrom,
                    op => op,
                }
            }

            /// True for `DataKeyService` RPCs.
            pub fn is_data_plane(self) -> bool {
                self.group() == Group::DataPlane
            }
        }
    };
}

operations! {
    GenerateDataKey: DataPlane,
    GenerateDataKeyWithoutPlaintext: DataPlane,
    Wrap: DataPlane,
    Unwrap: DataPlane,
    ReWrap: DataPlane,
    ReWrapFrom: DataPlane,
    ReWrapTo: DataPlane,
    CreateKey: Admin,
    DescribeKey: Admin,
    ListKeys: Admin,
    RotateKey: Admin,
    EnableKey: Admin,
    DisableKey: Admin,
    ScheduleKeyDeletion: Admin,
    CancelKeyDeletion: Admin,
    CreateAlias: Admin,
    UpdateAlias: Admin,
    DeleteAlias: Admin,
    ListAliases: Admin,
    GenerateRandom: DataPlane,
    EnableKeyRotation: Admin,
    DisableKeyRotation: Admin,
    TagKey: Admin,
    UntagKey: Admin,
    UpdateKeyDescription: Admin,
    GetParametersForImport: Admin,
    ImportKeyMaterial: Admin,
    DeleteImportedKeyMaterial: Admin,
    RetireKeyVersion: Admin,
    RestoreKeyVersion: Admin,
    ScheduleKeyVersionDestruction: Admin,
    CancelKeyVersionDestruction: Admin,
    GetKeyPolicy: Admin,
    PutKeyPolicy: Admin,
    ListKeyPolicies: Admin,
    CreateGrant: Admin,
    ListGrants: Admin,
    ListRetirableGrants: Admin,
    RetireGrant: Admin,
    RevokeGrant: Admin,
    XksGetHealthStatus: Xks,
    XksGetKeyMetadata: Xks,
    XksEncrypt: Xks,
    XksDecrypt: Xks,
}

/// What a call acts on.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Target {
    /// A key.
    Key {
        /// All its names: id and aliases (or, for a key that does not exist, the name as
        /// requested, so that a denial does not reveal whether it exists).
        names: Vec<String>,
        /// Its key policy (`None`: AWS's default policy, which leaves every call to this
        /// file).
        policy: Option<Arc<KeyPolicy>>,
        /// Its grants (`CreateGrant`).
        grants: Arc<[crate::grant::Grant]>,
    },
    /// No key in particular.
    Any,
}

impl Target {
    /// A key known by names alone: AWS's default policy, no grants (a key that does not
    /// exist yet, or whose policy is not the question).
    pub fn named(names: Vec<String>) -> Self {
        Self::Key {
            names,
            policy: None,
            grants: Arc::default(),
        }
    }
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawPolicy {
    #[serde(default, rename = "grant")]
    grants: Vec<RawGrant>,
    #[serde(default)]
    key_policies: KeyPolicies,
}

/// What a key policy's `Allow` naming the caller does (`key_policies` in the policy file).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum KeyPolicies {
    /// The default: key policies restrict. A `Deny` denies; an `Allow`, whether it names the
    /// caller or its account, still needs a grant of this file. Key policies live in the
    /// metadata store, which a fleet shares; this file is each host's own, so a store writer
    /// cannot give anyone access.
    #[default]
    Restrict,
    /// As AWS KMS: a key policy statement that names the caller allows without a grant.
    Grant,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawGrant {
    #[serde(default)]
    description: Option<String>,
    principals: Vec<String>,
    operations: Vec<String>,
    keys: Vec<String>,
    #[serde(default)]
    require_context: BTreeMap<String, String>,
    #[serde(default)]
    require_request: BTreeMap<String, String>,
    #[serde(default)]
    require_key_grant: bool,
}

#[derive(Debug)]
struct Grant {
    description: Option<String>,
    principals: GlobSet,
    operations: HashSet<Operation>,
    keys: GlobSet,
    require_context: BTreeMap<String, String>,
    require_request: Vec<(String, String, globset::GlobMatcher)>,
    require_key_grant: bool,
}

/// What a front end records of a call beyond its key and context, by attribute name (the
/// XKS proxy API's request metadata), for `require_request` and the audit line.
pub type RequestAttributes = BTreeMap<String, String>;

/// The attributes `require_request` may name.
pub const REQUEST_ATTRIBUTES: &[&str] = &[
    "awsPrincipalArn",
    "awsSourceVpc",
    "awsSourceVpce",
    "kmsKeyArn",
    "kmsOperation",
    "kmsRequestId",
    "kmsViaService",
];

/// A parsed policy. The empty policy denies everything.
#[derive(Debug, Default)]
pub struct Policy {
    grants: Vec<Grant>,
    key_policies: KeyPolicies,
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
            // Every RPC; the XKS operations only by name or "xks": they are AWS KMS's, and a
            // grant of "all" to a broad principal glob must not hand them to key stores.
            "all" => set.extend(grantable().filter(|o| o.group() != Group::Xks)),
            "data-plane" => set.extend(grantable().filter(|o| o.group() == Group::DataPlane)),
            "admin" => set.extend(grantable().filter(|o| o.group() == Group::Admin)),
            "xks" => set.extend(grantable().filter(|o| o.group() == Group::Xks)),
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
                            "grant {index}: unknown operation {other:?} (use an RPC name, \"data-plane\", \"admin\", \"xks\" or \"all\")"
                        ))
                    })?;
                set.insert(*op);
            }
        }
    }
    Ok(set)
}

/// `keys` entries with a key id written as AWS KMS writes it (`key/UUID`) in the form the
/// globs are matched against (`key/HEX`), so that an id copied from an AWS KMS API answer
/// names the key; anything else as written.
fn canonical_keys(keys: Vec<String>) -> Vec<String> {
    keys.into_iter()
        .map(|key| match crate::ids::KeyId::parse_named(&key) {
            Ok(id) => id.to_string(),
            Err(_) => key,
        })
        .collect()
}

/// The principal namespaces, one per way of calling: a principal of one can never be produced
/// by another. TLS principals are built by wrapd from certificate fields (`tls:uri=`,
/// `tls:dns=`, `tls:cn=`), so no certificate can name a `unix:` or internal `wrapd:` principal.
pub const PRINCIPAL_NAMESPACES: &[&str] = &["unix:", "tls:", "aws:", "xks:", "wrapd:"];

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
            "grant {index}: principal {pattern:?} can never match: principals start with unix: (unix socket), tls: (client certificates: tls:uri=, tls:dns=, tls:cn=), aws: (AWS access keys: aws:access-key=ID), xks: (XKS key stores: xks:NAME) or wrapd: (internal)"
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
                let mut require_request = Vec::new();
                for (name, pattern) in g.require_request {
                    if !REQUEST_ATTRIBUTES.contains(&name.as_str()) {
                        return Err(Error::Config(format!(
                            "grant {index}: require_request names {name:?}; the attributes are {}",
                            REQUEST_ATTRIBUTES.join(", ")
                        )));
                    }
                    let matcher = glob(&pattern)?.compile_matcher();
                    require_request.push((name, pattern, matcher));
                }
                Ok(Grant {
                    description: g.description,
                    principals: glob_set(&g.principals, "principals", index)?,
                    operations: operations(&g.operations, index)?,
                    keys: glob_set(&canonical_keys(g.keys), "keys", index)?,
                    require_context: g.require_context,
                    require_request,
                    require_key_grant: g.require_key_grant,
                })
            })
            .collect::<Result<Vec<_>>>()?;
        Ok(Self {
            grants,
            key_policies: raw.key_policies,
        })
    }

    /// What a key policy's `Allow` naming the caller does.
    pub fn key_policies(&self) -> KeyPolicies {
        self.key_policies
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

    /// Whether any grant allows `op` on `target` to a caller with `principals`, with the
    /// call's encryption context and request attributes (grants with `require_key_grant`
    /// left out: see [`Policy::allows_with_key_grant`]).
    pub fn allows(
        &self,
        principals: &[String],
        op: Operation,
        target: &Target,
        context: Option<&EncryptionContext>,
        request: &RequestAttributes,
    ) -> bool {
        self.any_grant(false, principals, op, target, context, request)
    }

    /// Whether a grant with `require_key_grant` allows a call a key grant (`CreateGrant`)
    /// allows: with `key_policies = "restrict"` a key grant, kept in the shared metadata
    /// store, allows only within such a grant of this file (an ordinary grant does not count:
    /// a key policy that leaves the caller out must stay able to, whatever the store says).
    pub fn allows_with_key_grant(
        &self,
        principals: &[String],
        op: Operation,
        target: &Target,
        context: Option<&EncryptionContext>,
        request: &RequestAttributes,
    ) -> bool {
        self.any_grant(true, principals, op, target, context, request)
    }

    /// Whether a grant whose `require_key_grant` is `key_grant` allows the call.
    fn any_grant(
        &self,
        key_grant: bool,
        principals: &[String],
        op: Operation,
        target: &Target,
        context: Option<&EncryptionContext>,
        request: &RequestAttributes,
    ) -> bool {
        self.grants.iter().any(|grant| {
            grant.require_key_grant == key_grant
                && grant.covers(principals, op, target, context)
                && grant.request_mismatch(request).is_none()
        })
    }

    /// Why a call [`Policy::allows`] refused was refused, when a grant would have allowed it
    /// but for a `require_request` entry: that grant (its number and description) and the
    /// attribute, for the denial's message and the audit line.
    pub fn explain_denial(
        &self,
        principals: &[String],
        op: Operation,
        target: &Target,
        context: Option<&EncryptionContext>,
        request: &RequestAttributes,
    ) -> Option<String> {
        self.grants.iter().enumerate().find_map(|(i, grant)| {
            if !grant.covers(principals, op, target, context) {
                return None;
            }
            let (name, pattern) = grant.request_mismatch(request)?;
            let described = grant
                .description
                .as_deref()
                .map_or_else(String::new, |d| format!(" ({d:?})"));
            let got = request
                .get(name)
                .map_or_else(|| "none".to_owned(), |v| format!("{:?}", truncate(v)));
            Some(format!(
                "grant {}{described} requires {name} to match {pattern:?}; the request has {got}",
                i + 1
            ))
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

impl Grant {
    /// Whether the grant names the caller, the operation and the key, and its context
    /// entries are in the call's context.
    fn covers(
        &self,
        principals: &[String],
        op: Operation,
        target: &Target,
        context: Option<&EncryptionContext>,
    ) -> bool {
        self.operations.contains(&op)
            && principals.iter().any(|p| self.principals.is_match(p))
            && match target {
                Target::Key { names, .. } => names.iter().any(|n| self.keys.is_match(n)),
                Target::Any => self.keys.is_match("*"),
            }
            && (self.require_context.is_empty()
                || context.is_some_and(|ctx| {
                    self.require_context
                        .iter()
                        .all(|(k, v)| ctx.get(k) == Some(v.as_str()))
                }))
    }

    /// The first `require_request` entry the call's attributes do not match.
    fn request_mismatch<'a>(&'a self, request: &RequestAttributes) -> Option<(&'a str, &'a str)> {
        self.require_request
            .iter()
            .find(|(name, _, matcher)| !request.get(name).is_some_and(|v| matcher.is_match(v)))
            .map(|(name, pattern, _)| (name.as_str(), pattern.as_str()))
    }
}

/// A value shortened for a message (attribute values are up to 2,048 characters).
fn truncate(value: &str) -> &str {
    match value.char_indices().nth(128) {
        Some((i, _)) => &value[..i],
        None => value,
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

        [[grant]]
        principals = ["xks:dev"]
        operations = ["xks"]
        keys = ["*"]
    "#;

    fn names(n: &[&str]) -> Target {
        Target::named(n.iter().map(|s| s.to_string()).collect())
    }

    fn ctx(entries: &[(&str, &str)]) -> EncryptionContext {
        EncryptionContext::from_entries(entries.iter().map(|(k, v)| (k.to_string(), v.to_string())))
            .unwrap()
    }

    fn who(p: &str) -> Vec<String> {
        vec![p.to_owned()]
    }

    /// [`Policy::allows`] for a call without request attributes.
    fn allows(
        policy: &Policy,
        principals: &[String],
        op: Operation,
        target: &Target,
        context: Option<&EncryptionContext>,
    ) -> bool {
        policy.allows(principals, op, target, context, &RequestAttributes::new())
    }

    #[test]
    fn a_key_written_as_a_uuid_names_the_key_and_a_key_grant_rule_needs_a_key_grant() {
        let policy = Policy::parse(
            r#"
            [[grant]]
            principals = ["unix:uid=1"]
            operations = ["Unwrap"]
            keys = ["key/01234567-89ab-cdef-0123-456789abcdef"]

            [[grant]]
            principals = ["unix:uid=2"]
            operations = ["Unwrap"]
            keys = ["*"]
            require_key_grant = true
            "#,
        )
        .unwrap();
        let key = names(&["key/0123456789abcdef0123456789abcdef"]);
        assert!(allows(
            &policy,
            &who("unix:uid=1"),
            Operation::Unwrap,
            &key,
            None
        ));
        let request = RequestAttributes::new();
        let worker = who("unix:uid=2");
        assert!(!allows(&policy, &worker, Operation::Unwrap, &key, None));
        assert!(policy.allows_with_key_grant(&worker, Operation::Unwrap, &key, None, &request));
        assert!(
            !policy.allows_with_key_grant(
                &who("unix:uid=1"),
                Operation::Unwrap,
                &key,
                None,
                &request
            ),
            "an ordinary grant is no bound for key grants"
        );
    }

    #[test]
    fn every_operation_is_granted_and_denied_somewhere() {
        let policy = Policy::parse(POLICY).unwrap();
        let payments = who("tls:uri=spiffe://example.org/payments");
        let key = names(&["key/aa", "alias/payments-db"]);
        let acme = ctx(&[("tenant", "acme"), ("extra", "ok")]);
        for op in Operation::ALL.iter().filter(|o| **o != Operation::ReWrap) {
            // Data plane: payments yes (with context). Admin: the ops group. XKS: xks:dev.
            let group = op.group();
            assert_eq!(
                allows(&policy, &payments, *op, &key, Some(&acme)),
                group == Group::DataPlane,
                "{op:?}"
            );
            assert_eq!(
                allows(&policy, &who("unix:group=ops"), *op, &key, Some(&acme)),
                group == Group::Admin,
                "{op:?}"
            );
            assert_eq!(
                allows(&policy, &who("tls:cn=admin-bob"), *op, &Target::Any, None),
                group == Group::Admin,
                "{op:?}"
            );
            assert_eq!(
                allows(&policy, &who("xks:dev"), *op, &key, None),
                group == Group::Xks,
                "{op:?}"
            );
            assert!(
                !allows(&policy, &who("unix:user=nobody"), *op, &key, Some(&acme)),
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
        assert!(allows(
            &policy,
            &payments,
            op,
            &names(&["key/ff", "alias/payments-x"]),
            Some(&acme)
        ));
        assert!(!allows(
            &policy,
            &payments,
            op,
            &names(&["key/ff"]),
            Some(&acme)
        ));
        assert!(!allows(
            &policy,
            &payments,
            op,
            &names(&["alias/other"]),
            Some(&acme)
        ));
        // Required context: present with the value, else denied.
        let key = names(&["alias/payments-x"]);
        assert!(!allows(
            &policy,
            &payments,
            op,
            &key,
            Some(&ctx(&[("tenant", "evil")]))
        ));
        assert!(!allows(&policy, &payments, op, &key, Some(&ctx(&[]))));
        assert!(!allows(&policy, &payments, op, &key, None));
        // Single operations and id globs.
        let reader = who("unix:user=reader");
        assert!(allows(
            &policy,
            &reader,
            Operation::Unwrap,
            &names(&["key/0123ab"]),
            None
        ));
        assert!(!allows(
            &policy,
            &reader,
            Operation::Wrap,
            &names(&["key/0123ab"]),
            None
        ));
        assert!(!allows(
            &policy,
            &reader,
            Operation::Unwrap,
            &names(&["key/9999"]),
            None
        ));
        // "No key in particular" needs a "*" grant.
        assert!(!allows(
            &policy,
            &reader,
            Operation::DescribeKey,
            &Target::Any,
            None
        ));
        assert!(policy.allows_some(&reader, Operation::Unwrap));
        assert!(!policy.allows_some(&reader, Operation::Wrap));
    }

    #[test]
    fn a_grant_with_require_request_matches_only_calls_whose_attributes_match() {
        let policy = Policy::parse(
            r#"
            [[grant]]
            description = "S3 in one account"
            principals = ["xks:dev"]
            operations = ["XksEncrypt", "XksDecrypt"]
            keys = ["key/*"]
            require_request = { kmsViaService = "s3", awsPrincipalArn = "arn:aws:iam::111122223333:*" }
            "#,
        )
        .unwrap();
        let xks = who("xks:dev");
        let key = names(&["key/aa"]);
        let attributes = |entries: &[(&str, &str)]| -> RequestAttributes {
            entries
                .iter()
                .map(|(k, v)| (k.to_string(), v.to_string()))
                .collect()
        };
        let good = attributes(&[
            ("kmsViaService", "s3"),
            ("awsPrincipalArn", "arn:aws:iam::111122223333:role/app"),
        ]);
        assert!(policy.allows(&xks, Operation::XksEncrypt, &key, None, &good));
        let ebs = attributes(&[
            ("kmsViaService", "ebs"),
            ("awsPrincipalArn", "arn:aws:iam::111122223333:role/app"),
        ]);
        assert!(!policy.allows(&xks, Operation::XksEncrypt, &key, None, &ebs));
        let why = policy
            .explain_denial(&xks, Operation::XksEncrypt, &key, None, &ebs)
            .unwrap();
        assert!(
            why.contains("grant 1") && why.contains("kmsViaService"),
            "{why}"
        );
        assert!(
            why.contains("\"ebs\"") && why.contains("S3 in one account"),
            "{why}"
        );
        let other_account = attributes(&[
            ("kmsViaService", "s3"),
            ("awsPrincipalArn", "arn:aws:iam::444455556666:role/app"),
        ]);
        assert!(!policy.allows(&xks, Operation::XksDecrypt, &key, None, &other_account));
        // An absent attribute never matches, and a call without any is refused.
        let absent = attributes(&[("awsPrincipalArn", "arn:aws:iam::111122223333:role/app")]);
        assert!(!policy.allows(&xks, Operation::XksEncrypt, &key, None, &absent));
        assert!(!allows(&policy, &xks, Operation::XksEncrypt, &key, None));
        // No explanation where no grant would have allowed the call.
        assert!(
            policy
                .explain_denial(&xks, Operation::XksGetKeyMetadata, &key, None, &ebs)
                .is_none()
        );
        // "all" is every RPC, never the XKS operations: a broad grant must not hand them to
        // every key store.
        let broad = Policy::parse(
            r#"
            [[grant]]
            principals = ["*"]
            operations = ["all"]
            keys = ["*"]
            "#,
        )
        .unwrap();
        assert!(!allows(&broad, &xks, Operation::XksEncrypt, &key, None));
        assert!(allows(&broad, &xks, Operation::DescribeKey, &key, None));
        // Only the documented attributes may be named.
        let err = Policy::parse(
            r#"
            [[grant]]
            principals = ["xks:dev"]
            operations = ["xks"]
            keys = ["*"]
            require_request = { kmsFoo = "x" }
            "#,
        )
        .unwrap_err();
        assert!(err.to_string().contains("kmsFoo"), "{err}");
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
        assert!(allows(
            &policy,
            &me,
            Operation::ReWrapTo,
            &names(&["key/scratch"]),
            None
        ));
        assert!(!allows(
            &policy,
            &me,
            Operation::ReWrapFrom,
            &names(&["key/other"]),
            None
        ));
        assert!(allows(
            &policy,
            &me,
            Operation::ReWrapFrom,
            &names(&["alias/mine"]),
            None
        ));
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
