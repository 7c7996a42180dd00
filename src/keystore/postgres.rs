//! [`MetadataStore`] on PostgreSQL, shared by a fleet of daemons (docs/DESIGN.md §11).
//!
//! - **Schema**: versioned migrations (`migrations/postgres/*.sql`), applied at start-up in
//!   one transaction under a transaction-level advisory lock, so two daemons starting at once
//!   apply each migration once; `wrapd_migrations` records what is applied.
//! - **Races** are decided by the database: version numbers are claimed in
//!   `pending_versions` (primary key, with the claiming daemon's instance name) before a key
//!   object is generated; aliases are a primary key; wrap blocks are an atomic increment
//!   (`claim_wraps`); scheduled deletions and automatic rotations run under a session-level
//!   advisory lock held by one daemon at a time (released by the server if that daemon dies).
//! - **Change notification**: every change `NOTIFY`s `wrapd_changes` in its transaction
//!   (`k:<key id>` or `a` for aliases); [`PostgresStore::wait_for_changes`] `LISTEN`s on a
//!   connection of its own. After that connection is lost and made again, it reports
//!   "everything changed" so the key store re-reads all.
//! - **Failures**: a lost connection, a server shutting down or a failover is
//!   [`Error::Unavailable`] (callers retry); connections are made again on the next call.
//!
//! Times are milliseconds since the epoch (`BIGINT`), as in the SQLite store.

use std::collections::BTreeMap;
use std::time::{Duration, SystemTime};

use parking_lot::Mutex;
use postgres::error::SqlState;
use postgres::fallible_iterator::FallibleIterator;
use postgres::{Client, Row, Transaction};
use r2d2_postgres::{PostgresConnectionManager, r2d2};
use tokio_postgres_rustls::MakeRustlsConnect;

use super::PostgresOptions;
use super::metadata::{
    Cursor, ImportedMaterial, KeyOrigin, KeyRecord, KeyState, MetadataStore, RotationSchedule,
    StoreChanges, VersionRecord, corrupt, from_millis, other_material, to_millis,
};
use crate::audit::{ChainHead, HeadStore};
use crate::error::{Error, Result};
use crate::hsm::KeyCheckValue;
use crate::ids::{AliasName, KeyId};

/// The notification channel.
const CHANNEL: &str = "wrapd_changes";

/// At most this many connections for store calls at once (the listener and the locks have
/// their own); beyond, a call waits for one to be free (up to 5 s, then UNAVAILABLE).
const MAX_POOLED_CONNECTIONS: u32 = 16;

/// The connection pool of store calls.
type Pool = r2d2::Pool<PostgresConnectionManager<MakeRustlsConnect>>;

/// Advisory lock ids (arbitrary constants, "wrapd" in ASCII plus a suffix).
const MIGRATION_LOCK: i64 = 0x7772_6170_6400_0001;
const MAINTENANCE_LOCK: i64 = 0x7772_6170_6400_0002;

/// Takes the advisory lock of an instance name (a 64-bit hash of it, computed by the
/// server); true if taken.
const INSTANCE_LOCK_SQL: &str =
    "SELECT pg_try_advisory_lock(hashtextextended('wrapd instance ' || $1::text, 0))";

/// Most notifications one [`MetadataStore::wait_for_changes`] takes, and for how long: more
/// is a flood (wrapd's own daemons send one per change), answered by not listening for
/// [`LISTEN_PAUSE`], during which the follower re-reads the whole store once a second. A
/// flood cannot keep the follower from confirming its view, nor grow its memory.
const MAX_DRAIN: usize = 4096;
const MAX_DRAIN_TIME: Duration = Duration::from_millis(100);
const LISTEN_PAUSE: Duration = Duration::from_secs(5);

/// Most keys refreshed one by one after one wait; beyond, one re-read of everything.
const MAX_KEYS_PER_DRAIN: usize = 64;

/// How long a starting daemon waits for the instance name's lock: covers a restart right
/// after a crash, while the server has not yet ended the dead daemon's session.
pub const INSTANCE_WAIT: Duration = Duration::from_secs(5);

/// The migrations, in order; each runs once, in one transaction.
const MIGRATIONS: &[(i32, &str)] = &[
    (1, include_str!("migrations/postgres/0001.sql")),
    (2, include_str!("migrations/postgres/0002.sql")),
];

/// The PostgreSQL metadata store.
pub struct PostgresStore {
    config: postgres::Config,
    tls: MakeRustlsConnect,
    instance: String,
    /// The connections of store calls (`Some` until the store is dropped, see `Drop`).
    pool: Option<Pool>,
    /// The `LISTEN` connection (see [`PostgresStore::wait_for_changes`]).
    listener: Mutex<Option<Client>>,
    /// The connection holding the maintenance lock, while it is held.
    maintenance: Mutex<Option<Client>>,
    /// The connection holding this instance name's lock, for the daemon's life (see
    /// [`PostgresStore::claim_instance`]).
    instance_lock: Mutex<Option<Client>>,
    /// Until when notifications are not listened to, after a flood.
    listen_paused_until: Mutex<Option<std::time::Instant>>,
}

/// A store error: connection trouble is retryable ([`Error::Unavailable`]).
fn pg_error(err: postgres::Error) -> Error {
    if let Some(db) = err.as_db_error() {
        let code = db.code();
        let retryable = *code == SqlState::T_R_SERIALIZATION_FAILURE
            || *code == SqlState::T_R_DEADLOCK_DETECTED
            || *code == SqlState::ADMIN_SHUTDOWN
            || *code == SqlState::CRASH_SHUTDOWN
            || *code == SqlState::CANNOT_CONNECT_NOW
            || *code == SqlState::READ_ONLY_SQL_TRANSACTION
            || code.code().starts_with("08");
        if retryable {
            return Error::Unavailable(format!("metadata store: {}", db.message()));
        }
        return Error::Store(db.message().to_owned());
    }
    if err.is_closed() || std::error::Error::source(&err).is_some() {
        return Error::Unavailable(format!("metadata store unreachable: {err}"));
    }
    Error::Store(err.to_string())
}

