//! `GET /v1/models`: the org's active providers' models as `{name}/{id}`;
//! `GET /v1/models/{customName}/{modelName}`: one of them ([`retrieve_model`]).
//! Both ask the provider through [`upstream::models`]. Neither writes a
//! usage row: they are lookups, not model calls (DESIGN counts no usage for
//! them); the request metrics and the log line count them like every route.
//!
//! A provider that fails (unreachable, error status, not a model list, a list
//! over [`MAX_MODELS_BYTES`]) is left out of the list and logged; the rest are listed.
//!
//! A key with `allowed_models` sees only the ids its patterns match: the
//! org's whole list is cached per org and filtered per request after the
//! cache ([`scoped`]), so one key's scope never reaches another key's answer.
//! Retrieving a model outside the scope is 404 `model_not_found`, as for a
//! model that does not exist (OpenAI answers 404 for models a key cannot
//! see), so a key cannot probe what it may not use.

use std::collections::HashMap;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Mutex;
use std::time::{Duration, Instant};

use actix_web::http::header::{HeaderValue, CONTENT_TYPE};
use actix_web::{web, HttpRequest, HttpResponse};
use bytes::Bytes;
use serde_json::{Map, Value};
use uuid::Uuid;

use actix_web::http::StatusCode;
use upstream::body::UpstreamBody;
use upstream::models::{ModelList, ModelsProbe, ProbeError, MAX_MODELS_BYTES, PROBE_TIMEOUT};

use crate::authenticate::authenticate;
use crate::balance::Upstream;
use crate::cache::{KeyEntry, ProviderEntry};
use crate::error::{ErrorClass, ErrorNote, GatewayError};
use crate::forward::{classify, redact, relay_headers};
use crate::observe::request_id;
use crate::state::State;
/// How long a list missing a failed provider is reused: long enough that a
/// dead provider does not make every call fan out, short enough to notice it is back.
const INCOMPLETE_TTL: Duration = Duration::from_secs(5);

/// One org's answer and until when it may be reused.
struct Cached {
    expires: Instant,
    body: Bytes,
}

/// Each org's last answer, reused for a short while. Invalidation vs.
/// in-flight fetches: `evict`/`flush` bump `epoch` under the map lock, and a
/// fetched answer is stored only if the epoch it started under is still current.
pub(crate) struct ModelsCache {
    ttl: Duration,
    map: Mutex<HashMap<Uuid, Cached>>,
    epoch: AtomicU64,
}

impl ModelsCache {
    pub fn new(ttl: Duration) -> Self {
        Self {
            ttl,
            map: Mutex::new(HashMap::new()),
            epoch: AtomicU64::new(0),
        }
    }

    fn map(&self) -> std::sync::MutexGuard<'_, HashMap<Uuid, Cached>> {
        self.map.lock().unwrap_or_else(|p| p.into_inner())
    }

    fn get(&self, org: Uuid) -> Option<Bytes> {
        self.map()
            .get(&org)
            .filter(|c| Instant::now() < c.expires)
            .map(|c| c.body.clone())
    }

    /// The epoch a fetch starts under, to hand back to `insert`.
    fn epoch(&self) -> u64 {
        self.epoch.load(Ordering::Acquire)
    }

    /// Stores an answer unless an invalidation arrived since `epoch` was read.
    fn insert(&self, org: Uuid, epoch: u64, body: Bytes, complete: bool) {
        let ttl = if complete {
            self.ttl
        } else {
            self.ttl.min(INCOMPLETE_TTL)
        };
        let mut map = self.map();
        if self.epoch.load(Ordering::Acquire) == epoch {
            map.insert(
                org,
                Cached {
                    expires: Instant::now() + ttl,
                    body,
                },
            );
        }
    }

    pub fn evict(&self, org: Uuid) {
        let mut map = self.map();
        self.epoch.fetch_add(1, Ordering::AcqRel);
        map.remove(&org);
    }

    pub fn flush(&self) {
        let mut map = self.map();
        self.epoch.fetch_add(1, Ordering::AcqRel);
        map.clear();
    }
}

