//! The operator commands: each is one call to the control plane's `Control` API, printed as
//! a table or, with `--json`, as JSON for scripts.

use anyhow::Context;
use cellmail_proto::bearer::Bearer;
use cellmail_proto::v1::{self, control_client::ControlClient};
use clap::{Args, Subcommand};
use serde_json::json;
use tonic::service::interceptor::InterceptedService;
use tonic::transport::Channel;

#[derive(Args)]
pub struct Connection {
    /// Address of the control plane.
    #[arg(
        long,
        env = "CELLMAIL_CONTROL",
        default_value = "127.0.0.1:50052",
        global = true
    )]
    control: String,
    /// The operators' credential (default: the one `cellmail up` keeps in ./.cellmail).
    #[arg(
        long,
        env = "CELLMAIL_ADMIN_TOKEN",
        hide_env_values = true,
        global = true
    )]
    admin_token: Option<String>,
    /// Print JSON instead of a table.
    #[arg(long, global = true)]
    pub(crate) json: bool,
}

pub(crate) type Client = ControlClient<InterceptedService<Channel, Bearer>>;

impl Connection {
    pub(crate) async fn client(&self) -> anyhow::Result<Client> {
        let token = match &self.admin_token {
            Some(token) => token.clone(),
            None => std::fs::read_to_string(
                std::path::Path::new(".cellmail").join(crate::up::ADMIN_TOKEN_FILE),
            )
            .map(|t| t.trim().to_owned())
            .map_err(|_| {
                anyhow::anyhow!("no admin token: pass --admin-token or set CELLMAIL_ADMIN_TOKEN")
            })?,
        };
        let bearer = Bearer::new(&token)?;
        let url = if self.control.contains("://") {
            self.control.clone()
        } else {
            format!("http://{}", self.control)
        };
        let channel = Channel::from_shared(url.clone())?
            .connect()
            .await
            .map_err(|e| anyhow::anyhow!("cannot reach the control plane at {url}: {e}"))?;
        Ok(ControlClient::with_interceptor(channel, bearer))
    }
}
/// A request that names the operator acting (the login name) for the audit trail.
pub(crate) fn acting<T>(message: T) -> tonic::Request<T> {
    let mut request = tonic::Request::new(message);
    let name = std::env::var("USER").unwrap_or_default();
    if let Ok(value) = name.parse() {
        request.metadata_mut().insert("x-cellmail-actor", value);
    }
    request
}

pub(crate) fn status(err: tonic::Status) -> anyhow::Error {
    anyhow::anyhow!("{:?}: {}", err.code(), err.message())
}

#[derive(Args)]
pub struct TenantArgs {
    #[command(subcommand)]
    command: TenantCommand,
    #[command(flatten)]
    connection: Connection,
}

#[derive(Subcommand)]
enum TenantCommand {
    /// Create a tenant, place it on a cell and issue its first API key.
    Create {
        id: String,
        /// A domain the tenant sends from (repeatable).
        #[arg(long = "domain", required = true)]
        domains: Vec<String>,
        /// standard | premium
        #[arg(long, default_value = "standard")]
        tier: String,
        #[command(flatten)]
        policy: PolicyArgs,
        /// Pin the tenant to this cell.
        #[arg(long)]
        cell: Option<String>,
        /// A label key=value its cell must carry (repeatable).
        #[arg(long = "label", value_parser = parse_label)]
        labels: Vec<(String, String)>,
        /// Why, for the audit trail.
        #[arg(long, default_value = "")]
        reason: String,
    },
    /// List tenants with their cell, placement epoch and paused classes.
    List,
    /// A tenant's sending domains: add one (prints the DNS records to publish), verify it.
    Domain {
        #[command(subcommand)]
        command: DomainCommand,
    },
    /// Refuse the tenant's sends until it is resumed.
    Suspend {
        tenant: String,
        /// Why, for the audit trail.
        #[arg(long, default_value = "")]
        reason: String,
    },
    /// Let the tenant send again: lift a suspension and reset its tripped breakers (their
    /// held mail is queued again).
    Resume {
        tenant: String,
        /// Reset only this class's breaker: transactional | marketing.
        #[arg(long, default_value = "")]
        class: String,
        /// Why, for the audit trail.
        #[arg(long, default_value = "")]
        reason: String,
    },
    /// Move the tenant to another cell: nothing lost, nothing sent twice, a short pause for
    /// this tenant only. Prints the move; with --wait, once it is complete or rolled back.
    Move {
        tenant: String,
        #[arg(long)]
        to: String,
        /// Wait until the old cell has delivered the tenant's backlog (or the move rolled back).
        #[arg(long)]
        wait: bool,
        /// Why, for the audit trail.
        #[arg(long, default_value = "")]
        reason: String,
    },
    /// Take the tenant off the platform: suspend it, wait until its mail is delivered, write
    /// everything the cells keep of it (suppressions, messages and their events, figures) to
    /// a JSON file, then delete it everywhere.
    Offboard {
        tenant: String,
        /// The file the tenant's data is written to (it must not exist yet).
        #[arg(long)]
        export: std::path::PathBuf,
        /// How long to wait for its cell to deliver what it had accepted.
        #[arg(long, default_value_t = 300)]
        drain_timeout_secs: u64,
        /// Why, for the audit trail.
        #[arg(long, default_value = "")]
        reason: String,
    },
}

