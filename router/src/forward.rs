//! Forwarding a send to the tenant's cell.
//!
//! The target comes from the watched catalog (placement -> cell -> endpoint). The caller's
//! deadline (`grpc-timeout`) is passed on, so a cell never works for a caller who gave up.

use std::time::Duration;

use cellmail_control::catalog::Catalog;
use cellmail_control::schema::{PlacementState, TenantStatus};
use cellmail_proto::{ApiError, CellId, Epoch, TenantId};
use tonic::metadata::MetadataMap;

/// The deadline a send gets when its caller set none.
pub const DEFAULT_DEADLINE: Duration = Duration::from_secs(30);

/// Where a tenant's sends go right now.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Target {
    pub cell: CellId,
    pub endpoint: std::sync::Arc<str>,
    pub epoch: Epoch,
    /// A move froze the placement: the tenant's calls wait until it is switched.
    pub frozen: bool,
}

/// Resolves `tenant` to its cell from the catalog.
pub fn resolve(catalog: &Catalog, tenant: &TenantId) -> Result<Target, ApiError> {
    let record = catalog.tenants.get(tenant).ok_or_else(|| {
        ApiError::Unavailable(format!(
            "tenant {tenant} is not in this router's registry view yet"
        ))
    })?;
    if record.status == TenantStatus::Suspended {
        return Err(ApiError::PermissionDenied(format!(
            "tenant {tenant} is suspended"
        )));
    }
    let placement = catalog
        .placements
        .get(tenant)
        .ok_or_else(|| ApiError::Unavailable(format!("tenant {tenant} has no placement")))?;
    let cell = catalog.cells.get(&placement.cell).ok_or_else(|| {
        ApiError::Unavailable(format!(
            "cell {} of tenant {tenant} is not registered",
            placement.cell
        ))
    })?;
    Ok(Target {
        cell: placement.cell.clone(),
        endpoint: cell.endpoint.clone(),
        epoch: placement.epoch,
        frozen: placement.state == PlacementState::Frozen,
    })
}

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
