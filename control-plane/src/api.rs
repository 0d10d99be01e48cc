//! The `Control` gRPC service: what operators do to tenants, cells and API keys.
//!
//! Reads go straight to the registry (operators expect to see their last write); a new
//! tenant's records (tenant, placement, first API key) are written in one transaction that
//! fails if the tenant already exists. Every change is written with its audit entry in one
//! transaction; an API key is audited by its id, never the key or its hash.

use std::sync::Arc;

use cellmail_proto::v1::{self, control_server::Control};
use cellmail_proto::{
    ApiError, CellId, Epoch, MessageClass, SuppressionReason, SuppressionScope, TenantId, now_ms,
    suppression_key,
};
use tonic::{Request, Response, Status};

use crate::identity;
use crate::moves;
use crate::offboard;
use crate::operations;
use crate::placement::{self, Candidate};
use crate::rollout;
use cellmail_registry::apikey;
use cellmail_registry::audit;
use cellmail_registry::catalog::{self, Catalog};
use cellmail_registry::channels::CellChannels;
use cellmail_registry::schema::{
    self, ApiKeyRecord, AuditRecord, BreakerPolicy, BreakerRecord, BreakerState, CellRecord,
    CellState, GlobalSuppressionRecord, IdentityRecord, KeyUseRecord, Keys, OperationKind,
    PlacementRecord, PlacementState, Policy, TenantRecord, TenantStatus, Tier,
};
use cellmail_registry::{Compare, Op, Registry};

pub struct ControlApi {
    registry: Arc<dyn Registry>,
    keys: Keys,
    dns: identity::Checker,
    /// Whether a new tenant's domains count as verified (one-machine setups).
    trust_new_domains: bool,
    /// To the cells, for offboarding.
    channels: CellChannels,
    /// Whether this control plane has a deployer (rollouts are refused without one).
    rollouts: bool,
}

/// Lowercases and checks one domain a tenant may send from.
fn parse_domain(field: String, domain: &str) -> Result<String, ApiError> {
    let domain = domain.trim().to_ascii_lowercase();
    if domain.contains('.')
        && email_address::EmailAddress::is_valid_domain(&domain)
        && !domain.starts_with('[')
    {
        Ok(domain)
    } else {
        Err(ApiError::invalid(
            field,
            format!("{domain:?} is not a domain name"),
        ))
    }
}

/// The most sends per second a tenant's policy may allow each router to admit.
const MAX_RATE: u32 = 1_000_000;

fn parse_policy(wire: v1::TenantPolicy) -> Result<Policy, ApiError> {
    let default = Policy::default();
    let rate = if wire.rate_per_second == 0 {
        default.rate_per_second
    } else {
        wire.rate_per_second
    };
    if rate > MAX_RATE {
        return Err(ApiError::invalid(
            "policy.rate_per_second",
            format!("at most {MAX_RATE}"),
        ));
    }
    let burst = if wire.burst == 0 {
        rate.saturating_mul(2)
    } else {
        wire.burst
    };
    if burst > MAX_RATE.saturating_mul(2) {
        return Err(ApiError::invalid(
            "policy.burst",
            format!("at most {}", MAX_RATE.saturating_mul(2)),
        ));
    }
    let defaults = BreakerPolicy::default();
    let or_default = |value: u32, default: u32| if value == 0 { default } else { value };
    let breaker = BreakerPolicy {
        bounce_bps: or_default(wire.bounce_rate_bps, defaults.bounce_bps),
        complaint_bps: or_default(wire.complaint_rate_bps, defaults.complaint_bps),
        min_volume: or_default(wire.breaker_min_volume, defaults.min_volume),
        window_minutes: or_default(wire.breaker_window_minutes, defaults.window_minutes),
    };
    for (field, bps) in [
        ("policy.bounce_rate_bps", breaker.bounce_bps),
        ("policy.complaint_rate_bps", breaker.complaint_bps),
    ] {
        if bps > 10_000 {
            return Err(ApiError::invalid(field, "at most 10000 (100%)"));
        }
    }
    if u64::from(breaker.window_minutes) > WINDOW_MINUTES {
        return Err(ApiError::invalid(
            "policy.breaker_window_minutes",
            format!("at most {WINDOW_MINUTES}"),
        ));
    }
    Ok(Policy {
        rate_per_second: rate,
        burst,
        daily_cap: wire.daily_cap,
        breaker,
    })
}

/// The longest breaker window a policy may set (cells keep a day of breaker figures).
const WINDOW_MINUTES: u64 = 24 * 60;

fn wire_policy(policy: &Policy) -> v1::TenantPolicy {
    v1::TenantPolicy {
        rate_per_second: policy.rate_per_second,
        burst: policy.burst,
        daily_cap: policy.daily_cap,
        bounce_rate_bps: policy.breaker.bounce_bps,
        complaint_rate_bps: policy.breaker.complaint_bps,
        breaker_min_volume: policy.breaker.min_volume,
        breaker_window_minutes: policy.breaker.window_minutes,
    }
}

/// The operator a `Control` call acts for: the `x-cellmail-actor` metadata the CLI sets from
/// the login name, or "operator".
pub fn actor<T>(request: &Request<T>) -> String {
    let named = request
        .metadata()
        .get("x-cellmail-actor")
        .and_then(|v| v.to_str().ok())
        .map(str::trim)
        .filter(|name| !name.is_empty());
    format!("admin:{}", named.unwrap_or("operator"))
}

/// What `catalog` (of tenants, placements and breakers) says of tenant `id`.
fn tenant_info(catalog: &Catalog, id: &TenantId, tenant: &TenantRecord) -> v1::TenantInfo {
    let placement = catalog.placements.get(id);
    let mut paused: Vec<_> = MessageClass::ALL
        .into_iter()
        .filter_map(|class| {
            catalog.tripped(id, class).map(|b| v1::PausedClass {
                class: class.to_string(),
                detail: b.detail.clone(),
                since_ms: b.since_ms as i64,
            })
        })
        .collect();
    paused.sort_by(|a, b| a.class.cmp(&b.class));
    v1::TenantInfo {
        id: id.to_string(),
        tier: tenant.tier.as_str().to_owned(),
        status: format!("{:?}", tenant.status).to_uppercase(),
        domains: tenant.domains.clone(),
        cell: placement.map(|p| p.cell.to_string()).unwrap_or_default(),
        epoch: placement.map_or(0, |p| p.epoch.0),
        policy: Some(wire_policy(&tenant.policy)),
        paused,
    }
}