/// A connection without `tls_ca_file` is plain: refused unless every host is a unix socket
/// or a loopback address, or the URL says `sslmode=disable` (the operator's explicit choice,
/// warned about). The store carries key states, aliases and the audit chain's head; a
/// plain connection over a network gives them to anyone on the path. Without a CA, wrapd
/// cannot check the server's certificate, so `sslmode=require` (or `prefer`, the default)
/// without `tls_ca_file` is refused rather than taken as encrypted.
fn check_plain_connection(config: &postgres::Config) -> Result<()> {
    use postgres::config::{Host, SslMode};
    let remote: Vec<String> = config
        .get_hosts()
        .iter()
        .filter_map(|host| match host {
            Host::Unix(_) => None,
            Host::Tcp(name) if is_loopback(name) => None,
            Host::Tcp(name) => Some(name.clone()),
        })
        .collect();
    if remote.is_empty() {
        return Ok(());
    }
    if config.get_ssl_mode() == SslMode::Disable {
        tracing::warn!(hosts = ?remote, "store.postgres: sslmode=disable: the connection to the metadata store is not encrypted");
        return Ok(());
    }
    Err(Error::Config(format!(
        "store.postgres: the connection to {} would not be encrypted: set store.tls_ca_file to the CA of the server's certificate (or sslmode=disable in the URL to accept a plain connection)",
        remote.join(", ")
    )))
}

/// `localhost`, or an IP address of the loopback network.
fn is_loopback(host: &str) -> bool {
    host == "localhost"
        || host
            .trim_start_matches('[')
            .trim_end_matches(']')
            .parse::<std::net::IpAddr>()
            .is_ok_and(|ip| ip.is_loopback())
}

/// The notifications `client` has, waiting up to `timeout` for the first; true when there
/// were more than one call parses (a flood: see [`MAX_DRAIN`]).
///
/// Reading is bounded in time and count, and in memory: the client reads from its socket
/// only when what it has buffered is taken. A payload wrapd does not send, or more keys
/// than are worth refreshing one by one, is one re-read of everything.
fn drain_notifications(client: &mut Client, timeout: Duration) -> Result<(StoreChanges, bool)> {
    let mut changes = StoreChanges::default();
    let mut notifications = client.notifications();
    let mut next = notifications
        .timeout_iter(timeout)
        .next()
        .map_err(pg_error)?;
    let started = std::time::Instant::now();
    let mut rest = notifications.iter();
    let mut taken = 0;
    while let Some(n) = next {
        taken += 1;
        if taken > MAX_DRAIN || started.elapsed() >= MAX_DRAIN_TIME {
            changes.everything = true;
            changes.keys.clear();
            return Ok((changes, true));
        }
        if !changes.everything {
            match n.payload() {
                "a" => changes.aliases = true,
                payload => match payload.strip_prefix("k:").map(KeyId::parse) {
                    Some(Ok(id)) if changes.keys.contains(&id) => {}
                    Some(Ok(id)) if changes.keys.len() < MAX_KEYS_PER_DRAIN => {
                        changes.keys.push(id);
                    }
                    _ => {
                        changes.everything = true;
                        changes.keys.clear();
                    }
                },
            }
        }
        next = rest.next().map_err(pg_error)?;
    }
    Ok((changes, false))
}

/// TLS with certificate and host name verification against `ca_pem` only.
/// The connector of a plain connection (`sslmode=disable`): never asked to make TLS.
fn no_tls_connector() -> Result<MakeRustlsConnect> {
    use tokio_rustls::rustls::{ClientConfig, RootCertStore, crypto};
    let config =
        ClientConfig::builder_with_provider(std::sync::Arc::new(crypto::ring::default_provider()))
            .with_safe_default_protocol_versions()
            .map_err(|e| Error::Config(format!("store TLS: {e}")))?
            .with_root_certificates(RootCertStore::empty())
            .with_no_client_auth();
    Ok(MakeRustlsConnect::new(config))
}

fn tls_connector(ca_pem: &[u8]) -> Result<MakeRustlsConnect> {
    use tokio_rustls::rustls::pki_types::CertificateDer;
    use tokio_rustls::rustls::pki_types::pem::PemObject;
    use tokio_rustls::rustls::{ClientConfig, RootCertStore, crypto};
    let mut roots = RootCertStore::empty();
    for cert in CertificateDer::pem_slice_iter(ca_pem) {
        let cert = cert.map_err(|e| Error::Config(format!("store.tls_ca_file: {e}")))?;
        roots
            .add(cert)
            .map_err(|e| Error::Config(format!("store.tls_ca_file: {e}")))?;
    }
    if roots.is_empty() {
        return Err(Error::Config(
            "store.tls_ca_file holds no certificate".into(),
        ));
    }
    let config =
        ClientConfig::builder_with_provider(std::sync::Arc::new(crypto::ring::default_provider()))
            .with_safe_default_protocol_versions()
            .map_err(|e| Error::Config(format!("store TLS: {e}")))?
            .with_root_certificates(roots)
            .with_no_client_auth();
    Ok(MakeRustlsConnect::new(config))
}

fn is_unique_violation(err: &postgres::Error) -> bool {
    err.code() == Some(&SqlState::UNIQUE_VIOLATION)
}

fn version_i32(version: u32) -> Result<i32> {
    i32::try_from(version).map_err(|_| Error::invalid("version out of range"))
}

