//! OpenTelemetry traces: the gateway exports them over OTLP/HTTP to a
//! collector run here (a real HTTP server decoding the OTLP JSON it is
//! sent), continues the client's `traceparent` and passes its own to the
//! upstream, a real HTTPS server.

mod common;

use std::time::Duration;

use common::*;
use gateway::TraceConfig;
use serde_json::json;
use testkit::otlp::{Collector, Span};
use testkit::MockUpstream;

fn tracing_to(url: &str) -> impl FnOnce(&mut gateway::GatewayConfig) {
    let mut t = TraceConfig::new(url.parse().unwrap());
    t.schedule_delay = Duration::from_millis(20);
    t.headers.insert(
        "x-collector-token",
        reqwest::header::HeaderValue::from_static("collector-secret"),
    );
    move |cfg| cfg.traces = Some(t)
}

const TRACE_ID: &str = "4bf92f3577b34da6a3ce929d0e0e4736";
const CLIENT_SPAN: &str = "00f067aa0ba902b7";

/// `00-{trace}-{parent}-{flags}` split.
fn parts(traceparent: &str) -> Vec<&str> {
    let p: Vec<&str> = traceparent.split('-').collect();
    assert_eq!(p.len(), 4, "{traceparent}");
    p
}

#[tokio::test]
async fn a_request_is_one_server_span_continuing_the_clients_trace_and_a_client_span_passed_upstream(
) {
    let (collector, url) = Collector::start().await;
    let env = Env::with_config(Opts::default(), tracing_to(&url)).await;
    let resp = env
        .http
        .post(format!("{}/v1/chat/completions", env.url))
        .bearer_auth(&env.org.key)
        .header("traceparent", format!("00-{TRACE_ID}-{CLIENT_SPAN}-01"))
        .header("tracestate", "vendor=abc")
        .json_body(&json!({"model": "mycompany/gpt-test", "messages": messages()}))
        .send()
        .await
        .unwrap();
    assert_eq!(resp.status(), 200);
    let request_id = resp.headers()["x-request-id"].to_str().unwrap().to_owned();
    let answer = resp.json_value().await;
    let (server, client) = collector.wait_for(1, 1).await;
    let (server, client) = (&server[0], &client[0]);

    // The server span: a child of the client's span, in its trace.
    assert_eq!(server.str("traceId"), TRACE_ID);
    assert_eq!(server.str("parentSpanId"), CLIENT_SPAN);
    assert_eq!(server.service, "llmgw");
    assert_eq!(server.str("name"), "chat gpt-test");
    assert_eq!(server.text("gen_ai.operation.name"), Some("chat"));
    assert_eq!(server.text("gen_ai.provider.name"), Some("mycompany"));
    assert_eq!(server.text("gen_ai.request.model"), Some("gpt-test"));
    assert_eq!(server.text("gen_ai.response.model"), Some("gpt-test"));
    assert_eq!(
        server.int("gen_ai.usage.input_tokens"),
        answer["usage"]["prompt_tokens"].as_i64()
    );
    assert_eq!(server.int("gen_ai.usage.output_tokens"), Some(5));
    assert_eq!(server.int("http.response.status_code"), Some(200));
    assert_eq!(server.text("llmgw.request_id"), Some(request_id.as_str()));
    assert_eq!(
        server.text("llmgw.org_id"),
        Some(env.org.id.to_string().as_str())
    );
    assert_eq!(server.attr("error.type"), None);
    assert_eq!(server.v["status"]["code"], 0);
    let start: u64 = server.str("startTimeUnixNano").parse().unwrap();
    let end: u64 = server.str("endTimeUnixNano").parse().unwrap();
    assert!(start > 0 && end >= start);

    // The client span: the upstream call, a child of the server span.
    assert_eq!(client.str("traceId"), TRACE_ID);
    assert_eq!(client.str("parentSpanId"), server.str("spanId"));
    assert_ne!(client.str("spanId"), server.str("spanId"));
    assert_eq!(client.text("server.address"), Some("127.0.0.1"));
    assert_eq!(
        client.int("server.port"),
        Some(i64::from(env.upstream.port))
    );
    assert_eq!(client.int("http.response.status_code"), Some(200));
    assert_eq!(client.text("gen_ai.request.model"), Some("gpt-test"));

    // The upstream was told the client span as its parent, and the client's tracestate.
    let seen = env.upstream.seen();
    let tp = seen[0]
        .header("traceparent")
        .expect("a traceparent upstream");
    assert_eq!(
        parts(tp),
        vec!["00", TRACE_ID, client.str("spanId"), "01"],
        "{tp}"
    );
    assert_eq!(seen[0].header("tracestate"), Some("vendor=abc"));

    // The collector got the configured headers, and never a secret.
    let posts = collector.posts();
    let (headers, _) = &posts[0];
    let header = |k: &str| {
        headers
            .iter()
            .find(|(n, _)| n == k)
            .map(|(_, v)| v.as_str())
    };
    assert_eq!(header("x-collector-token"), Some("collector-secret"));
    assert_eq!(header("content-type"), Some("application/json"));
    let raw = collector.raw();
    assert!(!raw.contains(&env.org.key) && !raw.contains(TOKEN), "{raw}");
    env.stop().await;
}

