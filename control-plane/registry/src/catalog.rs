//! The typed views of the registry that routers and cells serve from.
//!
//! A [`View`] is plain data changed one registry event at a time by [`View::apply`]:
//! [`Catalog`] keeps every record (cells, live cells, tenants, placements, API key hashes,
//! global suppressions, breakers); the router keeps a narrower view of its own.
//! [`WatchedCatalog`] loads the prefix (a page at a time) at revision R, watches from R+1 and
//! applies every change, so lookups never touch the registry. When the watch breaks it
//! resumes from the last revision it applied, and reloads the whole prefix when that
//! revision was compacted. Readers can wait for a revision or a condition (a router that
//! was told "moved" waits for the new placement).

use std::collections::{HashMap, HashSet};
use std::sync::{Arc, RwLock, RwLockReadGuard};
use std::time::{Duration, Instant};

use cellmail_proto::{CellId, MessageClass, TenantId};
use tokio_util::sync::CancellationToken;
use tonic_health::ServingStatus;
use tonic_health::server::HealthReporter;

use crate::schema::{
    self, ApiKeyRecord, BreakerRecord, CellRecord, Entity, GlobalSuppressionRecord, Keys,
    PlacementRecord, TenantRecord,
};
use crate::{EventKind, Registry, RegistryError, Revision, Watcher};

/// The catalog's maps: hashed with foldhash (seeded per process), several times faster than
/// the standard SipHash on short keys, for the lookups every send makes.
pub type Map<K, V> = HashMap<K, V, foldhash::fast::RandomState>;

#[derive(Debug, Default, Clone)]
pub struct Catalog {
    pub cells: Map<CellId, CellRecord>,
    pub alive: HashSet<CellId, foldhash::fast::RandomState>,
    pub tenants: Map<TenantId, TenantRecord>,
    pub placements: Map<TenantId, PlacementRecord>,
    /// SHA-256 of an API key -> the key's record.
    pub api_keys: Map<String, ApiKeyRecord>,
    /// Suppression key -> the operators' entry.
    pub global_suppressions: Map<String, GlobalSuppressionRecord>,
    pub breakers: Map<(TenantId, MessageClass), BreakerRecord>,
    /// The keys that sign and verify engagement links.
    pub tracking: crate::tracking::TrackingKeys,
}

/// A view of the registry's records, kept by [`WatchedCatalog`].
pub trait View: Default + Send + Sync + 'static {
    /// Applies one put (`Some(value)`) or delete (`None`) of `key`. A value that does not
    /// parse is logged and treated as absent ([`parse`]), so one bad record never stops the
    /// view.
    fn apply(&mut self, keys: &Keys, key: &str, value: Option<&[u8]>);
}

/// Reads the records under `prefixes` (all of them: `keys.prefix()`) into a view a page at a
/// time, so that the registry's raw records are never all held at once beside what they
/// parse into. The revision is the latest the reads were made at.
pub async fn fetch<V: View>(
    registry: &dyn Registry,
    keys: &Keys,
    prefixes: &[String],
) -> Result<(V, Revision), RegistryError> {
    let mut view = V::default();
    let mut latest = 0;
    for prefix in prefixes {
        let revision = registry
            .list_pages(prefix, &mut |page| {
                for kv in page {
                    view.apply(keys, &kv.key, Some(&kv.value));
                }
            })
            .await?;
        latest = latest.max(revision);
    }
    Ok((view, latest))
}

/// The record a put carries, or `None` for a delete or a value that does not parse (logged).
pub fn parse<T: serde::de::DeserializeOwned>(key: &str, value: Option<&[u8]>) -> Option<T> {
    schema::decode(value?)
        .inspect_err(|err| tracing::error!(key, %err, "unreadable registry record ignored"))
        .ok()
}

impl View for Catalog {
    fn apply(&mut self, keys: &Keys, key: &str, value: Option<&[u8]>) {
        match keys.parse(key) {
            Some(Entity::Cell(id)) => upsert(&mut self.cells, id, parse(key, value)),
            Some(Entity::Alive(id)) => {
                if value.is_some() {
                    self.alive.insert(id);
                } else {
                    self.alive.remove(&id);
                }
            }
            Some(Entity::Tenant(id)) => upsert(&mut self.tenants, id, parse(key, value)),
            Some(Entity::Placement(id)) => upsert(&mut self.placements, id, parse(key, value)),
            Some(Entity::ApiKey(hash)) => upsert(&mut self.api_keys, hash, parse(key, value)),
            Some(Entity::GlobalSuppression(address)) => {
                upsert(&mut self.global_suppressions, address, parse(key, value))
            }
            Some(Entity::Breaker(tenant, class)) => {
                upsert(&mut self.breakers, (tenant, class), parse(key, value))
            }
            Some(Entity::TrackingKeys) => self.tracking = parse(key, value).unwrap_or_default(),
            None => {}
        }
    }
}

