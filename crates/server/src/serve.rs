//! `llmgw serve`: both listeners, graceful shutdown on SIGTERM/SIGINT.

use std::time::Duration;

use actix_web::{web, App, HttpServer};
use upstream::{UpstreamClient, UpstreamConfig};

use crate::config::{Config, ListenAddr};
use crate::conn_cap;
use crate::database::{self, error_chain};
use crate::Listener;

/// Accepted sockets get `TCP_NODELAY`: responses written in several parts
/// (streams above all) must not wait for the client's delayed ACK.
fn nodelay(conn: &dyn std::any::Any, ext: &mut actix_web::dev::Extensions) {
    if let Some(tcp) = conn.downcast_ref::<tokio::net::TcpStream>() {
        let _ = tcp.set_nodelay(true);
    }
    ext.insert(conn_cap::InFlight::default());
}

/// How long a listener waits for a request head, and how many connections
/// it holds at once (`None`: actix's default of 25k per worker).
struct Limits {
    head_timeout: Duration,
    max_connections: Option<usize>,
    /// Also serve HTTP/2 without TLS (prior knowledge) on this listener.
    h2c: bool,
}

/// The API's clients are browsers and scripts on short requests: a head
/// that takes longer than this is not worth a connection slot.
const API_HEAD_TIMEOUT: Duration = Duration::from_secs(5);

fn bind<F>(
    name: &str,
    addr: &ListenAddr,
    workers: usize,
    limits: Limits,
    cfg: &Config,
    configure: F,
) -> Result<actix_web::dev::Server, String>
where
    F: Fn(&mut web::ServiceConfig) + Clone + Send + 'static,
{
    let mut server = HttpServer::new(move || {
        App::new()
            .wrap(actix_web::middleware::from_fn(conn_cap::limit))
            .configure(configure.clone())
    })
    .workers(workers)
    .disable_signals()
    .shutdown_timeout(cfg.shutdown_grace.as_secs().max(1))
    .client_request_timeout(limits.head_timeout)
    .on_connect(nodelay);
    if let Some(total) = limits.max_connections {
        // actix counts per worker. At the limit the listener stops
        // accepting: new connections wait in the kernel's listen queue
        // (1024) without costing the process a descriptor, and every held
        // slot frees within the head, body or keep-alive timeout (plus 1 s
        // of linger after a 408), so health checks are delayed, not starved.
        server = server.max_connections(total.div_ceil(workers).max(1));
    }
    let server = if limits.h2c {
        server.bind_auto_h2c(addr.as_str())
    } else {
        server.bind(addr.as_str())
    }
    .map_err(|e| format!("cannot listen on {addr} ({name}): {e}"))?;
    tracing::info!(%addr, bound = ?server.addrs(), listener = name, "listening");
    Ok(server.run())
}

async fn shutdown_signal() {
    let mut term = match tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate()) {
        Ok(s) => s,
        Err(e) => {
            tracing::warn!(error = %e, "cannot watch SIGTERM; only Ctrl-C stops the server");
            let _ = tokio::signal::ctrl_c().await;
            return;
        }
    };
    tokio::select! {
        _ = term.recv() => tracing::info!("SIGTERM received, shutting down"),
        _ = tokio::signal::ctrl_c() => tracing::info!("SIGINT received, shutting down"),
    }
}

pub async fn serve(cfg: Config, only: Option<Listener>) -> Result<(), String> {
    // Before the database: a bad CA file must fail fast, not after an embedded cluster started.
    let upstream = UpstreamClient::new(&UpstreamConfig {
        allow_private: cfg.allow_private,
        allow_http: cfg.allow_http,
        ca_file: cfg.ca_file.clone(),
        connect_timeout: cfg.connect_timeout,
        http2: cfg.upstream_http2,
        timeout: cfg.upstream_timeout,
    })
    .map_err(|e| format!("LLMGW_UPSTREAM_CA_FILE: {}", error_chain(&e)))?;
    if let Some(t) = &cfg.traces {
        t.client()
            .map_err(|e| format!("OTEL_EXPORTER_OTLP_CERTIFICATE: {e}"))?;
    }
    let opened = database::open(&cfg).await?;
    // Whatever happens while serving, the embedded cluster is stopped.
    let result = run(&cfg, only, opened.db.clone(), upstream).await;
    opened.close().await;
    result?;
    tracing::info!("shutdown complete");
    Ok(())
}

/// The spend controls' limiter: on Redis when `LLMGW_REDIS_URL` names one
/// (or a Cluster's nodes), else in process; raising alerts to
/// `LLMGW_ALERT_WEBHOOK_URL` when it is set.
fn limiter(cfg: &Config) -> Result<limits::Limiter, String> {
    let alerts = cfg
        .alert_webhook_url
        .as_deref()
        .map(limits::Alerts::webhook)
        .transpose()
        .map_err(|e| format!("LLMGW_ALERT_WEBHOOK_URL: {e}"))?;
    let lcfg = limits::Config {
        fail_open: cfg.limits_fail_open,
        lease_ttl: cfg.limits_lease_ttl,
        hold: cfg.limits_hold,
        alerts,
        ..limits::Config::default()
    };
    if cfg.redis_urls.is_empty() {
        tracing::warn!("LLMGW_REDIS_URL is unset: spend limits are counted in this process only; with several replicas each one admits the whole limit");
        return Ok(limits::Limiter::local(lcfg));
    }
    shared_limiter(cfg, lcfg)
}

