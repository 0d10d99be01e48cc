//! What a rollout does next: a pure function of its persisted record and of what its driver
//! has seen during this scan, with the time passed in, so that every step of a wave, every
//! way one fails and every rollback is tested with no registry, no deployer and no cell.
//!
//! On each scan the driver ([`super::Roller`]) asks [`next`] what to do, does it (read the
//! cells' versions, measure figures, deploy, check that cells serve a version), notes what it
//! saw in the [`Observations`] and asks again, until the answer is to wait for a later scan
//! or a [`Change`], which it writes (audited when the change says so). An operator's pause,
//! resume or abort is [`act`].

use std::collections::BTreeMap;
use std::time::Duration;

use cellmail_proto::{ApiError, CellId};
use cellmail_registry::schema::{
    GateCheck, HealthFigures, RolloutRecord, RolloutState, WaveRecord, WaveState,
};

use super::gate;

/// Wait after a step that failed before it is tried again (a rollback's deploy).
pub const RETRY: Duration = Duration::from_secs(5);
/// Why a rollout does not move without a deployer.
pub const NO_DEPLOYER: &str = "the leading control plane has no deployer (--deployer)";

/// What the driver has seen of the rollout's wave during this scan.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct Observations {
    pub now_ms: u64,
    /// Whether this control plane has a deployer.
    pub deployer: bool,
    /// The version each of the wave's cells runs (empty: not registered).
    pub versions: Option<BTreeMap<CellId, String>>,
    /// The wave's figures over the bake window before its deploy.
    pub before: Option<Result<HealthFigures, String>>,
    /// How the deploy (of the version, or rolling back, of the previous ones) went.
    pub deployed: Option<Result<(), String>>,
    /// Whether every cell serves what it should, or what is still awaited.
    pub serving: Option<Result<(), String>>,
    /// The wave's figures over the bake window, after its bake.
    pub figures: Option<Result<HealthFigures, String>>,
    /// The figures of the cells not yet rolled that answered (a cell that is down is no
    /// baseline; it fails nobody's gate).
    pub baseline: Option<Vec<(CellId, HealthFigures)>>,
}

/// What the driver does next.
#[derive(Debug, Clone, PartialEq)]
pub enum Next {
    /// Nothing until a later scan.
    Wait,
    /// Read the version each of these cells runs now.
    ReadVersions(Vec<CellId>),
    /// Measure these cells' figures before the deploy.
    MeasureBefore(Vec<CellId>),
    /// Measure these cells' figures after the bake.
    MeasureWave(Vec<CellId>),
    /// Measure each of these cells not yet rolled, keeping those that answer.
    MeasureBaseline(Vec<CellId>),
    /// Deploy each cell's version, all at once.
    Deploy(Vec<(CellId, String)>),
    /// Check that each cell is up and its process runs its version.
    CheckServing(Vec<(CellId, String)>),
    /// Write the rollout's change.
    Write(Change),
}

/// A change of the rollout's record.
#[derive(Debug, Clone, PartialEq)]
pub enum Change {
    /// Say that nothing moves without a deployer.
    NoDeployer,
    /// The wave's versions and figures before it are recorded: deploy it.
    Deploy {
        previous: BTreeMap<CellId, String>,
        before: Option<HealthFigures>,
    },
    /// Deployed: wait for the cells to serve the version.
    Deployed,
    /// Every cell serves the version: bake.
    Ready,
    /// The wave fails for this reason; its cells go back to their previous versions.
    Fail(String),
    /// The gate passed against `baseline` (empty: the wave's own figures before).
    Pass {
        baseline: Vec<CellId>,
        checks: Vec<GateCheck>,
    },
    /// The gate failed against `baseline`.
    FailGate {
        baseline: Vec<CellId>,
        checks: Vec<GateCheck>,
    },
    /// The previous versions are deployed: wait for the cells to serve them.
    RollbackDeployed,
    /// Deploying the previous versions failed: try again after [`RETRY`].
    RollbackFailed(String),
    /// Every cell serves its previous version again: the rollout ends.
    RolledBack,
    /// A rolled-back cell does not serve its previous version in time: deploy again.
    Redeploy(String),
}

