//! A fleet: several daemons on one SoftHSM token and one real PostgreSQL database behave as
//! one service. The store contract itself runs against PostgreSQL too (the same conformance
//! suite as SQLite's).

use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::Duration;

use tonic::Code;
use tonic::transport::Channel;
use wrapd::client::{DataKeyServiceClient, KeyServiceClient, connect_unix};
use wrapd::keystore::{PostgresOptions, PostgresStore};
use wrapd::proto::{AliasRequest, KeyRef, UnwrapRequest};

use crate::common::postgres::server;
use crate::common::{DevDaemon, assert_code, create_key, ctx, eventually, generate};

/// The store contract, against a fresh PostgreSQL database per test.
mod postgres_store {
    use super::*;

    fn store() -> PostgresStore {
        PostgresStore::open(&PostgresOptions {
            url: server().database(),
            password: None,
            instance: "conformance".into(),
            tls_ca: None,
        })
        .unwrap()
    }

    wrapd::metadata_store_conformance!(store());

    #[test]
    fn two_stores_opening_one_database_at_once_migrate_it_once() {
        let url = server().database();
        let open = |url: String| {
            std::thread::spawn(move || {
                PostgresStore::open(&PostgresOptions {
                    url,
                    password: None,
                    instance: "racer".into(),
                    tls_ca: None,
                })
                .map(|_| ())
            })
        };
        let (a, b) = (open(url.clone()), open(url.clone()));
        a.join().unwrap().unwrap();
        b.join().unwrap().unwrap();
        let mut client = postgres::Client::connect(&url, postgres::NoTls).unwrap();
        let applied: i64 = client
            .query_one("SELECT count(*) FROM wrapd_migrations", &[])
            .unwrap()
            .get(0);
        // Each migration once (version is the primary key: a second run would have failed
        // its transaction): the schema, key import, version usage, version retirement,
        // version destruction, key policies, grants.
        assert_eq!(applied, 7);
    }

    #[test]
    fn the_store_speaks_tls_verified_against_its_ca() {
        use wrapd::keystore::MetadataStore;
        let url = server().database();
        let store = PostgresStore::open(&PostgresOptions {
            url: url.clone(),
            password: None,
            instance: "tls".into(),
            tls_ca: Some(server().ca_pem()),
        })
        .unwrap();
        store.all_keys().unwrap();
        let mut admin = postgres::Client::connect(&url, postgres::NoTls).unwrap();
        let encrypted: i64 = admin
            .query_one(
                "SELECT count(*) FROM pg_stat_ssl JOIN pg_stat_activity USING (pid)
                 WHERE ssl AND application_name = 'wrapd tls'",
                &[],
            )
            .unwrap()
            .get(0);
        assert!(encrypted >= 1, "the store's connections use TLS");
        // A certificate that does not chain to the configured CA is refused.
        let other = wrapd::pki::new_ca("someone else", wrapd::pki::Validity::days(1)).unwrap();
        let refused = PostgresStore::open(&PostgresOptions {
            url,
            password: None,
            instance: "tls".into(),
            tls_ca: Some(other.cert.into_bytes()),
        });
        assert_eq!(
            refused.err().map(|e| e.kind()),
            Some(wrapd::error::ErrorKind::Unavailable)
        );
    }

    #[test]
    fn an_instance_name_is_held_by_one_live_store_at_a_time() {
        let url = server().database();
        let open = |instance: &str| {
            PostgresStore::open(&PostgresOptions {
                url: url.clone(),
                password: None,
                instance: instance.into(),
                tls_ca: None,
            })
            .unwrap()
        };
        let first = open("twin");
        first.claim_instance(Duration::ZERO).unwrap();
        let second = open("twin");
        let err = second
            .claim_instance(Duration::from_millis(300))
            .unwrap_err()
            .to_string();
        assert!(
            err.contains("\"twin\"") && err.contains("[store] instance"),
            "{err}"
        );
        open("other").claim_instance(Duration::ZERO).unwrap();
        // Once the first is gone (its session ends), the name is free again.
        drop(first);
        second.claim_instance(Duration::from_secs(5)).unwrap();
    }

    #[test]
    fn another_daemons_version_claim_is_not_ours() {
        use wrapd::keystore::MetadataStore;
        let url = server().database();
        let open = |instance: &str| {
            PostgresStore::open(&PostgresOptions {
                url: url.clone(),
                password: None,
                instance: instance.into(),
                tls_ca: None,
            })
            .unwrap()
        };
        let (a, b) = (open("a"), open("b"));
        let key = wrapd::ids::KeyId::generate();
        let record = wrapd::keystore::KeyRecord {
            id: key.clone(),
            description: String::new(),
            state: wrapd::keystore::KeyState::Enabled,
            created_at: std::time::SystemTime::now(),
            deletion_date: None,
            versions: vec![wrapd::keystore::VersionRecord::new(
                1,
                std::time::SystemTime::now(),
                false,
            )],
            aliases: vec![],
            rotation: None,
            tags: Default::default(),
            origin: Default::default(),
            material: None,
            policy: None,
            grants: Default::default(),
        };
        a.create_key(&record, None).unwrap();
        assert!(!a.begin_version(&key, 2).unwrap());
        assert_eq!(
            b.begin_version(&key, 2).unwrap_err().kind(),
            wrapd::error::ErrorKind::AlreadyExists
        );
        assert!(
            b.pending_versions().unwrap().is_empty(),
            "a's claim is not b's"
        );
        assert_eq!(a.pending_versions().unwrap(), vec![(key, 2)]);
    }
}

