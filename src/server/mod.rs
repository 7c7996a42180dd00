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

use tokio_stream::wrappers::UnixListenerStream;
use tonic::transport::Server;
use tonic_health::ServingStatus;
use tonic_health::server::HealthReporter;

pub use logging::init_logging;
pub use unix::bind_unix_socket;

use crate::config::{Config, UnixListenerConfig};
use crate::error::{Error, Result};
use crate::hsm::Pkcs11Token;
use crate::keystore::{Keystore, SqliteStore, SystemClock};
use crate::proto::data_key_service_server::DataKeyServiceServer;
use crate::proto::key_service_server::KeyServiceServer;
use crate::service::{DataKeyApi, KeyApi};

/// How long a graceful shutdown waits for in-flight calls.
const DRAIN_TIMEOUT: Duration = Duration::from_secs(10);

/// How often the health task checks the token.
const HEALTH_CHECK_INTERVAL: Duration = Duration::from_secs(5);

/// Where the daemon serves, reported once it is ready.
#[derive(Debug, Clone)]
pub struct Ready {
    /// The unix socket path.
    pub socket: Option<PathBuf>,
}

impl Ready {
    /// The ready line printed on stdout: `wrapd ready socket=PATH`.
    pub fn line(&self) -> String {
        let mut line = "wrapd ready".to_owned();
        if let Some(socket) = &self.socket {
            line.push_str(&format!(" socket={}", socket.display()));
        }
        line
    }
}

/// An opened daemon, ready to serve.
pub struct Daemon {
    unix: Option<UnixListenerConfig>,
    deletion_check_interval: Duration,
    token: Pkcs11Token,
    keystore: Arc<Keystore>,
}

impl Daemon {
    /// Opens the token (checking module, token label and PIN), the metadata store, and
    /// reconciles them.
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
            keystore,
            deletion_check_interval,
            ..
        } = config;
        let token = Pkcs11Token::open(hsm)?;
        let store = SqliteStore::open(&sqlite)?;
        let keystore = Keystore::open(
            Arc::new(token.clone()),
            Arc::new(store),
            Arc::new(SystemClock),
            keystore,
        )?;
        Ok(Self {
            unix,
            deletion_check_interval,
            token,
            keystore: Arc::new(keystore),
        })
    }

    /// The key store (for in-process use such as benchmarks).
    pub fn keystore(&self) -> &Arc<Keystore> {
        &self.keystore
    }

    /// Serves until `shutdown` resolves, then stops accepting, lets in-flight calls finish
    /// and closes the HSM sessions. `on_ready` runs once every listener is bound.
    pub async fn serve(
        self,
        shutdown: impl Future<Output = ()> + Send + 'static,
        on_ready: impl FnOnce(&Ready),
    ) -> Result<()> {
        let (health, health_service) = tonic_health::server::health_reporter();
        set_health(&health, ServingStatus::Serving).await;
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

        let router = Server::builder()
            .add_service(health_service)
            .add_service(reflection_v1)
            .add_service(reflection_v1alpha)
            .add_service(DataKeyServiceServer::new(DataKeyApi::new(
                self.keystore.clone(),
            )))
            .add_service(KeyServiceServer::new(KeyApi::new(self.keystore.clone())));

        let unix = self
            .unix
            .clone()
            .ok_or_else(|| Error::Config("no listener configured".into()))?;
        let listener = bind_unix_socket(&unix.path, unix.mode)?;

        let background = [
            tokio::spawn(deletion_task(
                self.keystore.clone(),
                self.deletion_check_interval,
            )),
            tokio::spawn(health_task(self.keystore.clone(), health.clone())),
        ];

        on_ready(&Ready {
            socket: Some(unix.path.clone()),
        });
        tracing::info!(socket = %unix.path.display(), "serving");

        // Stop accepting on the signal, then give in-flight calls DRAIN_TIMEOUT to finish:
        // a client that never reads its GOAWAY must not keep the daemon up forever.
        let (stop_tx, stop_rx) = tokio::sync::oneshot::channel::<()>();
        let server =
            router.serve_with_incoming_shutdown(UnixListenerStream::new(listener), async {
                let _ = stop_rx.await;
            });
        tokio::pin!(server);
        let served = tokio::select! {
            served = &mut server => served,
            () = shutdown => {
                tracing::info!("draining in-flight calls");
                let _ = stop_tx.send(());
                match tokio::time::timeout(DRAIN_TIMEOUT, &mut server).await {
                    Ok(served) => served,
                    Err(_) => {
                        tracing::warn!(seconds = DRAIN_TIMEOUT.as_secs(), "connections still open after the drain timeout; closing them");
                        Ok(())
                    }
                }
            }
        };
        for task in background {
            task.abort();
        }
        set_health(&health, ServingStatus::NotServing).await;
        if let Err(err) = std::fs::remove_file(&unix.path) {
            tracing::debug!(error = %err, "could not remove the socket file");
        }
        self.token.close();
        tracing::info!("stopped");
        served.map_err(|e| Error::Internal(format!("server: {e}")))
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

/// Reports NOT_SERVING on the health service while the token does not answer.
async fn health_task(keystore: Arc<Keystore>, health: HealthReporter) {
    let mut ticker = tokio::time::interval(HEALTH_CHECK_INTERVAL);
    let mut serving = true;
    loop {
        ticker.tick().await;
        let ks = keystore.clone();
        let ok = matches!(
            tokio::task::spawn_blocking(move || ks.token().ping()).await,
            Ok(Ok(()))
        );
        if ok != serving {
            serving = ok;
            if ok {
                tracing::info!("token reachable again: SERVING");
                set_health(&health, ServingStatus::Serving).await;
            } else {
                tracing::error!("token unreachable: NOT_SERVING");
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
