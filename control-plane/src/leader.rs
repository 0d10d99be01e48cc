//! Running work that only one control plane may do at a time, on the registry's elections.
//!
//! [`run_as_leader`] takes a lease of its own, campaigns with it, runs the caller's work
//! while it leads and campaigns again (on a fresh lease, at the back of the line) when the
//! work returns or leadership ends. Leadership is the lease: the work is told to stop (its
//! `lost` token is cancelled) as soon as a keepalive finds the lease gone, at most a third of
//! the TTL after the registry dropped it, so a successor can overlap a leader whose lease ran
//! out for about that long. Stopping resigns, so a standby takes over at once rather than
//! when the TTL runs out.
//!
//! [`Leading`] says whether the process leads, as the `cellmail_control_leader` gauge: 1
//! from when leadership is gained until the work has returned, else 0.

use std::future::Future;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Duration;

use tokio_util::sync::CancellationToken;

use cellmail_registry::{LeaderKey, LeaseId, Registry, RegistryError, keep_lease_alive};

const FIRST_RETRY: Duration = Duration::from_millis(100);
/// Short enough that a registry that comes back is used again soon.
const LAST_RETRY: Duration = Duration::from_secs(2);

pub const LEADER: &str = "cellmail_control_leader";

/// How often [`Leading::report`] sets the gauge again: the exporter drops a gauge not set
/// for a minute.
const REPORT: Duration = Duration::from_secs(5);

/// Whether this process leads its election, and the `cellmail_control_leader` gauge (1 or
/// 0) that says so.
#[derive(Debug, Default)]
pub struct Leading(AtomicBool);

impl Leading {
    pub fn get(&self) -> bool {
        self.0.load(Ordering::Relaxed)
    }

    fn set(&self, leading: bool) {
        self.0.store(leading, Ordering::Relaxed);
        metrics::gauge!(LEADER).set(f64::from(u8::from(leading)));
    }

    /// Sets the gauge every few seconds, and at once, until `shutdown`.
    pub async fn report(&self, shutdown: CancellationToken) {
        let mut tick = tokio::time::interval(REPORT);
        loop {
            tokio::select! {
                () = shutdown.cancelled() => return,
                _ = tick.tick() => self.set(self.get()),
            }
        }
    }
}

/// Marks `Leading` while it lives: from leadership gained until the work returned (or the
/// campaign was dropped).
struct Led<'a>(&'a Leading);

impl<'a> Led<'a> {
    fn new(leading: &'a Leading) -> Self {
        leading.set(true);
        Self(leading)
    }
}

impl Drop for Led<'_> {
    fn drop(&mut self) {
        self.0.set(false);
    }
}

/// The waits between attempts while the registry cannot be reached: doubling, capped.
#[derive(Debug)]
struct Backoff {
    next: Duration,
}

impl Backoff {
    fn new() -> Self {
        Self { next: FIRST_RETRY }
    }

    fn next(&mut self) -> Duration {
        let wait = self.next;
        self.next = (self.next * 2).min(LAST_RETRY);
        wait
    }

    fn reset(&mut self) {
        self.next = FIRST_RETRY;
    }
}

/// Until `shutdown`: campaigns in `election` as `id`; once leading, runs `work(lost)` where
/// `lost` is a token cancelled when leadership ends (lease lost, registry refused keepalive,
/// or shutdown), and `leading` says so meanwhile. The work must return soon after `lost` is
/// cancelled: the next campaign waits for it. When work returns or leadership is lost,
/// campaigns again on a fresh lease of `ttl`. While the registry cannot be reached it
/// retries with a short backoff; it fails only on what retrying cannot fix (the registry's
/// storage failing).
pub async fn run_as_leader<F, Fut>(
    registry: Arc<dyn Registry>,
    election: String,
    id: String,
    ttl: Duration,
    shutdown: CancellationToken,
    leading: Arc<Leading>,
    mut work: F,
) -> Result<(), RegistryError>
where
    F: FnMut(CancellationToken) -> Fut,
    Fut: Future<Output = ()>,
{
    let candidate = Candidate {
        registry: registry.as_ref(),
        election: &election,
        id: &id,
        leading: &leading,
    };
    let mut backoff = Backoff::new();
    while !shutdown.is_cancelled() {
        match candidate
            .term(ttl, &shutdown, &mut work, &mut backoff)
            .await
        {
            Ok(()) => {}
            // Unreachable, or the lease expired before the campaign got through: a fresh
            // lease after a pause.
            Err(err @ (RegistryError::Unavailable(_) | RegistryError::LeaseNotFound(_))) => {
                tracing::warn!(%err, election, id, "campaign failed; campaigning again");
                tokio::select! {
                    () = shutdown.cancelled() => {}
                    () = tokio::time::sleep(backoff.next()) => {}
                }
            }
            Err(err) => return Err(err),
        }
    }
    Ok(())
}

