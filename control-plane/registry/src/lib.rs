//! cellmail's shared state: the placement registry every program reads, and what is kept in
//! it. Router, cells and control plane all depend on this crate; it depends on none of them.
//!
//! The registry is a revisioned key-value store with compare-and-swap, watches and leases,
//! shaped like etcd v3 so that the production implementation is a thin adapter.
//!
//! Every change bumps the store's revision; each key remembers the revision that created and
//! last modified it. [`Registry::txn`] applies a set of puts and deletes atomically when every
//! key is still at the mod revision the caller read (0 = absent), which is how placements are
//! changed. [`Registry::watch`] replays every change from a revision in order, and answers
//! [`RegistryError::Compacted`] when that revision is no longer kept, so the caller resyncs.
//! Keys bound to a lease disappear when the lease is not kept alive.
//!
//! Leader election follows etcd's election recipe: a candidate writes `<election>/<lease id
//! in hex>` bound to its lease, and leads once every key under `<election>/` created before
//! its own is gone. Candidates therefore lead in the order they campaigned, and leadership
//! ends with the lease (or [`Registry::resign`]).
//!
//! - [`etcd`]: the production `Registry`, over etcd v3.
//! - [`local`]: the embedded `Registry`, persisted to one file.
//! - [`config`]: which registry a binary opens, from flags or env.
//! - [`schema`]: the registry's key layout and record types.
//! - [`catalog`]: the typed, watch-fed view of the registry that routers and cells serve from.
//! - [`apikey`]: issuing and hashing tenant API keys.
//! - [`operators`]: named operator credentials (admin or viewer), stored hashed.
//! - [`audit`]: the trail of control actions and breaker trips.
//! - [`channels`]: gRPC channels to cells, shared by everything that calls one.
//! - [`dkim`]: tenants' domains' own DKIM keys, sealed in the registry.

pub mod apikey;
pub mod audit;
pub mod catalog;
pub mod channels;
pub mod config;
pub mod dkim;
pub mod etcd;
pub mod local;
pub mod operators;
pub mod schema;
pub mod tracking;

use std::time::Duration;

use async_trait::async_trait;
use cellmail_proto::ApiError;
use tokio::sync::mpsc;

pub type Revision = u64;
pub type LeaseId = u64;

/// Keys per page of [`Registry::list_pages`].
pub const LIST_PAGE: usize = 1_000;

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct KeyValue {
    pub key: String,
    pub value: Vec<u8>,
    pub create_revision: Revision,
    pub mod_revision: Revision,
    pub lease: Option<LeaseId>,
}

/// A consistent read of a prefix at one revision.
#[derive(Debug, Clone, Default)]
pub struct Snapshot {
    pub revision: Revision,
    pub entries: Vec<KeyValue>,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Op {
    Put {
        key: String,
        value: Vec<u8>,
        lease: Option<LeaseId>,
    },
    Delete {
        key: String,
    },
}

/// The condition of a transaction: `key` is at `mod_revision` (0 means the key is absent).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Compare {
    pub key: String,
    pub mod_revision: Revision,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum EventKind {
    Put,
    Delete,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct WatchEvent {
    pub kind: EventKind,
    pub key: String,
    /// Empty for a delete.
    pub value: Vec<u8>,
    pub mod_revision: Revision,
}

/// A candidacy in an election, as [`Registry::campaign`] returns it once it leads.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct LeaderKey {
    /// The election (key prefix) campaigned in.
    pub election: String,
    /// The candidate's key: `<election>/<lease id in hex>`. Leadership ends when it is deleted.
    pub key: String,
    /// The lease the key is bound to.
    pub lease: LeaseId,
    /// The key's create revision: its place in the line of candidates, and what resigning
    /// compares so that only this candidacy is given up.
    pub create_revision: Revision,
}

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum RegistryError {
    #[error("revision {requested} is compacted (oldest kept: {oldest}); resync from a fresh list")]
    Compacted {
        requested: Revision,
        oldest: Revision,
    },
    #[error("lease {0} is unknown or expired")]
    LeaseNotFound(LeaseId),
    /// Retryable: the registry could not be reached or did not answer in time.
    #[error("registry unavailable: {0}")]
    Unavailable(String),
    /// The registry's storage failed; not retryable without an operator.
    #[error("registry storage failed: {0}")]
    Storage(String),
}

/// A registry failure as a call's answer: unavailable is retryable, the rest is internal.
impl From<RegistryError> for ApiError {
    fn from(err: RegistryError) -> Self {
        match err {
            RegistryError::Unavailable(reason) => {
                ApiError::Unavailable(format!("registry unavailable: {reason}"))
            }
            other => ApiError::Internal(other.to_string()),
        }
    }
}

/// The events of one watch, in revision order. Ends (`None`) when the registry closes it;
/// an `Err` item ends it too and says why.
pub struct Watcher {
    rx: mpsc::UnboundedReceiver<Result<WatchEvent, RegistryError>>,
}

impl Watcher {
    pub fn new(rx: mpsc::UnboundedReceiver<Result<WatchEvent, RegistryError>>) -> Self {
        Self { rx }
    }