impl Catalog {
    /// The tripped breaker of `tenant`'s `class`, if it is paused.
    pub fn tripped(&self, tenant: &TenantId, class: MessageClass) -> Option<&BreakerRecord> {
        self.breakers
            .get(&(tenant.clone(), class))
            .filter(|b| b.tripped())
    }

    /// How many tenants are placed on each cell.
    pub fn load(&self) -> HashMap<&CellId, u32> {
        let mut load = HashMap::new();
        for placement in self.placements.values() {
            *load.entry(&placement.cell).or_default() += 1;
        }
        load
    }
}

/// Sets (`Some`) or removes (`None`) `key`'s entry.
pub fn upsert<K: std::hash::Hash + Eq, V>(map: &mut Map<K, V>, key: K, value: Option<V>) {
    match value {
        Some(value) => map.insert(key, value),
        None => map.remove(&key),
    };
}

/// A [`View`] ([`Catalog`] unless said otherwise) kept current by a registry watch.
pub struct WatchedCatalog<V: View = Catalog> {
    shared: Arc<Shared<V>>,
    task: tokio::task::JoinHandle<()>,
}

struct Shared<V> {
    catalog: RwLock<V>,
    revision: tokio::sync::watch::Sender<Revision>,
    /// Since when the watch has been broken (`None` while it is following the registry).
    broken_since: std::sync::Mutex<Option<Instant>>,
}

impl<V> Shared<V> {
    fn set_following(&self, following: bool) {
        let mut broken = self.broken_since.lock().unwrap_or_else(|p| p.into_inner());
        match (following, *broken) {
            (true, _) => *broken = None,
            (false, None) => *broken = Some(Instant::now()),
            (false, Some(_)) => {}
        }
    }
}

/// The health entry that says whether this process follows the registry.
pub const REGISTRY_HEALTH: &str = "cellmail.registry";
const STALENESS_REPORT: Duration = Duration::from_millis(500);

/// First and longest pause before following a broken watch again.
const RETRY_FIRST: Duration = Duration::from_millis(100);
const RETRY_MAX: Duration = Duration::from_secs(2);

impl<V: View> WatchedCatalog<V> {
    /// Loads the prefix and starts following it.
    pub async fn start(registry: Arc<dyn Registry>, keys: Keys) -> Result<Self, RegistryError> {
        let (catalog, revision) =
            fetch::<V>(registry.as_ref(), &keys, &[keys.prefix().to_owned()]).await?;
        let (revision, _) = tokio::sync::watch::channel(revision);
        let shared = Arc::new(Shared {
            catalog: RwLock::new(catalog),
            revision,
            broken_since: Default::default(),
        });
        let task = tokio::spawn(follow(registry, keys, shared.clone()));
        Ok(Self { shared, task })
    }

    pub fn read(&self) -> RwLockReadGuard<'_, V> {
        // Writers never panic while holding the lock (apply only logs), so a poisoned lock
        // still guards a consistent catalog.
        self.shared
            .catalog
            .read()
            .unwrap_or_else(|poisoned| poisoned.into_inner())
    }

    /// How long the catalog has not been following the registry (the registry unreachable,
    /// the watch broken), or `None` while it is. Lookups keep answering from the last state
    /// either way: this says how stale that state may be.
    pub fn staleness(&self) -> Option<Duration> {
        self.shared
            .broken_since
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .map(|since| since.elapsed())
    }

    /// Until `shutdown`, keeps `health`'s `cellmail.registry` entry (NOT_SERVING while the
    /// catalog is not following the registry: lookups go on from the last state) and the
    /// `cellmail_registry_staleness_seconds{component}` gauge (0 while following) current.
    pub async fn report_staleness(
        &self,
        component: String,
        health: HealthReporter,
        shutdown: CancellationToken,
    ) {
        let gauge =
            metrics::gauge!("cellmail_registry_staleness_seconds", "component" => component);
        let mut tick = tokio::time::interval(STALENESS_REPORT);
        loop {
            tokio::select! {
                () = shutdown.cancelled() => return,
                _ = tick.tick() => {}
            }
            let staleness = self.staleness();
            gauge.set(staleness.map_or(0.0, |s| s.as_secs_f64()));
            let status = if staleness.is_some() {
                ServingStatus::NotServing
            } else {
                ServingStatus::Serving
            };
            health.set_service_status(REGISTRY_HEALTH, status).await;
        }
    }

    /// Waits until the catalog has applied the registry at `revision` or later, at most
    /// `timeout`; returns whether it did.
    pub async fn wait_for_revision(&self, revision: Revision, timeout: Duration) -> bool {
        let mut revisions = self.shared.revision.subscribe();
        tokio::time::timeout(timeout, revisions.wait_for(|applied| *applied >= revision))
            .await
            .is_ok_and(|seen| seen.is_ok())
    }

    /// Waits until `condition` holds on the catalog, at most `timeout`; returns whether it did.
    pub async fn wait_until(&self, timeout: Duration, condition: impl Fn(&V) -> bool) -> bool {
        let mut revisions = self.shared.revision.subscribe();
        tokio::time::timeout(timeout, async {
            loop {
                if condition(&self.read()) {
                    return;
                }
                if revisions.changed().await.is_err() {
                    std::future::pending::<()>().await;
                }
            }
        })
        .await
        .is_ok()
    }
}

