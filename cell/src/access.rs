//! Who may call which `Cell` method: a service in front of the cell's API that reads the
//! caller's role from its TLS certificate.
//!
//! A router calls the send path and the tenant-facing reads, the control plane moves,
//! exports, imports, erases, asks for backlogs and health; another cell only forwards
//! feedback. A call without a certificate of the platform's is refused UNAUTHENTICATED, one
//! from a role not allowed the method PERMISSION_DENIED, before any handler runs: nothing is
//! read or written. Each refusal is logged and counted in
//! `cellmail_cell_calls_refused_total{method, reason}`.

use std::future::Future;
use std::pin::Pin;
use std::task::{Context, Poll};

use cellmail_proto::tls::Role;
use tonic::Status;
use tonic::codegen::{Service, http};
use tonic::server::NamedService;

pub const REFUSED: &str = "cellmail_cell_calls_refused_total";

/// What a role is let do on a cell.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Duty {
    /// The router: sends and the tenant-facing reads and suppression changes.
    Serve,
    /// The control plane: moves, offboarding and rollouts.
    Operate,
    /// Another cell: feedback for a tenant that moved here.
    Forward,
}

/// The duty a `Cell` method belongs to (`None`: not a method of `Cell`).
fn duty(method: &str) -> Option<Duty> {
    Some(match method {
        "Accept" | "GetMessage" | "ListSuppressions" | "AddSuppression" | "RemoveSuppression"
        | "GetStats" | "ListEvents" | "Webhooks" | "RecordEngagement" => Duty::Serve,
        "ProvisionTenant" | "PrepareTenant" | "ExportTenant" | "ImportTenant" | "TenantBacklog"
        | "ExportTenantData" | "EraseTenant" | "GetHealthReport" => Duty::Operate,
        "ForwardFeedback" => Duty::Forward,
        _ => return None,
    })
}

/// Why a call is refused.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Refusal {
    /// No certificate naming one of the platform's roles.
    Unauthenticated,
    /// A role that may not call the method.
    NotAllowed,
}

/// Whether `role` may call `method`.
fn verdict(method: &str, role: Option<&Role>) -> Result<(), Refusal> {
    let role = role.ok_or(Refusal::Unauthenticated)?;
    let allowed = match (duty(method), role) {
        (Some(Duty::Serve), Role::Router)
        | (Some(Duty::Operate), Role::Control)
        | (Some(Duty::Forward), Role::Cell(_)) => true,
        // Not a method of Cell: the service answers UNIMPLEMENTED itself.
        (None, _) => true,
        _ => false,
    };
    allowed.then_some(()).ok_or(Refusal::NotAllowed)
}

/// Lets through only the calls their caller's role may make.
#[derive(Debug, Clone)]
pub struct Authorize<S>(pub S);

impl<S, B, R> Service<http::Request<B>> for Authorize<S>
where
    S: Service<http::Request<B>, Response = http::Response<R>>,
    S::Future: Send + 'static,
    R: Default + Send + 'static,
    S::Error: Send + 'static,
{
    type Response = S::Response;
    type Error = S::Error;
    type Future = Pin<Box<dyn Future<Output = Result<S::Response, S::Error>> + Send>>;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), Self::Error>> {
        self.0.poll_ready(cx)
    }

    fn call(&mut self, request: http::Request<B>) -> Self::Future {
        let role = Role::of_peer(request.extensions());
        let method = request.uri().path().rsplit('/').next().unwrap_or_default();
        match verdict(method, role) {
            Ok(()) => Box::pin(self.0.call(request)),
            Err(refusal) => {
                let status = refuse(method, role, refusal);
                Box::pin(std::future::ready(Ok(status.into_http())))
            }
        }
    }
}

impl<S: NamedService> NamedService for Authorize<S> {
    const NAME: &'static str = S::NAME;
}

/// Logs and counts a refusal; the status to answer with.
fn refuse(method: &str, role: Option<&Role>, refusal: Refusal) -> Status {
    // The path is the caller's to choose: only Cell's own methods name a series.
    let label = if duty(method).is_some() {
        method
    } else {
        "unknown"
    };
    let reason = match refusal {
        Refusal::Unauthenticated => "unauthenticated",
        Refusal::NotAllowed => "permission_denied",
    };
    metrics::counter!(REFUSED, "method" => label.to_owned(), "reason" => reason).increment(1);
    match (refusal, role) {
        (Refusal::NotAllowed, Some(role)) => {
            tracing::warn!(%role, method, "cell call refused: role not allowed");
            Status::permission_denied(format!("{role} may not call Cell.{method}"))
        }
        _ => {
            tracing::warn!(method, "cell call refused: no platform certificate");
            Status::unauthenticated(format!(
                "Cell.{method} needs a client certificate of the platform's"
            ))
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use cellmail_proto::CellId;

    #[test]
    fn each_role_calls_only_its_own_methods() {
        let cell = Role::Cell(CellId::new("cell-2").unwrap());
        let serve = [
            "Accept",
            "GetMessage",
            "ListSuppressions",
            "AddSuppression",
            "RemoveSuppression",
            "GetStats",
        ];
        let operate = [
            "PrepareTenant",
            "ExportTenant",
            "ImportTenant",
            "TenantBacklog",
            "ExportTenantData",
            "EraseTenant",
            "GetHealthReport",
        ];
        let forward = ["ForwardFeedback"];
        for (role, own) in [
            (Role::Router, &serve[..]),
            (Role::Control, &operate[..]),
            (cell, &forward[..]),
        ] {
            for method in serve.iter().chain(&operate).chain(&forward) {
                let expected = if own.contains(method) {
                    Ok(())
                } else {
                    Err(Refusal::NotAllowed)
                };
                assert_eq!(verdict(method, Some(&role)), expected, "{role} {method}");
            }
        }
    }

    #[test]
    fn a_caller_without_a_role_is_refused_every_method() {
        for method in ["Accept", "EraseTenant", "ForwardFeedback", "Unknown"] {
            assert_eq!(verdict(method, None), Err(Refusal::Unauthenticated));
        }
    }
}
