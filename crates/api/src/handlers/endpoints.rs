//! A provider's endpoints. The first is the provider's own (same id as the
//! provider, its top-level `base_url` and token); further ones are added,
//! changed and removed here. Tokens are write-only, base URLs pass the same
//! save-time checks as a provider's, and a new base URL needs its token in
//! the same request (storage checks it under the row lock).

use actix_web::{web, HttpResponse};

use super::providers::check_base_url;
use super::List;
use crate::error::ApiError;
use crate::extract::{role, EndpointId, Input, ItemId, OrgAccess};
use crate::input::{CreateEndpoint, PatchEndpoint};
use crate::State;

pub async fn list(
    state: web::Data<State>,
    access: OrgAccess<role::Member>,
    id: ItemId,
) -> Result<HttpResponse, ApiError> {
    let org_id = access.org_id();
    let mut endpoints = state.db.list_endpoints(org_id, id.get()?).await?;
    let mut all: Vec<_> = endpoints.iter_mut().collect();
    state.health.annotate(org_id, &mut all).await;
    Ok(HttpResponse::Ok().json(List::all(endpoints)))
}

pub async fn create(
    state: web::Data<State>,
    access: OrgAccess<role::Admin>,
    id: ItemId,
    input: Input<CreateEndpoint>,
) -> Result<HttpResponse, ApiError> {
    let id = id.get()?;
    let CreateEndpoint(new) = input.into_inner()?;
    check_base_url(&state, &new.base_url).await?;
    let org_id = access.org_id();
    let mut endpoint = state
        .db
        .create_endpoint(org_id, access.actor(), id, &new)
        .await?;
    state.health.annotate(org_id, &mut [&mut endpoint]).await;
    Ok(HttpResponse::Created().json(endpoint))
}

pub async fn update(
    state: web::Data<State>,
    access: OrgAccess<role::Admin>,
    id: ItemId,
    endpoint_id: EndpointId,
    input: Input<PatchEndpoint>,
) -> Result<HttpResponse, ApiError> {
    let (id, endpoint_id) = (id.get()?, endpoint_id.get()?);
    let PatchEndpoint(patch) = input.into_inner()?;
    if let Some(base_url) = &patch.base_url {
        check_base_url(&state, base_url).await?;
    }
    let org_id = access.org_id();
    let mut endpoint = state
        .db
        .update_endpoint(org_id, access.actor(), id, endpoint_id, patch)
        .await?;
    state.health.annotate(org_id, &mut [&mut endpoint]).await;
    Ok(HttpResponse::Ok().json(endpoint))
}

/// The provider's own endpoint answers 409 `own_endpoint`: a provider
/// always keeps one.
pub async fn delete(
    state: web::Data<State>,
    access: OrgAccess<role::Admin>,
    id: ItemId,
    endpoint_id: EndpointId,
) -> Result<HttpResponse, ApiError> {
    state
        .db
        .delete_endpoint(
            access.org_id(),
            access.actor(),
            id.get()?,
            endpoint_id.get()?,
        )
        .await?;
    Ok(HttpResponse::NoContent().finish())
}
