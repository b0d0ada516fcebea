//! Usage rows written by the gateway, their aggregation, and the audit log.

use actix_web::{web, HttpResponse};
use serde_json::json;

use super::List;
use crate::error::ApiError;
use crate::extract::{role, OrgAccess, Query};
use crate::input::{LogQuery, PageQuery, UsageQuery, GROUP_BY, PAGE_MAX};
use crate::State;

pub async fn logs(
    state: web::Data<State>,
    access: OrgAccess<role::Member>,
    query: Query<LogQuery>,
) -> Result<HttpResponse, ApiError> {
    let q = query.into_inner()?;
    let page = state
        .db
        .list_request_logs(
            access.org_id(),
            &q.filter,
            q.page.cursor.as_ref(),
            q.page.limit,
        )
        .await?;
    Ok(HttpResponse::Ok().json(List::page(page)))
}

pub async fn usage(
    state: web::Data<State>,
    access: OrgAccess<role::Member>,
    query: Query<UsageQuery>,
) -> Result<HttpResponse, ApiError> {
    let q = query.into_inner()?;
    let rows = state
        .db
        .usage(access.org_id(), q.from, q.to, q.group_by, &q.filter)
        .await?;
    let group_by = GROUP_BY
        .iter()
        .find(|(_, g)| *g == q.group_by)
        .map_or("day", |(name, _)| *name);
    Ok(HttpResponse::Ok()
        .json(json!({"from": q.from, "to": q.to, "group_by": group_by, "data": rows})))
}

pub async fn audit_log(
    state: web::Data<State>,
    access: OrgAccess<role::Admin>,
    query: Query<PageQuery<PAGE_MAX>>,
) -> Result<HttpResponse, ApiError> {
    let q = query.into_inner()?;
    let page = state
        .db
        .list_audit(access.org_id(), q.cursor.as_ref(), q.limit)
        .await?;
    Ok(HttpResponse::Ok().json(List::page(page)))
}
