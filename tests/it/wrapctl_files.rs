//! `wrapctl encrypt` / `wrapctl decrypt` against a real daemon: round trips under several
//! keys, required context, tampering and truncation leaving no output file, pipes.

use crate::common;

use std::io::Write;
use std::process::{Command, Stdio};

use common::{DevDaemon, create_key};
use wrapd::proto::KeyRef;

fn wrapctl(daemon: &DevDaemon, args: &[&str], stdin: Option<&[u8]>) -> (bool, Vec<u8>, String) {
    let mut child = Command::new(env!("CARGO_BIN_EXE_wrapctl"))
        .arg("--socket")
        .arg(&daemon.socket)
        .args(args)
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let mut pipe = child.stdin.take().unwrap();
    if let Some(bytes) = stdin {
        pipe.write_all(bytes).unwrap();
    }
    drop(pipe);
    let out = child.wait_with_output().unwrap();
    let stderr = String::from_utf8_lossy(&out.stderr).into_owned();
    assert!(!stderr.contains("panicked"), "{stderr}");
    (out.status.success(), out.stdout, stderr)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn encrypt_and_decrypt_files() {
    let daemon = DevDaemon::start();
    let mut keys = daemon.keys().await;
    create_key(&mut keys, "alias/files-a").await;
    create_key(&mut keys, "alias/files-b").await;
    let dir = tempfile::tempdir().unwrap();
    let plain = dir.path().join("plain.bin");
    let data: Vec<u8> = (0..1_000_003u32).map(|i| (i * 7 % 256) as u8).collect();
    std::fs::write(&plain, &data).unwrap();
    let sealed = dir.path().join("sealed.esdk");
    let s = |p: &std::path::Path| p.to_str().unwrap().to_owned();

    let (ok, _, err) = wrapctl(
        &daemon,
        &[
            "encrypt",
            "--key",
            "alias/files-a",
            "--key",
            "alias/files-b",
            "--context",
            "tenant=acme",
            "--input",
            &s(&plain),
            "--output",
            &s(&sealed),
        ],
        None,
    );
    assert!(ok, "{err}");
    let sealed_bytes = std::fs::read(&sealed).unwrap();
    assert!(sealed_bytes.len() > data.len());
    assert!(
        !sealed_bytes.windows(64).any(|w| w == &data[1000..1064]),
        "plaintext visible"
    );

    let back = dir.path().join("back.bin");
    let (ok, _, err) = wrapctl(
        &daemon,
        &[
            "decrypt",
            "--context",
            "tenant=acme",
            "--input",
            &s(&sealed),
            "--output",
            &s(&back),
        ],
        None,
    );
    assert!(ok, "{err}");
    assert_eq!(std::fs::read(&back).unwrap(), data);

    // Multi-keyring: with the first key disabled, the second key's entry still opens it.
    keys.disable_key(KeyRef {
        key_id: "alias/files-a".into(),
    })
    .await
    .unwrap();
    let again = dir.path().join("again.bin");
    let (ok, _, err) = wrapctl(
        &daemon,
        &["decrypt", "--input", &s(&sealed), "--output", &s(&again)],
        None,
    );
    assert!(ok, "{err}");
    assert_eq!(std::fs::read(&again).unwrap(), data);
    keys.enable_key(KeyRef {
        key_id: "alias/files-a".into(),
    })
    .await
    .unwrap();

    // A required context entry that the message lacks: refused, no output file.
    let refused = dir.path().join("refused.bin");
    let (ok, _, err) = wrapctl(
        &daemon,
        &[
            "decrypt",
            "--context",
            "tenant=other",
            "--input",
            &s(&sealed),
            "--output",
            &s(&refused),
        ],
        None,
    );
    assert!(!ok && err.contains("tenant=other"), "{err}");
    assert!(!refused.exists());

    // Tampered and truncated messages: refused, no output file, no temp file left.
    for (name, bytes) in [
        ("flipped", {
            let mut b = sealed_bytes.clone();
            let mid = b.len() / 2;
            b[mid] ^= 1;
            b
        }),
        (
            "truncated",
            sealed_bytes[..sealed_bytes.len() - 100].to_vec(),
        ),
        (
            "cut-at-frame",
            sealed_bytes[..sealed_bytes.len() / 3].to_vec(),
        ),
    ] {
        let bad = dir.path().join(format!("{name}.esdk"));
        std::fs::write(&bad, &bytes).unwrap();
        let out = dir.path().join(format!("{name}.out"));
        let (ok, _, err) = wrapctl(
            &daemon,
            &["decrypt", "--input", &s(&bad), "--output", &s(&out)],
            None,
        );
        assert!(!ok, "{name} decrypted");
        assert!(
            err.starts_with("wrapctl: error:") && err.lines().count() == 1,
            "{err}"
        );
        assert!(!out.exists(), "{name}: partial output left behind");
    }
    let leftovers: Vec<_> = std::fs::read_dir(dir.path())
        .unwrap()
        .filter_map(|e| e.ok())
        .filter(|e| e.file_name().to_string_lossy().contains("wrapctl-"))
        .collect();
    assert!(leftovers.is_empty(), "temporary files left: {leftovers:?}");

    // Pipes: stdin to stdout both ways.
    let (ok, piped, err) = wrapctl(
        &daemon,
        &[
            "encrypt",
            "--key",
            "alias/files-b",
            "--input",
            "-",
            "--output",
            "-",
        ],
        Some(b"through a pipe"),
    );
    assert!(ok, "{err}");
    let (ok, plain_out, err) = wrapctl(
        &daemon,
        &["decrypt", "--input", "-", "--output", "-"],
        Some(&piped),
    );
    assert!(ok, "{err}");
    assert_eq!(plain_out, b"through a pipe");
}

/// Both directions with the official AWS Encryption SDK (Python) and the example master-key
/// provider in examples/python, against the same daemon.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn interoperates_with_the_official_python_sdk_through_wrapd() {
    let daemon = DevDaemon::start();
    create_key(&mut daemon.keys().await, "alias/interop").await;
    let dir = tempfile::tempdir().unwrap();
    let s = |p: &std::path::Path| p.to_str().unwrap().to_owned();
    let script =
        std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/python/wrapd_roundtrip.py");
    let python = |args: &[&str]| {
        let out = Command::new("python3")
            .arg(&script)
            .args(args)
            .output()
            .unwrap();
        assert!(
            out.status.success(),
            "python: {}",
            String::from_utf8_lossy(&out.stderr)
        );
    };
    let data: Vec<u8> = (0..50_000u32).map(|i| (i % 253) as u8).collect();
    let plain = dir.path().join("plain");
    std::fs::write(&plain, &data).unwrap();

    // wrapctl encrypts, the official SDK decrypts (its provider calls wrapd's Unwrap).
    let sealed = dir.path().join("by-wrapctl.esdk");
    let (ok, _, err) = wrapctl(
        &daemon,
        &[
            "encrypt",
            "--key",
            "alias/interop",
            "--context",
            "tenant=acme",
            "--input",
            &s(&plain),
            "--output",
            &s(&sealed),
        ],
        None,
    );
    assert!(ok, "{err}");
    let opened = dir.path().join("opened-by-python");
    python(&["decrypt", &s(&daemon.socket), &s(&sealed), &s(&opened)]);
    assert_eq!(std::fs::read(&opened).unwrap(), data);

    // The official SDK encrypts (0x0478, and its default signed 0x0578), wrapctl decrypts.
    for suite in ["0478", "0578"] {
        let by_python = dir.path().join(format!("by-python-{suite}.esdk"));
        python(&[
            "encrypt",
            &s(&daemon.socket),
            "alias/interop",
            suite,
            &s(&plain),
            &s(&by_python),
        ]);
        let back = dir.path().join(format!("back-{suite}"));
        let (ok, _, err) = wrapctl(
            &daemon,
            &[
                "decrypt",
                "--context",
                "tenant=acme",
                "--input",
                &s(&by_python),
                "--output",
                &s(&back),
            ],
            None,
        );
        assert!(ok, "{suite}: {err}");
        assert_eq!(std::fs::read(&back).unwrap(), data);
    }
}

