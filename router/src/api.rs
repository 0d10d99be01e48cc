//! The `Sender` gRPC service: every call is for the authenticated tenant and goes to that
//! tenant's cell, stamped with the placement epoch and the caller's deadline.
//!
//! While a move has the tenant's placement frozen, the router holds the tenant's calls (at
//! most its freeze hold, `--freeze-hold-ms`, default 2 s; then UNAVAILABLE). A cell answers "moved" when the router's
//! placement is stale (the cell saw the freeze or the switch first). The router then waits,
//! as long, for its registry view to show a newer placement and retries once; a second
//! "moved" is UNAVAILABLE. Clients retry UNAVAILABLE (sends with the same idempotency key).
//!
//! Every send is counted here, in [`Sender::send`], once answered (see [`crate::telemetry`]).
//! When spans are exported, every call runs in a span of its own (`send` for a send), and
//! the call forwarded to the cell carries that span's trace context, so the cell's handling
//! of it is a child in the same trace.

use std::future::Future;
use std::sync::Arc;
use std::time::{Duration, Instant};

use cellmail_proto::v1::{self, cell_client::CellClient, sender_server::Sender};
use cellmail_proto::{ApiError, TenantId};
use cellmail_registry::catalog::WatchedCatalog;
use cellmail_registry::channels::CellChannels;
use cellmail_registry::schema::{PlacementState, Scope, Scopes};
use cellmail_registry::tracking::{Action, Link};
use tonic::transport::Channel;
use tonic::{Request, Response, Status};
use tracing::{Instrument as _, Span};

use crate::admission::Admission;
use crate::forward::{self, DEFAULT_DEADLINE};
use crate::routes::{Routes, Target};
use crate::telemetry::{self, SendLabels};

pub struct SenderApi {
    catalog: Arc<WatchedCatalog<Routes>>,
    channels: CellChannels,
    admission: Admission,
    /// How long a frozen tenant's calls are held, and a newer placement waited for.
    hold: Duration,
    /// The largest message a send may carry (`--max-message-bytes`).
    max_message_bytes: usize,
}

/// The authenticated tenant of a request, once its key is known to have `scope`, and the
/// deadline its caller gave.
fn context<T>(request: &Request<T>, scope: Scope) -> Result<(TenantId, Duration), ApiError> {
    let tenant = request
        .extensions()
        .get::<TenantId>()
        .cloned()
        .ok_or_else(|| ApiError::Unauthenticated("no authenticated tenant".into()))?;
    let scopes = request
        .extensions()
        .get::<Scopes>()
        .copied()
        .unwrap_or_default();
    if !scopes.contains(scope) {
        return Err(ApiError::PermissionDenied(format!(
            "this API key does not have the `{}` scope this call needs",
            scope.as_str()
        )));
    }
    Ok((
        tenant,
        forward::deadline(request.metadata()).unwrap_or(DEFAULT_DEADLINE),
    ))
}

/// The call to forward to a cell: the caller's deadline, and the current span's trace
/// context when spans are exported.
fn forwarded<T>(message: T, deadline: Duration) -> Request<T> {
    let mut request = Request::new(message);
    request.set_timeout(deadline);
    cellmail_proto::trace::inject_current(request.metadata_mut());
    request
}

/// The tenant the interceptor authenticated, if any.
fn tenant_of<T>(request: &Request<T>) -> Option<&TenantId> {
    request.extensions().get::<TenantId>()
}

/// Runs `call` in `span` and records its outcome there.
async fn traced<T>(
    span: Span,
    call: impl Future<Output = Result<Response<T>, Status>>,
) -> Result<Response<T>, Status> {
    let answered = call.instrument(span.clone()).await;
    telemetry::span_answered(&span, &answered);
    answered
}

