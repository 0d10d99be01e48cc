//! The cell's own durable state, kept on the cell's volume whatever its queue and mailer:
//! the idempotency window (tenant + key -> the first answer) and each message's delivery
//! outcome (which also stops a redelivered message from being sent twice).
//!
//! An idempotency key is reserved durably *before* its message is queued, and completed
//! after. A crash between the two leaves a pending reservation; the retry re-queues the same
//! message id, and the worker's outcome check keeps that from becoming a second send.

use std::path::Path;
use std::sync::Arc;
use std::time::Duration;

use cellmail_proto::{MessageId, TenantId};
use redb::{Database, ReadableDatabase, ReadableTable, TableDefinition, WriteTransaction};
use serde::{Deserialize, Serialize};

use crate::commit::{GroupCommit, StorageError};
use crate::message::Accepted;

/// (tenant, idempotency key) -> JSON [`KeyRecord`]
const IDEMPOTENCY: TableDefinition<(&str, &str), &[u8]> = TableDefinition::new("idempotency");
/// message id -> JSON [`Outcome`]
const OUTCOMES: TableDefinition<&str, &[u8]> = TableDefinition::new("outcomes");

/// How long an idempotency key is remembered.
pub const IDEMPOTENCY_WINDOW: Duration = Duration::from_secs(24 * 3600);

#[derive(Debug, Clone, Serialize, Deserialize)]
struct KeyRecord {
    message_id: MessageId,
    reserved_at_ms: u64,
    /// `None` while the message is not yet known to be queued.
    accepted: Option<Accepted>,
}

/// What a reservation of an idempotency key found.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Reservation {
    /// The key is new; it is now reserved for the given message id.
    New,
    /// An earlier attempt reserved the key but may not have queued its message: queue it
    /// again under this id.
    Pending(MessageId),
    /// Already accepted: answer this again and queue nothing.
    Done(Accepted),
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case", tag = "state")]
pub enum Outcome {
    Sent { at_ms: u64 },
    Failed { at_ms: u64, reason: String },
}

enum Write {
    Reserve {
        tenant: TenantId,
        key: String,
        message_id: MessageId,
        now_ms: u64,
    },
    Complete {
        tenant: TenantId,
        key: String,
        accepted: Accepted,
        now_ms: u64,
    },
    Outcome {
        message_id: MessageId,
        outcome: Outcome,
    },
}

fn json<T: Serialize>(value: &T) -> Vec<u8> {
    // Plain structs of strings and numbers always serialize.
    serde_json::to_vec(value).unwrap_or_default()
}

fn apply(txn: &WriteTransaction, write: Write) -> Result<Option<Reservation>, StorageError> {
    match write {
        Write::Reserve {
            tenant,
            key,
            message_id,
            now_ms,
        } => {
            let mut table = txn
                .open_table(IDEMPOTENCY)
                .map_err(StorageError::from_display)?;
            let found: Option<KeyRecord> = table
                .get((tenant.as_str(), key.as_str()))
                .map_err(StorageError::from_display)?
                .and_then(|v| serde_json::from_slice(v.value()).ok())
                .filter(|r: &KeyRecord| {
                    now_ms.saturating_sub(r.reserved_at_ms) < IDEMPOTENCY_WINDOW.as_millis() as u64
                });
            let reservation = match found {
                Some(KeyRecord {
                    accepted: Some(accepted),
                    ..
                }) => Reservation::Done(accepted),
                Some(KeyRecord { message_id, .. }) => Reservation::Pending(message_id),
                None => {
                    let record = KeyRecord {
                        message_id,
                        reserved_at_ms: now_ms,
                        accepted: None,
                    };
                    table
                        .insert((tenant.as_str(), key.as_str()), json(&record).as_slice())
                        .map_err(StorageError::from_display)?;
                    Reservation::New
                }
            };
            Ok(Some(reservation))
        }
        Write::Complete {
            tenant,
            key,
            accepted,
            now_ms,
        } => {
            let mut table = txn
                .open_table(IDEMPOTENCY)
                .map_err(StorageError::from_display)?;
            let record = KeyRecord {
                message_id: accepted.message_id,
                reserved_at_ms: now_ms,
                accepted: Some(accepted),
            };
            table
                .insert((tenant.as_str(), key.as_str()), json(&record).as_slice())
                .map_err(StorageError::from_display)?;
            Ok(None)
        }
        Write::Outcome {
            message_id,
            outcome,
        } => {
            let mut table = txn
                .open_table(OUTCOMES)
                .map_err(StorageError::from_display)?;
            table
                .insert(message_id.to_string().as_str(), json(&outcome).as_slice())
                .map_err(StorageError::from_display)?;
            Ok(None)
        }
    }
}

pub struct Store {
    db: Arc<Database>,
    writes: GroupCommit<Write, Option<Reservation>>,
}

