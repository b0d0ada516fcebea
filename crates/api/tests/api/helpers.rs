//! Spawns the API on port 0 over a fresh database and talks to it like a client.

use std::io::Write;
use std::path::PathBuf;
use std::sync::{Arc, Mutex, OnceLock};
use std::time::Duration;

use api::{Api, ApiConfig};
use reqwest::Method;
use serde_json::{json, Value};
use testkit::{spawn_http, TestDb};
use upstream::{UpstreamClient, UpstreamConfig};

pub const PASSWORD: &str = "correct horse battery staple";

/// Every log line any test of this binary produced.
static LOGS: Mutex<Vec<u8>> = Mutex::new(Vec::new());

struct Capture;

impl Write for Capture {
    fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        LOGS.lock()
            .unwrap_or_else(|e| e.into_inner())
            .extend_from_slice(buf);
        Ok(buf.len())
    }
    fn flush(&mut self) -> std::io::Result<()> {
        Ok(())
    }
}

/// Captures the log output of every crate at TRACE level (once per test binary).
fn capture_logs() {
    static ONCE: OnceLock<()> = OnceLock::new();
    ONCE.get_or_init(|| {
        let _ = tracing_subscriber::fmt()
            .with_env_filter("trace")
            .with_ansi(false)
            .with_writer(|| Capture)
            .try_init();
    });
}

pub fn captured_logs() -> String {
    String::from_utf8_lossy(&LOGS.lock().unwrap_or_else(|e| e.into_inner())).into_owned()
}

/// Options that differ between tests.
#[derive(Clone)]
pub struct Opts {
    pub allow_signup: bool,
    pub allow_private: bool,
    pub allow_http: bool,
    pub max_body_bytes: usize,
    pub session_ttl: Duration,
    pub session_idle: Duration,
    pub body_timeout: Duration,
    pub ca_file: Option<PathBuf>,
    pub trusted_proxies: api::TrustedProxies,
    pub browser: api::BrowserConfig,
    /// The limiter whose counters `/limits` shows (`None`: no Redis).
    pub limiter: Option<limits::Limiter>,
    /// Where endpoint health is read (`None`: no Redis, all `unknown`).
    pub health: Option<limits::HealthViews>,
}

impl Default for Opts {
    fn default() -> Self {
        Self {
            allow_signup: true,
            allow_private: false,
            allow_http: false,
            max_body_bytes: 64 * 1024,
            session_ttl: Duration::from_secs(3600),
            session_idle: Duration::from_secs(3600),
            body_timeout: Duration::from_secs(10),
            ca_file: None,
            trusted_proxies: api::TrustedProxies::default(),
            browser: api::BrowserConfig::default(),
            limiter: None,
            health: None,
        }
    }
}

/// An answer, as text and JSON.
#[derive(Debug, Clone)]
pub struct Resp {
    pub status: u16,
    pub text: String,
    pub body: Value,
    pub headers: reqwest::header::HeaderMap,
}

impl Resp {
    pub fn code(&self) -> &str {
        self.body["error"]["code"].as_str().unwrap_or("")
    }

    /// Asserts the DESIGN error shape and returns the fields named in `details`.
    pub fn error_fields(&self) -> Vec<String> {
        let e = &self.body["error"];
        assert!(
            e["code"].is_string() && e["message"].is_string(),
            "not the error shape: {}",
            self.text
        );
        e["details"]
            .as_array()
            .unwrap_or_else(|| panic!("no details array: {}", self.text))
            .iter()
            .map(|d| d["field"].as_str().unwrap_or("").to_owned())
            .collect()
    }

    #[track_caller]
    pub fn expect(&self, status: u16) -> &Self {
        assert_eq!(self.status, status, "unexpected answer: {}", self.text);
        self
    }

    pub fn id(&self) -> String {
        self.body["id"]
            .as_str()
            .unwrap_or_else(|| panic!("no id in {}", self.text))
            .to_owned()
    }
}