fn json(body: Bytes) -> HttpResponse {
    HttpResponse::Ok()
        .insert_header((CONTENT_TYPE, HeaderValue::from_static("application/json")))
        .body(body)
}

pub(crate) async fn list_models(
    req: HttpRequest,
    gw: web::Data<State>,
) -> Result<HttpResponse, GatewayError> {
    let key = authenticate(&gw, &req).await?;
    if let Some(body) = gw.models.get(key.org_id) {
        return Ok(json(scoped(&key, body)));
    }
    // Read before the providers are: a change after this point is not cached over.
    let epoch = gw.models.epoch();
    let providers = crate::cache::bounded(async {
        gw.db.active_providers(key.org_id).await.map_err(|e| {
            tracing::warn!(error = %e, "cannot list providers");
        })
    })
    .await
    .map_err(|()| GatewayError::Unavailable)?;
    let fetches = providers
        .into_iter()
        .filter_map(|p| ProviderEntry::prepare(p, &gw.client, &gw.health))
        .map(|p| fetch(&gw.client, p));
    let lists = futures_util::future::join_all(fetches).await;
    let complete = lists.iter().all(Option::is_some);
    let data: Vec<Value> = lists.into_iter().flatten().flatten().collect();
    let body = Bytes::from(
        serde_json::to_vec(&serde_json::json!({"object": "list", "data": data}))
            .unwrap_or_default(),
    );
    // A list missing a failed provider is reused only briefly, then retried.
    gw.models.insert(key.org_id, epoch, body.clone(), complete);
    Ok(json(scoped(&key, body)))
}

/// The org's list as `key` may see it: only the ids its `allowed_models` match.
fn scoped(key: &KeyEntry, body: Bytes) -> Bytes {
    if key.allows_all() {
        return body;
    }
    // The body is the gateway's own `{"object":"list","data":[...]}`.
    let Ok(mut list) = serde_json::from_slice::<Map<String, Value>>(&body) else {
        return body;
    };
    if let Some(Value::Array(data)) = list.get_mut("data") {
        data.retain(|m| {
            m.get("id")
                .and_then(Value::as_str)
                .is_some_and(|id| key.allows(id))
        });
    }
    Bytes::from(serde_json::to_vec(&list).unwrap_or_default())
}

/// Logs why a provider is missing from the list: its class and the whole cause chain.
fn skipped(p: &ProviderEntry, e: &reqwest::Error) {
    tracing::warn!(
        provider = %p.name,
        class = %upstream::UpstreamFailure::of(e).class,
        error = %upstream::error_chain(e),
        "skipping provider in /v1/models"
    );
}

/// A provider's model entry as the gateway shows it: `id` prefixed with
/// `{name}/`, `object` and `owned_by` filled in when the provider left them out.
fn renamed(name: &str, mut m: Map<String, Value>) -> Option<Value> {
    let id = format!("{name}/{}", m.get("id")?.as_str()?);
    m.insert("id".into(), Value::String(id));
    m.entry("object")
        .or_insert_with(|| Value::String("model".into()));
    m.entry("owned_by")
        .or_insert_with(|| Value::String(name.to_owned()));
    Some(Value::Object(m))
}

/// The models call to an endpoint (the provider's own for its lists).
pub(crate) fn probe<'a>(u: &'a Upstream, client: &'a upstream::UpstreamClient) -> ModelsProbe<'a> {
    ModelsProbe {
        client,
        base_url: &u.base_url,
        auth: &u.auth,
        connect: u.connect,
    }
}

