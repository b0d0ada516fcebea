//! Custom providers ("provider keys"): name, base URL and a sealed token
//! (the provider's own endpoint), further endpoints ([`crate::endpoints`]),
//! sealed static headers, timeouts and prices.

use std::collections::HashMap;
use std::fmt;
use std::sync::OnceLock;

use chrono::{DateTime, Utc};
use serde::Serialize;
use serde_json::json;
use sqlx::PgConnection;
use uuid::Uuid;

use crate::audit::{record, Actor};
use crate::crypto::{Binding, CryptoError, Sealed, AAD_V1, AAD_V2};
use crate::db::Db;
use crate::domain::routing::{EndpointHealth, StaticHeaders, Timeouts, Weight};
use crate::domain::{BaseUrl, ProviderName, ProviderStatus, ValidationError};
use crate::endpoints::{EndpointRow, EndpointWithToken, ProviderEndpoint};
use crate::error::{Result, StorageError};
use crate::limits::Prices;
use crate::secrets::ProviderToken;

/// A provider as shown to clients: tokens appear only as their hints,
/// static headers only by name.
#[derive(Debug, Clone, Serialize)]
pub struct ProviderKey {
    pub id: Uuid,
    #[serde(skip)]
    pub org_id: Uuid,
    pub name: ProviderName,
    /// Its own endpoint's base URL (the first of `endpoints`).
    pub base_url: BaseUrl,
    pub token_hint: String,
    pub status: ProviderStatus,
    /// USD per million tokens, per model; the most specific match wins.
    pub prices: Prices,
    /// Every endpoint, its own (this row: same id, base URL and token) first.
    pub endpoints: Vec<ProviderEndpoint>,
    /// The names of its static upstream headers; values are never shown.
    pub headers: Vec<String>,
    pub timeouts: Timeouts,
    pub created_at: DateTime<Utc>,
    pub updated_at: DateTime<Utc>,
}

/// A provider with its secrets opened, for calling the upstream: what the
/// gateway caches. Read by [`Db::provider_by_name`] and
/// [`Db::active_providers`] in one query each, endpoints included.
#[derive(Debug, Clone)]
pub struct ProviderWithToken {
    pub provider: ProviderKey,
    /// The provider's own token (that of `endpoints[0]`).
    pub token: ProviderToken,
    /// Every endpoint with its token, the provider's own first, then the
    /// others in the order they were added. A further endpoint whose token
    /// does not open is left out (and logged); the provider's own never is:
    /// its failure fails the whole read.
    pub endpoints: Vec<EndpointWithToken>,
    /// The static extra headers, names and values, for every endpoint.
    pub headers: StaticHeaders,
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
    /// Replaces every header; empty removes them.
    pub headers: Option<StaticHeaders>,
    /// Replaces all three; empty: the gateway's settings.
    pub timeouts: Option<Timeouts>,
    /// The weight of the provider's own endpoint.
    pub weight: Option<Weight>,
}

/// What a new provider is made of.
#[derive(Debug)]
pub struct NewProvider {
    pub name: ProviderName,
    pub base_url: BaseUrl,
    pub token: ProviderToken,
    pub prices: Prices,
    pub headers: StaticHeaders,
    pub timeouts: Timeouts,
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
    weight: i32,
    header_names: Vec<String>,
    headers_ciphertext: Option<Vec<u8>>,
    headers_nonce: Option<Vec<u8>>,
    headers_key_id: Option<i32>,
    #[sqlx(json)]
    timeouts: Timeouts,
    created_at: DateTime<Utc>,
    updated_at: DateTime<Utc>,
}

const COLUMNS: &str = "id, org_id, name, base_url, token_ciphertext, token_nonce, key_id, aad_version, \
    token_hint, status, prices, weight, header_names, headers_ciphertext, headers_nonce, headers_key_id, \
    timeouts, created_at, updated_at";

/// [`COLUMNS`] of `provider_keys p`, for queries that join.
fn p_columns() -> &'static str {
    static P: OnceLock<String> = OnceLock::new();
    P.get_or_init(|| {
        COLUMNS
            .split(',')
            .map(|c| format!("p.{}", c.trim()))
            .collect::<Vec<_>>()
            .join(", ")
    })
}

