//! `cellmail send`: a gRPC client of the router's `Sender` API, for quickstarts and smoke
//! tests. It authenticates with the tenant's API key like any product service would.

use cellmail_proto::v1::{self, sender_client::SenderClient};
use clap::{Args, ValueEnum};
use serde_json::json;

#[derive(Clone, Copy, ValueEnum)]
enum Class {
    Transactional,
    Marketing,
}

#[derive(Args)]
pub struct SendArgs {
    /// Address of the router (`https://…` for TLS).
    #[arg(long, env = "CELLMAIL_ROUTER", default_value = "127.0.0.1:50051")]
    router: String,
    #[command(flatten)]
    ca: crate::door::PublicCa,
    /// The tenant's API key.
    #[arg(long, env = "CELLMAIL_API_KEY", hide_env_values = true)]
    api_key: String,
    #[arg(long)]
    from: String,
    /// Recipient (repeatable).
    #[arg(long, required = true)]
    to: Vec<String>,
    #[arg(long)]
    cc: Vec<String>,
    #[arg(long)]
    bcc: Vec<String>,
    #[arg(long)]
    reply_to: Vec<String>,
    #[arg(long)]
    subject: String,
    #[arg(long, default_value = "")]
    text: String,
    #[arg(long, default_value = "")]
    html: String,
    #[arg(long, value_enum, default_value = "transactional")]
    class: Class,
    /// Retrying with the same key returns the first message id and sends nothing twice.
    #[arg(long, default_value = "")]
    idempotency_key: String,
    /// A tag as name=value (repeatable).
    #[arg(long = "tag", value_parser = parse_tag)]
    tags: Vec<(String, String)>,
    /// Print JSON.
    #[arg(long)]
    json: bool,
}

fn parse_tag(raw: &str) -> Result<(String, String), String> {
    raw.split_once('=')
        .map(|(k, v)| (k.to_owned(), v.to_owned()))
        .ok_or_else(|| format!("{raw:?}: expected name=value"))
}

pub async fn run(args: SendArgs) -> anyhow::Result<()> {
    let mut client = SenderClient::new(args.ca.connect(&args.router, "router").await?);
    let class = match args.class {
        Class::Transactional => v1::MessageClass::Transactional,
        Class::Marketing => v1::MessageClass::Marketing,
    };
    let mut request = tonic::Request::new(v1::SendRequest {
        idempotency_key: args.idempotency_key,
        message_class: class as i32,
        from_address: args.from,
        to: args.to,
        cc: args.cc,
        bcc: args.bcc,
        reply_to: args.reply_to,
        subject: args.subject,
        text: args.text,
        html: args.html,
        tags: args.tags.into_iter().collect(),
    });
    let bearer = format!("Bearer {}", args.api_key)
        .parse()
        .map_err(|_| anyhow::anyhow!("--api-key holds characters not allowed in metadata"))?;
    request.metadata_mut().insert("authorization", bearer);
    let sent = client
        .send(request)
        .await
        .map_err(|e| anyhow::anyhow!("{:?}: {}", e.code(), e.message()))?
        .into_inner();
    let state = |s: i32| v1::RecipientState::try_from(s).map_or("UNKNOWN", |s| s.as_str_name());
    if args.json {
        let recipients: Vec<_> = sent
            .recipients
            .iter()
            .map(|r| json!({"address": r.address, "state": state(r.state), "reason": r.reason}))
            .collect();
        println!(
            "{}",
            json!({"message_id": sent.message_id, "recipients": recipients})
        );
    } else {
        let suppressed = v1::RecipientState::Suppressed as i32;
        if sent.recipients.iter().all(|r| r.state == suppressed) {
            println!(
                "message {}: every recipient is suppressed; nothing was queued",
                sent.message_id
            );
        } else {
            println!("message {} accepted", sent.message_id);
        }
        for r in sent.recipients {
            println!("  {:<40} {} {}", r.address, state(r.state), r.reason);
        }
    }
    Ok(())
}
