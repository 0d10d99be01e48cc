//! The cellmail router: the one front door for sends.
//!
//! - [`auth`]: the interceptor that turns `authorization: Bearer <key>` into the tenant.
//! - [`admission`]: the per-tenant rate limit applied before forwarding a send.
//! - [`routes`]: the router's compact registry view; tenant -> cell resolution.
//! - [`forward`]: the deadline a forwarded call carries.
//! - [`api`]: the `Sender` gRPC service (forward, and one retry after a "moved" answer).
//! - [`oversize`]: the answer to a send too large to read.
//! - [`telemetry`]: the router's metrics (sends by cell, class, tier and outcome).

pub mod admission;
pub mod api;
pub mod auth;
pub mod forward;
pub mod oversize;
pub mod routes;
pub mod telemetry;
pub mod tracking;

use std::net::SocketAddr;
use std::sync::Arc;

use cellmail_proto::tls::Tls;
use cellmail_proto::v1::sender_server::{SERVICE_NAME, SenderServer};
use cellmail_proto::{server, size};
use cellmail_registry::Registry;
use cellmail_registry::catalog::WatchedCatalog;
use cellmail_registry::channels::CellChannels;
use cellmail_registry::schema::Keys;
use tokio::net::TcpListener;
use tokio_util::sync::CancellationToken;
use tonic::service::interceptor::InterceptedService;

/// How a router is started, from flags or env.
#[derive(Debug, Clone, clap::Args)]
pub struct RouterConfig {
    /// Address the Sender gRPC API listens on.
    #[arg(
        long = "router-addr",
        env = "CELLMAIL_ROUTER_ADDR",
        default_value = "127.0.0.1:50051"
    )]
    pub addr: SocketAddr,
    #[command(flatten)]
    pub sends: SendConfig,
    #[command(flatten)]
    pub tracking: tracking::TrackingConfig,
}

const DEFAULT_FREEZE_HOLD_MS: u64 = 2000;

/// How a router takes sends: how long it holds a tenant's calls while a move has its
/// placement frozen (and waits for a newer placement after a cell's "moved" answer) before it
/// answers UNAVAILABLE, and how large a message it takes.
#[derive(Debug, Clone, Copy, clap::Args)]
pub struct SendConfig {
    /// Milliseconds a moving tenant's calls are held while its placement is frozen, before
    /// they are answered UNAVAILABLE (clients retry with the same idempotency key).
    #[arg(
        long = "freeze-hold-ms",
        env = "CELLMAIL_FREEZE_HOLD_MS",
        default_value_t = DEFAULT_FREEZE_HOLD_MS
    )]
    pub freeze_hold_ms: u64,
    /// The largest message (subject, text and html together, in bytes) a send may carry;
    /// larger ones are INVALID_ARGUMENT naming the field. At most SES's limit, 40 MB.
    #[arg(
        long = "max-message-bytes",
        env = "CELLMAIL_MAX_MESSAGE_BYTES",
        default_value_t = size::SES_MESSAGE_BYTES,
        value_parser = max_message_bytes
    )]
    pub max_message_bytes: usize,
}

fn max_message_bytes(raw: &str) -> Result<usize, String> {
    match raw.parse::<usize>() {
        Ok(bytes) if (1..=size::SES_MESSAGE_BYTES).contains(&bytes) => Ok(bytes),
        _ => Err(format!(
            "must be a number of bytes from 1 to {} (SES's limit)",
            size::SES_MESSAGE_BYTES
        )),
    }
}

impl Default for SendConfig {
    fn default() -> Self {
        Self {
            freeze_hold_ms: DEFAULT_FREEZE_HOLD_MS,
            max_message_bytes: size::SES_MESSAGE_BYTES,
        }
    }
}

impl SendConfig {
    /// How long a frozen tenant's calls are held.
    pub fn hold(self) -> std::time::Duration {
        std::time::Duration::from_millis(self.freeze_hold_ms)
    }
}

/// Serves `Sender` on `listener` (over `public` TLS, if any), and the tracking host on
/// `tracking` when given, until `shutdown` is cancelled; calls to cells present `tls`.
pub async fn serve(
    (listener, tracking): (TcpListener, Option<TcpListener>),
    registry: Arc<dyn Registry>,
    keys: Keys,
    sends: SendConfig,
    (tls, public): (Arc<Tls>, Option<Arc<Tls>>),
    shutdown: CancellationToken,
) -> anyhow::Result<()> {
    let catalog =
        Arc::new(WatchedCatalog::<routes::Routes>::start(registry.clone(), keys.clone()).await?);
    let usage = Arc::new(auth::Usage::default());
    let usage_writer = tokio::spawn(usage.clone().write(registry, keys, shutdown.clone()));
    let sender = Arc::new(api::SenderApi::new(
        catalog.clone(),
        sends,
        CellChannels::new(tls),
    ));
    let tracking = tracking.map(|listener| {
        let handoff = Arc::new(tracking::Handoff::new(sender.clone()));
        tokio::spawn(tracking::serve(
            listener,
            catalog.clone(),
            handoff,
            shutdown.clone(),
        ))
    });
    let api = telemetry::MarkSends(InterceptedService::new(
        oversize::RefuseOversize {
            inner: SenderServer::from_arc(sender)
                .max_decoding_message_size(size::decode_limit(sends.max_message_bytes)),
            limit: sends.max_message_bytes,
        },
        auth::Authenticate::new(catalog.clone(), usage),
    ));
    let routes = tonic::service::Routes::new(api);
    let health = tonic_health::server::HealthReporter::new();
    let reporter = {
        let (health, shutdown) = (health.clone(), shutdown.clone());
        tokio::spawn(async move {
            catalog
                .report_staleness("router".into(), health, shutdown)
                .await
        })
    };
    let served =
        server::serve_front(listener, public, routes, &health, &[SERVICE_NAME], shutdown).await;
    reporter.abort();
    if let Some(tracking) = tracking {
        tracking.await?;
    }
    usage_writer.await?;
    Ok(served?)
}
