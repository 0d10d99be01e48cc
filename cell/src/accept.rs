//! The accept path: fence, authorize, validate, deduplicate, queue durably, answer.
//!
//! Concurrent sends with the same idempotency key share one attempt (single flight), so the
//! store only has to settle keys across attempts and restarts.
//!
//! Every fenced call holds its tenant's gate (shared) until it is done. A move's export
//! waits until this cell sees the tenant's placement frozen, then takes the gate exclusively
//! once: every call let in before the freeze has finished by then, and every later one is
//! refused by the fence, so the export misses nothing this cell accepted.

use std::collections::{HashMap, HashSet};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use cellmail_proto::clock::{DAY_MS, HOUR_MS};
use cellmail_proto::v1::SendRequest;
use cellmail_proto::{
    ApiError, CellId, Epoch, MessageClass, MessageId, SuppressionScope, TenantId, now_ms,
    suppression_key,
};
use cellmail_registry::catalog::{Catalog, WatchedCatalog};
use cellmail_registry::schema::{PlacementState, TenantStatus};
use tokio::sync::{OnceCell, OwnedRwLockReadGuard, RwLock};

use crate::breaker;
use crate::durable::Durable;
use crate::fencing::{self, Verdict};
use crate::message::{Accepted, Message, MessageState, RecipientOutcome};
use crate::store::{Figures, Reservation, Store};
use crate::telemetry::TopTenants;
use crate::validation;

/// How long a cell waits for its registry view to reach the epoch a router stamped.
const CATCH_UP: Duration = Duration::from_secs(1);

type Flight = Arc<OnceCell<Result<Accepted, ApiError>>>;

/// A fenced call's hold on its tenant's gate, released when the call is done.
pub type Entered = OwnedRwLockReadGuard<()>;

/// How long an export waits for this cell to see the freeze the control plane wrote.
const FREEZE_SEEN: Duration = Duration::from_secs(5);

pub struct Acceptor {
    cell: CellId,
    catalog: Arc<WatchedCatalog>,
    store: Arc<Store>,
    durable: Arc<dyn Durable>,
    top: Arc<TopTenants>,
    inflight: Mutex<HashMap<(TenantId, String), Flight>>,
    gates: Mutex<HashMap<TenantId, Arc<RwLock<()>>>>,
    /// Per capped tenant, messages admitted under its daily cap and not yet counted.
    uncounted: Mutex<HashMap<TenantId, u64>>,
}

/// A message's place under its tenant's daily cap, given back when dropped (by then it is
/// counted in the tenant's figures, or was not accepted).
struct Capped<'a> {
    uncounted: &'a Mutex<HashMap<TenantId, u64>>,
    tenant: TenantId,
}

impl Drop for Capped<'_> {
    fn drop(&mut self) {
        // Only whole updates happen under this lock.
        let mut uncounted = self.uncounted.lock().unwrap_or_else(|p| p.into_inner());
        if let Some(n) = uncounted.get_mut(&self.tenant) {
            *n -= 1;
            if *n == 0 {
                uncounted.remove(&self.tenant);
            }
        }
    }
}

impl Acceptor {
    pub fn new(
        cell: CellId,
        catalog: Arc<WatchedCatalog>,
        store: Arc<Store>,
        durable: Arc<dyn Durable>,
        top: Arc<TopTenants>,
    ) -> Self {
        Self {
            cell,
            catalog,
            store,
            durable,
            top,
            inflight: Mutex::new(HashMap::new()),
            gates: Mutex::new(HashMap::new()),
            uncounted: Mutex::new(HashMap::new()),
        }
    }

    pub async fn accept(
        &self,
        tenant: TenantId,
        epoch: Epoch,
        request: SendRequest,
    ) -> Result<Accepted, ApiError> {
        let _entered = self.fence(&tenant, epoch).await?;
        let domains = {
            let catalog = self.catalog.read();
            let record = catalog.tenants.get(&tenant).ok_or_else(|| {
                ApiError::PermissionDenied(format!("tenant {tenant} is not known to this cell"))
            })?;
            if record.status == TenantStatus::Suspended {
                return Err(ApiError::PermissionDenied(format!(
                    "tenant {tenant} is suspended"
                )));
            }
            record.domains.clone()
        };
        let mut message =
            validation::message_from_request(&tenant, MessageId::generate(), now_ms(), request)?;
        // Its delivery, later, continues the trace of this accept (when spans are exported).
        message.traceparent = cellmail_proto::trace::traceparent(&tracing::Span::current());
        let from_domain = message.from.domain();
        if !domains.iter().any(|d| d == from_domain) {
            return Err(ApiError::PermissionDenied(format!(
                "from_address: {from_domain} is not a verified sending domain of tenant {tenant}"
            )));
        }
        if message.idempotency_key.is_empty() {
            return self.accept_new(message).await;
        }
        let flight_key = (tenant, message.idempotency_key.clone());
        let flight = self
            .inflight_lock()
            .entry(flight_key.clone())
            .or_default()
            .clone();
        let result = flight
            .get_or_init(|| self.accept_once(message))
            .await
            .clone();
        let mut inflight = self.inflight_lock();
        if inflight
            .get(&flight_key)
            .is_some_and(|f| Arc::ptr_eq(f, &flight))
        {
            inflight.remove(&flight_key);
        }
        result
    }

