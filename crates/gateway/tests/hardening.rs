//! Attacks from the red-team review, each as a client would make it: a
//! `stream` that is not a boolean, an SSE answer to a non-stream request,
//! an upstream error that echoes the provider's token, TLS and SSRF errors
//! probed for addresses, and `/metrics` on the public port.

mod common;

use std::time::Duration;

use common::*;
use serde_json::{json, Value};
use storage::domain::{BaseUrl, ProviderName};
use storage::secrets::ProviderToken;
use storage::Actor;
use testkit::{MockUpstream, TestDb};

#[tokio::test]
async fn stream_that_is_not_a_boolean_is_400_and_never_reaches_the_upstream() {
    let env = Env::new().await;
    for stream in [
        json!("true"),
        json!(1),
        json!("false"),
        json!({}),
        json!([true]),
    ] {
        let resp = env
            .chat(&json!({"model": "mycompany/m", "messages": messages(), "stream": stream}))
            .await;
        assert_eq!(resp.status(), 400, "{stream}");
        let v: Value = resp.json_value().await;
        assert_eq!(v["error"]["param"], "stream", "{v}");
        assert_eq!(v["error"]["type"], "invalid_request_error");
        assert_eq!(v["error"]["code"], "invalid_type");
    }
    assert!(env.upstream.seen().is_empty());
    for stream in [json!(null), json!(false)] {
        let resp = env
            .chat(&json!({"model": "mycompany/m", "messages": messages(), "stream": stream}))
            .await;
        assert_eq!(resp.status(), 200, "{stream}");
    }
    let rows = env.rows().await;
    assert_eq!(rows.iter().filter(|r| r.status_code == 400).count(), 5);
    assert!(rows
        .iter()
        .all(|r| r.requested_model.as_deref() == Some("mycompany/m")));
    env.stop().await;
}

#[tokio::test]
async fn sse_answer_to_a_non_stream_request_is_relayed_as_a_stream_with_its_usage() {
    let env = Env::new().await;
    let resp = env
        .chat(&json!({"model": "mycompany/sse-always", "messages": messages()}))
        .await;
    assert_eq!(resp.status(), 200);
    assert!(resp.headers()["content-type"]
        .to_str()
        .unwrap()
        .starts_with("text/event-stream"));
    let text = resp.text().await.unwrap();
    assert!(text.starts_with("data: "), "{text}");
    assert!(text.trim_end().ends_with("data: [DONE]"), "{text}");
    let rows = env.rows().await;
    assert_eq!(rows.len(), 1);
    assert!(rows[0].streamed, "the row says streamed");
    assert_eq!(rows[0].completion_tokens, Some(5));
    assert!(rows[0].total_tokens.is_some());
    env.stop().await;
}

#[tokio::test]
async fn an_upstream_error_that_echoes_the_token_reaches_the_client_redacted() {
    let env = Env::new().await;
    let slashed = "sk-live/with/slashes-0123456789";
    env.db()
        .create_provider_key(
            env.org.id,
            Actor(None),
            &ProviderName::parse("slashed").unwrap(),
            &BaseUrl::parse(&env.upstream.base_url).unwrap(),
            &ProviderToken::parse(slashed).unwrap(),
        )
        .await
        .unwrap();
    for (model, token) in [
        ("mycompany/echo-token", TOKEN),
        ("slashed/echo-token", slashed),
    ] {
        let resp = env
            .chat(&json!({"model": model, "messages": messages()}))
            .await;
        assert_eq!(resp.status(), 401, "{model}");
        let text = resp.text().await.unwrap();
        assert!(!text.contains(token), "{model}: {text}");
        assert!(
            !text.contains(&token.replace('/', "\\/")),
            "{model}: {text}"
        );
        let v: Value = serde_json::from_str(&text).expect("still JSON");
        assert_eq!(
            v["error"]["message"], "Incorrect API key provided: [redacted]",
            "{text}"
        );
        assert_eq!(v["error"]["param"], "[redacted]", "{text}");
    }
    // The upstream really did echo them: the test attacks something.
    assert_eq!(env.upstream.seen().len(), 2);
    env.stop().await;
}

#[tokio::test]
async fn every_gateway_response_says_nosniff() {
    let env = Env::new().await;
    let check = |resp: &reqwest::Response, what: &str| {
        assert_eq!(
            resp.headers()
                .get("x-content-type-options")
                .map(|v| v.to_str().unwrap()),
            Some("nosniff"),
            "{what}"
        );
    };
    for (model, stream) in [
        ("mycompany/m", false),
        ("mycompany/m", true),
        ("mycompany/status-500", false),
        ("nosuch/m", false),
    ] {
        let resp = env
            .chat(&json!({"model": model, "messages": messages(), "stream": stream}))
            .await;
        check(&resp, model);
    }
    for path in ["/healthz", "/readyz", "/metrics", "/v1/models", "/nowhere"] {
        let resp = env
            .http
            .get(format!("{}{path}", env.url))
            .bearer_auth(&env.org.key)
            .send()
            .await
            .unwrap();
        check(&resp, path);
    }
    let resp = env.chat_with_key("llmgw_wrong", &json!({})).await;
    check(&resp, "bad key");
    env.stop().await;
}

