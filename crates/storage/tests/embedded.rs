//! The embedded cluster starts, serves and stops, from the machine's binaries.

use sqlx::{ConnectOptions, Connection};
use storage::embedded::{find_binaries, load_or_create_key_file, EmbeddedPostgres};

#[tokio::test]
async fn embedded_cluster_starts_serves_stops_and_restarts() {
    if find_binaries().is_none() {
        eprintln!("skipped: no PostgreSQL binaries (initdb, pg_ctl) on this machine");
        return;
    }
    let dir = std::env::temp_dir().join(format!("llmgw-emb-{}", uuid::Uuid::new_v4().simple()));
    let pg = EmbeddedPostgres::init(&dir).unwrap();
    pg.start().unwrap();
    let mut conn = pg.connect_options("postgres").connect().await.unwrap();
    let one: i32 = sqlx::query_scalar("SELECT 1")
        .fetch_one(&mut conn)
        .await
        .unwrap();
    assert_eq!(one, 1);
    let listen: String = sqlx::query_scalar("SHOW listen_addresses")
        .fetch_one(&mut conn)
        .await
        .unwrap();
    assert_eq!(listen, "", "embedded cluster must not listen on TCP");
    conn.close().await.unwrap();
    pg.stop().unwrap();
    assert!(pg.connect_options("postgres").connect().await.is_err());
    // Reused next time: same data directory, no second initdb.
    let again = EmbeddedPostgres::init(&dir).unwrap();
    again.start().unwrap();
    let mut conn = again.connect_options("postgres").connect().await.unwrap();
    sqlx::query("SELECT 1").execute(&mut conn).await.unwrap();
    conn.close().await.unwrap();
    again.stop().unwrap();
    std::fs::remove_dir_all(&dir).ok();
}

#[test]
fn key_file_is_created_once_with_mode_0600() {
    use std::os::unix::fs::PermissionsExt;
    let dir = std::env::temp_dir().join(format!("llmgw-key-{}", uuid::Uuid::new_v4().simple()));
    let path = dir.join("encryption.key");
    let (spec, created) = load_or_create_key_file(&path).unwrap();
    assert!(created);
    assert!(storage::Keyring::parse(&spec).is_ok());
    assert_eq!(
        std::fs::metadata(&path).unwrap().permissions().mode() & 0o777,
        0o600
    );
    let (again, created) = load_or_create_key_file(&path).unwrap();
    assert!(!created);
    assert_eq!(again, spec);
    std::fs::remove_dir_all(&dir).ok();
}
