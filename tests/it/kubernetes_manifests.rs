//! The Kubernetes manifests as they run: daemons
//! configured exactly as `packaging/kubernetes/*.yaml` configure them (the ConfigMaps'
//! text, the pods' args, environment, volume mounts and probe commands), with only the HSM
//! (SoftHSM for CloudHSM), the database's address and the TCP ports (127.0.0.1:0) swapped
//! for the test's. Each pod's volumes are directories: hostPath volumes per node, volume
//! claims per pod name, both outliving the pod; the rest per pod.
//!
//! Two KMS plugin instances on one database and one token decrypt each other's blobs (an
//! HA control plane); the probes fail while the audit log fails closed and pass again when
//! it is mended; a fleet pod's audit chain survives a rollout and a lost volume is refused.

use std::collections::HashMap;
use std::io::{BufRead, BufReader};
use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::mpsc;
use std::time::{Duration, Instant};

use serde_json::Value;
use tonic::transport::Channel;
use wrapd::client::{KeyServiceClient, connect_unix};
use wrapd::kms_proto::key_management_service_client::KeyManagementServiceClient;
use wrapd::kms_proto::{DecryptRequest, EncryptRequest, StatusRequest, StatusResponse};
use wrapd::proto::KeyRef;

use crate::common::{DevDaemon, eventually, postgres};
use crate::packaging::{manifest, resource};

/// What the cluster supplies: one token (a stopped `wrapd dev` state directory), one
/// database holding `alias/kubernetes`, the nodes' disks and the Secrets.
struct Cluster {
    /// The token, PIN and dev PKI and policy.
    dev: DevDaemon,
    database: String,
    db_ca: Vec<u8>,
    /// Nodes' hostPath directories and the pods' volume claims.
    disks: tempfile::TempDir,
}

impl Cluster {
    fn new() -> Self {
        // The synchronous PostgreSQL client must not run on the test's runtime thread.
        let (database, db_ca) = std::thread::spawn(|| {
            let server = postgres::server();
            (server.database(), server.ca_pem())
        })
        .join()
        .unwrap();
        // The once-only bootstrap the plugin manifest asks for (alias/kubernetes in the
        // shared database), here by `wrapd dev`, which also makes the token.
        let mut dev = DevDaemon::start_with_args(&[], &[], &["--postgres", &database]);
        assert!(dev.stop().success());
        Self {
            dev,
            database,
            db_ca,
            disks: tempfile::Builder::new()
                .prefix("wrapd-k8s-")
                .tempdir()
                .unwrap(),
        }
    }

    fn dev_file(&self, name: &str) -> Vec<u8> {
        std::fs::read(self.dev.dir().join(name)).unwrap()
    }

    /// The Secrets the fleet manifest names (the plugin's must need none).
    fn secret(&self, name: &str, key: &str) -> Vec<u8> {
        match (name, key) {
            ("wrapd-hsm-pin", "pin") => self.dev_file("pin"),
            ("wrapd-db", "password") => b"unused: the test server trusts".to_vec(),
            ("wrapd-tls", "server.pem") => self.dev_file("pki/server.pem"),
            ("wrapd-tls", "server.key") => self.dev_file("pki/server.key"),
            ("wrapd-tls", "clients-ca.pem") => self.dev_file("pki/ca.pem"),
            ("wrapd-tls", "db-ca.pem") => self.db_ca.clone(),
            other => panic!("the test supplies no Secret {other:?}"),
        }
    }

    /// ConfigMaps the manifests use but do not ship (the operator's policy).
    fn own_config_map(&self, name: &str, key: &str) -> Vec<u8> {
        match (name, key) {
            ("wrapd-policy", "policy.toml") => self.dev_file("policy.toml"),
            other => panic!("the test supplies no ConfigMap {other:?}"),
        }
    }

    /// The SoftHSM module `wrapd dev` found.
    fn module(&self) -> String {
        let dev: toml::Table =
            toml::from_str(&String::from_utf8(self.dev_file("wrapd.toml")).unwrap()).unwrap();
        dev["hsm"]["module"].as_str().unwrap().to_owned()
    }
}

