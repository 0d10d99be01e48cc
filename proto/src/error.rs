//! The error model of every cellmail API.
//!
//! Domain code returns [`ApiError`]; this module is the one place that turns it into a gRPC
//! status (code, readable message, and `google.rpc` details a program can read: a
//! `BadRequest` field violation naming the field, an `ErrorInfo` with a stable reason).

use std::collections::HashMap;

use tonic::{Code, Status};
use tonic_types::{ErrorDetails, StatusExt};

/// `ErrorInfo.domain` of every cellmail error.
pub const ERROR_DOMAIN: &str = "cellmail";
/// `ErrorInfo.reason` of the cell's answer to a send stamped with an epoch it does not own.
pub const REASON_TENANT_MOVED: &str = "TENANT_MOVED";
/// `ErrorInfo.reason` of a send refused because the tenant's breaker paused its class.
pub const REASON_TENANT_PAUSED: &str = "TENANT_PAUSED";
/// The most of a caller's input an error quotes.
pub const QUOTED_CHARS: usize = 128;
/// The longest message an error carries, whatever built it: a status travels in HTTP/2
/// trailers, which a peer refuses past its header list limit.
const MAX_MESSAGE_CHARS: usize = 1024;

/// `input` quoted as Rust quotes a string, cut to its first [`QUOTED_CHARS`] characters:
/// what an error may say of a caller's input.
pub fn quote(input: &str) -> String {
    match input.char_indices().nth(QUOTED_CHARS) {
        None => format!("{input:?}"),
        Some((cut, _)) => {
            let rest = input[cut..].chars().count();
            format!("{:?}… ({rest} more characters)", &input[..cut])
        }
    }
}

/// `text` cut to `max` characters, marked as cut.
fn bounded(text: String, max: usize) -> String {
    match text.char_indices().nth(max) {
        None => text,
        Some((cut, _)) => format!("{}…", &text[..cut]),
    }
}

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum ApiError {
    #[error("{0}")]
    Unauthenticated(String),
    #[error("{0}")]
    PermissionDenied(String),
    #[error("{field}: {reason}")]
    InvalidArgument { field: String, reason: String },
    #[error("{0}")]
    NotFound(String),
    #[error("{0}")]
    AlreadyExists(String),
    /// A concurrent change won; the caller may retry.
    #[error("{0}")]
    Aborted(String),
    /// The cell does not own the tenant at the epoch the router stamped on the send.
    #[error("tenant {tenant} is not served by this cell at epoch {epoch}")]
    Moved { tenant: String, epoch: u64 },
    /// The tenant is over its rate; retry after `retry_after`.
    #[error("{reason}; retry after {} ms", retry_after.as_millis())]
    ResourceExhausted {
        reason: String,
        retry_after: std::time::Duration,
    },
    /// The tenant's breaker paused this class of its mail; `rates` are what tripped it.
    #[error("{detail}")]
    Paused {
        detail: String,
        rates: Vec<(String, String)>,
    },
    /// The system is not in the state the call needs (e.g. a tenant must be suspended first).
    #[error("{0}")]
    FailedPrecondition(String),
    /// Retryable: the cell is down or the tenant's placement is not usable right now.
    #[error("{0}")]
    Unavailable(String),
    #[error("internal error: {0}")]
    Internal(String),
}

impl ApiError {
    pub fn invalid(field: impl Into<String>, reason: impl Into<String>) -> Self {
        ApiError::InvalidArgument {
            field: field.into(),
            reason: reason.into(),
        }
    }

    /// Whether a status returned by a cell is its "moved" answer.
    pub fn is_moved(status: &Status) -> bool {
        status.code() == Code::Aborted
            && status.get_details_error_info().is_some_and(|info| {
                info.reason == REASON_TENANT_MOVED && info.domain == ERROR_DOMAIN
            })
    }

    fn info(reason: &str, metadata: HashMap<String, String>) -> ErrorDetails {
        ErrorDetails::with_error_info(reason, ERROR_DOMAIN, metadata)
    }
}

/// A status code's name as metrics label it: the canonical gRPC name in lower case (`ok`,
/// `resource_exhausted`, `unauthenticated`, ...), one of a fixed set.
pub fn code_name(code: Code) -> &'static str {
    match code {
        Code::Ok => "ok",
        Code::Cancelled => "cancelled",
        Code::Unknown => "unknown",
        Code::InvalidArgument => "invalid_argument",
        Code::DeadlineExceeded => "deadline_exceeded",
        Code::NotFound => "not_found",
        Code::AlreadyExists => "already_exists",
        Code::PermissionDenied => "permission_denied",
        Code::ResourceExhausted => "resource_exhausted",
        Code::FailedPrecondition => "failed_precondition",
        Code::Aborted => "aborted",
        Code::OutOfRange => "out_of_range",
        Code::Unimplemented => "unimplemented",
        Code::Internal => "internal",
        Code::Unavailable => "unavailable",
        Code::DataLoss => "data_loss",
        Code::Unauthenticated => "unauthenticated",
    }
}

/// The [`code_name`] of a call's result.
pub fn outcome<T>(result: &Result<T, Status>) -> &'static str {
    code_name(result.as_ref().map_or_else(Status::code, |_| Code::Ok))
}

