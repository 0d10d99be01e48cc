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
//!
//! Every write goes through one group commit (`Write`, applied by `apply`); each kind of
//! write, and the reads and the `impl Store` methods of its domain, live in the domain's
//! module:
//!
//! - `idempotency`: keys, their reservations and answers.
//! - `messages`: message records, the backlog index, bodies too large for the queue.
//! - `events`: each tenant's event log, written with the message records' steps.
//! - `webhooks`: each tenant's webhook endpoints, the deliveries they owe, their logs.
//! - `suppressions`: each tenant's suppression list.
//! - `figures`: stats and breaker windows, and the figures carried from other cells.
//! - `held`: mail parked outside the queue, and mail held by a breaker.
//! - `queue`: the embedded queue's table.
//! - `moves`: a tenant's state leaving and arriving (export, import, hand-overs, erase).

use std::path::Path;
use std::sync::Arc;

use cellmail_proto::{Epoch, MessageClass, MessageId, TenantId};
use redb::{Database, ReadTransaction, ReadableDatabase, TableDefinition, WriteTransaction};
use serde::{Serialize, de::DeserializeOwned};

mod events;
mod figures;
mod held;
mod idempotency;
mod messages;
mod moves;
mod queue;
mod suppressions;
#[cfg(test)]
mod tests;
mod webhooks;

pub use events::{EventCursor, EventFilter, EventType, TenantEvent};
pub use figures::{Carried, Counts, Figures, STATS_HOURS, WINDOW_MINUTES};
pub use held::Parked;
pub use idempotency::{IDEMPOTENCY_WINDOW, Reservation, readable_key_record};
pub use messages::{Recorded, event};
pub use moves::{HandOver, TenantExport};
pub(crate) use queue::QueueWrite;
pub use queue::{Slot, Staged};
pub use suppressions::Suppressed;
pub use webhooks::{Attempt, Due, Endpoint, LOGGED_ATTEMPTS, Outcome, Pending, Secret};

use crate::commit::{Commit, GroupCommit, StorageError, stamp_ms};
use crate::message::{Accepted, MessageEvent, MessageRecord, MessageState};
use queue::{QUEUED, Queued};

