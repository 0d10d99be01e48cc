//! Named operator credentials: `cma_<secret>`, 256 bits from the OS generator, each with a
//! name and a role (admin or viewer). Only the SHA-256 of a credential is stored, as the
//! registry key `operators/<hash>`; the control plane looks the credential of each call up
//! there, and the audit trail names the credential. The one a deployment starts with (its
//! `--admin-token`) is the admin named `bootstrap`.

use rand::RngCore;

use crate::apikey::hash;
use crate::schema::{self, Keys, OperatorRecord, OperatorRole};
use crate::{Op, Registry, RegistryError};

/// The name of the credential a deployment starts with.
pub const BOOTSTRAP: &str = "bootstrap";

/// A fresh credential: 256 bits from the OS generator.
pub fn generate() -> String {
    let mut secret = [0u8; 32];
    rand::rng().fill_bytes(&mut secret);
    format!("cma_{}", hex::encode(secret))
}

/// The operator whose credential `credential` is, if any.
pub async fn find(
    registry: &dyn Registry,
    keys: &Keys,
    credential: &str,
) -> Result<Option<OperatorRecord>, RegistryError> {
    let Some(kv) = registry.get(&keys.operator(&hash(credential))).await? else {
        return Ok(None);
    };
    Ok(schema::decode(&kv.value).ok())
}

/// Every operator, with the registry key of its credential.
pub async fn list(
    registry: &dyn Registry,
    keys: &Keys,
) -> Result<Vec<(String, OperatorRecord)>, RegistryError> {
    let listed = registry.list(&keys.operators()).await?;
    Ok(listed
        .entries
        .into_iter()
        .filter_map(|kv| Some((kv.key, schema::decode(&kv.value).ok()?)))
        .collect())
}

/// Makes `credential` the `bootstrap` admin's, replacing an earlier bootstrap credential (a
/// rotated `--admin-token`). Several control planes starting with the same one agree.
pub async fn install_bootstrap(
    registry: &dyn Registry,
    keys: &Keys,
    credential: &str,
    now_ms: u64,
) -> Result<(), RegistryError> {
    let key = keys.operator(&hash(credential));
    let mut ops: Vec<Op> = list(registry, keys)
        .await?
        .into_iter()
        .filter(|(other, record)| record.name == BOOTSTRAP && *other != key)
        .map(|(other, _)| Op::Delete { key: other })
        .collect();
    if registry.get(&key).await?.is_none() {
        let record = OperatorRecord {
            name: BOOTSTRAP.into(),
            role: OperatorRole::Admin,
            created_at_ms: now_ms,
        };
        ops.push(Op::Put {
            key,
            value: schema::encode(&record),
            lease: None,
        });
    }
    if !ops.is_empty() {
        registry.txn(Vec::new(), ops).await?;
    }
    Ok(())
}