impl SenderApi {
    pub fn new(
        catalog: Arc<WatchedCatalog<Routes>>,
        sends: crate::SendConfig,
        channels: CellChannels,
    ) -> Self {
        Self {
            catalog,
            channels,
            admission: Admission::default(),
            hold: sends.hold(),
            max_message_bytes: sends.max_message_bytes,
        }
    }

    /// `tenant`'s target once `ready` holds on the catalog or the hold passed; a placement
    /// still frozen then is UNAVAILABLE.
    async fn target_when(
        &self,
        tenant: &TenantId,
        ready: impl Fn(&Routes) -> bool,
    ) -> Result<Target, ApiError> {
        self.catalog.wait_until(self.hold, ready).await;
        let target = self.catalog.read().target(tenant)?;
        if target.frozen {
            return Err(ApiError::Unavailable(format!(
                "tenant {tenant} is moving to another cell; retry (sends with the same idempotency key)"
            )));
        }
        Ok(target)
    }

    /// Admits one send of `tenant` at its rate, and says what it is counted under.
    fn admit(&self, tenant: &TenantId, labels: &mut SendLabels) -> Result<(), ApiError> {
        let admitting = self.catalog.read().admitting(tenant);
        (labels.cell, labels.tier) = (admitting.cell, admitting.tier);
        let rate = admitting.rate;
        self.admission.check(tenant, rate).map_err(|retry_after| {
            labels.refused_by_admission();
            ApiError::ResourceExhausted {
                reason: format!(
                    "tenant {tenant} is over its rate of {} sends/s",
                    rate.per_second
                ),
                retry_after,
            }
        })
    }

    async fn forward_send(
        &self,
        request: Request<v1::SendRequest>,
        labels: &mut SendLabels,
    ) -> Result<Response<v1::SendResponse>, Status> {
        let (tenant, deadline) = context(&request, Scope::Send)?;
        cellmail_proto::size::check(request.get_ref(), self.max_message_bytes)?;
        self.admit(&tenant, labels)?;
        let message = request.into_inner();
        self.on_cell(&tenant, Some(labels), |mut cell, caller| {
            let accept = v1::AcceptRequest {
                tenant_id: caller.tenant_id,
                epoch: caller.epoch,
                message: Some(message.clone()),
            };
            async move { cell.accept(forwarded(accept, deadline)).await }
        })
        .await
    }

    /// Runs `call` against `tenant`'s cell, once more after a "moved" answer. A send passes
    /// its `labels`: each forwarded call is timed.
    async fn on_cell<T, F, Fut>(
        &self,
        tenant: &TenantId,
        mut labels: Option<&mut SendLabels>,
        call: F,
    ) -> Result<Response<T>, Status>
    where
        F: Fn(CellClient<Channel>, v1::Caller) -> Fut,
        Fut: Future<Output = Result<Response<T>, Status>>,
    {
        let serving = |routes: &Routes| {
            routes
                .placement(tenant)
                .is_none_or(|(_, state)| state == PlacementState::Serving)
        };
        let mut target = self.catalog.read().target(tenant)?;
        if target.frozen {
            target = self.target_when(tenant, serving).await?;
        }
        match self
            .call_once(&target, tenant, labels.as_deref_mut(), &call)
            .await
        {
            Err(status) if ApiError::is_moved(&status) => {
                telemetry::moved_retry(&target.cell_label);
                let stale = target.epoch;
                let target = self
                    .target_when(tenant, |routes| {
                        serving(routes)
                            && routes
                                .placement(tenant)
                                .is_some_and(|(epoch, _)| epoch > stale)
                    })
                    .await?;
                match self.call_once(&target, tenant, labels, &call).await {
                    Err(status) if ApiError::is_moved(&status) => {
                        Err(ApiError::Unavailable(format!(
                            "tenant {tenant} is moving; retry (sends with the same idempotency key)"
                        ))
                        .into())
                    }
                    other => other,
                }
            }
            other => other,
        }
    }

