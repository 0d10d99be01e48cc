//! Each message's record (state, recipients, events; it also stops a redelivered message
//! from being sent twice), indexed by tenant and, while it is queued or held, as the tenant's
//! backlog; and the queued form of a message too large for its queue.

use cellmail_proto::{MessageClass, MessageId, TenantId};
use redb::{ReadableTable, ReadableTableMetadata, WriteTransaction};

use super::events;
use super::figures::{self, Counts};
use super::idempotency::{self, Reservation};
use super::queue::{self, QueueWrite, Staged};
use super::{
    BODIES, MESSAGES, OPEN, Store, TENANT_MESSAGES, Tables, Write, Written, err, json, parse, past,
    written_now,
};
use crate::commit::{Commit, StorageError};
use crate::message::{Accepted, EventKind, MessageEvent, MessageRecord, MessageState};

/// What recording a feedback record did.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Recorded {
    /// Its events were added to the tenant's message, its counts counted.
    New,
    /// The message already had every one of its events: counted before, not again.
    Duplicate,
    /// No message of the tenant here to record on (counted: nothing to tell a redelivery by).
    NoMessage,
}

/// The event a cell records for its own step.
pub fn event(kind: EventKind, at_ms: u64, detail: impl Into<String>) -> MessageEvent {
    MessageEvent {
        kind,
        at_ms,
        recipient: None,
        detail: detail.into(),
    }
}

/// Moves message `id` from state `from` to `to` with `event`; a message in another state (or
/// none) is left as it is.
pub(super) fn restate(
    t: &mut Tables,
    id: &str,
    from: MessageState,
    to: MessageState,
    event: &MessageEvent,
) -> Result<(), StorageError> {
    let messages = &mut t.messages;
    let found: Option<MessageRecord> = match messages.get(id).map_err(err)? {
        Some(row) => Some(parse(row.value())?),
        None => None,
    };
    if let Some(mut record) = found.filter(|r| r.state == from) {
        record.state = to;
        record.events.push(event.clone());
        messages.insert(id, json(&record).as_slice()).map_err(err)?;
        written_now(&mut t.recent_messages, &record.tenant, id)?;
        events::log(t, &record, std::slice::from_ref(event))?;
    }
    Ok(())
}

/// Opens (and clicks) a message record keeps, each; more are only logged and counted.
const ENGAGEMENT_KEPT: usize = 20;

/// Adds those of `events` that `tenant`'s message `id` does not have yet to it (and, with
/// `log`, to the tenant's event log).
fn add_events(
    t: &mut Tables,
    tenant: &TenantId,
    id: MessageId,
    events: Vec<MessageEvent>,
    log: bool,
) -> Result<Recorded, StorageError> {
    let id = id.to_string();
    let found: Option<MessageRecord> = match t.messages.get(id.as_str()).map_err(err)? {
        Some(row) => Some(parse(row.value())?),
        None => None,
    };
    let Some(mut record) = found.filter(|r| r.tenant == *tenant) else {
        return Ok(Recorded::NoMessage);
    };
    let new: Vec<MessageEvent> = events
        .into_iter()
        .filter(|event| !record.events.contains(event))
        .collect();
    if new.is_empty() {
        return Ok(Recorded::Duplicate);
    }
    // Opens and clicks repeat without end (a recipient's every look, a link scanner): the
    // record keeps the first ones, the log and the figures every one.
    let mut kept = false;
    for event in &new {
        let repeats = (record.events.iter())
            .filter(|e| e.kind == event.kind)
            .count();
        if !matches!(event.kind, EventKind::Open | EventKind::Click) || repeats < ENGAGEMENT_KEPT {
            record.events.push(event.clone());
            kept = true;
        }
    }
    if kept {
        t.messages
            .insert(id.as_str(), json(&record).as_slice())
            .map_err(err)?;
        written_now(&mut t.recent_messages, tenant, &id)?;
    }
    if log {
        events::log(t, &record, &new)?;
    }
    Ok(Recorded::New)
}

/// Builds the message indexes (by tenant, and of the open ones) over the records a store
/// made before it kept them, once: a store that has the by-tenant table already is indexed.
pub(super) fn index_messages(txn: &WriteTransaction) -> Result<(), StorageError> {
    let mut index = txn.open_table(TENANT_MESSAGES).map_err(err)?;
    let messages = txn.open_table(MESSAGES).map_err(err)?;
    if !index.is_empty().map_err(err)? || messages.is_empty().map_err(err)? {
        return Ok(());
    }
    let mut open = txn.open_table(OPEN).map_err(err)?;
    for row in messages.iter().map_err(err)? {
        let (id, value) = row.map_err(err)?;
        let record: MessageRecord = parse(value.value())?;
        let key = (record.tenant.as_str(), id.value());
        index.insert(key, ()).map_err(err)?;
        if matches!(record.state, MessageState::Queued | MessageState::Held) {
            open.insert(key, ()).map_err(err)?;
        }
    }
    Ok(())
}

