//! Health, readiness, the OpenAPI document and the answer for unknown routes.

use actix_web::http::header::ContentType;
use actix_web::{web, HttpResponse};
use serde_json::json;

use crate::error::ApiError;
use crate::State;

pub async fn healthz() -> HttpResponse {
    HttpResponse::Ok().json(json!({"status": "ok"}))
}

pub async fn readyz(state: web::Data<State>) -> Result<HttpResponse, ApiError> {
    if state.db.ping().await {
        Ok(HttpResponse::Ok().json(json!({"status": "ready"})))
    } else {
        Err(ApiError::Unavailable(None))
    }
}

pub async fn openapi(state: web::Data<State>) -> HttpResponse {
    HttpResponse::Ok()
        .content_type(ContentType::json())
        .body(state.openapi.clone())
}

pub async fn route_not_found() -> Result<HttpResponse, ApiError> {
    Err(ApiError::RouteNotFound)
}
