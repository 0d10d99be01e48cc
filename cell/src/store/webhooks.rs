//! Each tenant's webhook endpoints, the deliveries they owe (an outbox, filled in the
//! transaction that logs each event, so no event is missed), and each endpoint's log of its
//! last attempts.
//!
//! The outbox is keyed by endpoint and then by when a delivery is due, so the dispatcher
//! reads, endpoint by endpoint, only what is due and what the endpoint has room for: one
//! endpoint's backlog never hides another's deliveries.
//! An event is queued for delivery only by the cell that logged it: a tenant's endpoints
//! follow it when it moves, and the cell it left delivers what it had queued (and logs after
//! the switch, from its backlog) itself.

use cellmail_proto::TenantId;
use redb::ReadableTable;
use serde::{Deserialize, Serialize};

use super::events::{EventType, TenantEvent};
use super::{DELIVERIES, OUTBOX, Store, Tables, WEBHOOKS, Write, err, json, parse, past};
use crate::commit::{Commit, StorageError};

/// A tenant's endpoint, as its cell keeps it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Endpoint {
    pub id: String,
    pub url: String,
    /// Empty: every type.
    pub types: Vec<EventType>,
    pub enabled: bool,
    /// Its signing secrets (`whsec_…`), newest first; an older one signs too until it expires.
    pub secrets: Vec<Secret>,
    /// Deliveries under way at once, at most.
    pub max_in_flight: u32,
    pub timeout_ms: u32,
    pub created_ms: u64,
    /// Since when a delivery was given up on (every retry failed); cleared by a success.
    pub failing_since_ms: Option<u64>,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Secret {
    pub secret: String,
    /// `None`: signs until another secret replaces it.
    pub expires_ms: Option<u64>,
}

impl Endpoint {
    pub fn wants(&self, kind: EventType) -> bool {
        self.enabled && (self.types.is_empty() || self.types.contains(&kind))
    }

    /// The secrets that sign at `now_ms`.
    pub fn signing(&self, now_ms: u64) -> Vec<&str> {
        (self.secrets.iter())
            .filter(|s| s.expires_ms.is_none_or(|at| at > now_ms))
            .map(|s| s.secret.as_str())
            .collect()
    }
}

/// A delivery owed: the event, and how many attempts failed so far.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Pending {
    pub event: TenantEvent,
    pub attempts: u32,
}

/// One due delivery: where it is in the outbox, and what it owes.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Due {
    pub due_ms: u64,
    pub tenant: TenantId,
    pub endpoint: String,
    pub pending: Pending,
}

/// One attempt, as an endpoint's log shows it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Attempt {
    pub event_id: String,
    /// An event type, or `test`.
    pub event_type: String,
    pub at_ms: u64,
    pub attempt: u32,
    /// The HTTP status, 0 when there was none.
    pub status: u16,
    pub latency_ms: u64,
    pub error: String,
}

/// What became of an attempt.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Outcome {
    Delivered,
    /// Due again at this time.
    Retry(u64),
    /// Every retry failed: the endpoint is failing since then.
    GaveUp(u64),
}

/// Attempts an endpoint's log keeps.
pub const LOGGED_ATTEMPTS: usize = 50;

type WebhookTable = (&'static str, &'static str);

/// `tenant`'s endpoints in `table` (the store's, read or being written).
fn endpoints_in(
    table: &impl ReadableTable<WebhookTable, &'static [u8]>,
    tenant: &TenantId,
) -> Result<Vec<Endpoint>, StorageError> {
    let past = past(tenant);
    let mut endpoints = Vec::new();
    for row in (table.range((tenant.as_str(), "")..(past.as_str(), ""))).map_err(err)? {
        endpoints.push(parse(row.map_err(err)?.1.value())?);
    }
    Ok(endpoints)
}

