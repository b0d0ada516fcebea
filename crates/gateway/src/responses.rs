//! The Responses API's follow-ups: `GET|DELETE /v1/responses/{id}`,
//! `POST /v1/responses/{id}/cancel`, `GET /v1/responses/{id}/input_items`.
//! They name no model, so they go to the provider that created the
//! response, which the gateway remembers per organization.
//!
//! Remembering: a `POST /v1/responses` answer that carries an `id` (the JSON
//! answer's `id`, or a stream's first `response.id`, from `response.created`)
//! records `(org, response id, provider key)` in `response_routes` and in
//! this replica's [`ResponseRoutes`] cache. A JSON answer is returned only
//! after its row is written (so any replica finds it at once); a stream is
//! not held back: its row is written by a spawned task as soon as the id is
//! seen, and a lookup that misses asks the database once more after
//! [`MISS_RETRY`], so a follow-up sent to another replica right after
//! `response.created` still finds it. A row that cannot be written is
//! logged; this replica still routes the id from its cache.
//!
//! Follow-ups: the route is looked up by org (another org's response id is
//! a 404 `response_not_found`, exactly like an unknown one), the provider is
//! taken from the provider cache and must still be usable (active, allowed
//! by the SSRF policy), and the request goes to
//! `{base}/v1/responses/{id}[/cancel|/input_items]` with the query string
//! passed through as sent (`after`, `limit`, `order`, `include[]`, `stream`).
//! Answers are relayed like other answers (error bodies redacted, event
//! streams streamed). Each follow-up writes one usage row, with the endpoint
//! `responses/{id}`, `responses/{id}/cancel` or `responses/{id}/input_items`
//! (the id itself is not in the endpoint: it would make every row its own
//! group) and no token counts (a retrieved response repeats the usage of
//! its creation, which was counted then).

use std::collections::{HashMap, VecDeque};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use actix_web::http::header as ax;
use actix_web::http::StatusCode;
use actix_web::{web, HttpRequest, HttpResponse};
use reqwest::header as rq;
use uuid::Uuid;

use crate::balance::Upstream;
use crate::cache::{bounded, ProviderEntry};
use crate::collect::{read_capped, UpstreamBody};
use crate::error::{ErrorClass, ErrorNote, GatewayError};
use crate::forward::{classify, redact, relay_headers, timed_out};
use crate::relay::Relay;
use crate::state::State;
use crate::usage::LogGuard;

/// How long a lookup that missed waits before asking the database again
/// (a stream's route row is written just after its id reaches the client).
pub(crate) const MISS_RETRY: Duration = Duration::from_millis(300);
/// Routes this replica remembers at most; the oldest go first.
const CACHE_MAX: usize = 16_384;
/// How long a cached route is trusted (the provider may be deleted meanwhile).
const CACHE_TTL: Duration = Duration::from_secs(600);
/// Longest response id recorded or looked up (the column allows as much).
const MAX_ID_LEN: usize = 256;

/// Whether a response id can be recorded and looked up: what providers use
/// (`resp_…`, uuids), short, and safe as one URL path segment.
pub(crate) fn plausible_id(id: &str) -> bool {
    !id.is_empty()
        && id.len() <= MAX_ID_LEN
        && id
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'_' | b'-' | b'.' | b':'))
        && id != "."
        && id != ".."
}

#[derive(serde::Deserialize)]
struct WithId {
    #[serde(default)]
    id: Option<String>,
}

#[derive(serde::Deserialize)]
struct Event {
    #[serde(default)]
    response: Option<WithId>,
}

/// The id of a non-streamed `POST /v1/responses` answer.
pub(crate) fn created_id(json: &[u8]) -> Option<String> {
    serde_json::from_slice::<WithId>(json)
        .ok()?
        .id
        .filter(|id| plausible_id(id))
}

/// The `response.id` of one streamed event's data.
pub(crate) fn streamed_id(data: &[u8]) -> Option<String> {
    // Cheap refusal of the many delta events before any parse.
    if !data.windows(10).any(|w| w == b"\"response\"") {
        return None;
    }
    serde_json::from_slice::<Event>(data.trim_ascii())
        .ok()?
        .response?
        .id
        .filter(|id| plausible_id(id))
}

