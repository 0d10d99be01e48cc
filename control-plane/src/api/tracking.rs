//! The keys that sign engagement links: rotated by an operator, audited by their ids (never
//! their secrets).

use cellmail_proto::{ApiError, now_ms, v1};
use cellmail_registry::audit;
use cellmail_registry::schema;
use cellmail_registry::tracking::TrackingKeys;
use tonic::Request;

use super::{ControlApi, actor};

impl ControlApi {
    pub(super) async fn rotate_tracking_key(
        &self,
        request: Request<v1::RotateTrackingKeyRequest>,
    ) -> Result<v1::RotateTrackingKeyResponse, ApiError> {
        let actor = actor(&request);
        let reason = request.into_inner().reason;
        let key = self.keys.tracking_keys();
        let kv = self.registry.get(&key).await.map_err(ApiError::from)?;
        let (before, revision) = match &kv {
            Some(kv) => (
                schema::decode::<TrackingKeys>(&kv.value)
                    .map_err(|e| ApiError::Internal(format!("the tracking keys: {e}")))?,
                kv.mod_revision,
            ),
            None => (TrackingKeys::default(), 0),
        };
        let now = now_ms();
        let after = before.rotated(now);
        let ids = |keys: &TrackingKeys| -> Vec<String> {
            keys.keys.iter().map(|k| k.id.clone()).collect()
        };
        let entry = audit::entry(
            (actor, reason),
            "tracking.rotate-key",
            None,
            audit::snapshot(&ids(&before)),
            audit::snapshot(&ids(&after)),
        );
        let written = audit::write(
            self.registry.as_ref(),
            &self.keys,
            &key,
            revision,
            schema::encode(&after),
            &entry,
        )
        .await
        .map_err(ApiError::from)?;
        if !written {
            return Err(ApiError::Aborted(
                "the tracking keys changed meanwhile; try again".into(),
            ));
        }
        tracing::info!(key = %after.keys[0].id, "tracking key rotated");
        Ok(v1::RotateTrackingKeyResponse {
            key_ids: ids(&after),
        })
    }
}
