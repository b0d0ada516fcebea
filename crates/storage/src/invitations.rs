//! Invitations to join an organization. Emails are not verified, so the
//! address alone grants nothing: the invitee must be signed in with that
//! email and present the one-time token the inviter passed on. The token is
//! stored as its SHA-256 digest, like API keys and session tokens.

use chrono::{DateTime, Duration, Utc};
use serde::Serialize;
use serde_json::json;
use sqlx::PgConnection;
use uuid::Uuid;

use crate::accounts::User;
use crate::audit::{record, Actor};
use crate::db::Db;
use crate::domain::{Email, Role};
use crate::error::{Result, StorageError};
use crate::orgs::{lock_org, member_in, org_in, Org};
pub use crate::secrets::InvitationToken;

/// How long an invitation can be accepted.
pub const INVITATION_TTL: Duration = Duration::days(7);

/// A pending invitation (never its token).
#[derive(Debug, Clone, Serialize)]
pub struct Invitation {
    pub id: Uuid,
    pub org_id: Uuid,
    pub email: String,
    pub role: Role,
    pub invited_by: Option<Uuid>,
    pub created_at: DateTime<Utc>,
    pub expires_at: DateTime<Utc>,
}

#[derive(sqlx::FromRow)]
struct Row {
    id: Uuid,
    org_id: Uuid,
    email: String,
    role: String,
    invited_by: Option<Uuid>,
    created_at: DateTime<Utc>,
    expires_at: DateTime<Utc>,
}

impl From<Row> for Invitation {
    fn from(r: Row) -> Self {
        Self {
            id: r.id,
            org_id: r.org_id,
            email: r.email,
            role: Role::from_db(&r.role),
            invited_by: r.invited_by,
            created_at: r.created_at,
            expires_at: r.expires_at,
        }
    }
}

const COLUMNS: &str = "i.id, i.org_id, i.email, i.role, i.invited_by, i.created_at, i.expires_at";

async fn invitation_in(conn: &mut PgConnection, org_id: Uuid, id: Uuid) -> Result<Invitation> {
    sqlx::query_as::<_, Row>(&format!(
        "SELECT {COLUMNS} FROM invitations i WHERE i.org_id = $1 AND i.id = $2"
    ))
    .bind(org_id)
    .bind(id)
    .fetch_optional(conn)
    .await?
    .map(Invitation::from)
    .ok_or(StorageError::NotFound)
}

