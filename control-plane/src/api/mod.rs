//! The `Control` gRPC service: what operators do to tenants, cells and API keys.
//!
//! Reads go straight to the registry (operators expect to see their last write); a new
//! tenant's records (tenant, placement, first API key) are written in one transaction that
//! fails if the tenant already exists. Every change is written with its audit entry in one
//! transaction; an API key is audited by its id, never the key or its hash.
//!
//! Each RPC is answered by the `ControlApi` handler of the same name, in the file of its
//! resource; the `Control` impl here only turns their errors into gRPC statuses.
//!
//! - `tenants`: onboarding, suspending and resuming, offboarding.
//! - `domains`: a tenant's sending domains, added, verified and their DKIM keys rotated;
//!   having the tenant's cell set up its mail transport for it.
//! - `cells`: the cells, added and set ACTIVE, DRAINING or DISABLED.
//! - `keys`: a tenant's API keys, issued, listed and revoked.
//! - `suppressions`: the global suppression list.
//! - `moves`: moving a tenant, evacuating a cell, rebalancing, and their operations.
//! - `rollouts`: a version's rollout, started, paused, resumed or aborted.
//! - `audit`: the audit log.
//! - `operators`: named operator credentials, added, listed and revoked.
//! - `tracking`: the keys that sign engagement links, rotated.

mod audit;
mod cells;
mod domains;
mod keys;
mod moves;
mod operators;
mod rollouts;
mod suppressions;
mod tenants;
mod tracking;

use std::sync::Arc;

use cellmail_proto::ApiError;
use cellmail_proto::v1::{self, control_server::Control};
use tonic::{Request, Response, Status};

use crate::auth::Operator;
use crate::identity;
use crate::placement::{self, Candidate};
use cellmail_registry::Registry;
use cellmail_registry::catalog::{self, Catalog};
use cellmail_registry::channels::CellChannels;
use cellmail_registry::dkim::DkimKeys;
use cellmail_registry::schema::Keys;

pub struct ControlApi {
    registry: Arc<dyn Registry>,
    keys: Keys,
    dns: identity::Checker,
    /// What seals domains' DKIM keys (none: domains get no DKIM key of their own).
    dkim: Option<DkimKeys>,
    /// Whether a new tenant's domains count as verified (one-machine setups).
    trust_new_domains: bool,
    /// To the cells, for offboarding.
    channels: CellChannels,
    /// Whether this control plane has a deployer (rollouts are refused without one).
    rollouts: bool,
}

impl ControlApi {
    pub fn new(
        registry: Arc<dyn Registry>,
        keys: Keys,
        identities: &identity::IdentityConfig,
        rollouts: bool,
        channels: CellChannels,
    ) -> anyhow::Result<Self> {
        Ok(Self {
            registry,
            keys,
            dns: identity::Checker::new(identities)?,
            dkim: identities.dkim.load()?,
            trust_new_domains: identities.trust_new_domains,
            channels,
            rollouts,
        })
    }

    /// A catalog of the given kinds of record (`cells`, `alive`, `tenants`, `placements`).
    async fn catalog(&self, kinds: &[&str]) -> Result<Catalog, ApiError> {
        let prefixes: Vec<String> = kinds
            .iter()
            .map(|kind| format!("{}{kind}/", self.keys.prefix()))
            .collect();
        catalog::fetch(self.registry.as_ref(), &self.keys, &prefixes)
            .await
            .map(|(catalog, _)| catalog)
            .map_err(ApiError::from)
    }
}

/// The name of the operator a `Control` call acts for, as its credential says: the audit
/// trail's actor.
fn actor<T>(request: &Request<T>) -> String {
    request
        .extensions()
        .get::<Operator>()
        .map(|operator| operator.name.clone())
        .unwrap_or_default()
}

/// `catalog`'s cells and tenants as the placement plans take them.
fn planning_view(catalog: &Catalog) -> (Vec<Candidate<'_>>, Vec<placement::Placed<'_>>) {
    let load = catalog.load();
    let candidates = catalog
        .cells
        .iter()
        .map(|(id, record)| Candidate {
            id,
            record,
            alive: catalog.alive.contains(id),
            tenants: load.get(id).copied().unwrap_or(0),
        })
        .collect();
    let placed = catalog
        .placements
        .iter()
        .map(|(tenant, placement)| {
            let record = catalog.tenants.get(tenant);
            placement::Placed {
                tenant,
                cell: &placement.cell,
                requirements: record
                    .map(|r| placement::Requirements::of_tenant(tenant, r))
                    .unwrap_or_default(),
                pinned: record.is_some_and(|r| r.pinned),
            }
        })
        .collect();
    (candidates, placed)
}

