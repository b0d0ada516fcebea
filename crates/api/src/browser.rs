//! Browser sessions: the `llmgw_session` cookie and the CSRF rule that comes
//! with it. One place for both, so the cookie is never honoured on a request
//! that skipped the origin check.
//!
//! The rule: a request that carries `Authorization` is an API client's and is
//! authenticated by that header alone (the cookie is ignored, so a forged
//! cross-site request cannot borrow it). Any other unsafe request (POST, PATCH,
//! PUT, DELETE) that carries the cookie, and every login or signup, must come
//! from our own origin: `Sec-Fetch-Site: same-origin` when the browser sends
//! it, else an `Origin` equal to the listener's `Host` or to
//! `LLMGW_PUBLIC_URL`'s origin. A cookie-carrying request with neither header
//! is refused; a login or signup with neither (curl, SDKs) passes, since a
//! browser always sends one of them on a cross-site POST.

use actix_web::body::{EitherBody, MessageBody};
use actix_web::dev::{ServiceRequest, ServiceResponse};
use actix_web::http::{header, Method};
use actix_web::middleware::Next;
use actix_web::{HttpRequest, HttpResponse, ResponseError};
use storage::secrets::SessionToken;

use crate::error::ApiError;

pub const COOKIE: &str = "llmgw_session";

/// Routes that start a session: checked even without a cookie (login CSRF).
const SESSION_STARTERS: &[&str] = &[
    "/api/v1/auth/login",
    "/api/v1/auth/signup",
    "/api/v1/auth/oidc/link",
];

/// What the browser part of the API needs to know.
#[derive(Debug, Clone)]
pub struct BrowserConfig {
    /// `LLMGW_PUBLIC_URL`: where users reach the API listener (the UI's
    /// origin behind a proxy); https makes the cookie `Secure`.
    pub public_url: Option<String>,
    /// `LLMGW_GATEWAY_PUBLIC_URL`: the gateway URL the UI's quick start shows.
    pub gateway_public_url: Option<String>,
    /// Whether email and password sign-in is offered.
    pub password_login: bool,
    /// Whether "Sign in with SSO" (`/api/v1/auth/oidc/start`) is offered.
    pub sso: bool,
}

impl Default for BrowserConfig {
    fn default() -> Self {
        Self {
            public_url: None,
            gateway_public_url: None,
            password_login: true,
            sso: false,
        }
    }
}

impl BrowserConfig {
    fn secure(&self) -> bool {
        self.public_url
            .as_deref()
            .is_some_and(|u| u.to_ascii_lowercase().starts_with("https://"))
    }

    /// `scheme://host[:port]` of `LLMGW_PUBLIC_URL`.
    fn public_origin(&self) -> Option<String> {
        let url = self.public_url.as_deref()?;
        let (scheme, rest) = url.split_once("://")?;
        let host = rest.split(['/', '?', '#']).next()?;
        Some(format!(
            "{}://{}",
            scheme.to_ascii_lowercase(),
            host.to_ascii_lowercase()
        ))
    }
}

/// `Set-Cookie` value that starts a browser session.
pub fn set_cookie(cfg: &BrowserConfig, token: &str, max_age_secs: i64) -> String {
    let secure = if cfg.secure() { "; Secure" } else { "" };
    format!("{COOKIE}={token}; Path=/; HttpOnly; SameSite=Strict; Max-Age={max_age_secs}{secure}")
}

/// `Set-Cookie` value that removes it.
pub fn clear_cookie(cfg: &BrowserConfig) -> String {
    set_cookie(cfg, "", 0)
}

/// The session token of the `llmgw_session` cookie, if any.
pub fn cookie_token(req: &HttpRequest) -> Option<SessionToken> {
    cookie(req, COOKIE).map(SessionToken::from_presented)
}

/// The value of cookie `name`, if the request carries exactly one non-empty
/// one (two are ambiguous: which was set by us is unknown).
pub(crate) fn cookie<'a>(req: &'a HttpRequest, name: &str) -> Option<&'a str> {
    let mut found = None;
    for h in req.headers().get_all(header::COOKIE) {
        for pair in h.to_str().ok()?.split(';') {
            if let Some((k, v)) = pair.trim().split_once('=') {
                if k == name && !v.is_empty() {
                    if found.is_some() {
                        return None;
                    }
                    found = Some(v);
                }
            }
        }
    }
    found
}

fn has_cookie(req: &ServiceRequest) -> bool {
    cookie(req.request(), COOKIE).is_some()
}

fn is_unsafe(m: &Method) -> bool {
    !matches!(
        *m,
        Method::GET | Method::HEAD | Method::OPTIONS | Method::TRACE
    )
}

/// Whether the request shows it was made by a page of our own origin; `None`
/// when the browser said nothing either way.
fn same_origin(req: &ServiceRequest, cfg: &BrowserConfig) -> Option<bool> {
    let headers = req.headers();
    if let Some(site) = headers.get("sec-fetch-site").and_then(|v| v.to_str().ok()) {
        // `none`: typed by the user or a bookmark, never a page's request.
        return Some(matches!(site, "same-origin" | "none"));
    }
    let origin = headers
        .get(header::ORIGIN)?
        .to_str()
        .ok()?
        .to_ascii_lowercase();
    if cfg.public_origin().as_deref() == Some(origin.as_str()) {
        return Some(true);
    }
    let host = headers
        .get(header::HOST)
        .and_then(|v| v.to_str().ok())
        .map(str::to_ascii_lowercase);
    let authority = origin.split_once("://").map(|(_, a)| a);
    Some(host.is_some() && authority == host.as_deref())
}

/// Refuses cross-site unsafe requests that would be authenticated by the
/// cookie, and cross-site logins and signups, with 403 `csrf_failed`.
pub async fn csrf(
    req: ServiceRequest,
    next: Next<impl MessageBody>,
) -> Result<ServiceResponse<EitherBody<impl MessageBody>>, actix_web::Error> {
    let checked = is_unsafe(req.method())
        && !req.headers().contains_key(header::AUTHORIZATION)
        && (has_cookie(&req) || SESSION_STARTERS.contains(&req.path()));
    if checked {
        let cfg = req
            .app_data::<actix_web::web::Data<crate::State>>()
            .map(|s| s.cfg.browser.clone())
            .unwrap_or_default();
        let verdict = match same_origin(&req, &cfg) {
            Some(v) => v,
            // No browser header: fine for a login or signup by a script,
            // never for a request the cookie would authenticate.
            None => !has_cookie(&req),
        };
        if !verdict {
            let answer: HttpResponse = ApiError::CsrfFailed.error_response();
            return Ok(req.into_response(answer).map_into_right_body());
        }
    }
    Ok(next.call(req).await?.map_into_left_body())
}
