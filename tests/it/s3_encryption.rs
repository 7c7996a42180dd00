//! S3 client-side encryption against the official S3 Encryption Client V2 (Ruby, Debian's
//! `ruby-aws-sdk-s3`, its KMS client on wrapd's AWS KMS API) and a local S3 server (moto in
//! server mode, from PyPI): objects each writes open with the other, in both envelope
//! placements, empty and multipart; tampering and a wrong context fail with no output file.

use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use serde_json::Value;

use crate::common::DevDaemon;

/// A moto S3 server on a free loopback port, stopped on drop.
struct LocalS3 {
    child: Child,
    url: String,
}

impl LocalS3 {
    fn start() -> Self {
        let port = std::net::TcpListener::bind("127.0.0.1:0")
            .unwrap()
            .local_addr()
            .unwrap()
            .port();
        let child = Command::new("python3")
            .args([
                "-m",
                "moto.server",
                "-H",
                "127.0.0.1",
                "-p",
                &port.to_string(),
            ])
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .expect("python3 -m moto.server (softhsm-config/install-deps.sh installs moto)");
        let deadline = Instant::now() + Duration::from_secs(30);
        while std::net::TcpStream::connect(("127.0.0.1", port)).is_err() {
            assert!(Instant::now() < deadline, "moto did not start");
            std::thread::sleep(Duration::from_millis(100));
        }
        Self {
            child,
            url: format!("http://127.0.0.1:{port}"),
        }
    }

    /// `aws s3api ARGS` against this server (dummy credentials), JSON out.
    fn s3api(&self, args: &[&str]) -> Value {
        let mut command = Command::new("/usr/bin/aws");
        s3_env(&mut command);
        let out = command
            .args(["s3api", "--endpoint-url", &self.url, "--output", "json"])
            .args(args)
            .output()
            .unwrap();
        assert!(
            out.status.success(),
            "aws s3api {args:?}: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        serde_json::from_slice(&out.stdout).unwrap_or(Value::Null)
    }

    fn bucket(&self, name: &str) {
        self.s3api(&["create-bucket", "--bucket", name]);
    }
}

impl Drop for LocalS3 {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// S3 credentials for the local server, and nothing from the machine's AWS setup.
fn s3_env(command: &mut Command) {
    for var in [
        "AWS_PROFILE",
        "AWS_SESSION_TOKEN",
        "AWS_ENDPOINT_URL",
        "AWS_CA_BUNDLE",
    ] {
        command.env_remove(var);
    }
    command
        .env("AWS_ACCESS_KEY_ID", "test")
        .env("AWS_SECRET_ACCESS_KEY", "test")
        .env("AWS_DEFAULT_REGION", "us-east-1")
        .env("AWS_CONFIG_FILE", "/dev/null")
        .env("AWS_SHARED_CREDENTIALS_FILE", "/dev/null")
        .env("AWS_EC2_METADATA_DISABLED", "true");
}

struct Setup {
    daemon: DevDaemon,
    s3: LocalS3,
    arn: String,
    dir: PathBuf,
}

fn setup() -> Setup {
    setup_with_env(&[])
}

fn setup_with_env(env: &[(&str, &str)]) -> Setup {
    let daemon = DevDaemon::start_with_env(env);
    let s3 = LocalS3::start();
    s3.bucket("objects");
    let dir = daemon.dir().join("s3");
    std::fs::create_dir_all(&dir).unwrap();
    let created = crate::aws_kms_api::aws_ok(&daemon, &["create-key", "--description", "s3"]);
    let arn = created["KeyMetadata"]["Arn"].as_str().unwrap().to_owned();
    Setup {
        daemon,
        s3,
        arn,
        dir,
    }
}

impl Setup {
    fn path(&self, name: &str) -> PathBuf {
        self.dir.join(name)
    }

    fn wrapctl(&self, args: &[&str]) -> Result<Value, String> {
        let mut command = Command::new(env!("CARGO_BIN_EXE_wrapctl"));
        s3_env(&mut command);
        let out = command
            .arg("--json")
            .arg("--socket")
            .arg(&self.daemon.socket)
            .args(args)
            .args(["--s3-endpoint", &self.s3.url])
            .output()
            .unwrap();
        let stderr = String::from_utf8_lossy(&out.stderr).into_owned();
        assert!(!stderr.contains("panicked"), "wrapctl panicked: {stderr}");
        if out.status.success() {
            Ok(serde_json::from_slice(&out.stdout).expect("JSON output"))
        } else {
            Err(stderr)
        }
    }

    fn put(&self, file: &Path, key: &str, extra: &[&str]) -> Value {
        let url = format!("s3://objects/{key}");
        let mut args = vec![
            "s3",
            "put",
            file.to_str().unwrap(),
            &url,
            "--key",
            &self.arn,
        ];
        args.extend_from_slice(extra);
        self.wrapctl(&args)
            .unwrap_or_else(|e| panic!("wrapctl s3 put {key}: {e}"))
    }

