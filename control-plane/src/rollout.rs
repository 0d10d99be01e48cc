//! Rollouts: a version goes out cell by cell, in waves, and stops at the first wave that
//! gets worse than the cells not yet rolled.
//!
//! An operator's start writes the rollout's record (`rollouts/<id>`, a ULID, so the last key
//! is the latest rollout) with its waves planned ([`plan_waves`]: the canary alone first, then
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
    self, AuditRecord, CellRecord, CellState, GateCheck, GateConfig, HealthFigures, Keys,
    RolloutRecord, RolloutState, WaveRecord, WaveState,
};
use cellmail_registry::{Compare, Op, Registry};

pub const DEFAULT_WAVES: &str = "1,25%,100%";
pub const DEFAULT_BAKE: Duration = Duration::from_secs(300);
pub const DEFAULT_READY_TIMEOUT: Duration = Duration::from_secs(120);
/// How often the leader looks at unfinished rollouts.
const SCAN: Duration = Duration::from_millis(250);
/// Wait after a step that failed before it is tried again (a rollback's deploy).
const RETRY: Duration = Duration::from_secs(5);
/// The longest a cell may take to answer a health report.
const REPORT_TIMEOUT: Duration = Duration::from_secs(5);

/// The sizes of the waves `spec` makes of `cells` cells: comma-separated cumulative counts
/// or percentages, non-decreasing, the last one every cell. Waves that add no cell are
/// dropped.
pub fn wave_sizes(spec: &str, cells: usize) -> Result<Vec<usize>, String> {
    let mut sizes = Vec::new();
    let mut reached = 0;
    for part in spec.split(',').map(str::trim) {
        let cumulative = match part.strip_suffix('%') {
            Some(percent) => {
                let percent: usize = percent
                    .parse()
                    .ok()
                    .filter(|p| (1..=100).contains(p))
                    .ok_or_else(|| format!("{part:?} is not a percentage from 1% to 100%"))?;
                (percent * cells).div_ceil(100)
            }
            None => part
                .parse()
                .ok()
                .filter(|n| *n >= 1)
                .ok_or_else(|| format!("{part:?} is not a count of cells or a percentage"))?,
        }
        .min(cells);
        if cumulative < reached {
            return Err(format!(
                "{part:?} is below the wave before it (waves are cumulative)"
            ));
        }
        if cumulative > reached {
            sizes.push(cumulative - reached);
            reached = cumulative;
        }
    }
    if reached != cells {
        return Err(format!(
            "the last wave reaches {reached} of {cells} cells; it must reach every cell (100%)"
        ));
    }
    Ok(sizes)
}

/// The waves of a rollout over `cells`: `canary` (the first cell by id when `None`) alone
/// first, then the others by id in waves of `spec`.
pub fn plan_waves(
    cells: &[CellId],
    canary: Option<&CellId>,
    spec: &str,
) -> Result<Vec<Vec<CellId>>, ApiError> {
    let mut order: Vec<CellId> = cells.to_vec();
    order.sort();
    if let Some(canary) = canary {
        let at = order.iter().position(|c| c == canary).ok_or_else(|| {
            ApiError::invalid(
                "canary",
                format!("cell {canary} is not one of the cells rolled ({order:?})"),
            )
        })?;
        let canary = order.remove(at);
        order.insert(0, canary);
    }
    if order.is_empty() {
        return Err(ApiError::FailedPrecondition(
            "there is no cell to roll out to".into(),
        ));
    }
    // The canary is its own wave whatever the spec's first size; each later wave ends where
    // the spec's cumulative size does.
    let mut ends = vec![1];
    let mut reached = 0;
    for size in wave_sizes(spec, order.len()).map_err(|e| ApiError::invalid("waves", e))? {
        reached += size;
        if ends.last().is_some_and(|end| reached > *end) {
            ends.push(reached);
        }
    }
    let mut start = 0;
    Ok(ends
        .into_iter()
        .map(|end| {
            let wave = order[start..end].to_vec();
            start = end;
            wave
        })
        .collect())
}

fn rate(part: u64, whole: u64) -> f64 {
    if whole == 0 {
        0.0
    } else {
        part as f64 / whole as f64
    }
}

