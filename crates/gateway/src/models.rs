//! `GET /v1/models`: the org's active providers' models as `{name}/{id}`.

use std::collections::HashMap;
use std::sync::Mutex;
use std::time::{Duration, Instant};

use actix_web::http::header::{HeaderValue, CONTENT_TYPE};
use actix_web::{web, HttpRequest, HttpResponse};
use bytes::Bytes;
use serde_json::{Map, Value};
use uuid::Uuid;

use crate::cache::ProviderEntry;
use crate::error::GatewayError;
use crate::proxy::authenticate;
use crate::Inner;

/// Longest wait for one provider's model list.
const PER_PROVIDER_TIMEOUT: Duration = Duration::from_secs(10);

/// Each org's last complete answer, reused for a short while.
pub(crate) struct ModelsCache {
    ttl: Duration,
    map: Mutex<HashMap<Uuid, (Instant, Bytes)>>,
}

impl ModelsCache {
    pub fn new(ttl: Duration) -> Self {
        Self {
            ttl,
            map: Mutex::new(HashMap::new()),
        }
    }

    fn map(&self) -> std::sync::MutexGuard<'_, HashMap<Uuid, (Instant, Bytes)>> {
        self.map.lock().unwrap_or_else(|p| p.into_inner())
    }

    fn get(&self, org: Uuid) -> Option<Bytes> {
        self.map()
            .get(&org)
            .filter(|(t, _)| t.elapsed() < self.ttl)
            .map(|(_, b)| b.clone())
    }

    pub fn evict(&self, org: Uuid) {
        self.map().remove(&org);
    }

    pub fn flush(&self) {
        self.map().clear();
    }
}

fn json(body: Bytes) -> HttpResponse {
    HttpResponse::Ok()
        .insert_header((CONTENT_TYPE, HeaderValue::from_static("application/json")))
        .body(body)
}

pub(crate) async fn list_models(
    req: HttpRequest,
    gw: web::Data<Inner>,
) -> Result<HttpResponse, GatewayError> {
    let key = authenticate(&gw, &req).await?;
    if let Some(body) = gw.models.get(key.org_id) {
        return Ok(json(body));
    }
    let providers = gw.db.active_providers(key.org_id).await.map_err(|e| {
        tracing::warn!(error = %e, "cannot list providers");
        GatewayError::Unavailable
    })?;
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
    // A list missing a failed provider is not reused: the next call tries it again.
    if complete {
        gw.models
            .map()
            .insert(key.org_id, (Instant::now(), body.clone()));
    }
    Ok(json(body))
}

#[derive(serde::Deserialize)]
struct ModelList {
    data: Vec<Map<String, Value>>,
}

/// One provider's models, renamed `{name}/{id}`; `None` (logged) when it fails.
async fn fetch(client: &upstream::UpstreamClient, p: ProviderEntry) -> Option<Vec<Value>> {
    if let Some(why) = &p.refused {
        tracing::warn!(provider = %p.name, "skipping provider in /v1/models: {why}");
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
            tracing::warn!(provider = %p.name, status = r.status().as_u16(), "skipping provider in /v1/models");
            return None;
        }
        Err(e) => {
            tracing::warn!(provider = %p.name, error = %e, "skipping provider in /v1/models");
            return None;
        }
    };
    let list: ModelList = match resp.bytes().await.map(|b| serde_json::from_slice(&b)) {
        Ok(Ok(l)) => l,
        _ => {
            tracing::warn!(provider = %p.name, "skipping provider in /v1/models: not an OpenAI model list");
            return None;
        }
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
