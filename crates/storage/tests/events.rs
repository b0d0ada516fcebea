//! `Db::cache_notices` against a real PostgreSQL: what a change announces,
//! and that a lost LISTEN connection comes back as `Reconnected`.

use std::time::Duration;

use futures_util::StreamExt;
use secrecy::SecretString;
use storage::domain::routing::Weight;
use storage::domain::{BaseUrl, Email, ProviderName};
use storage::endpoints::{EndpointPatch, NewEndpoint};
use storage::secrets::{hash_password, ProviderToken};
use storage::{Actor, CacheNotice};
use testkit::TestDb;

async fn next(
    notices: &mut (impl futures_util::Stream<Item = CacheNotice> + Unpin),
) -> CacheNotice {
    tokio::time::timeout(Duration::from_secs(10), notices.next())
        .await
        .expect("a cache notice within 10 s")
        .expect("the stream never ends")
}

/// Ends the backend that holds `LISTEN llmgw_cache` for this database.
async fn kill_listener(t: &TestDb) {
    let killed: Vec<bool> = sqlx::query_scalar(
        "SELECT pg_terminate_backend(pid) FROM pg_stat_activity
         WHERE datname = current_database() AND pid <> pg_backend_pid() AND query ILIKE 'LISTEN%'",
    )
    .fetch_all(t.db.pool())
    .await
    .unwrap();
    assert_eq!(killed, [true], "exactly one listening backend");
}

#[tokio::test]
async fn changes_arrive_as_typed_notices_and_a_lost_connection_as_reconnected() {
    let t = TestDb::new().await;
    let mut notices = Box::pin(t.db.cache_notices());
    assert_eq!(next(&mut notices).await, CacheNotice::Connected);

    let hash = hash_password(&SecretString::from("pw-123456".to_owned()));
    let user =
        t.db.create_user(&Email::parse("owner@example.com").unwrap(), &hash)
            .await
            .unwrap();
    let org = t.db.create_org("Acme", user.id).await.unwrap().id;
    let provider =
        t.db.create_provider_key(
            org,
            Actor(Some(user.id)),
            &ProviderName::parse("mycompany").unwrap(),
            &BaseUrl::parse("https://llm.example.com").unwrap(),
            &ProviderToken::parse("sk-test-token-1234").unwrap(),
        )
        .await
        .unwrap();
    assert_eq!(
        next(&mut notices).await,
        CacheNotice::Provider {
            org_id: org,
            id: provider.id
        }
    );

    // A payload of another shape asks for everything to be dropped.
    sqlx::query("SELECT pg_notify($1, '{\"table\":\"elsewhere\"}')")
        .bind(storage::CACHE_CHANNEL)
        .execute(t.db.pool())
        .await
        .unwrap();
    assert_eq!(next(&mut notices).await, CacheNotice::Unknown);

    // Notifications sent while the connection is down are lost: the
    // stream says so, then listens again.
    kill_listener(&t).await;
    assert_eq!(next(&mut notices).await, CacheNotice::Reconnected);
    let key_id = uuid::Uuid::new_v4();
    let payload =
        format!(r#"{{"table":"api_keys","op":"UPDATE","org_id":"{org}","id":"{key_id}"}}"#);
    // The listener re-subscribes on its next read: keep announcing until it hears.
    let heard = tokio::time::timeout(Duration::from_secs(10), async {
        loop {
            sqlx::query("SELECT pg_notify($1, $2)")
                .bind(storage::CACHE_CHANNEL)
                .bind(&payload)
                .execute(t.db.pool())
                .await
                .unwrap();
            if let Ok(Some(n)) =
                tokio::time::timeout(Duration::from_millis(200), notices.next()).await
            {
                break n;
            }
        }
    })
    .await
    .expect("the listener hears again after reconnecting");
    assert_eq!(
        heard,
        CacheNotice::ApiKey {
            org_id: org,
            id: key_id
        }
    );
}

/// An endpoint's change (whoever makes it, psql included) drops its
/// provider from the gateways' caches, whatever the change.
#[tokio::test]
async fn endpoint_changes_are_announced_as_their_providers() {
    let t = TestDb::new().await;
    let hash = hash_password(&SecretString::from("pw-123456".to_owned()));
    let user =
        t.db.create_user(&Email::parse("owner@example.com").unwrap(), &hash)
            .await
            .unwrap();
    let org = t.db.create_org("Acme", user.id).await.unwrap().id;
    let actor = Actor(Some(user.id));
    let provider =
        t.db.create_provider_key(
            org,
            actor,
            &ProviderName::parse("mycompany").unwrap(),
            &BaseUrl::parse("https://llm.example.com").unwrap(),
            &ProviderToken::parse("sk-test-token-1234").unwrap(),
        )
        .await
        .unwrap();
    let mut notices = Box::pin(t.db.cache_notices());
    assert_eq!(next(&mut notices).await, CacheNotice::Connected);
    let its = CacheNotice::Provider {
        org_id: org,
        id: provider.id,
    };
    let endpoint =
        t.db.create_endpoint(
            org,
            actor,
            provider.id,
            &NewEndpoint {
                base_url: BaseUrl::parse("https://llm2.example.com").unwrap(),
                token: ProviderToken::parse("sk-second-endpoint").unwrap(),
                weight: Weight::default(),
            },
        )
        .await
        .unwrap();
    assert_eq!(next(&mut notices).await, its);
    t.db.update_endpoint(
        org,
        actor,
        provider.id,
        endpoint.id,
        EndpointPatch {
            weight: Some(Weight::parse(&serde_json::json!(5)).unwrap()),
            ..Default::default()
        },
    )
    .await
    .unwrap();
    assert_eq!(next(&mut notices).await, its);
    sqlx::query("UPDATE provider_endpoints SET weight = 6 WHERE id = $1")
        .bind(endpoint.id)
        .execute(t.db.pool())
        .await
        .unwrap();
    assert_eq!(next(&mut notices).await, its);
    t.db.delete_endpoint(org, actor, provider.id, endpoint.id)
        .await
        .unwrap();
    assert_eq!(next(&mut notices).await, its);
}
