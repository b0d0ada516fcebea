//! Storage against a real PostgreSQL: each test gets its own database.

use chrono::{Duration, Utc};
use secrecy::SecretString;
use storage::accounts::User;
use storage::api_keys::KeyState;
use storage::domain::routing::{StaticHeaders, Timeouts, Weight};
use storage::domain::{BaseUrl, Email, ProviderName, ProviderStatus, Role};
use storage::endpoints::{EndpointPatch, NewEndpoint};
use storage::invitations::InvitationToken;
use storage::logs::{GroupBy, LogFilter, RequestLog, UsageFilter};
use storage::providers::{NewProvider, ProviderPatch};
use storage::secrets::{hash_password, ApiKeySecret, ProviderToken};
use storage::{Actor, Keyring, StorageError};
use testkit::TestDb;
use uuid::Uuid;

const TOKEN: &str = "sk-live-PLAINTEXT-provider-token-7f3a";

async fn user(t: &TestDb, email: &str) -> Uuid {
    let hash = hash_password(&SecretString::from("pw-123456".to_owned()));
    t.db.create_user(&Email::parse(email).unwrap(), &hash)
        .await
        .unwrap()
        .id
}

/// Invites `email` into `org` and accepts as `user` (whose account has that
/// email, in any case).
async fn join(t: &TestDb, org: Uuid, owner: Uuid, user: Uuid, email: &str, role: Role) {
    let (inv, token) =
        t.db.create_invitation(org, owner, &Email::parse(email).unwrap(), role)
            .await
            .unwrap();
    let email = sqlx::query_scalar("SELECT email FROM users WHERE id = $1")
        .bind(user)
        .fetch_one(t.db.pool())
        .await
        .unwrap();
    t.db.accept_invitation(&User { id: user, email }, inv.id, &token)
        .await
        .unwrap();
}

async fn org_with_provider(t: &TestDb) -> (Uuid, Uuid) {
    let u = user(t, &format!("{}@example.com", Uuid::new_v4())).await;
    let org = t.db.create_org("Acme", u).await.unwrap();
    let p =
        t.db.create_provider_key(
            org.id,
            Actor(Some(u)),
            &ProviderName::parse("mycompany").unwrap(),
            &BaseUrl::parse("https://llm.example.com").unwrap(),
            &ProviderToken::parse(TOKEN).unwrap(),
        )
        .await
        .unwrap();
    (org.id, p.id)
}

async fn dump_all_tables(t: &TestDb) -> String {
    let tables: Vec<String> = sqlx::query_scalar(
        "SELECT table_name::text FROM information_schema.tables WHERE table_schema = 'public' ORDER BY 1",
    )
    .fetch_all(t.db.pool())
    .await
    .unwrap();
    assert!(tables.len() >= 9, "{tables:?}");
    let mut dump = String::new();
    for table in tables {
        let rows: Vec<String> =
            sqlx::query_scalar(&format!("SELECT row_to_json(t)::text FROM \"{table}\" t"))
                .fetch_all(t.db.pool())
                .await
                .unwrap();
        dump.push_str(&rows.join("\n"));
    }
    dump
}

#[tokio::test]
async fn migrations_are_idempotent() {
    let t = TestDb::new().await;
    t.db.migrate().await.unwrap();
    t.db.migrate().await.unwrap();
}

/// A rolling upgrade or a rollback: a newer release has migrated the
/// database further than this binary knows. This binary still starts (its
/// own migrations are all there), and runs nothing of its own again.
#[tokio::test]
async fn a_database_migrated_by_a_newer_release_is_not_refused() {
    let t = TestDb::new().await;
    let before: i64 = sqlx::query_scalar("SELECT count(*) FROM _sqlx_migrations")
        .fetch_one(t.db.pool())
        .await
        .unwrap();
    sqlx::query(
        "INSERT INTO _sqlx_migrations (version, description, success, checksum, execution_time)
         VALUES (99999, 'from a newer release', true, '\\x00'::bytea, 1)",
    )
    .execute(t.db.pool())
    .await
    .unwrap();
    t.db.migrate().await.unwrap();
    let after: i64 = sqlx::query_scalar("SELECT count(*) FROM _sqlx_migrations")
        .fetch_one(t.db.pool())
        .await
        .unwrap();
    assert_eq!(after, before + 1);
    // An edited migration of its own is still refused: checksums hold.
    sqlx::query("UPDATE _sqlx_migrations SET checksum = '\\x00'::bytea WHERE version = 1")
        .execute(t.db.pool())
        .await
        .unwrap();
    assert!(t.db.migrate().await.is_err());
}

#[tokio::test]
async fn provider_token_round_trips_through_the_database() {
    let t = TestDb::new().await;
    let (org, id) = org_with_provider(&t).await;
    let p = t.db.provider_key_with_token(org, id).await.unwrap();
    assert_eq!(p.token.expose_secret(), TOKEN);
    assert_eq!(p.provider.token_hint, "7f3a");
    let by_name =
        t.db.provider_by_name(org, "mycompany")
            .await
            .unwrap()
            .unwrap();
    assert_eq!(by_name.token.expose_secret(), TOKEN);
    assert!(!format!("{p:?}").contains(TOKEN));
    // Another org's id looks like a missing one.
    assert!(matches!(
        t.db.get_provider_key(Uuid::new_v4(), id).await,
        Err(StorageError::NotFound)
    ));
}

#[tokio::test]
async fn ciphertext_copied_to_another_row_or_org_fails_to_decrypt() {
    let t = TestDb::new().await;
    let (org_a, a) = org_with_provider(&t).await;
    let (org_b, b) = org_with_provider(&t).await;
    // Copy A's sealed token over B's row (another org) and over a second row of org A.
    let other =
        t.db.create_provider_key(
            org_a,
            Actor(None),
            &ProviderName::parse("other").unwrap(),
            &BaseUrl::parse("https://other.example.com").unwrap(),
            &ProviderToken::parse("sk-other").unwrap(),
        )
        .await
        .unwrap();
    for (target_org, target) in [(org_b, b), (org_a, other.id)] {
        sqlx::query(
            "UPDATE provider_keys t SET token_ciphertext = s.token_ciphertext, token_nonce = s.token_nonce, key_id = s.key_id
             FROM provider_keys s WHERE s.id = $1 AND t.id = $2",
        )
        .bind(a)
        .bind(target)
        .execute(t.db.pool())
        .await
        .unwrap();
        let err =
            t.db.provider_key_with_token(target_org, target)
                .await
                .unwrap_err();
        assert!(
            matches!(
                err,
                StorageError::Crypto(storage::crypto::CryptoError::Authentication)
            ),
            "{err:?}"
        );
    }
    // A flipped bit fails too.
    sqlx::query("UPDATE provider_keys SET token_ciphertext = set_byte(token_ciphertext, 0, get_byte(token_ciphertext, 0) # 1) WHERE id = $1")
        .bind(a)
        .execute(t.db.pool())
        .await
        .unwrap();
    assert!(matches!(
        t.db.provider_key_with_token(org_a, a).await,
        Err(StorageError::Crypto(_))
    ));
}

#[tokio::test]
async fn retired_key_gives_a_clear_error() {
    let t = TestDb::new().await;
    let (org, id) = org_with_provider(&t).await;
    let other = t
        .reopen(&format!("2:{}", Keyring::generate_key_material()))
        .await;
    let err = other.provider_key_with_token(org, id).await.unwrap_err();
    assert!(err.to_string().contains("key id 1"), "{err}");
}

#[tokio::test]
async fn rotation_moves_every_row_to_the_active_key_and_is_idempotent() {
    let t = TestDb::new().await;
    let mut ids = Vec::new();
    for _ in 0..5 {
        ids.push(org_with_provider(&t).await);
    }
    let both = format!("{},2:{}", t.keys, Keyring::generate_key_material());
    let db2 = t.reopen(&both).await;
    assert_eq!(db2.rotate_tokens().await.unwrap().rewritten, 5);
    let key_ids: Vec<i32> = sqlx::query_scalar("SELECT key_id FROM provider_keys")
        .fetch_all(t.db.pool())
        .await
        .unwrap();
    assert!(key_ids.iter().all(|k| *k == 2), "{key_ids:?}");
    let before: Vec<Vec<u8>> =
        sqlx::query_scalar("SELECT token_ciphertext FROM provider_keys ORDER BY id")
            .fetch_all(t.db.pool())
            .await
            .unwrap();
    let again = db2.rotate_tokens().await.unwrap();
    assert_eq!((again.rewritten, again.is_complete()), (0, true));
    let after: Vec<Vec<u8>> =
        sqlx::query_scalar("SELECT token_ciphertext FROM provider_keys ORDER BY id")
            .fetch_all(t.db.pool())
            .await
            .unwrap();
    assert_eq!(before, after);
    for (org, id) in ids {
        assert_eq!(
            db2.provider_key_with_token(org, id)
                .await
                .unwrap()
                .token
                .expose_secret(),
            TOKEN
        );
    }
}

const ATTACKER: &str = "https://attacker.example.net";

