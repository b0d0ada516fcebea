//! The OpenAI-compatible proxy: authenticates an org's gateway API key,
//! routes `{customName}/{modelName}` to that org's custom provider, relays
//! the answer (streams as they arrive) and logs usage off the request path.

/// Chat request parsing, model split and body rewrite (public for the fuzz targets).
pub mod body;
mod cache;
mod error;
mod metrics;
mod models;
mod proxy;
mod usage;

use std::sync::atomic::Ordering::Relaxed;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use actix_web::body::MessageBody;
use actix_web::dev::{Service, ServiceRequest, ServiceResponse};
use actix_web::http::header::{HeaderName, HeaderValue, CONTENT_TYPE};
use actix_web::{web, HttpMessage, HttpRequest, HttpResponse};
use sqlx::postgres::PgListener;
use storage::Db;
use tokio::sync::watch;
use tokio::task::JoinHandle;

pub use error::GatewayError;

use cache::{Invalidation, KeyCache, ProviderCache};
use metrics::Metrics;
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
}

impl GatewayConfig {
    pub fn new(upstream: upstream::UpstreamClient) -> Self {
        Self {
            max_body_bytes: 10 * 1024 * 1024,
            upstream,
            cache_ttl: Duration::from_secs(30),
            log_queue_capacity: 100_000,
            log_batch_size: 1_000,
            log_flush_interval: Duration::from_millis(200),
            models_cache_ttl: Duration::from_secs(60),
            max_response_bytes: 32 * 1024 * 1024,
            client_body_timeout: Duration::from_secs(30),
            metrics_on_gateway: true,
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
    inner: Arc<Inner>,
}

impl std::fmt::Debug for Gateway {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Gateway").finish_non_exhaustive()
    }
}

pub(crate) struct Inner {
    pub db: Db,
    pub client: upstream::UpstreamClient,
    pub max_body: usize,
    pub max_response: usize,
    pub body_timeout: Duration,
    metrics_on_gateway: bool,
    pub keys: KeyCache,
    pub providers: ProviderCache,
    pub models: models::ModelsCache,
    pub usage: Arc<UsageQueue>,
    pub metrics: Arc<Metrics>,
    shutdown: watch::Sender<bool>,
    tasks: Mutex<Vec<JoinHandle<()>>>,
    writer: Mutex<Option<JoinHandle<()>>>,
}

impl Gateway {
    /// Starts the cache listener (waiting briefly for its first connection,
    /// so changes made after `start` returns are seen) and the usage writer.
    pub async fn start(db: Db, cfg: GatewayConfig) -> Self {
        let metrics = Arc::new(Metrics::default());
        let (usage, rx) = UsageQueue::new(cfg.log_queue_capacity, metrics.clone());
        let (shutdown, shutdown_rx) = watch::channel(false);
        let inner = Arc::new(Inner {
            db: db.clone(),
            client: cfg.upstream.clone(),
            max_body: cfg.max_body_bytes,
            max_response: cfg.max_response_bytes,
            body_timeout: cfg.client_body_timeout,
            metrics_on_gateway: cfg.metrics_on_gateway,
            keys: KeyCache::new(cfg.cache_ttl),
            providers: ProviderCache::new(cfg.cache_ttl),
            models: models::ModelsCache::new(cfg.models_cache_ttl),
            usage: usage.clone(),
            metrics,
            shutdown,
            tasks: Mutex::new(Vec::new()),
            writer: Mutex::new(None),
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
        let (ready_tx, ready_rx) = tokio::sync::oneshot::channel();
        let listener = tokio::spawn(listen(inner.clone(), shutdown_rx, ready_tx));
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
                web::resource("/v1/chat/completions")
                    .route(web::post().to(proxy::chat_completions))
                    .default_service(web::to(method_not_allowed)),
            )
            .service(
                web::resource("/v1/models")
                    .route(web::get().to(models::list_models))
                    .default_service(web::to(method_not_allowed)),
            )
            .route("/healthz", web::get().to(healthz))
            .route("/readyz", web::get().to(readyz));
        if self.inner.metrics_on_gateway {
            scope = scope.route("/metrics", web::get().to(metrics_text));
        }
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
        let tasks: Vec<_> =
            std::mem::take(&mut *self.inner.tasks.lock().unwrap_or_else(|p| p.into_inner()));
        for t in tasks {
            t.abort();
        }
    }
}

/// Listens for cache notifications until shutdown; reconnects with backoff
/// and flushes the caches after every reconnect (notifications were missed).
async fn listen(
    inner: Arc<Inner>,
    mut shutdown: watch::Receiver<bool>,
    ready: tokio::sync::oneshot::Sender<()>,
) {
    let mut ready = Some(ready);
    let mut backoff = Duration::from_millis(100);
    let mut first = true;
    loop {
        let connect = async {
            let mut l = PgListener::connect_with(inner.db.pool()).await?;
            l.listen(storage::CACHE_CHANNEL).await?;
            Ok::<_, sqlx::Error>(l)
        };
        let connected = tokio::select! {
            _ = shutdown.wait_for(|s| *s) => return,
            r = connect => r,
        };
        let mut listener = match connected {
            Ok(l) => l,
            Err(e) => {
                tracing::warn!(error = %e, "cache listener cannot connect; retrying in {backoff:?}");
                tokio::select! {
                    _ = shutdown.wait_for(|s| *s) => return,
                    _ = tokio::time::sleep(backoff) => {}
                }
                backoff = (backoff * 2).min(Duration::from_secs(5));
                continue;
            }
        };
        backoff = Duration::from_millis(100);
        if !first {
            flush(&inner);
        }
        first = false;
        inner.metrics.listener_connected.store(1, Relaxed);
        if let Some(r) = ready.take() {
            let _ = r.send(());
        }
        loop {
            let next = tokio::select! {
                _ = shutdown.wait_for(|s| *s) => return,
                n = listener.try_recv() => n,
            };
            match next {
                Ok(Some(n)) => match cache::parse_event(n.payload()) {
                    Invalidation::Key(id) => inner.keys.evict(id),
                    Invalidation::Org(org) => {
                        inner.providers.evict_org(org);
                        inner.models.evict(org);
                    }
                    Invalidation::All => flush(&inner),
                },
                // The connection dropped and sqlx reconnected: we may have missed changes.
                Ok(None) => {
                    tracing::warn!("cache listener reconnected; flushing caches");
                    flush(&inner);
                }
                Err(e) => {
                    tracing::warn!(error = %e, "cache listener lost its connection");
                    inner.metrics.listener_connected.store(0, Relaxed);
                    break;
                }
            }
        }
    }
}

fn flush(inner: &Inner) {
    inner.keys.flush();
    inner.providers.flush();
    inner.models.flush();
    inner.metrics.cache_flushes.fetch_add(1, Relaxed);
}

/// The request's id (client-provided when sane), kept in its extensions.
#[derive(Clone)]
pub(crate) struct RequestId(pub String);

fn sane_request_id(v: &HeaderValue) -> Option<&str> {
    let b = v.as_bytes();
    let ok = !b.is_empty()
        && b.len() <= 128
        && b.iter()
            .all(|c| c.is_ascii_alphanumeric() || matches!(c, b'-' | b'_' | b'.' | b':'));
    ok.then(|| v.to_str().ok()).flatten()
}

static X_REQUEST_ID: HeaderName = HeaderName::from_static("x-request-id");

/// Browsers must not guess a type for relayed bodies (an upstream's error
/// page rendered as HTML on the gateway's origin, say).
fn nosniff(headers: &mut actix_web::http::header::HeaderMap) {
    headers.insert(
        actix_web::http::header::X_CONTENT_TYPE_OPTIONS,
        HeaderValue::from_static("nosniff"),
    );
}

/// Middleware: request id, metrics and one log line per request.
fn observe<S, B>(
    req: ServiceRequest,
    srv: &S,
) -> impl std::future::Future<Output = Result<ServiceResponse<B>, actix_web::Error>>
where
    S: Service<ServiceRequest, Response = ServiceResponse<B>, Error = actix_web::Error>,
    B: MessageBody,
{
    let start = Instant::now();
    let id = match req.headers().get(&X_REQUEST_ID).and_then(sane_request_id) {
        Some(id) => id.to_owned(),
        None => uuid::Uuid::new_v4().to_string(),
    };
    let header = HeaderValue::from_str(&id).ok();
    req.extensions_mut().insert(RequestId(id));
    let metrics = req
        .app_data::<web::Data<Inner>>()
        .map(|d| d.metrics.clone());
    let fut = srv.call(req);
    async move {
        let mut res = fut.await?;
        if let Some(h) = header {
            res.headers_mut().insert(X_REQUEST_ID.clone(), h);
        }
        nosniff(res.headers_mut());
        let latency = start.elapsed();
        let status = res.status().as_u16();
        if let Some(m) = metrics {
            m.request(status, latency);
        }
        if tracing::enabled!(tracing::Level::INFO) {
            let rid = res
                .request()
                .extensions()
                .get::<RequestId>()
                .map(|r| r.0.clone())
                .unwrap_or_default();
            let note = res
                .response()
                .extensions()
                .get::<error::ErrorNote>()
                .cloned();
            tracing::info!(
                request_id = %rid,
                method = %res.request().method(),
                path = res.request().path(),
                status,
                latency_us = latency.as_micros() as u64,
                error = note.as_ref().map(|n| n.code),
                detail = note.as_ref().and_then(|n| n.detail.as_deref()),
                "gateway request"
            );
        }
        Ok(res)
    }
}

pub(crate) fn request_id(req: &HttpRequest) -> String {
    req.extensions()
        .get::<RequestId>()
        .map(|r| r.0.clone())
        .unwrap_or_else(|| uuid::Uuid::new_v4().to_string())
}

async fn healthz() -> HttpResponse {
    HttpResponse::Ok().json(serde_json::json!({"status": "ok"}))
}

async fn readyz(gw: web::Data<Inner>) -> HttpResponse {
    let up = tokio::time::timeout(Duration::from_secs(2), gw.db.ping())
        .await
        .unwrap_or(false);
    if up {
        HttpResponse::Ok().json(serde_json::json!({"status": "ready"}))
    } else {
        HttpResponse::ServiceUnavailable()
            .json(serde_json::json!({"status": "unavailable", "reason": "database unreachable"}))
    }
}

async fn metrics_text(gw: web::Data<Inner>) -> HttpResponse {
    HttpResponse::Ok()
        .insert_header((
            CONTENT_TYPE,
            HeaderValue::from_static("text/plain; version=0.0.4; charset=utf-8"),
        ))
        .body(gw.metrics.render(gw.usage.depth(), gw.usage.capacity()))
}

async fn not_found() -> Result<HttpResponse, GatewayError> {
    Err(GatewayError::NotFound)
}

async fn method_not_allowed() -> Result<HttpResponse, GatewayError> {
    Err(GatewayError::MethodNotAllowed)
}
