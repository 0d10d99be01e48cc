//! What delivery and provisioning read of the cell's tenants in the watched catalog: whether
//! a class of a tenant's mail is paused, the tenant's share of the sending, and its sending
//! domains as the mail transport is told of them, each with the domain's own DKIM key
//! (opened with the cell's key-encryption keys, `--dkim-key-file`).

use std::borrow::Cow;
use std::collections::HashMap;
use std::sync::{Arc, Mutex};

use cellmail_proto::{MessageClass, TenantId};
use cellmail_registry::catalog::WatchedCatalog;
use cellmail_registry::dkim::{self, DkimKeys};
use cellmail_registry::schema::{DkimKey, IdentityRecord, TenantStatus, Tier};

use crate::breaker::{Gate, PREMIUM_WEIGHT};
use crate::engagement::{Asks, EngagementConfig};
use crate::mailer::{DkimSigning, Identity, Setup};
use crate::message::Message;

pub struct Directory {
    catalog: Arc<WatchedCatalog>,
    /// What opens domains' DKIM keys (none: identities sign with the transport's own keys).
    dkim: Option<DkimKeys>,
    /// Keys opened already, by domain and selector: a send asks for its From domain's, and
    /// opening one (AES-GCM and base64) each time would put that on every delivery.
    opened: Mutex<HashMap<(String, String), DkimSigning>>,
    /// Held by a sweep while it sets a tenant up, and by offboarding while it removes one.
    setting_up: tokio::sync::Mutex<()>,
    engagement: EngagementConfig,
}

impl Directory {
    pub fn new(
        catalog: Arc<WatchedCatalog>,
        dkim: Option<DkimKeys>,
        engagement: EngagementConfig,
    ) -> Self {
        Self {
            catalog,
            dkim,
            opened: Mutex::default(),
            setting_up: tokio::sync::Mutex::default(),
            engagement,
        }
    }

    /// One sweep's setup or one offboarding's removal at a time: each checks the tenant's
    /// status under it, so a sweep that listed a tenant before it was suspended does not set
    /// up again what its offboarding removed.
    pub async fn one_at_a_time(&self) -> tokio::sync::MutexGuard<'_, ()> {
        self.setting_up.lock().await
    }

    /// The tenant's status, `None` when the catalog does not have it.
    pub fn status(&self, tenant: &TenantId) -> Option<TenantStatus> {
        self.catalog.read().tenants.get(tenant).map(|t| t.status)
    }

    pub fn catalog(&self) -> &WatchedCatalog {
        &self.catalog
    }

    /// `tenant` with each of its sending domains, as the transport is told of it.
    pub fn setup(&self, tenant: &TenantId) -> Setup {
        let catalog = self.catalog.read();
        let Some(record) = catalog.tenants.get(tenant) else {
            return Setup::default();
        };
        Setup {
            identities: record.identities.iter().map(|i| self.identity(i)).collect(),
            reputation: record.policy.ses_reputation,
        }
    }

    fn identity(&self, record: &IdentityRecord) -> Identity {
        let domain = record.domain.clone();
        let dkim = match (&self.dkim, record.signing_key()) {
            (Some(keys), Some(key)) => self.signing(keys, &domain, key),
            _ => None,
        };
        Identity {
            mail_from: Some(record.mail_from_domain()),
            domain,
            dkim,
        }
    }

    /// `key` of `domain` opened, once.
    fn signing(&self, keys: &DkimKeys, domain: &str, key: &DkimKey) -> Option<DkimSigning> {
        let id = (domain.to_owned(), key.selector.clone());
        // Only whole inserts happen under the lock; a panic cannot leave it half-changed.
        let mut opened = self.opened.lock().unwrap_or_else(|p| p.into_inner());
        if let Some(signing) = opened.get(&id) {
            return Some(signing.clone());
        }
        match keys.open(domain, &key.sealed_private_key) {
            Ok(private_key) => {
                let signing = DkimSigning {
                    selector: key.selector.clone(),
                    private_key: dkim::for_ses(&private_key),
                };
                opened.insert(id, signing.clone());
                Some(signing)
            }
            Err(err) => {
                tracing::warn!(%domain, %err, "cannot open the domain's DKIM key; its identity signs without it");
                None
            }
        }
    }
}

impl Gate for Directory {
    fn decorate<'m>(&self, message: &'m Message) -> Cow<'m, Message> {
        let catalog = self.catalog.read();
        let Some(tenant) = catalog.tenants.get(&message.tenant) else {
            return Cow::Borrowed(message);
        };
        let policy = &tenant.policy;
        let asks = Asks {
            tracked: policy.tracked.of(message.class),
            unsubscribe: message.class == MessageClass::Marketing
                || policy.unsubscribe_transactional,
        };
        self.engagement.decorate(message, asks, &catalog.tracking)
    }

    fn paused(&self, tenant: &TenantId, class: MessageClass) -> bool {
        self.catalog.read().tripped(tenant, class).is_some()
    }

    fn weight(&self, tenant: &TenantId) -> u32 {
        match self.catalog.read().tenants.get(tenant).map(|t| t.tier) {
            Some(Tier::Premium) => PREMIUM_WEIGHT,
            _ => 1,
        }
    }

    fn setup(&self, tenant: &TenantId, domain: &str) -> Setup {
        let catalog = self.catalog.read();
        let Some(record) = catalog.tenants.get(tenant) else {
            return Setup::unlisted(domain);
        };
        let known = record.identities.iter().find(|i| i.domain == domain);
        Setup {
            identities: vec![
                known.map_or_else(|| Identity::unlisted(domain), |i| self.identity(i)),
            ],
            reputation: record.policy.ses_reputation,
        }
    }
}
