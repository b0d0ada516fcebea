//! Spend controls through the settings API: key and org limits, model
//! scopes, provider prices, the `/limits` view, the cache announcements
//! gateways rely on, and the costs of usage rows.

use std::time::Duration;

use chrono::Utc;
use serde_json::{json, Value};
use sqlx::postgres::PgListener;
use storage::logs::RequestLog;
use uuid::Uuid;

use crate::helpers::{OrgFixture, TestApp};

fn key_path(fx: &OrgFixture) -> String {
    format!("/api/v1/orgs/{}/api-keys/{}", fx.id, fx.api_key_id)
}

async fn audit(app: &TestApp, fx: &OrgFixture, action: &str) -> Vec<Value> {
    let r = app
        .get(&format!("/api/v1/orgs/{}/audit-log", fx.id), &fx.owner)
        .await;
    r.expect(200);
    r.body["data"]
        .as_array()
        .unwrap()
        .iter()
        .filter(|e| e["action"] == action)
        .cloned()
        .collect()
}

#[tokio::test]
async fn admins_edit_key_limits_and_members_cannot() {
    let app = TestApp::spawn().await;
    let fx = OrgFixture::create(&app, "keylimits").await;
    let path = key_path(&fx);
    let before = app.get(&path, &fx.member).await;
    before.expect(200);
    assert_eq!(before.body["allowed_models"], Value::Null);
    assert_eq!(before.body["limits"]["requests_per_minute"], Value::Null);

    let patch = json!({"limits": {"requests_per_minute": 60, "tokens_per_day": 0,
                                  "budget_per_month_usd": "12.50"},
                       "allowed_models": ["mycompany/*"], "name": "renamed"});
    let refused = app.patch(&path, &fx.member, patch.clone()).await;
    refused.expect(403);
    assert_eq!(refused.code(), "forbidden");
    assert_eq!(app.get(&path, &fx.admin).await.body, before.body);

    let edited = app.patch(&path, &fx.admin, patch).await;
    edited.expect(200);
    assert_eq!(edited.body["name"], "renamed");
    assert_eq!(edited.body["limits"]["requests_per_minute"], 60);
    assert_eq!(edited.body["limits"]["tokens_per_day"], 0);
    assert_eq!(edited.body["limits"]["budget_per_month_usd"], "12.50");
    assert_eq!(edited.body["limits"]["tokens_per_minute"], Value::Null);
    assert_eq!(edited.body["allowed_models"], json!(["mycompany/*"]));
    assert_eq!(edited.body["prefix"], before.body["prefix"]);
    let list = app
        .get(&format!("/api/v1/orgs/{}/api-keys", fx.id), &fx.member)
        .await;
    assert_eq!(list.body["data"][0], edited.body);

    // The key keeps working and the gateway's lookup sees the new controls.
    let auth = app
        .db
        .db
        .api_key_by_digest(&storage::secrets::sha256(&fx.api_key))
        .await
        .unwrap()
        .unwrap();
    assert_eq!(auth.limits.requests_per_minute, Some(60));
    assert!(storage::limits::model_allowed(
        auth.allowed_models.as_deref(),
        "mycompany/meta-llama/Llama-3-8B"
    ));
    assert!(!storage::limits::model_allowed(
        auth.allowed_models.as_deref(),
        "other/m"
    ));
    assert!(auth.org_limits.is_empty());

    let rows = audit(&app, &fx, "api_key.update").await;
    assert_eq!(rows.len(), 1, "{rows:?}");
    assert_eq!(rows[0]["actor_user_id"], fx.admin_id.as_str());
    assert_eq!(rows[0]["target_id"], fx.api_key_id.as_str());
    let d = &rows[0]["details"];
    assert_eq!(d["limits"]["from"]["requests_per_minute"], Value::Null);
    assert_eq!(d["limits"]["to"]["requests_per_minute"], 60);
    assert_eq!(d["allowed_models"]["to"], json!(["mycompany/*"]));
    assert_eq!(d["name"], json!({"from": "ci", "to": "renamed"}));

    // null clears; an expiry can be set and removed.
    let in_a_day = (Utc::now() + chrono::Duration::days(1)).to_rfc3339();
    let r = app
        .patch(&path, &fx.admin, json!({"expires_at": in_a_day}))
        .await;
    r.expect(200);
    assert!(r.body["expires_at"].is_string());
    assert_eq!(r.body["limits"]["requests_per_minute"], 60);
    let r = app
        .patch(
            &path,
            &fx.admin,
            json!({"limits": null, "allowed_models": null, "expires_at": null}),
        )
        .await;
    r.expect(200);
    assert_eq!(r.body["expires_at"], Value::Null);
    assert_eq!(r.body["allowed_models"], Value::Null);
    assert_eq!(r.body["limits"]["requests_per_minute"], Value::Null);
    let r = app
        .patch(&path, &fx.admin, json!({"allowed_models": []}))
        .await;
    r.expect(200);
    assert_eq!(r.body["allowed_models"], json!([]));
}