impl ControlApi {
    pub fn new(
        registry: Arc<dyn Registry>,
        keys: Keys,
        identities: &identity::IdentityConfig,
        rollouts: bool,
    ) -> anyhow::Result<Self> {
        Ok(Self {
            registry,
            keys,
            dns: identity::Checker::new(identities)?,
            trust_new_domains: identities.trust_new_domains,
            channels: CellChannels::default(),
            rollouts,
        })
    }

    async fn act_on_rollout(
        &self,
        request: Request<v1::RolloutActionRequest>,
        action: rollout::Action,
    ) -> Result<Response<v1::RolloutInfo>, Status> {
        let actor = actor(&request);
        let request = request.into_inner();
        let record = rollout::act(
            self.registry.as_ref(),
            &self.keys,
            &request.id,
            action,
            (actor, request.reason),
        )
        .await?;
        Ok(Response::new(rollout::info(&record)))
    }

    /// A catalog of the given kinds of record (`cells`, `alive`, `tenants`, `placements`).
    async fn catalog(&self, kinds: &[&str]) -> Result<Catalog, ApiError> {
        let prefixes: Vec<String> = kinds
            .iter()
            .map(|kind| format!("{}{kind}/", self.keys.prefix()))
            .collect();
        catalog::fetch(self.registry.as_ref(), &self.keys, &prefixes)
            .await
            .map(|(catalog, _)| catalog)
            .map_err(ApiError::from)
    }

    async fn create_tenant(
        &self,
        req: v1::CreateTenantRequest,
        actor: String,
    ) -> Result<v1::CreateTenantResponse, ApiError> {
        let id = TenantId::from_field("id", req.id)?;
        if req.domains.is_empty() {
            return Err(ApiError::invalid(
                "domains",
                "a tenant needs at least one sending domain",
            ));
        }
        let domains = req
            .domains
            .iter()
            .enumerate()
            .map(|(i, d)| parse_domain(format!("domains[{i}]"), d))
            .collect::<Result<Vec<_>, _>>()?;
        let tier: Tier = req
            .tier
            .parse()
            .map_err(|e: String| ApiError::invalid("tier", e))?;
        let policy = parse_policy(req.policy.unwrap_or_default())?;

        let requirements = placement::Requirements {
            cell: match req.cell.as_str() {
                "" => None,
                pinned => Some(CellId::from_field("cell", pinned)?),
            },
            labels: req.labels.into_iter().collect(),
            tenant: Some((id.clone(), tier)),
        };
        let catalog = self.catalog(&["cells", "alive", "placements"]).await?;
        let (candidates, _) = planning_view(&catalog);
        let cell = placement::choose(candidates, &requirements)
            .ok_or_else(|| {
                ApiError::Unavailable(format!(
                    "no ACTIVE live cell with room meets the placement ({requirements:?})"
                ))
            })?
            .clone();

        let now = now_ms();
        let identities = domains
            .iter()
            .map(|domain| {
                let mut identity = identity::new_identity(domain, now);
                identity.verified_at_ms = self.trust_new_domains.then_some(now);
                identity
            })
            .collect();
        let tenant = TenantRecord {
            tier,
            status: TenantStatus::Active,
            domains: if self.trust_new_domains {
                domains
            } else {
                Vec::new()
            },
            created_at_ms: now,
            policy,
            identities,
            labels: requirements.labels.clone(),
            pinned: requirements.cell.is_some(),
        };
        let placement = PlacementRecord {
            cell,
            epoch: Epoch(1),
            state: PlacementState::Serving,
        };
        let key = apikey::issue();
        let key_record = ApiKeyRecord {
            tenant: id.clone(),
            key_id: key.key_id.clone(),
            created_at_ms: now_ms(),
        };
        let entry = audit::entry(
            (actor, req.reason),
            "tenant.create",
            Some(&id),
            None,
            audit::snapshot(&(&tenant, &placement, &key_record)),
        );
        let (tenant_key, placement_key) = (self.keys.tenant(&id), self.keys.placement(&id));
        let compares = vec![
            Compare {
                key: tenant_key.clone(),
                mod_revision: 0,
            },
            Compare {
                key: placement_key.clone(),
                mod_revision: 0,
            },
        ];
        let ops = vec![
            Op::Put {
                key: tenant_key,
                value: schema::encode(&tenant),
                lease: None,
            },
            Op::Put {
                key: placement_key,
                value: schema::encode(&placement),
                lease: None,
            },
            Op::Put {
                key: self.keys.api_key(&key.hash),
                value: schema::encode(&key_record),
                lease: None,
            },
            audit::entry_op(&self.keys, &entry),
        ];
        if self
            .registry
            .txn(compares, ops)
            .await
            .map_err(ApiError::from)?
            .is_none()
        {
            return Err(ApiError::AlreadyExists(format!(
                "tenant {id} already exists"
            )));
        }
        tracing::info!(tenant = %id, cell = %placement.cell, key_id = %key.key_id, "tenant created");
        let mut created = Catalog::default();
        created.placements.insert(id.clone(), placement);
        Ok(v1::CreateTenantResponse {
            tenant: Some(tenant_info(&created, &id, &tenant)),
            api_key: key.plaintext,
            key_id: key.key_id,
        })
    }

    /// The cells and tenants as plans see them now.
    async fn planning(&self) -> Result<Catalog, ApiError> {
        self.catalog(&["cells", "alive", "placements", "tenants"])
            .await
    }

    async fn evacuate_cell(
        &self,
        req: v1::EvacuateCellRequest,
        actor: String,
    ) -> Result<v1::OperationInfo, ApiError> {
        let cell = CellId::from_field("cell_id", &req.cell_id)?;
        let drain = v1::SetCellStateRequest {
            cell_id: req.cell_id,
            state: "DRAINING".into(),
            reason: req.reason.clone(),
        };
        self.set_cell_state(drain, actor.clone()).await?;
        let catalog = self.planning().await?;
        let (candidates, placed) = planning_view(&catalog);
        let (planned, stuck) = placement::evacuation(&candidates, &placed, &cell);
        let mut moves: Vec<_> = planned.into_iter().map(operations::pending).collect();
        moves.extend(stuck.into_iter().map(|tenant| {
            let why = "no other ACTIVE live cell with room meets its labels".to_owned();
            operations::stuck(tenant, cell.clone(), why)
        }));
        let kind = OperationKind::Evacuate { cell };
        let record = operations::start(
            self.registry.as_ref(),
            &self.keys,
            kind,
            req.parallel,
            moves,
            (actor, req.reason),
        )
        .await?;
        Ok(operations::info(&record))
    }

