//! A fresh, migrated database per test, dropped when the test ends.
//!
//! On `DATABASE_URL`'s server when set; otherwise on an ephemeral cluster
//! started once from the machine's PostgreSQL binaries under the temp dir.

use std::os::fd::AsRawFd;
use std::str::FromStr;
use std::sync::OnceLock;

use sqlx::postgres::{PgConnectOptions, PgPoolOptions};
use sqlx::{ConnectOptions, Connection};
use storage::embedded::EmbeddedPostgres;
use storage::{Db, Keyring};

/// A database that exists for one test.
pub struct TestDb {
    pub db: Db,
    pub name: String,
    pub options: PgConnectOptions,
    /// The keyring spec the database's tokens are sealed with.
    pub keys: String,
    admin: PgConnectOptions,
}

fn admin_options() -> PgConnectOptions {
    static ADMIN: OnceLock<PgConnectOptions> = OnceLock::new();
    ADMIN
        .get_or_init(|| match std::env::var("DATABASE_URL") {
            Ok(url) if !url.is_empty() => {
                PgConnectOptions::from_str(&url).expect("DATABASE_URL is not a valid postgres URL")
            }
            _ => ephemeral_cluster().connect_options("postgres"),
        })
        .clone()
}

/// One cluster for the whole run; a file lock keeps parallel test processes
/// from initializing it twice. It is left running for the next run.
fn ephemeral_cluster() -> EmbeddedPostgres {
    let base = std::env::temp_dir().join("llmgw-testkit-pg");
    std::fs::create_dir_all(&base).expect("create test cluster dir");
    let lock = std::fs::File::create(base.with_extension("lock")).expect("create lock file");
    // SAFETY: flock on an open descriptor we own.
    unsafe { libc::flock(lock.as_raw_fd(), libc::LOCK_EX) };
    let pg = EmbeddedPostgres::init(&base).unwrap_or_else(|e| panic!("test cluster: {e}"));
    pg.start().unwrap_or_else(|e| panic!("test cluster: {e}"));
    pg
}

impl TestDb {
    /// Creates and migrates a new database with a fresh single-key keyring.
    pub async fn new() -> Self {
        Self::with_keys(&format!("1:{}", Keyring::generate_key_material())).await
    }

    pub async fn with_keys(keys: &str) -> Self {
        let t = Self::unmigrated(keys).await;
        t.db.migrate().await.expect("migrations apply");
        t
    }

    /// A new database migrated only by the migrations numbered below
    /// `version`: what a database upgraded to `version` starts from.
    /// `db.migrate()` applies the rest, as a start-up after the upgrade does.
    pub async fn migrated_before(version: i64) -> Self {
        let t = Self::unmigrated(&format!("1:{}", Keyring::generate_key_material())).await;
        let source = concat!(env!("CARGO_MANIFEST_DIR"), "/../../migrations");
        let dir = std::env::temp_dir().join(format!(
            "llmgw-migrations-before-{version}-{}",
            uuid::Uuid::new_v4().simple()
        ));
        std::fs::create_dir_all(&dir).expect("create a migrations dir");
        for entry in std::fs::read_dir(source).expect("read migrations/") {
            let path = entry.expect("a migration").path();
            let name = path.file_name().and_then(|n| n.to_str()).unwrap_or("");
            let number: Option<i64> = name.split('_').next().and_then(|n| n.parse().ok());
            if number.is_some_and(|n| n < version) {
                std::fs::copy(&path, dir.join(name)).expect("copy a migration");
            }
        }
        let older = sqlx::migrate::Migrator::new(dir.as_path())
            .await
            .expect("read the older migrations");
        older
            .run(t.db.pool())
            .await
            .expect("older migrations apply");
        std::fs::remove_dir_all(&dir).ok();
        t
    }

    async fn unmigrated(keys: &str) -> Self {
        let admin = admin_options();
        let name = format!("llmgw_test_{}", uuid::Uuid::new_v4().simple());
        let mut conn = admin
            .connect()
            .await
            .expect("connect to the test PostgreSQL server");
        sqlx::query(&format!("CREATE DATABASE \"{name}\""))
            .execute(&mut conn)
            .await
            .expect("create test database");
        conn.close().await.ok();
        let options = admin.clone().database(&name);
        let db = Self::open(&options, keys).await;
        Self {
            db,
            name,
            options,
            keys: keys.to_owned(),
            admin,
        }
    }

