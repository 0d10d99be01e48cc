//! The platform as separate processes on etcd: a dead cell fails only its own tenants, fast,
//! and loses nothing it acknowledged.

use std::time::{Duration, Instant};

use cellmail_proto::tls::Role;
use cellmail_proto::{CellId, v1};
use cellmail_tests::processes::{Daemon, Front, registry_args, start_cell};
use cellmail_tests::services::{etcd_endpoint, unique_prefix};
use cellmail_tests::{Control, authorized, control_client, message, until_ok, wait_for};

pub(crate) const ADMIN_TOKEN: &str = "test-admin-token-0123456789";
use tonic::Code;
use tonic_health::pb::{
    HealthCheckRequest, health_check_response::ServingStatus, health_client::HealthClient,
};
use tonic_types::StatusExt;

fn mail_count(dir: &std::path::Path, tenant: &str) -> usize {
    std::fs::read_dir(dir.join("mail").join(tenant))
        .map(|entries| {
            entries
                .filter_map(Result::ok)
                .filter(|e| e.path().extension().is_some_and(|x| x == "eml"))
                .count()
        })
        .unwrap_or(0)
}

/// One cell (started with `extra`), a control plane (with `control_env`) and a router on
/// `registry`, and an operator's client of the control plane.
async fn one_cell(
    registry: &[String],
    id: &str,
    dir: &std::path::Path,
    extra: &[&str],
    control_env: &[(&str, &str)],
) -> (Daemon, Front, Control) {
    let cell = start_cell(id, registry, dir, extra).await.unwrap();
    let front = Front::start_with_env(registry, ADMIN_TOKEN, control_env, &[])
        .await
        .unwrap();
    let control = control_client(&format!("http://{}", front.control), ADMIN_TOKEN)
        .await
        .unwrap();
    (cell, front, control)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_killed_cell_fails_only_its_tenants_fast_and_loses_nothing_it_acknowledged() {
    let registry = registry_args(&etcd_endpoint(), &unique_prefix("processes"));
    let (dir_a, dir_b) = (tempfile::tempdir().unwrap(), tempfile::tempdir().unwrap());

    // Cell a delivers nothing at first, so what it acknowledges is still queued when it dies.
    let mut cell_a = start_cell("cell-a", &registry, dir_a.path(), &["--cell-workers", "0"])
        .await
        .unwrap();
    let _cell_b = start_cell("cell-b", &registry, dir_b.path(), &[])
        .await
        .unwrap();
    let front = Front::start(&registry, ADMIN_TOKEN).await.unwrap();
    let (control_addr, router_addr) = (front.control.clone(), front.router.clone());

    let mut control = control_client(&format!("http://{control_addr}"), ADMIN_TOKEN)
        .await
        .unwrap();
    let mut alive = 0;
    for _ in 0..200 {
        let cells = control
            .list_cells(v1::ListCellsRequest {})
            .await
            .unwrap()
            .into_inner()
            .cells;
        alive = cells.iter().filter(|c| c.alive).count();
        if alive == 2 {
            break;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    assert_eq!(alive, 2, "both cells registered");
    let create = |id: &str, domain: &str| v1::CreateTenantRequest {
        id: id.into(),
        domains: vec![domain.into()],
        tier: String::new(),
        policy: None,
        ..Default::default()
    };
    let a = control
        .create_tenant(create("ta", "a.example"))
        .await
        .unwrap()
        .into_inner();
    let b = control
        .create_tenant(create("tb", "b.example"))
        .await
        .unwrap()
        .into_inner();
    assert_eq!(a.tenant.unwrap().cell, "cell-a");
    assert_eq!(b.tenant.unwrap().cell, "cell-b");

    let mut sender = v1::sender_client::SenderClient::connect(format!("http://{router_addr}"))
        .await
        .unwrap();
    // The router learns of new tenants through its watch: retry until it has.
    let mut acked = 0;
    for n in 0..10 {
        let request = || {
            authorized(
                &a.api_key,
                message("x@a.example", "j@example.com", &format!("a{n}")),
            )
        };
        let mut result = sender.send(request()).await;
        for _ in 0..50 {
            if result.is_ok() {
                break;
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
            result = sender.send(request()).await;
        }
        result.unwrap();
        acked += 1;
    }

    cell_a.kill();
    let started = Instant::now();
    let status = sender
        .send(authorized(
            &a.api_key,
            message("x@a.example", "j@example.com", "dead"),
        ))
        .await
        .unwrap_err();
    assert_eq!(status.code(), Code::Unavailable, "{status:?}");
    assert!(
        started.elapsed() < Duration::from_secs(2),
        "failing took {:?}",
        started.elapsed()
    );
    for n in 0..20 {
        let sent = sender
            .send(authorized(
                &b.api_key,
                message("y@b.example", "j@example.com", &format!("b{n}")),
            ))
            .await;
        assert!(sent.is_ok(), "tenant b on the healthy cell saw {sent:?}");
    }
    // Once its lease expires (10 s), the dead cell shows as down to operators.
    let mut down = false;
    for _ in 0..300 {
        let cells = control
            .list_cells(v1::ListCellsRequest {})
            .await
            .unwrap()
            .into_inner()
            .cells;
        down = cells.iter().any(|c| c.id == "cell-a" && !c.alive)
            && cells.iter().any(|c| c.id == "cell-b" && c.alive);
        if down {
            break;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    assert!(
        down,
        "cell-a shows as down and cell-b as up after cell-a's lease expired"
    );

    let _cell_a = start_cell("cell-a", &registry, dir_a.path(), &[])
        .await
        .unwrap();
    wait_for(
        Duration::from_secs(30),
        "cell a's acknowledged mail after its restart",
        || (mail_count(dir_a.path(), "ta") >= acked).then_some(()),
    )
    .await
    .unwrap();
    assert_eq!(mail_count(dir_a.path(), "ta"), acked);
    wait_for(Duration::from_secs(30), "cell b's mail", || {
        (mail_count(dir_b.path(), "tb") == 20).then_some(())
    })
    .await
    .unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sends_keep_flowing_while_etcd_is_down_and_changes_arrive_after_it_returns() {
    let etcd_dir = tempfile::tempdir().unwrap();
    let mut etcd = cellmail_tests::services::EtcdServer::start(etcd_dir.path())
        .await
        .unwrap();
    let registry = registry_args(&etcd.endpoint, "/stable/");
    let dir = tempfile::tempdir().unwrap();
    let _cell = start_cell("cell-1", &registry, dir.path(), &[])
        .await
        .unwrap();
    let front = Front::start(&registry, ADMIN_TOKEN).await.unwrap();
    let (control_addr, router_addr) = (front.control.clone(), front.router.clone());
    let control = control_client(&format!("http://{control_addr}"), ADMIN_TOKEN)
        .await
        .unwrap();
    let create = |id: &str| v1::CreateTenantRequest {
        id: id.into(),
        domains: vec![format!("{id}.example")],
        tier: String::new(),
        policy: None,
        ..Default::default()
    };
    // The cell registers itself; until it has, there is no cell to place on.
    let created = until_ok(Duration::from_secs(10), || {
        let (mut client, request) = (control.clone(), create("first"));
        async move { client.create_tenant(request).await }
    })
    .await;
    let key = created.unwrap().into_inner().api_key;
    let mut sender = v1::sender_client::SenderClient::connect(format!("http://{router_addr}"))
        .await
        .unwrap();
    let send = |n: usize| {
        authorized(
            &key,
            message("a@first.example", "j@example.com", &format!("k{n}")),
        )
    };
    let first = until_ok(Duration::from_secs(10), || {
        let (mut client, request) = (sender.clone(), send(0));
        async move { client.send(request).await }
    })
    .await;
    first.unwrap();

    assert_eq!(staleness(&front.router_metrics).await, 0.0);
    assert_eq!(
        health(&router_addr, "cellmail.registry").await,
        ServingStatus::Serving
    );

    etcd.stop();
    for n in 1..=30 {
        let sent = sender.send(send(n)).await;
        assert!(sent.is_ok(), "send {n} with etcd down: {sent:?}");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    // The router says it is serving from a stale view, and how stale, but keeps serving.
    assert!(
        staleness(&front.router_metrics).await > 0.0,
        "the staleness gauge rose"
    );
    assert_eq!(
        health(&router_addr, "cellmail.registry").await,
        ServingStatus::NotServing
    );
    assert_eq!(
        health(&router_addr, "cellmail.v1.Sender").await,
        ServingStatus::Serving
    );

    etcd.restart().await.unwrap();
    let second = until_ok(Duration::from_secs(10), || {
        let (mut client, request) = (control.clone(), create("second"));
        async move { client.create_tenant(request).await }
    })
    .await;
    let second_key = second.unwrap().into_inner().api_key;
    let mut reached = false;
    for _ in 0..100 {
        let sent = sender
            .send(authorized(
                &second_key,
                message("b@second.example", "j@example.com", ""),
            ))
            .await;
        if sent.is_ok() {
            reached = true;
            break;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    assert!(
        reached,
        "a tenant created after etcd returned reached the router"
    );
    let mut caught_up = false;
    for _ in 0..100 {
        caught_up = staleness(&front.router_metrics).await == 0.0
            && health(&router_addr, "cellmail.registry").await == ServingStatus::Serving;
        if caught_up {
            break;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    assert!(
        caught_up,
        "the router reports it follows the registry again"
    );
    wait_for(
        Duration::from_secs(30),
        "all 31 messages of the first tenant",
        || (mail_count(dir.path(), "first") == 31).then_some(()),
    )
    .await
    .unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn on_etcd_sqs_and_ses_a_send_through_the_router_reaches_ses_with_the_tenants_settings() {
    use cellmail_tests::emulator::{Tap, sent_by_the_emulator};
    // In front of the SES stand-in, as the cell's domain has a DKIM key of its own (the
    // emulator answers an identity made with one in JSON the SDK cannot read).
    let ses = cellmail_tests::ses_standin::SesStandIn::start(1000.0)
        .await
        .unwrap();
    let tap = Tap::in_front_of(ses.endpoint.trim_start_matches("http://").to_owned()).await;
    let unique = cellmail_proto::MessageId::generate()
        .to_string()
        .to_lowercase();
    let registry = registry_args(&etcd_endpoint(), &unique_prefix("aws"));
    let queue_prefix = format!("q{}-", &unique[16..]);
    let aws: Vec<&str> = vec![
        "--queue",
        "sqs",
        "--mailer",
        "ses",
        "--aws-endpoint",
        &tap.endpoint,
        "--aws-region",
        "us-east-1",
        "--sqs-queue-prefix",
        &queue_prefix,
    ];
    let (dir_a, dir_b) = (tempfile::tempdir().unwrap(), tempfile::tempdir().unwrap());
    let _cell_a = start_cell("cell-a", &registry, dir_a.path(), &aws)
        .await
        .unwrap();
    let _cell_b = start_cell("cell-b", &registry, dir_b.path(), &aws)
        .await
        .unwrap();
    let front = Front::start(&registry, ADMIN_TOKEN).await.unwrap();
    let (control_addr, router_addr) = (front.control.clone(), front.router.clone());

    let control = control_client(&format!("http://{control_addr}"), ADMIN_TOKEN)
        .await
        .unwrap();
    let tenant = format!("t{unique}");
    let domain = format!("{tenant}.example");
    let request = || v1::CreateTenantRequest {
        id: tenant.clone(),
        domains: vec![domain.clone()],
        tier: String::new(),
        policy: None,
        ..Default::default()
    };
    // The cells register (and open their SQS queues) first; until then there is no cell.
    let created = until_ok(Duration::from_secs(10), || {
        let (mut client, request) = (control.clone(), request());
        async move { client.create_tenant(request).await }
    })
    .await;
    let key = created.unwrap().into_inner().api_key;

    let mut sender = v1::sender_client::SenderClient::connect(format!("http://{router_addr}"))
        .await
        .unwrap();
    let subject = format!("Receipt {unique}");
    let mut outgoing = message(&format!("shop@{domain}"), "jane@example.com", "order-1");
    outgoing.subject = subject.clone();
    let sent = until_ok(Duration::from_secs(10), || {
        let (mut client, request) = (sender.clone(), authorized(&key, outgoing.clone()));
        async move { client.send(request).await }
    })
    .await;
    let message_id = sent.unwrap().into_inner().message_id;

    let mut recorded = None;
    for _ in 0..300 {
        recorded = sent_by_the_emulator()
            .await
            .into_iter()
            .find(|m| m["subject"] == subject.as_str());
        if recorded.is_some() {
            break;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    let recorded = recorded.expect("the emulator's SES recorded the message");

    // A message too large for SQS travels by reference to the cell's store.
    let big_subject = format!("Catalogue {unique}");
    let mut big = message(&format!("shop@{domain}"), "jane@example.com", "order-2");
    big.subject = big_subject.clone();
    big.html = format!("<p>{}</p>", "x".repeat(400 * 1024));
    sender.send(authorized(&key, big)).await.unwrap();
    let mut big_recorded = false;
    for _ in 0..300 {
        big_recorded = sent_by_the_emulator()
            .await
            .iter()
            .any(|m| m["subject"] == big_subject.as_str());
        if big_recorded {
            break;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    assert!(big_recorded, "the 400 KiB message was sent");
    assert_eq!(
        recorded["destinations"]["ToAddresses"][0],
        "jane@example.com"
    );
    let request = tap
        .send_email_requests()
        .into_iter()
        .find(|r| r["Content"]["Simple"]["Subject"]["Data"] == subject.as_str())
        .expect("the SendEmail request went through the tap");
    assert_eq!(
        request["ConfigurationSetName"],
        format!("cellmail-{tenant}").as_str()
    );
    let tags: std::collections::BTreeMap<String, String> = request["EmailTags"]
        .as_array()
        .unwrap()
        .iter()
        .map(|t| {
            (
                t["Name"].as_str().unwrap().to_owned(),
                t["Value"].as_str().unwrap().to_owned(),
            )
        })
        .collect();
    assert_eq!(tags["tenant_id"], tenant);
    assert_eq!(tags["message_id"], message_id);
    assert_eq!(tags["message_class"], "transactional");
}

/// One cell on etcd, SQS and the SES stand-in (an account of `rate` recipients a second),
/// started with `extra`, with its control plane and router, and `tenants` tenants on it.
struct SesCell {
    ses: cellmail_tests::ses_standin::SesStandIn,
    _cell: Daemon,
    _front: Front,
    control: Control,
    sender: v1::sender_client::SenderClient<tonic::transport::Channel>,
    /// Each tenant's id and API key.
    tenants: Vec<(String, String)>,
    _dir: tempfile::TempDir,
}

impl SesCell {
    async fn start(rate: f64, extra: &[&str], tenants: usize) -> Self {
        Self::start_with(rate, extra, tenants, None, None).await
    }

    /// [`Self::start`], the tenants created with `policy`, the control plane checking
    /// domains in `dns`.
    async fn start_with(
        rate: f64,
        extra: &[&str],
        tenants: usize,
        policy: Option<v1::TenantPolicy>,
        dns: Option<&cellmail_tests::dns::DnsServer>,
    ) -> Self {
        let ses = cellmail_tests::ses_standin::SesStandIn::start(rate)
            .await
            .unwrap();
        let unique = cellmail_proto::MessageId::generate()
            .to_string()
            .to_lowercase();
        let registry = registry_args(&etcd_endpoint(), &unique_prefix("ses"));
        let queue_prefix = format!("s{}-", &unique[16..]);
        let mut args = vec![
            "--queue",
            "sqs",
            "--mailer",
            "ses",
            "--aws-endpoint",
            &ses.endpoint,
            "--aws-region",
            "us-east-1",
            "--sqs-queue-prefix",
            &queue_prefix,
        ];
        args.extend(extra);
        let dir = tempfile::tempdir().unwrap();
        let resolver = dns.map(|dns| dns.addr.to_string());
        let control_env: Vec<(&str, &str)> = (resolver.iter())
            .map(|r| ("CELLMAIL_DNS_RESOLVER", r.as_str()))
            .collect();
        let (cell, front, control) =
            one_cell(&registry, "cell-ses", dir.path(), &args, &control_env).await;
        let sender = v1::sender_client::SenderClient::connect(format!("http://{}", front.router))
            .await
            .unwrap();
        let mut made = Vec::new();
        for i in 0..tenants {
            let tenant = format!("t{}{i}", &unique[..12]);
            let created = until_ok(Duration::from_secs(10), || {
                let mut client = control.clone();
                let request = v1::CreateTenantRequest {
                    id: tenant.clone(),
                    domains: vec![format!("{tenant}.example")],
                    policy: policy.clone(),
                    ..Default::default()
                };
                async move { client.create_tenant(request).await }
            })
            .await;
            let key = created.unwrap().into_inner().api_key;
            cellmail_tests::until_router_serves(&sender, &key).await;
            made.push((tenant, key));
        }
        Self {
            ses,
            _cell: cell,
            _front: front,
            control,
            sender,
            tenants: made,
            _dir: dir,
        }
    }

    /// A message from tenant `i` to `to`.
    fn send(
        &self,
        i: usize,
        to: Vec<String>,
        key: &str,
    ) -> impl Future<Output = Result<tonic::Response<v1::SendResponse>, tonic::Status>> + use<>
    {
        let (tenant, api_key) = &self.tenants[i];
        let mut request = message(&format!("shop@{tenant}.example"), "x@example.com", key);
        request.to = to;
        let request = authorized(api_key, request);
        let mut client = self.sender.clone();
        async move { client.send(request).await }
    }

    /// How many of tenant `i`'s messages SES sent.
    fn sent_for(&self, i: usize) -> usize {
        let set = format!("cellmail-{}", self.tenants[i].0);
        (self.ses.sent())
            .iter()
            .filter(|s| s.configuration_set == set)
            .count()
    }

    /// An SES client of the stand-in, as an operator's console or SES itself acts.
    async fn ses(&self) -> aws_sdk_sesv2::Client {
        let config = cellmail_tests::emulator::aws_config().await;
        let config = aws_sdk_sesv2::config::Builder::from(&config)
            .endpoint_url(&self.ses.endpoint)
            .build();
        aws_sdk_sesv2::Client::from_conf(config)
    }

    /// Enables or disables tenant `i`'s configuration set's sending, on SES's side.
    async fn ses_sending(&self, i: usize, enabled: bool) {
        self.ses()
            .await
            .put_configuration_set_sending_options()
            .configuration_set_name(format!("cellmail-{}", self.tenants[i].0))
            .sending_enabled(enabled)
            .send()
            .await
            .unwrap();
    }

    /// With tenant 0 paused on SES's side: a message of tenant 0's is held (its id) while one
    /// of tenant 1's goes out.
    async fn held_alone(&self) -> String {
        let to = || vec!["jane@example.com".to_owned()];
        let held = (self.send(0, to(), "a-1").await.unwrap().into_inner()).message_id;
        self.send(1, to(), "b-1").await.unwrap();
        self.until_state(0, &held, "HELD").await;
        wait_for(
            Duration::from_secs(20),
            "the neighbour's message sent",
            || (self.sent_for(1) == 1).then_some(()),
        )
        .await
        .unwrap();
        assert_eq!(self.sent_for(0), 0);
        assert!(self.paused(1).await.is_empty());
        held
    }

    /// Waits until tenant `i`'s message `id` is in `state`.
    async fn until_state(&self, i: usize, id: &str, state: &str) {
        until_ok(Duration::from_secs(20), || async {
            let message = cellmail_tests::get_message(&self.sender, &self.tenants[i].1, id)
                .await
                .unwrap();
            anyhow::ensure!(
                message.state == state,
                "tenant {i}'s {id} is {}",
                message.state
            );
            Ok(())
        })
        .await
        .unwrap();
    }

    /// The classes of tenant `i` its breakers pause, as the control plane lists them.
    async fn paused(&self, i: usize) -> Vec<String> {
        let tenants = (self.control.clone())
            .list_tenants(v1::ListTenantsRequest::default())
            .await
            .unwrap()
            .into_inner()
            .tenants;
        let tenant = tenants.iter().find(|t| t.id == self.tenants[i].0).unwrap();
        tenant.paused.iter().map(|p| p.class.clone()).collect()
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn on_sqs_and_ses_a_backlog_drains_no_faster_than_the_accounts_send_rate() {
    const RATE: f64 = 50.0;
    const MESSAGES: usize = 200;
    const RECIPIENTS: usize = 10;
    let cell = SesCell::start(RATE, &[], 1).await;

    // A backlog: the cell accepts far faster than it may send.
    let mut sends = tokio::task::JoinSet::new();
    for i in 0..MESSAGES {
        let to = (0..RECIPIENTS)
            .map(|r| format!("r{r}@example.com"))
            .collect();
        sends.spawn(cell.send(0, to, &format!("k{i}")));
    }
    for sent in sends.join_all().await {
        sent.unwrap();
    }
    let sent = wait_for(
        Duration::from_secs(90),
        "every message sent through SES",
        || {
            let sent = cell.ses.sent();
            (sent.len() >= MESSAGES).then_some(sent)
        },
    )
    .await
    .unwrap();

    assert_eq!(sent.len(), MESSAGES, "no message lost or sent twice");
    assert!(sent.iter().all(|s| s.recipients == RECIPIENTS));
    // The first second's worth may go at once (the bucket starts full); after it, the rate.
    let span = sent[sent.len() - 1].at - sent[0].at;
    let after_first = (MESSAGES - 1) * RECIPIENTS;
    let rate = after_first as f64 / span.as_secs_f64();
    assert!(
        rate <= RATE * 1.05,
        "{after_first} recipients in {span:?}: {rate:.1}/s"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn on_ses_a_noisy_tenants_backlog_does_not_stand_in_front_of_its_neighbours_mail() {
    const FLOOD: usize = 60;
    let policy = v1::TenantPolicy {
        rate_per_second: 10_000,
        ..Default::default()
    };
    // An account sending 2 a second: the flood would take 30 s to go out.
    let cell = SesCell::start_with(2.0, &[], 2, Some(policy), None).await;
    let mut flood = tokio::task::JoinSet::new();
    for n in 0..FLOOD {
        flood.spawn(cell.send(0, vec![format!("r{n}@example.com")], &format!("n{n}")));
    }
    for sent in flood.join_all().await {
        sent.unwrap();
    }
    cell.send(1, vec!["jane@example.com".into()], "quiet")
        .await
        .unwrap();
    let at_accept = cell.sent_for(0);
    wait_for(
        Duration::from_secs(30),
        "the quiet tenant's message sent",
        || (cell.sent_for(1) == 1).then_some(()),
    )
    .await
    .unwrap();
    // It waits for the queue to hand it over and for a turn of the account's rate, not for
    // the flood's messages every delivery worker (16) already holds.
    let meanwhile = cell.sent_for(0) - at_accept;
    assert!(
        meanwhile <= 8,
        "{meanwhile} of the flood's messages went out before the quiet tenant's one"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn on_ses_bounces_and_complaints_come_back_through_sns_and_sqs_for_their_tenant_only() {
    // Any complaint trips the breaker; bounces never do.
    let policy = v1::TenantPolicy {
        bounce_rate_bps: 10_000,
        complaint_rate_bps: 1,
        breaker_min_volume: 1,
        ..Default::default()
    };
    let cell = SesCell::start_with(1000.0, &[], 2, Some(policy), None).await;
    let suppressed = |i: usize| {
        let (sender, key) = (cell.sender.clone(), cell.tenants[i].1.clone());
        async move {
            let list = (sender.clone())
                .list_suppressions(authorized(&key, v1::ListSuppressionsRequest::default()))
                .await
                .unwrap()
                .into_inner();
            list.suppressions
                .into_iter()
                .map(|s| s.address)
                .collect::<Vec<_>>()
        }
    };
    let bounced = "bounce@simulator.amazonses.com".to_owned();
    cell.send(0, vec![bounced.clone()], "a-1").await.unwrap();
    // SES -> the event destination -> the cell's SNS topic -> its SQS feedback queue -> cell.
    until_ok(Duration::from_secs(30), || async {
        let list = suppressed(0).await;
        anyhow::ensure!(list.contains(&bounced), "tenant 0 suppresses {list:?}");
        Ok(())
    })
    .await
    .unwrap();
    assert!(
        suppressed(1).await.is_empty(),
        "the neighbour's list is its own"
    );

    // A complaint over the tenant's threshold trips its breaker, and only its.
    let complained = "complaint@simulator.amazonses.com".to_owned();
    cell.send(0, vec![complained], "a-2").await.unwrap();
    until_ok(Duration::from_secs(30), || async {
        let paused = cell.paused(0).await;
        anyhow::ensure!(!paused.is_empty(), "tenant 0's paused classes: {paused:?}");
        Ok(())
    })
    .await
    .unwrap();
    assert!(cell.paused(1).await.is_empty());
    cell.send(1, vec!["jane@example.com".into()], "b-1")
        .await
        .unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn on_ses_a_domain_verifies_once_dns_and_ses_have_its_records_and_rotates_its_key() {
    let dns = cellmail_tests::dns::DnsServer::start().await.unwrap();
    // No sweep after the start: what the cell sets up, it sets up when the control plane asks.
    let extra = ["--ses-reconcile-secs", "3600"];
    let cell = SesCell::start_with(1000.0, &extra, 2, None, Some(&dns)).await;
    let ses = cell.ses().await;
    let (tenant, _) = cell.tenants[0].clone();

    // Placed: the tenant's configuration set and event destination exist before any send.
    let set = format!("cellmail-{tenant}");
    let destinations = ses
        .get_configuration_set_event_destinations()
        .configuration_set_name(&set)
        .send()
        .await
        .unwrap();
    assert_eq!(destinations.event_destinations().len(), 1, "{set}");

    // Added: one record of each kind, the MX to the cell's region; SES has the identity with
    // the domain's own key and MAIL FROM domain, and waits for DNS.
    let domain = format!("news.{tenant}.example");
    let request = || v1::DomainRequest {
        tenant_id: tenant.clone(),
        domain: domain.clone(),
    };
    let added = (cell.control.clone())
        .add_domain(request())
        .await
        .unwrap()
        .into_inner();
    let purposes: Vec<&str> = added.records.iter().map(|r| r.purpose.as_str()).collect();
    assert_eq!(
        purposes,
        [
            "ownership",
            "dkim",
            "mail-from-mx",
            "mail-from-spf",
            "dmarc"
        ]
    );
    let mx = &added.records[2];
    let mail_from = format!("bounce.{domain}");
    assert_eq!(
        (mx.name.as_str(), mx.r#type.as_str(), mx.value.as_str()),
        (
            mail_from.as_str(),
            "MX",
            "10 feedback-smtp.us-east-1.amazonses.com"
        )
    );
    let identity = ses
        .get_email_identity()
        .email_identity(&domain)
        .send()
        .await
        .unwrap();
    let dkim = identity.dkim_attributes().unwrap();
    assert_eq!(dkim.status().map(|s| s.as_str()), Some("PENDING"));
    assert_eq!(
        added.records[1].name,
        format!("{}._domainkey.{domain}", dkim.tokens()[0])
    );
    let mail_from_set = identity.mail_from_attributes().unwrap();
    assert_eq!(mail_from_set.mail_from_domain(), mail_from);

    // In the DNS the control plane reads, not yet seen by SES: not verified, and each
    // record SES checks names SES's status.
    for r in &added.records {
        dns.publish(&r.name, &r.r#type, &r.value);
    }
    let problems = |info: &v1::DomainInfo| -> Vec<(String, String)> {
        (info.records.iter())
            .filter(|r| !r.problem.is_empty())
            .map(|r| (r.purpose.clone(), r.problem.clone()))
            .collect()
    };
    let unseen = (cell.control.clone())
        .verify_domain(request())
        .await
        .unwrap()
        .into_inner();
    assert!(!unseen.verified);
    let named = problems(&unseen);
    assert_eq!(named.len(), 2, "{named:?}");
    assert_eq!(named[0].0, "dkim");
    assert!(named[0].1.contains("DKIM status PENDING"), "{named:?}");
    assert_eq!(named[1].0, "mail-from-mx");
    assert!(named[1].1.contains("MAIL FROM status PENDING"), "{named:?}");

    // SES sees them too: verified, and the tenant sends from the domain; a bounce comes back
    // through SES, SNS and SQS and suppresses the address for this tenant only.
    cell.ses.resolve_with(dns.zone());
    let verified = (cell.control.clone())
        .verify_domain(request())
        .await
        .unwrap()
        .into_inner();
    assert!(verified.verified, "{:?}", problems(&verified));
    let bounced = "bounce@simulator.amazonses.com";
    let from_news = |i: usize| {
        let mut request = message(&format!("shop@{domain}"), bounced, "");
        request.idempotency_key = format!("news-{i}");
        (cell.sender.clone(), authorized(&cell.tenants[i].1, request))
    };
    until_ok(Duration::from_secs(10), || {
        let (mut sender, request) = from_news(0);
        async move { sender.send(request).await }
    })
    .await
    .unwrap();
    let suppressed = |i: usize| {
        let (mut sender, key) = (cell.sender.clone(), cell.tenants[i].1.clone());
        async move {
            let request = authorized(&key, v1::ListSuppressionsRequest::default());
            let listed = sender.list_suppressions(request).await.unwrap();
            let listed = listed.into_inner().suppressions;
            listed.into_iter().map(|s| s.address).collect::<Vec<_>>()
        }
    };
    until_ok(Duration::from_secs(30), || async {
        let list = suppressed(0).await;
        anyhow::ensure!(list.iter().any(|a| a == bounced), "{list:?}");
        Ok(())
    })
    .await
    .unwrap();
    assert!(suppressed(1).await.is_empty());
    // The neighbour on the same cell cannot send from the domain.
    let (mut sender, neighbours) = from_news(1);
    let refused = sender.send(neighbours).await.unwrap_err();
    assert_eq!(refused.code(), Code::PermissionDenied);

    // A rotation: SES signs with the new key once its record is published.
    let rotate = || v1::RotateDkimRequest {
        tenant_id: tenant.clone(),
        domain: domain.clone(),
        overlap_hours: 0,
    };
    let started = (cell.control.clone())
        .rotate_dkim(rotate())
        .await
        .unwrap()
        .into_inner();
    let next = (started.records.iter())
        .filter(|r| r.purpose == "dkim")
        .nth(1)
        .unwrap()
        .clone();
    let old_selector = cell.ses.dkim_of(&domain).unwrap().0;
    assert!(!next.name.starts_with(&old_selector));
    dns.publish(&next.name, &next.r#type, &next.value);
    cell.control.clone().rotate_dkim(rotate()).await.unwrap();
    let (selector, _) = cell.ses.dkim_of(&domain).unwrap();
    assert_eq!(next.name, format!("{selector}._domainkey.{domain}"));
    let after = (cell.control.clone())
        .verify_domain(request())
        .await
        .unwrap()
        .into_inner();
    assert!(problems(&after).is_empty(), "{:?}", problems(&after));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn on_ses_with_tenants_a_paused_ses_tenant_is_held_alone_and_released_with_it() {
    let policy = v1::TenantPolicy {
        ses_reputation_policy: "strict".into(),
        ..Default::default()
    };
    let extra = ["--ses-tenants", "--ses-reconcile-secs", "1"];
    let cell = SesCell::start_with(1000.0, &extra, 2, Some(policy), None).await;
    // A policy SES does not have is refused, naming the field, and nothing is created.
    let lenient = v1::CreateTenantRequest {
        id: format!("{}-lenient", cell.tenants[0].0),
        domains: vec!["lenient.example".into()],
        policy: Some(v1::TenantPolicy {
            ses_reputation_policy: "lenient".into(),
            ..Default::default()
        }),
        ..Default::default()
    };
    let refused = (cell.control.clone())
        .create_tenant(lenient.clone())
        .await
        .unwrap_err();
    assert_eq!(refused.code(), Code::InvalidArgument);
    let violation = &refused.get_details_bad_request().unwrap().field_violations[0];
    assert_eq!(violation.field, "policy.ses_reputation_policy");
    assert!(
        violation.description.contains("\"lenient\""),
        "{violation:?}"
    );
    assert!(cell.ses.tenant(&lenient.id).is_none());
    // Placed: each tenant is an SES tenant with its reputation policy, its configuration set
    // and its domain's identity associated.
    for (name, _) in &cell.tenants {
        let tenant = cell.ses.tenant(name).expect("an SES tenant once placed");
        assert!(
            tenant.policy.ends_with(":aws:reputation-policy/strict"),
            "{tenant:?}"
        );
        for resource in [
            format!(":configuration-set/cellmail-{name}"),
            format!(":identity/{name}.example"),
        ] {
            assert!(
                tenant.resources.iter().any(|r| r.ends_with(&resource)),
                "{resource} in {tenant:?}"
            );
        }
    }

    // SES pauses the first tenant's SES tenant: its mail is held, its neighbour's goes out.
    let cell = &cell;
    let status = |status: aws_sdk_sesv2::types::SendingStatus| async move {
        let arn = cell.ses.tenant(&cell.tenants[0].0).unwrap().arn;
        (cell.ses().await)
            .update_reputation_entity_customer_managed_status()
            .reputation_entity_type(aws_sdk_sesv2::types::ReputationEntityType::Resource)
            .reputation_entity_reference(arn)
            .sending_status(status)
            .send()
            .await
            .unwrap();
    };
    status(aws_sdk_sesv2::types::SendingStatus::Disabled).await;
    let held = cell.held_alone().await;

    // Reinstated on SES's side: the sweep releases the tenant, and its held mail goes out.
    status(aws_sdk_sesv2::types::SendingStatus::Reinstated).await;
    wait_for(Duration::from_secs(20), "the held message sent", || {
        (cell.sent_for(0) == 1).then_some(())
    })
    .await
    .unwrap();
    // SES has it; the cell records it as sent once SES has answered.
    cell.until_state(0, &held, "SENT").await;
    assert!(cell.paused(0).await.is_empty());

    // Offboarding the neighbour removes its SES tenant and configuration set; the first
    // tenant's stay.
    let neighbour = cell.tenants[1].0.clone();
    let mut control = cell.control.clone();
    let suspend = v1::SuspendTenantRequest {
        tenant_id: neighbour.clone(),
        reason: "offboarding".into(),
    };
    control.suspend_tenant(suspend).await.unwrap();
    let delete = v1::DeleteTenantRequest {
        tenant_id: neighbour.clone(),
        reason: "offboarding".into(),
    };
    until_ok(Duration::from_secs(20), || {
        let (mut control, delete) = (control.clone(), delete.clone());
        async move { control.delete_tenant(delete).await }
    })
    .await
    .unwrap();
    assert!(cell.ses.tenant(&neighbour).is_none());
    assert!(cell.ses.tenant(&cell.tenants[0].0).is_some());
    let set = (cell.ses().await)
        .get_configuration_set()
        .configuration_set_name(format!("cellmail-{neighbour}"))
        .send()
        .await
        .unwrap_err();
    assert!(set.into_service_error().is_not_found_exception());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn on_ses_a_tenant_ses_paused_is_held_alone_until_resumed() {
    // No sweep during the test: the pause is learnt from a send SES refuses.
    let cell = SesCell::start(1000.0, &["--ses-reconcile-secs", "3600"], 2).await;
    let to = || vec!["jane@example.com".to_owned()];
    cell.ses_sending(0, false).await;

    let held = cell.held_alone().await;
    assert_eq!(
        cell.paused(0).await.len(),
        2,
        "every class of the tenant is held"
    );
    let refused = cell.send(0, to(), "a-2").await.unwrap_err();
    assert_eq!(refused.code(), Code::FailedPrecondition);
    cell.send(1, to(), "b-2").await.unwrap();

    // SES lets it send again and the operator resumes it: the held message goes out.
    cell.ses_sending(0, true).await;
    let resume = v1::ResumeTenantRequest {
        tenant_id: cell.tenants[0].0.clone(),
        reason: "SES reinstated the tenant".into(),
        ..Default::default()
    };
    cell.control.clone().resume_tenant(resume).await.unwrap();
    wait_for(Duration::from_secs(20), "the held message sent", || {
        (cell.sent_for(0) == 1).then_some(())
    })
    .await
    .unwrap();
    // SES has it; the cell records it as sent once SES has answered.
    cell.until_state(0, &held, "SENT").await;
    assert_eq!(cell.sent_for(1), 2);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn on_ses_the_sweep_holds_a_tenant_ses_paused_without_an_event_and_releases_it() {
    let cell = SesCell::start(1000.0, &["--ses-reconcile-secs", "1"], 2).await;
    let to = || vec!["jane@example.com".to_owned()];
    // Placed, and provisioned before its first send: its configuration set publishes its
    // events to the cell.
    let set = format!("cellmail-{}", cell.tenants[1].0);
    let ses = cell.ses().await;
    let destinations = until_ok(Duration::from_secs(20), || {
        let request = ses
            .get_configuration_set_event_destinations()
            .configuration_set_name(&set);
        async move {
            let listed = request.send().await?.event_destinations.unwrap_or_default();
            anyhow::ensure!(!listed.is_empty(), "no event destination yet");
            Ok(listed)
        }
    })
    .await
    .unwrap();
    let topic = destinations[0].sns_destination().map(|d| d.topic_arn());
    assert!(
        topic.is_some_and(|arn| arn.ends_with("cell-ses-events")),
        "{topic:?}"
    );
    assert_eq!(cell.sent_for(1), 0);
    cell.send(0, to(), "a-1").await.unwrap();
    wait_for(
        Duration::from_secs(20),
        "the tenant's first message sent",
        || (cell.sent_for(0) == 1).then_some(()),
    )
    .await
    .unwrap();

    // SES pauses the tenant and its event is lost: no send of it fails either.
    cell.ses_sending(0, false).await;
    until_ok(Duration::from_secs(20), || async {
        let paused = cell.paused(0).await;
        anyhow::ensure!(paused.len() == 2, "the tenant's paused classes: {paused:?}");
        Ok(())
    })
    .await
    .unwrap();
    let refused = cell.send(0, to(), "a-2").await.unwrap_err();
    assert_eq!(refused.code(), Code::FailedPrecondition);
    cell.send(1, to(), "b-1").await.unwrap();
    assert!(cell.paused(1).await.is_empty());

    // SES lets it send again: the sweep releases it.
    cell.ses_sending(0, true).await;
    until_ok(Duration::from_secs(20), || async {
        let paused = cell.paused(0).await;
        anyhow::ensure!(paused.is_empty(), "the tenant's paused classes: {paused:?}");
        Ok(())
    })
    .await
    .unwrap();
    cell.send(0, to(), "a-3").await.unwrap();
    wait_for(
        Duration::from_secs(20),
        "the released tenant's message sent",
        || (cell.sent_for(0) == 2).then_some(()),
    )
    .await
    .unwrap();
    assert_eq!(cell.sent_for(1), 1);
}

/// The router's `cellmail_registry_staleness_seconds` from its metrics endpoint.
async fn staleness(metrics_addr: &str) -> f64 {
    let text = cellmail_tests::http_get(metrics_addr, "/metrics")
        .await
        .unwrap();
    text.lines()
        .find(|l| l.starts_with("cellmail_registry_staleness_seconds{component=\"router\"}"))
        .and_then(|l| l.rsplit(' ').next()?.parse().ok())
        .unwrap_or_else(|| panic!("no staleness gauge in:\n{text}"))
}

async fn health(addr: &str, service: &str) -> ServingStatus {
    let channel = tonic::transport::Channel::from_shared(format!("http://{addr}"))
        .unwrap()
        .connect()
        .await
        .unwrap();
    let request = HealthCheckRequest {
        service: service.into(),
    };
    let status = HealthClient::new(channel)
        .check(request)
        .await
        .unwrap()
        .into_inner()
        .status;
    ServingStatus::try_from(status).unwrap()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_cell_runs_from_its_config_file_alone() {
    use cellmail_registry::Registry;
    let prefix = unique_prefix("config");
    let dir = tempfile::tempdir().unwrap();
    let file = dir.path().join("cell.env");
    let tls: String = cellmail_tests::pki::env(&Role::Cell(CellId::new("cell-cfg").unwrap()))
        .iter()
        .map(|(name, value)| format!("{name}={value}\n"))
        .collect();
    let settings = format!(
        "# a cell configured by file only\nCELLMAIL_CELL_ID=cell-cfg\nCELLMAIL_REGISTRY=etcd://{}\nCELLMAIL_REGISTRY_PREFIX={prefix}\nCELLMAIL_DATA_DIR={}\n{tls}",
        etcd_endpoint(),
        dir.path().display()
    );
    std::fs::write(&file, settings).unwrap();
    let _cell = Daemon::start(
        "cellmail-cell",
        &["--config", &file.to_string_lossy()],
        None,
    )
    .await
    .unwrap();
    let registry = cellmail_registry::etcd::EtcdRegistry::connect(&[etcd_endpoint()])
        .await
        .unwrap();
    let alive = format!("{prefix}alive/cell-cfg");
    let mut registered = false;
    for _ in 0..200 {
        if registry.get(&alive).await.unwrap().is_some() {
            registered = true;
            break;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    assert!(
        registered,
        "the cell took its id, registry, prefix and data dir from the file"
    );
    assert!(dir.path().join("cells/cell-cfg/store.redb").exists());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn ses_event_json_on_the_sqs_feedback_queue_suppresses_for_its_tenant_only() {
    let unique = cellmail_proto::MessageId::generate()
        .to_string()
        .to_lowercase();
    let registry = registry_args(&etcd_endpoint(), &unique_prefix("feedback"));
    let queue_prefix = format!("f{}-", &unique[16..]);
    let endpoint = cellmail_tests::emulator::aws_endpoint();
    let aws = [
        "--queue",
        "sqs",
        "--aws-endpoint",
        &endpoint,
        "--aws-region",
        "us-east-1",
        "--sqs-queue-prefix",
        &queue_prefix,
    ];
    let dir = tempfile::tempdir().unwrap();
    let (_cell, front, control) = one_cell(&registry, "cell-f", dir.path(), &aws, &[]).await;
    let create = |id: String| {
        let control = control.clone();
        async move {
            let request = v1::CreateTenantRequest {
                domains: vec![format!("{id}.example")],
                id,
                tier: String::new(),
                policy: None,
                ..Default::default()
            };
            until_ok(Duration::from_secs(10), || {
                let (mut client, request) = (control.clone(), request.clone());
                async move { client.create_tenant(request).await }
            })
            .await
            .unwrap()
            .into_inner()
            .api_key
        }
    };
    let (a_id, b_id) = (format!("a{unique}"), format!("b{unique}"));
    let (a, b) = (create(a_id.clone()).await, create(b_id.clone()).await);
    let mut sender = v1::sender_client::SenderClient::connect(format!("http://{}", front.router))
        .await
        .unwrap();
    let (gone, angry) = ("gone@dest.example", "angry@dest.example");
    let mut first = message(&format!("news@{a_id}.example"), gone, "");
    first.to.push(angry.into());
    let sent = until_ok(Duration::from_secs(10), || {
        let (mut client, request) = (sender.clone(), authorized(&a, first.clone()));
        async move { client.send(request).await }
    })
    .await;
    let id = sent.unwrap().into_inner().message_id;

    // SES publishes through SNS or EventBridge to the cell's feedback queue.
    let records: Vec<String> = [
        "sns-wrapped-bounce.json",
        "eventbridge-wrapped-complaint.json",
    ]
    .into_iter()
    .map(|fixture| cellmail_tests::emulator::ses_event(fixture, &a_id, &id))
    .collect();
    let queue = format!("{queue_prefix}cell-f-feedback");
    cellmail_tests::emulator::put_on_queue(&queue, &records)
        .await
        .unwrap();

    let list = |key: String| {
        let mut sender = sender.clone();
        async move {
            let request = authorized(&key, v1::ListSuppressionsRequest::default());
            let listed = sender
                .list_suppressions(request)
                .await
                .unwrap()
                .into_inner();
            let mut addresses: Vec<String> =
                listed.suppressions.into_iter().map(|s| s.address).collect();
            addresses.sort();
            addresses
        }
    };
    let mut a_list = Vec::new();
    for _ in 0..200 {
        a_list = list(a.clone()).await;
        if a_list.len() == 2 {
            break;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    assert_eq!(a_list, [angry, gone]);
    assert!(list(b.clone()).await.is_empty(), "B's list is untouched");
    let events_of_first = async || -> Vec<String> {
        let status = cellmail_tests::get_message(&sender, &a, &id).await.unwrap();
        status.events.into_iter().map(|e| e.r#type).collect()
    };
    let events = events_of_first().await;
    assert!(
        events.contains(&"BOUNCE".to_owned()) && events.contains(&"COMPLAINT".to_owned()),
        "{events:?}"
    );

    // Queues deliver at least once: the bounce again, then an open to tell it was read.
    let again = ["sns-wrapped-bounce.json", "open.json"]
        .map(|fixture| cellmail_tests::emulator::ses_event(fixture, &a_id, &id));
    cellmail_tests::emulator::put_on_queue(&queue, &again)
        .await
        .unwrap();
    let mut events = Vec::new();
    for _ in 0..200 {
        events = events_of_first().await;
        if events.iter().any(|e| e == "OPEN") {
            break;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let bounces = events.iter().filter(|e| *e == "BOUNCE").count();
    assert!(events.iter().any(|e| e == "OPEN"), "{events:?}");
    assert_eq!(
        bounces, 1,
        "a bounce delivered twice is recorded once: {events:?}"
    );

    let again = sender
        .send(authorized(
            &a,
            message(&format!("news@{a_id}.example"), gone, ""),
        ))
        .await
        .unwrap()
        .into_inner();
    assert_eq!(
        again.recipients[0].state,
        v1::RecipientState::Suppressed as i32
    );
    assert_eq!(
        again.recipients[0].scope,
        v1::SuppressionScope::Tenant as i32
    );
    let for_b = sender
        .send(authorized(
            &b,
            message(&format!("news@{b_id}.example"), gone, ""),
        ))
        .await
        .unwrap()
        .into_inner();
    assert_eq!(
        for_b.recipients[0].state,
        v1::RecipientState::Accepted as i32
    );
}

/// Sends in flight when their cell dies are answered UNAVAILABLE (retry with the same key),
/// not UNKNOWN: the router takes a connection to a cell that broke under a call for the
/// cell being unavailable.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sends_in_flight_when_their_cell_dies_are_answered_unavailable() {
    let registry = registry_args(&etcd_endpoint(), &unique_prefix("in-flight"));
    let dir = tempfile::tempdir().unwrap();
    let (mut cell, front, control) = one_cell(&registry, "cell-a", dir.path(), &[], &[]).await;
    let created = until_ok(Duration::from_secs(10), || {
        let mut control = control.clone();
        async move {
            // A rate its 32 senders stay under: each stops at its first failure.
            let request = v1::CreateTenantRequest {
                id: "ta".into(),
                domains: vec!["a.example".into()],
                policy: Some(v1::TenantPolicy {
                    rate_per_second: 100_000,
                    burst: 100_000,
                    ..Default::default()
                }),
                ..Default::default()
            };
            control.create_tenant(request).await
        }
    })
    .await
    .unwrap()
    .into_inner();
    let key = created.api_key;
    let sender = v1::sender_client::SenderClient::connect(format!("http://{}", front.router))
        .await
        .unwrap();
    let send = move |id: String| {
        let (mut sender, key) = (sender.clone(), key.clone());
        async move {
            let request = message("x@a.example", "j@example.com", &id);
            sender.send(authorized(&key, request)).await
        }
    };
    until_ok(Duration::from_secs(10), || send("first".into()))
        .await
        .unwrap();

    // 32 senders keep a send each in flight until one fails; the cell dies under them.
    let senders: Vec<_> = (0..32)
        .map(|n| {
            let send = send.clone();
            tokio::spawn(async move {
                for i in 0.. {
                    if let Err(status) = send(format!("{n}-{i}")).await {
                        return status;
                    }
                }
                unreachable!("a sender sends until it fails")
            })
        })
        .collect();
    tokio::time::sleep(Duration::from_millis(300)).await;
    cell.kill();
    for sender in senders {
        let status = sender.await.unwrap();
        assert_eq!(status.code(), Code::Unavailable, "{status:?}");
    }
}