    async fn plan_rebalance(&self) -> Result<Vec<placement::Planned>, ApiError> {
        let catalog = self.planning().await?;
        let (candidates, placed) = planning_view(&catalog);
        Ok(placement::rebalance(&candidates, &placed))
    }

    async fn list_tenants(&self) -> Result<v1::ListTenantsResponse, ApiError> {
        let catalog = self.catalog(&["tenants", "placements", "breakers"]).await?;
        let mut tenants: Vec<_> = catalog
            .tenants
            .iter()
            .map(|(id, tenant)| tenant_info(&catalog, id, tenant))
            .collect();
        tenants.sort_by(|a, b| a.id.cmp(&b.id));
        Ok(v1::ListTenantsResponse { tenants })
    }

    async fn list_cells(&self) -> Result<v1::ListCellsResponse, ApiError> {
        let catalog = self.catalog(&["cells", "alive", "placements"]).await?;
        let mut cells: Vec<_> = catalog
            .cells
            .iter()
            .map(|(id, cell)| cell_info(&catalog, id, cell))
            .collect();
        cells.sort_by(|a, b| a.id.cmp(&b.id));
        Ok(v1::ListCellsResponse { cells })
    }

    /// Cell `id` as operators see it now.
    async fn cell_now(&self, id: &CellId) -> Result<v1::CellInfo, ApiError> {
        let catalog = self.catalog(&["cells", "alive", "placements"]).await?;
        let cell = catalog
            .cells
            .get(id)
            .ok_or_else(|| ApiError::NotFound(format!("cell {id} does not exist")))?;
        Ok(cell_info(&catalog, id, cell))
    }

    /// Writes `after` as cell `id`'s record, with its audit entry, if the record is still at
    /// `revision` (0: absent).
    async fn write_cell(
        &self,
        id: &CellId,
        revision: u64,
        after: &CellRecord,
        entry: &AuditRecord,
    ) -> Result<(), ApiError> {
        let key = self.keys.cell(id);
        let written = audit::write(
            self.registry.as_ref(),
            &self.keys,
            &key,
            revision,
            schema::encode(after),
            entry,
        )
        .await
        .map_err(ApiError::from)?;
        match (written, revision) {
            (true, _) => Ok(()),
            (false, 0) => Err(ApiError::AlreadyExists(format!("cell {id} already exists"))),
            (false, _) => Err(ApiError::Aborted(format!(
                "cell {id} changed meanwhile; try again"
            ))),
        }
    }

    async fn add_cell(
        &self,
        req: v1::AddCellRequest,
        actor: String,
    ) -> Result<v1::CellInfo, ApiError> {
        let id = CellId::from_field("id", req.id)?;
        let record = CellRecord {
            endpoint: "".into(),
            capacity: if req.capacity == 0 {
                1000
            } else {
                req.capacity
            },
            state: CellState::Active,
            labels: req.labels.into_iter().collect(),
            version: String::new(),
            build: String::new(),
        };
        let entry = AuditRecord {
            at_ms: now_ms(),
            actor,
            action: format!("cell.add {id}"),
            tenant: None,
            reason: req.reason,
            before: None,
            after: audit::snapshot(&record),
        };
        self.write_cell(&id, 0, &record, &entry).await?;
        self.cell_now(&id).await
    }

    async fn set_cell_state(
        &self,
        req: v1::SetCellStateRequest,
        actor: String,
    ) -> Result<v1::CellInfo, ApiError> {
        let id = CellId::from_field("cell_id", req.cell_id)?;
        let state = match req.state.to_ascii_uppercase().as_str() {
            "ACTIVE" => CellState::Active,
            "DRAINING" => CellState::Draining,
            "DISABLED" => CellState::Disabled,
            other => {
                return Err(ApiError::invalid(
                    "state",
                    format!("{other:?} is not ACTIVE, DRAINING or DISABLED"),
                ));
            }
        };
        let kv = self
            .registry
            .get(&self.keys.cell(&id))
            .await
            .map_err(ApiError::from)?
            .ok_or_else(|| ApiError::NotFound(format!("cell {id} does not exist")))?;
        let before: CellRecord = schema::decode(&kv.value)
            .map_err(|e| ApiError::Internal(format!("cell {id}'s record: {e}")))?;
        if before.state != state {
            let after = CellRecord {
                state,
                ..before.clone()
            };
            let entry = AuditRecord {
                at_ms: now_ms(),
                actor,
                action: format!("cell.state {id}"),
                tenant: None,
                reason: req.reason,
                before: audit::snapshot(&before),
                after: audit::snapshot(&after),
            };
            self.write_cell(&id, kv.mod_revision, &after, &entry)
                .await?;
            tracing::warn!(cell = %id, ?state, "cell state changed");
        }
        self.cell_now(&id).await
    }

    async fn issue_api_key(
        &self,
        req: v1::IssueApiKeyRequest,
        actor: String,
    ) -> Result<v1::IssueApiKeyResponse, ApiError> {
        let id = TenantId::from_field("tenant_id", req.tenant_id)?;
        let tenant_key = self.keys.tenant(&id);
        let Some(tenant) = self
            .registry
            .get(&tenant_key)
            .await
            .map_err(ApiError::from)?
        else {
            return Err(ApiError::NotFound(format!("tenant {id} does not exist")));
        };
        let key = apikey::issue();
        let record = ApiKeyRecord {
            tenant: id.clone(),
            key_id: key.key_id.clone(),
            created_at_ms: now_ms(),
        };
        // The record names the key by its id only: neither the key nor its hash is audited.
        let entry = audit::entry(
            (actor, req.reason),
            "key.issue",
            Some(&id),
            None,
            audit::snapshot(&record),
        );
        // Fails if the tenant was deleted in the meantime, so no key outlives its tenant.
        let compares = vec![Compare {
            key: tenant_key,
            mod_revision: tenant.mod_revision,
        }];
        let ops = vec![
            Op::Put {
                key: self.keys.api_key(&key.hash),
                value: schema::encode(&record),
                lease: None,
            },
            audit::entry_op(&self.keys, &entry),
        ];
        if self
            .registry
            .txn(compares, ops)
            .await
            .map_err(ApiError::from)?
            .is_none()
        {
            return Err(ApiError::Unavailable(format!(
                "tenant {id} changed while issuing a key; retry"
            )));
        }
        tracing::info!(tenant = %id, key_id = %key.key_id, "API key issued");
        Ok(v1::IssueApiKeyResponse {
            api_key: key.plaintext,
            key_id: key.key_id,
        })
    }
}