/// What `tenant offboard` writes: every part the cells exported, merged.
fn export_json(tenant: &str, parts: &[v1::TenantData]) -> serde_json::Value {
    let class =
        |wire: i32| v1::MessageClass::try_from(wire).map_or("UNSPECIFIED", |c| c.as_str_name());
    let mut stats = Vec::new();
    let (mut suppressions, mut messages) = (Vec::new(), Vec::new());
    for part in parts {
        for s in &part.stats {
            stats.push(json!({
                "cell": part.cell, "class": class(s.message_class), "accepted": s.accepted,
                "sent": s.sent, "delivered": s.delivered, "bounced": s.bounced,
                "complained": s.complained, "suppressed": s.suppressed, "rejected": s.rejected,
            }));
        }
        suppressions.extend(part.suppressions.iter().map(suppression_json));
        for m in &part.messages {
            let events: Vec<_> = m
                .events
                .iter()
                .map(|e| json!({"type": e.r#type, "at_ms": e.at_ms, "recipient": e.recipient, "detail": e.detail}))
                .collect();
            let recipients: Vec<_> = m.recipients.iter().map(|r| &r.address).collect();
            messages.push(json!({
                "cell": part.cell, "message_id": m.message_id, "class": class(m.message_class),
                "state": m.state, "accepted_at_ms": m.accepted_at_ms, "recipients": recipients,
                "events": events,
            }));
        }
    }
    json!({"tenant": tenant, "stats": stats, "suppressions": suppressions, "messages": messages})
}

/// How often `tenant offboard` asks whether the tenant's mail is delivered.
const DRAIN_POLL: std::time::Duration = std::time::Duration::from_millis(500);

fn move_json(m: &v1::MoveInfo) -> serde_json::Value {
    json!({
        "id": m.id, "tenant": m.tenant_id, "from": m.from_cell, "to": m.to_cell,
        "from_epoch": m.from_epoch, "state": m.state, "detail": m.detail,
        "started_at_ms": m.started_at_ms, "updated_at_ms": m.updated_at_ms,
        "freeze_ms": m.freeze_ms, "actor": m.actor, "reason": m.reason,
    })
}

/// How often `tenant move --wait` asks how the move is going.
const MOVE_POLL: std::time::Duration = std::time::Duration::from_millis(100);

#[derive(Subcommand)]
enum DomainCommand {
    /// Add a domain: prints the records to publish (ownership TXT, DKIM CNAMEs, SPF, DMARC).
    Add { tenant: String, domain: String },
    /// Check the domain's records in DNS; once all are there the tenant may send from it.
    Verify { tenant: String, domain: String },
}

fn domain_json(info: &v1::DomainInfo) -> serde_json::Value {
    let records: Vec<_> = info
        .records
        .iter()
        .map(|r| {
            json!({"purpose": r.purpose, "type": r.r#type, "name": r.name, "value": r.value,
                   "problem": r.problem})
        })
        .collect();
    json!({"domain": info.domain, "verified": info.verified, "records": records})
}

fn print_domain(info: &v1::DomainInfo, as_json: bool) {
    if as_json {
        println!("{}", domain_json(info));
        return;
    }
    let state = if info.verified {
        "verified"
    } else {
        "NOT verified"
    };
    println!("{}: {state}; publish these records:", info.domain);
    for r in &info.records {
        let problem = if r.problem.is_empty() {
            String::new()
        } else {
            format!("   <- {}", r.problem)
        };
        println!(
            "  {:<10} {:<6} {} {}{problem}",
            r.purpose, r.r#type, r.name, r.value
        );
    }
}

/// A tenant's limits; 0 keeps the default.
#[derive(Args)]
struct PolicyArgs {
    /// Sends per second each router admits for the tenant (default 100).
    #[arg(long, default_value_t = 0)]
    rate: u32,
    /// Sends admitted at once above the rate (default twice the rate).
    #[arg(long, default_value_t = 0)]
    burst: u32,
    /// Messages accepted per UTC day (default: no cap).
    #[arg(long, default_value_t = 0)]
    daily_cap: u64,
    /// Breaker: permanent bounces per 10,000 sent recipients that pause a class (default 500).
    #[arg(long, default_value_t = 0)]
    bounce_rate_bps: u32,
    /// Breaker: complaints per 10,000 sent recipients that pause a class (default 10).
    #[arg(long, default_value_t = 0)]
    complaint_rate_bps: u32,
    /// Breaker: recipients sent in the window before it may trip (default 100).
    #[arg(long, default_value_t = 0)]
    breaker_min_volume: u32,
    /// Breaker: the rolling window in minutes (default 60).
    #[arg(long, default_value_t = 0)]
    breaker_window_minutes: u32,
}

impl From<PolicyArgs> for v1::TenantPolicy {
    fn from(p: PolicyArgs) -> Self {
        v1::TenantPolicy {
            rate_per_second: p.rate,
            burst: p.burst,
            daily_cap: p.daily_cap,
            bounce_rate_bps: p.bounce_rate_bps,
            complaint_rate_bps: p.complaint_rate_bps,
            breaker_min_volume: p.breaker_min_volume,
            breaker_window_minutes: p.breaker_window_minutes,
        }
    }
}

#[derive(Args)]
pub struct AuditArgs {
    /// Only this tenant's entries.
    #[arg(long)]
    tenant: Option<String>,
    /// The newest this many entries.
    #[arg(long, default_value_t = 100)]
    limit: u32,
    #[command(flatten)]
    connection: Connection,
}

pub async fn audit(args: AuditArgs) -> anyhow::Result<()> {
    let mut client = args.connection.client().await?;
    let request = v1::ListAuditRequest {
        tenant_id: args.tenant.unwrap_or_default(),
        limit: args.limit,
    };
    let entries = client
        .list_audit(request)
        .await
        .map_err(status)?
        .into_inner()
        .entries;
    let parsed = |text: &str| serde_json::from_str::<serde_json::Value>(text).ok();
    let rows: Vec<_> = entries
        .iter()
        .map(|e| {
            json!({
                "at_ms": e.at_ms, "actor": e.actor, "action": e.action, "tenant": e.tenant_id,
                "reason": e.reason, "before": parsed(&e.before_json), "after": parsed(&e.after_json),
            })
        })
        .collect();
    if args.connection.json {
        println!("{}", json!(rows));
    } else {
        println!(
            "{:<15} {:<20} {:<26} {:<16} REASON",
            "AT_MS", "ACTOR", "ACTION", "TENANT"
        );
        for e in entries {
            println!(
                "{:<15} {:<20} {:<26} {:<16} {}",
                e.at_ms, e.actor, e.action, e.tenant_id, e.reason
            );
        }
    }
    Ok(())
}

#[derive(Args)]
pub struct CellArgs {
    #[command(subcommand)]
    command: CellCommand,
    #[command(flatten)]
    connection: Connection,
}

#[derive(Subcommand)]
enum CellCommand {
    /// List cells with their state, liveness and load.
    List,
    /// Register a cell ahead of its process, with its capacity and labels.
    Add {
        id: String,
        /// Tenants the cell is sized for (default 1000).
        #[arg(long, default_value_t = 0)]
        capacity: u32,
        /// A label key=value (repeatable), for placement by label.
        #[arg(long = "label", value_parser = parse_label)]
        labels: Vec<(String, String)>,
        #[arg(long, default_value = "")]
        reason: String,
    },
    /// Give the cell no new tenants (its tenants stay until moved).
    Drain {
        id: String,
        #[arg(long, default_value = "")]
        reason: String,
    },
    /// Take the cell out of placement.
    Disable {
        id: String,
        #[arg(long, default_value = "")]
        reason: String,
    },
    /// Make the cell ACTIVE again.
    Enable {
        id: String,
        #[arg(long, default_value = "")]
        reason: String,
    },
    /// Empty the cell: DRAINING, then every tenant moved to other cells, --parallel at a time.
    Evacuate {
        id: String,
        #[command(flatten)]
        operation: OperationArgs,
    },
}

/// How an evacuation or a rebalance runs.
#[derive(Args)]
struct OperationArgs {
    /// Moves under way at once (default 4).
    #[arg(long, default_value_t = 0)]
    parallel: u32,
    /// Wait until every move is done.
    #[arg(long)]
    wait: bool,
    #[arg(long, default_value = "")]
    reason: String,
}

fn planned_json(m: &v1::PlannedMoveInfo) -> serde_json::Value {
    json!({"tenant": m.tenant_id, "from": m.from_cell, "to": m.to_cell, "move_id": m.move_id,
           "outcome": m.outcome})
}

/// Prints `operation` once it is finished (`wait`) or as it is now; fails if a move did not
/// complete.
async fn follow_operation(
    client: &mut Client,
    mut operation: v1::OperationInfo,
    wait: bool,
    as_json: bool,
) -> anyhow::Result<()> {
    while wait && !operation.finished {
        tokio::time::sleep(MOVE_POLL).await;
        let request = v1::GetOperationRequest {
            id: operation.id.clone(),
        };
        operation = client
            .get_operation(request)
            .await
            .map_err(status)?
            .into_inner();
    }
    let moves: Vec<_> = operation.moves.iter().map(planned_json).collect();
    if as_json {
        let out = json!({"id": operation.id, "kind": operation.kind, "cell": operation.cell,
            "parallel": operation.parallel, "finished": operation.finished, "moves": moves});
        println!("{out}");
    } else {
        let state = if operation.finished {
            "finished"
        } else {
            "under way"
        };
        println!(
            "{} {} {}: {state}",
            operation.kind, operation.cell, operation.id
        );
        for m in &operation.moves {
            println!(
                "  {:<20} {:<12} -> {:<12} {}",
                m.tenant_id, m.from_cell, m.to_cell, m.outcome
            );
        }
    }
    let failed: Vec<_> = operation
        .moves
        .iter()
        .filter(|m| !m.outcome.is_empty() && m.outcome != "COMPLETE")
        .map(|m| format!("{}: {}", m.tenant_id, m.outcome))
        .collect();
    anyhow::ensure!(failed.is_empty(), "not moved: {}", failed.join("; "));
    Ok(())
}

#[derive(Args)]
pub struct RebalanceArgs {
    #[command(subcommand)]
    command: RebalanceCommand,
    #[command(flatten)]
    connection: Connection,
}

#[derive(Subcommand)]
enum RebalanceCommand {
    /// The moves that would even out tenants per unit of capacity (a dry run).
    Plan,
    /// Carry out a plan: the one `rebalance plan --json` saved in `--plan FILE` (refused
    /// whole if a tenant of it moved since), or without `--plan` the plan as it is now.
    Apply {
        #[arg(long, value_name = "FILE")]
        plan: Option<std::path::PathBuf>,
        #[command(flatten)]
        operation: OperationArgs,
    },
}

/// The moves of a plan `rebalance plan --json` printed, saved in `path`.
fn read_plan(path: &std::path::Path) -> anyhow::Result<Vec<v1::PlannedMoveInfo>> {
    let at = || format!("--plan {}", path.display());
    let text = std::fs::read_to_string(path).with_context(at)?;
    let plan: serde_json::Value = serde_json::from_str(&text).with_context(at)?;
    let moves = plan.as_array().with_context(|| {
        format!(
            "{}: not the JSON array `rebalance plan --json` prints",
            at()
        )
    })?;
    moves
        .iter()
        .enumerate()
        .map(|(n, m)| {
            let field = |name: &str| {
                m[name]
                    .as_str()
                    .map(str::to_owned)
                    .with_context(|| format!("{}: move {n} has no \"{name}\"", at()))
            };
            Ok(v1::PlannedMoveInfo {
                tenant_id: field("tenant")?,
                from_cell: field("from")?,
                to_cell: field("to")?,
                ..Default::default()
            })
        })
        .collect()
}

pub async fn rebalance(args: RebalanceArgs) -> anyhow::Result<()> {
    let mut client = args.connection.client().await?;
    match args.command {
        RebalanceCommand::Plan => {
            let plan = client
                .plan_rebalance(v1::PlanRebalanceRequest {})
                .await
                .map_err(status)?
                .into_inner();
            if args.connection.json {
                println!(
                    "{}",
                    json!(plan.moves.iter().map(planned_json).collect::<Vec<_>>())
                );
            } else if plan.moves.is_empty() {
                println!("balanced: no move would even the cells out further");
            } else {
                for m in &plan.moves {
                    println!("{:<20} {:<12} -> {}", m.tenant_id, m.from_cell, m.to_cell);
                }
            }
            Ok(())
        }
        RebalanceCommand::Apply { plan, operation } => {
            let moves = match plan {
                Some(path) => {
                    let moves = read_plan(&path)?;
                    if moves.is_empty() {
                        // An empty request would mean "the plan as it is now".
                        if args.connection.json {
                            println!(
                                "{}",
                                json!({"kind": "rebalance", "finished": true, "moves": []})
                            );
                        } else {
                            println!("the plan has no moves: nothing to apply");
                        }
                        return Ok(());
                    }
                    moves
                }
                None => Vec::new(),
            };
            let request = acting(v1::ApplyRebalanceRequest {
                parallel: operation.parallel,
                reason: operation.reason,
                moves,
            });
            let started = client
                .apply_rebalance(request)
                .await
                .map_err(status)?
                .into_inner();
            follow_operation(&mut client, started, operation.wait, args.connection.json).await
        }
    }
}

fn parse_label(text: &str) -> Result<(String, String), String> {
    text.split_once('=')
        .map(|(k, v)| (k.to_owned(), v.to_owned()))
        .ok_or_else(|| format!("--label {text:?}: expected key=value"))
}

fn cell_json(c: &v1::CellInfo) -> serde_json::Value {
    json!({
        "cell": c.id, "endpoint": c.endpoint, "state": c.state, "alive": c.alive,
        "capacity": c.capacity, "tenants": c.tenants, "version": c.version, "build": c.build,
    })
}

#[derive(Args)]
pub struct KeyArgs {
    #[command(subcommand)]
    command: KeyCommand,
    #[command(flatten)]
    connection: Connection,
}

#[derive(Subcommand)]
enum KeyCommand {
    /// Issue another API key for a tenant (shown once).
    Issue {
        tenant: String,
        /// Why, for the audit trail.
        #[arg(long, default_value = "")]
        reason: String,
    },
    /// List a tenant's keys (ids and creation times).
    List { tenant: String },
    /// Revoke one of a tenant's keys.
    Revoke {
        tenant: String,
        key_id: String,
        /// Why, for the audit trail.
        #[arg(long, default_value = "")]
        reason: String,
    },
}

#[derive(Args)]
pub struct SuppressionArgs {
    #[command(subcommand)]
    command: SuppressionCommand,
    #[command(flatten)]
    connection: Connection,
}

#[derive(Subcommand)]
enum SuppressionCommand {
    /// The global list (addresses no tenant's mail goes to).
    List,
    /// Suppress an address for every tenant.
    Add {
        address: String,
        /// What the entry is, as tenants' suppressed sends report it: manual | unsubscribe |
        /// bounce | complaint
        #[arg(long, default_value = "manual")]
        kind: String,
        /// Why, for the audit trail.
        #[arg(long, default_value = "")]
        reason: String,
    },
    /// Take an address off the global list.
    Remove {
        address: String,
        /// Why, for the audit trail.
        #[arg(long, default_value = "")]
        reason: String,
    },
}

fn suppression_kind(name: &str) -> anyhow::Result<i32> {
    let wire = match name {
        "manual" => v1::SuppressionReason::Manual,
        "unsubscribe" => v1::SuppressionReason::Unsubscribe,
        "bounce" => v1::SuppressionReason::Bounce,
        "complaint" => v1::SuppressionReason::Complaint,
        other => {
            anyhow::bail!("--kind {other:?}: expected manual, unsubscribe, bounce or complaint")
        }
    };
    Ok(wire as i32)
}

fn suppression_json(s: &v1::Suppression) -> serde_json::Value {
    let reason = v1::SuppressionReason::try_from(s.reason).map_or("UNKNOWN", |r| r.as_str_name());
    json!({"address": s.address, "reason": reason, "created_at_ms": s.created_at_ms})
}

pub async fn suppression(args: SuppressionArgs) -> anyhow::Result<()> {
    let mut client = args.connection.client().await?;
    match args.command {
        SuppressionCommand::List => {
            let listed = client
                .list_global_suppressions(v1::ListGlobalSuppressionsRequest {})
                .await
                .map_err(status)?
                .into_inner();
            if args.connection.json {
                println!(
                    "{}",
                    json!(
                        listed
                            .suppressions
                            .iter()
                            .map(suppression_json)
                            .collect::<Vec<_>>()
                    )
                );
            } else {
                for s in listed.suppressions {
                    println!("{}", suppression_json(&s));
                }
            }
        }
        SuppressionCommand::Add {
            address,
            kind,
            reason,
        } => {
            let request = acting(v1::AddGlobalSuppressionRequest {
                address,
                kind: suppression_kind(&kind)?,
                reason,
            });
            let added = client
                .add_global_suppression(request)
                .await
                .map_err(status)?
                .into_inner();
            println!("{}", suppression_json(&added));
        }
        SuppressionCommand::Remove { address, reason } => {
            let request = acting(v1::RemoveGlobalSuppressionRequest { address, reason });
            let removed = client
                .remove_global_suppression(request)
                .await
                .map_err(status)?;
            println!("{}", json!({"removed": removed.into_inner().removed}));
        }
    }
    Ok(())
}

fn tenant_json(tenant: &v1::TenantInfo) -> serde_json::Value {
    let paused: Vec<_> = tenant
        .paused
        .iter()
        .map(|p| json!({"class": p.class, "detail": p.detail, "since_ms": p.since_ms}))
        .collect();
    json!({
        "tenant": tenant.id, "tier": tenant.tier, "status": tenant.status,
        "domains": tenant.domains, "cell": tenant.cell, "epoch": tenant.epoch,
        "paused": paused,
    })
}

pub async fn tenant(args: TenantArgs) -> anyhow::Result<()> {
    let mut client = args.connection.client().await?;
    match args.command {
        TenantCommand::Create {
            id,
            domains,
            tier,
            policy,
            cell,
            labels,
            reason,
        } => {
            let request = acting(v1::CreateTenantRequest {
                id,
                domains,
                tier,
                policy: Some(policy.into()),
                cell: cell.unwrap_or_default(),
                labels: labels.into_iter().collect(),
                reason,
            });
            let created = client
                .create_tenant(request)
                .await
                .map_err(status)?
                .into_inner();
            let tenant = created.tenant.unwrap_or_default();
            if args.connection.json {
                let mut out = tenant_json(&tenant);
                out["api_key"] = json!(created.api_key);
                out["key_id"] = json!(created.key_id);
                println!("{out}");
            } else {
                println!(
                    "tenant {} created on {} (epoch {})",
                    tenant.id, tenant.cell, tenant.epoch
                );
                println!("api key (shown once): {}", created.api_key);
            }
        }
        TenantCommand::List => {
            let tenants = client
                .list_tenants(v1::ListTenantsRequest {})
                .await
                .map_err(status)?
                .into_inner()
                .tenants;
            if args.connection.json {
                println!(
                    "{}",
                    json!(tenants.iter().map(tenant_json).collect::<Vec<_>>())
                );
            } else {
                println!(
                    "{:<24} {:<10} {:<10} {:<12} {:>5}  {:<28} PAUSED",
                    "TENANT", "TIER", "STATUS", "CELL", "EPOCH", "DOMAINS"
                );
                for t in tenants {
                    let paused: Vec<_> = t.paused.iter().map(|p| p.class.as_str()).collect();
                    println!(
                        "{:<24} {:<10} {:<10} {:<12} {:>5}  {:<28} {}",
                        t.id,
                        t.tier,
                        t.status,
                        t.cell,
                        t.epoch,
                        t.domains.join(","),
                        paused.join(",")
                    );
                }
            }
        }
        TenantCommand::Domain { command } => {
            let (verify, tenant, domain) = match command {
                DomainCommand::Add { tenant, domain } => (false, tenant, domain),
                DomainCommand::Verify { tenant, domain } => (true, tenant, domain),
            };
            let request = acting(v1::DomainRequest {
                tenant_id: tenant,
                domain,
            });
            let info = if verify {
                client.verify_domain(request).await
            } else {
                client.add_domain(request).await
            }
            .map_err(status)?
            .into_inner();
            print_domain(&info, args.connection.json);
            anyhow::ensure!(
                !verify || info.verified,
                "{} is not verified yet: publish the records above",
                info.domain
            );
        }
        TenantCommand::Suspend { tenant, reason } => {
            let request = acting(v1::SuspendTenantRequest {
                tenant_id: tenant,
                reason,
            });
            let tenant = client.suspend_tenant(request).await.map_err(status)?;
            println!("{}", tenant_json(&tenant.into_inner()));
        }
        TenantCommand::Resume {
            tenant,
            class,
            reason,
        } => {
            let request = acting(v1::ResumeTenantRequest {
                tenant_id: tenant,
                class,
                reason,
            });
            let resumed = client
                .resume_tenant(request)
                .await
                .map_err(status)?
                .into_inner();
            let mut out = tenant_json(&resumed.tenant.unwrap_or_default());
            out["unsuspended"] = json!(resumed.unsuspended);
            out["resumed_classes"] = json!(resumed.resumed_classes);
            println!("{out}");
        }
        TenantCommand::Offboard {
            tenant,
            export,
            drain_timeout_secs,
            reason,
        } => {
            use std::io::Write;
            // Created first, so an existing file is refused before anything changes.
            let mut file = std::fs::OpenOptions::new()
                .write(true)
                .create_new(true)
                .open(&export)
                .map_err(|e| anyhow::anyhow!("--export {}: {e}", export.display()))?;
            let suspend = acting(v1::SuspendTenantRequest {
                tenant_id: tenant.clone(),
                reason: format!("offboarding: {reason}"),
            });
            client.suspend_tenant(suspend).await.map_err(status)?;
            let deadline =
                std::time::Instant::now() + std::time::Duration::from_secs(drain_timeout_secs);
            let request = v1::TenantDataRequest {
                tenant_id: tenant.clone(),
            };
            let mut stream = loop {
                match client.export_tenant_data(request.clone()).await {
                    Ok(stream) => break stream.into_inner(),
                    Err(err)
                        if err.code() == tonic::Code::Unavailable
                            && std::time::Instant::now() < deadline =>
                    {
                        tokio::time::sleep(DRAIN_POLL).await
                    }
                    Err(err) => return Err(status(err)),
                }
            };
            let mut parts = Vec::new();
            while let Some(part) = stream.message().await.map_err(status)? {
                parts.push(part);
            }
            let exported = export_json(&tenant, &parts);
            file.write_all(exported.to_string().as_bytes())?;
            file.sync_all()?;
            let delete = acting(v1::DeleteTenantRequest {
                tenant_id: tenant.clone(),
                reason,
            });
            let deleted = client
                .delete_tenant(delete)
                .await
                .map_err(status)?
                .into_inner();
            println!(
                "{}",
                json!({
                    "tenant": tenant, "export": export.display().to_string(),
                    "suppressions": exported["suppressions"].as_array().map_or(0, Vec::len),
                    "messages": exported["messages"].as_array().map_or(0, Vec::len),
                    "erased_on": deleted.cells,
                })
            );
        }
        TenantCommand::Move {
            tenant,
            to,
            wait,
            reason,
        } => {
            let request = acting(v1::MoveTenantRequest {
                tenant_id: tenant.clone(),
                to_cell: to,
                reason,
            });
            let mut moved = client
                .move_tenant(request)
                .await
                .map_err(status)?
                .into_inner();
            let finished =
                |m: &v1::MoveInfo| matches!(m.state.as_str(), "COMPLETE" | "ROLLED_BACK");
            while wait && !finished(&moved) {
                tokio::time::sleep(MOVE_POLL).await;
                let latest = client
                    .get_move(v1::GetMoveRequest {
                        tenant_id: tenant.clone(),
                    })
                    .await
                    .map_err(status)?
                    .into_inner();
                anyhow::ensure!(
                    latest.id == moved.id,
                    "another move of {tenant} replaced this one: {}",
                    move_json(&latest)
                );
                moved = latest;
            }
            if args.connection.json {
                println!("{}", move_json(&moved));
            } else {
                println!(
                    "move {} of {}: {} -> {} {} (frozen {} ms) {}",
                    moved.id,
                    moved.tenant_id,
                    moved.from_cell,
                    moved.to_cell,
                    moved.state,
                    moved.freeze_ms,
                    moved.detail
                );
            }
            anyhow::ensure!(
                moved.state != "ROLLED_BACK",
                "the move was rolled back: {}",
                moved.detail
            );
        }
    }
    Ok(())
}

pub async fn cell(args: CellArgs) -> anyhow::Result<()> {
    let mut client = args.connection.client().await?;
    let (id, state, reason) = match args.command {
        CellCommand::List => {
            let cells = client
                .list_cells(v1::ListCellsRequest {})
                .await
                .map_err(status)?
                .into_inner()
                .cells;
            if args.connection.json {
                println!("{}", json!(cells.iter().map(cell_json).collect::<Vec<_>>()));
            } else {
                println!(
                    "{:<12} {:<9} {:<5} {:>8} {:>8}  {:<20} {:<20} ENDPOINT",
                    "CELL", "STATE", "UP", "TENANTS", "CAPACITY", "VERSION", "BUILD"
                );
                for c in cells {
                    let up = if c.alive { "up" } else { "DOWN" };
                    println!(
                        "{:<12} {:<9} {:<5} {:>8} {:>8}  {:<20} {:<20} {}",
                        c.id, c.state, up, c.tenants, c.capacity, c.version, c.build, c.endpoint
                    );
                }
            }
            return Ok(());
        }
        CellCommand::Add {
            id,
            capacity,
            labels,
            reason,
        } => {
            let request = acting(v1::AddCellRequest {
                id,
                capacity,
                labels: labels.into_iter().collect(),
                reason,
            });
            let added = client.add_cell(request).await.map_err(status)?;
            println!("{}", cell_json(&added.into_inner()));
            return Ok(());
        }
        CellCommand::Evacuate { id, operation } => {
            let request = acting(v1::EvacuateCellRequest {
                cell_id: id,
                parallel: operation.parallel,
                reason: operation.reason,
            });
            let started = client
                .evacuate_cell(request)
                .await
                .map_err(status)?
                .into_inner();
            return follow_operation(&mut client, started, operation.wait, args.connection.json)
                .await;
        }
        CellCommand::Drain { id, reason } => (id, "DRAINING", reason),
        CellCommand::Disable { id, reason } => (id, "DISABLED", reason),
        CellCommand::Enable { id, reason } => (id, "ACTIVE", reason),
    };
    let request = acting(v1::SetCellStateRequest {
        cell_id: id,
        state: state.to_owned(),
        reason,
    });
    let changed = client.set_cell_state(request).await.map_err(status)?;
    println!("{}", cell_json(&changed.into_inner()));
    Ok(())
}

pub async fn key(args: KeyArgs) -> anyhow::Result<()> {
    let mut client = args.connection.client().await?;
    match args.command {
        KeyCommand::List { tenant } => {
            let keys = client
                .list_api_keys(v1::ListApiKeysRequest { tenant_id: tenant })
                .await
                .map_err(status)?
                .into_inner()
                .keys;
            let rows: Vec<_> = keys
                .iter()
                .map(|k| {
                    json!({"key_id": k.key_id, "created_at_ms": k.created_at_ms,
                           "last_used_ms": k.last_used_ms})
                })
                .collect();
            println!("{}", json!(rows));
        }
        KeyCommand::Revoke {
            tenant,
            key_id,
            reason,
        } => {
            let request = acting(v1::RevokeApiKeyRequest {
                tenant_id: tenant,
                key_id,
                reason,
            });
            let revoked = client
                .revoke_api_key(request)
                .await
                .map_err(status)?
                .into_inner()
                .revoked;
            anyhow::ensure!(revoked, "no such key for this tenant");
            println!("{}", json!({"revoked": true}));
        }
        KeyCommand::Issue { tenant, reason } => {
            let request = acting(v1::IssueApiKeyRequest {
                tenant_id: tenant.clone(),
                reason,
            });
            let issued = client
                .issue_api_key(request)
                .await
                .map_err(status)?
                .into_inner();
            if args.connection.json {
                println!(
                    "{}",
                    json!({"tenant": tenant, "api_key": issued.api_key, "key_id": issued.key_id})
                );
            } else {
                println!(
                    "api key {} for {tenant} (shown once): {}",
                    issued.key_id, issued.api_key
                );
            }
        }
    }
    Ok(())
}
