//! Custom providers ("provider keys"). The token is write-only: answers carry
//! `token_hint` only. Base URLs pass the SSRF policy when saved; the test call
//! goes through the SSRF-guarded client, which checks again at connect time.

use std::time::Instant;

use actix_web::{web, HttpResponse};
use serde::Serialize;
use storage::domain::BaseUrl;
use storage::providers::{ProviderKey, ProviderWithToken};
use storage::StorageError;
use upstream::body::UpstreamBody;
use upstream::models::{ModelsProbe, ProbeError, MAX_MODELS_BYTES};
use upstream::{FailureClass, UpstreamClient, UpstreamFailure};

use super::List;
use crate::error::ApiError;
use crate::extract::{role, Input, ItemId, OrgAccess};
use crate::input::{CreateProvider, PatchProvider};
use crate::State;

pub async fn list(
    state: web::Data<State>,
    access: OrgAccess<role::Member>,
) -> Result<HttpResponse, ApiError> {
    let org_id = access.org_id();
    let mut keys = state.db.list_provider_keys(org_id).await?;
    state.health.annotate_providers(org_id, &mut keys).await;
    Ok(HttpResponse::Ok().json(List::all(keys)))
}

pub async fn get(
    state: web::Data<State>,
    access: OrgAccess<role::Member>,
    id: ItemId,
) -> Result<HttpResponse, ApiError> {
    let org_id = access.org_id();
    let key = state.db.get_provider_key(org_id, id.get()?).await?;
    Ok(HttpResponse::Ok().json(annotated(&state, key).await))
}

/// A provider with its endpoints' health, as every answer shows it.
async fn annotated(state: &State, key: ProviderKey) -> ProviderKey {
    let mut keys = [key];
    state
        .health
        .annotate_providers(keys[0].org_id, &mut keys)
        .await;
    let [key] = keys;
    key
}

/// The save-time checks of a base URL, for providers and endpoints alike:
/// the operator's scheme policy, then the SSRF policy (the connect-time
/// check repeats it at every call).
pub(crate) async fn check_base_url(state: &State, base_url: &BaseUrl) -> Result<(), ApiError> {
    base_url.check_scheme(state.cfg.upstream.allows_http())?;
    upstream::check_base_url(base_url, state.cfg.allow_private).await?;
    Ok(())
}

pub async fn create(
    state: web::Data<State>,
    access: OrgAccess<role::Admin>,
    input: Input<CreateProvider>,
) -> Result<HttpResponse, ApiError> {
    let CreateProvider(new) = input.into_inner()?;
    check_base_url(&state, &new.base_url).await?;
    let key = state
        .db
        .create_provider(access.org_id(), access.actor(), &new)
        .await?;
    Ok(HttpResponse::Created().json(annotated(&state, key).await))
}

/// A new `base_url` needs `token` in the same request (storage checks it
/// under the row lock and answers 422 on `token`): the stored token may not
/// follow a URL the admin picks.
pub async fn update(
    state: web::Data<State>,
    access: OrgAccess<role::Admin>,
    id: ItemId,
    input: Input<PatchProvider>,
) -> Result<HttpResponse, ApiError> {
    let id = id.get()?;
    let PatchProvider(patch) = input.into_inner()?;
    if let Some(base_url) = &patch.base_url {
        check_base_url(&state, base_url).await?;
    }
    let key = state
        .db
        .update_provider_key(access.org_id(), access.actor(), id, patch)
        .await?;
    Ok(HttpResponse::Ok().json(annotated(&state, key).await))
}

pub async fn delete(
    state: web::Data<State>,
    access: OrgAccess<role::Admin>,
    id: ItemId,
) -> Result<HttpResponse, ApiError> {
    state
        .db
        .delete_provider_key(access.org_id(), access.actor(), id.get()?)
        .await?;
    Ok(HttpResponse::NoContent().finish())
}

/// The one mapping of an upstream refusal or failure to what an admin sees:
/// a save-time refusal is a 422 on `base_url`, a test reports it in `error`.
/// Both carry the class and fixed hint only, never an address or a cause
/// chain (see `upstream::failure` for the one bit that remains).
impl From<UpstreamFailure> for ApiError {
    fn from(f: UpstreamFailure) -> Self {
        ApiError::field("base_url", format!("base_url is refused: {f}"))
    }
}

