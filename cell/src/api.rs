//! The `Cell` gRPC service: the router's way into the accept path and into the tenant's own
//! state (messages, suppression list). Every call is fenced on the tenant's placement epoch
//! and scoped to the tenant the router authenticated. The control plane's calls of a tenant
//! move (prepare, export, import, backlog) and feedback forwarded by other cells come in here
//! too.

use std::pin::Pin;
use std::sync::Arc;
use std::time::{Duration, Instant};

use cellmail_proto::v1::{self, cell_server::Cell};
use cellmail_proto::{
    ApiError, CellId, Epoch, MessageClass, MessageId, SuppressionReason, SuppressionScope,
    TenantId, now_ms, suppression_key,
};
use cellmail_registry::catalog::WatchedCatalog;
use cellmail_registry::schema::{PlacementState, TenantStatus};
use tokio_stream::Stream;
use tonic::{Request, Response, Status};
use tracing::field::Empty;
use tracing::{Instrument as _, Span};

use crate::accept::{Acceptor, Entered};
use crate::commit::StorageError;
use crate::feedback::{self, Ingest};
use crate::health::{self, Health};
use crate::mailer::Mailer;
use crate::message::{Accepted, MessageRecord, RecipientOutcome};
use crate::store::{self, HandOver, Store, Suppressed, TenantExport};
use crate::validation::parse_mailbox;

const DEFAULT_STATS_HOURS: u32 = 24;
const MAX_STATS_HOURS: u32 = store::STATS_HOURS as u32;

/// The most suppressions one page holds.
const MAX_PAGE: usize = 1000;
/// Entries per chunk of a tenant's export.
const EXPORT_CHUNK: usize = 1000;

pub struct CellApi {
    pub cell: CellId,
    pub acceptor: Arc<Acceptor>,
    pub store: Arc<Store>,
    pub catalog: Arc<WatchedCatalog>,
    pub mailer: Arc<dyn Mailer>,
    pub ingest: Arc<Ingest>,
    pub health: Arc<Health>,
    /// The release this process runs.
    pub release: String,
}

impl CellApi {
    /// The caller's tenant, once the epoch it was routed with is known to be this cell's;
    /// the call holds the returned gate until it is done.
    async fn caller(&self, caller: Option<v1::Caller>) -> Result<(TenantId, Entered), ApiError> {
        let caller = caller.ok_or_else(|| ApiError::invalid("caller", "is required"))?;
        let tenant = TenantId::new(caller.tenant_id)
            .map_err(|e| ApiError::invalid("caller.tenant_id", e.to_string()))?;
        let entered = self.acceptor.fence(&tenant, Epoch(caller.epoch)).await?;
        Ok((tenant, entered))
    }

    /// Refuses to overwrite the state of a tenant this cell serves now.
    fn not_serving(&self, tenant: &TenantId) -> Result<(), ApiError> {
        let catalog = self.catalog.read();
        match catalog.placements.get(tenant) {
            Some(p) if p.cell == self.cell && p.state == PlacementState::Serving => {
                Err(ApiError::Aborted(format!(
                    "tenant {tenant} is served by cell {} at epoch {}: its state here is live",
                    self.cell, p.epoch
                )))
            }
            _ => Ok(()),
        }
    }
}

/// The span of one accept, when spans are exported: a child of the router's span whose
/// trace context the call carries (with tenant and cell; the message id once known).
fn accept_span(cell: &CellId, request: &Request<v1::AcceptRequest>) -> Span {
    if !cellmail_proto::trace::exporting() {
        return Span::none();
    }
    let span = tracing::info_span!(
        "accept",
        otel.kind = "server",
        tenant = request.get_ref().tenant_id.as_str(),
        cell = cell.as_str(),
        message_id = Empty,
        outcome = Empty,
    );
    cellmail_proto::trace::continue_from_metadata(&span, request.metadata());
    span
}

/// Records on an accept's span the message id it answered, or the code it was refused with.
fn accept_answered(span: &Span, accepted: &Result<Accepted, ApiError>) {
    if span.is_disabled() {
        return;
    }
    match accepted {
        Ok(accepted) => {
            span.record("message_id", tracing::field::display(accepted.message_id));
            span.record("outcome", "ok");
        }
        Err(err) => {
            let code = Status::from(err.clone()).code();
            span.record("outcome", cellmail_proto::error::code_name(code));
        }
    }
}

