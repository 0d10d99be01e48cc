//! How a cell hands a message to the world.
//!
//! A [`Mailer`] sends one message or says whether the failure is worth retrying.
//! [`render`] builds the RFC 5322 form every mailer that needs raw MIME shares, and
//! [`mailbox_text`] the one-line form of an address for APIs that take addresses as text.
//!
//! Implementations: [`file::FileSink`] (embedded: one .eml per message on disk) and
//! [`ses::SesMailer`] (production: SES v2 `SendEmail`, one configuration set per tenant,
//! at the account's rate: [`quota`], its events back through SNS: [`route`]);
//! [`fault::FaultyMailer`] wraps either to fail a share of attempts on purpose.

pub mod fault;
pub mod file;
pub mod quota;
pub mod route;
pub mod ses;

use std::time::Duration;

use async_trait::async_trait;
use mail_builder::MessageBuilder;
use mail_builder::headers::Header;
use mail_builder::headers::address::Address;
use mail_builder::headers::raw::Raw;

use cellmail_proto::TenantId;
use cellmail_registry::schema::ReputationPolicy;

use crate::message::{Mailbox, Message};

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum MailerError {
    /// Throttling, a 5xx, a full disk: the message goes back to the queue.
    #[error("retryable: {reason}")]
    Retryable {
        reason: String,
        retry_after: Option<Duration>,
    },
    /// The transport stopped all sending (a paused or suspended account): the cell stops
    /// sending for `retry_after`, and the message waits; nothing is dropped.
    #[error("sending paused: {reason}")]
    Paused {
        reason: String,
        retry_after: Duration,
    },
    /// The transport stopped this message's tenant alone (SES paused its configuration set
    /// or SES tenant): the tenant's mail is held, and the cell's other tenants send on.
    #[error("tenant paused: {reason}")]
    TenantPaused { reason: String },
    /// The message can never be sent as it is (rejected content, unverified identity).
    #[error("permanent: {reason}")]
    Permanent { reason: String },
}

/// What sending for a tenant needs set up on the transport: the domains it sends from (all
/// of them, or the one a send needs) and how SES manages its reputation.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Setup {
    pub identities: Vec<Identity>,
    pub reputation: ReputationPolicy,
}

impl Setup {
    /// What a send from `domain` needs for a tenant the cell knows nothing of.
    pub fn unlisted(domain: &str) -> Self {
        Self {
            identities: vec![Identity::unlisted(domain)],
            reputation: ReputationPolicy::default(),
        }
    }
}

/// A domain a tenant sends from, as the transport is told of it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Identity {
    pub domain: String,
    /// The domain's own DKIM key, when the cell can open it.
    pub dkim: Option<DkimSigning>,
    /// The custom MAIL FROM domain the transport sends the domain's mail with, when the
    /// domain was added as an identity (its MX and SPF records were handed out).
    pub mail_from: Option<String>,
}

impl Identity {
    /// A From domain the tenant never added as an identity: no key or MAIL FROM of its own.
    pub fn unlisted(domain: &str) -> Self {
        Self {
            domain: domain.to_owned(),
            dkim: None,
            mail_from: None,
        }
    }
}

/// How the transport sees a domain it verifies itself: SES's statuses, as SES names them
/// (`PENDING`, `SUCCESS`, `FAILED`, `TEMPORARY_FAILURE`, `NOT_STARTED`).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct IdentityStatus {
    pub dkim: String,
    pub mail_from: String,
}

/// A domain's own DKIM key, as SES takes it ("bring your own DKIM").
#[derive(Clone, PartialEq, Eq)]
pub struct DkimSigning {
    pub selector: String,
    /// The private key, base64 of its DER.
    pub private_key: String,
}

impl std::fmt::Debug for DkimSigning {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("DkimSigning")
            .field("selector", &self.selector)
            .finish_non_exhaustive()
    }
}

/// Whether the transport lets a tenant send, in its own view.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Sending {
    Enabled,
    /// The tenant alone may not send, and why.
    TenantPaused(String),
    /// The whole account may not send, and why.
    AccountPaused(String),
}

