//! Key policies: each key's document in the IAM policy language, as AWS KMS keeps and
//! evaluates it.
//!
//! A key policy is evaluated on every call that names its key, from every front end (gRPC,
//! the unix socket, the AWS KMS API), with AWS's logic:
//!
//! 1. a matching `Deny` statement denies, whatever else matches;
//! 2. a matching `Allow` statement that names the caller (its ARN, or `"*"`) allows
//!    ([`Verdict::Allow`]; whether that is enough without a grant of the policy file is the
//!    policy file's `key_policies` setting, applied by the gate);
//! 3. a matching `Allow` statement that names the caller's account (`ACCOUNT` or
//!    `arn:aws:iam::ACCOUNT:root`) hands the decision to wrapd's policy file, which plays the
//!    part IAM plays in AWS ([`Verdict::Delegate`]);
//! 4. anything else is denied.
//!
//! A statement matches when its principal (`Principal`, or everyone but `NotPrincipal`)
//! takes the caller, its actions (`Action`, or all but `NotAction`, globs such as `kms:*`,
//! case-insensitive) take the request's, and every condition holds. `Resource` must be
//! `"*"`, which in a key policy means the key itself. Conditions: `StringEquals`,
//! `StringNotEquals`, `StringEqualsIgnoreCase`, `StringNotEqualsIgnoreCase`, `StringLike`,
//! `StringNotLike`, `ArnEquals`, `ArnLike`, `ArnNotEquals`, `ArnNotLike`, `Bool`, `Null`,
//! `IpAddress` and `NotIpAddress`, each also with `IfExists` and the `ForAnyValue:` /
//! `ForAllValues:` set prefixes, evaluated as AWS's IAM reference says: a negated operator
//! holds when the key is absent, `IfExists` holds when it is absent, `ForAllValues` holds for
//! an absent key, `ForAnyValue` does not. Condition key names are case-insensitive, values
//! are not (but for the `IgnoreCase` operators).
//!
//! The condition keys a request carries are in [`Request::keys`]: `kms:EncryptionContext:K`,
//! `kms:EncryptionContextKeys`, `kms:CallerAccount`, `kms:ViaService`, `aws:SourceIp`,
//! `aws:PrincipalArn`, `aws:PrincipalAccount`.
//!
//! This is a small evaluator of wrapd's own rather than `scratchstack-aspen`, the IAM
//! policy crate by the author of the SigV4 verifier wrapd once used: aspen 0.3 (2023) has no
//! `ForAnyValue`/`ForAllValues` and no multi-valued keys (so `kms:EncryptionContextKeys`
//! cannot be expressed), evaluates negated operators on an absent key as false where AWS
//! says true, and stops at the first matching statement, so a `Deny` after an `Allow` in the
//! same policy would not count.

use std::collections::BTreeMap;
use std::net::IpAddr;

use serde_json::Value;

/// The one policy name a key has (`GetKeyPolicy`'s `PolicyName`).
pub const POLICY_NAME: &str = "default";

/// The largest policy document, in bytes (AWS KMS's quota).
pub const MAX_POLICY_BYTES: usize = 32_768;

/// The longest action, principal or condition value, in characters: a glob is matched in
/// time proportional to its length times the text's, so this bounds what one hostile
/// document can cost each call on its key.
pub const MAX_VALUE_CHARS: usize = 2048;

/// The condition keys a request may carry (besides `kms:EncryptionContext:KEY`), in
/// lowercase: a policy naming another is refused, since a key no request has would make its
/// condition silently false.
pub const CONDITION_KEYS: &[&str] = &[
    "kms:encryptioncontextkeys",
    "kms:calleraccount",
    "kms:viaservice",
    "kms:grantisforawsresource",
    "aws:sourceip",
    "aws:principalarn",
    "aws:principalaccount",
];

/// A key policy, parsed.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct KeyPolicy {
    statements: Vec<Statement>,
}

/// What a key policy says about a request.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Verdict {
    /// A `Deny` statement matched.
    Deny,
    /// An `Allow` statement naming the caller matched.
    Allow,
    /// Only `Allow` statements naming the caller's account matched: the policy file decides.
    Delegate,
    /// Nothing matched: denied.
    NoMatch,
}

/// A request, as a key policy sees it.
#[derive(Debug, Clone)]
pub struct Request<'a> {
    /// The action, e.g. `kms:Decrypt`.
    pub action: &'a str,
    /// The caller's ARN.
    pub principal_arn: &'a str,
    /// The caller's account.
    pub account: &'a str,
    /// Condition keys (names in lowercase) and their values.
    pub keys: &'a BTreeMap<String, Vec<String>>,
}

