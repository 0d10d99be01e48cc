//! Moving a tenant from one cell to another: no message lost, none sent twice, and a short,
//! bounded pause for the moving tenant only.
//!
//! An operator's request writes the tenant's move record (`moves/<tenant>`, step PREPARING);
//! the leading control plane's [`Mover`] carries every unfinished move forward, one persisted
//! step at a time, so that a control plane taking over resumes where the last one stopped:
//!
//! 1. PREPARING: the target cell gets ready (its mailer's resources for the tenant), notes
//!    from when it takes the tenant over (its clock), and says from when it needs the
//!    tenant's state: a cell the tenant was handed over from keeps what it had, current as
//!    of that hand-over, so only what was written since is pre-copied (the suppressions,
//!    idempotency keys and message records): on a move straight back, what the source wrote
//!    since it took the tenant over from the target, on the source's own clock; otherwise
//!    what was written since the hand-over less [`PRECOPY_MARGIN`] for the clocks' skew. A
//!    cell without a usable hand-over drops what it had and gets everything. The source
//!    still serves the tenant meanwhile. Then, in one transaction, the placement is frozen
//!    (same epoch, compare-and-swap) and the step becomes FROZEN. Routers hold the
//!    tenant's calls while the placement is frozen; cells refuse them.
//! 2. FROZEN: the source exports the suppressions (added or removed) and idempotency keys
//!    written since its pre-copy read (every write not in that read is stamped as of it or
//!    later: the cell's store stamps its writes as it commits them) once it sees the freeze
//!    and every call it had let in has finished; each chunk is imported by the target. So
//!    the freeze lasts as long as what the tenant wrote during the pre-copy takes to copy,
//!    not its whole list and window. Then, in one transaction, the placement switches to the
//!    target at epoch + 1 (serving again) and the step becomes SWITCHED. A copy that keeps
//!    failing past [`FREEZE_BUDGET`] rolls the move back: the placement is unfrozen on the
//!    source.
//! 3. SWITCHED: the source keeps delivering what it had accepted and forwards late feedback;
//!    once its backlog of the tenant is zero, the message records written since their
//!    pre-copy are copied again as they ended (the source read them while no call of the
//!    tenant was under way, so from exactly then; a source that does not say so, from the
//!    margin before), the source notes that hand-over, and the move is COMPLETE. So each
//!    move copies what the tenant wrote since it last left the target, not its whole
//!    history.
//!
//! Every step change is audited in the transaction that makes it, and a move that finishes
//! is counted in `cellmail_control_moves_finished_total{step}` (`complete`, `rolled_back`).

use std::collections::HashSet;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use cellmail_proto::v1::{self, cell_client::CellClient};
use cellmail_proto::{ApiError, CellId, Epoch, TenantId, now_ms};
use tokio_util::sync::CancellationToken;
use tonic::transport::Channel;

use crate::operations;
use crate::placement::Requirements;
use cellmail_registry::audit;
use cellmail_registry::channels::CellChannels;
use cellmail_registry::schema::{
    self, AuditRecord, CellRecord, CellState, Keys, MoveRecord, MoveStep, OperationRecord,
    PlacementRecord, PlacementState, TenantRecord,
};
use cellmail_registry::{Compare, KeyValue, Op, Registry};

/// How long a copy may keep failing while the placement is frozen before the move is rolled
/// back (routers answer the tenant's calls UNAVAILABLE after their own, shorter hold).
pub const FREEZE_BUDGET: Duration = Duration::from_secs(10);
/// How far before a time another cell's clock gave (what the target kept is current as of
/// its hand-over), or a message id's time, a copy starts: those are stamped before their
/// writes commit, and clocks differ between cells.
pub const PRECOPY_MARGIN: Duration = Duration::from_secs(5);
/// [`PRECOPY_MARGIN`] in milliseconds.
fn margin() -> u64 {
    PRECOPY_MARGIN.as_millis() as u64
}

