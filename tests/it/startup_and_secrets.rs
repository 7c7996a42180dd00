//! Start-up failures end with one clear error line and a non-zero exit (never a panic), and
//! no secret ever reaches the daemon's log, even at the most verbose level.

use crate::common;

use std::path::Path;
use std::process::Command;

use base64::Engine;
use base64::engine::general_purpose::STANDARD as B64;
use common::{DevDaemon, create_key, ctx};
use wrapd::proto::{GenerateDataKeyRequest, ReWrapRequest, UnwrapRequest, WrapRequest};

/// Runs `wrapd serve --config FILE`, which must fail; returns its stderr.
fn serve_must_fail(config: &Path) -> String {
    let output = Command::new(env!("CARGO_BIN_EXE_wrapd"))
        .args(["serve", "--config"])
        .arg(config)
        .env("RUST_LOG", "off")
        .output()
        .expect("run wrapd");
    let stderr = String::from_utf8_lossy(&output.stderr).into_owned();
    assert!(!output.status.success(), "must fail; stderr:\n{stderr}");
    assert!(!stderr.contains("panicked"), "panic:\n{stderr}");
    let errors: Vec<_> = stderr
        .lines()
        .filter(|l| l.starts_with("wrapd: error:"))
        .collect();
    assert_eq!(errors.len(), 1, "exactly one error line:\n{stderr}");
    assert_eq!(
        stderr.lines().count(),
        1,
        "nothing but the error line:\n{stderr}"
    );
    stderr
}

#[test]
fn bad_start_ups_fail_with_one_clear_line() {
    // A dev state dir gives a real token to break in various ways.
    let mut daemon = DevDaemon::start();
    assert!(daemon.stop().success());
    let dir = daemon.dir().to_owned();
    let good = std::fs::read_to_string(daemon.config_path()).unwrap();
    let pin = std::fs::read_to_string(dir.join("pin")).unwrap();
    let write = |name: &str, text: &str| {
        let path = dir.join(name);
        std::fs::write(&path, text).unwrap();
        path
    };

    // Wrong PIN.
    std::fs::write(dir.join("wrong-pin"), "00000000").unwrap();
    let err = serve_must_fail(&write(
        "wrong-pin.toml",
        &good.replace("pin_file = \"pin\"", "pin_file = \"wrong-pin\""),
    ));
    assert!(err.contains("PIN is incorrect"), "{err}");
    assert!(
        !err.contains("00000000") && !err.contains(pin.trim()),
        "the PIN leaked: {err}"
    );

    // Missing module.
    let err = serve_must_fail(&write(
        "no-module.toml",
        &good.replace(
            &good
                .lines()
                .find(|l| l.starts_with("module"))
                .unwrap()
                .to_owned(),
            "module = \"/nonexistent/libpkcs11.so\"",
        ),
    ));
    assert!(err.contains("/nonexistent/libpkcs11.so"), "{err}");

    // Missing token.
    let err = serve_must_fail(&write(
        "no-token.toml",
        &good.replace("token_label = \"wrapd-dev\"", "token_label = \"absent\""),
    ));
    assert!(err.contains("no token labelled \"absent\""), "{err}");

    // Config errors: unknown field, missing PIN file, inline PIN, not TOML at all.
    let err = serve_must_fail(&write(
        "unknown.toml",
        &good.replace("[store]", "[store]\nsurprise = true"),
    ));
    assert!(err.contains("surprise"), "{err}");
    let err = serve_must_fail(&write(
        "no-pin.toml",
        &good.replace("pin_file = \"pin\"", "pin_file = \"missing-pin\""),
    ));
    assert!(err.contains("missing-pin"), "{err}");
    serve_must_fail(&write(
        "inline.toml",
        &good.replace("pin_file = \"pin\"", "pin = \"1234\""),
    ));
    serve_must_fail(&write("garbage.toml", "\u{0}\u{1}[[[ not toml"));
    serve_must_fail(&dir.join("does-not-exist.toml"));

    // Something that is not a socket where the socket should go is never deleted.
    let err = serve_must_fail(&write(
        "file-at-socket.toml",
        &good.replace("path = \"wrapd.sock\"", "path = \"pin\""),
    ));
    assert!(err.contains("not a socket"), "{err}");
    assert_eq!(std::fs::read_to_string(dir.join("pin")).unwrap(), pin);

    // `wrapd serve` refuses root unless the config allows it.
    if nix::unistd::geteuid().is_root() {
        assert!(
            good.contains("allow_root = true"),
            "a dev config made by root allows root"
        );
        let err = serve_must_fail(&write(
            "no-root.toml",
            &good.replace("allow_root = true", "allow_root = false"),
        ));
        assert!(err.contains("refusing to run as root"), "{err}");
    }
}

