//! The data key cache (opt-in): reuse a DEK for several messages instead of asking the
//! daemon for one per message, as the AWS Encryption SDK's caching materials manager does.
//!
//! - **Limits per cached DEK**: a maximum age, a maximum number of messages and a maximum
//!   number of plaintext bytes ([`CacheLimits`]). A DEK is never used past any of them.
//! - **Partitioned by encryption context**: messages share a DEK only if their contexts are
//!   identical (the wrapped copies in the header are bound to that context anyway).
//! - **Single flight**: concurrent misses for one partition make one daemon call; the others
//!   wait for it and use its result.
//! - **Refreshed before expiry**: once a DEK has used three quarters of its age, messages or
//!   bytes, the next caller starts a background refresh and goes on with the current DEK; the
//!   fresh DEK takes over when the current one runs out, so callers do not wait on expiry as
//!   long as traffic reaches the cache during that last quarter. A failed refresh is logged
//!   and not retried for a second.
//! - **Unknown lengths bypass the cache** (a stream of unknown size could exceed the byte
//!   limit), as do messages larger than `max_bytes`.
//! - **Decryption** caches unwrapped DEKs by (encrypted data keys, context), for `max_age`.
//!
//! Cached DEKs are zeroized when evicted or dropped. The cache trades HSM round trips for
//! exposure: a DEK stays in this process's memory up to `max_age`, and one DEK protects up
//! to `max_messages` messages (each message still derives its own key from its own random
//! message id).

use std::collections::HashMap;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

use parking_lot::Mutex;
use sha2::{Digest, Sha256};
use zeroize::Zeroizing;

use super::keyring::{DataKey, Keyring};
use super::message::Header;
use crate::context::EncryptionContext;
use crate::error::{Error, Result};

/// How long and how much one cached DEK may be used.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct CacheLimits {
    /// Age after which a DEK is no longer used (counted from its generation).
    pub max_age: Duration,
    /// Messages one DEK may encrypt.
    pub max_messages: u64,
    /// Plaintext bytes one DEK may encrypt, over all its messages.
    pub max_bytes: u64,
    /// Partitions (distinct encryption contexts) kept; the least recently used goes first.
    pub capacity: usize,
}

impl CacheLimits {
    /// `max_age` with the Encryption SDK's defaults for the rest (2^32 messages, 2^63 bytes)
    /// and room for 1000 contexts.
    pub fn new(max_age: Duration) -> Self {
        Self {
            max_age,
            max_messages: 1 << 32,
            max_bytes: 1 << 63,
            capacity: 1000,
        }
    }

    fn check(&self) -> Result<()> {
        if self.max_age.is_zero() || self.max_messages == 0 || self.capacity == 0 {
            return Err(Error::invalid(
                "cache limits must be positive (max age, max messages, capacity)",
            ));
        }
        Ok(())
    }

    /// True once an entry has used three quarters of any limit.
    fn nearly_spent(&self, entry: &Entry, now: Instant) -> bool {
        let age = now.saturating_duration_since(entry.created);
        age >= self.max_age.mul_f64(0.75)
            || entry.messages.saturating_mul(4) >= self.max_messages.saturating_mul(3)
            || u128::from(entry.bytes) * 4 >= u128::from(self.max_bytes) * 3
    }
}

/// What the cache did, for tests and benchmarks.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct CacheStats {
    /// Messages served from a cached DEK.
    pub hits: u64,
    /// Daemon calls made because no usable DEK was cached.
    pub misses: u64,
    /// Background refreshes started.
    pub refreshes: u64,
    /// Messages that bypassed the cache (unknown or too large a length).
    pub bypassed: u64,
}

/// A [`Keyring`] with a data key cache in front. Cheap to clone; clones share the cache.
#[derive(Clone)]
pub struct CachingKeyring {
    shared: Arc<Shared>,
}

struct Shared {
    keyring: Keyring,
    limits: CacheLimits,
    partitions: Mutex<HashMap<Vec<u8>, Arc<Partition>>>,
    unwrapped: Mutex<HashMap<[u8; 32], Arc<Unwrapped>>>,
    hits: AtomicU64,
    misses: AtomicU64,
    refreshes: AtomicU64,
    bypassed: AtomicU64,
}

/// One cached DEK in use.
struct Entry {
    key: Arc<DataKey>,
    created: Instant,
    messages: u64,
    bytes: u64,
}

