//! The config file: every section parsed and resolved, and every mistake refused with a
//! message that names it.

use super::*;

fn write_pin(dir: &Path) {
    std::fs::write(dir.join("pin"), "1234\n").unwrap();
}

const GOOD: &str = r#"
    [hsm]
    module = "/usr/lib/softhsm/libsofthsm2.so"
    token_label = "wrapd"
    pin_file = "pin"
    profile = "softhsm"
    [store]
    sqlite = "wrapd.db"
    [unix]
    path = "wrapd.sock"
    mode = "0660"
"#;

#[test]
fn parses_and_resolves_paths() {
    let dir = tempfile::tempdir().unwrap();
    write_pin(dir.path());
    let config = Config::parse(GOOD, dir.path()).unwrap();
    assert_eq!(config.hsm.pin.expose(), "1234");
    assert!(
        matches!(&config.store, StoreConfig::Sqlite(path) if *path == dir.path().join("wrapd.db"))
    );
    let unix = config.unix.unwrap();
    assert_eq!(unix.mode, 0o660);
    assert_eq!(config.hsm.max_sessions, 8);
    // The PIN never shows in Debug output.
    assert!(!format!("{:?}", config.hsm).contains("1234"));
}

#[test]
fn a_networked_hsm_gets_more_sessions_and_a_keep_alive_by_default() {
    let dir = tempfile::tempdir().unwrap();
    write_pin(dir.path());
    let local = Config::parse(GOOD, dir.path()).unwrap();
    assert_eq!(
        (local.hsm.max_sessions, local.hsm.session_keepalive),
        (8, None)
    );
    let cloudhsm = GOOD.replace("profile = \"softhsm\"", "profile = \"cloudhsm\"");
    let networked = Config::parse(&cloudhsm, dir.path()).unwrap();
    assert_eq!(
        (networked.hsm.max_sessions, networked.hsm.session_keepalive),
        (32, Some(Duration::from_secs(60)))
    );
    let set = |line: &str| cloudhsm.replace("[store]", &format!("{line}\n    [store]"));
    let off = Config::parse(&set("session_keepalive_ms = 0"), dir.path()).unwrap();
    assert_eq!(off.hsm.session_keepalive, None);
    let err = Config::parse(&set("session_keepalive_ms = 5"), dir.path()).unwrap_err();
    assert!(err.to_string().contains("session_keepalive_ms"), "{err}");
}

#[test]
fn rejects_inline_pin_unknown_fields_and_bad_values() {
    let dir = tempfile::tempdir().unwrap();
    write_pin(dir.path());
    let inline = GOOD.replace("pin_file = \"pin\"", "pin = \"1234\"");
    assert!(Config::parse(&inline, dir.path()).is_err());
    let both = GOOD.replace("pin_file = \"pin\"", "pin_file = \"pin\"\npin_env = \"X\"");
    assert!(Config::parse(&both, dir.path()).is_err());
    let mode = GOOD.replace("0660", "rw-rw----");
    assert!(Config::parse(&mode, dir.path()).is_err());
    let profile = GOOD.replace("softhsm\"", "luna\"");
    assert!(Config::parse(&profile, dir.path()).is_err());
    assert!(Config::parse("not toml [", dir.path()).is_err());
}

#[test]
fn tracing_takes_an_otlp_url_and_a_ratio_between_0_and_1() {
    let dir = tempfile::tempdir().unwrap();
    write_pin(dir.path());
    let with = |section: &str| Config::parse(&format!("{GOOD}\n[tracing]\n{section}"), dir.path());
    let config = with("otlp_endpoint = \"http://127.0.0.1:4317\"").unwrap();
    let tracing = config.tracing.unwrap();
    assert_eq!(tracing.service_name, "wrapd");
    assert_eq!(tracing.sample_ratio, 1.0);
    assert!(with("otlp_endpoint = \"127.0.0.1:4317\"").is_err());
    assert!(with("otlp_endpoint = \"http://c:4317\"\nsample_ratio = 1.5").is_err());
    assert!(Config::parse(GOOD, dir.path()).unwrap().tracing.is_none());
}

