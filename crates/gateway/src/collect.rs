//! Bodies read whole, with a cap: the client's request (bounded in size,
//! the caller bounds it in time) and, from `upstream::body`, non-streamed
//! upstream answers.

use actix_web::http::header as ax;
use actix_web::{web, HttpRequest};
use bytes::Bytes;
use futures_util::StreamExt;
use upstream::body::{Collect, TooLarge};

use crate::error::GatewayError;

pub(crate) use upstream::body::{read_capped, UpstreamBody};

/// Reads the client's body, refusing more than `limit` bytes. Callers bound
/// it in time: a client that stalls mid-body must not hold the request forever.
pub(crate) async fn read_body(
    req: &HttpRequest,
    mut payload: web::Payload,
    limit: usize,
) -> Result<Bytes, GatewayError> {
    let declared = req
        .headers()
        .get(ax::CONTENT_LENGTH)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.parse::<usize>().ok());
    if declared.is_some_and(|n| n > limit) {
        return Err(GatewayError::PayloadTooLarge(limit));
    }
    let mut body = Collect::new(limit, declared);
    while let Some(chunk) = payload.next().await {
        let chunk = chunk.map_err(|e| GatewayError::BadBody(e.to_string()))?;
        body.push(chunk)
            .map_err(|TooLarge| GatewayError::PayloadTooLarge(limit))?;
    }
    Ok(body.finish())
}
