//! `cellmail-router`: a router as its own process.

use std::path::PathBuf;

use anyhow::Context;
use clap::Parser;
use tokio_util::sync::CancellationToken;

#[derive(Parser)]
#[command(
    version = cellmail_proto::VERSION,
    about = "cellmail router: authenticates tenants and forwards their sends to their cell"
)]
struct Args {
    #[command(flatten)]
    router: cellmail_router::RouterConfig,
    #[command(flatten)]
    registry: cellmail_registry::config::RegistryConfig,
    #[command(flatten)]
    metrics: cellmail_proto::server::MetricsConfig,
    #[command(flatten)]
    config: cellmail_proto::config::ConfigFile,
    #[command(flatten)]
    tls: cellmail_proto::tls::TlsFiles,
    #[command(flatten)]
    public: cellmail_proto::tls::PublicTls,
    /// Where the embedded registry keeps its file.
    #[arg(long, env = "CELLMAIL_DATA_DIR", default_value = ".cellmail")]
    data_dir: PathBuf,
}

fn main() -> anyhow::Result<()> {
    cellmail_proto::config::load_from_args()?;
    run(Args::parse())
}

#[tokio::main]
async fn run(args: Args) -> anyhow::Result<()> {
    let _telemetry = cellmail_proto::server::init_tracing("cellmail-router");
    args.metrics.serve()?;
    let public = args.public.open(args.router.addr)?;
    let registry = args.registry.open(&args.data_dir).await?;
    let listener = tokio::net::TcpListener::bind(args.router.addr)
        .await
        .with_context(|| format!("binding --router-addr {}", args.router.addr))?;
    tracing::info!(addr = %listener.local_addr()?, "router serving");
    let tracking = match args.router.tracking.tracking_addr {
        Some(addr) => Some(
            tokio::net::TcpListener::bind(addr)
                .await
                .with_context(|| format!("binding --tracking-addr {addr}"))?,
        ),
        None => None,
    };
    let shutdown = CancellationToken::new();
    tokio::spawn(cellmail_proto::server::stop_on_signal(shutdown.clone()));
    let keys = args.registry.keys();
    let tls = cellmail_proto::tls::Tls::load(args.tls)?;
    let tls = (tls, public);
    let listeners = (listener, tracking);
    cellmail_router::serve(listeners, registry, keys, args.router.sends, tls, shutdown).await
}
