//! Organizations.

use actix_web::{web, HttpResponse};
use storage::domain::Role;

use super::List;
use crate::error::ApiError;
use crate::extract::{role, Input, OrgAccess, Session};
use crate::input::{OrgInput, OrgPatch};
use crate::State;

pub async fn create(
    state: web::Data<State>,
    session: Session,
    input: Input<OrgInput>,
) -> Result<HttpResponse, ApiError> {
    let input = input.into_inner()?;
    let org = state.db.create_org(&input.name, session.user.id).await?;
    Ok(HttpResponse::Created().json(org))
}

pub async fn list(state: web::Data<State>, session: Session) -> Result<HttpResponse, ApiError> {
    let orgs = state.db.list_orgs(session.user.id).await?;
    Ok(HttpResponse::Ok().json(List::all(orgs)))
}

pub async fn get(access: OrgAccess<role::Member>) -> HttpResponse {
    HttpResponse::Ok().json(access.org)
}

/// Admins may rename; only owners set the organization's limits.
pub async fn update(
    state: web::Data<State>,
    access: OrgAccess<role::Admin>,
    input: Input<OrgPatch>,
) -> Result<HttpResponse, ApiError> {
    let input = input.into_inner()?;
    if input.limits.is_some() && access.role() < Role::Owner {
        return Err(ApiError::Forbidden(Role::Owner));
    }
    let org = state
        .db
        .update_org(
            access.org_id(),
            access.user.id,
            input.name.as_deref(),
            input.limits.as_ref(),
        )
        .await?;
    Ok(HttpResponse::Ok().json(org))
}

pub async fn delete(
    state: web::Data<State>,
    access: OrgAccess<role::Owner>,
) -> Result<HttpResponse, ApiError> {
    state.db.delete_org(access.org_id()).await?;
    Ok(HttpResponse::NoContent().finish())
}
