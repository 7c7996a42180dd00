//! Packaging: the systemd unit passes `systemd-analyze verify`, the Kubernetes
//! manifests pass the Kubernetes schemas (`kubernetes-validate`, from PyPI) and say what
//! they must (one shared store for the KMS plugin, no Kubernetes Secret behind it, a
//! volume per fleet daemon for its audit chain, gRPC health probes, confined pods, metrics
//! on loopback), the container recipe builds. Each tool-backed check is skipped, with a
//! message, where its tool is missing (no container engine runs on the CI machines).
//! `kubernetes_manifests.rs` runs daemons as the manifests configure them.

use std::process::Command;

use serde_json::Value;

#[test]
fn the_systemd_unit_passes_systemd_analyze_verify() {
    let Ok(version) = Command::new("systemd-analyze").arg("--version").output() else {
        eprintln!("systemd-analyze is not installed: skipping the unit check");
        return;
    };
    assert!(version.status.success());
    let unit = std::fs::read_to_string(
        std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("packaging/wrapd.service"),
    )
    .unwrap();
    assert!(unit.contains("NoNewPrivileges=yes") && unit.contains("LimitCORE=0"));
    // Verify checks that ExecStart's binary exists: point it at the one just built.
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("wrapd.service");
    std::fs::write(
        &path,
        unit.replace("/usr/local/bin/wrapd", env!("CARGO_BIN_EXE_wrapd")),
    )
    .unwrap();
    let out = Command::new("systemd-analyze")
        .arg("verify")
        .arg(&path)
        .output()
        .unwrap();
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(out.status.success() && stderr.trim().is_empty(), "{stderr}");
}

fn packaging(path: &str) -> std::path::PathBuf {
    std::path::Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("packaging")
        .join(path)
}

/// The documents of `packaging/kubernetes/FILE`, parsed by PyYAML (as the encryption
/// configuration check does) and handed over as JSON.
pub(crate) fn manifest(file: &str) -> Vec<Value> {
    let out = Command::new("python3")
        .args([
            "-c",
            "import sys, json, yaml; json.dump(list(yaml.safe_load_all(open(sys.argv[1]))), sys.stdout)",
        ])
        .arg(packaging(&format!("kubernetes/{file}")))
        .output()
        .expect("python3 with PyYAML");
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    serde_json::from_slice(&out.stdout).unwrap()
}

/// The resource of `kind` named `name`.
pub(crate) fn resource<'a>(docs: &'a [Value], kind: &str, name: &str) -> &'a Value {
    docs.iter()
        .find(|d| d["kind"] == kind && d["metadata"]["name"] == name)
        .unwrap_or_else(|| panic!("no {kind}/{name} in the manifest"))
}

/// A ConfigMap's `wrapd.toml`, parsed.
pub(crate) fn wrapd_toml(docs: &[Value], config_map: &str) -> toml::Table {
    let text = resource(docs, "ConfigMap", config_map)["data"]["wrapd.toml"]
        .as_str()
        .expect("wrapd.toml in the ConfigMap");
    toml::from_str(text).unwrap()
}

fn array(value: &Value) -> &[Value] {
    value.as_array().map(Vec::as_slice).unwrap_or_default()
}

/// The env entry `name` of a container.
fn env<'a>(container: &'a Value, name: &str) -> &'a Value {
    array(&container["env"])
        .iter()
        .find(|e| e["name"] == name)
        .unwrap_or_else(|| panic!("no env {name} in container {}", container["name"]))
}

/// The workloads: (file, kind, name).
const WORKLOADS: [(&str, &str, &str); 2] = [
    ("kms-plugin.yaml", "DaemonSet", "wrapd-kms-plugin"),
    ("fleet.yaml", "StatefulSet", "wrapd"),
];

#[test]
fn the_kubernetes_manifests_pass_the_kubernetes_schemas() {
    let Ok(out) = Command::new("kubernetes-validate")
        .arg("--strict")
        .arg(packaging("kubernetes/kms-plugin.yaml"))
        .arg(packaging("kubernetes/fleet.yaml"))
        .output()
    else {
        eprintln!("kubernetes-validate is not installed: skipping the manifest check");
        return;
    };
    let text =
        String::from_utf8_lossy(&out.stderr).into_owned() + &String::from_utf8_lossy(&out.stdout);
    assert!(out.status.success(), "{text}");
    // Namespace, 2 ConfigMaps, DaemonSet, StatefulSet, Service, headless Service.
    assert_eq!(text.matches(" passed for resource ").count(), 7, "{text}");
}

