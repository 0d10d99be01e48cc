//! `cellmail`: runs the whole platform on embedded defaults (`cellmail up`) and is the
//! operator's client of the control plane (tenants, cells, API keys).

mod operator;
mod up;

use clap::{Parser, Subcommand};

#[derive(Parser)]
#[command(version, about = "cellmail: cell-based multi-tenant email sending")]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Run control plane, router and cells in this process on embedded defaults.
    Up(up::UpArgs),
    /// Tenants: create, list.
    Tenant(operator::TenantArgs),
    /// Cells: list.
    Cell(operator::CellArgs),
    /// Tenant API keys: issue.
    Key(operator::KeyArgs),
}

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    let cli = Cli::parse();
    match cli.command {
        Command::Up(args) => {
            cellmail_proto::server::init_tracing();
            up::run(args).await
        }
        Command::Tenant(args) => operator::tenant(args).await,
        Command::Cell(args) => operator::cell(args).await,
        Command::Key(args) => operator::key(args).await,
    }
}
