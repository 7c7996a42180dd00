//! Test harness: real `wrapd` daemons on real SoftHSM tokens in temp dirs, reached over real
//! unix sockets through the generated gRPC clients.
#![allow(dead_code)]

pub mod postgres;

use std::collections::HashMap;
use std::fs::File;
use std::io::{BufRead, BufReader};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, ExitStatus, Stdio};
use std::sync::mpsc;
use std::time::{Duration, Instant};

use tempfile::TempDir;
use tonic::transport::Channel;
use wrapd::client::{DataKeyServiceClient, KeyServiceClient, connect_unix};
use wrapd::proto::{
    CreateKeyRequest, GenerateDataKeyRequest, GenerateDataKeyResponse, KeyMetadata,
};

/// The project's CloudHSM simulator, when this run of the suite is its pass
/// (`WRAPD_TEST_HSM=cloudhsm-sim`): new dev daemons then run on it with `profile =
/// "cloudhsm"`. It is built beside the binaries (`cargo build -p wrapd-cloudhsm-sim`).
pub fn cloudhsm_sim() -> Option<String> {
    if std::env::var("WRAPD_TEST_HSM").ok()?.as_str() != "cloudhsm-sim" {
        return None;
    }
    let path = Path::new(env!("CARGO_BIN_EXE_wrapd")).with_file_name("libwrapd_cloudhsm_sim.so");
    assert!(
        path.exists(),
        "{} is missing: cargo build -p wrapd-cloudhsm-sim",
        path.display()
    );
    Some(path.display().to_string())
}

/// A `wrapd dev` daemon as a child process, its log captured to a file.
pub struct DevDaemon {
    dir: TempDir,
    child: Option<Child>,
    pub socket: PathBuf,
    /// The TCP (mutual TLS) address from the ready line.
    pub tcp: std::net::SocketAddr,
    /// The AWS KMS API's URL from the ready line (`https://127.0.0.1:PORT`).
    pub aws: String,
    /// The XKS proxy API's URL from the ready line (`https://127.0.0.1:PORT`).
    pub xks: String,
    /// The metrics URL from the ready line, when `[metrics]` is configured.
    pub metrics: Option<String>,
    log_path: PathBuf,
    starts: usize,
    env: Vec<(String, String)>,
    /// A command (and its arguments) the daemon runs under, e.g. `setpriv ...`.
    wrapper: Vec<String>,
    /// Extra arguments after `wrapd dev --state-dir DIR`.
    args: Vec<String>,
}

impl DevDaemon {
    /// Starts a daemon on a fresh state dir.
    pub fn start() -> Self {
        Self::start_with_env(&[])
    }

    /// Starts a daemon with extra environment variables (e.g. `RUST_LOG`).
    pub fn start_with_env(env: &[(&str, &str)]) -> Self {
        Self::start_with(env, &[])
    }

    /// Starts a daemon whose metadata store is a new database on the tests' PostgreSQL
    /// server (`wrapd dev --postgres URL`).
    pub fn start_on_postgres() -> Self {
        // The synchronous client must not run on an async test's runtime thread.
        let url = std::thread::spawn(|| postgres::server().database())
            .join()
            .unwrap();
        Self::start_with_args(&[], &[], &["--postgres", &url])
    }

    /// Starts a daemon under a wrapper command (`wrapper[0] wrapper[1..] wrapd dev ...`).
    pub fn start_with(env: &[(&str, &str)], wrapper: &[&str]) -> Self {
        Self::start_with_args(env, wrapper, &[])
    }

    /// The general case: environment, wrapper command, and arguments after
    /// `wrapd dev --state-dir DIR` (kept for restarts).
    pub fn start_with_args(env: &[(&str, &str)], wrapper: &[&str], args: &[&str]) -> Self {
        let dir = tempfile::Builder::new()
            .prefix("wrapd-test-")
            .tempdir()
            .expect("temp dir");
        Self::start_in(dir, env, wrapper, args)
    }