/// The API under test.
pub struct TestApp {
    pub base: String,
    pub db: TestDb,
    pub client: reqwest::Client,
    /// Every response body received, for secret scanning.
    pub transcript: Arc<Mutex<Vec<String>>>,
    handle: actix_web::dev::ServerHandle,
}

impl TestApp {
    pub async fn spawn() -> Self {
        Self::spawn_with(Opts::default()).await
    }

    pub async fn spawn_with(opts: Opts) -> Self {
        capture_logs();
        let db = TestDb::new().await;
        let upstream = UpstreamClient::new(&UpstreamConfig {
            allow_private: opts.allow_private,
            allow_http: opts.allow_http,
            ca_file: opts.ca_file.clone(),
            connect_timeout: Duration::from_secs(2),
            http2: false,
            timeout: Duration::from_secs(5),
        })
        .expect("upstream client");
        let api = Api::new(
            db.db.clone(),
            ApiConfig {
                allow_signup: opts.allow_signup,
                session_ttl: opts.session_ttl,
                session_idle: opts.session_idle,
                body_timeout: opts.body_timeout,
                max_body_bytes: opts.max_body_bytes,
                allow_private: opts.allow_private,
                upstream,
                trusted_proxies: opts.trusted_proxies.clone(),
                browser: opts.browser.clone(),
                limiter: opts.limiter.clone(),
                health: opts.health.clone(),
            },
        );
        let (base, handle) = spawn_http(move |cfg| api.configure(cfg));
        Self {
            base,
            db,
            client: reqwest::Client::new(),
            transcript: Arc::default(),
            handle,
        }
    }

    pub async fn send(&self, req: reqwest::RequestBuilder) -> Resp {
        let res = req.send().await.expect("request reaches the API");
        let status = res.status().as_u16();
        let headers = res.headers().clone();
        let text = res.text().await.expect("body");
        self.transcript.lock().unwrap().push(text.clone());
        let body = serde_json::from_str(&text).unwrap_or(Value::Null);
        Resp {
            status,
            text,
            body,
            headers,
        }
    }

    pub fn request(
        &self,
        method: Method,
        path: &str,
        token: Option<&str>,
    ) -> reqwest::RequestBuilder {
        let mut req = self
            .client
            .request(method, format!("{}{}", self.base, path));
        if let Some(t) = token {
            req = req.bearer_auth(t);
        }
        req
    }

    pub async fn call(
        &self,
        method: Method,
        path: &str,
        token: Option<&str>,
        body: Option<Value>,
    ) -> Resp {
        let mut req = self.request(method, path, token);
        if let Some(b) = body {
            req = req.json(&b);
        }
        self.send(req).await
    }

    pub async fn get(&self, path: &str, token: &str) -> Resp {
        self.call(Method::GET, path, Some(token), None).await
    }

    pub async fn post(&self, path: &str, token: &str, body: Value) -> Resp {
        self.call(Method::POST, path, Some(token), Some(body)).await
    }

    pub async fn patch(&self, path: &str, token: &str, body: Value) -> Resp {
        self.call(Method::PATCH, path, Some(token), Some(body))
            .await
    }

    pub async fn delete(&self, path: &str, token: &str) -> Resp {
        self.call(Method::DELETE, path, Some(token), None).await
    }

    /// Logs `email` in with the test password; the 200 response.
    pub async fn login(&self, email: &str) -> Resp {
        let r = self
            .call(
                Method::POST,
                "/api/v1/auth/login",
                None,
                Some(json!({"email": email, "password": PASSWORD})),
            )
            .await;
        r.expect(200);
        r
    }

    /// Signs up `email`; returns (session token, user id).
    pub async fn signup(&self, email: &str) -> (String, String) {
        let r = self
            .call(
                Method::POST,
                "/api/v1/auth/signup",
                None,
                Some(json!({"email": email, "password": PASSWORD})),
            )
            .await;
        r.expect(201);
        (
            r.body["token"].as_str().unwrap().to_owned(),
            r.body["user"]["id"].as_str().unwrap().to_owned(),
        )
    }

