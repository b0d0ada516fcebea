//! `GET …/api-keys/{id}/limits` with what is used of each limit: the API
//! reads the shared counters on Redis (127.0.0.1:6379) that a gateway's
//! limiter (here `limits::Limiter` itself) writes; without Redis `used` is
//! null. Soft thresholds round-trip and show beside each limit.

use std::str::FromStr;
use std::time::{Duration, Instant};

use limits::{Decision, Lease, Limiter, Limits};
use rust_decimal::Decimal;
use serde_json::{json, Value};
use uuid::Uuid;

use crate::helpers::{Opts, OrgFixture, TestApp};

const REDIS: &str = "redis://127.0.0.1:6379";

fn key_path(fx: &OrgFixture) -> String {
    format!("/api/v1/orgs/{}/api-keys/{}", fx.id, fx.api_key_id)
}

/// A Redis limiter that answers (waits up to 10 s); `None` outside CI
/// when Redis is not running.
async fn redis_limiter() -> Option<Limiter> {
    let up = std::net::TcpStream::connect_timeout(
        &"127.0.0.1:6379".parse().unwrap(),
        Duration::from_millis(200),
    )
    .is_ok();
    if !up {
        assert!(
            std::env::var("CI").map_or(true, |v| v != "true"),
            "Redis at 127.0.0.1:6379 is required under CI"
        );
        eprintln!("skipping: Redis at 127.0.0.1:6379 is not available");
        return None;
    }
    // Every request asks Redis (no grants), so each settles on its own at
    // once and the view can be read right after.
    let cfg = limits::Config {
        timeout: Duration::from_millis(500),
        hold: Duration::ZERO,
        ..limits::Config::default()
    };
    let l = Limiter::redis(REDIS, cfg).unwrap();
    let deadline = Instant::now() + Duration::from_secs(10);
    while l.consumption(Uuid::new_v4(), Uuid::new_v4()).await.is_err() {
        assert!(Instant::now() < deadline, "the limiter never reached Redis");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    Some(l)
}

fn usd(s: &str) -> Decimal {
    Decimal::from_str(s).unwrap()
}

fn admitted(d: Decision) -> Lease {
    match d {
        Decision::Admitted { lease, .. } => lease,
        Decision::Refused(r) => panic!("refused: {r:?}"),
    }
}

/// The `/limits` entries by `scope.limit`, each checked to carry exactly
/// the fields the document's `LimitStates` requires.
async fn entries(app: &TestApp, fx: &OrgFixture) -> Vec<(String, Value)> {
    let doc = app
        .call(reqwest::Method::GET, "/api/openapi.json", None, None)
        .await;
    let schema = &doc.body["components"]["schemas"]["LimitStates"]["properties"]["data"]["items"];
    let mut required: Vec<String> = serde_json::from_value(schema["required"].clone()).unwrap();
    required.sort();
    let r = app
        .get(&format!("{}/limits", key_path(fx)), &fx.member)
        .await;
    r.expect(200);
    r.body["data"]
        .as_array()
        .unwrap()
        .iter()
        .map(|e| {
            let mut fields: Vec<String> = e.as_object().unwrap().keys().cloned().collect();
            fields.sort();
            assert_eq!(fields, required, "{e}");
            let name = format!(
                "{}.{}",
                e["scope"].as_str().unwrap(),
                e["limit"].as_str().unwrap()
            );
            (name, e.clone())
        })
        .collect()
}

fn entry<'a>(all: &'a [(String, Value)], name: &str) -> &'a Value {
    &all.iter()
        .find(|(n, _)| n == name)
        .unwrap_or_else(|| panic!("no {name} in {all:?}"))
        .1
}

/// `(max, soft, used, remaining, soft_reached)` of an entry.
fn numbers(e: &Value) -> Value {
    json!([
        e["max"],
        e["soft"],
        e["used"],
        e["remaining"],
        e["soft_reached"]
    ])
}