    async fn call_once<T, F, Fut>(
        &self,
        target: &Target,
        tenant: &TenantId,
        labels: Option<&mut SendLabels>,
        call: &F,
    ) -> Result<Response<T>, Status>
    where
        F: Fn(CellClient<Channel>, v1::Caller) -> Fut,
        Fut: Future<Output = Result<Response<T>, Status>>,
    {
        let caller = v1::Caller {
            tenant_id: tenant.to_string(),
            epoch: target.epoch.0,
        };
        let client = self.channels.client(&target.cell, &target.endpoint)?;
        telemetry::span_forwarded_to(&target.cell_label);
        let started = Instant::now();
        let answered = call(client, caller).await;
        if let Some(labels) = labels {
            labels.forwarded(&target.cell_label, started.elapsed());
        }
        match answered {
            Err(status) if cell_unavailable(&status) => Err(ApiError::Unavailable(format!(
                "cell {} of tenant {tenant} is unavailable: {}",
                target.cell,
                status.message()
            ))
            .into()),
            other => other,
        }
    }
}

/// Whether a call's failure says its cell is unavailable. A cell that died mid-call resets
/// its streams (CANCELLED, or INTERNAL "h2 protocol error" for a reset with another reason)
/// or breaks the connection under them (UNKNOWN): the transport made these statuses and
/// gives the error it read, where an answer from the cell has none. To the caller that is
/// the cell being unavailable, and a send is safe to retry with its key.
fn cell_unavailable(status: &Status) -> bool {
    matches!(
        status.code(),
        tonic::Code::Unavailable | tonic::Code::Cancelled
    ) || std::error::Error::source(status).is_some()
}

impl SenderApi {
    /// Hands an open, click or unsubscribe of `link` (verified by its signature) to the
    /// tenant's cell.
    pub async fn engaged(&self, link: &Link, at_ms: u64) -> Result<(), Status> {
        let (action, url) = match &link.action {
            Action::Open => ("open", String::new()),
            Action::Click(url) => ("click", url.clone()),
            Action::Unsubscribe => ("unsubscribe", String::new()),
        };
        self.on_cell(&link.tenant, None, |mut cell, caller| {
            let request = v1::CellEngagementRequest {
                caller: Some(caller),
                message_id: link.message_id.clone(),
                recipient: link.recipient.clone(),
                action: action.to_owned(),
                url: url.clone(),
                at_ms,
            };
            async move {
                cell.record_engagement(forwarded(request, DEFAULT_DEADLINE))
                    .await
            }
        })
        .await
        .map(drop)
    }
}

/// The calls of Sender's that manage webhook endpoints, each one kind of the cell's one call.
type WebhookCall = v1::cell_webhooks_request::Call;

impl SenderApi {
    /// Forwards one of Sender's webhook calls (`name`) to the tenant's cell as `as_call`.
    async fn webhooks<T: Send>(
        &self,
        name: &'static str,
        request: Request<T>,
        as_call: fn(T) -> WebhookCall,
    ) -> Result<v1::WebhooksResponse, Status> {
        let span = telemetry::call_span(name, tenant_of(&request));
        traced(span, async move {
            let (tenant, deadline) = context(&request, Scope::Webhooks)?;
            let call = as_call(request.into_inner());
            self.on_cell(&tenant, None, |mut cell, caller| {
                let request = v1::CellWebhooksRequest {
                    caller: Some(caller),
                    call: Some(call.clone()),
                };
                async move { cell.webhooks(forwarded(request, deadline)).await }
            })
            .await
        })
        .await
        .map(Response::into_inner)
    }
}

/// The one endpoint a webhook call answered about, and its secret when it made one.
fn webhook_secret(answer: v1::WebhooksResponse) -> Response<v1::WebhookSecret> {
    Response::new(v1::WebhookSecret {
        webhook: answer.webhooks.into_iter().next(),
        secret: answer.secret,
    })
}