async fn token_of(db: &storage::Db, org: Uuid, id: Uuid) -> Result<String, StorageError> {
    db.provider_key_with_token(org, id)
        .await
        .map(|p| p.token.expose_secret().to_owned())
}

async fn sql(t: &TestDb, statement: &str, id: Uuid) {
    sqlx::query(statement)
        .bind(id)
        .execute(t.db.pool())
        .await
        .unwrap();
}

fn is_auth_failure(r: &Result<String, StorageError>) -> bool {
    matches!(
        r,
        Err(StorageError::Crypto(
            storage::crypto::CryptoError::Authentication
        ))
    )
}

#[tokio::test]
async fn a_new_base_url_without_its_token_is_refused_and_changes_nothing() {
    let t = TestDb::new().await;
    let (org, id) = org_with_provider(&t).await;
    let before: (String, Vec<u8>) =
        sqlx::query_as("SELECT base_url, token_ciphertext FROM provider_keys WHERE id = $1")
            .bind(id)
            .fetch_one(t.db.pool())
            .await
            .unwrap();
    let err =
        t.db.update_provider_key(
            org,
            Actor(None),
            id,
            ProviderPatch {
                base_url: Some(BaseUrl::parse(ATTACKER).unwrap()),
                name: Some(ProviderName::parse("renamed").unwrap()),
                ..Default::default()
            },
        )
        .await
        .unwrap_err();
    let StorageError::Invalid(v) = &err else {
        panic!("{err:?}")
    };
    assert_eq!(v.field, "token");
    assert!(v.message.contains("base_url"), "{}", v.message);
    let after: (String, Vec<u8>) =
        sqlx::query_as("SELECT base_url, token_ciphertext FROM provider_keys WHERE id = $1")
            .bind(id)
            .fetch_one(t.db.pool())
            .await
            .unwrap();
    assert_eq!(before, after);
    assert_eq!(
        t.db.get_provider_key(org, id).await.unwrap().name.as_str(),
        "mycompany"
    );

    // The same URL in another spelling is no change, and needs no token.
    let same =
        t.db.update_provider_key(
            org,
            Actor(None),
            id,
            ProviderPatch {
                base_url: Some(BaseUrl::parse("HTTPS://LLM.example.com:443/").unwrap()),
                ..Default::default()
            },
        )
        .await
        .unwrap();
    assert_eq!(same.base_url.as_str(), "https://llm.example.com");
    assert_eq!(token_of(&t.db, org, id).await.unwrap(), TOKEN);

    // With the token, the URL moves and the new token is bound to it.
    t.db.update_provider_key(
        org,
        Actor(None),
        id,
        ProviderPatch {
            base_url: Some(BaseUrl::parse(ATTACKER).unwrap()),
            token: Some(ProviderToken::parse("sk-attacker-own-token").unwrap()),
            ..Default::default()
        },
    )
    .await
    .unwrap();
    assert_eq!(
        token_of(&t.db, org, id).await.unwrap(),
        "sk-attacker-own-token"
    );
}

#[tokio::test]
async fn base_url_rewritten_in_sql_leaves_the_token_unopenable() {
    let t = TestDb::new().await;
    let (org, id) = org_with_provider(&t).await;
    sql(
        &t,
        &format!("UPDATE provider_keys SET base_url = '{ATTACKER}' WHERE id = $1"),
        id,
    )
    .await;
    assert!(is_auth_failure(&token_of(&t.db, org, id).await));
    assert!(t.db.provider_by_name(org, "mycompany").await.is_err());
    assert!(t.db.active_providers(org).await.unwrap().is_empty());
    // Neither rotation nor the legacy upgrade launders it to the new URL.
    let both = format!("{},2:{}", t.keys, Keyring::generate_key_material());
    let db2 = t.reopen(&both).await;
    for report in [
        db2.upgrade_legacy_tokens().await.unwrap(),
        db2.rotate_tokens().await.unwrap(),
    ] {
        assert_eq!(report.rewritten, 0);
    }
    let report = db2.rotate_tokens().await.unwrap();
    assert_eq!(report.skipped.len(), 1);
    assert_eq!(report.skipped[0].id, id);
    assert!(is_auth_failure(&token_of(&db2, org, id).await));
    // Put back, the URL opens it again: the binding is to the URL, nothing else.
    sql(
        &t,
        "UPDATE provider_keys SET base_url = 'https://llm.example.com' WHERE id = $1",
        id,
    )
    .await;
    assert_eq!(token_of(&db2, org, id).await.unwrap(), TOKEN);
}

#[tokio::test]
async fn a_current_row_relabelled_legacy_in_sql_does_not_open() {
    let t = TestDb::new().await;
    let (org, id) = org_with_provider(&t).await;
    let version: i16 = sqlx::query_scalar("SELECT aad_version FROM provider_keys WHERE id = $1")
        .bind(id)
        .fetch_one(t.db.pool())
        .await
        .unwrap();
    assert_eq!(version, 2, "new rows are sealed in the current format");
    sql(
        &t,
        &format!("UPDATE provider_keys SET aad_version = 1, base_url = '{ATTACKER}' WHERE id = $1"),
        id,
    )
    .await;
    assert!(matches!(
        token_of(&t.db, org, id).await,
        Err(StorageError::Crypto(
            storage::crypto::CryptoError::LegacyFormat
        ))
    ));
    // The re-seal, the one place the legacy format opens, refuses it too.
    let report = t.db.upgrade_legacy_tokens().await.unwrap();
    assert_eq!(report.rewritten, 0);
    assert_eq!(report.skipped.len(), 1);
    assert_eq!(
        report.skipped[0].reason,
        storage::crypto::CryptoError::Authentication
    );
    let report = t.db.rotate_tokens().await.unwrap();
    assert_eq!((report.rewritten, report.skipped.len()), (0, 1));
    assert!(token_of(&t.db, org, id).await.is_err());
    // Relabelled back with the right URL, it opens: nothing was rewritten.
    sql(
        &t,
        "UPDATE provider_keys SET aad_version = 2, base_url = 'https://llm.example.com' WHERE id = $1",
        id,
    )
    .await;
    assert_eq!(token_of(&t.db, org, id).await.unwrap(), TOKEN);
    // Formats other than 1 and 2 are refused by the database itself.
    let bad = sqlx::query("UPDATE provider_keys SET aad_version = 3 WHERE id = $1")
        .bind(id)
        .execute(t.db.pool())
        .await;
    assert!(bad.is_err());
}

#[tokio::test]
async fn legacy_rows_are_resealed_once_bound_to_their_url_even_by_racing_replicas() {
    let t = TestDb::new().await;
    let (org, first) = org_with_provider(&t).await;
    let mut ids = vec![first];
    for i in 0..229 {
        let name = format!(
            "{}{}",
            "a".repeat(1 + i / 26),
            (b'a' + (i % 26) as u8) as char
        );
        ids.push(
            t.db.create_provider_key(
                org,
                Actor(None),
                &ProviderName::parse(&name).unwrap(),
                &BaseUrl::parse("https://llm.example.com").unwrap(),
                &ProviderToken::parse(TOKEN).unwrap(),
            )
            .await
            .unwrap()
            .id,
        );
    }
    for id in &ids {
        t.make_legacy_token(org, *id, TOKEN).await;
    }
    // Legacy rows are not served: the format does not bind the URL.
    assert!(matches!(
        token_of(&t.db, org, first).await,
        Err(StorageError::Crypto(
            storage::crypto::CryptoError::LegacyFormat
        ))
    ));
    assert!(t.db.active_providers(org).await.unwrap().is_empty());
    // Three replicas start at once.
    let (a, b, c) = (
        t.reopen(&t.keys).await,
        t.reopen(&t.keys).await,
        t.reopen(&t.keys).await,
    );
    let (ra, rb, rc) = tokio::join!(
        a.upgrade_legacy_tokens(),
        b.upgrade_legacy_tokens(),
        c.upgrade_legacy_tokens()
    );
    let reports = [ra.unwrap(), rb.unwrap(), rc.unwrap()];
    assert!(reports.iter().all(|r| r.is_complete()), "{reports:?}");
    assert_eq!(
        reports.iter().map(|r| r.rewritten).sum::<u64>(),
        ids.len() as u64
    );
    let legacy: i64 =
        sqlx::query_scalar("SELECT count(*) FROM provider_keys WHERE aad_version <> 2")
            .fetch_one(t.db.pool())
            .await
            .unwrap();
    assert_eq!(legacy, 0);
    for id in &ids {
        assert_eq!(token_of(&t.db, org, *id).await.unwrap(), TOKEN);
    }
    assert_eq!(t.db.upgrade_legacy_tokens().await.unwrap().rewritten, 0);
    // Once re-sealed, the URL is bound like any new row's.
    sql(
        &t,
        &format!("UPDATE provider_keys SET base_url = '{ATTACKER}' WHERE id = $1"),
        first,
    )
    .await;
    assert!(is_auth_failure(&token_of(&t.db, org, first).await));
}

