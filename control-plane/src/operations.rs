//! Evacuations and rebalances: a planned list of tenant moves (`operations/<id>`), carried
//! out a bounded number at a time by the leading control plane.
//!
//! The plan is made when the operation starts ([`crate::placement::evacuation`],
//! [`crate::placement::rebalance`]) and persisted with it. On every pass the leader settles
//! the moves that finished (COMPLETE, or why not), then requests more until `parallel` are
//! under way; when none is left the operation is finished. A move an operation requested
//! carries the operation in its actor, so a pass that requested a move but could not record
//! it adopts the move on the next pass instead of refusing it as "already moving".

use std::collections::HashSet;
use std::sync::Arc;
use std::time::Duration;

use cellmail_proto::v1;
use cellmail_proto::{ApiError, CellId, TenantId, now_ms};

use crate::moves;
use crate::placement::Planned;
use crate::records;
use cellmail_registry::audit;
use cellmail_registry::catalog::Catalog;
use cellmail_registry::schema::{
    self, AuditRecord, Keys, MoveStep, OperationKind, OperationRecord, PlannedMove,
};
use cellmail_registry::{Compare, Op, Registry};
use tokio_util::sync::CancellationToken;

/// Moves under way at once when the operator sets none.
pub const DEFAULT_PARALLEL: u32 = 4;

/// The actor of the moves operation `record` requests.
fn mover_of(record: &OperationRecord) -> String {
    format!("{} (operation {})", record.actor, record.id)
}

/// A planned move, not yet requested.
pub fn pending(planned: Planned) -> PlannedMove {
    PlannedMove {
        tenant: planned.tenant,
        from: planned.from,
        to: Some(planned.to),
        move_id: None,
        outcome: String::new(),
    }
}

/// The moves of a plan an operator reviewed (as [`planned_info`] gave them), checked against
/// the registry now: a plan naming an unknown tenant or cell, a tenant twice, or a tenant
/// that is no longer where the plan found it is refused whole, naming the move, so that what
/// runs is what was reviewed. Whether the target still takes the tenant is checked when each
/// move is requested, as for any move.
pub fn reviewed(
    plan: &[v1::PlannedMoveInfo],
    catalog: &Catalog,
) -> Result<Vec<PlannedMove>, ApiError> {
    let mut seen = HashSet::new();
    plan.iter()
        .enumerate()
        .map(|(n, m)| {
            let field = |name: &str| format!("moves[{n}].{name}");
            let id = |name: &str, text: &str| CellId::from_field(&field(name), text);
            let tenant = TenantId::new(&m.tenant_id)
                .map_err(|e| ApiError::invalid(field("tenant_id"), e.to_string()))?;
            let (from, to) = (id("from_cell", &m.from_cell)?, id("to_cell", &m.to_cell)?);
            if !seen.insert(tenant.clone()) {
                let why = format!("tenant {tenant} is moved twice in the plan");
                return Err(ApiError::invalid(field("tenant_id"), why));
            }
            if !catalog.cells.contains_key(&to) {
                let why = format!("cell {to} does not exist");
                return Err(ApiError::invalid(field("to_cell"), why));
            }
            let Some(placement) = catalog.placements.get(&tenant) else {
                let why = format!("tenant {tenant} does not exist");
                return Err(ApiError::invalid(field("tenant_id"), why));
            };
            if placement.cell != from {
                return Err(ApiError::FailedPrecondition(format!(
                    "{}: tenant {tenant} is on cell {}, not {from}: the plan is stale, \
                     make a new one",
                    field("from_cell"),
                    placement.cell
                )));
            }
            Ok(pending(Planned { tenant, from, to }))
        })
        .collect()
}

/// A tenant of `cell` that no other cell can take, and why.
pub fn stuck(tenant: TenantId, cell: CellId, why: String) -> PlannedMove {
    PlannedMove {
        tenant,
        from: cell,
        to: None,
        move_id: None,
        outcome: why,
    }
}

/// Writes a new operation of `moves`, with its audit entry.
pub async fn start(
    registry: &dyn Registry,
    keys: &Keys,
    kind: OperationKind,
    parallel: u32,
    moves: Vec<PlannedMove>,
    (actor, reason): (String, String),
) -> Result<OperationRecord, ApiError> {
    let now = now_ms();
    let record = OperationRecord {
        id: ulid::Ulid::new().to_string(),
        kind,
        parallel: if parallel == 0 {
            DEFAULT_PARALLEL
        } else {
            parallel
        },
        finished: moves.iter().all(|m| !m.outcome.is_empty()),
        moves,
        actor: actor.clone(),
        reason: reason.clone(),
        started_at_ms: now,
        updated_at_ms: now,
    };
    let entry = AuditRecord {
        at_ms: now,
        actor,
        action: format!("operation.{}", kind_name(&record.kind)),
        tenant: None,
        reason,
        before: None,
        after: audit::snapshot(&record),
    };
    let key = keys.operation(&record.id);
    let written = audit::write(registry, keys, &key, 0, schema::encode(&record), &entry)
        .await
        .map_err(ApiError::from)?;
    if !written {
        return Err(ApiError::Aborted(format!("operation {} exists", record.id)));
    }
    Ok(record)
}

