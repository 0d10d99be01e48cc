//! What the control plane calls to move a tenant: prepare the target (which must not be
//! serving the tenant), export its state from the source in chunks (a pre-copy, then the
//! rest once frozen, its message records and figures), import them on the target, and ask
//! a cell for the tenant's backlog. Copies walk a tenant's whole state, so they run off the
//! async threads, and those nothing waits for run on idle CPU only.

use std::sync::Arc;
use std::time::Duration;

use cellmail_proto::v1;
use cellmail_proto::{ApiError, CellId, Epoch, SuppressionReason, TenantId, now_ms};
use cellmail_registry::schema::PlacementState;
use tonic::Request;

use super::CellApi;
use super::serve::suppression;
use crate::commit::StorageError;
use crate::message::MessageRecord;
use crate::store::{self, HandOver, Store, Suppressed, TenantEvent, TenantExport};

/// Entries per chunk of a tenant's export.
const EXPORT_CHUNK: usize = 1000;

/// The message records of `tenant` here after message id `after` ("": all), in pages of
/// `size`.
pub(super) fn message_pages(
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
pub(super) async fn off_thread<T: Send + 'static>(
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
    let webhooks = match chunk.webhooks_included {
        false => None,
        true => Some(
            (chunk.webhooks.iter().enumerate())
                .map(|(i, bytes)| {
                    serde_json::from_slice(bytes).map_err(|e| {
                        ApiError::invalid(format!("chunk.webhooks[{i}]"), e.to_string())
                    })
                })
                .collect::<Result<_, _>>()?,
        ),
    };
    Ok(TenantExport {
        suppressions,
        removed_suppressions,
        idempotency,
        webhooks,
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

/// Exported events back into the store's form.
fn import_events(stored: Vec<v1::StoredEvent>) -> Result<Vec<(TenantEvent, u64)>, ApiError> {
    stored
        .into_iter()
        .enumerate()
        .map(|(i, stored)| {
            let event: TenantEvent = serde_json::from_slice(&stored.event).map_err(|e| {
                ApiError::invalid(format!("chunk.events[{i}].event"), e.to_string())
            })?;
            Ok((event, stored.written_ms))
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
    // one, so the receiver learns `as_of_ms` even when there is nothing to copy. The
    // endpoints, few too, go with it.
    let webhooks = export.webhooks.unwrap_or_default();
    chunks.push(v1::TenantChunk {
        removed_suppressions: export.removed_suppressions,
        as_of_ms,
        webhooks: webhooks
            .iter()
            .map(|w| serde_json::to_vec(w).unwrap_or_default())
            .collect(),
        webhooks_included: true,
        ..Default::default()
    });
    chunks
}

impl CellApi {
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

    pub(super) async fn prepare_tenant(
        &self,
        request: Request<v1::PrepareTenantRequest>,
    ) -> Result<v1::PrepareTenantResponse, ApiError> {
        let request = request.into_inner();
        let tenant = TenantId::from_field("tenant_id", request.tenant_id)?;
        self.not_serving(&tenant)?;
        if !self.catalog.read().tenants.contains_key(&tenant) {
            return Err(ApiError::NotFound(format!(
                "tenant {tenant} is not known here"
            )));
        }
        let setup = self.directory.setup(&tenant);
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
            .prepare(&tenant, &setup)
            .await
            .map_err(|e| ApiError::Unavailable(format!("preparing the mailer: {e}")))?;
        Ok(v1::PrepareTenantResponse {
            kept_as_of_ms: handed_over.map_or(0, |h| h.as_of_ms),
            kept_epoch: handed_over.map_or(0, |h| h.epoch.0),
        })
    }

    pub(super) async fn export_tenant(
        &self,
        request: Request<v1::ExportTenantRequest>,
    ) -> Result<Vec<v1::TenantChunk>, ApiError> {
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
                    // Its events follow its records.
                    let events = (store.written_events(&tenant, request.since_ms))
                        .map_err(ApiError::from)?;
                    chunks.extend(events.chunks(EXPORT_CHUNK).map(|events| {
                        v1::TenantChunk {
                            events: events
                                .iter()
                                .map(|(event, written_ms)| v1::StoredEvent {
                                    event: serde_json::to_vec(event).unwrap_or_default(),
                                    written_ms: *written_ms,
                                })
                                .collect(),
                            as_of_ms,
                            ..Default::default()
                        }
                    }));
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
            return Ok(chunks);
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
        Ok(chunks)
    }

    pub(super) async fn import_tenant(
        &self,
        request: Request<v1::ImportTenantRequest>,
    ) -> Result<v1::ImportTenantResponse, ApiError> {
        let request = request.into_inner();
        let tenant = TenantId::from_field("tenant_id", request.tenant_id)?;
        let mut chunk = request
            .chunk
            .ok_or_else(|| ApiError::invalid("chunk", "is required"))?;
        let (messages, events, figures, export) = {
            let tenant = tenant.clone();
            off_thread(move || {
                let messages = import_messages(&tenant, std::mem::take(&mut chunk.messages))?;
                let events = import_events(std::mem::take(&mut chunk.events))?;
                let figures = figures_from_wire(std::mem::take(&mut chunk.figures))?;
                Ok((messages, events, figures, import_chunk(chunk)?))
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
        if !events.is_empty() {
            self.store
                .import_events(&tenant, events)
                .await
                .map_err(ApiError::from)?;
        }
        if !figures.is_empty() {
            self.store
                .carry(&tenant, self.cell.as_str(), figures)
                .await
                .map_err(ApiError::from)?;
        }
        Ok(v1::ImportTenantResponse {})
    }

    pub(super) async fn tenant_backlog(
        &self,
        request: Request<v1::TenantBacklogRequest>,
    ) -> Result<v1::TenantBacklogResponse, ApiError> {
        let tenant = TenantId::from_field("tenant_id", request.into_inner().tenant_id)?;
        let messages = self.store.backlog(&tenant).map_err(ApiError::from)?;
        Ok(v1::TenantBacklogResponse { messages })
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