#[tokio::test]
async fn rotation_continues_past_a_row_it_cannot_decrypt() {
    let t = TestDb::new().await;
    let mut rows = Vec::new();
    for _ in 0..3 {
        rows.push(org_with_provider(&t).await);
    }
    rows.sort_by_key(|(_, id)| *id);
    // The middle row (in rotation order) is corrupted.
    let (bad_org, bad) = rows[1];
    sql(
        &t,
        "UPDATE provider_keys SET token_ciphertext = set_byte(token_ciphertext, 0, get_byte(token_ciphertext, 0) # 1) WHERE id = $1",
        bad,
    )
    .await;
    let both = format!("{},2:{}", t.keys, Keyring::generate_key_material());
    let db2 = t.reopen(&both).await;
    let report = db2.rotate_tokens().await.unwrap();
    assert_eq!(report.rewritten, 2);
    assert_eq!(report.pending, 0);
    assert_eq!(report.skipped.len(), 1);
    assert_eq!(
        (report.skipped[0].org_id, report.skipped[0].id),
        (bad_org, bad)
    );
    assert_eq!(
        report.skipped[0].reason,
        storage::crypto::CryptoError::Authentication
    );
    assert!(!format!("{report:?}").contains(TOKEN));
    let key_ids: Vec<(Uuid, i32)> = sqlx::query_as("SELECT id, key_id FROM provider_keys")
        .fetch_all(t.db.pool())
        .await
        .unwrap();
    for (id, key_id) in key_ids {
        assert_eq!(key_id, if id == bad { 1 } else { 2 }, "{id}");
    }
    for (org, id) in [rows[0], rows[2]] {
        assert_eq!(token_of(&db2, org, id).await.unwrap(), TOKEN);
    }
    // Re-running reports the same row again and rewrites nothing.
    let again = db2.rotate_tokens().await.unwrap();
    assert_eq!((again.rewritten, again.skipped.len()), (0, 1));
}

#[tokio::test]
async fn no_table_holds_a_token_or_api_key_in_plaintext() {
    let t = TestDb::new().await;
    let (org, id) = org_with_provider(&t).await;
    let (_, secret) =
        t.db.create_api_key(org, Actor(None), "ci", None)
            .await
            .unwrap();
    t.db.update_provider_key(
        org,
        Actor(None),
        id,
        ProviderPatch {
            token: Some(ProviderToken::parse("sk-second-PLAINTEXT-9999").unwrap()),
            ..Default::default()
        },
    )
    .await
    .unwrap();
    let dump = dump_all_tables(&t).await;
    assert!(dump.contains("mycompany"), "dump is not empty");
    for needle in [
        TOKEN,
        "PLAINTEXT",
        secret.expose_secret(),
        &secret.expose_secret()[6..],
    ] {
        assert!(!dump.contains(needle), "{needle} found in a table dump");
    }
}

#[tokio::test]
async fn api_key_lookup_by_digest_and_states() {
    let t = TestDb::new().await;
    let (org, _) = org_with_provider(&t).await;
    let (key, secret) =
        t.db.create_api_key(org, Actor(None), "ci", None)
            .await
            .unwrap();
    assert!(secret.expose_secret().starts_with(&key.prefix));
    let found =
        t.db.api_key_by_digest(&ApiKeySecret::from_presented(secret.expose_secret()).digest())
            .await
            .unwrap()
            .unwrap();
    assert_eq!((found.id, found.org_id), (key.id, org));
    assert_eq!(found.state(Utc::now()), KeyState::Active);
    assert!(t
        .db
        .api_key_by_digest(&ApiKeySecret::generate().digest())
        .await
        .unwrap()
        .is_none());

    t.db.revoke_api_key(org, Actor(None), key.id).await.unwrap();
    let revoked =
        t.db.api_key_by_digest(&secret.digest())
            .await
            .unwrap()
            .unwrap();
    assert_eq!(revoked.state(Utc::now()), KeyState::Revoked);

    let (_, expiring) =
        t.db.create_api_key(
            org,
            Actor(None),
            "old",
            Some(Utc::now() - Duration::seconds(1)),
        )
        .await
        .unwrap();
    let expired =
        t.db.api_key_by_digest(&expiring.digest())
            .await
            .unwrap()
            .unwrap();
    assert_eq!(expired.state(Utc::now()), KeyState::Expired);

    // Revoking through another org's id finds nothing and changes nothing.
    let (other_org, _) = org_with_provider(&t).await;
    let (k2, _) =
        t.db.create_api_key(org, Actor(None), "k2", None)
            .await
            .unwrap();
    assert!(matches!(
        t.db.revoke_api_key(other_org, Actor(None), k2.id).await,
        Err(StorageError::NotFound)
    ));
    assert!(t
        .db
        .get_api_key(org, k2.id)
        .await
        .unwrap()
        .revoked_at
        .is_none());
}

#[tokio::test]
async fn name_check_holds_even_through_raw_sql() {
    let t = TestDb::new().await;
    let (org, id) = org_with_provider(&t).await;
    for bad in [
        "MyCompany",
        "my-company",
        "my_company",
        "123test",
        "",
        "caf\u{e9}",
    ] {
        let r = sqlx::query("UPDATE provider_keys SET name = $1 WHERE id = $2")
            .bind(bad)
            .bind(id)
            .execute(t.db.pool())
            .await;
        let err = r.expect_err(bad).to_string();
        assert!(err.contains("check constraint"), "{bad}: {err}");
    }
    // Plain http is the operator's opt-in (checked by the service); any other
    // scheme, an empty host or a trailing slash the database refuses itself.
    for bad in [
        "ftp://plain.example.com",
        "http://",
        "http://plain.example.com/",
    ] {
        let r = sqlx::query("UPDATE provider_keys SET base_url = $1 WHERE id = $2")
            .bind(bad)
            .bind(id)
            .execute(t.db.pool())
            .await;
        assert!(r.is_err(), "{bad} accepted");
    }
    // unique (org, name)
    let dup =
        t.db.create_provider_key(
            org,
            Actor(None),
            &ProviderName::parse("mycompany").unwrap(),
            &BaseUrl::parse("https://x.example.com").unwrap(),
            &ProviderToken::parse("t").unwrap(),
        )
        .await;
    assert!(matches!(dup, Err(StorageError::Conflict(_))));
}

#[tokio::test]
async fn last_owner_cannot_leave_or_be_demoted() {
    let t = TestDb::new().await;
    let owner = user(&t, "owner@example.com").await;
    let other = user(&t, "other@example.com").await;
    let org = t.db.create_org("Acme", owner).await.unwrap();
    assert!(matches!(
        t.db.remove_member(org.id, owner, owner, None).await,
        Err(StorageError::LastOwner)
    ));
    assert!(matches!(
        t.db.set_member_role(org.id, owner, owner, Role::Admin)
            .await,
        Err(StorageError::LastOwner)
    ));
    join(&t, org.id, owner, other, "OTHER@example.com", Role::Owner).await;
    t.db.set_member_role(org.id, owner, owner, Role::Member)
        .await
        .unwrap();
    assert!(matches!(
        t.db.remove_member(org.id, other, other, None).await,
        Err(StorageError::LastOwner)
    ));
    assert_eq!(t.db.list_members(org.id).await.unwrap().len(), 2);
}

#[tokio::test]
async fn request_logs_batch_insert_list_and_usage() {
    let t = TestDb::new().await;
    let (org, pk) = org_with_provider(&t).await;
    let (key, _) =
        t.db.create_api_key(org, Actor(None), "ci", None)
            .await
            .unwrap();
    let now = Utc::now();
    let rows: Vec<RequestLog> = (0..250)
        .map(|i| RequestLog {
            id: Uuid::new_v4(),
            request_id: format!("req-{i}"),
            org_id: org,
            api_key_id: Some(key.id),
            provider_key_id: Some(pk),
            provider_name: Some("mycompany".into()),
            requested_model: Some(format!("mycompany/m{}", i % 2)),
            upstream_model: Some(format!("m{}", i % 2)),
            status_code: if i % 10 == 0 { 500 } else { 200 },
            streamed: i % 3 == 0,
            canceled: false,
            prompt_tokens: Some(10),
            completion_tokens: Some(5),
            total_tokens: Some(15),
            latency_ms: i,
            ttfb_ms: Some(1),
            error_class: None,
            created_at: now - Duration::milliseconds(i64::from(i)),
            endpoint_id: None,
            attempts: None,
        })
        .collect();
    t.db.insert_request_logs(&rows).await.unwrap();
    let mut seen = 0;
    let mut cursor = None;
    loop {
        let page =
            t.db.list_request_logs(org, &LogFilter::default(), cursor.as_ref(), 100)
                .await
                .unwrap();
        seen += page.data.len();
        match page.next_cursor {
            Some(c) => cursor = Some(c),
            None => break,
        }
    }
    assert_eq!(seen, 250);
    let errors =
        t.db.list_request_logs(
            org,
            &LogFilter {
                status_code: Some(500),
                ..Default::default()
            },
            None,
            500,
        )
        .await
        .unwrap();
    assert_eq!(errors.data.len(), 25);
    assert!(t
        .db
        .list_request_logs(Uuid::new_v4(), &LogFilter::default(), None, 10)
        .await
        .unwrap()
        .data
        .is_empty());
    let by_model =
        t.db.usage(
            org,
            now - Duration::hours(1),
            now + Duration::hours(1),
            GroupBy::Model,
            &UsageFilter::default(),
        )
        .await
        .unwrap();
    assert_eq!(by_model.len(), 2);
    assert_eq!(by_model.iter().map(|r| r.requests).sum::<i64>(), 250);
    assert_eq!(
        by_model.iter().map(|r| r.total_tokens).sum::<i64>(),
        250 * 15
    );
    assert_eq!(by_model.iter().map(|r| r.errors).sum::<i64>(), 25);
    let by_day =
        t.db.usage(
            org,
            now - Duration::hours(1),
            now + Duration::hours(1),
            GroupBy::Day,
            &UsageFilter::default(),
        )
        .await
        .unwrap();
    assert!(!by_day.is_empty());
}

