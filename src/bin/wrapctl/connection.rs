//! How `wrapctl` reaches daemons: the connection flags every command shares.

use std::path::PathBuf;

use clap::Args;
use tonic::transport::Channel;
use wrapd::client::{TlsFiles, connect_tls, connect_unix};

use crate::error::CliError;

/// The connection flags, flattened into every command (`--socket`, or `--endpoint` with
/// the `--tls-*` files).
#[derive(Args, Clone)]
pub struct ConnectionArgs {
    /// The daemon's unix socket (used unless --endpoint is given).
    #[arg(
        long,
        env = "WRAPD_SOCKET",
        global = true,
        default_value = ".wrapd-dev/wrapd.sock"
    )]
    pub socket: PathBuf,
    /// The daemon's TCP endpoint, e.g. https://127.0.0.1:8443 (mutual TLS).
    #[arg(long, env = "WRAPD_ENDPOINT", global = true)]
    pub endpoint: Option<String>,
    /// CA certificate for --endpoint (PEM).
    #[arg(
        long = "tls-ca",
        env = "WRAPD_CA",
        global = true,
        default_value = ".wrapd-dev/pki/ca.pem"
    )]
    pub tls_ca: PathBuf,
    /// Client certificate for --endpoint (PEM).
    #[arg(
        long = "tls-cert",
        env = "WRAPD_CERT",
        global = true,
        default_value = ".wrapd-dev/pki/client.pem"
    )]
    pub tls_cert: PathBuf,
    /// Client key for --endpoint (PEM).
    #[arg(
        long = "tls-key",
        env = "WRAPD_KEY",
        global = true,
        default_value = ".wrapd-dev/pki/client.key"
    )]
    pub tls_key: PathBuf,
}

impl ConnectionArgs {
    /// The TLS files.
    pub fn tls(&self) -> TlsFiles {
        TlsFiles {
            ca: self.tls_ca.clone(),
            cert: self.tls_cert.clone(),
            key: self.tls_key.clone(),
        }
    }

    /// A channel to the daemon the flags name.
    pub async fn connect(&self) -> Result<Channel, CliError> {
        Ok(match &self.endpoint {
            Some(endpoint) => connect_tls(endpoint, &self.tls()).await?,
            None => connect_unix(&self.socket).await?,
        })
    }

    /// A channel to a daemon named on the command line: an https:// URL (mutual TLS with
    /// the --tls-* files) or a unix socket path.
    pub async fn connect_daemon(&self, daemon: &str) -> Result<Channel, CliError> {
        Ok(if daemon.starts_with("https://") {
            connect_tls(daemon, &self.tls()).await?
        } else {
            connect_unix(daemon).await?
        })
    }

    /// The command-line flags that reach this target (for child `wrapctl` processes).
    pub fn args(&self) -> Vec<String> {
        let mut args = vec!["--socket".to_owned(), self.socket.display().to_string()];
        if let Some(endpoint) = &self.endpoint {
            for (flag, value) in [
                ("--endpoint", endpoint.clone()),
                ("--tls-ca", self.tls_ca.display().to_string()),
                ("--tls-cert", self.tls_cert.display().to_string()),
                ("--tls-key", self.tls_key.display().to_string()),
            ] {
                args.push(flag.to_owned());
                args.push(value);
            }
        }
        args
    }
}
