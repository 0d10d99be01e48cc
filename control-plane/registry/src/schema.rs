//! The registry's key layout and record types.
//!
//! Under a configurable prefix (default `/cellmail/`): `cells/<cell>`, `alive/<cell>` (bound
//! to the cell's lease), `tenants/<tenant>`, `placements/<tenant>`, `apikeys/<sha256 of
//! the key>`, `suppressions/<address, lowercased>` (the operators' global list),
//! `breakers/<tenant>/<class>` (a tripped or resumed breaker), `moves/<tenant>` (the tenant's
//! latest move and the step it reached), `operations/<id>` (an evacuation or a rebalance: the
//! moves it plans and how far it got), `operators/<sha256 of the credential>` (a named operator
//! credential and its role), `tracking/keys` (the keys that sign engagement links) and
//! `audit/<time>-<id>`. Values
//! are JSON so an operator can read them with `etcdctl get`.

use std::collections::BTreeMap;

use cellmail_proto::{CellId, Epoch, MessageClass, SuppressionReason, TenantId, v1};
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
    Breaker(TenantId, MessageClass),
    /// The platform's tracking keys ([`crate::tracking`]).
    TrackingKeys,
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

    /// When a key was last used, kept apart from the key so that its updates stay out of
    /// the catalog: `keyuse/<sha256 of the key>`.
    pub fn operator(&self, hash: &str) -> String {
        format!("{}operators/{hash}", self.prefix)
    }

    pub fn operators(&self) -> String {
        format!("{}operators/", self.prefix)
    }

    pub fn key_use(&self, hash: &str) -> String {
        format!("{}keyuse/{hash}", self.prefix)
    }

    pub fn key_uses(&self) -> String {
        format!("{}keyuse/", self.prefix)
    }

    pub fn global_suppressions(&self) -> String {
        format!("{}suppressions/", self.prefix)
    }

    /// `address` must already be a suppression key (lowercased).
    pub fn global_suppression(&self, address: &str) -> String {
        format!("{}suppressions/{address}", self.prefix)
    }

    pub fn breaker(&self, tenant: &TenantId, class: MessageClass) -> String {
        format!("{}breakers/{tenant}/{class}", self.prefix)
    }

    pub fn breakers_of(&self, tenant: &TenantId) -> String {
        format!("{}breakers/{tenant}/", self.prefix)
    }

    pub fn moves(&self) -> String {
        format!("{}moves/", self.prefix)
    }

    pub fn move_of(&self, tenant: &TenantId) -> String {
        format!("{}moves/{tenant}", self.prefix)
    }

    pub fn operations(&self) -> String {
        format!("{}operations/", self.prefix)
    }

    pub fn operation(&self, id: &str) -> String {
        format!("{}operations/{id}", self.prefix)
    }

    pub fn rollouts(&self) -> String {
        format!("{}rollouts/", self.prefix)
    }

    /// Rollout ids are ULIDs, so the last key is the latest rollout.
    pub fn rollout(&self, id: &str) -> String {
        format!("{}rollouts/{id}", self.prefix)
    }

    /// The platform's tracking keys ([`crate::tracking`]), one record.
    pub fn tracking_keys(&self) -> String {
        format!("{}tracking/keys", self.prefix)
    }

    /// The control planes' leader election.
    pub fn election(&self) -> String {
        format!("{}election/control", self.prefix)
    }

    pub fn audit(&self) -> String {
        format!("{}audit/", self.prefix)
    }

    /// Audit keys sort by time: `audit/<milliseconds, 16 digits>-<unique id>`.
    pub fn audit_entry(&self, at_ms: u64, id: &str) -> String {
        format!("{}audit/{at_ms:016}-{id}", self.prefix)
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
            "tracking" if name == "keys" => Some(Entity::TrackingKeys),
            "breakers" => {
                let (tenant, class) = name.split_once('/')?;
                Some(Entity::Breaker(
                    TenantId::new(tenant).ok()?,
                    class.parse().ok()?,
                ))
            }
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
    /// `http://host:port` of the cell's gRPC server (shared, not copied, by every send's
    /// routing answer).
    pub endpoint: std::sync::Arc<str>,
    /// How many tenants the cell is sized for.
    pub capacity: u32,
    pub state: CellState,
    #[serde(default)]
    pub labels: BTreeMap<String, String>,
    /// The release the cell's process runs (what a rollout deployed; its build's version
    /// unless the deployer named it otherwise).
    #[serde(default)]
    pub version: String,
    /// The build of the cell's binary (`<package version>+<build id>`).
    #[serde(default)]
    pub build: String,
    /// The AWS region the cell sends through SES in (`None`: it does not send through SES):
    /// its tenants' MAIL FROM domains need an MX record for that region's feedback endpoint.
    #[serde(default)]
    pub ses_region: Option<String>,
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
    /// Domains added for verification, with the records they need (verified ones too).
    #[serde(default)]
    pub identities: Vec<IdentityRecord>,
    /// Labels the tenant's cell must carry, wherever it is moved.
    #[serde(default)]
    pub labels: BTreeMap<String, String>,
    /// Placed on its cell by an operator: rebalances leave it there.
    #[serde(default)]
    pub pinned: bool,
}