/// The message records of `tenant` here after message id `after` ("": all), in pages of
/// `size`.
fn message_pages(
    store: &Store,
    tenant: &TenantId,
    since_ms: u64,
    size: usize,
) -> Result<Vec<Vec<(MessageRecord, u64)>>, StorageError> {
    let written = store.written_messages(tenant, since_ms)?;
    written
        .chunks(size)
        .map(|page| store.messages(page))
        .collect()
}

/// Runs `work` on a blocking thread: reads and encodings that walk a tenant's state (a
/// move's copies) would otherwise hold an async thread, and every other tenant's calls on
/// it, for as long as they take.
async fn off_thread<T: Send + 'static>(
    work: impl FnOnce() -> Result<T, ApiError> + Send + 'static,
) -> Result<T, ApiError> {
    tokio::task::spawn_blocking(work)
        .await
        .map_err(|e| ApiError::Internal(format!("a store task failed: {e}")))?
}

/// How long a move's background copy waits for a CPU its cell's calls leave free before it
/// is done at their priority too: a tenant must still move off a cell whose calls keep every
/// CPU busy, and the copy while it is frozen carries what it wrote during this one.
const BACKGROUND_BUDGET: Duration = Duration::from_millis(500);

/// Runs `work`, which nothing waits for but a move (a pre-copy, the records' copies), on a
/// thread of its own that the kernel runs only while no other thread wants its CPU, so that
/// moving a tenant adds no latency to the calls of the tenants that stay. Past
/// [`BACKGROUND_BUDGET`], the same work (a read) also runs [`off_thread`], and the first
/// answer is taken.
async fn in_background<T: Send + 'static>(
    work: impl Fn() -> Result<T, ApiError> + Send + Sync + 'static,
) -> Result<T, ApiError> {
    let work = Arc::new(work);
    let (done, mut answer) = tokio::sync::oneshot::channel();
    let background = {
        let work = work.clone();
        std::thread::Builder::new()
            .name("cell-copy".into())
            .spawn(move || {
                lower_priority();
                // The answer has no one to go to once the urgent run answered.
                let _ = done.send(work());
            })
    };
    background.map_err(|e| ApiError::Internal(format!("could not start a copy thread: {e}")))?;
    let stopped = |_| ApiError::Internal("a copy thread stopped before answering".into());
    match tokio::time::timeout(BACKGROUND_BUDGET, &mut answer).await {
        Ok(answered) => answered.map_err(stopped)?,
        Err(_) => {
            tracing::info!(
                budget = ?BACKGROUND_BUDGET,
                "a background copy found no idle CPU in time; it runs at the calls' priority too"
            );
            tokio::select! {
                answered = &mut answer => answered.map_err(stopped)?,
                answered = off_thread(move || work()) => answered,
            }
        }
    }
}

/// Schedules the calling thread only while no other wants its CPU (`SCHED_IDLE`); where
/// that fails, it runs as before, which only costs the other threads some latency.
#[cfg(target_os = "linux")]
pub fn lower_priority() {
    let param = libc::sched_param { sched_priority: 0 };
    // SAFETY: sets the calling thread's policy (pid 0 is the caller) from a valid parameter;
    // a thread may always lower its own.
    if unsafe { libc::sched_setscheduler(0, libc::SCHED_IDLE, &param) } != 0 {
        let err = std::io::Error::last_os_error();
        tracing::warn!(%err, "could not lower a thread's priority");
    }
}

#[cfg(not(target_os = "linux"))]
pub fn lower_priority() {}

/// Runs a fenced write to the end in a task of its own, holding its tenant's gate, even if
/// the caller goes away: a move's export waits for the gate and must find the write done.
async fn to_the_end<T: Send + 'static>(
    entered: Entered,
    write: impl Future<Output = Result<T, StorageError>> + Send + 'static,
) -> Result<T, ApiError> {
    tokio::spawn(async move {
        let _entered = entered;
        write.await
    })
    .await
    .map_err(|e| ApiError::Internal(format!("the write task failed: {e}")))?
    .map_err(ApiError::from)
}

