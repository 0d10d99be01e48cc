//! The embedded registry: the whole key space in memory, every change committed to one redb
//! file (fsynced) before it is visible, so a restart keeps every tenant, key and placement.
//!
//! It has etcd's semantics where cellmail relies on them: one revision per transaction,
//! create/mod revisions per key, watches that replay from a revision and answer `Compacted`
//! for revisions older than the change history kept in memory (none survives a restart, as
//! after an etcd compaction), and leases whose keys are deleted when they expire. Leases
//! belong to the running process: keys bound to a lease are removed when the file is opened.
//!
//! Elections are etcd's recipe on top of that: a candidate's key is `<election>/<lease hex>`
//! bound to its lease, and a campaign watches the election until no key under it was
//! created before the candidate's own.

use std::collections::{BTreeMap, BTreeSet, HashMap, VecDeque};
use std::path::Path;
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::{Duration, Instant};

use async_trait::async_trait;
use redb::{Database, ReadableDatabase, ReadableTable, TableDefinition};
use tokio::sync::mpsc;

use crate::{
    Compare, EventKind, KeyValue, LIST_PAGE, LeaderKey, LeaseId, Op, Registry, RegistryError,
    Revision, WatchEvent, Watcher,
};

/// key -> (value, create revision, mod revision, lease or 0)
const KV: TableDefinition<&str, (&[u8], u64, u64, u64)> = TableDefinition::new("kv");
const META: TableDefinition<&str, u64> = TableDefinition::new("meta");
const REVISION: &str = "revision";
/// Changes kept for watches that start in the past.
const HISTORY_LIMIT: usize = 100_000;
const REAP_EVERY: Duration = Duration::from_millis(100);

pub struct LocalRegistry {
    inner: Arc<Inner>,
    reaper: tokio::task::JoinHandle<()>,
}

struct Inner {
    db: Database,
    state: Mutex<State>,
}

type WatchSender = mpsc::UnboundedSender<Result<WatchEvent, RegistryError>>;

struct State {
    kv: BTreeMap<String, KeyValue>,
    revision: Revision,
    /// Every change from revision `oldest` to `revision`, in order.
    history: VecDeque<WatchEvent>,
    oldest: Revision,
    watchers: Vec<(String, WatchSender)>,
    leases: HashMap<LeaseId, Lease>,
    next_lease: LeaseId,
}

struct Lease {
    ttl: Duration,
    deadline: Instant,
    keys: BTreeSet<String>,
}

fn storage(err: impl std::fmt::Display) -> RegistryError {
    RegistryError::Storage(err.to_string())
}

impl LocalRegistry {
    /// Opens (or creates) the registry file and starts expiring leases.
    pub async fn open(path: &Path) -> Result<Self, RegistryError> {
        let path = path.to_owned();
        let inner = tokio::task::spawn_blocking(move || Inner::open(&path))
            .await
            .map_err(storage)??;
        let inner = Arc::new(inner);
        let reaper = tokio::spawn(reap_expired_leases(Arc::downgrade(&inner)));
        Ok(Self { inner, reaper })
    }

    async fn blocking<T: Send + 'static>(
        &self,
        work: impl FnOnce(&Inner) -> Result<T, RegistryError> + Send + 'static,
    ) -> Result<T, RegistryError> {
        let inner = self.inner.clone();
        tokio::task::spawn_blocking(move || work(&inner))
            .await
            .map_err(storage)?
    }
}

impl Drop for LocalRegistry {
    fn drop(&mut self) {
        self.reaper.abort();
    }
}

async fn reap_expired_leases(inner: std::sync::Weak<Inner>) {
    let mut tick = tokio::time::interval(REAP_EVERY);
    loop {
        tick.tick().await;
        let Some(inner) = inner.upgrade() else { return };
        let outcome = tokio::task::spawn_blocking(move || {
            let expired: Vec<LeaseId> = {
                let state = inner.lock();
                let now = Instant::now();
                state
                    .leases
                    .iter()
                    .filter(|(_, l)| l.deadline <= now)
                    .map(|(id, _)| *id)
                    .collect()
            };
            expired
                .into_iter()
                .try_for_each(|lease| inner.revoke(lease))
        })
        .await;
        match outcome {
            Ok(Ok(())) | Ok(Err(RegistryError::LeaseNotFound(_))) => {}
            Ok(Err(err)) => tracing::error!(%err, "expiring registry leases failed"),
            Err(err) => tracing::error!(%err, "lease reaper panicked"),
        }
    }
}

