//! The audit trail: every control action and every breaker trip, kept under `audit/` in
//! time order. An entry is written in the same transaction as the change it records, so
//! there is no change without its entry.

use cellmail_proto::TenantId;
use serde::Serialize;

use crate::schema::{self, AuditRecord, Keys};
use crate::{Compare, Op, Registry, RegistryError, Revision};

/// The entry recording that `actor` did `action` (to `tenant`, when it is a tenant's) for
/// `reason`, changing `before` into `after`, now.
pub fn entry(
    (actor, reason): (String, String),
    action: &str,
    tenant: Option<&TenantId>,
    before: Option<serde_json::Value>,
    after: Option<serde_json::Value>,
) -> AuditRecord {
    AuditRecord {
        at_ms: cellmail_proto::now_ms(),
        actor,
        action: action.to_owned(),
        tenant: tenant.cloned(),
        reason,
        before,
        after,
    }
}

/// The write that records `entry`, to put in the transaction of the change itself.
pub fn entry_op(keys: &Keys, entry: &AuditRecord) -> Op {
    Op::Put {
        key: keys.audit_entry(entry.at_ms, &ulid::Ulid::new().to_string()),
        value: schema::encode(entry),
        lease: None,
    }
}

/// Writes `value` at `key` if the key is still at `mod_revision` (0: absent), with `entry` in
/// the same transaction: `false` when the key changed meanwhile and nothing was written.
pub async fn write(
    registry: &dyn Registry,
    keys: &Keys,
    key: &str,
    mod_revision: Revision,
    value: Vec<u8>,
    entry: &AuditRecord,
) -> Result<bool, RegistryError> {
    let put = Op::Put {
        key: key.to_owned(),
        value,
        lease: None,
    };
    change(registry, keys, key, mod_revision, put, entry).await
}

/// Deletes `key` if it is still at `mod_revision`, with `entry` in the same transaction:
/// `false` when the key changed meanwhile and nothing was deleted.
pub async fn remove(
    registry: &dyn Registry,
    keys: &Keys,
    key: &str,
    mod_revision: Revision,
    entry: &AuditRecord,
) -> Result<bool, RegistryError> {
    let delete = Op::Delete {
        key: key.to_owned(),
    };
    change(registry, keys, key, mod_revision, delete, entry).await
}

async fn change(
    registry: &dyn Registry,
    keys: &Keys,
    key: &str,
    mod_revision: Revision,
    op: Op,
    entry: &AuditRecord,
) -> Result<bool, RegistryError> {
    let compare = Compare {
        key: key.to_owned(),
        mod_revision,
    };
    let changed = registry
        .txn(vec![compare], vec![op, entry_op(keys, entry)])
        .await?;
    Ok(changed.is_some())
}

/// A record as it goes into an entry's `before` or `after`.
pub fn snapshot<T: Serialize>(record: &T) -> Option<serde_json::Value> {
    serde_json::to_value(record).ok()
}

/// The newest `limit` entries (of `tenant` only, when given), oldest first.
pub async fn list(
    registry: &dyn Registry,
    keys: &Keys,
    tenant: Option<&TenantId>,
    limit: usize,
) -> Result<Vec<AuditRecord>, RegistryError> {
    let snapshot = registry.list(&keys.audit()).await?;
    let mut entries: Vec<AuditRecord> = snapshot
        .entries
        .iter()
        .filter_map(|kv| schema::decode::<AuditRecord>(&kv.value).ok())
        .filter(|entry| tenant.is_none() || entry.tenant.as_ref() == tenant)
        .collect();
    let skip = entries.len().saturating_sub(limit);
    entries.drain(..skip);
    Ok(entries)
}
