//! `wrapctl` end to end: every command against a real daemon, over the unix socket and over
//! mutual TLS, with `--json` output.

use crate::common;

use std::process::Command;

use common::DevDaemon;
use serde_json::Value;

struct Ctl<'a> {
    daemon: &'a DevDaemon,
    tls: bool,
}

impl Ctl<'_> {
    fn run(&self, args: &[&str]) -> Result<Value, String> {
        let mut command = Command::new(env!("CARGO_BIN_EXE_wrapctl"));
        command.arg("--json");
        if self.tls {
            let pki = self.daemon.dir().join("pki");
            command
                .arg("--endpoint")
                .arg(format!("https://{}", self.daemon.tcp))
                .arg("--tls-ca")
                .arg(pki.join("ca.pem"))
                .arg("--tls-cert")
                .arg(pki.join("client.pem"))
                .arg("--tls-key")
                .arg(pki.join("client.key"));
        } else {
            command.arg("--socket").arg(&self.daemon.socket);
        }
        let out = command.args(args).output().unwrap();
        let stderr = String::from_utf8_lossy(&out.stderr).into_owned();
        assert!(!stderr.contains("panicked"), "wrapctl panicked: {stderr}");
        if out.status.success() {
            Ok(serde_json::from_slice(&out.stdout).expect("JSON output"))
        } else {
            Err(stderr)
        }
    }

    fn ok(&self, args: &[&str]) -> Value {
        self.run(args)
            .unwrap_or_else(|e| panic!("wrapctl {args:?}: {e}"))
    }
}

fn text(v: &Value, field: &str) -> String {
    v[field]
        .as_str()
        .unwrap_or_else(|| panic!("no {field} in {v}"))
        .to_owned()
}

