//! Browser sessions: the `llmgw_session` cookie, the CSRF check on unsafe
//! requests it authenticates, and the admin UI served beside the API.

use reqwest::header::{COOKIE, ORIGIN, SET_COOKIE};
use reqwest::Method;
use serde_json::json;

use crate::helpers::{Opts, Resp, TestApp, PASSWORD};

const EVIL: &str = "https://evil.example";

fn set_cookie(r: &Resp) -> String {
    r.headers
        .get(SET_COOKIE)
        .and_then(|v| v.to_str().ok())
        .unwrap_or_else(|| panic!("no Set-Cookie on {}", r.text))
        .to_owned()
}

/// `llmgw_session=…` as a browser would send it back.
fn cookie_of(r: &Resp) -> String {
    set_cookie(r)
        .split(';')
        .next()
        .expect("cookie pair")
        .to_owned()
}

async fn login(app: &TestApp, email: &str) -> Resp {
    app.signup(email).await;
    app.login(email).await
}

#[tokio::test]
async fn cookie_login_signs_in_the_browser_and_logout_clears_it() {
    let app = TestApp::spawn().await;
    let r = login(&app, "web@example.com").await;
    let sc = set_cookie(&r);
    for attr in ["llmgw_session=", "HttpOnly", "SameSite=Strict", "Path=/"] {
        assert!(sc.contains(attr), "{attr} missing from {sc}");
    }
    assert!(
        !sc.contains("Secure"),
        "plain-http server marks the cookie Secure: {sc}"
    );
    assert!(sc.contains(r.body["token"].as_str().unwrap()));
    let cookie = cookie_of(&r);

    let me = app
        .send(
            app.request(Method::GET, "/api/v1/me", None)
                .header(COOKIE, &cookie),
        )
        .await;
    me.expect(200);
    assert_eq!(me.body["email"], "web@example.com");

    // A same-origin page's POST, as Chromium sends it.
    let org = app
        .send(
            app.request(Method::POST, "/api/v1/orgs", None)
                .header(COOKIE, &cookie)
                .header(ORIGIN, &app.base)
                .header("sec-fetch-site", "same-origin")
                .json(&json!({"name": "Web"})),
        )
        .await;
    org.expect(201);

    let out = app
        .send(
            app.request(Method::POST, "/api/v1/auth/logout", None)
                .header(COOKIE, &cookie)
                .header(ORIGIN, &app.base),
        )
        .await;
    out.expect(204);
    let cleared = set_cookie(&out);
    assert!(
        cleared.starts_with("llmgw_session=;") && cleared.contains("Max-Age=0"),
        "{cleared}"
    );
    app.send(
        app.request(Method::GET, "/api/v1/me", None)
            .header(COOKIE, &cookie),
    )
    .await
    .expect(401);
}

#[tokio::test]
async fn cross_site_post_with_the_cookie_is_refused() {
    let app = TestApp::spawn().await;
    let r = login(&app, "victim@example.com").await;
    let cookie = cookie_of(&r);
    let token = r.body["token"].as_str().unwrap().to_owned();
    let attacks = [
        vec![(ORIGIN.as_str(), EVIL), ("sec-fetch-site", "cross-site")],
        vec![(ORIGIN.as_str(), EVIL)],
        vec![("sec-fetch-site", "same-site")],
        vec![(ORIGIN.as_str(), "null")],
        // A browser that sends neither header gets no benefit of the doubt.
        vec![],
    ];
    for headers in attacks {
        let mut req = app
            .request(Method::POST, "/api/v1/orgs", None)
            .header(COOKIE, &cookie)
            .json(&json!({"name": "Forged"}));
        for (k, v) in &headers {
            req = req.header(*k, *v);
        }
        let res = app.send(req).await;
        res.expect(403);
        assert_eq!(res.code(), "csrf_failed", "{headers:?}");
    }
    let del = app
        .send(
            app.request(Method::DELETE, "/api/v1/me/sessions", None)
                .header(COOKIE, &cookie)
                .header(ORIGIN, EVIL),
        )
        .await;
    assert_eq!(del.code(), "csrf_failed");
    // Nothing was made, and the session still works.
    let orgs = app.get("/api/v1/orgs", &token).await;
    orgs.expect(200);
    assert_eq!(
        orgs.body["data"].as_array().map(Vec::len),
        Some(0),
        "{}",
        orgs.text
    );
}

