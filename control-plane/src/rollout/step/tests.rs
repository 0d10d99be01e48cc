use cellmail_registry::schema::GateConfig;

use super::*;

/// The time of the scan.
const NOW: u64 = 10_000_000;
const READY_TIMEOUT_MS: u64 = 120_000;
const BAKE_MS: u64 = 300_000;

fn cell(id: &str) -> CellId {
    CellId::new(id).unwrap()
}

fn cells(ids: &[&str]) -> Vec<CellId> {
    ids.iter().map(|id| cell(id)).collect()
}

fn to(version: &str, ids: &[&str]) -> Vec<(CellId, String)> {
    ids.iter()
        .map(|id| (cell(id), version.to_owned()))
        .collect()
}

fn waves() -> Vec<WaveRecord> {
    [&["c1"][..], &["c2", "c3"], &["c4"]]
        .into_iter()
        .map(|ids| WaveRecord {
            cells: cells(ids),
            state: WaveState::Pending,
            previous: BTreeMap::new(),
            before: None,
            ready_by_ms: 0,
            bake_until_ms: 0,
            baseline: Vec::new(),
            checks: Vec::new(),
            rollback_deployed: false,
        })
        .collect()
}

/// A rollout of v2 (from v1) at wave `index` (the earlier ones passed), that wave in `state`,
/// its ready timeout and bake both ending just after [`NOW`].
fn at_wave(index: usize, state: WaveState) -> RolloutRecord {
    let mut waves = waves();
    for wave in &mut waves[..index] {
        wave.state = WaveState::Passed;
    }
    let wave = &mut waves[index];
    wave.state = state;
    if state != WaveState::Pending {
        wave.previous = wave
            .cells
            .iter()
            .map(|c| (c.clone(), "v1".into()))
            .collect();
        wave.before = Some(healthy());
        wave.ready_by_ms = NOW + 1;
        wave.bake_until_ms = NOW + 1;
    }
    RolloutRecord {
        id: "r1".to_owned(),
        version: "v2".to_owned(),
        waves,
        wave: index,
        state: RolloutState::Running,
        bake_ms: BAKE_MS,
        ready_timeout_ms: READY_TIMEOUT_MS,
        gate: GateConfig::default(),
        aborted: false,
        detail: String::new(),
        next_attempt_ms: 0,
        actor: "ops".to_owned(),
        reason: String::new(),
        started_at_ms: 1,
        updated_at_ms: 2,
    }
}

/// The second wave (cells c2 and c3) in `state`.
fn second(state: WaveState) -> RolloutRecord {
    at_wave(1, state)
}

fn with(mut record: RolloutRecord, change: impl FnOnce(&mut RolloutRecord)) -> RolloutRecord {
    change(&mut record);
    record
}

fn scan() -> Observations {
    Observations {
        now_ms: NOW,
        deployer: true,
        ..Observations::default()
    }
}

/// Figures of 1000 sends and accepts, `failures` of the sends failed.
fn figures(failures: u64) -> HealthFigures {
    HealthFigures {
        window_secs: 300,
        accepts: 1000,
        accept_p99_us: 4_000,
        send_attempts: 1000,
        send_failures: failures,
        sent: 1000 - failures,
        ..HealthFigures::default()
    }
}

fn healthy() -> HealthFigures {
    figures(5)
}

fn failing() -> HealthFigures {
    figures(400)
}

fn v1_on(ids: &[&str]) -> BTreeMap<CellId, String> {
    to("v1", ids).into_iter().collect()
}

fn boom() -> Option<Result<(), String>> {
    Some(Err("boom".to_owned()))
}

fn waiting() -> Option<Result<(), String>> {
    Some(Err("cell c3 runs v1, not v2".to_owned()))
}

