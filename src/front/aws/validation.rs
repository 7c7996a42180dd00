//! Requests checked against AWS KMS's own service model, as AWS KMS checks them: the same
//! constraint gives the same error type (`ValidationException`) and a message in AWS's
//! wording ("1 validation error detected: Value 'AES_512' at 'keySpec' failed to satisfy
//! constraint: Member must satisfy enum value set: [...]"), so that scripts and SDK error
//! handling written against AWS KMS behave the same here.
//!
//! The model is botocore's `service-2.json`, cut to the input shapes of the operations wrapd
//! answers (`proto/aws-kms/`, with the script that cut it): required members, lengths of
//! strings, blobs, lists and maps, integer ranges, patterns and enumerations. What the model
//! cannot say (that a key spec wrapd does not offer is refused, that a window is 7 to 30
//! days) is checked afterwards by `request.rs`. A body that is not a JSON object, a member
//! of the wrong JSON type and an unknown member are left to the request's own decoding,
//! which refuses them.

use std::collections::HashMap;
use std::sync::LazyLock;

use base64::Engine;
use base64::engine::general_purpose::STANDARD;
use regex::Regex;
use serde::Deserialize;
use serde_json::Value;

use super::arn::truncate;
use super::error::AwsError;

/// The cut model (see the module docs).
const MODEL_JSON: &str = include_str!("../../../proto/aws-kms/service-2.json");

/// Most violations one message lists (AWS KMS's messages list each; a bound keeps a hostile
/// request's answer short).
pub const MAX_LISTED: usize = 10;

#[derive(Deserialize)]
struct RawModel {
    operations: HashMap<String, RawOperation>,
    shapes: HashMap<String, RawShape>,
}

#[derive(Deserialize)]
struct RawOperation {
    input: String,
}

#[derive(Deserialize)]
struct RawShape {
    #[serde(rename = "type")]
    kind: String,
    #[serde(default)]
    required: Vec<String>,
    min: Option<i64>,
    max: Option<i64>,
    pattern: Option<String>,
    #[serde(rename = "enum")]
    values: Option<Vec<String>>,
    #[serde(default)]
    sensitive: bool,
    #[serde(default)]
    members: HashMap<String, RawRef>,
    member: Option<RawRef>,
    key: Option<RawRef>,
    value: Option<RawRef>,
}

#[derive(Deserialize)]
struct RawRef {
    shape: String,
}

/// One shape of the model, with its pattern compiled.
struct Shape {
    kind: Kind,
    required: Vec<String>,
    min: Option<i64>,
    max: Option<i64>,
    pattern: Option<(String, Regex)>,
    values: Option<Vec<String>>,
    sensitive: bool,
}

enum Kind {
    Structure(HashMap<String, String>),
    List(String),
    Map(String, String),
    String,
    Blob,
    Integer,
    Other,
}

struct Model {
    operations: HashMap<String, String>,
    shapes: HashMap<String, Shape>,
}

/// A model pattern (Java's syntax, matched against the whole value) as a Rust regex: `\w`
/// is ASCII in Java, `\s` Java's six spaces.
fn regex_of(pattern: &str) -> Option<Regex> {
    let translated = pattern
        .replace("\\w", "0-9A-Za-z_")
        .replace("\\s", " \\t\\n\\x0B\\x0C\\r")
        // A `-` after a range is a literal in Java's classes.
        .replace("9-_", "9\\-_");
    Regex::new(&format!("^(?:{translated})$")).ok()
}

static MODEL: LazyLock<Model> = LazyLock::new(|| {
    // The file is part of the source: a model that does not parse is a build defect, caught
    // by this module's tests; an empty model then checks nothing.
    let raw: RawModel = serde_json::from_str(MODEL_JSON).unwrap_or(RawModel {
        operations: HashMap::new(),
        shapes: HashMap::new(),
    });
    let shapes = raw
        .shapes
        .into_iter()
        .map(|(name, shape)| {
            let kind = match shape.kind.as_str() {
                "structure" => Kind::Structure(
                    shape
                        .members
                        .into_iter()
                        .map(|(member, r)| (member, r.shape))
                        .collect(),
                ),
                "list" => Kind::List(shape.member.map(|r| r.shape).unwrap_or_default()),
                "map" => Kind::Map(
                    shape.key.map(|r| r.shape).unwrap_or_default(),
                    shape.value.map(|r| r.shape).unwrap_or_default(),
                ),
                "string" => Kind::String,
                "blob" => Kind::Blob,
                "integer" | "long" => Kind::Integer,
                _ => Kind::Other,
            };
            let pattern = shape
                .pattern
                .and_then(|p| regex_of(&p).map(|regex| (p, regex)));
            let checked = Shape {
                kind,
                required: shape.required,
                min: shape.min,
                max: shape.max,
                pattern,
                values: shape.values,
                sensitive: shape.sensitive,
            };
            (name, checked)
        })
        .collect();
    Model {
        operations: raw
            .operations
            .into_iter()
            .map(|(name, op)| (name, op.input))
            .collect(),
        shapes,
    }
});

