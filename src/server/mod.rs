//! The daemon: opens the token and the metadata store, serves the gRPC services (plus
//! health and reflection) on its listeners, runs the background tasks, and shuts down
//! gracefully.
//!
//! `unix.rs` binds the unix socket; `logging.rs` sets up `tracing` (`otel.rs` its span export,
//! feature `otel`); `prometheus.rs` the metrics recorder and scrape.

mod authority;
pub(crate) mod http;
pub(crate) mod listen;
mod logging;
#[cfg(feature = "otel")]
mod otel;
mod prometheus;
mod unix;

use std::future::Future;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use std::net::SocketAddr;

use tokio::net::TcpListener;
use tokio::sync::watch;
use tokio::task::JoinSet;
use tokio_rustls::TlsAcceptor;
use tonic::transport::Server;
use tonic::transport::server::Router;
use tonic_health::ServingStatus;
use tonic_health::pb::health_server::{Health, HealthServer};
use tonic_health::server::HealthReporter;
use zeroize::Zeroizing;

pub use authority::{AuthorityRewriter, RewriteError};
pub use logging::init_logging;
#[cfg(not(feature = "otel"))]
pub use logging::{SpanExport, init_logging_and_tracing};
#[cfg(feature = "otel")]
pub use otel::{SpanExport, init_logging_and_tracing};
pub use unix::bind_unix_socket;

use crate::audit::{AuditLog, HeadStore};
use crate::auth::{PolicyHandle, UnixNames};
use crate::config::{
    AwsConfig, Config, KmsConfig, Limits, StoreConfig, TcpListenerConfig, UnixListenerConfig,
    XksConfig,
};
use crate::error::{Error, Result};
use crate::front::aws::AwsApi;
use crate::front::grpc::{DataKeyApi, KeyApi, KmsApi};
use crate::front::xks::XksApi;
use crate::hsm::Pkcs11Token;
#[cfg(feature = "postgres")]
use crate::keystore::PostgresStore;
use crate::keystore::{Keystore, MetadataStore, SqliteStore, SystemClock};
use crate::kms_proto::key_management_service_server::KeyManagementServiceServer;
use crate::ops::{Gate, KmsPlugin, Ops};
use crate::proto::data_key_service_server::DataKeyServiceServer;
use crate::proto::key_service_server::KeyServiceServer;

/// Largest request `wrapd.v1` decodes: the largest valid one (ReWrap with two 8 KiB contexts
/// and a 4 KiB blob) is about 25 KiB, so anything far larger is refused before it costs memory.
const API_MAX_MESSAGE: usize = 256 * 1024;

/// Largest message the KMS plugin socket decodes.
const KMS_MAX_MESSAGE: usize = 64 * 1024;

/// Largest HTTP/2 header list a connection may send (gRPC metadata is small).
const MAX_HEADER_LIST: u32 = 64 * 1024;

/// How long a graceful shutdown waits for in-flight calls.
const DRAIN_TIMEOUT: Duration = Duration::from_secs(10);

/// How often the audit chain head is recorded in the metadata store.
const AUDIT_HEAD_INTERVAL: Duration = Duration::from_secs(1);

/// How often the health task checks the token.
const HEALTH_CHECK_INTERVAL: Duration = Duration::from_secs(2);

/// Where the daemon serves, reported once it is ready.
#[derive(Debug, Clone)]
pub struct Ready {
    /// The unix socket path.
    pub socket: Option<PathBuf>,
    /// The TCP address actually bound.
    pub tcp: Option<SocketAddr>,
    /// The Kubernetes KMS v2 plugin socket.
    pub kms: Option<PathBuf>,
    /// The AWS KMS API's address.
    pub aws: Option<SocketAddr>,
    /// The XKS proxy API's address.
    pub xks: Option<SocketAddr>,
    /// The Prometheus metrics address.
    pub metrics: Option<SocketAddr>,
}

impl Ready {
    /// The ready line printed on stdout:
    /// `wrapd ready socket=PATH tcp=ADDR kms=PATH aws=https://ADDR xks=https://ADDR metrics=http://ADDR/metrics`
    /// (each part only when that listener is configured).
    pub fn line(&self) -> String {
        let mut line = "wrapd ready".to_owned();
        if let Some(socket) = &self.socket {
            line.push_str(&format!(" socket={}", socket.display()));
        }
        if let Some(tcp) = &self.tcp {
            line.push_str(&format!(" tcp={tcp}"));
        }
        if let Some(kms) = &self.kms {
            line.push_str(&format!(" kms={}", kms.display()));
        }
        if let Some(aws) = &self.aws {
            line.push_str(&format!(" aws=https://{aws}"));
        }
        if let Some(xks) = &self.xks {
            line.push_str(&format!(" xks=https://{xks}"));
        }
        if let Some(metrics) = &self.metrics {
            line.push_str(&format!(" metrics=http://{metrics}/metrics"));
        }
        line
    }
}

