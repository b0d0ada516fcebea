//! Custom providers ("provider keys"): name, base URL and a sealed token.

use chrono::{DateTime, Utc};
use serde::Serialize;
use serde_json::json;
use sqlx::PgConnection;
use uuid::Uuid;

use crate::audit::{record, Actor};
use crate::crypto::{Binding, CryptoError, Sealed, AAD_V1, AAD_V2};
use crate::db::Db;
use crate::domain::{BaseUrl, ProviderName, ProviderStatus, ValidationError};
use crate::error::{Result, StorageError};
use crate::limits::Prices;
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
    /// USD per million tokens, per model; the most specific match wins.
    pub prices: Prices,
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
    /// Replaces every price.
    pub prices: Option<Prices>,
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
    aad_version: i16,
    token_hint: String,
    status: String,
    #[sqlx(json)]
    prices: Prices,
    created_at: DateTime<Utc>,
    updated_at: DateTime<Utc>,
}

const COLUMNS: &str =
    "id, org_id, name, base_url, token_ciphertext, token_nonce, key_id, aad_version, token_hint, status, prices, created_at, updated_at";

impl Row {
    fn sealed(&self) -> Sealed {
        Sealed {
            key_id: self.key_id,
            aad_version: self.aad_version,
            nonce: self.token_nonce.clone(),
            ciphertext: self.token_ciphertext.clone(),
        }
    }

    /// What this row's token is sealed to: its org, its id, its base URL.
    fn binding(&self) -> Binding<'_> {
        Binding {
            org_id: self.org_id,
            row_id: self.id,
            base_url: &self.base_url,
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
            prices: self.prices,
            created_at: self.created_at,
            updated_at: self.updated_at,
        }
    }
}

impl Db {
    fn unseal(&self, row: Row) -> Result<ProviderWithToken> {
        let plain = self.keyring.open(&row.binding(), &row.sealed())?;
        let token = ProviderToken::from_decrypted(plain).ok_or(CryptoError::Authentication)?;
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
        self.create_provider_key_priced(org_id, actor, name, base_url, token, &Prices::default())
            .await
    }

