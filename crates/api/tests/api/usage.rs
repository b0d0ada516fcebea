use chrono::{DateTime, Duration, TimeZone, Utc};
use serde_json::{json, Value};
use storage::logs::RequestLog;
use uuid::Uuid;

use crate::helpers::{OrgFixture, TestApp};

fn row(
    org: Uuid,
    key: Uuid,
    provider: &str,
    model: &str,
    status: i16,
    latency: i32,
    at: DateTime<Utc>,
) -> RequestLog {
    RequestLog {
        id: Uuid::new_v4(),
        request_id: Uuid::new_v4().to_string(),
        org_id: org,
        api_key_id: Some(key),
        provider_key_id: None,
        provider_name: Some(provider.to_owned()),
        requested_model: Some(format!("{provider}/{model}")),
        upstream_model: Some(model.to_owned()),
        status_code: status,
        streamed: false,
        canceled: false,
        prompt_tokens: Some(10),
        completion_tokens: Some(5),
        total_tokens: Some(15),
        latency_ms: latency,
        ttfb_ms: None,
        error_class: None,
        created_at: at,
        endpoint_id: None,
        attempts: None,
    }
}

struct Seeded {
    app: TestApp,
    fx: OrgFixture,
    key1: Uuid,
    key2: Uuid,
}

/// Org A: 6 rows over two days, two keys, two providers; org B: 3 rows.
async fn seed() -> Seeded {
    let app = TestApp::spawn().await;
    let fx = OrgFixture::create(&app, "usage").await;
    let other = OrgFixture::create(&app, "other").await;
    let org: Uuid = fx.id.parse().unwrap();
    let key1: Uuid = fx.api_key_id.parse().unwrap();
    let key2 = Uuid::new_v4();
    let d1 = Utc.with_ymd_and_hms(2025, 3, 1, 10, 0, 0).unwrap();
    let d2 = Utc.with_ymd_and_hms(2025, 3, 2, 10, 0, 0).unwrap();
    let mut rows = vec![
        row(org, key1, "mycompany", "llama", 200, 100, d1),
        row(
            org,
            key1,
            "mycompany",
            "llama",
            200,
            200,
            d1 + Duration::minutes(1),
        ),
        row(
            org,
            key1,
            "mycompany",
            "mistral",
            500,
            300,
            d1 + Duration::minutes(2),
        ),
        row(org, key2, "internal", "qwen", 200, 400, d2),
        row(
            org,
            key2,
            "internal",
            "qwen",
            429,
            500,
            d2 + Duration::minutes(1),
        ),
        row(
            org,
            key2,
            "internal",
            "qwen",
            200,
            600,
            d2 + Duration::minutes(2),
        ),
    ];
    let other_org: Uuid = other.id.parse().unwrap();
    for i in 0..3 {
        rows.push(row(
            other_org,
            Uuid::new_v4(),
            "mycompany",
            "llama",
            200,
            1,
            d1 + Duration::seconds(i),
        ));
    }
    app.db.db.insert_request_logs(&rows).await.unwrap();
    Seeded {
        app,
        fx,
        key1,
        key2,
    }
}

fn ids(v: &Value) -> Vec<String> {
    v["data"]
        .as_array()
        .unwrap()
        .iter()
        .map(|r| r["request_id"].as_str().unwrap().to_owned())
        .collect()
}

