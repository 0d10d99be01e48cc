//! What a move does next: a pure function of its persisted step and of what its driver has
//! seen so far in the step's current attempt, so that every path of a move, and every way
//! one fails, is tested with no registry, no cell and no clock.
//!
//! The driver ([`super::Mover`]) reads the move's record and asks [`next`] what to do; it
//! does that (a registry read, a call to a cell, a pause), notes what it saw in the
//! [`Observations`] and asks again, until the answer is a [`Change`] of the step. It writes
//! the change (with the tenant's placement, when the change moves it) in one transaction and
//! starts the next step from a fresh read. A failed attempt starts again from the top with
//! fresh observations after a pause ([`Action::Retry`]), unless the failure ends the move.

use std::time::Duration;

use cellmail_proto::{ApiError, Epoch};
use cellmail_registry::schema::{MoveRecord, MoveStep, PlacementRecord, PlacementState};

/// How long a copy may keep failing while the placement is frozen before the move is rolled
/// back (routers answer the tenant's calls UNAVAILABLE after their own, shorter hold).
pub const FREEZE_BUDGET: Duration = Duration::from_secs(10);
/// How far before a time another cell's clock gave (what the target kept is current as of
/// its hand-over), or a message id's time, a copy starts: those are stamped before their
/// writes commit, and clocks differ between cells.
pub const PRECOPY_MARGIN: Duration = Duration::from_secs(5);
/// Pause between attempts of a step that failed, and between backlog checks.
pub const RETRY: Duration = Duration::from_millis(250);
/// Attempts to prepare the target before the move is given up.
pub const PREPARE_ATTEMPTS: u32 = 8;

/// [`PRECOPY_MARGIN`] in milliseconds.
fn margin() -> u64 {
    PRECOPY_MARGIN.as_millis() as u64
}

/// From when a pre-copy reads what the source wrote of the tenant.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Since {
    /// The source's clock (0: all of it).
    pub ms: u64,
    /// Instead, from when the source took the tenant over (its clock), if it noted that: the
    /// target is the cell it took the tenant over from, and kept what it had.
    pub taken_over: bool,
}

/// Which of a move's copies.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Pass {
    /// While the source still serves the tenant: its suppression list and idempotency window
    /// as written since the given time.
    Precopy(Since),
    /// While frozen: the suppressions and keys written since the pre-copy.
    Final,
    /// Before the freeze: the tenant's message records (status and events) written since the
    /// given time, so that GetMessage answers for them on the target, and
    /// its figures (stats and breaker minutes, each cell's part whole), so that its stats,
    /// daily cap and breakers go on from them.
    Messages(Since),
    /// Once the source has delivered: the message records written since the pre-copy (with
    /// the tenant's figures, as [`Pass::Messages`] carries them too). The source then keeps
    /// that what it has of the tenant is current as of that time, so a move back to it
    /// starts from there.
    Handover,
}

impl Pass {
    /// From when the source reads this pass of `record`'s tenant.
    pub fn since(self, record: &MoveRecord) -> Since {
        let from = |ms| Since {
            ms,
            taken_over: false,
        };
        match self {
            Pass::Precopy(since) | Pass::Messages(since) => since,
            Pass::Final => from(record.precopy_as_of_ms),
            Pass::Handover => from(record.messages_since_ms),
        }
    }

    /// Whether this pass carries message records rather than suppressions and keys.
    pub fn messages(self) -> bool {
        matches!(self, Pass::Messages(_) | Pass::Handover)
    }
}

/// What a copy carried, and when the source read it.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Copied {
    pub suppressions: usize,
    pub keys: usize,
    pub messages: usize,
    pub as_of_ms: u64,
    /// The source read exactly as of `as_of_ms`.
    pub exact: bool,
}

/// What the target kept of an earlier stay of the tenant, as its prepare answered.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Kept {
    /// When it handed the tenant over (its clock); 0: it kept nothing usable.
    pub as_of_ms: u64,
    /// The epoch the tenant had there at that hand-over.
    pub epoch: u64,
}

/// What the driver has seen in the current attempt of the move's step.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct Observations {
    pub now_ms: u64,
    /// Attempts of this step that failed before this one, on this driver.
    pub failed_attempts: u32,
    /// What ended this attempt.
    pub failure: Option<ApiError>,
    /// The tenant's placement and its mod revision.
    pub placement: Option<(PlacementRecord, u64)>,
    pub kept: Option<Kept>,
    pub precopied: Option<Copied>,
    pub messages: Option<Copied>,
    /// The copy made while frozen.
    pub frozen_copy: Option<Copied>,
    /// The tenant's messages the source has yet to deliver.
    pub backlog: Option<u64>,
    pub handed_over: bool,
}

impl Observations {
    /// Notes what `pass` copied.
    pub fn copied(&mut self, pass: Pass, copied: Copied) {
        match pass {
            Pass::Precopy(_) => self.precopied = Some(copied),
            Pass::Messages(_) => self.messages = Some(copied),
            Pass::Final => self.frozen_copy = Some(copied),
            Pass::Handover => self.handed_over = true,
        }
    }

