//! The front ends: each decodes its wire format, builds an [`crate::ops::Call`] from its
//! connection (through the [`crate::auth::authenticate`] authenticator), calls the
//! operation layer ([`crate::ops::Ops`]) and maps the result and the error to its own wire
//! format. Only here (and in the listeners and the client) does wrapd speak a transport.
//!
//! - [`grpc`]: `wrapd.v1.DataKeyService`, `wrapd.v1.KeyService` and the Kubernetes KMS v2
//!   plugin (`v2.KeyManagementService`), on tonic.
//! - [`aws`]: the AWS KMS-compatible JSON API (`TrentService`), over HTTPS with SigV4.
//! - [`xks`]: the AWS KMS External Key Store proxy API, over HTTPS with SigV4, for AWS KMS
//!   itself (keys of an external key store).
//! - [`sigv4`]: the SigV4 verifier both HTTPS front ends share.

pub mod aws;
pub mod grpc;
pub mod sigv4;
pub mod xks;
