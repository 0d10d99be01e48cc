//! What delivery and provisioning read of the cell's tenants in the watched catalog: whether
//! a class of a tenant's mail is paused, the tenant's share of the sending, and its sending
//! domains as the mail transport is told of them, each with the domain's own DKIM key
//! (opened with the cell's key-encryption keys, `--dkim-key-file`).

use std::sync::Arc;

use cellmail_proto::{MessageClass, TenantId};
use cellmail_registry::catalog::WatchedCatalog;
use cellmail_registry::dkim::{self, DkimKeys};
use cellmail_registry::schema::{IdentityRecord, Tier};

use crate::breaker::{Gate, PREMIUM_WEIGHT};
use crate::mailer::{DkimSigning, Identity};

pub struct Directory {
    pub catalog: Arc<WatchedCatalog>,
    /// What opens domains' DKIM keys (none: identities sign with the transport's own keys).
    pub dkim: Option<DkimKeys>,
}

impl Directory {
    /// Each of `tenant`'s sending domains, as the transport is told of it.
    pub fn identities(&self, tenant: &TenantId) -> Vec<Identity> {
        let catalog = self.catalog.read();
        let Some(record) = catalog.tenants.get(tenant) else {
            return Vec::new();
        };
        record.identities.iter().map(|i| self.identity(i)).collect()
    }

    fn identity(&self, record: &IdentityRecord) -> Identity {
        let domain = record.domain.clone();
        let dkim = match (&self.dkim, record.dkim.first()) {
            (Some(keys), Some(key)) => match keys.open(&domain, &key.sealed_private_key) {
                Ok(private_key) => Some(DkimSigning {
                    selector: key.selector.clone(),
                    private_key: dkim::for_ses(&private_key),
                }),
                Err(err) => {
                    tracing::warn!(%domain, %err, "cannot open the domain's DKIM key; its identity signs without it");
                    None
                }
            },
            _ => None,
        };
        Identity { domain, dkim }
    }
}

impl Gate for Directory {
    fn paused(&self, tenant: &TenantId, class: MessageClass) -> bool {
        self.catalog.read().tripped(tenant, class).is_some()
    }

    fn weight(&self, tenant: &TenantId) -> u32 {
        match self.catalog.read().tenants.get(tenant).map(|t| t.tier) {
            Some(Tier::Premium) => PREMIUM_WEIGHT,
            _ => 1,
        }
    }

    fn identity(&self, tenant: &TenantId, domain: &str) -> Identity {
        let catalog = self.catalog.read();
        let known = (catalog.tenants.get(tenant))
            .and_then(|t| t.identities.iter().find(|i| i.domain == domain));
        match known {
            Some(record) => self.identity(record),
            None => Identity {
                domain: domain.to_owned(),
                dkim: None,
            },
        }
    }
}
