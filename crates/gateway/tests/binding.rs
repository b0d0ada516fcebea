//! A provider token goes only to the base URL it was saved with: neither an
//! admin's PATCH nor an edit in SQL can point the gateway, token attached,
//! at a host the attacker controls.

mod common;

use std::time::{Duration, Instant};

use common::*;
use serde_json::{json, Value};
use storage::domain::BaseUrl;
use storage::providers::ProviderPatch;
use storage::secrets::ProviderToken;
use storage::{Actor, StorageError};
use testkit::{MockUpstream, SeenRequest};

/// Polls the gateway until a chat request answers `status`.
async fn until_status(env: &Env, status: u16) -> reqwest::Response {
    let body = json!({"model": "mycompany/m", "messages": messages()});
    let deadline = Instant::now() + Duration::from_secs(5);
    loop {
        let resp = env.chat(&body).await;
        if resp.status().as_u16() == status {
            return resp;
        }
        assert!(
            Instant::now() < deadline,
            "still {} instead of {status}",
            resp.status()
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

fn carries(seen: &[SeenRequest], secret: &str) -> bool {
    seen.iter().any(|s| {
        s.headers.iter().any(|(_, v)| v.contains(secret))
            || String::from_utf8_lossy(&s.body).contains(secret)
    })
}

#[tokio::test]
async fn the_gateway_never_sends_the_token_to_a_redirected_base_url() {
    let env = Env::new().await;
    let attacker = MockUpstream::start_with_ca(env.upstream.ca.clone()).await;
    let (org, db) = (env.org.id, env.db());
    let id = db.list_provider_keys(org).await.unwrap()[0].id;
    until_status(&env, 200).await;
    assert!(carries(&env.upstream.seen(), TOKEN));

    // The admin's redirect without the token is refused; the gateway keeps
    // using the URL the token was saved with.
    let err = db
        .update_provider_key(
            org,
            Actor(None),
            id,
            ProviderPatch {
                base_url: Some(BaseUrl::parse(&attacker.base_url).unwrap()),
                ..ProviderPatch::default()
            },
        )
        .await
        .unwrap_err();
    assert!(
        matches!(&err, StorageError::Invalid(v) if v.field == "token"),
        "{err:?}"
    );
    tokio::time::sleep(Duration::from_millis(200)).await;
    until_status(&env, 200).await;
    assert!(attacker.seen().is_empty(), "the attacker was contacted");

    // The same redirect written in SQL: the token no longer opens, so the
    // provider is unusable and the attacker gets nothing, models list included.
    sqlx::query("UPDATE provider_keys SET base_url = $1 WHERE id = $2")
        .bind(&attacker.base_url)
        .bind(id)
        .execute(db.pool())
        .await
        .unwrap();
    let (_, code) = openai_error(until_status(&env, 502).await, 502).await;
    assert_eq!(code, "provider_misconfigured");
    let models: Value = env
        .http
        .get(format!("{}/v1/models", env.url))
        .bearer_auth(&env.org.key)
        .send()
        .await
        .unwrap()
        .json_value()
        .await;
    assert_eq!(models["data"], json!([]), "{models}");
    assert!(attacker.seen().is_empty(), "the attacker was contacted");

    // Put back, it works again.
    sqlx::query("UPDATE provider_keys SET base_url = $1 WHERE id = $2")
        .bind(&env.upstream.base_url)
        .bind(id)
        .execute(db.pool())
        .await
        .unwrap();
    until_status(&env, 200).await;

    // Moving the provider with a token of the admin's own sends that token,
    // and never the old one, to the new host.
    let own = "sk-admin-own-token-for-new-host";
    db.update_provider_key(
        org,
        Actor(None),
        id,
        ProviderPatch {
            base_url: Some(BaseUrl::parse(&attacker.base_url).unwrap()),
            token: Some(ProviderToken::parse(own).unwrap()),
            ..ProviderPatch::default()
        },
    )
    .await
    .unwrap();
    let deadline = Instant::now() + Duration::from_secs(5);
    while attacker.seen().is_empty() {
        assert!(
            Instant::now() < deadline,
            "the move never reached the gateway"
        );
        until_status(&env, 200).await;
    }
    let seen = attacker.seen();
    assert!(seen
        .iter()
        .all(|s| s.header("authorization") == Some(&format!("Bearer {own}"))));
    assert!(!carries(&seen, TOKEN), "the old token reached the new host");
}
