//! How connections are made: TLS verified against the configured CA, or plain only where
//! that is safe (this host) or asked for in so many words (`sslmode=disable`).

use super::*;

/// A connection without `tls_ca_file` is plain: refused unless every host is a unix socket
/// or a loopback address, or the URL says `sslmode=disable` (the operator's explicit choice,
/// warned about). The store carries key states, aliases and the audit chain's head; a
/// plain connection over a network gives them to anyone on the path. Without a CA, wrapd
/// cannot check the server's certificate, so `sslmode=require` (or `prefer`, the default)
/// without `tls_ca_file` is refused rather than taken as encrypted.
pub(super) fn check_plain_connection(config: &postgres::Config) -> Result<()> {
    use postgres::config::{Host, SslMode};
    let remote: Vec<String> = config
        .get_hosts()
        .iter()
        .filter_map(|host| match host {
            Host::Unix(_) => None,
            Host::Tcp(name) if is_loopback(name) => None,
            Host::Tcp(name) => Some(name.clone()),
        })
        .collect();
    if remote.is_empty() {
        return Ok(());
    }
    if config.get_ssl_mode() == SslMode::Disable {
        tracing::warn!(hosts = ?remote, "store.postgres: sslmode=disable: the connection to the metadata store is not encrypted");
        return Ok(());
    }
    Err(Error::Config(format!(
        "store.postgres: the connection to {} would not be encrypted: set store.tls_ca_file to the CA of the server's certificate (or sslmode=disable in the URL to accept a plain connection)",
        remote.join(", ")
    )))
}

/// `localhost`, or an IP address of the loopback network.
pub(super) fn is_loopback(host: &str) -> bool {
    host == "localhost"
        || host
            .trim_start_matches('[')
            .trim_end_matches(']')
            .parse::<std::net::IpAddr>()
            .is_ok_and(|ip| ip.is_loopback())
}

/// TLS with certificate and host name verification against `ca_pem` only.
/// The connector of a plain connection (`sslmode=disable`): never asked to make TLS.
pub(super) fn no_tls_connector() -> Result<MakeRustlsConnect> {
    use tokio_rustls::rustls::{ClientConfig, RootCertStore, crypto};
    let config =
        ClientConfig::builder_with_provider(std::sync::Arc::new(crypto::ring::default_provider()))
            .with_safe_default_protocol_versions()
            .map_err(|e| Error::Config(format!("store TLS: {e}")))?
            .with_root_certificates(RootCertStore::empty())
            .with_no_client_auth();
    Ok(MakeRustlsConnect::new(config))
}

pub(super) fn tls_connector(ca_pem: &[u8]) -> Result<MakeRustlsConnect> {
    use tokio_rustls::rustls::pki_types::CertificateDer;
    use tokio_rustls::rustls::pki_types::pem::PemObject;
    use tokio_rustls::rustls::{ClientConfig, RootCertStore, crypto};
    let mut roots = RootCertStore::empty();
    for cert in CertificateDer::pem_slice_iter(ca_pem) {
        let cert = cert.map_err(|e| Error::Config(format!("store.tls_ca_file: {e}")))?;
        roots
            .add(cert)
            .map_err(|e| Error::Config(format!("store.tls_ca_file: {e}")))?;
    }
    if roots.is_empty() {
        return Err(Error::Config(
            "store.tls_ca_file holds no certificate".into(),
        ));
    }
    let config =
        ClientConfig::builder_with_provider(std::sync::Arc::new(crypto::ring::default_provider()))
            .with_safe_default_protocol_versions()
            .map_err(|e| Error::Config(format!("store TLS: {e}")))?
            .with_root_certificates(roots)
            .with_no_client_auth();
    Ok(MakeRustlsConnect::new(config))
}
