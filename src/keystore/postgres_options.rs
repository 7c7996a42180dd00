//! How to reach the PostgreSQL metadata store: part of the configuration whether or not this
//! build has the store itself (feature `postgres`), so that a config naming it is read, and
//! refused with a clear error, by a build without it.

use zeroize::Zeroizing;

/// How to reach the database.
#[derive(Clone)]
pub struct PostgresOptions {
    /// `postgresql://user@host:port/db` (no password in it).
    pub url: String,
    /// The password, from a file or an environment variable.
    pub password: Option<Zeroizing<String>>,
    /// This daemon's name in the fleet (version claims are per daemon).
    pub instance: String,
    /// TLS to the database: the CA certificates (PEM) its certificate must chain to; the
    /// host name (or IP address) in the URL must match the certificate. `None`: no TLS.
    pub tls_ca: Option<Vec<u8>>,
}

impl std::fmt::Debug for PostgresOptions {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("PostgresOptions")
            .field("url", &self.url)
            .field("password", &self.password.as_ref().map(|_| "<redacted>"))
            .field("instance", &self.instance)
            .field("tls", &self.tls_ca.is_some())
            .finish()
    }
}
