//! Noisy neighbour: tenant B's accept-to-sent latency (from the send call to the SENT event
//! its cell records once the file sink wrote the message) at a steady rate, alone and then
//! while tenant A floods the router at 10 and at 50 times A's rate, from its own connection
//! and load generator. One embedded cell with delivery workers serves both tenants; the
//! router's per-tenant admission refuses A's excess.

use std::time::{Duration, SystemTime};

use cellmail_control::schema::Policy;
use cellmail_proto::v1::sender_client::SenderClient;
use tonic::transport::Channel;

use super::send_path::{
    CELL, Door, Stage, UNLIMITED, next_key, runtime, seed, start_cell, start_router,
};
use super::{Row, percentile};

const CALM: &str = "calm";
const NOISY: &str = "noisy";
/// The noisy tenant's rate: its flood offers many times this.
const NOISY_RATE: u32 = 200;
/// B's own steady rate.
const CALM_RATE: f64 = 100.0;
/// The floods measured, as multiples of the noisy tenant's rate, with their rows' names.
const FLOODS: [(u32, &str); 2] = [
    (
        10,
        "noisy neighbour: B's p99 accept-to-sent with A flooding 10x / B alone",
    ),
    (
        50,
        "noisy neighbour: B's p99 accept-to-sent with A flooding 50x / B alone",
    ),
];
const WORKERS: usize = 4;

/// Sends at `rate` for `duration`: when each accepted send started and its message id, and
/// how many were refused.
async fn steady(door: &Door, rate: f64, duration: Duration) -> (Vec<(SystemTime, String)>, usize) {
    let mut tick = tokio::time::interval(Duration::from_secs_f64(1.0 / rate));
    let started = std::time::Instant::now();
    let mut tasks = Vec::new();
    while started.elapsed() < duration {
        tick.tick().await;
        let door = door.clone();
        tasks.push(tokio::spawn(async move {
            let at = SystemTime::now();
            door.send(next_key()).await.map(|id| (at, id))
        }));
    }
    let (total, mut sent) = (tasks.len(), Vec::with_capacity(tasks.len()));
    for task in tasks {
        if let Ok(Ok(one)) = task.await {
            sent.push(one);
        }
    }
    let refused = total - sent.len();
    (sent, refused)
}

/// Accept-to-sent latencies in ms (to the SENT event the cell records, whose time is in whole
/// milliseconds), once every message is sent (at most 30 s).
async fn delivered(
    client: &SenderClient<Channel>,
    key: &str,
    sent: &[(SystemTime, String)],
) -> anyhow::Result<Vec<f64>> {
    let deadline = std::time::Instant::now() + Duration::from_secs(30);
    let mut latencies = Vec::with_capacity(sent.len());
    for (at, id) in sent {
        let sent_at_ms = loop {
            let status = crate::get_message(client, key, id).await?;
            if let Some(event) = status.events.iter().find(|e| e.r#type == "SENT") {
                break event.at_ms;
            }
            anyhow::ensure!(
                std::time::Instant::now() < deadline,
                "message {id} of {CALM} was not sent within 30 s"
            );
            tokio::time::sleep(Duration::from_millis(20)).await;
        };
        let started_ms = at.duration_since(SystemTime::UNIX_EPOCH)?.as_secs_f64() * 1e3;
        latencies.push((sent_at_ms as f64 - started_ms).max(0.0));
    }
    Ok(latencies)
}

pub fn run(quick: bool) -> anyhow::Result<Vec<Row>> {
    let (cell_rt, router_rt, load_rt, flood_rt) = (
        runtime("bench-cell")?,
        runtime("bench-router")?,
        runtime("bench-load")?,
        runtime("bench-flood")?,
    );
    let Stage {
        duration,
        dir,
        keys,
        shutdown,
        registry,
    } = Stage::new(quick, &cell_rt)?;
    let noisy_policy = Policy {
        rate_per_second: NOISY_RATE,
        burst: NOISY_RATE,
        ..UNLIMITED
    };
    let (calm_key, noisy_key) = cell_rt.block_on(async {
        let calm = seed(registry.as_ref(), &keys, CALM, UNLIMITED, CELL).await?;
        let noisy = seed(registry.as_ref(), &keys, NOISY, noisy_policy, CELL).await?;
        anyhow::Ok((calm, noisy))
    })?;
    let (_, cell) = start_cell(
        &cell_rt,
        &registry,
        &keys,
        (dir.path(), CELL),
        WORKERS,
        &shutdown,
    )?;
    let router_addr = start_router(&router_rt, &registry, &keys, &shutdown)?;

    let rows = load_rt.block_on(async {
        let client = SenderClient::connect(format!("http://{router_addr}")).await?;
        let calm = Door::Sender {
            client: client.clone(),
            key: Some(calm_key.clone()),
        };
        // Another client of the platform: its own connection, driven from its own runtime.
        let noisy = {
            let _flood_runtime = flood_rt.enter();
            let channel = Channel::from_shared(format!("http://{router_addr}"))?.connect_lazy();
            Door::Sender {
                client: SenderClient::new(channel),
                key: Some(noisy_key),
            }
        };
        calm.send(next_key()).await?;
        noisy.send(next_key()).await?;

        let (alone, _) = steady(&calm, CALM_RATE, duration).await;
        let mut alone = delivered(&client, &calm_key, &alone).await?;
        let p99_alone = percentile(&mut alone, 99.0);
        let mut rows = Vec::new();
        for (times, figure) in FLOODS {
            let flood = {
                let noisy = noisy.clone();
                let rate = f64::from(NOISY_RATE * times);
                flood_rt.spawn(async move { steady(&noisy, rate, duration).await })
            };
            let (crowded, calm_refused) = steady(&calm, CALM_RATE, duration).await;
            let (admitted, refused) = flood.await?;
            anyhow::ensure!(calm_refused == 0, "{calm_refused} of B's sends failed");
            let mut crowded = delivered(&client, &calm_key, &crowded).await?;
            let p99_crowded = percentile(&mut crowded, 99.0);
            let ratio = p99_crowded / p99_alone;
            let seconds = duration.as_secs_f64();
            let offered = (admitted.len() + refused) as f64 / seconds;
            let admitted = admitted.len() as f64 / seconds;
            rows.push(Row::measured(
                figure,
                ratio,
                "ratio",
                "<= 1.5",
                ratio <= 1.5,
                format!(
                    "p99 {p99_crowded:.2} ms vs {p99_alone:.2} ms; B at {CALM_RATE:.0}/s, A offered {offered:.0}/s ({times}x its {NOISY_RATE}/s; {admitted:.0}/s admitted)"
                ),
            ));
        }
        anyhow::Ok(rows)
    })?;
    shutdown.cancel();
    cell_rt.block_on(cell)??;
    Ok(rows)
}
