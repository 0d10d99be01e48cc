//! The production queue: SQS standard queues, one per message class plus the feedback queue,
//! each with a redrive policy to the cell's dead-letter queue.
//!
//! SQS has the semantics the trait describes (visibility timeouts, receive counts, and a
//! redrive policy that moves a message received more than `max_receives` times to the
//! dead-letter queue on its next receive), so most calls map one to one. What this module
//! adds is batching: concurrent sends to one queue are coalesced by a background task into
//! `SendMessageBatch` calls of up to 10 entries and 256 KiB, and each sender gets its own
//! entry's result. SQS counts visibility timeouts and waits in whole seconds; shorter non-zero
//! ones are rounded up, so a message never comes back sooner, and a poll never ends sooner,
//! than asked.

use std::collections::{HashSet, VecDeque};
use std::sync::Arc;
use std::time::Duration;

use async_trait::async_trait;
use aws_config::SdkConfig;
use aws_sdk_sqs::Client;
use aws_sdk_sqs::config::http::HttpResponse;
use aws_sdk_sqs::error::{DisplayErrorContext, ProvideErrorMetadata, SdkError};
use aws_sdk_sqs::operation::change_message_visibility::ChangeMessageVisibilityError;
use aws_sdk_sqs::operation::send_message_batch::SendMessageBatchOutput;
use aws_sdk_sqs::types::{
    BatchResultErrorEntry, DeleteMessageBatchRequestEntry, MessageSystemAttributeName,
    QueueAttributeName, SendMessageBatchRequestEntry,
};
use cellmail_proto::CellId;
use tokio::sync::{OwnedSemaphorePermit, Semaphore, mpsc, oneshot};

use super::{Delivery, Queue, QueueConfig, QueueError, QueueKind};

/// SQS's limit for one message body, and for the bodies of one batch together.
const MAX_BYTES: usize = 256 * 1024;
const MAX_BATCH_ENTRIES: usize = 10;
/// `SendMessageBatch` calls in flight per queue. While all are busy, new sends wait in the
/// channel, which is what fills the next batches.
const BATCHES_IN_FLIGHT: usize = 8;
/// Sends waiting for a batch per queue before `send` itself waits (back-pressure).
const PENDING_SENDS: usize = 1024;
const MAX_VISIBILITY_SECS: u64 = 43_200;
const MAX_WAIT_SECS: u64 = 20;
/// SQS's longest retention. A standard queue's message keeps its first enqueue time when it
/// is dead-lettered, so the dead-letter queue must keep messages longer than its sources.
const DEAD_LETTER_RETENTION_SECS: u32 = 1_209_600;
/// Error codes SQS uses when it sheds load; the call is worth retrying later.
const THROTTLING_CODES: [&str; 5] = [
    "RequestThrottled",
    "ThrottlingException",
    "Throttling",
    "OverLimit",
    "KmsThrottled",
];
/// The code of a batch entry whose receipt is stale or was never issued.
const RECEIPT_INVALID: &str = "ReceiptHandleIsInvalid";

/// The names of a cell's queues.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SqsQueueNames {
    pub transactional: String,
    pub marketing: String,
    pub dead_letter: String,
    pub feedback: String,
}

impl SqsQueueNames {
    /// `<prefix><cell>-transactional`, `-marketing`, `-dlq` and `-feedback`.
    pub fn for_cell(prefix: &str, cell: &CellId) -> Self {
        let name = |suffix: &str| format!("{prefix}{cell}-{suffix}");
        Self {
            transactional: name("transactional"),
            marketing: name("marketing"),
            dead_letter: name("dlq"),
            feedback: name("feedback"),
        }
    }
}

struct PendingSend {
    body: String,
    done: oneshot::Sender<Result<(), QueueError>>,
}

/// One SQS queue: its URL and the channel into its send batcher.
struct Lane {
    url: String,
    sends: mpsc::Sender<PendingSend>,
}

