//! Fault injection: a [`Mailer`] that fails a share of delivery attempts, retryably, before
//! they reach the mailer it wraps. Operators turn it on (`--fault-send-failure-ratio`) for
//! game days and rollout drills: a cell that fails its sends must be caught by a rollout's
//! health gate, and its mail must wait and go out later, not be lost.

use std::sync::Arc;
use std::time::Duration;

use async_trait::async_trait;
use rand::Rng;

use cellmail_proto::TenantId;

use super::{IdentityStatus, Mailer, MailerError, Sending, Setup};
use crate::message::Message;

pub struct FaultyMailer {
    inner: Arc<dyn Mailer>,
    ratio: f64,
}

impl FaultyMailer {
    /// Fails `ratio` (0 to 1) of the attempts `inner` would make.
    pub fn new(inner: Arc<dyn Mailer>, ratio: f64) -> anyhow::Result<Self> {
        anyhow::ensure!(
            (0.0..=1.0).contains(&ratio),
            "--fault-send-failure-ratio {ratio}: must be between 0 and 1"
        );
        Ok(Self { inner, ratio })
    }
}

#[async_trait]
impl Mailer for FaultyMailer {
    async fn send(&self, message: &Message) -> Result<(), MailerError> {
        if rand::rng().random_bool(self.ratio) {
            return Err(MailerError::Retryable {
                reason: "injected fault (--fault-send-failure-ratio)".to_owned(),
                retry_after: None,
            });
        }
        self.inner.send(message).await
    }

    async fn prepare(&self, tenant: &TenantId, setup: &Setup) -> Result<(), MailerError> {
        self.inner.prepare(tenant, setup).await
    }

    async fn turn(&self) {
        self.inner.turn().await;
    }

    async fn forget(&self, tenant: &TenantId) -> Result<(), MailerError> {
        self.inner.forget(tenant).await
    }

    async fn account_sending(&self) -> Result<Sending, MailerError> {
        self.inner.account_sending().await
    }

    async fn sending(&self, tenant: &TenantId) -> Result<Sending, MailerError> {
        self.inner.sending(tenant).await
    }

    fn reconcile_every(&self) -> Option<Duration> {
        self.inner.reconcile_every()
    }

    async fn identity_status(&self, domain: &str) -> Result<Option<IdentityStatus>, MailerError> {
        self.inner.identity_status(domain).await
    }

    fn ses_region(&self) -> Option<String> {
        self.inner.ses_region()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    use std::sync::atomic::{AtomicU32, Ordering};

    struct Counting(AtomicU32);

    #[async_trait]
    impl Mailer for Counting {
        async fn send(&self, _message: &Message) -> Result<(), MailerError> {
            self.0.fetch_add(1, Ordering::Relaxed);
            Ok(())
        }
    }

    #[tokio::test]
    async fn a_share_of_attempts_fails_retryably_and_the_rest_reach_the_mailer() {
        let inner = Arc::new(Counting(AtomicU32::new(0)));
        let faulty = FaultyMailer::new(inner.clone(), 0.5).unwrap();
        let message = crate::message::sample::message();
        let mut failed = 0;
        for _ in 0..1000 {
            match faulty.send(&message).await {
                Ok(()) => {}
                Err(MailerError::Retryable { .. }) => failed += 1,
                Err(other) => panic!("not retryable: {other}"),
            }
        }
        assert!((350..=650).contains(&failed), "{failed} of 1000 failed");
        assert_eq!(inner.0.load(Ordering::Relaxed), 1000 - failed);
        assert!(FaultyMailer::new(inner, 1.5).is_err());
    }
}
