//! The accept's durable step: what makes an accepted message safe before its sender is
//! answered. How depends on where the cell's queue is, so the cell picks one implementation
//! when it starts and the accept path calls it without knowing which.
//!
//! - [`Embedded`]: the queue is a table of the cell store. Looking a key up only reads; the
//!   message, its record and the answer for its key are one fsynced commit, all of it or
//!   none, and delivery sees the message once that commit is done.
//! - [`External`]: the queue is elsewhere (SQS). A key is reserved durably *before* its
//!   message is queued; the message is sent (a body over the queue's limit kept in the store
//!   and a reference to it sent), then its record and answer are written without an fsync of
//!   their own. A crash in between leaves the reservation pending: the retry queues the same
//!   message id again, and the worker's record check keeps that from becoming a second send.

use std::sync::Arc;

use async_trait::async_trait;
use cellmail_proto::{ApiError, MessageId, TenantId, now_ms};

use crate::message::{Accepted, BodyRef, Message, MessageRecord, MessageState};
use crate::queue::Queue;
use crate::queue::local::LocalQueue;
use crate::store::{Reservation, Store};

#[async_trait]
pub trait Durable: Send + Sync + 'static {
    /// What holds `tenant`'s idempotency `key` at `now_ms`: an earlier send's answer
    /// ([`Reservation::Done`]), the message id an earlier attempt reserved
    /// ([`Reservation::Pending`]), or nothing ([`Reservation::New`]): the send of message
    /// `id` goes on.
    async fn claim(
        &self,
        tenant: &TenantId,
        key: &str,
        id: MessageId,
        now_ms: u64,
    ) -> Result<Reservation, ApiError>;

    /// Queues `message` if its `record` says it is queued, and records it with `accepted`
    /// as the answer for its idempotency key. Answers [`Reservation::New`] once all of that
    /// is durable; having written nothing, what another send of the key committed first (its
    /// answer, or the id it reserved).
    async fn commit(
        &self,
        message: &Message,
        record: MessageRecord,
        accepted: Accepted,
    ) -> Result<Reservation, ApiError>;
}

/// `value` as a queue carries it.
fn encode<T: serde::Serialize>(value: &T) -> Result<Vec<u8>, ApiError> {
    serde_json::to_vec(value).map_err(|e| ApiError::Internal(e.to_string()))
}

/// `message`'s idempotency key, if it has one.
fn key(message: &Message) -> Option<&str> {
    Some(message.idempotency_key.as_str()).filter(|key| !key.is_empty())
}

/// The embedded queue's step: one commit of the store.
pub struct Embedded {
    store: Arc<Store>,
    queue: Arc<LocalQueue>,
}

impl Embedded {
    /// `queue` keeps its messages in `store`.
    pub fn new(store: Arc<Store>, queue: Arc<LocalQueue>) -> Self {
        Self { store, queue }
    }
}

#[async_trait]
impl Durable for Embedded {
    /// Only reads: the commit of the accept reserves the key.
    async fn claim(
        &self,
        tenant: &TenantId,
        key: &str,
        _id: MessageId,
        now_ms: u64,
    ) -> Result<Reservation, ApiError> {
        let held = self.store.held(tenant, key, now_ms)?;
        Ok(held.unwrap_or(Reservation::New))
    }

    async fn commit(
        &self,
        message: &Message,
        record: MessageRecord,
        accepted: Accepted,
    ) -> Result<Reservation, ApiError> {
        let staged = match record.state {
            MessageState::Queued => Some(self.queue.stage(message.class.into(), encode(message)?)),
            _ => None,
        };
        let slot = staged.as_ref().map(|staged| staged.slot);
        let key = key(message);
        let answer = (self.store)
            .accepted(key, accepted, record, staged, now_ms())
            .await?;
        if let (Reservation::New, Some(slot)) = (&answer, slot) {
            self.queue.publish(slot);
        }
        Ok(answer)
    }
}

/// The step for a queue outside the store: reserve, send, record.
pub struct External {
    store: Arc<Store>,
    queue: Arc<dyn Queue>,
}

impl External {
    pub fn new(store: Arc<Store>, queue: Arc<dyn Queue>) -> Self {
        Self { store, queue }
    }
}

#[async_trait]
impl Durable for External {
    /// Reserves the key durably for message `id` when nothing holds it.
    async fn claim(
        &self,
        tenant: &TenantId,
        key: &str,
        id: MessageId,
        now_ms: u64,
    ) -> Result<Reservation, ApiError> {
        Ok(self.store.reserve(tenant, key, id, now_ms).await?)
    }

