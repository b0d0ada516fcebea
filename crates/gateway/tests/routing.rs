//! Retries and fallbacks (`"models": [...]`): what is tried again and what
//! never is. A dead provider falls back to a live one (the upstream never
//! sees `models`, `x-llmgw-model` and the row name what served); a 503 falls
//! back; a 504, a first-byte timeout, a client's 400, a TLS failure and a
//! stream broken after its first chunk do not.

mod common;

use std::time::{Duration, Instant};

use common::*;
use serde_json::{json, Value};
use testkit::MockUpstream;

fn body(model: &str, fallbacks: &[&str]) -> Value {
    json!({"model": model, "models": fallbacks, "messages": messages()})
}

#[tokio::test]
async fn a_dead_provider_falls_back_to_a_live_one_and_the_answer_says_which_served() {
    let env = Env::new().await;
    add_closed_port_provider(&env, "dead").await;
    let resp = env
        .chat(&body("dead/llama", &["mycompany/llama-backup"]))
        .await;
    assert_eq!(resp.status(), 200);
    assert_eq!(
        resp.headers()["x-llmgw-model"],
        "mycompany/llama-backup",
        "the header names the model that served"
    );
    let v: Value = resp.json_value().await;
    assert_eq!(v["model"], "llama-backup", "the body is relayed untouched");
    let seen = env.upstream.seen();
    assert_eq!(seen.len(), 1);
    let sent = seen[0].json();
    assert_eq!(sent["model"], "llama-backup");
    assert!(
        sent.get("models").is_none(),
        "models reached the upstream: {sent}"
    );
    let rows = env.rows().await;
    assert_eq!(rows.len(), 1);
    assert_eq!(rows[0].status_code, 200);
    assert_eq!(rows[0].requested_model.as_deref(), Some("dead/llama"));
    assert_eq!(rows[0].provider_name.as_deref(), Some("mycompany"));
    assert_eq!(rows[0].upstream_model.as_deref(), Some("llama-backup"));
    env.stop().await;
}

#[tokio::test]
async fn a_503_falls_back_but_a_504_a_timeout_and_a_client_error_do_not() {
    let env = Env::with(Opts {
        timeout: Duration::from_millis(600),
        ..Opts::default()
    })
    .await;
    let backup = MockUpstream::start_with_ca(env.upstream.ca.clone()).await;
    add_provider(env.db(), env.org.id, "backup", &backup.base_url).await;

    let resp = env.chat(&body("mycompany/status-503", &["backup/m"])).await;
    assert_eq!(resp.status(), 200);
    assert_eq!(resp.headers()["x-llmgw-model"], "backup/m");
    assert_eq!(backup.seen().len(), 1);

    for (model, status) in [
        ("mycompany/status-504", 504),
        ("mycompany/status-400", 400),
        ("mycompany/status-429", 429),
    ] {
        let resp = env.chat(&body(model, &["backup/m"])).await;
        assert_eq!(resp.status(), status, "{model}");
        assert_eq!(resp.headers()["x-llmgw-model"], model);
    }
    // No head within the timeout: the model may still be generating.
    let started = Instant::now();
    let resp = env.chat(&body("mycompany/sleep-2000", &["backup/m"])).await;
    assert_eq!(resp.status(), 504);
    assert!(started.elapsed() < Duration::from_millis(1500));
    assert_eq!(backup.seen().len(), 1, "only the 503 fell back");
    env.stop().await;
}

/// A TLS failure (here: a certificate from a CA the gateway does not
/// trust) is the endpoint's configuration, not a passing fault: the client
/// sees it, and no fallback hides it.
#[tokio::test]
async fn a_tls_failure_is_not_retried() {
    let env = Env::new().await;
    let untrusted = MockUpstream::start().await;
    add_provider(env.db(), env.org.id, "untrusted", &untrusted.base_url).await;
    let resp = env.chat(&body("untrusted/m", &["mycompany/m"])).await;
    assert_eq!(resp.status(), 502);
    let v: Value = resp.json_value().await;
    assert!(
        v["error"]["message"]
            .as_str()
            .is_some_and(|m| m.contains("certificate")),
        "{v}"
    );
    assert!(untrusted.seen().is_empty());
    assert!(
        env.upstream.seen().is_empty(),
        "fell back after a TLS failure"
    );
    env.stop().await;
}

#[tokio::test]
async fn a_stream_broken_after_its_first_chunk_is_not_retried() {
    let env = Env::new().await;
    let backup = MockUpstream::start_with_ca(env.upstream.ca.clone()).await;
    add_provider(env.db(), env.org.id, "backup", &backup.base_url).await;
    let resp = env
        .chat(&json!({"model": "mycompany/reset-after-1", "stream": true,
                      "models": ["backup/m"], "messages": messages()}))
        .await;
    assert_eq!(resp.status(), 200);
    let text = resp.text().await.unwrap();
    assert!(text.contains("tok0 "), "{text}");
    assert!(text.contains("upstream_stream_error"), "{text}");
    assert!(backup.seen().is_empty(), "retried after the first byte");
    env.stop().await;
}

#[tokio::test]
async fn fallbacks_are_checked_before_the_first_attempt() {
    let env = Env::new().await;
    for (models, status, code) in [
        (json!("mycompany/x"), 400, "invalid_model"),
        (json!(["nothing"]), 400, "invalid_model"),
        (json!(["nosuch/x"]), 404, "model_not_found"),
    ] {
        let resp = env
            .chat(&json!({"model": "mycompany/m", "models": models, "messages": messages()}))
            .await;
        let (_, c) = openai_error(resp, status).await;
        assert_eq!(c, code, "{models}");
    }
    assert!(env.upstream.seen().is_empty());
    // Without `models` nothing changes: no header.
    let resp = env
        .chat(&json!({"model": "mycompany/m", "messages": messages()}))
        .await;
    assert_eq!(resp.status(), 200);
    assert!(resp.headers().get("x-llmgw-model").is_none());
    env.stop().await;
}
