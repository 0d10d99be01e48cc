//! The cell's own durable state, kept on the cell's volume whatever its queue and mailer:
//! the idempotency window (tenant + key -> the first answer), each message's record (state,
//! recipients, events; it also stops a redelivered message from being sent twice) and each
//! tenant's suppression list, its figures (by hour for stats, by minute for its breakers)
//! and the mail parked outside the queue: a tenant's overflow beyond its lane, retries of
//! parked mail, and the mail held while a breaker pauses its class.
//!
//! The embedded queue keeps its messages in a table of this file: an accept then commits the
//! message's record, the answer for its idempotency key and the queued message at once, all
//! of it or none. With a queue elsewhere (SQS) a key is reserved durably *before* its message
//! is queued, and completed after. A crash between the two leaves a pending reservation; the
//! retry re-queues the same message id, and the worker's record check keeps that from
//! becoming a second send.
//!
//! A tenant's backlog (its messages queued or held here, not yet sent or failed) is indexed
//! by tenant, so a cell a tenant moved away from can say when it has delivered everything it
//! accepted. [`Store::export`] and [`Store::import`] carry a tenant's suppression list and
//! idempotency window to the cell it moves to; the keys are also indexed by when they were
//! written, so the copy made while the tenant is frozen holds only what changed since a
//! pre-copy and the freeze does not grow with the window. [`Store::figures`] and
//! [`Store::carry`] carry its figures: the target keeps each other cell's part apart from its
//! own, replaced by every later copy, so reads add them up and nothing counts twice.
//!
//! Every read and write takes the tenant, and a message record answers only its own tenant,
//! so one tenant's id or address never reaches another's data.

use std::path::Path;
use std::sync::Arc;
use std::time::Duration;

use cellmail_proto::clock::{HOUR_MS, MINUTE_MS};
use cellmail_proto::{
    Epoch, MessageClass, MessageId, SuppressionReason, TenantId, now_ms, suppression_key,
};
use redb::{
    Database, ReadTransaction, ReadableDatabase, ReadableTable, ReadableTableMetadata,
    TableDefinition, WriteTransaction,
};
use serde::{Deserialize, Serialize, de::DeserializeOwned};

mod queue;

pub(crate) use queue::QueueWrite;
use queue::{QUEUED, Queued};
pub use queue::{Slot, Staged};

use crate::commit::{Commit, GroupCommit, StorageError, stamp_ms};
use crate::message::{Accepted, EventKind, MessageEvent, MessageRecord, MessageState};

/// (tenant, idempotency key) -> JSON [`KeyRecord`]
const IDEMPOTENCY: TableDefinition<(&str, &str), &[u8]> = TableDefinition::new("idempotency");
/// message id -> JSON [`MessageRecord`]
const MESSAGES: TableDefinition<&str, &[u8]> = TableDefinition::new("messages");
/// (tenant, suppression key) -> JSON [`Suppressed`]
const SUPPRESSIONS: TableDefinition<(&str, &str), &[u8]> = TableDefinition::new("suppressions");
/// message id -> the queued form of a message too large for the queue
const BODIES: TableDefinition<&str, &[u8]> = TableDefinition::new("bodies");
/// (tenant, class, hour since the epoch) -> JSON [`Counts`]
const STATS: TableDefinition<(&str, &str, u64), &[u8]> = TableDefinition::new("stats");
/// (tenant, class, minute since the epoch) -> JSON [`Counts`] of sent, bounced, complained
const WINDOW: TableDefinition<(&str, &str, u64), &[u8]> = TableDefinition::new("window");
/// (tenant, class, message id) -> [`Parked`] header (not before, attempts) + queued form
const PARKED: TableDefinition<(&str, &str, &str), &[u8]> = TableDefinition::new("parked");
/// (tenant, message id) of every message queued or held here and not yet sent or failed
const OPEN: TableDefinition<(&str, &str), ()> = TableDefinition::new("open");
/// (tenant, message id) of every message record here
const TENANT_MESSAGES: TableDefinition<(&str, &str), ()> = TableDefinition::new("tenant_messages");
/// (tenant, when, idempotency key) of every write of a key within the window, so that a
/// move's final copy reads only the keys written since its pre-copy
const RECENT: TableDefinition<(&str, u64, &str), ()> = TableDefinition::new("recent_keys");
/// (tenant, when, suppression key) of every write of a suppression (added or removed)
/// within the idempotency window, for the same copy
const RECENT_SUPPRESSIONS: TableDefinition<(&str, u64, &str), ()> =
    TableDefinition::new("recent_suppressions");
/// (tenant, when, message id) of every write of a message record after the one that accepted
/// it (outcomes, events, holds and releases, imports) within the idempotency window: with
/// the ids accepted since (which sort by time), the records a move copies incrementally
const RECENT_MESSAGES: TableDefinition<(&str, u64, &str), ()> =
    TableDefinition::new("recent_messages");
/// (tenant, class, hour since the epoch, cell) -> JSON [`Counts`] that cell counted for the
/// tenant before the tenant moved here (its own figures and those it carried), as of the
/// latest copy: the tenant's stats, daily cap and breakers go on from them
const STATS_CARRIED: TableDefinition<(&str, &str, u64, &str), &[u8]> =
    TableDefinition::new("stats_carried");
/// (tenant, class, minute since the epoch, cell) -> JSON [`Counts`], the same for breakers
const WINDOW_CARRIED: TableDefinition<(&str, &str, u64, &str), &[u8]> =
    TableDefinition::new("window_carried");
/// tenant -> (when, this cell's clock; the epoch it had here) the tenant was handed over to
/// another cell: what this cell keeps of it is current as of then, so a move back copies only
/// what changed since
const HANDED_OVER: TableDefinition<&str, (u64, u64)> = TableDefinition::new("hand_overs");
/// tenant -> (epoch, when, this cell's clock) this cell prepared to take the tenant over at
/// that epoch: it wrote nothing of the tenant's own from that stay before then, so a move
/// straight back to the cell that handed it over copies only what was written here since
const TAKEN_OVER: TableDefinition<&str, (u64, u64)> = TableDefinition::new("take_overs");

/// Entries of an import committed together: a move's copy holds the writer (and the cell's
/// accepts waiting behind it) only this long at a time.
const BULK_PART: usize = 128;

type Recent<'t> = redb::Table<'t, (&'static str, u64, &'static str), ()>;
type CarriedTable<'t> =
    redb::Table<'t, (&'static str, &'static str, u64, &'static str), &'static [u8]>;

/// Every table a batch of writes may change, opened once for the batch's transaction:
/// opening and closing a table reads and rewrites redb's table of tables, which costs more
/// than most of the writes themselves.
struct Tables<'t> {
    idempotency: redb::Table<'t, (&'static str, &'static str), &'static [u8]>,
    messages: redb::Table<'t, &'static str, &'static [u8]>,
    suppressions: redb::Table<'t, (&'static str, &'static str), &'static [u8]>,
    bodies: redb::Table<'t, &'static str, &'static [u8]>,
    stats: redb::Table<'t, (&'static str, &'static str, u64), &'static [u8]>,
    window: redb::Table<'t, (&'static str, &'static str, u64), &'static [u8]>,
    stats_carried: CarriedTable<'t>,
    window_carried: CarriedTable<'t>,
    parked: redb::Table<'t, (&'static str, &'static str, &'static str), &'static [u8]>,
    open: redb::Table<'t, (&'static str, &'static str), ()>,
    tenant_messages: redb::Table<'t, (&'static str, &'static str), ()>,
    recent: Recent<'t>,
    recent_suppressions: Recent<'t>,
    recent_messages: Recent<'t>,
    handed_over: redb::Table<'t, &'static str, (u64, u64)>,
    taken_over: redb::Table<'t, &'static str, (u64, u64)>,
    /// The embedded queue's messages.
    queued: Queued<'t>,
}

impl<'t> Tables<'t> {
    fn open(txn: &'t WriteTransaction) -> Result<Self, StorageError> {
        Ok(Self {
            idempotency: txn.open_table(IDEMPOTENCY).map_err(err)?,
            messages: txn.open_table(MESSAGES).map_err(err)?,
            suppressions: txn.open_table(SUPPRESSIONS).map_err(err)?,
            bodies: txn.open_table(BODIES).map_err(err)?,
            stats: txn.open_table(STATS).map_err(err)?,
            window: txn.open_table(WINDOW).map_err(err)?,
            stats_carried: txn.open_table(STATS_CARRIED).map_err(err)?,
            window_carried: txn.open_table(WINDOW_CARRIED).map_err(err)?,
            parked: txn.open_table(PARKED).map_err(err)?,
            open: txn.open_table(OPEN).map_err(err)?,
            tenant_messages: txn.open_table(TENANT_MESSAGES).map_err(err)?,
            recent: txn.open_table(RECENT).map_err(err)?,
            recent_suppressions: txn.open_table(RECENT_SUPPRESSIONS).map_err(err)?,
            recent_messages: txn.open_table(RECENT_MESSAGES).map_err(err)?,
            handed_over: txn.open_table(HANDED_OVER).map_err(err)?,
            taken_over: txn.open_table(TAKEN_OVER).map_err(err)?,
            queued: txn.open_table(QUEUED).map_err(err)?,
        })
    }
}

/// How many minutes of breaker figures are kept (the longest window a policy may set).
pub const WINDOW_MINUTES: u64 = 24 * 60;
/// How many hours of figures stats answer for, and a move carries.
pub const STATS_HOURS: u64 = 720;

/// Which of a tenant's figures a read adds up.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Figures {
    /// Only what this cell counted.
    Own,
    /// With what the cells the tenant moved here from counted.
    Carried,
}

/// One row of a tenant's figures as a move carries it: `origin` counted `counts` for
/// `class` in hour (or, `by_minute`, minute) `unit` since the epoch.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Carried {
    pub class: MessageClass,
    pub by_minute: bool,
    pub unit: u64,
    pub origin: String,
    pub counts: Counts,
}

/// A tenant's figures for one message class over some hours.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Counts {
    pub accepted: u64,
    pub sent: u64,
    pub delivered: u64,
    pub bounced: u64,
    pub complained: u64,
    pub suppressed: u64,
    pub rejected: u64,
}