    /// Detaches and drops the partition of `request_logs` holding the rows
    /// from before partitioning, as retention does once it is old: what the
    /// database looks like months after the upgrade.
    pub async fn drop_first_log_partition(&self) {
        let before: String = sqlx::query_scalar(
            "SELECT inhrelid::regclass::text FROM pg_inherits
             WHERE inhparent = 'request_logs'::regclass
               AND inhrelid::regclass::text LIKE 'request_logs_before_%'",
        )
        .fetch_one(self.db.pool())
        .await
        .expect("the partition of the rows from before partitioning");
        sqlx::raw_sql(&format!(
            "ALTER TABLE request_logs DETACH PARTITION {before}; DROP TABLE {before}"
        ))
        .execute(self.db.pool())
        .await
        .expect("drop the first partition");
    }

    /// Another handle on the same database with a different keyring.
    pub async fn reopen(&self, keys: &str) -> Db {
        Self::open(&self.options, keys).await
    }

    async fn open(options: &PgConnectOptions, keys: &str) -> Db {
        let pool = PgPoolOptions::new()
            .max_connections(8)
            .connect_with(options.clone())
            .await
            .expect("connect to test database");
        Db::from_pool(pool, Keyring::parse(keys).expect("test keyring"))
    }

    /// Rewrites a provider row's token as the first release sealed it
    /// (associated data `"llmgw:pk" ‖ org ‖ row`, no base URL), with this
    /// database's first key: the rows an upgraded database starts with.
    pub async fn make_legacy_token(&self, org: uuid::Uuid, id: uuid::Uuid, token: &str) {
        use aes_gcm::aead::{Aead, KeyInit, Payload};
        use base64::Engine;
        let first = self.keys.split(',').next().expect("a key");
        let (key_id, material) = first.split_once(':').expect("<id>:<key>");
        let key = base64::engine::general_purpose::STANDARD
            .decode(material)
            .expect("base64 key");
        let cipher = aes_gcm::Aes256Gcm::new_from_slice(&key).expect("32-byte key");
        let nonce: [u8; 12] = rand::random();
        let mut aad = b"llmgw:pk".to_vec();
        aad.extend_from_slice(org.as_bytes());
        aad.extend_from_slice(id.as_bytes());
        let ciphertext = cipher
            .encrypt(
                aes_gcm::Nonce::from_slice(&nonce),
                Payload {
                    msg: token.as_bytes(),
                    aad: &aad,
                },
            )
            .expect("encrypt");
        sqlx::query(
            "UPDATE provider_keys SET token_ciphertext = $3, token_nonce = $4, key_id = $5, aad_version = 1
             WHERE org_id = $1 AND id = $2",
        )
        .bind(org)
        .bind(id)
        .bind(ciphertext)
        .bind(nonce.to_vec())
        .bind(key_id.parse::<i32>().expect("key id"))
        .execute(self.db.pool())
        .await
        .expect("rewrite the token in the legacy format");
    }

    /// `postgres://` URL of this database, for spawning the binary.
    pub fn url(&self) -> String {
        let o = &self.options;
        match o.get_socket() {
            // The URL parser refuses an empty host (`postgres://u@/db`): name
            // one, and let `?host=` (which wins) point at the socket directory.
            Some(dir) => format!(
                "postgres://{}@localhost:{}/{}?host={}",
                o.get_username(),
                o.get_port(),
                self.name,
                dir.display()
            ),
            None => format!(
                "postgres://{}@{}:{}/{}",
                o.get_username(),
                o.get_host(),
                o.get_port(),
                self.name
            ),
        }
    }
}

impl Drop for TestDb {
    fn drop(&mut self) {
        let admin = self.admin.clone();
        let name = self.name.clone();
        // Drop runs inside the test's runtime: use a thread with its own.
        let _ = std::thread::spawn(move || {
            let rt = tokio::runtime::Builder::new_current_thread()
                .enable_all()
                .build()
                .ok()?;
            rt.block_on(async move {
                let mut conn = admin.connect().await.ok()?;
                sqlx::query(&format!("DROP DATABASE IF EXISTS \"{name}\" WITH (FORCE)"))
                    .execute(&mut conn)
                    .await
                    .ok()?;
                conn.close().await.ok()
            })
        })
        .join();
    }
}