#[tonic::async_trait]
impl Sender for SenderApi {
    async fn send(
        &self,
        request: Request<v1::SendRequest>,
    ) -> Result<Response<v1::SendResponse>, Status> {
        let mut labels = SendLabels::new(request.get_ref().message_class);
        let span = telemetry::send_span(tenant_of(&request), labels.class);
        let answered = traced(span.clone(), self.forward_send(request, &mut labels)).await;
        labels.answered(&answered);
        if let Ok(response) = &answered {
            telemetry::span_message_id(&span, &response.get_ref().message_id);
        }
        answered
    }

    async fn get_message(
        &self,
        request: Request<v1::GetMessageRequest>,
    ) -> Result<Response<v1::MessageStatus>, Status> {
        let span = telemetry::call_span("get_message", tenant_of(&request));
        traced(span, async move {
            let (tenant, deadline) = context(&request, Scope::Read)?;
            let request = request.into_inner();
            self.on_cell(&tenant, None, |mut cell, caller| {
                let call = v1::CellGetMessageRequest {
                    caller: Some(caller),
                    request: Some(request.clone()),
                };
                async move { cell.get_message(forwarded(call, deadline)).await }
            })
            .await
        })
        .await
    }

    async fn list_suppressions(
        &self,
        request: Request<v1::ListSuppressionsRequest>,
    ) -> Result<Response<v1::ListSuppressionsResponse>, Status> {
        let span = telemetry::call_span("list_suppressions", tenant_of(&request));
        traced(span, async move {
            let (tenant, deadline) = context(&request, Scope::Read)?;
            let request = request.into_inner();
            self.on_cell(&tenant, None, |mut cell, caller| {
                let call = v1::CellListSuppressionsRequest {
                    caller: Some(caller),
                    request: Some(request.clone()),
                };
                async move { cell.list_suppressions(forwarded(call, deadline)).await }
            })
            .await
        })
        .await
    }

    async fn list_events(
        &self,
        request: Request<v1::ListEventsRequest>,
    ) -> Result<Response<v1::ListEventsResponse>, Status> {
        let span = telemetry::call_span("list_events", tenant_of(&request));
        traced(span, async move {
            let (tenant, deadline) = context(&request, Scope::Read)?;
            let request = request.into_inner();
            self.on_cell(&tenant, None, |mut cell, caller| {
                let call = v1::CellListEventsRequest {
                    caller: Some(caller),
                    request: Some(request.clone()),
                };
                async move { cell.list_events(forwarded(call, deadline)).await }
            })
            .await
        })
        .await
    }

    async fn create_webhook(
        &self,
        request: Request<v1::CreateWebhookRequest>,
    ) -> Result<Response<v1::WebhookSecret>, Status> {
        let answer = self
            .webhooks("create_webhook", request, WebhookCall::Create)
            .await?;
        Ok(webhook_secret(answer))
    }

    async fn list_webhooks(
        &self,
        request: Request<v1::ListWebhooksRequest>,
    ) -> Result<Response<v1::ListWebhooksResponse>, Status> {
        let answer = self
            .webhooks("list_webhooks", request, WebhookCall::List)
            .await?;
        Ok(Response::new(v1::ListWebhooksResponse {
            webhooks: answer.webhooks,
        }))
    }

    async fn update_webhook(
        &self,
        request: Request<v1::UpdateWebhookRequest>,
    ) -> Result<Response<v1::Webhook>, Status> {
        let answer = self
            .webhooks("update_webhook", request, WebhookCall::Update)
            .await?;
        let webhook = answer.webhooks.into_iter().next().unwrap_or_default();
        Ok(Response::new(webhook))
    }

    async fn delete_webhook(
        &self,
        request: Request<v1::WebhookRequest>,
    ) -> Result<Response<v1::DeleteWebhookResponse>, Status> {
        self.webhooks("delete_webhook", request, WebhookCall::Delete)
            .await?;
        Ok(Response::new(v1::DeleteWebhookResponse {}))
    }

