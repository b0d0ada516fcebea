//! Stage 1: the key a client presented, checked against the key cache.

use std::sync::Arc;

use actix_web::http::header as ax;
use actix_web::HttpRequest;
use storage::secrets::{sha256, ApiKeySecret};

use crate::cache::KeyEntry;
use crate::error::GatewayError;
use crate::state::State;

/// The key a client presented: `Authorization: Bearer` first, then `x-api-key`.
fn presented_key(req: &HttpRequest) -> Option<&str> {
    let headers = req.headers();
    if let Some(v) = headers.get(ax::AUTHORIZATION).and_then(|v| v.to_str().ok()) {
        if let Some((scheme, rest)) = v.trim().split_once(' ') {
            if scheme.eq_ignore_ascii_case("bearer") && !rest.trim().is_empty() {
                return Some(rest.trim());
            }
        }
    }
    headers
        .get("x-api-key")
        .and_then(|v| v.to_str().ok())
        .map(str::trim)
        .filter(|k| !k.is_empty())
}

/// Authenticates the request's key (from the cache when known).
pub(crate) async fn authenticate(
    gw: &State,
    req: &HttpRequest,
) -> Result<Arc<KeyEntry>, GatewayError> {
    let key = presented_key(req).ok_or(GatewayError::MissingKey)?;
    // Anything that cannot be a gateway key is refused without a lookup.
    if !ApiKeySecret::is_plausible(key) {
        return Err(GatewayError::InvalidKey);
    }
    gw.keys
        .authenticate(&gw.db, &gw.metrics, &sha256(key))
        .await
}