impl Counts {
    fn add(&mut self, other: &Counts) {
        self.accepted += other.accepted;
        self.sent += other.sent;
        self.delivered += other.delivered;
        self.bounced += other.bounced;
        self.complained += other.complained;
        self.suppressed += other.suppressed;
        self.rejected += other.rejected;
    }
}

/// Adds those of `events` that `tenant`'s message `id` does not have yet to it.
fn add_events(
    t: &mut Tables,
    tenant: &TenantId,
    id: MessageId,
    events: Vec<MessageEvent>,
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
    record.events.extend(new);
    t.messages
        .insert(id.as_str(), json(&record).as_slice())
        .map_err(err)?;
    written_now(&mut t.recent_messages, tenant, &id)?;
    Ok(Recorded::New)
}

/// Adds `delta` to `tenant`'s figures for `class` in the hour of `at_ms`, and to its
/// breaker's minute when it holds what a breaker weighs (dropping minutes past a day).
fn count(
    t: &mut Tables,
    tenant: &TenantId,
    class: MessageClass,
    at_ms: u64,
    delta: &Counts,
) -> Result<(), StorageError> {
    let (tenant, c) = (tenant.as_str(), class.as_str());
    add_to(&mut t.stats, (tenant, c, at_ms / HOUR_MS), delta)?;
    if delta.sent + delta.bounced + delta.complained > 0 {
        let minute = at_ms / MINUTE_MS;
        add_to(&mut t.window, (tenant, c, minute), delta)?;
        let oldest = minute.saturating_sub(WINDOW_MINUTES);
        t.window
            .retain_in((tenant, c, 0)..(tenant, c, oldest), |_, _| false)
            .map_err(err)?;
    }
    Ok(())
}

/// The keys of `tenant` written to `recent` since `since_ms`, once each.
fn written_since(
    read: &redb::ReadTransaction,
    recent: TableDefinition<(&str, u64, &str), ()>,
    tenant: &TenantId,
    since_ms: u64,
) -> Result<Vec<String>, StorageError> {
    let table = read.open_table(recent).map_err(err)?;
    let (t, past) = (tenant.as_str(), past(tenant));
    let mut keys = std::collections::BTreeSet::new();
    for row in table
        .range((t, since_ms, "")..(past.as_str(), 0, ""))
        .map_err(err)?
    {
        keys.insert(row.map_err(err)?.0.value().2.to_owned());
    }
    Ok(keys.into_iter().collect())
}

/// Builds the message indexes (by tenant, and of the open ones) over the records a store
/// made before it kept them, once: a store that has the by-tenant table already is indexed.
fn index_messages(txn: &WriteTransaction) -> Result<(), StorageError> {
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

/// Indexes writes of `tenant`'s keys in `recent` ([`RECENT`], [`RECENT_SUPPRESSIONS`] or
/// [`RECENT_MESSAGES`]), each (when, key), dropping what is past the window at `now_ms`.
fn written_recently<'k>(
    recent: &mut Recent,
    now_ms: u64,
    tenant: &TenantId,
    written: impl IntoIterator<Item = (u64, &'k str)>,
) -> Result<(), StorageError> {
    let t = tenant.as_str();
    for (at_ms, key) in written {
        recent.insert((t, at_ms, key), ()).map_err(err)?;
    }
    let oldest = now_ms.saturating_sub(IDEMPOTENCY_WINDOW.as_millis() as u64);
    recent
        .retain_in((t, 0, "")..(t, oldest, ""), |_, _| false)
        .map_err(err)
}

/// Indexes a write of `tenant`'s `key` in `recent` made now.
fn written_now(recent: &mut Recent, tenant: &TenantId, key: &str) -> Result<(), StorageError> {
    let now = stamp_ms();
    written_recently(recent, now, tenant, [(now, key)])
}

fn add_to(
    table: &mut redb::Table<(&str, &str, u64), &[u8]>,
    key: (&str, &str, u64),
    delta: &Counts,
) -> Result<(), StorageError> {
    let mut counts: Counts = match table.get(key).map_err(err)? {
        Some(row) => parse(row.value())?,
        None => Counts::default(),
    };
    counts.add(delta);
    table.insert(key, json(&counts).as_slice()).map_err(err)?;
    Ok(())
}

/// Sums the rows of `tenant`'s `class` in `own` (and, with [`Figures::Carried`], in
/// `carried`) from bucket `first` to `last`.
fn sum(
    read: &redb::ReadTransaction,
    (own, carried): (OwnTable, CarriedDefinition),
    figures: Figures,
    tenant: &TenantId,
    class: MessageClass,
    (first, last): (u64, u64),
) -> Result<Counts, StorageError> {
    let (t, c) = (tenant.as_str(), class.as_str());
    let mut total = Counts::default();
    let mut add = |value: &[u8]| -> Result<(), StorageError> {
        total.add(&parse(value)?);
        Ok(())
    };
    let table = read.open_table(own).map_err(err)?;
    for row in table.range((t, c, first)..=(t, c, last)).map_err(err)? {
        add(row.map_err(err)?.1.value())?;
    }
    if figures == Figures::Carried {
        let table = read.open_table(carried).map_err(err)?;
        let rows = (t, c, first, "")..(t, c, last.saturating_add(1), "");
        for row in table.range(rows).map_err(err)? {
            add(row.map_err(err)?.1.value())?;
        }
    }
    Ok(total)
}

type OwnTable = TableDefinition<'static, (&'static str, &'static str, u64), &'static [u8]>;
type CarriedDefinition =
    TableDefinition<'static, (&'static str, &'static str, u64, &'static str), &'static [u8]>;

/// How long an idempotency key is remembered.
pub const IDEMPOTENCY_WINDOW: Duration = Duration::from_secs(24 * 3600);

#[derive(Debug, Clone, Serialize, Deserialize)]
struct KeyRecord {
    message_id: MessageId,
    reserved_at_ms: u64,
    /// `None` while the message is not yet known to be queued.
    accepted: Option<Accepted>,
}

/// Why an exported idempotency record (from another cell) is not one this store can read.
pub fn readable_key_record(record: &[u8]) -> Result<(), StorageError> {
    parse::<KeyRecord>(record).map(|_| ())
}

/// What a reservation of an idempotency key found.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Reservation {
    /// The key is new; it is now reserved for the given message id.
    New,
    /// An earlier attempt reserved the key but may not have queued its message: queue it
    /// again under this id.
    Pending(MessageId),
    /// Already accepted: answer this again and queue nothing.
    Done(Accepted),
}

/// One entry of a tenant's suppression list.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Suppressed {
    pub address: String,
    pub reason: SuppressionReason,
    pub at_ms: u64,
    /// The message whose feedback put it there.
    pub message_id: Option<MessageId>,
}

enum Write {
    Reserve {
        tenant: TenantId,
        key: String,
        message_id: MessageId,
        now_ms: u64,
    },
    Accepted {
        key: Option<String>,
        accepted: Accepted,
        record: MessageRecord,
        queued: Option<Staged>,
        now_ms: u64,
    },
    Queue(QueueWrite),
    Outcome {
        seed: MessageRecord,
        state: MessageState,
        event: MessageEvent,
    },
    Feedback {
        tenant: TenantId,
        message_id: Option<MessageId>,
        events: Vec<MessageEvent>,
        counts: Option<(MessageClass, u64, Counts)>,
    },
    Suppress {
        tenant: TenantId,
        entry: Suppressed,
    },
    Unsuppress {
        tenant: TenantId,
        address: String,
    },
    PutBody {
        message_id: MessageId,
        body: Vec<u8>,
    },
    DropBody {
        message_id: MessageId,
    },
    /// Messages to park, each with the held event when a breaker holds it.
    Park(Vec<(MessageRecord, Parked, Option<MessageEvent>)>),
    Unpark {
        tenant: TenantId,
        class: MessageClass,
        id: MessageId,
    },
    Release {
        ids: Vec<MessageId>,
        at_ms: u64,
    },
    /// Marks a lane's parked messages that are still queued held: its class is paused.
    Hold {
        tenant: TenantId,
        class: MessageClass,
        at_ms: u64,
    },
    /// Another cell's export of a tenant's state.
    Import {
        tenant: TenantId,
        export: TenantExport,
    },
    /// Drops what an earlier stay of a tenant left here (its list, its keys and the figures
    /// it carried from other cells), before its state is imported again.
    Forget {
        tenant: TenantId,
    },
    /// Drops everything of an offboarded tenant.
    Erase {
        tenant: TenantId,
    },
    /// Message records of a tenant that moved here, as its old cell has them, each with
    /// when that cell last wrote it.
    ImportMessages {
        tenant: TenantId,
        records: Vec<(MessageRecord, u64)>,
    },
    /// Figures other cells counted for a tenant that moved here.
    Carry {
        tenant: TenantId,
        rows: Vec<Carried>,
    },
    /// Notes that a tenant was handed over to another cell as of a time.
    HandedOver {
        tenant: TenantId,
        handed: HandOver,
    },
    /// Notes that this cell takes a tenant over at an epoch, as of now.
    TakingOver {
        tenant: TenantId,
        epoch: Epoch,
    },
}

/// The first tenant id past every key of `tenant` in a table keyed by tenant first: keys
/// `(tenant, …)` are exactly those in `(tenant, "")..(past(tenant), "")`.
fn past(tenant: &TenantId) -> String {
    format!("{tenant}\0")
}

/// The state of a tenant that follows it to another cell.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct TenantExport {
    pub suppressions: Vec<Suppressed>,
    /// Suppression keys taken off the list since the copy this one follows.
    pub removed_suppressions: Vec<String>,
    /// (idempotency key, the store's record of it), live ones only.
    pub idempotency: Vec<(String, Vec<u8>)>,
}

/// A tenant's hand-over from this cell to another: what this cell keeps of it is current as
/// of `as_of_ms` (this cell's clock), when the tenant had `epoch` here.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct HandOver {
    pub as_of_ms: u64,
    pub epoch: Epoch,
}

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

enum Written {
    Reservation(Reservation),
    Feedback(Recorded),
    /// Whether the write found what it was about (a message, a suppression).
    Found(bool),
}

fn json<T: Serialize>(value: &T) -> Vec<u8> {
    // Plain structs of strings and numbers always serialize.
    serde_json::to_vec(value).unwrap_or_default()
}