#[derive(Default)]
struct Slot {
    current: Option<Entry>,
    /// A refreshed DEK, waiting for `current` to run out.
    next: Option<Entry>,
    last_used: Option<Instant>,
    /// When a background refresh last failed: none is retried for [`REFRESH_BACKOFF`].
    refresh_failed: Option<Instant>,
}

/// How long after a failed background refresh the next one may start, so that a daemon
/// that is down is not asked again on every cache hit.
const REFRESH_BACKOFF: Duration = Duration::from_secs(1);

/// The cache of one encryption context.
struct Partition {
    slot: Mutex<Slot>,
    /// Held by whoever is asking the daemon for this partition's next DEK.
    refill: Arc<tokio::sync::Mutex<()>>,
}

/// A cached unwrapped DEK.
struct Unwrapped {
    dek: Mutex<Option<(Zeroizing<Vec<u8>>, Instant)>>,
    refill: tokio::sync::Mutex<()>,
    last_used: Mutex<Instant>,
}

enum Use {
    /// Use this DEK; `refresh` holds the refill lock if a background refresh should start.
    Hit {
        key: Arc<DataKey>,
        refresh: Option<tokio::sync::OwnedMutexGuard<()>>,
    },
    Miss,
}

impl Partition {
    /// Takes one message of `len` bytes from the current DEK if it allows it, promoting a
    /// refreshed DEK when the current one ran out.
    fn try_use(&self, limits: &CacheLimits, len: u64, now: Instant) -> Use {
        let mut slot = self.slot.lock();
        slot.last_used = Some(now);
        loop {
            let usable = |e: &Entry| {
                now.saturating_duration_since(e.created) < limits.max_age
                    && e.messages < limits.max_messages
                    && e.bytes
                        .checked_add(len)
                        .is_some_and(|b| b <= limits.max_bytes)
            };
            match slot.current.as_ref().map(usable) {
                Some(true) => {}
                // Run out (or nothing yet): the refreshed DEK takes over if there is one.
                _ => {
                    slot.current = slot.next.take();
                    if slot.current.is_none() {
                        return Use::Miss;
                    }
                    continue;
                }
            }
            let has_next = slot.next.is_some();
            let backing_off = slot
                .refresh_failed
                .is_some_and(|at| now.saturating_duration_since(at) < REFRESH_BACKOFF);
            let Some(entry) = slot.current.as_mut() else {
                return Use::Miss;
            };
            entry.messages += 1;
            entry.bytes += len;
            let key = Arc::clone(&entry.key);
            // Start a refresh only if none is running (the refill lock is free) and none
            // is waiting.
            let refresh = if !has_next && !backing_off && limits.nearly_spent(entry, now) {
                Arc::clone(&self.refill).try_lock_owned().ok()
            } else {
                None
            };
            return Use::Hit { key, refresh };
        }
    }

    fn install(&self, key: Arc<DataKey>, created: Instant, used: Option<u64>) {
        let entry = Entry {
            key,
            created,
            messages: u64::from(used.is_some()),
            bytes: used.unwrap_or(0),
        };
        let mut slot = self.slot.lock();
        if used.is_some() || slot.current.is_none() {
            slot.current = Some(entry);
        } else {
            slot.next = Some(entry);
        }
    }
}

impl CachingKeyring {
    /// A cache in front of `keyring`.
    pub fn new(keyring: Keyring, limits: CacheLimits) -> Result<Self> {
        limits.check()?;
        Ok(Self {
            shared: Arc::new(Shared {
                keyring,
                limits,
                partitions: Mutex::new(HashMap::new()),
                unwrapped: Mutex::new(HashMap::new()),
                hits: AtomicU64::new(0),
                misses: AtomicU64::new(0),
                refreshes: AtomicU64::new(0),
                bypassed: AtomicU64::new(0),
            }),
        })
    }

    /// The keyring behind the cache.
    pub fn keyring(&self) -> &Keyring {
        &self.shared.keyring
    }

    /// Counters since creation.
    pub fn stats(&self) -> CacheStats {
        let s = &self.shared;
        CacheStats {
            hits: s.hits.load(Ordering::Relaxed),
            misses: s.misses.load(Ordering::Relaxed),
            refreshes: s.refreshes.load(Ordering::Relaxed),
            bypassed: s.bypassed.load(Ordering::Relaxed),
        }
    }

