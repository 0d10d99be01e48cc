//! Sends too large to read: the framework refuses a request over the Sender's decode limit
//! with OUT_OF_RANGE before any handler runs; [`RefuseOversize`] answers it as every other
//! over-size send is answered, INVALID_ARGUMENT naming the field and the limit (see
//! [`cellmail_proto::size`]).

use std::pin::Pin;
use std::task::{Context, Poll};

use tonic::codegen::{Service, http};
use tonic::server::NamedService;
use tonic::{Code, Status};

/// Wraps the Sender service; `limit` is the router's `--max-message-bytes`.
#[derive(Debug, Clone)]
pub struct RefuseOversize<S> {
    pub inner: S,
    pub limit: usize,
}

type Answer<S, B, R> = Result<http::Response<R>, <S as Service<http::Request<B>>>::Error>;

impl<S, B, R> Service<http::Request<B>> for RefuseOversize<S>
where
    S: Service<http::Request<B>, Response = http::Response<R>>,
    S::Future: Send + 'static,
    R: Default + Send + 'static,
{
    type Response = http::Response<R>;
    type Error = S::Error;
    type Future = Pin<Box<dyn Future<Output = Answer<S, B, R>> + Send>>;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), Self::Error>> {
        self.inner.poll_ready(cx)
    }

    fn call(&mut self, request: http::Request<B>) -> Self::Future {
        let limit = self.limit;
        let answer = self.inner.call(request);
        Box::pin(async move {
            let response = answer.await?;
            // A status the service answered with (and not a cell's, forwarded: a cell reads
            // requests larger than any router's limit) is in the response's extensions.
            let too_large = response
                .extensions()
                .get::<Status>()
                .is_some_and(|status| status.code() == Code::OutOfRange);
            Ok(if too_large {
                cellmail_proto::size::refusal(limit).into_http()
            } else {
                response
            })
        })
    }
}

impl<S: NamedService> NamedService for RefuseOversize<S> {
    const NAME: &'static str = S::NAME;
}
