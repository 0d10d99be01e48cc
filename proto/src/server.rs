//! What every cellmail binary does to run: log setup, Prometheus metrics on an HTTP
//! endpoint, and a gRPC server that also answers `grpc.health.v1.Health` and server
//! reflection, and stops when its token is cancelled.

use tokio::io::{AsyncRead, AsyncWrite};
use tokio::net::TcpListener;
use tokio_util::sync::CancellationToken;
use tonic::service::Routes;
use tonic::transport::server::{Connected, TcpIncoming};
use tonic_health::ServingStatus;
use tonic_health::pb::health_server::HealthServer;
use tonic_health::server::{HealthReporter, HealthService};

/// Stops trace export when dropped, flushing the spans not sent yet (hold it in `main`).
pub struct Telemetry(Option<opentelemetry_sdk::trace::SdkTracerProvider>);

impl Drop for Telemetry {
    fn drop(&mut self) {
        if let Some(provider) = self.0.take() {
            let _ = provider.shutdown();
        }
    }
}

/// Whether an OTLP endpoint is configured, by OpenTelemetry's own variables.
fn otlp_configured() -> bool {
    [
        "OTEL_EXPORTER_OTLP_ENDPOINT",
        "OTEL_EXPORTER_OTLP_TRACES_ENDPOINT",
    ]
    .iter()
    .any(|name| std::env::var_os(name).is_some_and(|v| !v.is_empty()))
}

/// Spans to an OTLP/gRPC collector (the endpoint, batching and service name from
/// OpenTelemetry's `OTEL_*` variables; `service` by default).
fn tracer_provider(
    service: &str,
) -> Result<opentelemetry_sdk::trace::SdkTracerProvider, opentelemetry_otlp::ExporterBuildError> {
    use opentelemetry_otlp::WithExportConfig as _;
    let mut exporter = opentelemetry_otlp::SpanExporter::builder().with_tonic();
    if let Ok(endpoint) = std::env::var("OTEL_EXPORTER_OTLP_ENDPOINT") {
        exporter = exporter.with_endpoint(endpoint);
    }
    let name = std::env::var("OTEL_SERVICE_NAME").unwrap_or_else(|_| service.to_owned());
    let resource = opentelemetry_sdk::Resource::builder()
        .with_service_name(name)
        .build();
    Ok(opentelemetry_sdk::trace::SdkTracerProvider::builder()
        .with_batch_exporter(exporter.build()?)
        .with_resource(resource)
        .build())
}

/// Logs to stderr, filtered by `RUST_LOG` (default `info`); when an OTLP endpoint is set
/// (`OTEL_EXPORTER_OTLP_ENDPOINT`), the same spans also go there as traces of `service`,
/// and [`crate::trace::exporting`] is true from then on. Call inside the Tokio runtime (the
/// exporter is a tonic client).
pub fn init_tracing(service: &str) -> Telemetry {
    use opentelemetry::trace::TracerProvider as _;
    use tracing_subscriber::layer::SubscriberExt as _;
    use tracing_subscriber::util::SubscriberInitExt as _;
    let filter = tracing_subscriber::EnvFilter::try_from_default_env()
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info"));
    let ansi = std::io::IsTerminal::is_terminal(&std::io::stderr());
    let logs = tracing_subscriber::fmt::layer()
        .with_ansi(ansi)
        .with_writer(std::io::stderr);
    let provider = otlp_configured()
        .then(|| tracer_provider(service))
        .and_then(|built| {
            built
                .inspect_err(|err| eprintln!("OTLP trace export is off: {err}"))
                .ok()
        });
    let traces = provider
        .as_ref()
        .map(|p| tracing_opentelemetry::layer().with_tracer(p.tracer(service.to_owned())));
    let exporting = traces.is_some();
    // A second call (several components in one process) keeps the first subscriber.
    let installed = tracing_subscriber::registry()
        .with(filter)
        .with(logs)
        .with(traces)
        .try_init()
        .is_ok();
    if installed && exporting {
        crate::trace::set_exporting();
    }
    Telemetry(provider)
}

/// Where a process serves its Prometheus metrics, from flags or env.
#[derive(Debug, Clone, clap::Args)]
pub struct MetricsConfig {
    /// Serve Prometheus metrics at http://<addr>/metrics (none: not served).
    #[arg(long = "metrics-addr", env = "CELLMAIL_METRICS_ADDR")]
    pub metrics_addr: Option<std::net::SocketAddr>,
}

/// The buckets (in seconds) of every `*_seconds` histogram: from a millisecond, the time of a
/// forwarded send on one machine, up to the default deadline of a call.
const SECONDS_BUCKETS: [f64; 14] = [
    0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0,
];

