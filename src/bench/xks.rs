//! The XKS proxy API in `wrapd bench` (`--op xks-encrypt`): callers that speak it as AWS
//! KMS does (HTTPS, HTTP/1.1 keep-alive, each request signed with SigV4 by `aws-sigv4`), and
//! its echo: the same HTTPS listener code (`server::http`, the same TLS accept loop) with a
//! front end that answers every request with a fixed Encrypt answer, so that the ceiling is
//! what a daemon that did nothing but HTTPS and the token call would reach. AWS KMS gives up
//! on a proxy after 250 ms; the p99 at 64 callers is the figure to watch.

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::{Duration, Instant, SystemTime};

use aws_credential_types::Credentials;
use aws_sigv4::http_request::{SignableBody, SignableRequest, SigningSettings, sign};
use aws_sigv4::sign::v4;
use bytes::Bytes;
use hdrhistogram::Histogram;
use http::{Request, Response, StatusCode};
use http_body_util::{BodyExt, Full};
use hyper_util::rt::TokioIo;
use tokio_rustls::TlsConnector;
use tokio_rustls::rustls::client::danger::{
    HandshakeSignatureValid, ServerCertVerified, ServerCertVerifier,
};
use tokio_rustls::rustls::crypto::{
    CryptoProvider, verify_tls12_signature, verify_tls13_signature,
};
use tokio_rustls::rustls::pki_types::pem::PemObject;
use tokio_rustls::rustls::pki_types::{CertificateDer, PrivateKeyDer, ServerName, UnixTime};
use tokio_rustls::rustls::{ClientConfig, DigitallySignedStruct, SignatureScheme};
use zeroize::Zeroizing;

use super::{histogram, tally};
use crate::config::{Limits, XksConfig};
use crate::error::{Error, Result};
use crate::front::xks::{SERVICE, model};
use crate::server::http::{BodyRefusal, HttpsFront};

/// Where and how to call an XKS listener: its address, the certificate it must present
/// (pinned), a key store's path, scope and credential, and the key.
#[derive(Clone)]
pub struct XksEndpoint {
    addr: SocketAddr,
    tls: TlsConnector,
    path: String,
    region: String,
    credential: Option<(String, Zeroizing<String>)>,
}

impl XksEndpoint {
    /// The daemon's listener at `addr` (its configured address, or the one its ready line
    /// gave when it listens on port 0), through `config`'s first key store and credential,
    /// for `key` (the `externalKeyId`).
    pub fn daemon(addr: SocketAddr, config: &XksConfig, key: &str) -> Result<Self> {
        let store = config
            .keystores
            .first()
            .ok_or_else(|| Error::Config("the [xks] section has no key store to bench".into()))?;
        let credential = store
            .credentials
            .first()
            .ok_or_else(|| Error::Config("the key store has no credential".into()))?;
        let pem = std::fs::read(&config.cert)
            .map_err(|e| Error::Config(format!("{}: {e}", config.cert.display())))?;
        let cert = CertificateDer::pem_slice_iter(&pem)
            .next()
            .ok_or_else(|| Error::Config(format!("{}: no certificate", config.cert.display())))?
            .map_err(|e| Error::Config(format!("{}: {e}", config.cert.display())))?;
        let prefix = if store.uri_prefix.is_empty() {
            String::new()
        } else {
            format!("/{}", store.uri_prefix)
        };
        Ok(Self {
            addr,
            tls: pinned(cert),
            path: format!("{prefix}/kms/xks/v1/keys/{key}/encrypt"),
            region: store.region.clone(),
            credential: Some((credential.id.clone(), credential.secret.clone())),
        })
    }

    /// One request: the Encrypt body, signed for now.
    fn request(&self, body: &Bytes) -> Result<Request<Full<Bytes>>> {
        let authority = self.addr.to_string();
        let mut request = Request::post(&self.path)
            .header(http::header::HOST, &authority)
            .header(http::header::CONTENT_TYPE, "application/json")
            .body(Full::new(body.clone()))
            .map_err(|e| Error::Internal(e.to_string()))?;
        let Some((id, secret)) = &self.credential else {
            return Ok(request);
        };
        let identity = Credentials::new(id.as_str(), secret.as_str(), None, None, "bench").into();
        let params = v4::SigningParams::builder()
            .identity(&identity)
            .region(&self.region)
            .name(SERVICE)
            .time(SystemTime::now())
            .settings(SigningSettings::default())
            .build()
            .map_err(|e| Error::Internal(e.to_string()))?
            .into();
        let uri = format!("https://{authority}{}", self.path);
        let headers = [
            ("host", authority.as_str()),
            ("content-type", "application/json"),
        ];
        let signable =
            SignableRequest::new("POST", uri, headers.into_iter(), SignableBody::Bytes(body))
                .map_err(|e| Error::Internal(e.to_string()))?;
        let (instructions, _) = sign(signable, &params)
            .map_err(|e| Error::Internal(e.to_string()))?
            .into_parts();
        for (name, value) in instructions.headers() {
            let name = http::HeaderName::from_bytes(name.as_bytes())
                .map_err(|e| Error::Internal(e.to_string()))?;
            let value =
                http::HeaderValue::from_str(value).map_err(|e| Error::Internal(e.to_string()))?;
            request.headers_mut().insert(name, value);
        }
        Ok(request)
    }
}

