//! Access control over real sockets: the mutual-TLS matrix, unix peer identities, and the
//! policy (operations, globs, aliases, required context, SIGHUP reload).

use crate::common;

use std::os::unix::fs::PermissionsExt;
use std::os::unix::process::CommandExt;
use std::path::Path;
use std::process::Command;
use std::time::Duration;

use common::{DevDaemon, assert_code, create_key, ctx, eventually};
use tonic::Code;
use wrapd::client::{DataKeyServiceClient, KeyServiceClient};
use wrapd::pki::{self, ClientName, Validity};
use wrapd::proto::{
    AliasRequest, CreateKeyRequest, GenerateDataKeyRequest, KeyRef, ListKeysRequest, ReWrapRequest,
    UnwrapRequest,
};

/// Issues a client certificate from the daemon's dev CA into `dir/stem.{pem,key}`.
fn issue(daemon: &DevDaemon, dir: &Path, stem: &str, name: ClientName, validity: Validity) {
    let ca = pki::read(&daemon.dir().join("pki"), "ca").unwrap();
    pki::write(dir, stem, &pki::issue_client(&ca, &name, validity).unwrap()).unwrap();
}

async fn list_keys_over_tls(
    daemon: &DevDaemon,
    dir: &Path,
    stem: &str,
    ca: Option<&Path>,
) -> Result<(), String> {
    let channel = daemon
        .tls_channel(dir, stem, ca)
        .await
        .map_err(|e| e.to_string())?;
    KeyServiceClient::new(channel)
        .list_keys(ListKeysRequest::default())
        .await
        .map(|_| ())
        .map_err(|s| format!("{:?}: {}", s.code(), s.message()))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn mutual_tls_matrix() {
    let daemon = DevDaemon::start();
    let certs = tempfile::tempdir().unwrap();
    let dev_pki = daemon.dir().join("pki");

    // The dev client certificate: allowed everything by the dev policy.
    list_keys_over_tls(&daemon, &dev_pki, "client", None)
        .await
        .unwrap();
    let mut keys =
        KeyServiceClient::new(daemon.tls_channel(&dev_pki, "client", None).await.unwrap());
    let key = keys
        .create_key(CreateKeyRequest::default())
        .await
        .unwrap()
        .into_inner();

    // No client certificate: refused at the handshake.
    let no_cert = async {
        let tls = tonic::transport::ClientTlsConfig::new().ca_certificate(
            tonic::transport::Certificate::from_pem(std::fs::read(dev_pki.join("ca.pem")).unwrap()),
        );
        let channel = tonic::transport::Endpoint::from_shared(format!("https://{}", daemon.tcp))
            .unwrap()
            .tls_config(tls)
            .unwrap()
            .connect()
            .await
            .map_err(|e| e.to_string())?;
        KeyServiceClient::new(channel)
            .list_keys(ListKeysRequest::default())
            .await
            .map(|_| ())
            .map_err(|s| s.to_string())
    };
    assert!(
        no_cert.await.is_err(),
        "a client without a certificate got through"
    );

    // An expired certificate from the right CA.
    let now = time::OffsetDateTime::now_utc();
    let expired = Validity {
        not_before: now - Duration::from_secs(10 * 86_400),
        not_after: now - Duration::from_secs(86_400),
    };
    issue(
        &daemon,
        certs.path(),
        "expired",
        ClientName::Uri("spiffe://wrapd-dev/user/root".into()),
        expired,
    );
    assert!(
        list_keys_over_tls(&daemon, certs.path(), "expired", None)
            .await
            .is_err(),
        "expired certificate accepted"
    );

    // A certificate for the same principal from another CA.
    let foreign = pki::new_ca("foreign CA", Validity::days(1)).unwrap();
    let forged = pki::issue_client(
        &foreign,
        &ClientName::Uri("spiffe://wrapd-dev/user/root".into()),
        Validity::days(1),
    )
    .unwrap();
    pki::write(certs.path(), "forged", &forged).unwrap();
    assert!(
        list_keys_over_tls(&daemon, certs.path(), "forged", None)
            .await
            .is_err(),
        "foreign CA accepted"
    );

    // A valid certificate for a principal the policy does not know: PERMISSION_DENIED, and
    // the same answer for an existing key and a missing one.
    issue(
        &daemon,
        certs.path(),
        "stranger",
        ClientName::Uri("spiffe://example.org/stranger".into()),
        Validity::days(1),
    );
    let err = list_keys_over_tls(&daemon, certs.path(), "stranger", None)
        .await
        .unwrap_err();
    assert!(err.starts_with("PermissionDenied"), "{err}");
    let channel = daemon
        .tls_channel(certs.path(), "stranger", None)
        .await
        .unwrap();
    let mut stranger = DataKeyServiceClient::new(channel.clone());
    let existing = assert_code(
        stranger
            .generate_data_key(GenerateDataKeyRequest {
                key_id: key.key_id.clone(),
                ..Default::default()
            })
            .await,
        Code::PermissionDenied,
    );
    let missing = assert_code(
        stranger
            .generate_data_key(GenerateDataKeyRequest {
                key_id: "key/00000000000000000000000000000000".into(),
                ..Default::default()
            })
            .await,
        Code::PermissionDenied,
    );
    assert_eq!(existing.message(), missing.message());
    assert_code(
        KeyServiceClient::new(channel)
            .describe_key(KeyRef {
                key_id: key.key_id.clone(),
            })
            .await,
        Code::PermissionDenied,
    );

    // The audit log names the TLS principals and the denials.
    let audit = daemon.audit_lines();
    assert!(
        audit
            .iter()
            .any(|r| r.principal == "tls:uri=spiffe://wrapd-dev/user/root"
                && r.transport == "tcp"
                && r.outcome == "OK")
    );
    assert!(
        audit
            .iter()
            .any(|r| r.principal == "tls:uri=spiffe://example.org/stranger"
                && r.outcome == "PERMISSION_DENIED")
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn unix_peers_are_identified_by_uid() {
    let mut daemon = DevDaemon::start();
    // Let other users reach the socket, so that the policy (not the file mode) decides.
    daemon.stop();
    let config = std::fs::read_to_string(daemon.config_path()).unwrap();
    std::fs::write(
        daemon.config_path(),
        config.replace("mode = \"0600\"", "mode = \"0666\""),
    )
    .unwrap();
    std::fs::set_permissions(daemon.dir(), std::fs::Permissions::from_mode(0o711)).unwrap();
    daemon.restart_stopped();

    // wrapctl, copied where any user may run it.
    let bin = daemon.dir().join("wrapctl");
    std::fs::copy(env!("CARGO_BIN_EXE_wrapctl"), &bin).unwrap();
    std::fs::set_permissions(&bin, std::fs::Permissions::from_mode(0o755)).unwrap();
    let run_as = |uid: Option<u32>| {
        let mut command = Command::new(&bin);
        command
            .args(["--json", "--socket"])
            .arg(&daemon.socket)
            .args(["keys", "list"]);
        if let Some(uid) = uid {
            command.uid(uid).gid(uid);
        }
        // A child another test thread forked while the copy was open for writing holds it
        // open until that child execs (ETXTBSY for a moment): retry.
        for _ in 0..100 {
            match command.output() {
                Err(e) if e.kind() == std::io::ErrorKind::ExecutableFileBusy => {
                    std::thread::sleep(std::time::Duration::from_millis(20));
                }
                other => return other.unwrap(),
            }
        }
        panic!("{} stayed busy", bin.display());
    };

    // The owner (uid 0, granted by the dev policy) is allowed.
    let owner = run_as(None);
    assert!(
        owner.status.success(),
        "{}",
        String::from_utf8_lossy(&owner.stderr)
    );

    // Another uid is denied by the policy.
    let nobody = run_as(Some(65534));
    assert!(!nobody.status.success());
    let stderr = String::from_utf8_lossy(&nobody.stderr);
    assert!(stderr.contains("PermissionDenied"), "{stderr}");
    let audit = daemon.audit_lines();
    let denial = audit
        .iter()
        .find(|r| r.principal == "unix:uid=65534")
        .expect("denial audited");
    assert_eq!(denial.outcome, "PERMISSION_DENIED");
    assert_eq!(denial.transport, "unix");

    // Granting that uid ListKeys (SIGHUP reload) lets it in.
    let policy = std::fs::read_to_string(daemon.dir().join("policy.toml")).unwrap();
    std::fs::write(
        daemon.dir().join("policy.toml"),
        format!("{policy}\n[[grant]]\nprincipals = [\"unix:uid=65534\"]\noperations = [\"ListKeys\"]\nkeys = [\"*\"]\n"),
    )
    .unwrap();
    daemon.signal(libc::SIGHUP);
    eventually("nobody may list keys", || async {
        run_as(Some(65534)).status.success()
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn policy_grants_globs_aliases_context_and_reload() {
    let daemon = DevDaemon::start();
    let dev_pki = daemon.dir().join("pki");
    // Admin over TLS throughout; unix root gets a narrower policy below.
    let mut admin =
        KeyServiceClient::new(daemon.tls_channel(&dev_pki, "client", None).await.unwrap());
    let app = create_key(&mut admin, "alias/app-one").await;
    let other = create_key(&mut admin, "alias/other").await;

    let policy_path = daemon.dir().join("policy.toml");
    let narrow = r#"
[[grant]]
principals = ["tls:uri=spiffe://wrapd-dev/user/*"]
operations = ["admin"]
keys = ["*"]

[[grant]]
principals = ["unix:user=root"]
operations = ["GenerateDataKey", "Unwrap"]
keys = ["alias/app-*"]
require_context = { tenant = "acme" }
"#;
    std::fs::write(&policy_path, narrow).unwrap();
    daemon.signal(libc::SIGHUP);
    let mut keys = daemon.keys().await;
    eventually("the narrow policy is in force", || {
        let mut keys = keys.clone();
        async move { keys.list_keys(ListKeysRequest::default()).await.is_err() }
    })
    .await;
    let mut data = daemon.data().await;
    let gdk = |key: &str, context: &[(&str, &str)]| GenerateDataKeyRequest {
        key_id: key.into(),
        encryption_context: ctx(context),
        number_of_bytes: 32,
    };

    // Granted: the op, on a key named by the alias glob (by alias or by id), with the context.
    data.generate_data_key(gdk("alias/app-one", &[("tenant", "acme")]))
        .await
        .unwrap();
    data.generate_data_key(gdk(&app.key_id, &[("tenant", "acme"), ("x", "y")]))
        .await
        .unwrap();
    // Denied: wrong or missing context, a key outside the glob, an op not granted.
    assert_code(
        data.generate_data_key(gdk("alias/app-one", &[("tenant", "evil")]))
            .await,
        Code::PermissionDenied,
    );
    assert_code(
        data.generate_data_key(gdk("alias/app-one", &[])).await,
        Code::PermissionDenied,
    );
    assert_code(
        data.generate_data_key(gdk(&other.key_id, &[("tenant", "acme")]))
            .await,
        Code::PermissionDenied,
    );
    assert_code(
        data.wrap(wrapd::proto::WrapRequest {
            key_id: "alias/app-one".into(),
            plaintext: vec![1],
            encryption_context: ctx(&[("tenant", "acme")]),
        })
        .await,
        Code::PermissionDenied,
    );
    assert_code(
        keys.create_key(CreateKeyRequest::default()).await,
        Code::PermissionDenied,
    );
    assert_code(
        keys.rotate_key(KeyRef {
            key_id: app.key_id.clone(),
        })
        .await,
        Code::PermissionDenied,
    );

    // The alias grant follows the alias: re-point alias/app-one at the other key.
    admin
        .update_alias(AliasRequest {
            alias_name: "alias/app-one".into(),
            key_id: other.key_id.clone(),
        })
        .await
        .unwrap();
    data.generate_data_key(gdk(&other.key_id, &[("tenant", "acme")]))
        .await
        .unwrap();
    assert_code(
        data.generate_data_key(gdk(&app.key_id, &[("tenant", "acme")]))
            .await,
        Code::PermissionDenied,
    );

    // An invalid policy file is rejected; the one in force stays.
    std::fs::write(
        &policy_path,
        "[[grant]]\nprincipals = [\"x\"]\noperations = [\"Teleport\"]\nkeys = [\"*\"]\n",
    )
    .unwrap();
    daemon.signal(libc::SIGHUP);
    let log_path = daemon.dir().join("daemon-0.log");
    eventually("the bad policy is reported", || {
        let log_path = log_path.clone();
        async move {
            std::fs::read_to_string(&log_path)
                .unwrap_or_default()
                .contains("the new policy is invalid")
        }
    })
    .await;
    data.generate_data_key(gdk(&other.key_id, &[("tenant", "acme")]))
        .await
        .unwrap();
    assert_code(
        keys.create_key(CreateKeyRequest::default()).await,
        Code::PermissionDenied,
    );

    // Deny everything (empty policy): even the admin is out.
    std::fs::write(&policy_path, "").unwrap();
    daemon.signal(libc::SIGHUP);
    eventually("the empty policy is in force", || {
        let mut admin = admin.clone();
        async move { admin.list_keys(ListKeysRequest::default()).await.is_err() }
    })
    .await;
    assert_code(
        data.generate_data_key(gdk(&other.key_id, &[("tenant", "acme")]))
            .await,
        Code::PermissionDenied,
    );
}

/// Writes `policy` (plus the dev TLS client's full rights) and waits until it is in force.
async fn narrow_policy(daemon: &DevDaemon, policy: &str) {
    let full = format!(
        "{policy}\n[[grant]]\nprincipals = [\"tls:uri=spiffe://wrapd-dev/user/*\"]\noperations = [\"all\"]\nkeys = [\"*\"]\n"
    );
    let reloads = || daemon.log().matches("policy reloaded").count();
    let before = reloads();
    std::fs::write(daemon.dir().join("policy.toml"), full).unwrap();
    daemon.signal(libc::SIGHUP);
    eventually("the new policy is in force", || {
        let done = reloads() > before;
        async move { done }
    })
    .await;
}

/// An admin scoped to `alias/team-a-*` cannot re-point `alias/billing-prod` at team A's key,
/// even when billing's key also has a team-a alias.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn alias_changes_are_authorized_on_the_alias_itself() {
    let daemon = DevDaemon::start();
    let mut admin = KeyServiceClient::new(
        daemon
            .tls_channel(&daemon.dir().join("pki"), "client", None)
            .await
            .unwrap(),
    );
    let billing = create_key(&mut admin, "alias/billing-prod").await;
    admin
        .create_alias(AliasRequest {
            alias_name: "alias/team-a-shared".into(),
            key_id: billing.key_id.clone(),
        })
        .await
        .unwrap();
    let team_a = create_key(&mut admin, "alias/team-a-main").await;
    narrow_policy(
        &daemon,
        "[[grant]]\nprincipals = [\"unix:uid=0\"]\noperations = [\"admin\"]\nkeys = [\"alias/team-a-*\"]\n",
    )
    .await;
    let mut keys = daemon.keys().await;
    let repoint = |alias: &str, key: &str| AliasRequest {
        alias_name: alias.into(),
        key_id: key.into(),
    };
    assert_code(
        keys.update_alias(repoint("alias/billing-prod", &team_a.key_id))
            .await,
        Code::PermissionDenied,
    );
    assert_code(
        keys.delete_alias(repoint("alias/billing-prod", "")).await,
        Code::PermissionDenied,
    );
    assert_code(
        keys.create_alias(repoint("alias/billing-new", &team_a.key_id))
            .await,
        Code::PermissionDenied,
    );
    let described = admin
        .describe_key(KeyRef {
            key_id: "alias/billing-prod".into(),
        })
        .await
        .unwrap()
        .into_inner();
    assert_eq!(described.key_id, billing.key_id, "the alias did not move");
    // Within its own names the admin still works.
    keys.create_alias(repoint("alias/team-a-extra", &team_a.key_id))
        .await
        .unwrap();
}

/// ReWrap needs ReWrapFrom on the source key; ReWrapTo on a scratch key the caller can read
/// does not let it pull other keys' blobs over.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn rewrap_needs_rights_on_both_ends() {
    let daemon = DevDaemon::start();
    let channel = daemon
        .tls_channel(&daemon.dir().join("pki"), "client", None)
        .await
        .unwrap();
    let mut admin = KeyServiceClient::new(channel.clone());
    let mut admin_data = wrapd::client::DataKeyServiceClient::new(channel);
    create_key(&mut admin, "alias/secret").await;
    create_key(&mut admin, "alias/scratch").await;
    let secret = common::generate(&mut admin_data, "alias/secret", &[]).await;
    let grants = "[[grant]]\nprincipals = [\"unix:uid=0\"]\noperations = [\"ReWrapTo\", \"Unwrap\"]\nkeys = [\"*\"]\n";
    let grants = grants.replace("keys = [\"*\"]", "keys = [\"alias/scratch\"]");
    narrow_policy(&daemon, &format!("{grants}\n[[grant]]\nprincipals = [\"unix:uid=0\"]\noperations = [\"ReWrapTo\"]\nkeys = [\"*\"]\n")).await;
    let mut data = daemon.data().await;
    let rewrap = || ReWrapRequest {
        ciphertext_blob: secret.ciphertext_blob.clone(),
        destination_key_id: "alias/scratch".into(),
        ..Default::default()
    };
    assert_code(data.re_wrap(rewrap()).await, Code::PermissionDenied);
    narrow_policy(
        &daemon,
        &format!("{grants}\n[[grant]]\nprincipals = [\"unix:uid=0\"]\noperations = [\"ReWrapFrom\"]\nkeys = [\"alias/secret\"]\n"),
    )
    .await;
    let moved = data.re_wrap(rewrap()).await.unwrap().into_inner();
    let opened = data
        .unwrap(UnwrapRequest {
            ciphertext_blob: moved.ciphertext_blob,
            ..Default::default()
        })
        .await
        .unwrap()
        .into_inner();
    assert_eq!(opened.plaintext, secret.plaintext);
}