type DataStream =
    std::pin::Pin<Box<dyn tokio_stream::Stream<Item = Result<v1::TenantData, Status>> + Send>>;

/// Implements `Control` with the listed RPCs, each answering what the `ControlApi` handler
/// of its name returns. One macro emits the whole impl because `async_trait` must see the
/// generated methods.
macro_rules! control {
    ($($rpc:ident($request:ty) -> $response:ty;)*) => {
        #[tonic::async_trait]
        impl Control for ControlApi {
            type ExportTenantDataStream = DataStream;

            async fn export_tenant_data(
                &self,
                request: Request<v1::TenantDataRequest>,
            ) -> Result<Response<DataStream>, Status> {
                let parts = ControlApi::export_tenant_data(self, request).await?;
                Ok(Response::new(Box::pin(tokio_stream::iter(
                    parts.into_iter().map(Ok),
                ))))
            }

            $(
                async fn $rpc(
                    &self,
                    request: Request<$request>,
                ) -> Result<Response<$response>, Status> {
                    Ok(Response::new(ControlApi::$rpc(self, request).await?))
                }
            )*
        }
    };
}

control! {
    create_tenant(v1::CreateTenantRequest) -> v1::CreateTenantResponse;
    list_tenants(v1::ListTenantsRequest) -> v1::ListTenantsResponse;
    suspend_tenant(v1::SuspendTenantRequest) -> v1::TenantInfo;
    resume_tenant(v1::ResumeTenantRequest) -> v1::ResumeTenantResponse;
    add_domain(v1::DomainRequest) -> v1::DomainInfo;
    verify_domain(v1::DomainRequest) -> v1::DomainInfo;
    rotate_dkim(v1::RotateDkimRequest) -> v1::DomainInfo;
    delete_tenant(v1::DeleteTenantRequest) -> v1::DeleteTenantResponse;

    list_cells(v1::ListCellsRequest) -> v1::ListCellsResponse;
    add_cell(v1::AddCellRequest) -> v1::CellInfo;
    set_cell_state(v1::SetCellStateRequest) -> v1::CellInfo;

    issue_api_key(v1::IssueApiKeyRequest) -> v1::IssueApiKeyResponse;
    list_api_keys(v1::ListApiKeysRequest) -> v1::ListApiKeysResponse;
    revoke_api_key(v1::RevokeApiKeyRequest) -> v1::RevokeApiKeyResponse;

    list_global_suppressions(v1::ListGlobalSuppressionsRequest) -> v1::ListGlobalSuppressionsResponse;
    add_global_suppression(v1::AddGlobalSuppressionRequest) -> v1::Suppression;
    remove_global_suppression(v1::RemoveGlobalSuppressionRequest) -> v1::RemoveSuppressionResponse;

    move_tenant(v1::MoveTenantRequest) -> v1::MoveInfo;
    get_move(v1::GetMoveRequest) -> v1::MoveInfo;
    evacuate_cell(v1::EvacuateCellRequest) -> v1::OperationInfo;
    plan_rebalance(v1::PlanRebalanceRequest) -> v1::RebalancePlan;
    apply_rebalance(v1::ApplyRebalanceRequest) -> v1::OperationInfo;
    get_operation(v1::GetOperationRequest) -> v1::OperationInfo;

    start_rollout(v1::StartRolloutRequest) -> v1::RolloutInfo;
    get_rollout(v1::GetRolloutRequest) -> v1::RolloutInfo;
    pause_rollout(v1::RolloutActionRequest) -> v1::RolloutInfo;
    resume_rollout(v1::RolloutActionRequest) -> v1::RolloutInfo;
    abort_rollout(v1::RolloutActionRequest) -> v1::RolloutInfo;

    list_audit(v1::ListAuditRequest) -> v1::ListAuditResponse;

    add_operator(v1::AddOperatorRequest) -> v1::AddOperatorResponse;
    list_operators(v1::ListOperatorsRequest) -> v1::ListOperatorsResponse;
    revoke_operator(v1::RevokeOperatorRequest) -> v1::RevokeOperatorResponse;

    rotate_tracking_key(v1::RotateTrackingKeyRequest) -> v1::RotateTrackingKeyResponse;
}
