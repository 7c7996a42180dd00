//! The gRPC services of `wrapd.v1` and the KMS v2 plugin: each handler takes the request
//! apart, hands [`Gate::run`] one job (validation, policy checks, the [`Keystore`] call),
//! which runs with its audit line off the async executor, and maps the result to a message.
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
use std::time::{Duration, Instant};

pub use data_key::DataKeyApi;
pub use gate::{Call, Gate, code_name};
pub use key::{KeyApi, key_metadata};
pub use kms::KmsApi;

use crate::auth::Target;
use crate::blob::Blob;
use crate::context::EncryptionContext;
use crate::error::{Error, Result};
use crate::ids::KeyRef;
use crate::keystore::Keystore;

/// Encryption-context keys with this prefix are reserved for wrapd's own bindings (the
/// KMS plugin binds its blobs with one), so that no caller of the main API can produce or
/// open a blob bound that way (security review finding 8).
pub const RESERVED_CONTEXT_PREFIX: &str = "wrapd:";

/// A caller's encryption context: valid, and without reserved keys.
fn caller_context(entries: HashMap<String, String>) -> Result<EncryptionContext> {
    if let Some(key) = entries
        .keys()
        .find(|k| k.starts_with(RESERVED_CONTEXT_PREFIX))
    {
        return Err(Error::invalid(format!(
            "encryption context key {key:?}: keys starting with {RESERVED_CONTEXT_PREFIX:?} are reserved"
        )));
    }
    EncryptionContext::new(entries)
}

fn optional_key_ref(s: &str) -> Result<Option<KeyRef>> {
    if s.is_empty() {
        Ok(None)
    } else {
        KeyRef::parse(s).map(Some)
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
