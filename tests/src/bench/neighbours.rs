//! Noisy neighbour: tenant B's accept-to-sent latency (from the send call to the SENT event
//! its cell records once the file sink wrote the message) at a steady rate, alone and
//! while tenant A floods the router at 10 and at 50 times A's rate, from its own connection
//! and load generator; the three take turns, several rounds. One embedded cell with delivery
//! workers serves both tenants; the router's per-tenant admission refuses A's excess. As
//! deployed, the router tier and the cells run on different machines: here the cell runs on
//! CPU 1 and the router and both load generators on CPU 0, so A's flood costs the router
//! (which B's sends cross too) and not, through the load generator, the cell. A's load
//! generator, which as deployed runs on A's own machines, runs there only when neither the
//! router nor B's wants the CPU.

use std::time::{Duration, SystemTime};

use cellmail_proto::v1::sender_client::SenderClient;
use cellmail_registry::schema::Policy;
use tonic::transport::Channel;

use super::send_path::{
    CELL, Door, Priority, Stage, UNLIMITED, next_key, runtime_on, seed, start_cell, start_router,
};
use super::{Row, os, percentile};

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
/// As deployed by default.
const WORKERS: usize = cellmail_cell::DEFAULT_WORKERS;
/// How many times each condition (alone, each flood) takes its turn, and for how long: B's
/// p99 over 2,400 sends per condition, so that a stall of the machine (one slow fsync of
/// 50 ms delays a handful of sends) does not decide it.
const ROUNDS: u32 = 6;
const PHASE: Duration = Duration::from_secs(4);

/// B's accept-to-sent and accept latencies (ms) under one condition.
#[derive(Default)]
struct Seen {
    latencies: Vec<f64>,
    accepts: Vec<f64>,
    /// CPU seconds the hypervisor took from the machine during this condition's turns.
    stolen: f64,
}

impl Seen {
    async fn add(
        &mut self,
        client: &SenderClient<Channel>,
        key: &str,
        sent: Vec<Sent>,
        stolen: f64,
    ) -> anyhow::Result<()> {
        self.stolen += stolen;
        self.latencies.extend(delivered(client, key, &sent).await?);
        self.accepts
            .extend(sent.iter().map(|s| s.took.as_secs_f64() * 1e3));
        Ok(())
    }

    /// p99 of accept-to-sent and of accept.
    fn p99s(&mut self) -> (f64, f64) {
        (
            percentile(&mut self.latencies, 99.0),
            percentile(&mut self.accepts, 99.0),
        )
    }
}

/// What B saw during one flood's turns (and how many of its sends failed), and what A
/// offered and got admitted.
#[derive(Default)]
struct Crowded {
    seen: Seen,
    failed: usize,
    offered: usize,
    admitted: usize,
}

/// One accepted send: when it started, how long the accept took, its message id.
struct Sent {
    at: SystemTime,
    took: Duration,
    id: String,
}

