//! Who is calling, and may they: identities from the transport, and the policy.
//!
//! - Unix socket: the peer's credentials and groups (`SO_PEERCRED`, `SO_PEERGROUPS`) become
//!   principals `unix:uid=N`, `unix:user=NAME`, `unix:gid=N`, `unix:group=NAME` (primary and
//!   supplementary groups, as the kernel reports them at connect time), see `unix.rs`.
//! - TCP: mutual TLS is required at the handshake; the principal is `tls:uri=` + the client
//!   certificate's first URI SAN (e.g. a SPIFFE id), else `tls:dns=` + its first DNS SAN,
//!   else `tls:cn=` + its subject CN, see `cert.rs`.
//! - The AWS KMS JSON API: a SigV4 signature that verifies with a configured access key;
//!   the principal is the one the config says the key acts as, plus `aws:access-key=ID`.
//!
//! Each transport has its own namespace (`unix:`, `tls:`, `aws:`, and `wrapd:` for the
//! daemon's own principals), so no certificate can pose as a local user. Only the
//! configuration can make an access key act as a `unix:` or `tls:` principal.
//!
//! The policy (`policy.rs`) grants operations on keys to principals; everything else is
//! denied.

mod cert;
pub mod key_policy;
mod migrate;
mod policy;
mod unix;

use std::fmt;
use std::net::SocketAddr;
use std::sync::Arc;

pub use cert::principal_from_certificate;
pub use migrate::{PolicyChange, line_diff, migrate_policy_text};
pub use policy::{Group, KeyPolicies, Operation, Policy, PolicyHandle, RequestAttributes, Target};
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
    /// The AWS KMS JSON API: HTTPS with SigV4 access keys.
    AwsKms,
    /// The XKS proxy API: AWS KMS, over HTTPS with a key store's SigV4 credentials.
    Xks,
}

impl Transport {
    /// `unix`, `tcp`, `kms`, `aws-kms` or `xks`.
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Unix => "unix",
            Self::Tcp => "tcp",
            Self::Kms => "kms",
            Self::AwsKms => "aws-kms",
            Self::Xks => "xks",
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
    /// The AWS access key id the request was signed with (AWS KMS API only).
    pub access_key: Option<String>,
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

/// A caller without an identity: why, and what the transport knows of it anyway, for the
/// audit line of the refused call.
#[derive(Debug, Clone, Default)]
pub struct Refusal {
    /// Why the caller has no identity.
    pub reason: String,
    /// The transport, when known.
    pub transport: Option<Transport>,
    /// Peer detail (the remote address).
    pub peer: String,
    /// The access key id a refused AWS request claimed, if any.
    pub access_key: Option<String>,
}

impl From<String> for Refusal {
    fn from(reason: String) -> Self {
        Self {
            reason,
            ..Self::default()
        }
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
                access_key: None,
            })
        }
        Connection::Tls { leaf, remote } => {
            let leaf =
                leaf.ok_or_else(|| Error::Unauthenticated("no client certificate".into()))?;
            Ok(Identity {
                principals: vec![principal_from_certificate(leaf)?].into(),
                transport: Transport::Tcp,
                peer: remote.map_or_else(|| "?".to_owned(), |a| a.to_string()),
                access_key: None,
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
        access_key: None,
    }
}

/// The principal every AWS access key has, whatever else it acts as: `aws:access-key=ID`.
pub fn access_key_principal(access_key_id: &str) -> String {
    format!("aws:access-key={access_key_id}")
}

/// The identity of an XKS proxy API request (AWS KMS) whose signature verified with one of
/// a key store's credentials: the key store's principal (`xks:NAME`), with the credential's
/// id recorded as the access key.
pub fn xks_identity(principal: &str, credential_id: &str, remote: Option<SocketAddr>) -> Identity {
    Identity {
        principals: vec![principal.to_owned()].into(),
        transport: Transport::Xks,
        peer: remote.map_or_else(|| "?".to_owned(), |a| a.to_string()),
        access_key: Some(credential_id.to_owned()),
    }
}

/// The identity of an AWS KMS API caller whose SigV4 signature verified with `access_key_id`:
/// the principal the key acts as (from the config), if any, then `aws:access-key=ID`, then
/// `aws:arn=ARN` when the key names its IAM ARN.
pub fn aws_identity(
    access_key_id: &str,
    acts_as: Option<&str>,
    arn: Option<&str>,
    remote: Option<SocketAddr>,
) -> Identity {
    let principals: Vec<String> = acts_as
        .map(str::to_owned)
        .into_iter()
        .chain(std::iter::once(access_key_principal(access_key_id)))
        .chain(arn.map(|arn| format!("aws:arn={arn}")))
        .collect();
    Identity {
        principals: principals.into(),
        transport: Transport::AwsKms,
        peer: remote.map_or_else(|| "?".to_owned(), |a| a.to_string()),
        access_key: Some(access_key_id.to_owned()),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn an_aws_caller_acts_as_its_principal_its_access_key_and_its_iam_arn() {
        let identity = aws_identity(
            "AKIAEXAMPLE00000001",
            Some("tls:uri=spiffe://example.org/app"),
            Some("arn:aws:iam::111122223333:user/alice"),
            None,
        );
        assert_eq!(
            &*identity.principals,
            [
                "tls:uri=spiffe://example.org/app",
                "aws:access-key=AKIAEXAMPLE00000001",
                "aws:arn=arn:aws:iam::111122223333:user/alice",
            ]
        );
        let bare = aws_identity("AKIAEXAMPLE00000001", None, None, None);
        assert_eq!(&*bare.principals, ["aws:access-key=AKIAEXAMPLE00000001"]);
    }
}