impl Lane {
    /// Creates the queue if it is missing, sets one attribute on it and starts its batcher
    /// (which stops once the lane is dropped and its sends are done). The attribute is set
    /// apart from `CreateQueue` because that refuses an existing queue whose attributes
    /// differ, so a changed `max_receives` would fail every start.
    async fn open(
        client: &Client,
        name: &str,
        attribute: QueueAttributeName,
        value: String,
    ) -> Result<Self, QueueError> {
        let url = client
            .create_queue()
            .queue_name(name)
            .send()
            .await
            .map_err(service_error)?
            .queue_url
            .ok_or_else(|| QueueError::Storage(format!("SQS gave no URL for queue {name}")))?;
        client
            .set_queue_attributes()
            .queue_url(&url)
            .attributes(attribute, value)
            .send()
            .await
            .map_err(service_error)?;
        let (sends, pending) = mpsc::channel(PENDING_SENDS);
        tokio::spawn(batch_sends(client.clone(), url.clone(), pending));
        Ok(Self { url, sends })
    }
}

pub struct SqsQueue {
    client: Client,
    transactional: Lane,
    marketing: Lane,
    dead_letter: Lane,
    feedback: Lane,
}

impl SqsQueue {
    /// Opens the cell's queues, creating the missing ones, and (re)applies their redrive
    /// policy: a message received more than `queue.max_receives` times moves to `dead_letter`.
    pub async fn open(
        config: &SdkConfig,
        names: SqsQueueNames,
        queue: QueueConfig,
    ) -> Result<Self, QueueError> {
        let client = Client::new(config);
        let dead_letter = Lane::open(
            &client,
            &names.dead_letter,
            QueueAttributeName::MessageRetentionPeriod,
            DEAD_LETTER_RETENTION_SECS.to_string(),
        )
        .await?;
        let redrive = serde_json::json!({
            "deadLetterTargetArn": queue_arn(&client, &dead_letter.url).await?,
            "maxReceiveCount": queue.max_receives,
        })
        .to_string();
        let policy = QueueAttributeName::RedrivePolicy;
        Ok(Self {
            transactional: Lane::open(
                &client,
                &names.transactional,
                policy.clone(),
                redrive.clone(),
            )
            .await?,
            marketing: Lane::open(&client, &names.marketing, policy.clone(), redrive.clone())
                .await?,
            feedback: Lane::open(&client, &names.feedback, policy, redrive).await?,
            dead_letter,
            client,
        })
    }

    /// Lets SNS topic `topic_arn`, and nothing else, send to the feedback queue (a queue
    /// policy); the feedback queue's ARN, to subscribe it to the topic.
    pub async fn open_feedback_to(&self, topic_arn: &str) -> Result<String, QueueError> {
        let arn = queue_arn(&self.client, &self.feedback.url).await?;
        let policy = serde_json::json!({
            "Version": "2012-10-17",
            "Statement": [{
                "Sid": "cellmail-ses-events",
                "Effect": "Allow",
                "Principal": { "Service": "sns.amazonaws.com" },
                "Action": "sqs:SendMessage",
                "Resource": arn,
                "Condition": { "ArnEquals": { "aws:SourceArn": topic_arn } },
            }],
        });
        self.client
            .set_queue_attributes()
            .queue_url(&self.feedback.url)
            .attributes(QueueAttributeName::Policy, policy.to_string())
            .send()
            .await
            .map_err(service_error)?;
        Ok(arn)
    }

    fn lane(&self, kind: QueueKind) -> &Lane {
        match kind {
            QueueKind::Transactional => &self.transactional,
            QueueKind::Marketing => &self.marketing,
            QueueKind::DeadLetter => &self.dead_letter,
            QueueKind::Feedback => &self.feedback,
        }
    }

    /// Deletes up to 10 messages in one call. Stale receipts are skipped; any other failed
    /// entry is retried once on its own.
    async fn delete_batch(&self, url: &str, receipts: &[&String]) -> Result<(), QueueError> {
        let entries = receipts
            .iter()
            .enumerate()
            .map(|(i, receipt)| {
                DeleteMessageBatchRequestEntry::builder()
                    .id(i.to_string())
                    .receipt_handle(receipt.as_str())
                    .build()
            })
            .collect::<Result<Vec<_>, _>>()
            .map_err(|e| QueueError::Storage(e.to_string()))?;
        let output = self
            .client
            .delete_message_batch()
            .queue_url(url)
            .set_entries(Some(entries))
            .send()
            .await
            .map_err(service_error)?;
        for failed in output.failed() {
            if failed.code() == RECEIPT_INVALID {
                continue;
            }
            let receipt = position(failed.id())
                .and_then(|i| receipts.get(i))
                .ok_or_else(|| {
                    QueueError::Storage(format!(
                        "SQS reported a delete entry {:?} that was not sent",
                        failed.id()
                    ))
                })?;
            self.delete_one(url, receipt).await?;
        }
        Ok(())
    }

