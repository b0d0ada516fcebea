//! The API's one error type, mapped to HTTP in exactly one `impl ResponseError`.
//!
//! Body shape: `{"error":{"code","message","details":[{"field","message"}]}}`.
//! Clients get a stable `code` and a human `message`; internal causes go to
//! the log (with their whole chain), never into a response.

use actix_web::http::{header, StatusCode};
use actix_web::{error as aerror, web, HttpResponse, ResponseError};
use serde::Serialize;
use serde_json::json;
use storage::domain::{Role, ValidationError};
use storage::StorageError;

/// One invalid input field.
#[derive(Debug, Clone, Serialize, PartialEq, Eq)]
pub struct FieldError {
    pub field: String,
    pub message: String,
}

impl FieldError {
    pub fn new(field: impl Into<String>, message: impl Into<String>) -> Self {
        Self {
            field: field.into(),
            message: message.into(),
        }
    }
}

impl From<ValidationError> for FieldError {
    fn from(e: ValidationError) -> Self {
        Self::new(e.field, e.message)
    }
}

/// Everything a request can fail with.
#[derive(Debug, thiserror::Error)]
pub enum ApiError {
    #[error("the request has invalid fields")]
    Validation(Vec<FieldError>),
    #[error("{0}")]
    BadRequest(String),
    #[error("the request body is larger than the limit of {0} bytes")]
    PayloadTooLarge(usize),
    #[error("the request body did not arrive within {} ms", .0.as_millis())]
    RequestTimeout(std::time::Duration),
    #[error("authentication required: send Authorization: Bearer <session token>")]
    Unauthorized,
    #[error("invalid email or password")]
    InvalidCredentials,
    #[error("your role in this organization does not allow this ({} or higher required)", .0.as_str())]
    Forbidden(Role),
    #[error("signup is disabled on this server")]
    SignupDisabled,
    #[error("password sign-in is disabled on this server; sign in with single sign-on")]
    PasswordLoginDisabled,
    #[error("single sign-on is not configured on this server")]
    SsoNotConfigured,
    #[error(
        "cross-site request refused: a browser session only accepts requests from its own pages"
    )]
    CsrfFailed,
    #[error("not found")]
    NotFound,
    #[error("no such route")]
    RouteNotFound,
    /// Carries the `Allow` value: the methods the path does answer.
    #[error("method not allowed on this route (allowed: {0})")]
    MethodNotAllowed(String),
    #[error("{0} already exists")]
    Conflict(&'static str),
    #[error("the organization must keep at least one owner")]
    LastOwner,
    #[error(
        "this is the provider's own endpoint (its base_url and token): it cannot be deleted, \
        so the provider keeps an endpoint; change it with PATCH (a new base_url with its token), \
        or delete the provider"
    )]
    OwnEndpoint,
    #[error("too many attempts; retry after {retry_after_secs} s")]
    TooManyRequests { retry_after_secs: u64 },
    #[error("the server is busy, try again shortly")]
    Busy,
    #[error("the database is unavailable, try again shortly")]
    Unavailable(#[source] Option<StorageError>),
    #[error("internal error")]
    Internal(#[source] Box<dyn std::error::Error + Send + Sync>),
}

/// A status and stable code clients can rely on.
#[derive(Debug, Clone, Copy)]
pub struct ErrorKind {
    pub status: u16,
    pub code: &'static str,
    pub meaning: &'static str,
}

const fn kind(status: u16, code: &'static str, meaning: &'static str) -> ErrorKind {
    ErrorKind {
        status,
        code,
        meaning,
    }
}

pub const BAD_REQUEST: ErrorKind = kind(
    400,
    "bad_request",
    "the body is not valid JSON, not a JSON object, or could not be read",
);
pub const VALIDATION: ErrorKind = kind(
    422,
    "validation_failed",
    "fields broke a rule; `details` names each field",
);
pub const PAYLOAD_TOO_LARGE: ErrorKind = kind(
    413,
    "payload_too_large",
    "the body exceeds LLMGW_MAX_BODY_BYTES",
);
pub const REQUEST_TIMEOUT: ErrorKind = kind(
    408,
    "request_timeout",
    "the body did not arrive within LLMGW_API_BODY_TIMEOUT_MS",
);
pub const UNAUTHORIZED: ErrorKind = kind(
    401,
    "unauthorized",
    "no valid session: missing, unknown, expired or logged-out token",
);
pub const INVALID_CREDENTIALS: ErrorKind = kind(
    401,
    "invalid_credentials",
    "unknown email or wrong password (same answer for both)",
);
pub const FORBIDDEN: ErrorKind = kind(403, "forbidden", "your role in the organization is too low");
pub const SIGNUP_DISABLED: ErrorKind = kind(403, "signup_disabled", "LLMGW_ALLOW_SIGNUP=false");
pub const PASSWORD_LOGIN_DISABLED: ErrorKind = kind(
    403,
    "password_login_disabled",
    "LLMGW_PASSWORD_LOGIN=false: sign in with single sign-on",
);
pub const SSO_NOT_CONFIGURED: ErrorKind =
    kind(404, "sso_not_configured", "LLMGW_OIDC_ISSUER is not set");
pub const CSRF_FAILED: ErrorKind = kind(
    403,
    "csrf_failed",
    "a cookie-authenticated unsafe request (or a login/signup) came from another origin",
);
pub const NOT_FOUND: ErrorKind = kind(
    404,
    "not_found",
    "unknown id, or one belonging to another organization",
);
pub const ROUTE_NOT_FOUND: ErrorKind = kind(404, "route_not_found", "no such route");
pub const METHOD_NOT_ALLOWED: ErrorKind = kind(
    405,
    "method_not_allowed",
    "the route exists but not with this method",
);
pub const CONFLICT: ErrorKind = kind(
    409,
    "conflict",
    "a record with this unique value already exists",
);
pub const LAST_OWNER: ErrorKind = kind(
    409,
    "last_owner",
    "the last owner can neither leave nor be demoted",
);
pub const OWN_ENDPOINT: ErrorKind = kind(
    409,
    "own_endpoint",
    "the provider's own endpoint (its top-level base_url and token) cannot be deleted",
);
pub const TOO_MANY_REQUESTS: ErrorKind = kind(
    429,
    "too_many_requests",
    "too many login or signup attempts from this address or for this email; see Retry-After",
);
pub const BUSY: ErrorKind = kind(
    503,
    "busy",
    "every password-hashing slot is taken; see Retry-After",
);
pub const UNAVAILABLE: ErrorKind = kind(
    503,
    "database_unavailable",
    "the database cannot be reached",
);
pub const INTERNAL: ErrorKind = kind(
    500,
    "internal",
    "unexpected server error (details are in the server log)",
);

/// Every kind, for the OpenAPI document.
pub const ALL_KINDS: &[ErrorKind] = &[
    BAD_REQUEST,
    VALIDATION,
    PAYLOAD_TOO_LARGE,
    REQUEST_TIMEOUT,
    UNAUTHORIZED,
    INVALID_CREDENTIALS,
    FORBIDDEN,
    SIGNUP_DISABLED,
    PASSWORD_LOGIN_DISABLED,
    SSO_NOT_CONFIGURED,
    CSRF_FAILED,
    NOT_FOUND,
    ROUTE_NOT_FOUND,
    METHOD_NOT_ALLOWED,
    CONFLICT,
    LAST_OWNER,
    OWN_ENDPOINT,
    TOO_MANY_REQUESTS,
    BUSY,
    UNAVAILABLE,
    INTERNAL,
];

impl ApiError {
    pub fn kind(&self) -> ErrorKind {
        match self {
            Self::Validation(_) => VALIDATION,
            Self::BadRequest(_) => BAD_REQUEST,
            Self::PayloadTooLarge(_) => PAYLOAD_TOO_LARGE,
            Self::RequestTimeout(_) => REQUEST_TIMEOUT,
            Self::Unauthorized => UNAUTHORIZED,
            Self::InvalidCredentials => INVALID_CREDENTIALS,
            Self::Forbidden(_) => FORBIDDEN,
            Self::SignupDisabled => SIGNUP_DISABLED,
            Self::PasswordLoginDisabled => PASSWORD_LOGIN_DISABLED,
            Self::SsoNotConfigured => SSO_NOT_CONFIGURED,
            Self::CsrfFailed => CSRF_FAILED,
            Self::NotFound => NOT_FOUND,
            Self::RouteNotFound => ROUTE_NOT_FOUND,
            Self::MethodNotAllowed(_) => METHOD_NOT_ALLOWED,
            Self::Conflict(_) => CONFLICT,
            Self::LastOwner => LAST_OWNER,
            Self::OwnEndpoint => OWN_ENDPOINT,
            Self::TooManyRequests { .. } => TOO_MANY_REQUESTS,
            Self::Busy => BUSY,
            Self::Unavailable(_) => UNAVAILABLE,
            Self::Internal(_) => INTERNAL,
        }
    }

    pub fn internal(e: impl Into<Box<dyn std::error::Error + Send + Sync>>) -> Self {
        Self::Internal(e.into())
    }

    /// One invalid field.
    pub fn field(field: impl Into<String>, message: impl Into<String>) -> Self {
        Self::Validation(vec![FieldError::new(field, message)])
    }
}

impl From<StorageError> for ApiError {
    fn from(e: StorageError) -> Self {
        match e {
            StorageError::NotFound => Self::NotFound,
            StorageError::Conflict(what) => Self::Conflict(what),
            StorageError::LastOwner => Self::LastOwner,
            StorageError::OwnEndpoint => Self::OwnEndpoint,
            StorageError::RoleTooLow(role) => Self::Forbidden(role),
            StorageError::Invalid(v) => v.into(),
            e if e.is_unavailable() => Self::Unavailable(Some(e)),
            e => Self::Internal(Box::new(e)),
        }
    }
}

impl From<ValidationError> for ApiError {
    fn from(e: ValidationError) -> Self {
        Self::Validation(vec![e.into()])
    }
}

impl From<storage::secrets::PasswordPoolError> for ApiError {
    fn from(e: storage::secrets::PasswordPoolError) -> Self {
        match e {
            storage::secrets::PasswordPoolError::Busy => Self::Busy,
            e => Self::internal(e),
        }
    }
}

impl From<tokio::task::JoinError> for ApiError {
    fn from(e: tokio::task::JoinError) -> Self {
        Self::internal(e)
    }
}

/// `error: cause: cause…`, for logs.
pub use upstream::error_chain;

impl ResponseError for ApiError {
    fn status_code(&self) -> StatusCode {
        StatusCode::from_u16(self.kind().status).unwrap_or(StatusCode::INTERNAL_SERVER_ERROR)
    }

    fn error_response(&self) -> HttpResponse {
        match self {
            Self::Internal(_) => tracing::error!(error = %error_chain(self), "request failed"),
            Self::Unavailable(_) => {
                tracing::warn!(error = %error_chain(self), "database unavailable")
            }
            _ => {}
        }
        let details: &[FieldError] = match self {
            Self::Validation(d) => d,
            _ => &[],
        };
        let mut res = HttpResponse::build(self.status_code());
        if self.kind().status == 401 {
            res.insert_header((header::WWW_AUTHENTICATE, "Bearer"));
        }
        match self {
            Self::Unavailable(_) | Self::Busy => {
                res.insert_header((header::RETRY_AFTER, "1"));
            }
            Self::TooManyRequests { retry_after_secs } => {
                res.insert_header((header::RETRY_AFTER, retry_after_secs.to_string()));
            }
            _ => {}
        }
        if let Self::MethodNotAllowed(allow) = self {
            res.insert_header((header::ALLOW, allow.as_str()));
        }
        res.json(json!({"error": {"code": self.kind().code, "message": self.to_string(), "details": details}}))
    }
}

/// Error handler for `web::Json` extractors (the handlers use [`crate::extract::Input`],
/// but any `web::Json` answers in the same shape).
pub(crate) fn json_config(limit: usize) -> web::JsonConfig {
    web::JsonConfig::default()
        .limit(limit)
        .error_handler(move |e, _| {
            match e {
                aerror::JsonPayloadError::Overflow { .. }
                | aerror::JsonPayloadError::OverflowKnownLength { .. } => {
                    ApiError::PayloadTooLarge(limit)
                }
                // serde's message may quote the offending value (a token, say): never echo it.
                aerror::JsonPayloadError::Deserialize(e) if e.is_data() => {
                    ApiError::field("body", "a field is missing or has the wrong type")
                }
                _ => ApiError::BadRequest("the request body is not valid JSON".into()),
            }
            .into()
        })
}

/// A malformed id in a path looks exactly like an unknown one.
pub(crate) fn path_config() -> web::PathConfig {
    web::PathConfig::default().error_handler(|_, _| ApiError::NotFound.into())
}

pub(crate) fn query_config() -> web::QueryConfig {
    web::QueryConfig::default()
        .error_handler(|_, _| ApiError::BadRequest("the query string is malformed".into()).into())
}
