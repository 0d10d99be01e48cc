//! Rollouts: a version goes out cell by cell, in waves, and stops at the first wave that
//! gets worse than the cells not yet rolled.
//!
//! An operator's start writes the rollout's record (`rollouts/<id>`, a ULID, so the last key
//! is the latest rollout) with its waves planned ([`plan::waves`]: the canary alone first, then
//! cumulative counts or percentages of the cells). The leading control plane's [`Roller`]
//! carries every unfinished rollout forward one persisted step at a time, so a control plane
//! that takes over carries on from the same wave and step:
//!
//! 1. PENDING: each cell's current version is recorded (what a rollback deploys), and so are
//!    the wave's own figures before the deploy (its baseline when no cell is left unrolled).
//! 2. DEPLOYING: the [`Deployer`] deploys the version to every cell of the wave.
//! 3. READYING: until every cell of the wave is up and its process answers with the version
//!    (within the ready timeout, or the wave fails).
//! 4. BAKING: the wave serves for the bake time; then its [`gate`]: the wave's figures over
//!    the bake window (send error rate, accept error rate and p99, bounce, complaint and
//!    dead-letter rates) against the cells not yet rolled over the same window. PASSED moves
//!    on to the next wave, or completes the rollout.
//! 5. A failed deploy, ready timeout or gate rolls the wave back (ROLLING_BACK: each cell
//!    gets its previous version and must serve it again), and the rollout stops ROLLED_BACK.
//!    Cells outside the wave are never touched.
//!
//! Pause holds the rollout at its step (a rollback still finishes); abort rolls the wave under
//! way back and stops the rollout ABORTED. Every start, gate, pause, resume, abort and end is
//! audited.
//!
//! What a step does next is [`step::next`], a pure function of the record and of what the
//! driver saw, and an operator's pause, resume or abort is [`step::act`]; this module does
//! the IO: the registry, the deployer and the cells' health reports.

use std::collections::BTreeMap;
use std::sync::Arc;
use std::time::Duration;

use cellmail_proto::v1;
use cellmail_proto::{ApiError, CellId, now_ms};
use tokio_util::sync::CancellationToken;

use crate::deployer::Deployer;
use crate::records;
use crate::registered;
use cellmail_registry::audit;
use cellmail_registry::channels::CellChannels;
use cellmail_registry::schema::{
    self, AuditRecord, CellRecord, CellState, GateConfig, HealthFigures, Keys, RolloutRecord,
    RolloutState, WaveRecord, WaveState,
};
use cellmail_registry::{Compare, Op, Registry};

pub mod gate;
pub mod plan;
pub mod step;

pub use gate::gate_config;
pub use step::Action;
use step::{Change, Next, Observations, state_name};

pub const DEFAULT_WAVES: &str = "1,25%,100%";
pub const DEFAULT_BAKE: Duration = Duration::from_secs(300);
pub const DEFAULT_READY_TIMEOUT: Duration = Duration::from_secs(120);
/// How often the leader looks at unfinished rollouts.
const SCAN: Duration = Duration::from_millis(250);
/// The longest a cell may take to answer a health report.
const REPORT_TIMEOUT: Duration = Duration::from_secs(5);

fn wave_state_name(state: WaveState) -> &'static str {
    match state {
        WaveState::Pending => "PENDING",
        WaveState::Deploying => "DEPLOYING",
        WaveState::Readying => "READYING",
        WaveState::Baking => "BAKING",
        WaveState::Passed => "PASSED",
        WaveState::RollingBack => "ROLLING_BACK",
        WaveState::RolledBack => "ROLLED_BACK",
    }
}

pub fn info(record: &RolloutRecord) -> v1::RolloutInfo {
    v1::RolloutInfo {
        id: record.id.clone(),
        version: record.version.clone(),
        state: state_name(record.state).to_owned(),
        wave: record.wave as u32,
        waves: record
            .waves
            .iter()
            .map(|w| v1::WaveInfo {
                cells: w.cells.iter().map(ToString::to_string).collect(),
                state: wave_state_name(w.state).to_owned(),
                previous: w
                    .previous
                    .iter()
                    .map(|(c, v)| (c.to_string(), v.clone()))
                    .collect(),
                baseline: if w.checks.is_empty() {
                    Vec::new()
                } else if w.baseline.is_empty() {
                    vec!["self".to_owned()]
                } else {
                    w.baseline.iter().map(ToString::to_string).collect()
                },
                checks: w
                    .checks
                    .iter()
                    .map(|c| v1::GateCheck {
                        name: c.name.clone(),
                        wave: c.wave,
                        baseline: c.baseline,
                        limit: c.limit,
                        passed: c.passed,
                        note: c.note.clone(),
                    })
                    .collect(),
                bake_until_ms: w.bake_until_ms as i64,
            })
            .collect(),
        detail: record.detail.clone(),
        bake_secs: record.bake_ms / 1000,
        gate: Some(gate::thresholds(&record.gate)),
        actor: record.actor.clone(),
        reason: record.reason.clone(),
        started_at_ms: record.started_at_ms as i64,
        updated_at_ms: record.updated_at_ms as i64,
    }
}