#[test]
fn the_example_configs_and_policy_are_valid() {
    let dir = tempfile::tempdir().unwrap();
    write_pin(dir.path());
    for example in [
        include_str!("../../softhsm-config/softhsm.toml"),
        include_str!("../../softhsm-config/cloudhsm.toml"),
    ] {
        // Point the PIN at a file that exists here; everything else as shipped.
        let text: String = example
            .lines()
            .map(|l| {
                if l.starts_with("pin_file") || l.starts_with("pin_env") {
                    "pin_file = \"pin\""
                } else {
                    l
                }
            })
            .collect::<Vec<_>>()
            .join("\n");
        let config = Config::parse(&text, dir.path()).unwrap();
        assert!(config.tcp.is_some() && config.audit.is_some() && config.policy_file.is_some());
    }
    let policy =
        crate::auth::Policy::parse(include_str!("../../softhsm-config/policy.toml")).unwrap();
    assert_eq!(policy.len(), 3);
}

#[test]
fn config_errors_do_not_echo_the_pin() {
    let dir = tempfile::tempdir().unwrap();
    std::fs::write(dir.path().join("pin"), "s3cret-pin\n").unwrap();
    let bad = GOOD.replace("[store]", "[store]\nbogus = 1");
    let err = Config::parse(&bad, dir.path()).unwrap_err().to_string();
    assert!(!err.contains("s3cret-pin"), "{err}");
}

const AWS: &str = r#"
    [aws]
    listen = "127.0.0.1:0"
    cert = "server.pem"
    key = "server.key"
    region = "eu-west-3"
    account = "111122223333"

    [[aws.access_key]]
    id = "AKIAEXAMPLEEXAMPLE00"
    secret_file = "aws-secret"
    principal = "tls:uri=spiffe://example.org/app"
"#;

fn aws_dir() -> tempfile::TempDir {
    let dir = tempfile::tempdir().unwrap();
    write_pin(dir.path());
    std::fs::write(
        dir.path().join("aws-secret"),
        "wJalrXUtnFEMI/K7MDENG+bPxRfiCYEXAMPLEKEY\n",
    )
    .unwrap();
    dir
}

#[test]
fn an_aws_access_key_reads_its_secret_from_a_file() {
    let dir = aws_dir();
    let config = Config::parse(&format!("{GOOD}{AWS}"), dir.path()).unwrap();
    let aws = config.aws.unwrap();
    assert_eq!(aws.region, "eu-west-3");
    let key = &aws.access_keys[0];
    assert_eq!(
        key.secret.as_str(),
        "wJalrXUtnFEMI/K7MDENG+bPxRfiCYEXAMPLEKEY"
    );
    assert!(
        !format!("{key:?}").contains("EXAMPLEKEY"),
        "Debug redacts the secret"
    );
}

#[test]
fn every_secret_file_readable_by_others_is_named() {
    use std::os::unix::fs::PermissionsExt;
    let dir = aws_dir();
    for file in ["pin", "aws-secret"] {
        let path = dir.path().join(file);
        std::fs::set_permissions(&path, std::fs::Permissions::from_mode(0o600)).unwrap();
    }
    let config = Config::parse(&format!("{GOOD}{AWS}"), dir.path()).unwrap();
    assert!(config.shared_secret_files().is_empty());
    for file in ["pin", "aws-secret"] {
        let path = dir.path().join(file);
        std::fs::set_permissions(&path, std::fs::Permissions::from_mode(0o644)).unwrap();
    }
    let warnings = config.shared_secret_files();
    assert_eq!(warnings.len(), 2, "{warnings:?}");
    assert!(warnings[0].starts_with("hsm.pin_file"), "{warnings:?}");
    assert!(
        warnings[1].starts_with("aws.access_key[1].secret_file"),
        "{warnings:?}"
    );
}