    async fn delete_one(&self, url: &str, receipt: &str) -> Result<(), QueueError> {
        match self
            .client
            .delete_message()
            .queue_url(url)
            .receipt_handle(receipt)
            .send()
            .await
        {
            Ok(_) => Ok(()),
            Err(err)
                if err.as_service_error().is_some_and(|e| {
                    e.is_receipt_handle_is_invalid() || e.is_invalid_id_format()
                }) =>
            {
                Ok(())
            }
            Err(err) => Err(service_error(err)),
        }
    }
}

async fn queue_arn(client: &Client, url: &str) -> Result<String, QueueError> {
    client
        .get_queue_attributes()
        .queue_url(url)
        .attribute_names(QueueAttributeName::QueueArn)
        .send()
        .await
        .map_err(service_error)?
        .attributes
        .and_then(|mut attributes| attributes.remove(&QueueAttributeName::QueueArn))
        .ok_or_else(|| QueueError::Storage(format!("SQS gave no ARN for queue {url}")))
}

/// Coalesces one queue's sends into `SendMessageBatch` calls until every sender is gone.
async fn batch_sends(client: Client, url: String, mut pending: mpsc::Receiver<PendingSend>) {
    let slots = Arc::new(Semaphore::new(BATCHES_IN_FLIGHT));
    let mut waiting: VecDeque<PendingSend> = VecDeque::new();
    loop {
        // A free slot first: while every slot is busy, sends pile up and leave as full batches.
        let Ok(slot) = slots.clone().acquire_owned().await else {
            return;
        };
        if waiting.is_empty() {
            match pending.recv().await {
                Some(send) => waiting.push_back(send),
                None => return,
            }
        }
        while waiting.len() < MAX_BATCH_ENTRIES {
            match pending.try_recv() {
                Ok(send) => waiting.push_back(send),
                Err(_) => break,
            }
        }
        let len = batch_len(waiting.iter().map(|send| send.body.len()));
        let batch: Vec<PendingSend> = waiting.drain(..len).collect();
        tokio::spawn(send_batch(client.clone(), url.clone(), batch, slot));
    }
}

/// How many of the waiting bodies (their sizes, oldest first) go into the next batch: at
/// most 10 and at most 256 KiB together, and always the first one (`send` refuses a body
/// that could never fit).
fn batch_len(sizes: impl IntoIterator<Item = usize>) -> usize {
    let mut total = 0;
    let mut len = 0;
    for size in sizes.into_iter().take(MAX_BATCH_ENTRIES) {
        total += size;
        if len > 0 && total > MAX_BYTES {
            break;
        }
        len += 1;
    }
    len
}

async fn send_batch(
    client: Client,
    url: String,
    batch: Vec<PendingSend>,
    _slot: OwnedSemaphorePermit,
) {
    let (bodies, senders): (Vec<String>, Vec<_>) =
        batch.into_iter().map(|send| (send.body, send.done)).unzip();
    let results = match send_batch_request(&client, &url, bodies).await {
        Ok(output) => entry_results(senders.len(), &output),
        Err(err) => vec![Err(err); senders.len()],
    };
    for (done, result) in senders.into_iter().zip(results) {
        // Gone only if the sending task was cancelled; the message is queued all the same.
        let _ = done.send(result);
    }
}

