//! Single sign-on steps in progress, in the database so that each request
//! of a flow may reach any API replica; bounded in number, expired rows
//! pruned whenever one is added.
//!
//! - `sso_pending`: what a sign-in's start keeps for its callback, keyed by
//!   the SHA-256 of the flow's `state`, taken once.
//! - `sso_link_pending`: an identity waiting for an existing account's
//!   password before it is linked, keyed by the SHA-256 of the link token;
//!   each password tried is counted in SQL, up to a limit; used once.

use std::fmt;
use std::time::Duration;

use chrono::{DateTime, Utc};
use uuid::Uuid;

use crate::accounts::insert_session;
use crate::db::Db;
use crate::error::Result;
use crate::identities::{insert_identity, Identity};

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
struct PendingRow {
    nonce: String,
    pkce_verifier: String,
    browser_digest: Vec<u8>,
    live: bool,
}

/// An identity waiting for an existing account's password before it is
/// linked to it.
#[derive(Clone, PartialEq, Eq)]
pub struct SsoLink {
    /// The account the issuer's verified email matched.
    pub user_id: Uuid,
    /// The identity's issuer, as the ID token named it.
    pub issuer: String,
    /// The identity's subject at that issuer.
    pub subject: String,
    /// The account's email.
    pub email: String,
    /// SHA-256 of the browser id cookie of the browser that signed in.
    pub browser_digest: [u8; 32],
}

impl fmt::Debug for SsoLink {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("SsoLink")
            .field("user_id", &self.user_id)
            .field("issuer", &self.issuer)
            .finish_non_exhaustive()
    }
}

#[derive(sqlx::FromRow)]
struct LinkRow {
    user_id: Uuid,
    issuer: String,
    subject: String,
    email: String,
    browser_digest: Vec<u8>,
}

impl LinkRow {
    fn into_link(self) -> Option<SsoLink> {
        Some(SsoLink {
            user_id: self.user_id,
            issuer: self.issuer,
            subject: self.subject,
            email: self.email,
            browser_digest: self.browser_digest.try_into().ok()?,
        })
    }
}