#[test]
fn metrics_listen_on_loopback_by_default_and_name_keys_only_there_unless_asked() {
    let dir = aws_dir();
    let parse = |metrics: &str| {
        Config::parse(&format!("{GOOD}\n[metrics]\n{metrics}\n"), dir.path())
            .unwrap()
            .metrics
            .unwrap()
    };
    let default = parse("");
    assert_eq!(default.listen, "127.0.0.1:9464".parse().unwrap());
    assert!(default.per_key_series);
    assert!(!parse("listen = \"0.0.0.0:9464\"").per_key_series);
    assert!(parse("listen = \"0.0.0.0:9464\"\nper_key_series = true").per_key_series);
}

#[test]
fn a_fleet_instance_name_can_come_from_the_environment() {
    let dir = aws_dir();
    // Cargo sets CARGO_PKG_NAME for the tests it runs.
    let text = GOOD.replace(
        "sqlite = \"wrapd.db\"",
        "postgres = \"postgresql://wrapd@127.0.0.1/wrapd\"\ninstance_env = \"CARGO_PKG_NAME\"",
    );
    let config = Config::parse(&text, dir.path()).unwrap();
    assert_eq!(config.store.instance(), Some("wrapd"));
    let both = text.replace("instance_env", "instance = \"a\"\ninstance_env");
    let err = Config::parse(&both, dir.path()).unwrap_err().to_string();
    assert!(err.contains("at most one"), "{err}");
    let unset = text.replace("CARGO_PKG_NAME", "WRAPD_TEST_UNSET_VARIABLE");
    let err = Config::parse(&unset, dir.path()).unwrap_err().to_string();
    assert!(
        err.contains("WRAPD_TEST_UNSET_VARIABLE is not set"),
        "{err}"
    );
}

#[test]
fn an_inline_aws_secret_is_refused() {
    let dir = aws_dir();
    let inline = AWS.replace(
        "secret_file = \"aws-secret\"",
        "secret = \"wJalrXUtnFEMI/K7MDENG+bPxRfiCYEXAMPLEKEY\"",
    );
    let err = Config::parse(&format!("{GOOD}{inline}"), dir.path())
        .unwrap_err()
        .to_string();
    assert!(err.contains("secret"), "{err}");
    assert!(
        !err.contains("EXAMPLEKEY"),
        "the error does not echo the secret: {err}"
    );
}

#[test]
fn an_access_key_cannot_act_as_an_internal_principal() {
    let dir = aws_dir();
    let internal = AWS.replace("tls:uri=spiffe://example.org/app", "wrapd:daemon");
    let err = Config::parse(&format!("{GOOD}{internal}"), dir.path()).unwrap_err();
    assert!(err.to_string().contains("wrapd:"), "{err}");
}

#[test]
fn an_aws_account_is_twelve_digits() {
    let dir = aws_dir();
    let bad = AWS.replace("111122223333", "12345");
    assert!(Config::parse(&format!("{GOOD}{bad}"), dir.path()).is_err());
}

const XKS: &str = r#"
    [xks]
    listen = "127.0.0.1:0"
    cert = "server.pem"
    key = "server.key"

    [[xks.keystore]]
    uri_prefix = "/tenant-a/"
    region = "eu-west-1"

    [[xks.keystore.credential]]
    id = "AAAAAAAAAAAAAAAAAAAAAAAAAA"
    secret_file = "xks-secret"
"#;

fn xks_dir() -> tempfile::TempDir {
    let dir = tempfile::tempdir().unwrap();
    write_pin(dir.path());
    std::fs::write(
        dir.path().join("xks-secret"),
        format!("{}\n", "s".repeat(43)),
    )
    .unwrap();
    dir
}

