//! Who is calling, and may they: identities from the transport, and the policy.
//!
//! - Unix socket: the peer's credentials and groups (`SO_PEERCRED`, `SO_PEERGROUPS`) become
//!   principals `unix:uid=N`, `unix:user=NAME`, `unix:gid=N`, `unix:group=NAME` (primary and
//!   supplementary groups, as the kernel reports them at connect time), see `unix.rs`.
//! - TCP: mutual TLS is required at the handshake; the principal is `tls:uri=` + the client
//!   certificate's first URI SAN (e.g. a SPIFFE id), else `tls:dns=` + its first DNS SAN,
//!   else `tls:cn=` + its subject CN, see `cert.rs`. Each transport has its own namespace
//!   (`unix:`, `tls:`, and `wrapd:` for the daemon's own principals), so no certificate can
//!   pose as a local user.
//!
//! The policy (`policy.rs`) grants operations on keys to principals; everything else is
//! denied.

mod cert;
mod policy;
mod unix;

use std::fmt;
use std::net::SocketAddr;
use std::sync::Arc;

pub use cert::principal_from_certificate;
pub use policy::{Operation, Policy, PolicyHandle, Target};
pub use unix::{UnixNames, UnixPeer};

use crate::error::{Error, Result};

/// The transport a call came in on.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Transport {
    /// The unix socket.
    Unix,
    /// TCP with mutual TLS.
    Tcp,
    /// The Kubernetes KMS plugin socket (the caller acts as the configured principal).
    Kms,
}

impl Transport {
    /// `unix`, `tcp` or `kms`.
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Unix => "unix",
            Self::Tcp => "tcp",
            Self::Kms => "kms",
        }
    }
}

/// An authenticated caller.
#[derive(Debug, Clone)]
pub struct Identity {
    /// Every principal the caller has; the first is the main one (logs, audit).
    pub principals: Arc<[String]>,
    /// How it connected.
    pub transport: Transport,
    /// Peer detail for the log: `pid=N` or the remote address.
    pub peer: String,
}

impl Identity {
    /// The main principal.
    pub fn principal(&self) -> &str {
        self.principals.first().map_or("", String::as_str)
    }
}

impl fmt::Display for Identity {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "{} ({} {})",
            self.principal(),
            self.transport.as_str(),
            self.peer
        )
    }
}

/// What a transport knows about a caller's connection, before authentication: the record
/// each front end builds from its connection, for [`authenticate`].
#[derive(Debug, Clone, Copy)]
pub enum Connection<'a> {
    /// A unix socket peer; `None` when the kernel gave no credentials.
    Unix(Option<&'a UnixPeer>),
    /// A mutual-TLS client: its leaf certificate (DER), verified at the handshake, and its
    /// address.
    Tls {
        /// The client's leaf certificate, if it sent one.
        leaf: Option<&'a [u8]>,
        /// The client's address.
        remote: Option<SocketAddr>,
    },
}

/// The authenticator: the identity of a caller from its connection record. No identity is
/// [`Error::Unauthenticated`].
pub fn authenticate(connection: Connection<'_>) -> Result<Identity> {
    match connection {
        Connection::Unix(peer) => {
            let peer = peer.ok_or_else(|| {
                Error::Unauthenticated("no peer credentials on the unix socket".into())
            })?;
            Ok(Identity {
                principals: peer.principals.clone(),
                transport: Transport::Unix,
                peer: peer
                    .pid
                    .map_or_else(|| "pid=?".to_owned(), |pid| format!("pid={pid}")),
            })
        }
        Connection::Tls { leaf, remote } => {
            let leaf =
                leaf.ok_or_else(|| Error::Unauthenticated("no client certificate".into()))?;
            Ok(Identity {
                principals: vec![principal_from_certificate(leaf)?].into(),
                transport: Transport::Tcp,
                peer: remote.map_or_else(|| "?".to_owned(), |a| a.to_string()),
            })
        }
    }
}

/// The identity of the KMS plugin: its configured internal principal, with the socket
/// peer's uid and pid for the record.
pub fn kms_plugin_identity(principal: &str, peer: Option<&UnixPeer>) -> Identity {
    let peer = peer.map_or_else(
        || "?".to_owned(),
        |peer| {
            format!(
                "uid={} pid={}",
                peer.uid,
                peer.pid.map_or_else(|| "?".to_owned(), |p| p.to_string())
            )
        },
    );
    Identity {
        principals: vec![principal.to_owned()].into(),
        transport: Transport::Kms,
        peer,
    }
}
