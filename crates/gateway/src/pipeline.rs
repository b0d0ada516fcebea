//! `POST /v1/chat/completions` (and every JSON endpoint) as its pipeline: authenticate → collect the
//! body → route → forward → relay; observation wraps it all (`observe`).
//!
//! Client input: any `content-type` is accepted when the body is a JSON
//! object (SDKs send `application/json`, `curl -d` a form type); the body
//! must be UTF-8 and at most `max_body_bytes` (413, with or without a
//! `content-length`), and must arrive within `client_body_timeout` (408).
//! Valid JSON is not depth-limited here: the parts the gateway does not route
//! on are skipped without recursion and judged by the upstream.

use std::time::Instant;

use actix_web::http::header as ax;
use actix_web::http::StatusCode;
use actix_web::{web, HttpRequest, HttpResponse};

use crate::authenticate::authenticate;
use crate::collect::read_body;
use crate::endpoint::Endpoint;
use crate::error::GatewayError;
use crate::forward::{forward, relay_headers, Answer};
use crate::observe::request_id;
use crate::relay::Relay;
use crate::route::route;
use crate::state::State;
use crate::usage::LogGuard;

/// Any JSON endpoint of [`Endpoint::ALL`], proxied to the same path upstream.
pub(crate) async fn proxy(
    endpoint: Endpoint,
    req: HttpRequest,
    payload: web::Payload,
    gw: web::Data<State>,
) -> Result<HttpResponse, GatewayError> {
    let start = Instant::now();
    let key = authenticate(&gw, &req).await?;
    let mut log = LogGuard::new(
        gw.usage.clone(),
        gw.metrics.clone(),
        request_id(&req),
        key.org_id,
        key.id,
        endpoint.path(),
        start,
    );
    let answer = async {
        let raw = tokio::time::timeout(gw.body_timeout, read_body(&req, payload, gw.max_body))
            .await
            .map_err(|_| GatewayError::BodyTimeout(gw.body_timeout))??;
        let routed = route(&gw, endpoint, &raw, key.org_id, &mut log).await?;
        drop(raw);
        forward(&gw, routed, &mut log).await
    };
    match answer.await {
        Ok(Answer::Full(res)) => {
            if endpoint == Endpoint::Responses {
                crate::responses::after_create(&gw, key.org_id, &log, &res).await;
            }
            Ok(res)
        }
        Ok(Answer::Stream {
            status,
            upstream,
            strip_usage,
        }) => {
            let mut res =
                HttpResponse::build(StatusCode::from_u16(status).unwrap_or(StatusCode::OK));
            relay_headers(upstream.headers(), &mut res);
            res.insert_header((ax::CACHE_CONTROL, ax::HeaderValue::from_static("no-cache")));
            let watched = (endpoint == Endpoint::Responses)
                .then(|| (log.row.provider_key_id, log.row.provider_name.clone()));
            let mut stream = Relay::new(
                upstream,
                log,
                gw.metrics.clone(),
                gw.client.timeout(),
                status,
                strip_usage,
            );
            if let Some((Some(provider_id), Some(name))) = watched {
                stream = crate::responses::watch(stream, &gw, key.org_id, provider_id, name);
            }
            Ok(res.streaming(stream))
        }
        Err(e) => {
            if let Some(kind) = e.upstream_kind() {
                gw.metrics.upstream_error(kind);
            }
            log.finish(
                actix_web::ResponseError::status_code(&e).as_u16(),
                Some(e.class()),
            );
            Err(e)
        }
    }
}
