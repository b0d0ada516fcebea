//! Organizations and their members.

use chrono::{DateTime, Utc};
use serde::Serialize;
use serde_json::json;
use sqlx::PgConnection;
use uuid::Uuid;

use crate::audit::{record, Actor};
use crate::db::Db;
use crate::domain::{Email, Role, ValidationError};
use crate::error::{Result, StorageError};
use crate::limits::Limits;

/// An organization as seen by one of its members.
#[derive(Debug, Clone, Serialize)]
pub struct Org {
    pub id: Uuid,
    pub name: String,
    pub role: Role,
    pub created_at: DateTime<Utc>,
    /// Limits every key of the organization shares (owners set them).
    pub limits: Limits,
}

#[derive(sqlx::FromRow)]
struct OrgRow {
    id: Uuid,
    name: String,
    role: String,
    created_at: DateTime<Utc>,
    #[sqlx(json)]
    limits: Limits,
}

impl From<OrgRow> for Org {
    fn from(r: OrgRow) -> Self {
        Self {
            id: r.id,
            name: r.name,
            role: Role::from_db(&r.role),
            created_at: r.created_at,
            limits: r.limits,
        }
    }
}

/// A member of an organization.
#[derive(Debug, Clone, Serialize)]
pub struct Member {
    pub user_id: Uuid,
    pub email: String,
    pub role: Role,
    pub created_at: DateTime<Utc>,
}

#[derive(sqlx::FromRow)]
struct MemberRow {
    user_id: Uuid,
    email: String,
    role: String,
    created_at: DateTime<Utc>,
}

impl From<MemberRow> for Member {
    fn from(r: MemberRow) -> Self {
        Self {
            user_id: r.user_id,
            email: r.email,
            role: Role::from_db(&r.role),
            created_at: r.created_at,
        }
    }
}

/// What removing a member did to the API keys they had created.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
pub struct Removal {
    pub revoked_api_keys: u64,
    pub transferred_api_keys: u64,
}

const ORG_SELECT: &str = "SELECT o.id, o.name, m.role, o.created_at, o.limits
     FROM organizations o JOIN memberships m ON m.org_id = o.id";

const MEMBER_SELECT: &str = "SELECT m.user_id, u.email, m.role, m.created_at
     FROM memberships m JOIN users u ON u.id = m.user_id";

/// Locks the organization row so membership changes in one org serialize
/// (the last-owner rule cannot be raced). `FOR NO KEY UPDATE` conflicts with
/// itself and with the `FOR SHARE` that API-key creation takes, but not with
/// the `FOR KEY SHARE` that every foreign-key insert (an audit row, say) takes:
/// a transaction that already holds a provider or API-key row and then writes
/// its audit row never waits for this lock, so it cannot deadlock with us.
pub(crate) async fn lock_org(conn: &mut PgConnection, org_id: Uuid) -> Result<()> {
    sqlx::query("SELECT id FROM organizations WHERE id = $1 FOR NO KEY UPDATE")
        .bind(org_id)
        .fetch_optional(&mut *conn)
        .await?
        .ok_or(StorageError::NotFound)?;
    Ok(())
}

async fn owner_count(conn: &mut PgConnection, org_id: Uuid) -> Result<i64> {
    Ok(
        sqlx::query_scalar("SELECT count(*) FROM memberships WHERE org_id = $1 AND role = $2")
            .bind(org_id)
            .bind(Role::Owner.as_str())
            .fetch_one(conn)
            .await?,
    )
}

pub(crate) async fn member_in(
    conn: &mut PgConnection,
    org_id: Uuid,
    user_id: Uuid,
) -> Result<Member> {
    sqlx::query_as::<_, MemberRow>(&format!(
        "{MEMBER_SELECT} WHERE m.org_id = $1 AND m.user_id = $2"
    ))
    .bind(org_id)
    .bind(user_id)
    .fetch_optional(conn)
    .await?
    .map(Member::from)
    .ok_or(StorageError::NotFound)
}

