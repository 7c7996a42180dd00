//! The [`MetadataStore`] operations on PostgreSQL.

use super::*;

impl MetadataStore for PostgresStore {
    fn create_key(&self, key: &KeyRecord, alias: Option<&AliasName>) -> Result<()> {
        self.tx(|tx| {
            tx.execute(
                "INSERT INTO keys (id, description, state, created_at, deletion_date, policy)
                 VALUES ($1, $2, $3, $4, $5, $6)",
                &[
                    &key.id.as_str(),
                    &key.description,
                    &key.state.as_str(),
                    &to_millis(key.created_at),
                    &key.deletion_date.map(to_millis),
                    &key.policy,
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

    fn set_description(&self, id: &KeyId, description: &str) -> Result<()> {
        self.tx(|tx| {
            let changed = tx
                .execute(
                    "UPDATE keys SET description = $2 WHERE id = $1",
                    &[&id.as_str(), &description],
                )
                .map_err(pg_error)?;
            if changed == 0 {
                return Err(Error::KeyNotFound(id.to_string()));
            }
            notify_key(tx, id)
        })
    }

    fn add_grant(&self, id: &KeyId, grant: &Grant) -> Result<Grant> {
        self.tx(|tx| {
            // The key's row lock orders concurrent grants of one key: the same named grant
            // made by two daemons at once is made once.
            Self::key_exists(tx, id)?;
            let grants = Self::load_grants(tx, id.as_str())?;
            if let Some(kept) = grant_to_add(id, &grants, grant)? {
                return Ok(kept);
            }
            let row = GrantRow::of(grant);
            tx.execute(
                "INSERT INTO key_grants (key_id, grant_id, name, grantee, retiring, operations,
                        constraint_equals, constraint_subset, issuer, created_at)
                 VALUES ($1, $2, $3, $4, $5, $6, $7, $8, $9, $10)",
                &[
                    &id.as_str(),
                    &row.grant_id,
                    &row.name,
                    &row.grantee,
                    &row.retiring,
                    &row.operations,
                    &row.equals,
                    &row.subset,
                    &row.issuer,
                    &row.created_at,
                ],
            )
            .map_err(pg_error)?;
            notify_key(tx, id)?;
            Ok(grant.clone())
        })
    }

    fn remove_grant(&self, id: &KeyId, grant_id: &str) -> Result<bool> {
        self.tx(|tx| {
            let removed = tx
                .execute(
                    "DELETE FROM key_grants WHERE key_id = $1 AND grant_id = $2",
                    &[&id.as_str(), &grant_id],
                )
                .map_err(pg_error)?;
            if removed > 0 {
                notify_key(tx, id)?;
            }
            Ok(removed > 0)
        })
    }

    fn set_policy(&self, id: &KeyId, policy: &str) -> Result<()> {
        self.tx(|tx| {
            let changed = tx
                .execute(
                    "UPDATE keys SET policy = $2 WHERE id = $1",
                    &[&id.as_str(), &policy],
                )
                .map_err(pg_error)?;
            if changed == 0 {
                return Err(Error::KeyNotFound(id.to_string()));
            }
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

    fn set_version_retired(&self, id: &KeyId, version: u32, retired: bool) -> Result<()> {
        self.tx(|tx| {
            let changed = tx
                .execute(
                    "UPDATE key_versions SET retired = $3 WHERE key_id = $1 AND version = $2",
                    &[&id.as_str(), &version_i32(version)?, &retired],
                )
                .map_err(pg_error)?;
            if changed == 0 {
                return Err(Error::KeyNotFound(format!("{id} version {version}")));
            }
            notify_key(tx, id)
        })
    }

    fn set_version_destruction(
        &self,
        id: &KeyId,
        version: u32,
        destruction: VersionDestruction,
    ) -> Result<()> {
        let (date, destroyed) = destruction.columns();
        self.tx(|tx| {
            let changed = tx
                .execute(
                    "UPDATE key_versions SET destruction_date = $3, destroyed_at = $4
                     WHERE key_id = $1 AND version = $2",
                    &[&id.as_str(), &version_i32(version)?, &date, &destroyed],
                )
                .map_err(pg_error)?;
            if changed == 0 {
                return Err(Error::KeyNotFound(format!("{id} version {version}")));
            }
            notify_key(tx, id)
        })
    }

    fn add_usage(&self, usage: &[(KeyId, u32, VersionUsage)]) -> Result<()> {
        self.tx(|tx| {
            let stmt = tx
                .prepare(
                    "INSERT INTO version_usage (key_id, version, wraps, unwraps, first_used, last_used)
                     SELECT $1, $2, $3, $4, $5, $6 WHERE EXISTS
                         (SELECT 1 FROM key_versions WHERE key_id = $1 AND version = $2)
                     ON CONFLICT (key_id, version) DO UPDATE SET
                         wraps = version_usage.wraps + EXCLUDED.wraps,
                         unwraps = version_usage.unwraps + EXCLUDED.unwraps,
                         first_used = LEAST(version_usage.first_used, EXCLUDED.first_used),
                         last_used = GREATEST(version_usage.last_used, EXCLUDED.last_used)",
                )
                .map_err(pg_error)?;
            for (id, version, used) in usage {
                tx.execute(
                    &stmt,
                    &[
                        &id.as_str(),
                        &version_i32(*version)?,
                        &i64::try_from(used.wraps).unwrap_or(i64::MAX),
                        &i64::try_from(used.unwraps).unwrap_or(i64::MAX),
                        &used.first_used.map(to_millis),
                        &used.last_used.map(to_millis),
                    ],
                )
                .map_err(pg_error)?;
            }
            Ok(())
        })
    }

    fn usage(&self, id: &KeyId) -> Result<Vec<(u32, VersionUsage)>> {
        self.with(|client| {
            Ok(client
                .query(
                    "SELECT version, wraps, unwraps, first_used, last_used FROM version_usage
                     WHERE key_id = $1 ORDER BY version",
                    &[&id.as_str()],
                )
                .map_err(pg_error)?
                .iter()
                .map(|r| {
                    (
                        r.get::<_, i32>(0).max(0) as u32,
                        VersionUsage {
                            wraps: r.get::<_, i64>(1).max(0) as u64,
                            unwraps: r.get::<_, i64>(2).max(0) as u64,
                            first_used: r.get::<_, Option<i64>>(3).map(from_millis),
                            last_used: r.get::<_, Option<i64>>(4).map(from_millis),
                        },
                    )
                })
                .collect())
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
