//! Spend controls at the gateway (in-process counters; the Redis and
//! multi-replica cases are the limiter's and the server's tests): requests
//! per minute, an org limit shared by its keys, token and money budgets
//! charged with the usage reported (a disconnected stream pays its
//! reservation), concurrency slots, OpenAI's headers and refusal shapes,
//! and a Redis that does not answer (fail-open on local counters, or 503).

mod common;

use std::str::FromStr;
use std::time::{Duration, Instant};

use common::*;
use futures_util::StreamExt;
use rust_decimal::Decimal;
use serde_json::{json, Value};
use storage::api_keys::KeyOptions;
use storage::domain::{BaseUrl, ProviderName};
use storage::limits::{Limits, Prices};
use storage::secrets::ProviderToken;
use storage::Actor;

/// A new key of the env's org with `limits`; its secret.
async fn limited_key(env: &Env, limits: Limits) -> String {
    let options = KeyOptions {
        limits,
        ..KeyOptions::default()
    };
    let (_, secret) = env
        .db()
        .create_api_key_with(env.org.id, Actor(None), "limited", &options)
        .await
        .unwrap();
    secret.expose_secret().to_owned()
}

fn body(model: &str, stream: bool) -> Value {
    json!({"model": model, "messages": messages(), "stream": stream})
}

/// What the gateway reserves for `b`: no `max_tokens`, so its bytes / 4.
fn reservation(b: &Value) -> u64 {
    (serde_json::to_vec(b).unwrap().len() as u64).div_ceil(4)
}

fn header<'a>(resp: &'a reqwest::Response, name: &str) -> Option<&'a str> {
    resp.headers().get(name).map(|v| v.to_str().unwrap())
}

/// Asserts a 429 in OpenAI's shape; returns (type, code).
async fn too_many(resp: reqwest::Response) -> (String, String) {
    assert_eq!(resp.status(), 429);
    let v: Value = resp.json_value().await;
    let e = &v["error"];
    for field in ["message", "type", "param", "code"] {
        assert!(e.get(field).is_some(), "no {field} in {v}");
    }
    (
        e["type"].as_str().unwrap().to_owned(),
        e["code"].as_str().unwrap().to_owned(),
    )
}

