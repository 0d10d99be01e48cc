//! Control actions counted, as a service in front of the authenticated `Control` API:
//! `cellmail_control_actions_total{action, outcome}`, where the action is the call's method
//! in snake case (`create_tenant`, `move_tenant`, ...) and the outcome its gRPC code
//! (`ok`, `unauthenticated`, `not_found`, ...). Moves finished and leadership are counted
//! where they happen ([`crate::moves`], [`crate::leader`]).
//!
//! The method comes from the request path, which the caller chooses: it is a label only for
//! calls that reached a handler. A call refused for its credential (checked before the
//! method is) or for a method `Control` does not have counts as action `unknown`, so no
//! caller can add series.

use std::future::Future;
use std::pin::Pin;
use std::task::{Context, Poll};

use metrics::SharedString;
use tonic::Code;
use tonic::codegen::{Service, http};
use tonic::server::NamedService;

pub const ACTIONS: &str = "cellmail_control_actions_total";

/// The action of a call whose method is not known to be one of `Control`'s.
const UNKNOWN: &str = "unknown";

/// The code a response answers with: in its headers when the call failed before any
/// message (every error of a unary call), else OK (a stream that fails later still counts as
/// answered OK: its status is in trailers this service does not wait for).
fn code_of(headers: &http::HeaderMap) -> Code {
    headers
        .get("grpc-status")
        .and_then(|value| value.to_str().ok()?.parse::<i32>().ok())
        .map_or(Code::Ok, Code::from_i32)
}

/// `MoveTenant` -> `move_tenant`.
fn snake_case(method: &str) -> String {
    let mut snake = String::with_capacity(method.len() + 4);
    for (i, c) in method.chars().enumerate() {
        if c.is_ascii_uppercase() {
            if i > 0 {
                snake.push('_');
            }
            snake.push(c.to_ascii_lowercase());
        } else {
            snake.push(c);
        }
    }
    snake
}

/// The action label of a call to `path` answered `code`.
fn action(path: &str, code: Code) -> SharedString {
    let method = path.rsplit('/').next().unwrap_or_default();
    if matches!(code, Code::Unauthenticated | Code::Unimplemented) || method.is_empty() {
        SharedString::const_str(UNKNOWN)
    } else {
        SharedString::from_owned(snake_case(method))
    }
}

/// Counts every call to the wrapped service once it is answered.
#[derive(Debug, Clone)]
pub struct CountActions<S>(pub S);

impl<S, B, R> Service<http::Request<B>> for CountActions<S>
where
    S: Service<http::Request<B>, Response = http::Response<R>>,
    S::Future: Send + 'static,
{
    type Response = S::Response;
    type Error = S::Error;
    type Future = Pin<Box<dyn Future<Output = Result<S::Response, S::Error>> + Send>>;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), Self::Error>> {
        self.0.poll_ready(cx)
    }

    fn call(&mut self, request: http::Request<B>) -> Self::Future {
        let path = request.uri().path().to_owned();
        let answered = self.0.call(request);
        Box::pin(async move {
            let response = answered.await?;
            let code = code_of(response.headers());
            let outcome = cellmail_proto::error::code_name(code);
            metrics::counter!(ACTIONS, "action" => action(&path, code), "outcome" => outcome)
                .increment(1);
            Ok(response)
        })
    }
}

impl<S: NamedService> NamedService for CountActions<S> {
    const NAME: &'static str = S::NAME;
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn an_action_is_the_method_in_snake_case_unless_the_call_never_reached_one() {
        let path = "/cellmail.v1.Control/ExportTenantData";
        assert_eq!(&*action(path, Code::Ok), "export_tenant_data");
        assert_eq!(&*action(path, Code::NotFound), "export_tenant_data");
        assert_eq!(&*action(path, Code::Unauthenticated), "unknown");
        assert_eq!(
            &*action("/cellmail.v1.Control/AnythingAtAll", Code::Unimplemented),
            "unknown"
        );
        assert_eq!(&*action("/", Code::Ok), "unknown");
    }

    #[test]
    fn the_code_is_read_from_the_headers_and_ok_without_one() {
        let mut headers = http::HeaderMap::new();
        assert_eq!(code_of(&headers), Code::Ok);
        headers.insert("grpc-status", http::HeaderValue::from_static("16"));
        assert_eq!(code_of(&headers), Code::Unauthenticated);
    }
}
