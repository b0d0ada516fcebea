//! Shared by the gateway's integration tests: a database, an org with a key,
//! a mock upstream and a running gateway.
#![allow(dead_code)]

use std::path::Path;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use gateway::{Gateway, GatewayConfig};
use serde_json::{json, Value};
use storage::domain::{BaseUrl, Email, ProviderName};
use storage::logs::RequestLog;
use storage::secrets::ProviderToken;
use storage::{Actor, Db};
pub use testkit::sqlx;
use testkit::{MockUpstream, TestDb};
use upstream::{UpstreamClient, UpstreamConfig};
use uuid::Uuid;

/// JSON without reqwest's `json` feature.
pub trait JsonBody {
    fn json_body(self, v: &Value) -> Self;
}

impl JsonBody for reqwest::RequestBuilder {
    fn json_body(self, v: &Value) -> Self {
        self.header("content-type", "application/json")
            .body(serde_json::to_vec(v).unwrap())
    }
}

pub trait JsonValue {
    async fn json_value(self) -> Value;
}

impl JsonValue for reqwest::Response {
    async fn json_value(self) -> Value {
        serde_json::from_slice(&self.bytes().await.unwrap()).unwrap()
    }
}

pub const TOKEN: &str = "sk-upstream-secret-7f3a9c";

pub struct Org {
    pub id: Uuid,
    pub key: String,
    pub key_id: Uuid,
    /// The owner's user id.
    pub owner: Uuid,
}

pub async fn make_org(db: &Db) -> Org {
    let email = Email::parse(&format!("{}@example.com", Uuid::new_v4().simple())).unwrap();
    let user = db
        .create_user(&email, "$argon2id$not-a-real-hash")
        .await
        .unwrap();
    let org = db.create_org("acme", user.id).await.unwrap();
    let (key, secret) = db
        .create_api_key(org.id, Actor(None), "test", None)
        .await
        .unwrap();
    Org {
        id: org.id,
        key: secret.expose_secret().to_owned(),
        key_id: key.id,
        owner: user.id,
    }
}

/// Sets a provider's status to inactive.
pub async fn deactivate(db: &Db, org: Uuid, id: Uuid) {
    db.update_provider_key(
        org,
        Actor(None),
        id,
        storage::providers::ProviderPatch {
            status: Some(storage::domain::ProviderStatus::Inactive),
            ..Default::default()
        },
    )
    .await
    .unwrap();
}

pub async fn add_provider(db: &Db, org: Uuid, name: &str, base_url: &str) -> Uuid {
    db.create_provider_key(
        org,
        Actor(None),
        &ProviderName::parse(name).unwrap(),
        &BaseUrl::parse(base_url).unwrap(),
        &ProviderToken::parse(TOKEN).unwrap(),
    )
    .await
    .unwrap()
    .id
}

/// What a test changes in the gateway's setup.
#[derive(Clone, Copy)]
pub struct Opts {
    pub allow_private: bool,
    pub timeout: Duration,
    pub max_body_bytes: usize,
    pub max_response_bytes: usize,
    pub client_body_timeout: Duration,
    /// The server's limit for receiving a request head (production: 30 s).
    pub client_request_timeout: Duration,
}

impl Default for Opts {
    fn default() -> Self {
        Self {
            allow_private: true,
            timeout: Duration::from_secs(10),
            max_body_bytes: 10 << 20,
            max_response_bytes: 32 << 20,
            client_body_timeout: Duration::from_secs(30),
            client_request_timeout: Duration::from_secs(30),
        }
    }
}

pub fn config(ca: &Path, allow_private: bool, timeout: Duration) -> GatewayConfig {
    let client = UpstreamClient::new(&UpstreamConfig {
        allow_private,
        allow_http: false,
        ca_file: Some(ca.to_path_buf()),
        connect_timeout: Duration::from_secs(2),
        http2: false,
        timeout,
    })
    .unwrap();
    let mut cfg = GatewayConfig::new(client);
    cfg.log_flush_interval = Duration::from_millis(20);
    cfg
}

/// A database, an org with a key, a `mycompany` provider on a mock upstream, and a gateway.
pub struct Env {
    pub tdb: TestDb,
    pub org: Org,
    pub upstream: MockUpstream,
    pub gw: Gateway,
    pub url: String,
    pub addr: std::net::SocketAddr,
    pub server: actix_web::dev::ServerHandle,
    pub http: reqwest::Client,
    /// Client connections the gateway's HTTP server holds open.
    pub conns: Arc<AtomicUsize>,
}

impl Env {
    pub async fn new() -> Self {
        Self::with(Opts::default()).await
    }

    pub async fn with(opts: Opts) -> Self {
        Self::with_limiter(opts, None).await
    }

    /// [`Env::with`], the gateway's spend controls on `limiter` (default: in process).
    pub async fn with_limiter(opts: Opts, limiter: Option<limits::Limiter>) -> Self {
        Self::with_config(opts, |cfg| {
            if let Some(l) = limiter {
                cfg.limiter = l;
            }
        })
        .await
    }

    /// [`Env::with`], the gateway's configuration changed by `edit` last.
    pub async fn with_config(opts: Opts, edit: impl FnOnce(&mut GatewayConfig)) -> Self {
        let tdb = TestDb::new().await;
        let org = make_org(&tdb.db).await;
        let upstream = MockUpstream::start().await;
        add_provider(&tdb.db, org.id, "mycompany", &upstream.base_url).await;
        let mut cfg = config(&upstream.ca.ca_file, opts.allow_private, opts.timeout);
        cfg.max_body_bytes = opts.max_body_bytes;
        cfg.max_response_bytes = opts.max_response_bytes;
        cfg.client_body_timeout = opts.client_body_timeout;
        edit(&mut cfg);
        let gw = Gateway::start(tdb.db.clone(), cfg).await;
        let served = serve_with(&gw, opts.client_request_timeout);
        Self {
            tdb,
            org,
            upstream,
            gw,
            url: format!("http://{}", served.addr),
            addr: served.addr,
            server: served.handle,
            http: reqwest::Client::new(),
            conns: served.conns,
        }
    }

