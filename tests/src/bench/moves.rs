//! Tenant moves under load: two embedded cells, a router and the control plane's mover on
//! one registry; senders keep sending for the moving tenant through the router (retrying
//! UNAVAILABLE with the same key) while it is moved back and forth. The figures are the
//! freeze window of each move (from the write that froze the placement to the one that
//! switched it), and what the moves cost a neighbour that stays on the source cell: its p99
//! send latency while the tenant moves off its cell over the same figure in the quiet second
//! before each of those moves, with the same load on its cell. Its figure during the moves
//! onto its cell is reported beside (there the moving tenant's held sends and load arrive).
//! As deployed, the cells, the router, the control plane and the clients run on machines of
//! their own: here the neighbour's path (its client, the router and its cell) runs on CPU 1,
//! and the other cell, the mover and the moving tenant's client on CPU 0, so what the
//! target and the mover do for a copy is not counted as the source cell's doing.

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU8, AtomicU64, Ordering};
use std::time::Duration;

use cellmail_control::moves::{self, Mover};
use cellmail_proto::tls::Role;
use cellmail_proto::v1::sender_client::SenderClient;
use cellmail_proto::{CellId, TenantId};
use cellmail_registry::channels::CellChannels;
use cellmail_registry::schema::MoveStep;

use super::send_path::{
    Door, Priority, Stage, UNLIMITED, next_key, runtime_on, seed, start_cell, start_router,
};
use super::{Row, percentile};

const TENANT: &str = "bench";
const CELLS: [&str; 2] = ["bench-1", "bench-2"];
const SENDERS: usize = 16;
/// Each sender's pause between sends: the load stays below what the cells deliver, so each
/// move's wait for the source's backlog stays short.
const PAUSE: Duration = Duration::from_millis(20);
const WORKERS: usize = 2;

/// The neighbour's pause between sends: short, so that its p99 during the moves (some 100 ms
/// each) stands on over a thousand sends.
const NEIGHBOUR_PAUSE: Duration = Duration::from_millis(2);

