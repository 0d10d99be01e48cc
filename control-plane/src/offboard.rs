//! Offboarding a tenant: once it is suspended (every router refuses its sends), its cell has
//! delivered what it had accepted and every cell is up, [`export`] gathers everything every
//! cell keeps of it (suppressions, messages with their events, figures), and [`delete`]
//! erases that on every cell and then its records in the registry (tenant, placement, API keys and their use,
//! breakers, move), audited in the same transaction. The operator's CLI writes the export to
//! a file before it asks for the deletion.

use cellmail_proto::v1;
use cellmail_proto::{ApiError, TenantId, now_ms};

use crate::registered::{self, RegisteredCell};
use cellmail_registry::apikey;
use cellmail_registry::audit;
use cellmail_registry::channels::CellChannels;
use cellmail_registry::schema::{
    self, AuditRecord, Keys, MoveRecord, PlacementRecord, TenantRecord, TenantStatus,
};
use cellmail_registry::{Compare, Op, Registry};

/// The tenant's record, placement and their mod revisions, once it is suspended and not
/// moving.
async fn suspended(
    registry: &dyn Registry,
    keys: &Keys,
    tenant: &TenantId,
) -> Result<((TenantRecord, u64), (PlacementRecord, u64)), ApiError> {
    let read = |key: String| async move {
        registry
            .get(&key)
            .await
            .map_err(ApiError::from)?
            .ok_or_else(|| ApiError::NotFound(format!("tenant {tenant} does not exist")))
    };
    let (tenant_kv, placement_kv) = (
        read(keys.tenant(tenant)).await?,
        read(keys.placement(tenant)).await?,
    );
    let record: TenantRecord = schema::decode(&tenant_kv.value)
        .map_err(|e| ApiError::Internal(format!("tenant {tenant}'s record: {e}")))?;
    if record.status != TenantStatus::Suspended {
        return Err(ApiError::FailedPrecondition(format!(
            "tenant {tenant} is active: suspend it first (cellmail tenant suspend)"
        )));
    }
    let placement: PlacementRecord = schema::decode(&placement_kv.value)
        .map_err(|e| ApiError::Internal(format!("tenant {tenant}'s placement: {e}")))?;
    if let Some(kv) = registry
        .get(&keys.move_of(tenant))
        .await
        .map_err(ApiError::from)?
        && let Ok(moving) = schema::decode::<MoveRecord>(&kv.value)
        && !moving.step.finished()
    {
        return Err(ApiError::FailedPrecondition(format!(
            "tenant {tenant} is moving to {}; offboard it once the move is done",
            moving.to
        )));
    }
    Ok((
        (record, tenant_kv.mod_revision),
        (placement, placement_kv.mod_revision),
    ))
}

/// The registered cells, once every one is up and the tenant's cell has delivered what it
/// accepted: an offboarding must reach every cell that may hold some of the tenant, both to
/// export it and to erase it, so a cell that is down stops it (UNAVAILABLE, retry).
async fn reachable(
    registry: &dyn Registry,
    keys: &Keys,
    channels: &CellChannels,
    tenant: &TenantId,
    placement: &PlacementRecord,
) -> Result<Vec<RegisteredCell>, ApiError> {
    let cells = registered::cells(registry, keys).await?;
    let down: Vec<String> = cells
        .iter()
        .filter(|c| !c.alive)
        .map(|c| c.id.to_string())
        .collect();
    if !down.is_empty() {
        return Err(ApiError::Unavailable(format!(
            "cells {} are down and may hold some of tenant {tenant}: bring them back first",
            down.join(", ")
        )));
    }
    let home = cells
        .iter()
        .find(|c| c.id == placement.cell)
        .ok_or_else(|| ApiError::Internal(format!("cell {} is not registered", placement.cell)))?;
    let request = v1::TenantBacklogRequest {
        tenant_id: tenant.to_string(),
    };
    let backlog = channels
        .client(&home.id, &home.record.endpoint)?
        .tenant_backlog(request)
        .await
        .map_err(|s| ApiError::Unavailable(format!("cell {}: {}", home.id, s.message())))?
        .into_inner()
        .messages;
    if backlog > 0 {
        return Err(ApiError::Unavailable(format!(
            "cell {} is still delivering {backlog} of tenant {tenant}'s messages; retry",
            home.id
        )));
    }
    Ok(cells)
}