fn array(value: &Value) -> &[Value] {
    value.as_array().map(Vec::as_slice).unwrap_or_default()
}

fn str_of(value: &Value) -> &str {
    value
        .as_str()
        .unwrap_or_else(|| panic!("not a string: {value}"))
}

fn write_private(path: &Path, bytes: &[u8]) {
    std::fs::create_dir_all(path.parent().unwrap()).unwrap();
    std::fs::write(path, bytes).unwrap();
    std::fs::set_permissions(path, std::fs::Permissions::from_mode(0o600)).unwrap();
}

/// One pod of a workload, as the test runs it.
struct Pod {
    dir: tempfile::TempDir,
    container: Value,
    /// (mountPath, directory), longest mount path first.
    mounts: Vec<(String, PathBuf)>,
    env: Vec<(String, String)>,
    /// The shipped config, before the test's swaps.
    shipped: toml::Table,
    child: Option<Child>,
    starts: usize,
    /// The fields of the last ready line (`socket`, `kms`, ...).
    ready: HashMap<String, String>,
}

impl Pod {
    /// A KMS plugin pod (the DaemonSet's) on control-plane node `node`.
    fn plugin(cluster: &Cluster, node: &str) -> Self {
        let docs = manifest("kms-plugin.yaml");
        let set = resource(&docs, "DaemonSet", "wrapd-kms-plugin");
        Self::new(
            cluster,
            &docs,
            set,
            &format!("wrapd-kms-plugin-{node}"),
            node,
        )
    }

    /// Fleet pod `name` (the StatefulSet's).
    fn fleet(cluster: &Cluster, name: &str) -> Self {
        let docs = manifest("fleet.yaml");
        let set = resource(&docs, "StatefulSet", "wrapd");
        Self::new(cluster, &docs, set, name, "node-1")
    }

    fn new(cluster: &Cluster, docs: &[Value], workload: &Value, name: &str, node: &str) -> Self {
        let spec = &workload["spec"]["template"]["spec"];
        let container = spec["containers"][0].clone();
        assert!(
            container["command"].is_null(),
            "the image's entrypoint, wrapd"
        );
        let dir = tempfile::Builder::new()
            .prefix("pod-")
            .tempdir_in(cluster.disks.path())
            .unwrap();
        let claims: Vec<&str> = array(&workload["spec"]["volumeClaimTemplates"])
            .iter()
            .map(|t| str_of(&t["metadata"]["name"]))
            .collect();
        let config_map = |name: &str, key: &str| -> Vec<u8> {
            docs.iter()
                .find(|d| d["kind"] == "ConfigMap" && d["metadata"]["name"] == name)
                .map(|d| str_of(&d["data"][key]).as_bytes().to_vec())
                .unwrap_or_else(|| cluster.own_config_map(name, key))
        };
        // One directory per volume, filled as the kubelet would.
        let volume_dir = |volume: &str| -> PathBuf {
            if claims.contains(&volume) {
                // A claim: the pod's own disk, kept across its restarts.
                let claim = cluster.disks.path().join(format!("claim-{volume}-{name}"));
                std::fs::create_dir_all(&claim).unwrap();
                return claim;
            }
            let volume_spec = array(&spec["volumes"])
                .iter()
                .find(|v| v["name"] == volume)
                .unwrap_or_else(|| panic!("no volume {volume}"));
            let path = if let Some(host) = volume_spec["hostPath"]["path"].as_str() {
                // The node's disk: outlives the pod. No "/run/wrapd" inside the name.
                let flat = host.trim_start_matches('/').replace('/', "_");
                cluster.disks.path().join(format!("node-{node}")).join(flat)
            } else {
                dir.path().join(format!("vol-{volume}"))
            };
            std::fs::create_dir_all(&path).unwrap();
            let project = |source: &Value, secret: bool| {
                let source_name = str_of(&source["name"]);
                let fetch = |key: &str| {
                    if secret {
                        cluster.secret(source_name, key)
                    } else {
                        config_map(source_name, key)
                    }
                };
                let items: Vec<(String, String)> = match source["items"].as_array() {
                    Some(items) => items
                        .iter()
                        .map(|i| (str_of(&i["key"]).to_owned(), str_of(&i["path"]).to_owned()))
                        .collect(),
                    None => {
                        let data = &resource(docs, "ConfigMap", source_name)["data"];
                        data.as_object()
                            .unwrap()
                            .keys()
                            .map(|k| (k.clone(), k.clone()))
                            .collect()
                    }
                };
                for (key, file) in items {
                    write_private(&path.join(file), &fetch(&key));
                }
            };
            if !volume_spec["configMap"].is_null() {
                project(&volume_spec["configMap"], false);
            }
            for source in array(&volume_spec["projected"]["sources"]) {
                if !source["configMap"].is_null() {
                    project(&source["configMap"], false);
                }
                if !source["secret"].is_null() {
                    project(&source["secret"], true);
                }
            }
            path
        };
        let mut mounts: Vec<(String, PathBuf)> = array(&container["volumeMounts"])
            .iter()
            .map(|m| {
                (
                    str_of(&m["mountPath"]).to_owned(),
                    volume_dir(str_of(&m["name"])),
                )
            })
            .collect();
        mounts.sort_by_key(|(path, _)| std::cmp::Reverse(path.len()));
        let env = array(&container["env"])
            .iter()
            .map(|e| {
                let value = if let Some(value) = e["value"].as_str() {
                    value.to_owned()
                } else if let Some(field) = e["valueFrom"]["fieldRef"]["fieldPath"].as_str() {
                    match field {
                        "spec.nodeName" => node.to_owned(),
                        "metadata.name" => name.to_owned(),
                        other => panic!("the test does not supply {other}"),
                    }
                } else {
                    let secret = &e["valueFrom"]["secretKeyRef"];
                    String::from_utf8(
                        cluster.secret(str_of(&secret["name"]), str_of(&secret["key"])),
                    )
                    .unwrap()
                };
                (str_of(&e["name"]).to_owned(), value)
            })
            .collect();
        let mut pod = Self {
            dir,
            container,
            mounts,
            env,
            shipped: toml::Table::new(),
            child: None,
            starts: 0,
            ready: HashMap::new(),
        };
        pod.adapt_config(cluster);
        pod
    }

