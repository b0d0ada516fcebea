//! Floods of the password endpoints and of HTTP/2 streams against the real
//! binary: memory stays flat, legitimate users still get in, and nothing
//! answers 500.

mod common;

use std::collections::HashMap;
use std::time::{Duration, Instant};

use serde_json::{json, Value};
use testkit::{MockUpstream, TestDb};

use common::{llmgw, llmgw_against, peak_during, provision, rss_kib, Running};

const MIB: u64 = 1024;
const LEGIT_PASSWORD: &str = "correct horse battery staple";

async fn start(cmd: std::process::Command) -> Running {
    tokio::task::spawn_blocking(move || Running::start(cmd))
        .await
        .unwrap()
}

/// `llmgw serve` on `db`, trusting loopback's `X-Forwarded-For` so each
/// attempt can come from an address of its own.
fn password_api(db: &TestDb) -> std::process::Command {
    let mut cmd = llmgw();
    cmd.env("DATABASE_URL", db.url())
        .env("LLMGW_ENCRYPTION_KEYS", &db.keys)
        .env("LLMGW_TRUSTED_PROXIES", "127.0.0.1")
        .env("RUST_LOG", "warn");
    cmd
}

/// One login attempt as the client at `from` (sent as `X-Forwarded-For`
/// through the trusted loopback peer): status, error code, `Retry-After`.
async fn login(
    http: &reqwest::Client,
    api: &str,
    from: &str,
    email: &str,
    password: &str,
) -> (u16, String, Option<String>) {
    let r = http
        .post(format!("{api}/api/v1/auth/login"))
        .header("x-forwarded-for", from)
        .json(&json!({"email": email, "password": password}))
        .send()
        .await
        .expect("the API answers");
    let status = r.status().as_u16();
    let retry_after = r
        .headers()
        .get("retry-after")
        .and_then(|v| v.to_str().ok())
        .map(str::to_owned);
    let body: Value = r.json().await.unwrap_or(Value::Null);
    let code = body["error"]["code"].as_str().unwrap_or("").to_owned();
    (status, code, retry_after)
}

