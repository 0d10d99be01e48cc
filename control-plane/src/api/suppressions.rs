//! The global suppression list: addresses no tenant may send to, listed, added and removed
//! by operators, each change audited.

use cellmail_proto::error::quote;
use cellmail_proto::v1;
use cellmail_proto::{ApiError, SuppressionReason, SuppressionScope, now_ms, suppression_key};
use tonic::Request;

use super::{ControlApi, actor};
use cellmail_registry::audit;
use cellmail_registry::schema::{self, GlobalSuppressionRecord};

impl ControlApi {
    pub(super) async fn list_global_suppressions(
        &self,
        _request: Request<v1::ListGlobalSuppressionsRequest>,
    ) -> Result<v1::ListGlobalSuppressionsResponse, ApiError> {
        let catalog = self.catalog(&["suppressions"]).await?;
        let mut suppressions: Vec<_> = catalog
            .global_suppressions
            .into_values()
            .map(global_suppression)
            .collect();
        suppressions.sort_by(|a, b| a.address.cmp(&b.address));
        Ok(v1::ListGlobalSuppressionsResponse { suppressions })
    }

    pub(super) async fn add_global_suppression(
        &self,
        request: Request<v1::AddGlobalSuppressionRequest>,
    ) -> Result<v1::Suppression, ApiError> {
        let actor = actor(&request);
        let req = request.into_inner();
        let options = email_address::Options::default()
            .with_required_tld()
            .without_domain_literal()
            .without_display_text();
        email_address::EmailAddress::parse_with_options(req.address.trim(), options).map_err(
            |e| {
                ApiError::invalid(
                    "address",
                    format!("{} is not an email address: {e}", quote(&req.address)),
                )
            },
        )?;
        let reason = match req.kind {
            0 => SuppressionReason::Manual,
            wire => SuppressionReason::from_wire(wire)
                .ok_or_else(|| ApiError::invalid("kind", "unknown suppression reason"))?,
        };
        let record = GlobalSuppressionRecord {
            address: req.address.trim().to_owned(),
            reason,
            created_at_ms: now_ms(),
        };
        let key = self
            .keys
            .global_suppression(&suppression_key(&record.address));
        let (before, revision) = self.global_entry(&key).await?;
        let entry = audit::entry(
            (actor, req.reason),
            "suppression.add",
            None,
            before.as_ref().and_then(audit::snapshot),
            audit::snapshot(&record),
        );
        let registry = self.registry.as_ref();
        let value = schema::encode(&record);
        if !audit::write(registry, &self.keys, &key, revision, value, &entry)
            .await
            .map_err(ApiError::from)?
        {
            return Err(ApiError::Aborted(format!(
                "the global entry of {} changed meanwhile; try again",
                record.address
            )));
        }
        tracing::info!(address = %record.address, reason = reason.as_str(), "address suppressed globally");
        Ok(global_suppression(record))
    }

    pub(super) async fn remove_global_suppression(
        &self,
        request: Request<v1::RemoveGlobalSuppressionRequest>,
    ) -> Result<v1::RemoveSuppressionResponse, ApiError> {
        let actor = actor(&request);
        let req = request.into_inner();
        if req.address.trim().is_empty() {
            return Err(ApiError::invalid("address", "is required"));
        }
        let key = self.keys.global_suppression(&suppression_key(&req.address));
        let (Some(before), revision) = self.global_entry(&key).await? else {
            return Ok(v1::RemoveSuppressionResponse { removed: false });
        };
        let entry = audit::entry(
            (actor, req.reason),
            "suppression.remove",
            None,
            audit::snapshot(&before),
            None,
        );
        let registry = self.registry.as_ref();
        if !audit::remove(registry, &self.keys, &key, revision, &entry).await? {
            return Err(ApiError::Aborted(format!(
                "the global entry of {} changed meanwhile; try again",
                before.address
            )));
        }
        Ok(v1::RemoveSuppressionResponse { removed: true })
    }

    /// The global entry at registry key `key`, if any, and its mod revision (0: absent).
    async fn global_entry(
        &self,
        key: &str,
    ) -> Result<(Option<GlobalSuppressionRecord>, u64), ApiError> {
        let Some(kv) = self.registry.get(key).await.map_err(ApiError::from)? else {
            return Ok((None, 0));
        };
        let record = schema::decode(&kv.value)
            .map_err(|e| ApiError::Internal(format!("global suppression {key}: {e}")))?;
        Ok((Some(record), kv.mod_revision))
    }
}

fn global_suppression(record: GlobalSuppressionRecord) -> v1::Suppression {
    v1::Suppression {
        address: record.address,
        reason: record.reason.to_wire(),
        scope: SuppressionScope::Global.to_wire(),
        created_at_ms: record.created_at_ms as i64,
        message_id: String::new(),
    }
}