/// How often the leader looks for moves to carry forward.
const SCAN: Duration = Duration::from_millis(100);
/// Pause between attempts of a step that failed, and between backlog checks.
const RETRY: Duration = Duration::from_millis(250);
/// Attempts to prepare the target before the move is given up.
const PREPARE_ATTEMPTS: u32 = 8;

/// Writes a new move of `tenant` to `to` (step PREPARING) for the leader to carry out.
pub async fn request(
    registry: &dyn Registry,
    keys: &Keys,
    tenant: &TenantId,
    to: &CellId,
    actor: String,
    reason: String,
) -> Result<MoveRecord, ApiError> {
    let placement_key = keys.placement(tenant);
    let (placement, placement_revision) = read::<PlacementRecord>(registry, &placement_key)
        .await?
        .ok_or_else(|| ApiError::NotFound(format!("tenant {tenant} does not exist")))?;
    if placement.cell == *to {
        return Err(ApiError::invalid(
            "to_cell",
            format!("tenant {tenant} is already on cell {to}"),
        ));
    }
    let (target, _) = read::<CellRecord>(registry, &keys.cell(to))
        .await?
        .ok_or_else(|| ApiError::invalid("to_cell", format!("cell {to} does not exist")))?;
    if target.state != CellState::Active {
        return Err(ApiError::invalid(
            "to_cell",
            format!(
                "cell {to} is {:?}; only ACTIVE cells take tenants",
                target.state
            ),
        ));
    }
    if registry
        .get(&keys.alive(to))
        .await
        .map_err(ApiError::from)?
        .is_none()
    {
        return Err(ApiError::invalid("to_cell", format!("cell {to} is down")));
    }
    let (tenant_record, _) = read::<TenantRecord>(registry, &keys.tenant(tenant))
        .await?
        .ok_or_else(|| ApiError::NotFound(format!("tenant {tenant} does not exist")))?;
    if !Requirements::of_tenant(tenant, &tenant_record).admitted_by(&target) {
        return Err(ApiError::invalid(
            "to_cell",
            format!(
                "cell {to}'s labels ({:?}) do not admit tenant {tenant} (its labels {:?}, tier {})",
                target.labels,
                tenant_record.labels,
                tenant_record.tier.as_str()
            ),
        ));
    }
    let move_key = keys.move_of(tenant);
    let previous = read::<MoveRecord>(registry, &move_key).await?;
    if let Some((running, _)) = previous.as_ref().filter(|(m, _)| !m.step.finished()) {
        return Err(ApiError::Aborted(format!(
            "tenant {tenant} is already moving to {} (move {}, {})",
            running.to,
            running.id,
            running.step.as_str()
        )));
    }
    let now = now_ms();
    let record = MoveRecord {
        id: ulid::Ulid::new().to_string(),
        tenant: tenant.clone(),
        from: placement.cell.clone(),
        to: to.clone(),
        from_epoch: placement.epoch,
        step: MoveStep::Preparing,
        detail: String::new(),
        started_at_ms: now,
        updated_at_ms: now,
        frozen_at_ms: 0,
        freeze_ms: 0,
        precopy_as_of_ms: 0,
        messages_since_ms: 0,
        actor: actor.clone(),
        reason: reason.clone(),
    };
    let entry = AuditRecord {
        at_ms: now,
        actor,
        action: format!("tenant.move {} -> {to}", placement.cell),
        tenant: Some(tenant.clone()),
        reason,
        before: audit::snapshot(&placement),
        after: audit::snapshot(&record),
    };
    let compares = vec![
        Compare {
            key: move_key.clone(),
            mod_revision: previous.map_or(0, |(_, revision)| revision),
        },
        Compare {
            key: placement_key,
            mod_revision: placement_revision,
        },
    ];
    let ops = vec![put(&move_key, &record), audit::entry_op(keys, &entry)];
    match registry.txn(compares, ops).await.map_err(ApiError::from)? {
        Some(_) => Ok(record),
        None => Err(ApiError::Aborted(format!(
            "tenant {tenant}'s placement or move changed meanwhile; try again"
        ))),
    }
}

