//! The audit log: its newest entries (a hundred unless told), of one tenant or of all.

use cellmail_proto::v1;
use cellmail_proto::{ApiError, TenantId};
use tonic::Request;

use super::ControlApi;
use cellmail_registry::audit;

impl ControlApi {
    pub(super) async fn list_audit(
        &self,
        request: Request<v1::ListAuditRequest>,
    ) -> Result<v1::ListAuditResponse, ApiError> {
        let req = request.into_inner();
        let tenant = if req.tenant_id.is_empty() {
            None
        } else {
            Some(TenantId::from_field("tenant_id", req.tenant_id)?)
        };
        let limit = if req.limit == 0 {
            100
        } else {
            req.limit as usize
        };
        let json =
            |value: Option<serde_json::Value>| value.map(|v| v.to_string()).unwrap_or_default();
        let entries = audit::list(self.registry.as_ref(), &self.keys, tenant.as_ref(), limit)
            .await
            .map_err(ApiError::from)?
            .into_iter()
            .map(|e| v1::AuditEntry {
                at_ms: e.at_ms as i64,
                actor: e.actor,
                action: e.action,
                tenant_id: e.tenant.map(|t| t.to_string()).unwrap_or_default(),
                reason: e.reason,
                before_json: json(e.before),
                after_json: json(e.after),
            })
            .collect();
        Ok(v1::ListAuditResponse { entries })
    }
}
