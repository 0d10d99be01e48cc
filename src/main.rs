//! `cellmail`: runs the whole platform on embedded defaults (`cellmail up`) and is the
//! operator's client of the control plane (tenants, cells, API keys, rollouts) and a client of the
//! router (`cellmail send`).
//!
//! One module per command:
//! - `up`: the platform in one process, on embedded defaults.
//! - `tenant`, `cell`, `rebalance`, `key`, `suppression`, `audit`, `rollout`, `operator`: the
//!   operator's nouns, each a client of the control plane's `Control` API.
//! - `send`: a message through the router, with a tenant's API key.
//! - `certs`: certificates for the platform's processes, from a CA of its own.
//!
//! and what the operator's commands share:
//! - `control`: the connection to the control plane, its credential and `--json`.
//! - `operation`: following an evacuation or a rebalance until its moves are done.

mod audit;
mod cell;
mod certs;
mod control;
mod door;
mod key;
mod operation;
mod operator;
mod rebalance;
mod rollout;
mod send;
mod suppression;
mod tenant;
mod tracking;
mod up;

use clap::{Parser, Subcommand};

#[derive(Parser)]
#[command(version = cellmail_proto::VERSION, about = "cellmail: cell-based multi-tenant email sending")]
struct Cli {
    #[command(subcommand)]
    command: Command,
    #[command(flatten)]
    config: cellmail_proto::config::ConfigFile,
}

#[derive(Subcommand)]
enum Command {
    /// Run control plane, router and cells in this process on embedded defaults.
    Up(up::UpArgs),
    /// Tenants: create, list, domains, suspend, resume, move.
    Tenant(tenant::TenantArgs),
    /// Cells: list, add, drain, disable, enable, evacuate.
    Cell(cell::CellArgs),
    /// Even out the tenants across cells: plan (a dry run), apply.
    Rebalance(rebalance::RebalanceArgs),
    /// Tenant API keys: issue, list, revoke.
    Key(key::KeyArgs),
    /// The operators' global suppression list: list, add, remove.
    Suppression(suppression::SuppressionArgs),
    /// Send a message through the router with a tenant's API key.
    Send(send::SendArgs),
    /// The audit trail of control actions and breaker trips.
    Audit(audit::AuditArgs),
    /// Roll a version out cell by cell: start, status, pause, resume, abort.
    Rollout(rollout::RolloutArgs),
    /// Operator credentials: add (admin or viewer), list, revoke.
    Operator(operator::OperatorArgs),
    /// Certificates for the platform's processes from a local CA (mutual TLS between them).
    Certs(certs::CertsArgs),
    /// The keys that sign engagement links: rotate-key.
    Tracking(tracking::TrackingArgs),
}

fn main() -> anyhow::Result<()> {
    cellmail_proto::config::load_from_args()?;
    let cli = Cli::parse();
    if !matches!(cli.command, Command::Up(_)) {
        // An operator's command piped into `head` ends quietly once its reader is gone, as
        // command-line tools do, instead of panicking on the write (Rust ignores SIGPIPE).
        // Not for `up`, whose servers must live through a closed pipe of their own.
        // SAFETY: sets a signal's disposition to its default before any thread starts.
        unsafe { libc::signal(libc::SIGPIPE, libc::SIG_DFL) };
    }
    run(cli)
}

#[tokio::main]
async fn run(cli: Cli) -> anyhow::Result<()> {
    match cli.command {
        Command::Up(args) => {
            let _telemetry = cellmail_proto::server::init_tracing("cellmail");
            up::run(args).await
        }
        Command::Tenant(args) => tenant::run(args).await,
        Command::Cell(args) => cell::run(args).await,
        Command::Rebalance(args) => rebalance::run(args).await,
        Command::Key(args) => key::run(args).await,
        Command::Suppression(args) => suppression::run(args).await,
        Command::Send(args) => send::run(args).await,
        Command::Audit(args) => audit::run(args).await,
        Command::Rollout(args) => rollout::run(args).await,
        Command::Operator(args) => operator::run(args).await,
        Command::Certs(args) => certs::run(args),
        Command::Tracking(args) => tracking::run(args).await,
    }
}