pub(crate) async fn org_in(conn: &mut PgConnection, org_id: Uuid, user_id: Uuid) -> Result<Org> {
    sqlx::query_as::<_, OrgRow>(&format!("{ORG_SELECT} WHERE o.id = $1 AND m.user_id = $2"))
        .bind(org_id)
        .bind(user_id)
        .fetch_optional(conn)
        .await?
        .map(Org::from)
        .ok_or(StorageError::NotFound)
}

/// Inserts an organization with `owner` as its first owner, and its audit row.
async fn insert_org(conn: &mut PgConnection, name: &str, owner: Uuid) -> Result<Org> {
    let id = Uuid::new_v4();
    sqlx::query("INSERT INTO organizations (id, name) VALUES ($1, $2)")
        .bind(id)
        .bind(name)
        .execute(&mut *conn)
        .await?;
    sqlx::query("INSERT INTO memberships (org_id, user_id, role) VALUES ($1, $2, $3)")
        .bind(id)
        .bind(owner)
        .bind(Role::Owner.as_str())
        .execute(&mut *conn)
        .await?;
    record(
        conn,
        id,
        Actor(Some(owner)),
        "org.create",
        "organization",
        Some(id),
        json!({"name": name}),
    )
    .await?;
    org_in(conn, id, owner).await
}

impl Db {
    /// Creates an organization with `owner` as its first owner.
    pub async fn create_org(&self, name: &str, owner: Uuid) -> Result<Org> {
        let mut tx = self.pool.begin().await?;
        let org = insert_org(&mut tx, name, owner).await?;
        tx.commit().await?;
        Ok(org)
    }

    /// Creates a user and an organization they own in one transaction (CLI bootstrap).
    pub async fn create_user_with_org(
        &self,
        email: &Email,
        password_hash: &str,
        org_name: &str,
    ) -> Result<(crate::accounts::User, Org)> {
        let mut tx = self.pool.begin().await?;
        let user = crate::accounts::insert_user(&mut tx, email, password_hash).await?;
        let org = insert_org(&mut tx, org_name, user.id).await?;
        tx.commit().await?;
        Ok((user, org))
    }

    /// The organizations `user_id` belongs to.
    pub async fn list_orgs(&self, user_id: Uuid) -> Result<Vec<Org>> {
        let rows = sqlx::query_as::<_, OrgRow>(&format!(
            "{ORG_SELECT} WHERE m.user_id = $1 ORDER BY o.created_at, o.id"
        ))
        .bind(user_id)
        .fetch_all(&self.pool)
        .await?;
        Ok(rows.into_iter().map(Org::from).collect())
    }

    /// The organization as seen by `user_id`; `NotFound` when not a member.
    pub async fn org_for_member(&self, org_id: Uuid, user_id: Uuid) -> Result<Org> {
        let mut conn = self.pool.acquire().await?;
        org_in(&mut conn, org_id, user_id).await
    }

    pub async fn rename_org(&self, org_id: Uuid, actor: Uuid, name: &str) -> Result<Org> {
        self.update_org(org_id, actor, Some(name), None).await
    }

