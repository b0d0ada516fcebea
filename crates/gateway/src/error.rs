//! Every error the gateway makes, mapped to HTTP once, in OpenAI's shape
//! `{"error":{"message","type","param","code"}}` so SDKs surface it.

use std::time::Duration;

use actix_web::http::header::{self, HeaderValue};
use actix_web::http::StatusCode;
use actix_web::{HttpResponse, ResponseError};
use limits::RefusalKind;
use serde_json::json;
use upstream::UpstreamFailure;

/// The model format, quoted in errors about it.
const MODEL_FORMAT: &str = "\"{customName}/{modelName}\", where {customName} is the name of a provider configured in your organization (e.g. \"mycompany/meta-llama/Llama-3-8B\")";

/// An error answered by the gateway itself (upstream error statuses are relayed, not wrapped).
#[derive(Debug, thiserror::Error)]
pub enum GatewayError {
    #[error("missing API key: send it as `Authorization: Bearer <key>` or `x-api-key: <key>`")]
    MissingKey,
    #[error("invalid API key")]
    InvalidKey,
    #[error("this API key has been revoked")]
    RevokedKey,
    #[error("this API key has expired")]
    ExpiredKey,
    #[error(
        "the gateway cannot verify requests right now (its database is unavailable); retry shortly"
    )]
    Unavailable,
    #[error("{0}")]
    InvalidJson(String),
    #[error("{0}")]
    InvalidFallbacks(String),
    #[error("`stream` must be a boolean (true or false) or null")]
    /// Carries the model, for the usage row.
    StreamNotBool(String),
    #[error("you must provide a `model` parameter of the form {MODEL_FORMAT}")]
    MissingModel,
    #[error("`model` must be a string of the form {MODEL_FORMAT}")]
    ModelNotString,
    #[error("the model `{0}` names no provider: use the form {MODEL_FORMAT}")]
    ModelWithoutProvider(String),
    #[error("the model `{model}` does not exist: there is no provider named `{provider}` in your organization")]
    ModelNotFound { model: String, provider: String },
    #[error("the model `{model}` does not exist at the provider `{provider}`")]
    UpstreamModelNotFound { model: String, provider: String },
    /// `GET /v1/models/{model}` for a model outside the key's `allowed_models`:
    /// 404 like a missing model, so a key cannot probe what it may not use.
    #[error("the model `{0}` does not exist or this API key may not use it")]
    ModelNotVisible(String),
    #[error("this API key may not use the model `{0}`: it matches none of the key's `allowed_models`; an admin can change them")]
    ModelNotAllowed(String),
    #[error("no response with id `{0}` was created through this gateway by your organization")]
    ResponseNotFound(String),
    #[error("the provider `{0}` is disabled in your organization; an admin can re-enable it")]
    ProviderInactive(String),
    #[error("the request body is larger than the gateway's limit of {0} bytes")]
    PayloadTooLarge(usize),
    #[error("the request body could not be read: {0}")]
    BadBody(String),
    #[error("{0}")]
    InvalidMultipart(String),
    #[error("the `model` field is sent more than once; send it once, of the form {MODEL_FORMAT}")]
    DuplicateModel,
    #[error("the request body did not arrive within {} ms", .0.as_millis())]
    BodyTimeout(Duration),
    // Upstream failures say only what `UpstreamFailure` says (a class and a
    // fixed hint): never an address or a cause chain, which go to the log.
    #[error("the provider `{provider}` was refused: {failure}")]
    UpstreamForbidden {
        provider: String,
        failure: UpstreamFailure,
    },
    #[error("could not reach the provider `{provider}`: {failure}")]
    UpstreamUnreachable {
        provider: String,
        failure: UpstreamFailure,
    },
    #[error("could not reach the provider `{provider}`: {failure}")]
    UpstreamTls {
        provider: String,
        failure: UpstreamFailure,
    },
    #[error("the provider `{provider}` did not answer within {} ms", .after.as_millis())]
    UpstreamTimeout { provider: String, after: Duration },
    #[error(
        "the provider `{provider}` answered with more than the gateway's limit of {limit} bytes"
    )]
    UpstreamTooLarge { provider: String, limit: usize },
    #[error("the provider `{provider}` answered with a redirect ({status}); redirects are not followed, check its base URL")]
    UpstreamRedirect { provider: String, status: u16 },
    #[error("the provider `{0}` has an unusable configuration; an admin should check its base URL and token")]
    ProviderMisconfigured(String),
    #[error("unknown route: the gateway serves POST /v1/chat/completions, /v1/completions, /v1/embeddings, /v1/moderations, /v1/rerank, /v1/images/generations, /v1/responses, /v1/audio/speech, /v1/audio/transcriptions, /v1/audio/translations, GET|DELETE /v1/responses/{{id}} (and its /cancel, /input_items), GET /v1/models and GET /v1/models/{{model}}")]
    NotFound,
    #[error("method not allowed on this route")]
    MethodNotAllowed,
    /// Refused by a spend control (429, or 503 when the limiter fails closed).
    #[error("{}", limited_message(.0.kind))]
    Limited(limits::Refusal),
}

