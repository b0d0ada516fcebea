//! Custom providers ("provider keys"): name, base URL and a sealed token.

use chrono::{DateTime, Utc};
use serde::Serialize;
use serde_json::json;
use sqlx::PgConnection;
use uuid::Uuid;

use crate::audit::{record, Actor};
use crate::crypto::Sealed;
use crate::db::Db;
use crate::domain::{BaseUrl, ProviderName, ProviderStatus};
use crate::error::{Result, StorageError};
use crate::secrets::ProviderToken;

/// A provider as shown to clients: the token appears only as its hint.
#[derive(Debug, Clone, Serialize)]
pub struct ProviderKey {
    pub id: Uuid,
    #[serde(skip)]
    pub org_id: Uuid,
    pub name: ProviderName,
    pub base_url: BaseUrl,
    pub token_hint: String,
    pub status: ProviderStatus,
    pub created_at: DateTime<Utc>,
    pub updated_at: DateTime<Utc>,
}

/// A provider with its decrypted token, for calling the upstream.
#[derive(Debug, Clone)]
pub struct ProviderWithToken {
    pub provider: ProviderKey,
    pub token: ProviderToken,
}

/// Fields a PATCH may change; `None` keeps the current value.
#[derive(Debug, Default)]
pub struct ProviderPatch {
    pub name: Option<ProviderName>,
    pub base_url: Option<BaseUrl>,
    pub token: Option<ProviderToken>,
    pub status: Option<ProviderStatus>,
}

#[derive(sqlx::FromRow)]
struct Row {
    id: Uuid,
    org_id: Uuid,
    name: String,
    base_url: String,
    token_ciphertext: Vec<u8>,
    token_nonce: Vec<u8>,
    key_id: i32,
    token_hint: String,
    status: String,
    created_at: DateTime<Utc>,
    updated_at: DateTime<Utc>,
}

const COLUMNS: &str =
    "id, org_id, name, base_url, token_ciphertext, token_nonce, key_id, token_hint, status, created_at, updated_at";

impl Row {
    fn sealed(&self) -> Sealed {
        Sealed {
            key_id: self.key_id,
            nonce: self.token_nonce.clone(),
            ciphertext: self.token_ciphertext.clone(),
        }
    }

    fn view(self) -> ProviderKey {
        ProviderKey {
            id: self.id,
            org_id: self.org_id,
            name: ProviderName::from_db(self.name),
            base_url: BaseUrl::from_db(self.base_url),
            token_hint: self.token_hint,
            status: ProviderStatus::from_db(&self.status),
            created_at: self.created_at,
            updated_at: self.updated_at,
        }
    }
}

impl Db {
    fn unseal(&self, row: Row) -> Result<ProviderWithToken> {
        let plain = self.keyring.open(row.org_id, row.id, &row.sealed())?;
        let token = ProviderToken::from_decrypted(plain)
            .ok_or(crate::crypto::CryptoError::Authentication)?;
        Ok(ProviderWithToken {
            provider: row.view(),
            token,
        })
    }

    async fn provider_row(
        conn: &mut PgConnection,
        org_id: Uuid,
        id: Uuid,
        lock: bool,
    ) -> Result<Row> {
        let lock = if lock { " FOR UPDATE" } else { "" };
        sqlx::query_as::<_, Row>(&format!(
            "SELECT {COLUMNS} FROM provider_keys WHERE org_id = $1 AND id = $2{lock}"
        ))
        .bind(org_id)
        .bind(id)
        .fetch_optional(conn)
        .await?
        .ok_or(StorageError::NotFound)
    }