impl<V: View> Drop for WatchedCatalog<V> {
    fn drop(&mut self) {
        self.task.abort();
    }
}

async fn follow<V: View>(registry: Arc<dyn Registry>, keys: Keys, shared: Arc<Shared<V>>) {
    let mut pause = RETRY_FIRST;
    loop {
        let from = *shared.revision.borrow() + 1;
        let error = match registry.watch(keys.prefix(), from).await {
            Ok(watcher) => {
                shared.set_following(true);
                pause = RETRY_FIRST;
                apply_events(watcher, &keys, &shared).await
            }
            Err(err) => err,
        };
        // Warn when following stops, not on every failed attempt while the registry is away.
        if pause == RETRY_FIRST {
            tracing::warn!(%error, "stopped following the registry; serving from the last state");
        }
        shared.set_following(false);
        if let RegistryError::Compacted { .. } = error
            && let Err(err) = resync(registry.as_ref(), &keys, &shared).await
        {
            tracing::debug!(%err, "registry reload failed; retrying");
        }

        tokio::time::sleep(pause).await;
        pause = (pause * 2).min(RETRY_MAX);
    }
}

/// Applies every event of `watcher` until it ends; returns why it ended.
async fn apply_events<V: View>(
    mut watcher: Watcher,
    keys: &Keys,
    shared: &Shared<V>,
) -> RegistryError {
    loop {
        match watcher.next().await {
            Some(Ok(event)) => {
                let value = (event.kind == EventKind::Put).then_some(event.value.as_slice());
                let mut catalog = shared.catalog.write().unwrap_or_else(|p| p.into_inner());
                catalog.apply(keys, &event.key, value);
                drop(catalog);
                shared.revision.send_replace(event.mod_revision);
            }
            Some(Err(err)) => return err,
            None => return RegistryError::Unavailable("watch closed".into()),
        }
    }
}

async fn resync<V: View>(
    registry: &dyn Registry,
    keys: &Keys,
    shared: &Shared<V>,
) -> Result<(), RegistryError> {
    let (catalog, revision) = fetch::<V>(registry, keys, &[keys.prefix().to_owned()]).await?;
    *shared.catalog.write().unwrap_or_else(|p| p.into_inner()) = catalog;
    shared.revision.send_replace(revision);
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::schema::{PlacementState, encode};
    use cellmail_proto::Epoch;

    #[test]
    fn apply_tracks_puts_deletes_and_skips_garbage() {
        let keys = Keys::new("/p/");
        let tenant = TenantId::new("acme").unwrap();
        let cell = CellId::new("c1").unwrap();
        let placement = PlacementRecord {
            cell: cell.clone(),
            epoch: Epoch(2),
            state: PlacementState::Serving,
        };
        let mut catalog = Catalog::default();
        catalog.apply(&keys, &keys.placement(&tenant), Some(&encode(&placement)));
        assert_eq!(catalog.placements.get(&tenant), Some(&placement));
        assert_eq!(catalog.load().get(&cell), Some(&1));
        catalog.apply(&keys, &keys.placement(&tenant), Some(b"{not json"));
        assert_eq!(catalog.placements.get(&tenant), None);
        catalog.apply(&keys, &keys.alive(&cell), Some(b""));
        assert!(catalog.alive.contains(&cell));
        catalog.apply(&keys, &keys.alive(&cell), None);
        assert!(!catalog.alive.contains(&cell));
    }
}
