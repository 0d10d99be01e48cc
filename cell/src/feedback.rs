//! Feedback: what the mail transport reports after a send (SES event publishing: Send,
//! Delivery, Bounce, Complaint, Reject, DeliveryDelay, Open, Click), read from the cell's
//! feedback queue as raw records, SNS notifications or EventBridge events.
//!
//! [`parse`] turns one record into a [`Feedback`], attributed to a tenant and a message by
//! the tags cellmail's mailers put on every send. [`Feedback::suppresses`] says which
//! addresses it puts on that tenant's list: a permanent bounce or a complaint, never for
//! another tenant. [`simulated`] builds the same records for the file sink's mailbox
//! simulator, so both paths run through one parser. [`Ingest`] consumes the feedback
//! queue and applies each record to the cell's store. Feedback for a tenant that has moved
//! to another cell since is recorded on its message here (the message lives here) and
//! forwarded to the tenant's current cell, which suppresses, counts and weighs it.

use std::sync::Arc;
use std::time::Duration;

use cellmail_proto::v1::ForwardFeedbackRequest;
use cellmail_proto::{CellId, MessageClass, MessageId, SuppressionReason, TenantId};
use cellmail_registry::catalog::WatchedCatalog;
use cellmail_registry::channels::CellChannels;
use cellmail_registry::schema::PlacementState;
use tokio_util::sync::CancellationToken;

use crate::breaker::Breakers;
use crate::commit::StorageError;
use crate::health::{self, Health};
use crate::queue::{Queue, QueueError, QueueKind};
use crate::store::{Counts, Recorded, Store, Suppressed};
use serde_json::{Value, json};
use time::OffsetDateTime;
use time::format_description::well_known::Rfc3339;

use crate::message::{EventKind, Message, MessageEvent};

