//! A tenant's sending domains: adding one (its records to publish), verifying it (in DNS,
//! and as SES on the tenant's cell sees it), rotating its DKIM key, and having the tenant's
//! cell set up its mail transport for the tenant ([`ControlApi::provision`]).
//!
//! A domain's MAIL FROM domain gets one MX record per AWS region the cells send through SES
//! in, so that a move between cells of different regions or accounts needs no DNS change;
//! its DKIM key is its own ("bring your own DKIM"), the same on every cell.

use std::collections::BTreeSet;

use cellmail_proto::v1;
use cellmail_proto::{ApiError, CellId, TenantId, now_ms};
use cellmail_registry::schema::{self, AuditRecord, IdentityRecord, PlacementRecord};
use tonic::Request;

use super::tenants::parse_domain;
use super::{ControlApi, actor};
use crate::identity::{self, DnsRecord};
use crate::registered;

/// How long a rotated-out DKIM key stays published unless the rotation says otherwise.
const DEFAULT_OVERLAP_HOURS: u32 = 7 * 24;

impl ControlApi {
    /// A new identity for `domain`, with a DKIM key of its own when this control plane can
    /// seal one.
    pub(super) fn new_identity(
        &self,
        domain: &str,
        now_ms: u64,
    ) -> Result<IdentityRecord, ApiError> {
        identity::new_identity(domain, now_ms, self.dkim.as_ref())
            .map_err(|e| ApiError::Internal(format!("a DKIM key for {domain}: {e}")))
    }

    /// The AWS regions registered cells send through SES in.
    async fn ses_regions(&self) -> Result<BTreeSet<String>, ApiError> {
        let cells = registered::cells(self.registry.as_ref(), &self.keys).await?;
        Ok(cells
            .into_iter()
            .filter_map(|c| c.record.ses_region)
            .collect())
    }

    /// Has the tenant's cell set up its mail transport for the tenant as of the registry's
    /// `revision` (its record written there or earlier): the cell, and how its transport
    /// sees the tenant's domains.
    pub(super) async fn provision(
        &self,
        tenant: &TenantId,
        revision: u64,
    ) -> Result<(CellId, v1::ProvisionTenantResponse), ApiError> {
        let kv = (self.registry.get(&self.keys.placement(tenant)).await)
            .map_err(ApiError::from)?
            .ok_or_else(|| ApiError::NotFound(format!("tenant {tenant} is not placed")))?;
        let placement: PlacementRecord = schema::decode(&kv.value)
            .map_err(|e| ApiError::Internal(format!("tenant {tenant}'s placement: {e}")))?;
        let cells = registered::cells(self.registry.as_ref(), &self.keys).await?;
        let cell = (cells.into_iter())
            .find(|c| c.id == placement.cell && c.alive)
            .ok_or_else(|| {
                ApiError::Unavailable(format!("tenant {tenant}'s cell {} is down", placement.cell))
            })?;
        let request = v1::ProvisionTenantRequest {
            tenant_id: tenant.to_string(),
            revision,
        };
        let answer = (self.channels.client(&cell.id, &cell.record.endpoint)?)
            .provision_tenant(request)
            .await
            .map_err(|s| ApiError::Unavailable(format!("cell {}: {}", cell.id, s.message())))?;
        Ok((cell.id, answer.into_inner()))
    }

    /// [`ControlApi::provision`] where a failure only delays it: the cell's own sweep sets
    /// the tenant up later.
    pub(super) async fn provision_or_warn(&self, tenant: &TenantId, revision: u64) {
        if let Err(err) = self.provision(tenant, revision).await {
            tracing::warn!(%tenant, %err, "the tenant's cell did not set up its mail transport now; its next sweep will");
        }
    }

    pub(super) async fn add_domain(
        &self,
        request: Request<v1::DomainRequest>,
    ) -> Result<v1::DomainInfo, ApiError> {
        let actor = actor(&request);
        let req = request.into_inner();
        let (id, domain) = tenant_domain(req.tenant_id, &req.domain)?;
        let (before, revision) = self.tenant(&id).await?;
        let regions = self.ses_regions().await?;
        let now = now_ms();
        if let Some(known) = before.identities.iter().find(|i| i.domain == domain) {
            return Ok(domain_info(
                known,
                identity::records(known, &regions, now),
                Vec::new(),
            ));
        }
        let added = self.new_identity(&domain, now)?;
        let mut after = before.clone();
        after.identities.push(added.clone());
        let entry = audit_entry(actor, &id, "tenant.domain.add", &domain, (&before, &after));
        self.write_tenant(&id, revision, &after, &entry).await?;
        // SES starts looking for the records once the identity exists on the tenant's cell.
        let (_, written) = self.tenant(&id).await?;
        self.provision_or_warn(&id, written).await;
        let records = identity::records(&added, &regions, now);
        Ok(domain_info(&added, records, Vec::new()))
    }