#[async_trait]
pub trait Mailer: Send + Sync + 'static {
    /// Sends `message`, once [`Mailer::prepare`] has set up its tenant and From domain.
    async fn send(&self, message: &Message) -> Result<(), MailerError>;

    /// Waits until the transport may take one more message. A delivery worker waits here
    /// before it takes its next message from the lanes, so that the lanes' fair order, not
    /// the order workers queue for the transport, decides whose message each turn sends. A
    /// transport with no rate to keep to keeps this default.
    async fn turn(&self) {}

    /// Sets up what sending for `tenant` needs (`setup`): when the tenant is placed here or
    /// adds a domain, before it is moved here, at each sweep of the cell's tenants, and before
    /// each send for its From domain (what is set up already is not asked for again). A
    /// mailer with nothing to set up per tenant keeps this default.
    async fn prepare(&self, _tenant: &TenantId, _setup: &Setup) -> Result<(), MailerError> {
        Ok(())
    }

    /// Removes what [`Mailer::prepare`] or a send set up for `tenant`, once it is offboarded
    /// (what was already gone is as good). A mailer with nothing per tenant keeps this default.
    async fn forget(&self, _tenant: &TenantId) -> Result<(), MailerError> {
        Ok(())
    }

    /// How the transport sees `domain`, once [`Mailer::prepare`] set it up; `None` from a
    /// transport that verifies no domain itself (it keeps this default).
    async fn identity_status(&self, _domain: &str) -> Result<Option<IdentityStatus>, MailerError> {
        Ok(None)
    }

    /// The AWS region the transport sends in, whose feedback endpoint its domains' MAIL
    /// FROM domains need as their MX; `None` (the default) for a transport that needs none.
    fn ses_region(&self) -> Option<String> {
        None
    }

    /// Whether the transport lets the account send at all ([`Sending::Enabled`] or
    /// [`Sending::AccountPaused`]), asked of the transport itself (its events about pauses
    /// may be lost). A transport that never pauses anyone keeps this default.
    async fn account_sending(&self) -> Result<Sending, MailerError> {
        Ok(Sending::Enabled)
    }

    /// Whether the transport lets `tenant` itself send ([`Sending::Enabled`] or
    /// [`Sending::TenantPaused`]), its account's pause aside. A transport that never pauses
    /// anyone keeps this default.
    async fn sending(&self, _tenant: &TenantId) -> Result<Sending, MailerError> {
        Ok(Sending::Enabled)
    }

    /// How often the cell asks [`Mailer::account_sending`], and [`Mailer::sending`] for each
    /// of its tenants; `None` for a transport that never pauses anyone.
    fn reconcile_every(&self) -> Option<Duration> {
        None
    }
}

fn address(mailbox: &Mailbox) -> Address<'_> {
    match &mailbox.name {
        Some(name) => Address::new_address(Some(name.as_str()), mailbox.email.as_str()),
        None => Address::new_address(None::<&str>, mailbox.email.as_str()),
    }
}

/// `Name <local@domain>` (or the bare address) on one line, the display name quoted or
/// RFC 2047-encoded as a header needs it (SES takes a non-ASCII name only encoded).
pub fn mailbox_text(mailbox: &Mailbox) -> String {
    if mailbox.name.is_none() {
        return mailbox.email.clone();
    }
    let mut header = Vec::new();
    address(mailbox).write_header(&mut header, 0);
    // Unfolding removes the CRLF of each fold and keeps the whitespace after it.
    String::from_utf8_lossy(&header)
        .replace("\r\n", "")
        .trim()
        .to_owned()
}

fn address_list(mailboxes: &[Mailbox]) -> Address<'_> {
    Address::new_list(mailboxes.iter().map(address).collect())
}

/// The message as RFC 5322 text: Message-ID, Date, From, To, Cc, Reply-To, Subject, the
/// text and html parts, and cellmail's headers (tenant, message id, idempotency key, and
/// each tag as `X-Cellmail-Tag-<name>`). Bcc recipients are not written into the headers.
pub fn render(message: &Message) -> Vec<u8> {
    let mut builder = MessageBuilder::new()
        .message_id(format!("{}@{}", message.id, message.from.domain()))
        .date((message.accepted_at_ms / 1000) as i64)
        .from(address(&message.from))
        .subject(message.subject.as_str())
        .header("X-Cellmail-Tenant", Raw::new(message.tenant.as_str()))
        .header("X-Cellmail-Message-Id", Raw::new(message.id.to_string()))
        .header("X-Cellmail-Class", Raw::new(message.class.as_str()));
    if !message.to.is_empty() {
        builder = builder.to(address_list(&message.to));
    }
    if !message.cc.is_empty() {
        builder = builder.cc(address_list(&message.cc));
    }
    if !message.reply_to.is_empty() {
        builder = builder.reply_to(address_list(&message.reply_to));
    }
    if !message.idempotency_key.is_empty() {
        builder = builder.header(
            "X-Cellmail-Idempotency-Key",
            Raw::new(message.idempotency_key.as_str()),
        );
    }
    for (name, value) in &message.tags {
        builder = builder.header(format!("X-Cellmail-Tag-{name}"), Raw::new(value.as_str()));
    }
    for (name, value) in &message.headers {
        builder = builder.header(name.as_str(), Raw::new(value.as_str()));
    }
    if !message.text.is_empty() {
        builder = builder.text_body(message.text.as_str());
    }
    if !message.html.is_empty() {
        builder = builder.html_body(message.html.as_str());
    }
    // Writing into a Vec cannot fail.
    builder.write_to_vec().unwrap_or_default()
}

