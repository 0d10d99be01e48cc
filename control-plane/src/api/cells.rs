//! Cells: listed with their load and liveness, added by an operator, and set ACTIVE,
//! DRAINING or DISABLED, each change audited with the record before and after.

use cellmail_proto::error::quote;
use cellmail_proto::v1;
use cellmail_proto::{ApiError, CellId, now_ms};
use tonic::Request;

use super::{ControlApi, actor};
use cellmail_registry::audit;
use cellmail_registry::catalog::Catalog;
use cellmail_registry::schema::{self, AuditRecord, CellRecord, CellState};

impl ControlApi {
    pub(super) async fn list_cells(
        &self,
        _request: Request<v1::ListCellsRequest>,
    ) -> Result<v1::ListCellsResponse, ApiError> {
        let catalog = self.catalog(&["cells", "alive", "placements"]).await?;
        let mut cells: Vec<_> = catalog
            .cells
            .iter()
            .map(|(id, cell)| cell_info(&catalog, id, cell))
            .collect();
        cells.sort_by(|a, b| a.id.cmp(&b.id));
        Ok(v1::ListCellsResponse { cells })
    }

    pub(super) async fn add_cell(
        &self,
        request: Request<v1::AddCellRequest>,
    ) -> Result<v1::CellInfo, ApiError> {
        let actor = actor(&request);
        let req = request.into_inner();
        let id = CellId::from_field("id", req.id)?;
        let record = CellRecord {
            endpoint: "".into(),
            capacity: if req.capacity == 0 {
                1000
            } else {
                req.capacity
            },
            state: CellState::Active,
            labels: req.labels.into_iter().collect(),
            version: String::new(),
            build: String::new(),
            ses_region: None,
        };
        let entry = AuditRecord {
            at_ms: now_ms(),
            actor,
            action: format!("cell.add {id}"),
            tenant: None,
            reason: req.reason,
            before: None,
            after: audit::snapshot(&record),
        };
        self.write_cell(&id, 0, &record, &entry).await?;
        self.cell_now(&id).await
    }

    pub(super) async fn set_cell_state(
        &self,
        request: Request<v1::SetCellStateRequest>,
    ) -> Result<v1::CellInfo, ApiError> {
        let actor = actor(&request);
        let req = request.into_inner();
        let id = CellId::from_field("cell_id", req.cell_id)?;
        let state = match req.state.to_ascii_uppercase().as_str() {
            "ACTIVE" => CellState::Active,
            "DRAINING" => CellState::Draining,
            "DISABLED" => CellState::Disabled,
            other => {
                return Err(ApiError::invalid(
                    "state",
                    format!("{} is not ACTIVE, DRAINING or DISABLED", quote(other)),
                ));
            }
        };
        self.change_cell_state(&id, state, (actor, req.reason))
            .await
    }

    /// Sets cell `id` to `state`, audited for `(actor, reason)` unless it is in it already,
    /// and answers the cell as it is now.
    pub(super) async fn change_cell_state(
        &self,
        id: &CellId,
        state: CellState,
        (actor, reason): (String, String),
    ) -> Result<v1::CellInfo, ApiError> {
        let kv = self
            .registry
            .get(&self.keys.cell(id))
            .await
            .map_err(ApiError::from)?
            .ok_or_else(|| ApiError::NotFound(format!("cell {id} does not exist")))?;
        let before: CellRecord = schema::decode(&kv.value)
            .map_err(|e| ApiError::Internal(format!("cell {id}'s record: {e}")))?;
        if before.state != state {
            let after = CellRecord {
                state,
                ..before.clone()
            };
            let entry = AuditRecord {
                at_ms: now_ms(),
                actor,
                action: format!("cell.state {id}"),
                tenant: None,
                reason,
                before: audit::snapshot(&before),
                after: audit::snapshot(&after),
            };
            self.write_cell(id, kv.mod_revision, &after, &entry).await?;
            tracing::warn!(cell = %id, ?state, "cell state changed");
        }
        self.cell_now(id).await
    }

    /// Cell `id` as operators see it now.
    async fn cell_now(&self, id: &CellId) -> Result<v1::CellInfo, ApiError> {
        let catalog = self.catalog(&["cells", "alive", "placements"]).await?;
        let cell = catalog
            .cells
            .get(id)
            .ok_or_else(|| ApiError::NotFound(format!("cell {id} does not exist")))?;
        Ok(cell_info(&catalog, id, cell))
    }

    /// Writes `after` as cell `id`'s record, with its audit entry, if the record is still at
    /// `revision` (0: absent).
    async fn write_cell(
        &self,
        id: &CellId,
        revision: u64,
        after: &CellRecord,
        entry: &AuditRecord,
    ) -> Result<(), ApiError> {
        let key = self.keys.cell(id);
        let written = audit::write(
            self.registry.as_ref(),
            &self.keys,
            &key,
            revision,
            schema::encode(after),
            entry,
        )
        .await
        .map_err(ApiError::from)?;
        match (written, revision) {
            (true, _) => Ok(()),
            (false, 0) => Err(ApiError::AlreadyExists(format!("cell {id} already exists"))),
            (false, _) => Err(ApiError::Aborted(format!(
                "cell {id} changed meanwhile; try again"
            ))),
        }
    }
}

fn cell_info(catalog: &Catalog, id: &CellId, cell: &CellRecord) -> v1::CellInfo {
    v1::CellInfo {
        id: id.to_string(),
        endpoint: cell.endpoint.to_string(),
        capacity: cell.capacity,
        state: format!("{:?}", cell.state).to_uppercase(),
        tenants: catalog.load().get(id).copied().unwrap_or(0),
        alive: catalog.alive.contains(id),
        version: cell.version.clone(),
        build: cell.build.clone(),
    }
}
