//! What a fleet shares beyond the rows: this daemon's instance name, held by one live
//! daemon at a time; locks on connections of their own; notifications drained within
//! bounds; and the audit chain heads.

use super::*;

/// The notifications `client` has, waiting up to `timeout` for the first; true when there
/// were more than one call parses (a flood: see [`MAX_DRAIN`]).
///
/// Reading is bounded in time and count, and in memory: the client reads from its socket
/// only when what it has buffered is taken. A payload wrapd does not send, or more keys
/// than are worth refreshing one by one, is one re-read of everything.
pub(super) fn drain_notifications(
    client: &mut Client,
    timeout: Duration,
) -> Result<(StoreChanges, bool)> {
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

impl PostgresStore {
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
    pub(super) fn hold_instance(&self) -> Result<()> {
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
    pub(super) fn on_dedicated<T>(
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