#[test]
fn each_wave_step_does_what_its_observations_call_for() {
    use WaveState::{Baking, Deploying, Passed, Pending, Readying, RolledBack, RollingBack};
    let baked = Observations {
        now_ms: NOW + 1,
        ..scan()
    };
    let measured = |wave| Observations {
        figures: Some(Ok(wave)),
        ..baked.clone()
    };
    let against = |wave, baseline: Vec<(CellId, HealthFigures)>| Observations {
        baseline: Some(baseline),
        ..measured(wave)
    };
    let judged =
        |wave, baseline: &HealthFigures| gate::checks(&wave, baseline, &GateConfig::default());
    let rolled_back = with(second(RollingBack), |r| r.waves[1].rollback_deployed = true);
    // The ready timeout ends at NOW + 1: the wait is over only after it.
    let at_ready_by = Observations {
        now_ms: NOW + 1,
        ..scan()
    };
    let past_ready = Observations {
        now_ms: NOW + 2,
        ..scan()
    };
    let rows: Vec<(&str, RolloutRecord, Observations, Next)> = vec![
        // Pause, retry and deployer
        (
            "a paused rollout waits",
            with(second(Deploying), |r| r.state = RolloutState::Paused),
            scan(),
            Next::Wait,
        ),
        (
            "a paused rollout still finishes its rollback",
            with(second(RollingBack), |r| r.state = RolloutState::Paused),
            scan(),
            Next::Deploy(to("v1", &["c2", "c3"])),
        ),
        (
            "a rollout waits out the pause after a failed rollback deploy",
            with(second(RollingBack), |r| r.next_attempt_ms = NOW + 1),
            scan(),
            Next::Wait,
        ),
        (
            "without a deployer nothing moves and the rollout says why",
            second(Pending),
            Observations {
                deployer: false,
                ..scan()
            },
            Next::Write(Change::NoDeployer),
        ),
        (
            "a paused rollout without a deployer just waits",
            with(second(Pending), |r| r.state = RolloutState::Paused),
            Observations {
                deployer: false,
                ..scan()
            },
            Next::Wait,
        ),
        // PENDING
        (
            "a pending wave first reads its cells' versions",
            second(Pending),
            scan(),
            Next::ReadVersions(cells(&["c2", "c3"])),
        ),
        (
            "then it measures its figures before the deploy",
            second(Pending),
            Observations {
                versions: Some(v1_on(&["c2", "c3"])),
                ..scan()
            },
            Next::MeasureBefore(cells(&["c2", "c3"])),
        ),
        (
            "then it deploys, keeping the versions to roll back to and its figures",
            second(Pending),
            Observations {
                versions: Some(v1_on(&["c2", "c3"])),
                before: Some(Ok(healthy())),
                ..scan()
            },
            Next::Write(Change::Deploy {
                previous: v1_on(&["c2", "c3"]),
                before: Some(healthy()),
            }),
        ),
        (
            "figures that cannot be read before the deploy are kept as none",
            second(Pending),
            Observations {
                versions: Some(v1_on(&["c2", "c3"])),
                before: Some(Err("cell c3 is down".to_owned())),
                ..scan()
            },
            Next::Write(Change::Deploy {
                previous: v1_on(&["c2", "c3"]),
                before: None,
            }),
        ),
        // DEPLOYING
        (
            "a deploying wave deploys the version to each of its cells",
            second(Deploying),
            scan(),
            Next::Deploy(to("v2", &["c2", "c3"])),
        ),
        (
            "a deployed wave waits for its cells to serve",
            second(Deploying),
            Observations {
                deployed: Some(Ok(())),
                ..scan()
            },
            Next::Write(Change::Deployed),
        ),
        (
            "a failed deploy fails the wave",
            second(Deploying),
            Observations {
                deployed: boom(),
                ..scan()
            },
            Next::Write(Change::Fail("boom".to_owned())),
        ),
        // READYING
        (
            "a readying wave checks that its cells serve the version",
            second(Readying),
            scan(),
            Next::CheckServing(to("v2", &["c2", "c3"])),
        ),
        (
            "a wave whose cells serve the version bakes",
            second(Readying),
            Observations {
                serving: Some(Ok(())),
                ..scan()
            },
            Next::Write(Change::Ready),
        ),
        (
            "a wave not serving yet is waited for within the ready timeout",
            second(Readying),
            Observations {
                serving: waiting(),
                ..at_ready_by.clone()
            },
            Next::Wait,
        ),
        (
            "a wave not serving past the ready timeout fails",
            second(Readying),
            Observations {
                serving: waiting(),
                ..past_ready.clone()
            },
            Next::Write(Change::Fail(
                "cell c3 runs v1, not v2 within the ready timeout (120 s)".to_owned(),
            )),
        ),
        // BAKING
        (
            "a baking wave waits out its bake",
            second(Baking),
            scan(),
            Next::Wait,
        ),
        (
            "a baked wave measures its own figures",
            second(Baking),
            baked.clone(),
            Next::MeasureWave(cells(&["c2", "c3"])),
        ),
        (
            "a baked wave whose figures cannot be read fails its gate",
            second(Baking),
            Observations {
                figures: Some(Err("cell c2 is down".to_owned())),
                ..baked.clone()
            },
            Next::Write(Change::Fail(
                "wave 2 failed its gate: cell c2 is down".to_owned(),
            )),
        ),
        (
            "then the cells not yet rolled are measured for the baseline",
            second(Baking),
            measured(healthy()),
            Next::MeasureBaseline(cells(&["c4"])),
        ),
        (
            "the last wave has no cell left to measure",
            at_wave(2, Baking),
            measured(healthy()),
            Next::MeasureBaseline(Vec::new()),
        ),
        (
            "a wave no worse than the cells not yet rolled passes",
            second(Baking),
            against(healthy(), vec![(cell("c4"), figures(3))]),
            Next::Write(Change::Pass {
                baseline: cells(&["c4"]),
                checks: judged(healthy(), &figures(3)),
            }),
        ),
        (
            "a wave worse than the cells not yet rolled fails its gate",
            second(Baking),
            against(failing(), vec![(cell("c4"), figures(3))]),
            Next::Write(Change::FailGate {
                baseline: cells(&["c4"]),
                checks: judged(failing(), &figures(3)),
            }),
        ),
        (
            "with no cell not yet rolled answering, a wave is judged against itself before",
            second(Baking),
            against(failing(), Vec::new()),
            Next::Write(Change::FailGate {
                baseline: Vec::new(),
                checks: judged(failing(), &healthy()),
            }),
        ),
        // ROLLING_BACK
        (
            "a failed wave deploys its cells' previous versions",
            second(RollingBack),
            scan(),
            Next::Deploy(to("v1", &["c2", "c3"])),
        ),
        (
            "a deployed rollback waits for the previous versions to serve",
            second(RollingBack),
            Observations {
                deployed: Some(Ok(())),
                ..scan()
            },
            Next::Write(Change::RollbackDeployed),
        ),
        (
            "a failed rollback deploy is tried again later",
            second(RollingBack),
            Observations {
                deployed: boom(),
                ..scan()
            },
            Next::Write(Change::RollbackFailed("boom".to_owned())),
        ),
        (
            "a deployed rollback checks that the cells serve their previous versions",
            rolled_back.clone(),
            scan(),
            Next::CheckServing(to("v1", &["c2", "c3"])),
        ),
        (
            "cells serving their previous versions end the rollout",
            rolled_back.clone(),
            Observations {
                serving: Some(Ok(())),
                ..scan()
            },
            Next::Write(Change::RolledBack),
        ),
        (
            "a rolled-back cell not serving yet is waited for",
            rolled_back.clone(),
            Observations {
                serving: waiting(),
                ..at_ready_by.clone()
            },
            Next::Wait,
        ),
        (
            "a rolled-back cell not serving past the ready timeout is deployed again",
            rolled_back,
            Observations {
                serving: waiting(),
                ..past_ready
            },
            Next::Write(Change::Redeploy("cell c3 runs v1, not v2".to_owned())),
        ),
        // Settled waves
        (
            "a passed wave has nothing left to do",
            second(Passed),
            scan(),
            Next::Wait,
        ),
        (
            "a rolled-back wave has nothing left to do",
            second(RolledBack),
            scan(),
            Next::Wait,
        ),
    ];
    for (behaviour, record, seen, expected) in rows {
        assert_eq!(next(&record, &seen), expected, "{behaviour}");
    }
}