#[tokio::test]
async fn provider_status_and_patch() {
    let t = TestDb::new().await;
    let (org, id) = org_with_provider(&t).await;
    let p =
        t.db.update_provider_key(
            org,
            Actor(None),
            id,
            ProviderPatch {
                status: Some(ProviderStatus::Inactive),
                ..Default::default()
            },
        )
        .await
        .unwrap();
    assert_eq!(p.status, ProviderStatus::Inactive);
    assert!(t.db.active_providers(org).await.unwrap().is_empty());
    let audit = t.db.list_audit(org, None, 50).await.unwrap();
    assert!(audit.data.iter().any(|e| e.action == "provider_key.update"));
    assert!(
        !serde_json::to_string(&audit.data.iter().map(|e| &e.details).collect::<Vec<_>>())
            .unwrap()
            .contains(TOKEN)
    );
}

#[tokio::test]
async fn changes_are_announced_for_gateway_caches() {
    let t = TestDb::new().await;
    let mut listener = sqlx::postgres::PgListener::connect_with(t.db.pool())
        .await
        .unwrap();
    listener.listen(storage::CACHE_CHANNEL).await.unwrap();
    let (org, id) = org_with_provider(&t).await;
    let n = tokio::time::timeout(std::time::Duration::from_secs(5), listener.recv())
        .await
        .unwrap()
        .unwrap();
    let ev: storage::CacheEvent = serde_json::from_str(n.payload()).unwrap();
    assert_eq!(
        (ev.table.as_str(), ev.op.as_str(), ev.org_id, ev.id),
        ("provider_keys", "INSERT", org, id)
    );
}

#[tokio::test]
async fn invitations_need_the_right_user_and_token_and_work_once() {
    let t = TestDb::new().await;
    let owner = user(&t, "owner@example.com").await;
    let invitee = User {
        id: user(&t, "Invitee@Example.com").await,
        email: "Invitee@Example.com".into(),
    };
    let stranger = User {
        id: user(&t, "stranger@example.com").await,
        email: "stranger@example.com".into(),
    };
    let org = t.db.create_org("Acme", owner).await.unwrap().id;
    let email = Email::parse("invitee@example.com").unwrap();
    let (inv, token) =
        t.db.create_invitation(org, owner, &email, Role::Admin)
            .await
            .unwrap();
    assert!(token.expose_secret().starts_with("llmgwi_") && token.expose_secret().len() > 40);
    assert!(!format!("{token:?}").contains(token.expose_secret()));
    let dump = dump_all_tables(&t).await;
    assert!(
        !dump.contains(&token.expose_secret()[7..]),
        "token stored in plaintext"
    );
    // One pending invitation per address, whatever its case.
    assert!(matches!(
        t.db.create_invitation(
            org,
            owner,
            &Email::parse("INVITEE@example.com").unwrap(),
            Role::Member
        )
        .await,
        Err(StorageError::Conflict(_))
    ));

    let not_found = |r: Result<storage::orgs::Org, StorageError>| {
        assert!(matches!(r, Err(StorageError::NotFound)), "{r:?}")
    };
    not_found(
        t.db.accept_invitation(&invitee, inv.id, &InvitationToken::generate())
            .await,
    );
    not_found(t.db.accept_invitation(&stranger, inv.id, &token).await);
    not_found(
        t.db.accept_invitation(&invitee, Uuid::new_v4(), &token)
            .await,
    );
    assert_eq!(t.db.list_members(org).await.unwrap().len(), 1);

    let joined =
        t.db.accept_invitation(&invitee, inv.id, &token)
            .await
            .unwrap();
    assert_eq!((joined.id, joined.role), (org, Role::Admin));
    not_found(t.db.accept_invitation(&invitee, inv.id, &token).await);
    assert!(t.db.list_invitations(org).await.unwrap().is_empty());
    // Already a member: a conflict, not a second membership.
    assert!(matches!(
        t.db.create_invitation(org, owner, &email, Role::Member)
            .await,
        Err(StorageError::Conflict(_))
    ));

    // An expired invitation cannot be accepted, and a new one replaces it.
    let late = Email::parse("stranger@example.com").unwrap();
    let (old, old_token) =
        t.db.create_invitation(org, owner, &late, Role::Member)
            .await
            .unwrap();
    sqlx::query(
        "UPDATE invitations SET created_at = now() - interval '8 days', expires_at = now() - interval '1 day' WHERE id = $1",
    )
    .bind(old.id)
    .execute(t.db.pool())
    .await
    .unwrap();
    assert!(t
        .db
        .invitations_for("stranger@example.com")
        .await
        .unwrap()
        .is_empty());
    not_found(t.db.accept_invitation(&stranger, old.id, &old_token).await);
    let (new, new_token) =
        t.db.create_invitation(org, owner, &late, Role::Member)
            .await
            .unwrap();
    assert_eq!(
        t.db.invitations_for("STRANGER@example.com")
            .await
            .unwrap()
            .len(),
        1
    );
    t.db.accept_invitation(&stranger, new.id, &new_token)
        .await
        .unwrap();
    assert_eq!(t.db.list_members(org).await.unwrap().len(), 3);
}

/// Active keys whose creator is no longer a member of the key's org.
async fn orphaned_active_keys(t: &TestDb) -> i64 {
    sqlx::query_scalar(
        "SELECT count(*) FROM api_keys k
         WHERE k.revoked_at IS NULL AND k.created_by IS NOT NULL
           AND NOT EXISTS (SELECT 1 FROM memberships m
                           WHERE m.org_id = k.org_id AND m.user_id = k.created_by)",
    )
    .fetch_one(t.db.pool())
    .await
    .unwrap()
}

#[tokio::test]
async fn removal_revokes_or_transfers_the_members_keys() {
    let t = TestDb::new().await;
    let owner = user(&t, "owner@example.com").await;
    let admin = user(&t, "admin@example.com").await;
    let org = t.db.create_org("Acme", owner).await.unwrap().id;
    let (other_org, _) = org_with_provider(&t).await;
    join(&t, org, owner, admin, "admin@example.com", Role::Admin).await;
    let mut keys = Vec::new();
    for name in ["a", "b", "c"] {
        keys.push(
            t.db.create_api_key(org, Actor(Some(admin)), name, None)
                .await
                .unwrap()
                .0
                .id,
        );
    }
    t.db.revoke_api_key(org, Actor(Some(admin)), keys[2])
        .await
        .unwrap();
    let owners_key =
        t.db.create_api_key(org, Actor(Some(owner)), "o", None)
            .await
            .unwrap()
            .0
            .id;
    // A key by a non-member, and a plain member, are refused at creation.
    assert!(matches!(
        t.db.create_api_key(other_org, Actor(Some(admin)), "x", None)
            .await,
        Err(StorageError::NotFound)
    ));
    let member = user(&t, "member@example.com").await;
    join(&t, org, owner, member, "member@example.com", Role::Member).await;
    assert!(matches!(
        t.db.create_api_key(org, Actor(Some(member)), "x", None)
            .await,
        Err(StorageError::RoleTooLow(Role::Admin))
    ));

    // Transfer to someone who is not a remaining member: refused, nothing changes.
    for bad in [
        admin,
        Uuid::new_v4(),
        user(&t, "outsider@example.com").await,
    ] {
        assert!(matches!(
            t.db.remove_member(org, owner, admin, Some(bad)).await,
            Err(StorageError::Invalid(_))
        ));
    }
    assert_eq!(t.db.list_members(org).await.unwrap().len(), 3);

    let removed = t.db.remove_member(org, owner, admin, None).await.unwrap();
    assert_eq!(
        (removed.revoked_api_keys, removed.transferred_api_keys),
        (2, 0)
    );
    for id in &keys {
        assert!(t
            .db
            .get_api_key(org, *id)
            .await
            .unwrap()
            .revoked_at
            .is_some());
    }
    assert!(t
        .db
        .get_api_key(org, owners_key)
        .await
        .unwrap()
        .revoked_at
        .is_none());
    let audit = t.db.list_audit(org, None, 10).await.unwrap().data;
    let entry = audit.iter().find(|e| e.action == "member.remove").unwrap();
    assert_eq!(entry.details["api_keys"]["revoked"], 2);

    // Transfer: the key stays active and changes hands.
    join(&t, org, owner, admin, "admin@example.com", Role::Admin).await;
    let kept =
        t.db.create_api_key(org, Actor(Some(admin)), "kept", None)
            .await
            .unwrap()
            .0
            .id;
    let moved =
        t.db.remove_member(org, admin, admin, Some(owner))
            .await
            .unwrap();
    assert_eq!((moved.revoked_api_keys, moved.transferred_api_keys), (0, 1));
    let (revoked, creator): (Option<chrono::DateTime<Utc>>, Option<Uuid>) =
        sqlx::query_as("SELECT revoked_at, created_by FROM api_keys WHERE id = $1")
            .bind(kept)
            .fetch_one(t.db.pool())
            .await
            .unwrap();
    assert_eq!((revoked, creator), (None, Some(owner)));
    let audit = t.db.list_audit(org, None, 10).await.unwrap().data;
    let entry = audit.iter().find(|e| e.action == "member.remove").unwrap();
    assert_eq!(entry.details["api_keys"]["transferred"], 1);
    assert_eq!(entry.details["api_keys"]["to"], owner.to_string());
    assert_eq!(orphaned_active_keys(&t).await, 0);
}

