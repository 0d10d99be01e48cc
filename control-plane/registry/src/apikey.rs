//! Tenant API keys: `cm_<key id>_<secret>`, 256 bits of secret from the OS generator.
//! Only the SHA-256 of the whole key is stored (as the registry key `apikeys/<hash>`); a
//! fast hash is right for keys of this entropy, and it lets the router resolve a key with
//! one map lookup.

use cellmail_proto::TenantId;
use rand::RngCore;
use sha2::{Digest, Sha256};

use crate::schema::{self, ApiKeyRecord, Keys};
use crate::{Registry, RegistryError};

/// Every key record of `tenant`, with its registry key.
pub async fn of_tenant(
    registry: &dyn Registry,
    keys: &Keys,
    tenant: &TenantId,
) -> Result<Vec<(String, ApiKeyRecord)>, RegistryError> {
    let listed = registry.list(&format!("{}apikeys/", keys.prefix())).await?;
    Ok(listed
        .entries
        .into_iter()
        .filter_map(|kv| {
            schema::decode::<ApiKeyRecord>(&kv.value)
                .ok()
                .map(|record| (kv.key, record))
        })
        .filter(|(_, record)| record.tenant == *tenant)
        .collect())
}

pub struct IssuedKey {
    pub plaintext: String,
    pub key_id: String,
    pub hash: String,
}

pub fn issue() -> IssuedKey {
    let mut rng = rand::rng();
    let mut id = [0u8; 6];
    let mut secret = [0u8; 32];
    rng.fill_bytes(&mut id);
    rng.fill_bytes(&mut secret);
    let key_id = hex::encode(id);
    let plaintext = format!("cm_{key_id}_{}", hex::encode(secret));
    let hash = hash(&plaintext);
    IssuedKey {
        plaintext,
        key_id,
        hash,
    }
}

pub fn hash(plaintext: &str) -> String {
    hex::encode(Sha256::digest(plaintext.as_bytes()))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn keys_are_unique_and_hash_to_what_is_stored() {
        let (a, b) = (issue(), issue());
        assert_ne!(a.plaintext, b.plaintext);
        assert_eq!(hash(&a.plaintext), a.hash);
        assert!(!a.hash.contains(&a.plaintext[3..]));
        assert!(a.plaintext.starts_with(&format!("cm_{}_", a.key_id)));
    }
}
