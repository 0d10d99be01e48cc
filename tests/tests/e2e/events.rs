//! Tenants' events end to end on `cellmail up`: each step of a send, a bounce and a
//! complaint (the file sink's mailbox simulator) listed for its own tenant only, in pages
//! and by filter; bad listings are refused naming the field.

use std::time::Duration;

use cellmail_proto::v1::{self, sender_client::SenderClient};
use cellmail_tests::{Platform, authorized, message, until_ok};
use tonic::Code;
use tonic::transport::Channel;
use tonic_types::StatusExt;

/// Every event `key`'s tenant has that `request` asks for, page after page.
pub(crate) async fn all_events(
    sender: &SenderClient<Channel>,
    key: &str,
    mut request: v1::ListEventsRequest,
) -> Vec<v1::Event> {
    let mut events = Vec::new();
    loop {
        let page = (sender.clone())
            .list_events(authorized(key, request.clone()))
            .await
            .unwrap()
            .into_inner();
        events.extend(page.events);
        if page.next_page_token.is_empty() {
            return events;
        }
        request.page_token = page.next_page_token;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_tenant_lists_each_step_of_its_own_mail_and_nothing_of_another_tenants() {
    let dir = tempfile::tempdir().unwrap();
    let platform = Platform::start(dir.path(), &["--cells", "1"]).unwrap();
    let (_, a) = platform
        .create_tenant("ev-a", &["a.example"])
        .await
        .unwrap();
    let (_, b) = platform
        .create_tenant("ev-b", &["b.example"])
        .await
        .unwrap();
    let sender = platform.sender().await.unwrap();
    let mut send = message("x@a.example", "bounce@simulator.amazonses.com", "a-1");
    send.to.push("complaint@simulator.amazonses.com".into());
    send.tags.insert("campaign".into(), "fall".into());
    let sent = (sender.clone())
        .send(authorized(&a, send))
        .await
        .unwrap()
        .into_inner();
    (sender.clone())
        .send(authorized(
            &b,
            message("x@b.example", "j@example.com", "b-1"),
        ))
        .await
        .unwrap();

    // Accepted, sent, then the simulator's bounce and complaint, each for its recipient.
    let everything = v1::ListEventsRequest::default();
    let events = until_ok(Duration::from_secs(20), || async {
        let events = all_events(&sender, &a, everything.clone()).await;
        let types: Vec<&str> = events.iter().map(|e| e.r#type.as_str()).collect();
        for wanted in ["accepted", "sent", "bounced", "complained"] {
            anyhow::ensure!(types.contains(&wanted), "{types:?}");
        }
        Ok(events)
    })
    .await
    .unwrap();
    assert!(events.iter().all(|e| e.message_id == sent.message_id));
    assert!(
        events
            .iter()
            .all(|e| e.tags.get("campaign").map(String::as_str) == Some("fall"))
    );
    let bounced = events.iter().find(|e| e.r#type == "bounced").unwrap();
    assert_eq!(bounced.recipient, "bounce@simulator.amazonses.com");
    assert!(
        bounced.detail.starts_with("Permanent/"),
        "{}",
        bounced.detail
    );
    let ids: std::collections::BTreeSet<&str> = events.iter().map(|e| e.id.as_str()).collect();
    assert_eq!(ids.len(), events.len(), "each event has an id of its own");

    // Pages of one event list the same events; a filter picks by type and recipient.
    let paged = all_events(
        &sender,
        &a,
        v1::ListEventsRequest {
            page_size: 1,
            ..Default::default()
        },
    )
    .await;
    assert_eq!(paged, events);
    let complaints = all_events(
        &sender,
        &a,
        v1::ListEventsRequest {
            types: vec!["complained".into(), "bounced".into()],
            recipient: "COMPLAINT@simulator.amazonses.com".into(),
            ..Default::default()
        },
    )
    .await;
    assert_eq!(complaints.len(), 1);
    assert_eq!(complaints[0].r#type, "complained");

    // B sees its own events only, even naming A's message.
    let b_events = all_events(&sender, &b, everything.clone()).await;
    assert!(!b_events.is_empty());
    assert!(b_events.iter().all(|e| e.message_id != sent.message_id));
    let by_id = v1::ListEventsRequest {
        message_id: sent.message_id.clone(),
        ..Default::default()
    };
    assert!(all_events(&sender, &b, by_id).await.is_empty());

    // Bad listings name the field; nothing else is read.
    for (request, field) in [
        (
            v1::ListEventsRequest {
                types: vec!["sent".into(), "openned".into()],
                ..Default::default()
            },
            "types[1]",
        ),
        (
            v1::ListEventsRequest {
                page_token: "not-a-token".into(),
                ..Default::default()
            },
            "page_token",
        ),
        (
            v1::ListEventsRequest {
                message_id: "x".repeat(500),
                ..Default::default()
            },
            "message_id",
        ),
        (
            v1::ListEventsRequest {
                page_size: 5000,
                ..Default::default()
            },
            "page_size",
        ),
        (
            v1::ListEventsRequest {
                from_ms: 10,
                to_ms: 5,
                ..Default::default()
            },
            "to_ms",
        ),
    ] {
        let refused = (sender.clone())
            .list_events(authorized(&a, request))
            .await
            .unwrap_err();
        assert_eq!(refused.code(), Code::InvalidArgument, "{field}");
        let violation = &refused.get_details_bad_request().unwrap().field_violations[0];
        assert_eq!(violation.field, field);
        assert!(violation.description.len() < 300, "{violation:?}");
    }
}
