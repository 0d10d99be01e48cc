//! A validated message as the cell queues, sends and records it.

use std::collections::BTreeMap;

use cellmail_proto::{MessageClass, MessageId, TenantId};
use serde::{Deserialize, Serialize};

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
}

impl Message {
    /// Every envelope recipient: to, cc, then bcc.
    pub fn recipients(&self) -> impl Iterator<Item = &Mailbox> {
        self.to.iter().chain(&self.cc).chain(&self.bcc)
    }
}

/// What the cell answered when it accepted a message; a retry with the same idempotency key
/// gets the same answer.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Accepted {
    pub message_id: MessageId,
    pub recipients: Vec<String>,
}