/// The test's answer for a token that cannot be opened; nothing was sent.
const UNDECRYPTABLE: &str = "the stored token cannot be decrypted for this provider and base URL, so it was not sent: save the token again";

/// How many model ids a connectivity test reports.
pub const TEST_MODELS_SHOWN: usize = 50;

/// What a connectivity test found.
#[derive(Debug, Serialize, PartialEq)]
pub struct TestReport {
    /// An HTTP answer came back (whatever its status).
    pub reachable: bool,
    /// The provider's HTTP status.
    pub status: Option<u16>,
    /// Time to the answer's head, or to the failure.
    pub latency_ms: u64,
    /// Entries in the `data` array of a successful `/v1/models` answer.
    pub model_count: Option<usize>,
    /// The first [`TEST_MODELS_SHOWN`] model ids of that answer.
    pub models: Vec<String>,
    /// Why the test failed; never holds the token.
    pub error: Option<String>,
}

pub async fn test(
    state: web::Data<State>,
    access: OrgAccess<role::Admin>,
    id: ItemId,
) -> Result<HttpResponse, ApiError> {
    let (org_id, id) = (access.org_id(), id.get()?);
    let provider = match state.db.provider_key_with_token(org_id, id).await {
        Ok(p) => p,
        // Fails closed like the gateway: a token that does not open for this
        // row and base URL (retired key, tampered row, URL rewritten in SQL)
        // is sent nowhere.
        Err(StorageError::Crypto(e)) => {
            tracing::error!(error = %e, %org_id, provider_key_id = %id, "cannot decrypt provider token");
            return Ok(HttpResponse::Ok().json(TestReport {
                reachable: false,
                status: None,
                latency_ms: 0,
                model_count: None,
                models: Vec::new(),
                error: Some(UNDECRYPTABLE.to_owned()),
            }));
        }
        Err(e) => return Err(e.into()),
    };
    Ok(HttpResponse::Ok().json(probe(&state.cfg.upstream, &provider).await))
}

async fn probe(client: &UpstreamClient, p: &ProviderWithToken) -> TestReport {
    let base_url = &p.provider.base_url;
    let start = Instant::now();
    let failed = |failure: UpstreamFailure| TestReport {
        reachable: false,
        status: None,
        latency_ms: start.elapsed().as_millis() as u64,
        model_count: None,
        models: Vec::new(),
        error: Some(failure.to_string()),
    };
    if let Err(e) = client.check(base_url) {
        tracing::info!(provider = %p.provider.id, error = %e, "provider test refused by the SSRF policy");
        return failed(UpstreamFailure::from(&e));
    }
    // Tokens are checked header-safe when saved.
    let Some(auth) = upstream::bearer(p.token.expose_secret()) else {
        return failed(FailureClass::Failed.into());
    };
    let probe = ModelsProbe {
        client,
        base_url,
        auth: &auth,
        connect: p.provider.timeouts.connect(),
    };
    let answer = match probe.list().await {
        Ok(a) => a,
        Err(ProbeError::Send(e)) => {
            let failure = UpstreamFailure::of(&e);
            tracing::warn!(provider = %p.provider.id, class = %failure.class, error = %upstream::error_chain(&e), "provider test failed");
            return failed(failure);
        }
        Err(e) => {
            tracing::warn!(provider = %p.provider.id, error = %e, "provider test failed");
            return failed(FailureClass::Failed.into());
        }
    };
    let list = answer.list();
    let model_count = list.as_ref().map(|l| l.data.len());
    let models = list
        .iter()
        .flat_map(|l| l.ids())
        .take(TEST_MODELS_SHOWN)
        .map(str::to_owned)
        .collect();
    let error = if !answer.is_success() {
        Some(UpstreamFailure::status(answer.status).to_string())
    } else if matches!(answer.body, Err(UpstreamBody::TooLarge)) {
        Some(format!(
            "the provider's /v1/models answer is larger than {} MiB",
            MAX_MODELS_BYTES >> 20
        ))
    } else if model_count.is_none() {
        Some("the provider's /v1/models answer has no `data` array".to_owned())
    } else {
        None
    };
    TestReport {
        reachable: true,
        status: Some(answer.status),
        latency_ms: answer.latency.as_millis() as u64,
        model_count,
        models,
        error,
    }
}
