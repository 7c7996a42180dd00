//! `wrapd pki`: a small certificate authority for mutual TLS (rcgen).
//!
//! Issues a CA, server certificates (DNS names and IP addresses) and client certificates
//! that name a principal: a URI SAN (e.g. a SPIFFE id), a DNS SAN, or only a common name.
//! Keys are ECDSA P-256, written with mode 0600; certificates with 0644. Meant for
//! development and small deployments; in production, issue from your own PKI instead.

use std::fs;
use std::net::IpAddr;
use std::path::{Path, PathBuf};
use std::time::Duration;

use rcgen::{
    BasicConstraints, CertificateParams, DistinguishedName, DnType, ExtendedKeyUsagePurpose, IsCa,
    Issuer, KeyPair, KeyUsagePurpose, SanType,
};
use time::OffsetDateTime;
use zeroize::Zeroizing;

use crate::error::{Error, Result};
use crate::files::write_new;

/// A certificate and its private key, both PEM. The key is zeroized on drop.
pub struct Pem {
    /// The certificate.
    pub cert: String,
    /// The private key (PKCS#8).
    pub key: Zeroizing<String>,
}

/// When a certificate is valid.
#[derive(Debug, Clone, Copy)]
pub struct Validity {
    /// Start.
    pub not_before: OffsetDateTime,
    /// End.
    pub not_after: OffsetDateTime,
}

impl Validity {
    /// From an hour ago (clock skew) to `days` from now.
    pub fn days(days: u32) -> Self {
        let now = OffsetDateTime::now_utc();
        Self {
            not_before: now - Duration::from_secs(3600),
            not_after: now + Duration::from_secs(u64::from(days) * 86_400),
        }
    }
}

/// How a client certificate names its principal (see [`crate::auth`]).
#[derive(Debug, Clone)]
pub enum ClientName {
    /// A URI SAN, e.g. `spiffe://example.org/payments`; the principal is `tls:uri=URI`.
    Uri(String),
    /// A DNS SAN; the principal is `tls:dns=NAME`.
    Dns(String),
    /// Only a subject common name; the principal is `tls:cn=NAME`.
    CommonName(String),
}

fn pki_error(what: &str, err: impl std::fmt::Display) -> Error {
    Error::Config(format!("{what}: {err}"))
}

fn ia5(s: &str) -> Result<rcgen::string::Ia5String> {
    s.try_into()
        .map_err(|e| pki_error(&format!("invalid name {s:?}"), e))
}

fn base_params(common_name: &str, validity: Validity) -> Result<CertificateParams> {
    let mut params =
        CertificateParams::new(Vec::<String>::new()).map_err(|e| pki_error("params", e))?;
    let mut dn = DistinguishedName::new();
    dn.push(DnType::CommonName, common_name);
    params.distinguished_name = dn;
    params.not_before = validity.not_before;
    params.not_after = validity.not_after;
    params.use_authority_key_identifier_extension = true;
    Ok(params)
}

fn finish(params: CertificateParams, ca: Option<&Pem>) -> Result<Pem> {
    let key = KeyPair::generate().map_err(|e| pki_error("key generation", e))?;
    let cert = match ca {
        None => params.self_signed(&key),
        Some(ca) => {
            let ca_key = KeyPair::from_pem(&ca.key).map_err(|e| pki_error("CA key", e))?;
            let issuer = Issuer::from_ca_cert_pem(&ca.cert, ca_key)
                .map_err(|e| pki_error("CA certificate", e))?;
            params.signed_by(&key, &issuer)
        }
    }
    .map_err(|e| pki_error("signing", e))?;
    Ok(Pem {
        cert: cert.pem(),
        key: Zeroizing::new(key.serialize_pem()),
    })
}

/// A self-signed CA.
pub fn new_ca(common_name: &str, validity: Validity) -> Result<Pem> {
    let mut params = base_params(common_name, validity)?;
    params.is_ca = IsCa::Ca(BasicConstraints::Constrained(0));
    params.key_usages = vec![KeyUsagePurpose::KeyCertSign, KeyUsagePurpose::CrlSign];
    finish(params, None)
}

/// A server certificate for DNS names and IP addresses (each `name` parsed as an IP first).
pub fn issue_server(ca: &Pem, names: &[String], validity: Validity) -> Result<Pem> {
    let first = names
        .first()
        .ok_or_else(|| Error::Config("a server certificate needs at least one name".into()))?;
    let mut params = base_params(first, validity)?;
    for name in names {
        params.subject_alt_names.push(match name.parse::<IpAddr>() {
            Ok(ip) => SanType::IpAddress(ip),
            Err(_) => SanType::DnsName(ia5(name)?),
        });
    }
    params.key_usages = vec![KeyUsagePurpose::DigitalSignature];
    params.extended_key_usages = vec![ExtendedKeyUsagePurpose::ServerAuth];
    finish(params, Some(ca))
}

/// A client certificate naming a principal.
pub fn issue_client(ca: &Pem, name: &ClientName, validity: Validity) -> Result<Pem> {
    let (cn, san) = match name {
        ClientName::Uri(uri) => (uri.clone(), Some(SanType::URI(ia5(uri)?))),
        ClientName::Dns(dns) => (dns.clone(), Some(SanType::DnsName(ia5(dns)?))),
        ClientName::CommonName(cn) => (cn.clone(), None),
    };
    let mut params = base_params(&cn, validity)?;
    params.subject_alt_names.extend(san);
    params.key_usages = vec![KeyUsagePurpose::DigitalSignature];
    params.extended_key_usages = vec![ExtendedKeyUsagePurpose::ClientAuth];
    finish(params, Some(ca))
}

/// Writes `dir/stem.pem` (0644) and `dir/stem.key` (0600); refuses to overwrite.
pub fn write(dir: &Path, stem: &str, pem: &Pem) -> Result<(PathBuf, PathBuf)> {
    fs::create_dir_all(dir)
        .map_err(|e| pki_error(&format!("cannot create {}", dir.display()), e))?;
    let cert = dir.join(format!("{stem}.pem"));
    let key = dir.join(format!("{stem}.key"));
    write_new(&key, pem.key.as_bytes(), 0o600)?;
    write_new(&cert, pem.cert.as_bytes(), 0o644)?;
    Ok((cert, key))
}

/// Reads `dir/stem.pem` and `dir/stem.key`.
pub fn read(dir: &Path, stem: &str) -> Result<Pem> {
    let read = |path: PathBuf| {
        fs::read_to_string(&path)
            .map_err(|e| pki_error(&format!("cannot read {}", path.display()), e))
    };
    Ok(Pem {
        cert: read(dir.join(format!("{stem}.pem")))?,
        key: Zeroizing::new(read(dir.join(format!("{stem}.key")))?),
    })
}

/// Creates `dir/ca.pem` and `dir/ca.key` unless they exist; returns the CA.
pub fn init(dir: &Path, validity: Validity) -> Result<Pem> {
    if dir.join("ca.pem").exists() {
        return read(dir, "ca");
    }
    let ca = new_ca("wrapd CA", validity)?;
    write(dir, "ca", &ca)?;
    Ok(ca)
}
