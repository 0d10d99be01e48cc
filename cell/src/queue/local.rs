//! The embedded queue: messages in one redb file, the visible/in-flight index in memory.
//!
//! Sends, receive counts, dead-letter moves and deletes go through a group commit, so every
//! acknowledged send and dead-letter move is fsynced and many concurrent sends share one
//! fsync. Receive counts and deletes are committed without waiting for an fsync (the next
//! fsync makes them durable): a crash may forget the last of them, so a message comes back
//! once more or counts one receive fewer. Delivery is at least once either way, as on SQS,
//! and consumers settle a message once (the cell's store records what it sent). Visibility
//! is kept in memory only: after a restart every message not deleted is visible again, which
//! is what SQS does for messages whose visibility timeout ran out.

use std::cmp::Reverse;
use std::collections::{BinaryHeap, HashMap, VecDeque};
use std::path::Path;
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::Duration;

use async_trait::async_trait;
use redb::{Database, ReadableDatabase, ReadableTable, TableDefinition, WriteTransaction};
use tokio::sync::Notify;
use tokio::time::Instant;

use super::{Delivery, Queue, QueueConfig, QueueError, QueueKind};
use crate::commit::{Commit, GroupCommit, StorageError};

/// (queue, sequence) -> (body, receive count)
const MESSAGES: TableDefinition<(u8, u64), (&[u8], u32)> = TableDefinition::new("messages");

fn index(kind: QueueKind) -> u8 {
    match kind {
        QueueKind::Transactional => 0,
        QueueKind::Marketing => 1,
        QueueKind::DeadLetter => 2,
        QueueKind::Feedback => 3,
    }
}

enum Write {
    Insert { kind: u8, seq: u64, body: Vec<u8> },
    Received { kind: u8, seq: u64, count: u32 },
    DeadLetter { kind: u8, seq: u64, dead_seq: u64 },
    Remove { kind: u8, seq: u64 },
}

/// Applies a batch of writes, with the table opened once for all of them.
fn apply(txn: &WriteTransaction, writes: Vec<Write>) -> Result<Vec<()>, StorageError> {
    let mut table = txn
        .open_table(MESSAGES)
        .map_err(StorageError::from_display)?;
    writes
        .into_iter()
        .map(|write| apply_one(&mut table, write))
        .collect()
}

