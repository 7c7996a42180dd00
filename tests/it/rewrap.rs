//! Re-wrapping stored Encryption SDK messages after a rotation (`wrapctl rewrap`) and the
//! census that shows which versions still protect data (`wrapctl census`): messages written
//! by the official SDK's CLI and by wrapctl move to the current version with every frame
//! byte unchanged, and the official SDK still reads them; signed and tampered messages are
//! refused and left as they were; a run killed mid-way leaves every file old or new.

use std::path::{Path, PathBuf};
use std::process::{Command, Output};
use std::time::{Duration, Instant};

use serde_json::Value;
use wrapd::client::keyring::{Keyring, WrapdKey};
use wrapd::client::message::{self, StoredHeader};
use wrapd::client::rewrap::blob_key_version;
use wrapd::context::EncryptionContext;
use wrapd::proto::KeyRef;

use crate::aws_kms_api::{aws_env, aws_ok};
use crate::common::DevDaemon;

fn wrapctl(daemon: &DevDaemon, args: &[&str]) -> Output {
    let out = Command::new(env!("CARGO_BIN_EXE_wrapctl"))
        .arg("--json")
        .arg("--socket")
        .arg(&daemon.socket)
        .args(args)
        .output()
        .unwrap();
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(!stderr.contains("panicked"), "wrapctl panicked: {stderr}");
    out
}

fn json(out: &Output) -> Value {
    serde_json::from_slice(&out.stdout).unwrap_or_else(|e| panic!("{e}: {out:?}"))
}

fn s(path: &Path) -> &str {
    path.to_str().unwrap()
}

/// The official SDK's CLI (`aws-encryption-cli`) on wrapd's AWS KMS API; `signed` picks
/// its default suite (0x0578), else the unsigned committing one (0x0478).
fn official_cli(
    daemon: &DevDaemon,
    arn: &str,
    mode: &str,
    input: &Path,
    output: &Path,
    signed: bool,
) {
    let mut command = Command::new("aws-encryption-cli");
    aws_env(daemon, &mut command);
    command
        .args([mode, "--input", s(input), "--output", s(output)])
        .args(["--wrapping-keys", &format!("key={arn}")])
        .args(["--metadata-output", "/dev/null"])
        .args(["--commitment-policy", "require-encrypt-require-decrypt"]);
    if mode == "--encrypt" {
        command.args(["--encryption-context", "tenant=acme"]);
        if !signed {
            command.args(["--algorithm", "AES_256_GCM_HKDF_SHA512_COMMIT_KEY"]);
        }
    }
    let out = command
        .output()
        .expect("aws-encryption-cli (softhsm-config/install-deps.sh installs it)");
    assert!(
        out.status.success(),
        "aws-encryption-cli {mode}: {}",
        String::from_utf8_lossy(&out.stderr)
    );
}

fn header(path: &Path) -> StoredHeader {
    StoredHeader::read(&mut std::fs::File::open(path).unwrap(), 10).unwrap()
}

/// The key versions a message's data keys are under.
fn versions(path: &Path) -> Vec<u32> {
    header(path)
        .header
        .data_keys
        .iter()
        .filter_map(|e| blob_key_version(&e.ciphertext))
        .map(|v| v.version)
        .collect()
}

/// Everything after the header.
fn frames(path: &Path) -> Vec<u8> {
    let bytes = std::fs::read(path).unwrap();
    bytes[header(path).len()..].to_vec()
}

fn census(daemon: &DevDaemon, path: &Path) -> Value {
    let out = wrapctl(daemon, &["census", s(path)]);
    assert!(out.status.success(), "{out:?}");
    json(&out)
}

