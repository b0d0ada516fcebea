//! A provider's endpoints. The first is the provider's own: its
//! `provider_keys` row, whose id, base URL, token and weight it is (tokens
//! sealed before endpoints existed stay where they are). Further endpoints
//! are rows of `provider_endpoints`, each token sealed to its own row, org
//! and base URL. The same rule governs both: a new base URL needs its token
//! ([`Db::patch_token`]).

use serde::Serialize;
use serde_json::json;
use sqlx::PgConnection;
use uuid::Uuid;

use crate::audit::{record, Actor};
use crate::crypto::{Binding, CryptoError, Sealed};
use crate::db::Db;
use crate::domain::routing::{EndpointHealth, Weight, MAX_ENDPOINTS};
use crate::domain::{BaseUrl, ValidationError};
use crate::error::{Result, StorageError};
use crate::providers::{PatchedAs, ProviderPatch, StoredToken};
use crate::secrets::ProviderToken;

/// An endpoint as shown to clients: the token appears only as its hint.
#[derive(Debug, Clone, Serialize)]
pub struct ProviderEndpoint {
    /// The provider's own id for its own endpoint.
    pub id: Uuid,
    #[serde(skip)]
    pub provider_key_id: Uuid,
    pub base_url: BaseUrl,
    pub token_hint: String,
    pub weight: Weight,
    /// What the gateways report; storage knows none, so `unknown` here
    /// (the API fills it in).
    pub health: EndpointHealth,
}

/// An endpoint with its token opened, for calling it.
#[derive(Debug, Clone)]
pub struct EndpointWithToken {
    /// The provider's own id for its own endpoint: what `request_logs.endpoint_id` records.
    pub id: Uuid,
    pub base_url: BaseUrl,
    pub token: ProviderToken,
    pub weight: Weight,
}

/// A further endpoint to add.
#[derive(Debug)]
pub struct NewEndpoint {
    pub base_url: BaseUrl,
    pub token: ProviderToken,
    pub weight: Weight,
}

/// Fields an endpoint PATCH may change; `None` keeps the current value.
#[derive(Debug, Default)]
pub struct EndpointPatch {
    pub base_url: Option<BaseUrl>,
    pub token: Option<ProviderToken>,
    pub weight: Option<Weight>,
}

#[derive(sqlx::FromRow)]
pub(crate) struct EndpointRow {
    pub id: Uuid,
    pub org_id: Uuid,
    pub provider_key_id: Uuid,
    pub base_url: String,
    pub token_ciphertext: Vec<u8>,
    pub token_nonce: Vec<u8>,
    pub key_id: i32,
    pub aad_version: i16,
    pub token_hint: String,
    pub weight: i32,
}

const COLUMNS: &str =
    "id, org_id, provider_key_id, base_url, token_ciphertext, token_nonce, key_id, \
    aad_version, token_hint, weight";

impl EndpointRow {
    fn sealed(&self) -> Sealed {
        Sealed::from_columns(
            self.key_id,
            self.aad_version,
            &self.token_nonce,
            &self.token_ciphertext,
        )
    }

    /// What this row's token is sealed to: its org, its id, its base URL.
    fn binding(&self) -> Binding<'_> {
        Binding::endpoint_token(self.org_id, self.id, &self.base_url)
    }

    pub(crate) fn view(&self) -> ProviderEndpoint {
        ProviderEndpoint {
            id: self.id,
            provider_key_id: self.provider_key_id,
            base_url: BaseUrl::from_db(self.base_url.clone()),
            token_hint: self.token_hint.clone(),
            weight: Weight::from_db(self.weight),
            health: EndpointHealth::Unknown,
        }
    }
}

/// An endpoint's view as read without its secret columns.
#[derive(sqlx::FromRow)]
struct ViewRow {
    id: Uuid,
    provider_key_id: Uuid,
    base_url: String,
    token_hint: String,
    weight: i32,
}

impl Db {
    pub(crate) fn unseal_endpoint(&self, e: &EndpointRow) -> Result<EndpointWithToken> {
        let plain = self.keyring.open(&e.binding(), &e.sealed())?;
        let token = ProviderToken::from_decrypted(plain).ok_or(CryptoError::Authentication)?;
        Ok(EndpointWithToken {
            id: e.id,
            base_url: BaseUrl::from_db(e.base_url.clone()),
            token,
            weight: Weight::from_db(e.weight),
        })
    }