impl Row {
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
        Binding::provider_token(self.org_id, self.id, &self.base_url)
    }

    fn sealed_headers(&self) -> Option<Sealed> {
        Some(Sealed::from_columns(
            self.headers_key_id?,
            AAD_V2,
            self.headers_nonce.as_deref()?,
            self.headers_ciphertext.as_deref()?,
        ))
    }

    /// The provider's own endpoint.
    fn own_endpoint(&self) -> ProviderEndpoint {
        ProviderEndpoint {
            id: self.id,
            provider_key_id: self.id,
            base_url: BaseUrl::from_db(self.base_url.clone()),
            token_hint: self.token_hint.clone(),
            weight: Weight::from_db(self.weight),
            health: EndpointHealth::Unknown,
        }
    }

    /// The client's view, with the provider's further endpoints.
    fn view(self, further: impl IntoIterator<Item = ProviderEndpoint>) -> ProviderKey {
        let mut endpoints = vec![self.own_endpoint()];
        endpoints.extend(further);
        ProviderKey {
            id: self.id,
            org_id: self.org_id,
            name: ProviderName::from_db(self.name),
            base_url: BaseUrl::from_db(self.base_url),
            token_hint: self.token_hint,
            status: ProviderStatus::from_db(&self.status),
            prices: self.prices,
            endpoints,
            headers: self.header_names,
            timeouts: self.timeouts,
            created_at: self.created_at,
            updated_at: self.updated_at,
        }
    }
}

/// A provider row joined with one of its further endpoints (none: all NULL).
#[derive(sqlx::FromRow)]
struct JoinedRow {
    #[sqlx(flatten)]
    provider: Row,
    e_id: Option<Uuid>,
    e_base_url: Option<String>,
    e_token_ciphertext: Option<Vec<u8>>,
    e_token_nonce: Option<Vec<u8>>,
    e_key_id: Option<i32>,
    e_aad_version: Option<i16>,
    e_token_hint: Option<String>,
    e_weight: Option<i32>,
}

impl JoinedRow {
    fn endpoint(&self) -> Option<EndpointRow> {
        Some(EndpointRow {
            id: self.e_id?,
            org_id: self.provider.org_id,
            provider_key_id: self.provider.id,
            base_url: self.e_base_url.clone()?,
            token_ciphertext: self.e_token_ciphertext.clone()?,
            token_nonce: self.e_token_nonce.clone()?,
            key_id: self.e_key_id?,
            aad_version: self.e_aad_version?,
            token_hint: self.e_token_hint.clone()?,
            weight: self.e_weight?,
        })
    }
}

/// Every provider with its further endpoints, in one statement (so one
/// snapshot): `filter` is a condition on `p` whose parameters start at `$1`.
fn joined_query(filter: &str) -> String {
    format!(
        "SELECT {}, e.id AS e_id, e.base_url AS e_base_url, e.token_ciphertext AS e_token_ciphertext,
            e.token_nonce AS e_token_nonce, e.key_id AS e_key_id, e.aad_version AS e_aad_version,
            e.token_hint AS e_token_hint, e.weight AS e_weight
         FROM provider_keys p
         LEFT JOIN provider_endpoints e ON e.org_id = p.org_id AND e.provider_key_id = p.id
         WHERE {filter}
         ORDER BY p.name, p.id, e.created_at, e.id",
        p_columns()
    )
}

/// The token a PATCH leaves a row with, given what is stored.
pub(crate) struct StoredToken<'a> {
    /// The row's binding, with its current base URL.
    pub binding: Binding<'a>,
    pub sealed: Sealed,
    pub hint: &'a str,
}

/// What [`Db::patch_token`] decided.
pub(crate) struct PatchedToken {
    pub base_url: String,
    pub sealed: Sealed,
    pub hint: String,
    /// The base URL is another one than the stored.
    pub url_changed: bool,
}

