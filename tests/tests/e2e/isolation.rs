//! Tenant isolation end to end: two tenants on the same cell (so they share its store),
//! tenant A's key against every path to tenant B's data, and feedback that suppresses for
//! one tenant only.

use std::time::Duration;

use cellmail_proto::v1::{self, sender_client::SenderClient};
use cellmail_tests::{Platform, authorized, get_message, message};
use tonic::Code;
use tonic::transport::Channel;

async fn suppressions(sender: &mut SenderClient<Channel>, key: &str) -> Vec<String> {
    let listed = sender
        .list_suppressions(authorized(key, v1::ListSuppressionsRequest::default()))
        .await
        .unwrap();
    listed
        .into_inner()
        .suppressions
        .into_iter()
        .map(|s| s.address)
        .collect()
}

fn states(response: &v1::SendResponse) -> Vec<(String, i32, i32)> {
    response
        .recipients
        .iter()
        .map(|r| (r.address.clone(), r.state, r.scope))
        .collect()
}

const ACCEPTED: i32 = v1::RecipientState::Accepted as i32;
const SUPPRESSED: i32 = v1::RecipientState::Suppressed as i32;
const NO_SCOPE: i32 = v1::SuppressionScope::Unspecified as i32;
const TENANT: i32 = v1::SuppressionScope::Tenant as i32;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn tenant_a_reaches_none_of_tenant_bs_data_and_bs_data_is_unchanged() {
    let dir = tempfile::tempdir().unwrap();
    let platform = Platform::start(dir.path(), &["--cells", "1"]).unwrap();
    let (a_cell, a) = platform.create_tenant("ta", &["a.example"]).await.unwrap();
    let (b_cell, b) = platform.create_tenant("tb", &["b.example"]).await.unwrap();
    assert_eq!(a_cell, b_cell, "both tenants share one cell and its store");
    let mut sender = platform.sender().await.unwrap();

    let b_sent = sender
        .send(authorized(
            &b,
            message("x@b.example", "joe@example.com", "b-1"),
        ))
        .await
        .unwrap()
        .into_inner();
    let add = v1::AddSuppressionRequest {
        address: "blocked@example.com".into(),
        reason: 0,
    };
    sender.add_suppression(authorized(&b, add)).await.unwrap();
    let b_before = sender
        .get_message(authorized(
            &b,
            v1::GetMessageRequest {
                message_id: b_sent.message_id.clone(),
            },
        ))
        .await
        .unwrap();

    // Send as B: from B's domain with A's key.
    let spoofed = sender
        .send(authorized(
            &a,
            message("x@b.example", "joe@example.com", "a-1"),
        ))
        .await
        .unwrap_err();
    assert_eq!(spoofed.code(), Code::PermissionDenied);
    // Read B's message.
    let read = sender
        .get_message(authorized(
            &a,
            v1::GetMessageRequest {
                message_id: b_sent.message_id.clone(),
            },
        ))
        .await
        .unwrap_err();
    assert_eq!(
        read.code(),
        Code::NotFound,
        "another tenant's message looks like no message"
    );
    // See or change B's suppression list.
    assert!(suppressions(&mut sender, &a).await.is_empty());
    let removed = sender
        .remove_suppression(authorized(
            &a,
            v1::RemoveSuppressionRequest {
                address: "blocked@example.com".into(),
            },
        ))
        .await
        .unwrap()
        .into_inner();
    assert!(!removed.removed);
    // B's list does not apply to A.
    let a_sent = sender
        .send(authorized(
            &a,
            message("x@a.example", "blocked@example.com", "a-2"),
        ))
        .await
        .unwrap()
        .into_inner();
    assert_eq!(
        states(&a_sent),
        [("blocked@example.com".into(), ACCEPTED, NO_SCOPE)]
    );
    // A's idempotency keys are not B's.
    let a_same_key = sender
        .send(authorized(
            &a,
            message("x@a.example", "joe@example.com", "b-1"),
        ))
        .await
        .unwrap()
        .into_inner();
    assert_ne!(a_same_key.message_id, b_sent.message_id);

    // B's data is as it was.
    assert_eq!(suppressions(&mut sender, &b).await, ["blocked@example.com"]);
    let b_blocked = sender
        .send(authorized(
            &b,
            message("x@b.example", "blocked@example.com", "b-2"),
        ))
        .await
        .unwrap()
        .into_inner();
    assert_eq!(
        states(&b_blocked),
        [("blocked@example.com".into(), SUPPRESSED, TENANT)]
    );
    let b_after = sender
        .get_message(authorized(
            &b,
            v1::GetMessageRequest {
                message_id: b_sent.message_id.clone(),
            },
        ))
        .await
        .unwrap();
    assert_eq!(
        b_after.into_inner().message_id,
        b_before.into_inner().message_id
    );
    let retried = sender
        .send(authorized(
            &b,
            message("x@b.example", "joe@example.com", "b-1"),
        ))
        .await
        .unwrap()
        .into_inner();
    assert_eq!(retried.message_id, b_sent.message_id);
    assert!(
        platform
            .mail_of("tb")
            .iter()
            .all(|f| !f.to_string_lossy().contains(&a_sent.message_id))
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_bounce_and_a_complaint_suppress_the_address_for_that_tenant_only() {
    let dir = tempfile::tempdir().unwrap();
    let platform = Platform::start(dir.path(), &["--cells", "1"]).unwrap();
    let (_, a) = platform.create_tenant("ta", &["a.example"]).await.unwrap();
    let (_, b) = platform.create_tenant("tb", &["b.example"]).await.unwrap();
    let mut sender = platform.sender().await.unwrap();
    let (bounce, complaint) = (
        "bounce+1@simulator.amazonses.com",
        "complaint+1@simulator.amazonses.com",
    );

    let mut first = message("news@a.example", bounce, "");
    first.cc = vec![complaint.into()];
    let sent = sender
        .send(authorized(&a, first))
        .await
        .unwrap()
        .into_inner();
    let id = sent.message_id.clone();
    // The file sink queues the simulator's feedback as it writes the message, so the
    // feedback may be recorded just before the worker records the message as sent.
    let (mut events, mut state) = (Vec::new(), String::new());
    for _ in 0..400 {
        let got = get_message(&sender, &a, &id).await.unwrap();
        events = got
            .events
            .iter()
            .map(|e| (e.r#type.clone(), e.recipient.clone()))
            .collect();
        state = got.state;
        if state == "SENT"
            && events.iter().any(|(t, _)| t == "BOUNCE")
            && events.iter().any(|(t, _)| t == "COMPLAINT")
        {
            break;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    assert_eq!(state, "SENT");
    assert!(
        events.contains(&("BOUNCE".into(), bounce.into())),
        "{events:?}"
    );
    assert!(
        events.contains(&("COMPLAINT".into(), complaint.into())),
        "{events:?}"
    );

    let mut again = message("news@a.example", bounce, "");
    again.to.push(complaint.into());
    again.to.push("fine@example.com".into());
    let a_again = sender
        .send(authorized(&a, again.clone()))
        .await
        .unwrap()
        .into_inner();
    assert_eq!(
        states(&a_again),
        [
            (bounce.into(), SUPPRESSED, TENANT),
            (complaint.into(), SUPPRESSED, TENANT),
            ("fine@example.com".into(), ACCEPTED, NO_SCOPE)
        ]
    );
    assert!(
        a_again.recipients[0].reason.contains("bounce"),
        "{}",
        a_again.recipients[0].reason
    );
    assert!(
        a_again.recipients[1].reason.contains("complaint"),
        "{}",
        a_again.recipients[1].reason
    );
    let listed = suppressions(&mut sender, &a).await;
    assert_eq!(listed, [bounce, complaint]);

    // Tenant B may still mail both addresses: A's feedback is A's. (Checked before B sends:
    // B's own message to the simulator bounces and complains too, for B.)
    assert!(suppressions(&mut sender, &b).await.is_empty());
    again.from_address = "news@b.example".into();
    let b_sent = sender
        .send(authorized(&b, again))
        .await
        .unwrap()
        .into_inner();
    assert!(
        b_sent.recipients.iter().all(|r| r.state == ACCEPTED),
        "{:?}",
        b_sent.recipients
    );

    // All suppressed: nothing is queued, and the message says so.
    let all = sender
        .send(authorized(&a, message("news@a.example", bounce, "")))
        .await
        .unwrap()
        .into_inner();
    let status = sender
        .get_message(authorized(
            &a,
            v1::GetMessageRequest {
                message_id: all.message_id.clone(),
            },
        ))
        .await
        .unwrap();
    assert_eq!(status.into_inner().state, "SUPPRESSED");
    tokio::time::sleep(Duration::from_millis(500)).await;
    assert!(
        platform
            .mail_of("ta")
            .iter()
            .all(|f| !f.to_string_lossy().contains(&all.message_id)),
        "nothing was sent"
    );

    // Removing the entry lets mail through again.
    let removed = sender
        .remove_suppression(authorized(
            &a,
            v1::RemoveSuppressionRequest {
                address: bounce.into(),
            },
        ))
        .await
        .unwrap();
    assert!(removed.into_inner().removed);
    let after = sender
        .send(authorized(&a, message("news@a.example", bounce, "")))
        .await
        .unwrap()
        .into_inner();
    assert_eq!(after.recipients[0].state, ACCEPTED);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn suppression_requests_name_the_bad_field() {
    let dir = tempfile::tempdir().unwrap();
    let platform = Platform::start(dir.path(), &["--cells", "1"]).unwrap();
    let (_, a) = platform.create_tenant("ta", &["a.example"]).await.unwrap();
    let mut sender = platform.sender().await.unwrap();
    let bad_address = sender
        .add_suppression(authorized(
            &a,
            v1::AddSuppressionRequest {
                address: "nope".into(),
                reason: 0,
            },
        ))
        .await;
    assert_eq!(
        bad_address.as_ref().unwrap_err().code(),
        Code::InvalidArgument
    );
    assert!(bad_address.unwrap_err().message().starts_with("address:"));
    let bounce = v1::SuppressionReason::Bounce as i32;
    let bad_reason = sender
        .add_suppression(authorized(
            &a,
            v1::AddSuppressionRequest {
                address: "x@example.com".into(),
                reason: bounce,
            },
        ))
        .await;
    assert!(bad_reason.unwrap_err().message().starts_with("reason:"));
    let bad_id = sender
        .get_message(authorized(
            &a,
            v1::GetMessageRequest {
                message_id: "../etc".into(),
            },
        ))
        .await;
    assert!(bad_id.unwrap_err().message().starts_with("message_id:"));
    let page = v1::ListSuppressionsRequest {
        page_size: 5000,
        page_token: String::new(),
    };
    assert!(
        sender
            .list_suppressions(authorized(&a, page))
            .await
            .unwrap_err()
            .message()
            .starts_with("page_size:")
    );
    assert!(
        suppressions(&mut sender, &a).await.is_empty(),
        "nothing was added by the refused requests"
    );
    let no_key = sender
        .list_suppressions(tonic::Request::new(v1::ListSuppressionsRequest::default()))
        .await;
    assert_eq!(no_key.unwrap_err().code(), Code::Unauthenticated);
}

/// Creates a tenant sending from `domain` whose routers admit `rate` sends a second (and
/// as many at once); returns its API key.
async fn rated_tenant(platform: &Platform, id: &str, domain: &str, rate: u32) -> String {
    let request = v1::CreateTenantRequest {
        id: id.into(),
        domains: vec![domain.into()],
        policy: Some(v1::TenantPolicy {
            rate_per_second: rate,
            burst: rate,
            ..Default::default()
        }),
        ..Default::default()
    };
    let mut control = platform.control().await.unwrap();
    let created = control.create_tenant(request).await.unwrap();
    created.into_inner().api_key
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_tenant_over_its_rate_waits_with_a_retry_delay_and_others_do_not() {
    use tonic_types::StatusExt;
    let dir = tempfile::tempdir().unwrap();
    let platform = Platform::start(dir.path(), &["--cells", "1"]).unwrap();
    let flood = rated_tenant(&platform, "flood", "flood.example", 5).await;
    let (_, calm) = platform
        .create_tenant("calm", &["calm.example"])
        .await
        .unwrap();
    let mut sender = platform.sender().await.unwrap();
    // Wait until the router knows the tenant (its first send is accepted).
    let mut first = sender
        .send(authorized(
            &flood,
            message("a@flood.example", "j@example.com", ""),
        ))
        .await;
    for _ in 0..100 {
        if first.is_ok() {
            break;
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
        first = sender
            .send(authorized(
                &flood,
                message("a@flood.example", "j@example.com", ""),
            ))
            .await;
    }
    first.unwrap();

    let (mut admitted, mut throttled) = (1, Vec::new());
    for _ in 0..30 {
        match sender
            .send(authorized(
                &flood,
                message("a@flood.example", "j@example.com", ""),
            ))
            .await
        {
            Ok(_) => admitted += 1,
            Err(status) => throttled.push(status),
        }
    }
    assert!(
        admitted <= 10,
        "{admitted} sends admitted at 5/s with a burst of 5"
    );
    assert!(!throttled.is_empty());
    let status = &throttled[0];
    assert_eq!(status.code(), Code::ResourceExhausted);
    assert!(
        status.message().contains("5 sends/s"),
        "{}",
        status.message()
    );
    let retry = status
        .get_details_retry_info()
        .and_then(|r| r.retry_delay)
        .expect("a retry delay");
    assert!(
        retry > Duration::ZERO && retry <= Duration::from_millis(200),
        "{retry:?}"
    );

    for n in 0..10 {
        let sent = sender
            .send(authorized(
                &calm,
                message("a@calm.example", "j@example.com", &format!("c{n}")),
            ))
            .await;
        assert!(sent.is_ok(), "the calm tenant was throttled: {sent:?}");
    }
    // The delay a refusal gives is honest: once it has passed, the send is admitted. (Taken
    // from a fresh refusal: a token that came back meanwhile may have been spent already.)
    let mut delay = None;
    for _ in 0..20 {
        let sent = sender
            .send(authorized(
                &flood,
                message("a@flood.example", "j@example.com", ""),
            ))
            .await;
        if let Err(status) = sent {
            delay = status.get_details_retry_info().and_then(|r| r.retry_delay);
            break;
        }
    }
    tokio::time::sleep(delay.expect("a refusal with a retry delay")).await;
    assert!(
        sender
            .send(authorized(
                &flood,
                message("a@flood.example", "j@example.com", "")
            ))
            .await
            .is_ok(),
        "after the delay a send is admitted"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn stats_count_the_callers_own_mail_and_feedback_only() {
    let dir = tempfile::tempdir().unwrap();
    let platform = Platform::start(dir.path(), &["--cells", "1"]).unwrap();
    let (_, a) = platform.create_tenant("ta", &["a.example"]).await.unwrap();
    let (_, b) = platform.create_tenant("tb", &["b.example"]).await.unwrap();
    let mut sender = platform.sender().await.unwrap();
    for to in [
        "bounce@simulator.amazonses.com",
        "complaint@simulator.amazonses.com",
        "success@simulator.amazonses.com",
    ] {
        sender
            .send(authorized(&a, message("x@a.example", to, "")))
            .await
            .unwrap();
    }
    sender
        .send(authorized(
            &b,
            message("x@b.example", "joe@example.com", ""),
        ))
        .await
        .unwrap();

    let transactional = |stats: &v1::GetStatsResponse| {
        stats
            .classes
            .iter()
            .find(|c| c.message_class == v1::MessageClass::Transactional as i32)
            .cloned()
            .unwrap()
    };
    let mut a_stats = v1::ClassStats::default();
    for _ in 0..400 {
        let stats = sender
            .get_stats(authorized(&a, v1::GetStatsRequest { hours: 1 }))
            .await
            .unwrap()
            .into_inner();
        a_stats = transactional(&stats);
        if a_stats.bounced == 1 && a_stats.complained == 1 && a_stats.delivered == 1 {
            break;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    assert_eq!((a_stats.accepted, a_stats.sent), (3, 3), "{a_stats:?}");
    assert_eq!(
        (a_stats.delivered, a_stats.bounced, a_stats.complained),
        (1, 1, 1),
        "{a_stats:?}"
    );
    assert!(
        (a_stats.bounce_rate - 1.0 / 3.0).abs() < 1e-9
            && (a_stats.complaint_rate - 1.0 / 3.0).abs() < 1e-9
    );

    // The bounced address is now suppressed for A: that counts as suppressed, not accepted.
    sender
        .send(authorized(
            &a,
            message("x@a.example", "bounce@simulator.amazonses.com", ""),
        ))
        .await
        .unwrap();
    let stats = sender
        .get_stats(authorized(&a, v1::GetStatsRequest { hours: 0 }))
        .await
        .unwrap()
        .into_inner();
    assert_eq!(stats.hours, 24);
    let after = transactional(&stats);
    assert_eq!((after.accepted, after.suppressed), (3, 1), "{after:?}");

    let b_stats = transactional(
        &sender
            .get_stats(authorized(&b, v1::GetStatsRequest { hours: 1 }))
            .await
            .unwrap()
            .into_inner(),
    );
    assert_eq!(
        (
            b_stats.accepted,
            b_stats.bounced,
            b_stats.complained,
            b_stats.suppressed
        ),
        (1, 0, 0, 0),
        "{b_stats:?}"
    );

    let bad = sender
        .get_stats(authorized(&a, v1::GetStatsRequest { hours: 1000 }))
        .await
        .unwrap_err();
    assert_eq!(bad.code(), Code::InvalidArgument);
    assert!(bad.message().starts_with("hours:"), "{}", bad.message());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_daily_cap_and_a_suspension_stop_only_their_tenant_until_resumed() {
    use tonic_types::StatusExt;
    let dir = tempfile::tempdir().unwrap();
    let platform = Platform::start(dir.path(), &["--cells", "1"]).unwrap();
    let mut control = platform.control().await.unwrap();
    let create = |id: &str, policy: v1::TenantPolicy| v1::CreateTenantRequest {
        id: id.into(),
        domains: vec![format!("{id}.example")],
        tier: String::new(),
        policy: Some(policy),
        ..Default::default()
    };
    // Bad policies are refused naming the field, and create nothing.
    let too_high = v1::TenantPolicy {
        bounce_rate_bps: 20_000,
        ..Default::default()
    };
    let bad = control
        .create_tenant(create("odd", too_high))
        .await
        .unwrap_err();
    assert_eq!(bad.code(), Code::InvalidArgument);
    assert_eq!(
        bad.get_details_bad_request().unwrap().field_violations[0].field,
        "policy.bounce_rate_bps"
    );
    let capped = v1::TenantPolicy {
        daily_cap: 3,
        ..Default::default()
    };
    let capped = control
        .create_tenant(create("capped", capped))
        .await
        .unwrap()
        .into_inner()
        .api_key;
    let other = control
        .create_tenant(create("other", v1::TenantPolicy::default()))
        .await
        .unwrap()
        .into_inner()
        .api_key;
    let listed = control
        .list_tenants(v1::ListTenantsRequest {})
        .await
        .unwrap()
        .into_inner();
    assert!(listed.tenants.iter().all(|t| t.id != "odd"));
    let mut sender = platform.sender().await.unwrap();
    let send = |key: &str, from: &str| authorized(key, message(from, "j@example.com", ""));

    // Sent all at once, as many as the cap has room for get in, and no more.
    let sends: Vec<_> = (0..12)
        .map(|_| {
            let (mut sender, request) = (sender.clone(), send(&capped, "a@capped.example"));
            tokio::spawn(async move { sender.send(request).await })
        })
        .collect();
    let mut refusals = Vec::new();
    for sent in sends {
        if let Err(status) = sent.await.unwrap() {
            refusals.push(status);
        }
    }
    assert_eq!(refusals.len(), 12 - 3, "{refusals:?}");
    let over = refusals.pop().unwrap();
    assert_eq!(over.code(), Code::ResourceExhausted);
    assert!(
        over.message().contains("daily cap of 3"),
        "{}",
        over.message()
    );
    let retry = over.get_details_retry_info().unwrap().retry_delay.unwrap();
    assert!(retry > Duration::ZERO && retry <= Duration::from_secs(24 * 3600));
    sender.send(send(&other, "a@other.example")).await.unwrap();

    // A suspension refuses the tenant's sends in the router; the other tenant is untouched.
    let mut suspend = tonic::Request::new(v1::SuspendTenantRequest {
        tenant_id: "other".into(),
        reason: "unpaid invoice".into(),
    });
    suspend
        .metadata_mut()
        .insert("x-cellmail-actor", "tester".parse().unwrap());
    let suspended = control.suspend_tenant(suspend).await.unwrap().into_inner();
    assert_eq!(suspended.status, "SUSPENDED");
    let refused = cellmail_tests::until_ok(Duration::from_secs(2), || {
        let mut sender = sender.clone();
        let request = send(&other, "a@other.example");
        async move {
            match sender.send(request).await {
                Err(status) if status.code() == Code::PermissionDenied => Ok(status),
                other => Err(other),
            }
        }
    })
    .await
    .expect("the suspension reached the router within a second or two");
    assert!(
        refused.message().contains("suspended"),
        "{}",
        refused.message()
    );
    let still_capped = sender
        .send(send(&capped, "a@capped.example"))
        .await
        .unwrap_err();
    assert_eq!(still_capped.code(), Code::ResourceExhausted);

    let bad_class = control
        .resume_tenant(v1::ResumeTenantRequest {
            tenant_id: "other".into(),
            class: "bulk".into(),
            reason: String::new(),
        })
        .await
        .unwrap_err();
    assert_eq!(
        bad_class
            .get_details_bad_request()
            .unwrap()
            .field_violations[0]
            .field,
        "class"
    );
    let resumed = control
        .resume_tenant(v1::ResumeTenantRequest {
            tenant_id: "other".into(),
            class: String::new(),
            reason: "paid".into(),
        })
        .await
        .unwrap()
        .into_inner();
    assert!(resumed.unsuspended);
    cellmail_tests::until_ok(Duration::from_secs(2), || {
        let mut sender = sender.clone();
        let request = send(&other, "a@other.example");
        async move { sender.send(request).await }
    })
    .await
    .expect("the resumed tenant sends again");

    let audit = control
        .list_audit(v1::ListAuditRequest {
            tenant_id: "other".into(),
            limit: 0,
        })
        .await
        .unwrap()
        .into_inner()
        .entries;
    let actions: Vec<(&str, &str, &str)> = audit
        .iter()
        .map(|e| (e.action.as_str(), e.actor.as_str(), e.reason.as_str()))
        .collect();
    assert_eq!(
        actions,
        [
            ("tenant.create", "bootstrap", ""),
            // The actor is the credential's name, whatever the client says it is.
            ("tenant.suspend", "bootstrap", "unpaid invoice"),
            ("tenant.resume", "bootstrap", "paid")
        ]
    );
    assert!(audit[1].before_json.contains("\"ACTIVE\""));
    assert!(audit[1].after_json.contains("\"SUSPENDED\""));
}

/// A tenant that gives up on many sends at once (its client timing out, its process killed
/// in a burst) makes the router cancel them towards the cell, on the connection every
/// tenant's sends to that cell share. The cell must not close that connection for it: none
/// of another tenant's sends under way on it may fail.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_tenant_abandoning_its_sends_fails_none_of_anothers() {
    let dir = tempfile::tempdir().unwrap();
    let platform = Platform::start(dir.path(), &["--cells", "1"]).unwrap();
    let a = rated_tenant(&platform, "quitter", "a.example", 100_000).await;
    let (_, b) = platform
        .create_tenant("steady", &["b.example"])
        .await
        .unwrap();
    // Each tenant's client has a connection of its own to the router.
    let (quitter, sender) = (
        platform.sender().await.unwrap(),
        platform.sender().await.unwrap(),
    );

    let abandoning = {
        let (sender, key) = (quitter, a);
        tokio::spawn(async move {
            let mut abandoned = 0;
            for round in 0..20 {
                let mut calls = tokio::task::JoinSet::new();
                for n in 0..500u64 {
                    let request =
                        message("x@a.example", "joe@example.com", &format!("{round}-{n}"));
                    let (mut sender, request) = (sender.clone(), authorized(&key, request));
                    calls.spawn(async move {
                        let call = sender.send(request);
                        tokio::time::timeout(Duration::from_micros(n * 37 % 8000), call).await
                    });
                }
                abandoned += calls.join_all().await.iter().filter(|c| c.is_err()).count();
            }
            abandoned
        })
    };
    let mut failed = Vec::new();
    let mut sent = 0;
    while !abandoning.is_finished() {
        let mut calls = tokio::task::JoinSet::new();
        for _ in 0..8 {
            let request = message("x@b.example", "ann@example.com", "");
            let (mut sender, request) = (sender.clone(), authorized(&b, request));
            calls.spawn(async move { sender.send(request).await });
        }
        for result in calls.join_all().await {
            match result {
                Ok(_) => sent += 1,
                Err(status) => failed.push(status),
            }
        }
    }
    let abandoned = abandoning.await.unwrap();
    assert!(abandoned > 500, "A gave up on only {abandoned} sends");
    assert!(sent > 0);
    assert!(
        failed.is_empty(),
        "{} of B's sends failed: {failed:?}",
        failed.len()
    );
}