fn parse<T: DeserializeOwned>(bytes: &[u8]) -> Result<T, StorageError> {
    serde_json::from_slice(bytes).map_err(StorageError::from_display)
}

fn err(e: impl std::fmt::Display) -> StorageError {
    StorageError::from_display(e)
}

/// Why a breaker's held mail waits.
const HELD_REASON: &str = "its class is paused by the tenant's breaker";

/// Moves message `id` from state `from` to `to` with `event`; a message in another state (or
/// none) is left as it is.
fn restate(
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
    }
    Ok(())
}

/// What an earlier send of `key` holds, if its reservation is live at `now_ms`: the answer it
/// was given, or the message id it reserved.
fn held(
    table: &impl ReadableTable<(&'static str, &'static str), &'static [u8]>,
    tenant: &TenantId,
    key: &str,
    now_ms: u64,
) -> Result<Option<Reservation>, StorageError> {
    let found: Option<KeyRecord> = match table.get((tenant.as_str(), key)).map_err(err)? {
        Some(row) => Some(parse(row.value())?),
        None => None,
    };
    let live = found.filter(|r| {
        now_ms.saturating_sub(r.reserved_at_ms) < IDEMPOTENCY_WINDOW.as_millis() as u64
    });
    Ok(live.map(|r| match r.accepted {
        Some(accepted) => Reservation::Done(accepted),
        None => Reservation::Pending(r.message_id),
    }))
}