#[test]
fn the_encryption_configuration_points_the_apiserver_at_the_plugin_socket() {
    // No published schema covers EncryptionConfiguration: check its shape with a YAML parser.
    let script = r#"
import sys, yaml
doc = yaml.safe_load(open(sys.argv[1]))
assert doc["kind"] == "EncryptionConfiguration", doc
assert doc["apiVersion"] == "apiserver.config.k8s.io/v1", doc
kms = doc["resources"][0]["providers"][0]["kms"]
assert kms["apiVersion"] == "v2" and kms["endpoint"] == "unix:///var/run/wrapd/kms.sock", kms
"#;
    let out = Command::new("python3")
        .args(["-c", script])
        .arg(packaging("kubernetes/encryption-configuration.yaml"))
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    // ... and the plugin serves that socket, in a directory the node shares with it.
    let docs = manifest("kms-plugin.yaml");
    let config = wrapd_toml(&docs, "wrapd-kms-plugin");
    assert_eq!(
        config["kms"]["path"].as_str(),
        Some("/var/run/wrapd/kms.sock")
    );
    let spec = &resource(&docs, "DaemonSet", "wrapd-kms-plugin")["spec"]["template"]["spec"];
    let sockets = array(&spec["containers"][0]["volumeMounts"])
        .iter()
        .find(|m| m["mountPath"] == "/var/run/wrapd")
        .expect("the socket directory is mounted");
    let volume = array(&spec["volumes"])
        .iter()
        .find(|v| v["name"] == sockets["name"])
        .unwrap();
    assert_eq!(volume["hostPath"]["path"], "/var/run/wrapd");
}

/// Every pod: no service account token, the runtime's seccomp profile, uid 10001 without privileges; probes ask gRPC health, never a bare
/// TCP connect (a daemon that refuses everything must not be ready).
#[test]
fn every_pod_is_confined_and_probed_through_grpc_health() {
    for (file, kind, name) in WORKLOADS {
        let docs = manifest(file);
        let spec = &resource(&docs, kind, name)["spec"]["template"]["spec"];
        assert_eq!(spec["automountServiceAccountToken"], false, "{name}");
        assert_eq!(
            spec["securityContext"]["seccompProfile"]["type"], "RuntimeDefault",
            "{name}"
        );
        for container in array(&spec["containers"]) {
            let context = |field: &str| {
                let own = &container["securityContext"][field];
                if own.is_null() {
                    spec["securityContext"][field].clone()
                } else {
                    own.clone()
                }
            };
            assert_eq!(context("runAsUser"), 10001, "{name}");
            assert_eq!(context("runAsNonRoot"), true, "{name}");
            let own = &container["securityContext"];
            assert_eq!(own["allowPrivilegeEscalation"], false, "{name}");
            assert_eq!(own["readOnlyRootFilesystem"], true, "{name}");
            assert_eq!(
                own["capabilities"]["drop"],
                serde_json::json!(["ALL"]),
                "{name}"
            );
            for probe in ["startupProbe", "readinessProbe", "livenessProbe"] {
                let probe_spec = &container[probe];
                assert!(probe_spec["tcpSocket"].is_null(), "{name} {probe}");
                let command: Vec<&str> = array(&probe_spec["exec"]["command"])
                    .iter()
                    .map(|a| a.as_str().unwrap())
                    .collect();
                assert_eq!(
                    command.get(..2),
                    Some(&["/usr/local/bin/wrapd", "health"][..]),
                    "{name} {probe}"
                );
                // Readiness needs SERVING (or a healthy KMS Status); only the others
                // settle for an answer.
                assert_eq!(
                    command.contains(&"--alive"),
                    probe != "readinessProbe",
                    "{name} {probe}: {command:?}"
                );
            }
        }
    }
}

/// HA: every plugin instance keeps its metadata in
/// one PostgreSQL store (one `alias/kubernetes` for all apiservers), is named after its
/// node, and needs no Kubernetes Secret (Secrets are what it decrypts).
#[test]
fn the_plugin_instances_share_one_store_and_need_no_secret() {
    let docs = manifest("kms-plugin.yaml");
    let config = wrapd_toml(&docs, "wrapd-kms-plugin");
    let store = config["store"].as_table().unwrap();
    assert!(
        store.contains_key("postgres") && !store.contains_key("sqlite"),
        "{store:?}"
    );
    assert!(
        !store.contains_key("password_env")
            && !config["hsm"].as_table().unwrap().contains_key("pin_env"),
        "secrets come from the node's files, not from Kubernetes Secrets"
    );
    let daemon_set = resource(&docs, "DaemonSet", "wrapd-kms-plugin");
    let spec = &daemon_set["spec"]["template"]["spec"];
    let container = &spec["containers"][0];
    let var = store["instance_env"].as_str().expect("store.instance_env");
    assert_eq!(
        env(container, var)["valueFrom"]["fieldRef"]["fieldPath"],
        "spec.nodeName"
    );
    let no_secret = |c: &Value| {
        array(&c["env"])
            .iter()
            .all(|e| e["valueFrom"]["secretKeyRef"].is_null())
    };
    assert!(array(&spec["containers"]).iter().all(no_secret));
    assert!(array(&spec["initContainers"]).iter().all(no_secret));
    assert!(
        array(&spec["volumes"])
            .iter()
            .all(|v| v["secret"].is_null() && v["projected"].is_null()),
        "no Secret volume"
    );
    // One pod per node at a time: a surge pod would contend for the node's instance name.
    assert_eq!(
        daemon_set["spec"]["updateStrategy"]["rollingUpdate"]["maxSurge"],
        0
    );
}