    /// A fresh start for the attempt after this failed one.
    pub fn retry(&self) -> Self {
        Self {
            failed_attempts: self.failed_attempts + 1,
            ..Self::default()
        }
    }
}

/// What the driver does next.
#[derive(Debug, Clone, PartialEq)]
pub enum Action {
    /// Read the tenant's placement and its mod revision.
    ReadPlacement,
    /// Have the target get ready for the tenant at the next epoch, and say what it kept.
    PrepareTarget,
    /// Export `pass` from the source into the target; a copy still going after `within`
    /// fails.
    Copy {
        pass: Pass,
        within: Option<Duration>,
    },
    /// Ask the source how many of the tenant's messages it has yet to deliver.
    AskBacklog,
    /// Pause, then attempt the step again.
    Retry(Duration),
    /// Write the step's change.
    Write(Change),
    /// The move is finished.
    Done,
}

/// A change of the move's step.
#[derive(Debug, Clone, PartialEq)]
pub enum Change {
    /// The target is ready and pre-copied: freeze the placement (still at `placement_revision`).
    Freeze {
        placement_revision: u64,
        precopy_as_of_ms: u64,
        messages_since_ms: u64,
        detail: String,
    },
    /// Copied while frozen: switch the placement (still at `placement_revision`) to the target.
    Switch {
        placement_revision: u64,
        detail: String,
    },
    /// The source delivered and handed the message records over.
    Complete,
    /// Given up; with `unfreeze`, the placement serves on the source again.
    RollBack { detail: String, unfreeze: bool },
}

/// A placement a change writes.
#[derive(Debug, Clone, PartialEq)]
pub struct PlacementWrite {
    pub record: PlacementRecord,
    /// The mod revision the placement must still be at; `None`: whatever it is when written
    /// (an unfreeze puts the source back, whoever wrote since).
    pub revision: Option<u64>,
}

/// What a change writes, in one transaction.
#[derive(Debug, Clone, PartialEq)]
pub struct Written {
    pub after: MoveRecord,
    /// The audit entry's action.
    pub audit: &'static str,
    pub placement: Option<PlacementWrite>,
}

/// The tenant's placement on the move's source, at the epoch the move started from.
fn on_source(record: &MoveRecord, state: PlacementState) -> PlacementRecord {
    PlacementRecord {
        cell: record.from.clone(),
        epoch: record.from_epoch,
        state,
    }
}

impl Change {
    /// What this change of `before` writes at `now_ms`.
    pub fn apply(self, before: &MoveRecord, now_ms: u64) -> Written {
        let freeze_ms = now_ms.saturating_sub(before.frozen_at_ms);
        let (after, audit, placement) = match self {
            Change::Freeze {
                placement_revision,
                precopy_as_of_ms,
                messages_since_ms,
                detail,
            } => (
                MoveRecord {
                    step: MoveStep::Frozen,
                    detail,
                    frozen_at_ms: now_ms,
                    precopy_as_of_ms,
                    messages_since_ms,
                    ..before.clone()
                },
                "tenant.move.freeze",
                Some((
                    on_source(before, PlacementState::Frozen),
                    Some(placement_revision),
                )),
            ),
            Change::Switch {
                placement_revision,
                detail,
            } => {
                let target = PlacementRecord {
                    cell: before.to.clone(),
                    epoch: Epoch(before.from_epoch.0 + 1),
                    state: PlacementState::Serving,
                };
                let after = MoveRecord {
                    step: MoveStep::Switched,
                    detail,
                    freeze_ms,
                    ..before.clone()
                };
                (
                    after,
                    "tenant.move.switch",
                    Some((target, Some(placement_revision))),
                )
            }
            Change::Complete => (
                MoveRecord {
                    step: MoveStep::Complete,
                    ..before.clone()
                },
                "tenant.move.complete",
                None,
            ),
            Change::RollBack { detail, unfreeze } => (
                MoveRecord {
                    step: MoveStep::RolledBack,
                    detail,
                    freeze_ms: if unfreeze {
                        freeze_ms
                    } else {
                        before.freeze_ms
                    },
                    ..before.clone()
                },
                "tenant.move.rollback",
                unfreeze.then(|| (on_source(before, PlacementState::Serving), None)),
            ),
        };
        Written {
            after: MoveRecord {
                updated_at_ms: now_ms,
                ..after
            },
            audit,
            placement: placement.map(|(record, revision)| PlacementWrite { record, revision }),
        }
    }
}

/// What the driver of `record`'s move does next, having seen `seen` in this attempt.
pub fn next(record: &MoveRecord, seen: &Observations) -> Action {
    match record.step {
        MoveStep::Preparing => preparing(record, seen),
        MoveStep::Frozen => frozen(record, seen),
        MoveStep::Switched => switched(seen),
        MoveStep::Complete | MoveStep::RolledBack => Action::Done,
    }
}

fn roll_back(detail: String, unfreeze: bool) -> Action {
    Action::Write(Change::RollBack { detail, unfreeze })
}

