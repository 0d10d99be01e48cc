//! `cellmail rollout`: start a version's rollout, follow it, pause, resume or abort it.

use std::time::Duration;

use cellmail_control::rollout::Action;
use cellmail_proto::v1;
use clap::{Args, Subcommand};
use serde_json::json;

use crate::control::{Client, Connection, status};

const POLL: Duration = Duration::from_millis(500);

#[derive(Args)]
pub struct RolloutArgs {
    #[command(subcommand)]
    command: RolloutCommand,
    #[command(flatten)]
    connection: Connection,
}

/// A duration such as `90s`, `5m` or `1h30m`.
fn duration(text: &str) -> Result<Duration, String> {
    let parsed: jiff::SignedDuration = text.parse().map_err(|e| format!("{text:?}: {e}"))?;
    Duration::try_from(parsed).map_err(|_| format!("{text:?} is negative"))
}

/// What a wave's health may differ from the cells not yet rolled (defaults when unset).
#[derive(Args)]
struct GateArgs {
    /// Share of delivery (and accept) attempts failed, above the baseline's.
    #[arg(long)]
    max_error_rate_delta: Option<f64>,
    /// Accept p99 over the baseline's...
    #[arg(long)]
    max_accept_p99_ratio: Option<f64>,
    /// ...and more than this many milliseconds above it.
    #[arg(long)]
    p99_slack_ms: Option<u64>,
    #[arg(long)]
    max_bounce_rate_delta: Option<f64>,
    #[arg(long)]
    max_complaint_rate_delta: Option<f64>,
    #[arg(long)]
    max_dead_letter_rate_delta: Option<f64>,
    /// Fewer delivery attempts than this in a wave: its rates are not judged.
    #[arg(long)]
    min_attempts: Option<u64>,
}

#[derive(Subcommand)]
enum RolloutCommand {
    /// Start rolling a version out: the canary first, then the waves, each gated.
    Start {
        /// The release to deploy (an image tag, a release directory).
        #[arg(long)]
        version: String,
        /// The first wave's cell (default: the first cell by id).
        #[arg(long)]
        canary: Option<String>,
        /// Cumulative wave sizes, counts or percentages, the last one 100%.
        #[arg(long, default_value = "1,25%,100%")]
        waves: String,
        /// How long each wave runs before its gate.
        #[arg(long, default_value = "5m", value_parser = duration)]
        bake: Duration,
        /// How long a deployed cell has to come up serving the version.
        #[arg(long, default_value = "2m", value_parser = duration)]
        ready_timeout: Duration,
        #[command(flatten)]
        gate: GateArgs,
        #[arg(long, default_value = "")]
        reason: String,
        /// Follow the rollout until it ends; fail unless it completes.
        #[arg(long)]
        wait: bool,
    },
    /// The rollout's waves, gates and state (the latest rollout by default).
    Status {
        #[arg(long, default_value = "")]
        id: String,
        /// Follow the rollout until it ends; fail unless it completes.
        #[arg(long)]
        wait: bool,
    },
    /// Hold the rollout where it is (a rollback under way still finishes).
    Pause(ActionArgs),
    /// Carry a paused rollout on.
    Resume(ActionArgs),
    /// Roll the wave under way back and stop.
    Abort(ActionArgs),
}

#[derive(Args)]
struct ActionArgs {
    /// The rollout (default: the latest).
    #[arg(long, default_value = "")]
    id: String,
    #[arg(long, default_value = "")]
    reason: String,
}

