//! A validated message as the cell queues, sends and records it.

use std::collections::BTreeMap;

use cellmail_proto::{MessageClass, MessageId, SuppressionReason, SuppressionScope, TenantId};

use serde::{Deserialize, Serialize};

/// What a queue carries instead of a message too large for it: the id of the message's copy
/// in the cell's store. A queued message is either this or the message itself.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct BodyRef {
    pub body_ref: MessageId,
}

/// One RFC 5322 mailbox: an address with an optional display name.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Mailbox {
    pub name: Option<String>,
    /// `local@domain`, the domain lowercased.
    pub email: String,
}

impl Mailbox {
    pub fn domain(&self) -> &str {
        self.email.rsplit_once('@').map_or("", |(_, domain)| domain)
    }
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Message {
    pub id: MessageId,
    pub tenant: TenantId,
    pub class: MessageClass,
    /// Empty when the client gave none.
    pub idempotency_key: String,
    pub from: Mailbox,
    pub to: Vec<Mailbox>,
    pub cc: Vec<Mailbox>,
    pub bcc: Vec<Mailbox>,
    pub reply_to: Vec<Mailbox>,
    pub subject: String,
    pub text: String,
    pub html: String,
    pub tags: BTreeMap<String, String>,
    pub accepted_at_ms: u64,
    /// The W3C `traceparent` of the accept that queued it, when that cell exported spans:
    /// its delivery continues the send's trace. Left out of the queued JSON when absent.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub traceparent: Option<String>,
    /// Headers the message carries beyond those the platform writes (name, value).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub headers: Vec<(String, String)>,
}

impl Message {
    /// Every envelope recipient: to, cc, then bcc.
    pub fn recipients(&self) -> impl Iterator<Item = &Mailbox> {
        self.to.iter().chain(&self.cc).chain(&self.bcc)
    }

    /// The store's record of this message, with no events yet.
    pub fn record(&self, state: MessageState, recipients: Vec<RecipientOutcome>) -> MessageRecord {
        MessageRecord {
            id: self.id,
            tenant: self.tenant.clone(),
            class: self.class,
            state,
            recipients,
            events: Vec::new(),
            accepted_at_ms: self.accepted_at_ms,
            tags: self.tags.clone(),
        }
    }

    /// The record of this message as queued: every envelope recipient accepted.
    pub fn queued_record(&self) -> MessageRecord {
        let recipients = self
            .recipients()
            .map(|m| RecipientOutcome {
                address: m.email.clone(),
                suppressed: None,
            })
            .collect();
        self.record(MessageState::Queued, recipients)
    }
}

/// One recipient as the accept path left it: accepted, or suppressed by a list.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct RecipientOutcome {
    pub address: String,
    pub suppressed: Option<(SuppressionReason, SuppressionScope)>,
}

/// What the cell answered when it accepted a message; a retry with the same idempotency key
/// gets the same answer.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Accepted {
    pub message_id: MessageId,
    pub recipients: Vec<RecipientOutcome>,
}

impl Accepted {
    /// Whether anything was queued: false when every recipient was suppressed.
    pub fn queued(&self) -> bool {
        self.recipients.iter().any(|r| r.suppressed.is_none())
    }
}

/// Where a message is in its life.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "SCREAMING_SNAKE_CASE")]
pub enum MessageState {
    Queued,
    Sent,
    Failed,
    /// Every recipient was suppressed; nothing was queued.
    Suppressed,
    /// Kept by the cell while its tenant's class is paused by its breaker.
    Held,
}

impl MessageState {
    pub fn as_str(self) -> &'static str {
        match self {
            MessageState::Queued => "QUEUED",
            MessageState::Sent => "SENT",
            MessageState::Failed => "FAILED",
            MessageState::Suppressed => "SUPPRESSED",
            MessageState::Held => "HELD",
        }
    }
}

/// What happened to a message: the cell's own steps (sent, failed) and the feedback the
/// mail transport reported (SES event types).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "SCREAMING_SNAKE_CASE")]
pub enum EventKind {
    Sent,
    Failed,
    Held,
    Released,
    Send,
    Delivery,
    Bounce,
    Complaint,
    Reject,
    DeliveryDelay,
    Open,
    Click,
    /// The recipient unsubscribed (one-click, or the confirmation page).
    Unsubscribe,
}

impl EventKind {
    pub fn as_str(self) -> &'static str {
        match self {
            EventKind::Sent => "SENT",
            EventKind::Failed => "FAILED",
            EventKind::Held => "HELD",
            EventKind::Released => "RELEASED",
            EventKind::Send => "SEND",
            EventKind::Delivery => "DELIVERY",
            EventKind::Bounce => "BOUNCE",
            EventKind::Complaint => "COMPLAINT",
            EventKind::Reject => "REJECT",
            EventKind::DeliveryDelay => "DELIVERY_DELAY",
            EventKind::Open => "OPEN",
            EventKind::Click => "CLICK",
            EventKind::Unsubscribe => "UNSUBSCRIBE",
        }
    }
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct MessageEvent {
    pub kind: EventKind,
    pub at_ms: u64,
    pub recipient: Option<String>,
    pub detail: String,
}

/// A message as the store remembers it, for `GetMessage`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct MessageRecord {
    pub id: MessageId,
    pub tenant: TenantId,
    pub class: MessageClass,
    pub state: MessageState,
    pub recipients: Vec<RecipientOutcome>,
    pub events: Vec<MessageEvent>,
    pub accepted_at_ms: u64,
    /// The send's tags, which its events carry.
    #[serde(default)]
    pub tags: BTreeMap<String, String>,
}

/// Messages for tests: a plain one that each test changes where it matters.
#[cfg(test)]
pub(crate) mod sample {
    use super::*;

    pub fn mailbox(email: &str) -> Mailbox {
        Mailbox {
            name: None,
            email: email.into(),
        }
    }

    /// Tenant `t`'s transactional message from `a@t.example` to `b@example.com`.
    pub fn message() -> Message {
        Message {
            id: MessageId::generate(),
            tenant: TenantId::new("t").unwrap(),
            class: MessageClass::Transactional,
            idempotency_key: String::new(),
            from: mailbox("a@t.example"),
            to: vec![mailbox("b@example.com")],
            cc: vec![],
            bcc: vec![],
            reply_to: vec![],
            subject: "s".into(),
            text: "t".into(),
            html: String::new(),
            tags: Default::default(),
            accepted_at_ms: 0,
            traceparent: None,
            headers: Vec::new(),
        }
    }
}
