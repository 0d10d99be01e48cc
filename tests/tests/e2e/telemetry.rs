//! Traces: with an OTLP endpoint set, `cellmail up` exports its spans over OTLP/gRPC; a
//! delivery's span carries the tenant, the cell and the message id. With the router and the
//! cell as their own processes, one send is one trace: the router's `send` span, the cell's
//! `accept` span as its child (the context crosses in the forwarded call's metadata) and the
//! `deliver` span as the accept's child (the context crosses in the queued message).

use std::sync::{Arc, Mutex};
use std::time::Duration;

use cellmail_proto::v1;
use cellmail_tests::processes::{Front, registry_args, start_cell_with_env};
use cellmail_tests::services::{etcd_endpoint, unique_prefix};
use cellmail_tests::{
    Platform, authorized, cells_until, control_client, message, until_ok, wait_for,
};
use opentelemetry_proto::tonic::collector::trace::v1::trace_service_server::{
    TraceService, TraceServiceServer,
};
use opentelemetry_proto::tonic::collector::trace::v1::{
    ExportTraceServiceRequest, ExportTraceServiceResponse,
};
use opentelemetry_proto::tonic::common::v1::any_value::Value;

/// A span as the collector keeps it.
#[derive(Debug, Clone)]
struct Span {
    name: String,
    /// String attributes.
    attributes: Vec<(String, String)>,
    /// Its resource's `service.name`.
    service: String,
    trace_id: Vec<u8>,
    span_id: Vec<u8>,
    /// Empty for a root span.
    parent_span_id: Vec<u8>,
}

impl Span {
    fn attribute(&self, key: &str) -> Option<&str> {
        self.attributes
            .iter()
            .find(|(k, _)| k == key)
            .map(|(_, v)| v.as_str())
    }
}

/// An OTLP collector that keeps every span it is sent.
#[derive(Clone, Default)]
struct Collector(Arc<Mutex<Vec<Span>>>);

impl Collector {
    /// A collector on a free loopback port; its endpoint and the server's task.
    async fn start() -> (
        Self,
        String,
        tokio::task::JoinHandle<Result<(), tonic::transport::Error>>,
    ) {
        let collector = Collector::default();
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let endpoint = format!("http://{}", listener.local_addr().unwrap());
        let server = tokio::spawn(
            tonic::transport::Server::builder()
                .add_service(TraceServiceServer::new(collector.clone()))
                .serve_with_incoming(tokio_stream::wrappers::TcpListenerStream::new(listener)),
        );
        (collector, endpoint, server)
    }

    /// Waits (20 s at most) for a span named `name` with message id `id`.
    async fn span(&self, name: &str, id: &str) -> Span {
        self.span_where(name, |span| span.attribute("message_id") == Some(id))
            .await
    }

    /// Waits (20 s at most) for a span named `name` that `wanted` says is the one.
    async fn span_where(&self, name: &str, wanted: impl Fn(&Span) -> bool) -> Span {
        wait_for(Duration::from_secs(20), &format!("a {name} span"), || {
            self.0
                .lock()
                .unwrap()
                .iter()
                .find(|span| span.name == name && wanted(span))
                .cloned()
        })
        .await
        .unwrap()
    }
}

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
                spans.push(Span {
                    name: span.name.clone(),
                    attributes,
                    service: service.clone(),
                    trace_id: span.trace_id.clone(),
                    span_id: span.span_id.clone(),
                    parent_span_id: span.parent_span_id.clone(),
                });
            }
        }
        Ok(tonic::Response::new(ExportTraceServiceResponse::default()))
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_delivery_is_traced_over_otlp_with_tenant_cell_and_message_id() {
    let (collector, endpoint, server) = Collector::start().await;
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

    let span = collector.span("deliver", &id).await;
    assert_eq!(span.attribute("tenant"), Some("traced"), "{span:?}");
    assert_eq!(span.attribute("cell"), Some(cell.as_str()), "{span:?}");
    assert_eq!(span.service, "cellmail");
    server.abort();
}

