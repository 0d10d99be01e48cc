use cellmail_proto::{CellId, TenantId};

use super::*;

/// The placement's mod revision the driver read.
const REVISION: u64 = 7;
/// When the placement was frozen, for moves past PREPARING.
const FROZEN_AT: u64 = 1_000_000;
const PRECOPY_DETAIL: &str = "pre-copied 1 suppressions, 2 idempotency keys and 3 message records";

fn cell(id: &str) -> CellId {
    CellId::new(id).unwrap()
}

/// A move of tenant `acme` from cell `a` (at epoch 5) to cell `b`, at `step`.
fn moving(step: MoveStep) -> MoveRecord {
    let preparing = step == MoveStep::Preparing;
    MoveRecord {
        id: "m1".to_owned(),
        tenant: TenantId::new("acme").unwrap(),
        from: cell("a"),
        to: cell("b"),
        from_epoch: Epoch(5),
        step,
        detail: if preparing { "" } else { PRECOPY_DETAIL }.to_owned(),
        started_at_ms: 1,
        updated_at_ms: 2,
        frozen_at_ms: if preparing { 0 } else { FROZEN_AT },
        freeze_ms: 0,
        precopy_as_of_ms: if preparing { 0 } else { 900_000 },
        messages_since_ms: if preparing { 0 } else { 800_000 },
        actor: "ops".to_owned(),
        reason: String::new(),
    }
}

/// What a new attempt has seen, `secs` after the freeze.
fn at(secs: u64) -> Observations {
    Observations {
        now_ms: FROZEN_AT + secs * 1000,
        ..Observations::default()
    }
}

fn placed(on: &str, epoch: u64, state: PlacementState) -> PlacementRecord {
    PlacementRecord {
        cell: cell(on),
        epoch: Epoch(epoch),
        state,
    }
}

/// The placement read: on the source at the move's epoch, in `state`.
fn on_source_as(state: PlacementState) -> Option<(PlacementRecord, u64)> {
    Some((placed("a", 5, state), REVISION))
}

fn kept(as_of_ms: u64, epoch: u64) -> Option<Kept> {
    Some(Kept { as_of_ms, epoch })
}

fn copied(suppressions: usize, keys: usize, messages: usize, as_of_ms: u64) -> Option<Copied> {
    Some(Copied {
        suppressions,
        keys,
        messages,
        as_of_ms,
        exact: false,
    })
}

fn down() -> Option<ApiError> {
    Some(ApiError::Unavailable("cell b: down".to_owned()))
}

fn conflict() -> Option<ApiError> {
    Some(ApiError::Aborted("someone else won".to_owned()))
}

fn since(ms: u64, taken_over: bool) -> Since {
    Since { ms, taken_over }
}

fn copy(pass: Pass) -> Action {
    Action::Copy { pass, within: None }
}

fn roll_back(detail: &str, unfreeze: bool) -> Action {
    Action::Write(Change::RollBack {
        detail: detail.to_owned(),
        unfreeze,
    })
}

/// A move prepared with what `kept` says the target kept, pre-copied and with its message
/// records copied (read as of 300 000, exactly or not).
fn prepared(kept_as: Option<Kept>, exact: bool) -> Observations {
    Observations {
        placement: on_source_as(PlacementState::Serving),
        kept: kept_as,
        precopied: copied(1, 2, 0, 200_000),
        messages: Some(Copied {
            exact,
            ..copied(0, 0, 3, 300_000).unwrap()
        }),
        ..at(0)
    }
}

fn freeze(messages_since_ms: u64, written_since: &str) -> Action {
    Action::Write(Change::Freeze {
        placement_revision: REVISION,
        precopy_as_of_ms: 200_000,
        messages_since_ms,
        detail: format!("{PRECOPY_DETAIL}{written_since}"),
    })
}