    /// A data key for one message of `plaintext_len` bytes under `context`: a cached one
    /// within its limits, else a fresh one from the daemon (which is then cached).
    /// `None` (length unknown) bypasses the cache.
    pub async fn data_key(
        &self,
        context: &EncryptionContext,
        plaintext_len: Option<u64>,
    ) -> Result<Arc<DataKey>> {
        let s = &self.shared;
        let len = match plaintext_len {
            Some(len) if len <= s.limits.max_bytes => len,
            _ => {
                s.bypassed.fetch_add(1, Ordering::Relaxed);
                return Ok(Arc::new(s.keyring.generate(context).await?));
            }
        };
        let partition = self.partition(context);
        match partition.try_use(&s.limits, len, Instant::now()) {
            Use::Hit { key, refresh } => {
                s.hits.fetch_add(1, Ordering::Relaxed);
                if let Some(guard) = refresh {
                    self.refresh_in_background(context.clone(), partition, guard);
                }
                return Ok(key);
            }
            Use::Miss => {}
        }
        // Single flight: whoever holds the refill lock is fetching; wait for it, then look
        // again before calling the daemon ourselves.
        let _refill = partition.refill.lock().await;
        if let Use::Hit { key, .. } = partition.try_use(&s.limits, len, Instant::now()) {
            s.hits.fetch_add(1, Ordering::Relaxed);
            return Ok(key);
        }
        s.misses.fetch_add(1, Ordering::Relaxed);
        let created = Instant::now();
        let key = Arc::new(s.keyring.generate(context).await?);
        partition.install(Arc::clone(&key), created, Some(len));
        Ok(key)
    }

    fn refresh_in_background(
        &self,
        context: EncryptionContext,
        partition: Arc<Partition>,
        guard: tokio::sync::OwnedMutexGuard<()>,
    ) {
        let shared = Arc::clone(&self.shared);
        shared.refreshes.fetch_add(1, Ordering::Relaxed);
        tokio::spawn(async move {
            let _refill = guard;
            let created = Instant::now();
            match shared.keyring.generate(&context).await {
                Ok(key) => partition.install(Arc::new(key), created, None),
                // The current DEK stays in use until it runs out; the next caller after
                // that asks the daemon itself and gets the error if it persists.
                Err(e) => {
                    partition.slot.lock().refresh_failed = Some(Instant::now());
                    tracing::warn!(error = %e, "data key cache refresh failed");
                }
            }
        });
    }

    fn partition(&self, context: &EncryptionContext) -> Arc<Partition> {
        let s = &self.shared;
        let id = context.serialize();
        let mut partitions = s.partitions.lock();
        if let Some(p) = partitions.get(&id) {
            return Arc::clone(p);
        }
        if partitions.len() >= s.limits.capacity {
            let oldest = partitions
                .iter()
                .min_by_key(|(_, p)| p.slot.lock().last_used)
                .map(|(k, _)| k.clone());
            if let Some(oldest) = oldest {
                partitions.remove(&oldest);
            }
        }
        let p = Arc::new(Partition {
            slot: Mutex::new(Slot::default()),
            refill: Arc::new(tokio::sync::Mutex::new(())),
        });
        partitions.insert(id, Arc::clone(&p));
        p
    }

    /// The DEK of a message: cached if the same encrypted data keys under the same context
    /// were unwrapped within `max_age`, else from the daemon (concurrent misses for one
    /// message's keys make one call).
    pub async fn unwrap(&self, header: &Header) -> Result<Zeroizing<Vec<u8>>> {
        let s = &self.shared;
        let id = unwrap_id(header);
        let entry = {
            let mut map = s.unwrapped.lock();
            if !map.contains_key(&id) && map.len() >= s.limits.capacity {
                let oldest = map
                    .iter()
                    .min_by_key(|(_, u)| *u.last_used.lock())
                    .map(|(k, _)| *k);
                if let Some(oldest) = oldest {
                    map.remove(&oldest);
                }
            }
            Arc::clone(map.entry(id).or_insert_with(|| {
                Arc::new(Unwrapped {
                    dek: Mutex::new(None),
                    refill: tokio::sync::Mutex::new(()),
                    last_used: Mutex::new(Instant::now()),
                })
            }))
        };
        let cached = |entry: &Unwrapped| {
            let now = Instant::now();
            *entry.last_used.lock() = now;
            entry
                .dek
                .lock()
                .as_ref()
                .filter(|(_, at)| now.saturating_duration_since(*at) < s.limits.max_age)
                .map(|(dek, _)| Zeroizing::new(dek.to_vec()))
        };
        if let Some(dek) = cached(&entry) {
            s.hits.fetch_add(1, Ordering::Relaxed);
            return Ok(dek);
        }
        let _refill = entry.refill.lock().await;
        if let Some(dek) = cached(&entry) {
            s.hits.fetch_add(1, Ordering::Relaxed);
            return Ok(dek);
        }
        s.misses.fetch_add(1, Ordering::Relaxed);
        let at = Instant::now();
        let dek = s.keyring.unwrap(header).await?;
        *entry.dek.lock() = Some((Zeroizing::new(dek.to_vec()), at));
        Ok(dek)
    }
}