/// An opened daemon, ready to serve.
pub struct Daemon {
    unix: Option<UnixListenerConfig>,
    tcp: Option<TcpListenerConfig>,
    kms: Option<KmsConfig>,
    aws: Option<AwsConfig>,
    xks: Option<XksConfig>,
    /// The token's model, for the XKS health answer.
    hsm_model: String,
    metrics: Option<crate::config::MetricsConfig>,
    /// Set for a shared (fleet) store: how often the view is re-read in full.
    resync_interval: Option<Duration>,
    /// This daemon's name in a fleet, on every audit line.
    instance: Option<String>,
    deletion_check_interval: Duration,
    retire_unused: Vec<crate::config::RetireUnused>,
    limits: Limits,
    token: Pkcs11Token,
    keystore: Arc<Keystore>,
    policy: Arc<PolicyHandle>,
    audit: Option<Arc<AuditLog>>,
    /// Data-plane worker threads: one per HSM session (`hsm.max_sessions`).
    workers: usize,
}

impl Daemon {
    /// Opens the token (checking module, token label and PIN), the metadata store, the
    /// policy and the audit log, and reconciles the store with the token.
    pub async fn open(config: Config) -> Result<Self> {
        tokio::task::spawn_blocking(move || Self::open_blocking(config))
            .await
            .map_err(|e| Error::Internal(format!("start-up task failed: {e}")))?
    }

    fn open_blocking(config: Config) -> Result<Self> {
        let Config {
            hsm,
            store: store_config,
            unix,
            tcp,
            policy_file,
            audit,
            kms,
            aws,
            xks,
            metrics,
            keystore,
            deletion_check_interval,
            retire_unused,
            limits,
            ..
        } = config;
        let hsm_model = format!("PKCS#11 token ({:?} profile)", hsm.profile).to_lowercase();
        if policy_file.is_none() {
            tracing::warn!("no [policy] configured: every call will be denied");
        }
        let policy = Arc::new(PolicyHandle::load(policy_file)?);
        tracing::info!(grants = policy.current().len(), "policy loaded");
        let (store, heads): (Arc<dyn MetadataStore>, Arc<dyn HeadStore>) = match &store_config {
            StoreConfig::Sqlite(path) => {
                let store = Arc::new(SqliteStore::open(path)?);
                (store.clone(), store)
            }
            #[cfg(not(feature = "postgres"))]
            StoreConfig::Postgres { .. } => return Err(without_postgres()),
            #[cfg(feature = "postgres")]
            StoreConfig::Postgres { options, .. } => {
                let store = Arc::new(PostgresStore::open(options)?);
                store.claim_instance(crate::keystore::INSTANCE_WAIT)?;
                tracing::info!(instance = %options.instance, "metadata store: PostgreSQL (fleet)");
                let heads = Arc::new(InstanceHeads {
                    store: store.clone(),
                    instance: options.instance.clone(),
                });
                (store, heads)
            }
        };
        let audit = match audit {
            Some(audit) => Some(Arc::new(AuditLog::open_anchored(
                &audit.file,
                audit.fsync,
                Some(heads),
                audit.gaps,
            )?)),
            None => {
                tracing::warn!("no [audit] configured: key operations are not audited");
                None
            }
        };
        let workers = hsm.max_sessions;
        let token = Pkcs11Token::open(hsm)?;
        let keystore = Keystore::open(Arc::new(token.clone()), store, daemon_clock(), keystore)?;
        Ok(Self {
            resync_interval: match &store_config {
                StoreConfig::Postgres {
                    resync_interval, ..
                } => Some(*resync_interval),
                StoreConfig::Sqlite(_) => None,
            },
            instance: store_config.instance().map(str::to_owned),
            unix,
            tcp,
            kms,
            aws,
            xks,
            hsm_model,
            metrics,
            deletion_check_interval,
            retire_unused,
            limits,
            token,
            keystore: Arc::new(keystore),
            policy,
            audit,
            workers,
        })
    }

    /// The key store (for in-process use such as benchmarks).
    pub fn keystore(&self) -> &Arc<Keystore> {
        &self.keystore
    }

    /// A server builder with the HTTP/2 limits (see `listen.rs`).
    fn builder(limits: &Limits) -> Server {
        Server::builder()
            .max_concurrent_streams(limits.max_concurrent_streams)
            .http2_max_header_list_size(MAX_HEADER_LIST)
            // Streams a client may open and reset before the server answers them, and
            // streams a client may make the server reset (the "rapid reset" budgets).
            .http2_max_pending_accept_reset_streams(Some(20))
            .http2_max_local_error_reset_streams(Some(256))
    }

    fn router(
        &self,
        ops: &Ops,
        health: &HealthServer<impl Health>,
        limits: &Limits,
    ) -> Result<Router> {
        let reflection_v1 = tonic_reflection::server::Builder::configure()
            .register_encoded_file_descriptor_set(crate::proto::FILE_DESCRIPTOR_SET)
            .register_encoded_file_descriptor_set(tonic_health::pb::FILE_DESCRIPTOR_SET)
            .build_v1()
            .map_err(|e| Error::Internal(format!("reflection: {e}")))?;
        let reflection_v1alpha = tonic_reflection::server::Builder::configure()
            .register_encoded_file_descriptor_set(crate::proto::FILE_DESCRIPTOR_SET)
            .register_encoded_file_descriptor_set(tonic_health::pb::FILE_DESCRIPTOR_SET)
            .build_v1alpha()
            .map_err(|e| Error::Internal(format!("reflection: {e}")))?;
        Ok(Self::builder(limits)
            .add_service(health.clone())
            .add_service(reflection_v1)
            .add_service(reflection_v1alpha)
            .add_service(
                DataKeyServiceServer::new(DataKeyApi::new(ops.clone()))
                    .max_decoding_message_size(API_MAX_MESSAGE),
            )
            .add_service(
                KeyServiceServer::new(KeyApi::new(ops.clone()))
                    .max_decoding_message_size(API_MAX_MESSAGE),
            ))
    }

