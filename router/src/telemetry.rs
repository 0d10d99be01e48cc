//! The router's metrics: every `Send` it answers, by the tenant's cell, the message class,
//! the tenant's tier and the outcome (the gRPC code); the time of the forwarded call to the
//! cell; sends refused by admission; and retries after a cell's "moved" answer.
//!
//! There is no tenant label: cell, class, tier and outcome are small fixed sets. The send
//! path is what the router's CPU goes to, so labels are `&'static str`s and the cells'
//! interned ids (cloning one is a reference count, not an allocation).
//!
//! Authentication refuses a call before its message is read and before the router knows
//! which method it is for: [`MarkSends`] marks `Send` calls on their way in, so the refusal
//! still counts as a send (with class `unknown`, the message unread).
//!
//! Spans, when this process exports them ([`cellmail_proto::trace`]): one per `Sender` call,
//! `send` for a send (tenant, class, cell, message id, outcome) and one named for the method
//! for the others (tenant, cell, outcome). The cell is the one the call was last forwarded
//! to. Without an OTLP endpoint they are `Span::none()`: recording into one is a branch.

use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::Duration;

use cellmail_proto::TenantId;
use cellmail_proto::trace::exporting;
use cellmail_registry::schema::Tier;
use metrics::SharedString;
use tonic::codegen::{Service, http};
use tonic::server::NamedService;
use tonic::{Response, Status};
use tracing::Span;
use tracing::field::Empty;

pub const SENDS: &str = "cellmail_router_sends_total";
pub const SEND_SECONDS: &str = "cellmail_router_send_seconds";
pub const ADMISSION_REFUSALS: &str = "cellmail_router_admission_refusals_total";
pub const MOVED_RETRIES: &str = "cellmail_router_moved_retries_total";

/// The label of a cell, tier or class the router does not know.
const NONE: &str = "none";
/// The class of a send whose message was not read (refused by authentication).
const UNREAD: &str = "unknown";
/// The class of a send without a valid one (the cell refuses it).
const UNSPECIFIED: &str = "unspecified";

/// The path of `Sender.Send`.
const SEND_PATH: &str = "/cellmail.v1.Sender/Send";

fn cell_label(cell: &Option<Arc<str>>) -> SharedString {
    match cell {
        Some(cell) => SharedString::from(cell.clone()),
        None => SharedString::const_str(NONE),
    }
}

/// What one send is counted under, filled in as it goes: the tenant's cell (the one it was
/// last forwarded to, else its placement's when it arrived) and tier, if known.
#[derive(Debug)]
pub struct SendLabels {
    pub class: &'static str,
    pub cell: Option<Arc<str>>,
    pub tier: Option<Tier>,
}

impl SendLabels {
    /// A send of a message of `class` (the wire value) from a tenant not known yet.
    pub fn new(class: i32) -> Self {
        let class = cellmail_proto::MessageClass::from_wire(class)
            .map_or(UNSPECIFIED, cellmail_proto::MessageClass::as_str);
        Self {
            class,
            cell: None,
            tier: None,
        }
    }

    /// A send refused by authentication.
    fn unauthenticated() -> Self {
        Self {
            class: UNREAD,
            cell: None,
            tier: None,
        }
    }

    fn tier(&self) -> &'static str {
        self.tier.map_or(NONE, Tier::as_str)
    }

    /// Counts the send as answered `outcome` (a [`cellmail_proto::error::code_name`]).
    fn count(&self, outcome: &'static str) {
        metrics::counter!(SENDS, "cell" => cell_label(&self.cell), "class" => self.class, "tier" => self.tier(), "outcome" => outcome)
            .increment(1);
    }

    /// Counts the send as answered with `result`.
    pub fn answered<T>(&self, result: &Result<Response<T>, Status>) {
        self.count(cellmail_proto::error::outcome(result));
    }

    /// Counts a refusal by the tenant's rate.
    pub fn refused_by_admission(&self) {
        metrics::counter!(ADMISSION_REFUSALS, "cell" => cell_label(&self.cell), "tier" => self.tier())
            .increment(1);
    }

    /// Records a call forwarded to `cell` that took `elapsed`; the send is now `cell`'s.
    pub fn forwarded(&mut self, cell: &Arc<str>, elapsed: Duration) {
        metrics::histogram!(SEND_SECONDS, "cell" => SharedString::from(cell.clone()), "class" => self.class)
            .record(elapsed.as_secs_f64());
        self.cell = Some(cell.clone());
    }
}

