//! Authentication, as a tonic interceptor in front of `Sender`: the caller's tenant comes
//! only from `authorization: Bearer <api key>`, resolved through the hashed keys in the
//! watched catalog (no registry read), and travels on as a request extension with the
//! key's scopes; an expired key is refused. Each key's last use is noted in memory and
//! written to the registry at most once a minute per key.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use cellmail_proto::ApiError;
use cellmail_registry::Registry;
use cellmail_registry::apikey;
use cellmail_registry::catalog::WatchedCatalog;
use cellmail_registry::schema::{self, KeyUseRecord, Keys};
use tokio_util::sync::CancellationToken;
use tonic::service::Interceptor;
use tonic::{Request, Status};

use crate::routes::{Grant, Routes};

/// How often a key's last use is written to the registry, at most.
const USE_EVERY: Duration = Duration::from_secs(60);

/// Keys used since their last write: key hash -> when last used, the last use written, and
/// when that write was (0: never), in ms.
#[derive(Default)]
pub struct Usage(Mutex<HashMap<String, (u64, u64, u64)>>);

impl Usage {
    fn note(&self, hash: String, now_ms: u64) {
        let mut used = self.0.lock().unwrap_or_else(|p| p.into_inner());
        used.entry(hash).or_insert((0, 0, 0)).0 = now_ms;
    }

    /// Keys whose last use is not written yet, never written or written over `USE_EVERY` ago
    /// (all of them with `force`), marked written.
    fn due(&self, now_ms: u64, force: bool) -> Vec<(String, u64)> {
        let mut used = self.0.lock().unwrap_or_else(|p| p.into_inner());
        let every = USE_EVERY.as_millis() as u64;
        used.iter_mut()
            .filter(|(_, (last, written, at))| {
                last > written && (force || *at == 0 || now_ms >= at + every)
            })
            .map(|(hash, (last, written, at))| {
                (*written, *at) = (*last, now_ms);
                (hash.clone(), *last)
            })
            .collect()
    }

    /// Writes due last uses every second (and all of them at `shutdown`).
    pub async fn write(
        self: Arc<Self>,
        registry: Arc<dyn Registry>,
        keys: Keys,
        shutdown: CancellationToken,
    ) {
        loop {
            let stopping = tokio::select! {
                () = shutdown.cancelled() => true,
                () = tokio::time::sleep(Duration::from_secs(1)) => false,
            };
            for (hash, last_used_ms) in self.due(cellmail_proto::now_ms(), stopping) {
                let record = KeyUseRecord { last_used_ms };
                let key = keys.key_use(&hash);
                if let Err(err) = registry.put(&key, schema::encode(&record), None).await {
                    tracing::debug!(%err, "writing a key's last use failed");
                }
            }
            if stopping {
                return;
            }
        }
    }
}

#[derive(Clone)]
pub struct Authenticate {
    catalog: Arc<WatchedCatalog<Routes>>,
    usage: Arc<Usage>,
}

impl Authenticate {
    pub fn new(catalog: Arc<WatchedCatalog<Routes>>, usage: Arc<Usage>) -> Self {
        Self { catalog, usage }
    }

    fn grant(&self, request: &Request<()>) -> Result<Grant, ApiError> {
        let header = request.metadata().get("authorization").ok_or_else(|| {
            ApiError::Unauthenticated("missing `authorization: Bearer <api key>` metadata".into())
        })?;
        let key = header
            .to_str()
            .ok()
            .and_then(|value| value.strip_prefix("Bearer "))
            .map(str::trim)
            .filter(|key| !key.is_empty())
            .ok_or_else(|| {
                ApiError::Unauthenticated("authorization must be `Bearer <api key>`".into())
            })?;
        let hash = apikey::hash(key);
        let grant = self
            .catalog
            .read()
            .grant(&hash)
            .cloned()
            .ok_or_else(|| ApiError::Unauthenticated("unknown or revoked API key".into()))?;
        let now = cellmail_proto::now_ms();
        if grant.expires_at_ms.is_some_and(|at| now >= at) {
            return Err(ApiError::Unauthenticated("the API key has expired".into()));
        }
        self.usage.note(hash, now);
        Ok(grant)
    }
}

impl Interceptor for Authenticate {
    fn call(&mut self, mut request: Request<()>) -> Result<Request<()>, Status> {
        let grant = self.grant(&request).inspect_err(|_| {
            crate::telemetry::refused_unauthenticated(&request);
        })?;
        request.extensions_mut().insert(grant.tenant);
        request.extensions_mut().insert(grant.scopes);
        Ok(request)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_key_is_written_on_first_use_then_at_most_once_a_minute() {
        let usage = Usage::default();
        usage.note("k".into(), 1_000);
        assert_eq!(usage.due(1_000, false), [("k".to_owned(), 1_000)]);
        usage.note("k".into(), 2_000);
        assert!(usage.due(30_000, false).is_empty(), "written a second ago");
        assert_eq!(usage.due(61_000, false), [("k".to_owned(), 2_000)]);
        assert!(usage.due(200_000, false).is_empty(), "not used since");
        usage.note("k".into(), 200_500);
        assert_eq!(usage.due(200_600, true), [("k".to_owned(), 200_500)]);
    }
}
