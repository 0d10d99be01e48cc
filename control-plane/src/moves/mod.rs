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
//!
//! What a step does next, and when it gives up, is [`plan::next`]: a pure function of the
//! step and of what its driver saw. This module does the IO: the registry, the cells' calls
//! and the pauses.

use std::collections::HashSet;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use cellmail_proto::v1::{self, cell_client::CellClient};
use cellmail_proto::{ApiError, CellId, TenantId, now_ms};
use tokio_util::sync::CancellationToken;
use tonic::transport::Channel;

use crate::placement::Requirements;
use crate::records::{self, read};
use cellmail_registry::audit;
use cellmail_registry::channels::CellChannels;
use cellmail_registry::schema::{
    self, AuditRecord, CellRecord, CellState, Keys, MoveRecord, MoveStep, PlacementRecord,
    TenantRecord,
};
use cellmail_registry::{Compare, Op, Registry};

pub mod plan;

use plan::{Action, Change, Copied, Kept, Observations, Pass, PlacementWrite, RETRY, Written};
pub use plan::{FREEZE_BUDGET, PRECOPY_MARGIN};

/// How often the leader looks for moves to carry forward.
const SCAN: Duration = Duration::from_millis(100);

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

fn put<T: serde::Serialize>(key: &str, record: &T) -> Op {
    Op::Put {
        key: key.to_owned(),
        value: schema::encode(record),
        lease: None,
    }
}

/// A cell's failed answer as the move sees it: the cell is not usable right now.
fn unavailable(cell: &CellId) -> impl Fn(tonic::Status) -> ApiError + '_ {
    move |s| ApiError::Unavailable(format!("cell {cell}: {}", s.message()))
}

