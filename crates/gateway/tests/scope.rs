//! API keys' `allowed_models`: a model outside the key's patterns is 403
//! `model_not_allowed` before any provider lookup or upstream call (with its
//! usage row), on JSON, streamed and upload endpoints; retrieving one is 404;
//! `GET /v1/models` lists only what the key may use, without one key's scope
//! leaking into another's answer through the per-org cache.

mod common;

use std::time::{Duration, Instant};

use common::*;
use serde_json::{json, Value};
use storage::api_keys::{ApiKeyPatch, KeyOptions};
use storage::limits::ModelPattern;
use storage::Actor;
use uuid::Uuid;

fn patterns(ps: &[&str]) -> Vec<ModelPattern> {
    ps.iter().map(|p| ModelPattern::parse(p).unwrap()).collect()
}

/// A new key of the env's org with `allowed` as its scope; (secret, id).
async fn scoped_key(env: &Env, allowed: Option<&[&str]>) -> (String, Uuid) {
    let options = KeyOptions {
        allowed_models: allowed.map(patterns),
        ..KeyOptions::default()
    };
    let (key, secret) = env
        .db()
        .create_api_key_with(env.org.id, Actor(None), "scoped", &options)
        .await
        .unwrap();
    (secret.expose_secret().to_owned(), key.id)
}

fn chat_body(model: &str) -> Value {
    json!({"model": model, "messages": messages()})
}

/// Asserts a 403 `model_not_allowed` in OpenAI's shape.
async fn refused(resp: reqwest::Response) {
    assert_eq!(resp.status(), 403);
    let v: Value = resp.json_value().await;
    let e = &v["error"];
    assert_eq!(e["code"], "model_not_allowed", "{v}");
    assert_eq!(e["type"], "invalid_request_error", "{v}");
    assert_eq!(e["param"], "model", "{v}");
    assert!(
        e["message"].as_str().unwrap().contains("allowed_models"),
        "{v}"
    );
}

#[tokio::test]
async fn a_scoped_key_calls_only_matching_models_and_refusals_reach_no_upstream() {
    let env = Env::new().await;
    let (key, key_id) = scoped_key(&env, Some(&["mycompany/llama-*"])).await;
    let resp = env
        .chat_with_key(&key, &chat_body("mycompany/llama-3"))
        .await;
    assert_eq!(resp.status(), 200);
    assert_eq!(env.upstream.seen().len(), 1);
    refused(env.chat_with_key(&key, &chat_body("mycompany/gpt")).await).await;
    // No provider `other` exists: the scope is checked before the lookup.
    refused(env.chat_with_key(&key, &chat_body("other/llama-3")).await).await;
    assert_eq!(
        env.upstream.seen().len(),
        1,
        "refusals reached the upstream"
    );
    let rows = env.rows().await;
    assert_eq!(rows.len(), 3);
    let refusal = rows
        .iter()
        .find(|r| r.requested_model.as_deref() == Some("mycompany/gpt"))
        .unwrap();
    assert_eq!(refusal.status_code, 403);
    assert_eq!(refusal.error_class.as_deref(), Some("model_not_allowed"));
    assert_eq!(refusal.api_key_id, Some(key_id));
    assert_eq!(refusal.provider_key_id, None, "refused before the lookup");
    assert_eq!(refusal.total_tokens, None);
    let other = rows
        .iter()
        .find(|r| r.requested_model.as_deref() == Some("other/llama-3"))
        .unwrap();
    assert_eq!(other.status_code, 403);
    assert_eq!(other.error_class.as_deref(), Some("model_not_allowed"));
    env.stop().await;
}

#[tokio::test]
async fn an_empty_scope_refuses_everything_and_null_allows_everything() {
    let env = Env::new().await;
    let (none, _) = scoped_key(&env, Some(&[])).await;
    let (all, _) = scoped_key(&env, None).await;
    for model in ["mycompany/llama-3", "mycompany/gpt"] {
        refused(env.chat_with_key(&none, &chat_body(model)).await).await;
        let resp = env.chat_with_key(&all, &chat_body(model)).await;
        assert_eq!(resp.status(), 200, "{model}");
    }
    assert_eq!(env.upstream.seen().len(), 2);
    env.stop().await;
}

