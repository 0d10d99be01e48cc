//! `cellmail key`: a tenant's API keys: issue another (shown once), list them, revoke one.

use cellmail_proto::v1;
use clap::{Args, Subcommand};
use serde_json::json;

use crate::control::{Connection, acting, status};

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

pub async fn run(args: KeyArgs) -> anyhow::Result<()> {
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
