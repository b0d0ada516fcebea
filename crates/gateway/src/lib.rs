//! The OpenAI-compatible proxy: authenticates an org's gateway API key,
//! routes `{customName}/{modelName}` to that org's custom provider, relays
//! the answer (streams as they arrive) and logs usage off the request path.

mod admit;
mod authenticate;
mod balance;
/// Chat request parsing, model split and body rewrite (public for the fuzz targets).
pub mod body;
mod cache;
mod collect;
mod endpoint;
mod error;
mod forward;
mod health_report;
mod listen;
mod metrics;
mod models;
mod multipart;
mod observe;
mod otlp;
mod pipeline;
mod relay;
mod responses;
mod retry;
mod route;
mod state;
mod traces;
mod upload;
mod usage;

use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use actix_web::dev::Service;
use actix_web::{web, HttpRequest};
use storage::Db;
use tokio::sync::watch;

pub use balance::HealthConfig;
pub use error::{ErrorClass, GatewayError};
pub use otlp::TraceConfig;

use cache::{KeyCache, ProviderCache};
use endpoint::Endpoint;
use metrics::Metrics;
use observe::{healthz, metrics_text, nosniff, observe, readyz};
use route::{method_not_allowed, not_found};
use state::State;
use usage::{UsageQueue, Writer, WriterConfig};

/// How the gateway behaves; `GatewayConfig::new` gives production defaults.
#[derive(Debug, Clone)]
pub struct GatewayConfig {
    /// `LLMGW_MAX_BODY_BYTES`: larger request bodies get 413.
    pub max_body_bytes: usize,
    /// The SSRF-guarded client every upstream call goes through.
    pub upstream: upstream::UpstreamClient,
    /// Safety-net lifetime of cached keys and providers (NOTIFY evicts sooner).
    pub cache_ttl: Duration,
    /// Usage rows that may wait for the database before new ones are dropped (counted).
    pub log_queue_capacity: usize,
    /// Rows per insert at most.
    pub log_batch_size: usize,
    /// How long the writer gathers rows before an insert.
    pub log_flush_interval: Duration,
    /// How long an org's `/v1/models` answer is reused.
    pub models_cache_ttl: Duration,
    /// Longest a non-streamed upstream answer (or error body) read into memory; beyond, 502.
    pub max_response_bytes: usize,
    /// Longest a client may take to send its request body; beyond, 408.
    pub client_body_timeout: Duration,
    /// Serve `/metrics` on the gateway's own routes; false when
    /// `LLMGW_METRICS_ADDR` gives it a listener of its own ([`Gateway::configure_metrics`]).
    pub metrics_on_gateway: bool,
    /// Spend controls: `LLMGW_REDIS_URL` shares them between replicas;
    /// in process by default.
    pub limiter: limits::Limiter,
    /// How endpoints are ejected and brought back.
    pub health: HealthConfig,
    /// `LLMGW_REDIS_URL`: where this replica reports its view of endpoint
    /// health for the settings API; `None`: not reported (the API shows `unknown`).
    pub health_views: Option<limits::HealthViews>,
    /// OpenTelemetry traces over OTLP/HTTP; `None` (the default): off.
    pub traces: Option<TraceConfig>,
}

impl GatewayConfig {
    pub fn new(upstream: upstream::UpstreamClient) -> Self {
        Self {
            max_body_bytes: 10 * 1024 * 1024,
            upstream,
            cache_ttl: Duration::from_secs(30),
            log_queue_capacity: 100_000,
            log_batch_size: storage::logs::DEFAULT_LOG_BATCH_SIZE,
            log_flush_interval: Duration::from_millis(200),
            models_cache_ttl: Duration::from_secs(60),
            max_response_bytes: 32 * 1024 * 1024,
            client_body_timeout: Duration::from_secs(30),
            metrics_on_gateway: true,
            limiter: limits::Limiter::local(limits::Config::default()),
            health: HealthConfig::default(),
            health_views: None,
            traces: None,
        }
    }
}

/// How long `shutdown` waits for requests cut by the grace period to hand over their usage rows.
const PENDING_ROWS_WAIT: Duration = Duration::from_secs(2);

