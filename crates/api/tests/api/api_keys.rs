use serde_json::{json, Value};
use storage::secrets::sha256;

use crate::helpers::TestApp;

#[tokio::test]
async fn api_key_lifecycle() {
    let app = TestApp::spawn().await;
    let (admin, _) = app.signup("kim@example.com").await;
    let org = app.create_org(&admin, "K").await;
    let base = format!("/api/v1/orgs/{org}/api-keys");
    let expires = (chrono::Utc::now() + chrono::Duration::days(30)).to_rfc3339();
    let created = app
        .post(&base, &admin, json!({"name": "ci", "expires_at": expires}))
        .await;
    created.expect(201);
    let key = created.body["key"].as_str().unwrap().to_owned();
    assert!(key.starts_with("llmgw_") && key.len() >= 6 + 43, "{key}");
    let prefix = created.body["prefix"].as_str().unwrap();
    assert!(key.starts_with(prefix) && prefix.len() < key.len());
    assert_eq!(created.body["name"], "ci");
    assert!(created.body["expires_at"].is_string());
    assert_eq!(created.body["revoked_at"], Value::Null);
    assert_eq!(created.body["last_used_at"], Value::Null);
    let id = created.id();

    // Stored as a digest the gateway can look up.
    let auth = app
        .db
        .db
        .api_key_by_digest(&sha256(&key))
        .await
        .unwrap()
        .expect("digest stored");
    assert_eq!(auth.org_id.to_string(), org);

    let list = app.get(&base, &admin).await;
    list.expect(200);
    assert_eq!(list.body["data"][0]["id"], id.as_str());
    assert!(list.body["data"][0].get("key").is_none());

    let revoked = app.delete(&format!("{base}/{id}"), &admin).await;
    revoked.expect(200);
    let at = revoked.body["revoked_at"].clone();
    assert!(at.is_string());
    // Idempotent: the first revocation time is kept.
    assert_eq!(
        app.delete(&format!("{base}/{id}"), &admin)
            .await
            .expect(200)
            .body["revoked_at"],
        at
    );
    app.delete(&format!("{base}/{}", uuid::Uuid::new_v4()), &admin)
        .await
        .expect(404);

    // The key was shown exactly once.
    let shown = app
        .transcript
        .lock()
        .unwrap()
        .iter()
        .filter(|b| b.contains(&key))
        .count();
    assert_eq!(shown, 1);
    assert!(!crate::helpers::captured_logs().contains(&key));
}

#[tokio::test]
async fn api_key_input_is_validated_and_lists_paginate() {
    let app = TestApp::spawn().await;
    let (admin, _) = app.signup("lee@example.com").await;
    let org = app.create_org(&admin, "L").await;
    let base = format!("/api/v1/orgs/{org}/api-keys");
    let past = app
        .post(
            &base,
            &admin,
            json!({"name": "old", "expires_at": "2001-01-01T00:00:00Z"}),
        )
        .await;
    past.expect(422);
    assert_eq!(past.error_fields(), ["expires_at"]);
    let garbage = app
        .post(&base, &admin, json!({"name": "", "expires_at": "tomorrow"}))
        .await;
    garbage.expect(422);
    assert_eq!(garbage.error_fields(), ["name", "expires_at"]);
    app.post(
        &base,
        &admin,
        json!({"name": "forever", "expires_at": null}),
    )
    .await
    .expect(201);

    for i in 0..4 {
        app.post(&base, &admin, json!({"name": format!("k{i}")}))
            .await
            .expect(201);
    }
    let mut seen = Vec::new();
    let mut cursor: Option<String> = None;
    loop {
        let q = cursor
            .as_ref()
            .map_or(String::new(), |c| format!("&cursor={c}"));
        let page = app.get(&format!("{base}?limit=2{q}"), &admin).await;
        page.expect(200);
        let data = page.body["data"].as_array().unwrap();
        assert!(data.len() <= 2);
        seen.extend(data.iter().map(|k| k["name"].as_str().unwrap().to_owned()));
        match page.body["next_cursor"].as_str() {
            Some(c) => cursor = Some(c.to_owned()),
            None => break,
        }
    }
    assert_eq!(seen, ["k3", "k2", "k1", "k0", "forever"]);
    app.get(&format!("{base}?limit=0"), &admin)
        .await
        .expect(422);
    app.get(&format!("{base}?limit=abc"), &admin)
        .await
        .expect(422);
    let bad = app.get(&format!("{base}?cursor=nonsense"), &admin).await;
    bad.expect(422);
    assert_eq!(bad.error_fields(), ["cursor"]);
}
