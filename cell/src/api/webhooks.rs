//! What routers call for a tenant's webhook endpoints: create, list (with each one's last
//! attempts), update, delete, test, rotate the secret and replay a time range. An endpoint's
//! URL is checked against the address policy ([`crate::webhooks::guard`]) before it is saved.

use cellmail_proto::v1::{self, cell_webhooks_request::Call};
use cellmail_proto::{ApiError, TenantId, now_ms};
use tonic::Request;

use super::CellApi;
use crate::store::{Attempt, Endpoint, EventType, Secret};
use crate::webhooks::{DEFAULT_IN_FLIGHT, DEFAULT_TIMEOUT_MS, MAX_IN_FLIGHT, MAX_TIMEOUT_MS, sign};

/// Endpoints one tenant may have.
const MAX_ENDPOINTS: usize = 20;
/// How long an old secret signs beside a new one unless the rotation says otherwise.
const DEFAULT_OVERLAP_HOURS: u32 = 24;

fn attempt_to_wire(attempt: Attempt) -> v1::WebhookDelivery {
    v1::WebhookDelivery {
        event_id: attempt.event_id,
        event_type: attempt.event_type,
        at_ms: attempt.at_ms,
        attempt: attempt.attempt,
        status: u32::from(attempt.status),
        latency_ms: attempt.latency_ms,
        error: attempt.error,
    }
}

fn to_wire(endpoint: &Endpoint, attempts: Vec<Attempt>) -> v1::Webhook {
    v1::Webhook {
        id: endpoint.id.clone(),
        url: endpoint.url.clone(),
        types: endpoint
            .types
            .iter()
            .map(|t| t.as_str().to_owned())
            .collect(),
        enabled: endpoint.enabled,
        max_in_flight: endpoint.max_in_flight,
        timeout_ms: endpoint.timeout_ms,
        created_ms: endpoint.created_ms,
        failing_since_ms: endpoint.failing_since_ms.unwrap_or(0),
        deliveries: attempts.into_iter().map(attempt_to_wire).collect(),
    }
}

fn types(names: &[String]) -> Result<Vec<EventType>, ApiError> {
    (names.iter().enumerate())
        .map(|(i, name)| {
            name.parse().map_err(|()| {
                ApiError::invalid(
                    format!("types[{i}]"),
                    format!("unknown event type {}", cellmail_proto::error::quote(name)),
                )
            })
        })
        .collect()
}

/// `value`, or `default` for 0; INVALID_ARGUMENT naming `field` above `max`.
fn bounded(field: &str, value: u32, default: u32, max: u32) -> Result<u32, ApiError> {
    match value {
        0 => Ok(default),
        v if v > max => Err(ApiError::invalid(field, format!("at most {max}"))),
        v => Ok(v),
    }
}

impl CellApi {
    /// `url` when the cell may deliver to it: an allowed scheme, and a host that resolves
    /// only to addresses it may reach; INVALID_ARGUMENT naming `url` otherwise.
    async fn checked_url(&self, url: &str) -> Result<String, ApiError> {
        (self.poster.guard().check_saved(url.trim()).await)
            .map_err(|why| ApiError::invalid("url", why))?;
        Ok(url.trim().to_owned())
    }

    fn endpoint(&self, tenant: &TenantId, id: &str) -> Result<Endpoint, ApiError> {
        (self.store.webhook(tenant, id).map_err(ApiError::from)?).ok_or_else(|| {
            ApiError::NotFound(format!("webhook {}", cellmail_proto::error::quote(id)))
        })
    }

    fn answer(
        &self,
        tenant: &TenantId,
        endpoint: &Endpoint,
    ) -> Result<v1::WebhooksResponse, ApiError> {
        let attempts = (self.store.attempts(tenant, &endpoint.id)).map_err(ApiError::from)?;
        Ok(v1::WebhooksResponse {
            webhooks: vec![to_wire(endpoint, attempts)],
            ..Default::default()
        })
    }