/// One exported chunk back into store entries, naming what does not parse.
fn import_chunk(chunk: v1::TenantChunk) -> Result<TenantExport, ApiError> {
    let suppressions = chunk
        .suppressions
        .into_iter()
        .enumerate()
        .map(|(i, s)| {
            let field = |name: &str| format!("chunk.suppressions[{i}].{name}");
            if s.address.trim().is_empty() {
                return Err(ApiError::invalid(field("address"), "is required"));
            }
            let reason = SuppressionReason::from_wire(s.reason)
                .ok_or_else(|| ApiError::invalid(field("reason"), "unknown reason"))?;
            let message_id = match s.message_id.as_str() {
                "" => None,
                id => Some(id.parse().map_err(|e: cellmail_proto::IdError| {
                    ApiError::invalid(field("message_id"), e.to_string())
                })?),
            };
            Ok(Suppressed {
                address: s.address,
                reason,
                at_ms: s.created_at_ms.max(0) as u64,
                message_id,
            })
        })
        .collect::<Result<_, _>>()?;
    let idempotency = chunk
        .idempotency
        .into_iter()
        .enumerate()
        .map(|(i, entry)| {
            let field = |name: &str| format!("chunk.idempotency[{i}].{name}");
            if entry.key.is_empty() {
                return Err(ApiError::invalid(field("key"), "is required"));
            }
            store::readable_key_record(&entry.record)
                .map_err(|e| ApiError::invalid(field("record"), e.to_string()))?;
            Ok((entry.key, entry.record))
        })
        .collect::<Result<_, _>>()?;
    let removed_suppressions = chunk
        .removed_suppressions
        .into_iter()
        .enumerate()
        .map(|(i, key)| {
            if key.is_empty() {
                return Err(ApiError::invalid(
                    format!("chunk.removed_suppressions[{i}]"),
                    "is empty",
                ));
            }
            Ok(key)
        })
        .collect::<Result<_, _>>()?;
    Ok(TenantExport {
        suppressions,
        removed_suppressions,
        idempotency,
    })
}

/// Exported message records back into the store's, each `tenant`'s own.
fn import_messages(
    tenant: &TenantId,
    stored: Vec<v1::StoredMessage>,
) -> Result<Vec<(MessageRecord, u64)>, ApiError> {
    stored
        .into_iter()
        .enumerate()
        .map(|(i, stored)| {
            let field = format!("chunk.messages[{i}].record");
            let record: MessageRecord = serde_json::from_slice(&stored.record)
                .map_err(|e| ApiError::invalid(field.clone(), e.to_string()))?;
            if record.tenant != *tenant || record.id.to_string() != stored.id {
                return Err(ApiError::invalid(
                    field,
                    format!("is not tenant {tenant}'s message {}", stored.id),
                ));
            }
            Ok((record, stored.written_ms))
        })
        .collect()
}

fn figures_to_wire(row: store::Carried) -> v1::CarriedFigures {
    v1::CarriedFigures {
        message_class: row.class.as_str().to_owned(),
        by_minute: row.by_minute,
        unit: row.unit,
        origin: row.origin,
        counts: serde_json::to_vec(&row.counts).unwrap_or_default(),
    }
}

fn figures_from_wire(rows: Vec<v1::CarriedFigures>) -> Result<Vec<store::Carried>, ApiError> {
    rows.into_iter()
        .enumerate()
        .map(|(i, row)| {
            let field = |name: &str| format!("chunk.figures[{i}].{name}");
            let class = row
                .message_class
                .parse()
                .map_err(|e: String| ApiError::invalid(field("message_class"), e))?;
            let origin = CellId::new(&row.origin)
                .map_err(|e| ApiError::invalid(field("origin"), e.to_string()))?;
            let counts = serde_json::from_slice(&row.counts)
                .map_err(|e| ApiError::invalid(field("counts"), e.to_string()))?;
            Ok(store::Carried {
                class,
                by_minute: row.by_minute,
                unit: row.unit,
                origin: origin.to_string(),
                counts,
            })
        })
        .collect()
}

