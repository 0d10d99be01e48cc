//! Tenant moves: under load nothing is lost or sent twice and the neighbours on the source
//! cell see nothing (on the embedded defaults, and on etcd, SQS and SES with each cell its own
//! SES account); bad requests name their field; late feedback at the old cell reaches the
//! new one; a standby control plane finishes a move its leader left.

use std::collections::HashMap;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::time::Duration;

use cellmail_proto::v1;
use cellmail_tests::{Control, Platform, authorized, keys_in, message, send_retrying, wait_for};
use tonic::Code;
use tonic::transport::Channel;
use tonic_types::StatusExt;

type Sender = v1::sender_client::SenderClient<Channel>;

const DELIVERY: Duration = Duration::from_secs(60);

/// A tenant that may send fast enough for a load test, placed on `cell` (pinned, unless it
/// is `""`: then it must land there by placement).
async fn tenant(control: &mut Control, id: &str, cell: &str) -> String {
    tenant_on(control, id, cell, true).await
}

async fn tenant_on(control: &mut Control, id: &str, cell: &str, pinned: bool) -> String {
    let request = v1::CreateTenantRequest {
        id: id.to_owned(),
        domains: vec![format!("{id}.example")],
        policy: Some(v1::TenantPolicy {
            rate_per_second: 10_000,
            ..Default::default()
        }),
        cell: if pinned {
            cell.to_owned()
        } else {
            String::new()
        },
        ..Default::default()
    };
    let created = control.create_tenant(request).await.unwrap().into_inner();
    assert_eq!(created.tenant.unwrap().cell, cell);
    created.api_key
}