/// How long `shutdown` keeps trying to write queued usage rows to an unreachable database.
const SHUTDOWN_FLUSH_BUDGET: Duration = Duration::from_secs(10);

/// A running gateway: cheap to clone, shared by every HTTP worker.
#[derive(Clone)]
pub struct Gateway {
    inner: Arc<State>,
}

impl std::fmt::Debug for Gateway {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Gateway").finish_non_exhaustive()
    }
}

impl Gateway {
    /// Starts the cache listener (waiting briefly for its first connection,
    /// so changes made after `start` returns are seen) and the usage writer.
    pub async fn start(db: Db, cfg: GatewayConfig) -> Self {
        let metrics = Arc::new(Metrics::default());
        let (usage, rx) = UsageQueue::new(cfg.log_queue_capacity, metrics.clone());
        let health = Arc::new(balance::HealthTable::new(cfg.health));
        let (shutdown, shutdown_rx) = watch::channel(false);
        let (tracer, exporter) = match cfg.traces.as_ref().map(|t| (t, t.client())) {
            Some((t, Ok(client))) => {
                let (exporter, task) = otlp::start(t, client, metrics.clone(), shutdown_rx.clone());
                tracing::info!(endpoint = %t.endpoint, "exporting traces over OTLP/HTTP");
                let tracer = traces::Tracer::new(exporter, t.sample_ratio);
                (Some(Arc::new(tracer)), Some(tokio::spawn(task.run())))
            }
            Some((_, Err(e))) => {
                tracing::error!(error = %e, "traces are off: the collector's client cannot be built");
                (None, None)
            }
            None => (None, None),
        };
        let inner = Arc::new(State {
            db: db.clone(),
            client: cfg.upstream.clone(),
            max_body: cfg.max_body_bytes,
            max_response: cfg.max_response_bytes,
            body_timeout: cfg.client_body_timeout,
            metrics_on_gateway: cfg.metrics_on_gateway,
            keys: KeyCache::new(cfg.cache_ttl),
            providers: ProviderCache::new(cfg.cache_ttl, health.clone()),
            health,
            retries: retry::RetryBudget::default(),
            models: models::ModelsCache::new(cfg.models_cache_ttl),
            responses: responses::ResponseRoutes::new(),
            usage: usage.clone(),
            limiter: cfg.limiter.clone(),
            metrics,
            tracer,
            exporter: Mutex::new(exporter),
            shutdown,
            tasks: Mutex::new(Vec::new()),
            writer: Mutex::new(None),
            refuses_stream_usage: Mutex::new(Default::default()),
        });
        let writer = Writer::new(
            db,
            rx,
            usage,
            WriterConfig {
                batch_size: cfg.log_batch_size,
                flush_interval: cfg.log_flush_interval,
                shutdown_budget: SHUTDOWN_FLUSH_BUDGET,
            },
            shutdown_rx.clone(),
        );
        *inner.writer.lock().unwrap_or_else(|p| p.into_inner()) = Some(tokio::spawn(writer.run()));
        if let Some(views) = cfg.health_views {
            let replica = uuid::Uuid::new_v4().simple().to_string();
            let report =
                health_report::run(inner.health.clone(), views, replica, shutdown_rx.clone());
            inner
                .tasks
                .lock()
                .unwrap_or_else(|p| p.into_inner())
                .push(tokio::spawn(report));
        }
        let (ready_tx, ready_rx) = tokio::sync::oneshot::channel();
        let listener = tokio::spawn(listen::listen(inner.clone(), shutdown_rx, ready_tx));
        inner
            .tasks
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .push(listener);
        if tokio::time::timeout(Duration::from_secs(5), ready_rx)
            .await
            .is_err()
        {
            tracing::warn!(
                "cache invalidation listener not connected yet; retrying in the background"
            );
        }
        Self { inner }
    }