pub fn run(quick: bool) -> anyhow::Result<Vec<Row>> {
    let moves = if quick { 5 } else { 50 };
    // A quick run (a debug build, in CI) sends less: there the cells deliver more slowly
    // than 16 senders accept, and each move waits for its source's backlog.
    let (tenant_senders, neighbour_pause) = if quick {
        (4, Duration::from_millis(10))
    } else {
        (SENDERS, NEIGHBOUR_PAUSE)
    };
    // Before each move, with the same load on, the neighbour is measured with no move under
    // way: the two conditions take turns, so a stall of the machine falls on either alike.
    let quiet = Duration::from_millis(if quick { 200 } else { 1_000 });
    // The neighbour's path (its client, the router, its cell) runs on CPU 1; the other cell,
    // the mover and the moving tenant's client on CPU 0.
    let (cell_rts, control_rt, router_rt, neighbour_rt, load_rt) = (
        [
            runtime_on("bench-cell-1", Some(1), Priority::Normal)?,
            runtime_on("bench-cell-2", Some(0), Priority::Normal)?,
        ],
        runtime_on("bench-control", Some(0), Priority::Normal)?,
        runtime_on("bench-router", Some(1), Priority::Normal)?,
        runtime_on("bench-neighbour", Some(1), Priority::Normal)?,
        runtime_on("bench-load", Some(0), Priority::Normal)?,
    );
    let cell_rt = &cell_rts[0];
    let stage = Stage::new(quick, cell_rt)?;
    let (registry, keys) = (stage.registry.clone(), stage.keys.clone());
    let api_key = cell_rt.block_on(seed(registry.as_ref(), &keys, TENANT, UNLIMITED, CELLS[0]))?;
    let neighbour_key = cell_rt.block_on(seed(
        registry.as_ref(),
        &keys,
        "neighbour",
        UNLIMITED,
        CELLS[0],
    ))?;
    let mut cells = Vec::new();
    for (id, cell_rt) in CELLS.into_iter().zip(&cell_rts) {
        let (_, cell) = start_cell(cell_rt, &stage, id, WORKERS)?;
        cells.push(cell);
    }
    let router = start_router(&router_rt, &registry, &keys, &stage.shutdown, None)?;
    let channels = CellChannels::new(crate::pki::tls(&Role::Control)?);
    let mover = Mover::new(registry.clone(), keys.clone(), channels);
    control_rt.spawn(mover.run(stage.shutdown.clone()));

    // Each client's connection runs on its own client's runtime.
    let neighbour = neighbour_rt.block_on(async {
        let neighbour = Door::Sender {
            client: SenderClient::connect(format!("http://{router}")).await?,
            key: Some(neighbour_key),
        };
        neighbour.send(next_key()).await?;
        anyhow::Ok(neighbour)
    })?;
    let (freezes, (sends, seconds), failed, latencies) = load_rt.block_on(async {
        let door = Door::Sender {
            client: SenderClient::connect(format!("http://{router}")).await?,
            key: Some(api_key),
        };
        door.send(next_key()).await?;
        let (stop, sent, failed) = (
            Arc::new(AtomicBool::new(false)),
            Arc::new(AtomicU64::new(0)),
            Arc::new(AtomicU64::new(0)),
        );
        let senders: Vec<_> = (0..tenant_senders)
            .map(|_| {
                let (door, stop, sent, failed) =
                    (door.clone(), stop.clone(), sent.clone(), failed.clone());
                tokio::spawn(async move {
                    while !stop.load(Ordering::Relaxed) {
                        let key = next_key();
                        loop {
                            match door.send(key.clone()).await {
                                Ok(_) => break,
                                Err(status) if status.code() == tonic::Code::Unavailable => {
                                    tokio::time::sleep(Duration::from_millis(5)).await
                                }
                                Err(_) => {
                                    failed.fetch_add(1, Ordering::Relaxed);
                                    break;
                                }
                            }
                        }
                        sent.fetch_add(1, Ordering::Relaxed);
                        tokio::time::sleep(PAUSE).await;
                    }
                })
            })
            .collect();
        // (phase, seconds) of each of the neighbour's sends.
        let (phase, samples) = (
            Arc::new(AtomicU8::new(Phase::Home as u8)),
            Arc::new(std::sync::Mutex::new(Vec::new())),
        );
        // The mover's senders warm up first, so the neighbour's figures before the moves
        // are taken under the same load as those during them.
        tokio::time::sleep(Duration::from_millis(500)).await;
        let watcher = {
            let (stop, phase, samples, failed) =
                (stop.clone(), phase.clone(), samples.clone(), failed.clone());
            neighbour_rt.spawn(async move {
                while !stop.load(Ordering::Relaxed) {
                    let began = std::time::Instant::now();
                    let at = phase.load(Ordering::Relaxed);
                    if neighbour.send(next_key()).await.is_err() {
                        failed.fetch_add(1, Ordering::Relaxed);
                    }
                    let took = began.elapsed().as_secs_f64();
                    samples
                        .lock()
                        .unwrap_or_else(|p| p.into_inner())
                        .push((at, took));
                    tokio::time::sleep(neighbour_pause).await;
                }
            })
        };
        let tenant = TenantId::new(TENANT)?;
        let started = std::time::Instant::now();
        let mut freezes = Vec::new();
        for n in 0..moves {
            // The tenant starts on the neighbour's cell, so even moves leave it.
            let (calm, moving) = if n % 2 == 0 {
                (Phase::Home, Phase::Leaving)
            } else {
                (Phase::Away, Phase::Arriving)
            };
            phase.store(calm as u8, Ordering::Relaxed);
            tokio::time::sleep(quiet).await;
            phase.store(moving as u8, Ordering::Relaxed);
            let to = CellId::new(CELLS[(n + 1) % 2])?;
            let actor = "bench".to_owned();
            moves::request(registry.as_ref(), &keys, &tenant, &to, actor, String::new()).await?;
            let record = loop {
                tokio::time::sleep(Duration::from_millis(5)).await;
                let latest = moves::latest(registry.as_ref(), &keys, &tenant).await?;
                if let Some(record) = latest.filter(|m| m.step.finished()) {
                    break record;
                }
            };
            anyhow::ensure!(record.step == MoveStep::Complete, "move {n}: {record:?}");
            freezes.push(record.freeze_ms as f64);
        }
        stop.store(true, Ordering::Relaxed);
        for sender in senders {
            sender.await?;
        }
        watcher.await?;
        let sends = (
            sent.load(Ordering::Relaxed),
            started.elapsed().as_secs_f64(),
        );
        let samples = std::mem::take(&mut *samples.lock().unwrap_or_else(|p| p.into_inner()));
        let millis = |phase: Phase| {
            let of = samples.iter().filter(|(p, _)| *p == phase as u8);
            of.map(|(_, s)| s * 1e3).collect::<Vec<_>>()
        };
        let latencies = [Phase::Home, Phase::Leaving, Phase::Arriving].map(millis);
        anyhow::Ok((freezes, sends, failed.load(Ordering::Relaxed), latencies))
    })?;
    stage.shutdown.cancel();
    for cell in cells {
        cell_rt.block_on(cell)??;
    }
    let mut freezes = freezes;
    let (p50, p99) = (
        percentile(&mut freezes, 50.0),
        percentile(&mut freezes, 99.0),
    );
    let [calm, leaving, arriving] = latencies.map(|mut v| (percentile(&mut v, 99.0), v.len()));
    let ratio = leaving.0 / calm.0;
    let neighbour = Row::measured(
        "tenant move: a source-cell neighbour's p99 send latency, moves under way / none",
        ratio,
        "ratio",
        "<= 1.2",
        ratio <= 1.2 && failed == 0,
        format!(
            "p99 {:.2} ms over {} sends during the moves off its cell vs {:.2} ms over {} in the {quiet:?} before each, the tenant on its cell either way; during the moves onto its cell {:.2} ms over {}",
            leaving.0, leaving.1, calm.0, calm.1, arriving.0, arriving.1
        ),
    );
    let freeze = Row::measured(
        "tenant move freeze window, p99 over moves under load",
        p99,
        "ms",
        "< 250",
        p99 < 250.0 && failed == 0,
        format!(
            "p50 {p50:.0} ms over {moves} moves in {seconds:.1} s, {sends} sends by {tenant_senders} senders meanwhile, {failed} failed"
        ),
    );
    Ok(vec![freeze, neighbour])
}

/// Where the moving tenant is, seen from the neighbour's cell, when a neighbour's send starts.
#[derive(Clone, Copy)]
enum Phase {
    /// On the neighbour's cell, no move under way.
    Home,
    /// On the other cell, no move under way.
    Away,
    /// Moving off the neighbour's cell: the neighbour is on the source cell.
    Leaving,
    /// Moving onto the neighbour's cell.
    Arriving,
}
