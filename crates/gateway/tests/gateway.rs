//! The gateway against a real PostgreSQL and real HTTPS upstreams on 127.0.0.1.

mod common;

use std::time::{Duration, Instant};

use common::*;
use gateway::Gateway;
use serde_json::{json, Value};
use storage::Actor;
use uuid::Uuid;

#[tokio::test]
async fn non_stream_round_trip_rewrites_only_the_model_and_credentials() {
    let env = Env::new().await;
    // Field order, spacing, numbers and unknown vendor fields must reach the upstream as sent.
    let body = r#"{"zeta":1,"model" : "mycompany/meta-llama/Llama-3-8B","messages":[{"role":"user","content":"hi \u00e9"}],"tools":[{"type":"function","function":{"name":"f","parameters":{}}}],"response_format":{"type":"json_object"},"temperature":0.50,"vendor_x":{"a":[1,2.50,null]}}"#;
    let resp = env
        .http
        .post(format!("{}/v1/chat/completions", env.url))
        .header("authorization", format!("Bearer {}", env.org.key))
        .header("x-api-key", &env.org.key)
        .header("cookie", "session=abc")
        .header("content-type", "application/json")
        .body(body)
        .send()
        .await
        .unwrap();
    assert_eq!(resp.status(), 200);
    assert!(resp.headers().contains_key("x-request-id"));
    let answer: Value = resp.json_value().await;
    assert_eq!(answer["model"], "meta-llama/Llama-3-8B");

    let seen = env.upstream.seen();
    assert_eq!(seen.len(), 1);
    let s = &seen[0];
    assert_eq!(s.path, "/v1/chat/completions");
    assert_eq!(
        s.header("authorization"),
        Some(format!("Bearer {TOKEN}").as_str())
    );
    assert_eq!(s.header("x-api-key"), None);
    assert_eq!(s.header("cookie"), None);
    let expected = body.replace("\"mycompany/meta-llama/", "\"meta-llama/");
    assert_eq!(std::str::from_utf8(&s.body).unwrap(), expected);

    let rows = env.rows().await;
    assert_eq!(rows.len(), 1);
    let r = &rows[0];
    assert_eq!(r.status_code, 200);
    assert_eq!(r.api_key_id, Some(env.org.key_id));
    assert_eq!(r.provider_name.as_deref(), Some("mycompany"));
    assert_eq!(
        r.requested_model.as_deref(),
        Some("mycompany/meta-llama/Llama-3-8B")
    );
    assert_eq!(r.upstream_model.as_deref(), Some("meta-llama/Llama-3-8B"));
    assert!(!r.streamed && !r.canceled);
    assert_eq!(r.prompt_tokens, answer["usage"]["prompt_tokens"].as_i64());
    assert_eq!(r.completion_tokens, Some(5));
    assert_eq!(r.total_tokens, answer["usage"]["total_tokens"].as_i64());
    assert!(r.ttfb_ms.is_some() && r.error_class.is_none());
    let last_used: Option<chrono::DateTime<chrono::Utc>> =
        sqlx::query_scalar("SELECT last_used_at FROM api_keys WHERE id = $1")
            .bind(env.org.key_id)
            .fetch_one(env.db().pool())
            .await
            .unwrap();
    assert!(last_used.is_some(), "last_used_at recorded");
    env.stop().await;
}

#[tokio::test]
async fn x_api_key_header_and_client_request_id_are_accepted() {
    let env = Env::new().await;
    let resp = env
        .http
        .post(format!("{}/v1/chat/completions", env.url))
        .header("x-api-key", &env.org.key)
        .header("x-request-id", "client-req-42")
        .json_body(&json!({"model": "mycompany/m", "messages": messages()}))
        .send()
        .await
        .unwrap();
    assert_eq!(resp.status(), 200);
    assert_eq!(resp.headers()["x-request-id"], "client-req-42");
    assert_eq!(env.upstream.seen()[0].header("x-api-key"), None);
    // An unreasonable id is replaced by a fresh one.
    let resp = env
        .http
        .get(format!("{}/healthz", env.url))
        .header("x-request-id", "bad id\twith junk")
        .send()
        .await
        .unwrap();
    let id = resp.headers()["x-request-id"].to_str().unwrap();
    assert!(Uuid::parse_str(id).is_ok(), "{id}");
    let rows = env.rows().await;
    assert_eq!(rows[0].request_id, "client-req-42");
    env.stop().await;
}