impl Db {
    /// Opens the provider's own token and its headers; the further
    /// endpoints are added by the caller.
    fn unseal(&self, row: Row, further: Vec<EndpointRow>) -> Result<ProviderWithToken> {
        let plain = self.keyring.open(&row.binding(), &row.sealed())?;
        let token = ProviderToken::from_decrypted(plain).ok_or(CryptoError::Authentication)?;
        let headers = match row.sealed_headers() {
            None => StaticHeaders::default(),
            Some(sealed) => {
                let plain = self
                    .keyring
                    .open(&Binding::provider_headers(row.org_id, row.id), &sealed)?;
                StaticHeaders::from_decrypted(&plain).ok_or(CryptoError::Authentication)?
            }
        };
        let mut endpoints = vec![EndpointWithToken {
            id: row.id,
            base_url: BaseUrl::from_db(row.base_url.clone()),
            token: token.clone(),
            weight: Weight::from_db(row.weight),
        }];
        let mut views = Vec::with_capacity(further.len());
        for e in further {
            views.push(e.view());
            match self.unseal_endpoint(&e) {
                Ok(opened) => endpoints.push(opened),
                // One endpoint this replica cannot open (a key it lacks, a
                // row edited in SQL) must not take the others down.
                Err(err) => {
                    tracing::error!(error = %err, org = %e.org_id, provider_key_id = %e.provider_key_id,
                    endpoint_id = %e.id, "cannot decrypt provider endpoint token; endpoint left out")
                }
            }
        }
        Ok(ProviderWithToken {
            provider: row.view(views),
            token,
            endpoints,
            headers,
        })
    }