impl Db {
    /// Invites `email` with `role`; the token is returned once. `Conflict`
    /// when the address already belongs to a member or has a pending
    /// invitation (an expired one is replaced). Whether the address has an
    /// account does not change the answer.
    pub async fn create_invitation(
        &self,
        org_id: Uuid,
        actor: Uuid,
        email: &Email,
        role: Role,
    ) -> Result<(Invitation, InvitationToken)> {
        let token = InvitationToken::generate();
        let id = Uuid::new_v4();
        let mut tx = self.pool.begin().await?;
        lock_org(&mut tx, org_id).await?;
        let member: bool = sqlx::query_scalar(
            "SELECT EXISTS (SELECT 1 FROM memberships m JOIN users u ON u.id = m.user_id
                            WHERE m.org_id = $1 AND lower(u.email) = lower($2))",
        )
        .bind(org_id)
        .bind(email.as_str())
        .fetch_one(&mut *tx)
        .await?;
        if member {
            return Err(StorageError::Conflict("a member with this email"));
        }
        sqlx::query(
            "DELETE FROM invitations
             WHERE org_id = $1 AND lower(email) = lower($2) AND expires_at <= now()",
        )
        .bind(org_id)
        .bind(email.as_str())
        .execute(&mut *tx)
        .await?;
        let pending: bool = sqlx::query_scalar(
            "SELECT EXISTS (SELECT 1 FROM invitations WHERE org_id = $1 AND lower(email) = lower($2))",
        )
        .bind(org_id)
        .bind(email.as_str())
        .fetch_one(&mut *tx)
        .await?;
        if pending {
            return Err(StorageError::Conflict(
                "a pending invitation for this email",
            ));
        }
        let now = Utc::now();
        let invitation: Invitation = sqlx::query_as::<_, Row>(&format!(
            "INSERT INTO invitations AS i (id, org_id, email, role, token_digest, invited_by, created_at, expires_at)
             VALUES ($1, $2, $3, $4, $5, $6, $7, $8) RETURNING {COLUMNS}"
        ))
        .bind(id)
        .bind(org_id)
        .bind(email.as_str())
        .bind(role.as_str())
        .bind(&token.digest()[..])
        .bind(actor)
        .bind(now)
        .bind(now + INVITATION_TTL)
        .fetch_one(&mut *tx)
        .await?
        .into();
        record(
            &mut tx,
            org_id,
            Actor(Some(actor)),
            "invitation.create",
            "invitation",
            Some(id),
            json!({"email": email.as_str(), "role": role.as_str()}),
        )
        .await?;
        tx.commit().await?;
        Ok((invitation, token))
    }

    /// The organization's pending invitations (expired ones included, with
    /// their `expires_at`), oldest first.
    pub async fn list_invitations(&self, org_id: Uuid) -> Result<Vec<Invitation>> {
        let rows = sqlx::query_as::<_, Row>(&format!(
            "SELECT {COLUMNS} FROM invitations i WHERE i.org_id = $1 ORDER BY i.created_at, i.id"
        ))
        .bind(org_id)
        .fetch_all(&self.pool)
        .await?;
        Ok(rows.into_iter().map(Invitation::from).collect())
    }

    pub async fn get_invitation(&self, org_id: Uuid, id: Uuid) -> Result<Invitation> {
        let mut conn = self.pool.acquire().await?;
        invitation_in(&mut conn, org_id, id).await
    }

    /// Cancels a pending invitation; its token stops working at once.
    pub async fn delete_invitation(&self, org_id: Uuid, actor: Uuid, id: Uuid) -> Result<()> {
        let mut tx = self.pool.begin().await?;
        lock_org(&mut tx, org_id).await?;
        let email: String = sqlx::query_scalar(
            "DELETE FROM invitations WHERE org_id = $1 AND id = $2 RETURNING email",
        )
        .bind(org_id)
        .bind(id)
        .fetch_optional(&mut *tx)
        .await?
        .ok_or(StorageError::NotFound)?;
        record(
            &mut tx,
            org_id,
            Actor(Some(actor)),
            "invitation.delete",
            "invitation",
            Some(id),
            json!({"email": email}),
        )
        .await?;
        tx.commit().await?;
        Ok(())
    }

    /// Unexpired invitations addressed to `email`, oldest first. Emails are
    /// not verified, so this shows nothing an address squatter could use:
    /// no token, and no organization name.
    pub async fn invitations_for(&self, email: &str) -> Result<Vec<Invitation>> {
        let rows = sqlx::query_as::<_, Row>(&format!(
            "SELECT {COLUMNS} FROM invitations i
             WHERE lower(i.email) = lower($1) AND i.expires_at > now()
             ORDER BY i.created_at, i.id"
        ))
        .bind(email)
        .fetch_all(&self.pool)
        .await?;
        Ok(rows.into_iter().map(Invitation::from).collect())
    }

    /// Accepts invitation `id` for `user`: makes them a member with the
    /// invited role and consumes the invitation. An unknown id, a wrong
    /// token, another address's invitation and an expired one are all
    /// `NotFound`, so none can be told apart; `Conflict` when already a member.
    pub async fn accept_invitation(
        &self,
        user: &User,
        id: Uuid,
        token: &InvitationToken,
    ) -> Result<Org> {
        let mut tx = self.pool.begin().await?;
        let org_id: Uuid = sqlx::query_scalar("SELECT org_id FROM invitations WHERE id = $1")
            .bind(id)
            .fetch_optional(&mut *tx)
            .await?
            .ok_or(StorageError::NotFound)?;
        lock_org(&mut tx, org_id).await?;
        let invitation: Invitation = sqlx::query_as::<_, Row>(&format!(
            "DELETE FROM invitations AS i
             WHERE i.id = $1 AND i.org_id = $2 AND i.token_digest = $3
               AND lower(i.email) = lower($4) AND i.expires_at > now()
             RETURNING {COLUMNS}"
        ))
        .bind(id)
        .bind(org_id)
        .bind(&token.digest()[..])
        .bind(&user.email)
        .fetch_optional(&mut *tx)
        .await?
        .ok_or(StorageError::NotFound)?
        .into();
        match member_in(&mut tx, org_id, user.id).await {
            Ok(_) => return Err(StorageError::Conflict("this member")),
            Err(StorageError::NotFound) => {}
            Err(e) => return Err(e),
        }
        sqlx::query("INSERT INTO memberships (org_id, user_id, role) VALUES ($1, $2, $3)")
            .bind(org_id)
            .bind(user.id)
            .bind(invitation.role.as_str())
            .execute(&mut *tx)
            .await?;
        record(
            &mut tx,
            org_id,
            Actor(Some(user.id)),
            "member.add",
            "user",
            Some(user.id),
            json!({"invitation_id": id, "role": invitation.role.as_str(),
                   "invited_by": invitation.invited_by}),
        )
        .await?;
        let org = org_in(&mut tx, org_id, user.id).await?;
        tx.commit().await?;
        Ok(org)
    }
}
