//! Single sign-on identities: (issuer, subject) pairs linked to accounts.

use chrono::{DateTime, Utc};
use uuid::Uuid;

use crate::accounts::{insert_session, insert_user, User};
use crate::db::Db;
use crate::domain::Email;
use crate::error::Result;

/// Who an OpenID provider says signed in.
#[derive(Debug, Clone)]
pub struct Identity<'a> {
    pub issuer: &'a str,
    pub subject: &'a str,
    /// The email claim, whether verified or not (kept for operators only).
    pub email: Option<&'a str>,
}

/// Links an identity to an account, on a caller's transaction.
pub(crate) async fn insert_identity(
    conn: &mut sqlx::PgConnection,
    user_id: Uuid,
    id: &Identity<'_>,
) -> Result<()> {
    sqlx::query(
        "INSERT INTO oidc_identities (issuer, subject, user_id, email) VALUES ($1, $2, $3, $4)",
    )
    .bind(id.issuer)
    .bind(id.subject)
    .bind(user_id)
    .bind(id.email)
    .execute(conn)
    .await?;
    Ok(())
}

impl Db {
    /// The account an identity signs in, recording the sign-in.
    pub async fn user_by_identity(&self, id: &Identity<'_>) -> Result<Option<User>> {
        Ok(sqlx::query_as::<_, User>(
            "UPDATE oidc_identities i SET last_login_at = now(), email = $3
             FROM users u
             WHERE i.issuer = $1 AND i.subject = $2 AND u.id = i.user_id
             RETURNING u.id, u.email",
        )
        .bind(id.issuer)
        .bind(id.subject)
        .bind(id.email)
        .fetch_optional(&self.pool)
        .await?)
    }

    /// Creates an account for a first SSO sign-in, its identity and its
    /// first session in one transaction. `unusable_hash` is the argon2id hash
    /// of a secret that was thrown away. `Conflict` when the email is taken
    /// or the identity was linked meanwhile.
    pub async fn create_sso_user_with_session(
        &self,
        email: &Email,
        unusable_hash: &str,
        id: &Identity<'_>,
        token_digest: &[u8; 32],
        expires_at: DateTime<Utc>,
    ) -> Result<User> {
        let mut tx = self.pool.begin().await?;
        let user = insert_user(&mut tx, email, unusable_hash).await?;
        insert_identity(&mut tx, user.id, id).await?;
        insert_session(&mut tx, user.id, token_digest, expires_at).await?;
        tx.commit().await?;
        Ok(user)
    }
}
