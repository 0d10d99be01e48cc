//! Rollouts on the platform as deploy/local runs it (separate processes, cells restarted on
//! another release by deploy/local/deploy-cell.sh): a good release goes out wave by wave; a
//! release that fails half its sends stops at the canary, which is rolled back, and no
//! message is lost; a standby control plane carries a rollout on from the wave its killed
//! leader left.

use std::collections::HashMap;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Duration;

use cellmail_proto::v1;
use cellmail_tests::local::LocalCluster;
use cellmail_tests::services::{etcd_endpoint, unique_prefix};
use cellmail_tests::{
    Control, cells_until, keys_in, message, send_retrying, until_ok, until_router_serves, wait_for,
};
use tonic::transport::Channel;

type Sender = v1::sender_client::SenderClient<Channel>;

const CELLS: [&str; 3] = ["cell-1", "cell-2", "cell-3"];

/// A local platform of three cells on release `v1`, one tenant pinned to each (`t-cell-n`).
struct Drill {
    cluster: LocalCluster,
    control: Control,
    sender: Sender,
    /// (tenant, API key, cell).
    tenants: Vec<(String, String, &'static str)>,
}

impl Drill {
    async fn start(test: &str) -> Self {
        let cluster = LocalCluster::start(&etcd_endpoint(), &unique_prefix(test), 3, "v1").unwrap();
        let mut control = cluster.control(0).await.unwrap();
        wait_for_cells(&control, "v1").await;
        let mut tenants = Vec::new();
        for cell in CELLS {
            let id = format!("t-{cell}");
            let request = v1::CreateTenantRequest {
                id: id.clone(),
                domains: vec![format!("{id}.example")],
                policy: Some(v1::TenantPolicy {
                    rate_per_second: 10_000,
                    ..Default::default()
                }),
                cell: cell.to_owned(),
                ..Default::default()
            };
            let created = control.create_tenant(request).await.unwrap().into_inner();
            tenants.push((id, created.api_key, cell));
        }
        let router = cluster.router().unwrap();
        let sender = until_ok(Duration::from_secs(10), || Sender::connect(router.clone()))
            .await
            .unwrap();
        // The router learns of the new tenants by its watch: the traffic's first send must
        // not race it.
        for (_, key, _) in &tenants {
            until_router_serves(&sender, key).await;
        }
        Self {
            cluster,
            control,
            sender,
            tenants,
        }
    }

    /// Starts `request`'s rollout while every tenant sends; returns it with the traffic's
    /// stop switch and its task (which returns what it sent).
    async fn start_under_traffic(
        &mut self,
        request: v1::StartRolloutRequest,
    ) -> (v1::RolloutInfo, Traffic) {
        let stop = Arc::new(AtomicBool::new(false));
        let sending = self.traffic(stop.clone());
        let started = self.control.start_rollout(request).await.unwrap();
        (started.into_inner(), Traffic { stop, sending })
    }

    /// Sends for every tenant, one message each 20 ms, until `stop`; each send is retried
    /// with its idempotency key while a cell restarts. Returns each tenant's keys.
    fn traffic(&self, stop: Arc<AtomicBool>) -> tokio::task::JoinHandle<HashMap<String, usize>> {
        let (sender, tenants) = (self.sender.clone(), self.tenants.clone());
        tokio::spawn(async move {
            let mut sent = HashMap::new();
            let mut n = 0;
            while !stop.load(Ordering::Relaxed) {
                for (tenant, key, _) in &tenants {
                    let from = format!("shop@{tenant}.example");
                    let request = message(&from, "someone@example.com", &format!("k{n}"));
                    send_retrying(&sender, key, request).await;
                    *sent.entry(tenant.clone()).or_default() += 1;
                }
                n += 1;
                tokio::time::sleep(Duration::from_millis(20)).await;
            }
            sent
        })
    }

