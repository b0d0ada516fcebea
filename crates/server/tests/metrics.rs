//! `LLMGW_METRICS_ADDR` takes `/metrics` off the public gateway port.

mod common;

use common::*;

#[tokio::test]
async fn metrics_addr_serves_metrics_there_and_404_on_the_gateway_port() {
    let t = testkit::TestDb::new().await;
    let upstream = testkit::MockUpstream::start().await;
    let metrics = format!("127.0.0.1:{}", free_port());
    let mut cmd = llmgw_against(&t, &upstream);
    cmd.env("LLMGW_METRICS_ADDR", &metrics);
    let running = tokio::task::spawn_blocking(move || Running::start_gateway_only(cmd))
        .await
        .unwrap();
    let http = reqwest::Client::new();
    let resp = http
        .get(format!("{}/metrics", running.gateway))
        .send()
        .await
        .unwrap();
    assert_eq!(resp.status(), 404);
    assert_eq!(resp.headers()["x-content-type-options"], "nosniff");
    let resp = http
        .get(format!("http://{metrics}/metrics"))
        .send()
        .await
        .unwrap();
    assert_eq!(resp.status(), 200);
    let text = resp.text().await.unwrap();
    assert!(text.contains("llmgw_gateway_requests_total"), "{text}");
    let resp = http
        .get(format!("http://{metrics}/healthz"))
        .send()
        .await
        .unwrap();
    assert_eq!(resp.status(), 404, "only /metrics on the metrics listener");
    let (status, logs) = tokio::task::spawn_blocking(move || running.terminate())
        .await
        .unwrap();
    assert!(status.success(), "{logs}");
}
