//! Delivery. One intake task pulls batches from the cell's queues (transactional first) into
//! per-tenant lanes; sender tasks take from the lanes in their fair order ([`crate::lanes`]:
//! transactional before marketing, tenants in turn by their tier's weight). A lane holds at
//! most [`LANE_CAP`] messages: what a tenant queued beyond that is parked in the cell store
//! (and deleted from the queue) and loaded back in order as its lane drains, so one tenant's
//! backlog never stands in front of another tenant's mail.
//! Mail of a class its tenant's breaker paused is parked as held, and loaded again once the
//! breaker is resumed. When the transport pauses one tenant alone (SES paused its
//! configuration set or SES tenant), its breakers are tripped as the transport's
//! ([`Holds`]): its mail is held like a breaker's, and the cell's other tenants send on. When
//! it pauses the whole account, the cell stops sending for the pause.
//!
//! A message already recorded as sent is only deleted (a redelivery after a crash). A
//! retryable failure tries the message again later with exponential backoff and jitter (a
//! queued one by its visibility timeout, a parked one by its not-before time); a permanent
//! failure, or a parked message's last attempt, records the reason and moves the message to
//! the dead-letter queue. Nothing is deleted before its outcome is durable.

use std::collections::HashSet;
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::{Duration, Instant};

use cellmail_proto::{CellId, MessageClass, MessageId, TenantId, now_ms};
use rand::Rng;
use tokio::sync::Notify;
use tokio_util::sync::CancellationToken;
use tracing::Instrument;

use crate::breaker::{Gate, Holds};
use crate::health::{self, Health};
use crate::lanes::Lanes;
use crate::mailer::{Mailer, MailerError};
use crate::message::Message;
use crate::message::{BodyRef, EventKind, MessageState};
use crate::queue::{Delivery, Queue, QueueKind};
use crate::store::{self, Parked, Store};

const BATCH: usize = 10;
/// How long a received message stays invisible while it waits in its lane and is sent.
const VISIBILITY: Duration = Duration::from_secs(60);
/// How long intake long-polls the transactional queue before looking at marketing, and how
/// long an idle sender waits before looking at the lanes again.
const IDLE_WAIT: Duration = Duration::from_millis(50);
const MAX_BACKOFF: Duration = Duration::from_secs(300);
/// Messages one tenant's lane holds for one class; more are parked in the store. A tenant's
/// burst up to this size waits in memory, where the lanes take turns, instead of being
/// parked first (a store write for every batch received) in front of the next tenant's mail.
pub const LANE_CAP: usize = 256;
/// Messages all lanes hold together; intake waits for room beyond this.
const BUFFER: usize = 512;
/// Attempts of a parked message before it is dead-lettered, as the queues' redrive does.
const MAX_ATTEMPTS: u32 = 5;
/// When a message whose tenant the transport paused comes back (and is held, once its
/// tenant's breakers show tripped).
const TENANT_PAUSED_RETRY: Duration = Duration::from_secs(1);

/// Where a message in a lane came from, which says how it is settled.
enum Source {
    Queue {
        kind: QueueKind,
        receipt: String,
        receive_count: u32,
    },
    Parked {
        attempts: u32,
    },
}

impl Source {
    /// Attempts made before this one.
    fn attempts(&self) -> u32 {
        match self {
            Source::Queue { receive_count, .. } => receive_count.saturating_sub(1),
            Source::Parked { attempts } => *attempts,
        }
    }
}

/// A message waiting in its lane, with its queued form.
struct Item {
    message: Message,
    body: Vec<u8>,
    by_reference: bool,
    source: Source,
}