    fn inflight_lock(&self) -> std::sync::MutexGuard<'_, HashMap<(TenantId, String), Flight>> {
        // Only map inserts and removes happen under this lock; they cannot panic halfway.
        self.inflight
            .lock()
            .unwrap_or_else(|poisoned| poisoned.into_inner())
    }

    fn gate(&self, tenant: &TenantId) -> Arc<RwLock<()>> {
        // Only whole inserts happen under this lock.
        let mut gates = self.gates.lock().unwrap_or_else(|p| p.into_inner());
        // Looked up first: the key is cloned only for a tenant's first call here.
        if let Some(gate) = gates.get(tenant) {
            return gate.clone();
        }
        gates.entry(tenant.clone()).or_default().clone()
    }

    /// Refuses a call for `tenant` stamped with an `epoch` this cell does not own; the call
    /// holds what this answers until it is done.
    pub async fn fence(&self, tenant: &TenantId, epoch: Epoch) -> Result<Entered, ApiError> {
        let entered = self.gate(tenant).read_owned().await;
        let verdict = |catalog: &Catalog| {
            let known = catalog.placements.get(tenant).map(|p| fencing::Known {
                cell: &p.cell,
                epoch: p.epoch,
                frozen: p.state == PlacementState::Frozen,
            });
            fencing::check(&self.cell, known, epoch)
        };
        let mut current = verdict(&self.catalog.read());
        if current == Verdict::Behind {
            self.catalog
                .wait_until(CATCH_UP, |c| verdict(c) != Verdict::Behind)
                .await;
            current = verdict(&self.catalog.read());
        }
        match current {
            Verdict::Owned => Ok(entered),
            Verdict::Moved => Err(ApiError::Moved {
                tenant: tenant.to_string(),
                epoch: epoch.0,
            }),
            Verdict::Behind => Err(ApiError::Unavailable(format!(
                "cell {} has not yet seen epoch {epoch} of tenant {tenant}",
                self.cell
            ))),
        }
    }

    /// Returns once this cell no longer serves `tenant` at `epoch` (it sees the placement
    /// frozen or moved on) and every call it let in for the tenant has finished.
    pub async fn quiesce(&self, tenant: &TenantId, epoch: Epoch) -> Result<(), ApiError> {
        let served_here = |catalog: &Catalog| {
            catalog.placements.get(tenant).is_some_and(|p| {
                p.cell == self.cell && p.epoch == epoch && p.state == PlacementState::Serving
            })
        };
        if !self
            .catalog
            .wait_until(FREEZE_SEEN, |c| !served_here(c))
            .await
        {
            return Err(ApiError::Unavailable(format!(
                "cell {} has not seen tenant {tenant}'s placement frozen at epoch {epoch}",
                self.cell
            )));
        }
        self.between_calls(tenant, || ()).await;
        Ok(())
    }

    /// Runs `read` once no call this cell let in for `tenant` is under way, holding back
    /// those that arrive meanwhile: what it reads then has every call let in before it, and
    /// every call let in after makes its message ids after it.
    pub async fn between_calls<T>(&self, tenant: &TenantId, read: impl FnOnce() -> T) -> T {
        let _closed = self.gate(tenant).write_owned().await;
        read()
    }

    /// Accepts a message with an idempotency key: answers an earlier send's answer again,
    /// or queues the message under the id an earlier attempt reserved, or under its own.
    async fn accept_once(&self, mut message: Message) -> Result<Accepted, ApiError> {
        let (tenant, key) = (&message.tenant, message.idempotency_key.as_str());
        let claimed = self.durable.claim(tenant, key, message.id, now_ms());
        match claimed.await? {
            Reservation::Done(accepted) => return Ok(accepted),
            Reservation::Pending(first_id) => message.id = first_id,
            Reservation::New => {}
        }
        self.accept_new(message).await
    }

    /// Refuses a message whose class the tenant's breaker paused, or that is over the
    /// tenant's daily cap; answers the tenant's tier (for the metrics) and, for a capped
    /// tenant, its place under the cap until the message is counted.
    fn admit(&self, message: &Message) -> Result<(&'static str, Option<Capped<'_>>), ApiError> {
        let (tenant, class) = (&message.tenant, message.class);
        let (cap, tier) = {
            let catalog = self.catalog.read();
            if let Some(breaker) = catalog.tripped(tenant, class) {
                return Err(ApiError::Paused {
                    detail: format!(
                        "tenant {tenant}'s {class} mail is paused by its breaker: {}",
                        breaker.detail
                    ),
                    rates: breaker::rates(breaker),
                });
            }
            catalog
                .tenants
                .get(tenant)
                .map_or((0, "unknown"), |t| (t.policy.daily_cap, t.tier.as_str()))
        };
        if cap == 0 {
            return Ok((tier, None));
        }
        // Messages admitted and not yet counted count too: concurrent sends cannot all pass
        // a cap that has room for one.
        let mut uncounted = self.uncounted.lock().unwrap_or_else(|p| p.into_inner());
        let now = now_ms();
        let hours_today = (now % DAY_MS) / HOUR_MS + 1;
        let mut today = uncounted.get(tenant).copied().unwrap_or(0);
        for class in MessageClass::ALL {
            today += self
                .store
                .stats(tenant, class, Figures::Carried, now, hours_today)?
                .accepted;
        }
        if today >= cap {
            return Err(ApiError::ResourceExhausted {
                reason: format!("tenant {tenant} reached its daily cap of {cap} messages"),
                retry_after: Duration::from_millis(DAY_MS - now % DAY_MS),
            });
        }
        *uncounted.entry(tenant.clone()).or_default() += 1;
        let place = Capped {
            uncounted: &self.uncounted,
            tenant: tenant.clone(),
        };
        Ok((tier, Some(place)))
    }

    /// Takes suppressed recipients off the envelope, then queues what is left (if anything)
    /// and records the message and the answer in the cell's durable step.
    async fn accept_new(&self, mut message: Message) -> Result<Accepted, ApiError> {
        // Held until the message is counted (its record written) or refused.
        let (tier, _place) = self.admit(&message)?;
        let recipients = self.suppress(&mut message)?;
        let accepted = Accepted {
            message_id: message.id,
            recipients,
        };
        let state = if accepted.queued() {
            MessageState::Queued
        } else {
            MessageState::Suppressed
        };
        let record = message.record(state, accepted.recipients.clone());
        match (self.durable)
            .commit(&message, record, accepted.clone())
            .await?
        {
            Reservation::New => {}
            // Another send of the key committed first (nothing of this one was written).
            Reservation::Done(earlier) => return Ok(earlier),
            Reservation::Pending(_) => {
                return Err(ApiError::Unavailable(format!(
                    "idempotency_key: an earlier send of {:?} is under way; retry",
                    message.idempotency_key
                )));
            }
        }
        tracing::debug!(tenant = %message.tenant, message_id = %message.id, class = %message.class, ?state, "accepted");
        let (cell, class) = (self.cell.to_string(), message.class.as_str());
        metrics::counter!("cellmail_accepted_total", "cell" => cell.clone(), "class" => class, "tier" => tier, "state" => state.as_str()).increment(1);
        self.top.record(&message.tenant);
        for scope in accepted
            .recipients
            .iter()
            .filter_map(|r| r.suppressed.map(|(_, scope)| scope.as_str()))
        {
            metrics::counter!("cellmail_suppressed_recipients_total", "cell" => cell.clone(), "class" => class, "scope" => scope).increment(1);
        }
        Ok(accepted)
    }

    /// Checks every recipient against the tenant's list, then the global one, and removes
    /// the suppressed ones from the envelope.
    fn suppress(&self, message: &mut Message) -> Result<Vec<RecipientOutcome>, ApiError> {
        let addresses: Vec<&str> = message.recipients().map(|m| m.email.as_str()).collect();
        let tenant_list = self.store.suppressions_of(&message.tenant, &addresses)?;
        let outcomes: Vec<RecipientOutcome> = {
            let catalog = self.catalog.read();
            addresses
                .iter()
                .zip(tenant_list)
                .map(|(address, own)| {
                    let global = || {
                        catalog
                            .global_suppressions
                            .get(&suppression_key(address))
                            .map(|g| (g.reason, SuppressionScope::Global))
                    };
                    let suppressed = own
                        .map(|s| (s.reason, SuppressionScope::Tenant))
                        .or_else(global);
                    RecipientOutcome {
                        address: (*address).to_owned(),
                        suppressed,
                    }
                })
                .collect()
        };
        let blocked: HashSet<&str> = outcomes
            .iter()
            .filter(|o| o.suppressed.is_some())
            .map(|o| o.address.as_str())
            .collect();
        for list in [&mut message.to, &mut message.cc, &mut message.bcc] {
            list.retain(|m| !blocked.contains(m.email.as_str()));
        }
        Ok(outcomes)
    }
}