/// Where a response lives: its provider's id and (current) name.
#[derive(Debug, Clone)]
struct Target {
    origin: Origin,
    cached: Instant,
}

/// Where a response was created: its provider, and the endpoint of it.
#[derive(Debug, Clone)]
pub(crate) struct Origin {
    pub provider_id: Uuid,
    pub provider_name: String,
    pub endpoint_id: Option<Uuid>,
}

impl Origin {
    /// Where the row says the request went (the provider, and the endpoint that answered).
    pub fn of(log: &LogGuard) -> Option<Self> {
        Some(Self {
            provider_id: log.row.provider_key_id?,
            provider_name: log.row.provider_name.clone()?,
            endpoint_id: log.endpoint_id,
        })
    }
}

/// This replica's routes, size-capped (first in, first out): a follow-up
/// to a known response costs no database read.
pub(crate) struct ResponseRoutes {
    inner: Mutex<Routes>,
}

#[derive(Default)]
struct Routes {
    map: HashMap<(Uuid, String), Target>,
    order: VecDeque<(Uuid, String)>,
}

impl ResponseRoutes {
    pub fn new() -> Self {
        Self {
            inner: Mutex::new(Routes::default()),
        }
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, Routes> {
        self.inner.lock().unwrap_or_else(|p| p.into_inner())
    }

    fn get(&self, org: Uuid, id: &str) -> Option<Target> {
        self.lock()
            .map
            .get(&(org, id.to_owned()))
            .filter(|t| t.cached.elapsed() < CACHE_TTL)
            .cloned()
    }

    fn insert(&self, org: Uuid, id: &str, origin: &Origin) {
        let mut r = self.lock();
        let key = (org, id.to_owned());
        let target = Target {
            origin: origin.clone(),
            cached: Instant::now(),
        };
        if r.map.insert(key.clone(), target).is_none() {
            r.order.push_back(key);
        }
        while r.map.len() > CACHE_MAX {
            let Some(old) = r.order.pop_front() else {
                break;
            };
            r.map.remove(&old);
        }
    }

    fn remove(&self, org: Uuid, id: &str) {
        let mut r = self.lock();
        let key = (org, id.to_owned());
        if r.map.remove(&key).is_some() {
            r.order.retain(|k| k != &key);
        }
    }
}

/// Remembers in this replica where `id` was created for `org`.
pub(crate) fn remember_here(gw: &State, org: Uuid, id: &str, origin: &Origin) {
    gw.responses.insert(org, id, origin);
}

/// Writes the route row (bounded in time; a failure is logged, not returned:
/// the answer has been made, and this replica still routes the id).
pub(crate) async fn record(gw: &State, org: Uuid, id: &str, origin: &Origin) {
    let written = bounded(async {
        gw.db
            .insert_response_route(org, id, origin.provider_id, origin.endpoint_id)
            .await
            .map_err(|e| tracing::warn!(error = %e, response_id = id, "cannot record the response's provider"))
    })
    .await;
    if written.is_err() {
        tracing::warn!(
            response_id = id,
            "response route not written: follow-ups reach this response through this replica only"
        );
    }
}

/// Remembers a JSON answer's response id before the answer is returned.
pub(crate) async fn remember(gw: &State, org: Uuid, id: &str, origin: &Origin) {
    remember_here(gw, org, id, origin);
    record(gw, org, id, origin).await;
}

/// The provider that created `id` for `org`, if any.
async fn target(gw: &State, org: Uuid, id: &str) -> Result<Option<Target>, GatewayError> {
    if let Some(t) = gw.responses.get(org, id) {
        return Ok(Some(t));
    }
    let lookup = || async {
        bounded(async {
            gw.db.response_route(org, id).await.map_err(|e| {
                tracing::warn!(error = %e, "response route lookup failed");
            })
        })
        .await
        .map_err(|()| GatewayError::Unavailable)
    };
    let found = match lookup().await? {
        Some(r) => Some(r),
        None => {
            tokio::time::sleep(MISS_RETRY).await;
            lookup().await?
        }
    };
    Ok(found.map(|r| {
        let origin = Origin {
            provider_id: r.provider_key_id,
            provider_name: r.provider_name,
            endpoint_id: r.endpoint_id,
        };
        gw.responses.insert(org, id, &origin);
        Target {
            origin,
            cached: Instant::now(),
        }
    }))
}

/// The endpoint that created `id` for `org` (for `previous_response_id`):
/// `None` when unknown or unreadable (the balancer then chooses).
pub(crate) async fn endpoint_of(gw: &State, org: Uuid, id: &str) -> Option<Uuid> {
    if !plausible_id(id) {
        return None;
    }
    target(gw, org, id).await.ok()??.origin.endpoint_id
}

/// The provider for a response, usable now; 404 when there is none.
async fn provider_for(
    gw: &State,
    org: Uuid,
    id: &str,
    log: &mut LogGuard,
) -> Result<(Arc<ProviderEntry>, Option<Uuid>), GatewayError> {
    let not_found = || GatewayError::ResponseNotFound(id.to_owned());
    if !plausible_id(id) {
        return Err(GatewayError::ResponseNotFound(crate::route::storable(
            &id.chars().take(64).collect::<String>(),
        )));
    }
    let mut t = target(gw, org, id).await?.ok_or_else(not_found)?.origin;
    log.row.provider_key_id = Some(t.provider_id);
    log.row.provider_name = Some(t.provider_name.clone());
    let by_name = |name: String| async move {
        gw.providers
            .get(&gw.db, &gw.client, &gw.metrics, org, &name)
            .await
    };
    let mut provider = by_name(t.provider_name.clone()).await?;
    if provider.as_ref().map(|p| p.id) != Some(t.provider_id) {
        // The cached name moved (the provider was renamed): ask the database once.
        gw.responses.remove(org, id);
        t = target(gw, org, id).await?.ok_or_else(not_found)?.origin;
        log.row.provider_name = Some(t.provider_name.clone());
        provider = by_name(t.provider_name.clone()).await?;
    }
    let provider = provider
        .filter(|p| p.id == t.provider_id)
        .ok_or_else(not_found)?;
    crate::route::usable(&provider)?;
    Ok((provider, t.endpoint_id))
}

/// Registers the follow-up routes (`POST /v1/responses` is a JSON endpoint).
pub(crate) fn configure(cfg: &mut web::ServiceConfig) {
    let to = |action: FollowUp| {
        move |req: HttpRequest, id: web::Path<String>, gw: web::Data<State>| {
            follow_up(action, req, id, gw)
        }
    };
    cfg.service(
        web::resource("/v1/responses/{id}")
            .route(web::get().to(to(FollowUp::Retrieve)))
            .route(web::delete().to(to(FollowUp::Delete)))
            .default_service(web::to(crate::route::method_not_allowed)),
    )
    .service(
        web::resource("/v1/responses/{id}/cancel")
            .route(web::post().to(to(FollowUp::Cancel)))
            .default_service(web::to(crate::route::method_not_allowed)),
    )
    .service(
        web::resource("/v1/responses/{id}/input_items")
            .route(web::get().to(to(FollowUp::InputItems)))
            .default_service(web::to(crate::route::method_not_allowed)),
    );
}

/// One follow-up route.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum FollowUp {
    Retrieve,
    Delete,
    Cancel,
    InputItems,
}

