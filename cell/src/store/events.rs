//! Each tenant's event log: what became of its messages, one normalised event per message
//! (and recipient, where the step is a recipient's), written in the transaction that
//! records the step on the message, so the log and the message records never disagree.
//! Keyed by tenant and when it was written (this cell's clock), so a page resumes where the
//! last one ended and a move copies what was written since its pre-copy.

use std::collections::BTreeMap;

use cellmail_proto::TenantId;
use serde::{Deserialize, Serialize};

use super::{EVENTS, Store, Tables, err, json, parse, past};
use crate::commit::{StorageError, stamp_ms};
use crate::message::{EventKind, MessageEvent, MessageRecord, MessageState};

/// The kinds of events a tenant sees, as its API and webhooks name them.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum EventType {
    Accepted,
    Sent,
    Delivered,
    DeliveryDelayed,
    Bounced,
    Complained,
    Rejected,
    Opened,
    Clicked,
    Unsubscribed,
    Suppressed,
    Held,
    Released,
    Failed,
}

impl EventType {
    pub const ALL: [EventType; 14] = [
        EventType::Accepted,
        EventType::Sent,
        EventType::Delivered,
        EventType::DeliveryDelayed,
        EventType::Bounced,
        EventType::Complained,
        EventType::Rejected,
        EventType::Opened,
        EventType::Clicked,
        EventType::Unsubscribed,
        EventType::Suppressed,
        EventType::Held,
        EventType::Released,
        EventType::Failed,
    ];

    pub fn as_str(self) -> &'static str {
        match self {
            EventType::Accepted => "accepted",
            EventType::Sent => "sent",
            EventType::Delivered => "delivered",
            EventType::DeliveryDelayed => "delivery_delayed",
            EventType::Bounced => "bounced",
            EventType::Complained => "complained",
            EventType::Rejected => "rejected",
            EventType::Opened => "opened",
            EventType::Clicked => "clicked",
            EventType::Unsubscribed => "unsubscribed",
            EventType::Suppressed => "suppressed",
            EventType::Held => "held",
            EventType::Released => "released",
            EventType::Failed => "failed",
        }
    }

    /// The type of a step recorded on a message; `None` for SES's `Send`, which the cell's
    /// own `sent` already tells.
    fn of(kind: EventKind) -> Option<Self> {
        Some(match kind {
            EventKind::Sent => EventType::Sent,
            EventKind::Failed => EventType::Failed,
            EventKind::Held => EventType::Held,
            EventKind::Released => EventType::Released,
            EventKind::Send => return None,
            EventKind::Delivery => EventType::Delivered,
            EventKind::Bounce => EventType::Bounced,
            EventKind::Complaint => EventType::Complained,
            EventKind::Reject => EventType::Rejected,
            EventKind::DeliveryDelay => EventType::DeliveryDelayed,
            EventKind::Open => EventType::Opened,
            EventKind::Click => EventType::Clicked,
            EventKind::Unsubscribe => EventType::Unsubscribed,
        })
    }
}

impl std::str::FromStr for EventType {
    type Err = ();
    fn from_str(s: &str) -> Result<Self, ()> {
        EventType::ALL
            .into_iter()
            .find(|t| t.as_str() == s)
            .ok_or(())
    }
}

/// One event of a tenant's.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct TenantEvent {
    /// Unique and kept when the tenant moves: what a webhook receiver dedups on.
    pub id: String,
    #[serde(rename = "type")]
    pub kind: EventType,
    pub message_id: String,
    /// The recipient the step was about; `None` for a step of the whole message.
    pub recipient: Option<String>,
    pub message_class: String,
    /// The send's tags.
    pub tags: BTreeMap<String, String>,
    /// When it happened (the transport's time for what the transport reported).
    pub at_ms: u64,
    /// What the step says: a bounce's `type/subtype: diagnostic`, a click's URL, the reason
    /// of a suppression or a failure.
    pub detail: String,
}

/// A new event id: a ULID, later than every one this process made before, so that a
/// tenant's events written in one millisecond still list in the order they were made.
fn next_id() -> String {
    static IDS: std::sync::Mutex<ulid::Generator> = std::sync::Mutex::new(ulid::Generator::new());
    // Only `generate` runs under the lock, and it cannot leave the generator half-changed.
    let mut ids = IDS.lock().unwrap_or_else(|p| p.into_inner());
    // Past 2^80 ids in one millisecond the generator refuses: a fresh random one is as unique.
    ids.generate()
        .unwrap_or_else(|_| ulid::Ulid::new())
        .to_string()
}

impl TenantEvent {
    /// An event of `record`'s message: `kind`, for `recipient` (or the whole message), at
    /// `at_ms`, saying `detail`.
    fn new(
        record: &MessageRecord,
        kind: EventType,
        (recipient, at_ms): (Option<&str>, u64),
        detail: &str,
    ) -> Self {
        Self {
            id: next_id(),
            kind,
            message_id: record.id.to_string(),
            recipient: recipient.map(str::to_owned),
            message_class: record.class.to_string(),
            tags: record.tags.clone(),
            at_ms,
            detail: detail.to_owned(),
        }
    }
}

/// Appends `events` to their tenant's log, each written now, and queues them for the
/// tenant's webhook endpoints.
fn append(t: &mut Tables, events: &[TenantEvent], tenant: &TenantId) -> Result<(), StorageError> {
    if events.is_empty() {
        return Ok(());
    }
    let written = stamp_ms();
    for event in events {
        let key = (tenant.as_str(), written, event.id.as_str());
        t.events.insert(key, json(event).as_slice()).map_err(err)?;
    }
    super::webhooks::queue(t, tenant, events, written)
}