#[test]
fn every_command_over_both_transports() {
    let daemon = DevDaemon::start();
    for tls in [false, true] {
        let ctl = Ctl {
            daemon: &daemon,
            tls,
        };
        let alias = if tls {
            "alias/cli-tls"
        } else {
            "alias/cli-unix"
        };
        let key = ctl.ok(&["keys", "create", "--description", "cli", "--alias", alias]);
        let id = text(&key, "key_id");
        assert_eq!(text(&key, "state"), "ENABLED");
        assert_eq!(
            ctl.ok(&["keys", "describe", alias])["key_id"],
            key["key_id"]
        );
        let listed = ctl.ok(&["keys", "list"]);
        assert!(
            listed["keys"]
                .as_array()
                .unwrap()
                .iter()
                .any(|k| k["key_id"] == key["key_id"])
        );
        let one_page = ctl.ok(&["keys", "list", "--page-size", "1", "--page-token", ""]);
        assert_eq!(one_page["keys"].as_array().unwrap().len(), 1);

        let generated = ctl.ok(&[
            "datakey",
            "generate",
            alias,
            "--context",
            "app=cli",
            "--bytes",
            "24",
        ]);
        let blob = text(&generated, "ciphertext_blob");
        let unwrapped = ctl.ok(&[
            "datakey",
            "unwrap",
            "--blob",
            &blob,
            "--context",
            "app=cli",
            "--key",
            alias,
        ]);
        assert_eq!(unwrapped["plaintext"], generated["plaintext"]);
        let blind = ctl.ok(&["datakey", "generate", &id, "--no-plaintext"]);
        assert!(blind.get("plaintext").is_none());
        let wrapped = ctl.ok(&[
            "datakey",
            "wrap",
            &id,
            "--plaintext",
            "aGVsbG8=",
            "--context",
            "k=v",
        ]);
        let back = ctl.ok(&[
            "datakey",
            "unwrap",
            "--blob",
            &text(&wrapped, "ciphertext_blob"),
            "--context",
            "k=v",
        ]);
        assert_eq!(text(&back, "plaintext"), "aGVsbG8=");

        let rotated = ctl.ok(&["keys", "rotate", alias]);
        assert_eq!(rotated["current_version"], 2);
        let moved = ctl.ok(&[
            "datakey",
            "rewrap",
            "--blob",
            &blob,
            "--source-context",
            "app=cli",
        ]);
        assert_eq!(moved["key_version"], 2);
        assert_eq!(moved["source_key_version"], 1);

        ctl.ok(&["aliases", "create", &format!("{alias}-2"), &id]);
        ctl.ok(&["aliases", "update", &format!("{alias}-2"), &id]);
        let aliases = ctl.ok(&["aliases", "list", "--key", &id]);
        assert_eq!(aliases["aliases"].as_array().unwrap().len(), 2);
        ctl.ok(&["aliases", "delete", &format!("{alias}-2")]);

        assert_eq!(
            text(&ctl.ok(&["keys", "disable", &id]), "state"),
            "DISABLED"
        );
        assert_eq!(text(&ctl.ok(&["keys", "enable", &id]), "state"), "ENABLED");
        let pending = ctl.ok(&["keys", "schedule-deletion", &id, "--days", "7"]);
        assert_eq!(text(&pending, "state"), "PENDING_DELETION");
        assert!(pending["deletion_date"].is_string());
        assert_eq!(
            text(&ctl.ok(&["keys", "cancel-deletion", &id]), "state"),
            "DISABLED"
        );

        // Errors are one clear line with the gRPC code.
        let err = ctl
            .run(&[
                "datakey",
                "unwrap",
                "--blob",
                &blob,
                "--context",
                "app=other",
            ])
            .unwrap_err();
        assert!(
            err.starts_with("wrapctl: error: FailedPrecondition")
                || err.starts_with("wrapctl: error: InvalidArgument"),
            "{err}"
        );
        let err = ctl
            .run(&["datakey", "wrap", &id, "--plaintext", "not base64!"])
            .unwrap_err();
        assert!(err.contains("base64"), "{err}");
        let err = ctl.run(&["keys", "describe", "alias/nope"]).unwrap_err();
        assert!(err.contains("NotFound"), "{err}");
    }

    let verified = Ctl {
        daemon: &daemon,
        tls: false,
    }
    .ok(&[
        "audit",
        "verify",
        daemon.dir().join("audit.log").to_str().unwrap(),
    ]);
    assert_eq!(text(&verified, "status"), "intact");
    assert!(verified["records"].as_u64().unwrap() > 30);
}

#[test]
fn unreachable_daemon_is_a_clear_error() {
    let out = Command::new(env!("CARGO_BIN_EXE_wrapctl"))
        .args(["--socket", "/nonexistent/wrapd.sock", "keys", "list"])
        .output()
        .unwrap();
    assert!(!out.status.success());
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(
        stderr.starts_with("wrapctl: error: cannot connect to wrapd at /nonexistent/wrapd.sock"),
        "{stderr}"
    );
    assert_eq!(stderr.lines().count(), 1, "{stderr}");
}