/// A tenant's export (read at `as_of_ms`) as the chunks it travels in.
fn export_chunks(export: TenantExport, as_of_ms: u64) -> Vec<v1::TenantChunk> {
    let mut chunks: Vec<v1::TenantChunk> = export
        .suppressions
        .chunks(EXPORT_CHUNK)
        .map(|entries| v1::TenantChunk {
            suppressions: entries.iter().cloned().map(suppression).collect(),
            as_of_ms,
            ..Default::default()
        })
        .collect();
    chunks.extend(export.idempotency.chunks(EXPORT_CHUNK).map(|entries| {
        v1::TenantChunk {
            idempotency: entries
                .iter()
                .map(|(key, record)| v1::IdempotencyEntry {
                    key: key.clone(),
                    record: record.clone(),
                })
                .collect(),
            as_of_ms,
            ..Default::default()
        }
    }));
    // Removals are few (made by hand, within seconds of the pre-copy): one chunk, and always
    // one, so the receiver learns `as_of_ms` even when there is nothing to copy.
    chunks.push(v1::TenantChunk {
        removed_suppressions: export.removed_suppressions,
        as_of_ms,
        ..Default::default()
    });
    chunks
}

fn recipient_status(outcome: RecipientOutcome) -> v1::RecipientStatus {
    let (state, reason, scope) = match outcome.suppressed {
        None => (
            v1::RecipientState::Accepted,
            String::new(),
            v1::SuppressionScope::Unspecified as i32,
        ),
        Some((reason, scope)) => {
            let why = format!("suppressed: {} ({} list)", reason.as_str(), scope.as_str());
            (v1::RecipientState::Suppressed, why, scope.to_wire())
        }
    };
    v1::RecipientStatus {
        address: outcome.address,
        state: state as i32,
        reason,
        scope,
    }
}

fn send_response(accepted: Accepted) -> v1::SendResponse {
    v1::SendResponse {
        message_id: accepted.message_id.to_string(),
        recipients: accepted
            .recipients
            .into_iter()
            .map(recipient_status)
            .collect(),
    }
}

fn class_to_wire(class: MessageClass) -> i32 {
    let wire = match class {
        MessageClass::Transactional => v1::MessageClass::Transactional,
        MessageClass::Marketing => v1::MessageClass::Marketing,
    };
    wire as i32
}

fn message_status(record: MessageRecord) -> v1::MessageStatus {
    let class = class_to_wire(record.class);
    let events = record
        .events
        .into_iter()
        .map(|e| v1::MessageEvent {
            r#type: e.kind.as_str().to_owned(),
            at_ms: e.at_ms as i64,
            recipient: e.recipient.unwrap_or_default(),
            detail: e.detail,
        })
        .collect();
    v1::MessageStatus {
        message_id: record.id.to_string(),
        message_class: class,
        state: record.state.as_str().to_owned(),
        recipients: record
            .recipients
            .into_iter()
            .map(recipient_status)
            .collect(),
        events,
        accepted_at_ms: record.accepted_at_ms as i64,
    }
}

/// `tenant`'s figures by class over the last `hours` hours.
fn class_stats(
    store: &Store,
    tenant: &TenantId,
    figures: store::Figures,
    hours: u32,
) -> Result<Vec<v1::ClassStats>, StorageError> {
    let now = now_ms();
    let mut classes = Vec::new();
    for class in MessageClass::ALL {
        let counts = store.stats(tenant, class, figures, now, u64::from(hours))?;
        let rate = |n: u64| {
            if counts.sent == 0 {
                0.0
            } else {
                n as f64 / counts.sent as f64
            }
        };
        classes.push(v1::ClassStats {
            message_class: class_to_wire(class),
            accepted: counts.accepted,
            sent: counts.sent,
            delivered: counts.delivered,
            bounced: counts.bounced,
            complained: counts.complained,
            suppressed: counts.suppressed,
            rejected: counts.rejected,
            bounce_rate: rate(counts.bounced),
            complaint_rate: rate(counts.complained),
        });
    }
    Ok(classes)
}

fn suppression(entry: Suppressed) -> v1::Suppression {
    v1::Suppression {
        address: entry.address,
        reason: entry.reason.to_wire(),
        scope: SuppressionScope::Tenant.to_wire(),
        created_at_ms: entry.at_ms as i64,
        message_id: entry
            .message_id
            .map(|id| id.to_string())
            .unwrap_or_default(),
    }
}

type ChunkStream = Pin<Box<dyn Stream<Item = Result<v1::TenantChunk, Status>> + Send>>;
type DataStream = Pin<Box<dyn Stream<Item = Result<v1::TenantData, Status>> + Send>>;

/// Entries per part of an offboarding export.
const DATA_PAGE: usize = 500;

