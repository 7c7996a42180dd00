//! Raw garbage, half-open connections and oversized messages on the unix socket and the TCP
//! port neither crash the daemon nor starve other clients.

use crate::common;

use std::io::Write;
use std::net::TcpStream;
use std::os::unix::net::UnixStream;
use std::time::Duration;

use common::{DevDaemon, create_key};
use tonic::Code;
use wrapd::proto::{GenerateDataKeyRequest, ListKeysRequest, UnwrapRequest, WrapRequest};

const H2_PREFACE: &[u8] = b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n";

fn garbage() -> Vec<Vec<u8>> {
    let mut frames = vec![
        b"GET / HTTP/1.1\r\nHost: x\r\n\r\n".to_vec(),
        vec![0u8; 4096],
        (0..=255u8).cycle().take(10_000).collect(),
        // The HTTP/2 preface, then a frame header announcing a 16 MiB DATA frame.
        [
            H2_PREFACE,
            &[0xff, 0xff, 0xff, 0x00, 0x00, 0x00, 0x00, 0x00, 0x01],
        ]
        .concat(),
        // The preface, then a SETTINGS frame with a broken length.
        [
            H2_PREFACE,
            &[
                0x00, 0x00, 0x05, 0x04, 0x00, 0x00, 0x00, 0x00, 0x00, 1, 2, 3, 4, 5,
            ],
        ]
        .concat(),
        // A TLS ClientHello-looking record that lies about its length.
        vec![0x16, 0x03, 0x01, 0xff, 0xff, 0x01, 0x00, 0xff, 0xfc],
    ];
    frames.push(H2_PREFACE.to_vec());
    frames
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn garbage_and_half_open_connections_do_not_hurt_other_clients() {
    let daemon = DevDaemon::start();
    let mut keys = daemon.keys().await;
    let key = create_key(&mut keys, "").await;

    // Half-open connections that never speak, on both listeners, held open throughout.
    let idle_unix: Vec<_> = (0..64)
        .map(|_| UnixStream::connect(&daemon.socket).unwrap())
        .collect();
    let idle_tcp: Vec<_> = (0..64)
        .map(|_| TcpStream::connect(daemon.tcp).unwrap())
        .collect();
    // Garbage on both listeners.
    for bytes in garbage() {
        let mut unix = UnixStream::connect(&daemon.socket).unwrap();
        let _ = unix.write_all(&bytes);
        let mut tcp = TcpStream::connect(daemon.tcp).unwrap();
        let _ = tcp.write_all(&bytes);
        let kms = std::os::unix::net::UnixStream::connect(daemon.kms_socket());
        if let Ok(mut kms) = kms {
            let _ = kms.write_all(&bytes);
        }
    }

    // Well-behaved clients are served, on every listener, within their deadline.
    let mut data = daemon.data().await;
    tokio::time::timeout(
        Duration::from_secs(10),
        data.generate_data_key(GenerateDataKeyRequest {
            key_id: key.key_id.clone(),
            ..Default::default()
        }),
    )
    .await
    .expect("unix client starved")
    .unwrap();
    let pki = daemon.dir().join("pki");
    let tls = tokio::time::timeout(
        Duration::from_secs(10),
        daemon.tls_channel(&pki, "client", None),
    )
    .await
    .expect("TLS handshake starved")
    .unwrap();
    tokio::time::timeout(
        Duration::from_secs(10),
        wrapd::client::KeyServiceClient::new(tls).list_keys(ListKeysRequest::default()),
    )
    .await
    .expect("TLS client starved")
    .unwrap();

    // Oversized messages are refused without harm.
    let huge = data
        .wrap(WrapRequest {
            key_id: key.key_id.clone(),
            plaintext: vec![0; 8 * 1024 * 1024],
            encryption_context: Default::default(),
        })
        .await
        .unwrap_err();
    assert!(
        matches!(
            huge.code(),
            Code::ResourceExhausted | Code::OutOfRange | Code::InvalidArgument
        ),
        "{huge:?}"
    );
    let big_blob = data
        .unwrap(UnwrapRequest {
            ciphertext_blob: vec![0x57; 1024 * 1024],
            ..Default::default()
        })
        .await
        .unwrap_err();
    assert!(
        matches!(
            big_blob.code(),
            Code::OutOfRange | Code::ResourceExhausted | Code::InvalidArgument
        ),
        "{big_blob:?}"
    );

    drop(idle_unix);
    drop(idle_tcp);
    // Still alive and serving.
    data.generate_data_key(GenerateDataKeyRequest {
        key_id: key.key_id.clone(),
        ..Default::default()
    })
    .await
    .unwrap();
    let log = daemon.log();
    assert!(!log.contains("panicked"), "the daemon panicked:\n{log}");
}

/// Sets `[limits]` in the daemon's config (applies from the next start).
fn set_limits(daemon: &DevDaemon, limits: &str) {
    let path = daemon.config_path();
    let config = std::fs::read_to_string(&path).unwrap();
    std::fs::write(&path, format!("{config}\n[limits]\n{limits}\n")).unwrap();
}

/// Under a low open-file limit, a flood of idle TCP connections that never start a handshake
/// neither starves the unix socket nor stays open: the TCP listener's cap leaves room for the
/// other listeners, and idle sockets are closed after the timeout.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_flood_of_idle_tcp_connections_is_capped_and_closed() {
    use tokio::io::AsyncReadExt;

    let mut daemon = DevDaemon::start_with(&[], &["prlimit", "--nofile=200:200", "--"]);
    assert!(daemon.stop().success());
    set_limits(
        &daemon,
        "handshake_timeout_ms = 1000\nidle_timeout_ms = 1500",
    );
    daemon.restart_stopped();
    assert!(
        daemon.log().contains("lowers the connection cap"),
        "the cap follows the open-file limit"
    );

    let mut flood = Vec::new();
    for _ in 0..400 {
        match tokio::net::TcpStream::connect(daemon.tcp).await {
            Ok(stream) => flood.push(stream),
            Err(_) => break,
        }
    }
    assert!(flood.len() >= 150, "{} connections", flood.len());
    // The unix socket still serves, on new connections, while the flood is open.
    let mut keys = daemon.keys().await;
    let key = common::create_key(&mut keys, "").await;
    let mut data = daemon.data().await;
    common::generate(&mut data, &key.key_id, &[]).await;

    // Every flooding socket is closed by the daemon: over the cap at once, the others when
    // the handshake timeout passes.
    let closed = futures_closed(&mut flood).await;
    assert_eq!(closed, flood.len(), "every idle socket was closed");
    // And the TCP listener serves again.
    let channel = daemon
        .tls_channel(&daemon.dir().join("pki"), "client", None)
        .await
        .unwrap();
    wrapd::client::KeyServiceClient::new(channel)
        .list_keys(ListKeysRequest::default())
        .await
        .unwrap();

    async fn futures_closed(flood: &mut [tokio::net::TcpStream]) -> usize {
        let mut closed = 0;
        for stream in flood {
            let mut buf = [0u8; 1];
            match tokio::time::timeout(Duration::from_secs(5), stream.read(&mut buf)).await {
                Ok(Ok(0)) | Ok(Err(_)) => closed += 1,
                _ => {}
            }
        }
        closed
    }
}