impl Inner {
    fn open(path: &Path) -> Result<Self, RegistryError> {
        let db = Database::create(path).map_err(storage)?;
        let (mut kv, mut revision) = (BTreeMap::new(), 0);
        {
            let txn = db.begin_write().map_err(storage)?;
            txn.open_table(KV).map_err(storage)?;
            txn.open_table(META).map_err(storage)?;
            txn.commit().map_err(storage)?;
        }
        {
            let txn = db.begin_read().map_err(storage)?;
            if let Some(rev) = txn
                .open_table(META)
                .map_err(storage)?
                .get(REVISION)
                .map_err(storage)?
            {
                revision = rev.value();
            }
            for row in txn
                .open_table(KV)
                .map_err(storage)?
                .iter()
                .map_err(storage)?
            {
                let (key, value) = row.map_err(storage)?;
                let (bytes, create_revision, mod_revision, lease) = value.value();
                let key = key.value().to_owned();
                let entry = KeyValue {
                    key: key.clone(),
                    value: bytes.to_vec(),
                    create_revision,
                    mod_revision,
                    lease: (lease != 0).then_some(lease),
                };
                kv.insert(key, entry);
            }
        }
        let inner = Self {
            db,
            state: Mutex::new(State {
                kv,
                revision,
                history: VecDeque::new(),
                oldest: revision + 1,
                watchers: Vec::new(),
                leases: HashMap::new(),
                next_lease: 1,
            }),
        };
        // Leases died with the process that held them.
        let orphaned: Vec<Op> = inner
            .lock()
            .kv
            .values()
            .filter(|kv| kv.lease.is_some())
            .map(|kv| Op::Delete {
                key: kv.key.clone(),
            })
            .collect();
        inner.apply(Vec::new(), orphaned)?;
        Ok(inner)
    }