#[tokio::test]
async fn keys_are_created_with_limits_and_scopes() {
    let app = TestApp::spawn().await;
    let fx = OrgFixture::create(&app, "keycreate").await;
    let created = app
        .post(
            &format!("/api/v1/orgs/{}/api-keys", fx.id),
            &fx.admin,
            json!({"name": "batch", "limits": {"max_concurrent_requests": 4},
                   "allowed_models": ["mycompany/llama-*", "*/embed"]}),
        )
        .await;
    created.expect(201);
    assert!(created.body["key"].is_string());
    assert_eq!(created.body["limits"]["max_concurrent_requests"], 4);
    assert_eq!(
        created.body["allowed_models"],
        json!(["mycompany/llama-*", "*/embed"])
    );
    let got = app
        .get(
            &format!("/api/v1/orgs/{}/api-keys/{}", fx.id, created.id()),
            &fx.member,
        )
        .await;
    got.expect(200);
    assert_eq!(got.body["limits"], created.body["limits"]);
    assert!(got.body.get("key").is_none());
    let rows = audit(&app, &fx, "api_key.create").await;
    let row = rows
        .iter()
        .find(|e| e["target_id"] == created.id().as_str())
        .unwrap();
    assert_eq!(row["details"]["limits"]["max_concurrent_requests"], 4);

    // A bad create makes no key.
    let bad = app
        .post(
            &format!("/api/v1/orgs/{}/api-keys", fx.id),
            &fx.admin,
            json!({"name": "bad", "limits": {"requests_per_minute": -1}, "allowed_models": ["Bad"]}),
        )
        .await;
    bad.expect(422);
    assert_eq!(
        bad.error_fields(),
        ["limits.requests_per_minute", "allowed_models"]
    );
    let list = app
        .get(&format!("/api/v1/orgs/{}/api-keys", fx.id), &fx.admin)
        .await;
    assert_eq!(list.body["data"].as_array().unwrap().len(), 2);
}

#[tokio::test]
async fn another_orgs_key_is_not_found() {
    let app = TestApp::spawn().await;
    let fx = OrgFixture::create(&app, "mine").await;
    let other = OrgFixture::create(&app, "theirs").await;
    let body = json!({"limits": {"requests_per_minute": 1}});
    // Their key id under my org, and my key under their org.
    for (org, key, token) in [
        (&fx.id, &other.api_key_id, &fx.admin),
        (&other.id, &fx.api_key_id, &fx.admin),
    ] {
        let path = format!("/api/v1/orgs/{org}/api-keys/{key}");
        let patched = app.patch(&path, token, body.clone()).await;
        patched.expect(404);
        app.get(&format!("{path}/limits"), token).await.expect(404);
        app.get(&path, token).await.expect(404);
    }
    let untouched = app.get(&key_path(&other), &other.admin).await;
    assert_eq!(untouched.body["limits"]["requests_per_minute"], Value::Null);
    app.patch(
        &format!("/api/v1/orgs/{}/api-keys/{}", fx.id, Uuid::new_v4()),
        &fx.admin,
        body,
    )
    .await
    .expect(404);
}

