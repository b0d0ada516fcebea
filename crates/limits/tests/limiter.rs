//! The limiter's rules, each pinned on the shared Redis (127.0.0.1:6379)
//! and on the in-process backend alike; a Redis started by the test for the
//! outage cases; a three-node Redis Cluster; the counters as the settings
//! API reads them; alerts, received by a small webhook server.
//!
//! Every test uses its own org and key ids, so tests share Redis safely.

use std::str::FromStr;
use std::sync::atomic::Ordering;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use limits::{Alerts, Config, Decision, Lease, Limiter, Limits, RefusalKind, Request, Used};
use rust_decimal::Decimal;
use serde_json::{json, Value};
use testkit::{RedisCluster, RedisServer};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
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

/// Two Redis limiters with the default settings: two replicas on one Redis.
async fn two_shared() -> Option<(Limiter, Limiter)> {
    Some((
        shared(Config::default()).await?,
        shared(Config::default()).await?,
    ))
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
        on_both!($name, $check, limits::Config::default());
    };
    ($name:ident, $check:ident, $redis_cfg:expr) => {
        mod $name {
            #[tokio::test]
            async fn on_redis() {
                if let Some(l) = super::shared($redis_cfg).await {
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
    let Some((a, b)) = two_shared().await else {
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

fn usd(s: &str) -> Decimal {
    Decimal::from_str(s).unwrap()
}

async fn consumption_reads_every_counter(l: Limiter) {
    let (org, key) = (Uuid::new_v4(), Uuid::new_v4());
    assert_eq!(
        l.consumption(org, key).await.unwrap().key,
        Used::default(),
        "nothing counted yet"
    );
    let key_lim = Limits {
        requests_per_minute: Some(100),
        tokens_per_minute: Some(10_000),
        max_concurrent_requests: Some(10),
        tokens_per_day: Some(10_000),
        tokens_per_month: Some(100_000),
        budget_per_month_usd: Some(usd("5")),
        ..Limits::default()
    };
    let org_lim = Limits {
        requests_per_minute: Some(1000),
        tokens_per_day: Some(1_000_000),
        ..Limits::default()
    };
    let mut r = req(org, key, &key_lim, &org_lim);
    r.reserve_tokens = 50;
    r.budget_reserve = usd("0.01");
    let (a, _) = admitted(l.admit(&r).await);
    let (b, _) = admitted(l.admit(&r).await);
    let (open, _) = admitted(l.admit(&r).await);
    a.settle(Some(20), Some(usd("0.002"))).await;
    b.settle(Some(30), Some(usd("0.003"))).await;
    let c = l.consumption(org, key).await.unwrap();
    // Settled usage plus the reservation of the request still open.
    assert_eq!(
        c.key,
        Used {
            requests_per_minute: 3,
            tokens_per_minute: 100,
            max_concurrent_requests: 1,
            tokens_per_day: 100,
            tokens_per_month: 100,
            micro_usd_per_month: 15_000,
        }
    );
    assert_eq!(c.key.usd(), usd("0.015"));
    // The org counts only what it limits.
    assert_eq!(
        c.org,
        Used {
            requests_per_minute: 3,
            tokens_per_day: 100,
            ..Used::default()
        }
    );
    let wall = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_secs() as i64;
    assert!((c.now_s - wall).abs() <= 5, "{} vs {wall}", c.now_s);
    // Another key of the org: nothing of its own, the org's shared.
    let other = l.consumption(org, Uuid::new_v4()).await.unwrap();
    assert_eq!((other.key, other.org), (Used::default(), c.org));
    open.settle(Some(0), Some(Decimal::ZERO)).await;
    let c = l.consumption(org, key).await.unwrap();
    assert_eq!(c.key.max_concurrent_requests, 0);
    assert_eq!(c.key.tokens_per_day, 50);
    assert_eq!(c.key.micro_usd_per_month, 5_000);
}
// Read right after each settlement: every request asks Redis (no grants),
// so each settles on its own at once.
on_both!(
    consumption,
    consumption_reads_every_counter,
    limits::Config {
        hold: std::time::Duration::ZERO,
        ..limits::Config::default()
    }
);

/// A webhook receiver on 127.0.0.1: keeps the JSON bodies it accepted, and
/// answers 503 to its first `fail_first` requests.
struct Receiver {
    url: String,
    got: Arc<Mutex<Vec<Value>>>,
}

impl Receiver {
    async fn start(fail_first: usize) -> Self {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let url = format!("http://{}/hooks/llmgw", listener.local_addr().unwrap());
        let got = Arc::new(Mutex::new(Vec::new()));
        let seen = Arc::new(Mutex::new(0usize));
        let (g, n) = (got.clone(), seen.clone());
        tokio::spawn(async move {
            while let Ok((mut conn, _)) = listener.accept().await {
                let (g, n) = (g.clone(), n.clone());
                tokio::spawn(async move {
                    let mut buf = Vec::new();
                    let mut chunk = [0u8; 4096];
                    let (head_end, length) = loop {
                        let read = conn.read(&mut chunk).await.unwrap_or(0);
                        if read == 0 {
                            return;
                        }
                        buf.extend_from_slice(&chunk[..read]);
                        if let Some(i) = buf.windows(4).position(|w| w == b"\r\n\r\n") {
                            let head = String::from_utf8_lossy(&buf[..i]).to_ascii_lowercase();
                            assert!(head.starts_with("post /hooks/llmgw "), "{head}");
                            assert!(head.contains("content-type: application/json"), "{head}");
                            let length = head
                                .lines()
                                .find_map(|l| l.strip_prefix("content-length:"))
                                .and_then(|v| v.trim().parse::<usize>().ok())
                                .unwrap_or(0);
                            break (i + 4, length);
                        }
                    };
                    while buf.len() < head_end + length {
                        let read = conn.read(&mut chunk).await.unwrap_or(0);
                        if read == 0 {
                            return;
                        }
                        buf.extend_from_slice(&chunk[..read]);
                    }
                    let fail = {
                        let mut n = n.lock().unwrap();
                        *n += 1;
                        *n <= fail_first
                    };
                    let status = if fail {
                        "503 Service Unavailable"
                    } else {
                        let body = &buf[head_end..head_end + length];
                        g.lock()
                            .unwrap()
                            .push(serde_json::from_slice(body).unwrap());
                        "204 No Content"
                    };
                    let answer = format!("HTTP/1.1 {status}\r\nconnection: close\r\n\r\n");
                    let _ = conn.write_all(answer.as_bytes()).await;
                });
            }
        });
        Self { url, got }
    }

    /// Waits until `n` alerts arrived (and a little more, so an extra one
    /// would show), then answers them all.
    async fn wait_for(&self, n: usize) -> Vec<Value> {
        let deadline = Instant::now() + Duration::from_secs(10);
        while self.got.lock().unwrap().len() < n && Instant::now() < deadline {
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        tokio::time::sleep(Duration::from_millis(500)).await;
        self.got.lock().unwrap().clone()
    }
}

/// Alerts name the settled total of the settlement that crossed; without
/// grants every request settles alone, so the totals are the exact steps.
fn alerting(rx: &Receiver) -> Config {
    Config {
        alerts: Some(Alerts::webhook(&rx.url).unwrap()),
        hold: Duration::ZERO,
        ..Config::default()
    }
}

/// Twelve requests admitted, then settled all at once on `replicas` (10
/// tokens and $0.10 each): the key's 100 tokens/day at 80 % and the org's
/// $1.00 at 50 % are each crossed, then reached, exactly once.
async fn settle_past(replicas: &[Limiter; 2], key_lim: &Limits, org_lim: &Limits) -> (Uuid, Uuid) {
    let (org, key) = (Uuid::new_v4(), Uuid::new_v4());
    let mut leases = Vec::new();
    for i in 0..12 {
        let l = &replicas[i % 2];
        leases.push(admitted(l.admit(&req(org, key, key_lim, org_lim)).await).0);
    }
    let settles: Vec<_> = leases
        .into_iter()
        .map(|lease| tokio::spawn(lease.settle(Some(10), Some(usd("0.10")))))
        .collect();
    for s in settles {
        s.await.unwrap();
    }
    // Over both limits now.
    let refusal = refused(replicas[0].admit(&req(org, key, key_lim, org_lim)).await);
    assert_eq!(refusal.kind, RefusalKind::Quota);
    (org, key)
}

fn soft_limits() -> (Limits, Limits) {
    (
        Limits {
            tokens_per_day: Some(100),
            soft_limit_percent: Some(80),
            ..Limits::default()
        },
        Limits {
            budget_per_month_usd: Some(usd("1.00")),
            soft_limit_percent: Some(50),
            ..Limits::default()
        },
    )
}

async fn alerts_are_raised_once(replicas: [Limiter; 2], rx: &Receiver) {
    let (key_lim, org_lim) = soft_limits();
    let (org, key) = settle_past(&replicas, &key_lim, &org_lim).await;
    let mut got = rx.wait_for(4).await;
    got.sort_by_key(|e| (e["limit"].to_string(), e["type"].to_string()));
    let day_end = {
        let now = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .unwrap()
            .as_secs() as i64;
        (now / 86_400 + 1) * 86_400
    };
    let midnight = chrono::DateTime::from_timestamp(day_end, 0)
        .unwrap()
        .to_rfc3339_opts(chrono::SecondsFormat::AutoSi, true);
    let key_event = |kind: &str, used: i64| {
        json!({"type": kind, "org_id": org, "api_key_id": key, "scope": "api_key",
               "limit": "tokens_per_day", "max": 100, "soft": 80, "used": used,
               "resets_at": midnight})
    };
    assert_eq!(got.len(), 4, "{got:#?}");
    // budget_per_month_usd sorts first: limit.reached, limit.soft_reached.
    for (e, (kind, used)) in got[..2]
        .iter()
        .zip([("limit.reached", "1.00"), ("limit.soft_reached", "0.50")])
    {
        assert_eq!(e["type"], kind);
        assert_eq!(e["org_id"], json!(org));
        assert_eq!(e["api_key_id"], Value::Null);
        assert_eq!(e["scope"], "organization");
        assert_eq!(
            (&e["max"], &e["soft"], &e["used"]),
            (&json!("1.00"), &json!("0.50"), &json!(used))
        );
        let ends: chrono::DateTime<chrono::Utc> = e["resets_at"].as_str().unwrap().parse().unwrap();
        assert_eq!(ends.format("%d %H:%M:%S").to_string(), "01 00:00:00");
        assert!(ends > chrono::Utc::now());
    }
    assert_eq!(got[2], key_event("limit.reached", 100));
    assert_eq!(got[3], key_event("limit.soft_reached", 80));
    let delivered: u64 = replicas
        .iter()
        .map(|l| l.alert_stats().unwrap().delivered.load(Ordering::Relaxed))
        .sum();
    // The same limiter twice (in process) counts its deliveries twice.
    let per = if replicas[0].is_shared() { 1 } else { 2 };
    assert_eq!(delivered, 4 * per);
}

#[tokio::test]
async fn two_replicas_on_redis_raise_each_alert_once() {
    let rx = Receiver::start(0).await;
    let (Some(a), Some(b)) = (shared(alerting(&rx)).await, shared(alerting(&rx)).await) else {
        return;
    };
    alerts_are_raised_once([a, b], &rx).await;
}

#[tokio::test]
async fn the_local_backend_raises_each_alert_once_and_retries_delivery() {
    // The first try is refused: the retry delivers it.
    let rx = Receiver::start(1).await;
    let l = Limiter::local(alerting(&rx));
    alerts_are_raised_once([l.clone(), l.clone()], &rx).await;
    assert_eq!(l.alert_stats().unwrap().failed.load(Ordering::Relaxed), 0);
}

async fn no_alert_without_a_soft_threshold(replicas: [Limiter; 2], rx: &Receiver) {
    let (mut key_lim, mut org_lim) = soft_limits();
    key_lim.soft_limit_percent = None;
    org_lim.soft_limit_percent = None;
    settle_past(&replicas, &key_lim, &org_lim).await;
    assert_eq!(rx.wait_for(1).await, Vec::<Value>::new());
}

#[tokio::test]
async fn no_alert_without_a_soft_threshold_on_redis() {
    let rx = Receiver::start(0).await;
    let (Some(a), Some(b)) = (shared(alerting(&rx)).await, shared(alerting(&rx)).await) else {
        return;
    };
    no_alert_without_a_soft_threshold([a, b], &rx).await;
}

#[tokio::test]
async fn no_alert_without_a_soft_threshold_in_process() {
    let rx = Receiver::start(0).await;
    let l = Limiter::local(alerting(&rx));
    no_alert_without_a_soft_threshold([l.clone(), l], &rx).await;
}

#[tokio::test]
async fn a_webhook_that_never_answers_counts_as_failed() {
    let rx = Receiver::start(usize::MAX).await;
    let l = Limiter::local(alerting(&rx));
    let (key_lim, org_lim) = soft_limits();
    settle_past(&[l.clone(), l.clone()], &key_lim, &org_lim).await;
    let stats = l.alert_stats().unwrap();
    let deadline = Instant::now() + Duration::from_secs(15);
    while stats.failed.load(Ordering::Relaxed) < 4 {
        assert!(
            Instant::now() < deadline,
            "the alerts were never given up on"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    assert_eq!(stats.delivered.load(Ordering::Relaxed), 0);
    assert!(rx.got.lock().unwrap().is_empty());
}

/// A backend that counts the calls it gets and answers none of them.
#[derive(Default)]
struct Counting(std::sync::atomic::AtomicU64);

impl limits::Backend for Counting {
    fn admit<'a>(
        &'a self,
        _: &'a limits::Admission,
    ) -> limits::BoxFuture<'a, Result<limits::Outcome, limits::BackendError>> {
        self.0.fetch_add(1, Ordering::Relaxed);
        Box::pin(async { Err(limits::BackendError::NotConnected) })
    }
    fn settle<'a>(
        &'a self,
        _: &'a limits::Settlement,
    ) -> limits::BoxFuture<'a, Result<Vec<limits::Crossing>, limits::BackendError>> {
        self.0.fetch_add(1, Ordering::Relaxed);
        Box::pin(async { Err(limits::BackendError::NotConnected) })
    }
    fn consumption<'a>(
        &'a self,
        _: &'a [String; 2],
    ) -> limits::BoxFuture<'a, Result<limits::Consumption, limits::BackendError>> {
        self.0.fetch_add(1, Ordering::Relaxed);
        Box::pin(async { Err(limits::BackendError::NotConnected) })
    }
}

#[tokio::test]
async fn a_soft_threshold_alone_never_reaches_the_backend() {
    let backend = Arc::new(Counting::default());
    let rx = Receiver::start(0).await;
    let l = Limiter::with_backend(Some(backend.clone()), alerting(&rx));
    let soft = Limits {
        soft_limit_percent: Some(80),
        ..Limits::default()
    };
    for _ in 0..3 {
        let (lease, headers) = admitted(
            l.admit(&req(Uuid::new_v4(), Uuid::new_v4(), &soft, &soft))
                .await,
        );
        assert_eq!(headers, limits::Headers::default());
        lease.settle(Some(1_000), Some(usd("1"))).await;
    }
    assert_eq!(
        backend.0.load(Ordering::Relaxed),
        0,
        "no call for a key without limits"
    );
    assert_eq!(l.stats().redis_failures.load(Ordering::Relaxed), 0);
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

/// Grants: two replicas admitting a busy key mostly from quota they hold
/// ask Redis far less than once per request, and once the holds are over
/// Redis counts exactly what was used: units not used are given back, and
/// tokens and money are settled at what each request was charged.
#[tokio::test]
async fn grants_admit_locally_and_give_back_what_was_not_used() {
    let Some((a, b)) = two_shared().await else {
        return;
    };
    let (org, key) = (Uuid::new_v4(), Uuid::new_v4());
    let lim = Limits {
        requests_per_minute: Some(100_000),
        tokens_per_minute: Some(10_000_000),
        max_concurrent_requests: Some(1000),
        tokens_per_day: Some(10_000_000),
        budget_per_month_usd: Some(usd("1000")),
        ..Limits::default()
    };
    let none = Limits::default();
    let before = [&a, &b].map(|l| l.stats().redis_admissions.load(Ordering::Relaxed));
    let n = 400u64;
    for i in 0..n {
        let l = if i % 2 == 0 { &a } else { &b };
        let mut r = req(org, key, &lim, &none);
        r.reserve_tokens = 100;
        r.budget_reserve = usd("0.01");
        let (lease, h) = admitted(l.admit(&r).await);
        assert!(h.requests.is_some() && h.tokens.is_some());
        lease.settle(Some(7), Some(usd("0.001"))).await;
    }
    let asked: u64 = [&a, &b]
        .iter()
        .zip(before)
        .map(|(l, b)| l.stats().redis_admissions.load(Ordering::Relaxed) - b)
        .sum();
    assert!(
        asked < n / 4,
        "{asked} admissions reached Redis for {n} requests"
    );
    // After the holds (50 ms, and as long again for the closing settlement).
    tokio::time::sleep(Duration::from_millis(300)).await;
    let c = a.consumption(org, key).await.unwrap().key;
    assert_eq!(c.requests_per_minute, n, "unused units given back");
    assert_eq!(c.max_concurrent_requests, 0, "every slot freed");
    assert_eq!(c.tokens_per_day, 7 * n);
    assert_eq!(c.tokens_per_minute, 7 * n);
    assert_eq!(c.micro_usd_per_month, 1_000 * n);
}

/// Many requests of one key arriving at once on one replica wait for one
/// grant instead of each asking Redis for its own, and every one of them
/// is counted once.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_burst_on_one_replica_asks_redis_for_few_grants() {
    let Some((a, _b)) = two_shared().await else {
        return;
    };
    let (org, key) = (Uuid::new_v4(), Uuid::new_v4());
    let lim = Limits {
        requests_per_minute: Some(100_000),
        max_concurrent_requests: Some(1000),
        ..Limits::default()
    };
    let before = a.stats().redis_admissions.load(Ordering::Relaxed);
    let n = 256u64;
    let burst: Vec<_> = (0..n)
        .map(|_| {
            let (a, lim) = (a.clone(), lim.clone());
            tokio::spawn(async move {
                let (lease, _) = admitted(a.admit(&req(org, key, &lim, &Limits::default())).await);
                tokio::time::sleep(Duration::from_millis(5)).await;
                lease.settle(Some(1), None).await;
            })
        })
        .collect();
    for t in burst {
        t.await.unwrap();
    }
    let asked = a.stats().redis_admissions.load(Ordering::Relaxed) - before;
    assert!(
        asked <= 16,
        "{asked} admissions reached Redis for {n} concurrent requests"
    );
    tokio::time::sleep(Duration::from_millis(300)).await;
    let c = a.consumption(org, key).await.unwrap().key;
    assert_eq!(c.requests_per_minute, n, "each request counted once");
    assert_eq!(c.max_concurrent_requests, 0, "every slot freed");
}

/// A key busy for several holds in a row finds its next grant already
/// asked for: its requests, one after another, almost never wait for
/// Redis, and each is still counted once. Each is charged more tokens than
/// it reserved (as a request without `max_tokens` is): the grants reserve
/// what their requests were charged, so that does not use them up early.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_busy_key_asks_for_its_next_grant_ahead() {
    let Some((a, _b)) = two_shared().await else {
        return;
    };
    let (org, key) = (Uuid::new_v4(), Uuid::new_v4());
    let lim = Limits {
        requests_per_minute: Some(100_000),
        max_concurrent_requests: Some(1000),
        tokens_per_minute: Some(100_000_000),
        ..Limits::default()
    };
    let stats = a.stats();
    let count = |s: &std::sync::atomic::AtomicU64| s.load(Ordering::Relaxed);
    let before = (count(&stats.redis_admissions), count(&stats.asked_ahead));
    // Ten holds of the default 50 ms, a request every millisecond.
    let until = tokio::time::Instant::now() + Duration::from_millis(500);
    let mut n = 0u64;
    while tokio::time::Instant::now() < until {
        let (lease, _) = admitted(a.admit(&req(org, key, &lim, &Limits::default())).await);
        lease.settle(Some(3), None).await;
        n += 1;
        tokio::time::sleep(Duration::from_millis(1)).await;
    }
    let asked = count(&stats.redis_admissions) - before.0;
    let ahead = count(&stats.asked_ahead) - before.1;
    let waited = asked - ahead;
    eprintln!("{n} requests: {asked} grants, {ahead} asked for ahead");
    assert!(ahead >= 5, "{ahead} of {asked} grants asked for ahead");
    assert!(
        waited <= 3,
        "{waited} of {n} requests waited for Redis ({ahead} grants asked for ahead)"
    );
    tokio::time::sleep(Duration::from_millis(300)).await;
    let c = a.consumption(org, key).await.unwrap().key;
    assert_eq!(c.requests_per_minute, n, "each request counted once");
    assert_eq!(c.tokens_per_minute, 3 * n, "each request's tokens once");
    assert_eq!(c.max_concurrent_requests, 0, "every slot freed");
}

/// A grant never takes a key past its requests per minute: with grants on
/// both replicas, a burst is admitted exactly up to the limit.
#[tokio::test]
async fn grants_never_admit_past_the_minute() {
    let Some((a, b)) = two_shared().await else {
        return;
    };
    let (org, key) = (Uuid::new_v4(), Uuid::new_v4());
    let lim = Limits {
        requests_per_minute: Some(150),
        ..Limits::default()
    };
    let mut ok = 0;
    for i in 0..400 {
        let l = if i % 3 == 0 { &a } else { &b };
        if let Decision::Admitted { lease, .. } =
            l.admit(&req(org, key, &lim, &Limits::default())).await
        {
            ok += 1;
            lease.settle(None, None).await;
        }
    }
    assert_eq!(ok, 150, "exactly the limit across both");
}