    /// Waits until each tenant's `sent` keys are all in its cell's file sink; asserts each
    /// was sent once.
    async fn all_delivered_once(&self, sent: &HashMap<String, usize>) {
        for (tenant, _, cell) in &self.tenants {
            let dir = self.cluster.mail_dir(cell, tenant);
            let want = sent[tenant];
            let keys = wait_for(
                Duration::from_secs(90),
                "every accepted key delivered",
                || {
                    let keys = keys_in(&dir);
                    (keys.len() >= want).then_some(keys)
                },
            )
            .await
            .unwrap();
            assert_eq!(keys.len(), want, "{tenant}: keys delivered");
            assert!(
                keys.values().all(|n| *n == 1),
                "{tenant}: sent twice: {keys:?}"
            );
        }
    }
}

struct Traffic {
    stop: Arc<AtomicBool>,
    sending: tokio::task::JoinHandle<HashMap<String, usize>>,
}

impl Traffic {
    /// Stops sending; what each tenant sent.
    async fn stop(self) -> HashMap<String, usize> {
        self.stop.store(true, Ordering::Relaxed);
        self.sending.await.unwrap()
    }
}

/// Waits until all three cells are up on `release`.
async fn wait_for_cells(control: &Control, release: &str) {
    let cells = cells_until(control, |c| c.alive && c.version == release, CELLS.len()).await;
    assert!(cells.iter().all(|c| !c.build.is_empty()), "{cells:?}");
}

fn start(version: &str, canary: &str, waves: &str, bake_secs: u64) -> v1::StartRolloutRequest {
    v1::StartRolloutRequest {
        version: version.to_owned(),
        canary: canary.to_owned(),
        waves: waves.to_owned(),
        bake_secs,
        gate: Some(v1::GateThresholds {
            min_attempts: Some(10),
            // Debug builds on two shared cores: a restarted cell's first accepts are slow.
            p99_slack_ms: Some(2000),
            ..Default::default()
        }),
        ready_timeout_secs: 60,
        reason: "drill".to_owned(),
    }
}

/// Polls the rollout until it has ended (or `until` says it is far enough).
async fn rollout_until(
    control: &Control,
    id: &str,
    until: impl Fn(&v1::RolloutInfo) -> bool,
) -> v1::RolloutInfo {
    let deadline = tokio::time::Instant::now() + Duration::from_secs(120);
    loop {
        let request = v1::GetRolloutRequest { id: id.to_owned() };
        let rollout = control
            .clone()
            .get_rollout(request)
            .await
            .map(|r| r.into_inner());
        if let Ok(rollout) = &rollout
            && until(rollout)
        {
            return rollout.clone();
        }
        assert!(
            tokio::time::Instant::now() < deadline,
            "the rollout did not get there: {rollout:?}"
        );
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
}

/// The rollout entries of the audit trail: (action, reason).
async fn rollout_audit(control: &Control) -> Vec<(String, String)> {
    let audit = control
        .clone()
        .list_audit(v1::ListAuditRequest::default())
        .await;
    audit
        .unwrap()
        .into_inner()
        .entries
        .into_iter()
        .filter(|e| e.action.starts_with("rollout."))
        .map(|e| (e.action, e.reason))
        .collect()
}

fn ended(rollout: &v1::RolloutInfo) -> bool {
    matches!(
        rollout.state.as_str(),
        "COMPLETED" | "ROLLED_BACK" | "ABORTED"
    )
}

/// The deploys after the cluster's start (each cell's first deploy of `v1`).
fn rollout_deploys(cluster: &LocalCluster) -> Vec<(String, String)> {
    cluster.deploys().unwrap().split_off(CELLS.len())
}

fn pairs(deploys: &[(&str, &str)]) -> Vec<(String, String)> {
    deploys
        .iter()
        .map(|(c, v)| (c.to_string(), v.to_string()))
        .collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_good_release_goes_out_wave_by_wave_with_every_message_sent_once() {
    let mut drill = Drill::start("rollout-good").await;
    drill.cluster.release("v2", &[]).unwrap();
    let (started, traffic) = drill
        .start_under_traffic(start("v2", "", "1,2,100%", 3))
        .await;
    assert_eq!(started.waves.len(), 3);
    let done = rollout_until(&drill.control, &started.id, ended).await;
    let sent = traffic.stop().await;

    assert_eq!(done.state, "COMPLETED", "{done:#?}");
    for wave in &done.waves {
        assert_eq!(wave.state, "PASSED", "{wave:?}");
        let error_rate = wave.checks.iter().find(|c| c.name == "send error rate");
        let error_rate = error_rate.expect("the gate checked the send error rate");
        assert!(
            error_rate.passed && error_rate.note.is_empty(),
            "{error_rate:?}"
        );
    }
    assert_eq!(done.waves[0].baseline, vec!["cell-2", "cell-3"]);
    assert_eq!(
        done.waves[2].baseline,
        vec!["self"],
        "no cell left unrolled"
    );
    assert_eq!(
        rollout_deploys(&drill.cluster),
        pairs(&[("cell-1", "v2"), ("cell-2", "v2"), ("cell-3", "v2")]),
        "one cell at a time, in wave order"
    );
    wait_for_cells(&drill.control, "v2").await;
    drill.all_delivered_once(&sent).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_release_failing_its_sends_stops_at_the_canary_which_is_rolled_back_losing_nothing() {
    let mut drill = Drill::start("rollout-bad").await;
    drill
        .cluster
        .release("v2-bad", &["--fault-send-failure-ratio", "0.5"])
        .unwrap();
    let (started, traffic) = drill
        .start_under_traffic(start("v2-bad", "cell-2", "1,100%", 4))
        .await;
    assert_eq!(started.waves[0].cells, vec!["cell-2"]);
    let done = rollout_until(&drill.control, &started.id, ended).await;
    // Sends go on a while after the rollback: the canary serves on the previous release.
    tokio::time::sleep(Duration::from_secs(2)).await;
    let sent = traffic.stop().await;

    assert_eq!(done.state, "ROLLED_BACK", "{done:#?}");
    let canary = &done.waves[0];
    assert_eq!(canary.state, "ROLLED_BACK");
    let failed: Vec<_> = canary.checks.iter().filter(|c| !c.passed).collect();
    assert_eq!(failed.len(), 1, "{:?}", canary.checks);
    assert_eq!(failed[0].name, "send error rate");
    assert!(failed[0].wave > 0.2, "{:?}", failed[0]);
    assert!(done.detail.contains("send error rate"), "{}", done.detail);
    assert_eq!(canary.previous["cell-2"], "v1");
    assert_eq!(done.waves[1].state, "PENDING");
    assert_eq!(
        rollout_deploys(&drill.cluster),
        pairs(&[("cell-2", "v2-bad"), ("cell-2", "v1")]),
        "only the canary ran the bad release, and it was rolled back"
    );
    wait_for_cells(&drill.control, "v1").await;
    // The sends the bad release failed were retried, not dropped.
    drill.all_delivered_once(&sent).await;
    let actions: Vec<_> = rollout_audit(&drill.control).await;
    let actions: Vec<_> = actions.iter().map(|(a, _)| a.as_str()).collect();
    assert_eq!(
        actions,
        ["rollout.start", "rollout.wave.fail", "rollout.finish"]
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_standby_carries_the_rollout_on_from_the_wave_its_leader_left() {
    use cellmail_registry::Registry;
    let mut drill = Drill::start("rollout-failover").await;
    drill.cluster.release("v2", &[]).unwrap();
    let started = drill
        .control
        .start_rollout(start("v2", "", "1,100%", 6))
        .await
        .unwrap()
        .into_inner();
    let baking = rollout_until(&drill.control, &started.id, |r| {
        r.waves[0].state == "BAKING" || ended(r)
    })
    .await;
    assert_eq!(baking.waves[0].state, "BAKING", "{baking:#?}");

    // Kill whichever control plane leads; the other one must finish the rollout.
    let etcd = cellmail_registry::etcd::EtcdRegistry::connect(&[etcd_endpoint()])
        .await
        .unwrap();
    let election = drill.cluster.keys().election();
    let leader = etcd.leader(&election).await.unwrap().unwrap_or_default();
    let leader = String::from_utf8(leader).unwrap();
    let leading = (0..2)
        .find(|n| leader.starts_with(&drill.cluster.control_addr(*n).unwrap()))
        .expect("a control plane leads");
    drill.cluster.kill_control(leading).unwrap();
    let standby = drill.cluster.control(1 - leading).await.unwrap();

    let done = rollout_until(&standby, &started.id, ended).await;
    assert_eq!(done.state, "COMPLETED", "{done:#?}");
    assert!(done.waves.iter().all(|w| w.state == "PASSED"), "{done:#?}");
    let now_leading = etcd.leader(&election).await.unwrap().unwrap_or_default();
    assert!(
        String::from_utf8(now_leading)
            .unwrap()
            .starts_with(&drill.cluster.control_addr(1 - leading).unwrap()),
        "the standby leads now"
    );
    let mut deploys = rollout_deploys(&drill.cluster);
    assert_eq!(
        deploys.remove(0),
        ("cell-1".to_owned(), "v2".to_owned()),
        "the canary, deployed once: the standby went on from its bake"
    );
    deploys.sort();
    assert_eq!(deploys, pairs(&[("cell-2", "v2"), ("cell-3", "v2")]));
    wait_for_cells(&standby, "v2").await;
}

fn field(status: &tonic::Status) -> String {
    use tonic_types::StatusExt;
    assert_eq!(status.code(), tonic::Code::InvalidArgument, "{status:?}");
    status.get_details_bad_request().unwrap().field_violations[0]
        .field
        .clone()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn operators_pause_resume_and_abort_and_bad_requests_name_their_field() {
    let mut drill = Drill::start("rollout-operate").await;
    drill.cluster.release("v2", &[]).unwrap();
    let c = &mut drill.control;
    for (request, want) in [
        (start("", "", "1,100%", 1), "version"),
        (start("v2 beta", "", "1,100%", 1), "version"),
        (start("v2", "", "1,50%", 1), "waves"),
        (start("v2", "cell-9", "1,100%", 1), "canary"),
        (
            v1::StartRolloutRequest {
                gate: Some(v1::GateThresholds {
                    max_complaint_rate_delta: Some(-1.0),
                    ..Default::default()
                }),
                ..start("v2", "", "1,100%", 1)
            },
            "gate.max_complaint_rate_delta",
        ),
    ] {
        let refused = c.start_rollout(request).await.unwrap_err();
        assert_eq!(field(&refused), want);
    }
    let none = c.get_rollout(v1::GetRolloutRequest::default()).await;
    assert_eq!(
        none.unwrap_err().code(),
        tonic::Code::NotFound,
        "nothing was started"
    );

    // Through the CLI, as an operator would: a long bake, paused and resumed, then aborted.
    let started = drill
        .cluster
        .cli(&[
            "rollout",
            "start",
            "--version",
            "v2",
            "--waves",
            "1,100%",
            "--bake",
            "10m",
        ])
        .unwrap();
    assert_eq!(started["state"], "RUNNING");
    let id = started["id"].as_str().unwrap().to_owned();
    let again = c
        .start_rollout(start("v2", "", "1,100%", 1))
        .await
        .unwrap_err();
    assert_eq!(
        again.code(),
        tonic::Code::FailedPrecondition,
        "one rollout at a time"
    );
    rollout_until(c, &id, |r| r.waves[0].state == "BAKING").await;
    let paused = drill
        .cluster
        .cli(&["rollout", "pause", "--reason", "looking"])
        .unwrap();
    assert_eq!(paused["state"], "PAUSED");
    let resumed = drill.cluster.cli(&["rollout", "resume"]).unwrap();
    assert_eq!(resumed["state"], "RUNNING");
    assert_eq!(resumed["waves"][0]["state"], "BAKING");
    drill
        .cluster
        .cli(&["rollout", "abort", "--reason", "drill"])
        .unwrap();
    let done = rollout_until(c, &id, ended).await;
    assert_eq!(done.state, "ABORTED", "{done:#?}");
    assert_eq!(done.waves[0].state, "ROLLED_BACK");
    assert_eq!(done.waves[1].state, "PENDING");
    assert_eq!(
        rollout_deploys(&drill.cluster),
        pairs(&[("cell-1", "v2"), ("cell-1", "v1")]),
        "the aborted canary went back; nothing else was touched"
    );
    let status = drill.cluster.cli(&["rollout", "status"]).unwrap();
    assert_eq!(status["state"], "ABORTED");
    wait_for_cells(c, "v1").await;
    let actions = rollout_audit(c).await;
    let actions: Vec<_> = actions
        .iter()
        .map(|(a, r)| (a.as_str(), r.as_str()))
        .collect();
    assert_eq!(
        actions[..4],
        [
            ("rollout.start", ""),
            ("rollout.pause", "looking"),
            ("rollout.resume", ""),
            ("rollout.abort", "drill")
        ]
    );
    assert_eq!(actions[4].0, "rollout.finish");
}