#[tokio::test]
async fn bad_controls_are_refused_by_field_and_change_nothing() {
    let app = TestApp::spawn().await;
    let fx = OrgFixture::create(&app, "badlimits").await;
    let path = key_path(&fx);
    let before = app.get(&path, &fx.admin).await.body;
    let long = format!("mycompany/{}", "x".repeat(300));
    let many: Vec<String> = (0..101).map(|i| format!("p/m{i}")).collect();
    let cases: Vec<(Value, &[&str])> = vec![
        (json!({}), &["body"]),
        (json!({"limits": 5}), &["limits"]),
        (
            json!({"limits": {"requests_per_minute": 1.5}}),
            &["limits.requests_per_minute"],
        ),
        (
            json!({"limits": {"tokens_per_minute": "10"}}),
            &["limits.tokens_per_minute"],
        ),
        (
            json!({"limits": {"tokens_per_month": -3}}),
            &["limits.tokens_per_month"],
        ),
        (
            json!({"limits": {"max_concurrent_requests": 1e300}}),
            &["limits.max_concurrent_requests"],
        ),
        (
            json!({"limits": {"budget_per_month_usd": "ten"}}),
            &["limits.budget_per_month_usd"],
        ),
        (
            json!({"limits": {"budget_per_month_usd": "-1.00"}}),
            &["limits.budget_per_month_usd"],
        ),
        (json!({"limits": {"burst": 3}}), &["limits"]),
        (
            json!({"allowed_models": "mycompany/*"}),
            &["allowed_models"],
        ),
        (json!({"allowed_models": ["nobody"]}), &["allowed_models"]),
        (json!({"allowed_models": [long]}), &["allowed_models"]),
        (json!({"allowed_models": many}), &["allowed_models"]),
        (json!({"allowed_models": [7]}), &["allowed_models"]),
        (json!({"name": ""}), &["name"]),
        (json!({"name": 5}), &["name"]),
        (
            json!({"expires_at": "2001-01-01T00:00:00Z"}),
            &["expires_at"],
        ),
        (json!({"expires_at": 5}), &["expires_at"]),
        (json!({"key": "llmgw_x"}), &["body", "key"]),
        // One bad field spoils the whole patch.
        (
            json!({"name": "ok", "limits": {"requests_per_minute": -1}}),
            &["limits.requests_per_minute"],
        ),
    ];
    for (body, fields) in cases {
        let r = app.patch(&path, &fx.admin, body.clone()).await;
        r.expect(422);
        assert_eq!(r.code(), "validation_failed");
        assert_eq!(r.error_fields(), fields, "{body}");
    }
    assert_eq!(app.get(&path, &fx.admin).await.body, before);
    assert!(audit(&app, &fx, "api_key.update").await.is_empty());

    // Org limits and provider prices are refused the same way.
    let org = format!("/api/v1/orgs/{}", fx.id);
    let r = app
        .patch(&org, &fx.owner, json!({"limits": {"tokens_per_day": -1}}))
        .await;
    r.expect(422);
    assert_eq!(r.error_fields(), ["limits.tokens_per_day"]);
    let r = app
        .patch(
            &format!("/api/v1/orgs/{}/provider-keys/{}", fx.id, fx.provider_id),
            &fx.admin,
            json!({"prices": [{"model": "m", "input_per_million_usd": 0.1}]}),
        )
        .await;
    r.expect(422);
    assert_eq!(r.error_fields(), ["prices"]);
}

