//! Tokens, keys and passwords leave the server only where the contract says.

use reqwest::Method;
use serde_json::json;
use testkit::MockUpstream;

use crate::helpers::{captured_logs, Opts, TestApp, PASSWORD};

#[tokio::test]
async fn secrets_never_appear_in_responses_or_logs() {
    let upstream = MockUpstream::start().await;
    let app = TestApp::spawn_with(Opts {
        allow_private: true,
        ca_file: Some(upstream.ca.ca_file.clone()),
        ..Opts::default()
    })
    .await;
    let signup = app
        .call(
            Method::POST,
            "/api/v1/auth/signup",
            None,
            Some(json!({"email": "sec@example.com", "password": PASSWORD})),
        )
        .await;
    signup.expect(201);
    let session = signup.body["token"].as_str().unwrap().to_owned();
    let org = app.create_org(&session, "Secrets").await;

    let provider_token = format!("sk-never-shown-{}", uuid::Uuid::new_v4().simple());
    let created = app
        .create_provider(
            &session,
            &org,
            "mycompany",
            &upstream.base_url,
            &provider_token,
        )
        .await;
    created.expect(201);
    let id = created.id();
    let path = format!("/api/v1/orgs/{org}/provider-keys/{id}");
    app.get(&path, &session).await.expect(200);
    app.get(&format!("/api/v1/orgs/{org}/provider-keys"), &session)
        .await
        .expect(200);
    app.post(&format!("{path}/test"), &session, json!({}))
        .await
        .expect(200);
    // Refused input is not echoed either.
    let refused_token = format!("{provider_token}\n");
    app.patch(&path, &session, json!({"token": refused_token}))
        .await
        .expect(422);
    app.create_provider(&session, &org, "Bad", &upstream.base_url, &provider_token)
        .await
        .expect(422);
    let rotated = format!("sk-rotated-{}", uuid::Uuid::new_v4().simple());
    app.patch(&path, &session, json!({"token": rotated}))
        .await
        .expect(200);
    app.post(&format!("{path}/test"), &session, json!({}))
        .await
        .expect(200);
    app.get(&format!("/api/v1/orgs/{org}/audit-log"), &session)
        .await
        .expect(200);
    let key = app
        .post(
            &format!("/api/v1/orgs/{org}/api-keys"),
            &session,
            json!({"name": "k"}),
        )
        .await;
    key.expect(201);
    let api_key = key.body["key"].as_str().unwrap().to_owned();
    app.get(&format!("/api/v1/orgs/{org}/api-keys"), &session)
        .await
        .expect(200);
    app.get(&format!("/api/v1/orgs/{org}/audit-log"), &session)
        .await
        .expect(200);
    let wrong = app
        .call(
            Method::POST,
            "/api/v1/auth/login",
            None,
            Some(json!({"email": "sec@example.com", "password": "hunter2-wrong-pass"})),
        )
        .await;
    wrong.expect(401);

    // The upstream did receive the token: it travels only there.
    assert!(upstream
        .seen()
        .iter()
        .any(|s| s.header("authorization") == Some(&format!("Bearer {provider_token}"))));

    for secret in [
        provider_token.as_str(),
        rotated.as_str(),
        PASSWORD,
        "hunter2-wrong-pass",
    ] {
        app.assert_never_disclosed(secret);
    }
    // The API key and session token appear once each: in the answer that created them.
    for (secret, times) in [(api_key.as_str(), 1), (session.as_str(), 1)] {
        let n = app
            .transcript
            .lock()
            .unwrap()
            .iter()
            .filter(|b| b.contains(secret))
            .count();
        assert_eq!(n, times);
    }
    let logs = captured_logs();
    assert!(!logs.is_empty(), "log capture is working");
    for secret in [api_key.as_str(), session.as_str()] {
        assert!(!logs.contains(secret), "secret in logs");
    }
    // Nor in the database in the clear.
    let stored = app
        .db
        .db
        .list_audit(org.parse().unwrap(), None, 200)
        .await
        .unwrap();
    assert!(!format!("{:?}", stored.data).contains(&provider_token));
}