/// Logs `steps`, just recorded on `record`.
pub(super) fn log(
    t: &mut Tables,
    record: &MessageRecord,
    steps: &[MessageEvent],
) -> Result<(), StorageError> {
    let events: Vec<TenantEvent> = steps
        .iter()
        .filter_map(|step| {
            let whom = (step.recipient.as_deref(), step.at_ms);
            EventType::of(step.kind).map(|kind| TenantEvent::new(record, kind, whom, &step.detail))
        })
        .collect();
    append(t, &events, &record.tenant)
}

/// Logs a message's acceptance: `accepted` when it was queued, and `suppressed` for each
/// recipient that was suppressed.
pub(super) fn log_accepted(t: &mut Tables, record: &MessageRecord) -> Result<(), StorageError> {
    let at = record.accepted_at_ms;
    let mut events = Vec::new();
    if record.state == MessageState::Queued {
        events.push(TenantEvent::new(
            record,
            EventType::Accepted,
            (None, at),
            "",
        ));
    }
    for recipient in &record.recipients {
        if let Some((reason, scope)) = &recipient.suppressed {
            let reason = format!("{} ({})", reason.as_str(), scope.as_str());
            let whom = (Some(recipient.address.as_str()), at);
            events.push(TenantEvent::new(
                record,
                EventType::Suppressed,
                whom,
                &reason,
            ));
        }
    }
    append(t, &events, &record.tenant)
}

/// Writes events another cell logged for a tenant that moved here, each as it was written
/// there (an event copied twice is written once).
pub(super) fn import(
    t: &mut Tables,
    tenant: &TenantId,
    events: &[(TenantEvent, u64)],
) -> Result<(), StorageError> {
    for (event, written) in events {
        let key = (tenant.as_str(), *written, event.id.as_str());
        t.events.insert(key, json(event).as_slice()).map_err(err)?;
    }
    Ok(())
}

/// Drops every event of `tenant`.
pub(super) fn erase(t: &mut Tables, tenant: &TenantId) -> Result<(), StorageError> {
    let past = past(tenant);
    t.events
        .retain_in((tenant.as_str(), 0, "")..(past.as_str(), 0, ""), |_, _| {
            false
        })
        .map_err(err)?;
    Ok(())
}

/// Which events a listing wants.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct EventFilter {
    /// Empty: every type.
    pub types: Vec<EventType>,
    /// Events that happened in `[from_ms, to_ms]` (`to_ms` 0: up to now).
    pub from_ms: u64,
    pub to_ms: u64,
    pub message_id: Option<String>,
    /// Lowercase.
    pub recipient: Option<String>,
}

impl EventFilter {
    fn wants(&self, event: &TenantEvent) -> bool {
        (self.types.is_empty() || self.types.contains(&event.kind))
            && event.at_ms >= self.from_ms
            && (self.to_ms == 0 || event.at_ms <= self.to_ms)
            && self
                .message_id
                .as_ref()
                .is_none_or(|id| *id == event.message_id)
            && (self.recipient.as_ref()).is_none_or(|r| {
                event
                    .recipient
                    .as_ref()
                    .is_some_and(|e| e.eq_ignore_ascii_case(r))
            })
    }
}

/// Where a listing goes on from: the last event it read.
pub type EventCursor = (u64, String);

/// The most events one page reads (matching or not), so that a narrow filter over a long log
/// answers in bounded time; the next page goes on from there.
const SCAN_PER_PAGE: usize = 10_000;

impl Store {
    /// Up to `limit` of `tenant`'s events `filter` wants, oldest first, after `after` (none:
    /// from the start), and where the next page goes on from (none: the log is read to its
    /// end).
    pub fn events(
        &self,
        tenant: &TenantId,
        filter: &EventFilter,
        after: Option<&EventCursor>,
        limit: usize,
    ) -> Result<(Vec<TenantEvent>, Option<EventCursor>), StorageError> {
        let read = self.read()?;
        let table = read.open_table(EVENTS).map_err(err)?;
        let past = past(tenant);
        // An event is written after it happened: none written before `from_ms` is wanted.
        let start = match after {
            Some((written, id)) => (tenant.as_str(), *written, id.as_str()),
            None => (tenant.as_str(), filter.from_ms, ""),
        };
        let mut found = Vec::new();
        let mut last = None;
        for (scanned, row) in (table.range(start..(past.as_str(), 0, "")).map_err(err)?).enumerate()
        {
            let (key, value) = row.map_err(err)?;
            let (_, written, id) = key.value();
            if after.is_some_and(|(w, i)| (*w, i.as_str()) == (written, id)) {
                continue;
            }
            if scanned >= SCAN_PER_PAGE || found.len() == limit {
                return Ok((found, last));
            }
            let event: TenantEvent = parse(value.value())?;
            last = Some((written, id.to_owned()));
            if filter.wants(&event) {
                found.push(event);
            }
        }
        Ok((found, None))
    }

    /// `tenant`'s events written at or after `since_ms` (0: all), each with when, for a move.
    pub fn written_events(
        &self,
        tenant: &TenantId,
        since_ms: u64,
    ) -> Result<Vec<(TenantEvent, u64)>, StorageError> {
        let read = self.read()?;
        let table = read.open_table(EVENTS).map_err(err)?;
        let past = past(tenant);
        let mut events = Vec::new();
        for row in
            (table.range((tenant.as_str(), since_ms, "")..(past.as_str(), 0, ""))).map_err(err)?
        {
            let (key, value) = row.map_err(err)?;
            events.push((parse(value.value())?, key.value().1));
        }
        Ok(events)
    }
}
