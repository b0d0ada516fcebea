//! The llmgw settings REST API (actix-web): accounts, organizations, members,
//! custom providers, gateway API keys, usage and the audit log.
//!
//! Every route is declared once, in the `routes` table: that table both registers the
//! handlers and produces the OpenAPI document served at `/api/openapi.json`.
//! Permissions are part of each handler's signature (`OrgAccess<role::Admin>` and friends).
//!
//! Cache invalidation needs nothing here: every write to `provider_keys`,
//! `provider_endpoints` and `api_keys` fires a trigger (migrations/0001_initial.sql,
//! 0012_provider_endpoints.sql) that sends `NOTIFY llmgw_cache` with
//! `{"table","op","org_id","id"}`
//! ([`storage::CACHE_CHANNEL`]), inside the same transaction as the change, so
//! gateways drop their cached entry as soon as the change commits.

use std::sync::Arc;
use std::time::Duration;

use actix_web::web;

mod browser;
mod error;
mod extract;
mod handlers;
mod health;
mod input;
mod middleware;
mod oidc;
mod openapi;
mod routes;
mod throttle;

pub use browser::BrowserConfig;
pub use error::{ApiError, FieldError};
pub use oidc::{OidcConfig, SsoConfig, SsoConfigError};
pub use throttle::TrustedProxies;

/// Settings of the API listener.
#[derive(Debug, Clone)]
pub struct ApiConfig {
    /// `LLMGW_ALLOW_SIGNUP`: whether `POST /auth/signup` creates accounts.
    pub allow_signup: bool,
    /// How long a login session lasts.
    pub session_ttl: Duration,
    /// `LLMGW_SESSION_IDLE_MINUTES`: a session unused for longer stops working.
    pub session_idle: Duration,
    /// `LLMGW_API_BODY_TIMEOUT_MS`: a request body not received within this
    /// time after its head gets 408.
    pub body_timeout: Duration,
    /// `LLMGW_MAX_BODY_BYTES`: larger request bodies get 413.
    pub max_body_bytes: usize,
    /// `LLMGW_UPSTREAM_ALLOW_PRIVATE`: accept base URLs on private addresses.
    pub allow_private: bool,
    /// The SSRF-guarded client used by `POST …/provider-keys/{id}/test`.
    pub upstream: upstream::UpstreamClient,
    /// `LLMGW_TRUSTED_PROXIES`: peers whose `X-Forwarded-For` names the client.
    pub trusted_proxies: TrustedProxies,
    /// The admin UI's and browser sessions' settings.
    pub browser: BrowserConfig,
    /// The spend controls' shared counters (on Redis), read for
    /// `GET …/api-keys/{id}/limits`. `None`: they are not reachable from
    /// here (each gateway counts in its own memory), so `used` is `null`.
    pub limiter: Option<limits::Limiter>,
    /// Endpoint health as the gateways report it on Redis (`LLMGW_REDIS_URL`),
    /// read for every endpoint shown. `None`: every endpoint is `unknown`.
    pub health: Option<limits::HealthViews>,
}

/// Password-hashing threads: one per core, at most this many (19 MiB each).
const MAX_PASSWORD_WORKERS: usize = 4;
/// Logins and signups that may wait for a password thread, per thread.
const PASSWORD_QUEUE_PER_WORKER: usize = 8;

/// Shared state of the handlers.
pub(crate) struct State {
    pub db: storage::Db,
    pub cfg: ApiConfig,
    /// The OpenAPI document, rendered once.
    pub openapi: String,
    /// Where every argon2 computation runs: bounded threads and memory.
    pub passwords: storage::secrets::PasswordPool,
    pub throttle: throttle::AuthThrottle,
    pub sso: oidc::Sso,
    /// Endpoint health as the gateways report it.
    pub health: health::HealthReports,
}

/// The settings API, ready to be mounted on an actix-web `App`.
#[derive(Clone)]
pub struct Api {
    state: Arc<State>,
}

impl Api {
    /// Starts the password-hashing threads; panics if the OS refuses them
    /// (only at startup, when nothing else could run either).
    pub fn new(db: storage::Db, cfg: ApiConfig) -> Self {
        Self::build(db, cfg, oidc::Sso::disabled())
    }

    /// The API with single sign-on settings (`LLMGW_OIDC_*`, `LLMGW_PASSWORD_LOGIN`).
    pub fn with_sso(
        db: storage::Db,
        cfg: ApiConfig,
        sso: SsoConfig,
    ) -> Result<Self, SsoConfigError> {
        Ok(Self::build(db, cfg, oidc::Sso::new(sso)?))
    }

    fn build(db: storage::Db, cfg: ApiConfig, sso: oidc::Sso) -> Self {
        let openapi = openapi::document(&routes::routes()).to_string();
        let workers = std::thread::available_parallelism()
            .map_or(1, |n| n.get())
            .min(MAX_PASSWORD_WORKERS);
        let passwords =
            storage::secrets::PasswordPool::new(workers, workers * PASSWORD_QUEUE_PER_WORKER)
                .expect("cannot start the password-hashing threads");
        let health = health::HealthReports::new(cfg.health.clone());
        Self {
            state: Arc::new(State {
                db,
                cfg,
                openapi,
                passwords,
                throttle: throttle::AuthThrottle::new(),
                sso,
                health,
            }),
        }
    }

    /// Registers every route, the extractor error handlers, the body deadline,
    /// the `x-request-id` and `nosniff` headers and the JSON 404/405 answers
    /// for unknown routes and methods.
    pub fn configure(&self, cfg: &mut web::ServiceConfig) {
        let scope = web::scope("")
            .app_data(web::Data::from(self.state.clone()))
            .app_data(web::PayloadConfig::new(self.state.cfg.max_body_bytes))
            .app_data(error::json_config(self.state.cfg.max_body_bytes))
            .app_data(error::path_config())
            .app_data(error::query_config());
        let scope = handlers::ui::register(routes::register(scope, &routes::routes()))
            .default_service(web::to(handlers::ui::fallback))
            .wrap(actix_web::middleware::from_fn(browser::csrf))
            .wrap(actix_web::middleware::from_fn(middleware::body_deadline))
            .wrap(actix_web::middleware::from_fn(middleware::request_id));
        cfg.service(scope);
    }
}