    /// The further endpoints of one provider of the org, or of all of them,
    /// in the order they were added.
    pub(crate) async fn endpoint_views(
        conn: &mut PgConnection,
        org_id: Uuid,
        provider_key_id: Option<Uuid>,
    ) -> Result<Vec<ProviderEndpoint>> {
        let rows = sqlx::query_as::<_, ViewRow>(
            "SELECT id, provider_key_id, base_url, token_hint, weight FROM provider_endpoints
             WHERE org_id = $1 AND ($2::uuid IS NULL OR provider_key_id = $2)
             ORDER BY provider_key_id, created_at, id",
        )
        .bind(org_id)
        .bind(provider_key_id)
        .fetch_all(conn)
        .await?;
        Ok(rows
            .into_iter()
            .map(|r| ProviderEndpoint {
                id: r.id,
                provider_key_id: r.provider_key_id,
                base_url: BaseUrl::from_db(r.base_url),
                token_hint: r.token_hint,
                weight: Weight::from_db(r.weight),
                health: EndpointHealth::Unknown,
            })
            .collect())
    }

    /// Every endpoint of the provider, its own first; `NotFound` for a
    /// provider that is not the org's.
    pub async fn list_endpoints(
        &self,
        org_id: Uuid,
        provider_key_id: Uuid,
    ) -> Result<Vec<ProviderEndpoint>> {
        Ok(self
            .get_provider_key(org_id, provider_key_id)
            .await?
            .endpoints)
    }

