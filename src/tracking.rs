//! `cellmail tracking rotate-key`: a new key signs engagement links (open pixels, tracked
//! links, unsubscribe URLs) from now on; links signed by the last keys before it still work.

use cellmail_proto::v1;
use clap::{Args, Subcommand};
use serde_json::json;

use crate::control::{Connection, status};

#[derive(Args)]
pub struct TrackingArgs {
    #[command(subcommand)]
    command: TrackingCommand,
    #[command(flatten)]
    connection: Connection,
}

#[derive(Subcommand)]
enum TrackingCommand {
    /// Make a new signing key; the last ones before it keep verifying links already sent.
    RotateKey {
        /// Why, for the audit trail.
        #[arg(long, default_value = "")]
        reason: String,
    },
}

pub async fn run(args: TrackingArgs) -> anyhow::Result<()> {
    let mut client = args.connection.client().await?;
    match args.command {
        TrackingCommand::RotateKey { reason } => {
            let rotated = client
                .rotate_tracking_key(v1::RotateTrackingKeyRequest { reason })
                .await
                .map_err(status)?
                .into_inner();
            if args.connection.json {
                println!("{}", json!({ "key_ids": rotated.key_ids }));
            } else {
                println!(
                    "tracking keys (the first signs): {}",
                    rotated.key_ids.join(", ")
                );
            }
        }
    }
    Ok(())
}