    /// Like [`DevDaemon::start_with_args`], on a state directory the test prepared (an
    /// earlier release's, say).
    pub fn start_in(
        dir: tempfile::TempDir,
        env: &[(&str, &str)],
        wrapper: &[&str],
        args: &[&str],
    ) -> Self {
        let mut env: Vec<(String, String)> = env
            .iter()
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .collect();
        if let Some(sim) = cloudhsm_sim() {
            env.push((wrapd::dev::CLOUDHSM_SIM_ENV.into(), sim));
        }
        let mut daemon = Self {
            socket: dir.path().join("wrapd.sock"),
            tcp: "0.0.0.0:0".parse().unwrap(),
            aws: String::new(),
            xks: String::new(),
            metrics: None,
            log_path: dir.path().join("daemon-0.log"),
            dir,
            child: None,
            starts: 0,
            env,
            wrapper: wrapper.iter().map(|s| s.to_string()).collect(),
            args: args.iter().map(|s| s.to_string()).collect(),
        };
        daemon.spawn();
        daemon
    }

    pub fn dir(&self) -> &Path {
        self.dir.path()
    }

    /// The Kubernetes KMS v2 plugin socket.
    pub fn kms_socket(&self) -> PathBuf {
        self.dir.path().join("kms.sock")
    }

