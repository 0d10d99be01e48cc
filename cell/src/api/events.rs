//! What routers call for a tenant's events: its log, read in pages with filters.

use cellmail_proto::v1;
use cellmail_proto::{ApiError, MessageId};
use tonic::Request;

use super::CellApi;
use super::moves::off_thread;
use super::serve::class_to_wire;
use crate::store::{EventCursor, EventFilter, EventType, TenantEvent};

const DEFAULT_PAGE: usize = 100;
const MAX_PAGE: usize = 1000;

/// A page token: where the last page stopped (`<written ms>.<event id>`).
fn cursor(token: &str) -> Result<Option<EventCursor>, ApiError> {
    if token.is_empty() {
        return Ok(None);
    }
    let bad = || ApiError::invalid("page_token", "is not a token this listing gave");
    let (written, id) = token.split_once('.').ok_or_else(bad)?;
    let written = written.parse().map_err(|_| bad())?;
    if id.is_empty() || !id.chars().all(|c| c.is_ascii_alphanumeric()) {
        return Err(bad());
    }
    Ok(Some((written, id.to_owned())))
}

/// The filter a request asks for, or INVALID_ARGUMENT naming the field it gets wrong.
fn filter(request: &v1::ListEventsRequest) -> Result<EventFilter, ApiError> {
    let types = (request.types.iter().enumerate())
        .map(|(i, name)| {
            name.parse::<EventType>().map_err(|()| {
                let known: Vec<_> = EventType::ALL.iter().map(|t| t.as_str()).collect();
                ApiError::invalid(
                    format!("types[{i}]"),
                    format!(
                        "unknown event type {} ({})",
                        cellmail_proto::error::quote(name),
                        known.join(" | ")
                    ),
                )
            })
        })
        .collect::<Result<_, _>>()?;
    if request.to_ms != 0 && request.to_ms < request.from_ms {
        return Err(ApiError::invalid("to_ms", "is before from_ms"));
    }
    let message_id = match request.message_id.as_str() {
        "" => None,
        id => Some(
            id.parse::<MessageId>()
                .map_err(|e| ApiError::invalid("message_id", e.to_string()))?
                .to_string(),
        ),
    };
    let recipient =
        (!request.recipient.is_empty()).then(|| request.recipient.trim().to_lowercase());
    Ok(EventFilter {
        types,
        from_ms: request.from_ms,
        to_ms: request.to_ms,
        message_id,
        recipient,
    })
}

fn to_wire(event: TenantEvent) -> v1::Event {
    v1::Event {
        id: event.id,
        r#type: event.kind.as_str().to_owned(),
        message_id: event.message_id,
        recipient: event.recipient.unwrap_or_default(),
        message_class: event.message_class.parse().map_or(0, class_to_wire),
        tags: event.tags.into_iter().collect(),
        at_ms: event.at_ms,
        detail: event.detail,
    }
}

impl CellApi {
    pub(super) async fn list_events(
        &self,
        request: Request<v1::CellListEventsRequest>,
    ) -> Result<v1::ListEventsResponse, ApiError> {
        let request = request.into_inner();
        let (tenant, _entered) = self.caller(request.caller).await?;
        let page = request.request.unwrap_or_default();
        let size = match page.page_size as usize {
            0 => DEFAULT_PAGE,
            n if n > MAX_PAGE => {
                return Err(ApiError::invalid(
                    "page_size",
                    format!("at most {MAX_PAGE}"),
                ));
            }
            n => n,
        };
        let (filter, after) = (filter(&page)?, cursor(&page.page_token)?);
        let store = self.store.clone();
        let (events, next) = off_thread(move || {
            (store.events(&tenant, &filter, after.as_ref(), size)).map_err(ApiError::from)
        })
        .await?;
        Ok(v1::ListEventsResponse {
            events: events.into_iter().map(to_wire).collect(),
            next_page_token: next
                .map_or_else(String::new, |(written, id)| format!("{written}.{id}")),
        })
    }
}
