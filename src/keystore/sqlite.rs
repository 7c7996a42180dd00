//! [`MetadataStore`] on an embedded SQLite file (WAL, `synchronous=FULL`, foreign keys on).

use std::collections::BTreeMap;
use std::path::Path;
use std::time::{Duration, SystemTime};

use parking_lot::{Mutex, MutexGuard};
use rusqlite::{Connection, OptionalExtension, Transaction, params};

use super::metadata::{
    Cursor, GrantRow, ImportedMaterial, KeyOrigin, KeyRecord, KeyState, MetadataStore,
    RotationSchedule, VersionDestruction, VersionRecord, VersionUsage, corrupt, from_millis,
    grant_to_add, other_material, to_millis,
};
use crate::audit::{ChainHead, HeadStore};
use crate::error::{Error, Result};
use crate::grant::Grant;
use crate::hsm::KeyCheckValue;
use crate::ids::{AliasName, KeyId};

const SCHEMA_VERSION: i64 = 8;

const SCHEMA: &str = include_str!("migrations/sqlite/0001.sql");

/// Schema 2: automatic rotation (schedule per key, how each version was made) and tags.
const MIGRATION_2: &str = include_str!("migrations/sqlite/0002.sql");

/// Schema 3: key import: where a key's material comes from, and the imported material's check
/// value, presence and expiry.
const MIGRATION_3: &str = include_str!("migrations/sqlite/0003.sql");
/// Schema 4: version usage.
const MIGRATION_4: &str = include_str!("migrations/sqlite/0004.sql");
/// Schema 5: version retirement.
const MIGRATION_5: &str = include_str!("migrations/sqlite/0005.sql");
/// Schema 6: version destruction.
const MIGRATION_6: &str = include_str!("migrations/sqlite/0006.sql");
/// Key policies.
const MIGRATION_7: &str = include_str!("migrations/sqlite/0007.sql");
/// Grants.
const MIGRATION_8: &str = include_str!("migrations/sqlite/0008.sql");

/// The SQLite metadata store. One connection behind a mutex: metadata calls are short, and
/// the data-plane hot path reads the key store's in-memory view instead.
pub struct SqliteStore {
    conn: Mutex<Connection>,
}

fn db_error(err: rusqlite::Error) -> Error {
    Error::Store(err.to_string())
}

impl SqliteStore {
    /// Opens (creating if needed) the database file and applies the schema.
    pub fn open(path: &Path) -> Result<Self> {
        let conn = Connection::open(path).map_err(|e| {
            Error::Config(format!(
                "cannot open metadata store {}: {e}",
                path.display()
            ))
        })?;
        Self::init(conn)
    }

    /// An in-memory store (unit tests).
    pub fn in_memory() -> Result<Self> {
        Self::init(Connection::open_in_memory().map_err(db_error)?)
    }

    fn init(conn: Connection) -> Result<Self> {
        conn.busy_timeout(Duration::from_secs(5))
            .map_err(db_error)?;
        conn.execute_batch(
            "PRAGMA journal_mode = WAL; PRAGMA synchronous = FULL; PRAGMA foreign_keys = ON;",
        )
        .map_err(db_error)?;
        let version: i64 = conn
            .query_row("PRAGMA user_version", [], |row| row.get(0))
            .map_err(db_error)?;
        if version > SCHEMA_VERSION {
            return Err(Error::Config(format!(
                "metadata store schema {version} is newer than this wrapd ({SCHEMA_VERSION})"
            )));
        }
        // Schema 1 is created idempotently; later versions are migrations, each applied
        // once in one transaction with the version bump.
        conn.execute_batch(SCHEMA).map_err(db_error)?;
        if version < 2 {
            conn.execute_batch(&format!(
                "BEGIN; {MIGRATION_2} PRAGMA user_version = 2; COMMIT;"
            ))
            .map_err(db_error)?;
        }
        if version < 3 {
            conn.execute_batch(&format!(
                "BEGIN; {MIGRATION_3} PRAGMA user_version = 3; COMMIT;"
            ))
            .map_err(db_error)?;
        }
        if version < 4 {
            conn.execute_batch(&format!(
                "BEGIN; {MIGRATION_4} PRAGMA user_version = 4; COMMIT;"
            ))
            .map_err(db_error)?;
        }
        if version < 5 {
            conn.execute_batch(&format!(
                "BEGIN; {MIGRATION_5} PRAGMA user_version = 5; COMMIT;"
            ))
            .map_err(db_error)?;
        }
        if version < 6 {
            conn.execute_batch(&format!(
                "BEGIN; {MIGRATION_6} PRAGMA user_version = 6; COMMIT;"
            ))
            .map_err(db_error)?;
        }
        if version < 7 {
            conn.execute_batch(&format!(
                "BEGIN; {MIGRATION_7} PRAGMA user_version = 7; COMMIT;"
            ))
            .map_err(db_error)?;
        }
        if version < 8 {
            conn.execute_batch(&format!(
                "BEGIN; {MIGRATION_8} PRAGMA user_version = 8; COMMIT;"
            ))
            .map_err(db_error)?;
        }
        Ok(Self {
            conn: Mutex::new(conn),
        })
    }

