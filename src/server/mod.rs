//! The daemon: opens the token and the metadata store, serves the gRPC services (plus
//! health and reflection) on its listeners, runs the background tasks, and shuts down
//! gracefully.
//!
//! `unix.rs` binds the unix socket; `logging.rs` sets up `tracing`.

mod logging;
mod unix;

use std::future::Future;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use std::net::SocketAddr;

use tokio::net::TcpListener;
use tokio::sync::watch;
use tokio::task::JoinSet;
use tokio_stream::wrappers::{TcpListenerStream, UnixListenerStream};
use tonic::transport::server::Router;
use tonic::transport::{Certificate, Identity, Server, ServerTlsConfig};
use tonic_health::ServingStatus;
use tonic_health::pb::health_server::{Health, HealthServer};
use tonic_health::server::HealthReporter;
use zeroize::Zeroizing;

pub use logging::init_logging;
pub use unix::bind_unix_socket;

use crate::audit::{AuditLog, HeadStore};
use crate::auth::PolicyHandle;
use crate::config::{Config, KmsConfig, TcpListenerConfig, UnixListenerConfig};
use crate::error::{Error, Result};
use crate::hsm::Pkcs11Token;
use crate::keystore::{Keystore, SqliteStore, SystemClock};
use crate::kms_proto::key_management_service_server::KeyManagementServiceServer;
use crate::proto::data_key_service_server::DataKeyServiceServer;
use crate::proto::key_service_server::KeyServiceServer;
use crate::service::{DataKeyApi, Gate, KeyApi, KmsApi};

/// Largest request `wrapd.v1` decodes: the largest valid one (ReWrap with two 8 KiB contexts
/// and a 4 KiB blob) is about 25 KiB, so anything far larger is refused before it costs memory.
const API_MAX_MESSAGE: usize = 256 * 1024;

/// Largest message the KMS plugin socket decodes.
const KMS_MAX_MESSAGE: usize = 64 * 1024;

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
}

impl Ready {
    /// The ready line printed on stdout: `wrapd ready socket=PATH tcp=ADDR kms=PATH`.
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
        line
    }
}