/// Serializes the inserts into `table` over every replica, so that a cap
/// counted before an insert holds exactly; the lock ends with `tx`.
async fn one_insert_at_a_time(tx: &mut sqlx::PgConnection, table: &str) -> Result<()> {
    sqlx::query("SELECT pg_advisory_xact_lock(hashtext('llmgw.' || $1))")
        .bind(table)
        .execute(tx)
        .await?;
    Ok(())
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
        let values = [
            Value::Bytes(&state_digest[..]),
            Value::Text(&pending.nonce),
            Value::Text(&pending.pkce_verifier),
            Value::Bytes(&pending.browser_digest[..]),
        ];
        self.insert_capped(
            "sso_pending",
            "state_digest, nonce, pkce_verifier, browser_digest",
            &values,
            ttl,
            max,
        )
        .await
    }

    /// Takes the sign-in started with the state of this digest: deleted
    /// whether or not it has expired (a state is used once), returned only
    /// while it has not.
    pub async fn take_sso_pending(&self, state_digest: &[u8; 32]) -> Result<Option<SsoPending>> {
        let row = sqlx::query_as::<_, PendingRow>(
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

    /// Keeps an identity waiting for its account's password for `ttl`,
    /// keyed by the digest of the link token, after pruning the expired
    /// ones. Writes nothing and answers false when `max` links are already
    /// waiting.
    pub async fn insert_sso_link(
        &self,
        link_digest: &[u8; 32],
        link: &SsoLink,
        ttl: Duration,
        max: u32,
    ) -> Result<bool> {
        let values = [
            Value::Bytes(&link_digest[..]),
            Value::Uuid(link.user_id),
            Value::Text(&link.issuer),
            Value::Text(&link.subject),
            Value::Text(&link.email),
            Value::Bytes(&link.browser_digest[..]),
        ];
        self.insert_capped(
            "sso_link_pending",
            "link_digest, user_id, issuer, subject, email, browser_digest",
            &values,
            ttl,
            max,
        )
        .await
    }

    /// Inserts one row of `values` into `columns` of `table`, expiring
    /// after `ttl`, unless `max` live rows are there already; expired rows
    /// are pruned on the way. One such insert per table at a time, so the
    /// cap holds under concurrent sign-ins. True when the row was written.
    async fn insert_capped(
        &self,
        table: &'static str,
        columns: &'static str,
        values: &[Value<'_>],
        ttl: Duration,
        max: u32,
    ) -> Result<bool> {
        let n = values.len();
        let placeholders: Vec<String> = (1..=n).map(|i| format!("${i}")).collect();
        // The pruning runs whatever the INSERT does; both see the rows as
        // they were, hence the count of live rows only.
        let sql = format!(
            "WITH pruned AS (DELETE FROM {table} WHERE expires_at <= now())
             INSERT INTO {table} ({columns}, expires_at)
             SELECT {}, now() + make_interval(secs => ${})
             WHERE (SELECT count(*) FROM {table} WHERE expires_at > now()) < ${}",
            placeholders.join(", "),
            n + 1,
            n + 2,
        );
        let mut tx = self.pool.begin().await?;
        one_insert_at_a_time(&mut tx, table).await?;
        let mut query = sqlx::query(&sql);
        for v in values {
            query = match *v {
                Value::Bytes(b) => query.bind(b),
                Value::Text(t) => query.bind(t),
                Value::Uuid(u) => query.bind(u),
            };
        }
        let written = query
            .bind(ttl.as_secs_f64())
            .bind(i64::from(max))
            .execute(&mut *tx)
            .await?
            .rows_affected()
            == 1;
        tx.commit().await?;
        Ok(written)
    }

    /// The link of this digest while it may still be tried (not expired,
    /// fewer than `max_attempts` passwords tried); a dead one is deleted on
    /// the way. Counts nothing.
    pub async fn sso_link(
        &self,
        link_digest: &[u8; 32],
        max_attempts: u16,
    ) -> Result<Option<SsoLink>> {
        // Both statements see the table as it was: the SELECT's own
        // conditions leave out what the DELETE removes.
        let row = sqlx::query_as::<_, LinkRow>(
            "WITH dead AS (
                 DELETE FROM sso_link_pending
                 WHERE link_digest = $1 AND (expires_at <= now() OR attempts >= $2)
             )
             SELECT user_id, issuer, subject, email, browser_digest FROM sso_link_pending
             WHERE link_digest = $1 AND expires_at > now() AND attempts < $2",
        )
        .bind(&link_digest[..])
        .bind(i16::try_from(max_attempts).unwrap_or(i16::MAX))
        .fetch_optional(&self.pool)
        .await?;
        Ok(row.and_then(LinkRow::into_link))
    }

    /// Counts one password tried on the link of this digest, from the
    /// browser of `browser_digest`, before it is checked: the number tried
    /// so far, this one included, or `None` (nothing counted) when the link
    /// is unknown, expired, another browser's or already had
    /// `max_attempts`. Concurrent tries on any replica are counted one at a
    /// time by the row's lock, so no more than `max_attempts` get a number.
    pub async fn count_sso_link_attempt(
        &self,
        link_digest: &[u8; 32],
        browser_digest: &[u8; 32],
        max_attempts: u16,
    ) -> Result<Option<u16>> {
        let attempts = sqlx::query_scalar::<_, i16>(
            "UPDATE sso_link_pending SET attempts = attempts + 1
             WHERE link_digest = $1 AND browser_digest = $2
               AND expires_at > now() AND attempts < $3
             RETURNING attempts",
        )
        .bind(&link_digest[..])
        .bind(&browser_digest[..])
        .bind(i16::try_from(max_attempts).unwrap_or(i16::MAX))
        .fetch_optional(&self.pool)
        .await?;
        Ok(attempts.and_then(|a| u16::try_from(a).ok()))
    }

    /// Forgets the link of this digest (its last attempt was wrong).
    pub async fn delete_sso_link(&self, link_digest: &[u8; 32]) -> Result<()> {
        sqlx::query("DELETE FROM sso_link_pending WHERE link_digest = $1")
            .bind(&link_digest[..])
            .execute(&self.pool)
            .await?;
        Ok(())
    }

    /// Completes the link of this digest once its password was right: in
    /// one transaction the pending row is deleted (so a link works once,
    /// whichever replica answers), its identity linked to the account and a
    /// session opened. `None`, changing nothing, when the link is gone,
    /// expired or another browser's; `Conflict` when the identity was
    /// linked meanwhile.
    pub async fn complete_sso_link(
        &self,
        link_digest: &[u8; 32],
        browser_digest: &[u8; 32],
        token_digest: &[u8; 32],
        expires_at: DateTime<Utc>,
    ) -> Result<Option<SsoLink>> {
        let mut tx = self.pool.begin().await?;
        let row = sqlx::query_as::<_, LinkRow>(
            "DELETE FROM sso_link_pending
             WHERE link_digest = $1 AND browser_digest = $2 AND expires_at > now()
             RETURNING user_id, issuer, subject, email, browser_digest",
        )
        .bind(&link_digest[..])
        .bind(&browser_digest[..])
        .fetch_optional(&mut *tx)
        .await?;
        let Some(link) = row.and_then(LinkRow::into_link) else {
            return Ok(None);
        };
        let identity = Identity {
            issuer: &link.issuer,
            subject: &link.subject,
            email: Some(&link.email),
        };
        insert_identity(&mut tx, link.user_id, &identity).await?;
        insert_session(&mut tx, link.user_id, token_digest, expires_at).await?;
        tx.commit().await?;
        Ok(Some(link))
    }
}

/// A value bound into [`Db::insert_capped`]'s row.
enum Value<'a> {
    Bytes(&'a [u8]),
    Text(&'a str),
    Uuid(Uuid),
}
