//! The SES mailer against the AWS emulator (moto): what the emulator records as sent, what
//! it was asked on the wire (configuration set, tags), what the mailer provisioned, and how
//! an emulator-side refusal is classified.

use std::collections::BTreeMap;
use std::sync::{Arc, Mutex};

use cellmail_cell::mailer::ses::{SesMailer, SesSettings};
use cellmail_cell::mailer::{Mailer, MailerError, mailbox_text};
use cellmail_cell::message::{Mailbox, Message};
use cellmail_proto::{MessageClass, MessageId, TenantId};
use serde_json::{Value, json};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};

/// A tenant no other test uses.
fn tenant() -> TenantId {
    TenantId::new(format!(
        "t{}",
        MessageId::generate().to_string().to_lowercase()
    ))
    .unwrap()
}

fn mailbox(name: Option<&str>, email: &str) -> Mailbox {
    Mailbox {
        name: name.map(Into::into),
        email: email.into(),
    }
}

/// A message from `shop@<tenant>.example` with a subject no other test uses.
fn message(tenant: &TenantId) -> Message {
    let id = MessageId::generate();
    Message {
        id,
        tenant: tenant.clone(),
        class: MessageClass::Transactional,
        idempotency_key: String::new(),
        from: mailbox(Some("Acme Shop"), &format!("shop@{tenant}.example")),
        to: vec![mailbox(Some("Jane Doe"), "jane@example.com")],
        cc: vec![mailbox(None, "cc@example.com")],
        bcc: vec![mailbox(None, "audit@example.com")],
        reply_to: vec![mailbox(None, &format!("help@{tenant}.example"))],
        subject: format!("Your receipt {id}"),
        text: "Thanks for your order.".into(),
        html: String::new(),
        tags: [("campaign".to_owned(), "fall-2026".to_owned())].into(),
        accepted_at_ms: 0,
    }
}

async fn mailer(settings: SesSettings) -> SesMailer {
    SesMailer::new(&cellmail_tests::aws_config().await, settings)
}

/// The emulator's `host:port`.
fn emulator() -> String {
    cellmail_tests::aws_endpoint()
        .trim_start_matches("http://")
        .trim_end_matches('/')
        .to_owned()
}

/// The messages the emulator's SES says it sent (its model store, `/moto-api/data.json`).
async fn sent_by_the_emulator() -> Vec<Value> {
    let authority = emulator();
    let mut stream = TcpStream::connect(&authority).await.unwrap();
    let request = format!(
        "GET /moto-api/data.json HTTP/1.1\r\nHost: {authority}\r\nConnection: close\r\n\r\n"
    );
    stream.write_all(request.as_bytes()).await.unwrap();
    let mut response = Vec::new();
    stream.read_to_end(&mut response).await.unwrap();
    let response = String::from_utf8(response).unwrap();
    let (head, body) = response.split_once("\r\n\r\n").unwrap();
    assert!(head.contains(" 200 "), "{head}");
    let data: Value = serde_json::from_str(body).unwrap();
    data["ses"]["Message"]
        .as_array()
        .cloned()
        .unwrap_or_default()
}

/// A relay in front of the emulator that keeps the bytes of every request it forwards, so
/// a test sees what the mailer put on the wire (the emulator keeps no configuration set or
/// tags with the messages it sends).
struct Tap {
    endpoint: String,
    connections: Arc<Mutex<Vec<Sent>>>,
}

/// What one client connection has sent so far.
type Sent = Arc<Mutex<Vec<u8>>>;