    pub(super) async fn verify_domain(
        &self,
        request: Request<v1::DomainRequest>,
    ) -> Result<v1::DomainInfo, ApiError> {
        let actor = actor(&request);
        let req = request.into_inner();
        let (id, domain) = tenant_domain(req.tenant_id, &req.domain)?;
        let (before, revision) = self.tenant(&id).await?;
        let identity = find_identity(&before.identities, &id, &domain)?.clone();
        let now = now_ms();
        let records = identity::records(&identity, &self.ses_regions().await?, now);
        let mut problems = Vec::new();
        for record in &records {
            problems.push(self.dns.check(record).await);
        }
        self.transport_problems(&id, revision, &identity, &records, &mut problems)
            .await;
        if problems.iter().any(Option::is_some) || identity.verified_at_ms.is_some() {
            return Ok(domain_info(&identity, records, problems));
        }
        let mut after = before.clone();
        for i in &mut after.identities {
            if i.domain == domain {
                i.verified_at_ms = Some(now);
            }
        }
        if !after.domains.contains(&domain) {
            after.domains.push(domain.clone());
        }
        let entry = audit_entry(
            actor,
            &id,
            "tenant.domain.verify",
            &domain,
            (&before, &after),
        );
        self.write_tenant(&id, revision, &after, &entry).await?;
        tracing::info!(tenant = %id, %domain, "sending domain verified");
        let verified = IdentityRecord {
            verified_at_ms: Some(now),
            ..identity
        };
        Ok(domain_info(&verified, records, problems))
    }

    /// Adds to `problems` (one per record of `records`) what the mail transport of the
    /// tenant's cell has not verified yet: SES's DKIM status on the signing key's record, its
    /// MAIL FROM status on the MX record of the cell's region; or that the cell could not
    /// be asked, on the first record.
    async fn transport_problems(
        &self,
        tenant: &TenantId,
        revision: u64,
        identity: &IdentityRecord,
        records: &[DnsRecord],
        problems: &mut [Option<String>],
    ) {
        let (cell, answer) = match self.provision(tenant, revision).await {
            Ok(provisioned) => provisioned,
            Err(err) => {
                problems[0].get_or_insert(format!("cannot ask the tenant's cell: {err}"));
                return;
            }
        };
        let Some(seen) = answer
            .identities
            .iter()
            .find(|i| i.domain == identity.domain)
        else {
            // The cell's transport verifies nothing itself (the file sink).
            return;
        };
        let signing = identity.signing_key().map(|k| k.selector.clone());
        let success = identity::TRANSPORT_SUCCESS;
        for (record, problem) in records.iter().zip(problems.iter_mut()) {
            let (status, what) = match record.purpose {
                "dkim" if record.of == signing => (&seen.dkim_status, "DKIM"),
                "mail-from-mx" if record.of.as_deref() == Some(answer.ses_region.as_str()) => {
                    (&seen.mail_from_status, "MAIL FROM")
                }
                _ => continue,
            };
            if status != success {
                problem.get_or_insert(format!(
                    "SES on cell {cell} has not verified it yet: {what} status {status}"
                ));
            }
        }
    }