impl ControlApi {
    async fn keys_of(&self, tenant: &TenantId) -> Result<Vec<(String, ApiKeyRecord)>, ApiError> {
        apikey::of_tenant(self.registry.as_ref(), &self.keys, tenant)
            .await
            .map_err(ApiError::from)
    }

    async fn list_api_keys(
        &self,
        req: v1::ListApiKeysRequest,
    ) -> Result<v1::ListApiKeysResponse, ApiError> {
        let id = TenantId::from_field("tenant_id", req.tenant_id)?;
        let uses = self
            .registry
            .list(&self.keys.key_uses())
            .await
            .map_err(ApiError::from)?;
        let last_used: std::collections::HashMap<&str, u64> = uses
            .entries
            .iter()
            .filter_map(|kv| {
                let hash = kv.key.rsplit('/').next()?;
                let record = schema::decode::<KeyUseRecord>(&kv.value).ok()?;
                Some((hash, record.last_used_ms))
            })
            .collect();
        let mut keys: Vec<_> = self
            .keys_of(&id)
            .await?
            .into_iter()
            .map(|(key, r)| v1::ApiKeyInfo {
                last_used_ms: key
                    .rsplit('/')
                    .next()
                    .and_then(|hash| last_used.get(hash))
                    .copied()
                    .unwrap_or(0) as i64,
                key_id: r.key_id,
                created_at_ms: r.created_at_ms as i64,
            })
            .collect();
        keys.sort_by(|a, b| (a.created_at_ms, &a.key_id).cmp(&(b.created_at_ms, &b.key_id)));
        Ok(v1::ListApiKeysResponse { keys })
    }

    async fn revoke_api_key(
        &self,
        req: v1::RevokeApiKeyRequest,
        actor: String,
    ) -> Result<v1::RevokeApiKeyResponse, ApiError> {
        let id = TenantId::from_field("tenant_id", req.tenant_id)?;
        if req.key_id.is_empty() {
            return Err(ApiError::invalid("key_id", "is required"));
        }
        let found = self
            .keys_of(&id)
            .await?
            .into_iter()
            .find(|(_, r)| r.key_id == req.key_id);
        let Some((key, record)) = found else {
            return Ok(v1::RevokeApiKeyResponse { revoked: false });
        };
        let Some(kv) = self.registry.get(&key).await.map_err(ApiError::from)? else {
            return Ok(v1::RevokeApiKeyResponse { revoked: false });
        };
        let entry = audit::entry(
            (actor, req.reason),
            "key.revoke",
            Some(&id),
            audit::snapshot(&record),
            None,
        );
        let hash = key.rsplit('/').next().unwrap_or_default();
        let compares = vec![Compare {
            key: key.clone(),
            mod_revision: kv.mod_revision,
        }];
        let ops = vec![
            Op::Delete {
                key: self.keys.key_use(hash),
            },
            Op::Delete { key: key.clone() },
            audit::entry_op(&self.keys, &entry),
        ];
        if self
            .registry
            .txn(compares, ops)
            .await
            .map_err(ApiError::from)?
            .is_none()
        {
            return Err(ApiError::Aborted(format!(
                "key {} changed meanwhile; try again",
                req.key_id
            )));
        }
        tracing::info!(tenant = %id, key_id = %req.key_id, "API key revoked");
        Ok(v1::RevokeApiKeyResponse { revoked: true })
    }

    /// The tenant's record with its mod revision, or NOT_FOUND.
    async fn tenant(&self, id: &TenantId) -> Result<(TenantRecord, u64), ApiError> {
        let kv = self
            .registry
            .get(&self.keys.tenant(id))
            .await
            .map_err(ApiError::from)?
            .ok_or_else(|| ApiError::NotFound(format!("tenant {id} does not exist")))?;
        let record = schema::decode(&kv.value)
            .map_err(|e| ApiError::Internal(format!("tenant {id}'s record: {e}")))?;
        Ok((record, kv.mod_revision))
    }

    /// Tenant `id` as operators see it now.
    async fn tenant_now(&self, id: &TenantId) -> Result<v1::TenantInfo, ApiError> {
        let catalog = self.catalog(&["tenants", "placements", "breakers"]).await?;
        let tenant = catalog
            .tenants
            .get(id)
            .ok_or_else(|| ApiError::NotFound(format!("tenant {id} does not exist")))?;
        Ok(tenant_info(&catalog, id, tenant))
    }

    async fn suspend_tenant(
        &self,
        req: v1::SuspendTenantRequest,
        actor: String,
    ) -> Result<v1::TenantInfo, ApiError> {
        let id = TenantId::from_field("tenant_id", req.tenant_id)?;
        let (before, revision) = self.tenant(&id).await?;
        if before.status != TenantStatus::Suspended {
            let after = TenantRecord {
                status: TenantStatus::Suspended,
                ..before.clone()
            };
            let entry = AuditRecord {
                at_ms: now_ms(),
                actor,
                action: "tenant.suspend".into(),
                tenant: Some(id.clone()),
                reason: req.reason,
                before: audit::snapshot(&before),
                after: audit::snapshot(&after),
            };
            self.write_tenant(&id, revision, &after, &entry).await?;
            tracing::warn!(tenant = %id, reason = %entry.reason, "tenant suspended");
        }
        self.tenant_now(&id).await
    }