    fn get(&self, key: &str, file: &Path, extra: &[&str]) -> Result<Value, String> {
        let url = format!("s3://objects/{key}");
        let mut args = vec!["s3", "get", &url, file.to_str().unwrap()];
        args.extend_from_slice(extra);
        self.wrapctl(&args)
    }

    /// Runs an official client's script (`tests/ruby/`, `tests/python/`) with
    /// `MODE BUCKET KEY FILE CONTEXT_JSON LAST`; the script finds the local S3 server, wrapd's
    /// AWS KMS API and its CA, the dev AWS profile and the key in its environment.
    fn official_client(&self, mut command: Command, script: &str, args: [&str; 4], last: &str) {
        let dev = self.daemon.dir();
        let [mode, key, file, context] = args;
        let out = command
            .arg(
                Path::new(env!("CARGO_MANIFEST_DIR"))
                    .join("tests")
                    .join(script),
            )
            .args([mode, "objects", key, file, context, last])
            .env("S3_URL", &self.s3.url)
            .env("WRAPD_AWS_URL", &self.daemon.aws)
            .env("WRAPD_CA", dev.join("pki/ca.pem"))
            .env("WRAPD_AWS_CREDENTIALS", dev.join("aws/credentials"))
            .env("KEY_ARN", &self.arn)
            .output()
            .unwrap_or_else(|e| {
                panic!("{script} (softhsm-config/install-deps.sh installs it): {e}")
            });
        assert!(
            out.status.success(),
            "{script} {mode} {key} {last}: {}\ndaemon log:\n{}",
            String::from_utf8_lossy(&out.stderr),
            self.daemon.log()
        );
    }

