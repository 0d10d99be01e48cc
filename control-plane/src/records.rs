//! Records read straight from the registry rather than through a catalog: one with the
//! revision a compare-and-swap checks ([`read`]), or every readable one under a prefix
//! ([`list`]) for the leader's scans.

use cellmail_proto::ApiError;
use cellmail_registry::schema;
use cellmail_registry::{KeyValue, Registry};

/// The record at `key` and its mod revision.
pub(crate) async fn read<T: serde::de::DeserializeOwned>(
    registry: &dyn Registry,
    key: &str,
) -> Result<Option<(T, u64)>, ApiError> {
    let Some(KeyValue {
        value,
        mod_revision,
        ..
    }) = registry.get(key).await.map_err(ApiError::from)?
    else {
        return Ok(None);
    };
    let record = schema::decode(&value)
        .map_err(|e| ApiError::Internal(format!("unreadable record {key}: {e}")))?;
    Ok(Some((record, mod_revision)))
}

/// The readable records under `prefix`, with their mod revisions (none while the registry
/// cannot be read: the next scan tries again).
pub(crate) async fn list<T: serde::de::DeserializeOwned>(
    registry: &dyn Registry,
    prefix: &str,
) -> Vec<(T, u64)> {
    let listed = match registry.list(prefix).await {
        Ok(listed) => listed,
        Err(err) => {
            tracing::warn!(%err, prefix, "listing failed; retrying");
            return Vec::new();
        }
    };
    listed
        .entries
        .into_iter()
        .filter_map(|kv| match schema::decode(&kv.value) {
            Ok(record) => Some((record, kv.mod_revision)),
            Err(err) => {
                tracing::error!(key = kv.key, %err, "unreadable record ignored");
                None
            }
        })
        .collect()
}