/// `tenant`'s endpoint `id` in `table`.
fn endpoint_in(
    table: &impl ReadableTable<WebhookTable, &'static [u8]>,
    tenant: &TenantId,
    id: &str,
) -> Result<Option<Endpoint>, StorageError> {
    match table.get((tenant.as_str(), id)).map_err(err)? {
        Some(row) => Ok(Some(parse(row.value())?)),
        None => Ok(None),
    }
}

fn enqueue(
    t: &mut Tables,
    tenant: &TenantId,
    endpoint: &str,
    due_ms: u64,
    pending: &Pending,
) -> Result<(), StorageError> {
    let key = (tenant.as_str(), endpoint, due_ms, pending.event.id.as_str());
    t.outbox
        .insert(key, json(pending).as_slice())
        .map_err(err)?;
    Ok(())
}

/// Queues `events`, just logged for `tenant` at `now_ms`, for each endpoint that wants them.
pub(super) fn queue(
    t: &mut Tables,
    tenant: &TenantId,
    events: &[TenantEvent],
    now_ms: u64,
) -> Result<(), StorageError> {
    for endpoint in endpoints_in(&t.webhooks, tenant)? {
        for event in events.iter().filter(|e| endpoint.wants(e.kind)) {
            let pending = Pending {
                event: event.clone(),
                attempts: 0,
            };
            enqueue(t, tenant, &endpoint.id, now_ms, &pending)?;
        }
    }
    Ok(())
}

pub(super) fn put(
    t: &mut Tables,
    tenant: &TenantId,
    endpoint: &Endpoint,
) -> Result<(), StorageError> {
    let key = (tenant.as_str(), endpoint.id.as_str());
    t.webhooks
        .insert(key, json(endpoint).as_slice())
        .map_err(err)?;
    Ok(())
}

/// Removes an endpoint and what it owed; whether it existed.
pub(super) fn remove(t: &mut Tables, tenant: &TenantId, id: &str) -> Result<bool, StorageError> {
    let found = t
        .webhooks
        .remove((tenant.as_str(), id))
        .map_err(err)?
        .is_some();
    let tenant = tenant.as_str();
    for table in [&mut t.outbox, &mut t.deliveries] {
        table
            .retain_in((tenant, id, 0, "")..(tenant, id, u64::MAX, ""), |_, _| {
                false
            })
            .map_err(err)?;
    }
    Ok(found)
}

/// Replaces `tenant`'s endpoints by another cell's (a move); what they owed there stays there.
pub(super) fn replace(
    t: &mut Tables,
    tenant: &TenantId,
    endpoints: &[Endpoint],
) -> Result<(), StorageError> {
    let past = past(tenant);
    t.webhooks
        .retain_in((tenant.as_str(), "")..(past.as_str(), ""), |_, _| false)
        .map_err(err)?;
    for endpoint in endpoints {
        put(t, tenant, endpoint)?;
    }
    Ok(())
}

/// Drops every endpoint of `tenant`, what they owed and their logs.
pub(super) fn erase(t: &mut Tables, tenant: &TenantId) -> Result<(), StorageError> {
    replace(t, tenant, &[])?;
    let (tenant, past) = (tenant.as_str(), past(tenant));
    for table in [&mut t.outbox, &mut t.deliveries] {
        table
            .retain_in((tenant, "", 0, "")..(past.as_str(), "", 0, ""), |_, _| {
                false
            })
            .map_err(err)?;
    }
    Ok(())
}