/// Every rollout record, oldest first, with its mod revision.
async fn all(registry: &dyn Registry, keys: &Keys) -> Result<Vec<(RolloutRecord, u64)>, ApiError> {
    let listed = registry
        .list(&keys.rollouts())
        .await
        .map_err(ApiError::from)?;
    listed
        .entries
        .into_iter()
        .map(|kv| {
            schema::decode(&kv.value)
                .map(|record| (record, kv.mod_revision))
                .map_err(|e| ApiError::Internal(format!("unreadable rollout {}: {e}", kv.key)))
        })
        .collect()
}

/// Rollout `id`, or the latest one when `id` is empty.
pub async fn get(
    registry: &dyn Registry,
    keys: &Keys,
    id: &str,
) -> Result<(RolloutRecord, u64), ApiError> {
    let found = if id.is_empty() {
        all(registry, keys).await?.pop()
    } else {
        records::read(registry, &keys.rollout(id)).await?
    };
    found.ok_or_else(|| {
        ApiError::NotFound(if id.is_empty() {
            "no rollout has been started".to_owned()
        } else {
            format!("rollout {id} does not exist")
        })
    })
}

/// What an operator asks of a rollout.
pub struct Start {
    pub version: String,
    pub canary: Option<CellId>,
    pub waves: String,
    pub bake: Duration,
    pub ready_timeout: Duration,
    pub gate: GateConfig,
    pub actor: String,
    pub reason: String,
}

fn valid_version(version: &str) -> bool {
    (1..=128).contains(&version.len())
        && version
            .chars()
            .all(|c| c.is_ascii_alphanumeric() || "._+-".contains(c))
}

/// Plans and writes a new rollout, refused while another one is unfinished or while a cell
/// it would roll is down.
pub async fn start(
    registry: &dyn Registry,
    keys: &Keys,
    request: Start,
) -> Result<RolloutRecord, ApiError> {
    if !valid_version(&request.version) {
        return Err(ApiError::invalid(
            "version",
            format!(
                "{:?}: 1 to 128 letters, digits and . _ + -",
                request.version
            ),
        ));
    }
    if let Some((running, _)) = all(registry, keys)
        .await?
        .into_iter()
        .find(|(r, _)| !r.state.finished())
    {
        return Err(ApiError::FailedPrecondition(format!(
            "rollout {} of {} is {}: finish or abort it first",
            running.id,
            running.version,
            state_name(running.state)
        )));
    }
    let mut cells = Vec::new();
    for cell in registered::cells(registry, keys).await? {
        if cell.record.state == CellState::Disabled {
            continue;
        }
        if !cell.alive {
            return Err(ApiError::FailedPrecondition(format!(
                "cell {} is down: a rollout gates on every cell it rolls (disable the cell to leave it out)",
                cell.id
            )));
        }
        cells.push(cell.id);
    }
    let waves = plan::waves(&cells, request.canary.as_ref(), &request.waves)?;
    let now = now_ms();
    let record = RolloutRecord {
        id: ulid::Ulid::new().to_string(),
        version: request.version,
        waves: waves
            .into_iter()
            .map(|cells| WaveRecord {
                cells,
                state: WaveState::Pending,
                previous: Default::default(),
                before: None,
                ready_by_ms: 0,
                bake_until_ms: 0,
                baseline: Vec::new(),
                checks: Vec::new(),
                rollback_deployed: false,
            })
            .collect(),
        wave: 0,
        state: RolloutState::Running,
        bake_ms: request.bake.as_millis() as u64,
        ready_timeout_ms: request.ready_timeout.as_millis() as u64,
        gate: request.gate,
        aborted: false,
        detail: String::new(),
        next_attempt_ms: 0,
        actor: request.actor.clone(),
        reason: request.reason.clone(),
        started_at_ms: now,
        updated_at_ms: now,
    };
    let entry = AuditRecord {
        at_ms: now,
        actor: request.actor,
        action: "rollout.start".to_owned(),
        tenant: None,
        reason: request.reason,
        before: None,
        after: audit::snapshot(&record),
    };
    let key = keys.rollout(&record.id);
    let written = audit::write(registry, keys, &key, 0, schema::encode(&record), &entry)
        .await
        .map_err(ApiError::from)?;
    if !written {
        return Err(ApiError::Aborted(format!("rollout {} exists", record.id)));
    }
    tracing::info!(rollout = %record.id, version = %record.version, waves = record.waves.len(), "rollout started");
    Ok(record)
}

