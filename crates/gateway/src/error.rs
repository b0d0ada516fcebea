//! Every error the gateway makes, mapped to HTTP once, in OpenAI's shape
//! `{"error":{"message","type","param","code"}}` so SDKs surface it.

use std::time::Duration;

use actix_web::http::header::{self, HeaderValue};
use actix_web::http::StatusCode;
use actix_web::{HttpResponse, ResponseError};
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
    #[error("the provider `{0}` is disabled in your organization; an admin can re-enable it")]
    ProviderInactive(String),
    #[error("the request body is larger than the gateway's limit of {0} bytes")]
    PayloadTooLarge(usize),
    #[error("the request body could not be read: {0}")]
    BadBody(String),
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
    #[error("unknown route: the gateway serves POST /v1/chat/completions and GET /v1/models")]
    NotFound,
    #[error("method not allowed on this route")]
    MethodNotAllowed,
}

impl GatewayError {
    fn kind(&self) -> (StatusCode, &'static str, Option<&'static str>, &'static str) {
        use GatewayError::*;
        match self {
            MissingKey | InvalidKey => (
                StatusCode::UNAUTHORIZED,
                "invalid_request_error",
                None,
                "invalid_api_key",
            ),
            RevokedKey => (
                StatusCode::UNAUTHORIZED,
                "invalid_request_error",
                None,
                "api_key_revoked",
            ),
            ExpiredKey => (
                StatusCode::UNAUTHORIZED,
                "invalid_request_error",
                None,
                "api_key_expired",
            ),
            Unavailable => (
                StatusCode::SERVICE_UNAVAILABLE,
                "service_unavailable",
                None,
                "gateway_unavailable",
            ),
            InvalidJson(_) => (
                StatusCode::BAD_REQUEST,
                "invalid_request_error",
                None,
                "invalid_json",
            ),
            StreamNotBool(_) => (
                StatusCode::BAD_REQUEST,
                "invalid_request_error",
                Some("stream"),
                "invalid_type",
            ),
            MissingModel | ModelNotString | ModelWithoutProvider(_) => (
                StatusCode::BAD_REQUEST,
                "invalid_request_error",
                Some("model"),
                "invalid_model",
            ),
            ModelNotFound { .. } => (
                StatusCode::NOT_FOUND,
                "invalid_request_error",
                Some("model"),
                "model_not_found",
            ),
            ProviderInactive(_) => (
                StatusCode::FORBIDDEN,
                "permission_error",
                Some("model"),
                "provider_inactive",
            ),
            PayloadTooLarge(_) => (
                StatusCode::PAYLOAD_TOO_LARGE,
                "invalid_request_error",
                None,
                "request_too_large",
            ),
            BadBody(_) => (
                StatusCode::BAD_REQUEST,
                "invalid_request_error",
                None,
                "invalid_body",
            ),
            BodyTimeout(_) => (
                StatusCode::REQUEST_TIMEOUT,
                "invalid_request_error",
                None,
                "request_timeout",
            ),
            UpstreamTooLarge { .. } => (
                StatusCode::BAD_GATEWAY,
                "upstream_error",
                None,
                "upstream_response_too_large",
            ),
            UpstreamForbidden { .. } => (
                StatusCode::BAD_GATEWAY,
                "upstream_error",
                None,
                "upstream_address_not_allowed",
            ),
            UpstreamUnreachable { .. } => (
                StatusCode::BAD_GATEWAY,
                "upstream_error",
                None,
                "upstream_unreachable",
            ),
            UpstreamTls { .. } => (
                StatusCode::BAD_GATEWAY,
                "upstream_error",
                None,
                "upstream_tls_error",
            ),
            UpstreamTimeout { .. } => (
                StatusCode::GATEWAY_TIMEOUT,
                "upstream_error",
                None,
                "upstream_timeout",
            ),
            UpstreamRedirect { .. } => (
                StatusCode::BAD_GATEWAY,
                "upstream_error",
                None,
                "upstream_redirect",
            ),
            ProviderMisconfigured(_) => (
                StatusCode::BAD_GATEWAY,
                "upstream_error",
                None,
                "provider_misconfigured",
            ),
            NotFound => (
                StatusCode::NOT_FOUND,
                "invalid_request_error",
                None,
                "unknown_url",
            ),
            MethodNotAllowed => (
                StatusCode::METHOD_NOT_ALLOWED,
                "invalid_request_error",
                None,
                "method_not_allowed",
            ),
        }
    }

    /// The stable code, also written to `request_logs.error_class`.
    pub fn code(&self) -> &'static str {
        self.kind().3
    }

    /// Which upstream failure this is, for the metric.
    pub(crate) fn upstream_kind(&self) -> Option<&'static str> {
        use GatewayError::*;
        Some(match self {
            UpstreamForbidden { .. } => "forbidden_address",
            UpstreamUnreachable { .. } => "connect",
            UpstreamTls { .. } => "tls",
            UpstreamTimeout { .. } => "timeout",
            UpstreamRedirect { .. } => "redirect",
            _ => return None,
        })
    }
}

/// What the per-request log line reports about an error, carried in the
/// response's extensions from the handler to the middleware.
#[derive(Debug, Clone)]
pub(crate) struct ErrorNote {
    pub code: &'static str,
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
        let (status, kind, param, code) = self.kind();
        let message = self.to_string();
        let mut res = HttpResponse::build(status)
            .insert_header((
                header::CONTENT_TYPE,
                HeaderValue::from_static("application/json"),
            ))
            .body(error_body(&message, kind, param, code));
        let detail = (status.is_server_error()).then_some(message);
        res.extensions_mut().insert(ErrorNote { code, detail });
        res
    }
}
