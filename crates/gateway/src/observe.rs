//! Observation around every route: the request id (the client's when
//! sane), `X-Content-Type-Options`, the request metrics, one log line per
//! request; and the health and metrics endpoints.

use std::time::{Duration, Instant};

use actix_web::body::{BodySize, MessageBody};
use actix_web::dev::{Service, ServiceRequest, ServiceResponse};
use actix_web::http::header::{HeaderMap, HeaderName, HeaderValue, CONTENT_TYPE};
use actix_web::http::Version;
use actix_web::{web, HttpMessage, HttpRequest, HttpResponse};

use crate::error::ErrorNote;
use crate::state::State;

/// The request's id (client-provided when sane), kept in its extensions.
#[derive(Clone)]
pub(crate) struct RequestId(pub String);

fn sane_request_id(v: &HeaderValue) -> Option<&str> {
    let b = v.as_bytes();
    let ok = !b.is_empty()
        && b.len() <= 128
        && b.iter()
            .all(|c| c.is_ascii_alphanumeric() || matches!(c, b'-' | b'_' | b'.' | b':'));
    ok.then(|| v.to_str().ok()).flatten()
}

static X_REQUEST_ID: HeaderName = HeaderName::from_static("x-request-id");

/// Browsers must not guess a type for relayed bodies (an upstream's error
/// page rendered as HTML on the gateway's origin, say).
pub(crate) fn nosniff(headers: &mut HeaderMap) {
    headers.insert(
        actix_web::http::header::X_CONTENT_TYPE_OPTIONS,
        HeaderValue::from_static("nosniff"),
    );
}

/// A streamed answer's head lives as long as its stream (actix's HTTP/2
/// dispatcher holds it to the last chunk), and actix makes every header map
/// with room for 12 headers (3.4 KiB): a stream's gets one just big enough.
fn fit(headers: &mut HeaderMap) {
    let all = std::mem::take(headers);
    let mut fitted = HeaderMap::with_capacity(all.len_keys());
    for (name, value) in all {
        fitted.append(name, value);
    }
    *headers = fitted;
}

/// Middleware: request id, metrics and one log line per request.
pub(crate) fn observe<S, B>(
    req: ServiceRequest,
    srv: &S,
) -> impl std::future::Future<Output = Result<ServiceResponse<B>, actix_web::Error>>
where
    S: Service<ServiceRequest, Response = ServiceResponse<B>, Error = actix_web::Error>,
    B: MessageBody,
{
    let start = Instant::now();
    let id = match req.headers().get(&X_REQUEST_ID).and_then(sane_request_id) {
        Some(id) => id.to_owned(),
        None => uuid::Uuid::new_v4().to_string(),
    };
    let header = HeaderValue::from_str(&id).ok();
    req.extensions_mut().insert(RequestId(id));
    let metrics = req
        .app_data::<web::Data<State>>()
        .map(|d| d.metrics.clone());
    let fut = srv.call(req);
    async move {
        let mut res = fut.await?;
        if let Some(h) = header {
            res.headers_mut().insert(X_REQUEST_ID.clone(), h);
        }
        nosniff(res.headers_mut());
        // Only HTTP/2 keeps the head: HTTP/1.1 drops it once it is written.
        if res.request().version() == Version::HTTP_2
            && matches!(res.response().body().size(), BodySize::Stream)
        {
            fit(res.headers_mut());
        }
        let latency = start.elapsed();
        let status = res.status().as_u16();
        if let Some(m) = metrics {
            m.request(status, latency);
        }
        if tracing::enabled!(tracing::Level::INFO) {
            let rid = res
                .request()
                .extensions()
                .get::<RequestId>()
                .map(|r| r.0.clone())
                .unwrap_or_default();
            let note = res.response().extensions().get::<ErrorNote>().cloned();
            tracing::info!(
                request_id = %rid,
                method = %res.request().method(),
                path = res.request().path(),
                status,
                latency_us = latency.as_micros() as u64,
                error = note.as_ref().map(|n| n.code.as_str()),
                detail = note.as_ref().and_then(|n| n.detail.as_deref()),
                "gateway request"
            );
        }
        Ok(res)
    }
}

pub(crate) fn request_id(req: &HttpRequest) -> String {
    req.extensions()
        .get::<RequestId>()
        .map(|r| r.0.clone())
        .unwrap_or_else(|| uuid::Uuid::new_v4().to_string())
}

pub(crate) async fn healthz() -> HttpResponse {
    HttpResponse::Ok().json(serde_json::json!({"status": "ok"}))
}

pub(crate) async fn readyz(gw: web::Data<State>) -> HttpResponse {
    let up = tokio::time::timeout(Duration::from_secs(2), gw.db.ping())
        .await
        .unwrap_or(false);
    if up {
        HttpResponse::Ok().json(serde_json::json!({"status": "ready"}))
    } else {
        HttpResponse::ServiceUnavailable()
            .json(serde_json::json!({"status": "unavailable", "reason": "database unreachable"}))
    }
}

pub(crate) async fn metrics_text(gw: web::Data<State>) -> HttpResponse {
    HttpResponse::Ok()
        .insert_header((
            CONTENT_TYPE,
            HeaderValue::from_static("text/plain; version=0.0.4; charset=utf-8"),
        ))
        .body(gw.metrics.render(
            gw.usage.depth(),
            gw.usage.capacity(),
            &gw.limiter,
            &gw.health,
        ))
}
