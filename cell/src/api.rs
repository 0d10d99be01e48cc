//! The `Cell` gRPC service: the router's way into the accept path.

use std::sync::Arc;

use cellmail_proto::v1::{self, cell_server::Cell};
use cellmail_proto::{ApiError, Epoch, TenantId};
use tonic::{Request, Response, Status};

use crate::accept::Acceptor;
use crate::message::Accepted;

pub struct CellApi {
    acceptor: Arc<Acceptor>,
}

impl CellApi {
    pub fn new(acceptor: Arc<Acceptor>) -> Self {
        Self { acceptor }
    }
}

fn send_response(accepted: Accepted) -> v1::SendResponse {
    v1::SendResponse {
        message_id: accepted.message_id.to_string(),
        recipients: accepted
            .recipients
            .into_iter()
            .map(|address| v1::RecipientStatus {
                address,
                state: v1::RecipientState::Accepted as i32,
                reason: String::new(),
            })
            .collect(),
    }
}

#[tonic::async_trait]
impl Cell for CellApi {
    async fn accept(
        &self,
        request: Request<v1::AcceptRequest>,
    ) -> Result<Response<v1::SendResponse>, Status> {
        let request = request.into_inner();
        let tenant = TenantId::new(request.tenant_id)
            .map_err(|e| ApiError::invalid("tenant_id", e.to_string()))?;
        let message = request
            .message
            .ok_or_else(|| ApiError::invalid("message", "is required"))?;
        let accepted = self
            .acceptor
            .accept(tenant, Epoch(request.epoch), message)
            .await?;
        Ok(Response::new(send_response(accepted)))
    }
}