#[tokio::test]
async fn stream_round_trip_relays_sse_and_logs_usage() {
    let env = Env::new().await;
    let resp = env
        .chat(
            &json!({"model": "mycompany/meta-llama/Llama-3-8B", "stream": true,
            "stream_options": {"include_usage": true}, "messages": messages()}),
        )
        .await;
    assert_eq!(resp.status(), 200);
    assert!(resp.headers()["content-type"]
        .to_str()
        .unwrap()
        .starts_with("text/event-stream"));
    let text = resp.text().await.unwrap();
    assert!(
        text.contains("tok1 ") && text.trim_end().ends_with("data: [DONE]"),
        "{text}"
    );
    let usage_line = text.lines().find(|l| l.contains("\"usage\"")).unwrap();
    let usage: Value = serde_json::from_str(usage_line.trim_start_matches("data: ")).unwrap();
    let seen = env.upstream.seen();
    assert_eq!(seen[0].json()["model"], "meta-llama/Llama-3-8B");
    assert_eq!(seen[0].json()["stream"], true);
    let rows = env.rows().await;
    assert_eq!(rows.len(), 1);
    assert!(rows[0].streamed && !rows[0].canceled);
    assert_eq!(rows[0].status_code, 200);
    assert_eq!(
        rows[0].prompt_tokens,
        usage["usage"]["prompt_tokens"].as_i64()
    );
    assert_eq!(
        rows[0].total_tokens,
        usage["usage"]["total_tokens"].as_i64()
    );
    env.stop().await;
}

#[tokio::test]
async fn base_url_path_prefix_is_honoured() {
    let env = Env::new().await;
    add_provider(
        env.db(),
        env.org.id,
        "prefixed",
        &format!("{}/serving/openai", env.upstream.base_url),
    )
    .await;
    let resp = env
        .chat(&json!({"model": "prefixed/llama", "messages": messages()}))
        .await;
    assert_eq!(resp.status(), 200);
    assert_eq!(
        env.upstream.seen()[0].path,
        "/serving/openai/v1/chat/completions"
    );
    env.stop().await;
}

#[tokio::test]
async fn routing_and_key_errors_speak_openai() {
    let env = Env::with(Opts {
        max_body_bytes: 4096,
        ..Opts::default()
    })
    .await;
    let inactive = add_provider(env.db(), env.org.id, "sleepy", &env.upstream.base_url).await;
    deactivate(env.db(), env.org.id, inactive).await;

    let (msg, code) = openai_error(
        env.chat(&json!({"model": "nosuch/x", "messages": messages()}))
            .await,
        404,
    )
    .await;
    assert_eq!(code, "model_not_found");
    assert!(msg.contains("nosuch"), "{msg}");
    let (_, code) = openai_error(
        env.chat(&json!({"model": "sleepy/x", "messages": messages()}))
            .await,
        403,
    )
    .await;
    assert_eq!(code, "provider_inactive");
    let (msg, _) = openai_error(
        env.chat(&json!({"model": "gpt-4", "messages": messages()}))
            .await,
        400,
    )
    .await;
    assert!(msg.contains("{customName}/{modelName}"), "{msg}");
    openai_error(env.chat(&json!({"messages": messages()})).await, 400).await;
    openai_error(env.chat(&json!({"model": 7})).await, 400).await;
    let bad_json = env
        .http
        .post(format!("{}/v1/chat/completions", env.url))
        .bearer_auth(&env.org.key)
        .body("{\"model\": \"mycompany/x\",")
        .send()
        .await
        .unwrap();
    openai_error(bad_json, 400).await;
    let big = json!({"model": "mycompany/x", "messages": [{"role": "user", "content": "x".repeat(5000)}]});
    let (_, code) = openai_error(env.chat(&big).await, 413).await;
    assert_eq!(code, "request_too_large");

    let (_, code) = openai_error(
        env.chat_with_key(
            "llmgw_notarealkey000000000000000",
            &json!({"model": "mycompany/x"}),
        )
        .await,
        401,
    )
    .await;
    assert_eq!(code, "invalid_api_key");
    openai_error(
        env.chat_with_key("garbage", &json!({"model": "mycompany/x"}))
            .await,
        401,
    )
    .await;
    let no_key = env
        .http
        .post(format!("{}/v1/chat/completions", env.url))
        .json_body(&json!({"model": "mycompany/x"}))
        .send()
        .await
        .unwrap();
    openai_error(no_key, 401).await;
    openai_error(
        env.http
            .get(format!("{}/v1/nothing", env.url))
            .send()
            .await
            .unwrap(),
        404,
    )
    .await;
    assert!(
        env.upstream.seen().is_empty(),
        "nothing reached the upstream"
    );

    // Authenticated requests are logged even when refused.
    let rows = env.rows().await;
    assert_eq!(rows.len(), 7, "{rows:#?}");
    assert!(rows
        .iter()
        .any(|r| r.status_code == 404 && r.error_class.as_deref() == Some("model_not_found")));
    env.stop().await;
}

