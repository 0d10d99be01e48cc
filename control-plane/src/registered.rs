//! The cells registered in the registry, read now: what operators list and what offboarding
//! and rollouts walk.

use cellmail_proto::{ApiError, CellId};
use cellmail_registry::Registry;
use cellmail_registry::schema::{self, CellRecord, Entity, Keys};

/// A registered cell and whether it is up (its liveness key is there and it has registered
/// an endpoint).
pub struct RegisteredCell {
    pub id: CellId,
    pub record: CellRecord,
    pub alive: bool,
}

/// Every registered cell, by id, read from the registry now.
pub async fn cells(registry: &dyn Registry, keys: &Keys) -> Result<Vec<RegisteredCell>, ApiError> {
    let listed = registry.list(&keys.cells()).await.map_err(ApiError::from)?;
    let mut cells = Vec::new();
    for kv in listed.entries {
        let Some(Entity::Cell(id)) = keys.parse(&kv.key) else {
            continue;
        };
        let record: CellRecord = schema::decode(&kv.value)
            .map_err(|e| ApiError::Internal(format!("cell {id}'s record: {e}")))?;
        let alive = registry
            .get(&keys.alive(&id))
            .await
            .map_err(ApiError::from)?
            .is_some()
            && !record.endpoint.is_empty();
        cells.push(RegisteredCell { id, record, alive });
    }
    cells.sort_by(|a, b| a.id.cmp(&b.id));
    Ok(cells)
}