/// Sets the limits the test reads back: the key's with an 80 % soft
/// threshold, the org's with 50 %. Answers them as the gateway gets them.
async fn set_limits(app: &TestApp, fx: &OrgFixture) -> (Limits, Limits) {
    let key = app
        .patch(
            &key_path(fx),
            &fx.admin,
            json!({"limits": {"requests_per_minute": 10, "tokens_per_day": 1000,
                              "max_concurrent_requests": 5, "soft_limit_percent": 80}}),
        )
        .await;
    key.expect(200);
    assert_eq!(key.body["limits"]["soft_limit_percent"], 80);
    let org = app
        .patch(
            &format!("/api/v1/orgs/{}", fx.id),
            &fx.owner,
            json!({"limits": {"budget_per_month_usd": "2.50", "tokens_per_month": 100000,
                              "soft_limit_percent": 50}}),
        )
        .await;
    org.expect(200);
    assert_eq!(org.body["limits"]["soft_limit_percent"], 50);
    (
        serde_json::from_value(key.body["limits"].clone()).unwrap(),
        serde_json::from_value(org.body["limits"].clone()).unwrap(),
    )
}

#[tokio::test]
async fn the_limits_view_shows_what_a_gateway_counted_on_redis() {
    let (Some(api_side), Some(gateway_side)) = (redis_limiter().await, redis_limiter().await)
    else {
        return;
    };
    let app = TestApp::spawn_with(Opts {
        limiter: Some(api_side),
        ..Opts::default()
    })
    .await;
    let fx = OrgFixture::create(&app, "consumed").await;
    let (key_limits, org_limits) = set_limits(&app, &fx).await;
    let (org, key) = (
        Uuid::parse_str(&fx.id).unwrap(),
        Uuid::parse_str(&fx.api_key_id).unwrap(),
    );

    // Nothing used yet: zeros, not nulls.
    let all = entries(&app, &fx).await;
    assert_eq!(all.len(), 5, "{all:?}");
    assert_eq!(
        numbers(entry(&all, "api_key.requests_per_minute")),
        json!([10, 8, 0, 10, false])
    );
    assert_eq!(
        numbers(entry(&all, "organization.budget_per_month_usd")),
        json!(["2.50", "1.25", "0.00", "2.50", false])
    );

    // Three requests through the limiter: two finished, one still running.
    let request = limits::Request {
        org,
        key,
        key_limits: &key_limits,
        org_limits: &org_limits,
        reserve_tokens: 100,
        budget_reserve: usd("0.50"),
    };
    let a = admitted(gateway_side.admit(&request).await);
    let b = admitted(gateway_side.admit(&request).await);
    let _running = admitted(gateway_side.admit(&request).await);
    a.settle(Some(400), Some(usd("0.75"))).await;
    b.settle(Some(450), Some(usd("0.60"))).await;

    let all = entries(&app, &fx).await;
    assert_eq!(
        numbers(entry(&all, "api_key.requests_per_minute")),
        json!([10, 8, 3, 7, false])
    );
    // 400 + 450 settled, 100 reserved by the running request.
    assert_eq!(
        numbers(entry(&all, "api_key.tokens_per_day")),
        json!([1000, 800, 950, 50, true])
    );
    assert_eq!(
        numbers(entry(&all, "api_key.max_concurrent_requests")),
        json!([5, 4, 1, 4, false])
    );
    assert_eq!(
        numbers(entry(&all, "organization.tokens_per_month")),
        json!([100000, 50000, 950, 99050, false])
    );
    // $0.75 + $0.60 settled, $0.50 reserved: decimal strings, as written.
    let budget = entry(&all, "organization.budget_per_month_usd");
    assert_eq!(
        numbers(budget),
        json!(["2.50", "1.25", "1.85", "0.65", true])
    );
    let reset: chrono::DateTime<chrono::Utc> =
        budget["resets_at"].as_str().unwrap().parse().unwrap();
    assert_eq!(reset.format("%d %H:%M:%S").to_string(), "01 00:00:00");
    assert_eq!(
        entry(&all, "api_key.requests_per_minute")["resets_at"],
        Value::Null
    );

    // Another key of the org: the org's counters, none of its own.
    let other = app
        .post(
            &format!("/api/v1/orgs/{}/api-keys", fx.id),
            &fx.admin,
            json!({"name": "other", "limits": {"requests_per_minute": 3}}),
        )
        .await;
    other.expect(201);
    let r = app
        .get(
            &format!("/api/v1/orgs/{}/api-keys/{}/limits", fx.id, other.id()),
            &fx.member,
        )
        .await;
    r.expect(200);
    let data = r.body["data"].as_array().unwrap();
    let rpm = data.iter().find(|e| e["scope"] == "api_key").unwrap();
    assert_eq!(
        numbers(rpm),
        json!([3, null, 0, 3, null]),
        "no soft threshold"
    );
    let budget = data
        .iter()
        .find(|e| e["limit"] == "budget_per_month_usd")
        .unwrap();
    assert_eq!(budget["used"], "1.85");
}

