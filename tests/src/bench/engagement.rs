//! Engagement:
//!
//! - a tenant's webhook latency (from its send's call to its `accepted` event reaching the
//!   tenant's receiver) at a steady rate, alone, and while another tenant of the same cell
//!   sends as much with its endpoint hung (it never answers: its deliveries use up their
//!   cap and its outbox grows); the two conditions take turns, several rounds;
//! - the router's tracking host: signed click links followed by concurrent clients, one
//!   connection per click as a mail reader opens one, for the stage's duration: redirects
//!   per second, and their p99.
//!
//! The cell runs on CPU 1, the router and the load on CPU 0, as in [`super::neighbours`].

use std::collections::HashMap;
use std::time::{Duration, Instant};

use cellmail_proto::v1::{self, sender_client::SenderClient};
use cellmail_registry::schema;
use cellmail_registry::tracking::{Action, Link, TrackingKeys};
use tonic::transport::Channel;

use super::send_path::{
    CELL, Door, Priority, Stage, UNLIMITED, bind, next_key, runtime_on, seed, start_cell,
    start_router,
};
use super::{Row, percentile};
use crate::receiver::{Answer, Receiver};

const CALM: &str = "calm";
const HUNG: &str = "hung";
/// Each tenant's steady rate.
const RATE: f64 = 100.0;
const ROUNDS: u32 = 4;
const PHASE: Duration = Duration::from_secs(3);
/// Clients following links at once.
const CLICKERS: usize = 16;

/// Makes `key`'s tenant an endpoint at `url` wanting `types`.
async fn endpoint(
    client: &SenderClient<Channel>,
    key: &str,
    url: String,
    types: &[&str],
) -> anyhow::Result<()> {
    let create = v1::CreateWebhookRequest {
        url,
        types: types.iter().map(|t| t.to_string()).collect(),
        timeout_ms: 30_000,
        max_in_flight: 4,
    };
    client
        .clone()
        .create_webhook(crate::authorized(key, create))
        .await?;
    Ok(())
}

/// Sends at [`RATE`] for `phase`: each accepted message's id and when its call started.
async fn steady(door: &Door, phase: Duration) -> Vec<(String, Instant)> {
    let mut tick = tokio::time::interval(Duration::from_secs_f64(1.0 / RATE));
    let started = Instant::now();
    let mut tasks = Vec::new();
    while started.elapsed() < phase {
        tick.tick().await;
        let door = door.clone();
        tasks.push(tokio::spawn(async move {
            let at = Instant::now();
            door.send(next_key()).await.map(|id| (id, at))
        }));
    }
    let mut sent = Vec::with_capacity(tasks.len());
    for task in tasks {
        if let Ok(Ok(one)) = task.await {
            sent.push(one);
        }
    }
    sent
}

