//! The operator commands: each is one call to the control plane's `Control` API, printed as
//! a table or, with `--json`, as JSON for scripts.

use cellmail_proto::v1::{self, control_client::ControlClient};
use clap::{Args, Subcommand};
use serde_json::json;
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
    /// Print JSON instead of a table.
    #[arg(long, global = true)]
    json: bool,
}

impl Connection {
    async fn client(&self) -> anyhow::Result<ControlClient<Channel>> {
        let url = if self.control.contains("://") {
            self.control.clone()
        } else {
            format!("http://{}", self.control)
        };
        ControlClient::connect(url.clone())
            .await
            .map_err(|e| anyhow::anyhow!("cannot reach the control plane at {url}: {e}"))
    }
}

fn status(err: tonic::Status) -> anyhow::Error {
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
    },
    /// List tenants with their cell and placement epoch.
    List,
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
    Issue { tenant: String },
}

fn tenant_json(tenant: &v1::TenantInfo) -> serde_json::Value {
    json!({
        "tenant": tenant.id, "tier": tenant.tier, "status": tenant.status,
        "domains": tenant.domains, "cell": tenant.cell, "epoch": tenant.epoch,
    })
}

pub async fn tenant(args: TenantArgs) -> anyhow::Result<()> {
    let mut client = args.connection.client().await?;
    match args.command {
        TenantCommand::Create { id, domains, tier } => {
            let request = v1::CreateTenantRequest { id, domains, tier };
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
                    "{:<24} {:<10} {:<10} {:<12} {:>5}  DOMAINS",
                    "TENANT", "TIER", "STATUS", "CELL", "EPOCH"
                );
                for t in tenants {
                    println!(
                        "{:<24} {:<10} {:<10} {:<12} {:>5}  {}",
                        t.id,
                        t.tier,
                        t.status,
                        t.cell,
                        t.epoch,
                        t.domains.join(",")
                    );
                }
            }
        }
    }
    Ok(())
}

pub async fn cell(args: CellArgs) -> anyhow::Result<()> {
    let mut client = args.connection.client().await?;
    match args.command {
        CellCommand::List => {
            let cells = client
                .list_cells(v1::ListCellsRequest {})
                .await
                .map_err(status)?
                .into_inner()
                .cells;
            if args.connection.json {
                let rows: Vec<_> = cells
                    .iter()
                    .map(|c| {
                        json!({
                            "cell": c.id, "endpoint": c.endpoint, "state": c.state, "alive": c.alive,
                            "capacity": c.capacity, "tenants": c.tenants, "version": c.version,
                        })
                    })
                    .collect();
                println!("{}", json!(rows));
            } else {
                println!(
                    "{:<12} {:<9} {:<5} {:>8} {:>8}  {:<10} ENDPOINT",
                    "CELL", "STATE", "UP", "TENANTS", "CAPACITY", "VERSION"
                );
                for c in cells {
                    let up = if c.alive { "up" } else { "DOWN" };
                    println!(
                        "{:<12} {:<9} {:<5} {:>8} {:>8}  {:<10} {}",
                        c.id, c.state, up, c.tenants, c.capacity, c.version, c.endpoint
                    );
                }
            }
        }
    }
    Ok(())
}

pub async fn key(args: KeyArgs) -> anyhow::Result<()> {
    let mut client = args.connection.client().await?;
    match args.command {
        KeyCommand::Issue { tenant } => {
            let issued = client
                .issue_api_key(v1::IssueApiKeyRequest {
                    tenant_id: tenant.clone(),
                })
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
