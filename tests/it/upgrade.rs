//! Upgrades: a state directory made by an earlier release's `wrapd dev`
//! (`tests/fixtures/dev-8ce67bd`, made once by that release and kept) opens with this one
//! without a hand edit, and everything in it survives: its blobs unwrap, its aliases and
//! versions continue, its audit chain goes on from where that release left it. Every change
//! of config, policy, store schema or audit format is tested as an upgrade here.

use std::path::{Path, PathBuf};
use std::process::Command;

use base64::Engine;
use base64::engine::general_purpose::STANDARD;
use wrapd::proto::{KeyRef, UnwrapRequest};

use crate::common::{DevDaemon, ctx};

fn fixture() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures/dev-8ce67bd")
}

/// Copies the fixture (not its manifest) into `to`, with the modes git does not keep.
fn copy_fixture(from: &Path, to: &Path) {
    use std::os::unix::fs::PermissionsExt;
    for entry in std::fs::read_dir(from).unwrap() {
        let entry = entry.unwrap();
        let target = to.join(entry.file_name());
        if entry.file_type().unwrap().is_dir() {
            std::fs::create_dir_all(&target).unwrap();
            std::fs::set_permissions(&target, std::fs::Permissions::from_mode(0o700)).unwrap();
            copy_fixture(&entry.path(), &target);
        } else if entry.file_name() != "MANIFEST.toml" {
            std::fs::copy(entry.path(), &target).unwrap();
            std::fs::set_permissions(&target, std::fs::Permissions::from_mode(0o600)).unwrap();
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_state_directory_of_an_earlier_release_opens_and_everything_in_it_survives() {
    let manifest: toml::Table =
        toml::from_str(&std::fs::read_to_string(fixture().join("MANIFEST.toml")).unwrap()).unwrap();
    let dir = tempfile::Builder::new()
        .prefix("wrapd-upgrade-")
        .tempdir()
        .unwrap();
    copy_fixture(&fixture(), dir.path());
    let original_policy = std::fs::read_to_string(dir.path().join("policy.toml")).unwrap();
    // The audit chain's head was recorded under the log's absolute path where the fixture
    // was made: moved with the directory here, so that the anchor is checked too.
    let made_in = manifest["made_in"].as_str().unwrap();
    let store = rusqlite::Connection::open(dir.path().join("wrapd.db")).unwrap();
    let moved = store
        .execute(
            "UPDATE audit_heads SET chain = ?1 WHERE chain = ?2",
            [
                dir.path().join("audit.log").display().to_string(),
                format!("{made_in}/audit.log"),
            ],
        )
        .unwrap();
    assert_eq!(moved, 1);
    drop(store);
    // The fixture was made as root: its policy grants uid 0. Another user gets a grant of
    // its own (the migration of the generated grant is still what is tested).
    let uid = nix::unistd::getuid().as_raw();
    if uid != 0 {
        let mut policy = original_policy.clone();
        policy.push_str(&format!(
            "\n[[grant]]\nprincipals = [\"unix:uid={uid}\"]\noperations = [\"all\"]\nkeys = [\"*\"]\n"
        ));
        std::fs::write(dir.path().join("policy.toml"), &policy).unwrap();
    }
    let before = std::fs::read_to_string(dir.path().join("policy.toml")).unwrap();

    let mut daemon = DevDaemon::start_in(dir, &[], &[], &[]);

    // What `wrapd dev` generated was migrated, the old text kept beside it.
    let policy = std::fs::read_to_string(daemon.dir().join("policy.toml")).unwrap();
    assert!(
        policy.contains("\"tls:uri=spiffe://wrapd-dev/user/root\""),
        "{policy}"
    );
    let backup = std::fs::read_to_string(daemon.dir().join("policy.toml.bak")).unwrap();
    assert_eq!(backup, before);
    let config = std::fs::read_to_string(daemon.dir().join("wrapd.toml")).unwrap();
    assert!(config.contains("\n[aws]"), "the AWS KMS API was added");

    // Every blob of the earlier release unwraps, with its context.
    let context = ctx(&[("purpose", "upgrade")]);
    let mut data = daemon.data().await;
    for blob in manifest["blobs"].as_array().unwrap() {
        let unwrapped = data
            .unwrap(UnwrapRequest {
                ciphertext_blob: STANDARD
                    .decode(blob["ciphertext_blob"].as_str().unwrap())
                    .unwrap(),
                encryption_context: context.clone(),
                key_id: String::new(),
            })
            .await
            .unwrap()
            .into_inner();
        assert_eq!(
            unwrapped.plaintext,
            blob["plaintext"].as_str().unwrap().as_bytes()
        );
        assert_eq!(
            i64::from(unwrapped.key_version),
            blob["key_version"].as_integer().unwrap()
        );
    }
    // Its alias names its key, whose versions continue.
    let mut keys = daemon.keys().await;
    let alias = KeyRef {
        key_id: manifest["alias"].as_str().unwrap().to_owned(),
    };
    let described = keys.describe_key(alias.clone()).await.unwrap().into_inner();
    assert_eq!(described.key_id, manifest["key_id"].as_str().unwrap());
    let rotated = keys.rotate_key(alias).await.unwrap().into_inner();
    assert_eq!(rotated.current_version, 3);
    keys.describe_key(KeyRef {
        key_id: "alias/kubernetes".into(),
    })
    .await
    .unwrap();

    // The audit chain goes on from the earlier release's last line, and verifies whole.
    assert!(daemon.stop().success());
    let log = std::fs::read_to_string(daemon.dir().join("audit.log")).unwrap();
    let last_seq = manifest["audit_last_seq"].as_integer().unwrap();
    let first_new: serde_json::Value = serde_json::from_str(
        log.lines()
            .nth(usize::try_from(last_seq).unwrap())
            .expect("lines of this release"),
    )
    .unwrap();
    assert_eq!(first_new["seq"], last_seq + 1);
    assert_eq!(
        first_new["prev"],
        manifest["audit_last_hash"].as_str().unwrap()
    );
    let out = Command::new(env!("CARGO_BIN_EXE_wrapctl"))
        .args(["audit", "verify"])
        .arg(daemon.dir().join("audit.log"))
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(
        !daemon.log().contains("no chain head recorded"),
        "the anchor of the earlier release was checked"
    );
}

/// A hand-written policy of an earlier release: `wrapd config migrate` shows the diff, and
/// with `--write` rewrites it (the old file kept), after which it parses.
#[test]
fn config_migrate_rewrites_a_hand_written_policy_and_keeps_the_old_one() {
    let dir = tempfile::tempdir().unwrap();
    copy_fixture(&fixture(), dir.path());
    let policy = dir.path().join("policy.toml");
    let hand_written = std::fs::read_to_string(&policy).unwrap().replacen(
        "# Generated by `wrapd dev`.",
        "# Ours.",
        1,
    );
    std::fs::write(&policy, &hand_written).unwrap();
    let migrate = |write: bool| {
        let mut command = Command::new(env!("CARGO_BIN_EXE_wrapd"));
        command
            .args(["config", "migrate", "--config"])
            .arg(dir.path().join("wrapd.toml"));
        if write {
            command.arg("--write");
        }
        let out = command.output().unwrap();
        assert!(
            out.status.success(),
            "{}",
            String::from_utf8_lossy(&out.stderr)
        );
        String::from_utf8_lossy(&out.stdout).into_owned()
    };
    let shown = migrate(false);
    assert!(
        shown.contains("+principals = [\"unix:uid=0\", \"tls:uri=spiffe://wrapd-dev/user/root\"]"),
        "{shown}"
    );
    assert_eq!(std::fs::read_to_string(&policy).unwrap(), hand_written);
    migrate(true);
    let rewritten = std::fs::read_to_string(&policy).unwrap();
    wrapd::auth::Policy::parse(&rewritten).unwrap();
    assert!(rewritten.starts_with("# Ours."));
    assert_eq!(
        std::fs::read_to_string(dir.path().join("policy.toml.bak")).unwrap(),
        hand_written
    );
    assert!(migrate(false).contains("nothing to migrate"));
}
