//! The router's view of the registry: cell endpoints, API key hashes and, for every tenant,
//! only what a send reads (status, rate, placement) in one map.
//!
//! A router holds every tenant of every cell, so a tenant costs one map entry of 56 bytes
//! with no allocation of its own: the tenant id inline, its cell as an index into the
//! interned cell ids, and no domains, identities, labels or breaker policy (the cell checks
//! those for its own tenants). Each interned cell also keeps its id as a shared string, the
//! `cell` label of the router's metrics, so labelling a send allocates nothing.

use std::collections::hash_map::Entry;
use std::sync::Arc;

use cellmail_proto::{ApiError, CellId, Epoch, TenantId};
use cellmail_registry::catalog::{Map, View, parse, upsert};
use cellmail_registry::schema::{
    ApiKeyRecord, CellRecord, Entity, Keys, PlacementRecord, PlacementState, Policy, Scopes,
    TenantRecord, TenantStatus, Tier,
};

/// What the router admits of a tenant: sends per second sustained, and at once above it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct SendRate {
    pub per_second: u32,
    pub burst: u32,
}

impl From<&Policy> for SendRate {
    fn from(policy: &Policy) -> Self {
        Self {
            per_second: policy.rate_per_second,
            burst: policy.burst,
        }
    }
}

/// What a send of a tenant is admitted at and counted under.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Admitting {
    /// The default policy's while the tenant's record is not in the view.
    pub rate: SendRate,
    /// `None` while the tenant's record is not in the view.
    pub tier: Option<Tier>,
    /// The interned id of the cell the tenant is placed on, if it is.
    pub cell: Option<Arc<str>>,
}

/// Where a tenant's sends go right now.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Target {
    pub cell: CellId,
    /// The cell's interned id (the `cell` label of metrics).
    pub cell_label: Arc<str>,
    pub endpoint: Arc<str>,
    pub epoch: Epoch,
    /// A move froze the placement: the tenant's calls wait until it is switched.
    pub frozen: bool,
}

#[derive(Debug, Default)]
pub struct Routes {
    /// Cells by the index placements hold (an id once seen keeps its index), with their
    /// endpoints while they are registered.
    cells: Vec<Cell>,
    cell_index: Map<CellId, u32>,
    tenants: Map<TenantId, Route>,
    /// SHA-256 of an API key -> what it lets its caller do.
    api_keys: Map<String, Grant>,
    /// The keys engagement links are signed with.
    pub tracking: cellmail_registry::tracking::TrackingKeys,
}

/// What an API key lets its caller do: act for its tenant, within its scopes, until it
/// expires.
#[derive(Debug, Clone, PartialEq)]
pub struct Grant {
    pub tenant: TenantId,
    pub scopes: Scopes,
    pub expires_at_ms: Option<u64>,
}

#[derive(Debug)]
struct Cell {
    id: CellId,
    label: Arc<str>,
    endpoint: Option<Arc<str>>,
}

/// A tenant's record and placement arrive as two registry keys: the entry lives while
/// either does.
#[derive(Debug, Default, Clone, Copy)]
struct Route {
    tenant: Option<Sending>,
    placement: Option<Placed>,
}

impl Route {
    fn is_empty(&self) -> bool {
        self.tenant.is_none() && self.placement.is_none()
    }
}

#[derive(Debug, Clone, Copy)]
struct Sending {
    status: TenantStatus,
    tier: Tier,
    rate: SendRate,
}

#[derive(Debug, Clone, Copy)]
struct Placed {
    cell: u32,
    epoch: Epoch,
    state: PlacementState,
}

impl View for Routes {
    fn apply(&mut self, keys: &Keys, key: &str, value: Option<&[u8]>) {
        match keys.parse(key) {
            Some(Entity::Cell(id)) => {
                let record: Option<CellRecord> = parse(key, value);
                let index = self.intern(id) as usize;
                self.cells[index].endpoint = record.map(|r| r.endpoint);
            }
            Some(Entity::Tenant(id)) => {
                let sending = parse(key, value).map(|record: TenantRecord| Sending {
                    status: record.status,
                    tier: record.tier,
                    rate: SendRate::from(&record.policy),
                });
                self.update(id, |route| route.tenant = sending);
            }
            Some(Entity::Placement(id)) => {
                let placed = parse(key, value).map(|record: PlacementRecord| Placed {
                    cell: self.intern(record.cell),
                    epoch: record.epoch,
                    state: record.state,
                });
                self.update(id, |route| route.placement = placed);
            }
            Some(Entity::TrackingKeys) => self.tracking = parse(key, value).unwrap_or_default(),
            Some(Entity::ApiKey(hash)) => {
                let record: Option<ApiKeyRecord> = parse(key, value);
                let grant = record.map(|r| Grant {
                    tenant: r.tenant,
                    scopes: r.scopes.into_iter().collect(),
                    expires_at_ms: r.expires_at_ms,
                });
                upsert(&mut self.api_keys, hash, grant);
            }
            _ => {}
        }
    }
}