    fn conn(&self) -> MutexGuard<'_, Connection> {
        // rusqlite rolls back an unfinished transaction on drop, so a panic elsewhere while
        // holding the lock leaves the connection usable.
        self.conn.lock()
    }

    fn load_key(conn: &Connection, id: &str) -> Result<Option<KeyRecord>> {
        let row = conn
            .query_row(
                "SELECT description, state, created_at, deletion_date, rotation_period_days,
                        next_rotation, origin, material_check, material_present,
                        material_valid_to, policy
                 FROM keys WHERE id = ?1",
                [id],
                |row| {
                    Ok((
                        (
                            row.get::<_, String>(0)?,
                            row.get::<_, String>(1)?,
                            row.get::<_, i64>(2)?,
                            row.get::<_, Option<i64>>(3)?,
                            row.get::<_, Option<u32>>(4)?,
                            row.get::<_, Option<i64>>(5)?,
                        ),
                        (
                            row.get::<_, String>(6)?,
                            row.get::<_, Option<String>>(7)?,
                            row.get::<_, i64>(8)? != 0,
                            row.get::<_, Option<i64>>(9)?,
                            row.get::<_, Option<String>>(10)?,
                        ),
                    ))
                },
            )
            .optional()
            .map_err(db_error)?;
        let Some((
            (description, state, created_at, deletion_date, period, next),
            (origin, check, present, valid_to, policy),
        )) = row
        else {
            return Ok(None);
        };
        let origin = KeyOrigin::parse(&origin).ok_or_else(|| corrupt("origin", &origin))?;
        let material = check
            .map(|check| {
                Ok::<_, Error>(ImportedMaterial {
                    check_value: super::metadata::decode_check_value(&check)
                        .ok_or_else(|| corrupt("key check value", &check))?,
                    present,
                    valid_to: valid_to.map(from_millis),
                })
            })
            .transpose()?;
        let rotation = match (period, next) {
            (Some(period_days), Some(next)) => Some(RotationSchedule {
                period_days,
                next: from_millis(next),
            }),
            _ => None,
        };
        let mut stmt = conn
            .prepare_cached(
                "SELECT tag_key, tag_value FROM key_tags WHERE key_id = ?1 ORDER BY tag_key",
            )
            .map_err(db_error)?;
        let tags = stmt
            .query_map([id], |row| {
                Ok((row.get::<_, String>(0)?, row.get::<_, String>(1)?))
            })
            .map_err(db_error)?
            .collect::<rusqlite::Result<BTreeMap<_, _>>>()
            .map_err(db_error)?;
        let mut stmt = conn
            .prepare_cached(
                "SELECT version, created_at, wraps_reserved, automatic, retired, destruction_date,
                        destroyed_at
                 FROM key_versions WHERE key_id = ?1 ORDER BY version",
            )
            .map_err(db_error)?;
        let versions = stmt
            .query_map([id], |row| {
                Ok(VersionRecord {
                    version: row.get(0)?,
                    created_at: from_millis(row.get(1)?),
                    wraps_reserved: row.get::<_, i64>(2)?.max(0) as u64,
                    automatic: row.get::<_, i64>(3)? != 0,
                    retired: row.get::<_, i64>(4)? != 0,
                    destruction_date: row.get::<_, Option<i64>>(5)?.map(from_millis),
                    destroyed_at: row.get::<_, Option<i64>>(6)?.map(from_millis),
                })
            })
            .map_err(db_error)?
            .collect::<rusqlite::Result<Vec<_>>>()
            .map_err(db_error)?;
        let mut stmt = conn
            .prepare_cached("SELECT name FROM aliases WHERE key_id = ?1 ORDER BY name")
            .map_err(db_error)?;
        let aliases = stmt
            .query_map([id], |row| row.get::<_, String>(0))
            .map_err(db_error)?
            .collect::<rusqlite::Result<Vec<_>>>()
            .map_err(db_error)?
            .iter()
            .map(|name| AliasName::parse(name).map_err(|_| corrupt("alias", name)))
            .collect::<Result<Vec<_>>>()?;
        let grants = Self::load_grants(conn, id)?;
        Ok(Some(KeyRecord {
            id: KeyId::parse(id).map_err(|_| corrupt("key id", id))?,
            description,
            state: KeyState::parse(&state).ok_or_else(|| corrupt("state", &state))?,
            created_at: from_millis(created_at),
            deletion_date: deletion_date.map(from_millis),
            versions,
            aliases,
            rotation,
            tags,
            origin,
            material,
            policy,
            grants: grants.into(),
        }))
    }

    fn load_grants(conn: &Connection, id: &str) -> Result<Vec<Grant>> {
        let mut stmt = conn
            .prepare_cached(
                "SELECT grant_id, name, grantee, retiring, operations, constraint_equals,
                        constraint_subset, issuer, created_at
                 FROM key_grants WHERE key_id = ?1 ORDER BY created_at, grant_id",
            )
            .map_err(db_error)?;
        let rows = stmt
            .query_map([id], |row| {
                Ok(GrantRow {
                    grant_id: row.get(0)?,
                    name: row.get(1)?,
                    grantee: row.get(2)?,
                    retiring: row.get(3)?,
                    operations: row.get(4)?,
                    equals: row.get(5)?,
                    subset: row.get(6)?,
                    issuer: row.get(7)?,
                    created_at: row.get(8)?,
                })
            })
            .map_err(db_error)?
            .collect::<rusqlite::Result<Vec<_>>>()
            .map_err(db_error)?;
        rows.into_iter().map(GrantRow::into_grant).collect()
    }

    fn write_material(
        tx: &Transaction<'_>,
        id: &KeyId,
        origin: KeyOrigin,
        material: Option<&ImportedMaterial>,
    ) -> Result<()> {
        tx.execute(
            "UPDATE keys SET origin = ?2, material_check = ?3, material_present = ?4,
                    material_valid_to = ?5
             WHERE id = ?1",
            params![
                id.as_str(),
                origin.as_str(),
                material.map(|m| hex::encode(m.check_value)),
                material.is_some_and(|m| m.present),
                material.and_then(|m| m.valid_to).map(to_millis)
            ],
        )
        .map_err(db_error)?;
        Ok(())
    }

    fn write_rotation(
        tx: &Transaction<'_>,
        id: &KeyId,
        rotation: Option<&RotationSchedule>,
    ) -> Result<()> {
        tx.execute(
            "UPDATE keys SET rotation_period_days = ?2, next_rotation = ?3 WHERE id = ?1",
            params![
                id.as_str(),
                rotation.map(|r| r.period_days),
                rotation.map(|r| to_millis(r.next))
            ],
        )
        .map_err(db_error)?;
        Ok(())
    }

    fn write_tags(tx: &Transaction<'_>, id: &KeyId, tags: &BTreeMap<String, String>) -> Result<()> {
        tx.execute("DELETE FROM key_tags WHERE key_id = ?1", [id.as_str()])
            .map_err(db_error)?;
        for (key, value) in tags {
            tx.execute(
                "INSERT INTO key_tags (key_id, tag_key, tag_value) VALUES (?1, ?2, ?3)",
                params![id.as_str(), key, value],
            )
            .map_err(db_error)?;
        }
        Ok(())
    }

    fn key_exists(tx: &Transaction<'_>, id: &KeyId) -> Result<()> {
        let found: Option<i64> = tx
            .query_row("SELECT 1 FROM keys WHERE id = ?1", [id.as_str()], |r| {
                r.get(0)
            })
            .optional()
            .map_err(db_error)?;
        found
            .map(|_| ())
            .ok_or_else(|| Error::KeyNotFound(id.to_string()))
    }

    fn insert_alias(tx: &Transaction<'_>, alias: &AliasName, key: &KeyId) -> Result<()> {
        let inserted = tx
            .execute(
                "INSERT INTO aliases (name, key_id) VALUES (?1, ?2) ON CONFLICT(name) DO NOTHING",
                params![alias.as_str(), key.as_str()],
            )
            .map_err(db_error)?;
        if inserted == 0 {
            return Err(Error::AlreadyExists(format!(
                "alias {alias} already exists"
            )));
        }
        Ok(())
    }

    fn aliases_from_rows(rows: Vec<(String, String)>) -> Result<Vec<(AliasName, KeyId)>> {
        rows.into_iter()
            .map(|(name, key)| {
                Ok((
                    AliasName::parse(&name).map_err(|_| corrupt("alias", &name))?,
                    KeyId::parse(&key).map_err(|_| corrupt("key id", &key))?,
                ))
            })
            .collect()
    }
}