    pub(super) async fn rotate_dkim(
        &self,
        request: Request<v1::RotateDkimRequest>,
    ) -> Result<v1::DomainInfo, ApiError> {
        let actor = actor(&request);
        let req = request.into_inner();
        let (id, domain) = tenant_domain(req.tenant_id, &req.domain)?;
        let Some(keys) = self.dkim.as_ref() else {
            return Err(ApiError::FailedPrecondition(
                "this control plane has no key-encryption key (--dkim-key-file): domains have no DKIM keys of their own".into(),
            ));
        };
        let overlap_hours = match req.overlap_hours {
            0 => DEFAULT_OVERLAP_HOURS,
            hours => hours,
        };
        let (before, revision) = self.tenant(&id).await?;
        let identity = find_identity(&before.identities, &id, &domain)?;
        let now = now_ms();
        let mut rotated = identity.clone();
        // Keys whose overlap is over are no longer published, nor kept.
        rotated
            .dkim
            .retain(|k| k.retire_at_ms.is_none_or(|at| at > now));
        let signing = rotated.signing_key().map(|k| k.selector.clone());
        let next = (rotated.dkim.iter())
            .find(|k| k.retire_at_ms.is_none() && Some(&k.selector) != signing.as_ref())
            .map(|k| k.selector.clone());
        let regions = self.ses_regions().await?;
        let action = match next {
            None => {
                let key = identity::new_dkim_key(&domain, now, keys)
                    .map_err(|e| ApiError::Internal(format!("a DKIM key for {domain}: {e}")))?;
                rotated.dkim.push(key);
                "tenant.domain.rotate-dkim.start"
            }
            Some(next) => {
                let records = identity::records(&rotated, &regions, now);
                let record = (records.iter())
                    .find(|r| r.purpose == "dkim" && r.of.as_ref() == Some(&next))
                    .ok_or_else(|| ApiError::Internal(format!("no record for key {next}")))?;
                if let Some(problem) = self.dns.check(record).await {
                    return Err(ApiError::FailedPrecondition(format!(
                        "dkim: publish the next key's record first ({problem})"
                    )));
                }
                let retire_at = now + u64::from(overlap_hours) * 3_600_000;
                for key in &mut rotated.dkim {
                    if Some(&key.selector) == signing.as_ref() {
                        key.retire_at_ms = Some(retire_at);
                    }
                }
                "tenant.domain.rotate-dkim.switch"
            }
        };
        let mut after = before.clone();
        for i in &mut after.identities {
            if i.domain == domain {
                *i = rotated.clone();
            }
        }
        let entry = audit_entry(actor, &id, action, &domain, (&before, &after));
        self.write_tenant(&id, revision, &after, &entry).await?;
        tracing::info!(tenant = %id, %domain, action, "DKIM key rotation");
        let (_, written) = self.tenant(&id).await?;
        self.provision_or_warn(&id, written).await;
        let records = identity::records(&rotated, &regions, now);
        Ok(domain_info(&rotated, records, Vec::new()))
    }
}

/// The tenant and the domain a request names, or INVALID_ARGUMENT naming the field.
fn tenant_domain(tenant_id: String, domain: &str) -> Result<(TenantId, String), ApiError> {
    let tenant = TenantId::from_field("tenant_id", tenant_id)?;
    Ok((tenant, parse_domain("domain".into(), domain)?))
}

/// `tenant`'s identity for `domain`, or NOT_FOUND naming the command that adds it.
fn find_identity<'a>(
    identities: &'a [IdentityRecord],
    tenant: &TenantId,
    domain: &str,
) -> Result<&'a IdentityRecord, ApiError> {
    identities
        .iter()
        .find(|i| i.domain == domain)
        .ok_or_else(|| {
            ApiError::NotFound(format!(
                "domain: {domain} was not added to tenant {tenant} (cellmail tenant domain add)"
            ))
        })
}

/// The audit entry of a change to `tenant`'s `domain`.
fn audit_entry<T: serde::Serialize>(
    actor: String,
    tenant: &TenantId,
    action: &str,
    domain: &str,
    (before, after): (&T, &T),
) -> AuditRecord {
    AuditRecord {
        at_ms: now_ms(),
        actor,
        action: action.into(),
        tenant: Some(tenant.clone()),
        reason: domain.to_owned(),
        before: cellmail_registry::audit::snapshot(before),
        after: cellmail_registry::audit::snapshot(after),
    }
}

/// `records` of `identity`, each with what a check found wrong (`problems`, in the same
/// order; empty when not checked).
fn domain_info(
    identity: &IdentityRecord,
    records: Vec<DnsRecord>,
    problems: Vec<Option<String>>,
) -> v1::DomainInfo {
    let mut problems = problems.into_iter();
    let records = records
        .into_iter()
        .map(|r| v1::DnsRecordInfo {
            purpose: r.purpose.to_owned(),
            r#type: r.kind.to_string(),
            name: r.name,
            value: r.value,
            problem: problems.next().flatten().unwrap_or_default(),
            note: r.note,
        })
        .collect();
    v1::DomainInfo {
        domain: identity.domain.clone(),
        verified: identity.verified_at_ms.is_some(),
        records,
    }
}
