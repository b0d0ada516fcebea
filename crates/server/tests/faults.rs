//! Process-level fault tolerance of `llmgw serve`: SIGTERM in the middle of
//! load, and its PostgreSQL stopped for more than ten seconds under load.
//! Each test asserts on what clients see and on the rows left in
//! `request_logs`.

mod common;

use std::collections::{HashMap, HashSet};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use serde_json::{json, Value};
use sqlx::Row;
use testkit::{MockUpstream, TestDb};

use common::{llmgw, provision, Running};

/// What one client request ended as.
#[derive(Debug)]
struct Outcome {
    id: String,
    model: String,
    stream: bool,
    /// `Ok((status, body))`, or the transport error.
    result: Result<(u16, String), String>,
}

impl Outcome {
    /// 200 with the complete answer: the echo, or a stream that reached `[DONE]`.
    fn succeeded(&self) -> bool {
        let Ok((200, body)) = &self.result else {
            return false;
        };
        let upstream_model = self.model.split_once('/').map_or("", |(_, m)| m);
        if self.stream {
            body.ends_with("data: [DONE]\n\n") && body.contains("tok2 ")
        } else {
            serde_json::from_str::<Value>(body).is_ok_and(|v| {
                v["choices"][0]["message"]["content"] == format!("echo from {upstream_model}")
            })
        }
    }
}

/// One chat request on a fresh connection, tagged with a unique id sent as
/// `x-request-id` (what `request_logs.request_id` records) and as the body's
/// `user` (what the upstream sees).
async fn chat(
    http: &reqwest::Client,
    gateway: &str,
    key: &str,
    model: &str,
    stream: bool,
) -> Outcome {
    let id = uuid::Uuid::new_v4().to_string();
    let result = async {
        let r = http
            .post(format!("{gateway}/v1/chat/completions"))
            .bearer_auth(key)
            .header("x-request-id", &id)
            .json(&json!({
                "model": model,
                "stream": stream,
                "user": id,
                "messages": [{"role": "user", "content": "hello"}],
            }))
            .send()
            .await
            .map_err(|e| format!("{e:?}"))?;
        let status = r.status().as_u16();
        let body = r.text().await.map_err(|e| format!("{e:?}"))?;
        Ok((status, body))
    }
    .await;
    Outcome {
        id,
        model: model.to_owned(),
        stream,
        result,
    }
}

/// A client that opens a new connection per request, so "accepted before
/// the signal" is a property of each request, not of a pooled connection.
fn fresh_connection_client() -> reqwest::Client {
    reqwest::Client::builder()
        .pool_max_idle_per_host(0)
        .timeout(Duration::from_secs(20))
        .build()
        .unwrap()
}

/// The columns of a usage row these tests look at.
#[derive(Debug, Clone)]
struct UsageRow {
    id: String,
    status: i16,
    canceled: bool,
    error_class: Option<String>,
}

/// Every row of `request_logs`.
async fn usage_rows(pool: &sqlx::PgPool) -> Vec<UsageRow> {
    sqlx::query("SELECT request_id, status_code, canceled, error_class FROM request_logs")
        .fetch_all(pool)
        .await
        .unwrap()
        .iter()
        .map(|r| UsageRow {
            id: r.get(0),
            status: r.get(1),
            canceled: r.get(2),
            error_class: r.get(3),
        })
        .collect()
}