/// A domain a tenant asked to send from, and the tokens of the DNS records it must publish.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct IdentityRecord {
    pub domain: String,
    /// The ownership token, published as `_cellmail.<domain> TXT cellmail-verification=<token>`.
    pub token: String,
    /// The domain's own DKIM keys ([`crate::dkim`]), oldest first. The first one not retired
    /// signs ([`IdentityRecord::signing_key`]); during a rotation a new key waits after it
    /// until its record is published, and then the old one is retired but stays published
    /// for an overlap. None without a key-encryption key.
    #[serde(default)]
    pub dkim: Vec<DkimKey>,
    pub added_at_ms: u64,
    pub verified_at_ms: Option<u64>,
}

impl IdentityRecord {
    /// The domain's custom MAIL FROM domain (the envelope sender SES uses, so that SPF
    /// passes aligned with the From domain).
    pub fn mail_from_domain(&self) -> String {
        format!("bounce.{}", self.domain)
    }

    /// The key that signs: the first one not retired by a rotation.
    pub fn signing_key(&self) -> Option<&DkimKey> {
        self.dkim.iter().find(|key| key.retire_at_ms.is_none())
    }
}

/// One DKIM key of a domain: its selector, its public half (as the DNS record's `p=`) and
/// its private half sealed ([`crate::dkim::DkimKeys::seal`]).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct DkimKey {
    pub selector: String,
    pub public_key: String,
    pub sealed_private_key: String,
    pub created_at_ms: u64,
    /// Set once a rotation replaced the key: it no longer signs, but its record stays
    /// published until then, so that mail it signed still verifies on arrival.
    #[serde(default)]
    pub retire_at_ms: Option<u64>,
}

/// A tenant's sending limits and breaker thresholds.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct Policy {
    /// Sends per second each router admits for the tenant, sustained.
    pub rate_per_second: u32,
    /// Sends a router admits at once above the sustained rate.
    pub burst: u32,
    /// Messages the tenant's cell accepts per UTC day; 0 for no cap.
    #[serde(default)]
    pub daily_cap: u64,
    #[serde(default)]
    pub breaker: BreakerPolicy,
    /// How SES manages the reputation of the tenant's SES tenant (cells with SES tenants on).
    #[serde(default)]
    pub ses_reputation: ReputationPolicy,
    /// The classes whose html mail gets an open pixel and tracked links (opt-in).
    #[serde(default)]
    pub tracked: Tracked,
    /// Whether transactional mail carries List-Unsubscribe too (marketing mail always does).
    #[serde(default)]
    pub unsubscribe_transactional: bool,
}

impl Default for Policy {
    fn default() -> Self {
        Self {
            rate_per_second: 100,
            burst: 200,
            daily_cap: 0,
            breaker: BreakerPolicy::default(),
            ses_reputation: ReputationPolicy::default(),
            tracked: Tracked::default(),
            unsubscribe_transactional: false,
        }
    }
}

/// Which message classes are tracked (opens and clicks).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Tracked {
    pub transactional: bool,
    pub marketing: bool,
}

