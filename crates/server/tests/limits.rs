//! Spend controls across replicas: two `llmgw serve --only gateway`
//! processes on one database and one Redis started here (a single server,
//! or a three-node Cluster), beside `llmgw serve --only api`, through which
//! the limits are set. A minute's requests of a key, and of an org shared by
//! two keys, hold exactly across both processes; concurrency slots are
//! shared, and a SIGKILLed process's come back after the lease TTL; a Redis
//! killed mid-run is handled as `LLMGW_LIMITS_FAIL_OPEN` says, quickly, and
//! counting is shared again once it is back on its port.
//!
//! No test waits for a window to pass: `Retry-After` is checked against
//! the time the burst took.
//!
//! A gateway whose Redis call takes longer than 50 ms decides on its own
//! counters instead, as designed (fail-open; fail-closed refuses): on a
//! loaded machine that happens now and then, and a check made meanwhile
//! says nothing about the shared counters. So each check runs as an attempt
//! on fresh keys, judged only when no gateway's
//! `llmgw_gateway_limits_redis_failures_total` moved during it, and
//! repeated otherwise (three attempts at most).

mod common;

use std::future::Future;
use std::time::{Duration, Instant};

use futures_util::StreamExt;
use reqwest::header::HeaderMap;
use serde_json::{json, Value};
use testkit::{MockUpstream, RedisCluster, RedisServer, TestDb};

use common::{create_key, metric, parse_reset, provision, set_org_limits, Running, Tenant};

const PROVIDER_TOKEN: &str = "sk-upstream-limits-token";
const FALLBACKS: &str = "llmgw_gateway_limits_local_fallbacks_total";
const REDIS_FAILURES: &str = "llmgw_gateway_limits_redis_failures_total";
const SLOW: &str = "mycompany/slowstream-50";

/// The API process and the gateway processes on one database, one mock
/// upstream and one Redis (or Cluster).
struct Fleet {
    t: TestDb,
    upstream: MockUpstream,
    redis: String,
    api: Running,
    gateways: Vec<Running>,
    /// A key of its own org whose requests load the limiter's scripts.
    warm_key: String,
    http: reqwest::Client,
}

impl Fleet {
    /// `llmgw serve --only api`, and one `llmgw serve --only gateway` per
    /// entry of `gateways` (its extra environment) on `LLMGW_REDIS_URL=redis`;
    /// returns once every gateway has connected to Redis and run both scripts.
    async fn start(redis: &str, gateways: &[&[(&str, &str)]]) -> Self {
        let t = TestDb::new().await;
        let upstream = MockUpstream::start().await;
        let cmd = common::llmgw_against(&t, &upstream);
        let api = tokio::task::spawn_blocking(move || Running::start_api_only(cmd));
        let starting: Vec<_> = gateways
            .iter()
            .map(|env| {
                tokio::task::spawn_blocking(Self::gateway_command(&t, &upstream, redis, env))
            })
            .collect();
        let api = api.await.unwrap();
        let mut running = Vec::new();
        for g in starting {
            running.push(g.await.unwrap());
        }
        let warm = provision(&api.api, &upstream.base_url, PROVIDER_TOKEN).await;
        let warm_key = create_key(
            &api.api,
            &warm,
            "warm",
            json!({"requests_per_minute": 1_000_000, "max_concurrent_requests": 1_000_000}),
        )
        .await;
        let f = Self {
            t,
            upstream,
            redis: redis.to_owned(),
            api,
            gateways: running,
            warm_key,
            http: reqwest::Client::new(),
        };
        for g in &f.gateways {
            f.warm(g).await;
        }
        f
    }

    /// Starts a gateway (blocking): `llmgw serve --only gateway` with `env`,
    /// once it has connected to Redis.
    fn gateway_command(
        t: &TestDb,
        upstream: &MockUpstream,
        redis: &str,
        env: &[(&str, &str)],
    ) -> impl FnOnce() -> Running {
        let mut cmd = common::llmgw_against(t, upstream);
        cmd.env("LLMGW_REDIS_URL", redis);
        for (k, v) in env {
            cmd.env(k, v);
        }
        move || {
            let g = Running::start_gateway_only(cmd);
            g.wait_for_log("limits: connected to Redis", Duration::from_secs(15));
            g
        }
    }