/// The tenant's latest move.
pub async fn latest(
    registry: &dyn Registry,
    keys: &Keys,
    tenant: &TenantId,
) -> Result<Option<MoveRecord>, ApiError> {
    Ok(read(registry, &keys.move_of(tenant))
        .await?
        .map(|(record, _)| record))
}

pub(crate) async fn read<T: serde::de::DeserializeOwned>(
    registry: &dyn Registry,
    key: &str,
) -> Result<Option<(T, u64)>, ApiError> {
    let Some(KeyValue {
        value,
        mod_revision,
        ..
    }) = registry.get(key).await.map_err(ApiError::from)?
    else {
        return Ok(None);
    };
    let record = schema::decode(&value)
        .map_err(|e| ApiError::Internal(format!("unreadable record {key}: {e}")))?;
    Ok(Some((record, mod_revision)))
}

fn put<T: serde::Serialize>(key: &str, record: &T) -> Op {
    Op::Put {
        key: key.to_owned(),
        value: schema::encode(record),
        lease: None,
    }
}

/// From when a pre-copy reads what the source wrote of the tenant.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
struct Since {
    /// The source's clock (0: all of it).
    ms: u64,
    /// Instead, from when the source took the tenant over (its clock), if it noted that: the
    /// target is the cell it took the tenant over from, and kept what it had.
    taken_over: bool,
}

/// Which of a move's copies.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Pass {
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

/// What a copy carried, and when the source read it.
#[derive(Debug, Default)]
struct Copied {
    suppressions: usize,
    keys: usize,
    messages: usize,
    as_of_ms: u64,
    /// The source read exactly as of `as_of_ms`.
    exact: bool,
}

/// The tenant's placement on the move's source, at the epoch the move started from.
fn on_source(record: &MoveRecord, state: PlacementState) -> PlacementRecord {
    PlacementRecord {
        cell: record.from.clone(),
        epoch: record.from_epoch,
        state,
    }
}

/// A cell's failed answer as the move sees it: the cell is not usable right now.
fn unavailable(cell: &CellId) -> impl Fn(tonic::Status) -> ApiError + '_ {
    move |s| ApiError::Unavailable(format!("cell {cell}: {}", s.message()))
}

/// Carries the registry's unfinished moves forward, on the leading control plane.
pub struct Mover {
    registry: Arc<dyn Registry>,
    keys: Keys,
    channels: CellChannels,
    /// Tenants whose move a task of this mover is driving.
    driving: Mutex<HashSet<TenantId>>,
}

pub const MOVES_FINISHED: &str = "cellmail_control_moves_finished_total";

/// Counts a move that reached `step`, if that is a final one (`complete` or `rolled_back`).
/// The step is written by compare-and-set, so each move is counted once, by the control
/// plane that finished it.
fn count_finished(step: MoveStep) {
    let step = match step {
        MoveStep::Complete => "complete",
        MoveStep::RolledBack => "rolled_back",
        MoveStep::Preparing | MoveStep::Frozen | MoveStep::Switched => return,
    };
    metrics::counter!(MOVES_FINISHED, "step" => step).increment(1);
}

/// A step's driver stopped: another writer changed the move or the placement (the record
/// says what happened), or the registry could not be read; the next scan picks the move up
/// again if it is unfinished.
struct Stopped;

impl Mover {
    pub fn new(registry: Arc<dyn Registry>, keys: Keys) -> Arc<Self> {
        Arc::new(Self {
            registry,
            keys,
            channels: CellChannels::default(),
            driving: Mutex::new(HashSet::new()),
        })
    }