type Messages<'t> = redb::Table<'t, (u8, u64), (&'static [u8], u32)>;

fn apply_one(table: &mut Messages, write: Write) -> Result<(), StorageError> {
    let missing = || StorageError("queued message vanished from the queue file".into());
    match write {
        Write::Insert { kind, seq, body } => {
            table
                .insert((kind, seq), (body.as_slice(), 0))
                .map_err(StorageError::from_display)?;
        }
        Write::Received { kind, seq, count } => {
            let body = table
                .get((kind, seq))
                .map_err(StorageError::from_display)?
                .ok_or_else(missing)?
                .value()
                .0
                .to_vec();
            table
                .insert((kind, seq), (body.as_slice(), count))
                .map_err(StorageError::from_display)?;
        }
        Write::DeadLetter {
            kind,
            seq,
            dead_seq,
        } => {
            let body = table
                .remove((kind, seq))
                .map_err(StorageError::from_display)?
                .ok_or_else(missing)?
                .value()
                .0
                .to_vec();
            let dead = index(QueueKind::DeadLetter);
            table
                .insert((dead, dead_seq), (body.as_slice(), 0))
                .map_err(StorageError::from_display)?;
        }
        Write::Remove { kind, seq } => {
            table
                .remove((kind, seq))
                .map_err(StorageError::from_display)?;
        }
    }
    Ok(())
}

#[derive(Default)]
struct Lane {
    /// Visible messages: (sequence, receive count so far).
    ready: VecDeque<(u64, u32)>,
    /// Received, not yet deleted: sequence -> (receive count, visible again at).
    inflight: HashMap<u64, (u32, Instant)>,
    /// When in-flight messages become visible again (stale entries are skipped).
    timers: BinaryHeap<Reverse<(Instant, u64)>>,
}

impl Lane {
    /// Returns every in-flight message whose visibility ran out to `ready`.
    fn expire(&mut self, now: Instant) {
        while let Some(Reverse((at, seq))) = self.timers.peek().copied() {
            if at > now {
                break;
            }
            self.timers.pop();
            if let Some((count, deadline)) = self.inflight.get(&seq).copied()
                && deadline <= now
            {
                self.inflight.remove(&seq);
                self.ready.push_back((seq, count));
            }
        }
    }

    fn next_timer(&self) -> Option<Instant> {
        self.timers.peek().map(|Reverse((at, _))| *at)
    }
}

struct State {
    lanes: [Lane; 4],
    next_seq: u64,
}

pub struct LocalQueue {
    db: Arc<Database>,
    state: Mutex<State>,
    writes: GroupCommit<Write, ()>,
    visible: Notify,
    config: QueueConfig,
}

fn storage(err: impl std::fmt::Display) -> QueueError {
    QueueError::Storage(err.to_string())
}

fn parse_receipt(receipt: &str) -> Option<(u64, u32)> {
    let (seq, count) = receipt.split_once('.')?;
    Some((seq.parse().ok()?, count.parse().ok()?))
}

impl LocalQueue {
    pub fn open(path: &Path, config: QueueConfig) -> Result<Self, QueueError> {
        let db = Arc::new(Database::create(path).map_err(storage)?);
        let txn = db.begin_write().map_err(storage)?;
        txn.open_table(MESSAGES).map_err(storage)?;
        txn.commit().map_err(storage)?;

        let mut state = State {
            lanes: Default::default(),
            next_seq: 1,
        };
        let read = db.begin_read().map_err(storage)?;
        for row in read
            .open_table(MESSAGES)
            .map_err(storage)?
            .iter()
            .map_err(storage)?
        {
            let (key, value) = row.map_err(storage)?;
            let (kind, seq) = key.value();
            let lane = state
                .lanes
                .get_mut(kind as usize)
                .ok_or_else(|| storage(format!("unknown queue {kind}")))?;
            lane.ready.push_back((seq, value.value().1));
            state.next_seq = state.next_seq.max(seq + 1);
        }
        let writes = GroupCommit::start("queue", db.clone(), apply).map_err(storage)?;
        Ok(Self {
            db,
            state: Mutex::new(state),
            writes,
            visible: Notify::new(),
            config,
        })
    }

    fn lock(&self) -> MutexGuard<'_, State> {
        // The index is only changed by whole statements that cannot panic halfway.
        self.state
            .lock()
            .unwrap_or_else(|poisoned| poisoned.into_inner())
    }

    /// Commits `writes`; returns once they are committed as `commit` says.
    async fn write(&self, writes: Vec<Write>, commit: Commit) -> Result<(), QueueError> {
        self.writes
            .submit_many(writes, commit)
            .await
            .map(|_| ())
            .map_err(|e| QueueError::Storage(e.0))
    }

    /// Takes up to `max` visible messages of `kind`, moving the ones received too often to
    /// the dead-letter queue. Returns what it took and when the next in-flight one expires.
    async fn take(
        &self,
        kind: QueueKind,
        max: usize,
        visibility: Duration,
    ) -> Result<(Vec<Delivery>, Option<Instant>), QueueError> {
        let k = index(kind);
        let now = Instant::now();
        let (taken, dead, next_timer) = {
            let mut state = self.lock();
            let max_receives = self.config.max_receives;
            let mut taken = Vec::new();
            let mut dead = Vec::new();
            while taken.len() < max {
                let lane = &mut state.lanes[k as usize];
                lane.expire(now);
                let Some((seq, count)) = lane.ready.pop_front() else {
                    break;
                };
                let count = count + 1;
                if kind != QueueKind::DeadLetter && count > max_receives {
                    state.next_seq += 1;
                    dead.push((seq, state.next_seq - 1));
                } else {
                    let lane = &mut state.lanes[k as usize];
                    lane.inflight.insert(seq, (count, now + visibility));
                    lane.timers.push(Reverse((now + visibility, seq)));
                    taken.push((seq, count));
                }
            }
            let next_timer = state.lanes[k as usize].next_timer();
            (taken, dead, next_timer)
        };
        let mut writes: Vec<Write> = dead
            .iter()
            .map(|&(seq, dead_seq)| Write::DeadLetter {
                kind: k,
                seq,
                dead_seq,
            })
            .collect();
        writes.extend(taken.iter().map(|&(seq, count)| Write::Received {
            kind: k,
            seq,
            count,
        }));
        // A dead-letter move is fsynced. Receive counts alone are not, and are not waited
        // for: the index above already counts them, and a count a crash loses only lets a
        // message be received once more before it is dead-lettered. Not waiting keeps
        // delivery from queueing behind every insert's fsync under way.
        if dead.is_empty() {
            (self.writes)
                .submit_unanswered(writes)
                .map_err(|e| QueueError::Storage(e.0))?;
        } else {
            self.write(writes, Commit::Durable).await?;
        }
        if !dead.is_empty() {
            tracing::warn!(queue = ?kind, count = dead.len(), "messages received too often; dead-lettered");
            let mut state = self.lock();
            let lane = &mut state.lanes[index(QueueKind::DeadLetter) as usize];
            lane.ready
                .extend(dead.iter().map(|(_, dead_seq)| (*dead_seq, 0)));
        }
        let read = self.db.begin_read().map_err(storage)?;
        let table = read.open_table(MESSAGES).map_err(storage)?;
        let mut deliveries = Vec::with_capacity(taken.len());
        for (seq, count) in taken {
            // Absent only if a delete raced this receive with a receipt it cannot have had yet.
            if let Some(row) = table.get((k, seq)).map_err(storage)? {
                deliveries.push(Delivery {
                    receipt: format!("{seq}.{count}"),
                    body: row.value().0.to_vec(),
                    receive_count: count,
                });
            }
        }
        Ok((deliveries, next_timer))
    }
}

