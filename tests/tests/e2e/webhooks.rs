//! Webhooks end to end on `cellmail up` (loopback allowed, retries a fifth of a second
//! apart): a receiver in the test gets every event of a send, a bounce and a complaint,
//! signed as the Standard Webhooks spec says (checked by the receiver's own verifier); a
//! receiver that is down at first still gets every event; a hung endpoint holds up only its
//! own tenant; and endpoints are the caller's own, their URLs checked.

use std::collections::BTreeSet;
use std::time::Duration;

use cellmail_proto::v1::{self, sender_client::SenderClient};
use cellmail_tests::receiver::{Answer, Delivery, Receiver, verify};
use cellmail_tests::{Platform, authorized, message, until_ok, wait_for};
use tonic::Code;
use tonic::transport::Channel;
use tonic_types::StatusExt;

struct Setup {
    platform: Platform,
    sender: SenderClient<Channel>,
    receiver: Receiver,
    _dir: tempfile::TempDir,
}

impl Setup {
    async fn start() -> Self {
        let dir = tempfile::tempdir().unwrap();
        let retries = ["--cells", "1", "--webhook-retry-secs", "0.2,0.2,0.2"];
        let platform = Platform::start(dir.path(), &retries).unwrap();
        let sender = platform.sender().await.unwrap();
        Self {
            platform,
            sender,
            receiver: Receiver::start().await.unwrap(),
            _dir: dir,
        }
    }

    /// Tenant `id`'s API key, with an endpoint at `path` (wanting `types`) and its secret.
    async fn tenant(&self, id: &str, path: &str, types: &[&str]) -> (String, String, String) {
        let domain = format!("{id}.example");
        let (_, key) = self.platform.create_tenant(id, &[&domain]).await.unwrap();
        let create = v1::CreateWebhookRequest {
            url: self.receiver.url(path),
            types: types.iter().map(|t| t.to_string()).collect(),
            // A hung endpoint stays hung for the whole test.
            timeout_ms: 30_000,
            max_in_flight: 1,
        };
        let made = (self.sender.clone())
            .create_webhook(authorized(&key, create))
            .await
            .unwrap()
            .into_inner();
        assert!(made.secret.starts_with("whsec_"));
        (key, made.webhook.unwrap().id, made.secret)
    }

    async fn send(&self, key: &str, from: &str, to: &[&str], idempotency_key: &str) -> String {
        let mut request = message(from, to[0], idempotency_key);
        request.to = to.iter().map(|t| t.to_string()).collect();
        (self.sender.clone())
            .send(authorized(key, request))
            .await
            .unwrap()
            .into_inner()
            .message_id
    }