/// `wrapctl`'s exit code says what failed: 3 not found, 6 unavailable, 2 usage, 4 denied,
/// 5 an invalid ciphertext, 7 a key in the wrong state.
#[test]
fn exit_codes_say_what_failed() {
    let daemon = DevDaemon::start();
    let code = |args: &[&str]| {
        Command::new(env!("CARGO_BIN_EXE_wrapctl"))
            .arg("--socket")
            .arg(&daemon.socket)
            .args(args)
            .output()
            .unwrap()
            .status
            .code()
    };
    assert_eq!(code(&["keys", "describe", "alias/nope"]), Some(3));
    let unreachable = Command::new(env!("CARGO_BIN_EXE_wrapctl"))
        .args(["--socket", "/nonexistent/wrapd.sock", "keys", "list"])
        .output()
        .unwrap();
    assert_eq!(unreachable.status.code(), Some(6));
    assert_eq!(
        code(&["datakey", "unwrap", "--blob", "not base64!"]),
        Some(2)
    );
    assert_eq!(code(&["keys", "frobnicate"]), Some(2));
    let ctl = Ctl {
        daemon: &daemon,
        tls: false,
    };
    let key = ctl.ok(&["keys", "create"]);
    let id = text(&key, "key_id");
    let wrapped = ctl.ok(&["datakey", "wrap", &id, "--plaintext", "c2VjcmV0"]);
    let blob = text(&wrapped, "ciphertext_blob");
    assert_eq!(
        code(&["datakey", "unwrap", "--blob", &blob, "--context", "a=b"]),
        Some(5)
    );
    ctl.ok(&["keys", "disable", &id]);
    assert_eq!(code(&["datakey", "unwrap", "--blob", &blob]), Some(7));
    std::fs::write(daemon.dir().join("policy.toml"), "").unwrap();
    daemon.signal(libc::SIGHUP);
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(10);
    while code(&["keys", "list"]) != Some(4) {
        assert!(
            std::time::Instant::now() < deadline,
            "an empty policy denies"
        );
        std::thread::sleep(std::time::Duration::from_millis(50));
    }
}

#[test]
fn key_policies_and_grants_from_the_command_line() {
    let daemon = DevDaemon::start();
    let ctl = Ctl {
        daemon: &daemon,
        tls: false,
    };
    let key = text(
        &ctl.ok(&["keys", "create", "--description", "cli"]),
        "key_id",
    );
    let default = ctl.ok(&["key-policy", "get", &key]);
    assert!(text(&default, "policy").contains(":root"), "{default}");
    // Everything for the account, but Encrypt: a caller's Encrypt can then come from a grant.
    let policy = daemon.dir().join("policy.json");
    std::fs::write(
        &policy,
        r#"{"Version":"2012-10-17","Statement":[{"Effect":"Allow","Principal":{"AWS":"arn:aws:iam::111122223333:root"},"NotAction":"kms:Encrypt","Resource":"*"}]}"#,
    )
    .unwrap();
    ctl.ok(&[
        "key-policy",
        "put",
        &key,
        "--file",
        policy.to_str().unwrap(),
    ]);
    assert!(text(&ctl.ok(&["key-policy", "get", &key]), "policy").contains("NotAction"));

    let me = "arn:aws:iam::111122223333:wrapd/unix:uid=0";
    let made = ctl.ok(&[
        "grants",
        "create",
        &key,
        "--grantee",
        me,
        "--operation",
        "Encrypt",
        "--operation",
        "Decrypt",
        "--context-subset",
        "tenant=acme",
        "--name",
        "cli",
    ]);
    let grant_id = text(&made, "grant_id");
    assert_eq!(grant_id.len(), 64, "{made}");
    let listed = ctl.ok(&["grants", "list", &key, "--grantee", me]);
    let grants = listed["grants"].as_array().unwrap();
    assert_eq!(grants.len(), 1, "{listed}");
    assert_eq!(grants[0]["grant_id"], grant_id.as_str());
    assert_eq!(
        grants[0]["operations"],
        serde_json::json!(["Decrypt", "Encrypt"])
    );
    assert_eq!(grants[0]["constraints"], "subset tenant=acme");
    let unknown = ctl
        .run(&[
            "grants",
            "create",
            &key,
            "--grantee",
            me,
            "--operation",
            "Sign",
        ])
        .unwrap_err();
    assert!(unknown.contains("unknown grant operation"), "{unknown}");
    ctl.ok(&["grants", "revoke", &key, &grant_id]);
    assert_eq!(
        ctl.ok(&["grants", "list", &key])["grants"],
        serde_json::json!([])
    );
    let gone = ctl.run(&["grants", "revoke", &key, &grant_id]).unwrap_err();
    assert!(gone.contains("does not exist"), "{gone}");
}