impl MetadataStore for SqliteStore {
    fn create_key(&self, key: &KeyRecord, alias: Option<&AliasName>) -> Result<()> {
        let mut conn = self.conn();
        let tx = conn.transaction().map_err(db_error)?;
        tx.execute(
            "INSERT INTO keys (id, description, state, created_at, deletion_date, policy)
             VALUES (?1, ?2, ?3, ?4, ?5, ?6)",
            params![
                key.id.as_str(),
                key.description,
                key.state.as_str(),
                to_millis(key.created_at),
                key.deletion_date.map(to_millis),
                key.policy
            ],
        )
        .map_err(db_error)?;
        for v in &key.versions {
            tx.execute(
                "INSERT INTO key_versions (key_id, version, created_at, wraps_reserved, automatic)
                 VALUES (?1, ?2, ?3, ?4, ?5)",
                params![
                    key.id.as_str(),
                    v.version,
                    to_millis(v.created_at),
                    v.wraps_reserved as i64,
                    v.automatic
                ],
            )
            .map_err(db_error)?;
        }
        Self::write_rotation(&tx, &key.id, key.rotation.as_ref())?;
        Self::write_tags(&tx, &key.id, &key.tags)?;
        Self::write_material(&tx, &key.id, key.origin, key.material.as_ref())?;
        if let Some(alias) = alias {
            Self::insert_alias(&tx, alias, &key.id)?;
        }
        tx.commit().map_err(db_error)
    }

