//! Key policy evaluation: one test per rule and per condition operator.

use super::*;

const ACCOUNT: &str = "111122223333";
const ALICE: &str = "arn:aws:iam::111122223333:user/alice";

fn policy(statements: &str) -> KeyPolicy {
    KeyPolicy::parse(&format!(
        r#"{{"Version":"2012-10-17","Statement":[{statements}]}}"#
    ))
    .unwrap()
}

fn keys(pairs: &[(&str, &[&str])]) -> BTreeMap<String, Vec<String>> {
    pairs
        .iter()
        .map(|(k, v)| {
            (
                k.to_ascii_lowercase(),
                v.iter().map(|s| s.to_string()).collect(),
            )
        })
        .collect()
}

fn verdict(
    policy: &KeyPolicy,
    action: &str,
    who: &str,
    keys: &BTreeMap<String, Vec<String>>,
) -> Verdict {
    policy.evaluate(&Request {
        action,
        principal_arn: who,
        account: ACCOUNT,
        keys,
    })
}

/// A statement allowing Alice kms:Decrypt under `condition`; the verdict for `keys`.
fn allowed_when(condition: &str, keys_: &[(&str, &[&str])]) -> bool {
    let p = policy(&format!(
        r#"{{"Effect":"Allow","Principal":{{"AWS":"{ALICE}"}},"Action":"kms:Decrypt","Resource":"*","Condition":{condition}}}"#
    ));
    verdict(&p, "kms:Decrypt", ALICE, &keys(keys_)) == Verdict::Allow
}

#[test]
fn the_default_policy_hands_every_action_to_the_policy_file() {
    let p = KeyPolicy::parse(&KeyPolicy::default_document(ACCOUNT)).unwrap();
    for action in ["kms:Decrypt", "kms:PutKeyPolicy", "kms:ScheduleKeyDeletion"] {
        assert_eq!(verdict(&p, action, ALICE, &keys(&[])), Verdict::Delegate);
    }
    // Another account's caller gets nothing from it.
    let other = p.evaluate(&Request {
        action: "kms:Decrypt",
        principal_arn: "arn:aws:iam::999999999999:user/mallory",
        account: "999999999999",
        keys: &keys(&[]),
    });
    assert_eq!(other, Verdict::NoMatch);
}

#[test]
fn an_explicit_deny_wins_over_any_allow_in_any_order() {
    let allow = format!(
        r#"{{"Effect":"Allow","Principal":{{"AWS":"{ALICE}"}},"Action":"kms:*","Resource":"*"}}"#
    );
    let deny =
        r#"{"Effect":"Deny","Principal":"*","Action":"kms:Decrypt","Resource":"*"}"#.to_owned();
    for order in [format!("{allow},{deny}"), format!("{deny},{allow}")] {
        let p = policy(&order);
        assert_eq!(verdict(&p, "kms:Decrypt", ALICE, &keys(&[])), Verdict::Deny);
        assert_eq!(
            verdict(&p, "kms:Encrypt", ALICE, &keys(&[])),
            Verdict::Allow
        );
    }
}

#[test]
fn an_allow_naming_the_caller_allows_and_one_naming_its_account_delegates() {
    let p = policy(&format!(
        r#"{{"Effect":"Allow","Principal":{{"AWS":["{ALICE}"]}},"Action":"kms:Encrypt","Resource":"*"}},
           {{"Effect":"Allow","Principal":{{"AWS":"{ACCOUNT}"}},"Action":"kms:Decrypt","Resource":"*"}}"#
    ));
    assert_eq!(
        verdict(&p, "kms:Encrypt", ALICE, &keys(&[])),
        Verdict::Allow
    );
    assert_eq!(
        verdict(&p, "kms:Decrypt", ALICE, &keys(&[])),
        Verdict::Delegate
    );
    assert_eq!(
        verdict(&p, "kms:DescribeKey", ALICE, &keys(&[])),
        Verdict::NoMatch
    );
    let bob = "arn:aws:iam::111122223333:user/bob";
    assert_eq!(
        verdict(&p, "kms:Encrypt", bob, &keys(&[])),
        Verdict::NoMatch
    );
}