/// One feedback record, attributed.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Feedback {
    pub tenant: TenantId,
    /// `None` when the tag is not a cellmail message id: the record still counts for its
    /// tenant (its suppressions), but belongs to no message here.
    pub message_id: Option<MessageId>,
    /// From the `message_class` tag, when it names one.
    pub class: Option<MessageClass>,
    pub kind: EventKind,
    /// For a bounce: whether it was permanent (the address will never accept mail).
    pub permanent: bool,
    pub recipients: Vec<String>,
    pub at_ms: u64,
    pub detail: String,
}

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum FeedbackError {
    #[error("not an SES event record: {0}")]
    Malformed(String),
    /// A record of a send that did not carry cellmail's tags (sent by something else).
    #[error("the record has no cellmail {0} tag")]
    Unattributed(&'static str),
    #[error("event type {0:?} is not one cellmail records")]
    Unsupported(String),
}

impl Feedback {
    /// The addresses this feedback suppresses for its tenant, and why.
    pub fn suppresses(&self) -> Option<SuppressionReason> {
        match self.kind {
            EventKind::Bounce if self.permanent => Some(SuppressionReason::Bounce),
            EventKind::Complaint => Some(SuppressionReason::Complaint),
            _ => None,
        }
    }

    /// One message event per recipient (one without a recipient if there is none).
    pub fn events(&self) -> Vec<MessageEvent> {
        let event = |recipient: Option<&String>| MessageEvent {
            kind: self.kind,
            at_ms: self.at_ms,
            recipient: recipient.cloned(),
            detail: self.detail.clone(),
        };
        if self.recipients.is_empty() {
            vec![event(None)]
        } else {
            self.recipients.iter().map(|r| event(Some(r))).collect()
        }
    }
}

fn malformed(what: impl Into<String>) -> FeedbackError {
    FeedbackError::Malformed(what.into())
}

/// The SES record inside an SNS notification or an EventBridge event, or the record itself.
fn unwrap(value: Value) -> Result<Value, FeedbackError> {
    if value.get("Type").and_then(Value::as_str) == Some("Notification") {
        let inner = value
            .get("Message")
            .and_then(Value::as_str)
            .ok_or_else(|| malformed("SNS notification without Message"))?;
        return serde_json::from_str(inner)
            .map_err(|e| malformed(format!("SNS Message is not JSON: {e}")));
    }
    if value.get("detail-type").is_some() {
        return value
            .get("detail")
            .cloned()
            .ok_or_else(|| malformed("EventBridge event without detail"));
    }
    Ok(value)
}

fn tag<'a>(mail: &'a Value, name: &'static str) -> Result<&'a str, FeedbackError> {
    mail.pointer(&format!("/tags/{name}/0"))
        .and_then(Value::as_str)
        .ok_or(FeedbackError::Unattributed(name))
}

fn addresses(list: Option<&Value>, field: Option<&str>) -> Vec<String> {
    let items = list
        .and_then(Value::as_array)
        .map(Vec::as_slice)
        .unwrap_or_default();
    items
        .iter()
        .filter_map(|item| match field {
            Some(field) => item.get(field).and_then(Value::as_str),
            None => item.as_str(),
        })
        .map(str::to_owned)
        .collect()
}

fn millis(timestamp: Option<&Value>) -> Option<u64> {
    let parsed = OffsetDateTime::parse(timestamp?.as_str()?, &Rfc3339).ok()?;
    u64::try_from(parsed.unix_timestamp_nanos() / 1_000_000).ok()
}

fn text(value: &Value, pointer: &str) -> String {
    value
        .pointer(pointer)
        .and_then(Value::as_str)
        .unwrap_or_default()
        .to_owned()
}

pub fn parse(body: &[u8]) -> Result<Feedback, FeedbackError> {
    let value: Value = serde_json::from_slice(body).map_err(|e| malformed(e.to_string()))?;
    let record = unwrap(value)?;
    let event_type = record
        .get("eventType")
        .and_then(Value::as_str)
        .ok_or_else(|| malformed("no eventType"))?;
    let mail = record
        .get("mail")
        .ok_or_else(|| malformed("no mail object"))?;
    let tenant = TenantId::new(tag(mail, "tenant_id")?).map_err(|e| malformed(e.to_string()))?;
    let message_id = tag(mail, "message_id")?.parse::<MessageId>().ok();
    let class = match mail
        .pointer("/tags/message_class/0")
        .and_then(Value::as_str)
    {
        Some("transactional") => Some(MessageClass::Transactional),
        Some("marketing") => Some(MessageClass::Marketing),
        _ => None,
    };
    let destination = || addresses(mail.get("destination"), None);
    let (kind, object, recipients, detail) = match event_type {
        "Send" => (EventKind::Send, "send", destination(), String::new()),
        "Delivery" => {
            let delivery = record.get("delivery");
            (
                EventKind::Delivery,
                "delivery",
                addresses(delivery.and_then(|d| d.get("recipients")), None),
                text(&record, "/delivery/smtpResponse"),
            )
        }
        "Bounce" => {
            let bounced = record.pointer("/bounce/bouncedRecipients");
            let detail = format!(
                "{}/{}: {}",
                text(&record, "/bounce/bounceType"),
                text(&record, "/bounce/bounceSubType"),
                text(&record, "/bounce/bouncedRecipients/0/diagnosticCode")
            );
            (
                EventKind::Bounce,
                "bounce",
                addresses(bounced, Some("emailAddress")),
                detail,
            )
        }
        "Complaint" => {
            let complained = record.pointer("/complaint/complainedRecipients");
            (
                EventKind::Complaint,
                "complaint",
                addresses(complained, Some("emailAddress")),
                text(&record, "/complaint/complaintFeedbackType"),
            )
        }
        "Reject" => (
            EventKind::Reject,
            "reject",
            destination(),
            text(&record, "/reject/reason"),
        ),
        "DeliveryDelay" => {
            let delayed = record.pointer("/deliveryDelay/delayedRecipients");
            (
                EventKind::DeliveryDelay,
                "deliveryDelay",
                addresses(delayed, Some("emailAddress")),
                text(&record, "/deliveryDelay/delayType"),
            )
        }
        "Open" => (
            EventKind::Open,
            "open",
            destination(),
            text(&record, "/open/userAgent"),
        ),
        "Click" => (
            EventKind::Click,
            "click",
            destination(),
            text(&record, "/click/link"),
        ),
        other => return Err(FeedbackError::Unsupported(other.to_owned())),
    };
    let at_ms = millis(record.pointer(&format!("/{object}/timestamp")))
        .or_else(|| millis(mail.get("timestamp")))
        .unwrap_or(0);
    let permanent = kind == EventKind::Bounce && text(&record, "/bounce/bounceType") == "Permanent";
    Ok(Feedback {
        tenant,
        message_id,
        class,
        kind,
        permanent,
        recipients,
        at_ms,
        detail,
    })
}

/// Where a feedback record is applied.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Route {
    /// This cell serves the tenant (or knows of no placement for it).
    Here,
    /// The tenant moved to this cell (and endpoint).
    To(CellId, String),
    /// A move froze the tenant's placement.
    Frozen,
}