#[tonic::async_trait]
impl Cell for CellApi {
    type ExportTenantStream = ChunkStream;
    type ExportTenantDataStream = DataStream;

    async fn export_tenant_data(
        &self,
        request: Request<v1::TenantDataRequest>,
    ) -> Result<Response<DataStream>, Status> {
        let tenant = TenantId::from_field("tenant_id", request.into_inner().tenant_id)?;
        let cell = self.cell.to_string();
        let mut parts = vec![v1::TenantData {
            cell: cell.clone(),
            // What this cell counted: the export lists each cell's part.
            stats: class_stats(&self.store, &tenant, store::Figures::Own, MAX_STATS_HOURS)
                .map_err(ApiError::from)?,
            ..Default::default()
        }];
        let mut after = String::new();
        loop {
            let page = self
                .store
                .list_suppressions(&tenant, &after, DATA_PAGE)
                .map_err(ApiError::from)?;
            let Some(last) = page.last() else { break };
            after = suppression_key(&last.address);
            parts.push(v1::TenantData {
                cell: cell.clone(),
                suppressions: page.into_iter().map(suppression).collect(),
                ..Default::default()
            });
        }
        for page in message_pages(&self.store, &tenant, 0, DATA_PAGE).map_err(ApiError::from)? {
            parts.push(v1::TenantData {
                cell: cell.clone(),
                messages: page.into_iter().map(|(m, _)| message_status(m)).collect(),
                ..Default::default()
            });
        }
        Ok(Response::new(Box::pin(tokio_stream::iter(
            parts.into_iter().map(Ok),
        ))))
    }

    async fn erase_tenant(
        &self,
        request: Request<v1::TenantDataRequest>,
    ) -> Result<Response<v1::EraseTenantResponse>, Status> {
        let tenant = TenantId::from_field("tenant_id", request.into_inner().tenant_id)?;
        let status = self.catalog.read().tenants.get(&tenant).map(|t| t.status);
        if status == Some(TenantStatus::Active) {
            return Err(ApiError::FailedPrecondition(format!(
                "tenant {tenant} is active: suspend it before its data is erased"
            ))
            .into());
        }
        self.store.erase(&tenant).await.map_err(ApiError::from)?;
        self.mailer
            .forget(&tenant)
            .await
            .map_err(|e| ApiError::Unavailable(format!("removing the mailer's resources: {e}")))?;
        tracing::info!(%tenant, "tenant erased");
        Ok(Response::new(v1::EraseTenantResponse {}))
    }

    async fn get_health_report(
        &self,
        request: Request<v1::HealthReportRequest>,
    ) -> Result<Response<v1::HealthReport>, Status> {
        let figures = self
            .health
            .report(u64::from(request.into_inner().window_secs));
        Ok(Response::new(figures.report(&self.cell, &self.release)))
    }

    async fn prepare_tenant(
        &self,
        request: Request<v1::PrepareTenantRequest>,
    ) -> Result<Response<v1::PrepareTenantResponse>, Status> {
        let request = request.into_inner();
        let tenant = TenantId::from_field("tenant_id", request.tenant_id)?;
        self.not_serving(&tenant)?;
        let domains = self
            .catalog
            .read()
            .tenants
            .get(&tenant)
            .map(|t| t.domains.clone())
            .ok_or_else(|| ApiError::NotFound(format!("tenant {tenant} is not known here")))?;
        // What an earlier stay of the tenant left here is current as of its hand-over, when
        // that is recent enough for the copy to start there; otherwise the import replaces it.
        let handed_over = self
            .store
            .handed_over(&tenant, now_ms())
            .map_err(ApiError::from)?;
        if handed_over.is_none() {
            self.store.forget(&tenant).await.map_err(ApiError::from)?;
        }
        self.store
            .take_over(&tenant, Epoch(request.epoch))
            .await
            .map_err(ApiError::from)?;
        self.mailer
            .prepare(&tenant, &domains)
            .await
            .map_err(|e| ApiError::Unavailable(format!("preparing the mailer: {e}")))?;
        Ok(Response::new(v1::PrepareTenantResponse {
            kept_as_of_ms: handed_over.map_or(0, |h| h.as_of_ms),
            kept_epoch: handed_over.map_or(0, |h| h.epoch.0),
        }))
    }

