//! Every JSON endpoint of DESIGN's table, routed like chat completions:
//! `{customName}/{modelName}`, the provider's token, the same path upstream,
//! and one usage row naming its endpoint, with the tokens its API reports.

mod common;

use common::*;
use serde_json::{json, Value};

type Tokens = (Option<i64>, Option<i64>, Option<i64>);

async fn post(env: &Env, path: &str, body: &Value) -> reqwest::Response {
    env.http
        .post(format!("{}/v1/{path}", env.url))
        .bearer_auth(&env.org.key)
        .json_body(body)
        .send()
        .await
        .unwrap()
}

/// Sends `body` to `path`; checks what the upstream got and the row; returns the answer.
async fn routed(path: &str, body: Value, want: Tokens) -> String {
    let env = Env::new().await;
    let resp = post(&env, path, &body).await;
    assert_eq!(resp.status(), 200, "{path}");
    assert!(resp.headers().contains_key("x-request-id"));
    let answer = resp.text().await.unwrap();
    let seen = env.upstream.seen();
    assert_eq!(seen.len(), 1);
    assert_eq!(seen[0].path, format!("/v1/{path}"));
    assert_eq!(
        seen[0].header("authorization"),
        Some(format!("Bearer {TOKEN}").as_str())
    );
    let mut expected = body.clone();
    expected["model"] = json!(body["model"].as_str().unwrap().split_once('/').unwrap().1);
    assert_eq!(seen[0].json(), expected, "only the model is rewritten");
    let rows = env.rows().await;
    assert_eq!(rows.len(), 1);
    let r = &rows[0];
    assert_eq!(r.status_code, 200);
    assert!(r.error_class.is_none(), "{:?}", r.error_class);
    assert_eq!(
        (r.prompt_tokens, r.completion_tokens, r.total_tokens),
        want,
        "{path}"
    );
    let endpoint: Option<String> =
        sqlx::query_scalar("SELECT endpoint FROM request_logs WHERE org_id = $1")
            .bind(env.org.id)
            .fetch_one(env.db().pool())
            .await
            .unwrap();
    assert_eq!(endpoint.as_deref(), Some(path));
    env.stop().await;
    answer
}

#[tokio::test]
async fn completions_are_routed_and_counted() {
    let body =
        json!({"model": "mycompany/gpt-3.5-turbo-instruct", "prompt": "say hi", "max_tokens": 3});
    routed("completions", body, (Some(4), Some(1), Some(5))).await;
}

#[tokio::test]
async fn embeddings_are_routed_and_counted() {
    let body = json!({"model": "mycompany/text-embedding-3-small", "input": ["a", "b"], "encoding_format": "float"});
    let answer = routed("embeddings", body, (Some(6), None, Some(6))).await;
    assert!(answer.contains("\"embedding\""), "{answer}");
}

#[tokio::test]
async fn moderations_are_routed_without_usage() {
    let body = json!({"model": "mycompany/omni-moderation-latest", "input": "hello"});
    routed("moderations", body, (None, None, None)).await;
}

#[tokio::test]
async fn rerank_is_routed_and_its_usage_kept_when_sent() {
    let body = json!({"model": "mycompany/BAAI/bge-reranker-v2-m3", "query": "q", "documents": ["a", "b"]});
    routed("rerank", body, (None, None, Some(9))).await;
}

#[tokio::test]
async fn image_generations_are_routed_and_their_usage_counted() {
    let body = json!({"model": "mycompany/gpt-image-1", "prompt": "a cat", "n": 1});
    routed("images/generations", body, (Some(7), Some(100), Some(107))).await;
}

#[tokio::test]
async fn responses_are_routed_and_input_output_tokens_counted() {
    let body = json!({"model": "mycompany/gpt-4.1", "input": "hi", "store": false});
    routed("responses", body, (Some(8), Some(3), Some(11))).await;
}

#[tokio::test]
async fn streamed_responses_are_counted_from_response_completed() {
    let body = json!({"model": "mycompany/gpt-4.1", "input": "hi", "stream": true});
    let answer = routed("responses", body, (Some(8), Some(3), Some(11))).await;
    // Nothing is withheld from a Responses stream: its usage is part of the API.
    assert!(answer.contains("event: response.completed"), "{answer}");
    assert!(answer.contains("\"input_tokens\":8"), "{answer}");
}

#[tokio::test]
async fn chat_rows_name_their_endpoint_and_unknown_paths_stay_404() {
    let env = Env::new().await;
    let resp = env
        .chat(&json!({"model": "mycompany/m", "messages": messages()}))
        .await;
    assert_eq!(resp.status(), 200);
    let resp = post(&env, "audio/speech/nope", &json!({"model": "mycompany/m"})).await;
    let (_, code) = openai_error(resp, 404).await;
    assert_eq!(code, "unknown_url");
    env.gw.shutdown().await;
    let endpoints: Vec<Option<String>> =
        sqlx::query_scalar("SELECT endpoint FROM request_logs WHERE org_id = $1")
            .bind(env.org.id)
            .fetch_all(env.db().pool())
            .await
            .unwrap();
    assert_eq!(endpoints, [Some("chat/completions".to_owned())]);
    env.stop().await;
}