/// Records an accepted message: completes its key (unless another send holds it, then
/// nothing is written), counts it, writes its record, and queues it when it is `queued`.
pub(super) fn accepted(
    t: &mut Tables,
    key: Option<&str>,
    accepted: Accepted,
    record: MessageRecord,
    queued: Option<Staged>,
    now_ms: u64,
) -> Result<Reservation, StorageError> {
    if let Some(key) = key
        && let Some(holder) = idempotency::complete(t, &record.tenant, key, accepted, now_ms)?
    {
        return Ok(holder);
    }
    let suppressed = record
        .recipients
        .iter()
        .filter(|r| r.suppressed.is_some())
        .count() as u64;
    let accepted = u64::from(record.state == MessageState::Queued);
    let delta = Counts {
        accepted,
        suppressed,
        ..Counts::default()
    };
    figures::count(
        t,
        &record.tenant,
        record.class,
        record.accepted_at_ms,
        &delta,
    )?;
    let messages = &mut t.messages;
    let id = record.id.to_string();
    // A worker may already have recorded the send; keep its record.
    if messages.get(id.as_str()).map_err(err)?.is_none() {
        messages
            .insert(id.as_str(), json(&record).as_slice())
            .map_err(err)?;
        t.tenant_messages
            .insert((record.tenant.as_str(), id.as_str()), ())
            .map_err(err)?;
        if record.state == MessageState::Queued {
            t.open
                .insert((record.tenant.as_str(), id.as_str()), ())
                .map_err(err)?;
        }
    }
    // Logged here even when a worker recorded the send first (a queue elsewhere hands the
    // message over before this is written): a retry of the accept returns above.
    events::log_accepted(t, &record)?;
    if let Some(staged) = queued {
        queue::apply(&mut t.queued, QueueWrite::Insert(staged))?;
    }
    Ok(Reservation::New)
}

/// Records what became of a message: its new `state` and `event` (on `seed` if its record
/// was lost), counted in its tenant's figures; a sent or failed one leaves the backlog.
pub(super) fn outcome(
    t: &mut Tables,
    seed: MessageRecord,
    state: MessageState,
    event: MessageEvent,
) -> Result<(), StorageError> {
    let id = seed.id.to_string();
    let mut record: MessageRecord = match t.messages.get(id.as_str()).map_err(err)? {
        Some(row) => parse(row.value())?,
        None => {
            t.tenant_messages
                .insert((seed.tenant.as_str(), id.as_str()), ())
                .map_err(err)?;
            seed
        }
    };
    let delta = match state {
        MessageState::Sent => Counts {
            sent: record
                .recipients
                .iter()
                .filter(|r| r.suppressed.is_none())
                .count() as u64,
            ..Counts::default()
        },
        MessageState::Failed => Counts {
            rejected: 1,
            ..Counts::default()
        },
        MessageState::Queued | MessageState::Suppressed | MessageState::Held => Counts::default(),
    };
    figures::count(t, &record.tenant, record.class, event.at_ms, &delta)?;
    if matches!(state, MessageState::Sent | MessageState::Failed) {
        t.open
            .remove((record.tenant.as_str(), id.as_str()))
            .map_err(err)?;
    }
    record.state = state;
    record.events.push(event.clone());
    t.messages
        .insert(id.as_str(), json(&record).as_slice())
        .map_err(err)?;
    written_now(&mut t.recent_messages, &record.tenant, &id)?;
    events::log(t, &record, &[event])
}

/// Adds a feedback record's events to `tenant`'s message and counts its `counts`, unless
/// the message already had every one of the events.
pub(super) fn feedback(
    t: &mut Tables,
    tenant: &TenantId,
    message_id: Option<MessageId>,
    events: Vec<MessageEvent>,
    counts: Option<(MessageClass, u64, Counts)>,
    log: bool,
) -> Result<Recorded, StorageError> {
    let recorded = match message_id {
        Some(id) => add_events(t, tenant, id, events, log)?,
        None => Recorded::NoMessage,
    };
    if recorded != Recorded::Duplicate
        && let Some((class, at_ms, delta)) = counts
    {
        figures::count(t, tenant, class, at_ms, &delta)?;
    }
    Ok(recorded)
}

pub(super) fn put_body(
    t: &mut Tables,
    message_id: MessageId,
    body: &[u8],
) -> Result<(), StorageError> {
    t.bodies
        .insert(message_id.to_string().as_str(), body)
        .map_err(err)?;
    Ok(())
}

/// Whether there was a body to drop.
pub(super) fn drop_body(t: &mut Tables, message_id: MessageId) -> Result<bool, StorageError> {
    let removed = t
        .bodies
        .remove(message_id.to_string().as_str())
        .map_err(err)?;
    Ok(removed.is_some())
}