/// What the driver of `record` does next, having seen `seen` during this scan.
pub fn next(record: &RolloutRecord, seen: &Observations) -> Next {
    let wave = &record.waves[record.wave];
    let rolling_back = wave.state == WaveState::RollingBack;
    // A pause holds the rollout at its step, but a rollback still finishes.
    if (record.state == RolloutState::Paused && !rolling_back)
        || seen.now_ms < record.next_attempt_ms
    {
        return Next::Wait;
    }
    if !seen.deployer {
        return Next::Write(Change::NoDeployer);
    }
    let now = seen.now_ms;
    let to_version = || {
        let version = &record.version;
        let cells = wave.cells.iter();
        cells.map(|c| (c.clone(), version.clone())).collect()
    };
    match wave.state {
        WaveState::Pending => match (&seen.versions, &seen.before) {
            (None, _) => Next::ReadVersions(wave.cells.clone()),
            (Some(_), None) => Next::MeasureBefore(wave.cells.clone()),
            (Some(previous), Some(before)) => Next::Write(Change::Deploy {
                previous: previous.clone(),
                before: before.clone().ok(),
            }),
        },
        WaveState::Deploying => match &seen.deployed {
            None => Next::Deploy(to_version()),
            Some(Ok(())) => Next::Write(Change::Deployed),
            Some(Err(err)) => Next::Write(Change::Fail(err.clone())),
        },
        WaveState::Readying => match &seen.serving {
            None => Next::CheckServing(to_version()),
            Some(Ok(())) => Next::Write(Change::Ready),
            Some(Err(waiting)) if now > wave.ready_by_ms => Next::Write(Change::Fail(format!(
                "{waiting} within the ready timeout ({} s)",
                record.ready_timeout_ms / 1000
            ))),
            Some(Err(_)) => Next::Wait,
        },
        WaveState::Baking if now < wave.bake_until_ms => Next::Wait,
        WaveState::Baking => judge(record, wave, seen),
        WaveState::RollingBack if !wave.rollback_deployed => match &seen.deployed {
            None => Next::Deploy(
                wave.previous
                    .iter()
                    .map(|(c, v)| (c.clone(), v.clone()))
                    .collect(),
            ),
            Some(Ok(())) => Next::Write(Change::RollbackDeployed),
            Some(Err(err)) => Next::Write(Change::RollbackFailed(err.clone())),
        },
        WaveState::RollingBack => match &seen.serving {
            None => Next::CheckServing(
                wave.cells
                    .iter()
                    .map(|c| (c.clone(), wave.previous.get(c).cloned().unwrap_or_default()))
                    .collect(),
            ),
            Some(Ok(())) => Next::Write(Change::RolledBack),
            Some(Err(waiting)) if now > wave.ready_by_ms => {
                Next::Write(Change::Redeploy(waiting.clone()))
            }
            Some(Err(_)) => Next::Wait,
        },
        WaveState::Passed | WaveState::RolledBack => Next::Wait,
    }
}

/// A baked wave's gate: its figures against the cells not yet rolled that answer, or its own
/// before the deploy when none is left (or none answers).
fn judge(record: &RolloutRecord, wave: &WaveRecord, seen: &Observations) -> Next {
    let rolled = match &seen.figures {
        None => return Next::MeasureWave(wave.cells.clone()),
        Some(Err(why)) => {
            let why = format!("wave {} failed its gate: {why}", record.wave + 1);
            return Next::Write(Change::Fail(why));
        }
        Some(Ok(rolled)) => rolled,
    };
    let Some(reported) = &seen.baseline else {
        let unrolled = record.waves[record.wave + 1..]
            .iter()
            .flat_map(|w| w.cells.iter().cloned())
            .collect();
        return Next::MeasureBaseline(unrolled);
    };
    let mut baseline = HealthFigures::default();
    for (_, figures) in reported {
        baseline.add(figures);
    }
    if reported.is_empty() {
        baseline = wave.before.unwrap_or_default();
    }
    let checks = gate::checks(rolled, &baseline, &record.gate);
    let baseline = reported.iter().map(|(cell, _)| cell.clone()).collect();
    if checks.iter().all(|c| c.passed) {
        Next::Write(Change::Pass { baseline, checks })
    } else {
        Next::Write(Change::FailGate { baseline, checks })
    }
}