    async fn export_tenant(
        &self,
        request: Request<v1::ExportTenantRequest>,
    ) -> Result<Response<ChunkStream>, Status> {
        let mut request = request.into_inner();
        let tenant = TenantId::from_field("tenant_id", request.tenant_id)?;
        if request.since_taken_over
            && let Some(at_ms) = (self.store)
                .taken_over(&tenant, Epoch(request.epoch))
                .map_err(ApiError::from)?
        {
            request.since_ms = at_ms;
        }
        if request.messages {
            let store = self.store.clone();
            // Read as of a time no call of the tenant straddles, so that the next copy starts
            // there exactly: a message accepted before it is in this read.
            let as_of_ms = (self.acceptor)
                .between_calls(&tenant, || store.committed_before())
                .await;
            let chunks = {
                let (store, tenant, cell) = (store.clone(), tenant.clone(), self.cell.clone());
                in_background(move || {
                    let pages = message_pages(&store, &tenant, request.since_ms, EXPORT_CHUNK)
                        .map_err(ApiError::from)?;
                    let mut chunks: Vec<_> = pages
                        .into_iter()
                        .map(|page| v1::TenantChunk {
                            messages: page
                                .iter()
                                .map(|(record, written_ms)| v1::StoredMessage {
                                    id: record.id.to_string(),
                                    record: serde_json::to_vec(record).unwrap_or_default(),
                                    written_ms: *written_ms,
                                })
                                .collect(),
                            as_of_ms,
                            ..Default::default()
                        })
                        .collect();
                    // The tenant's figures follow its records, so that its stats, daily cap
                    // and breakers go on from them on the target.
                    let figures: Vec<_> = store
                        .figures(&tenant, cell.as_str(), as_of_ms)
                        .map_err(ApiError::from)?
                        .into_iter()
                        .map(figures_to_wire)
                        .collect();
                    chunks.extend(figures.chunks(EXPORT_CHUNK).map(|rows| v1::TenantChunk {
                        figures: rows.to_vec(),
                        as_of_ms,
                        ..Default::default()
                    }));
                    if chunks.is_empty() {
                        // Even with nothing to copy, a chunk tells when the records were read.
                        chunks.push(v1::TenantChunk {
                            as_of_ms,
                            ..Default::default()
                        });
                    }
                    for chunk in &mut chunks {
                        chunk.as_of_exact = true;
                    }
                    Ok(chunks)
                })
                .await?
            };
            if request.handover {
                let handed = HandOver {
                    as_of_ms: request.since_ms,
                    epoch: Epoch(request.epoch),
                };
                store
                    .hand_over(&tenant, handed)
                    .await
                    .map_err(ApiError::from)?;
            }
            return Ok(Response::new(Box::pin(tokio_stream::iter(
                chunks.into_iter().map(Ok),
            ))));
        }
        if !request.precopy {
            self.acceptor.quiesce(&tenant, Epoch(request.epoch)).await?;
        }
        let since = (request.since_ms > 0).then_some(request.since_ms);
        let store = self.store.clone();
        let export = move || {
            let (as_of_ms, export) = store
                .export(&tenant, now_ms(), since)
                .map_err(ApiError::from)?;
            tracing::info!(%tenant, precopy = request.precopy, suppressions = export.suppressions.len(), keys = export.idempotency.len(), "tenant exported");
            Ok(export_chunks(export, as_of_ms))
        };
        let chunks = if request.precopy {
            in_background(export).await?
        } else {
            off_thread(export).await?
        };
        Ok(Response::new(Box::pin(tokio_stream::iter(
            chunks.into_iter().map(Ok),
        ))))
    }

    async fn import_tenant(
        &self,
        request: Request<v1::ImportTenantRequest>,
    ) -> Result<Response<v1::ImportTenantResponse>, Status> {
        let request = request.into_inner();
        let tenant = TenantId::from_field("tenant_id", request.tenant_id)?;
        let mut chunk = request
            .chunk
            .ok_or_else(|| ApiError::invalid("chunk", "is required"))?;
        let (messages, figures, export) = {
            let tenant = tenant.clone();
            off_thread(move || {
                let messages = import_messages(&tenant, std::mem::take(&mut chunk.messages))?;
                let figures = figures_from_wire(std::mem::take(&mut chunk.figures))?;
                Ok((messages, figures, import_chunk(chunk)?))
            })
            .await?
        };
        if export != TenantExport::default() {
            self.not_serving(&tenant)?;
            self.store
                .import(&tenant, export)
                .await
                .map_err(ApiError::from)?;
        }
        if !messages.is_empty() {
            self.store
                .import_messages(&tenant, messages)
                .await
                .map_err(ApiError::from)?;
        }
        if !figures.is_empty() {
            self.store
                .carry(&tenant, self.cell.as_str(), figures)
                .await
                .map_err(ApiError::from)?;
        }
        Ok(Response::new(v1::ImportTenantResponse {}))
    }

