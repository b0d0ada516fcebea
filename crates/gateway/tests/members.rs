//! Removing a member reaches the gateway: the keys they created stop working
//! unless they were handed to a remaining member.

mod common;

use std::time::{Duration, Instant};

use common::*;
use serde_json::json;
use storage::accounts::User;
use storage::domain::{Email, Role};
use storage::{Actor, Db};
use uuid::Uuid;

/// A new account that joins `org` as an admin through an invitation.
async fn admin_of(db: &Db, org: Uuid, owner: Uuid) -> Uuid {
    let email = Email::parse(&format!("{}@example.com", Uuid::new_v4().simple())).unwrap();
    let user = db
        .create_user(&email, "$argon2id$not-a-real-hash")
        .await
        .unwrap();
    let (inv, token) = db
        .create_invitation(org, owner, &email, Role::Admin)
        .await
        .unwrap();
    db.accept_invitation(
        &User {
            id: user.id,
            email: user.email,
        },
        inv.id,
        &token,
    )
    .await
    .unwrap();
    user.id
}

async fn owner_of(db: &Db, org: Uuid) -> Uuid {
    db.list_members(org).await.unwrap()[0].user_id
}

async fn status(env: &Env, key: &str) -> u16 {
    let body = json!({"model": "mycompany/m", "messages": messages()});
    env.chat_with_key(key, &body).await.status().as_u16()
}

#[tokio::test]
async fn a_removed_members_key_is_refused_by_the_gateway() {
    let env = Env::new().await;
    let db = env.db();
    let owner = owner_of(db, env.org.id).await;
    let admin = admin_of(db, env.org.id, owner).await;
    let (_, key) = db
        .create_api_key(env.org.id, Actor(Some(admin)), "laptop", None)
        .await
        .unwrap();
    let key = key.expose_secret().to_owned();
    // Cached as valid first, so the refusal must come from the revocation reaching the cache.
    assert_eq!(status(&env, &key).await, 200);

    let removal = db
        .remove_member(env.org.id, owner, admin, None)
        .await
        .unwrap();
    assert_eq!(removal.revoked_api_keys, 1);
    let removed = Instant::now();
    loop {
        let s = status(&env, &key).await;
        if s == 401 {
            break;
        }
        assert_eq!(s, 200);
        assert!(
            removed.elapsed() < Duration::from_secs(2),
            "the gateway still accepts a removed member's key"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    // The org's other key (not the removed member's) keeps working.
    assert_eq!(status(&env, &env.org.key.clone()).await, 200);
    env.stop().await;
}

#[tokio::test]
async fn a_transferred_key_keeps_working_under_its_new_holder() {
    let env = Env::new().await;
    let db = env.db();
    let owner = owner_of(db, env.org.id).await;
    let admin = admin_of(db, env.org.id, owner).await;
    let (created, key) = db
        .create_api_key(env.org.id, Actor(Some(admin)), "service", None)
        .await
        .unwrap();
    let key = key.expose_secret().to_owned();
    assert_eq!(status(&env, &key).await, 200);

    let removal = db
        .remove_member(env.org.id, admin, admin, Some(owner))
        .await
        .unwrap();
    assert_eq!(
        (removal.revoked_api_keys, removal.transferred_api_keys),
        (0, 1)
    );
    let created_by: Option<Uuid> =
        sqlx::query_scalar("SELECT created_by FROM api_keys WHERE id = $1")
            .bind(created.id)
            .fetch_one(db.pool())
            .await
            .unwrap();
    assert_eq!(created_by, Some(owner));
    // Longer than a revocation takes to arrive: nothing arrives.
    tokio::time::sleep(Duration::from_millis(1500)).await;
    assert_eq!(status(&env, &key).await, 200);
    env.stop().await;
}