#[tokio::test]
async fn removal_racing_key_creation_leaves_no_key_of_a_non_member() {
    let t = TestDb::new().await;
    let owner = user(&t, "owner@example.com").await;
    let admin = user(&t, "admin@example.com").await;
    let org = t.db.create_org("Acme", owner).await.unwrap().id;
    let (mut created, mut refused) = (0, 0);
    for _ in 0..30 {
        join(&t, org, owner, admin, "admin@example.com", Role::Admin).await;
        // One key made before the race, so every round has a key the removal
        // must revoke whatever the scheduling (a loaded machine can make the
        // removal win every race).
        t.db.create_api_key(org, Actor(Some(admin)), "before", None)
            .await
            .unwrap();
        created += 1;
        let creators: Vec<_> = (0..3)
            .map(|i| {
                let db = t.db.clone();
                tokio::spawn(async move {
                    // Staggered, so some attempts land on each side of the removal.
                    tokio::time::sleep(std::time::Duration::from_millis(i)).await;
                    db.create_api_key(org, Actor(Some(admin)), "racing", None)
                        .await
                })
            })
            .collect();
        let remover = {
            let db = t.db.clone();
            tokio::spawn(async move { db.remove_member(org, owner, admin, None).await })
        };
        for c in creators {
            match c.await.unwrap() {
                Ok(_) => created += 1,
                Err(StorageError::NotFound) => refused += 1,
                Err(e) => panic!("creation failed with {e:?}"),
            }
        }
        remover.await.unwrap().unwrap();
        assert_eq!(
            orphaned_active_keys(&t).await,
            0,
            "a removed member's key survived"
        );
    }
    assert!(created > 0, "no creation ever won the race");
    let _ = refused;
}

#[tokio::test]
async fn sso_pending_sign_ins_are_capped_taken_once_and_pruned_when_expired() {
    use std::time::Duration as StdDuration;
    use storage::secrets::sha256;
    use storage::sso::SsoPending;

    let t = TestDb::new().await;
    let ttl = StdDuration::from_secs(600);
    let pending = |n: &str| SsoPending {
        nonce: format!("nonce-{n}"),
        pkce_verifier: format!("{n}-{}", "v".repeat(43)),
        browser_digest: sha256(&format!("browser-{n}")),
    };
    let count = || async {
        sqlx::query_scalar::<_, i64>("SELECT count(*) FROM sso_pending")
            .fetch_one(t.db.pool())
            .await
            .unwrap()
    };
    let expire_all = || async {
        sqlx::query("UPDATE sso_pending SET expires_at = now() - interval '1 second', created_at = now() - interval '1 hour'")
            .execute(t.db.pool())
            .await
            .unwrap();
    };
    for n in ["a", "b"] {
        assert!(t
            .db
            .insert_sso_pending(&sha256(n), &pending(n), ttl, 2)
            .await
            .unwrap());
    }
    // A flood of starts stops at the cap and writes nothing more.
    for n in ["c", "d", "e"] {
        assert!(!t
            .db
            .insert_sso_pending(&sha256(n), &pending(n), ttl, 2)
            .await
            .unwrap());
    }
    assert_eq!(count().await, 2);
    assert_eq!(t.db.take_sso_pending(&sha256("c")).await.unwrap(), None);

    // Taken once, with what was kept; a taken one makes room.
    assert_eq!(
        t.db.take_sso_pending(&sha256("a")).await.unwrap(),
        Some(pending("a"))
    );
    assert_eq!(t.db.take_sso_pending(&sha256("a")).await.unwrap(), None);
    assert!(t
        .db
        .insert_sso_pending(&sha256("c"), &pending("c"), ttl, 2)
        .await
        .unwrap());

    // Expired ones are refused, and deleted on the way.
    expire_all().await;
    assert_eq!(t.db.take_sso_pending(&sha256("b")).await.unwrap(), None);
    assert_eq!(count().await, 1);
    // And the next start prunes the rest, so they no longer count.
    assert!(t
        .db
        .insert_sso_pending(&sha256("d"), &pending("d"), ttl, 1)
        .await
        .unwrap());
    assert_eq!(count().await, 1);
    assert_eq!(
        t.db.take_sso_pending(&sha256("d")).await.unwrap(),
        Some(pending("d"))
    );

    // Concurrent starts, as from many replicas, never pass the cap.
    let results = futures_util::future::join_all((0..20).map(|i| {
        let db = t.db.clone();
        async move {
            let n = format!("race-{i}");
            db.insert_sso_pending(&sha256(&n), &pending(&n), ttl, 5)
                .await
                .unwrap()
        }
    }))
    .await;
    assert_eq!(results.iter().filter(|w| **w).count(), 5);
    assert_eq!(count().await, 5);
}

#[tokio::test]
async fn sso_links_count_attempts_atomically_and_are_used_once() {
    use std::time::Duration as StdDuration;
    use storage::secrets::sha256;
    use storage::sso::SsoLink;

    let t = TestDb::new().await;
    let owner = user(&t, "link-owner@example.com").await;
    let ttl = StdDuration::from_secs(600);
    let browser = sha256("browser");
    let link = |n: &str| SsoLink {
        user_id: owner,
        issuer: "https://issuer.example".into(),
        subject: format!("subject-{n}"),
        email: "link-owner@example.com".into(),
        browser_digest: browser,
    };
    let count = |sql: &'static str| {
        let pool = t.db.pool().clone();
        async move {
            sqlx::query_scalar::<_, i64>(sql)
                .fetch_one(&pool)
                .await
                .unwrap()
        }
    };
    for n in ["a", "b"] {
        assert!(t
            .db
            .insert_sso_link(&sha256(n), &link(n), ttl, 2)
            .await
            .unwrap());
    }
    // Past the cap nothing is written.
    assert!(!t
        .db
        .insert_sso_link(&sha256("c"), &link("c"), ttl, 2)
        .await
        .unwrap());
    assert_eq!(count("SELECT count(*) FROM sso_link_pending").await, 2);
    assert_eq!(t.db.sso_link(&sha256("c"), 3).await.unwrap(), None);
    assert_eq!(
        t.db.sso_link(&sha256("a"), 3).await.unwrap(),
        Some(link("a"))
    );

    // Attempts are counted up to the limit, then refused; only from the
    // browser that signed in.
    let other = sha256("other browser");
    assert_eq!(
        t.db.count_sso_link_attempt(&sha256("a"), &other, 3)
            .await
            .unwrap(),
        None
    );
    for n in 1..=3 {
        assert_eq!(
            t.db.count_sso_link_attempt(&sha256("a"), &browser, 3)
                .await
                .unwrap(),
            Some(n)
        );
    }
    assert_eq!(
        t.db.count_sso_link_attempt(&sha256("a"), &browser, 3)
            .await
            .unwrap(),
        None
    );
    // An exhausted link is no longer shown, and goes on the way.
    assert_eq!(t.db.sso_link(&sha256("a"), 3).await.unwrap(), None);
    assert_eq!(count("SELECT count(*) FROM sso_link_pending").await, 1);

    // Concurrent attempts, as from many replicas: exactly the limit counted.
    let counted = futures_util::future::join_all((0..10).map(|_| {
        let db = t.db.clone();
        async move {
            db.count_sso_link_attempt(&sha256("b"), &browser, 3)
                .await
                .unwrap()
        }
    }))
    .await;
    let mut numbers: Vec<u16> = counted.into_iter().flatten().collect();
    numbers.sort_unstable();
    assert_eq!(numbers, [1, 2, 3]);
    t.db.delete_sso_link(&sha256("b")).await.unwrap();
    assert_eq!(count("SELECT count(*) FROM sso_link_pending").await, 0);

    // Completed once: the row goes with the identity and the session made.
    assert!(t
        .db
        .insert_sso_link(&sha256("d"), &link("d"), ttl, 2)
        .await
        .unwrap());
    let expires = Utc::now() + Duration::hours(1);
    assert_eq!(
        t.db.complete_sso_link(&sha256("d"), &other, &sha256("s0"), expires)
            .await
            .unwrap(),
        None,
        "another browser's"
    );
    assert_eq!(
        t.db.complete_sso_link(&sha256("d"), &browser, &sha256("s1"), expires)
            .await
            .unwrap(),
        Some(link("d"))
    );
    assert_eq!(
        t.db.complete_sso_link(&sha256("d"), &browser, &sha256("s2"), expires)
            .await
            .unwrap(),
        None
    );
    assert_eq!(count("SELECT count(*) FROM sso_link_pending").await, 0);
    assert_eq!(
        count("SELECT count(*) FROM oidc_identities WHERE subject = 'subject-d'").await,
        1
    );

    // Expired ones are refused, and pruned by the next insert.
    for n in ["e", "f"] {
        assert!(t
            .db
            .insert_sso_link(&sha256(n), &link(n), ttl, 2)
            .await
            .unwrap());
    }
    sqlx::query(
        "UPDATE sso_link_pending SET expires_at = now() - interval '1 second',
                                     created_at = now() - interval '1 hour'",
    )
    .execute(t.db.pool())
    .await
    .unwrap();
    assert_eq!(
        t.db.count_sso_link_attempt(&sha256("e"), &browser, 3)
            .await
            .unwrap(),
        None
    );
    assert_eq!(
        t.db.complete_sso_link(&sha256("e"), &browser, &sha256("s3"), expires)
            .await
            .unwrap(),
        None
    );
    assert!(t
        .db
        .insert_sso_link(&sha256("g"), &link("g"), ttl, 1)
        .await
        .unwrap());
    assert_eq!(count("SELECT count(*) FROM sso_link_pending").await, 1);
}

