//! Every process, gateway and API alike, makes the coming days' partitions
//! of `request_logs` and drops those past `LLMGW_LOG_RETENTION_DAYS` when it
//! starts (and hourly after).

mod common;

use std::time::{Duration, Instant};

use testkit::{MockUpstream, TestDb};

use common::Running;

/// Whether the partition of the UTC day `days` from today exists.
async fn partition(t: &TestDb, days: i32) -> bool {
    sqlx::query_scalar(
        "SELECT to_regclass('request_logs_' || to_char((now() AT TIME ZONE 'UTC')::date + $1, 'YYYYMMDD')) IS NOT NULL",
    )
    .bind(days)
    .fetch_one(t.db.pool())
    .await
    .unwrap()
}

/// A database as it is months after partitioning: the rows from before it
/// are gone with their partition, and a partition of 10 days ago is left.
async fn months_later() -> TestDb {
    let t = TestDb::new().await;
    t.drop_first_log_partition().await;
    sqlx::query("SELECT llmgw_create_log_partition((now() AT TIME ZONE 'UTC')::date - 10)")
        .execute(t.db.pool())
        .await
        .unwrap();
    assert!(partition(&t, -10).await && !partition(&t, -2).await);
    t
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn each_process_makes_the_partitions_and_drops_the_old_ones_at_start() {
    let upstream = MockUpstream::start().await;
    for only in ["gateway", "api"] {
        let t = months_later().await;
        let mut cmd = common::llmgw_against(&t, &upstream);
        cmd.env("LLMGW_LOG_RETENTION_DAYS", "7");
        let running = tokio::task::spawn_blocking(move || match only {
            "gateway" => Running::start_gateway_only(cmd),
            _ => Running::start_api_only(cmd),
        })
        .await
        .unwrap();
        let deadline = Instant::now() + Duration::from_secs(10);
        while !partition(&t, -2).await || partition(&t, -10).await {
            assert!(Instant::now() < deadline, "{only}: {}", running.logs());
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
        assert!(partition(&t, -1).await && partition(&t, 0).await && partition(&t, 7).await);
        let (status, logs) = tokio::task::spawn_blocking(move || running.terminate())
            .await
            .unwrap();
        assert!(status.success(), "{only}: {logs}");
    }
}
