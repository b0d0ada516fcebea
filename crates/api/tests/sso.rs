//! Single sign-on against a real OpenID provider: the `oidc-provider` npm
//! package (tests/oidc/provider.mjs) on https://localhost, llmgw on
//! http://127.0.0.1, so every redirect between them is cross-site. The
//! browser is played by hand with reqwest: redirects are followed one by one
//! and each site's cookies are kept apart.

use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::process::Stdio;
use std::time::Duration;

use api::{Api, ApiConfig, OidcConfig, SsoConfig};
use reqwest::header::{COOKIE, LOCATION, SET_COOKIE};
use reqwest::{StatusCode, Url};
use serde_json::{json, Value};
use testkit::{skip_unless_ci, spawn_http, spawn_http_on, TestCa, TestDb};
use tokio::io::AsyncBufReadExt;
use upstream::{UpstreamClient, UpstreamConfig};

const PASSWORD: &str = "correct horse battery staple";

fn provider_dir() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/oidc")
}

fn has(cmd: &str) -> bool {
    std::process::Command::new(cmd)
        .arg("--version")
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .status()
        .is_ok_and(|s| s.success())
}

/// The npm packages of tests/oidc, installed when missing; false (after
/// `skip_unless_ci`) when node or npm is not there.
fn provider_installed() -> bool {
    if !has("node") || !has("npm") {
        skip_unless_ci("node and npm (apt-get install nodejs npm), for the OpenID provider");
        return false;
    }
    let dir = provider_dir();
    if !dir
        .join("node_modules/oidc-provider/package.json")
        .is_file()
    {
        let ok = std::process::Command::new("npm")
            .args(["ci", "--no-audit", "--no-fund"])
            .current_dir(&dir)
            .status()
            .is_ok_and(|s| s.success());
        if !ok {
            skip_unless_ci("the npm package oidc-provider (npm ci in crates/api/tests/oidc)");
            return false;
        }
    }
    true
}

/// A running `oidc-provider`; killed on drop.
struct Provider {
    issuer: String,
    _child: tokio::process::Child,
}

async fn start_provider(ca: &TestCa, redirect_uri: &str) -> Provider {
    let dir = ca.ca_file.parent().expect("ca dir").to_owned();
    let (cert, key) = (dir.join("leaf.pem"), dir.join("leaf.key"));
    std::fs::write(&cert, &ca.cert_pem).expect("write cert");
    std::fs::write(&key, &ca.key_pem).expect("write key");
    let mut child = tokio::process::Command::new("node")
        .arg(provider_dir().join("provider.mjs"))
        .arg(&cert)
        .arg(&key)
        .arg(redirect_uri)
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .kill_on_drop(true)
        .spawn()
        .expect("start node");
    // Its errors reach the test output; its development-mode warnings do not.
    let stderr = child.stderr.take().expect("stderr");
    tokio::spawn(async move {
        let mut lines = tokio::io::BufReader::new(stderr).lines();
        while let Ok(Some(line)) = lines.next_line().await {
            if !line.starts_with("oidc-provider WARNING") {
                eprintln!("oidc-provider: {line}");
            }
        }
    });
    let stdout = child.stdout.take().expect("stdout");
    let mut lines = tokio::io::BufReader::new(stdout).lines();
    let port = tokio::time::timeout(Duration::from_secs(30), async {
        while let Some(line) = lines.next_line().await.expect("provider output") {
            if let Some(port) = line.strip_prefix("ready ") {
                return port.trim().to_owned();
            }
        }
        panic!("the OpenID provider exited before it was ready");
    })
    .await
    .expect("the OpenID provider did not start within 30 s");
    // Keep draining its output so it never blocks on a full pipe.
    tokio::spawn(async move { while let Ok(Some(_)) = lines.next_line().await {} });
    Provider {
        issuer: format!("https://localhost:{port}"),
        _child: child,
    }
}

/// llmgw's API with single sign-on, and the provider it trusts.
struct App {
    base: String,
    db: TestDb,
    /// For the assertions about rows.
    pool: sqlx::PgPool,
    ca: TestCa,
    provider: Provider,
    settings: Settings,
    _handle: actix_web::dev::ServerHandle,
}

/// Another API process on the same database.
struct Replica {
    base: String,
    _handle: actix_web::dev::ServerHandle,
}

#[derive(Clone, Copy)]
struct Settings {
    auto_create: bool,
    password_login: bool,
}