    /// Writes tenant `id`'s record, with its audit entry, if it is still at `revision`;
    /// ABORTED when someone changed it meanwhile.
    async fn write_tenant(
        &self,
        id: &TenantId,
        revision: u64,
        record: &TenantRecord,
        entry: &AuditRecord,
    ) -> Result<(), ApiError> {
        let key = self.keys.tenant(id);
        let value = schema::encode(record);
        let registry = self.registry.as_ref();
        if audit::write(registry, &self.keys, &key, revision, value, entry)
            .await
            .map_err(ApiError::from)?
        {
            Ok(())
        } else {
            Err(ApiError::Aborted(format!(
                "tenant {id} changed meanwhile; try again"
            )))
        }
    }

    async fn resume_tenant(
        &self,
        req: v1::ResumeTenantRequest,
        actor: String,
    ) -> Result<v1::ResumeTenantResponse, ApiError> {
        let id = TenantId::from_field("tenant_id", req.tenant_id)?;
        let classes: Vec<MessageClass> = if req.class.is_empty() {
            MessageClass::ALL.to_vec()
        } else {
            vec![
                req.class
                    .parse()
                    .map_err(|e: String| ApiError::invalid("class", e))?,
            ]
        };
        let (before, revision) = self.tenant(&id).await?;
        let now = now_ms();
        let entry = |action: String, before: Option<serde_json::Value>, after| AuditRecord {
            at_ms: now,
            actor: actor.clone(),
            action,
            tenant: Some(id.clone()),
            reason: req.reason.clone(),
            before,
            after,
        };
        let mut compares = Vec::new();
        let mut ops = Vec::new();
        let mut resumed_classes = Vec::new();
        for class in classes {
            let key = self.keys.breaker(&id, class);
            let Some(kv) = self.registry.get(&key).await.map_err(ApiError::from)? else {
                continue;
            };
            let tripped: BreakerRecord = schema::decode(&kv.value)
                .map_err(|e| ApiError::Internal(format!("breaker {key}: {e}")))?;
            if !tripped.tripped() {
                continue;
            }
            let resumed = BreakerRecord {
                state: BreakerState::Resumed,
                since_ms: now,
                by: actor.clone(),
                detail: req.reason.clone(),
                ..tripped.clone()
            };
            let audited = entry(
                format!("breaker.resume {class}"),
                audit::snapshot(&tripped),
                audit::snapshot(&resumed),
            );
            compares.push(Compare {
                key: key.clone(),
                mod_revision: kv.mod_revision,
            });
            ops.push(Op::Put {
                key,
                value: schema::encode(&resumed),
                lease: None,
            });
            ops.push(audit::entry_op(&self.keys, &audited));
            resumed_classes.push(class.to_string());
        }
        let unsuspended = before.status == TenantStatus::Suspended;
        if unsuspended {
            let after = TenantRecord {
                status: TenantStatus::Active,
                ..before.clone()
            };
            let audited = entry(
                "tenant.resume".into(),
                audit::snapshot(&before),
                audit::snapshot(&after),
            );
            ops.push(audit::entry_op(&self.keys, &audited));
            ops.push(Op::Put {
                key: self.keys.tenant(&id),
                value: schema::encode(&after),
                lease: None,
            });
            compares.push(Compare {
                key: self.keys.tenant(&id),
                mod_revision: revision,
            });
        }
        if !ops.is_empty()
            && self
                .registry
                .txn(compares, ops)
                .await
                .map_err(ApiError::from)?
                .is_none()
        {
            return Err(ApiError::Aborted(format!(
                "tenant {id} changed meanwhile; try again"
            )));
        }
        tracing::info!(tenant = %id, unsuspended, resumed = ?resumed_classes, "tenant resumed");
        Ok(v1::ResumeTenantResponse {
            tenant: Some(self.tenant_now(&id).await?),
            unsuspended,
            resumed_classes,
        })
    }

    async fn add_domain(
        &self,
        req: v1::DomainRequest,
        actor: String,
    ) -> Result<v1::DomainInfo, ApiError> {
        let id = TenantId::from_field("tenant_id", req.tenant_id)?;
        let domain = parse_domain("domain".into(), &req.domain)?;
        let (before, revision) = self.tenant(&id).await?;
        if let Some(known) = before.identities.iter().find(|i| i.domain == domain) {
            return Ok(domain_info(known, Vec::new()));
        }
        let added = identity::new_identity(&domain, now_ms());
        let mut after = before.clone();
        after.identities.push(added.clone());
        let entry = AuditRecord {
            at_ms: added.added_at_ms,
            actor,
            action: "tenant.domain.add".into(),
            tenant: Some(id.clone()),
            reason: domain.clone(),
            before: audit::snapshot(&before),
            after: audit::snapshot(&after),
        };
        self.write_tenant(&id, revision, &after, &entry).await?;
        Ok(domain_info(&added, Vec::new()))
    }

    async fn verify_domain(
        &self,
        req: v1::DomainRequest,
        actor: String,
    ) -> Result<v1::DomainInfo, ApiError> {
        let id = TenantId::from_field("tenant_id", req.tenant_id)?;
        let domain = parse_domain("domain".into(), &req.domain)?;
        let (before, revision) = self.tenant(&id).await?;
        let identity = before
            .identities
            .iter()
            .find(|i| i.domain == domain)
            .cloned()
            .ok_or_else(|| {
                ApiError::NotFound(format!(
                    "domain: {domain} was not added to tenant {id} (cellmail tenant domain add)"
                ))
            })?;
        let checked = self.dns.check(&identity).await;
        let problems: Vec<Option<String>> = checked.into_iter().map(|(_, p)| p).collect();
        if problems.iter().any(Option::is_some) || identity.verified_at_ms.is_some() {
            return Ok(domain_info(&identity, problems));
        }
        let now = now_ms();
        let mut after = before.clone();
        for i in &mut after.identities {
            if i.domain == domain {
                i.verified_at_ms = Some(now);
            }
        }
        if !after.domains.contains(&domain) {
            after.domains.push(domain.clone());
        }
        let entry = AuditRecord {
            at_ms: now,
            actor,
            action: "tenant.domain.verify".into(),
            tenant: Some(id.clone()),
            reason: domain.clone(),
            before: audit::snapshot(&before),
            after: audit::snapshot(&after),
        };
        self.write_tenant(&id, revision, &after, &entry).await?;
        tracing::info!(tenant = %id, %domain, "sending domain verified");
        let verified = IdentityRecord {
            verified_at_ms: Some(now),
            ..identity
        };
        Ok(domain_info(&verified, problems))
    }