// ---------- endpoints, static headers, timeouts ----------

const HEADER_SECRET: &str = "hdr-PLAINTEXT-static-header-value-42";
const ENDPOINT_TOKEN: &str = "sk-endpoint-PLAINTEXT-token-b2c4";

fn url(s: &str) -> BaseUrl {
    BaseUrl::parse(s).unwrap()
}

fn new_endpoint(base_url: &str, token: &str, weight: u16) -> NewEndpoint {
    NewEndpoint {
        base_url: url(base_url),
        token: ProviderToken::parse(token).unwrap(),
        weight: Weight::parse(&serde_json::json!(weight)).unwrap(),
    }
}

/// An org with a provider that has static headers and timeouts, and two
/// further endpoints.
async fn org_with_endpoints(t: &TestDb) -> (Uuid, Uuid, [Uuid; 2]) {
    let u = user(t, &format!("{}@example.com", Uuid::new_v4())).await;
    let org = t.db.create_org("Acme", u).await.unwrap().id;
    let p =
        t.db.create_provider(
            org,
            Actor(Some(u)),
            &NewProvider {
                name: ProviderName::parse("mycompany").unwrap(),
                base_url: url("https://gpu1.example.com"),
                token: ProviderToken::parse(TOKEN).unwrap(),
                prices: Default::default(),
                headers: StaticHeaders::parse(
                    &serde_json::json!({"X-Tenant": "acme", "api-key": HEADER_SECRET}),
                )
                .unwrap(),
                timeouts: Timeouts::parse(
                    &serde_json::json!({"connect_ms": 2000, "total_ms": 60000}),
                )
                .unwrap(),
            },
        )
        .await
        .unwrap();
    let mut further = [Uuid::nil(); 2];
    for (i, slot) in further.iter_mut().enumerate() {
        *slot =
            t.db.create_endpoint(
                org,
                Actor(Some(u)),
                p.id,
                &new_endpoint(
                    &format!("https://gpu{}.example.com", i + 2),
                    &format!("{ENDPOINT_TOKEN}-{i}"),
                    3,
                ),
            )
            .await
            .unwrap()
            .id;
    }
    (org, p.id, further)
}

/// The read the gateway routes with: the provider, every endpoint with its
/// token in order, the headers opened and the timeouts, in one statement.
#[tokio::test]
async fn the_gateway_read_holds_every_endpoint_the_headers_and_the_timeouts() {
    let t = TestDb::new().await;
    let (org, id, further) = org_with_endpoints(&t).await;
    let p =
        t.db.provider_by_name(org, "mycompany")
            .await
            .unwrap()
            .unwrap();
    let endpoints: Vec<(Uuid, &str, &str, u16)> = p
        .endpoints
        .iter()
        .map(|e| {
            (
                e.id,
                e.base_url.as_str(),
                e.token.expose_secret(),
                e.weight.get(),
            )
        })
        .collect();
    let (t0, t1) = (format!("{ENDPOINT_TOKEN}-0"), format!("{ENDPOINT_TOKEN}-1"));
    assert_eq!(
        endpoints,
        [
            (id, "https://gpu1.example.com", TOKEN, 1),
            (further[0], "https://gpu2.example.com", t0.as_str(), 3),
            (further[1], "https://gpu3.example.com", t1.as_str(), 3),
        ]
    );
    assert_eq!(p.token.expose_secret(), TOKEN);
    assert_eq!(
        p.headers.iter().collect::<Vec<_>>(),
        [("X-Tenant", "acme"), ("api-key", HEADER_SECRET)]
    );
    assert_eq!(p.provider.timeouts.connect_ms, Some(2000));
    assert_eq!(p.provider.timeouts.first_byte_ms, None);
    assert_eq!(p.provider.headers, ["X-Tenant", "api-key"]);
    assert_eq!(p.provider.endpoints.len(), 3);
    let shown = format!("{p:?}");
    for secret in [TOKEN, HEADER_SECRET, &t0] {
        assert!(!shown.contains(secret), "{secret} in Debug");
    }
    // The same through the other reads.
    let active = t.db.active_providers(org).await.unwrap();
    assert_eq!(active.len(), 1);
    assert_eq!(active[0].endpoints.len(), 3);
    let by_id = t.db.provider_key_with_token(org, id).await.unwrap();
    assert_eq!(by_id.endpoints.len(), 3);
    let listed = t.db.list_provider_keys(org).await.unwrap();
    assert_eq!(
        listed[0].endpoints.iter().map(|e| e.id).collect::<Vec<_>>(),
        [id, further[0], further[1]]
    );
    // One statement each: no query per endpoint.
    assert!(t.db.provider_by_name(org, "other").await.unwrap().is_none());
}

