//! Users and login sessions.

use std::time::Duration;

use chrono::{DateTime, Utc};
use serde::Serialize;
use uuid::Uuid;

use crate::db::Db;
use crate::domain::Email;
use crate::error::{Result, StorageError};

/// How stale `sessions.last_seen_at` may get before a use is written: a
/// minute, or a quarter of a short idle limit, so a session in steady use is
/// never refused as idle.
pub fn touch_interval(idle: Duration) -> Duration {
    (idle / 4).min(Duration::from_secs(60))
}

/// A user as shown to clients.
#[derive(Debug, Clone, Serialize, sqlx::FromRow, PartialEq, Eq)]
pub struct User {
    pub id: Uuid,
    pub email: String,
}

/// A user with the stored password hash, for login only.
#[derive(sqlx::FromRow)]
pub struct UserCredentials {
    pub id: Uuid,
    pub email: String,
    pub password_hash: String,
}

pub(crate) async fn insert_user(
    conn: &mut sqlx::PgConnection,
    email: &Email,
    password_hash: &str,
) -> Result<User> {
    Ok(sqlx::query_as::<_, User>(
        "INSERT INTO users (id, email, password_hash) VALUES ($1, $2, $3) RETURNING id, email",
    )
    .bind(Uuid::new_v4())
    .bind(email.as_str())
    .bind(password_hash)
    .fetch_one(conn)
    .await?)
}

/// Stores a session by the digest of its token, on a caller's connection or
/// transaction.
pub(crate) async fn insert_session(
    conn: &mut sqlx::PgConnection,
    user_id: Uuid,
    token_digest: &[u8; 32],
    expires_at: DateTime<Utc>,
) -> Result<()> {
    sqlx::query(
        "INSERT INTO sessions (id, token_digest, user_id, expires_at) VALUES ($1, $2, $3, $4)",
    )
    .bind(Uuid::new_v4())
    .bind(&token_digest[..])
    .bind(user_id)
    .bind(expires_at)
    .execute(conn)
    .await?;
    Ok(())
}

impl Db {
    /// Creates a user; `Conflict` when the email is taken (case-insensitive).
    pub async fn create_user(&self, email: &Email, password_hash: &str) -> Result<User> {
        let mut conn = self.pool.acquire().await?;
        insert_user(&mut conn, email, password_hash).await
    }

    /// Creates a user and their first session in one transaction, so a
    /// failure leaves no account the client never got a session for.
    pub async fn create_user_with_session(
        &self,
        email: &Email,
        password_hash: &str,
        token_digest: &[u8; 32],
        expires_at: DateTime<Utc>,
    ) -> Result<User> {
        let mut tx = self.pool.begin().await?;
        let user = insert_user(&mut tx, email, password_hash).await?;
        sqlx::query(
            "INSERT INTO sessions (id, token_digest, user_id, expires_at) VALUES ($1, $2, $3, $4)",
        )
        .bind(Uuid::new_v4())
        .bind(&token_digest[..])
        .bind(user.id)
        .bind(expires_at)
        .execute(&mut *tx)
        .await?;
        tx.commit().await?;
        Ok(user)
    }

    pub async fn user_credentials(&self, email: &Email) -> Result<Option<UserCredentials>> {
        Ok(sqlx::query_as::<_, UserCredentials>(
            "SELECT id, email, password_hash FROM users WHERE lower(email) = lower($1)",
        )
        .bind(email.as_str())
        .fetch_optional(&self.pool)
        .await?)
    }

    pub async fn user_by_email(&self, email: &Email) -> Result<User> {
        sqlx::query_as::<_, User>("SELECT id, email FROM users WHERE lower(email) = lower($1)")
            .bind(email.as_str())
            .fetch_optional(&self.pool)
            .await?
            .ok_or(StorageError::NotFound)
    }

    /// Stores a session by the digest of its token.
    pub async fn create_session(
        &self,
        user_id: Uuid,
        token_digest: &[u8; 32],
        expires_at: DateTime<Utc>,
    ) -> Result<()> {
        let mut conn = self.pool.acquire().await?;
        insert_session(&mut conn, user_id, token_digest, expires_at).await
    }

    /// The user of a session that has neither expired nor gone unused for
    /// longer than `idle`.
    ///
    /// Use is recorded in `last_seen_at` only when the stored value is older
    /// than [`touch_interval`]`(idle)`, so a busy client costs one write a
    /// minute, not one per request; the read and that write are one statement.
    pub async fn session_user(
        &self,
        token_digest: &[u8; 32],
        idle: Duration,
    ) -> Result<Option<User>> {
        Ok(sqlx::query_as::<_, User>(
            "WITH s AS (
                 SELECT id, user_id, last_seen_at FROM sessions
                 WHERE token_digest = $1 AND expires_at > now()
                   AND last_seen_at > now() - make_interval(secs => $2)
             ), touched AS (
                 UPDATE sessions SET last_seen_at = now() FROM s
                 WHERE sessions.id = s.id AND s.last_seen_at < now() - make_interval(secs => $3)
             )
             SELECT u.id, u.email FROM s JOIN users u ON u.id = s.user_id",
        )
        .bind(&token_digest[..])
        .bind(idle.as_secs_f64())
        .bind(touch_interval(idle).as_secs_f64())
        .fetch_optional(&self.pool)
        .await?)
    }

    /// Ends every session of `user_id` (sign out everywhere); returns how many.
    pub async fn delete_user_sessions(&self, user_id: Uuid) -> Result<u64> {
        let r = sqlx::query("DELETE FROM sessions WHERE user_id = $1")
            .bind(user_id)
            .execute(&self.pool)
            .await?;
        Ok(r.rows_affected())
    }

    /// Ends a session at once; returns whether one existed.
    pub async fn delete_session(&self, token_digest: &[u8; 32]) -> Result<bool> {
        let r = sqlx::query("DELETE FROM sessions WHERE token_digest = $1")
            .bind(&token_digest[..])
            .execute(&self.pool)
            .await?;
        Ok(r.rows_affected() > 0)
    }

    /// Removes expired sessions; returns how many.
    pub async fn purge_expired_sessions(&self) -> Result<u64> {
        let r = sqlx::query("DELETE FROM sessions WHERE expires_at <= now()")
            .execute(&self.pool)
            .await?;
        Ok(r.rows_affected())
    }
}