    /// Registers every gateway route and its middleware.
    pub fn configure(&self, cfg: &mut web::ServiceConfig) {
        let mut scope = web::scope("")
            .wrap_fn(observe)
            .service(
                web::resource("/v1/models")
                    .route(web::get().to(models::list_models))
                    .default_service(web::to(method_not_allowed)),
            )
            .route("/healthz", web::get().to(healthz))
            .route("/readyz", web::get().to(readyz));
        for endpoint in Endpoint::ALL {
            scope = scope.service(
                web::resource(format!("/v1/{}", endpoint.path()))
                    .route(web::post().to(
                        move |req: HttpRequest, payload: web::Payload, gw: web::Data<State>| {
                            pipeline::proxy(endpoint, req, payload, gw)
                        },
                    ))
                    .default_service(web::to(method_not_allowed)),
            );
        }
        for endpoint in Endpoint::UPLOADS {
            scope = scope.service(
                web::resource(format!("/v1/{}", endpoint.path()))
                    .route(web::post().to(
                        move |req: HttpRequest, payload: web::Payload, gw: web::Data<State>| {
                            pipeline::proxy_upload(endpoint, req, payload, gw)
                        },
                    ))
                    .default_service(web::to(method_not_allowed)),
            );
        }
        if self.inner.metrics_on_gateway {
            scope = scope.route("/metrics", web::get().to(metrics_text));
        }
        // Routes with path parameters last: the router tries resources in
        // order, and a parameter pattern is a regex match on every request
        // that reaches it (about 10 % of a proxied request's instructions
        // when these came first).
        scope = scope
            .service(
                web::resource("/v1/models/{tail:.*}")
                    .route(web::get().to(models::retrieve_model))
                    .default_service(web::to(method_not_allowed)),
            )
            .configure(responses::configure);
        cfg.app_data(web::Data::from(self.inner.clone()))
            .service(scope.default_service(web::to(not_found)));
    }

    /// Routes of the `LLMGW_METRICS_ADDR` listener: `/metrics` only.
    pub fn configure_metrics(&self, cfg: &mut web::ServiceConfig) {
        cfg.app_data(web::Data::from(self.inner.clone())).service(
            web::scope("")
                .wrap_fn(|req, srv| {
                    let fut = srv.call(req);
                    async move {
                        let mut res = fut.await?;
                        nosniff(res.headers_mut());
                        Ok(res)
                    }
                })
                .route("/metrics", web::get().to(metrics_text))
                .default_service(web::to(not_found)),
        );
    }

    /// Marks the start of the drain (call when the listeners stop accepting):
    /// requests left unfinished from now on are logged with `error_class = "shutdown"`.
    pub fn begin_shutdown(&self) {
        self.inner.usage.begin_stopping();
    }

    /// Proxied requests still running (each holds its usage row until it ends).
    pub fn in_flight(&self) -> usize {
        self.inner.usage.pending()
    }

    /// Stops taking usage rows, writes the queued ones (bounded in time) and
    /// stops the background tasks. Call after the HTTP server has stopped.
    pub async fn shutdown(&self) {
        // Requests cut at the end of the grace period are dropped by their
        // worker threads, possibly after the server reported itself stopped:
        // wait (briefly) for their rows before the queue closes.
        let usage = &self.inner.usage;
        usage.begin_stopping();
        let deadline = Instant::now() + PENDING_ROWS_WAIT;
        while usage.pending() > 0 && Instant::now() < deadline {
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
        if usage.pending() > 0 {
            tracing::warn!(
                requests = usage.pending(),
                "requests still running at shutdown; their usage rows will be counted as dropped"
            );
        }
        usage.close();
        let _ = self.inner.shutdown.send(true);
        let writer = self
            .inner
            .writer
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .take();
        if let Some(mut w) = writer {
            let budget = SHUTDOWN_FLUSH_BUDGET + Duration::from_secs(5);
            if tokio::time::timeout(budget, &mut w).await.is_err() {
                w.abort();
                let lost = usage.depth() as u64;
                usage.dropped(lost, "the usage writer did not finish in time at shutdown");
                tracing::error!(rows = lost, "usage writer did not finish within {budget:?}");
            }
        }
        let exporter = self
            .inner
            .exporter
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .take();
        if let Some(mut e) = exporter {
            // The exporter bounds its own last POST; this is a backstop.
            if tokio::time::timeout(Duration::from_secs(10), &mut e)
                .await
                .is_err()
            {
                e.abort();
            }
        }
        let tasks: Vec<_> =
            std::mem::take(&mut *self.inner.tasks.lock().unwrap_or_else(|p| p.into_inner()));
        for t in tasks {
            t.abort();
        }
    }
}