#[test]
fn each_step_does_what_its_observations_call_for() {
    use MoveStep::{Complete, Frozen, Preparing, RolledBack, Switched};
    use PlacementState::{Frozen as Held, Serving};
    let elsewhere = placed("c", 5, Serving);
    let newer = placed("a", 6, Serving);
    let unfrozen = placed("a", 5, Serving);
    let rows: Vec<(&str, MoveStep, Observations, Action)> = vec![
        // PREPARING
        (
            "an attempt starts by reading the placement",
            Preparing,
            at(0),
            Action::ReadPlacement,
        ),
        (
            "a source still serving at the move's epoch gets its target prepared",
            Preparing,
            Observations {
                placement: on_source_as(Serving),
                ..at(0)
            },
            Action::PrepareTarget,
        ),
        (
            "a tenant placed elsewhere since the request rolls the move back",
            Preparing,
            Observations {
                placement: Some((elsewhere.clone(), REVISION)),
                ..at(0)
            },
            roll_back(
                &format!(
                    "preparing cell b failed: the placement changed since the move started: \
                     {elsewhere:?}"
                ),
                false,
            ),
        ),
        (
            "a placement at a newer epoch rolls the move back",
            Preparing,
            Observations {
                placement: Some((newer.clone(), REVISION)),
                ..at(0)
            },
            roll_back(
                &format!(
                    "preparing cell b failed: the placement changed since the move started: \
                     {newer:?}"
                ),
                false,
            ),
        ),
        (
            "a target that kept nothing is pre-copied everything",
            Preparing,
            Observations {
                placement: on_source_as(Serving),
                kept: kept(0, 0),
                ..at(0)
            },
            copy(Pass::Precopy(since(0, false))),
        ),
        (
            "a target the tenant left earlier is pre-copied what was written since, less the margin",
            Preparing,
            Observations {
                placement: on_source_as(Serving),
                kept: kept(100_000, 2),
                ..at(0)
            },
            copy(Pass::Precopy(since(95_000, false))),
        ),
        (
            "a move straight back pre-copies what the source wrote since it took the tenant over",
            Preparing,
            Observations {
                placement: on_source_as(Serving),
                kept: kept(100_000, 4),
                ..at(0)
            },
            copy(Pass::Precopy(since(95_000, true))),
        ),
        (
            "the message records are copied from the same time as the pre-copy",
            Preparing,
            Observations {
                placement: on_source_as(Serving),
                kept: kept(100_000, 4),
                precopied: copied(1, 2, 0, 200_000),
                ..at(0)
            },
            copy(Pass::Messages(since(95_000, true))),
        ),
        (
            "a pre-copied move freezes the placement at the revision it read",
            Preparing,
            prepared(kept(100_000, 2), false),
            freeze(295_000, " written since the target's hand-over"),
        ),
        (
            "message records read exactly as of a time need no margin",
            Preparing,
            prepared(kept(0, 0), true),
            freeze(300_000, ""),
        ),
        (
            "a move straight back says what its pre-copy started from",
            Preparing,
            prepared(kept(100_000, 4), false),
            freeze(
                295_000,
                " written since the source took the tenant over from the target",
            ),
        ),
        (
            "a first failed attempt is retried after one pause",
            Preparing,
            Observations {
                failure: down(),
                ..at(0)
            },
            Action::Retry(RETRY),
        ),
        (
            "each failed attempt waits longer than the one before",
            Preparing,
            Observations {
                failed_attempts: 2,
                failure: down(),
                ..at(0)
            },
            Action::Retry(RETRY * 3),
        ),
        (
            "the attempt before the last is still retried",
            Preparing,
            Observations {
                failed_attempts: PREPARE_ATTEMPTS - 2,
                failure: down(),
                ..at(0)
            },
            Action::Retry(RETRY * (PREPARE_ATTEMPTS - 1)),
        ),
        (
            "preparing gives up when its last attempt fails",
            Preparing,
            Observations {
                failed_attempts: PREPARE_ATTEMPTS - 1,
                failure: down(),
                ..at(0)
            },
            roll_back("preparing cell b failed: cell b: down", false),
        ),
        (
            "a conflicting change while preparing rolls back at once",
            Preparing,
            Observations {
                failure: conflict(),
                ..at(0)
            },
            roll_back("preparing cell b failed: someone else won", false),
        ),
        // FROZEN
        (
            "a frozen attempt starts by reading the placement",
            Frozen,
            at(3),
            Action::ReadPlacement,
        ),
        (
            "the copy while frozen gets what is left of the freeze budget",
            Frozen,
            Observations {
                placement: on_source_as(Held),
                ..at(3)
            },
            Action::Copy {
                pass: Pass::Final,
                within: Some(Duration::from_secs(7)),
            },
        ),
        (
            "a copy once the budget is spent gets no time",
            Frozen,
            Observations {
                placement: on_source_as(Held),
                ..at(12)
            },
            Action::Copy {
                pass: Pass::Final,
                within: Some(Duration::ZERO),
            },
        ),
        (
            "a frozen placement someone else changed is theirs and stays as it is",
            Frozen,
            Observations {
                placement: Some((unfrozen.clone(), REVISION)),
                ..at(3)
            },
            roll_back(
                &format!("the frozen placement changed meanwhile: {unfrozen:?}"),
                false,
            ),
        ),
        (
            "a finished copy switches the placement at the revision it read",
            Frozen,
            Observations {
                placement: on_source_as(Held),
                frozen_copy: copied(4, 5, 0, 950_000),
                ..at(3)
            },
            Action::Write(Change::Switch {
                placement_revision: REVISION,
                detail: format!(
                    "{PRECOPY_DETAIL}; copied 4 suppressions and 5 idempotency keys while frozen"
                ),
            }),
        ),
        (
            "a copy failing within the freeze budget is retried",
            Frozen,
            Observations {
                placement: on_source_as(Held),
                failure: down(),
                ..at(9)
            },
            Action::Retry(RETRY),
        ),
        (
            "a copy failing once the budget is spent unfreezes the placement on the source",
            Frozen,
            Observations {
                placement: on_source_as(Held),
                failure: down(),
                ..at(10)
            },
            roll_back("copying to cell b failed: cell b: down", true),
        ),
        (
            "a conflicting change while frozen gives up without unfreezing",
            Frozen,
            Observations {
                failure: conflict(),
                ..at(3)
            },
            roll_back("someone else won", false),
        ),
        // SWITCHED
        (
            "a switched move asks the source for its backlog",
            Switched,
            at(20),
            Action::AskBacklog,
        ),
        (
            "a source still delivering is asked again after a pause",
            Switched,
            Observations {
                backlog: Some(3),
                ..at(20)
            },
            Action::Retry(RETRY),
        ),
        (
            "a source that delivered everything hands the message records over",
            Switched,
            Observations {
                backlog: Some(0),
                ..at(20)
            },
            copy(Pass::Handover),
        ),
        (
            "a handed-over move is complete",
            Switched,
            Observations {
                backlog: Some(0),
                handed_over: true,
                ..at(20)
            },
            Action::Write(Change::Complete),
        ),
        (
            "a failure after the switch is retried, never rolled back",
            Switched,
            Observations {
                failed_attempts: 100,
                failure: down(),
                ..at(600)
            },
            Action::Retry(RETRY),
        ),
        // Finished
        (
            "a complete move has nothing left to do",
            Complete,
            at(30),
            Action::Done,
        ),
        (
            "a rolled-back move has nothing left to do",
            RolledBack,
            at(30),
            Action::Done,
        ),
    ];
    for (behaviour, step, seen, expected) in rows {
        assert_eq!(next(&moving(step), &seen), expected, "{behaviour}");
    }
}