/// One daemon of a fleet: `wrapd serve` on a config of its own, sharing the token, PIN,
/// policy of a dev state directory and one PostgreSQL database.
struct Node {
    child: Option<Child>,
    /// The ready line of the last start.
    ready: String,
    /// Extra environment of the daemon.
    env: Vec<(String, String)>,
    dir: PathBuf,
    socket: PathBuf,
    config: PathBuf,
}

impl Node {
    fn start(dev: &Path, database: &str, name: &str) -> Self {
        Self::start_with(dev, database, name, "")
    }

    /// With extra `[store]` settings.
    fn start_with(dev: &Path, database: &str, name: &str, store: &str) -> Self {
        let mut node = Self::configure(dev, database, name, name, store);
        node.spawn();
        node
    }

    /// A daemon in directory `name` under instance name `instance`, not started.
    fn configure(dev: &Path, database: &str, name: &str, instance: &str, store: &str) -> Self {
        let dir = dev.join(name);
        std::fs::create_dir_all(&dir).unwrap();
        let dev_config = std::fs::read_to_string(dev.join("wrapd.toml")).unwrap();
        let module = dev_config
            .lines()
            .find_map(|l| l.strip_prefix("module = "))
            .unwrap()
            .to_owned();
        let config = dir.join("wrapd.toml");
        std::fs::write(
            &config,
            format!(
                r#"[hsm]
module = {module}
token_label = "wrapd-dev"
pin_file = "{dev}/pin"
profile = "softhsm"
softhsm2_conf = "{dev}/softhsm2.conf"

[store]
postgres = "{database}"
instance = "{instance}"
resync_interval_ms = 2000
{store}

[unix]
path = "wrapd.sock"

[policy]
file = "{dev}/policy.toml"

[audit]
file = "audit.log"
fsync = "never"

[keys]
deletion_check_interval_secs = 1

[process]
allow_root = true
lock_memory = "off"
"#,
                dev = dev.display()
            ),
        )
        .unwrap();
        Self {
            child: None,
            ready: String::new(),
            env: Vec::new(),
            socket: dir.join("wrapd.sock"),
            dir,
            config,
        }
    }

    fn spawn(&mut self) {
        if let Err(log) = self.try_spawn() {
            panic!("no ready line; log:\n{log}");
        }
    }

    /// Starts the daemon; its log if it stopped before its ready line.
    fn try_spawn(&mut self) -> Result<(), String> {
        let log = std::fs::File::create(self.dir.join("daemon.log")).unwrap();
        let mut child = Command::new(env!("CARGO_BIN_EXE_wrapd"))
            .args(["serve", "--config"])
            .arg(&self.config)
            .envs(self.env.iter().map(|(k, v)| (k, v)))
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(log)
            .spawn()
            .unwrap();
        let stdout = child.stdout.take().unwrap();
        let line = std::io::BufRead::lines(std::io::BufReader::new(stdout))
            .next()
            .and_then(Result::ok);
        let Some(line) = line else {
            let _ = child.wait();
            return Err(self.log());
        };
        assert!(line.starts_with("wrapd ready socket="), "{line}");
        self.ready = line;
        self.child = Some(child);
        Ok(())
    }

    async fn channel(&self) -> Channel {
        connect_unix(&self.socket).await.unwrap()
    }

    async fn keys(&self) -> KeyServiceClient<Channel> {
        KeyServiceClient::new(self.channel().await)
    }

    async fn data(&self) -> DataKeyServiceClient<Channel> {
        DataKeyServiceClient::new(self.channel().await)
    }

    fn log(&self) -> String {
        std::fs::read_to_string(self.dir.join("daemon.log")).unwrap_or_default()
    }

    fn audit_lines(&self) -> Vec<wrapd::audit::AuditRecord> {
        std::fs::read_to_string(self.dir.join("audit.log"))
            .unwrap_or_default()
            .lines()
            .map(|l| serde_json::from_str(l).unwrap())
            .collect()
    }
}

impl Drop for Node {
    fn drop(&mut self) {
        if let Some(mut child) = self.child.take() {
            let _ = child.kill();
            let _ = child.wait();
        }
    }
}

/// A dev state directory (token, PIN, policy), stopped, and `n` daemons on it and one new
/// database of the tests' server.
fn fleet(n: usize) -> (DevDaemon, Vec<Node>) {
    // The synchronous client must not run on the test's async runtime thread.
    let database = std::thread::spawn(|| server().database()).join().unwrap();
    fleet_on_database(&database, n, "")
}

/// The same, on `database`, with extra `[store]` settings.
fn fleet_on_database(database: &str, n: usize, store: &str) -> (DevDaemon, Vec<Node>) {
    let mut dev = DevDaemon::start();
    assert!(dev.stop().success());
    let nodes = (0..n)
        .map(|i| Node::start_with(dev.dir(), database, &format!("node-{i}"), store))
        .collect();
    (dev, nodes)
}

fn key_ref(id: &str) -> KeyRef {
    KeyRef {
        key_id: id.to_owned(),
    }
}

#[tokio::test]
async fn a_key_made_on_one_daemon_is_used_at_once_on_another() {
    let (_dev, nodes) = fleet(2);
    let key = create_key(&mut nodes[0].keys().await, "").await;
    // Read-your-writes on the daemon that made it, and at once on the other: a key the
    // view does not know is looked up in the store.
    let described = nodes[1]
        .keys()
        .await
        .describe_key(key_ref(&key.key_id))
        .await
        .unwrap()
        .into_inner();
    assert_eq!(described.key_id, key.key_id);
    let generated = generate(&mut nodes[0].data().await, &key.key_id, &[("a", "b")]).await;
    let unwrapped = nodes[1]
        .data()
        .await
        .unwrap(UnwrapRequest {
            ciphertext_blob: generated.ciphertext_blob,
            encryption_context: ctx(&[("a", "b")]),
            key_id: String::new(),
        })
        .await
        .unwrap()
        .into_inner();
    assert_eq!(unwrapped.plaintext, generated.plaintext);
}

