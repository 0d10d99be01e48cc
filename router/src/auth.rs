//! Authentication, as a tonic interceptor in front of `Sender`: the caller's tenant comes
//! only from `authorization: Bearer <api key>`, resolved through the hashed keys in the
//! watched catalog (no registry read), and travels on as a request extension.

use std::sync::Arc;

use cellmail_control::apikey;
use cellmail_control::catalog::WatchedCatalog;
use cellmail_proto::{ApiError, TenantId};
use tonic::service::Interceptor;
use tonic::{Request, Status};

#[derive(Clone)]
pub struct Authenticate {
    catalog: Arc<WatchedCatalog>,
}

impl Authenticate {
    pub fn new(catalog: Arc<WatchedCatalog>) -> Self {
        Self { catalog }
    }

    fn tenant(&self, request: &Request<()>) -> Result<TenantId, ApiError> {
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
        self.catalog
            .read()
            .api_keys
            .get(&hash)
            .map(|record| record.tenant.clone())
            .ok_or_else(|| ApiError::Unauthenticated("unknown or revoked API key".into()))
    }
}

impl Interceptor for Authenticate {
    fn call(&mut self, mut request: Request<()>) -> Result<Request<()>, Status> {
        let tenant = self.tenant(&request)?;
        request.extensions_mut().insert(tenant);
        Ok(request)
    }
}
