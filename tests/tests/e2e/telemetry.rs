//! Traces: with an OTLP endpoint set, `cellmail up` exports its spans over OTLP/gRPC; a
//! delivery's span carries the tenant, the cell and the message id.

use std::sync::{Arc, Mutex};
use std::time::Duration;

use cellmail_tests::{Platform, authorized, message, wait_for};
use opentelemetry_proto::tonic::collector::trace::v1::trace_service_server::{
    TraceService, TraceServiceServer,
};
use opentelemetry_proto::tonic::collector::trace::v1::{
    ExportTraceServiceRequest, ExportTraceServiceResponse,
};
use opentelemetry_proto::tonic::common::v1::any_value::Value;

/// A span as the collector keeps it: name, string attributes, service name.
type Span = (String, Vec<(String, String)>, String);

/// An OTLP collector that keeps every span it is sent.
#[derive(Clone, Default)]
struct Collector(Arc<Mutex<Vec<Span>>>);

#[tonic::async_trait]
impl TraceService for Collector {
    async fn export(
        &self,
        request: tonic::Request<ExportTraceServiceRequest>,
    ) -> Result<tonic::Response<ExportTraceServiceResponse>, tonic::Status> {
        let text = |value: &Option<opentelemetry_proto::tonic::common::v1::AnyValue>| match value
            .as_ref()
            .and_then(|v| v.value.as_ref())
        {
            Some(Value::StringValue(s)) => s.clone(),
            _ => String::new(),
        };
        let mut spans = self.0.lock().unwrap();
        for resource in request.into_inner().resource_spans {
            let service = resource
                .resource
                .iter()
                .flat_map(|r| &r.attributes)
                .find(|a| a.key == "service.name")
                .map(|a| text(&a.value))
                .unwrap_or_default();
            for span in resource.scope_spans.iter().flat_map(|s| &s.spans) {
                let attributes = span
                    .attributes
                    .iter()
                    .map(|a| (a.key.clone(), text(&a.value)))
                    .collect();
                spans.push((span.name.clone(), attributes, service.clone()));
            }
        }
        Ok(tonic::Response::new(ExportTraceServiceResponse::default()))
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_delivery_is_traced_over_otlp_with_tenant_cell_and_message_id() {
    let collector = Collector::default();
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let endpoint = format!("http://{}", listener.local_addr().unwrap());
    let server = tokio::spawn(
        tonic::transport::Server::builder()
            .add_service(TraceServiceServer::new(collector.clone()))
            .serve_with_incoming(tokio_stream::wrappers::TcpListenerStream::new(listener)),
    );
    let dir = tempfile::tempdir().unwrap();
    let env = [
        ("OTEL_EXPORTER_OTLP_ENDPOINT", endpoint.as_str()),
        ("OTEL_BSP_SCHEDULE_DELAY", "100"),
        ("RUST_LOG", "info"),
    ];
    let platform = Platform::start_with_env(dir.path(), &["--cells", "1"], &env).unwrap();
    let (cell, key) = platform
        .create_tenant("traced", &["traced.example"])
        .await
        .unwrap();
    let mut sender = platform.sender().await.unwrap();
    let id = sender
        .send(authorized(
            &key,
            message("a@traced.example", "j@example.com", ""),
        ))
        .await
        .unwrap()
        .into_inner()
        .message_id;

    let span = wait_for(Duration::from_secs(20), "the delivery's span", || {
        collector
            .0
            .lock()
            .unwrap()
            .iter()
            .find(|(name, attributes, _)| {
                name == "deliver" && attributes.contains(&("message_id".into(), id.clone()))
            })
            .cloned()
    })
    .await
    .unwrap();
    let (_, attributes, service) = span;
    assert!(
        attributes.contains(&("tenant".into(), "traced".into())),
        "{attributes:?}"
    );
    assert!(
        attributes.contains(&("cell".into(), cell)),
        "{attributes:?}"
    );
    assert_eq!(service, "cellmail");
    server.abort();
}
