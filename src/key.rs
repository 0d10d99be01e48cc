//! `cellmail key`: a tenant's API keys: issue another (shown once, with the scopes it may use
//! and when it expires), list them, revoke one.

use cellmail_proto::v1;
use clap::{Args, Subcommand};
use serde_json::json;

use crate::control::{Connection, status};

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
        /// What the key may do: send, read, suppressions (repeat or comma-separate; default:
        /// all of them).
        #[arg(long = "scope", value_delimiter = ',')]
        scopes: Vec<String>,
        /// When the key stops working (RFC 3339, e.g. 2027-01-31T00:00:00Z; default: never).
        #[arg(long)]
        expires: Option<jiff::Timestamp>,
        /// Why, for the audit trail.
        #[arg(long, default_value = "")]
        reason: String,
    },
    /// List a tenant's keys: ids, scopes, creation, expiry and last use (to the minute).
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
                           "last_used_ms": k.last_used_ms, "scopes": k.scopes,
                           "expires_at_ms": k.expires_at_ms})
                })
                .collect();
            println!("{}", json!(rows));
        }
        KeyCommand::Revoke {
            tenant,
            key_id,
            reason,
        } => {
            let request = tonic::Request::new(v1::RevokeApiKeyRequest {
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
        KeyCommand::Issue {
            tenant,
            scopes,
            expires,
            reason,
        } => {
            let expires_at_ms = match expires {
                None => 0,
                Some(at) => u64::try_from(at.as_millisecond())
                    .map_err(|_| anyhow::anyhow!("--expires {at} is before 1970"))?,
            };
            let request = tonic::Request::new(v1::IssueApiKeyRequest {
                tenant_id: tenant.clone(),
                reason,
                scopes,
                expires_at_ms,
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
