//! Members and their roles. Members join by invitation (see
//! [`super::invitations`]); the last-owner rule is enforced by storage under
//! a lock on the organization row, so concurrent demotions cannot race it.

use actix_web::{web, HttpResponse};
use serde::Serialize;
use storage::domain::Role;
use storage::invitations::Invitation;

use super::List;
use crate::error::ApiError;
use crate::extract::{role, Input, ItemId, OrgAccess, Query};
use crate::input::{Invite, MemberPatch, RemoveMember};
use crate::State;

pub async fn list(
    state: web::Data<State>,
    access: OrgAccess<role::Member>,
) -> Result<HttpResponse, ApiError> {
    let members = state.db.list_members(access.org_id()).await?;
    Ok(HttpResponse::Ok().json(List::all(members)))
}

/// The invitation answer: its fields plus the token, shown this once.
#[derive(Serialize)]
struct Invited {
    #[serde(flatten)]
    invitation: Invitation,
    token: String,
}

/// Invites an email, whether or not it has an account: the answer is the
/// same either way, so it tells nothing about who has signed up.
pub async fn invite(
    state: web::Data<State>,
    access: OrgAccess<role::Owner>,
    input: Input<Invite>,
) -> Result<HttpResponse, ApiError> {
    let input = input.into_inner()?;
    // Nobody hands out a role above their own (today only owners invite).
    if input.role > access.role() {
        return Err(ApiError::Forbidden(input.role));
    }
    let (invitation, token) = state
        .db
        .create_invitation(access.org_id(), access.user.id, &input.email, input.role)
        .await?;
    Ok(HttpResponse::Created().json(Invited {
        invitation,
        token: token.expose_secret().to_owned(),
    }))
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

/// Owners remove anyone; every member may remove themselves (leave). The
/// API keys the member created are revoked, or handed to
/// `?transfer_api_keys_to`, in the same transaction.
pub async fn remove(
    state: web::Data<State>,
    access: OrgAccess<role::Member>,
    user_id: ItemId,
    query: Query<RemoveMember>,
) -> Result<HttpResponse, ApiError> {
    let user_id = user_id.get()?;
    if user_id != access.user.id && access.role() < Role::Owner {
        return Err(ApiError::Forbidden(Role::Owner));
    }
    let query = query.into_inner()?;
    let removal = state
        .db
        .remove_member(
            access.org_id(),
            access.user.id,
            user_id,
            query.transfer_api_keys_to,
        )
        .await?;
    Ok(HttpResponse::Ok().json(removal))
}