/// The running daemon cannot dump core, keeps its memory out of swap (as root, which has
/// CAP_IPC_LOCK), and says so in its log.
#[test]
fn the_daemon_process_is_hardened() {
    let daemon = DevDaemon::start();
    let log = daemon.log();
    let line = log
        .lines()
        .find(|l| l.contains("process hardened"))
        .unwrap_or_else(|| panic!("no hardening line in:\n{log}"));
    assert!(line.contains("dumpable=false"), "{line}");
    assert!(line.contains("core_limit=0"), "{line}");
    let status = std::fs::read_to_string(format!("/proc/{}/status", daemon.pid())).unwrap();
    let locked_kib: u64 = status
        .lines()
        .find_map(|l| l.strip_prefix("VmLck:"))
        .and_then(|v| v.trim().trim_end_matches("kB").trim().parse().ok())
        .unwrap();
    let limits = std::fs::read_to_string(format!("/proc/{}/limits", daemon.pid())).unwrap();
    let core = limits
        .lines()
        .find(|l| l.starts_with("Max core file size"))
        .unwrap();
    assert!(core.split_whitespace().nth(4) == Some("0"), "{core}");
    if nix::unistd::geteuid().is_root() {
        assert!(line.contains("memory_locked=true"), "{line}");
        assert!(locked_kib > 0, "VmLck {locked_kib} kB");
    }
}

/// A PIN given in an environment variable is wiped from the daemon's environment once read
/// (`/proc/PID/environ` shows neither name nor value).
#[test]
fn the_pin_variable_is_wiped_from_the_environment() {
    let mut daemon = DevDaemon::start();
    assert!(daemon.stop().success());
    let pin = std::fs::read_to_string(daemon.dir().join("pin")).unwrap();
    let config = std::fs::read_to_string(daemon.config_path()).unwrap();
    std::fs::write(
        daemon.config_path(),
        config.replace("pin_file = \"pin\"", "pin_env = \"WRAPD_TEST_PIN\""),
    )
    .unwrap();
    daemon.set_env("WRAPD_TEST_PIN", pin.trim());
    daemon.restart_stopped();
    let environ = std::fs::read(format!("/proc/{}/environ", daemon.pid())).unwrap();
    let environ = String::from_utf8_lossy(&environ);
    assert!(
        !environ.contains(pin.trim()),
        "the PIN is still in the environment"
    );
    assert!(
        !environ.contains("WRAPD_TEST_PIN="),
        "the variable is still set"
    );
    assert!(
        environ.contains("PATH="),
        "the rest of the environment is intact"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn no_secret_reaches_the_log_at_trace_level() {
    let mut daemon = DevDaemon::start_with_env(&[("RUST_LOG", "trace")]);
    let mut keys = daemon.keys().await;
    let mut data = daemon.data().await;
    let key = create_key(&mut keys, "alias/logged").await;
    let other = create_key(&mut keys, "").await;
    let mut secrets: Vec<Vec<u8>> = Vec::new();

    let context = ctx(&[("tenant", "acme")]);
    let generated = data
        .generate_data_key(GenerateDataKeyRequest {
            key_id: "alias/logged".into(),
            encryption_context: context.clone(),
            number_of_bytes: 32,
        })
        .await
        .unwrap()
        .into_inner();
    secrets.push(generated.plaintext.clone());
    let caller_plaintext = b"caller-supplied secret 7f3a9c0e".to_vec();
    let wrapped = data
        .wrap(WrapRequest {
            key_id: key.key_id.clone(),
            plaintext: caller_plaintext.clone(),
            encryption_context: context.clone(),
        })
        .await
        .unwrap()
        .into_inner();
    secrets.push(caller_plaintext);
    for blob in [&generated.ciphertext_blob, &wrapped.ciphertext_blob] {
        data.unwrap(UnwrapRequest {
            ciphertext_blob: blob.clone(),
            encryption_context: context.clone(),
            key_id: String::new(),
        })
        .await
        .unwrap();
        let moved = data
            .re_wrap(ReWrapRequest {
                ciphertext_blob: blob.clone(),
                source_encryption_context: context.clone(),
                destination_key_id: other.key_id.clone(),
                destination_encryption_context: context.clone(),
            })
            .await
            .unwrap()
            .into_inner();
        data.unwrap(UnwrapRequest {
            ciphertext_blob: moved.ciphertext_blob,
            encryption_context: context.clone(),
            key_id: String::new(),
        })
        .await
        .unwrap();
    }
    // A failed unwrap, too.
    let mut bad = generated.ciphertext_blob.clone();
    bad[60] ^= 1;
    let _ = data
        .unwrap(UnwrapRequest {
            ciphertext_blob: bad,
            encryption_context: context.clone(),
            key_id: String::new(),
        })
        .await;
    drop((keys, data));
    assert!(daemon.stop().success());

    let log = daemon.log();
    // The check means something only if the log is really verbose.
    assert!(log.contains("TRACE"), "no trace output");
    assert!(
        log.contains("Unwrap") && log.contains("ReWrap"),
        "operations not logged"
    );
    for pin_file in ["pin", "so-pin"] {
        let pin = std::fs::read_to_string(daemon.dir().join(pin_file)).unwrap();
        secrets.push(pin.trim().as_bytes().to_vec());
    }
    for secret in &secrets {
        let forms = [
            hex::encode(secret),
            hex::encode_upper(secret),
            B64.encode(secret),
            String::from_utf8_lossy(secret).into_owned(),
            format!("{secret:?}"),
            format!("{:?}", &secret[..8]),
        ];
        for form in forms {
            if form.len() >= 8 {
                assert!(!log.contains(&form), "a secret reached the log as {form:?}");
            }
        }
    }
}
