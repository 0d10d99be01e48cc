//! Moving tenants: one tenant at an operator's word, every tenant off a cell (evacuation), or
//! the moves that even the cells out (rebalance, planned for review, then applied). The
//! leading control plane carries each move and operation forward; these handlers only
//! request them and report on them.

use cellmail_proto::v1;
use cellmail_proto::{ApiError, CellId, TenantId};
use tonic::Request;

use super::{ControlApi, actor, planning_view};
use crate::moves;
use crate::operations;
use crate::placement;
use cellmail_registry::catalog::Catalog;
use cellmail_registry::schema::{CellState, OperationKind};

impl ControlApi {
    pub(super) async fn move_tenant(
        &self,
        request: Request<v1::MoveTenantRequest>,
    ) -> Result<v1::MoveInfo, ApiError> {
        let actor = actor(&request);
        let request = request.into_inner();
        let tenant = TenantId::from_field("tenant_id", request.tenant_id)?;
        let to = CellId::from_field("to_cell", request.to_cell)?;
        let record = moves::request(
            self.registry.as_ref(),
            &self.keys,
            &tenant,
            &to,
            actor,
            request.reason,
        )
        .await?;
        tracing::info!(tenant = %tenant, from = %record.from, to = %record.to, "tenant move requested");
        Ok(moves::info(&record))
    }

    pub(super) async fn get_move(
        &self,
        request: Request<v1::GetMoveRequest>,
    ) -> Result<v1::MoveInfo, ApiError> {
        let tenant = TenantId::from_field("tenant_id", request.into_inner().tenant_id)?;
        let record = moves::latest(self.registry.as_ref(), &self.keys, &tenant)
            .await?
            .ok_or_else(|| ApiError::NotFound(format!("tenant {tenant} has not been moved")))?;
        Ok(moves::info(&record))
    }

    pub(super) async fn evacuate_cell(
        &self,
        request: Request<v1::EvacuateCellRequest>,
    ) -> Result<v1::OperationInfo, ApiError> {
        let actor = actor(&request);
        let req = request.into_inner();
        let cell = CellId::from_field("cell_id", &req.cell_id)?;
        let drain = (actor.clone(), req.reason.clone());
        self.change_cell_state(&cell, CellState::Draining, drain)
            .await?;
        let catalog = self.planning().await?;
        let (candidates, placed) = planning_view(&catalog);
        let (planned, stuck) = placement::evacuation(&candidates, &placed, &cell);
        let mut moves: Vec<_> = planned.into_iter().map(operations::pending).collect();
        moves.extend(stuck.into_iter().map(|tenant| {
            let why = "no other ACTIVE live cell with room meets its labels".to_owned();
            operations::stuck(tenant, cell.clone(), why)
        }));
        let kind = OperationKind::Evacuate { cell };
        let record = operations::start(
            self.registry.as_ref(),
            &self.keys,
            kind,
            req.parallel,
            moves,
            (actor, req.reason),
        )
        .await?;
        Ok(operations::info(&record))
    }

    pub(super) async fn plan_rebalance(
        &self,
        _request: Request<v1::PlanRebalanceRequest>,
    ) -> Result<v1::RebalancePlan, ApiError> {
        let moves = self
            .rebalance_moves()
            .await?
            .into_iter()
            .map(|p| operations::planned_info(&operations::pending(p)))
            .collect();
        Ok(v1::RebalancePlan { moves })
    }

    pub(super) async fn apply_rebalance(
        &self,
        request: Request<v1::ApplyRebalanceRequest>,
    ) -> Result<v1::OperationInfo, ApiError> {
        let actor = actor(&request);
        let request = request.into_inner();
        let moves = if request.moves.is_empty() {
            self.rebalance_moves()
                .await?
                .into_iter()
                .map(operations::pending)
                .collect()
        } else {
            operations::reviewed(&request.moves, &self.planning().await?)?
        };
        let record = operations::start(
            self.registry.as_ref(),
            &self.keys,
            OperationKind::Rebalance,
            request.parallel,
            moves,
            (actor, request.reason),
        )
        .await?;
        Ok(operations::info(&record))
    }

    pub(super) async fn get_operation(
        &self,
        request: Request<v1::GetOperationRequest>,
    ) -> Result<v1::OperationInfo, ApiError> {
        let id = request.into_inner().id;
        if id.is_empty() {
            return Err(ApiError::invalid("id", "is required"));
        }
        let record = operations::get(self.registry.as_ref(), &self.keys, &id).await?;
        Ok(operations::info(&record))
    }

    /// The cells and tenants as plans see them now.
    async fn planning(&self) -> Result<Catalog, ApiError> {
        self.catalog(&["cells", "alive", "placements", "tenants"])
            .await
    }

    /// The moves that would even the cells out now.
    async fn rebalance_moves(&self) -> Result<Vec<placement::Planned>, ApiError> {
        let catalog = self.planning().await?;
        let (candidates, placed) = planning_view(&catalog);
        Ok(placement::rebalance(&candidates, &placed))
    }
}