/// Polls the tenant's move until it is finished; returns it.
async fn finished_move(control: &Control, tenant: &str) -> v1::MoveInfo {
    let deadline = tokio::time::Instant::now() + Duration::from_secs(60);
    loop {
        let request = v1::GetMoveRequest {
            tenant_id: tenant.to_owned(),
        };
        let latest = control
            .clone()
            .get_move(request)
            .await
            .unwrap()
            .into_inner();
        if matches!(latest.state.as_str(), "COMPLETE" | "ROLLED_BACK") {
            return latest;
        }
        assert!(
            tokio::time::Instant::now() < deadline,
            "the move did not finish: {latest:?}"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_tenant_moved_under_load_sends_every_key_once_and_its_neighbour_sees_no_error() {
    const KEYS: usize = 2000;
    const CLIENTS: usize = 8;
    let dir = tempfile::tempdir().unwrap();
    let platform = Platform::start(dir.path(), &[]).unwrap();
    let mut control = platform.control().await.unwrap();
    let mover = tenant(&mut control, "mover", "cell-1").await;
    let steady = tenant(&mut control, "steady", "cell-1").await;
    let sender = platform.sender().await.unwrap();

    // A key sent before the move answers with the same message after it.
    let early = message("shop@mover.example", "early@example.com", "early");
    let (early_id, _) = send_retrying(&sender, &mover, early.clone()).await;

    let next = Arc::new(AtomicUsize::new(0));
    let retried = Arc::new(AtomicUsize::new(0));
    let clients: Vec<_> = (0..CLIENTS)
        .map(|_| {
            let (sender, key, next, retried) =
                (sender.clone(), mover.clone(), next.clone(), retried.clone());
            tokio::spawn(async move {
                let mut ids = Vec::new();
                loop {
                    let n = next.fetch_add(1, Ordering::Relaxed);
                    if n >= KEYS {
                        return ids;
                    }
                    let to = format!("r{n}@example.com");
                    let request = message("shop@mover.example", &to, &format!("key-{n}"));
                    let (id, retries) = send_retrying(&sender, &key, request).await;
                    retried.fetch_add(retries, Ordering::Relaxed);
                    ids.push(id);
                }
            })
        })
        .collect();
    let neighbour = {
        let (sender, key) = (sender.clone(), steady.clone());
        tokio::spawn(async move {
            let mut errors = Vec::new();
            for n in 0..300 {
                let request = message("news@steady.example", "n@example.com", &format!("s-{n}"));
                if let Err(status) = sender.clone().send(authorized(&key, request)).await {
                    errors.push(status);
                }
                tokio::time::sleep(Duration::from_millis(5)).await;
            }
            errors
        })
    };

    wait_for(Duration::from_secs(30), "sends under way", || {
        (next.load(Ordering::Relaxed) > KEYS / 5).then_some(())
    })
    .await
    .unwrap();
    let moved = platform.cli(&[
        "tenant", "move", "mover", "--to", "cell-2", "--reason", "test",
    ]);
    assert_eq!(moved["from"], "cell-1");
    assert_eq!(moved["from_epoch"], 1);
    let done = finished_move(&control, "mover").await;
    assert_eq!(done.state, "COMPLETE", "{done:?}");
    assert!(done.freeze_ms > 0, "{done:?}");
    assert!(
        next.load(Ordering::Relaxed) < KEYS,
        "the move finished while sends were still flowing"
    );
    let mut ids = vec![early_id.clone()];
    for client in clients {
        ids.extend(client.await.unwrap());
    }
    let neighbour_errors = neighbour.await.unwrap();
    assert!(
        neighbour_errors.is_empty(),
        "the neighbour on the source cell saw errors: {neighbour_errors:?}"
    );

    let (again, _) = send_retrying(&sender, &mover, early).await;
    assert_eq!(
        again, early_id,
        "the idempotency window moved with the tenant"
    );
    let tenants = platform.cli(&["tenant", "list"]);
    let placed = tenants
        .as_array()
        .unwrap()
        .iter()
        .find(|t| t["tenant"] == "mover")
        .unwrap()
        .clone();
    assert_eq!(
        (placed["cell"].clone(), placed["epoch"].clone()),
        ("cell-2".into(), 2.into())
    );

    let keys = wait_for(DELIVERY, "every key delivered", || {
        let keys = keys_in(&platform.data_dir.join("mail").join("mover"));
        (keys.values().sum::<usize>() > KEYS).then_some(keys)
    })
    .await
    .unwrap();
    let doubled: Vec<_> = keys.iter().filter(|(_, n)| **n > 1).collect();
    assert!(doubled.is_empty(), "sent twice: {doubled:?}");
    let lost: Vec<_> = (0..KEYS)
        .map(|n| format!("key-{n}"))
        .filter(|k| !keys.contains_key(k))
        .collect();
    assert!(lost.is_empty(), "never sent: {lost:?}");
    assert_eq!(keys.get("early"), Some(&1));
    // The new cell answers for every message, those the old one accepted and sent included
    // (the hand-over copied their records as they ended).
    for id in &ids {
        let status = cellmail_tests::get_message(&sender, &mover, id).await;
        assert_eq!(status.unwrap().state, "SENT", "{id}");
    }
    // The tenant's figures moved with it: its stats count every key once, wherever it went.
    let deadline = tokio::time::Instant::now() + Duration::from_secs(30);
    let counted = loop {
        let request = authorized(&mover, v1::GetStatsRequest { hours: 2 });
        let stats = sender
            .clone()
            .get_stats(request)
            .await
            .unwrap()
            .into_inner();
        let transactional = stats
            .classes
            .into_iter()
            .find(|c| c.message_class == v1::MessageClass::Transactional as i32)
            .unwrap();
        if transactional.sent as usize > KEYS || tokio::time::Instant::now() > deadline {
            break transactional;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    };
    assert_eq!(
        (counted.accepted, counted.sent),
        (KEYS as u64 + 1, KEYS as u64 + 1),
        "{counted:?}"
    );
    let actions: Vec<String> = platform
        .cli(&["audit", "--tenant", "mover"])
        .as_array()
        .unwrap()
        .iter()
        .map(|e| e["action"].as_str().unwrap().to_owned())
        .collect();
    for step in [
        "tenant.move cell-1 -> cell-2",
        "tenant.move.freeze",
        "tenant.move.switch",
        "tenant.move.complete",
    ] {
        assert!(actions.iter().any(|a| a == step), "{step} in {actions:?}");
    }
    eprintln!(
        "moved under load: {} ms frozen, {} sends retried",
        done.freeze_ms,
        retried.load(Ordering::Relaxed)
    );
}

/// Waits until every one of `ids` of tenant `key` is SENT.
async fn all_sent(sender: &Sender, key: &str, ids: &[String]) {
    for id in ids {
        let sent = cellmail_tests::until_ok(DELIVERY, || async {
            let status = cellmail_tests::get_message(sender, key, id).await?;
            match status.state.as_str() {
                "SENT" => Ok(()),
                state => Err(tonic::Status::unavailable(format!("{id} is {state}"))),
            }
        });
        sent.await.unwrap();
    }
}

/// The suppressed addresses of tenant `key`, sorted.
async fn suppressed(sender: &Sender, key: &str) -> Vec<String> {
    let request = authorized(key, v1::ListSuppressionsRequest::default());
    let listed = sender.clone().list_suppressions(request).await.unwrap();
    let mut addresses: Vec<String> = (listed.into_inner().suppressions.into_iter())
        .map(|s| s.address)
        .collect();
    addresses.sort();
    addresses
}

async fn suppress(sender: &Sender, key: &str, address: &str) {
    let request = v1::AddSuppressionRequest {
        address: address.into(),
        reason: 0,
    };
    sender
        .clone()
        .add_suppression(authorized(key, request))
        .await
        .unwrap();
}

/// Moves `tenant` to `cell` and waits until the move is complete.
async fn moved(platform: &Platform, control: &Control, tenant: &str, cell: &str) -> v1::MoveInfo {
    platform.cli(&["tenant", "move", tenant, "--to", cell]);
    let done = finished_move(control, tenant).await;
    assert_eq!(done.state, "COMPLETE", "{done:?}");
    done
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_tenant_moved_back_is_copied_only_what_changed_meanwhile_and_has_all_of_it() {
    let dir = tempfile::tempdir().unwrap();
    let platform = Platform::start(dir.path(), &[]).unwrap();
    let mut control = platform.control().await.unwrap();
    let key = tenant(&mut control, "returner", "cell-1").await;
    let neighbour = tenant(&mut control, "neighbour", "cell-2").await;
    let sender = platform.sender().await.unwrap();
    let send = |n: &str| {
        let (sender, key) = (sender.clone(), key.clone());
        let request = message("shop@returner.example", &format!("{n}@example.com"), n);
        async move { send_retrying(&sender, &key, request).await.0 }
    };
    let mut old = Vec::new();
    for n in 0..20 {
        old.push(send(&format!("old-{n}")).await);
    }
    suppress(&sender, &key, "kept@example.com").await;
    suppress(&sender, &key, "dropped@example.com").await;
    suppress(&sender, &neighbour, "theirs@example.com").await;
    all_sent(&sender, &key, &old).await;

    let away = moved(&platform, &control, "returner", "cell-2").await;
    assert!(
        away.detail
            .starts_with("pre-copied 2 suppressions, 20 idempotency keys and 20 message records;"),
        "{away:?}"
    );
    let new = vec![
        send("new-0").await,
        send("new-1").await,
        send("new-2").await,
    ];
    let request = authorized(
        &key,
        v1::RemoveSuppressionRequest {
            address: "dropped@example.com".into(),
        },
    );
    sender.clone().remove_suppression(request).await.unwrap();
    suppress(&sender, &key, "added@example.com").await;
    all_sent(&sender, &key, &new).await;

    let back = moved(&platform, &control, "returner", "cell-1").await;
    assert!(
        back.detail.contains(
            " 3 idempotency keys and 3 message records written since the source took the tenant over from the target;"
        ),
        "only what cell-2 wrote is copied back, on its own clock: {back:?}"
    );
    // Cell-1 answers for all of it as it is now.
    for id in old.iter().chain(&new) {
        let status = cellmail_tests::get_message(&sender, &key, id)
            .await
            .unwrap();
        assert_eq!(status.state, "SENT", "{status:?}");
    }
    assert_eq!(
        suppressed(&sender, &key).await,
        ["added@example.com", "kept@example.com"]
    );
    assert_eq!(
        suppressed(&sender, &neighbour).await,
        ["theirs@example.com"]
    );
    for (n, id) in [("old-0", &old[0]), ("new-2", &new[2])] {
        assert_eq!(&send(n).await, id, "{n} was sent once, before");
    }
    let keys = keys_in(&platform.data_dir.join("mail").join("returner"));
    assert!(keys.values().all(|n| *n == 1), "sent twice: {keys:?}");
    assert_eq!(keys.len(), 23);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bad_move_requests_are_refused_naming_the_field_and_change_nothing() {
    let dir = tempfile::tempdir().unwrap();
    let platform = Platform::start(dir.path(), &[]).unwrap();
    let mut control = platform.control().await.unwrap();
    tenant(&mut control, "stays", "cell-1").await;
    let request = |tenant: &str, to: &str| v1::MoveTenantRequest {
        tenant_id: tenant.to_owned(),
        to_cell: to.to_owned(),
        reason: String::new(),
    };
    let cases = [
        (request("stays", "cell-1"), Code::InvalidArgument, "to_cell"),
        (request("stays", "cell-9"), Code::InvalidArgument, "to_cell"),
        (
            request("stays", "NOT A CELL"),
            Code::InvalidArgument,
            "to_cell",
        ),
        (request("", "cell-2"), Code::InvalidArgument, "tenant_id"),
        (request("nobody", "cell-2"), Code::NotFound, ""),
    ];
    for (bad, code, field) in cases {
        let status = control.move_tenant(bad.clone()).await.unwrap_err();
        assert_eq!(status.code(), code, "{bad:?}: {status:?}");
        if !field.is_empty() {
            let violations = status.get_details_bad_request().unwrap().field_violations;
            assert_eq!(violations[0].field, field, "{bad:?}");
        }
    }
    platform.cli(&["cell", "drain", "cell-2"]);
    let status = control
        .move_tenant(request("stays", "cell-2"))
        .await
        .unwrap_err();
    assert_eq!(
        status.code(),
        Code::InvalidArgument,
        "a draining cell takes no tenant"
    );
    let tenants = platform.cli(&["tenant", "list"]);
    assert_eq!(tenants[0]["cell"], "cell-1");
    assert_eq!(tenants[0]["epoch"], 1);
    let status = control
        .get_move(v1::GetMoveRequest {
            tenant_id: "stays".into(),
        })
        .await
        .unwrap_err();
    assert_eq!(status.code(), Code::NotFound, "no move was recorded");
}

/// Separate processes on etcd: two cells (queues on SQS when `sqs_prefix` is given), with
/// extra flags for the first, a control plane and a router.
mod deployed {
    use super::*;
    use cellmail_tests::processes::{Daemon, Front, registry_args, start_cell};
    use cellmail_tests::services::{etcd_endpoint, unique_prefix};
    use cellmail_tests::{control_client, until_ok};

    pub const ADMIN_TOKEN: &str = "test-admin-token-0123456789";

    /// Fields drop in order: the processes stop before their data dirs go.
    pub struct Deployment {
        pub cells: [Daemon; 2],
        pub front: Front,
        pub dirs: [tempfile::TempDir; 2],
        pub registry: Vec<String>,
        pub prefix: String,
        pub control: Control,
        pub sender: Sender,
    }

    /// Cell flags for queues on the AWS emulator under `prefix`.
    pub fn sqs(prefix: &str) -> Vec<String> {
        let endpoint = cellmail_tests::emulator::aws_endpoint();
        [
            "--queue",
            "sqs",
            "--aws-endpoint",
            &endpoint,
            "--aws-region",
            "us-east-1",
        ]
        .into_iter()
        .map(str::to_owned)
        .chain(["--sqs-queue-prefix".to_owned(), prefix.to_owned()])
        .collect()
    }

    /// Cell flags for queues on SQS under `prefix` and mail through SES, both at `endpoint`
    /// (an SES stand-in in front of the emulator).
    pub fn ses(prefix: &str, endpoint: &str, region: &str) -> Vec<String> {
        let flags = ["--queue", "sqs", "--mailer", "ses", "--aws-region", region];
        let at = ["--aws-endpoint", endpoint, "--sqs-queue-prefix", prefix];
        flags.into_iter().chain(at).map(str::to_owned).collect()
    }

    impl Deployment {
        pub async fn start(test: &str, first: &[String], both: &[String]) -> Self {
            let a: Vec<String> = both.iter().chain(first).cloned().collect();
            Self::start_each(test, [a, both.to_vec()]).await
        }

        /// Cell-a started with `flags[0]`, cell-b with `flags[1]`.
        pub async fn start_each(test: &str, flags: [Vec<String>; 2]) -> Self {
            let prefix = unique_prefix(test);
            let registry = registry_args(&etcd_endpoint(), &prefix);
            let dirs = [tempfile::tempdir().unwrap(), tempfile::tempdir().unwrap()];
            let cells = [
                start_cell("cell-a", &registry, dirs[0].path(), &strs(&flags[0]))
                    .await
                    .unwrap(),
                start_cell("cell-b", &registry, dirs[1].path(), &strs(&flags[1]))
                    .await
                    .unwrap(),
            ];
            let front = Front::start(&registry, ADMIN_TOKEN).await.unwrap();
            let control = control_client(&format!("http://{}", front.control), ADMIN_TOKEN)
                .await
                .unwrap();
            let sender = Sender::connect(format!("http://{}", front.router))
                .await
                .unwrap();
            let deployment = Self {
                registry,
                prefix,
                dirs,
                cells,
                front,
                control,
                sender,
            };
            wait_for_cells(&deployment.control).await;
            deployment
        }

        /// Restarts cell `n` (0: cell-a) on its data dir with `flags`.
        pub async fn restart_cell(&mut self, n: usize, flags: &[String]) {
            self.cells[n].kill();
            let id = ["cell-a", "cell-b"][n];
            self.cells[n] = start_cell(id, &self.registry, self.dirs[n].path(), &strs(flags))
                .await
                .unwrap();
        }

        /// (idempotency key -> times sent) over both cells' file sinks.
        pub fn sent_keys(&self, tenant: &str) -> HashMap<String, usize> {
            let mut keys = HashMap::new();
            for dir in &self.dirs {
                for (key, n) in keys_in(&dir.path().join("mail").join(tenant)) {
                    *keys.entry(key).or_default() += n;
                }
            }
            keys
        }

        /// Sends one message for `key`'s tenant, retrying while the router catches up.
        pub async fn send(&self, key: &str, request: v1::SendRequest) -> v1::SendResponse {
            until_ok(Duration::from_secs(10), || {
                let (mut sender, request) = (self.sender.clone(), authorized(key, request.clone()));
                async move { sender.send(request).await }
            })
            .await
            .unwrap()
            .into_inner()
        }
    }

    fn strs(flags: &[String]) -> Vec<&str> {
        flags.iter().map(String::as_str).collect()
    }

    async fn wait_for_cells(control: &Control) {
        cellmail_tests::cells_until(control, |c| c.alive, 2).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_late_bounce_at_the_old_cell_suppresses_the_address_in_the_new_one() {
    let unique = cellmail_proto::MessageId::generate()
        .to_string()
        .to_lowercase();
    let queues = format!("m{}-", &unique[16..]);
    let mut both = deployed::sqs(&queues);
    both.extend(["--webhook-allow-cidr=127.0.0.0/8", "--webhook-allow-http"].map(String::from));
    let mut d = deployed::Deployment::start("late-bounce", &[], &both).await;
    let (moved_id, other_id) = (format!("l{unique}"), format!("o{unique}"));
    let moved = tenant(&mut d.control, &moved_id, "cell-a").await;
    let other = tenant(&mut d.control, &other_id, "cell-a").await;
    // Its webhook endpoint, made on cell-a, follows it.
    let receiver = cellmail_tests::receiver::Receiver::start().await.unwrap();
    let create = v1::CreateWebhookRequest {
        url: receiver.url("/moved"),
        ..Default::default()
    };
    let hook = (d.sender.clone())
        .create_webhook(authorized(&moved, create))
        .await
        .unwrap()
        .into_inner();
    let gone = "gone@dest.example";
    let sent = d
        .send(
            &moved,
            message(&format!("news@{moved_id}.example"), gone, "before"),
        )
        .await;

    let request = v1::MoveTenantRequest {
        tenant_id: moved_id.clone(),
        to_cell: "cell-b".into(),
        reason: "late bounce".into(),
    };
    d.control.move_tenant(request).await.unwrap();
    assert_eq!(finished_move(&d.control, &moved_id).await.state, "COMPLETE");

    // SES reports the bounce after the move, to the queue of the cell that sent the message.
    let bounce =
        cellmail_tests::emulator::ses_event("sns-wrapped-bounce.json", &moved_id, &sent.message_id);
    cellmail_tests::emulator::put_on_queue(&format!("{queues}cell-a-feedback"), &[bounce])
        .await
        .unwrap();

    let listed = cellmail_tests::until_ok(Duration::from_secs(20), || {
        let (mut sender, key) = (d.sender.clone(), moved.clone());
        async move {
            let request = authorized(&key, v1::ListSuppressionsRequest::default());
            let listed = sender
                .list_suppressions(request)
                .await?
                .into_inner()
                .suppressions;
            if listed.is_empty() {
                return Err(tonic::Status::not_found("not suppressed yet"));
            }
            Ok(listed)
        }
    })
    .await
    .unwrap();
    assert_eq!(listed[0].address, "gone@dest.example");
    assert_eq!(listed[0].message_id, sent.message_id);

    // Its events followed it: the send's steps on cell-a and the late bounce, each once (in
    // the order they were logged: on SQS a send may be recorded before its accept's record).
    let events = crate::events::all_events(&d.sender, &moved, Default::default()).await;
    let mut steps: Vec<(&str, &str)> = (events.iter())
        .map(|e| (e.r#type.as_str(), e.message_id.as_str()))
        .collect();
    steps.sort();
    let id = sent.message_id.as_str();
    assert_eq!(steps, [("accepted", id), ("bounced", id), ("sent", id)]);

    // And so did its endpoint: every event reached it (the send's from cell-a, the bounce
    // from cell-b), each under its event's id, signed with the one secret.
    let hooks = (d.sender.clone())
        .list_webhooks(authorized(&moved, v1::ListWebhooksRequest {}))
        .await
        .unwrap()
        .into_inner()
        .webhooks;
    assert_eq!(hooks.len(), 1);
    assert_eq!(hooks[0].id, hook.webhook.unwrap().id);
    let delivered = wait_for(
        Duration::from_secs(20),
        "the moved tenant's webhooks",
        || {
            let got = receiver.got("/moved");
            let ids: std::collections::BTreeSet<String> =
                got.iter().map(|d| d.id.clone()).collect();
            (ids.len() >= 3).then_some((got, ids))
        },
    )
    .await
    .unwrap();
    let logged: std::collections::BTreeSet<String> = events.iter().map(|e| e.id.clone()).collect();
    assert_eq!(
        delivered.1, logged,
        "the events as logged, none lost or made up"
    );
    assert!((delivered.0.iter()).all(|d| cellmail_tests::receiver::verify(d, &hook.secret)));

    let again = d
        .send(
            &moved,
            message(&format!("news@{moved_id}.example"), gone, "after"),
        )
        .await;
    assert_eq!(
        again.recipients[0].state,
        v1::RecipientState::Suppressed as i32
    );
    let for_other = d
        .send(
            &other,
            message(&format!("news@{other_id}.example"), gone, "other"),
        )
        .await;
    assert_eq!(
        for_other.recipients[0].state,
        v1::RecipientState::Accepted as i32,
        "the other tenant on the old cell is not suppressed"
    );
}

/// Sends `keys` messages of tenant `id` (API key `key`) one after another, retrying as a
/// client does; their message ids.
fn keep_sending(
    sender: &Sender,
    id: &str,
    key: &str,
    keys: usize,
) -> tokio::task::JoinHandle<Vec<String>> {
    let (sender, key, from) = (sender.clone(), key.to_owned(), format!("shop@{id}.example"));
    tokio::spawn(async move {
        let mut ids = Vec::new();
        for n in 0..keys {
            let request = message(&from, "jane@example.com", &format!("key-{n}"));
            ids.push(send_retrying(&sender, &key, request).await.0);
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        ids
    })
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn on_ses_a_move_and_an_evacuation_to_another_accounts_cell_send_every_key_once() {
    const KEYS: usize = 150;
    use cellmail_tests::ses_standin::SesStandIn;
    // Each cell sends through an SES account of its own.
    let accounts = [
        SesStandIn::start(1000.0).await.unwrap(),
        SesStandIn::start(1000.0).await.unwrap(),
    ];
    let unique = cellmail_proto::MessageId::generate()
        .to_string()
        .to_lowercase();
    let queues = format!("v{}-", &unique[16..]);
    // In two regions: the tenant's MAIL FROM domain has an MX record for each.
    let regions = ["us-east-1", "eu-west-1"];
    let flags = [0, 1].map(|i| deployed::ses(&queues, &accounts[i].endpoint, regions[i]));
    let mut d = deployed::Deployment::start_each("ses-move", flags).await;
    let tenants = [format!("m{}", &unique[..12]), format!("s{}", &unique[..12])];
    let mut sending = Vec::new();
    for id in &tenants {
        let key = tenant(&mut d.control, id, "cell-a").await;
        cellmail_tests::until_router_serves(&d.sender, &key).await;
        sending.push(keep_sending(&d.sender, id, &key, KEYS));
    }
    wait_for(Duration::from_secs(30), "mail going out", || {
        (accounts[0].sent().len() > 10).then_some(())
    })
    .await
    .unwrap();

    // The first tenant moves, then its neighbour goes with the cell's evacuation.
    let request = v1::MoveTenantRequest {
        tenant_id: tenants[0].clone(),
        to_cell: "cell-b".into(),
        reason: "to another SES account".into(),
    };
    d.control.move_tenant(request).await.unwrap();
    let done = finished_move(&d.control, &tenants[0]).await;
    assert_eq!(done.state, "COMPLETE", "{done:?}");
    let request = v1::EvacuateCellRequest {
        cell_id: "cell-a".into(),
        parallel: 1,
        reason: "to another SES account".into(),
    };
    let evacuation = d.control.evacuate_cell(request).await.unwrap().into_inner();
    cellmail_tests::until_ok(Duration::from_secs(60), || {
        let (mut control, id) = (d.control.clone(), evacuation.id.clone());
        async move {
            let operation = control
                .get_operation(v1::GetOperationRequest { id })
                .await?
                .into_inner();
            anyhow::ensure!(operation.finished, "{operation:?}");
            Ok(())
        }
    })
    .await
    .unwrap();
    let done = finished_move(&d.control, &tenants[1]).await;
    assert_eq!(
        (done.state.as_str(), done.to_cell.as_str()),
        ("COMPLETE", "cell-b")
    );

    // Every message went out once, through one account or the other, and each tenant's
    // later mail through the second one.
    for (id, sending) in tenants.iter().zip(sending) {
        let ids = sending.await.unwrap();
        let set = format!("cellmail-{id}");
        let sent_ids = || {
            let mut sent: HashMap<String, usize> = HashMap::new();
            for account in &accounts {
                for s in account
                    .sent()
                    .into_iter()
                    .filter(|s| s.configuration_set == set)
                {
                    *sent.entry(s.message_id).or_default() += 1;
                }
            }
            sent
        };
        let sent = wait_for(DELIVERY, "every key sent through SES", || {
            let sent = sent_ids();
            ids.iter().all(|id| sent.contains_key(id)).then_some(sent)
        })
        .await
        .unwrap();
        let doubled: Vec<_> = sent.iter().filter(|(_, n)| **n > 1).collect();
        assert!(doubled.is_empty(), "{id} sent twice: {doubled:?}");
        let last = ids.last().unwrap();
        let through_second = accounts[1].sent().iter().any(|s| &s.message_id == last);
        assert!(
            through_second,
            "{id}'s last message went through the target's account"
        );

        // Both accounts sign the tenant's mail with the domain's own DKIM key, under the
        // one selector its DNS record names: the move needed no DNS change.
        let domain = format!("{id}.example");
        let records = (d.control.clone())
            .verify_domain(v1::DomainRequest {
                tenant_id: id.clone(),
                domain: domain.clone(),
            })
            .await
            .unwrap()
            .into_inner()
            .records;
        let published = records.iter().find(|r| r.purpose == "dkim").unwrap();
        let signing = accounts.each_ref().map(|account| account.dkim_of(&domain));
        let (selector, _) = signing[0].clone().expect("the first account has the key");
        assert_eq!(published.name, format!("{selector}._domainkey.{domain}"));
        assert_eq!(signing[0], signing[1], "the same key on both accounts");
        // And with the one MAIL FROM domain, whose MX records name both regions.
        let mail_from = format!("bounce.{domain}");
        let mx: Vec<(&str, &str)> = (records.iter())
            .filter(|r| r.purpose == "mail-from-mx")
            .map(|r| (r.name.as_str(), r.value.as_str()))
            .collect();
        assert_eq!(
            mx,
            [
                (
                    mail_from.as_str(),
                    "10 feedback-smtp.eu-west-1.amazonses.com"
                ),
                (
                    mail_from.as_str(),
                    "10 feedback-smtp.us-east-1.amazonses.com"
                ),
            ]
        );
        for account in &accounts {
            assert_eq!(account.mail_from_of(&domain), Some(mail_from.clone()));
        }
    }
}

/// A deployment whose cell-a delivers nothing at first (a move off it waits at SWITCHED for
/// its backlog), with a standby control plane beside the leading one.
struct Failover {
    d: deployed::Deployment,
    standby: Control,
    standby_addr: String,
    _standby: cellmail_tests::processes::Daemon,
    etcd: cellmail_registry::etcd::EtcdRegistry,
}

impl Failover {
    async fn start(test: &str) -> Self {
        let no_workers = ["--cell-workers".to_owned(), "0".to_owned()];
        let d = deployed::Deployment::start(test, &no_workers, &[]).await;
        let etcd = cellmail_registry::etcd::EtcdRegistry::connect(&[
            cellmail_tests::services::etcd_endpoint(),
        ])
        .await
        .unwrap();
        let standby_addr = cellmail_tests::processes::free_addr().unwrap();
        let mut args = vec![
            "--control-addr",
            &standby_addr,
            "--admin-token",
            deployed::ADMIN_TOKEN,
        ];
        args.extend(d.registry.iter().map(String::as_str));
        let daemon = cellmail_tests::processes::Daemon::start(
            "cellmail-control",
            &args,
            Some(&standby_addr),
        )
        .await
        .unwrap();
        let standby = cellmail_tests::control_client(
            &format!("http://{standby_addr}"),
            deployed::ADMIN_TOKEN,
        )
        .await
        .unwrap();
        let failover = Self {
            d,
            standby,
            standby_addr,
            _standby: daemon,
            etcd,
        };
        assert!(
            failover
                .leader()
                .await
                .starts_with(&failover.d.front.control),
            "the first control plane leads"
        );
        failover
    }

    /// The address the leading control plane's election value names.
    async fn leader(&self) -> String {
        use cellmail_registry::Registry;
        let election = cellmail_registry::schema::Keys::new(&self.d.prefix).election();
        let value = self
            .etcd
            .leader(&election)
            .await
            .unwrap()
            .unwrap_or_default();
        String::from_utf8(value).unwrap()
    }

    /// Kills the leading control plane, lets cell-a deliver, and checks the standby leads.
    async fn fail_over(&mut self) {
        self.d.front.kill_control();
        self.d.restart_cell(0, &[]).await;
        cellmail_tests::until_ok(Duration::from_secs(30), || async {
            let leader = self.leader().await;
            if leader.starts_with(&self.standby_addr) {
                Ok(())
            } else {
                Err(format!("the leader is {leader:?}"))
            }
        })
        .await
        .unwrap();
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_standby_control_plane_finishes_the_move_its_leader_left() {
    let mut f = Failover::start("failover").await;
    let key = tenant(&mut f.d.control, "failover", "cell-a").await;
    const KEYS: usize = 20;
    for n in 0..KEYS {
        let request = message("shop@failover.example", "x@example.com", &format!("k{n}"));
        f.d.send(&key, request).await;
    }
    // The standby takes the request; the leader carries it out, up to the wait for cell-a.
    let request = v1::MoveTenantRequest {
        tenant_id: "failover".into(),
        to_cell: "cell-b".into(),
        reason: "failover".into(),
    };
    f.standby.move_tenant(request).await.unwrap();
    wait_for_state(&f.standby, "failover", "SWITCHED").await;
    f.fail_over().await;

    let done = finished_move(&f.standby, "failover").await;
    assert_eq!(done.state, "COMPLETE", "{done:?}");
    let keys = wait_for(DELIVERY, "the old cell's backlog delivered", || {
        let keys = f.d.sent_keys("failover");
        (keys.len() == KEYS).then_some(keys)
    })
    .await
    .unwrap();
    assert!(keys.values().all(|n| *n == 1), "{keys:?}");
    let after =
        f.d.send(
            &key,
            message("shop@failover.example", "x@example.com", "after"),
        )
        .await;
    assert_eq!(
        after.recipients[0].state,
        v1::RecipientState::Accepted as i32
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_standby_control_plane_finishes_the_evacuation_its_leader_left() {
    let mut f = Failover::start("evacuation-failover").await;
    const TENANTS: usize = 3;
    for n in 0..TENANTS {
        let id = format!("e{n}");
        let key = tenant(&mut f.d.control, &id, "cell-a").await;
        let request = message(&format!("shop@{id}.example"), "x@example.com", "k");
        f.d.send(&key, request).await;
    }
    // One move at a time: the first waits at SWITCHED for cell-a, the others are pending.
    let request = v1::EvacuateCellRequest {
        cell_id: "cell-a".into(),
        parallel: 1,
        reason: "failover".into(),
    };
    let started =
        f.d.control
            .evacuate_cell(request)
            .await
            .unwrap()
            .into_inner();
    wait_for_state(&f.standby, &started.moves[0].tenant_id, "SWITCHED").await;
    f.fail_over().await;

    let finished = cellmail_tests::until_ok(Duration::from_secs(60), || {
        let (mut standby, id) = (f.standby.clone(), started.id.clone());
        async move {
            let operation = standby
                .get_operation(v1::GetOperationRequest { id })
                .await?
                .into_inner();
            if operation.finished {
                Ok(operation)
            } else {
                Err(tonic::Status::unavailable(format!("{operation:?}")))
            }
        }
    })
    .await
    .unwrap();
    let mut moved: Vec<_> = finished
        .moves
        .iter()
        .map(|m| (m.tenant_id.as_str(), m.to_cell.as_str(), m.outcome.as_str()))
        .collect();
    moved.sort();
    assert_eq!(
        moved,
        [
            ("e0", "cell-b", "COMPLETE"),
            ("e1", "cell-b", "COMPLETE"),
            ("e2", "cell-b", "COMPLETE")
        ]
    );
    for n in 0..TENANTS {
        let id = format!("e{n}");
        let sent = wait_for(DELIVERY, "each tenant's mail delivered", || {
            let sent = f.d.sent_keys(&id);
            (!sent.is_empty()).then_some(sent)
        })
        .await
        .unwrap();
        assert_eq!(sent, HashMap::from([("k".to_owned(), 1)]), "{id}");
    }
}

async fn wait_for_state(control: &Control, tenant: &str, state: &str) {
    let reached = cellmail_tests::until_ok(Duration::from_secs(20), || {
        let mut control = control.clone();
        async move {
            let request = v1::GetMoveRequest {
                tenant_id: tenant.to_owned(),
            };
            let latest = control.get_move(request).await?.into_inner();
            if latest.state == state {
                Ok(latest)
            } else {
                Err(tonic::Status::unavailable(format!("{latest:?}")))
            }
        }
    })
    .await;
    reached.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_evacuated_cell_hands_every_tenant_over_while_sends_flow_and_a_rebalance_evens_out() {
    const TENANTS: usize = 20;
    let dir = tempfile::tempdir().unwrap();
    let platform = Platform::start(dir.path(), &["--cells", "3"]).unwrap();
    let mut control = platform.control().await.unwrap();
    // Placed (not pinned, which a rebalance respects) on cell-1 while it is the only ACTIVE one.
    for cell in ["cell-2", "cell-3"] {
        platform.cli(&["cell", "drain", cell]);
    }
    let mut keys = Vec::new();
    for n in 0..TENANTS {
        keys.push(tenant_on(&mut control, &format!("t{n:02}"), "cell-1", false).await);
    }
    for cell in ["cell-2", "cell-3"] {
        platform.cli(&["cell", "enable", cell]);
    }
    let sender = platform.sender().await.unwrap();
    // Every tenant sends until the evacuation is over; each task answers how many it sent.
    let (sent, stop) = (
        Arc::new(AtomicUsize::new(0)),
        Arc::new(AtomicBool::new(false)),
    );
    let load: Vec<_> = keys
        .iter()
        .enumerate()
        .map(|(n, key)| {
            let (sender, key, sent, stop) =
                (sender.clone(), key.clone(), sent.clone(), stop.clone());
            tokio::spawn(async move {
                let mut count = 0;
                while !stop.load(Ordering::Relaxed) {
                    let from = format!("shop@t{n:02}.example");
                    let request = message(&from, "x@example.com", &format!("k{count}"));
                    send_retrying(&sender, &key, request).await;
                    count += 1;
                    sent.fetch_add(1, Ordering::Relaxed);
                    tokio::time::sleep(Duration::from_millis(10)).await;
                }
                count
            })
        })
        .collect();
    wait_for(Duration::from_secs(30), "sends under way", || {
        (sent.load(Ordering::Relaxed) >= TENANTS).then_some(())
    })
    .await
    .unwrap();
    let before = sent.load(Ordering::Relaxed);
    let evacuated = platform.cli(&["cell", "evacuate", "cell-1", "--parallel", "4", "--wait"]);
    let during = sent.load(Ordering::Relaxed) - before;
    stop.store(true, Ordering::Relaxed);
    let moves = evacuated["moves"].as_array().unwrap();
    assert_eq!(moves.len(), TENANTS);
    assert!(
        moves
            .iter()
            .all(|m| m["outcome"] == "COMPLETE" && m["to"] != "cell-1"),
        "{moves:?}"
    );
    assert!(during > 0, "sends flowed during the evacuation");
    let mut counts = Vec::new();
    for task in load {
        counts.push(task.await.unwrap());
    }
    let cells = platform.cli(&["cell", "list"]);
    let tenants_on = |cell: &str| {
        cells
            .as_array()
            .unwrap()
            .iter()
            .find(|c| c["cell"] == cell)
            .map(|c| {
                (
                    c["tenants"].as_u64().unwrap(),
                    c["state"].as_str().unwrap().to_owned(),
                )
            })
            .unwrap()
    };
    assert_eq!(tenants_on("cell-1"), (0, "DRAINING".to_owned()));
    let (on_2, on_3) = (tenants_on("cell-2").0, tenants_on("cell-3").0);
    assert_eq!(
        (on_2 + on_3, on_2.abs_diff(on_3) <= 1),
        (TENANTS as u64, true)
    );
    for (n, count) in counts.into_iter().enumerate() {
        let tenant = format!("t{n:02}");
        let delivered = wait_for(DELIVERY, "every message delivered", || {
            let delivered = keys_in(&platform.data_dir.join("mail").join(&tenant));
            (delivered.values().sum::<usize>() >= count).then_some(delivered)
        })
        .await
        .unwrap();
        let expected: HashMap<String, usize> = (0..count).map(|i| (format!("k{i}"), 1)).collect();
        assert_eq!(
            delivered, expected,
            "{tenant}: each key sent once, none lost"
        );
    }

    // Back in service, cell-1 is the emptiest: a rebalance plans the fewest moves onto it.
    platform.cli(&["cell", "enable", "cell-1"]);
    let plan = platform.cli(&["rebalance", "plan"]);
    let planned = plan.as_array().unwrap();
    assert_eq!(
        planned.len(),
        6,
        "20 tenants on 3 equal cells: 6 onto cell-1: {plan}"
    );
    assert!(planned.iter().all(|m| m["to"] == "cell-1"), "{plan}");
    assert_eq!(
        tenants_on("cell-2"),
        (on_2, "ACTIVE".to_owned()),
        "a plan moves nothing"
    );
    // The plan an operator reviewed is the one that runs.
    let reviewed = dir.path().join("plan.json");
    std::fs::write(&reviewed, plan.to_string()).unwrap();
    let reviewed_arg = reviewed.to_str().unwrap();
    let applied = platform.cli(&["rebalance", "apply", "--plan", reviewed_arg, "--wait"]);
    let moves = applied["moves"].as_array().unwrap();
    assert!(
        moves.iter().all(|m| m["outcome"] == "COMPLETE"),
        "{applied}"
    );
    let route = |m: &serde_json::Value| (m["tenant"].clone(), m["from"].clone(), m["to"].clone());
    assert_eq!(
        moves.iter().map(route).collect::<Vec<_>>(),
        planned.iter().map(route).collect::<Vec<_>>()
    );
    // Applied again, the same plan is stale: refused whole, naming the move, nothing moved.
    let stale = planned
        .iter()
        .map(|m| v1::PlannedMoveInfo {
            tenant_id: m["tenant"].as_str().unwrap().into(),
            from_cell: m["from"].as_str().unwrap().into(),
            to_cell: m["to"].as_str().unwrap().into(),
            ..Default::default()
        })
        .collect();
    let refused = control
        .apply_rebalance(v1::ApplyRebalanceRequest {
            moves: stale,
            ..Default::default()
        })
        .await
        .unwrap_err();
    assert_eq!(refused.code(), Code::FailedPrecondition, "{refused:?}");
    assert!(
        refused.message().contains("moves[0].from_cell") && refused.message().contains("stale"),
        "{refused:?}"
    );
    let cells = platform.cli(&["cell", "list"]);
    let mut counts: Vec<u64> = cells
        .as_array()
        .unwrap()
        .iter()
        .map(|c| c["tenants"].as_u64().unwrap())
        .collect();
    counts.sort();
    assert_eq!(counts, [6, 7, 7]);
    assert!(
        platform
            .cli(&["rebalance", "plan"])
            .as_array()
            .unwrap()
            .is_empty()
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_frozen_tenant_is_held_then_told_to_retry_and_its_neighbour_is_not() {
    use cellmail_registry::Registry;
    use cellmail_registry::schema::{self, Keys, PlacementRecord, PlacementState};
    let mut d = deployed::Deployment::start("frozen", &[], &[]).await;
    let frozen = tenant(&mut d.control, "frozen", "cell-a").await;
    let other = tenant(&mut d.control, "other", "cell-a").await;
    d.send(
        &frozen,
        message("shop@frozen.example", "x@example.com", "before"),
    )
    .await;
    let etcd =
        cellmail_registry::etcd::EtcdRegistry::connect(
            &[cellmail_tests::services::etcd_endpoint()],
        )
        .await
        .unwrap();
    let key = Keys::new(&d.prefix).placement(&cellmail_proto::TenantId::new("frozen").unwrap());
    let placed: PlacementRecord =
        schema::decode(&etcd.get(&key).await.unwrap().unwrap().value).unwrap();
    let freeze = |state| PlacementRecord {
        state,
        ..placed.clone()
    };
    etcd.put(&key, schema::encode(&freeze(PlacementState::Frozen)), None)
        .await
        .unwrap();

    let started = std::time::Instant::now();
    let refused = until_unavailable(&d.sender, &frozen).await;
    assert!(refused.message().contains("moving"), "{refused:?}");
    assert!(
        started.elapsed() >= Duration::from_secs(2),
        "held for the router's freeze hold first: {:?}",
        started.elapsed()
    );
    let neighbour = d
        .send(&other, message("shop@other.example", "x@example.com", "n"))
        .await;
    assert_eq!(
        neighbour.recipients[0].state,
        v1::RecipientState::Accepted as i32
    );

    // Unfrozen while a call is held: the held call goes through.
    let held = {
        let (sender, key) = (d.sender.clone(), frozen.clone());
        tokio::spawn(async move {
            let request = message("shop@frozen.example", "x@example.com", "held");
            sender.clone().send(authorized(&key, request)).await
        })
    };
    tokio::time::sleep(Duration::from_millis(300)).await;
    etcd.put(&key, schema::encode(&freeze(PlacementState::Serving)), None)
        .await
        .unwrap();
    let sent = held.await.unwrap();
    assert!(sent.is_ok(), "{sent:?}");
}

/// Sends for `key`'s tenant until the router answers UNAVAILABLE (it may not have seen the
/// freeze yet); that answer.
async fn until_unavailable(sender: &Sender, key: &str) -> tonic::Status {
    for n in 0..50 {
        let request = message("shop@frozen.example", "x@example.com", &format!("f{n}"));
        match sender.clone().send(authorized(key, request)).await {
            Err(status) if status.code() == Code::Unavailable => return status,
            Err(status) => panic!("{status:?}"),
            Ok(_) => tokio::time::sleep(Duration::from_millis(20)).await,
        }
    }
    panic!("the frozen tenant's sends were never held");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_router_behind_a_move_is_told_moved_waits_for_the_new_placement_and_retries_once() {
    use cellmail_registry::Registry;
    use cellmail_registry::schema::{self, Keys, PlacementRecord};
    use cellmail_tests::processes::{Daemon, free_addr, registry_args};
    use cellmail_tests::services::{etcd_endpoint, unique_prefix};
    let d = deployed::Deployment::start("moved", &[], &[]).await;
    let mut control = d.control.clone();
    let key = tenant(&mut control, "late", "cell-a").await;
    let etcd = cellmail_registry::etcd::EtcdRegistry::connect(&[etcd_endpoint()])
        .await
        .unwrap();
    // A second router reads a copy of the registry that the test updates by hand, so that
    // it falls behind the cells' view exactly when the test says.
    let lagging = unique_prefix("moved-view");
    for kv in etcd.list(&d.prefix).await.unwrap().entries {
        let copied = kv.key.replacen(&d.prefix, &lagging, 1);
        etcd.put(&copied, kv.value, None).await.unwrap();
    }
    let addr = free_addr().unwrap();
    let mut args = vec!["--router-addr", &addr, "--freeze-hold-ms", "1000"];
    let registry = registry_args(&etcd_endpoint(), &lagging);
    args.extend(registry.iter().map(String::as_str));
    let _router = Daemon::start("cellmail-router", &args, Some(&addr))
        .await
        .unwrap();
    let behind = Sender::connect(format!("http://{addr}")).await.unwrap();
    let send = |n: &str| {
        let (mut sender, request) = (
            behind.clone(),
            authorized(&key, message("shop@late.example", "x@example.com", n)),
        );
        async move {
            let started = std::time::Instant::now();
            (sender.send(request).await, started.elapsed())
        }
    };
    let (first, _) = send("m0").await;
    first.unwrap();

    let tenant = cellmail_proto::TenantId::new("late").unwrap();
    let placement_key = |prefix: &str| Keys::new(prefix).placement(&tenant);
    let placed: PlacementRecord = schema::decode(
        &etcd
            .get(&placement_key(&d.prefix))
            .await
            .unwrap()
            .unwrap()
            .value,
    )
    .unwrap();
    let at_epoch = |epoch: u64| {
        schema::encode(&PlacementRecord {
            epoch: cellmail_proto::Epoch(epoch),
            ..placed.clone()
        })
    };
    let (two, three) = (placed.epoch.0 + 1, placed.epoch.0 + 2);
    // The cells (and the up-to-date router) see epoch two; the lagging router still one.
    etcd.put(&placement_key(&d.prefix), at_epoch(two), None)
        .await
        .unwrap();
    d.send(&key, message("shop@late.example", "x@example.com", "seen"))
        .await;
    let retried = tokio::spawn(send("m1"));
    tokio::time::sleep(Duration::from_millis(300)).await;
    etcd.put(&placement_key(&lagging), at_epoch(two), None)
        .await
        .unwrap();
    let (sent, took) = retried.await.unwrap();
    let sent = sent.unwrap().into_inner();
    assert_eq!(
        sent.recipients[0].state,
        v1::RecipientState::Accepted as i32
    );
    assert!(
        took >= Duration::from_millis(300),
        "answered after the router saw the newer placement: {took:?}"
    );

    // Still behind after its hold: one retry, then UNAVAILABLE, and that send is not queued.
    etcd.put(&placement_key(&d.prefix), at_epoch(three), None)
        .await
        .unwrap();
    d.send(
        &key,
        message("shop@late.example", "x@example.com", "seen-3"),
    )
    .await;
    let (refused, took) = send("m2").await;
    let refused = refused.unwrap_err();
    assert_eq!(refused.code(), Code::Unavailable, "{refused:?}");
    assert!(refused.message().contains("moving"), "{refused:?}");
    assert!(
        took >= Duration::from_secs(1),
        "held for its hold: {took:?}"
    );
    let sent = wait_for(DELIVERY, "m0 and m1 delivered", || {
        let sent = d.sent_keys("late");
        (sent.get("m1") == Some(&1)).then_some(sent)
    })
    .await
    .unwrap();
    assert_eq!(sent.get("m0"), Some(&1));
    assert_eq!(sent.get("m2"), None, "{sent:?}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_move_to_a_target_that_cannot_be_prepared_is_rolled_back_and_the_tenant_keeps_serving() {
    let mut d = deployed::Deployment::start("rollback", &[], &[]).await;
    let mut control = d.control.clone();
    let key = tenant(&mut control, "stays", "cell-a").await;
    d.send(
        &key,
        message("shop@stays.example", "x@example.com", "before"),
    )
    .await;
    // Killed, cell-b is still registered alive until its lease runs out, so the move is
    // taken; preparing it then fails every time.
    d.cells[1].kill();
    control
        .move_tenant(v1::MoveTenantRequest {
            tenant_id: "stays".into(),
            to_cell: "cell-b".into(),
            reason: "test".into(),
        })
        .await
        .unwrap();
    let done = finished_move(&control, "stays").await;
    assert_eq!(done.state, "ROLLED_BACK", "{done:?}");
    assert!(
        done.detail.contains("preparing cell cell-b failed"),
        "{done:?}"
    );

    // The placement never changed: cell-a at its first epoch, serving, and sends go through.
    let tenants = control
        .list_tenants(v1::ListTenantsRequest {})
        .await
        .unwrap()
        .into_inner()
        .tenants;
    let stays = tenants.iter().find(|t| t.id == "stays").unwrap();
    assert_eq!((stays.cell.as_str(), stays.epoch), ("cell-a", 1));
    let after = d
        .send(
            &key,
            message("shop@stays.example", "x@example.com", "after"),
        )
        .await;
    assert_eq!(
        after.recipients[0].state,
        v1::RecipientState::Accepted as i32
    );
    let actions: Vec<String> = control
        .list_audit(v1::ListAuditRequest {
            tenant_id: "stays".into(),
            limit: 0,
        })
        .await
        .unwrap()
        .into_inner()
        .entries
        .into_iter()
        .map(|e| e.action)
        .collect();
    assert!(
        actions.iter().any(|a| a == "tenant.move.rollback")
            && !actions.iter().any(|a| a == "tenant.move.freeze"),
        "{actions:?}"
    );
    let sent = wait_for(DELIVERY, "both sends delivered", || {
        let sent = d.sent_keys("stays");
        (sent.len() == 2).then_some(sent)
    })
    .await
    .unwrap();
    assert_eq!(
        sent,
        HashMap::from([("before".into(), 1), ("after".into(), 1)])
    );
}