impl Store {
    pub fn open(path: &Path) -> Result<Self, StorageError> {
        let db = Arc::new(Database::create(path).map_err(StorageError::from_display)?);
        let txn = db.begin_write().map_err(StorageError::from_display)?;
        txn.open_table(IDEMPOTENCY)
            .map_err(StorageError::from_display)?;
        txn.open_table(OUTCOMES)
            .map_err(StorageError::from_display)?;
        txn.commit().map_err(StorageError::from_display)?;
        let writes = GroupCommit::start("store", db.clone(), apply)?;
        Ok(Self { db, writes })
    }

    /// Durably reserves `key` for `message_id` unless an earlier send holds it.
    pub async fn reserve(
        &self,
        tenant: &TenantId,
        key: &str,
        message_id: MessageId,
        now_ms: u64,
    ) -> Result<Reservation, StorageError> {
        let write = Write::Reserve {
            tenant: tenant.clone(),
            key: key.to_owned(),
            message_id,
            now_ms,
        };
        self.writes
            .submit(write)
            .await?
            .ok_or_else(|| StorageError("reserve returned nothing".into()))
    }

    /// Records the answer given for `key`, so retries get it without queueing anything.
    /// Not fsynced on its own: if a crash loses it, the key is found pending, the retry
    /// queues the same message id again, and the worker's outcome check sends it once.
    pub async fn complete(
        &self,
        tenant: &TenantId,
        key: &str,
        accepted: Accepted,
        now_ms: u64,
    ) -> Result<(), StorageError> {
        let write = Write::Complete {
            tenant: tenant.clone(),
            key: key.to_owned(),
            accepted,
            now_ms,
        };
        self.writes.submit_lazy(write).await.map(|_| ())
    }

    pub async fn record_outcome(
        &self,
        message_id: MessageId,
        outcome: Outcome,
    ) -> Result<(), StorageError> {
        self.writes
            .submit(Write::Outcome {
                message_id,
                outcome,
            })
            .await
            .map(|_| ())
    }

    pub fn outcome(&self, message_id: MessageId) -> Result<Option<Outcome>, StorageError> {
        let read = self.db.begin_read().map_err(StorageError::from_display)?;
        let table = read
            .open_table(OUTCOMES)
            .map_err(StorageError::from_display)?;
        let row = table
            .get(message_id.to_string().as_str())
            .map_err(StorageError::from_display)?;
        row.map(|v| serde_json::from_slice(v.value()).map_err(StorageError::from_display))
            .transpose()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn accepted(id: MessageId) -> Accepted {
        Accepted {
            message_id: id,
            recipients: vec!["a@example.com".into()],
        }
    }

    #[tokio::test]
    async fn a_key_is_new_then_pending_then_done_and_survives_reopen() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("store.redb");
        let tenant = TenantId::new("t").unwrap();
        let (first, second) = (MessageId::generate(), MessageId::generate());
        {
            let store = Store::open(&path).unwrap();
            assert_eq!(
                store.reserve(&tenant, "k", first, 1_000).await.unwrap(),
                Reservation::New
            );
            assert_eq!(
                store.reserve(&tenant, "k", second, 1_001).await.unwrap(),
                Reservation::Pending(first)
            );
            store
                .complete(&tenant, "k", accepted(first), 1_002)
                .await
                .unwrap();
        }
        let store = Store::open(&path).unwrap();
        assert_eq!(
            store.reserve(&tenant, "k", second, 1_003).await.unwrap(),
            Reservation::Done(accepted(first))
        );
        let other = TenantId::new("other").unwrap();
        assert_eq!(
            store.reserve(&other, "k", second, 1_004).await.unwrap(),
            Reservation::New,
            "keys are per tenant"
        );
    }

    #[tokio::test]
    async fn a_key_past_the_window_is_new_again() {
        let dir = tempfile::tempdir().unwrap();
        let store = Store::open(&dir.path().join("store.redb")).unwrap();
        let tenant = TenantId::new("t").unwrap();
        let id = MessageId::generate();
        store.reserve(&tenant, "k", id, 0).await.unwrap();
        store.complete(&tenant, "k", accepted(id), 0).await.unwrap();
        let later = IDEMPOTENCY_WINDOW.as_millis() as u64 + 1;
        assert_eq!(
            store
                .reserve(&tenant, "k", MessageId::generate(), later)
                .await
                .unwrap(),
            Reservation::New
        );
    }

    #[tokio::test]
    async fn outcomes_are_recorded_per_message() {
        let dir = tempfile::tempdir().unwrap();
        let store = Store::open(&dir.path().join("store.redb")).unwrap();
        let (sent, other) = (MessageId::generate(), MessageId::generate());
        store
            .record_outcome(sent, Outcome::Sent { at_ms: 5 })
            .await
            .unwrap();
        assert_eq!(
            store.outcome(sent).unwrap(),
            Some(Outcome::Sent { at_ms: 5 })
        );
        assert_eq!(store.outcome(other).unwrap(), None);
    }
}
