//! Named operator credentials: added with a role (the credential is answered once and only
//! its hash is kept), listed, and revoked. Each is audited by its name, never its credential.

use cellmail_proto::error::quote;
use cellmail_proto::{ApiError, v1};
use cellmail_registry::schema::{self, OperatorRecord, OperatorRole};
use cellmail_registry::{apikey, audit, operators};
use tonic::Request;

use super::{ControlApi, actor};

fn info(record: &OperatorRecord) -> v1::OperatorInfo {
    v1::OperatorInfo {
        name: record.name.clone(),
        role: record.role.as_str().to_owned(),
        created_at_ms: record.created_at_ms as i64,
    }
}

/// An operator's name: what the audit trail says, so plain and short.
fn name(field: &str, name: &str) -> Result<String, ApiError> {
    let fits = (1..=63).contains(&name.len())
        && name
            .bytes()
            .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'-')
        && !name.starts_with('-');
    fits.then(|| name.to_owned()).ok_or_else(|| {
        ApiError::invalid(
            field,
            format!(
                "{} is not 1 to 63 lowercase letters, digits and '-'",
                quote(name)
            ),
        )
    })
}

impl ControlApi {
    async fn operators(&self) -> Result<Vec<(String, OperatorRecord)>, ApiError> {
        operators::list(self.registry.as_ref(), &self.keys)
            .await
            .map_err(ApiError::from)
    }

    pub(super) async fn add_operator(
        &self,
        request: Request<v1::AddOperatorRequest>,
    ) -> Result<v1::AddOperatorResponse, ApiError> {
        let actor = actor(&request);
        let req = request.into_inner();
        let name = name("name", &req.name)?;
        let role: OperatorRole = req
            .role
            .parse()
            .map_err(|reason: String| ApiError::invalid("role", reason))?;
        if self.operators().await?.iter().any(|(_, r)| r.name == name) {
            return Err(ApiError::AlreadyExists(format!("operator {name} exists")));
        }
        let credential = operators::generate();
        let record = OperatorRecord {
            name: name.clone(),
            role,
            created_at_ms: cellmail_proto::now_ms(),
        };
        let entry = audit::entry(
            (actor, req.reason),
            "operator.add",
            None,
            None,
            audit::snapshot(&record),
        );
        let key = self.keys.operator(&apikey::hash(&credential));
        let written = audit::write(
            self.registry.as_ref(),
            &self.keys,
            &key,
            0,
            schema::encode(&record),
            &entry,
        )
        .await?;
        if !written {
            return Err(ApiError::Aborted(
                "the credential collided; try again".into(),
            ));
        }
        tracing::info!(operator = %name, role = role.as_str(), "operator added");
        Ok(v1::AddOperatorResponse {
            operator: Some(info(&record)),
            credential,
        })
    }

    pub(super) async fn list_operators(
        &self,
        _request: Request<v1::ListOperatorsRequest>,
    ) -> Result<v1::ListOperatorsResponse, ApiError> {
        let mut operators: Vec<_> = self
            .operators()
            .await?
            .iter()
            .map(|(_, r)| info(r))
            .collect();
        operators.sort_by(|a, b| a.name.cmp(&b.name));
        Ok(v1::ListOperatorsResponse { operators })
    }

    pub(super) async fn revoke_operator(
        &self,
        request: Request<v1::RevokeOperatorRequest>,
    ) -> Result<v1::RevokeOperatorResponse, ApiError> {
        let actor = actor(&request);
        let req = request.into_inner();
        let name = name("name", &req.name)?;
        let Some((key, record)) = self
            .operators()
            .await?
            .into_iter()
            .find(|(_, r)| r.name == name)
        else {
            return Ok(v1::RevokeOperatorResponse { revoked: false });
        };
        let Some(kv) = self.registry.get(&key).await.map_err(ApiError::from)? else {
            return Ok(v1::RevokeOperatorResponse { revoked: false });
        };
        let entry = audit::entry(
            (actor, req.reason),
            "operator.revoke",
            None,
            audit::snapshot(&record),
            None,
        );
        let registry = self.registry.as_ref();
        if !audit::remove(registry, &self.keys, &key, kv.mod_revision, &entry).await? {
            return Err(ApiError::Aborted(format!(
                "operator {name} changed meanwhile; try again"
            )));
        }
        tracing::info!(operator = %name, "operator revoked");
        Ok(v1::RevokeOperatorResponse { revoked: true })
    }
}