/// The delivery side of a cell, shared by its intake and sender tasks.
pub struct Worker {
    cell: CellId,
    store: Arc<Store>,
    queue: Arc<dyn Queue>,
    mailer: Arc<dyn Mailer>,
    /// Which tenants' classes are paused by their breakers, and each tenant's weight.
    gate: Arc<dyn Gate>,
    /// Holds a tenant's mail when the transport pauses that tenant alone.
    holds: Arc<dyn Holds>,
    /// Attempts, failures and dead letters, for the cell's health report.
    health: Arc<Health>,
    lanes: Mutex<Lanes<Item>>,
    /// A message was put in a lane.
    ready: Notify,
    /// A message was taken from a lane.
    room: Notify,
    /// Until when the transport has paused all sending (intake receives nothing meanwhile,
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

/// Exponential in the attempt, capped, with up to 50% added jitter.
pub fn backoff(attempt: u32, jitter: f64) -> Duration {
    let base = Duration::from_secs(1u64 << attempt.min(9)).min(MAX_BACKOFF);
    base.mul_f64(1.0 + jitter.clamp(0.0, 1.0) / 2.0)
}

impl Worker {
    pub fn new(
        cell: CellId,
        store: Arc<Store>,
        queue: Arc<dyn Queue>,
        mailer: Arc<dyn Mailer>,
        (gate, holds): (Arc<dyn Gate>, Arc<dyn Holds>),
        health: Arc<Health>,
    ) -> Self {
        Self {
            cell,
            health,
            holds,
            paused_until: Mutex::new(None),
            store,
            queue,
            mailer,
            gate,
            lanes: Mutex::new(Lanes::default()),
            ready: Notify::new(),
            room: Notify::new(),
            sending: Mutex::new(HashSet::new()),
        }
    }

    /// Stops all of the cell's sending for `pause`: the transport paused the account.
    pub fn pause_all(&self, reason: &str, pause: Duration) {
        tracing::error!(cell = %self.cell, %reason, ?pause, "ALARM: the mail transport paused all sending; this cell holds its mail");
        metrics::counter!("cellmail_sending_paused_total", "cell" => self.cell.to_string())
            .increment(1);
        *self.paused_until.lock().unwrap_or_else(|p| p.into_inner()) = Some(Instant::now() + pause);
    }

    fn lanes(&self) -> MutexGuard<'_, Lanes<Item>> {
        // Only plain map and counter updates happen under this lock; none can panic halfway.
        self.lanes.lock().unwrap_or_else(|p| p.into_inner())
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

    /// Waits for `wake`, at most `IDLE_WAIT`; false once `shutdown` is cancelled.
    async fn idle(wake: &Notify, shutdown: &CancellationToken) -> bool {
        tokio::select! {
            () = shutdown.cancelled() => false,
            () = wake.notified() => true,
            () = tokio::time::sleep(IDLE_WAIT) => true,
        }
    }

    /// The intake task: fills the lanes from the queues and the store until `shutdown`.
    pub async fn intake(self: Arc<Self>, shutdown: CancellationToken) {
        match self.store.parked_lanes() {
            Ok(parked) => self
                .lanes()
                .parked
                .extend(parked.into_iter().map(|(tenant, class)| (class, tenant))),
            Err(err) => tracing::error!(%err, "reading the parked lanes failed"),
        }
        while !shutdown.is_cancelled() {
            if let Some(left) = self.pause_left() {
                tokio::select! {
                    () = shutdown.cancelled() => return,
                    () = tokio::time::sleep(left) => continue,
                }
            }
            if self.lanes().buffered() >= BUFFER {
                if !Self::idle(&self.room, &shutdown).await {
                    return;
                }
                continue;
            }
            if let Err(err) = self.refill().await {
                tracing::warn!(%err, "loading parked mail failed; retrying");
            }
            let batch = tokio::select! {
                () = shutdown.cancelled() => return,
                batch = self.next_batch() => batch,
            };
            match batch {
                Ok(Some((kind, deliveries))) => {
                    if let Err(err) = self.admit(kind, deliveries).await {
                        // Left in flight: they come back after their visibility timeout.
                        tracing::error!(%err, "taking in received mail failed; it will be received again");
                    }
                }
                Ok(None) => {}
                Err(err) => {
                    tracing::warn!(%err, "receiving from the queue failed");
                    tokio::time::sleep(Duration::from_millis(500)).await;
                }
            }
        }
    }

