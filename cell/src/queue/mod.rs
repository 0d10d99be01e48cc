//! The cell's message queue, with SQS semantics.
//!
//! A cell has one queue per message class, a dead-letter queue and a feedback queue (the
//! mail transport's event records). A received message is
//! invisible for its visibility timeout and comes back if it is not deleted by then; each
//! receive increments its receive count, and a receive past the queue's `max_receives`
//! moves it to the dead-letter queue instead. `send` returns only once the message is
//! durable. Batching (SQS batch calls, group commits) is the implementation's business.
//!
//! Implementations: [`local::LocalQueue`] (embedded, a table of the cell store's file) and
//! [`sqs::SqsQueue`] (production: SQS standard queues with a redrive policy).

pub mod local;
pub mod sqs;

use std::time::Duration;

use async_trait::async_trait;
use cellmail_proto::{ApiError, MessageClass};

/// Which of the cell's queues.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum QueueKind {
    Transactional,
    Marketing,
    DeadLetter,
    /// Feedback records from the mail transport (SES events, via SNS or EventBridge).
    Feedback,
}

impl From<MessageClass> for QueueKind {
    fn from(class: MessageClass) -> Self {
        match class {
            MessageClass::Transactional => QueueKind::Transactional,
            MessageClass::Marketing => QueueKind::Marketing,
        }
    }
}

/// One received message: its body, the handle that deletes it or changes its visibility,
/// and how many times it has been received (this time included).
#[derive(Debug, Clone)]
pub struct Delivery {
    pub receipt: String,
    pub body: Vec<u8>,
    pub receive_count: u32,
}

#[derive(Debug, Clone, thiserror::Error)]
pub enum QueueError {
    /// The receipt is stale (the message was received again since) or was never issued.
    #[error("receipt {0:?} is not current")]
    ReceiptInvalid(String),
    /// Retryable: the queue service did not answer.
    #[error("queue unavailable: {0}")]
    Unavailable(String),
    #[error("queue storage failed: {0}")]
    Storage(String),
    /// The body is larger than the queue carries; retrying cannot help, storing the body
    /// elsewhere and queueing a reference can.
    #[error("message body of {size} bytes is over the queue's limit of {limit} bytes")]
    TooLarge { size: usize, limit: usize },
}

impl From<crate::commit::StorageError> for QueueError {
    /// The embedded queue's writes and reads go through the cell store.
    fn from(err: crate::commit::StorageError) -> Self {
        QueueError::Storage(err.0)
    }
}

impl From<QueueError> for ApiError {
    /// The queue failing makes the cell unavailable: the caller may retry.
    fn from(err: QueueError) -> Self {
        ApiError::Unavailable(format!("cell queue: {err}"))
    }
}

/// The redrive policy of a cell's queues.
#[derive(Debug, Clone, Copy)]
pub struct QueueConfig {
    /// A message received more often than this is moved to the dead-letter queue.
    pub max_receives: u32,
}

impl Default for QueueConfig {
    fn default() -> Self {
        Self { max_receives: 5 }
    }
}

#[async_trait]
pub trait Queue: Send + Sync + 'static {
    /// Returns once the message is durable. Bodies over [`Queue::max_body`] are refused.
    async fn send(&self, kind: QueueKind, body: Vec<u8>) -> Result<(), QueueError>;

    /// The largest body this queue carries.
    fn max_body(&self) -> usize {
        usize::MAX
    }

    /// Up to `max` visible messages, waiting up to `wait` for the first one.
    async fn receive(
        &self,
        kind: QueueKind,
        max: usize,
        visibility: Duration,
        wait: Duration,
    ) -> Result<Vec<Delivery>, QueueError>;

    /// Deletes received messages. A stale receipt deletes nothing and is not an error (as in SQS).
    async fn delete(&self, kind: QueueKind, receipts: &[String]) -> Result<(), QueueError>;

    /// Makes a received message visible again after `visibility` (zero: now).
    async fn change_visibility(
        &self,
        kind: QueueKind,
        receipt: &str,
        visibility: Duration,
    ) -> Result<(), QueueError>;
}