    /// One more gateway on the fleet's database and Redis, not in `gateways`.
    async fn spawn_gateway(&self, env: &[(&str, &str)]) -> Running {
        let start = Self::gateway_command(&self.t, &self.upstream, &self.redis, env);
        let g = tokio::task::spawn_blocking(start).await.unwrap();
        self.warm(&g).await;
        g
    }

    /// One request with limits on `g`, so its first timed request does not
    /// also load the admission script, and time for the settlement (the
    /// other script) to run.
    async fn warm(&self, g: &Running) {
        let resp = self
            .chat_at(&g.gateway, &self.warm_key, "mycompany/m", false)
            .await;
        assert_eq!(resp.status(), 200);
        tokio::time::sleep(Duration::from_millis(300)).await;
    }

    /// A new org (owner, provider `mycompany`, one key without limits).
    async fn tenant(&self) -> Tenant {
        provision(&self.api.api, &self.upstream.base_url, PROVIDER_TOKEN).await
    }

    /// A new key of `tenant` with these limits.
    async fn key(&self, tenant: &Tenant, limits: Value) -> String {
        create_key(&self.api.api, tenant, "limited", limits).await
    }

    /// A chat completion through gateway `gw` (streamed: the head only).
    async fn chat(&self, gw: usize, key: &str, model: &str, stream: bool) -> reqwest::Response {
        self.chat_at(&self.gateways[gw].gateway, key, model, stream)
            .await
    }

    async fn chat_at(&self, base: &str, key: &str, model: &str, stream: bool) -> reqwest::Response {
        self.http
            .post(format!("{base}/v1/chat/completions"))
            .bearer_auth(key)
            .json(&json!({"model": model, "stream": stream,
                          "messages": [{"role": "user", "content": "hi"}]}))
            .send()
            .await
            .unwrap()
    }

    /// Upstream chat requests so far.
    fn upstream_chats(&self) -> usize {
        self.upstream
            .seen()
            .iter()
            .filter(|r| r.path == "/v1/chat/completions")
            .count()
    }

    /// Each gateway's Redis calls that failed or took longer than 50 ms.
    async fn redis_failures(&self) -> Vec<f64> {
        let mut all = Vec::new();
        for g in &self.gateways {
            all.push(metric(&g.gateway, REDIS_FAILURES).await);
        }
        all
    }

    fn logs(&self) -> String {
        self.gateways
            .iter()
            .enumerate()
            .map(|(i, g)| format!("--- gateway {i}:\n{}", g.logs()))
            .collect()
    }
}

/// How an attempt went wrong.
enum Miss {
    /// A gateway outside the fleet's list decided on its own counters.
    FellBack,
    /// What was seen, when no gateway fell back: a failure.
    Wrong(String),
}

/// `Err(Miss::Wrong(..))` unless `cond`.
macro_rules! ensure {
    ($cond:expr, $($msg:tt)+) => {
        if !$cond {
            return Err(Miss::Wrong(format!($($msg)+)));
        }
    };
}

/// Runs `attempt` until one ran on Redis alone (see the file's comment),
/// at most three times, and returns what it found; an attempt that went
/// wrong on Redis alone fails the test.
async fn on_redis_alone<T, Fut>(f: &Fleet, mut attempt: impl FnMut() -> Fut) -> T
where
    Fut: Future<Output = Result<T, Miss>>,
{
    for n in 1..=3 {
        let before = f.redis_failures().await;
        let out = attempt().await;
        let after = f.redis_failures().await;
        match out {
            Ok(v) if after == before => return v,
            Err(Miss::Wrong(e)) if after == before => panic!("{e}\n{}", f.logs()),
            _ => eprintln!(
                "attempt {n} ran partly on local counters (Redis failures {before:?} -> {after:?}); again"
            ),
        }
    }
    panic!(
        "every attempt ran partly on local counters (Redis slower than 50 ms)\n{}",
        f.logs()
    );
}