impl MetricsConfig {
    /// Serves every metric this process records, in Prometheus' text format. Once per
    /// process: the binaries and `cellmail up` call it, libraries only record.
    pub fn serve(&self) -> Result<(), metrics_exporter_prometheus::BuildError> {
        match self.metrics_addr {
            // Gauges not set for a while (a tenant no longer among the busiest) are dropped.
            // Durations are histograms with buckets rather than summaries, so a dashboard can
            // add up several routers' before taking a quantile.
            Some(addr) => metrics_exporter_prometheus::PrometheusBuilder::new()
                .with_http_listener(addr)
                .idle_timeout(
                    metrics_util::MetricKindMask::GAUGE,
                    Some(std::time::Duration::from_secs(60)),
                )
                .set_buckets_for_metric(
                    metrics_exporter_prometheus::Matcher::Suffix("_seconds".into()),
                    &SECONDS_BUCKETS,
                )?
                .install(),
            None => Ok(()),
        }
    }
}

/// Who calls a server, which decides how many of its calls one connection may abandon.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Peers {
    /// Clients of tenants or operators, one connection each: a connection that resets more
    /// than HTTP/2's default of 20 calls before the server takes them up is closed (the
    /// defence against rapid-reset floods), which costs only that client.
    Public,
    /// The platform's own routers: one connection carries every tenant's calls to a cell,
    /// and a router cancels each call its tenant gave up on, so a tenant abandoning a burst
    /// of sends resets that many calls on it at once. Closing the connection for that would
    /// fail every other tenant's calls under way on it.
    Internal,
}

/// Calls a [`Peers::Internal`] connection may reset before the server takes them up: the
/// most a router has in flight to one cell, with room to spare.
const INTERNAL_PENDING_RESETS: usize = 65_536;

impl Peers {
    /// Serves `routes` plus health (each of `services` reported SERVING in `health`, where
    /// the caller may report more) and reflection on the `incoming` connections ([`incoming`]
    /// for plain TCP, `Tls::incoming` for mutual TLS), for these peers, until
    /// `shutdown` is cancelled.
    pub async fn serve<IO, IE>(
        self,
        incoming: impl tokio_stream::Stream<Item = Result<IO, IE>>,
        routes: Routes,
        health: &HealthReporter,
        services: &[&str],
        shutdown: CancellationToken,
    ) -> Result<(), tonic::transport::Error>
    where
        IO: Connected + AsyncRead + AsyncWrite + Send + Unpin + 'static,
        IE: Into<tonic::codegen::StdError>,
    {
        for service in services {
            health
                .set_service_status(*service, ServingStatus::Serving)
                .await;
        }
        let health_service = HealthServer::new(HealthService::from_health_reporter(health.clone()));
        let reflection = tonic_reflection::server::Builder::configure()
            .register_encoded_file_descriptor_set(crate::v1::FILE_DESCRIPTOR_SET)
            .register_encoded_file_descriptor_set(tonic_health::pb::FILE_DESCRIPTOR_SET)
            .build_v1()
            // Both descriptor sets are compiled in; decoding them cannot fail.
            .expect("compiled-in descriptor sets decode");
        let pending_resets = (self == Peers::Internal).then_some(INTERNAL_PENDING_RESETS);
        tonic::transport::Server::builder()
            .http2_max_pending_accept_reset_streams(pending_resets)
            .add_routes(routes)
            .add_service(health_service)
            .add_service(reflection)
            .serve_with_incoming_shutdown(incoming, shutdown.cancelled_owned())
            .await
    }
}

/// Serves a front door's `routes` (with health and reflection) on `listener`: over `tls`
/// when it has a certificate, else plaintext (see [`crate::tls::PublicTls::open`]).
pub async fn serve_front(
    listener: TcpListener,
    tls: Option<std::sync::Arc<crate::tls::Tls>>,
    routes: Routes,
    health: &HealthReporter,
    services: &[&str],
    shutdown: CancellationToken,
) -> Result<(), tonic::transport::Error> {
    match tls {
        Some(tls) => {
            let incoming = tls.incoming(listener, shutdown.clone());
            Peers::Public
                .serve(incoming, routes, health, services, shutdown)
                .await
        }
        None => {
            Peers::Public
                .serve(incoming(listener), routes, health, services, shutdown)
                .await
        }
    }
}

/// The connections `listener` accepts, each with `TCP_NODELAY` set: without it, a response
/// written in more than one piece (a streamed export's chunks, frames of calls answered
/// while others are written) waits for the peer's delayed acknowledgement, 40 ms on Linux.
pub fn incoming(listener: TcpListener) -> TcpIncoming {
    TcpIncoming::from(listener).with_nodelay(Some(true))
}

/// Cancels `shutdown` on Ctrl-C or SIGTERM.
pub async fn stop_on_signal(shutdown: CancellationToken) {
    let ctrl_c = tokio::signal::ctrl_c();
    match tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate()) {
        Ok(mut term) => {
            tokio::select! {
                _ = ctrl_c => {}
                _ = term.recv() => {}
            }
        }
        Err(_) => {
            let _ = ctrl_c.await;
        }
    }
    tracing::info!("stopping");
    shutdown.cancel();
}