fn limited_message(kind: RefusalKind) -> &'static str {
    match kind {
        RefusalKind::Requests => "rate limit reached for requests per minute on this API key or its organization; retry after the time in the Retry-After header",
        RefusalKind::Tokens => "rate limit reached for tokens per minute on this API key or its organization; retry after the time in the Retry-After header",
        RefusalKind::Concurrency => "too many concurrent requests on this API key or its organization; retry when one of them ends",
        RefusalKind::Quota => "you exceeded your current quota: this API key or its organization has used its token or spend budget for the period; an admin can raise it",
        RefusalKind::Unavailable => "the gateway cannot check rate limits right now (its limiter store is unavailable); retry shortly",
    }
}

impl GatewayError {
    fn kind(&self) -> (StatusCode, &'static str, Option<&'static str>, ErrorClass) {
        use GatewayError::*;
        match self {
            MissingKey | InvalidKey => (
                StatusCode::UNAUTHORIZED,
                "invalid_request_error",
                None,
                ErrorClass::InvalidApiKey,
            ),
            RevokedKey => (
                StatusCode::UNAUTHORIZED,
                "invalid_request_error",
                None,
                ErrorClass::ApiKeyRevoked,
            ),
            ExpiredKey => (
                StatusCode::UNAUTHORIZED,
                "invalid_request_error",
                None,
                ErrorClass::ApiKeyExpired,
            ),
            Unavailable => (
                StatusCode::SERVICE_UNAVAILABLE,
                "service_unavailable",
                None,
                ErrorClass::GatewayUnavailable,
            ),
            InvalidJson(_) => (
                StatusCode::BAD_REQUEST,
                "invalid_request_error",
                None,
                ErrorClass::InvalidJson,
            ),
            InvalidFallbacks(_) => (
                StatusCode::BAD_REQUEST,
                "invalid_request_error",
                Some("models"),
                ErrorClass::InvalidModel,
            ),
            StreamNotBool(_) => (
                StatusCode::BAD_REQUEST,
                "invalid_request_error",
                Some("stream"),
                ErrorClass::InvalidType,
            ),
            MissingModel | ModelNotString | ModelWithoutProvider(_) | DuplicateModel => (
                StatusCode::BAD_REQUEST,
                "invalid_request_error",
                Some("model"),
                ErrorClass::InvalidModel,
            ),
            ModelNotFound { .. } | UpstreamModelNotFound { .. } | ModelNotVisible(_) => (
                StatusCode::NOT_FOUND,
                "invalid_request_error",
                Some("model"),
                ErrorClass::ModelNotFound,
            ),
            ModelNotAllowed(_) => (
                StatusCode::FORBIDDEN,
                "invalid_request_error",
                Some("model"),
                ErrorClass::ModelNotAllowed,
            ),
            ResponseNotFound(_) => (
                StatusCode::NOT_FOUND,
                "invalid_request_error",
                None,
                ErrorClass::ResponseNotFound,
            ),
            ProviderInactive(_) => (
                StatusCode::FORBIDDEN,
                "permission_error",
                Some("model"),
                ErrorClass::ProviderInactive,
            ),
            PayloadTooLarge(_) => (
                StatusCode::PAYLOAD_TOO_LARGE,
                "invalid_request_error",
                None,
                ErrorClass::RequestTooLarge,
            ),
            BadBody(_) | InvalidMultipart(_) => (
                StatusCode::BAD_REQUEST,
                "invalid_request_error",
                None,
                ErrorClass::InvalidBody,
            ),
            BodyTimeout(_) => (
                StatusCode::REQUEST_TIMEOUT,
                "invalid_request_error",
                None,
                ErrorClass::RequestTimeout,
            ),
            UpstreamTooLarge { .. } => (
                StatusCode::BAD_GATEWAY,
                "upstream_error",
                None,
                ErrorClass::UpstreamResponseTooLarge,
            ),
            UpstreamForbidden { .. } => (
                StatusCode::BAD_GATEWAY,
                "upstream_error",
                None,
                ErrorClass::UpstreamAddressNotAllowed,
            ),
            UpstreamUnreachable { .. } => (
                StatusCode::BAD_GATEWAY,
                "upstream_error",
                None,
                ErrorClass::UpstreamUnreachable,
            ),
            UpstreamTls { .. } => (
                StatusCode::BAD_GATEWAY,
                "upstream_error",
                None,
                ErrorClass::UpstreamTlsError,
            ),
            UpstreamTimeout { .. } => (
                StatusCode::GATEWAY_TIMEOUT,
                "upstream_error",
                None,
                ErrorClass::UpstreamTimeout,
            ),
            UpstreamRedirect { .. } => (
                StatusCode::BAD_GATEWAY,
                "upstream_error",
                None,
                ErrorClass::UpstreamRedirect,
            ),
            ProviderMisconfigured(_) => (
                StatusCode::BAD_GATEWAY,
                "upstream_error",
                None,
                ErrorClass::ProviderMisconfigured,
            ),
            NotFound => (
                StatusCode::NOT_FOUND,
                "invalid_request_error",
                None,
                ErrorClass::UnknownUrl,
            ),
            MethodNotAllowed => (
                StatusCode::METHOD_NOT_ALLOWED,
                "invalid_request_error",
                None,
                ErrorClass::MethodNotAllowed,
            ),
            Limited(r) => match r.kind {
                RefusalKind::Requests | RefusalKind::Concurrency => (
                    StatusCode::TOO_MANY_REQUESTS,
                    "requests",
                    None,
                    ErrorClass::RateLimitExceeded,
                ),
                RefusalKind::Tokens => (
                    StatusCode::TOO_MANY_REQUESTS,
                    "tokens",
                    None,
                    ErrorClass::RateLimitExceeded,
                ),
                RefusalKind::Quota => (
                    StatusCode::TOO_MANY_REQUESTS,
                    "insufficient_quota",
                    None,
                    ErrorClass::InsufficientQuota,
                ),
                RefusalKind::Unavailable => (
                    StatusCode::SERVICE_UNAVAILABLE,
                    "service_unavailable",
                    None,
                    ErrorClass::LimitsUnavailable,
                ),
            },
        }
    }

