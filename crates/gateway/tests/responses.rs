//! The Responses API's follow-ups (`GET|DELETE /v1/responses/{id}`,
//! `/cancel`, `/input_items`) reach the provider that created the response,
//! on any gateway replica, and only for the organization that created it.

mod common;

use common::*;
use serde_json::{json, Value};
use testkit::MockUpstream;

/// An org with two providers, each on its own upstream: `mycompany` (the
/// env's) and `second`.
async fn two_providers() -> (Env, MockUpstream) {
    let env = Env::new().await;
    let second = MockUpstream::start_with_ca(env.upstream.ca.clone()).await;
    add_provider(env.db(), env.org.id, "second", &second.base_url).await;
    (env, second)
}

async fn create(env: &Env, url: &str, model: &str, input: &str) -> String {
    let resp = env
        .http
        .post(format!("{url}/v1/responses"))
        .bearer_auth(&env.org.key)
        .json_body(&json!({"model": model, "input": input}))
        .send()
        .await
        .unwrap();
    assert_eq!(resp.status(), 200);
    let v: Value = resp.json_value().await;
    let id = v["id"].as_str().unwrap().to_owned();
    assert!(id.starts_with("resp_"), "{id}");
    id
}

/// A streamed create; the id from its `response.created` event.
async fn create_streamed(env: &Env, url: &str, model: &str) -> String {
    let resp = env
        .http
        .post(format!("{url}/v1/responses"))
        .bearer_auth(&env.org.key)
        .json_body(&json!({"model": model, "input": "hi", "stream": true}))
        .send()
        .await
        .unwrap();
    assert_eq!(resp.status(), 200);
    let text = resp.text().await.unwrap();
    let created: Value = text
        .lines()
        .filter_map(|l| l.strip_prefix("data: "))
        .filter_map(|d| serde_json::from_str::<Value>(d).ok())
        .find(|e| e["type"] == "response.created")
        .unwrap_or_else(|| panic!("no response.created in {text}"));
    created["response"]["id"].as_str().unwrap().to_owned()
}

async fn call(
    env: &Env,
    url: &str,
    key: &str,
    method: reqwest::Method,
    path: &str,
) -> reqwest::Response {
    env.http
        .request(method, format!("{url}/v1/responses/{path}"))
        .bearer_auth(key)
        .send()
        .await
        .unwrap()
}

/// Requests `upstream` got under `/v1/responses/` (the follow-ups).
fn follow_ups(upstream: &MockUpstream) -> Vec<(String, String, String)> {
    upstream
        .seen()
        .into_iter()
        .filter(|s| s.path.starts_with("/v1/responses/"))
        .map(|s| (s.method, s.path, s.query))
        .collect()
}