/// What identifies a message's DEK for the decryption cache: its encrypted data keys and
/// the context they are bound to (length-prefixed, hashed).
fn unwrap_id(header: &Header) -> [u8; 32] {
    let mut h = Sha256::new();
    let mut part = |bytes: &[u8]| {
        h.update((bytes.len() as u64).to_be_bytes());
        h.update(bytes);
    };
    part(&header.context.serialize());
    for key in &header.data_keys {
        part(key.provider_id.as_bytes());
        part(&key.provider_info);
        part(&key.ciphertext);
    }
    h.finalize().into()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn key(n: u8) -> Arc<DataKey> {
        Arc::new(DataKey {
            dek: Zeroizing::new(vec![n; 32]),
            data_keys: Vec::new(),
        })
    }

    fn partition() -> Partition {
        Partition {
            slot: Mutex::new(Slot::default()),
            refill: Arc::new(tokio::sync::Mutex::new(())),
        }
    }

    fn hit(u: Use) -> (u8, bool) {
        match u {
            Use::Hit { key, refresh } => (key.dek[0], refresh.is_some()),
            Use::Miss => panic!("expected a hit"),
        }
    }

    #[test]
    fn limits_are_never_exceeded_and_refresh_starts_in_the_last_quarter() {
        let limits = CacheLimits {
            max_messages: 4,
            max_bytes: 100,
            ..CacheLimits::new(Duration::from_secs(60))
        };
        let now = Instant::now();
        let p = partition();
        assert!(matches!(p.try_use(&limits, 10, now), Use::Miss));
        p.install(key(1), now, Some(10));
        assert_eq!(hit(p.try_use(&limits, 10, now)), (1, false)); // 2 messages
        // The third of four messages is three quarters: a refresh starts, holding the lock.
        let Use::Hit { refresh, .. } = p.try_use(&limits, 10, now) else {
            panic!()
        };
        let guard = refresh.expect("a refresh");
        // While it runs, nobody else starts one.
        assert_eq!(hit(p.try_use(&limits, 10, now)), (1, false)); // 4 messages: spent
        assert!(matches!(p.try_use(&limits, 10, now), Use::Miss));
        p.install(key(2), now, None);
        drop(guard);
        // The refreshed key takes over; the byte limit is per key.
        assert_eq!(hit(p.try_use(&limits, 60, now)), (2, false));
        assert_eq!(hit(p.try_use(&limits, 20, now)), (2, true)); // 80 bytes ≥ 75
        assert!(matches!(p.try_use(&limits, 21, now), Use::Miss)); // would be 101
        // Age: unusable at max_age.
        let p = partition();
        p.install(key(3), now, Some(1));
        assert!(matches!(
            p.try_use(&limits, 1, now + Duration::from_secs(60)),
            Use::Miss
        ));
    }

    #[test]
    fn no_refresh_right_after_a_failed_one() {
        let limits = CacheLimits::new(Duration::from_secs(60));
        let now = Instant::now();
        let p = partition();
        // Nearly expired: every hit would start a refresh...
        p.install(key(1), now, Some(1));
        let late = now + Duration::from_secs(50);
        p.slot.lock().refresh_failed = Some(late);
        // ...but not within a second of a failure.
        assert_eq!(hit(p.try_use(&limits, 1, late)), (1, false));
        assert_eq!(
            hit(p.try_use(&limits, 1, late + REFRESH_BACKOFF)),
            (1, true)
        );
    }

    #[test]
    fn zero_limits_are_refused() {
        assert!(CacheLimits::new(Duration::ZERO).check().is_err());
        let limits = CacheLimits {
            max_messages: 0,
            ..CacheLimits::new(Duration::from_secs(1))
        };
        assert!(limits.check().is_err());
    }
}