/// Sends at `rate` for `duration`: the accepted sends, and how many were refused.
async fn steady(door: &Door, rate: f64, duration: Duration) -> (Vec<Sent>, usize) {
    let mut tick = tokio::time::interval(Duration::from_secs_f64(1.0 / rate));
    let started = std::time::Instant::now();
    let mut tasks = Vec::new();
    while started.elapsed() < duration {
        tick.tick().await;
        let door = door.clone();
        tasks.push(tokio::spawn(async move {
            let (at, began) = (SystemTime::now(), std::time::Instant::now());
            let id = door.send(next_key()).await?;
            let took = began.elapsed();
            Ok::<_, tonic::Status>(Sent { at, took, id })
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
    sent: &[Sent],
) -> anyhow::Result<Vec<f64>> {
    let deadline = std::time::Instant::now() + Duration::from_secs(30);
    let mut latencies = Vec::with_capacity(sent.len());
    for Sent { at, id, .. } in sent {
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
        runtime_on("bench-cell", Some(1), Priority::Normal)?,
        runtime_on("bench-router", Some(0), Priority::Normal)?,
        runtime_on("bench-load", Some(0), Priority::Normal)?,
        runtime_on("bench-flood", Some(0), Priority::Idle)?,
    );
    let stage = Stage::new(quick, &cell_rt)?;
    let Stage {
        keys,
        shutdown,
        registry,
        ..
    } = &stage;
    let noisy_policy = Policy {
        rate_per_second: NOISY_RATE,
        burst: NOISY_RATE,
        ..UNLIMITED
    };
    let (calm_key, noisy_key) = cell_rt.block_on(async {
        let calm = seed(registry.as_ref(), keys, CALM, UNLIMITED, CELL).await?;
        let noisy = seed(registry.as_ref(), keys, NOISY, noisy_policy, CELL).await?;
        anyhow::Ok((calm, noisy))
    })?;
    let (_, cell) = start_cell(&cell_rt, &stage, CELL, WORKERS)?;
    let router_addr = start_router(&router_rt, registry, keys, shutdown, None)?;

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
        let (rounds, phase) = if quick {
            (1, Duration::from_secs(1))
        } else {
            (ROUNDS, PHASE)
        };
        // A turn of both, not measured: the fresh store, queue and mail files grow and the
        // first deliveries start, one-off costs that would otherwise fall on whichever
        // condition ran first (once, B alone's first p99 was 176 ms and the next 3 ms).
        let flood = |times: u32| {
            let noisy = noisy.clone();
            let rate = f64::from(NOISY_RATE * times);
            flood_rt.spawn(async move { steady(&noisy, rate, phase).await })
        };
        let warm_up = flood(FLOODS[0].0);
        let (sent, _) = steady(&calm, CALM_RATE, phase).await;
        warm_up.await?;
        delivered(&client, &calm_key, &sent).await?;

        // The conditions take turns, `rounds` times, so that a stall of the machine (a slow
        // fsync, the host) falls on any of them alike instead of on whichever ran then.
        let mut alone = Seen::default();
        let mut crowded: Vec<Crowded> = FLOODS.iter().map(|_| Crowded::default()).collect();
        for _ in 0..rounds {
            let steal = os::steal_seconds();
            let (sent, _) = steady(&calm, CALM_RATE, phase).await;
            let stolen = os::stolen_since(steal);
            alone.add(&client, &calm_key, sent, stolen).await?;
            for ((times, _), seen) in FLOODS.iter().zip(&mut crowded) {
                let steal = os::steal_seconds();
                let flooding = flood(*times);
                let (sent, calm_refused) = steady(&calm, CALM_RATE, phase).await;
                let (admitted, refused) = flooding.await?;
                let stolen = os::stolen_since(steal);
                seen.failed += calm_refused;
                seen.seen.add(&client, &calm_key, sent, stolen).await?;
                seen.admitted += admitted.len();
                seen.offered += admitted.len() + refused;
            }
        }
        let (p99_alone, accept_alone) = alone.p99s();
        let seconds = (phase * rounds).as_secs_f64();
        let steal_alone = os::steal_percent(alone.stolen, phase * rounds);
        let mut rows = Vec::new();
        for ((times, figure), mut seen) in FLOODS.into_iter().zip(crowded) {
            let (p99_crowded, accept_crowded) = seen.seen.p99s();
            let ratio = p99_crowded / p99_alone;
            let offered = seen.offered as f64 / seconds;
            let admitted = seen.admitted as f64 / seconds;
            let steal = os::steal_percent(seen.seen.stolen, phase * rounds);
            // A send of B that failed is a miss whatever the latencies, as in the move rows.
            let failed = seen.failed;
            rows.push(Row::measured(
                figure,
                ratio,
                "ratio",
                "<= 1.5",
                ratio <= 1.5 && failed == 0,
                format!(
                    "{failed} of B's sends failed; p99 {p99_crowded:.2} ms vs {p99_alone:.2} ms; B's accept p99 {accept_crowded:.2} ms vs {accept_alone:.2} ms; B at {CALM_RATE:.0}/s, A offered {offered:.0}/s ({times}x its {NOISY_RATE}/s; {admitted:.0}/s admitted); {rounds} rounds of {phase:?}; the hypervisor took {steal:.0}% of the CPU time then, {steal_alone:.0}% while B was alone"
                ),
            ));
        }
        anyhow::Ok(rows)
    })?;
    shutdown.cancel();
    cell_rt.block_on(cell)??;
    Ok(rows)
}
