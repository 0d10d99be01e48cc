//! `cellmail-control`: the control plane as its own process.

use std::path::PathBuf;

use anyhow::Context;
use clap::Parser;
use tokio_util::sync::CancellationToken;

#[derive(Parser)]
#[command(
    version = cellmail_proto::VERSION,
    about = "cellmail control plane: the Control gRPC API over the placement registry"
)]
struct Args {
    #[command(flatten)]
    control: cellmail_control::ControlConfig,
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
    let _telemetry = cellmail_proto::server::init_tracing("cellmail-control");
    args.metrics.serve()?;
    let public = args.public.open(args.control.addr)?;
    let registry = args.registry.open(&args.data_dir).await?;
    let listener = tokio::net::TcpListener::bind(args.control.addr)
        .await
        .with_context(|| format!("binding --control-addr {}", args.control.addr))?;
    tracing::info!(addr = %listener.local_addr()?, "control plane serving");
    let setup = cellmail_control::Setup {
        admin_token: args.control.admin_token,
        identities: args.control.identities,
        deployer: args.control.deployer.open().await?,
        tls: cellmail_proto::tls::Tls::load(args.tls)?,
        public,
    };
    let shutdown = CancellationToken::new();
    tokio::spawn(cellmail_proto::server::stop_on_signal(shutdown.clone()));
    cellmail_control::serve(listener, registry, args.registry.keys(), setup, shutdown).await
}
