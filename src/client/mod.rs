//! The thin client: connecting to a daemon, the generated gRPC clients, the AWS Encryption
//! SDK message format (`message/`), keyrings of wrapd keys (`keyring.rs`) and the opt-in
//! data key cache in front of them (`cache.rs`), the S3 Encryption Client's object format
//! (`s3ec.rs`, feature `s3ec`, part of `s3`) and S3 transfers in it (`s3/`, feature `s3`),
//! the client's error (`error.rs`), output files that appear only when complete
//! (`output.rs`), re-wrapping stored data keys after a rotation (`rewrap.rs`) and the census
//! of which key versions protect stored data (`census.rs`).
//!
//! It depends on nothing server-side (no PKCS#11, no SQLite), so applications can link it
//! with `default-features = false, features = ["client"]`.

use std::path::{Path, PathBuf};

pub mod cache;
pub mod census;
mod error;
pub mod keyring;
pub mod message;
pub mod output;
pub mod rewrap;
#[cfg(feature = "s3")]
pub mod s3;
#[cfg(feature = "s3ec")]
pub mod s3ec;

use hyper_util::rt::TokioIo;
use tokio::net::UnixStream;
use tonic::transport::{Certificate, Channel, ClientTlsConfig, Endpoint, Identity, Uri};
use zeroize::Zeroizing;

pub use crate::proto::data_key_service_client::DataKeyServiceClient;
pub use crate::proto::key_service_client::KeyServiceClient;
pub use error::{ClientError, Failure};
pub use output::Output;

/// Connection failures, with the address that failed.
#[derive(Debug, thiserror::Error)]
#[error("cannot connect to wrapd at {address}: {reason}")]
pub struct ConnectError {
    address: String,
    reason: String,
}

impl ConnectError {
    fn new(address: impl Into<String>, reason: impl std::fmt::Display) -> Self {
        // tonic's transport errors hide their cause in `source()`; keep the whole chain.
        Self {
            address: address.into(),
            reason: reason.to_string(),
        }
    }
}

fn chain(err: &dyn std::error::Error) -> String {
    let mut text = err.to_string();
    let mut source = err.source();
    while let Some(cause) = source {
        text.push_str(": ");
        text.push_str(&cause.to_string());
        source = cause.source();
    }
    text
}

/// Files for a mutual-TLS connection (PEM).
#[derive(Debug, Clone)]
pub struct TlsFiles {
    /// CA certificate(s) the server's certificate must chain to.
    pub ca: PathBuf,
    /// Our client certificate.
    pub cert: PathBuf,
    /// Its private key.
    pub key: PathBuf,
}

/// Opens a gRPC channel to `https://host:port` with mutual TLS.
pub async fn connect_tls(endpoint: &str, files: &TlsFiles) -> Result<Channel, ConnectError> {
    // tonic would speak plaintext to an http:// endpoint, TLS files notwithstanding: only
    // https:// is a mutual-TLS endpoint.
    if !endpoint
        .get(..8)
        .is_some_and(|scheme| scheme.eq_ignore_ascii_case("https://"))
    {
        return Err(ConnectError::new(
            endpoint,
            "a mutual-TLS endpoint must be an https:// URL".to_owned(),
        ));
    }
    let read = |path: &PathBuf| {
        std::fs::read(path).map(Zeroizing::new).map_err(|e| {
            ConnectError::new(endpoint, format!("cannot read {}: {e}", path.display()))
        })
    };
    let ca = read(&files.ca)?;
    let cert = read(&files.cert)?;
    let key = read(&files.key)?;
    let tls = ClientTlsConfig::new()
        .ca_certificate(Certificate::from_pem(&*ca))
        .identity(Identity::from_pem(&*cert, &*key));
    Endpoint::from_shared(endpoint.to_owned())
        .map_err(|e| ConnectError::new(endpoint, chain(&e)))?
        .tls_config(tls)
        .map_err(|e| ConnectError::new(endpoint, chain(&e)))?
        .connect()
        .await
        .map_err(|e| ConnectError::new(endpoint, chain(&e)))
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
        .map_err(|e| ConnectError::new(address, chain(&e)))
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A mutual-TLS connection never falls back to plaintext.
    #[tokio::test]
    async fn connect_tls_refuses_a_plaintext_endpoint() {
        let files = TlsFiles {
            ca: "/nonexistent/ca.pem".into(),
            cert: "/nonexistent/client.pem".into(),
            key: "/nonexistent/client.key".into(),
        };
        for endpoint in ["http://127.0.0.1:1", "127.0.0.1:1", "unix:/x"] {
            let err = connect_tls(endpoint, &files).await.unwrap_err();
            assert!(err.to_string().contains("https://"), "{endpoint}: {err}");
        }
    }
}
