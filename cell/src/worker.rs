//! Delivery workers: pull batches from the cell's queues (transactional first), send each
//! message through the mailer, and settle it.
//!
//! A message already recorded as sent is only deleted (a redelivery after a crash). A
//! retryable failure puts the message back with exponential backoff and jitter; a permanent
//! one records the reason and moves the message to the dead-letter queue. Nothing is deleted
//! before its outcome is durable.

use std::collections::HashSet;
use std::sync::{Arc, Mutex};

use std::time::{Duration, Instant};

use cellmail_proto::{CellId, MessageId};
use rand::Rng;
use tokio_util::sync::CancellationToken;
use tracing::Instrument;

use crate::accept::now_ms;
use crate::breaker::Gate;
use crate::mailer::{Mailer, MailerError};
use crate::message::Message;
use crate::message::{BodyRef, EventKind, MessageState};
use crate::queue::{Delivery, Queue, QueueKind};
use crate::store::{self, Store};

const BATCH: usize = 10;
/// How long a received message stays invisible while a worker sends it.
const VISIBILITY: Duration = Duration::from_secs(60);
/// How long an idle worker long-polls the transactional queue before looking at marketing.
const IDLE_WAIT: Duration = Duration::from_millis(50);
const MAX_BACKOFF: Duration = Duration::from_secs(300);

/// The delivery side of a cell, shared by all its worker tasks.
pub struct Worker {
    cell: CellId,
    store: Arc<Store>,
    queue: Arc<dyn Queue>,
    mailer: Arc<dyn Mailer>,
    /// Which tenants' classes are paused by their breakers: their mail is held.
    gate: Arc<dyn Gate>,
    /// Until when the transport has paused all sending (every task waits, receiving nothing,
    /// so held mail does not count receives towards the dead-letter queue).
    paused_until: Mutex<Option<Instant>>,
    /// Message ids some task is sending right now: a message queued twice (a retry after a
    /// crash between queueing and recording the answer) is sent by one task only.
    sending: Mutex<HashSet<MessageId>>,
}

/// A task's exclusive right to send one message id, released when dropped.
struct Claim<'a> {
    sending: &'a Mutex<HashSet<MessageId>>,
    id: MessageId,
}

impl Drop for Claim<'_> {
    fn drop(&mut self) {
        self.sending
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .remove(&self.id);
    }
}

/// Exponential in the receive count, capped, with up to 50% added jitter.
pub fn backoff(receive_count: u32, jitter: f64) -> Duration {
    let base = Duration::from_secs(1u64 << receive_count.min(9)).min(MAX_BACKOFF);
    base.mul_f64(1.0 + jitter.clamp(0.0, 1.0) / 2.0)
}

impl Worker {
    pub fn new(
        cell: CellId,
        store: Arc<Store>,
        queue: Arc<dyn Queue>,
        mailer: Arc<dyn Mailer>,
        gate: Arc<dyn Gate>,
    ) -> Self {
        Self {
            cell,
            paused_until: Mutex::new(None),
            store,
            queue,
            mailer,
            gate,
            sending: Mutex::new(HashSet::new()),
        }
    }

    /// How long sending stays paused, if it is.
    fn pause_left(&self) -> Option<Duration> {
        let until = (*self.paused_until.lock().unwrap_or_else(|p| p.into_inner()))?;
        until
            .checked_duration_since(Instant::now())
            .filter(|left| !left.is_zero())
    }