/// An opened daemon, ready to serve.
pub struct Daemon {
    unix: Option<UnixListenerConfig>,
    tcp: Option<TcpListenerConfig>,
    kms: Option<KmsConfig>,
    deletion_check_interval: Duration,
    token: Pkcs11Token,
    keystore: Arc<Keystore>,
    policy: Arc<PolicyHandle>,
    audit: Option<Arc<AuditLog>>,
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
            sqlite,
            unix,
            tcp,
            policy_file,
            audit,
            kms,
            keystore,
            deletion_check_interval,
            ..
        } = config;
        if policy_file.is_none() {
            tracing::warn!("no [policy] configured: every call will be denied");
        }
        let policy = Arc::new(PolicyHandle::load(policy_file)?);
        tracing::info!(grants = policy.current().len(), "policy loaded");
        let store = Arc::new(SqliteStore::open(&sqlite)?);
        let audit = match audit {
            Some(audit) => Some(Arc::new(AuditLog::open_anchored(
                &audit.file,
                audit.fsync,
                Some(store.clone() as Arc<dyn HeadStore>),
                audit.gaps,
            )?)),
            None => {
                tracing::warn!("no [audit] configured: key operations are not audited");
                None
            }
        };
        let token = Pkcs11Token::open(hsm)?;
        let keystore = Keystore::open(
            Arc::new(token.clone()),
            store,
            Arc::new(SystemClock),
            keystore,
        )?;
        Ok(Self {
            unix,
            tcp,
            kms,
            deletion_check_interval,
            token,
            keystore: Arc::new(keystore),
            policy,
            audit,
        })
    }

    /// The key store (for in-process use such as benchmarks).
    pub fn keystore(&self) -> &Arc<Keystore> {
        &self.keystore
    }

    fn router(
        &self,
        gate: &Arc<Gate>,
        health: &HealthServer<impl Health>,
        tls: Option<ServerTlsConfig>,
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
        let mut builder = Server::builder();
        if let Some(tls) = tls {
            builder = builder
                .tls_config(tls)
                .map_err(|e| Error::Config(format!("tcp: TLS configuration: {e}")))?;
        }
        Ok(builder
            .add_service(health.clone())
            .add_service(reflection_v1)
            .add_service(reflection_v1alpha)
            .add_service(
                DataKeyServiceServer::new(DataKeyApi::new(self.keystore.clone(), gate.clone()))
                    .max_decoding_message_size(API_MAX_MESSAGE),
            )
            .add_service(
                KeyServiceServer::new(KeyApi::new(self.keystore.clone(), gate.clone()))
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
        let gate = Arc::new(Gate::new(self.policy.clone(), self.audit.clone()));
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
        };
        if let Some(unix) = &self.unix {
            let listener = bind_unix_socket(&unix.path, unix.mode)?;
            let router = self.router(&gate, &health_service, None)?;
            servers.spawn(
                router.serve_with_incoming_shutdown(UnixListenerStream::new(listener), stopped()),
            );
            ready.socket = Some(unix.path.clone());
        }
        if let Some(tcp) = &self.tcp {
            let tls = tls_config(tcp)?;
            let listener = TcpListener::bind(tcp.listen)
                .await
                .map_err(|e| Error::Config(format!("cannot bind {}: {e}", tcp.listen)))?;
            let addr = listener
                .local_addr()
                .map_err(|e| Error::Config(format!("tcp listener: {e}")))?;
            let router = self.router(&gate, &health_service, Some(tls))?;
            servers.spawn(
                router.serve_with_incoming_shutdown(TcpListenerStream::new(listener), stopped()),
            );
            ready.tcp = Some(addr);
        }

        if let Some(kms) = &self.kms {
            let listener = bind_unix_socket(&kms.socket.path, kms.socket.mode)?;
            let api = KmsApi::new(
                self.keystore.clone(),
                gate.clone(),
                kms.key.clone(),
                kms.principal.clone(),
                kms.healthz_cache,
            );
            // The KMS v2 API's messages are small: refuse anything far larger.
            let service =
                KeyManagementServiceServer::new(api).max_decoding_message_size(KMS_MAX_MESSAGE);
            let router = Server::builder().add_service(service);
            servers.spawn(
                router.serve_with_incoming_shutdown(UnixListenerStream::new(listener), stopped()),
            );
            ready.kms = Some(kms.socket.path.clone());
        }

        let background = [
            tokio::spawn(deletion_task(
                self.keystore.clone(),
                self.deletion_check_interval,
            )),
            tokio::spawn(health_task(
                self.keystore.clone(),
                health.clone(),
                self.audit.as_ref().map(|a| a.subscribe()),
            )),
            tokio::spawn(hangup_task(hangup, self.policy.clone(), self.audit.clone())),
            tokio::spawn(audit_head_task(self.audit.clone())),
        ];

        on_ready(&ready);
        tracing::info!(socket = ?ready.socket, tcp = ?ready.tcp, "serving");

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
        if let Some(audit) = &self.audit {
            let audit = audit.clone();
            match tokio::task::spawn_blocking(move || audit.close()).await {
                Ok(Ok(())) => {}
                Ok(Err(err)) => tracing::error!(error = %err, "closing the audit log"),
                Err(err) => tracing::error!(error = %err, "closing the audit log"),
            }
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
fn tls_config(tcp: &TcpListenerConfig) -> Result<ServerTlsConfig> {
    let read = |path: &PathBuf| {
        std::fs::read(path)
            .map(Zeroizing::new)
            .map_err(|e| Error::Config(format!("tcp: cannot read {}: {e}", path.display())))
    };
    let cert = read(&tcp.cert)?;
    let key = read(&tcp.key)?;
    let ca = read(&tcp.client_ca)?;
    Ok(ServerTlsConfig::new()
        .identity(Identity::from_pem(&*cert, &*key))
        .client_ca_root(Certificate::from_pem(&*ca)))
}

/// SIGHUP: reload the policy (a broken file keeps the old one) and reopen the audit log.
async fn hangup_task(
    mut hangup: tokio::signal::unix::Signal,
    policy: Arc<PolicyHandle>,
    audit: Option<Arc<AuditLog>>,
) {
    while hangup.recv().await.is_some() {
        match policy.reload() {
            Ok(grants) => tracing::info!(grants, "SIGHUP: policy reloaded"),
            Err(err) => {
                tracing::error!(error = %err, "SIGHUP: the new policy is invalid; the previous one stays in force")
            }
        }
        if let Some(audit) = &audit {
            if let Err(err) = audit.reopen() {
                tracing::error!(error = %err, "SIGHUP: cannot reopen the audit log");
            }
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

/// Destroys keys whose deletion date has passed, at start and then every `interval`.
async fn deletion_task(keystore: Arc<Keystore>, interval: Duration) {
    let mut ticker = tokio::time::interval(interval);
    loop {
        ticker.tick().await;
        let ks = keystore.clone();
        match tokio::task::spawn_blocking(move || ks.purge_due()).await {
            Ok(Ok(purged)) if !purged.is_empty() => {
                tracing::info!(count = purged.len(), "scheduled deletions carried out");
            }
            Ok(Ok(_)) => {}
            Ok(Err(err)) => tracing::error!(error = %err, "scheduled deletion failed; will retry"),
            Err(err) => tracing::error!(error = %err, "deletion task failed"),
        }
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
