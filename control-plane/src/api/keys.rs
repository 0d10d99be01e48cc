//! A tenant's API keys: issued with their scopes and expiry (the plaintext is answered once
//! and only its hash is kept), listed with when each was last used, and revoked. Keys are
//! audited by their id only.

use cellmail_proto::v1;
use cellmail_proto::{ApiError, TenantId, now_ms};
use tonic::Request;

use super::{ControlApi, actor};
use cellmail_registry::apikey;
use cellmail_registry::audit;
use cellmail_registry::schema::{self, ApiKeyRecord, KeyUseRecord, Scope};
use cellmail_registry::{Compare, Op};

impl ControlApi {
    pub(super) async fn issue_api_key(
        &self,
        request: Request<v1::IssueApiKeyRequest>,
    ) -> Result<v1::IssueApiKeyResponse, ApiError> {
        let actor = actor(&request);
        let req = request.into_inner();
        let id = TenantId::from_field("tenant_id", req.tenant_id)?;
        let tenant_key = self.keys.tenant(&id);
        let Some(tenant) = self
            .registry
            .get(&tenant_key)
            .await
            .map_err(ApiError::from)?
        else {
            return Err(ApiError::NotFound(format!("tenant {id} does not exist")));
        };
        let mut scopes = req
            .scopes
            .iter()
            .enumerate()
            .map(|(i, name)| {
                name.parse::<Scope>()
                    .map_err(|reason| ApiError::invalid(format!("scopes[{i}]"), reason))
            })
            .collect::<Result<Vec<_>, _>>()?;
        if scopes.is_empty() {
            scopes = Scope::all();
        }
        scopes.sort();
        scopes.dedup();
        let created_at_ms = now_ms();
        let expires_at_ms = match req.expires_at_ms {
            0 => None,
            at if at <= created_at_ms => {
                return Err(ApiError::invalid("expires_at_ms", "is not in the future"));
            }
            at => Some(at),
        };
        let key = apikey::issue();
        let record = ApiKeyRecord {
            tenant: id.clone(),
            key_id: key.key_id.clone(),
            created_at_ms,
            scopes,
            expires_at_ms,
        };
        // The record names the key by its id only: neither the key nor its hash is audited.
        let entry = audit::entry(
            (actor, req.reason),
            "key.issue",
            Some(&id),
            None,
            audit::snapshot(&record),
        );
        // Fails if the tenant was deleted in the meantime, so no key outlives its tenant.
        let compares = vec![Compare {
            key: tenant_key,
            mod_revision: tenant.mod_revision,
        }];
        let ops = vec![
            Op::Put {
                key: self.keys.api_key(&key.hash),
                value: schema::encode(&record),
                lease: None,
            },
            audit::entry_op(&self.keys, &entry),
        ];
        if self
            .registry
            .txn(compares, ops)
            .await
            .map_err(ApiError::from)?
            .is_none()
        {
            return Err(ApiError::Unavailable(format!(
                "tenant {id} changed while issuing a key; retry"
            )));
        }
        tracing::info!(tenant = %id, key_id = %key.key_id, "API key issued");
        Ok(v1::IssueApiKeyResponse {
            api_key: key.plaintext,
            key_id: key.key_id,
        })
    }

    pub(super) async fn list_api_keys(
        &self,
        request: Request<v1::ListApiKeysRequest>,
    ) -> Result<v1::ListApiKeysResponse, ApiError> {
        let req = request.into_inner();
        let id = TenantId::from_field("tenant_id", req.tenant_id)?;
        let uses = self
            .registry
            .list(&self.keys.key_uses())
            .await
            .map_err(ApiError::from)?;
        let last_used: std::collections::HashMap<&str, u64> = uses
            .entries
            .iter()
            .filter_map(|kv| {
                let hash = kv.key.rsplit('/').next()?;
                let record = schema::decode::<KeyUseRecord>(&kv.value).ok()?;
                Some((hash, record.last_used_ms))
            })
            .collect();
        let mut keys: Vec<_> = self
            .keys_of(&id)
            .await?
            .into_iter()
            .map(|(key, r)| v1::ApiKeyInfo {
                last_used_ms: key
                    .rsplit('/')
                    .next()
                    .and_then(|hash| last_used.get(hash))
                    .copied()
                    .unwrap_or(0) as i64,
                key_id: r.key_id,
                created_at_ms: r.created_at_ms as i64,
                scopes: r.scopes.iter().map(|s| s.as_str().to_owned()).collect(),
                expires_at_ms: r.expires_at_ms.unwrap_or(0),
            })
            .collect();
        keys.sort_by(|a, b| (a.created_at_ms, &a.key_id).cmp(&(b.created_at_ms, &b.key_id)));
        Ok(v1::ListApiKeysResponse { keys })
    }

    pub(super) async fn revoke_api_key(
        &self,
        request: Request<v1::RevokeApiKeyRequest>,
    ) -> Result<v1::RevokeApiKeyResponse, ApiError> {
        let actor = actor(&request);
        let req = request.into_inner();
        let id = TenantId::from_field("tenant_id", req.tenant_id)?;
        if req.key_id.is_empty() {
            return Err(ApiError::invalid("key_id", "is required"));
        }
        let found = self
            .keys_of(&id)
            .await?
            .into_iter()
            .find(|(_, r)| r.key_id == req.key_id);
        let Some((key, record)) = found else {
            return Ok(v1::RevokeApiKeyResponse { revoked: false });
        };
        let Some(kv) = self.registry.get(&key).await.map_err(ApiError::from)? else {
            return Ok(v1::RevokeApiKeyResponse { revoked: false });
        };
        let entry = audit::entry(
            (actor, req.reason),
            "key.revoke",
            Some(&id),
            audit::snapshot(&record),
            None,
        );
        let hash = key.rsplit('/').next().unwrap_or_default();
        let compares = vec![Compare {
            key: key.clone(),
            mod_revision: kv.mod_revision,
        }];
        let ops = vec![
            Op::Delete {
                key: self.keys.key_use(hash),
            },
            Op::Delete { key: key.clone() },
            audit::entry_op(&self.keys, &entry),
        ];
        if self
            .registry
            .txn(compares, ops)
            .await
            .map_err(ApiError::from)?
            .is_none()
        {
            return Err(ApiError::Aborted(format!(
                "key {} changed meanwhile; try again",
                req.key_id
            )));
        }
        tracing::info!(tenant = %id, key_id = %req.key_id, "API key revoked");
        Ok(v1::RevokeApiKeyResponse { revoked: true })
    }

    async fn keys_of(&self, tenant: &TenantId) -> Result<Vec<(String, ApiKeyRecord)>, ApiError> {
        apikey::of_tenant(self.registry.as_ref(), &self.keys, tenant)
            .await
            .map_err(ApiError::from)
    }
}