/// Polls until `request_logs` holds at least `n` rows (the writer batches).
async fn wait_for_rows(pool: &sqlx::PgPool, n: usize, limit: Duration) -> Vec<UsageRow> {
    let deadline = Instant::now() + limit;
    loop {
        let rows = usage_rows(pool).await;
        if rows.len() >= n || Instant::now() >= deadline {
            return rows;
        }
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
}

/// Exactly one row per successful request, each a 200 that was not canceled.
fn assert_one_row_per_success(rows: &[UsageRow], outcomes: &[Outcome]) {
    let served: HashSet<&str> = outcomes
        .iter()
        .filter(|o| o.succeeded())
        .map(|o| o.id.as_str())
        .collect();
    let mut per_id: HashMap<&str, usize> = HashMap::new();
    for r in rows {
        *per_id.entry(r.id.as_str()).or_default() += 1;
        assert_eq!((r.status, r.canceled), (200, false), "{r:?}");
    }
    assert_eq!(rows.len(), served.len(), "one row per served request");
    assert!(per_id.values().all(|n| *n == 1), "duplicated rows");
    let logged: HashSet<&str> = per_id.keys().copied().collect();
    assert_eq!(logged, served, "rows and served requests differ");
}

const GRACE: Duration = Duration::from_millis(3_000);

/// SIGTERM while 8 slow requests (half of them streams) and one endless
/// stream are in flight and 6 clients keep sending: every request the
/// gateway took finishes with a complete answer, new connections are
/// refused, the endless stream is cut when the grace period ends, the
/// process exits 0 right after, and `request_logs` holds exactly one row
/// per answered request plus one `shutdown` row for the cut stream.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sigterm_during_load_finishes_accepted_requests_and_logs_each_once() {
    let t = TestDb::new().await;
    let upstream = MockUpstream::start().await;
    let mut cmd = common::llmgw_against(&t, &upstream);
    cmd.env("LLMGW_SHUTDOWN_GRACE_MS", GRACE.as_millis().to_string());
    let running = tokio::task::spawn_blocking(move || Running::start(cmd))
        .await
        .unwrap();
    let tenant = provision(&running.api, &upstream.base_url, "sk-upstream-token-1234").await;
    let gateway = running.gateway.clone();
    let http = fresh_connection_client();

    // Background load: each client loops over a mix until a request fails to
    // connect (the listener is gone) or it has sent 40.
    let stop = Arc::new(AtomicBool::new(false));
    let mut load = Vec::new();
    for c in 0..6usize {
        let (http, gateway, key, stop) = (
            http.clone(),
            gateway.clone(),
            tenant.api_key.clone(),
            stop.clone(),
        );
        load.push(tokio::spawn(async move {
            let mut out = Vec::new();
            for i in 0..40usize {
                if stop.load(Ordering::SeqCst) {
                    break;
                }
                let (model, stream) = match (c + i) % 4 {
                    0 => ("mycompany/m", false),
                    1 => ("mycompany/m", true),
                    2 => ("mycompany/sleep-200", false),
                    _ => ("mycompany/sleep-200", true),
                };
                let o = chat(&http, &gateway, &key, model, stream).await;
                let failed = o.result.is_err();
                out.push(o);
                if failed {
                    break;
                }
            }
            out
        }));
    }
    tokio::time::sleep(Duration::from_millis(300)).await;

    // Slow requests that are surely in flight when the signal arrives.
    let mut slow = Vec::new();
    for i in 0..8 {
        let (http, gateway, key) = (http.clone(), gateway.clone(), tenant.api_key.clone());
        slow.push(tokio::spawn(async move {
            chat(&http, &gateway, &key, "mycompany/sleep-1500", i % 2 == 1).await
        }));
    }
    // A stream that would take 200 s: the grace period must cut it.
    let endless = {
        let (http, gateway, key) = (http.clone(), gateway.clone(), tenant.api_key.clone());
        tokio::spawn(
            async move { chat(&http, &gateway, &key, "mycompany/slowstream-20", true).await },
        )
    };
    let deadline = Instant::now() + Duration::from_secs(10);
    while upstream
        .seen()
        .iter()
        .filter(|s| s.json()["model"] == "sleep-1500")
        .count()
        < 8
    {
        assert!(
            Instant::now() < deadline,
            "slow requests never reached the upstream"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }

    // Let the background clients get requests of their own in flight too.
    tokio::time::sleep(Duration::from_millis(200)).await;
    let signalled = Instant::now();
    running.signal_term();
    tokio::time::sleep(Duration::from_millis(300)).await;
    // Not accepting any more, while the slow requests are still running.
    let late = chat(
        &fresh_connection_client(),
        &gateway,
        &tenant.api_key,
        "mycompany/m",
        false,
    )
    .await;
    assert!(
        late.result.is_err(),
        "a connection made after SIGTERM was served: {late:?}"
    );
    let mut running = running;
    let (status, running) = tokio::task::spawn_blocking(move || {
        let s = running.wait_exit(GRACE + Duration::from_secs(5));
        (s, running)
    })
    .await
    .unwrap();
    let took = signalled.elapsed();
    let logs = running.logs();
    let status = status.unwrap_or_else(|| panic!("still running {took:?} after SIGTERM\n{logs}"));
    assert!(status.success(), "exit {status:?}\n{logs}");
    assert!(
        took < GRACE + Duration::from_secs(2),
        "exit took {took:?}\n{logs}"
    );
    stop.store(true, Ordering::SeqCst);

    let mut outcomes = Vec::new();
    for s in slow {
        let o = s.await.unwrap();
        assert!(
            o.succeeded(),
            "in-flight request cut by shutdown: {o:?}\n{logs}"
        );
        outcomes.push(o);
    }
    for l in load {
        outcomes.extend(l.await.unwrap());
    }
    // The endless stream was cut when the grace period ran out: the client
    // sees a truncated stream (no `[DONE]`).
    let endless = endless.await.unwrap();
    assert!(!endless.succeeded(), "{endless:?}");
    // A request the upstream saw was accepted by the gateway: it must have
    // been answered completely. Anything else may only have failed to
    // connect or been reset, never with an HTTP error.
    let reached: HashSet<String> = upstream
        .seen()
        .iter()
        .filter_map(|s| s.json()["user"].as_str().map(str::to_owned))
        .collect();
    for o in &outcomes {
        if reached.contains(&o.id) {
            assert!(o.succeeded(), "accepted request failed: {o:?}\n{logs}");
        } else {
            assert!(o.result.is_err(), "refused with an HTTP answer: {o:?}");
        }
    }
    let served = outcomes.iter().filter(|o| o.succeeded()).count();
    assert!(served >= 20, "too little load: {served} served");
    eprintln!(
        "served {served} of {} requests; exit {took:?} after SIGTERM",
        outcomes.len()
    );

    // The process is gone, so the rows are all there already: one per
    // answer, plus the cut stream's, marked as cut by the shutdown.
    let mut rows = usage_rows(t.db.pool()).await;
    let cut: Vec<_> = rows
        .iter()
        .filter(|r| r.id == endless.id)
        .cloned()
        .collect();
    rows.retain(|r| r.id != endless.id);
    assert_eq!(cut.len(), 1, "cut stream rows: {cut:?}\n{logs}");
    // Cut by the end of the grace period: dropped mid-stream (`shutdown`),
    // or, when the worker owning the shared upstream connection stopped
    // first, ended by the gateway with an error event.
    let label = (
        cut[0].status,
        cut[0].canceled,
        cut[0].error_class.as_deref(),
    );
    assert!(
        label == (499, true, Some("shutdown"))
            || label == (200, false, Some("upstream_stream_error")),
        "{label:?}\n{logs}"
    );
    assert_one_row_per_success(&rows, &outcomes);
}

/// A private PostgreSQL cluster under the temp dir that the test can stop
/// and start; removed with its directory at the end.
struct OwnCluster {
    pg: Arc<storage::embedded::EmbeddedPostgres>,
    dir: std::path::PathBuf,
}

impl OwnCluster {
    async fn start() -> Option<Self> {
        storage::embedded::find_binaries()?;
        let dir =
            std::env::temp_dir().join(format!("llmgw-outage-{}", uuid::Uuid::new_v4().simple()));
        let d = dir.clone();
        let pg = tokio::task::spawn_blocking(move || {
            let pg = storage::embedded::EmbeddedPostgres::init(&d).expect("initdb");
            pg.start().expect("start the cluster");
            pg
        })
        .await
        .unwrap();
        Some(Self {
            pg: Arc::new(pg),
            dir,
        })
    }

    /// `DATABASE_URL` for the cluster's Unix socket.
    fn url(&self) -> String {
        let o = self.pg.connect_options("postgres");
        let socket = o.get_socket().expect("a socket cluster");
        format!(
            "postgres://postgres@localhost:{}/postgres?host={}",
            o.get_port(),
            socket.display()
        )
    }

    async fn stop(&self) {
        let pg = self.pg.clone();
        tokio::task::spawn_blocking(move || pg.stop())
            .await
            .unwrap()
            .expect("stop the cluster");
    }

    async fn restart(&self) {
        let pg = self.pg.clone();
        tokio::task::spawn_blocking(move || pg.start())
            .await
            .unwrap()
            .expect("restart the cluster");
    }
}

impl Drop for OwnCluster {
    fn drop(&mut self) {
        let _ = self.pg.stop();
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

async fn get(http: &reqwest::Client, url: &str, bearer: Option<&str>) -> (u16, Value) {
    let mut r = http.get(url);
    if let Some(b) = bearer {
        r = r.header("authorization", b);
    }
    let r = r.send().await.unwrap();
    let status = r.status().as_u16();
    (status, r.json().await.unwrap_or(Value::Null))
}

/// PostgreSQL stopped for 11 s while a client keeps calling with a key the
/// gateway has cached: every call succeeds (plain and streamed); `/readyz`
/// answers 503 on both listeners and the settings API answers 503
/// `database_unavailable`; once the cluster is back the pool reconnects by
/// itself, `/readyz` is 200 again and every usage row, queued during the
/// outage, is written exactly once.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn database_outage_keeps_cached_keys_serving_and_writes_usage_after_recovery() {
    let Some(cluster) = OwnCluster::start().await else {
        eprintln!("skipped: no PostgreSQL binaries on this machine");
        return;
    };
    let upstream = MockUpstream::start().await;
    let mut cmd = llmgw();
    cmd.env("DATABASE_URL", cluster.url())
        .env(
            "LLMGW_ENCRYPTION_KEYS",
            format!("1:{}", storage::Keyring::generate_key_material()),
        )
        .env("LLMGW_UPSTREAM_ALLOW_PRIVATE", "true")
        .env("LLMGW_UPSTREAM_CA_FILE", &upstream.ca.ca_file)
        .env("LLMGW_LOG_FLUSH_INTERVAL_MS", "100")
        // Not a drain test: a connection left open must not hold the exit for 30 s.
        .env("LLMGW_SHUTDOWN_GRACE_MS", "5000");
    let running = tokio::task::spawn_blocking(move || Running::start(cmd))
        .await
        .unwrap();
    let tenant = provision(&running.api, &upstream.base_url, "sk-upstream-token-1234").await;
    let http = reqwest::Client::builder()
        .timeout(Duration::from_secs(10))
        .build()
        .unwrap();
    let (gw, key) = (running.gateway.as_str(), tenant.api_key.as_str());
    let orgs = format!("{}/api/v1/orgs", running.api);
    let bearer = Some(tenant.bearer.as_str());

    // Warm the caches: the key and the provider are now known.
    let mut outcomes = Vec::new();
    for _ in 0..3 {
        outcomes.push(chat(&http, gw, key, "mycompany/m", false).await);
    }
    assert!(outcomes.iter().all(Outcome::succeeded), "{outcomes:?}");

    cluster.stop().await;
    let down = Instant::now();
    let outage = Duration::from_secs(11);
    let mut i = 0usize;
    while down.elapsed() < outage {
        let o = chat(&http, gw, key, "mycompany/m", i % 2 == 1).await;
        assert!(
            o.succeeded(),
            "request during the outage failed: {o:?}\n{}",
            running.logs()
        );
        outcomes.push(o);
        if i.is_multiple_of(10) {
            for ready in [format!("{gw}/readyz"), format!("{}/readyz", running.api)] {
                assert_eq!(get(&http, &ready, None).await.0, 503, "{ready}");
            }
            let (status, body) = get(&http, &orgs, bearer).await;
            assert_eq!(status, 503, "{body}");
            assert_eq!(body["error"]["code"], "database_unavailable", "{body}");
            assert!(
                body["error"]["message"]
                    .as_str()
                    .is_some_and(|m| m.contains("database")),
                "{body}"
            );
        }
        i += 1;
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    let during = outcomes.len() - 3;
    assert!(during >= 20, "only {during} requests during the outage");
    // The rows wait in the queue, visible in the metrics.
    let metrics = http
        .get(format!("{gw}/metrics"))
        .send()
        .await
        .unwrap()
        .text()
        .await
        .unwrap();
    let depth: usize = metrics
        .lines()
        .find_map(|l| l.strip_prefix("llmgw_gateway_usage_queue_depth "))
        .and_then(|v| v.trim().parse().ok())
        .expect("queue depth metric");
    assert!(depth >= during, "queue depth {depth} < {during}\n{metrics}");

    cluster.restart().await;
    let back = Instant::now();
    let deadline = back + Duration::from_secs(20);
    while get(&http, &format!("{gw}/readyz"), None).await.0 != 200 {
        assert!(
            Instant::now() < deadline,
            "gateway never ready again\n{}",
            running.logs()
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    let ready_after = back.elapsed();
    let (status, body) = get(&http, &orgs, bearer).await;
    assert_eq!(status, 200, "{body}");
    // Requests keep working after the recovery too.
    for _ in 0..3 {
        let o = chat(&http, gw, key, "mycompany/m", true).await;
        assert!(o.succeeded(), "{o:?}");
        outcomes.push(o);
    }

    let mut pool = None;
    for _ in 0..50 {
        match sqlx::PgPool::connect_with(cluster.pg.connect_options("postgres")).await {
            Ok(p) => {
                pool = Some(p);
                break;
            }
            Err(_) => tokio::time::sleep(Duration::from_millis(100)).await,
        }
    }
    let pool = pool.expect("connect to the restarted cluster");
    let rows = wait_for_rows(&pool, outcomes.len(), Duration::from_secs(20)).await;
    assert_one_row_per_success(&rows, &outcomes);
    eprintln!(
        "{during} requests during an outage of {outage:?}; ready {ready_after:?} after restart; {} rows",
        rows.len()
    );
    pool.close().await;

    let (status, logs) = tokio::task::spawn_blocking(move || running.terminate())
        .await
        .unwrap();
    assert!(status.success(), "{logs}");
}