    fn lock(&self) -> MutexGuard<'_, State> {
        // A panic while holding the lock cannot leave the map half-written: every change is
        // computed first and applied only after its commit succeeded.
        self.state
            .lock()
            .unwrap_or_else(|poisoned| poisoned.into_inner())
    }

    fn apply(
        &self,
        compares: Vec<Compare>,
        ops: Vec<Op>,
    ) -> Result<Option<Revision>, RegistryError> {
        let mut state = self.lock();
        let holds = compares
            .iter()
            .all(|c| state.kv.get(&c.key).map_or(0, |kv| kv.mod_revision) == c.mod_revision);
        if !holds {
            return Ok(None);
        }
        let revision = state.revision + 1;
        let mut events = Vec::with_capacity(ops.len());
        for op in ops {
            match op {
                Op::Put { key, value, lease } => {
                    if let Some(id) = lease.filter(|id| !state.leases.contains_key(id)) {
                        return Err(RegistryError::LeaseNotFound(id));
                    }
                    events.push((
                        WatchEvent {
                            kind: EventKind::Put,
                            key,
                            value,
                            mod_revision: revision,
                        },
                        lease,
                    ));
                }
                Op::Delete { key } if state.kv.contains_key(&key) => {
                    events.push((
                        WatchEvent {
                            kind: EventKind::Delete,
                            key,
                            value: Vec::new(),
                            mod_revision: revision,
                        },
                        None,
                    ));
                }
                Op::Delete { .. } => {}
            }
        }
        if events.is_empty() {
            return Ok(Some(state.revision));
        }
        let txn = self.db.begin_write().map_err(storage)?;
        {
            let mut table = txn.open_table(KV).map_err(storage)?;
            for (event, lease) in &events {
                match event.kind {
                    EventKind::Put => {
                        let created = state
                            .kv
                            .get(&event.key)
                            .map_or(revision, |kv| kv.create_revision);
                        let row = (
                            event.value.as_slice(),
                            created,
                            revision,
                            lease.unwrap_or(0),
                        );
                        table.insert(event.key.as_str(), row).map_err(storage)?;
                    }
                    EventKind::Delete => {
                        table.remove(event.key.as_str()).map_err(storage)?;
                    }
                }
            }
            txn.open_table(META)
                .map_err(storage)?
                .insert(REVISION, revision)
                .map_err(storage)?;
        }
        txn.commit().map_err(storage)?;

        state.revision = revision;
        for (event, lease) in events {
            let previous = match event.kind {
                EventKind::Put => {
                    let created = state
                        .kv
                        .get(&event.key)
                        .map_or(revision, |kv| kv.create_revision);
                    let entry = KeyValue {
                        key: event.key.clone(),
                        value: event.value.clone(),
                        create_revision: created,
                        mod_revision: revision,
                        lease,
                    };
                    if let Some(lease) = lease.and_then(|id| state.leases.get_mut(&id)) {
                        lease.keys.insert(event.key.clone());
                    }
                    state.kv.insert(event.key.clone(), entry)
                }
                EventKind::Delete => state.kv.remove(&event.key),
            };
            let old_lease = previous
                .and_then(|p| p.lease)
                .filter(|old| Some(*old) != lease);
            if let Some(old) = old_lease.and_then(|old| state.leases.get_mut(&old)) {
                old.keys.remove(&event.key);
            }
            state.publish(event);
        }
        Ok(Some(revision))
    }

    fn revoke(&self, lease: LeaseId) -> Result<(), RegistryError> {
        let keys = self
            .lock()
            .leases
            .remove(&lease)
            .ok_or(RegistryError::LeaseNotFound(lease))?
            .keys;
        let ops = keys.into_iter().map(|key| Op::Delete { key }).collect();
        self.apply(Vec::new(), ops).map(|_| ())
    }

    /// Puts the candidate `key` bound to `lease`, or keeps it (with its place in line) when
    /// the lease already stands; answers the key's create revision.
    fn stand(&self, key: &str, value: Vec<u8>, lease: LeaseId) -> Result<Revision, RegistryError> {
        loop {
            let current = self
                .lock()
                .kv
                .get(key)
                .map(|kv| (kv.mod_revision, kv.create_revision, kv.value == value));
            let (at, created) = match current {
                Some((_, created, true)) => return Ok(created),
                Some((modified, created, false)) => (modified, Some(created)),
                None => (0, None),
            };
            let compare = Compare {
                key: key.to_owned(),
                mod_revision: at,
            };
            let put = Op::Put {
                key: key.to_owned(),
                value: value.clone(),
                lease: Some(lease),
            };
            if let Some(revision) = self.apply(vec![compare], vec![put])? {
                return Ok(created.unwrap_or(revision));
            }
            // The key changed between the read and the write: read it again.
        }
    }

    /// Whether the candidate of `lease`, created at `created`, leads `prefix`: no candidate
    /// created before it is left. Its lease gone, the candidacy is over.
    fn leads(
        &self,
        prefix: &str,
        lease: LeaseId,
        created: Revision,
    ) -> Result<bool, RegistryError> {
        let state = self.lock();
        if !state.leases.contains_key(&lease) {
            return Err(RegistryError::LeaseNotFound(lease));
        }
        Ok(!state.under(prefix).any(|kv| kv.create_revision < created))
    }

    /// Deletes the candidate's key if it is still that candidacy (same create revision).
    fn resign(&self, leader: &LeaderKey) -> Result<(), RegistryError> {
        loop {
            let current = self
                .lock()
                .kv
                .get(&leader.key)
                .filter(|kv| kv.create_revision == leader.create_revision)
                .map(|kv| kv.mod_revision);
            let Some(at) = current else { return Ok(()) };
            let compare = Compare {
                key: leader.key.clone(),
                mod_revision: at,
            };
            let delete = Op::Delete {
                key: leader.key.clone(),
            };
            if self.apply(vec![compare], vec![delete])?.is_some() {
                return Ok(());
            }
        }
    }
}

impl State {
    /// Every entry whose key starts with `prefix`, in key order.
    fn under<'a>(&'a self, prefix: &'a str) -> impl Iterator<Item = &'a KeyValue> + 'a {
        self.kv
            .range(prefix.to_owned()..)
            .take_while(move |(key, _)| key.starts_with(prefix))
            .map(|(_, kv)| kv)
    }

    fn publish(&mut self, event: WatchEvent) {
        self.watchers.retain(|(prefix, tx)| {
            !event.key.starts_with(prefix.as_str()) || tx.send(Ok(event.clone())).is_ok()
        });
        self.history.push_back(event);
        while self.history.len() > HISTORY_LIMIT {
            let Some(dropped) = self.history.front().map(|e| e.mod_revision) else {
                break;
            };
            while self
                .history
                .front()
                .is_some_and(|e| e.mod_revision == dropped)
            {
                self.history.pop_front();
            }
            self.oldest = dropped + 1;
        }
    }
}