fn kind_name(kind: &OperationKind) -> &'static str {
    match kind {
        OperationKind::Evacuate { .. } => "evacuate",
        OperationKind::Rebalance => "rebalance",
    }
}

pub async fn get(
    registry: &dyn Registry,
    keys: &Keys,
    id: &str,
) -> Result<OperationRecord, ApiError> {
    let kv = registry
        .get(&keys.operation(id))
        .await
        .map_err(ApiError::from)?
        .ok_or_else(|| ApiError::NotFound(format!("operation {id} does not exist")))?;
    schema::decode(&kv.value).map_err(|e| ApiError::Internal(format!("operation {id}: {e}")))
}

/// How often the leader passes over the unfinished operations.
const SCAN: Duration = Duration::from_millis(100);

/// Until `lost` is cancelled: one pass over every unfinished operation per scan, on the
/// leading control plane (whose [`crate::moves::Mover`] carries the moves it requests).
pub async fn run(registry: Arc<dyn Registry>, keys: Keys, lost: CancellationToken) {
    let mut tick = tokio::time::interval(SCAN);
    loop {
        tokio::select! {
            () = lost.cancelled() => return,
            _ = tick.tick() => {}
        }
        for (record, revision) in
            records::list::<OperationRecord>(registry.as_ref(), &keys.operations()).await
        {
            if record.finished {
                continue;
            }
            let id = record.id.clone();
            if let Err(err) = advance(registry.as_ref(), &keys, record, revision).await {
                tracing::warn!(%err, operation = %id, "advancing the operation failed; retrying");
            }
        }
    }
}

/// One pass over a running operation (`revision`: its record's): settles the moves that
/// finished, requests more up to `parallel`, and finishes it when nothing is left.
pub async fn advance(
    registry: &dyn Registry,
    keys: &Keys,
    mut record: OperationRecord,
    revision: u64,
) -> Result<(), ApiError> {
    let before = record.clone();
    let mover = mover_of(&record);
    let mut under_way = 0;
    for planned in record.moves.iter_mut().filter(|m| m.outcome.is_empty()) {
        if planned.move_id.is_none() && under_way >= record.parallel {
            continue;
        }
        let latest = moves::latest(registry, keys, &planned.tenant).await?;
        match (&planned.move_id, latest) {
            (Some(id), Some(latest)) if *id == latest.id => match latest.step {
                MoveStep::Complete => planned.outcome = latest.step.as_str().to_owned(),
                MoveStep::RolledBack => planned.outcome = format!("ROLLED_BACK: {}", latest.detail),
                _ => under_way += 1,
            },
            (Some(_), _) => planned.outcome = "replaced by another move".to_owned(),
            (None, Some(latest)) if latest.actor == mover && !latest.step.finished() => {
                planned.move_id = Some(latest.id);
                under_way += 1;
            }
            (None, _) => {
                let Some(to) = &planned.to else { continue };
                let requested = moves::request(
                    registry,
                    keys,
                    &planned.tenant,
                    to,
                    mover.clone(),
                    record.reason.clone(),
                )
                .await;
                match requested {
                    Ok(started) => {
                        planned.move_id = Some(started.id);
                        under_way += 1;
                    }
                    Err(err) => planned.outcome = err.to_string(),
                }
            }
        }
    }
    record.finished = under_way == 0 && record.moves.iter().all(|m| !m.outcome.is_empty());
    if record == before {
        return Ok(());
    }
    record.updated_at_ms = now_ms();
    let key = keys.operation(&record.id);
    let mut ops = vec![Op::Put {
        key: key.clone(),
        value: schema::encode(&record),
        lease: None,
    }];
    if record.finished {
        let done = record
            .moves
            .iter()
            .filter(|m| m.outcome == "COMPLETE")
            .count();
        tracing::info!(operation = %record.id, done, of = record.moves.len(), "operation finished");
        ops.push(audit::entry_op(
            keys,
            &AuditRecord {
                at_ms: record.updated_at_ms,
                actor: record.actor.clone(),
                action: format!("operation.{}.finish", kind_name(&record.kind)),
                tenant: None,
                reason: format!("{done} of {} moves complete", record.moves.len()),
                before: audit::snapshot(&before),
                after: audit::snapshot(&record),
            },
        ));
    }
    let compare = Compare {
        key,
        mod_revision: revision,
    };
    registry
        .txn(vec![compare], ops)
        .await
        .map_err(ApiError::from)?;
    Ok(())
}

