//! Usage counted on every stream: the gateway asks for
//! `stream_options.include_usage` when the client did not, records the
//! usage and withholds it, so the client gets the stream it asked for.

mod common;

use common::*;
use serde_json::{json, Value};

/// The `data:` payloads of an SSE body, JSON parsed (`[DONE]` kept as a string).
fn events(text: &str) -> Vec<Value> {
    text.split("\n\n")
        .filter_map(|e| e.trim().strip_prefix("data: "))
        .map(|d| serde_json::from_str(d).unwrap_or_else(|_| Value::String(d.to_owned())))
        .collect()
}

/// The same request sent to the mock directly, so nothing edits it.
async fn direct(env: &Env, body: &Value) -> Vec<Value> {
    let ca = reqwest::Certificate::from_pem(env.upstream.ca.ca_pem.as_bytes()).unwrap();
    let http = reqwest::Client::builder()
        .add_root_certificate(ca)
        .build()
        .unwrap();
    let resp = http
        .post(format!("{}/v1/chat/completions", env.upstream.base_url))
        .json_body(body)
        .send()
        .await
        .unwrap();
    assert_eq!(resp.status(), 200);
    events(&resp.text().await.unwrap())
}

fn count(hay: &[u8], needle: &[u8]) -> usize {
    hay.windows(needle.len()).filter(|w| *w == needle).count()
}

async fn withheld_usage_is_recorded(upstream_model: &str) {
    let env = Env::new().await;
    let asked = json!({"model": format!("mycompany/{upstream_model}"), "stream": true, "messages": messages()});
    let resp = env.chat(&asked).await;
    assert_eq!(resp.status(), 200);
    let got = events(&resp.text().await.unwrap());
    let plain = json!({"model": upstream_model, "stream": true, "messages": messages()});
    let want = direct(&env, &plain).await;
    assert_eq!(
        got, want,
        "the client's events are those of the unedited request"
    );
    assert!(
        got.iter().all(|e| e.get("usage").is_none()),
        "no usage reaches the client: {got:?}"
    );
    let seen = env.upstream.seen();
    assert_eq!(seen[0].json()["stream_options"]["include_usage"], true);
    assert_eq!(count(&seen[0].body, b"stream_options"), 1);
    let rows = env.rows().await;
    assert_eq!(rows.len(), 1);
    assert_eq!(rows[0].status_code, 200);
    assert!(rows[0].error_class.is_none(), "{:?}", rows[0].error_class);
    assert_eq!(rows[0].completion_tokens, Some(5));
    let prompt = rows[0].prompt_tokens.expect("prompt tokens recorded");
    assert_eq!(rows[0].total_tokens, Some(prompt + 5));
    env.stop().await;
}

#[tokio::test]
async fn openai_style_stream_without_include_usage_is_counted_and_the_usage_withheld() {
    withheld_usage_is_recorded("oai").await;
}

#[tokio::test]
async fn llamacpp_style_usage_on_the_last_content_chunk_is_counted_and_cut_from_it() {
    withheld_usage_is_recorded("llamacpp").await;
}

#[tokio::test]
async fn a_client_that_asked_for_usage_gets_the_usage_chunk_and_its_body_unchanged() {
    let env = Env::new().await;
    let asked = json!({"model": "mycompany/oai", "stream": true,
        "stream_options": {"include_usage": true}, "messages": messages()});
    let got = events(&env.chat(&asked).await.text().await.unwrap());
    let mut plain = asked.clone();
    plain["model"] = json!("oai");
    assert_eq!(got, direct(&env, &plain).await);
    let usage = got
        .iter()
        .find_map(|e| e.get("usage").filter(|u| !u.is_null()))
        .expect("the usage chunk reaches the client");
    let seen = env.upstream.seen();
    assert_eq!(count(&seen[0].body, b"stream_options"), 1);
    let rows = env.rows().await;
    assert_eq!(rows[0].total_tokens, usage["total_tokens"].as_i64());
    env.stop().await;
}

#[tokio::test]
async fn an_existing_stream_options_object_is_edited_in_place() {
    let env = Env::new().await;
    let asked = json!({"model": "mycompany/oai", "stream": true,
        "stream_options": {"include_usage": false, "vendor_x": 1}, "messages": messages()});
    let got = events(&env.chat(&asked).await.text().await.unwrap());
    assert!(got.iter().all(|e| e.get("usage").is_none()), "{got:?}");
    let seen = env.upstream.seen();
    assert_eq!(count(&seen[0].body, b"stream_options"), 1);
    let sent = seen[0].json();
    assert_eq!(
        sent["stream_options"],
        json!({"include_usage": true, "vendor_x": 1})
    );
    let rows = env.rows().await;
    assert_eq!(rows[0].completion_tokens, Some(5));
    env.stop().await;
}

#[tokio::test]
async fn a_provider_refusing_stream_options_is_asked_again_without_once_and_remembered() {
    let env = Env::new().await;
    let asked = json!({"model": "mycompany/strict", "stream": true, "messages": messages()});
    for _ in 0..2 {
        let resp = env.chat(&asked).await;
        assert_eq!(resp.status(), 200);
        let got = events(&resp.text().await.unwrap());
        assert_eq!(got.last(), Some(&json!("[DONE]")), "{got:?}");
    }
    let seen = env.upstream.seen();
    let with: Vec<bool> = seen
        .iter()
        .map(|s| s.json().get("stream_options").is_some())
        .collect();
    assert_eq!(
        with,
        [true, false, false],
        "asked once with the field, then without it, and not again"
    );
    let rows = env.rows().await;
    assert_eq!(rows.len(), 2);
    assert!(rows
        .iter()
        .all(|r| r.status_code == 200 && r.error_class.is_none()));
    env.stop().await;
}
