//! Rewriting a policy file written for an earlier release into today's form, so that an
//! upgrade never needs a hand edit of a file wrapd understood before.
//!
//! Each rename a release made is rewritten here, keeping everything else of the file (its
//! comments, order and layout): only the changed string literals are replaced.
//!
//! - Certificate principals became namespaced: `spiffe://…` (any URI) is `tls:uri=…`,
//!   `dns:NAME` is `tls:dns=NAME`, `cn:NAME` is `tls:cn=NAME`.
//! - `ReWrap` was split: it is `ReWrapFrom` and `ReWrapTo` (the old permission was checked
//!   on both ends, so granting both keeps its meaning).
//! - `TagResource` / `UntagResource` are `TagKey` / `UntagKey`.
//!
//! `wrapd dev` applies this to the policy it generated; `wrapd config migrate` shows (and
//! with `--write` applies) it for a hand-written one.

use serde::Deserialize;
use toml::Spanned;

use crate::error::{Error, Result};

/// One rewrite: where, what was there, what is now, and why.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PolicyChange {
    /// The line (1-based) of the old text.
    pub line: usize,
    /// The old literal, as written.
    pub old: String,
    /// Its replacement, as written.
    pub new: String,
    /// Why.
    pub why: &'static str,
}

#[derive(Deserialize)]
struct SpannedPolicy {
    #[serde(default, rename = "grant")]
    grants: Vec<SpannedGrant>,
}

#[derive(Deserialize)]
struct SpannedGrant {
    #[serde(default)]
    principals: Vec<Spanned<String>>,
    #[serde(default)]
    operations: Vec<Spanned<String>>,
}

/// The namespaced form of a principal pattern written before namespaces, if it is one.
pub(super) fn namespaced(pattern: &str) -> Option<String> {
    if pattern.contains("://") && !pattern.starts_with("tls:") {
        Some(format!("tls:uri={pattern}"))
    } else if let Some(name) = pattern.strip_prefix("dns:") {
        Some(format!("tls:dns={name}"))
    } else {
        pattern
            .strip_prefix("cn:")
            .map(|name| format!("tls:cn={name}"))
    }
}

/// A TOML basic string of `value`.
fn quoted(value: &str) -> String {
    toml::Value::String(value.to_owned()).to_string()
}

/// `text` with every rename rewritten, and what changed (nothing: the text unchanged). The
/// result is not checked beyond these renames: [`super::Policy::parse`] says what else is
/// wrong.
pub fn migrate_policy_text(text: &str) -> Result<(String, Vec<PolicyChange>)> {
    let policy: SpannedPolicy = toml::from_str(text)
        .map_err(|e| Error::Config(format!("policy: {}", e.message().replace('\n', " "))))?;
    let mut edits: Vec<(std::ops::Range<usize>, String, &'static str)> = Vec::new();
    for grant in &policy.grants {
        for principal in &grant.principals {
            let pattern = principal.get_ref();
            if in_a_namespace(pattern) {
                continue;
            }
            if let Some(new) = namespaced(pattern) {
                edits.push((
                    principal.span(),
                    quoted(&new),
                    "certificate principals are namespaced (tls:uri=, tls:dns=, tls:cn=)",
                ));
            }
        }
        for operation in &grant.operations {
            let (new, why) = match operation.get_ref().as_str() {
                "ReWrap" => (
                    format!("{}, {}", quoted("ReWrapFrom"), quoted("ReWrapTo")),
                    "ReWrap is split into ReWrapFrom (source key) and ReWrapTo (destination key)",
                ),
                "TagResource" => (quoted("TagKey"), "the policy operation is TagKey"),
                "UntagResource" => (quoted("UntagKey"), "the policy operation is UntagKey"),
                _ => continue,
            };
            edits.push((operation.span(), new, why));
        }
    }
    edits.sort_by_key(|(span, _, _)| std::cmp::Reverse(span.start));
    let mut migrated = text.to_owned();
    let mut changes = Vec::new();
    for (span, new, why) in edits {
        let old = text[span.clone()].to_owned();
        migrated.replace_range(span.clone(), &new);
        changes.push(PolicyChange {
            line: text[..span.start].matches('\n').count() + 1,
            old,
            new,
            why,
        });
    }
    changes.reverse();
    Ok((migrated, changes))
}

/// Whether a principal pattern is already in a namespace.
fn in_a_namespace(pattern: &str) -> bool {
    super::policy::PRINCIPAL_NAMESPACES
        .iter()
        .any(|ns| pattern.starts_with(ns))
}

/// A unified diff (no context lines) of `old` to `new` for `path`, as `patch` takes it;
/// empty when they are equal. Changes here never add or remove lines.
pub fn line_diff(path: &str, old: &str, new: &str) -> String {
    use std::fmt::Write;
    let mut out = String::new();
    for (i, (a, b)) in old.lines().zip(new.lines()).enumerate() {
        if a != b {
            if out.is_empty() {
                let _ = writeln!(out, "--- a/{path}\n+++ b/{path}");
            }
            let _ = writeln!(out, "@@ -{0},1 +{0},1 @@\n-{a}\n+{b}", i + 1);
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    const OLD: &str = r#"# A policy of an earlier release.
[[grant]]
principals = ["unix:uid=0", "spiffe://example.org/app"] # the app
operations = ["all"]
keys = ["*"]

[[grant]]
principals = ["dns:worker.example.org", "cn:batch"]
operations = ["Unwrap", "ReWrap", "TagResource"]
keys = ["alias/app"]
"#;

    #[test]
    fn an_earlier_releases_policy_is_rewritten_and_then_parses() {
        assert!(super::super::Policy::parse(OLD).is_err());
        let (new, changes) = migrate_policy_text(OLD).unwrap();
        assert_eq!(changes.len(), 5, "{changes:#?}");
        assert!(new.contains(
            r#"principals = ["unix:uid=0", "tls:uri=spiffe://example.org/app"] # the app"#
        ));
        assert!(new.contains(r#"["tls:dns=worker.example.org", "tls:cn=batch"]"#));
        assert!(new.contains(r#"["Unwrap", "ReWrapFrom", "ReWrapTo", "TagKey"]"#));
        assert!(new.starts_with("# A policy of an earlier release.\n"));
        super::super::Policy::parse(&new).unwrap();
        // Once migrated, nothing more to do.
        assert_eq!(migrate_policy_text(&new).unwrap(), (new.clone(), vec![]));
        let diff = line_diff("policy.toml", OLD, &new);
        assert!(diff.contains("@@ -3,1 +3,1 @@"), "{diff}");
    }
}
