//! Wall-clock time as every record keeps it: milliseconds since the Unix epoch, and the
//! units figures are bucketed by. One definition, so no two crates disagree on either.

/// Milliseconds in a minute (breaker windows are counted by the minute).
pub const MINUTE_MS: u64 = 60_000;
/// Milliseconds in an hour (stats are counted by the hour).
pub const HOUR_MS: u64 = 60 * MINUTE_MS;
/// Milliseconds in a day (daily caps reset at midnight UTC).
pub const DAY_MS: u64 = 24 * HOUR_MS;

/// Milliseconds since the Unix epoch, the time unit of every record.
pub fn now_ms() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_millis() as u64)
}