/// A limiter on the Redis (or Cluster) of `LLMGW_REDIS_URL`.
fn shared_limiter(cfg: &Config, lcfg: limits::Config) -> Result<limits::Limiter, String> {
    match cfg.redis_urls.as_slice() {
        [one] => limits::Limiter::redis(one, lcfg),
        nodes => limits::Limiter::redis_cluster(nodes, lcfg),
    }
    .map_err(|e| format!("LLMGW_REDIS_URL: {e}"))
}

/// Longest wait for a gateway's report of endpoint health (a background
/// task; nothing waits on it).
const GATEWAY_HEALTH_TIMEOUT: Duration = Duration::from_secs(1);
/// Longest wait of an API answer for the endpoints' health (then `unknown`).
const API_HEALTH_TIMEOUT: Duration = Duration::from_millis(50);

/// Endpoint health views on the Redis (or Cluster) of `LLMGW_REDIS_URL`,
/// each call bounded by `timeout`; `None` without Redis.
fn health_views(cfg: &Config, timeout: Duration) -> Result<Option<limits::HealthViews>, String> {
    if cfg.redis_urls.is_empty() {
        return Ok(None);
    }
    limits::HealthViews::open(&cfg.redis_urls, timeout)
        .map(Some)
        .map_err(|e| format!("LLMGW_REDIS_URL: {e}"))
}

/// The API's own reader of the shared counters (for `/limits`), only with
/// Redis: without it the counters live in each gateway's memory.
fn api_limiter(cfg: &Config) -> Result<Option<limits::Limiter>, String> {
    if cfg.redis_urls.is_empty() {
        return Ok(None);
    }
    let lcfg = limits::Config {
        // A settings page may wait longer than a proxied request.
        timeout: Duration::from_millis(250),
        ..limits::Config::default()
    };
    shared_limiter(cfg, lcfg).map(Some)
}

async fn run(
    cfg: &Config,
    only: Option<Listener>,
    db: storage::Db,
    upstream: UpstreamClient,
) -> Result<(), String> {
    if cfg.allow_private {
        tracing::warn!("LLMGW_UPSTREAM_ALLOW_PRIVATE=true: upstreams on private and loopback addresses are allowed");
    }
    if cfg.allow_http {
        tracing::warn!("LLMGW_UPSTREAM_ALLOW_HTTP=true: plain-http upstreams are allowed; their requests and provider tokens travel unencrypted");
    }

    let maintenance = tokio::spawn(maintain_log_partitions(db.clone(), cfg.log_retention_days));
    let result = listen(cfg, only, db, upstream).await;
    maintenance.abort();
    result
}

/// How often every process makes the coming days' partitions of
/// `request_logs` and drops those past the retention.
const LOG_PARTITIONS_EVERY: Duration = Duration::from_secs(3600);

/// At start and hourly, in every process: a failure is logged, and the next
/// hour tries again (the partitions are made a week ahead).
async fn maintain_log_partitions(db: storage::Db, retention_days: u32) {
    let mut every = tokio::time::interval(LOG_PARTITIONS_EVERY);
    every.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        every.tick().await;
        match db.maintain_log_partitions(Some(retention_days)).await {
            Ok(done) => tracing::debug!(
                created = done.created,
                dropped = ?done.dropped,
                rollups_deleted = done.rollups_deleted,
                "usage log partitions maintained"
            ),
            Err(e) => tracing::warn!(
                error = %error_chain(&e),
                "cannot maintain the usage log partitions; trying again in an hour"
            ),
        }
    }
}