#[tokio::test]
async fn revocation_reaches_two_gateways_within_a_second() {
    let env = Env::new().await;
    let second = Gateway::start(
        env.db().clone(),
        config(&env.upstream.ca.ca_file, true, Duration::from_secs(10)),
    )
    .await;
    let (url2, server2) = serve(&second);
    let body = json!({"model": "mycompany/m", "messages": messages()});
    let call = |url: String| {
        let http = env.http.clone();
        let key = env.org.key.clone();
        let body = body.clone();
        async move {
            http.post(format!("{url}/v1/chat/completions"))
                .bearer_auth(key)
                .json_body(&body)
                .send()
                .await
                .unwrap()
                .status()
                .as_u16()
        }
    };
    // Both have the key cached.
    assert_eq!(call(env.url.clone()).await, 200);
    assert_eq!(call(url2.clone()).await, 200);

    env.db()
        .revoke_api_key(env.org.id, Actor(None), env.org.key_id)
        .await
        .unwrap();
    let revoked = Instant::now();
    for url in [env.url.clone(), url2.clone()] {
        loop {
            let status = call(url.clone()).await;
            if status == 401 {
                break;
            }
            assert_eq!(status, 200);
            assert!(
                revoked.elapsed() < Duration::from_secs(1),
                "{url} still accepts a revoked key"
            );
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }
    assert!(revoked.elapsed() < Duration::from_secs(1));
    let resp = env
        .http
        .post(format!("{url2}/v1/chat/completions"))
        .bearer_auth(&env.org.key)
        .json_body(&body)
        .send()
        .await
        .unwrap();
    let (msg, _) = openai_error(resp, 401).await;
    assert!(msg.contains("revoked"), "{msg}");
    second.shutdown().await;
    server2.stop(false).await;
    env.stop().await;
}

#[tokio::test]
async fn upstream_error_statuses_pass_through_unchanged() {
    let env = Env::new().await;
    for code in [400u16, 429, 500] {
        let resp = env
            .chat(&json!({"model": format!("mycompany/status-{code}"), "messages": messages()}))
            .await;
        assert_eq!(resp.status().as_u16(), code);
        assert!(resp.headers()["content-type"]
            .to_str()
            .unwrap()
            .starts_with("application/json"));
        let body: Value = resp.json_value().await;
        assert_eq!(
            body,
            json!({"error": {"message": format!("upstream says {code}"), "type": "upstream_error", "code": code}})
        );
    }
    let rows = env.rows().await;
    let mut statuses: Vec<i16> = rows.iter().map(|r| r.status_code).collect();
    statuses.sort();
    assert_eq!(statuses, vec![400, 429, 500]);
    env.stop().await;
}

#[tokio::test]
async fn unreachable_upstream_is_502() {
    let env = Env::new().await;
    add_closed_port_provider(&env, "closed").await;
    let (msg, code) = openai_error(
        env.chat(&json!({"model": "closed/x", "messages": messages()}))
            .await,
        502,
    )
    .await;
    assert_eq!(code, "upstream_unreachable");
    assert!(msg.contains("closed"), "{msg}");
    env.stop().await;
}

#[tokio::test]
async fn untrusted_certificate_is_502() {
    let env = Env::new().await;
    let (stranger, msg, code) = chat_to_untrusted_upstream(&env).await;
    assert_eq!(code, "upstream_tls_error");
    assert!(msg.to_lowercase().contains("certificate"), "{msg}");
    assert!(stranger.seen().is_empty());
    env.stop().await;
}

#[tokio::test]
async fn slow_upstream_is_504() {
    let env = Env::with(Opts {
        timeout: Duration::from_secs(1),
        ..Opts::default()
    })
    .await;
    let started = Instant::now();
    let (_, code) = openai_error(
        env.chat(&json!({"model": "mycompany/sleep-3000", "messages": messages()}))
            .await,
        504,
    )
    .await;
    assert_eq!(code, "upstream_timeout");
    assert!(
        started.elapsed() < Duration::from_millis(2500),
        "{:?}",
        started.elapsed()
    );
    let rows = env.rows().await;
    assert_eq!(rows[0].status_code, 504);
    assert_eq!(rows[0].error_class.as_deref(), Some("upstream_timeout"));
    env.stop().await;
}

#[tokio::test]
async fn private_addresses_are_refused_at_connect_time_by_default() {
    let env = Env::with(Opts {
        allow_private: false,
        ..Opts::default()
    })
    .await;
    // Inserted directly: the settings API would refuse them at save time.
    let port = env.upstream.port;
    add_provider(
        env.db(),
        env.org.id,
        "byname",
        &format!("https://localhost:{port}"),
    )
    .await;
    add_provider(
        env.db(),
        env.org.id,
        "byliteral",
        &format!("https://127.0.0.1:{port}"),
    )
    .await;
    for model in ["byname/x", "byliteral/x", "mycompany/x"] {
        let (msg, code) = openai_error(
            env.chat(&json!({"model": model, "messages": messages()}))
                .await,
            502,
        )
        .await;
        assert_eq!(code, "upstream_address_not_allowed", "{model}");
        assert!(msg.contains("address not allowed"), "{msg}");
        assert!(!msg.contains("127.0.0.1"), "{msg}");
        assert!(msg.contains("LLMGW_UPSTREAM_ALLOW_PRIVATE"), "{msg}");
    }
    assert!(
        env.upstream.seen().is_empty(),
        "no request reached the private upstream"
    );
    env.stop().await;
}

#[tokio::test]
async fn client_disconnect_cancels_the_upstream_stream() {
    let env = Env::new().await;
    let mut resp = env
        .chat(&json!({"model": "mycompany/slowstream-50", "stream": true, "messages": messages()}))
        .await;
    assert_eq!(resp.status(), 200);
    let mut got = Vec::new();
    while got.len() < 3 {
        got.push(resp.chunk().await.unwrap().expect("a chunk"));
    }
    assert!(got
        .iter()
        .any(|c| String::from_utf8_lossy(c).contains("tok")));
    drop(resp);
    let deadline = Instant::now() + Duration::from_secs(5);
    while env.upstream.disconnects() == 0 {
        assert!(
            Instant::now() < deadline,
            "the upstream never saw the stream closed"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    assert_eq!(env.upstream.disconnects(), 1);
    let rows = env.rows().await;
    assert_eq!(rows.len(), 1);
    assert!(rows[0].streamed && rows[0].canceled, "{:?}", rows[0]);
    assert!(rows[0].ttfb_ms.is_some());
    env.stop().await;
}

#[tokio::test]
async fn a_thousand_concurrent_requests_make_a_thousand_rows() {
    let env = Env::new().await;
    let body = json!({"model": "mycompany/meta-llama/Llama-3-8B", "messages": messages()});
    let calls = (0..1000).map(|_| async {
        let resp = env.chat(&body).await;
        assert_eq!(resp.status(), 200);
        let v: Value = resp.json_value().await;
        v["usage"]["prompt_tokens"].as_i64().unwrap()
    });
    let prompts = futures_util::future::join_all(calls).await;
    let rows = env.rows().await;
    assert_eq!(rows.len(), 1000);
    let ids: std::collections::HashSet<_> = rows.iter().map(|r| r.request_id.clone()).collect();
    assert_eq!(ids.len(), 1000, "one row per request");
    for r in &rows {
        assert_eq!(r.status_code, 200);
        assert_eq!(r.prompt_tokens, Some(prompts[0]));
        assert_eq!(r.completion_tokens, Some(5));
        assert_eq!(r.total_tokens, Some(prompts[0] + 5));
    }
    env.stop().await;
}

#[tokio::test]
async fn models_lists_every_active_provider_and_skips_failing_ones() {
    let env = Env::new().await;
    env.upstream.set_models(&["model-a", "model-b"]);
    add_provider(
        env.db(),
        env.org.id,
        "beta",
        &format!("{}/beta", env.upstream.base_url),
    )
    .await;
    add_closed_port_provider(&env, "broken").await;
    let off = add_provider(env.db(), env.org.id, "off", &env.upstream.base_url).await;
    deactivate(env.db(), env.org.id, off).await;
    let resp = env
        .http
        .get(format!("{}/v1/models", env.url))
        .bearer_auth(&env.org.key)
        .send()
        .await
        .unwrap();
    assert_eq!(resp.status(), 200);
    let v: Value = resp.json_value().await;
    assert_eq!(v["object"], "list");
    let mut ids: Vec<&str> = v["data"]
        .as_array()
        .unwrap()
        .iter()
        .map(|m| m["id"].as_str().unwrap())
        .collect();
    ids.sort();
    assert_eq!(
        ids,
        [
            "beta/model-a",
            "beta/model-b",
            "mycompany/model-a",
            "mycompany/model-b"
        ]
    );
    let seen = env.upstream.seen();
    assert!(seen
        .iter()
        .all(|s| s.header("authorization") == Some(format!("Bearer {TOKEN}").as_str())));
    let resp = env
        .http
        .get(format!("{}/v1/models", env.url))
        .send()
        .await
        .unwrap();
    openai_error(resp, 401).await;
    env.stop().await;
}

#[tokio::test]
async fn health_readiness_and_metrics_answer() {
    let env = Env::new().await;
    assert_eq!(
        env.chat(&json!({"model": "mycompany/m", "messages": messages()}))
            .await
            .status(),
        200
    );
    assert_eq!(
        env.chat(&json!({"model": "mycompany/status-500", "messages": messages()}))
            .await
            .status(),
        500
    );
    for path in ["/healthz", "/readyz"] {
        let resp = env
            .http
            .get(format!("{}{path}", env.url))
            .send()
            .await
            .unwrap();
        assert_eq!(resp.status(), 200, "{path}");
        assert!(resp.headers().contains_key("x-request-id"));
    }
    let resp = env
        .http
        .get(format!("{}/metrics", env.url))
        .send()
        .await
        .unwrap();
    assert_eq!(resp.status(), 200);
    assert!(resp.headers()["content-type"]
        .to_str()
        .unwrap()
        .starts_with("text/plain"));
    let text = resp.text().await.unwrap();
    for needle in [
        "llmgw_gateway_requests_total{status=\"200\"} 3",
        "llmgw_gateway_requests_total{status=\"500\"} 1",
        "llmgw_gateway_request_duration_seconds_bucket{le=\"+Inf\"}",
        "llmgw_gateway_upstream_errors_total{kind=\"connect\"} 0",
        "llmgw_gateway_cache_hits_total{cache=\"api_key\"} 1",
        "llmgw_gateway_cache_misses_total{cache=\"api_key\"} 1",
        "llmgw_gateway_usage_queue_depth",
        "llmgw_gateway_usage_rows_dropped_total 0",
        "llmgw_gateway_usage_rows_failed_total 0",
        "llmgw_gateway_cache_listener_connected 1",
    ] {
        assert!(text.contains(needle), "{needle} missing from\n{text}");
    }
    assert!(!text.contains(TOKEN));
    assert!(!format!("{:?}", env.gw).contains(TOKEN));
    env.stop().await;
}

#[tokio::test]
async fn database_down_known_key_still_served_unknown_key_503_and_drops_counted() {
    let env = Env::new().await;
    let body = json!({"model": "mycompany/m", "messages": messages()});
    assert_eq!(env.chat(&body).await.status(), 200);
    let other = env
        .db()
        .create_api_key(env.org.id, Actor(None), "never used", None)
        .await
        .unwrap()
        .1;

    tokio::time::timeout(Duration::from_secs(10), env.db().close())
        .await
        .expect("pool closes");
    assert_eq!(
        env.chat(&body).await.status(),
        200,
        "a cached key needs no database"
    );
    let (msg, code) =
        openai_error(env.chat_with_key(other.expose_secret(), &body).await, 503).await;
    assert_eq!(code, "gateway_unavailable");
    assert!(msg.contains("database"), "{msg}");
    let ready = env
        .http
        .get(format!("{}/readyz", env.url))
        .send()
        .await
        .unwrap();
    assert_eq!(ready.status(), 503);

    env.gw.shutdown().await;
    let text = env.metrics().await;
    let dropped: u64 = text
        .lines()
        .find_map(|l| l.strip_prefix("llmgw_gateway_usage_rows_dropped_total "))
        .unwrap()
        .parse()
        .unwrap();
    let written: u64 = text
        .lines()
        .find_map(|l| l.strip_prefix("llmgw_gateway_usage_rows_written_total "))
        .unwrap()
        .parse()
        .unwrap();
    assert_eq!(
        written + dropped,
        2,
        "every row is written or counted as dropped\n{text}"
    );
    assert!(dropped >= 1);
    env.server.stop(false).await;
}