/// A rate check: the wave's rate may exceed the baseline's by at most `limit`, judged only
/// when the wave had `min` events to count it over.
fn rate_check(
    name: &str,
    (part, whole): (u64, u64),
    baseline: (u64, u64),
    limit: f64,
    min: u64,
) -> GateCheck {
    let (wave, baseline) = (rate(part, whole), rate(baseline.0, baseline.1));
    let judged = whole >= min;
    GateCheck {
        name: name.to_owned(),
        wave,
        baseline,
        limit: baseline + limit,
        passed: !judged || wave - baseline <= limit,
        note: if judged {
            String::new()
        } else {
            format!("not judged: {whole} events, fewer than {min}")
        },
    }
}

/// The checks of a wave's gate: `wave`'s figures against `baseline`'s.
pub fn gate(wave: &HealthFigures, baseline: &HealthFigures, config: &GateConfig) -> Vec<GateCheck> {
    let min = config.min_attempts;
    type Rate = fn(&HealthFigures) -> (u64, u64);
    let rates: [(&str, Rate, f64); 5] = [
        (
            "send error rate",
            |f| (f.send_failures, f.send_attempts),
            config.max_error_rate_delta,
        ),
        (
            "accept error rate",
            |f| (f.accept_errors, f.accepts + f.accept_errors),
            config.max_error_rate_delta,
        ),
        (
            "bounce rate",
            |f| (f.bounces, f.sent),
            config.max_bounce_rate_delta,
        ),
        (
            "complaint rate",
            |f| (f.complaints, f.sent),
            config.max_complaint_rate_delta,
        ),
        (
            "dead-letter rate",
            |f| (f.dead_letters, f.send_attempts),
            config.max_dead_letter_rate_delta,
        ),
    ];
    let mut checks: Vec<GateCheck> = rates
        .into_iter()
        .map(|(name, of, limit)| rate_check(name, of(wave), of(baseline), limit, min))
        .collect();
    let (wave_ms, baseline_ms) = (
        wave.accept_p99_us as f64 / 1000.0,
        baseline.accept_p99_us as f64 / 1000.0,
    );
    let limit =
        (baseline_ms * config.max_accept_p99_ratio).max(baseline_ms + config.p99_slack_ms as f64);
    let note = if wave.accepts < min {
        format!("not judged: {} accepts, fewer than {min}", wave.accepts)
    } else if baseline.accepts == 0 {
        "not judged: the baseline had no accepts".to_owned()
    } else {
        String::new()
    };
    checks.push(GateCheck {
        name: "accept p99 ms".to_owned(),
        wave: wave_ms,
        baseline: baseline_ms,
        limit,
        passed: !note.is_empty() || wave_ms <= limit,
        note,
    });
    checks
}

/// A one-line account of the failed checks.
fn failures(checks: &[GateCheck]) -> String {
    checks
        .iter()
        .filter(|c| !c.passed)
        .map(|c| {
            format!(
                "{} {:.4} > {:.4} (baseline {:.4}){}",
                c.name,
                c.wave,
                c.limit,
                c.baseline,
                if c.note.is_empty() {
                    String::new()
                } else {
                    format!(": {}", c.note)
                }
            )
        })
        .collect::<Vec<_>>()
        .join("; ")
}

