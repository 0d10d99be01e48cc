//! The `command` deployer: runs an operator-given shell command for each cell, as
//! `sh -c '<command>' cellmail-deploy <cell> <version>` (so `$1` is the cell and `$2` the
//! version; CELLMAIL_DEPLOY_CELL and CELLMAIL_DEPLOY_VERSION say the same), and takes exit
//! status 0 as deployed.
//! `deploy/local/deploy-cell.sh` is the one for a platform run as local processes.

use std::process::Stdio;
use std::time::Duration;

use async_trait::async_trait;
use cellmail_proto::CellId;
use tokio::process::Command;

use super::{DeployError, Deployer};

/// The end of a failed command's output kept in its error.
const OUTPUT_TAIL: usize = 2000;

pub struct CommandDeployer {
    command: String,
    timeout: Duration,
}

impl CommandDeployer {
    pub fn new(command: String, timeout: Duration) -> Self {
        Self { command, timeout }
    }
}

fn tail(output: &[u8]) -> String {
    let text = String::from_utf8_lossy(output);
    let text = text.trim();
    let start = text
        .char_indices()
        .rev()
        .nth(OUTPUT_TAIL)
        .map_or(0, |(i, _)| i);
    text[start..].to_owned()
}

#[async_trait]
impl Deployer for CommandDeployer {
    async fn deploy(&self, cell: &CellId, version: &str) -> Result<(), DeployError> {
        let failed = |reason: String| DeployError {
            cell: cell.clone(),
            version: version.to_owned(),
            reason,
        };
        let child = Command::new("sh")
            .arg("-c")
            .arg(&self.command)
            .arg("cellmail-deploy")
            .args([cell.as_str(), version])
            .env("CELLMAIL_DEPLOY_CELL", cell.as_str())
            .env("CELLMAIL_DEPLOY_VERSION", version)
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .kill_on_drop(true)
            .spawn()
            .map_err(|e| failed(format!("starting `{}`: {e}", self.command)))?;
        let output = tokio::time::timeout(self.timeout, child.wait_with_output())
            .await
            .map_err(|_| failed(format!("`{}` ran past {:?}", self.command, self.timeout)))?
            .map_err(|e| failed(format!("running `{}`: {e}", self.command)))?;
        if !output.status.success() {
            return Err(failed(format!(
                "`{}` exited with {}: {}",
                self.command,
                output.status,
                tail(&output.stderr)
            )));
        }
        tracing::info!(%cell, version, "deploy command done");
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn cell() -> CellId {
        CellId::new("cell-1").unwrap()
    }

    #[tokio::test]
    async fn the_command_gets_the_cell_and_version_and_its_failure_says_why() {
        let dir = tempfile::tempdir().unwrap();
        let log = dir.path().join("deploys");
        let command = format!(
            "echo \"$CELLMAIL_DEPLOY_CELL=$CELLMAIL_DEPLOY_VERSION $1 $2\" >> {}; test \"$2\" != bad || {{ echo no such release >&2; exit 3; }}",
            log.display()
        );
        let deployer = CommandDeployer::new(command, Duration::from_secs(10));
        deployer.deploy(&cell(), "v2").await.unwrap();
        let err = deployer.deploy(&cell(), "bad").await.unwrap_err();
        assert!(err.reason.contains("no such release"), "{err}");
        assert!(err.reason.contains("exit status: 3"), "{err}");
        assert_eq!(
            std::fs::read_to_string(&log).unwrap(),
            "cell-1=v2 cell-1 v2\ncell-1=bad cell-1 bad\n"
        );
    }

    #[tokio::test]
    async fn a_command_past_its_timeout_fails() {
        let deployer = CommandDeployer::new("sleep 5".into(), Duration::from_millis(100));
        let err = deployer.deploy(&cell(), "v2").await.unwrap_err();
        assert!(err.reason.contains("ran past"), "{err}");
    }
}
