//! Stage 2: which provider a request goes to (any JSON endpoint: they all
//! carry `model`). The body's `model` is split
//! at its first `/` into `{customName}/{modelName}`, the org's provider is
//! looked up (cached), and the body is rewritten with `{modelName}`. A
//! model outside the key's `allowed_models` is refused (403) before any
//! provider lookup.

use std::sync::Arc;

use bytes::Bytes;
use storage::domain::ProviderName;

use crate::body::{split_model, ChatRequest, Splice};
use crate::cache::{KeyEntry, ProviderEntry};
use crate::endpoint::Endpoint;
use crate::error::GatewayError;
use crate::state::State;
use crate::usage::LogGuard;

/// A routed request: the provider it goes to and the body it gets.
pub(crate) struct Route {
    pub endpoint: Endpoint,
    pub provider: Arc<ProviderEntry>,
    /// The client asked for `"stream": true`.
    pub stream: bool,
    /// What the spend controls reserve for it, in tokens.
    pub reserve_tokens: u64,
    /// The body the upstream gets first.
    pub body: Bytes,
    /// `body` asks for `stream_options.include_usage` on the client's behalf.
    pub asks_usage: bool,
    /// The client's body and its edits, to write it again (without usage, or
    /// for a fallback); kept only then: a body is held once otherwise.
    pub source: Option<(Bytes, Splice)>,
    /// `models`: where to go, in order, when the provider fails before answering.
    pub fallbacks: Vec<Fallback>,
    /// The endpoint to try first: the one that created `previous_response_id`.
    pub prefer: Option<uuid::Uuid>,
}

/// A fallback model, checked and looked up when the request was routed.
pub(crate) struct Fallback {
    /// `{customName}/{modelName}` as the client wrote it.
    pub model: String,
    pub provider: Arc<ProviderEntry>,
}

impl Fallback {
    /// `{modelName}`: what its upstream receives.
    pub fn upstream_model(&self) -> &str {
        &self.model[self.provider.name.len() + 1..]
    }
}

/// Routes a request's body; the row learns the models and provider as they are known.
pub(crate) async fn route(
    gw: &State,
    endpoint: Endpoint,
    raw: &Bytes,
    key: &KeyEntry,
    log: &mut LogGuard,
) -> Result<Route, GatewayError> {
    // JSON is UTF-8; the parser does not check the strings it only skips.
    if std::str::from_utf8(raw).is_err() {
        return Err(GatewayError::InvalidJson(
            "the request body is not valid UTF-8".to_owned(),
        ));
    }
    let chat = ChatRequest::parse(raw).inspect_err(|e| {
        // Not routable, but the row still says what was asked for.
        if let GatewayError::ModelWithoutProvider(m) | GatewayError::StreamNotBool(m) = e {
            log.row.requested_model = Some(storable(m));
        }
    })?;
    log.row.streamed = chat.stream;
    let provider = provider_for(gw, &chat.model, chat.provider(), key, log).await?;
    let ask_usage = endpoint.asks_stream_usage()
        && chat.can_ask_usage()
        && !gw.refuses_stream_usage(provider.id, endpoint.path());
    let mut fallbacks = Vec::with_capacity(chat.fallbacks.len());
    for model in &chat.fallbacks {
        let name = &model[..split_model(model).unwrap_or(1) - 1];
        fallbacks.push(Fallback {
            provider: candidate(gw, model, name, key).await?,
            model: model.to_string(),
        });
    }
    let prefer = match (&chat.previous_response_id, endpoint) {
        (Some(id), Endpoint::Responses) if provider.upstreams.len() > 1 => {
            crate::responses::endpoint_of(gw, key.org_id, id).await
        }
        _ => None,
    };
    let splice = chat.splice();
    Ok(Route {
        prefer,
        endpoint,
        stream: chat.stream,
        reserve_tokens: crate::admit::reserve_tokens(chat.max_tokens, raw.len()),
        body: splice.apply(raw, ask_usage),
        asks_usage: ask_usage,
        source: (ask_usage || !fallbacks.is_empty()).then(|| (raw.clone(), splice)),
        fallbacks,
        provider,
    })
}

