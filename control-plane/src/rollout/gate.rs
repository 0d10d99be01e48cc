//! A wave's gate: its health figures over the bake window against a baseline's (the cells
//! not yet rolled, or its own before the deploy), each rate allowed at most its threshold's
//! delta above the baseline's and the accept p99 at most its ratio (or slack) above. A check
//! over too few events is not judged, so a quiet wave is not failed on noise.

use cellmail_proto::{ApiError, v1};
use cellmail_registry::schema::{GateCheck, GateConfig, HealthFigures};

fn rate(part: u64, whole: u64) -> f64 {
    if whole == 0 {
        0.0
    } else {
        part as f64 / whole as f64
    }
}

/// A rate check: the wave's rate may exceed the baseline's by at most `limit`, judged only
/// when the wave had `min` events to count it over.
fn rate_check(
    name: &str,
    (part, whole): (u64, u64),
    baseline: (u64, u64),
    limit: f64,
    min: u64,
) -> GateCheck {
    let (wave, baseline) = (rate(part, whole), rate(baseline.0, baseline.1));
    let judged = whole >= min;
    GateCheck {
        name: name.to_owned(),
        wave,
        baseline,
        limit: baseline + limit,
        passed: !judged || wave - baseline <= limit,
        note: if judged {
            String::new()
        } else {
            format!("not judged: {whole} events, fewer than {min}")
        },
    }
}

/// The checks of a wave's gate: `wave`'s figures against `baseline`'s.
pub fn checks(
    wave: &HealthFigures,
    baseline: &HealthFigures,
    config: &GateConfig,
) -> Vec<GateCheck> {
    let min = config.min_attempts;
    type Rate = fn(&HealthFigures) -> (u64, u64);
    let rates: [(&str, Rate, f64); 5] = [
        (
            "send error rate",
            |f| (f.send_failures, f.send_attempts),
            config.max_error_rate_delta,
        ),
        (
            "accept error rate",
            |f| (f.accept_errors, f.accepts + f.accept_errors),
            config.max_error_rate_delta,
        ),
        (
            "bounce rate",
            |f| (f.bounces, f.sent),
            config.max_bounce_rate_delta,
        ),
        (
            "complaint rate",
            |f| (f.complaints, f.sent),
            config.max_complaint_rate_delta,
        ),
        (
            "dead-letter rate",
            |f| (f.dead_letters, f.send_attempts),
            config.max_dead_letter_rate_delta,
        ),
    ];
    let mut checks: Vec<GateCheck> = rates
        .into_iter()
        .map(|(name, of, limit)| rate_check(name, of(wave), of(baseline), limit, min))
        .collect();
    let (wave_ms, baseline_ms) = (
        wave.accept_p99_us as f64 / 1000.0,
        baseline.accept_p99_us as f64 / 1000.0,
    );
    let limit =
        (baseline_ms * config.max_accept_p99_ratio).max(baseline_ms + config.p99_slack_ms as f64);
    let note = if wave.accepts < min {
        format!("not judged: {} accepts, fewer than {min}", wave.accepts)
    } else if baseline.accepts == 0 {
        "not judged: the baseline had no accepts".to_owned()
    } else {
        String::new()
    };
    checks.push(GateCheck {
        name: "accept p99 ms".to_owned(),
        wave: wave_ms,
        baseline: baseline_ms,
        limit,
        passed: !note.is_empty() || wave_ms <= limit,
        note,
    });
    checks
}

/// A one-line account of the failed checks.
pub fn failures(checks: &[GateCheck]) -> String {
    checks
        .iter()
        .filter(|c| !c.passed)
        .map(|c| {
            format!(
                "{} {:.4} > {:.4} (baseline {:.4}){}",
                c.name,
                c.wave,
                c.limit,
                c.baseline,
                if c.note.is_empty() {
                    String::new()
                } else {
                    format!(": {}", c.note)
                }
            )
        })
        .collect::<Vec<_>>()
        .join("; ")
}

/// A checked `GateThresholds`: unset fields take the defaults.
pub fn gate_config(thresholds: Option<v1::GateThresholds>) -> Result<GateConfig, ApiError> {
    let defaults = GateConfig::default();
    let Some(t) = thresholds else {
        return Ok(defaults);
    };
    let delta = |value: Option<f64>, default: f64, field: &str| match value {
        None => Ok(default),
        Some(v) if (0.0..=1.0).contains(&v) => Ok(v),
        Some(v) => Err(ApiError::invalid(
            format!("gate.{field}"),
            format!("{v} is not a rate delta from 0 to 1"),
        )),
    };
    let ratio = t
        .max_accept_p99_ratio
        .unwrap_or(defaults.max_accept_p99_ratio);
    if ratio.is_nan() || ratio < 1.0 {
        return Err(ApiError::invalid(
            "gate.max_accept_p99_ratio",
            format!("{ratio} is below 1"),
        ));
    }
    Ok(GateConfig {
        max_error_rate_delta: delta(
            t.max_error_rate_delta,
            defaults.max_error_rate_delta,
            "max_error_rate_delta",
        )?,
        max_accept_p99_ratio: ratio,
        p99_slack_ms: t.p99_slack_ms.unwrap_or(defaults.p99_slack_ms),
        max_bounce_rate_delta: delta(
            t.max_bounce_rate_delta,
            defaults.max_bounce_rate_delta,
            "max_bounce_rate_delta",
        )?,
        max_complaint_rate_delta: delta(
            t.max_complaint_rate_delta,
            defaults.max_complaint_rate_delta,
            "max_complaint_rate_delta",
        )?,
        max_dead_letter_rate_delta: delta(
            t.max_dead_letter_rate_delta,
            defaults.max_dead_letter_rate_delta,
            "max_dead_letter_rate_delta",
        )?,
        min_attempts: t.min_attempts.unwrap_or(defaults.min_attempts),
    })
}