#[async_trait]
impl Registry for LocalRegistry {
    async fn get(&self, key: &str) -> Result<Option<KeyValue>, RegistryError> {
        Ok(self.inner.lock().kv.get(key).cloned())
    }

    async fn list_pages(
        &self,
        prefix: &str,
        page: &mut (dyn FnMut(Vec<KeyValue>) + Send),
    ) -> Result<Revision, RegistryError> {
        let state = self.inner.lock();
        let mut entries = state.under(prefix).cloned().peekable();
        while entries.peek().is_some() {
            page(entries.by_ref().take(LIST_PAGE).collect());
        }
        Ok(state.revision)
    }

    async fn txn(
        &self,
        compares: Vec<Compare>,
        ops: Vec<Op>,
    ) -> Result<Option<Revision>, RegistryError> {
        self.blocking(move |inner| inner.apply(compares, ops)).await
    }

    async fn watch(&self, prefix: &str, from: Revision) -> Result<Watcher, RegistryError> {
        let mut state = self.inner.lock();
        let from = if from == 0 { state.revision + 1 } else { from };
        if from < state.oldest {
            return Err(RegistryError::Compacted {
                requested: from,
                oldest: state.oldest,
            });
        }
        let (tx, rx) = mpsc::unbounded_channel();
        for event in state
            .history
            .iter()
            .filter(|e| e.mod_revision >= from && e.key.starts_with(prefix))
        {
            // The receiver is still in hand, so this send cannot fail.
            let _ = tx.send(Ok(event.clone()));
        }
        state.watchers.push((prefix.to_owned(), tx));
        Ok(Watcher::new(rx))
    }

    async fn grant_lease(&self, ttl: Duration) -> Result<LeaseId, RegistryError> {
        let mut state = self.inner.lock();
        let id = state.next_lease;
        state.next_lease += 1;
        let lease = Lease {
            ttl,
            deadline: Instant::now() + ttl,
            keys: BTreeSet::new(),
        };
        state.leases.insert(id, lease);
        Ok(id)
    }

    async fn keep_alive(&self, lease: LeaseId) -> Result<(), RegistryError> {
        let mut state = self.inner.lock();
        let lease = state
            .leases
            .get_mut(&lease)
            .ok_or(RegistryError::LeaseNotFound(lease))?;
        lease.deadline = Instant::now() + lease.ttl;
        Ok(())
    }

    async fn revoke_lease(&self, lease: LeaseId) -> Result<(), RegistryError> {
        self.blocking(move |inner| inner.revoke(lease)).await
    }

    async fn campaign(
        &self,
        election: &str,
        value: Vec<u8>,
        lease: LeaseId,
    ) -> Result<LeaderKey, RegistryError> {
        let prefix = format!("{election}/");
        let key = format!("{prefix}{lease:x}");
        // Watching before standing, so that no deletion in between goes unseen.
        let mut changes = self.watch(&prefix, 0).await?;
        let candidate = key.clone();
        let create_revision = self
            .blocking(move |inner| inner.stand(&candidate, value, lease))
            .await?;
        while !self.inner.leads(&prefix, lease, create_revision)? {
            match changes.next().await {
                Some(Ok(_)) => {}
                Some(Err(err)) => return Err(err),
                None => {
                    return Err(RegistryError::Unavailable(
                        "the registry closed the election's watch".into(),
                    ));
                }
            }
        }
        Ok(LeaderKey {
            election: election.to_owned(),
            key,
            lease,
            create_revision,
        })
    }

    async fn leader(&self, election: &str) -> Result<Option<Vec<u8>>, RegistryError> {
        let prefix = format!("{election}/");
        let state = self.inner.lock();
        let first = state.under(&prefix).min_by_key(|kv| kv.create_revision);
        Ok(first.map(|kv| kv.value.clone()))
    }

    async fn resign(&self, leader: &LeaderKey) -> Result<(), RegistryError> {
        let leader = leader.clone();
        self.blocking(move |inner| inner.resign(&leader)).await
    }
}
