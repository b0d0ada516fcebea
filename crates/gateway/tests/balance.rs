//! One provider, several HTTPS endpoints: traffic follows the weights, and
//! an endpoint whose server goes down under load costs no request (each is
//! retried on another, those that meet a dead pooled connection included);
//! it is ejected within a few failures and takes traffic again once it is
//! back and has passed its probe.

mod common;

use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use common::*;
use gateway::HealthConfig;
use serde_json::json;
use storage::domain::routing::Weight;
use storage::domain::BaseUrl;
use storage::endpoints::NewEndpoint;
use storage::secrets::ProviderToken;
use storage::Actor;
use testkit::MockUpstream;
use uuid::Uuid;

/// Adds an endpoint at `up` with `weight` to the provider `provider`.
async fn add_endpoint(env: &Env, provider: Uuid, up: &MockUpstream, weight: u64) {
    env.db()
        .create_endpoint(
            env.org.id,
            Actor(None),
            provider,
            &NewEndpoint {
                base_url: BaseUrl::parse(&up.base_url).unwrap(),
                token: ProviderToken::parse(TOKEN).unwrap(),
                weight: Weight::parse(&json!(weight)).unwrap(),
            },
        )
        .await
        .unwrap();
}

fn chats(up: &MockUpstream) -> usize {
    up.seen()
        .iter()
        .filter(|r| r.path.ends_with("/chat/completions"))
        .count()
}

async fn ok_chat(env: &Env) {
    let resp = env
        .chat(&json!({"model": "pool/m", "messages": messages()}))
        .await;
    assert_eq!(resp.status(), 200, "{}", resp.text().await.unwrap());
}

#[tokio::test]
async fn weights_1_to_3_share_4000_requests_25_to_75() {
    let env = Env::new().await;
    let heavy = MockUpstream::start_with_ca(env.upstream.ca.clone()).await;
    let light = MockUpstream::start_with_ca(env.upstream.ca.clone()).await;
    // The provider's own endpoint has weight 1.
    let pool = add_provider(env.db(), env.org.id, "pool", &light.base_url).await;
    add_endpoint(&env, pool, &heavy, 3).await;
    for _ in 0..4000 {
        ok_chat(&env).await;
    }
    let (l, h) = (chats(&light), chats(&heavy));
    assert_eq!(l + h, 4000);
    let share = l as f64 / 4000.0;
    assert!((0.22..=0.28).contains(&share), "light {l}, heavy {h}");
    env.stop().await;
}

