//! Breakers, one per tenant and message class: when the bounce or complaint rate over the
//! policy's rolling window passes its threshold (with at least the policy's minimum volume
//! sent), the cell trips the breaker in the registry. A tripped class gets no new sends
//! (FAILED_PRECONDITION with the rates) and its queued mail is held in the cell store, not
//! dropped. An operator's resume sets the breaker to resumed: delivery takes the held mail
//! up again and the window starts over. Every trip is audited with the resume that ends it.

use std::borrow::Cow;
use std::sync::Arc;

use cellmail_proto::clock::MINUTE_MS;
use cellmail_proto::{CellId, MessageClass, TenantId, now_ms};
use cellmail_registry::Registry;
use cellmail_registry::audit;
use cellmail_registry::catalog::WatchedCatalog;
use cellmail_registry::schema::{
    self, AuditRecord, BreakerPolicy, BreakerRecord, BreakerState, Keys,
};

use crate::mailer::Setup;
use crate::message::Message;
use crate::store::{Counts, Store};

/// What delivery needs to know of a tenant: whether a class of its mail is paused (such mail
/// is held instead of sent), its share of the cell's sending (by tier), and its From
/// domain's identity (and the rest of its setup) as the transport is told of it
/// ([`crate::directory::Directory`]).
pub trait Gate: Send + Sync {
    fn paused(&self, tenant: &TenantId, class: MessageClass) -> bool;
    fn weight(&self, tenant: &TenantId) -> u32;
    fn setup(&self, tenant: &TenantId, domain: &str) -> Setup;
    /// `message` as the transport gets it: with the engagement links its tenant asks for
    /// ([`crate::engagement`]). A gate that adds none keeps this default.
    fn decorate<'m>(&self, message: &'m Message) -> Cow<'m, Message> {
        Cow::Borrowed(message)
    }
}

/// How many messages a premium tenant's lane sends per turn, to a standard tenant's one.
pub const PREMIUM_WEIGHT: u32 = 4;

fn percent(count: u64, of: u64) -> f64 {
    count as f64 * 100.0 / of.max(1) as f64
}

/// Why `window` trips a breaker under `policy`, if it does.
pub fn verdict(policy: &BreakerPolicy, window: &Counts) -> Option<String> {
    if window.sent == 0 || window.sent < u64::from(policy.min_volume) {
        return None;
    }
    let over = |count: u64, bps: u32| count * 10_000 > u64::from(bps) * window.sent;
    let (what, count, bps) = if over(window.complained, policy.complaint_bps) {
        ("complaint", window.complained, policy.complaint_bps)
    } else if over(window.bounced, policy.bounce_bps) {
        ("bounce", window.bounced, policy.bounce_bps)
    } else {
        return None;
    };
    Some(format!(
        "{what} rate {:.2}% is over {:.2}% ({count} of {} sent in the last {} min)",
        percent(count, window.sent),
        f64::from(bps) / 100.0,
        window.sent,
        policy.window_minutes,
    ))
}

/// The figures of a tripped breaker, as `FAILED_PRECONDITION` details carry them.
pub fn rates(record: &BreakerRecord) -> Vec<(String, String)> {
    vec![
        ("sent".into(), record.sent.to_string()),
        ("bounced".into(), record.bounced.to_string()),
        ("complained".into(), record.complained.to_string()),
        (
            "bounce_rate_percent".into(),
            format!("{:.2}", percent(record.bounced, record.sent)),
        ),
        (
            "complaint_rate_percent".into(),
            format!("{:.2}", percent(record.complained, record.sent)),
        ),
    ]
}

pub struct Breakers {
    cell: CellId,
    catalog: Arc<WatchedCatalog>,
    registry: Arc<dyn Registry>,
    keys: Keys,
    store: Arc<Store>,
}

impl Breakers {
    pub fn new(
        cell: CellId,
        catalog: Arc<WatchedCatalog>,
        registry: Arc<dyn Registry>,
        keys: Keys,
        store: Arc<Store>,
    ) -> Self {
        Self {
            cell,
            catalog,
            registry,
            keys,
            store,
        }
    }

    /// Weighs `tenant`'s `class` window after new feedback and trips its breaker if it is
    /// over a threshold.
    pub async fn evaluate(&self, tenant: &TenantId, class: MessageClass) -> anyhow::Result<()> {
        let now = now_ms();
        let (policy, since) = {
            let catalog = self.catalog.read();
            let Some(record) = catalog.tenants.get(tenant) else {
                return Ok(());
            };
            let breaker = catalog.breakers.get(&(tenant.clone(), class));
            if breaker.is_some_and(BreakerRecord::tripped) {
                return Ok(());
            }
            // After a resume the window starts at the next whole minute.
            let since = breaker.map_or(0, |b| b.since_ms.div_ceil(MINUTE_MS) * MINUTE_MS);
            (record.policy.breaker, since)
        };
        let from = now
            .saturating_sub(u64::from(policy.window_minutes) * MINUTE_MS)
            .max(since);
        let window = self.store.window(tenant, class, from, now)?;
        let Some(detail) = verdict(&policy, &window) else {
            return Ok(());
        };
        let record = BreakerRecord {
            since_ms: now,
            sent: window.sent,
            bounced: window.bounced,
            complained: window.complained,
            ..self.by_this_cell(BreakerState::Tripped, detail, false)
        };
        self.trip(tenant, class, record).await
    }