/// Host directories the kubelet creates are root's, 0755; every one the daemon writes is handed to uid 10001 by an init container
/// before it starts.
#[test]
fn every_host_directory_the_plugin_writes_is_handed_to_its_user() {
    let docs = manifest("kms-plugin.yaml");
    let spec = &resource(&docs, "DaemonSet", "wrapd-kms-plugin")["spec"]["template"]["spec"];
    let volumes = array(&spec["volumes"]);
    let writable_host_dirs: Vec<&str> = array(&spec["containers"][0]["volumeMounts"])
        .iter()
        .filter(|m| m["readOnly"] != true)
        .filter(|m| {
            volumes
                .iter()
                .any(|v| v["name"] == m["name"] && !v["hostPath"].is_null())
        })
        .map(|m| m["mountPath"].as_str().unwrap())
        .collect();
    assert!(!writable_host_dirs.is_empty());
    for dir in writable_host_dirs {
        let handed = array(&spec["initContainers"]).iter().any(|init| {
            let script = array(&init["command"])
                .iter()
                .filter_map(Value::as_str)
                .collect::<Vec<_>>()
                .join(" ");
            script.contains("chown 10001:10001")
                && script.contains(dir)
                && array(&init["volumeMounts"])
                    .iter()
                    .any(|m| m["mountPath"] == dir)
        });
        assert!(handed, "{dir} is not handed to uid 10001");
    }
}

/// Each fleet daemon has a stable name (its instance name, which names its audit chain) and a PersistentVolume for its audit log,
/// so a rollout continues each chain and a lost log is noticed.
#[test]
fn each_fleet_daemon_keeps_its_audit_chain_on_a_volume_of_its_own() {
    let docs = manifest("fleet.yaml");
    assert!(docs.iter().all(|d| d["kind"] != "Deployment"));
    let set = resource(&docs, "StatefulSet", "wrapd");
    let config = wrapd_toml(&docs, "wrapd-fleet");
    let var = config["store"]["instance_env"]
        .as_str()
        .expect("store.instance_env");
    let container = &set["spec"]["template"]["spec"]["containers"][0];
    assert_eq!(
        env(container, var)["valueFrom"]["fieldRef"]["fieldPath"],
        "metadata.name"
    );
    let audit_file = std::path::Path::new(config["audit"]["file"].as_str().unwrap());
    let audit_dir = audit_file.parent().unwrap().to_str().unwrap();
    let mount = array(&container["volumeMounts"])
        .iter()
        .find(|m| m["mountPath"] == audit_dir)
        .expect("the audit directory is mounted");
    assert!(
        array(&set["spec"]["volumeClaimTemplates"])
            .iter()
            .any(|t| t["metadata"]["name"] == mount["name"]),
        "the audit log is on a volume claim of its own"
    );
}

/// Metrics are plain, unauthenticated HTTP that lists key ids; loopback
/// only, and no Service publishes it.
#[test]
fn metrics_listen_on_loopback_and_no_service_publishes_them() {
    for (file, config_map) in [
        ("kms-plugin.yaml", "wrapd-kms-plugin"),
        ("fleet.yaml", "wrapd-fleet"),
    ] {
        let docs = manifest(file);
        let config = wrapd_toml(&docs, config_map);
        if let Some(listen) = config.get("metrics").map(|m| {
            m.get("listen")
                .and_then(toml::Value::as_str)
                .unwrap_or("127.0.0.1:9464")
        }) {
            let addr: std::net::SocketAddr = listen.parse().unwrap();
            assert!(addr.ip().is_loopback(), "{file}: metrics on {listen}");
        }
        for service in docs.iter().filter(|d| d["kind"] == "Service") {
            for port in array(&service["spec"]["ports"]) {
                assert_eq!(port["targetPort"], "grpc", "{file}: {port}");
            }
        }
    }
}

#[test]
fn the_container_recipe_builds_where_a_container_engine_runs() {
    let engine = ["docker", "podman"].into_iter().find(|engine| {
        Command::new(engine)
            .arg("info")
            .output()
            .is_ok_and(|out| out.status.success())
    });
    let Some(engine) = engine else {
        eprintln!("no container engine runs here: skipping the image build");
        return;
    };
    let out = Command::new(engine)
        .args(["build", "-f"])
        .arg(packaging("Containerfile"))
        .args(["-t", "wrapd:test"])
        .arg(env!("CARGO_MANIFEST_DIR"))
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
}