    /// Serves until `shutdown` resolves, then stops accepting, lets in-flight calls finish
    /// (up to 10 s) and closes the HSM sessions. `on_ready` runs once every listener is
    /// bound. SIGHUP reloads the policy and reopens the audit log.
    pub async fn serve(
        self,
        shutdown: impl Future<Output = ()> + Send + 'static,
        on_ready: impl FnOnce(&Ready),
    ) -> Result<()> {
        let (health, health_service) = tonic_health::server::health_reporter();
        set_health(&health, ServingStatus::Serving).await;
        let gate = Arc::new(
            Gate::new(self.policy.clone(), self.audit.clone())
                .with_instance(self.instance.clone())
                .with_account(
                    self.aws
                        .as_ref()
                        .map_or(crate::ops::key_policies::DEFAULT_ACCOUNT, |aws| {
                            aws.account.as_str()
                        }),
                )
                .with_workers(self.workers, self.token.profile().is_networked())?,
        );
        // A fleet's daemons follow each other's changes through the shared store.
        let following = Arc::new(std::sync::atomic::AtomicBool::new(false));
        let follower = self.resync_interval.map(|resync| {
            let keystore = self.keystore.clone();
            let stop = following.clone();
            std::thread::Builder::new()
                .name("wrapd-store-follower".into())
                .spawn(move || keystore.follow_store(resync, &stop))
        });
        let follower = follower
            .transpose()
            .map_err(|e| Error::Internal(format!("cannot start the store follower: {e}")))?;
        let ops = Ops::new(self.keystore.clone(), gate);
        let hangup = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::hangup())
            .map_err(|e| Error::Internal(format!("cannot listen for SIGHUP: {e}")))?;

        let (stop_tx, stop_rx) = watch::channel(false);
        let stopped = move || {
            let mut rx = stop_rx.clone();
            async move {
                let _ = rx.wait_for(|stop| *stop).await;
            }
        };
        let mut servers = JoinSet::new();
        let mut ready = Ready {
            socket: None,
            tcp: None,
            kms: None,
            aws: None,
            xks: None,
            metrics: None,
        };
        let listeners = [
            self.unix.is_some(),
            self.tcp.is_some(),
            self.kms.is_some(),
            self.aws.is_some(),
            self.xks.is_some(),
        ];
        let limits = self
            .limits
            .fitted_to_fd_limit(listeners.iter().filter(|l| **l).count());
        let names = Arc::new(UnixNames::default());
        let mut acceptors = Vec::new();
        let mut reloadable_xks = None;
        if let Some(unix) = &self.unix {
            let listener = bind_unix_socket(&unix.path, unix.mode)?;
            let router = self.router(&ops, &health_service, &limits)?;
            let (incoming, acceptor) =
                listen::unix_incoming(listener, names.clone(), &limits, "unix");
            acceptors.push(acceptor);
            servers.spawn(listener_result(
                router.serve_with_incoming_shutdown(incoming, stopped()),
            ));
            ready.socket = Some(unix.path.clone());
        }
        if let Some(tcp) = &self.tcp {
            let tls = tls_acceptor(tcp)?;
            let listener = TcpListener::bind(tcp.listen)
                .await
                .map_err(|e| Error::Config(format!("cannot bind {}: {e}", tcp.listen)))?;
            let addr = listener
                .local_addr()
                .map_err(|e| Error::Config(format!("tcp listener: {e}")))?;
            let router = self.router(&ops, &health_service, &limits)?;
            let (incoming, acceptor) = listen::tls_incoming(listener, tls, &limits);
            acceptors.push(acceptor);
            servers.spawn(listener_result(
                router.serve_with_incoming_shutdown(incoming, stopped()),
            ));
            ready.tcp = Some(addr);
        }

        if let Some(kms) = &self.kms {
            let listener = bind_unix_socket(&kms.socket.path, kms.socket.mode)?;
            let plugin = KmsPlugin::new(
                ops.clone(),
                kms.key.clone(),
                (&kms.principal, kms.bind_principal),
                kms.healthz_cache,
            )?;
            let api = KmsApi::new(plugin, kms.principal.clone());
            // The KMS v2 API's messages are small: refuse anything far larger.
            let service =
                KeyManagementServiceServer::new(api).max_decoding_message_size(KMS_MAX_MESSAGE);
            let router = Self::builder(&limits).add_service(service);
            let (incoming, acceptor) = listen::unix_incoming(listener, names, &limits, "kms");
            acceptors.push(acceptor);
            servers.spawn(listener_result(
                router.serve_with_incoming_shutdown(incoming, stopped()),
            ));
            ready.kms = Some(kms.socket.path.clone());
        }

        if let Some(aws) = &self.aws {
            let tls = server_tls_acceptor("aws", &aws.cert, &aws.key)?;
            let listener = TcpListener::bind(aws.listen)
                .await
                .map_err(|e| Error::Config(format!("cannot bind {}: {e}", aws.listen)))?;
            let addr = listener
                .local_addr()
                .map_err(|e| Error::Config(format!("aws listener: {e}")))?;
            let api = Arc::new(AwsApi::new(ops.clone(), aws));
            let (incoming, acceptor) = listen::tls_incoming(listener, tls, &limits);
            acceptors.push(acceptor);
            servers.spawn(listener_result(http::serve(
                incoming,
                api,
                limits.handshake_timeout,
                stopped(),
            )));
            ready.aws = Some(addr);
        }