/// One provider's models, renamed `{name}/{id}`; `None` (logged) when it fails.
async fn fetch(client: &upstream::UpstreamClient, p: ProviderEntry) -> Option<Vec<Value>> {
    if let Some(failure) = &p.refused() {
        tracing::warn!(provider = %p.name, class = %failure.class, "skipping provider in /v1/models");
        return None;
    }
    let answer = match probe(p.primary(), client).list().await {
        Ok(a) => a,
        Err(ProbeError::Send(e)) => {
            skipped(&p, &e);
            return None;
        }
        Err(e) => {
            tracing::warn!(provider = %p.name, error = %e, "skipping provider in /v1/models");
            return None;
        }
    };
    if !answer.is_success() {
        let class = upstream::FailureClass::Status(answer.status);
        tracing::warn!(provider = %p.name, %class, "skipping provider in /v1/models");
        return None;
    }
    match &answer.body {
        Ok(_) => {}
        Err(UpstreamBody::TooLarge) => {
            tracing::warn!(provider = %p.name, limit = MAX_MODELS_BYTES, "skipping provider in /v1/models: its list is too large");
            return None;
        }
        Err(UpstreamBody::Failed(e)) => {
            skipped(&p, e);
            return None;
        }
    }
    let Some(list) = answer.list() else {
        tracing::warn!(provider = %p.name, "skipping provider in /v1/models: not an OpenAI model list");
        return None;
    };
    Some(list.models().filter_map(|m| renamed(&p.name, m)).collect())
}

/// `GET /v1/models/{customName}/{modelName}`: one model, from the
/// provider's `GET /v1/models/{modelName}`, its `id` prefixed back. SDKs
/// percent-encode the `/` in the id and some do not, so the whole path
/// tail is taken and decoded once, then split at its first `/`. A provider
/// without that route (vLLM answers 404 or 405) is answered from its list;
/// a model in neither is 404 `model_not_found`.
///
/// Like `GET /v1/models`, this writes no usage row: it is a lookup, not a
/// model call (DESIGN's endpoint table counts no usage for it). It is
/// counted in the request metrics and the log line like every route.
pub(crate) async fn retrieve_model(
    req: HttpRequest,
    gw: web::Data<State>,
) -> Result<HttpResponse, GatewayError> {
    let key = authenticate(&gw, &req).await?;
    let answer = async {
        let tail = req
            .uri()
            .path()
            .strip_prefix("/v1/models/")
            .unwrap_or_default();
        let model = percent_decode(tail);
        let Some((name, upstream_model)) = model.split_once('/') else {
            return Err(GatewayError::ModelWithoutProvider(model));
        };
        if !key.allows(&model) {
            return Err(GatewayError::ModelNotVisible(model));
        }
        let p = crate::route::provider_named(&gw, key.org_id, &model, name).await?;
        crate::route::usable(&p)?;
        retrieve(&gw, &p, &model, upstream_model, &request_id(&req)).await
    };
    answer.await.inspect_err(|e| {
        if let Some(kind) = e.upstream_kind() {
            gw.metrics.upstream_error(kind);
        }
    })
}

