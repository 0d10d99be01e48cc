//! Where a new tenant goes: among the ACTIVE, live cells that meet its requirements (a cell it
//! is pinned to, labels the cell must carry), the one with the most headroom (capacity minus
//! the tenants already placed there), ties broken by cell id so the choice is deterministic.

use std::collections::BTreeMap;

use cellmail_proto::CellId;

use crate::schema::{CellRecord, CellState};

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
}

impl Requirements {
    fn met_by(&self, candidate: &Candidate) -> bool {
        self.cell
            .as_ref()
            .is_none_or(|pinned| pinned == candidate.id)
            && self
                .labels
                .iter()
                .all(|(key, value)| candidate.record.labels.get(key) == Some(value))
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

#[cfg(test)]
mod tests {
    use super::*;

    fn cell(capacity: u32, state: CellState) -> CellRecord {
        CellRecord {
            endpoint: String::new(),
            capacity,
            state,
            labels: Default::default(),
            version: String::new(),
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
        };
        assert_eq!(pick(nowhere), None);
    }
}
