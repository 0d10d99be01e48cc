//! The `Cell` gRPC service: the router's way into the accept path and into the tenant's own
//! state (messages, suppression list). Every call is fenced on the tenant's placement epoch
//! and scoped to the tenant the router authenticated.

use std::sync::Arc;

use cellmail_proto::v1::{self, cell_server::Cell};
use cellmail_proto::{
    ApiError, Epoch, MessageClass, MessageId, SuppressionReason, SuppressionScope, TenantId,
    suppression_key,
};
use tonic::{Request, Response, Status};

use crate::accept::{Acceptor, now_ms};
use crate::commit::StorageError;
use crate::message::{Accepted, MessageRecord, RecipientOutcome};
use crate::store::{Store, Suppressed};
use crate::validation::parse_mailbox;

const DEFAULT_STATS_HOURS: u32 = 24;
const MAX_STATS_HOURS: u32 = 720;

/// The most suppressions one page holds.
const MAX_PAGE: usize = 1000;

pub struct CellApi {
    acceptor: Arc<Acceptor>,
    store: Arc<Store>,
}

impl CellApi {
    pub fn new(acceptor: Arc<Acceptor>, store: Arc<Store>) -> Self {
        Self { acceptor, store }
    }

    /// The caller's tenant, once the epoch it was routed with is known to be this cell's.
    async fn caller(&self, caller: Option<v1::Caller>) -> Result<TenantId, ApiError> {
        let caller = caller.ok_or_else(|| ApiError::invalid("caller", "is required"))?;
        let tenant = TenantId::new(caller.tenant_id)
            .map_err(|e| ApiError::invalid("caller.tenant_id", e.to_string()))?;
        self.acceptor.fence(&tenant, Epoch(caller.epoch)).await?;
        Ok(tenant)
    }
}

fn storage(err: StorageError) -> ApiError {
    ApiError::Unavailable(format!("cell store: {err}"))
}

fn recipient_status(outcome: RecipientOutcome) -> v1::RecipientStatus {
    let (state, reason, scope) = match outcome.suppressed {
        None => (
            v1::RecipientState::Accepted,
            String::new(),
            v1::SuppressionScope::Unspecified as i32,
        ),
        Some((reason, scope)) => {
            let why = format!("suppressed: {} ({} list)", reason.as_str(), scope.as_str());
            (v1::RecipientState::Suppressed, why, scope.to_wire())
        }
    };
    v1::RecipientStatus {
        address: outcome.address,
        state: state as i32,
        reason,
        scope,
    }
}

fn send_response(accepted: Accepted) -> v1::SendResponse {
    v1::SendResponse {
        message_id: accepted.message_id.to_string(),
        recipients: accepted
            .recipients
            .into_iter()
            .map(recipient_status)
            .collect(),
    }
}

fn class_to_wire(class: MessageClass) -> i32 {
    let wire = match class {
        MessageClass::Transactional => v1::MessageClass::Transactional,
        MessageClass::Marketing => v1::MessageClass::Marketing,
    };
    wire as i32
}

fn message_status(record: MessageRecord) -> v1::MessageStatus {
    let class = class_to_wire(record.class);
    let events = record
        .events
        .into_iter()
        .map(|e| v1::MessageEvent {
            r#type: e.kind.as_str().to_owned(),
            at_ms: e.at_ms as i64,
            recipient: e.recipient.unwrap_or_default(),
            detail: e.detail,
        })
        .collect();
    v1::MessageStatus {
        message_id: record.id.to_string(),
        message_class: class,
        state: record.state.as_str().to_owned(),
        recipients: record
            .recipients
            .into_iter()
            .map(recipient_status)
            .collect(),
        events,
        accepted_at_ms: record.accepted_at_ms as i64,
    }
}

