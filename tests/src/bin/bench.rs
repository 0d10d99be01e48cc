//! `cellmail-bench`: cellmail's benchmark harness. Starts what it measures itself and prints
//! one table (or `--json`). `--quick` finishes in under a minute, for CI to keep it working.

use cellmail_tests::bench::{self, engagement, moves, neighbours, placements, send_path};
use clap::Parser;

#[derive(Parser)]
#[command(about = "cellmail benchmark harness: ratios measured side by side in one run")]
struct Args {
    /// Short runs and 100k placements instead of 1M.
    #[arg(long)]
    quick: bool,
    /// Print {"rows": [{"figure", "value", "unit", "goal", "met", "note"}]}.
    #[arg(long)]
    json: bool,
    /// Only these parts (default: all), e.g. `--only neighbours` while working on one.
    #[arg(long, value_enum, value_delimiter = ',')]
    only: Vec<Part>,
}

#[derive(Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
enum Part {
    SendPath,
    Placements,
    Propagation,
    Moves,
    Neighbours,
    Engagement,
}

fn main() -> anyhow::Result<()> {
    let args = Args::parse();
    // What it measures runs as deployed, under the binaries' subscriber (`RUST_LOG`, default
    // `info`, to stderr): without one, every disabled span and event of the stack would fall
    // back to the `log` crate's checks, a cost no deployed process pays.
    let _telemetry = cellmail_proto::server::init_tracing("cellmail-bench");
    let runs = |part| args.only.is_empty() || args.only.contains(&part);
    let mut rows = Vec::new();
    if runs(Part::SendPath) {
        rows.extend(send_path::run(args.quick)?);
    }
    if runs(Part::Placements) {
        rows.extend(placements::cache_at_scale(if args.quick {
            100_000
        } else {
            1_000_000
        })?);
    }
    if runs(Part::Propagation) {
        rows.push(placements::propagation(if args.quick {
            100
        } else {
            1000
        })?);
    }
    if runs(Part::Moves) {
        rows.extend(moves::run(args.quick)?);
    }
    if runs(Part::Neighbours) {
        rows.extend(neighbours::run(args.quick)?);
    }
    if runs(Part::Engagement) {
        rows.extend(engagement::run(args.quick)?);
    }
    if args.json {
        println!("{}", bench::json(&rows));
    } else {
        print!("{}", bench::table(&rows));
    }
    Ok(())
}