/// (tenant, idempotency key) -> JSON `KeyRecord` (see `idempotency`)
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
/// (tenant, when it was written, event id) -> JSON `TenantEvent` (see `events`)
const EVENTS: TableDefinition<(&str, u64, &str), &[u8]> = TableDefinition::new("events");
/// (tenant, endpoint id) -> JSON `Endpoint` (see `webhooks`)
const WEBHOOKS: TableDefinition<(&str, &str), &[u8]> = TableDefinition::new("webhooks");
/// (tenant, endpoint id, due at, event id) -> JSON `Pending`
const OUTBOX: TableDefinition<(&str, &str, u64, &str), &[u8]> = TableDefinition::new("outbox");
/// (tenant, endpoint id, attempted at, event id) -> JSON `Attempt`
const DELIVERIES: TableDefinition<(&str, &str, u64, &str), &[u8]> =
    TableDefinition::new("deliveries");

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
    events: redb::Table<'t, (&'static str, u64, &'static str), &'static [u8]>,
    webhooks: redb::Table<'t, (&'static str, &'static str), &'static [u8]>,
    outbox: CarriedTable<'t>,
    deliveries: CarriedTable<'t>,
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
            events: txn.open_table(EVENTS).map_err(err)?,
            webhooks: txn.open_table(WEBHOOKS).map_err(err)?,
            outbox: txn.open_table(OUTBOX).map_err(err)?,
            deliveries: txn.open_table(DELIVERIES).map_err(err)?,
            queued: txn.open_table(QUEUED).map_err(err)?,
        })
    }
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
        /// Whether the events go to the tenant's log too (not when the cell that serves the
        /// tenant logs them).
        log: bool,
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
    /// Events another cell logged for a tenant that moved here, each with when it did.
    ImportEvents {
        tenant: TenantId,
        events: Vec<(TenantEvent, u64)>,
    },
    PutWebhook {
        tenant: TenantId,
        endpoint: Endpoint,
    },
    DeleteWebhook {
        tenant: TenantId,
        id: String,
    },
    Attempted {
        due: Due,
        outcome: Outcome,
        attempt: Attempt,
    },
    Replay {
        tenant: TenantId,
        endpoint: Endpoint,
        range: (u64, u64),
        now_ms: u64,
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

enum Written {
    Reservation(Reservation),
    Feedback(Recorded),
    /// Whether the write found what it was about (a message, a suppression).
    Found(bool),
    /// How many events a replay queued, and where the rest starts when there is more.
    Replayed(u32, Option<u64>),
}

/// Applies one write in the batch's transaction: each kind's logic lives with its domain.
fn apply(t: &mut Tables, write: Write) -> Result<Written, StorageError> {
    use Written::{Feedback, Found};
    // Writes that look nothing up answer that they found it.
    let done = |()| Found(true);
    match write {
        Write::Reserve {
            tenant,
            key,
            message_id,
            now_ms,
        } => idempotency::reserve(t, &tenant, &key, message_id, now_ms).map(Written::Reservation),
        Write::Accepted {
            key,
            accepted,
            record,
            queued,
            now_ms,
        } => messages::accepted(t, key.as_deref(), accepted, record, queued, now_ms)
            .map(Written::Reservation),
        Write::Queue(write) => queue::apply(&mut t.queued, write).map(done),
        Write::Outcome { seed, state, event } => messages::outcome(t, seed, state, event).map(done),
        Write::Feedback {
            tenant,
            message_id,
            events,
            counts,
            log,
        } => messages::feedback(t, &tenant, message_id, events, counts, log).map(Feedback),
        Write::PutBody { message_id, body } => messages::put_body(t, message_id, &body).map(done),
        Write::DropBody { message_id } => messages::drop_body(t, message_id).map(Found),
        Write::Suppress { tenant, entry } => suppressions::suppress(t, &tenant, &entry).map(done),
        Write::Unsuppress { tenant, address } => {
            suppressions::unsuppress(t, &tenant, &address).map(Found)
        }
        Write::Park(entries) => held::park(t, entries).map(done),
        Write::Unpark { tenant, class, id } => held::unpark(t, &tenant, class, id).map(Found),
        Write::Release { ids, at_ms } => held::release(t, &ids, at_ms).map(Found),
        Write::Hold {
            tenant,
            class,
            at_ms,
        } => held::hold(t, &tenant, class, at_ms).map(Found),
        Write::Carry { tenant, rows } => figures::carry(t, &tenant, &rows).map(done),
        Write::ImportEvents { tenant, events } => events::import(t, &tenant, &events).map(done),
        Write::PutWebhook { tenant, endpoint } => webhooks::put(t, &tenant, &endpoint).map(done),
        Write::DeleteWebhook { tenant, id } => webhooks::remove(t, &tenant, &id).map(Found),
        Write::Attempted {
            due,
            outcome,
            attempt,
        } => webhooks::attempted(t, &due, &outcome, &attempt).map(done),
        Write::Replay {
            tenant,
            endpoint,
            range,
            now_ms,
        } => webhooks::replay(t, &tenant, &endpoint, range, now_ms)
            .map(|(queued, more)| Written::Replayed(queued, more)),
        Write::Import { tenant, export } => moves::import(t, &tenant, &export).map(done),
        Write::ImportMessages { tenant, records } => {
            moves::import_messages(t, &tenant, &records).map(done)
        }
        Write::Forget { tenant } => moves::forget(t, &tenant).map(done),
        Write::Erase { tenant } => moves::erase(t, &tenant).map(done),
        Write::HandedOver { tenant, handed } => {
            moves::note_handed_over(t, &tenant, handed).map(done)
        }
        Write::TakingOver { tenant, epoch } => moves::note_taking_over(t, &tenant, epoch).map(done),
    }
}

/// The first tenant id past every key of `tenant` in a table keyed by tenant first: keys
/// `(tenant, …)` are exactly those in `(tenant, "")..(past(tenant), "")`.
fn past(tenant: &TenantId) -> String {
    format!("{tenant}\0")
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
        messages::index_messages(&txn)?;
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

    /// A read of the store as of now.
    fn read(&self) -> Result<ReadTransaction, StorageError> {
        self.db.begin_read().map_err(err)
    }

    /// A time (ms, this cell's clock) before which every write here is committed.
    pub fn committed_before(&self) -> u64 {
        self.writes.committed_before()
    }
}
