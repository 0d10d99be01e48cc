//! The AWS API emulator (moto) the test command starts: how to reach it, what it recorded
//! as sent, and a relay that shows what a client put on the wire (the emulator keeps no
//! configuration set or tags with the messages it sends).

use std::sync::{Arc, Mutex};

use serde_json::Value;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};

/// The AWS API emulator (`http://host:port`) the test command started.
pub fn aws_endpoint() -> String {
    std::env::var("CELLMAIL_TEST_AWS_ENDPOINT").unwrap_or_else(|_| {
        panic!(
            "CELLMAIL_TEST_AWS_ENDPOINT is not set: run ./deploy/local/test.sh, which starts the AWS emulator"
        )
    })
}

/// AWS configuration for the emulator: a cell's settings pointing at it, in us-east-1, with
/// dummy credentials (the emulator checks none).
pub async fn aws_config() -> aws_config::SdkConfig {
    let settings = cellmail_cell::aws::AwsSettings {
        region: Some("us-east-1".to_owned()),
        endpoint: Some(aws_endpoint()),
        profile: None,
    };
    let credentials =
        aws_sdk_sesv2::config::Credentials::new("testing", "testing", None, None, "cellmail-tests");
    settings
        .sdk_config()
        .await
        .to_builder()
        .credentials_provider(aws_sdk_sesv2::config::SharedCredentialsProvider::new(
            credentials,
        ))
        .build()
}

/// The emulator's `host:port`.
pub fn emulator() -> String {
    aws_endpoint()
        .trim_start_matches("http://")
        .trim_end_matches('/')
        .to_owned()
}

/// The messages the emulator's SES says it sent (its model store, `/moto-api/data.json`).
pub async fn sent_by_the_emulator() -> Vec<Value> {
    let body = crate::http_get(&emulator(), "/moto-api/data.json")
        .await
        .unwrap();
    let data: Value = serde_json::from_str(&body).unwrap();
    data["ses"]["Message"]
        .as_array()
        .cloned()
        .unwrap_or_default()
}

/// A relay in front of the emulator that keeps the bytes of every request it forwards, so
/// a test sees what the mailer put on the wire (the emulator keeps no configuration set or
/// tags with the messages it sends).
pub struct Tap {
    pub endpoint: String,
    connections: Arc<Mutex<Vec<Sent>>>,
}

/// What one client connection has sent so far.
type Sent = Arc<Mutex<Vec<u8>>>;

impl Tap {
    /// A relay in front of the emulator.
    pub async fn start() -> Self {
        Self::in_front_of(emulator()).await
    }

    /// A relay in front of `upstream` (`host:port`: the emulator, or an SES stand-in).
    pub async fn in_front_of(upstream: String) -> Self {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let endpoint = format!("http://{}", listener.local_addr().unwrap());
        let connections = Arc::new(Mutex::new(Vec::new()));
        let kept = connections.clone();
        tokio::spawn(async move {
            while let Ok((client, _)) = listener.accept().await {
                let Ok(server) = TcpStream::connect(&upstream).await else {
                    continue;
                };
                let seen = Arc::new(Mutex::new(Vec::new()));
                kept.lock().unwrap().push(seen.clone());
                tokio::spawn(relay(client, server, seen));
            }
        });
        Self {
            endpoint,
            connections,
        }
    }

    /// The JSON bodies of the `SendEmail` requests that went through.
    pub fn send_email_requests(&self) -> Vec<Value> {
        let connections = self.connections.lock().unwrap();
        connections
            .iter()
            .flat_map(|seen| send_email_bodies(&seen.lock().unwrap()))
            .collect()
    }
}

async fn relay(client: TcpStream, server: TcpStream, seen: Sent) {
    let (mut client_read, mut client_write) = client.into_split();
    let (mut server_read, mut server_write) = server.into_split();
    let upstream = async move {
        let mut buf = vec![0; 16 * 1024];
        while let Ok(n @ 1..) = client_read.read(&mut buf).await {
            seen.lock().unwrap().extend_from_slice(&buf[..n]);
            if server_write.write_all(&buf[..n]).await.is_err() {
                break;
            }
        }
        let _ = server_write.shutdown().await;
    };
    let downstream = async move {
        let _ = tokio::io::copy(&mut server_read, &mut client_write).await;
        let _ = client_write.shutdown().await;
    };
    tokio::join!(upstream, downstream);
}

/// The bodies of the `POST /v2/email/outbound-emails` requests in one connection's bytes.
fn send_email_bodies(bytes: &[u8]) -> Vec<Value> {
    let text = String::from_utf8_lossy(bytes);
    let mut bodies = Vec::new();
    for (start, _) in text.match_indices("POST /v2/email/outbound-emails ") {
        let request = &text[start..];
        let Some((head, rest)) = request.split_once("\r\n\r\n") else {
            continue;
        };
        let length = head
            .lines()
            .find_map(|line| {
                let (name, value) = line.split_once(':')?;
                name.eq_ignore_ascii_case("content-length")
                    .then(|| value.trim().parse::<usize>().ok())?
            })
            .unwrap_or(0);
        if let Some(Ok(body)) = rest.get(..length).map(serde_json::from_str) {
            bodies.push(body);
        }
    }
    bodies
}

/// A fixture from `tests/fixtures/ses-events` (raw, or wrapped by SNS or EventBridge),
/// attributed by its tags to `tenant`'s message `id`.
pub fn ses_event(name: &str, tenant: &str, id: &str) -> String {
    fn tag(record: &mut serde_json::Value, tenant: &str, id: &str) {
        let tags = &mut record["mail"]["tags"];
        tags["tenant_id"] = serde_json::json!([tenant]);
        tags["message_id"] = serde_json::json!([id]);
    }
    let path = std::path::Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("fixtures/ses-events")
        .join(name);
    let mut event: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(path).unwrap()).unwrap();
    if let Some(inner) = event["Message"].as_str() {
        let mut inner: serde_json::Value = serde_json::from_str(inner).unwrap();
        tag(&mut inner, tenant, id);
        event["Message"] = inner.to_string().into();
    } else if event["detail"].is_object() {
        tag(&mut event["detail"], tenant, id);
    } else {
        tag(&mut event, tenant, id);
    }
    event.to_string()
}

/// Puts `records` on the emulator's SQS queue `queue` (a cell's feedback queue, as SES
/// publishes through SNS or EventBridge).
pub async fn put_on_queue(queue: &str, records: &[String]) -> anyhow::Result<()> {
    let sqs = aws_sdk_sqs::Client::new(&aws_config().await);
    let url = sqs
        .get_queue_url()
        .queue_name(queue)
        .send()
        .await?
        .queue_url
        .ok_or_else(|| anyhow::anyhow!("queue {queue} has no URL"))?;
    for record in records {
        sqs.send_message()
            .queue_url(&url)
            .message_body(record)
            .send()
            .await?;
    }
    Ok(())
}