/// Checks the body of a request to `operation` against the model; `ValidationException`
/// with every violation (up to [`MAX_LISTED`]) in AWS's wording.
pub fn check(operation: &str, body: &[u8]) -> Result<(), AwsError> {
    let model = &*MODEL;
    let Some(input) = model.operations.get(operation) else {
        return Ok(());
    };
    let Ok(value) = serde_json::from_slice::<Value>(body) else {
        return Ok(());
    };
    let mut found = Found::default();
    walk(model, input, &value, "", &mut found);
    if found.count == 0 {
        return Ok(());
    }
    Err(AwsError::validation(format!(
        "{} validation error{} detected: {}",
        found.count,
        if found.count == 1 { "" } else { "s" },
        found.listed.join("; ")
    )))
}

/// The violations found: all counted, the first [`MAX_LISTED`] worded (a hostile body of
/// many bad items costs a count, not a message each).
#[derive(Default)]
struct Found {
    count: usize,
    listed: Vec<String>,
}

impl Found {
    /// Counts a violation; words it (`message` is called) only while the list has room.
    fn push(&mut self, message: impl FnOnce() -> String) {
        self.count += 1;
        if self.listed.len() < MAX_LISTED {
            self.listed.push(message());
        }
    }
}

/// A member name as AWS's messages write it: `KeyId` is `keyId`.
fn member_path(parent: &str, member: &str) -> String {
    let mut chars = member.chars();
    let camel = match chars.next() {
        Some(first) => first.to_ascii_lowercase().to_string() + chars.as_str(),
        None => String::new(),
    };
    if parent.is_empty() {
        camel
    } else {
        format!("{parent}.{camel}")
    }
}

fn walk(model: &Model, shape_name: &str, value: &Value, path: &str, found: &mut Found) {
    let Some(shape) = model.shapes.get(shape_name) else {
        return;
    };
    if value.is_null() {
        return;
    }
    // A value is shown only where it cannot be a secret or a credential: strings and
    // numbers the model does not mark sensitive (never blobs, nor lists such as grant
    // tokens).
    let shown = |value: &Value| -> String {
        match value {
            _ if shape.sensitive => format!("Value at '{path}'"),
            Value::String(s) if !matches!(shape.kind, Kind::Blob) => {
                format!("Value '{}' at '{path}'", truncate(s))
            }
            Value::Number(n) => format!("Value '{n}' at '{path}'"),
            _ => format!("Value at '{path}'"),
        }
    };
    let mut violate = |constraint: String| {
        found.push(|| {
            format!(
                "{} failed to satisfy constraint: {constraint}",
                shown(value)
            )
        });
    };
    match (&shape.kind, value) {
        (Kind::Structure(members), Value::Object(object)) => {
            for required in &shape.required {
                if object.get(required).is_none_or(Value::is_null) {
                    found.push(|| {
                        format!(
                            "Value null at '{}' failed to satisfy constraint: Member must not be null",
                            member_path(path, required)
                        )
                    });
                }
            }
            let mut names: Vec<&String> = object.keys().collect();
            names.sort();
            for name in names {
                if let Some(member_shape) = members.get(name) {
                    walk(
                        model,
                        member_shape,
                        &object[name],
                        &member_path(path, name),
                        found,
                    );
                }
            }
        }
        (Kind::List(member), Value::Array(items)) => {
            length(shape, items.len(), &mut violate);
            for (i, item) in items.iter().enumerate() {
                walk(
                    model,
                    member,
                    item,
                    &format!("{path}.{}.member", i + 1),
                    found,
                );
            }
        }
        (Kind::Map(key, entry), Value::Object(object)) => {
            length(shape, object.len(), &mut violate);
            for (k, v) in object {
                walk(model, key, &Value::String(k.clone()), path, found);
                walk(model, entry, v, path, found);
            }
        }
        (Kind::String, Value::String(text)) => {
            length(shape, text.chars().count(), &mut violate);
            if let Some((pattern, regex)) = &shape.pattern
                && !regex.is_match(text)
            {
                violate(format!(
                    "Member must satisfy regular expression pattern: {pattern}"
                ));
            }
            if let Some(values) = &shape.values
                && !values.iter().any(|v| v == text)
            {
                violate(format!(
                    "Member must satisfy enum value set: [{}]",
                    values.join(", ")
                ));
            }
        }
        (Kind::Blob, Value::String(encoded)) => {
            // A blob's length is its decoded length; one that is not base64 is refused
            // when the request is decoded.
            if let Ok(bytes) = STANDARD.decode(encoded) {
                length(shape, bytes.len(), &mut violate);
            }
        }
        (Kind::Integer, Value::Number(number)) => {
            if let Some(n) = number.as_i64() {
                if let Some(min) = shape.min
                    && n < min
                {
                    violate(format!(
                        "Member must have value greater than or equal to {min}"
                    ));
                }
                if let Some(max) = shape.max
                    && n > max
                {
                    violate(format!(
                        "Member must have value less than or equal to {max}"
                    ));
                }
            }
        }
        _ => {}
    }
}