/// One participant of one election.
struct Candidate<'a> {
    registry: &'a dyn Registry,
    election: &'a str,
    id: &'a str,
    leading: &'a Leading,
}

impl Candidate<'_> {
    /// One lease: campaigns on it, leads until the work returns or the lease is lost, then
    /// gives the candidacy and the lease up.
    async fn term<F, Fut>(
        &self,
        ttl: Duration,
        shutdown: &CancellationToken,
        work: &mut F,
        backoff: &mut Backoff,
    ) -> Result<(), RegistryError>
    where
        F: FnMut(CancellationToken) -> Fut,
        Fut: Future<Output = ()>,
    {
        let lease = self.registry.grant_lease(ttl).await?;
        let lost = shutdown.child_token();
        // The lease is kept alive from the start: a campaign can wait for a long time.
        let keepalive = keep_lease_alive(self.registry, lease, ttl, lost.clone().cancelled_owned());
        let lead = self.lead(lease, &lost, work, backoff);
        tokio::pin!(keepalive, lead);
        let (led, lease_lost) = tokio::select! {
            kept = &mut keepalive => {
                if let Err(err) = &kept {
                    tracing::warn!(
                        %err, election = self.election, id = self.id, lease,
                        "lease lost: leadership or candidacy ends"
                    );
                }
                lost.cancel();
                (lead.await, kept.is_err())
            }
            led = &mut lead => {
                lost.cancel();
                // Stops at once now that `lost` is cancelled; the lease is given up below.
                let _ = keepalive.await;
                (led, false)
            }
        };
        if lease_lost {
            // The candidacy ended with the lease: there is nothing left to give up.
            return led.map(|_| ());
        }
        // The lease would end the candidacy within its TTL anyway; giving it up now lets the
        // next candidate lead at once.
        if let Ok(Some(leader)) = &led {
            let why = if shutdown.is_cancelled() {
                "shutting down: resigning"
            } else {
                "work returned: resigning"
            };
            tracing::info!(election = self.election, id = self.id, "{why}");
            if let Err(err) = self.registry.resign(leader).await {
                tracing::warn!(
                    %err, election = self.election, id = self.id,
                    "resigning failed; revoking the lease ends the candidacy"
                );
            }
        }
        match self.registry.revoke_lease(lease).await {
            Ok(()) | Err(RegistryError::LeaseNotFound(_)) => {}
            Err(err) => {
                tracing::warn!(%err, lease, "revoking the election lease failed; it expires")
            }
        }
        led.map(|_| ())
    }

    /// Campaigns on `lease` until leading (retrying while the registry is unreachable), then
    /// runs the work. `None` when `lost` came first.
    async fn lead<F, Fut>(
        &self,
        lease: LeaseId,
        lost: &CancellationToken,
        work: &mut F,
        backoff: &mut Backoff,
    ) -> Result<Option<LeaderKey>, RegistryError>
    where
        F: FnMut(CancellationToken) -> Fut,
        Fut: Future<Output = ()>,
    {
        let leader = loop {
            let campaign =
                self.registry
                    .campaign(self.election, self.id.as_bytes().to_vec(), lease);
            let failure = tokio::select! {
                () = lost.cancelled() => return Ok(None),
                campaigned = campaign => match campaigned {
                    Ok(leader) => break leader,
                    Err(RegistryError::Unavailable(reason)) => reason,
                    Err(err) => return Err(err),
                },
            };
            // Same lease, same key: the retry keeps this candidate's place in line.
            tracing::warn!(
                reason = %failure, election = self.election, id = self.id,
                "registry unavailable while campaigning; retrying"
            );
            tokio::select! {
                () = lost.cancelled() => return Ok(None),
                () = tokio::time::sleep(backoff.next()) => {}
            }
        };
        backoff.reset();
        tracing::info!(
            election = self.election,
            id = self.id,
            key = leader.key,
            "leadership gained"
        );
        let led = Led::new(self.leading);
        work(lost.clone()).await;
        drop(led);
        Ok(Some(leader))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn backoff_doubles_up_to_its_cap_and_starts_over_when_reset() {
        let mut backoff = Backoff::new();
        let waits: Vec<Duration> = (0..7).map(|_| backoff.next()).collect();
        let millis: Vec<u128> = waits.iter().map(Duration::as_millis).collect();
        assert_eq!(millis, [100, 200, 400, 800, 1600, 2000, 2000]);
        backoff.reset();
        assert_eq!(backoff.next(), FIRST_RETRY);
    }
}
