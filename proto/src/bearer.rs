//! The client side of cellmail's credentials: an interceptor that puts
//! `authorization: Bearer <secret>` on every call (a tenant's API key for `Sender`, the
//! admin token for `Control`).

use tonic::metadata::{Ascii, MetadataValue};
use tonic::service::Interceptor;

#[derive(Clone)]
pub struct Bearer(MetadataValue<Ascii>);

#[derive(Debug, thiserror::Error)]
#[error("the credential holds characters that cannot go in gRPC metadata")]
pub struct InvalidCredential;

impl Bearer {
    pub fn new(secret: &str) -> Result<Self, InvalidCredential> {
        format!("Bearer {}", secret.trim())
            .parse()
            .map(Self)
            .map_err(|_| InvalidCredential)
    }
}

impl Interceptor for Bearer {
    fn call(
        &mut self,
        mut request: tonic::Request<()>,
    ) -> Result<tonic::Request<()>, tonic::Status> {
        request
            .metadata_mut()
            .insert("authorization", self.0.clone());
        Ok(request)
    }
}
