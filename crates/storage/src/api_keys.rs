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
use crate::limits::{Limits, ModelPattern};
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
    #[sqlx(json)]
    pub limits: Limits,
    /// `None`: every model; empty: none.
    pub allowed_models: Option<Vec<ModelPattern>>,
}

/// What the gateway needs to authenticate a presented key, and to enforce
/// its spend controls and its organization's.
#[derive(Debug, Clone, sqlx::FromRow)]
pub struct ApiKeyAuth {
    pub id: Uuid,
    pub org_id: Uuid,
    pub expires_at: Option<DateTime<Utc>>,
    pub revoked_at: Option<DateTime<Utc>>,
    #[sqlx(json)]
    pub limits: Limits,
    pub allowed_models: Option<Vec<ModelPattern>>,
    #[sqlx(json)]
    pub org_limits: Limits,
}

/// A new key's fields beyond its name.
#[derive(Debug, Clone, Default)]
pub struct KeyOptions {
    pub expires_at: Option<DateTime<Utc>>,
    pub limits: Limits,
    pub allowed_models: Option<Vec<ModelPattern>>,
}

/// Fields a PATCH may change; `None` keeps the current value (for the
/// nullable ones, `Some(None)` clears it).
#[derive(Debug, Clone, Default)]
pub struct ApiKeyPatch {
    pub name: Option<String>,
    pub expires_at: Option<Option<DateTime<Utc>>>,
    pub limits: Option<Limits>,
    pub allowed_models: Option<Option<Vec<ModelPattern>>>,
}

impl ApiKeyPatch {
    pub fn is_empty(&self) -> bool {
        self.name.is_none()
            && self.expires_at.is_none()
            && self.limits.is_none()
            && self.allowed_models.is_none()
    }
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

const API_KEY_COLUMNS: &str =
    "id, name, prefix, created_at, expires_at, last_used_at, revoked_at, limits, allowed_models";

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
        let options = KeyOptions {
            expires_at,
            ..KeyOptions::default()
        };
        self.create_api_key_with(org_id, actor, name, &options)
            .await
    }

    /// [`Db::create_api_key`] with limits and a model scope.
    pub async fn create_api_key_with(
        &self,
        org_id: Uuid,
        actor: Actor,
        name: &str,
        options: &KeyOptions,
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
            "INSERT INTO api_keys (id, org_id, name, digest, prefix, created_by, expires_at, limits, allowed_models)
             VALUES ($1, $2, $3, $4, $5, $6, $7, $8, $9) RETURNING {API_KEY_COLUMNS}"
        ))
        .bind(id)
        .bind(org_id)
        .bind(name)
        .bind(&secret.digest()[..])
        .bind(secret.display_prefix())
        .bind(actor.0)
        .bind(options.expires_at)
        .bind(sqlx::types::Json(&options.limits))
        .bind(&options.allowed_models)
        .fetch_one(&mut *tx)
        .await?;
        let mut details = json!({"name": name, "prefix": key.prefix});
        if options.limits != Limits::default() {
            details["limits"] = json!(options.limits);
        }
        if options.allowed_models.is_some() {
            details["allowed_models"] = json!(options.allowed_models);
        }
        record(
            &mut tx,
            org_id,
            actor,
            "api_key.create",
            "api_key",
            Some(id),
            details,
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

    /// Edits a key without reissuing it; the audit row names each change
    /// (from, to).
    pub async fn update_api_key(
        &self,
        org_id: Uuid,
        actor: Actor,
        id: Uuid,
        patch: &ApiKeyPatch,
    ) -> Result<ApiKey> {
        let mut tx = self.pool.begin().await?;
        let cur = sqlx::query_as::<_, ApiKey>(&format!(
            "SELECT {API_KEY_COLUMNS} FROM api_keys WHERE org_id = $1 AND id = $2 FOR NO KEY UPDATE"
        ))
        .bind(org_id)
        .bind(id)
        .fetch_optional(&mut *tx)
        .await?
        .ok_or(StorageError::NotFound)?;
        let name = patch.name.as_deref().unwrap_or(&cur.name);
        let expires_at = patch.expires_at.unwrap_or(cur.expires_at);
        let limits = patch.limits.as_ref().unwrap_or(&cur.limits);
        let allowed = patch.allowed_models.as_ref().unwrap_or(&cur.allowed_models);
        let key = sqlx::query_as::<_, ApiKey>(&format!(
            "UPDATE api_keys SET name = $3, expires_at = $4, limits = $5, allowed_models = $6
             WHERE org_id = $1 AND id = $2 RETURNING {API_KEY_COLUMNS}"
        ))
        .bind(org_id)
        .bind(id)
        .bind(name)
        .bind(expires_at)
        .bind(sqlx::types::Json(limits))
        .bind(allowed)
        .fetch_one(&mut *tx)
        .await?;
        let mut changed = serde_json::Map::new();
        if patch.name.is_some() {
            changed.insert("name".into(), json!({"from": cur.name, "to": key.name}));
        }
        if patch.expires_at.is_some() {
            changed.insert(
                "expires_at".into(),
                json!({"from": cur.expires_at, "to": key.expires_at}),
            );
        }
        if patch.limits.is_some() {
            changed.insert(
                "limits".into(),
                json!({"from": cur.limits, "to": key.limits}),
            );
        }
        if patch.allowed_models.is_some() {
            changed.insert(
                "allowed_models".into(),
                json!({"from": cur.allowed_models, "to": key.allowed_models}),
            );
        }
        changed.insert("prefix".into(), json!(key.prefix));
        record(
            &mut tx,
            org_id,
            actor,
            "api_key.update",
            "api_key",
            Some(id),
            changed.into(),
        )
        .await?;
        tx.commit().await?;
        Ok(key)
    }

    /// Finds a key by the digest of the presented secret (any org: the key
    /// itself is what identifies the org), with its limits and its org's.
    pub async fn api_key_by_digest(&self, digest: &[u8; 32]) -> Result<Option<ApiKeyAuth>> {
        Ok(sqlx::query_as::<_, ApiKeyAuth>(
            "SELECT k.id, k.org_id, k.expires_at, k.revoked_at, k.limits, k.allowed_models,
                    o.limits AS org_limits
             FROM api_keys k JOIN organizations o ON o.id = k.org_id
             WHERE k.digest = $1",
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
