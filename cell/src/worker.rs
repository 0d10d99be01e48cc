//! Delivery workers: pull batches from the cell's queues (transactional first), send each
//! message through the mailer, and settle it.
//!
//! A message already recorded as sent is only deleted (a redelivery after a crash). A
//! retryable failure puts the message back with exponential backoff and jitter; a permanent
//! one records the reason and moves the message to the dead-letter queue. Nothing is deleted
//! before its outcome is durable.

use std::sync::Arc;
use std::time::Duration;

use rand::Rng;
use tokio_util::sync::CancellationToken;
use tracing::Instrument;

use crate::accept::now_ms;
use crate::mailer::{Mailer, MailerError};
use crate::message::Message;
use crate::queue::{Delivery, Queue, QueueKind};
use crate::store::{Outcome, Store};

const BATCH: usize = 10;
/// How long a received message stays invisible while a worker sends it.
const VISIBILITY: Duration = Duration::from_secs(60);
/// How long an idle worker long-polls the transactional queue before looking at marketing.
const IDLE_WAIT: Duration = Duration::from_millis(50);
const MAX_BACKOFF: Duration = Duration::from_secs(300);

pub struct Worker {
    pub store: Arc<Store>,
    pub queue: Arc<dyn Queue>,
    pub mailer: Arc<dyn Mailer>,
}

/// Exponential in the receive count, capped, with up to 50% added jitter.
pub fn backoff(receive_count: u32, jitter: f64) -> Duration {
    let base = Duration::from_secs(1u64 << receive_count.min(9)).min(MAX_BACKOFF);
    base.mul_f64(1.0 + jitter.clamp(0.0, 1.0) / 2.0)
}

impl Worker {
    pub async fn run(self: Arc<Self>, shutdown: CancellationToken) {
        while !shutdown.is_cancelled() {
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

    /// Sends one message; `Ok(true)` when it may be deleted from its queue.
    async fn settle(&self, kind: QueueKind, delivery: &Delivery) -> anyhow::Result<bool> {
        let message: Message = match serde_json::from_slice(&delivery.body) {
            Ok(message) => message,
            Err(err) => {
                tracing::error!(%err, "unreadable queued message; dead-lettering it");
                self.queue
                    .send(QueueKind::DeadLetter, delivery.body.clone())
                    .await?;
                return Ok(true);
            }
        };
        if self.store.outcome(message.id)?.is_some() {
            return Ok(true);
        }
        let span =
            tracing::info_span!("deliver", tenant = %message.tenant, message_id = %message.id);
        match self.mailer.send(&message).instrument(span).await {
            Ok(()) => {
                self.store
                    .record_outcome(message.id, Outcome::Sent { at_ms: now_ms() })
                    .await?;
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
            Err(MailerError::Permanent { reason }) => {
                tracing::warn!(%reason, "send refused permanently; dead-lettering");
                self.store
                    .record_outcome(
                        message.id,
                        Outcome::Failed {
                            at_ms: now_ms(),
                            reason,
                        },
                    )
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

    #[test]
    fn backoff_grows_is_capped_and_jittered() {
        assert_eq!(backoff(1, 0.0), Duration::from_secs(2));
        assert_eq!(backoff(3, 0.0), Duration::from_secs(8));
        assert_eq!(backoff(3, 1.0), Duration::from_secs(12));
        assert_eq!(backoff(30, 0.0), MAX_BACKOFF);
    }
}