    /// Waits until `path` has had deliveries of at least `types`; what it got.
    async fn until_got(&self, path: &str, types: &[&str]) -> Vec<Delivery> {
        wait_for(Duration::from_secs(20), "the webhooks", || {
            let got = self.receiver.got(path);
            let seen: BTreeSet<String> = (got.iter())
                .map(|d| d.json()["type"].as_str().unwrap_or("").to_owned())
                .collect();
            types.iter().all(|t| seen.contains(*t)).then_some(got)
        })
        .await
        .unwrap()
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn each_event_arrives_signed_at_its_own_tenants_endpoint_and_retries_lose_nothing() {
    let s = Setup::start().await;
    let (a, a_hook, a_secret) = s.tenant("wh-a", "/a", &[]).await;
    let (b, _, b_secret) = s.tenant("wh-b", "/b", &["sent"]).await;
    // B's endpoint is down for its first two attempts.
    s.receiver.answer("/b", Answer::FailNext(2));

    let to = [
        "bounce@simulator.amazonses.com",
        "complaint@simulator.amazonses.com",
    ];
    let sent = s.send(&a, "x@wh-a.example", &to, "a-1").await;
    let b_sent = s
        .send(&b, "x@wh-b.example", &["j@example.com"], "b-1")
        .await;
    let got = s
        .until_got("/a", &["accepted", "sent", "bounced", "complained"])
        .await;
    for delivery in &got {
        assert!(verify(delivery, &a_secret), "{delivery:?}");
        assert!(!verify(delivery, &b_secret), "signed with A's secret only");
        let body = delivery.json();
        assert_eq!(
            body["data"]["id"],
            delivery.id.as_str(),
            "webhook-id is the event id"
        );
        assert_eq!(body["data"]["message_id"], sent.as_str());
    }
    let bounced = got.iter().find(|d| d.json()["type"] == "bounced").unwrap();
    assert_eq!(
        bounced.json()["data"]["recipient"],
        "bounce@simulator.amazonses.com"
    );

    // B's one wanted event arrives after the failures, once per attempt, never lost; a
    // receiver deduping on webhook-id takes it once. Nothing of A's reaches B.
    let b_got = wait_for(Duration::from_secs(20), "B's third attempt", || {
        let got = s.receiver.got("/b");
        (got.len() >= 3).then_some(got)
    })
    .await
    .unwrap();
    assert_eq!(b_got.len(), 3, "two refused attempts, then the delivery");
    let ids: BTreeSet<&str> = b_got.iter().map(|d| d.id.as_str()).collect();
    assert_eq!(ids.len(), 1);
    assert!(
        b_got
            .iter()
            .all(|d| d.json()["data"]["message_id"] == b_sent.as_str())
    );
    assert!(b_got.iter().all(|d| verify(d, &b_secret)));

    // A's endpoint lists its attempts (each recorded once its answer came back); B sees
    // only its own endpoints, and A's id is none.
    let listed = until_ok(Duration::from_secs(10), || async {
        let listed = (s.sender.clone())
            .list_webhooks(authorized(&a, v1::ListWebhooksRequest {}))
            .await?
            .into_inner()
            .webhooks;
        anyhow::ensure!(
            listed.len() == 1 && listed[0].deliveries.len() >= got.len(),
            "{listed:?}"
        );
        Ok(listed)
    })
    .await
    .unwrap();
    let deliveries = &listed[0].deliveries;
    assert!(
        deliveries
            .iter()
            .all(|d| d.status == 200 && d.error.is_empty())
    );
    let theirs = (s.sender.clone())
        .list_webhooks(authorized(&b, v1::ListWebhooksRequest {}))
        .await
        .unwrap()
        .into_inner()
        .webhooks;
    assert!(theirs.iter().all(|w| w.id != a_hook));
    let request = || v1::WebhookRequest { id: a_hook.clone() };
    let mut sender = s.sender.clone();
    for refused in [
        sender
            .test_webhook(authorized(&b, request()))
            .await
            .unwrap_err(),
        sender
            .delete_webhook(authorized(&b, request()))
            .await
            .unwrap_err(),
    ] {
        assert_eq!(refused.code(), Code::NotFound);
    }

    // A rotation: both secrets sign during the overlap; a test and a replay arrive signed.
    let rotated = sender
        .rotate_webhook_secret(authorized(
            &a,
            v1::RotateWebhookSecretRequest {
                id: a_hook.clone(),
                overlap_hours: 1,
            },
        ))
        .await
        .unwrap()
        .into_inner();
    assert_ne!(rotated.secret, a_secret);
    let tested = sender
        .test_webhook(authorized(&a, request()))
        .await
        .unwrap()
        .into_inner();
    assert_eq!((tested.status, tested.event_type.as_str()), (200, "test"));
    let test = s.until_got("/a", &["test"]).await;
    let test = test.iter().find(|d| d.json()["type"] == "test").unwrap();
    assert!(verify(test, &a_secret) && verify(test, &rotated.secret));
    let replayed = sender
        .replay_webhook(authorized(
            &a,
            v1::ReplayWebhookRequest {
                id: a_hook.clone(),
                from_ms: 0,
                to_ms: 0,
            },
        ))
        .await
        .unwrap()
        .into_inner();
    assert!(replayed.queued >= 4, "{replayed:?}");
    let before = got.len();
    let again = wait_for(Duration::from_secs(20), "the replay", || {
        let got = s.receiver.got("/a");
        let events = got.iter().filter(|d| d.json()["type"] != "test").count();
        (events >= before + replayed.queued as usize).then_some(got)
    })
    .await
    .unwrap();
    let first: BTreeSet<&str> = got.iter().map(|d| d.id.as_str()).collect();
    let replay_ids: BTreeSet<&str> = (again.iter())
        .filter(|d| d.json()["type"] != "test")
        .map(|d| d.id.as_str())
        .collect();
    assert_eq!(
        first, replay_ids,
        "a replay delivers the same events, same ids"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_hung_endpoint_holds_up_only_its_own_tenant() {
    let s = Setup::start().await;
    let (a, _, _) = s.tenant("hang-a", "/hang", &[]).await;
    let (b, _, _) = s.tenant("hang-b", "/quick", &[]).await;
    s.receiver.answer("/hang", Answer::Hang);
    for n in 0..5 {
        s.send(
            &a,
            "x@hang-a.example",
            &["j@example.com"],
            &format!("a-{n}"),
        )
        .await;
    }
    wait_for(Duration::from_secs(10), "A's endpoint hung", || {
        (!s.receiver.got("/hang").is_empty()).then_some(())
    })
    .await
    .unwrap();
    // A's endpoint takes one delivery at a time and never answers; B's events go on.
    for n in 0..5 {
        s.send(
            &b,
            "x@hang-b.example",
            &["j@example.com"],
            &format!("b-{n}"),
        )
        .await;
    }
    let b_got = wait_for(Duration::from_secs(10), "B's events", || {
        let got = s.receiver.got("/quick");
        (got.len() >= 10).then_some(got)
    })
    .await
    .unwrap();
    assert!(
        b_got
            .iter()
            .all(|d| d.json()["data"]["message_class"] == "transactional")
    );
    assert_eq!(
        s.receiver.got("/hang").len(),
        1,
        "one at a time to A's endpoint"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn endpoints_are_refused_naming_the_field_and_need_the_webhooks_scope() {
    let s = Setup::start().await;
    let (a, hook, _) = s.tenant("bad-a", "/a", &[]).await;
    let mut sender = s.sender.clone();
    let create = |url: &str| v1::CreateWebhookRequest {
        url: url.into(),
        ..Default::default()
    };
    // `cellmail up` allows loopback; private, link-local and metadata addresses stay refused.
    for (request, field) in [
        (create("https://10.0.0.1/hook"), "url"),
        (create("https://169.254.169.254/latest"), "url"),
        (create("http://hooks.example.com/x"), "url"),
        (create("not a url"), "url"),
        (
            v1::CreateWebhookRequest {
                types: vec!["sent".into(), "sentt".into()],
                ..create(&s.receiver.url("/x"))
            },
            "types[1]",
        ),
        (
            v1::CreateWebhookRequest {
                max_in_flight: 1000,
                ..create(&s.receiver.url("/x"))
            },
            "max_in_flight",
        ),
    ] {
        let refused = sender
            .create_webhook(authorized(&a, request))
            .await
            .unwrap_err();
        assert_eq!(refused.code(), Code::InvalidArgument, "{field}");
        let violation = &refused.get_details_bad_request().unwrap().field_violations[0];
        assert_eq!(violation.field, field, "{violation:?}");
    }
    let metadata = sender
        .create_webhook(authorized(&a, create("https://169.254.169.254/")))
        .await
        .unwrap_err();
    assert!(
        metadata.message().contains("metadata"),
        "{}",
        metadata.message()
    );
    let listed = sender
        .list_webhooks(authorized(&a, v1::ListWebhooksRequest {}))
        .await
        .unwrap()
        .into_inner()
        .webhooks;
    assert_eq!(listed.len(), 1, "nothing refused was saved");
    assert_eq!(listed[0].id, hook);

    // A key without the webhooks scope may not manage endpoints.
    let args = ["key", "issue", "bad-a", "--scope", "send,read"];
    let reader = s.platform.cli(&args)["api_key"]
        .as_str()
        .unwrap()
        .to_owned();
    let refused = sender
        .list_webhooks(authorized(&reader, v1::ListWebhooksRequest {}))
        .await
        .unwrap_err();
    assert_eq!(refused.code(), Code::PermissionDenied);
    assert!(
        refused.message().contains("`webhooks`"),
        "{}",
        refused.message()
    );
}