fn apply(t: &mut Tables, write: Write) -> Result<Written, StorageError> {
    match write {
        Write::Reserve {
            tenant,
            key,
            message_id,
            now_ms,
        } => {
            let table = &mut t.idempotency;
            let reservation = match held(table, &tenant, &key, now_ms)? {
                Some(held) => held,
                None => {
                    let record = KeyRecord {
                        message_id,
                        reserved_at_ms: now_ms,
                        accepted: None,
                    };
                    table
                        .insert((tenant.as_str(), key.as_str()), json(&record).as_slice())
                        .map_err(err)?;
                    Reservation::New
                }
            };
            Ok(Written::Reservation(reservation))
        }
        Write::Accepted {
            key,
            accepted,
            record,
            queued,
            now_ms,
        } => {
            if let Some(key) = key {
                let table = &mut t.idempotency;
                match held(table, &record.tenant, &key, now_ms)? {
                    Some(Reservation::Pending(first)) if first == accepted.message_id => {}
                    Some(other) => return Ok(Written::Reservation(other)),
                    None => {}
                }
                let done = KeyRecord {
                    message_id: accepted.message_id,
                    reserved_at_ms: now_ms,
                    accepted: Some(accepted),
                };
                table
                    .insert(
                        (record.tenant.as_str(), key.as_str()),
                        json(&done).as_slice(),
                    )
                    .map_err(err)?;
                // Only a completed key is indexed: an accept the freeze waited for completes
                // before the final copy, and a reservation whose queueing failed must not
                // follow the tenant as pending (its retry on the new cell is a new send).
                written_now(&mut t.recent, &record.tenant, key.as_str())?;
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
            count(
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
            if let Some(staged) = queued {
                queue::apply(&mut t.queued, QueueWrite::Insert(staged))?;
            }
            Ok(Written::Reservation(Reservation::New))
        }
        Write::Queue(write) => {
            queue::apply(&mut t.queued, write)?;
            Ok(Written::Found(true))
        }
        Write::Outcome { seed, state, event } => {
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
                MessageState::Queued | MessageState::Suppressed | MessageState::Held => {
                    Counts::default()
                }
            };
            count(t, &record.tenant, record.class, event.at_ms, &delta)?;
            if matches!(state, MessageState::Sent | MessageState::Failed) {
                t.open
                    .remove((record.tenant.as_str(), id.as_str()))
                    .map_err(err)?;
            }
            record.state = state;
            record.events.push(event);
            t.messages
                .insert(id.as_str(), json(&record).as_slice())
                .map_err(err)?;
            written_now(&mut t.recent_messages, &record.tenant, &id)?;
            Ok(Written::Found(true))
        }
        Write::Park(entries) => {
            for (seed, parked, held) in entries {
                let id = seed.id.to_string();
                t.parked
                    .insert(
                        (seed.tenant.as_str(), seed.class.as_str(), id.as_str()),
                        parked.encode().as_slice(),
                    )
                    .map_err(err)?;
                if let Some(event) = held {
                    apply(
                        t,
                        Write::Outcome {
                            seed,
                            state: MessageState::Held,
                            event,
                        },
                    )?;
                }
            }
            Ok(Written::Found(true))
        }
        Write::Unpark { tenant, class, id } => {
            let removed = t
                .parked
                .remove((tenant.as_str(), class.as_str(), id.to_string().as_str()))
                .map_err(err)?
                .is_some();
            Ok(Written::Found(removed))
        }
        Write::Release { ids, at_ms } => {
            let released = event(EventKind::Released, at_ms, "");
            for id in &ids {
                restate(
                    t,
                    &id.to_string(),
                    MessageState::Held,
                    MessageState::Queued,
                    &released,
                )?;
            }
            Ok(Written::Found(!ids.is_empty()))
        }
        Write::Hold {
            tenant,
            class,
            at_ms,
        } => {
            let ids: Vec<String> = {
                let (tenant, c) = (tenant.as_str(), class.as_str());
                let mut ids = Vec::new();
                for row in t.parked.range((tenant, c, "")..).map_err(err)? {
                    let (key, _) = row.map_err(err)?;
                    let (owner, of_class, id) = key.value();
                    if owner != tenant || of_class != c {
                        break;
                    }
                    ids.push(id.to_owned());
                }
                ids
            };
            let held = event(EventKind::Held, at_ms, HELD_REASON);
            for id in &ids {
                restate(t, id, MessageState::Queued, MessageState::Held, &held)?;
            }
            Ok(Written::Found(!ids.is_empty()))
        }
        Write::Feedback {
            tenant,
            message_id,
            events,
            counts,
        } => {
            let recorded = match message_id {
                Some(id) => add_events(t, &tenant, id, events)?,
                None => Recorded::NoMessage,
            };
            if recorded != Recorded::Duplicate
                && let Some((class, at_ms, delta)) = counts
            {
                count(t, &tenant, class, at_ms, &delta)?;
            }
            Ok(Written::Feedback(recorded))
        }
        Write::Suppress { tenant, entry } => {
            let table = &mut t.suppressions;
            let key = suppression_key(&entry.address);
            table
                .insert((tenant.as_str(), key.as_str()), json(&entry).as_slice())
                .map_err(err)?;
            written_now(&mut t.recent_suppressions, &tenant, &key)?;
            Ok(Written::Found(true))
        }
        Write::PutBody { message_id, body } => {
            let table = &mut t.bodies;
            table
                .insert(message_id.to_string().as_str(), body.as_slice())
                .map_err(err)?;
            Ok(Written::Found(true))
        }
        Write::DropBody { message_id } => {
            let table = &mut t.bodies;
            let removed = table.remove(message_id.to_string().as_str()).map_err(err)?;
            Ok(Written::Found(removed.is_some()))
        }
        Write::Import { tenant, export } => {
            let suppressions = &mut t.suppressions;
            for entry in &export.suppressions {
                let key = suppression_key(&entry.address);
                suppressions
                    .insert((tenant.as_str(), key.as_str()), json(entry).as_slice())
                    .map_err(err)?;
            }
            for key in &export.removed_suppressions {
                suppressions
                    .remove((tenant.as_str(), key.as_str()))
                    .map_err(err)?;
            }
            // Indexed so that a move on from here carries them further: a completed key as
            // when it was reserved (its old cell's clock; the copies that start from another
            // cell's time keep a margin), the list's changes as written here (an entry's own
            // time is its feedback's, not its write's).
            let mut done = Vec::with_capacity(export.idempotency.len());
            for (key, bytes) in &export.idempotency {
                t.idempotency
                    .insert((tenant.as_str(), key.as_str()), bytes.as_slice())
                    .map_err(err)?;
                let record: KeyRecord = parse(bytes)?;
                if record.accepted.is_some() {
                    done.push((record.reserved_at_ms, key.as_str()));
                }
            }
            let now = stamp_ms();
            written_recently(&mut t.recent, now, &tenant, done)?;
            let listed: Vec<String> = (export.suppressions.iter())
                .map(|e| suppression_key(&e.address))
                .collect();
            let suppression_keys = listed
                .iter()
                .chain(&export.removed_suppressions)
                .map(|key| (now, key.as_str()));
            written_recently(&mut t.recent_suppressions, now, &tenant, suppression_keys)?;
            Ok(Written::Found(true))
        }
        Write::Forget { tenant } => {
            let (tenant, past) = (tenant.as_str(), past(&tenant));
            for table in [&mut t.suppressions, &mut t.idempotency] {
                table
                    .retain_in((tenant, "")..(past.as_str(), ""), |_, _| false)
                    .map_err(err)?;
            }
            for table in [&mut t.stats_carried, &mut t.window_carried] {
                table
                    .retain_in((tenant, "", 0, "")..(past.as_str(), "", 0, ""), |_, _| {
                        false
                    })
                    .map_err(err)?;
            }
            t.handed_over.remove(tenant).map_err(err)?;
            t.taken_over.remove(tenant).map_err(err)?;
            Ok(Written::Found(true))
        }
        Write::ImportMessages { tenant, records } => {
            let messages = &mut t.messages;
            let index = &mut t.tenant_messages;
            let (now, mut written) = (stamp_ms(), Vec::with_capacity(records.len()));
            for (record, written_ms) in &records {
                let id = record.id.to_string();
                let here: Option<MessageRecord> = match messages.get(id.as_str()).map_err(err)? {
                    Some(row) => Some(parse(row.value())?),
                    None => None,
                };
                // Forwarded feedback may have reached the copy here after the export was read.
                if here.is_some_and(|here| here.events.len() > record.events.len()) {
                    continue;
                }
                messages
                    .insert(id.as_str(), json(record).as_slice())
                    .map_err(err)?;
                index
                    .insert((record.tenant.as_str(), id.as_str()), ())
                    .map_err(err)?;
                // Indexed as written when its old cell wrote it (that cell's clock): what a move
                // back to a cell that kept the tenant copies is what changed since, anywhere.
                // A cell that does not say when counts as writing it now.
                written.push((Some(*written_ms).filter(|at| *at > 0).unwrap_or(now), id));
            }
            let written = written.iter().map(|(at, id)| (*at, id.as_str()));
            written_recently(&mut t.recent_messages, now, &tenant, written)?;
            Ok(Written::Found(true))
        }
        Write::Erase { tenant } => {
            apply(
                t,
                Write::Forget {
                    tenant: tenant.clone(),
                },
            )?;
            let (tenant, past) = (tenant.as_str(), past(&tenant));
            let mine = (tenant, "")..(past.as_str(), "");
            for row in t.tenant_messages.range(mine.clone()).map_err(err)? {
                let (key, _) = row.map_err(err)?;
                let id = key.value().1;
                t.messages.remove(id).map_err(err)?;
                t.bodies.remove(id).map_err(err)?;
            }
            for table in [&mut t.tenant_messages, &mut t.open] {
                table.retain_in(mine.clone(), |_, _| false).map_err(err)?;
            }
            for table in [&mut t.stats, &mut t.window] {
                table
                    .retain_in((tenant, "", 0)..(past.as_str(), "", 0), |_, _| false)
                    .map_err(err)?;
            }
            t.parked
                .retain_in((tenant, "", "")..(past.as_str(), "", ""), |_, _| false)
                .map_err(err)?;
            for recent in [
                &mut t.recent,
                &mut t.recent_suppressions,
                &mut t.recent_messages,
            ] {
                recent
                    .retain_in((tenant, 0, "")..(past.as_str(), 0, ""), |_, _| false)
                    .map_err(err)?;
            }
            Ok(Written::Found(true))
        }
        Write::Carry { tenant, rows } => {
            let t = &mut *t;
            for row in &rows {
                let table = if row.by_minute {
                    &mut t.window_carried
                } else {
                    &mut t.stats_carried
                };
                let key = (
                    tenant.as_str(),
                    row.class.as_str(),
                    row.unit,
                    row.origin.as_str(),
                );
                table
                    .insert(key, json(&row.counts).as_slice())
                    .map_err(err)?;
            }
            // Minutes past the longest breaker window are of no use.
            let oldest = (stamp_ms() / MINUTE_MS).saturating_sub(WINDOW_MINUTES);
            for class in MessageClass::ALL {
                let (tenant, c) = (tenant.as_str(), class.as_str());
                t.window_carried
                    .retain_in((tenant, c, 0, "")..(tenant, c, oldest, ""), |_, _| false)
                    .map_err(err)?;
            }
            Ok(Written::Found(true))
        }
        Write::HandedOver { tenant, handed } => {
            t.handed_over
                .insert(tenant.as_str(), (handed.as_of_ms, handed.epoch.0))
                .map_err(err)?;
            Ok(Written::Found(true))
        }
        Write::TakingOver { tenant, epoch } => {
            t.taken_over
                .insert(tenant.as_str(), (epoch.0, stamp_ms()))
                .map_err(err)?;
            Ok(Written::Found(true))
        }
        Write::Unsuppress { tenant, address } => {
            let table = &mut t.suppressions;
            let key = suppression_key(&address);
            let removed = table
                .remove((tenant.as_str(), key.as_str()))
                .map_err(err)?
                .is_some();
            if removed {
                written_now(&mut t.recent_suppressions, &tenant, &key)?;
            }
            Ok(Written::Found(removed))
        }
    }
}

pub struct Store {
    db: Arc<Database>,
    writes: GroupCommit<Write, Written>,
}

impl Store {
    pub fn open(path: &Path) -> Result<Self, StorageError> {
        let db = Arc::new(Database::create(path).map_err(err)?);
        let txn = db.begin_write().map_err(err)?;
        // Creates the tables a store made by an older version lacks.
        drop(Tables::open(&txn)?);
        index_messages(&txn)?;
        txn.commit().map_err(err)?;
        let writes = GroupCommit::start("store", db.clone(), |txn, writes| {
            let mut tables = Tables::open(txn)?;
            writes.into_iter().map(|w| apply(&mut tables, w)).collect()
        })?;
        Ok(Self { db, writes })
    }

    async fn found(&self, write: Write, commit: Commit) -> Result<bool, StorageError> {
        match self.writes.submit(write, commit).await? {
            Written::Found(found) => Ok(found),
            _ => Err(StorageError("a write answered like another kind".into())),
        }
    }

    /// Submits a write that answers what holds an idempotency key.
    async fn reservation(&self, write: Write, commit: Commit) -> Result<Reservation, StorageError> {
        match self.writes.submit(write, commit).await? {
            Written::Reservation(reservation) => Ok(reservation),
            _ => Err(StorageError(
                "a key's write answered like another kind".into(),
            )),
        }
    }

    /// Durably reserves `key` for `message_id` unless an earlier send holds it.
    pub async fn reserve(
        &self,
        tenant: &TenantId,
        key: &str,
        message_id: MessageId,
        now_ms: u64,
    ) -> Result<Reservation, StorageError> {
        let write = Write::Reserve {
            tenant: tenant.clone(),
            key: key.to_owned(),
            message_id,
            now_ms,
        };
        self.reservation(write, Commit::Durable).await
    }

    /// What an earlier send of `tenant`'s `key` holds, if anything: read only, for a send
    /// whose reservation is made by the commit that records it.
    pub fn held(
        &self,
        tenant: &TenantId,
        key: &str,
        now_ms: u64,
    ) -> Result<Option<Reservation>, StorageError> {
        let read = self.read()?;
        held(
            &read.open_table(IDEMPOTENCY).map_err(err)?,
            tenant,
            key,
            now_ms,
        )
    }

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

    /// A read of the store as of now.
    fn read(&self) -> Result<ReadTransaction, StorageError> {
        self.db.begin_read().map_err(err)
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
        };
        match self.writes.submit(write, Commit::Durable).await? {
            Written::Feedback(recorded) => Ok(recorded),
            _ => Err(StorageError(
                "a feedback write answered like another".into(),
            )),
        }
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

    /// `tenant`'s figures for `class` over the `hours` hours up to and including `now_ms`'s.
    pub fn stats(
        &self,
        tenant: &TenantId,
        class: MessageClass,
        figures: Figures,
        now_ms: u64,
        hours: u64,
    ) -> Result<Counts, StorageError> {
        let read = self.read()?;
        let last = now_ms / HOUR_MS;
        let hours = ((last + 1).saturating_sub(hours), last);
        sum(&read, (STATS, STATS_CARRIED), figures, tenant, class, hours)
    }

    /// What `tenant`'s breaker for `class` weighs: sent, bounced and complained from the
    /// minute of `from_ms` to that of `now_ms`.
    pub fn window(
        &self,
        tenant: &TenantId,
        class: MessageClass,
        from_ms: u64,
        now_ms: u64,
    ) -> Result<Counts, StorageError> {
        let read = self.read()?;
        let minutes = (from_ms / MINUTE_MS, now_ms / MINUTE_MS);
        let tables = (WINDOW, WINDOW_CARRIED);
        sum(&read, tables, Figures::Carried, tenant, class, minutes)
    }

    /// `tenant`'s figures as a move carries them to another cell: every row this cell
    /// (`this`) counted within the last [`STATS_HOURS`] (and its breakers' minutes), and the
    /// rows it carries from other cells.
    pub fn figures(
        &self,
        tenant: &TenantId,
        this: &str,
        now_ms: u64,
    ) -> Result<Vec<Carried>, StorageError> {
        let read = self.read()?;
        let (t, past) = (tenant.as_str(), past(tenant));
        let first_hour = (now_ms / HOUR_MS).saturating_sub(STATS_HOURS);
        let mut rows = Vec::new();
        for (own, carried, by_minute) in [
            (STATS, STATS_CARRIED, false),
            (WINDOW, WINDOW_CARRIED, true),
        ] {
            let first = if by_minute { 0 } else { first_hour };
            let mut add = |class: &str, unit, origin: &str, value: &[u8]| {
                let class = class.parse().map_err(StorageError::from_display)?;
                if unit >= first {
                    let (origin, counts) = (origin.to_owned(), parse(value)?);
                    rows.push(Carried {
                        class,
                        by_minute,
                        unit,
                        origin,
                        counts,
                    });
                }
                Ok::<_, StorageError>(())
            };
            let table = read.open_table(own).map_err(err)?;
            for row in table
                .range((t, "", 0)..(past.as_str(), "", 0))
                .map_err(err)?
            {
                let (key, value) = row.map_err(err)?;
                let (_, class, unit) = key.value();
                add(class, unit, this, value.value())?;
            }
            let table = read.open_table(carried).map_err(err)?;
            let range = (t, "", 0, "")..(past.as_str(), "", 0, "");
            for row in table.range(range).map_err(err)? {
                let (key, value) = row.map_err(err)?;
                let (_, class, unit, origin) = key.value();
                add(class, unit, origin, value.value())?;
            }
        }
        Ok(rows)
    }

    /// Keeps the figures another cell carried of `tenant` (see [`Store::figures`]), each row
    /// over the one of its origin here (a copy made again is as good); this cell's (`this`)
    /// own rows stay as they are.
    pub async fn carry(
        &self,
        tenant: &TenantId,
        this: &str,
        rows: Vec<Carried>,
    ) -> Result<(), StorageError> {
        let rows = rows.into_iter().filter(|row| row.origin != this).collect();
        let write = Write::Carry {
            tenant: tenant.clone(),
            rows,
        };
        self.found(write, Commit::Durable).await.map(|_| ())
    }

    /// Durably parks messages outside the queue (the caller deletes them from their queue
    /// after), each as (its record, its parked form, whether its tenant's breaker holds it).
    pub async fn park(
        &self,
        entries: Vec<(MessageRecord, Parked, bool)>,
    ) -> Result<(), StorageError> {
        let entries = entries
            .into_iter()
            .map(|(seed, parked, held)| {
                let held = held.then(|| event(EventKind::Held, now_ms(), HELD_REASON));
                (seed, parked, held)
            })
            .collect();
        self.found(Write::Park(entries), Commit::Durable)
            .await
            .map(|_| ())
    }

    /// Up to `limit` of the messages parked for `tenant`'s `class` that may be sent at
    /// `now_ms`, oldest first, and whether any is parked at all.
    pub fn parked(
        &self,
        tenant: &TenantId,
        class: MessageClass,
        limit: usize,
        now_ms: u64,
    ) -> Result<(Vec<(MessageId, Parked)>, bool), StorageError> {
        let read = self.read()?;
        let table = read.open_table(PARKED).map_err(err)?;
        let (t, c) = (tenant.as_str(), class.as_str());
        let (mut ready, mut any) = (Vec::new(), false);
        for row in table.range((t, c, "")..).map_err(err)? {
            let (key, value) = row.map_err(err)?;
            let (owner, of_class, id) = key.value();
            if owner != t || of_class != c || ready.len() == limit {
                break;
            }
            any = true;
            let parked = Parked::decode(value.value())?;
            if parked.not_before_ms <= now_ms {
                ready.push((id.parse().map_err(StorageError::from_display)?, parked));
            }
        }
        Ok((ready, any))
    }

    /// Every tenant and class with parked messages.
    pub fn parked_lanes(&self) -> Result<Vec<(TenantId, MessageClass)>, StorageError> {
        let read = self.read()?;
        let table = read.open_table(PARKED).map_err(err)?;
        let mut lanes: Vec<(TenantId, MessageClass)> = Vec::new();
        for row in table.iter().map_err(err)? {
            let (key, _) = row.map_err(err)?;
            let (tenant, class, _) = key.value();
            let lane = (
                TenantId::new(tenant).map_err(StorageError::from_display)?,
                class.parse().map_err(StorageError::from_display)?,
            );
            if lanes.last() != Some(&lane) {
                lanes.push(lane);
            }
        }
        Ok(lanes)
    }

    /// Durably forgets a parked message (sent, dead-lettered or parked again).
    pub async fn unpark(
        &self,
        tenant: &TenantId,
        class: MessageClass,
        id: MessageId,
    ) -> Result<(), StorageError> {
        let write = Write::Unpark {
            tenant: tenant.clone(),
            class,
            id,
        };
        self.found(write, Commit::Durable).await.map(|_| ())
    }

    /// Marks the messages parked for `tenant`'s `class` that are still queued held (mail
    /// parked because its lane was full when the class was paused).
    pub async fn hold(
        &self,
        tenant: &TenantId,
        class: MessageClass,
        at_ms: u64,
    ) -> Result<(), StorageError> {
        let write = Write::Hold {
            tenant: tenant.clone(),
            class,
            at_ms,
        };
        self.found(write, Commit::Lazy).await.map(|_| ())
    }

    /// Marks held messages queued again, now that their breaker is resumed.
    pub async fn release(&self, ids: Vec<MessageId>, at_ms: u64) -> Result<(), StorageError> {
        self.found(Write::Release { ids, at_ms }, Commit::Lazy)
            .await
            .map(|_| ())
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

    pub async fn suppress(&self, tenant: &TenantId, entry: Suppressed) -> Result<(), StorageError> {
        self.found(
            Write::Suppress {
                tenant: tenant.clone(),
                entry,
            },
            Commit::Durable,
        )
        .await
        .map(|_| ())
    }

    /// Removes `address` from `tenant`'s list; false if it was not there.
    pub async fn unsuppress(&self, tenant: &TenantId, address: &str) -> Result<bool, StorageError> {
        self.found(
            Write::Unsuppress {
                tenant: tenant.clone(),
                address: address.to_owned(),
            },
            Commit::Durable,
        )
        .await
    }

    /// `tenant`'s entries for each of `addresses` (in order), in one read.
    pub fn suppressions_of(
        &self,
        tenant: &TenantId,
        addresses: &[&str],
    ) -> Result<Vec<Option<Suppressed>>, StorageError> {
        let read = self.read()?;
        let table = read.open_table(SUPPRESSIONS).map_err(err)?;
        addresses
            .iter()
            .map(|address| {
                match table
                    .get((tenant.as_str(), suppression_key(address).as_str()))
                    .map_err(err)?
                {
                    Some(row) => parse(row.value()).map(Some),
                    None => Ok(None),
                }
            })
            .collect()
    }

    /// Up to `limit` of `tenant`'s entries after suppression key `after`, in key order.
    pub fn list_suppressions(
        &self,
        tenant: &TenantId,
        after: &str,
        limit: usize,
    ) -> Result<Vec<Suppressed>, StorageError> {
        let read = self.read()?;
        let table = read.open_table(SUPPRESSIONS).map_err(err)?;
        let start = (tenant.as_str(), after);
        let mut entries = Vec::new();
        for row in table.range(start..).map_err(err)? {
            let (key, value) = row.map_err(err)?;
            let (owner, address) = key.value();
            if owner != tenant.as_str() || entries.len() == limit {
                break;
            }
            if address != after {
                entries.push(parse(value.value())?);
            }
        }
        Ok(entries)
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

    /// What of `tenant` follows it to another cell, in one consistent read: its suppression
    /// list and live idempotency keys (live at `now_ms`), or with `since_ms` only what was
    /// written since (with the suppressions taken off the list since). With the time it is
    /// complete as of: an export since then misses nothing written after this one's read.
    pub fn export(
        &self,
        tenant: &TenantId,
        now_ms: u64,
        since_ms: Option<u64>,
    ) -> Result<(u64, TenantExport), StorageError> {
        let as_of_ms = self.writes.committed_before();
        let read = self.read()?;
        let (t, past) = (tenant.as_str(), past(tenant));
        let mut export = TenantExport::default();
        let suppressions = read.open_table(SUPPRESSIONS).map_err(err)?;
        let idempotency = read.open_table(IDEMPOTENCY).map_err(err)?;
        let (suppression_keys, keys) = match since_ms {
            Some(since) => (
                written_since(&read, RECENT_SUPPRESSIONS, tenant, since)?,
                written_since(&read, RECENT, tenant, since)?,
            ),
            None => {
                let mut keys = Vec::new();
                for row in idempotency
                    .range((t, "")..(past.as_str(), ""))
                    .map_err(err)?
                {
                    keys.push(row.map_err(err)?.0.value().1.to_owned());
                }
                let mut listed = Vec::new();
                for row in suppressions
                    .range((t, "")..(past.as_str(), ""))
                    .map_err(err)?
                {
                    listed.push(row.map_err(err)?.0.value().1.to_owned());
                }
                (listed, keys)
            }
        };
        for key in suppression_keys {
            match suppressions.get((t, key.as_str())).map_err(err)? {
                Some(row) => export.suppressions.push(parse(row.value())?),
                None => export.removed_suppressions.push(key),
            }
        }
        let window = IDEMPOTENCY_WINDOW.as_millis() as u64;
        for key in keys {
            let Some(row) = idempotency.get((t, key.as_str())).map_err(err)? else {
                continue;
            };
            let record: KeyRecord = parse(row.value())?;
            if now_ms.saturating_sub(record.reserved_at_ms) < window {
                export.idempotency.push((key, row.value().to_vec()));
            }
        }
        Ok((as_of_ms, export))
    }

    /// Each idempotency record must be one [`readable_key_record`] accepts.
    pub async fn import(
        &self,
        tenant: &TenantId,
        export: TenantExport,
    ) -> Result<(), StorageError> {
        let TenantExport {
            suppressions,
            removed_suppressions,
            idempotency,
        } = export;
        // In parts: a key is either listed or removed, so their order does not matter.
        let listed = suppressions.chunks(BULK_PART).map(|part| TenantExport {
            suppressions: part.to_vec(),
            ..TenantExport::default()
        });
        let keys = idempotency.chunks(BULK_PART).map(|part| TenantExport {
            idempotency: part.to_vec(),
            ..TenantExport::default()
        });
        let removed = (!removed_suppressions.is_empty()).then(|| TenantExport {
            removed_suppressions,
            ..TenantExport::default()
        });
        let writes = (listed.chain(keys).chain(removed))
            .map(|export| Write::Import {
                tenant: tenant.clone(),
                export,
            })
            .collect();
        self.writes
            .submit_many(writes, Commit::Bulk)
            .await
            .map(|_| ())
    }

    /// A time (ms, this cell's clock) before which every write here is committed.
    pub fn committed_before(&self) -> u64 {
        self.writes.committed_before()
    }

    /// `tenant`'s message records, in id (so acceptance) order, each as (id, when this cell
    /// last wrote it): all of them, or with `since_ms` > 0 those written since (accepted
    /// then or later, or changed since; within the idempotency window).
    pub fn written_messages(
        &self,
        tenant: &TenantId,
        since_ms: u64,
    ) -> Result<Vec<(String, u64)>, StorageError> {
        let read = self.read()?;
        let (t, past) = (tenant.as_str(), past(tenant));
        let mut written = std::collections::BTreeMap::new();
        let recent = read.open_table(RECENT_MESSAGES).map_err(err)?;
        for row in recent
            .range((t, since_ms, "")..(past.as_str(), 0, ""))
            .map_err(err)?
        {
            let (key, _) = row.map_err(err)?;
            let (_, at_ms, id) = key.value();
            written.insert(id.to_owned(), at_ms);
        }
        // A record written only when it was accepted was written when its id was made.
        let first = MessageId::first_at(since_ms).to_string();
        let from = if since_ms == 0 { "" } else { first.as_str() };
        let index = read.open_table(TENANT_MESSAGES).map_err(err)?;
        for row in index.range((t, from)..(past.as_str(), "")).map_err(err)? {
            let (key, _) = row.map_err(err)?;
            let id = key.value().1;
            if !written.contains_key(id) {
                let at_ms = id.parse::<MessageId>().map_or(0, |id| id.at_ms());
                written.insert(id.to_owned(), at_ms);
            }
        }
        Ok(written.into_iter().collect())
    }

    /// The message records of `written` (those that exist), each with its time beside it.
    pub fn messages(
        &self,
        written: &[(String, u64)],
    ) -> Result<Vec<(MessageRecord, u64)>, StorageError> {
        let read = self.read()?;
        let messages = read.open_table(MESSAGES).map_err(err)?;
        let mut records = Vec::with_capacity(written.len());
        for (id, at_ms) in written {
            if let Some(record) = messages.get(id.as_str()).map_err(err)? {
                records.push((parse(record.value())?, *at_ms));
            }
        }
        Ok(records)
    }

    /// Notes (durably) that `tenant` was handed over to another cell: what this cell keeps
    /// of it is current as of the hand-over, until the tenant moves back.
    pub async fn hand_over(&self, tenant: &TenantId, handed: HandOver) -> Result<(), StorageError> {
        let write = Write::HandedOver {
            tenant: tenant.clone(),
            handed,
        };
        self.found(write, Commit::Durable).await.map(|_| ())
    }

    /// When `tenant` was last handed over from here, while a copy from then on can still be
    /// read incrementally (the write indexes keep an idempotency window; an hour of it is
    /// left for the copy's margins); `None` when what is here must be copied in full.
    pub fn handed_over(
        &self,
        tenant: &TenantId,
        now_ms: u64,
    ) -> Result<Option<HandOver>, StorageError> {
        let read = self.read()?;
        let table = read.open_table(HANDED_OVER).map_err(err)?;
        let usable = IDEMPOTENCY_WINDOW.as_millis() as u64 - HOUR_MS;
        Ok(table
            .get(tenant.as_str())
            .map_err(err)?
            .map(|row| {
                let (as_of_ms, epoch) = row.value();
                HandOver {
                    as_of_ms,
                    epoch: Epoch(epoch),
                }
            })
            .filter(|handed| now_ms.saturating_sub(handed.as_of_ms) < usable))
    }

    /// Notes (durably) that this cell takes `tenant` over at `epoch` from now on (its
    /// clock): of that stay, it writes nothing of the tenant's own before then.
    pub async fn take_over(&self, tenant: &TenantId, epoch: Epoch) -> Result<(), StorageError> {
        let write = Write::TakingOver {
            tenant: tenant.clone(),
            epoch,
        };
        self.found(write, Commit::Durable).await.map(|_| ())
    }

    /// When (this cell's clock) this cell took `tenant` over at `epoch`, if it noted that.
    pub fn taken_over(&self, tenant: &TenantId, epoch: Epoch) -> Result<Option<u64>, StorageError> {
        let read = self.read()?;
        let table = read.open_table(TAKEN_OVER).map_err(err)?;
        Ok(table.get(tenant.as_str()).map_err(err)?.and_then(|row| {
            let (at_epoch, at_ms) = row.value();
            (at_epoch == epoch.0).then_some(at_ms)
        }))
    }

    /// Writes (durably) message records another cell kept of a tenant that moved here, each
    /// with when that cell last wrote it.
    pub async fn import_messages(
        &self,
        tenant: &TenantId,
        records: Vec<(MessageRecord, u64)>,
    ) -> Result<(), StorageError> {
        let writes = records
            .chunks(BULK_PART)
            .map(|part| Write::ImportMessages {
                tenant: tenant.clone(),
                records: part.to_vec(),
            })
            .collect();
        self.writes
            .submit_many(writes, Commit::Bulk)
            .await
            .map(|_| ())
    }

    /// Drops everything this cell keeps of `tenant`: suppressions, idempotency keys, message
    /// records and bodies, figures, parked and held mail.
    pub async fn erase(&self, tenant: &TenantId) -> Result<(), StorageError> {
        let write = Write::Erase {
            tenant: tenant.clone(),
        };
        self.found(write, Commit::Durable).await.map(|_| ())
    }

    /// Drops `tenant`'s suppression list and idempotency keys (left by an earlier stay here).
    pub async fn forget(&self, tenant: &TenantId) -> Result<(), StorageError> {
        let write = Write::Forget {
            tenant: tenant.clone(),
        };
        self.found(write, Commit::Durable).await.map(|_| ())
    }
}

/// A message kept in the store instead of the queue: when it may be sent and how often it
/// was tried, then its queued form.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Parked {
    pub not_before_ms: u64,
    pub attempts: u32,
    pub body: Vec<u8>,
}

impl Parked {
    fn encode(&self) -> Vec<u8> {
        let mut bytes = Vec::with_capacity(12 + self.body.len());
        bytes.extend_from_slice(&self.not_before_ms.to_be_bytes());
        bytes.extend_from_slice(&self.attempts.to_be_bytes());
        bytes.extend_from_slice(&self.body);
        bytes
    }

    fn decode(bytes: &[u8]) -> Result<Self, StorageError> {
        let short = || StorageError("a parked message is shorter than its header".into());
        let (at, rest) = bytes.split_first_chunk::<8>().ok_or_else(short)?;
        let (attempts, body) = rest.split_first_chunk::<4>().ok_or_else(short)?;
        Ok(Self {
            not_before_ms: u64::from_be_bytes(*at),
            attempts: u32::from_be_bytes(*attempts),
            body: body.to_vec(),
        })
    }
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

#[cfg(test)]
mod tests {
    use super::*;
    use crate::message::RecipientOutcome;
    use cellmail_proto::MessageClass;

    fn accepted(id: MessageId) -> Accepted {
        Accepted {
            message_id: id,
            recipients: vec![RecipientOutcome {
                address: "a@example.com".into(),
                suppressed: None,
            }],
        }
    }

    fn record(id: MessageId, tenant: &TenantId) -> MessageRecord {
        MessageRecord {
            id,
            tenant: tenant.clone(),
            class: MessageClass::Transactional,
            state: MessageState::Queued,
            recipients: accepted(id).recipients,
            events: Vec::new(),
            accepted_at_ms: 1,
        }
    }

    #[tokio::test]
    async fn a_key_is_new_then_pending_then_done_and_survives_reopen() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("store.redb");
        let tenant = TenantId::new("t").unwrap();
        let (first, second) = (MessageId::generate(), MessageId::generate());
        {
            let store = Store::open(&path).unwrap();
            assert_eq!(
                store.reserve(&tenant, "k", first, 1_000).await.unwrap(),
                Reservation::New
            );
            assert_eq!(
                store.reserve(&tenant, "k", second, 1_001).await.unwrap(),
                Reservation::Pending(first)
            );
            store
                .accepted(
                    Some("k"),
                    accepted(first),
                    record(first, &tenant),
                    None,
                    1_002,
                )
                .await
                .unwrap();
            // A durable write after the lazy one makes both durable.
            store
                .suppress(
                    &tenant,
                    Suppressed {
                        address: "x@example.com".into(),
                        reason: SuppressionReason::Manual,
                        at_ms: 0,
                        message_id: None,
                    },
                )
                .await
                .unwrap();
        }
        let store = Store::open(&path).unwrap();
        assert_eq!(
            store.reserve(&tenant, "k", second, 1_003).await.unwrap(),
            Reservation::Done(accepted(first))
        );
        let other = TenantId::new("other").unwrap();
        assert_eq!(
            store.reserve(&other, "k", second, 1_004).await.unwrap(),
            Reservation::New,
            "keys are per tenant"
        );
    }

    #[tokio::test]
    async fn an_accept_queues_its_message_with_its_key_and_record_or_writes_nothing() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("store.redb");
        let tenant = TenantId::new("t").unwrap();
        let (first, second) = (MessageId::generate(), MessageId::generate());
        let slot = |seq| Slot { lane: 0, seq };
        {
            let store = Store::open(&path).unwrap();
            let accept = |key: &'static str, id: MessageId, seq| {
                let staged = Staged {
                    slot: slot(seq),
                    body: id.to_string().into_bytes(),
                };
                let record = record(id, &tenant);
                store.accepted(Some(key), accepted(id), record, Some(staged), 1_000)
            };
            assert_eq!(accept("k", first, 1).await.unwrap(), Reservation::New);
            assert_eq!(
                accept("k", second, 2).await.unwrap(),
                Reservation::Done(accepted(first)),
                "a key already answered"
            );
            assert_eq!(
                store.held(&tenant, "k", 1_001).unwrap(),
                Some(Reservation::Done(accepted(first)))
            );
            store.reserve(&tenant, "p", first, 1_000).await.unwrap();
            assert_eq!(
                accept("p", second, 3).await.unwrap(),
                Reservation::Pending(first),
                "a key another attempt reserved"
            );
        }
        let store = Store::open(&path).unwrap();
        assert_eq!(
            store.queued().unwrap(),
            [(slot(1), 0)],
            "only the new accept queued"
        );
        assert_eq!(
            store.queued_bodies(&[slot(1), slot(2)]).unwrap(),
            [Some(first.to_string().into_bytes()), None]
        );
        assert!(store.message(&tenant, first).unwrap().is_some());
        assert!(store.message(&tenant, second).unwrap().is_none());
    }

    #[tokio::test]
    async fn a_key_past_the_window_is_new_again() {
        let dir = tempfile::tempdir().unwrap();
        let store = Store::open(&dir.path().join("store.redb")).unwrap();
        let tenant = TenantId::new("t").unwrap();
        let id = MessageId::generate();
        store.reserve(&tenant, "k", id, 0).await.unwrap();
        store
            .accepted(Some("k"), accepted(id), record(id, &tenant), None, 0)
            .await
            .unwrap();
        let later = IDEMPOTENCY_WINDOW.as_millis() as u64 + 1;
        assert_eq!(
            store
                .reserve(&tenant, "k", MessageId::generate(), later)
                .await
                .unwrap(),
            Reservation::New
        );
    }

    #[tokio::test]
    async fn messages_answer_only_their_tenant_and_collect_events() {
        let dir = tempfile::tempdir().unwrap();
        let store = Store::open(&dir.path().join("store.redb")).unwrap();
        let (a, b) = (TenantId::new("a").unwrap(), TenantId::new("b").unwrap());
        let id = MessageId::generate();
        store
            .accepted(None, accepted(id), record(id, &a), None, 1)
            .await
            .unwrap();
        assert!(!store.settled(id).unwrap());
        store
            .record_outcome(
                record(id, &a),
                MessageState::Sent,
                event(EventKind::Sent, 2, ""),
            )
            .await
            .unwrap();
        assert!(store.settled(id).unwrap());
        let delivered = async |tenant: &TenantId| {
            let counts = Counts {
                delivered: 1,
                ..Counts::default()
            };
            let events = vec![event(EventKind::Delivery, 3, "")];
            let counts = Some((MessageClass::Transactional, 3, counts));
            store
                .record_feedback(tenant, Some(id), events, counts)
                .await
        };
        assert_eq!(
            delivered(&b).await.unwrap(),
            Recorded::NoMessage,
            "b cannot touch a's message"
        );
        assert_eq!(delivered(&a).await.unwrap(), Recorded::New);
        assert_eq!(
            delivered(&a).await.unwrap(),
            Recorded::Duplicate,
            "the same record delivered again"
        );
        let figures = |tenant| {
            store
                .stats(tenant, MessageClass::Transactional, Figures::Own, 3, 1)
                .unwrap()
        };
        assert_eq!(
            (figures(&a).delivered, figures(&b).delivered),
            (1, 1),
            "counted once for a; b's figures count what b was told, not a's message"
        );
        assert_eq!(store.message(&b, id).unwrap(), None);
        let mine = store.message(&a, id).unwrap().unwrap();
        assert_eq!(mine.state, MessageState::Sent);
        assert_eq!(
            mine.events.iter().map(|e| e.kind).collect::<Vec<_>>(),
            [EventKind::Sent, EventKind::Delivery]
        );
    }

    /// Counts `delta` in `tenant`'s figures the way feedback for no message here does.
    async fn count(
        store: &Store,
        tenant: &TenantId,
        class: MessageClass,
        at_ms: u64,
        delta: Counts,
    ) {
        let counts = Some((class, at_ms, delta));
        let recorded = store
            .record_feedback(tenant, None, Vec::new(), counts)
            .await;
        assert_eq!(recorded.unwrap(), Recorded::NoMessage);
    }

    #[tokio::test]
    async fn figures_add_up_per_tenant_class_and_hour_window() {
        let dir = tempfile::tempdir().unwrap();
        let store = Store::open(&dir.path().join("store.redb")).unwrap();
        let (a, b) = (TenantId::new("a").unwrap(), TenantId::new("b").unwrap());
        let class = MessageClass::Transactional;
        let hour = HOUR_MS;
        let now = 1_000 * hour + 5;
        for (tenant, class, at_ms, delta) in [
            (
                &a,
                class,
                now,
                Counts {
                    sent: 2,
                    bounced: 1,
                    ..Counts::default()
                },
            ),
            (
                &a,
                class,
                now - hour,
                Counts {
                    sent: 3,
                    ..Counts::default()
                },
            ),
            (
                &a,
                class,
                now - 5 * hour,
                Counts {
                    sent: 100,
                    ..Counts::default()
                },
            ),
            (
                &a,
                MessageClass::Marketing,
                now,
                Counts {
                    complained: 1,
                    ..Counts::default()
                },
            ),
            (
                &b,
                class,
                now,
                Counts {
                    sent: 7,
                    ..Counts::default()
                },
            ),
        ] {
            count(&store, tenant, class, at_ms, delta).await;
        }
        assert_eq!(
            store.stats(&a, class, Figures::Own, now, 1).unwrap(),
            Counts {
                sent: 2,
                bounced: 1,
                ..Counts::default()
            }
        );
        assert_eq!(
            store.stats(&a, class, Figures::Own, now, 2).unwrap().sent,
            5
        );
        assert_eq!(
            store.stats(&a, class, Figures::Own, now, 24).unwrap().sent,
            105
        );
        assert_eq!(
            store
                .stats(&a, MessageClass::Marketing, Figures::Own, now, 24)
                .unwrap()
                .complained,
            1
        );
        assert_eq!(
            store.stats(&b, class, Figures::Own, now, 24).unwrap(),
            Counts {
                sent: 7,
                ..Counts::default()
            }
        );
        let id = MessageId::generate();
        store
            .accepted(None, accepted(id), record(id, &a), None, now)
            .await
            .unwrap();
        // The record was accepted at 1 ms (hour 0); it is sent in the same hour.
        store
            .record_outcome(
                record(id, &a),
                MessageState::Sent,
                event(EventKind::Sent, 2, ""),
            )
            .await
            .unwrap();
        let counted = store.stats(&a, class, Figures::Own, 2, 1).unwrap();
        assert_eq!(
            (counted.accepted, counted.sent),
            (1, 1),
            "accepts and sends count themselves"
        );
    }

    #[tokio::test]
    async fn figures_follow_a_tenant_to_the_cells_it_moves_to_each_counted_once() {
        let dir = tempfile::tempdir().unwrap();
        let open = |name: &str| Store::open(&dir.path().join(format!("{name}.redb"))).unwrap();
        let (x, y) = (open("x"), open("y"));
        let (a, b) = (TenantId::new("a").unwrap(), TenantId::new("b").unwrap());
        let class = MessageClass::Marketing;
        let now = now_ms();
        let sent = |sent, complained| Counts {
            sent,
            complained,
            ..Counts::default()
        };
        count(&x, &a, class, now, sent(10, 1)).await;
        count(&x, &b, class, now, sent(5, 0)).await;
        // a moves from x to y; the copy is made twice (a retried pass) and counted once.
        for _ in 0..2 {
            let rows = x.figures(&a, "x", now).unwrap();
            assert!(rows.iter().all(|r| r.origin == "x"), "{rows:?}");
            y.carry(&a, "y", rows).await.unwrap();
        }
        count(&y, &a, class, now, sent(3, 0)).await;
        let on = |store: &Store, tenant: &TenantId, figures| {
            store.stats(tenant, class, figures, now, 1).unwrap()
        };
        assert_eq!(on(&y, &a, Figures::Carried), sent(13, 1));
        assert_eq!(on(&y, &a, Figures::Own), sent(3, 0));
        assert_eq!(
            y.window(&a, class, now - 60_000, now).unwrap(),
            sent(13, 1),
            "a's breaker on y weighs what x counted"
        );
        assert_eq!(
            on(&y, &b, Figures::Carried),
            Counts::default(),
            "b stayed on x"
        );
        // a moves back: x takes what y counted and not its own figures a second time.
        x.carry(&a, "x", y.figures(&a, "y", now).unwrap())
            .await
            .unwrap();
        assert_eq!(on(&x, &a, Figures::Carried), sent(13, 1));
        assert_eq!(on(&x, &b, Figures::Carried), sent(5, 0));
        // What a cell carried goes when the tenant's state here is dropped.
        y.forget(&a).await.unwrap();
        assert_eq!(on(&y, &a, Figures::Carried), sent(3, 0));
    }

    #[tokio::test]
    async fn suppression_lists_are_per_tenant_case_folded_and_paged() {
        let dir = tempfile::tempdir().unwrap();
        let store = Store::open(&dir.path().join("store.redb")).unwrap();
        let (a, b) = (TenantId::new("a").unwrap(), TenantId::new("b").unwrap());
        let entry = |address: &str| Suppressed {
            address: address.into(),
            reason: SuppressionReason::Bounce,
            at_ms: 1,
            message_id: None,
        };
        for address in ["c@x.example", "A@x.example", "b@x.example"] {
            store.suppress(&a, entry(address)).await.unwrap();
        }
        store.suppress(&b, entry("z@x.example")).await.unwrap();
        let found = store
            .suppressions_of(&a, &["a@X.example", "z@x.example"])
            .unwrap();
        assert_eq!(
            found[0].as_ref().map(|s| s.address.as_str()),
            Some("A@x.example")
        );
        assert_eq!(found[1], None, "b's entry is not a's");
        let page = store.list_suppressions(&a, "", 2).unwrap();
        assert_eq!(
            page.iter().map(|s| s.address.as_str()).collect::<Vec<_>>(),
            ["A@x.example", "b@x.example"]
        );
        let rest = store
            .list_suppressions(&a, &suppression_key(&page[1].address), 2)
            .unwrap();
        assert_eq!(
            rest.iter().map(|s| s.address.as_str()).collect::<Vec<_>>(),
            ["c@x.example"]
        );
        assert!(store.unsuppress(&a, "C@X.EXAMPLE").await.unwrap());
        assert!(!store.unsuppress(&a, "c@x.example").await.unwrap());
        assert_eq!(store.list_suppressions(&b, "", 10).unwrap().len(), 1);
    }

    #[tokio::test]
    async fn a_tenants_export_holds_only_its_own_state_and_the_final_copy_what_changed_since() {
        let dir = tempfile::tempdir().unwrap();
        let store = Store::open(&dir.path().join("store.redb")).unwrap();
        let (a, b) = (TenantId::new("a").unwrap(), TenantId::new("b").unwrap());
        let bounce = Suppressed {
            address: "gone@x.example".into(),
            reason: SuppressionReason::Bounce,
            at_ms: 1,
            message_id: None,
        };
        store.suppress(&a, bounce.clone()).await.unwrap();
        store.suppress(&b, bounce.clone()).await.unwrap();
        let (old, new, theirs) = (
            MessageId::generate(),
            MessageId::generate(),
            MessageId::generate(),
        );
        store.reserve(&a, "old", old, 1_000).await.unwrap();
        store
            .accepted(Some("old"), accepted(old), record(old, &a), None, 1_000)
            .await
            .unwrap();
        store.reserve(&b, "theirs", theirs, 5_000).await.unwrap();
        store.reserve(&a, "new", new, 5_000).await.unwrap();

        after(now_ms()).await;
        let (as_of, precopy) = store.export(&a, 6_000, None).unwrap();
        assert_eq!(precopy.suppressions, std::slice::from_ref(&bounce));
        let keys: Vec<&str> = precopy
            .idempotency
            .iter()
            .map(|(k, _)| k.as_str())
            .collect();
        assert_eq!(keys, ["new", "old"]);
        // After the pre-copy: an address is added and the bounced one taken off the list.
        let later = Suppressed {
            address: "later@x.example".into(),
            ..bounce.clone()
        };
        store.suppress(&a, later.clone()).await.unwrap();
        assert!(store.unsuppress(&a, "Gone@x.example").await.unwrap());
        // The pending key completes, and one whose queueing failed is left pending.
        store
            .accepted(Some("new"), accepted(new), record(new, &a), None, 5_500)
            .await
            .unwrap();
        store
            .reserve(&a, "stray", MessageId::generate(), 5_600)
            .await
            .unwrap();
        let (_, last) = store.export(&a, 6_000, Some(as_of)).unwrap();
        assert_eq!(last.suppressions, std::slice::from_ref(&later));
        assert_eq!(last.removed_suppressions, ["gone@x.example"]);
        let keys: Vec<&str> = last.idempotency.iter().map(|(k, _)| k.as_str()).collect();
        assert_eq!(
            keys,
            ["new"],
            "only keys completed since the pre-copy, and only a's"
        );

        let target = Store::open(&dir.path().join("target.redb")).unwrap();
        target
            .suppress(
                &a,
                Suppressed {
                    address: "stale@x.example".into(),
                    ..bounce.clone()
                },
            )
            .await
            .unwrap();
        target.forget(&a).await.unwrap();
        assert!(
            target.list_suppressions(&a, "", 10).unwrap().is_empty(),
            "a stale stay is forgotten"
        );
        target.import(&a, precopy).await.unwrap();
        target.import(&a, last).await.unwrap();
        assert_eq!(
            target
                .reserve(&a, "old", MessageId::generate(), 7_000)
                .await
                .unwrap(),
            Reservation::Done(accepted(old))
        );
        assert_eq!(
            target
                .reserve(&a, "new", MessageId::generate(), 7_000)
                .await
                .unwrap(),
            Reservation::Done(accepted(new))
        );
        assert_eq!(
            target
                .reserve(&a, "stray", MessageId::generate(), 7_000)
                .await
                .unwrap(),
            Reservation::New,
            "a send that was never queued is a new send on the new cell"
        );
        assert_eq!(target.list_suppressions(&a, "", 10).unwrap(), [later]);
        assert!(
            target.list_suppressions(&b, "", 10).unwrap().is_empty(),
            "b's state stayed home"
        );
    }

    /// Moves `tenant`'s state from `from` to `to` as a move's copies do, from `since_ms`
    /// (0: everything).
    async fn copy(from: &Store, to: &Store, tenant: &TenantId, since_ms: u64) {
        let since = (since_ms > 0).then_some(since_ms);
        to.import(tenant, from.export(tenant, now_ms(), since).unwrap().1)
            .await
            .unwrap();
        let written = from.written_messages(tenant, since_ms).unwrap();
        to.import_messages(tenant, from.messages(&written).unwrap())
            .await
            .unwrap();
    }

    /// Waits for the clock to pass `at_ms`, so that what follows is written after it.
    async fn after(at_ms: u64) {
        while now_ms() <= at_ms {
            tokio::time::sleep(Duration::from_millis(1)).await;
        }
    }

    #[tokio::test]
    async fn a_tenant_handed_over_and_back_copies_only_what_was_written_since_its_take_over() {
        let dir = tempfile::tempdir().unwrap();
        let (x, y) = (
            Store::open(&dir.path().join("x.redb")).unwrap(),
            Store::open(&dir.path().join("y.redb")).unwrap(),
        );
        let (a, b) = (TenantId::new("a").unwrap(), TenantId::new("b").unwrap());
        let entry = |address: &str| Suppressed {
            address: address.into(),
            reason: SuppressionReason::Manual,
            at_ms: 1,
            message_id: None,
        };
        // On x: a sends two messages (one bounces later), and has one suppression.
        let (quiet, bounced, theirs) = (
            MessageId::generate(),
            MessageId::generate(),
            MessageId::generate(),
        );
        for (key, id) in [("quiet", quiet), ("bounced", bounced)] {
            store_sent(&x, &a, key, id).await;
        }
        store_sent(&x, &b, "theirs", theirs).await;
        x.suppress(&a, entry("old@x.example")).await.unwrap();
        assert_eq!(x.handed_over(&a, now_ms()).unwrap(), None);

        // a moves to y (epoch 1 to 2): y notes it takes a over, everything is copied, and x
        // notes the hand-over.
        after(now_ms()).await;
        y.take_over(&a, Epoch(2)).await.unwrap();
        let taken_over = y.taken_over(&a, Epoch(2)).unwrap().unwrap();
        assert_eq!(y.taken_over(&a, Epoch(3)).unwrap(), None, "another stay's");
        copy(&x, &y, &a, 0).await;
        let handed = HandOver {
            as_of_ms: now_ms(),
            epoch: Epoch(1),
        };
        x.hand_over(&a, handed).await.unwrap();
        after(handed.as_of_ms).await;

        // On y: a new message, a late bounce of an old one, the list changes.
        let new = MessageId::generate();
        store_sent(&y, &a, "new", new).await;
        let bounce = event(EventKind::Bounce, now_ms(), "permanent");
        assert!(
            y.record_feedback(&a, Some(bounced), vec![bounce.clone()], None)
                .await
                .unwrap()
                == Recorded::New
        );
        y.suppress(&a, entry("new@x.example")).await.unwrap();
        assert!(y.unsuppress(&a, "old@x.example").await.unwrap());

        // a moves back: x kept its state as of the hand-over, and y sends only what it wrote
        // since it took a over, imports from x included (x has those).
        assert_eq!(x.handed_over(&a, now_ms()).unwrap(), Some(handed));
        let ids = |written: Vec<(String, u64)>| -> Vec<String> {
            written.into_iter().map(|(id, _)| id).collect()
        };
        let mut changed = vec![bounced.to_string(), new.to_string()];
        changed.sort();
        assert_eq!(
            ids(y.written_messages(&a, taken_over).unwrap()),
            changed,
            "not the quiet message (y wrote it only as x had it), and not b's"
        );
        let (_, export) = y.export(&a, now_ms(), Some(taken_over)).unwrap();
        let keys: Vec<&str> = export.idempotency.iter().map(|(k, _)| k.as_str()).collect();
        assert_eq!(keys, ["new"], "the keys x has are not sent back");
        copy(&y, &x, &a, taken_over).await;

        let record = x.message(&a, bounced).unwrap().unwrap();
        assert_eq!(record.events.last(), Some(&bounce));
        assert!(x.message(&a, new).unwrap().is_some());
        assert!(x.message(&a, quiet).unwrap().is_some());
        assert_eq!(
            x.list_suppressions(&a, "", 10).unwrap(),
            [entry("new@x.example")]
        );
        for (key, id) in [("quiet", quiet), ("new", new)] {
            let again = x.reserve(&a, key, MessageId::generate(), now_ms());
            assert_eq!(again.await.unwrap(), Reservation::Done(accepted(id)));
        }
        assert!(
            y.message(&b, theirs).unwrap().is_none(),
            "b's state stayed home"
        );

        // Imported records keep when they were written, so a move on from x carries what
        // changed on y further; a hand-over older than the indexes keep is not usable.
        assert_eq!(ids(x.written_messages(&a, taken_over).unwrap()), changed);
        let late = handed.as_of_ms + IDEMPOTENCY_WINDOW.as_millis() as u64;
        assert_eq!(x.handed_over(&a, late).unwrap(), None);
        x.forget(&a).await.unwrap();
        y.forget(&a).await.unwrap();
        assert_eq!(x.handed_over(&a, now_ms()).unwrap(), None);
        assert_eq!(y.taken_over(&a, Epoch(2)).unwrap(), None);
    }

    /// `tenant` sends message `id` with idempotency key `key` on `store`, and it is sent.
    async fn store_sent(store: &Store, tenant: &TenantId, key: &str, id: MessageId) {
        let now = now_ms();
        store.reserve(tenant, key, id, now).await.unwrap();
        let record = record(id, tenant);
        store
            .accepted(Some(key), accepted(id), record.clone(), None, now)
            .await
            .unwrap();
        let sent = event(EventKind::Sent, now, "");
        store
            .record_outcome(record, MessageState::Sent, sent)
            .await
            .unwrap();
    }

    #[tokio::test]
    async fn a_tenants_backlog_counts_its_messages_until_sent_or_failed() {
        let dir = tempfile::tempdir().unwrap();
        let store = Store::open(&dir.path().join("store.redb")).unwrap();
        let (a, b) = (TenantId::new("a").unwrap(), TenantId::new("b").unwrap());
        let ids: Vec<MessageId> = (0..3).map(|_| MessageId::generate()).collect();
        for id in &ids {
            store
                .accepted(None, accepted(*id), record(*id, &a), None, 1)
                .await
                .unwrap();
        }
        let theirs = MessageId::generate();
        store
            .accepted(None, accepted(theirs), record(theirs, &b), None, 1)
            .await
            .unwrap();
        assert_eq!(store.backlog(&a).unwrap(), 3);
        let sent = event(EventKind::Sent, 2, "");
        store
            .record_outcome(record(ids[0], &a), MessageState::Sent, sent.clone())
            .await
            .unwrap();
        store
            .record_outcome(record(ids[1], &a), MessageState::Failed, sent.clone())
            .await
            .unwrap();
        store
            .record_outcome(record(ids[2], &a), MessageState::Held, sent)
            .await
            .unwrap();
        assert_eq!(
            store.backlog(&a).unwrap(),
            1,
            "held mail is still to be delivered"
        );
        assert_eq!(store.backlog(&b).unwrap(), 1);
    }

    #[tokio::test]
    async fn records_of_a_store_made_before_the_indexes_are_indexed_when_it_opens() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("store.redb");
        let tenant = TenantId::new("old").unwrap();
        let (queued, sent) = (MessageId::generate(), MessageId::generate());
        {
            let db = Database::create(&path).unwrap();
            let txn = db.begin_write().unwrap();
            {
                let mut messages = txn.open_table(MESSAGES).unwrap();
                for (id, state) in [(queued, MessageState::Queued), (sent, MessageState::Sent)] {
                    let stored = MessageRecord {
                        state,
                        ..record(id, &tenant)
                    };
                    let key = id.to_string();
                    messages
                        .insert(key.as_str(), json(&stored).as_slice())
                        .unwrap();
                }
            }
            txn.commit().unwrap();
        }
        let store = Store::open(&path).unwrap();
        assert_eq!(store.backlog(&tenant).unwrap(), 1, "the queued one is open");
        let ids: Vec<MessageId> = store
            .messages(&store.written_messages(&tenant, 0).unwrap())
            .unwrap()
            .into_iter()
            .map(|(r, _)| r.id)
            .collect();
        let mut expected = vec![queued, sent];
        expected.sort_by_key(|id| id.to_string());
        assert_eq!(ids, expected);
        store.erase(&tenant).await.unwrap();
        assert!(store.written_messages(&tenant, 0).unwrap().is_empty());
        assert_eq!(store.backlog(&tenant).unwrap(), 0);
    }
}
