//! What routers call: the accept path, and the tenant's own state (its messages, its
//! suppression list, its stats). Every call is fenced on the epoch the router placed the
//! tenant at, and writes run to the end under the tenant's gate.

use std::time::Instant;

use cellmail_proto::v1;
use cellmail_proto::{
    ApiError, CellId, Epoch, MessageClass, MessageId, SuppressionReason, SuppressionScope,
    TenantId, now_ms, suppression_key,
};
use tonic::{Request, Status};
use tracing::field::Empty;
use tracing::{Instrument as _, Span};

use super::CellApi;
use crate::accept::Entered;
use crate::commit::StorageError;
use crate::health;
use crate::message::{Accepted, MessageRecord, RecipientOutcome};
use crate::store::{self, Store, Suppressed};
use crate::validation::parse_mailbox;

const DEFAULT_STATS_HOURS: u32 = 24;
pub(super) const MAX_STATS_HOURS: u32 = store::STATS_HOURS as u32;

/// The most suppressions one page holds.
const MAX_PAGE: usize = 1000;

/// The span of one accept, when spans are exported: a child of the router's span whose
/// trace context the call carries (with tenant and cell; the message id once known).
fn accept_span(cell: &CellId, request: &Request<v1::AcceptRequest>) -> Span {
    if !cellmail_proto::trace::exporting() {
        return Span::none();
    }
    let span = tracing::info_span!(
        "accept",
        otel.kind = "server",
        tenant = request.get_ref().tenant_id.as_str(),
        cell = cell.as_str(),
        message_id = Empty,
        outcome = Empty,
    );
    cellmail_proto::trace::continue_from_metadata(&span, request.metadata());
    span
}

/// Records on an accept's span the message id it answered, or the code it was refused with.
fn accept_answered(span: &Span, accepted: &Result<Accepted, ApiError>) {
    if span.is_disabled() {
        return;
    }
    match accepted {
        Ok(accepted) => {
            span.record("message_id", tracing::field::display(accepted.message_id));
            span.record("outcome", "ok");
        }
        Err(err) => {
            let code = Status::from(err.clone()).code();
            span.record("outcome", cellmail_proto::error::code_name(code));
        }
    }
}

/// Runs a fenced write to the end in a task of its own, holding its tenant's gate, even if
/// the caller goes away: a move's export waits for the gate and must find the write done.
async fn to_the_end<T: Send + 'static>(
    entered: Entered,
    write: impl Future<Output = Result<T, StorageError>> + Send + 'static,
) -> Result<T, ApiError> {
    tokio::spawn(async move {
        let _entered = entered;
        write.await
    })
    .await
    .map_err(|e| ApiError::Internal(format!("the write task failed: {e}")))?
    .map_err(ApiError::from)
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

pub(super) fn class_to_wire(class: MessageClass) -> i32 {
    let wire = match class {
        MessageClass::Transactional => v1::MessageClass::Transactional,
        MessageClass::Marketing => v1::MessageClass::Marketing,
    };
    wire as i32
}

pub(super) fn message_status(record: MessageRecord) -> v1::MessageStatus {
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

/// `tenant`'s figures by class over the last `hours` hours.
pub(super) fn class_stats(
    store: &Store,
    tenant: &TenantId,
    figures: store::Figures,
    hours: u32,
) -> Result<Vec<v1::ClassStats>, StorageError> {
    let now = now_ms();
    let mut classes = Vec::new();
    for class in MessageClass::ALL {
        let counts = store.stats(tenant, class, figures, now, u64::from(hours))?;
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
            opened: counts.opened,
            clicked: counts.clicked,
            unsubscribed: counts.unsubscribed,
        });
    }
    Ok(classes)
}