    /// Until `lost` is cancelled: advances every unfinished evacuation and rebalance by one
    /// pass, and drives each unfinished move in a task of its own.
    pub async fn run(self: Arc<Self>, lost: CancellationToken) {
        let mut tick = tokio::time::interval(SCAN);
        loop {
            tokio::select! {
                () = lost.cancelled() => return,
                _ = tick.tick() => {}
            }
            for (record, revision) in self
                .records::<OperationRecord>(&self.keys.operations())
                .await
            {
                if record.finished {
                    continue;
                }
                let (registry, id) = (self.registry.as_ref(), record.id.clone());
                if let Err(err) = operations::advance(registry, &self.keys, record, revision).await
                {
                    tracing::warn!(%err, operation = %id, "advancing the operation failed; retrying");
                }
            }
            for (record, _) in self.records::<MoveRecord>(&self.keys.moves()).await {
                if record.step.finished() || !self.claim(&record.tenant) {
                    continue;
                }
                let (mover, lost) = (self.clone(), lost.clone());
                tokio::spawn(async move {
                    let tenant = record.tenant.clone();
                    tokio::select! {
                        () = lost.cancelled() => {}
                        () = mover.drive(&tenant) => {}
                    }
                    mover.release(&tenant);
                });
            }
        }
    }

    /// The readable records under `prefix`, with their mod revisions (none while the
    /// registry cannot be read: the next scan tries again).
    async fn records<T: serde::de::DeserializeOwned>(&self, prefix: &str) -> Vec<(T, u64)> {
        let listed = match self.registry.list(prefix).await {
            Ok(listed) => listed,
            Err(err) => {
                tracing::warn!(%err, prefix, "listing failed; retrying");
                return Vec::new();
            }
        };
        listed
            .entries
            .into_iter()
            .filter_map(|kv| match schema::decode(&kv.value) {
                Ok(record) => Some((record, kv.mod_revision)),
                Err(err) => {
                    tracing::error!(key = kv.key, %err, "unreadable record ignored");
                    None
                }
            })
            .collect()
    }