impl Routes {
    fn intern(&mut self, cell: CellId) -> u32 {
        if let Some(index) = self.cell_index.get(&cell) {
            return *index;
        }
        let index = u32::try_from(self.cells.len()).expect("fewer than 2^32 cells");
        self.cells.push(Cell {
            id: cell.clone(),
            label: Arc::from(cell.as_str()),
            endpoint: None,
        });
        self.cell_index.insert(cell, index);
        index
    }

    fn update(&mut self, tenant: TenantId, change: impl FnOnce(&mut Route)) {
        match self.tenants.entry(tenant) {
            Entry::Occupied(mut entry) => {
                change(entry.get_mut());
                if entry.get().is_empty() {
                    entry.remove();
                }
            }
            Entry::Vacant(entry) => {
                let mut route = Route::default();
                change(&mut route);
                if !route.is_empty() {
                    entry.insert(route);
                }
            }
        }
    }

    /// Tenants with a record or a placement in the view.
    pub fn len(&self) -> usize {
        self.tenants.len()
    }

    pub fn is_empty(&self) -> bool {
        self.tenants.is_empty()
    }

    /// What an API key (its SHA-256) lets its caller do.
    pub fn grant(&self, hash: &str) -> Option<&Grant> {
        self.api_keys.get(hash)
    }

    /// What the router admits of `tenant` and counts its sends under.
    pub fn admitting(&self, tenant: &TenantId) -> Admitting {
        let route = self.tenants.get(tenant).copied().unwrap_or_default();
        Admitting {
            rate: route
                .tenant
                .map_or_else(|| SendRate::from(&Policy::default()), |s| s.rate),
            tier: route.tenant.map(|s| s.tier),
            cell: route
                .placement
                .map(|placed| self.cells[placed.cell as usize].label.clone()),
        }
    }

    /// `tenant`'s placement epoch and state.
    pub fn placement(&self, tenant: &TenantId) -> Option<(Epoch, PlacementState)> {
        let placed = self.tenants.get(tenant)?.placement?;
        Some((placed.epoch, placed.state))
    }