#[derive(Debug, Clone, PartialEq, Eq)]
struct Statement {
    deny: bool,
    /// `Principal` (false) or `NotPrincipal` (true).
    not_principal: bool,
    principals: Vec<PrincipalName>,
    /// `Action` (false) or `NotAction` (true).
    not_action: bool,
    actions: Vec<String>,
    conditions: Vec<Condition>,
}

#[derive(Debug, Clone, PartialEq, Eq)]
enum PrincipalName {
    /// `"*"`: everyone.
    Anyone,
    /// An account: its id (`ACCOUNT` or `arn:aws:iam::ACCOUNT:root`).
    Account(String),
    /// One principal's ARN.
    Arn(String),
    /// A principal wrapd never has (a `Service` or `Federated` one).
    Other,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Operator {
    StringEquals,
    StringEqualsIgnoreCase,
    StringLike,
    Bool,
    IpAddress,
    Null,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum SetOperator {
    ForAnyValue,
    ForAllValues,
}

#[derive(Debug, Clone, PartialEq, Eq)]
struct Condition {
    operator: Operator,
    negated: bool,
    if_exists: bool,
    set: Option<SetOperator>,
    /// The condition key, in lowercase.
    key: String,
    values: Vec<String>,
}

impl KeyPolicy {
    /// Parses a policy document. The error is the message of AWS's
    /// `MalformedPolicyDocumentException`.
    pub fn parse(text: &str) -> Result<Self, String> {
        if text.len() > MAX_POLICY_BYTES {
            return Err(format!(
                "The key policy is larger than {MAX_POLICY_BYTES} bytes"
            ));
        }
        let document: Value =
            serde_json::from_str(text).map_err(|e| format!("The key policy is not JSON: {e}"))?;
        let Value::Object(document) = document else {
            return Err("The key policy must be a JSON object".into());
        };
        let mut statements = None;
        for (name, value) in &document {
            match name.as_str() {
                "Version" => match value.as_str() {
                    Some("2012-10-17" | "2008-10-17") => {}
                    _ => return Err("Version must be \"2012-10-17\" or \"2008-10-17\"".into()),
                },
                "Id" => {
                    value
                        .as_str()
                        .ok_or_else(|| "Id must be a string".to_owned())?;
                }
                "Statement" => {
                    let list = match value {
                        Value::Array(list) => list.iter().collect::<Vec<_>>(),
                        one @ Value::Object(_) => vec![one],
                        _ => return Err("Statement must be an object or an array".into()),
                    };
                    statements = Some(
                        list.into_iter()
                            .map(Statement::parse)
                            .collect::<Result<Vec<_>, _>>()?,
                    );
                }
                other => return Err(format!("Unknown policy element {}", cut(other))),
            }
        }
        let statements = statements.ok_or_else(|| "The key policy has no Statement".to_owned())?;
        if statements.is_empty() {
            return Err("The key policy has no Statement".into());
        }
        Ok(Self { statements })
    }

    /// AWS KMS's default key policy for a key of `account`: the account (and so wrapd's
    /// policy file, as IAM) may do everything with the key.
    pub fn default_document(account: &str) -> String {
        serde_json::json!({
            "Version": "2012-10-17",
            "Id": "key-default-1",
            "Statement": [{
                "Sid": "Enable IAM User Permissions",
                "Effect": "Allow",
                "Principal": { "AWS": format!("arn:aws:iam::{account}:root") },
                "Action": "kms:*",
                "Resource": "*",
            }],
        })
        .to_string()
    }

    /// A policy that denies every call (for a stored document that does not parse).
    pub fn deny_all() -> Self {
        Self {
            statements: vec![Statement {
                deny: true,
                not_principal: false,
                principals: vec![PrincipalName::Anyone],
                not_action: false,
                actions: vec!["*".into()],
                conditions: Vec::new(),
            }],
        }
    }

    /// What the policy says about `request`.
    pub fn evaluate(&self, request: &Request<'_>) -> Verdict {
        let mut verdict = Verdict::NoMatch;
        for statement in &self.statements {
            let Some(direct) = statement.principal_match(request) else {
                continue;
            };
            if !statement.action_matches(request.action) || !statement.conditions_hold(request) {
                continue;
            }
            if statement.deny {
                return Verdict::Deny;
            }
            verdict = match (verdict, direct) {
                (Verdict::Allow, _) | (_, true) => Verdict::Allow,
                _ => Verdict::Delegate,
            };
        }
        verdict
    }
}

impl Statement {
    fn parse(value: &Value) -> Result<Self, String> {
        let Value::Object(fields) = value else {
            return Err("A Statement must be an object".into());
        };
        let mut deny = None;
        let mut principal = None;
        let mut action = None;
        let mut resource = false;
        let mut conditions = Vec::new();
        for (name, value) in fields {
            match name.as_str() {
                "Sid" => {
                    value
                        .as_str()
                        .ok_or_else(|| "Sid must be a string".to_owned())?;
                }
                "Effect" => {
                    deny = Some(match value.as_str() {
                        Some("Allow") => false,
                        Some("Deny") => true,
                        _ => return Err("Effect must be \"Allow\" or \"Deny\"".into()),
                    })
                }
                "Principal" | "NotPrincipal" => {
                    if principal.is_some() {
                        return Err("A Statement has one Principal or NotPrincipal".into());
                    }
                    principal = Some((name == "NotPrincipal", parse_principals(value)?));
                }
                "Action" | "NotAction" => {
                    if action.is_some() {
                        return Err("A Statement has one Action or NotAction".into());
                    }
                    let actions = strings(value, name)?;
                    if actions.is_empty() {
                        return Err(format!("{name} must not be empty"));
                    }
                    action = Some((name == "NotAction", actions));
                }
                "Resource" => {
                    // In a key policy the resource is the key itself, written "*"; a
                    // statement naming anything else would mean something else on AWS.
                    if strings(value, name)?.iter().any(|r| r != "*") {
                        return Err(
                            "In a key policy, Resource must be \"*\" (the key itself)".into()
                        );
                    }
                    resource = true;
                }
                "NotResource" => {
                    return Err(
                        "NotResource is not supported in a key policy: Resource is \"*\"".into(),
                    );
                }
                "Condition" => conditions = parse_conditions(value)?,
                other => return Err(format!("Unknown statement element {}", cut(other))),
            }
        }
        let deny = deny.ok_or_else(|| "A Statement needs an Effect".to_owned())?;
        let (not_principal, principals) =
            principal.ok_or_else(|| "A key policy Statement needs a Principal".to_owned())?;
        let (not_action, actions) =
            action.ok_or_else(|| "A Statement needs an Action".to_owned())?;
        if !resource {
            return Err("A Statement needs a Resource".into());
        }
        Ok(Self {
            deny,
            not_principal,
            principals,
            not_action,
            actions,
            conditions,
        })
    }

    /// Whether the statement takes the caller: `Some(true)` by its ARN or `"*"`,
    /// `Some(false)` only through its account, `None` not at all.
    fn principal_match(&self, request: &Request<'_>) -> Option<bool> {
        let mut by_account = false;
        let mut direct = false;
        for name in &self.principals {
            match name {
                PrincipalName::Anyone => direct = true,
                PrincipalName::Arn(arn) if arn == request.principal_arn => direct = true,
                PrincipalName::Account(account) if account == request.account => by_account = true,
                _ => {}
            }
        }
        if self.not_principal {
            // Everyone but those named: taking the caller is taking it by name.
            return (!direct && !by_account).then_some(true);
        }
        if direct {
            Some(true)
        } else if by_account {
            Some(false)
        } else {
            None
        }
    }

    fn action_matches(&self, action: &str) -> bool {
        let listed = self
            .actions
            .iter()
            .any(|pattern| glob(&pattern.to_ascii_lowercase(), &action.to_ascii_lowercase()));
        listed != self.not_action
    }

    fn conditions_hold(&self, request: &Request<'_>) -> bool {
        self.conditions
            .iter()
            .all(|c| c.holds(request.keys, self.deny))
    }
}

fn parse_principals(value: &Value) -> Result<Vec<PrincipalName>, String> {
    match value {
        Value::String(s) if s == "*" => Ok(vec![PrincipalName::Anyone]),
        Value::Object(kinds) => {
            let mut names = Vec::new();
            for (kind, value) in kinds {
                for name in strings(value, "Principal")? {
                    names.push(match kind.as_str() {
                        "AWS" => aws_principal(&name)?,
                        "Service" | "Federated" | "CanonicalUser" => PrincipalName::Other,
                        other => return Err(format!("Unknown principal type {}", cut(other))),
                    });
                }
            }
            if names.is_empty() {
                return Err("Principal must not be empty".into());
            }
            Ok(names)
        }
        _ => Err("Principal must be \"*\" or an object".into()),
    }
}

fn aws_principal(name: &str) -> Result<PrincipalName, String> {
    if name == "*" {
        return Ok(PrincipalName::Anyone);
    }
    if name.len() == 12 && name.bytes().all(|b| b.is_ascii_digit()) {
        return Ok(PrincipalName::Account(name.to_owned()));
    }
    if let Some(rest) = name.strip_prefix("arn:")
        && let [_partition, "iam", "", account, resource] =
            rest.splitn(5, ':').collect::<Vec<_>>().as_slice()
    {
        if *resource == "root" {
            return Ok(PrincipalName::Account((*account).to_owned()));
        }
        return Ok(PrincipalName::Arn(name.to_owned()));
    }
    Err(format!(
        "Policy contains a statement with one or more invalid principals: {}",
        cut(name)
    ))
}

fn parse_conditions(value: &Value) -> Result<Vec<Condition>, String> {
    let Value::Object(blocks) = value else {
        return Err("Condition must be an object".into());
    };
    let mut conditions = Vec::new();
    for (name, keys) in blocks {
        let (set, rest) = if let Some(rest) = name.strip_prefix("ForAnyValue:") {
            (Some(SetOperator::ForAnyValue), rest)
        } else if let Some(rest) = name.strip_prefix("ForAllValues:") {
            (Some(SetOperator::ForAllValues), rest)
        } else {
            (None, name.as_str())
        };
        let (rest, if_exists) = match rest.strip_suffix("IfExists") {
            Some(rest) => (rest, true),
            None => (rest, false),
        };
        let (operator, negated) = match rest {
            "StringEquals" => (Operator::StringEquals, false),
            "StringNotEquals" => (Operator::StringEquals, true),
            "StringEqualsIgnoreCase" => (Operator::StringEqualsIgnoreCase, false),
            "StringNotEqualsIgnoreCase" => (Operator::StringEqualsIgnoreCase, true),
            "StringLike" | "ArnLike" => (Operator::StringLike, false),
            "StringNotLike" | "ArnNotLike" => (Operator::StringLike, true),
            // ARNs compare with wildcards, whichever of the two.
            "ArnEquals" => (Operator::StringLike, false),
            "ArnNotEquals" => (Operator::StringLike, true),
            "Bool" => (Operator::Bool, false),
            "IpAddress" => (Operator::IpAddress, false),
            "NotIpAddress" => (Operator::IpAddress, true),
            "Null" if !if_exists => (Operator::Null, false),
            _ => {
                return Err(format!(
                    "Policy contains an unsupported condition operator {}",
                    cut(name)
                ));
            }
        };
        let Value::Object(keys) = keys else {
            return Err(format!("The {} condition must be an object", cut(name)));
        };
        for (key, values) in keys {
            let lower = key.to_ascii_lowercase();
            if !CONDITION_KEYS.contains(&lower.as_str())
                && !lower.starts_with("kms:encryptioncontext:")
            {
                return Err(format!(
                    "Policy contains an unsupported condition key {}: wrapd has {} and kms:EncryptionContext:KEY",
                    cut(key),
                    CONDITION_KEYS.join(", ")
                ));
            }
            let values = strings(values, key)?;
            if operator == Operator::IpAddress
                && let Some(bad) = values.iter().find(|v| parse_cidr(v).is_none())
            {
                return Err(format!("{} is not an IP address or range", cut(bad)));
            }
            conditions.push(Condition {
                operator,
                negated,
                if_exists,
                set,
                key: key.to_ascii_lowercase(),
                values,
            });
        }
    }
    Ok(conditions)
}

/// The prefix of the condition keys of an encryption context's entries (lower case).
const CONTEXT_ENTRY_KEY: &str = "kms:encryptioncontext:";

impl Condition {
    /// Whether the condition holds for the request's `keys`, in a statement that denies
    /// (`deny`) or allows.
    fn holds(&self, keys: &BTreeMap<String, Vec<String>>, deny: bool) -> bool {
        let present = keys.get(&self.key).filter(|values| !values.is_empty());
        if self.operator == Operator::Null {
            // "true": the key must be absent; "false": present.
            let want_absent = self.values.iter().any(|v| v.eq_ignore_ascii_case("true"));
            return want_absent == present.is_none();
        }
        let Some(request_values) = present else {
            return match self.set {
                Some(SetOperator::ForAllValues) => true,
                Some(SetOperator::ForAnyValue) => false,
                None => self.if_exists || self.negated,
            };
        };
        // Whether one request value matches one of the policy's values (before negation).
        let matches = |value: &str| self.values.iter().any(|want| self.compare(want, value));
        match self.set {
            // At least one request value satisfies the (possibly negated) operator.
            Some(SetOperator::ForAnyValue) => {
                request_values.iter().any(|v| matches(v) != self.negated)
            }
            // Every request value satisfies it.
            Some(SetOperator::ForAllValues) => {
                request_values.iter().all(|v| matches(v) != self.negated)
            }
            // An encryption context's entry has one value, unless its key was given twice in
            // different cases (`tenant` and `Tenant`: condition key names ignore case). Then
            // each value must satisfy an allowing statement's condition, and any one satisfies
            // a denying one's, so that neither entry can hide the other: a caller adding
            // `Tenant: globex` beside `tenant: acme` is allowed only what `globex` would be,
            // and cannot step out of a deny aimed at it.
            None if self.key.starts_with(CONTEXT_ENTRY_KEY) => {
                if deny {
                    request_values.iter().any(|v| matches(v) != self.negated)
                } else {
                    request_values.iter().all(|v| matches(v) != self.negated)
                }
            }
            // Any other key without a set operator: one matching value is a match (a
            // negated operator holds when none matches), as for a multivalued key such as
            // `kms:EncryptionContextKeys` written without `ForAnyValue`.
            None => request_values.iter().any(|v| matches(v)) != self.negated,
        }
    }

    fn compare(&self, want: &str, value: &str) -> bool {
        match self.operator {
            Operator::StringEquals => want == value,
            Operator::StringEqualsIgnoreCase => want.eq_ignore_ascii_case(value),
            Operator::StringLike => glob(want, value),
            Operator::Bool => want.eq_ignore_ascii_case(value),
            Operator::IpAddress => match (parse_cidr(want), value.parse::<IpAddr>()) {
                (Some(net), Ok(ip)) => net.contains(&ip),
                _ => false,
            },
            Operator::Null => false,
        }
    }
}

fn parse_cidr(text: &str) -> Option<ipnet::IpNet> {
    text.parse::<ipnet::IpNet>()
        .ok()
        .or_else(|| text.parse::<IpAddr>().ok().map(ipnet::IpNet::from))
}

/// A string or a list of strings (booleans and numbers as their JSON text, as AWS takes
/// them in conditions).
fn strings(value: &Value, element: &str) -> Result<Vec<String>, String> {
    let one = |v: &Value| match v {
        Value::String(s) => Ok(s.clone()),
        Value::Bool(b) => Ok(b.to_string()),
        Value::Number(n) => Ok(n.to_string()),
        _ => Err(format!(
            "{} must be a string or a list of strings",
            cut(element)
        )),
    };
    let values = match value {
        Value::Array(list) => list.iter().map(one).collect::<Result<Vec<_>, _>>()?,
        other => vec![one(other)?],
    };
    if values.iter().any(|v| v.chars().count() > MAX_VALUE_CHARS) {
        return Err(format!(
            "A value of {} is longer than {MAX_VALUE_CHARS} characters",
            cut(element)
        ));
    }
    Ok(values)
}

/// `*` (any run) and `?` (any one character) over `text`.
fn glob(pattern: &str, text: &str) -> bool {
    let (p, t): (Vec<char>, Vec<char>) = (pattern.chars().collect(), text.chars().collect());
    let (mut pi, mut ti) = (0, 0);
    let mut backtrack: Option<(usize, usize)> = None;
    while ti < t.len() {
        // A `*` of the pattern is a wildcard even where the text has a `*` too.
        if pi < p.len() && p[pi] == '*' {
            backtrack = Some((pi, ti));
            pi += 1;
        } else if pi < p.len() && (p[pi] == '?' || p[pi] == t[ti]) {
            pi += 1;
            ti += 1;
        } else if let Some((star, matched)) = backtrack {
            pi = star + 1;
            ti = matched + 1;
            backtrack = Some((star, matched + 1));
        } else {
            return false;
        }
    }
    p[pi..].iter().all(|c| *c == '*')
}

/// A caller's string, cut for an error message.
fn cut(s: &str) -> String {
    s.chars().take(128).collect()
}

#[cfg(test)]
mod tests;