    fn claim(&self, id: MessageId) -> Option<Claim<'_>> {
        let fresh = self
            .sending
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .insert(id);
        fresh.then_some(Claim {
            sending: &self.sending,
            id,
        })
    }

    pub async fn run(self: Arc<Self>, shutdown: CancellationToken) {
        while !shutdown.is_cancelled() {
            if let Some(left) = self.pause_left() {
                tokio::select! {
                    () = shutdown.cancelled() => return,
                    () = tokio::time::sleep(left) => continue,
                }
            }
            let batch = tokio::select! {
                () = shutdown.cancelled() => return,
                batch = self.next_batch() => batch,
            };
            match batch {
                Ok(Some((kind, deliveries))) => self.settle_batch(kind, deliveries).await,
                Ok(None) => {}
                Err(err) => {
                    tracing::warn!(%err, "receiving from the queue failed");
                    tokio::time::sleep(Duration::from_millis(500)).await;
                }
            }
        }
    }

    async fn next_batch(
        &self,
    ) -> Result<Option<(QueueKind, Vec<Delivery>)>, crate::queue::QueueError> {
        let waits = [
            (QueueKind::Transactional, IDLE_WAIT),
            (QueueKind::Marketing, Duration::ZERO),
        ];
        for (kind, wait) in waits {
            let deliveries = self.queue.receive(kind, BATCH, VISIBILITY, wait).await?;
            if !deliveries.is_empty() {
                return Ok(Some((kind, deliveries)));
            }
        }
        Ok(None)
    }

    async fn settle_batch(&self, kind: QueueKind, deliveries: Vec<Delivery>) {
        let mut done = Vec::with_capacity(deliveries.len());
        for delivery in deliveries {
            match self.settle(kind, &delivery).await {
                Ok(true) => done.push(delivery.receipt),
                Ok(false) => {}
                // Left in flight: it becomes visible again after its timeout and is retried.
                Err(err) => tracing::error!(%err, "settling a message failed; it will be retried"),
            }
        }
        if let Err(err) = self.queue.delete(kind, &done).await {
            tracing::error!(%err, "deleting sent messages failed; they will be redelivered and skipped");
        }
    }

    /// The message a queued body carries (itself, or a reference to its copy in the store)
    /// and whether it came by reference; `None` for a reference to a message already sent.
    fn decode(&self, body: &[u8]) -> anyhow::Result<Option<(Message, bool)>> {
        let Ok(BodyRef { body_ref }) = serde_json::from_slice(body) else {
            return Ok(Some((serde_json::from_slice(body)?, false)));
        };
        match self.store.body(body_ref)? {
            Some(stored) => Ok(Some((serde_json::from_slice(&stored)?, true))),
            None if self.store.settled(body_ref)? => Ok(None),
            None => anyhow::bail!("the stored body of message {body_ref} is missing"),
        }
    }

    /// Sends one message; `Ok(true)` when it may be deleted from its queue.
    async fn settle(&self, kind: QueueKind, delivery: &Delivery) -> anyhow::Result<bool> {
        let (message, by_reference) = match self.decode(&delivery.body) {
            Ok(Some(decoded)) => decoded,
            // A reference to a message already sent, whose stored body was dropped.
            Ok(None) => return Ok(true),
            Err(err) => {
                tracing::error!(%err, "unreadable queued message; dead-lettering it");
                self.queue
                    .send(QueueKind::DeadLetter, delivery.body.clone())
                    .await?;
                return Ok(true);
            }
        };
        if let Some(left) = self.pause_left() {
            self.queue
                .change_visibility(kind, &delivery.receipt, left)
                .await?;
            return Ok(false);
        }
        // Another task is sending this id: leave this copy in flight. When it is visible
        // again its outcome is recorded and it is only deleted.
        let Some(_claim) = self.claim(message.id) else {
            return Ok(false);
        };
        if self.store.settled(message.id)? {
            return Ok(true);
        }
        if self.gate.paused(&message.tenant, message.class) {
            self.store
                .hold(message.queued_record(), delivery.body.clone(), now_ms())
                .await?;
            metrics::counter!("cellmail_held_total", "cell" => self.cell.to_string(), "class" => message.class.as_str()).increment(1);
            return Ok(true);
        }
        let span =
            tracing::info_span!("deliver", tenant = %message.tenant, message_id = %message.id);
        let sent = self.mailer.send(&message).instrument(span).await;
        let outcome = match &sent {
            Ok(()) => "sent",
            Err(MailerError::Retryable { .. }) => "retried",
            Err(MailerError::Permanent { .. }) => "failed",
            Err(MailerError::Paused { .. }) => "paused",
        };
        let (cell, class) = (self.cell.to_string(), message.class.as_str());
        metrics::counter!("cellmail_send_attempts_total", "cell" => cell, "class" => class, "outcome" => outcome).increment(1);
        match sent {
            Ok(()) => {
                let sent = store::event(EventKind::Sent, now_ms(), "");
                self.store
                    .record_outcome(message.queued_record(), MessageState::Sent, sent)
                    .await?;
                if by_reference {
                    self.store.drop_body(message.id).await?;
                }
                Ok(true)
            }
            Err(MailerError::Retryable {
                reason,
                retry_after,
            }) => {
                let delay = retry_after
                    .unwrap_or_else(|| backoff(delivery.receive_count, rand::rng().random()));
                tracing::warn!(%reason, ?delay, attempt = delivery.receive_count, "send failed; retrying later");
                self.queue
                    .change_visibility(kind, &delivery.receipt, delay)
                    .await?;
                Ok(false)
            }
            Err(MailerError::Paused {
                reason,
                retry_after,
            }) => {
                tracing::error!(cell = %self.cell, %reason, ?retry_after, "ALARM: the mail transport paused all sending; this cell holds its mail");
                metrics::counter!("cellmail_sending_paused_total", "cell" => self.cell.to_string())
                    .increment(1);
                *self.paused_until.lock().unwrap_or_else(|p| p.into_inner()) =
                    Some(Instant::now() + retry_after);
                self.queue
                    .change_visibility(kind, &delivery.receipt, retry_after)
                    .await?;
                Ok(false)
            }
            Err(MailerError::Permanent { reason }) => {
                tracing::warn!(%reason, "send refused permanently; dead-lettering");
                let failed = store::event(EventKind::Failed, now_ms(), reason);
                self.store
                    .record_outcome(message.queued_record(), MessageState::Failed, failed)
                    .await?;
                self.queue
                    .send(QueueKind::DeadLetter, delivery.body.clone())
                    .await?;
                Ok(true)
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    use std::sync::atomic::{AtomicU32, Ordering};

    use async_trait::async_trait;

    use cellmail_proto::{MessageClass, TenantId};

    use crate::message::sample::message;
    use crate::queue::QueueConfig;
    use crate::queue::local::LocalQueue;

    /// Fails its first `throttled` sends as SES does when throttling, then takes `delay`
    /// per send and counts them.
    struct Throttled {
        throttled: AtomicU32,
        sent: AtomicU32,
        delay: Duration,
    }

    #[async_trait]
    impl Mailer for Throttled {
        async fn send(&self, _message: &Message) -> Result<(), MailerError> {
            let left = self.throttled.load(Ordering::SeqCst);
            if left > 0 {
                self.throttled.store(left - 1, Ordering::SeqCst);
                return Err(MailerError::Retryable {
                    reason: "Throttling: Maximum sending rate exceeded".into(),
                    retry_after: None,
                });
            }
            tokio::time::sleep(self.delay).await;
            self.sent.fetch_add(1, Ordering::SeqCst);
            Ok(())
        }
    }

    /// Pauses the classes in its set.
    #[derive(Default)]
    struct Paused(Mutex<HashSet<(TenantId, MessageClass)>>);

    impl Gate for Paused {
        fn paused(&self, tenant: &TenantId, class: MessageClass) -> bool {
            self.0.lock().unwrap().contains(&(tenant.clone(), class))
        }
    }

    /// Runs 4 worker tasks until the token is cancelled.
    fn spawn(
        store: &Arc<Store>,
        queue: &Arc<dyn Queue>,
        mailer: Arc<dyn Mailer>,
        gate: Arc<dyn Gate>,
    ) -> (CancellationToken, Vec<tokio::task::JoinHandle<()>>) {
        let worker = Arc::new(Worker::new(
            CellId::new("c").unwrap(),
            store.clone(),
            queue.clone(),
            mailer,
            gate,
        ));
        let shutdown = CancellationToken::new();
        let tasks = (0..4)
            .map(|_| tokio::spawn(worker.clone().run(shutdown.clone())))
            .collect();
        (shutdown, tasks)
    }

    /// Queues `copies` of one message, the later ones once the first is being sent, and
    /// runs 4 worker tasks until it is sent.
    async fn deliver(throttled: u32, copies: usize) -> (u32, Arc<Store>, MessageId) {
        let dir = tempfile::tempdir().unwrap();
        let store = Arc::new(Store::open(&dir.path().join("store.redb")).unwrap());
        let queue: Arc<dyn Queue> = Arc::new(
            LocalQueue::open(&dir.path().join("queue.redb"), QueueConfig::default()).unwrap(),
        );
        let mailer = Arc::new(Throttled {
            throttled: AtomicU32::new(throttled),
            sent: AtomicU32::new(0),
            delay: Duration::from_millis(400),
        });
        let message = message();
        let body = serde_json::to_vec(&message).unwrap();
        let (shutdown, tasks) = spawn(&store, &queue, mailer.clone(), Arc::new(Paused::default()));
        for _ in 0..copies {
            queue
                .send(QueueKind::Transactional, body.clone())
                .await
                .unwrap();
            tokio::time::sleep(Duration::from_millis(100)).await;
        }

        let deadline = std::time::Instant::now() + Duration::from_secs(20);
        while !store.settled(message.id).unwrap() && std::time::Instant::now() < deadline {
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        // Give any second copy the time to be (wrongly) sent too.
        tokio::time::sleep(Duration::from_millis(300)).await;
        shutdown.cancel();
        for task in tasks {
            task.await.unwrap();
        }
        (mailer.sent.load(Ordering::SeqCst), store, message.id)
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn throttling_leads_to_retries_not_loss() {
        let (sent, store, id) = deliver(1, 1).await;
        assert_eq!(sent, 1);
        assert!(store.settled(id).unwrap());
    }

    /// Pauses all sending for `pause` on its first call, then records when each send came.
    struct PausesOnce {
        pause: Duration,
        calls: Mutex<Vec<Instant>>,
    }

    #[async_trait]
    impl Mailer for PausesOnce {
        async fn send(&self, _message: &Message) -> Result<(), MailerError> {
            let mut calls = self.calls.lock().unwrap();
            calls.push(Instant::now());
            if calls.len() == 1 {
                return Err(MailerError::Paused {
                    reason: "SendingPausedException".into(),
                    retry_after: self.pause,
                });
            }
            Ok(())
        }
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn a_paused_transport_stops_the_cells_sending_and_nothing_is_lost() {
        let dir = tempfile::tempdir().unwrap();
        let store = Arc::new(Store::open(&dir.path().join("store.redb")).unwrap());
        let queue: Arc<dyn Queue> = Arc::new(
            LocalQueue::open(&dir.path().join("queue.redb"), QueueConfig::default()).unwrap(),
        );
        let pause = Duration::from_millis(300);
        let mailer = Arc::new(PausesOnce {
            pause,
            calls: Mutex::new(Vec::new()),
        });
        let messages: Vec<Message> = (0..3).map(|_| message()).collect();
        for m in &messages {
            queue
                .send(QueueKind::Transactional, serde_json::to_vec(m).unwrap())
                .await
                .unwrap();
        }
        let (shutdown, tasks) = spawn(&store, &queue, mailer.clone(), Arc::new(Paused::default()));
        let deadline = Instant::now() + Duration::from_secs(20);
        while !messages.iter().all(|m| store.settled(m.id).unwrap()) && Instant::now() < deadline {
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        shutdown.cancel();
        for task in tasks {
            task.await.unwrap();
        }
        assert!(
            messages.iter().all(|m| store.settled(m.id).unwrap()),
            "every message was sent after the pause"
        );
        let calls = mailer.calls.lock().unwrap().clone();
        assert_eq!(
            calls.len(),
            4,
            "the paused attempt and one send per message"
        );
        assert!(
            calls[1..].iter().all(|at| *at >= calls[0] + pause),
            "nothing was sent during the pause"
        );
    }

    /// Sends and counts, as fast as it is called.
    #[derive(Default)]
    struct Counting(Mutex<Vec<MessageId>>);

    #[async_trait]
    impl Mailer for Counting {
        async fn send(&self, message: &Message) -> Result<(), MailerError> {
            self.0.lock().unwrap().push(message.id);
            Ok(())
        }
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn a_paused_class_is_held_in_the_store_and_everything_else_is_sent() {
        let dir = tempfile::tempdir().unwrap();
        let store = Arc::new(Store::open(&dir.path().join("store.redb")).unwrap());
        let queue: Arc<dyn Queue> = Arc::new(
            LocalQueue::open(&dir.path().join("queue.redb"), QueueConfig::default()).unwrap(),
        );
        let mut marketing = message();
        marketing.class = MessageClass::Marketing;
        let transactional = message();
        let mut other = message();
        other.class = MessageClass::Marketing;
        other.tenant = TenantId::new("other").unwrap();
        let gate = Arc::new(Paused::default());
        gate.0
            .lock()
            .unwrap()
            .insert((marketing.tenant.clone(), MessageClass::Marketing));
        for m in [&marketing, &transactional, &other] {
            queue
                .send(m.class.into(), serde_json::to_vec(m).unwrap())
                .await
                .unwrap();
        }
        let mailer = Arc::new(Counting::default());
        let (shutdown, tasks) = spawn(&store, &queue, mailer.clone(), gate);
        let deadline = Instant::now() + Duration::from_secs(20);
        while store
            .held(&marketing.tenant, MessageClass::Marketing, 10)
            .unwrap()
            .is_empty()
            || mailer.0.lock().unwrap().len() < 2
        {
            assert!(Instant::now() < deadline, "nothing was held or sent");
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        shutdown.cancel();
        for task in tasks {
            task.await.unwrap();
        }
        let sent = mailer.0.lock().unwrap().clone();
        assert_eq!(sent.len(), 2);
        assert!(sent.contains(&transactional.id) && sent.contains(&other.id));
        let held = store
            .held(&marketing.tenant, MessageClass::Marketing, 10)
            .unwrap();
        assert_eq!(held.len(), 1);
        assert_eq!(held[0].0, marketing.id);
        let record = store
            .message(&marketing.tenant, marketing.id)
            .unwrap()
            .unwrap();
        assert_eq!(record.state, MessageState::Held);
        assert!(
            queue
                .receive(QueueKind::Marketing, 10, VISIBILITY, Duration::ZERO)
                .await
                .unwrap()
                .is_empty(),
            "the held message left the queue"
        );
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn a_message_queued_twice_is_sent_once() {
        let (sent, _, _) = deliver(0, 2).await;
        assert_eq!(sent, 1);
    }

    #[test]
    fn backoff_grows_is_capped_and_jittered() {
        assert_eq!(backoff(1, 0.0), Duration::from_secs(2));
        assert_eq!(backoff(3, 0.0), Duration::from_secs(8));
        assert_eq!(backoff(3, 1.0), Duration::from_secs(12));
        assert_eq!(backoff(30, 0.0), MAX_BACKOFF);
    }
}