/// An API instance with its own process state, for the `public_url` the
/// issuer redirects to.
fn api_instance(db: &TestDb, public_url: &str, issuer: &str, ca: &TestCa, s: Settings) -> Api {
    let upstream = UpstreamClient::new(&UpstreamConfig {
        allow_private: false,
        allow_http: false,
        ca_file: None,
        connect_timeout: Duration::from_secs(2),
        http2: false,
        timeout: Duration::from_secs(5),
    })
    .expect("upstream client");
    Api::with_sso(
        db.db.clone(),
        ApiConfig {
            allow_signup: true,
            session_ttl: Duration::from_secs(3600),
            session_idle: Duration::from_secs(3600),
            body_timeout: Duration::from_secs(10),
            max_body_bytes: 64 * 1024,
            allow_private: false,
            upstream,
            trusted_proxies: api::TrustedProxies::default(),
            browser: api::BrowserConfig {
                public_url: Some(public_url.to_owned()),
                gateway_public_url: None,
                password_login: s.password_login,
                sso: true,
            },
            limiter: None,
            health: None,
        },
        SsoConfig {
            password_login: s.password_login,
            oidc: Some(OidcConfig {
                issuer: issuer.to_owned(),
                client_id: "llmgw".into(),
                client_secret: Some("llmgw-test-secret".to_owned().into()),
                public_url: public_url.to_owned(),
                auto_create: s.auto_create,
                ca_file: Some(ca.ca_file.clone()),
                timeout: Duration::from_secs(10),
            }),
        },
    )
    .expect("sso settings")
}

impl App {
    async fn start(s: Settings) -> Option<Self> {
        if !provider_installed() {
            return None;
        }
        let listener = std::net::TcpListener::bind(("127.0.0.1", 0)).expect("bind");
        let base = format!(
            "http://127.0.0.1:{}",
            listener.local_addr().expect("addr").port()
        );
        let ca = TestCa::new();
        let provider = start_provider(&ca, &format!("{base}/api/v1/auth/oidc/callback")).await;
        let db = TestDb::new().await;
        let pool = sqlx::PgPool::connect_with(db.options.clone())
            .await
            .expect("connect to the test database");
        let api = api_instance(&db, &base, &provider.issuer, &ca, s);
        let (_, handle) = spawn_http_on(listener, move |c| api.configure(c));
        Some(Self {
            base,
            db,
            pool,
            ca,
            provider,
            settings: s,
            _handle: handle,
        })
    }

    /// A second API replica on the same database, behind the same public
    /// URL (as behind a load balancer), reached directly at its own address.
    fn replica(&self) -> Replica {
        let api = api_instance(
            &self.db,
            &self.base,
            &self.provider.issuer,
            &self.ca,
            self.settings,
        );
        let (base, handle) = spawn_http(move |c| api.configure(c));
        Replica {
            base,
            _handle: handle,
        }
    }

    fn browser(&self) -> Browser {
        let ca = reqwest::Certificate::from_pem(self.ca.ca_pem.as_bytes()).expect("ca");
        Browser {
            http: reqwest::Client::builder()
                .redirect(reqwest::redirect::Policy::none())
                .add_root_certificate(ca)
                .build()
                .expect("client"),
            jar: HashMap::new(),
            base: self.base.clone(),
        }
    }

    async fn api(
        &self,
        method: reqwest::Method,
        path: &str,
        token: Option<&str>,
        body: Option<Value>,
    ) -> (u16, Value) {
        let mut req = reqwest::Client::new().request(method, format!("{}{path}", self.base));
        if let Some(t) = token {
            req = req.bearer_auth(t);
        }
        if let Some(b) = body {
            req = req.json(&b);
        }
        let res = req.send().await.expect("api answers");
        let status = res.status().as_u16();
        (status, res.json().await.unwrap_or(Value::Null))
    }

    async fn signup(&self, email: &str) -> String {
        let (status, body) = self
            .api(
                reqwest::Method::POST,
                "/api/v1/auth/signup",
                None,
                Some(json!({"email": email, "password": PASSWORD})),
            )
            .await;
        assert_eq!(status, 201, "{body}");
        body["user"]["id"].as_str().expect("user id").to_owned()
    }

    async fn me(&self, token: &str) -> Value {
        let (status, body) = self
            .api(reqwest::Method::GET, "/api/v1/me", Some(token), None)
            .await;
        assert_eq!(status, 200, "{body}");
        body
    }

    async fn count(&self, sql: &str) -> i64 {
        sqlx::query_scalar::<_, i64>(sql)
            .fetch_one(&self.pool)
            .await
            .expect("count")
    }
}

/// What a browser keeps: cookies per host:port.
struct Browser {
    http: reqwest::Client,
    jar: HashMap<String, HashMap<String, String>>,
    base: String,
}

/// An HTML page llmgw answered, with the session cookie it set if any.
#[derive(Debug)]
struct Page {
    status: StatusCode,
    html: String,
    set_cookie: Option<String>,
    /// The browser id cookie (`llmgw_oidc`) it set, if any.
    browser_cookie: Option<String>,
}