/// Applies the cell's feedback queue to its store.
pub struct Ingest {
    cell: CellId,
    store: Arc<Store>,
    queue: Arc<dyn Queue>,
    breakers: Arc<Breakers>,
    catalog: Arc<WatchedCatalog>,
    channels: CellChannels,
    health: Arc<Health>,
}

const BATCH: usize = 10;
const VISIBILITY: Duration = Duration::from_secs(60);
const WAIT: Duration = Duration::from_secs(1);

impl Ingest {
    pub fn new(
        cell: CellId,
        store: Arc<Store>,
        queue: Arc<dyn Queue>,
        breakers: Arc<Breakers>,
        catalog: Arc<WatchedCatalog>,
        health: Arc<Health>,
        channels: CellChannels,
    ) -> Self {
        Self {
            cell,
            store,
            queue,
            breakers,
            catalog,
            channels,
            health,
        }
    }

    pub async fn run(self: Arc<Self>, shutdown: CancellationToken) {
        while !shutdown.is_cancelled() {
            let received = tokio::select! {
                () = shutdown.cancelled() => return,
                received = self.queue.receive(QueueKind::Feedback, BATCH, VISIBILITY, WAIT) => received,
            };
            if let Err(err) = self.ingest(received).await {
                tracing::warn!(%err, "ingesting feedback failed; it will be retried");
                tokio::time::sleep(Duration::from_millis(500)).await;
            }
        }
    }

    async fn ingest(
        &self,
        received: Result<Vec<crate::queue::Delivery>, QueueError>,
    ) -> Result<(), anyhow::Error> {
        let mut done = Vec::new();
        for delivery in received? {
            match parse(&delivery.body) {
                Ok(feedback) => match self.route(&feedback.tenant) {
                    Route::Here => self.apply(&feedback).await?,
                    Route::To(cell, endpoint) => {
                        if let Err(err) = self
                            .forward(&feedback, &delivery.body, &cell, &endpoint)
                            .await
                        {
                            // Left on the queue: it comes back after its visibility timeout.
                            tracing::warn!(%err, tenant = %feedback.tenant, %cell, "forwarding feedback failed; it will be retried");
                            continue;
                        }
                    }
                    // Applied now, it could miss the copy the move is making: it waits.
                    Route::Frozen => continue,
                },
                // Records of other senders or event types are not ours to keep.
                Err(err @ (FeedbackError::Unattributed(_) | FeedbackError::Unsupported(_))) => {
                    tracing::debug!(%err, "feedback record skipped")
                }
                Err(err) => tracing::warn!(%err, "unreadable feedback record dropped"),
            }
            done.push(delivery.receipt);
        }
        self.queue.delete(QueueKind::Feedback, &done).await?;
        Ok(())
    }

    /// Where feedback for `tenant` goes now.
    pub fn route(&self, tenant: &TenantId) -> Route {
        let catalog = self.catalog.read();
        let Some(placement) = catalog.placements.get(tenant) else {
            return Route::Here;
        };
        if placement.state == PlacementState::Frozen {
            return Route::Frozen;
        }
        match catalog.cells.get(&placement.cell) {
            Some(cell) if placement.cell != self.cell => {
                Route::To(placement.cell.clone(), cell.endpoint.to_string())
            }
            _ => Route::Here,
        }
    }

    /// Records `feedback`'s events on its message here and hands the record to `cell`.
    async fn forward(
        &self,
        feedback: &Feedback,
        record: &[u8],
        cell: &CellId,
        endpoint: &str,
    ) -> anyhow::Result<()> {
        self.store
            .note_forwarded(&feedback.tenant, feedback.message_id, feedback.events())
            .await?;
        let request = ForwardFeedbackRequest {
            record: record.to_vec(),
        };
        self.channels
            .client(cell, endpoint)?
            .forward_feedback(request)
            .await?;
        tracing::info!(tenant = %feedback.tenant, %cell, "feedback forwarded to the tenant's current cell");
        Ok(())
    }