    /// A sender task: sends from the lanes until `shutdown`.
    pub async fn run(self: Arc<Self>, shutdown: CancellationToken) {
        while !shutdown.is_cancelled() {
            if let Some(left) = self.pause_left() {
                tokio::select! {
                    () = shutdown.cancelled() => return,
                    () = tokio::time::sleep(left) => continue,
                }
            }
            if self.lanes().buffered() == 0 {
                if !Self::idle(&self.ready, &shutdown).await {
                    return;
                }
                continue;
            }
            // The transport's turn first, then the lanes' next message in their fair order.
            self.mailer.turn().await;
            let Some(item) = self.lanes().pop() else {
                continue;
            };
            self.room.notify_one();
            let parked = matches!(item.source, Source::Parked { .. }).then_some(item.message.id);
            if let Err(err) = self.settle(item).await {
                tracing::error!(%err, "settling a message failed; it will be retried");
            }
            if let Some(id) = parked {
                self.lanes().loaded.remove(&id);
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

    /// Puts received messages in their lanes, or parks them: held when their class is
    /// paused, overflow when their lane is full or already has parked mail (which goes first).
    async fn admit(&self, kind: QueueKind, deliveries: Vec<Delivery>) -> anyhow::Result<()> {
        let (mut done, mut parked) = (Vec::new(), Vec::new());
        for delivery in deliveries {
            let (message, by_reference) = match self.decode(&delivery.body) {
                Ok(Some(decoded)) => decoded,
                Ok(None) => {
                    done.push(delivery.receipt);
                    continue;
                }
                Err(err) => {
                    tracing::error!(%err, "unreadable queued message; dead-lettering it");
                    self.queue
                        .send(QueueKind::DeadLetter, delivery.body.clone())
                        .await?;
                    done.push(delivery.receipt);
                    continue;
                }
            };
            if self.store.settled(message.id)? {
                done.push(delivery.receipt);
                continue;
            }
            let (class, tenant) = (message.class, message.tenant.clone());
            let held = self.gate.paused(&tenant, class);
            let full = {
                let lanes = self.lanes();
                lanes.len(class, &tenant) >= LANE_CAP
                    || lanes.parked.contains(&(class, tenant.clone()))
            };
            if held || full {
                let form = Parked {
                    not_before_ms: 0,
                    attempts: delivery.receive_count.saturating_sub(1),
                    body: delivery.body,
                };
                parked.push((message.queued_record(), form, held));
                done.push(delivery.receipt);
                continue;
            }
            let weight = self.gate.weight(&tenant);
            let source = Source::Queue {
                kind,
                receipt: delivery.receipt,
                receive_count: delivery.receive_count,
            };
            let item = Item {
                message,
                body: delivery.body,
                by_reference,
                source,
            };
            self.lanes().push(class, tenant, item, weight);
            self.ready.notify_one();
        }
        self.park(parked).await?;
        self.queue.delete(kind, &done).await?;
        Ok(())
    }

    /// Durably parks messages and notes their lanes.
    async fn park(
        &self,
        entries: Vec<(crate::message::MessageRecord, Parked, bool)>,
    ) -> anyhow::Result<()> {
        if entries.is_empty() {
            return Ok(());
        }
        let lanes: Vec<_> = entries
            .iter()
            .map(|(record, _, held)| (record.class, record.tenant.clone(), *held))
            .collect();
        self.store.park(entries).await?;
        let mut state = self.lanes();
        for (class, tenant, held) in lanes {
            if held {
                metrics::counter!("cellmail_held_total", "cell" => self.cell.to_string(), "class" => class.as_str()).increment(1);
            } else {
                // Parked queued, while the class was not paused: if it is paused again
                // before the next refill, that refill must mark this mail held too.
                state.holding.remove(&(class, tenant.clone()));
            }
            state.parked.insert((class, tenant));
        }
        Ok(())
    }

    /// Loads parked mail, oldest first, into lanes with room whose class is not paused; the
    /// parked mail of a paused class (overflow parked before the pause too) is marked held.
    async fn refill(&self) -> anyhow::Result<()> {
        let parked: Vec<(MessageClass, TenantId)> = self.lanes().parked.iter().cloned().collect();
        for (class, tenant) in parked {
            let lane = (class, tenant.clone());
            if self.gate.paused(&tenant, class) {
                if !self.lanes().holding.contains(&lane) {
                    self.store.hold(&tenant, class, now_ms()).await?;
                    self.lanes().holding.insert(lane);
                }
                continue;
            }
            self.lanes().holding.remove(&lane);
            let room = LANE_CAP.saturating_sub(self.lanes().len(class, &tenant));
            if room < LANE_CAP / 2 {
                continue;
            }
            let (ready, any) = self.store.parked(&tenant, class, 2 * LANE_CAP, now_ms())?;
            if !any {
                self.lanes().parked.remove(&(class, tenant));
                continue;
            }
            let weight = self.gate.weight(&tenant);
            let mut loaded = Vec::new();
            for (id, form) in ready {
                if loaded.len() == room || self.lanes().loaded.contains(&id) {
                    continue;
                }
                let Some((message, by_reference)) = self.decode(&form.body)? else {
                    self.store.unpark(&tenant, class, id).await?;
                    continue;
                };
                let item = Item {
                    message,
                    body: form.body,
                    by_reference,
                    source: Source::Parked {
                        attempts: form.attempts,
                    },
                };
                let mut lanes = self.lanes();
                lanes.loaded.insert(id);
                let (class, tenant) = (item.message.class, item.message.tenant.clone());
                lanes.push(class, tenant, item, weight);
                loaded.push(id);
                self.ready.notify_one();
            }
            if !loaded.is_empty() {
                // Held mail taken up again after a resume is queued once more.
                self.store.release(loaded, now_ms()).await?;
            }
        }
        Ok(())
    }

    /// Forgets a message whose outcome is recorded: deletes it from its queue or the store.
    async fn done(&self, message: &Message, source: &Source) -> anyhow::Result<()> {
        match source {
            Source::Queue { kind, receipt, .. } => {
                self.queue
                    .delete(*kind, std::slice::from_ref(receipt))
                    .await?
            }
            Source::Parked { .. } => {
                self.store
                    .unpark(&message.tenant, message.class, message.id)
                    .await?
            }
        }
        Ok(())
    }

    /// Tries `item` again after `delay`; `attempts` counts the tries made so far.
    async fn later(&self, item: &Item, delay: Duration, attempts: u32) -> anyhow::Result<()> {
        match &item.source {
            Source::Queue { kind, receipt, .. } => {
                self.queue.change_visibility(*kind, receipt, delay).await?
            }
            Source::Parked { .. } => {
                let form = Parked {
                    not_before_ms: now_ms() + delay.as_millis() as u64,
                    attempts,
                    body: item.body.clone(),
                };
                self.park(vec![(item.message.queued_record(), form, false)])
                    .await?
            }
        }
        Ok(())
    }

    /// Records a permanent failure and moves the message to the dead-letter queue.
    async fn dead_letter(&self, item: &Item, reason: String) -> anyhow::Result<()> {
        tracing::warn!(%reason, "send refused permanently; dead-lettering");
        let failed = store::event(EventKind::Failed, now_ms(), reason);
        self.store
            .record_outcome(item.message.queued_record(), MessageState::Failed, failed)
            .await?;
        self.queue
            .send(QueueKind::DeadLetter, item.body.clone())
            .await?;
        self.health.record(health::Outcome::DeadLettered);
        self.done(&item.message, &item.source).await
    }

    /// Sends one message from a lane and settles it.
    async fn settle(&self, item: Item) -> anyhow::Result<()> {
        let message = &item.message;
        // Another task is sending this id: leave this copy (a queued one comes back after its
        // visibility timeout and is then only deleted; a parked one stays parked).
        let Some(_claim) = self.claim(message.id) else {
            return Ok(());
        };
        if self.store.settled(message.id)? {
            return self.done(message, &item.source).await;
        }
        if self.gate.paused(&message.tenant, message.class) {
            // Paused while it waited in its lane.
            let form = Parked {
                not_before_ms: 0,
                attempts: item.source.attempts(),
                body: item.body.clone(),
            };
            self.park(vec![(message.queued_record(), form, true)])
                .await?;
            if let Source::Queue { kind, receipt, .. } = &item.source {
                self.queue
                    .delete(*kind, std::slice::from_ref(receipt))
                    .await?;
            }
            return Ok(());
        }
        if let Some(left) = self.pause_left() {
            return self.later(&item, left, item.source.attempts()).await;
        }
        let span = tracing::info_span!("deliver", tenant = %message.tenant, cell = %self.cell, message_id = %message.id, class = %message.class);
        if let Some(accept) = &message.traceparent {
            cellmail_proto::trace::continue_from_traceparent(&span, accept);
        }
        let setup = self.gate.setup(&message.tenant, message.from.domain());
        let decorated = self.gate.decorate(message);
        let sent = async {
            self.mailer.prepare(&message.tenant, &setup).await?;
            self.mailer.send(&decorated).await
        }
        .instrument(span)
        .await;
        let outcome = match &sent {
            Ok(()) => "sent",
            Err(MailerError::Retryable { .. }) => "retried",
            Err(MailerError::Permanent { .. }) => "failed",
            Err(MailerError::Paused { .. }) => "paused",
            Err(MailerError::TenantPaused { .. }) => "tenant_paused",
        };
        self.health.record(match &sent {
            Ok(()) => health::Outcome::Sent,
            Err(_) => health::Outcome::SendFailed,
        });
        let (cell, class) = (self.cell.to_string(), message.class.as_str());
        metrics::counter!("cellmail_send_attempts_total", "cell" => cell, "class" => class, "outcome" => outcome).increment(1);
        let attempts = item.source.attempts() + 1;
        match sent {
            Ok(()) => {
                let sent = store::event(EventKind::Sent, now_ms(), "");
                self.store
                    .record_outcome(message.queued_record(), MessageState::Sent, sent)
                    .await?;
                if item.by_reference {
                    self.store.drop_body(message.id).await?;
                }
                self.done(message, &item.source).await
            }
            // The last attempt is dead-lettered here, not by the queue's redrive, so that the
            // message is recorded as failed (and leaves its tenant's backlog).
            Err(MailerError::Retryable { reason, .. }) if attempts >= MAX_ATTEMPTS => {
                self.dead_letter(&item, format!("{reason} (after {attempts} attempts)"))
                    .await
            }
            Err(MailerError::Retryable {
                reason,
                retry_after,
            }) => {
                let delay = retry_after.unwrap_or_else(|| backoff(attempts, rand::rng().random()));
                tracing::warn!(%reason, ?delay, attempts, "send failed; retrying later");
                self.later(&item, delay, attempts).await
            }
            Err(MailerError::Paused {
                reason,
                retry_after,
            }) => {
                self.pause_all(&reason, retry_after);
                self.later(&item, retry_after, item.source.attempts()).await
            }
            Err(MailerError::TenantPaused { reason }) => {
                let tenant = &message.tenant;
                tracing::error!(%tenant, cell = %self.cell, %reason, "ALARM: the mail transport paused this tenant; its mail is held, the cell's other tenants send on");
                metrics::counter!("cellmail_tenant_sending_paused_total", "cell" => self.cell.to_string())
                    .increment(1);
                if let Err(err) = self.holds.hold(tenant, &reason).await {
                    tracing::warn!(%tenant, error = %err, "holding the paused tenant's mail; retrying the message later");
                }
                // Back soon, and held then (its tenant's breakers are tripped).
                self.later(&item, TENANT_PAUSED_RETRY, item.source.attempts())
                    .await
            }
            Err(MailerError::Permanent { reason }) => self.dead_letter(&item, reason).await,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    use std::sync::atomic::{AtomicU32, Ordering};

    use async_trait::async_trait;

    use cellmail_proto::{MessageClass, TenantId};

    use crate::mailer::Setup;
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

        fn weight(&self, _tenant: &TenantId) -> u32 {
            1
        }

        fn setup(&self, _tenant: &TenantId, domain: &str) -> Setup {
            Setup::unlisted(domain)
        }
    }

    /// Holding pauses every class of the tenant, as tripping its breakers does.
    #[async_trait]
    impl Holds for Paused {
        async fn hold(&self, tenant: &TenantId, _reason: &str) -> anyhow::Result<()> {
            let mut paused = self.0.lock().unwrap();
            paused.extend(MessageClass::ALL.map(|class| (tenant.clone(), class)));
            Ok(())
        }
    }

    /// Runs the intake and 4 sender tasks until the token is cancelled.
    fn spawn(
        store: &Arc<Store>,
        queue: &Arc<dyn Queue>,
        mailer: Arc<dyn Mailer>,
        gate: Arc<Paused>,
    ) -> (CancellationToken, Vec<tokio::task::JoinHandle<()>>) {
        spawn_senders(store, queue, mailer, gate, 4)
    }

    fn spawn_senders(
        store: &Arc<Store>,
        queue: &Arc<dyn Queue>,
        mailer: Arc<dyn Mailer>,
        gate: Arc<Paused>,
        senders: usize,
    ) -> (CancellationToken, Vec<tokio::task::JoinHandle<()>>) {
        let worker = Arc::new(Worker::new(
            CellId::new("c").unwrap(),
            store.clone(),
            queue.clone(),
            mailer,
            (gate.clone(), gate),
            Arc::default(),
        ));
        let shutdown = CancellationToken::new();
        let mut tasks: Vec<_> = (0..senders)
            .map(|_| tokio::spawn(worker.clone().run(shutdown.clone())))
            .collect();
        tasks.push(tokio::spawn(worker.clone().intake(shutdown.clone())));
        (shutdown, tasks)
    }

    /// A store in `dir` and the embedded queue in it.
    fn store_and_queue(dir: &std::path::Path) -> (Arc<Store>, Arc<dyn Queue>) {
        let store = Arc::new(Store::open(&dir.join("store.redb")).unwrap());
        let queue = LocalQueue::open(store.clone(), QueueConfig::default()).unwrap();
        (store, Arc::new(queue))
    }

    /// Queues `copies` of one message, the later ones once the first is being sent, and
    /// runs 4 worker tasks until it is sent.
    async fn deliver(throttled: u32, copies: usize) -> (u32, Arc<Store>, MessageId) {
        let dir = tempfile::tempdir().unwrap();
        let (store, queue) = store_and_queue(dir.path());
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
        let (store, queue) = store_and_queue(dir.path());
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
        // One sender: sends other senders had already started when the pause was reported
        // finish; what this checks is that none starts after it.
        let gate = Arc::new(Paused::default());
        let (shutdown, tasks) = spawn_senders(&store, &queue, mailer.clone(), gate, 1);
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

    /// Answers that the transport paused `paused`'s sending; sends (and counts) the rest.
    struct PausesOne {
        paused: TenantId,
        sent: Counting,
    }

    #[async_trait]
    impl Mailer for PausesOne {
        async fn send(&self, message: &Message) -> Result<(), MailerError> {
            if message.tenant == self.paused {
                return Err(MailerError::TenantPaused {
                    reason: "SES paused its configuration set".into(),
                });
            }
            self.sent.send(message).await
        }
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn a_tenant_the_transport_paused_is_held_alone_and_its_neighbours_send() {
        let dir = tempfile::tempdir().unwrap();
        let (store, queue) = store_and_queue(dir.path());
        let paused = [message(), message()];
        let other = Message {
            tenant: TenantId::new("other").unwrap(),
            ..message()
        };
        for m in paused.iter().chain([&other]) {
            queue
                .send(m.class.into(), serde_json::to_vec(m).unwrap())
                .await
                .unwrap();
        }
        let mailer = Arc::new(PausesOne {
            paused: paused[0].tenant.clone(),
            sent: Counting::default(),
        });
        let gate = Arc::new(Paused::default());
        let (shutdown, tasks) = spawn(&store, &queue, mailer.clone(), gate.clone());
        let state = |m: &Message| store.message(&m.tenant, m.id).unwrap().map(|r| r.state);
        let deadline = Instant::now() + Duration::from_secs(20);
        while paused.iter().any(|m| state(m) != Some(MessageState::Held)) {
            assert!(
                Instant::now() < deadline,
                "the paused tenant's mail was not held"
            );
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        shutdown.cancel();
        for task in tasks {
            task.await.unwrap();
        }
        assert_eq!(*mailer.sent.0.lock().unwrap(), vec![other.id]);
        assert!(gate.paused(&paused[0].tenant, MessageClass::Marketing));
        assert!(!gate.paused(&other.tenant, MessageClass::Transactional));
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn a_paused_class_is_held_in_the_store_and_everything_else_is_sent() {
        let dir = tempfile::tempdir().unwrap();
        let (store, queue) = store_and_queue(dir.path());
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
        let held = || {
            store
                .parked(&marketing.tenant, MessageClass::Marketing, 10, u64::MAX)
                .unwrap()
                .0
        };
        let deadline = Instant::now() + Duration::from_secs(20);
        while held().is_empty() || mailer.0.lock().unwrap().len() < 2 {
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
        let held = held();
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

    /// Records `m` in the store as the accept path does, so its state can be read.
    async fn record_accepted(store: &Store, m: &Message) {
        let accepted = crate::message::Accepted {
            message_id: m.id,
            recipients: Vec::new(),
        };
        store
            .accepted(None, accepted, m.queued_record(), None, now_ms())
            .await
            .unwrap();
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn mail_parked_behind_a_full_lane_is_held_once_its_class_is_paused() {
        let dir = tempfile::tempdir().unwrap();
        let (store, queue) = store_and_queue(dir.path());
        let messages: Vec<Message> = (0..3 * LANE_CAP)
            .map(|_| Message {
                class: MessageClass::Marketing,
                ..message()
            })
            .collect();
        let tenant = messages[0].tenant.clone();
        for m in &messages {
            record_accepted(&store, m).await;
            queue
                .send(QueueKind::Marketing, serde_json::to_vec(m).unwrap())
                .await
                .unwrap();
        }
        // No sender: one lane's worth waits in the lane, the rest is parked as overflow.
        let gate = Arc::new(Paused::default());
        let (shutdown, tasks) = spawn_senders(
            &store,
            &queue,
            Arc::new(Counting::default()),
            gate.clone(),
            0,
        );
        let parked = || {
            store
                .parked(&tenant, MessageClass::Marketing, usize::MAX, u64::MAX)
                .unwrap()
                .0
        };
        let state = |id| store.message(&tenant, id).unwrap().unwrap().state;
        let deadline = Instant::now() + Duration::from_secs(20);
        while parked().len() < 2 * LANE_CAP {
            assert!(Instant::now() < deadline, "the overflow was not parked");
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        assert!(
            parked()
                .iter()
                .all(|(id, _)| state(*id) == MessageState::Queued)
        );

        gate.0
            .lock()
            .unwrap()
            .insert((tenant.clone(), MessageClass::Marketing));
        while !parked()
            .iter()
            .all(|(id, _)| state(*id) == MessageState::Held)
        {
            assert!(
                Instant::now() < deadline,
                "the parked overflow was not held"
            );
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        shutdown.cancel();
        for task in tasks {
            task.await.unwrap();
        }
        assert_eq!(parked().len(), 2 * LANE_CAP, "held mail stays parked");
    }

    #[tokio::test]
    async fn overflow_parked_between_two_pauses_is_held_by_the_second() {
        let dir = tempfile::tempdir().unwrap();
        let (store, queue) = store_and_queue(dir.path());
        let gate = Arc::new(Paused::default());
        let worker = Worker::new(
            CellId::new("c").unwrap(),
            store.clone(),
            queue,
            Arc::new(Counting::default()),
            (gate.clone(), gate.clone()),
            Arc::default(),
        );
        let first = Message {
            class: MessageClass::Marketing,
            ..message()
        };
        let second = Message {
            id: MessageId::generate(),
            ..first.clone()
        };
        let tenant = first.tenant.clone();
        let overflow = |m: &Message| {
            let form = Parked {
                not_before_ms: 0,
                attempts: 0,
                body: serde_json::to_vec(m).unwrap(),
            };
            vec![(m.queued_record(), form, false)]
        };
        let lane = (tenant.clone(), MessageClass::Marketing);
        let pause = |on: bool| {
            let mut paused = gate.0.lock().unwrap();
            if on {
                paused.insert(lane.clone());
            } else {
                paused.remove(&lane);
            }
        };
        let state = |id| store.message(&tenant, id).unwrap().unwrap().state;
        for m in [&first, &second] {
            record_accepted(&store, m).await;
        }

        worker.park(overflow(&first)).await.unwrap();
        pause(true);
        worker.refill().await.unwrap();
        assert_eq!(state(first.id), MessageState::Held);
        // Resumed and paused again before intake refilled: overflow parked in between is
        // held by the second pause too.
        pause(false);
        worker.park(overflow(&second)).await.unwrap();
        pause(true);
        worker.refill().await.unwrap();
        assert_eq!(state(second.id), MessageState::Held);
        assert_eq!(state(first.id), MessageState::Held);
    }

    /// Sends slowly, recording whose message went out in which order.
    #[derive(Default)]
    struct Slow(Mutex<Vec<TenantId>>);

    #[async_trait]
    impl Mailer for Slow {
        async fn send(&self, message: &Message) -> Result<(), MailerError> {
            tokio::time::sleep(Duration::from_millis(5)).await;
            self.0.lock().unwrap().push(message.tenant.clone());
            Ok(())
        }
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn one_tenants_backlog_does_not_stand_in_front_of_anothers_mail() {
        let dir = tempfile::tempdir().unwrap();
        let (store, queue) = store_and_queue(dir.path());
        let (noisy, calm) = (
            TenantId::new("noisy").unwrap(),
            TenantId::new("calm").unwrap(),
        );
        let mut ids = Vec::new();
        // More than all lanes hold together: the calm tenant's mail is reached only because
        // the noisy tenant's overflow is parked.
        let backlog = BUFFER + 200;
        for tenant in std::iter::repeat_n(&noisy, backlog).chain(std::iter::repeat_n(&calm, 5)) {
            let mut m = message();
            m.tenant = tenant.clone();
            ids.push(m.id);
            queue
                .send(QueueKind::Transactional, serde_json::to_vec(&m).unwrap())
                .await
                .unwrap();
        }
        let mailer = Arc::new(Slow::default());
        let (shutdown, tasks) = spawn_senders(
            &store,
            &queue,
            mailer.clone(),
            Arc::new(Paused::default()),
            1,
        );
        let deadline = Instant::now() + Duration::from_secs(30);
        while !ids.iter().all(|id| store.settled(*id).unwrap()) {
            assert!(Instant::now() < deadline, "not everything was sent");
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        shutdown.cancel();
        for task in tasks {
            task.await.unwrap();
        }
        let order = mailer.0.lock().unwrap().clone();
        assert_eq!(
            order.len(),
            backlog + 5,
            "each message sent once, parked ones too"
        );
        let last_calm = order.iter().rposition(|t| *t == calm).unwrap();
        assert!(
            last_calm < 120,
            "the calm tenant's 5 messages waited behind the noisy backlog: last sent at {last_calm}"
        );
        let (parked, any) = store
            .parked(&noisy, MessageClass::Transactional, 10, u64::MAX)
            .unwrap();
        assert!(parked.is_empty() && !any, "nothing is left parked");
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