/// Milliseconds from each of `sent`'s calls to its event at `path`, once all arrived (at
/// most 30 s).
async fn latencies(
    receiver: &Receiver,
    path: &str,
    sent: &[(String, Instant)],
) -> anyhow::Result<Vec<f64>> {
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        let got: HashMap<String, Instant> = (receiver.got(path).into_iter())
            .map(|d| {
                (
                    d.json()["data"]["message_id"]
                        .as_str()
                        .unwrap_or("")
                        .to_owned(),
                    d.at,
                )
            })
            .collect();
        if sent.iter().all(|(id, _)| got.contains_key(id)) {
            return Ok(sent
                .iter()
                .map(|(id, at)| (got[id] - *at).as_secs_f64() * 1e3)
                .collect());
        }
        anyhow::ensure!(Instant::now() < deadline, "webhooks missing after 30 s");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

/// Follows `path` on `authority` from [`CLICKERS`] clients for `duration`: redirects per
/// second and their latencies (ms).
async fn clicks(
    authority: &str,
    path: &str,
    duration: Duration,
) -> anyhow::Result<(f64, Vec<f64>)> {
    let started = Instant::now();
    let mut clients = Vec::new();
    for _ in 0..CLICKERS {
        let (authority, path) = (authority.to_owned(), path.to_owned());
        clients.push(tokio::spawn(async move {
            let mut took = Vec::new();
            while started.elapsed() < duration {
                let at = Instant::now();
                let (head, _) = crate::http(&authority, "GET", &path).await?;
                anyhow::ensure!(head.starts_with("HTTP/1.1 302"), "{head}");
                took.push(at.elapsed().as_secs_f64() * 1e3);
            }
            Ok(took)
        }));
    }
    let mut all = Vec::new();
    for client in clients {
        all.extend(client.await??);
    }
    Ok((all.len() as f64 / started.elapsed().as_secs_f64(), all))
}

pub fn run(quick: bool) -> anyhow::Result<Vec<Row>> {
    let (cell_rt, router_rt, load_rt) = (
        runtime_on("bench-cell", Some(1), Priority::Normal)?,
        runtime_on("bench-router", Some(0), Priority::Normal)?,
        runtime_on("bench-load", Some(0), Priority::Normal)?,
    );
    let mut stage = Stage::new(quick, &cell_rt)?;
    stage.webhooks = stage.webhooks.with_loopback();
    let (tracking, tracking_addr) = router_rt.block_on(bind())?;
    stage.engagement.base_url = Some(format!("http://{tracking_addr}"));
    let Stage {
        keys,
        shutdown,
        registry,
        ..
    } = &stage;
    let (calm_key, hung_key) = cell_rt.block_on(async {
        let tracking = TrackingKeys::default().rotated(cellmail_proto::now_ms());
        registry
            .put(&keys.tracking_keys(), schema::encode(&tracking), None)
            .await?;
        let calm = seed(registry.as_ref(), keys, CALM, UNLIMITED, CELL).await?;
        let hung = seed(registry.as_ref(), keys, HUNG, UNLIMITED, CELL).await?;
        anyhow::Ok((calm, hung))
    })?;
    let (_, cell) = start_cell(&cell_rt, &stage, CELL, cellmail_cell::DEFAULT_WORKERS)?;
    let router_addr = start_router(&router_rt, registry, keys, shutdown, Some(tracking))?;
    let (rounds, phase) = if quick {
        (1, Duration::from_secs(1))
    } else {
        (ROUNDS, PHASE)
    };

    let rows = load_rt.block_on(async {
        let client = SenderClient::connect(format!("http://{router_addr}")).await?;
        crate::until_router_serves(&client, &calm_key).await;
        crate::until_router_serves(&client, &hung_key).await;
        let receiver = Receiver::start().await?;
        endpoint(&client, &calm_key, receiver.url("/calm"), &["accepted"]).await?;
        endpoint(&client, &hung_key, receiver.url("/hung"), &[]).await?;
        receiver.answer("/hung", Answer::Hang);
        let door = |key: &str| Door::Sender {
            client: client.clone(),
            key: Some(key.to_owned()),
        };
        let (calm, hung) = (door(&calm_key), door(&hung_key));
        let (mut alone, mut beside_hung) = (Vec::new(), Vec::new());
        for _ in 0..rounds {
            let sent = steady(&calm, phase).await;
            alone.extend(latencies(&receiver, "/calm", &sent).await?);
            let (sent, _) = tokio::join!(steady(&calm, phase), steady(&hung, phase));
            beside_hung.extend(latencies(&receiver, "/calm", &sent).await?);
        }
        let (p99_alone, p99_hung) = (
            percentile(&mut alone, 99.0),
            percentile(&mut beside_hung, 99.0),
        );
        let ratio = p99_hung / p99_alone.max(0.001);
        let mut rows = vec![Row::measured(
            "webhooks: B's p99 send-to-webhook with A's endpoint hung / alone",
            ratio,
            "x",
            "<= 1.5",
            ratio <= 1.5,
            format!(
                "{p99_hung:.1} vs {p99_alone:.1} ms; {} and {} events",
                beside_hung.len(),
                alone.len()
            ),
        )];

        // Clicks on one of B's messages' links.
        let link = Link {
            tenant: cellmail_proto::TenantId::new(CALM)?,
            message_id: cellmail_proto::MessageId::generate().to_string(),
            recipient: "jo@example.com".into(),
            action: Action::Click("https://shop.example/".into()),
        };
        let tracking_keys = schema::decode::<TrackingKeys>(
            &registry
                .get(&keys.tracking_keys())
                .await?
                .ok_or_else(|| anyhow::anyhow!("no tracking keys"))?
                .value,
        )?;
        let token = tracking_keys
            .sign(&link)
            .ok_or_else(|| anyhow::anyhow!("no key signs"))?;
        let (per_second, mut took) = clicks(
            &tracking_addr.to_string(),
            &format!("/c/{token}"),
            stage.duration,
        )
        .await?;
        let p99 = percentile(&mut took, 99.0);
        rows.push(Row::measured(
            "tracking: redirects per second at the router",
            per_second,
            "/s",
            "measured",
            true,
            format!(
                "{CLICKERS} clients, a connection per click; {} redirects",
                took.len()
            ),
        ));
        rows.push(Row::measured(
            "tracking: p99 redirect latency at the router",
            p99,
            "ms",
            "measured",
            true,
            format!("{CLICKERS} clients at once"),
        ));
        anyhow::Ok(rows)
    });
    stage.shutdown.cancel();
    cell_rt.block_on(cell)??;
    rows
}
