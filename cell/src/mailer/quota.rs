//! SES's sending rate. An account may send to at most `MaxSendRate` recipients a second (SES
//! counts every recipient of a message). The cell reads that rate with `GetAccount` and
//! keeps to it through one token bucket that all its delivery workers draw from, in the
//! order they come: a message waits for one token per recipient, in bites of at most a
//! second's worth, so a message to more recipients than that waits as long as it should.
//! A worker takes its message's first token before it takes the message from the delivery
//! lanes ([`super::Mailer::turn`]): workers queue for turns, not with messages in hand, so a
//! quiet tenant's message is sent at the next turn instead of behind every message the
//! workers already hold. The rate is read again every
//! [`REREAD`], so a raised quota is used without a restart.
//!
//! An endpoint without `GetAccount` (an emulator) has no quota: the cell warns once and sends
//! uncapped. Until the rate has been read once, a send fails retryably when it cannot be read
//! (the message waits in the queue): a cell never sends faster than a rate it does not know.

use std::num::NonZeroU32;
use std::sync::Arc;
use std::time::Duration;

use aws_sdk_sesv2::Client;
use aws_sdk_sesv2::error::DisplayErrorContext;
use governor::{DefaultDirectRateLimiter, Quota, RateLimiter};
use tokio::sync::Mutex;
use tokio::time::Instant;

use super::MailerError;
use super::ses::unsupported;

/// How often the account's rate is read again.
pub const REREAD: Duration = Duration::from_secs(600);

/// The account's rate as a token bucket, served in turn.
struct Bucket {
    per_second: f64,
    /// The most tokens taken at once: a second's worth.
    bite: NonZeroU32,
    limiter: DefaultDirectRateLimiter,
    /// Waiters take their tokens in the order they came (tokio's mutex is fair): the
    /// limiter alone wakes every waiter at once and lets any of them win.
    turn: Mutex<()>,
}

impl Bucket {
    fn new(per_second: f64) -> Option<Self> {
        let bite = NonZeroU32::new(per_second.ceil().clamp(1.0, f64::from(u32::MAX)) as u32)?;
        let quota = Quota::with_period(Duration::try_from_secs_f64(1.0 / per_second).ok()?)?;
        Some(Self {
            per_second,
            bite,
            limiter: RateLimiter::direct(quota.allow_burst(bite)),
            turn: Mutex::new(()),
        })
    }

    async fn take(&self, recipients: usize) {
        let _turn = self.turn.lock().await;
        let mut left = u32::try_from(recipients).unwrap_or(u32::MAX);
        while let Some(wanted) = NonZeroU32::new(left) {
            let bite = wanted.min(self.bite);
            // A bite is at most the bucket's burst: it is always granted, in time.
            let _ = self.limiter.until_n_ready(bite).await;
            left -= bite.get();
        }
    }
}

#[derive(Default)]
struct State {
    read_at: Option<Instant>,
    /// `None`: the endpoint has no quota to keep to.
    bucket: Option<Arc<Bucket>>,
}

/// The account's sending rate, shared by every worker of the cell.
#[derive(Default)]
pub struct SendRate {
    state: Mutex<State>,
}

impl SendRate {
    /// Waits until SES's rate lets the cell send to `recipients` more recipients.
    pub async fn take(&self, client: &Client, recipients: usize) -> Result<(), MailerError> {
        if recipients == 0 {
            return Ok(());
        }
        if let Some(bucket) = self.bucket(client).await? {
            bucket.take(recipients).await;
        }
        Ok(())
    }

    async fn bucket(&self, client: &Client) -> Result<Option<Arc<Bucket>>, MailerError> {
        let mut state = self.state.lock().await;
        if state.read_at.is_some_and(|at| at.elapsed() < REREAD) {
            return Ok(state.bucket.clone());
        }
        match client.get_account().send().await {
            Ok(account) => {
                let rate = account.send_quota().map(|quota| quota.max_send_rate);
                let known = state.bucket.as_ref().map(|bucket| bucket.per_second);
                if rate != known {
                    tracing::info!(max_send_rate = ?rate, "the SES account's sending rate");
                    state.bucket = rate.and_then(Bucket::new).map(Arc::new);
                }
            }
            Err(err) if unsupported(&err) => {
                if state.read_at.is_none() {
                    tracing::warn!("the SES endpoint has no GetAccount; sending uncapped");
                }
                state.bucket = None;
            }
            Err(err) if state.read_at.is_some() => {
                tracing::warn!(
                    error = %DisplayErrorContext(&err),
                    "reading the SES account's sending rate; keeping the last one"
                );
            }
            Err(err) => {
                return Err(MailerError::Retryable {
                    reason: format!(
                        "reading the SES account's sending rate: {}",
                        DisplayErrorContext(&err)
                    ),
                    retry_after: None,
                });
            }
        }
        state.read_at = Some(Instant::now());
        Ok(state.bucket.clone())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_bucket_bites_a_seconds_worth_at_most() {
        assert_eq!(Bucket::new(50.0).unwrap().bite.get(), 50);
        assert_eq!(Bucket::new(14.5).unwrap().bite.get(), 15);
        assert_eq!(Bucket::new(0.5).unwrap().bite.get(), 1);
        assert!(Bucket::new(0.0).is_none());
        assert!(Bucket::new(-1.0).is_none());
    }
}