#[tokio::test]
async fn aliases_and_states_changed_on_one_daemon_reach_the_others_within_a_second() {
    let (_dev, nodes) = fleet(3);
    let key = create_key(&mut nodes[0].keys().await, "alias/shared").await;
    for node in &nodes[1..] {
        let keys = node.keys().await;
        eventually("the alias is known everywhere", || {
            let mut keys = keys.clone();
            async move { keys.describe_key(key_ref("alias/shared")).await.is_ok() }
        })
        .await;
    }
    let others = [nodes[0].data().await, nodes[2].data().await];
    nodes[1]
        .keys()
        .await
        .disable_key(key_ref(&key.key_id))
        .await
        .unwrap();
    let started = std::time::Instant::now();
    for data in others {
        let id = key.key_id.clone();
        eventually("the disabled key is refused everywhere", || {
            let (mut data, id) = (data.clone(), id.clone());
            async move {
                data.generate_data_key(wrapd::proto::GenerateDataKeyRequest {
                    key_id: id,
                    ..Default::default()
                })
                .await
                .is_err_and(|s| s.code() == Code::FailedPrecondition)
            }
        })
        .await;
    }
    assert!(
        started.elapsed() < Duration::from_secs(1),
        "refused everywhere after {:?}",
        started.elapsed()
    );
    // Re-pointing and deleting the alias on one daemon.
    let other = create_key(&mut nodes[2].keys().await, "").await;
    nodes[2]
        .keys()
        .await
        .update_alias(AliasRequest {
            alias_name: "alias/shared".into(),
            key_id: other.key_id.clone(),
        })
        .await
        .unwrap();
    let keys = nodes[0].keys().await;
    let target = other.key_id.clone();
    eventually("the re-pointed alias everywhere", || {
        let (mut keys, target) = (keys.clone(), target.clone());
        async move {
            keys.describe_key(key_ref("alias/shared"))
                .await
                .is_ok_and(|m| m.into_inner().key_id == target)
        }
    })
    .await;
}

#[tokio::test]
async fn concurrent_rotations_on_two_daemons_make_every_version_once() {
    let (_dev, nodes) = fleet(2);
    let key = create_key(&mut nodes[0].keys().await, "").await;
    let mut tasks = Vec::new();
    for node in &nodes {
        for _ in 0..20 {
            let mut keys = node.keys().await;
            let id = key.key_id.clone();
            tasks.push(tokio::spawn(async move {
                keys.rotate_key(key_ref(&id)).await.map(|_| ())
            }));
        }
    }
    for task in tasks {
        task.await.unwrap().unwrap();
    }
    for node in &nodes {
        let keys = node.keys().await;
        eventually("every daemon sees 41 versions", || {
            let mut keys = keys.clone();
            let id = key.key_id.clone();
            async move {
                keys.describe_key(key_ref(&id))
                    .await
                    .is_ok_and(|m| m.into_inner().versions.len() == 41)
            }
        })
        .await;
        let metadata = node
            .keys()
            .await
            .describe_key(key_ref(&key.key_id))
            .await
            .unwrap()
            .into_inner();
        let versions: Vec<u32> = metadata.versions.iter().map(|v| v.version).collect();
        assert_eq!(
            versions,
            (1..=41).collect::<Vec<_>>(),
            "no gap, no duplicate"
        );
        assert!(metadata.versions.iter().all(|v| v.available));
    }
    // The newest version wraps on one daemon and unwraps on the other.
    let generated = generate(&mut nodes[1].data().await, &key.key_id, &[]).await;
    assert_eq!(generated.key_version, 41);
    let unwrapped = nodes[0]
        .data()
        .await
        .unwrap(UnwrapRequest {
            ciphertext_blob: generated.ciphertext_blob,
            ..Default::default()
        })
        .await
        .unwrap();
    assert_eq!(unwrapped.into_inner().plaintext, generated.plaintext);
}

#[tokio::test]
async fn a_second_daemon_with_a_live_daemons_instance_name_is_refused_at_start() {
    let database = std::thread::spawn(|| server().database()).join().unwrap();
    let (dev, mut nodes) = fleet_on_database(&database, 1, "");
    let mut twin = Node::configure(dev.dir(), &database, "twin", "node-0", "");
    let log = twin
        .try_spawn()
        .expect_err("a twin of a live daemon started");
    assert!(
        log.contains("\"node-0\"") && log.contains("[store] instance"),
        "{log}"
    );
    // The live daemon's rotations are its own: 20 at once make 20 versions.
    let key = create_key(&mut nodes[0].keys().await, "").await;
    let mut tasks = Vec::new();
    for _ in 0..20 {
        let mut keys = nodes[0].keys().await;
        let id = key.key_id.clone();
        tasks.push(tokio::spawn(async move {
            keys.rotate_key(key_ref(&id)).await.map(|_| ())
        }));
    }
    for task in tasks {
        task.await.unwrap().unwrap();
    }
    // Once the first daemon is gone, the name can be taken.
    drop(nodes.pop());
    twin.try_spawn()
        .expect("the name is free once its daemon is gone");
    let metadata = twin
        .keys()
        .await
        .describe_key(key_ref(&key.key_id))
        .await
        .unwrap()
        .into_inner();
    assert_eq!(metadata.versions.len(), 21);
}