fn suppression(entry: Suppressed) -> v1::Suppression {
    v1::Suppression {
        address: entry.address,
        reason: entry.reason.to_wire(),
        scope: SuppressionScope::Tenant.to_wire(),
        created_at_ms: entry.at_ms as i64,
        message_id: entry
            .message_id
            .map(|id| id.to_string())
            .unwrap_or_default(),
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

    async fn get_message(
        &self,
        request: Request<v1::CellGetMessageRequest>,
    ) -> Result<Response<v1::MessageStatus>, Status> {
        let request = request.into_inner();
        let tenant = self.caller(request.caller).await?;
        let raw = request.request.unwrap_or_default().message_id;
        let id: MessageId = raw
            .parse()
            .map_err(|e: cellmail_proto::IdError| ApiError::invalid("message_id", e.to_string()))?;
        // Another tenant's message is answered exactly like a missing one.
        let record = self
            .store
            .message(&tenant, id)
            .map_err(storage)?
            .ok_or_else(|| ApiError::NotFound(format!("message {id} not found")))?;
        Ok(Response::new(message_status(record)))
    }

    async fn list_suppressions(
        &self,
        request: Request<v1::CellListSuppressionsRequest>,
    ) -> Result<Response<v1::ListSuppressionsResponse>, Status> {
        let request = request.into_inner();
        let tenant = self.caller(request.caller).await?;
        let page = request.request.unwrap_or_default();
        let size = match page.page_size as usize {
            0 => MAX_PAGE,
            n if n > MAX_PAGE => {
                return Err(ApiError::invalid("page_size", format!("at most {MAX_PAGE}")).into());
            }
            n => n,
        };
        let entries = self
            .store
            .list_suppressions(&tenant, &page.page_token, size)
            .map_err(storage)?;
        let next_page_token = if entries.len() == size {
            entries
                .last()
                .map(|e| suppression_key(&e.address))
                .unwrap_or_default()
        } else {
            String::new()
        };
        Ok(Response::new(v1::ListSuppressionsResponse {
            suppressions: entries.into_iter().map(suppression).collect(),
            next_page_token,
        }))
    }

    async fn add_suppression(
        &self,
        request: Request<v1::CellAddSuppressionRequest>,
    ) -> Result<Response<v1::Suppression>, Status> {
        let request = request.into_inner();
        let tenant = self.caller(request.caller).await?;
        let add = request.request.unwrap_or_default();
        let address = parse_mailbox("address", &add.address)?.email;
        let reason = match SuppressionReason::from_wire(add.reason) {
            None if add.reason == 0 => SuppressionReason::Manual,
            Some(reason @ (SuppressionReason::Manual | SuppressionReason::Unsubscribe)) => reason,
            _ => {
                return Err(ApiError::invalid(
                    "reason",
                    "MANUAL or UNSUBSCRIBE; bounces and complaints come from feedback",
                )
                .into());
            }
        };
        let entry = Suppressed {
            address,
            reason,
            at_ms: now_ms(),
            message_id: None,
        };
        self.store
            .suppress(&tenant, entry.clone())
            .await
            .map_err(storage)?;
        Ok(Response::new(suppression(entry)))
    }

    async fn get_stats(
        &self,
        request: Request<v1::CellGetStatsRequest>,
    ) -> Result<Response<v1::GetStatsResponse>, Status> {
        let request = request.into_inner();
        let tenant = self.caller(request.caller).await?;
        let hours = match request.request.unwrap_or_default().hours {
            0 => DEFAULT_STATS_HOURS,
            n if n > MAX_STATS_HOURS => {
                return Err(ApiError::invalid("hours", format!("1 to {MAX_STATS_HOURS}")).into());
            }
            n => n,
        };
        let now = now_ms();
        let mut classes = Vec::new();
        for class in MessageClass::ALL {
            let counts = self
                .store
                .stats(&tenant, class, now, u64::from(hours))
                .map_err(storage)?;
            let rate = |n: u64| {
                if counts.sent == 0 {
                    0.0
                } else {
                    n as f64 / counts.sent as f64
                }
            };
            classes.push(v1::ClassStats {
                message_class: class_to_wire(class),
                accepted: counts.accepted,
                sent: counts.sent,
                delivered: counts.delivered,
                bounced: counts.bounced,
                complained: counts.complained,
                suppressed: counts.suppressed,
                rejected: counts.rejected,
                bounce_rate: rate(counts.bounced),
                complaint_rate: rate(counts.complained),
            });
        }
        Ok(Response::new(v1::GetStatsResponse { hours, classes }))
    }

    async fn remove_suppression(
        &self,
        request: Request<v1::CellRemoveSuppressionRequest>,
    ) -> Result<Response<v1::RemoveSuppressionResponse>, Status> {
        let request = request.into_inner();
        let tenant = self.caller(request.caller).await?;
        let address = parse_mailbox("address", &request.request.unwrap_or_default().address)?.email;
        let removed = self
            .store
            .unsuppress(&tenant, &address)
            .await
            .map_err(storage)?;
        Ok(Response::new(v1::RemoveSuppressionResponse { removed }))
    }
}
