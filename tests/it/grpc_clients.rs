//! Real gRPC clients with their default settings work on the unix sockets. The official
//! Python client (grpcio, gRPC C-core) sends the socket path as `:authority`, which h2 alone
//! refuses; wrapd rewrites it on unix sockets (`server/authority.rs`). Every RPC of
//! `DataKeyService`, `KeyService` and the KMS v2 plugin is called, 150 Unwraps on one
//! connection with a distinct `x-request-id` each (the client's HPACK table fills and
//! evicts), through `unix:///path`, `unix:/path`, a percent-encoded and an empty authority,
//! and a long socket path. On TCP, a malformed authority is still refused.

use crate::common;

use std::path::Path;
use std::process::Command;

use common::DevDaemon;

fn python_clients(socket: &Path, kms: &Path, scheme: &str, authority: Option<&str>) {
    let script = Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/python/grpc_default_clients.py");
    let target = |path: &Path| format!("{scheme}{}", path.display());
    let mut command = Command::new("python3");
    command.arg(&script).arg(target(socket)).arg(target(kms));
    if let Some(authority) = authority {
        command.arg(authority);
    }
    let out = command.output().expect("python3");
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success() && stdout.starts_with("ok "),
        "{scheme} {authority:?}: {stdout}\n{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let calls: u32 = stdout.trim()["ok ".len()..].parse().unwrap();
    assert!(calls > 170, "{calls} calls");
}

#[test]
fn grpcio_with_default_options_calls_every_rpc_on_the_unix_sockets() {
    let daemon = DevDaemon::start();
    let kms = daemon.kms_socket();
    python_clients(&daemon.socket, &kms, "unix://", None);
    python_clients(&daemon.socket, &kms, "unix:", None);
    let encoded = format!("{}", daemon.socket.display()).replace('/', "%2F");
    python_clients(&daemon.socket, &kms, "unix:", Some(&encoded));
}

#[test]
fn a_long_socket_path_works_too() {
    // Unix socket paths are limited to 107 bytes: use most of that.
    let base = tempfile::Builder::new().prefix("w").tempdir().unwrap();
    let used = base.path().as_os_str().len() + "/wrapd.sock".len() + 1;
    let long = base
        .path()
        .join("d".repeat(100usize.saturating_sub(used).max(1)));
    std::fs::create_dir(&long).unwrap();
    let socket = long.join("wrapd.sock");
    let daemon = DevDaemon::start();
    std::os::unix::fs::symlink(&daemon.socket, &socket).unwrap();
    let kms = long.join("kms.sock");
    std::os::unix::fs::symlink(daemon.kms_socket(), &kms).unwrap();
    python_clients(&socket, &kms, "unix://", None);
}

/// The rewrite is for unix sockets only: over TCP, h2 still refuses a malformed authority,
/// while a valid one works.
#[test]
fn tcp_still_refuses_a_malformed_authority() {
    let daemon = DevDaemon::start();
    let pki = daemon.dir().join("pki");
    let script = Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/python/grpc_default_clients.py");
    let call = |authority: &str| {
        let out = Command::new("python3")
            .arg(&script)
            .arg("tls")
            .arg(format!("localhost:{}", daemon.tcp.port()))
            .args(["ca.pem", "client.pem", "client.key"].map(|f| pki.join(f)))
            .arg(authority)
            .output()
            .expect("python3");
        String::from_utf8_lossy(&out.stdout).trim().to_owned()
    };
    assert_eq!(call(&format!("localhost:{}", daemon.tcp.port())), "ok 1");
    let refused = call("/run/wrapd/wrapd.sock");
    assert!(refused.starts_with("refused"), "{refused}");
}
