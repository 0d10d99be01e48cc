//! The registry's key layout and record types.
//!
//! Under a configurable prefix (default `/cellmail/`): `cells/<cell>`, `alive/<cell>` (bound
//! to the cell's lease), `tenants/<tenant>`, `placements/<tenant>`, `apikeys/<sha256 of
//! the key>` and `suppressions/<address, lowercased>` (the operators' global list). Values are JSON so an operator can read them with `etcdctl get`.

use std::collections::BTreeMap;

use cellmail_proto::{CellId, Epoch, SuppressionReason, TenantId};
use serde::{Deserialize, Serialize, de::DeserializeOwned};

pub const DEFAULT_PREFIX: &str = "/cellmail/";

/// Builds and parses registry keys under one prefix.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Keys {
    prefix: String,
}

/// What a registry key names.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Entity {
    Cell(CellId),
    Alive(CellId),
    Tenant(TenantId),
    Placement(TenantId),
    ApiKey(String),
    /// The suppression key of a globally suppressed address.
    GlobalSuppression(String),
}

impl Keys {
    pub fn new(prefix: &str) -> Self {
        let mut prefix = prefix.to_owned();
        if !prefix.ends_with('/') {
            prefix.push('/');
        }
        Self { prefix }
    }

    pub fn prefix(&self) -> &str {
        &self.prefix
    }

    pub fn cells(&self) -> String {
        format!("{}cells/", self.prefix)
    }

    pub fn cell(&self, id: &CellId) -> String {
        format!("{}cells/{id}", self.prefix)
    }

    pub fn alive(&self, id: &CellId) -> String {
        format!("{}alive/{id}", self.prefix)
    }

    pub fn tenant(&self, id: &TenantId) -> String {
        format!("{}tenants/{id}", self.prefix)
    }

    pub fn placement(&self, id: &TenantId) -> String {
        format!("{}placements/{id}", self.prefix)
    }

    pub fn api_key(&self, hash: &str) -> String {
        format!("{}apikeys/{hash}", self.prefix)
    }

    pub fn global_suppressions(&self) -> String {
        format!("{}suppressions/", self.prefix)
    }

    /// `address` must already be a suppression key (lowercased).
    pub fn global_suppression(&self, address: &str) -> String {
        format!("{}suppressions/{address}", self.prefix)
    }

    /// `None` for keys outside the prefix or of kinds this version does not know.
    pub fn parse(&self, key: &str) -> Option<Entity> {
        let (kind, name) = key.strip_prefix(&self.prefix)?.split_once('/')?;
        match kind {
            "cells" => CellId::new(name).ok().map(Entity::Cell),
            "alive" => CellId::new(name).ok().map(Entity::Alive),
            "tenants" => TenantId::new(name).ok().map(Entity::Tenant),
            "placements" => TenantId::new(name).ok().map(Entity::Placement),
            "apikeys" => Some(Entity::ApiKey(name.to_owned())),
            "suppressions" => Some(Entity::GlobalSuppression(name.to_owned())),
            _ => None,
        }
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "SCREAMING_SNAKE_CASE")]
pub enum CellState {
    Active,
    Draining,
    Disabled,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct CellRecord {
    /// `http://host:port` of the cell's gRPC server.
    pub endpoint: String,
    /// How many tenants the cell is sized for.
    pub capacity: u32,
    pub state: CellState,
    #[serde(default)]
    pub labels: BTreeMap<String, String>,
    #[serde(default)]
    pub version: String,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Tier {
    Standard,
    Premium,
}

impl std::str::FromStr for Tier {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, String> {
        match s {
            "" | "standard" => Ok(Tier::Standard),
            "premium" => Ok(Tier::Premium),
            other => Err(format!("unknown tier {other:?} (standard | premium)")),
        }
    }
}

impl Tier {
    pub fn as_str(self) -> &'static str {
        match self {
            Tier::Standard => "standard",
            Tier::Premium => "premium",
        }
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "SCREAMING_SNAKE_CASE")]
pub enum TenantStatus {
    Active,
    Suspended,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct TenantRecord {
    pub tier: Tier,
    pub status: TenantStatus,
    /// Lowercase domains the tenant may send from.
    pub domains: Vec<String>,
    pub created_at_ms: u64,
    #[serde(default)]
    pub policy: Policy,
}

/// A tenant's sending limits.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct Policy {
    /// Sends per second each router admits for the tenant, sustained.
    pub rate_per_second: u32,
    /// Sends a router admits at once above the sustained rate.
    pub burst: u32,
}

impl Default for Policy {
    fn default() -> Self {
        Self {
            rate_per_second: 100,
            burst: 200,
        }
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "SCREAMING_SNAKE_CASE")]
pub enum PlacementState {
    Serving,
    Frozen,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct PlacementRecord {
    pub cell: CellId,
    pub epoch: Epoch,
    pub state: PlacementState,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ApiKeyRecord {
    pub tenant: TenantId,
    /// The public part of the key, shown in listings and audit records.
    pub key_id: String,
    pub created_at_ms: u64,
}

/// An address every tenant's mail skips, set by an operator.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct GlobalSuppressionRecord {
    pub address: String,
    pub reason: SuppressionReason,
    pub created_at_ms: u64,
}

pub fn encode<T: Serialize>(record: &T) -> Vec<u8> {
    // Serializing these plain structs to JSON cannot fail.
    serde_json::to_vec(record).unwrap_or_default()
}

pub fn decode<T: DeserializeOwned>(bytes: &[u8]) -> Result<T, serde_json::Error> {
    serde_json::from_slice(bytes)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn keys_round_trip_and_foreign_keys_are_ignored() {
        let keys = Keys::new("/t1");
        let tenant = TenantId::new("acme").unwrap();
        let cell = CellId::new("cell-1").unwrap();
        assert_eq!(
            keys.parse(&keys.placement(&tenant)),
            Some(Entity::Placement(tenant.clone()))
        );
        assert_eq!(
            keys.parse(&keys.tenant(&tenant)),
            Some(Entity::Tenant(tenant))
        );
        assert_eq!(keys.parse(&keys.alive(&cell)), Some(Entity::Alive(cell)));
        assert_eq!(keys.parse("/t2/tenants/acme"), None);
        assert_eq!(keys.parse("/t1/tenants/NOT VALID"), None);
    }

    #[test]
    fn unknown_tier_is_refused() {
        assert_eq!("".parse::<Tier>(), Ok(Tier::Standard));
        assert!("gold".parse::<Tier>().unwrap_err().contains("gold"));
    }
}
