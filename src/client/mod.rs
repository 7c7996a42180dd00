//! The thin client: connecting to a daemon and the generated gRPC clients.
//!
//! It depends on nothing server-side (no PKCS#11, no SQLite), so applications can link it
//! with `default-features = false, features = ["client"]`.

use std::path::{Path, PathBuf};

use hyper_util::rt::TokioIo;
use tokio::net::UnixStream;
use tonic::transport::{Channel, Endpoint, Uri};

pub use crate::proto::data_key_service_client::DataKeyServiceClient;
pub use crate::proto::key_service_client::KeyServiceClient;

/// Connection failures, with the address that failed.
#[derive(Debug, thiserror::Error)]
#[error("cannot connect to wrapd at {address}: {source}")]
pub struct ConnectError {
    address: String,
    #[source]
    source: tonic::transport::Error,
}

/// Opens a gRPC channel over the daemon's unix socket.
pub async fn connect_unix(path: impl AsRef<Path>) -> Result<Channel, ConnectError> {
    let path: PathBuf = path.as_ref().to_owned();
    let address = path.display().to_string();
    // The URI is required by the API but unused: the connector below dials the socket.
    Endpoint::from_static("http://wrapd.invalid")
        .connect_with_connector(tower::service_fn(move |_: Uri| {
            let path = path.clone();
            async move { Ok::<_, std::io::Error>(TokioIo::new(UnixStream::connect(path).await?)) }
        }))
        .await
        .map_err(|source| ConnectError { address, source })
}
