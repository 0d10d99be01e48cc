//! What the control plane's rollout gate calls: the cell's own figures over a window of its
//! last minutes, named with the cell and the release it runs.

use cellmail_proto::{ApiError, v1};
use tonic::Request;

use super::CellApi;

impl CellApi {
    pub(super) async fn get_health_report(
        &self,
        request: Request<v1::HealthReportRequest>,
    ) -> Result<v1::HealthReport, ApiError> {
        let figures = self
            .health
            .report(u64::from(request.into_inner().window_secs));
        Ok(figures.report(&self.cell, &self.release))
    }
}
