//! How large a message may be, and the answer to one that is larger.
//!
//! SES v2 takes messages of up to 40 MB ([`SES_MESSAGE_BYTES`]). The router's public limit
//! (`--max-message-bytes`) may be lower. A gRPC server reads a whole request before its
//! handler runs, so each server that takes messages reads requests of up to
//! [`decode_limit`] (twice the message limit): a request over the limit but under that is
//! decoded and answered by [`check`], which names the largest field. A larger one is
//! refused by the framework, and [`refusal`] is the answer that replaces its OUT_OF_RANGE.

use tonic::Status;

use crate::ApiError;
use crate::v1::SendRequest;

/// SES v2's limit for one message.
pub const SES_MESSAGE_BYTES: usize = 40 * 1024 * 1024;

/// The largest request a server taking messages of up to `message_bytes` decodes.
pub const fn decode_limit(message_bytes: usize) -> usize {
    2 * message_bytes
}

/// INVALID_ARGUMENT naming the largest of the message's parts if it is over `limit` bytes.
pub fn check(request: &SendRequest, limit: usize) -> Result<(), ApiError> {
    let parts = [
        ("subject", request.subject.len()),
        ("text", request.text.len()),
        ("html", request.html.len()),
    ];
    let size: usize = parts.iter().map(|(_, len)| len).sum();
    if size <= limit {
        return Ok(());
    }
    let (field, _) = parts
        .iter()
        .max_by_key(|(_, len)| *len)
        .copied()
        .unwrap_or(("text", 0));
    Err(ApiError::invalid(
        field,
        format!("the message is {size} bytes; at most {limit} bytes are accepted"),
    ))
}

/// What a request the framework refused for its size is answered instead: INVALID_ARGUMENT
/// naming the message (its parts were not read) and the limit.
pub fn refusal(limit: usize) -> Status {
    ApiError::invalid(
        "message",
        format!(
            "the request is over {} bytes; a message (subject, text and html) may be at most \
             {limit} bytes",
            decode_limit(limit)
        ),
    )
    .into()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn sized(text: usize, html: usize) -> SendRequest {
        SendRequest {
            subject: "Hi".into(),
            text: "t".repeat(text),
            html: "h".repeat(html),
            ..Default::default()
        }
    }

    fn field_of(result: Result<(), ApiError>) -> String {
        match result {
            Err(ApiError::InvalidArgument { field, .. }) => field,
            other => panic!("expected INVALID_ARGUMENT, got {other:?}"),
        }
    }

    #[test]
    fn a_message_over_the_limit_is_refused_naming_its_largest_part() {
        assert_eq!(check(&sized(60, 30), 100), Ok(()));
        assert_eq!(field_of(check(&sized(60, 40), 100)), "text");
        assert_eq!(field_of(check(&sized(10, 95), 100)), "html");
    }

    #[test]
    fn the_refusal_of_an_undecoded_request_names_the_message_and_the_limit() {
        let status = refusal(100);
        assert_eq!(status.code(), tonic::Code::InvalidArgument);
        assert!(status.message().contains("message"), "{}", status.message());
        assert!(
            status.message().contains("100 bytes"),
            "{}",
            status.message()
        );
    }
}