impl From<ApiError> for Status {
    fn from(err: ApiError) -> Status {
        let message = bounded(err.to_string(), MAX_MESSAGE_CHARS);
        let (code, details) = match err {
            ApiError::Unauthenticated(_) => (
                Code::Unauthenticated,
                ApiError::info("UNAUTHENTICATED", HashMap::new()),
            ),
            ApiError::PermissionDenied(_) => (
                Code::PermissionDenied,
                ApiError::info("PERMISSION_DENIED", HashMap::new()),
            ),
            ApiError::InvalidArgument { field, reason } => (
                Code::InvalidArgument,
                ErrorDetails::with_bad_request_violation(
                    bounded(field, QUOTED_CHARS),
                    bounded(reason, MAX_MESSAGE_CHARS),
                ),
            ),
            ApiError::NotFound(_) => (Code::NotFound, ApiError::info("NOT_FOUND", HashMap::new())),
            ApiError::AlreadyExists(_) => (
                Code::AlreadyExists,
                ApiError::info("ALREADY_EXISTS", HashMap::new()),
            ),
            ApiError::Aborted(_) => (Code::Aborted, ApiError::info("ABORTED", HashMap::new())),
            ApiError::Moved { tenant, epoch } => (
                Code::Aborted,
                ApiError::info(
                    REASON_TENANT_MOVED,
                    HashMap::from([
                        ("tenant".to_owned(), tenant),
                        ("epoch".to_owned(), epoch.to_string()),
                    ]),
                ),
            ),
            ApiError::ResourceExhausted { retry_after, .. } => {
                let mut details = ErrorDetails::with_retry_info(Some(retry_after));
                details.set_error_info("RATE_LIMITED", ERROR_DOMAIN, HashMap::new());
                (Code::ResourceExhausted, details)
            }
            ApiError::Paused { rates, .. } => (
                Code::FailedPrecondition,
                ApiError::info(REASON_TENANT_PAUSED, rates.into_iter().collect()),
            ),
            ApiError::FailedPrecondition(_) => (
                Code::FailedPrecondition,
                ApiError::info("FAILED_PRECONDITION", HashMap::new()),
            ),
            ApiError::Unavailable(_) => (
                Code::Unavailable,
                ApiError::info("UNAVAILABLE", HashMap::new()),
            ),
            ApiError::Internal(_) => (Code::Internal, ApiError::info("INTERNAL", HashMap::new())),
        };
        Status::with_error_details(code, message, details)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn invalid_argument_names_the_field_in_message_and_details() {
        let status = Status::from(ApiError::invalid("to[1]", "not an RFC 5322 address"));
        assert_eq!(status.code(), Code::InvalidArgument);
        assert!(
            status.message().starts_with("to[1]:"),
            "{}",
            status.message()
        );
        let violations = status
            .get_details_bad_request()
            .expect("bad request details")
            .field_violations;
        assert_eq!(violations[0].field, "to[1]");
    }

    #[test]
    fn a_quote_keeps_at_most_its_limit_of_the_input_and_says_how_much_is_left() {
        assert_eq!(quote("a@b"), "\"a@b\"");
        let long = format!("{}@example.com", "é".repeat(6_000));
        let quoted = quote(&long);
        assert!(quoted.starts_with(&format!("\"{}", "é".repeat(QUOTED_CHARS))));
        assert!(quoted.ends_with(&format!(
            "… ({} more characters)",
            6_000 + 12 - QUOTED_CHARS
        )));
    }

    #[test]
    fn no_status_carries_a_message_longer_than_its_bound() {
        let status = Status::from(ApiError::invalid("to[0]", "x".repeat(100_000)));
        assert!(status.message().chars().count() <= MAX_MESSAGE_CHARS + 1);
        assert!(status.message().starts_with("to[0]: x"));
        let violation = &status.get_details_bad_request().unwrap().field_violations[0];
        assert!(violation.description.chars().count() <= MAX_MESSAGE_CHARS + 1);
        let internal = Status::from(ApiError::Internal("y".repeat(100_000)));
        assert!(internal.message().chars().count() <= MAX_MESSAGE_CHARS + 1);
    }

    #[test]
    fn an_outcome_is_its_status_code_in_lower_snake_case() {
        assert_eq!(outcome::<()>(&Ok(())), "ok");
        let refused = Err::<(), _>(Status::from(ApiError::ResourceExhausted {
            reason: "over".into(),
            retry_after: std::time::Duration::from_millis(5),
        }));
        assert_eq!(outcome(&refused), "resource_exhausted");
        assert_eq!(code_name(Code::Unauthenticated), "unauthenticated");
        assert_eq!(code_name(Code::DeadlineExceeded), "deadline_exceeded");
    }

    #[test]
    fn moved_is_recognised_and_nothing_else_is() {
        let moved = Status::from(ApiError::Moved {
            tenant: "t".into(),
            epoch: 3,
        });
        assert!(ApiError::is_moved(&moved));
        assert!(!ApiError::is_moved(&Status::from(ApiError::Unavailable(
            "down".into()
        ))));
        assert!(!ApiError::is_moved(&Status::aborted("plain abort")));
    }
}
