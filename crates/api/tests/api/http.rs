//! Error shapes for client mistakes, operational routes, request ids and the
//! OpenAPI document.

use std::collections::BTreeSet;
use std::time::Duration;

use api::{Api, ApiConfig};
use reqwest::Method;
use serde_json::{json, Value};
use storage::{Db, Keyring, PoolConfig};

use crate::helpers::{Opts, TestApp, PASSWORD};

/// Every route DESIGN.md lists, plus the operational ones.
const EXPECTED: &[(&str, &str)] = &[
    ("GET", "/healthz"),
    ("GET", "/readyz"),
    ("GET", "/api/openapi.json"),
    ("POST", "/api/v1/auth/signup"),
    ("POST", "/api/v1/auth/login"),
    ("GET", "/api/v1/auth/oidc/start"),
    ("GET", "/api/v1/auth/oidc/callback"),
    ("POST", "/api/v1/auth/oidc/link"),
    ("GET", "/api/v1/auth/config"),
    ("POST", "/api/v1/auth/logout"),
    ("GET", "/api/v1/me"),
    ("DELETE", "/api/v1/me/sessions"),
    ("POST", "/api/v1/orgs"),
    ("GET", "/api/v1/orgs"),
    ("GET", "/api/v1/orgs/{org_id}"),
    ("PATCH", "/api/v1/orgs/{org_id}"),
    ("DELETE", "/api/v1/orgs/{org_id}"),
    ("GET", "/api/v1/orgs/{org_id}/members"),
    ("POST", "/api/v1/orgs/{org_id}/members"),
    ("PATCH", "/api/v1/orgs/{org_id}/members/{user_id}"),
    ("DELETE", "/api/v1/orgs/{org_id}/members/{user_id}"),
    ("GET", "/api/v1/orgs/{org_id}/invitations"),
    ("GET", "/api/v1/orgs/{org_id}/invitations/{id}"),
    ("DELETE", "/api/v1/orgs/{org_id}/invitations/{id}"),
    ("GET", "/api/v1/me/invitations"),
    ("POST", "/api/v1/me/invitations/{id}/accept"),
    ("GET", "/api/v1/orgs/{org_id}/provider-keys"),
    ("POST", "/api/v1/orgs/{org_id}/provider-keys"),
    ("GET", "/api/v1/orgs/{org_id}/provider-keys/{id}"),
    ("PATCH", "/api/v1/orgs/{org_id}/provider-keys/{id}"),
    ("DELETE", "/api/v1/orgs/{org_id}/provider-keys/{id}"),
    ("POST", "/api/v1/orgs/{org_id}/provider-keys/{id}/test"),
    ("GET", "/api/v1/orgs/{org_id}/provider-keys/{id}/endpoints"),
    ("POST", "/api/v1/orgs/{org_id}/provider-keys/{id}/endpoints"),
    (
        "PATCH",
        "/api/v1/orgs/{org_id}/provider-keys/{id}/endpoints/{endpoint_id}",
    ),
    (
        "DELETE",
        "/api/v1/orgs/{org_id}/provider-keys/{id}/endpoints/{endpoint_id}",
    ),
    ("GET", "/api/v1/orgs/{org_id}/api-keys"),
    ("POST", "/api/v1/orgs/{org_id}/api-keys"),
    ("DELETE", "/api/v1/orgs/{org_id}/api-keys/{id}"),
    ("GET", "/api/v1/orgs/{org_id}/api-keys/{id}"),
    ("PATCH", "/api/v1/orgs/{org_id}/api-keys/{id}"),
    ("GET", "/api/v1/orgs/{org_id}/api-keys/{id}/limits"),
    ("GET", "/api/v1/orgs/{org_id}/logs"),
    ("GET", "/api/v1/orgs/{org_id}/usage"),
    ("GET", "/api/v1/orgs/{org_id}/audit-log"),
];