    /// The test's path for a path in the container (the image's wrapd: the one built).
    fn path(&self, in_container: &str) -> String {
        if in_container == "/usr/local/bin/wrapd" {
            return env!("CARGO_BIN_EXE_wrapd").to_owned();
        }
        for (mount, dir) in &self.mounts {
            if let Some(rest) = in_container.strip_prefix(mount.as_str()) {
                if rest.is_empty() || rest.starts_with('/') {
                    return format!("{}{rest}", dir.display());
                }
            }
        }
        in_container.to_owned()
    }

    fn args(&self) -> Vec<String> {
        array(&self.container["args"])
            .iter()
            .map(|a| self.path(str_of(a)))
            .collect()
    }

    /// The config file the args name, as the container sees it.
    fn config_path(&self) -> PathBuf {
        let args: Vec<&str> = array(&self.container["args"]).iter().map(str_of).collect();
        let at = args
            .iter()
            .position(|a| *a == "--config")
            .expect("--config");
        PathBuf::from(self.path(args[at + 1]))
    }

    fn map_paths(&self, value: &mut toml::Value) {
        match value {
            toml::Value::String(s) if s.starts_with('/') => *s = self.path(s),
            toml::Value::Table(t) => t.iter_mut().for_each(|(_, v)| self.map_paths(v)),
            toml::Value::Array(a) => a.iter_mut().for_each(|v| self.map_paths(v)),
            _ => {}
        }
    }