impl Page {
    /// The session token of the `llmgw_session` cookie.
    fn session(&self) -> Option<String> {
        let c = self.set_cookie.as_deref()?;
        let v = c.strip_prefix("llmgw_session=")?;
        Some(v.split(';').next()?.to_owned())
    }

    fn link_id(&self) -> String {
        let re = regex::Regex::new(r#"name="link_id" value="([^"]+)""#).expect("regex");
        re.captures(&self.html)
            .unwrap_or_else(|| panic!("no link form in {}", self.html))[1]
            .to_owned()
    }
}

fn site(url: &Url) -> String {
    format!(
        "{}:{}",
        url.host_str().unwrap_or(""),
        url.port_or_known_default().unwrap_or(0)
    )
}

impl Browser {
    async fn send(&mut self, req: reqwest::RequestBuilder, url: &Url) -> reqwest::Response {
        let cookies = self.jar.entry(site(url)).or_default();
        let mut req = req;
        if !cookies.is_empty() {
            let header: Vec<String> = cookies.iter().map(|(k, v)| format!("{k}={v}")).collect();
            req = req.header(COOKIE, header.join("; "));
        }
        let res = req.send().await.expect("request answered");
        for c in res.headers().get_all(SET_COOKIE) {
            let c = c.to_str().expect("cookie");
            let pair = c.split(';').next().unwrap_or("");
            if let Some((k, v)) = pair.split_once('=') {
                cookies.insert(k.trim().to_owned(), v.trim().to_owned());
            }
        }
        res
    }

    async fn get(&mut self, url: &Url) -> reqwest::Response {
        let req = self.http.get(url.clone());
        self.send(req, url).await
    }

    /// `GET /api/v1/auth/oidc/start`: the issuer's authorization URL.
    async fn start(&mut self, hint: &str) -> Url {
        let url = Url::parse_with_params(
            &format!("{}/api/v1/auth/oidc/start", self.base),
            [("login_hint", hint)],
        )
        .expect("url");
        let res = self.get(&url).await;
        assert_eq!(res.status(), StatusCode::FOUND, "start");
        let to = Url::parse(res.headers()[LOCATION].to_str().expect("location")).expect("url");
        assert_eq!(
            to.host_str(),
            Some("localhost"),
            "the issuer is another site"
        );
        to
    }

    /// Follows the issuer's redirects until it sends the browser back to
    /// llmgw; returns that callback URL (not yet visited).
    async fn at_issuer(&mut self, mut url: Url) -> Url {
        for _ in 0..10 {
            if url.as_str().starts_with(&self.base) {
                return url;
            }
            let res = self.get(&url).await;
            assert!(
                res.status().is_redirection(),
                "issuer answered {} at {url}: {}",
                res.status(),
                res.text().await.unwrap_or_default()
            );
            let loc = res.headers()[LOCATION]
                .to_str()
                .expect("location")
                .to_owned();
            url = url.join(&loc).expect("redirect url");
        }
        panic!("too many redirects at the issuer");
    }

    async fn page(&mut self, res: reqwest::Response) -> Page {
        let status = res.status();
        let cookie = |name: &str| {
            res.headers()
                .get_all(SET_COOKIE)
                .iter()
                .filter_map(|c| c.to_str().ok())
                .find(|c| c.starts_with(&format!("{name}=")))
                .map(str::to_owned)
        };
        let set_cookie = cookie("llmgw_session");
        let browser_cookie = cookie("llmgw_oidc");
        let ct = res
            .headers()
            .get("content-type")
            .and_then(|v| v.to_str().ok())
            .unwrap_or("")
            .to_owned();
        assert!(ct.starts_with("text/html"), "{ct}");
        Page {
            status,
            html: res.text().await.expect("body"),
            set_cookie,
            browser_cookie,
        }
    }

    async fn callback(&mut self, url: &Url) -> Page {
        let res = self.get(url).await;
        self.page(res).await
    }

    /// Opens `url` as the browser would, but the load balancer in front
    /// passes it to the replica at `replica`: the cookies are `url`'s site's.
    async fn callback_via(&mut self, url: &Url, replica: &str) -> Page {
        let mut to = Url::parse(replica).expect("replica url");
        to.set_path(url.path());
        to.set_query(url.query());
        let req = self.http.get(to);
        let res = self.send(req, url).await;
        self.page(res).await
    }

    async fn sign_in(&mut self, hint: &str) -> Page {
        let auth = self.start(hint).await;
        let back = self.at_issuer(auth).await;
        self.callback(&back).await
    }

    async fn link(&mut self, link_id: &str, password: &str) -> Page {
        let base = self.base.clone();
        self.link_via(link_id, password, &base).await
    }