#[tokio::test]
async fn without_redis_used_is_null_and_soft_thresholds_still_show() {
    let app = TestApp::spawn().await;
    let fx = OrgFixture::create(&app, "unknown").await;
    set_limits(&app, &fx).await;
    let all = entries(&app, &fx).await;
    assert_eq!(all.len(), 5);
    for (name, e) in &all {
        assert_eq!(e["used"], Value::Null, "{name}");
        assert_eq!(e["remaining"], Value::Null, "{name}");
        assert_eq!(e["soft_reached"], Value::Null, "{name}");
        assert!(!e["soft"].is_null(), "{name}");
    }
    assert_eq!(entry(&all, "api_key.tokens_per_day")["soft"], 800);
    assert_eq!(
        entry(&all, "organization.budget_per_month_usd")["soft"],
        "1.25"
    );
}

#[tokio::test]
async fn soft_thresholds_round_trip_and_bad_ones_change_nothing() {
    let app = TestApp::spawn().await;
    let fx = OrgFixture::create(&app, "softpct").await;
    let path = key_path(&fx);
    // Alone, a soft threshold is kept but limits nothing, so nothing shows.
    let r = app
        .patch(
            &path,
            &fx.admin,
            json!({"limits": {"soft_limit_percent": 75}}),
        )
        .await;
    r.expect(200);
    assert_eq!(r.body["limits"]["soft_limit_percent"], 75);
    assert_eq!(
        app.get(&path, &fx.member).await.body["limits"]["soft_limit_percent"],
        75
    );
    let view = app.get(&format!("{path}/limits"), &fx.member).await;
    assert_eq!(view.body, json!({"data": []}));
    let created = app
        .post(
            &format!("/api/v1/orgs/{}/api-keys", fx.id),
            &fx.admin,
            json!({"name": "soft", "limits": {"tokens_per_day": 10, "soft_limit_percent": 100}}),
        )
        .await;
    created.expect(201);
    assert_eq!(created.body["limits"]["soft_limit_percent"], 100);

    let before = app.get(&path, &fx.admin).await;
    for bad in [json!(0), json!(101), json!(12.5), json!("80"), json!(-5)] {
        let r = app
            .patch(
                &path,
                &fx.admin,
                json!({"limits": {"soft_limit_percent": bad}}),
            )
            .await;
        r.expect(422);
        assert_eq!(
            r.error_fields(),
            ["limits.soft_limit_percent"],
            "{}",
            r.text
        );
        let org = app
            .patch(
                &format!("/api/v1/orgs/{}", fx.id),
                &fx.owner,
                json!({"limits": {"soft_limit_percent": bad}}),
            )
            .await;
        org.expect(422);
        assert_eq!(org.error_fields(), ["limits.soft_limit_percent"]);
    }
    assert_eq!(app.get(&path, &fx.admin).await.body, before.body);
    // The database refuses what the parser would (a psql edit included).
    for (raw, ok) in [
        ("50", true),
        ("0", false),
        ("101", false),
        ("1.5", false),
        ("\"80\"", false),
    ] {
        let stored = sqlx::query("UPDATE organizations SET limits = $1::jsonb WHERE id = $2::uuid")
            .bind(format!("{{\"soft_limit_percent\": {raw}}}"))
            .bind(&fx.id)
            .execute(app.db.db.pool())
            .await;
        assert_eq!(stored.is_ok(), ok, "{raw}: {stored:?}");
    }
    // null clears it.
    let r = app
        .patch(
            &path,
            &fx.admin,
            json!({"limits": {"soft_limit_percent": null}}),
        )
        .await;
    r.expect(200);
    assert_eq!(r.body["limits"]["soft_limit_percent"], Value::Null);
}