    fn key(&self, id: &KeyId) -> Result<Option<KeyRecord>> {
        Self::load_key(&self.conn(), id.as_str())
    }

    fn all_keys(&self) -> Result<Vec<KeyRecord>> {
        let conn = self.conn();
        let ids = conn
            .prepare("SELECT id FROM keys ORDER BY seq")
            .map_err(db_error)?
            .query_map([], |row| row.get::<_, String>(0))
            .map_err(db_error)?
            .collect::<rusqlite::Result<Vec<_>>>()
            .map_err(db_error)?;
        ids.iter()
            .filter_map(|id| Self::load_key(&conn, id).transpose())
            .collect()
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
        let conn = self.conn();
        let rows = conn
            .prepare_cached("SELECT seq, id FROM keys WHERE seq > ?1 ORDER BY seq LIMIT ?2")
            .map_err(db_error)?
            .query_map(params![after, limit as i64], |row| {
                Ok((row.get::<_, i64>(0)?, row.get::<_, String>(1)?))
            })
            .map_err(db_error)?
            .collect::<rusqlite::Result<Vec<_>>>()
            .map_err(db_error)?;
        let mut out = Vec::with_capacity(rows.len());
        for (seq, id) in rows {
            if let Some(key) = Self::load_key(&conn, &id)? {
                out.push((Cursor(seq.to_string()), key));
            }
        }
        Ok(out)
    }

    fn add_version(&self, id: &KeyId, version: &VersionRecord) -> Result<()> {
        let mut conn = self.conn();
        let tx = conn.transaction().map_err(db_error)?;
        Self::key_exists(&tx, id)?;
        tx.execute(
            "INSERT INTO key_versions (key_id, version, created_at, wraps_reserved, automatic)
             VALUES (?1, ?2, ?3, ?4, ?5)",
            params![
                id.as_str(),
                version.version,
                to_millis(version.created_at),
                version.wraps_reserved as i64,
                version.automatic
            ],
        )
        .map_err(db_error)?;
        tx.execute(
            "DELETE FROM pending_versions WHERE key_id = ?1 AND version = ?2",
            params![id.as_str(), version.version],
        )
        .map_err(db_error)?;
        tx.commit().map_err(db_error)
    }