    pub async fn next(&mut self) -> Option<Result<WatchEvent, RegistryError>> {
        self.rx.recv().await
    }
}

#[async_trait]
pub trait Registry: Send + Sync + 'static {
    async fn get(&self, key: &str) -> Result<Option<KeyValue>, RegistryError>;

    /// Every key under `prefix`, with the store revision the read was made at.
    async fn list(&self, prefix: &str) -> Result<Snapshot, RegistryError> {
        let mut entries = Vec::new();
        let revision = self
            .list_pages(prefix, &mut |page| entries.extend(page))
            .await?;
        Ok(Snapshot { revision, entries })
    }

    /// Every key under `prefix` in key order, handed to `page` some at a time, each page
    /// dropped before the next is read; all of it read at one revision, which is returned.
    /// For readers that keep less than the whole prefix (a catalog keeps what it parsed).
    async fn list_pages(
        &self,
        prefix: &str,
        page: &mut (dyn FnMut(Vec<KeyValue>) + Send),
    ) -> Result<Revision, RegistryError>;

    /// Applies `ops` atomically when every compare holds: `Some(new revision)`, or `None`
    /// (nothing written) when one did not.
    async fn txn(
        &self,
        compares: Vec<Compare>,
        ops: Vec<Op>,
    ) -> Result<Option<Revision>, RegistryError>;

    /// Every change under `prefix` from revision `from` on (0: from the next change).
    async fn watch(&self, prefix: &str, from: Revision) -> Result<Watcher, RegistryError>;

    async fn grant_lease(&self, ttl: Duration) -> Result<LeaseId, RegistryError>;

    async fn keep_alive(&self, lease: LeaseId) -> Result<(), RegistryError>;

    async fn revoke_lease(&self, lease: LeaseId) -> Result<(), RegistryError>;

    /// Campaigns in `election` (a key prefix, e.g. `<prefix>election/control`) with `value`,
    /// bound to `lease`: resolves once this candidate leads, i.e. every candidate that
    /// campaigned earlier is gone (its lease expired or it resigned). Leadership lasts as long
    /// as the lease, so the caller keeps the lease alive while it waits and while it leads.
    /// Campaigning again on the same lease keeps the candidacy (and its place in line) and
    /// only replaces the value. Dropping the future may leave the candidacy in place until
    /// the lease ends; [`Registry::resign`] or revoking the lease removes it at once.
    async fn campaign(
        &self,
        election: &str,
        value: Vec<u8>,
        lease: LeaseId,
    ) -> Result<LeaderKey, RegistryError>;

    /// The value of the current leader of `election`, if there is one.
    async fn leader(&self, election: &str) -> Result<Option<Vec<u8>>, RegistryError>;

    /// Gives leadership (or a pending candidacy) up at once. A candidacy that already ended
    /// is not an error.
    async fn resign(&self, leader: &LeaderKey) -> Result<(), RegistryError>;

    async fn put(
        &self,
        key: &str,
        value: Vec<u8>,
        lease: Option<LeaseId>,
    ) -> Result<Revision, RegistryError> {
        let op = Op::Put {
            key: key.to_owned(),
            value,
            lease,
        };
        let revision = self.txn(Vec::new(), vec![op]).await?;
        revision.ok_or_else(|| RegistryError::Storage("unconditional put was refused".into()))
    }

    async fn delete(&self, key: &str) -> Result<(), RegistryError> {
        self.txn(
            Vec::new(),
            vec![Op::Delete {
                key: key.to_owned(),
            }],
        )
        .await?;
        Ok(())
    }

    /// Writes `value` only if `key` is still at `mod_revision` (0: absent).
    async fn compare_and_swap(
        &self,
        key: &str,
        mod_revision: Revision,
        value: Vec<u8>,
    ) -> Result<Option<Revision>, RegistryError> {
        let compare = Compare {
            key: key.to_owned(),
            mod_revision,
        };
        let op = Op::Put {
            key: key.to_owned(),
            value,
            lease: None,
        };
        self.txn(vec![compare], vec![op]).await
    }
}

/// Keeps `lease` alive every third of its `ttl` until `stop` resolves or the lease is lost.
pub async fn keep_lease_alive(
    registry: &dyn Registry,
    lease: LeaseId,
    ttl: Duration,
    stop: impl std::future::Future<Output = ()>,
) -> Result<(), RegistryError> {
    tokio::pin!(stop);
    let mut tick = tokio::time::interval(ttl / 3);
    loop {
        tokio::select! {
            () = &mut stop => return Ok(()),
            _ = tick.tick() => match registry.keep_alive(lease).await {
                Ok(()) => {}
                Err(RegistryError::Unavailable(reason)) => tracing::warn!(%reason, lease, "lease keepalive failed; retrying"),
                Err(err) => return Err(err),
            },
        }
    }
}
