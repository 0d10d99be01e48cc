//! `cellmail suppression`: the operators' global suppression list, the addresses no
//! tenant's mail goes to: list it, add an address, remove one.

use cellmail_proto::v1;
use clap::{Args, Subcommand};
use serde_json::json;

use crate::control::{Connection, status};

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

pub async fn run(args: SuppressionArgs) -> anyhow::Result<()> {
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
            let request = tonic::Request::new(v1::AddGlobalSuppressionRequest {
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
            let request =
                tonic::Request::new(v1::RemoveGlobalSuppressionRequest { address, reason });
            let removed = client
                .remove_global_suppression(request)
                .await
                .map_err(status)?;
            println!("{}", json!({"removed": removed.into_inner().removed}));
        }
    }
    Ok(())
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

pub(crate) fn suppression_json(s: &v1::Suppression) -> serde_json::Value {
    let reason = v1::SuppressionReason::try_from(s.reason).map_or("UNKNOWN", |r| r.as_str_name());
    json!({"address": s.address, "reason": reason, "created_at_ms": s.created_at_ms})
}