#[tokio::test]
async fn openapi_document_lists_every_route_the_server_answers() {
    let app = TestApp::spawn().await;
    let r = app.call(Method::GET, "/api/openapi.json", None, None).await;
    r.expect(200);
    assert!(r.headers["content-type"]
        .to_str()
        .unwrap()
        .starts_with("application/json"));
    let doc: Value = serde_json::from_str(&r.text).expect("the document is JSON");
    assert!(doc["openapi"].as_str().unwrap().starts_with("3."));
    assert!(doc["info"]["title"].is_string());

    let mut documented = BTreeSet::new();
    for (path, item) in doc["paths"].as_object().unwrap() {
        for (method, op) in item.as_object().unwrap() {
            documented.insert((method.to_uppercase(), path.clone()));
            let responses = op["responses"].as_object().unwrap();
            assert!(
                // 302: the single sign-on start sends the browser to the issuer.
                responses.keys().any(|s| s.starts_with('2') || s == "302"),
                "{method} {path} has no success response"
            );
            assert!(
                responses.contains_key("500") && responses.contains_key("503"),
                "{method} {path}"
            );
            for (status, resp) in responses {
                if !status.starts_with('2') && status != "302" {
                    assert_eq!(
                        resp["content"]["application/json"]["schema"]["$ref"],
                        "#/components/schemas/Error"
                    );
                }
            }
            let path_params = path.matches('{').count();
            let declared = op["parameters"]
                .as_array()
                .unwrap()
                .iter()
                .filter(|p| p["in"] == "path")
                .count();
            assert_eq!(path_params, declared, "{method} {path}");
            if path.contains("{org_id}") {
                assert!(
                    responses.contains_key("404") && responses.contains_key("401"),
                    "{method} {path}"
                );
            }
        }
    }
    let expected: BTreeSet<(String, String)> = EXPECTED
        .iter()
        .map(|(m, p)| (m.to_string(), p.to_string()))
        .collect();
    assert_eq!(documented, expected);
    // Role-gated routes document 403.
    assert!(
        doc["paths"]["/api/v1/orgs/{org_id}/provider-keys"]["post"]["responses"]["403"].is_object()
    );
    assert!(
        doc["paths"]["/api/v1/orgs/{org_id}/provider-keys"]["post"]["responses"]["409"].is_object()
    );
    assert!(doc["paths"]["/api/v1/orgs/{org_id}/provider-keys"]["post"]["requestBody"].is_object());

    // The server answers each documented route (none is an unknown route or method).
    let id = uuid::Uuid::new_v4();
    for (method, path) in &documented {
        let url = path
            .replace("{org_id}", &id.to_string())
            .replace("{id}", &id.to_string())
            .replace("{user_id}", &id.to_string())
            .replace("{endpoint_id}", &id.to_string());
        let r = app
            .call(
                Method::from_bytes(method.as_bytes()).unwrap(),
                &url,
                None,
                None,
            )
            .await;
        assert!(
            !["route_not_found", "method_not_allowed"].contains(&r.code()),
            "{method} {path}: {}",
            r.text
        );
        assert!(r.status < 500, "{method} {path}: {}", r.text);
    }
}