    /// Creates a provider; `Conflict` when the name is taken in this org.
    pub async fn create_provider_key(
        &self,
        org_id: Uuid,
        actor: Actor,
        name: &ProviderName,
        base_url: &BaseUrl,
        token: &ProviderToken,
    ) -> Result<ProviderKey> {
        let id = Uuid::new_v4();
        let sealed = self
            .keyring
            .seal(org_id, id, token.expose_secret().as_bytes());
        let mut tx = self.pool.begin().await?;
        let row = sqlx::query_as::<_, Row>(&format!(
            "INSERT INTO provider_keys (id, org_id, name, base_url, token_ciphertext, token_nonce, key_id, token_hint)
             VALUES ($1, $2, $3, $4, $5, $6, $7, $8) RETURNING {COLUMNS}"
        ))
        .bind(id)
        .bind(org_id)
        .bind(name.as_str())
        .bind(base_url.as_str())
        .bind(&sealed.ciphertext)
        .bind(&sealed.nonce)
        .bind(sealed.key_id)
        .bind(token.hint())
        .fetch_one(&mut *tx)
        .await?;
        record(
            &mut tx,
            org_id,
            actor,
            "provider_key.create",
            "provider_key",
            Some(id),
            json!({"name": name.as_str(), "base_url": base_url.as_str()}),
        )
        .await?;
        tx.commit().await?;
        Ok(row.view())
    }

    pub async fn list_provider_keys(&self, org_id: Uuid) -> Result<Vec<ProviderKey>> {
        let rows = sqlx::query_as::<_, Row>(&format!(
            "SELECT {COLUMNS} FROM provider_keys WHERE org_id = $1 ORDER BY name"
        ))
        .bind(org_id)
        .fetch_all(&self.pool)
        .await?;
        Ok(rows.into_iter().map(Row::view).collect())
    }

    pub async fn get_provider_key(&self, org_id: Uuid, id: Uuid) -> Result<ProviderKey> {
        let mut conn = self.pool.acquire().await?;
        Ok(Self::provider_row(&mut conn, org_id, id, false)
            .await?
            .view())
    }

    /// A provider with its decrypted token (for the connectivity test).
    pub async fn provider_key_with_token(
        &self,
        org_id: Uuid,
        id: Uuid,
    ) -> Result<ProviderWithToken> {
        let mut conn = self.pool.acquire().await?;
        let row = Self::provider_row(&mut conn, org_id, id, false).await?;
        self.unseal(row)
    }

    /// The provider named `name` in the org, token decrypted (gateway routing).
    pub async fn provider_by_name(
        &self,
        org_id: Uuid,
        name: &str,
    ) -> Result<Option<ProviderWithToken>> {
        let row = sqlx::query_as::<_, Row>(&format!(
            "SELECT {COLUMNS} FROM provider_keys WHERE org_id = $1 AND name = $2"
        ))
        .bind(org_id)
        .bind(name)
        .fetch_optional(&self.pool)
        .await?;
        row.map(|r| self.unseal(r)).transpose()
    }

    /// Every active provider of the org with its token (model listing).
    pub async fn active_providers(&self, org_id: Uuid) -> Result<Vec<ProviderWithToken>> {
        let rows = sqlx::query_as::<_, Row>(&format!(
            "SELECT {COLUMNS} FROM provider_keys WHERE org_id = $1 AND status = 'active' ORDER BY name"
        ))
        .bind(org_id)
        .fetch_all(&self.pool)
        .await?;
        // One undecryptable row (say, a key not yet given to this replica)
        // must not hide the others.
        Ok(rows
            .into_iter()
            .filter_map(|r| {
                let (org, id) = (r.org_id, r.id);
                self.unseal(r)
                    .map_err(|e| tracing::error!(error = %e, %org, provider_key_id = %id, "cannot decrypt provider token"))
                    .ok()
            })
            .collect())
    }

