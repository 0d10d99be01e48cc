//! Rollouts: an operator starts one (refused where this control plane has no deployer),
//! reads it, and pauses, resumes or aborts it; the leading control plane carries it out.

use std::time::Duration;

use cellmail_proto::v1;
use cellmail_proto::{ApiError, CellId};
use tonic::Request;

use super::{ControlApi, actor};
use crate::rollout;

impl ControlApi {
    pub(super) async fn start_rollout(
        &self,
        request: Request<v1::StartRolloutRequest>,
    ) -> Result<v1::RolloutInfo, ApiError> {
        let actor = actor(&request);
        let request = request.into_inner();
        if !self.rollouts {
            return Err(ApiError::FailedPrecondition(
                "this control plane has no deployer (--deployer): rollouts are off".into(),
            ));
        }
        let canary = match request.canary.as_str() {
            "" => None,
            id => Some(CellId::from_field("canary", id)?),
        };
        let secs_or = |secs: u64, default: Duration| match secs {
            0 => default,
            secs => Duration::from_secs(secs),
        };
        let start = rollout::Start {
            version: request.version,
            canary,
            waves: match request.waves.as_str() {
                "" => rollout::DEFAULT_WAVES.to_owned(),
                waves => waves.to_owned(),
            },
            bake: secs_or(request.bake_secs, rollout::DEFAULT_BAKE),
            ready_timeout: secs_or(request.ready_timeout_secs, rollout::DEFAULT_READY_TIMEOUT),
            gate: rollout::gate_config(request.gate)?,
            actor,
            reason: request.reason,
        };
        let record = rollout::start(self.registry.as_ref(), &self.keys, start).await?;
        Ok(rollout::info(&record))
    }

    pub(super) async fn get_rollout(
        &self,
        request: Request<v1::GetRolloutRequest>,
    ) -> Result<v1::RolloutInfo, ApiError> {
        let id = request.into_inner().id;
        let (record, _) = rollout::get(self.registry.as_ref(), &self.keys, &id).await?;
        Ok(rollout::info(&record))
    }

    pub(super) async fn pause_rollout(
        &self,
        request: Request<v1::RolloutActionRequest>,
    ) -> Result<v1::RolloutInfo, ApiError> {
        self.act_on_rollout(request, rollout::Action::Pause).await
    }

    pub(super) async fn resume_rollout(
        &self,
        request: Request<v1::RolloutActionRequest>,
    ) -> Result<v1::RolloutInfo, ApiError> {
        self.act_on_rollout(request, rollout::Action::Resume).await
    }

    pub(super) async fn abort_rollout(
        &self,
        request: Request<v1::RolloutActionRequest>,
    ) -> Result<v1::RolloutInfo, ApiError> {
        self.act_on_rollout(request, rollout::Action::Abort).await
    }

    async fn act_on_rollout(
        &self,
        request: Request<v1::RolloutActionRequest>,
        action: rollout::Action,
    ) -> Result<v1::RolloutInfo, ApiError> {
        let actor = actor(&request);
        let request = request.into_inner();
        let record = rollout::act(
            self.registry.as_ref(),
            &self.keys,
            &request.id,
            action,
            (actor, request.reason),
        )
        .await?;
        Ok(rollout::info(&record))
    }
}