impl Store {
    /// Records an accepted message and, when it has one, the answer given for its key, in
    /// one commit with `queued`, the message itself when the queue is the embedded one
    /// (fsynced: the accept is durable, all of it or none of it). Without `queued` the
    /// message was sent to its queue first and this is not fsynced on its own: if a crash
    /// loses it, the key is found pending, the retry queues the same message id again, and
    /// the worker's record check sends it once. Writes nothing and answers what holds the key
    /// when another send does (its answer, or the id it reserved), [`Reservation::New`]
    /// otherwise.
    pub async fn accepted(
        &self,
        key: Option<&str>,
        accepted: Accepted,
        record: MessageRecord,
        queued: Option<Staged>,
        now_ms: u64,
    ) -> Result<Reservation, StorageError> {
        let commit = if queued.is_some() {
            Commit::Durable
        } else {
            Commit::Lazy
        };
        let write = Write::Accepted {
            key: key.map(str::to_owned),
            accepted,
            record,
            queued,
            now_ms,
        };
        self.reservation(write, commit).await
    }

    /// Durably records what became of a message (`seed` stands in if its record was lost).
    pub async fn record_outcome(
        &self,
        seed: MessageRecord,
        state: MessageState,
        event: MessageEvent,
    ) -> Result<(), StorageError> {
        self.found(Write::Outcome { seed, state, event }, Commit::Durable)
            .await
            .map(|_| ())
    }

    /// Records one feedback record of `tenant` in one commit: its events on the tenant's
    /// message `message_id`, and `counts` (class, time, delta) in the tenant's figures,
    /// unless the message already has every one of the events (the record was delivered
    /// again: queues deliver at least once), so that a redelivery is never counted twice.
    pub async fn record_feedback(
        &self,
        tenant: &TenantId,
        message_id: Option<MessageId>,
        events: Vec<MessageEvent>,
        counts: Option<(MessageClass, u64, Counts)>,
    ) -> Result<Recorded, StorageError> {
        let write = Write::Feedback {
            tenant: tenant.clone(),
            message_id,
            events,
            counts,
            log: true,
        };
        match self.writes.submit(write, Commit::Durable).await? {
            Written::Feedback(recorded) => Ok(recorded),
            _ => Err(StorageError(
                "a feedback write answered like another".into(),
            )),
        }
    }

    /// Records feedback's events on `tenant`'s message here only, as this cell forwards it
    /// to the cell that serves the tenant now, which counts them and logs them.
    pub async fn note_forwarded(
        &self,
        tenant: &TenantId,
        message_id: Option<MessageId>,
        events: Vec<MessageEvent>,
    ) -> Result<(), StorageError> {
        let write = Write::Feedback {
            tenant: tenant.clone(),
            message_id,
            events,
            counts: None,
            log: false,
        };
        self.writes.submit(write, Commit::Durable).await.map(|_| ())
    }

    /// `tenant`'s message `id`; `None` when it does not exist or is another tenant's.
    pub fn message(
        &self,
        tenant: &TenantId,
        id: MessageId,
    ) -> Result<Option<MessageRecord>, StorageError> {
        let read = self.read()?;
        let table = read.open_table(MESSAGES).map_err(err)?;
        let Some(row) = table.get(id.to_string().as_str()).map_err(err)? else {
            return Ok(None);
        };
        let record: MessageRecord = parse(row.value())?;
        Ok((record.tenant == *tenant).then_some(record))
    }

    /// Whether message `id` was already sent or failed for good (whoever's it is).
    pub fn settled(&self, id: MessageId) -> Result<bool, StorageError> {
        let read = self.read()?;
        let table = read.open_table(MESSAGES).map_err(err)?;
        let Some(row) = table.get(id.to_string().as_str()).map_err(err)? else {
            return Ok(false);
        };
        let record: MessageRecord = parse(row.value())?;
        Ok(matches!(
            record.state,
            MessageState::Sent | MessageState::Failed
        ))
    }

    /// How many of `tenant`'s messages are queued or held here, not yet sent or failed.
    pub fn backlog(&self, tenant: &TenantId) -> Result<u64, StorageError> {
        let read = self.read()?;
        let table = read.open_table(OPEN).map_err(err)?;
        let past = past(tenant);
        let rows = table
            .range((tenant.as_str(), "")..(past.as_str(), ""))
            .map_err(err)?;
        Ok(rows.count() as u64)
    }

    /// Durably keeps the queued form of a message too large for its queue.
    pub async fn put_body(&self, message_id: MessageId, body: Vec<u8>) -> Result<(), StorageError> {
        self.found(Write::PutBody { message_id, body }, Commit::Durable)
            .await
            .map(|_| ())
    }

    pub fn body(&self, message_id: MessageId) -> Result<Option<Vec<u8>>, StorageError> {
        let read = self.read()?;
        let table = read.open_table(BODIES).map_err(err)?;
        Ok(table
            .get(message_id.to_string().as_str())
            .map_err(err)?
            .map(|v| v.value().to_vec()))
    }

    /// Forgets a stored body once its message is settled (lazily: a crash only leaves it).
    pub async fn drop_body(&self, message_id: MessageId) -> Result<(), StorageError> {
        self.found(Write::DropBody { message_id }, Commit::Lazy)
            .await
            .map(|_| ())
    }
}