#[test]
fn not_principal_and_not_action_take_everything_but_what_they_name() {
    let p = policy(&format!(
        r#"{{"Effect":"Deny","NotPrincipal":{{"AWS":"{ALICE}"}},"NotAction":["kms:Describe*"],"Resource":"*"}},
           {{"Effect":"Allow","Principal":"*","Action":"kms:*","Resource":"*"}}"#
    ));
    let bob = "arn:aws:iam::111122223333:user/bob";
    assert_eq!(verdict(&p, "kms:Decrypt", bob, &keys(&[])), Verdict::Deny);
    assert_eq!(
        verdict(&p, "kms:DescribeKey", bob, &keys(&[])),
        Verdict::Allow
    );
    assert_eq!(
        verdict(&p, "kms:Decrypt", ALICE, &keys(&[])),
        Verdict::Allow
    );
}

#[test]
fn actions_are_case_insensitive_globs() {
    let p = policy(
        r#"{"Effect":"Allow","Principal":"*","Action":["kms:generatedatakey*","KMS:ReEncrypt?rom"],"Resource":"*"}"#,
    );
    for allowed in [
        "kms:GenerateDataKey",
        "kms:GenerateDataKeyWithoutPlaintext",
        "kms:ReEncryptFrom",
    ] {
        assert_eq!(
            verdict(&p, allowed, ALICE, &keys(&[])),
            Verdict::Allow,
            "{allowed}"
        );
    }
    assert_eq!(
        verdict(&p, "kms:ReEncryptTo", ALICE, &keys(&[])),
        Verdict::NoMatch
    );
}

#[test]
fn string_equals_and_string_not_equals() {
    let c = r#"{"StringEquals":{"kms:EncryptionContext:tenant":["acme","globex"]}}"#;
    assert!(allowed_when(
        c,
        &[("kms:EncryptionContext:tenant", &["acme"])]
    ));
    assert!(!allowed_when(
        c,
        &[("kms:EncryptionContext:tenant", &["ACME"])]
    ));
    assert!(!allowed_when(c, &[]), "absent: false");
    let n = r#"{"StringNotEquals":{"kms:EncryptionContext:tenant":"acme"}}"#;
    assert!(allowed_when(
        n,
        &[("kms:EncryptionContext:tenant", &["globex"])]
    ));
    assert!(!allowed_when(
        n,
        &[("kms:EncryptionContext:tenant", &["acme"])]
    ));
    assert!(
        allowed_when(n, &[]),
        "a negated operator holds on an absent key"
    );
}

#[test]
fn condition_key_names_are_case_insensitive() {
    let c = r#"{"StringEquals":{"KMS:ENCRYPTIONCONTEXT:Tenant":"acme"}}"#;
    assert!(allowed_when(
        c,
        &[("kms:EncryptionContext:tenant", &["acme"])]
    ));
}

#[test]
fn context_keys_differing_only_in_case_must_all_pass_an_allow_and_any_trips_a_deny() {
    // {"tenant": "acme", "Tenant": "globex"}: one condition key, two values.
    let both: &[(&str, &[&str])] = &[("kms:EncryptionContext:tenant", &["acme", "globex"])];
    let allow = r#"{"StringEquals":{"kms:EncryptionContext:tenant":"acme"}}"#;
    assert!(!allowed_when(allow, both), "globex is not acme");
    assert!(allowed_when(
        allow,
        &[("kms:EncryptionContext:tenant", &["acme", "acme"])]
    ));
    let allow_not = r#"{"StringNotEquals":{"kms:EncryptionContext:tenant":"globex"}}"#;
    assert!(!allowed_when(allow_not, both), "one of them is globex");
    let p = policy(&format!(
        r#"{{"Effect":"Allow","Principal":{{"AWS":"{ALICE}"}},"Action":"kms:Decrypt","Resource":"*"}},
           {{"Effect":"Deny","Principal":"*","Action":"kms:Decrypt","Resource":"*",
             "Condition":{{"StringNotEquals":{{"kms:EncryptionContext:tenant":"acme"}}}}}}"#
    ));
    assert_eq!(
        verdict(&p, "kms:Decrypt", ALICE, &keys(both)),
        Verdict::Deny,
        "the globex entry trips the deny though the acme one does not"
    );
    assert_eq!(
        verdict(
            &p,
            "kms:Decrypt",
            ALICE,
            &keys(&[("kms:EncryptionContext:tenant", &["acme"])])
        ),
        Verdict::Allow
    );
}