#[tokio::test]
async fn client_mistakes_get_4xx_in_the_error_shape() {
    let app = TestApp::spawn_with(Opts {
        max_body_bytes: 4096,
        ..Opts::default()
    })
    .await;
    let (token, _) = app.signup("eve@example.com").await;
    let signup = |body: &'static str| {
        app.send(
            app.request(Method::POST, "/api/v1/auth/signup", None)
                .header("content-type", "application/json")
                .body(body),
        )
    };
    let bad_json = signup("{\"email\": ").await;
    bad_json.expect(400);
    assert_eq!(bad_json.code(), "bad_request");
    assert!(bad_json.error_fields().is_empty());
    signup("[1,2]").await.expect(400);
    signup("").await.expect(400);
    let wrong_types = signup(r#"{"email": 1, "password": ["x"]}"#).await;
    wrong_types.expect(422);
    assert_eq!(wrong_types.code(), "validation_failed");
    assert_eq!(wrong_types.error_fields(), ["email", "password"]);
    let missing = signup(r#"{"email": "x@example.com"}"#).await;
    missing.expect(422);
    assert_eq!(missing.error_fields(), ["password"]);
    let unknown =
        signup(r#"{"email": "x@example.com", "password": "long enough", "admin": true}"#).await;
    unknown.expect(422);
    assert_eq!(unknown.error_fields(), ["admin"]);

    // Oversized bodies, with and without a session, with and without a length.
    let big = format!(r#"{{"name":"{}"}}"#, "a".repeat(10_000));
    let r = app
        .send(
            app.request(Method::POST, "/api/v1/orgs", Some(&token))
                .header("content-type", "application/json")
                .body(big.clone()),
        )
        .await;
    r.expect(413);
    assert_eq!(r.code(), "payload_too_large");
    let r = app
        .send(
            app.request(Method::POST, "/api/v1/auth/login", None)
                .body(big.clone()),
        )
        .await;
    r.expect(413);
    let chunks = futures_util::stream::iter(vec![Ok::<_, std::io::Error>(big.into_bytes())]);
    let r = app
        .send(
            app.request(Method::POST, "/api/v1/orgs", Some(&token))
                .body(reqwest::Body::wrap_stream(chunks)),
        )
        .await;
    r.expect(413);

    let unknown_route = app.get("/api/v1/nope", &token).await;
    unknown_route.expect(404);
    assert_eq!(unknown_route.code(), "route_not_found");
    assert!(unknown_route.error_fields().is_empty());
    // Outside /api a GET is the admin UI's page; other methods stay JSON 404.
    let not_ui = app.call(Method::POST, "/", None, None).await;
    not_ui.expect(404);
    assert_eq!(not_ui.code(), "route_not_found");
    let wrong_method = app
        .call(Method::PUT, "/api/v1/orgs", Some(&token), None)
        .await;
    wrong_method.expect(405);
    assert_eq!(wrong_method.code(), "method_not_allowed");
    // An authenticated caller gets 404 for a malformed org id, not 400.
    assert_eq!(
        app.get("/api/v1/orgs/123/provider-keys", &token)
            .await
            .expect(404)
            .code(),
        "not_found"
    );
    let bad_query = app.get("/api/v1/orgs/%zz", &token).await;
    assert!(bad_query.status == 404, "{}", bad_query.text);
}

#[tokio::test]
async fn auth_is_checked_before_the_body() {
    let app = TestApp::spawn().await;
    let (token, _) = app.signup("first@example.com").await;
    let org = app.create_org(&token, "F").await;
    let (stranger, _) = app.signup("second@example.com").await;
    let path = format!("/api/v1/orgs/{org}/provider-keys");
    let body = "{not json";
    let anon = app
        .send(app.request(Method::POST, &path, None).body(body))
        .await;
    anon.expect(401);
    let other = app
        .send(app.request(Method::POST, &path, Some(&stranger)).body(body))
        .await;
    other.expect(404);
    let mine = app
        .send(app.request(Method::POST, &path, Some(&token)).body(body))
        .await;
    mine.expect(400);
    let _ = PASSWORD;
}

#[tokio::test]
async fn every_answer_carries_a_request_id() {
    let app = TestApp::spawn().await;
    let ok = app.call(Method::GET, "/healthz", None, None).await;
    ok.expect(200);
    assert_eq!(ok.body, json!({"status": "ok"}));
    let generated = ok.headers["x-request-id"].to_str().unwrap();
    assert!(uuid::Uuid::parse_str(generated).is_ok());
    for path in ["/readyz", "/api/v1/me", "/nope"] {
        let r = app.call(Method::GET, path, None, None).await;
        assert!(r.headers.contains_key("x-request-id"), "{path}");
    }
    app.call(Method::GET, "/readyz", None, None)
        .await
        .expect(200);
    let echoed = app
        .send(
            app.request(Method::GET, "/healthz", None)
                .header("x-request-id", "abc-123"),
        )
        .await;
    assert_eq!(echoed.headers["x-request-id"], "abc-123");
    let replaced = app
        .send(
            app.request(Method::GET, "/healthz", None)
                .header("x-request-id", "bad id\twith junk"),
        )
        .await;
    assert_ne!(replaced.headers["x-request-id"], "bad id\twith junk");
}

#[tokio::test]
async fn database_outage_answers_503() {
    let keyring = Keyring::parse(&format!("1:{}", Keyring::generate_key_material())).unwrap();
    let options = Db::options_from_url("postgres://postgres@127.0.0.1:1/none").unwrap();
    let db = Db::connect_lazy(
        options,
        keyring,
        &PoolConfig {
            max_connections: 2,
            acquire_timeout: Duration::from_millis(500),
        },
    );
    let upstream = upstream::UpstreamClient::new(&upstream::UpstreamConfig::default()).unwrap();
    let api = Api::new(
        db,
        ApiConfig {
            allow_signup: true,
            session_ttl: Duration::from_secs(60),
            session_idle: Duration::from_secs(60),
            body_timeout: Duration::from_secs(10),
            max_body_bytes: 1024,
            allow_private: false,
            upstream,
            trusted_proxies: api::TrustedProxies::default(),
            browser: api::BrowserConfig::default(),
            limiter: None,
            health: None,
        },
    );
    let (base, handle) = testkit::spawn_http(move |cfg| api.configure(cfg));
    let client = reqwest::Client::new();
    let ready = client.get(format!("{base}/readyz")).send().await.unwrap();
    assert_eq!(ready.status(), 503);
    let body: Value = ready.json().await.unwrap();
    assert_eq!(body["error"]["code"], "database_unavailable");
    let me = client
        .get(format!("{base}/api/v1/me"))
        .bearer_auth("llmgws_x")
        .send()
        .await
        .unwrap();
    assert_eq!(me.status(), 503);
    let body: Value = me.json().await.unwrap();
    assert_eq!(body["error"]["code"], "database_unavailable");
    assert!(
        !body.to_string().contains("127.0.0.1:1"),
        "internal detail leaked: {body}"
    );
    client
        .get(format!("{base}/healthz"))
        .send()
        .await
        .unwrap()
        .error_for_status()
        .unwrap();
    handle.stop(true).await;
}

#[tokio::test]
async fn hostile_input_gets_a_clear_4xx_and_the_server_keeps_serving() {
    let app = TestApp::spawn().await;
    let (token, _) = app.signup("mallory@example.com").await;
    let post = |path: &'static str, ctype: &'static str, body: Vec<u8>| {
        app.send(
            app.request(Method::POST, path, Some(&token))
                .header("content-type", ctype)
                .body(body),
        )
    };
    // Invalid UTF-8 inside a JSON string.
    let mut bytes = br#"{"name":"acme"#.to_vec();
    bytes.extend_from_slice(&[0xff, 0xfe]);
    bytes.extend_from_slice(br#""}"#);
    let r = post("/api/v1/orgs", "application/json", bytes).await;
    assert!((400..500).contains(&r.status), "{}", r.text);
    assert!(!r.code().is_empty(), "error shape: {}", r.text);
    // Deeply nested JSON: refused without exhausting the stack.
    let nested = format!("{}{}", "[".repeat(100_000), "]".repeat(100_000));
    let r = post("/api/v1/orgs", "application/json", nested.into_bytes()).await;
    assert!((400..500).contains(&r.status), "{}", r.text);
    let nested_obj = format!(r#"{{"name":{}1{}}}"#, "[".repeat(5_000), "]".repeat(5_000));
    let r = post("/api/v1/orgs", "application/json", nested_obj.into_bytes()).await;
    assert!((400..500).contains(&r.status), "{}", r.text);
    // A JSON body sent with another content type is still read as JSON or
    // refused with a 4xx; it never reaches a 5xx.
    let r = post(
        "/api/v1/orgs",
        "text/plain",
        br#"{"name":"plain"}"#.to_vec(),
    )
    .await;
    assert!(r.status < 500, "{}", r.text);
    let r = post(
        "/api/v1/orgs",
        "application/x-www-form-urlencoded",
        b"name=form".to_vec(),
    )
    .await;
    assert!((400..500).contains(&r.status), "{}", r.text);
    // A huge header: a 4xx or a closed connection, never a stuck worker.
    // Its own client: the server closes that connection, which must not be
    // reused for the requests below.
    let huge = reqwest::Client::new()
        .get(format!("{}/api/v1/me", app.base))
        .bearer_auth(&token)
        .header("x-padding", "a".repeat(256 * 1024))
        .send()
        .await;
    if let Ok(res) = huge {
        assert!(
            (400..500).contains(&res.status().as_u16()),
            "{}",
            res.status()
        );
    }
    // Still serving, and nothing half-created.
    app.get("/api/v1/me", &token).await.expect(200);
    let orgs = app.get("/api/v1/orgs", &token).await;
    orgs.expect(200);
    for org in orgs.body["data"].as_array().unwrap() {
        assert_ne!(org["name"], "form");
    }
}

fn addr_of(app: &TestApp) -> std::net::SocketAddr {
    app.base.trim_start_matches("http://").parse().unwrap()
}

#[tokio::test]
async fn a_body_that_stalls_gets_408_and_the_connection_closes() {
    let app = TestApp::spawn_with(Opts {
        body_timeout: Duration::from_millis(500),
        ..Opts::default()
    })
    .await;
    let (token, _) = app.signup("slow@example.com").await;
    for (path, auth) in [
        ("/api/v1/auth/login", String::new()),
        ("/api/v1/orgs", format!("authorization: Bearer {token}\r\n")),
    ] {
        let started = std::time::Instant::now();
        let mut c = testkit::RawClient::connect(addr_of(&app)).await.unwrap();
        // Promises 100 bytes, sends one, then stalls.
        assert!(
            c.send(
                format!(
                    "POST {path} HTTP/1.1\r\nhost: x\r\n{auth}content-type: application/json\r\ncontent-length: 100\r\n\r\n{{"
                )
                .as_bytes()
            )
            .await
        );
        let answer = c.read_answer(Duration::from_secs(5)).await;
        assert_eq!(answer.status(), Some(408), "{path}: {answer:?}");
        assert!(
            answer.closed,
            "{path}: the half-sent body is not waited for"
        );
        assert!(
            started.elapsed() < Duration::from_secs(2),
            "{path}: {:?}",
            started.elapsed()
        );
        let text = answer.text.to_ascii_lowercase();
        assert!(text.contains("\"code\":\"request_timeout\""), "{text}");
        assert!(text.contains("x-content-type-options: nosniff"), "{text}");
    }

    // The deadline bounds the whole body, not each read: a body that is
    // slow but complete within it is served.
    let body = br#"{"name":"patient"}"#;
    let mut c = testkit::RawClient::connect(addr_of(&app)).await.unwrap();
    assert!(
        c.send(
            format!(
                "POST /api/v1/orgs HTTP/1.1\r\nhost: x\r\nauthorization: Bearer {token}\r\ncontent-type: application/json\r\nconnection: close\r\ncontent-length: {}\r\n\r\n",
                body.len()
            )
            .as_bytes()
        )
        .await
    );
    for part in body.chunks(6) {
        tokio::time::sleep(Duration::from_millis(100)).await;
        assert!(c.send(part).await);
    }
    let answer = c.read_answer(Duration::from_secs(5)).await;
    assert_eq!(answer.status(), Some(201), "{answer:?}");
    app.get("/api/v1/me", &token).await.expect(200);
}

#[tokio::test]
async fn every_answer_carries_nosniff() {
    let app = TestApp::spawn_with(Opts {
        max_body_bytes: 1024,
        ..Opts::default()
    })
    .await;
    let (token, _) = app.signup("sniff@example.com").await;
    let org = app.create_org(&token, "Sniff").await;
    let missing = uuid::Uuid::new_v4();
    let answers = [
        app.call(Method::GET, "/healthz", None, None).await,
        app.call(Method::GET, "/api/openapi.json", None, None).await,
        app.get("/api/v1/me", &token).await,
        app.post("/api/v1/orgs", &token, json!({"name": "Two"}))
            .await,
        // Error answers of every kind: 400, 401, 404 (unknown id, unknown
        // route, no route at all), 405, 413, 422.
        app.send(
            app.request(Method::POST, "/api/v1/orgs", Some(&token))
                .header("content-type", "application/json")
                .body("{"),
        )
        .await,
        app.call(Method::GET, "/api/v1/me", None, None).await,
        app.get(&format!("/api/v1/orgs/{missing}"), &token).await,
        app.get("/api/v1/nope", &token).await,
        app.call(Method::GET, "/", None, None).await,
        app.call(Method::PUT, "/api/v1/orgs", Some(&token), None)
            .await,
        app.post("/api/v1/orgs", &token, json!({"name": "x".repeat(2000)}))
            .await,
        app.patch(&format!("/api/v1/orgs/{org}"), &token, json!({"name": 7}))
            .await,
        app.call(Method::POST, "/api/v1/auth/logout", Some(&token), None)
            .await,
    ];
    let statuses: BTreeSet<u16> = answers.iter().map(|r| r.status).collect();
    for s in [200, 201, 204, 400, 401, 404, 405, 413, 422] {
        assert!(statuses.contains(&s), "no {s} answer among {statuses:?}");
    }
    for r in &answers {
        assert_eq!(
            r.headers
                .get("x-content-type-options")
                .map(|v| v.to_str().unwrap()),
            Some("nosniff"),
            "{} {}",
            r.status,
            r.text
        );
    }
}