impl Change {
    /// `record` after this change at `now_ms`, and the audit entry's action if it takes one.
    pub fn apply(
        self,
        record: &RolloutRecord,
        now_ms: u64,
    ) -> (RolloutRecord, Option<&'static str>) {
        let mut record = record.clone();
        let index = record.wave;
        let version = record.version.clone();
        let wave = &mut record.waves[index];
        let mut audited = None;
        match self {
            Change::NoDeployer => record.detail = NO_DEPLOYER.to_owned(),
            Change::Deploy { previous, before } => {
                wave.previous.extend(previous);
                wave.before = before;
                wave.state = WaveState::Deploying;
                record.detail = format!("deploying {version} to {}", names(&wave.cells));
            }
            Change::Deployed => {
                wave.state = WaveState::Readying;
                wave.ready_by_ms = now_ms + record.ready_timeout_ms;
                record.detail = format!("waiting for {} to serve {version}", names(&wave.cells));
            }
            Change::Ready => {
                wave.state = WaveState::Baking;
                wave.bake_until_ms = now_ms + record.bake_ms;
                record.detail = format!("baking {} on {version}", names(&wave.cells));
            }
            Change::Fail(why) => {
                record.detail = why;
                roll_back(wave);
                audited = Some("rollout.wave.fail");
            }
            Change::Pass { baseline, checks } => {
                (wave.baseline, wave.checks) = (baseline, checks);
                wave.state = WaveState::Passed;
                audited = Some("rollout.wave.pass");
                if index + 1 < record.waves.len() {
                    record.wave += 1;
                    record.detail = format!("wave {} passed its gate", index + 1);
                } else {
                    record.state = RolloutState::Completed;
                    record.detail = format!("every cell runs {version}");
                }
            }
            Change::FailGate { baseline, checks } => {
                record.detail = format!(
                    "wave {} failed its gate: {}",
                    index + 1,
                    gate::failures(&checks)
                );
                (wave.baseline, wave.checks) = (baseline, checks);
                roll_back(wave);
                audited = Some("rollout.wave.fail");
            }
            Change::RollbackDeployed => {
                wave.rollback_deployed = true;
                wave.ready_by_ms = now_ms + record.ready_timeout_ms;
            }
            Change::RollbackFailed(err) => {
                record.detail = format!("rolling back failed (retrying): {err}");
                record.next_attempt_ms = now_ms + RETRY.as_millis() as u64;
            }
            Change::RolledBack => {
                wave.state = WaveState::RolledBack;
                record.state = if record.aborted {
                    RolloutState::Aborted
                } else {
                    RolloutState::RolledBack
                };
                audited = Some("rollout.finish");
            }
            Change::Redeploy(waiting) => {
                record.detail = format!("rolled back, but {waiting}; deploying again");
                wave.rollback_deployed = false;
            }
        }
        (record, audited)
    }
}

/// What an operator asks of a rollout under way.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Action {
    Pause,
    Resume,
    Abort,
}

/// `record` after an operator's `action` at `now_ms`, and the audit entry's action; refused
/// for a finished rollout. An abort rolls back the wave under way (or ends the rollout
/// between waves), and the rollout ends ABORTED.
pub fn act(
    record: &RolloutRecord,
    action: Action,
    actor: &str,
    now_ms: u64,
) -> Result<(RolloutRecord, &'static str), ApiError> {
    if record.state.finished() {
        return Err(ApiError::FailedPrecondition(format!(
            "rollout {} is {}",
            record.id,
            state_name(record.state)
        )));
    }
    let mut record = record.clone();
    let wave = &mut record.waves[record.wave];
    let name = match action {
        Action::Pause => {
            record.state = RolloutState::Paused;
            "rollout.pause"
        }
        Action::Resume => {
            record.state = RolloutState::Running;
            "rollout.resume"
        }
        Action::Abort => {
            record.aborted = true;
            record.state = RolloutState::Running;
            record.detail = format!("aborted by {actor}");
            match wave.state {
                WaveState::Pending | WaveState::Passed => {
                    record.state = RolloutState::Aborted;
                }
                WaveState::Deploying | WaveState::Readying | WaveState::Baking => roll_back(wave),
                WaveState::RollingBack | WaveState::RolledBack => {}
            }
            "rollout.abort"
        }
    };
    record.updated_at_ms = now_ms;
    Ok((record, name))
}

/// A wave that failed: its cells go back to their previous versions.
fn roll_back(wave: &mut WaveRecord) {
    wave.state = WaveState::RollingBack;
    wave.rollback_deployed = false;
}

fn names(cells: &[CellId]) -> String {
    cells
        .iter()
        .map(CellId::as_str)
        .collect::<Vec<_>>()
        .join(", ")
}

/// A rollout's state as operators see it.
pub fn state_name(state: RolloutState) -> &'static str {
    match state {
        RolloutState::Running => "RUNNING",
        RolloutState::Paused => "PAUSED",
        RolloutState::Completed => "COMPLETED",
        RolloutState::RolledBack => "ROLLED_BACK",
        RolloutState::Aborted => "ABORTED",
    }
}

#[cfg(test)]
mod tests;