        if let Some(xks) = &self.xks {
            let tls = xks_tls_acceptor(xks)?;
            let listener = TcpListener::bind(xks.listen)
                .await
                .map_err(|e| Error::Config(format!("cannot bind {}: {e}", xks.listen)))?;
            let addr = listener
                .local_addr()
                .map_err(|e| Error::Config(format!("xks listener: {e}")))?;
            let api = Arc::new(XksApi::new(ops.clone(), xks, self.hsm_model.clone(), 1));
            if let Some(source) = &xks.source {
                reloadable_xks = Some((api.clone(), source.clone()));
            }
            let (incoming, acceptor) = listen::tls_incoming(listener, tls, &limits);
            acceptors.push(acceptor);
            servers.spawn(listener_result(http::serve(
                incoming,
                api,
                limits.handshake_timeout,
                stopped(),
            )));
            ready.xks = Some(addr);
        }

        if let Some(config) = self.metrics {
            let addr = config.listen;
            if !addr.ip().is_loopback() {
                tracing::warn!(%addr, per_key_series = config.per_key_series,
                    "metrics are served without authentication on a non-loopback address; keep it on a private network");
            }
            let metrics =
                prometheus::Metrics::install(self.keystore.clone(), config.per_key_series)?;
            let listener = TcpListener::bind(addr)
                .await
                .map_err(|e| Error::Config(format!("cannot bind {addr}: {e}")))?;
            ready.metrics = Some(
                listener
                    .local_addr()
                    .map_err(|e| Error::Config(format!("metrics listener: {e}")))?,
            );
            servers.spawn(listener_result(http::serve_metrics(
                listener,
                metrics,
                limits.handshake_timeout,
                stopped(),
            )));
        }

        let background = [
            tokio::spawn(maintenance_task(
                ops.clone(),
                self.deletion_check_interval,
                Arc::new(self.retire_unused.clone()),
            )),
            tokio::spawn(health_task(
                self.keystore.clone(),
                health.clone(),
                self.audit.as_ref().map(|a| a.subscribe()),
            )),
            tokio::spawn(hangup_task(
                hangup,
                self.policy.clone(),
                self.audit.clone(),
                reloadable_xks,
            )),
            tokio::spawn(audit_head_task(self.audit.clone())),
            tokio::spawn(usage_task(self.keystore.clone())),
            tokio::spawn(session_keepalive_task(self.token.clone())),
        ];

        on_ready(&ready);
        tracing::info!(socket = ?ready.socket, tcp = ?ready.tcp, kms = ?ready.kms, aws = ?ready.aws, xks = ?ready.xks, "serving");

        // Stop accepting on the signal (or if a listener fails), then give in-flight calls
        // DRAIN_TIMEOUT to finish: a client that never reads its GOAWAY must not keep the
        // daemon up forever.
        let mut failure = None;
        tokio::select! {
            () = shutdown => tracing::info!("draining in-flight calls"),
            Some(ended) = servers.join_next() => {
                failure = Some(match ended {
                    Ok(Ok(())) => Error::Internal("a listener stopped".into()),
                    Ok(Err(e)) => Error::Internal(format!("listener: {e}")),
                    Err(e) => Error::Internal(format!("listener task: {e}")),
                });
            }
        }
        let _ = stop_tx.send(true);
        for acceptor in &acceptors {
            acceptor.abort(); // stop accepting
        }
        let drained = tokio::time::timeout(DRAIN_TIMEOUT, async {
            while servers.join_next().await.is_some() {}
        })
        .await;
        if drained.is_err() {
            tracing::warn!(
                seconds = DRAIN_TIMEOUT.as_secs(),
                "connections still open after the drain timeout; closing them"
            );
            servers.abort_all();
        }
        for task in background {
            task.abort();
        }
        set_health(&health, ServingStatus::NotServing).await;
        let sockets = self.unix.iter().chain(self.kms.iter().map(|k| &k.socket));
        for socket in sockets {
            if let Err(err) = std::fs::remove_file(&socket.path) {
                tracing::debug!(error = %err, "could not remove the socket file");
            }
        }
        // Calls whose callers left are still queued: their jobs run and their lines are
        // written before the log is closed.
        let stopping = ops.gate().clone();
        if let Err(err) = tokio::task::spawn_blocking(move || stopping.shutdown()).await {
            tracing::error!(error = %err, "stopping the operation workers");
        }
        let keystore = self.keystore.clone();
        match tokio::task::spawn_blocking(move || keystore.flush_usage()).await {
            Ok(Ok(_)) => {}
            Ok(Err(err)) => {
                tracing::warn!(error = %err, "the last version usage counts were not stored")
            }
            Err(err) => tracing::warn!(error = %err, "storing the version usage counts failed"),
        }
        if let Some(audit) = &self.audit {
            let audit = audit.clone();
            match tokio::task::spawn_blocking(move || audit.close()).await {
                Ok(Ok(())) => {}
                Ok(Err(err)) => tracing::error!(error = %err, "closing the audit log"),
                Err(err) => tracing::error!(error = %err, "closing the audit log"),
            }
        }
        following.store(true, std::sync::atomic::Ordering::Relaxed);
        if let Some(follower) = follower {
            // It wakes at least every 500 ms.
            let _ = tokio::task::spawn_blocking(move || follower.join()).await;
        }
        self.token.close();
        tracing::info!("stopped");
        match failure {
            Some(err) => Err(err),
            None => Ok(()),
        }
    }
}

