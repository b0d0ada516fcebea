//! `llmgw-bench --usage-rows N`: how fast the usage API answers over a
//! 30-day window of N request rows, and how many rows per second the usage
//! writer's inserts sustain.
//!
//! Each binary measured (`--llmgw`, and `--usage-before` for the previous
//! release) gets a fresh database it migrates itself, one org with two keys
//! and a provider, and the same N rows spread evenly over the last 30 days
//! (4 models, 2 keys, 2 % errors, latencies from 20 ms to 2 s), generated
//! inside PostgreSQL. Free disk space is checked first; N is lowered to fit
//! and the run says so.

use std::time::{Duration, Instant};

use chrono::{DateTime, Utc};
use serde_json::Value;
use storage::logs::{RequestLog, DEFAULT_LOG_BATCH_SIZE};
use testkit::{MockUpstream, TestDb};
use uuid::Uuid;

use crate::{pct, provision, start_llmgw};

/// Disk a row takes with its indexes and share of rollups, with room to
/// spare (measured: about 300 bytes).
const BYTES_PER_ROW: u64 = 600;
/// Rows per generating statement (one transaction each).
const GENERATE_BATCH: u64 = 250_000;
/// The window the usage API is asked about.
const WINDOW_DAYS: i64 = 30;

pub(crate) struct UsageBench<'a> {
    pub rows: u64,
    pub queries: usize,
    pub writer_for: Duration,
    pub up: &'a MockUpstream,
}

impl UsageBench<'_> {
    /// Measures each `(label, binary)` in turn and prints one table.
    pub async fn run(&self, bins: &[(&str, &str)]) {
        let rows = self.rows_that_fit().await;
        println!(
            "\nUsage API over a {WINDOW_DAYS}-day window of {rows} rows ({} queries per grouping); usage writer for {}s",
            self.queries,
            self.writer_for.as_secs()
        );
        println!(
            "\n| binary | rows | generated rows/s | group_by | p50 ms | p99 ms | writer rows/s | database MiB |"
        );
        println!("|---|---|---|---|---|---|---|---|");
        for (label, bin) in bins {
            self.one(label, bin, rows).await;
        }
    }

    /// The rows to generate: as asked, unless the database's disk cannot
    /// hold them. One binary's database at a time: each is dropped before
    /// the next is made.
    async fn rows_that_fit(&self) -> u64 {
        let t = TestDb::new().await;
        let dir: String = sqlx::query_scalar("SHOW data_directory")
            .fetch_one(t.db.pool())
            .await
            .unwrap_or_else(|_| "/".into());
        let free = free_bytes(&dir).unwrap_or(u64::MAX);
        let fit = free / 2 / BYTES_PER_ROW;
        println!(
            "\nFree disk under {dir}: {:.1} GiB; {} rows asked, about {:.1} GiB per run",
            free as f64 / f64::from(1 << 30),
            self.rows,
            (self.rows * BYTES_PER_ROW) as f64 / f64::from(1 << 30)
        );
        if fit < self.rows {
            println!("Lowered to {fit} rows, to leave half the free disk free");
            return fit;
        }
        self.rows
    }

    async fn one(&self, label: &str, bin: &str, rows: u64) {
        // The binary migrates its own database, as at a first start.
        let t = TestDb::migrated_before(1).await;
        let g = start_llmgw(bin, "warn", false, None, &t, self.up).await;
        let p = provision(&g, self.up, true).await;
        let pool = t.db.pool();
        let org: Uuid = p.org.parse().unwrap();
        let now: DateTime<Utc> = Utc::now();
        let from = now - chrono::Duration::days(WINDOW_DAYS);
        // Partitions for the whole window, where logs are partitioned (an
        // operator loading older rows makes them the same way).
        let partitioned: bool =
            sqlx::query_scalar("SELECT to_regproc('llmgw_create_log_partitions') IS NOT NULL")
                .fetch_one(pool)
                .await
                .unwrap();
        if partitioned {
            sqlx::query("SELECT llmgw_create_log_partitions($1, 7)")
                .bind(WINDOW_DAYS as i32 + 2)
                .execute(pool)
                .await
                .expect("create partitions for the window");
        }
        let started = Instant::now();
        let mut lo = 0;
        while lo < rows {
            let hi = (lo + GENERATE_BATCH).min(rows);
            generate(pool, org, lo, hi, rows, from).await;
            lo = hi;
        }
        let generated = rows as f64 / started.elapsed().as_secs_f64();
        sqlx::query("ANALYZE").execute(pool).await.ok();

        let c = reqwest::Client::new();
        let mut first = true;
        for group_by in ["day", "model", "api_key"] {
            let url = format!(
                "{}/orgs/{}/usage?from={}&to={}&group_by={group_by}",
                g.api,
                p.org,
                from.to_rfc3339_opts(chrono::SecondsFormat::Micros, true),
                now.to_rfc3339_opts(chrono::SecondsFormat::Micros, true)
            );
            let mut us = Vec::with_capacity(self.queries);
            let mut counted = 0;
            for _ in 0..self.queries {
                let start = Instant::now();
                let r = c.get(&url).bearer_auth(&p.token).send().await.unwrap();
                assert!(r.status().is_success(), "{url}: {}", r.status());
                let v: Value = r.json().await.unwrap();
                us.push(start.elapsed().as_micros() as u32);
                counted = v["data"]
                    .as_array()
                    .map_or(0, |d| d.iter().filter_map(|r| r["requests"].as_u64()).sum());
            }
            assert_eq!(counted, rows, "the usage API counts every row ({group_by})");
            let writer = if first {
                first = false;
                let w = writer(&t.db, org, self.writer_for).await;
                format!("{w:.0}")
            } else {
                "-".into()
            };
            let size: i64 = sqlx::query_scalar("SELECT pg_database_size(current_database())")
                .fetch_one(pool)
                .await
                .unwrap();
            println!(
                "| {label} | {rows} | {generated:.0} | {group_by} | {:.2} | {:.2} | {writer} | {:.0} |",
                pct(&mut us, 0.5),
                pct(&mut us, 0.99),
                size as f64 / f64::from(1 << 20)
            );
        }
        drop(g);
    }
}

