//! The gRPC services of `wrapd.v1`: request validation, the call into the [`Keystore`] off
//! the async executor, and the mapping of results to messages.
//!
//! `data_key.rs` is the data plane (`DataKeyService`), `key.rs` the control plane
//! (`KeyService`). Errors become `tonic::Status` through the one mapping in
//! [`crate::error`].

mod data_key;
mod key;

use std::collections::HashMap;
use std::sync::Arc;

use tonic::Status;

pub use data_key::DataKeyApi;
pub use key::KeyApi;

use crate::context::EncryptionContext;
use crate::error::{Error, Result};
use crate::ids::KeyRef;
use crate::keystore::Keystore;

/// Runs a blocking key store call on tokio's blocking pool. A panic in it becomes INTERNAL
/// for this request instead of taking the daemon down.
async fn blocking<T: Send + 'static>(
    keystore: &Arc<Keystore>,
    f: impl FnOnce(&Keystore) -> Result<T> + Send + 'static,
) -> Result<T, Status> {
    let keystore = keystore.clone();
    match tokio::task::spawn_blocking(move || f(&keystore)).await {
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

/// Who called, for the log: the unix peer's uid/pid when known.
fn peer<T>(request: &tonic::Request<T>) -> String {
    #[cfg(unix)]
    if let Some(info) = request
        .extensions()
        .get::<tonic::transport::server::UdsConnectInfo>()
    {
        if let Some(cred) = info.peer_cred {
            return format!(
                "unix:uid={} pid={}",
                cred.uid(),
                cred.pid().map_or_else(|| "?".to_owned(), |p| p.to_string())
            );
        }
    }
    request
        .remote_addr()
        .map_or_else(|| "unknown".to_owned(), |a| a.to_string())
}
