//! `cellmail rebalance`: the moves that would even out tenants across cells (a dry run), and
//! carrying out that plan, either as saved by `rebalance plan --json` or as it is now.

use anyhow::Context;
use cellmail_proto::v1;
use clap::{Args, Subcommand};
use serde_json::json;

use crate::control::{Connection, status};
use crate::operation::{OperationArgs, follow_operation, planned_json};

#[derive(Args)]
pub struct RebalanceArgs {
    #[command(subcommand)]
    command: RebalanceCommand,
    #[command(flatten)]
    connection: Connection,
}

#[derive(Subcommand)]
enum RebalanceCommand {
    /// The moves that would even out tenants per unit of capacity (a dry run).
    Plan,
    /// Carry out a plan: the one `rebalance plan --json` saved in `--plan FILE` (refused
    /// whole if a tenant of it moved since), or without `--plan` the plan as it is now.
    Apply {
        #[arg(long, value_name = "FILE")]
        plan: Option<std::path::PathBuf>,
        #[command(flatten)]
        operation: OperationArgs,
    },
}

pub async fn run(args: RebalanceArgs) -> anyhow::Result<()> {
    let mut client = args.connection.client().await?;
    match args.command {
        RebalanceCommand::Plan => {
            let plan = client
                .plan_rebalance(v1::PlanRebalanceRequest {})
                .await
                .map_err(status)?
                .into_inner();
            if args.connection.json {
                println!(
                    "{}",
                    json!(plan.moves.iter().map(planned_json).collect::<Vec<_>>())
                );
            } else if plan.moves.is_empty() {
                println!("balanced: no move would even the cells out further");
            } else {
                for m in &plan.moves {
                    println!("{:<20} {:<12} -> {}", m.tenant_id, m.from_cell, m.to_cell);
                }
            }
            Ok(())
        }
        RebalanceCommand::Apply { plan, operation } => {
            let moves = match plan {
                Some(path) => {
                    let moves = read_plan(&path)?;
                    if moves.is_empty() {
                        // An empty request would mean "the plan as it is now".
                        if args.connection.json {
                            println!(
                                "{}",
                                json!({"kind": "rebalance", "finished": true, "moves": []})
                            );
                        } else {
                            println!("the plan has no moves: nothing to apply");
                        }
                        return Ok(());
                    }
                    moves
                }
                None => Vec::new(),
            };
            let request = tonic::Request::new(v1::ApplyRebalanceRequest {
                parallel: operation.parallel,
                reason: operation.reason,
                moves,
            });
            let started = client
                .apply_rebalance(request)
                .await
                .map_err(status)?
                .into_inner();
            follow_operation(&mut client, started, operation.wait, args.connection.json).await
        }
    }
}

/// The moves of a plan `rebalance plan --json` printed, saved in `path`.
fn read_plan(path: &std::path::Path) -> anyhow::Result<Vec<v1::PlannedMoveInfo>> {
    let at = || format!("--plan {}", path.display());
    let text = std::fs::read_to_string(path).with_context(at)?;
    let plan: serde_json::Value = serde_json::from_str(&text).with_context(at)?;
    let moves = plan.as_array().with_context(|| {
        format!(
            "{}: not the JSON array `rebalance plan --json` prints",
            at()
        )
    })?;
    moves
        .iter()
        .enumerate()
        .map(|(n, m)| {
            let field = |name: &str| {
                m[name]
                    .as_str()
                    .map(str::to_owned)
                    .with_context(|| format!("{}: move {n} has no \"{name}\"", at()))
            };
            Ok(v1::PlannedMoveInfo {
                tenant_id: field("tenant")?,
                from_cell: field("from")?,
                to_cell: field("to")?,
                ..Default::default()
            })
        })
        .collect()
}