fn notify_key(tx: &mut Transaction<'_>, id: &KeyId) -> Result<()> {
    tx.execute("SELECT pg_notify($1, $2)", &[&CHANNEL, &format!("k:{id}")])
        .map_err(pg_error)?;
    Ok(())
}

fn notify_aliases(tx: &mut Transaction<'_>) -> Result<()> {
    tx.execute("SELECT pg_notify($1, 'a')", &[&CHANNEL])
        .map_err(pg_error)?;
    Ok(())
}

impl PostgresStore {
    /// Connects, and creates or migrates the schema.
    pub fn open(options: &PostgresOptions) -> Result<Self> {
        let mut config: postgres::Config = options
            .url
            .parse()
            .map_err(|e| Error::Config(format!("store.postgres is not a PostgreSQL URL: {e}")))?;
        if config.get_password().is_some() {
            return Err(Error::Config(
                "store.postgres: the password is never inline; use password_file or password_env"
                    .into(),
            ));
        }
        if let Some(password) = &options.password {
            config.password(password.as_bytes());
        }
        config.application_name(&format!("wrapd {}", options.instance));
        config.connect_timeout(Duration::from_secs(5));
        // A connection whose peer is gone without a word (a dead host, a NAT that forgot
        // it) is noticed within about a minute, not the system's two hours: the listening
        // connection above all, whose silence would otherwise pass for "no changes".
        config.keepalives(true);
        config.keepalives_idle(Duration::from_secs(30));
        config.keepalives_interval(Duration::from_secs(10));
        config.keepalives_retries(3);
        let tls = match options.tls_ca.as_deref() {
            Some(ca) => {
                // Never fall back to a plain connection.
                config.ssl_mode(postgres::config::SslMode::Require);
                tls_connector(ca)?
            }
            None => {
                check_plain_connection(&config)?;
                // Plain, as asked: a connector with no roots that is never used.
                config.ssl_mode(postgres::config::SslMode::Disable);
                no_tls_connector()?
            }
        };
        let manager = PostgresConnectionManager::new(config.clone(), tls.clone());
        let pool = r2d2::Pool::builder()
            .max_size(MAX_POOLED_CONNECTIONS)
            // Connections are made when calls need them, not ahead.
            .min_idle(Some(0))
            // No round trip per checkout: a connection the server closed fails its first
            // use, and `with` runs the call again on a new one.
            .test_on_check_out(false)
            .connection_timeout(Duration::from_secs(5))
            .build_unchecked(manager);
        let store = Self {
            config,
            tls,
            instance: options.instance.clone(),
            pool: Some(pool),
            listener: Mutex::new(None),
            maintenance: Mutex::new(None),
            instance_lock: Mutex::new(None),
            listen_paused_until: Mutex::new(None),
        };
        store.migrate()?;
        Ok(store)
    }

    /// A connection of its own (the listener, the locks held for long), outside the pool.
    fn connect(&self) -> Result<Client> {
        self.config
            .connect(self.tls.clone())
            .map_err(|e| Error::Unavailable(format!("cannot connect to the metadata store: {e}")))
    }

    /// Runs `f` on a pooled connection; the pool drops one that broke. A pooled connection
    /// the server closed meanwhile (a restart, a failover) fails its first use: then `f` runs
    /// once more on a new connection.
    fn with<T>(&self, mut f: impl FnMut(&mut Client) -> Result<T>) -> Result<T> {
        // The pool is taken only by `Drop`.
        let pool = self
            .pool
            .as_ref()
            .ok_or_else(|| Error::Internal("store closed".into()))?;
        let mut pooled = pool.get().map_err(|e| {
            Error::Unavailable(format!("cannot connect to the metadata store: {e}"))
        })?;
        let result = f(&mut pooled);
        if result.is_err() && pooled.is_closed() {
            drop(pooled);
            return f(&mut self.connect()?);
        }
        result
    }

    /// Runs `f` in a transaction, committed when it returns Ok.
    fn tx<T>(&self, mut f: impl FnMut(&mut Transaction<'_>) -> Result<T>) -> Result<T> {
        self.with(|client| {
            let mut tx = client.transaction().map_err(pg_error)?;
            let value = f(&mut tx)?;
            tx.commit().map_err(pg_error)?;
            Ok(value)
        })
    }

    fn migrate(&self) -> Result<()> {
        self.tx(|tx| {
            tx.execute("SELECT pg_advisory_xact_lock($1)", &[&MIGRATION_LOCK])
                .map_err(pg_error)?;
            tx.batch_execute(
                "CREATE TABLE IF NOT EXISTS wrapd_migrations (
                    version    INTEGER PRIMARY KEY,
                    applied_at TIMESTAMPTZ NOT NULL DEFAULT now()
                 )",
            )
            .map_err(pg_error)?;
            let applied: Option<i32> = tx
                .query_one("SELECT max(version) FROM wrapd_migrations", &[])
                .map_err(pg_error)?
                .get(0);
            let applied = applied.unwrap_or(0);
            let newest = MIGRATIONS.last().map_or(0, |m| m.0);
            if applied > newest {
                return Err(Error::Config(format!(
                    "the metadata store's schema {applied} is newer than this wrapd ({newest})"
                )));
            }
            for (version, sql) in MIGRATIONS.iter().filter(|(v, _)| *v > applied) {
                tx.batch_execute(sql).map_err(pg_error)?;
                tx.execute(
                    "INSERT INTO wrapd_migrations (version) VALUES ($1)",
                    &[version],
                )
                .map_err(pg_error)?;
                tracing::info!(version, "metadata store migrated");
            }
            Ok(())
        })
    }

