//! Single sign-on flows in progress (`sso_pending`): what a sign-in's start
//! keeps for its callback, in the database so that the issuer's redirect
//! back may reach any API replica. Keyed by the SHA-256 of the flow's
//! `state`; taken once; bounded in number, expired rows pruned on each start.

use std::fmt;
use std::time::Duration;

use crate::db::Db;
use crate::error::Result;

/// What a started sign-in leaves for its callback.
#[derive(Clone, PartialEq, Eq)]
pub struct SsoPending {
    /// The nonce the issuer's ID token must carry.
    pub nonce: String,
    /// The PKCE code verifier for the code exchange.
    pub pkce_verifier: String,
    /// SHA-256 of the browser id cookie of the browser that started it.
    pub browser_digest: [u8; 32],
}

impl fmt::Debug for SsoPending {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("SsoPending").finish_non_exhaustive()
    }
}

#[derive(sqlx::FromRow)]
struct Row {
    nonce: String,
    pkce_verifier: String,
    browser_digest: Vec<u8>,
    live: bool,
}

impl Db {
    /// Keeps a started sign-in for `ttl`, keyed by the digest of its
    /// `state`, after pruning the expired ones. Writes nothing and answers
    /// false when `max` sign-ins are already waiting (an anonymous flood of
    /// starts is refused, never grows the table).
    pub async fn insert_sso_pending(
        &self,
        state_digest: &[u8; 32],
        pending: &SsoPending,
        ttl: Duration,
        max: u32,
    ) -> Result<bool> {
        let mut tx = self.pool.begin().await?;
        // Starts on every replica count and insert one at a time, so the
        // cap holds exactly; the lock ends with the transaction.
        sqlx::query("SELECT pg_advisory_xact_lock(hashtext('llmgw.sso_pending'))")
            .execute(&mut *tx)
            .await?;
        // The pruning runs whatever the INSERT does; both see the rows as
        // they were, hence the count of live rows only.
        let written = sqlx::query(
            "WITH pruned AS (DELETE FROM sso_pending WHERE expires_at <= now())
             INSERT INTO sso_pending (state_digest, nonce, pkce_verifier, browser_digest, expires_at)
             SELECT $1, $2, $3, $4, now() + make_interval(secs => $5)
             WHERE (SELECT count(*) FROM sso_pending WHERE expires_at > now()) < $6",
        )
        .bind(&state_digest[..])
        .bind(&pending.nonce)
        .bind(&pending.pkce_verifier)
        .bind(&pending.browser_digest[..])
        .bind(ttl.as_secs_f64())
        .bind(i64::from(max))
        .execute(&mut *tx)
        .await?
        .rows_affected()
            == 1;
        tx.commit().await?;
        Ok(written)
    }

    /// Takes the sign-in started with the state of this digest: deleted
    /// whether or not it has expired (a state is used once), returned only
    /// while it has not.
    pub async fn take_sso_pending(&self, state_digest: &[u8; 32]) -> Result<Option<SsoPending>> {
        let row = sqlx::query_as::<_, Row>(
            "DELETE FROM sso_pending WHERE state_digest = $1
             RETURNING nonce, pkce_verifier, browser_digest, expires_at > now() AS live",
        )
        .bind(&state_digest[..])
        .fetch_optional(&self.pool)
        .await?;
        Ok(row.filter(|r| r.live).and_then(|r| {
            Some(SsoPending {
                nonce: r.nonce,
                pkce_verifier: r.pkce_verifier,
                browser_digest: r.browser_digest.try_into().ok()?,
            })
        }))
    }
}
