//! Deployers: how a rollout makes one cell run a version. A [`Deployer`] deploys and returns
//! once the deployment itself is done; the rollout then waits until the cell serves the
//! version (its registry record names it) before it bakes.
//!
//! Implementations: [`command::CommandDeployer`] runs an operator-given command per cell
//! (one machine, tests, any tooling of the operator's), [`kubernetes::KubernetesDeployer`]
//! patches the cell's StatefulSet and waits for its rollout.

pub mod command;
pub mod kubernetes;

use std::sync::Arc;
use std::time::Duration;

use async_trait::async_trait;
use cellmail_proto::CellId;

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("deploying {version} to cell {cell} failed: {reason}")]
pub struct DeployError {
    pub cell: CellId,
    pub version: String,
    pub reason: String,
}

#[async_trait]
pub trait Deployer: Send + Sync + 'static {
    /// Makes `cell` run `version`. Deploying the version a cell already runs is harmless,
    /// so a control plane that takes over a rollout can deploy its wave again.
    async fn deploy(&self, cell: &CellId, version: &str) -> Result<(), DeployError>;
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum DeployerKind {
    /// `--deploy-command`, run with the cell and the version.
    Command,
    /// Patch the cell's StatefulSet (`--k8s-*`) and wait for its rollout.
    Kubernetes,
}

/// Which deployer rollouts use, from flags or env. None: rollouts are refused.
#[derive(Debug, Clone, clap::Args)]
pub struct DeployerConfig {
    #[arg(long = "deployer", env = "CELLMAIL_DEPLOYER", value_enum)]
    pub kind: Option<DeployerKind>,
    /// The shell command the `command` deployer runs for a cell: `$1` is the cell id and `$2`
    /// the version (also in CELLMAIL_DEPLOY_CELL and CELLMAIL_DEPLOY_VERSION).
    #[arg(long = "deploy-command", env = "CELLMAIL_DEPLOY_COMMAND")]
    pub command: Option<String>,
    /// The longest one cell's deploy may take.
    #[arg(
        long = "deploy-timeout-secs",
        env = "CELLMAIL_DEPLOY_TIMEOUT_SECS",
        default_value_t = 600
    )]
    pub timeout_secs: u64,
    #[command(flatten)]
    pub kubernetes: kubernetes::KubernetesSettings,
}

impl DeployerConfig {
    pub async fn open(&self) -> anyhow::Result<Option<Arc<dyn Deployer>>> {
        let timeout = Duration::from_secs(self.timeout_secs);
        Ok(match self.kind {
            None => None,
            Some(DeployerKind::Command) => {
                let command = self
                    .command
                    .clone()
                    .ok_or_else(|| anyhow::anyhow!("--deployer command needs --deploy-command"))?;
                Some(Arc::new(command::CommandDeployer::new(command, timeout)))
            }
            Some(DeployerKind::Kubernetes) => Some(Arc::new(
                kubernetes::KubernetesDeployer::connect(self.kubernetes.clone(), timeout).await?,
            )),
        })
    }
}