/// Carries the registry's unfinished moves forward, on the leading control plane: the
/// IO of the steps [`plan::next`] decides.
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
    pub fn new(registry: Arc<dyn Registry>, keys: Keys, channels: CellChannels) -> Arc<Self> {
        Arc::new(Self {
            registry,
            keys,
            channels,
            driving: Mutex::new(HashSet::new()),
        })
    }

    /// Until `lost` is cancelled: drives each unfinished move in a task of its own.
    pub async fn run(self: Arc<Self>, lost: CancellationToken) {
        let mut tick = tokio::time::interval(SCAN);
        loop {
            tokio::select! {
                () = lost.cancelled() => return,
                _ = tick.tick() => {}
            }
            let prefix = self.keys.moves();
            for (record, _) in records::list::<MoveRecord>(self.registry.as_ref(), &prefix).await {
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
            if self.step(record, revision).await.is_err() {
                return;
            }
        }
    }

    /// Carries `record` (read at `revision`) through its step: does what [`plan::next`] asks
    /// and notes what it saw, until the step's change is written.
    async fn step(&self, record: MoveRecord, revision: u64) -> Result<(), Stopped> {
        let mut seen = Observations::default();
        loop {
            seen.now_ms = now_ms();
            let done = match plan::next(&record, &seen) {
                Action::ReadPlacement => self
                    .placement(&record.tenant)
                    .await
                    .map(|placement| seen.placement = Some(placement)),
                Action::PrepareTarget => self
                    .prepare_target(&record)
                    .await
                    .map(|kept| seen.kept = Some(kept)),
                Action::Copy { pass, within } => self
                    .transfer(&record, pass, within)
                    .await
                    .map(|copied| seen.copied(pass, copied)),
                Action::AskBacklog => self
                    .backlog(&record)
                    .await
                    .map(|messages| seen.backlog = Some(messages)),
                Action::Retry(pause) => {
                    tokio::time::sleep(pause).await;
                    seen = seen.retry();
                    Ok(())
                }
                Action::Write(change) => return self.write(&record, revision, change, &seen).await,
                Action::Done => return Ok(()),
            };
            if let Err(err) = done {
                tracing::warn!(%err, tenant = %record.tenant, step = record.step.as_str(), attempt = seen.failed_attempts + 1, "the move's step failed");
                seen.failure = Some(err);
            }
        }
    }

    /// Asks the target to get ready for the tenant at the move's next epoch.
    async fn prepare_target(&self, record: &MoveRecord) -> Result<Kept, ApiError> {
        let request = v1::PrepareTenantRequest {
            tenant_id: record.tenant.to_string(),
            epoch: record.from_epoch.0 + 1,
        };
        let kept = self
            .client(&record.to)
            .await?
            .prepare_tenant(request)
            .await
            .map_err(unavailable(&record.to))?
            .into_inner();
        Ok(Kept {
            as_of_ms: kept.kept_as_of_ms,
            epoch: kept.kept_epoch,
        })
    }

    /// The tenant's messages the source has yet to deliver.
    async fn backlog(&self, record: &MoveRecord) -> Result<u64, ApiError> {
        let request = v1::TenantBacklogRequest {
            tenant_id: record.tenant.to_string(),
        };
        let messages = self
            .client(&record.from)
            .await?
            .tenant_backlog(request)
            .await
            .map_err(unavailable(&record.from))?
            .into_inner()
            .messages;
        tracing::debug!(tenant = %record.tenant, messages, "the source's backlog of the tenant");
        Ok(messages)
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

    /// Writes `change` of `before` (still at `revision`) with its audit entry, and with the
    /// tenant's placement when the change moves it, all in one transaction.
    async fn write(
        &self,
        before: &MoveRecord,
        revision: u64,
        change: Change,
        seen: &Observations,
    ) -> Result<(), Stopped> {
        let Written {
            after,
            audit: action,
            placement,
        } = change.apply(before, seen.now_ms);
        if after.step == MoveStep::RolledBack {
            tracing::error!(tenant = %after.tenant, detail = %after.detail, "move rolled back; the tenant stays on {}", after.from);
        }
        let key = self.keys.move_of(&after.tenant);
        let entry = AuditRecord {
            at_ms: after.updated_at_ms,
            actor: after.actor.clone(),
            action: action.to_owned(),
            tenant: Some(after.tenant.clone()),
            reason: after.reason.clone(),
            before: audit::snapshot(before),
            after: audit::snapshot(&after),
        };
        let mut compares = vec![Compare {
            key: key.clone(),
            mod_revision: revision,
        }];
        let mut ops = vec![put(&key, &after), audit::entry_op(&self.keys, &entry)];
        if let Some(PlacementWrite { record, revision }) = placement {
            let mod_revision = match revision {
                Some(revision) => revision,
                None => {
                    let (_, now) = self.placement(&after.tenant).await.map_err(|_| Stopped)?;
                    now
                }
            };
            let key = self.keys.placement(&after.tenant);
            ops.push(put(&key, &record));
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

    /// Exports `pass` of the tenant from the source and imports it into the target, failing
    /// a copy still going after `within`.
    async fn transfer(
        &self,
        record: &MoveRecord,
        pass: Pass,
        within: Option<Duration>,
    ) -> Result<Copied, ApiError> {
        let copy = self.copy(record, pass);
        match within {
            None => copy.await,
            Some(within) => tokio::time::timeout(within, copy).await.map_err(|_| {
                ApiError::Unavailable(format!("the copy took longer than {FREEZE_BUDGET:?}"))
            })?,
        }
    }

    async fn copy(&self, record: &MoveRecord, pass: Pass) -> Result<Copied, ApiError> {
        let since = pass.since(record);
        let request = v1::ExportTenantRequest {
            tenant_id: record.tenant.to_string(),
            epoch: record.from_epoch.0,
            precopy: matches!(pass, Pass::Precopy(_)),
            since_ms: since.ms,
            messages: pass.messages(),
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
                && chunk.events.is_empty()
                && chunk.figures.is_empty()
                && !chunk.webhooks_included
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
