//! Per-tenant admission at the router: a GCRA token bucket per tenant (governor), sized from
//! the tenant's policy in the registry, checked before anything is forwarded. A tenant over
//! its rate gets RESOURCE_EXHAUSTED with how long to wait; other tenants are not affected.
//!
//! Each router admits a tenant's full rate, so N routers admit up to N times it: this is the
//! coarse first line that keeps a flood off the cells, not an exact quota.

use std::collections::HashMap;
use std::num::NonZeroU32;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use cellmail_proto::TenantId;
use governor::clock::{Clock, DefaultClock};
use governor::{DefaultDirectRateLimiter, Quota, RateLimiter};

use crate::routes::SendRate;

#[derive(Default)]
pub struct Admission {
    limiters: Mutex<HashMap<TenantId, (SendRate, Arc<DefaultDirectRateLimiter>)>>,
    clock: DefaultClock,
}

fn quota(send: SendRate) -> Quota {
    let rate = NonZeroU32::new(send.per_second).unwrap_or(NonZeroU32::MIN);
    let burst = NonZeroU32::new(send.burst).unwrap_or(rate);
    Quota::per_second(rate).allow_burst(burst)
}

impl Admission {
    /// Admits one send for `tenant` at `rate`, or says how long until one would be.
    pub fn check(&self, tenant: &TenantId, rate: SendRate) -> Result<(), Duration> {
        let limiter = {
            let mut limiters = self.limiters.lock().unwrap_or_else(|p| p.into_inner());
            match limiters.get(tenant) {
                Some((current, limiter)) if *current == rate => limiter.clone(),
                // New tenant or changed rate: a fresh bucket with the rate's burst.
                _ => {
                    let limiter = Arc::new(RateLimiter::direct(quota(rate)));
                    limiters.insert(tenant.clone(), (rate, limiter.clone()));
                    limiter
                }
            }
        };
        limiter
            .check()
            .map_err(|not_until| not_until.wait_time_from(self.clock.now()))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_tenant_over_its_burst_waits_and_others_do_not() {
        let admission = Admission::default();
        let (a, b) = (TenantId::new("a").unwrap(), TenantId::new("b").unwrap());
        let rate = SendRate {
            per_second: 10,
            burst: 3,
        };
        for _ in 0..3 {
            assert!(admission.check(&a, rate).is_ok());
        }
        let wait = admission.check(&a, rate).unwrap_err();
        assert!(
            wait > Duration::ZERO && wait <= Duration::from_millis(100),
            "{wait:?}"
        );
        assert!(admission.check(&b, rate).is_ok(), "b has its own bucket");
        let raised = SendRate {
            per_second: 1000,
            burst: 1000,
        };
        assert!(
            admission.check(&a, raised).is_ok(),
            "a new policy takes effect at once"
        );
    }
}