    fn set_rotation(&self, id: &KeyId, rotation: Option<&RotationSchedule>) -> Result<()> {
        let mut conn = self.conn();
        let tx = conn.transaction().map_err(db_error)?;
        Self::key_exists(&tx, id)?;
        Self::write_rotation(&tx, id, rotation)?;
        tx.commit().map_err(db_error)
    }

    fn set_description(&self, id: &KeyId, description: &str) -> Result<()> {
        let changed = self
            .conn()
            .execute(
                "UPDATE keys SET description = ?2 WHERE id = ?1",
                params![id.as_str(), description],
            )
            .map_err(db_error)?;
        if changed == 0 {
            return Err(Error::KeyNotFound(id.to_string()));
        }
        Ok(())
    }

    fn set_policy(&self, id: &KeyId, policy: &str) -> Result<()> {
        let changed = self
            .conn()
            .execute(
                "UPDATE keys SET policy = ?2 WHERE id = ?1",
                params![id.as_str(), policy],
            )
            .map_err(db_error)?;
        if changed == 0 {
            return Err(Error::KeyNotFound(id.to_string()));
        }
        Ok(())
    }

    fn add_grant(&self, id: &KeyId, grant: &Grant) -> Result<Grant> {
        let mut conn = self.conn();
        let tx = conn.transaction().map_err(db_error)?;
        Self::key_exists(&tx, id)?;
        let grants = Self::load_grants(&tx, id.as_str())?;
        if let Some(kept) = grant_to_add(id, &grants, grant)? {
            return Ok(kept);
        }
        let row = GrantRow::of(grant);
        tx.execute(
            "INSERT INTO key_grants (key_id, grant_id, name, grantee, retiring, operations,
                    constraint_equals, constraint_subset, issuer, created_at)
             VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7, ?8, ?9, ?10)",
            params![
                id.as_str(),
                row.grant_id,
                row.name,
                row.grantee,
                row.retiring,
                row.operations,
                row.equals,
                row.subset,
                row.issuer,
                row.created_at
            ],
        )
        .map_err(db_error)?;
        tx.commit().map_err(db_error)?;
        Ok(grant.clone())
    }

    fn remove_grant(&self, id: &KeyId, grant_id: &str) -> Result<bool> {
        let removed = self
            .conn()
            .execute(
                "DELETE FROM key_grants WHERE key_id = ?1 AND grant_id = ?2",
                params![id.as_str(), grant_id],
            )
            .map_err(db_error)?;
        Ok(removed > 0)
    }

    fn set_tags(&self, id: &KeyId, tags: &BTreeMap<String, String>) -> Result<()> {
        let mut conn = self.conn();
        let tx = conn.transaction().map_err(db_error)?;
        Self::key_exists(&tx, id)?;
        Self::write_tags(&tx, id, tags)?;
        tx.commit().map_err(db_error)
    }

    fn begin_version(&self, id: &KeyId, version: u32) -> Result<bool> {
        let mut conn = self.conn();
        let tx = conn.transaction().map_err(db_error)?;
        let exists: Option<i64> = tx
            .query_row(
                "SELECT 1 FROM key_versions WHERE key_id = ?1 AND version = ?2",
                params![id.as_str(), version],
                |r| r.get(0),
            )
            .optional()
            .map_err(db_error)?;
        if exists.is_some() {
            return Err(Error::AlreadyExists(format!("version {version} of {id}")));
        }
        // One daemon per SQLite file: a claim already there is this daemon's own.
        let inserted = tx
            .execute(
                "INSERT OR IGNORE INTO pending_versions (key_id, version) VALUES (?1, ?2)",
                params![id.as_str(), version],
            )
            .map_err(db_error)?;
        tx.commit().map_err(db_error)?;
        Ok(inserted == 0)
    }

    fn pending_versions(&self) -> Result<Vec<(KeyId, u32)>> {
        let conn = self.conn();
        let mut statement = conn
            .prepare("SELECT key_id, version FROM pending_versions ORDER BY key_id, version")
            .map_err(db_error)?;
        let rows = statement
            .query_map([], |row| {
                Ok((row.get::<_, String>(0)?, row.get::<_, u32>(1)?))
            })
            .map_err(db_error)?;
        rows.map(|row| {
            let (id, version) = row.map_err(db_error)?;
            Ok((
                KeyId::parse(&id).map_err(|_| corrupt("key id", &id))?,
                version,
            ))
        })
        .collect()
    }

    fn end_version(&self, id: &KeyId, version: u32) -> Result<()> {
        self.conn()
            .execute(
                "DELETE FROM pending_versions WHERE key_id = ?1 AND version = ?2",
                params![id.as_str(), version],
            )
            .map_err(db_error)?;
        Ok(())
    }

    fn set_material(
        &self,
        id: &KeyId,
        expected: Option<&KeyCheckValue>,
        state: KeyState,
        material: &ImportedMaterial,
    ) -> Result<()> {
        let mut conn = self.conn();
        let tx = conn.transaction().map_err(db_error)?;
        // `IS`: SQLite's equality that matches NULL to NULL.
        let changed = tx
            .execute(
                "UPDATE keys SET state = ?2 WHERE id = ?1 AND material_check IS ?3",
                params![id.as_str(), state.as_str(), expected.map(hex::encode)],
            )
            .map_err(db_error)?;
        if changed == 0 {
            Self::key_exists(&tx, id)?;
            return Err(other_material(id));
        }
        Self::write_material(&tx, id, KeyOrigin::External, Some(material))?;
        tx.commit().map_err(db_error)
    }

    fn set_state(
        &self,
        id: &KeyId,
        state: KeyState,
        deletion_date: Option<SystemTime>,
    ) -> Result<()> {
        let changed = self
            .conn()
            .execute(
                "UPDATE keys SET state = ?2, deletion_date = ?3 WHERE id = ?1",
                params![id.as_str(), state.as_str(), deletion_date.map(to_millis)],
            )
            .map_err(db_error)?;
        if changed == 0 {
            return Err(Error::KeyNotFound(id.to_string()));
        }
        Ok(())
    }

    fn claim_wraps(&self, id: &KeyId, version: u32, block: u64) -> Result<u64> {
        let total: Option<i64> = self
            .conn()
            .query_row(
                "UPDATE key_versions SET wraps_reserved = wraps_reserved + ?3
                 WHERE key_id = ?1 AND version = ?2 RETURNING wraps_reserved",
                params![
                    id.as_str(),
                    version,
                    i64::try_from(block).unwrap_or(i64::MAX)
                ],
                |r| r.get(0),
            )
            .optional()
            .map_err(db_error)?;
        total
            .map(|t| t.max(0) as u64)
            .ok_or_else(|| Error::KeyNotFound(format!("{id} version {version}")))
    }

    fn delete_key(&self, id: &KeyId, deleted_at: SystemTime) -> Result<()> {
        let mut conn = self.conn();
        let tx = conn.transaction().map_err(db_error)?;
        tx.execute("DELETE FROM keys WHERE id = ?1", [id.as_str()])
            .map_err(db_error)?;
        tx.execute(
            "INSERT OR REPLACE INTO deleted_keys (id, deleted_at) VALUES (?1, ?2)",
            params![id.as_str(), to_millis(deleted_at)],
        )
        .map_err(db_error)?;
        tx.commit().map_err(db_error)
    }

    fn keys_due_for_deletion(&self, now: SystemTime) -> Result<Vec<KeyId>> {
        let conn = self.conn();
        let ids = conn
            .prepare_cached(
                "SELECT id FROM keys WHERE state = 'PENDING_DELETION' AND deletion_date <= ?1",
            )
            .map_err(db_error)?
            .query_map([to_millis(now)], |row| row.get::<_, String>(0))
            .map_err(db_error)?
            .collect::<rusqlite::Result<Vec<_>>>()
            .map_err(db_error)?;
        ids.iter()
            .map(|id| KeyId::parse(id).map_err(|_| corrupt("key id", id)))
            .collect()
    }

    fn set_version_retired(&self, id: &KeyId, version: u32, retired: bool) -> Result<()> {
        let changed = self
            .conn()
            .execute(
                "UPDATE key_versions SET retired = ?3 WHERE key_id = ?1 AND version = ?2",
                params![id.as_str(), version, i64::from(retired)],
            )
            .map_err(db_error)?;
        if changed == 0 {
            return Err(Error::KeyNotFound(format!("{id} version {version}")));
        }
        Ok(())
    }

    fn set_version_destruction(
        &self,
        id: &KeyId,
        version: u32,
        destruction: VersionDestruction,
    ) -> Result<()> {
        let (date, destroyed) = destruction.columns();
        let changed = self
            .conn()
            .execute(
                "UPDATE key_versions SET destruction_date = ?3, destroyed_at = ?4
                 WHERE key_id = ?1 AND version = ?2",
                params![id.as_str(), version, date, destroyed],
            )
            .map_err(db_error)?;
        if changed == 0 {
            return Err(Error::KeyNotFound(format!("{id} version {version}")));
        }
        Ok(())
    }

    fn add_usage(&self, usage: &[(KeyId, u32, VersionUsage)]) -> Result<()> {
        let mut conn = self.conn();
        let tx = conn.transaction().map_err(db_error)?;
        {
            let mut stmt = tx
                .prepare_cached(
                    "INSERT INTO version_usage (key_id, version, wraps, unwraps, first_used, last_used)
                     SELECT ?1, ?2, ?3, ?4, ?5, ?6 WHERE EXISTS
                         (SELECT 1 FROM key_versions WHERE key_id = ?1 AND version = ?2)
                     ON CONFLICT (key_id, version) DO UPDATE SET
                         wraps = wraps + excluded.wraps,
                         unwraps = unwraps + excluded.unwraps,
                         first_used = min(coalesce(first_used, excluded.first_used),
                                          coalesce(excluded.first_used, first_used)),
                         last_used = max(coalesce(last_used, excluded.last_used),
                                         coalesce(excluded.last_used, last_used))",
                )
                .map_err(db_error)?;
            for (id, version, used) in usage {
                stmt.execute(params![
                    id.as_str(),
                    version,
                    i64::try_from(used.wraps).unwrap_or(i64::MAX),
                    i64::try_from(used.unwraps).unwrap_or(i64::MAX),
                    used.first_used.map(to_millis),
                    used.last_used.map(to_millis),
                ])
                .map_err(db_error)?;
            }
        }
        tx.commit().map_err(db_error)
    }

    fn usage(&self, id: &KeyId) -> Result<Vec<(u32, VersionUsage)>> {
        let conn = self.conn();
        let mut stmt = conn
            .prepare_cached(
                "SELECT version, wraps, unwraps, first_used, last_used FROM version_usage
                 WHERE key_id = ?1 ORDER BY version",
            )
            .map_err(db_error)?;
        stmt.query_map([id.as_str()], |row| {
            Ok((
                row.get::<_, u32>(0)?,
                VersionUsage {
                    wraps: row.get::<_, i64>(1)?.max(0) as u64,
                    unwraps: row.get::<_, i64>(2)?.max(0) as u64,
                    first_used: row.get::<_, Option<i64>>(3)?.map(from_millis),
                    last_used: row.get::<_, Option<i64>>(4)?.map(from_millis),
                },
            ))
        })
        .map_err(db_error)?
        .collect::<rusqlite::Result<Vec<_>>>()
        .map_err(db_error)
    }

    fn all_aliases(&self) -> Result<Vec<(AliasName, KeyId)>> {
        let conn = self.conn();
        let rows = conn
            .prepare("SELECT name, key_id FROM aliases ORDER BY name")
            .map_err(db_error)?
            .query_map([], |row| Ok((row.get(0)?, row.get(1)?)))
            .map_err(db_error)?
            .collect::<rusqlite::Result<Vec<_>>>()
            .map_err(db_error)?;
        Self::aliases_from_rows(rows)
    }

    fn create_alias(&self, alias: &AliasName, key: &KeyId) -> Result<()> {
        let mut conn = self.conn();
        let tx = conn.transaction().map_err(db_error)?;
        Self::key_exists(&tx, key)?;
        Self::insert_alias(&tx, alias, key)?;
        tx.commit().map_err(db_error)
    }

    fn update_alias(&self, alias: &AliasName, key: &KeyId) -> Result<()> {
        let mut conn = self.conn();
        let tx = conn.transaction().map_err(db_error)?;
        Self::key_exists(&tx, key)?;
        let changed = tx
            .execute(
                "UPDATE aliases SET key_id = ?2 WHERE name = ?1",
                params![alias.as_str(), key.as_str()],
            )
            .map_err(db_error)?;
        if changed == 0 {
            return Err(Error::AliasNotFound(alias.to_string()));
        }
        tx.commit().map_err(db_error)
    }

    fn delete_alias(&self, alias: &AliasName) -> Result<Option<KeyId>> {
        let conn = self.conn();
        let key: Option<String> = conn
            .query_row(
                "DELETE FROM aliases WHERE name = ?1 RETURNING key_id",
                [alias.as_str()],
                |row| row.get(0),
            )
            .optional()
            .map_err(db_error)?;
        key.map(|k| KeyId::parse(&k).map_err(|_| corrupt("key id", &k)))
            .transpose()
    }

    fn list_aliases(
        &self,
        key: Option<&KeyId>,
        after: &Cursor,
        limit: usize,
    ) -> Result<Vec<(AliasName, KeyId)>> {
        let conn = self.conn();
        let rows = conn
            .prepare_cached(
                "SELECT name, key_id FROM aliases
                 WHERE name > ?1 AND (?2 IS NULL OR key_id = ?2)
                 ORDER BY name LIMIT ?3",
            )
            .map_err(db_error)?
            .query_map(
                params![after.0, key.map(KeyId::as_str), limit as i64],
                |row| Ok((row.get(0)?, row.get(1)?)),
            )
            .map_err(db_error)?
            .collect::<rusqlite::Result<Vec<_>>>()
            .map_err(db_error)?;
        Self::aliases_from_rows(rows)
    }
}