impl Tracked {
    pub fn of(self, class: MessageClass) -> bool {
        match class {
            MessageClass::Transactional => self.transactional,
            MessageClass::Marketing => self.marketing,
        }
    }
}

/// One of SES's managed reputation policies, which decide when SES pauses an SES tenant on
/// its own reputation findings: `none` never, `standard` on high-severity findings, `strict`
/// on any.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum ReputationPolicy {
    None,
    #[default]
    Standard,
    Strict,
}

impl ReputationPolicy {
    pub fn as_str(self) -> &'static str {
        match self {
            ReputationPolicy::None => "none",
            ReputationPolicy::Standard => "standard",
            ReputationPolicy::Strict => "strict",
        }
    }
}

impl std::str::FromStr for ReputationPolicy {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, String> {
        match s {
            "none" => Ok(ReputationPolicy::None),
            "" | "standard" => Ok(ReputationPolicy::Standard),
            "strict" => Ok(ReputationPolicy::Strict),
            other => Err(format!(
                "unknown reputation policy {} (none | standard | strict)",
                cellmail_proto::error::quote(other)
            )),
        }
    }
}

/// When a tenant's message class is paused: over a rolling window, with at least
/// `min_volume` recipients sent, its bounce or complaint rate passed its threshold.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct BreakerPolicy {
    /// Permanent bounces per 10,000 sent recipients (500: 5%).
    pub bounce_bps: u32,
    /// Complaints per 10,000 sent recipients (10: 0.1%).
    pub complaint_bps: u32,
    pub min_volume: u32,
    pub window_minutes: u32,
}

impl Default for BreakerPolicy {
    fn default() -> Self {
        Self {
            bounce_bps: 500,
            complaint_bps: 10,
            min_volume: 100,
            window_minutes: 60,
        }
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "SCREAMING_SNAKE_CASE")]
pub enum BreakerState {
    /// New sends are refused and queued mail is held.
    Tripped,
    /// Sending again; the breaker's window starts at `since_ms`.
    Resumed,
}

/// A tenant's breaker for one message class, once it has tripped.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct BreakerRecord {
    pub state: BreakerState,
    pub since_ms: u64,
    /// Who changed it last: the cell that tripped it, or the operator who resumed it.
    pub by: String,
    /// The window's figures when it tripped.
    pub sent: u64,
    pub bounced: u64,
    pub complained: u64,
    /// Why, in words: the rate over its threshold, or the operator's reason.
    pub detail: String,
    /// Tripped because the mail transport paused the tenant (SES paused its configuration
    /// set or SES tenant), not by its rates: its cell resumes it once the transport does.
    #[serde(default)]
    pub by_transport: bool,
}

impl BreakerRecord {
    pub fn tripped(&self) -> bool {
        self.state == BreakerState::Tripped
    }
}

/// One control action: who did what to which tenant, why, and the record before and after.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct AuditRecord {
    pub at_ms: u64,
    pub actor: String,
    pub action: String,
    #[serde(default)]
    pub tenant: Option<TenantId>,
    #[serde(default)]
    pub reason: String,
    #[serde(default)]
    pub before: Option<serde_json::Value>,
    #[serde(default)]
    pub after: Option<serde_json::Value>,
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

/// The steps of a tenant move, each persisted before the work it names starts, so that a
/// control plane taking over carries on from the last one.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "SCREAMING_SNAKE_CASE")]
pub enum MoveStep {
    /// Getting the target cell ready; the tenant is still served by the source.
    Preparing,
    /// The placement is frozen: the suppressions and idempotency window are being copied.
    Frozen,
    /// The tenant is served by the target; the source delivers what it had accepted.
    Switched,
    /// The source's backlog of the tenant is delivered.
    Complete,
    /// Given up before the switch; the tenant stayed on the source.
    RolledBack,
}

impl MoveStep {
    pub fn finished(self) -> bool {
        matches!(self, MoveStep::Complete | MoveStep::RolledBack)
    }

    pub fn as_str(self) -> &'static str {
        match self {
            MoveStep::Preparing => "PREPARING",
            MoveStep::Frozen => "FROZEN",
            MoveStep::Switched => "SWITCHED",
            MoveStep::Complete => "COMPLETE",
            MoveStep::RolledBack => "ROLLED_BACK",
        }
    }
}