#[tokio::test]
async fn logs_paginate_and_filter_within_the_org() {
    let Seeded {
        app,
        fx,
        key1,
        key2,
    } = seed().await;
    let base = format!("/api/v1/orgs/{}/logs", fx.id);
    let all = app.get(&base, &fx.member).await;
    all.expect(200);
    let data = all.body["data"].as_array().unwrap();
    assert_eq!(data.len(), 6, "only this org's rows");
    assert!(data.iter().all(|r| r["org_id"] == fx.id.as_str()));
    let times: Vec<&str> = data
        .iter()
        .map(|r| r["created_at"].as_str().unwrap())
        .collect();
    let mut sorted = times.clone();
    sorted.sort_by(|a, b| b.cmp(a));
    assert_eq!(times, sorted, "newest first");
    assert_eq!(all.body["next_cursor"], Value::Null);

    // Walking pages of 4 yields the same rows once each.
    let first = app.get(&format!("{base}?limit=4"), &fx.member).await;
    let cursor = first.body["next_cursor"]
        .as_str()
        .expect("a second page")
        .to_owned();
    let second = app
        .get(&format!("{base}?limit=4&cursor={cursor}"), &fx.member)
        .await;
    assert_eq!(second.body["next_cursor"], Value::Null);
    let mut walked = ids(&first.body);
    walked.extend(ids(&second.body));
    assert_eq!(walked, ids(&all.body));

    let count = |q: String| {
        let app = &app;
        let fx = &fx;
        let base = base.clone();
        async move {
            let r = app.get(&format!("{base}?{q}"), &fx.member).await;
            r.expect(200);
            r.body["data"].as_array().unwrap().len()
        }
    };
    assert_eq!(count(format!("api_key_id={key1}")).await, 3);
    assert_eq!(count(format!("api_key_id={key2}")).await, 3);
    assert_eq!(count("provider=internal".into()).await, 3);
    assert_eq!(count("status=500".into()).await, 1);
    assert_eq!(count("from=2025-03-02T00:00:00Z".into()).await, 3);
    assert_eq!(
        count("from=2025-03-01T10:01:00Z&to=2025-03-02T00:00:00Z".into()).await,
        2
    );
    assert_eq!(count("provider=internal&status=200".into()).await, 2);

    for (q, field) in [
        ("status=abc", "status"),
        ("api_key_id=nope", "api_key_id"),
        ("from=yesterday", "from"),
        ("colour=red", "colour"),
    ] {
        let r = app.get(&format!("{base}?{q}"), &fx.member).await;
        r.expect(422);
        assert_eq!(r.error_fields(), [field]);
    }
}

#[tokio::test]
async fn usage_groups_by_day_model_provider_and_key() {
    let Seeded {
        app,
        fx,
        key1,
        key2,
    } = seed().await;
    let base = format!(
        "/api/v1/orgs/{}/usage?from=2025-03-01T00:00:00Z&to=2025-03-03T00:00:00Z",
        fx.id
    );
    let by = |g: &'static str| {
        let app = &app;
        let url = format!("{base}&group_by={g}");
        let token = fx.member.clone();
        async move {
            let r = app.get(&url, &token).await;
            r.expect(200);
            assert_eq!(r.body["group_by"], g);
            r.body["data"].as_array().unwrap().clone()
        }
    };
    let days = by("day").await;
    assert_eq!(days.len(), 2);
    assert_eq!(days[0]["key"], "2025-03-01");
    assert_eq!(days[0]["requests"], 3);
    assert_eq!(days[0]["errors"], 1);
    assert_eq!(days[0]["prompt_tokens"], 30);
    assert_eq!(days[0]["completion_tokens"], 15);
    assert_eq!(days[0]["total_tokens"], 45);
    // Percentiles come from latency histograms (log buckets, growth 1.12):
    // within 6 % of the rows' own.
    let p50 = days[0]["p50_latency_ms"].as_f64().unwrap();
    assert!((p50 - 200.0).abs() <= 200.0 * 0.06, "{p50}");
    assert_eq!(days[1]["key"], "2025-03-02");
    assert_eq!(days[1]["errors"], 1);
    assert!(days[1]["p95_latency_ms"].as_f64().unwrap() > 500.0);

    let models = by("model").await;
    let keys: Vec<&str> = models.iter().map(|m| m["key"].as_str().unwrap()).collect();
    assert_eq!(
        keys,
        ["internal/qwen", "mycompany/llama", "mycompany/mistral"]
    );
    let providers = by("provider").await;
    assert_eq!(providers.len(), 2);
    assert_eq!(providers[0]["key"], "internal");
    assert_eq!(providers[1]["requests"], 3, "org B's rows are not counted");
    let api_keys = by("api_key").await;
    let mut found: Vec<String> = api_keys
        .iter()
        .map(|k| k["key"].as_str().unwrap().to_owned())
        .collect();
    found.sort();
    let mut expected = vec![key1.to_string(), key2.to_string()];
    expected.sort();
    assert_eq!(found, expected);

    // Defaults: the last 30 days by day (the seeded rows are older).
    let r = app
        .get(&format!("/api/v1/orgs/{}/usage", fx.id), &fx.member)
        .await;
    r.expect(200);
    assert_eq!(r.body["group_by"], "day");
    assert_eq!(r.body["data"], json!([]));
    // The default window ends with the current UTC hour: whole hours, which
    // the hourly rollups answer without reading rows.
    let parse = |k: &str| {
        DateTime::parse_from_rfc3339(r.body[k].as_str().unwrap())
            .unwrap()
            .with_timezone(&Utc)
    };
    let (from, to) = (parse("from"), parse("to"));
    assert_eq!(to.timestamp() % 3600, 0, "{to}");
    assert!(
        to > Utc::now() && to <= Utc::now() + Duration::hours(1),
        "{to}"
    );
    assert_eq!(to - from, Duration::days(30));

    for (q, field) in [
        ("group_by=week", "group_by"),
        ("from=2025-03-02T00:00:00Z&to=2025-03-01T00:00:00Z", "from"),
    ] {
        let r = app
            .get(&format!("/api/v1/orgs/{}/usage?{q}", fx.id), &fx.member)
            .await;
        r.expect(422);
        assert_eq!(r.error_fields(), [field]);
        assert!(r.text.contains(field));
    }
}