/// Records an attempt of `due`: takes it off the outbox, queues it again when it is to be
/// retried, notes the attempt in its endpoint's log (keeping the last ones), and marks the
/// endpoint failing when it was given up on, or not failing when it was delivered.
pub(super) fn attempted(
    t: &mut Tables,
    due: &Due,
    outcome: &Outcome,
    attempt: &Attempt,
) -> Result<(), StorageError> {
    let (tenant, endpoint) = (due.tenant.as_str(), due.endpoint.as_str());
    t.outbox
        .remove((tenant, endpoint, due.due_ms, due.pending.event.id.as_str()))
        .map_err(err)?;
    let found = endpoint_in(&t.webhooks, &due.tenant, endpoint)?;
    // An endpoint deleted meanwhile owes nothing more.
    let Some(mut record) = found else {
        return Ok(());
    };
    let failing = match outcome {
        Outcome::Delivered => None,
        Outcome::Retry(next_ms) => {
            let pending = Pending {
                attempts: due.pending.attempts + 1,
                ..due.pending.clone()
            };
            enqueue(t, &due.tenant, endpoint, *next_ms, &pending)?;
            record.failing_since_ms
        }
        Outcome::GaveUp(at_ms) => Some(record.failing_since_ms.unwrap_or(*at_ms)),
    };
    if failing != record.failing_since_ms {
        record.failing_since_ms = failing;
        put(t, &due.tenant, &record)?;
    }
    let logged = (tenant, endpoint, attempt.at_ms, attempt.event_id.as_str());
    t.deliveries
        .insert(logged, json(attempt).as_slice())
        .map_err(err)?;
    let range = (tenant, endpoint, 0, "")..(tenant, endpoint, u64::MAX, "");
    let kept = t.deliveries.range(range.clone()).map_err(err)?.count();
    if kept > LOGGED_ATTEMPTS {
        let mut over = kept - LOGGED_ATTEMPTS;
        t.deliveries
            .retain_in(range, |_, _| {
                let drop = over > 0;
                over = over.saturating_sub(1);
                !drop
            })
            .map_err(err)?;
    }
    Ok(())
}

/// The most events one replay queues: a longer range is replayed in several calls, each
/// from the last event's time, so that one never holds the store's writer for long.
pub const MAX_REPLAY: usize = 10_000;

/// Re-queues `tenant`'s logged events of `[from_ms, to_ms]` for `endpoint`, at most
/// [`MAX_REPLAY`] of them: how many, and where the rest starts when there is more.
pub(super) fn replay(
    t: &mut Tables,
    tenant: &TenantId,
    endpoint: &Endpoint,
    (from_ms, to_ms): (u64, u64),
    now_ms: u64,
) -> Result<(u32, Option<u64>), StorageError> {
    let past = past(tenant);
    let mut queued = Vec::new();
    for row in (t
        .events
        .range((tenant.as_str(), from_ms, "")..(past.as_str(), 0, "")))
    .map_err(err)?
    {
        let event: TenantEvent = parse(row.map_err(err)?.1.value())?;
        if event.at_ms >= from_ms && event.at_ms <= to_ms && endpoint.wants(event.kind) {
            queued.push(event);
            if queued.len() == MAX_REPLAY {
                break;
            }
        }
    }
    for event in &queued {
        let pending = Pending {
            event: event.clone(),
            attempts: 0,
        };
        enqueue(t, tenant, &endpoint.id, now_ms, &pending)?;
    }
    // Events of the same millisecond as the last one are queued again by the next call:
    // at least once, as every delivery.
    let more = (queued.len() == MAX_REPLAY)
        .then(|| queued.iter().map(|e| e.at_ms).max().unwrap_or(from_ms));
    Ok((queued.len() as u32, more))
}

impl Store {
    /// `tenant`'s endpoints, by id.
    pub fn webhooks(&self, tenant: &TenantId) -> Result<Vec<Endpoint>, StorageError> {
        let read = self.read()?;
        endpoints_in(&read.open_table(WEBHOOKS).map_err(err)?, tenant)
    }

    /// `tenant`'s endpoint `id`.
    pub fn webhook(&self, tenant: &TenantId, id: &str) -> Result<Option<Endpoint>, StorageError> {
        let read = self.read()?;
        endpoint_in(&read.open_table(WEBHOOKS).map_err(err)?, tenant, id)
    }