/// `gate`'s thresholds as operators see them (every field set).
pub fn thresholds(gate: &GateConfig) -> v1::GateThresholds {
    v1::GateThresholds {
        max_error_rate_delta: Some(gate.max_error_rate_delta),
        max_accept_p99_ratio: Some(gate.max_accept_p99_ratio),
        p99_slack_ms: Some(gate.p99_slack_ms),
        max_bounce_rate_delta: Some(gate.max_bounce_rate_delta),
        max_complaint_rate_delta: Some(gate.max_complaint_rate_delta),
        max_dead_letter_rate_delta: Some(gate.max_dead_letter_rate_delta),
        min_attempts: Some(gate.min_attempts),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn figures_of(attempts: u64, failures: u64, p99_ms: u64) -> HealthFigures {
        HealthFigures {
            window_secs: 60,
            accepts: attempts,
            accept_p99_us: p99_ms * 1000,
            send_attempts: attempts,
            send_failures: failures,
            sent: attempts - failures,
            ..HealthFigures::default()
        }
    }

    fn failed(checks: &[GateCheck]) -> Vec<&str> {
        checks
            .iter()
            .filter(|c| !c.passed)
            .map(|c| c.name.as_str())
            .collect()
    }

    #[test]
    fn the_gate_fails_a_wave_whose_sends_fail_more_than_the_baselines() {
        let config = GateConfig::default();
        let baseline = figures_of(1000, 5, 4);
        assert!(failed(&checks(&figures_of(200, 2, 5), &baseline, &config)).is_empty());
        let checks = checks(&figures_of(200, 100, 5), &baseline, &config);
        assert_eq!(failed(&checks), vec!["send error rate"]);
        assert_eq!(checks[0].wave, 0.5);
        assert!(failures(&checks).contains("send error rate 0.5000"));
    }

    #[test]
    fn the_gate_fails_a_slower_wave_beyond_the_ratio_and_the_slack() {
        let config = GateConfig::default();
        let baseline = figures_of(1000, 0, 30);
        assert_eq!(
            failed(&checks(&figures_of(500, 0, 61), &baseline, &config)),
            vec!["accept p99 ms"]
        );
        assert!(failed(&checks(&figures_of(500, 0, 59), &baseline, &config)).is_empty());
        // Twice a tiny p99 is noise: the slack decides.
        let fast = figures_of(1000, 0, 1);
        assert!(failed(&checks(&figures_of(500, 0, 15), &fast, &config)).is_empty());
    }

    #[test]
    fn bounce_complaint_and_dead_letter_deltas_are_gated() {
        let config = GateConfig::default();
        let baseline = figures_of(1000, 0, 4);
        let mut wave = figures_of(1000, 0, 4);
        wave.complaints = 5;
        wave.bounces = 30;
        wave.dead_letters = 20;
        assert_eq!(
            failed(&checks(&wave, &baseline, &config)),
            vec!["bounce rate", "complaint rate", "dead-letter rate"]
        );
    }

    #[test]
    fn too_little_traffic_is_not_judged() {
        let config = GateConfig::default();
        let checks = checks(&figures_of(5, 5, 900), &figures_of(1000, 0, 4), &config);
        assert!(failed(&checks).is_empty());
        assert!(checks.iter().all(|c| c.note.starts_with("not judged")));
    }

    #[test]
    fn thresholds_are_checked_naming_the_field() {
        let bad = v1::GateThresholds {
            max_error_rate_delta: Some(1.5),
            ..Default::default()
        };
        match gate_config(Some(bad)) {
            Err(ApiError::InvalidArgument { field, .. }) => {
                assert_eq!(field, "gate.max_error_rate_delta")
            }
            other => panic!("{other:?}"),
        }
        let set = v1::GateThresholds {
            min_attempts: Some(5),
            ..Default::default()
        };
        let config = gate_config(Some(set)).unwrap();
        assert_eq!(config.min_attempts, 5);
        assert_eq!(
            config.max_error_rate_delta,
            GateConfig::default().max_error_rate_delta
        );
    }
}