    /// Suppresses what the feedback says to, for its tenant only, counts it in the tenant's
    /// figures, records its events on the tenant's message, and weighs the tenant's breaker.
    pub async fn apply(&self, feedback: &Feedback) -> Result<(), StorageError> {
        let recipients = feedback.recipients.len() as u64;
        let delta = match feedback.kind {
            EventKind::Delivery => Counts {
                delivered: recipients,
                ..Counts::default()
            },
            EventKind::Bounce if feedback.permanent => Counts {
                bounced: recipients,
                ..Counts::default()
            },
            EventKind::Complaint => Counts {
                complained: recipients,
                ..Counts::default()
            },
            EventKind::Reject => Counts {
                rejected: 1,
                ..Counts::default()
            },
            _ => Counts::default(),
        };
        // Suppressions first: setting one again is harmless, so a record delivered again
        // after a crash here still suppresses.
        if let Some(reason) = feedback.suppresses() {
            for address in &feedback.recipients {
                let entry = Suppressed {
                    address: address.clone(),
                    reason,
                    at_ms: feedback.at_ms,
                    message_id: feedback.message_id,
                };
                self.store.suppress(&feedback.tenant, entry).await?;
                tracing::info!(tenant = %feedback.tenant, %address, reason = reason.as_str(), "address suppressed by feedback");
            }
        }
        let counts = feedback
            .class
            .filter(|_| delta != Counts::default())
            .map(|class| (class, feedback.at_ms, delta));
        let recorded = self
            .store
            .record_feedback(
                &feedback.tenant,
                feedback.message_id,
                feedback.events(),
                counts,
            )
            .await?;
        match (recorded, feedback.message_id) {
            (Recorded::Duplicate, _) => {
                tracing::debug!(tenant = %feedback.tenant, "feedback delivered again: recorded and counted before");
                return Ok(());
            }
            (Recorded::NoMessage, Some(id)) => {
                tracing::debug!(tenant = %feedback.tenant, message_id = %id, "feedback for a message this cell does not hold");
            }
            _ => {}
        }
        if delta.bounced > 0 {
            self.health.record(health::Outcome::Bounced);
        } else if delta.complained > 0 {
            self.health.record(health::Outcome::Complained);
        }
        if let Some((class, ..)) = counts
            && delta.bounced + delta.complained > 0
            && let Err(err) = self.breakers.evaluate(&feedback.tenant, class).await
        {
            // The next bounce or complaint weighs it again.
            tracing::warn!(%err, tenant = %feedback.tenant, %class, "weighing the breaker failed");
        }
        Ok(())
    }
}

/// SES's mailbox simulator: `bounce@`, `complaint@` and `success@simulator.amazonses.com`,
/// with an optional `+label` before the `@`.
const SIMULATOR_DOMAIN: &str = "simulator.amazonses.com";