#[test]
fn each_change_writes_its_step_its_audit_and_the_placement_it_moves() {
    let now = FROZEN_AT + 4_000;
    let on = |on: &str, epoch, state, revision| {
        Some(PlacementWrite {
            record: placed(on, epoch, state),
            revision,
        })
    };
    let rows = [
        (
            "a freeze holds the placement on the source from now",
            MoveStep::Preparing,
            Change::Freeze {
                placement_revision: REVISION,
                precopy_as_of_ms: 200_000,
                messages_since_ms: 295_000,
                detail: PRECOPY_DETAIL.to_owned(),
            },
            MoveRecord {
                step: MoveStep::Frozen,
                detail: PRECOPY_DETAIL.to_owned(),
                frozen_at_ms: now,
                precopy_as_of_ms: 200_000,
                messages_since_ms: 295_000,
                ..moving(MoveStep::Preparing)
            },
            "tenant.move.freeze",
            on("a", 5, PlacementState::Frozen, Some(REVISION)),
        ),
        (
            "a switch serves the tenant on the target at the next epoch and says how long it froze",
            MoveStep::Frozen,
            Change::Switch {
                placement_revision: REVISION,
                detail: "copied".to_owned(),
            },
            MoveRecord {
                step: MoveStep::Switched,
                detail: "copied".to_owned(),
                freeze_ms: 4_000,
                ..moving(MoveStep::Frozen)
            },
            "tenant.move.switch",
            on("b", 6, PlacementState::Serving, Some(REVISION)),
        ),
        (
            "completing leaves the placement alone",
            MoveStep::Switched,
            Change::Complete,
            MoveRecord {
                step: MoveStep::Complete,
                ..moving(MoveStep::Switched)
            },
            "tenant.move.complete",
            None,
        ),
        (
            "an unfreeze serves the tenant on the source again, whoever wrote the placement since",
            MoveStep::Frozen,
            Change::RollBack {
                detail: "copying failed".to_owned(),
                unfreeze: true,
            },
            MoveRecord {
                step: MoveStep::RolledBack,
                detail: "copying failed".to_owned(),
                freeze_ms: 4_000,
                ..moving(MoveStep::Frozen)
            },
            "tenant.move.rollback",
            on("a", 5, PlacementState::Serving, None),
        ),
        (
            "a roll back without unfreeze leaves the placement and the freeze time alone",
            MoveStep::Preparing,
            Change::RollBack {
                detail: "preparing failed".to_owned(),
                unfreeze: false,
            },
            MoveRecord {
                step: MoveStep::RolledBack,
                detail: "preparing failed".to_owned(),
                ..moving(MoveStep::Preparing)
            },
            "tenant.move.rollback",
            None,
        ),
    ];
    for (behaviour, step, change, after, audit, placement) in rows {
        let expected = Written {
            after: MoveRecord {
                updated_at_ms: now,
                ..after
            },
            audit,
            placement,
        };
        assert_eq!(change.apply(&moving(step), now), expected, "{behaviour}");
    }
}