    /// Posts the link form to the replica at `replica`, as a load balancer
    /// would pass it on: origin and cookies are the public site's.
    async fn link_via(&mut self, link_id: &str, password: &str, replica: &str) -> Page {
        let url = Url::parse(&format!("{}/api/v1/auth/oidc/link", self.base)).expect("url");
        let to = Url::parse(&format!("{replica}/api/v1/auth/oidc/link")).expect("replica url");
        let req = self
            .http
            .post(to)
            // A browser sends its page's origin with a form POST.
            .header("origin", &self.base)
            .header("content-type", "application/x-www-form-urlencoded")
            .body(
                reqwest::Url::parse_with_params(
                    "x:",
                    [("link_id", link_id), ("password", password)],
                )
                .expect("form")
                .query()
                .unwrap_or("")
                .to_owned(),
            );
        let res = self.send(req, &url).await;
        self.page(res).await
    }
}

fn with_param(url: &Url, name: &str, value: &str) -> Url {
    let pairs: Vec<(String, String)> = url
        .query_pairs()
        .map(|(k, v)| {
            let v = if k == name {
                value.to_owned()
            } else {
                v.into_owned()
            };
            (k.into_owned(), v)
        })
        .collect();
    let mut out = url.clone();
    out.query_pairs_mut().clear().extend_pairs(pairs);
    out
}

fn param(url: &Url, name: &str) -> String {
    url.query_pairs()
        .find(|(k, _)| k == name)
        .map(|(_, v)| v.into_owned())
        .unwrap_or_else(|| panic!("no {name} in {url}"))
}

fn default_settings() -> Settings {
    Settings {
        auto_create: true,
        password_login: true,
    }
}

#[tokio::test]
async fn first_sign_in_creates_the_account_and_the_next_one_finds_it() {
    let Some(app) = App::start(default_settings()).await else {
        return;
    };
    let page = app.browser().sign_in("verified:new@example.com").await;
    assert_eq!(page.status, 200, "{}", page.html);
    let cookie = page.set_cookie.clone().expect("session cookie");
    assert!(
        cookie.contains("HttpOnly")
            && cookie.contains("SameSite=Strict")
            && cookie.contains("Path=/"),
        "{cookie}"
    );
    assert!(!cookie.contains("Secure"), "http public URL: not Secure");
    // A same-origin page, not a redirect: it sends the browser on to /.
    assert!(
        page.html
            .contains(r#"<meta http-equiv="refresh" content="0;url=/">"#),
        "{}",
        page.html
    );
    assert!(!page.html.contains("<script"));
    let me = app.me(&page.session().expect("token")).await;
    assert_eq!(me["email"], "new@example.com");

    let again = app.browser().sign_in("verified:new@example.com").await;
    assert_eq!(again.status, 200, "{}", again.html);
    let me2 = app.me(&again.session().expect("token")).await;
    assert_eq!(
        me2["id"], me["id"],
        "the identity signs in the same account"
    );
    assert_eq!(app.count("SELECT count(*) FROM users").await, 1);
}

#[tokio::test]
async fn a_tampered_or_swapped_state_is_refused() {
    let Some(app) = App::start(default_settings()).await else {
        return;
    };
    let mut b = app.browser();
    let auth = b.start("verified:state@example.com").await;
    let back = b.at_issuer(auth).await;
    let forged = with_param(&back, "state", "forged-state");
    let page = b.callback(&forged).await;
    assert_eq!(page.status, 400, "{}", page.html);
    assert!(page.set_cookie.is_none());

    // Two flows, the second's state with the first's code: another
    // verifier and nonce, so the sign-in fails.
    let mut b = app.browser();
    let first = b.start("verified:state@example.com").await;
    let second = b.start("verified:state@example.com").await;
    let back = b.at_issuer(first).await;
    let swapped = with_param(&back, "state", &param(&second, "state"));
    let page = b.callback(&swapped).await;
    assert_eq!(page.status, 400, "{}", page.html);
    assert!(page.set_cookie.is_none());
    assert_eq!(app.count("SELECT count(*) FROM sessions").await, 0);
    assert_eq!(app.count("SELECT count(*) FROM users").await, 0);
}

#[tokio::test]
async fn a_callback_url_opened_in_another_browser_signs_nobody_in() {
    let Some(app) = App::start(default_settings()).await else {
        return;
    };
    // The attacker signs in at the issuer as themselves and hands the
    // callback URL to the victim (login CSRF).
    let mut attacker = app.browser();
    let auth = attacker.start("verified:attacker@example.com").await;
    let back = attacker.at_issuer(auth).await;
    let page = app.browser().callback(&back).await;
    assert_eq!(page.status, 400, "{}", page.html);
    assert!(page.html.contains("another browser"), "{}", page.html);
    assert!(page.set_cookie.is_none());
    assert_eq!(app.count("SELECT count(*) FROM sessions").await, 0);
}

#[tokio::test]
async fn a_refusal_at_the_issuer_is_shown_and_uses_up_the_state() {
    let Some(app) = App::start(default_settings()).await else {
        return;
    };
    let mut b = app.browser();
    let auth = b.start("verified:no@example.com").await;
    let url = Url::parse_with_params(
        &format!("{}/api/v1/auth/oidc/callback", app.base),
        [
            ("error", "access_denied"),
            ("error_description", "<b>denied</b>"),
            ("state", &param(&auth, "state")),
        ],
    )
    .expect("url");
    let page = b.callback(&url).await;
    assert_eq!(page.status, 400, "{}", page.html);
    assert!(
        page.html.contains("access_denied") && page.html.contains("&lt;b&gt;"),
        "{}",
        page.html
    );
    // The state is gone: the genuine answer can no longer complete it.
    let back = b.at_issuer(auth).await;
    assert_eq!(b.callback(&back).await.status, 400);
}

#[tokio::test]
async fn a_tampered_nonce_is_refused() {
    let Some(app) = App::start(default_settings()).await else {
        return;
    };
    let mut b = app.browser();
    let auth = b.start("verified:nonce@example.com").await;
    // The issuer signs an ID token for another nonce than the one llmgw keeps.
    let tampered = with_param(&auth, "nonce", "attacker-chosen-nonce");
    let back = b.at_issuer(tampered).await;
    let page = b.callback(&back).await;
    assert_eq!(page.status, 400, "{}", page.html);
    assert!(page.html.contains("could not be verified"), "{}", page.html);
    assert!(page.set_cookie.is_none());
    assert_eq!(app.count("SELECT count(*) FROM sessions").await, 0);
}

#[tokio::test]
async fn an_unverified_email_neither_takes_over_nor_creates_an_account() {
    let Some(app) = App::start(default_settings()).await else {
        return;
    };
    let victim = app.signup("victim@example.com").await;
    let page = app.browser().sign_in("unverified:victim@example.com").await;
    assert_eq!(page.status, 403, "{}", page.html);
    assert!(page.html.contains("not verified"), "{}", page.html);
    assert!(page.set_cookie.is_none());
    assert!(!page.html.contains("link_id"), "no way to link");
    let page = app
        .browser()
        .sign_in("unverified:stranger@example.com")
        .await;
    assert_eq!(page.status, 403, "{}", page.html);
    assert_eq!(app.count("SELECT count(*) FROM oidc_identities").await, 0);
    assert_eq!(app.count("SELECT count(*) FROM users").await, 1);
    // Only the password signup's own session exists.
    let sessions: i64 =
        sqlx::query_scalar("SELECT count(*) FROM sessions WHERE user_id = $1::uuid")
            .bind(&victim)
            .fetch_one(&app.pool)
            .await
            .expect("count");
    assert_eq!(sessions, 1);
}

#[tokio::test]
async fn a_verified_email_links_an_existing_account_only_with_its_password() {
    let Some(app) = App::start(default_settings()).await else {
        return;
    };
    let user = app.signup("owner@example.com").await;
    let mut b = app.browser();
    let page = b.sign_in("verified:owner@example.com").await;
    assert_eq!(page.status, 200, "{}", page.html);
    assert!(page.set_cookie.is_none(), "no session before the password");
    let link_id = page.link_id();

    let wrong = b.link(&link_id, "not the password").await;
    assert_eq!(wrong.status, 401, "{}", wrong.html);
    assert!(wrong.set_cookie.is_none());
    assert_eq!(app.count("SELECT count(*) FROM oidc_identities").await, 0);
    let forged = b.link("forged-link-id", PASSWORD).await;
    assert_eq!(forged.status, 400, "{}", forged.html);
    assert!(forged.set_cookie.is_none());

    let linked = b.link(&link_id, PASSWORD).await;
    assert_eq!(linked.status, 200, "{}", linked.html);
    let me = app.me(&linked.session().expect("token")).await;
    assert_eq!(me["id"], user.as_str());
    // Used once.
    let replay = b.link(&link_id, PASSWORD).await;
    assert_eq!(replay.status, 400, "{}", replay.html);

    // From now on single sign-on lands in the account directly.
    let page = app.browser().sign_in("verified:owner@example.com").await;
    assert_eq!(page.status, 200, "{}", page.html);
    assert_eq!(
        app.me(&page.session().expect("token")).await["id"],
        user.as_str()
    );
}

#[tokio::test]
async fn too_many_wrong_passwords_drop_the_pending_link() {
    let Some(app) = App::start(default_settings()).await else {
        return;
    };
    app.signup("guess@example.com").await;
    let mut b = app.browser();
    let link_id = b.sign_in("verified:guess@example.com").await.link_id();
    for _ in 0..3 {
        assert_eq!(b.link(&link_id, "guess").await.status, 401);
    }
    let page = b.link(&link_id, PASSWORD).await;
    assert_eq!(page.status, 400, "{}", page.html);
    assert!(page.set_cookie.is_none());
}

#[tokio::test]
async fn sso_only_servers_refuse_passwords_and_unknown_emails() {
    let Some(app) = App::start(Settings {
        auto_create: false,
        password_login: false,
    })
    .await
    else {
        return;
    };
    for path in ["/api/v1/auth/login", "/api/v1/auth/signup"] {
        let (status, body) = app
            .api(
                reqwest::Method::POST,
                path,
                None,
                Some(json!({"email": "a@example.com", "password": PASSWORD})),
            )
            .await;
        assert_eq!(status, 403, "{body}");
        assert_eq!(body["error"]["code"], "password_login_disabled");
    }
    let page = app.browser().sign_in("verified:new@example.com").await;
    assert_eq!(page.status, 403, "{}", page.html);
    assert!(page.html.contains("No account"), "{}", page.html);
    assert_eq!(app.count("SELECT count(*) FROM users").await, 0);
}

#[tokio::test]
async fn a_sign_in_started_on_one_replica_finishes_on_another() {
    let Some(app) = App::start(default_settings()).await else {
        return;
    };
    let replica = app.replica();
    let mut b = app.browser();
    let auth = b.start("verified:replica@example.com").await;
    // Kept in the database under the digest of its state, not the state.
    let kept: i64 = sqlx::query_scalar(
        "SELECT count(*) FROM sso_pending WHERE state_digest = sha256(convert_to($1, 'UTF8'))",
    )
    .bind(param(&auth, "state"))
    .fetch_one(&app.pool)
    .await
    .expect("count");
    assert_eq!(kept, 1);
    let back = b.at_issuer(auth).await;
    let page = b.callback_via(&back, &replica.base).await;
    assert_eq!(page.status, 200, "{}", page.html);
    let me = app.me(&page.session().expect("token")).await;
    assert_eq!(me["email"], "replica@example.com");
    assert_eq!(app.count("SELECT count(*) FROM sso_pending").await, 0);

    // Replayed, on either replica: refused before any code exchange.
    for base in [&replica.base, &app.base] {
        let replay = b.callback_via(&back, base).await;
        assert_eq!(replay.status, 400, "{}", replay.html);
        assert!(replay.html.contains("already used"), "{}", replay.html);
        assert!(replay.set_cookie.is_none());
    }
    assert_eq!(app.count("SELECT count(*) FROM sessions").await, 1);
    assert_eq!(app.count("SELECT count(*) FROM users").await, 1);
}

#[tokio::test]
async fn an_expired_sign_in_is_refused_and_removed() {
    let Some(app) = App::start(default_settings()).await else {
        return;
    };
    let mut b = app.browser();
    let auth = b.start("verified:late@example.com").await;
    let back = b.at_issuer(auth).await;
    // Ten minutes and more at the issuer.
    sqlx::query(
        "UPDATE sso_pending SET created_at = now() - interval '11 minutes',
                                expires_at = now() - interval '1 minute'",
    )
    .execute(&app.pool)
    .await
    .expect("age the sign-in");
    let page = b.callback(&back).await;
    assert_eq!(page.status, 400, "{}", page.html);
    assert!(page.html.contains("has expired"), "{}", page.html);
    assert!(page.set_cookie.is_none());
    assert_eq!(app.count("SELECT count(*) FROM sso_pending").await, 0);
    assert_eq!(app.count("SELECT count(*) FROM sessions").await, 0);
    assert_eq!(app.count("SELECT count(*) FROM users").await, 0);
}

#[tokio::test]
async fn starts_are_refused_while_the_pending_table_is_full_and_expired_rows_make_room() {
    let Some(app) = App::start(default_settings()).await else {
        return;
    };
    // As many waiting sign-ins as the server keeps (10 000), from a flood.
    sqlx::query(
        "INSERT INTO sso_pending (state_digest, nonce, pkce_verifier, browser_digest, expires_at)
         SELECT sha256(convert_to('flood-' || i, 'UTF8')), 'n', repeat('v', 43),
                sha256(convert_to('b', 'UTF8')), now() + interval '10 minutes'
         FROM generate_series(1, 10000) AS i",
    )
    .execute(&app.pool)
    .await
    .expect("fill");
    let start = Url::parse(&format!("{}/api/v1/auth/oidc/start", app.base)).expect("url");
    let mut b = app.browser();
    let res = b.get(&start).await;
    assert_eq!(res.status(), StatusCode::SERVICE_UNAVAILABLE);
    let body: Value = res.json().await.expect("json");
    assert_eq!(body["error"]["code"], "busy", "{body}");
    assert_eq!(app.count("SELECT count(*) FROM sso_pending").await, 10_000);

    // Once they expire, the next start prunes them and goes through.
    sqlx::query(
        "UPDATE sso_pending SET created_at = now() - interval '11 minutes',
                                expires_at = now() - interval '1 minute'",
    )
    .execute(&app.pool)
    .await
    .expect("expire");
    let page = b.sign_in("verified:patient@example.com").await;
    assert_eq!(page.status, 200, "{}", page.html);
    assert_eq!(app.count("SELECT count(*) FROM sso_pending").await, 0);
}

/// The pending link of this link id, looked up by the digest it is kept
/// under: its attempts so far, `None` when there is none.
async fn link_attempts(app: &App, link_id: &str) -> Option<i16> {
    sqlx::query_scalar(
        "SELECT attempts FROM sso_link_pending WHERE link_digest = sha256(convert_to($1, 'UTF8'))",
    )
    .bind(link_id)
    .fetch_optional(&app.pool)
    .await
    .expect("attempts")
}

#[tokio::test]
async fn an_account_link_shown_by_one_replica_completes_on_another() {
    let Some(app) = App::start(default_settings()).await else {
        return;
    };
    let user = app.signup("linked@example.com").await;
    let replica = app.replica();
    let mut b = app.browser();
    let page = b.sign_in("verified:linked@example.com").await;
    assert_eq!(page.status, 200, "{}", page.html);
    let link_id = page.link_id();
    // Kept in the database under the digest of the link id, not the id.
    assert_eq!(link_attempts(&app, &link_id).await, Some(0));
    // The browser id that binds the link lives as long as the form.
    let bound = page.browser_cookie.as_deref().expect("browser id cookie");
    assert!(
        bound.contains("Max-Age=600") && bound.contains("Path=/api/v1/auth/oidc"),
        "{bound}"
    );

    let linked = b.link_via(&link_id, PASSWORD, &replica.base).await;
    assert_eq!(linked.status, 200, "{}", linked.html);
    let me = app.me(&linked.session().expect("token")).await;
    assert_eq!(me["id"], user.as_str());
    assert_eq!(app.count("SELECT count(*) FROM oidc_identities").await, 1);
    assert_eq!(app.count("SELECT count(*) FROM sso_link_pending").await, 0);

    // Replayed after success, on either replica: refused, no new session.
    let sessions = app.count("SELECT count(*) FROM sessions").await;
    for base in [&replica.base, &app.base] {
        let replay = b.link_via(&link_id, PASSWORD, base).await;
        assert_eq!(replay.status, 400, "{}", replay.html);
        assert!(replay.html.contains("already used"), "{}", replay.html);
        assert!(replay.set_cookie.is_none());
    }
    assert_eq!(app.count("SELECT count(*) FROM sessions").await, sessions);

    // Single sign-on now lands in the account, on the other replica too.
    let mut b = app.browser();
    let auth = b.start("verified:linked@example.com").await;
    let back = b.at_issuer(auth).await;
    let page = b.callback_via(&back, &replica.base).await;
    assert_eq!(page.status, 200, "{}", page.html);
    assert_eq!(
        app.me(&page.session().expect("token")).await["id"],
        user.as_str()
    );
}

#[tokio::test]
async fn wrong_passwords_are_counted_over_every_replica_until_the_link_is_refused() {
    let Some(app) = App::start(default_settings()).await else {
        return;
    };
    app.signup("counted@example.com").await;
    let replica = app.replica();
    let mut b = app.browser();
    let link_id = b.sign_in("verified:counted@example.com").await.link_id();

    let wrong = b.link_via(&link_id, "guess one", &app.base).await;
    assert_eq!(wrong.status, 401, "{}", wrong.html);
    assert!(wrong.html.contains("Try again"), "{}", wrong.html);
    let wrong = b.link_via(&link_id, "guess two", &replica.base).await;
    assert_eq!(wrong.status, 401, "{}", wrong.html);
    assert!(wrong.html.contains("Try again"), "{}", wrong.html);
    assert_eq!(link_attempts(&app, &link_id).await, Some(2));
    // The third, wherever it lands, is the last.
    let last = b.link_via(&link_id, "guess three", &app.base).await;
    assert_eq!(last.status, 401, "{}", last.html);
    assert!(last.html.contains("too many times"), "{}", last.html);
    assert_eq!(link_attempts(&app, &link_id).await, None, "dropped");

    // Even the right password no longer links, on either replica.
    for base in [&replica.base, &app.base] {
        let page = b.link_via(&link_id, PASSWORD, base).await;
        assert_eq!(page.status, 400, "{}", page.html);
        assert!(page.set_cookie.is_none());
    }
    assert_eq!(app.count("SELECT count(*) FROM oidc_identities").await, 0);
    // Only the signup's own session.
    assert_eq!(app.count("SELECT count(*) FROM sessions").await, 1);
}

#[tokio::test]
async fn concurrent_guesses_on_two_replicas_get_no_more_than_the_allowed_attempts() {
    let Some(app) = App::start(default_settings()).await else {
        return;
    };
    app.signup("racing@example.com").await;
    let replica = app.replica();
    let mut b = app.browser();
    let link_id = b.sign_in("verified:racing@example.com").await.link_id();
    let jar = b.jar.clone();
    let guesses = (0..8).map(|i| {
        let mut b = app.browser();
        b.jar = jar.clone();
        let base = if i % 2 == 0 { &app.base } else { &replica.base };
        let link_id = link_id.clone();
        async move {
            b.link_via(&link_id, &format!("guess {i}"), base)
                .await
                .status
        }
    });
    let statuses = futures_util::future::join_all(guesses).await;
    // Three tries get a password check (401); the rest are refused unchecked.
    let checked = statuses.iter().filter(|s| s.as_u16() == 401).count();
    let refused = statuses.iter().filter(|s| s.as_u16() == 400).count();
    assert_eq!((checked, refused), (3, 5), "{statuses:?}");
    assert_eq!(link_attempts(&app, &link_id).await, None);
    assert_eq!(b.link(&link_id, PASSWORD).await.status, 400);
    assert_eq!(app.count("SELECT count(*) FROM oidc_identities").await, 0);
}

#[tokio::test]
async fn a_link_form_posted_from_another_browser_is_refused_and_costs_no_attempt() {
    let Some(app) = App::start(default_settings()).await else {
        return;
    };
    app.signup("bound@example.com").await;
    let mut b = app.browser();
    let link_id = b.sign_in("verified:bound@example.com").await.link_id();
    // The link id alone (seen over a shoulder, in a log) is not enough.
    let page = app.browser().link(&link_id, PASSWORD).await;
    assert_eq!(page.status, 400, "{}", page.html);
    assert!(page.html.contains("another browser"), "{}", page.html);
    assert!(page.set_cookie.is_none());
    assert_eq!(link_attempts(&app, &link_id).await, Some(0));
    assert_eq!(app.count("SELECT count(*) FROM oidc_identities").await, 0);
    // The browser that signed in still links.
    let linked = b.link(&link_id, PASSWORD).await;
    assert_eq!(linked.status, 200, "{}", linked.html);
}

#[tokio::test]
async fn an_expired_link_is_refused_and_removed() {
    let Some(app) = App::start(default_settings()).await else {
        return;
    };
    app.signup("slow@example.com").await;
    let mut b = app.browser();
    let link_id = b.sign_in("verified:slow@example.com").await.link_id();
    sqlx::query(
        "UPDATE sso_link_pending SET created_at = now() - interval '11 minutes',
                                     expires_at = now() - interval '1 minute'",
    )
    .execute(&app.pool)
    .await
    .expect("age the link");
    let page = b.link(&link_id, PASSWORD).await;
    assert_eq!(page.status, 400, "{}", page.html);
    assert!(page.html.contains("has expired"), "{}", page.html);
    assert!(page.set_cookie.is_none());
    assert_eq!(app.count("SELECT count(*) FROM sso_link_pending").await, 0);
    assert_eq!(app.count("SELECT count(*) FROM oidc_identities").await, 0);
}

#[tokio::test]
async fn links_are_refused_while_the_link_table_is_full_and_expired_rows_make_room() {
    let Some(app) = App::start(default_settings()).await else {
        return;
    };
    let user = app.signup("full@example.com").await;
    // As many waiting links as the server keeps (1 000).
    sqlx::query(
        "INSERT INTO sso_link_pending
             (link_digest, user_id, issuer, subject, email, browser_digest, expires_at)
         SELECT sha256(convert_to('flood-' || i, 'UTF8')), $1::uuid, 'https://issuer', 's' || i,
                'full@example.com', sha256(convert_to('b', 'UTF8')), now() + interval '10 minutes'
         FROM generate_series(1, 1000) AS i",
    )
    .bind(&user)
    .execute(&app.pool)
    .await
    .expect("fill");
    let page = app.browser().sign_in("verified:full@example.com").await;
    assert_eq!(page.status, 503, "{}", page.html);
    assert!(!page.html.contains("link_id"), "{}", page.html);
    assert_eq!(
        app.count("SELECT count(*) FROM sso_link_pending").await,
        1000
    );

    sqlx::query(
        "UPDATE sso_link_pending SET created_at = now() - interval '11 minutes',
                                     expires_at = now() - interval '1 minute'",
    )
    .execute(&app.pool)
    .await
    .expect("expire");
    let mut b = app.browser();
    let link_id = b.sign_in("verified:full@example.com").await.link_id();
    assert_eq!(app.count("SELECT count(*) FROM sso_link_pending").await, 1);
    assert_eq!(b.link(&link_id, PASSWORD).await.status, 200);
}
