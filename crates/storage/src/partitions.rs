//! The daily partitions of `request_logs` (migration 0016): made ahead and
//! back-dated a little by `llmgw_create_log_partitions()`, and dropped with
//! their hourly rollups once older than the retention.

use chrono::{NaiveDate, TimeDelta, Utc};
use sqlx::PgConnection;

use crate::db::Db;
use crate::error::Result;

/// Days of usage rows and rollups kept unless configured
/// (`LLMGW_LOG_RETENTION_DAYS`).
pub const DEFAULT_LOG_RETENTION_DAYS: u32 = 90;

/// The advisory lock one process holds while it drops old partitions.
const RETENTION_LOCK: &str = "llmgw:log_retention";

/// Marks a partition detached for retention, so that a table left by a
/// pass interrupted between detach and drop is recognised and dropped.
const DETACHED_MARK: &str = "llmgw: detached for retention";

/// What one maintenance pass did.
#[derive(Debug, Default, Clone, PartialEq, Eq)]
pub struct Maintenance {
    /// Partitions made (ahead, or back-dated).
    pub created: i32,
    /// Partitions detached and dropped, by name.
    pub dropped: Vec<String>,
    /// Hourly rollup rows deleted.
    pub rollups_deleted: u64,
}

/// The day after the last one a partition holds, from its name:
/// `request_logs_YYYYMMDD` holds that day, `request_logs_before_YYYYMMDD`
/// (the rows from before partitioning) every time before that day. `None`
/// for any other name.
pub fn partition_end(name: &str) -> Option<NaiveDate> {
    let day = |s: &str| {
        (s.len() == 8 && s.bytes().all(|b| b.is_ascii_digit()))
            .then(|| NaiveDate::parse_from_str(s, "%Y%m%d").ok())
            .flatten()
    };
    let rest = name.strip_prefix("request_logs_")?;
    match rest.strip_prefix("before_") {
        Some(bound) => day(bound),
        None => day(rest)?.succ_opt(),
    }
}

impl Db {
    /// Makes the partitions of the days from 2 days ago to 7 days on, then,
    /// in one process at a time (the others skip this part), detaches and
    /// drops the partitions whose every row is older than `retention_days`
    /// (`None` or 0: [`DEFAULT_LOG_RETENTION_DAYS`]) and deletes the hourly
    /// rollups as old. Safe to run from every replica at once, and while
    /// serving: `DETACH … CONCURRENTLY` does not block writers.
    pub async fn maintain_log_partitions(
        &self,
        retention_days: Option<u32>,
    ) -> Result<Maintenance> {
        let days = retention_days
            .filter(|d| *d > 0)
            .unwrap_or(DEFAULT_LOG_RETENTION_DAYS);
        let created: i32 = sqlx::query_scalar("SELECT llmgw_create_log_partitions()")
            .fetch_one(&self.pool)
            .await?;
        let mut done = Maintenance {
            created,
            ..Maintenance::default()
        };
        // The first day kept: a partition ending on or before it goes.
        let Some(cutoff) = Utc::now()
            .date_naive()
            .checked_sub_signed(TimeDelta::days(i64::from(days)))
        else {
            return Ok(done);
        };
        let mut conn = self.pool.acquire().await?;
        let locked: bool = sqlx::query_scalar("SELECT pg_try_advisory_lock(hashtext($1))")
            .bind(RETENTION_LOCK)
            .fetch_one(&mut *conn)
            .await?;
        if !locked {
            return Ok(done);
        }
        let expired = expire(&mut conn, cutoff, &mut done).await;
        let unlocked = sqlx::query("SELECT pg_advisory_unlock(hashtext($1))")
            .bind(RETENTION_LOCK)
            .execute(&mut *conn)
            .await;
        if expired.is_err() || unlocked.is_err() {
            // The session lock must not go back to the pool with the connection.
            conn.close().await.ok();
        }
        expired?;
        unlocked?;
        Ok(done)
    }
}

