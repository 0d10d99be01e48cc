//! The SES mailer against the AWS emulator (moto): what the emulator records as sent, what
//! it was asked on the wire (configuration set, tags), what the mailer provisioned, and how
//! an emulator-side refusal is classified.

use std::collections::BTreeMap;

use cellmail_cell::mailer::ses::{SesMailer, SesSettings};
use cellmail_cell::mailer::{Mailer, MailerError, mailbox_text};
use cellmail_cell::message::{Mailbox, Message};
use cellmail_proto::{MessageClass, MessageId, TenantId};
use cellmail_tests::emulator::{Tap, sent_by_the_emulator};
use serde_json::json;

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
        traceparent: None,
    }
}

async fn mailer(settings: SesSettings) -> SesMailer {
    SesMailer::new(
        &cellmail_tests::emulator::aws_config().await,
        settings,
        None,
    )
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_sent_message_reaches_ses_with_the_tenants_configuration_set_and_tags() {
    let tenant = tenant();
    let message = message(&tenant);
    let tap = Tap::start().await;
    let through_tap = cellmail_tests::emulator::aws_config()
        .await
        .to_builder()
        .endpoint_url(&tap.endpoint)
        .build();
    SesMailer::new(&through_tap, SesSettings::default(), None)
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
    let ses = aws_sdk_sesv2::Client::new(&cellmail_tests::emulator::aws_config().await);
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
    aws_sdk_sesv2::Client::new(&cellmail_tests::emulator::aws_config().await)
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

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_forgotten_tenants_configuration_set_is_deleted_and_its_neighbours_stays() {
    let (gone, neighbour) = (tenant(), tenant());
    let mailer = mailer(SesSettings::default()).await;
    for tenant in [&gone, &neighbour] {
        mailer.send(&message(tenant)).await.unwrap();
    }
    let ses = aws_sdk_sesv2::Client::new(&cellmail_tests::emulator::aws_config().await);
    let listed = || async {
        let sets = ses.list_configuration_sets().send().await.unwrap();
        sets.configuration_sets().to_vec()
    };
    let (gone_set, neighbour_set) = (format!("cellmail-{gone}"), format!("cellmail-{neighbour}"));
    assert!(listed().await.contains(&gone_set));

    mailer.forget(&gone).await.unwrap();
    let sets = listed().await;
    assert!(!sets.contains(&gone_set), "{sets:?}");
    assert!(sets.contains(&neighbour_set), "{sets:?}");
    // (A delete of what is gone already is as good; moto answers that delete with a 500, so
    // the mailer's unit tests check how SES's NotFound answer is taken.)
    // The mailer no longer counts the set as made: a later send makes it again.
    mailer.send(&message(&gone)).await.unwrap();
    assert!(listed().await.contains(&gone_set));
}
