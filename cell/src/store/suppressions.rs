//! Each tenant's suppression list, keyed by the address's suppression key (case folded),
//! each write indexed by when it was made so that a move copies only the changes.

use cellmail_proto::{MessageId, SuppressionReason, TenantId, suppression_key};
use serde::{Deserialize, Serialize};

use super::{SUPPRESSIONS, Store, Tables, Write, err, json, parse, written_now};
use crate::commit::{Commit, StorageError};

/// One entry of a tenant's suppression list.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Suppressed {
    pub address: String,
    pub reason: SuppressionReason,
    pub at_ms: u64,
    /// The message whose feedback put it there.
    pub message_id: Option<MessageId>,
}

pub(super) fn suppress(
    t: &mut Tables,
    tenant: &TenantId,
    entry: &Suppressed,
) -> Result<(), StorageError> {
    let key = suppression_key(&entry.address);
    t.suppressions
        .insert((tenant.as_str(), key.as_str()), json(entry).as_slice())
        .map_err(err)?;
    written_now(&mut t.recent_suppressions, tenant, &key)
}

/// Whether `address` was on `tenant`'s list.
pub(super) fn unsuppress(
    t: &mut Tables,
    tenant: &TenantId,
    address: &str,
) -> Result<bool, StorageError> {
    let key = suppression_key(address);
    let removed = t
        .suppressions
        .remove((tenant.as_str(), key.as_str()))
        .map_err(err)?
        .is_some();
    if removed {
        written_now(&mut t.recent_suppressions, tenant, &key)?;
    }
    Ok(removed)
}

impl Store {
    pub async fn suppress(&self, tenant: &TenantId, entry: Suppressed) -> Result<(), StorageError> {
        self.found(
            Write::Suppress {
                tenant: tenant.clone(),
                entry,
            },
            Commit::Durable,
        )
        .await
        .map(|_| ())
    }

    /// Removes `address` from `tenant`'s list; false if it was not there.
    pub async fn unsuppress(&self, tenant: &TenantId, address: &str) -> Result<bool, StorageError> {
        self.found(
            Write::Unsuppress {
                tenant: tenant.clone(),
                address: address.to_owned(),
            },
            Commit::Durable,
        )
        .await
    }

    /// `tenant`'s entries for each of `addresses` (in order), in one read.
    pub fn suppressions_of(
        &self,
        tenant: &TenantId,
        addresses: &[&str],
    ) -> Result<Vec<Option<Suppressed>>, StorageError> {
        let read = self.read()?;
        let table = read.open_table(SUPPRESSIONS).map_err(err)?;
        addresses
            .iter()
            .map(|address| {
                match table
                    .get((tenant.as_str(), suppression_key(address).as_str()))
                    .map_err(err)?
                {
                    Some(row) => parse(row.value()).map(Some),
                    None => Ok(None),
                }
            })
            .collect()
    }

    /// Up to `limit` of `tenant`'s entries after suppression key `after`, in key order.
    pub fn list_suppressions(
        &self,
        tenant: &TenantId,
        after: &str,
        limit: usize,
    ) -> Result<Vec<Suppressed>, StorageError> {
        let read = self.read()?;
        let table = read.open_table(SUPPRESSIONS).map_err(err)?;
        let start = (tenant.as_str(), after);
        let mut entries = Vec::new();
        for row in table.range(start..).map_err(err)? {
            let (key, value) = row.map_err(err)?;
            let (owner, address) = key.value();
            if owner != tenant.as_str() || entries.len() == limit {
                break;
            }
            if address != after {
                entries.push(parse(value.value())?);
            }
        }
        Ok(entries)
    }
}