#[test]
fn each_change_writes_what_it_says_and_audits_the_gates_and_the_end() {
    use WaveState::{Baking, Deploying, Pending, Readying, RollingBack};
    let fail = Some("rollout.wave.fail");
    let bad = gate::checks(&failing(), &figures(3), &GateConfig::default());
    type Expect = Box<dyn Fn(&mut RolloutRecord)>;
    let rows: Vec<(&str, RolloutRecord, Change, Expect, Option<&str>)> = vec![
        (
            "no deployer is said in the detail",
            second(Pending),
            Change::NoDeployer,
            Box::new(|r| r.detail = NO_DEPLOYER.to_owned()),
            None,
        ),
        (
            "a deploy keeps the versions and figures before it",
            second(Pending),
            Change::Deploy {
                previous: v1_on(&["c2", "c3"]),
                before: Some(healthy()),
            },
            Box::new(|r| {
                let wave = &mut r.waves[1];
                (wave.previous, wave.before) = (v1_on(&["c2", "c3"]), Some(healthy()));
                wave.state = Deploying;
                r.detail = "deploying v2 to c2, c3".to_owned();
            }),
            None,
        ),
        (
            "a deployed wave has the ready timeout to serve",
            second(Deploying),
            Change::Deployed,
            Box::new(|r| {
                r.waves[1].state = Readying;
                r.waves[1].ready_by_ms = NOW + READY_TIMEOUT_MS;
                r.detail = "waiting for c2, c3 to serve v2".to_owned();
            }),
            None,
        ),
        (
            "a ready wave bakes for the bake time",
            second(Readying),
            Change::Ready,
            Box::new(|r| {
                r.waves[1].state = Baking;
                r.waves[1].bake_until_ms = NOW + BAKE_MS;
                r.detail = "baking c2, c3 on v2".to_owned();
            }),
            None,
        ),
        (
            "a failed wave rolls back, saying why",
            second(Readying),
            Change::Fail("boom".to_owned()),
            Box::new(|r| {
                r.waves[1].state = RollingBack;
                r.detail = "boom".to_owned();
            }),
            fail,
        ),
        (
            "a passed wave hands over to the next one",
            second(Baking),
            Change::Pass {
                baseline: cells(&["c4"]),
                checks: Vec::new(),
            },
            Box::new(|r| {
                r.waves[1].state = WaveState::Passed;
                r.waves[1].baseline = cells(&["c4"]);
                r.wave = 2;
                r.detail = "wave 2 passed its gate".to_owned();
            }),
            Some("rollout.wave.pass"),
        ),
        (
            "the last wave passed completes the rollout",
            at_wave(2, Baking),
            Change::Pass {
                baseline: Vec::new(),
                checks: Vec::new(),
            },
            Box::new(|r| {
                r.waves[2].state = WaveState::Passed;
                r.state = RolloutState::Completed;
                r.detail = "every cell runs v2".to_owned();
            }),
            Some("rollout.wave.pass"),
        ),
        (
            "a failed gate keeps its checks and rolls the wave back, naming what failed",
            second(Baking),
            Change::FailGate {
                baseline: cells(&["c4"]),
                checks: bad.clone(),
            },
            Box::new(move |r| {
                r.waves[1].state = RollingBack;
                (r.waves[1].baseline, r.waves[1].checks) = (cells(&["c4"]), bad.clone());
                r.detail = format!("wave 2 failed its gate: {}", gate::failures(&bad));
            }),
            fail,
        ),
        (
            "a deployed rollback has the ready timeout to serve",
            second(RollingBack),
            Change::RollbackDeployed,
            Box::new(|r| {
                r.waves[1].rollback_deployed = true;
                r.waves[1].ready_by_ms = NOW + READY_TIMEOUT_MS;
            }),
            None,
        ),
        (
            "a failed rollback deploy is not tried again before the retry pause",
            second(RollingBack),
            Change::RollbackFailed("boom".to_owned()),
            Box::new(|r| {
                r.detail = "rolling back failed (retrying): boom".to_owned();
                r.next_attempt_ms = NOW + RETRY.as_millis() as u64;
            }),
            None,
        ),
        (
            "a finished rollback ends the rollout rolled back",
            second(RollingBack),
            Change::RolledBack,
            Box::new(|r| {
                r.waves[1].state = WaveState::RolledBack;
                r.state = RolloutState::RolledBack;
            }),
            Some("rollout.finish"),
        ),
        (
            "a finished rollback of an aborted rollout ends it aborted",
            with(second(RollingBack), |r| r.aborted = true),
            Change::RolledBack,
            Box::new(|r| {
                r.waves[1].state = WaveState::RolledBack;
                r.state = RolloutState::Aborted;
            }),
            Some("rollout.finish"),
        ),
        (
            "a cell not serving its previous version gets it deployed again",
            with(second(RollingBack), |r| r.waves[1].rollback_deployed = true),
            Change::Redeploy("cell c3 runs v2, not v1".to_owned()),
            Box::new(|r| {
                r.waves[1].rollback_deployed = false;
                r.detail = "rolled back, but cell c3 runs v2, not v1; deploying again".to_owned();
            }),
            None,
        ),
    ];
    for (behaviour, record, change, expect, audit) in rows {
        let expected = with(record.clone(), expect);
        assert_eq!(change.apply(&record, NOW), (expected, audit), "{behaviour}");
    }
}