#[tokio::test]
async fn only_owners_set_org_limits() {
    let app = TestApp::spawn().await;
    let fx = OrgFixture::create(&app, "orglimits").await;
    let org = format!("/api/v1/orgs/{}", fx.id);
    let limits = json!({"limits": {"tokens_per_month": 1000000, "budget_per_month_usd": 250}});
    for (role, status) in [("member", 403), ("admin", 403)] {
        let r = app.patch(&org, fx.token(role), limits.clone()).await;
        r.expect(status);
    }
    // A rename and a limit together from an admin: neither happens.
    app.patch(
        &org,
        &fx.admin,
        json!({"name": "Renamed", "limits": {"requests_per_minute": 1}}),
    )
    .await
    .expect(403);
    assert_eq!(app.get(&org, &fx.admin).await.body["name"], "Org orglimits");
    app.patch(&org, &fx.admin, json!({"name": "By admin"}))
        .await
        .expect(200);

    let r = app.patch(&org, &fx.owner, limits).await;
    r.expect(200);
    assert_eq!(r.body["name"], "By admin");
    assert_eq!(r.body["limits"]["tokens_per_month"], 1_000_000);
    assert_eq!(r.body["limits"]["budget_per_month_usd"], "250");
    assert_eq!(
        app.get(&org, &fx.member).await.body["limits"],
        r.body["limits"]
    );
    let rows = audit(&app, &fx, "org.limits").await;
    assert_eq!(rows.len(), 1);
    assert_eq!(rows[0]["actor_user_id"], fx.owner_id.as_str());
    assert_eq!(rows[0]["details"]["to"]["tokens_per_month"], 1_000_000);
    let auth = app
        .db
        .db
        .api_key_by_digest(&storage::secrets::sha256(&fx.api_key))
        .await
        .unwrap()
        .unwrap();
    assert_eq!(auth.org_limits.tokens_per_month, Some(1_000_000));
}

#[tokio::test]
async fn the_limits_view_lists_key_and_org_limits() {
    let app = TestApp::spawn().await;
    let fx = OrgFixture::create(&app, "view").await;
    let path = format!("{}/limits", key_path(&fx));
    let empty = app.get(&path, &fx.member).await;
    empty.expect(200);
    assert_eq!(empty.body, json!({"data": []}));

    app.patch(
        &key_path(&fx),
        &fx.admin,
        json!({"limits": {"requests_per_minute": 60, "tokens_per_day": 5000}}),
    )
    .await
    .expect(200);
    app.patch(
        &format!("/api/v1/orgs/{}", fx.id),
        &fx.owner,
        json!({"limits": {"requests_per_minute": 600, "budget_per_month_usd": "99.99"}}),
    )
    .await
    .expect(200);
    let r = app.get(&path, &fx.member).await;
    r.expect(200);
    let data = r.body["data"].as_array().unwrap();
    let entry = |limit: &str, scope: &str| {
        data.iter()
            .find(|e| e["limit"] == limit && e["scope"] == scope)
            .unwrap_or_else(|| panic!("no {scope} {limit} in {data:?}"))
            .clone()
    };
    assert_eq!(data.len(), 4, "{data:?}");
    let rpm = entry("requests_per_minute", "api_key");
    assert_eq!(rpm["max"], 60);
    assert_eq!(rpm["used"], Value::Null);
    assert_eq!(rpm["remaining"], Value::Null);
    assert_eq!(rpm["resets_at"], Value::Null);
    assert_eq!(entry("requests_per_minute", "organization")["max"], 600);
    let day = entry("tokens_per_day", "api_key");
    let reset: chrono::DateTime<Utc> = day["resets_at"].as_str().unwrap().parse().unwrap();
    let tomorrow = (Utc::now() + chrono::Duration::days(1)).date_naive();
    assert!(reset.date_naive() <= tomorrow && reset > Utc::now());
    assert_eq!(reset.time(), chrono::NaiveTime::MIN);
    let budget = entry("budget_per_month_usd", "organization");
    assert_eq!(budget["max"], "99.99");
    let reset: chrono::DateTime<Utc> = budget["resets_at"].as_str().unwrap().parse().unwrap();
    assert_eq!(reset.format("%d %H:%M:%S").to_string(), "01 00:00:00");
}

/// Waits for the next `llmgw_cache` payload, if one comes within a second.
async fn next_event(listener: &mut PgListener) -> Option<Value> {
    let n = tokio::time::timeout(Duration::from_secs(1), listener.recv())
        .await
        .ok()?
        .expect("listener");
    Some(serde_json::from_str(n.payload()).unwrap())
}

