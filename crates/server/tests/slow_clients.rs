//! Slow clients against the settings API listener of the real binary: a
//! body promised by `Content-Length` that never arrives is cut after
//! `LLMGW_API_BODY_TIMEOUT_MS` with 408, and `LLMGW_API_MAX_CONNECTIONS`
//! bounds the sockets they can hold, so they cannot starve the process.

mod common;

use std::net::SocketAddr;
use std::time::{Duration, Instant};

use serde_json::{json, Value};
use testkit::{RawClient, TestDb};

use common::{llmgw, Running};

async fn start(body_timeout_ms: u64, max_connections: usize) -> (TestDb, Running) {
    let db = TestDb::new().await;
    let mut cmd = llmgw();
    cmd.env("DATABASE_URL", db.url())
        .env("LLMGW_ENCRYPTION_KEYS", &db.keys)
        .env("LLMGW_API_BODY_TIMEOUT_MS", body_timeout_ms.to_string())
        .env("LLMGW_API_MAX_CONNECTIONS", max_connections.to_string())
        // Nothing here needs draining; a short grace keeps the exit quick.
        .env("LLMGW_SHUTDOWN_GRACE_MS", "3000");
    let running = tokio::task::spawn_blocking(move || Running::start(cmd))
        .await
        .unwrap();
    (db, running)
}

fn addr(base: &str) -> SocketAddr {
    base.trim_start_matches("http://").parse().unwrap()
}

/// A client that keeps no idle connection, so each check is a new
/// connection that has to be accepted like any other.
fn client(timeout: Duration) -> reqwest::Client {
    reqwest::Client::builder()
        .timeout(timeout)
        .pool_max_idle_per_host(0)
        .build()
        .unwrap()
}

/// A signed-up user's `Authorization` value.
async fn session(http: &reqwest::Client, api: &str) -> String {
    let r = http
        .post(format!("{api}/api/v1/auth/signup"))
        .json(&json!({"email": "patient@example.com", "password": "correct horse battery"}))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 201);
    let body: Value = r.json().await.unwrap();
    format!("Bearer {}", body["token"].as_str().unwrap())
}

/// Opens `n` connections that each promise a 100-byte body and send one byte.
/// A connection beyond the listener's limit is still opened: the kernel
/// completes the handshake and buffers the bytes until it is accepted.
async fn stall(addr: SocketAddr, n: usize) -> Vec<RawClient> {
    let mut clients = Vec::with_capacity(n);
    for _ in 0..n {
        let mut c = RawClient::connect(addr).await.unwrap();
        assert!(
            c.send(
                b"POST /api/v1/auth/login HTTP/1.1\r\nhost: x\r\ncontent-type: application/json\r\ncontent-length: 100\r\n\r\n{"
            )
            .await
        );
        clients.push(c);
    }
    clients
}

/// Waits for each stalled client's end: a 408 in the API's error shape, or a
/// closed connection; never a connection still held open after `within`.
async fn expect_cut(clients: Vec<RawClient>, started: Instant, within: Duration) {
    for (i, mut c) in clients.into_iter().enumerate() {
        let left = within.saturating_sub(started.elapsed());
        let answer = c.read_answer(left).await;
        assert!(
            answer.closed,
            "slow client {i} still open after {:?}: {answer:?}",
            started.elapsed()
        );
        if let Some(status) = answer.status() {
            assert_eq!(status, 408, "slow client {i}: {answer:?}");
            assert!(
                answer.text.contains("\"code\":\"request_timeout\""),
                "{answer:?}"
            );
        }
    }
}

fn open_fds(pid: u32) -> usize {
    std::fs::read_dir(format!("/proc/{pid}/fd"))
        .unwrap()
        .count()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn stalled_bodies_get_408_while_healthz_and_the_api_keep_answering() {
    let (_db, running) = start(1_500, 64).await;
    let http = client(Duration::from_secs(2));
    let bearer = session(&http, &running.api).await;

    let started = Instant::now();
    let clients = stall(addr(&running.api), 30).await;
    // While they stall, the listener answers at once.
    for _ in 0..3 {
        let t = Instant::now();
        let health = http
            .get(format!("{}/healthz", running.api))
            .send()
            .await
            .unwrap();
        assert_eq!(health.status(), 200);
        let me = http
            .get(format!("{}/api/v1/me", running.api))
            .header("authorization", &bearer)
            .send()
            .await
            .unwrap();
        assert_eq!(me.status(), 200);
        assert!(t.elapsed() < Duration::from_secs(1), "{:?}", t.elapsed());
    }
    assert!(
        started.elapsed() < Duration::from_millis(1_500),
        "the checks above ran after the deadline; they prove nothing"
    );
    // Each is cut at its deadline (1.5 s, then at most 1 s of linger), not
    // after the 75 s+ of old.
    expect_cut(clients, started, Duration::from_secs(5)).await;
    running.terminate();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn slow_clients_beyond_the_connection_limit_only_delay_healthz() {
    const LIMIT: usize = 4;
    const SLOW: usize = 16;
    let (_db, running) = start(1_000, LIMIT).await;
    let http = client(Duration::from_secs(30));
    let bearer = session(&http, &running.api).await;
    let pid = running.pid();
    let idle_fds = open_fds(pid);

    let started = Instant::now();
    let clients = stall(addr(&running.api), SLOW).await;
    tokio::time::sleep(Duration::from_millis(300)).await;
    // The process holds at most LIMIT of them; the rest wait in the
    // kernel's accept queue without costing it a file descriptor.
    let held = open_fds(pid).saturating_sub(idle_fds);
    assert!(
        held < LIMIT + 6,
        "{held} more descriptors open for {SLOW} slow clients"
    );

    // healthz and a normal call queue behind them but are answered: each
    // slot frees at the body deadline plus actix's 1 s linger (so the 408 is
    // read, not reset), SLOW / LIMIT rounds in all.
    let rounds = SLOW.div_ceil(LIMIT) as u64;
    let round = Duration::from_millis(1_000 + 1_000);
    let health = http
        .get(format!("{}/healthz", running.api))
        .send()
        .await
        .expect("healthz answers once slots free up");
    assert_eq!(health.status(), 200);
    let me = http
        .get(format!("{}/api/v1/me", running.api))
        .header("authorization", &bearer)
        .send()
        .await
        .unwrap();
    assert_eq!(me.status(), 200);
    let waited = started.elapsed();
    assert!(
        waited < round * (rounds as u32 + 2),
        "healthz waited {waited:?}"
    );
    expect_cut(clients, started, round * (rounds as u32 + 3)).await;
    // And the connections are released, not leaked.
    let t = Instant::now();
    while open_fds(pid) > idle_fds + 2 && t.elapsed() < Duration::from_secs(5) {
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    assert!(open_fds(pid) <= idle_fds + 2, "descriptors leaked");
    running.terminate();
}
