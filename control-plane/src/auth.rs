//! Operators, as a service in front of `Control`: every call must carry
//! `authorization: Bearer <operator credential>`, looked up by its hash in the registry
//! (a tenant's API key, or a revoked credential, is refused like any unknown one). A viewer
//! may call only the methods that change nothing. The call carries its [`Operator`] on, and
//! the audit trail names it: the actor is never a field the client sent.

use std::future::Future;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};

use cellmail_proto::ApiError;
use cellmail_registry::schema::{Keys, OperatorRole};
use cellmail_registry::{Registry, operators};
use tonic::Status;
use tonic::codegen::{Service, http};
use tonic::server::NamedService;

/// Who a `Control` call acts for.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Operator {
    pub name: String,
    pub role: OperatorRole,
}

/// The `Control` methods a viewer may call: those that change nothing.
fn changes_nothing(method: &str) -> bool {
    matches!(
        method,
        "ListTenants"
            | "ListCells"
            | "ListApiKeys"
            | "ListGlobalSuppressions"
            | "ListAudit"
            | "ListOperators"
            | "GetMove"
            | "GetOperation"
            | "GetRollout"
            | "PlanRebalance"
            | "ExportTenantData"
    )
}

/// Whether `operator` may call `method`.
fn allowed(operator: &Operator, method: &str) -> Result<(), ApiError> {
    match operator.role {
        OperatorRole::Admin => Ok(()),
        OperatorRole::Viewer if changes_nothing(method) => Ok(()),
        OperatorRole::Viewer => Err(ApiError::PermissionDenied(format!(
            "operator {} is a viewer: Control.{method} changes the platform",
            operator.name
        ))),
    }
}

fn bearer<B>(request: &http::Request<B>) -> Result<&str, ApiError> {
    request
        .headers()
        .get("authorization")
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.strip_prefix("Bearer "))
        .map(str::trim)
        .ok_or_else(|| {
            ApiError::Unauthenticated(
                "the Control API needs `authorization: Bearer <operator credential>`".into(),
            )
        })
}

/// Lets through the calls of known operators that their role allows.
#[derive(Clone)]
pub struct Authenticate<S> {
    inner: S,
    registry: Arc<dyn Registry>,
    keys: Keys,
}

impl<S> Authenticate<S> {
    pub fn new(inner: S, registry: Arc<dyn Registry>, keys: Keys) -> Self {
        Self {
            inner,
            registry,
            keys,
        }
    }
}

impl<S, B, R> Service<http::Request<B>> for Authenticate<S>
where
    S: Service<http::Request<B>, Response = http::Response<R>> + Clone + Send + 'static,
    S::Future: Send + 'static,
    S::Error: Send + 'static,
    B: Send + 'static,
    R: Default + Send + 'static,
{
    type Response = S::Response;
    type Error = S::Error;
    type Future = Pin<Box<dyn Future<Output = Result<S::Response, S::Error>> + Send>>;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), Self::Error>> {
        self.inner.poll_ready(cx)
    }

    fn call(&mut self, mut request: http::Request<B>) -> Self::Future {
        // The clone that was polled ready serves this call; the new one waits its turn.
        let clone = self.inner.clone();
        let mut inner = std::mem::replace(&mut self.inner, clone);
        let (registry, keys) = (self.registry.clone(), self.keys.clone());
        // What the check needs, owned: the request's body is not shared across the await.
        let method = request
            .uri()
            .path()
            .rsplit('/')
            .next()
            .unwrap_or_default()
            .to_owned();
        let credential = bearer(&request).map(str::to_owned);
        Box::pin(async move {
            let checked = async {
                let record = operators::find(registry.as_ref(), &keys, &credential?)
                    .await?
                    .ok_or_else(|| {
                        ApiError::Unauthenticated("unknown or revoked operator credential".into())
                    })?;
                let operator = Operator {
                    name: record.name,
                    role: record.role,
                };
                allowed(&operator, &method)?;
                Ok::<_, ApiError>(operator)
            };
            match checked.await {
                Ok(operator) => {
                    request.extensions_mut().insert(operator);
                    inner.call(request).await
                }
                Err(refused) => Ok(Status::from(refused).into_http()),
            }
        })
    }
}

impl<S: NamedService> NamedService for Authenticate<S> {
    const NAME: &'static str = S::NAME;
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_viewer_reads_everything_and_changes_nothing_an_admin_does_both() {
        let viewer = Operator {
            name: "v".into(),
            role: OperatorRole::Viewer,
        };
        let admin = Operator {
            name: "a".into(),
            role: OperatorRole::Admin,
        };
        for read in ["ListTenants", "ListAudit", "GetRollout", "ExportTenantData"] {
            assert!(allowed(&viewer, read).is_ok(), "{read}");
            assert!(allowed(&admin, read).is_ok(), "{read}");
        }
        for change in [
            "CreateTenant",
            "SuspendTenant",
            "MoveTenant",
            "IssueApiKey",
            "AddOperator",
            "StartRollout",
            "DeleteTenant",
        ] {
            let refused = allowed(&viewer, change).unwrap_err();
            assert!(matches!(refused, ApiError::PermissionDenied(_)), "{change}");
            assert!(allowed(&admin, change).is_ok(), "{change}");
        }
    }
}