    /// The stable code, also written to `request_logs.error_class`.
    pub fn code(&self) -> &'static str {
        self.kind().3.as_str()
    }

    /// The class written to `request_logs.error_class`.
    pub(crate) fn class(&self) -> ErrorClass {
        self.kind().3
    }

    /// Which upstream failure this is, for the metric.
    pub(crate) fn upstream_kind(&self) -> Option<UpstreamErrorKind> {
        use GatewayError::*;
        Some(match self {
            UpstreamForbidden { .. } => UpstreamErrorKind::ForbiddenAddress,
            UpstreamUnreachable { .. } => UpstreamErrorKind::Connect,
            UpstreamTls { .. } => UpstreamErrorKind::Tls,
            UpstreamTimeout { .. } => UpstreamErrorKind::Timeout,
            UpstreamRedirect { .. } => UpstreamErrorKind::Redirect,
            _ => return None,
        })
    }
}

/// Every value `request_logs.error_class` (and the log line's `error`) can hold:
/// the codes of [`GatewayError`] and the classes of answers relayed imperfectly.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ErrorClass {
    /// `invalid_api_key`
    InvalidApiKey,
    /// `api_key_revoked`
    ApiKeyRevoked,
    /// `api_key_expired`
    ApiKeyExpired,
    /// `gateway_unavailable`
    GatewayUnavailable,
    /// `invalid_json`
    InvalidJson,
    /// `invalid_type`
    InvalidType,
    /// `invalid_model`
    InvalidModel,
    /// `model_not_found`
    ModelNotFound,
    /// `model_not_allowed`: outside the key's `allowed_models`.
    ModelNotAllowed,
    /// `response_not_found`
    ResponseNotFound,
    /// `provider_inactive`
    ProviderInactive,
    /// `request_too_large`
    RequestTooLarge,
    /// `invalid_body`
    InvalidBody,
    /// `request_timeout`
    RequestTimeout,
    /// `upstream_response_too_large`
    UpstreamResponseTooLarge,
    /// `upstream_address_not_allowed`
    UpstreamAddressNotAllowed,
    /// `upstream_unreachable`
    UpstreamUnreachable,
    /// `upstream_tls_error`
    UpstreamTlsError,
    /// `upstream_timeout`
    UpstreamTimeout,
    /// `upstream_redirect`
    UpstreamRedirect,
    /// `provider_misconfigured`
    ProviderMisconfigured,
    /// `unknown_url`
    UnknownUrl,
    /// `method_not_allowed`
    MethodNotAllowed,
    /// `rate_limit_exceeded`: requests, tokens per minute or concurrency.
    RateLimitExceeded,
    /// `insufficient_quota`: a day or month token budget or the money budget.
    InsufficientQuota,
    /// `limits_unavailable`: the limiter's store did not answer (fail-closed).
    LimitsUnavailable,
    /// `upstream_status`: the upstream answered with an error status (relayed as sent).
    UpstreamStatus,
    /// `upstream_invalid_json`: a success whose body is not JSON: relayed, no tokens counted.
    UpstreamInvalidJson,
    /// `upstream_stream_error`: the upstream broke off a stream after its head.
    UpstreamStreamError,
    /// `client_canceled`: the client went away before the answer ended.
    ClientCanceled,
    /// `shutdown`: the request was cut by the end of the shutdown grace period.
    Shutdown,
}

