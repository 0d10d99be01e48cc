//! The benchmark harness: each figure is measured against its baseline side by side in one
//! run on the same machine, and reported as a ratio or a number next to its goal.
//!
//! - [`send_path`]: router vs direct-to-cell throughput, router vs a bare tonic pass-through
//!   proxy in CPU per send, added p99 latency at half load, durable accepts per second.
//! - [`placements`]: the router's placement cache at scale (memory, lookup, cold sync) and
//!   how fast a placement change reaches several routers over etcd.
//! - [`moves`]: the freeze window of tenant moves under load.
//! - [`neighbours`]: one tenant's delivery latency while another floods the router.
//! - [`engagement`]: one tenant's webhook latency beside another's hung endpoint, and the
//!   tracking host's redirects.
//! - [`os`]: per-thread CPU time and resident memory, read from /proc.

pub mod engagement;
pub mod moves;
pub mod neighbours;
pub mod os;
pub mod placements;
pub mod send_path;

use serde_json::json;

/// One line of the table.
pub struct Row {
    pub figure: &'static str,
    /// `None` when the feature is not built yet or the measurement could not run.
    pub value: Option<f64>,
    pub unit: &'static str,
    pub goal: &'static str,
    /// Whether `value` meets the goal (`None` with no value).
    pub met: Option<bool>,
    /// Why there is no value, or how it was measured.
    pub note: String,
}

impl Row {
    pub fn measured(
        figure: &'static str,
        value: f64,
        unit: &'static str,
        goal: &'static str,
        met: bool,
        note: String,
    ) -> Self {
        Self {
            figure,
            value: Some(value),
            unit,
            goal,
            met: Some(met),
            note,
        }
    }

    pub fn missing(
        figure: &'static str,
        unit: &'static str,
        goal: &'static str,
        why: &str,
    ) -> Self {
        Self {
            figure,
            value: None,
            unit,
            goal,
            met: None,
            note: why.to_owned(),
        }
    }
}

pub fn json(rows: &[Row]) -> serde_json::Value {
    let rows: Vec<_> = rows
        .iter()
        .map(|r| json!({"figure": r.figure, "value": r.value, "unit": r.unit, "goal": r.goal, "met": r.met, "note": r.note}))
        .collect();
    json!({ "rows": rows })
}

pub fn table(rows: &[Row]) -> String {
    let mut out = format!(
        "| {:<58} | {:>12} | {:<8} | {:<12} | {:<5} | {}\n",
        "figure", "value", "unit", "goal", "met", "note"
    );
    out.push_str(&format!(
        "|{}|{}|{}|{}|{}|---\n",
        "-".repeat(60),
        "-".repeat(14),
        "-".repeat(10),
        "-".repeat(14),
        "-".repeat(7)
    ));
    for r in rows {
        let value = r.value.map_or("n/a".to_owned(), |v| {
            if v.abs() >= 100.0 {
                format!("{v:.0}")
            } else {
                format!("{v:.3}")
            }
        });
        let met = r.met.map_or("n/a", |m| if m { "yes" } else { "NO" });
        out.push_str(&format!(
            "| {:<58} | {:>12} | {:<8} | {:<12} | {:<5} | {}\n",
            r.figure, value, r.unit, r.goal, met, r.note
        ));
    }
    out
}

/// The p-th percentile (0..=100) of `samples`, which it sorts.
pub fn percentile(samples: &mut [f64], p: f64) -> f64 {
    if samples.is_empty() {
        return f64::NAN;
    }
    samples.sort_by(f64::total_cmp);
    let rank = ((p / 100.0) * (samples.len() - 1) as f64).round() as usize;
    samples[rank.min(samples.len() - 1)]
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn percentiles_pick_by_rank() {
        let mut samples: Vec<f64> = (1..=100).map(f64::from).collect();
        assert_eq!(percentile(&mut samples, 50.0), 51.0);
        assert_eq!(percentile(&mut samples, 99.0), 99.0);
        assert_eq!(percentile(&mut samples, 100.0), 100.0);
        assert!(percentile(&mut [], 99.0).is_nan());
    }
}