    /// Groups joined rows (ordered by provider) into providers with their
    /// further endpoints.
    fn group(rows: Vec<JoinedRow>) -> Vec<(Row, Vec<EndpointRow>)> {
        let mut out: Vec<(Row, Vec<EndpointRow>)> = Vec::new();
        for r in rows {
            let endpoint = r.endpoint();
            match out.last_mut() {
                Some((p, es)) if p.id == r.provider.id => es.extend(endpoint),
                _ => out.push((r.provider, endpoint.into_iter().collect())),
            }
        }
        out
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

    /// The client's view of one provider row, its further endpoints read.
    async fn provider_view(conn: &mut PgConnection, row: Row) -> Result<ProviderKey> {
        let further = Self::endpoint_views(conn, row.org_id, Some(row.id)).await?;
        Ok(row.view(further))
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
        self.create_provider(
            org_id,
            actor,
            &NewProvider {
                name: name.clone(),
                base_url: base_url.clone(),
                token: token.clone(),
                prices: prices.clone(),
                headers: StaticHeaders::default(),
                timeouts: Timeouts::default(),
            },
        )
        .await
    }

    /// Creates a provider with everything it may start with; `Conflict`
    /// when the name is taken in this org.
    pub async fn create_provider(
        &self,
        org_id: Uuid,
        actor: Actor,
        new: &NewProvider,
    ) -> Result<ProviderKey> {
        let id = Uuid::new_v4();
        let sealed = self.keyring.seal(
            &Binding::provider_token(org_id, id, new.base_url.as_str()),
            new.token.expose_secret().as_bytes(),
        );
        let headers = self.seal_headers(org_id, id, &new.headers);
        let mut tx = self.pool.begin().await?;
        let row = sqlx::query_as::<_, Row>(&format!(
            "INSERT INTO provider_keys (id, org_id, name, base_url, token_ciphertext, token_nonce, key_id, token_hint,
                aad_version, prices, header_names, headers_ciphertext, headers_nonce, headers_key_id, timeouts)
             VALUES ($1, $2, $3, $4, $5, $6, $7, $8, $9, $10, $11, $12, $13, $14, $15) RETURNING {COLUMNS}"
        ))
        .bind(id)
        .bind(org_id)
        .bind(new.name.as_str())
        .bind(new.base_url.as_str())
        .bind(&sealed.ciphertext)
        .bind(&sealed.nonce)
        .bind(sealed.key_id)
        .bind(new.token.hint())
        .bind(sealed.aad_version)
        .bind(sqlx::types::Json(&new.prices))
        .bind(new.headers.names())
        .bind(headers.as_ref().map(|h| &h.ciphertext))
        .bind(headers.as_ref().map(|h| &h.nonce))
        .bind(headers.as_ref().map(|h| h.key_id))
        .bind(sqlx::types::Json(new.timeouts))
        .fetch_one(&mut *tx)
        .await?;
        let mut details = json!({"name": new.name.as_str(), "base_url": new.base_url.as_str()});
        if !new.prices.0.is_empty() {
            details["prices"] = json!(new.prices);
        }
        if !new.headers.is_empty() {
            details["headers"] = json!(new.headers.names());
        }
        if !new.timeouts.is_empty() {
            details["timeouts"] = json!(new.timeouts);
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
        Ok(row.view([]))
    }

    /// Seals a provider's headers to its org and row; `None` for none.
    fn seal_headers(&self, org_id: Uuid, id: Uuid, headers: &StaticHeaders) -> Option<Sealed> {
        (!headers.is_empty()).then(|| {
            self.keyring.seal(
                &Binding::provider_headers(org_id, id),
                &headers.to_plaintext(),
            )
        })
    }

    /// The org's providers, each with its endpoints (two queries in all).
    pub async fn list_provider_keys(&self, org_id: Uuid) -> Result<Vec<ProviderKey>> {
        let mut conn = self.pool.acquire().await?;
        let rows = sqlx::query_as::<_, Row>(&format!(
            "SELECT {COLUMNS} FROM provider_keys WHERE org_id = $1 ORDER BY name"
        ))
        .bind(org_id)
        .fetch_all(&mut *conn)
        .await?;
        let mut further: HashMap<Uuid, Vec<ProviderEndpoint>> = HashMap::new();
        for e in Self::endpoint_views(&mut conn, org_id, None).await? {
            further.entry(e.provider_key_id).or_default().push(e);
        }
        Ok(rows
            .into_iter()
            .map(|r| {
                let endpoints = further.remove(&r.id).unwrap_or_default();
                r.view(endpoints)
            })
            .collect())
    }

    pub async fn get_provider_key(&self, org_id: Uuid, id: Uuid) -> Result<ProviderKey> {
        let mut conn = self.pool.acquire().await?;
        let row = Self::provider_row(&mut conn, org_id, id, false).await?;
        Self::provider_view(&mut conn, row).await
    }

    /// A provider with its secrets opened (for the connectivity test).
    pub async fn provider_key_with_token(
        &self,
        org_id: Uuid,
        id: Uuid,
    ) -> Result<ProviderWithToken> {
        let rows = sqlx::query_as::<_, JoinedRow>(&joined_query("p.org_id = $1 AND p.id = $2"))
            .bind(org_id)
            .bind(id)
            .fetch_all(&self.pool)
            .await?;
        let (row, further) = Self::group(rows).pop().ok_or(StorageError::NotFound)?;
        self.unseal(row, further)
    }

    /// The provider named `name` in the org, every secret opened: what the
    /// gateway routes with. One statement reads the provider, all its
    /// endpoints, its headers and timeouts.
    pub async fn provider_by_name(
        &self,
        org_id: Uuid,
        name: &str,
    ) -> Result<Option<ProviderWithToken>> {
        let rows = sqlx::query_as::<_, JoinedRow>(&joined_query("p.org_id = $1 AND p.name = $2"))
            .bind(org_id)
            .bind(name)
            .fetch_all(&self.pool)
            .await?;
        Self::group(rows)
            .pop()
            .map(|(row, further)| self.unseal(row, further))
            .transpose()
    }

    /// Every active provider of the org with its secrets opened (model
    /// listing), in one statement.
    pub async fn active_providers(&self, org_id: Uuid) -> Result<Vec<ProviderWithToken>> {
        let rows =
            sqlx::query_as::<_, JoinedRow>(&joined_query("p.org_id = $1 AND p.status = 'active'"))
                .bind(org_id)
                .fetch_all(&self.pool)
                .await?;
        // One undecryptable row (say, a key not yet given to this replica)
        // must not hide the others.
        Ok(Self::group(rows)
            .into_iter()
            .filter_map(|(r, further)| {
                let (org, id) = (r.org_id, r.id);
                self.unseal(r, further)
                    .map_err(|e| tracing::error!(error = %e, %org, provider_key_id = %id, "cannot decrypt provider token"))
                    .ok()
            })
            .collect())
    }

    /// The base URL and sealed token a PATCH leaves a row with: the one
    /// place of the rule that a new base URL needs its token, for providers
    /// and endpoints alike. The rule is checked by callers under the row
    /// lock, so no concurrent edit slips past it: the stored token is
    /// sealed to its URL and may not follow a URL an admin picks.
    /// Re-sending the current URL (in any spelling that normalizes to it)
    /// is no change.
    pub(crate) fn patch_token(
        &self,
        cur: StoredToken<'_>,
        base_url: Option<&BaseUrl>,
        token: Option<&ProviderToken>,
    ) -> Result<PatchedToken> {
        let new_url = base_url.filter(|b| !same_base_url(b, cur.binding.base_url));
        if new_url.is_some() && token.is_none() {
            return Err(ValidationError::new(
                "token",
                "token is required when base_url changes: the stored token is only ever sent to the base URL it was saved with, so send the token for the new base_url in the same request",
            )
            .into());
        }
        let url = new_url.map_or(cur.binding.base_url, |b| b.as_str());
        let (sealed, hint) = match token {
            Some(t) => (
                self.keyring.seal(
                    &Binding {
                        base_url: url,
                        ..cur.binding
                    },
                    t.expose_secret().as_bytes(),
                ),
                t.hint(),
            ),
            None => (cur.sealed, cur.hint.to_owned()),
        };
        Ok(PatchedToken {
            base_url: url.to_owned(),
            sealed,
            hint,
            url_changed: new_url.is_some(),
        })
    }

    /// Applies a patch; the token, when given, is sealed anew, and so are
    /// the headers. A new base URL must come with the token
    /// ([`Db::patch_token`]).
    pub async fn update_provider_key(
        &self,
        org_id: Uuid,
        actor: Actor,
        id: Uuid,
        patch: ProviderPatch,
    ) -> Result<ProviderKey> {
        self.patch_provider(org_id, actor, id, patch, PatchedAs::Provider)
            .await
    }

    /// [`Db::update_provider_key`], audited as the provider or as its own
    /// endpoint (which is edited through the same row).
    pub(crate) async fn patch_provider(
        &self,
        org_id: Uuid,
        actor: Actor,
        id: Uuid,
        patch: ProviderPatch,
        kind: PatchedAs,
    ) -> Result<ProviderKey> {
        let mut tx = self.pool.begin().await?;
        let cur = Self::provider_row(&mut tx, org_id, id, true).await?;
        let token = self.patch_token(
            StoredToken {
                binding: cur.binding(),
                sealed: cur.sealed(),
                hint: &cur.token_hint,
            },
            patch.base_url.as_ref(),
            patch.token.as_ref(),
        )?;
        let name = patch
            .name
            .as_ref()
            .map_or(cur.name.as_str(), |n| n.as_str());
        let status = patch.status.map_or(cur.status.as_str(), |s| s.as_str());
        let prices = patch.prices.as_ref().unwrap_or(&cur.prices);
        let timeouts = patch.timeouts.unwrap_or(cur.timeouts);
        let weight = patch.weight.map_or(cur.weight, |w| i32::from(w.get()));
        let (header_names, headers) = match &patch.headers {
            Some(h) => (h.names(), self.seal_headers(org_id, id, h)),
            None => (cur.header_names.clone(), cur.sealed_headers()),
        };
        let row = sqlx::query_as::<_, Row>(&format!(
            "UPDATE provider_keys SET name = $3, base_url = $4, status = $5, token_ciphertext = $6,
                token_nonce = $7, key_id = $8, token_hint = $9, aad_version = $10, prices = $11,
                weight = $12, header_names = $13, headers_ciphertext = $14, headers_nonce = $15,
                headers_key_id = $16, timeouts = $17, updated_at = now()
             WHERE org_id = $1 AND id = $2 RETURNING {COLUMNS}"
        ))
        .bind(org_id)
        .bind(id)
        .bind(name)
        .bind(&token.base_url)
        .bind(status)
        .bind(&token.sealed.ciphertext)
        .bind(&token.sealed.nonce)
        .bind(token.sealed.key_id)
        .bind(&token.hint)
        .bind(token.sealed.aad_version)
        .bind(sqlx::types::Json(prices))
        .bind(weight)
        .bind(&header_names)
        .bind(headers.as_ref().map(|h| &h.ciphertext))
        .bind(headers.as_ref().map(|h| &h.nonce))
        .bind(headers.as_ref().map(|h| h.key_id))
        .bind(sqlx::types::Json(timeouts))
        .fetch_one(&mut *tx)
        .await?;
        let mut changed = serde_json::Map::new();
        if kind == PatchedAs::OwnEndpoint {
            changed.insert("provider_key_id".into(), json!(id));
        }
        if patch.name.is_some() {
            changed.insert("name".into(), json!({"from": cur.name, "to": name}));
        }
        if token.url_changed {
            changed.insert(
                "base_url".into(),
                json!({"from": cur.base_url, "to": token.base_url}),
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
        if patch.weight.is_some() {
            changed.insert("weight".into(), json!({"from": cur.weight, "to": weight}));
        }
        if patch.headers.is_some() {
            // Names only: values are secrets, and replaced even when the names stay.
            changed.insert(
                "headers".into(),
                json!({"from": cur.header_names, "to": header_names}),
            );
        }
        if patch.timeouts.is_some() {
            changed.insert(
                "timeouts".into(),
                json!({"from": cur.timeouts, "to": timeouts}),
            );
        }
        record(
            &mut tx,
            org_id,
            actor,
            kind.action(),
            kind.target_type(),
            Some(id),
            changed.into(),
        )
        .await?;
        let view = Self::provider_view(&mut tx, row).await?;
        tx.commit().await?;
        Ok(view)
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

    /// Re-seals up to `batch` values of `secret` that `scope` selects, in
    /// the current format under the active key, skipping the rows in
    /// `skip`. Rows locked by others are passed over (the caller looks
    /// again), so it is safe while serving and with several processes at
    /// once. A value that does not open is left as it is and reported,
    /// never fatal.
    async fn reseal_batch(
        &self,
        secret: SealedSecret,
        scope: ResealScope,
        batch: u32,
        skip: &[Uuid],
    ) -> Result<BatchOutcome> {
        let mut tx = self.pool.begin().await?;
        let rows = sqlx::query_as::<_, SealedRow>(&format!(
            "{} WHERE {} AND id <> ALL($1) ORDER BY id LIMIT $2 FOR UPDATE SKIP LOCKED",
            secret.select(),
            secret.condition(scope, self.keyring.active_id())
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
            let binding = secret.binding(&row);
            let sealed = row.sealed();
            // The legacy format is opened here and nowhere else, and only to
            // be bound to the URL the row names right now.
            let opened = match (secret, row.aad_version) {
                (SealedSecret::ProviderToken, AAD_V1) => {
                    self.keyring.open_legacy(row.org_id, row.id, &sealed)
                }
                _ => self.keyring.open(&binding, &sealed),
            };
            let plain = match opened {
                Ok(p) => p,
                Err(reason) => {
                    out.skipped.push(SkippedToken {
                        secret,
                        org_id: row.org_id,
                        id: row.id,
                        reason,
                    });
                    continue;
                }
            };
            let sealed = self.keyring.seal(&binding, &plain);
            let mut update = sqlx::query(secret.update())
                .bind(row.org_id)
                .bind(row.id)
                .bind(&sealed.ciphertext)
                .bind(&sealed.nonce)
                .bind(sealed.key_id);
            if secret.has_aad_version() {
                update = update.bind(sealed.aad_version);
            }
            update.execute(&mut *tx).await?;
            out.rewritten += 1;
        }
        tx.commit().await?;
        Ok(out)
    }

    /// Batches until nothing is left that this process can take, for each
    /// kind of sealed value; rows that others hold locked are waited for a
    /// little, then counted as pending.
    async fn reseal_all(&self, scope: ResealScope) -> Result<ResealReport> {
        const LOCK_WAITS: u32 = 20;
        let mut report = ResealReport::default();
        for secret in SealedSecret::ALL {
            let mut skip = Vec::new();
            let mut waits = 0;
            loop {
                let out = self.reseal_batch(secret, scope, 100, &skip).await?;
                report.rewritten += out.rewritten;
                skip.extend(out.skipped.iter().map(|s| s.id));
                report.skipped.extend(out.skipped);
                if out.selected > 0 {
                    continue;
                }
                let left: i64 = sqlx::query_scalar(&format!(
                    "SELECT count(*) FROM {} WHERE {} AND id <> ALL($1)",
                    secret.table(),
                    secret.condition(scope, self.keyring.active_id())
                ))
                .bind(&skip)
                .fetch_one(&self.pool)
                .await?;
                if left == 0 {
                    break;
                }
                if waits == LOCK_WAITS {
                    report.pending += left as u64;
                    break;
                }
                waits += 1;
                tokio::time::sleep(std::time::Duration::from_millis(250)).await;
            }
        }
        Ok(report)
    }

    /// Re-seals every token still in the legacy format (which does not bind
    /// the base URL) in the current one. Runs at start-up right after the
    /// migrations; idempotent, and safe with several replicas starting at once.
    pub async fn upgrade_legacy_tokens(&self) -> Result<ResealReport> {
        self.reseal_all(ResealScope::Legacy).await
    }

    /// Re-encrypts every sealed value (providers' and endpoints' tokens,
    /// providers' headers) not under the active key, or not in the current
    /// format; idempotent, safe while serving.
    pub async fn rotate_tokens(&self) -> Result<ResealReport> {
        self.reseal_all(ResealScope::NotCurrent).await
    }
}

/// What a provider-row PATCH is, for the audit log.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum PatchedAs {
    /// `PATCH /provider-keys/{id}`.
    Provider,
    /// `PATCH /provider-keys/{id}/endpoints/{id}` of the provider's own endpoint.
    OwnEndpoint,
}

impl PatchedAs {
    fn action(self) -> &'static str {
        match self {
            Self::Provider => "provider_key.update",
            Self::OwnEndpoint => "provider_endpoint.update",
        }
    }

    fn target_type(self) -> &'static str {
        match self {
            Self::Provider => "provider_key",
            Self::OwnEndpoint => "provider_endpoint",
        }
    }
}

/// Same URL, as stored or as the current parser normalizes the stored one.
fn same_base_url(new: &BaseUrl, stored: &str) -> bool {
    new.as_str() == stored || BaseUrl::parse(stored).is_ok_and(|s| s == *new)
}

/// A kind of sealed value, where it is stored and what it is bound to.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum SealedSecret {
    /// `provider_keys.token_*`: a provider's own token.
    ProviderToken,
    /// `provider_endpoints.token_*`: a further endpoint's token.
    EndpointToken,
    /// `provider_keys.headers_*`: a provider's static headers.
    ProviderHeaders,
}

impl fmt::Display for SealedSecret {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            Self::ProviderToken => "provider key",
            Self::EndpointToken => "provider endpoint",
            Self::ProviderHeaders => "headers of provider key",
        })
    }
}

