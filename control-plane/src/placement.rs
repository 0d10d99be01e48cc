//! Where tenants go, as pure decisions over plain data.
//!
//! [`choose`]: a new tenant goes, among the ACTIVE, live cells that meet its requirements (a
//! cell it is pinned to, labels the cell must carry; a cell labelled `tier=<tier>` takes only
//! tenants of that tier, one labelled `dedicated=<tenant>` only that tenant), to the one with
//! the most headroom
//! (capacity minus the tenants already placed there), ties broken by cell id so the choice is
//! deterministic. [`evacuation`] places every tenant of a cell being emptied the same way, one
//! after the other, counting the ones already placed. [`rebalance`] finds the fewest moves
//! that even out the tenants per unit of capacity across the ACTIVE, live cells, leaving
//! the tenants an operator pinned where they are.

use std::collections::{BTreeMap, HashMap};

use cellmail_proto::{CellId, TenantId};

use cellmail_registry::schema::{CellRecord, CellState, TenantRecord, Tier};

/// The cell label that restricts a cell to tenants of one tier.
pub const TIER_LABEL: &str = "tier";
/// The cell label that restricts a cell to one tenant.
pub const DEDICATED_LABEL: &str = "dedicated";

/// A cell as placement sees it.
pub struct Candidate<'a> {
    pub id: &'a CellId,
    pub record: &'a CellRecord,
    pub alive: bool,
    pub tenants: u32,
}

/// What a tenant asks of its cell.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Requirements {
    /// Only this cell (a pinned placement).
    pub cell: Option<CellId>,
    /// Labels the cell must carry, with these values.
    pub labels: BTreeMap<String, String>,
    /// The tenant and its tier, which a cell's `tier` and `dedicated` labels must admit
    /// (`None`: no cell with either label admits it).
    pub tenant: Option<(TenantId, Tier)>,
}

impl Requirements {
    /// What tenant `id`, of `record`, asks of any cell it is placed or moved on.
    pub fn of_tenant(id: &TenantId, record: &TenantRecord) -> Self {
        Requirements {
            cell: None,
            labels: record.labels.clone(),
            tenant: Some((id.clone(), record.tier)),
        }
    }

    fn met_by(&self, candidate: &Candidate) -> bool {
        self.cell
            .as_ref()
            .is_none_or(|pinned| pinned == candidate.id)
            && self.admitted_by(candidate.record)
    }

    /// Whether `cell`'s labels admit this tenant: it carries every label asked for, and its
    /// `tier` and `dedicated` labels, if any, name the tenant's tier and the tenant.
    pub fn admitted_by(&self, cell: &CellRecord) -> bool {
        let names = |label: &str, value: Option<&str>| {
            cell.labels
                .get(label)
                .is_none_or(|v| Some(v.as_str()) == value)
        };
        let (tenant, tier) = match &self.tenant {
            Some((tenant, tier)) => (Some(tenant.as_str()), Some(tier.as_str())),
            None => (None, None),
        };
        self.labels
            .iter()
            .all(|(key, value)| cell.labels.get(key) == Some(value))
            && names(TIER_LABEL, tier)
            && names(DEDICATED_LABEL, tenant)
    }
}

pub fn choose<'a>(
    candidates: impl IntoIterator<Item = Candidate<'a>>,
    requirements: &Requirements,
) -> Option<&'a CellId> {
    candidates
        .into_iter()
        .filter(|c| c.alive && c.record.state == CellState::Active && c.tenants < c.record.capacity)
        .filter(|c| requirements.met_by(c))
        .max_by(|a, b| {
            let headroom = |c: &Candidate| c.record.capacity - c.tenants;
            headroom(a).cmp(&headroom(b)).then_with(|| b.id.cmp(a.id))
        })
        .map(|c| c.id)
}

/// A move a plan asks for.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Planned {
    pub tenant: TenantId,
    pub from: CellId,
    pub to: CellId,
}

/// A tenant as a plan sees it: where it is and what it asks of its cell.
pub struct Placed<'a> {
    pub tenant: &'a TenantId,
    pub cell: &'a CellId,
    pub requirements: Requirements,
    /// Placed by an operator: a rebalance leaves it where it is.
    pub pinned: bool,
}

fn with_load<'a>(candidates: &[Candidate<'a>], load: &HashMap<&CellId, u32>) -> Vec<Candidate<'a>> {
    candidates
        .iter()
        .map(|c| Candidate {
            id: c.id,
            record: c.record,
            alive: c.alive,
            tenants: load.get(c.id).copied().unwrap_or(c.tenants),
        })
        .collect()
}

