//! Invitations: the organization's side (list, read, cancel) and the
//! invitee's (list mine, accept with the token).

use actix_web::{web, HttpResponse};

use super::List;
use crate::error::ApiError;
use crate::extract::{role, Input, ItemId, OrgAccess, Session};
use crate::input::AcceptInvitation;
use crate::State;

pub async fn list(
    state: web::Data<State>,
    access: OrgAccess<role::Admin>,
) -> Result<HttpResponse, ApiError> {
    let invitations = state.db.list_invitations(access.org_id()).await?;
    Ok(HttpResponse::Ok().json(List::all(invitations)))
}

pub async fn get(
    state: web::Data<State>,
    access: OrgAccess<role::Admin>,
    id: ItemId,
) -> Result<HttpResponse, ApiError> {
    let invitation = state.db.get_invitation(access.org_id(), id.get()?).await?;
    Ok(HttpResponse::Ok().json(invitation))
}

pub async fn delete(
    state: web::Data<State>,
    access: OrgAccess<role::Owner>,
    id: ItemId,
) -> Result<HttpResponse, ApiError> {
    state
        .db
        .delete_invitation(access.org_id(), access.user.id, id.get()?)
        .await?;
    Ok(HttpResponse::NoContent().finish())
}

/// Pending, unexpired invitations addressed to the signed-in user's email.
pub async fn mine(state: web::Data<State>, session: Session) -> Result<HttpResponse, ApiError> {
    let invitations = state.db.invitations_for(&session.user.email).await?;
    Ok(HttpResponse::Ok().json(List::all(invitations)))
}

/// Joins the organization; an unknown id, a wrong token, someone else's
/// invitation and an expired one all answer the same 404.
pub async fn accept(
    state: web::Data<State>,
    session: Session,
    id: ItemId,
    input: Input<AcceptInvitation>,
) -> Result<HttpResponse, ApiError> {
    let id = id.get()?;
    let input = input.into_inner()?;
    let org = state
        .db
        .accept_invitation(&session.user, id, &input.token)
        .await?;
    Ok(HttpResponse::Ok().json(org))
}