/// Mutual TLS for the TCP listener: our certificate, and client certificates required to
/// chain to `client_ca` (rustls checks validity dates and the chain at the handshake).
fn tls_acceptor(tcp: &TcpListenerConfig) -> Result<TlsAcceptor> {
    let verifier = chain_verifier("tcp", &tcp.client_ca)?;
    client_auth_acceptor("tcp", &tcp.cert, &tcp.key, verifier, b"h2")
}

/// The verifier of client certificates that must chain to the CA(s) in `client_ca` (PEM).
fn chain_verifier(
    what: &str,
    client_ca: &PathBuf,
) -> Result<Arc<dyn tokio_rustls::rustls::server::danger::ClientCertVerifier>> {
    use tokio_rustls::rustls::RootCertStore;
    use tokio_rustls::rustls::pki_types::CertificateDer;
    use tokio_rustls::rustls::pki_types::pem::PemObject;
    use tokio_rustls::rustls::server::WebPkiClientVerifier;

    let pem =
        |e: &dyn std::fmt::Display| Error::Config(format!("{what}: {}: {e}", client_ca.display()));
    let mut roots = RootCertStore::empty();
    for ca in CertificateDer::pem_slice_iter(&read_listener_file(what, client_ca)?) {
        roots.add(ca.map_err(|e| pem(&e))?).map_err(|e| pem(&e))?;
    }
    WebPkiClientVerifier::builder_with_provider(Arc::new(roots), tls_provider())
        .build()
        .map_err(|e| pem(&e))
}

/// TLS for the listener `what` with client certificates checked by `verifier`, speaking
/// `alpn`.
fn client_auth_acceptor(
    what: &str,
    cert: &PathBuf,
    key: &PathBuf,
    verifier: Arc<dyn tokio_rustls::rustls::server::danger::ClientCertVerifier>,
    alpn: &[u8],
) -> Result<TlsAcceptor> {
    use tokio_rustls::rustls::ServerConfig;

    let (certs, key) = certified_key(what, cert, key)?;
    let mut config = ServerConfig::builder_with_provider(tls_provider())
        .with_safe_default_protocol_versions()
        .map_err(|e| Error::Config(format!("{what}: TLS: {e}")))?
        .with_client_cert_verifier(verifier)
        .with_single_cert(certs, key)
        .map_err(|e| Error::Config(format!("{what}: TLS certificate and key: {e}")))?;
    config.alpn_protocols = vec![alpn.to_vec()];
    Ok(TlsAcceptor::from(Arc::new(config)))
}

/// Server-only TLS (no client certificates: the AWS KMS API authenticates each request with
/// SigV4), HTTP/1.1.
fn server_tls_acceptor(what: &str, cert: &PathBuf, key: &PathBuf) -> Result<TlsAcceptor> {
    use tokio_rustls::rustls::ServerConfig;

    let (certs, key) = certified_key(what, cert, key)?;
    let mut config = ServerConfig::builder_with_provider(tls_provider())
        .with_safe_default_protocol_versions()
        .map_err(|e| Error::Config(format!("{what}: TLS: {e}")))?
        .with_no_client_auth()
        .with_single_cert(certs, key)
        .map_err(|e| Error::Config(format!("{what}: TLS certificate and key: {e}")))?;
    config.alpn_protocols = vec![b"http/1.1".to_vec()];
    Ok(TlsAcceptor::from(Arc::new(config)))
}

/// The XKS listener's TLS: server-only, or, with `client_ca`, client certificates chaining
/// to it and (with `client_subject`) naming that common name; anything else ends the
/// handshake, as the specification requires.
fn xks_tls_acceptor(xks: &XksConfig) -> Result<TlsAcceptor> {
    let Some(client_ca) = &xks.client_ca else {
        return server_tls_acceptor("xks", &xks.cert, &xks.key);
    };
    let verifier = Arc::new(XksClientVerifier {
        chain: chain_verifier("xks", client_ca)?,
        common_name: xks.client_subject.clone(),
    });
    client_auth_acceptor("xks", &xks.cert, &xks.key, verifier, b"http/1.1")
}

/// The XKS listener's client certificate verifier: the chain (rustls's), then, when set, the
/// subject common name (AWS KMS's is `cks.kms.<region>.amazonaws.com`). Every refusal ends
/// the handshake with a `handshake_failure` alert, as AWS's XKS test client expects of a
/// proxy (rustls would name the reason, e.g. `unknown_ca`, otherwise).
#[derive(Debug)]
struct XksClientVerifier {
    chain: Arc<dyn tokio_rustls::rustls::server::danger::ClientCertVerifier>,
    common_name: Option<String>,
}

impl tokio_rustls::rustls::server::danger::ClientCertVerifier for XksClientVerifier {
    fn root_hint_subjects(&self) -> &[tokio_rustls::rustls::DistinguishedName] {
        self.chain.root_hint_subjects()
    }

