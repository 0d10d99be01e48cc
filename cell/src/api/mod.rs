//! The `Cell` gRPC service: the router's way into the accept path and into the tenant's own
//! state (messages, suppression list). Every call is fenced on the tenant's placement epoch
//! and scoped to the tenant the router authenticated. The control plane's calls (a tenant's
//! move, its offboarding, the cell's health report) and feedback forwarded by other cells
//! come in here too.
//!
//! Each RPC is answered by the `CellApi` handler of the same name, in the file of its caller;
//! the `Cell` impl here only turns their errors into gRPC statuses.
//!
//! - `serve`: what routers call: accepts, messages, the suppression list, stats.
//! - `events`: what routers call for a tenant's event log.
//! - `engagement`: opens, clicks and unsubscribes the routers' tracking hosts took.
//! - `webhooks`: what routers call for a tenant's webhook endpoints.
//! - `provision`: what the control plane calls when it places a tenant here or the tenant
//!   adds or checks a domain: its mail transport's setup and view of each domain.
//! - `moves`: what the control plane calls to move a tenant here or away: prepare, export,
//!   import, backlog.
//! - `offboard`: what the control plane calls to offboard a tenant: its data, then erasing it.
//! - `health`: the cell's health report, which a rollout's gate asks for.
//! - `feedback`: what other cells call: feedback they forward to the tenant's serving cell.

mod engagement;
mod events;
mod feedback;
mod health;
mod moves;
mod offboard;
mod provision;
mod serve;
mod webhooks;

// Public for the send path bench, whose client threads run on idle CPU only.
pub use moves::lower_priority;

use std::pin::Pin;
use std::sync::Arc;

use cellmail_proto::v1::{self, cell_server::Cell};
use cellmail_proto::{ApiError, CellId, Epoch, TenantId};
use cellmail_registry::catalog::WatchedCatalog;
use tokio_stream::Stream;
use tonic::{Request, Response, Status};

use crate::accept::{Acceptor, Entered};
use crate::feedback::Ingest;
use crate::health::Health;
use crate::mailer::Mailer;
use crate::store::Store;

pub struct CellApi {
    pub cell: CellId,
    pub acceptor: Arc<Acceptor>,
    pub store: Arc<Store>,
    pub catalog: Arc<WatchedCatalog>,
    /// The tenants' sending domains as the mail transport is told of them.
    pub directory: Arc<crate::directory::Directory>,
    pub mailer: Arc<dyn Mailer>,
    pub ingest: Arc<Ingest>,
    pub health: Arc<Health>,
    /// The release this process runs.
    pub release: String,
    /// What posts to webhook endpoints (a test delivery; the URL policy).
    pub poster: Arc<crate::webhooks::Poster>,
}

impl CellApi {
    /// The caller's tenant, once the epoch it was routed with is known to be this cell's;
    /// the call holds the returned gate until it is done.
    async fn caller(&self, caller: Option<v1::Caller>) -> Result<(TenantId, Entered), ApiError> {
        let caller = caller.ok_or_else(|| ApiError::invalid("caller", "is required"))?;
        let tenant = TenantId::new(caller.tenant_id)
            .map_err(|e| ApiError::invalid("caller.tenant_id", e.to_string()))?;
        let entered = self.acceptor.fence(&tenant, Epoch(caller.epoch)).await?;
        Ok((tenant, entered))
    }
}

/// A streamed answer: parts read in full before the first is sent.
type Parts<T> = Pin<Box<dyn Stream<Item = Result<T, Status>> + Send>>;

fn parts<T: Send + 'static>(items: Vec<T>) -> Parts<T> {
    Box::pin(tokio_stream::iter(items.into_iter().map(Ok)))
}

/// Implements `Cell` with the listed RPCs, each answering what the `CellApi` handler of its
/// name returns. One macro emits the whole impl because `async_trait` must see the generated
/// methods.
macro_rules! cell {
    ($($rpc:ident($request:ty) -> $response:ty;)*) => {
        #[tonic::async_trait]
        impl Cell for CellApi {
            type ExportTenantStream = Parts<v1::TenantChunk>;
            type ExportTenantDataStream = Parts<v1::TenantData>;

            async fn export_tenant(
                &self,
                request: Request<v1::ExportTenantRequest>,
            ) -> Result<Response<Parts<v1::TenantChunk>>, Status> {
                let chunks = CellApi::export_tenant(self, request).await?;
                Ok(Response::new(parts(chunks)))
            }

            async fn export_tenant_data(
                &self,
                request: Request<v1::TenantDataRequest>,
            ) -> Result<Response<Parts<v1::TenantData>>, Status> {
                let data = CellApi::export_tenant_data(self, request).await?;
                Ok(Response::new(parts(data)))
            }

            $(
                async fn $rpc(
                    &self,
                    request: Request<$request>,
                ) -> Result<Response<$response>, Status> {
                    Ok(Response::new(CellApi::$rpc(self, request).await?))
                }
            )*
        }
    };
}

cell! {
    accept(v1::AcceptRequest) -> v1::SendResponse;
    get_message(v1::CellGetMessageRequest) -> v1::MessageStatus;
    list_suppressions(v1::CellListSuppressionsRequest) -> v1::ListSuppressionsResponse;
    add_suppression(v1::CellAddSuppressionRequest) -> v1::Suppression;
    remove_suppression(v1::CellRemoveSuppressionRequest) -> v1::RemoveSuppressionResponse;
    get_stats(v1::CellGetStatsRequest) -> v1::GetStatsResponse;
    list_events(v1::CellListEventsRequest) -> v1::ListEventsResponse;
    webhooks(v1::CellWebhooksRequest) -> v1::WebhooksResponse;
    record_engagement(v1::CellEngagementRequest) -> v1::EngagementResponse;

    provision_tenant(v1::ProvisionTenantRequest) -> v1::ProvisionTenantResponse;
    prepare_tenant(v1::PrepareTenantRequest) -> v1::PrepareTenantResponse;
    import_tenant(v1::ImportTenantRequest) -> v1::ImportTenantResponse;
    tenant_backlog(v1::TenantBacklogRequest) -> v1::TenantBacklogResponse;

    erase_tenant(v1::TenantDataRequest) -> v1::EraseTenantResponse;

    get_health_report(v1::HealthReportRequest) -> v1::HealthReport;

    forward_feedback(v1::ForwardFeedbackRequest) -> v1::ForwardFeedbackResponse;
}
