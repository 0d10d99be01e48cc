//! End to end on embedded defaults: `cellmail up` as a child process, tenants created through
//! `Control`, mail sent through the router's `Sender`, and checked in the file sink.

use std::collections::HashMap;
use std::time::Duration;

use cellmail_proto::size::SES_MESSAGE_BYTES;
use cellmail_proto::v1;
use cellmail_tests::{Platform, authorized, message, wait_for};
use tonic::Code;
use tonic_types::StatusExt;

const DELIVERY: Duration = Duration::from_secs(20);

fn parse(path: &std::path::Path) -> mail_parser::Message<'static> {
    let raw = std::fs::read(path).unwrap();
    mail_parser::MessageParser::default()
        .parse(&raw)
        .unwrap()
        .into_owned()
}

fn header(parsed: &mail_parser::Message<'_>, name: &str) -> String {
    parsed
        .header_raw(name)
        .unwrap_or_default()
        .trim()
        .to_owned()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn two_tenants_on_different_cells_get_their_mail_with_the_right_headers() {
    let dir = tempfile::tempdir().unwrap();
    let platform = Platform::start(dir.path(), &[]).unwrap();
    let (acme_cell, acme_key) = platform
        .create_tenant("acme", &["acme.example"])
        .await
        .unwrap();
    let (beta_cell, beta_key) = platform
        .create_tenant("beta", &["beta.example"])
        .await
        .unwrap();
    assert_ne!(
        acme_cell, beta_cell,
        "the second tenant goes to the cell with more headroom"
    );

    let mut sender = platform.sender().await.unwrap();
    let mut acme_message = message(
        "Acme Shop <shop@acme.example>",
        "jane@example.com",
        "order-1",
    );
    acme_message.cc = vec!["Accounts <accounts@example.com>".into()];
    acme_message.html = "<p>Thanks!</p>".into();
    acme_message.tags = HashMap::from([("campaign".into(), "receipts".into())]);
    let acme = sender
        .send(authorized(&acme_key, acme_message))
        .await
        .unwrap()
        .into_inner();
    let beta = sender
        .send(authorized(
            &beta_key,
            message("hi@beta.example", "joe@example.com", ""),
        ))
        .await
        .unwrap()
        .into_inner();
    assert_eq!(acme.recipients.len(), 2);
    assert!(
        acme.recipients
            .iter()
            .all(|r| r.state == v1::RecipientState::Accepted as i32)
    );

    let acme_files = wait_for(DELIVERY, "acme's mail", || {
        Some(platform.mail_of("acme")).filter(|f| !f.is_empty())
    })
    .await
    .unwrap();
    let beta_files = wait_for(DELIVERY, "beta's mail", || {
        Some(platform.mail_of("beta")).filter(|f| !f.is_empty())
    })
    .await
    .unwrap();
    assert_eq!(acme_files.len(), 1);
    assert_eq!(beta_files.len(), 1);
    assert!(acme_files[0].ends_with(format!("acme/{}.eml", acme.message_id)));
    assert!(beta_files[0].ends_with(format!("beta/{}.eml", beta.message_id)));

    let mail = parse(&acme_files[0]);
    assert_eq!(
        mail.message_id(),
        Some(format!("{}@acme.example", acme.message_id).as_str())
    );
    assert_eq!(
        mail.from().unwrap().first().unwrap().address(),
        Some("shop@acme.example")
    );
    assert_eq!(
        mail.from().unwrap().first().unwrap().name(),
        Some("Acme Shop")
    );
    assert_eq!(
        mail.to().unwrap().first().unwrap().address(),
        Some("jane@example.com")
    );
    assert_eq!(
        mail.cc().unwrap().first().unwrap().address(),
        Some("accounts@example.com")
    );
    assert_eq!(mail.subject(), Some("Your receipt"));
    assert!(mail.date().is_some());
    assert_eq!(mail.body_text(0).unwrap().trim(), "Thanks for your order.");
    assert_eq!(mail.body_html(0).unwrap().trim(), "<p>Thanks!</p>");
    assert_eq!(header(&mail, "X-Cellmail-Tag-campaign"), "receipts");
    assert_eq!(header(&mail, "X-Cellmail-Tenant"), "acme");
    assert_eq!(header(&mail, "X-Cellmail-Idempotency-Key"), "order-1");
    assert_eq!(
        parse(&beta_files[0])
            .from()
            .unwrap()
            .first()
            .unwrap()
            .address(),
        Some("hi@beta.example")
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bad_requests_are_refused_naming_the_field_and_nothing_is_sent() {
    let dir = tempfile::tempdir().unwrap();
    let platform = Platform::start(dir.path(), &[]).unwrap();
    let (_, acme_key) = platform
        .create_tenant("acme", &["acme.example"])
        .await
        .unwrap();
    platform
        .create_tenant("beta", &["beta.example"])
        .await
        .unwrap();
    let mut sender = platform.sender().await.unwrap();
    let good = || message("shop@acme.example", "jane@example.com", "");

    let cases: Vec<(&str, v1::SendRequest)> = vec![
        (
            "message_class",
            v1::SendRequest {
                message_class: 7,
                ..good()
            },
        ),
        (
            "from_address",
            v1::SendRequest {
                from_address: "shop at acme".into(),
                ..good()
            },
        ),
        (
            "to[0]",
            v1::SendRequest {
                to: vec!["jane@".into()],
                ..good()
            },
        ),
        (
            "to",
            v1::SendRequest {
                to: vec![],
                ..good()
            },
        ),
        (
            "to",
            v1::SendRequest {
                to: (0..51).map(|i| format!("u{i}@example.com")).collect(),
                ..good()
            },
        ),
        (
            "subject",
            v1::SendRequest {
                subject: "Hi\r\nBcc: all@example.com".into(),
                ..good()
            },
        ),
        (
            "text",
            v1::SendRequest {
                text: String::new(),
                ..good()
            },
        ),
        (
            "reply_to[0]",
            v1::SendRequest {
                reply_to: vec!["x\n@acme.example".into()],
                ..good()
            },
        ),
        // Its error quotes a short prefix of it, not all of it.
        (
            "to[1]",
            v1::SendRequest {
                to: vec![
                    "jane@example.com".into(),
                    format!("{}@example.com", "a".repeat(6_000)),
                ],
                ..good()
            },
        ),
        // Over SES's 40 MB: read, and refused naming its largest part.
        (
            "html",
            v1::SendRequest {
                html: "h".repeat(50 * 1024 * 1024),
                ..good()
            },
        ),
        // Over what the router reads at all: refused naming the message.
        (
            "message",
            v1::SendRequest {
                text: "t".repeat(cellmail_proto::size::decode_limit(SES_MESSAGE_BYTES) + 1),
                ..good()
            },
        ),
    ];
    for (field, request) in cases {
        let status = sender
            .send(authorized(&acme_key, request))
            .await
            .unwrap_err();
        assert_eq!(status.code(), Code::InvalidArgument, "{field}: {status:?}");
        assert!(
            status.message().starts_with(&format!("{field}:")),
            "{field}: {}",
            status.message()
        );
        assert!(
            status.message().len() < 512,
            "{field}: {}",
            status.message()
        );
        let violations = status
            .get_details_bad_request()
            .expect("field violation details")
            .field_violations;
        assert_eq!(violations[0].field, field);
        if ["html", "message"].contains(&field) {
            let limit = format!("at most {SES_MESSAGE_BYTES} bytes");
            assert!(status.message().contains(&limit), "{}", status.message());
        }
    }

    let no_key = sender.send(tonic::Request::new(good())).await.unwrap_err();
    assert_eq!(no_key.code(), Code::Unauthenticated);
    let unknown = sender
        .send(authorized("cm_000000000000_nope", good()))
        .await
        .unwrap_err();
    assert_eq!(unknown.code(), Code::Unauthenticated);
    let mut basic = tonic::Request::new(good());
    basic.metadata_mut().insert(
        "authorization",
        format!("Basic {acme_key}").parse().unwrap(),
    );
    assert_eq!(
        sender.send(basic).await.unwrap_err().code(),
        Code::Unauthenticated
    );

    let spoofed = sender
        .send(authorized(
            &acme_key,
            message("ceo@beta.example", "jane@example.com", ""),
        ))
        .await
        .unwrap_err();
    assert_eq!(spoofed.code(), Code::PermissionDenied);
    assert!(
        spoofed.message().contains("beta.example"),
        "{}",
        spoofed.message()
    );

    // Nothing refused above was queued: one good send later, acme has exactly one message
    // and beta none.
    let sent = sender
        .send(authorized(&acme_key, good()))
        .await
        .unwrap()
        .into_inner();
    let files = wait_for(DELIVERY, "the good message", || {
        Some(platform.mail_of("acme")).filter(|f| !f.is_empty())
    })
    .await
    .unwrap();
    tokio::time::sleep(Duration::from_millis(500)).await;
    assert_eq!(platform.mail_of("acme"), files);
    assert!(files[0].ends_with(format!("{}.eml", sent.message_id)));
    assert!(platform.mail_of("beta").is_empty());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_retried_send_returns_the_first_message_id_and_is_sent_once() {
    let dir = tempfile::tempdir().unwrap();
    let platform = Platform::start(dir.path(), &[]).unwrap();
    let (_, acme_key) = platform
        .create_tenant("acme", &["acme.example"])
        .await
        .unwrap();
    let (_, beta_key) = platform
        .create_tenant("beta", &["beta.example"])
        .await
        .unwrap();
    let sender = platform.sender().await.unwrap();

    let attempts: Vec<_> = (0..8)
        .map(|_| {
            let (mut sender, key) = (sender.clone(), acme_key.clone());
            tokio::spawn(async move {
                sender
                    .send(authorized(
                        &key,
                        message("a@acme.example", "j@example.com", "once"),
                    ))
                    .await
            })
        })
        .collect();
    let mut ids = Vec::new();
    for attempt in attempts {
        ids.push(attempt.await.unwrap().unwrap().into_inner().message_id);
    }
    let later = sender
        .clone()
        .send(authorized(
            &acme_key,
            message("a@acme.example", "j@example.com", "once"),
        ))
        .await
        .unwrap();
    ids.push(later.into_inner().message_id);
    assert!(ids.iter().all(|id| *id == ids[0]), "{ids:?}");

    // The same key is another message for another tenant.
    let beta = sender
        .clone()
        .send(authorized(
            &beta_key,
            message("b@beta.example", "j@example.com", "once"),
        ))
        .await
        .unwrap();
    assert_ne!(beta.into_inner().message_id, ids[0]);

    wait_for(DELIVERY, "acme's message", || {
        Some(platform.mail_of("acme")).filter(|f| !f.is_empty())
    })
    .await
    .unwrap();
    tokio::time::sleep(Duration::from_millis(500)).await;
    assert_eq!(platform.mail_of("acme").len(), 1, "sent exactly once");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn queued_mail_survives_a_crash_and_is_delivered_after_restart() {
    let dir = tempfile::tempdir().unwrap();
    let platform = Platform::start(dir.path(), &["--cell-workers", "0"]).unwrap();
    let (_, key) = platform
        .create_tenant("acme", &["acme.example"])
        .await
        .unwrap();
    let mut sender = platform.sender().await.unwrap();
    let mut ids = Vec::new();
    for n in 0..40 {
        let sent = sender
            .send(authorized(
                &key,
                message("a@acme.example", "j@example.com", &format!("k{n}")),
            ))
            .await
            .unwrap();
        ids.push(sent.into_inner().message_id);
    }
    tokio::time::sleep(Duration::from_millis(300)).await;
    assert!(
        platform.mail_of("acme").is_empty(),
        "no worker ran, so nothing may be sent yet"
    );
    platform.kill().unwrap();

    let platform = Platform::start(dir.path(), &[]).unwrap();
    let files = wait_for(DELIVERY, "all 40 queued messages", || {
        Some(platform.mail_of("acme")).filter(|f| f.len() >= 40)
    })
    .await
    .unwrap();
    let mut delivered: Vec<String> = files
        .iter()
        .map(|f| f.file_stem().unwrap().to_string_lossy().into_owned())
        .collect();
    delivered.sort();
    ids.sort();
    assert_eq!(delivered, ids, "every acknowledged message delivered once");

    // The registry kept the tenant and its key; the cell kept the idempotency window.
    let mut sender = platform.sender().await.unwrap();
    let again = sender
        .send(authorized(
            &key,
            message("a@acme.example", "j@example.com", "k7"),
        ))
        .await
        .unwrap();
    assert!(ids.contains(&again.into_inner().message_id));
    tokio::time::sleep(Duration::from_millis(500)).await;
    assert_eq!(platform.mail_of("acme").len(), 40);
    platform.stop().unwrap();
}
