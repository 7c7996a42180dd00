//! The HTTPS listeners of the AWS KMS JSON API and the XKS proxy API ([`HttpsFront`]):
//! HTTP/1.1 (what the AWS SDKs speak to KMS, and AWS KMS to a proxy) over the same TLS
//! accept loop as the gRPC listener (`listen.rs`: connection cap, handshake timeout, idle
//! timeout, keepalive). Callers authenticate each request with SigV4 (the XKS listener may
//! also require a client certificate).
//!
//! Each connection is served by hyper; a request's body is read up to the front end's
//! [`HttpsFront::MAX_BODY`] bytes (larger: 413) before the front end sees it, since the
//! signature covers the body. Headers must arrive within the handshake timeout, and the
//! body within the same time again: a body trickled a byte at a time would otherwise hold
//! its connection (and a slot of the listener's cap) for as long as the idle timer allows.
//! A late body is answered `408 RequestTimeoutException` and its connection closed.

use std::convert::Infallible;
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use http::{Request, Response, StatusCode};
use http_body_util::{BodyExt, Full, Limited};
use hyper::body::Incoming as Body;
use hyper::service::service_fn;
use hyper_util::rt::{TokioIo, TokioTimer};
use hyper_util::server::graceful::GracefulShutdown;
use tokio_stream::StreamExt;

use super::listen::{Incoming, TlsConnection};
use crate::front::aws::{self, AwsApi, AwsError};
use crate::front::xks::{self, XksApi, XksError};

/// Why a request's body was not read.
#[derive(Debug, Clone, Copy)]
pub enum BodyRefusal {
    /// It did not arrive within the time it had.
    Late(Duration),
    /// It is larger than the front end takes.
    TooLarge,
    /// It could not be read.
    Unreadable,
}

/// A front end served over HTTPS by [`serve`].
pub trait HttpsFront: Send + Sync + 'static {
    /// Its name, for the daemon's log.
    const NAME: &'static str;
    /// The largest request body it reads.
    const MAX_BODY: usize;
    /// Answers one request whose body has been read.
    fn handle(
        &self,
        request: Request<Bytes>,
        remote: Option<SocketAddr>,
    ) -> impl std::future::Future<Output = Response<Bytes>> + Send;
    /// The answer to a request whose body was not read, in the front end's error form.
    fn refuse(&self, refusal: BodyRefusal) -> Response<Bytes>;
}

impl HttpsFront for AwsApi {
    const NAME: &'static str = "AWS KMS API";
    const MAX_BODY: usize = aws::MAX_BODY;

    fn handle(
        &self,
        request: Request<Bytes>,
        remote: Option<SocketAddr>,
    ) -> impl std::future::Future<Output = Response<Bytes>> + Send {
        AwsApi::handle(self, request, remote)
    }

    fn refuse(&self, refusal: BodyRefusal) -> Response<Bytes> {
        let error = match refusal {
            BodyRefusal::Late(limit) => AwsError::new(
                "RequestTimeoutException",
                StatusCode::REQUEST_TIMEOUT,
                late(limit),
            ),
            BodyRefusal::TooLarge => AwsError::new(
                "ValidationException",
                StatusCode::PAYLOAD_TOO_LARGE,
                too_large(Self::MAX_BODY),
            ),
            BodyRefusal::Unreadable => AwsError::validation("the request body could not be read"),
        };
        error.response("-")
    }
}

impl HttpsFront for XksApi {
    const NAME: &'static str = "XKS proxy API";
    const MAX_BODY: usize = xks::MAX_BODY;

    fn handle(
        &self,
        request: Request<Bytes>,
        remote: Option<SocketAddr>,
    ) -> impl std::future::Future<Output = Response<Bytes>> + Send {
        XksApi::handle(self, request, remote)
    }

    fn refuse(&self, refusal: BodyRefusal) -> Response<Bytes> {
        let error = match refusal {
            // The specification's statuses for its error names (the connection of a late
            // body is closed all the same).
            BodyRefusal::Late(limit) => XksError::validation(late(limit)),
            BodyRefusal::TooLarge => XksError::new(
                "UnsupportedOperationException",
                StatusCode::NOT_IMPLEMENTED,
                too_large(Self::MAX_BODY),
            ),
            BodyRefusal::Unreadable => XksError::validation("the request body could not be read"),
        };
        error.response()
    }
}

fn late(limit: Duration) -> String {
    format!(
        "the request body did not arrive within {} ms",
        limit.as_millis()
    )
}

fn too_large(limit: usize) -> String {
    format!("the request body is larger than {limit} bytes")
}

/// Largest request head (request line and headers) read.
const MAX_HEAD: usize = 64 * 1024;

