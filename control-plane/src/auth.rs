//! The operator credential, as a tonic interceptor in front of `Control`: every call must
//! carry `authorization: Bearer <admin token>`. Only the token's SHA-256 is kept in memory,
//! and a tenant's API key (a different secret) is refused like any other wrong token.

use sha2::{Digest, Sha256};
use tonic::service::Interceptor;
use tonic::{Request, Status};

use cellmail_proto::ApiError;

#[derive(Clone)]
pub struct AdminAuth {
    token_hash: [u8; 32],
}

fn digest(token: &str) -> [u8; 32] {
    Sha256::digest(token.as_bytes()).into()
}

/// A fresh admin token: 256 bits from the OS generator.
pub fn generate_token() -> String {
    use rand::RngCore;
    let mut secret = [0u8; 32];
    rand::rng().fill_bytes(&mut secret);
    format!("cma_{}", hex::encode(secret))
}

impl AdminAuth {
    pub fn new(token: &str) -> Self {
        Self {
            token_hash: digest(token),
        }
    }

    fn check(&self, request: &Request<()>) -> Result<(), ApiError> {
        let presented = request
            .metadata()
            .get("authorization")
            .and_then(|v| v.to_str().ok())
            .and_then(|v| v.strip_prefix("Bearer "))
            .ok_or_else(|| {
                ApiError::Unauthenticated(
                    "the Control API needs `authorization: Bearer <admin token>`".into(),
                )
            })?;
        // Comparing digests keeps the comparison's timing independent of the token itself.
        if digest(presented.trim()) == self.token_hash {
            Ok(())
        } else {
            Err(ApiError::Unauthenticated("wrong admin token".into()))
        }
    }
}

impl Interceptor for AdminAuth {
    fn call(&mut self, request: Request<()>) -> Result<Request<()>, Status> {
        self.check(&request)?;
        Ok(request)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn with(header: Option<&str>) -> Request<()> {
        let mut request = Request::new(());
        if let Some(value) = header {
            request
                .metadata_mut()
                .insert("authorization", value.parse().unwrap());
        }
        request
    }

    #[test]
    fn only_the_admin_token_passes() {
        let mut auth = AdminAuth::new("s3cret-admin");
        assert!(auth.call(with(Some("Bearer s3cret-admin"))).is_ok());
        for wrong in [
            None,
            Some("Bearer nope"),
            Some("s3cret-admin"),
            Some("Bearer cm_0123_tenantkey"),
        ] {
            let status = auth.call(with(wrong)).unwrap_err();
            assert_eq!(status.code(), tonic::Code::Unauthenticated, "{wrong:?}");
        }
    }
}
