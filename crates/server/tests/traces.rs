//! Traces from the `llmgw` binary itself: the standard `OTEL_*` settings
//! reach its gateway, which sends its spans to the collector they name (a
//! real OTLP/HTTP receiver run here) and passes its `traceparent` to a real
//! HTTPS upstream; without them, nothing is exported or passed on.

mod common;

use common::*;
use serde_json::json;
use testkit::otlp::Collector;
use testkit::{MockUpstream, TestDb};

const TRACE_ID: &str = "4bf92f3577b34da6a3ce929d0e0e4736";

/// `llmgw serve` started off the runtime (starting waits for it, blocking).
async fn start(cmd: std::process::Command) -> Running {
    tokio::task::spawn_blocking(move || Running::start(cmd))
        .await
        .unwrap()
}

async fn chat_with_parent(gateway: &str, key: &str) -> u16 {
    reqwest::Client::new()
        .post(format!("{gateway}/v1/chat/completions"))
        .bearer_auth(key)
        .header("traceparent", format!("00-{TRACE_ID}-00f067aa0ba902b7-01"))
        .json(&json!({"model": "mycompany/m", "messages": [{"role": "user", "content": "hi"}]}))
        .send()
        .await
        .unwrap()
        .status()
        .as_u16()
}

#[tokio::test]
async fn the_binary_sends_its_spans_where_the_otel_settings_say() {
    let (collector, url) = Collector::start().await;
    let up = MockUpstream::start().await;
    let t = TestDb::new().await;
    let mut cmd = llmgw_against(&t, &up);
    cmd.env("OTEL_EXPORTER_OTLP_TRACES_ENDPOINT", &url)
        .env("OTEL_EXPORTER_OTLP_HEADERS", "x-tenant=e2e")
        .env("OTEL_SERVICE_NAME", "llmgw-e2e")
        .env("OTEL_BSP_SCHEDULE_DELAY", "20");
    let gw = start(cmd).await;
    let tenant = provision(&gw.api, &up.base_url, "sk-upstream-e2e").await;

    assert_eq!(chat_with_parent(&gw.gateway, &tenant.api_key).await, 200);
    let (server, client) = collector.wait_for(1, 1).await;
    let (server, client) = (&server[0], &client[0]);
    assert_eq!(server.service, "llmgw-e2e");
    assert_eq!(server.str("traceId"), TRACE_ID);
    assert_eq!(server.str("parentSpanId"), "00f067aa0ba902b7");
    assert_eq!(server.text("gen_ai.provider.name"), Some("mycompany"));
    assert_eq!(server.text("gen_ai.request.model"), Some("m"));
    assert_eq!(client.str("parentSpanId"), server.str("spanId"));
    let seen = up.seen();
    assert_eq!(
        seen[0].header("traceparent"),
        Some(format!("00-{TRACE_ID}-{}-01", client.str("spanId")).as_str())
    );
    let (headers, _) = &collector.posts()[0];
    assert!(
        headers.iter().any(|(k, v)| k == "x-tenant" && v == "e2e"),
        "{headers:?}"
    );
    let raw = collector.raw();
    assert!(!raw.contains(&tenant.api_key) && !raw.contains("sk-upstream-e2e"));
    tokio::task::spawn_blocking(move || drop(gw)).await.unwrap();
}

#[tokio::test]
async fn without_otel_settings_the_binary_exports_and_passes_on_nothing() {
    let up = MockUpstream::start().await;
    let t = TestDb::new().await;
    let gw = start(llmgw_against(&t, &up)).await;
    let tenant = provision(&gw.api, &up.base_url, "sk-upstream-e2e").await;
    assert_eq!(chat_with_parent(&gw.gateway, &tenant.api_key).await, 200);
    let seen = up.seen();
    assert_eq!(seen.len(), 1);
    assert_eq!(seen[0].header("traceparent"), None);
    tokio::task::spawn_blocking(move || drop(gw)).await.unwrap();
}
