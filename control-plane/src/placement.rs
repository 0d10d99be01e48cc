//! Where a new tenant goes: the ACTIVE, live cell with the most headroom (capacity minus the
//! tenants already placed there), ties broken by cell id so the choice is deterministic.

use cellmail_proto::CellId;

use crate::schema::{CellRecord, CellState};

/// A cell as placement sees it.
pub struct Candidate<'a> {
    pub id: &'a CellId,
    pub record: &'a CellRecord,
    pub alive: bool,
    pub tenants: u32,
}

pub fn choose<'a>(candidates: impl IntoIterator<Item = Candidate<'a>>) -> Option<&'a CellId> {
    candidates
        .into_iter()
        .filter(|c| c.alive && c.record.state == CellState::Active && c.tenants < c.record.capacity)
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
            choose([
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
            ])
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
            choose([
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
            ]),
            None
        );
    }
}