    fn load_key(client: &mut impl postgres::GenericClient, id: &str) -> Result<Option<KeyRecord>> {
        let Some(row) = client
            .query_opt(
                "SELECT description, state, created_at, deletion_date, rotation_period_days,
                        next_rotation, origin, material_check, material_present,
                        material_valid_to
                 FROM keys WHERE id = $1",
                &[&id],
            )
            .map_err(pg_error)?
        else {
            return Ok(None);
        };
        let versions = client
            .query(
                "SELECT version, created_at, wraps_reserved, automatic FROM key_versions
                 WHERE key_id = $1 ORDER BY version",
                &[&id],
            )
            .map_err(pg_error)?
            .iter()
            .map(|r| VersionRecord {
                version: r.get::<_, i32>(0).max(0) as u32,
                created_at: from_millis(r.get(1)),
                wraps_reserved: r.get::<_, i64>(2).max(0) as u64,
                automatic: r.get(3),
            })
            .collect();
        let aliases = client
            .query(
                "SELECT name FROM aliases WHERE key_id = $1 ORDER BY name",
                &[&id],
            )
            .map_err(pg_error)?
            .iter()
            .map(|r| {
                let name: String = r.get(0);
                AliasName::parse(&name).map_err(|_| corrupt("alias", &name))
            })
            .collect::<Result<Vec<_>>>()?;
        let tags = client
            .query(
                "SELECT tag_key, tag_value FROM key_tags WHERE key_id = $1 ORDER BY tag_key",
                &[&id],
            )
            .map_err(pg_error)?
            .iter()
            .map(|r| (r.get::<_, String>(0), r.get::<_, String>(1)))
            .collect::<BTreeMap<_, _>>();
        let state: String = row.get(1);
        let rotation = match (row.get::<_, Option<i32>>(4), row.get::<_, Option<i64>>(5)) {
            (Some(days), Some(next)) => Some(RotationSchedule {
                period_days: days.max(0) as u32,
                next: from_millis(next),
            }),
            _ => None,
        };
        let origin: String = row.get(6);
        let material = row
            .get::<_, Option<String>>(7)
            .map(|check| {
                Ok::<_, Error>(ImportedMaterial {
                    check_value: super::metadata::decode_check_value(&check)
                        .ok_or_else(|| corrupt("key check value", &check))?,
                    present: row.get(8),
                    valid_to: row.get::<_, Option<i64>>(9).map(from_millis),
                })
            })
            .transpose()?;
        Ok(Some(KeyRecord {
            origin: KeyOrigin::parse(&origin).ok_or_else(|| corrupt("origin", &origin))?,
            material,
            id: KeyId::parse(id).map_err(|_| corrupt("key id", id))?,
            description: row.get(0),
            state: KeyState::parse(&state).ok_or_else(|| corrupt("state", &state))?,
            created_at: from_millis(row.get(2)),
            deletion_date: row.get::<_, Option<i64>>(3).map(from_millis),
            versions,
            aliases,
            rotation,
            tags,
        }))
    }

    fn key_exists(tx: &mut Transaction<'_>, id: &KeyId) -> Result<()> {
        tx.query_opt(
            "SELECT 1 FROM keys WHERE id = $1 FOR UPDATE",
            &[&id.as_str()],
        )
        .map_err(pg_error)?
        .map(|_| ())
        .ok_or_else(|| Error::KeyNotFound(id.to_string()))
    }

    fn write_rotation(
        tx: &mut Transaction<'_>,
        id: &KeyId,
        rotation: Option<&RotationSchedule>,
    ) -> Result<()> {
        let days = rotation.map(|r| r.period_days as i32);
        let next = rotation.map(|r| to_millis(r.next));
        tx.execute(
            "UPDATE keys SET rotation_period_days = $2, next_rotation = $3 WHERE id = $1",
            &[&id.as_str(), &days, &next],
        )
        .map_err(pg_error)?;
        Ok(())
    }

    fn write_material(
        tx: &mut Transaction<'_>,
        id: &KeyId,
        origin: KeyOrigin,
        material: Option<&ImportedMaterial>,
    ) -> Result<()> {
        tx.execute(
            "UPDATE keys SET origin = $2, material_check = $3, material_present = $4,
                    material_valid_to = $5
             WHERE id = $1",
            &[
                &id.as_str(),
                &origin.as_str(),
                &material.map(|m| hex::encode(m.check_value)),
                &material.is_some_and(|m| m.present),
                &material.and_then(|m| m.valid_to).map(to_millis),
            ],
        )
        .map_err(pg_error)?;
        Ok(())
    }

    fn write_tags(
        tx: &mut Transaction<'_>,
        id: &KeyId,
        tags: &BTreeMap<String, String>,
    ) -> Result<()> {
        tx.execute("DELETE FROM key_tags WHERE key_id = $1", &[&id.as_str()])
            .map_err(pg_error)?;
        for (key, value) in tags {
            tx.execute(
                "INSERT INTO key_tags (key_id, tag_key, tag_value) VALUES ($1, $2, $3)",
                &[&id.as_str(), key, value],
            )
            .map_err(pg_error)?;
        }
        Ok(())
    }

    fn insert_alias(tx: &mut Transaction<'_>, alias: &AliasName, key: &KeyId) -> Result<()> {
        let inserted = tx
            .execute(
                "INSERT INTO aliases (name, key_id) VALUES ($1, $2) ON CONFLICT (name) DO NOTHING",
                &[&alias.as_str(), &key.as_str()],
            )
            .map_err(pg_error)?;
        if inserted == 0 {
            return Err(Error::AlreadyExists(format!(
                "alias {alias} already exists"
            )));
        }
        notify_aliases(tx)
    }