/// Waits until the org's usage rows number `n` (each settles its request's charge).
async fn settled(env: &Env, n: i64) {
    let deadline = Instant::now() + Duration::from_secs(5);
    loop {
        let count: i64 = sqlx::query_scalar("SELECT count(*) FROM request_logs WHERE org_id = $1")
            .bind(env.org.id)
            .fetch_one(env.db().pool())
            .await
            .unwrap();
        if count >= n {
            break;
        }
        assert!(Instant::now() < deadline, "only {count} of {n} rows");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    // The charge is settled on a task of its own as the row is queued.
    tokio::time::sleep(Duration::from_millis(50)).await;
}

/// Sends `body(n)` with `key` until it is refused, each answer read whole
/// (and checked by `check`) and its charge settled before the next; the
/// number of successes and the refusal.
async fn until_refused(
    env: &Env,
    key: &str,
    body: impl Fn(usize) -> Value,
    check: impl Fn(&str),
) -> (usize, reqwest::Response) {
    let mut n = 0;
    loop {
        let resp = env.chat_with_key(key, &body(n)).await;
        if resp.status() == 429 {
            return (n, resp);
        }
        assert_eq!(resp.status(), 200);
        check(&resp.text().await.unwrap());
        n += 1;
        settled(env, n as i64).await;
        assert!(n < 10, "never refused");
    }
}

#[tokio::test]
async fn requests_per_minute_admits_that_many_then_429_with_retry_after() {
    let env = Env::new().await;
    let key = limited_key(
        &env,
        Limits {
            requests_per_minute: Some(3),
            ..Limits::default()
        },
    )
    .await;
    for remaining in ["2", "1", "0"] {
        let resp = env.chat_with_key(&key, &body("mycompany/m", false)).await;
        assert_eq!(resp.status(), 200);
        assert_eq!(header(&resp, "x-ratelimit-limit-requests"), Some("3"));
        assert_eq!(
            header(&resp, "x-ratelimit-remaining-requests"),
            Some(remaining)
        );
        let reset = header(&resp, "x-ratelimit-reset-requests").unwrap();
        assert!(reset.ends_with('s'), "{reset}");
        assert!(
            header(&resp, "x-ratelimit-limit-tokens").is_none(),
            "no token limit is set"
        );
    }
    let resp = env.chat_with_key(&key, &body("mycompany/m", false)).await;
    let retry: u64 = header(&resp, "retry-after").unwrap().parse().unwrap();
    assert!((1..=60).contains(&retry), "Retry-After {retry}");
    assert_eq!(header(&resp, "x-ratelimit-remaining-requests"), Some("0"));
    assert!(header(&resp, "x-should-retry").is_none());
    assert_eq!(
        too_many(resp).await,
        ("requests".into(), "rate_limit_exceeded".into())
    );
    assert_eq!(
        env.upstream.seen().len(),
        3,
        "the refusal reached the upstream"
    );
    // The org's unlimited key is not affected, and carries no limit headers.
    let resp = env.chat(&body("mycompany/m", false)).await;
    assert_eq!(resp.status(), 200);
    assert!(header(&resp, "x-ratelimit-limit-requests").is_none());
    let metrics = env.metrics().await;
    assert!(
        metrics.contains("llmgw_gateway_limited_total{kind=\"requests\"} 1"),
        "{metrics}"
    );
    assert!(metrics.contains("llmgw_gateway_limits_shared 0"));
    // No webhook configured: the alert counters are there, at 0.
    assert!(
        metrics.contains("llmgw_gateway_limit_alerts_total{outcome=\"dropped\"} 0"),
        "{metrics}"
    );
    let rows = env.rows().await;
    assert_eq!(rows.len(), 5);
    let refused: Vec<_> = rows.iter().filter(|r| r.status_code == 429).collect();
    assert_eq!(refused.len(), 1);
    assert_eq!(
        refused[0].error_class.as_deref(),
        Some("rate_limit_exceeded")
    );
    assert_eq!(refused[0].requested_model.as_deref(), Some("mycompany/m"));
    env.stop().await;
}

#[tokio::test]
async fn an_org_limit_is_shared_by_its_keys() {
    let env = Env::new().await;
    env.db()
        .update_org(
            env.org.id,
            env.org.owner,
            None,
            Some(&Limits {
                requests_per_minute: Some(2),
                ..Limits::default()
            }),
        )
        .await
        .unwrap();
    let other = limited_key(&env, Limits::default()).await;
    let a = env.chat(&body("mycompany/m", false)).await;
    assert_eq!(a.status(), 200);
    assert_eq!(header(&a, "x-ratelimit-remaining-requests"), Some("1"));
    let b = env.chat_with_key(&other, &body("mycompany/m", false)).await;
    assert_eq!(b.status(), 200);
    assert_eq!(header(&b, "x-ratelimit-remaining-requests"), Some("0"));
    for key in [env.org.key.as_str(), other.as_str()] {
        let resp = env.chat_with_key(key, &body("mycompany/m", false)).await;
        assert_eq!(
            too_many(resp).await,
            ("requests".into(), "rate_limit_exceeded".into())
        );
    }
    env.stop().await;
}

#[tokio::test]
async fn a_token_budget_holds_at_the_usage_reported_and_streams_count() {
    let env = Env::new().await;
    let key = limited_key(
        &env,
        Limits {
            tokens_per_day: Some(40),
            ..Limits::default()
        },
    )
    .await;
    // Each answer reports 16 tokens; each request reserves about 23.
    let (n, refusal) = until_refused(
        &env,
        &key,
        |n| body("mycompany/m", n % 2 == 1),
        |text| assert!(!text.contains("data:") || text.contains("[DONE]"), "{text}"),
    )
    .await;
    let used: i64 = sqlx::query_scalar(
        "SELECT coalesce(sum(total_tokens), 0)::int8 FROM request_logs WHERE org_id = $1",
    )
    .bind(env.org.id)
    .fetch_one(env.db().pool())
    .await
    .unwrap();
    assert!(n >= 2, "a stream was admitted and counted");
    assert!(used >= 40, "refused at {used} settled tokens");
    assert!(used - 16 < 40, "admitted past the budget ({used})");
    assert_eq!(header(&refusal, "x-should-retry"), Some("false"));
    assert!(header(&refusal, "retry-after").is_none());
    assert_eq!(
        too_many(refusal).await,
        ("insufficient_quota".into(), "insufficient_quota".into())
    );
    env.stop().await;
}

#[tokio::test]
async fn a_stream_cut_by_its_client_is_charged_its_reservation() {
    let env = Env::new().await;
    let key = limited_key(
        &env,
        Limits {
            tokens_per_minute: Some(10_000),
            ..Limits::default()
        },
    )
    .await;
    // A finished request is charged what the upstream reported (16 tokens).
    let first = body("mycompany/m", false);
    let resp = env.chat_with_key(&key, &first).await;
    assert_eq!(resp.status(), 200);
    assert_eq!(
        header(&resp, "x-ratelimit-remaining-tokens"),
        Some((10_000 - reservation(&first)).to_string().as_str())
    );
    settled(&env, 1).await;
    // A stream the client abandons after its first chunk reports no usage.
    let cut = body("mycompany/slowstream-50", true);
    let resp = env.chat_with_key(&key, &cut).await;
    assert_eq!(resp.status(), 200);
    let mut chunks = resp.bytes_stream();
    assert!(chunks.next().await.unwrap().is_ok());
    drop(chunks);
    settled(&env, 2).await;
    let last = body("mycompany/m", false);
    let resp = env.chat_with_key(&key, &last).await;
    assert_eq!(resp.status(), 200);
    let expected = 10_000 - 16 - reservation(&cut) - reservation(&last);
    assert_eq!(
        header(&resp, "x-ratelimit-remaining-tokens"),
        Some(expected.to_string().as_str()),
        "the cut stream pays its reservation, the finished one its usage"
    );
    assert_eq!(header(&resp, "x-ratelimit-limit-tokens"), Some("10000"));
    env.stop().await;
}

#[tokio::test]
async fn a_concurrency_limit_refuses_the_extra_stream_until_one_ends() {
    let env = Env::new().await;
    let key = limited_key(
        &env,
        Limits {
            max_concurrent_requests: Some(1),
            ..Limits::default()
        },
    )
    .await;
    let open = env
        .chat_with_key(&key, &body("mycompany/slowstream-50", true))
        .await;
    assert_eq!(open.status(), 200);
    let mut chunks = open.bytes_stream();
    assert!(chunks.next().await.unwrap().is_ok());
    let extra = env.chat_with_key(&key, &body("mycompany/m", false)).await;
    assert_eq!(header(&extra, "retry-after"), Some("1"));
    assert_eq!(
        too_many(extra).await,
        ("requests".into(), "rate_limit_exceeded".into())
    );
    drop(chunks);
    let deadline = Instant::now() + Duration::from_secs(5);
    loop {
        let resp = env.chat_with_key(&key, &body("mycompany/m", false)).await;
        if resp.status() == 200 {
            break;
        }
        assert_eq!(resp.status(), 429);
        assert!(Instant::now() < deadline, "the slot never came back");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    env.stop().await;
}

#[tokio::test]
async fn a_money_budget_is_charged_at_the_provider_s_prices() {
    let env = Env::new().await;
    // $1 per token in and out: each answer (16 tokens) costs $0.000016.
    let prices = Prices::parse(&json!([{"model": "*", "input_per_million_usd": "1",
                                         "output_per_million_usd": "1"}]))
    .unwrap();
    env.db()
        .create_provider_key_priced(
            env.org.id,
            Actor(None),
            &ProviderName::parse("priced").unwrap(),
            &BaseUrl::parse(&env.upstream.base_url).unwrap(),
            &ProviderToken::parse(TOKEN).unwrap(),
            &prices,
        )
        .await
        .unwrap();
    let key = limited_key(
        &env,
        Limits {
            budget_per_month_usd: Some(Decimal::from_str("0.00003").unwrap()),
            ..Limits::default()
        },
    )
    .await;
    let (n, refusal) = until_refused(&env, &key, |_| body("priced/m", false), |_| ()).await;
    assert_eq!(n, 2, "$0.000016 twice crosses $0.00003");
    assert_eq!(header(&refusal, "x-should-retry"), Some("false"));
    assert_eq!(
        too_many(refusal).await,
        ("insufficient_quota".into(), "insufficient_quota".into())
    );
    env.gw.shutdown().await;
    let spent: Decimal = sqlx::query_scalar(
        "SELECT sum(cost_usd) FROM request_logs WHERE org_id = $1 AND status_code = 200",
    )
    .bind(env.org.id)
    .fetch_one(env.db().pool())
    .await
    .unwrap();
    assert_eq!(spent, Decimal::from_str("0.000032").unwrap());
    env.stop().await;
}

#[tokio::test]
async fn redis_not_answering_fails_open_on_local_counters_or_closed_with_503() {
    let dead = "redis://127.0.0.1:1";
    let open = limits::Limiter::redis(dead, limits::Config::default()).unwrap();
    let env = Env::with_limiter(Opts::default(), Some(open)).await;
    let key = limited_key(
        &env,
        Limits {
            requests_per_minute: Some(2),
            ..Limits::default()
        },
    )
    .await;
    for _ in 0..2 {
        let started = Instant::now();
        let resp = env.chat_with_key(&key, &body("mycompany/m", false)).await;
        assert_eq!(resp.status(), 200);
        assert!(started.elapsed() < Duration::from_secs(2));
    }
    // Still limited: this replica's own counters hold the limit.
    let resp = env.chat_with_key(&key, &body("mycompany/m", false)).await;
    too_many(resp).await;
    env.stop().await;

    let closed = limits::Limiter::redis(
        dead,
        limits::Config {
            fail_open: false,
            ..limits::Config::default()
        },
    )
    .unwrap();
    let env = Env::with_limiter(Opts::default(), Some(closed)).await;
    let key = limited_key(
        &env,
        Limits {
            requests_per_minute: Some(2),
            ..Limits::default()
        },
    )
    .await;
    let resp = env.chat_with_key(&key, &body("mycompany/m", false)).await;
    assert_eq!(header(&resp, "retry-after"), Some("1"));
    let (_, code) = openai_error(resp, 503).await;
    assert_eq!(code, "limits_unavailable");
    // A key without limits never waits on Redis.
    let resp = env.chat(&body("mycompany/m", false)).await;
    assert_eq!(resp.status(), 200);
    assert_eq!(env.upstream.seen().len(), 1);
    env.stop().await;
}
