//! `GET /v1/models`: the org's active providers' models as `{name}/{id}`.
//!
//! A provider that fails (unreachable, error status, not a model list, a list
//! over [`MAX_LIST_BYTES`]) is left out and logged; the rest are listed.

use std::collections::HashMap;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Mutex;
use std::time::{Duration, Instant};

use actix_web::http::header::{HeaderValue, CONTENT_TYPE};
use actix_web::{web, HttpRequest, HttpResponse};
use bytes::Bytes;
use serde_json::{Map, Value};
use uuid::Uuid;

use crate::authenticate::authenticate;
use crate::cache::ProviderEntry;
use crate::collect::{read_capped, UpstreamBody};
use crate::error::GatewayError;
use crate::state::State;

/// Longest wait for one provider's model list.
const PER_PROVIDER_TIMEOUT: Duration = Duration::from_secs(10);
/// Largest model list read from one provider; a larger one counts as a failure.
const MAX_LIST_BYTES: usize = 4 * 1024 * 1024;
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
        return Ok(json(body));
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
        .filter_map(|p| ProviderEntry::prepare(p, &gw.client))
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
    Ok(json(body))
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

#[derive(serde::Deserialize)]
struct ModelList {
    data: Vec<Map<String, Value>>,
}

/// One provider's models, renamed `{name}/{id}`; `None` (logged) when it fails.
async fn fetch(client: &upstream::UpstreamClient, p: ProviderEntry) -> Option<Vec<Value>> {
    if let Some(failure) = &p.refused {
        tracing::warn!(provider = %p.name, class = %failure.class, "skipping provider in /v1/models");
        return None;
    }
    let sent = client
        .http()
        .get(p.models_url.clone())
        .header(reqwest::header::AUTHORIZATION, p.auth.clone())
        .header(
            reqwest::header::ACCEPT,
            reqwest::header::HeaderValue::from_static("application/json"),
        )
        .timeout(client.timeout().min(PER_PROVIDER_TIMEOUT))
        .send()
        .await;
    let resp = match sent {
        Ok(r) if r.status().is_success() => r,
        Ok(r) => {
            let class = upstream::FailureClass::Status(r.status().as_u16());
            tracing::warn!(provider = %p.name, %class, "skipping provider in /v1/models");
            return None;
        }
        Err(e) => {
            skipped(&p, &e);
            return None;
        }
    };
    // The request's timeout (set above) also bounds reading the body.
    let bytes = match read_capped(resp, MAX_LIST_BYTES).await {
        Ok(b) => b,
        Err(UpstreamBody::TooLarge) => {
            tracing::warn!(provider = %p.name, limit = MAX_LIST_BYTES, "skipping provider in /v1/models: its list is too large");
            return None;
        }
        Err(UpstreamBody::Failed(e)) => {
            skipped(&p, &e);
            return None;
        }
    };
    let Ok(list) = serde_json::from_slice::<ModelList>(&bytes) else {
        tracing::warn!(provider = %p.name, "skipping provider in /v1/models: not an OpenAI model list");
        return None;
    };
    Some(
        list.data
            .into_iter()
            .filter_map(|mut m| {
                let id = format!("{}/{}", p.name, m.get("id")?.as_str()?);
                m.insert("id".into(), Value::String(id));
                m.entry("object")
                    .or_insert_with(|| Value::String("model".into()));
                m.entry("owned_by")
                    .or_insert_with(|| Value::String(p.name.clone()));
                Some(Value::Object(m))
            })
            .collect(),
    )
}
