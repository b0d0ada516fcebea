//! Usage rows (`request_logs`): batched writes from the gateway, reads for the API.

use std::collections::HashMap;

use chrono::{DateTime, Utc};
use rust_decimal::Decimal;
use serde::Serialize;
use uuid::Uuid;

use crate::db::Db;
use crate::error::Result;
use crate::limits::Prices;
use crate::page::{Cursor, Page};

/// One request as the gateway saw it.
#[derive(Debug, Clone, Serialize, sqlx::FromRow, PartialEq)]
pub struct RequestLog {
    pub id: Uuid,
    pub request_id: String,
    pub org_id: Uuid,
    pub api_key_id: Option<Uuid>,
    pub provider_key_id: Option<Uuid>,
    pub provider_name: Option<String>,
    pub requested_model: Option<String>,
    pub upstream_model: Option<String>,
    pub status_code: i16,
    pub streamed: bool,
    pub canceled: bool,
    pub prompt_tokens: Option<i64>,
    pub completion_tokens: Option<i64>,
    pub total_tokens: Option<i64>,
    pub latency_ms: i32,
    pub ttfb_ms: Option<i32>,
    pub error_class: Option<String>,
    pub created_at: DateTime<Utc>,
    /// The endpoint that answered: the provider's own id, or one of its
    /// further endpoints'.
    pub endpoint_id: Option<Uuid>,
    /// Upstream attempts the request took, retries and fallbacks included.
    pub attempts: Option<i16>,
}

/// A usage row as the logs API reads it back: what the gateway wrote, and
/// what it cost as priced at insert (`None`: no price or no token counts).
#[derive(Debug, Clone, Serialize, sqlx::FromRow, PartialEq)]
pub struct LoggedRequest {
    #[serde(flatten)]
    #[sqlx(flatten)]
    pub row: RequestLog,
    /// A decimal string in JSON, like the usage sums.
    pub cost_usd: Option<Decimal>,
}

/// Filters for listing usage rows.
#[derive(Debug, Default, Clone)]
pub struct LogFilter {
    pub api_key_id: Option<Uuid>,
    pub provider_name: Option<String>,
    pub status_code: Option<i16>,
    pub from: Option<DateTime<Utc>>,
    pub to: Option<DateTime<Utc>>,
}

/// How usage is aggregated.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum GroupBy {
    Day,
    Model,
    Provider,
    ApiKey,
    Endpoint,
}

/// Which requests the usage sums count (`None`: all).
#[derive(Debug, Clone, Default)]
pub struct UsageFilter {
    /// The requested `{customName}/{modelName}`.
    pub model: Option<String>,
    pub provider_name: Option<String>,
    pub api_key_id: Option<Uuid>,
    /// The path after `/v1/` (`chat/completions`, `embeddings`, …).
    pub endpoint: Option<String>,
}

/// One aggregated usage bucket.
#[derive(Debug, Clone, Serialize, sqlx::FromRow)]
pub struct UsageRow {
    pub key: Option<String>,
    pub requests: i64,
    pub errors: i64,
    pub prompt_tokens: i64,
    pub completion_tokens: i64,
    pub total_tokens: i64,
    /// Answered requests (status below 400) with no token counts at all,
    /// e.g. streams whose upstream sent no usage: the sums above miss them.
    pub requests_without_usage: i64,
    pub p50_latency_ms: Option<f64>,
    pub p95_latency_ms: Option<f64>,
    /// Sum of the rows' `cost_usd` (rows without a price add nothing).
    pub cost_usd: Decimal,
}

/// Usage rows the gateway's writer sends per INSERT unless configured
/// (`LLMGW_LOG_BATCH_SIZE`).
pub const DEFAULT_LOG_BATCH_SIZE: usize = 500;

impl Db {
    /// Writes many rows in one statement (`endpoint` left NULL).
    pub async fn insert_request_logs(&self, rows: &[RequestLog]) -> Result<()> {
        let rows: Vec<(&RequestLog, Option<&str>)> = rows.iter().map(|r| (r, None)).collect();
        self.insert_logs(&rows).await
    }

