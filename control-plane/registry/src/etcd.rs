//! The production registry: etcd v3 through etcd-client (etcd 3.4 or newer).
//!
//! Every trait operation is one etcd request; transactions are etcd transactions comparing
//! mod revisions (etcd treats an absent key as revision 0), so the semantics match the
//! embedded registry exactly. Transport failures and timeouts are `Unavailable`, which
//! callers retry; a watch that starts at a compacted revision is `Compacted`.
//!
//! Elections are etcd's own election service. A campaign is one request that etcd answers
//! only when the candidate leads, so it goes over a second connection without the request
//! timeout: a timed-out campaign makes etcd withdraw the candidacy, and the candidate would
//! lose its place in line every few seconds.

use std::time::Duration;

use async_trait::async_trait;
use etcd_client::{
    Client, Compare as EtcdCompare, CompareOp, ConnectOptions, EventType, GetOptions, PutOptions,
    ResignOptions, Txn, TxnOp, WatchOptions,
};
use tokio::sync::mpsc;

use crate::{
    Compare, EventKind, KeyValue, LIST_PAGE, LeaderKey, LeaseId, Op, Registry, RegistryError,
    Revision, WatchEvent, Watcher,
};

const REQUEST_TIMEOUT: Duration = Duration::from_secs(3);
const CONNECT_TIMEOUT: Duration = Duration::from_secs(2);
const KEEPALIVE: Duration = Duration::from_secs(2);

pub struct EtcdRegistry {
    client: Client,
    /// For campaigns only: no request timeout (see the module doc).
    campaigns: Client,
}

fn error(err: etcd_client::Error) -> RegistryError {
    match err {
        etcd_client::Error::GRpcStatus(status)
            if !matches!(
                status.code(),
                tonic::Code::Unavailable
                    | tonic::Code::DeadlineExceeded
                    | tonic::Code::Cancelled
                    | tonic::Code::Unknown
            ) =>
        {
            RegistryError::Storage(format!("etcd: {:?} {}", status.code(), status.message()))
        }
        other => RegistryError::Unavailable(format!("etcd: {other}")),
    }
}

/// etcd answers NotFound for a lease that expired or never was (put with a lease, revoke).
/// Its election service passes that error on as a plain Go error, which gRPC carries as code
/// Unknown: there the message is all there is.
fn lease_not_found(err: &etcd_client::Error) -> bool {
    matches!(err, etcd_client::Error::GRpcStatus(status)
        if status.code() == tonic::Code::NotFound
            || (status.code() == tonic::Code::Unknown
                && status.message() == "etcdserver: requested lease not found"))
}

/// etcd's election service answers an election without candidates with its Go error
/// `election: no leader`, which gRPC carries as code Unknown: the message is all there is.
fn no_leader(err: &etcd_client::Error) -> bool {
    matches!(err, etcd_client::Error::GRpcStatus(status)
        if status.code() == tonic::Code::Unknown && status.message() == "election: no leader")
}

/// The first key after every key that starts with `prefix` (etcd's range end of a prefix).
fn prefix_end(prefix: &str) -> Vec<u8> {
    let mut end = prefix.as_bytes().to_vec();
    while let Some(last) = end.pop() {
        if last < u8::MAX {
            end.push(last + 1);
            return end;
        }
    }
    // Every byte was 0xff (or the prefix was empty): to the end of the key space.
    vec![0]
}

fn revision(header: Option<&etcd_client::ResponseHeader>) -> Revision {
    header.map_or(0, |h| h.revision().max(0) as Revision)
}

fn key_value(kv: &etcd_client::KeyValue) -> KeyValue {
    KeyValue {
        key: String::from_utf8_lossy(kv.key()).into_owned(),
        value: kv.value().to_vec(),
        create_revision: kv.create_revision() as Revision,
        mod_revision: kv.mod_revision() as Revision,
        lease: (kv.lease() != 0).then_some(kv.lease() as LeaseId),
    }
}