impl FollowUp {
    /// `request_logs.endpoint` for it.
    fn endpoint(self) -> &'static str {
        match self {
            Self::Retrieve | Self::Delete => "responses/{id}",
            Self::Cancel => "responses/{id}/cancel",
            Self::InputItems => "responses/{id}/input_items",
        }
    }

    fn suffix(self) -> &'static str {
        match self {
            Self::Retrieve | Self::Delete => "",
            Self::Cancel => "/cancel",
            Self::InputItems => "/input_items",
        }
    }

    fn method(self) -> reqwest::Method {
        match self {
            Self::Retrieve | Self::InputItems => reqwest::Method::GET,
            Self::Delete => reqwest::Method::DELETE,
            Self::Cancel => reqwest::Method::POST,
        }
    }
}

/// Any follow-up, sent to the provider that created the response.
pub(crate) async fn follow_up(
    action: FollowUp,
    req: HttpRequest,
    id: web::Path<String>,
    gw: web::Data<State>,
) -> Result<HttpResponse, GatewayError> {
    let (key, mut log) = crate::pipeline::open(&gw, &req, action.endpoint()).await?;
    let answer = async {
        let (provider, endpoint) = provider_for(&gw, key.org_id, &id, &mut log).await?;
        let up = provider.upstream_or_primary(endpoint);
        log.endpoint_id = Some(up.id);
        log.attempts = 1;
        send(&gw, action, &req, &id, &provider, up, &mut log).await
    };
    match answer.await {
        Ok(Sent::Full(res)) => Ok(res),
        Ok(Sent::Stream(status, upstream)) => {
            log.row.streamed = true;
            let mut res =
                HttpResponse::build(StatusCode::from_u16(status).unwrap_or(StatusCode::OK));
            relay_headers(upstream.headers(), &mut res);
            res.insert_header((ax::CACHE_CONTROL, ax::HeaderValue::from_static("no-cache")));
            let stream = Relay::new(
                upstream,
                log,
                gw.metrics.clone(),
                gw.client.timeout(),
                status,
                false,
            )
            .without_usage();
            Ok(res.streaming(stream))
        }
        Err(e) => Err(crate::pipeline::failed(&gw, log, e)),
    }
}