const ADMIN_TOKEN: &str = "test-admin-token-0123456789";

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_send_is_one_trace_from_the_routers_span_to_the_cells_accept_and_delivery() {
    let (collector, endpoint, server) = Collector::start().await;
    let env = [
        ("OTEL_EXPORTER_OTLP_ENDPOINT", endpoint.as_str()),
        ("OTEL_BSP_SCHEDULE_DELAY", "100"),
        ("RUST_LOG", "info"),
    ];
    let registry = registry_args(&etcd_endpoint(), &unique_prefix("telemetry"));
    let dir = tempfile::tempdir().unwrap();
    let _cell = start_cell_with_env("cell-traced", &registry, dir.path(), &[], &env)
        .await
        .unwrap();
    let front = Front::start_with_env(&registry, ADMIN_TOKEN, &[], &env)
        .await
        .unwrap();
    let control = control_client(&format!("http://{}", front.control), ADMIN_TOKEN)
        .await
        .unwrap();
    cells_until(&control, |c| c.alive, 1).await;
    let tenant = control
        .clone()
        .create_tenant(v1::CreateTenantRequest {
            id: "traced".into(),
            domains: vec!["traced.example".into()],
            ..Default::default()
        })
        .await
        .unwrap()
        .into_inner();
    let sender = v1::sender_client::SenderClient::connect(format!("http://{}", front.router))
        .await
        .unwrap();
    // The router learns of the new tenant through its watch: retry until it has.
    let id = until_ok(Duration::from_secs(20), || {
        let mut sender = sender.clone();
        let request = authorized(
            &tenant.api_key,
            message("a@traced.example", "j@example.com", "traced-1"),
        );
        async move { sender.send(request).await }
    })
    .await
    .unwrap()
    .into_inner()
    .message_id;

    let send = collector.span("send", &id).await;
    let accept = collector.span("accept", &id).await;
    let deliver = collector.span("deliver", &id).await;

    assert_eq!(send.service, "cellmail-router");
    assert_eq!(accept.service, "cellmail-cell");
    for span in [&send, &accept, &deliver] {
        assert_eq!(span.attribute("tenant"), Some("traced"), "{span:?}");
        assert_eq!(span.attribute("cell"), Some("cell-traced"), "{span:?}");
    }
    assert_eq!(send.attribute("class"), Some("transactional"), "{send:?}");
    assert_eq!(send.attribute("outcome"), Some("ok"), "{send:?}");
    assert_eq!(accept.attribute("outcome"), Some("ok"), "{accept:?}");

    // The router starts the trace (its client sent none); the cell continues it.
    assert_eq!(send.trace_id.len(), 16, "{send:?}");
    assert!(send.trace_id.iter().any(|b| *b != 0), "{send:?}");
    assert!(send.parent_span_id.is_empty(), "{send:?}");
    assert_eq!(accept.trace_id, send.trace_id, "{accept:?} in {send:?}");
    assert_eq!(
        accept.parent_span_id, send.span_id,
        "{accept:?} under {send:?}"
    );
    assert_eq!(deliver.trace_id, send.trace_id, "{deliver:?} in {send:?}");
    assert_eq!(
        deliver.parent_span_id, accept.span_id,
        "{deliver:?} under {accept:?}"
    );

    // The router's other calls have spans of their own, named for the method.
    let mut sender = sender;
    sender
        .get_message(authorized(
            &tenant.api_key,
            v1::GetMessageRequest {
                message_id: id.clone(),
            },
        ))
        .await
        .unwrap();
    let get = collector
        .span_where("get_message", |span| {
            span.attribute("tenant") == Some("traced")
        })
        .await;
    assert_eq!(get.service, "cellmail-router");
    assert_eq!(get.attribute("cell"), Some("cell-traced"), "{get:?}");
    assert_eq!(get.attribute("outcome"), Some("ok"), "{get:?}");
    assert_ne!(
        get.trace_id, send.trace_id,
        "a call of its own is a trace of its own"
    );
    server.abort();
}
