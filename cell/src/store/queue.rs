//! The embedded queue's table: its messages are rows of the store's file, so the commit of
//! an accept queues the message with its record and its key's answer, all of it or none
//! ([`Store::accepted`]), and its other writes share the store's group commit. What the rows
//! mean (lanes, visibility, receive counts, dead-lettering) is [`crate::queue::local`]'s.

use redb::{ReadableTable, TableDefinition};

use super::{Store, Write, err};
use crate::commit::{Commit, StorageError};

/// (lane, sequence) -> (body, receive count)
pub(super) const QUEUED: TableDefinition<(u8, u64), (&[u8], u32)> = TableDefinition::new("queue");

pub(super) type Queued<'t> = redb::Table<'t, (u8, u64), (&'static [u8], u32)>;

/// Where a message sits in the queue's table: its lane (one per queue) and its sequence.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Slot {
    pub(crate) lane: u8,
    pub(crate) seq: u64,
}

/// A new message and the slot it takes, for the write that queues it.
pub struct Staged {
    pub(crate) slot: Slot,
    pub(crate) body: Vec<u8>,
}

/// A write of the queue's table.
pub(crate) enum QueueWrite {
    /// A new message, not yet received.
    Insert(Staged),
    /// A message received once more: its receive count so far.
    Received {
        slot: Slot,
        count: u32,
    },
    /// A message moved to another slot (a dead-letter queue's), not yet received there.
    Requeue {
        from: Slot,
        to: Slot,
    },
    Remove(Slot),
}

pub(super) fn apply(table: &mut Queued, write: QueueWrite) -> Result<(), StorageError> {
    let missing = || StorageError("queued message vanished from the queue table".into());
    let key = |slot: Slot| (slot.lane, slot.seq);
    match write {
        QueueWrite::Insert(Staged { slot, body }) => {
            table.insert(key(slot), (body.as_slice(), 0)).map_err(err)?;
        }
        QueueWrite::Received { slot, count } => {
            let body = (table.get(key(slot)).map_err(err)?)
                .ok_or_else(missing)?
                .value()
                .0
                .to_vec();
            table
                .insert(key(slot), (body.as_slice(), count))
                .map_err(err)?;
        }
        QueueWrite::Requeue { from, to } => {
            let body = (table.remove(key(from)).map_err(err)?)
                .ok_or_else(missing)?
                .value()
                .0
                .to_vec();
            table.insert(key(to), (body.as_slice(), 0)).map_err(err)?;
        }
        QueueWrite::Remove(slot) => {
            table.remove(key(slot)).map_err(err)?;
        }
    }
    Ok(())
}

impl Store {
    /// Applies the queue's `writes` (in order, usually in one commit); returns once they are
    /// committed as `commit` says.
    pub(crate) async fn queue_writes(
        &self,
        writes: Vec<QueueWrite>,
        commit: Commit,
    ) -> Result<(), StorageError> {
        let writes = writes.into_iter().map(Write::Queue).collect();
        self.writes.submit_many(writes, commit).await.map(|_| ())
    }

    /// Queues the queue's `writes` to be committed lazily, without waiting.
    pub(crate) fn queue_writes_unanswered(
        &self,
        writes: Vec<QueueWrite>,
    ) -> Result<(), StorageError> {
        (self.writes).submit_unanswered(writes.into_iter().map(Write::Queue).collect())
    }

    /// Every queued message's slot and receive count, in slot order.
    pub(crate) fn queued(&self) -> Result<Vec<(Slot, u32)>, StorageError> {
        let read = self.read()?;
        let table = read.open_table(QUEUED).map_err(err)?;
        let mut rows = Vec::new();
        for row in table.iter().map_err(err)? {
            let (key, value) = row.map_err(err)?;
            let (lane, seq) = key.value();
            rows.push((Slot { lane, seq }, value.value().1));
        }
        Ok(rows)
    }

    /// The body of the message in each of `slots` (`None` where none is), in one read.
    pub(crate) fn queued_bodies(
        &self,
        slots: &[Slot],
    ) -> Result<Vec<Option<Vec<u8>>>, StorageError> {
        let read = self.read()?;
        let table = read.open_table(QUEUED).map_err(err)?;
        slots
            .iter()
            .map(|slot| {
                let row = table.get((slot.lane, slot.seq)).map_err(err)?;
                Ok(row.map(|row| row.value().0.to_vec()))
            })
            .collect()
    }
}