    /// Writes many rows in one statement, each with its `endpoint` (the path after `/v1/`).
    pub async fn insert_request_logs_at(&self, rows: &[(RequestLog, &str)]) -> Result<()> {
        let rows: Vec<(&RequestLog, Option<&str>)> =
            rows.iter().map(|(r, e)| (r, Some(*e))).collect();
        self.insert_logs(&rows).await
    }

    async fn insert_logs(&self, rows: &[(&RequestLog, Option<&str>)]) -> Result<()> {
        if rows.is_empty() {
            return Ok(());
        }
        let costs = self.costs(rows.iter().map(|(r, _)| *r)).await?;
        macro_rules! col {
            ($f:ident) => {
                rows.iter().map(|(r, _)| r.$f.clone()).collect::<Vec<_>>()
            };
        }
        sqlx::query(
            "INSERT INTO request_logs (id, request_id, org_id, api_key_id, provider_key_id, provider_name,
                requested_model, upstream_model, status_code, streamed, canceled, prompt_tokens,
                completion_tokens, total_tokens, latency_ms, ttfb_ms, error_class, created_at, endpoint, cost_usd,
                endpoint_id, attempts)
             SELECT * FROM UNNEST($1::uuid[], $2::text[], $3::uuid[], $4::uuid[], $5::uuid[], $6::text[],
                $7::text[], $8::text[], $9::int2[], $10::bool[], $11::bool[], $12::int8[], $13::int8[],
                $14::int8[], $15::int4[], $16::int4[], $17::text[], $18::timestamptz[], $19::text[],
                $20::numeric[], $21::uuid[], $22::int2[])
             ON CONFLICT DO NOTHING",
        )
        .bind(col!(id))
        .bind(col!(request_id))
        .bind(col!(org_id))
        .bind(col!(api_key_id))
        .bind(col!(provider_key_id))
        .bind(col!(provider_name))
        .bind(col!(requested_model))
        .bind(col!(upstream_model))
        .bind(col!(status_code))
        .bind(col!(streamed))
        .bind(col!(canceled))
        .bind(col!(prompt_tokens))
        .bind(col!(completion_tokens))
        .bind(col!(total_tokens))
        .bind(col!(latency_ms))
        .bind(col!(ttfb_ms))
        .bind(col!(error_class))
        .bind(col!(created_at))
        .bind(rows.iter().map(|(_, e)| *e).collect::<Vec<_>>())
        .bind(costs)
        .bind(col!(endpoint_id))
        .bind(col!(attempts))
        .execute(&self.pool)
        .await?;
        Ok(())
    }

    /// What each row cost under its provider's prices as they are now (one
    /// query for the batch): `None` without a price or token counts.
    pub async fn costs(
        &self,
        rows: impl Iterator<Item = &RequestLog> + Clone,
    ) -> Result<Vec<Option<Decimal>>> {
        let mut keys: Vec<(Uuid, Uuid)> = rows
            .clone()
            .filter(|r| r.prompt_tokens.is_some() || r.completion_tokens.is_some())
            .filter_map(|r| Some((r.org_id, r.provider_key_id?)))
            .collect();
        keys.sort_unstable();
        keys.dedup();
        // Keyed by (org, provider): a row never takes another org's prices.
        let prices: HashMap<(Uuid, Uuid), Prices> = if keys.is_empty() {
            HashMap::new()
        } else {
            let (orgs, ids): (Vec<Uuid>, Vec<Uuid>) = keys.into_iter().unzip();
            sqlx::query_as::<_, (Uuid, Uuid, sqlx::types::Json<Prices>)>(
                "SELECT p.org_id, p.id, p.prices FROM provider_keys p
                 JOIN UNNEST($1::uuid[], $2::uuid[]) AS k(org_id, id)
                   ON p.org_id = k.org_id AND p.id = k.id
                 WHERE jsonb_array_length(p.prices) > 0",
            )
            .bind(orgs)
            .bind(ids)
            .fetch_all(&self.pool)
            .await?
            .into_iter()
            .map(|(org, id, p)| ((org, id), p.0))
            .collect()
        };
        Ok(rows
            .map(|r| {
                let prices = prices.get(&(r.org_id, r.provider_key_id?))?;
                prices.cost(
                    r.upstream_model.as_deref().unwrap_or(""),
                    r.prompt_tokens,
                    r.completion_tokens,
                )
            })
            .collect())
    }

    /// The org's usage rows, newest first, filtered.
    pub async fn list_request_logs(
        &self,
        org_id: Uuid,
        filter: &LogFilter,
        after: Option<&Cursor>,
        limit: u32,
    ) -> Result<Page<LoggedRequest>> {
        let limit = limit.clamp(1, 500);
        // trim_scale as in the usage sums: a bucket of one row reads like the row.
        let rows = sqlx::query_as::<_, LoggedRequest>(
            "SELECT id, request_id, org_id, api_key_id, provider_key_id, provider_name,
                requested_model, upstream_model, status_code, streamed, canceled, prompt_tokens,
                completion_tokens, total_tokens, latency_ms, ttfb_ms, error_class, created_at, endpoint_id, attempts,
                trim_scale(cost_usd) AS cost_usd
             FROM request_logs
             WHERE org_id = $1
               AND ($2::uuid IS NULL OR api_key_id = $2)
               AND ($3::text IS NULL OR provider_name = $3)
               AND ($4::int2 IS NULL OR status_code = $4)
               AND ($5::timestamptz IS NULL OR created_at >= $5)
               AND ($6::timestamptz IS NULL OR created_at < $6)
               AND ($7::timestamptz IS NULL OR (created_at, id) < ($7, $8))
             ORDER BY created_at DESC, id DESC LIMIT $9",
        )
        .bind(org_id)
        .bind(filter.api_key_id)
        .bind(filter.provider_name.as_deref())
        .bind(filter.status_code)
        .bind(filter.from)
        .bind(filter.to)
        .bind(after.map(|c| c.at))
        .bind(after.map(|c| c.id))
        .bind(i64::from(limit) + 1)
        .fetch_all(&self.pool)
        .await?;
        Ok(Page::from_rows(rows, limit, |r| Cursor {
            at: r.row.created_at,
            id: r.row.id,
        }))
    }

    /// Aggregates the org's usage in `[from, to)`.
    pub async fn usage(
        &self,
        org_id: Uuid,
        from: DateTime<Utc>,
        to: DateTime<Utc>,
        group_by: GroupBy,
        filter: &UsageFilter,
    ) -> Result<Vec<UsageRow>> {
        let key = match group_by {
            GroupBy::Day => {
                "to_char(date_trunc('day', created_at AT TIME ZONE 'UTC'), 'YYYY-MM-DD')"
            }
            GroupBy::Model => "requested_model",
            GroupBy::Provider => "provider_name",
            GroupBy::ApiKey => "api_key_id::text",
            GroupBy::Endpoint => "endpoint",
        };
        Ok(sqlx::query_as::<_, UsageRow>(&format!(
            "SELECT {key} AS key,
                count(*) AS requests,
                count(*) FILTER (WHERE status_code >= 400 OR error_class IS NOT NULL) AS errors,
                coalesce(sum(prompt_tokens), 0)::int8 AS prompt_tokens,
                coalesce(sum(completion_tokens), 0)::int8 AS completion_tokens,
                coalesce(sum(total_tokens), 0)::int8 AS total_tokens,
                count(*) FILTER (WHERE status_code < 400 AND prompt_tokens IS NULL
                    AND completion_tokens IS NULL AND total_tokens IS NULL) AS requests_without_usage,
                percentile_cont(0.5) WITHIN GROUP (ORDER BY latency_ms) AS p50_latency_ms,
                percentile_cont(0.95) WITHIN GROUP (ORDER BY latency_ms) AS p95_latency_ms,
                trim_scale(coalesce(sum(cost_usd), 0)) AS cost_usd
             FROM request_logs
             WHERE org_id = $1 AND created_at >= $2 AND created_at < $3
               AND ($4::text IS NULL OR requested_model = $4)
               AND ($5::text IS NULL OR provider_name = $5)
               AND ($6::uuid IS NULL OR api_key_id = $6)
               AND ($7::text IS NULL OR endpoint = $7)
             GROUP BY 1 ORDER BY 1"
        ))
        .bind(org_id)
        .bind(from)
        .bind(to)
        .bind(filter.model.as_deref())
        .bind(filter.provider_name.as_deref())
        .bind(filter.api_key_id)
        .bind(filter.endpoint.as_deref())
        .fetch_all(&self.pool)
        .await?)
    }
}
