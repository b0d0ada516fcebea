//! Gateway API keys, stored as SHA-256 digests.

use chrono::{DateTime, Utc};
use serde::Serialize;
use serde_json::json;
use uuid::Uuid;

use crate::audit::{record, Actor};
use crate::db::Db;
use crate::error::{Result, StorageError};
use crate::page::{Cursor, Page};
use crate::secrets::ApiKeySecret;

/// An API key as listed to admins (never the key itself).
#[derive(Debug, Clone, Serialize, sqlx::FromRow)]
pub struct ApiKey {
    pub id: Uuid,
    pub name: String,
    pub prefix: String,
    pub created_at: DateTime<Utc>,
    pub expires_at: Option<DateTime<Utc>>,
    pub last_used_at: Option<DateTime<Utc>>,
    pub revoked_at: Option<DateTime<Utc>>,
}

/// What the gateway needs to authenticate a presented key.
#[derive(Debug, Clone, sqlx::FromRow)]
pub struct ApiKeyAuth {
    pub id: Uuid,
    pub org_id: Uuid,
    pub expires_at: Option<DateTime<Utc>>,
    pub revoked_at: Option<DateTime<Utc>>,
}

/// Whether a key may be used now.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum KeyState {
    Active,
    Revoked,
    Expired,
}

impl ApiKeyAuth {
    pub fn state(&self, now: DateTime<Utc>) -> KeyState {
        if self.revoked_at.is_some() {
            KeyState::Revoked
        } else if self.expires_at.is_some_and(|e| e <= now) {
            KeyState::Expired
        } else {
            KeyState::Active
        }
    }
}

const API_KEY_COLUMNS: &str = "id, name, prefix, created_at, expires_at, last_used_at, revoked_at";

impl Db {
    /// Creates a key; the secret is returned once and only its digest is kept.
    pub async fn create_api_key(
        &self,
        org_id: Uuid,
        actor: Actor,
        name: &str,
        expires_at: Option<DateTime<Utc>>,
    ) -> Result<(ApiKey, ApiKeySecret)> {
        let secret = ApiKeySecret::generate();
        let id = Uuid::new_v4();
        let mut tx = self.pool.begin().await?;
        let key = sqlx::query_as::<_, ApiKey>(&format!(
            "INSERT INTO api_keys (id, org_id, name, digest, prefix, created_by, expires_at)
             VALUES ($1, $2, $3, $4, $5, $6, $7) RETURNING {API_KEY_COLUMNS}"
        ))
        .bind(id)
        .bind(org_id)
        .bind(name)
        .bind(&secret.digest()[..])
        .bind(secret.display_prefix())
        .bind(actor.0)
        .bind(expires_at)
        .fetch_one(&mut *tx)
        .await?;
        record(
            &mut tx,
            org_id,
            actor,
            "api_key.create",
            "api_key",
            Some(id),
            json!({"name": name, "prefix": key.prefix}),
        )
        .await?;
        tx.commit().await?;
        Ok((key, secret))
    }

    /// The organization's keys, newest first.
    pub async fn list_api_keys(
        &self,
        org_id: Uuid,
        after: Option<&Cursor>,
        limit: u32,
    ) -> Result<Page<ApiKey>> {
        let limit = limit.clamp(1, 200);
        let rows = sqlx::query_as::<_, ApiKey>(&format!(
            "SELECT {API_KEY_COLUMNS} FROM api_keys
             WHERE org_id = $1 AND ($2::timestamptz IS NULL OR (created_at, id) < ($2, $3))
             ORDER BY created_at DESC, id DESC LIMIT $4"
        ))
        .bind(org_id)
        .bind(after.map(|c| c.at))
        .bind(after.map(|c| c.id))
        .bind(i64::from(limit) + 1)
        .fetch_all(&self.pool)
        .await?;
        Ok(Page::from_rows(rows, limit, |k| Cursor {
            at: k.created_at,
            id: k.id,
        }))
    }

    pub async fn get_api_key(&self, org_id: Uuid, id: Uuid) -> Result<ApiKey> {
        sqlx::query_as::<_, ApiKey>(&format!(
            "SELECT {API_KEY_COLUMNS} FROM api_keys WHERE org_id = $1 AND id = $2"
        ))
        .bind(org_id)
        .bind(id)
        .fetch_optional(&self.pool)
        .await?
        .ok_or(StorageError::NotFound)
    }

    /// Revokes a key (idempotent: the first revocation time is kept).
    pub async fn revoke_api_key(&self, org_id: Uuid, actor: Actor, id: Uuid) -> Result<ApiKey> {
        let mut tx = self.pool.begin().await?;
        let key = sqlx::query_as::<_, ApiKey>(&format!(
            "UPDATE api_keys SET revoked_at = coalesce(revoked_at, now())
             WHERE org_id = $1 AND id = $2 RETURNING {API_KEY_COLUMNS}"
        ))
        .bind(org_id)
        .bind(id)
        .fetch_optional(&mut *tx)
        .await?
        .ok_or(StorageError::NotFound)?;
        record(
            &mut tx,
            org_id,
            actor,
            "api_key.revoke",
            "api_key",
            Some(id),
            json!({"prefix": key.prefix}),
        )
        .await?;
        tx.commit().await?;
        Ok(key)
    }

    /// Finds a key by the digest of the presented secret (any org: the key
    /// itself is what identifies the org).
    pub async fn api_key_by_digest(&self, digest: &[u8; 32]) -> Result<Option<ApiKeyAuth>> {
        Ok(sqlx::query_as::<_, ApiKeyAuth>(
            "SELECT id, org_id, expires_at, revoked_at FROM api_keys WHERE digest = $1",
        )
        .bind(&digest[..])
        .fetch_optional(&self.pool)
        .await?)
    }

    /// Records last use of many keys in one statement.
    pub async fn touch_api_keys(&self, uses: &[(Uuid, DateTime<Utc>)]) -> Result<()> {
        if uses.is_empty() {
            return Ok(());
        }
        let ids: Vec<Uuid> = uses.iter().map(|u| u.0).collect();
        let times: Vec<DateTime<Utc>> = uses.iter().map(|u| u.1).collect();
        sqlx::query(
            "UPDATE api_keys k SET last_used_at = GREATEST(k.last_used_at, u.t)
             FROM UNNEST($1::uuid[], $2::timestamptz[]) AS u(id, t) WHERE k.id = u.id",
        )
        .bind(ids)
        .bind(times)
        .execute(&self.pool)
        .await?;
        Ok(())
    }
}
