//! A tenant's state as it moves between cells, and as it leaves for good. The export carries
//! its suppression list and idempotency window, and the move copies its message records;
//! writes of each are indexed by when they were made, so the copy made while the tenant is
//! frozen holds only what changed since a pre-copy and the freeze does not grow with the
//! window. A cell notes when it handed a tenant over and when it took one over, so a move
//! back copies only what changed since.

use cellmail_proto::clock::HOUR_MS;
use cellmail_proto::{Epoch, MessageId, TenantId, suppression_key};
use redb::ReadableTable;

use super::events::TenantEvent;
use super::idempotency::{IDEMPOTENCY_WINDOW, KeyRecord};
use super::suppressions::Suppressed;
use super::webhooks::Endpoint;
use super::{
    HANDED_OVER, IDEMPOTENCY, MESSAGES, RECENT, RECENT_MESSAGES, RECENT_SUPPRESSIONS, SUPPRESSIONS,
    Store, TAKEN_OVER, TENANT_MESSAGES, Tables, Write, err, json, parse, past, written_recently,
    written_since,
};
use crate::commit::{Commit, StorageError, stamp_ms};
use crate::message::MessageRecord;

/// Entries of an import committed together: a move's copy holds the writer (and the cell's
/// accepts waiting behind it) only this long at a time.
const BULK_PART: usize = 128;

/// The state of a tenant that follows it to another cell.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct TenantExport {
    pub suppressions: Vec<Suppressed>,
    /// Suppression keys taken off the list since the copy this one follows.
    pub removed_suppressions: Vec<String>,
    /// (idempotency key, the store's record of it), live ones only.
    pub idempotency: Vec<(String, Vec<u8>)>,
    /// The tenant's webhook endpoints, all of them (`None`: not part of this copy).
    pub webhooks: Option<Vec<Endpoint>>,
}

/// A tenant's hand-over from this cell to another: what this cell keeps of it is current as
/// of `as_of_ms` (this cell's clock), when the tenant had `epoch` here.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct HandOver {
    pub as_of_ms: u64,
    pub epoch: Epoch,
}

/// Writes another cell's export of `tenant`'s state.
pub(super) fn import(
    t: &mut Tables,
    tenant: &TenantId,
    export: &TenantExport,
) -> Result<(), StorageError> {
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
    if let Some(endpoints) = &export.webhooks {
        super::webhooks::replace(t, tenant, endpoints)?;
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
    written_recently(&mut t.recent, now, tenant, done)?;
    let listed: Vec<String> = (export.suppressions.iter())
        .map(|e| suppression_key(&e.address))
        .collect();
    let suppression_keys = listed
        .iter()
        .chain(&export.removed_suppressions)
        .map(|key| (now, key.as_str()));
    written_recently(&mut t.recent_suppressions, now, tenant, suppression_keys)?;
    Ok(())
}

/// Drops what an earlier stay of `tenant` left here: its list, its keys and the figures it
/// carried from other cells.
pub(super) fn forget(t: &mut Tables, tenant: &TenantId) -> Result<(), StorageError> {
    let (tenant, past) = (tenant.as_str(), past(tenant));
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
    Ok(())
}

/// Drops everything of `tenant`.
pub(super) fn erase(t: &mut Tables, tenant: &TenantId) -> Result<(), StorageError> {
    forget(t, tenant)?;
    super::events::erase(t, tenant)?;
    super::webhooks::erase(t, tenant)?;
    let (tenant, past) = (tenant.as_str(), past(tenant));
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
    Ok(())
}

/// Writes the message records of `tenant` another cell kept, each with when it wrote it.
pub(super) fn import_messages(
    t: &mut Tables,
    tenant: &TenantId,
    records: &[(MessageRecord, u64)],
) -> Result<(), StorageError> {
    let messages = &mut t.messages;
    let index = &mut t.tenant_messages;
    let (now, mut written) = (stamp_ms(), Vec::with_capacity(records.len()));
    for (record, written_ms) in records {
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
    written_recently(&mut t.recent_messages, now, tenant, written)?;
    Ok(())
}

pub(super) fn note_handed_over(
    t: &mut Tables,
    tenant: &TenantId,
    handed: HandOver,
) -> Result<(), StorageError> {
    t.handed_over
        .insert(tenant.as_str(), (handed.as_of_ms, handed.epoch.0))
        .map_err(err)?;
    Ok(())
}

pub(super) fn note_taking_over(
    t: &mut Tables,
    tenant: &TenantId,
    epoch: Epoch,
) -> Result<(), StorageError> {
    t.taken_over
        .insert(tenant.as_str(), (epoch.0, stamp_ms()))
        .map_err(err)?;
    Ok(())
}

impl Store {
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
        drop((suppressions, idempotency, read));
        export.webhooks = Some(self.webhooks(tenant)?);
        Ok((as_of_ms, export))
    }

    /// Each idempotency record must be one [`readable_key_record`](super::readable_key_record)
    /// accepts.
    pub async fn import(
        &self,
        tenant: &TenantId,
        export: TenantExport,
    ) -> Result<(), StorageError> {
        let TenantExport {
            suppressions,
            removed_suppressions,
            idempotency,
            webhooks,
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
        let removed =
            (!removed_suppressions.is_empty() || webhooks.is_some()).then(|| TenantExport {
                removed_suppressions,
                webhooks,
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

    /// Writes (durably) events another cell logged of a tenant that moved here, each with
    /// when that cell wrote it.
    pub async fn import_events(
        &self,
        tenant: &TenantId,
        events: Vec<(TenantEvent, u64)>,
    ) -> Result<(), StorageError> {
        let writes = events
            .chunks(BULK_PART)
            .map(|part| Write::ImportEvents {
                tenant: tenant.clone(),
                events: part.to_vec(),
            })
            .collect();
        self.writes
            .submit_many(writes, Commit::Bulk)
            .await
            .map(|_| ())
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

    /// Drops `tenant`'s suppression list and idempotency keys (left by an earlier stay here).
    pub async fn forget(&self, tenant: &TenantId) -> Result<(), StorageError> {
        let write = Write::Forget {
            tenant: tenant.clone(),
        };
        self.found(write, Commit::Durable).await.map(|_| ())
    }

    /// Drops everything this cell keeps of `tenant`: suppressions, idempotency keys, message
    /// records and bodies, figures, parked and held mail.
    pub async fn erase(&self, tenant: &TenantId) -> Result<(), StorageError> {
        let write = Write::Erase {
            tenant: tenant.clone(),
        };
        self.found(write, Commit::Durable).await.map(|_| ())
    }
}
