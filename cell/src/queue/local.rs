//! The embedded queue: messages in a table of the cell store's file, the visible/in-flight
//! index in memory.
//!
//! Its rows are the store's (`crate::store`'s queue table) and its writes go through the
//! store's group commit, so every acknowledged send and dead-letter move is fsynced and many
//! concurrent sends share one fsync with the store's own writes. An accepted message is not
//! sent apart: the accept's durable step ([`crate::durable::Embedded`]) stages it
//! ([`LocalQueue::stage`]) and the store commits it with the message's record and the answer
//! for its idempotency key, all or nothing, in one fsync ([`LocalQueue::publish`] then makes
//! it visible). Receive counts and deletes are committed without waiting for an fsync (the
//! next fsync makes them durable): a crash may forget the last of them, so a message comes
//! back once more or counts one receive fewer. Delivery is at least once either way, as on
//! SQS, and consumers settle a message once (the cell's store records what it sent).
//! Visibility is kept in memory only: after a restart every message not deleted is visible
//! again, which is what SQS does for messages whose visibility timeout ran out.

use std::cmp::Reverse;
use std::collections::{BinaryHeap, HashMap, VecDeque};
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::Duration;

use async_trait::async_trait;
use tokio::sync::Notify;
use tokio::time::Instant;

use super::{Delivery, Queue, QueueConfig, QueueError, QueueKind};
use crate::commit::Commit;
use crate::store::{QueueWrite, Slot, Staged, Store};

/// The lane of the store's queue table, and of the index, that holds `kind`.
fn lane_of(kind: QueueKind) -> u8 {
    match kind {
        QueueKind::Transactional => 0,
        QueueKind::Marketing => 1,
        QueueKind::DeadLetter => 2,
        QueueKind::Feedback => 3,
    }
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
    store: Arc<Store>,
    state: Mutex<State>,
    visible: Notify,
    config: QueueConfig,
}

fn parse_receipt(receipt: &str) -> Option<(u64, u32)> {
    let (seq, count) = receipt.split_once('.')?;
    Some((seq.parse().ok()?, count.parse().ok()?))
}

impl LocalQueue {
    /// The queue kept in `store`'s file, with every message it holds visible.
    pub fn open(store: Arc<Store>, config: QueueConfig) -> Result<Self, QueueError> {
        let mut state = State {
            lanes: Default::default(),
            next_seq: 1,
        };
        for (Slot { lane, seq }, count) in store.queued()? {
            let queue = state
                .lanes
                .get_mut(lane as usize)
                .ok_or_else(|| QueueError::Storage(format!("unknown queue {lane}")))?;
            queue.ready.push_back((seq, count));
            state.next_seq = state.next_seq.max(seq + 1);
        }
        Ok(Self {
            store,
            state: Mutex::new(state),
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
    async fn write(&self, writes: Vec<QueueWrite>, commit: Commit) -> Result<(), QueueError> {
        Ok(self.store.queue_writes(writes, commit).await?)
    }

    /// `body`, queued on `kind` by the store write it is handed to; invisible until
    /// [`LocalQueue::publish`] is told that write committed.
    pub fn stage(&self, kind: QueueKind, body: Vec<u8>) -> Staged {
        let seq = {
            let mut state = self.lock();
            state.next_seq += 1;
            state.next_seq - 1
        };
        let slot = Slot {
            lane: lane_of(kind),
            seq,
        };
        Staged { slot, body }
    }

    /// Makes a staged message visible once the write that queued it has committed.
    pub fn publish(&self, slot: Slot) {
        self.lock().lanes[slot.lane as usize]
            .ready
            .push_back((slot.seq, 0));
        self.visible.notify_waiters();
    }

    /// Takes up to `max` visible messages of `kind`, moving the ones received too often to
    /// the dead-letter queue. Returns what it took and when the next in-flight one expires.
    async fn take(
        &self,
        kind: QueueKind,
        max: usize,
        visibility: Duration,
    ) -> Result<(Vec<Delivery>, Option<Instant>), QueueError> {
        let k = lane_of(kind);
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
        let slot = |seq| Slot { lane: k, seq };
        let dead_letter = |seq| Slot {
            lane: lane_of(QueueKind::DeadLetter),
            seq,
        };
        let mut writes: Vec<QueueWrite> = dead
            .iter()
            .map(|&(seq, dead_seq)| QueueWrite::Requeue {
                from: slot(seq),
                to: dead_letter(dead_seq),
            })
            .collect();
        writes.extend(taken.iter().map(|&(seq, count)| QueueWrite::Received {
            slot: slot(seq),
            count,
        }));
        // A dead-letter move is fsynced. Receive counts alone are not, and are not waited
        // for: the index above already counts them, and a count a crash loses only lets a
        // message be received once more before it is dead-lettered. Not waiting keeps
        // delivery from queueing behind every insert's fsync under way.
        if dead.is_empty() {
            self.store.queue_writes_unanswered(writes)?;
        } else {
            self.write(writes, Commit::Durable).await?;
        }
        if !dead.is_empty() {
            tracing::warn!(queue = ?kind, count = dead.len(), "messages received too often; dead-lettered");
            let mut state = self.lock();
            let lane = &mut state.lanes[lane_of(QueueKind::DeadLetter) as usize];
            lane.ready
                .extend(dead.iter().map(|(_, dead_seq)| (*dead_seq, 0)));
        }
        let slots: Vec<Slot> = taken.iter().map(|&(seq, _)| slot(seq)).collect();
        let bodies = self.store.queued_bodies(&slots)?;
        // Absent only if a delete raced this receive with a receipt it cannot have had yet.
        let deliveries = (taken.into_iter().zip(bodies))
            .filter_map(|((seq, count), body)| {
                Some(Delivery {
                    receipt: format!("{seq}.{count}"),
                    body: body?,
                    receive_count: count,
                })
            })
            .collect();
        Ok((deliveries, next_timer))
    }
}

#[async_trait]
impl Queue for LocalQueue {
    async fn send(&self, kind: QueueKind, body: Vec<u8>) -> Result<(), QueueError> {
        let staged = self.stage(kind, body);
        let slot = staged.slot;
        self.write(vec![QueueWrite::Insert(staged)], Commit::Durable)
            .await?;
        self.publish(slot);
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
        let k = lane_of(kind);
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
                .map(|seq| QueueWrite::Remove(Slot { lane: k, seq }))
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
            let lane = &mut state.lanes[lane_of(kind) as usize];
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

    fn open(path: &std::path::Path) -> LocalQueue {
        let store = Arc::new(Store::open(path).unwrap());
        LocalQueue::open(store, QueueConfig::default()).unwrap()
    }

    #[tokio::test]
    async fn deletes_and_receive_counts_survive_a_clean_reopen() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("store.redb");
        let kind = QueueKind::Transactional;
        {
            let queue = open(&path);
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
        let queue = open(&path);
        let again = queue
            .receive(kind, 10, Duration::from_secs(60), Duration::ZERO)
            .await
            .unwrap();
        let bodies: Vec<&[u8]> = again.iter().map(|d| d.body.as_slice()).collect();
        assert_eq!(bodies, [b"kept".as_slice()]);
        assert_eq!(again[0].receive_count, 2, "the first receive was counted");
    }
}
