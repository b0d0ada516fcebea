//! Endpoint health as the settings API shows it, from what the gateways
//! report through Redis: `llmgw serve --only api` and one or two
//! `llmgw serve --only gateway` processes on one database and a Redis
//! started here. An endpoint whose server stops is `ejected` in the API
//! within seconds and `healthy` again once it is back and passed its probe;
//! one replica's fresh `ejected` wins over another's `healthy`, and a killed
//! replica's view stops counting after its TTL; with Redis stopped the API
//! answers `unknown` at once, the gateway keeps serving, and the reports
//! resume when Redis is back.

mod common;

use std::process::Command;
use std::time::{Duration, Instant};

use serde_json::{json, Value};
use testkit::{MockUpstream, RedisServer, TestDb};

use common::{provision, Running, Tenant};

const PROVIDER_TOKEN: &str = "sk-upstream-health-token";

/// The API and `gateways` gateway processes on one database and Redis, a
/// tenant whose provider `mycompany` has two endpoints: `a` (its own) and `b`.
struct Fleet {
    redis: RedisServer,
    api: Running,
    gateways: Vec<Running>,
    a: MockUpstream,
    b: MockUpstream,
    tenant: Tenant,
    provider: String,
    http: reqwest::Client,
    _t: TestDb,
}

fn with_redis(t: &TestDb, upstream: &MockUpstream, redis: &RedisServer) -> Command {
    let mut cmd = common::llmgw_against(t, upstream);
    cmd.env("LLMGW_REDIS_URL", redis.url());
    cmd
}

impl Fleet {
    async fn start(gateways: usize) -> Option<Self> {
        let redis = RedisServer::start()?;
        let t = TestDb::new().await;
        let a = MockUpstream::start().await;
        let b = MockUpstream::start_with_ca(a.ca.clone()).await;
        let cmd = with_redis(&t, &a, &redis);
        let api = tokio::task::spawn_blocking(move || {
            let api = Running::start_api_only(cmd);
            api.wait_for_log("health: connected to Redis", Duration::from_secs(15));
            api
        });
        let starting: Vec<_> = (0..gateways)
            .map(|_| {
                let cmd = with_redis(&t, &a, &redis);
                tokio::task::spawn_blocking(move || {
                    let g = Running::start_gateway_only(cmd);
                    g.wait_for_log("health: connected to Redis", Duration::from_secs(15));
                    g
                })
            })
            .collect();
        let api = api.await.unwrap();
        let mut running = Vec::new();
        for g in starting {
            running.push(g.await.unwrap());
        }
        let tenant = provision(&api.api, &a.base_url, PROVIDER_TOKEN).await;
        let http = reqwest::Client::new();
        let providers: Value = http
            .get(format!(
                "{}/api/v1/orgs/{}/provider-keys",
                api.api, tenant.org_id
            ))
            .header("authorization", &tenant.bearer)
            .send()
            .await
            .unwrap()
            .json()
            .await
            .unwrap();
        let provider = providers["data"][0]["id"].as_str().unwrap().to_owned();
        let f = Self {
            redis,
            api,
            gateways: running,
            a,
            b,
            tenant,
            provider,
            http,
            _t: t,
        };
        let added = f
            .http
            .post(f.endpoints_url())
            .header("authorization", &f.tenant.bearer)
            .json(&json!({"base_url": f.b.base_url, "token": PROVIDER_TOKEN}))
            .send()
            .await
            .unwrap();
        assert_eq!(added.status(), 201);
        Some(f)
    }

    fn endpoints_url(&self) -> String {
        format!(
            "{}/api/v1/orgs/{}/provider-keys/{}/endpoints",
            self.api.api, self.tenant.org_id, self.provider
        )
    }

    /// Each endpoint's `health` as the API lists them (`a`, then `b`).
    async fn health(&self) -> Vec<String> {
        let resp = self
            .http
            .get(self.endpoints_url())
            .header("authorization", &self.tenant.bearer)
            .send()
            .await
            .unwrap();
        assert_eq!(resp.status(), 200);
        let body: Value = resp.json().await.unwrap();
        body["data"]
            .as_array()
            .unwrap()
            .iter()
            .map(|e| e["health"].as_str().unwrap().to_owned())
            .collect()
    }

    /// A chat through gateway `g`, which must succeed.
    async fn chat(&self, g: usize) {
        let resp = self
            .http
            .post(format!("{}/v1/chat/completions", self.gateways[g].gateway))
            .bearer_auth(&self.tenant.api_key)
            .json(&json!({"model": "mycompany/m", "messages": [{"role": "user", "content": "hi"}]}))
            .send()
            .await
            .unwrap();
        assert_eq!(resp.status(), 200, "{}", resp.text().await.unwrap());
    }

