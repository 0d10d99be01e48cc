//! Whether this cell may accept a send for a tenant at the epoch the router stamped on it.
//!
//! The registry's placement is the truth; the cell's view of it may lag the router's by a
//! watch event. A send stamped with an older epoch than the cell knows, or for a tenant the
//! cell knows is elsewhere, is refused as moved; a send stamped with a newer epoch than the
//! cell has seen (or for a tenant it has not seen) means the cell's view is behind, and the
//! cell waits briefly for it before deciding. A placement frozen by a move is owned by no
//! one until it is switched: calls for it are refused as moved, and the router holds them.

use cellmail_proto::{CellId, Epoch};

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Verdict {
    Owned,
    Moved,
    /// The cell has not yet seen the placement the router acted on.
    Behind,
}

/// The cell's view of a tenant's placement.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Known<'a> {
    pub cell: &'a CellId,
    pub epoch: Epoch,
    pub frozen: bool,
}

pub fn check(this_cell: &CellId, known: Option<Known>, stamped: Epoch) -> Verdict {
    match known {
        None => Verdict::Behind,
        Some(known) if stamped > known.epoch => Verdict::Behind,
        Some(known) if stamped == known.epoch && known.cell == this_cell && !known.frozen => {
            Verdict::Owned
        }
        Some(_) => Verdict::Moved,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn only_the_current_unfrozen_epoch_on_this_cell_is_owned() {
        let (me, other) = (CellId::new("a").unwrap(), CellId::new("b").unwrap());
        let at = |cell, epoch, frozen| {
            Some(Known {
                cell,
                epoch: Epoch(epoch),
                frozen,
            })
        };
        assert_eq!(check(&me, at(&me, 3, false), Epoch(3)), Verdict::Owned);
        assert_eq!(
            check(&me, at(&me, 3, false), Epoch(2)),
            Verdict::Moved,
            "stale epoch"
        );
        assert_eq!(
            check(&me, at(&other, 3, false), Epoch(3)),
            Verdict::Moved,
            "placed elsewhere"
        );
        assert_eq!(
            check(&me, at(&me, 3, true), Epoch(3)),
            Verdict::Moved,
            "frozen by a move"
        );
        assert_eq!(check(&me, at(&me, 3, false), Epoch(4)), Verdict::Behind);
        assert_eq!(check(&me, None, Epoch(1)), Verdict::Behind);
    }
}