/// Where each tenant of `leaving` goes (in tenant order), and the tenants no cell has room
/// for. `leaving` itself is never a target.
pub fn evacuation(
    candidates: &[Candidate],
    tenants: &[Placed],
    leaving: &CellId,
) -> (Vec<Planned>, Vec<TenantId>) {
    let mut load: HashMap<&CellId, u32> = candidates.iter().map(|c| (c.id, c.tenants)).collect();
    let mut on_cell: Vec<&Placed> = tenants.iter().filter(|t| t.cell == leaving).collect();
    on_cell.sort_by(|a, b| a.tenant.cmp(b.tenant));
    let (mut planned, mut stuck) = (Vec::new(), Vec::new());
    for placed in on_cell {
        let others = with_load(candidates, &load)
            .into_iter()
            .filter(|c| c.id != leaving);
        match choose(others, &placed.requirements) {
            Some(to) => {
                *load.entry(to).or_default() += 1;
                planned.push(Planned {
                    tenant: placed.tenant.clone(),
                    from: leaving.clone(),
                    to: to.clone(),
                });
            }
            None => stuck.push(placed.tenant.clone()),
        }
    }
    (planned, stuck)
}

/// The fewest moves that bring every ACTIVE, live cell's tenants as close as whole tenants
/// allow to its share of them by capacity. Tenants on other cells stay where they are (an
/// evacuation moves them); a tenant moves only to a cell that meets its requirements.
pub fn rebalance(candidates: &[Candidate], tenants: &[Placed]) -> Vec<Planned> {
    let eligible: Vec<&Candidate> = candidates
        .iter()
        .filter(|c| c.alive && c.record.state == CellState::Active)
        .collect();
    let capacity: f64 = eligible.iter().map(|c| f64::from(c.record.capacity)).sum();
    if eligible.len() < 2 || capacity == 0.0 {
        return Vec::new();
    }
    let mut on: HashMap<&CellId, Vec<&Placed>> = HashMap::new();
    for placed in tenants {
        if eligible.iter().any(|c| c.id == placed.cell) {
            on.entry(placed.cell).or_default().push(placed);
        }
    }
    for list in on.values_mut() {
        list.sort_by(|a, b| b.tenant.cmp(a.tenant));
    }
    let total: usize = on.values().map(Vec::len).sum();
    let share = |c: &Candidate| total as f64 * f64::from(c.record.capacity) / capacity;
    let excess = |c: &Candidate, on: &HashMap<&CellId, Vec<&Placed>>| {
        on.get(c.id).map_or(0, Vec::len) as f64 - share(c)
    };
    let mut planned = Vec::new();
    loop {
        let mut by_excess: Vec<&&Candidate> = eligible.iter().collect();
        by_excess.sort_by(|a, b| {
            excess(a, &on)
                .total_cmp(&excess(b, &on))
                .then(a.id.cmp(b.id))
        });
        let Some(&&from) = by_excess.last() else {
            break;
        };
        // The most loaded cell gives one tenant to the least loaded cell that takes it, as
        // long as that narrows the gap between them.
        let found = by_excess.iter().find_map(|&&to| {
            let full = on.get(to.id).map_or(0, Vec::len) as u32 >= to.record.capacity;
            if full || excess(from, &on) - excess(to, &on) <= 1.0 {
                return None;
            }
            let list = on.get(from.id)?;
            let index = list
                .iter()
                .position(|p| !p.pinned && p.requirements.met_by(to))?;
            Some((to, index))
        });
        let Some((to, index)) = found else { break };
        let moved = on.get_mut(from.id).map(|list| list.remove(index));
        let Some(moved) = moved else { break };
        planned.push(Planned {
            tenant: moved.tenant.clone(),
            from: from.id.clone(),
            to: to.id.clone(),
        });
        on.entry(to.id).or_default().push(moved);
    }
    planned
}

#[cfg(test)]
mod tests {
    use super::*;

    fn cell(capacity: u32, state: CellState) -> CellRecord {
        CellRecord {
            endpoint: "".into(),
            capacity,
            state,
            labels: Default::default(),
            version: String::new(),
            build: String::new(),
            ses_region: None,
        }
    }