/// Everything every cell keeps of the suspended `tenant`.
pub async fn export(
    registry: &dyn Registry,
    keys: &Keys,
    channels: &CellChannels,
    tenant: &TenantId,
) -> Result<Vec<v1::TenantData>, ApiError> {
    let (_, (placement, _)) = suspended(registry, keys, tenant).await?;
    let mut parts = Vec::new();
    for cell in reachable(registry, keys, channels, tenant, &placement).await? {
        let request = v1::TenantDataRequest {
            tenant_id: tenant.to_string(),
        };
        let unavailable =
            |s: tonic::Status| ApiError::Unavailable(format!("cell {}: {}", cell.id, s.message()));
        let mut stream = channels
            .client(&cell.id, &cell.record.endpoint)?
            .export_tenant_data(request)
            .await
            .map_err(unavailable)?
            .into_inner();
        while let Some(part) = stream.message().await.map_err(unavailable)? {
            parts.push(part);
        }
    }
    Ok(once_each(parts))
}

/// A moved tenant's messages and suppressions are kept by the cells it moved between: each
/// message stays once, as the cell with the most events has it, and each suppression once,
/// its latest entry. Figures stay per cell (each counted its own).
fn once_each(mut parts: Vec<v1::TenantData>) -> Vec<v1::TenantData> {
    use std::collections::HashMap;
    let mut best: HashMap<String, (usize, usize)> = HashMap::new();
    let mut latest: HashMap<String, (i64, usize)> = HashMap::new();
    for (n, part) in parts.iter().enumerate() {
        for m in &part.messages {
            let entry = best
                .entry(m.message_id.clone())
                .or_insert((n, m.events.len()));
            if m.events.len() > entry.1 {
                *entry = (n, m.events.len());
            }
        }
        for s in &part.suppressions {
            let key = cellmail_proto::suppression_key(&s.address);
            let entry = latest.entry(key).or_insert((s.created_at_ms, n));
            if s.created_at_ms > entry.0 {
                *entry = (s.created_at_ms, n);
            }
        }
    }
    for (n, part) in parts.iter_mut().enumerate() {
        part.messages
            .retain(|m| best.get(&m.message_id).is_some_and(|(at, _)| *at == n));
        part.suppressions.retain(|s| {
            let key = cellmail_proto::suppression_key(&s.address);
            latest.get(&key).is_some_and(|(_, at)| *at == n)
        });
    }
    parts
}

/// Erases the suspended `tenant` on every cell, then its registry records: the cells erased.
pub async fn delete(
    registry: &dyn Registry,
    keys: &Keys,
    channels: &CellChannels,
    tenant: &TenantId,
    (actor, reason): (String, String),
) -> Result<v1::DeleteTenantResponse, ApiError> {
    let ((record, tenant_revision), (placement, placement_revision)) =
        suspended(registry, keys, tenant).await?;
    let mut response = v1::DeleteTenantResponse::default();
    for cell in reachable(registry, keys, channels, tenant, &placement).await? {
        let request = v1::TenantDataRequest {
            tenant_id: tenant.to_string(),
        };
        channels
            .client(&cell.id, &cell.record.endpoint)?
            .erase_tenant(request)
            .await
            .map_err(|s| ApiError::Unavailable(format!("cell {}: {}", cell.id, s.message())))?;
        response.cells.push(cell.id.to_string());
    }
    let mut ops = vec![
        Op::Delete {
            key: keys.tenant(tenant),
        },
        Op::Delete {
            key: keys.placement(tenant),
        },
        Op::Delete {
            key: keys.move_of(tenant),
        },
    ];
    for (key, _) in apikey::of_tenant(registry, keys, tenant)
        .await
        .map_err(ApiError::from)?
    {
        let hash = key.rsplit('/').next().unwrap_or_default();
        ops.push(Op::Delete {
            key: keys.key_use(hash),
        });
        ops.push(Op::Delete { key });
    }
    let breakers = registry
        .list(&keys.breakers_of(tenant))
        .await
        .map_err(ApiError::from)?;
    ops.extend(
        breakers
            .entries
            .into_iter()
            .map(|kv| Op::Delete { key: kv.key }),
    );
    let entry = AuditRecord {
        at_ms: now_ms(),
        actor,
        action: "tenant.offboard".into(),
        tenant: Some(tenant.clone()),
        reason,
        before: audit::snapshot(&(&record, &placement)),
        after: None,
    };
    ops.push(audit::entry_op(keys, &entry));
    let compares = vec![
        Compare {
            key: keys.tenant(tenant),
            mod_revision: tenant_revision,
        },
        Compare {
            key: keys.placement(tenant),
            mod_revision: placement_revision,
        },
    ];
    if registry
        .txn(compares, ops)
        .await
        .map_err(ApiError::from)?
        .is_none()
    {
        return Err(ApiError::Aborted(format!(
            "tenant {tenant} changed meanwhile; try again"
        )));
    }
    tracing::info!(%tenant, cells = ?response.cells, "tenant offboarded");
    Ok(response)
}
