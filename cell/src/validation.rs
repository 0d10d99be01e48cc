//! Turns a `SendRequest` into a [`Message`], or says which field is wrong.
//!
//! Addresses must be RFC 5322 mailboxes (an optional display name, a dotted domain, no
//! domain literals); no header value may carry CR, LF or NUL (header injection); a message
//! has 1 to 50 recipients, a subject, a text or html body, and fits the size cap. Tags use
//! the SES message-tag alphabet, and cellmail's own tag names are reserved.

use std::collections::{BTreeMap, HashMap};

use cellmail_proto::error::quote;
use cellmail_proto::size;
use cellmail_proto::v1::SendRequest;
use cellmail_proto::{ApiError, MessageClass, MessageId, TenantId};
use email_address::{EmailAddress, Options};

use crate::message::{Mailbox, Message};

pub const MAX_RECIPIENTS: usize = 50;
pub const MAX_SUBJECT_BYTES: usize = 998;
pub const MAX_IDEMPOTENCY_KEY_BYTES: usize = 256;
pub const MAX_TAGS: usize = 20;
const MAX_TAG_BYTES: usize = 256;
/// Tag names the mailer sets on every message itself.
pub const RESERVED_TAGS: [&str; 3] = ["tenant_id", "message_class", "message_id"];

fn has_line_break(value: &str) -> bool {
    value.contains(['\r', '\n', '\0'])
}

pub fn parse_mailbox(field: &str, raw: &str) -> Result<Mailbox, ApiError> {
    if has_line_break(raw) {
        return Err(ApiError::invalid(field, "must not contain CR, LF or NUL"));
    }
    let options = Options::default()
        .with_required_tld()
        .without_domain_literal();
    let parsed = EmailAddress::parse_with_options(raw.trim(), options).map_err(|e| {
        ApiError::invalid(
            field,
            format!("{} is not an RFC 5322 address: {e}", quote(raw)),
        )
    })?;
    let name = parsed.display_part().trim().trim_matches('"').trim();
    Ok(Mailbox {
        name: (!name.is_empty()).then(|| name.to_owned()),
        email: format!(
            "{}@{}",
            parsed.local_part(),
            parsed.domain().to_ascii_lowercase()
        ),
    })
}

fn parse_list(field: &str, raw: &[String]) -> Result<Vec<Mailbox>, ApiError> {
    raw.iter()
        .enumerate()
        .map(|(i, a)| parse_mailbox(&format!("{field}[{i}]"), a))
        .collect()
}

fn is_tag_token(value: &str) -> bool {
    !value.is_empty()
        && value.len() <= MAX_TAG_BYTES
        && value
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || b == b'_' || b == b'-')
}

fn check_tags(tags: HashMap<String, String>) -> Result<BTreeMap<String, String>, ApiError> {
    if tags.len() > MAX_TAGS {
        return Err(ApiError::invalid(
            "tags",
            format!("at most {MAX_TAGS} tags"),
        ));
    }
    let tags: BTreeMap<String, String> = tags.into_iter().collect();
    for (name, value) in &tags {
        let field = format!("tags[{name}]");
        if !is_tag_token(name) {
            return Err(ApiError::invalid(
                field,
                "names are 1-256 ASCII letters, digits, '_' or '-'",
            ));
        }
        if RESERVED_TAGS.contains(&name.as_str()) {
            return Err(ApiError::invalid(
                field,
                "this tag name is reserved for cellmail",
            ));
        }
        if !is_tag_token(value) {
            return Err(ApiError::invalid(
                field,
                "values are 1-256 ASCII letters, digits, '_' or '-'",
            ));
        }
    }
    Ok(tags)
}