    /// Resolves `tenant` to its cell.
    pub fn target(&self, tenant: &TenantId) -> Result<Target, ApiError> {
        let route = self.tenants.get(tenant).copied().unwrap_or_default();
        let sending = route.tenant.ok_or_else(|| {
            ApiError::Unavailable(format!(
                "tenant {tenant} is not in this router's registry view yet"
            ))
        })?;
        if sending.status == TenantStatus::Suspended {
            return Err(ApiError::PermissionDenied(format!(
                "tenant {tenant} is suspended"
            )));
        }
        let placed = route
            .placement
            .ok_or_else(|| ApiError::Unavailable(format!("tenant {tenant} has no placement")))?;
        let cell = &self.cells[placed.cell as usize];
        let endpoint = cell.endpoint.as_ref().ok_or_else(|| {
            ApiError::Unavailable(format!(
                "cell {} of tenant {tenant} is not registered",
                cell.id
            ))
        })?;
        Ok(Target {
            cell: cell.id.clone(),
            cell_label: cell.label.clone(),
            endpoint: endpoint.clone(),
            epoch: placed.epoch,
            frozen: placed.state == PlacementState::Frozen,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use cellmail_registry::schema::{CellState, Scope, encode};

    fn tenant_record(status: TenantStatus, rate_per_second: u32) -> Vec<u8> {
        encode(&TenantRecord {
            tier: Tier::Standard,
            status,
            domains: vec!["example.com".into()],
            created_at_ms: 0,
            policy: Policy {
                rate_per_second,
                ..Policy::default()
            },
            identities: Vec::new(),
            labels: Default::default(),
            pinned: false,
        })
    }

    fn cell_record(endpoint: &str) -> Vec<u8> {
        encode(&CellRecord {
            endpoint: endpoint.into(),
            capacity: 10,
            state: CellState::Active,
            labels: Default::default(),
            version: String::new(),
            build: String::new(),
            ses_region: None,
        })
    }

    fn placement(cell: &CellId, epoch: u64, state: PlacementState) -> Vec<u8> {
        encode(&PlacementRecord {
            cell: cell.clone(),
            epoch: Epoch(epoch),
            state,
        })
    }

    fn target(cell: &CellId, endpoint: &str, epoch: u64, frozen: bool) -> Target {
        Target {
            cell: cell.clone(),
            cell_label: cell.as_str().into(),
            endpoint: endpoint.into(),
            epoch: Epoch(epoch),
            frozen,
        }
    }

    #[test]
    fn a_route_follows_its_tenant_placement_and_cell_records() {
        let keys = Keys::new("/r/");
        let (acme, c1, c2) = (
            TenantId::new("acme").unwrap(),
            CellId::new("c1").unwrap(),
            CellId::new("c2").unwrap(),
        );
        let mut routes = Routes::default();
        routes.apply(
            &keys,
            &keys.placement(&acme),
            Some(&placement(&c1, 1, PlacementState::Serving)),
        );
        assert!(
            matches!(routes.target(&acme), Err(ApiError::Unavailable(m)) if m.contains("not in this router's registry view")),
            "a placement without its tenant record is not routed"
        );
        routes.apply(
            &keys,
            &keys.tenant(&acme),
            Some(&tenant_record(TenantStatus::Active, 7)),
        );
        assert!(
            matches!(routes.target(&acme), Err(ApiError::Unavailable(m)) if m.contains("cell c1")),
            "a placement on an unregistered cell is not routed"
        );
        routes.apply(&keys, &keys.cell(&c1), Some(&cell_record("http://one")));
        routes.apply(&keys, &keys.cell(&c2), Some(&cell_record("http://two")));
        assert_eq!(
            routes.target(&acme),
            Ok(target(&c1, "http://one", 1, false))
        );
        assert_eq!(
            routes.admitting(&acme),
            Admitting {
                rate: SendRate {
                    per_second: 7,
                    burst: Policy::default().burst
                },
                tier: Some(Tier::Standard),
                cell: Some("c1".into()),
            }
        );

        routes.apply(
            &keys,
            &keys.placement(&acme),
            Some(&placement(&c2, 2, PlacementState::Frozen)),
        );
        assert_eq!(routes.target(&acme), Ok(target(&c2, "http://two", 2, true)));
        assert_eq!(
            routes.placement(&acme),
            Some((Epoch(2), PlacementState::Frozen))
        );

        routes.apply(
            &keys,
            &keys.tenant(&acme),
            Some(&tenant_record(TenantStatus::Suspended, 7)),
        );
        assert!(matches!(
            routes.target(&acme),
            Err(ApiError::PermissionDenied(_))
        ));

        routes.apply(&keys, &keys.tenant(&acme), None);
        assert_eq!(routes.len(), 1, "the placement keeps the entry");
        assert_eq!(
            routes.admitting(&acme),
            Admitting {
                rate: SendRate::from(&Policy::default()),
                tier: None,
                cell: Some("c2".into()),
            },
            "a tenant without its record is admitted at the default rate, with no tier"
        );
        routes.apply(&keys, &keys.placement(&acme), None);
        assert!(routes.is_empty(), "gone with both of its records");
        assert_eq!(routes.placement(&acme), None);
        assert_eq!(routes.admitting(&acme).cell, None);
    }

    #[test]
    fn api_keys_grant_their_tenant_and_scopes_until_deleted_and_garbage_is_skipped() {
        let keys = Keys::new("/r/");
        let acme = TenantId::new("acme").unwrap();
        let record = encode(&ApiKeyRecord {
            tenant: acme.clone(),
            key_id: "k1".into(),
            created_at_ms: 0,
            scopes: vec![Scope::Send],
            expires_at_ms: Some(9),
        });
        let mut routes = Routes::default();
        routes.apply(&keys, &keys.api_key("hash"), Some(&record));
        let grant = routes.grant("hash").unwrap();
        assert_eq!(grant.tenant, acme);
        assert!(grant.scopes.contains(Scope::Send));
        assert!(!grant.scopes.contains(Scope::Read));
        assert_eq!(grant.expires_at_ms, Some(9));
        // A key written before scopes may do everything, for ever.
        let older = br#"{"tenant":"acme","key_id":"k0","created_at_ms":0}"#;
        routes.apply(&keys, &keys.api_key("old"), Some(older));
        let grant = routes.grant("old").unwrap();
        assert!(Scope::ALL.into_iter().all(|s| grant.scopes.contains(s)));
        assert_eq!(grant.expires_at_ms, None);
        routes.apply(&keys, &keys.api_key("hash"), Some(b"{not json"));
        assert_eq!(routes.grant("hash"), None);
        let c1 = CellId::new("c1").unwrap();
        let serving = placement(&c1, 1, PlacementState::Serving);
        routes.apply(&keys, &keys.placement(&acme), Some(&serving));
        routes.apply(&keys, &keys.placement(&acme), Some(b"{not json"));
        assert_eq!(
            routes.placement(&acme),
            None,
            "an unreadable placement is absent"
        );
    }

    #[test]
    fn a_route_entry_stays_within_56_bytes() {
        assert!(std::mem::size_of::<(TenantId, Route)>() <= 56);
    }
}
