//! Gateway API keys. The key itself appears once, in the creation answer.

use actix_web::{web, HttpResponse};
use chrono::{DateTime, Datelike, Duration, NaiveDate, Utc};
use serde::Serialize;
use serde_json::{json, Value};
use storage::api_keys::ApiKey;
use storage::limits::{usd_like, Limits, Money, COUNT_LIMITS};

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
    /// The warning threshold (`soft_limit_percent` of `max`, in its unit);
    /// `null` without one.
    pub soft: Option<Value>,
    /// What admission counts against `max`: settled usage plus the
    /// reservations of requests still running; `null` while unknown.
    pub used: Option<Value>,
    pub remaining: Option<Value>,
    /// `used` has reached `soft`; `null` while either is unknown.
    pub soft_reached: Option<bool>,
    /// When the current period ends (day and month limits, UTC); `null`
    /// for the sliding minute window and for concurrency.
    pub resets_at: Option<DateTime<Utc>>,
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

/// The entries of one scope's limits; `used` is that scope's counters
/// (`None`: unknown).
fn states(
    scope: &'static str,
    limits: &Limits,
    used: Option<&limits::Used>,
    now: DateTime<Utc>,
    out: &mut Vec<LimitState>,
) {
    for limit in COUNT_LIMITS {
        let Some(max) = limits.count(limit) else {
            continue;
        };
        let soft = limits.soft_count(max);
        let used = used.and_then(|u| u.count(limit));
        out.push(LimitState {
            limit,
            scope,
            max: json!(max),
            soft: soft.map(|s| json!(s)),
            used: used.map(|u| json!(u)),
            remaining: used.map(|u| json!(max.saturating_sub(u))),
            soft_reached: soft.zip(used).map(|(s, u)| u >= s),
            resets_at: resets_at(limit, now),
        });
    }
    if let Some(max) = limits.budget_per_month_usd {
        let limit = "budget_per_month_usd";
        let soft = limits.soft_usd(max);
        let used = used.map(limits::Used::usd);
        let text = |d: Money| json!(usd_like(d, max));
        out.push(LimitState {
            limit,
            scope,
            max: json!(max.to_string()),
            soft: soft.map(text),
            used: used.map(text),
            remaining: used.map(|u| text((max - u).max(Money::ZERO))),
            soft_reached: soft.zip(used).map(|(s, u)| u >= s),
            resets_at: resets_at(limit, now),
        });
    }
}

/// Every limit that applies to the key: its own, then its organization's,
/// with what is used of each when the shared counters can be read.
pub async fn limits(
    state: web::Data<State>,
    access: OrgAccess<role::Member>,
    id: ItemId,
) -> Result<HttpResponse, ApiError> {
    let key = state.db.get_api_key(access.org_id(), id.get()?).await?;
    let limited = !key.limits.is_empty() || !access.org.limits.is_empty();
    let counters = match &state.cfg.limiter {
        Some(limiter) if limited => match limiter.consumption(access.org_id(), key.id).await {
            Ok(c) => Some(c),
            Err(e) => {
                tracing::warn!(error = %e, "limits: cannot read the counters; used answers null");
                None
            }
        },
        _ => None,
    };
    // The counters' own clock decides which day and month they are of.
    let now = counters
        .and_then(|c| DateTime::from_timestamp(c.now_s, 0))
        .unwrap_or_else(Utc::now);
    let mut data = Vec::new();
    let used = |scope: fn(&limits::Consumption) -> &limits::Used| counters.as_ref().map(scope);
    states("api_key", &key.limits, used(|c| &c.key), now, &mut data);
    states(
        "organization",
        &access.org.limits,
        used(|c| &c.org),
        now,
        &mut data,
    );
    Ok(HttpResponse::Ok().json(json!({ "data": data })))
}