#[test]
fn an_operator_pauses_resumes_and_aborts_a_rollout_under_way() {
    use WaveState::{Baking, Pending, Readying, RollingBack};
    let aborted = |r: &mut RolloutRecord| {
        r.aborted = true;
        r.detail = "aborted by ana".to_owned();
    };
    type Expect = Box<dyn Fn(&mut RolloutRecord)>;
    let rows: Vec<(&str, RolloutRecord, Action, Expect, &str)> = vec![
        (
            "a pause holds a running rollout",
            second(Baking),
            Action::Pause,
            Box::new(|r| r.state = RolloutState::Paused),
            "rollout.pause",
        ),
        (
            "a resume runs a paused rollout again",
            with(second(Baking), |r| r.state = RolloutState::Paused),
            Action::Resume,
            Box::new(|r| r.state = RolloutState::Running),
            "rollout.resume",
        ),
        (
            "an abort between waves ends the rollout at once",
            second(Pending),
            Action::Abort,
            Box::new(move |r| {
                aborted(r);
                r.state = RolloutState::Aborted;
            }),
            "rollout.abort",
        ),
        (
            "an abort during a wave rolls the wave back",
            second(Baking),
            Action::Abort,
            Box::new(move |r| {
                aborted(r);
                r.waves[1].state = RollingBack;
            }),
            "rollout.abort",
        ),
        (
            "an abort of a paused rollout runs it to roll the wave back",
            with(second(Readying), |r| r.state = RolloutState::Paused),
            Action::Abort,
            Box::new(move |r| {
                aborted(r);
                r.state = RolloutState::Running;
                r.waves[1].state = RollingBack;
            }),
            "rollout.abort",
        ),
        (
            "an abort while rolling back lets the rollback finish",
            with(second(RollingBack), |r| r.waves[1].rollback_deployed = true),
            Action::Abort,
            Box::new(aborted),
            "rollout.abort",
        ),
    ];
    for (behaviour, record, action, expect, audit) in rows {
        let expected = with(record.clone(), |r| {
            expect(r);
            r.updated_at_ms = NOW;
        });
        assert_eq!(
            act(&record, action, "ana", NOW),
            Ok((expected, audit)),
            "{behaviour}"
        );
    }
}