#[test]
fn each_pass_reads_from_its_own_time() {
    let record = moving(MoveStep::Frozen);
    let given = since(95_000, true);
    let rows = [
        (Pass::Precopy(given), given, false),
        (Pass::Messages(given), given, true),
        (Pass::Final, since(900_000, false), false),
        (Pass::Handover, since(800_000, false), true),
    ];
    for (pass, from, messages) in rows {
        assert_eq!(pass.since(&record), from, "{pass:?}");
        assert_eq!(pass.messages(), messages, "{pass:?}");
    }
}

#[test]
fn a_retry_starts_afresh_counting_the_failed_attempt() {
    let mut seen = Observations {
        placement: on_source_as(PlacementState::Serving),
        failure: down(),
        failed_attempts: 1,
        ..at(5)
    };
    seen.copied(Pass::Handover, Copied::default());
    assert!(seen.handed_over);
    assert_eq!(
        seen.retry(),
        Observations {
            failed_attempts: 2,
            ..Observations::default()
        }
    );
}

/// Runs a move the way the driver does, against cells that answer at once.
#[test]
fn an_untroubled_move_prepares_freezes_copies_switches_drains_and_completes() {
    let mut record = moving(MoveStep::Preparing);
    let mut placement = placed("a", 5, PlacementState::Serving);
    let mut taken = Vec::new();
    while !record.step.finished() {
        let mut seen = at(1);
        let change = loop {
            match next(&record, &seen) {
                Action::ReadPlacement => {
                    taken.push("read the placement");
                    seen.placement = Some((placement.clone(), REVISION));
                }
                Action::PrepareTarget => {
                    taken.push("prepare the target");
                    seen.kept = kept(0, 0);
                }
                Action::Copy { pass, .. } => {
                    taken.push(match pass {
                        Pass::Precopy(_) => "pre-copy",
                        Pass::Messages(_) => "copy the message records",
                        Pass::Final => "copy while frozen",
                        Pass::Handover => "hand the message records over",
                    });
                    seen.copied(pass, Copied::default());
                }
                Action::AskBacklog => {
                    taken.push("ask the backlog");
                    seen.backlog = Some(0);
                }
                Action::Write(change) => {
                    taken.push(match change {
                        Change::Freeze { .. } => "freeze",
                        Change::Switch { .. } => "switch",
                        Change::Complete => "complete",
                        Change::RollBack { .. } => "roll back",
                    });
                    break change;
                }
                other @ (Action::Retry(_) | Action::Done) => panic!("{other:?} after {taken:?}"),
            }
        };
        let written = change.apply(&record, seen.now_ms);
        if let Some(write) = written.placement {
            placement = write.record;
        }
        record = written.after;
    }
    assert_eq!(record.step, MoveStep::Complete);
    assert_eq!(placement, placed("b", 6, PlacementState::Serving));
    assert_eq!(
        taken,
        [
            "read the placement",
            "prepare the target",
            "pre-copy",
            "copy the message records",
            "freeze",
            "read the placement",
            "copy while frozen",
            "switch",
            "ask the backlog",
            "hand the message records over",
            "complete",
        ]
    );
}
