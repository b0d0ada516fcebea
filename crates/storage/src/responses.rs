//! Response routes (`response_routes`): which provider key created each
//! Responses API object, per organization, so the gateway can send the
//! object's follow-ups (which carry no `model`) to the same provider.

use chrono::{DateTime, Utc};
use uuid::Uuid;

use crate::db::Db;
use crate::error::Result;

/// Where an org's response lives.
#[derive(Debug, Clone, PartialEq, Eq, sqlx::FromRow)]
pub struct ResponseRoute {
    pub provider_key_id: Uuid,
    /// The provider's current name (the gateway's provider cache is keyed by it).
    pub provider_name: String,
    /// The provider's endpoint that created it (`None`: unknown).
    pub endpoint_id: Option<Uuid>,
    pub created_at: DateTime<Utc>,
}

impl Db {
    /// Records that `provider_key_id` (at `endpoint_id`) created `response_id` for `org_id`;
    /// a repeat is a no-op (the first record stands). Returns whether a
    /// row was written: false too when the provider is not the org's.
    pub async fn insert_response_route(
        &self,
        org_id: Uuid,
        response_id: &str,
        provider_key_id: Uuid,
        endpoint_id: Option<Uuid>,
    ) -> Result<bool> {
        let done = sqlx::query(
            "INSERT INTO response_routes (org_id, response_id, provider_key_id, endpoint_id)
             SELECT $1, $2, id, $4 FROM provider_keys WHERE id = $3 AND org_id = $1
             ON CONFLICT (org_id, response_id) DO NOTHING",
        )
        .bind(org_id)
        .bind(response_id)
        .bind(provider_key_id)
        .bind(endpoint_id)
        .execute(&self.pool)
        .await?;
        Ok(done.rows_affected() == 1)
    }

    /// The provider that created `response_id` for `org_id` (another org's
    /// response is `None`, like a missing one).
    pub async fn response_route(
        &self,
        org_id: Uuid,
        response_id: &str,
    ) -> Result<Option<ResponseRoute>> {
        Ok(sqlx::query_as::<_, ResponseRoute>(
            "SELECT r.provider_key_id, p.name AS provider_name, r.endpoint_id, r.created_at
             FROM response_routes r
             JOIN provider_keys p ON p.id = r.provider_key_id AND p.org_id = r.org_id
             WHERE r.org_id = $1 AND r.response_id = $2",
        )
        .bind(org_id)
        .bind(response_id)
        .fetch_optional(&self.pool)
        .await?)
    }
}