#[async_trait]
impl Queue for LocalQueue {
    async fn send(&self, kind: QueueKind, body: Vec<u8>) -> Result<(), QueueError> {
        let k = index(kind);
        let seq = {
            let mut state = self.lock();
            state.next_seq += 1;
            state.next_seq - 1
        };
        self.write(vec![Write::Insert { kind: k, seq, body }], Commit::Durable)
            .await?;
        self.lock().lanes[k as usize].ready.push_back((seq, 0));
        self.visible.notify_waiters();
        Ok(())
    }

    async fn receive(
        &self,
        kind: QueueKind,
        max: usize,
        visibility: Duration,
        wait: Duration,
    ) -> Result<Vec<Delivery>, QueueError> {
        let deadline = Instant::now() + wait;
        loop {
            let notified = self.visible.notified();
            tokio::pin!(notified);
            notified.as_mut().enable();
            let (deliveries, next_timer) = self.take(kind, max, visibility).await?;
            if !deliveries.is_empty() || Instant::now() >= deadline {
                return Ok(deliveries);
            }
            let wake = next_timer.map_or(deadline, |t| t.min(deadline));
            tokio::select! {
                () = notified => {}
                () = tokio::time::sleep_until(wake) => {}
            }
        }
    }

    async fn delete(&self, kind: QueueKind, receipts: &[String]) -> Result<(), QueueError> {
        let k = index(kind);
        let current: Vec<u64> = {
            let mut state = self.lock();
            let lane = &mut state.lanes[k as usize];
            let mut current = Vec::with_capacity(receipts.len());
            for (seq, count) in receipts.iter().filter_map(|r| parse_receipt(r)) {
                if lane.inflight.get(&seq).is_some_and(|(c, _)| *c == count) {
                    lane.inflight.remove(&seq);
                    current.push(seq);
                }
            }
            current
        };
        self.write(
            current
                .into_iter()
                .map(|seq| Write::Remove { kind: k, seq })
                .collect(),
            Commit::Lazy,
        )
        .await
    }

    async fn change_visibility(
        &self,
        kind: QueueKind,
        receipt: &str,
        visibility: Duration,
    ) -> Result<(), QueueError> {
        let invalid = || QueueError::ReceiptInvalid(receipt.to_owned());
        let (seq, count) = parse_receipt(receipt).ok_or_else(invalid)?;
        let at = Instant::now() + visibility;
        {
            let mut state = self.lock();
            let lane = &mut state.lanes[index(kind) as usize];
            match lane.inflight.get_mut(&seq) {
                Some((c, deadline)) if *c == count => *deadline = at,
                _ => return Err(invalid()),
            }
            lane.timers.push(Reverse((at, seq)));
        }
        self.visible.notify_waiters();
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn receipts_parse_only_in_their_own_shape() {
        assert_eq!(parse_receipt("12.3"), Some((12, 3)));
        assert_eq!(parse_receipt("12"), None);
        assert_eq!(parse_receipt("a.b"), None);
    }

    #[tokio::test]
    async fn deletes_and_receive_counts_survive_a_clean_reopen() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("queue.redb");
        let kind = QueueKind::Transactional;
        {
            let queue = LocalQueue::open(&path, QueueConfig::default()).unwrap();
            for body in [b"kept".to_vec(), b"deleted".to_vec()] {
                queue.send(kind, body).await.unwrap();
            }
            let received = queue
                .receive(kind, 10, Duration::from_secs(60), Duration::ZERO)
                .await
                .unwrap();
            assert_eq!(received.len(), 2);
            let deleted = received.iter().find(|d| d.body == b"deleted").unwrap();
            queue
                .delete(kind, std::slice::from_ref(&deleted.receipt))
                .await
                .unwrap();
        }
        let queue = LocalQueue::open(&path, QueueConfig::default()).unwrap();
        let again = queue
            .receive(kind, 10, Duration::from_secs(60), Duration::ZERO)
            .await
            .unwrap();
        let bodies: Vec<&[u8]> = again.iter().map(|d| d.body.as_slice()).collect();
        assert_eq!(bodies, [b"kept".as_slice()]);
        assert_eq!(again[0].receive_count, 2, "the first receive was counted");
    }
}