#[tokio::test]
async fn audit_log_records_provider_changes_without_secrets() {
    let app = TestApp::spawn().await;
    let fx = OrgFixture::create(&app, "audit").await;
    let org = &fx.id;
    let path = format!("/api/v1/orgs/{org}/provider-keys/{}", fx.provider_id);
    app.patch(
        &path,
        &fx.admin,
        json!({"token": "sk-rotated-secret-7777", "base_url": "https://new.example.com"}),
    )
    .await
    .expect(200);
    app.delete(&path, &fx.admin).await.expect(204);

    let log = app
        .get(&format!("/api/v1/orgs/{org}/audit-log"), &fx.admin)
        .await;
    log.expect(200);
    let entries = log.body["data"].as_array().unwrap();
    let provider_entries: Vec<&Value> = entries
        .iter()
        .filter(|e| e["target_type"] == "provider_key")
        .collect();
    let actions: Vec<&str> = provider_entries
        .iter()
        .map(|e| e["action"].as_str().unwrap())
        .collect();
    assert_eq!(
        actions,
        [
            "provider_key.delete",
            "provider_key.update",
            "provider_key.create"
        ],
        "newest first"
    );
    for e in &provider_entries {
        assert_eq!(e["actor_user_id"], fx.admin_id.as_str());
        assert_eq!(e["target_id"], fx.provider_id.as_str());
        assert!(e["created_at"].is_string());
    }
    assert_eq!(provider_entries[1]["details"]["token"], "replaced");
    assert_eq!(
        provider_entries[1]["details"]["base_url"]["to"],
        "https://new.example.com"
    );
    assert!(entries.iter().any(|e| e["action"] == "member.add"));
    assert!(entries.iter().any(|e| e["action"] == "api_key.create"));
    assert!(!log.text.contains("sk-rotated-secret-7777"));
    assert!(!log.text.contains(&fx.provider_token));
    assert!(!log.text.contains(&fx.api_key));

    app.get(&format!("/api/v1/orgs/{org}/audit-log"), &fx.member)
        .await
        .expect(403);
    let page = app
        .get(&format!("/api/v1/orgs/{org}/audit-log?limit=2"), &fx.admin)
        .await;
    assert_eq!(page.body["data"].as_array().unwrap().len(), 2);
    assert!(page.body["next_cursor"].is_string());
}

#[tokio::test]
async fn usage_counts_answers_that_had_no_token_counts() {
    let app = TestApp::spawn().await;
    let fx = OrgFixture::create(&app, "nousage").await;
    let org: Uuid = fx.id.parse().unwrap();
    let key: Uuid = fx.api_key_id.parse().unwrap();
    let at = Utc.with_ymd_and_hms(2025, 4, 1, 12, 0, 0).unwrap();
    let counted = row(org, key, "mycompany", "llama", 200, 10, at);
    let no_usage = |status: i16, streamed: bool, canceled: bool, model: &str| RequestLog {
        streamed,
        canceled,
        prompt_tokens: None,
        completion_tokens: None,
        total_tokens: None,
        ..row(org, key, "mycompany", model, status, 10, at)
    };
    let rows = vec![
        counted,
        // A stream whose upstream sent no usage chunk.
        no_usage(200, true, false, "llama"),
        // A stream the client cut before any usage arrived.
        no_usage(200, true, true, "llama"),
        // A non-streamed answer without `usage`, for another model.
        no_usage(200, false, false, "qwen"),
        // Errors carry no tokens by nature: not counted as missing usage.
        no_usage(502, false, false, "llama"),
        no_usage(429, false, false, "qwen"),
        // The day before: fully counted.
        row(
            org,
            key,
            "mycompany",
            "llama",
            200,
            10,
            at - Duration::days(1),
        ),
    ];
    app.db.db.insert_request_logs(&rows).await.unwrap();

    let get = |group_by: &'static str| {
        let url = format!(
            "/api/v1/orgs/{}/usage?from=2025-03-31T00:00:00Z&to=2025-04-02T00:00:00Z&group_by={group_by}",
            fx.id
        );
        let (app, token) = (&app, fx.member.clone());
        async move {
            let r = app.get(&url, &token).await;
            r.expect(200);
            r.body["data"].as_array().unwrap().clone()
        }
    };
    let days = get("day").await;
    assert_eq!(days.len(), 2);
    // A fully counted bucket says 0.
    assert_eq!(days[0]["key"], "2025-03-31");
    assert_eq!(days[0]["requests_without_usage"], 0, "{days:?}");
    assert_eq!(days[1]["requests"], 6);
    assert_eq!(days[1]["total_tokens"], 15);
    assert_eq!(days[1]["requests_without_usage"], 3, "{days:?}");
    let models = get("model").await;
    let by_model: Vec<(&str, i64)> = models
        .iter()
        .map(|m| {
            (
                m["key"].as_str().unwrap(),
                m["requests_without_usage"].as_i64().unwrap(),
            )
        })
        .collect();
    assert_eq!(by_model, [("mycompany/llama", 2), ("mycompany/qwen", 1)]);

    // The document states the field, so generated clients know it.
    let doc = app
        .call(reqwest::Method::GET, "/api/openapi.json", None, None)
        .await;
    let usage_row = &doc.body["components"]["schemas"]["UsageRow"];
    assert!(
        usage_row["required"]
            .as_array()
            .unwrap()
            .contains(&json!("requests_without_usage")),
        "{usage_row}"
    );
    assert_eq!(
        usage_row["properties"]["requests_without_usage"]["type"],
        "integer"
    );
}

