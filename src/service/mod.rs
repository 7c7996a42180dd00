//! The gRPC services of `wrapd.v1`: identity and policy checks, request validation, the
//! call into the [`Keystore`] off the async executor, the audit line, and the mapping of
//! results to messages.
//!
//! `data_key.rs` is the data plane (`DataKeyService`), `key.rs` the control plane
//! (`KeyService`), `kms.rs` the Kubernetes KMS v2 plugin (`v2.KeyManagementService`),
//! `gate.rs` the identity/policy/audit gate they all pass through. Errors become
//! `tonic::Status` through the one mapping in [`crate::error`].

mod data_key;
mod gate;
mod key;
mod kms;

use std::collections::HashMap;
use std::sync::Arc;
use std::time::{Duration, Instant};

use tonic::Status;

pub use data_key::DataKeyApi;
pub use gate::{Call, Gate, code_name};
pub use key::{KeyApi, key_metadata};
pub use kms::KmsApi;

use crate::auth::Target;
use crate::blob::Blob;
use crate::context::EncryptionContext;
use crate::error::{Error, Result};
use crate::hsm::with_deadline;
use crate::ids::KeyRef;
use crate::keystore::Keystore;

/// Runs a blocking key store call on tokio's blocking pool, with the caller's deadline in
/// force for HSM session waits. A panic in it becomes INTERNAL for this request instead of
/// taking the daemon down.
async fn blocking<T: Send + 'static>(
    keystore: &Arc<Keystore>,
    deadline: Option<Instant>,
    f: impl FnOnce(&Keystore) -> Result<T> + Send + 'static,
) -> Result<T, Status> {
    let keystore = keystore.clone();
    match tokio::task::spawn_blocking(move || with_deadline(deadline, || f(&keystore))).await {
        Ok(result) => result.map_err(Status::from),
        Err(join) => Err(Status::from(Error::Internal(format!(
            "key store task failed: {join}"
        )))),
    }
}

fn context(entries: HashMap<String, String>) -> Result<EncryptionContext, Status> {
    EncryptionContext::new(entries).map_err(Status::from)
}

fn key_ref(s: &str) -> Result<KeyRef, Status> {
    KeyRef::parse(s).map_err(Status::from)
}

fn optional_key_ref(s: &str) -> Result<Option<KeyRef>, Status> {
    if s.is_empty() {
        Ok(None)
    } else {
        key_ref(s).map(Some)
    }
}

/// The policy target of a key reference: all the key's names when it exists, else the name
/// as requested (so a denial looks the same either way).
fn target_of(keystore: &Keystore, key: &KeyRef) -> Target {
    match keystore.resolve(key) {
        Ok(record) => Target::Key(
            std::iter::once(record.id.to_string())
                .chain(record.aliases.iter().map(ToString::to_string))
                .collect(),
        ),
        Err(_) => Target::Key(vec![key.to_string()]),
    }
}

/// The caller's deadline from its `grpc-timeout` header (`<1..8 digits><H|M|S|m|u|n>`).
fn deadline_of<T>(request: &tonic::Request<T>) -> Option<Instant> {
    let value = request.metadata().get("grpc-timeout")?.to_str().ok()?;
    let (digits, unit) = value.split_at(value.len().checked_sub(1)?);
    if digits.is_empty() || digits.len() > 8 {
        return None;
    }
    let n: u64 = digits.parse().ok()?;
    let timeout = match unit {
        "H" => Duration::from_secs(n.checked_mul(3600)?),
        "M" => Duration::from_secs(n.checked_mul(60)?),
        "S" => Duration::from_secs(n),
        "m" => Duration::from_millis(n),
        "u" => Duration::from_micros(n),
        "n" => Duration::from_nanos(n),
        _ => return None,
    };
    Instant::now().checked_add(timeout)
}

/// The key a blob names, if the blob parses.
fn blob_key(blob: &[u8]) -> Option<KeyRef> {
    Blob::parse(blob).ok().map(|b| KeyRef::Id(b.key_id))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn with_timeout(value: &str) -> Option<Duration> {
        let mut request = tonic::Request::new(());
        request
            .metadata_mut()
            .insert("grpc-timeout", value.parse().unwrap());
        deadline_of(&request).map(|d| d.saturating_duration_since(Instant::now()))
    }

    #[test]
    fn grpc_timeouts_parse() {
        assert!(with_timeout("100m").unwrap() <= Duration::from_millis(100));
        assert!(with_timeout("2S").unwrap() > Duration::from_millis(1500));
        assert!(with_timeout("1H").unwrap() > Duration::from_secs(3500));
        for bad in ["", "m", "123456789S", "10x", "-1S", "1.5S"] {
            assert!(with_timeout(bad).is_none(), "{bad}");
        }
    }
}