/// A planned move as operators see it.
pub fn planned_info(m: &PlannedMove) -> v1::PlannedMoveInfo {
    v1::PlannedMoveInfo {
        tenant_id: m.tenant.to_string(),
        from_cell: m.from.to_string(),
        to_cell: m.to.as_ref().map(ToString::to_string).unwrap_or_default(),
        move_id: m.move_id.clone().unwrap_or_default(),
        outcome: m.outcome.clone(),
    }
}

pub fn info(record: &OperationRecord) -> v1::OperationInfo {
    v1::OperationInfo {
        id: record.id.clone(),
        kind: kind_name(&record.kind).to_owned(),
        cell: match &record.kind {
            OperationKind::Evacuate { cell } => cell.to_string(),
            OperationKind::Rebalance => String::new(),
        },
        parallel: record.parallel,
        moves: record.moves.iter().map(planned_info).collect(),
        finished: record.finished,
        actor: record.actor.clone(),
        reason: record.reason.clone(),
        started_at_ms: record.started_at_ms as i64,
        updated_at_ms: record.updated_at_ms as i64,
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use cellmail_proto::Epoch;
    use cellmail_registry::schema::{CellRecord, CellState, PlacementRecord, PlacementState};

    fn planned(tenant: &str, from: &str, to: &str) -> v1::PlannedMoveInfo {
        v1::PlannedMoveInfo {
            tenant_id: tenant.into(),
            from_cell: from.into(),
            to_cell: to.into(),
            ..Default::default()
        }
    }

    /// Cells c1 and c2; tenant a on c1, b on c2.
    fn catalog() -> Catalog {
        let mut catalog = Catalog::default();
        for cell in ["c1", "c2"] {
            let record = CellRecord {
                endpoint: "".into(),
                capacity: 10,
                state: CellState::Active,
                labels: Default::default(),
                version: String::new(),
                build: String::new(),
                ses_region: None,
            };
            catalog.cells.insert(CellId::new(cell).unwrap(), record);
        }
        for (tenant, cell) in [("a", "c1"), ("b", "c2")] {
            let placement = PlacementRecord {
                cell: CellId::new(cell).unwrap(),
                epoch: Epoch(1),
                state: PlacementState::Serving,
            };
            catalog
                .placements
                .insert(TenantId::new(tenant).unwrap(), placement);
        }
        catalog
    }

    #[test]
    fn a_reviewed_plan_runs_as_reviewed_and_a_stale_or_bad_one_is_refused_naming_the_move() {
        let catalog = catalog();
        let moves = reviewed(
            &[planned("a", "c1", "c2"), planned("b", "c2", "c1")],
            &catalog,
        )
        .unwrap();
        let pairs: Vec<_> = moves
            .iter()
            .map(|m| {
                (
                    m.tenant.as_str(),
                    m.from.as_str(),
                    m.to.as_ref().map(|c| c.as_str()),
                )
            })
            .collect();
        assert_eq!(pairs, [("a", "c1", Some("c2")), ("b", "c2", Some("c1"))]);
        assert!(
            moves
                .iter()
                .all(|m| m.move_id.is_none() && m.outcome.is_empty())
        );

        let refused = |plan: &[v1::PlannedMoveInfo]| reviewed(plan, &catalog).unwrap_err();
        // b moved to c2 after the plan saw it on c1.
        match refused(&[planned("a", "c1", "c2"), planned("b", "c1", "c2")]) {
            ApiError::FailedPrecondition(why) => {
                assert!(
                    why.starts_with("moves[1].from_cell: tenant b is on cell c2"),
                    "{why}"
                )
            }
            other => panic!("{other:?}"),
        }
        for (plan, field) in [
            (vec![planned("ghost", "c1", "c2")], "moves[0].tenant_id"),
            (vec![planned("a", "c1", "c9")], "moves[0].to_cell"),
            (vec![planned("a", "c1", "not a cell!")], "moves[0].to_cell"),
            (
                vec![planned("a", "c1", "c2"), planned("a", "c1", "c2")],
                "moves[1].tenant_id",
            ),
        ] {
            match refused(&plan) {
                ApiError::InvalidArgument { field: named, .. } => assert_eq!(named, field),
                other => panic!("{plan:?}: {other:?}"),
            }
        }
    }
}