    #[test]
    fn most_headroom_wins_and_ties_go_to_the_lowest_id() {
        let ids: Vec<CellId> = ["cell-1", "cell-2", "cell-3"]
            .map(|s| CellId::new(s).unwrap())
            .into();
        let (big, small) = (cell(100, CellState::Active), cell(10, CellState::Active));
        let pick = |loads: [u32; 3]| {
            choose(
                [
                    Candidate {
                        id: &ids[0],
                        record: &big,
                        alive: true,
                        tenants: loads[0],
                    },
                    Candidate {
                        id: &ids[1],
                        record: &big,
                        alive: true,
                        tenants: loads[1],
                    },
                    Candidate {
                        id: &ids[2],
                        record: &small,
                        alive: true,
                        tenants: loads[2],
                    },
                ],
                &Requirements::default(),
            )
            .cloned()
        };
        assert_eq!(pick([0, 0, 0]), Some(ids[0].clone()));
        assert_eq!(pick([1, 0, 0]), Some(ids[1].clone()));
        assert_eq!(pick([95, 96, 0]), Some(ids[2].clone()));
    }

    #[test]
    fn draining_dead_and_full_cells_get_nothing() {
        let ids: Vec<CellId> = ["a", "b", "c"].map(|s| CellId::new(s).unwrap()).into();
        let draining = cell(100, CellState::Draining);
        let active = cell(5, CellState::Active);
        assert_eq!(
            choose(
                [
                    Candidate {
                        id: &ids[0],
                        record: &draining,
                        alive: true,
                        tenants: 0
                    },
                    Candidate {
                        id: &ids[1],
                        record: &active,
                        alive: false,
                        tenants: 0
                    },
                    Candidate {
                        id: &ids[2],
                        record: &active,
                        alive: true,
                        tenants: 5
                    },
                ],
                &Requirements::default()
            ),
            None
        );
    }

    #[test]
    fn a_pinned_tenant_gets_its_cell_and_labels_must_all_match() {
        let ids: Vec<CellId> = ["eu-1", "eu-2", "us-1"]
            .map(|s| CellId::new(s).unwrap())
            .into();
        let labelled = |region: &str, dedicated: bool| {
            let mut record = cell(100, CellState::Active);
            record.labels.insert("region".into(), region.into());
            if dedicated {
                record.labels.insert("pool".into(), "dedicated".into());
            }
            record
        };
        let cells = [
            labelled("eu", false),
            labelled("eu", true),
            labelled("us", false),
        ];
        let pick = |requirements: Requirements| {
            choose(
                ids.iter().zip(&cells).map(|(id, record)| Candidate {
                    id,
                    record,
                    alive: true,
                    tenants: 0,
                }),
                &requirements,
            )
            .cloned()
        };
        let labels = |pairs: &[(&str, &str)]| {
            pairs
                .iter()
                .map(|(k, v)| (k.to_string(), v.to_string()))
                .collect()
        };
        assert_eq!(pick(Requirements::default()), Some(ids[0].clone()));
        let pinned = Requirements {
            cell: Some(ids[2].clone()),
            ..Default::default()
        };
        assert_eq!(pick(pinned), Some(ids[2].clone()));
        let in_eu_pool = Requirements {
            labels: labels(&[("region", "eu"), ("pool", "dedicated")]),
            ..Default::default()
        };
        assert_eq!(pick(in_eu_pool), Some(ids[1].clone()));
        let nowhere = Requirements {
            cell: Some(ids[2].clone()),
            labels: labels(&[("region", "eu")]),
            ..Default::default()
        };
        assert_eq!(pick(nowhere), None);
    }

