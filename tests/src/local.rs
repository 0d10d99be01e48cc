//! The platform as `deploy/local/cluster.sh` runs it: separate processes (cells, a router,
//! two control planes) on the shared test etcd, each cell restarted by
//! `deploy/local/deploy-cell.sh` when a rollout deploys it. Stopped when dropped.

use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::process::Command;

use anyhow::{Context, bail};

use crate::{Control, binary, control_client};

pub struct LocalCluster {
    dir: tempfile::TempDir,
    env: HashMap<String, String>,
    /// Where the binaries are.
    bin: PathBuf,
}

fn repo_root() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .expect("tests/ is in the repository")
        .to_owned()
}

fn script(name: &str) -> PathBuf {
    repo_root().join("deploy/local").join(name)
}

impl LocalCluster {
    /// Starts `cells` cells on release `release` under registry prefix `prefix` of `etcd`.
    pub fn start(etcd: &str, prefix: &str, cells: usize, release: &str) -> anyhow::Result<Self> {
        let dir = tempfile::tempdir()?;
        let bin = binary("cellmail-cell")?
            .parent()
            .context("no binary dir")?
            .to_owned();
        let cluster = |command: &str| {
            Command::new(script("cluster.sh"))
                .arg(command)
                .env("CELLMAIL_LOCAL_DIR", dir.path())
                .env("CELLMAIL_LOCAL_CELLS", cells.to_string())
                .env("CELLMAIL_LOCAL_ETCD", etcd)
                .env("CELLMAIL_LOCAL_RELEASE", release)
                .env("CELLMAIL_REGISTRY_PREFIX", prefix)
                .env("CELLMAIL_BIN_DIR", &bin)
                .env("RUST_LOG", "warn")
                .output()
        };
        let started = cluster("start").context("running deploy/local/cluster.sh")?;
        let mut this = Self {
            dir,
            env: HashMap::new(),
            bin,
        };
        if !started.status.success() {
            bail!(
                "deploy/local/cluster.sh start failed: {}",
                String::from_utf8_lossy(&started.stderr)
            );
        }
        let env = std::fs::read_to_string(this.dir.path().join("env"))?;
        this.env = env
            .lines()
            .filter_map(|line| line.strip_prefix("export ")?.split_once('='))
            .map(|(k, v)| (k.to_owned(), v.to_owned()))
            .collect();
        Ok(this)
    }

    fn var(&self, name: &str) -> anyhow::Result<&str> {
        self.env
            .get(name)
            .map(String::as_str)
            .with_context(|| format!("{name} is not in the cluster's env file"))
    }

    pub fn router(&self) -> anyhow::Result<String> {
        Ok(format!("http://{}", self.var("CELLMAIL_ROUTER")?))
    }

    /// `host:port` of control plane `n` (0 or 1).
    pub fn control_addr(&self, n: usize) -> anyhow::Result<String> {
        let name = ["CELLMAIL_CONTROL", "CELLMAIL_CONTROL_STANDBY"][n];
        Ok(self.var(name)?.to_owned())
    }

    /// A client of control plane `n` (0 or 1).
    pub async fn control(&self, n: usize) -> anyhow::Result<Control> {
        let token = self.var("CELLMAIL_ADMIN_TOKEN")?;
        control_client(&format!("http://{}", self.control_addr(n)?), token).await
    }

    /// The cluster's registry keys.
    pub fn keys(&self) -> cellmail_registry::schema::Keys {
        cellmail_registry::schema::Keys::new(
            self.var("CELLMAIL_REGISTRY_PREFIX").unwrap_or("/cellmail/"),
        )
    }

    /// Runs the CLI against control plane 0 and parses its `--json` output.
    pub fn cli(&self, args: &[&str]) -> anyhow::Result<serde_json::Value> {
        let env = [
            ("CELLMAIL_CONTROL", self.var("CELLMAIL_CONTROL")?),
            ("CELLMAIL_ADMIN_TOKEN", self.var("CELLMAIL_ADMIN_TOKEN")?),
        ];
        let mut all = args.to_vec();
        all.push("--json");
        Ok(crate::cellmail_with(&env, &all))
    }

    /// SIGKILLs control plane `n`, as in a crash.
    pub fn kill_control(&self, n: usize) -> anyhow::Result<()> {
        let pid = std::fs::read_to_string(self.dir.path().join(format!("control-{}.pid", n + 1)))?;
        let killed = Command::new("kill").args(["-KILL", pid.trim()]).status()?;
        anyhow::ensure!(killed.success(), "kill -KILL {pid} failed");
        Ok(())
    }

    /// Installs release `name`: the built cellmail-cell, run with `flags`.
    pub fn release(&self, name: &str, flags: &[&str]) -> anyhow::Result<()> {
        let dir = self.dir.path().join("releases").join(name);
        std::fs::create_dir_all(&dir)?;
        let script = format!(
            "#!/bin/sh\nexec '{}' {} \"$@\"\n",
            self.bin.join("cellmail-cell").display(),
            flags.join(" ")
        );
        let path = dir.join("cellmail-cell");
        std::fs::write(&path, script)?;
        let status = Command::new("chmod").arg("+x").arg(&path).status()?;
        anyhow::ensure!(status.success(), "chmod +x {}", path.display());
        Ok(())
    }

    /// Every deploy so far, in order: (cell, release).
    pub fn deploys(&self) -> anyhow::Result<Vec<(String, String)>> {
        let log = std::fs::read_to_string(self.dir.path().join("deploys.log"))?;
        Ok(log
            .lines()
            .filter_map(|line| {
                let mut fields = line.split_whitespace().skip(1);
                Some((fields.next()?.to_owned(), fields.next()?.to_owned()))
            })
            .collect())
    }

    /// Where cell `cell`'s file sink writes tenant `tenant`'s mail.
    pub fn mail_dir(&self, cell: &str, tenant: &str) -> PathBuf {
        self.dir
            .path()
            .join("cells")
            .join(cell)
            .join("data/mail")
            .join(tenant)
    }
}

impl Drop for LocalCluster {
    fn drop(&mut self) {
        let stopped = Command::new(script("cluster.sh"))
            .arg("stop")
            .env("CELLMAIL_LOCAL_DIR", self.dir.path())
            .status();
        if !matches!(stopped, Ok(s) if s.success()) {
            eprintln!("deploy/local/cluster.sh stop failed: {stopped:?}");
        }
    }
}