    fn verify_client_cert(
        &self,
        end_entity: &tokio_rustls::rustls::pki_types::CertificateDer<'_>,
        intermediates: &[tokio_rustls::rustls::pki_types::CertificateDer<'_>],
        now: tokio_rustls::rustls::pki_types::UnixTime,
    ) -> std::result::Result<
        tokio_rustls::rustls::server::danger::ClientCertVerified,
        tokio_rustls::rustls::Error,
    > {
        // rustls answers `Error::General` with a `handshake_failure` alert.
        let refuse = |why: String| tokio_rustls::rustls::Error::General(why);
        let verified = self
            .chain
            .verify_client_cert(end_entity, intermediates, now)
            .map_err(|e| refuse(format!("client certificate refused: {e}")))?;
        let Some(expected) = &self.common_name else {
            return Ok(verified);
        };
        let (_, certificate) = x509_parser::parse_x509_certificate(end_entity)
            .map_err(|_| refuse("client certificate unreadable".into()))?;
        let mut names = certificate.subject().iter_common_name();
        let matches = names
            .next()
            .and_then(|cn| cn.as_str().ok())
            .is_some_and(|cn| cn == expected)
            && names.next().is_none();
        if matches {
            Ok(verified)
        } else {
            Err(refuse(format!(
                "the client certificate's subject is not CN={expected}"
            )))
        }
    }

    fn verify_tls12_signature(
        &self,
        message: &[u8],
        cert: &tokio_rustls::rustls::pki_types::CertificateDer<'_>,
        dss: &tokio_rustls::rustls::DigitallySignedStruct,
    ) -> std::result::Result<
        tokio_rustls::rustls::client::danger::HandshakeSignatureValid,
        tokio_rustls::rustls::Error,
    > {
        self.chain.verify_tls12_signature(message, cert, dss)
    }

    fn verify_tls13_signature(
        &self,
        message: &[u8],
        cert: &tokio_rustls::rustls::pki_types::CertificateDer<'_>,
        dss: &tokio_rustls::rustls::DigitallySignedStruct,
    ) -> std::result::Result<
        tokio_rustls::rustls::client::danger::HandshakeSignatureValid,
        tokio_rustls::rustls::Error,
    > {
        self.chain.verify_tls13_signature(message, cert, dss)
    }

    fn supported_verify_schemes(&self) -> Vec<tokio_rustls::rustls::SignatureScheme> {
        self.chain.supported_verify_schemes()
    }
}

/// The TLS crypto provider of every listener.
fn tls_provider() -> Arc<tokio_rustls::rustls::crypto::CryptoProvider> {
    Arc::new(tokio_rustls::rustls::crypto::ring::default_provider())
}

/// A file the listener `what` needs, read into zeroizing memory (it may be a private key).
fn read_listener_file(what: &str, path: &PathBuf) -> Result<Zeroizing<Vec<u8>>> {
    std::fs::read(path)
        .map(Zeroizing::new)
        .map_err(|e| Error::Config(format!("{what}: cannot read {}: {e}", path.display())))
}

/// A listener's certificate chain and private key, from PEM files.
fn certified_key(
    what: &str,
    cert: &PathBuf,
    key: &PathBuf,
) -> Result<(
    Vec<tokio_rustls::rustls::pki_types::CertificateDer<'static>>,
    tokio_rustls::rustls::pki_types::PrivateKeyDer<'static>,
)> {
    use tokio_rustls::rustls::pki_types::pem::PemObject;
    use tokio_rustls::rustls::pki_types::{CertificateDer, PrivateKeyDer};

    let pem = |path: &PathBuf, e: &dyn std::fmt::Display| {
        Error::Config(format!("{what}: {}: {e}", path.display()))
    };
    let certs = CertificateDer::pem_slice_iter(&read_listener_file(what, cert)?)
        .collect::<std::result::Result<Vec<_>, _>>()
        .map_err(|e| pem(cert, &e))?;
    let key =
        PrivateKeyDer::from_pem_slice(&read_listener_file(what, key)?).map_err(|e| pem(key, &e))?;
    Ok((certs, key))
}

/// The error of a config naming PostgreSQL in a build without it.
#[cfg(not(feature = "postgres"))]
pub fn without_postgres() -> Error {
    Error::Config(
        "store.postgres: this wrapd was built without the `postgres` feature (cargo build --features postgres)"
            .into(),
    )
}

/// Audit chain heads of one daemon of a fleet: chains are named `INSTANCE:PATH` in the
/// shared store, so that daemons with the same log path on different hosts keep their own.
#[cfg(feature = "postgres")]
struct InstanceHeads {
    store: Arc<PostgresStore>,
    instance: String,
}

#[cfg(feature = "postgres")]
impl HeadStore for InstanceHeads {
    fn audit_head(&self, chain: &str) -> Result<Option<crate::audit::ChainHead>> {
        self.store.audit_head(&format!("{}:{chain}", self.instance))
    }

    fn record_audit_head(&self, chain: &str, head: &crate::audit::ChainHead) -> Result<()> {
        self.store
            .record_audit_head(&format!("{}:{chain}", self.instance), head)
    }