/// A batch of blobs naming a thousand keys nobody made costs the database a bounded number
/// of lookups, whoever sends it.
#[tokio::test]
async fn unknown_key_ids_cost_the_database_a_bounded_number_of_lookups() {
    let database = std::thread::spawn(|| server().database()).join().unwrap();
    let (_dev, nodes) = fleet_on_database(&database, 1, "\n[metrics]\nlisten = \"127.0.0.1:0\"\n");
    let key = create_key(&mut nodes[0].keys().await, "").await;
    let generated = generate(&mut nodes[0].data().await, &key.key_id, &[]).await;
    let real = wrapd::blob::Blob::parse(&generated.ciphertext_blob).unwrap();
    let items = (0..1000)
        .map(|_| wrapd::proto::UnwrapRequest {
            ciphertext_blob: wrapd::blob::Blob {
                key_id: wrapd::ids::KeyId::generate(),
                ..real.clone()
            }
            .encode(),
            ..Default::default()
        })
        .collect();
    let started = std::time::Instant::now();
    nodes[0]
        .data()
        .await
        .batch_unwrap(wrapd::proto::BatchUnwrapRequest { items })
        .await
        .unwrap();
    let seconds = started.elapsed().as_secs_f64().ceil() + 1.0;
    let url = nodes[0].ready.rsplit_once(" metrics=").unwrap().1;
    let metrics = crate::metrics::scrape(url);
    let refused = crate::metrics::value(&metrics, "wrapd_store_read_through_refused_total");
    // At most the budget's lookups a second reached the database (however long the batch
    // took); the rest were answered unknown without one.
    let budget = 200.0 * seconds;
    assert!(
        refused >= 1000.0 - budget,
        "{refused} in {seconds} s\n{metrics}"
    );
}

#[tokio::test]
async fn concurrent_create_alias_of_one_name_has_one_winner() {
    let (_dev, nodes) = fleet(2);
    let a = create_key(&mut nodes[0].keys().await, "").await;
    let b = create_key(&mut nodes[1].keys().await, "").await;
    let mut tasks = Vec::new();
    for (node, key) in nodes.iter().zip([&a, &b]) {
        let mut keys = node.keys().await;
        let id = key.key_id.clone();
        tasks.push(tokio::spawn(async move {
            keys.create_alias(AliasRequest {
                alias_name: "alias/contested".into(),
                key_id: id,
            })
            .await
        }));
    }
    let mut results = Vec::new();
    for task in tasks {
        results.push(task.await.unwrap());
    }
    assert_eq!(
        results.iter().filter(|r| r.is_ok()).count(),
        1,
        "{results:?}"
    );
    let loser = results.into_iter().find(Result::is_err).unwrap();
    assert_code(loser, Code::AlreadyExists);
}

#[tokio::test]
async fn each_daemons_audit_lines_name_it() {
    let (_dev, nodes) = fleet(2);
    create_key(&mut nodes[0].keys().await, "").await;
    create_key(&mut nodes[1].keys().await, "").await;
    for (i, node) in nodes.iter().enumerate() {
        let lines = node.audit_lines();
        assert!(!lines.is_empty(), "{}", node.log());
        let name = format!("node-{i}");
        assert!(
            lines
                .iter()
                .all(|l| l.instance.as_deref() == Some(name.as_str()))
        );
    }
}

#[tokio::test]
async fn migrate_store_moves_a_single_daemons_keys_into_postgres() {
    let mut dev = DevDaemon::start();
    let key = create_key(&mut dev.keys().await, "alias/moved").await;
    dev.keys()
        .await
        .rotate_key(key_ref(&key.key_id))
        .await
        .unwrap();
    let generated = generate(&mut dev.data().await, "alias/moved", &[("t", "1")]).await;
    assert!(dev.stop().success());
    let database = std::thread::spawn(|| server().database()).join().unwrap();
    let out = Command::new(env!("CARGO_BIN_EXE_wrapd"))
        .arg("migrate-store")
        .arg(format!(
            "--from=sqlite:{}",
            dev.dir().join("wrapd.db").display()
        ))
        .arg(format!("--to=postgres:{database}"))
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let node = Node::start(dev.dir(), &database, "migrated");
    let described = node
        .keys()
        .await
        .describe_key(key_ref("alias/moved"))
        .await
        .unwrap()
        .into_inner();
    assert_eq!(described.key_id, key.key_id);
    assert_eq!(described.current_version, 2);
    let unwrapped = node
        .data()
        .await
        .unwrap(UnwrapRequest {
            ciphertext_blob: generated.ciphertext_blob,
            encryption_context: ctx(&[("t", "1")]),
            key_id: String::new(),
        })
        .await
        .unwrap()
        .into_inner();
    assert_eq!(unwrapped.plaintext, generated.plaintext);
    // A second migration into the same database is refused.
    let again = Command::new(env!("CARGO_BIN_EXE_wrapd"))
        .arg("migrate-store")
        .arg(format!(
            "--from=sqlite:{}",
            dev.dir().join("wrapd.db").display()
        ))
        .arg(format!("--to=postgres:{database}"))
        .output()
        .unwrap();
    assert!(!again.status.success());
}