/// Rows `lo..hi` of `rows`, evenly spread from `from` over the window, in
/// one statement.
async fn generate(
    pool: &sqlx::PgPool,
    org: Uuid,
    lo: u64,
    hi: u64,
    rows: u64,
    from: DateTime<Utc>,
) {
    sqlx::query(
        "WITH k AS (SELECT array_agg(id ORDER BY id) AS ids FROM api_keys WHERE org_id = $1),
              p AS (SELECT id FROM provider_keys WHERE org_id = $1 LIMIT 1)
         INSERT INTO request_logs (id, request_id, org_id, api_key_id, provider_key_id, provider_name,
             requested_model, upstream_model, status_code, streamed, canceled, prompt_tokens,
             completion_tokens, total_tokens, latency_ms, ttfb_ms, error_class, created_at, endpoint,
             cost_usd, attempts)
         SELECT gen_random_uuid(), 'bench-' || g, $1, k.ids[1 + g % 2], p.id, 'bench',
             'bench/m' || g % 4, 'm' || g % 4,
             CASE WHEN g % 50 = 0 THEN 502 ELSE 200 END, g % 3 = 0, false,
             CASE WHEN g % 50 = 0 THEN NULL ELSE 20 + g % 300 END,
             CASE WHEN g % 50 = 0 THEN NULL ELSE 5 + g % 700 END,
             CASE WHEN g % 50 = 0 THEN NULL ELSE 25 + g % 300 + g % 700 END,
             20 + (g * 7919) % 1980, 10 + (g * 104729) % 500,
             CASE WHEN g % 50 = 0 THEN 'upstream_error' END,
             $4 + (g::float8 / $5) * interval '30 days', 'chat/completions',
             CASE WHEN g % 50 = 0 THEN NULL ELSE (g % 1000) * 0.000001 END, 1
         FROM generate_series($2::int8, $3::int8 - 1) g, k, p",
    )
    .bind(org)
    .bind(lo as i64)
    .bind(hi as i64)
    .bind(from)
    .bind(rows as f64)
    .execute(pool)
    .await
    .expect("generate request rows");
}

/// Rows per second written by four writers sending batches as the
/// gateway's usage writer does, for `d`.
async fn writer(db: &storage::Db, org: Uuid, d: Duration) -> f64 {
    let (keys, provider): (Vec<Uuid>, Uuid) = sqlx::query_as(
        "SELECT (SELECT array_agg(id) FROM api_keys WHERE org_id = $1),
                (SELECT id FROM provider_keys WHERE org_id = $1 LIMIT 1)",
    )
    .bind(org)
    .fetch_one(db.pool())
    .await
    .unwrap();
    let until = Instant::now() + d;
    let started = Instant::now();
    let tasks: Vec<_> = (0..4)
        .map(|w| {
            let (db, keys) = (db.clone(), keys.clone());
            tokio::spawn(async move {
                let mut n = 0u64;
                while Instant::now() < until {
                    let batch: Vec<(RequestLog, &str)> = (0..DEFAULT_LOG_BATCH_SIZE)
                        .map(|i| {
                            (
                                row(org, keys[i % keys.len()], provider, w, n + i as u64),
                                "chat/completions",
                            )
                        })
                        .collect();
                    db.insert_request_logs_at(&batch)
                        .await
                        .expect("write usage rows");
                    n += batch.len() as u64;
                }
                n
            })
        })
        .collect();
    let mut written = 0;
    for t in tasks {
        written += t.await.unwrap();
    }
    written as f64 / started.elapsed().as_secs_f64()
}

fn row(org: Uuid, key: Uuid, provider: Uuid, writer: u32, n: u64) -> RequestLog {
    RequestLog {
        id: Uuid::new_v4(),
        request_id: format!("writer-{writer}-{n}"),
        org_id: org,
        api_key_id: Some(key),
        provider_key_id: Some(provider),
        provider_name: Some("bench".into()),
        requested_model: Some(format!("bench/m{}", n % 4)),
        upstream_model: Some(format!("m{}", n % 4)),
        status_code: 200,
        streamed: n.is_multiple_of(3),
        canceled: false,
        prompt_tokens: Some(20 + (n % 300) as i64),
        completion_tokens: Some(5 + (n % 700) as i64),
        total_tokens: Some(25 + (n % 300 + n % 700) as i64),
        latency_ms: 20 + (n * 7919 % 1980) as i32,
        ttfb_ms: Some(10),
        error_class: None,
        created_at: Utc::now(),
        endpoint_id: None,
        attempts: Some(1),
    }
}

fn free_bytes(dir: &str) -> Option<u64> {
    let path = std::ffi::CString::new(dir).ok()?;
    // SAFETY: statvfs on a NUL-terminated path into a zeroed struct we own.
    unsafe {
        let mut s: libc::statvfs = std::mem::zeroed();
        (libc::statvfs(path.as_ptr(), &mut s) == 0).then(|| s.f_bavail as u64 * s.f_frsize as u64)
    }
}
