//! A cellmail cell: one independent unit of sending capacity with its own queue, state and
//! mailer. A tenant placed here is accepted, queued and delivered here only.
//!
//! - [`api`]: the `Cell` gRPC service, one module per caller: routers, the control plane
//!   (moves, offboarding, health reports), other cells (forwarded feedback).
//! - [`access`]: which of the platform's roles may call each `Cell` method.
//! - [`accept`]: the accept path (fencing, validation, idempotency, durable enqueue).
//! - [`durable`]: the accept's durable step, one per kind of queue, chosen at start.
//! - [`breaker`]: per tenant and class breakers: trip on bounce or complaint rates (or when
//!   the transport pauses the tenant), hold, release on resume.
//! - [`fencing`]: the pure epoch check that refuses sends for tenants placed elsewhere.
//! - [`feedback`]: SES event records (and the file sink's simulated ones) -> attributed
//!   feedback, and which addresses it suppresses.
//! - [`validation`]: `SendRequest` -> [`message::Message`], naming the bad field.
//! - [`message`]: the queued message and the answer given for it.
//! - [`queue`]: the `Queue` trait (SQS semantics) and its implementations.
//! - [`mailer`]: the `Mailer` trait, MIME rendering and its implementations.
//! - [`aws`]: per-cell AWS settings (region, endpoint, profile) for the SQS queue and the SES
//!   mailer, so two cells can use two accounts or regions.
//! - [`store`]: the cell's durable state (idempotency window, delivery outcomes, the
//!   embedded queue's table).
//! - [`commit`]: group commit, shared by the embedded queue and the store.
//! - [`directory`]: what delivery reads of the tenants (pauses, weights, identities).
//! - [`worker`]: delivery workers: intake from the queues, parking, sending, settling.
//! - [`reconcile`]: the transport's own view of who may send, asked again every few minutes.
//! - [`lanes`]: the pure send order: per-tenant lanes, transactional first, tenants in turn
//!   by their tier's weight.
//! - [`telemetry`]: per-tenant metrics for the busiest tenants only.
//! - [`health`]: the cell's own figures over its last minutes, for rollout health gates.

pub mod accept;
pub mod access;
pub mod api;
pub mod aws;
pub mod breaker;
pub mod commit;
pub mod directory;
pub mod durable;
pub mod engagement;
pub mod feedback;
pub mod fencing;
pub mod health;
pub mod lanes;
pub mod mailer;
pub mod message;
pub mod queue;
pub mod reconcile;
pub mod store;
pub mod telemetry;
pub mod validation;
pub mod webhooks;
pub mod worker;

use std::net::SocketAddr;
use std::path::Path;
use std::sync::Arc;
use std::time::Duration;

use anyhow::Context;
use cellmail_proto::CellId;
use cellmail_proto::server::Peers;
use cellmail_proto::tls::Tls;
use cellmail_proto::v1::cell_server::{CellServer, SERVICE_NAME};
use cellmail_registry::catalog::WatchedCatalog;
use cellmail_registry::channels::CellChannels;
use cellmail_registry::schema::{self, CellRecord, CellState, Keys};
use cellmail_registry::{LeaseId, Registry, keep_lease_alive};
use tokio::net::TcpListener;
use tokio_util::sync::CancellationToken;

/// How a cell is started, from flags or env.
#[derive(Debug, Clone, clap::Args)]
pub struct CellConfig {
    #[arg(long = "cell-id", env = "CELLMAIL_CELL_ID")]
    pub id: CellId,
    /// Address the Cell gRPC API listens on (port 0: any free port).
    #[arg(
        long = "cell-addr",
        env = "CELLMAIL_CELL_ADDR",
        default_value = "127.0.0.1:0"
    )]
    pub addr: SocketAddr,
    /// `host:port` routers and the control plane reach the cell at, when it is not the bound
    /// address (a pod's IP or DNS name behind `--cell-addr 0.0.0.0:...`).
    #[arg(long = "cell-advertise-addr", env = "CELLMAIL_CELL_ADVERTISE_ADDR")]
    pub advertise: Option<String>,
    /// How many tenants the cell is sized for (used by placement when it first registers).
    #[arg(
        long = "cell-capacity",
        env = "CELLMAIL_CELL_CAPACITY",
        default_value_t = 1000
    )]
    pub capacity: u32,
    /// Delivery workers: how many messages the cell sends at once.
    #[arg(
        long = "cell-workers",
        env = "CELLMAIL_CELL_WORKERS",
        default_value_t = DEFAULT_WORKERS
    )]
    pub workers: usize,
    /// How many of the busiest tenants get metric series of their own.
    #[arg(
        long = "metrics-top-tenants",
        env = "CELLMAIL_METRICS_TOP_TENANTS",
        default_value_t = 10
    )]
    pub top_tenants: usize,
    /// The release this process runs, as the deployer names it (an image tag, a release
    /// directory); recorded in the registry, where rollouts wait for it. The build's own
    /// version when unset.
    #[arg(long = "release", env = "CELLMAIL_RELEASE")]
    pub release: Option<String>,
    /// Fault injection for game days and rollout drills: this share (0 to 1) of delivery
    /// attempts fails, retryably, before it reaches the mailer.
    #[arg(
        long = "fault-send-failure-ratio",
        env = "CELLMAIL_FAULT_SEND_FAILURE_RATIO",
        default_value_t = 0.0
    )]
    pub fault_send_failure_ratio: f64,
    /// The keys that open the tenants' domains' DKIM keys, as the control plane's.
    #[command(flatten)]
    pub dkim: cellmail_registry::dkim::DkimKeyFile,
    #[command(flatten)]
    pub webhooks: webhooks::WebhookConfig,
    #[command(flatten)]
    pub engagement: engagement::EngagementConfig,
}