    /// Renames the organization and/or replaces its limits, in one
    /// transaction with one audit row per kind of change (`org.rename`,
    /// `org.limits`). Who may set limits is the caller's check (owners).
    pub async fn update_org(
        &self,
        org_id: Uuid,
        actor: Uuid,
        name: Option<&str>,
        limits: Option<&Limits>,
    ) -> Result<Org> {
        let mut tx = self.pool.begin().await?;
        let before: Option<sqlx::types::Json<Limits>> =
            sqlx::query_scalar("SELECT limits FROM organizations WHERE id = $1 FOR NO KEY UPDATE")
                .bind(org_id)
                .fetch_optional(&mut *tx)
                .await?;
        let before = before.ok_or(StorageError::NotFound)?.0;
        if let Some(name) = name {
            sqlx::query("UPDATE organizations SET name = $2, updated_at = now() WHERE id = $1")
                .bind(org_id)
                .bind(name)
                .execute(&mut *tx)
                .await?;
            record(
                &mut tx,
                org_id,
                Actor(Some(actor)),
                "org.rename",
                "organization",
                Some(org_id),
                json!({"name": name}),
            )
            .await?;
        }
        if let Some(limits) = limits {
            sqlx::query("UPDATE organizations SET limits = $2, updated_at = now() WHERE id = $1")
                .bind(org_id)
                .bind(sqlx::types::Json(limits))
                .execute(&mut *tx)
                .await?;
            record(
                &mut tx,
                org_id,
                Actor(Some(actor)),
                "org.limits",
                "organization",
                Some(org_id),
                json!({"from": before, "to": limits}),
            )
            .await?;
        }
        let org = org_in(&mut tx, org_id, actor).await?;
        tx.commit().await?;
        Ok(org)
    }

    /// The organization's limits (the gateway cache reads them with each key).
    pub async fn org_limits(&self, org_id: Uuid) -> Result<Limits> {
        let l: Option<sqlx::types::Json<Limits>> =
            sqlx::query_scalar("SELECT limits FROM organizations WHERE id = $1")
                .bind(org_id)
                .fetch_optional(&self.pool)
                .await?;
        Ok(l.ok_or(StorageError::NotFound)?.0)
    }

    /// Deletes the organization and everything it owns, usage rows included.
    ///
    /// Lock order, so a concurrent change cannot deadlock with the cascade:
    /// the organization row (`FOR NO KEY UPDATE`, which waits for membership
    /// and API-key changes in flight and keeps new ones out), then every
    /// provider and API-key row in id order (waiting for edits in flight,
    /// which lock their row first and take only `FOR KEY SHARE` on the
    /// organization afterwards), and only then the delete itself.
    ///
    /// A writer added later that locks in another order would make this the
    /// deadlock victim: the delete is then retried (twice at most) rather
    /// than failed, and the log says so.
    pub async fn delete_org(&self, org_id: Uuid) -> Result<()> {
        let mut retries = 0;
        loop {
            match self.delete_org_once(org_id).await {
                Err(StorageError::Database(sqlx::Error::Database(e)))
                    if retries < 2
                        && matches!(e.code().as_deref(), Some("40P01") | Some("40001")) =>
                {
                    retries += 1;
                    tracing::warn!(%org_id, code = ?e.code(), "organization delete lost a lock conflict; retrying");
                }
                r => return r,
            }
        }
    }

    async fn delete_org_once(&self, org_id: Uuid) -> Result<()> {
        let mut tx = self.pool.begin().await?;
        lock_org(&mut tx, org_id).await?;
        for table in ["provider_keys", "api_keys"] {
            sqlx::query(&format!(
                "SELECT id FROM {table} WHERE org_id = $1 ORDER BY id FOR UPDATE"
            ))
            .bind(org_id)
            .execute(&mut *tx)
            .await?;
        }
        for table in ["request_logs", "usage_hourly"] {
            sqlx::query(&format!("DELETE FROM {table} WHERE org_id = $1"))
                .bind(org_id)
                .execute(&mut *tx)
                .await?;
        }
        let r = sqlx::query("DELETE FROM organizations WHERE id = $1")
            .bind(org_id)
            .execute(&mut *tx)
            .await?;
        if r.rows_affected() == 0 {
            return Err(StorageError::NotFound);
        }
        tx.commit().await?;
        Ok(())
    }

    pub async fn list_members(&self, org_id: Uuid) -> Result<Vec<Member>> {
        let rows = sqlx::query_as::<_, MemberRow>(&format!(
            "{MEMBER_SELECT} WHERE m.org_id = $1 ORDER BY m.created_at, m.user_id"
        ))
        .bind(org_id)
        .fetch_all(&self.pool)
        .await?;
        Ok(rows.into_iter().map(Member::from).collect())
    }

