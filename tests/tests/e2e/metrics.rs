//! Prometheus metrics: the router counts each send by the tenant's cell, class, tier and
//! outcome, and times what it forwards; the control plane counts its actions and finished
//! moves; only the leading control plane reports itself leader.

use std::collections::BTreeMap;
use std::time::{Duration, Instant};

use cellmail_proto::v1;
use cellmail_tests::processes::{Daemon, free_addr, registry_args};
use cellmail_tests::services::{etcd_endpoint, unique_prefix};
use cellmail_tests::{
    Platform, authorized, control_client, http_get, message, until_ok, until_router_serves,
};
use tonic::Code;

/// One sample of a Prometheus text exposition: name, labels, value.
pub(crate) type Sample = (String, BTreeMap<String, String>, f64);

/// The samples of the text format (`name{label="value",...} value`; no escapes in values).
fn samples(text: &str) -> Vec<Sample> {
    text.lines()
        .filter(|line| !line.starts_with('#') && !line.trim().is_empty())
        .filter_map(|line| {
            let (series, value) = line.rsplit_once(' ')?;
            let (name, labels) = match series.split_once('{') {
                Some((name, labels)) => (name, labels.strip_suffix('}')?),
                None => (series, ""),
            };
            let labels = labels
                .split(',')
                .filter(|pair| !pair.is_empty())
                .filter_map(|pair| {
                    let (key, value) = pair.split_once('=')?;
                    Some((key.to_owned(), value.trim_matches('"').to_owned()))
                })
                .collect();
            Some((name.to_owned(), labels, value.parse().ok()?))
        })
        .collect()
}

/// The value of the series `name` with exactly `labels`, if it is exposed.
pub(crate) fn value(samples: &[Sample], name: &str, labels: &[(&str, &str)]) -> Option<f64> {
    let wanted: BTreeMap<String, String> = labels
        .iter()
        .map(|(k, v)| (k.to_string(), v.to_string()))
        .collect();
    samples
        .iter()
        .find(|(n, l, _)| n == name && *l == wanted)
        .map(|(_, _, v)| *v)
}

/// Every series of `name`: its labels and value.
fn series(samples: &[Sample], name: &str) -> Vec<(BTreeMap<String, String>, f64)> {
    samples
        .iter()
        .filter(|(n, _, _)| n == name)
        .map(|(_, l, v)| (l.clone(), *v))
        .collect()
}