    /// The official Ruby client (V2): `put` or `get` one object, envelope in `placement`.
    fn ruby(&self, mode: &str, key: &str, file: &Path, context: &str, placement: &str) {
        let mut command = Command::new("/usr/bin/ruby");
        s3_env(&mut command);
        let file = file.to_str().unwrap();
        self.official_client(
            command,
            "ruby/s3ec_v2.rb",
            [mode, key, file, context],
            placement,
        );
    }
}

/// Content of `len` bytes that is not all one value.
fn content(len: usize) -> Vec<u8> {
    (0..len).map(|i| (i * 7 % 251) as u8).collect()
}

const BIG: usize = 12 * 1024 * 1024 + 123;

#[test]
fn objects_the_official_ruby_client_writes_open_with_wrapctl_s3_get() {
    let s = setup();
    let cases: [(&str, usize, &str, &str, &[&str]); 4] = [
        (
            "ruby-meta",
            1000,
            r#"{"tenant":"acme"}"#,
            "metadata",
            &["--context", "tenant=acme"],
        ),
        ("ruby-instr", 5000, "{}", "instruction_file", &[]),
        ("ruby-empty", 0, "{}", "metadata", &[]),
        (
            "ruby-big",
            BIG,
            r#"{"a":"b"}"#,
            "metadata",
            &["--context", "a=b"],
        ),
    ];
    for (key, len, context, placement, args) in cases {
        let input = s.path(&format!("{key}.in"));
        std::fs::write(&input, content(len)).unwrap();
        s.ruby("put", key, &input, context, placement);
        let output = s.path(&format!("{key}.out"));
        let got = s
            .get(key, &output, args)
            .unwrap_or_else(|e| panic!("{key}: {e}"));
        assert_eq!(got["bytes"], len as u64);
        let expected_placement = if placement == "metadata" {
            "metadata"
        } else {
            "instruction-file"
        };
        assert_eq!(got["envelope"], expected_placement);
        assert_eq!(std::fs::read(&output).unwrap(), content(len), "{key}");
    }
}

#[test]
fn objects_wrapctl_s3_put_writes_open_with_the_official_ruby_client() {
    let s = setup();
    let cases: [(&str, usize, &[&str], &str); 4] = [
        (
            "ctl-meta",
            1000,
            &["--context", "tenant=acme"],
            r#"{"tenant":"acme"}"#,
        ),
        ("ctl-instr", 5000, &["--instruction-file"], "{}"),
        ("ctl-empty", 0, &[], "{}"),
        (
            "ctl-multipart",
            BIG,
            &["--multipart-threshold-mib", "5", "--part-size-mib", "5"],
            "{}",
        ),
    ];
    for (key, len, args, context) in cases {
        let input = s.path(&format!("{key}.in"));
        std::fs::write(&input, content(len)).unwrap();
        let put = s.put(&input, key, args);
        if key == "ctl-multipart" {
            assert_eq!(put["parts"], 3, "12 MiB in 5 MiB parts");
        }
        let output = s.path(&format!("{key}.out"));
        s.ruby("get", key, &output, context, "metadata");
        assert_eq!(std::fs::read(&output).unwrap(), content(len), "{key}");
    }
    // The metadata the official clients expect, and a blob far under S3's 2 KB.
    let head =
        s.s3.s3api(&["head-object", "--bucket", "objects", "--key", "ctl-meta"]);
    let meta = &head["Metadata"];
    assert_eq!(meta["x-amz-cek-alg"], "AES/GCM/NoPadding");
    assert_eq!(meta["x-amz-wrap-alg"], "kms+context");
    assert_eq!(meta["x-amz-tag-len"], "128");
    assert_eq!(meta["x-amz-unencrypted-content-length"], "1000");
    let matdesc: Value = serde_json::from_str(meta["x-amz-matdesc"].as_str().unwrap()).unwrap();
    assert_eq!(
        matdesc,
        serde_json::json!({"aws:x-amz-cek-alg": "AES/GCM/NoPadding", "tenant": "acme"})
    );
    let total: usize = meta
        .as_object()
        .unwrap()
        .iter()
        .map(|(k, v)| k.len() + v.as_str().unwrap().len())
        .sum();
    assert!(total < 1024, "metadata is {total} bytes");
}

/// Replaces an object's body and metadata (as an attacker with write access could).
fn rewrite(s: &Setup, key: &str, body: &[u8], metadata: &Value) {
    let file = s.path("rewrite.bin");
    std::fs::write(&file, body).unwrap();
    s.s3.s3api(&[
        "put-object",
        "--bucket",
        "objects",
        "--key",
        key,
        "--body",
        file.to_str().unwrap(),
        "--metadata",
        &metadata.to_string(),
    ]);
}

#[test]
fn tampered_objects_and_a_wrong_context_fail_and_leave_no_output_file() {
    let s = setup();
    let input = s.path("victim.in");
    std::fs::write(&input, content(4096)).unwrap();
    s.put(&input, "victim", &["--context", "tenant=acme"]);
    let original = s.path("victim.enc");
    s.s3.s3api(&[
        "get-object",
        "--bucket",
        "objects",
        "--key",
        "victim",
        original.to_str().unwrap(),
    ]);
    let body = std::fs::read(&original).unwrap();
    let meta =
        s.s3.s3api(&["head-object", "--bucket", "objects", "--key", "victim"])["Metadata"].clone();
    let context = ["--context", "tenant=acme"];

    let mut flipped = body.clone();
    flipped[100] ^= 1;
    let mut other_matdesc = meta.clone();
    other_matdesc["x-amz-matdesc"] =
        Value::from(r#"{"aws:x-amz-cek-alg":"AES/GCM/NoPadding","tenant":"evil"}"#);
    let mut other_iv = meta.clone();
    other_iv["x-amz-iv"] = Value::from("AAAAAAAAAAAAAAAA");
    let cases: [(&str, Vec<u8>, Value, &[&str]); 5] = [
        ("a changed body byte", flipped, meta.clone(), &context),
        (
            "a truncated body",
            body[..body.len() - 5].to_vec(),
            meta.clone(),
            &context,
        ),
        (
            "a changed x-amz-matdesc",
            body.clone(),
            other_matdesc,
            &["--context", "tenant=evil"],
        ),
        ("a changed x-amz-iv", body.clone(), other_iv, &context),
        (
            "a wrong --context",
            body.clone(),
            meta.clone(),
            &["--context", "tenant=other"],
        ),
    ];
    for (what, body, metadata, args) in cases {
        rewrite(&s, "victim", &body, &metadata);
        let output = s.path("victim.out");
        let err = s.get("victim", &output, args).unwrap_err();
        assert!(!output.exists(), "{what}: no output file");
        assert!(
            err.contains("ciphertext is invalid") || err.contains("context does not match"),
            "{what}: {err}"
        );
        let leftovers: Vec<_> = std::fs::read_dir(&s.dir)
            .unwrap()
            .filter_map(|e| e.ok())
            .filter(|e| e.file_name().to_string_lossy().contains(".wrapctl-"))
            .collect();
        assert!(leftovers.is_empty(), "{what}: no temporary file left");
    }
    // The original still opens.
    rewrite(&s, "victim", &body, &meta);
    let output = s.path("victim.out");
    s.get("victim", &output, &context).unwrap();
    assert_eq!(std::fs::read(&output).unwrap(), content(4096));
}

/// A TCP proxy in front of the local S3 server that records every byte clients send, to
/// check the SSE-C headers on the wire (moto accepts SSE-C requests but does not encrypt).
struct Recorder {
    url: String,
    sent: std::sync::Arc<std::sync::Mutex<Vec<u8>>>,
}

impl Recorder {
    fn start(upstream: &str) -> Self {
        use std::io::{Read, Write};
        let upstream = upstream.trim_start_matches("http://").to_owned();
        let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        let url = format!("http://{}", listener.local_addr().unwrap());
        let sent = std::sync::Arc::new(std::sync::Mutex::new(Vec::new()));
        let record = sent.clone();
        std::thread::spawn(move || {
            for client in listener.incoming().flatten() {
                let Ok(server) = std::net::TcpStream::connect(&upstream) else {
                    continue;
                };
                let (mut from_server, mut to_client) =
                    (server.try_clone().unwrap(), client.try_clone().unwrap());
                std::thread::spawn(move || {
                    let _ = std::io::copy(&mut from_server, &mut to_client);
                });
                let record = record.clone();
                std::thread::spawn(move || {
                    let (mut client, mut server) = (client, server);
                    let mut buf = [0u8; 64 * 1024];
                    while let Ok(n) = client.read(&mut buf) {
                        if n == 0 || server.write_all(&buf[..n]).is_err() {
                            break;
                        }
                        record.lock().unwrap().extend_from_slice(&buf[..n]);
                    }
                    let _ = server.shutdown(std::net::Shutdown::Write);
                });
            }
        });
        Self { url, sent }
    }

    /// The headers (lower-cased names) of each recorded request whose request line starts
    /// with `start`.
    fn requests(&self, start: &str) -> Vec<HashMap<String, String>> {
        let sent = self.sent.lock().unwrap();
        let text = String::from_utf8_lossy(&sent);
        text.match_indices(start)
            .map(|(at, _)| {
                text[at..]
                    .split("\r\n")
                    .skip(1)
                    .take_while(|l| !l.is_empty())
                    .filter_map(|l| l.split_once(':'))
                    .map(|(k, v)| (k.trim().to_ascii_lowercase(), v.trim().to_owned()))
                    .collect()
            })
            .collect()
    }
}

#[tokio::test]
async fn sse_c_sends_a_fresh_data_key_from_wrapd_and_stores_only_its_wrapped_form() {
    use base64::Engine;
    use md5::Digest;
    let b64 = base64::engine::general_purpose::STANDARD;
    let s = tokio::task::spawn_blocking(setup).await.unwrap();
    let recorder = Recorder::start(&s.s3.url);
    let input = s.path("ssec.in");
    std::fs::write(&input, content(3000)).unwrap();
    let run = |args: Vec<String>| {
        let mut command = Command::new(env!("CARGO_BIN_EXE_wrapctl"));
        s3_env(&mut command);
        let out = command
            .arg("--json")
            .arg("--socket")
            .arg(&s.daemon.socket)
            .args(&args)
            .args(["--s3-endpoint", &recorder.url])
            .output()
            .unwrap();
        assert!(
            out.status.success(),
            "{args:?}: {}",
            String::from_utf8_lossy(&out.stderr)
        );
    };
    let input_arg = input.to_str().unwrap().to_owned();
    let output = s.path("ssec.out");
    for object in ["ssec-1", "ssec-2"] {
        run([
            "s3",
            "put",
            &input_arg,
            &format!("s3://objects/{object}"),
            "--key",
            &s.arn,
            "--sse-c",
            "--context",
            "tenant=acme",
        ]
        .map(str::to_owned)
        .to_vec());
    }
    run([
        "s3",
        "get",
        "s3://objects/ssec-1",
        output.to_str().unwrap(),
        "--sse-c",
        "--context",
        "tenant=acme",
    ]
    .map(str::to_owned)
    .to_vec());
    assert_eq!(std::fs::read(&output).unwrap(), content(3000));

    // Each object's PUT and the GET carry the SSE-C headers: AES256, a 32-byte key, its MD5.
    let sse = |headers: &HashMap<String, String>| -> Vec<u8> {
        assert_eq!(
            headers["x-amz-server-side-encryption-customer-algorithm"],
            "AES256"
        );
        let key = b64
            .decode(&headers["x-amz-server-side-encryption-customer-key"])
            .unwrap();
        assert_eq!(key.len(), 32);
        assert_eq!(
            headers["x-amz-server-side-encryption-customer-key-md5"],
            b64.encode(md5::Md5::digest(&key))
        );
        key
    };
    let put_1 = sse(&recorder.requests("PUT /objects/ssec-1?x-id=PutObject ")[0]);
    let put_2 = sse(&recorder.requests("PUT /objects/ssec-2?x-id=PutObject ")[0]);
    let get_1 = sse(&recorder.requests("GET /objects/ssec-1?x-id=GetObject ")[0]);
    assert_eq!(put_1, get_1, "the same key on the way back");
    assert_ne!(put_1, put_2, "a fresh data key per object");

    // What S3 keeps is the wrapped key, in a tag; it unwraps (with the context) to the key sent.
    let tags = s.s3.s3api(&[
        "get-object-tagging",
        "--bucket",
        "objects",
        "--key",
        "ssec-1",
    ]);
    let blob = b64
        .decode(tags["TagSet"][0]["Value"].as_str().unwrap())
        .unwrap();
    assert_eq!(tags["TagSet"][0]["Key"], "wrapd-sse-c-key");
    let mut data = s.daemon.data().await;
    let unwrapped = data
        .unwrap(wrapd::proto::UnwrapRequest {
            ciphertext_blob: blob.clone(),
            encryption_context: crate::common::ctx(&[
                ("tenant", "acme"),
                ("wrapctl:s3-sse-c", "AES256"),
            ]),
            key_id: String::new(),
        })
        .await
        .unwrap()
        .into_inner();
    assert_eq!(unwrapped.plaintext, put_1);
    let head =
        s.s3.s3api(&["head-object", "--bucket", "objects", "--key", "ssec-1"]);
    let stored = format!("{head} {tags}");
    assert!(
        !stored.contains(&b64.encode(&put_1)),
        "the SSE-C key itself is never stored"
    );
}

impl Setup {
    /// The official Python client (4.x): `put` or `get` one object, format `v2` or `v3`;
    /// KMS credentials from the dev AWS profile (S3 credentials are in the script).
    fn python(&self, mode: &str, key: &str, file: &Path, context: &str, format: &str) {
        let mut command = Command::new("python3");
        for var in [
            "AWS_ACCESS_KEY_ID",
            "AWS_SECRET_ACCESS_KEY",
            "AWS_SESSION_TOKEN",
            "AWS_CA_BUNDLE",
            "AWS_PROFILE",
        ] {
            command.env_remove(var);
        }
        let dev = self.daemon.dir();
        command
            .env("AWS_CONFIG_FILE", dev.join("aws/config"))
            .env("AWS_SHARED_CREDENTIALS_FILE", dev.join("aws/credentials"))
            .env("AWS_EC2_METADATA_DISABLED", "true");
        let file = file.to_str().unwrap();
        self.official_client(
            command,
            "python/s3ec_python.py",
            [mode, key, file, context],
            format,
        );
    }
}

#[test]
fn v2_and_v3_objects_of_the_official_python_client_open_with_wrapctl_and_back() {
    let s = setup();
    // Python writes, wrapctl reads.
    for (key, format, len, context, args) in [
        (
            "py-v3",
            "v3",
            3000,
            r#"{"tenant":"acme"}"#,
            &["--context", "tenant=acme"][..],
        ),
        ("py-v2", "v2", 3000, "{}", &[][..]),
        ("py-v3-empty", "v3", 0, "{}", &[][..]),
    ] {
        let input = s.path(&format!("{key}.in"));
        std::fs::write(&input, content(len)).unwrap();
        s.python("put", key, &input, context, format);
        let output = s.path(&format!("{key}.out"));
        let got = s
            .get(key, &output, args)
            .unwrap_or_else(|e| panic!("{key}: {e}"));
        assert_eq!(got["format"], format);
        assert_eq!(std::fs::read(&output).unwrap(), content(len), "{key}");
    }
    // wrapctl writes V3 (metadata, instruction file, in parts) and V2; Python reads.
    let v3_parts: &[&str] = &[
        "--format",
        "v3",
        "--multipart-threshold-mib",
        "5",
        "--part-size-mib",
        "5",
    ];
    for (key, len, args, context) in [
        (
            "ctl-v3",
            3000,
            &["--format", "v3", "--context", "tenant=acme"][..],
            r#"{"tenant":"acme"}"#,
        ),
        (
            "ctl-v3-instr",
            3000,
            &["--format", "v3", "--instruction-file"][..],
            "{}",
        ),
        ("ctl-v3-parts", BIG, v3_parts, "{}"),
        ("ctl-v2", 3000, &[][..], "{}"),
    ] {
        let input = s.path(&format!("{key}.in"));
        std::fs::write(&input, content(len)).unwrap();
        s.put(&input, key, args);
        let output = s.path(&format!("{key}.out"));
        s.python("get", key, &output, context, "v3");
        assert_eq!(std::fs::read(&output).unwrap(), content(len), "{key}");
    }
    // V3 metadata as the specification lays it out; with an instruction file, x-amz-c/d/i
    // stay in the object's metadata.
    let meta = &s
        .s3
        .s3api(&["head-object", "--bucket", "objects", "--key", "ctl-v3"])["Metadata"];
    assert_eq!(meta["x-amz-c"], "115");
    assert_eq!(meta["x-amz-w"], "12");
    let t: Value = serde_json::from_str(meta["x-amz-t"].as_str().unwrap()).unwrap();
    assert_eq!(
        t,
        serde_json::json!({"aws:x-amz-cek-alg": "115", "tenant": "acme"})
    );
    let meta = &s.s3.s3api(&[
        "head-object",
        "--bucket",
        "objects",
        "--key",
        "ctl-v3-instr",
    ])["Metadata"];
    let mut names: Vec<&str> = meta
        .as_object()
        .unwrap()
        .keys()
        .map(String::as_str)
        .collect();
    names.sort_unstable();
    assert_eq!(
        names,
        [
            "x-amz-c",
            "x-amz-d",
            "x-amz-i",
            "x-amz-unencrypted-content-length"
        ]
    );
}

#[test]
fn a_v3_object_whose_commitment_was_changed_is_refused_before_any_content() {
    let s = setup();
    let input = s.path("commit.in");
    std::fs::write(&input, content(2000)).unwrap();
    s.put(&input, "commit", &["--format", "v3"]);
    let original = s.path("commit.enc");
    s.s3.s3api(&[
        "get-object",
        "--bucket",
        "objects",
        "--key",
        "commit",
        original.to_str().unwrap(),
    ]);
    let mut meta =
        s.s3.s3api(&["head-object", "--bucket", "objects", "--key", "commit"])["Metadata"].clone();
    meta["x-amz-d"] = Value::from("AAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAA==");
    rewrite(&s, "commit", &std::fs::read(&original).unwrap(), &meta);
    let output = s.path("commit.out");
    let err = s.get("commit", &output, &[]).unwrap_err();
    assert!(err.contains("ciphertext is invalid"), "{err}");
    assert!(!output.exists());
}

#[test]
fn data_keys_through_the_aws_kms_api_make_the_same_objects_as_over_grpc() {
    let s = setup();
    let input = s.path("kms.in");
    std::fs::write(&input, content(2500)).unwrap();
    let dev = s.daemon.dir();
    // Credentials and region from the dev AWS profile (moto takes any), the KMS endpoint and
    // its CA from the command line: no daemon socket.
    let via_kms = |args: &[&str]| {
        let mut command = Command::new(env!("CARGO_BIN_EXE_wrapctl"));
        for var in [
            "AWS_ACCESS_KEY_ID",
            "AWS_SECRET_ACCESS_KEY",
            "AWS_SESSION_TOKEN",
            "AWS_CA_BUNDLE",
            "AWS_ENDPOINT_URL",
        ] {
            command.env_remove(var);
        }
        let out = command
            .env("AWS_CONFIG_FILE", dev.join("aws/config"))
            .env("AWS_SHARED_CREDENTIALS_FILE", dev.join("aws/credentials"))
            .env("AWS_PROFILE", "wrapd-dev")
            .env("AWS_EC2_METADATA_DISABLED", "true")
            .arg("--json")
            .arg("--socket")
            .arg(dev.join("no-such.sock"))
            .args(args)
            .args(["--s3-endpoint", &s.s3.url, "--kms-endpoint", &s.daemon.aws])
            .arg("--kms-ca-bundle")
            .arg(dev.join("pki/ca.pem"))
            .output()
            .unwrap();
        assert!(
            out.status.success(),
            "{args:?}: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        serde_json::from_slice::<Value>(&out.stdout).unwrap()
    };
    let put = via_kms(&[
        "s3",
        "put",
        input.to_str().unwrap(),
        "s3://objects/via-kms",
        "--key",
        &s.arn,
        "--context",
        "tenant=acme",
    ]);
    assert_eq!(
        put["key_id"],
        s.arn.as_str(),
        "KMS names the key by its ARN"
    );
    // Over gRPC, and by the official Ruby client.
    let output = s.path("via-kms.grpc");
    s.get("via-kms", &output, &["--context", "tenant=acme"])
        .unwrap();
    assert_eq!(std::fs::read(&output).unwrap(), content(2500));
    let output = s.path("via-kms.ruby");
    s.ruby(
        "get",
        "via-kms",
        &output,
        r#"{"tenant":"acme"}"#,
        "metadata",
    );
    assert_eq!(std::fs::read(&output).unwrap(), content(2500));
    // And an object put over gRPC opens through the KMS API.
    s.put(&input, "via-grpc", &["--format", "v3"]);
    let output = s.path("via-grpc.kms");
    let got = via_kms(&[
        "s3",
        "get",
        "s3://objects/via-grpc",
        output.to_str().unwrap(),
    ]);
    assert_eq!(got["format"], "v3");
    assert_eq!(std::fs::read(&output).unwrap(), content(2500));
    // Both paths are audited as the same key's operations, on their transports.
    let audit = s.daemon.audit_lines();
    assert!(
        audit
            .iter()
            .any(|r| r.operation == "GenerateDataKey" && r.transport == "aws-kms")
    );
    assert!(
        audit
            .iter()
            .any(|r| r.operation == "Unwrap" && r.transport == "aws-kms")
    );
}

#[test]
fn a_v2_object_is_refused_when_commitment_is_required_and_a_v3_one_is_read() {
    let s = setup();
    let input = s.path("committed.in");
    std::fs::write(&input, content(4096)).unwrap();
    s.put(&input, "plain-v2", &[]);
    s.put(&input, "committed-v3", &["--format", "v3"]);
    let out = s.path("committed.out");
    let err = s
        .get("plain-v2", &out, &["--require-commitment"])
        .unwrap_err();
    assert!(err.contains("does not commit"), "{err}");
    assert!(!out.exists(), "nothing written for a refused object");
    s.get("committed-v3", &out, &["--require-commitment"])
        .unwrap();
    assert_eq!(std::fs::read(&out).unwrap(), content(4096));
}

#[test]
fn an_oversized_instruction_file_is_refused() {
    let s = setup();
    let input = s.path("instructed.in");
    std::fs::write(&input, content(1024)).unwrap();
    s.put(&input, "instructed", &["--instruction-file"]);
    // Whoever can write the bucket replaces the instruction file with a large one.
    let large = s.path("large.instruction");
    std::fs::write(&large, vec![b' '; 1 << 20]).unwrap();
    s.s3.s3api(&[
        "put-object",
        "--bucket",
        "objects",
        "--key",
        "instructed.instruction",
        "--body",
        large.to_str().unwrap(),
    ]);
    let out = s.path("instructed.out");
    let err = s.get("instructed", &out, &[]).unwrap_err();
    assert!(err.contains("instruction file is larger than"), "{err}");
    assert!(!out.exists());
}

#[test]
fn sse_c_toward_a_plain_http_endpoint_off_this_host_is_refused() {
    let s = setup();
    let input = s.path("ssec.in");
    std::fs::write(&input, content(1024)).unwrap();
    let mut command = Command::new(env!("CARGO_BIN_EXE_wrapctl"));
    s3_env(&mut command);
    let out = command
        .arg("--socket")
        .arg(&s.daemon.socket)
        .args(["s3", "put", input.to_str().unwrap(), "s3://objects/ssec"])
        .args(["--key", &s.arn, "--sse-c"])
        .args(["--s3-endpoint", "http://192.0.2.1:9000"])
        .output()
        .unwrap();
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success());
    assert!(stderr.contains("is not https://"), "{stderr}");
}

impl Setup {
    /// The key's id (`key/…`), from its ARN.
    fn key_id(&self) -> String {
        self.arn.rsplit_once(':').unwrap().1.to_owned()
    }

    fn rotate(&self) {
        let out = Command::new(env!("CARGO_BIN_EXE_wrapctl"))
            .arg("--socket")
            .arg(&self.daemon.socket)
            .args(["keys", "rotate", &self.key_id()])
            .output()
            .unwrap();
        assert!(out.status.success(), "{out:?}");
    }

    /// `wrapctl ARGS` that may fail with a report: its JSON and whether it succeeded.
    fn wrapctl_report(&self, args: &[&str]) -> (Value, bool, String) {
        let mut command = Command::new(env!("CARGO_BIN_EXE_wrapctl"));
        s3_env(&mut command);
        let out = command
            .arg("--json")
            .arg("--socket")
            .arg(&self.daemon.socket)
            .args(args)
            .args(["--s3-endpoint", &self.s3.url])
            .output()
            .unwrap();
        let stderr = String::from_utf8_lossy(&out.stderr).into_owned();
        assert!(!stderr.contains("panicked"), "wrapctl panicked: {stderr}");
        let report = serde_json::from_slice(&out.stdout).unwrap_or(Value::Null);
        (report, out.status.success(), stderr)
    }

    /// `(version, objects)` of each row of `wrapctl census s3://objects/PREFIX`, and the
    /// objects without a wrapd key.
    fn census(&self, prefix: &str) -> (Vec<(u64, u64)>, u64) {
        let census = self
            .wrapctl(&["census", &format!("s3://objects/{prefix}")])
            .unwrap();
        let rows = census["versions"]
            .as_array()
            .unwrap()
            .iter()
            .map(|r| {
                (
                    r["version"].as_u64().unwrap(),
                    r["objects"].as_u64().unwrap(),
                )
            })
            .collect();
        (
            rows,
            census["without_wrapd_key"]["objects"].as_u64().unwrap(),
        )
    }
}

#[test]
fn s3_rewrap_moves_every_envelope_to_the_current_version_and_the_official_clients_still_read_them()
{
    let s = setup();
    let input = s.path("rw.in");
    std::fs::write(&input, content(70_000)).unwrap();
    // Every placement and format: wrapctl's, the official Ruby client's, an SSE-C object,
    // and an object that is not encrypted.
    s.put(&input, "rw/v2-meta", &["--context", "tenant=acme"]);
    s.put(&input, "rw/v2-instr", &["--instruction-file"]);
    s.put(&input, "rw/v3-meta", &["--format", "v3"]);
    s.put(
        &input,
        "rw/v3-instr",
        &["--format", "v3", "--instruction-file"],
    );
    s.put(&input, "rw/ssec", &["--sse-c", "--context", "app=ssec"]);
    s.ruby("put", "rw/ruby", &input, r#"{"tenant":"acme"}"#, "metadata");
    s.s3.s3api(&[
        "put-object",
        "--bucket",
        "objects",
        "--key",
        "rw/plain",
        "--body",
        input.to_str().unwrap(),
        "--content-type",
        "text/x-plain",
    ]);
    let head = |key: &str| {
        s.s3.s3api(&["head-object", "--bucket", "objects", "--key", key])
    };
    let ruby_type = head("rw/ruby")["ContentType"].clone();
    assert_eq!(s.census("rw/"), (vec![(1, 6)], 1));

    s.rotate();
    let (dry, ok, stderr) = s.wrapctl_report(&["s3", "rewrap", "s3://objects/rw/", "--dry-run"]);
    assert!(ok, "{stderr}");
    assert_eq!(dry["summary"]["would-rewrap"], 6, "{dry}");
    assert_eq!(
        s.census("rw/"),
        (vec![(1, 6)], 1),
        "a dry run changes nothing"
    );

    let (report, ok, stderr) =
        s.wrapctl_report(&["s3", "rewrap", "s3://objects/rw/", "--context", "app=ssec"]);
    assert!(ok, "{stderr}\n{report}");
    assert_eq!(report["summary"]["rewrapped"], 6, "{report}");
    assert_eq!(report["summary"]["skipped"], 1, "{report}");
    assert_eq!(s.census("rw/"), (vec![(2, 6)], 1));
    assert_eq!(
        head("rw/ruby")["ContentType"],
        ruby_type,
        "content headers kept"
    );

    // Version 1 retired: every object reads, with wrapctl and the official clients.
    let out = Command::new(env!("CARGO_BIN_EXE_wrapctl"))
        .arg("--socket")
        .arg(&s.daemon.socket)
        .args(["keys", "retire-version", &s.key_id(), "1"])
        .output()
        .unwrap();
    assert!(out.status.success(), "{out:?}");
    for (key, args) in [
        ("rw/v2-meta", &["--context", "tenant=acme"][..]),
        ("rw/v2-instr", &[][..]),
        ("rw/v3-meta", &[][..]),
        ("rw/v3-instr", &[][..]),
        ("rw/ssec", &["--sse-c", "--context", "app=ssec"][..]),
        ("rw/ruby", &["--context", "tenant=acme"][..]),
    ] {
        let output = s.path("rw.out");
        s.get(key, &output, args)
            .unwrap_or_else(|e| panic!("{key}: {e}"));
        assert_eq!(std::fs::read(&output).unwrap(), content(70_000), "{key}");
    }
    for (key, context, placement) in [
        ("rw/ruby", r#"{"tenant":"acme"}"#, "metadata"),
        ("rw/v2-meta", r#"{"tenant":"acme"}"#, "metadata"),
        ("rw/v2-instr", "{}", "instruction_file"),
    ] {
        let output = s.path("ruby.out");
        s.ruby("get", key, &output, context, placement);
        assert_eq!(std::fs::read(&output).unwrap(), content(70_000), "{key}");
    }
    let output = s.path("py.out");
    s.python("get", "rw/v3-meta", &output, "{}", "v3");
    assert_eq!(std::fs::read(&output).unwrap(), content(70_000));

    let (again, ok, _) = s.wrapctl_report(&["s3", "rewrap", "s3://objects/rw/"]);
    assert!(ok);
    assert_eq!(again["summary"]["up-to-date"], 6, "{again}");
}

#[test]
fn s3_rewrap_leaves_an_object_that_changed_meanwhile_alone() {
    // Token calls slowed down: the object is replaced while its data key is re-wrapped.
    let s = setup_with_env(&[("WRAPD_FAULT_STALL_MS", "1500")]);
    let input = s.path("race.in");
    std::fs::write(&input, content(1000)).unwrap();
    s.put(&input, "race/object", &[]);
    s.rotate();
    let audit = s.daemon.dir().join("audit.log");
    let described = || {
        std::fs::read_to_string(&audit)
            .unwrap_or_default()
            .lines()
            .filter(|l| l.contains("\"DescribeKey\""))
            .count()
    };
    let before = described();
    let mut command = Command::new(env!("CARGO_BIN_EXE_wrapctl"));
    s3_env(&mut command);
    let child = command
        .arg("--json")
        .arg("--socket")
        .arg(&s.daemon.socket)
        .args(["s3", "rewrap", "s3://objects/race/"])
        .args(["--s3-endpoint", &s.s3.url])
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    // Once wrapctl knows the destination it is in ReWrap, stalled in the token: a writer
    // replaces the object now.
    let deadline = Instant::now() + Duration::from_secs(30);
    while described() == before {
        assert!(Instant::now() < deadline, "no DescribeKey");
        std::thread::sleep(Duration::from_millis(10));
    }
    let replacement = s.path("replacement");
    std::fs::write(&replacement, b"written meanwhile").unwrap();
    s.s3.s3api(&[
        "put-object",
        "--bucket",
        "objects",
        "--key",
        "race/object",
        "--body",
        replacement.to_str().unwrap(),
    ]);
    let out = child.wait_with_output().unwrap();
    assert!(!out.status.success());
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(
        stderr.contains("race/object") && stderr.contains("changed"),
        "{stderr}"
    );
    // The writer's object stands, untouched by the re-wrap.
    let head =
        s.s3.s3api(&["head-object", "--bucket", "objects", "--key", "race/object"]);
    assert!(head["Metadata"].get("x-amz-key-v2").is_none(), "{head}");
    assert_eq!(head["ContentLength"], 17);
}
