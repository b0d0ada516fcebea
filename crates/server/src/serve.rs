//! `llmgw serve`: both listeners, graceful shutdown on SIGTERM/SIGINT.

use std::time::Duration;

use actix_web::{web, App, HttpServer};
use upstream::{UpstreamClient, UpstreamConfig};

use crate::config::Config;
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

/// A cap on the requests one connection has in flight. actix-http does not
/// expose HTTP/2's `SETTINGS_MAX_CONCURRENT_STREAMS`, so one h2c connection
/// could otherwise open streams without end; each stream past the cap is
/// answered at once (429) and freed. HTTP/1 serves one request of a
/// connection at a time, so there the cap never bites.
mod conn_cap {
    use std::pin::Pin;
    use std::sync::atomic::{AtomicUsize, Ordering};
    use std::sync::Arc;
    use std::task::{Context, Poll};

    use actix_web::body::{BodySize, BoxBody, EitherBody, MessageBody};
    use actix_web::dev::{ServiceRequest, ServiceResponse};
    use actix_web::middleware::Next;
    use actix_web::web::Bytes;
    use actix_web::HttpResponse;

    /// Requests of one connection at most in flight (headers to last body byte).
    pub const MAX_IN_FLIGHT_PER_CONNECTION: usize = 100;

    /// The per-connection counter, set by `on_connect`.
    #[derive(Clone, Default)]
    pub struct InFlight(Arc<AtomicUsize>);

    struct Slot(Arc<AtomicUsize>);

    impl Drop for Slot {
        fn drop(&mut self) {
            self.0.fetch_sub(1, Ordering::AcqRel);
        }
    }

    /// The response body, holding its connection slot until it is sent or dropped.
    pub struct Held {
        body: BoxBody,
        _slot: Slot,
    }

    impl MessageBody for Held {
        type Error = Box<dyn std::error::Error>;

        fn size(&self) -> BodySize {
            self.body.size()
        }

        fn poll_next(
            self: Pin<&mut Self>,
            cx: &mut Context<'_>,
        ) -> Poll<Option<Result<Bytes, Self::Error>>> {
            Pin::new(&mut self.get_mut().body).poll_next(cx)
        }
    }

    pub async fn limit(
        req: ServiceRequest,
        next: Next<impl MessageBody + 'static>,
    ) -> Result<ServiceResponse<EitherBody<Held, BoxBody>>, actix_web::Error> {
        let Some(counter) = req.conn_data::<InFlight>().map(|c| c.0.clone()) else {
            let res = next.call(req).await?;
            return Ok(res.map_into_boxed_body().map_into_right_body());
        };
        let slot = Slot(counter.clone());
        if counter.fetch_add(1, Ordering::AcqRel) >= MAX_IN_FLIGHT_PER_CONNECTION {
            drop(slot);
            // Refused outside the gateway's own middleware: give it the
            // headers every gateway answer carries.
            let refused = HttpResponse::TooManyRequests()
                .insert_header(("retry-after", "1"))
                .insert_header(("x-content-type-options", "nosniff"))
                .insert_header(("x-request-id", uuid::Uuid::new_v4().to_string()))
                .json(serde_json::json!({"error": {
                    "message": format!("at most {MAX_IN_FLIGHT_PER_CONNECTION} requests may be in flight on one connection; open another connection or wait"),
                    "type": "rate_limit_exceeded",
                    "param": null,
                    "code": "rate_limit_exceeded",
                }}));
            return Ok(req.into_response(refused).map_into_right_body());
        }
        let res = next.call(req).await?;
        Ok(res
            .map_into_boxed_body()
            .map_body(|_, body| Held { body, _slot: slot })
            .map_into_left_body())
    }
}