#[tokio::test]
async fn a_streams_server_span_ends_with_the_stream_and_carries_its_usage() {
    let (collector, url) = Collector::start().await;
    let env = Env::with_config(Opts::default(), tracing_to(&url)).await;
    let resp = env
        .http
        .post(format!("{}/v1/chat/completions", env.url))
        .bearer_auth(&env.org.key)
        .json_body(
            &json!({"model": "mycompany/gpt-stream", "stream": true, "messages": messages()}),
        )
        .send()
        .await
        .unwrap();
    assert_eq!(resp.status(), 200);
    let text = resp.text().await.unwrap();
    assert!(text.contains("[DONE]"), "{text}");
    let (server, client) = collector.wait_for(1, 1).await;
    let (server, client) = (&server[0], &client[0]);
    // No traceparent from the client: a new trace, the server span its root.
    assert!(server.v.get("parentSpanId").is_none(), "{server:?}");
    assert_eq!(server.str("traceId").len(), 32);
    assert_ne!(server.str("traceId"), "0".repeat(32));
    assert_eq!(
        server.attr("llmgw.streamed"),
        Some(&json!({"boolValue": true}))
    );
    let rows = env.rows().await;
    assert_eq!(
        server.int("gen_ai.usage.input_tokens"),
        rows[0].prompt_tokens
    );
    assert_eq!(server.int("gen_ai.usage.output_tokens"), Some(5));
    assert_eq!(server.text("gen_ai.response.model"), Some("gpt-stream"));
    assert_eq!(client.str("parentSpanId"), server.str("spanId"));
    assert_eq!(client.str("traceId"), server.str("traceId"));
    // The client span covers the stream: it ends with the body, within the server span.
    let end = |s: &Span| s.str("endTimeUnixNano").parse::<u64>().unwrap();
    assert!(end(client) <= end(server));
    let tp = env.upstream.seen()[0]
        .header("traceparent")
        .unwrap()
        .to_owned();
    assert_eq!(
        parts(&tp),
        vec!["00", server.str("traceId"), client.str("spanId"), "01"]
    );
    env.stop().await;
}

#[tokio::test]
async fn each_attempt_and_fallback_is_its_own_client_span() {
    let (collector, url) = Collector::start().await;
    let env = Env::with_config(Opts::default(), tracing_to(&url)).await;
    let backup = MockUpstream::start_with_ca(env.upstream.ca.clone()).await;
    add_provider(env.db(), env.org.id, "backup", &backup.base_url).await;
    let resp = env
        .chat(&json!({"model": "mycompany/status-503", "models": ["backup/m"], "messages": messages()}))
        .await;
    assert_eq!(resp.status(), 200);
    let (server, client) = collector.wait_for(1, 2).await;
    let server = &server[0];
    assert_eq!(server.text("gen_ai.provider.name"), Some("backup"));
    assert_eq!(server.text("gen_ai.request.model"), Some("m"));
    assert_eq!(server.int("llmgw.attempts"), Some(2));
    let failed = client
        .iter()
        .find(|s| s.text("gen_ai.provider.name") == Some("mycompany"))
        .expect("a span for the first attempt");
    let served = client
        .iter()
        .find(|s| s.text("gen_ai.provider.name") == Some("backup"))
        .expect("a span for the fallback");
    assert_eq!(failed.int("http.response.status_code"), Some(503));
    assert_eq!(failed.text("error.type"), Some("503"));
    assert_eq!(failed.v["status"]["code"], 2);
    assert_eq!(
        failed.int("server.port"),
        Some(i64::from(env.upstream.port))
    );
    assert_eq!(served.int("http.response.status_code"), Some(200));
    assert_eq!(served.int("server.port"), Some(i64::from(backup.port)));
    for c in [failed, served] {
        assert_eq!(c.str("parentSpanId"), server.str("spanId"));
        assert_eq!(c.str("traceId"), server.str("traceId"));
    }
    // Each upstream saw its own attempt's span as the parent.
    let parent_of =
        |u: &MockUpstream| parts(u.seen()[0].header("traceparent").unwrap())[2].to_owned();
    assert_eq!(parent_of(&env.upstream), failed.str("spanId"));
    assert_eq!(parent_of(&backup), served.str("spanId"));
    env.stop().await;
}

