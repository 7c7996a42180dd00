//! The Prometheus recorder and `GET /metrics`'s text: what [`crate::metrics`] records, plus
//! the series rendered from the keystore at each scrape (`wrapd_keys{state}` and, with
//! `per_key_series`, `wrapd_key_wrap_share{key_id}`).

use std::sync::Arc;

use metrics_exporter_prometheus::{PrometheusBuilder, PrometheusHandle};

use crate::error::{Error, Result};
use crate::keystore::{KeyState, Keystore};

/// The installed recorder and what scrapes read besides it.
#[derive(Clone)]
pub struct Metrics {
    handle: PrometheusHandle,
    keystore: Arc<Keystore>,
    per_key_series: bool,
}

impl Metrics {
    /// Installs the process-wide Prometheus recorder; `per_key_series`: whether scrapes
    /// include `wrapd_key_wrap_share{key_id}`.
    pub fn install(keystore: Arc<Keystore>, per_key_series: bool) -> Result<Self> {
        let handle = PrometheusBuilder::new()
            .set_buckets(&[
                0.000_1, 0.000_25, 0.000_5, 0.001, 0.002_5, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25,
                0.5, 1.0, 2.5,
            ])
            .map_err(|e| Error::Internal(format!("metrics: {e}")))?
            .install_recorder()
            .map_err(|e| Error::Config(format!("metrics: {e}")))?;
        metrics::gauge!("wrapd_build_info", "version" => env!("CARGO_PKG_VERSION")).set(1.0);
        Ok(Self {
            handle,
            keystore,
            per_key_series,
        })
    }

    /// The exposition text.
    pub fn render(&self) -> String {
        let mut counts = [0u64; 4];
        for key in self.keystore.keys() {
            counts[match key.state {
                KeyState::Enabled => 0,
                KeyState::Disabled => 1,
                KeyState::PendingDeletion => 2,
                KeyState::PendingImport => 3,
            }] += 1;
        }
        for (state, count) in ["ENABLED", "DISABLED", "PENDING_DELETION", "PENDING_IMPORT"]
            .iter()
            .zip(counts)
        {
            metrics::gauge!("wrapd_keys", "state" => *state).set(count as f64);
        }
        let mut text = self.handle.render();
        if self.per_key_series {
            text.push_str(&wrap_share_series(&self.keystore));
            text.push_str(&version_usage_series(&self.keystore));
        }
        text
    }
}

/// `wrapd_key_wrap_share{key_id}` of the keys that exist now, as exposition text. Written at
/// each scrape rather than kept in the recorder, where a deleted key's series would stay
/// for the life of the process.
fn wrap_share_series(keystore: &Keystore) -> String {
    use std::fmt::Write;
    let limit = keystore.max_wraps_per_version() as f64;
    let mut text = String::new();
    for key in keystore.keys() {
        if let Some(current) = key.versions.last() {
            if text.is_empty() {
                text.push_str("# TYPE wrapd_key_wrap_share gauge\n");
            }
            let share = keystore.wrap_count(&key, current) as f64 / limit;
            let _ = writeln!(
                text,
                "wrapd_key_wrap_share{{key_id=\"{}\"}} {share}",
                key.id
            );
        }
    }
    text
}

/// `wrapd_key_version_wraps_total{key_id,version}` and `..._unwraps_total`: this daemon's
/// uses of each version since it started, as of the last usage flush (a fleet's are the sum
/// over its daemons; the store's fleet-wide totals are in DescribeKey). Only versions that
/// exist: a destroyed version's or deleted key's series ends with it.
fn version_usage_series(keystore: &Keystore) -> String {
    use std::fmt::Write;
    let usage = keystore.flushed_usage();
    if usage.is_empty() {
        return String::new();
    }
    let mut text = String::new();
    for (name, pick) in [
        ("wrapd_key_version_wraps_total", 0),
        ("wrapd_key_version_unwraps_total", 1),
    ] {
        let _ = writeln!(text, "# TYPE {name} counter");
        for (key, version, wraps, unwraps) in &usage {
            let value = if pick == 0 { wraps } else { unwraps };
            let _ = writeln!(
                text,
                "{name}{{key_id=\"{key}\",version=\"{version}\"}} {value}"
            );
        }
    }
    text
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::hsm::memory::MemoryToken;
    use crate::ids::KeyRef;
    use crate::keystore::{KeystoreConfig, ManualClock, SqliteStore};
    use std::time::Duration;

    /// A key store on a memory token, and its clock.
    fn keystore() -> (Keystore, Arc<ManualClock>) {
        let clock = Arc::new(ManualClock::new(std::time::SystemTime::now()));
        let keystore = Keystore::open(
            Arc::new(MemoryToken::default()),
            Arc::new(SqliteStore::in_memory().unwrap()),
            clock.clone(),
            KeystoreConfig::default(),
        )
        .unwrap();
        (keystore, clock)
    }

    #[test]
    fn a_deleted_keys_series_is_gone_from_the_next_scrape() {
        let (keystore, clock) = keystore();
        let kept = keystore.create_key("", None).unwrap();
        let deleted = keystore.create_key("", None).unwrap();
        let text = wrap_share_series(&keystore);
        assert!(text.contains(&deleted.id.to_string()), "{text}");
        keystore
            .schedule_deletion(&KeyRef::Id(deleted.id.clone()), 7)
            .unwrap();
        clock.advance(Duration::from_secs(8 * 24 * 3600));
        keystore.purge_due(|_| Ok(())).unwrap();
        let text = wrap_share_series(&keystore);
        assert!(text.contains(&kept.id.to_string()), "{text}");
        assert!(!text.contains(&deleted.id.to_string()), "{text}");
    }

    #[test]
    fn a_versions_usage_series_counts_its_uses_and_ends_with_the_version() {
        let (keystore, clock) = keystore();
        let key = KeyRef::Id(keystore.create_key("", None).unwrap().id.clone());
        let context = crate::context::EncryptionContext::default();
        let blob = keystore.wrap(&key, b"dek", &context).unwrap().blob;
        keystore.unwrap(&blob, &context, None).unwrap();
        keystore.unwrap(&blob, &context, None).unwrap();
        keystore.rotate_key(&key).unwrap();
        keystore.wrap(&key, b"dek", &context).unwrap();
        keystore.flush_usage().unwrap();
        let text = version_usage_series(&keystore);
        let id = keystore.resolve(&key).unwrap().id.clone();
        for line in [
            format!("wrapd_key_version_wraps_total{{key_id=\"{id}\",version=\"1\"}} 1"),
            format!("wrapd_key_version_unwraps_total{{key_id=\"{id}\",version=\"1\"}} 2"),
            format!("wrapd_key_version_wraps_total{{key_id=\"{id}\",version=\"2\"}} 1"),
        ] {
            assert!(text.contains(&line), "{line} in {text}");
        }
        keystore.retire_version(&key, 1).unwrap();
        keystore.schedule_version_destruction(&key, 1, 7).unwrap();
        clock.advance(Duration::from_secs(8 * 24 * 3600));
        keystore.destroy_due_versions(|_, _| Ok(())).unwrap();
        let text = version_usage_series(&keystore);
        assert!(!text.contains("version=\"1\""), "{text}");
        assert!(text.contains("version=\"2\""), "{text}");
    }
}
