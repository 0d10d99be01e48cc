//! The placement cache at scale, and placement changes reaching routers over etcd.

use std::sync::Arc;
use std::time::{Duration, Instant};

use cellmail_proto::{CellId, Epoch, TenantId};
use cellmail_registry::catalog::WatchedCatalog;
use cellmail_registry::etcd::EtcdRegistry;
use cellmail_registry::schema::{
    self, CellRecord, CellState, Keys, PlacementRecord, PlacementState, Policy, TenantRecord,
    TenantStatus, Tier,
};
use cellmail_registry::{Op, Registry, local::LocalRegistry};
use cellmail_router::routes::Routes;

use super::{Row, os, percentile};
use crate::services::EtcdServer;

const CELLS: usize = 16;
const WRITE_BATCH: usize = 10_000;

fn runtime() -> anyhow::Result<tokio::runtime::Runtime> {
    Ok(tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()?)
}

fn tenant(n: usize) -> anyhow::Result<TenantId> {
    Ok(TenantId::new(format!("tenant-{n}"))?)
}

/// `tenants` tenants with their placements, written to an embedded registry; then a router's
/// catalog syncs cold from it and resolves tenants.
pub fn cache_at_scale(tenants: usize) -> anyhow::Result<Vec<Row>> {
    let rt = runtime()?;
    rt.block_on(async {
        let dir = tempfile::tempdir()?;
        let registry: Arc<dyn Registry> =
            Arc::new(LocalRegistry::open(&dir.path().join("registry.redb")).await?);
        let keys = Keys::new("/scale/");
        let cells: Vec<CellId> = (0..CELLS)
            .map(|n| CellId::new(format!("cell-{n}")))
            .collect::<Result<_, _>>()?;
        for cell in &cells {
            let record = CellRecord {
                endpoint: "http://127.0.0.1:1".into(),
                capacity: u32::MAX,
                state: CellState::Active,
                labels: Default::default(),
                version: String::new(),
                build: String::new(),
                ses_region: None,
            };
            registry
                .put(&keys.cell(cell), schema::encode(&record), None)
                .await?;
        }
        let record = schema::encode(&TenantRecord {
            tier: Tier::Standard,
            status: TenantStatus::Active,
            domains: vec!["example.com".into()],
            created_at_ms: 0,
            policy: Policy {
                rate_per_second: 1_000_000,
                burst: 1_000_000,
                ..Policy::default()
            },
            identities: Vec::new(),
            labels: Default::default(),
            pinned: false,
        });
        let mut ops = Vec::with_capacity(WRITE_BATCH);
        for n in 0..tenants {
            let id = tenant(n)?;
            let placement = PlacementRecord {
                cell: cells[n % CELLS].clone(),
                epoch: Epoch(1),
                state: PlacementState::Serving,
            };
            ops.push(Op::Put {
                key: keys.tenant(&id),
                value: record.clone(),
                lease: None,
            });
            ops.push(Op::Put {
                key: keys.placement(&id),
                value: schema::encode(&placement),
                lease: None,
            });
            if ops.len() >= WRITE_BATCH || n + 1 == tenants {
                registry.txn(Vec::new(), std::mem::take(&mut ops)).await?;
            }
        }

        let rss_before = os::rss_bytes();
        let started = Instant::now();
        let catalog = WatchedCatalog::<Routes>::start(registry.clone(), keys.clone()).await?;
        let sync = started.elapsed().as_secs_f64();
        let rss_delta = os::rss_bytes().saturating_sub(rss_before) as f64 / 1e6;
        anyhow::ensure!(
            catalog.read().len() == tenants,
            "the catalog holds every placement"
        );

        let probes: Vec<TenantId> = (0..100_000)
            .map(|n| tenant((n * 7919) % tenants))
            .collect::<Result<_, _>>()?;
        let started = Instant::now();
        for id in &probes {
            let target = catalog.read().target(id)?;
            std::hint::black_box(target);
        }
        let lookup_ns = started.elapsed().as_secs_f64() * 1e9 / probes.len() as f64;
        let scale = format!("{tenants} tenants on {CELLS} cells, embedded registry");
        anyhow::Ok(vec![
            Row::measured(
                "router cache: memory (RSS delta)",
                rss_delta,
                "MB",
                "< 200 at 1M",
                rss_delta < 200.0 * tenants as f64 / 1e6,
                scale.clone(),
            ),
            Row::measured(
                "router cache: lookup time (auth-free resolve)",
                lookup_ns,
                "ns",
                "< 1000",
                lookup_ns < 1000.0,
                scale.clone(),
            ),
            Row::measured(
                "router cache: cold sync from the registry",
                sync,
                "s",
                "< 5 at 1M",
                sync < 5.0 * tenants as f64 / 1e6,
                scale,
            ),
        ])
    })
}

/// `changes` placement changes, each timed until all of 3 routers' catalogs show it.
pub fn propagation(changes: usize) -> anyhow::Result<Row> {
    let figure = "placement change seen by every router (3 routers, etcd), p99";
    let rt = runtime()?;
    rt.block_on(async {
        let dir = tempfile::tempdir()?;
        let etcd = match EtcdServer::start(dir.path()).await {
            Ok(etcd) => etcd,
            Err(err) => {
                return Ok(Row::missing(
                    figure,
                    "ms",
                    "< 100",
                    &format!("no etcd to run against: {err:#}"),
                ));
            }
        };
        let keys = Keys::new("/propagation/");
        let writer = EtcdRegistry::connect(std::slice::from_ref(&etcd.endpoint)).await?;
        let mut routers = Vec::new();
        for _ in 0..3 {
            let registry: Arc<dyn Registry> =
                Arc::new(EtcdRegistry::connect(std::slice::from_ref(&etcd.endpoint)).await?);
            routers.push(WatchedCatalog::<Routes>::start(registry, keys.clone()).await?);
        }
        let id = tenant(0)?;
        let cell = CellId::new("cell-1")?;
        let mut latencies = Vec::with_capacity(changes);
        for epoch in 1..=changes as u64 {
            let placement = PlacementRecord {
                cell: cell.clone(),
                epoch: Epoch(epoch),
                state: PlacementState::Serving,
            };
            let started = Instant::now();
            writer
                .put(&keys.placement(&id), schema::encode(&placement), None)
                .await?;
            for router in &routers {
                let seen = router
                    .wait_until(Duration::from_secs(5), |routes| {
                        routes
                            .placement(&id)
                            .is_some_and(|(seen, _)| seen == Epoch(epoch))
                    })
                    .await;
                anyhow::ensure!(seen, "a router did not see epoch {epoch} within 5 s");
            }
            latencies.push(started.elapsed().as_secs_f64() * 1e3);
        }
        let p50 = percentile(&mut latencies, 50.0);
        let p99 = percentile(&mut latencies, 99.0);
        anyhow::Ok(Row::measured(
            figure,
            p99,
            "ms",
            "< 100",
            p99 < 100.0,
            format!("p50 {p50:.2} ms over {changes} changes (write included)"),
        ))
    })
}