    fn aliases_from_rows(rows: Vec<Row>) -> Result<Vec<(AliasName, KeyId)>> {
        rows.iter()
            .map(|r| {
                let (name, key): (String, String) = (r.get(0), r.get(1));
                Ok((
                    AliasName::parse(&name).map_err(|_| corrupt("alias", &name))?,
                    KeyId::parse(&key).map_err(|_| corrupt("key id", &key))?,
                ))
            })
            .collect()
    }

    /// Makes this daemon the only live one under its instance name on this database, for
    /// as long as the store is open: a session-level advisory lock on the name, held by a
    /// connection of its own. Version claims are per instance name, so two live daemons
    /// with one name would take each other's claims (and undo each other's rotations).
    /// Waits up to `wait` for a daemon that just died to have its session ended, then
    /// refuses with an error that names the instance and the fix.
    pub fn claim_instance(&self, wait: Duration) -> Result<()> {
        let deadline = std::time::Instant::now() + wait;
        let mut client = self.connect()?;
        // A dead host's session (and its lock) ends within about a minute, not the
        // operating system's two hours of TCP keepalive.
        client
            .batch_execute(
                "SET tcp_keepalives_idle = 30; SET tcp_keepalives_interval = 10; SET tcp_keepalives_count = 3",
            )
            .map_err(pg_error)?;
        loop {
            let locked: bool = client
                .query_one(INSTANCE_LOCK_SQL, &[&self.instance])
                .map_err(pg_error)?
                .get(0);
            if locked {
                break;
            }
            if std::time::Instant::now() >= deadline {
                return Err(Error::Config(format!(
                    "store.instance {:?}: another live wrapd uses this instance name on this database; two daemons with one name undo each other's rotations. Give each daemon its own [store] instance (the default, the host name, is shared by daemons on one host)",
                    self.instance
                )));
            }
            std::thread::sleep(Duration::from_millis(250));
        }
        *self.instance_lock.lock() = Some(client);
        Ok(())
    }

    /// Checks that this daemon still holds its instance name: the lock lives with its
    /// session, which a database restart or a dropped connection ends. It is taken again on
    /// a new session; if another daemon took the name meanwhile, version claims are refused.
    fn hold_instance(&self) -> Result<()> {
        let mut slot = self.instance_lock.lock();
        let Some(client) = slot.as_mut() else {
            return Ok(()); // a tool that never claimed a name
        };
        if !client.is_closed() && client.is_valid(Duration::from_secs(5)).is_ok() {
            return Ok(());
        }
        let mut fresh = self.connect()?;
        let locked: bool = fresh
            .query_one(INSTANCE_LOCK_SQL, &[&self.instance])
            .map_err(pg_error)?
            .get(0);
        if !locked {
            return Err(Error::Unavailable(format!(
                "store.instance {:?} was taken by another daemon while this one's database session was down; version claims are refused",
                self.instance
            )));
        }
        if let Some(old) = slot.replace(fresh) {
            drop(old);
        }
        tracing::warn!(instance = %self.instance, "the instance name's lock was taken again on a new session");
        Ok(())
    }

    /// Runs `query` on a dedicated connection kept in `slot`.
    fn on_dedicated<T>(
        &self,
        slot: &Mutex<Option<Client>>,
        f: impl FnOnce(&mut Client, bool) -> Result<T>,
    ) -> Result<T> {
        let mut slot = slot.lock();
        let fresh = slot.as_ref().is_none_or(Client::is_closed);
        if fresh {
            *slot = Some(self.connect()?);
        }
        let client = slot
            .as_mut()
            .ok_or_else(|| Error::Internal("no connection".into()))?;
        let result = f(client, fresh);
        if client.is_closed() {
            *slot = None;
        }
        result
    }
}

impl Drop for PostgresStore {
    fn drop(&mut self) {
        // Each synchronous client owns a small runtime, which must not be dropped on an
        // async runtime's thread (the daemon drops the store as it shuts down): close them
        // on a thread of their own.
        let pool = self.pool.take();
        let mut clients: Vec<Client> = Vec::new();
        clients.extend(self.listener.lock().take());
        clients.extend(self.maintenance.lock().take());
        clients.extend(self.instance_lock.lock().take());
        if pool.is_some() || !clients.is_empty() {
            let closer = std::thread::spawn(move || drop((pool, clients)));
            let _ = closer.join();
        }
    }
}

impl MetadataStore for PostgresStore {
    fn create_key(&self, key: &KeyRecord, alias: Option<&AliasName>) -> Result<()> {
        self.tx(|tx| {
            tx.execute(
                "INSERT INTO keys (id, description, state, created_at, deletion_date)
                 VALUES ($1, $2, $3, $4, $5)",
                &[
                    &key.id.as_str(),
                    &key.description,
                    &key.state.as_str(),
                    &to_millis(key.created_at),
                    &key.deletion_date.map(to_millis),
                ],
            )
            .map_err(|e| {
                if is_unique_violation(&e) {
                    Error::AlreadyExists(format!("key {} already exists", key.id))
                } else {
                    pg_error(e)
                }
            })?;
            for v in &key.versions {
                tx.execute(
                    "INSERT INTO key_versions (key_id, version, created_at, wraps_reserved, automatic)
                     VALUES ($1, $2, $3, $4, $5)",
                    &[
                        &key.id.as_str(),
                        &version_i32(v.version)?,
                        &to_millis(v.created_at),
                        &(v.wraps_reserved as i64),
                        &v.automatic,
                    ],
                )
                .map_err(pg_error)?;
            }
            Self::write_rotation(tx, &key.id, key.rotation.as_ref())?;
            Self::write_tags(tx, &key.id, &key.tags)?;
            Self::write_material(tx, &key.id, key.origin, key.material.as_ref())?;
            if let Some(alias) = alias {
                Self::insert_alias(tx, alias, &key.id)?;
            }
            notify_key(tx, &key.id)
        })
    }