#[cfg(test)]
mod tests {
    use super::*;
    use cellmail_proto::{MessageClass, MessageId, TenantId};

    #[test]
    fn mailbox_text_is_one_line_with_the_name_quoted_or_encoded() {
        let mailbox = |name: Option<&str>| Mailbox {
            name: name.map(Into::into),
            email: "shop@acme.example".into(),
        };
        assert_eq!(mailbox_text(&mailbox(None)), "shop@acme.example");
        assert_eq!(
            mailbox_text(&mailbox(Some("Acme Ltd"))),
            "\"Acme Ltd\" <shop@acme.example>"
        );
        let long = "Ünïcödé Shop With A Name Long Enough To Need Folding On Its Header Line";
        for name in ["Acme, Ltd", long] {
            let text = mailbox_text(&mailbox(Some(name)));
            assert!(!text.contains(['\r', '\n']), "{text:?}");
            let header = format!("From: {text}\r\n\r\n");
            let parsed = mail_parser::MessageParser::default()
                .parse(header.as_bytes())
                .unwrap();
            let from = parsed.from().unwrap().first().unwrap();
            assert_eq!(from.name(), Some(name));
            assert_eq!(from.address(), Some("shop@acme.example"));
        }
    }

    #[test]
    fn rendered_message_parses_back_with_every_header() {
        let mailbox = |name: Option<&str>, email: &str| Mailbox {
            name: name.map(Into::into),
            email: email.into(),
        };
        let message = Message {
            id: MessageId::generate(),
            tenant: TenantId::new("acme").unwrap(),
            class: MessageClass::Marketing,
            idempotency_key: "k-1".into(),
            from: mailbox(Some("Acme Ltd"), "news@acme.example"),
            to: vec![
                mailbox(None, "jane@example.com"),
                mailbox(Some("Jo"), "jo@example.com"),
            ],
            cc: vec![mailbox(None, "cc@example.com")],
            bcc: vec![mailbox(None, "hidden@example.com")],
            reply_to: vec![mailbox(None, "help@acme.example")],
            subject: "Über news".into(),
            text: "plain".into(),
            html: "<p>rich</p>".into(),
            tags: [("campaign".to_owned(), "fall-2026".to_owned())].into(),
            accepted_at_ms: 1_700_000_000_000,
            traceparent: None,
            headers: Vec::new(),
        };
        let raw = render(&message);
        let parsed = mail_parser::MessageParser::default().parse(&raw).unwrap();
        assert_eq!(
            parsed.message_id(),
            Some(format!("{}@acme.example", message.id).as_str())
        );
        assert_eq!(parsed.subject(), Some("Über news"));
        assert_eq!(
            parsed.from().unwrap().first().unwrap().address(),
            Some("news@acme.example")
        );
        assert_eq!(parsed.to().unwrap().iter().count(), 2);
        assert_eq!(
            parsed.cc().unwrap().first().unwrap().address(),
            Some("cc@example.com")
        );
        assert!(parsed.bcc().is_none(), "bcc must not leak into headers");
        assert_eq!(parsed.body_text(0).unwrap().trim(), "plain");
        assert_eq!(parsed.body_html(0).unwrap().trim(), "<p>rich</p>");
        assert_eq!(
            parsed.header_raw("X-Cellmail-Tag-campaign").map(str::trim),
            Some("fall-2026")
        );
        assert_eq!(
            parsed
                .header_raw("X-Cellmail-Idempotency-Key")
                .map(str::trim),
            Some("k-1")
        );
        assert_eq!(parsed.date().unwrap().to_timestamp(), 1_700_000_000);
    }
}