/// What is pre-copied to a target that kept `kept`. What it kept of an earlier stay is
/// current as of its hand-over: only what was written since is copied. When the source took
/// the tenant over from the target itself (at the epoch after that hand-over), that is what
/// the source wrote since it took it over, on its own clock; otherwise what was written since
/// the hand-over, on the target's clock less the margin.
fn since(kept: Kept, from_epoch: Epoch) -> Since {
    match kept.as_of_ms {
        0 => Since {
            ms: 0,
            taken_over: false,
        },
        as_of => Since {
            ms: as_of.saturating_sub(margin()),
            taken_over: kept.epoch + 1 == from_epoch.0,
        },
    }
}

/// PREPARING: the source must still serve at the move's epoch; the target is prepared and
/// pre-copied, then the placement is frozen. A failure is retried with a growing pause, up
/// to [`PREPARE_ATTEMPTS`]; a conflicting change ends the move at once.
fn preparing(record: &MoveRecord, seen: &Observations) -> Action {
    let give_up = |why: &dyn std::fmt::Display| {
        roll_back(format!("preparing cell {} failed: {why}", record.to), false)
    };
    if let Some(err) = &seen.failure {
        let attempt = seen.failed_attempts + 1;
        return match err {
            ApiError::Aborted(_) => give_up(err),
            _ if attempt >= PREPARE_ATTEMPTS => give_up(err),
            _ => Action::Retry(RETRY * attempt),
        };
    }
    let Some((placement, placement_revision)) = &seen.placement else {
        return Action::ReadPlacement;
    };
    if *placement != on_source(record, PlacementState::Serving) {
        return give_up(&format!(
            "the placement changed since the move started: {placement:?}"
        ));
    }
    let Some(kept) = seen.kept else {
        return Action::PrepareTarget;
    };
    let since = since(kept, record.from_epoch);
    let copy = |pass| Action::Copy { pass, within: None };
    let Some(precopied) = seen.precopied else {
        return copy(Pass::Precopy(since));
    };
    let Some(messages) = seen.messages else {
        return copy(Pass::Messages(since));
    };
    let detail = format!(
        "pre-copied {} suppressions, {} idempotency keys and {} message records{}",
        precopied.suppressions,
        precopied.keys,
        messages.messages,
        match since {
            Since {
                taken_over: true, ..
            } => " written since the source took the tenant over from the target",
            Since { ms: 0, .. } => "",
            _ => " written since the target's hand-over",
        }
    );
    // A source that read its records exactly as of a time needs no margin.
    let messages_since_ms = if messages.exact {
        messages.as_of_ms
    } else {
        messages.as_of_ms.saturating_sub(margin())
    };
    Action::Write(Change::Freeze {
        placement_revision: *placement_revision,
        precopy_as_of_ms: precopied.as_of_ms,
        messages_since_ms,
        detail,
    })
}

/// FROZEN: what was written since the pre-copy is copied within what is left of the
/// [`FREEZE_BUDGET`], then the placement switches to the target. A copy failing past the
/// budget unfreezes the placement on the source; a placement someone else changed is theirs.
fn frozen(record: &MoveRecord, seen: &Observations) -> Action {
    let spent = Duration::from_millis(seen.now_ms.saturating_sub(record.frozen_at_ms));
    match &seen.failure {
        // Someone else changed the placement: it is theirs now, and stays as it is.
        Some(err @ ApiError::Aborted(_)) => return roll_back(err.to_string(), false),
        Some(err) if spent >= FREEZE_BUDGET => {
            let detail = format!("copying to cell {} failed: {err}", record.to);
            return roll_back(detail, true);
        }
        Some(_) => return Action::Retry(RETRY),
        None => {}
    }
    let Some((placement, placement_revision)) = &seen.placement else {
        return Action::ReadPlacement;
    };
    if *placement != on_source(record, PlacementState::Frozen) {
        let changed = format!("the frozen placement changed meanwhile: {placement:?}");
        return roll_back(changed, false);
    }
    // A copy that hangs must not keep the tenant frozen past the budget.
    let Some(copied) = seen.frozen_copy else {
        return Action::Copy {
            pass: Pass::Final,
            within: Some(FREEZE_BUDGET.saturating_sub(spent)),
        };
    };
    Action::Write(Change::Switch {
        placement_revision: *placement_revision,
        detail: format!(
            "{}; copied {} suppressions and {} idempotency keys while frozen",
            record.detail, copied.suppressions, copied.keys
        ),
    })
}

/// SWITCHED: once the source's backlog of the tenant is zero, the message records are handed
/// over and the move is complete. Past the switch nothing rolls back: failures are retried.
fn switched(seen: &Observations) -> Action {
    if seen.failure.is_some() {
        return Action::Retry(RETRY);
    }
    match seen.backlog {
        None => Action::AskBacklog,
        Some(0) if seen.handed_over => Action::Write(Change::Complete),
        Some(0) => Action::Copy {
            pass: Pass::Handover,
            within: None,
        },
        Some(_) => Action::Retry(RETRY),
    }
}

#[cfg(test)]
mod tests;