enum Sent {
    Full(HttpResponse),
    Stream(u16, reqwest::Response),
}

async fn send(
    gw: &State,
    action: FollowUp,
    req: &HttpRequest,
    id: &str,
    provider: &ProviderEntry,
    up: &Upstream,
    log: &mut LogGuard,
) -> Result<Sent, GatewayError> {
    let timeout = gw.client.timeout();
    let request_id = log.row.request_id.clone();
    let mut url = up
        .base_url
        .endpoint(&format!("responses/{id}{}", action.suffix()));
    let query = req.query_string();
    if !query.is_empty() {
        url.push('?');
        url.push_str(query);
    }
    let url = reqwest::Url::parse(&url)
        .map_err(|_| GatewayError::ProviderMisconfigured(provider.name.clone()))?;
    let trace = log.begin_attempt(&action.method(), &up.chat_url);
    let mut rb =
        crate::forward::request(gw, action.method(), url, provider, up, &request_id, trace).header(
            rq::ACCEPT,
            rq::HeaderValue::from_static("application/json, text/event-stream"),
        );
    if action == FollowUp::Cancel {
        // OpenAI's cancel takes no body; some servers want a JSON type all the same.
        rb = rb
            .header(
                rq::CONTENT_TYPE,
                rq::HeaderValue::from_static("application/json"),
            )
            .body("{}");
    }
    let fail = |e: reqwest::Error| classify(&e, &provider.name, timeout, &request_id);
    let deadline = tokio::time::Instant::now() + timeout;
    let upstream = match tokio::time::timeout_at(deadline, rb.send()).await {
        Ok(r) => r.map_err(fail),
        Err(_) => Err(timed_out(&provider.name, timeout)),
    };
    log.attempt_result(&upstream);
    let upstream = upstream?;
    let status = upstream.status().as_u16();
    if (300..400).contains(&status) {
        return Err(GatewayError::UpstreamRedirect {
            provider: provider.name.clone(),
            status,
        });
    }
    let success = (200..300).contains(&status);
    let event_stream = upstream
        .headers()
        .get(rq::CONTENT_TYPE)
        .and_then(|v| v.to_str().ok())
        .is_some_and(|v| v.trim_start().starts_with("text/event-stream"));
    if success && event_stream {
        // `GET /v1/responses/{id}?stream=true` replays a background response.
        return Ok(Sent::Stream(status, upstream));
    }
    log.set_ttfb();
    gw.metrics.upstream_ttfb.observe(log.elapsed());
    let headers = upstream.headers().clone();
    let body = match tokio::time::timeout_at(deadline, read_capped(upstream, gw.max_response)).await
    {
        Ok(Ok(b)) => b,
        Ok(Err(UpstreamBody::Failed(e))) => return Err(fail(e)),
        Ok(Err(UpstreamBody::TooLarge)) => {
            return Err(GatewayError::UpstreamTooLarge {
                provider: provider.name.clone(),
                limit: gw.max_response,
            })
        }
        Err(_) => return Err(timed_out(&provider.name, timeout)),
    };
    let mut res =
        HttpResponse::build(StatusCode::from_u16(status).unwrap_or(StatusCode::BAD_GATEWAY));
    relay_headers(&headers, &mut res);
    let class = (!success).then_some(ErrorClass::UpstreamStatus);
    log.finish(status, class);
    let mut res = res.body(if success {
        body
    } else {
        redact(body, provider.secrets())
    });
    if let Some(code) = class {
        res.extensions_mut()
            .insert(ErrorNote { code, detail: None });
    }
    Ok(Sent::Full(res))
}