impl EtcdRegistry {
    /// Connects to any of `endpoints` (`host:port`).
    pub async fn connect(endpoints: &[String]) -> Result<Self, RegistryError> {
        // The HTTP/2 keepalive is what ends a campaign on a dead connection.
        let options = ConnectOptions::new()
            .with_connect_timeout(CONNECT_TIMEOUT)
            .with_keep_alive(KEEPALIVE, KEEPALIVE)
            .with_keep_alive_while_idle(true);
        let client = Client::connect(
            endpoints,
            Some(options.clone().with_timeout(REQUEST_TIMEOUT)),
        )
        .await
        .map_err(error)?;
        let campaigns = Client::connect(endpoints, Some(options))
            .await
            .map_err(error)?;
        Ok(Self { client, campaigns })
    }
}

#[async_trait]
impl Registry for EtcdRegistry {
    async fn get(&self, key: &str) -> Result<Option<KeyValue>, RegistryError> {
        let response = self.client.clone().get(key, None).await.map_err(error)?;
        Ok(response.kvs().first().map(key_value))
    }

    /// A response per page (one must stay under gRPC's 4 MB, whatever the prefix holds: a
    /// catalog of 10,000 tenants is more), every page read at the revision of the first, so
    /// the whole is one consistent read (a compaction past that revision in between fails
    /// it; retry).
    async fn list_pages(
        &self,
        prefix: &str,
        page: &mut (dyn FnMut(Vec<KeyValue>) + Send),
    ) -> Result<Revision, RegistryError> {
        let end = prefix_end(prefix);
        let (mut from, mut at) = (prefix.as_bytes().to_vec(), 0);
        loop {
            let mut options = GetOptions::new()
                .with_range(end.clone())
                .with_limit(LIST_PAGE as i64);
            if at > 0 {
                options = options.with_revision(at as i64);
            }
            let response = self
                .client
                .clone()
                .get(from.clone(), Some(options))
                .await
                .map_err(error)?;
            if at == 0 {
                at = revision(response.header());
            }
            page(response.kvs().iter().map(key_value).collect());
            match response.kvs().last() {
                Some(last) if response.more() => {
                    // The next page starts right after the last key read.
                    from = last.key().to_vec();
                    from.push(0);
                }
                _ => return Ok(at),
            }
        }
    }

    async fn txn(
        &self,
        compares: Vec<Compare>,
        ops: Vec<Op>,
    ) -> Result<Option<Revision>, RegistryError> {
        let compares: Vec<EtcdCompare> = compares
            .into_iter()
            .map(|c| EtcdCompare::mod_revision(c.key, CompareOp::Equal, c.mod_revision as i64))
            .collect();
        let lease = ops.iter().find_map(|op| match op {
            Op::Put { lease, .. } => *lease,
            Op::Delete { .. } => None,
        });
        let ops: Vec<TxnOp> = ops
            .into_iter()
            .map(|op| match op {
                Op::Put { key, value, lease } => {
                    let options = lease.map(|id| PutOptions::new().with_lease(id as i64));
                    TxnOp::put(key, value, options)
                }
                Op::Delete { key } => TxnOp::delete(key, None),
            })
            .collect();
        let txn = Txn::new().when(compares).and_then(ops);
        let response = match self.client.clone().txn(txn).await {
            Ok(response) => response,
            Err(err) if lease_not_found(&err) => {
                return Err(RegistryError::LeaseNotFound(lease.unwrap_or(0)));
            }
            Err(err) => return Err(error(err)),
        };
        Ok(response.succeeded().then(|| revision(response.header())))
    }