    fn spawn(&mut self) {
        self.log_path = self.dir.path().join(format!("daemon-{}.log", self.starts));
        self.starts += 1;
        let log = File::create(&self.log_path).expect("log file");
        let mut command = match self.wrapper.split_first() {
            Some((program, args)) => {
                let mut command = Command::new(program);
                command.args(args).arg(env!("CARGO_BIN_EXE_wrapd"));
                command
            }
            None => Command::new(env!("CARGO_BIN_EXE_wrapd")),
        };
        command
            .args(["dev", "--state-dir"])
            .arg(self.dir.path())
            .args(&self.args)
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::from(log));
        for (k, v) in &self.env {
            command.env(k, v);
        }
        let mut child = command.spawn().expect("spawn wrapd");
        let stdout = child.stdout.take().expect("stdout");
        let (tx, rx) = mpsc::channel();
        std::thread::spawn(move || {
            for line in BufReader::new(stdout).lines() {
                let Ok(line) = line else { break };
                let _ = tx.send(line);
            }
        });
        let line = rx
            .recv_timeout(Duration::from_secs(60))
            .unwrap_or_else(|_| {
                panic!(
                    "wrapd did not print its ready line; log:\n{}",
                    std::fs::read_to_string(&self.log_path).unwrap_or_default()
                )
            });
        // `wrapd ready NAME=VALUE ...`: the listeners `wrapd dev` configures, in any order.
        let fields: HashMap<&str, &str> = line
            .strip_prefix("wrapd ready ")
            .unwrap_or_else(|| panic!("unexpected ready line {line:?}"))
            .split(' ')
            .filter_map(|field| field.split_once('='))
            .collect();
        let field = |name: &str| {
            *fields
                .get(name)
                .unwrap_or_else(|| panic!("no {name}= in the ready line {line:?}"))
        };
        assert_eq!(field("socket"), self.socket.display().to_string(), "{line}");
        assert_eq!(
            field("kms"),
            self.kms_socket().display().to_string(),
            "{line}"
        );
        self.tcp = field("tcp").parse().expect("tcp address in the ready line");
        let (aws, xks) = (field("aws"), field("xks"));
        assert!(aws.starts_with("https://127.0.0.1:"), "{line}");
        assert!(xks.starts_with("https://127.0.0.1:"), "{line}");
        self.aws = aws.to_owned();
        self.xks = xks.to_owned();
        self.metrics = fields.get("metrics").map(|m| (*m).to_owned());
        self.child = Some(child);
    }

    /// A channel to the daemon's socket.
    pub async fn channel(&self) -> Channel {
        connect_unix(&self.socket).await.expect("connect")
    }

    pub async fn keys(&self) -> KeyServiceClient<Channel> {
        KeyServiceClient::new(self.channel().await)
    }

    pub async fn data(&self) -> DataKeyServiceClient<Channel> {
        DataKeyServiceClient::new(self.channel().await)
    }

    /// Sends SIGTERM and waits for a clean exit.
    #[allow(unsafe_code)] // kill(2); see the SAFETY comment
    pub fn stop(&mut self) -> ExitStatus {
        let mut child = self.child.take().expect("daemon running");
        // SAFETY: kill(2) on our own child's pid has no memory effects.
        unsafe { libc::kill(child.id() as libc::pid_t, libc::SIGTERM) };
        let deadline = Instant::now() + Duration::from_secs(30);
        loop {
            if let Some(status) = child.try_wait().expect("wait") {
                return status;
            }
            assert!(Instant::now() < deadline, "wrapd did not stop on SIGTERM");
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    /// Sends a signal to the daemon.
    #[allow(unsafe_code)] // kill(2); see the SAFETY comment
    pub fn signal(&self, signal: libc::c_int) {
        let child = self.child.as_ref().expect("daemon running");
        // SAFETY: kill(2) on our own child's pid has no memory effects.
        unsafe { libc::kill(child.id() as libc::pid_t, signal) };
    }

    /// Sends SIGHUP and waits until the daemon logs that it reloaded its policy.
    pub fn reload_policy(&self) {
        let reloads = || self.log().matches("policy reloaded").count();
        let before = reloads();
        self.signal(libc::SIGHUP);
        let deadline = Instant::now() + Duration::from_secs(10);
        while reloads() == before {
            assert!(Instant::now() < deadline, "no reload:\n{}", self.log());
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    /// A mutual-TLS channel to the TCP listener with the client certificate `dir/stem.pem`
    /// (CA: the dev CA unless `ca` is given).
    pub async fn tls_channel(
        &self,
        dir: &Path,
        stem: &str,
        ca: Option<&Path>,
    ) -> Result<Channel, wrapd::client::ConnectError> {
        let files = wrapd::client::TlsFiles {
            ca: ca.map_or_else(|| self.dir().join("pki/ca.pem"), Path::to_owned),
            cert: dir.join(format!("{stem}.pem")),
            key: dir.join(format!("{stem}.key")),
        };
        wrapd::client::connect_tls(&format!("https://{}", self.tcp), &files).await
    }

    /// Kills the daemon with SIGKILL (a crash) and reaps it.
    pub fn kill(&mut self) {
        let mut child = self.child.take().expect("daemon running");
        child.kill().expect("SIGKILL");
        child.wait().expect("reap");
    }

    /// Starts a stopped daemon again on the same state dir.
    pub fn restart_stopped(&mut self) {
        assert!(self.child.is_none(), "still running");
        self.spawn();
    }

    /// The running daemon's pid.
    pub fn pid(&self) -> u32 {
        self.child.as_ref().expect("daemon running").id()
    }

    /// Sets an environment variable for the next starts.
    pub fn set_env(&mut self, key: &str, value: &str) {
        self.env.retain(|(k, _)| k != key);
        self.env.push((key.to_owned(), value.to_owned()));
    }

    /// Sets the extra arguments of the next starts (`wrapd dev --state-dir DIR ARGS`).
    pub fn set_args(&mut self, args: &[&str]) {
        self.args = args.iter().map(|s| s.to_string()).collect();
    }

    /// Runs `wrapd dev` on the (stopped) daemon's state dir, expecting it to fail at
    /// start-up; returns its stderr.
    pub fn start_fails(&self) -> String {
        assert!(self.child.is_none(), "still running");
        let mut command = Command::new(env!("CARGO_BIN_EXE_wrapd"));
        command
            .args(["dev", "--state-dir"])
            .arg(self.dir.path())
            .args(&self.args)
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::piped());
        for (k, v) in &self.env {
            command.env(k, v);
        }
        let mut child = command.spawn().expect("spawn wrapd");
        let deadline = Instant::now() + Duration::from_secs(30);
        let status = loop {
            if let Some(status) = child.try_wait().expect("wait") {
                break status;
            }
            if Instant::now() > deadline {
                let _ = child.kill();
                panic!("wrapd started although it should have refused");
            }
            std::thread::sleep(Duration::from_millis(20));
        };
        assert!(!status.success(), "wrapd should have failed at start-up");
        let mut stderr = String::new();
        std::io::Read::read_to_string(&mut child.stderr.take().unwrap(), &mut stderr).unwrap();
        stderr
    }

    /// Stops (SIGTERM) and starts again on the same state dir.
    pub fn restart(&mut self) {
        let status = self.stop();
        assert!(status.success(), "clean exit on SIGTERM: {status:?}");
        self.spawn();
    }

    /// Everything the daemon has logged so far (all runs).
    pub fn log(&self) -> String {
        (0..self.starts)
            .map(|i| {
                std::fs::read_to_string(self.dir.path().join(format!("daemon-{i}.log")))
                    .unwrap_or_default()
            })
            .collect()
    }

    /// The audit log's lines.
    pub fn audit_lines(&self) -> Vec<wrapd::audit::AuditRecord> {
        std::fs::read_to_string(self.dir().join("audit.log"))
            .unwrap_or_default()
            .lines()
            .map(|l| serde_json::from_str(l).expect("audit line"))
            .collect()
    }

    /// The daemon's generated config file.
    pub fn config_path(&self) -> PathBuf {
        self.dir.path().join("wrapd.toml")
    }
}

impl Drop for DevDaemon {
    fn drop(&mut self) {
        if let Some(mut child) = self.child.take() {
            let _ = child.kill();
            let _ = child.wait();
        }
    }
}

/// Runs the ignored test `test` (its full path, e.g. `faults::isolated_token_faults`) of this
/// test binary in a child process, with `env`, and fails with its output unless it passed:
/// for tests that need process-global PKCS#11 state of their own. The child sees
/// [`isolated`] true.
pub fn run_isolated(test: &str, env: &[(&str, &str)]) {
    let out = Command::new(std::env::current_exe().expect("the test binary"))
        .args([
            test,
            "--exact",
            "--ignored",
            "--nocapture",
            "--test-threads=1",
        ])
        .env("WRAPD_TEST_ISOLATED", "1")
        .envs(env.iter().copied())
        .output()
        .expect("run the test binary");
    let text = format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(
        out.status.success() && text.contains("1 passed"),
        "{test} in its own process:\n{text}"
    );
}

/// True in a child process started by [`run_isolated`] (an isolated test run directly
/// returns at once).
pub fn isolated() -> bool {
    std::env::var_os("WRAPD_TEST_ISOLATED").is_some()
}

/// Polls `check` every 20 ms until it returns true, for at most 10 s (state changes that
/// happen in the daemon's background, such as a SIGHUP reload).
pub async fn eventually<F, Fut>(what: &str, mut check: F)
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = bool>,
{
    let deadline = Instant::now() + Duration::from_secs(10);
    while !check().await {
        assert!(Instant::now() < deadline, "timed out waiting for: {what}");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

/// A 32-byte data key under `key_id` and `context` (the call must succeed).
pub async fn generate(
    data: &mut DataKeyServiceClient<Channel>,
    key_id: &str,
    context: &[(&str, &str)],
) -> GenerateDataKeyResponse {
    data.generate_data_key(GenerateDataKeyRequest {
        key_id: key_id.to_owned(),
        encryption_context: ctx(context),
        number_of_bytes: 32,
    })
    .await
    .expect("GenerateDataKey")
    .into_inner()
}

/// An encryption context from pairs.
pub fn ctx(entries: &[(&str, &str)]) -> HashMap<String, String> {
    entries
        .iter()
        .map(|(k, v)| (k.to_string(), v.to_string()))
        .collect()
}

/// Creates a key, optionally with an alias.
pub async fn create_key(keys: &mut KeyServiceClient<Channel>, alias: &str) -> KeyMetadata {
    keys.create_key(CreateKeyRequest {
        description: "test key".into(),
        alias: alias.into(),
        ..Default::default()
    })
    .await
    .expect("CreateKey")
    .into_inner()
}

/// Asserts a gRPC result failed with `code`.
#[track_caller]
pub fn assert_code<T: std::fmt::Debug>(
    result: Result<T, tonic::Status>,
    code: tonic::Code,
) -> tonic::Status {
    match result {
        Ok(v) => panic!("expected {code:?}, got Ok({v:?})"),
        Err(status) => {
            assert_eq!(status.code(), code, "message: {}", status.message());
            status
        }
    }
}
