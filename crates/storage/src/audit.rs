//! Audit trail: who changed what, when. Written in the same transaction as
//! the change it records; never holds a secret.

use chrono::{DateTime, Utc};
use serde::Serialize;
use sqlx::PgConnection;
use uuid::Uuid;

use crate::db::Db;
use crate::error::Result;
use crate::page::{Cursor, Page};

/// One audit entry.
#[derive(Debug, Clone, Serialize, sqlx::FromRow)]
pub struct AuditEntry {
    pub id: Uuid,
    pub org_id: Uuid,
    pub actor_user_id: Option<Uuid>,
    pub action: String,
    pub target_type: String,
    pub target_id: Option<Uuid>,
    pub details: serde_json::Value,
    pub created_at: DateTime<Utc>,
}

/// Who is making a change (`None`: the CLI or the system).
#[derive(Debug, Clone, Copy)]
pub struct Actor(pub Option<Uuid>);

pub(crate) async fn record(
    conn: &mut PgConnection,
    org_id: Uuid,
    actor: Actor,
    action: &str,
    target_type: &str,
    target_id: Option<Uuid>,
    details: serde_json::Value,
) -> Result<()> {
    sqlx::query(
        "INSERT INTO audit_log (id, org_id, actor_user_id, action, target_type, target_id, details)
         VALUES ($1, $2, $3, $4, $5, $6, $7)",
    )
    .bind(Uuid::new_v4())
    .bind(org_id)
    .bind(actor.0)
    .bind(action)
    .bind(target_type)
    .bind(target_id)
    .bind(details)
    .execute(conn)
    .await?;
    Ok(())
}

impl Db {
    /// The organization's audit entries, newest first.
    pub async fn list_audit(
        &self,
        org_id: Uuid,
        after: Option<&Cursor>,
        limit: u32,
    ) -> Result<Page<AuditEntry>> {
        let limit = limit.clamp(1, 200);
        let rows = sqlx::query_as::<_, AuditEntry>(
            "SELECT id, org_id, actor_user_id, action, target_type, target_id, details, created_at
             FROM audit_log
             WHERE org_id = $1 AND ($2::timestamptz IS NULL OR (created_at, id) < ($2, $3))
             ORDER BY created_at DESC, id DESC LIMIT $4",
        )
        .bind(org_id)
        .bind(after.map(|c| c.at))
        .bind(after.map(|c| c.id))
        .bind(i64::from(limit) + 1)
        .fetch_all(&self.pool)
        .await?;
        Ok(Page::from_rows(rows, limit, |e| Cursor {
            at: e.created_at,
            id: e.id,
        }))
    }
}