    fn key(&self, id: &KeyId) -> Result<Option<KeyRecord>> {
        self.with(|client| Self::load_key(client, id.as_str()))
    }

    fn all_keys(&self) -> Result<Vec<KeyRecord>> {
        self.with(|client| {
            // One consistent snapshot of every table.
            let mut tx = client
                .build_transaction()
                .isolation_level(postgres::IsolationLevel::RepeatableRead)
                .read_only(true)
                .start()
                .map_err(pg_error)?;
            let ids: Vec<String> = tx
                .query("SELECT id FROM keys ORDER BY seq", &[])
                .map_err(pg_error)?
                .iter()
                .map(|r| r.get(0))
                .collect();
            let mut keys = Vec::with_capacity(ids.len());
            for id in ids {
                if let Some(key) = Self::load_key(&mut tx, &id)? {
                    keys.push(key);
                }
            }
            tx.commit().map_err(pg_error)?;
            Ok(keys)
        })
    }

    fn list_keys(&self, after: &Cursor, limit: usize) -> Result<Vec<(Cursor, KeyRecord)>> {
        let after: i64 = if after.0.is_empty() {
            0
        } else {
            after
                .0
                .parse()
                .map_err(|_| Error::invalid("malformed page_token"))?
        };
        self.with(|client| {
            let rows = client
                .query(
                    "SELECT seq, id FROM keys WHERE seq > $1 ORDER BY seq LIMIT $2",
                    &[&after, &(limit as i64)],
                )
                .map_err(pg_error)?;
            let mut out = Vec::with_capacity(rows.len());
            for row in rows {
                let (seq, id): (i64, String) = (row.get(0), row.get(1));
                if let Some(key) = Self::load_key(client, &id)? {
                    out.push((Cursor(seq.to_string()), key));
                }
            }
            Ok(out)
        })
    }

    fn add_version(&self, id: &KeyId, version: &VersionRecord) -> Result<()> {
        self.tx(|tx| {
            Self::key_exists(tx, id)?;
            tx.execute(
                "INSERT INTO key_versions (key_id, version, created_at, wraps_reserved, automatic)
                 VALUES ($1, $2, $3, $4, $5)",
                &[
                    &id.as_str(),
                    &version_i32(version.version)?,
                    &to_millis(version.created_at),
                    &(version.wraps_reserved as i64),
                    &version.automatic,
                ],
            )
            .map_err(|e| {
                if is_unique_violation(&e) {
                    Error::AlreadyExists(format!("version {} of {id}", version.version))
                } else {
                    pg_error(e)
                }
            })?;
            tx.execute(
                "DELETE FROM pending_versions WHERE key_id = $1 AND version = $2",
                &[&id.as_str(), &version_i32(version.version)?],
            )
            .map_err(pg_error)?;
            notify_key(tx, id)
        })
    }

    fn begin_version(&self, id: &KeyId, version: u32) -> Result<bool> {
        // Claims are per instance name: only while this daemon holds it.
        self.hold_instance()?;
        let v = version_i32(version)?;
        self.tx(|tx| {
            // Serializes claims on one key with its other changes.
            Self::key_exists(tx, id)?;
            let exists = tx
                .query_opt(
                    "SELECT 1 FROM key_versions WHERE key_id = $1 AND version = $2",
                    &[&id.as_str(), &v],
                )
                .map_err(pg_error)?;
            if exists.is_some() {
                return Err(Error::AlreadyExists(format!("version {version} of {id}")));
            }
            let owner: Option<String> = tx
                .query_opt(
                    "SELECT owner FROM pending_versions WHERE key_id = $1 AND version = $2",
                    &[&id.as_str(), &v],
                )
                .map_err(pg_error)?
                .map(|r| r.get(0));
            match owner {
                Some(owner) if owner == self.instance => Ok(true),
                Some(owner) => Err(Error::AlreadyExists(format!(
                    "version {version} of {id} is being made by {owner}"
                ))),
                None => {
                    // The key row is locked (FOR UPDATE above): no other claim can slip in.
                    tx.execute(
                        "INSERT INTO pending_versions (key_id, version, owner) VALUES ($1, $2, $3)",
                        &[&id.as_str(), &v, &self.instance],
                    )
                    .map_err(pg_error)?;
                    Ok(false)
                }
            }
        })
    }

    fn pending_versions(&self) -> Result<Vec<(KeyId, u32)>> {
        self.with(|client| {
            client
                .query(
                    "SELECT key_id, version FROM pending_versions WHERE owner = $1
                     ORDER BY key_id, version",
                    &[&self.instance],
                )
                .map_err(pg_error)?
                .iter()
                .map(|r| {
                    let id: String = r.get(0);
                    Ok((
                        KeyId::parse(&id).map_err(|_| corrupt("key id", &id))?,
                        r.get::<_, i32>(1).max(0) as u32,
                    ))
                })
                .collect()
        })
    }

    fn end_version(&self, id: &KeyId, version: u32) -> Result<()> {
        self.with(|client| {
            client
                .execute(
                    "DELETE FROM pending_versions WHERE key_id = $1 AND version = $2 AND owner = $3",
                    &[&id.as_str(), &version_i32(version)?, &self.instance],
                )
                .map_err(pg_error)?;
            Ok(())
        })
    }

    fn set_rotation(&self, id: &KeyId, rotation: Option<&RotationSchedule>) -> Result<()> {
        self.tx(|tx| {
            Self::key_exists(tx, id)?;
            Self::write_rotation(tx, id, rotation)?;
            notify_key(tx, id)
        })
    }

    fn set_tags(&self, id: &KeyId, tags: &BTreeMap<String, String>) -> Result<()> {
        self.tx(|tx| {
            Self::key_exists(tx, id)?;
            Self::write_tags(tx, id, tags)?;
            notify_key(tx, id)
        })
    }