    fn instance(&self) -> Option<&str> {
        Some(&self.instance)
    }
}

/// A listener's end, as text (the gRPC and HTTP servers have different error types).
async fn listener_result<E: std::fmt::Display>(
    served: impl Future<Output = std::result::Result<(), E>>,
) -> std::result::Result<(), String> {
    served.await.map_err(|e| e.to_string())
}

/// SIGHUP: reload the policy (a broken file keeps the old one) and reopen the audit log.
async fn hangup_task(
    mut hangup: tokio::signal::unix::Signal,
    policy: Arc<PolicyHandle>,
    audit: Option<Arc<AuditLog>>,
    xks: Option<(Arc<XksApi>, PathBuf)>,
) {
    while hangup.recv().await.is_some() {
        match policy.reload() {
            Ok(grants) => tracing::info!(grants, "SIGHUP: policy reloaded"),
            Err(err) => {
                tracing::error!(error = %err, "SIGHUP: the new policy is invalid; the previous one stays in force")
            }
        }
        if let Some((api, path)) = &xks {
            let path = path.clone();
            match tokio::task::spawn_blocking(move || Config::reload_xks(&path)).await {
                Ok(Ok(Some(config))) => {
                    api.reload(&config);
                    tracing::info!(
                        keystores = config.keystores.len(),
                        "SIGHUP: XKS key stores reloaded"
                    );
                }
                Ok(Ok(None)) => tracing::error!(
                    "SIGHUP: the config no longer has [xks]; the listener keeps its key stores until a restart"
                ),
                Ok(Err(err)) => tracing::error!(error = %err,
                    "SIGHUP: the [xks] section is invalid; the previous key stores stay in force"),
                Err(err) => tracing::error!(error = %err, "SIGHUP: the XKS reload failed"),
            }
        }
        if let Some(audit) = &audit {
            // Off the async threads: reopening syncs the old file and records the chain
            // head in the metadata store, whose PostgreSQL client blocks (on a runtime
            // thread it panicked, and a SIGHUP took a fleet daemon down).
            let audit = audit.clone();
            match tokio::task::spawn_blocking(move || audit.reopen()).await {
                Ok(Ok(())) => {}
                Ok(Err(err)) => {
                    tracing::error!(error = %err, "SIGHUP: cannot reopen the audit log")
                }
                Err(err) => tracing::error!(error = %err, "SIGHUP: the audit log reopen failed"),
            }
        }
    }
}

/// How often each daemon adds its version usage counts to the metadata store.
const USAGE_FLUSH_INTERVAL: Duration = Duration::from_secs(2);

/// Adds the version usage counted since the last time to the metadata store, every
/// [`USAGE_FLUSH_INTERVAL`] (and once more at shutdown, in `serve`).
async fn usage_task(keystore: Arc<Keystore>) {
    let mut ticker = tokio::time::interval(USAGE_FLUSH_INTERVAL);
    loop {
        ticker.tick().await;
        let keystore = keystore.clone();
        match tokio::task::spawn_blocking(move || keystore.flush_usage()).await {
            Ok(Ok(_)) => {}
            Ok(Err(err)) => {
                tracing::warn!(error = %err, "cannot store version usage counts; will retry")
            }
            Err(err) => tracing::warn!(error = %err, "version usage task failed"),
        }
    }
}

/// Keeps idle HSM sessions open ([`Pkcs11Token::keep_alive`]): every half keep-alive
/// interval, so that no session stays idle much longer than the interval. Returns at once
/// when the keep-alive is off.
async fn session_keepalive_task(token: Pkcs11Token) {
    let Some(interval) = token.session_keepalive() else {
        return;
    };
    let mut ticker = tokio::time::interval(interval / 2);
    ticker.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        ticker.tick().await;
        let token = token.clone();
        if let Err(err) = tokio::task::spawn_blocking(move || token.keep_alive()).await {
            tracing::warn!(error = %err, "session keep-alive task failed");
        }
    }
}

/// Records the audit chain's head in the metadata store every second (see
/// [`AuditLog::record_head`]): start-up then detects a log that lost lines up to then.
async fn audit_head_task(audit: Option<Arc<AuditLog>>) {
    let Some(audit) = audit else { return };
    let mut ticker = tokio::time::interval(AUDIT_HEAD_INTERVAL);
    loop {
        ticker.tick().await;
        let log = audit.clone();
        match tokio::task::spawn_blocking(move || log.record_head()).await {
            Ok(Ok(())) => {}
            Ok(Err(err)) => tracing::warn!(error = %err, "cannot record the audit chain head"),
            Err(err) => tracing::warn!(error = %err, "audit head task failed"),
        }
    }
}

async fn set_health(health: &HealthReporter, status: ServingStatus) {
    health.set_service_status("", status).await;
    health
        .set_service_status("wrapd.v1.DataKeyService", status)
        .await;
    health
        .set_service_status("wrapd.v1.KeyService", status)
        .await;
}