/// The feedback records SES would publish for `message`'s simulator recipients, at `now_ms`.
pub fn simulated(message: &Message, now_ms: u64) -> Vec<Vec<u8>> {
    let timestamp = OffsetDateTime::from_unix_timestamp_nanos(i128::from(now_ms) * 1_000_000)
        .ok()
        .and_then(|t| t.format(&Rfc3339).ok())
        .unwrap_or_default();
    let class = match message.class {
        MessageClass::Transactional => "transactional",
        MessageClass::Marketing => "marketing",
    };
    let mail = json!({
        "timestamp": timestamp,
        "source": message.from.email,
        "messageId": format!("simulated-{}", message.id),
        "destination": message.recipients().map(|m| m.email.clone()).collect::<Vec<_>>(),
        "tags": { "tenant_id": [message.tenant.as_str()], "message_class": [class], "message_id": [message.id.to_string()] },
    });
    message
        .recipients()
        .filter_map(|recipient| {
            let (local, domain) = recipient.email.rsplit_once('@')?;
            if !domain.eq_ignore_ascii_case(SIMULATOR_DOMAIN) {
                return None;
            }
            let mailbox = local.split_once('+').map_or(local, |(mailbox, _)| mailbox).to_ascii_lowercase();
            let address = recipient.email.clone();
            let record = match mailbox.as_str() {
                "bounce" => json!({
                    "eventType": "Bounce",
                    "bounce": {
                        "bounceType": "Permanent", "bounceSubType": "General", "timestamp": timestamp,
                        "bouncedRecipients": [{ "emailAddress": address, "action": "failed", "status": "5.1.1",
                            "diagnosticCode": "smtp; 550 5.1.1 user unknown (mailbox simulator)" }],
                    },
                    "mail": mail,
                }),
                "complaint" => json!({
                    "eventType": "Complaint",
                    "complaint": { "complainedRecipients": [{ "emailAddress": address }], "timestamp": timestamp,
                        "complaintFeedbackType": "abuse" },
                    "mail": mail,
                }),
                "success" => json!({
                    "eventType": "Delivery",
                    "delivery": { "recipients": [address], "timestamp": timestamp, "smtpResponse": "250 2.6.0 Message received (mailbox simulator)" },
                    "mail": mail,
                }),
                _ => return None,
            };
            serde_json::to_vec(&record).ok()
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn fixture(name: &str) -> Feedback {
        let path = format!(
            "{}/../tests/fixtures/ses-events/{name}.json",
            env!("CARGO_MANIFEST_DIR")
        );
        parse(&std::fs::read(&path).unwrap()).unwrap_or_else(|e| panic!("{name}: {e}"))
    }

    #[test]
    fn every_documented_event_type_parses_and_is_attributed_by_tags() {
        let cases = [
            ("send", EventKind::Send),
            ("delivery", EventKind::Delivery),
            ("bounce-permanent", EventKind::Bounce),
            ("bounce-transient", EventKind::Bounce),
            ("complaint", EventKind::Complaint),
            ("reject", EventKind::Reject),
            ("delivery-delay", EventKind::DeliveryDelay),
            ("open", EventKind::Open),
            ("click", EventKind::Click),
            ("sns-wrapped-bounce", EventKind::Bounce),
            ("eventbridge-wrapped-complaint", EventKind::Complaint),
        ];
        for (name, kind) in cases {
            let feedback = fixture(name);
            assert_eq!(feedback.kind, kind, "{name}");
            assert_eq!(feedback.tenant.as_str(), "acme", "{name}");
            assert!(
                feedback.at_ms > 1_700_000_000_000,
                "{name} has its timestamp"
            );
        }
    }

    #[test]
    fn permanent_bounces_and_complaints_suppress_and_nothing_else_does() {
        let bounce = fixture("bounce-permanent");
        assert!(bounce.permanent);
        assert_eq!(bounce.suppresses(), Some(SuppressionReason::Bounce));
        assert_eq!(bounce.recipients, ["gone@dest.example"]);
        assert!(bounce.detail.contains("550 5.1.1"), "{}", bounce.detail);
        assert_eq!(
            fixture("sns-wrapped-bounce"),
            bounce,
            "SNS wrapping changes nothing"
        );
        assert_eq!(fixture("bounce-transient").suppresses(), None);
        let complaint = fixture("eventbridge-wrapped-complaint");
        assert_eq!(complaint.suppresses(), Some(SuppressionReason::Complaint));
        assert_eq!(complaint.recipients, ["angry@dest.example"]);
        for name in [
            "send",
            "delivery",
            "reject",
            "delivery-delay",
            "open",
            "click",
        ] {
            assert_eq!(fixture(name).suppresses(), None, "{name}");
        }
    }

    #[test]
    fn records_without_cellmail_tags_or_of_other_types_are_refused() {
        let untagged = br#"{"eventType":"Bounce","bounce":{},"mail":{"tags":{}}}"#;
        assert_eq!(
            parse(untagged),
            Err(FeedbackError::Unattributed("tenant_id"))
        );
        let other = br#"{"eventType":"Subscription","mail":{"tags":{"tenant_id":["a"],"message_id":["01JDEXAMPLE0000000000000001"]}}}"#;
        assert_eq!(
            parse(other),
            Err(FeedbackError::Unsupported("Subscription".into()))
        );
        assert!(matches!(
            parse(b"not json"),
            Err(FeedbackError::Malformed(_))
        ));
    }

    #[test]
    fn the_simulator_speaks_the_same_format_and_keeps_labels_distinct() {
        use crate::message::sample::{self, mailbox};
        let mut message = sample::message();
        message.class = MessageClass::Marketing;
        message.to = vec![
            mailbox("bounce+one@simulator.amazonses.com"),
            mailbox("jane@example.com"),
        ];
        message.cc = vec![mailbox("complaint@simulator.amazonses.com")];
        message.bcc = vec![mailbox("success+x@simulator.amazonses.com")];
        let records: Vec<Feedback> = simulated(&message, 1_764_000_000_000)
            .iter()
            .map(|r| parse(r).unwrap())
            .collect();
        let kinds: Vec<_> = records
            .iter()
            .map(|f| (f.kind, f.recipients[0].as_str(), f.suppresses()))
            .collect();
        assert_eq!(
            kinds,
            [
                (
                    EventKind::Bounce,
                    "bounce+one@simulator.amazonses.com",
                    Some(SuppressionReason::Bounce)
                ),
                (
                    EventKind::Complaint,
                    "complaint@simulator.amazonses.com",
                    Some(SuppressionReason::Complaint)
                ),
                (
                    EventKind::Delivery,
                    "success+x@simulator.amazonses.com",
                    None
                ),
            ]
        );
        assert!(records.iter().all(|f| f.message_id == Some(message.id)
            && f.tenant == message.tenant
            && f.at_ms == 1_764_000_000_000));
    }
}
