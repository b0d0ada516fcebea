//! Usage rows (`request_logs`): batched writes from the gateway, reads for the API.

use std::collections::HashMap;

use chrono::{DateTime, Utc};
use rust_decimal::Decimal;
use serde::Serialize;
use uuid::Uuid;

use crate::db::Db;
use crate::error::{Result, StorageError};
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
        match self.insert_priced(rows, &costs).await {
            Err(e) if is_without_partition(&e) => {
                // Rows of a day with no partition (held through a long
                // outage, or a clock far off): make the partitions, once.
                let mut days: Vec<chrono::NaiveDate> = rows
                    .iter()
                    .map(|(r, _)| r.created_at.date_naive())
                    .collect();
                days.sort_unstable();
                days.dedup();
                let made: Vec<bool> = sqlx::query_scalar(
                    "SELECT llmgw_create_log_partition(d) FROM UNNEST($1::date[]) AS d",
                )
                .bind(&days)
                .fetch_all(&self.pool)
                .await?;
                tracing::warn!(
                    ?days,
                    made = made.iter().filter(|m| **m).count(),
                    "usage rows of days without a partition: partitions made"
                );
                self.insert_priced(rows, &costs).await
            }
            r => r,
        }
    }

    async fn insert_priced(
        &self,
        rows: &[(&RequestLog, Option<&str>)],
        costs: &[Option<Decimal>],
    ) -> Result<()> {
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

    /// Aggregates the org's usage in `[from, to)`: the whole hours from the
    /// hourly rollups (`usage_hourly`), the partial hours at the window's
    /// edges from the rows. The sums are those of the rows; p50 and p95 come
    /// from the latency histograms, within 6 % of the rows' own percentiles.
    pub async fn usage(
        &self,
        org_id: Uuid,
        from: DateTime<Utc>,
        to: DateTime<Utc>,
        group_by: GroupBy,
        filter: &UsageFilter,
    ) -> Result<Vec<UsageRow>> {
        let key = match group_by {
            GroupBy::Day => "to_char(at AT TIME ZONE 'UTC', 'YYYY-MM-DD')",
            GroupBy::Model => "requested_model",
            GroupBy::Provider => "provider_name",
            GroupBy::ApiKey => "api_key_id::text",
            GroupBy::Endpoint => "endpoint",
        };
        let span = HourSpan::new(from, to);
        // A NULL dimension is stored in the rollups as the nil UUID or '':
        // both branches read them back as NULL.
        Ok(sqlx::query_as::<_, UsageRow>(&format!(
            "WITH src AS (
                SELECT hour AS at, NULLIF(api_key_id, '{nil}') AS api_key_id,
                    NULLIF(provider_name, '') AS provider_name,
                    NULLIF(requested_model, '') AS requested_model, NULLIF(endpoint, '') AS endpoint,
                    requests, errors, without_usage, prompt_tokens, completion_tokens, total_tokens,
                    cost_usd, latency
                FROM usage_hourly
                WHERE org_id = $1 AND hour >= $2 AND hour < $3
                UNION ALL
                SELECT at, api_key_id, provider_name, requested_model, endpoint,
                    sum(requests)::int8, sum(errors)::int8, sum(without_usage)::int8,
                    sum(prompt_tokens)::int8, sum(completion_tokens)::int8, sum(total_tokens)::int8,
                    sum(cost_usd), llmgw_histogram_of(bucket, requests)
                FROM (
                    -- Counted per latency bucket first, as the rollups are.
                    SELECT date_trunc('hour', created_at, 'UTC') AS at,
                        NULLIF(api_key_id, '{nil}') AS api_key_id,
                        NULLIF(provider_name, '') AS provider_name,
                        NULLIF(requested_model, '') AS requested_model,
                        NULLIF(endpoint, '') AS endpoint,
                        llmgw_latency_bucket(latency_ms) AS bucket,
                        count(*) AS requests,
                        count(*) FILTER (WHERE llmgw_is_error(status_code, error_class)) AS errors,
                        count(*) FILTER (WHERE llmgw_without_usage(status_code, prompt_tokens,
                            completion_tokens, total_tokens)) AS without_usage,
                        coalesce(sum(prompt_tokens), 0) AS prompt_tokens,
                        coalesce(sum(completion_tokens), 0) AS completion_tokens,
                        coalesce(sum(total_tokens), 0) AS total_tokens,
                        coalesce(sum(cost_usd), 0) AS cost_usd
                    FROM request_logs
                    WHERE org_id = $1
                      AND ((created_at >= $4 AND created_at < $5) OR (created_at >= $6 AND created_at < $7))
                    GROUP BY 1, 2, 3, 4, 5, 6
                ) per_bucket
                GROUP BY 1, 2, 3, 4, 5
            ), sums AS (
                SELECT {key} AS key,
                    sum(requests)::int8 AS requests,
                    sum(errors)::int8 AS errors,
                    sum(prompt_tokens)::int8 AS prompt_tokens,
                    sum(completion_tokens)::int8 AS completion_tokens,
                    sum(total_tokens)::int8 AS total_tokens,
                    sum(without_usage)::int8 AS requests_without_usage,
                    llmgw_histogram_sum(latency) AS latency,
                    trim_scale(sum(cost_usd)) AS cost_usd
                FROM src
                WHERE ($8::text IS NULL OR requested_model = $8)
                  AND ($9::text IS NULL OR provider_name = $9)
                  AND ($10::uuid IS NULL OR api_key_id = $10)
                  AND ($11::text IS NULL OR endpoint = $11)
                GROUP BY 1
            )
            SELECT key, requests, errors, prompt_tokens, completion_tokens, total_tokens,
                requests_without_usage,
                llmgw_histogram_quantile(latency, 0.5) AS p50_latency_ms,
                llmgw_histogram_quantile(latency, 0.95) AS p95_latency_ms,
                cost_usd
            FROM sums ORDER BY key",
            nil = Uuid::nil(),
        ))
        .bind(org_id)
        .bind(span.rolled.0)
        .bind(span.rolled.1)
        .bind(span.head.0)
        .bind(span.head.1)
        .bind(span.tail.0)
        .bind(span.tail.1)
        .bind(filter.model.as_deref())
        .bind(filter.provider_name.as_deref())
        .bind(filter.api_key_id)
        .bind(filter.endpoint.as_deref())
        .fetch_all(&self.pool)
        .await?)
    }
}

