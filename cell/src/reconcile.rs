//! The mail transport's own view of the cell's tenants, asked again every interval
//! ([`Mailer::reconcile_every`]; `--ses-reconcile-secs` for SES), starting when the cell
//! starts. Each active tenant placed here is provisioned ([`Mailer::prepare`]: a tenant created
//! here gets its configuration set and identities without waiting for its first send; what
//! exists already is not asked for again). The transport's events about pauses are
//! best-effort, so a pause is noticed here even when its event was lost: a tenant the
//! transport paused is held ([`Breakers::hold_for_transport`]), one it lets send again is
//! released, and a paused account stops the cell's sending until the next sweep.

use std::sync::Arc;
use std::time::Duration;

use cellmail_proto::{CellId, TenantId};
use cellmail_registry::schema::TenantStatus;
use tokio_util::sync::CancellationToken;

use crate::breaker::Breakers;
use crate::directory::Directory;
use crate::mailer::{Mailer, Sending};
use crate::worker::Worker;

/// What a sweep works with.
pub struct Reconcile {
    pub cell: CellId,
    pub mailer: Arc<dyn Mailer>,
    pub breakers: Arc<Breakers>,
    pub directory: Arc<Directory>,
    pub worker: Arc<Worker>,
}

impl Reconcile {
    /// Sweeps every `every` until `shutdown` is cancelled.
    pub async fn run(self, every: Duration, shutdown: CancellationToken) {
        let mut ticks = tokio::time::interval(every);
        ticks.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        loop {
            tokio::select! {
                _ = shutdown.cancelled() => return,
                _ = ticks.tick() => self.sweep(every).await,
            }
        }
    }

    async fn sweep(&self, every: Duration) {
        let tenants: Vec<TenantId> = {
            let catalog = self.directory.catalog().read();
            (catalog.placements.iter())
                .filter(|(_, placement)| placement.cell == self.cell)
                .map(|(tenant, _)| tenant.clone())
                .collect()
        };
        // The account's status once a sweep: a paused account holds the whole cell.
        let account = self.mailer.account_sending().await;
        match &account {
            Ok(Sending::AccountPaused(reason)) => {
                self.worker.pause_all(reason, every);
                return;
            }
            Err(err) => {
                tracing::warn!(cell = %self.cell, error = %err, "reading the transport's account status; its tenants' are read next sweep");
            }
            Ok(_) => {}
        }
        for tenant in tenants {
            // A suspended tenant is left alone: it sends nothing, and its offboarding may be
            // removing what it had on the transport.
            let one = self.directory.one_at_a_time().await;
            if self.directory.status(&tenant) != Some(TenantStatus::Active) {
                continue;
            }
            let setup = self.directory.setup(&tenant);
            if let Err(err) = self.mailer.prepare(&tenant, &setup).await {
                tracing::warn!(%tenant, cell = %self.cell, error = %err, "provisioning the tenant with the transport; trying again at its first send or the next sweep");
            }
            drop(one);
            if account.is_err() {
                continue;
            }
            let changed = match self.mailer.sending(&tenant).await {
                Ok(Sending::TenantPaused(reason)) => {
                    self.breakers.hold_for_transport(&tenant, &reason).await
                }
                Ok(_) => self.breakers.release_from_transport(&tenant).await,
                Err(err) => Err(err.into()),
            };
            if let Err(err) = changed {
                tracing::warn!(%tenant, cell = %self.cell, error = %err, "reconciling the tenant's sending with the transport's; trying again next sweep");
            }
        }
    }
}