/// Serves `api` on the connections of `incoming` until `stopped` resolves; then lets the
/// requests in flight finish (the caller bounds the wait).
pub async fn serve<F: HttpsFront>(
    mut incoming: Incoming<TlsConnection>,
    api: Arc<F>,
    header_timeout: Duration,
    stopped: impl std::future::Future<Output = ()>,
) -> std::io::Result<()> {
    let graceful = GracefulShutdown::new();
    tokio::pin!(stopped);
    loop {
        let connection = tokio::select! {
            () = &mut stopped => break,
            next = incoming.next() => match next {
                Some(Ok(connection)) => connection,
                Some(Err(err)) => {
                    tracing::debug!(error = %err, listener = F::NAME, "connection failed");
                    continue;
                }
                None => break,
            },
        };
        let remote = connection.get_ref().0.remote_addr();
        let api = api.clone();
        let service = service_fn(move |request: Request<Body>| {
            let api = api.clone();
            async move { Ok::<_, Infallible>(answer(&*api, request, remote, header_timeout).await) }
        });
        let mut http1 = hyper::server::conn::http1::Builder::new();
        http1
            .timer(TokioTimer::new())
            .header_read_timeout(header_timeout)
            .max_buf_size(MAX_HEAD);
        let served = http1.serve_connection(TokioIo::new(connection), service);
        let watched = graceful.watch(served);
        tokio::spawn(async move {
            if let Err(err) = watched.await {
                tracing::debug!(error = %err, listener = F::NAME, "connection ended with an error");
            }
        });
    }
    graceful.shutdown().await;
    Ok(())
}

/// Serves Prometheus metrics (`GET /metrics`, plain HTTP/1.1) on `listener` until
/// `stopped` resolves. At most 16 connections at once (scrapers are few).
pub async fn serve_metrics(
    listener: tokio::net::TcpListener,
    metrics: super::prometheus::Metrics,
    header_timeout: Duration,
    stopped: impl std::future::Future<Output = ()>,
) -> std::io::Result<()> {
    let slots = Arc::new(tokio::sync::Semaphore::new(16));
    tokio::pin!(stopped);
    loop {
        let (stream, _) = tokio::select! {
            () = &mut stopped => return Ok(()),
            accepted = listener.accept() => match accepted {
                Ok(accepted) => accepted,
                Err(err) => {
                    tracing::debug!(error = %err, "metrics: accept failed");
                    tokio::time::sleep(Duration::from_millis(100)).await;
                    continue;
                }
            },
        };
        let Ok(slot) = slots.clone().try_acquire_owned() else {
            continue; // dropped: too many scrapers at once
        };
        let metrics = metrics.clone();
        let service = service_fn(move |request: Request<Body>| {
            let metrics = metrics.clone();
            async move {
                let response = if request.uri().path() == "/metrics" {
                    let text = tokio::task::spawn_blocking(move || metrics.render())
                        .await
                        .unwrap_or_default();
                    let mut response = Response::new(Full::new(Bytes::from(text)));
                    response.headers_mut().insert(
                        http::header::CONTENT_TYPE,
                        http::HeaderValue::from_static("text/plain; version=0.0.4"),
                    );
                    response
                } else {
                    let mut response = Response::new(Full::new(Bytes::from_static(b"not found\n")));
                    *response.status_mut() = StatusCode::NOT_FOUND;
                    response
                };
                Ok::<_, Infallible>(response)
            }
        });
        let mut http1 = hyper::server::conn::http1::Builder::new();
        http1
            .timer(TokioTimer::new())
            .header_read_timeout(header_timeout)
            .max_buf_size(MAX_HEAD);
        let served = http1.serve_connection(TokioIo::new(stream), service);
        tokio::spawn(async move {
            let _slot = slot;
            let _ = tokio::time::timeout(Duration::from_secs(60), served).await;
        });
    }
}

/// Reads the body (bounded in size, and in time by `body_timeout`) and hands the request to
/// the API.
async fn answer<F: HttpsFront>(
    api: &F,
    request: Request<Body>,
    remote: Option<SocketAddr>,
    body_timeout: Duration,
) -> Response<Full<Bytes>> {
    let (parts, body) = request.into_parts();
    let read = tokio::time::timeout(body_timeout, Limited::new(body, F::MAX_BODY).collect()).await;
    let Ok(read) = read else {
        let mut response = api.refuse(BodyRefusal::Late(body_timeout)).map(Full::new);
        response.headers_mut().insert(
            http::header::CONNECTION,
            http::HeaderValue::from_static("close"),
        );
        return response;
    };
    let body = match read {
        Ok(collected) => collected.to_bytes(),
        Err(err) => {
            let too_large = err
                .downcast_ref::<http_body_util::LengthLimitError>()
                .is_some();
            let refusal = if too_large {
                BodyRefusal::TooLarge
            } else {
                BodyRefusal::Unreadable
            };
            return api.refuse(refusal).map(Full::new);
        }
    };
    api.handle(Request::from_parts(parts, body), remote)
        .await
        .map(Full::new)
}