pub async fn run(args: RolloutArgs) -> anyhow::Result<()> {
    let mut client = args.connection.client().await?;
    let json = args.connection.json;
    let (rollout, wait) = match args.command {
        RolloutCommand::Start {
            version,
            canary,
            waves,
            bake,
            ready_timeout,
            gate,
            reason,
            wait,
        } => {
            let request = tonic::Request::new(v1::StartRolloutRequest {
                version,
                canary: canary.unwrap_or_default(),
                waves,
                bake_secs: bake.as_secs().max(1),
                gate: Some(v1::GateThresholds {
                    max_error_rate_delta: gate.max_error_rate_delta,
                    max_accept_p99_ratio: gate.max_accept_p99_ratio,
                    p99_slack_ms: gate.p99_slack_ms,
                    max_bounce_rate_delta: gate.max_bounce_rate_delta,
                    max_complaint_rate_delta: gate.max_complaint_rate_delta,
                    max_dead_letter_rate_delta: gate.max_dead_letter_rate_delta,
                    min_attempts: gate.min_attempts,
                }),
                ready_timeout_secs: ready_timeout.as_secs().max(1),
                reason,
            });
            let started = client.start_rollout(request).await.map_err(status)?;
            (started.into_inner(), wait)
        }
        RolloutCommand::Status { id, wait } => {
            let got = client
                .get_rollout(v1::GetRolloutRequest { id })
                .await
                .map_err(status)?;
            (got.into_inner(), wait)
        }
        RolloutCommand::Pause(a) => (act(&mut client, a, Action::Pause).await?, false),
        RolloutCommand::Resume(a) => (act(&mut client, a, Action::Resume).await?, false),
        RolloutCommand::Abort(a) => (act(&mut client, a, Action::Abort).await?, false),
    };
    let rollout = if wait {
        follow(&mut client, rollout).await?
    } else {
        rollout
    };
    if json {
        println!("{}", rollout_json(&rollout));
    } else {
        print(&rollout);
    }
    anyhow::ensure!(
        !wait || rollout.state == "COMPLETED",
        "rollout {} ended {}: {}",
        rollout.id,
        rollout.state,
        rollout.detail
    );
    Ok(())
}

async fn act(
    client: &mut Client,
    args: ActionArgs,
    action: Action,
) -> anyhow::Result<v1::RolloutInfo> {
    let request = tonic::Request::new(v1::RolloutActionRequest {
        id: args.id,
        reason: args.reason,
    });
    let answered = match action {
        Action::Pause => client.pause_rollout(request).await,
        Action::Resume => client.resume_rollout(request).await,
        Action::Abort => client.abort_rollout(request).await,
    };
    Ok(answered.map_err(status)?.into_inner())
}

fn finished(rollout: &v1::RolloutInfo) -> bool {
    matches!(
        rollout.state.as_str(),
        "COMPLETED" | "ROLLED_BACK" | "ABORTED"
    )
}

/// Polls the rollout until it ends, printing each change of its detail.
async fn follow(
    client: &mut Client,
    mut rollout: v1::RolloutInfo,
) -> anyhow::Result<v1::RolloutInfo> {
    let mut said = String::new();
    while !finished(&rollout) {
        if rollout.detail != said {
            eprintln!(
                "wave {}/{}: {}",
                rollout.wave + 1,
                rollout.waves.len(),
                rollout.detail
            );
            said = rollout.detail.clone();
        }
        tokio::time::sleep(POLL).await;
        let request = v1::GetRolloutRequest {
            id: rollout.id.clone(),
        };
        rollout = client
            .get_rollout(request)
            .await
            .map_err(status)?
            .into_inner();
    }
    Ok(rollout)
}

fn rollout_json(r: &v1::RolloutInfo) -> serde_json::Value {
    let waves: Vec<_> = r
        .waves
        .iter()
        .map(|w| {
            let checks: Vec<_> = w
                .checks
                .iter()
                .map(|c| {
                    json!({"name": c.name, "wave": c.wave, "baseline": c.baseline,
                    "limit": c.limit, "passed": c.passed, "note": c.note})
                })
                .collect();
            json!({"cells": w.cells, "state": w.state, "previous": w.previous,
                "baseline": w.baseline, "checks": checks})
        })
        .collect();
    json!({"id": r.id, "version": r.version, "state": r.state, "wave": r.wave,
        "waves": waves, "detail": r.detail, "bake_secs": r.bake_secs, "actor": r.actor,
        "reason": r.reason, "started_at_ms": r.started_at_ms, "updated_at_ms": r.updated_at_ms})
}

fn print(r: &v1::RolloutInfo) {
    println!(
        "rollout {} of {}: {} (wave {} of {})",
        r.id,
        r.version,
        r.state,
        r.wave + 1,
        r.waves.len()
    );
    if !r.detail.is_empty() {
        println!("  {}", r.detail);
    }
    for (n, w) in r.waves.iter().enumerate() {
        println!("  wave {:<2} {:<13} {}", n + 1, w.state, w.cells.join(", "));
        for c in &w.checks {
            let verdict = if c.passed { "ok" } else { "FAILED" };
            println!(
                "      {:<18} wave {:>10.4}  baseline {:>10.4}  limit {:>10.4}  {verdict} {}",
                c.name, c.wave, c.baseline, c.limit, c.note
            );
        }
    }
}
