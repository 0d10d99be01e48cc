//! What other cells call: feedback on a message one of them sent for a tenant that has
//! moved here since, forwarded by that cell so that this one suppresses, counts and weighs
//! it.

use cellmail_proto::{ApiError, v1};
use tonic::Request;

use super::CellApi;
use crate::feedback;

impl CellApi {
    pub(super) async fn forward_feedback(
        &self,
        request: Request<v1::ForwardFeedbackRequest>,
    ) -> Result<v1::ForwardFeedbackResponse, ApiError> {
        let record = request.into_inner().record;
        let feedback =
            feedback::parse(&record).map_err(|e| ApiError::invalid("record", e.to_string()))?;
        // Only the tenant's serving cell applies it; the sender keeps it and tries again.
        if self.ingest.route(&feedback.tenant) != feedback::Route::Here {
            return Err(ApiError::Unavailable(format!(
                "cell {} does not serve tenant {} now",
                self.cell, feedback.tenant
            )));
        }
        self.ingest.apply(&feedback).await.map_err(ApiError::from)?;
        Ok(v1::ForwardFeedbackResponse {})
    }
}
