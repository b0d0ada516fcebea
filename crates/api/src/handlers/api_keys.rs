//! Gateway API keys. The key itself appears once, in the creation answer.

use actix_web::{web, HttpResponse};
use serde::Serialize;
use storage::api_keys::ApiKey;

use super::List;
use crate::error::ApiError;
use crate::extract::{role, Input, ItemId, OrgAccess, Query};
use crate::input::{CreateApiKey, PageQuery, PAGE_MAX};
use crate::State;

/// The creation answer: the key's fields plus the key, shown this once.
#[derive(Serialize)]
struct Created {
    #[serde(flatten)]
    api_key: ApiKey,
    key: String,
}

pub async fn list(
    state: web::Data<State>,
    access: OrgAccess<role::Member>,
    query: Query<PageQuery<PAGE_MAX>>,
) -> Result<HttpResponse, ApiError> {
    let q = query.into_inner()?;
    let page = state
        .db
        .list_api_keys(access.org_id(), q.cursor.as_ref(), q.limit)
        .await?;
    Ok(HttpResponse::Ok().json(List::page(page)))
}

pub async fn create(
    state: web::Data<State>,
    access: OrgAccess<role::Admin>,
    input: Input<CreateApiKey>,
) -> Result<HttpResponse, ApiError> {
    let input = input.into_inner()?;
    let (api_key, secret) = state
        .db
        .create_api_key(
            access.org_id(),
            access.actor(),
            &input.name,
            input.expires_at,
        )
        .await?;
    Ok(HttpResponse::Created().json(Created {
        api_key,
        key: secret.expose_secret().to_owned(),
    }))
}

pub async fn revoke(
    state: web::Data<State>,
    access: OrgAccess<role::Admin>,
    id: ItemId,
) -> Result<HttpResponse, ApiError> {
    let key = state
        .db
        .revoke_api_key(access.org_id(), access.actor(), id.get()?)
        .await?;
    Ok(HttpResponse::Ok().json(key))
}