/// `(key, version, objects)` of each census row.
fn census_rows(census: &Value) -> Vec<(String, u64, u64)> {
    census["versions"]
        .as_array()
        .unwrap()
        .iter()
        .map(|r| {
            (
                r["key_id"].as_str().unwrap().to_owned(),
                r["version"].as_u64().unwrap(),
                r["objects"].as_u64().unwrap(),
            )
        })
        .collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn rewrap_moves_messages_to_the_current_version_frames_unchanged_and_the_official_sdk_reads_them()
 {
    let daemon = DevDaemon::start();
    let arn = aws_ok(&daemon, &["create-key", "--description", "rewrap"])["KeyMetadata"]["Arn"]
        .as_str()
        .unwrap()
        .to_owned();
    // The ARN's `key/UUID` as the gRPC API and the census write it, `key/HEX`.
    let key_id = wrapd::ids::KeyId::parse_named(arn.rsplit_once(':').unwrap().1)
        .unwrap()
        .to_string();
    let store = daemon.dir().join("store");
    std::fs::create_dir_all(store.join("a")).unwrap();
    std::fs::create_dir_all(store.join("b/c")).unwrap();
    let plain = daemon.dir().join("plain.bin");
    let data: Vec<u8> = (0..300_000u32).map(|i| (i * 13 % 251) as u8).collect();
    std::fs::write(&plain, &data).unwrap();

    // The official CLI (unsigned and signed), wrapctl by ARN (aws-kms entries) and by key
    // id (wrapd entries), a tampered copy, and a file that is no message.
    let one = store.join("a/one.enc");
    let two = store.join("b/c/two.enc");
    let signed = store.join("b/signed.enc");
    let three = store.join("three.enc");
    let four = store.join("four.enc");
    let tampered = store.join("a/tampered.enc");
    official_cli(&daemon, &arn, "--encrypt", &plain, &one, false);
    official_cli(&daemon, &arn, "--encrypt", &plain, &two, false);
    official_cli(&daemon, &arn, "--encrypt", &plain, &signed, true);
    for (target, key) in [(&three, &arn), (&four, &key_id)] {
        let out = wrapctl(
            &daemon,
            &[
                "encrypt",
                "--key",
                key,
                "--context",
                "tenant=acme",
                "--input",
                s(&plain),
                "--output",
                s(target),
            ],
        );
        assert!(out.status.success(), "{out:?}");
    }
    // Another key's message, which its rotation does not concern.
    let other_key = json(&wrapctl(
        &daemon,
        &["keys", "create", "--description", "other"],
    ))["key_id"]
        .as_str()
        .unwrap()
        .to_owned();
    let other = store.join("b/other.enc");
    let out = wrapctl(
        &daemon,
        &[
            "encrypt",
            "--key",
            &other_key,
            "--input",
            s(&plain),
            "--output",
            s(&other),
        ],
    );
    assert!(out.status.success(), "{out:?}");
    let mut bytes = std::fs::read(&one).unwrap();
    // The context's value ("acme", after the fixed fields, the entry count and the key).
    bytes[49] ^= 1;
    std::fs::write(&tampered, &bytes).unwrap();
    std::fs::write(store.join("notes.txt"), b"not a message").unwrap();
    let messages = [&one, &two, &three, &four];

    let before = census(&daemon, &store);
    let mut expected = vec![(key_id.clone(), 1, 6), (other_key.clone(), 1, 1)];
    expected.sort();
    assert_eq!(census_rows(&before), expected, "{before}");
    assert_eq!(before["unrecognized"]["objects"], 1);

    daemon
        .keys()
        .await
        .rotate_key(KeyRef {
            key_id: key_id.clone(),
        })
        .await
        .unwrap();
    let originals: Vec<Vec<u8>> = messages.iter().map(|m| std::fs::read(m).unwrap()).collect();
    // The service that owns a file must still read it: its owner, group and mode are kept.
    use std::os::unix::fs::{MetadataExt, PermissionsExt};
    std::fs::set_permissions(&two, std::fs::Permissions::from_mode(0o640)).unwrap();
    // Giving a file to another user needs root (as CI runs); elsewhere only the mode counts.
    let as_root = std::os::unix::fs::chown(&two, Some(4242), Some(4343)).is_ok();

    // A dry run changes nothing and says what it would do.
    let dry = wrapctl(&daemon, &["rewrap", "--dry-run", s(&store)]);
    assert!(
        !dry.status.success(),
        "the signed message cannot be re-wrapped"
    );
    let report = json(&dry);
    assert_eq!(report["summary"]["would-rewrap"], 5, "{report}");
    for (m, original) in messages.iter().zip(&originals) {
        assert_eq!(&std::fs::read(m).unwrap(), original);
    }

    let run = wrapctl(&daemon, &["rewrap", s(&store)]);
    assert!(!run.status.success());
    let stderr = String::from_utf8_lossy(&run.stderr);
    assert!(
        stderr.contains("signed.enc") && stderr.contains("signed message"),
        "{stderr}"
    );
    assert!(stderr.contains("tampered.enc"), "{stderr}");
    let report = json(&run);
    assert_eq!(report["summary"]["rewrapped"], 4, "{report}");
    assert_eq!(report["summary"]["up-to-date"], 1, "{report}");
    assert_eq!(report["summary"]["failed"], 2, "{report}");
    assert_eq!(report["summary"]["skipped"], 1, "{report}");

    for (m, original) in messages.iter().zip(&originals) {
        assert_eq!(versions(m), vec![2], "{}", m.display());
        let old_frames = &original[StoredHeader::read(&mut &original[..], 10).unwrap().len()..];
        assert_eq!(frames(m), old_frames, "frames of {} unchanged", m.display());
    }
    assert_eq!(versions(&signed), vec![1], "left as it was");
    let meta = std::fs::metadata(&two).unwrap();
    assert_eq!(meta.mode() & 0o7777, 0o640);
    if as_root {
        assert_eq!((meta.uid(), meta.gid()), (4242, 4343));
    }
    assert_eq!(std::fs::read(&tampered).unwrap(), bytes, "left as it was");

    // The official SDK reads what it wrote (and what wrapctl wrote by ARN), re-wrapped.
    for m in [&one, &two, &three] {
        let out = daemon.dir().join("official.dec");
        official_cli(&daemon, &arn, "--decrypt", m, &out, false);
        assert_eq!(std::fs::read(&out).unwrap(), data, "{}", m.display());
    }
    // Version 1 retired: everything re-wrapped still decrypts.
    let out = wrapctl(&daemon, &["keys", "retire-version", &key_id, "1"]);
    assert!(out.status.success(), "{out:?}");
    let dec = daemon.dir().join("wrapctl.dec");
    let out = wrapctl(
        &daemon,
        &["decrypt", "--input", s(&four), "--output", s(&dec)],
    );
    assert!(out.status.success(), "{out:?}");
    assert_eq!(std::fs::read(&dec).unwrap(), data);

    // The census shows what is left on version 1; a second run finds the rest up to date.
    let after = census(&daemon, &store);
    let mut expected = vec![
        (key_id.clone(), 1, 2),
        (key_id.clone(), 2, 4),
        (other_key.clone(), 1, 1),
    ];
    expected.sort();
    assert_eq!(census_rows(&after), expected, "{after}");
    let again = json(&wrapctl(&daemon, &["rewrap", s(&store)]));
    assert_eq!(again["summary"]["up-to-date"], 5, "{again}");
}

/// Messages made with the client library: `count` files in `dir`, all under `key`.
async fn messages(daemon: &DevDaemon, key: &str, dir: &Path, count: usize) -> Vec<PathBuf> {
    let keyring = Keyring::new(vec![WrapdKey {
        client: daemon.data().await,
        key_id: key.to_owned(),
    }])
    .unwrap();
    let context = EncryptionContext::from_entries([("batch".to_owned(), "1".to_owned())]).unwrap();
    let mut paths = Vec::new();
    for i in 0..count {
        let data_key = keyring.generate(&context).await.unwrap();
        let body = format!("message {i}").repeat(100);
        let message = message::encrypt(
            body.as_bytes(),
            &data_key.dek,
            &context,
            data_key.data_keys,
            4096,
        )
        .unwrap();
        let path = dir.join(format!("m{i:03}.enc"));
        std::fs::write(&path, message).unwrap();
        paths.push(path);
    }
    paths
}

/// Decrypts a message with the daemon's keys.
async fn open(daemon: &DevDaemon, path: &Path) -> Vec<u8> {
    let keyring = Keyring::for_decryption(vec![daemon.data().await]).unwrap();
    let bytes = std::fs::read(path).unwrap();
    let header = message::peek_header(&bytes).unwrap();
    let dek = keyring.unwrap(&header).await.unwrap();
    let (_, plaintext) = message::decrypt(&bytes, |_| Ok(dek)).unwrap();
    plaintext.to_vec()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_rewrap_killed_mid_run_leaves_every_file_old_or_new_and_a_rerun_finishes() {
    // Every token call slowed down, so that the run is still going when it is killed.
    let daemon = DevDaemon::start_with_env(&[("WRAPD_FAULT_STALL_MS", "15")]);
    let dir = daemon.dir().join("batch");
    std::fs::create_dir_all(&dir).unwrap();
    let key = daemon
        .keys()
        .await
        .create_key(wrapd::proto::CreateKeyRequest {
            description: "batch".into(),
            ..Default::default()
        })
        .await
        .unwrap()
        .into_inner()
        .key_id;
    let files = messages(&daemon, &key, &dir, 60).await;
    let mut contents = Vec::new();
    for f in &files {
        contents.push(open(&daemon, f).await);
    }
    daemon
        .keys()
        .await
        .rotate_key(KeyRef {
            key_id: key.clone(),
        })
        .await
        .unwrap();

    let mut child = Command::new(env!("CARGO_BIN_EXE_wrapctl"))
        .arg("--socket")
        .arg(&daemon.socket)
        .args(["rewrap", s(&dir)])
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::null())
        .spawn()
        .unwrap();
    let deadline = Instant::now() + Duration::from_secs(60);
    while !files.iter().any(|f| versions(f) == vec![2]) {
        assert!(Instant::now() < deadline, "no file was re-wrapped");
        std::thread::sleep(Duration::from_millis(5));
    }
    child.kill().unwrap(); // SIGKILL
    child.wait().unwrap();

    let moved = files.iter().filter(|f| versions(f) == vec![2]).count();
    assert!(
        moved < files.len(),
        "killed mid-run ({moved} of {})",
        files.len()
    );
    for (f, content) in files.iter().zip(&contents) {
        assert_eq!(
            &open(&daemon, f).await,
            content,
            "{} is old or new",
            f.display()
        );
    }
    let names: Vec<String> = std::fs::read_dir(&dir)
        .unwrap()
        .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
        .collect();
    assert_eq!(
        names.len(),
        files.len(),
        "no temporary file left: {names:?}"
    );

    let rerun = wrapctl(&daemon, &["rewrap", s(&dir)]);
    assert!(rerun.status.success(), "{rerun:?}");
    let report = json(&rerun);
    assert_eq!(report["summary"]["up-to-date"], moved as u64, "{report}");
    assert_eq!(
        report["summary"]["rewrapped"],
        (files.len() - moved) as u64,
        "{report}"
    );
    for (f, content) in files.iter().zip(&contents) {
        assert_eq!(versions(f), vec![2]);
        assert_eq!(&open(&daemon, f).await, content);
    }
}

/// A keyring of one key on `daemon`.
async fn ring(daemon: &DevDaemon, key: &str) -> Keyring {
    Keyring::new(vec![WrapdKey {
        client: daemon.data().await,
        key_id: key.to_owned(),
    }])
    .unwrap()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn moving_to_another_key_needs_its_source_named_and_never_moves_a_planted_data_key() {
    let daemon = DevDaemon::start();
    let mut keys = daemon.keys().await;
    let mut create = async |description: &str| {
        keys.create_key(wrapd::proto::CreateKeyRequest {
            description: description.into(),
            ..Default::default()
        })
        .await
        .unwrap()
        .into_inner()
        .key_id
    };
    let (own, other, target) = (
        create("own").await,
        create("other").await,
        create("target").await,
    );
    let context = EncryptionContext::from_entries([("app".to_owned(), "x".to_owned())]).unwrap();
    // A message under `own`, with an entry planted after its own: another key's data key
    // (under the same context), which whoever runs the re-wrap may unwrap and the planter
    // may not.
    let mine = ring(&daemon, &own).await.generate(&context).await.unwrap();
    let planted = ring(&daemon, &other)
        .await
        .generate(&context)
        .await
        .unwrap();
    let mut entries = mine.data_keys.clone();
    entries.extend(planted.data_keys.clone());
    let dir = daemon.dir().join("planted");
    std::fs::create_dir_all(&dir).unwrap();
    let path = dir.join("planted.enc");
    std::fs::write(
        &path,
        message::encrypt(b"data", &mine.dek, &context, entries, 4096).unwrap(),
    )
    .unwrap();
    let original = std::fs::read(&path).unwrap();

    let out = wrapctl(&daemon, &["rewrap", "--to", &target, s(&path)]);
    assert_eq!(out.status.code(), Some(2), "--to without --from: {out:?}");
    let out = wrapctl(
        &daemon,
        &["rewrap", "--from", &other, "--to", &target, s(&path)],
    );
    assert!(!out.status.success(), "{out:?}");
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(stderr.contains("do not all hold its data key"), "{stderr}");
    assert_eq!(std::fs::read(&path).unwrap(), original, "left as it was");

    // A message of its own: `--from own --to target` moves it, and it opens under target.
    let honest = dir.join("honest.enc");
    let data_key = ring(&daemon, &own).await.generate(&context).await.unwrap();
    std::fs::write(
        &honest,
        message::encrypt(b"data", &data_key.dek, &context, data_key.data_keys, 4096).unwrap(),
    )
    .unwrap();
    let out = wrapctl(
        &daemon,
        &["rewrap", "--from", &own, "--to", &target, s(&honest)],
    );
    assert!(out.status.success(), "{out:?}");
    let moved = header(&honest);
    assert_eq!(
        blob_key_version(&moved.header.data_keys[0].ciphertext)
            .unwrap()
            .key_id,
        target
    );
    assert_eq!(open(&daemon, &honest).await, b"data");
}

#[test]
fn a_census_that_cannot_read_everything_says_so_and_fails() {
    let daemon = DevDaemon::start();
    let store = daemon.dir().join("census");
    std::fs::create_dir_all(store.join("real")).unwrap();
    std::fs::write(store.join("real/notes.txt"), b"junk").unwrap();
    std::os::unix::fs::symlink(store.join("real"), store.join("link")).unwrap();
    // A link inside the tree is not followed, and said so: the census is incomplete.
    let out = wrapctl(&daemon, &["census", s(&store)]);
    assert!(!out.status.success(), "{out:?}");
    let report = json(&out);
    assert_eq!(
        report["errors"][0]["object"],
        s(&store.join("link")),
        "{report}"
    );
    assert!(String::from_utf8_lossy(&out.stderr).contains("incomplete"));
    // Named on the command line, a link is followed.
    let out = wrapctl(&daemon, &["census", s(&store.join("link"))]);
    assert!(out.status.success(), "{out:?}");
    assert_eq!(json(&out)["unrecognized"]["objects"], 1);
}