/// One answer of a burst.
struct Answer {
    gateway: usize,
    /// Which of the burst's keys it used.
    key: usize,
    status: u16,
    headers: HeaderMap,
    body: Value,
}

impl Answer {
    fn header(&self, name: &str) -> Option<&str> {
        self.headers.get(name).map(|v| v.to_str().unwrap())
    }

    fn int(&self, name: &str) -> u64 {
        self.header(name)
            .unwrap_or_else(|| panic!("no {name}: {:?}", self.headers))
            .parse()
            .unwrap_or_else(|e| panic!("{name}: {e}: {:?}", self.headers))
    }
}

/// `total` chat requests, 8 in flight at a time, spread over every gateway
/// and every key in turn; returns the answers and how long the burst took.
async fn burst(f: &Fleet, keys: &[&str], total: usize) -> (Vec<Answer>, Duration) {
    let started = Instant::now();
    let n = f.gateways.len();
    let answers = futures_util::stream::iter(0..total)
        .map(|i| async move {
            let (gateway, key) = (i % n, i / n % keys.len());
            let resp = f.chat(gateway, keys[key], "mycompany/m", false).await;
            Answer {
                gateway,
                key,
                status: resp.status().as_u16(),
                headers: resp.headers().clone(),
                body: resp.json().await.unwrap(),
            }
        })
        .buffer_unordered(8)
        .collect::<Vec<_>>()
        .await;
    (answers, started.elapsed())
}

/// Exactly 60 of the burst succeeded, spread over every gateway, counted
/// in one shared window; every other answer is OpenAI's 429 with a `Retry-After` in
/// whole seconds that the sliding window explains.
fn assert_sixty_a_minute(f: &Fleet, answers: &[Answer], took: Duration) {
    let ok: Vec<&Answer> = answers.iter().filter(|a| a.status == 200).collect();
    assert_eq!(ok.len(), 60, "successes in the burst\n{}", f.logs());
    let mut remaining: Vec<u64> = ok
        .iter()
        .map(|a| a.int("x-ratelimit-remaining-requests"))
        .collect();
    remaining.sort_unstable();
    // One shared window: every count is below the limit and the unit that
    // filled it says 0. A gateway admitting from a grant counts what Redis
    // had left when it took the grant plus what the grant still holds, so
    // two gateways may give the same count (LLMGW_LIMITS_HOLD_MS=0 makes
    // each count exact, one round trip per request).
    assert!(
        remaining.first() == Some(&0) && remaining.iter().all(|r| *r < 60),
        "one shared window: {remaining:?}"
    );
    for g in 0..f.gateways.len() {
        assert!(
            ok.iter().any(|a| a.gateway == g),
            "gateway {g} admitted none"
        );
    }
    // The oldest request of the window was admitted after the burst began
    // and the refusal was decided before it ended.
    let least = (60.0 - took.as_secs_f64()).ceil().max(1.0) as u64;
    for a in answers.iter().filter(|a| a.status != 200) {
        assert_eq!(a.status, 429, "{}", a.body);
        assert_eq!(a.body["error"]["type"], "requests", "{}", a.body);
        assert_eq!(a.body["error"]["code"], "rate_limit_exceeded", "{}", a.body);
        let retry = a.int("retry-after");
        assert!(
            (least..=60).contains(&retry),
            "Retry-After {retry} after a burst of {took:?}"
        );
        assert_eq!(a.int("x-ratelimit-limit-requests"), 60);
        assert_eq!(a.int("x-ratelimit-remaining-requests"), 0);
        let reset = parse_reset(a.header("x-ratelimit-reset-requests").unwrap());
        assert_eq!(
            reset.as_millis().div_ceil(1000) as u64,
            retry,
            "Retry-After is the reset in whole seconds, rounded up ({reset:?})"
        );
        assert!(
            a.header("x-ratelimit-limit-tokens").is_none(),
            "no token limit"
        );
    }
    for a in &ok {
        assert_eq!(a.int("x-ratelimit-limit-requests"), 60);
    }
}