#[test]
fn a_finished_rollout_refuses_the_operators_actions() {
    let done = with(at_wave(2, WaveState::Passed), |r| {
        r.state = RolloutState::Completed;
    });
    for action in [Action::Pause, Action::Resume, Action::Abort] {
        assert_eq!(
            act(&done, action, "ana", NOW),
            Err(ApiError::FailedPrecondition(
                "rollout r1 is COMPLETED".to_owned()
            )),
            "{action:?}"
        );
    }
}

/// Runs a rollout the way the driver does, scan after scan, over cells that deploy, serve
/// and stay healthy at once.
#[test]
fn an_untroubled_rollout_takes_each_wave_through_deploy_bake_and_gate_to_completion() {
    let mut record = at_wave(0, WaveState::Pending);
    let mut now = NOW;
    let mut writes = Vec::new();
    for _ in 0..100 {
        if record.state.finished() {
            break;
        }
        now += BAKE_MS;
        let mut seen = Observations {
            now_ms: now,
            ..scan()
        };
        let change = loop {
            match next(&record, &seen) {
                Next::ReadVersions(cells) => {
                    seen.versions = Some(cells.into_iter().map(|c| (c, "v1".into())).collect());
                }
                Next::MeasureBefore(_) => seen.before = Some(Ok(healthy())),
                Next::MeasureWave(_) => seen.figures = Some(Ok(healthy())),
                Next::MeasureBaseline(cells) => {
                    seen.baseline = Some(cells.into_iter().map(|c| (c, healthy())).collect());
                }
                Next::Deploy(_) => seen.deployed = Some(Ok(())),
                Next::CheckServing(_) => seen.serving = Some(Ok(())),
                Next::Write(change) => break change,
                Next::Wait => panic!("waiting after {writes:?}"),
            }
        };
        writes.push(match &change {
            Change::Deploy { .. } => "deploy",
            Change::Deployed => "deployed",
            Change::Ready => "ready",
            Change::Pass { .. } => "pass",
            other => panic!("{other:?} after {writes:?}"),
        });
        (record, _) = change.apply(&record, now);
    }
    assert_eq!(record.state, RolloutState::Completed);
    assert_eq!(writes, ["deploy", "deployed", "ready", "pass"].repeat(3));
}