    async fn tenant_backlog(
        &self,
        request: Request<v1::TenantBacklogRequest>,
    ) -> Result<Response<v1::TenantBacklogResponse>, Status> {
        let tenant = TenantId::from_field("tenant_id", request.into_inner().tenant_id)?;
        let messages = self.store.backlog(&tenant).map_err(ApiError::from)?;
        Ok(Response::new(v1::TenantBacklogResponse { messages }))
    }

    async fn forward_feedback(
        &self,
        request: Request<v1::ForwardFeedbackRequest>,
    ) -> Result<Response<v1::ForwardFeedbackResponse>, Status> {
        let record = request.into_inner().record;
        let feedback =
            feedback::parse(&record).map_err(|e| ApiError::invalid("record", e.to_string()))?;
        // Only the tenant's serving cell applies it; the sender keeps it and tries again.
        if self.ingest.route(&feedback.tenant) != feedback::Route::Here {
            return Err(ApiError::Unavailable(format!(
                "cell {} does not serve tenant {} now",
                self.cell, feedback.tenant
            ))
            .into());
        }
        self.ingest.apply(&feedback).await.map_err(ApiError::from)?;
        Ok(Response::new(v1::ForwardFeedbackResponse {}))
    }

    async fn accept(
        &self,
        request: Request<v1::AcceptRequest>,
    ) -> Result<Response<v1::SendResponse>, Status> {
        let span = accept_span(&self.cell, &request);
        let request = request.into_inner();
        let tenant = TenantId::from_field("tenant_id", request.tenant_id)?;
        let message = request
            .message
            .ok_or_else(|| ApiError::invalid("message", "is required"))?;
        // Run to the end even if the caller goes away: a move's export waits for every
        // accept let in before its freeze, and must not find it half done.
        let acceptor = self.acceptor.clone();
        let started = Instant::now();
        let accepted = tokio::spawn(
            async move { acceptor.accept(tenant, Epoch(request.epoch), message).await }
                .instrument(span.clone()),
        )
        .await
        .map_err(|e| ApiError::Internal(format!("the accept task failed: {e}")))
        .flatten();
        accept_answered(&span, &accepted);
        match &accepted {
            Ok(_) => self
                .health
                .record(health::Outcome::Accepted(started.elapsed())),
            Err(ApiError::Internal(_)) => self.health.record(health::Outcome::AcceptFailed),
            Err(_) => {}
        }
        Ok(Response::new(send_response(accepted?)))
    }

    async fn get_message(
        &self,
        request: Request<v1::CellGetMessageRequest>,
    ) -> Result<Response<v1::MessageStatus>, Status> {
        let request = request.into_inner();
        let (tenant, _entered) = self.caller(request.caller).await?;
        let raw = request.request.unwrap_or_default().message_id;
        let id: MessageId = raw
            .parse()
            .map_err(|e: cellmail_proto::IdError| ApiError::invalid("message_id", e.to_string()))?;
        // Another tenant's message is answered exactly like a missing one.
        let record = self
            .store
            .message(&tenant, id)
            .map_err(ApiError::from)?
            .ok_or_else(|| ApiError::NotFound(format!("message {id} not found")))?;
        Ok(Response::new(message_status(record)))
    }