    /// This cell's change of a breaker to `state`, now, for `detail`, without window figures.
    fn by_this_cell(
        &self,
        state: BreakerState,
        detail: String,
        by_transport: bool,
    ) -> BreakerRecord {
        BreakerRecord {
            state,
            since_ms: now_ms(),
            by: format!("cell {}", self.cell),
            sent: 0,
            bounced: 0,
            complained: 0,
            detail,
            by_transport,
        }
    }

    /// Writes `record` (a trip) over `tenant`'s `class` breaker unless it is tripped already,
    /// with its audit entry, and raises the alarm.
    async fn trip(
        &self,
        tenant: &TenantId,
        class: MessageClass,
        record: BreakerRecord,
    ) -> anyhow::Result<()> {
        let detail = record.detail.clone();
        let written = self
            .change(tenant, class, record, "trip", |before| {
                !before.is_some_and(BreakerRecord::tripped)
            })
            .await?;
        if written {
            tracing::error!(%tenant, %class, cell = %self.cell, %detail, "ALARM: breaker tripped; this tenant's class is paused and its mail held");
            metrics::counter!("cellmail_breaker_trips_total", "cell" => self.cell.to_string(), "class" => class.as_str()).increment(1);
        }
        Ok(())
    }

    /// Writes `record` over `tenant`'s `class` breaker, audited as `breaker.<verb> <class>`,
    /// if `due` holds for the record there now: whether it was written.
    async fn change(
        &self,
        tenant: &TenantId,
        class: MessageClass,
        record: BreakerRecord,
        verb: &str,
        due: impl Fn(Option<&BreakerRecord>) -> bool,
    ) -> anyhow::Result<bool> {
        let key = self.keys.breaker(tenant, class);
        let current = self.registry.get(&key).await?;
        let before = match &current {
            Some(kv) => Some(schema::decode::<BreakerRecord>(&kv.value)?),
            None => None,
        };
        if !due(before.as_ref()) {
            return Ok(false);
        }
        let entry = AuditRecord {
            at_ms: record.since_ms,
            actor: record.by.clone(),
            action: format!("breaker.{verb} {class}"),
            tenant: Some(tenant.clone()),
            reason: record.detail.clone(),
            before: before.as_ref().and_then(audit::snapshot),
            after: audit::snapshot(&record),
        };
        let mod_revision = current.map_or(0, |kv| kv.mod_revision);
        Ok(audit::write(
            self.registry.as_ref(),
            &self.keys,
            &key,
            mod_revision,
            schema::encode(&record),
            &entry,
        )
        .await?)
    }

    /// Holds all of `tenant`'s mail because the mail transport paused it (`reason`): trips
    /// every class's breaker, marked as the transport's.
    pub async fn hold_for_transport(&self, tenant: &TenantId, reason: &str) -> anyhow::Result<()> {
        for class in MessageClass::ALL {
            let record = self.by_this_cell(BreakerState::Tripped, reason.to_owned(), true);
            self.trip(tenant, class, record).await?;
        }
        Ok(())
    }

    /// Releases what [`Self::hold_for_transport`] held of `tenant`, now that the transport
    /// lets it send again (breakers tripped by its rates stay tripped).
    pub async fn release_from_transport(&self, tenant: &TenantId) -> anyhow::Result<()> {
        for class in MessageClass::ALL {
            let held = self
                .catalog
                .read()
                .tripped(tenant, class)
                .is_some_and(|b| b.by_transport);
            if !held {
                continue;
            }
            let detail = "the mail transport lets the tenant send again".to_owned();
            let record = self.by_this_cell(BreakerState::Resumed, detail, false);
            let due = |before: Option<&BreakerRecord>| {
                before.is_some_and(|b| b.tripped() && b.by_transport)
            };
            if self.change(tenant, class, record, "resume", due).await? {
                tracing::info!(%tenant, %class, cell = %self.cell, "the mail transport resumed the tenant; its held mail is released");
            }
        }
        Ok(())
    }
}

/// What delivery does when the mail transport pauses one tenant: hold that tenant's mail.
#[async_trait::async_trait]
pub trait Holds: Send + Sync {
    async fn hold(&self, tenant: &TenantId, reason: &str) -> anyhow::Result<()>;
}

#[async_trait::async_trait]
impl Holds for Breakers {
    async fn hold(&self, tenant: &TenantId, reason: &str) -> anyhow::Result<()> {
        self.hold_for_transport(tenant, reason).await
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn window(sent: u64, bounced: u64, complained: u64) -> Counts {
        Counts {
            sent,
            bounced,
            complained,
            ..Counts::default()
        }
    }

    #[test]
    fn rates_over_their_thresholds_trip_only_with_the_minimum_volume() {
        let policy = BreakerPolicy::default();
        assert_eq!(verdict(&policy, &window(99, 50, 50)), None, "under volume");
        assert_eq!(verdict(&policy, &window(1000, 50, 1)), None, "at, not over");
        let complaints = verdict(&policy, &window(1000, 0, 2)).unwrap();
        assert!(
            complaints.starts_with("complaint rate 0.20% is over 0.10%"),
            "{complaints}"
        );
        let bounces = verdict(&policy, &window(1000, 51, 0)).unwrap();
        assert!(
            bounces.starts_with("bounce rate 5.10% is over 5.00%"),
            "{bounces}"
        );
        let none = BreakerPolicy {
            min_volume: 0,
            ..policy
        };
        assert_eq!(verdict(&none, &window(0, 0, 0)), None, "nothing sent");
    }
}
