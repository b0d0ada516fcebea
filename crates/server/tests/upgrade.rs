//! A rolling upgrade, with the previous release's real binary: migrations
//! are expand/contract, so the schema this build migrates to still serves
//! the release before it while replicas are replaced one at a time.
//!
//! The previous release's `llmgw` is named by `LLMGW_TEST_PREVIOUS_BIN`
//! (`.ci/previous-release.sh` builds the commit in `.ci/previous-release`);
//! without it the test is skipped, and under `CI=true` it fails.
//!
//! 1. The previous binary starts on an empty database (migrating it to its
//!    own set), serves a tenant it provisions, and keeps running.
//! 2. This build's `llmgw migrate` expands the schema underneath it.
//! 3. The previous binary still proxies, writes its usage rows, answers the
//!    settings API, and takes changes from this build's API (a revocation
//!    within a second), while this build's processes serve the same tenant
//!    beside it: a mixed fleet on one database.
//! 4. Every request of both binaries has exactly one row, and this build's
//!    usage API counts them all.

mod common;

use std::collections::HashSet;
use std::time::{Duration, Instant};

use serde_json::{json, Value};
use testkit::{MockUpstream, TestDb};

use common::{provision, Running};

/// The status of one chat completion through `gateway` (which must answer).
async fn chat(http: &reqwest::Client, gateway: &str, key: &str, request_id: &str) -> u16 {
    common::chat(http, gateway, key, request_id)
        .await
        .expect("the gateway answers")
        .0
}

/// A new request id, recorded in `sent` (for a request expected to succeed).
fn fresh(sent: &mut Vec<String>) -> String {
    let id = uuid::Uuid::new_v4().to_string();
    sent.push(id.clone());
    id
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_previous_release_keeps_serving_on_the_migrated_schema_beside_this_one() {
    let Some(previous) = std::env::var("LLMGW_TEST_PREVIOUS_BIN")
        .ok()
        .filter(|p| std::path::Path::new(p).is_file())
    else {
        testkit::skip_unless_ci(
            "LLMGW_TEST_PREVIOUS_BIN (the previous release's llmgw; .ci/previous-release.sh builds it)",
        );
        return;
    };
    let t = TestDb::migrated_before(1).await;
    let upstream = MockUpstream::start().await;
    let http = reqwest::Client::new();

    // 1. The previous release on its own schema.
    let cmd = common::against(common::binary(&previous), &t, &upstream);
    let old = tokio::task::spawn_blocking(move || Running::start(cmd))
        .await
        .unwrap();
    let tenant = provision(&old.api, &upstream.base_url, "sk-upgrade-token-1").await;
    // The request ids of every request answered 200.
    let mut sent = Vec::new();
    let id = fresh(&mut sent);
    assert_eq!(chat(&http, &old.gateway, &tenant.api_key, &id).await, 200);

    // 2. This build's migrations, applied underneath the running release.
    let out = common::against(common::llmgw(), &t, &upstream)
        .arg("migrate")
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "migrate: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    let applied: i64 = sqlx::query_scalar("SELECT count(*) FROM _sqlx_migrations")
        .fetch_one(t.db.pool())
        .await
        .unwrap();
    let ours = storage::MIGRATOR.iter().count() as i64;
    assert_eq!(applied, ours, "this build's migrations are all applied");

    // 3. The previous release keeps working on the expanded schema…
    for _ in 0..5 {
        let id = fresh(&mut sent);
        assert_eq!(
            chat(&http, &old.gateway, &tenant.api_key, &id).await,
            200,
            "{}",
            old.logs()
        );
    }
    let api = |base: &str, path: &str| format!("{base}/api/v1/orgs/{}/{path}", tenant.org_id);
    let r = http
        .get(api(&old.api, "provider-keys"))
        .header("authorization", &tenant.bearer)
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 200, "{}", old.logs());
    let r = http
        .post(api(&old.api, "api-keys"))
        .header("authorization", &tenant.bearer)
        .json(&json!({"name": "made by the previous release"}))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 201, "{}", old.logs());
    let made_by_old: Value = r.json().await.unwrap();

    // …beside this build's processes on the same database.
    let cmd = common::llmgw_against(&t, &upstream);
    let new = tokio::task::spawn_blocking(move || Running::start(cmd))
        .await
        .unwrap();
    let old_key = made_by_old["key"].as_str().unwrap();
    for gateway in [&new.gateway, &old.gateway] {
        for key in [tenant.api_key.as_str(), old_key] {
            let id = fresh(&mut sent);
            assert_eq!(chat(&http, gateway, key, &id).await, 200, "{gateway}");
        }
    }
    // A key revoked through this build's API stops working on the previous
    // release's gateway within a second (the change notifications still
    // speak its language).
    let id = made_by_old["id"].as_str().unwrap();
    let revoked = Instant::now();
    let r = http
        .delete(api(&new.api, &format!("api-keys/{id}")))
        .header("authorization", &tenant.bearer)
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 200);
    loop {
        let id = uuid::Uuid::new_v4().to_string();
        let status = chat(&http, &old.gateway, old_key, &id).await;
        if status == 401 {
            break;
        }
        assert_eq!(status, 200);
        sent.push(id);
        assert!(
            revoked.elapsed() < Duration::from_secs(1),
            "the previous release still accepts a revoked key"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }

    // 4. Both binaries' rows, each once; this build's usage API counts them.
    let (old_status, old_logs) = tokio::task::spawn_blocking(move || old.terminate())
        .await
        .unwrap();
    assert!(old_status.success(), "{old_logs}");
    let deadline = Instant::now() + Duration::from_secs(10);
    let rows: Vec<String> = loop {
        let rows: Vec<String> =
            sqlx::query_scalar("SELECT request_id FROM request_logs WHERE status_code = 200")
                .fetch_all(t.db.pool())
                .await
                .unwrap();
        let have: HashSet<&str> = rows.iter().map(String::as_str).collect();
        if sent.iter().all(|id| have.contains(id.as_str())) || Instant::now() > deadline {
            break rows;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    };
    let unique: HashSet<&str> = rows.iter().map(String::as_str).collect();
    assert_eq!(unique.len(), rows.len(), "a row written twice");
    for id in &sent {
        assert!(unique.contains(id.as_str()), "no row for {id}\n{old_logs}");
    }
    let usage: Value = http
        .get(api(&new.api, "usage?group_by=model"))
        .header("authorization", &tenant.bearer)
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    let counted: i64 = usage["data"]
        .as_array()
        .unwrap()
        .iter()
        .map(|r| r["requests"].as_i64().unwrap() - r["errors"].as_i64().unwrap())
        .sum();
    assert_eq!(counted as usize, sent.len(), "{usage}");
    let (status, logs) = tokio::task::spawn_blocking(move || new.terminate())
        .await
        .unwrap();
    assert!(status.success(), "{logs}");
}