async fn retrieve(
    gw: &State,
    p: &ProviderEntry,
    model: &str,
    upstream_model: &str,
    request_id: &str,
) -> Result<HttpResponse, GatewayError> {
    let not_found = || GatewayError::UpstreamModelNotFound {
        model: model.to_owned(),
        provider: p.name.clone(),
    };
    let probe = probe(p.primary(), &gw.client);
    let fail = |e: ProbeError| match e {
        ProbeError::BadModel => not_found(),
        ProbeError::BadUrl => GatewayError::ProviderMisconfigured(p.name.clone()),
        ProbeError::Send(e) => classify(
            &e,
            &p.name,
            gw.client.timeout().min(PROBE_TIMEOUT),
            request_id,
        ),
    };
    let one = probe.retrieve(upstream_model).await.map_err(fail)?;
    if one.is_success() {
        let body = answered_body(gw, p, one.body, request_id)?;
        return Ok(match serde_json::from_slice::<Map<String, Value>>(&body) {
            Ok(mut m) => {
                m.entry("id")
                    .or_insert_with(|| Value::String(upstream_model.to_owned()));
                match renamed(&p.name, m) {
                    Some(v) => json(Bytes::from(serde_json::to_vec(&v).unwrap_or_default())),
                    None => relayed(p, one.status, &one.headers, body),
                }
            }
            // Not a model object: relayed as sent, as other answers are.
            Err(_) => relayed(p, one.status, &one.headers, body),
        });
    }
    if !matches!(one.status, 404 | 405) {
        let body = answered_body(gw, p, one.body, request_id)?;
        return Ok(relayed(p, one.status, &one.headers, body));
    }
    // No retrieve route (or no such model): the list decides.
    let all = probe.list().await.map_err(fail)?;
    if !all.is_success() {
        let body = answered_body(gw, p, all.body, request_id)?;
        return Ok(relayed(p, all.status, &all.headers, body));
    }
    let body = answered_body(gw, p, all.body, request_id)?;
    ModelList::parse(&body)
        .and_then(|l| l.find(upstream_model))
        .and_then(|m| renamed(&p.name, m))
        .map(|v| json(Bytes::from(serde_json::to_vec(&v).unwrap_or_default())))
        .ok_or_else(not_found)
}

/// A models answer's body, or why it could not be read.
fn answered_body(
    gw: &State,
    p: &ProviderEntry,
    body: Result<Bytes, UpstreamBody>,
    request_id: &str,
) -> Result<Bytes, GatewayError> {
    body.map_err(|e| match e {
        UpstreamBody::TooLarge => GatewayError::UpstreamTooLarge {
            provider: p.name.clone(),
            limit: MAX_MODELS_BYTES,
        },
        UpstreamBody::Failed(e) => classify(
            &e,
            &p.name,
            gw.client.timeout().min(PROBE_TIMEOUT),
            request_id,
        ),
    })
}

/// An upstream answer relayed as other routes relay them: its status, its
/// content type, and an error body without the provider's token in it.
fn relayed(
    p: &ProviderEntry,
    status: u16,
    headers: &reqwest::header::HeaderMap,
    body: Bytes,
) -> HttpResponse {
    let success = (200..300).contains(&status);
    let mut res =
        HttpResponse::build(StatusCode::from_u16(status).unwrap_or(StatusCode::BAD_GATEWAY));
    relay_headers(headers, &mut res);
    let mut res = res.body(if success {
        body
    } else {
        redact(body, p.secrets())
    });
    if !success {
        res.extensions_mut().insert(ErrorNote {
            code: ErrorClass::UpstreamStatus,
            detail: None,
        });
    }
    res
}

/// `%XX` sequences decoded once (others kept as they are); bytes that are
/// not UTF-8 become U+FFFD (such a model cannot exist anywhere).
fn percent_decode(s: &str) -> String {
    let b = s.as_bytes();
    let mut out = Vec::with_capacity(b.len());
    let mut i = 0;
    while i < b.len() {
        let hex = |c: u8| char::from(c).to_digit(16).map(|d| d as u8);
        if b[i] == b'%' && i + 2 < b.len() {
            if let (Some(h), Some(l)) = (hex(b[i + 1]), hex(b[i + 2])) {
                out.push(h << 4 | l);
                i += 3;
                continue;
            }
        }
        out.push(b[i]);
        i += 1;
    }
    String::from_utf8_lossy(&out).into_owned()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn percent_decoding_is_done_once_and_tolerates_stray_percents() {
        assert_eq!(
            percent_decode("mycompany%2Fmeta-llama%2FLlama-3"),
            "mycompany/meta-llama/Llama-3"
        );
        assert_eq!(percent_decode("a/b%252F"), "a/b%2F");
        assert_eq!(percent_decode("100%"), "100%");
        assert_eq!(percent_decode("x%4"), "x%4");
        assert_eq!(percent_decode("x%zz%41"), "x%zzA");
        assert_eq!(percent_decode("%ff"), "\u{fffd}");
    }
}