    /// Live cells `ids` with `records` (in order), no tenants placed yet.
    fn empty_live<'a>(ids: &'a [CellId], records: &[&'a CellRecord]) -> Vec<Candidate<'a>> {
        ids.iter()
            .zip(records)
            .map(|(id, record)| Candidate {
                id,
                record,
                alive: true,
                tenants: 0,
            })
            .collect()
    }

    fn tenants(n: usize, prefix: &str) -> Vec<TenantId> {
        (0..n)
            .map(|i| TenantId::new(format!("{prefix}{i:02}")).unwrap())
            .collect()
    }

    #[test]
    fn an_evacuation_spreads_the_tenants_by_headroom_and_names_those_with_nowhere_to_go() {
        let ids: Vec<CellId> = ["a", "b", "c"].map(|s| CellId::new(s).unwrap()).into();
        let (draining, big, small) = (
            cell(100, CellState::Draining),
            cell(100, CellState::Active),
            cell(3, CellState::Active),
        );
        let records = [&draining, &big, &small];
        let candidates = empty_live(&ids, &records);
        let names = tenants(5, "t");
        let mut placed: Vec<Placed> = names
            .iter()
            .map(|tenant| Placed {
                tenant,
                cell: &ids[0],
                requirements: Requirements::default(),
                pinned: false,
            })
            .collect();
        let elsewhere = TenantId::new("stays").unwrap();
        placed.push(Placed {
            tenant: &elsewhere,
            cell: &ids[1],
            requirements: Requirements::default(),
            pinned: false,
        });
        let eu = TenantId::new("eu").unwrap();
        placed.push(Placed {
            tenant: &eu,
            cell: &ids[0],
            requirements: Requirements {
                labels: [("region".to_owned(), "eu".to_owned())].into(),
                ..Default::default()
            },
            pinned: false,
        });
        let (planned, stuck) = evacuation(&candidates, &placed, &ids[0]);
        assert_eq!(stuck, [eu], "no other cell carries its label");
        assert_eq!(planned.len(), 5);
        assert!(planned.iter().all(|p| p.from == ids[0] && p.to != ids[0]));
        let to_small = planned.iter().filter(|p| p.to == ids[2]).count();
        assert_eq!(
            to_small, 0,
            "the big cell keeps the most headroom throughout"
        );
    }

    #[test]
    fn a_rebalance_evens_tenants_by_capacity_with_the_fewest_moves() {
        let ids: Vec<CellId> = ["a", "b", "c", "d"].map(|s| CellId::new(s).unwrap()).into();
        let (active, draining) = (cell(100, CellState::Active), cell(100, CellState::Draining));
        let records = [&active, &active, &active, &draining];
        let candidates = empty_live(&ids, &records);
        let (on_a, on_c, on_d) = (tenants(10, "a"), tenants(2, "c"), tenants(4, "d"));
        let placed: Vec<Placed> = [(&on_a, 0), (&on_c, 2), (&on_d, 3)]
            .into_iter()
            .flat_map(|(names, cell)| names.iter().map(move |tenant| (tenant, cell)))
            .map(|(tenant, cell)| Placed {
                tenant,
                cell: &ids[cell],
                requirements: Requirements::default(),
                pinned: false,
            })
            .collect();
        let planned = rebalance(&candidates, &placed);
        assert_eq!(
            planned.len(),
            6,
            "a holds 6 over its share of 4: {planned:?}"
        );
        assert!(planned.iter().all(|p| p.from == ids[0]));
        let to = |cell: &CellId| planned.iter().filter(|p| &p.to == cell).count();
        assert_eq!((to(&ids[1]), to(&ids[2]), to(&ids[3])), (4, 2, 0));

        let even: Vec<Placed> = placed
            .iter()
            .map(|p| {
                let moved = planned.iter().find(|m| &m.tenant == p.tenant);
                Placed {
                    tenant: p.tenant,
                    cell: moved.map_or(p.cell, |m| &m.to),
                    requirements: Requirements::default(),
                    pinned: false,
                }
            })
            .collect();
        assert!(
            rebalance(&candidates, &even).is_empty(),
            "a balanced placement stays"
        );
    }

    #[test]
    fn tier_and_dedicated_labels_admit_only_their_tier_and_tenant() {
        let labelled = |label: &str, value: &str| {
            let mut record = cell(100, CellState::Active);
            record.labels.insert(label.into(), value.into());
            record
        };
        let (premium_cell, acme_cell, plain) = (
            labelled(TIER_LABEL, "premium"),
            labelled(DEDICATED_LABEL, "acme"),
            cell(100, CellState::Active),
        );
        let asks = |tenant: &str, tier: Tier| Requirements {
            tenant: Some((TenantId::new(tenant).unwrap(), tier)),
            ..Default::default()
        };
        let (acme, beta) = (asks("acme", Tier::Standard), asks("beta", Tier::Premium));
        assert!(!acme.admitted_by(&premium_cell) && beta.admitted_by(&premium_cell));
        assert!(acme.admitted_by(&acme_cell) && !beta.admitted_by(&acme_cell));
        assert!(acme.admitted_by(&plain) && beta.admitted_by(&plain));
        assert!(
            !Requirements::default().admitted_by(&acme_cell),
            "an unnamed tenant gets no dedicated cell"
        );
    }

    #[test]
    fn a_rebalance_leaves_pinned_tenants_where_they_are() {
        let ids: Vec<CellId> = ["a", "b"].map(|s| CellId::new(s).unwrap()).into();
        let active = cell(100, CellState::Active);
        let candidates = empty_live(&ids, &[&active, &active]);
        let names = tenants(4, "p");
        let placed: Vec<Placed> = names
            .iter()
            .enumerate()
            .map(|(n, tenant)| Placed {
                tenant,
                cell: &ids[0],
                requirements: Requirements::default(),
                pinned: n < 3,
            })
            .collect();
        let planned = rebalance(&candidates, &placed);
        assert_eq!(planned.len(), 1, "only the unpinned one moves: {planned:?}");
        assert_eq!(planned[0].tenant, names[3]);
    }
}