#[tokio::test]
async fn bearer_token_works_regardless_of_origin_and_ignores_the_cookie() {
    let app = TestApp::spawn().await;
    let r = login(&app, "script@example.com").await;
    let token = r.body["token"].as_str().unwrap().to_owned();
    let cookie = cookie_of(&r);
    app.send(
        app.request(Method::POST, "/api/v1/orgs", Some(&token))
            .header(ORIGIN, EVIL)
            .header("sec-fetch-site", "cross-site")
            .json(&json!({"name": "Scripted"})),
    )
    .await
    .expect(201);
    // An invalid bearer token is not rescued by a valid cookie.
    app.send(
        app.request(Method::GET, "/api/v1/me", Some("not-a-session"))
            .header(COOKIE, &cookie),
    )
    .await
    .expect(401);
}

#[tokio::test]
async fn cross_site_login_and_signup_are_refused() {
    let app = TestApp::spawn().await;
    app.signup("login@example.com").await;
    for (path, email) in [
        ("/api/v1/auth/login", "login@example.com"),
        ("/api/v1/auth/signup", "new@example.com"),
    ] {
        let r = app
            .send(
                app.request(Method::POST, path, None)
                    .header(ORIGIN, EVIL)
                    .json(&json!({"email": email, "password": PASSWORD})),
            )
            .await;
        r.expect(403);
        assert_eq!(r.code(), "csrf_failed");
        assert!(r.headers.get(SET_COOKIE).is_none());
    }
    // The refused signup made no account.
    app.signup("new@example.com").await;
}

#[tokio::test]
async fn public_https_url_makes_the_cookie_secure_and_is_an_accepted_origin() {
    let mut opts = Opts::default();
    opts.browser.public_url = Some("https://llmgw.example.com".into());
    let app = TestApp::spawn_with(opts).await;
    let r = login(&app, "proxied@example.com").await;
    assert!(set_cookie(&r).contains("; Secure"));
    app.send(
        app.request(Method::POST, "/api/v1/orgs", None)
            .header(COOKIE, cookie_of(&r))
            .header(ORIGIN, "https://llmgw.example.com")
            .json(&json!({"name": "Behind a proxy"})),
    )
    .await
    .expect(201);
}

#[tokio::test]
async fn ui_is_served_on_every_non_api_path_with_a_strict_policy() {
    let app = TestApp::spawn().await;
    for path in ["/", "/providers", "/some/deep/link"] {
        let r = app.send(app.request(Method::GET, path, None)).await;
        r.expect(200);
        assert!(
            r.text.contains("<script src=\"/ui/app.js\""),
            "{path}: {}",
            r.text
        );
        let csp = r.headers["content-security-policy"].to_str().unwrap();
        assert!(csp.contains("frame-ancestors 'none'") && csp.contains("script-src 'self'"));
        assert!(!csp.contains("unsafe-inline"));
        assert_eq!(r.headers["x-content-type-options"], "nosniff");
    }
    let js = app.send(app.request(Method::GET, "/ui/app.js", None)).await;
    js.expect(200);
    assert!(js.headers["content-type"]
        .to_str()
        .unwrap()
        .starts_with("text/javascript"));
    let missing = app
        .send(app.request(Method::GET, "/api/v1/nothing-here", None))
        .await;
    missing.expect(404);
    assert_eq!(missing.code(), "route_not_found");
    let cfg = app
        .send(app.request(Method::GET, "/api/v1/auth/config", None))
        .await;
    cfg.expect(200);
    assert_eq!(
        cfg.body,
        json!({"password_login": true, "sso": false, "signup": true,
               "allow_http": false, "gateway_public_url": null})
    );
}
