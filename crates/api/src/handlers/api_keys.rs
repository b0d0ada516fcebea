//! Gateway API keys. The key itself appears once, in the creation answer.

use actix_web::{web, HttpResponse};
use chrono::{DateTime, Datelike, Duration, NaiveDate, Utc};
use serde::Serialize;
use serde_json::{json, Value};
use storage::api_keys::ApiKey;
use storage::limits::{Limits, COUNT_LIMITS};

use super::List;
use crate::error::ApiError;
use crate::extract::{role, Input, ItemId, OrgAccess, Query};
use crate::input::{CreateApiKey, PageQuery, PatchApiKey, PAGE_MAX};
use crate::State;

/// The creation answer: the key's fields plus the key, shown this once.
#[derive(Serialize)]
struct Created {
    #[serde(flatten)]
    api_key: ApiKey,
    key: String,
}

pub async fn list(
    state: web::Data<State>,
    access: OrgAccess<role::Member>,
    query: Query<PageQuery<PAGE_MAX>>,
) -> Result<HttpResponse, ApiError> {
    let q = query.into_inner()?;
    let page = state
        .db
        .list_api_keys(access.org_id(), q.cursor.as_ref(), q.limit)
        .await?;
    Ok(HttpResponse::Ok().json(List::page(page)))
}

pub async fn create(
    state: web::Data<State>,
    access: OrgAccess<role::Admin>,
    input: Input<CreateApiKey>,
) -> Result<HttpResponse, ApiError> {
    let input = input.into_inner()?;
    let (api_key, secret) = state
        .db
        .create_api_key_with(access.org_id(), access.actor(), &input.name, &input.options)
        .await?;
    Ok(HttpResponse::Created().json(Created {
        api_key,
        key: secret.expose_secret().to_owned(),
    }))
}

pub async fn revoke(
    state: web::Data<State>,
    access: OrgAccess<role::Admin>,
    id: ItemId,
) -> Result<HttpResponse, ApiError> {
    let key = state
        .db
        .revoke_api_key(access.org_id(), access.actor(), id.get()?)
        .await?;
    Ok(HttpResponse::Ok().json(key))
}

pub async fn get(
    state: web::Data<State>,
    access: OrgAccess<role::Member>,
    id: ItemId,
) -> Result<HttpResponse, ApiError> {
    let key = state.db.get_api_key(access.org_id(), id.get()?).await?;
    Ok(HttpResponse::Ok().json(key))
}

/// Edits name, expiry, limits and model scope; the key itself is unchanged.
pub async fn update(
    state: web::Data<State>,
    access: OrgAccess<role::Admin>,
    id: ItemId,
    input: Input<PatchApiKey>,
) -> Result<HttpResponse, ApiError> {
    let id = id.get()?;
    let PatchApiKey(patch) = input.into_inner()?;
    let key = state
        .db
        .update_api_key(access.org_id(), access.actor(), id, &patch)
        .await?;
    Ok(HttpResponse::Ok().json(key))
}

/// One limit that applies to a key, from the key itself or its organization.
#[derive(Debug, Serialize)]
pub struct LimitState {
    pub limit: &'static str,
    /// `api_key` or `organization`.
    pub scope: &'static str,
    /// An integer, or for `budget_per_month_usd` a decimal string.
    pub max: Value,
    pub used: Option<Value>,
    pub remaining: Option<Value>,
    /// When the current period ends (day and month limits, UTC); `null`
    /// for the sliding minute window and for concurrency.
    pub resets_at: Option<DateTime<Utc>>,
}

/// Consumption of one limit. The counters live in the limiter (Redis or the
/// gateway's own memory), which this API does not reach yet, so nothing is
/// known: `used` and `remaining` answer `null`. This is the one place to
/// fill them in once the API holds a limiter handle.
fn consumption(_limit: &str, _max: &Value) -> (Option<Value>, Option<Value>) {
    (None, None)
}

/// When the period of `limit` ends after `now` (UTC calendar days and months).
fn resets_at(limit: &str, now: DateTime<Utc>) -> Option<DateTime<Utc>> {
    let today = now.date_naive();
    let next = match limit {
        "tokens_per_day" => today + Duration::days(1),
        "tokens_per_month" | "budget_per_month_usd" => {
            let (y, m) = if today.month() == 12 {
                (today.year() + 1, 1)
            } else {
                (today.year(), today.month() + 1)
            };
            NaiveDate::from_ymd_opt(y, m, 1)?
        }
        _ => return None,
    };
    Some(next.and_hms_opt(0, 0, 0)?.and_utc())
}

fn states(scope: &'static str, limits: &Limits, now: DateTime<Utc>, out: &mut Vec<LimitState>) {
    let counts = COUNT_LIMITS
        .iter()
        .filter_map(|name| limits.count(name).map(|n| (*name, json!(n))));
    let money = limits
        .budget_per_month_usd
        .map(|d| ("budget_per_month_usd", json!(d.to_string())));
    for (limit, max) in counts.chain(money) {
        let (used, remaining) = consumption(limit, &max);
        out.push(LimitState {
            limit,
            scope,
            max,
            used,
            remaining,
            resets_at: resets_at(limit, now),
        });
    }
}

/// Every limit that applies to the key: its own, then its organization's.
pub async fn limits(
    state: web::Data<State>,
    access: OrgAccess<role::Member>,
    id: ItemId,
) -> Result<HttpResponse, ApiError> {
    let key = state.db.get_api_key(access.org_id(), id.get()?).await?;
    let now = Utc::now();
    let mut data = Vec::new();
    states("api_key", &key.limits, now, &mut data);
    states("organization", &access.org.limits, now, &mut data);
    Ok(HttpResponse::Ok().json(json!({ "data": data })))
}
