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
//!
//! Here: opening, the connection pool and migrations; `store.rs` the store's operations,
//! `rows.rs` a key's rows, `fleet.rs` the instance lock, dedicated connections and
//! notifications, `connection.rs` TLS and the plain-connection rule.

mod connection;
mod fleet;
mod rows;
mod store;

use connection::*;
use fleet::*;
use rows::*;

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
    Cursor, GrantRow, ImportedMaterial, KeyOrigin, KeyRecord, KeyState, MetadataStore,
    RotationSchedule, StoreChanges, VersionDestruction, VersionRecord, VersionUsage, corrupt,
    from_millis, grant_to_add, other_material, to_millis,
};
use crate::audit::{ChainHead, HeadStore};
use crate::error::{Error, Result};
use crate::grant::Grant;
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
    (1, include_str!("../migrations/postgres/0001.sql")),
    (2, include_str!("../migrations/postgres/0002.sql")),
    (3, include_str!("../migrations/postgres/0003.sql")),
    (4, include_str!("../migrations/postgres/0004.sql")),
    (5, include_str!("../migrations/postgres/0005.sql")),
    (6, include_str!("../migrations/postgres/0006.sql")),
    (7, include_str!("../migrations/postgres/0007.sql")),
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
