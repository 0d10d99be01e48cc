//! Breakers end to end on `cellmail up`: complaints over the threshold pause one tenant's
//! marketing mail only; its queued mail is held, not dropped; the operator's resume releases
//! it, and the trip and the resume are in the audit trail.

use std::collections::{BTreeMap, HashSet};
use std::time::{Duration, Instant};

use cellmail_proto::v1::{self, sender_client::SenderClient};
use cellmail_tests::{Platform, authorized, get_message, message, wait_for};
use tonic::Code;
use tonic::transport::Channel;
use tonic_types::StatusExt;

fn marketing(from: &str, to: &str) -> v1::SendRequest {
    v1::SendRequest {
        message_class: v1::MessageClass::Marketing as i32,
        ..message(from, to, "")
    }
}

async fn state(sender: &SenderClient<Channel>, key: &str, id: &str) -> String {
    get_message(sender, key, id).await.unwrap().state
}

/// The states of `ids` once every one satisfies `done`; panics after 30 s with the count of
/// each state they were in.
async fn states_when(
    sender: &mut SenderClient<Channel>,
    key: &str,
    ids: &[String],
    done: impl Fn(&str) -> bool,
) -> Vec<String> {
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        let mut states = Vec::with_capacity(ids.len());
        for id in ids {
            states.push(state(sender, key, id).await);
        }
        if states.iter().all(|s| done(s)) {
            return states;
        }
        if Instant::now() > deadline {
            let mut counts = BTreeMap::new();
            for s in &states {
                *counts.entry(s.as_str()).or_insert(0) += 1;
            }
            panic!("after 30 s the messages are {counts:?}");
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

fn not_queued(state: &str) -> bool {
    state != "QUEUED"
}

fn mail_ids(platform: &Platform, tenant: &str) -> HashSet<String> {
    platform
        .mail_of(tenant)
        .iter()
        .filter_map(|p| p.file_stem()?.to_str().map(str::to_owned))
        .collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn complaints_pause_one_tenants_marketing_only_and_resume_releases_the_held_mail() {
    let dir = tempfile::tempdir().unwrap();
    // Queue first, deliver nothing: volume, then a complaint, then a backlog behind it.
    let platform = Platform::start(dir.path(), &["--cells", "1", "--cell-workers", "0"]).unwrap();
    let created = platform.cli(&[
        "tenant",
        "create",
        "noisy",
        "--domain",
        "noisy.example",
        "--rate",
        "100000",
        "--breaker-min-volume",
        "5",
    ]);
    let a = created["api_key"].as_str().unwrap().to_owned();
    let (_, b) = platform
        .create_tenant("calm", &["calm.example"])
        .await
        .unwrap();
    let mut sender = platform.sender().await.unwrap();
    let mut first = Vec::new();
    for n in 0..6 {
        let to = if n == 5 {
            "complaint+1@simulator.amazonses.com".to_owned()
        } else {
            format!("success+{n}@simulator.amazonses.com")
        };
        let sent = sender
            .send(authorized(&a, marketing("news@noisy.example", &to)))
            .await
            .unwrap();
        first.push(sent.into_inner().message_id);
    }
    let mut backlog = tokio::task::JoinSet::new();
    for n in 0..300 {
        let (mut sender, key) = (sender.clone(), a.clone());
        backlog.spawn(async move {
            let to = format!("reader+{n}@example.com");
            let request = authorized(&key, marketing("news@noisy.example", &to));
            sender.send(request).await.unwrap().into_inner().message_id
        });
    }
    let mut queued = backlog.join_all().await;
    platform.stop().unwrap();

    // One worker delivers in queue order: the complaint trips the breaker behind it.
    let platform = Platform::start(dir.path(), &["--cells", "1", "--cell-workers", "1"]).unwrap();
    let mut sender = platform.sender().await.unwrap();
    assert!(
        states_when(&mut sender, &a, &first, not_queued)
            .await
            .iter()
            .all(|s| s == "SENT")
    );
    wait_for(Duration::from_secs(20), "the breaker to trip", || {
        let tenants = platform.cli(&["tenant", "list"]);
        let noisy = tenants
            .as_array()?
            .iter()
            .find(|t| t["tenant"] == "noisy")?
            .clone();
        (noisy["paused"][0]["class"] == "marketing").then_some(())
    })
    .await
    .unwrap();
    let states = states_when(&mut sender, &a, &queued, not_queued).await;
    let held: Vec<&String> = queued
        .iter()
        .zip(&states)
        .filter(|(_, s)| *s == "HELD")
        .map(|(id, _)| id)
        .collect();
    assert!(!held.is_empty(), "the breaker caught none of the backlog");
    assert!(
        states.iter().all(|s| s == "HELD" || s == "SENT"),
        "{states:?}"
    );
    let delivered = mail_ids(&platform, "noisy");
    assert!(
        held.iter().all(|id| !delivered.contains(*id)),
        "held mail was sent"
    );

    // New marketing mail is refused with the rates; transactional mail and B's still flow.
    let paused = sender
        .send(authorized(
            &a,
            marketing("news@noisy.example", "x@example.com"),
        ))
        .await
        .unwrap_err();
    assert_eq!(paused.code(), Code::FailedPrecondition);
    assert!(
        paused.message().contains("complaint rate"),
        "{}",
        paused.message()
    );
    let info = paused.get_details_error_info().unwrap();
    assert_eq!(info.reason, "TENANT_PAUSED");
    assert!(info.metadata.contains_key("complaint_rate_percent"));
    let receipt = sender
        .send(authorized(
            &a,
            message("shop@noisy.example", "buyer@example.com", ""),
        ))
        .await
        .unwrap()
        .into_inner()
        .message_id;
    let calm = sender
        .send(authorized(
            &b,
            marketing("news@calm.example", "reader@example.com"),
        ))
        .await
        .unwrap()
        .into_inner()
        .message_id;
    wait_for(
        Duration::from_secs(20),
        "A's receipt and B's newsletter",
        || {
            (mail_ids(&platform, "noisy").contains(&receipt)
                && mail_ids(&platform, "calm").contains(&calm))
            .then_some(())
        },
    )
    .await
    .unwrap();

    // Resume: every held message is sent, none lost; new marketing mail is accepted again.
    let resumed = platform.cli(&[
        "tenant",
        "resume",
        "noisy",
        "--class",
        "marketing",
        "--reason",
        "list cleaned",
    ]);
    assert_eq!(resumed["resumed_classes"][0], "marketing", "{resumed}");
    states_when(&mut sender, &a, &queued, |s| s == "SENT").await;
    let delivered = mail_ids(&platform, "noisy");
    queued.extend(first);
    assert!(
        queued.iter().all(|id| delivered.contains(id)),
        "a queued message was lost"
    );
    let after = sender
        .send(authorized(
            &a,
            marketing("news@noisy.example", "y@example.com"),
        ))
        .await;
    assert!(after.is_ok(), "{after:?}");

    let audit = platform.cli(&["audit", "--tenant", "noisy"]);
    let actions: Vec<&str> = audit
        .as_array()
        .unwrap()
        .iter()
        .map(|e| e["action"].as_str().unwrap())
        .collect();
    assert!(actions.contains(&"breaker.trip marketing"), "{audit}");
    assert!(actions.contains(&"breaker.resume marketing"), "{audit}");
    let resume = audit
        .as_array()
        .unwrap()
        .iter()
        .find(|e| e["action"] == "breaker.resume marketing")
        .unwrap();
    assert_eq!(resume["reason"], "list cleaned");
    assert_eq!(resume["before"]["state"], "TRIPPED");
    assert_eq!(resume["after"]["state"], "RESUMED");
    let calm_audit = platform.cli(&["audit", "--tenant", "calm"]);
    let calm_actions: Vec<_> = calm_audit
        .as_array()
        .unwrap()
        .iter()
        .map(|e| e["action"].as_str().unwrap())
        .collect();
    assert_eq!(
        calm_actions,
        ["tenant.create"],
        "B has no trips: {calm_audit}"
    );
}
