//! Whether this cell may accept a send for a tenant at the epoch the router stamped on it.
//!
//! The registry's placement is the truth; the cell's view of it may lag the router's by a
//! watch event. A send stamped with an older epoch than the cell knows, or for a tenant the
//! cell knows is elsewhere, is refused as moved; a send stamped with a newer epoch than the
//! cell has seen (or for a tenant it has not seen) means the cell's view is behind, and the
//! cell waits briefly for it before deciding.

use cellmail_proto::{CellId, Epoch};

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Verdict {
    Owned,
    Moved,
    /// The cell has not yet seen the placement the router acted on.
    Behind,
}

/// `known` is the cell's view of the tenant's placement: (cell, epoch).
pub fn check(this_cell: &CellId, known: Option<(&CellId, Epoch)>, stamped: Epoch) -> Verdict {
    match known {
        None => Verdict::Behind,
        Some((_, epoch)) if stamped > epoch => Verdict::Behind,
        Some((cell, epoch)) if stamped == epoch && cell == this_cell => Verdict::Owned,
        Some(_) => Verdict::Moved,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn only_the_current_epoch_on_this_cell_is_owned() {
        let (me, other) = (CellId::new("a").unwrap(), CellId::new("b").unwrap());
        assert_eq!(check(&me, Some((&me, Epoch(3))), Epoch(3)), Verdict::Owned);
        assert_eq!(
            check(&me, Some((&me, Epoch(3))), Epoch(2)),
            Verdict::Moved,
            "stale epoch"
        );
        assert_eq!(
            check(&me, Some((&other, Epoch(3))), Epoch(3)),
            Verdict::Moved,
            "placed elsewhere"
        );
        assert_eq!(check(&me, Some((&me, Epoch(3))), Epoch(4)), Verdict::Behind);
        assert_eq!(check(&me, None, Epoch(1)), Verdict::Behind);
    }
}
