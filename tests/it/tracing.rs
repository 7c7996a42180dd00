//! OpenTelemetry spans: a daemon with `[tracing]` exports one span per request over
//! OTLP/gRPC, carrying the request id of the request's audit line, its key and outcome, with
//! the audit append as a child span; and nothing secret in any attribute. The collector is
//! the OTLP trace service generated from the OpenTelemetry protos (`opentelemetry-proto`),
//! the same service definition real collectors serve.

use std::sync::{Arc, Mutex};

use opentelemetry_proto::tonic::collector::trace::v1::trace_service_server::{
    TraceService, TraceServiceServer,
};
use opentelemetry_proto::tonic::collector::trace::v1::{
    ExportTraceServiceRequest, ExportTraceServiceResponse,
};
use opentelemetry_proto::tonic::common::v1::KeyValue;
use opentelemetry_proto::tonic::common::v1::any_value::Value as AnyValue;
use opentelemetry_proto::tonic::trace::v1::Span;
use tonic::{Request, Response, Status};
use wrapd::proto::UnwrapRequest;

use crate::common::{DevDaemon, create_key, eventually, generate};

#[derive(Clone, Default)]
struct Collector {
    received: Arc<Mutex<Vec<ExportTraceServiceRequest>>>,
}

#[tonic::async_trait]
impl TraceService for Collector {
    async fn export(
        &self,
        request: Request<ExportTraceServiceRequest>,
    ) -> Result<Response<ExportTraceServiceResponse>, Status> {
        self.received.lock().unwrap().push(request.into_inner());
        Ok(Response::new(ExportTraceServiceResponse {
            partial_success: None,
        }))
    }
}

impl Collector {
    /// Starts the collector on a free loopback port; returns its URL.
    async fn start(&self) -> String {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let address = listener.local_addr().unwrap();
        let service = TraceServiceServer::new(self.clone());
        tokio::spawn(async move {
            tonic::transport::Server::builder()
                .add_service(service)
                .serve_with_incoming(tokio_stream::wrappers::TcpListenerStream::new(listener))
                .await
                .unwrap();
        });
        format!("http://{address}")
    }

    fn spans(&self) -> Vec<Span> {
        self.received
            .lock()
            .unwrap()
            .iter()
            .flat_map(|r| &r.resource_spans)
            .flat_map(|r| &r.scope_spans)
            .flat_map(|s| s.spans.clone())
            .collect()
    }

    fn resource_attributes(&self) -> Vec<KeyValue> {
        self.received
            .lock()
            .unwrap()
            .iter()
            .flat_map(|r| &r.resource_spans)
            .flat_map(|r| r.resource.clone())
            .flat_map(|r| r.attributes)
            .collect()
    }
}

fn text(attributes: &[KeyValue], key: &str) -> Option<String> {
    attributes
        .iter()
        .find(|a| a.key == key)
        .and_then(|a| a.value.as_ref())
        .and_then(|v| match &v.value {
            Some(AnyValue::StringValue(s)) => Some(s.clone()),
            Some(AnyValue::IntValue(i)) => Some(i.to_string()),
            _ => None,
        })
}

#[tokio::test]
async fn each_request_is_a_span_with_its_audit_lines_request_id_and_no_secret() {
    let collector = Collector::default();
    let endpoint = collector.start().await;
    let mut daemon = DevDaemon::start();
    let mut config = std::fs::read_to_string(daemon.config_path()).unwrap();
    config.push_str(&format!(
        "\n[tracing]\notlp_endpoint = \"{endpoint}\"\nservice_name = \"wrapd-under-test\"\n"
    ));
    std::fs::write(daemon.config_path(), config).unwrap();
    // Export every 100 ms instead of every 5 s (the SDK's standard setting).
    daemon.set_env("OTEL_BSP_SCHEDULE_DELAY", "100");
    daemon.restart();

    let mut keys = daemon.keys().await;
    let mut data = daemon.data().await;
    let key = create_key(&mut keys, "").await;
    let generated = generate(&mut data, &key.key_id, &[("tenant", "acme")]).await;
    let unwrapped = data
        .unwrap(UnwrapRequest {
            ciphertext_blob: generated.ciphertext_blob.clone(),
            encryption_context: crate::common::ctx(&[("tenant", "acme")]),
            key_id: String::new(),
        })
        .await
        .unwrap()
        .into_inner();
    assert_eq!(unwrapped.plaintext, generated.plaintext);
    let refused = data
        .unwrap(UnwrapRequest {
            ciphertext_blob: b"not a blob".to_vec(),
            ..Default::default()
        })
        .await;
    assert!(refused.is_err());

    let audit = daemon.audit_lines();
    let workload: Vec<_> = audit
        .iter()
        .filter(|r| ["CreateKey", "GenerateDataKey", "Unwrap"].contains(&r.operation.as_str()))
        .filter(|r| r.principal.starts_with("unix:") || r.principal.starts_with("tls:"))
        .cloned()
        .collect();
    assert_eq!(workload.len(), 4, "{audit:?}");
    eventually("a span for every request", || {
        let spans = collector.spans();
        let all = workload.iter().all(|line| {
            spans
                .iter()
                .any(|s| text(&s.attributes, "request_id").as_deref() == Some(&line.request_id))
        });
        async move { all }
    })
    .await;

    let spans = collector.spans();
    for line in &workload {
        let span = spans
            .iter()
            .find(|s| text(&s.attributes, "request_id").as_deref() == Some(&line.request_id))
            .unwrap();
        assert_eq!(span.name, line.operation, "named after the operation");
        assert_eq!(
            text(&span.attributes, "wrapd.outcome").as_deref(),
            Some(line.outcome.as_str())
        );
        assert_eq!(text(&span.attributes, "wrapd.key_id"), line.key_id);
        if line.outcome == "OK" {
            assert!(
                spans
                    .iter()
                    .any(|child| child.name == "audit.append"
                        && child.parent_span_id == span.span_id),
                "the audit append of {} is a child span",
                line.operation
            );
        }
    }
    assert_eq!(
        text(&collector.resource_attributes(), "service.name").as_deref(),
        Some("wrapd-under-test")
    );

    // Nothing secret: no attribute anywhere holds the data key, in hex or base64.
    use base64::Engine;
    let secrets = [
        hex::encode(&generated.plaintext),
        base64::engine::general_purpose::STANDARD.encode(&generated.plaintext),
    ];
    let exported = format!("{:?}", collector.received.lock().unwrap());
    for secret in &secrets {
        assert!(!exported.contains(secret.as_str()));
    }
}