    pub fn db(&self) -> &Db {
        &self.tdb.db
    }

    pub async fn chat_with_key(&self, key: &str, body: &Value) -> reqwest::Response {
        self.http
            .post(format!("{}/v1/chat/completions", self.url))
            .bearer_auth(key)
            .json_body(body)
            .send()
            .await
            .unwrap()
    }

    /// The gateway's `/metrics` text.
    pub async fn metrics(&self) -> String {
        self.http
            .get(format!("{}/metrics", self.url))
            .send()
            .await
            .unwrap()
            .text()
            .await
            .unwrap()
    }

    pub async fn chat(&self, body: &Value) -> reqwest::Response {
        self.chat_with_key(&self.org.key, body).await
    }

    /// Stops the gateway (flushing usage rows) and returns the org's rows.
    pub async fn rows(&self) -> Vec<RequestLog> {
        self.gw.shutdown().await;
        sqlx::query_as::<_, RequestLog>(
            "SELECT * FROM request_logs WHERE org_id = $1 ORDER BY created_at",
        )
        .bind(self.org.id)
        .fetch_all(self.db().pool())
        .await
        .unwrap()
    }

    pub async fn stop(self) {
        self.gw.shutdown().await;
        self.server.stop(false).await;
    }
}

/// A gateway served as production serves it (`TCP_NODELAY`, a bound on
/// receiving request heads), counting its open client connections.
pub struct Served {
    pub addr: std::net::SocketAddr,
    pub handle: actix_web::dev::ServerHandle,
    pub conns: Arc<AtomicUsize>,
}

/// Counts one open connection while it lives in the connection's extensions.
struct Live(Arc<AtomicUsize>);

impl Drop for Live {
    fn drop(&mut self) {
        self.0.fetch_sub(1, Ordering::SeqCst);
    }
}

pub fn serve_with(gw: &Gateway, client_request_timeout: Duration) -> Served {
    let gw = gw.clone();
    let conns = Arc::new(AtomicUsize::new(0));
    let counter = conns.clone();
    let server = actix_web::HttpServer::new(move || {
        let gw = gw.clone();
        actix_web::App::new().configure(move |c| gw.configure(c))
    })
    .workers(2)
    .disable_signals()
    .shutdown_timeout(5)
    .client_request_timeout(client_request_timeout)
    .on_connect(move |conn, ext| {
        if let Some(tcp) = conn.downcast_ref::<tokio::net::TcpStream>() {
            let _ = tcp.set_nodelay(true);
        }
        counter.fetch_add(1, Ordering::SeqCst);
        ext.insert(Arc::new(Live(counter.clone())));
    })
    .bind(("127.0.0.1", 0))
    .expect("bind test gateway");
    let addr = server.addrs()[0];
    let server = server.run();
    let handle = server.handle();
    tokio::spawn(server);
    Served {
        addr,
        handle,
        conns,
    }
}

pub fn serve(gw: &Gateway) -> (String, actix_web::dev::ServerHandle) {
    let s = serve_with(gw, Duration::from_secs(30));
    (format!("http://{}", s.addr), s.handle)
}

/// Waits (a few seconds at most) until `what` holds.
pub async fn eventually(what: &str, mut check: impl FnMut() -> bool) {
    let deadline = Instant::now() + Duration::from_secs(5);
    while !check() {
        assert!(Instant::now() < deadline, "never happened: {what}");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

pub fn messages() -> Value {
    json!([{"role": "user", "content": "hello there"}])
}

/// Asserts OpenAI's error shape and returns `(message, code)`.
/// A chat to a provider `stranger` whose certificate is signed by a CA the
/// gateway was not told about; the upstream and the 502's (message, code).
pub async fn chat_to_untrusted_upstream(env: &Env) -> (MockUpstream, String, String) {
    let stranger = MockUpstream::start_with_ca(Arc::new(testkit::TestCa::new())).await;
    add_provider(env.db(), env.org.id, "stranger", &stranger.base_url).await;
    let (msg, code) = openai_error(
        env.chat(&json!({"model": "stranger/x", "messages": messages()}))
            .await,
        502,
    )
    .await;
    (stranger, msg, code)
}

/// Adds a provider at a local port nothing listens on (bound, then released).
pub async fn add_closed_port_provider(env: &Env, name: &str) -> Uuid {
    let port = std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port();
    add_provider(
        env.db(),
        env.org.id,
        name,
        &format!("https://127.0.0.1:{port}"),
    )
    .await
}

pub async fn openai_error(resp: reqwest::Response, status: u16) -> (String, String) {
    assert_eq!(resp.status().as_u16(), status);
    assert!(resp.headers().contains_key("x-request-id"));
    assert!(resp.headers()["content-type"]
        .to_str()
        .unwrap()
        .starts_with("application/json"));
    let text = resp.text().await.unwrap();
    assert!(!text.contains(TOKEN), "token leaked: {text}");
    let v: Value = serde_json::from_str(&text).unwrap();
    let e = &v["error"];
    for field in ["message", "type", "param", "code"] {
        assert!(e.get(field).is_some(), "no {field} in {text}");
    }
    (
        e["message"].as_str().unwrap().to_owned(),
        e["code"].as_str().unwrap_or_default().to_owned(),
    )
}
