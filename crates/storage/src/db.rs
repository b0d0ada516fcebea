use std::str::FromStr;
use std::sync::Arc;
use std::time::Duration;

use sqlx::postgres::{PgConnectOptions, PgPoolOptions};
use sqlx::PgPool;

use crate::crypto::Keyring;
use crate::error::Result;

/// The embedded migrations (`migrations/` at the workspace root).
///
/// Migrations are expand/contract: a release's schema still serves the
/// previous release's binary, so replicas upgrade one at a time. A database
/// a newer release has already migrated is therefore not refused: its
/// unknown (newer) migrations are ignored, and this binary's own must all be
/// applied, unchanged (their checksums are still checked).
pub static MIGRATOR: sqlx::migrate::Migrator = sqlx::migrate::Migrator {
    ignore_missing: true,
    ..sqlx::migrate!("../../migrations")
};

/// Pool settings.
#[derive(Debug, Clone)]
pub struct PoolConfig {
    pub max_connections: u32,
    pub acquire_timeout: Duration,
}

impl Default for PoolConfig {
    fn default() -> Self {
        Self {
            max_connections: 16,
            acquire_timeout: Duration::from_secs(3),
        }
    }
}

/// Handle to the database and the keyring that seals provider tokens.
#[derive(Clone, Debug)]
pub struct Db {
    pub(crate) pool: PgPool,
    pub(crate) keyring: Arc<Keyring>,
}

impl Db {
    /// Connects lazily: the pool opens connections on first use and recovers
    /// by itself after an outage.
    pub fn connect_lazy(options: PgConnectOptions, keyring: Keyring, cfg: &PoolConfig) -> Self {
        let pool = PgPoolOptions::new()
            .max_connections(cfg.max_connections)
            .min_connections(0)
            .acquire_timeout(cfg.acquire_timeout)
            .idle_timeout(Some(Duration::from_secs(300)))
            .connect_lazy_with(options);
        Self::from_pool(pool, keyring)
    }

    /// Parses a `postgres://` URL into connect options.
    pub fn options_from_url(url: &str) -> std::result::Result<PgConnectOptions, sqlx::Error> {
        PgConnectOptions::from_str(url)
    }

    pub fn from_pool(pool: PgPool, keyring: Keyring) -> Self {
        Self {
            pool,
            keyring: Arc::new(keyring),
        }
    }

    pub fn pool(&self) -> &PgPool {
        &self.pool
    }

    pub fn keyring(&self) -> &Keyring {
        &self.keyring
    }

    /// Applies pending migrations; a no-op when up to date.
    pub async fn migrate(&self) -> Result<()> {
        MIGRATOR.run(&self.pool).await?;
        Ok(())
    }

    /// True when a trivial query succeeds.
    pub async fn ping(&self) -> bool {
        sqlx::query("SELECT 1").execute(&self.pool).await.is_ok()
    }

    pub async fn close(&self) {
        self.pool.close().await;
    }
}
