//! The deployment DESIGN.md's "Scale" describes, as processes: three
//! `llmgw serve --only gateway` replicas and one `llmgw serve --only api` on
//! one PostgreSQL database and one Redis (started here). A client spreads
//! its load over the three, as a load balancer would:
//! - every replica serves a share of it;
//! - a key revoked and a limit changed through the API are seen by all
//!   three within a second;
//! - a replica killed with SIGKILL mid-load loses no usage row of the
//!   requests the other two served.

mod common;

use std::collections::HashSet;
use std::sync::atomic::{AtomicBool, Ordering::Relaxed};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use serde_json::{json, Value};
use testkit::{MockUpstream, RedisServer, TestDb};

use common::{chat, provision, Running, Tenant};

const REPLICAS: usize = 3;

struct Deployment {
    t: TestDb,
    _upstream: MockUpstream,
    _redis: RedisServer,
    api: Running,
    gateways: Vec<Running>,
    tenant: Tenant,
    http: reqwest::Client,
}

impl Deployment {
    /// `None` when `redis-server` is missing (a failure under `CI=true`).
    async fn start() -> Option<Self> {
        let redis = RedisServer::start()?;
        let t = TestDb::new().await;
        let upstream = MockUpstream::start().await;
        let mut starting = Vec::new();
        for i in 0..=REPLICAS {
            let mut cmd = common::llmgw_against(&t, &upstream);
            cmd.env("LLMGW_REDIS_URL", redis.url())
                .env("LLMGW_LOG_FLUSH_INTERVAL_MS", "100")
                .env("LLMGW_SHUTDOWN_GRACE_MS", "5000");
            starting.push(tokio::task::spawn_blocking(move || {
                if i == REPLICAS {
                    Running::start_api_only(cmd)
                } else {
                    let g = Running::start_gateway_only(cmd);
                    g.wait_for_log("limits: connected to Redis", Duration::from_secs(15));
                    g
                }
            }));
        }
        let mut gateways = Vec::new();
        for s in starting {
            gateways.push(s.await.unwrap());
        }
        let api = gateways.pop().unwrap();
        let tenant = provision(&api.api, &upstream.base_url, "sk-replicas-token-1").await;
        Some(Self {
            t,
            _upstream: upstream,
            _redis: redis,
            api,
            gateways,
            tenant,
            http: reqwest::Client::builder()
                .timeout(Duration::from_secs(10))
                .build()
                .unwrap(),
        })
    }

    fn api_url(&self, path: &str) -> String {
        format!("{}/api/v1/orgs/{}/{path}", self.api.api, self.tenant.org_id)
    }

    /// A new key with these limits: (id, secret).
    async fn key(&self, name: &str, limits: Value) -> (String, String) {
        let r = self
            .http
            .post(self.api_url("api-keys"))
            .header("authorization", &self.tenant.bearer)
            .json(&json!({"name": name, "limits": limits}))
            .send()
            .await
            .unwrap();
        assert_eq!(r.status(), 201);
        let body: Value = r.json().await.unwrap();
        (
            body["id"].as_str().unwrap().to_owned(),
            body["key"].as_str().unwrap().to_owned(),
        )
    }
}