    fn set_material(
        &self,
        id: &KeyId,
        expected: Option<&KeyCheckValue>,
        state: KeyState,
        material: &ImportedMaterial,
    ) -> Result<()> {
        let expected = expected.map(hex::encode);
        self.tx(|tx| {
            // Under READ COMMITTED a concurrent update is waited for and this condition
            // checked again on the committed row: a compare-and-swap.
            let changed = tx
                .execute(
                    "UPDATE keys SET state = $2 WHERE id = $1
                     AND material_check IS NOT DISTINCT FROM $3::text",
                    &[&id.as_str(), &state.as_str(), &expected],
                )
                .map_err(pg_error)?;
            if changed == 0 {
                Self::key_exists(tx, id)?;
                return Err(other_material(id));
            }
            Self::write_material(tx, id, KeyOrigin::External, Some(material))?;
            notify_key(tx, id)
        })
    }

    fn set_state(
        &self,
        id: &KeyId,
        state: KeyState,
        deletion_date: Option<SystemTime>,
    ) -> Result<()> {
        self.tx(|tx| {
            let changed = tx
                .execute(
                    "UPDATE keys SET state = $2, deletion_date = $3 WHERE id = $1",
                    &[&id.as_str(), &state.as_str(), &deletion_date.map(to_millis)],
                )
                .map_err(pg_error)?;
            if changed == 0 {
                return Err(Error::KeyNotFound(id.to_string()));
            }
            notify_key(tx, id)
        })
    }

    fn claim_wraps(&self, id: &KeyId, version: u32, block: u64) -> Result<u64> {
        let block = i64::try_from(block).unwrap_or(i64::MAX);
        self.with(|client| {
            let row = client
                .query_opt(
                    "UPDATE key_versions SET wraps_reserved = wraps_reserved + $3
                     WHERE key_id = $1 AND version = $2 RETURNING wraps_reserved",
                    &[&id.as_str(), &version_i32(version)?, &block],
                )
                .map_err(pg_error)?;
            row.map(|r| r.get::<_, i64>(0).max(0) as u64)
                .ok_or_else(|| Error::KeyNotFound(format!("{id} version {version}")))
        })
    }

    fn delete_key(&self, id: &KeyId, deleted_at: SystemTime) -> Result<()> {
        self.tx(|tx| {
            tx.execute("DELETE FROM keys WHERE id = $1", &[&id.as_str()])
                .map_err(pg_error)?;
            tx.execute(
                "INSERT INTO deleted_keys (id, deleted_at) VALUES ($1, $2)
                 ON CONFLICT (id) DO UPDATE SET deleted_at = excluded.deleted_at",
                &[&id.as_str(), &to_millis(deleted_at)],
            )
            .map_err(pg_error)?;
            notify_key(tx, id)?;
            notify_aliases(tx)
        })
    }

    fn keys_due_for_deletion(&self, now: SystemTime) -> Result<Vec<KeyId>> {
        self.with(|client| {
            client
                .query(
                    "SELECT id FROM keys WHERE state = 'PENDING_DELETION' AND deletion_date <= $1",
                    &[&to_millis(now)],
                )
                .map_err(pg_error)?
                .iter()
                .map(|r| {
                    let id: String = r.get(0);
                    KeyId::parse(&id).map_err(|_| corrupt("key id", &id))
                })
                .collect()
        })
    }

    fn all_aliases(&self) -> Result<Vec<(AliasName, KeyId)>> {
        self.with(|client| {
            let rows = client
                .query("SELECT name, key_id FROM aliases ORDER BY name", &[])
                .map_err(pg_error)?;
            Self::aliases_from_rows(rows)
        })
    }

    fn alias(&self, alias: &AliasName) -> Result<Option<KeyId>> {
        self.with(|client| {
            let row = client
                .query_opt(
                    "SELECT key_id FROM aliases WHERE name = $1",
                    &[&alias.to_string()],
                )
                .map_err(pg_error)?;
            row.map(|r| {
                let key: String = r.get(0);
                KeyId::parse(&key).map_err(|_| corrupt("key id", &key))
            })
            .transpose()
        })
    }

    fn create_alias(&self, alias: &AliasName, key: &KeyId) -> Result<()> {
        self.tx(|tx| {
            Self::key_exists(tx, key)?;
            Self::insert_alias(tx, alias, key)?;
            notify_key(tx, key)
        })
    }

    fn update_alias(&self, alias: &AliasName, key: &KeyId) -> Result<()> {
        self.tx(|tx| {
            Self::key_exists(tx, key)?;
            let old = tx
                .query_opt(
                    "UPDATE aliases SET key_id = $2 WHERE name = $1
                     RETURNING (SELECT key_id FROM aliases WHERE name = $1)",
                    &[&alias.as_str(), &key.as_str()],
                )
                .map_err(pg_error)?
                .ok_or_else(|| Error::AliasNotFound(alias.to_string()))?;
            let old: String = old.get(0);
            if let Ok(old) = KeyId::parse(&old) {
                notify_key(tx, &old)?;
            }
            notify_key(tx, key)?;
            notify_aliases(tx)
        })
    }

    fn delete_alias(&self, alias: &AliasName) -> Result<Option<KeyId>> {
        self.tx(|tx| {
            let key = tx
                .query_opt(
                    "DELETE FROM aliases WHERE name = $1 RETURNING key_id",
                    &[&alias.as_str()],
                )
                .map_err(pg_error)?
                .map(|r| {
                    let key: String = r.get(0);
                    KeyId::parse(&key).map_err(|_| corrupt("key id", &key))
                })
                .transpose()?;
            if let Some(key) = &key {
                notify_key(tx, key)?;
                notify_aliases(tx)?;
            }
            Ok(key)
        })
    }

