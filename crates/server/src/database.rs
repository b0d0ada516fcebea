//! Opens the database: `DATABASE_URL`, or the embedded default cluster.

use std::time::{Duration, Instant};

use storage::embedded::{load_or_create_key_file, EmbeddedPostgres};
use storage::{Db, Keyring, PoolConfig};

use crate::config::Config;

/// An open, migrated database and the embedded cluster behind it, if any.
pub struct Opened {
    pub db: Db,
    embedded: Option<EmbeddedPostgres>,
}

impl Opened {
    /// Closes the pool, then stops the embedded cluster.
    pub async fn close(self) {
        // Bounded: closing the pool waits for checked-out connections. The
        // cluster is stopped either way (a fast stop ends those sessions).
        if tokio::time::timeout(Duration::from_secs(10), self.db.close())
            .await
            .is_err()
        {
            tracing::warn!("database pool did not close within 10s");
        }
        if let Some(pg) = self.embedded {
            stop_embedded(pg).await;
        }
    }
}

async fn stop_embedded(pg: EmbeddedPostgres) {
    match tokio::task::spawn_blocking(move || pg.stop()).await {
        Ok(Ok(())) => tracing::info!("embedded PostgreSQL stopped"),
        Ok(Err(e)) => {
            tracing::warn!(error = %e, "embedded PostgreSQL did not stop cleanly")
        }
        Err(e) => tracing::warn!(error = %e, "embedded PostgreSQL stop task failed"),
    }
}

/// Connects (starting the embedded cluster when `DATABASE_URL` is unset) and migrates.
pub async fn open(cfg: &Config) -> Result<Opened, String> {
    let pool_cfg = PoolConfig {
        max_connections: cfg.db_max_connections,
        ..PoolConfig::default()
    };
    let (options, keys, embedded) = match &cfg.database_url {
        Some(url) => {
            let options = Db::options_from_url(url).map_err(|e| format!("DATABASE_URL: {e}"))?;
            let keys = cfg
                .encryption_keys
                .clone()
                .ok_or("LLMGW_ENCRYPTION_KEYS: required when DATABASE_URL is set")?;
            (options, keys, None)
        }
        None => {
            let dir = cfg.data_dir.clone();
            let pg = tokio::task::spawn_blocking(move || -> Result<EmbeddedPostgres, String> {
                let pg = EmbeddedPostgres::init(&dir).map_err(|e| e.to_string())?;
                if let Err(e) = pg.start() {
                    // `pg_ctl start -w` may give up on a server that still comes up.
                    let _ = pg.stop();
                    return Err(e.to_string());
                }
                Ok(pg)
            })
            .await
            .map_err(|e| e.to_string())??;
            let keys = match &cfg.encryption_keys {
                Some(k) => Ok(k.clone()),
                None => {
                    let path = cfg.data_dir.join("encryption.key");
                    load_or_create_key_file(&path)
                        .map(|(spec, created)| {
                            tracing::warn!(
                                path = %path.display(),
                                created,
                                "using the embedded PostgreSQL and a locally stored encryption key: for local use only; set DATABASE_URL and LLMGW_ENCRYPTION_KEYS in production"
                            );
                            spec
                        })
                        .map_err(|e| e.to_string())
                }
            };
            let keys = match keys {
                Ok(k) => k,
                Err(e) => {
                    stop_embedded(pg).await;
                    return Err(e);
                }
            };
            (pg.connect_options("postgres"), keys, Some(pg))
        }
    };
    // Every run logs the migrator's `CREATE TABLE IF NOT EXISTS` notice
    // ("already exists, skipping") at info otherwise; warnings still come through.
    let options = options.options([("client_min_messages", "warning")]);
    let keyring = match Keyring::parse(&keys) {
        Ok(k) => k,
        Err(e) => {
            if let Some(pg) = embedded {
                stop_embedded(pg).await;
            }
            return Err(format!("encryption key: {e}"));
        }
    };
    let db = Db::connect_lazy(options, keyring, &pool_cfg);
    let opened = Opened { db, embedded };
    // The database may still be starting (containers): retry for a while.
    // Tokens sealed before their base URL was bound are re-sealed right
    // after migrating, before anything is served: only this process holds
    // the keys to do it.
    let deadline = Instant::now() + Duration::from_secs(60);
    loop {
        let step = match opened.db.migrate().await {
            Ok(()) => opened
                .db
                .upgrade_legacy_tokens()
                .await
                .map_err(|e| ("cannot re-seal provider tokens", e)),
            Err(e) => Err(("cannot migrate the database", e)),
        };
        match step {
            Ok(report) => {
                log_upgrade(&report);
                return Ok(opened);
            }
            Err((_, e)) if Instant::now() < deadline && is_transient(&e) => {
                tracing::warn!(error = %e, "database not ready, retrying");
                tokio::time::sleep(Duration::from_secs(1)).await;
            }
            Err((what, e)) => {
                let msg = format!("{what}: {}", error_chain(&e));
                opened.close().await;
                return Err(msg);
            }
        }
    }
}

fn log_upgrade(report: &storage::providers::ResealReport) {
    if report.rewritten > 0 {
        tracing::info!(
            count = report.rewritten,
            "re-sealed provider tokens to bind their base URL"
        );
    }
    for s in &report.skipped {
        tracing::warn!(org_id = %s.org_id, provider_key_id = %s.id, reason = %s.reason, "cannot re-seal a legacy provider token: the provider stays unusable until its token is saved again");
    }
    if report.pending > 0 {
        tracing::warn!(
            count = report.pending,
            "legacy provider tokens stayed locked by another process; it re-seals them, or the next start does"
        );
    }
}

fn is_transient(e: &storage::StorageError) -> bool {
    match e {
        storage::StorageError::Migrate(sqlx::migrate::MigrateError::Execute(inner)) => {
            matches!(inner, sqlx::Error::Io(_) | sqlx::Error::PoolTimedOut)
        }
        other => other.is_unavailable(),
    }
}

/// `error: cause: cause` on one line.
pub use upstream::error_chain;