/// Drops the partitions ending on or before `cutoff`, and the rollups before it.
async fn expire(conn: &mut PgConnection, cutoff: NaiveDate, done: &mut Maintenance) -> Result<()> {
    // The partitions of request_logs (attached, or detached but not yet
    // finalized), and tables an interrupted pass detached and left.
    let tables: Vec<(String, bool, bool)> = sqlx::query_as(
        "SELECT c.relname::text, i.inhrelid IS NOT NULL, coalesce(i.inhdetachpending, false)
         FROM pg_class c
         LEFT JOIN pg_inherits i ON i.inhrelid = c.oid AND i.inhparent = 'request_logs'::regclass
         WHERE c.relkind = 'r'
           AND c.relnamespace = (SELECT relnamespace FROM pg_class WHERE oid = 'request_logs'::regclass)
           AND c.relname LIKE 'request\\_logs\\_%'
           AND (i.inhrelid IS NOT NULL OR obj_description(c.oid, 'pg_class') = $1)",
    )
    .bind(DETACHED_MARK)
    .fetch_all(&mut *conn)
    .await?;
    for (name, attached, pending) in tables {
        if partition_end(&name).is_none_or(|end| end > cutoff) {
            continue;
        }
        let table = quote_ident(&name);
        if pending {
            // A detach that was interrupted: finish it.
            run(
                conn,
                format!("ALTER TABLE request_logs DETACH PARTITION {table} FINALIZE"),
            )
            .await?;
        } else if attached {
            run(
                conn,
                format!("COMMENT ON TABLE {table} IS '{DETACHED_MARK}'"),
            )
            .await?;
            // Not in a transaction: CONCURRENTLY waits for the queries that
            // use the partition instead of blocking the writers.
            run(
                conn,
                format!("ALTER TABLE request_logs DETACH PARTITION {table} CONCURRENTLY"),
            )
            .await?;
        }
        run(conn, format!("DROP TABLE {table}")).await?;
        tracing::info!(partition = %name, "usage rows past their retention dropped");
        done.dropped.push(name);
    }
    let cutoff = cutoff.and_hms_opt(0, 0, 0).map(|t| t.and_utc());
    done.rollups_deleted = sqlx::query("DELETE FROM usage_hourly WHERE hour < $1")
        .bind(cutoff)
        .execute(&mut *conn)
        .await?
        .rows_affected();
    Ok(())
}

/// One statement by the simple query protocol (DDL that may not run in a
/// transaction block, as `DETACH … CONCURRENTLY`).
async fn run(conn: &mut PgConnection, sql: String) -> Result<()> {
    sqlx::Executor::execute(conn, sql.as_str()).await?;
    Ok(())
}

/// `"name"`, for the names `partition_end` accepted (letters, digits, `_`).
fn quote_ident(name: &str) -> String {
    format!("\"{}\"", name.replace('"', "\"\""))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn day(y: i32, m: u32, d: u32) -> NaiveDate {
        NaiveDate::from_ymd_opt(y, m, d).unwrap()
    }

    #[test]
    fn a_days_partition_ends_the_next_day() {
        assert_eq!(
            partition_end("request_logs_20261203"),
            Some(day(2026, 12, 4))
        );
        assert_eq!(
            partition_end("request_logs_20261231"),
            Some(day(2027, 1, 1))
        );
        assert_eq!(
            partition_end("request_logs_20280228"),
            Some(day(2028, 2, 29))
        );
    }

    #[test]
    fn the_table_from_before_partitioning_ends_at_its_bound() {
        assert_eq!(
            partition_end("request_logs_before_20261204"),
            Some(day(2026, 12, 4))
        );
    }

    #[test]
    fn other_names_are_not_partitions() {
        for name in [
            "request_logs",
            "request_logs_2026120",
            "request_logs_202612031",
            "request_logs_20261332",
            "request_logs_+2026123",
            "request_logs_before_",
            "request_logs_before_2026-12-04",
            "request_logs_20261203_pkey",
            "usage_hourly",
            "request_logs_archive",
        ] {
            assert_eq!(partition_end(name), None, "{name}");
        }
    }
}