/// A checked `GateThresholds`: unset fields take the defaults.
pub fn gate_config(thresholds: Option<v1::GateThresholds>) -> Result<GateConfig, ApiError> {
    let defaults = GateConfig::default();
    let Some(t) = thresholds else {
        return Ok(defaults);
    };
    let delta = |value: Option<f64>, default: f64, field: &str| match value {
        None => Ok(default),
        Some(v) if (0.0..=1.0).contains(&v) => Ok(v),
        Some(v) => Err(ApiError::invalid(
            format!("gate.{field}"),
            format!("{v} is not a rate delta from 0 to 1"),
        )),
    };
    let ratio = t
        .max_accept_p99_ratio
        .unwrap_or(defaults.max_accept_p99_ratio);
    if ratio.is_nan() || ratio < 1.0 {
        return Err(ApiError::invalid(
            "gate.max_accept_p99_ratio",
            format!("{ratio} is below 1"),
        ));
    }
    Ok(GateConfig {
        max_error_rate_delta: delta(
            t.max_error_rate_delta,
            defaults.max_error_rate_delta,
            "max_error_rate_delta",
        )?,
        max_accept_p99_ratio: ratio,
        p99_slack_ms: t.p99_slack_ms.unwrap_or(defaults.p99_slack_ms),
        max_bounce_rate_delta: delta(
            t.max_bounce_rate_delta,
            defaults.max_bounce_rate_delta,
            "max_bounce_rate_delta",
        )?,
        max_complaint_rate_delta: delta(
            t.max_complaint_rate_delta,
            defaults.max_complaint_rate_delta,
            "max_complaint_rate_delta",
        )?,
        max_dead_letter_rate_delta: delta(
            t.max_dead_letter_rate_delta,
            defaults.max_dead_letter_rate_delta,
            "max_dead_letter_rate_delta",
        )?,
        min_attempts: t.min_attempts.unwrap_or(defaults.min_attempts),
    })
}

fn thresholds(gate: &GateConfig) -> v1::GateThresholds {
    v1::GateThresholds {
        max_error_rate_delta: Some(gate.max_error_rate_delta),
        max_accept_p99_ratio: Some(gate.max_accept_p99_ratio),
        p99_slack_ms: Some(gate.p99_slack_ms),
        max_bounce_rate_delta: Some(gate.max_bounce_rate_delta),
        max_complaint_rate_delta: Some(gate.max_complaint_rate_delta),
        max_dead_letter_rate_delta: Some(gate.max_dead_letter_rate_delta),
        min_attempts: Some(gate.min_attempts),
    }
}

fn state_name(state: RolloutState) -> &'static str {
    match state {
        RolloutState::Running => "RUNNING",
        RolloutState::Paused => "PAUSED",
        RolloutState::Completed => "COMPLETED",
        RolloutState::RolledBack => "ROLLED_BACK",
        RolloutState::Aborted => "ABORTED",
    }
}

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
        gate: Some(thresholds(&record.gate)),
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
    let waves = plan_waves(&cells, request.canary.as_ref(), &request.waves)?;
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

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Action {
    Pause,
    Resume,
    Abort,
}