impl CellConfig {
    /// The release recorded for this process.
    pub fn release(&self) -> &str {
        self.release.as_deref().unwrap_or(cellmail_proto::VERSION)
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum QueueBackend {
    /// A durable local queue in the cell's data dir.
    Embedded,
    Sqs,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum MailerBackend {
    /// The file sink (one .eml per message) with SES's mailbox simulator.
    File,
    Ses,
}

/// Which queue and mailer a cell uses, from flags or env.
#[derive(Debug, Clone, clap::Args)]
pub struct BackendConfig {
    #[arg(long, env = "CELLMAIL_QUEUE", value_enum, default_value = "embedded")]
    pub queue: QueueBackend,
    #[arg(long, env = "CELLMAIL_MAILER", value_enum, default_value = "file")]
    pub mailer: MailerBackend,
    /// Prefix of the cell's SQS queue names, `<prefix><cell>-transactional` etc.
    #[arg(long, env = "CELLMAIL_SQS_QUEUE_PREFIX", default_value = "cellmail-")]
    pub sqs_queue_prefix: String,
    #[command(flatten)]
    pub aws: aws::AwsSettings,
    #[command(flatten)]
    pub ses: mailer::ses::SesSettings,
}

/// The cell's store and IO backends.
pub struct Backends {
    pub store: Arc<store::Store>,
    pub queue: Arc<dyn queue::Queue>,
    /// How an accept becomes durable with this queue.
    pub durable: Arc<dyn durable::Durable>,
    pub mailer: Arc<dyn mailer::Mailer>,
}

/// The cell's store, `store.redb` in `cell_dir`.
fn open_store(cell_dir: &Path) -> anyhow::Result<Arc<store::Store>> {
    std::fs::create_dir_all(cell_dir)
        .with_context(|| format!("creating {}", cell_dir.display()))?;
    Ok(Arc::new(store::Store::open(&cell_dir.join("store.redb"))?))
}

/// The embedded queue in `store`, and the accept's step that commits to both at once.
fn local_queue(
    store: &Arc<store::Store>,
) -> anyhow::Result<(Arc<dyn queue::Queue>, Arc<dyn durable::Durable>)> {
    let config = queue::QueueConfig::default();
    let queue = Arc::new(queue::local::LocalQueue::open(store.clone(), config)?);
    let durable = durable::Embedded::new(store.clone(), queue.clone());
    Ok((queue, Arc::new(durable)))
}

fn file_sink(mail_root: &Path, queue: &Arc<dyn queue::Queue>) -> Arc<dyn mailer::Mailer> {
    Arc::new(mailer::file::FileSink::new(
        mail_root.to_owned(),
        queue.clone(),
    ))
}

impl BackendConfig {
    /// Opens the store of cell `id` (in `cell_dir`) and the configured backends: its own
    /// queues (in the store, or SQS) and a mailer (the file sink writing under `mail_root`,
    /// or SES).
    pub async fn open(
        &self,
        id: &CellId,
        cell_dir: &Path,
        mail_root: &Path,
    ) -> anyhow::Result<Backends> {
        let store = open_store(cell_dir)?;
        let uses_aws = self.queue == QueueBackend::Sqs || self.mailer == MailerBackend::Ses;
        let aws = if uses_aws {
            Some(self.aws.sdk_config().await)
        } else {
            None
        };
        let sqs = match (&aws, self.queue) {
            (Some(config), QueueBackend::Sqs) => {
                let names = queue::sqs::SqsQueueNames::for_cell(&self.sqs_queue_prefix, id);
                let sqs = queue::sqs::SqsQueue::open(config, names, queue::QueueConfig::default());
                Some(Arc::new(sqs.await?))
            }
            _ => None,
        };
        let (queue, durable) = match &sqs {
            Some(sqs) => {
                let queue: Arc<dyn queue::Queue> = sqs.clone();
                let durable: Arc<dyn durable::Durable> =
                    Arc::new(durable::External::new(store.clone(), queue.clone()));
                (queue, durable)
            }
            None => local_queue(&store)?,
        };
        let mailer: Arc<dyn mailer::Mailer> = match (&aws, self.mailer) {
            (Some(config), MailerBackend::Ses) => {
                let prefix = &self.ses.configuration_set_prefix;
                let events_topic = match &sqs {
                    Some(sqs) => Some(mailer::route::open(config, prefix, id, sqs).await?),
                    None => {
                        tracing::warn!(cell = %id, "SES events reach a cell through its SQS feedback queue; with the embedded queue this cell gets none");
                        None
                    }
                };
                let settings = self.ses.clone();
                Arc::new(mailer::ses::SesMailer::new(config, settings, events_topic))
            }
            _ => file_sink(mail_root, &queue),
        };
        Ok(Backends {
            store,
            queue,
            durable,
            mailer,
        })
    }
}

impl Backends {
    /// The store in `cell_dir` with the embedded queue, and the file sink writing under
    /// `mail_root`.
    pub fn embedded(cell_dir: &Path, mail_root: &Path) -> anyhow::Result<Self> {
        let store = open_store(cell_dir)?;
        let (queue, durable) = local_queue(&store)?;
        let mailer = file_sink(mail_root, &queue);
        Ok(Self {
            store,
            queue,
            durable,
            mailer,
        })
    }
}

/// Delivery workers a cell runs unless told otherwise. A sender waits for its mailer (SES: a
/// network round trip) and then for its outcome's fsync; with four, a neighbour's burst of a
/// few hundred messages kept every sender busy long enough that another tenant's message
/// waited for one (in the noisy-neighbour bench, B's p99 under A's 10x flood was 2.2 times its
/// figure alone with four and 0.9-1.3 times with sixteen, in alternating runs).
pub const DEFAULT_WORKERS: usize = 16;

/// How long the cell's liveness key outlives a cell that stopped renewing it.
const LEASE_TTL: Duration = Duration::from_secs(10);

/// Runs a cell until `shutdown` is cancelled: registers it, serves `Cell` and delivers.
pub async fn run(
    config: CellConfig,
    registry: Arc<dyn Registry>,
    keys: Keys,
    backends: Backends,
    tls: Arc<Tls>,
    shutdown: CancellationToken,
) -> anyhow::Result<()> {
    let store = backends.store;
    let catalog = Arc::new(WatchedCatalog::start(registry.clone(), keys.clone()).await?);
    let listener = TcpListener::bind(config.addr)
        .await
        .with_context(|| format!("binding --cell-addr {}", config.addr))?;
    let endpoint = match &config.advertise {
        Some(advertised) => format!("https://{advertised}"),
        None => format!("https://{}", listener.local_addr()?),
    };
    let mailer: Arc<dyn mailer::Mailer> = if config.fault_send_failure_ratio > 0.0 {
        tracing::warn!(cell = %config.id, ratio = config.fault_send_failure_ratio, "fault injection: failing this share of delivery attempts");
        Arc::new(mailer::fault::FaultyMailer::new(
            backends.mailer,
            config.fault_send_failure_ratio,
        )?)
    } else {
        backends.mailer
    };
    let lease = register(
        registry.as_ref(),
        &keys,
        &config,
        &endpoint,
        mailer.as_ref(),
    )
    .await?;
    tracing::info!(cell = %config.id, %endpoint, release = config.release(), build = cellmail_proto::VERSION, "cell serving");
    let cell_health = Arc::new(health::Health::default());

    let keepalive = {
        let (registry, stop) = (registry.clone(), shutdown.clone());
        tokio::spawn(async move {
            keep_lease_alive(registry.as_ref(), lease, LEASE_TTL, stop.cancelled()).await
        })
    };
    let breakers = Arc::new(breaker::Breakers::new(
        config.id.clone(),
        catalog.clone(),
        registry.clone(),
        keys.clone(),
        store.clone(),
    ));
    let directory = Arc::new(directory::Directory::new(
        catalog.clone(),
        config.dkim.load()?,
        config.engagement.clone(),
    ));
    let worker = Arc::new(worker::Worker::new(
        config.id.clone(),
        store.clone(),
        backends.queue.clone(),
        mailer.clone(),
        (directory.clone(), breakers.clone()),
        cell_health.clone(),
    ));
    let reconciling = mailer.reconcile_every().map(|every| {
        let sweeps = reconcile::Reconcile {
            cell: config.id.clone(),
            mailer: mailer.clone(),
            breakers: breakers.clone(),
            directory: directory.clone(),
            worker: worker.clone(),
        };
        tokio::spawn(sweeps.run(every, shutdown.clone()))
    });
    let ingest = Arc::new(feedback::Ingest::new(
        config.id.clone(),
        store.clone(),
        backends.queue.clone(),
        breakers,
        catalog.clone(),
        cell_health.clone(),
        CellChannels::new(tls.clone()),
    ));
    let ingesting = tokio::spawn(ingest.clone().run(shutdown.clone()));
    let poster = Arc::new(webhooks::Poster::new(config.webhooks.guard())?);
    let dispatching = {
        let dispatcher = webhooks::Dispatcher::new(
            config.id.to_string(),
            store.clone(),
            poster.clone(),
            &config.webhooks,
        );
        tokio::spawn(Arc::new(dispatcher).run(shutdown.clone()))
    };
    // No workers: accept and queue only (intake too stays off, so nothing is taken in).
    let mut workers: Vec<_> = (0..config.workers)
        .map(|_| tokio::spawn(worker.clone().run(shutdown.clone())))
        .collect();
    if config.workers > 0 {
        workers.push(tokio::spawn(worker.clone().intake(shutdown.clone())));
    }

    let health = tonic_health::server::HealthReporter::new();
    let reporter = {
        let (catalog, health, shutdown) = (catalog.clone(), health.clone(), shutdown.clone());
        let component = config.id.to_string();
        tokio::spawn(async move { catalog.report_staleness(component, health, shutdown).await })
    };
    let top = Arc::new(telemetry::TopTenants::new(config.top_tenants));
    let publish = tokio::spawn(top.clone().publish(config.id.clone(), shutdown.clone()));
    let acceptor = Arc::new(accept::Acceptor::new(
        config.id.clone(),
        catalog.clone(),
        store.clone(),
        backends.durable,
        top,
    ));
    let api = api::CellApi {
        cell: config.id.clone(),
        acceptor,
        store,
        catalog,
        directory,
        mailer,
        ingest,
        health: cell_health,
        release: config.release().to_owned(),
        poster,
    };
    // A message of up to SES's size, and a router's over-size refusal of one is its own.
    let api = CellServer::new(api).max_decoding_message_size(cellmail_proto::size::decode_limit(
        cellmail_proto::size::SES_MESSAGE_BYTES,
    ));
    let routes = tonic::service::Routes::new(access::Authorize(api));

    let served = Peers::Internal
        .serve(
            tls.incoming(listener, shutdown.clone()),
            routes,
            &health,
            &[SERVICE_NAME],
            shutdown.clone(),
        )
        .await;
    shutdown.cancel();
    reporter.await?;
    for worker in workers {
        worker.await?;
    }
    ingesting.await?;
    dispatching.await?;
    publish.await?;
    if let Some(reconciling) = reconciling {
        reconciling.await?;
    }

    keepalive.await??;
    registry.revoke_lease(lease).await?;
    served?;
    Ok(())
}

/// Records the cell's endpoint, release, build and SES region (keeping its operator-set state,
/// capacity and labels) and its liveness key on a fresh lease.
async fn register(
    registry: &dyn Registry,
    keys: &Keys,
    config: &CellConfig,
    endpoint: &str,
    mailer: &dyn mailer::Mailer,
) -> anyhow::Result<LeaseId> {
    let key = keys.cell(&config.id);
    loop {
        let current = registry.get(&key).await?;
        let (mod_revision, mut record) = match &current {
            Some(kv) => (
                kv.mod_revision,
                schema::decode::<CellRecord>(&kv.value).context("reading this cell's record")?,
            ),
            None => (
                0,
                CellRecord {
                    endpoint: "".into(),
                    capacity: config.capacity,
                    state: CellState::Active,
                    labels: Default::default(),
                    version: String::new(),
                    build: String::new(),
                    ses_region: None,
                },
            ),
        };
        record.endpoint = endpoint.into();
        record.ses_region = mailer.ses_region();
        record.version = config.release().to_owned();
        record.build = cellmail_proto::VERSION.to_owned();
        if registry
            .compare_and_swap(&key, mod_revision, schema::encode(&record))
            .await?
            .is_some()
        {
            break;
        }
    }
    let lease = registry.grant_lease(LEASE_TTL).await?;
    registry
        .put(&keys.alive(&config.id), Vec::new(), Some(lease))
        .await?;
    Ok(lease)
}