    /// The shipped config with the test's swaps: SoftHSM for CloudHSM, the test database,
    /// port 0 on 127.0.0.1, the test user may be root and may not lock memory. Then the
    /// node's own files (hostPath `type: Directory`): what the config reads that no volume
    /// supplied.
    fn adapt_config(&mut self, cluster: &Cluster) {
        let path = self.config_path();
        let shipped: toml::Table =
            toml::from_str(&std::fs::read_to_string(&path).unwrap()).unwrap();
        let mut config = toml::Value::Table(shipped.clone());
        self.map_paths(&mut config);
        let toml::Value::Table(mut config) = config else {
            unreachable!()
        };
        let set = |table: &mut toml::Table, section: &str, key: &str, value: toml::Value| {
            table
                .entry(section.to_owned())
                .or_insert(toml::Value::Table(toml::Table::new()))
                .as_table_mut()
                .unwrap()
                .insert(key.to_owned(), value);
        };
        let s = |v: &str| toml::Value::String(v.to_owned());
        set(&mut config, "hsm", "module", s(&cluster.module()));
        set(
            &mut config,
            "hsm",
            "token_label",
            s(wrapd::dev::DEV_TOKEN_LABEL),
        );
        set(&mut config, "hsm", "profile", s("softhsm"));
        let softhsm = cluster.dev.dir().join("softhsm2.conf");
        set(
            &mut config,
            "hsm",
            "softhsm2_conf",
            s(softhsm.to_str().unwrap()),
        );
        assert!(
            shipped["store"]["postgres"]
                .as_str()
                .is_some_and(|url| url.starts_with("postgresql://"))
        );
        set(&mut config, "store", "postgres", s(&cluster.database));
        for section in ["tcp", "metrics", "aws"] {
            if config.contains_key(section) {
                set(&mut config, section, "listen", s("127.0.0.1:0"));
            }
        }
        set(
            &mut config,
            "process",
            "allow_root",
            toml::Value::Boolean(true),
        );
        set(&mut config, "process", "lock_memory", s("off"));
        // The node's files.
        let node_file = |value: Option<&toml::Value>, bytes: &[u8]| {
            if let Some(file) = value.and_then(toml::Value::as_str) {
                if !Path::new(file).exists() {
                    write_private(Path::new(file), bytes);
                }
            }
        };
        node_file(config["hsm"].get("pin_file"), &cluster.dev_file("pin"));
        node_file(config["store"].get("password_file"), b"unused");
        node_file(config["store"].get("tls_ca_file"), &cluster.db_ca);
        write_private(&path, toml::to_string(&config).unwrap().as_bytes());
        self.shipped = shipped;
    }

    /// Starts the container's process; its log if it stopped before its ready line.
    fn start(&mut self) -> Result<(), String> {
        let log = self.dir.path().join(format!("daemon-{}.log", self.starts));
        self.starts += 1;
        let mut child = Command::new(env!("CARGO_BIN_EXE_wrapd"))
            .args(self.args())
            .envs(self.env.iter().map(|(k, v)| (k, v)))
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(std::fs::File::create(&log).unwrap())
            .spawn()
            .unwrap();
        let stdout = child.stdout.take().unwrap();
        let (tx, rx) = mpsc::channel();
        std::thread::spawn(move || {
            for line in BufReader::new(stdout).lines() {
                let Ok(line) = line else { break };
                let _ = tx.send(line);
            }
        });
        match rx.recv_timeout(Duration::from_secs(60)) {
            Ok(line) => {
                let fields = line.strip_prefix("wrapd ready ").expect("ready line");
                self.ready = fields
                    .split(' ')
                    .filter_map(|f| f.split_once('='))
                    .map(|(k, v)| (k.to_owned(), v.to_owned()))
                    .collect();
                self.child = Some(child);
                Ok(())
            }
            Err(_) => {
                let _ = child.kill();
                let _ = child.wait();
                Err(std::fs::read_to_string(&log).unwrap_or_default())
            }
        }
    }