/// The refusal of a row whose time no partition of `request_logs` covers.
fn is_without_partition(e: &StorageError) -> bool {
    match e {
        StorageError::Database(sqlx::Error::Database(e)) => {
            e.code().as_deref() == Some("23514")
                && e.message().starts_with("no partition of relation")
        }
        _ => false,
    }
}

/// How a usage window `[from, to)` is read: its whole UTC hours from the
/// rollups, the partial hours at either edge from the rows. Each part is a
/// half-open range; an empty one has its start equal to its end.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct HourSpan {
    /// The whole hours, read from `usage_hourly`.
    pub rolled: (DateTime<Utc>, DateTime<Utc>),
    /// From `from` to the first whole hour, read from the rows.
    pub head: (DateTime<Utc>, DateTime<Utc>),
    /// From the end of the last whole hour to `to`, read from the rows.
    pub tail: (DateTime<Utc>, DateTime<Utc>),
}

impl HourSpan {
    pub fn new(from: DateTime<Utc>, to: DateTime<Utc>) -> Self {
        match (ceil_hour(from), floor_hour(to)) {
            (Some(first), Some(last)) if from < to && first < last => Self {
                rolled: (first, last),
                head: (from, first),
                tail: (last, to),
            },
            // No whole hour inside: the rows alone.
            _ => Self {
                rolled: (from, from),
                head: (from, to),
                tail: (to, to),
            },
        }
    }
}

fn floor_hour(t: DateTime<Utc>) -> Option<DateTime<Utc>> {
    let s = t.timestamp();
    DateTime::from_timestamp(s - s.rem_euclid(3600), 0)
}

fn ceil_hour(t: DateTime<Utc>) -> Option<DateTime<Utc>> {
    let floor = floor_hour(t)?;
    if floor == t {
        Some(t)
    } else {
        floor.checked_add_signed(chrono::TimeDelta::hours(1))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use chrono::TimeZone;

    fn at(h: u32, m: u32, s: u32) -> DateTime<Utc> {
        Utc.with_ymd_and_hms(2026, 3, 1, h, m, s).unwrap()
    }

    #[test]
    fn a_window_splits_into_whole_hours_and_partial_edges() {
        let span = HourSpan::new(at(10, 15, 0), at(13, 30, 0));
        assert_eq!(span.rolled, (at(11, 0, 0), at(13, 0, 0)));
        assert_eq!(span.head, (at(10, 15, 0), at(11, 0, 0)));
        assert_eq!(span.tail, (at(13, 0, 0), at(13, 30, 0)));
    }

    #[test]
    fn an_aligned_window_is_all_rollups() {
        let span = HourSpan::new(at(0, 0, 0), at(23, 0, 0));
        assert_eq!(span.rolled, (at(0, 0, 0), at(23, 0, 0)));
        assert_eq!(span.head.0, span.head.1);
        assert_eq!(span.tail.0, span.tail.1);
    }

    #[test]
    fn a_window_without_a_whole_hour_reads_rows_only() {
        for (from, to) in [
            (at(10, 15, 0), at(10, 45, 0)),
            (at(10, 15, 0), at(11, 45, 0)),
            (at(10, 0, 0), at(10, 59, 59)),
            (at(10, 30, 0), at(10, 30, 0)),
        ] {
            let span = HourSpan::new(from, to);
            assert_eq!(span.rolled.0, span.rolled.1, "{from} {to}");
            assert_eq!(span.head, (from, to));
            assert_eq!(span.tail.0, span.tail.1);
        }
        // Sub-second edges are partial too.
        let from = at(10, 0, 0) + chrono::TimeDelta::milliseconds(1);
        let span = HourSpan::new(from, at(12, 0, 0));
        assert_eq!(span.rolled, (at(11, 0, 0), at(12, 0, 0)));
        assert_eq!(span.head, (from, at(11, 0, 0)));
    }
}
