//! Usage rows: a bounded queue filled on the request path without waiting,
//! drained by one writer task in batched inserts. A row that cannot be
//! queued or written is counted in a metric and logged, never lost silently.

use std::collections::HashMap;
use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering::Relaxed};
use std::sync::Arc;
use std::time::{Duration, Instant};

use chrono::{DateTime, Utc};
use storage::logs::RequestLog;
use storage::{Db, StorageError};
use tokio::sync::{mpsc, watch};
use uuid::Uuid;

use crate::admit::Charge;
use crate::balance::Outstanding;
use crate::error::ErrorClass;
use crate::traces::{RequestTrace, TraceHeaders};

/// A usage row and the endpoint it is for.
pub(crate) type Queued = (RequestLog, &'static str);
use crate::metrics::Metrics;

/// The sending side, shared by every request.
pub(crate) struct UsageQueue {
    tx: mpsc::Sender<Queued>,
    closed: AtomicBool,
    /// Set when shutdown begins: requests dropped from now on were cut by it.
    stopping: AtomicBool,
    /// Rows not queued yet: one per live `LogGuard`.
    pending: AtomicUsize,
    /// Rows taken off the channel by the writer and not yet written.
    in_hand: AtomicU64,
    metrics: Arc<Metrics>,
    last_drop_warning: AtomicU64,
    epoch: Instant,
}

impl UsageQueue {
    pub fn new(capacity: usize, metrics: Arc<Metrics>) -> (Arc<Self>, mpsc::Receiver<Queued>) {
        let (tx, rx) = mpsc::channel(capacity.max(1));
        let q = Arc::new(Self {
            tx,
            closed: AtomicBool::new(false),
            stopping: AtomicBool::new(false),
            pending: AtomicUsize::new(0),
            in_hand: AtomicU64::new(0),
            metrics,
            last_drop_warning: AtomicU64::new(0),
            epoch: Instant::now(),
        });
        (q, rx)
    }

    /// Queues a row without waiting; a full or closed queue drops it, counted.
    pub fn push(&self, row: Queued) {
        if self.closed.load(Relaxed) {
            self.dropped(1, "the gateway is shutting down");
            return;
        }
        if self.tx.try_send(row).is_err() {
            self.dropped(1, "the usage queue is full (is the database down?)");
        }
    }

    pub(crate) fn dropped(&self, n: u64, why: &str) {
        self.metrics.rows_dropped.fetch_add(n, Relaxed);
        // At most one warning per second: a flood of drops must not become a flood of logs.
        let now = self.epoch.elapsed().as_secs() + 1;
        if self.last_drop_warning.swap(now, Relaxed) != now {
            tracing::warn!(
                dropped = n,
                total_dropped = self.metrics.rows_dropped.load(Relaxed),
                "usage rows dropped: {why}"
            );
        }
    }

    pub fn depth(&self) -> usize {
        self.tx.max_capacity() - self.tx.capacity() + self.in_hand.load(Relaxed) as usize
    }

    pub fn capacity(&self) -> usize {
        self.tx.max_capacity()
    }

    /// Marks the start of shutdown; rows keep being taken until `close`.
    pub fn begin_stopping(&self) {
        self.stopping.store(true, Relaxed);
    }

    /// Requests still holding their row (in flight, or being dropped by a stopping worker).
    pub fn pending(&self) -> usize {
        self.pending.load(Relaxed)
    }

    pub fn close(&self) {
        self.closed.store(true, Relaxed);
    }
}

/// How the writer batches.
pub(crate) struct WriterConfig {
    pub batch_size: usize,
    pub flush_interval: Duration,
    /// How long shutdown keeps retrying an unreachable database.
    pub shutdown_budget: Duration,
}

pub(crate) struct Writer {
    db: Db,
    rx: mpsc::Receiver<Queued>,
    queue: Arc<UsageQueue>,
    cfg: WriterConfig,
    shutdown: watch::Receiver<bool>,
    /// Set once shutdown began: retries stop at this instant.
    deadline: Option<Instant>,
    touches: HashMap<Uuid, DateTime<Utc>>,
}

impl Writer {
    pub fn new(
        db: Db,
        rx: mpsc::Receiver<Queued>,
        queue: Arc<UsageQueue>,
        cfg: WriterConfig,
        shutdown: watch::Receiver<bool>,
    ) -> Self {
        Self {
            db,
            rx,
            queue,
            cfg,
            shutdown,
            deadline: None,
            touches: HashMap::new(),
        }
    }

    fn begin_shutdown(&mut self) {
        if self.deadline.is_none() {
            self.deadline = Some(Instant::now() + self.cfg.shutdown_budget);
        }
    }

    /// Waits for the shutdown signal (forever once it has been seen).
    async fn stopped(shutdown: &mut watch::Receiver<bool>, seen: bool) {
        if seen {
            return std::future::pending().await;
        }
        let _ = shutdown.wait_for(|s| *s).await;
    }

    pub async fn run(mut self) {
        let batch = self.cfg.batch_size.max(1);
        let mut buf: Vec<Queued> = Vec::with_capacity(batch);
        // The writer drains on a timer and never waits on the channel: a
        // waiting receiver would be woken by every row, and that wake-up (a
        // cross-thread context switch) would be paid on the request path.
        let mut tick = tokio::time::interval(self.cfg.flush_interval);
        tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        while self.deadline.is_none() {
            tokio::select! {
                biased;
                _ = Self::stopped(&mut self.shutdown, false) => { self.begin_shutdown(); break; }
                _ = tick.tick() => {}
            }
            // Everything queued so far, in batches of at most `batch` rows.
            loop {
                while buf.len() < batch {
                    match self.rx.try_recv() {
                        Ok(row) => buf.push(row),
                        Err(_) => break,
                    }
                }
                let full = buf.len() == batch;
                self.write(&mut buf).await;
                if !full || self.deadline.is_some() {
                    break;
                }
            }
        }
        // Shutdown: take what is queued and write it within the budget.
        self.begin_shutdown();
        self.rx.close();
        loop {
            if self.rx.recv_many(&mut buf, batch).await == 0 {
                break;
            }
            self.write(&mut buf).await;
        }
        self.touch().await;
    }

    /// Writes one batch, retrying while the database is unreachable.
    async fn write(&mut self, rows: &mut Vec<Queued>) {
        if rows.is_empty() {
            return;
        }
        let n = rows.len() as u64;
        self.queue.in_hand.store(n, Relaxed);
        let mut backoff = Duration::from_millis(100);
        loop {
            match bounded_write(self.db.insert_request_logs_at(rows)).await {
                Ok(()) => {
                    self.queue.metrics.rows_written.fetch_add(n, Relaxed);
                    break;
                }
                Err(e) if e.is_unavailable() && !e.is_closed() => {
                    let now = Instant::now();
                    if self.deadline.is_some_and(|d| now >= d) {
                        self.queue
                            .dropped(n, "the database stayed unreachable during shutdown");
                        tracing::error!(
                            rows = n,
                            "usage rows not written: database unreachable at shutdown"
                        );
                        rows.clear();
                        self.queue.in_hand.store(0, Relaxed);
                        return;
                    }
                    tracing::warn!(rows = n, error = %e, "cannot write usage rows; retrying");
                    let wait = match self.deadline {
                        Some(d) => backoff.min(d.saturating_duration_since(now)),
                        None => backoff,
                    };
                    let seen = self.deadline.is_some();
                    tokio::select! {
                        _ = tokio::time::sleep(wait) => {}
                        _ = Self::stopped(&mut self.shutdown, seen) => self.begin_shutdown(),
                    }
                    backoff = (backoff * 2).min(Duration::from_secs(5));
                }
                Err(e) if e.is_unavailable() => {
                    self.queue.dropped(n, "the database pool is closed");
                    tracing::error!(rows = n, "usage rows not written: database pool closed");
                    rows.clear();
                    self.queue.in_hand.store(0, Relaxed);
                    return;
                }
                Err(e) => {
                    // The batch was refused as a whole: find the rows at fault.
                    tracing::error!(rows = n, error = ?e, "usage batch refused; writing rows one by one");
                    for row in rows.iter() {
                        match bounded_write(
                            self.db.insert_request_logs_at(std::slice::from_ref(row)),
                        )
                        .await
                        {
                            Ok(()) => self.queue.metrics.rows_written.fetch_add(1, Relaxed),
                            Err(e) => {
                                tracing::error!(request_id = %row.0.request_id, error = ?e, "usage row refused");
                                self.queue.metrics.rows_failed.fetch_add(1, Relaxed)
                            }
                        };
                    }
                    break;
                }
            }
        }
        for (row, _) in rows.iter() {
            if let Some(key) = row.api_key_id {
                let t = self.touches.entry(key).or_insert(row.created_at);
                *t = (*t).max(row.created_at);
            }
        }
        rows.clear();
        self.queue.in_hand.store(0, Relaxed);
        self.touch().await;
    }

    /// Records `last_used_at`; kept for the next batch when it fails.
    async fn touch(&mut self) {
        if self.touches.is_empty() {
            return;
        }
        let uses: Vec<(Uuid, DateTime<Utc>)> = self.touches.iter().map(|(k, t)| (*k, *t)).collect();
        match bounded_write(self.db.touch_api_keys(&uses)).await {
            Ok(()) => self.touches.clear(),
            Err(e) => {
                tracing::warn!(error = %e, keys = uses.len(), "cannot record API key last use; will retry")
            }
        }
    }
}

/// A write that hangs (a database that stopped answering without closing
/// its connections) counts as unavailable after this long, so the retry and
/// shutdown-deadline logic applies instead of waiting forever.
const WRITE_TIMEOUT: Duration = Duration::from_secs(10);

async fn bounded_write(
    write: impl std::future::Future<Output = Result<(), StorageError>>,
) -> Result<(), StorageError> {
    tokio::time::timeout(WRITE_TIMEOUT, write)
        .await
        .unwrap_or(Err(StorageError::timed_out()))
}

/// One request's usage row, queued when dropped: whatever way the request
/// ends (answer, error, client gone), exactly one row is written.
pub(crate) struct LogGuard {
    queue: Arc<UsageQueue>,
    metrics: Arc<Metrics>,
    pub row: RequestLog,
    /// `request_logs.endpoint`: the path after `/v1/`.
    pub endpoint: &'static str,
    /// The spend controls' hold on an admitted request, settled with this row.
    pub charge: Option<Charge>,
    /// The endpoint that answered counts this request as outstanding until the row is finished.
    pub outstanding: Option<Outstanding>,
    /// Upstream calls made (retries and fallbacks included), and the endpoint of the last.
    pub attempts: u32,
    pub endpoint_id: Option<Uuid>,
    /// With fallbacks: the `{customName}/{modelName}` that served (`x-llmgw-model`).
    pub served: Option<String>,
    /// The request's trace, when traces are on; ended with the row.
    pub trace: Option<Box<RequestTrace>>,
    start: Instant,
    finished: bool,
}

impl LogGuard {
    pub fn new(
        queue: Arc<UsageQueue>,
        metrics: Arc<Metrics>,
        request_id: String,
        org_id: Uuid,
        api_key_id: Uuid,
        endpoint: &'static str,
        start: Instant,
    ) -> Self {
        queue.pending.fetch_add(1, Relaxed);
        Self {
            queue,
            metrics,
            row: RequestLog {
                id: Uuid::new_v4(),
                request_id,
                org_id,
                api_key_id: Some(api_key_id),
                // 499 (client closed request) until something else is known.
                status_code: 499,
                created_at: Utc::now(),
                ..empty_row()
            },
            endpoint,
            charge: None,
            outstanding: None,
            attempts: 0,
            endpoint_id: None,
            served: None,
            trace: None,
            start,
            finished: false,
        }
    }

    pub fn elapsed(&self) -> Duration {
        self.start.elapsed()
    }

    pub fn elapsed_ms(&self) -> i32 {
        self.start.elapsed().as_millis().min(i32::MAX as u128) as i32
    }

    pub fn set_ttfb(&mut self) {
        self.row.ttfb_ms = Some(self.elapsed_ms());
    }

    /// The request ended (well or not) before the client went away.
    pub fn finish(&mut self, status: u16, error_class: Option<ErrorClass>) {
        self.row.status_code = status.clamp(100, 599) as i16;
        if let Some(c) = error_class {
            self.row.error_class = Some(c.as_str().to_owned());
        }
        self.row.latency_ms = self.elapsed_ms();
        self.finished = true;
    }

    /// Opens an upstream attempt's client span (traces on) and returns the headers that carry it.
    pub fn begin_attempt(
        &mut self,
        method: &reqwest::Method,
        url: &reqwest::Url,
    ) -> Option<TraceHeaders> {
        let row = &self.row;
        let trace = self.trace.as_mut()?;
        Some(trace.begin_attempt(
            method.as_str(),
            row.provider_name.as_deref(),
            row.upstream_model.as_deref(),
            url,
        ))
    }

    /// The open attempt got an answer's head.
    pub fn attempt_answered(&mut self, status: u16) {
        if let Some(t) = &mut self.trace {
            t.attempt_answered(status);
        }
    }

    /// An attempt's outcome: an answer's head, or the gateway's error.
    pub fn attempt_result(&mut self, r: &Result<reqwest::Response, crate::GatewayError>) {
        match r {
            Ok(r) => self.attempt_answered(r.status().as_u16()),
            Err(e) => self.attempt_failed(e.class().as_str()),
        }
    }

    /// The open attempt failed without an answer (`error.type`).
    pub fn attempt_failed(&mut self, error_type: &str) {
        if let Some(t) = &mut self.trace {
            t.attempt_failed(error_type);
        }
    }

    /// The open attempt is over (its answer will not be used).
    pub fn end_attempt(&mut self) {
        if let Some(t) = &mut self.trace {
            t.end_attempt();
        }
    }

    pub fn set_usage(&mut self, u: Usage) {
        // The column refuses negatives; an upstream that sends them gets none recorded.
        let ok = |v: Option<i64>| v.filter(|v| *v >= 0);
        self.row.prompt_tokens = ok(u.prompt_tokens);
        self.row.completion_tokens = ok(u.completion_tokens);
        self.row.total_tokens = ok(u.total_tokens);
    }
}

impl Drop for LogGuard {
    fn drop(&mut self) {
        if !self.finished {
            self.row.canceled = true;
            self.row.latency_ms = self.elapsed_ms();
            // Unfinished during the drain: most likely cut by the end of the grace period.
            let why = if self.queue.stopping.load(Relaxed) {
                ErrorClass::Shutdown
            } else {
                ErrorClass::ClientCanceled
            };
            self.row
                .error_class
                .get_or_insert_with(|| why.as_str().to_owned());
            self.metrics.streams_canceled.fetch_add(1, Relaxed);
        }
        if self.attempts > 0 {
            self.row.attempts = Some(self.attempts.min(i16::MAX as u32) as i16);
            self.row.endpoint_id = self.endpoint_id;
        }
        if let Some(charge) = self.charge.take() {
            charge.settle(&self.row);
        }
        if let Some(trace) = self.trace.take() {
            trace.finish(&self.row, self.endpoint);
        }
        let row = std::mem::replace(&mut self.row, empty_row());
        self.queue.push((row, self.endpoint));
        self.queue.pending.fetch_sub(1, Relaxed);
    }
}

fn empty_row() -> RequestLog {
    RequestLog {
        id: Uuid::nil(),
        request_id: String::new(),
        org_id: Uuid::nil(),
        api_key_id: None,
        provider_key_id: None,
        provider_name: None,
        requested_model: None,
        upstream_model: None,
        status_code: 0,
        streamed: false,
        canceled: false,
        prompt_tokens: None,
        completion_tokens: None,
        total_tokens: None,
        latency_ms: 0,
        ttfb_ms: None,
        error_class: None,
        created_at: DateTime::<Utc>::MIN_UTC,
        endpoint_id: None,
        attempts: None,
    }
}

/// OpenAI's `usage` object (fields we record). The Responses API names the
/// same counts `input_tokens` and `output_tokens`.
#[derive(Debug, Default, Clone, Copy, serde::Deserialize)]
pub(crate) struct Usage {
    #[serde(default, alias = "input_tokens")]
    pub prompt_tokens: Option<i64>,
    #[serde(default, alias = "output_tokens")]
    pub completion_tokens: Option<i64>,
    #[serde(default)]
    pub total_tokens: Option<i64>,
}

#[derive(serde::Deserialize)]
struct WithUsage {
    #[serde(default)]
    usage: Option<Usage>,
    /// A streamed Responses API event (`response.completed`) carries it here.
    #[serde(default)]
    response: Option<Nested>,
}

#[derive(serde::Deserialize)]
struct Nested {
    #[serde(default)]
    usage: Option<Usage>,
}

/// The `usage` of a JSON answer or SSE chunk, if it has one.
pub(crate) fn usage_of(json: &[u8]) -> Option<Usage> {
    let w = serde_json::from_slice::<WithUsage>(json).ok()?;
    w.usage.or_else(|| w.response?.usage)
}