/// Polls every gateway with `key` until `seen` holds for its answer; each
/// must get there within a second of `since`.
async fn each_within_a_second(
    d: &Deployment,
    key: &str,
    since: Instant,
    what: &str,
    seen: impl Fn(u16, &reqwest::header::HeaderMap) -> bool,
) {
    for (i, g) in d.gateways.iter().enumerate() {
        loop {
            let (status, headers) =
                chat(&d.http, &g.gateway, key, &uuid::Uuid::new_v4().to_string())
                    .await
                    .expect("gateway answers");
            if seen(status, &headers) {
                break;
            }
            assert!(
                since.elapsed() < Duration::from_secs(1),
                "replica {i} has not seen {what} after {:?} (status {status})",
                since.elapsed()
            );
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }
    let took = since.elapsed();
    assert!(took < Duration::from_secs(1), "{what} took {took:?}");
    eprintln!("{what}: seen by all {REPLICAS} replicas after {took:?}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn three_gateways_share_the_load_see_changes_within_a_second_and_a_killed_one_loses_no_other_row(
) {
    let Some(mut d) = Deployment::start().await else {
        return;
    };

    // A limit change: every replica answers with the new limit's header.
    let (limited_id, limited) = d.key("limited", json!({"requests_per_minute": 1000})).await;
    for g in &d.gateways {
        let (status, h) = chat(&d.http, &g.gateway, &limited, "warm").await.unwrap();
        assert_eq!(status, 200);
        assert_eq!(h["x-ratelimit-limit-requests"], "1000");
    }
    let changed = Instant::now();
    let r = d
        .http
        .patch(d.api_url(&format!("api-keys/{limited_id}")))
        .header("authorization", &d.tenant.bearer)
        .json(&json!({"limits": {"requests_per_minute": 500}}))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 200);
    each_within_a_second(&d, &limited, changed, "the limit change", |status, h| {
        assert_eq!(status, 200);
        h.get("x-ratelimit-limit-requests")
            .is_some_and(|v| v == "500")
    })
    .await;

    // A revocation: every replica refuses the key.
    let (doomed_id, doomed) = d.key("doomed", json!({})).await;
    for g in &d.gateways {
        assert_eq!(
            chat(&d.http, &g.gateway, &doomed, "warm").await.unwrap().0,
            200
        );
    }
    let revoked = Instant::now();
    let r = d
        .http
        .delete(d.api_url(&format!("api-keys/{doomed_id}")))
        .header("authorization", &d.tenant.bearer)
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 200);
    each_within_a_second(&d, &doomed, revoked, "the revocation", |status, _| {
        assert!(status == 200 || status == 401, "{status}");
        status == 401
    })
    .await;

    // Load over the three, round robin from 8 clients; replica 2 is
    // killed with SIGKILL after a second of it.
    let key = d.tenant.api_key.clone();
    let bases: Vec<String> = d.gateways.iter().map(|g| g.gateway.clone()).collect();
    let served: Arc<Mutex<Vec<Vec<String>>>> = Arc::new(Mutex::new(vec![Vec::new(); REPLICAS]));
    let stop = Arc::new(AtomicBool::new(false));
    let mut clients = Vec::new();
    for c in 0..8usize {
        let (http, key, bases) = (d.http.clone(), key.clone(), bases.clone());
        let (served, stop) = (served.clone(), stop.clone());
        clients.push(tokio::spawn(async move {
            let mut n = c;
            while !stop.load(Relaxed) {
                let i = n % REPLICAS;
                n += 1;
                let id = uuid::Uuid::new_v4().to_string();
                if let Some((200, _)) = chat(&http, &bases[i], &key, &id).await {
                    served.lock().unwrap()[i].push(id);
                }
            }
        }));
    }
    tokio::time::sleep(Duration::from_secs(1)).await;
    let victim = REPLICAS - 1;
    d.gateways[victim].kill_hard();
    let killed_with = served.lock().unwrap()[victim].len();
    tokio::time::sleep(Duration::from_secs(2)).await;
    stop.store(true, Relaxed);
    for c in clients {
        c.await.unwrap();
    }
    let served = std::mem::take(&mut *served.lock().unwrap());
    for (i, ids) in served.iter().enumerate() {
        assert!(!ids.is_empty(), "replica {i} served nothing");
    }
    assert!(killed_with > 0);

    // The survivors' rows: every request they served has exactly one.
    let survivors: Vec<&String> = served[..victim].iter().flatten().collect();
    let pool = d.t.db.pool().clone();
    let deadline = Instant::now() + Duration::from_secs(10);
    let rows: Vec<String> = loop {
        let rows: Vec<String> = sqlx::query_scalar(
            "SELECT request_id FROM request_logs WHERE api_key_id IS NOT NULL AND org_id = $1::uuid",
        )
        .bind(&d.tenant.org_id)
        .fetch_all(&pool)
        .await
        .unwrap();
        let have: HashSet<&str> = rows.iter().map(String::as_str).collect();
        if survivors.iter().all(|id| have.contains(id.as_str())) || Instant::now() > deadline {
            break rows;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    };
    let mut count = std::collections::HashMap::<&str, usize>::new();
    for r in &rows {
        *count.entry(r.as_str()).or_default() += 1;
    }
    let missing = survivors
        .iter()
        .filter(|id| !count.contains_key(id.as_str()))
        .count();
    assert_eq!(
        missing,
        0,
        "{missing} of {} survivor rows lost",
        survivors.len()
    );
    assert!(
        survivors.iter().all(|id| count[id.as_str()] == 1),
        "a survivor request logged twice"
    );
    // The killed replica wrote at most what it served, never a row twice.
    let victims: HashSet<&str> = served[victim].iter().map(String::as_str).collect();
    assert!(victims
        .iter()
        .all(|id| count.get(id).is_none_or(|n| *n == 1)));
    eprintln!(
        "served per replica {:?}; replica {victim} killed after {killed_with}; {} survivor rows all present",
        served.iter().map(Vec::len).collect::<Vec<_>>(),
        survivors.len()
    );
    for g in d.gateways.drain(..victim) {
        let (status, logs) = tokio::task::spawn_blocking(move || g.terminate())
            .await
            .unwrap();
        assert!(status.success(), "{logs}");
    }
}