#[tokio::test]
async fn an_invalid_traceparent_starts_a_new_trace_and_a_refused_key_is_traced() {
    let (collector, url) = Collector::start().await;
    let env = Env::with_config(Opts::default(), tracing_to(&url)).await;
    let resp = env
        .http
        .post(format!("{}/v1/chat/completions", env.url))
        .bearer_auth(&env.org.key)
        .header("traceparent", format!("00-{TRACE_ID}-0000000000000000-01"))
        .json_body(&json!({"model": "mycompany/m", "messages": messages()}))
        .send()
        .await
        .unwrap();
    assert_eq!(resp.status(), 200);
    let wrong_key = env
        .chat_with_key(
            "llmgw-not-a-key",
            &json!({"model": "mycompany/m", "messages": messages()}),
        )
        .await;
    assert_eq!(wrong_key.status(), 401);
    let (server, _) = collector.wait_for(2, 1).await;
    let ok = server
        .iter()
        .find(|s| s.int("http.response.status_code") == Some(200))
        .unwrap();
    assert_ne!(ok.str("traceId"), TRACE_ID);
    assert!(ok.v.get("parentSpanId").is_none());
    let refused = server
        .iter()
        .find(|s| s.int("http.response.status_code") == Some(401))
        .unwrap();
    assert!(refused.text("error.type").is_some(), "{refused:?}");
    assert_eq!(refused.v["status"]["code"], 2);
    assert!(refused.text("llmgw.org_id").is_none());
    let raw = collector.raw();
    assert!(!raw.contains("llmgw-not-a-key"), "{raw}");
    env.stop().await;
}

#[tokio::test]
async fn an_unsampled_parent_is_passed_on_and_nothing_is_exported() {
    let (collector, url) = Collector::start().await;
    let env = Env::with_config(Opts::default(), tracing_to(&url)).await;
    let resp = env
        .http
        .post(format!("{}/v1/chat/completions", env.url))
        .bearer_auth(&env.org.key)
        .header("traceparent", format!("00-{TRACE_ID}-{CLIENT_SPAN}-00"))
        .json_body(&json!({"model": "mycompany/m", "messages": messages()}))
        .send()
        .await
        .unwrap();
    assert_eq!(resp.status(), 200);
    let tp = env.upstream.seen()[0]
        .header("traceparent")
        .unwrap()
        .to_owned();
    let p = parts(&tp);
    assert_eq!((p[1], p[3]), (TRACE_ID, "00"), "{tp}");
    assert_ne!(p[2], CLIENT_SPAN);
    tokio::time::sleep(Duration::from_millis(200)).await;
    assert!(collector.spans().is_empty(), "{}", collector.raw());
    env.stop().await;
}

#[tokio::test]
async fn with_traces_off_no_traceparent_reaches_the_upstream() {
    let env = Env::new().await;
    for traceparent in [None, Some(format!("00-{TRACE_ID}-{CLIENT_SPAN}-01"))] {
        let mut rb = env
            .http
            .post(format!("{}/v1/chat/completions", env.url))
            .bearer_auth(&env.org.key)
            .json_body(&json!({"model": "mycompany/m", "messages": messages()}));
        if let Some(tp) = &traceparent {
            rb = rb
                .header("traceparent", tp)
                .header("tracestate", "vendor=abc");
        }
        assert_eq!(rb.send().await.unwrap().status(), 200);
    }
    let seen = env.upstream.seen();
    assert_eq!(seen.len(), 2);
    for s in seen {
        assert_eq!(s.header("traceparent"), None);
        assert_eq!(s.header("tracestate"), None);
    }
    assert!(env
        .metrics()
        .await
        .contains("llmgw_gateway_trace_spans_exported_total 0"));
    env.stop().await;
}

#[tokio::test]
async fn a_collector_that_is_down_costs_requests_nothing_and_its_spans_are_counted_as_dropped() {
    let port = std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port();
    let url = format!("http://127.0.0.1:{port}/v1/traces");
    let env = Env::with_config(Opts::default(), tracing_to(&url)).await;
    for _ in 0..3 {
        let resp = env
            .chat(&json!({"model": "mycompany/m", "messages": messages()}))
            .await;
        assert_eq!(resp.status(), 200);
    }
    let dropped = || async {
        let m = env.metrics().await;
        m.lines()
            .find_map(|l| l.strip_prefix("llmgw_gateway_trace_spans_dropped_total "))
            .and_then(|v| v.parse::<u64>().ok())
            .unwrap_or_default()
    };
    let deadline = std::time::Instant::now() + Duration::from_secs(5);
    while dropped().await < 6 {
        assert!(
            std::time::Instant::now() < deadline,
            "spans never counted as dropped"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    env.stop().await;
}
