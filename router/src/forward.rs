//! Forwarding a call to the tenant's cell: the caller's deadline (`grpc-timeout`) is passed
//! on, so a cell never works for a caller who gave up.

use std::time::Duration;

use tonic::metadata::MetadataMap;

/// The deadline a send gets when its caller set none.
pub const DEFAULT_DEADLINE: Duration = Duration::from_secs(30);

/// The caller's `grpc-timeout` (gRPC over HTTP/2 spec: up to 8 digits and a unit).
pub fn deadline(metadata: &MetadataMap) -> Option<Duration> {
    let value = metadata.get("grpc-timeout")?.to_str().ok()?;
    if value.len() < 2 || value.len() > 9 {
        return None;
    }
    let (digits, unit) = value.split_at(value.len() - 1);
    let amount: u64 = digits.parse().ok()?;
    Some(match unit {
        "H" => Duration::from_secs(amount.saturating_mul(3600)),
        "M" => Duration::from_secs(amount.saturating_mul(60)),
        "S" => Duration::from_secs(amount),
        "m" => Duration::from_millis(amount),
        "u" => Duration::from_micros(amount),
        "n" => Duration::from_nanos(amount),
        _ => return None,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn metadata(timeout: &str) -> MetadataMap {
        let mut map = MetadataMap::new();
        map.insert("grpc-timeout", timeout.parse().unwrap());
        map
    }

    #[test]
    fn grpc_timeouts_parse_in_every_unit_and_garbage_is_ignored() {
        assert_eq!(
            deadline(&metadata("250m")),
            Some(Duration::from_millis(250))
        );
        assert_eq!(deadline(&metadata("3S")), Some(Duration::from_secs(3)));
        assert_eq!(deadline(&metadata("2M")), Some(Duration::from_secs(120)));
        assert_eq!(deadline(&metadata("1H")), Some(Duration::from_secs(3600)));
        assert_eq!(deadline(&metadata("10u")), Some(Duration::from_micros(10)));
        assert_eq!(deadline(&metadata("10n")), Some(Duration::from_nanos(10)));
        assert_eq!(deadline(&metadata("10x")), None);
        assert_eq!(
            deadline(&metadata("123456789S")),
            None,
            "more than 8 digits"
        );
        assert_eq!(deadline(&MetadataMap::new()), None);
    }
}
