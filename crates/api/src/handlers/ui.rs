//! The admin UI: a few static files compiled into the binary, served on the
//! API listener, and the small public endpoint that tells the UI how this
//! server signs people in.
//!
//! Every path outside `/api` that no route claims answers the UI's page (the
//! client routes by the URL's hash), so a bookmark or reload always works;
//! unknown `/api/*` paths keep the JSON 404.

use actix_web::http::header::{self, HeaderValue};
use actix_web::http::Method;
use actix_web::{web, HttpRequest, HttpResponse};
use serde_json::json;

use crate::error::ApiError;
use crate::State;

const INDEX: &str = include_str!("../../ui/index.html");
const APP_JS: &str = include_str!("../../ui/app.js");
const APP_CSS: &str = include_str!("../../ui/app.css");
const ICON: &str = include_str!("../../ui/icon.svg");

/// No inline script or style, nothing from elsewhere, never framed.
const CSP: &str = "default-src 'none'; script-src 'self'; style-src 'self'; img-src 'self'; \
                   connect-src 'self'; font-src 'self'; manifest-src 'self'; base-uri 'none'; \
                   form-action 'self'; frame-ancestors 'none'";

fn asset(content_type: &'static str, body: &'static str) -> HttpResponse {
    HttpResponse::Ok()
        .insert_header((header::CONTENT_TYPE, content_type))
        .insert_header((header::CONTENT_SECURITY_POLICY, CSP))
        .insert_header((header::X_FRAME_OPTIONS, "DENY"))
        .insert_header((header::REFERRER_POLICY, "no-referrer"))
        // Small files, embedded per build: revalidating costs little and an
        // upgrade is never served stale.
        .insert_header((header::CACHE_CONTROL, HeaderValue::from_static("no-cache")))
        .body(body)
}

async fn index() -> HttpResponse {
    asset("text/html; charset=utf-8", INDEX)
}

pub async fn app_js() -> HttpResponse {
    asset("text/javascript; charset=utf-8", APP_JS)
}

pub async fn app_css() -> HttpResponse {
    asset("text/css; charset=utf-8", APP_CSS)
}

pub async fn icon() -> HttpResponse {
    asset("image/svg+xml", ICON)
}

/// The UI's page for any other GET outside `/api`; the JSON 404 otherwise.
pub async fn fallback(req: HttpRequest) -> Result<HttpResponse, ApiError> {
    let path = req.path();
    let api = path == "/api" || path.starts_with("/api/");
    if !api && (req.method() == Method::GET || req.method() == Method::HEAD) {
        return Ok(index().await);
    }
    super::ops::route_not_found().await
}

/// `GET /api/v1/auth/config`: how to sign in here, and what the UI shows.
pub async fn auth_config(state: web::Data<State>) -> HttpResponse {
    let b = &state.cfg.browser;
    HttpResponse::Ok().json(json!({
        "password_login": b.password_login,
        "sso": b.sso,
        "signup": state.cfg.allow_signup,
        "allow_http": state.cfg.upstream.allows_http(),
        "gateway_public_url": b.gateway_public_url,
    }))
}

/// Mounts the UI's files (not API routes: the OpenAPI document leaves them out);
/// the page itself, `/` included, is the [`fallback`].
pub fn register(scope: actix_web::Scope) -> actix_web::Scope {
    use actix_web::middleware::Compress;
    scope
        .service(
            web::resource("/ui/app.js")
                .wrap(Compress::default())
                .route(web::get().to(app_js)),
        )
        .service(
            web::resource("/ui/app.css")
                .wrap(Compress::default())
                .route(web::get().to(app_css)),
        )
        .service(web::resource("/ui/icon.svg").route(web::get().to(icon)))
}