/// A tenant's latest move.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct MoveRecord {
    pub id: String,
    pub tenant: TenantId,
    pub from: CellId,
    pub to: CellId,
    /// The placement's epoch at the start; the target serves `from_epoch + 1`.
    pub from_epoch: Epoch,
    pub step: MoveStep,
    #[serde(default)]
    pub detail: String,
    pub started_at_ms: u64,
    pub updated_at_ms: u64,
    /// When the placement was frozen, and for how long (once switched or rolled back).
    #[serde(default)]
    pub frozen_at_ms: u64,
    #[serde(default)]
    pub freeze_ms: u64,
    /// When (the source's clock) the pre-copy of the idempotency window was read: the copy
    /// while frozen carries only the keys written since (0: all of them).
    #[serde(default)]
    pub precopy_as_of_ms: u64,
    /// The message records copied again once the source has delivered are those written
    /// since (the source's clock): the pre-copy of the records, less a margin (0: all of
    /// them). The source keeps it as when it handed the tenant over.
    #[serde(default)]
    pub messages_since_ms: u64,
    pub actor: String,
    #[serde(default)]
    pub reason: String,
}

/// What an operation does: empty a cell, or even out the cells' load.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum OperationKind {
    Evacuate { cell: CellId },
    Rebalance,
}

/// One planned move of an operation, and what became of it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct PlannedMove {
    pub tenant: TenantId,
    pub from: CellId,
    /// `None` for a tenant no cell can take (its outcome says why).
    pub to: Option<CellId>,
    /// The move's id once it was requested.
    #[serde(default)]
    pub move_id: Option<String>,
    /// COMPLETE, or why it did not happen; empty while pending or under way.
    #[serde(default)]
    pub outcome: String,
}

/// An evacuation or a rebalance: moves carried out a bounded number at a time by the
/// leading control plane.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct OperationRecord {
    pub id: String,
    pub kind: OperationKind,
    /// How many of its moves may be under way at once.
    pub parallel: u32,
    pub moves: Vec<PlannedMove>,
    pub finished: bool,
    pub actor: String,
    #[serde(default)]
    pub reason: String,
    pub started_at_ms: u64,
    pub updated_at_ms: u64,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ApiKeyRecord {
    pub tenant: TenantId,
    /// The public part of the key, shown in listings and audit records.
    pub key_id: String,
    pub created_at_ms: u64,
    /// What the key may do (keys from before scopes may do everything).
    #[serde(default = "Scope::all")]
    pub scopes: Vec<Scope>,
    /// When the key stops working (none: it does not expire).
    #[serde(default)]
    pub expires_at_ms: Option<u64>,
}

impl ApiKeyRecord {
    /// A key of `tenant` that may do everything and does not expire (a tenant's first).
    pub fn unrestricted(tenant: TenantId, key_id: String, created_at_ms: u64) -> Self {
        Self {
            tenant,
            key_id,
            created_at_ms,
            scopes: Scope::all(),
            expires_at_ms: None,
        }
    }
}

/// What a tenant's API key may do.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Scope {
    /// `Send`.
    Send,
    /// `GetMessage`, `GetStats`, `ListSuppressions`, `ListEvents`.
    Read,
    /// `AddSuppression`, `RemoveSuppression`.
    Suppressions,
    /// The webhook endpoints: create, list, update, delete, test, rotate, replay.
    Webhooks,
}

impl Scope {
    pub const ALL: [Scope; 4] = [
        Scope::Send,
        Scope::Read,
        Scope::Suppressions,
        Scope::Webhooks,
    ];

    pub fn all() -> Vec<Scope> {
        Self::ALL.to_vec()
    }

    pub fn as_str(self) -> &'static str {
        match self {
            Scope::Send => "send",
            Scope::Read => "read",
            Scope::Suppressions => "suppressions",
            Scope::Webhooks => "webhooks",
        }
    }

    fn bit(self) -> u8 {
        1 << self as u8
    }
}

