//! The order a cell sends its received mail in, kept apart from the IO that fills and
//! drains it.
//!
//! Each tenant has a lane per class. Transactional lanes go before marketing ones; within a
//! class, tenants take turns, and a tenant's turn sends as many messages as its weight (its
//! tier's: a premium tenant sends more per turn). The lanes also note which of them have
//! mail parked in the store behind them; the worker keeps those notes, as parking is its IO.

use std::collections::{HashMap, HashSet, VecDeque};

use cellmail_proto::{MessageClass, MessageId, TenantId};

/// A tenant's place in the turn order of one class.
struct Turn {
    tenant: TenantId,
    /// Messages it may still send this turn.
    left: u32,
    weight: u32,
}

fn class_index(class: MessageClass) -> usize {
    match class {
        MessageClass::Transactional => 0,
        MessageClass::Marketing => 1,
    }
}

/// The lanes: each tenant's received messages per class, and the turn order.
pub struct Lanes<T> {
    lanes: HashMap<(MessageClass, TenantId), VecDeque<T>>,
    /// Per class, transactional first: tenants whose lane is not empty, in turn order.
    turns: [VecDeque<Turn>; 2],
    buffered: usize,
    /// Lanes with messages parked in the store.
    pub parked: HashSet<(MessageClass, TenantId)>,
    /// Parked messages loaded into a lane and not settled yet.
    pub loaded: HashSet<MessageId>,
    /// Paused lanes whose parked messages are marked held, for as long as the pause lasts.
    pub holding: HashSet<(MessageClass, TenantId)>,
}

impl<T> Default for Lanes<T> {
    fn default() -> Self {
        Self {
            lanes: HashMap::new(),
            turns: Default::default(),
            buffered: 0,
            parked: HashSet::new(),
            loaded: HashSet::new(),
            holding: HashSet::new(),
        }
    }
}

impl<T> Lanes<T> {
    /// Messages all lanes hold together.
    pub fn buffered(&self) -> usize {
        self.buffered
    }

    pub fn len(&self, class: MessageClass, tenant: &TenantId) -> usize {
        self.lanes
            .get(&(class, tenant.clone()))
            .map_or(0, VecDeque::len)
    }

    /// Appends `item` to the tenant's lane of `class`; a tenant new to the turn order joins
    /// it last, sending `weight` messages per turn.
    pub fn push(&mut self, class: MessageClass, tenant: TenantId, item: T, weight: u32) {
        let lane = self.lanes.entry((class, tenant.clone())).or_default();
        if lane.is_empty() {
            self.turns[class_index(class)].push_back(Turn {
                tenant,
                left: weight,
                weight,
            });
        }
        lane.push_back(item);
        self.buffered += 1;
    }

    /// The next message to send: the first class with mail, the tenant whose turn it is.
    pub fn pop(&mut self) -> Option<T> {
        for class in MessageClass::ALL {
            let turns = &mut self.turns[class_index(class)];
            let Some(mut turn) = turns.pop_front() else {
                continue;
            };
            let key = (class, turn.tenant.clone());
            let lane = self.lanes.get_mut(&key)?;
            let item = lane.pop_front()?;
            self.buffered -= 1;
            if lane.is_empty() {
                self.lanes.remove(&key);
            } else if turn.left > 1 {
                turn.left -= 1;
                turns.push_front(turn);
            } else {
                turn.left = turn.weight;
                turns.push_back(turn);
            }
            return Some(item);
        }
        None
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Puts a message labelled `tenant/class initial` in the tenant's lane.
    fn push(lanes: &mut Lanes<String>, tenant: &str, class: MessageClass, weight: u32) {
        let label = format!("{tenant}/{}", &class.as_str()[..1]);
        lanes.push(class, TenantId::new(tenant).unwrap(), label, weight);
    }

    #[test]
    fn lanes_serve_transactional_first_then_tenants_in_turn_by_weight() {
        let mut lanes = Lanes::default();
        for _ in 0..6 {
            push(&mut lanes, "premium", MessageClass::Marketing, 4);
            push(&mut lanes, "standard", MessageClass::Marketing, 1);
        }
        push(&mut lanes, "standard", MessageClass::Transactional, 1);
        let order: Vec<String> = std::iter::from_fn(|| lanes.pop()).collect();
        assert_eq!(
            order,
            [
                "standard/t",
                "premium/m",
                "premium/m",
                "premium/m",
                "premium/m",
                "standard/m",
                "premium/m",
                "premium/m",
                "standard/m",
                "standard/m",
                "standard/m",
                "standard/m",
                "standard/m",
            ]
        );
        assert_eq!(lanes.buffered, 0);
    }
}
