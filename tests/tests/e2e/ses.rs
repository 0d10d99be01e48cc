//! The SES mailer against the AWS emulator (moto): what the emulator records as sent, what
//! it was asked on the wire (configuration set, tags), what the mailer provisioned, and how
//! an emulator-side refusal is classified.

use std::collections::BTreeMap;

use cellmail_cell::mailer::ses::{SesMailer, SesSettings};
use cellmail_cell::mailer::{Identity, Mailer, MailerError, Setup, mailbox_text};
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
        headers: Vec::new(),
    }
}

/// Sends `message` as a cell's worker does: its From domain's identity prepared first.
async fn send(mailer: &SesMailer, message: &Message) -> Result<(), MailerError> {
    let setup = Setup::unlisted(message.from.domain());
    mailer.prepare(&message.tenant, &setup).await?;
    mailer.send(message).await
}

/// What a tenant sending from `identity` alone needs.
fn one(identity: Identity) -> Setup {
    Setup {
        identities: vec![identity],
        ..Setup::default()
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
    send(
        &SesMailer::new(&through_tap, SesSettings::default(), None),
        &message,
    )
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
    send(&mailer(SesSettings::default()).await, &message(&tenant))
        .await
        .unwrap();
    let again = message(&tenant);
    send(&mailer(SesSettings::default()).await, &again)
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
    send(&mailer, &message(&tenant)).await.unwrap();
    // The identity goes away behind the mailer's back (deleted, or never verified in SES).
    aws_sdk_sesv2::Client::new(&cellmail_tests::emulator::aws_config().await)
        .delete_email_identity()
        .email_identity(format!("{tenant}.example"))
        .send()
        .await
        .unwrap();
    let refused = send(&mailer, &message(&tenant)).await;
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
    send(&mailer, &first).await.unwrap();
    send(&mailer, &second).await.unwrap();
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
        send(&mailer, &message(tenant)).await.unwrap();
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
    send(&mailer, &message(&gone)).await.unwrap();
    assert!(listed().await.contains(&gone_set));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_domain_with_its_own_dkim_key_signs_with_it_even_if_ses_had_it_before() {
    use cellmail_cell::mailer::DkimSigning;
    let ses = cellmail_tests::ses_standin::SesStandIn::start(1000.0)
        .await
        .unwrap();
    let config = cellmail_tests::emulator::aws_config()
        .await
        .to_builder()
        .endpoint_url(&ses.endpoint)
        .build();
    let mailer = SesMailer::new(&config, SesSettings::default(), None);
    let own_key = || {
        let (private_key, _) = cellmail_registry::dkim::generate().unwrap();
        DkimSigning {
            selector: format!("cm{}", &MessageId::generate().to_string()[18..]).to_lowercase(),
            private_key: cellmail_registry::dkim::for_ses(&private_key),
        }
    };

    // An identity SES made with its own keys first is switched to the domain's.
    let (first, fresh) = (tenant(), tenant());
    let domain = format!("{first}.example");
    mailer
        .prepare(&first, &Setup::unlisted(&domain))
        .await
        .unwrap();
    assert_eq!(ses.dkim_of(&domain), None);
    let key = own_key();
    let mail_from = format!("bounce.{domain}");
    let with = Identity {
        domain: domain.clone(),
        dkim: Some(key.clone()),
        mail_from: Some(mail_from.clone()),
    };
    mailer.prepare(&first, &one(with)).await.unwrap();
    assert_eq!(
        ses.dkim_of(&domain),
        Some((key.selector.clone(), key.private_key.clone()))
    );
    let identity =
        aws_sdk_sesv2::Client::from_conf(aws_sdk_sesv2::config::Builder::from(&config).build())
            .get_email_identity()
            .email_identity(&domain)
            .send()
            .await
            .unwrap();
    let dkim = identity.dkim_attributes().unwrap();
    assert_eq!(
        dkim.signing_attributes_origin(),
        Some(&aws_sdk_sesv2::types::DkimSigningAttributesOrigin::External)
    );
    assert_eq!(dkim.tokens(), std::slice::from_ref(&key.selector));
    assert_eq!(
        identity.mail_from_attributes().unwrap().mail_from_domain(),
        mail_from
    );
    mailer.send(&message(&first)).await.unwrap();

    // SES says SUCCESS for the key and the MAIL FROM domain once DNS has their records,
    // the MX for the region the mailer sends in.
    let dns = cellmail_tests::dns::Zone::default();
    ses.resolve_with(dns.clone());
    let status = || async { mailer.identity_status(&domain).await.unwrap().unwrap() };
    let pending = status().await;
    assert_eq!(
        (pending.dkim.as_str(), pending.mail_from.as_str()),
        ("PENDING", "PENDING")
    );
    let key_record = format!("{}._domainkey.{domain}", key.selector);
    dns.publish(&key_record, "TXT", "v=DKIM1; k=rsa; p=MIIB");
    dns.publish(&mail_from, "MX", "10 feedback-smtp.eu-west-1.amazonses.com");
    let other_region = status().await;
    assert_eq!(
        (other_region.dkim.as_str(), other_region.mail_from.as_str()),
        ("SUCCESS", "PENDING")
    );
    assert_eq!(mailer.ses_region().as_deref(), Some("us-east-1"));
    dns.publish(&mail_from, "MX", "10 feedback-smtp.us-east-1.amazonses.com");
    assert_eq!(status().await.mail_from, "SUCCESS");

    // A new domain's identity is made with its key.
    let key = own_key();
    let identity = Identity {
        domain: format!("{fresh}.example"),
        dkim: Some(key.clone()),
        mail_from: None,
    };
    mailer.prepare(&fresh, &one(identity)).await.unwrap();
    assert_eq!(
        ses.dkim_of(&format!("{fresh}.example")),
        Some((key.selector, key.private_key))
    );
}