    /// Applies a patch; the token, when given, is sealed anew.
    pub async fn update_provider_key(
        &self,
        org_id: Uuid,
        actor: Actor,
        id: Uuid,
        patch: ProviderPatch,
    ) -> Result<ProviderKey> {
        let mut tx = self.pool.begin().await?;
        let cur = Self::provider_row(&mut tx, org_id, id, true).await?;
        let name = patch
            .name
            .as_ref()
            .map_or(cur.name.as_str(), |n| n.as_str());
        let base_url = patch
            .base_url
            .as_ref()
            .map_or(cur.base_url.as_str(), |b| b.as_str());
        let status = patch.status.map_or(cur.status.as_str(), |s| s.as_str());
        let (sealed, hint) = match &patch.token {
            Some(t) => (
                self.keyring.seal(org_id, id, t.expose_secret().as_bytes()),
                t.hint(),
            ),
            None => (cur.sealed(), cur.token_hint.clone()),
        };
        let row = sqlx::query_as::<_, Row>(&format!(
            "UPDATE provider_keys SET name = $3, base_url = $4, status = $5, token_ciphertext = $6,
                token_nonce = $7, key_id = $8, token_hint = $9, updated_at = now()
             WHERE org_id = $1 AND id = $2 RETURNING {COLUMNS}"
        ))
        .bind(org_id)
        .bind(id)
        .bind(name)
        .bind(base_url)
        .bind(status)
        .bind(&sealed.ciphertext)
        .bind(&sealed.nonce)
        .bind(sealed.key_id)
        .bind(&hint)
        .fetch_one(&mut *tx)
        .await?;
        let mut changed = serde_json::Map::new();
        if patch.name.is_some() {
            changed.insert("name".into(), json!({"from": cur.name, "to": name}));
        }
        if patch.base_url.is_some() {
            changed.insert(
                "base_url".into(),
                json!({"from": cur.base_url, "to": base_url}),
            );
        }
        if patch.status.is_some() {
            changed.insert("status".into(), json!({"from": cur.status, "to": status}));
        }
        if patch.token.is_some() {
            changed.insert("token".into(), json!("replaced"));
        }
        record(
            &mut tx,
            org_id,
            actor,
            "provider_key.update",
            "provider_key",
            Some(id),
            changed.into(),
        )
        .await?;
        tx.commit().await?;
        Ok(row.view())
    }

    pub async fn delete_provider_key(&self, org_id: Uuid, actor: Actor, id: Uuid) -> Result<()> {
        let mut tx = self.pool.begin().await?;
        let name: String = sqlx::query_scalar(
            "DELETE FROM provider_keys WHERE org_id = $1 AND id = $2 RETURNING name",
        )
        .bind(org_id)
        .bind(id)
        .fetch_optional(&mut *tx)
        .await?
        .ok_or(StorageError::NotFound)?;
        record(
            &mut tx,
            org_id,
            actor,
            "provider_key.delete",
            "provider_key",
            Some(id),
            json!({"name": name}),
        )
        .await?;
        tx.commit().await?;
        Ok(())
    }

    /// Re-encrypts up to `batch` tokens not under the active key; returns how
    /// many were rewritten (0 when done). Rows locked by others are skipped
    /// and picked up by the next call, so it is safe while serving.
    pub async fn rotate_tokens_batch(&self, batch: u32) -> Result<u64> {
        let active = self.keyring.active_id();
        let mut tx = self.pool.begin().await?;
        let rows = sqlx::query_as::<_, Row>(&format!(
            "SELECT {COLUMNS} FROM provider_keys WHERE key_id <> $1 ORDER BY id LIMIT $2 FOR UPDATE SKIP LOCKED"
        ))
        .bind(active)
        .bind(i64::from(batch.max(1)))
        .fetch_all(&mut *tx)
        .await?;
        let mut done = 0;
        for row in rows {
            let plain = self.keyring.open(row.org_id, row.id, &row.sealed())?;
            let sealed = self.keyring.seal(row.org_id, row.id, &plain);
            sqlx::query(
                "UPDATE provider_keys SET token_ciphertext = $3, token_nonce = $4, key_id = $5
                 WHERE org_id = $1 AND id = $2",
            )
            .bind(row.org_id)
            .bind(row.id)
            .bind(&sealed.ciphertext)
            .bind(&sealed.nonce)
            .bind(sealed.key_id)
            .execute(&mut *tx)
            .await?;
            done += 1;
        }
        tx.commit().await?;
        Ok(done)
    }

    /// Re-encrypts every token under the active key; idempotent.
    pub async fn rotate_tokens(&self) -> Result<u64> {
        let mut total = 0;
        loop {
            let n = self.rotate_tokens_batch(100).await?;
            if n == 0 {
                return Ok(total);
            }
            total += n;
        }
    }
}