    async fn list_suppressions(
        &self,
        request: Request<v1::CellListSuppressionsRequest>,
    ) -> Result<Response<v1::ListSuppressionsResponse>, Status> {
        let request = request.into_inner();
        let (tenant, _entered) = self.caller(request.caller).await?;
        let page = request.request.unwrap_or_default();
        let size = match page.page_size as usize {
            0 => MAX_PAGE,
            n if n > MAX_PAGE => {
                return Err(ApiError::invalid("page_size", format!("at most {MAX_PAGE}")).into());
            }
            n => n,
        };
        let entries = self
            .store
            .list_suppressions(&tenant, &page.page_token, size)
            .map_err(ApiError::from)?;
        let next_page_token = if entries.len() == size {
            entries
                .last()
                .map(|e| suppression_key(&e.address))
                .unwrap_or_default()
        } else {
            String::new()
        };
        Ok(Response::new(v1::ListSuppressionsResponse {
            suppressions: entries.into_iter().map(suppression).collect(),
            next_page_token,
        }))
    }

    async fn add_suppression(
        &self,
        request: Request<v1::CellAddSuppressionRequest>,
    ) -> Result<Response<v1::Suppression>, Status> {
        let request = request.into_inner();
        let (tenant, entered) = self.caller(request.caller).await?;
        let add = request.request.unwrap_or_default();
        let address = parse_mailbox("address", &add.address)?.email;
        let reason = match SuppressionReason::from_wire(add.reason) {
            None if add.reason == 0 => SuppressionReason::Manual,
            Some(reason @ (SuppressionReason::Manual | SuppressionReason::Unsubscribe)) => reason,
            _ => {
                return Err(ApiError::invalid(
                    "reason",
                    "MANUAL or UNSUBSCRIBE; bounces and complaints come from feedback",
                )
                .into());
            }
        };
        let entry = Suppressed {
            address,
            reason,
            at_ms: now_ms(),
            message_id: None,
        };
        let store = self.store.clone();
        let added = entry.clone();
        to_the_end(entered, async move { store.suppress(&tenant, added).await }).await?;
        Ok(Response::new(suppression(entry)))
    }

    async fn get_stats(
        &self,
        request: Request<v1::CellGetStatsRequest>,
    ) -> Result<Response<v1::GetStatsResponse>, Status> {
        let request = request.into_inner();
        let (tenant, _entered) = self.caller(request.caller).await?;
        let hours = match request.request.unwrap_or_default().hours {
            0 => DEFAULT_STATS_HOURS,
            n if n > MAX_STATS_HOURS => {
                return Err(ApiError::invalid("hours", format!("1 to {MAX_STATS_HOURS}")).into());
            }
            n => n,
        };
        // With what the cells the tenant moved here from counted.
        let figures = store::Figures::Carried;
        let classes = class_stats(&self.store, &tenant, figures, hours).map_err(ApiError::from)?;
        Ok(Response::new(v1::GetStatsResponse { hours, classes }))
    }

    async fn remove_suppression(
        &self,
        request: Request<v1::CellRemoveSuppressionRequest>,
    ) -> Result<Response<v1::RemoveSuppressionResponse>, Status> {
        let request = request.into_inner();
        let (tenant, entered) = self.caller(request.caller).await?;
        let address = parse_mailbox("address", &request.request.unwrap_or_default().address)?.email;
        let store = self.store.clone();
        let removed = to_the_end(
            entered,
            async move { store.unsuppress(&tenant, &address).await },
        )
        .await?;
        Ok(Response::new(v1::RemoveSuppressionResponse { removed }))
    }
}

#[cfg(all(test, target_os = "linux"))]
mod tests {
    use super::{BACKGROUND_BUDGET, in_background, off_thread};

    fn policy() -> i32 {
        // SAFETY: reads the calling thread's policy (pid 0 is the caller).
        unsafe { libc::sched_getscheduler(0) }
    }

    #[tokio::test]
    async fn background_copy_work_runs_only_on_idle_cpu_and_the_rest_as_before() {
        let background = in_background(|| Ok(policy())).await.unwrap();
        assert_eq!(background, libc::SCHED_IDLE);
        let waited = off_thread(|| Ok(policy())).await.unwrap();
        assert_eq!(waited, libc::SCHED_OTHER);
    }

    #[tokio::test]
    async fn background_copy_work_that_finds_no_idle_cpu_is_done_at_the_calls_priority() {
        // The background run stands for one starved of CPU: it answers long after the budget.
        let answered = in_background(|| {
            if policy() == libc::SCHED_IDLE {
                std::thread::sleep(BACKGROUND_BUDGET * 4);
                return Ok("background");
            }
            Ok("urgent")
        })
        .await
        .unwrap();
        assert_eq!(answered, "urgent");
    }
}