#[tokio::test]
async fn limit_changes_are_announced_to_gateways() {
    let app = TestApp::spawn().await;
    let fx = OrgFixture::create(&app, "notify").await;
    let mut listener = PgListener::connect_with(app.db.db.pool()).await.unwrap();
    listener.listen(storage::CACHE_CHANNEL).await.unwrap();

    for body in [
        json!({"limits": {"requests_per_minute": 5}}),
        json!({"allowed_models": ["mycompany/*"]}),
        json!({"name": "new name"}),
        json!({"expires_at": (Utc::now() + chrono::Duration::days(2)).to_rfc3339()}),
    ] {
        app.patch(&key_path(&fx), &fx.admin, body.clone())
            .await
            .expect(200);
        let ev = next_event(&mut listener)
            .await
            .unwrap_or_else(|| panic!("no notification for {body}"));
        assert_eq!(
            ev,
            json!({"table": "api_keys", "op": "UPDATE", "org_id": fx.id, "id": fx.api_key_id})
        );
    }
    app.patch(
        &format!("/api/v1/orgs/{}", fx.id),
        &fx.owner,
        json!({"limits": {"tokens_per_minute": 100}}),
    )
    .await
    .expect(200);
    let ev = next_event(&mut listener).await.expect("org notification");
    assert_eq!(
        ev,
        json!({"table": "organizations", "op": "UPDATE", "org_id": fx.id, "id": fx.id})
    );
    // Usage bookkeeping does not churn the caches.
    app.db
        .db
        .touch_api_keys(&[(fx.api_key_id.parse().unwrap(), Utc::now())])
        .await
        .unwrap();
    assert_eq!(next_event(&mut listener).await, None);
}

fn priced_row(org: Uuid, provider: Uuid, model: &str, prompt: i64, completion: i64) -> RequestLog {
    RequestLog {
        id: Uuid::new_v4(),
        request_id: Uuid::new_v4().to_string(),
        org_id: org,
        api_key_id: None,
        provider_key_id: Some(provider),
        provider_name: Some("mycompany".into()),
        requested_model: Some(format!("mycompany/{model}")),
        upstream_model: Some(model.to_owned()),
        status_code: 200,
        streamed: false,
        canceled: false,
        prompt_tokens: Some(prompt),
        completion_tokens: Some(completion),
        total_tokens: Some(prompt + completion),
        latency_ms: 10,
        ttfb_ms: None,
        error_class: None,
        created_at: Utc::now(),
        endpoint_id: None,
        attempts: None,
    }
}