async fn send_batch_request(
    client: &Client,
    url: &str,
    bodies: Vec<String>,
) -> Result<SendMessageBatchOutput, QueueError> {
    let entries = bodies
        .into_iter()
        .enumerate()
        .map(|(i, body)| {
            SendMessageBatchRequestEntry::builder()
                .id(i.to_string())
                .message_body(body)
                .build()
        })
        .collect::<Result<Vec<_>, _>>()
        .map_err(|e| QueueError::Storage(e.to_string()))?;
    client
        .send_message_batch()
        .queue_url(url)
        .set_entries(Some(entries))
        .send()
        .await
        .map_err(service_error)
}

/// A batch entry's id is its position in the batch.
fn position(id: &str) -> Option<usize> {
    id.parse().ok()
}

/// Each of the `len` entries' result, in batch order.
fn entry_results(len: usize, output: &SendMessageBatchOutput) -> Vec<Result<(), QueueError>> {
    let unreported = QueueError::Storage("SQS reported nothing for this message".into());
    let mut results = vec![Err(unreported); len];
    for sent in output.successful() {
        if let Some(result) = position(sent.id()).and_then(|i| results.get_mut(i)) {
            *result = Ok(());
        }
    }
    for failed in output.failed() {
        if let Some(result) = position(failed.id()).and_then(|i| results.get_mut(i)) {
            *result = Err(entry_error(failed));
        }
    }
    results
}

/// SQS marks the entries that failed through no fault of the request: those may be retried.
fn entry_error(failed: &BatchResultErrorEntry) -> QueueError {
    let reason = format!(
        "{}: {}",
        failed.code(),
        failed.message().unwrap_or("no message")
    );
    if failed.sender_fault() {
        QueueError::Storage(reason)
    } else {
        QueueError::Unavailable(reason)
    }
}

/// `duration` in whole seconds, rounded up and capped at `max`.
fn whole_seconds(duration: Duration, max: u64) -> i32 {
    let secs = duration
        .as_secs()
        .saturating_add(u64::from(duration.subsec_nanos() > 0));
    // Both caps SQS has (12 hours, 20 seconds) fit an i32.
    i32::try_from(secs.min(max)).unwrap_or(i32::MAX)
}

/// Throttling, 5xx answers, timeouts and connection failures are the service's trouble and
/// worth retrying (`Unavailable`); any other error is a refusal (`Storage`).
fn service_error<E>(err: SdkError<E, HttpResponse>) -> QueueError
where
    E: ProvideErrorMetadata + std::error::Error + Send + Sync + 'static,
{
    let transient = match &err {
        SdkError::TimeoutError(_) | SdkError::DispatchFailure(_) | SdkError::ResponseError(_) => {
            true
        }
        SdkError::ServiceError(service) => {
            let status = service.raw().status();
            status.is_server_error()
                || status.as_u16() == 429
                || service
                    .err()
                    .code()
                    .is_some_and(|code| THROTTLING_CODES.contains(&code))
        }
        _ => false,
    };
    let reason = DisplayErrorContext(&err).to_string();
    if transient {
        QueueError::Unavailable(reason)
    } else {
        QueueError::Storage(reason)
    }
}

/// Whether SQS refused a visibility change because the receipt is not the message's
/// current one (or its message is gone).
fn receipt_not_current(err: &SdkError<ChangeMessageVisibilityError, HttpResponse>) -> bool {
    err.as_service_error().is_some_and(|e| {
        e.is_message_not_inflight()
            || e.is_receipt_handle_is_invalid()
            // SQS answers a receipt whose message was deleted or received again with this
            // untyped code. The timeout is in range by construction, so it is the receipt.
            || e.code() == Some("InvalidParameterValue")
    })
}

#[async_trait]
impl Queue for SqsQueue {
    fn max_body(&self) -> usize {
        MAX_BYTES
    }

    async fn send(&self, kind: QueueKind, body: Vec<u8>) -> Result<(), QueueError> {
        if body.len() > MAX_BYTES {
            return Err(QueueError::TooLarge {
                size: body.len(),
                limit: MAX_BYTES,
            });
        }
        // Queued bodies are JSON; anything else is a caller's bug, not a queue outage.
        let body = String::from_utf8(body).map_err(|_| {
            QueueError::Storage("SQS message bodies are text; this body is not UTF-8".into())
        })?;
        let (done, result) = oneshot::channel();
        let stopped = || QueueError::Unavailable("the SQS send batcher stopped".into());
        self.lane(kind)
            .sends
            .send(PendingSend { body, done })
            .await
            .map_err(|_| stopped())?;
        result.await.map_err(|_| stopped())?
    }

