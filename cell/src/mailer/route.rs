//! The path SES's events take to a cell. Each SES cell has an SNS topic of its own,
//! `<configuration set prefix><cell>-events`; its SQS feedback queue is subscribed to it,
//! and the queue's policy lets that topic, and only it, send there. Each tenant's
//! configuration set gets an event destination that publishes [`EVENTS`] to the topic (see
//! [`super::ses`]). Each part is created if it is missing and left as it is if present, at
//! every start.

use aws_config::SdkConfig;
use aws_sdk_sesv2::types::EventType;
use cellmail_proto::CellId;

use crate::queue::sqs::SqsQueue;

/// What SES publishes to a cell: everything feedback, stats and breakers read.
pub const EVENTS: [EventType; 9] = [
    EventType::Send,
    EventType::Delivery,
    EventType::Bounce,
    EventType::Complaint,
    EventType::Reject,
    EventType::DeliveryDelay,
    EventType::RenderingFailure,
    EventType::Open,
    EventType::Click,
];

/// The name of cell `cell`'s events topic.
pub fn topic_name(prefix: &str, cell: &CellId) -> String {
    format!("{prefix}{cell}-events")
}

/// Creates cell `cell`'s events topic and subscribes `queue`'s feedback queue to it: the
/// topic's ARN, for the configuration sets' event destinations.
pub async fn open(
    config: &SdkConfig,
    prefix: &str,
    cell: &CellId,
    queue: &SqsQueue,
) -> anyhow::Result<String> {
    let sns = aws_sdk_sns::Client::new(config);
    let name = topic_name(prefix, cell);
    let topic = sns
        .create_topic()
        .name(&name)
        .send()
        .await
        .map_err(|e| anyhow::anyhow!("creating SNS topic {name}: {}", display(&e)))?
        .topic_arn
        .ok_or_else(|| anyhow::anyhow!("SNS gave no ARN for topic {name}"))?;
    let queue_arn = queue.open_feedback_to(&topic).await?;
    sns.subscribe()
        .topic_arn(&topic)
        .protocol("sqs")
        .endpoint(&queue_arn)
        .send()
        .await
        .map_err(|e| anyhow::anyhow!("subscribing {queue_arn} to {topic}: {}", display(&e)))?;
    tracing::info!(%cell, %topic, queue = %queue_arn, "SES events reach the feedback queue through SNS");
    Ok(topic)
}

fn display<E: std::error::Error + 'static>(err: &E) -> String {
    aws_sdk_sns::error::DisplayErrorContext(err).to_string()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_cells_topic_is_named_after_it() {
        let cell = CellId::new("cell-1").unwrap();
        assert_eq!(topic_name("cellmail-", &cell), "cellmail-cell-1-events");
    }
}