/// One sealed value as a re-seal reads it.
#[derive(sqlx::FromRow)]
struct SealedRow {
    org_id: Uuid,
    id: Uuid,
    base_url: String,
    ciphertext: Vec<u8>,
    nonce: Vec<u8>,
    key_id: i32,
    aad_version: i16,
}

impl SealedRow {
    fn sealed(&self) -> Sealed {
        Sealed::from_columns(self.key_id, self.aad_version, &self.nonce, &self.ciphertext)
    }
}

impl SealedSecret {
    const ALL: [SealedSecret; 3] = [
        SealedSecret::ProviderToken,
        SealedSecret::EndpointToken,
        SealedSecret::ProviderHeaders,
    ];

    /// Selects [`SealedRow`]s; `id` is the row's, so filters apply to it.
    fn select(self) -> &'static str {
        match self {
            Self::ProviderToken => {
                "SELECT org_id, id, base_url, token_ciphertext AS ciphertext, token_nonce AS nonce,
                key_id, aad_version FROM provider_keys"
            }
            Self::EndpointToken => {
                "SELECT org_id, id, base_url, token_ciphertext AS ciphertext, token_nonce AS nonce,
                key_id, aad_version FROM provider_endpoints"
            }
            // Headers are bound to no URL and only ever sealed in the current format.
            Self::ProviderHeaders => {
                "SELECT org_id, id, '' AS base_url, headers_ciphertext AS ciphertext,
                headers_nonce AS nonce, headers_key_id AS key_id, 2::int2 AS aad_version
                FROM provider_keys"
            }
        }
    }

    fn table(self) -> &'static str {
        match self {
            Self::ProviderToken | Self::ProviderHeaders => "provider_keys",
            Self::EndpointToken => "provider_endpoints",
        }
    }

    /// The SQL condition on [`SealedSecret::table`]'s columns; only
    /// integers of our own are formatted into it.
    fn condition(self, scope: ResealScope, active_key: i32) -> String {
        match (self, scope) {
            (Self::ProviderToken, ResealScope::Legacy) => format!("aad_version = {AAD_V1}"),
            // Nothing else was ever sealed in the legacy format.
            (_, ResealScope::Legacy) => "false".to_owned(),
            (Self::ProviderHeaders, ResealScope::NotCurrent) => {
                format!("headers_key_id IS NOT NULL AND headers_key_id <> {active_key}")
            }
            (_, ResealScope::NotCurrent) => {
                format!("(key_id <> {active_key} OR aad_version <> {AAD_V2})")
            }
        }
    }

    fn binding(self, row: &SealedRow) -> Binding<'_> {
        match self {
            Self::ProviderToken => Binding::provider_token(row.org_id, row.id, &row.base_url),
            Self::EndpointToken => Binding::endpoint_token(row.org_id, row.id, &row.base_url),
            Self::ProviderHeaders => Binding::provider_headers(row.org_id, row.id),
        }
    }

    fn has_aad_version(self) -> bool {
        self != Self::ProviderHeaders
    }

    /// Writes a re-sealed value back: `$1` org, `$2` id, `$3` ciphertext,
    /// `$4` nonce, `$5` key id and, where stored, `$6` the format.
    fn update(self) -> &'static str {
        match self {
            Self::ProviderToken => "UPDATE provider_keys SET token_ciphertext = $3, token_nonce = $4, key_id = $5, aad_version = $6
                 WHERE org_id = $1 AND id = $2",
            Self::EndpointToken => "UPDATE provider_endpoints SET token_ciphertext = $3, token_nonce = $4, key_id = $5, aad_version = $6
                 WHERE org_id = $1 AND id = $2",
            Self::ProviderHeaders => "UPDATE provider_keys SET headers_ciphertext = $3, headers_nonce = $4, headers_key_id = $5
                 WHERE org_id = $1 AND id = $2",
        }
    }
}

/// Which rows a re-seal pass rewrites.
#[derive(Debug, Clone, Copy)]
enum ResealScope {
    /// Rows in the legacy associated-data format.
    Legacy,
    /// Rows not under the active key or not in the current format.
    NotCurrent,
}

#[derive(Debug, Default)]
struct BatchOutcome {
    selected: usize,
    rewritten: u64,
    skipped: Vec<SkippedToken>,
}

/// A value a re-seal could not open; it is left untouched.
#[derive(Debug, Clone)]
pub struct SkippedToken {
    /// What it is: `id` is a provider key's for its token and headers, an
    /// endpoint's for an endpoint token.
    pub secret: SealedSecret,
    pub org_id: Uuid,
    pub id: Uuid,
    /// Never holds any part of the token.
    pub reason: CryptoError,
}

/// What a re-seal pass did.
#[derive(Debug, Default)]
pub struct ResealReport {
    /// Values re-sealed.
    pub rewritten: u64,
    /// Values that did not open, by kind, id and reason.
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
