//! `GET /v1/models/{customName}/{modelName}`: one model from the org's
//! provider, its id prefixed back, whether or not the client encoded the
//! `/`; a provider without the route (vLLM) answered from its list.

mod common;

use common::*;
use serde_json::{json, Value};

async fn retrieve(env: &Env, key: &str, tail: &str) -> reqwest::Response {
    env.http
        .get(format!("{}/v1/models/{tail}", env.url))
        .bearer_auth(key)
        .send()
        .await
        .unwrap()
}

#[tokio::test]
async fn a_model_is_retrieved_with_its_id_prefixed_whether_or_not_the_slash_is_encoded() {
    let env = Env::new().await;
    env.upstream
        .set_models(&["meta-llama/Llama-3-8B", "model-a"]);
    for tail in [
        "mycompany%2Fmeta-llama%2FLlama-3-8B",
        "mycompany/meta-llama/Llama-3-8B",
        "mycompany/meta-llama%2FLlama-3-8B",
    ] {
        let resp = retrieve(&env, &env.org.key, tail).await;
        assert_eq!(resp.status(), 200, "{tail}");
        assert!(resp.headers().contains_key("x-request-id"));
        let v: Value = resp.json_value().await;
        assert_eq!(
            v,
            json!({"id": "mycompany/meta-llama/Llama-3-8B", "object": "model",
                "created": 1_700_000_000, "owned_by": "mock"}),
            "{tail}"
        );
    }
    let seen = env.upstream.seen();
    assert_eq!(seen.len(), 3, "one upstream call each, no list needed");
    for s in &seen {
        assert_eq!(s.method, "GET");
        assert_eq!(s.path, "/v1/models/meta-llama/Llama-3-8B");
        assert_eq!(
            s.header("authorization"),
            Some(format!("Bearer {TOKEN}").as_str())
        );
    }
    // A lookup, like `GET /v1/models`: no usage row.
    assert!(env.rows().await.is_empty());
    env.stop().await;
}

#[tokio::test]
async fn a_provider_without_a_retrieve_route_is_answered_from_its_list() {
    let env = Env::new().await;
    add_provider(
        env.db(),
        env.org.id,
        "local",
        &format!("{}/vllm", env.upstream.base_url),
    )
    .await;
    let resp = retrieve(&env, &env.org.key, "local%2Fmodel-b").await;
    assert_eq!(resp.status(), 200);
    let v: Value = resp.json_value().await;
    assert_eq!(v["id"], "local/model-b");
    assert_eq!(v["owned_by"], "mock");
    let paths: Vec<String> = env.upstream.seen().into_iter().map(|s| s.path).collect();
    assert_eq!(paths, ["/vllm/v1/models/model-b", "/vllm/v1/models"]);

    let (msg, code) = openai_error(retrieve(&env, &env.org.key, "local/nope").await, 404).await;
    assert_eq!(code, "model_not_found");
    assert!(msg.contains("local/nope"), "{msg}");
    env.stop().await;
}

#[tokio::test]
async fn unknown_models_and_providers_are_404_model_not_found() {
    let env = Env::new().await;
    let (_, code) = openai_error(retrieve(&env, &env.org.key, "mycompany/nope").await, 404).await;
    assert_eq!(code, "model_not_found");
    let before = env.upstream.seen().len();
    assert_eq!(before, 2, "the retrieve route, then the list");
    for tail in [
        "nobody/model-a",
        "Mycompany/model-a",
        "mycompany%2F..%2Fsecret",
    ] {
        let (_, code) = openai_error(retrieve(&env, &env.org.key, tail).await, 404).await;
        assert_eq!(code, "model_not_found", "{tail}");
    }
    assert_eq!(
        env.upstream.seen().len(),
        before,
        "nothing more was asked upstream"
    );
    let (_, code) = openai_error(retrieve(&env, &env.org.key, "model-a").await, 400).await;
    assert_eq!(code, "invalid_model");
    let (_, code) = openai_error(
        retrieve(&env, "llmgw_not-a-key", "mycompany/model-a").await,
        401,
    )
    .await;
    assert_eq!(code, "invalid_api_key");
    env.stop().await;
}

#[tokio::test]
async fn another_orgs_provider_is_not_found() {
    let env = Env::new().await;
    let other = make_org(env.db()).await;
    let theirs = testkit::MockUpstream::start_with_ca(env.upstream.ca.clone()).await;
    add_provider(env.db(), other.id, "theirs", &theirs.base_url).await;
    let (_, code) = openai_error(retrieve(&env, &env.org.key, "theirs%2Fmodel-a").await, 404).await;
    assert_eq!(code, "model_not_found");
    assert!(theirs.seen().is_empty());
    // Their own key reaches it.
    let resp = retrieve(&env, &other.key, "theirs%2Fmodel-a").await;
    assert_eq!(resp.status(), 200);
    env.stop().await;
}

#[tokio::test]
async fn a_disabled_provider_is_refused_before_any_call() {
    let env = Env::new().await;
    let id = add_provider(env.db(), env.org.id, "off", &env.upstream.base_url).await;
    deactivate(env.db(), env.org.id, id).await;
    let (_, code) = openai_error(retrieve(&env, &env.org.key, "off/model-a").await, 403).await;
    assert_eq!(code, "provider_inactive");
    assert!(env.upstream.seen().is_empty());
    env.stop().await;
}
