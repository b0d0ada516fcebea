use std::time::Duration;

use reqwest::Method;
use serde_json::json;
use storage::secrets::SessionToken;

use crate::helpers::{Opts, TestApp, PASSWORD};

#[tokio::test]
async fn signup_login_me_and_logout_round_trip() {
    let app = TestApp::spawn().await;
    let r = app
        .call(
            Method::POST,
            "/api/v1/auth/signup",
            None,
            Some(json!({"email": "Ada@Example.com", "password": PASSWORD})),
        )
        .await;
    r.expect(201);
    let signup_token = r.body["token"].as_str().unwrap().to_owned();
    assert!(r.body["expires_at"]
        .as_str()
        .unwrap()
        .parse::<chrono::DateTime<chrono::Utc>>()
        .is_ok());
    assert_eq!(r.body["user"]["email"], "Ada@Example.com");
    assert!(r.body["user"].get("password_hash").is_none());
    let user_id = r.body["user"]["id"].clone();

    let me = app.get("/api/v1/me", &signup_token).await;
    me.expect(200);
    assert_eq!(me.body, json!({"id": user_id, "email": "Ada@Example.com"}));

    // Emails compare case-insensitively.
    let login = app
        .call(
            Method::POST,
            "/api/v1/auth/login",
            None,
            Some(json!({"email": "ada@example.com", "password": PASSWORD})),
        )
        .await;
    login.expect(200);
    let login_token = login.body["token"].as_str().unwrap().to_owned();
    assert_ne!(login_token, signup_token);
    assert_eq!(login.body["user"]["id"], user_id);

    app.call(
        Method::POST,
        "/api/v1/auth/logout",
        Some(&signup_token),
        None,
    )
    .await
    .expect(204);
    let after = app.get("/api/v1/me", &signup_token).await;
    after.expect(401);
    assert_eq!(after.code(), "unauthorized");
    // Logout ends that session only.
    app.get("/api/v1/me", &login_token).await.expect(200);
    // A second logout with the dead token is refused like any unknown token.
    app.call(
        Method::POST,
        "/api/v1/auth/logout",
        Some(&signup_token),
        None,
    )
    .await
    .expect(401);
}

#[tokio::test]
async fn unknown_email_and_wrong_password_get_the_same_answer() {
    let app = TestApp::spawn().await;
    app.signup("bob@example.com").await;
    let login = |email: &'static str, password: &'static str| {
        app.call(
            Method::POST,
            "/api/v1/auth/login",
            None,
            Some(json!({"email": email, "password": password})),
        )
    };
    let wrong_password = login("bob@example.com", "not the password").await;
    let unknown_email = login("nobody@example.com", PASSWORD).await;
    let malformed_email = login("not-an-email", PASSWORD).await;
    for r in [&wrong_password, &unknown_email, &malformed_email] {
        r.expect(401);
        assert_eq!(r.body, wrong_password.body);
        assert_eq!(r.code(), "invalid_credentials");
    }
}

#[tokio::test]
async fn duplicate_signup_is_a_conflict_and_bad_input_names_fields() {
    let app = TestApp::spawn().await;
    app.signup("carol@example.com").await;
    let again = app
        .call(
            Method::POST,
            "/api/v1/auth/signup",
            None,
            Some(json!({"email": "CAROL@example.com", "password": PASSWORD})),
        )
        .await;
    again.expect(409);
    assert_eq!(again.code(), "conflict");

    let bad = app
        .call(
            Method::POST,
            "/api/v1/auth/signup",
            None,
            Some(json!({"email": "nope", "password": "short"})),
        )
        .await;
    bad.expect(422);
    assert_eq!(bad.error_fields(), ["email", "password"]);
}

#[tokio::test]
async fn signup_can_be_disabled() {
    let app = TestApp::spawn_with(Opts {
        allow_signup: false,
        ..Opts::default()
    })
    .await;
    let r = app
        .call(
            Method::POST,
            "/api/v1/auth/signup",
            None,
            Some(json!({"email": "dan@example.com", "password": PASSWORD})),
        )
        .await;
    r.expect(403);
    assert_eq!(r.code(), "signup_disabled");
}

#[tokio::test]
async fn missing_malformed_and_unknown_tokens_are_refused() {
    let app = TestApp::spawn().await;
    let none = app.call(Method::GET, "/api/v1/me", None, None).await;
    none.expect(401);
    assert_eq!(none.headers["www-authenticate"], "Bearer");
    assert_eq!(none.error_fields(), Vec::<String>::new());
    let basic = app
        .send(
            app.request(Method::GET, "/api/v1/me", None)
                .header("authorization", "Basic YTpi"),
        )
        .await;
    basic.expect(401);
    app.get("/api/v1/me", "llmgws_not-a-real-token")
        .await
        .expect(401);
}