#[tokio::test]
async fn endpoints_follow_the_token_rule_and_the_provider_keeps_its_own() {
    let t = TestDb::new().await;
    let (org, id, further) = org_with_endpoints(&t).await;
    let actor = Actor(None);
    // A new base URL without the token: refused, nothing changed.
    for endpoint in [id, further[0]] {
        let err =
            t.db.update_endpoint(
                org,
                actor,
                id,
                endpoint,
                EndpointPatch {
                    base_url: Some(url(ATTACKER)),
                    weight: Some(Weight::parse(&serde_json::json!(7)).unwrap()),
                    ..Default::default()
                },
            )
            .await
            .unwrap_err();
        assert!(
            matches!(&err, StorageError::Invalid(v) if v.field == "token"),
            "{err:?}"
        );
    }
    let kept = t.db.get_provider_key(org, id).await.unwrap();
    assert_eq!(
        kept.endpoints[0].base_url.as_str(),
        "https://gpu1.example.com"
    );
    assert_eq!(
        kept.endpoints[1].base_url.as_str(),
        "https://gpu2.example.com"
    );
    assert_eq!(kept.endpoints[1].weight.get(), 3);
    // The same URL in another spelling is no change; the weight changes alone.
    let same =
        t.db.update_endpoint(
            org,
            actor,
            id,
            further[0],
            EndpointPatch {
                base_url: Some(url("https://GPU2.example.com/")),
                weight: Some(Weight::parse(&serde_json::json!(9)).unwrap()),
                ..Default::default()
            },
        )
        .await
        .unwrap();
    assert_eq!(
        (same.base_url.as_str(), same.weight.get()),
        ("https://gpu2.example.com", 9)
    );
    // With its token an endpoint moves; only that token opens at the new URL.
    let moved =
        t.db.update_endpoint(
            org,
            actor,
            id,
            further[0],
            EndpointPatch {
                base_url: Some(url("https://gpu9.example.com")),
                token: Some(ProviderToken::parse("sk-moved-endpoint-token-0009").unwrap()),
                weight: None,
            },
        )
        .await
        .unwrap();
    assert_eq!(moved.token_hint, "0009");
    let own =
        t.db.update_endpoint(
            org,
            actor,
            id,
            id,
            EndpointPatch {
                weight: Some(Weight::parse(&serde_json::json!(1000)).unwrap()),
                ..Default::default()
            },
        )
        .await
        .unwrap();
    assert_eq!((own.id, own.weight.get()), (id, 1000));
    let p = t.db.provider_key_with_token(org, id).await.unwrap();
    assert_eq!(p.endpoints[0].weight.get(), 1000);
    assert_eq!(
        p.endpoints[1].token.expose_secret(),
        "sk-moved-endpoint-token-0009"
    );
    assert_eq!(p.endpoints[1].base_url.as_str(), "https://gpu9.example.com");

    // Another org's provider or endpoint ids are not found, and change nothing.
    let (other_org, other_id) = org_with_provider(&t).await;
    assert!(matches!(
        t.db.update_endpoint(
            other_org,
            actor,
            other_id,
            further[1],
            EndpointPatch {
                weight: Some(Weight::parse(&serde_json::json!(2)).unwrap()),
                ..Default::default()
            }
        )
        .await,
        Err(StorageError::NotFound)
    ));
    assert!(matches!(
        t.db.delete_endpoint(other_org, actor, other_id, further[1])
            .await,
        Err(StorageError::NotFound)
    ));
    assert!(matches!(
        t.db.delete_endpoint(other_org, actor, id, id).await,
        Err(StorageError::NotFound)
    ));
    assert!(matches!(
        t.db.create_endpoint(
            other_org,
            actor,
            id,
            &new_endpoint("https://x.example.com", "sk-xxxx", 1)
        )
        .await,
        Err(StorageError::NotFound)
    ));
    assert_eq!(
        t.db.get_provider_key(org, id)
            .await
            .unwrap()
            .endpoints
            .len(),
        3
    );

    // Further endpoints go; the provider's own stays.
    t.db.delete_endpoint(org, actor, id, further[1])
        .await
        .unwrap();
    assert!(matches!(
        t.db.delete_endpoint(org, actor, id, further[1]).await,
        Err(StorageError::NotFound)
    ));
    assert!(matches!(
        t.db.delete_endpoint(org, actor, id, id).await,
        Err(StorageError::OwnEndpoint)
    ));
    assert_eq!(
        t.db.get_provider_key(org, id)
            .await
            .unwrap()
            .endpoints
            .len(),
        2
    );

    // A provider holds at most MAX_ENDPOINTS, its own included.
    for i in 2..storage::domain::routing::MAX_ENDPOINTS {
        t.db.create_endpoint(
            org,
            actor,
            id,
            &new_endpoint(&format!("https://n{i}.example.com"), "sk-many-endpoints", 1),
        )
        .await
        .unwrap();
    }
    let full =
        t.db.create_endpoint(
            org,
            actor,
            id,
            &new_endpoint("https://one-too-many.example.com", "sk-many", 1),
        )
        .await
        .unwrap_err();
    assert!(matches!(full, StorageError::Invalid(_)), "{full:?}");
    assert_eq!(
        t.db.get_provider_key(org, id)
            .await
            .unwrap()
            .endpoints
            .len(),
        storage::domain::routing::MAX_ENDPOINTS
    );

    // Every change is in the audit log, no secret with it.
    let audit = t.db.list_audit(org, None, 200).await.unwrap();
    let actions: Vec<&str> = audit.data.iter().map(|e| e.action.as_str()).collect();
    for action in [
        "provider_endpoint.create",
        "provider_endpoint.update",
        "provider_endpoint.delete",
    ] {
        assert!(actions.contains(&action), "{actions:?}");
    }
    let details =
        serde_json::to_string(&audit.data.iter().map(|e| &e.details).collect::<Vec<_>>()).unwrap();
    for secret in [
        TOKEN,
        HEADER_SECRET,
        ENDPOINT_TOKEN,
        "sk-moved-endpoint-token-0009",
    ] {
        assert!(!details.contains(secret), "{secret} in the audit log");
    }
    // The provider goes with its endpoints.
    t.db.delete_provider_key(org, actor, id).await.unwrap();
    let left: i64 =
        sqlx::query_scalar("SELECT count(*) FROM provider_endpoints WHERE provider_key_id = $1")
            .bind(id)
            .fetch_one(t.db.pool())
            .await
            .unwrap();
    assert_eq!(left, 0);
}

/// Ciphertexts copied between endpoint rows, from a provider row, into
/// another org, or headers into another provider: none opens.
#[tokio::test]
async fn endpoint_and_header_ciphertexts_copied_elsewhere_fail_to_open() {
    let t = TestDb::new().await;
    let (org, id, further) = org_with_endpoints(&t).await;
    let (org_b, id_b, further_b) = org_with_endpoints(&t).await;
    let opened = |p: &storage::providers::ProviderWithToken| -> Vec<Uuid> {
        p.endpoints.iter().map(|e| e.id).collect()
    };
    // Same base URL, so only the row binding differs.
    sql(
        &t,
        "UPDATE provider_endpoints SET base_url = 'https://gpu2.example.com' WHERE id = $1",
        further[1],
    )
    .await;
    // That alone unbinds further[1]'s token from its row's URL.
    let p = t.db.provider_key_with_token(org, id).await.unwrap();
    assert_eq!(opened(&p), [id, further[0]]);
    let copy = |from: Uuid, to: Uuid, table_from: &'static str, table_to: &'static str| {
        let q = format!(
            "UPDATE {table_to} SET token_ciphertext = s.token_ciphertext, token_nonce = s.token_nonce,
                key_id = s.key_id, base_url = s.base_url
             FROM {table_from} s WHERE s.id = $1 AND {table_to}.id = $2"
        );
        let pool = t.db.pool().clone();
        async move {
            sqlx::query(&q)
                .bind(from)
                .bind(to)
                .execute(&pool)
                .await
                .unwrap();
        }
    };
    // Endpoint to endpoint of the same provider.
    copy(
        further[0],
        further[1],
        "provider_endpoints",
        "provider_endpoints",
    )
    .await;
    assert_eq!(
        opened(&t.db.provider_key_with_token(org, id).await.unwrap()),
        [id, further[0]]
    );
    // Another org's endpoint ciphertext into ours.
    copy(
        further_b[0],
        further[1],
        "provider_endpoints",
        "provider_endpoints",
    )
    .await;
    assert_eq!(
        opened(&t.db.provider_key_with_token(org, id).await.unwrap()),
        [id, further[0]]
    );
    // A provider's own token into an endpoint row with the same id's URL:
    // the endpoint format does not open a provider-token ciphertext.
    copy(id, further[1], "provider_keys", "provider_endpoints").await;
    assert_eq!(
        opened(&t.db.provider_key_with_token(org, id).await.unwrap()),
        [id, further[0]]
    );
    // An endpoint's token into the provider row: the provider fails closed.
    copy(further_b[1], id_b, "provider_endpoints", "provider_keys").await;
    assert!(matches!(
        t.db.provider_key_with_token(org_b, id_b).await,
        Err(StorageError::Crypto(_))
    ));
    // Headers sealed for one provider do not open on another.
    let fresh = org_with_provider(&t).await;
    sqlx::query(
        "UPDATE provider_keys SET header_names = s.header_names, headers_ciphertext = s.headers_ciphertext,
            headers_nonce = s.headers_nonce, headers_key_id = s.headers_key_id
         FROM provider_keys s WHERE s.id = $1 AND provider_keys.id = $2",
    )
    .bind(id)
    .bind(fresh.1)
    .execute(t.db.pool())
    .await
    .unwrap();
    assert!(matches!(
        t.db.provider_key_with_token(fresh.0, fresh.1).await,
        Err(StorageError::Crypto(_))
    ));
    // The original still opens everything it should.
    let p =
        t.db.provider_by_name(org, "mycompany")
            .await
            .unwrap()
            .unwrap();
    assert_eq!(p.headers.iter().count(), 2);
}

#[tokio::test]
async fn rotation_reseals_endpoint_tokens_and_headers_too() {
    let t = TestDb::new().await;
    let (org, id, further) = org_with_endpoints(&t).await;
    let new_key = format!("2:{}", Keyring::generate_key_material());
    let db2 = t.reopen(&format!("{},{new_key}", t.keys)).await;
    let report = db2.rotate_tokens().await.unwrap();
    // The provider's token, its two endpoints' and its headers.
    assert_eq!((report.rewritten, report.is_complete()), (4, true));
    let key_ids: Vec<i32> = sqlx::query_scalar(
        "SELECT key_id FROM provider_keys UNION ALL SELECT headers_key_id FROM provider_keys
         UNION ALL SELECT key_id FROM provider_endpoints",
    )
    .fetch_all(t.db.pool())
    .await
    .unwrap();
    assert_eq!(key_ids, [2, 2, 2, 2]);
    assert_eq!(db2.rotate_tokens().await.unwrap().rewritten, 0);
    // Only the new key is needed now.
    let only_new = t.reopen(&new_key).await;
    let p = only_new.provider_key_with_token(org, id).await.unwrap();
    assert_eq!(p.endpoints.len(), 3);
    assert_eq!(p.headers.iter().count(), 2);
    // An endpoint that does not open is reported by kind and left as it is.
    sql(
        &t,
        "UPDATE provider_endpoints SET token_ciphertext = token_ciphertext || '\\x00'::bytea, key_id = 1 WHERE id = $1",
        further[0],
    )
    .await;
    let report = db2.rotate_tokens().await.unwrap();
    assert_eq!(report.skipped.len(), 1);
    assert_eq!(
        report.skipped[0].secret,
        storage::providers::SealedSecret::EndpointToken
    );
    assert_eq!(report.skipped[0].id, further[0]);
    // The legacy upgrade has nothing of endpoints or headers to do.
    assert_eq!(db2.upgrade_legacy_tokens().await.unwrap().rewritten, 0);
}

