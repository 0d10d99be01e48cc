//! `cellmail up`: the whole platform in one process — the registry, N cells (each with its
//! own queues and store), the control plane and a router — until Ctrl-C. On embedded
//! defaults with no flags (embedded registry and queues, the file sink); `--registry
//! etcd://…`, `--queue sqs` and `--mailer ses` run the same on etcd, SQS and SES. Calls
//! between the components are mutual TLS, with certificates from a CA `up` keeps in
//! `<data-dir>/tls` (made on the first run, the certificates issued again at each start).

use std::net::SocketAddr;
use std::path::PathBuf;
use std::time::{Duration, Instant};

use anyhow::Context;
use cellmail_proto::CellId;
use cellmail_proto::tls::{Role, Tls, ca::LocalCa};
use cellmail_registry::Registry;
use tokio::net::TcpListener;
use tokio::task::JoinSet;
use tokio_util::sync::CancellationToken;

#[derive(clap::Args)]
pub struct UpArgs {
    #[command(flatten)]
    registry: cellmail_registry::config::RegistryConfig,
    #[command(flatten)]
    backends: cellmail_cell::BackendConfig,
    #[command(flatten)]
    metrics: cellmail_proto::server::MetricsConfig,
    #[command(flatten)]
    sends: cellmail_router::SendConfig,
    /// The certificate of both front doors (router and control plane).
    #[command(flatten)]
    public: cellmail_proto::tls::PublicTls,
    /// Where every component keeps its state; mail lands in <data-dir>/mail/<tenant>/.
    #[arg(long, env = "CELLMAIL_DATA_DIR", default_value = ".cellmail")]
    data_dir: PathBuf,
    /// How many cells to run.
    #[arg(long, default_value_t = 2, value_parser = clap::value_parser!(u16).range(1..=64))]
    cells: u16,
    /// Delivery workers per cell (0: accept and queue only, deliver nothing, e.g. to hold
    /// mail during maintenance; queued mail is delivered by the next run with workers).
    #[arg(long, env = "CELLMAIL_CELL_WORKERS", default_value_t = cellmail_cell::DEFAULT_WORKERS)]
    cell_workers: usize,
    /// Address of the Sender API.
    #[arg(long, env = "CELLMAIL_ROUTER_ADDR", default_value = "127.0.0.1:50051")]
    router_addr: SocketAddr,
    /// Address of the Control API.
    #[arg(long, env = "CELLMAIL_CONTROL_ADDR", default_value = "127.0.0.1:50052")]
    control_addr: SocketAddr,
    /// Address of the tracking host (open pixels, tracked links, unsubscribe URLs), which
    /// the links in the mail `up` writes point at.
    #[arg(
        long,
        env = "CELLMAIL_TRACKING_ADDR",
        default_value = "127.0.0.1:50080"
    )]
    tracking_addr: SocketAddr,
    /// The DNS server `cellmail tenant domain verify` asks (`ip:port`); default: the system's.
    #[arg(long, env = "CELLMAIL_DNS_RESOLVER")]
    dns_resolver: Option<SocketAddr>,
    /// Default: `<data-dir>/dkim-keys`, made on the first run.
    #[command(flatten)]
    dkim: cellmail_registry::dkim::DkimKeyFile,
    /// Loopback is always allowed, over plain http:// too: a developer's receiver runs there.
    #[command(flatten)]
    webhooks: cellmail_cell::webhooks::WebhookConfig,
}

/// Where `up` keeps the key that seals domains' DKIM keys, made on the first run.
pub const DKIM_KEY_FILE: &str = "dkim-keys";

const CELLS_READY: Duration = Duration::from_secs(15);
/// How long the certificates `up` issues at each start are valid.
const CERT_VALIDITY: Duration = Duration::from_secs(365 * 24 * 3600);
/// Where `up` keeps the operators' credential, created on the first run.
pub const ADMIN_TOKEN_FILE: &str = "admin-token";

/// The admin token in `data_dir`, created (readable by this user only) if missing.
fn admin_token(data_dir: &std::path::Path) -> anyhow::Result<String> {
    use std::io::Write;
    use std::os::unix::fs::OpenOptionsExt;
    let path = data_dir.join(ADMIN_TOKEN_FILE);
    if let Ok(token) = std::fs::read_to_string(&path) {
        return Ok(token.trim().to_owned());
    }
    let token = cellmail_registry::operators::generate();
    let mut file = std::fs::OpenOptions::new()
        .write(true)
        .create_new(true)
        .mode(0o600)
        .open(&path)
        .with_context(|| format!("creating {}", path.display()))?;
    file.write_all(token.as_bytes())?;
    file.sync_all()?;
    Ok(token)
}