#[tokio::test]
async fn a_database_outage_is_served_from_the_view_for_a_bounded_time_then_recovered() {
    let mut pg = std::thread::spawn(crate::common::postgres::OwnedPg::start)
        .join()
        .unwrap();
    let (_dev, nodes) = fleet_on_database(&pg.database(), 2, "max_staleness_ms = 3000");
    let key = create_key(&mut nodes[0].keys().await, "").await;
    let generated = generate(&mut nodes[0].data().await, &key.key_id, &[]).await;
    let unwrap = |socket: PathBuf| {
        let blob = generated.ciphertext_blob.clone();
        async move {
            DataKeyServiceClient::new(connect_unix(&socket).await.unwrap())
                .unwrap(UnwrapRequest {
                    ciphertext_blob: blob,
                    ..Default::default()
                })
                .await
        }
    };
    unwrap(nodes[1].socket.clone()).await.unwrap();

    pg.stop();
    // Within the bound: unwraps from the view; changes refused as retryable.
    for node in &nodes {
        unwrap(node.socket.clone()).await.unwrap();
    }
    let create = nodes[1]
        .keys()
        .await
        .create_key(wrapd::proto::CreateKeyRequest::default())
        .await;
    assert_code(create, Code::Unavailable);
    // Beyond it: refused too, and health says so.
    tokio::time::sleep(Duration::from_millis(3500)).await;
    assert_code(unwrap(nodes[0].socket.clone()).await, Code::Unavailable);
    let mut health = tonic_health::pb::health_client::HealthClient::new(nodes[0].channel().await);
    let serving = || tonic_health::pb::HealthCheckRequest {
        service: String::new(),
    };
    let not_serving = tonic_health::pb::health_check_response::ServingStatus::NotServing as i32;
    let status = health.check(serving()).await.unwrap().into_inner().status;
    assert!(
        status == not_serving || {
            tokio::time::sleep(Duration::from_millis(2500)).await;
            health.check(serving()).await.unwrap().into_inner().status == not_serving
        }
    );

    // The database comes back: everything recovers without a restart.
    let restarted = std::thread::spawn(move || {
        pg.restart();
        pg
    })
    .join()
    .unwrap();
    for node in &nodes {
        let data = node.data().await;
        let blob = generated.ciphertext_blob.clone();
        eventually("unwraps again", || {
            let (mut data, blob) = (data.clone(), blob.clone());
            async move {
                data.unwrap(UnwrapRequest {
                    ciphertext_blob: blob,
                    ..Default::default()
                })
                .await
                .is_ok()
            }
        })
        .await;
    }
    create_key(&mut nodes[1].keys().await, "alias/after-outage").await;
    let keys = nodes[0].keys().await;
    eventually("a change after the outage reaches the other daemon", || {
        let mut keys = keys.clone();
        async move {
            keys.describe_key(key_ref("alias/after-outage"))
                .await
                .is_ok()
        }
    })
    .await;
    drop(restarted);
}