#[tokio::test]
async fn no_table_holds_an_endpoint_token_or_header_value_in_plaintext() {
    let t = TestDb::new().await;
    let (org, id, further) = org_with_endpoints(&t).await;
    t.db.update_provider_key(
        org,
        Actor(None),
        id,
        ProviderPatch {
            headers: Some(
                StaticHeaders::parse(&serde_json::json!({"X-Second": "second-PLAINTEXT-header"}))
                    .unwrap(),
            ),
            ..Default::default()
        },
    )
    .await
    .unwrap();
    t.db.update_endpoint(
        org,
        Actor(None),
        id,
        further[0],
        EndpointPatch {
            token: Some(ProviderToken::parse("sk-patched-PLAINTEXT-endpoint").unwrap()),
            ..Default::default()
        },
    )
    .await
    .unwrap();
    let dump = dump_all_tables(&t).await;
    assert!(
        dump.contains("X-Second") && dump.contains("gpu2.example.com"),
        "dump is not empty"
    );
    for needle in [TOKEN, HEADER_SECRET, ENDPOINT_TOKEN, "PLAINTEXT"] {
        assert!(!dump.contains(needle), "{needle} found in a table dump");
    }
    // The headers were replaced: the old value is gone, the new one opens.
    let p =
        t.db.provider_by_name(org, "mycompany")
            .await
            .unwrap()
            .unwrap();
    assert_eq!(
        p.headers.iter().collect::<Vec<_>>(),
        [("X-Second", "second-PLAINTEXT-header")]
    );
    // And removed.
    t.db.update_provider_key(
        org,
        Actor(None),
        id,
        ProviderPatch {
            headers: Some(StaticHeaders::default()),
            ..Default::default()
        },
    )
    .await
    .unwrap();
    let p =
        t.db.provider_by_name(org, "mycompany")
            .await
            .unwrap()
            .unwrap();
    assert!(p.headers.is_empty() && p.provider.headers.is_empty());
}

/// A database with providers (one sealed in the first release's format)
/// and usage rows from before endpoints existed is migrated: each provider
/// is its own first endpoint of weight 1, nothing is re-sealed by SQL, and
/// the gateway's read works at once.
#[tokio::test]
async fn providers_made_before_endpoints_become_their_own_first_endpoint() {
    let t = TestDb::migrated_before(12).await;
    let u = user(&t, "before@example.com").await;
    let org = t.db.create_org("Before", u).await.unwrap().id;
    let (current, legacy) = (Uuid::new_v4(), Uuid::new_v4());
    for (id, name, base) in [
        (current, "current", "https://llm.example.com"),
        (legacy, "legacy", "https://old.example.com/openai"),
    ] {
        let sealed = t.db.keyring().seal(
            &storage::crypto::Binding::provider_token(org, id, base),
            TOKEN.as_bytes(),
        );
        // The columns provider_keys had before migration 0012.
        sqlx::query(
            "INSERT INTO provider_keys (id, org_id, name, base_url, token_ciphertext, token_nonce, key_id,
                token_hint, aad_version, prices)
             VALUES ($1, $2, $3, $4, $5, $6, $7, '7f3a', 2, '[]')",
        )
        .bind(id)
        .bind(org)
        .bind(name)
        .bind(base)
        .bind(&sealed.ciphertext)
        .bind(&sealed.nonce)
        .bind(sealed.key_id)
        .execute(t.db.pool())
        .await
        .unwrap();
    }
    t.make_legacy_token(org, legacy, TOKEN).await;
    sqlx::query(
        "INSERT INTO request_logs (id, request_id, org_id, provider_key_id, provider_name, status_code, latency_ms)
         VALUES ($1, 'old-1', $2, $3, 'current', 200, 12)",
    )
    .bind(Uuid::new_v4())
    .bind(org)
    .bind(current)
    .execute(t.db.pool())
    .await
    .unwrap();
    let before: Vec<(Uuid, Vec<u8>)> =
        sqlx::query_as("SELECT id, token_ciphertext FROM provider_keys ORDER BY id")
            .fetch_all(t.db.pool())
            .await
            .unwrap();

    t.db.migrate().await.unwrap();
    let after: Vec<(Uuid, Vec<u8>)> =
        sqlx::query_as("SELECT id, token_ciphertext FROM provider_keys ORDER BY id")
            .fetch_all(t.db.pool())
            .await
            .unwrap();
    assert_eq!(before, after, "the migration rewrites no token");

    let p = t.db.get_provider_key(org, current).await.unwrap();
    let own: Vec<(Uuid, &str, &str, u16)> = p
        .endpoints
        .iter()
        .map(|e| {
            (
                e.id,
                e.base_url.as_str(),
                e.token_hint.as_str(),
                e.weight.get(),
            )
        })
        .collect();
    assert_eq!(own, [(current, "https://llm.example.com", "7f3a", 1)]);
    assert!(p.headers.is_empty() && p.timeouts.is_empty());
    let routed =
        t.db.provider_by_name(org, "current")
            .await
            .unwrap()
            .unwrap();
    assert_eq!(routed.endpoints.len(), 1);
    assert_eq!(routed.endpoints[0].token.expose_secret(), TOKEN);
    assert!(routed.headers.is_empty());
    // The legacy row is re-sealed at start-up as before, then routes too.
    assert_eq!(t.db.upgrade_legacy_tokens().await.unwrap().rewritten, 1);
    let legacy_routed = t.db.provider_by_name(org, "legacy").await.unwrap().unwrap();
    assert_eq!(legacy_routed.endpoints[0].token.expose_secret(), TOKEN);
    assert_eq!(legacy_routed.endpoints[0].id, legacy);
    // A further endpoint can be added to a provider from before.
    t.db.create_endpoint(
        org,
        Actor(None),
        current,
        &new_endpoint("https://llm2.example.com", ENDPOINT_TOKEN, 2),
    )
    .await
    .unwrap();
    assert_eq!(
        t.db.provider_by_name(org, "current")
            .await
            .unwrap()
            .unwrap()
            .endpoints
            .len(),
        2
    );
    // Old usage rows read back with no endpoint and no attempt count.
    let rows =
        t.db.list_request_logs(org, &LogFilter::default(), None, 10)
            .await
            .unwrap();
    assert_eq!(
        (rows.data[0].row.endpoint_id, rows.data[0].row.attempts),
        (None, None)
    );
    t.db.migrate().await.unwrap();
}

#[tokio::test]
async fn usage_rows_keep_the_endpoint_and_the_attempts() {
    let t = TestDb::new().await;
    let (org, id, further) = org_with_endpoints(&t).await;
    let row = RequestLog {
        id: Uuid::new_v4(),
        request_id: "r-1".into(),
        org_id: org,
        api_key_id: None,
        provider_key_id: Some(id),
        provider_name: Some("mycompany".into()),
        requested_model: Some("mycompany/m".into()),
        upstream_model: Some("m".into()),
        status_code: 200,
        streamed: false,
        canceled: false,
        prompt_tokens: None,
        completion_tokens: None,
        total_tokens: None,
        latency_ms: 5,
        ttfb_ms: None,
        error_class: None,
        created_at: Utc::now(),
        endpoint_id: Some(further[1]),
        attempts: Some(3),
    };
    t.db.insert_request_logs(std::slice::from_ref(&row))
        .await
        .unwrap();
    let back =
        t.db.list_request_logs(org, &LogFilter::default(), None, 10)
            .await
            .unwrap();
    assert_eq!(
        (back.data[0].row.endpoint_id, back.data[0].row.attempts),
        (Some(further[1]), Some(3))
    );
    let zero = RequestLog {
        id: Uuid::new_v4(),
        attempts: Some(0),
        ..row
    };
    assert!(
        t.db.insert_request_logs(&[zero]).await.is_err(),
        "attempts >= 1 is checked in SQL"
    );
}

#[tokio::test]
async fn weights_timeouts_and_headers_are_checked_in_sql_too() {
    let t = TestDb::new().await;
    let (_, id, further) = org_with_endpoints(&t).await;
    for (statement, row) in [
        ("UPDATE provider_keys SET weight = 0 WHERE id = $1", id),
        (
            "UPDATE provider_endpoints SET weight = 1001 WHERE id = $1",
            further[0],
        ),
        (
            "UPDATE provider_keys SET timeouts = '{\"total_ms\": 0}' WHERE id = $1",
            id,
        ),
        (
            "UPDATE provider_keys SET timeouts = '{\"idle_ms\": 5}' WHERE id = $1",
            id,
        ),
        (
            "UPDATE provider_keys SET timeouts = '{\"connect_ms\": 1.5}' WHERE id = $1",
            id,
        ),
        (
            "UPDATE provider_keys SET headers_ciphertext = NULL WHERE id = $1",
            id,
        ),
        (
            "UPDATE provider_keys SET header_names = '{}' WHERE id = $1",
            id,
        ),
        (
            "UPDATE provider_endpoints SET aad_version = 1 WHERE id = $1",
            further[0],
        ),
        (
            "UPDATE provider_endpoints SET org_id = gen_random_uuid() WHERE id = $1",
            further[0],
        ),
    ] {
        let r = sqlx::query(statement).bind(row).execute(t.db.pool()).await;
        assert!(r.is_err(), "{statement} was accepted");
    }
}
