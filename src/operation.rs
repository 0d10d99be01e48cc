//! Operations: the evacuation of a cell or a rebalance, a set of tenant moves the control
//! plane carries out a few at a time. `cell evacuate` and `rebalance apply` start one and
//! follow it here until its moves are done.

use cellmail_proto::v1;
use clap::Args;
use serde_json::json;

use crate::control::{Client, status};

/// How often a waiting command asks how its moves are going.
pub(crate) const MOVE_POLL: std::time::Duration = std::time::Duration::from_millis(100);

/// How an evacuation or a rebalance runs.
#[derive(Args)]
pub(crate) struct OperationArgs {
    /// Moves under way at once (default 4).
    #[arg(long, default_value_t = 0)]
    pub(crate) parallel: u32,
    /// Wait until every move is done.
    #[arg(long)]
    pub(crate) wait: bool,
    #[arg(long, default_value = "")]
    pub(crate) reason: String,
}

pub(crate) fn planned_json(m: &v1::PlannedMoveInfo) -> serde_json::Value {
    json!({"tenant": m.tenant_id, "from": m.from_cell, "to": m.to_cell, "move_id": m.move_id,
           "outcome": m.outcome})
}

/// Prints `operation` once it is finished (`wait`) or as it is now; fails if a move did not
/// complete.
pub(crate) async fn follow_operation(
    client: &mut Client,
    mut operation: v1::OperationInfo,
    wait: bool,
    as_json: bool,
) -> anyhow::Result<()> {
    while wait && !operation.finished {
        tokio::time::sleep(MOVE_POLL).await;
        let request = v1::GetOperationRequest {
            id: operation.id.clone(),
        };
        operation = client
            .get_operation(request)
            .await
            .map_err(status)?
            .into_inner();
    }
    let moves: Vec<_> = operation.moves.iter().map(planned_json).collect();
    if as_json {
        let out = json!({"id": operation.id, "kind": operation.kind, "cell": operation.cell,
            "parallel": operation.parallel, "finished": operation.finished, "moves": moves});
        println!("{out}");
    } else {
        let state = if operation.finished {
            "finished"
        } else {
            "under way"
        };
        println!(
            "{} {} {}: {state}",
            operation.kind, operation.cell, operation.id
        );
        for m in &operation.moves {
            println!(
                "  {:<20} {:<12} -> {:<12} {}",
                m.tenant_id, m.from_cell, m.to_cell, m.outcome
            );
        }
    }
    let failed: Vec<_> = operation
        .moves
        .iter()
        .filter(|m| !m.outcome.is_empty() && m.outcome != "COMPLETE")
        .map(|m| format!("{}: {}", m.tenant_id, m.outcome))
        .collect();
    anyhow::ensure!(failed.is_empty(), "not moved: {}", failed.join("; "));
    Ok(())
}