pub(crate) async fn scrape(metrics_addr: &str) -> Vec<Sample> {
    samples(&http_get(metrics_addr, "/metrics").await.unwrap())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_router_counts_each_send_by_cell_class_tier_and_outcome_and_times_what_it_forwards() {
    let dir = tempfile::tempdir().unwrap();
    let metrics_addr = free_addr().unwrap();
    let platform = Platform::start(dir.path(), &["--metrics-addr", &metrics_addr]).unwrap();
    let mut control = platform.control().await.unwrap();
    // One send a second and no burst above it: a second send at once is over the rate.
    let request = v1::CreateTenantRequest {
        id: "metered".into(),
        domains: vec!["metered.example".into()],
        tier: "premium".into(),
        policy: Some(v1::TenantPolicy {
            rate_per_second: 1,
            burst: 1,
            ..Default::default()
        }),
        cell: "cell-1".into(),
        ..Default::default()
    };
    let key = control
        .create_tenant(request)
        .await
        .unwrap()
        .into_inner()
        .api_key;
    let sender = platform.sender().await.unwrap();
    until_router_serves(&sender, &key).await;

    let send = |key: &str| {
        let request = authorized(key, message("a@metered.example", "j@example.com", ""));
        let mut sender = sender.clone();
        async move { sender.send(request).await }
    };
    send(&key).await.unwrap();
    let over = send(&key).await.unwrap_err();
    assert_eq!(over.code(), Code::ResourceExhausted, "{over:?}");
    let unknown = send("cmk_not-a-key").await.unwrap_err();
    assert_eq!(unknown.code(), Code::Unauthenticated, "{unknown:?}");

    let scraped = scrape(&metrics_addr).await;
    let sends = |scraped: &[Sample], cell, class, tier, outcome| {
        value(
            scraped,
            "cellmail_router_sends_total",
            &[
                ("cell", cell),
                ("class", class),
                ("tier", tier),
                ("outcome", outcome),
            ],
        )
    };
    assert_eq!(
        sends(&scraped, "cell-1", "transactional", "premium", "ok"),
        Some(1.0)
    );
    assert_eq!(
        sends(
            &scraped,
            "cell-1",
            "transactional",
            "premium",
            "resource_exhausted"
        ),
        Some(1.0)
    );
    assert_eq!(
        sends(&scraped, "none", "unknown", "none", "unauthenticated"),
        Some(1.0),
        "a send with an unknown key counts, with nothing known of it"
    );
    let all_sends = series(&scraped, "cellmail_router_sends_total");
    assert_eq!(
        all_sends.len(),
        3,
        "no other send series (the stats calls are not sends): {all_sends:?}"
    );
    assert_eq!(
        value(
            &scraped,
            "cellmail_router_admission_refusals_total",
            &[("cell", "cell-1"), ("tier", "premium")]
        ),
        Some(1.0)
    );
    let timed = [("cell", "cell-1"), ("class", "transactional")];
    assert_eq!(
        value(&scraped, "cellmail_router_send_seconds_count", &timed),
        Some(1.0),
        "only the accepted send was forwarded"
    );
    assert_eq!(
        value(
            &scraped,
            "cellmail_router_send_seconds_bucket",
            &[
                ("cell", "cell-1"),
                ("class", "transactional"),
                ("le", "+Inf")
            ]
        ),
        Some(1.0),
        "the forwarded time is a histogram with buckets"
    );
    assert!(
        series(&scraped, "cellmail_router_moved_retries_total").is_empty(),
        "no move, no retry"
    );

    // The control plane counts what it was asked, and a move once it is finished; the next
    // send is counted under the tenant's new cell.
    control
        .move_tenant(v1::MoveTenantRequest {
            tenant_id: "metered".into(),
            to_cell: "cell-2".into(),
            reason: "metrics".into(),
        })
        .await
        .unwrap();
    let deadline = Instant::now() + Duration::from_secs(60);
    loop {
        let latest = control
            .get_move(v1::GetMoveRequest {
                tenant_id: "metered".into(),
            })
            .await
            .unwrap()
            .into_inner();
        if latest.state == "COMPLETE" {
            break;
        }
        assert_ne!(latest.state, "ROLLED_BACK", "{latest:?}");
        assert!(Instant::now() < deadline, "the move did not finish");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let moved = until_ok(Duration::from_secs(10), || send(&key)).await;
    moved.unwrap();
    let scraped = scrape(&metrics_addr).await;
    assert_eq!(
        value(
            &scraped,
            "cellmail_control_moves_finished_total",
            &[("step", "complete")]
        ),
        Some(1.0)
    );
    assert_eq!(
        value(
            &scraped,
            "cellmail_control_moves_finished_total",
            &[("step", "rolled_back")]
        ),
        None
    );
    let action = |action, outcome| {
        value(
            &scraped,
            "cellmail_control_actions_total",
            &[("action", action), ("outcome", outcome)],
        )
    };
    assert_eq!(action("create_tenant", "ok"), Some(1.0));
    assert_eq!(action("move_tenant", "ok"), Some(1.0));
    assert!(action("get_move", "ok").is_some_and(|n| n >= 1.0));
    assert_eq!(
        sends(&scraped, "cell-1", "transactional", "premium", "ok"),
        Some(1.0)
    );
    assert_eq!(
        sends(&scraped, "cell-2", "transactional", "premium", "ok"),
        Some(1.0),
        "the send after the move is its new cell's: {:?}",
        series(&scraped, "cellmail_router_sends_total")
    );
}

/// `cellmail_control_leader` of the control plane serving metrics at `addr`, once exposed.
async fn leader_gauge(addr: &str) -> Option<f64> {
    let text = http_get(addr, "/metrics").await.ok()?;
    value(&samples(&text), "cellmail_control_leader", &[])
}

/// Polls the two control planes' leader gauges until `wanted` holds (20 s at most).
async fn gauges_until(
    addrs: [&str; 2],
    what: &str,
    wanted: impl Fn([Option<f64>; 2]) -> bool,
) -> [Option<f64>; 2] {
    let deadline = Instant::now() + Duration::from_secs(20);
    loop {
        let gauges = [leader_gauge(addrs[0]).await, leader_gauge(addrs[1]).await];
        if wanted(gauges) {
            return gauges;
        }
        assert!(Instant::now() < deadline, "{what}: gauges {gauges:?}");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn only_the_leading_control_plane_reports_itself_leader_and_counts_refused_credentials() {
    const ADMIN_TOKEN: &str = "test-admin-token-0123456789";
    let registry = registry_args(&etcd_endpoint(), &unique_prefix("leader-metrics"));
    let addrs = [free_addr().unwrap(), free_addr().unwrap()];
    let metrics = [free_addr().unwrap(), free_addr().unwrap()];
    let mut planes = Vec::new();
    for (addr, metrics) in addrs.iter().zip(&metrics) {
        let mut args: Vec<&str> = vec![
            "--control-addr",
            addr,
            "--admin-token",
            ADMIN_TOKEN,
            "--metrics-addr",
            metrics,
        ];
        args.extend(registry.iter().map(String::as_str));
        planes.push(
            Daemon::start("cellmail-control", &args, Some(addr))
                .await
                .unwrap(),
        );
    }
    let metrics = [metrics[0].as_str(), metrics[1].as_str()];

    let gauges = gauges_until(metrics, "one leader and one standby", |g| {
        g == [Some(1.0), Some(0.0)] || g == [Some(0.0), Some(1.0)]
    })
    .await;
    let leader = usize::from(gauges[1] == Some(1.0));
    let standby = 1 - leader;

    // Every call is counted on the control plane that answered it, with its outcome; a wrong
    // credential is refused before the call is read, so its action is not known.
    let mut control = control_client(&format!("http://{}", addrs[standby]), ADMIN_TOKEN)
        .await
        .unwrap();
    control.list_cells(v1::ListCellsRequest {}).await.unwrap();
    let mut intruder = control_client(&format!("http://{}", addrs[standby]), "wrong-token")
        .await
        .unwrap();
    let refused = intruder
        .list_cells(v1::ListCellsRequest {})
        .await
        .unwrap_err();
    assert_eq!(refused.code(), Code::Unauthenticated);
    let scraped = scrape(metrics[standby]).await;
    let action = |action, outcome| {
        value(
            &scraped,
            "cellmail_control_actions_total",
            &[("action", action), ("outcome", outcome)],
        )
    };
    assert_eq!(action("list_cells", "ok"), Some(1.0));
    assert_eq!(action("unknown", "unauthenticated"), Some(1.0));
    assert_eq!(
        series(&scraped, "cellmail_control_actions_total").len(),
        2,
        "{scraped:?}"
    );

    // The leader dies: the standby takes over and says so.
    planes[leader].kill();
    gauges_until(metrics, "the standby leading", |g| g[standby] == Some(1.0)).await;
}
