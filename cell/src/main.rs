//! `cellmail-cell`: one cell as its own process.

use std::path::PathBuf;

use clap::Parser;
use tokio_util::sync::CancellationToken;

#[derive(Parser)]
#[command(
    version = cellmail_proto::VERSION,
    about = "cellmail cell: accepts, queues and delivers the mail of the tenants placed on it"
)]
struct Args {
    #[command(flatten)]
    cell: cellmail_cell::CellConfig,
    #[command(flatten)]
    registry: cellmail_registry::config::RegistryConfig,
    #[command(flatten)]
    metrics: cellmail_proto::server::MetricsConfig,
    #[command(flatten)]
    config: cellmail_proto::config::ConfigFile,
    #[command(flatten)]
    tls: cellmail_proto::tls::TlsFiles,
    #[command(flatten)]
    backends: cellmail_cell::BackendConfig,
    /// The cell's own state (store, embedded queue); the file sink writes under <data-dir>/mail.
    #[arg(long, env = "CELLMAIL_DATA_DIR", default_value = ".cellmail")]
    data_dir: PathBuf,
}

fn main() -> anyhow::Result<()> {
    cellmail_proto::config::load_from_args()?;
    run(Args::parse())
}

#[tokio::main]
async fn run(args: Args) -> anyhow::Result<()> {
    let _telemetry = cellmail_proto::server::init_tracing("cellmail-cell");
    args.metrics.serve()?;
    let registry = args.registry.open(&args.data_dir).await?;
    let cell_dir = args.data_dir.join("cells").join(args.cell.id.as_str());
    let backends = args
        .backends
        .open(&args.cell.id, &cell_dir, &args.data_dir.join("mail"))
        .await?;
    let tls = cellmail_proto::tls::Tls::load(args.tls)?;
    let shutdown = CancellationToken::new();
    tokio::spawn(cellmail_proto::server::stop_on_signal(shutdown.clone()));
    cellmail_cell::run(
        args.cell,
        registry,
        args.registry.keys(),
        backends,
        tls,
        shutdown,
    )
    .await
}