#[tokio::test]
async fn expired_sessions_end_access() {
    let app = TestApp::spawn_with(Opts {
        session_ttl: Duration::from_secs(1),
        ..Opts::default()
    })
    .await;
    let (token, user_id) = app.signup("erin@example.com").await;
    app.get("/api/v1/me", &token).await.expect(200);
    tokio::time::sleep(Duration::from_millis(1300)).await;
    app.get("/api/v1/me", &token).await.expect(401);

    // A session stored with an expiry in the past never works.
    let stale = SessionToken::generate();
    app.db
        .db
        .create_session(
            user_id.parse().unwrap(),
            &stale.digest(),
            chrono::Utc::now() - chrono::Duration::minutes(1),
        )
        .await
        .unwrap();
    app.get("/api/v1/me", stale.expose_secret())
        .await
        .expect(401);
}

/// Sets `last_seen_at` of the session behind `token` to `age` ago.
async fn age_session(app: &TestApp, token: &str, age: Duration) {
    let digest = SessionToken::from_presented(token).digest();
    let r = sqlx::query(
        "UPDATE sessions SET last_seen_at = now() - make_interval(secs => $2) WHERE token_digest = $1",
    )
    .bind(&digest[..])
    .bind(age.as_secs_f64())
    .execute(app.db.db.pool())
    .await
    .unwrap();
    assert_eq!(r.rows_affected(), 1);
}

async fn last_seen_age(app: &TestApp, token: &str) -> f64 {
    let digest = SessionToken::from_presented(token).digest();
    sqlx::query_scalar::<_, f64>(
        "SELECT extract(epoch FROM now() - last_seen_at)::float8 FROM sessions WHERE token_digest = $1",
    )
    .bind(&digest[..])
    .fetch_one(app.db.db.pool())
    .await
    .unwrap()
}

async fn login(app: &TestApp, email: &str) -> String {
    app.login(email).await.body["token"]
        .as_str()
        .unwrap()
        .to_owned()
}

#[tokio::test]
async fn a_session_left_idle_stops_working_before_it_expires() {
    let app = TestApp::spawn_with(Opts {
        session_idle: Duration::from_secs(60),
        ..Opts::default()
    })
    .await;
    let (idle, _) = app.signup("ivy@example.com").await;
    let busy = login(&app, "ivy@example.com").await;

    // Unused for two minutes against a one-minute idle limit: refused, though
    // its expiry (an hour) is far away.
    age_session(&app, &idle, Duration::from_secs(120)).await;
    let r = app.get("/api/v1/me", &idle).await;
    r.expect(401);
    assert_eq!(r.code(), "unauthorized");
    // Org routes authenticate the same way.
    app.get("/api/v1/orgs", &idle).await.expect(401);

    // Used 40 s ago: still valid, and the use moves `last_seen_at` forward,
    // so steady use never runs into the idle limit.
    age_session(&app, &busy, Duration::from_secs(40)).await;
    app.get("/api/v1/me", &busy).await.expect(200);
    assert!(last_seen_age(&app, &busy).await < 5.0);
    age_session(&app, &busy, Duration::from_secs(40)).await;
    app.get("/api/v1/orgs", &busy).await.expect(200);
    assert!(last_seen_age(&app, &busy).await < 5.0);

    // Recorded a moment ago: the next requests do not write again.
    age_session(&app, &busy, Duration::from_secs(3)).await;
    for _ in 0..3 {
        app.get("/api/v1/me", &busy).await.expect(200);
    }
    let age = last_seen_age(&app, &busy).await;
    assert!(
        age >= 3.0,
        "last_seen_at rewritten on every request ({age} s)"
    );
}

#[tokio::test]
async fn sign_out_everywhere_ends_every_session_of_the_caller_only() {
    let app = TestApp::spawn().await;
    let (laptop, _) = app.signup("jo@example.com").await;
    let phone = login(&app, "jo@example.com").await;
    let (other_user, _) = app.signup("kim@example.com").await;

    app.call(Method::DELETE, "/api/v1/me/sessions", None, None)
        .await
        .expect(401);

    app.delete("/api/v1/me/sessions", &phone).await.expect(204);
    // The calling session and the other one of the same user are both gone.
    for token in [&phone, &laptop] {
        let r = app.get("/api/v1/me", token).await;
        r.expect(401);
        assert_eq!(r.code(), "unauthorized");
    }
    // Another user's session is untouched.
    app.get("/api/v1/me", &other_user).await.expect(200);
    // Signing in again works as before.
    let fresh = login(&app, "jo@example.com").await;
    app.get("/api/v1/me", &fresh).await.expect(200);
    // The dead token cannot sign out the new session.
    app.delete("/api/v1/me/sessions", &phone).await.expect(401);
    app.get("/api/v1/me", &fresh).await.expect(200);
}