/// Counts a retry of a call that `cell` answered "moved".
pub fn moved_retry(cell: &Arc<str>) {
    metrics::counter!(MOVED_RETRIES, "cell" => SharedString::from(cell.clone())).increment(1);
}

/// The span of one send of `tenant`'s (class `class`), when spans are exported.
pub fn send_span(tenant: Option<&TenantId>, class: &'static str) -> Span {
    if !exporting() {
        return Span::none();
    }
    tracing::info_span!(
        "send",
        otel.kind = "server",
        tenant = tenant.map(TenantId::as_str),
        class,
        cell = Empty,
        message_id = Empty,
        outcome = Empty,
        otel.status_code = Empty,
    )
}

/// The span of one call of `Sender` method `method` (not `Send`), when spans are exported.
pub fn call_span(method: &'static str, tenant: Option<&TenantId>) -> Span {
    if !exporting() {
        return Span::none();
    }
    tracing::info_span!(
        "sender",
        otel.name = method,
        otel.kind = "server",
        tenant = tenant.map(TenantId::as_str),
        cell = Empty,
        outcome = Empty,
        otel.status_code = Empty,
    )
}

/// Records on the current call's span that it is being forwarded to `cell`.
pub fn span_forwarded_to(cell: &Arc<str>) {
    if exporting() {
        Span::current().record("cell", &**cell);
    }
}

/// Records how the call of `span` was answered. As OpenTelemetry's gRPC conventions have
/// it for a server, only the codes that are the platform's fault mark the span an error,
/// not the caller's mistakes or refusals (invalid argument, rate, breaker).
pub fn span_answered<T>(span: &Span, result: &Result<Response<T>, Status>) {
    if span.is_disabled() {
        return;
    }
    span.record("outcome", cellmail_proto::error::outcome(result));
    if let Err(status) = result
        && matches!(
            status.code(),
            tonic::Code::Unknown
                | tonic::Code::DeadlineExceeded
                | tonic::Code::Unimplemented
                | tonic::Code::Internal
                | tonic::Code::Unavailable
                | tonic::Code::DataLoss
        )
    {
        span.record("otel.status_code", "error");
    }
}

/// Records the id of the message a send's cell answered with.
pub fn span_message_id(span: &Span, message_id: &str) {
    span.record("message_id", message_id);
}

/// Marks a request as a `Send` call, for authentication to count its refusal.
#[derive(Debug, Clone, Copy)]
pub struct SendCall;

/// Counts a call refused by authentication, if it is a `Send` call.
pub fn refused_unauthenticated(request: &tonic::Request<()>) {
    if request.extensions().get::<SendCall>().is_some() {
        SendLabels::unauthenticated().count(cellmail_proto::error::code_name(
            tonic::Code::Unauthenticated,
        ));
    }
}

/// In front of the authenticated `Sender` service: marks `Send` calls with [`SendCall`]
/// (a comparison and an extension, no allocation), so the interceptor that refuses a call
/// before its method is decoded can still tell a refused send from other calls.
#[derive(Debug, Clone)]
pub struct MarkSends<S>(pub S);

impl<S, B> Service<http::Request<B>> for MarkSends<S>
where
    S: Service<http::Request<B>>,
{
    type Response = S::Response;
    type Error = S::Error;
    type Future = S::Future;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), Self::Error>> {
        self.0.poll_ready(cx)
    }

    fn call(&mut self, mut request: http::Request<B>) -> Self::Future {
        if request.uri().path() == SEND_PATH {
            request.extensions_mut().insert(SendCall);
        }
        self.0.call(request)
    }
}

impl<S: NamedService> NamedService for MarkSends<S> {
    const NAME: &'static str = S::NAME;
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_send_path_is_senders_send_method() {
        let service = cellmail_proto::v1::sender_server::SERVICE_NAME;
        assert_eq!(SEND_PATH, format!("/{service}/Send"));
    }

    #[test]
    fn an_unset_class_is_labelled_transactional_and_an_unknown_one_unspecified() {
        assert_eq!(SendLabels::new(1).class, "transactional");
        assert_eq!(SendLabels::new(2).class, "marketing");
        assert_eq!(SendLabels::new(0).class, "transactional");
        assert_eq!(SendLabels::new(99).class, "unspecified");
    }
}