/// The Encrypt body every caller sends: a 32-byte data key with an AAD and an integrity
/// value, as AWS KMS asks for a GenerateDataKey.
pub fn encrypt_body() -> Bytes {
    use base64::Engine;
    let b64 = base64::engine::general_purpose::STANDARD;
    Bytes::from(
        serde_json::json!({
            "requestMetadata": {
                "awsPrincipalArn": "arn:aws:iam::111122223333:role/bench",
                "kmsKeyArn": "arn:aws:kms:us-east-1:111122223333:key/bench",
                "kmsOperation": "GenerateDataKey",
                "kmsRequestId": "bench",
                "kmsViaService": "s3",
            },
            "plaintext": b64.encode([7u8; 32]),
            "additionalAuthenticatedData": b64.encode(b"wrapd bench"),
            "encryptionAlgorithm": "AES_GCM",
            "ciphertextDataIntegrityValueAlgorithm": "SHA_256",
        })
        .to_string(),
    )
}

/// The AAD the token gets for the bench's Encrypt with key version `version`.
pub fn token_aad(version: u32) -> Vec<u8> {
    model::aad(b"wrapd bench", &model::ciphertext_metadata(version))
}

/// Runs `callers` callers, each on its own keep-alive connection to `endpoint`, sending
/// `body` for `duration`; each caller's latencies and errors, and the time it took.
pub async fn drive(
    endpoint: &XksEndpoint,
    callers: usize,
    body: &Bytes,
    duration: Duration,
) -> Result<(Vec<(Histogram<u64>, u64)>, Duration)> {
    let mut connections = Vec::with_capacity(callers);
    for _ in 0..callers {
        connections.push(connect(endpoint).await?);
    }
    let started = Instant::now();
    let deadline = started + duration;
    let tasks: Vec<_> = connections
        .into_iter()
        .map(|mut sender| {
            let endpoint = endpoint.clone();
            let body = body.clone();
            tokio::spawn(async move {
                let mut hist = histogram();
                let mut errors = 0u64;
                while Instant::now() < deadline {
                    let t = Instant::now();
                    let ok = match endpoint.request(&body) {
                        Ok(request) => match sender.send_request(request).await {
                            Ok(response) => {
                                let status = response.status();
                                response.into_body().collect().await.is_ok()
                                    && status == StatusCode::OK
                            }
                            Err(_) => false,
                        },
                        Err(_) => false,
                    };
                    tally(&mut hist, &mut errors, t, ok);
                    if !ok && sender.is_closed() {
                        match connect(&endpoint).await {
                            Ok(fresh) => sender = fresh,
                            Err(_) => break,
                        }
                    }
                }
                (hist, errors)
            })
        })
        .collect();
    let mut out = Vec::with_capacity(tasks.len());
    for task in tasks {
        out.push(task.await.map_err(|e| Error::Internal(e.to_string()))?);
    }
    Ok((out, started.elapsed()))
}

type Sender = hyper::client::conn::http1::SendRequest<Full<Bytes>>;

async fn connect(endpoint: &XksEndpoint) -> Result<Sender> {
    let unavailable = |e: &dyn std::fmt::Display| Error::Unavailable(format!("XKS listener: {e}"));
    let tcp = tokio::net::TcpStream::connect(endpoint.addr)
        .await
        .map_err(|e| unavailable(&e))?;
    let _ = tcp.set_nodelay(true);
    let name = ServerName::IpAddress(endpoint.addr.ip().into());
    let tls = endpoint
        .tls
        .connect(name, tcp)
        .await
        .map_err(|e| unavailable(&e))?;
    let (sender, connection) = hyper::client::conn::http1::handshake(TokioIo::new(tls))
        .await
        .map_err(|e| unavailable(&e))?;
    tokio::spawn(connection);
    Ok(sender)
}

/// A TLS client that accepts exactly `cert` from the server: the bench knows which
/// certificate the listener it measures presents.
fn pinned(cert: CertificateDer<'static>) -> TlsConnector {
    let provider = Arc::new(tokio_rustls::rustls::crypto::ring::default_provider());
    let verifier = Arc::new(Pinned {
        cert,
        provider: provider.clone(),
    });
    let mut config = ClientConfig::builder_with_provider(provider)
        .with_safe_default_protocol_versions()
        .expect("the ring provider supports the default protocol versions")
        .dangerous()
        .with_custom_certificate_verifier(verifier)
        .with_no_client_auth();
    config.alpn_protocols = vec![b"http/1.1".to_vec()];
    TlsConnector::from(Arc::new(config))
}

#[derive(Debug)]
struct Pinned {
    cert: CertificateDer<'static>,
    provider: Arc<CryptoProvider>,
}