impl HeadStore for SqliteStore {
    fn audit_head(&self, chain: &str) -> Result<Option<ChainHead>> {
        let row = self
            .conn()
            .query_row(
                "SELECT seq, hash FROM audit_heads WHERE chain = ?1",
                [chain],
                |row| Ok((row.get::<_, i64>(0)?, row.get::<_, String>(1)?)),
            )
            .optional()
            .map_err(db_error)?;
        row.map(|(seq, hash)| {
            Ok(ChainHead {
                seq: u64::try_from(seq).map_err(|_| corrupt("audit head seq", &seq.to_string()))?,
                hash,
            })
        })
        .transpose()
    }

    fn record_audit_head(&self, chain: &str, head: &ChainHead) -> Result<()> {
        let seq = i64::try_from(head.seq)
            .map_err(|_| Error::Internal("audit sequence beyond the store's range".into()))?;
        self.conn()
            .execute(
                "INSERT INTO audit_heads (chain, seq, hash) VALUES (?1, ?2, ?3)
                 ON CONFLICT(chain) DO UPDATE SET seq = excluded.seq, hash = excluded.hash
                 WHERE excluded.seq > audit_heads.seq",
                params![chain, seq, head.hash],
            )
            .map_err(db_error)?;
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    crate::metadata_store_conformance!(SqliteStore::in_memory().unwrap());

    #[test]
    fn a_schema_1_store_is_migrated_and_keeps_its_keys() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("v1.db");
        {
            let conn = Connection::open(&path).unwrap();
            conn.execute_batch(SCHEMA).unwrap();
            conn.execute_batch(
                "PRAGMA user_version = 1;
                 INSERT INTO keys (id, description, state, created_at)
                   VALUES ('key/0123456789abcdef0123456789abcdef', 'old', 'ENABLED', 1000);
                 INSERT INTO key_versions (key_id, version, created_at)
                   VALUES ('key/0123456789abcdef0123456789abcdef', 1, 1000);",
            )
            .unwrap();
        }
        let store = SqliteStore::open(&path).unwrap();
        let id = KeyId::parse("key/0123456789abcdef0123456789abcdef").unwrap();
        let key = store.key(&id).unwrap().unwrap();
        assert_eq!(key.description, "old");
        assert!(key.rotation.is_none() && key.tags.is_empty() && !key.versions[0].automatic);
        drop(store);
        // Opening again does not migrate twice.
        SqliteStore::open(&path).unwrap();
    }

    #[test]
    fn a_file_store_keeps_everything_across_reopening() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("meta.db");
        let key = KeyRecord {
            id: KeyId::generate(),
            description: "durable".into(),
            state: KeyState::Enabled,
            created_at: from_millis(to_millis(SystemTime::now())),
            deletion_date: None,
            versions: vec![VersionRecord::new(
                1,
                from_millis(to_millis(SystemTime::now())),
                false,
            )],
            aliases: vec![],
            rotation: None,
            tags: BTreeMap::new(),
            origin: KeyOrigin::Hsm,
            material: None,
            policy: None,
            grants: Default::default(),
        };
        SqliteStore::open(&path)
            .unwrap()
            .create_key(&key, None)
            .unwrap();
        assert_eq!(
            SqliteStore::open(&path).unwrap().key(&key.id).unwrap(),
            Some(key)
        );
    }
}