/// A key limited to 60 a minute, then an org limited to 60 a minute whose
/// two keys have no limit of their own: bursts of 90 across both gateways.
async fn sixty_a_minute_across_the_fleet(f: &Fleet) {
    let (answers, took, forwarded, after) = on_redis_alone(f, || async {
        let a = f.tenant().await;
        let key = f.key(&a, json!({"requests_per_minute": 60})).await;
        let before = f.upstream_chats();
        let (answers, took) = burst(f, &[&key], 90).await;
        let forwarded = f.upstream_chats() - before;
        // Then each gateway refuses it; the org's own key has no limit.
        let mut after = Vec::new();
        for g in 0..f.gateways.len() {
            after.push(f.chat(g, &key, "mycompany/m", false).await);
        }
        after.push(f.chat(0, &a.api_key, "mycompany/m", false).await);
        Ok((answers, took, forwarded, after))
    })
    .await;
    assert_sixty_a_minute(f, &answers, took);
    assert_eq!(
        forwarded, 60,
        "upstream requests of the burst: refusals are never forwarded"
    );
    let (unlimited, limited) = after.split_last().unwrap();
    assert_eq!(unlimited.status(), 200);
    assert!(unlimited
        .headers()
        .get("x-ratelimit-limit-requests")
        .is_none());
    for (g, resp) in limited.iter().enumerate() {
        assert_eq!(resp.status(), 429, "gateway {g} after the burst");
    }

    let (answers, took, after) = on_redis_alone(f, || async {
        let b = f.tenant().await;
        set_org_limits(&f.api.api, &b, json!({"requests_per_minute": 60})).await;
        let second = create_key(&f.api.api, &b, "second", Value::Null).await;
        let keys = [b.api_key.as_str(), second.as_str()];
        let (answers, took) = burst(f, &keys, 90).await;
        let mut after = Vec::new();
        for k in keys {
            after.push(f.chat(1, k, "mycompany/m", false).await.status());
        }
        Ok((answers, took, after))
    })
    .await;
    assert_sixty_a_minute(f, &answers, took);
    for i in 0..2 {
        assert!(
            answers.iter().any(|a| a.status == 200 && a.key == i),
            "key {i} of the org admitted none"
        );
    }
    assert_eq!(after, [429, 429], "the org's window is shared by its keys");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_minute_limit_holds_exactly_across_two_gateways_on_one_redis() {
    let Some(redis) = RedisServer::start() else {
        return;
    };
    let f = Fleet::start(&redis.url(), &[&[], &[]]).await;
    sixty_a_minute_across_the_fleet(&f).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_minute_limit_holds_exactly_across_two_gateways_on_a_redis_cluster() {
    let Some(cluster) = tokio::task::spawn_blocking(|| RedisCluster::start(3))
        .await
        .unwrap()
    else {
        return;
    };
    let f = Fleet::start(&cluster.urls().join(","), &[&[], &[]]).await;
    sixty_a_minute_across_the_fleet(&f).await;
}

/// A streamed answer held open after its first chunk (dropped: the client
/// goes away).
struct Open {
    _resp: reqwest::Response,
}

/// A stream admitted and held open, or a concurrency refusal (OpenAI's
/// shape, `Retry-After: 1`); anything else fails the test.
async fn open_or_busy(resp: reqwest::Response) -> Option<Open> {
    let status = resp.status();
    if status == 200 {
        let mut resp = resp;
        assert!(resp.chunk().await.unwrap().is_some(), "a first chunk");
        return Some(Open { _resp: resp });
    }
    assert_eq!(status, 429);
    assert_eq!(resp.headers()["retry-after"], "1");
    let v: Value = resp.json().await.unwrap();
    assert_eq!(v["error"]["type"], "requests", "{v}");
    assert_eq!(v["error"]["code"], "rate_limit_exceeded", "{v}");
    None
}

/// A stream on the gateway at `base` that must be admitted.
async fn open(f: &Fleet, base: &str, key: &str, what: &str) -> Result<Open, Miss> {
    let got = open_or_busy(f.chat_at(base, key, SLOW, true).await).await;
    got.ok_or_else(|| Miss::Wrong(format!("{what}: refused")))
}

/// A stream on the gateway at `base` that must be refused as busy.
async fn busy(f: &Fleet, base: &str, key: &str, what: &str) -> Result<(), Miss> {
    let got = open_or_busy(f.chat_at(base, key, SLOW, true).await).await;
    ensure!(got.is_none(), "{what}: admitted");
    Ok(())
}

/// A stream opened on the gateway at `base` once a slot is free (within
/// `limit`).
async fn open_when_free(f: &Fleet, base: &str, key: &str, limit: Duration) -> Result<Open, Miss> {
    let started = Instant::now();
    loop {
        if let Some(open) = open_or_busy(f.chat_at(base, key, SLOW, true).await).await {
            return Ok(open);
        }
        ensure!(
            started.elapsed() < limit,
            "no slot came back within {limit:?}"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn concurrency_slots_are_shared_and_a_killed_gateway_s_come_back_after_the_lease_ttl() {
    let Some(redis) = RedisServer::start() else {
        return;
    };
    let ttl: &[(&str, &str)] = &[("LLMGW_LIMITS_LEASE_TTL_MS", "1000")];
    let f = Fleet::start(&redis.url(), &[ttl, ttl]).await;
    let a = f.tenant().await;
    let [g0, g1] = [0, 1].map(|g| f.gateways[g].gateway.clone());
    let two = json!({"max_concurrent_requests": 2});

    on_redis_alone(&f, || async {
        let key = f.key(&a, two.clone()).await;
        // Two streams, one per gateway: a third is refused on either.
        let _first = open(&f, &g0, &key, "the first").await?;
        let second = open(&f, &g1, &key, "the second").await?;
        busy(&f, &g0, &key, "a third on gateway 0").await?;
        busy(&f, &g1, &key, "a third on gateway 1").await?;
        // Held past the TTL, the slots are renewed, not lost.
        tokio::time::sleep(Duration::from_millis(1500)).await;
        busy(&f, &g0, &key, "a third past the TTL").await?;
        // One ends (its client goes away): the third gets its slot.
        drop(second);
        let _third = open_when_free(&f, &g0, &key, Duration::from_secs(5)).await?;
        busy(&f, &g1, &key, "a fourth").await?;
        Ok(())
    })
    .await;

    // A third gateway takes both slots and is killed: nothing releases
    // them, and they come back on gateway 1 once the lease TTL has passed.
    let back = on_redis_alone(&f, || async {
        let key = f.key(&a, two.clone()).await;
        let mut victim = f.spawn_gateway(ttl).await;
        let taken = async {
            let held = [
                open(&f, &victim.gateway, &key, "the first on the victim").await?,
                open(&f, &victim.gateway, &key, "the second on the victim").await?,
            ];
            busy(&f, &g1, &key, "a third beside the victim's").await?;
            Ok(held)
        }
        .await;
        // The victim is outside the fleet's list: its own count decides.
        let victim_failures = metric(&victim.gateway, REDIS_FAILURES).await;
        victim.kill_hard();
        let killed = Instant::now();
        // Their clients go too (the streams were cut by the kill anyway).
        let taken = taken.map(drop);
        if victim_failures > 0.0 {
            return Err(Miss::FellBack);
        }
        taken?;
        busy(&f, &g1, &key, "one right after the kill").await?;
        let _one = open_when_free(&f, &g1, &key, Duration::from_secs(3)).await?;
        // The two leases were renewed at their own moments: the second
        // expires up to a renewal period (a third of the TTL) later.
        let _two = open_when_free(&f, &g1, &key, Duration::from_secs(1)).await?;
        let back = killed.elapsed();
        busy(&f, &g1, &key, "a third once both came back").await?;
        Ok(back)
    })
    .await;
    assert!(
        back < Duration::from_millis(2500),
        "slots back after {back:?}"
    );
}

/// `x-ratelimit-remaining-requests` of an answer.
fn remaining(r: &reqwest::Response) -> Option<&str> {
    r.headers()
        .get("x-ratelimit-remaining-requests")
        .map(|v| v.to_str().unwrap())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn redis_killed_mid_run_fails_open_or_closed_as_set_and_sharing_resumes_when_it_is_back() {
    let Some(mut redis) = RedisServer::start() else {
        return;
    };
    // Gateway 0 fails open (the default), gateway 1 closed.
    let f = Fleet::start(&redis.url(), &[&[], &[("LLMGW_LIMITS_FAIL_OPEN", "false")]]).await;
    let a = f.tenant().await;
    let free = a.api_key.clone();
    let probe = f.key(&a, json!({"requests_per_minute": 1_000_000})).await;
    let timed = |gw: usize, key: String| {
        let f = &f;
        async move {
            let started = Instant::now();
            let resp = f.chat(gw, &key, "mycompany/m", false).await;
            let took = started.elapsed();
            assert!(
                took < Duration::from_millis(500),
                "gateway {gw} answered in {took:?}"
            );
            resp
        }
    };
    // Both gateways count one window for a key.
    let shared = || async {
        let key = f.key(&a, json!({"requests_per_minute": 2})).await;
        let mut seen = Vec::new();
        for gw in [0, 1, 0, 1] {
            let r = timed(gw, key.clone()).await;
            seen.push((r.status().as_u16(), remaining(&r).map(str::to_owned)));
        }
        let want = |s, r: &str| (s, Some(r.to_owned()));
        ensure!(
            seen == [
                want(200, "1"),
                want(200, "0"),
                want(429, "0"),
                want(429, "0")
            ],
            "one window for both gateways: {seen:?}"
        );
        Ok(())
    };
    on_redis_alone(&f, shared).await;

    redis.kill();
    // Fail-open: served at once on this gateway's own counters, which
    // still hold a limit.
    let own = f.key(&a, json!({"requests_per_minute": 2})).await;
    for left in ["1", "0"] {
        let r = timed(0, own.clone()).await;
        assert_eq!(r.status(), 200);
        assert_eq!(remaining(&r), Some(left));
    }
    assert_eq!(timed(0, own.clone()).await.status(), 429);
    assert_eq!(timed(0, free.clone()).await.status(), 200);
    assert!(metric(&f.gateways[0].gateway, FALLBACKS).await >= 3.0);
    // Fail-closed: a limited key is refused at once, an unlimited one served.
    for key in [&own, &probe] {
        let r = timed(1, key.clone()).await;
        assert_eq!(r.status(), 503);
        assert_eq!(r.headers()["retry-after"], "1");
        let v: Value = r.json().await.unwrap();
        assert_eq!(v["error"]["code"], "limits_unavailable", "{v}");
    }
    assert_eq!(timed(1, free.clone()).await.status(), 200);
    assert_eq!(metric(&f.gateways[1].gateway, FALLBACKS).await, 0.0);

    // Back on its port: both gateways reconnect by themselves.
    redis.restart();
    let deadline = Instant::now() + Duration::from_secs(15);
    loop {
        let before = f.redis_failures().await;
        let open_ok = timed(0, probe.clone()).await.status() == 200;
        let closed_ok = timed(1, probe.clone()).await.status() == 200;
        if open_ok && closed_ok && f.redis_failures().await == before {
            break;
        }
        assert!(
            Instant::now() < deadline,
            "the gateways did not reconnect to Redis\n{}",
            f.logs()
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    on_redis_alone(&f, shared).await;
}