    async fn receive(
        &self,
        kind: QueueKind,
        max: usize,
        visibility: Duration,
        wait: Duration,
    ) -> Result<Vec<Delivery>, QueueError> {
        if max == 0 {
            return Ok(Vec::new());
        }
        let output = self
            .client
            .receive_message()
            .queue_url(&self.lane(kind).url)
            .max_number_of_messages(i32::try_from(max.min(MAX_BATCH_ENTRIES)).unwrap_or(1))
            .visibility_timeout(whole_seconds(visibility, MAX_VISIBILITY_SECS))
            .wait_time_seconds(whole_seconds(wait, MAX_WAIT_SECS))
            .message_system_attribute_names(MessageSystemAttributeName::ApproximateReceiveCount)
            .send()
            .await
            .map_err(service_error)?;
        Ok(output
            .messages
            .unwrap_or_default()
            .into_iter()
            .filter_map(|message| {
                let receive_count = message
                    .attributes
                    .as_ref()
                    .and_then(|a| a.get(&MessageSystemAttributeName::ApproximateReceiveCount))
                    .and_then(|count| count.parse().ok())
                    // SQS sends it when asked; were it missing, 1 (the least it can be) only
                    // shortens a retry's backoff.
                    .unwrap_or(1);
                // SQS always gives a receipt; a message without one could not be settled.
                Some(Delivery {
                    receipt: message.receipt_handle?,
                    body: message.body.unwrap_or_default().into_bytes(),
                    receive_count,
                })
            })
            .collect())
    }

    async fn delete(&self, kind: QueueKind, receipts: &[String]) -> Result<(), QueueError> {
        let url = &self.lane(kind).url;
        let mut seen = HashSet::new();
        // A receipt twice in one batch fails the whole batch in some SQS implementations.
        let receipts: Vec<&String> = receipts.iter().filter(|r| seen.insert(*r)).collect();
        let mut first_error = None;
        for chunk in receipts.chunks(MAX_BATCH_ENTRIES) {
            if let Err(err) = self.delete_batch(url, chunk).await {
                first_error.get_or_insert(err);
            }
        }
        first_error.map_or(Ok(()), Err)
    }

