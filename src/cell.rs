//! `cellmail cell`: list the cells, register one ahead of its process, change its state
//! (drain, disable, enable), or evacuate it (every tenant moved elsewhere).

use cellmail_proto::v1;
use clap::{Args, Subcommand};
use serde_json::json;

use crate::control::{Connection, status};
use crate::operation::{OperationArgs, follow_operation};

#[derive(Args)]
pub struct CellArgs {
    #[command(subcommand)]
    command: CellCommand,
    #[command(flatten)]
    connection: Connection,
}

#[derive(Subcommand)]
enum CellCommand {
    /// List cells with their state, liveness and load.
    List,
    /// Register a cell ahead of its process, with its capacity and labels.
    Add {
        id: String,
        /// Tenants the cell is sized for (default 1000).
        #[arg(long, default_value_t = 0)]
        capacity: u32,
        /// A label key=value (repeatable), for placement by label.
        #[arg(long = "label", value_parser = parse_label)]
        labels: Vec<(String, String)>,
        #[arg(long, default_value = "")]
        reason: String,
    },
    /// Give the cell no new tenants (its tenants stay until moved).
    Drain {
        id: String,
        #[arg(long, default_value = "")]
        reason: String,
    },
    /// Take the cell out of placement.
    Disable {
        id: String,
        #[arg(long, default_value = "")]
        reason: String,
    },
    /// Make the cell ACTIVE again.
    Enable {
        id: String,
        #[arg(long, default_value = "")]
        reason: String,
    },
    /// Empty the cell: DRAINING, then every tenant moved to other cells, --parallel at a time.
    Evacuate {
        id: String,
        #[command(flatten)]
        operation: OperationArgs,
    },
}

pub async fn run(args: CellArgs) -> anyhow::Result<()> {
    let mut client = args.connection.client().await?;
    let (id, state, reason) = match args.command {
        CellCommand::List => {
            let cells = client
                .list_cells(v1::ListCellsRequest {})
                .await
                .map_err(status)?
                .into_inner()
                .cells;
            if args.connection.json {
                println!("{}", json!(cells.iter().map(cell_json).collect::<Vec<_>>()));
            } else {
                println!(
                    "{:<12} {:<9} {:<5} {:>8} {:>8}  {:<20} {:<20} ENDPOINT",
                    "CELL", "STATE", "UP", "TENANTS", "CAPACITY", "VERSION", "BUILD"
                );
                for c in cells {
                    let up = if c.alive { "up" } else { "DOWN" };
                    println!(
                        "{:<12} {:<9} {:<5} {:>8} {:>8}  {:<20} {:<20} {}",
                        c.id, c.state, up, c.tenants, c.capacity, c.version, c.build, c.endpoint
                    );
                }
            }
            return Ok(());
        }
        CellCommand::Add {
            id,
            capacity,
            labels,
            reason,
        } => {
            let request = tonic::Request::new(v1::AddCellRequest {
                id,
                capacity,
                labels: labels.into_iter().collect(),
                reason,
            });
            let added = client.add_cell(request).await.map_err(status)?;
            println!("{}", cell_json(&added.into_inner()));
            return Ok(());
        }
        CellCommand::Evacuate { id, operation } => {
            let request = tonic::Request::new(v1::EvacuateCellRequest {
                cell_id: id,
                parallel: operation.parallel,
                reason: operation.reason,
            });
            let started = client
                .evacuate_cell(request)
                .await
                .map_err(status)?
                .into_inner();
            return follow_operation(&mut client, started, operation.wait, args.connection.json)
                .await;
        }
        CellCommand::Drain { id, reason } => (id, "DRAINING", reason),
        CellCommand::Disable { id, reason } => (id, "DISABLED", reason),
        CellCommand::Enable { id, reason } => (id, "ACTIVE", reason),
    };
    let request = tonic::Request::new(v1::SetCellStateRequest {
        cell_id: id,
        state: state.to_owned(),
        reason,
    });
    let changed = client.set_cell_state(request).await.map_err(status)?;
    println!("{}", cell_json(&changed.into_inner()));
    Ok(())
}

fn cell_json(c: &v1::CellInfo) -> serde_json::Value {
    json!({
        "cell": c.id, "endpoint": c.endpoint, "state": c.state, "alive": c.alive,
        "capacity": c.capacity, "tenants": c.tenants, "version": c.version, "build": c.build,
    })
}

/// A cell label `key=value`, as `--label` takes it (a cell's own, or one a tenant's cell
/// must carry).
pub(crate) fn parse_label(text: &str) -> Result<(String, String), String> {
    text.split_once('=')
        .map(|(k, v)| (k.to_owned(), v.to_owned()))
        .ok_or_else(|| format!("--label {text:?}: expected key=value"))
}
