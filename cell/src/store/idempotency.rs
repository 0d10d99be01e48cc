//! The idempotency window: tenant + key -> the first send's answer, or the message id an
//! attempt reserved while its message is not yet known to be queued.

use std::time::Duration;

use cellmail_proto::{MessageId, TenantId};
use redb::ReadableTable;
use serde::{Deserialize, Serialize};

use super::{IDEMPOTENCY, Store, Tables, Write, err, json, parse, written_now};
use crate::commit::{Commit, StorageError};
use crate::message::Accepted;

/// How long an idempotency key is remembered.
pub const IDEMPOTENCY_WINDOW: Duration = Duration::from_secs(24 * 3600);

#[derive(Debug, Clone, Serialize, Deserialize)]
pub(super) struct KeyRecord {
    message_id: MessageId,
    pub(super) reserved_at_ms: u64,
    /// `None` while the message is not yet known to be queued.
    pub(super) accepted: Option<Accepted>,
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

/// Reserves `tenant`'s `key` for `message_id` unless an earlier send holds it.
pub(super) fn reserve(
    t: &mut Tables,
    tenant: &TenantId,
    key: &str,
    message_id: MessageId,
    now_ms: u64,
) -> Result<Reservation, StorageError> {
    let table = &mut t.idempotency;
    Ok(match held(table, tenant, key, now_ms)? {
        Some(held) => held,
        None => {
            let record = KeyRecord {
                message_id,
                reserved_at_ms: now_ms,
                accepted: None,
            };
            table
                .insert((tenant.as_str(), key), json(&record).as_slice())
                .map_err(err)?;
            Reservation::New
        }
    })
}

/// Completes `tenant`'s `key` with `accepted`, the answer of the send it was reserved for (or
/// of its first send); when another send holds it, writes nothing and answers what holds it.
pub(super) fn complete(
    t: &mut Tables,
    tenant: &TenantId,
    key: &str,
    accepted: Accepted,
    now_ms: u64,
) -> Result<Option<Reservation>, StorageError> {
    let table = &mut t.idempotency;
    match held(table, tenant, key, now_ms)? {
        Some(Reservation::Pending(first)) if first == accepted.message_id => {}
        Some(other) => return Ok(Some(other)),
        None => {}
    }
    let done = KeyRecord {
        message_id: accepted.message_id,
        reserved_at_ms: now_ms,
        accepted: Some(accepted),
    };
    table
        .insert((tenant.as_str(), key), json(&done).as_slice())
        .map_err(err)?;
    // Only a completed key is indexed: an accept the freeze waited for completes before the
    // final copy, and a reservation whose queueing failed must not follow the tenant as
    // pending (its retry on the new cell is a new send).
    written_now(&mut t.recent, tenant, key)?;
    Ok(None)
}

impl Store {
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
}
