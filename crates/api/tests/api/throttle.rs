//! Password guessing and floods against login/signup: per-email and
//! per-address throttles, and who may name the client in `X-Forwarded-For`.

use serde_json::{json, Value};

use crate::helpers::{Opts, Resp, TestApp, PASSWORD};

async fn login_from(app: &TestApp, xff: Option<&str>, body: Value) -> Resp {
    let mut req = app
        .client
        .post(format!("{}/api/v1/auth/login", app.base))
        .json(&body);
    if let Some(v) = xff {
        req = req.header("x-forwarded-for", v);
    }
    app.send(req).await
}

#[track_caller]
fn assert_throttled(r: &Resp) {
    r.expect(429);
    assert_eq!(r.code(), "too_many_requests");
    assert!(r.error_fields().is_empty());
    let secs: u64 = r
        .headers
        .get("retry-after")
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.parse().ok())
        .unwrap_or_else(|| panic!("429 without a numeric Retry-After: {:?}", r.headers));
    assert!((1..=120).contains(&secs), "Retry-After {secs}");
}

#[tokio::test]
async fn guessing_one_accounts_password_is_throttled_per_email() {
    let app = TestApp::spawn().await;
    app.signup("target@example.com").await;
    // The signup counted once for this email; ten guesses fill the burst of ten.
    let mut answers = Vec::new();
    for i in 0..12 {
        let r = login_from(
            &app,
            None,
            json!({"email": "target@example.com", "password": format!("guess-{i:04}")}),
        )
        .await;
        answers.push(r);
    }
    let first_429 = answers.iter().position(|r| r.status == 429);
    assert_eq!(
        first_429,
        Some(9),
        "{:?}",
        answers.iter().map(|r| r.status).collect::<Vec<_>>()
    );
    assert!(answers[..9].iter().all(|r| r.status == 401));
    for r in &answers[9..] {
        assert_throttled(r);
    }
    // Other spellings of the same email share its budget, even with the right password.
    assert_throttled(
        &login_from(
            &app,
            None,
            json!({"email": " TARGET@example.com", "password": PASSWORD}),
        )
        .await,
    );
    // Another account from the same address is not affected.
    app.signup("bystander@example.com").await;
    login_from(
        &app,
        None,
        json!({"email": "bystander@example.com", "password": PASSWORD}),
    )
    .await
    .expect(200);
}

#[tokio::test]
async fn forwarded_for_from_an_untrusted_peer_is_ignored() {
    let app = TestApp::spawn().await;
    // Each attempt claims another address; all of them come from 127.0.0.1.
    for i in 0..20 {
        let xff = format!("203.0.113.{i}");
        login_from(&app, Some(&xff), json!({})).await.expect(422);
    }
    assert_throttled(&login_from(&app, Some("198.51.100.1"), json!({})).await);
    // Signup shares the per-address budget.
    let signup = app
        .send(
            app.client
                .post(format!("{}/api/v1/auth/signup", app.base))
                .header("x-forwarded-for", "198.51.100.2")
                .json(&json!({"email": "new@example.com", "password": PASSWORD})),
        )
        .await;
    assert_throttled(&signup);
}

#[tokio::test]
async fn forwarded_for_from_a_trusted_proxy_names_the_client() {
    let app = TestApp::spawn_with(Opts {
        trusted_proxies: api::TrustedProxies::parse("127.0.0.1").unwrap(),
        ..Opts::default()
    })
    .await;
    for _ in 0..20 {
        login_from(&app, Some("203.0.113.7"), json!({}))
            .await
            .expect(422);
    }
    assert_throttled(&login_from(&app, Some("203.0.113.7"), json!({})).await);
    // A hop the client wrote itself, left of the real one, changes nothing.
    assert_throttled(&login_from(&app, Some("198.51.100.9, 203.0.113.7"), json!({})).await);
    // Another client behind the same proxy has its own budget.
    login_from(&app, Some("203.0.113.8"), json!({}))
        .await
        .expect(422);
}