impl ServerCertVerifier for Pinned {
    fn verify_server_cert(
        &self,
        end_entity: &CertificateDer<'_>,
        _intermediates: &[CertificateDer<'_>],
        _server_name: &ServerName<'_>,
        _ocsp_response: &[u8],
        _now: UnixTime,
    ) -> std::result::Result<ServerCertVerified, tokio_rustls::rustls::Error> {
        if end_entity.as_ref() == self.cert.as_ref() {
            Ok(ServerCertVerified::assertion())
        } else {
            Err(tokio_rustls::rustls::Error::General(
                "not the certificate the bench expects".into(),
            ))
        }
    }

    fn verify_tls12_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> std::result::Result<HandshakeSignatureValid, tokio_rustls::rustls::Error> {
        verify_tls12_signature(
            message,
            cert,
            dss,
            &self.provider.signature_verification_algorithms,
        )
    }

    fn verify_tls13_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> std::result::Result<HandshakeSignatureValid, tokio_rustls::rustls::Error> {
        verify_tls13_signature(
            message,
            cert,
            dss,
            &self.provider.signature_verification_algorithms,
        )
    }

    fn supported_verify_schemes(&self) -> Vec<SignatureScheme> {
        self.provider
            .signature_verification_algorithms
            .supported_schemes()
    }
}

/// The XKS echo: `server::http` on a loopback port with a fresh self-signed certificate,
/// answering every request with a fixed Encrypt answer; stops when dropped.
pub struct XksEcho {
    /// Where to call it.
    pub endpoint: XksEndpoint,
    _stop: tokio::sync::oneshot::Sender<()>,
}

struct EchoFront {
    answer: Bytes,
}

impl HttpsFront for EchoFront {
    const NAME: &'static str = "XKS echo";
    const MAX_BODY: usize = crate::front::xks::MAX_BODY;

    fn handle(
        &self,
        _request: Request<Bytes>,
        _remote: Option<SocketAddr>,
    ) -> impl std::future::Future<Output = Response<Bytes>> + Send {
        let answer = self.answer.clone();
        async move { crate::front::xks::error::json_response(StatusCode::OK, answer.to_vec()) }
    }

    fn refuse(&self, _refusal: BodyRefusal) -> Response<Bytes> {
        crate::front::xks::error::json_response(StatusCode::BAD_REQUEST, b"{}".to_vec())
    }
}

impl XksEcho {
    /// Starts the echo.
    pub async fn start() -> Result<Self> {
        let validity = crate::pki::Validity::days(1);
        let ca = crate::pki::new_ca("wrapd bench", validity)?;
        let server = crate::pki::issue_server(&ca, &["127.0.0.1".to_owned()], validity)?;
        let cert = CertificateDer::from_pem_slice(server.cert.as_bytes())
            .map_err(|e| Error::Internal(e.to_string()))?;
        let key = PrivateKeyDer::from_pem_slice(server.key.as_bytes())
            .map_err(|e| Error::Internal(e.to_string()))?;
        let mut config = tokio_rustls::rustls::ServerConfig::builder_with_provider(Arc::new(
            tokio_rustls::rustls::crypto::ring::default_provider(),
        ))
        .with_safe_default_protocol_versions()
        .map_err(|e| Error::Internal(e.to_string()))?
        .with_no_client_auth()
        .with_single_cert(vec![cert.clone()], key)
        .map_err(|e| Error::Internal(e.to_string()))?;
        config.alpn_protocols = vec![b"http/1.1".to_vec()];
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
            .await
            .map_err(|e| Error::Config(format!("XKS echo: {e}")))?;
        let addr = listener
            .local_addr()
            .map_err(|e| Error::Config(format!("XKS echo: {e}")))?;
        let limits = Limits::default();
        let (incoming, accept) = crate::server::listen::tls_incoming(
            listener,
            tokio_rustls::TlsAcceptor::from(Arc::new(config)),
            &limits,
        );
        let (stop, stopped) = tokio::sync::oneshot::channel::<()>();
        let answer = Bytes::from(
            serde_json::json!({
                "ciphertext": "AAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAA=",
                "ciphertextMetadata": "AQAAAAE=",
                "initializationVector": "AAAAAAAAAAAAAAAA",
                "authenticationTag": "AAAAAAAAAAAAAAAAAAAAAA==",
                "ciphertextDataIntegrityValue": "AAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAA=",
            })
            .to_string(),
        );
        tokio::spawn(async move {
            let _ = crate::server::http::serve(
                incoming,
                Arc::new(EchoFront { answer }),
                limits.handshake_timeout,
                async {
                    let _ = stopped.await;
                },
            )
            .await;
            accept.abort();
        });
        Ok(Self {
            endpoint: XksEndpoint {
                addr,
                tls: pinned(cert.into_owned()),
                path: "/kms/xks/v1/keys/echo/encrypt".into(),
                region: String::new(),
                credential: None,
            },
            _stop: stop,
        })
    }
}