async fn listen(
    cfg: &Config,
    only: Option<Listener>,
    db: storage::Db,
    upstream: UpstreamClient,
) -> Result<(), String> {
    let mut servers = Vec::new();
    let mut gateway = None;
    if only != Some(Listener::Api) {
        let limiter = limiter(cfg)?;
        let gw = gateway::Gateway::start(
            db.clone(),
            gateway::GatewayConfig {
                max_body_bytes: cfg.max_body_bytes,
                upstream: upstream.clone(),
                cache_ttl: cfg.cache_ttl,
                log_queue_capacity: cfg.log_queue_capacity,
                log_batch_size: cfg.log_batch_size,
                log_flush_interval: cfg.log_flush_interval,
                models_cache_ttl: Duration::from_secs(60),
                metrics_on_gateway: cfg.metrics_addr.is_none(),
                limiter,
                health_views: health_views(cfg, GATEWAY_HEALTH_TIMEOUT)?,
                traces: cfg.traces.clone(),
                ..gateway::GatewayConfig::new(upstream.clone())
            },
        )
        .await;
        let g = gw.clone();
        servers.push(bind(
            "gateway",
            &cfg.gateway_addr,
            cfg.gateway_workers,
            Limits {
                head_timeout: Duration::from_secs(30),
                max_connections: None,
                h2c: true,
            },
            cfg,
            move |c| g.configure(c),
        )?);
        if let Some(addr) = &cfg.metrics_addr {
            let g = gw.clone();
            let limits = Limits {
                head_timeout: API_HEAD_TIMEOUT,
                max_connections: Some(64),
                h2c: false,
            };
            servers.push(bind("metrics", addr, 1, limits, cfg, move |c| {
                g.configure_metrics(c)
            })?);
        }
        gateway = Some(gw);
    }
    if only != Some(Listener::Gateway) {
        let api = api::Api::with_sso(
            db.clone(),
            api::ApiConfig {
                allow_signup: cfg.allow_signup,
                session_ttl: cfg.session_ttl,
                session_idle: cfg.session_idle,
                body_timeout: cfg.api_body_timeout,
                max_body_bytes: cfg.max_body_bytes,
                allow_private: cfg.allow_private,
                upstream: upstream.clone(),
                trusted_proxies: cfg.trusted_proxies.clone(),
                browser: api::BrowserConfig {
                    public_url: cfg.public_url.clone(),
                    gateway_public_url: cfg.gateway_public_url.clone(),
                    password_login: cfg.sso.password_login,
                    sso: cfg.sso.oidc.is_some(),
                },
                limiter: api_limiter(cfg)?,
                health: health_views(cfg, API_HEALTH_TIMEOUT)?,
            },
            cfg.sso.clone(),
        )
        .map_err(|e| e.to_string())?;
        if let Some(url) = &cfg.public_url {
            tracing::info!(public_url = %url, "browsers reach the API listener here");
        }
        if let Some(oidc) = &cfg.sso.oidc {
            tracing::info!(
                issuer = %oidc.issuer,
                redirect_uri = %format!("{}/api/v1/auth/oidc/callback", oidc.public_url),
                "single sign-on by OpenID Connect is on"
            );
        }
        // HTTP/1 only: nothing on the API needs HTTP/2, and h2c would let
        // one connection run any number of logins at once.
        let limits = Limits {
            head_timeout: API_HEAD_TIMEOUT,
            max_connections: Some(cfg.api_max_connections),
            h2c: false,
        };
        servers.push(bind("api", &cfg.api_addr, 2, limits, cfg, move |c| {
            api.configure(c)
        })?);
    }

    let handles: Vec<_> = servers.iter().map(|s| s.handle()).collect();
    let mut running = tokio::spawn(futures_util::future::join_all(servers));
    tokio::select! {
        _ = shutdown_signal() => {}
        r = &mut running => {
            // A server future ended on its own: report and shut down the rest.
            tracing::error!(?r, "a listener stopped unexpectedly");
        }
    }
    // The whole shutdown fits in the grace period plus the bounded flush
    // that follows: each phase gets what the previous ones left.
    let grace = cfg.shutdown_grace;
    let deadline = tokio::time::Instant::now() + grace;
    let mut graceful = true;
    if let Some(gw) = &gateway {
        // Stop accepting, but keep every worker running while proxied
        // requests drain: a database connection opened on one worker's
        // runtime is shared through the pool and dies with that runtime, so a
        // worker that finished early could break the others' requests.
        let pausing = futures_util::future::join_all(handles.iter().map(|h| h.pause()));
        if tokio::time::timeout_at(deadline, pausing).await.is_err() {
            tracing::warn!("the listeners did not pause within the grace period");
        }
        gw.begin_shutdown();
        tracing::info!(in_flight = gw.in_flight(), "draining proxied requests");
        while gw.in_flight() > 0 && tokio::time::Instant::now() < deadline {
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        // Whatever still runs when the grace period is over is cut now.
        graceful = gw.in_flight() == 0;
    }
    // Stop; requests still in flight (API calls, idle keep-alive
    // connections) get what is left of the grace period, then are cut.
    tracing::info!(graceful, "stopping the listeners");
    let stopping = futures_util::future::join_all(handles.iter().map(|h| h.stop(graceful)));
    let left = deadline + Duration::from_secs(1);
    if tokio::time::timeout_at(left, stopping).await.is_err() {
        tracing::warn!(
            ?grace,
            "in-flight requests did not finish within the grace period; cutting them"
        );
        let cutting = futures_util::future::join_all(handles.iter().map(|h| h.stop(false)));
        let _ = tokio::time::timeout(Duration::from_secs(2), cutting).await;
    }
    if let Some(gw) = gateway {
        tracing::info!("writing the last usage rows");
        gw.shutdown().await;
    }
    Ok(())
}
