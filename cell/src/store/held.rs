//! The mail parked outside the queue: a tenant's overflow beyond its delivery lane, retries
//! of parked mail, and the mail held (its record marked so) while a breaker pauses its class.

use cellmail_proto::{MessageClass, MessageId, TenantId, now_ms};
use redb::ReadableTable;

use super::messages::{self, event};
use super::{PARKED, Store, Tables, Write, err};
use crate::commit::{Commit, StorageError};
use crate::message::{EventKind, MessageEvent, MessageRecord, MessageState};

/// Why a breaker's held mail waits.
const HELD_REASON: &str = "its class is paused by the tenant's breaker";

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

/// Parks each message, marking the ones a breaker holds held.
pub(super) fn park(
    t: &mut Tables,
    entries: Vec<(MessageRecord, Parked, Option<MessageEvent>)>,
) -> Result<(), StorageError> {
    for (seed, parked, held) in entries {
        let id = seed.id.to_string();
        t.parked
            .insert(
                (seed.tenant.as_str(), seed.class.as_str(), id.as_str()),
                parked.encode().as_slice(),
            )
            .map_err(err)?;
        if let Some(event) = held {
            messages::outcome(t, seed, MessageState::Held, event)?;
        }
    }
    Ok(())
}

/// Whether the message was parked.
pub(super) fn unpark(
    t: &mut Tables,
    tenant: &TenantId,
    class: MessageClass,
    id: MessageId,
) -> Result<bool, StorageError> {
    let removed = t
        .parked
        .remove((tenant.as_str(), class.as_str(), id.to_string().as_str()))
        .map_err(err)?
        .is_some();
    Ok(removed)
}

/// Marks held messages queued again; whether there were any.
pub(super) fn release(t: &mut Tables, ids: &[MessageId], at_ms: u64) -> Result<bool, StorageError> {
    let released = event(EventKind::Released, at_ms, "");
    for id in ids {
        messages::restate(
            t,
            &id.to_string(),
            MessageState::Held,
            MessageState::Queued,
            &released,
        )?;
    }
    Ok(!ids.is_empty())
}

/// Marks the parked messages of `tenant`'s `class` that are still queued held; whether any
/// is parked.
pub(super) fn hold(
    t: &mut Tables,
    tenant: &TenantId,
    class: MessageClass,
    at_ms: u64,
) -> Result<bool, StorageError> {
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
        messages::restate(t, id, MessageState::Queued, MessageState::Held, &held)?;
    }
    Ok(!ids.is_empty())
}

impl Store {
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
}