/// A request whose body is trickled a byte at a time (an attacker's TLS socket, Python's
/// `ssl`) is answered 408 and its connection closed once the body deadline passes, long
/// before the trickle would end.
#[test]
fn a_request_body_trickled_byte_by_byte_is_cut_off_at_its_deadline() {
    let mut daemon = DevDaemon::start();
    assert!(daemon.stop().success());
    set_limits(&daemon, "handshake_timeout_ms = 1000");
    daemon.restart_stopped();
    let port = daemon.aws.rsplit(':').next().unwrap().to_owned();
    let script = r#"
import socket, ssl, sys, time
ctx = ssl.create_default_context(cafile=sys.argv[1])
sock = ctx.wrap_socket(socket.create_connection(("127.0.0.1", int(sys.argv[2]))), server_hostname="127.0.0.1")
length = 200
sock.sendall(b"POST / HTTP/1.1\r\nHost: 127.0.0.1\r\nX-Amz-Target: TrentService.ListKeys\r\n"
             b"Content-Type: application/x-amz-json-1.1\r\nContent-Length: %d\r\n\r\n" % length)
sock.settimeout(0.25)
answer = b""
sent = 0
while sent < length:
    try:
        sock.sendall(b" ")
        sent += 1
    except OSError:
        break
    try:
        chunk = sock.recv(4096)
        if not chunk:
            break
        answer += chunk
    except socket.timeout:
        pass
print(sent)
print(answer.split(b"\r\n")[0].decode())
"#;
    let out = std::process::Command::new("python3")
        .arg("-c")
        .arg(script)
        .arg(daemon.dir().join("pki/ca.pem"))
        .arg(&port)
        .output()
        .unwrap();
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let mut lines = stdout.lines();
    let sent: usize = lines.next().unwrap().parse().unwrap();
    assert!(sent < 200, "the whole trickled body was read: {stdout}");
    assert_eq!(
        lines.next(),
        Some("HTTP/1.1 408 Request Timeout"),
        "{stdout}"
    );
}
