//! cellmail's control plane: what operators do with the shared state in
//! `cellmail-registry`, and the Control gRPC service they do it through.
//!
//! - [`leader`]: running work on one control plane at a time, through registry elections.
//! - [`telemetry`]: control actions counted by action and outcome.
//! - [`placement`]: the pure choice of a cell for a new tenant.
//! - [`registered`]: the registered cells, read from the registry now.
//! - `records`: single records and prefixes read straight from the registry.
//! - [`api`]: the `Control` gRPC service, one file per resource.
//! - [`auth`]: the operator credential every `Control` call must carry, and its role.
//! - [`identity`]: the DNS records of a tenant's sending domains, and their check.
//! - [`moves`]: moving a tenant between cells, step by persisted step.
//! - [`operations`]: evacuations and rebalances, a bounded number of moves at a time.
//! - [`offboard`]: a suspended tenant's data exported from every cell, then deleted everywhere.
//! - [`rollout`]: a version going out cell by cell, in waves gated on their health.
//! - [`deployer`]: the `Deployer` trait (how a cell is made to run a version) and its
//!   implementations.

pub mod api;
pub mod auth;
pub mod deployer;
pub mod identity;
pub mod leader;
pub mod moves;
pub mod offboard;
pub mod operations;
pub mod placement;
mod records;
pub mod registered;
pub mod rollout;
pub mod telemetry;

use std::net::SocketAddr;
use std::sync::Arc;

use cellmail_proto::server;
use cellmail_proto::tls::Tls;
use cellmail_proto::v1::control_server::{ControlServer, SERVICE_NAME};
use cellmail_registry::channels::CellChannels;
use cellmail_registry::{Registry, schema};
use tokio::net::TcpListener;
use tokio_util::sync::CancellationToken;

/// How a control plane is started, from flags or env.
#[derive(Debug, Clone, clap::Args)]
pub struct ControlConfig {
    /// Address the Control gRPC API listens on.
    #[arg(
        long = "control-addr",
        env = "CELLMAIL_CONTROL_ADDR",
        default_value = "127.0.0.1:50052"
    )]
    pub addr: SocketAddr,
    /// The operators' credential: Control calls must carry `authorization: Bearer <token>`.
    #[arg(
        long = "admin-token",
        env = "CELLMAIL_ADMIN_TOKEN",
        hide_env_values = true
    )]
    pub admin_token: String,
    #[command(flatten)]
    pub identities: identity::IdentityConfig,
    #[command(flatten)]
    pub deployer: deployer::DeployerConfig,
}
/// What a control plane is run with, beside its registry and where it listens.
pub struct Setup {
    /// The credential of the operator named `bootstrap` (an admin), with which operators
    /// add the others.
    pub admin_token: String,
    pub identities: identity::IdentityConfig,
    /// How rollouts deploy a cell (none: rollouts are refused).
    pub deployer: Option<Arc<dyn deployer::Deployer>>,
    /// This process's certificate, presented to the cells it calls.
    pub tls: Arc<Tls>,
    /// The certificate the Control API is served with (none: plaintext).
    pub public: Option<Arc<Tls>>,
}

/// How long a control plane that stopped renewing its leadership keeps it: the longest a
/// standby waits before it takes unfinished moves over.
const LEADER_TTL: std::time::Duration = std::time::Duration::from_secs(5);

/// Serves the Control API on `listener` until `shutdown` is cancelled, and carries tenant
/// moves, operations and rollouts (with the setup's deployer, if any) forward while this
/// control plane leads.
pub async fn serve(
    listener: TcpListener,
    registry: Arc<dyn Registry>,
    keys: schema::Keys,
    setup: Setup,
    shutdown: CancellationToken,
) -> anyhow::Result<()> {
    let Setup {
        admin_token,
        identities,
        deployer,
        tls,
        public,
    } = setup;
    anyhow::ensure!(
        admin_token.len() >= 16,
        "the admin token must be at least 16 characters"
    );
    let candidate = format!("{}/{}", listener.local_addr()?, ulid::Ulid::new());
    let channels = CellChannels::new(tls);
    let mover = moves::Mover::new(registry.clone(), keys.clone(), channels.clone());
    let roller = rollout::Roller::new(
        registry.clone(),
        keys.clone(),
        deployer.clone(),
        channels.clone(),
    );
    let leader = Arc::new(leader::Leading::default());
    let reporter = {
        let (leader, shutdown) = (leader.clone(), shutdown.clone());
        tokio::spawn(async move { leader.report(shutdown).await })
    };
    let leading = {
        let (registry, keys) = (registry.clone(), keys.clone());
        tokio::spawn(leader::run_as_leader(
            registry.clone(),
            keys.election(),
            candidate,
            LEADER_TTL,
            shutdown.clone(),
            leader,
            move |lost| {
                let (mover, roller) = (mover.clone(), roller.clone());
                let operations = operations::run(registry.clone(), keys.clone(), lost.clone());
                async move {
                    tokio::join!(operations, mover.run(lost.clone()), roller.run(lost));
                }
            },
        ))
    };
    cellmail_registry::operators::install_bootstrap(
        registry.as_ref(),
        &keys,
        &admin_token,
        cellmail_proto::now_ms(),
    )
    .await?;
    cellmail_registry::tracking::ensure_keys(registry.as_ref(), &keys, cellmail_proto::now_ms())
        .await?;
    let api = auth::Authenticate::new(
        ControlServer::new(api::ControlApi::new(
            registry.clone(),
            keys.clone(),
            &identities,
            deployer.is_some(),
            channels,
        )?),
        registry,
        keys,
    );
    let routes = tonic::service::Routes::new(telemetry::CountActions(api));
    let health = tonic_health::server::HealthReporter::new();
    let served = server::serve_front(
        listener,
        public,
        routes,
        &health,
        &[SERVICE_NAME],
        shutdown.clone(),
    )
    .await;
    shutdown.cancel();
    leading.await??;
    reporter.await?;
    Ok(served?)
}