    /// The last attempts of `tenant`'s endpoint `id`, newest first.
    pub fn attempts(&self, tenant: &TenantId, id: &str) -> Result<Vec<Attempt>, StorageError> {
        let read = self.read()?;
        let table = read.open_table(DELIVERIES).map_err(err)?;
        let t = tenant.as_str();
        let mut attempts = Vec::new();
        for row in (table.range((t, id, 0, "")..(t, id, u64::MAX, ""))).map_err(err)? {
            attempts.push(parse(row.map_err(err)?.1.value())?);
        }
        attempts.reverse();
        Ok(attempts)
    }

    /// The deliveries due by `now_ms`, endpoint by endpoint, each endpoint's longest due
    /// first and no more than `room` says it has room for, each with its endpoint.
    pub fn due(
        &self,
        now_ms: u64,
        room: impl Fn(&TenantId, &Endpoint) -> usize,
    ) -> Result<Vec<(Due, Endpoint)>, StorageError> {
        let read = self.read()?;
        let outbox = read.open_table(OUTBOX).map_err(err)?;
        let webhooks = read.open_table(WEBHOOKS).map_err(err)?;
        let mut due = Vec::new();
        for row in webhooks.iter().map_err(err)? {
            let (key, value) = row.map_err(err)?;
            let Ok(tenant) = TenantId::new(key.value().0) else {
                continue;
            };
            let endpoint: Endpoint = parse(value.value())?;
            // A disabled endpoint keeps what it owes until it is enabled again.
            let room = if endpoint.enabled {
                room(&tenant, &endpoint)
            } else {
                0
            };
            if room == 0 {
                continue;
            }
            let (t, id) = (tenant.as_str(), endpoint.id.as_str());
            for row in (outbox
                .range((t, id, 0, "")..(t, id, now_ms + 1, ""))
                .map_err(err)?)
            .take(room)
            {
                let (key, value) = row.map_err(err)?;
                let entry = Due {
                    due_ms: key.value().2,
                    tenant: tenant.clone(),
                    endpoint: endpoint.id.clone(),
                    pending: parse(value.value())?,
                };
                due.push((entry, endpoint.clone()));
            }
        }
        Ok(due)
    }

    /// Writes `tenant`'s endpoint (new or changed).
    pub async fn put_webhook(
        &self,
        tenant: &TenantId,
        endpoint: Endpoint,
    ) -> Result<(), StorageError> {
        let write = Write::PutWebhook {
            tenant: tenant.clone(),
            endpoint,
        };
        self.found(write, Commit::Durable).await.map(|_| ())
    }

    /// Deletes `tenant`'s endpoint `id` and what it owed; whether it existed.
    pub async fn delete_webhook(&self, tenant: &TenantId, id: &str) -> Result<bool, StorageError> {
        let write = Write::DeleteWebhook {
            tenant: tenant.clone(),
            id: id.to_owned(),
        };
        self.found(write, Commit::Durable).await
    }

    /// Records an attempt (see [`attempted`]).
    pub async fn record_attempt(
        &self,
        due: Due,
        outcome: Outcome,
        attempt: Attempt,
    ) -> Result<(), StorageError> {
        let write = Write::Attempted {
            due,
            outcome,
            attempt,
        };
        self.found(write, Commit::Durable).await.map(|_| ())
    }

    /// Queues `tenant`'s events of a time range again for its endpoint (see [`replay`]).
    pub async fn replay_webhook(
        &self,
        tenant: &TenantId,
        endpoint: Endpoint,
        range: (u64, u64),
        now_ms: u64,
    ) -> Result<(u32, Option<u64>), StorageError> {
        let write = Write::Replay {
            tenant: tenant.clone(),
            endpoint,
            range,
            now_ms,
        };
        match self.writes.submit(write, Commit::Durable).await? {
            super::Written::Replayed(queued, more) => Ok((queued, more)),
            _ => Err(StorageError("a replay answered like another write".into())),
        }
    }
}
