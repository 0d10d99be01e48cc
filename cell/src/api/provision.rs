//! What the control plane calls when a tenant is placed here or adds or checks a sending
//! domain: set up the tenant on the cell's mail transport, and say how the transport sees
//! each of its domains.

use std::time::Duration;

use cellmail_proto::v1;
use cellmail_proto::{ApiError, TenantId};
use tonic::Request;

use super::CellApi;

/// The longest a call waits for this cell's view of the registry to catch up.
const CATALOG_WAIT: Duration = Duration::from_secs(5);

impl CellApi {
    pub(super) async fn provision_tenant(
        &self,
        request: Request<v1::ProvisionTenantRequest>,
    ) -> Result<v1::ProvisionTenantResponse, ApiError> {
        let request = request.into_inner();
        let tenant = TenantId::from_field("tenant_id", request.tenant_id)?;
        if !self
            .catalog
            .wait_for_revision(request.revision, CATALOG_WAIT)
            .await
        {
            return Err(ApiError::Unavailable(format!(
                "this cell's view of the registry has not reached revision {} yet",
                request.revision
            )));
        }
        if !self.catalog.read().tenants.contains_key(&tenant) {
            return Err(ApiError::NotFound(format!(
                "tenant {tenant} is not known here"
            )));
        }
        let setup = self.directory.setup(&tenant);
        let failed = |e| ApiError::Unavailable(format!("setting up the mail transport: {e}"));
        self.mailer.prepare(&tenant, &setup).await.map_err(failed)?;
        let mut seen = Vec::new();
        for identity in &setup.identities {
            let status = (self.mailer.identity_status(&identity.domain).await).map_err(failed)?;
            if let Some(status) = status {
                seen.push(v1::TransportIdentity {
                    domain: identity.domain.clone(),
                    dkim_status: status.dkim,
                    mail_from_status: status.mail_from,
                });
            }
        }
        Ok(v1::ProvisionTenantResponse {
            identities: seen,
            ses_region: self.mailer.ses_region().unwrap_or_default(),
        })
    }
}
