//! The platform as separate processes (`cellmail-control`, `cellmail-router`,
//! `cellmail-cell`) sharing one registry, as it is deployed.

use std::path::Path;
use std::process::{Child, Command, Stdio};
use std::time::Duration;

use anyhow::Context;
use cellmail_proto::CellId;
use cellmail_proto::tls::Role;

use crate::binary;

/// A free loopback address for a server to bind.
pub fn free_addr() -> anyhow::Result<String> {
    Ok(format!("127.0.0.1:{}", free_port()?))
}

/// A loopback port free now, below the kernel's ephemeral range: until the server it is for
/// binds it, no socket bound to port 0 (another test's cell, any outgoing connection) can
/// take it; one of those once did, and a test's router address answered for a cell.
pub fn free_port() -> anyhow::Result<u16> {
    let ephemeral = std::fs::read_to_string("/proc/sys/net/ipv4/ip_local_port_range")
        .ok()
        .and_then(|range| range.split_whitespace().next()?.parse().ok())
        .unwrap_or(32_768u16);
    let below = 10_000..ephemeral.max(10_001);
    for _ in 0..100 {
        let port = rand::random_range(below.clone());
        if std::net::TcpListener::bind(("127.0.0.1", port)).is_ok() {
            return Ok(port);
        }
    }
    anyhow::bail!("no free loopback port in {below:?}")
}

/// One cellmail binary running as a child process; killed when dropped.
pub struct Daemon {
    child: Child,
}

impl Daemon {
    /// Starts `name` with `args` and waits until `addr` (if any) accepts connections.
    pub async fn start(name: &str, args: &[&str], addr: Option<&str>) -> anyhow::Result<Self> {
        Self::start_with_env(name, args, addr, &[]).await
    }

    /// [`Daemon::start`] with extra environment variables. A router, a control plane or a
    /// cell started with `--cell-id` is given its certificate from the test CA.
    pub async fn start_with_env(
        name: &str,
        args: &[&str],
        addr: Option<&str>,
        env: &[(&str, &str)],
    ) -> anyhow::Result<Self> {
        let cell = args
            .iter()
            .position(|arg| *arg == "--cell-id")
            .and_then(|at| CellId::new(*args.get(at + 1)?).ok());
        let role = match name {
            "cellmail-router" => Some(Role::Router),
            "cellmail-control" => Some(Role::Control),
            "cellmail-cell" => cell.map(Role::Cell),
            _ => None,
        };
        let child = Command::new(binary(name)?)
            .args(args)
            .env("RUST_LOG", "warn")
            .envs(role.iter().flat_map(crate::pki::env))
            .envs(env.iter().copied())
            .stdout(Stdio::null())
            .stderr(Stdio::inherit())
            .spawn()
            .with_context(|| format!("starting {name}"))?;
        let daemon = Self { child };
        if let Some(addr) = addr {
            crate::wait_for(
                Duration::from_secs(20),
                &format!("{name} on {addr}"),
                || std::net::TcpStream::connect(addr).ok(),
            )
            .await?;
        }
        Ok(daemon)
    }

    /// SIGKILL, as in a crash.
    pub fn kill(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

impl Drop for Daemon {
    fn drop(&mut self) {
        self.kill();
    }
}

/// Arguments every process of one platform shares: its registry and key prefix.
pub fn registry_args(etcd: &str, prefix: &str) -> Vec<String> {
    vec![
        "--registry".into(),
        format!("etcd://{etcd}"),
        "--registry-prefix".into(),
        prefix.into(),
    ]
}

/// Starts a cell with its own data dir.
pub async fn start_cell(
    id: &str,
    registry: &[String],
    data_dir: &Path,
    extra: &[&str],
) -> anyhow::Result<Daemon> {
    start_cell_with_env(id, registry, data_dir, extra, &[]).await
}

/// [`start_cell`] with extra environment variables.
pub async fn start_cell_with_env(
    id: &str,
    registry: &[String],
    data_dir: &Path,
    extra: &[&str],
    env: &[(&str, &str)],
) -> anyhow::Result<Daemon> {
    let data_dir = data_dir.to_string_lossy().into_owned();
    let mut args: Vec<&str> = vec!["--cell-id", id, "--data-dir", &data_dir];
    args.extend(registry.iter().map(String::as_str));
    args.extend(extra);
    Daemon::start_with_env("cellmail-cell", &args, None, env).await
}

/// A control plane (with `admin_token`) and a router (serving metrics) on one registry, each
/// on a free port; killed when dropped.
pub struct Front {
    /// `host:port` of each.
    pub control: String,
    pub router: String,
    pub router_metrics: String,
    _control: Daemon,
    _router: Daemon,
}

impl Front {
    /// SIGKILLs the control plane, as in a crash (the router goes on).
    pub fn kill_control(&mut self) {
        self._control.kill();
    }

    pub async fn start(registry: &[String], admin_token: &str) -> anyhow::Result<Self> {
        Self::start_with_env(registry, admin_token, &[], &[]).await
    }

    /// [`Front::start`] with extra environment variables for the control plane and for the
    /// router.
    pub async fn start_with_env(
        registry: &[String],
        admin_token: &str,
        control_env: &[(&str, &str)],
        router_env: &[(&str, &str)],
    ) -> anyhow::Result<Self> {
        let (control, router, router_metrics) = (free_addr()?, free_addr()?, free_addr()?);
        let registry = registry.iter().map(String::as_str);
        let control_args: Vec<&str> = [
            "--control-addr",
            &control,
            "--admin-token",
            admin_token,
            "--trust-new-domains",
        ]
        .into_iter()
        .chain(registry.clone())
        .collect();
        let control_daemon = Daemon::start_with_env(
            "cellmail-control",
            &control_args,
            Some(&control),
            control_env,
        )
        .await?;
        let router_args: Vec<&str> = ["--router-addr", &router, "--metrics-addr", &router_metrics]
            .into_iter()
            .chain(registry)
            .collect();
        let router_daemon =
            Daemon::start_with_env("cellmail-router", &router_args, Some(&router), router_env)
                .await?;
        Ok(Self {
            control,
            router,
            router_metrics,
            _control: control_daemon,
            _router: router_daemon,
        })
    }
}