#[test]
fn an_xks_key_store_is_named_after_its_prefix_and_checked_as_aws_kms_checks_it() {
    let dir = xks_dir();
    let config = Config::parse(&format!("{GOOD}{XKS}"), dir.path()).unwrap();
    let xks = config.xks.unwrap();
    let store = &xks.keystores[0];
    assert_eq!(store.uri_prefix, "tenant-a");
    assert_eq!(store.principal, "xks:tenant-a");
    assert_eq!(store.credentials[0].secret.len(), 43);
    assert!(
        !format!("{store:?}").contains("sssss"),
        "Debug redacts the secret"
    );
    let refused = |from: &str, to: &str| {
        let text = format!("{GOOD}{}", XKS.replace(from, to));
        Config::parse(&text, dir.path()).unwrap_err().to_string()
    };
    // AWS KMS's rules for ids (20 to 30 of A-Z 2-7) and secrets (43 to 64).
    assert!(refused("AAAAAAAAAAAAAAAAAAAAAAAAAA", "AAAA").contains("20 to 30"));
    assert!(
        refused("AAAAAAAAAAAAAAAAAAAAAAAAAA", "AAAAAAAAAAAAAAAAAAAAAAAAA1").contains("A-Z 2-7")
    );
    std::fs::write(dir.path().join("short"), "s".repeat(40)).unwrap();
    assert!(refused("xks-secret", "short").contains("43 to 64"));
    assert!(refused("/tenant-a/", "a//b").contains("uri_prefix"));
    assert!(refused("[xks]", "[xks]\nclient_subject = \"x\"").contains("client_ca"));
    // Two key stores with one principal would share every grant.
    let twice = format!(
        "{GOOD}{XKS}{}",
        r#"
    [[xks.keystore]]
    uri_prefix = "other"
    region = "eu-west-1"
    principal = "xks:tenant-a"
    [[xks.keystore.credential]]
    id = "BBBBBBBBBBBBBBBBBBBBBBBBBB"
    secret_file = "xks-secret"
"#
    );
    let err = Config::parse(&twice, dir.path()).unwrap_err().to_string();
    assert!(err.contains("another key store's"), "{err}");
}

#[test]
fn an_aws_access_key_may_name_its_iam_arn_in_the_apis_account() {
    let dir = aws_dir();
    let with = |arn: &str| {
        let text = format!(
            "{GOOD}{}",
            AWS.replace(
                "principal = \"tls:uri=spiffe://example.org/app\"",
                &format!("principal = \"tls:uri=spiffe://example.org/app\"\narn = \"{arn}\"")
            )
        );
        Config::parse(&text, dir.path())
    };
    let config = with("arn:aws:iam::111122223333:user/alice").unwrap();
    assert_eq!(
        config.aws.unwrap().access_keys[0].arn.as_deref(),
        Some("arn:aws:iam::111122223333:user/alice")
    );
    assert!(with("arn:aws:iam::111122223333:role/teams/payments").is_ok());
    for bad in [
        "arn:aws:iam::999999999999:user/alice",
        "arn:aws:iam::111122223333:group/admins",
        "arn:aws:iam::111122223333:user/",
        "arn:aws:sts::111122223333:assumed-role/x/y",
        "alice",
    ] {
        let err = with(bad).unwrap_err().to_string();
        assert!(err.contains("arn"), "{bad}: {err}");
    }
}

#[test]
fn automatic_retirement_is_off_unless_a_key_is_listed_with_1_to_3650_days() {
    let dir = tempfile::tempdir().unwrap();
    write_pin(dir.path());
    assert!(
        Config::parse(GOOD, dir.path())
            .unwrap()
            .retire_unused
            .is_empty()
    );
    let with = |key: &str, days: u32| {
        Config::parse(
            &format!(
                "{GOOD}\n[[keys.retirement]]\nkey = \"{key}\"\nretire_unused_after_days = {days}\n"
            ),
            dir.path(),
        )
    };
    let config = with("alias/payments", 90).unwrap();
    assert_eq!(
        config.retire_unused,
        vec![RetireUnused {
            key: KeyRef::parse("alias/payments").unwrap(),
            after_days: 90,
        }]
    );
    assert!(with("alias/payments", 0).is_err());
    assert!(with("alias/payments", 3651).is_err());
    assert!(with("payments", 90).is_err());
}