#[tokio::test]
async fn follow_ups_reach_the_provider_that_created_the_response() {
    let (env, second) = two_providers().await;
    let url = env.url.clone();
    let a = create(&env, &url, "second/gpt-4.1", "hello from a").await;
    let b = create(&env, &url, "mycompany/gpt-4.1", "hello from b").await;
    assert_ne!(a, b);

    let resp = call(&env, &url, &env.org.key, reqwest::Method::GET, &a).await;
    assert_eq!(resp.status(), 200);
    assert!(resp.headers().contains_key("x-request-id"));
    assert_eq!(resp.json_value().await["id"], a.as_str());

    let query = "limit=5&order=asc&after=msg_0&include[]=message.input_image.image_url";
    let resp = call(
        &env,
        &url,
        &env.org.key,
        reqwest::Method::GET,
        &format!("{a}/input_items?{query}"),
    )
    .await;
    assert_eq!(resp.status(), 200);
    let items: Value = resp.json_value().await;
    assert_eq!(
        items["data"][0]["content"][0]["text"], "hello from a",
        "{items}"
    );

    let resp = call(
        &env,
        &url,
        &env.org.key,
        reqwest::Method::POST,
        &format!("{b}/cancel"),
    )
    .await;
    assert_eq!(resp.status(), 200);
    assert_eq!(resp.json_value().await["status"], "cancelled");

    let resp = call(&env, &url, &env.org.key, reqwest::Method::DELETE, &a).await;
    assert_eq!(resp.status(), 200);
    assert_eq!(resp.json_value().await["deleted"], true);
    // Deleted upstream: the provider's own 404 is relayed.
    let resp = call(&env, &url, &env.org.key, reqwest::Method::GET, &a).await;
    assert_eq!(resp.status(), 404);

    let to_second = follow_ups(&second);
    assert_eq!(
        to_second,
        [
            ("GET".into(), format!("/v1/responses/{a}"), String::new()),
            (
                "GET".into(),
                format!("/v1/responses/{a}/input_items"),
                query.to_owned()
            ),
            ("DELETE".into(), format!("/v1/responses/{a}"), String::new()),
            ("GET".into(), format!("/v1/responses/{a}"), String::new()),
        ]
    );
    assert_eq!(
        follow_ups(&env.upstream),
        [(
            "POST".into(),
            format!("/v1/responses/{b}/cancel"),
            String::new()
        )]
    );
    for s in second.seen() {
        assert_eq!(
            s.header("authorization"),
            Some(format!("Bearer {TOKEN}").as_str())
        );
    }

    env.gw.shutdown().await;
    let rows: Vec<(String, Option<String>, i16, Option<i64>)> = sqlx::query_as(
        "SELECT endpoint, provider_name, status_code, total_tokens FROM request_logs
         WHERE org_id = $1 ORDER BY created_at",
    )
    .bind(env.org.id)
    .fetch_all(env.db().pool())
    .await
    .unwrap();
    let want: Vec<(String, Option<String>, i16, Option<i64>)> = [
        ("responses", "second", 200, Some(11)),
        ("responses", "mycompany", 200, Some(11)),
        ("responses/{id}", "second", 200, None),
        ("responses/{id}/input_items", "second", 200, None),
        ("responses/{id}/cancel", "mycompany", 200, None),
        ("responses/{id}", "second", 200, None),
        ("responses/{id}", "second", 404, None),
    ]
    .into_iter()
    .map(|(e, p, s, t)| (e.to_owned(), Some(p.to_owned()), s, t))
    .collect();
    assert_eq!(rows, want, "one row per request, follow-ups without tokens");
    env.stop().await;
}

#[tokio::test]
async fn a_streamed_response_is_remembered_as_its_id_passes() {
    let (env, second) = two_providers().await;
    let url = env.url.clone();
    let id = create_streamed(&env, &url, "second/gpt-4.1").await;
    let resp = call(&env, &url, &env.org.key, reqwest::Method::GET, &id).await;
    assert_eq!(resp.status(), 200);
    assert_eq!(resp.json_value().await["id"], id.as_str());
    assert_eq!(
        follow_ups(&second),
        [("GET".into(), format!("/v1/responses/{id}"), String::new())]
    );
    assert!(follow_ups(&env.upstream).is_empty());
    env.stop().await;
}

#[tokio::test]
async fn another_orgs_key_gets_404_for_the_same_response_id() {
    let env = Env::new().await;
    let url = env.url.clone();
    let id = create(&env, &url, "mycompany/gpt-4.1", "secret").await;
    // The other org has a provider of the same name on the same upstream,
    // which does hold the response: only the route decides, and it is per org.
    let other = make_org(env.db()).await;
    add_provider(env.db(), other.id, "mycompany", &env.upstream.base_url).await;
    for (method, path) in [
        (reqwest::Method::GET, id.clone()),
        (reqwest::Method::GET, format!("{id}/input_items")),
        (reqwest::Method::POST, format!("{id}/cancel")),
        (reqwest::Method::DELETE, id.clone()),
    ] {
        let resp = call(&env, &url, &other.key, method, &path).await;
        let (_, code) = openai_error(resp, 404).await;
        assert_eq!(code, "response_not_found", "{path}");
    }
    assert!(
        follow_ups(&env.upstream).is_empty(),
        "nothing was forwarded"
    );
    // Still there for its own org.
    let resp = call(&env, &url, &env.org.key, reqwest::Method::GET, &id).await;
    assert_eq!(resp.status(), 200);
    env.stop().await;
}