impl ErrorClass {
    pub fn as_str(self) -> &'static str {
        use ErrorClass::*;
        match self {
            InvalidApiKey => "invalid_api_key",
            ApiKeyRevoked => "api_key_revoked",
            ApiKeyExpired => "api_key_expired",
            GatewayUnavailable => "gateway_unavailable",
            InvalidJson => "invalid_json",
            InvalidType => "invalid_type",
            InvalidModel => "invalid_model",
            ModelNotFound => "model_not_found",
            ModelNotAllowed => "model_not_allowed",
            ResponseNotFound => "response_not_found",
            ProviderInactive => "provider_inactive",
            RequestTooLarge => "request_too_large",
            InvalidBody => "invalid_body",
            RequestTimeout => "request_timeout",
            UpstreamResponseTooLarge => "upstream_response_too_large",
            UpstreamAddressNotAllowed => "upstream_address_not_allowed",
            UpstreamUnreachable => "upstream_unreachable",
            UpstreamTlsError => "upstream_tls_error",
            UpstreamTimeout => "upstream_timeout",
            UpstreamRedirect => "upstream_redirect",
            ProviderMisconfigured => "provider_misconfigured",
            UnknownUrl => "unknown_url",
            MethodNotAllowed => "method_not_allowed",
            RateLimitExceeded => "rate_limit_exceeded",
            InsufficientQuota => "insufficient_quota",
            LimitsUnavailable => "limits_unavailable",
            UpstreamStatus => "upstream_status",
            UpstreamInvalidJson => "upstream_invalid_json",
            UpstreamStreamError => "upstream_stream_error",
            ClientCanceled => "client_canceled",
            Shutdown => "shutdown",
        }
    }
}

/// The `kind` label of `llmgw_gateway_upstream_errors_total`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum UpstreamErrorKind {
    Connect,
    Tls,
    Timeout,
    ForbiddenAddress,
    Redirect,
    /// A stream broken off or gone silent after its head.
    Stream,
}

impl UpstreamErrorKind {
    /// Every kind, in the order `/metrics` lists them.
    pub const ALL: [Self; 6] = [
        Self::Connect,
        Self::Tls,
        Self::Timeout,
        Self::ForbiddenAddress,
        Self::Redirect,
        Self::Stream,
    ];

    pub fn as_str(self) -> &'static str {
        match self {
            Self::Connect => "connect",
            Self::Tls => "tls",
            Self::Timeout => "timeout",
            Self::ForbiddenAddress => "forbidden_address",
            Self::Redirect => "redirect",
            Self::Stream => "stream",
        }
    }
}

/// What the per-request log line reports about an error, carried in the
/// response's extensions from the handler to the middleware.
#[derive(Debug, Clone)]
pub(crate) struct ErrorNote {
    pub code: ErrorClass,
    pub detail: Option<String>,
}

pub(crate) fn error_body(message: &str, kind: &str, param: Option<&str>, code: &str) -> Vec<u8> {
    serde_json::to_vec(
        &json!({"error": {"message": message, "type": kind, "param": param, "code": code}}),
    )
    .unwrap_or_default()
}

impl ResponseError for GatewayError {
    fn status_code(&self) -> StatusCode {
        self.kind().0
    }

    fn error_response(&self) -> HttpResponse {
        let (status, kind, param, class) = self.kind();
        let code = class.as_str();
        let message = self.to_string();
        let mut res = HttpResponse::build(status)
            .insert_header((
                header::CONTENT_TYPE,
                HeaderValue::from_static("application/json"),
            ))
            .body(error_body(&message, kind, param, code));
        if let GatewayError::Limited(r) = self {
            let headers = res.headers_mut();
            crate::admit::write_headers(&r.headers, headers);
            if r.kind == RefusalKind::Quota {
                headers.insert(
                    header::HeaderName::from_static("x-should-retry"),
                    HeaderValue::from_static("false"),
                );
            } else if let Ok(v) = HeaderValue::from_str(&r.retry_after_secs.max(1).to_string()) {
                headers.insert(header::RETRY_AFTER, v);
            }
        }
        let detail = (status.is_server_error()).then_some(message);
        res.extensions_mut().insert(ErrorNote {
            code: class,
            detail,
        });
        res
    }
}
