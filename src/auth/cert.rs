//! The principal named by a client certificate.

use x509_parser::prelude::{FromDer, GeneralName, X509Certificate};

use crate::error::{Error, Result};

/// `tls:uri=` + the first URI SAN, else `tls:dns=` + the first DNS SAN, else `tls:cn=` +
/// the subject CN. The `tls:` namespace means no certificate field can name a principal of
/// another transport (`unix:uid=0`, `wrapd:…`).
/// A certificate naming nothing is [`Error::Unauthenticated`].
pub fn principal_from_certificate(der: &[u8]) -> Result<String> {
    let (_, cert) = X509Certificate::from_der(der)
        .map_err(|_| Error::Unauthenticated("unparseable client certificate".into()))?;
    let mut dns = None;
    if let Ok(Some(san)) = cert.subject_alternative_name() {
        for name in &san.value.general_names {
            match name {
                GeneralName::URI(uri) => return Ok(format!("tls:uri={uri}")),
                GeneralName::DNSName(name) if dns.is_none() => {
                    dns = Some(format!("tls:dns={name}"))
                }
                _ => {}
            }
        }
    }
    if let Some(dns) = dns {
        return Ok(dns);
    }
    cert.subject()
        .iter_common_name()
        .next()
        .and_then(|cn| cn.as_str().ok())
        .map(|cn| format!("tls:cn={cn}"))
        .ok_or_else(|| Error::Unauthenticated("the client certificate names no principal".into()))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::pki::{ClientName, Validity, issue_client, new_ca};

    fn principal(name: ClientName) -> String {
        let ca = new_ca("test CA", Validity::days(1)).unwrap();
        let pem = issue_client(&ca, &name, Validity::days(1)).unwrap();
        let der = der_of(&pem.cert);
        principal_from_certificate(&der).unwrap()
    }

    fn der_of(pem: &str) -> Vec<u8> {
        let body: String = pem.lines().filter(|l| !l.starts_with("-----")).collect();
        use base64::Engine;
        base64::engine::general_purpose::STANDARD
            .decode(body)
            .unwrap()
    }

    #[test]
    fn uri_then_dns_then_cn() {
        assert_eq!(
            principal(ClientName::Uri("spiffe://example.org/payments".into())),
            "tls:uri=spiffe://example.org/payments"
        );
        assert_eq!(
            principal(ClientName::Dns("svc.example.org".into())),
            "tls:dns=svc.example.org"
        );
        assert_eq!(
            principal(ClientName::CommonName("alice".into())),
            "tls:cn=alice"
        );
    }

    /// A certificate cannot pose as a local user or as wrapd.
    #[test]
    fn a_certificate_cannot_name_a_unix_or_internal_principal() {
        for uri in ["unix:uid=0", "wrapd:kubernetes-kms"] {
            let p = principal(ClientName::Uri(uri.into()));
            assert_eq!(p, format!("tls:uri={uri}"));
            assert!(!p.starts_with("unix:") && !p.starts_with("wrapd:"));
        }
    }

    #[test]
    fn garbage_is_unauthenticated() {
        let err = principal_from_certificate(&[0x30, 0x03, 1, 2, 3]).unwrap_err();
        assert_eq!(err.kind(), crate::error::ErrorKind::Unauthenticated);
    }
}
