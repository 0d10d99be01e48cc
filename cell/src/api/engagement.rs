//! What a router's tracking host hands over: an open, a click or an unsubscribe from a link
//! its tenant's mail carried. Each becomes an event of the message (`opened`, `clicked`,
//! `unsubscribed`); an unsubscribe also suppresses the address for that tenant alone.

use cellmail_proto::v1;
use cellmail_proto::{ApiError, MessageId, SuppressionReason};
use tonic::Request;

use super::CellApi;
use crate::message::{EventKind, MessageEvent};
use crate::store::{Counts, Suppressed};

impl CellApi {
    pub(super) async fn record_engagement(
        &self,
        request: Request<v1::CellEngagementRequest>,
    ) -> Result<v1::EngagementResponse, ApiError> {
        let request = request.into_inner();
        let (tenant, _entered) = self.caller(request.caller).await?;
        let message_id: MessageId = (request.message_id.parse())
            .map_err(|e: cellmail_proto::IdError| ApiError::invalid("message_id", e.to_string()))?;
        let recipient = (!request.recipient.is_empty()).then(|| request.recipient.to_lowercase());
        let (kind, detail) = match request.action.as_str() {
            "open" => (EventKind::Open, String::new()),
            "click" => (EventKind::Click, request.url),
            "unsubscribe" => (EventKind::Unsubscribe, String::new()),
            other => {
                return Err(ApiError::invalid(
                    "action",
                    format!(
                        "{} is not open, click or unsubscribe",
                        cellmail_proto::error::quote(other)
                    ),
                ));
            }
        };
        if kind == EventKind::Unsubscribe {
            let address = recipient.clone().ok_or_else(|| {
                ApiError::invalid("recipient", "an unsubscribe names its recipient")
            })?;
            let entry = Suppressed {
                address: address.clone(),
                reason: SuppressionReason::Unsubscribe,
                at_ms: request.at_ms,
                message_id: Some(message_id),
            };
            self.store
                .suppress(&tenant, entry)
                .await
                .map_err(ApiError::from)?;
            tracing::info!(%tenant, %address, "address unsubscribed");
        }
        let event = MessageEvent {
            kind,
            at_ms: request.at_ms,
            recipient,
            detail,
        };
        let delta = Counts {
            opened: u64::from(kind == EventKind::Open),
            clicked: u64::from(kind == EventKind::Click),
            unsubscribed: u64::from(kind == EventKind::Unsubscribe),
            ..Counts::default()
        };
        let message = self
            .store
            .message(&tenant, message_id)
            .map_err(ApiError::from)?;
        let counts = message.map(|m| (m.class, request.at_ms, delta));
        (self
            .store
            .record_feedback(&tenant, Some(message_id), vec![event], counts)
            .await)
            .map_err(ApiError::from)?;
        Ok(v1::EngagementResponse {})
    }
}