    /// Adds an endpoint to the provider; at most
    /// [`MAX_ENDPOINTS`] in all, counted under the provider's row lock.
    pub async fn create_endpoint(
        &self,
        org_id: Uuid,
        actor: Actor,
        provider_key_id: Uuid,
        new: &NewEndpoint,
    ) -> Result<ProviderEndpoint> {
        let id = Uuid::new_v4();
        let sealed = self.keyring.seal(
            &Binding::endpoint_token(org_id, id, new.base_url.as_str()),
            new.token.expose_secret().as_bytes(),
        );
        let mut tx = self.pool.begin().await?;
        sqlx::query_scalar::<_, Uuid>(
            "SELECT id FROM provider_keys WHERE org_id = $1 AND id = $2 FOR UPDATE",
        )
        .bind(org_id)
        .bind(provider_key_id)
        .fetch_optional(&mut *tx)
        .await?
        .ok_or(StorageError::NotFound)?;
        let further: i64 = sqlx::query_scalar(
            "SELECT count(*) FROM provider_endpoints WHERE org_id = $1 AND provider_key_id = $2",
        )
        .bind(org_id)
        .bind(provider_key_id)
        .fetch_one(&mut *tx)
        .await?;
        if further + 1 >= MAX_ENDPOINTS as i64 {
            return Err(ValidationError::new(
                "body",
                format!("a provider has at most {MAX_ENDPOINTS} endpoints, its own included: delete one first"),
            )
            .into());
        }
        let row = sqlx::query_as::<_, EndpointRow>(&format!(
            "INSERT INTO provider_endpoints (id, org_id, provider_key_id, base_url, token_ciphertext, token_nonce,
                key_id, aad_version, token_hint, weight)
             VALUES ($1, $2, $3, $4, $5, $6, $7, $8, $9, $10) RETURNING {COLUMNS}"
        ))
        .bind(id)
        .bind(org_id)
        .bind(provider_key_id)
        .bind(new.base_url.as_str())
        .bind(&sealed.ciphertext)
        .bind(&sealed.nonce)
        .bind(sealed.key_id)
        .bind(sealed.aad_version)
        .bind(new.token.hint())
        .bind(i32::from(new.weight.get()))
        .fetch_one(&mut *tx)
        .await?;
        record(
            &mut tx,
            org_id,
            actor,
            "provider_endpoint.create",
            "provider_endpoint",
            Some(id),
            json!({"provider_key_id": provider_key_id, "base_url": new.base_url.as_str(),
                   "weight": new.weight.get()}),
        )
        .await?;
        tx.commit().await?;
        Ok(row.view())
    }

    /// Changes an endpoint of the provider: its own (the provider's row,
    /// as a provider PATCH would) or a further one. A new base URL must
    /// come with the token ([`Db::patch_token`]).
    pub async fn update_endpoint(
        &self,
        org_id: Uuid,
        actor: Actor,
        provider_key_id: Uuid,
        endpoint_id: Uuid,
        patch: EndpointPatch,
    ) -> Result<ProviderEndpoint> {
        if endpoint_id == provider_key_id {
            let provider = self
                .patch_provider(
                    org_id,
                    actor,
                    provider_key_id,
                    ProviderPatch {
                        base_url: patch.base_url,
                        token: patch.token,
                        weight: patch.weight,
                        ..ProviderPatch::default()
                    },
                    PatchedAs::OwnEndpoint,
                )
                .await?;
            return provider
                .endpoints
                .into_iter()
                .next()
                .ok_or(StorageError::NotFound);
        }
        let mut tx = self.pool.begin().await?;
        let cur = sqlx::query_as::<_, EndpointRow>(&format!(
            "SELECT {COLUMNS} FROM provider_endpoints
             WHERE org_id = $1 AND provider_key_id = $2 AND id = $3 FOR UPDATE"
        ))
        .bind(org_id)
        .bind(provider_key_id)
        .bind(endpoint_id)
        .fetch_optional(&mut *tx)
        .await?
        .ok_or(StorageError::NotFound)?;
        let token = self.patch_token(
            StoredToken {
                binding: cur.binding(),
                sealed: cur.sealed(),
                hint: &cur.token_hint,
            },
            patch.base_url.as_ref(),
            patch.token.as_ref(),
        )?;
        let weight = patch.weight.map_or(cur.weight, |w| i32::from(w.get()));
        let row = sqlx::query_as::<_, EndpointRow>(&format!(
            "UPDATE provider_endpoints SET base_url = $4, token_ciphertext = $5, token_nonce = $6, key_id = $7,
                aad_version = $8, token_hint = $9, weight = $10, updated_at = now()
             WHERE org_id = $1 AND provider_key_id = $2 AND id = $3 RETURNING {COLUMNS}"
        ))
        .bind(org_id)
        .bind(provider_key_id)
        .bind(endpoint_id)
        .bind(&token.base_url)
        .bind(&token.sealed.ciphertext)
        .bind(&token.sealed.nonce)
        .bind(token.sealed.key_id)
        .bind(token.sealed.aad_version)
        .bind(&token.hint)
        .bind(weight)
        .fetch_one(&mut *tx)
        .await?;
        let mut changed = serde_json::Map::new();
        changed.insert("provider_key_id".into(), json!(provider_key_id));
        if token.url_changed {
            changed.insert(
                "base_url".into(),
                json!({"from": cur.base_url, "to": token.base_url}),
            );
        }
        if patch.token.is_some() {
            changed.insert("token".into(), json!("replaced"));
        }
        if patch.weight.is_some() {
            changed.insert("weight".into(), json!({"from": cur.weight, "to": weight}));
        }
        record(
            &mut tx,
            org_id,
            actor,
            "provider_endpoint.update",
            "provider_endpoint",
            Some(endpoint_id),
            changed.into(),
        )
        .await?;
        tx.commit().await?;
        Ok(row.view())
    }

    /// Deletes a further endpoint. The provider's own is refused with
    /// [`StorageError::OwnEndpoint`]: it is the provider's base URL and
    /// token, so a provider always keeps one endpoint.
    pub async fn delete_endpoint(
        &self,
        org_id: Uuid,
        actor: Actor,
        provider_key_id: Uuid,
        endpoint_id: Uuid,
    ) -> Result<()> {
        if endpoint_id == provider_key_id {
            // Another org's provider stays a 404, like any id of theirs.
            self.get_provider_key(org_id, provider_key_id).await?;
            return Err(StorageError::OwnEndpoint);
        }
        let mut tx = self.pool.begin().await?;
        let base_url: String = sqlx::query_scalar(
            "DELETE FROM provider_endpoints WHERE org_id = $1 AND provider_key_id = $2 AND id = $3
             RETURNING base_url",
        )
        .bind(org_id)
        .bind(provider_key_id)
        .bind(endpoint_id)
        .fetch_optional(&mut *tx)
        .await?
        .ok_or(StorageError::NotFound)?;
        record(
            &mut tx,
            org_id,
            actor,
            "provider_endpoint.delete",
            "provider_endpoint",
            Some(endpoint_id),
            json!({"provider_key_id": provider_key_id, "base_url": base_url}),
        )
        .await?;
        tx.commit().await?;
        Ok(())
    }
}
