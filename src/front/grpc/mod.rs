//! The gRPC front end: the `wrapd.v1` services and the Kubernetes KMS v2 plugin.
//!
//! `data_key.rs` is `DataKeyService`, `key.rs` `KeyService` (`grants.rs` the wire forms of
//! its grant calls), `kms_plugin.rs`
//! `v2.KeyManagementService`. Here: the call record of a request (identity from the
//! connection, `x-request-id`, `grpc-timeout`) and the one mapping of errors to
//! `tonic::Status` (docs/DESIGN.md §4).

mod data_key;
mod grants;
mod key;
mod kms_plugin;

use std::time::{Duration, Instant};

use tonic::transport::server::{TcpConnectInfo, TlsConnectInfo};
use tonic::{Code, Request, Status};

pub use data_key::DataKeyApi;
pub use key::{KeyApi, key_metadata};
pub use kms_plugin::KmsApi;

use crate::auth::{Connection, Operation, Refusal, UnixPeer, authenticate};
use crate::error::{Error, ErrorKind};
use crate::ops::Call;

/// The gRPC code of an error kind (docs/DESIGN.md §4; the table is [`ErrorKind::status`]).
pub fn code_of(kind: ErrorKind) -> Code {
    Code::from_i32(kind.status().0)
}

/// The status a caller gets for an error: its code, and a message that never carries an
/// internal detail (those are in the daemon log, written once by the operation layer).
pub fn status(err: Error) -> Status {
    Status::new(code_of(err.kind()), err.public_message())
}

/// The unix peer of a request that came in on a unix socket.
pub fn unix_peer<T>(request: &Request<T>) -> Option<&UnixPeer> {
    request
        .extensions()
        .get::<Option<UnixPeer>>()
        .and_then(Option::as_ref)
}

/// The call record of a request: who (its connection record, through the authenticator),
/// its request id and deadline.
pub fn call_of<T>(request: &Request<T>, op: Operation) -> Call {
    let identity = match request.extensions().get::<Option<UnixPeer>>() {
        Some(peer) => authenticate(Connection::Unix(peer.as_ref())),
        None => {
            let tls = request.extensions().get::<TlsConnectInfo<TcpConnectInfo>>();
            let certs = tls.and_then(TlsConnectInfo::peer_certs);
            authenticate(Connection::Tls {
                leaf: certs.as_ref().and_then(|c| c.first()).map(|c| c.as_ref()),
                remote: tls.and_then(|info| info.get_ref().remote_addr()),
            })
        }
    };
    Call::new(
        identity.map_err(|e| Refusal::from(e.to_string())),
        op,
        request_id(request),
        deadline_of(request),
    )
}

/// The caller's `x-request-id`.
fn request_id<T>(request: &Request<T>) -> Option<&str> {
    request
        .metadata()
        .get("x-request-id")
        .and_then(|v| v.to_str().ok())
}

/// The caller's deadline from its `grpc-timeout` header (`<1..8 digits><H|M|S|m|u|n>`).
fn deadline_of<T>(request: &Request<T>) -> Option<Instant> {
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

    /// docs/DESIGN.md §4, one row per kind: the table every gRPC answer follows.
    #[test]
    fn every_error_kind_has_its_grpc_code() {
        let table = [
            (Error::invalid("x"), Code::InvalidArgument),
            (Error::InvalidCiphertext, Code::InvalidArgument),
            (Error::KeyNotFound("key/1".into()), Code::NotFound),
            (Error::AliasNotFound("alias/x".into()), Code::NotFound),
            (Error::AlreadyExists("x".into()), Code::AlreadyExists),
            (Error::WrongState("x".into()), Code::FailedPrecondition),
            (Error::LimitReached("x".into()), Code::FailedPrecondition),
            (Error::Unauthenticated("x".into()), Code::Unauthenticated),
            (Error::PermissionDenied("x".into()), Code::PermissionDenied),
            (Error::Unavailable("retry".into()), Code::Unavailable),
            (Error::Store("disk".into()), Code::Internal),
            (Error::Internal("detail".into()), Code::Internal),
        ];
        for (err, code) in table {
            // The audit log's outcome is the same code's name.
            let name: String = format!("{code:?}")
                .chars()
                .flat_map(|c| {
                    let gap = c.is_ascii_uppercase().then_some('_');
                    gap.into_iter()
                        .chain(std::iter::once(c.to_ascii_uppercase()))
                })
                .skip(1)
                .collect();
            assert_eq!(crate::ops::outcome_name(err.kind()), name);
            let status = status(err);
            assert_eq!(status.code(), code);
            assert!(!status.message().contains("detail") && !status.message().contains("disk"));
        }
    }
}