#[test]
fn encryption_context_keys_without_a_set_operator_match_on_any_value() {
    let keys_ = &[("kms:EncryptionContextKeys", &["tenant", "region"][..])];
    assert!(allowed_when(
        r#"{"StringEquals":{"kms:EncryptionContextKeys":"tenant"}}"#,
        keys_
    ));
    assert!(!allowed_when(
        r#"{"StringNotEquals":{"kms:EncryptionContextKeys":"tenant"}}"#,
        keys_
    ));
}

#[test]
fn string_equals_ignore_case_and_its_negation() {
    let c = r#"{"StringEqualsIgnoreCase":{"kms:CallerAccount":"ABC"}}"#;
    assert!(allowed_when(c, &[("kms:CallerAccount", &["abc"])]));
    let n = r#"{"StringNotEqualsIgnoreCase":{"kms:CallerAccount":"ABC"}}"#;
    assert!(!allowed_when(n, &[("kms:CallerAccount", &["abc"])]));
    assert!(allowed_when(n, &[("kms:CallerAccount", &["xyz"])]));
}

#[test]
fn string_like_and_string_not_like() {
    let c = r#"{"StringLike":{"aws:PrincipalArn":"arn:aws:iam::111122223333:role/app-*"}}"#;
    assert!(allowed_when(
        c,
        &[(
            "aws:PrincipalArn",
            &["arn:aws:iam::111122223333:role/app-web"]
        )]
    ));
    assert!(!allowed_when(
        c,
        &[(
            "aws:PrincipalArn",
            &["arn:aws:iam::111122223333:role/admin"]
        )]
    ));
    let n = r#"{"StringNotLike":{"kms:ViaService":"s3.*.amazonaws.com"}}"#;
    assert!(!allowed_when(
        n,
        &[("kms:ViaService", &["s3.us-east-1.amazonaws.com"])]
    ));
    assert!(allowed_when(
        n,
        &[("kms:ViaService", &["ec2.us-east-1.amazonaws.com"])]
    ));
}