    pub async fn member(&self, org_id: Uuid, user_id: Uuid) -> Result<Member> {
        let mut conn = self.pool.acquire().await?;
        member_in(&mut conn, org_id, user_id).await
    }

    /// Changes a role; refuses to demote the last owner.
    pub async fn set_member_role(
        &self,
        org_id: Uuid,
        actor: Uuid,
        user_id: Uuid,
        role: Role,
    ) -> Result<Member> {
        let mut tx = self.pool.begin().await?;
        lock_org(&mut tx, org_id).await?;
        let current = member_in(&mut tx, org_id, user_id).await?;
        if current.role == Role::Owner
            && role != Role::Owner
            && owner_count(&mut tx, org_id).await? <= 1
        {
            return Err(StorageError::LastOwner);
        }
        sqlx::query("UPDATE memberships SET role = $3 WHERE org_id = $1 AND user_id = $2")
            .bind(org_id)
            .bind(user_id)
            .bind(role.as_str())
            .execute(&mut *tx)
            .await?;
        record(
            &mut tx,
            org_id,
            Actor(Some(actor)),
            "member.role",
            "user",
            Some(user_id),
            json!({"from": current.role.as_str(), "to": role.as_str()}),
        )
        .await?;
        let m = member_in(&mut tx, org_id, user_id).await?;
        tx.commit().await?;
        Ok(m)
    }

    /// Removes a member (or lets one leave); refuses to remove the last owner.
    ///
    /// In the same transaction every unrevoked API key the member created in
    /// this org is revoked, or, with `transfer_to`, handed to that remaining
    /// member (`Invalid` when they are not one). API-key creation
    /// takes a share lock on the organization row and re-checks membership,
    /// so a key being created by the member as they are removed either
    /// commits first (and is revoked here) or is refused.
    pub async fn remove_member(
        &self,
        org_id: Uuid,
        actor: Uuid,
        user_id: Uuid,
        transfer_to: Option<Uuid>,
    ) -> Result<Removal> {
        let mut tx = self.pool.begin().await?;
        lock_org(&mut tx, org_id).await?;
        let current = member_in(&mut tx, org_id, user_id).await?;
        if let Some(to) = transfer_to {
            let remaining = to != user_id
                && match member_in(&mut tx, org_id, to).await {
                    Ok(_) => true,
                    Err(StorageError::NotFound) => false,
                    Err(e) => return Err(e),
                };
            if !remaining {
                return Err(StorageError::Invalid(ValidationError::new(
                    "transfer_api_keys_to",
                    "transfer_api_keys_to must name another member of this organization",
                )));
            }
        }
        if current.role == Role::Owner && owner_count(&mut tx, org_id).await? <= 1 {
            return Err(StorageError::LastOwner);
        }
        sqlx::query("DELETE FROM memberships WHERE org_id = $1 AND user_id = $2")
            .bind(org_id)
            .bind(user_id)
            .execute(&mut *tx)
            .await?;
        let keys = crate::api_keys::release_keys_of(&mut tx, org_id, user_id, transfer_to).await?;
        let n = keys.len() as u64;
        let (removal, details) = match transfer_to {
            None => (
                Removal {
                    revoked_api_keys: n,
                    transferred_api_keys: 0,
                },
                json!({"role": current.role.as_str(), "api_keys": {"revoked": n, "ids": keys}}),
            ),
            Some(to) => (
                Removal {
                    revoked_api_keys: 0,
                    transferred_api_keys: n,
                },
                json!({"role": current.role.as_str(),
                       "api_keys": {"transferred": n, "to": to, "ids": keys}}),
            ),
        };
        record(
            &mut tx,
            org_id,
            Actor(Some(actor)),
            "member.remove",
            "user",
            Some(user_id),
            details,
        )
        .await?;
        tx.commit().await?;
        Ok(removal)
    }
}
