//! What the control plane calls to offboard a tenant: everything this cell holds of it
//! (its stats as counted here, its suppression list, its messages), then erasing it, which
//! is refused while the tenant is active.

use cellmail_proto::v1;
use cellmail_proto::{ApiError, TenantId, suppression_key};
use cellmail_registry::schema::TenantStatus;
use tonic::Request;

use super::CellApi;
use super::moves::message_pages;
use super::serve::{MAX_STATS_HOURS, class_stats, message_status, suppression};
use crate::store;

/// Entries per part of an offboarding export.
const DATA_PAGE: usize = 500;

impl CellApi {
    pub(super) async fn export_tenant_data(
        &self,
        request: Request<v1::TenantDataRequest>,
    ) -> Result<Vec<v1::TenantData>, ApiError> {
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
        Ok(parts)
    }

    pub(super) async fn erase_tenant(
        &self,
        request: Request<v1::TenantDataRequest>,
    ) -> Result<v1::EraseTenantResponse, ApiError> {
        let tenant = TenantId::from_field("tenant_id", request.into_inner().tenant_id)?;
        let _one = self.directory.one_at_a_time().await;
        if self.directory.status(&tenant) == Some(TenantStatus::Active) {
            return Err(ApiError::FailedPrecondition(format!(
                "tenant {tenant} is active: suspend it before its data is erased"
            )));
        }
        self.store.erase(&tenant).await.map_err(ApiError::from)?;
        self.mailer
            .forget(&tenant)
            .await
            .map_err(|e| ApiError::Unavailable(format!("removing the mailer's resources: {e}")))?;
        tracing::info!(%tenant, "tenant erased");
        Ok(v1::EraseTenantResponse {})
    }
}