#[test]
fn arn_equals_and_arn_like() {
    let c = r#"{"ArnLike":{"aws:PrincipalArn":"arn:aws:iam::*:user/alice"}}"#;
    assert!(allowed_when(c, &[("aws:PrincipalArn", &[ALICE])]));
    let e = format!(r#"{{"ArnNotEquals":{{"aws:PrincipalArn":"{ALICE}"}}}}"#);
    assert!(!allowed_when(&e, &[("aws:PrincipalArn", &[ALICE])]));
}

#[test]
fn bool_compares_true_and_false() {
    let c = r#"{"Bool":{"kms:GrantIsForAWSResource":true}}"#;
    assert!(allowed_when(c, &[("kms:GrantIsForAWSResource", &["true"])]));
    assert!(!allowed_when(
        c,
        &[("kms:GrantIsForAWSResource", &["false"])]
    ));
    assert!(!allowed_when(c, &[]));
}

#[test]
fn null_asks_whether_a_key_is_absent() {
    let absent = r#"{"Null":{"kms:EncryptionContext:tenant":"true"}}"#;
    assert!(allowed_when(absent, &[]));
    assert!(!allowed_when(
        absent,
        &[("kms:EncryptionContext:tenant", &["acme"])]
    ));
    let present = r#"{"Null":{"kms:EncryptionContext:tenant":"false"}}"#;
    assert!(allowed_when(
        present,
        &[("kms:EncryptionContext:tenant", &["acme"])]
    ));
    assert!(!allowed_when(present, &[]));
}

#[test]
fn ip_address_and_not_ip_address_take_ranges_and_single_addresses() {
    let c = r#"{"IpAddress":{"aws:SourceIp":["10.0.0.0/8","192.0.2.7"]}}"#;
    assert!(allowed_when(c, &[("aws:SourceIp", &["10.1.2.3"])]));
    assert!(allowed_when(c, &[("aws:SourceIp", &["192.0.2.7"])]));
    assert!(!allowed_when(c, &[("aws:SourceIp", &["127.0.0.1"])]));
    assert!(
        !allowed_when(c, &[]),
        "a unix-socket caller has no source address"
    );
    let n = r#"{"NotIpAddress":{"aws:SourceIp":"10.0.0.0/8"}}"#;
    assert!(allowed_when(n, &[("aws:SourceIp", &["127.0.0.1"])]));
    assert!(!allowed_when(n, &[("aws:SourceIp", &["10.9.9.9"])]));
    assert!(KeyPolicy::parse(
        r#"{"Statement":{"Effect":"Allow","Principal":"*","Action":"kms:*","Resource":"*","Condition":{"IpAddress":{"aws:SourceIp":"not-an-ip"}}}}"#
    )
    .is_err());
}

#[test]
fn if_exists_holds_when_the_key_is_absent() {
    let c = r#"{"StringEqualsIfExists":{"kms:ViaService":"s3.us-east-1.amazonaws.com"}}"#;
    assert!(allowed_when(c, &[]));
    assert!(allowed_when(
        c,
        &[("kms:ViaService", &["s3.us-east-1.amazonaws.com"])]
    ));
    assert!(!allowed_when(
        c,
        &[("kms:ViaService", &["ec2.us-east-1.amazonaws.com"])]
    ));
}

#[test]
fn for_any_value_needs_one_request_value_to_match() {
    let c = r#"{"ForAnyValue:StringEquals":{"kms:EncryptionContextKeys":["tenant","project"]}}"#;
    assert!(allowed_when(
        c,
        &[("kms:EncryptionContextKeys", &["region", "tenant"])]
    ));
    assert!(!allowed_when(
        c,
        &[("kms:EncryptionContextKeys", &["region"])]
    ));
    assert!(
        !allowed_when(c, &[]),
        "ForAnyValue does not hold for an absent key"
    );
}

#[test]
fn for_all_values_needs_every_request_value_to_match() {
    let c = r#"{"ForAllValues:StringEquals":{"kms:EncryptionContextKeys":["tenant","project"]}}"#;
    assert!(allowed_when(
        c,
        &[("kms:EncryptionContextKeys", &["tenant", "project"])]
    ));
    assert!(!allowed_when(
        c,
        &[("kms:EncryptionContextKeys", &["tenant", "region"])]
    ));
    assert!(allowed_when(c, &[]), "ForAllValues holds for an absent key");
}

#[test]
fn all_conditions_of_a_statement_must_hold() {
    let c = r#"{"StringEquals":{"kms:EncryptionContext:tenant":"acme","kms:CallerAccount":"111122223333"},"Bool":{"kms:GrantIsForAWSResource":"false"}}"#;
    let all: &[(&str, &[&str])] = &[
        ("kms:EncryptionContext:tenant", &["acme"]),
        ("kms:CallerAccount", &["111122223333"]),
        ("kms:GrantIsForAWSResource", &["false"]),
    ];
    assert!(allowed_when(c, all));
    assert!(!allowed_when(c, &all[..2]));
}

#[test]
fn a_malformed_document_is_refused_with_a_reason() {
    for (doc, why) in [
        ("not json", "not JSON"),
        ("[]", "JSON object"),
        (r#"{"Version":"2012-10-17"}"#, "no Statement"),
        (r#"{"Statement":[]}"#, "no Statement"),
        (r#"{"Version":"2020-01-01","Statement":[]}"#, "Version"),
        (
            r#"{"Statement":{"Effect":"Maybe","Principal":"*","Action":"kms:*","Resource":"*"}}"#,
            "Effect",
        ),
        (
            r#"{"Statement":{"Effect":"Allow","Action":"kms:*","Resource":"*"}}"#,
            "Principal",
        ),
        (
            r#"{"Statement":{"Effect":"Allow","Principal":"*","Resource":"*"}}"#,
            "Action",
        ),
        (
            r#"{"Statement":{"Effect":"Allow","Principal":"*","Action":"kms:*"}}"#,
            "Resource",
        ),
        (
            r#"{"Statement":{"Effect":"Allow","Principal":{"AWS":"bob"},"Action":"kms:*","Resource":"*"}}"#,
            "invalid principals",
        ),
        (
            r#"{"Statement":{"Effect":"Allow","Principal":"*","Action":"kms:*","Resource":"*","Condition":{"NumericLessThan":{"a":"1"}}}}"#,
            "unsupported condition operator",
        ),
        (
            r#"{"Statement":{"Effect":"Allow","Principal":"*","Action":"kms:*","Resource":"*","Extra":1}}"#,
            "Unknown statement element",
        ),
        (
            r#"{"Statement":{"Effect":"Allow","Principal":"*","Action":"kms:*","Resource":"arn:aws:kms:us-east-1:111122223333:key/other"}}"#,
            "Resource must be",
        ),
        (
            r#"{"Statement":{"Effect":"Allow","Principal":"*","Action":"kms:*","NotResource":"*"}}"#,
            "NotResource",
        ),
        (
            r#"{"Statement":{"Effect":"Deny","Principal":"*","Action":"kms:*","Resource":"*","Condition":{"Bool":{"aws:SecureTransport":"false"}}}}"#,
            "unsupported condition key",
        ),
    ] {
        let err = KeyPolicy::parse(doc).unwrap_err();
        assert!(err.contains(why), "{doc}: {err}");
    }
    let long_value = format!(
        r#"{{"Statement":{{"Effect":"Allow","Principal":"*","Action":"kms:*","Resource":"*","Condition":{{"StringLike":{{"aws:PrincipalArn":"{}"}}}}}}}}"#,
        "*a".repeat(MAX_VALUE_CHARS)
    );
    assert!(
        KeyPolicy::parse(&long_value)
            .unwrap_err()
            .contains("longer than")
    );
    let huge = format!(
        r#"{{"Statement":{{"Effect":"Allow","Principal":"*","Action":"kms:*","Resource":"*","Sid":"{}"}}}}"#,
        "x".repeat(MAX_POLICY_BYTES)
    );
    assert!(KeyPolicy::parse(&huge).unwrap_err().contains("larger than"));
}

#[test]
fn a_star_in_the_text_cannot_escape_a_wildcard() {
    assert!(glob("prod*", "prod*x"));
    assert!(glob("*admin*", "*xadmin"));
    let c = r#"{"StringLike":{"kms:EncryptionContext:env":"prod*"}}"#;
    assert!(allowed_when(
        c,
        &[("kms:EncryptionContext:env", &["prod*x"])]
    ));
}

#[test]
fn arn_equals_takes_wildcards_as_arn_like_does() {
    let c = r#"{"ArnEquals":{"aws:PrincipalArn":"arn:aws:iam::111122223333:wrapd/unix:uid=*"}}"#;
    assert!(allowed_when(
        c,
        &[(
            "aws:PrincipalArn",
            &["arn:aws:iam::111122223333:wrapd/unix:uid=0"]
        )]
    ));
}

#[test]
fn globs_match_runs_and_single_characters() {
    assert!(glob("a*c", "abbbc"));
    assert!(glob("a?c", "abc"));
    assert!(!glob("a?c", "abbc"));
    assert!(glob("*", ""));
    assert!(glob("**a", "ba"));
    assert!(!glob("a*", "ba"));
}