/// The length constraints of a string, blob, list or map.
fn length(shape: &Shape, len: usize, violate: &mut impl FnMut(String)) {
    let len = i64::try_from(len).unwrap_or(i64::MAX);
    if let Some(min) = shape.min
        && len < min
    {
        violate(format!(
            "Member must have length greater than or equal to {min}"
        ));
    }
    if let Some(max) = shape.max
        && len > max
    {
        violate(format!(
            "Member must have length less than or equal to {max}"
        ));
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_model_parses_and_every_pattern_compiles() {
        let raw: RawModel = serde_json::from_str(MODEL_JSON).expect("the cut model parses");
        assert!(raw.operations.len() >= 37, "{}", raw.operations.len());
        for (name, shape) in &raw.shapes {
            if let Some(pattern) = &shape.pattern {
                assert!(regex_of(pattern).is_some(), "{name}: {pattern}");
            }
        }
        assert_eq!(MODEL.operations.len(), raw.operations.len());
    }

    #[test]
    fn a_value_outside_an_enumeration_is_worded_as_aws_words_it() {
        let err = check("CreateKey", br#"{"KeySpec":"AES_512"}"#).unwrap_err();
        assert_eq!(err.code, "ValidationException");
        assert!(
            err.message.starts_with(
                "1 validation error detected: Value 'AES_512' at 'keySpec' failed to satisfy constraint: Member must satisfy enum value set: ["
            ),
            "{}",
            err.message
        );
    }

    #[test]
    fn each_violation_is_listed_with_its_member_path() {
        let body = br#"{"KeyId":"","Plaintext":"","GrantTokens":["a","b","c","d","e","f","g","h","i","j","k"]}"#;
        let err = check("Encrypt", body).unwrap_err();
        assert!(
            err.message.starts_with("3 validation errors detected: "),
            "{}",
            err.message
        );
        assert!(err.message.contains(
            "Value at 'plaintext' failed to satisfy constraint: Member must have length greater than or equal to 1"
        ), "the plaintext is never shown: {}", err.message);
        assert!(err.message.contains("Value at 'grantTokens' failed to satisfy constraint: Member must have length less than or equal to 10"), "the tokens are never shown: {}", err.message);
        assert!(
            err.message.contains("Value '' at 'keyId'"),
            "{}",
            err.message
        );
    }

    #[test]
    fn a_body_of_many_bad_items_is_counted_and_only_the_first_are_worded() {
        let items = vec!["{}"; 5000].join(",");
        let body = format!(r#"{{"KeyId":"k","Tags":[{items}]}}"#);
        let err = check("TagResource", body.as_bytes()).unwrap_err();
        assert!(
            err.message
                .starts_with("10000 validation errors detected: "),
            "{}",
            &err.message[..80]
        );
        assert_eq!(
            err.message.matches("failed to satisfy constraint").count(),
            MAX_LISTED
        );
    }

    #[test]
    fn the_models_patterns_accept_and_refuse_what_aws_does() {
        let cases = [
            ("AliasNameType", "alias/app-1_x", "alias/a b"),
            ("PolicyNameType", "default", "de-fault"),
            ("MarkerType", "abc 123", "\u{100}"),
            (
                "PrincipalIdType",
                "arn:aws:iam::111122223333:role/a+b=c,d.e@f",
                "a b",
            ),
            ("GrantNameType", "my-grant:1/x_y", "a b"),
        ];
        for (shape, good, bad) in cases {
            let Some((pattern, regex)) = MODEL.shapes.get(shape).and_then(|s| s.pattern.as_ref())
            else {
                panic!("{shape} has a pattern");
            };
            assert!(regex.is_match(good), "{shape} {pattern} refuses {good:?}");
            assert!(!regex.is_match(bad), "{shape} {pattern} takes {bad:?}");
        }
    }

    #[test]
    fn required_members_ranges_patterns_and_nested_members_are_checked() {
        let err = check("GenerateRandom", br#"{"NumberOfBytes":1025}"#).unwrap_err();
        assert!(
            err.message
                .contains("Member must have value less than or equal to 1024"),
            "{}",
            err.message
        );
        let err = check("DescribeKey", b"{}").unwrap_err();
        assert!(
            err.message.contains(
                "Value null at 'keyId' failed to satisfy constraint: Member must not be null"
            ),
            "{}",
            err.message
        );
        let err = check(
            "CreateAlias",
            br#"{"AliasName":"alias/a b","TargetKeyId":"k"}"#,
        )
        .unwrap_err();
        assert!(
            err.message
                .contains("Member must satisfy regular expression pattern: ^[a-zA-Z0-9:/_-]+$"),
            "{}",
            err.message
        );
        let err = check(
            "TagResource",
            br#"{"KeyId":"k","Tags":[{"TagKey":"","TagValue":"v"}]}"#,
        )
        .unwrap_err();
        assert!(
            err.message.contains("at 'tags.1.member.tagKey'"),
            "{}",
            err.message
        );
        assert!(check("Encrypt", br#"{"KeyId":"k","Plaintext":"eA=="}"#).is_ok());
        assert!(check("NoSuchOperation", b"{}").is_ok());
        assert!(
            check("Encrypt", b"not json").is_ok(),
            "left to the decoding"
        );
    }
}
