//! Members and their roles. The last-owner rule is enforced by storage under
//! a lock on the organization row, so concurrent demotions cannot race it.

use actix_web::{web, HttpResponse};
use storage::domain::Role;
use storage::StorageError;

use super::List;
use crate::error::ApiError;
use crate::extract::{role, Input, ItemId, OrgAccess};
use crate::input::{AddMember, MemberPatch};
use crate::State;

pub async fn list(
    state: web::Data<State>,
    access: OrgAccess<role::Member>,
) -> Result<HttpResponse, ApiError> {
    let members = state.db.list_members(access.org_id()).await?;
    Ok(HttpResponse::Ok().json(List::all(members)))
}

pub async fn add(
    state: web::Data<State>,
    access: OrgAccess<role::Owner>,
    input: Input<AddMember>,
) -> Result<HttpResponse, ApiError> {
    let input = input.into_inner()?;
    match state
        .db
        .add_member(access.org_id(), access.user.id, &input.email, input.role)
        .await
    {
        Ok(member) => Ok(HttpResponse::Created().json(member)),
        Err(StorageError::NotFound) => Err(ApiError::field(
            "email",
            "no account has this email; the person must sign up first",
        )),
        Err(e) => Err(e.into()),
    }
}

pub async fn set_role(
    state: web::Data<State>,
    access: OrgAccess<role::Owner>,
    user_id: ItemId,
    input: Input<MemberPatch>,
) -> Result<HttpResponse, ApiError> {
    let user_id = user_id.get()?;
    let input = input.into_inner()?;
    let member = state
        .db
        .set_member_role(access.org_id(), access.user.id, user_id, input.role)
        .await?;
    Ok(HttpResponse::Ok().json(member))
}

/// Owners remove anyone; every member may remove themselves (leave).
pub async fn remove(
    state: web::Data<State>,
    access: OrgAccess<role::Member>,
    user_id: ItemId,
) -> Result<HttpResponse, ApiError> {
    let user_id = user_id.get()?;
    if user_id != access.user.id && access.role() < Role::Owner {
        return Err(ApiError::Forbidden(Role::Owner));
    }
    state
        .db
        .remove_member(access.org_id(), access.user.id, user_id)
        .await?;
    Ok(HttpResponse::NoContent().finish())
}
