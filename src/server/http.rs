//! The HTTPS listener of the AWS KMS JSON API: HTTP/1.1 (what the AWS SDKs speak to KMS)
//! over the same TLS accept loop as the gRPC listener (`listen.rs`: connection cap,
//! handshake timeout, idle timeout, keepalive), without client certificates: callers
//! authenticate each request with SigV4 instead.
//!
//! Each connection is served by hyper; a request's body is read up to
//! [`crate::front::aws::MAX_BODY`] bytes (larger: 413) before the front end sees it, since
//! the signature covers the body. Headers must arrive within the handshake timeout, and the
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
use crate::front::aws::{AwsApi, AwsError, MAX_BODY};

/// Largest request head (request line and headers) read.
const MAX_HEAD: usize = 64 * 1024;

/// Serves `api` on the connections of `incoming` until `stopped` resolves; then lets the
/// requests in flight finish (the caller bounds the wait).
pub async fn serve(
    mut incoming: Incoming<TlsConnection>,
    api: Arc<AwsApi>,
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
                    tracing::debug!(error = %err, "AWS KMS API: connection failed");
                    continue;
                }
                None => break,
            },
        };
        let remote = connection.get_ref().0.remote_addr();
        let api = api.clone();
        let service = service_fn(move |request: Request<Body>| {
            let api = api.clone();
            async move { Ok::<_, Infallible>(answer(&api, request, remote, header_timeout).await) }
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
                tracing::debug!(error = %err, "AWS KMS API: connection ended with an error");
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
async fn answer(
    api: &AwsApi,
    request: Request<Body>,
    remote: Option<SocketAddr>,
    body_timeout: Duration,
) -> Response<Full<Bytes>> {
    let (parts, body) = request.into_parts();
    let read = tokio::time::timeout(body_timeout, Limited::new(body, MAX_BODY).collect()).await;
    let Ok(read) = read else {
        let mut response = AwsError::new(
            "RequestTimeoutException",
            StatusCode::REQUEST_TIMEOUT,
            format!(
                "the request body did not arrive within {} ms",
                body_timeout.as_millis()
            ),
        )
        .response("-")
        .map(Full::new);
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
            let error = if too_large {
                AwsError::new(
                    "ValidationException",
                    StatusCode::PAYLOAD_TOO_LARGE,
                    format!("the request body is larger than {MAX_BODY} bytes"),
                )
            } else {
                AwsError::validation("the request body could not be read")
            };
            return error.response("-").map(Full::new);
        }
    };
    api.handle(Request::from_parts(parts, body), remote)
        .await
        .map(Full::new)
}