#[tokio::test]
async fn unknown_and_malformed_ids_are_404() {
    let env = Env::new().await;
    let url = env.url.clone();
    let long = "x".repeat(300);
    for path in ["resp_unknown", "..%2F..%2Fchat", "a%20b", long.as_str()] {
        let resp = call(&env, &url, &env.org.key, reqwest::Method::GET, path).await;
        let (_, code) = openai_error(resp, 404).await;
        assert_eq!(code, "response_not_found", "{path}");
    }
    assert!(follow_ups(&env.upstream).is_empty());
    let resp = call(
        &env,
        &url,
        &env.org.key,
        reqwest::Method::PUT,
        "resp_unknown",
    )
    .await;
    assert_eq!(resp.status(), 405);
    let (_, code) = openai_error(
        call(&env, &url, "llmgw_nope", reqwest::Method::GET, "resp_x").await,
        401,
    )
    .await;
    assert_eq!(code, "invalid_api_key");
    env.stop().await;
}

#[tokio::test]
async fn a_second_gateway_on_the_same_database_finds_the_route() {
    let (env, second) = two_providers().await;
    let gw2 = gateway::Gateway::start(
        env.db().clone(),
        config(
            &env.upstream.ca.ca_file,
            true,
            std::time::Duration::from_secs(10),
        ),
    )
    .await;
    let (url2, server2) = serve(&gw2);
    let url = env.url.clone();
    let plain = create(&env, &url, "second/gpt-4.1", "one").await;
    let streamed = create_streamed(&env, &url, "second/gpt-4.1").await;
    for id in [&plain, &streamed] {
        // Sent to the other replica right away.
        let resp = call(&env, &url2, &env.org.key, reqwest::Method::GET, id).await;
        assert_eq!(resp.status(), 200, "{id}");
        assert_eq!(resp.json_value().await["id"], id.as_str());
    }
    assert_eq!(follow_ups(&second).len(), 2);
    let stored: i64 = sqlx::query_scalar("SELECT count(*) FROM response_routes WHERE org_id = $1")
        .bind(env.org.id)
        .fetch_one(env.db().pool())
        .await
        .unwrap();
    assert_eq!(stored, 2);
    gw2.shutdown().await;
    server2.stop(false).await;
    env.stop().await;
}

#[tokio::test]
async fn the_database_refuses_a_route_to_another_orgs_provider() {
    let env = Env::new().await;
    let other = make_org(env.db()).await;
    let theirs = add_provider(env.db(), other.id, "theirs", &env.upstream.base_url).await;
    let written = env
        .db()
        .insert_response_route(env.org.id, "resp_x", theirs, None)
        .await
        .unwrap();
    assert!(!written);
    let raw = sqlx::query(
        "INSERT INTO response_routes (org_id, response_id, provider_key_id) VALUES ($1, 'resp_y', $2)",
    )
    .bind(env.org.id)
    .bind(theirs)
    .execute(env.db().pool())
    .await;
    assert!(raw.is_err(), "the foreign key is on (provider, org)");
    assert!(env
        .db()
        .response_route(other.id, "resp_x")
        .await
        .unwrap()
        .is_none());
    env.stop().await;
}

#[tokio::test]
async fn a_deleted_provider_takes_its_response_routes_with_it() {
    let (env, second) = two_providers().await;
    let url = env.url.clone();
    let id = create(&env, &url, "second/gpt-4.1", "bye").await;
    let provider: uuid::Uuid =
        sqlx::query_scalar("SELECT id FROM provider_keys WHERE org_id = $1 AND name = 'second'")
            .bind(env.org.id)
            .fetch_one(env.db().pool())
            .await
            .unwrap();
    env.db()
        .delete_provider_key(env.org.id, storage::Actor(None), provider)
        .await
        .unwrap();
    assert!(env
        .db()
        .response_route(env.org.id, &id)
        .await
        .unwrap()
        .is_none());
    // The change reaches the gateway's caches through NOTIFY within moments.
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(5);
    loop {
        let resp = call(&env, &url, &env.org.key, reqwest::Method::GET, &id).await;
        if resp.status() == 404 {
            let (_, code) = openai_error(resp, 404).await;
            assert_eq!(code, "response_not_found");
            break;
        }
        assert!(std::time::Instant::now() < deadline, "still routed");
        tokio::time::sleep(std::time::Duration::from_millis(50)).await;
    }
    drop(second);
    env.stop().await;
}
