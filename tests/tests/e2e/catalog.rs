//! The watched catalog over etcd: routers and cells keep serving from it while etcd is down
//! (static stability) and catch up when it returns.

use std::sync::Arc;
use std::time::Duration;

use cellmail_proto::{CellId, Epoch, TenantId};
use cellmail_registry::Registry;
use cellmail_registry::catalog::WatchedCatalog;
use cellmail_registry::etcd::EtcdRegistry;
use cellmail_registry::schema::{Keys, PlacementRecord, PlacementState, encode};
use cellmail_tests::services::EtcdServer;

fn placement(cell: &str, epoch: u64) -> Vec<u8> {
    encode(&PlacementRecord {
        cell: CellId::new(cell).unwrap(),
        epoch: Epoch(epoch),
        state: PlacementState::Serving,
    })
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_catalog_serves_while_etcd_is_down_and_catches_up_after() {
    let dir = tempfile::tempdir().unwrap();
    let mut etcd = EtcdServer::start(dir.path()).await.unwrap();
    let registry: Arc<dyn Registry> = Arc::new(
        EtcdRegistry::connect(&[etcd.endpoint.clone()])
            .await
            .unwrap(),
    );
    let keys = Keys::new("/stability/");
    let tenant = TenantId::new("acme").unwrap();
    registry
        .put(&keys.placement(&tenant), placement("cell-1", 1), None)
        .await
        .unwrap();
    let catalog = WatchedCatalog::start(registry.clone(), keys.clone())
        .await
        .unwrap();
    let epoch_of =
        |catalog: &WatchedCatalog| catalog.read().placements.get(&tenant).map(|p| p.epoch);
    assert_eq!(epoch_of(&catalog), Some(Epoch(1)));

    etcd.stop();
    assert!(
        registry.get(&keys.placement(&tenant)).await.is_err(),
        "etcd is really down"
    );
    tokio::time::sleep(Duration::from_secs(1)).await;
    assert_eq!(
        epoch_of(&catalog),
        Some(Epoch(1)),
        "lookups keep working from the last state"
    );
    assert!(
        catalog.staleness().is_some(),
        "the catalog knows it is not following the registry"
    );

    etcd.restart().await.unwrap();
    let mut written = false;
    for _ in 0..100 {
        // The client reconnects on its own; writes fail until it has.
        if registry
            .put(&keys.placement(&tenant), placement("cell-2", 2), None)
            .await
            .is_ok()
        {
            written = true;
            break;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    assert!(written, "etcd did not come back");
    let caught_up = catalog
        .wait_until(Duration::from_secs(15), |c| {
            c.placements
                .get(&tenant)
                .is_some_and(|p| p.epoch == Epoch(2))
        })
        .await;
    assert!(
        caught_up,
        "a change made after etcd returned reached the catalog"
    );
    assert_eq!(catalog.staleness(), None);
}