    async fn test_webhook(
        &self,
        request: Request<v1::WebhookRequest>,
    ) -> Result<Response<v1::WebhookDelivery>, Status> {
        let answer = self
            .webhooks("test_webhook", request, WebhookCall::Test)
            .await?;
        Ok(Response::new(answer.delivery.unwrap_or_default()))
    }

    async fn rotate_webhook_secret(
        &self,
        request: Request<v1::RotateWebhookSecretRequest>,
    ) -> Result<Response<v1::WebhookSecret>, Status> {
        let answer = self
            .webhooks("rotate_webhook_secret", request, WebhookCall::Rotate)
            .await?;
        Ok(webhook_secret(answer))
    }

    async fn replay_webhook(
        &self,
        request: Request<v1::ReplayWebhookRequest>,
    ) -> Result<Response<v1::ReplayWebhookResponse>, Status> {
        let answer = self
            .webhooks("replay_webhook", request, WebhookCall::Replay)
            .await?;
        Ok(Response::new(v1::ReplayWebhookResponse {
            queued: answer.queued,
            next_from_ms: answer.next_from_ms,
        }))
    }

    async fn add_suppression(
        &self,
        request: Request<v1::AddSuppressionRequest>,
    ) -> Result<Response<v1::Suppression>, Status> {
        let span = telemetry::call_span("add_suppression", tenant_of(&request));
        traced(span, async move {
            let (tenant, deadline) = context(&request, Scope::Suppressions)?;
            let request = request.into_inner();
            self.on_cell(&tenant, None, |mut cell, caller| {
                let call = v1::CellAddSuppressionRequest {
                    caller: Some(caller),
                    request: Some(request.clone()),
                };
                async move { cell.add_suppression(forwarded(call, deadline)).await }
            })
            .await
        })
        .await
    }

    async fn get_stats(
        &self,
        request: Request<v1::GetStatsRequest>,
    ) -> Result<Response<v1::GetStatsResponse>, Status> {
        let span = telemetry::call_span("get_stats", tenant_of(&request));
        traced(span, async move {
            let (tenant, deadline) = context(&request, Scope::Read)?;
            let request = request.into_inner();
            self.on_cell(&tenant, None, |mut cell, caller| {
                let call = v1::CellGetStatsRequest {
                    caller: Some(caller),
                    request: Some(request),
                };
                async move { cell.get_stats(forwarded(call, deadline)).await }
            })
            .await
        })
        .await
    }

    async fn remove_suppression(
        &self,
        request: Request<v1::RemoveSuppressionRequest>,
    ) -> Result<Response<v1::RemoveSuppressionResponse>, Status> {
        let span = telemetry::call_span("remove_suppression", tenant_of(&request));
        traced(span, async move {
            let (tenant, deadline) = context(&request, Scope::Suppressions)?;
            let request = request.into_inner();
            self.on_cell(&tenant, None, |mut cell, caller| {
                let call = v1::CellRemoveSuppressionRequest {
                    caller: Some(caller),
                    request: Some(request.clone()),
                };
                async move { cell.remove_suppression(forwarded(call, deadline)).await }
            })
            .await
        })
        .await
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_broken_call_is_the_cell_unavailable_and_the_cells_own_answer_is_not() {
        let reset = Status::from_error(Box::new(h2::Error::from(h2::Reason::INTERNAL_ERROR)));
        assert_eq!(reset.code(), tonic::Code::Internal);
        assert!(cell_unavailable(&reset));
        assert!(cell_unavailable(&Status::cancelled("reset")));
        assert!(cell_unavailable(&Status::unavailable("down")));
        assert!(!cell_unavailable(&Status::internal(
            "the cell's own answer"
        )));
        assert!(!cell_unavailable(&Status::invalid_argument("to: bad")));
    }
}