#[tokio::test]
async fn a_star_matches_across_slashes() {
    let env = Env::new().await;
    let (key, _) = scoped_key(&env, Some(&["mycompany/*"])).await;
    let resp = env
        .chat_with_key(&key, &chat_body("mycompany/meta-llama/Llama-3"))
        .await;
    assert_eq!(resp.status(), 200);
    assert_eq!(env.upstream.seen()[0].json()["model"], "meta-llama/Llama-3");
    refused(
        env.chat_with_key(&key, &chat_body("other/meta-llama/Llama-3"))
            .await,
    )
    .await;
    env.stop().await;
}

#[tokio::test]
async fn a_patch_of_the_scope_reaches_a_cached_key_within_a_second() {
    let env = Env::new().await;
    let (key, key_id) = scoped_key(&env, None).await;
    // Cached, and allowed.
    let resp = env.chat_with_key(&key, &chat_body("mycompany/gpt")).await;
    assert_eq!(resp.status(), 200);
    let patch = ApiKeyPatch {
        allowed_models: Some(Some(patterns(&["mycompany/llama-*"]))),
        ..ApiKeyPatch::default()
    };
    env.db()
        .update_api_key(env.org.id, Actor(None), key_id, &patch)
        .await
        .unwrap();
    let start = Instant::now();
    loop {
        let resp = env.chat_with_key(&key, &chat_body("mycompany/gpt")).await;
        if resp.status() == 403 {
            refused(resp).await;
            break;
        }
        assert_eq!(resp.status(), 200);
        assert!(
            start.elapsed() < Duration::from_secs(1),
            "the scope change did not reach the cached key within a second"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    let resp = env
        .chat_with_key(&key, &chat_body("mycompany/llama-3"))
        .await;
    assert_eq!(resp.status(), 200);
    env.stop().await;
}

async fn listed(env: &Env, key: &str) -> Vec<String> {
    let resp = env
        .http
        .get(format!("{}/v1/models", env.url))
        .bearer_auth(key)
        .send()
        .await
        .unwrap();
    assert_eq!(resp.status(), 200);
    let v: Value = resp.json_value().await;
    assert_eq!(v["object"], "list");
    let mut ids: Vec<String> = v["data"]
        .as_array()
        .unwrap()
        .iter()
        .map(|m| m["id"].as_str().unwrap().to_owned())
        .collect();
    ids.sort();
    ids
}

#[tokio::test]
async fn the_model_list_shows_a_key_only_its_scope_and_the_org_cache_does_not_leak() {
    let env = Env::new().await;
    env.upstream
        .set_models(&["llama-3", "gpt-4", "meta-llama/Llama-3"]);
    add_provider(env.db(), env.org.id, "other", &env.upstream.base_url).await;
    let (scoped, _) = scoped_key(&env, Some(&["mycompany/llama-*", "other/gpt-*"])).await;
    let (nothing, _) = scoped_key(&env, Some(&[])).await;
    let everything: Vec<String> = [
        "mycompany/gpt-4",
        "mycompany/llama-3",
        "mycompany/meta-llama/Llama-3",
        "other/gpt-4",
        "other/llama-3",
        "other/meta-llama/Llama-3",
    ]
    .map(str::to_owned)
    .to_vec();
    let mine = ["mycompany/llama-3", "other/gpt-4"]
        .map(str::to_owned)
        .to_vec();
    // Scoped first (it fills the org's cache), then unscoped, then both again.
    assert_eq!(listed(&env, &scoped).await, mine);
    assert_eq!(listed(&env, &env.org.key).await, everything);
    assert_eq!(listed(&env, &scoped).await, mine);
    assert!(listed(&env, &nothing).await.is_empty());
    assert_eq!(listed(&env, &env.org.key).await, everything);
    env.stop().await;

    // Unscoped first this time, on a fresh gateway and cache.
    let env = Env::new().await;
    env.upstream.set_models(&["llama-3", "gpt-4"]);
    let (scoped, _) = scoped_key(&env, Some(&["mycompany/llama-*"])).await;
    let all = ["mycompany/gpt-4", "mycompany/llama-3"]
        .map(str::to_owned)
        .to_vec();
    assert_eq!(listed(&env, &env.org.key).await, all);
    assert_eq!(listed(&env, &scoped).await, ["mycompany/llama-3"]);
    assert_eq!(listed(&env, &env.org.key).await, all);
    env.stop().await;
}

#[tokio::test]
async fn retrieving_a_model_outside_the_scope_is_404_without_an_upstream_call() {
    let env = Env::new().await;
    env.upstream.set_models(&["llama-3", "gpt-4"]);
    let (key, _) = scoped_key(&env, Some(&["mycompany/llama-*"])).await;
    let get = |tail: &'static str| {
        env.http
            .get(format!("{}/v1/models/{tail}", env.url))
            .bearer_auth(&key)
            .send()
    };
    let resp = get("mycompany/llama-3").await.unwrap();
    assert_eq!(resp.status(), 200);
    assert_eq!(env.upstream.seen().len(), 1);
    for tail in ["mycompany/gpt-4", "mycompany%2Fgpt-4", "nosuch/llama-3"] {
        let (msg, code) = openai_error(get(tail).await.unwrap(), 404).await;
        assert_eq!(code, "model_not_found", "{tail}: {msg}");
    }
    assert_eq!(
        env.upstream.seen().len(),
        1,
        "a refused retrieve was sent upstream"
    );
    env.stop().await;
}

#[tokio::test]
async fn a_streamed_request_outside_the_scope_is_refused_before_any_stream() {
    let env = Env::new().await;
    let (key, _) = scoped_key(&env, Some(&["mycompany/llama-*"])).await;
    let body = json!({"model": "mycompany/gpt", "stream": true, "messages": messages()});
    let resp = env.chat_with_key(&key, &body).await;
    assert!(resp.headers()["content-type"]
        .to_str()
        .unwrap()
        .starts_with("application/json"));
    refused(resp).await;
    assert!(env.upstream.seen().is_empty());
    let rows = env.rows().await;
    assert_eq!(rows.len(), 1);
    assert!(rows[0].streamed);
    assert_eq!(rows[0].status_code, 403);
    assert_eq!(rows[0].error_class.as_deref(), Some("model_not_allowed"));
    env.stop().await;
}

#[tokio::test]
async fn an_audio_upload_outside_the_scope_is_refused_before_any_upstream_call() {
    const BOUNDARY: &str = "------------------------llmgwscope0123";
    let env = Env::new().await;
    let (key, _) = scoped_key(&env, Some(&["mycompany/llama-*"])).await;
    let mut body = Vec::new();
    for (name, extra, content) in [
        ("model", "", &b"mycompany/whisper-1"[..]),
        (
            "file",
            "; filename=\"speech.wav\"\r\nContent-Type: audio/wav",
            &[7u8; 4096][..],
        ),
    ] {
        body.extend_from_slice(
            format!(
                "--{BOUNDARY}\r\nContent-Disposition: form-data; name=\"{name}\"{extra}\r\n\r\n"
            )
            .as_bytes(),
        );
        body.extend_from_slice(content);
        body.extend_from_slice(b"\r\n");
    }
    body.extend_from_slice(format!("--{BOUNDARY}--\r\n").as_bytes());
    let resp = env
        .http
        .post(format!("{}/v1/audio/transcriptions", env.url))
        .bearer_auth(&key)
        .header(
            "content-type",
            format!("multipart/form-data; boundary={BOUNDARY}"),
        )
        .body(body)
        .send()
        .await
        .unwrap();
    refused(resp).await;
    assert!(env.upstream.seen().is_empty());
    let rows = env.rows().await;
    assert_eq!(rows.len(), 1);
    assert_eq!(rows[0].status_code, 403);
    assert_eq!(rows[0].error_class.as_deref(), Some("model_not_allowed"));
    assert_eq!(
        rows[0].requested_model.as_deref(),
        Some("mycompany/whisper-1")
    );
    env.stop().await;
}
