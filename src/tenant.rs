//! `cellmail tenant`: create tenants and list them, add and verify their sending domains,
//! suspend and resume them, move one to another cell, and offboard one (export its data,
//! then delete it everywhere).

use cellmail_proto::v1;
use clap::{Args, Subcommand};
use serde_json::json;

use crate::cell::parse_label;
use crate::control::{Connection, status};
use crate::operation::MOVE_POLL;
use crate::suppression::suppression_json;

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

#[derive(Subcommand)]
enum DomainCommand {
    /// Add a domain: prints the records to publish (ownership TXT, DKIM key TXT, its MAIL
    /// FROM domain's MX and SPF, DMARC).
    Add { tenant: String, domain: String },
    /// Check the domain's records in DNS, and that SES on the tenant's cell has verified its
    /// DKIM key and MAIL FROM domain; once all are, the tenant may send from it.
    Verify { tenant: String, domain: String },
    /// Rotate the domain's DKIM key: the first run hands out a new key's record; run it
    /// again once that is published, and the new key signs while the old one's record must
    /// stay published for the overlap.
    RotateDkim {
        tenant: String,
        domain: String,
        /// Hours the old key's record must stay published after the switch.
        #[arg(long, default_value_t = 168)]
        overlap_hours: u32,
    },
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
    /// How SES manages the reputation of the tenant's SES tenant (cells with SES tenants on):
    /// none | standard | strict (default standard).
    #[arg(long, default_value = "")]
    ses_reputation_policy: String,
    /// Classes whose html mail gets an open pixel and tracked links (repeatable:
    /// transactional, marketing; none by default).
    #[arg(long = "track")]
    tracked_classes: Vec<String>,
    /// Transactional mail carries List-Unsubscribe too (marketing mail always does).
    #[arg(long)]
    unsubscribe_transactional: bool,
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
            ses_reputation_policy: p.ses_reputation_policy,
            tracked_classes: p.tracked_classes,
            unsubscribe_transactional: p.unsubscribe_transactional,
        }
    }
}

pub async fn run(args: TenantArgs) -> anyhow::Result<()> {
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
            let request = tonic::Request::new(v1::CreateTenantRequest {
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
            let request = |tenant, domain| {
                tonic::Request::new(v1::DomainRequest {
                    tenant_id: tenant,
                    domain,
                })
            };
            let (verify, answer) = match command {
                DomainCommand::Add { tenant, domain } => {
                    (false, client.add_domain(request(tenant, domain)).await)
                }
                DomainCommand::Verify { tenant, domain } => {
                    (true, client.verify_domain(request(tenant, domain)).await)
                }
                DomainCommand::RotateDkim {
                    tenant,
                    domain,
                    overlap_hours,
                } => {
                    let rotate = v1::RotateDkimRequest {
                        tenant_id: tenant,
                        domain,
                        overlap_hours,
                    };
                    (false, client.rotate_dkim(rotate).await)
                }
            };
            let info = answer.map_err(status)?.into_inner();
            print_domain(&info, args.connection.json);
            anyhow::ensure!(
                !verify || info.verified,
                "{} is not verified yet: publish the records above",
                info.domain
            );
        }
        TenantCommand::Suspend { tenant, reason } => {
            let request = tonic::Request::new(v1::SuspendTenantRequest {
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
            let request = tonic::Request::new(v1::ResumeTenantRequest {
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
            let suspend = tonic::Request::new(v1::SuspendTenantRequest {
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
            let delete = tonic::Request::new(v1::DeleteTenantRequest {
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
            let request = tonic::Request::new(v1::MoveTenantRequest {
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

fn move_json(m: &v1::MoveInfo) -> serde_json::Value {
    json!({
        "id": m.id, "tenant": m.tenant_id, "from": m.from_cell, "to": m.to_cell,
        "from_epoch": m.from_epoch, "state": m.state, "detail": m.detail,
        "started_at_ms": m.started_at_ms, "updated_at_ms": m.updated_at_ms,
        "freeze_ms": m.freeze_ms, "actor": m.actor, "reason": m.reason,
    })
}

fn domain_json(info: &v1::DomainInfo) -> serde_json::Value {
    let records: Vec<_> = info
        .records
        .iter()
        .map(|r| {
            json!({"purpose": r.purpose, "type": r.r#type, "name": r.name, "value": r.value,
                   "problem": r.problem, "note": r.note})
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
        let aside = |text: &str| match text {
            "" => String::new(),
            text => format!("   <- {text}"),
        };
        println!(
            "  {:<13} {:<4} {} {}{}{}",
            r.purpose,
            r.r#type,
            r.name,
            r.value,
            aside(&r.note),
            aside(&r.problem)
        );
    }
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