    fn driving(&self) -> std::sync::MutexGuard<'_, HashSet<TenantId>> {
        // Only whole inserts and removes happen under this lock.
        self.driving.lock().unwrap_or_else(|p| p.into_inner())
    }

    fn claim(&self, tenant: &TenantId) -> bool {
        self.driving().insert(tenant.clone())
    }

    fn release(&self, tenant: &TenantId) {
        self.driving().remove(tenant);
    }

    /// Drives `tenant`'s move until it is finished or another writer took it over.
    async fn drive(&self, tenant: &TenantId) {
        loop {
            let key = self.keys.move_of(tenant);
            let (record, revision) = match read::<MoveRecord>(self.registry.as_ref(), &key).await {
                Ok(Some(found)) => found,
                Ok(None) => return,
                Err(err) => {
                    tracing::warn!(%err, %tenant, "reading the move failed; retrying");
                    tokio::time::sleep(RETRY).await;
                    continue;
                }
            };
            if record.step.finished() {
                return;
            }
            tracing::info!(%tenant, step = record.step.as_str(), from = %record.from, to = %record.to, "move step");
            let outcome = match record.step {
                MoveStep::Preparing => self.prepare(record, revision).await,
                MoveStep::Frozen => self.copy(record, revision).await,
                MoveStep::Switched => self.drain(record, revision).await,
                MoveStep::Complete | MoveStep::RolledBack => return,
            };
            if outcome.is_err() {
                return;
            }
        }
    }

    async fn client(&self, cell: &CellId) -> Result<CellClient<Channel>, ApiError> {
        let (record, _) = read::<CellRecord>(self.registry.as_ref(), &self.keys.cell(cell))
            .await?
            .ok_or_else(|| ApiError::Unavailable(format!("cell {cell} is not registered")))?;
        if record.endpoint.is_empty() {
            return Err(ApiError::Unavailable(format!(
                "cell {cell} has not registered an endpoint"
            )));
        }
        self.channels.client(cell, &record.endpoint)
    }

    /// The tenant's placement and its mod revision.
    async fn placement(&self, tenant: &TenantId) -> Result<(PlacementRecord, u64), ApiError> {
        read(self.registry.as_ref(), &self.keys.placement(tenant))
            .await?
            .ok_or_else(|| ApiError::NotFound(format!("tenant {tenant} has no placement")))
    }

    /// Writes `after` over the move record (still at `revision`) with an audit entry of
    /// `action`, and with `placement` (the tenant's new placement and the mod revision its
    /// key must still be at), all in one transaction.
    async fn advance(
        &self,
        before: &MoveRecord,
        revision: u64,
        after: &MoveRecord,
        action: &str,
        placement: Option<(u64, &PlacementRecord)>,
    ) -> Result<(), Stopped> {
        let key = self.keys.move_of(&after.tenant);
        let entry = AuditRecord {
            at_ms: after.updated_at_ms,
            actor: after.actor.clone(),
            action: action.to_owned(),
            tenant: Some(after.tenant.clone()),
            reason: after.reason.clone(),
            before: audit::snapshot(before),
            after: audit::snapshot(after),
        };
        let mut compares = vec![Compare {
            key: key.clone(),
            mod_revision: revision,
        }];
        let mut ops = vec![put(&key, after), audit::entry_op(&self.keys, &entry)];
        if let Some((mod_revision, placement)) = placement {
            let key = self.keys.placement(&after.tenant);
            ops.push(put(&key, placement));
            compares.push(Compare { key, mod_revision });
        }
        loop {
            match self.registry.txn(compares.clone(), ops.clone()).await {
                Ok(Some(_)) => {
                    count_finished(after.step);
                    return Ok(());
                }
                Ok(None) => {
                    tracing::warn!(tenant = %after.tenant, action, "the move or placement changed meanwhile; this driver stops");
                    return Err(Stopped);
                }
                Err(err) => {
                    tracing::warn!(%err, tenant = %after.tenant, action, "writing the move step failed; retrying");
                    tokio::time::sleep(RETRY).await;
                }
            }
        }
    }

    async fn prepare(&self, record: MoveRecord, revision: u64) -> Result<(), Stopped> {
        let tenant = record.tenant.clone();
        let mut attempt = 0;
        let failure = loop {
            attempt += 1;
            let prepared = async {
                let (placement, placement_revision) = self.placement(&tenant).await?;
                let expected = on_source(&record, PlacementState::Serving);
                if placement != expected {
                    return Err(ApiError::Aborted(format!(
                        "the placement changed since the move started: {placement:?}"
                    )));
                }
                let request = v1::PrepareTenantRequest {
                    tenant_id: tenant.to_string(),
                    epoch: record.from_epoch.0 + 1,
                };
                let kept = self
                    .client(&record.to)
                    .await?
                    .prepare_tenant(request)
                    .await
                    .map_err(unavailable(&record.to))?
                    .into_inner();
                // What the target kept of an earlier stay is current as of its hand-over:
                // only what was written since is copied. When the source took the tenant
                // over from the target itself (at the epoch after that hand-over), that is
                // what the source wrote since it took it over, on its own clock; otherwise
                // what was written since the hand-over, on the target's clock less the margin.
                let since = match kept.kept_as_of_ms {
                    0 => Since {
                        ms: 0,
                        taken_over: false,
                    },
                    as_of => Since {
                        ms: as_of.saturating_sub(margin()),
                        taken_over: kept.kept_epoch + 1 == record.from_epoch.0,
                    },
                };
                let precopied = self.transfer(&record, Pass::Precopy(since)).await?;
                let messages = self.transfer(&record, Pass::Messages(since)).await?;
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
                Ok((
                    placement_revision,
                    precopied.as_of_ms,
                    messages_since_ms,
                    detail,
                ))
            }
            .await;
            match prepared {
                Ok((placement_revision, precopy_as_of_ms, messages_since_ms, detail)) => {
                    let now = now_ms();
                    let frozen = on_source(&record, PlacementState::Frozen);
                    let after = MoveRecord {
                        step: MoveStep::Frozen,
                        detail,
                        updated_at_ms: now,
                        frozen_at_ms: now,
                        precopy_as_of_ms,
                        messages_since_ms,
                        ..record.clone()
                    };
                    return self
                        .advance(
                            &record,
                            revision,
                            &after,
                            "tenant.move.freeze",
                            Some((placement_revision, &frozen)),
                        )
                        .await;
                }
                Err(err @ ApiError::Aborted(_)) => break err,
                Err(err) if attempt >= PREPARE_ATTEMPTS => break err,
                Err(err) => {
                    tracing::warn!(%err, %tenant, attempt, "preparing the target failed; retrying");
                    tokio::time::sleep(RETRY * attempt).await;
                }
            }
        };
        let after = MoveRecord {
            step: MoveStep::RolledBack,
            detail: format!("preparing cell {} failed: {failure}", record.to),
            updated_at_ms: now_ms(),
            ..record.clone()
        };
        self.advance(&record, revision, &after, "tenant.move.rollback", None)
            .await
    }

    /// Exports the tenant from the source and imports it into the target.
    async fn transfer(&self, record: &MoveRecord, pass: Pass) -> Result<Copied, ApiError> {
        let from = |ms| Since {
            ms,
            taken_over: false,
        };
        let (since, messages) = match pass {
            Pass::Precopy(since) => (since, false),
            Pass::Final => (from(record.precopy_as_of_ms), false),
            Pass::Messages(since) => (since, true),
            Pass::Handover => (from(record.messages_since_ms), true),
        };
        let request = v1::ExportTenantRequest {
            tenant_id: record.tenant.to_string(),
            epoch: record.from_epoch.0,
            precopy: matches!(pass, Pass::Precopy(_)),
            since_ms: since.ms,
            messages,
            handover: pass == Pass::Handover,
            since_taken_over: since.taken_over,
        };
        let mut chunks = self
            .client(&record.from)
            .await?
            .export_tenant(request)
            .await
            .map_err(unavailable(&record.from))?
            .into_inner();
        let mut target = self.client(&record.to).await?;
        let mut copied = Copied::default();
        while let Some(chunk) = chunks.message().await.map_err(unavailable(&record.from))? {
            (copied.as_of_ms, copied.exact) = (chunk.as_of_ms, chunk.as_of_exact);
            if chunk.suppressions.is_empty()
                && chunk.removed_suppressions.is_empty()
                && chunk.idempotency.is_empty()
                && chunk.messages.is_empty()
                && chunk.figures.is_empty()
            {
                continue;
            }
            copied.suppressions += chunk.suppressions.len();
            copied.keys += chunk.idempotency.len();
            copied.messages += chunk.messages.len();
            let request = v1::ImportTenantRequest {
                tenant_id: record.tenant.to_string(),
                chunk: Some(chunk),
            };
            target
                .import_tenant(request)
                .await
                .map_err(unavailable(&record.to))?;
        }
        Ok(copied)
    }

    async fn copy(&self, record: MoveRecord, revision: u64) -> Result<(), Stopped> {
        let tenant = record.tenant.clone();
        let failure = loop {
            let copied = async {
                let (placement, placement_revision) = self.placement(&tenant).await?;
                if placement != on_source(&record, PlacementState::Frozen) {
                    return Err(ApiError::Aborted(format!(
                        "the frozen placement changed meanwhile: {placement:?}"
                    )));
                }
                // A copy that hangs must not keep the tenant frozen past the budget.
                let spent = Duration::from_millis(now_ms().saturating_sub(record.frozen_at_ms));
                let left = FREEZE_BUDGET.saturating_sub(spent);
                let copied = tokio::time::timeout(left, self.transfer(&record, Pass::Final))
                    .await
                    .map_err(|_| {
                        ApiError::Unavailable(format!(
                            "the copy took longer than {FREEZE_BUDGET:?}"
                        ))
                    })??;
                Ok((placement_revision, copied))
            }
            .await;
            match copied {
                Ok((placement_revision, copied)) => {
                    let now = now_ms();
                    let switched = PlacementRecord {
                        cell: record.to.clone(),
                        epoch: Epoch(record.from_epoch.0 + 1),
                        state: PlacementState::Serving,
                    };
                    let after = MoveRecord {
                        step: MoveStep::Switched,
                        detail: format!(
                            "{}; copied {} suppressions and {} idempotency keys while frozen",
                            record.detail, copied.suppressions, copied.keys
                        ),
                        updated_at_ms: now,
                        freeze_ms: now.saturating_sub(record.frozen_at_ms),
                        ..record.clone()
                    };
                    return self
                        .advance(
                            &record,
                            revision,
                            &after,
                            "tenant.move.switch",
                            Some((placement_revision, &switched)),
                        )
                        .await;
                }
                Err(err @ ApiError::Aborted(_)) => {
                    // Someone else changed the placement: it is theirs now, and stays as it is.
                    tracing::error!(%err, %tenant, "move given up");
                    let after = MoveRecord {
                        step: MoveStep::RolledBack,
                        detail: err.to_string(),
                        updated_at_ms: now_ms(),
                        ..record.clone()
                    };
                    return self
                        .advance(&record, revision, &after, "tenant.move.rollback", None)
                        .await;
                }
                Err(err)
                    if now_ms().saturating_sub(record.frozen_at_ms)
                        >= FREEZE_BUDGET.as_millis() as u64 =>
                {
                    break err;
                }
                Err(err) => {
                    tracing::warn!(%err, %tenant, "copying the tenant failed; retrying");
                    tokio::time::sleep(RETRY).await;
                }
            }
        };
        self.roll_back(record, revision, failure).await
    }

    /// Unfreezes the placement on the source and marks the move rolled back.
    async fn roll_back(
        &self,
        record: MoveRecord,
        revision: u64,
        failure: ApiError,
    ) -> Result<(), Stopped> {
        let (_, placement_revision) = self.placement(&record.tenant).await.map_err(|_| Stopped)?;
        let now = now_ms();
        let serving = on_source(&record, PlacementState::Serving);
        let after = MoveRecord {
            step: MoveStep::RolledBack,
            detail: format!("copying to cell {} failed: {failure}", record.to),
            updated_at_ms: now,
            freeze_ms: now.saturating_sub(record.frozen_at_ms),
            ..record.clone()
        };
        tracing::error!(tenant = %record.tenant, %failure, "move rolled back; the tenant stays on {}", record.from);
        self.advance(
            &record,
            revision,
            &after,
            "tenant.move.rollback",
            Some((placement_revision, &serving)),
        )
        .await
    }

    async fn drain(&self, record: MoveRecord, revision: u64) -> Result<(), Stopped> {
        loop {
            let request = v1::TenantBacklogRequest {
                tenant_id: record.tenant.to_string(),
            };
            let backlog = match self.client(&record.from).await {
                Ok(mut source) => source
                    .tenant_backlog(request)
                    .await
                    .map(|r| r.into_inner().messages)
                    .map_err(|s| s.message().to_owned()),
                Err(err) => Err(err.to_string()),
            };
            match backlog {
                Ok(0) => match self.transfer(&record, Pass::Handover).await {
                    Ok(_) => break,
                    Err(err) => {
                        tracing::warn!(tenant = %record.tenant, %err, "copying the message records failed; retrying")
                    }
                },
                Ok(messages) => {
                    tracing::debug!(tenant = %record.tenant, messages, "the source is still delivering")
                }
                Err(err) => {
                    tracing::warn!(tenant = %record.tenant, %err, "asking the source for its backlog failed; retrying")
                }
            }
            tokio::time::sleep(RETRY).await;
        }
        let after = MoveRecord {
            step: MoveStep::Complete,
            updated_at_ms: now_ms(),
            ..record.clone()
        };
        self.advance(&record, revision, &after, "tenant.move.complete", None)
            .await
    }
}

/// A move as operators see it.
pub fn info(record: &MoveRecord) -> v1::MoveInfo {
    v1::MoveInfo {
        id: record.id.clone(),
        tenant_id: record.tenant.to_string(),
        from_cell: record.from.to_string(),
        to_cell: record.to.to_string(),
        from_epoch: record.from_epoch.0,
        state: record.step.as_str().to_owned(),
        detail: record.detail.clone(),
        started_at_ms: record.started_at_ms as i64,
        updated_at_ms: record.updated_at_ms as i64,
        freeze_ms: record.freeze_ms,
        actor: record.actor.clone(),
        reason: record.reason.clone(),
    }
}
