//! `cellmail operator`: named operator credentials: add one (admin or viewer; its credential
//! shown once), list them, revoke one. The audit trail names each action's operator.

use cellmail_proto::v1;
use clap::{Args, Subcommand};
use serde_json::json;

use crate::control::{Connection, status};

#[derive(Args)]
pub struct OperatorArgs {
    #[command(subcommand)]
    command: OperatorCommand,
    #[command(flatten)]
    connection: Connection,
}

#[derive(Subcommand)]
enum OperatorCommand {
    /// Add an operator (its credential is shown once).
    Add {
        name: String,
        /// admin (reads and changes everything) or viewer (reads everything, changes nothing).
        #[arg(long)]
        role: String,
        /// Why, for the audit trail.
        #[arg(long, default_value = "")]
        reason: String,
    },
    /// List the operators: names, roles and when each was added, never credentials.
    List,
    /// Revoke an operator's credential.
    Revoke {
        name: String,
        /// Why, for the audit trail.
        #[arg(long, default_value = "")]
        reason: String,
    },
}

pub async fn run(args: OperatorArgs) -> anyhow::Result<()> {
    let mut client = args.connection.client().await?;
    match args.command {
        OperatorCommand::Add { name, role, reason } => {
            let added = client
                .add_operator(v1::AddOperatorRequest { name, role, reason })
                .await
                .map_err(status)?
                .into_inner();
            let operator = added.operator.unwrap_or_default();
            if args.connection.json {
                println!(
                    "{}",
                    json!({"name": operator.name, "role": operator.role,
                           "credential": added.credential})
                );
            } else {
                println!(
                    "operator {} ({}), credential (shown once): {}",
                    operator.name, operator.role, added.credential
                );
            }
        }
        OperatorCommand::List => {
            let operators = client
                .list_operators(v1::ListOperatorsRequest {})
                .await
                .map_err(status)?
                .into_inner()
                .operators;
            let rows: Vec<_> = operators
                .iter()
                .map(|o| json!({"name": o.name, "role": o.role, "created_at_ms": o.created_at_ms}))
                .collect();
            println!("{}", json!(rows));
        }
        OperatorCommand::Revoke { name, reason } => {
            let revoked = client
                .revoke_operator(v1::RevokeOperatorRequest { name, reason })
                .await
                .map_err(status)?
                .into_inner()
                .revoked;
            anyhow::ensure!(revoked, "no such operator");
            println!("{}", json!({"revoked": true}));
        }
    }
    Ok(())
}