    /// Chats through gateway `g` (when given) until the API shows `want`;
    /// how long that took. Fails after `limit`.
    async fn until(&self, g: Option<usize>, want: [&str; 2], limit: Duration) -> Duration {
        let start = Instant::now();
        loop {
            if let Some(g) = g {
                self.chat(g).await;
            }
            let seen = self.health().await;
            if seen == want {
                return start.elapsed();
            }
            assert!(
                start.elapsed() < limit,
                "the API shows {seen:?}, not {want:?}, after {limit:?}\n{}",
                self.logs()
            );
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }

    fn logs(&self) -> String {
        let mut out = format!("--- api:\n{}", self.api.logs());
        for (i, g) in self.gateways.iter().enumerate() {
            out.push_str(&format!("--- gateway {i}:\n{}", g.logs()));
        }
        out
    }

    /// The views of endpoint `b` on Redis, as `redis-cli` shows the hash.
    fn views_of_b(&self, b: &str) -> Vec<String> {
        let key = format!("llmgw:{{{}}}:health:{b}", self.tenant.org_id);
        let out = Command::new("redis-cli")
            .args(["-p", &self.redis.port().to_string(), "HVALS", &key])
            .output()
            .expect("redis-cli runs");
        let mut v: Vec<String> = String::from_utf8_lossy(&out.stdout)
            .lines()
            .map(|l| l.split(':').next().unwrap_or_default().to_owned())
            .collect();
        v.sort();
        v
    }

    async fn b_id(&self) -> String {
        let body: Value = self
            .http
            .get(self.endpoints_url())
            .header("authorization", &self.tenant.bearer)
            .send()
            .await
            .unwrap()
            .json()
            .await
            .unwrap();
        body["data"][1]["id"].as_str().unwrap().to_owned()
    }
}

#[tokio::test]
async fn a_stopped_endpoint_is_ejected_in_the_api_then_healthy_after_its_probe() {
    let Some(mut f) = Fleet::start(1).await else {
        return;
    };
    f.until(Some(0), ["healthy", "healthy"], Duration::from_secs(10))
        .await;
    let port = f.b.port;
    f.b.stop().await;
    let ejected = f
        .until(Some(0), ["healthy", "ejected"], Duration::from_secs(10))
        .await;
    eprintln!("ejected in the API {ejected:?} after the endpoint stopped");
    let metrics = reqwest::get(format!("{}/metrics", f.gateways[0].gateway))
        .await
        .unwrap()
        .text()
        .await
        .unwrap();
    assert!(
        metrics.contains("llmgw_gateway_endpoints{health=\"ejected\"} 1"),
        "{metrics}"
    );
    // Back on its port: healthy once the 5 s cooldown passed and its probe did.
    f.b = MockUpstream::start_on(f.a.ca.clone(), port).await;
    let back = f
        .until(Some(0), ["healthy", "healthy"], Duration::from_secs(20))
        .await;
    eprintln!("healthy in the API {back:?} after the endpoint came back");
    assert!(
        f.b.seen().iter().any(|r| r.path == "/v1/models"),
        "healthy without a probe"
    );
}

#[tokio::test]
async fn a_fresh_ejected_view_wins_and_a_killed_replicas_view_expires() {
    let Some(mut f) = Fleet::start(2).await else {
        return;
    };
    // Both replicas take traffic, so both report both endpoints.
    for _ in 0..4 {
        f.chat(0).await;
        f.chat(1).await;
    }
    f.until(None, ["healthy", "healthy"], Duration::from_secs(10))
        .await;
    let b = f.b_id().await;
    f.b.stop().await;
    // Only gateway 0 meets the stopped endpoint: gateway 1 still sees it healthy.
    f.until(Some(0), ["healthy", "ejected"], Duration::from_secs(10))
        .await;
    assert_eq!(
        f.views_of_b(&b),
        ["1", "3"],
        "one healthy view, one ejected"
    );
    for _ in 0..3 {
        tokio::time::sleep(Duration::from_secs(1)).await;
        assert_eq!(
            f.health().await,
            ["healthy", "ejected"],
            "the ejected view wins"
        );
    }
    // Gateway 0 gone without a word: its view stops counting within the TTL.
    f.gateways[0].kill_hard();
    let expired = f
        .until(None, ["healthy", "healthy"], Duration::from_secs(15))
        .await;
    eprintln!("the killed replica's view stopped counting after {expired:?}");
    // Its last refresh was at most 2 s before the kill, and counts for 6 s.
    assert!(expired >= Duration::from_secs(3), "{expired:?}");
    // The next write of gateway 1 (every 2 s) removes the expired view.
    let deadline = Instant::now() + Duration::from_secs(5);
    while f.views_of_b(&b) != ["1"] {
        assert!(
            Instant::now() < deadline,
            "the expired view is still there: {:?}",
            f.views_of_b(&b)
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

#[tokio::test]
async fn without_redis_the_api_shows_unknown_at_once_and_the_gateway_keeps_serving() {
    let Some(mut f) = Fleet::start(1).await else {
        return;
    };
    f.until(Some(0), ["healthy", "healthy"], Duration::from_secs(10))
        .await;
    f.redis.kill();
    let mut slowest = Duration::ZERO;
    for _ in 0..10 {
        let start = Instant::now();
        assert_eq!(f.health().await, ["unknown", "unknown"]);
        slowest = slowest.max(start.elapsed());
        f.chat(0).await;
    }
    eprintln!("slowest endpoint list with Redis stopped: {slowest:?}");
    assert!(slowest < Duration::from_millis(500), "{slowest:?}");
    let logs = f.api.logs();
    assert!(
        logs.contains("cannot read endpoint health from Redis"),
        "{logs}"
    );
    assert!(!logs.contains("ERROR"), "{logs}");
    // Back (empty): the reports resume.
    f.redis.restart();
    let back = f
        .until(Some(0), ["healthy", "healthy"], Duration::from_secs(15))
        .await;
    eprintln!("health shown again {back:?} after Redis came back");
}