    async fn commit(
        &self,
        message: &Message,
        record: MessageRecord,
        accepted: Accepted,
    ) -> Result<Reservation, ApiError> {
        if record.state == MessageState::Queued {
            let mut body = encode(message)?;
            if body.len() > self.queue.max_body() {
                self.store.put_body(message.id, body).await?;
                body = encode(&BodyRef {
                    body_ref: message.id,
                })?;
            }
            self.queue.send(message.class.into(), body).await?;
        }
        let key = key(message);
        let answer = (self.store)
            .accepted(key, accepted, record, None, now_ms())
            .await?;
        Ok(answer)
    }
}

#[cfg(test)]
mod tests {
    use std::time::Duration;

    use cellmail_proto::{SuppressionReason, SuppressionScope};

    use super::*;
    use crate::message::{RecipientOutcome, sample};
    use crate::queue::{QueueConfig, QueueKind};

    /// A step over a fresh store and its embedded queue (for [`External`], the queue it
    /// sends to).
    struct Subject {
        durable: Arc<dyn Durable>,
        store: Arc<Store>,
        queue: Arc<LocalQueue>,
        _dir: tempfile::TempDir,
    }

    fn subject(make: impl FnOnce(Arc<Store>, Arc<LocalQueue>) -> Arc<dyn Durable>) -> Subject {
        let dir = tempfile::tempdir().unwrap();
        let store = Arc::new(Store::open(&dir.path().join("store.redb")).unwrap());
        let queue = Arc::new(LocalQueue::open(store.clone(), QueueConfig::default()).unwrap());
        Subject {
            durable: make(store.clone(), queue.clone()),
            store,
            queue,
            _dir: dir,
        }
    }

    fn embedded() -> Subject {
        subject(|store, queue| Arc::new(Embedded::new(store, queue)))
    }

    fn external() -> Subject {
        subject(|store, queue| Arc::new(External::new(store, queue)))
    }

    /// The message's answer, every recipient suppressed or none.
    fn answer(message: &Message, suppressed: bool) -> Accepted {
        let reason = (SuppressionReason::Manual, SuppressionScope::Tenant);
        let recipients = message
            .recipients()
            .map(|m| RecipientOutcome {
                address: m.email.clone(),
                suppressed: suppressed.then_some(reason),
            })
            .collect();
        Accepted {
            message_id: message.id,
            recipients,
        }
    }

    async fn received(queue: &LocalQueue) -> Vec<Message> {
        let kind = QueueKind::Transactional;
        let got = queue.receive(kind, 10, Duration::from_secs(60), Duration::ZERO);
        (got.await.unwrap().iter())
            .map(|d| serde_json::from_slice(&d.body).unwrap())
            .collect()
    }

    async fn a_keys_first_send_is_queued_and_recorded_and_a_retry_answered_again(s: Subject) {
        let message = Message {
            idempotency_key: "k".into(),
            ..sample::message()
        };
        let (tenant, id) = (&message.tenant, message.id);
        let claim = s.durable.claim(tenant, "k", id, now_ms());
        assert_eq!(claim.await.unwrap(), Reservation::New);
        let accepted = answer(&message, false);
        let record = message.record(MessageState::Queued, accepted.recipients.clone());
        let committed = s.durable.commit(&message, record, accepted.clone());
        assert_eq!(committed.await.unwrap(), Reservation::New);
        assert_eq!(received(&s.queue).await, std::slice::from_ref(&message));
        let kept = s.store.message(tenant, id).unwrap().unwrap();
        assert_eq!(kept.state, MessageState::Queued);
        let retry = s
            .durable
            .claim(tenant, "k", MessageId::generate(), now_ms());
        assert_eq!(retry.await.unwrap(), Reservation::Done(accepted));
    }

    async fn a_message_whose_recipients_are_all_suppressed_is_recorded_not_queued(s: Subject) {
        let message = sample::message();
        let accepted = answer(&message, true);
        let record = message.record(MessageState::Suppressed, accepted.recipients.clone());
        let committed = s.durable.commit(&message, record, accepted);
        assert_eq!(committed.await.unwrap(), Reservation::New);
        assert_eq!(received(&s.queue).await, []);
        let kept = s.store.message(&message.tenant, message.id).unwrap();
        assert_eq!(kept.unwrap().state, MessageState::Suppressed);
    }

    macro_rules! suite {
        ($implementation:ident: $($behaviour:ident),* $(,)?) => {
            mod $implementation {
                $(
                    #[tokio::test]
                    async fn $behaviour() {
                        super::$behaviour(super::$implementation()).await;
                    }
                )*
            }
        };
    }

    suite!(embedded:
        a_keys_first_send_is_queued_and_recorded_and_a_retry_answered_again,
        a_message_whose_recipients_are_all_suppressed_is_recorded_not_queued,
    );

    suite!(external:
        a_keys_first_send_is_queued_and_recorded_and_a_retry_answered_again,
        a_message_whose_recipients_are_all_suppressed_is_recorded_not_queued,
    );
}
