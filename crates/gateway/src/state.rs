//! What every request handler shares: the database, the upstream client,
//! the caches, the usage queue and the metrics.

use std::collections::HashSet;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use storage::Db;
use tokio::sync::watch;
use tokio::task::JoinHandle;
use uuid::Uuid;

use crate::cache::{KeyCache, ProviderCache};
use crate::metrics::Metrics;
use crate::models::ModelsCache;
use crate::responses::ResponseRoutes;
use crate::usage::UsageQueue;

/// The gateway's state, one per process, behind `web::Data`.
pub(crate) struct State {
    pub db: Db,
    pub client: upstream::UpstreamClient,
    pub max_body: usize,
    pub max_response: usize,
    pub body_timeout: Duration,
    pub metrics_on_gateway: bool,
    pub keys: KeyCache,
    pub providers: ProviderCache,
    pub models: ModelsCache,
    /// Which provider created each Responses API object this replica has seen.
    pub responses: ResponseRoutes,
    pub usage: Arc<UsageQueue>,
    /// What this process has seen of each endpoint's health.
    pub health: Arc<crate::balance::HealthTable>,
    /// Retries earned by requests (about one in ten).
    pub retries: crate::retry::RetryBudget,
    /// Spend controls (on Redis, or in process).
    pub limiter: limits::Limiter,
    pub metrics: Arc<Metrics>,
    /// `Some` when traces are exported (`OTEL_EXPORTER_OTLP_*ENDPOINT`); `None` costs nothing.
    pub tracer: Option<Arc<crate::traces::Tracer>>,
    /// The trace exporter's task, awaited at shutdown for its last batch.
    pub exporter: Mutex<Option<JoinHandle<()>>>,
    pub shutdown: watch::Sender<bool>,
    pub tasks: Mutex<Vec<JoinHandle<()>>>,
    pub writer: Mutex<Option<JoinHandle<()>>>,
    /// Providers (by id) and endpoints that answered 400 to `stream_options.include_usage`.
    pub refuses_stream_usage: Mutex<HashSet<(Uuid, &'static str)>>,
}

impl State {
    /// Whether this provider refused `stream_options.include_usage` on this endpoint.
    pub fn refuses_stream_usage(&self, provider: Uuid, endpoint: &'static str) -> bool {
        self.refuses_stream_usage
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .contains(&(provider, endpoint))
    }

    /// Remembers (for the life of the process) that this provider refuses the field.
    pub fn remember_stream_usage_refused(&self, provider: Uuid, endpoint: &'static str) {
        self.refuses_stream_usage
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .insert((provider, endpoint));
    }

    /// Empties every cache (a missed notification could have left any entry stale).
    pub fn flush_caches(&self) {
        self.keys.flush();
        self.providers.flush();
        self.models.flush();
        self.metrics
            .cache_flushes
            .fetch_add(1, std::sync::atomic::Ordering::Relaxed);
    }
}