/// `h2c`: also serve HTTP/2 without TLS (prior knowledge) on this listener.
fn bind<F>(
    name: &str,
    addr: std::net::SocketAddr,
    workers: usize,
    cfg: &Config,
    h2c: bool,
    configure: F,
) -> Result<actix_web::dev::Server, String>
where
    F: Fn(&mut web::ServiceConfig) + Clone + Send + 'static,
{
    let server = HttpServer::new(move || {
        App::new()
            .wrap(actix_web::middleware::from_fn(conn_cap::limit))
            .configure(configure.clone())
    })
    .workers(workers)
    .disable_signals()
    .shutdown_timeout(cfg.shutdown_grace.as_secs().max(1))
    .client_request_timeout(Duration::from_secs(30))
    .on_connect(nodelay);
    let server = if h2c {
        server.bind_auto_h2c(addr)
    } else {
        server.bind(addr)
    }
    .map_err(|e| format!("cannot listen on {addr} ({name}): {e}"))?;
    tracing::info!(%addr, listener = name, "listening");
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
    let opened = database::open(&cfg).await?;
    let db = opened.db.clone();
    let upstream = UpstreamClient::new(&UpstreamConfig {
        allow_private: cfg.allow_private,
        ca_file: cfg.ca_file.clone(),
        connect_timeout: cfg.connect_timeout,
        http2: cfg.upstream_http2,
        timeout: cfg.upstream_timeout,
    })
    .map_err(|e| format!("LLMGW_UPSTREAM_CA_FILE: {}", error_chain(&e)))?;
    if cfg.allow_private {
        tracing::warn!("LLMGW_UPSTREAM_ALLOW_PRIVATE=true: upstreams on private and loopback addresses are allowed");
    }

    let mut servers = Vec::new();
    let mut gateway = None;
    if only != Some(Listener::Api) {
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
                ..gateway::GatewayConfig::new(upstream.clone())
            },
        )
        .await;
        let g = gw.clone();
        servers.push(bind(
            "gateway",
            cfg.gateway_addr,
            cfg.gateway_workers,
            &cfg,
            true,
            move |c| g.configure(c),
        )?);
        gateway = Some(gw);
    }
    if only != Some(Listener::Gateway) {
        let api = api::Api::new(
            db.clone(),
            api::ApiConfig {
                allow_signup: cfg.allow_signup,
                session_ttl: cfg.session_ttl,
                max_body_bytes: cfg.max_body_bytes,
                allow_private: cfg.allow_private,
                upstream: upstream.clone(),
                trusted_proxies: cfg.trusted_proxies.clone(),
            },
        );
        // HTTP/1 only: nothing on the API needs HTTP/2, and h2c would let
        // one connection run any number of logins at once.
        servers.push(bind("api", cfg.api_addr, 2, &cfg, false, move |c| {
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
    let grace = cfg.shutdown_grace;
    let deadline = tokio::time::Instant::now() + grace;
    let mut graceful = true;
    if let Some(gw) = &gateway {
        // Stop accepting, but keep every worker running while proxied
        // requests drain: a database connection opened on one worker's
        // runtime is shared through the pool and dies with that runtime, so a
        // worker that finished early could break the others' requests.
        futures_util::future::join_all(handles.iter().map(|h| h.pause())).await;
        gw.begin_shutdown();
        while gw.in_flight() > 0 && tokio::time::Instant::now() < deadline {
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        // Whatever still runs when the grace period is over is cut now.
        graceful = gw.in_flight() == 0;
    }
    // Stop; requests still in flight (API calls) get up to the grace period.
    let stopping = futures_util::future::join_all(handles.iter().map(|h| h.stop(graceful)));
    if tokio::time::timeout(grace + Duration::from_secs(1), stopping)
        .await
        .is_err()
    {
        tracing::warn!(
            ?grace,
            "in-flight requests did not finish within the grace period"
        );
    }
    if let Some(gw) = gateway {
        gw.shutdown().await;
    }
    // Bounded: closing the pool waits for checked-out connections.
    if tokio::time::timeout(Duration::from_secs(10), opened.close())
        .await
        .is_err()
    {
        tracing::warn!("database pool did not close within 10s");
    }
    tracing::info!("shutdown complete");
    Ok(())
}