    async fn list_audit(
        &self,
        req: v1::ListAuditRequest,
    ) -> Result<v1::ListAuditResponse, ApiError> {
        let tenant = if req.tenant_id.is_empty() {
            None
        } else {
            Some(TenantId::from_field("tenant_id", req.tenant_id)?)
        };
        let limit = if req.limit == 0 {
            100
        } else {
            req.limit as usize
        };
        let json =
            |value: Option<serde_json::Value>| value.map(|v| v.to_string()).unwrap_or_default();
        let entries = audit::list(self.registry.as_ref(), &self.keys, tenant.as_ref(), limit)
            .await
            .map_err(ApiError::from)?
            .into_iter()
            .map(|e| v1::AuditEntry {
                at_ms: e.at_ms as i64,
                actor: e.actor,
                action: e.action,
                tenant_id: e.tenant.map(|t| t.to_string()).unwrap_or_default(),
                reason: e.reason,
                before_json: json(e.before),
                after_json: json(e.after),
            })
            .collect();
        Ok(v1::ListAuditResponse { entries })
    }

    async fn list_global_suppressions(
        &self,
    ) -> Result<v1::ListGlobalSuppressionsResponse, ApiError> {
        let catalog = self.catalog(&["suppressions"]).await?;
        let mut suppressions: Vec<_> = catalog
            .global_suppressions
            .into_values()
            .map(global_suppression)
            .collect();
        suppressions.sort_by(|a, b| a.address.cmp(&b.address));
        Ok(v1::ListGlobalSuppressionsResponse { suppressions })
    }

    async fn add_global_suppression(
        &self,
        req: v1::AddGlobalSuppressionRequest,
        actor: String,
    ) -> Result<v1::Suppression, ApiError> {
        let options = email_address::Options::default()
            .with_required_tld()
            .without_domain_literal()
            .without_display_text();
        email_address::EmailAddress::parse_with_options(req.address.trim(), options).map_err(
            |e| {
                ApiError::invalid(
                    "address",
                    format!("{:?} is not an email address: {e}", req.address),
                )
            },
        )?;
        let reason = match req.kind {
            0 => SuppressionReason::Manual,
            wire => SuppressionReason::from_wire(wire)
                .ok_or_else(|| ApiError::invalid("kind", "unknown suppression reason"))?,
        };
        let record = GlobalSuppressionRecord {
            address: req.address.trim().to_owned(),
            reason,
            created_at_ms: now_ms(),
        };
        let key = self
            .keys
            .global_suppression(&suppression_key(&record.address));
        let (before, revision) = self.global_entry(&key).await?;
        let entry = audit::entry(
            (actor, req.reason),
            "suppression.add",
            None,
            before.as_ref().and_then(audit::snapshot),
            audit::snapshot(&record),
        );
        let registry = self.registry.as_ref();
        let value = schema::encode(&record);
        if !audit::write(registry, &self.keys, &key, revision, value, &entry)
            .await
            .map_err(ApiError::from)?
        {
            return Err(ApiError::Aborted(format!(
                "the global entry of {} changed meanwhile; try again",
                record.address
            )));
        }
        tracing::info!(address = %record.address, reason = reason.as_str(), "address suppressed globally");
        Ok(global_suppression(record))
    }

    async fn remove_global_suppression(
        &self,
        req: v1::RemoveGlobalSuppressionRequest,
        actor: String,
    ) -> Result<v1::RemoveSuppressionResponse, ApiError> {
        if req.address.trim().is_empty() {
            return Err(ApiError::invalid("address", "is required"));
        }
        let key = self.keys.global_suppression(&suppression_key(&req.address));
        let (Some(before), revision) = self.global_entry(&key).await? else {
            return Ok(v1::RemoveSuppressionResponse { removed: false });
        };
        let entry = audit::entry(
            (actor, req.reason),
            "suppression.remove",
            None,
            audit::snapshot(&before),
            None,
        );
        let compares = vec![Compare {
            key: key.clone(),
            mod_revision: revision,
        }];
        let ops = vec![Op::Delete { key }, audit::entry_op(&self.keys, &entry)];
        if self
            .registry
            .txn(compares, ops)
            .await
            .map_err(ApiError::from)?
            .is_none()
        {
            return Err(ApiError::Aborted(format!(
                "the global entry of {} changed meanwhile; try again",
                before.address
            )));
        }
        Ok(v1::RemoveSuppressionResponse { removed: true })
    }

    /// The global entry at registry key `key`, if any, and its mod revision (0: absent).
    async fn global_entry(
        &self,
        key: &str,
    ) -> Result<(Option<GlobalSuppressionRecord>, u64), ApiError> {
        let Some(kv) = self.registry.get(key).await.map_err(ApiError::from)? else {
            return Ok((None, 0));
        };
        let record = schema::decode(&kv.value)
            .map_err(|e| ApiError::Internal(format!("global suppression {key}: {e}")))?;
        Ok((Some(record), kv.mod_revision))
    }
}

/// `catalog`'s cells and tenants as the placement plans take them.
fn planning_view(catalog: &Catalog) -> (Vec<Candidate<'_>>, Vec<placement::Placed<'_>>) {
    let load = catalog.load();
    let candidates = catalog
        .cells
        .iter()
        .map(|(id, record)| Candidate {
            id,
            record,
            alive: catalog.alive.contains(id),
            tenants: load.get(id).copied().unwrap_or(0),
        })
        .collect();
    let placed = catalog
        .placements
        .iter()
        .map(|(tenant, placement)| {
            let record = catalog.tenants.get(tenant);
            placement::Placed {
                tenant,
                cell: &placement.cell,
                requirements: record
                    .map(|r| placement::Requirements::of_tenant(tenant, r))
                    .unwrap_or_default(),
                pinned: record.is_some_and(|r| r.pinned),
            }
        })
        .collect();
    (candidates, placed)
}

/// `identity`'s records, each with what a check found wrong (`problems`, in the same order;
/// empty when not checked).
fn domain_info(identity: &IdentityRecord, problems: Vec<Option<String>>) -> v1::DomainInfo {
    let mut problems = problems.into_iter();
    let records = identity::records(identity)
        .into_iter()
        .map(|r| v1::DnsRecordInfo {
            purpose: r.purpose.to_owned(),
            r#type: r.kind.to_string(),
            name: r.name,
            value: r.value,
            problem: problems.next().flatten().unwrap_or_default(),
        })
        .collect();
    v1::DomainInfo {
        domain: identity.domain.clone(),
        verified: identity.verified_at_ms.is_some(),
        records,
    }
}