    /// SIGTERM, and a clean exit.
    fn stop(&mut self) {
        self.signal(libc::SIGTERM);
        let mut child = self.child.take().unwrap();
        let deadline = Instant::now() + Duration::from_secs(30);
        while child.try_wait().unwrap().is_none() {
            assert!(Instant::now() < deadline, "wrapd did not stop on SIGTERM");
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    #[allow(unsafe_code)] // kill(2); see the SAFETY comment
    fn signal(&self, signal: libc::c_int) {
        let child = self.child.as_ref().expect("running");
        // SAFETY: kill(2) on our own child's pid has no memory effects.
        unsafe { libc::kill(child.id() as libc::pid_t, signal) };
    }

    /// Runs the manifest's probe `which` (its exec command, in the container's env).
    fn probe(&self, which: &str) -> bool {
        let command: Vec<String> = array(&self.container[which]["exec"]["command"])
            .iter()
            .map(|a| self.path(str_of(a)))
            .collect();
        assert!(!command.is_empty(), "{which} is an exec probe");
        Command::new(&command[0])
            .args(&command[1..])
            .envs(self.env.iter().map(|(k, v)| (k, v)))
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .status()
            .unwrap()
            .success()
    }

    fn audit_file(&self) -> PathBuf {
        PathBuf::from(self.path(self.shipped["audit"]["file"].as_str().unwrap()))
    }

    fn audit_lines(&self) -> Vec<wrapd::audit::AuditRecord> {
        std::fs::read_to_string(self.audit_file())
            .unwrap_or_default()
            .lines()
            .map(|l| serde_json::from_str(l).unwrap())
            .collect()
    }

    /// The audit log fails closed: a directory where the file was, reopened on SIGHUP.
    fn break_audit_log(&self) {
        let file = self.audit_file();
        std::fs::rename(&file, file.with_extension("log.1")).unwrap();
        std::fs::create_dir(&file).unwrap();
        self.signal(libc::SIGHUP);
    }

    fn mend_audit_log(&self) {
        std::fs::remove_dir(self.audit_file()).unwrap();
        self.signal(libc::SIGHUP);
    }

    async fn kms(&self) -> KeyManagementServiceClient<Channel> {
        KeyManagementServiceClient::new(connect_unix(&self.ready["kms"]).await.unwrap())
    }
}

impl Drop for Pod {
    fn drop(&mut self) {
        if let Some(mut child) = self.child.take() {
            let _ = child.kill();
            let _ = child.wait();
        }
    }
}

async fn status(kms: &mut KeyManagementServiceClient<Channel>) -> StatusResponse {
    kms.status(StatusRequest {}).await.unwrap().into_inner()
}

/// (ciphertext, key_id)
async fn encrypt(
    kms: &mut KeyManagementServiceClient<Channel>,
    dek: &[u8],
    uid: &str,
) -> (Vec<u8>, String) {
    let encrypted = kms
        .encrypt(EncryptRequest {
            plaintext: dek.to_vec(),
            uid: uid.into(),
        })
        .await
        .unwrap()
        .into_inner();
    (encrypted.ciphertext, encrypted.key_id)
}

async fn decrypt(
    kms: &mut KeyManagementServiceClient<Channel>,
    (ciphertext, key_id): &(Vec<u8>, String),
    uid: &str,
) -> Vec<u8> {
    kms.decrypt(DecryptRequest {
        ciphertext: ciphertext.clone(),
        uid: uid.into(),
        key_id: key_id.clone(),
        annotations: Default::default(),
    })
    .await
    .unwrap_or_else(|e| panic!("{uid}: {e:?}"))
    .into_inner()
    .plaintext
}

/// HA control plane: two plugin instances as the
/// DaemonSet runs them on two control-plane nodes report one key and decrypt each other's
/// blobs; each is named after its node; a new pod on a node continues its audit chain.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn two_plugin_instances_as_the_manifest_runs_them_decrypt_each_others_blobs() {
    let cluster = Cluster::new();
    let mut a = Pod::plugin(&cluster, "cp-a");
    let mut b = Pod::plugin(&cluster, "cp-b");
    a.start().unwrap();
    b.start().unwrap();
    let (mut kms_a, mut kms_b) = (a.kms().await, b.kms().await);
    let (status_a, status_b) = (status(&mut kms_a).await, status(&mut kms_b).await);
    assert_eq!(status_a.healthz, "ok");
    assert_eq!(status_b.healthz, "ok");
    assert_eq!(
        status_a.key_id, status_b.key_id,
        "one alias/kubernetes for every apiserver"
    );

    let from_a = encrypt(&mut kms_a, &[1; 32], "uid-a").await;
    let from_b = encrypt(&mut kms_b, &[2; 32], "uid-b").await;
    assert_eq!(from_a.1, from_b.1);
    assert_eq!(decrypt(&mut kms_b, &from_a, "uid-b-reads-a").await, [1; 32]);
    assert_eq!(decrypt(&mut kms_a, &from_b, "uid-a-reads-b").await, [2; 32]);

    for (pod, node, read) in [(&a, "cp-a", "uid-a-reads-b"), (&b, "cp-b", "uid-b-reads-a")] {
        let lines = pod.audit_lines();
        assert!(
            lines.iter().all(|l| l.instance.as_deref() == Some(node)),
            "{node}: {lines:?}"
        );
        assert!(
            lines
                .iter()
                .any(|l| l.request_id == read && l.operation == "Unwrap" && l.outcome == "OK")
        );
    }

    // A rollout on cp-a: the new pod takes the node's name and log (a gap would refuse
    // the start) and reads cp-b's blob.
    let last = a.audit_lines().last().unwrap().seq;
    a.stop();
    drop(a);
    let mut next = Pod::plugin(&cluster, "cp-a");
    next.start().unwrap();
    let mut kms_next = next.kms().await;
    assert_eq!(
        decrypt(&mut kms_next, &from_b, "uid-next-reads-b").await,
        [2; 32]
    );
    let line = next
        .audit_lines()
        .into_iter()
        .find(|l| l.request_id == "uid-next-reads-b")
        .unwrap();
    assert!(line.seq > last && line.instance.as_deref() == Some("cp-a"));
}

/// Starts `pod` and runs its probes through an audit log failure: all pass, then readiness
/// fails while the log fails closed (liveness does not: a restart would not mend it), and
/// passes again once the log is mended.
async fn probe_through_an_audit_failure(pod: &mut Pod) {
    pod.start().unwrap();
    for probe in ["startupProbe", "readinessProbe", "livenessProbe"] {
        assert!(pod.probe(probe), "{probe}");
    }
    pod.break_audit_log();
    eventually("readiness fails", || {
        let ready = pod.probe("readinessProbe");
        async move { !ready }
    })
    .await;
    assert!(pod.probe("livenessProbe"));
    pod.mend_audit_log();
    eventually("ready again", || {
        let ready = pod.probe("readinessProbe");
        async move { ready }
    })
    .await;
}

/// Probes: the plugin's probes ask gRPC health and
/// the KMS Status; readiness fails while the audit log fails closed (liveness does not: a
/// restart would not mend it) and passes once it is mended; a dead daemon fails all.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_plugin_probes_fail_while_the_audit_log_fails_closed() {
    let cluster = Cluster::new();
    let mut pod = Pod::plugin(&cluster, "cp-a");
    probe_through_an_audit_failure(&mut pod).await;
    pod.stop();
    assert!(!pod.probe("livenessProbe") && !pod.probe("readinessProbe"));
}