#[tokio::test]
async fn prices_round_trip_and_price_usage_rows() {
    let app = TestApp::spawn().await;
    let fx = OrgFixture::create(&app, "prices").await;
    let other = OrgFixture::create(&app, "unpriced").await;
    let providers = format!("/api/v1/orgs/{}/provider-keys", fx.id);
    let prices = json!([
        {"model": "*", "input_per_million_usd": "1", "output_per_million_usd": "2"},
        {"model": "llama-3-*", "input_per_million_usd": "0.2", "output_per_million_usd": "0.4"},
        {"model": "llama-3-8b", "input_per_million_usd": "0.10", "output_per_million_usd": "0.20"},
    ]);
    let created = app
        .post(
            &providers,
            &fx.admin,
            json!({"name": "priced", "base_url": "https://priced.example.com", "token": "sk-priced",
                   "prices": prices}),
        )
        .await;
    created.expect(201);
    assert_eq!(created.body["prices"], prices);
    let got = app
        .get(&format!("{providers}/{}", created.id()), &fx.member)
        .await;
    assert_eq!(got.body["prices"], prices);
    // The fixture's provider has none yet; a PATCH sets them.
    let fixture = format!("{providers}/{}", fx.provider_id);
    assert_eq!(
        app.get(&fixture, &fx.member).await.body["prices"],
        json!([])
    );
    let r = app
        .patch(&fixture, &fx.admin, json!({"prices": prices}))
        .await;
    r.expect(200);
    assert_eq!(r.body["prices"], prices);
    let rows = audit(&app, &fx, "provider_key.update").await;
    assert_eq!(rows[0]["details"]["prices"]["to"], prices);

    // Rows are priced by the most specific entry, from the provider's prices.
    let org: Uuid = fx.id.parse().unwrap();
    let provider: Uuid = fx.provider_id.parse().unwrap();
    let rows = vec![
        // 1000 * 0.10 + 2000 * 0.20 = 500 per million: 0.0005
        (
            priced_row(org, provider, "llama-3-8b", 1000, 2000),
            "chat/completions",
        ),
        // 1_000_000 * 0.2 + 500_000 * 0.4 = 0.4
        (
            priced_row(org, provider, "llama-3-70b", 1_000_000, 500_000),
            "chat/completions",
        ),
        // 3 * 1 + 1 * 2 per million: 0.000005
        (priced_row(org, provider, "mistral", 3, 1), "embeddings"),
        // No token counts: no cost.
        (
            RequestLog {
                prompt_tokens: None,
                completion_tokens: None,
                total_tokens: None,
                ..priced_row(org, provider, "llama-3-8b", 0, 0)
            },
            "chat/completions",
        ),
        // A provider id of another org is never priced with this org's prices.
        (
            priced_row(
                other.id.parse().unwrap(),
                provider,
                "llama-3-8b",
                1000,
                1000,
            ),
            "chat/completions",
        ),
    ];
    app.db.db.insert_request_logs_at(&rows).await.unwrap();
    let stored: Vec<(String, Option<String>)> = sqlx::query_as(
        "SELECT upstream_model || ':' || coalesce(prompt_tokens, -1), cost_usd::text
         FROM request_logs ORDER BY created_at, prompt_tokens",
    )
    .fetch_all(app.db.db.pool())
    .await
    .unwrap();
    let cost = |k: &str| {
        stored
            .iter()
            .filter(|(m, _)| m == k)
            .map(|(_, c)| c.clone())
            .collect::<Vec<_>>()
    };
    let num = |s: &str| Some(s.parse::<rust_decimal::Decimal>().unwrap());
    let dec = |v: Vec<Option<String>>| -> Vec<Option<rust_decimal::Decimal>> {
        v.into_iter().map(|c| c.and_then(|c| num(&c))).collect()
    };
    assert_eq!(dec(cost("llama-3-70b:1000000")), [num("0.4")]);
    assert_eq!(dec(cost("mistral:3")), [num("0.000005")]);
    assert_eq!(dec(cost("llama-3-8b:-1")), [None]);
    let mut k8 = dec(cost("llama-3-8b:1000"));
    k8.sort();
    assert_eq!(k8, [None, num("0.0005")], "{stored:?}");

    // The usage API sums them, per group, matching the rows.
    let usage = app
        .get(
            &format!("/api/v1/orgs/{}/usage?group_by=model", fx.id),
            &fx.member,
        )
        .await;
    usage.expect(200);
    let by_model: Vec<(String, String)> = usage.body["data"]
        .as_array()
        .unwrap()
        .iter()
        .map(|r| {
            (
                r["key"].as_str().unwrap().to_owned(),
                r["cost_usd"].as_str().unwrap().to_owned(),
            )
        })
        .collect();
    assert_eq!(
        by_model,
        [
            ("mycompany/llama-3-70b".to_owned(), "0.4".to_owned()),
            ("mycompany/llama-3-8b".to_owned(), "0.0005".to_owned()),
            ("mycompany/mistral".to_owned(), "0.000005".to_owned()),
        ]
    );
    let total = app
        .get(
            &format!(
                "/api/v1/orgs/{}/usage?group_by=endpoint&endpoint=chat/completions",
                fx.id
            ),
            &fx.member,
        )
        .await;
    assert_eq!(total.body["data"][0]["cost_usd"], "0.4005");
    let theirs = app
        .get(&format!("/api/v1/orgs/{}/usage", other.id), &other.member)
        .await;
    assert_eq!(theirs.body["data"][0]["cost_usd"], "0");
}