#[tokio::test]
async fn usage_filters_by_model_provider_key_and_endpoint_and_groups_by_endpoint() {
    let Seeded {
        app,
        fx,
        key1,
        key2,
    } = seed().await;
    let org: Uuid = fx.id.parse().unwrap();
    let d1 = Utc.with_ymd_and_hms(2025, 3, 1, 12, 0, 0).unwrap();
    let embeddings = [
        (row(org, key2, "internal", "bge", 200, 10, d1), "embeddings"),
        (row(org, key2, "internal", "bge", 200, 10, d1), "embeddings"),
    ];
    app.db.db.insert_request_logs_at(&embeddings).await.unwrap();
    let base = format!(
        "/api/v1/orgs/{}/usage?from=2025-03-01T00:00:00Z&to=2025-03-03T00:00:00Z",
        fx.id
    );
    let total = |q: String| {
        let app = &app;
        let url = format!("{base}&{q}");
        let token = fx.member.clone();
        async move {
            let r = app.get(&url, &token).await;
            r.expect(200);
            r.body["data"]
                .as_array()
                .unwrap()
                .iter()
                .map(|d| d["requests"].as_i64().unwrap())
                .sum::<i64>()
        }
    };
    assert_eq!(total("model=mycompany/llama".into()).await, 2);
    assert_eq!(total("provider=internal".into()).await, 5);
    assert_eq!(total(format!("api_key_id={key1}")).await, 3);
    assert_eq!(
        total(format!("api_key_id={key2}&endpoint=embeddings")).await,
        2
    );
    assert_eq!(
        total("provider=mycompany&model=internal/qwen".into()).await,
        0,
        "filters combine"
    );
    // Another org's key id filters this org's rows to nothing.
    assert_eq!(total(format!("api_key_id={}", Uuid::new_v4())).await, 0);

    let r = app
        .get(&format!("{base}&group_by=endpoint"), &fx.member)
        .await;
    r.expect(200);
    assert_eq!(r.body["group_by"], "endpoint");
    let by: Vec<(Option<String>, i64)> = r.body["data"]
        .as_array()
        .unwrap()
        .iter()
        .map(|d| {
            (
                d["key"].as_str().map(str::to_owned),
                d["requests"].as_i64().unwrap(),
            )
        })
        .collect();
    assert!(by.contains(&(Some("embeddings".into()), 2)), "{by:?}");

    for q in [
        "model=",
        "provider=Bad-Name",
        "api_key_id=nope",
        "endpoint=",
    ] {
        let r = app.get(&format!("{base}&{q}"), &fx.member).await;
        r.expect(422);
    }
}