impl std::str::FromStr for Scope {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, String> {
        Scope::ALL
            .into_iter()
            .find(|scope| scope.as_str() == s)
            .ok_or_else(|| "is not a scope: send, read, suppressions or webhooks".to_owned())
    }
}

/// A set of scopes, as a router holds it for every key.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Scopes(u8);

impl Scopes {
    pub fn contains(self, scope: Scope) -> bool {
        self.0 & scope.bit() != 0
    }
}

impl FromIterator<Scope> for Scopes {
    fn from_iter<I: IntoIterator<Item = Scope>>(scopes: I) -> Self {
        Scopes(scopes.into_iter().fold(0, |bits, scope| bits | scope.bit()))
    }
}

/// A named operator credential: who it is (the audit trail's actor) and what it may do.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct OperatorRecord {
    pub name: String,
    pub role: OperatorRole,
    pub created_at_ms: u64,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum OperatorRole {
    /// Reads and changes everything.
    Admin,
    /// Reads everything, changes nothing.
    Viewer,
}

impl OperatorRole {
    pub fn as_str(self) -> &'static str {
        match self {
            OperatorRole::Admin => "admin",
            OperatorRole::Viewer => "viewer",
        }
    }
}

impl std::str::FromStr for OperatorRole {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, String> {
        match s {
            "admin" => Ok(OperatorRole::Admin),
            "viewer" => Ok(OperatorRole::Viewer),
            _ => Err("is not a role: admin or viewer".into()),
        }
    }
}

/// When a router last saw an API key used (to the minute).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct KeyUseRecord {
    pub last_used_ms: u64,
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
        let breaker = keys.breaker(&TenantId::new("acme").unwrap(), MessageClass::Marketing);
        assert_eq!(breaker, "/t1/breakers/acme/marketing");
        assert_eq!(
            keys.parse(&breaker),
            Some(Entity::Breaker(
                TenantId::new("acme").unwrap(),
                MessageClass::Marketing
            ))
        );
        assert_eq!(keys.parse("/t1/breakers/acme/bulk"), None);
        assert_eq!(
            keys.parse(&keys.audit_entry(5, "x")),
            None,
            "not a catalog record"
        );
        assert_eq!(keys.parse("/t2/tenants/acme"), None);
        assert_eq!(keys.parse("/t1/tenants/NOT VALID"), None);
    }

    #[test]
    fn unknown_tier_is_refused() {
        assert_eq!("".parse::<Tier>(), Ok(Tier::Standard));
        assert!("gold".parse::<Tier>().unwrap_err().contains("gold"));
    }
}

/// What a cell did over a window (its health report), or a sum of several cells'.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct HealthFigures {
    pub window_secs: u64,
    pub accepts: u64,
    /// Accepts the cell failed with a server error.
    pub accept_errors: u64,
    pub accept_p99_us: u64,
    pub send_attempts: u64,
    pub send_failures: u64,
    pub sent: u64,
    pub bounces: u64,
    pub complaints: u64,
    pub dead_letters: u64,
}

impl HealthFigures {
    /// Adds `other`'s counts; of two windows and p99s, keeps the longer and the higher (a
    /// sum of cells is judged by its slowest).
    pub fn add(&mut self, other: &HealthFigures) {
        self.window_secs = self.window_secs.max(other.window_secs);
        self.accept_p99_us = self.accept_p99_us.max(other.accept_p99_us);
        self.accepts += other.accepts;
        self.accept_errors += other.accept_errors;
        self.send_attempts += other.send_attempts;
        self.send_failures += other.send_failures;
        self.sent += other.sent;
        self.bounces += other.bounces;
        self.complaints += other.complaints;
        self.dead_letters += other.dead_letters;
    }

    /// These figures as `cell`, running `version`, reports them.
    pub fn report(&self, cell: &CellId, version: &str) -> v1::HealthReport {
        v1::HealthReport {
            cell: cell.to_string(),
            version: version.to_owned(),
            build: cellmail_proto::VERSION.to_owned(),
            window_secs: self.window_secs.min(u64::from(u32::MAX)) as u32,
            accepts: self.accepts,
            accept_errors: self.accept_errors,
            accept_p99_us: self.accept_p99_us,
            send_attempts: self.send_attempts,
            send_failures: self.send_failures,
            sent: self.sent,
            bounces: self.bounces,
            complaints: self.complaints,
            dead_letters: self.dead_letters,
        }
    }
}