    pub(super) async fn webhooks(
        &self,
        request: Request<v1::CellWebhooksRequest>,
    ) -> Result<v1::WebhooksResponse, ApiError> {
        let request = request.into_inner();
        let (tenant, entered) = self.caller(request.caller).await?;
        let call = request
            .call
            .ok_or_else(|| ApiError::invalid("call", "is required"))?;
        let now = now_ms();
        match call {
            Call::Create(create) => {
                let existing = self.store.webhooks(&tenant).map_err(ApiError::from)?;
                if existing.len() >= MAX_ENDPOINTS {
                    return Err(ApiError::FailedPrecondition(format!(
                        "a tenant has at most {MAX_ENDPOINTS} webhook endpoints"
                    )));
                }
                let secret = sign::new_secret();
                let endpoint = Endpoint {
                    id: format!("wh_{}", ulid::Ulid::new().to_string().to_lowercase()),
                    url: self.checked_url(&create.url).await?,
                    types: types(&create.types)?,
                    enabled: true,
                    secrets: vec![Secret {
                        secret: secret.clone(),
                        expires_ms: None,
                    }],
                    max_in_flight: bounded(
                        "max_in_flight",
                        create.max_in_flight,
                        DEFAULT_IN_FLIGHT,
                        MAX_IN_FLIGHT,
                    )?,
                    timeout_ms: bounded(
                        "timeout_ms",
                        create.timeout_ms,
                        DEFAULT_TIMEOUT_MS,
                        MAX_TIMEOUT_MS,
                    )?,
                    created_ms: now,
                    failing_since_ms: None,
                };
                (self.store.put_webhook(&tenant, endpoint.clone()).await)
                    .map_err(ApiError::from)?;
                tracing::info!(%tenant, webhook = %endpoint.id, "webhook endpoint created");
                Ok(v1::WebhooksResponse {
                    secret,
                    ..self.answer(&tenant, &endpoint)?
                })
            }
            Call::List(_) => {
                let mut webhooks = Vec::new();
                for endpoint in self.store.webhooks(&tenant).map_err(ApiError::from)? {
                    let attempts =
                        (self.store.attempts(&tenant, &endpoint.id)).map_err(ApiError::from)?;
                    webhooks.push(to_wire(&endpoint, attempts));
                }
                Ok(v1::WebhooksResponse {
                    webhooks,
                    ..Default::default()
                })
            }
            Call::Update(update) => {
                let mut endpoint = self.endpoint(&tenant, &update.id)?;
                if !update.url.is_empty() {
                    endpoint.url = self.checked_url(&update.url).await?;
                }
                if !update.types.is_empty() {
                    endpoint.types = types(&update.types)?;
                }
                if let Some(enabled) = update.enabled {
                    endpoint.enabled = enabled;
                }
                endpoint.max_in_flight = bounded(
                    "max_in_flight",
                    update.max_in_flight,
                    endpoint.max_in_flight,
                    MAX_IN_FLIGHT,
                )?;
                endpoint.timeout_ms = bounded(
                    "timeout_ms",
                    update.timeout_ms,
                    endpoint.timeout_ms,
                    MAX_TIMEOUT_MS,
                )?;
                (self.store.put_webhook(&tenant, endpoint.clone()).await)
                    .map_err(ApiError::from)?;
                self.answer(&tenant, &endpoint)
            }
            Call::Delete(delete) => {
                let endpoint = self.endpoint(&tenant, &delete.id)?;
                (self.store.delete_webhook(&tenant, &endpoint.id).await).map_err(ApiError::from)?;
                Ok(v1::WebhooksResponse::default())
            }
            Call::Test(test) => {
                let endpoint = self.endpoint(&tenant, &test.id)?;
                // The delivery may take the endpoint's whole timeout: it writes nothing of
                // the tenant's, so a move of the tenant need not wait for it.
                drop(entered);
                let id = format!("test_{}", ulid::Ulid::new());
                let data =
                    serde_json::json!({ "detail": "a test delivery", "endpoint": endpoint.id });
                let (attempt, _) = self.poster.post(&endpoint, (&id, "test"), &data, 1).await;
                Ok(v1::WebhooksResponse {
                    delivery: Some(attempt_to_wire(attempt)),
                    ..Default::default()
                })
            }
            Call::Rotate(rotate) => {
                let mut endpoint = self.endpoint(&tenant, &rotate.id)?;
                let overlap = match rotate.overlap_hours {
                    0 => DEFAULT_OVERLAP_HOURS,
                    hours => hours,
                };
                let until = now + u64::from(overlap) * 3_600_000;
                endpoint
                    .secrets
                    .retain(|s| s.expires_ms.is_none_or(|at| at > now));
                for old in &mut endpoint.secrets {
                    old.expires_ms = Some(old.expires_ms.map_or(until, |at| at.min(until)));
                }
                let secret = sign::new_secret();
                endpoint.secrets.insert(
                    0,
                    Secret {
                        secret: secret.clone(),
                        expires_ms: None,
                    },
                );
                (self.store.put_webhook(&tenant, endpoint.clone()).await)
                    .map_err(ApiError::from)?;
                Ok(v1::WebhooksResponse {
                    secret,
                    ..self.answer(&tenant, &endpoint)?
                })
            }
            Call::Replay(replay) => {
                let endpoint = self.endpoint(&tenant, &replay.id)?;
                let to = if replay.to_ms == 0 { now } else { replay.to_ms };
                if to < replay.from_ms {
                    return Err(ApiError::invalid("to_ms", "is before from_ms"));
                }
                let (queued, more) = (self
                    .store
                    .replay_webhook(&tenant, endpoint, (replay.from_ms, to), now)
                    .await)
                    .map_err(ApiError::from)?;
                Ok(v1::WebhooksResponse {
                    queued,
                    next_from_ms: more.unwrap_or(0),
                    ..Default::default()
                })
            }
        }
    }
}
