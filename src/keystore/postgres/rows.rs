//! Reading and writing a key's rows (the key, its versions, rotation, material, tags and
//! aliases) inside a transaction, and the notifications that tell the fleet of a change.

use super::*;

pub(super) fn version_i32(version: u32) -> Result<i32> {
    i32::try_from(version).map_err(|_| Error::invalid("version out of range"))
}

pub(super) fn is_unique_violation(err: &postgres::Error) -> bool {
    err.code() == Some(&SqlState::UNIQUE_VIOLATION)
}

pub(super) fn notify_key(tx: &mut Transaction<'_>, id: &KeyId) -> Result<()> {
    tx.execute("SELECT pg_notify($1, $2)", &[&CHANNEL, &format!("k:{id}")])
        .map_err(pg_error)?;
    Ok(())
}

pub(super) fn notify_aliases(tx: &mut Transaction<'_>) -> Result<()> {
    tx.execute("SELECT pg_notify($1, 'a')", &[&CHANNEL])
        .map_err(pg_error)?;
    Ok(())
}

impl PostgresStore {
    pub(super) fn load_key(
        client: &mut impl postgres::GenericClient,
        id: &str,
    ) -> Result<Option<KeyRecord>> {
        let Some(row) = client
            .query_opt(
                "SELECT description, state, created_at, deletion_date, rotation_period_days,
                        next_rotation, origin, material_check, material_present,
                        material_valid_to, policy
                 FROM keys WHERE id = $1",
                &[&id],
            )
            .map_err(pg_error)?
        else {
            return Ok(None);
        };
        let versions = client
            .query(
                "SELECT version, created_at, wraps_reserved, automatic, retired, destruction_date,
                        destroyed_at
                 FROM key_versions WHERE key_id = $1 ORDER BY version",
                &[&id],
            )
            .map_err(pg_error)?
            .iter()
            .map(|r| VersionRecord {
                version: r.get::<_, i32>(0).max(0) as u32,
                created_at: from_millis(r.get(1)),
                wraps_reserved: r.get::<_, i64>(2).max(0) as u64,
                automatic: r.get(3),
                retired: r.get(4),
                destruction_date: r.get::<_, Option<i64>>(5).map(from_millis),
                destroyed_at: r.get::<_, Option<i64>>(6).map(from_millis),
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
                    check_value: crate::keystore::metadata::decode_check_value(&check)
                        .ok_or_else(|| corrupt("key check value", &check))?,
                    present: row.get(8),
                    valid_to: row.get::<_, Option<i64>>(9).map(from_millis),
                })
            })
            .transpose()?;
        let grants = Self::load_grants(client, id)?;
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
            policy: row.get(10),
            grants: grants.into(),
        }))
    }

    pub(super) fn load_grants(
        client: &mut impl postgres::GenericClient,
        id: &str,
    ) -> Result<Vec<Grant>> {
        client
            .query(
                "SELECT grant_id, name, grantee, retiring, operations, constraint_equals,
                        constraint_subset, issuer, created_at
                 FROM key_grants WHERE key_id = $1 ORDER BY created_at, grant_id",
                &[&id],
            )
            .map_err(pg_error)?
            .iter()
            .map(|r| {
                GrantRow {
                    grant_id: r.get(0),
                    name: r.get(1),
                    grantee: r.get(2),
                    retiring: r.get(3),
                    operations: r.get(4),
                    equals: r.get(5),
                    subset: r.get(6),
                    issuer: r.get(7),
                    created_at: r.get(8),
                }
                .into_grant()
            })
            .collect()
    }

    pub(super) fn key_exists(tx: &mut Transaction<'_>, id: &KeyId) -> Result<()> {
        tx.query_opt(
            "SELECT 1 FROM keys WHERE id = $1 FOR UPDATE",
            &[&id.as_str()],
        )
        .map_err(pg_error)?
        .map(|_| ())
        .ok_or_else(|| Error::KeyNotFound(id.to_string()))
    }

    pub(super) fn write_rotation(
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

    pub(super) fn write_material(
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

    pub(super) fn write_tags(
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

    pub(super) fn insert_alias(
        tx: &mut Transaction<'_>,
        alias: &AliasName,
        key: &KeyId,
    ) -> Result<()> {
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

    pub(super) fn aliases_from_rows(rows: Vec<Row>) -> Result<Vec<(AliasName, KeyId)>> {
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
}