fn cell_info(catalog: &Catalog, id: &CellId, cell: &CellRecord) -> v1::CellInfo {
    v1::CellInfo {
        id: id.to_string(),
        endpoint: cell.endpoint.to_string(),
        capacity: cell.capacity,
        state: format!("{:?}", cell.state).to_uppercase(),
        tenants: catalog.load().get(id).copied().unwrap_or(0),
        alive: catalog.alive.contains(id),
        version: cell.version.clone(),
        build: cell.build.clone(),
    }
}

fn global_suppression(record: GlobalSuppressionRecord) -> v1::Suppression {
    v1::Suppression {
        address: record.address,
        reason: record.reason.to_wire(),
        scope: SuppressionScope::Global.to_wire(),
        created_at_ms: record.created_at_ms as i64,
        message_id: String::new(),
    }
}

type DataStream =
    std::pin::Pin<Box<dyn tokio_stream::Stream<Item = Result<v1::TenantData, Status>> + Send>>;

#[tonic::async_trait]
impl Control for ControlApi {
    type ExportTenantDataStream = DataStream;

    async fn export_tenant_data(
        &self,
        request: Request<v1::TenantDataRequest>,
    ) -> Result<Response<DataStream>, Status> {
        let tenant = TenantId::from_field("tenant_id", request.into_inner().tenant_id)?;
        let parts =
            offboard::export(self.registry.as_ref(), &self.keys, &self.channels, &tenant).await?;
        Ok(Response::new(Box::pin(tokio_stream::iter(
            parts.into_iter().map(Ok),
        ))))
    }

    async fn delete_tenant(
        &self,
        request: Request<v1::DeleteTenantRequest>,
    ) -> Result<Response<v1::DeleteTenantResponse>, Status> {
        let actor = actor(&request);
        let request = request.into_inner();
        let tenant = TenantId::from_field("tenant_id", request.tenant_id)?;
        let deleted = offboard::delete(
            self.registry.as_ref(),
            &self.keys,
            &self.channels,
            &tenant,
            (actor, request.reason),
        )
        .await?;
        Ok(Response::new(deleted))
    }

    async fn create_tenant(
        &self,
        request: Request<v1::CreateTenantRequest>,
    ) -> Result<Response<v1::CreateTenantResponse>, Status> {
        let actor = actor(&request);
        Ok(Response::new(
            ControlApi::create_tenant(self, request.into_inner(), actor).await?,
        ))
    }

    async fn list_tenants(
        &self,
        _request: Request<v1::ListTenantsRequest>,
    ) -> Result<Response<v1::ListTenantsResponse>, Status> {
        Ok(Response::new(ControlApi::list_tenants(self).await?))
    }

    async fn list_cells(
        &self,
        _request: Request<v1::ListCellsRequest>,
    ) -> Result<Response<v1::ListCellsResponse>, Status> {
        Ok(Response::new(ControlApi::list_cells(self).await?))
    }

    async fn issue_api_key(
        &self,
        request: Request<v1::IssueApiKeyRequest>,
    ) -> Result<Response<v1::IssueApiKeyResponse>, Status> {
        let actor = actor(&request);
        Ok(Response::new(
            ControlApi::issue_api_key(self, request.into_inner(), actor).await?,
        ))
    }

    async fn list_api_keys(
        &self,
        request: Request<v1::ListApiKeysRequest>,
    ) -> Result<Response<v1::ListApiKeysResponse>, Status> {
        Ok(Response::new(
            ControlApi::list_api_keys(self, request.into_inner()).await?,
        ))
    }

    async fn revoke_api_key(
        &self,
        request: Request<v1::RevokeApiKeyRequest>,
    ) -> Result<Response<v1::RevokeApiKeyResponse>, Status> {
        let actor = actor(&request);
        Ok(Response::new(
            ControlApi::revoke_api_key(self, request.into_inner(), actor).await?,
        ))
    }

    async fn list_global_suppressions(
        &self,
        _request: Request<v1::ListGlobalSuppressionsRequest>,
    ) -> Result<Response<v1::ListGlobalSuppressionsResponse>, Status> {
        Ok(Response::new(
            ControlApi::list_global_suppressions(self).await?,
        ))
    }

    async fn add_global_suppression(
        &self,
        request: Request<v1::AddGlobalSuppressionRequest>,
    ) -> Result<Response<v1::Suppression>, Status> {
        let actor = actor(&request);
        Ok(Response::new(
            ControlApi::add_global_suppression(self, request.into_inner(), actor).await?,
        ))
    }

    async fn remove_global_suppression(
        &self,
        request: Request<v1::RemoveGlobalSuppressionRequest>,
    ) -> Result<Response<v1::RemoveSuppressionResponse>, Status> {
        let actor = actor(&request);
        Ok(Response::new(
            ControlApi::remove_global_suppression(self, request.into_inner(), actor).await?,
        ))
    }

    async fn suspend_tenant(
        &self,
        request: Request<v1::SuspendTenantRequest>,
    ) -> Result<Response<v1::TenantInfo>, Status> {
        let actor = actor(&request);
        Ok(Response::new(
            ControlApi::suspend_tenant(self, request.into_inner(), actor).await?,
        ))
    }

    async fn resume_tenant(
        &self,
        request: Request<v1::ResumeTenantRequest>,
    ) -> Result<Response<v1::ResumeTenantResponse>, Status> {
        let actor = actor(&request);
        Ok(Response::new(
            ControlApi::resume_tenant(self, request.into_inner(), actor).await?,
        ))
    }

    async fn add_domain(
        &self,
        request: Request<v1::DomainRequest>,
    ) -> Result<Response<v1::DomainInfo>, Status> {
        let actor = actor(&request);
        Ok(Response::new(
            ControlApi::add_domain(self, request.into_inner(), actor).await?,
        ))
    }

    async fn verify_domain(
        &self,
        request: Request<v1::DomainRequest>,
    ) -> Result<Response<v1::DomainInfo>, Status> {
        let actor = actor(&request);
        Ok(Response::new(
            ControlApi::verify_domain(self, request.into_inner(), actor).await?,
        ))
    }