/// A decryption killed half-way leaves nothing in the output's directory: not even the
/// unauthenticated part of the plaintext under a temporary name.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_killed_decrypt_leaves_nothing_behind() {
    let daemon = DevDaemon::start();
    let mut keys = daemon.keys().await;
    create_key(&mut keys, "alias/killed").await;
    let dir = tempfile::tempdir().unwrap();
    let plain = dir.path().join("plain.bin");
    std::fs::write(&plain, vec![7u8; 4 << 20]).unwrap();
    let sealed = dir.path().join("sealed.esdk");
    let s = |p: &std::path::Path| p.to_str().unwrap().to_owned();
    let (ok, _, err) = wrapctl(
        &daemon,
        &[
            "encrypt",
            "--key",
            "alias/killed",
            "--input",
            &s(&plain),
            "--output",
            &s(&sealed),
        ],
        None,
    );
    assert!(ok, "{err}");
    let sealed = std::fs::read(&sealed).unwrap();
    let out_dir = tempfile::tempdir().unwrap();
    let output = out_dir.path().join("back.bin");
    let mut child = Command::new(env!("CARGO_BIN_EXE_wrapctl"))
        .arg("--socket")
        .arg(&daemon.socket)
        .args(["decrypt", "--input", "-", "--output", &s(&output)])
        .stdin(Stdio::piped())
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .unwrap();
    // Half the message, and the pipe kept open: wrapctl is mid-way, its output open.
    let mut pipe = child.stdin.take().unwrap();
    pipe.write_all(&sealed[..sealed.len() / 2]).unwrap();
    let fds = format!("/proc/{}/fd", child.id());
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(20);
    loop {
        let open_in_dir = std::fs::read_dir(&fds)
            .into_iter()
            .flatten()
            .flatten()
            .filter_map(|fd| std::fs::read_link(fd.path()).ok())
            .any(|target| target.starts_with(out_dir.path()));
        if open_in_dir {
            break;
        }
        assert!(
            std::time::Instant::now() < deadline,
            "wrapctl never opened its output"
        );
        std::thread::sleep(std::time::Duration::from_millis(20));
    }
    child.kill().unwrap();
    child.wait().unwrap();
    drop(pipe);
    let left: Vec<_> = std::fs::read_dir(out_dir.path())
        .unwrap()
        .map(|e| e.unwrap().file_name())
        .collect();
    assert!(left.is_empty(), "left behind: {left:?}");
}
