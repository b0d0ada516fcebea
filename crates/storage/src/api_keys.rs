//! Gateway API keys, stored as SHA-256 digests.

use chrono::{DateTime, Utc};
use serde::Serialize;
use serde_json::json;
use sqlx::PgConnection;
use uuid::Uuid;

use crate::audit::{record, Actor};
use crate::db::Db;
use crate::domain::Role;
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

/// The least role that may create API keys.
pub const API_KEY_CREATOR_ROLE: Role = Role::Admin;

/// Revokes, or with `transfer_to` hands over, every unrevoked key `user_id`
/// created in the org; returns their ids. The caller holds the organization
/// lock. Rows are locked in id order, as every multi-row writer of
/// `api_keys` does, so concurrent batches cannot deadlock.
pub(crate) async fn release_keys_of(
    conn: &mut PgConnection,
    org_id: Uuid,
    user_id: Uuid,
    transfer_to: Option<Uuid>,
) -> Result<Vec<Uuid>> {
    Ok(sqlx::query_scalar(
        "UPDATE api_keys
         SET revoked_at = CASE WHEN $3::uuid IS NULL THEN now() ELSE revoked_at END,
             created_by = coalesce($3::uuid, created_by)
         WHERE id IN (SELECT id FROM api_keys
                      WHERE org_id = $1 AND created_by = $2 AND revoked_at IS NULL
                      ORDER BY id FOR NO KEY UPDATE)
         RETURNING id",
    )
    .bind(org_id)
    .bind(user_id)
    .bind(transfer_to)
    .fetch_all(conn)
    .await?)
}

impl Db {
    /// Creates a key; the secret is returned once and only its digest is kept.
    ///
    /// A user creating a key must still be a member with at least
    /// [`API_KEY_CREATOR_ROLE`] when the key is inserted: the share lock on
    /// the organization row waits for a removal or demotion in flight (they
    /// hold `FOR NO KEY UPDATE` on it), so a key can never outlive the
    /// removal of its creator.
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
        sqlx::query("SELECT id FROM organizations WHERE id = $1 FOR SHARE")
            .bind(org_id)
            .fetch_optional(&mut *tx)
            .await?
            .ok_or(StorageError::NotFound)?;
        if let Some(user_id) = actor.0 {
            let role: Option<String> = sqlx::query_scalar(
                "SELECT role FROM memberships WHERE org_id = $1 AND user_id = $2",
            )
            .bind(org_id)
            .bind(user_id)
            .fetch_optional(&mut *tx)
            .await?;
            let role = Role::from_db(&role.ok_or(StorageError::NotFound)?);
            if role < API_KEY_CREATOR_ROLE {
                return Err(StorageError::RoleTooLow(API_KEY_CREATOR_ROLE));
            }
        }
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
        // Rows are locked in id order (see `release_keys_of`).
        sqlx::query(
            "UPDATE api_keys k SET last_used_at = GREATEST(k.last_used_at, u.t)
             FROM UNNEST($1::uuid[], $2::timestamptz[]) AS u(id, t)
             WHERE k.id = u.id AND k.id IN (SELECT id FROM api_keys WHERE id = ANY($1)
                                            ORDER BY id FOR NO KEY UPDATE)",
        )
        .bind(ids)
        .bind(times)
        .execute(&self.pool)
        .await?;
        Ok(())
    }
}