    async fn change_visibility(
        &self,
        kind: QueueKind,
        receipt: &str,
        visibility: Duration,
    ) -> Result<(), QueueError> {
        match self
            .client
            .change_message_visibility()
            .queue_url(&self.lane(kind).url)
            .receipt_handle(receipt)
            .visibility_timeout(whole_seconds(visibility, MAX_VISIBILITY_SECS))
            .send()
            .await
        {
            Ok(_) => Ok(()),
            Err(err) if receipt_not_current(&err) => {
                Err(QueueError::ReceiptInvalid(receipt.to_owned()))
            }
            Err(err) => Err(service_error(err)),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    use aws_sdk_sqs::error::{ConnectorError, ErrorMetadata};
    use aws_sdk_sqs::operation::receive_message::ReceiveMessageError;
    use aws_sdk_sqs::types::SendMessageBatchResultEntry;
    use aws_sdk_sqs::types::error::{MessageNotInflight, QueueDoesNotExist};

    #[test]
    fn names_follow_the_cell() {
        let names = SqsQueueNames::for_cell("cellmail-", &CellId::new("cell-1").unwrap());
        assert_eq!(names.transactional, "cellmail-cell-1-transactional");
        assert_eq!(names.marketing, "cellmail-cell-1-marketing");
        assert_eq!(names.dead_letter, "cellmail-cell-1-dlq");
        assert_eq!(names.feedback, "cellmail-cell-1-feedback");
    }

    #[test]
    fn a_batch_holds_at_most_ten_bodies() {
        assert_eq!(batch_len([]), 0);
        assert_eq!(batch_len([10; 3]), 3);
        assert_eq!(batch_len([10; 25]), 10);
    }

    #[test]
    fn a_batch_holds_at_most_256_kib_but_always_its_first_body() {
        assert_eq!(batch_len([MAX_BYTES / 2, MAX_BYTES / 2, 1]), 2);
        assert_eq!(batch_len([100_000, 100_000, 100_000]), 2);
        assert_eq!(batch_len([MAX_BYTES, 1]), 1);
        assert_eq!(batch_len([1, MAX_BYTES, 1]), 1);
    }

    #[test]
    fn durations_round_up_to_whole_seconds_within_the_cap() {
        assert_eq!(whole_seconds(Duration::ZERO, 20), 0);
        assert_eq!(whole_seconds(Duration::from_millis(50), 20), 1);
        assert_eq!(whole_seconds(Duration::from_secs(2), 20), 2);
        assert_eq!(whole_seconds(Duration::from_millis(2001), 20), 3);
        assert_eq!(whole_seconds(Duration::from_secs(60), 20), 20);
        assert_eq!(whole_seconds(Duration::MAX, MAX_VISIBILITY_SECS), 43_200);
    }

    fn failed(id: &str, code: &str, sender_fault: bool) -> BatchResultErrorEntry {
        BatchResultErrorEntry::builder()
            .id(id)
            .code(code)
            .sender_fault(sender_fault)
            .build()
            .unwrap()
    }

    #[test]
    fn each_batch_entry_gets_its_own_result() {
        let output = SendMessageBatchOutput::builder()
            .successful(
                SendMessageBatchResultEntry::builder()
                    .id("0")
                    .message_id("m0")
                    .md5_of_message_body("x")
                    .build()
                    .unwrap(),
            )
            .failed(failed("1", "InternalError", false))
            .failed(failed("2", "InvalidMessageContents", true))
            .build()
            .unwrap();
        let results = entry_results(4, &output);
        assert!(results[0].is_ok());
        assert!(
            matches!(&results[1], Err(QueueError::Unavailable(r)) if r.contains("InternalError"))
        );
        assert!(
            matches!(&results[2], Err(QueueError::Storage(r)) if r.contains("InvalidMessageContents"))
        );
        assert!(
            matches!(&results[3], Err(QueueError::Storage(_))),
            "an entry SQS did not report is not taken as sent"
        );
    }

    fn status(code: u16) -> HttpResponse {
        HttpResponse::new(code.try_into().unwrap(), "".into())
    }

    #[test]
    fn throttling_server_errors_and_transport_failures_are_retryable() {
        let throttled =
            ReceiveMessageError::generic(ErrorMetadata::builder().code("RequestThrottled").build());
        let errors: [SdkError<ReceiveMessageError, HttpResponse>; 4] = [
            SdkError::service_error(throttled, status(400)),
            SdkError::service_error(
                ReceiveMessageError::generic(
                    ErrorMetadata::builder().code("InternalError").build(),
                ),
                status(500),
            ),
            SdkError::timeout_error("no answer in time"),
            SdkError::dispatch_failure(ConnectorError::io("connection refused".into())),
        ];
        for err in errors {
            let classified = service_error(err);
            assert!(
                matches!(classified, QueueError::Unavailable(_)),
                "{classified:?}"
            );
        }
    }

    #[test]
    fn other_refusals_are_not_retryable() {
        let missing = ReceiveMessageError::QueueDoesNotExist(
            QueueDoesNotExist::builder()
                .message("no such queue")
                .build(),
        );
        let classified = service_error(SdkError::service_error(missing, status(400)));
        assert!(
            matches!(&classified, QueueError::Storage(r) if r.contains("no such queue")),
            "{classified:?}"
        );
    }

    #[test]
    fn a_message_not_in_flight_means_the_receipt_is_not_current() {
        let not_inflight =
            ChangeMessageVisibilityError::MessageNotInflight(MessageNotInflight::builder().build());
        assert!(receipt_not_current(&SdkError::service_error(
            not_inflight,
            status(400)
        )));
        let throttled = ChangeMessageVisibilityError::generic(
            ErrorMetadata::builder().code("RequestThrottled").build(),
        );
        assert!(!receipt_not_current(&SdkError::service_error(
            throttled,
            status(400)
        )));
    }
}