    pub async fn create_org(&self, token: &str, name: &str) -> String {
        self.post("/api/v1/orgs", token, json!({"name": name}))
            .await
            .expect(201)
            .id()
    }

    /// `owner` invites `email` into `org` with `role`; answers the invitation (with its token).
    pub async fn invite(&self, owner: &str, org: &str, email: &str, role: &str) -> Resp {
        self.post(
            &format!("/api/v1/orgs/{org}/members"),
            owner,
            json!({"email": email, "role": role}),
        )
        .await
    }

    /// Invites `email` and accepts as `invitee` (the session of that email).
    pub async fn join(&self, owner: &str, org: &str, email: &str, role: &str, invitee: &str) {
        let inv = self.invite(owner, org, email, role).await;
        inv.expect(201);
        self.post(
            &format!("/api/v1/me/invitations/{}/accept", inv.id()),
            invitee,
            json!({"token": inv.body["token"]}),
        )
        .await
        .expect(200);
    }

    pub async fn create_provider(
        &self,
        token: &str,
        org: &str,
        name: &str,
        base_url: &str,
        secret: &str,
    ) -> Resp {
        self.post(
            &format!("/api/v1/orgs/{org}/provider-keys"),
            token,
            json!({"name": name, "base_url": base_url, "token": secret}),
        )
        .await
    }

    /// Asserts `secret` is in no response body and no log line seen so far.
    #[track_caller]
    pub fn assert_never_disclosed(&self, secret: &str) {
        for body in self.transcript.lock().unwrap().iter() {
            assert!(
                !body.contains(secret),
                "secret disclosed in a response: {body}"
            );
        }
        assert!(
            !captured_logs().contains(secret),
            "secret written to the log"
        );
    }
}

impl Drop for TestApp {
    fn drop(&mut self) {
        // `stop` sends its command when called; the future only awaits completion.
        drop(self.handle.stop(false));
    }
}

/// Users of one organization, one per role, and one resource of each kind.
pub struct OrgFixture {
    pub id: String,
    pub owner: String,
    pub owner_id: String,
    pub admin: String,
    pub admin_id: String,
    pub member: String,
    pub member_id: String,
    pub provider_id: String,
    pub provider_token: String,
    pub api_key_id: String,
    pub api_key: String,
}

impl OrgFixture {
    pub async fn create(app: &TestApp, tag: &str) -> Self {
        let (owner, owner_id) = app.signup(&format!("owner@{tag}.example.com")).await;
        let (admin, admin_id) = app.signup(&format!("admin@{tag}.example.com")).await;
        let (member, member_id) = app.signup(&format!("member@{tag}.example.com")).await;
        let id = app.create_org(&owner, &format!("Org {tag}")).await;
        for (email, role, token) in [
            (format!("admin@{tag}.example.com"), "admin", &admin),
            (format!("member@{tag}.example.com"), "member", &member),
        ] {
            app.join(&owner, &id, &email, role, token).await;
        }
        let provider_token = format!("sk-{tag}-{}", uuid::Uuid::new_v4().simple());
        let provider_id = app
            .create_provider(
                &admin,
                &id,
                "mycompany",
                &format!("https://llm.{tag}.example.com"),
                &provider_token,
            )
            .await
            .expect(201)
            .id();
        let key = app
            .post(
                &format!("/api/v1/orgs/{id}/api-keys"),
                &admin,
                json!({"name": "ci"}),
            )
            .await;
        key.expect(201);
        Self {
            api_key_id: key.id(),
            api_key: key.body["key"].as_str().unwrap().to_owned(),
            id,
            owner,
            owner_id,
            admin,
            admin_id,
            member,
            member_id,
            provider_id,
            provider_token,
        }
    }

    pub fn token(&self, role: &str) -> &str {
        match role {
            "owner" => &self.owner,
            "admin" => &self.admin,
            _ => &self.member,
        }
    }
}
