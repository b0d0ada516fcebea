//! `POST /v1/chat/completions` (and every JSON endpoint) as its pipeline: authenticate → collect the
//! body → route → admit (spend controls) → forward → relay; observation wraps it all (`observe`).
//!
//! Client input: any `content-type` is accepted when the body is a JSON
//! object (SDKs send `application/json`, `curl -d` a form type); the body
//! must be UTF-8 and at most `max_body_bytes` (413, with or without a
//! `content-length`), and must arrive within `client_body_timeout` (408).
//! Valid JSON is not depth-limited here: the parts the gateway does not route
//! on are skipped without recursion and judged by the upstream.
//!
//! The audio uploads ([`proxy_upload`]) are the same pipeline with the body
//! streamed instead of collected: authenticate → read up to the `model`
//! field → route → admit → forward while the rest of the body streams
//! through (see [`crate::upload`]). An upload reserves no tokens up front
//! (its bytes are audio, not text): it is settled with the usage reported.

use std::sync::Arc;
use std::time::Instant;

use actix_web::http::header as ax;
use actix_web::http::StatusCode;
use actix_web::{web, HttpRequest, HttpResponse};

use crate::admit::{admit, admit_one, write_headers};
use crate::authenticate::authenticate;
use crate::cache::KeyEntry;
use crate::collect::read_body;
use crate::endpoint::Endpoint;
use crate::error::GatewayError;
use crate::forward::{forward, forward_upload, relay_headers, Answer};
use crate::observe::request_id;
use crate::relay::{RawRelay, Relay};
use crate::route::{provider_for, route, storable};
use crate::state::State;
use crate::upload::Upload;
use crate::usage::LogGuard;

/// Where every routed request starts: its key authenticated (the clock
/// already running), then its one usage row opened.
pub(crate) async fn open(
    gw: &State,
    req: &HttpRequest,
    endpoint: &'static str,
) -> Result<(Arc<KeyEntry>, LogGuard), GatewayError> {
    let start = Instant::now();
    let trace = gw.tracer.as_ref().map(|t| t.begin(req, endpoint));
    let key = match authenticate(gw, req).await {
        Ok(k) => k,
        Err(e) => {
            if let Some(t) = trace {
                t.refused(&request_id(req), endpoint, &e);
            }
            return Err(e);
        }
    };
    let mut log = LogGuard::new(
        gw.usage.clone(),
        gw.metrics.clone(),
        request_id(req),
        key.org_id,
        key.id,
        endpoint,
        start,
    );
    log.trace = trace;
    Ok((key, log))
}

/// Any JSON endpoint of [`Endpoint::ALL`], proxied to the same path upstream.
pub(crate) async fn proxy(
    endpoint: Endpoint,
    req: HttpRequest,
    payload: web::Payload,
    gw: web::Data<State>,
) -> Result<HttpResponse, GatewayError> {
    let (key, mut log) = open(&gw, &req, endpoint.path()).await?;
    let answer = async {
        let raw = tokio::time::timeout(gw.body_timeout, read_body(&req, payload, gw.max_body))
            .await
            .map_err(|_| GatewayError::BodyTimeout(gw.body_timeout))??;
        let routed = route(&gw, endpoint, &raw, &key, &mut log).await?;
        drop(raw);
        let limits = admit(&gw, &key, &routed, &mut log).await?;
        forward(&gw, routed, &mut log).await.map(|a| (a, limits))
    };
    let answer = answer.await;
    respond(&gw, endpoint, key.org_id, log, answer).await
}

/// Any multipart upload of [`Endpoint::UPLOADS`], streamed to the same path upstream.
pub(crate) async fn proxy_upload(
    endpoint: Endpoint,
    req: HttpRequest,
    mut payload: web::Payload,
    gw: web::Data<State>,
) -> Result<HttpResponse, GatewayError> {
    let (key, mut log) = open(&gw, &req, endpoint.path()).await?;
    let answer = async {
        let upload = Upload::read(&req, &mut payload, gw.max_body, gw.body_timeout, |m| {
            log.row.requested_model = Some(storable(m));
        })
        .await?;
        let provider = provider_for(&gw, &upload.model, upload.provider(), &key, &mut log).await?;
        let limits = admit_one(&gw, &key, &provider, 0, &mut log).await?;
        let (content_type, length) = (upload.content_type.clone(), upload.length());
        let (body, pump) = upload.stream(payload, provider.name.clone(), gw.client.timeout());
        forward_upload(
            &gw,
            endpoint,
            &provider,
            content_type,
            length,
            body,
            pump,
            &mut log,
        )
        .await
        .map(|a| (a, limits))
    };
    let answer = answer.await;
    respond(&gw, endpoint, key.org_id, log, answer).await
}

/// The client's answer with the spend controls' headers, and the row
/// finished (or handed to the relay that finishes it).
async fn respond(
    gw: &web::Data<State>,
    endpoint: Endpoint,
    org: uuid::Uuid,
    mut log: LogGuard,
    answer: Result<(Answer, limits::Headers), GatewayError>,
) -> Result<HttpResponse, GatewayError> {
    let (answer, limits) = match answer {
        Ok(a) => a,
        Err(e) => return Err(failed(gw, log, e)),
    };
    let served = log.served.take();
    let mut res = relay(gw, endpoint, org, log, answer).await;
    write_headers(&limits, res.headers_mut());
    if let Some(v) = served.and_then(|m| ax::HeaderValue::from_str(&m).ok()) {
        res.headers_mut()
            .insert(ax::HeaderName::from_static("x-llmgw-model"), v);
    }
    Ok(res)
}

/// The upstream's answer relayed: whole, or streamed by a relay that finishes the row.
async fn relay(
    gw: &web::Data<State>,
    endpoint: Endpoint,
    org: uuid::Uuid,
    log: LogGuard,
    answer: Answer,
) -> HttpResponse {
    match answer {
        Answer::Full(res) => {
            if endpoint == Endpoint::Responses {
                crate::responses::after_create(gw, org, &log, &res).await;
            }
            res
        }
        Answer::Stream {
            status,
            upstream,
            strip_usage,
        } => {
            let mut res =
                HttpResponse::build(StatusCode::from_u16(status).unwrap_or(StatusCode::OK));
            relay_headers(upstream.headers(), &mut res);
            res.insert_header((ax::CACHE_CONTROL, ax::HeaderValue::from_static("no-cache")));
            let watched = (endpoint == Endpoint::Responses)
                .then(|| crate::responses::Origin::of(&log))
                .flatten();
            let mut stream = Relay::new(
                upstream,
                log,
                gw.metrics.clone(),
                gw.client.timeout(),
                status,
                strip_usage,
            );
            if let Some(origin) = watched {
                stream = crate::responses::watch(stream, gw, org, origin);
            }
            res.streaming(stream)
        }
        Answer::Bytes { status, upstream } => {
            let mut res =
                HttpResponse::build(StatusCode::from_u16(status).unwrap_or(StatusCode::OK));
            relay_headers(upstream.headers(), &mut res);
            let stream = RawRelay::new(
                upstream,
                log,
                gw.metrics.clone(),
                gw.client.timeout(),
                status,
            );
            res.streaming(stream)
        }
    }
}

/// A request that failed before any answer: counted, and its row finished with the error's status and class.
pub(crate) fn failed(gw: &State, mut log: LogGuard, e: GatewayError) -> GatewayError {
    if let Some(kind) = e.upstream_kind() {
        gw.metrics.upstream_error(kind);
    }
    log.finish(
        actix_web::ResponseError::status_code(&e).as_u16(),
        Some(e.class()),
    );
    e
}