#[tokio::test]
async fn untrusted_certificate_502_gives_the_ca_hint_and_no_cause_chain() {
    let env = Env::new().await;
    let (_stranger, msg, code) = chat_to_untrusted_upstream(&env).await;
    assert_eq!(code, "upstream_tls_error");
    assert_eq!(
        msg,
        "could not reach the provider `stranger`: TLS failure: certificate not trusted — set LLMGW_UPSTREAM_CA_FILE for an internal CA"
    );
    env.stop().await;
}

#[tokio::test]
async fn connect_time_refusals_and_failures_name_no_address() {
    let env = Env::with(Opts {
        allow_private: false,
        ..Opts::default()
    })
    .await;
    add_provider(env.db(), env.org.id, "byname", "https://localhost:9").await;
    add_provider(
        env.db(),
        env.org.id,
        "teredo",
        "https://[2001:0:4136:e378::1]",
    )
    .await;
    add_provider(
        env.db(),
        env.org.id,
        "nowhere",
        "https://llm.does-not-exist.invalid",
    )
    .await;
    for (model, expected) in [
        (
            "byname/x",
            "address not allowed — set LLMGW_UPSTREAM_ALLOW_PRIVATE=true",
        ),
        (
            "teredo/x",
            "address not allowed — set LLMGW_UPSTREAM_ALLOW_PRIVATE=true",
        ),
        (
            "nowhere/x",
            "name does not resolve — check the host name in base_url",
        ),
    ] {
        let (msg, _) = openai_error(
            env.chat(&json!({"model": model, "messages": messages()}))
                .await,
            502,
        )
        .await;
        assert!(msg.contains(expected), "{model}: {msg}");
        for leak in [
            "127.0.0.1",
            "::1",
            "2001:0",
            "localhost",
            "does-not-exist",
            "dns",
        ] {
            assert!(!msg.contains(leak), "{model}: {msg}");
        }
    }
    env.stop().await;
}

#[tokio::test]
async fn rows_of_unroutable_requests_keep_the_requested_model() {
    let env = Env::new().await;
    for (model, status) in [("gpt-4", 400), ("nosuch/llama", 404), ("Bad-Name/x", 404)] {
        let resp = env
            .chat(&json!({"model": model, "messages": messages()}))
            .await;
        assert_eq!(resp.status(), status, "{model}");
    }
    let rows = env.rows().await;
    let mut got: Vec<(Option<String>, i16)> = rows
        .iter()
        .map(|r| (r.requested_model.clone(), r.status_code))
        .collect();
    got.sort();
    assert_eq!(
        got,
        [
            (Some("Bad-Name/x".to_owned()), 404),
            (Some("gpt-4".to_owned()), 400),
            (Some("nosuch/llama".to_owned()), 404),
        ]
    );
    env.stop().await;
}

#[tokio::test]
async fn metrics_on_their_own_listener_are_404_on_the_gateway_port() {
    let tdb = TestDb::new().await;
    let org = make_org(&tdb.db).await;
    let upstream = MockUpstream::start().await;
    add_provider(&tdb.db, org.id, "mycompany", &upstream.base_url).await;
    let mut cfg = config(&upstream.ca.ca_file, true, Duration::from_secs(10));
    cfg.metrics_on_gateway = false;
    let gw = gateway::Gateway::start(tdb.db.clone(), cfg).await;
    let (url, server) = serve(&gw);
    let g = gw.clone();
    let (metrics_url, metrics_server) = testkit::spawn_http(move |c| g.configure_metrics(c));
    let http = reqwest::Client::new();
    let resp = http
        .post(format!("{url}/v1/chat/completions"))
        .bearer_auth(&org.key)
        .json_body(&json!({"model": "mycompany/m", "messages": messages()}))
        .send()
        .await
        .unwrap();
    assert_eq!(resp.status(), 200);
    let (_, code) = openai_error(
        http.get(format!("{url}/metrics")).send().await.unwrap(),
        404,
    )
    .await;
    assert_eq!(code, "unknown_url");
    let resp = http
        .get(format!("{metrics_url}/metrics"))
        .send()
        .await
        .unwrap();
    assert_eq!(resp.status(), 200);
    assert_eq!(resp.headers()["x-content-type-options"], "nosniff");
    let text = resp.text().await.unwrap();
    assert!(
        text.contains("llmgw_gateway_requests_total{status=\"200\"} 1"),
        "{text}"
    );
    // Only /metrics there: the proxy is not reachable on the metrics port.
    let resp = http
        .post(format!("{metrics_url}/v1/chat/completions"))
        .bearer_auth(&org.key)
        .json_body(&json!({"model": "mycompany/m", "messages": messages()}))
        .send()
        .await
        .unwrap();
    assert_eq!(resp.status(), 404);
    gw.shutdown().await;
    server.stop(false).await;
    metrics_server.stop(false).await;
}