    async fn watch(&self, prefix: &str, from: Revision) -> Result<Watcher, RegistryError> {
        let mut options = WatchOptions::new().with_prefix();
        if from > 0 {
            options = options.with_start_revision(from as i64);
        }
        let mut stream = self
            .client
            .clone()
            .watch(prefix, Some(options))
            .await
            .map_err(error)?;
        let (tx, rx) = mpsc::unbounded_channel();
        tokio::spawn(async move {
            loop {
                let response = match stream.message().await {
                    Ok(Some(response)) => response,
                    Ok(None) => return,
                    Err(err) => {
                        let _ = tx.send(Err(error(err)));
                        return;
                    }
                };
                if response.compact_revision() > 0 {
                    let oldest = response.compact_revision() as Revision;
                    let _ = tx.send(Err(RegistryError::Compacted {
                        requested: from,
                        oldest,
                    }));
                    return;
                }
                if response.canceled() {
                    let reason = format!("etcd canceled the watch: {}", response.cancel_reason());
                    let _ = tx.send(Err(RegistryError::Unavailable(reason)));
                    return;
                }
                for event in response.events() {
                    let Some(kv) = event.kv() else { continue };
                    let kind = match event.event_type() {
                        EventType::Put => EventKind::Put,
                        EventType::Delete => EventKind::Delete,
                    };
                    let event = WatchEvent {
                        kind,
                        key: String::from_utf8_lossy(kv.key()).into_owned(),
                        value: if kind == EventKind::Put {
                            kv.value().to_vec()
                        } else {
                            Vec::new()
                        },
                        mod_revision: kv.mod_revision() as Revision,
                    };
                    if tx.send(Ok(event)).is_err() {
                        return;
                    }
                }
            }
        });
        Ok(Watcher::new(rx))
    }

    async fn grant_lease(&self, ttl: Duration) -> Result<LeaseId, RegistryError> {
        let seconds = ttl.as_secs().max(1) as i64;
        let response = self
            .client
            .clone()
            .lease_grant(seconds, None)
            .await
            .map_err(error)?;
        Ok(response.id() as LeaseId)
    }

    async fn keep_alive(&self, lease: LeaseId) -> Result<(), RegistryError> {
        // Opening the keepalive stream already renews the lease once and waits for etcd's
        // answer; etcd-client reports a lease etcd no longer has (TTL 0) as
        // LeaseKeepAliveError, its only source of that error here.
        match self.client.clone().lease_keep_alive(lease as i64).await {
            Ok(_) => Ok(()),
            Err(etcd_client::Error::LeaseKeepAliveError(_)) => {
                Err(RegistryError::LeaseNotFound(lease))
            }
            Err(err) => Err(error(err)),
        }
    }

    async fn revoke_lease(&self, lease: LeaseId) -> Result<(), RegistryError> {
        match self.client.clone().lease_revoke(lease as i64).await {
            Ok(_) => Ok(()),
            Err(err) if lease_not_found(&err) => Err(RegistryError::LeaseNotFound(lease)),

            Err(err) => Err(error(err)),
        }
    }

    async fn campaign(
        &self,
        election: &str,
        value: Vec<u8>,
        lease: LeaseId,
    ) -> Result<LeaderKey, RegistryError> {
        let mut response = match self
            .campaigns
            .election_client()
            .campaign(election, value, lease as i64)
            .await
        {
            Ok(response) => response,
            Err(err) if lease_not_found(&err) => return Err(RegistryError::LeaseNotFound(lease)),
            Err(err) => return Err(error(err)),
        };
        let leader = response.take_leader().ok_or_else(|| {
            RegistryError::Storage("etcd answered a campaign without a leader key".into())
        })?;
        Ok(LeaderKey {
            election: election.to_owned(),
            key: String::from_utf8_lossy(leader.key()).into_owned(),
            lease: leader.lease() as LeaseId,
            create_revision: leader.rev() as Revision,
        })
    }

    async fn leader(&self, election: &str) -> Result<Option<Vec<u8>>, RegistryError> {
        match self.client.election_client().leader(election).await {
            Ok(mut response) => Ok(response.take_kv().map(|kv| kv.value().to_vec())),
            Err(err) if no_leader(&err) => Ok(None),
            Err(err) => Err(error(err)),
        }
    }

    async fn resign(&self, leader: &LeaderKey) -> Result<(), RegistryError> {
        let key = etcd_client::LeaderKey::new()
            .with_name(leader.election.as_str())
            .with_key(leader.key.as_str())
            .with_rev(leader.create_revision as i64)
            .with_lease(leader.lease as i64);
        self.client
            .election_client()
            .resign(Some(ResignOptions::new().with_leader(key)))
            .await
            .map_err(error)?;
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::prefix_end;

    #[test]
    fn a_prefix_ends_at_the_first_key_past_it() {
        assert_eq!(prefix_end("/cellmail/"), b"/cellmail0");
        assert_eq!(prefix_end("a\u{7f}"), b"a\x80");
        assert_eq!(prefix_end(""), [0]);
    }
}