pub(super) fn suppression(entry: Suppressed) -> v1::Suppression {
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

impl CellApi {
    pub(super) async fn accept(
        &self,
        request: Request<v1::AcceptRequest>,
    ) -> Result<v1::SendResponse, ApiError> {
        let span = accept_span(&self.cell, &request);
        let request = request.into_inner();
        let tenant = TenantId::from_field("tenant_id", request.tenant_id)?;
        let message = request
            .message
            .ok_or_else(|| ApiError::invalid("message", "is required"))?;
        // Run to the end even if the caller goes away: a move's export waits for every
        // accept let in before its freeze, and must not find it half done.
        let acceptor = self.acceptor.clone();
        let started = Instant::now();
        let accepted = tokio::spawn(
            async move { acceptor.accept(tenant, Epoch(request.epoch), message).await }
                .instrument(span.clone()),
        )
        .await
        .map_err(|e| ApiError::Internal(format!("the accept task failed: {e}")))
        .flatten();
        accept_answered(&span, &accepted);
        match &accepted {
            Ok(_) => self
                .health
                .record(health::Outcome::Accepted(started.elapsed())),
            Err(ApiError::Internal(_)) => self.health.record(health::Outcome::AcceptFailed),
            Err(_) => {}
        }
        Ok(send_response(accepted?))
    }

    pub(super) async fn get_message(
        &self,
        request: Request<v1::CellGetMessageRequest>,
    ) -> Result<v1::MessageStatus, ApiError> {
        let request = request.into_inner();
        let (tenant, _entered) = self.caller(request.caller).await?;
        let raw = request.request.unwrap_or_default().message_id;
        let id: MessageId = raw
            .parse()
            .map_err(|e: cellmail_proto::IdError| ApiError::invalid("message_id", e.to_string()))?;
        // Another tenant's message is answered exactly like a missing one.
        let record = self
            .store
            .message(&tenant, id)
            .map_err(ApiError::from)?
            .ok_or_else(|| ApiError::NotFound(format!("message {id} not found")))?;
        Ok(message_status(record))
    }

    pub(super) async fn list_suppressions(
        &self,
        request: Request<v1::CellListSuppressionsRequest>,
    ) -> Result<v1::ListSuppressionsResponse, ApiError> {
        let request = request.into_inner();
        let (tenant, _entered) = self.caller(request.caller).await?;
        let page = request.request.unwrap_or_default();
        let size = match page.page_size as usize {
            0 => MAX_PAGE,
            n if n > MAX_PAGE => {
                return Err(ApiError::invalid(
                    "page_size",
                    format!("at most {MAX_PAGE}"),
                ));
            }
            n => n,
        };
        let entries = self
            .store
            .list_suppressions(&tenant, &page.page_token, size)
            .map_err(ApiError::from)?;
        let next_page_token = if entries.len() == size {
            entries
                .last()
                .map(|e| suppression_key(&e.address))
                .unwrap_or_default()
        } else {
            String::new()
        };
        Ok(v1::ListSuppressionsResponse {
            suppressions: entries.into_iter().map(suppression).collect(),
            next_page_token,
        })
    }

    pub(super) async fn add_suppression(
        &self,
        request: Request<v1::CellAddSuppressionRequest>,
    ) -> Result<v1::Suppression, ApiError> {
        let request = request.into_inner();
        let (tenant, entered) = self.caller(request.caller).await?;
        let add = request.request.unwrap_or_default();
        let address = parse_mailbox("address", &add.address)?.email;
        let reason = match SuppressionReason::from_wire(add.reason) {
            None if add.reason == 0 => SuppressionReason::Manual,
            Some(reason @ (SuppressionReason::Manual | SuppressionReason::Unsubscribe)) => reason,
            _ => {
                return Err(ApiError::invalid(
                    "reason",
                    "MANUAL or UNSUBSCRIBE; bounces and complaints come from feedback",
                ));
            }
        };
        let entry = Suppressed {
            address,
            reason,
            at_ms: now_ms(),
            message_id: None,
        };
        let store = self.store.clone();
        let added = entry.clone();
        to_the_end(entered, async move { store.suppress(&tenant, added).await }).await?;
        Ok(suppression(entry))
    }

    pub(super) async fn remove_suppression(
        &self,
        request: Request<v1::CellRemoveSuppressionRequest>,
    ) -> Result<v1::RemoveSuppressionResponse, ApiError> {
        let request = request.into_inner();
        let (tenant, entered) = self.caller(request.caller).await?;
        let address = parse_mailbox("address", &request.request.unwrap_or_default().address)?.email;
        let store = self.store.clone();
        let removed = to_the_end(
            entered,
            async move { store.unsuppress(&tenant, &address).await },
        )
        .await?;
        Ok(v1::RemoveSuppressionResponse { removed })
    }

    pub(super) async fn get_stats(
        &self,
        request: Request<v1::CellGetStatsRequest>,
    ) -> Result<v1::GetStatsResponse, ApiError> {
        let request = request.into_inner();
        let (tenant, _entered) = self.caller(request.caller).await?;
        let hours = match request.request.unwrap_or_default().hours {
            0 => DEFAULT_STATS_HOURS,
            n if n > MAX_STATS_HOURS => {
                return Err(ApiError::invalid(
                    "hours",
                    format!("1 to {MAX_STATS_HOURS}"),
                ));
            }
            n => n,
        };
        // With what the cells the tenant moved here from counted.
        let figures = store::Figures::Carried;
        let classes = class_stats(&self.store, &tenant, figures, hours).map_err(ApiError::from)?;
        Ok(v1::GetStatsResponse { hours, classes })
    }
}