/// A model the key may call and the usable provider it names (for a
/// fallback: every one is checked before the first attempt).
async fn candidate(
    gw: &State,
    model: &str,
    provider_name: &str,
    key: &KeyEntry,
) -> Result<Arc<ProviderEntry>, GatewayError> {
    let provider = allowed(gw, model, provider_name, key).await?;
    usable(&provider)?;
    Ok(provider)
}

/// The key's org's provider named `{customName}` of `model` (every endpoint
/// routes through here), once the key's `allowed_models` let it call `model`;
/// the row learns the models and provider as they are known.
pub(crate) async fn provider_for(
    gw: &State,
    model: &str,
    provider_name: &str,
    key: &KeyEntry,
    log: &mut LogGuard,
) -> Result<Arc<ProviderEntry>, GatewayError> {
    log.row.requested_model = Some(storable(model));
    log.row.provider_name = Some(storable(provider_name));
    log.row.upstream_model = Some(storable(&model[provider_name.len() + 1..]));
    let provider = allowed(gw, model, provider_name, key).await?;
    log.row.provider_key_id = Some(provider.id);
    usable(&provider)?;
    Ok(provider)
}

/// The provider `model` names, once the key's `allowed_models` let it call `model`.
async fn allowed(
    gw: &State,
    model: &str,
    provider_name: &str,
    key: &KeyEntry,
) -> Result<Arc<ProviderEntry>, GatewayError> {
    if !key.allows(model) {
        return Err(GatewayError::ModelNotAllowed(model.to_owned()));
    }
    provider_named(gw, key.org_id, model, provider_name).await
}

/// The org's provider called `name` (from the cache), for a request that
/// asked for `model`: 404 `model_not_found` when there is none.
pub(crate) async fn provider_named(
    gw: &State,
    org: uuid::Uuid,
    model: &str,
    name: &str,
) -> Result<Arc<ProviderEntry>, GatewayError> {
    let not_found = || GatewayError::ModelNotFound {
        model: model.to_owned(),
        provider: name.to_owned(),
    };
    // A name that breaks the rule cannot exist (and is not worth a lookup).
    if !ProviderName::is_valid(name) {
        return Err(not_found());
    }
    gw.providers
        .get(&gw.db, &gw.client, &gw.metrics, org, name)
        .await?
        .ok_or_else(not_found)
}

/// Whether a provider may be called now: 403 when disabled, 502 when the
/// connect-time SSRF policy refuses its base URL.
pub(crate) fn usable(provider: &ProviderEntry) -> Result<(), GatewayError> {
    if !provider.active {
        return Err(GatewayError::ProviderInactive(provider.name.clone()));
    }
    if let Some(failure) = provider.refused() {
        return Err(GatewayError::UpstreamForbidden {
            provider: provider.name.clone(),
            failure,
        });
    }
    Ok(())
}

/// A client-chosen string as a usage row may hold it: PostgreSQL text refuses
/// NUL, and one refused row would send a whole batch down the slow path.
pub(crate) fn storable(s: &str) -> String {
    const MAX: usize = 512;
    let mut end = s.len().min(MAX);
    while !s.is_char_boundary(end) {
        end -= 1;
    }
    s[..end].replace('\0', "\u{fffd}")
}

/// Fallback for paths the gateway does not serve.
pub(crate) async fn not_found() -> Result<actix_web::HttpResponse, GatewayError> {
    Err(GatewayError::NotFound)
}

/// Fallback for a served path called with the wrong method.
pub(crate) async fn method_not_allowed() -> Result<actix_web::HttpResponse, GatewayError> {
    Err(GatewayError::MethodNotAllowed)
}