    async fn add_cell(
        &self,
        request: Request<v1::AddCellRequest>,
    ) -> Result<Response<v1::CellInfo>, Status> {
        let actor = actor(&request);
        Ok(Response::new(
            ControlApi::add_cell(self, request.into_inner(), actor).await?,
        ))
    }

    async fn set_cell_state(
        &self,
        request: Request<v1::SetCellStateRequest>,
    ) -> Result<Response<v1::CellInfo>, Status> {
        let actor = actor(&request);
        Ok(Response::new(
            ControlApi::set_cell_state(self, request.into_inner(), actor).await?,
        ))
    }

    async fn list_audit(
        &self,
        request: Request<v1::ListAuditRequest>,
    ) -> Result<Response<v1::ListAuditResponse>, Status> {
        Ok(Response::new(
            ControlApi::list_audit(self, request.into_inner()).await?,
        ))
    }

    async fn move_tenant(
        &self,
        request: Request<v1::MoveTenantRequest>,
    ) -> Result<Response<v1::MoveInfo>, Status> {
        let actor = actor(&request);
        let request = request.into_inner();
        let tenant = TenantId::from_field("tenant_id", request.tenant_id)?;
        let to = CellId::from_field("to_cell", request.to_cell)?;
        let record = moves::request(
            self.registry.as_ref(),
            &self.keys,
            &tenant,
            &to,
            actor,
            request.reason,
        )
        .await?;
        tracing::info!(tenant = %tenant, from = %record.from, to = %record.to, "tenant move requested");
        Ok(Response::new(moves::info(&record)))
    }

    async fn evacuate_cell(
        &self,
        request: Request<v1::EvacuateCellRequest>,
    ) -> Result<Response<v1::OperationInfo>, Status> {
        let actor = actor(&request);
        Ok(Response::new(
            ControlApi::evacuate_cell(self, request.into_inner(), actor).await?,
        ))
    }

    async fn plan_rebalance(
        &self,
        _request: Request<v1::PlanRebalanceRequest>,
    ) -> Result<Response<v1::RebalancePlan>, Status> {
        let moves = ControlApi::plan_rebalance(self)
            .await?
            .into_iter()
            .map(|p| operations::planned_info(&operations::pending(p)))
            .collect();
        Ok(Response::new(v1::RebalancePlan { moves }))
    }

    async fn apply_rebalance(
        &self,
        request: Request<v1::ApplyRebalanceRequest>,
    ) -> Result<Response<v1::OperationInfo>, Status> {
        let actor = actor(&request);
        let request = request.into_inner();
        let moves = if request.moves.is_empty() {
            ControlApi::plan_rebalance(self)
                .await?
                .into_iter()
                .map(operations::pending)
                .collect()
        } else {
            operations::reviewed(&request.moves, &self.planning().await?)?
        };
        let record = operations::start(
            self.registry.as_ref(),
            &self.keys,
            OperationKind::Rebalance,
            request.parallel,
            moves,
            (actor, request.reason),
        )
        .await?;
        Ok(Response::new(operations::info(&record)))
    }

    async fn get_operation(
        &self,
        request: Request<v1::GetOperationRequest>,
    ) -> Result<Response<v1::OperationInfo>, Status> {
        let id = request.into_inner().id;
        if id.is_empty() {
            return Err(ApiError::invalid("id", "is required").into());
        }
        let record = operations::get(self.registry.as_ref(), &self.keys, &id).await?;
        Ok(Response::new(operations::info(&record)))
    }

    async fn start_rollout(
        &self,
        request: Request<v1::StartRolloutRequest>,
    ) -> Result<Response<v1::RolloutInfo>, Status> {
        let actor = actor(&request);
        let request = request.into_inner();
        if !self.rollouts {
            return Err(ApiError::FailedPrecondition(
                "this control plane has no deployer (--deployer): rollouts are off".into(),
            )
            .into());
        }
        let canary = match request.canary.as_str() {
            "" => None,
            id => Some(CellId::from_field("canary", id)?),
        };
        let secs_or = |secs: u64, default: std::time::Duration| match secs {
            0 => default,
            secs => std::time::Duration::from_secs(secs),
        };
        let start = rollout::Start {
            version: request.version,
            canary,
            waves: match request.waves.as_str() {
                "" => rollout::DEFAULT_WAVES.to_owned(),
                waves => waves.to_owned(),
            },
            bake: secs_or(request.bake_secs, rollout::DEFAULT_BAKE),
            ready_timeout: secs_or(request.ready_timeout_secs, rollout::DEFAULT_READY_TIMEOUT),
            gate: rollout::gate_config(request.gate)?,
            actor,
            reason: request.reason,
        };
        let record = rollout::start(self.registry.as_ref(), &self.keys, start).await?;
        Ok(Response::new(rollout::info(&record)))
    }

    async fn get_rollout(
        &self,
        request: Request<v1::GetRolloutRequest>,
    ) -> Result<Response<v1::RolloutInfo>, Status> {
        let id = request.into_inner().id;
        let (record, _) = rollout::get(self.registry.as_ref(), &self.keys, &id).await?;
        Ok(Response::new(rollout::info(&record)))
    }

    async fn pause_rollout(
        &self,
        request: Request<v1::RolloutActionRequest>,
    ) -> Result<Response<v1::RolloutInfo>, Status> {
        self.act_on_rollout(request, rollout::Action::Pause).await
    }

    async fn resume_rollout(
        &self,
        request: Request<v1::RolloutActionRequest>,
    ) -> Result<Response<v1::RolloutInfo>, Status> {
        self.act_on_rollout(request, rollout::Action::Resume).await
    }

    async fn abort_rollout(
        &self,
        request: Request<v1::RolloutActionRequest>,
    ) -> Result<Response<v1::RolloutInfo>, Status> {
        self.act_on_rollout(request, rollout::Action::Abort).await
    }

    async fn get_move(
        &self,
        request: Request<v1::GetMoveRequest>,
    ) -> Result<Response<v1::MoveInfo>, Status> {
        let tenant = TenantId::from_field("tenant_id", request.into_inner().tenant_id)?;
        let record = moves::latest(self.registry.as_ref(), &self.keys, &tenant)
            .await?
            .ok_or_else(|| ApiError::NotFound(format!("tenant {tenant} has not been moved")))?;
        Ok(Response::new(moves::info(&record)))
    }
}