/// Validates `request` for `tenant`; the message gets `id` and `now_ms` as its acceptance time.
pub fn message_from_request(
    tenant: &TenantId,
    id: MessageId,
    now_ms: u64,
    request: SendRequest,
) -> Result<Message, ApiError> {
    let key = &request.idempotency_key;
    if key.len() > MAX_IDEMPOTENCY_KEY_BYTES || !key.bytes().all(|b| b.is_ascii_graphic()) {
        return Err(ApiError::invalid(
            "idempotency_key",
            format!("at most {MAX_IDEMPOTENCY_KEY_BYTES} printable ASCII characters, no spaces"),
        ));
    }
    let class = MessageClass::from_wire(request.message_class).ok_or_else(|| {
        ApiError::invalid(
            "message_class",
            "must be MESSAGE_CLASS_TRANSACTIONAL (or unset) or MESSAGE_CLASS_MARKETING",
        )
    })?;
    if request.from_address.trim().is_empty() {
        return Err(ApiError::invalid("from_address", "is required"));
    }
    let from = parse_mailbox("from_address", &request.from_address)?;
    let (to, cc, bcc) = (
        parse_list("to", &request.to)?,
        parse_list("cc", &request.cc)?,
        parse_list("bcc", &request.bcc)?,
    );
    let reply_to = parse_list("reply_to", &request.reply_to)?;
    match to.len() + cc.len() + bcc.len() {
        0 => {
            return Err(ApiError::invalid(
                "to",
                "a message needs at least one recipient (to, cc or bcc)",
            ));
        }
        n if n > MAX_RECIPIENTS => {
            return Err(ApiError::invalid(
                "to",
                format!("{n} recipients (to + cc + bcc); at most {MAX_RECIPIENTS}"),
            ));
        }
        _ => {}
    }
    if request.subject.trim().is_empty() {
        return Err(ApiError::invalid("subject", "is required"));
    }
    if has_line_break(&request.subject) {
        return Err(ApiError::invalid(
            "subject",
            "must not contain CR, LF or NUL",
        ));
    }
    if request.subject.len() > MAX_SUBJECT_BYTES {
        return Err(ApiError::invalid(
            "subject",
            format!("at most {MAX_SUBJECT_BYTES} bytes"),
        ));
    }
    if request.text.is_empty() && request.html.is_empty() {
        return Err(ApiError::invalid(
            "text",
            "a message needs a text or html body",
        ));
    }
    size::check(&request, size::SES_MESSAGE_BYTES)?;
    let tags = check_tags(request.tags)?;
    Ok(Message {
        id,
        tenant: tenant.clone(),
        class,
        idempotency_key: request.idempotency_key,
        from,
        to,
        cc,
        bcc,
        reply_to,
        subject: request.subject,
        text: request.text,
        html: request.html,
        tags,
        accepted_at_ms: now_ms,
        traceparent: None,
        headers: Vec::new(),
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn good() -> SendRequest {
        SendRequest {
            idempotency_key: "order-1".into(),
            message_class: 1,
            from_address: "Acme <noreply@Acme.example>".into(),
            to: vec!["jane@example.com".into()],
            subject: "Hello".into(),
            text: "Hi".into(),
            ..Default::default()
        }
    }

    fn field_of(request: SendRequest) -> String {
        let tenant = TenantId::new("t").unwrap();
        match message_from_request(&tenant, MessageId::generate(), 0, request) {
            Err(ApiError::InvalidArgument { field, .. }) => field,
            other => panic!("expected InvalidArgument, got {other:?}"),
        }
    }

    #[test]
    fn a_good_request_becomes_a_message_with_normalised_addresses() {
        let tenant = TenantId::new("t").unwrap();
        let message = message_from_request(&tenant, MessageId::generate(), 7, good()).unwrap();
        assert_eq!(message.from.email, "noreply@acme.example");
        assert_eq!(message.from.name.as_deref(), Some("Acme"));
        assert_eq!(message.from.domain(), "acme.example");
        assert_eq!(message.class, MessageClass::Transactional);
        assert_eq!(message.accepted_at_ms, 7);
    }

    #[test]
    fn an_unset_message_class_is_transactional() {
        let tenant = TenantId::new("t").unwrap();
        let unset = SendRequest {
            message_class: 0,
            ..good()
        };
        let message = message_from_request(&tenant, MessageId::generate(), 7, unset).unwrap();
        assert_eq!(message.class, MessageClass::Transactional);
        let marketing = SendRequest {
            message_class: 2,
            ..good()
        };
        let message = message_from_request(&tenant, MessageId::generate(), 7, marketing).unwrap();
        assert_eq!(message.class, MessageClass::Marketing);
    }

    #[test]
    fn each_bad_field_is_named() {
        type Mutation = Box<dyn Fn(&mut SendRequest)>;
        let cases: Vec<(&str, Mutation)> = vec![
            (
                "idempotency_key",
                Box::new(|r| r.idempotency_key = "has space".into()),
            ),
            (
                "idempotency_key",
                Box::new(|r| r.idempotency_key = "k".repeat(257)),
            ),
            ("message_class", Box::new(|r| r.message_class = 7)),
            ("from_address", Box::new(|r| r.from_address = String::new())),
            (
                "from_address",
                Box::new(|r| r.from_address = "not an address".into()),
            ),
            (
                "from_address",
                Box::new(|r| r.from_address = "a@b.example\r\nBcc: x@y.example".into()),
            ),
            ("to[1]", Box::new(|r| r.to.push("bad@".into()))),
            ("cc[0]", Box::new(|r| r.cc.push("x@[127.0.0.1]".into()))),
            ("bcc[0]", Box::new(|r| r.bcc.push("nodomain".into()))),
            (
                "reply_to[0]",
                Box::new(|r| r.reply_to.push("a\n@b.example".into())),
            ),
            ("to", Box::new(|r| r.to.clear())),
            (
                "to",
                Box::new(|r| r.to = (0..51).map(|i| format!("u{i}@example.com")).collect()),
            ),
            (
                "subject",
                Box::new(|r| r.subject = "Hi\r\nBcc: victim@example.com".into()),
            ),
            ("subject", Box::new(|r| r.subject = " ".into())),
            ("subject", Box::new(|r| r.subject = "s".repeat(999))),
            ("text", Box::new(|r| r.text.clear())),
            (
                "html",
                Box::new(|r| r.html = "x".repeat(size::SES_MESSAGE_BYTES)),
            ),
            (
                "tags[bad name]",
                Box::new(|r| {
                    r.tags.insert("bad name".into(), "v".into());
                }),
            ),
            (
                "tags[tenant_id]",
                Box::new(|r| {
                    r.tags.insert("tenant_id".into(), "other".into());
                }),
            ),
            (
                "tags[k]",
                Box::new(|r| {
                    r.tags.insert("k".into(), "v\r\nX: y".into());
                }),
            ),
            (
                "tags",
                Box::new(|r| r.tags = (0..21).map(|i| (format!("k{i}"), "v".into())).collect()),
            ),
        ];
        for (field, mutate) in cases {
            let mut request = good();
            mutate(&mut request);
            assert_eq!(field_of(request), field);
        }
    }

    #[test]
    fn cc_or_bcc_alone_is_enough_and_fifty_is_the_limit() {
        let tenant = TenantId::new("t").unwrap();
        let mut request = good();
        request.to.clear();
        request.bcc = (0..MAX_RECIPIENTS)
            .map(|i| format!("u{i}@example.com"))
            .collect();
        assert!(message_from_request(&tenant, MessageId::generate(), 0, request).is_ok());
    }
}