impl Tap {
    async fn start() -> Self {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let endpoint = format!("http://{}", listener.local_addr().unwrap());
        let connections = Arc::new(Mutex::new(Vec::new()));
        let kept = connections.clone();
        tokio::spawn(async move {
            while let Ok((client, _)) = listener.accept().await {
                let Ok(server) = TcpStream::connect(emulator()).await else {
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
    fn send_email_requests(&self) -> Vec<Value> {
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

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_sent_message_reaches_ses_with_the_tenants_configuration_set_and_tags() {
    let tenant = tenant();
    let message = message(&tenant);
    let tap = Tap::start().await;
    let through_tap = cellmail_tests::aws_config()
        .await
        .to_builder()
        .endpoint_url(&tap.endpoint)
        .build();
    SesMailer::new(&through_tap, SesSettings::default())
        .send(&message)
        .await
        .unwrap();

    // The emulator's own record: it sent the message, from and to whom it says.
    let sent = sent_by_the_emulator().await;
    let ours = sent
        .iter()
        .find(|m| m["subject"] == message.subject.as_str())
        .unwrap_or_else(|| panic!("the emulator recorded no message {:?}", message.subject));
    assert_eq!(ours["source"], mailbox_text(&message.from).as_str());
    assert_eq!(
        ours["destinations"],
        json!({
            "ToAddresses": [mailbox_text(&message.to[0])],
            "CcAddresses": ["cc@example.com"],
            "BccAddresses": ["audit@example.com"],
        })
    );
    assert_eq!(ours["body"], "Thanks for your order.");

    // What it was asked on the wire: the tenant's configuration set and cellmail's tags.
    let request = tap
        .send_email_requests()
        .into_iter()
        .find(|r| r["Content"]["Simple"]["Subject"]["Data"] == message.subject.as_str())
        .expect("the SendEmail request went through the tap");
    assert_eq!(
        request["ConfigurationSetName"],
        format!("cellmail-{tenant}").as_str()
    );
    let tags: BTreeMap<&str, &str> = request["EmailTags"]
        .as_array()
        .unwrap()
        .iter()
        .map(|t| (t["Name"].as_str().unwrap(), t["Value"].as_str().unwrap()))
        .collect();
    let id = message.id.to_string();
    assert_eq!(
        tags,
        BTreeMap::from([
            ("tenant_id", tenant.as_str()),
            ("message_class", "transactional"),
            ("message_id", id.as_str()),
            ("campaign", "fall-2026"),
        ])
    );
    assert_eq!(
        request["ReplyToAddresses"],
        json!([format!("help@{tenant}.example")])
    );
    assert_eq!(
        request["Content"]["Simple"]["Body"]["Text"]["Charset"],
        "UTF-8"
    );
    assert!(request.get("TenantName").is_none(), "tenants are off");

    // What the mailer provisioned before the send.
    let ses = aws_sdk_sesv2::Client::new(&cellmail_tests::aws_config().await);
    // (moto answers GetConfigurationSet with JSON the SDK cannot read; listing works.)
    let sets = ses.list_configuration_sets().send().await.unwrap();
    assert!(
        sets.configuration_sets()
            .contains(&format!("cellmail-{tenant}")),
        "the tenant's configuration set exists"
    );
    ses.get_email_identity()
        .email_identity(format!("{tenant}.example"))
        .send()
        .await
        .expect("the From domain's identity exists");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_restarted_mailer_sends_for_a_tenant_already_provisioned() {
    let tenant = tenant();
    mailer(SesSettings::default())
        .await
        .send(&message(&tenant))
        .await
        .unwrap();
    let again = message(&tenant);
    mailer(SesSettings::default())
        .await
        .send(&again)
        .await
        .unwrap();
    assert!(
        sent_by_the_emulator()
            .await
            .iter()
            .any(|m| m["subject"] == again.subject.as_str())
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_send_from_an_identity_ses_does_not_have_is_refused_permanently() {
    let tenant = tenant();
    let mailer = mailer(SesSettings::default()).await;
    mailer.send(&message(&tenant)).await.unwrap();
    // The identity goes away behind the mailer's back (deleted, or never verified in SES).
    aws_sdk_sesv2::Client::new(&cellmail_tests::aws_config().await)
        .delete_email_identity()
        .email_identity(format!("{tenant}.example"))
        .send()
        .await
        .unwrap();
    let refused = mailer.send(&message(&tenant)).await;
    assert!(
        matches!(&refused, Err(MailerError::Permanent { reason }) if reason.contains("not verified")),
        "{refused:?}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn with_tenants_on_an_endpoint_without_tenants_still_sends() {
    let mailer = mailer(SesSettings {
        tenant_names: true,
        ..SesSettings::default()
    })
    .await;
    let (first, second) = (message(&tenant()), message(&tenant()));
    mailer.send(&first).await.unwrap();
    mailer.send(&second).await.unwrap();
    let sent = sent_by_the_emulator().await;
    for message in [&first, &second] {
        assert!(
            sent.iter()
                .any(|m| m["subject"] == message.subject.as_str()),
            "{} was sent",
            message.subject
        );
    }
}