pub async fn run(args: UpArgs) -> anyhow::Result<()> {
    let (router_tls, control_tls) = (
        args.public.open(args.router_addr)?,
        args.public.open(args.control_addr)?,
    );
    args.metrics.serve()?;
    std::fs::create_dir_all(&args.data_dir)
        .with_context(|| format!("creating {}", args.data_dir.display()))?;
    let registry = args.registry.open(&args.data_dir).await?;
    let keys = args.registry.keys();
    let shutdown = CancellationToken::new();
    tokio::spawn(cellmail_proto::server::stop_on_signal(shutdown.clone()));
    // Bind first, so a port in use fails before anything starts.
    let router = TcpListener::bind(args.router_addr)
        .await
        .with_context(|| format!("binding --router-addr {}", args.router_addr))?;
    let control = TcpListener::bind(args.control_addr)
        .await
        .with_context(|| format!("binding --control-addr {}", args.control_addr))?;
    let tracking = TcpListener::bind(args.tracking_addr)
        .await
        .with_context(|| format!("binding --tracking-addr {}", args.tracking_addr))?;
    let (router_addr, control_addr) = (router.local_addr()?, control.local_addr()?);
    let tracking_addr = tracking.local_addr()?;
    let engagement = cellmail_cell::engagement::EngagementConfig {
        base_url: Some(format!("http://{tracking_addr}")),
        mailto: None,
    };
    let ca = LocalCa::open_or_create(&args.data_dir.join("tls"))?;
    let tls = |role: Role| -> anyhow::Result<_> { Ok(Tls::load(ca.issue(&role, CERT_VALIDITY)?)?) };

    // The control plane seals domains' DKIM keys with it, the cells open them.
    let dkim = match &args.dkim.path {
        Some(path) => path.clone(),
        None => {
            let path = args.data_dir.join(DKIM_KEY_FILE);
            cellmail_registry::dkim::DkimKeyFile::create_if_missing(&path)?;
            path
        }
    };
    let dkim = cellmail_registry::dkim::DkimKeyFile { path: Some(dkim) };

    let mut tasks = JoinSet::new();
    let mail = args.data_dir.join("mail");
    let mut alive_keys = Vec::new();
    for n in 1..=args.cells {
        let id = CellId::new(format!("cell-{n}"))?;
        let dir = args.data_dir.join("cells").join(id.as_str());
        let backends = args.backends.open(&id, &dir, &mail).await?;
        alive_keys.push(keys.alive(&id));
        let config = cellmail_cell::CellConfig {
            id: id.clone(),
            addr: "127.0.0.1:0".parse()?,
            advertise: None,
            capacity: 1000,
            workers: args.cell_workers,
            top_tenants: 10,
            release: None,
            fault_send_failure_ratio: 0.0,
            dkim: dkim.clone(),
            webhooks: args.webhooks.with_loopback(),
            engagement: engagement.clone(),
        };
        let (registry, keys, shutdown) = (registry.clone(), keys.clone(), shutdown.clone());
        let tls = tls(Role::Cell(id.clone()))?;
        tasks.spawn(async move {
            cellmail_cell::run(config, registry, keys, backends, tls, shutdown)
                .await
                .with_context(|| format!("cell {id}"))
        });
    }
    wait_for_cells(registry.as_ref(), &alive_keys, &mut tasks).await?;
    let admin_token = admin_token(&args.data_dir)?;
    {
        let (registry, keys, shutdown) = (registry.clone(), keys.clone(), shutdown.clone());
        // On one machine a new tenant's domains are taken as verified; added ones are checked.
        let setup = cellmail_control::Setup {
            admin_token,
            identities: cellmail_control::identity::IdentityConfig {
                dns_resolver: args.dns_resolver,
                trust_new_domains: true,
                dkim,
            },
            deployer: None,
            tls: tls(Role::Control)?,
            public: control_tls,
        };
        tasks.spawn(cellmail_control::serve(
            control, registry, keys, setup, shutdown,
        ));
    }
    tasks.spawn(cellmail_router::serve(
        (router, Some(tracking)),
        registry,
        keys,
        args.sends,
        (tls(Role::Router)?, router_tls),
        shutdown.clone(),
    ));

    println!(
        "cellmail is up on embedded defaults (data in {})",
        args.data_dir.display()
    );
    println!("router: {router_addr}  (cellmail.v1.Sender)");
    println!("control: {control_addr}  (cellmail.v1.Control)");
    println!("tracking: {tracking_addr}  (open pixels, tracked links, unsubscribe)");
    println!(
        "admin token: {}  (the cellmail CLI reads it from there with --data-dir {} or \
         CELLMAIL_DATA_DIR)",
        args.data_dir.join(ADMIN_TOKEN_FILE).display(),
        args.data_dir.display()
    );
    println!("cells: {}", args.cells);
    println!("mail: {}/<tenant>/<message id>.eml", mail.display());
    println!("ready; Ctrl-C stops");

    let mut outcome = Ok(());
    while let Some(joined) = tasks.join_next().await {
        if let Err(err) = joined.context("a component panicked").and_then(|r| r) {
            if outcome.is_ok() {
                tracing::error!(error = format!("{err:#}"), "a component failed; stopping");
                outcome = Err(err);
            }
            shutdown.cancel();
        }
    }
    outcome
}

/// Waits until every cell's liveness key is registered, so tenants can be placed at once.
async fn wait_for_cells(
    registry: &dyn Registry,
    alive_keys: &[String],
    tasks: &mut JoinSet<anyhow::Result<()>>,
) -> anyhow::Result<()> {
    let started = Instant::now();
    for key in alive_keys {
        while registry.get(key).await?.is_none() {
            if let Some(joined) = tasks.try_join_next() {
                joined.context("a cell panicked while starting")??;
            }
            anyhow::ensure!(
                started.elapsed() < CELLS_READY,
                "cells did not register within {CELLS_READY:?}"
            );
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }
    Ok(())
}