    fn list_aliases(
        &self,
        key: Option<&KeyId>,
        after: &Cursor,
        limit: usize,
    ) -> Result<Vec<(AliasName, KeyId)>> {
        self.with(|client| {
            let rows = client
                .query(
                    "SELECT name, key_id FROM aliases
                     WHERE name > $1 AND ($2::TEXT IS NULL OR key_id = $2)
                     ORDER BY name LIMIT $3",
                    &[&after.0, &key.map(KeyId::as_str), &(limit as i64)],
                )
                .map_err(pg_error)?;
            Self::aliases_from_rows(rows)
        })
    }

    fn is_shared(&self) -> bool {
        true
    }

    fn wait_for_changes(&self, timeout: Duration) -> Result<StoreChanges> {
        let paused = self
            .listen_paused_until
            .lock()
            .is_some_and(|until| std::time::Instant::now() < until);
        let changes = if paused {
            // Not listening after a flood: the caller's re-read covers what is missed.
            std::thread::sleep(timeout);
            StoreChanges {
                everything: true,
                ..StoreChanges::default()
            }
        } else {
            let drained = self.on_dedicated(&self.listener, |client, fresh| {
                if fresh {
                    client
                        .batch_execute(&format!("LISTEN {CHANNEL}"))
                        .map_err(pg_error)?;
                    // Whatever happened while no one listened is unknown.
                    return Ok((
                        StoreChanges {
                            everything: true,
                            ..StoreChanges::default()
                        },
                        false,
                    ));
                }
                drain_notifications(client, timeout)
            });
            match drained {
                Ok((changes, false)) => changes,
                Ok((changes, true)) => {
                    // A flood (any role that can connect may NOTIFY): stop listening for a
                    // while. Closing the connection drops what it had buffered, and keeps
                    // this daemon from holding the server's notification queue.
                    tracing::warn!(
                        "more notifications than wrapd sends; not listening for {} s (re-reading the store instead)",
                        LISTEN_PAUSE.as_secs()
                    );
                    *self.listen_paused_until.lock() =
                        Some(std::time::Instant::now() + LISTEN_PAUSE);
                    drop(self.listener.lock().take());
                    changes
                }
                Err(err) => {
                    // Reconnect rather than trust this connection; the fresh LISTEN reports
                    // `everything`.
                    drop(self.listener.lock().take());
                    return Err(err);
                }
            }
        };
        // The database answered just now, on a connection of the pool: what the view is
        // confirmed against (an idle wait proves nothing, and the listening connection may
        // be busy with notifications).
        self.with(|client| client.simple_query("").map(drop).map_err(pg_error))?;
        Ok(changes)
    }

    fn try_lock_maintenance(&self) -> Result<bool> {
        self.on_dedicated(&self.maintenance, |client, _| {
            client
                .query_one("SELECT pg_try_advisory_lock($1)", &[&MAINTENANCE_LOCK])
                .map_err(pg_error)
                .map(|row| row.get(0))
        })
    }

    fn unlock_maintenance(&self) {
        let unlocked = self.on_dedicated(&self.maintenance, |client, _| {
            client
                .execute("SELECT pg_advisory_unlock($1)", &[&MAINTENANCE_LOCK])
                .map_err(pg_error)
        });
        if let Err(err) = unlocked {
            // The server releases it with the session anyway.
            tracing::debug!(error = %err, "cannot release the maintenance lock");
        }
    }
}

impl HeadStore for PostgresStore {
    fn audit_head(&self, chain: &str) -> Result<Option<ChainHead>> {
        self.with(|client| {
            client
                .query_opt(
                    "SELECT seq, hash FROM audit_heads WHERE chain = $1",
                    &[&chain],
                )
                .map_err(pg_error)?
                .map(|r| {
                    let seq: i64 = r.get(0);
                    Ok(ChainHead {
                        seq: u64::try_from(seq)
                            .map_err(|_| corrupt("audit head seq", &seq.to_string()))?,
                        hash: r.get(1),
                    })
                })
                .transpose()
        })
    }

    fn record_audit_head(&self, chain: &str, head: &ChainHead) -> Result<()> {
        let seq = i64::try_from(head.seq)
            .map_err(|_| Error::Internal("audit sequence beyond the store's range".into()))?;
        self.with(|client| {
            client
                .execute(
                    "INSERT INTO audit_heads (chain, seq, hash) VALUES ($1, $2, $3)
                     ON CONFLICT (chain) DO UPDATE SET seq = excluded.seq, hash = excluded.hash
                     WHERE excluded.seq > audit_heads.seq",
                    &[&chain, &seq, &head.hash],
                )
                .map_err(pg_error)?;
            Ok(())
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn check(url: &str) -> Result<()> {
        check_plain_connection(&url.parse().unwrap())
    }

    #[test]
    fn a_plain_connection_is_refused_unless_local_or_explicitly_plain() {
        for local in [
            "postgresql://wrapd@127.0.0.1:5432/wrapd",
            "postgresql://wrapd@localhost/wrapd",
            "postgresql://wrapd@[::1]:5432/wrapd",
            "host=/var/run/postgresql user=wrapd dbname=wrapd",
            "postgresql://db.example.com/wrapd?sslmode=disable",
        ] {
            assert!(check(local).is_ok(), "{local}");
        }
        for remote in [
            "postgresql://wrapd@db.example.com/wrapd",
            "postgresql://wrapd@10.0.0.5/wrapd?sslmode=require",
            "host=127.0.0.1,db.example.com user=wrapd dbname=wrapd",
        ] {
            let err = check(remote).unwrap_err().to_string();
            assert!(err.contains("tls_ca_file"), "{remote}: {err}");
        }
    }
}