/// Pauses, resumes or aborts rollout `id` (the latest when empty).
pub async fn act(
    registry: &dyn Registry,
    keys: &Keys,
    id: &str,
    action: Action,
    (actor, reason): (String, String),
) -> Result<RolloutRecord, ApiError> {
    let (before, revision) = get(registry, keys, id).await?;
    let (record, name) = step::act(&before, action, &actor, now_ms())?;
    let entry = AuditRecord {
        at_ms: record.updated_at_ms,
        actor,
        action: name.to_owned(),
        tenant: None,
        reason,
        before: audit::snapshot(&before),
        after: audit::snapshot(&record),
    };
    let written = audit::write(
        registry,
        keys,
        &keys.rollout(&record.id),
        revision,
        schema::encode(&record),
        &entry,
    )
    .await
    .map_err(ApiError::from)?;
    if !written {
        return Err(ApiError::Aborted(format!(
            "rollout {} changed meanwhile; try again",
            record.id
        )));
    }
    Ok(record)
}

/// Carries unfinished rollouts forward on the leading control plane.
pub struct Roller {
    registry: Arc<dyn Registry>,
    keys: Keys,
    deployer: Option<Arc<dyn Deployer>>,
    channels: CellChannels,
}

impl Roller {
    pub fn new(
        registry: Arc<dyn Registry>,
        keys: Keys,
        deployer: Option<Arc<dyn Deployer>>,
        channels: CellChannels,
    ) -> Arc<Self> {
        Arc::new(Self {
            registry,
            keys,
            deployer,
            channels,
        })
    }

    /// Until `lost` is cancelled: one step of each unfinished rollout per scan.
    pub async fn run(self: Arc<Self>, lost: CancellationToken) {
        let mut tick = tokio::time::interval(SCAN);
        loop {
            tokio::select! {
                () = lost.cancelled() => return,
                _ = tick.tick() => {}
            }
            let unfinished = match all(self.registry.as_ref(), &self.keys).await {
                Ok(all) => all.into_iter().filter(|(r, _)| !r.state.finished()),
                Err(err) => {
                    tracing::warn!(%err, "reading rollouts failed; retrying");
                    continue;
                }
            };
            for (record, revision) in unfinished.collect::<Vec<_>>() {
                let id = record.id.clone();
                tokio::select! {
                    () = lost.cancelled() => return,
                    stepped = self.step(record, revision) => if let Err(err) = stepped {
                        tracing::warn!(%err, rollout = %id, "advancing the rollout failed; retrying");
                    }
                }
            }
        }
    }

    /// One step of `record` (read at `revision`): does what [`step::next`] asks and notes what
    /// it saw, until it waits for a later scan or writes the change.
    async fn step(&self, record: RolloutRecord, revision: u64) -> Result<(), ApiError> {
        let mut seen = Observations {
            now_ms: now_ms(),
            deployer: self.deployer.is_some(),
            ..Observations::default()
        };
        let window_ms = record.bake_ms;
        loop {
            match step::next(&record, &seen) {
                Next::Wait => return Ok(()),
                Next::ReadVersions(cells) => seen.versions = Some(self.versions(&cells).await?),
                Next::MeasureBefore(cells) => {
                    seen.before = Some(self.figures(&cells, window_ms).await);
                }
                Next::MeasureWave(cells) => {
                    seen.figures = Some(self.figures(&cells, window_ms).await);
                }
                Next::MeasureBaseline(cells) => {
                    seen.baseline = Some(self.reported(&cells, window_ms).await);
                }
                Next::Deploy(targets) => seen.deployed = Some(self.deploy(targets).await),
                Next::CheckServing(targets) => seen.serving = Some(self.serving(&targets).await),
                Next::Write(change) => {
                    match &change {
                        Change::RollbackFailed(err) => {
                            tracing::error!(rollout = %record.id, %err, "ALARM: rolling a wave back failed; retrying");
                        }
                        Change::Redeploy(waiting) => {
                            tracing::error!(rollout = %record.id, waiting, "ALARM: a rolled-back cell does not serve its previous version");
                        }
                        _ => {}
                    }
                    let (after, audited) = change.apply(&record, seen.now_ms);
                    return self.write(record, after, revision, audited).await;
                }
            }
        }
    }

