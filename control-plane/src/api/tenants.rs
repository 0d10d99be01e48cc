//! Tenants: onboarding, suspending and resuming, sending domains, offboarding.
//!
//! A new tenant's records (tenant, placement, first API key) are written in one transaction
//! that fails if the tenant already exists; its cell then sets up its mail transport for it.
//! Its domains ([`super::domains`]) send once verified (or at once where new domains are
//! trusted). Offboarding exports a suspended tenant's data from every cell, then deletes it
//! everywhere.

use cellmail_proto::error::quote;
use cellmail_proto::v1;
use cellmail_proto::{ApiError, CellId, Epoch, MessageClass, TenantId, now_ms};
use tonic::Request;

use super::{ControlApi, actor, planning_view};
use crate::offboard;
use crate::placement;
use cellmail_registry::apikey;
use cellmail_registry::audit;
use cellmail_registry::catalog::Catalog;
use cellmail_registry::schema::{
    self, ApiKeyRecord, AuditRecord, BreakerPolicy, BreakerRecord, BreakerState, PlacementRecord,
    PlacementState, Policy, TenantRecord, TenantStatus, Tier, Tracked,
};
use cellmail_registry::{Compare, Op};

impl ControlApi {
    pub(super) async fn create_tenant(
        &self,
        request: Request<v1::CreateTenantRequest>,
    ) -> Result<v1::CreateTenantResponse, ApiError> {
        let actor = actor(&request);
        let req = request.into_inner();
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
                let mut identity = self.new_identity(domain, now)?;
                identity.verified_at_ms = self.trust_new_domains.then_some(now);
                Ok(identity)
            })
            .collect::<Result<_, ApiError>>()?;
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
        let key_record = ApiKeyRecord::unrestricted(id.clone(), key.key_id.clone(), now_ms());
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
        let written = (self.registry.txn(compares, ops).await)
            .map_err(ApiError::from)?
            .ok_or_else(|| ApiError::AlreadyExists(format!("tenant {id} already exists")))?;
        tracing::info!(tenant = %id, cell = %placement.cell, key_id = %key.key_id, "tenant created");
        self.provision_or_warn(&id, written).await;
        let mut created = Catalog::default();
        created.placements.insert(id.clone(), placement);
        Ok(v1::CreateTenantResponse {
            tenant: Some(tenant_info(&created, &id, &tenant)),
            api_key: key.plaintext,
            key_id: key.key_id,
        })
    }

    pub(super) async fn list_tenants(
        &self,
        _request: Request<v1::ListTenantsRequest>,
    ) -> Result<v1::ListTenantsResponse, ApiError> {
        let catalog = self.catalog(&["tenants", "placements", "breakers"]).await?;
        let mut tenants: Vec<_> = catalog
            .tenants
            .iter()
            .map(|(id, tenant)| tenant_info(&catalog, id, tenant))
            .collect();
        tenants.sort_by(|a, b| a.id.cmp(&b.id));
        Ok(v1::ListTenantsResponse { tenants })
    }

    pub(super) async fn suspend_tenant(
        &self,
        request: Request<v1::SuspendTenantRequest>,
    ) -> Result<v1::TenantInfo, ApiError> {
        let actor = actor(&request);
        let req = request.into_inner();
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

    pub(super) async fn resume_tenant(
        &self,
        request: Request<v1::ResumeTenantRequest>,
    ) -> Result<v1::ResumeTenantResponse, ApiError> {
        let actor = actor(&request);
        let req = request.into_inner();
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
                by_transport: false,
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

    pub(super) async fn export_tenant_data(
        &self,
        request: Request<v1::TenantDataRequest>,
    ) -> Result<Vec<v1::TenantData>, ApiError> {
        let tenant = TenantId::from_field("tenant_id", request.into_inner().tenant_id)?;
        offboard::export(self.registry.as_ref(), &self.keys, &self.channels, &tenant).await
    }

    pub(super) async fn delete_tenant(
        &self,
        request: Request<v1::DeleteTenantRequest>,
    ) -> Result<v1::DeleteTenantResponse, ApiError> {
        let actor = actor(&request);
        let request = request.into_inner();
        let tenant = TenantId::from_field("tenant_id", request.tenant_id)?;
        offboard::delete(
            self.registry.as_ref(),
            &self.keys,
            &self.channels,
            &tenant,
            (actor, request.reason),
        )
        .await
    }

    /// The tenant's record with its mod revision, or NOT_FOUND.
    pub(super) async fn tenant(&self, id: &TenantId) -> Result<(TenantRecord, u64), ApiError> {
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

    /// Writes tenant `id`'s record, with its audit entry, if it is still at `revision`;
    /// ABORTED when someone changed it meanwhile.
    pub(super) async fn write_tenant(
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
}

/// Lowercases and checks one domain a tenant may send from.
pub(super) fn parse_domain(field: String, domain: &str) -> Result<String, ApiError> {
    let domain = domain.trim().to_ascii_lowercase();
    if domain.contains('.')
        && email_address::EmailAddress::is_valid_domain(&domain)
        && !domain.starts_with('[')
    {
        Ok(domain)
    } else {
        Err(ApiError::invalid(
            field,
            format!("{} is not a domain name", quote(&domain)),
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
    let ses_reputation = (wire.ses_reputation_policy.parse())
        .map_err(|e: String| ApiError::invalid("policy.ses_reputation_policy", e))?;
    let mut tracked = Tracked::default();
    for (i, class) in wire.tracked_classes.iter().enumerate() {
        match class.parse() {
            Ok(MessageClass::Transactional) => tracked.transactional = true,
            Ok(MessageClass::Marketing) => tracked.marketing = true,
            Err(_) => {
                return Err(ApiError::invalid(
                    format!("policy.tracked_classes[{i}]"),
                    format!(
                        "{} is not a class (transactional | marketing)",
                        quote(class)
                    ),
                ));
            }
        }
    }
    Ok(Policy {
        rate_per_second: rate,
        burst,
        daily_cap: wire.daily_cap,
        breaker,
        ses_reputation,
        tracked,
        unsubscribe_transactional: wire.unsubscribe_transactional,
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
        ses_reputation_policy: policy.ses_reputation.as_str().to_owned(),
        tracked_classes: (MessageClass::ALL.into_iter())
            .filter(|class| policy.tracked.of(*class))
            .map(|class| class.to_string())
            .collect(),
        unsubscribe_transactional: policy.unsubscribe_transactional,
    }
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
