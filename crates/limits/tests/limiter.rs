//! The limiter's rules, each pinned on the shared Redis (127.0.0.1:6379)
//! and on the in-process backend alike; a Redis started by the test for the
//! outage cases; a three-node Redis Cluster.
//!
//! Every test uses its own org and key ids, so tests share Redis safely.

use std::str::FromStr;
use std::time::{Duration, Instant};

use limits::{Config, Decision, Lease, Limiter, Limits, RefusalKind, Request};
use rust_decimal::Decimal;
use testkit::{RedisCluster, RedisServer};
use uuid::Uuid;

const SHARED_REDIS: &str = "redis://127.0.0.1:6379";

/// A Redis limiter that has connected (waits up to 5 s).
async fn shared(cfg: Config) -> Option<Limiter> {
    if !testkit::redis::listening(6379) {
        testkit::skip_unless_ci("Redis at 127.0.0.1:6379 (.ci/run starts one)");
        return None;
    }
    let l = Limiter::redis(SHARED_REDIS, cfg).unwrap();
    wait_connected(&l).await;
    Some(l)
}

async fn wait_connected(l: &Limiter) {
    let probe = Limits {
        requests_per_minute: Some(u64::MAX),
        ..Limits::default()
    };
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        let before = l
            .stats()
            .redis_failures
            .load(std::sync::atomic::Ordering::Relaxed);
        let d = l
            .admit(&req(
                Uuid::new_v4(),
                Uuid::new_v4(),
                &probe,
                &Limits::default(),
            ))
            .await;
        drop(d);
        let after = l
            .stats()
            .redis_failures
            .load(std::sync::atomic::Ordering::Relaxed);
        if after == before {
            return;
        }
        assert!(Instant::now() < deadline, "the limiter never reached Redis");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

fn req<'a>(org: Uuid, key: Uuid, key_limits: &'a Limits, org_limits: &'a Limits) -> Request<'a> {
    Request {
        org,
        key,
        key_limits,
        org_limits,
        reserve_tokens: 0,
        budget_reserve: Decimal::ZERO,
    }
}

fn admitted(d: Decision) -> (Lease, limits::Headers) {
    match d {
        Decision::Admitted { lease, headers } => (lease, headers),
        Decision::Refused(r) => panic!("refused: {r:?}"),
    }
}

fn refused(d: Decision) -> limits::Refusal {
    match d {
        Decision::Refused(r) => r,
        Decision::Admitted { .. } => panic!("admitted"),
    }
}

/// Runs `check` on a Redis limiter and on a local one.
macro_rules! on_both {
    ($name:ident, $check:ident) => {
        mod $name {
            #[tokio::test]
            async fn on_redis() {
                if let Some(l) = super::shared(limits::Config::default()).await {
                    super::$check(l).await;
                }
            }
            #[tokio::test]
            async fn in_process() {
                super::$check(limits::Limiter::local(limits::Config::default())).await;
            }
        }
    };
}

async fn requests_window_is_exact(l: Limiter) {
    let (org, key) = (Uuid::new_v4(), Uuid::new_v4());
    let lim = Limits {
        requests_per_minute: Some(5),
        ..Limits::default()
    };
    let none = Limits::default();
    for i in 0..5u64 {
        let (lease, h) = admitted(l.admit(&req(org, key, &lim, &none)).await);
        let w = h.requests.expect("requests headers");
        assert_eq!((w.limit, w.remaining), (5, 4 - i));
        assert!(w.reset <= Duration::from_secs(60) && w.reset > Duration::from_secs(50));
        assert!(h.tokens.is_none());
        lease.settle(None, None).await;
    }
    let r = refused(l.admit(&req(org, key, &lim, &none)).await);
    assert_eq!(r.kind, RefusalKind::Requests);
    assert!((55..=60).contains(&r.retry_after_secs), "{r:?}");
    assert_eq!(r.headers.requests.unwrap().remaining, 0);
    // Another key of the same org has its own window.
    admitted(l.admit(&req(org, Uuid::new_v4(), &lim, &none)).await);
    // 0 blocks.
    let zero = Limits {
        requests_per_minute: Some(0),
        ..Limits::default()
    };
    let r = refused(l.admit(&req(org, Uuid::new_v4(), &zero, &none)).await);
    assert!(r.retry_after_secs >= 1);
}
on_both!(requests_window, requests_window_is_exact);

async fn org_limit_is_shared_and_the_tighter_wins(l: Limiter) {
    let org = Uuid::new_v4();
    let (k1, k2) = (Uuid::new_v4(), Uuid::new_v4());
    let key_lim = Limits {
        requests_per_minute: Some(100),
        ..Limits::default()
    };
    let org_lim = Limits {
        requests_per_minute: Some(3),
        ..Limits::default()
    };
    let (_, h) = admitted(l.admit(&req(org, k1, &key_lim, &org_lim)).await);
    assert_eq!(h.requests.unwrap().limit, 3, "the org is tighter");
    admitted(l.admit(&req(org, k2, &key_lim, &org_lim)).await);
    admitted(l.admit(&req(org, k1, &key_lim, &org_lim)).await);
    let r = refused(l.admit(&req(org, k2, &key_lim, &org_lim)).await);
    assert_eq!(r.kind, RefusalKind::Requests);
    // A refusal counts nowhere: key k1's own window holds 2, not 3.
    let tight = Limits {
        requests_per_minute: Some(3),
        ..Limits::default()
    };
    let (_, h) = admitted(l.admit(&req(org, k1, &tight, &Limits::default())).await);
    assert_eq!(h.requests.unwrap().remaining, 0);
}
on_both!(org_limits, org_limit_is_shared_and_the_tighter_wins);

async fn tokens_are_reserved_then_settled(l: Limiter) {
    let (org, key) = (Uuid::new_v4(), Uuid::new_v4());
    let lim = Limits {
        tokens_per_minute: Some(100),
        tokens_per_day: Some(1000),
        ..Limits::default()
    };
    let none = Limits::default();
    let mut r = req(org, key, &lim, &none);
    r.reserve_tokens = 60;
    let (a, h) = admitted(l.admit(&r).await);
    assert_eq!(h.tokens.unwrap().remaining, 40);
    // 60 reserved < 100: admitted, though it may overshoot.
    let (b, _) = admitted(l.admit(&r).await);
    let refusal = refused(l.admit(&r).await);
    assert_eq!(refusal.kind, RefusalKind::Tokens);
    assert!((1..=60).contains(&refusal.retry_after_secs));
    // Settled with what was used, the window has room again.
    a.settle(Some(10), None).await;
    b.settle(Some(10), None).await;
    let (c, h) = admitted(l.admit(&r).await);
    assert_eq!(h.tokens.unwrap().remaining, 100 - 80);
    // Dropped unsettled (a client gone before the usage): charged its reservation.
    drop(c);
    tokio::time::sleep(Duration::from_millis(100)).await;
    let (_, h) = admitted(l.admit(&r).await);
    assert_eq!(
        h.tokens.unwrap().remaining,
        0,
        "20 settled + 60 charged + 60 reserved"
    );
}
on_both!(tokens, tokens_are_reserved_then_settled);

async fn day_budget_refuses_as_quota(l: Limiter) {
    let (org, key) = (Uuid::new_v4(), Uuid::new_v4());
    let none = Limits::default();
    let lim = Limits {
        tokens_per_day: Some(50),
        ..Limits::default()
    };
    let mut r = req(org, key, &none, &lim);
    r.reserve_tokens = 10;
    let (lease, _) = admitted(l.admit(&r).await);
    lease.settle(Some(70), None).await;
    let refusal = refused(l.admit(&r).await);
    assert_eq!(refusal.kind, RefusalKind::Quota);
    assert!((1..=86_400).contains(&refusal.retry_after_secs));
}
on_both!(day_budget, day_budget_refuses_as_quota);

async fn money_budget_holds(l: Limiter) {
    let (org, key) = (Uuid::new_v4(), Uuid::new_v4());
    let none = Limits::default();
    let lim = Limits {
        budget_per_month_usd: Some(Decimal::from_str("0.001").unwrap()),
        ..Limits::default()
    };
    let mut r = req(org, key, &lim, &none);
    r.budget_reserve = Decimal::from_str("0.0006").unwrap();
    let (a, h) = admitted(l.admit(&r).await);
    assert_eq!(h, limits::Headers::default(), "no header for money");
    let (b, _) = admitted(l.admit(&r).await);
    assert_eq!(refused(l.admit(&r).await).kind, RefusalKind::Quota);
    // The real costs were lower: room again.
    a.settle(Some(5), Some(Decimal::from_str("0.0001").unwrap()))
        .await;
    b.settle(Some(5), Some(Decimal::from_str("0.0001").unwrap()))
        .await;
    admitted(l.admit(&r).await);
}
on_both!(money_budget, money_budget_holds);

async fn concurrency_slots_are_leases(l: Limiter) {
    let (org, key) = (Uuid::new_v4(), Uuid::new_v4());
    let lim = Limits {
        max_concurrent_requests: Some(2),
        ..Limits::default()
    };
    let none = Limits::default();
    let (a, _) = admitted(l.admit(&req(org, key, &lim, &none)).await);
    let (_b, _) = admitted(l.admit(&req(org, key, &lim, &none)).await);
    let r = refused(l.admit(&req(org, key, &lim, &none)).await);
    assert_eq!((r.kind, r.retry_after_secs), (RefusalKind::Concurrency, 1));
    a.settle(Some(1), None).await;
    admitted(l.admit(&req(org, key, &lim, &none)).await);
}
on_both!(concurrency, concurrency_slots_are_leases);

async fn abandoned_leases_expire(l: Limiter) {
    let (org, key) = (Uuid::new_v4(), Uuid::new_v4());
    let lim = Limits {
        max_concurrent_requests: Some(1),
        ..Limits::default()
    };
    let none = Limits::default();
    // A held lease is renewed past its TTL.
    let (held, _) = admitted(l.admit(&req(org, key, &lim, &none)).await);
    tokio::time::sleep(Duration::from_millis(1500)).await;
    assert_eq!(
        refused(l.admit(&req(org, key, &lim, &none)).await).kind,
        RefusalKind::Concurrency
    );
    // What a SIGKILLed gateway leaves: no renewals, no release.
    held.abandon();
    tokio::time::sleep(Duration::from_millis(1200)).await;
    admitted(l.admit(&req(org, key, &lim, &none)).await);
}

fn short_leases() -> Config {
    Config {
        lease_ttl: Duration::from_secs(1),
        ..Config::default()
    }
}

#[tokio::test]
async fn abandoned_leases_expire_on_redis() {
    if let Some(l) = shared(short_leases()).await {
        abandoned_leases_expire(l).await;
    }
}

#[tokio::test]
async fn abandoned_leases_expire_in_process() {
    abandoned_leases_expire(Limiter::local(short_leases())).await;
}

#[tokio::test]
async fn two_limiters_share_one_window() {
    let (Some(a), Some(b)) = (
        shared(Config::default()).await,
        shared(Config::default()).await,
    ) else {
        return;
    };
    let (org, key) = (Uuid::new_v4(), Uuid::new_v4());
    let lim = Limits {
        requests_per_minute: Some(60),
        ..Limits::default()
    };
    let none = Limits::default();
    let mut ok = 0;
    let mut tasks = Vec::new();
    for i in 0..100 {
        let l = if i % 2 == 0 { a.clone() } else { b.clone() };
        let lim = lim.clone();
        tasks.push(tokio::spawn(async move {
            let d = l.admit(&req(org, key, &lim, &Limits::default())).await;
            matches!(d, Decision::Admitted { .. })
        }));
    }
    for t in tasks {
        ok += usize::from(t.await.unwrap());
    }
    assert_eq!(ok, 60, "exactly the limit across both");
    let r = refused(a.admit(&req(org, key, &lim, &none)).await);
    assert!((1..=60).contains(&r.retry_after_secs));
}

#[tokio::test]
async fn redis_stopped_mid_run_follows_the_setting_and_recovers() {
    let Some(mut server) = RedisServer::start() else {
        return;
    };
    let url = server.url();
    let open = Limiter::redis(&url, Config::default()).unwrap();
    let closed = Limiter::redis(
        &url,
        Config {
            fail_open: false,
            ..Config::default()
        },
    )
    .unwrap();
    wait_connected(&open).await;
    wait_connected(&closed).await;
    let (org, key) = (Uuid::new_v4(), Uuid::new_v4());
    let lim = Limits {
        requests_per_minute: Some(1000),
        ..Limits::default()
    };
    let none = Limits::default();
    admitted(open.admit(&req(org, key, &lim, &none)).await);

    server.kill();
    for _ in 0..5 {
        let t = Instant::now();
        // Fail-open: served on this replica's counters, quickly.
        admitted(open.admit(&req(org, key, &lim, &none)).await);
        let r = refused(closed.admit(&req(org, key, &lim, &none)).await);
        assert_eq!(r.kind, RefusalKind::Unavailable);
        assert!(
            t.elapsed() < Duration::from_millis(400),
            "{:?}",
            t.elapsed()
        );
    }
    let fell_back = open
        .stats()
        .fallbacks
        .load(std::sync::atomic::Ordering::Relaxed);
    assert!(fell_back >= 5);
    // Local counters still hold a limit while Redis is away.
    let one = Limits {
        requests_per_minute: Some(1),
        ..Limits::default()
    };
    let k2 = Uuid::new_v4();
    admitted(open.admit(&req(org, k2, &one, &none)).await);
    refused(open.admit(&req(org, k2, &one, &none)).await);

    // Redis back on the same port: both recover by themselves.
    server.restart();
    wait_connected(&open).await;
    wait_connected(&closed).await;
    admitted(closed.admit(&req(org, key, &lim, &none)).await);
}

#[tokio::test]
async fn limits_hold_on_a_three_node_cluster() {
    let Some(cluster) = RedisCluster::start(3) else {
        return;
    };
    let urls = cluster.urls();
    let a = Limiter::redis_cluster(
        &urls,
        Config {
            timeout: Duration::from_millis(500),
            ..Config::default()
        },
    )
    .unwrap();
    let b = Limiter::redis_cluster(
        &urls,
        Config {
            timeout: Duration::from_millis(500),
            ..Config::default()
        },
    )
    .unwrap();
    wait_connected(&a).await;
    wait_connected(&b).await;
    let failures = a
        .stats()
        .redis_failures
        .load(std::sync::atomic::Ordering::Relaxed);
    // Several orgs, so their hash tags land on different nodes.
    for _ in 0..6 {
        let (org, key) = (Uuid::new_v4(), Uuid::new_v4());
        let org_lim = Limits {
            requests_per_minute: Some(10),
            max_concurrent_requests: Some(100),
            tokens_per_day: Some(1_000_000),
            ..Limits::default()
        };
        let none = Limits::default();
        let mut ok = 0;
        for i in 0..15 {
            let l = if i % 2 == 0 { &a } else { &b };
            if let Decision::Admitted { lease, .. } = l.admit(&req(org, key, &none, &org_lim)).await
            {
                ok += 1;
                lease.settle(Some(3), None).await;
            }
        }
        assert_eq!(ok, 10);
        assert_eq!(
            a.stats()
                .redis_failures
                .load(std::sync::atomic::Ordering::Relaxed),
            failures
        );
    }
    drop(cluster);
}