    /// Writes `record` if it differs from `before`, with an audit entry named `audited`.
    async fn write(
        &self,
        before: RolloutRecord,
        mut record: RolloutRecord,
        revision: u64,
        audited: Option<&str>,
    ) -> Result<(), ApiError> {
        if record == before {
            return Ok(());
        }
        record.updated_at_ms = now_ms();
        let key = self.keys.rollout(&record.id);
        let mut ops = vec![Op::Put {
            key: key.clone(),
            value: schema::encode(&record),
            lease: None,
        }];
        if let Some(action) = audited {
            tracing::info!(rollout = %record.id, action, detail = %record.detail, "rollout step");
            ops.push(audit::entry_op(
                &self.keys,
                &AuditRecord {
                    at_ms: record.updated_at_ms,
                    actor: record.actor.clone(),
                    action: action.to_owned(),
                    tenant: None,
                    reason: record.detail.clone(),
                    before: audit::snapshot(&before),
                    after: audit::snapshot(&record),
                },
            ));
        }
        let compare = Compare {
            key,
            mod_revision: revision,
        };
        // Lost to an operator's pause or abort: the next scan reads it again.
        self.registry
            .txn(vec![compare], ops)
            .await
            .map_err(ApiError::from)?;
        Ok(())
    }

    /// The version each of `cells` runs now (empty: not registered).
    async fn versions(&self, cells: &[CellId]) -> Result<BTreeMap<CellId, String>, ApiError> {
        let mut versions = BTreeMap::new();
        for cell in cells {
            let key = self.keys.cell(cell);
            let read = records::read::<CellRecord>(self.registry.as_ref(), &key).await?;
            let version = read.map(|(c, _)| c.version).unwrap_or_default();
            versions.insert(cell.clone(), version);
        }
        Ok(versions)
    }

    /// `cell`'s health report over `window_ms`, from the process itself.
    async fn report(&self, cell: &CellId, window_ms: u64) -> Result<v1::HealthReport, String> {
        let (record, _) =
            records::read::<CellRecord>(self.registry.as_ref(), &self.keys.cell(cell))
                .await
                .map_err(|e| e.to_string())?
                .ok_or_else(|| format!("cell {cell} is not registered"))?;
        if self
            .registry
            .get(&self.keys.alive(cell))
            .await
            .map_err(|e| e.to_string())?
            .is_none()
        {
            return Err(format!("cell {cell} is down"));
        }
        let mut client = self
            .channels
            .client(cell, &record.endpoint)
            .map_err(|e| e.to_string())?;
        let request = v1::HealthReportRequest {
            window_secs: (window_ms / 1000).max(1) as u32,
        };
        let answered = tokio::time::timeout(REPORT_TIMEOUT, client.get_health_report(request))
            .await
            .map_err(|_| {
                format!("cell {cell} did not report its health within {REPORT_TIMEOUT:?}")
            })?
            .map_err(|e| format!("cell {cell} did not report its health: {}", e.message()))?;
        Ok(answered.into_inner())
    }

    /// The sum of `cells`' figures over `window_ms`.
    async fn figures(&self, cells: &[CellId], window_ms: u64) -> Result<HealthFigures, String> {
        let mut sum = HealthFigures::default();
        for cell in cells {
            sum.add(&HealthFigures::from(&self.report(cell, window_ms).await?));
        }
        Ok(sum)
    }

    /// The figures over `window_ms` of those of `cells` that report them.
    async fn reported(&self, cells: &[CellId], window_ms: u64) -> Vec<(CellId, HealthFigures)> {
        let mut reported = Vec::new();
        for cell in cells {
            if let Ok(report) = self.report(cell, window_ms).await {
                reported.push((cell.clone(), HealthFigures::from(&report)));
            }
        }
        reported
    }

    /// Whether every cell of `targets` is up and its process runs its version; else what is
    /// still awaited.
    async fn serving(&self, targets: &[(CellId, String)]) -> Result<(), String> {
        for (cell, want) in targets {
            match self.report(cell, 1000).await {
                Ok(report) if report.version == *want => {}
                Ok(report) => {
                    return Err(format!("cell {cell} runs {}, not {want}", report.version));
                }
                Err(why) => return Err(format!("{why}, not serving {want}")),
            }
        }
        Ok(())
    }

    /// Deploys each `(cell, version)` at once; the failures say why.
    async fn deploy(&self, targets: Vec<(CellId, String)>) -> Result<(), String> {
        let Some(deployer) = &self.deployer else {
            return Err(step::NO_DEPLOYER.to_owned());
        };
        let mut deploys = tokio::task::JoinSet::new();
        for (cell, version) in targets {
            let deployer = deployer.clone();
            deploys.spawn(async move { deployer.deploy(&cell, &version).await });
        }
        let mut failed = Vec::new();
        while let Some(done) = deploys.join_next().await {
            match done {
                Ok(Ok(())) => {}
                Ok(Err(err)) => failed.push(err.to_string()),
                Err(err) => failed.push(format!("a deploy task failed: {err}")),
            }
        }
        if failed.is_empty() {
            Ok(())
        } else {
            Err(failed.join("; "))
        }
    }
}
