//! The `Sender` gRPC service: resolve the authenticated tenant's cell and forward.
//!
//! A cell answers "moved" when the router's placement is stale (a move switched the
//! tenant's epoch). The router then waits, briefly, for its registry view to show the new
//! placement and retries once; a second "moved" is UNAVAILABLE, which clients retry with
//! the same idempotency key.

use std::sync::Arc;
use std::time::Duration;

use cellmail_control::catalog::WatchedCatalog;
use cellmail_proto::v1::{self, sender_server::Sender};
use cellmail_proto::{ApiError, TenantId};
use tonic::{Request, Response, Status};

use crate::forward::{self, Channels, DEFAULT_DEADLINE, Target};

/// How long a router waits for a placement newer than the one a cell called stale.
const MOVED_WAIT: Duration = Duration::from_secs(2);

pub struct SenderApi {
    catalog: Arc<WatchedCatalog>,
    channels: Channels,
}

impl SenderApi {
    pub fn new(catalog: Arc<WatchedCatalog>) -> Self {
        Self {
            catalog,
            channels: Channels::default(),
        }
    }

    fn resolve(&self, tenant: &TenantId) -> Result<Target, ApiError> {
        forward::resolve(&self.catalog.read(), tenant)
    }

    async fn forward(
        &self,
        target: &Target,
        tenant: &TenantId,
        message: v1::SendRequest,
        deadline: Duration,
    ) -> Result<v1::SendResponse, Status> {
        let mut client = self.channels.client(target)?;
        let mut request = Request::new(v1::AcceptRequest {
            tenant_id: tenant.to_string(),
            epoch: target.epoch.0,
            message: Some(message),
        });
        request.set_timeout(deadline);
        match client.accept(request).await {
            Ok(response) => Ok(response.into_inner()),
            Err(status) if status.code() == tonic::Code::Unavailable => {
                Err(ApiError::Unavailable(format!(
                    "cell {} of tenant {tenant} is unavailable: {}",
                    target.cell,
                    status.message()
                ))
                .into())
            }
            Err(status) => Err(status),
        }
    }
}

#[tonic::async_trait]
impl Sender for SenderApi {
    async fn send(
        &self,
        request: Request<v1::SendRequest>,
    ) -> Result<Response<v1::SendResponse>, Status> {
        let tenant = request
            .extensions()
            .get::<TenantId>()
            .cloned()
            .ok_or_else(|| ApiError::Unauthenticated("no authenticated tenant".into()))?;
        let deadline = forward::deadline(request.metadata()).unwrap_or(DEFAULT_DEADLINE);
        let message = request.into_inner();
        let target = self.resolve(&tenant)?;
        match self
            .forward(&target, &tenant, message.clone(), deadline)
            .await
        {
            Err(status) if ApiError::is_moved(&status) => {
                let stale = target.epoch;
                self.catalog
                    .wait_until(MOVED_WAIT, |c| {
                        c.placements.get(&tenant).is_some_and(|p| p.epoch > stale)
                    })
                    .await;
                let target = self.resolve(&tenant)?;
                match self.forward(&target, &tenant, message, deadline).await {
                    Err(status) if ApiError::is_moved(&status) => Err(ApiError::Unavailable(
                        format!("tenant {tenant} is moving; retry with the same idempotency key"),
                    )
                    .into()),
                    other => other.map(Response::new),
                }
            }
            other => other.map(Response::new),
        }
    }
}
