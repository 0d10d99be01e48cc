//! `cellmail audit`: the audit trail of control actions and breaker trips, newest first,
//! for every tenant or one.

use cellmail_proto::v1;
use clap::Args;
use serde_json::json;

use crate::control::{Connection, status};

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

pub async fn run(args: AuditArgs) -> anyhow::Result<()> {
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