/// Destroys keys whose deletion date has passed, rotates keys whose automatic rotation is
/// due, destroys imported material past its expiry (each audited first) and the wrapping
/// keys of expired import tokens, and writes the summary line of unauthenticated refusals
/// that had none of their own, at start and then every `interval`.
async fn maintenance_task(
    ops: Ops,
    interval: Duration,
    retire_unused: Arc<Vec<crate::config::RetireUnused>>,
) {
    let mut ticker = tokio::time::interval(interval);
    loop {
        ticker.tick().await;
        if !retire_unused.is_empty() {
            let (retiring, rules) = (ops.clone(), retire_unused.clone());
            match tokio::task::spawn_blocking(move || retiring.retire_unused(&rules)).await {
                Ok(Ok(retired)) if !retired.is_empty() => {
                    tracing::info!(count = retired.len(), "unused key versions retired");
                }
                Ok(Ok(_)) => {}
                Ok(Err(err)) => {
                    tracing::error!(error = %err, "retiring unused versions failed; will retry")
                }
                Err(err) => tracing::error!(error = %err, "retirement task failed"),
            }
        }
        let rotating = ops.clone();
        match tokio::task::spawn_blocking(move || rotating.rotate_due()).await {
            Ok(Ok(rotated)) if !rotated.is_empty() => {
                tracing::info!(count = rotated.len(), "automatic rotations carried out");
            }
            Ok(Ok(_)) => {}
            Ok(Err(err)) => tracing::error!(error = %err, "automatic rotation failed; will retry"),
            Err(err) => tracing::error!(error = %err, "rotation task failed"),
        }
        let expiring = ops.clone();
        match tokio::task::spawn_blocking(move || expiring.expire_imports()).await {
            Ok(Ok(expired)) if !expired.is_empty() => {
                tracing::info!(count = expired.len(), "imported key material expired");
            }
            Ok(Ok(_)) => {}
            Ok(Err(err)) => tracing::error!(error = %err, "import expiry failed; will retry"),
            Err(err) => tracing::error!(error = %err, "import expiry task failed"),
        }
        let gate = ops.gate().clone();
        let _ = tokio::task::spawn_blocking(move || gate.summarize_refusals()).await;
        let ops = ops.clone();
        match tokio::task::spawn_blocking(move || ops.purge_due()).await {
            Ok(Ok(purged)) if !purged.keys.is_empty() || !purged.versions.is_empty() => {
                tracing::info!(
                    keys = purged.keys.len(),
                    versions = purged.versions.len(),
                    "scheduled deletions carried out"
                );
            }
            Ok(Ok(_)) => {}
            Ok(Err(err)) => tracing::error!(error = %err, "scheduled deletion failed; will retry"),
            Err(err) => tracing::error!(error = %err, "deletion task failed"),
        }
    }
}

/// The daemon's clock: the system's, or (only in builds with the `fault-injection`
/// feature, for tests) the system's moved by `WRAPD_FAULT_CLOCK_SKEW_S` seconds, so that a
/// test can let scheduled deletions and expiries fall due across restarts.
fn daemon_clock() -> Arc<dyn crate::keystore::Clock> {
    #[cfg(feature = "fault-injection")]
    if let Some(skew) = std::env::var("WRAPD_FAULT_CLOCK_SKEW_S")
        .ok()
        .and_then(|s| s.parse::<u64>().ok())
    {
        tracing::warn!(
            skew_s = skew,
            "fault injection: the daemon's clock runs ahead"
        );
        return Arc::new(SkewedClock(std::time::Duration::from_secs(skew)));
    }
    Arc::new(SystemClock)
}

/// The system clock moved ahead (fault injection).
#[cfg(feature = "fault-injection")]
struct SkewedClock(std::time::Duration);

#[cfg(feature = "fault-injection")]
impl crate::keystore::Clock for SkewedClock {
    fn now(&self) -> std::time::SystemTime {
        std::time::SystemTime::now() + self.0
    }
}

/// Reports NOT_SERVING on the health service while the token does not answer or the audit
/// log cannot be written.
async fn health_task(
    keystore: Arc<Keystore>,
    health: HealthReporter,
    mut audit: Option<watch::Receiver<bool>>,
) {
    let mut ticker = tokio::time::interval(HEALTH_CHECK_INTERVAL);
    let mut token_ok = true;
    let mut serving = true;
    loop {
        let audit_changed = async {
            match audit.as_mut() {
                Some(rx) => rx.changed().await.is_ok(),
                None => std::future::pending().await,
            }
        };
        tokio::select! {
            _ = ticker.tick() => {
                let ks = keystore.clone();
                token_ok = matches!(
                    tokio::task::spawn_blocking(move || ks.probe()).await,
                    Ok(Ok(()))
                );
            }
            open = audit_changed => {
                if !open {
                    audit = None;
                }
            }
        }
        let audit_ok = audit.as_ref().is_none_or(|rx| *rx.borrow());
        let ok = token_ok && audit_ok;
        if ok != serving {
            serving = ok;
            if ok {
                tracing::info!("SERVING again");
                set_health(&health, ServingStatus::Serving).await;
            } else {
                tracing::error!(token_ok, audit_ok, "NOT_SERVING");
                set_health(&health, ServingStatus::NotServing).await;
            }
        }
    }
}

/// Registers SIGTERM and SIGINT (ctrl-c) handlers now, and returns a future that resolves
/// when either arrives. Registering before the ready line is printed means a supervisor's
/// early SIGTERM is always a graceful shutdown, never the default kill.
pub fn shutdown_signal() -> Result<impl Future<Output = ()> + Send + 'static> {
    use tokio::signal::unix::{SignalKind, signal};
    let register = |kind: SignalKind, name: &str| {
        signal(kind).map_err(|e| Error::Internal(format!("cannot listen for {name}: {e}")))
    };
    let mut term = register(SignalKind::terminate(), "SIGTERM")?;
    let mut int = register(SignalKind::interrupt(), "SIGINT")?;
    Ok(async move {
        tokio::select! {
            _ = term.recv() => tracing::info!("SIGTERM: shutting down"),
            _ = int.recv() => tracing::info!("ctrl-c: shutting down"),
        }
    })
}