/// The response id a `POST /v1/responses` JSON answer created, carried in
/// its extensions from `forward` to the pipeline, which remembers it.
#[derive(Debug, Clone)]
pub(crate) struct Created(pub String);

/// Remembers the response a `POST /v1/responses` answer created: a JSON
/// answer's (before it is returned), or, for a stream, has the relay
/// remember it when it passes.
pub(crate) async fn after_create(
    gw: &web::Data<State>,
    org: Uuid,
    log: &LogGuard,
    res: &HttpResponse,
) {
    let Some(origin) = Origin::of(log) else {
        return;
    };
    let id = res.extensions().get::<Created>().map(|c| c.0.clone());
    if let Some(id) = id {
        remember(gw, org, &id, &origin).await;
    }
}

/// The relay of a streamed `POST /v1/responses`, remembering the response
/// as soon as its id passes: in this replica at once, in the database by a
/// spawned write (the stream is not held back for it; see the module doc).
pub(crate) fn watch(relay: Relay, gw: &web::Data<State>, org: Uuid, origin: Origin) -> Relay {
    let gw = gw.clone();
    relay.on_response_id(move |id| {
        remember_here(&gw, org, &id, &origin);
        let origin = origin.clone();
        tokio::spawn(async move { record(&gw, org, &id, &origin).await });
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ids_are_taken_from_answers_and_events() {
        assert_eq!(
            created_id(br#"{"id":"resp_abc","object":"response"}"#).as_deref(),
            Some("resp_abc")
        );
        assert_eq!(created_id(br#"{"id":"../x"}"#), None);
        assert_eq!(created_id(b"not json"), None);
        assert_eq!(
            streamed_id(br#" {"type":"response.created","response":{"id":"resp_1"}}"#).as_deref(),
            Some("resp_1")
        );
        assert_eq!(
            streamed_id(br#"{"type":"response.output_text.delta","delta":"hi"}"#),
            None
        );
    }

    #[test]
    fn implausible_ids_are_refused() {
        for bad in ["", ".", "..", "a/b", "a?b", "a b", "é", &"x".repeat(257)] {
            assert!(!plausible_id(bad), "{bad}");
        }
        for good in ["resp_0123abcd", "3f2a-11ee", "r.1:2"] {
            assert!(plausible_id(good), "{good}");
        }
    }

    #[test]
    fn the_route_cache_is_bounded_and_forgets_the_oldest() {
        let c = ResponseRoutes::new();
        let org = Uuid::new_v4();
        let origin = Origin {
            provider_id: Uuid::new_v4(),
            provider_name: "mycompany".into(),
            endpoint_id: None,
        };
        for i in 0..CACHE_MAX + 10 {
            c.insert(org, &format!("resp_{i}"), &origin);
        }
        assert_eq!(c.lock().map.len(), CACHE_MAX);
        assert_eq!(c.lock().order.len(), CACHE_MAX);
        assert!(c.get(org, "resp_0").is_none());
        assert!(c.get(org, &format!("resp_{}", CACHE_MAX + 9)).is_some());
        assert!(c.get(Uuid::new_v4(), "resp_20").is_none(), "keyed by org");
        c.remove(org, "resp_20");
        assert!(c.get(org, "resp_20").is_none());
        assert_eq!(c.lock().order.len(), CACHE_MAX - 1);
    }
}
