//! Per-tenant metrics under a cardinality guard: only the busiest tenants get series of
//! their own (`cellmail_top_tenant_accepted{cell, tenant}`, the messages each accepted over the
//! last interval); every tenant counts in the per-cell, class and tier totals.

use std::collections::HashMap;
use std::sync::Mutex;
use std::time::Duration;

use cellmail_proto::{CellId, TenantId};
use tokio_util::sync::CancellationToken;

/// How often the top tenants are published (series not published for two intervals go).
pub const INTERVAL: Duration = Duration::from_secs(15);

pub struct TopTenants {
    n: usize,
    counts: Mutex<HashMap<TenantId, u64>>,
}

impl TopTenants {
    pub fn new(n: usize) -> Self {
        Self {
            n,
            counts: Mutex::new(HashMap::new()),
        }
    }

    fn counts(&self) -> std::sync::MutexGuard<'_, HashMap<TenantId, u64>> {
        self.counts.lock().unwrap_or_else(|p| p.into_inner())
    }

    pub fn record(&self, tenant: &TenantId) {
        *self.counts().entry(tenant.clone()).or_default() += 1;
    }

    /// The `n` busiest tenants since the last call, busiest first, and a fresh count.
    fn take_top(&self) -> Vec<(TenantId, u64)> {
        let mut counts: Vec<_> = std::mem::take(&mut *self.counts()).into_iter().collect();
        counts.sort_by(|a, b| b.1.cmp(&a.1).then_with(|| a.0.cmp(&b.0)));
        counts.truncate(self.n);
        counts
    }

    /// Publishes the top tenants every [`INTERVAL`] until `shutdown`.
    pub async fn publish(self: std::sync::Arc<Self>, cell: CellId, shutdown: CancellationToken) {
        loop {
            tokio::select! {
                () = shutdown.cancelled() => return,
                () = tokio::time::sleep(INTERVAL) => {}
            }
            for (tenant, count) in self.take_top() {
                metrics::gauge!("cellmail_top_tenant_accepted", "cell" => cell.to_string(), "tenant" => tenant.to_string())
                    .set(count as f64);
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn only_the_busiest_tenants_are_kept_and_each_interval_starts_over() {
        let top = TopTenants::new(2);
        for (name, times) in [("a", 3), ("b", 5), ("c", 1), ("d", 3)] {
            for _ in 0..times {
                top.record(&TenantId::new(name).unwrap());
            }
        }
        let names = |top: Vec<(TenantId, u64)>| -> Vec<(String, u64)> {
            top.into_iter().map(|(t, n)| (t.to_string(), n)).collect()
        };
        assert_eq!(names(top.take_top()), [("b".into(), 5), ("a".into(), 3)]);
        assert!(top.take_top().is_empty());
    }
}