/// A cell's health report, as the control plane reads it.
impl From<&v1::HealthReport> for HealthFigures {
    fn from(report: &v1::HealthReport) -> Self {
        HealthFigures {
            window_secs: u64::from(report.window_secs),
            accepts: report.accepts,
            accept_errors: report.accept_errors,
            accept_p99_us: report.accept_p99_us,
            send_attempts: report.send_attempts,
            send_failures: report.send_failures,
            sent: report.sent,
            bounces: report.bounces,
            complaints: report.complaints,
            dead_letters: report.dead_letters,
        }
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "SCREAMING_SNAKE_CASE")]
pub enum RolloutState {
    Running,
    Paused,
    Completed,
    RolledBack,
    Aborted,
}

impl RolloutState {
    pub fn finished(self) -> bool {
        matches!(self, Self::Completed | Self::RolledBack | Self::Aborted)
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "SCREAMING_SNAKE_CASE")]
pub enum WaveState {
    Pending,
    Deploying,
    /// Deployed; waiting until every cell of the wave serves the version.
    Readying,
    Baking,
    Passed,
    RollingBack,
    RolledBack,
}

/// How far a wave's health may fall behind its baseline's.
#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize)]
pub struct GateConfig {
    pub max_error_rate_delta: f64,
    pub max_accept_p99_ratio: f64,
    pub p99_slack_ms: u64,
    pub max_bounce_rate_delta: f64,
    pub max_complaint_rate_delta: f64,
    pub max_dead_letter_rate_delta: f64,
    pub min_attempts: u64,
}

impl Default for GateConfig {
    fn default() -> Self {
        Self {
            max_error_rate_delta: 0.02,
            max_accept_p99_ratio: 2.0,
            p99_slack_ms: 20,
            max_bounce_rate_delta: 0.02,
            max_complaint_rate_delta: 0.001,
            max_dead_letter_rate_delta: 0.01,
            min_attempts: 20,
        }
    }
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct GateCheck {
    pub name: String,
    pub wave: f64,
    pub baseline: f64,
    pub limit: f64,
    pub passed: bool,
    /// Why the check was not judged, when it was not.
    #[serde(default)]
    pub note: String,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct WaveRecord {
    pub cells: Vec<CellId>,
    pub state: WaveState,
    /// Each cell's version before the wave: what a rollback deploys.
    #[serde(default)]
    pub previous: BTreeMap<CellId, String>,
    /// The wave's cells' own figures before the deploy: the baseline when no cell is left
    /// unrolled.
    #[serde(default)]
    pub before: Option<HealthFigures>,
    /// Until when the deployed cells may take to serve the version (or the previous one,
    /// rolling back).
    #[serde(default)]
    pub ready_by_ms: u64,
    #[serde(default)]
    pub bake_until_ms: u64,
    /// The cells the gate compared with; empty: the wave's own figures before the deploy.
    #[serde(default)]
    pub baseline: Vec<CellId>,
    #[serde(default)]
    pub checks: Vec<GateCheck>,
    /// Rolling back: the previous versions were deployed and the cells are readying.
    #[serde(default)]
    pub rollback_deployed: bool,
}

/// `rollouts/<id>`: a version going out wave by wave.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct RolloutRecord {
    pub id: String,
    pub version: String,
    pub waves: Vec<WaveRecord>,
    /// The wave under way (or the last one).
    pub wave: usize,
    pub state: RolloutState,
    pub bake_ms: u64,
    pub ready_timeout_ms: u64,
    pub gate: GateConfig,
    /// An operator aborted it: the wave under way rolls back and the rollout ends ABORTED.
    #[serde(default)]
    pub aborted: bool,
    /// What the rollout waits for, or why it stopped.
    #[serde(default)]
    pub detail: String,
    /// A step that failed is not tried again before this time.
    #[serde(default)]
    pub next_attempt_ms: u64,
    pub actor: String,
    pub reason: String,
    pub started_at_ms: u64,
    pub updated_at_ms: u64,
}
