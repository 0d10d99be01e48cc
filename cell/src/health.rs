//! The cell's own figures over its last minutes, for a rollout's health gate: accepts (and
//! the ones that failed on the cell's side) with their latency, delivery attempts and their
//! failures, bounces, complaints and dead letters.
//!
//! Figures are kept in one-second buckets for [`RETAINED_SECS`]; a report sums the buckets
//! of the window asked for. They live in memory only: a new process (a new release) starts
//! with none, so the window of a freshly deployed cell covers that release alone. Accept
//! latency goes into a log-scale histogram of a quarter octave per bucket, fine enough to
//! tell a p99 that doubled from noise.

use std::collections::VecDeque;
use std::sync::Mutex;
use std::time::{Duration, Instant};

use cellmail_registry::schema::HealthFigures;

/// How far back a report can look.
pub const RETAINED_SECS: u64 = 3600;
/// Histogram buckets: a quarter octave each, from 1 µs to about 2^32 µs (71 minutes).
const LATENCY_BUCKETS: usize = 128;

/// One thing the cell did, as a health report counts it.
#[derive(Debug, Clone, Copy, PartialEq)]
pub enum Outcome {
    Accepted(Duration),
    /// An accept the cell failed (a server error, not a refusal of bad input).
    AcceptFailed,
    Sent,
    /// A delivery attempt the mailer failed.
    SendFailed,
    DeadLettered,
    Bounced,
    Complained,
}

#[derive(Clone)]
struct Bucket {
    second: u64,
    counts: HealthFigures,
    latency: [u32; LATENCY_BUCKETS],
}

fn latency_bucket(latency: Duration) -> usize {
    let micros = latency.as_micros().max(1) as f64;
    ((micros.log2() * 4.0) as usize).min(LATENCY_BUCKETS - 1)
}

/// The upper bound of a latency bucket, in microseconds.
fn bucket_bound_us(bucket: usize) -> u64 {
    2f64.powf((bucket + 1) as f64 / 4.0).ceil() as u64
}

/// The cell's figures, bucketed by second since it started.
pub struct Health {
    started: Instant,
    buckets: Mutex<VecDeque<Bucket>>,
}

impl Default for Health {
    fn default() -> Self {
        Self {
            started: Instant::now(),
            buckets: Mutex::new(VecDeque::new()),
        }
    }
}

impl Health {
    fn now_secs(&self) -> u64 {
        self.started.elapsed().as_secs()
    }

    pub fn record(&self, outcome: Outcome) {
        self.record_at(self.now_secs(), outcome);
    }

    /// The last `window_secs` (at most since the cell started).
    pub fn report(&self, window_secs: u64) -> HealthFigures {
        self.report_at(self.now_secs(), window_secs)
    }

    /// Counts `outcome` in second `second` (seconds since the cell started, never going back).
    fn record_at(&self, second: u64, outcome: Outcome) {
        let mut buckets = self.buckets.lock().unwrap_or_else(|p| p.into_inner());
        if buckets.back().is_none_or(|b| b.second < second) {
            buckets.push_back(Bucket {
                second,
                counts: HealthFigures::default(),
                latency: [0; LATENCY_BUCKETS],
            });
        }
        while buckets
            .front()
            .is_some_and(|b| b.second + RETAINED_SECS <= second)
        {
            buckets.pop_front();
        }
        let Some(bucket) = buckets.back_mut() else {
            return;
        };
        let counts = &mut bucket.counts;
        match outcome {
            Outcome::Accepted(latency) => {
                counts.accepts += 1;
                bucket.latency[latency_bucket(latency)] += 1;
            }
            Outcome::AcceptFailed => counts.accept_errors += 1,
            Outcome::Sent => {
                counts.send_attempts += 1;
                counts.sent += 1;
            }
            Outcome::SendFailed => {
                counts.send_attempts += 1;
                counts.send_failures += 1;
            }
            Outcome::DeadLettered => counts.dead_letters += 1,
            Outcome::Bounced => counts.bounces += 1,
            Outcome::Complained => counts.complaints += 1,
        }
    }

    fn report_at(&self, now: u64, window_secs: u64) -> HealthFigures {
        let window_secs = window_secs.clamp(1, RETAINED_SECS).min(now + 1);
        let from = (now + 1).saturating_sub(window_secs);
        let buckets = self.buckets.lock().unwrap_or_else(|p| p.into_inner());
        let mut sum = HealthFigures {
            window_secs,
            ..HealthFigures::default()
        };
        let mut latency = [0u64; LATENCY_BUCKETS];
        for bucket in buckets.iter().filter(|b| b.second >= from) {
            sum.add(&bucket.counts);
            for (total, n) in latency.iter_mut().zip(bucket.latency) {
                *total += u64::from(n);
            }
        }
        sum.accept_p99_us = p99(&latency, sum.accepts);
        sum
    }
}

/// The bound of the bucket holding the 99th percentile of `count` samples.
fn p99(latency: &[u64; LATENCY_BUCKETS], count: u64) -> u64 {
    if count == 0 {
        return 0;
    }
    let rank = count - count / 100;
    let mut seen = 0;
    for (bucket, n) in latency.iter().enumerate() {
        seen += n;
        if seen >= rank {
            return bucket_bound_us(bucket);
        }
    }
    0
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_report_sums_its_window_only() {
        let health = Health::default();
        health.record_at(0, Outcome::SendFailed);
        health.record_at(5, Outcome::Sent);
        health.record_at(9, Outcome::Sent);
        health.record_at(9, Outcome::Bounced);
        let last_five = health.report_at(9, 5);
        assert_eq!(last_five.window_secs, 5);
        assert_eq!((last_five.send_attempts, last_five.sent), (2, 2));
        assert_eq!((last_five.send_failures, last_five.bounces), (0, 1));
        let all = health.report_at(9, 60);
        assert_eq!(all.window_secs, 10, "no older than the cell");
        assert_eq!((all.send_attempts, all.send_failures), (3, 1));
    }

    #[test]
    fn buckets_older_than_the_retention_are_dropped() {
        let health = Health::default();
        health.record_at(0, Outcome::DeadLettered);
        health.record_at(RETAINED_SECS, Outcome::Complained);
        let report = health.report_at(RETAINED_SECS, RETAINED_SECS);
        assert_eq!((report.dead_letters, report.complaints), (0, 1));
        assert_eq!(health.buckets.lock().unwrap().len(), 1);
    }

    #[test]
    fn the_p99_tracks_the_slowest_percent_within_a_quarter_octave() {
        let health = Health::default();
        for _ in 0..990 {
            health.record_at(1, Outcome::Accepted(Duration::from_micros(500)));
        }
        for _ in 0..10 {
            health.record_at(1, Outcome::Accepted(Duration::from_millis(40)));
        }
        let fast = health.report_at(1, 2).accept_p99_us;
        assert!((500..=600).contains(&fast), "p99 {fast} µs");
        for _ in 0..20 {
            health.record_at(2, Outcome::Accepted(Duration::from_millis(40)));
        }
        let slow = health.report_at(2, 3).accept_p99_us;
        assert!((40_000..=48_000).contains(&slow), "p99 {slow} µs");
        assert_eq!(health.report_at(2, 3).accepts, 1020);
        assert_eq!(Health::default().report_at(0, 1).accept_p99_us, 0);
    }
}