    /// [`Db::create_provider_key`] with prices.
    pub async fn create_provider_key_priced(
        &self,
        org_id: Uuid,
        actor: Actor,
        name: &ProviderName,
        base_url: &BaseUrl,
        token: &ProviderToken,
        prices: &Prices,
    ) -> Result<ProviderKey> {
        let id = Uuid::new_v4();
        let sealed = self.keyring.seal(
            &Binding {
                org_id,
                row_id: id,
                base_url: base_url.as_str(),
            },
            token.expose_secret().as_bytes(),
        );
        let mut tx = self.pool.begin().await?;
        let row = sqlx::query_as::<_, Row>(&format!(
            "INSERT INTO provider_keys (id, org_id, name, base_url, token_ciphertext, token_nonce, key_id, token_hint, aad_version, prices)
             VALUES ($1, $2, $3, $4, $5, $6, $7, $8, $9, $10) RETURNING {COLUMNS}"
        ))
        .bind(id)
        .bind(org_id)
        .bind(name.as_str())
        .bind(base_url.as_str())
        .bind(&sealed.ciphertext)
        .bind(&sealed.nonce)
        .bind(sealed.key_id)
        .bind(token.hint())
        .bind(sealed.aad_version)
        .bind(sqlx::types::Json(prices))
        .fetch_one(&mut *tx)
        .await?;
        let mut details = json!({"name": name.as_str(), "base_url": base_url.as_str()});
        if !prices.0.is_empty() {
            details["prices"] = json!(prices);
        }
        record(
            &mut tx,
            org_id,
            actor,
            "provider_key.create",
            "provider_key",
            Some(id),
            details,
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

    /// Applies a patch; the token, when given, is sealed anew. A new base
    /// URL must come with the token (checked here, under the row lock, so
    /// no concurrent edit slips past it): the stored token is sealed to its
    /// URL and may not follow a URL an admin picks. Re-sending the current
    /// URL (in any spelling that normalizes to it) is no change.
    pub async fn update_provider_key(
        &self,
        org_id: Uuid,
        actor: Actor,
        id: Uuid,
        patch: ProviderPatch,
    ) -> Result<ProviderKey> {
        let mut tx = self.pool.begin().await?;
        let cur = Self::provider_row(&mut tx, org_id, id, true).await?;
        let new_base_url = patch
            .base_url
            .as_ref()
            .filter(|b| !same_base_url(b, &cur.base_url));
        if new_base_url.is_some() && patch.token.is_none() {
            return Err(ValidationError::new(
                "token",
                "token is required when base_url changes: the stored token is only ever sent to the base URL it was saved with, so send the token for the new base_url in the same request",
            )
            .into());
        }
        let name = patch
            .name
            .as_ref()
            .map_or(cur.name.as_str(), |n| n.as_str());
        let base_url = new_base_url.map_or(cur.base_url.as_str(), |b| b.as_str());
        let status = patch.status.map_or(cur.status.as_str(), |s| s.as_str());
        let prices = patch.prices.as_ref().unwrap_or(&cur.prices);
        let (sealed, hint) = match &patch.token {
            Some(t) => (
                self.keyring.seal(
                    &Binding {
                        org_id,
                        row_id: id,
                        base_url,
                    },
                    t.expose_secret().as_bytes(),
                ),
                t.hint(),
            ),
            None => (cur.sealed(), cur.token_hint.clone()),
        };
        let row = sqlx::query_as::<_, Row>(&format!(
            "UPDATE provider_keys SET name = $3, base_url = $4, status = $5, token_ciphertext = $6,
                token_nonce = $7, key_id = $8, token_hint = $9, aad_version = $10, prices = $11, updated_at = now()
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
        .bind(sealed.aad_version)
        .bind(sqlx::types::Json(prices))
        .fetch_one(&mut *tx)
        .await?;
        let mut changed = serde_json::Map::new();
        if patch.name.is_some() {
            changed.insert("name".into(), json!({"from": cur.name, "to": name}));
        }
        if new_base_url.is_some() {
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
        if patch.prices.is_some() {
            changed.insert("prices".into(), json!({"from": cur.prices, "to": prices}));
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

    /// Re-seals up to `batch` rows that `scope` selects, in the current
    /// format under the active key, skipping the ids in `skip`. Rows locked
    /// by others are passed over (the caller looks again), so it is safe
    /// while serving and with several processes at once. A row that does
    /// not open is left as it is and reported, never fatal.
    async fn reseal_batch(
        &self,
        scope: ResealScope,
        batch: u32,
        skip: &[Uuid],
    ) -> Result<BatchOutcome> {
        let mut tx = self.pool.begin().await?;
        let rows = sqlx::query_as::<_, Row>(&format!(
            "SELECT {COLUMNS} FROM provider_keys WHERE {} AND id <> ALL($1)
             ORDER BY id LIMIT $2 FOR UPDATE SKIP LOCKED",
            scope.condition(self.keyring.active_id())
        ))
        .bind(skip)
        .bind(i64::from(batch.max(1)))
        .fetch_all(&mut *tx)
        .await?;
        let mut out = BatchOutcome {
            selected: rows.len(),
            ..BatchOutcome::default()
        };
        for row in rows {
            // The legacy format is opened here and nowhere else, and only to
            // be bound to the URL the row names right now.
            let opened = match row.aad_version {
                AAD_V1 => self.keyring.open_legacy(row.org_id, row.id, &row.sealed()),
                _ => self.keyring.open(&row.binding(), &row.sealed()),
            };
            let plain = match opened {
                Ok(p) => p,
                Err(reason) => {
                    out.skipped.push(SkippedToken {
                        org_id: row.org_id,
                        id: row.id,
                        reason,
                    });
                    continue;
                }
            };
            let sealed = self.keyring.seal(&row.binding(), &plain);
            sqlx::query(
                "UPDATE provider_keys SET token_ciphertext = $3, token_nonce = $4, key_id = $5, aad_version = $6
                 WHERE org_id = $1 AND id = $2",
            )
            .bind(row.org_id)
            .bind(row.id)
            .bind(&sealed.ciphertext)
            .bind(&sealed.nonce)
            .bind(sealed.key_id)
            .bind(sealed.aad_version)
            .execute(&mut *tx)
            .await?;
            out.rewritten += 1;
        }
        tx.commit().await?;
        Ok(out)
    }

    /// Batches until nothing is left that this process can take; rows that
    /// others hold locked are waited for a little, then counted as pending.
    async fn reseal_all(&self, scope: ResealScope) -> Result<ResealReport> {
        const LOCK_WAITS: u32 = 20;
        let mut report = ResealReport::default();
        let mut skip = Vec::new();
        let mut waits = 0;
        loop {
            let out = self.reseal_batch(scope, 100, &skip).await?;
            report.rewritten += out.rewritten;
            skip.extend(out.skipped.iter().map(|s| s.id));
            report.skipped.extend(out.skipped);
            if out.selected > 0 {
                continue;
            }
            let left: i64 = sqlx::query_scalar(&format!(
                "SELECT count(*) FROM provider_keys WHERE {} AND id <> ALL($1)",
                scope.condition(self.keyring.active_id())
            ))
            .bind(&skip)
            .fetch_one(&self.pool)
            .await?;
            if left == 0 {
                return Ok(report);
            }
            if waits == LOCK_WAITS {
                report.pending = left as u64;
                return Ok(report);
            }
            waits += 1;
            tokio::time::sleep(std::time::Duration::from_millis(250)).await;
        }
    }

    /// Re-seals every token still in the legacy format (which does not bind
    /// the base URL) in the current one. Runs at start-up right after the
    /// migrations; idempotent, and safe with several replicas starting at once.
    pub async fn upgrade_legacy_tokens(&self) -> Result<ResealReport> {
        self.reseal_all(ResealScope::Legacy).await
    }

    /// Re-encrypts every token not under the active key, or not in the
    /// current format; idempotent, safe while serving.
    pub async fn rotate_tokens(&self) -> Result<ResealReport> {
        self.reseal_all(ResealScope::NotCurrent).await
    }
}

/// Same URL, as stored or as the current parser normalizes the stored one.
fn same_base_url(new: &BaseUrl, stored: &str) -> bool {
    new.as_str() == stored || BaseUrl::parse(stored).is_ok_and(|s| s == *new)
}

/// Which rows a re-seal pass rewrites.
#[derive(Debug, Clone, Copy)]
enum ResealScope {
    /// Rows in the legacy associated-data format.
    Legacy,
    /// Rows not under the active key or not in the current format.
    NotCurrent,
}

impl ResealScope {
    /// The SQL condition; only integers of our own are formatted into it.
    fn condition(self, active_key: i32) -> String {
        match self {
            Self::Legacy => format!("aad_version = {AAD_V1}"),
            Self::NotCurrent => format!("(key_id <> {active_key} OR aad_version <> {AAD_V2})"),
        }
    }
}

#[derive(Debug, Default)]
struct BatchOutcome {
    selected: usize,
    rewritten: u64,
    skipped: Vec<SkippedToken>,
}

/// A row a re-seal could not open; it is left untouched.
#[derive(Debug, Clone)]
pub struct SkippedToken {
    pub org_id: Uuid,
    pub id: Uuid,
    /// Never holds any part of the token.
    pub reason: CryptoError,
}

/// What a re-seal pass did.
#[derive(Debug, Default)]
pub struct ResealReport {
    /// Rows re-sealed.
    pub rewritten: u64,
    /// Rows that did not open, by id and reason.
    pub skipped: Vec<SkippedToken>,
    /// Rows still to do that other sessions kept locked; run again.
    pub pending: u64,
}

impl ResealReport {
    /// True when every selected row was re-sealed.
    pub fn is_complete(&self) -> bool {
        self.skipped.is_empty() && self.pending == 0
    }
}