/// A real user's login, retried as a client should on 503 `busy`.
async fn login_patiently(http: &reqwest::Client, api: &str, from: &str, email: &str) -> u16 {
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        let (status, code, retry_after) = login(http, api, from, email, LEGIT_PASSWORD).await;
        if status != 503 || Instant::now() > deadline {
            return status;
        }
        assert_eq!(code, "busy");
        let secs: u64 = retry_after.and_then(|v| v.parse().ok()).unwrap_or(1);
        tokio::time::sleep(Duration::from_millis(secs * 1000 / 4)).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn login_flood_keeps_memory_flat_and_lets_real_users_in() {
    let db = TestDb::new().await;
    let running = start(password_api(&db)).await;
    let pid = running.pid();
    let api = running.api.clone();
    let http = reqwest::Client::new();

    let legit = "legit@example.com";
    let victim = "victim@example.com";
    for (i, email) in [legit, victim].into_iter().enumerate() {
        let r = http
            .post(format!("{api}/api/v1/auth/signup"))
            .header("x-forwarded-for", format!("192.0.2.{}", 10 + i))
            .json(&json!({"email": email, "password": LEGIT_PASSWORD}))
            .send()
            .await
            .unwrap();
        assert_eq!(r.status(), 201);
    }
    assert_eq!(login_patiently(&http, &api, "192.0.2.20", legit).await, 200);
    tokio::time::sleep(Duration::from_millis(500)).await;
    let idle = rss_kib(pid);

    // 300 attempts at once, each on its own connection and nearly all from
    // their own address: a third guess the victim's password, the rest try
    // unknown accounts.
    let flood = reqwest::Client::builder()
        .pool_max_idle_per_host(0)
        .build()
        .unwrap();
    let flooded = async {
        let attempts: Vec<_> = (0..300u32)
            .map(|i| {
                let (flood, api) = (flood.clone(), api.clone());
                tokio::spawn(async move {
                    // The last 30 share one address: its burst is 20 (one more
                    // may trickle back in during a slow burst).
                    let from = if i >= 270 {
                        "10.99.99.99".to_owned()
                    } else {
                        format!("10.{}.{}.1", i / 200, i % 200)
                    };
                    let email = if i % 3 == 0 {
                        victim.to_owned()
                    } else {
                        format!("nobody-{i}@example.com")
                    };
                    login(&flood, &api, &from, &email, "wrong password 123").await
                })
            })
            .collect();
        // Meanwhile a real user, from an address of their own.
        let during = {
            let (http, api) = (http.clone(), api.clone());
            tokio::spawn(async move { login_patiently(&http, &api, "198.51.100.7", legit).await })
        };

        let mut by_status: HashMap<(u16, String), usize> = HashMap::new();
        for a in attempts {
            let (status, code, retry_after) = a.await.unwrap();
            if status == 429 || status == 503 {
                let secs: u64 = retry_after
                    .as_deref()
                    .and_then(|v| v.parse().ok())
                    .unwrap_or_else(|| panic!("{status} {code} without a numeric Retry-After"));
                assert!((1..=120).contains(&secs), "Retry-After {secs}");
            }
            *by_status.entry((status, code)).or_default() += 1;
        }
        (by_status, during.await.unwrap())
    };
    let (peak_during, (by_status, during)) = peak_during(pid, flooded).await;
    let last_answer = Instant::now();

    let allowed = [
        (401, "invalid_credentials"),
        (429, "too_many_requests"),
        (503, "busy"),
    ];
    for ((status, code), n) in &by_status {
        assert!(
            allowed.contains(&(*status, code.as_str())),
            "{n} attempts answered {status} {code:?}: {by_status:?}"
        );
    }
    let refused: usize = by_status
        .iter()
        .filter(|((s, _), _)| *s == 429 || *s == 503)
        .map(|(_, n)| n)
        .sum();
    assert!(refused > 0, "nothing was refused: {by_status:?}");
    let busy = by_status
        .get(&(503, "busy".to_owned()))
        .copied()
        .unwrap_or(0);
    let throttled = by_status
        .get(&(429, "too_many_requests".to_owned()))
        .copied()
        .unwrap_or(0);
    assert!(busy > 0, "the password pool never filled: {by_status:?}");
    assert!(
        throttled >= 10,
        "the shared address was not throttled: {by_status:?}"
    );
    assert_eq!(during, 200, "the real user's login during the flood");

    tokio::time::sleep(Duration::from_secs(5).saturating_sub(last_answer.elapsed())).await;
    let after = rss_kib(pid);
    eprintln!(
        "RSS idle {} MiB, peak {} MiB, 5 s after {} MiB; answers {by_status:?}",
        idle / MIB,
        peak_during / MIB,
        after / MIB
    );
    assert!(
        peak_during <= idle + 128 * MIB,
        "RSS rose from {idle} KiB to {peak_during} KiB during the flood"
    );
    assert!(
        after <= idle + 32 * MIB,
        "RSS still {after} KiB five seconds after the flood (idle {idle} KiB)"
    );
    let (status, _, _) = login(&http, &api, "198.51.100.8", legit, LEGIT_PASSWORD).await;
    assert_eq!(status, 200, "the real user's login after the flood");
    let (status, ..) = running.terminate();
    assert!(status.success());
}

/// The password workspaces (19 MiB each) are resident only while logins are
/// hashed: a process that served logins a moment ago is as small as before.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn password_memory_goes_back_to_the_kernel_after_logins() {
    let db = TestDb::new().await;
    let running = start(password_api(&db)).await;
    let pid = running.pid();
    let api = running.api.clone();
    let http = reqwest::Client::new();
    // One request through the API first, so its connection and buffers are
    // part of "before".
    let r = http
        .post(format!("{api}/api/v1/auth/login"))
        .json(&json!({"email": "x"}))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 422);
    tokio::time::sleep(Duration::from_millis(300)).await;
    let before = rss_kib(pid);

    let email = "returns@example.com";
    let logins = async {
        let r = http
            .post(format!("{api}/api/v1/auth/signup"))
            .json(&json!({"email": email, "password": LEGIT_PASSWORD}))
            .send()
            .await
            .unwrap();
        assert_eq!(r.status(), 201);
        // Logins two at a time, so both workers hash.
        for round in 0..3 {
            let (from_a, from_b) = (
                format!("192.0.2.{}", 30 + round),
                format!("192.0.2.{}", 40 + round),
            );
            let (a, b) = tokio::join!(
                login(&http, &api, &from_a, email, LEGIT_PASSWORD),
                login(&http, &api, &from_b, email, "a wrong password")
            );
            assert_eq!((a.0, b.0), (200, 401));
        }
    };
    let (peak, ()) = peak_during(pid, logins).await;
    tokio::time::sleep(Duration::from_millis(500)).await;
    let after = rss_kib(pid);
    eprintln!(
        "RSS before {} MiB, peak while hashing {} MiB, after {} MiB",
        before / MIB,
        peak / MIB,
        after / MIB
    );
    assert!(
        peak >= before + 15 * MIB,
        "hashing never showed its 19 MiB workspace (before {before} KiB, peak {peak} KiB)"
    );
    assert!(
        after <= before + 6 * MIB,
        "RSS {after} KiB after the logins, {before} KiB before: the workspaces stayed resident"
    );
    let (status, ..) = running.terminate();
    assert!(status.success());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn api_port_does_not_speak_h2c_and_gateway_caps_streams_per_connection() {
    let db = TestDb::new().await;
    let upstream = MockUpstream::start().await;
    let mut cmd = llmgw_against(&db, &upstream);
    // actix keeps an open h2 connection through the whole graceful stop.
    cmd.env("LLMGW_SHUTDOWN_GRACE_MS", "3000");
    let running = start(cmd).await;
    let h2 = reqwest::Client::builder()
        .http2_prior_knowledge()
        .build()
        .unwrap();

    // HTTP/2 with prior knowledge: the API listener refuses the preface...
    let api = h2.get(format!("{}/healthz", running.api)).send().await;
    assert!(
        api.as_ref().is_err(),
        "the API port answered HTTP/2: {:?}",
        api.map(|r| r.version())
    );
    let h1 = reqwest::get(format!("{}/healthz", running.api))
        .await
        .unwrap();
    assert_eq!(h1.status(), 200);
    // ...while the gateway still serves it, on one connection.
    let gw = h2
        .get(format!("{}/healthz", running.gateway))
        .send()
        .await
        .unwrap();
    assert_eq!(gw.version(), reqwest::Version::HTTP_2);

    // 150 slow requests as streams of one connection: 100 run, the rest are
    // answered 429 at once instead of piling up.
    let tenant = provision(&running.api, &upstream.base_url, "sk-test-token-1234").await;
    let calls: Vec<_> = (0..150)
        .map(|_| {
            let (h2, gateway, key) = (h2.clone(), running.gateway.clone(), tenant.api_key.clone());
            tokio::spawn(async move {
                let started = Instant::now();
                let r = h2
                    .post(format!("{gateway}/v1/chat/completions"))
                    .bearer_auth(key)
                    .json(&json!({"model": "mycompany/sleep-1500", "messages": []}))
                    .send()
                    .await
                    .unwrap();
                let status = r.status().as_u16();
                let has_ids = r.headers().contains_key("x-request-id")
                    && r.headers()
                        .get("x-content-type-options")
                        .is_some_and(|v| v == "nosniff");
                let body: Value = r.json().await.unwrap_or(Value::Null);
                (status, has_ids, body, started.elapsed())
            })
        })
        .collect();
    let (mut ok, mut capped) = (0, 0);
    for c in calls {
        let (status, has_ids, body, took) = c.await.unwrap();
        match status {
            200 => ok += 1,
            429 => {
                assert_eq!(body["error"]["type"], "rate_limit_exceeded", "{body}");
                assert!(has_ids, "429 without x-request-id or nosniff");
                assert!(took < Duration::from_millis(1500), "refused late: {took:?}");
                capped += 1;
            }
            other => panic!("unexpected {other}: {body}"),
        }
    }
    assert!((50..=100).contains(&ok), "{ok} ran, {capped} capped");
    assert!(capped >= 1, "no stream was capped ({ok} ran)");
    eprintln!("one h2 connection: {ok} ran, {capped} capped");
    drop(h2);
    let (status, ..) = running.terminate();
    assert!(status.success());
}