#[tokio::test]
async fn logs_show_each_rows_cost_and_usage_sums_them() {
    use rust_decimal::Decimal;

    let app = TestApp::spawn().await;
    let fx = OrgFixture::create(&app, "rowcost").await;
    app.patch(
        &format!("/api/v1/orgs/{}/provider-keys/{}", fx.id, fx.provider_id),
        &fx.admin,
        json!({"prices": [
            {"model": "*", "input_per_million_usd": "1.5", "output_per_million_usd": "3"},
            {"model": "llama", "input_per_million_usd": "0.10", "output_per_million_usd": "0.20"},
        ]}),
    )
    .await
    .expect(200);
    let org: Uuid = fx.id.parse().unwrap();
    let key: Uuid = fx.api_key_id.parse().unwrap();
    let provider = Some(fx.provider_id.parse::<Uuid>().unwrap());
    let at = Utc.with_ymd_and_hms(2025, 5, 1, 12, 0, 0).unwrap();
    let priced = |model: &str, prompt: i64, completion: i64, minute: i64| RequestLog {
        provider_key_id: provider,
        prompt_tokens: Some(prompt),
        completion_tokens: Some(completion),
        total_tokens: Some(prompt + completion),
        ..row(
            org,
            key,
            "mycompany",
            model,
            200,
            10,
            at + Duration::minutes(minute),
        )
    };
    let rows = vec![
        // 5 * 1.5 + 2 * 3 per million: 0.0000135.
        priced("qwen", 5, 2, 0),
        // 1000 * 0.10 + 3000 * 0.20 per million: 0.0007.
        priced("llama", 1000, 3000, 1),
        // 1_234_567 * 1.5 + 7 * 3 per million: 1.8518715.
        priced("mistral", 1_234_567, 7, 2),
        // No token counts: no cost.
        RequestLog {
            prompt_tokens: None,
            completion_tokens: None,
            total_tokens: None,
            ..priced("llama", 0, 0, 3)
        },
        // No provider, so no price.
        row(
            org,
            key,
            "mycompany",
            "llama",
            200,
            10,
            at + Duration::minutes(4),
        ),
    ];
    app.db.db.insert_request_logs(&rows).await.unwrap();

    let logs = app
        .get(&format!("/api/v1/orgs/{}/logs", fx.id), &fx.member)
        .await;
    logs.expect(200);
    let data = logs.body["data"].as_array().unwrap();
    assert_eq!(data.len(), rows.len());
    let mut listed = Decimal::ZERO;
    for r in data {
        let stored: Option<String> =
            sqlx::query_scalar("SELECT cost_usd::text FROM request_logs WHERE request_id = $1")
                .bind(r["request_id"].as_str().unwrap())
                .fetch_one(app.db.db.pool())
                .await
                .unwrap();
        match stored {
            None => assert_eq!(r["cost_usd"], Value::Null, "{r}"),
            Some(stored) => {
                // A decimal string, never a JSON number, with the stored value.
                let shown = r["cost_usd"].as_str().unwrap_or_else(|| panic!("{r}"));
                assert_eq!(shown, stored, "{r}");
                let shown: Decimal = shown.parse().unwrap();
                assert_eq!(shown, stored.parse::<Decimal>().unwrap());
                listed += shown;
            }
        }
    }
    let by_model: Vec<(&str, &Value)> = data
        .iter()
        .map(|r| (r["upstream_model"].as_str().unwrap(), &r["cost_usd"]))
        .collect();
    assert_eq!(
        by_model,
        [
            ("llama", &Value::Null),
            ("llama", &Value::Null),
            ("mistral", &json!("1.8518715")),
            ("llama", &json!("0.0007")),
            ("qwen", &json!("0.0000135")),
        ],
        "newest first"
    );

    let usage = app
        .get(
            &format!(
                "/api/v1/orgs/{}/usage?from=2025-05-01T00:00:00Z&to=2025-05-02T00:00:00Z",
                fx.id
            ),
            &fx.member,
        )
        .await;
    usage.expect(200);
    let days = usage.body["data"].as_array().unwrap();
    assert_eq!(days.len(), 1, "{days:?}");
    assert_eq!(days[0]["cost_usd"], "1.852585");
    let summed: Decimal = days[0]["cost_usd"].as_str().unwrap().parse().unwrap();
    assert_eq!(summed, listed);

    // The document states the field as the answers carry it.
    let doc = app
        .call(reqwest::Method::GET, "/api/openapi.json", None, None)
        .await;
    let schema = &doc.body["components"]["schemas"]["RequestLog"];
    assert!(
        schema["required"]
            .as_array()
            .unwrap()
            .contains(&json!("cost_usd")),
        "{schema}"
    );
    let cost = &schema["properties"]["cost_usd"];
    assert_eq!(
        (&cost["type"], &cost["nullable"]),
        (&json!("string"), &json!(true))
    );
    let pattern = regex::Regex::new(cost["pattern"].as_str().unwrap()).unwrap();
    for r in data.iter().filter_map(|r| r["cost_usd"].as_str()) {
        assert!(pattern.is_match(r), "{r}");
    }
}