/// Pauses, resumes or aborts rollout `id` (the latest when empty).
pub async fn act(
    registry: &dyn Registry,
    keys: &Keys,
    id: &str,
    action: Action,
    (actor, reason): (String, String),
) -> Result<RolloutRecord, ApiError> {
    let (mut record, revision) = get(registry, keys, id).await?;
    if record.state.finished() {
        return Err(ApiError::FailedPrecondition(format!(
            "rollout {} is {}",
            record.id,
            state_name(record.state)
        )));
    }
    let before = record.clone();
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
                WaveState::Deploying | WaveState::Readying | WaveState::Baking => {
                    wave.state = WaveState::RollingBack;
                    wave.rollback_deployed = false;
                }
                WaveState::RollingBack | WaveState::RolledBack => {}
            }
            "rollout.abort"
        }
    };
    record.updated_at_ms = now_ms();
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
    ) -> Arc<Self> {
        Arc::new(Self {
            registry,
            keys,
            deployer,
            channels: CellChannels::default(),
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

    /// One step of `record` (read at `revision`), written back when it changed anything.
    async fn step(&self, mut record: RolloutRecord, revision: u64) -> Result<(), ApiError> {
        let now = now_ms();
        let index = record.wave;
        let rolling_back = record.waves[index].state == WaveState::RollingBack;
        if (record.state == RolloutState::Paused && !rolling_back) || now < record.next_attempt_ms {
            return Ok(());
        }
        let before = record.clone();
        let Some(deployer) = self.deployer.clone() else {
            record.detail = "the leading control plane has no deployer (--deployer)".to_owned();
            return self.write(before, record, revision, None).await;
        };
        let version = record.version.clone();
        let wave = &mut record.waves[index];
        let mut audited = None;
        match wave.state {
            WaveState::Pending => {
                for cell in &wave.cells {
                    let current = self
                        .cell(cell)
                        .await?
                        .map(|c| c.version)
                        .unwrap_or_default();
                    wave.previous.insert(cell.clone(), current);
                }
                wave.before = self.figures(&wave.cells, record.bake_ms).await.ok();
                wave.state = WaveState::Deploying;
                record.detail = format!("deploying {version} to {}", names(&wave.cells));
            }
            WaveState::Deploying => {
                let targets: Vec<_> = wave
                    .cells
                    .iter()
                    .map(|c| (c.clone(), version.clone()))
                    .collect();
                match deploy_all(&deployer, targets).await {
                    Ok(()) => {
                        wave.state = WaveState::Readying;
                        wave.ready_by_ms = now + record.ready_timeout_ms;
                        record.detail =
                            format!("waiting for {} to serve {version}", names(&wave.cells));
                    }
                    Err(err) => {
                        record.detail = err;
                        roll_back(wave);
                        audited = Some("rollout.wave.fail");
                    }
                }
            }
            WaveState::Readying => match self.serving(&wave.cells, |_| version.as_str()).await {
                None => {
                    wave.state = WaveState::Baking;
                    wave.bake_until_ms = now + record.bake_ms;
                    record.detail = format!("baking {} on {version}", names(&wave.cells));
                }
                Some(waiting) if now > wave.ready_by_ms => {
                    record.detail = format!(
                        "{waiting} within the ready timeout ({} s)",
                        record.ready_timeout_ms / 1000
                    );
                    roll_back(wave);
                    audited = Some("rollout.wave.fail");
                }
                Some(_) => {}
            },
            WaveState::Baking if now >= wave.bake_until_ms => {
                let unrolled: Vec<CellId> = before.waves[index + 1..]
                    .iter()
                    .flat_map(|w| w.cells.iter().cloned())
                    .collect();
                let judged = self
                    .judge(wave, &unrolled, record.bake_ms, &record.gate)
                    .await;
                match judged {
                    Ok(()) => {
                        wave.state = WaveState::Passed;
                        audited = Some("rollout.wave.pass");
                        if index + 1 < before.waves.len() {
                            record.wave += 1;
                            record.detail = format!("wave {} passed its gate", index + 1);
                        } else {
                            record.state = RolloutState::Completed;
                            record.detail = format!("every cell runs {version}");
                        }
                    }
                    Err(why) => {
                        record.detail = format!("wave {} failed its gate: {why}", index + 1);
                        roll_back(wave);
                        audited = Some("rollout.wave.fail");
                    }
                }
            }
            WaveState::Baking => {}
            WaveState::RollingBack if !wave.rollback_deployed => {
                let targets: Vec<_> = wave
                    .previous
                    .iter()
                    .map(|(c, v)| (c.clone(), v.clone()))
                    .collect();
                match deploy_all(&deployer, targets).await {
                    Ok(()) => {
                        wave.rollback_deployed = true;
                        wave.ready_by_ms = now + record.ready_timeout_ms;
                    }
                    Err(err) => {
                        tracing::error!(rollout = %record.id, %err, "ALARM: rolling a wave back failed; retrying");
                        record.detail = format!("rolling back failed (retrying): {err}");
                        record.next_attempt_ms = now + RETRY.as_millis() as u64;
                    }
                }
            }
            WaveState::RollingBack => {
                let previous = wave.previous.clone();
                let waiting = self
                    .serving(&wave.cells, |c| previous.get(c).map_or("", String::as_str))
                    .await;
                match waiting {
                    None => {
                        wave.state = WaveState::RolledBack;
                        record.state = if record.aborted {
                            RolloutState::Aborted
                        } else {
                            RolloutState::RolledBack
                        };
                        audited = Some("rollout.finish");
                    }
                    Some(waiting) if now > wave.ready_by_ms => {
                        tracing::error!(rollout = %record.id, waiting, "ALARM: a rolled-back cell does not serve its previous version");
                        record.detail = format!("rolled back, but {waiting}; deploying again");
                        wave.rollback_deployed = false;
                    }
                    Some(_) => {}
                }
            }
            WaveState::Passed | WaveState::RolledBack => {}
        }
        self.write(before, record, revision, audited).await
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

    async fn cell(&self, cell: &CellId) -> Result<Option<CellRecord>, ApiError> {
        let read = records::read(self.registry.as_ref(), &self.keys.cell(cell)).await?;
        Ok(read.map(|(record, _)| record))
    }

    /// `cell`'s health report over `window_ms`, from the process itself.
    async fn report(&self, cell: &CellId, window_ms: u64) -> Result<v1::HealthReport, String> {
        let record = self
            .cell(cell)
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

    /// `None` once every cell of `cells` is up and its process runs `version_of(cell)`; else
    /// what is still awaited.
    async fn serving<'a>(
        &self,
        cells: &[CellId],
        version_of: impl Fn(&CellId) -> &'a str,
    ) -> Option<String> {
        for cell in cells {
            let want = version_of(cell);
            match self.report(cell, 1000).await {
                Ok(report) if report.version == want => {}
                Ok(report) => {
                    return Some(format!("cell {cell} runs {}, not {want}", report.version));
                }
                Err(why) => return Some(format!("{why}, not serving {want}")),
            }
        }
        None
    }

    /// Gates `wave` on its figures against `unrolled`'s (or its own before the deploy, when
    /// every other cell is rolled): records the checks, and says why it failed.
    async fn judge(
        &self,
        wave: &mut WaveRecord,
        unrolled: &[CellId],
        window_ms: u64,
        config: &GateConfig,
    ) -> Result<(), String> {
        let rolled = self.figures(&wave.cells, window_ms).await?;
        let mut baseline_cells = Vec::new();
        let mut baseline = HealthFigures::default();
        for cell in unrolled {
            // A cell not yet rolled that is down is no baseline; it fails nobody's gate.
            if let Ok(report) = self.report(cell, window_ms).await {
                baseline.add(&HealthFigures::from(&report));
                baseline_cells.push(cell.clone());
            }
        }
        if baseline_cells.is_empty() {
            baseline = wave.before.unwrap_or_default();
        }
        wave.baseline = baseline_cells;
        wave.checks = gate(&rolled, &baseline, config);
        if wave.checks.iter().all(|c| c.passed) {
            Ok(())
        } else {
            Err(failures(&wave.checks))
        }
    }
}

fn names(cells: &[CellId]) -> String {
    cells
        .iter()
        .map(CellId::as_str)
        .collect::<Vec<_>>()
        .join(", ")
}

/// A wave that failed: its cells go back to their previous versions.
fn roll_back(wave: &mut WaveRecord) {
    wave.state = WaveState::RollingBack;
    wave.rollback_deployed = false;
}

/// Deploys each `(cell, version)` at once; the first failure says why.
async fn deploy_all(
    deployer: &Arc<dyn Deployer>,
    targets: Vec<(CellId, String)>,
) -> Result<(), String> {
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

#[cfg(test)]
mod tests {
    use super::*;

    fn cells(n: usize) -> Vec<CellId> {
        (1..=n)
            .map(|i| CellId::new(format!("cell-{i:02}")).unwrap())
            .collect()
    }

    #[test]
    fn wave_sizes_are_cumulative_counts_or_percentages_reaching_every_cell() {
        assert_eq!(wave_sizes("1,25%,100%", 20).unwrap(), vec![1, 4, 15]);
        assert_eq!(wave_sizes("1,25%,100%", 3).unwrap(), vec![1, 2]);
        assert_eq!(wave_sizes("1,2,100%", 3).unwrap(), vec![1, 1, 1]);
        assert_eq!(wave_sizes("100%", 4).unwrap(), vec![4]);
        assert_eq!(wave_sizes("2, 10", 10).unwrap(), vec![2, 8]);
        for (bad, says) in [
            ("1,50%", "must reach every cell"),
            ("5,2,100%", "below the wave before"),
            ("0,100%", "not a count"),
            ("1,150%", "not a percentage"),
            ("one,100%", "not a count"),
        ] {
            let err = wave_sizes(bad, 10).unwrap_err();
            assert!(err.contains(says), "{bad}: {err}");
        }
    }

    #[test]
    fn the_canary_is_the_first_wave_alone_and_the_rest_follow_by_id() {
        let all = cells(5);
        let waves = plan_waves(&all, Some(&all[3]), "1,60%,100%").unwrap();
        assert_eq!(
            waves,
            vec![
                vec![all[3].clone()],
                vec![all[0].clone(), all[1].clone()],
                vec![all[2].clone(), all[4].clone()],
            ]
        );
        let waves = plan_waves(&all, None, "100%").unwrap();
        assert_eq!(waves, vec![vec![all[0].clone()], all[1..].to_vec()]);
        let stranger = CellId::new("cell-99").unwrap();
        match plan_waves(&all, Some(&stranger), "100%") {
            Err(ApiError::InvalidArgument { field, .. }) => assert_eq!(field, "canary"),
            other => panic!("{other:?}"),
        }
        match plan_waves(&all, None, "1,50%") {
            Err(ApiError::InvalidArgument { field, .. }) => assert_eq!(field, "waves"),
            other => panic!("{other:?}"),
        }
    }

    fn figures_of(attempts: u64, failures: u64, p99_ms: u64) -> HealthFigures {
        HealthFigures {
            window_secs: 60,
            accepts: attempts,
            accept_p99_us: p99_ms * 1000,
            send_attempts: attempts,
            send_failures: failures,
            sent: attempts - failures,
            ..HealthFigures::default()
        }
    }

    fn failed(checks: &[GateCheck]) -> Vec<&str> {
        checks
            .iter()
            .filter(|c| !c.passed)
            .map(|c| c.name.as_str())
            .collect()
    }

    #[test]
    fn the_gate_fails_a_wave_whose_sends_fail_more_than_the_baselines() {
        let config = GateConfig::default();
        let baseline = figures_of(1000, 5, 4);
        assert!(failed(&gate(&figures_of(200, 2, 5), &baseline, &config)).is_empty());
        let checks = gate(&figures_of(200, 100, 5), &baseline, &config);
        assert_eq!(failed(&checks), vec!["send error rate"]);
        assert_eq!(checks[0].wave, 0.5);
        assert!(failures(&checks).contains("send error rate 0.5000"));
    }

    #[test]
    fn the_gate_fails_a_slower_wave_beyond_the_ratio_and_the_slack() {
        let config = GateConfig::default();
        let baseline = figures_of(1000, 0, 30);
        assert_eq!(
            failed(&gate(&figures_of(500, 0, 61), &baseline, &config)),
            vec!["accept p99 ms"]
        );
        assert!(failed(&gate(&figures_of(500, 0, 59), &baseline, &config)).is_empty());
        // Twice a tiny p99 is noise: the slack decides.
        let fast = figures_of(1000, 0, 1);
        assert!(failed(&gate(&figures_of(500, 0, 15), &fast, &config)).is_empty());
    }

    #[test]
    fn bounce_complaint_and_dead_letter_deltas_are_gated() {
        let config = GateConfig::default();
        let baseline = figures_of(1000, 0, 4);
        let mut wave = figures_of(1000, 0, 4);
        wave.complaints = 5;
        wave.bounces = 30;
        wave.dead_letters = 20;
        assert_eq!(
            failed(&gate(&wave, &baseline, &config)),
            vec!["bounce rate", "complaint rate", "dead-letter rate"]
        );
    }

    #[test]
    fn too_little_traffic_is_not_judged() {
        let config = GateConfig::default();
        let checks = gate(&figures_of(5, 5, 900), &figures_of(1000, 0, 4), &config);
        assert!(failed(&checks).is_empty());
        assert!(checks.iter().all(|c| c.note.starts_with("not judged")));
    }

    #[test]
    fn thresholds_are_checked_naming_the_field() {
        let bad = v1::GateThresholds {
            max_error_rate_delta: Some(1.5),
            ..Default::default()
        };
        match gate_config(Some(bad)) {
            Err(ApiError::InvalidArgument { field, .. }) => {
                assert_eq!(field, "gate.max_error_rate_delta")
            }
            other => panic!("{other:?}"),
        }
        let set = v1::GateThresholds {
            min_attempts: Some(5),
            ..Default::default()
        };
        let config = gate_config(Some(set)).unwrap();
        assert_eq!(config.min_attempts, 5);
        assert_eq!(
            config.max_error_rate_delta,
            GateConfig::default().max_error_rate_delta
        );
    }
}