#[tokio::test]
async fn a_server_gone_under_load_costs_no_request_and_comes_back_after_its_probe() {
    let env = Env::with_config(Opts::default(), |cfg| {
        cfg.health = HealthConfig {
            eject_after: 3,
            cooldown: Duration::from_millis(300),
            max_cooldown: Duration::from_secs(1),
        };
    })
    .await;
    let ca = env.upstream.ca.clone();
    let a = MockUpstream::start_with_ca(ca.clone()).await;
    let b = MockUpstream::start_with_ca(ca.clone()).await;
    let c = MockUpstream::start_with_ca(ca.clone()).await;
    let pool = add_provider(env.db(), env.org.id, "pool", &a.base_url).await;
    add_endpoint(&env, pool, &b, 1).await;
    add_endpoint(&env, pool, &c, 1).await;
    let env = Arc::new(env);
    let done = Arc::new(AtomicUsize::new(0));
    let workers: Vec<_> = (0..4)
        .map(|_| {
            let (env, done) = (env.clone(), done.clone());
            tokio::spawn(async move {
                while done.fetch_add(1, Ordering::Relaxed) < 600 {
                    ok_chat(&env).await;
                }
            })
        })
        .collect();
    while done.load(Ordering::Relaxed) < 150 {
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
    let before = chats(&c);
    assert!(before > 0, "c took no traffic before it went down");
    c.stop().await;
    for w in workers {
        w.await.expect("a request failed while one server was down");
    }
    let metrics = env.metrics().await;
    assert!(
        metrics.contains("llmgw_gateway_endpoints{health=\"ejected\"} 1")
            || metrics.contains("llmgw_gateway_endpoints{health=\"probing\"} 1"),
        "{metrics}"
    );
    assert!(
        !metrics.contains("llmgw_gateway_upstream_retries_total 0\n"),
        "nothing was retried: {metrics}"
    );
    // Back on the same port: traffic returns once a probe has passed.
    let port = c.port;
    drop(c);
    let c = MockUpstream::start_on(ca, port).await;
    let deadline = Instant::now() + Duration::from_secs(10);
    while chats(&c) == 0 {
        assert!(Instant::now() < deadline, "the endpoint never came back");
        ok_chat(&env).await;
    }
    assert!(
        c.seen().iter().any(|r| r.path.ends_with("/v1/models")),
        "traffic before a probe"
    );
    let env = Arc::try_unwrap(env).ok().unwrap();
    let rows = env.rows().await;
    assert!(rows.iter().all(|r| r.status_code == 200));
    assert!(rows.iter().any(|r| r.attempts.is_some_and(|n| n > 1)));
    assert!(rows.iter().all(|r| r.endpoint_id.is_some()));
    env.stop().await;
}

/// A provider's `connect_ms` applies, not the longer global connect
/// timeout: an endpoint that never answers a connection fails in about
/// 200 ms, and the request falls over to its fallback model; the same
/// address without `connect_ms` is still waiting after a second.
#[tokio::test]
async fn connect_ms_200_fails_over_a_blackholed_endpoint_in_about_200_ms() {
    let ca = Arc::new(testkit::TestCa::new());
    let backup = MockUpstream::start_with_ca(ca.clone()).await;
    let ca_file = ca.ca_file.clone();
    let env = Env::with_config(Opts::default(), |cfg| {
        cfg.upstream = upstream::UpstreamClient::new(&upstream::UpstreamConfig {
            allow_private: true,
            ca_file: Some(ca_file),
            connect_timeout: Duration::from_secs(3),
            timeout: Duration::from_secs(10),
            ..upstream::UpstreamConfig::default()
        })
        .unwrap();
    })
    .await;
    let hole = testkit::Blackhole::start();
    let quick = add_provider(env.db(), env.org.id, "quick", &hole.base_url()).await;
    env.db()
        .update_provider_key(
            env.org.id,
            Actor(None),
            quick,
            storage::providers::ProviderPatch {
                timeouts: Some(
                    storage::domain::routing::Timeouts::parse(&json!({"connect_ms": 200})).unwrap(),
                ),
                ..Default::default()
            },
        )
        .await
        .unwrap();
    add_provider(env.db(), env.org.id, "patient", &hole.base_url()).await;
    add_provider(env.db(), env.org.id, "backup", &backup.base_url).await;

    for _ in 0..3 {
        let start = Instant::now();
        let resp = env
            .chat(&json!({"model": "quick/m", "models": ["backup/m"], "messages": messages()}))
            .await;
        let took = start.elapsed();
        assert_eq!(resp.status(), 200, "{}", resp.text().await.unwrap());
        assert_eq!(resp.headers()["x-llmgw-model"], "backup/m");
        assert!(
            took >= Duration::from_millis(190) && took < Duration::from_millis(1500),
            "{took:?}"
        );
    }
    let start = Instant::now();
    let resp = env
        .chat(&json!({"model": "quick/m", "messages": messages()}))
        .await;
    assert!(resp.status().is_server_error(), "{}", resp.status());
    assert!(
        start.elapsed() < Duration::from_millis(1500),
        "{:?}",
        start.elapsed()
    );

    let waiting = tokio::time::timeout(
        Duration::from_secs(1),
        env.chat(&json!({"model": "patient/m", "messages": messages()})),
    )
    .await;
    assert!(
        waiting.is_err(),
        "the global connect timeout no longer applies"
    );
    let rows = env.rows().await;
    assert!(
        rows.iter()
            .filter(|r| r.requested_model.as_deref() == Some("quick/m"))
            .take(3)
            .all(|r| r.status_code == 200 && r.provider_name.as_deref() == Some("backup")),
        "{rows:?}"
    );
    env.stop().await;
}