/// A database role with no rights on wrapd's tables floods wrapd's notification channel
/// (NOTIFY needs no privilege) with payloads wrapd never sends: the daemons keep serving
/// past `max_staleness_ms`, and changes still reach them.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_notify_flood_from_any_role_does_not_stall_the_fleet() {
    use std::sync::Arc;
    use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
    let database = std::thread::spawn(|| server().database()).join().unwrap();
    let (_dev, nodes) = fleet_on_database(&database, 2, "max_staleness_ms = 3000");
    let key = create_key(&mut nodes[0].keys().await, "").await;
    let generated = generate(&mut nodes[0].data().await, &key.key_id, &[]).await;
    let url = database.clone();
    std::thread::spawn(move || {
        crate::common::postgres::PgServer::sql(&url, "CREATE ROLE intruder LOGIN")
    })
    .join()
    .unwrap();
    let stop = Arc::new(AtomicBool::new(false));
    let sent = Arc::new(AtomicU64::new(0));
    let flooders: Vec<_> = (0..2)
        .map(|thread| {
            let (stop, sent) = (stop.clone(), sent.clone());
            let url = database.replacen("wrapd@", "intruder@", 1);
            std::thread::spawn(move || {
                let mut client = postgres::Client::connect(&url, postgres::NoTls).unwrap();
                let mut round = 0u64;
                while !stop.load(Ordering::Relaxed) {
                    // Distinct payloads (one transaction folds duplicates): key ids that
                    // are not wrapd's, garbage, and alias changes.
                    client
                        .batch_execute(&format!(
                            "SELECT pg_notify('wrapd_changes', CASE g % 3 WHEN 0 THEN 'k:' || md5(g::text)
                             WHEN 1 THEN 'x' || g ELSE 'a' END)
                             FROM generate_series({start}, {start} + 1999) g",
                            start = (thread * 1_000_000_000 + round * 2000)
                        ))
                        .unwrap();
                    round += 1;
                    sent.fetch_add(2000, Ordering::Relaxed);
                    // Still far above what wrapd sends (thousands a second), and the other
                    // tests of a full run keep their share of the two cores.
                    std::thread::sleep(Duration::from_millis(5));
                }
            })
        })
        .collect();
    // Twice the staleness limit: every unwrap on both daemons succeeds.
    let mut errors = Vec::new();
    for _ in 0..30 {
        for node in &nodes {
            let unwrapped = node
                .data()
                .await
                .unwrap(UnwrapRequest {
                    ciphertext_blob: generated.ciphertext_blob.clone(),
                    ..Default::default()
                })
                .await;
            if let Err(status) = unwrapped {
                errors.push(format!("{:?}: {}", status.code(), status.message()));
            }
        }
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    assert!(
        errors.is_empty(),
        "callers saw errors under the flood: {errors:#?}\n{}",
        nodes[1].log()
    );
    // A change made during the flood reaches the other daemon (by its re-reads: it does
    // not listen while flooded).
    nodes[0]
        .keys()
        .await
        .disable_key(key_ref(&key.key_id))
        .await
        .unwrap();
    let mut data = nodes[1].data().await;
    let deadline = std::time::Instant::now() + Duration::from_secs(20);
    loop {
        let answer = data
            .unwrap(UnwrapRequest {
                ciphertext_blob: generated.ciphertext_blob.clone(),
                ..Default::default()
            })
            .await;
        match answer {
            Err(status) if status.code() == Code::FailedPrecondition => break,
            other => assert!(
                std::time::Instant::now() < deadline,
                "the other daemon still answers {:?}\n{}",
                other.map(|_| "OK").map_err(|s| s.code()),
                nodes[1].log()
            ),
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    stop.store(true, Ordering::Relaxed);
    for flooder in flooders {
        flooder.join().unwrap();
    }
    assert!(sent.load(Ordering::Relaxed) >= 20_000, "the flood was real");
}

#[tokio::test]
async fn a_daemon_killed_under_load_costs_the_others_nothing_and_catches_up() {
    let (_dev, mut nodes) = fleet(2);
    let key = create_key(&mut nodes[0].keys().await, "alias/busy").await;
    let mut load = Vec::new();
    for _ in 0..8 {
        let mut data = nodes[1].data().await;
        load.push(tokio::spawn(async move {
            let mut errors = Vec::new();
            let deadline = std::time::Instant::now() + Duration::from_secs(3);
            while std::time::Instant::now() < deadline {
                let generated = data
                    .generate_data_key(wrapd::proto::GenerateDataKeyRequest {
                        key_id: "alias/busy".into(),
                        ..Default::default()
                    })
                    .await;
                let generated = match generated {
                    Ok(generated) => generated,
                    Err(status) => {
                        errors.push(format!("GenerateDataKey {status}"));
                        continue;
                    }
                };
                let unwrapped = data
                    .unwrap(UnwrapRequest {
                        ciphertext_blob: generated.into_inner().ciphertext_blob,
                        ..Default::default()
                    })
                    .await;
                if let Err(status) = unwrapped {
                    errors.push(format!("Unwrap {status}"));
                }
            }
            errors
        }));
    }
    // Rotations on the busy daemon meanwhile, and a kill -9 of the other.
    let mut keys = nodes[1].keys().await;
    tokio::time::sleep(Duration::from_millis(500)).await;
    keys.rotate_key(key_ref(&key.key_id)).await.unwrap();
    let victim = nodes[0].child.as_mut().unwrap();
    victim.kill().unwrap(); // SIGKILL
    victim.wait().unwrap();
    keys.rotate_key(key_ref(&key.key_id)).await.unwrap();
    let mut errors = Vec::new();
    for task in load {
        errors.extend(task.await.unwrap());
    }
    errors.dedup();
    assert!(
        errors.is_empty(),
        "the surviving daemon's callers saw errors: {errors:#?}\n{}",
        nodes[1].log()
    );

    nodes[0].spawn();
    let described = nodes[0]
        .keys()
        .await
        .describe_key(key_ref("alias/busy"))
        .await
        .unwrap()
        .into_inner();
    assert_eq!(
        described.current_version, 3,
        "the restarted daemon caught up"
    );
    let generated = generate(&mut nodes[1].data().await, "alias/busy", &[]).await;
    nodes[0]
        .data()
        .await
        .unwrap(UnwrapRequest {
            ciphertext_blob: generated.ciphertext_blob,
            ..Default::default()
        })
        .await
        .unwrap();
}

/// Whoever can write the database cannot make a daemon destroy key material: a deletion
/// date moved to the past, and a key marked pending deletion that nobody scheduled, are both
/// refused by the token's record (only ScheduleKeyDeletion makes one), and the keys come back
/// whole.
#[tokio::test]
async fn a_deletion_written_in_the_database_destroys_nothing() {
    let database = std::thread::spawn(|| server().database()).join().unwrap();
    let (_dev, nodes) = fleet_on_database(&database, 2, "");
    let scheduled = create_key(&mut nodes[0].keys().await, "").await;
    let forged = create_key(&mut nodes[0].keys().await, "").await;
    let mut blobs = Vec::new();
    for key in [&scheduled, &forged] {
        blobs.push(generate(&mut nodes[1].data().await, &key.key_id, &[]).await);
    }
    nodes[0]
        .keys()
        .await
        .schedule_key_deletion(wrapd::proto::ScheduleKeyDeletionRequest {
            key_id: scheduled.key_id.clone(),
            pending_window_days: 30,
        })
        .await
        .unwrap();
    let (url, a, b) = (
        database.clone(),
        scheduled.key_id.clone(),
        forged.key_id.clone(),
    );
    std::thread::spawn(move || {
        crate::common::postgres::PgServer::sql(
            &url,
            &format!(
                "UPDATE keys SET deletion_date = 0 WHERE id = '{a}';
                 UPDATE keys SET state = 'PENDING_DELETION', deletion_date = 0 WHERE id = '{b}';"
            ),
        )
    })
    .join()
    .unwrap();
    // The maintenance passes (every second) see the store's word and refuse it.
    let refused = "the token records no such deletion";
    let deadline = std::time::Instant::now() + Duration::from_secs(10);
    while !nodes.iter().any(|n| n.log().contains(refused)) {
        assert!(
            std::time::Instant::now() < deadline,
            "no maintenance pass saw the edit"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    tokio::time::sleep(Duration::from_secs(2)).await;
    for node in &nodes {
        assert!(
            node.audit_lines()
                .iter()
                .all(|l| l.operation != "DestroyKey"),
            "{}",
            node.log()
        );
    }
    for key in [&scheduled, &forged] {
        let keys = nodes[0].keys().await;
        // No notification announced the forged state: daemon 0 learns of it by its next
        // re-read of the store, and refuses the cancellation of a key it sees enabled.
        eventually("the deletion is cancelled on daemon 0", || {
            let (mut keys, id) = (keys.clone(), key.key_id.clone());
            async move {
                match keys.cancel_key_deletion(key_ref(&id)).await {
                    Ok(_) => true,
                    Err(status) if status.code() == Code::FailedPrecondition => false,
                    Err(status) => panic!("CancelKeyDeletion: {status}"),
                }
            }
        })
        .await;
        keys.clone().enable_key(key_ref(&key.key_id)).await.unwrap();
    }
    for node in &nodes {
        let data = node.data().await;
        for blob in &blobs {
            eventually("every blob unwraps again", || {
                let mut data = data.clone();
                let ciphertext_blob = blob.ciphertext_blob.clone();
                async move {
                    data.unwrap(UnwrapRequest {
                        ciphertext_blob,
                        ..Default::default()
                    })
                    .await
                    .is_ok()
                }
            })
            .await;
        }
    }
}

/// A key enabled and aliases pointed elsewhere with SQL (and announced with NOTIFY, which any
/// role may send) change nothing on any daemon: the token's hold keeps the disabled key
/// disabled, and an alias row without the token's record of CreateAlias names no key.
#[tokio::test]
async fn a_key_enabled_or_an_alias_moved_in_the_database_changes_nothing() {
    let database = std::thread::spawn(|| server().database()).join().unwrap();
    let (_dev, nodes) = fleet_on_database(&database, 2, "");
    let named = create_key(&mut nodes[0].keys().await, "alias/app").await;
    let disabled = create_key(&mut nodes[0].keys().await, "").await;
    let other = create_key(&mut nodes[0].keys().await, "").await;
    nodes[0]
        .keys()
        .await
        .disable_key(key_ref(&disabled.key_id))
        .await
        .unwrap();
    let (url, b, c) = (
        database.clone(),
        disabled.key_id.clone(),
        other.key_id.clone(),
    );
    std::thread::spawn(move || {
        crate::common::postgres::PgServer::sql(
            &url,
            &format!(
                "UPDATE keys SET state = 'ENABLED' WHERE id = '{b}';
                 UPDATE aliases SET key_id = '{c}' WHERE name = 'alias/app';
                 INSERT INTO aliases (name, key_id) VALUES ('alias/forged', '{c}');
                 SELECT pg_notify('wrapd_changes', 'k:{b}');
                 SELECT pg_notify('wrapd_changes', 'a');"
            ),
        )
    })
    .join()
    .unwrap();
    for node in &nodes {
        let log = || node.log();
        let deadline = std::time::Instant::now() + Duration::from_secs(10);
        while !(log().contains("the token records it disabled")
            && log().contains("no CreateAlias or UpdateAlias did"))
        {
            assert!(std::time::Instant::now() < deadline, "{}", log());
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
        let mut data = node.data().await;
        let request = |key_id: &str| wrapd::proto::GenerateDataKeyRequest {
            key_id: key_id.to_owned(),
            encryption_context: ctx(&[]),
            number_of_bytes: 32,
        };
        assert_code(
            data.generate_data_key(request(&disabled.key_id)).await,
            tonic::Code::FailedPrecondition,
        );
        for alias in ["alias/app", "alias/forged"] {
            assert_code(
                data.generate_data_key(request(alias)).await,
                tonic::Code::NotFound,
            );
        }
    }
    // The audited calls still work: EnableKey, and UpdateAlias back to the first key.
    let mut keys = nodes[0].keys().await;
    keys.enable_key(key_ref(&disabled.key_id)).await.unwrap();
    keys.update_alias(AliasRequest {
        alias_name: "alias/app".into(),
        key_id: named.key_id.clone(),
    })
    .await
    .unwrap();
    // The other daemon hears of the EnableKey by its notification, a moment later.
    let data = nodes[1].data().await;
    eventually("the enabled key is usable on the other daemon", || {
        let (mut data, id) = (data.clone(), disabled.key_id.clone());
        async move {
            data.generate_data_key(wrapd::proto::GenerateDataKeyRequest {
                key_id: id,
                number_of_bytes: 32,
                ..Default::default()
            })
            .await
            .is_ok()
        }
    })
    .await;
    let made = generate(&mut nodes[0].data().await, "alias/app", &[]).await;
    assert_eq!(made.key_id, named.key_id);
}

#[tokio::test]
async fn a_due_deletion_runs_once_and_the_other_daemons_see_the_key_gone() {
    let database = std::thread::spawn(|| server().database()).join().unwrap();
    let (_dev, mut nodes) = fleet_on_database(&database, 3, "");
    let key = create_key(&mut nodes[0].keys().await, "").await;
    let generated = generate(&mut nodes[1].data().await, &key.key_id, &[]).await;
    // Every daemon has used the key (its handle cached).
    for node in &nodes {
        node.data()
            .await
            .unwrap(UnwrapRequest {
                ciphertext_blob: generated.ciphertext_blob.clone(),
                ..Default::default()
            })
            .await
            .unwrap();
    }
    nodes[2]
        .keys()
        .await
        .schedule_key_deletion(wrapd::proto::ScheduleKeyDeletionRequest {
            key_id: key.key_id.clone(),
            pending_window_days: 7,
        })
        .await
        .unwrap();
    // Eight days pass for one daemon (restarted with its clock ahead); the others keep
    // running, the key's handle cached.
    let victim = nodes[0].child.as_mut().unwrap();
    victim.kill().unwrap();
    victim.wait().unwrap();
    nodes[0]
        .env
        .push(("WRAPD_FAULT_CLOCK_SKEW_S".into(), (8 * 86_400).to_string()));
    nodes[0].spawn();
    for node in &nodes {
        let keys = node.keys().await;
        eventually("the key is gone everywhere", || {
            let mut keys = keys.clone();
            let id = key.key_id.clone();
            async move {
                keys.describe_key(key_ref(&id))
                    .await
                    .is_err_and(|s| s.code() == Code::NotFound)
            }
        })
        .await;
    }
    let destroyed: usize = nodes
        .iter()
        .map(|n| {
            n.audit_lines()
                .iter()
                .filter(|l| l.operation == "DestroyKey")
                .count()
        })
        .sum();
    assert_eq!(destroyed, 1, "one daemon carried the deletion out");
    // Its blobs are invalid everywhere, and no daemon took the missing objects for a
    // broken token.
    for node in &nodes {
        let unwrapped = node
            .data()
            .await
            .unwrap(UnwrapRequest {
                ciphertext_blob: generated.ciphertext_blob.clone(),
                ..Default::default()
            })
            .await;
        assert_code(unwrapped, Code::InvalidArgument);
        assert!(
            !node.log().contains("re-initializing the PKCS#11 context"),
            "{}",
            node.log()
        );
    }
}

#[tokio::test]
async fn version_usage_is_the_sum_of_every_daemons_counts() {
    let (_dev, nodes) = fleet(2);
    let key = create_key(&mut nodes[0].keys().await, "").await;
    let mut blobs = Vec::new();
    for node in &nodes {
        for _ in 0..2 {
            blobs.push(generate(&mut node.data().await, &key.key_id, &[("a", "b")]).await);
        }
    }
    for generated in &blobs[..3] {
        nodes[1]
            .data()
            .await
            .unwrap(UnwrapRequest {
                ciphertext_blob: generated.ciphertext_blob.clone(),
                encryption_context: ctx(&[("a", "b")]),
                key_id: String::new(),
            })
            .await
            .unwrap();
    }
    // Each daemon adds its counts to the store every 2 s; either then sees the sum.
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(10);
    loop {
        let described = nodes[0]
            .keys()
            .await
            .describe_key(key_ref(&key.key_id))
            .await
            .unwrap()
            .into_inner();
        let usage = described.versions[0].usage.unwrap();
        if (usage.wraps, usage.unwraps) == (4, 3) {
            break;
        }
        assert!(
            std::time::Instant::now() < deadline,
            "usage never reached 4 wraps and 3 unwraps: {usage:?}"
        );
        tokio::time::sleep(std::time::Duration::from_millis(200)).await;
    }
}

#[tokio::test]
async fn a_grant_made_or_revoked_on_one_daemon_holds_on_every_other() {
    use wrapd::proto::{CreateGrantRequest, PutKeyPolicyRequest, RevokeGrantRequest, WrapRequest};
    let database = std::thread::spawn(|| server().database()).join().unwrap();
    let mut dev = DevDaemon::start();
    assert!(dev.stop().success());
    // Key grants may give the unix-socket caller (root here) what the policy file bounds.
    let policy_file = dev.dir().join("policy.toml");
    let policy = std::fs::read_to_string(&policy_file).unwrap();
    std::fs::write(
        &policy_file,
        format!("{policy}\n[[grant]]\nprincipals = [\"unix:uid=0\"]\noperations = [\"Wrap\"]\nkeys = [\"*\"]\nrequire_key_grant = true\n"),
    )
    .unwrap();
    let nodes: Vec<Node> = (0..2)
        .map(|i| Node::start(dev.dir(), &database, &format!("node-{i}")))
        .collect();
    let key = create_key(&mut nodes[0].keys().await, "").await.key_id;
    // The account may do everything but Encrypt: an Encrypt can come only from a grant.
    let policy = serde_json::json!({
        "Version": "2012-10-17",
        "Statement": [{"Effect": "Allow", "Principal": {"AWS": "arn:aws:iam::000000000000:root"},
                       "NotAction": "kms:Encrypt", "Resource": "*"}]
    })
    .to_string();
    nodes[0]
        .keys()
        .await
        .put_key_policy(PutKeyPolicyRequest {
            key_id: key.clone(),
            policy,
            ..Default::default()
        })
        .await
        .unwrap();
    let wraps = |socket: PathBuf| {
        let key = key.clone();
        async move {
            DataKeyServiceClient::new(connect_unix(&socket).await.unwrap())
                .wrap(WrapRequest {
                    key_id: key,
                    plaintext: vec![1; 32],
                    encryption_context: ctx(&[("a", "b")]),
                })
                .await
        }
    };
    eventually("Encrypt refused on the other daemon", || async {
        wraps(nodes[1].socket.clone())
            .await
            .is_err_and(|s| s.code() == Code::PermissionDenied)
    })
    .await;
    let grant = nodes[0]
        .keys()
        .await
        .create_grant(CreateGrantRequest {
            key_id: key.clone(),
            grantee_principal: "arn:aws:iam::000000000000:wrapd/unix:uid=0".into(),
            operations: vec!["Encrypt".into()],
            ..Default::default()
        })
        .await
        .unwrap()
        .into_inner();
    eventually("the grant holds on the other daemon", || async {
        wraps(nodes[1].socket.clone()).await.is_ok()
    })
    .await;
    nodes[1]
        .keys()
        .await
        .revoke_grant(RevokeGrantRequest {
            key_id: key.clone(),
            grant_id: grant.grant_id,
        })
        .await
        .unwrap();
    eventually("the revocation holds on the first daemon", || async {
        wraps(nodes[0].socket.clone())
            .await
            .is_err_and(|s| s.code() == Code::PermissionDenied)
    })
    .await;
}