/// Fleet: the StatefulSet's pod is unready while
/// it refuses everything (a failed audit log), names its chain after the pod, continues it
/// across a rollout, and a pod whose volume lost the log is refused, not started afresh.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_fleet_pod_is_unready_while_its_audit_log_fails_and_keeps_its_chain() {
    let cluster = Cluster::new();
    let mut pod = Pod::fleet(&cluster, "wrapd-0");
    probe_through_an_audit_failure(&mut pod).await;

    // An audited call over the pod's socket (the dev policy grants the test's user).
    let mut keys = KeyServiceClient::new(connect_unix(&pod.ready["socket"]).await.unwrap());
    keys.describe_key(KeyRef {
        key_id: "alias/kubernetes".into(),
    })
    .await
    .unwrap();
    let lines = pod.audit_lines();
    assert!(lines.iter().any(|l| l.operation == "DescribeKey"));
    assert!(
        lines
            .iter()
            .all(|l| l.instance.as_deref() == Some("wrapd-0"))
    );

    // Rollout: wrapd-0 again, on its claim.
    pod.stop();
    drop(pod);
    let mut next = Pod::fleet(&cluster, "wrapd-0");
    next.start().unwrap();
    next.stop();
    // The claim lost the log: refused, with the way out.
    let audit = next.audit_file();
    drop(next);
    std::fs::remove_file(&audit).unwrap();
    let mut lost = Pod::fleet(&cluster, "wrapd-0");
    let refused = lost.start().expect_err("a lost audit log is noticed");
    assert!(refused.contains("--accept-audit-gap"), "{refused}");
}
