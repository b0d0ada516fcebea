//! The OTLP/HTTP exporter of [`crate::traces`]: finished spans go into a
//! bounded queue without waiting, and one task POSTs them in batches as
//! OTLP JSON (`application/json`, the protocol's `ExportTraceServiceRequest`)
//! to the collector. A full queue, a failed or slow POST drops spans,
//! counted in `llmgw_gateway_trace_spans_dropped_total`: the request path
//! never waits on the collector, and memory stays bounded by the queue.

use std::path::PathBuf;
use std::sync::atomic::Ordering::Relaxed;
use std::sync::Arc;
use std::time::{Duration, Instant};

use serde_json::{json, Value as Json};
use tokio::sync::{mpsc, watch};

use crate::metrics::Metrics;
use crate::traces::{to_hex, SpanData, Value};

/// Where and how traces are exported (the `OTEL_*` settings).
#[derive(Clone, PartialEq)]
pub struct TraceConfig {
    /// The collector's traces URL (`OTEL_EXPORTER_OTLP_TRACES_ENDPOINT`, or
    /// `OTEL_EXPORTER_OTLP_ENDPOINT` + `/v1/traces`).
    pub endpoint: reqwest::Url,
    /// `OTEL_EXPORTER_OTLP_HEADERS`: sent with every export (often a token).
    pub headers: reqwest::header::HeaderMap,
    /// `OTEL_SERVICE_NAME`: the resource's `service.name`.
    pub service_name: String,
    /// `OTEL_TRACES_SAMPLER_ARG`: the share of new traces recorded (0 to 1).
    pub sample_ratio: f64,
    /// `OTEL_BSP_MAX_QUEUE_SIZE`: spans held while the collector is slow; more are dropped.
    pub queue_capacity: usize,
    /// Spans per POST at most.
    pub batch_size: usize,
    /// `OTEL_BSP_SCHEDULE_DELAY`: how long spans gather before a POST.
    pub schedule_delay: Duration,
    /// `OTEL_EXPORTER_OTLP_TIMEOUT`: the longest a POST may take.
    pub export_timeout: Duration,
    /// `OTEL_EXPORTER_OTLP_CERTIFICATE`: PEM roots trusted for the collector, besides the built-in ones.
    pub ca_file: Option<PathBuf>,
}

impl TraceConfig {
    /// The OpenTelemetry defaults for a collector at `endpoint`.
    pub fn new(endpoint: reqwest::Url) -> Self {
        Self {
            endpoint,
            headers: reqwest::header::HeaderMap::new(),
            service_name: "llmgw".into(),
            sample_ratio: 1.0,
            queue_capacity: 2048,
            batch_size: 512,
            schedule_delay: Duration::from_secs(5),
            export_timeout: Duration::from_secs(10),
            ca_file: None,
        }
    }

    /// The HTTP client of the exports (checked at startup: a bad CA file fails there).
    pub fn client(&self) -> Result<reqwest::Client, String> {
        let mut b = reqwest::Client::builder()
            .timeout(self.export_timeout)
            .redirect(reqwest::redirect::Policy::none());
        if let Some(path) = &self.ca_file {
            let pem =
                std::fs::read(path).map_err(|e| format!("cannot read {}: {e}", path.display()))?;
            let roots = reqwest::Certificate::from_pem_bundle(&pem)
                .ok()
                .filter(|r| !r.is_empty())
                .ok_or_else(|| format!("{} holds no PEM certificate", path.display()))?;
            for r in roots {
                b = b.add_root_certificate(r);
            }
        }
        b.build()
            .map_err(|e| format!("cannot build the HTTP client ({e})"))
    }
}

impl std::fmt::Debug for TraceConfig {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        // Header values are often credentials: only their names are shown.
        f.debug_struct("TraceConfig")
            .field("endpoint", &self.endpoint.as_str())
            .field("headers", &self.headers.keys().collect::<Vec<_>>())
            .field("service_name", &self.service_name)
            .field("sample_ratio", &self.sample_ratio)
            .finish_non_exhaustive()
    }
}

/// The request path's end of the queue.
pub(crate) struct Exporter {
    tx: mpsc::Sender<SpanData>,
    metrics: Arc<Metrics>,
}

impl Exporter {
    /// Queues a finished span without waiting; a full queue drops it, counted.
    pub fn push(&self, span: SpanData) {
        if self.tx.try_send(span).is_err() {
            self.metrics.spans_dropped.fetch_add(1, Relaxed);
        }
    }
}

/// How long the last export may take at shutdown.
const SHUTDOWN_BUDGET: Duration = Duration::from_secs(5);

/// The exporter and its task, which runs until `shutdown` and then sends what is queued.
pub(crate) fn start(
    cfg: &TraceConfig,
    client: reqwest::Client,
    metrics: Arc<Metrics>,
    shutdown: watch::Receiver<bool>,
) -> (Exporter, Export) {
    let (tx, rx) = mpsc::channel(cfg.queue_capacity.max(1));
    let task = Export {
        rx,
        client,
        url: cfg.endpoint.clone(),
        headers: cfg.headers.clone(),
        resource: json!({"attributes": [attribute("service.name", &Value::Str(cfg.service_name.clone()))]}),
        batch: cfg.batch_size.max(1),
        delay: cfg.schedule_delay,
        metrics: metrics.clone(),
        shutdown,
        last_warning: None,
    };
    (Exporter { tx, metrics }, task)
}

pub(crate) struct Export {
    rx: mpsc::Receiver<SpanData>,
    client: reqwest::Client,
    url: reqwest::Url,
    headers: reqwest::header::HeaderMap,
    resource: Json,
    batch: usize,
    delay: Duration,
    metrics: Arc<Metrics>,
    shutdown: watch::Receiver<bool>,
    last_warning: Option<Instant>,
}

impl Export {
    pub async fn run(mut self) {
        // Drained on a timer, as the usage writer is: a receiver waiting on
        // the channel would be woken (across threads) by every span.
        let mut tick = tokio::time::interval(self.delay);
        tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        let mut buf = Vec::with_capacity(self.batch);
        loop {
            let stopping = tokio::select! {
                biased;
                _ = self.shutdown.wait_for(|s| *s) => true,
                _ = tick.tick() => false,
            };
            if stopping {
                break;
            }
            loop {
                while buf.len() < self.batch {
                    match self.rx.try_recv() {
                        Ok(s) => buf.push(s),
                        Err(_) => break,
                    }
                }
                let full = buf.len() == self.batch;
                self.send(&mut buf).await;
                if !full {
                    break;
                }
            }
        }
        self.rx.close();
        let deadline = tokio::time::Instant::now() + SHUTDOWN_BUDGET;
        while self.rx.recv_many(&mut buf, self.batch).await > 0 {
            if tokio::time::timeout_at(deadline, self.send(&mut buf))
                .await
                .is_err()
            {
                let left = buf.len() + self.rx.len();
                self.metrics.spans_dropped.fetch_add(left as u64, Relaxed);
                tracing::warn!(
                    spans = left,
                    "traces not exported: the collector did not answer at shutdown"
                );
                return;
            }
        }
    }

    /// POSTs one batch; a failure drops it (counted), never retried: the next
    /// batch is already waiting, and the queue must not grow.
    async fn send(&mut self, spans: &mut Vec<SpanData>) {
        if spans.is_empty() {
            return;
        }
        let n = spans.len() as u64;
        let body = encode(&self.resource, spans);
        spans.clear();
        let sent = self
            .client
            .post(self.url.clone())
            .headers(self.headers.clone())
            .header(reqwest::header::CONTENT_TYPE, "application/json")
            .body(body)
            .send()
            .await;
        let why = match sent {
            Ok(r) if r.status().is_success() => {
                self.metrics.spans_exported.fetch_add(n, Relaxed);
                return;
            }
            Ok(r) => format!("the collector answered {}", r.status()),
            Err(e) => upstream::error_chain(&e),
        };
        self.metrics.spans_dropped.fetch_add(n, Relaxed);
        // One warning a minute at most: a collector down must not flood the logs.
        if self
            .last_warning
            .is_none_or(|t| t.elapsed() >= Duration::from_secs(60))
        {
            self.last_warning = Some(Instant::now());
            tracing::warn!(spans = n, url = %self.url, error = %why, "traces not exported");
        }
    }
}

fn attribute(key: &str, v: &Value) -> Json {
    let value = match v {
        Value::Str(s) => json!({"stringValue": s}),
        // int64 travels as a string in the protocol's JSON mapping.
        Value::Int(i) => json!({"intValue": i.to_string()}),
        Value::Bool(b) => json!({"boolValue": b}),
    };
    json!({"key": key, "value": value})
}

/// An `ExportTraceServiceRequest` in OTLP's JSON encoding (ids in hex).
pub(crate) fn encode(resource: &Json, spans: &[SpanData]) -> Vec<u8> {
    let spans: Vec<Json> = spans
        .iter()
        .map(|s| {
            let mut span = json!({
                "traceId": to_hex(&s.trace_id),
                "spanId": to_hex(&s.span_id),
                "name": s.name,
                "kind": s.kind as u8,
                "startTimeUnixNano": s.start.to_string(),
                "endTimeUnixNano": s.end.max(s.start).to_string(),
                "attributes": s.attributes.iter().map(|(k, v)| attribute(k, v)).collect::<Vec<_>>(),
                "status": {"code": if s.error { 2 } else { 0 }},
            });
            if let Some(p) = s.parent {
                span["parentSpanId"] = Json::String(to_hex(&p));
            }
            span
        })
        .collect();
    let body = json!({"resourceSpans": [{
        "resource": resource,
        "scopeSpans": [{
            "scope": {"name": "llmgw", "version": env!("CARGO_PKG_VERSION")},
            "spans": spans,
        }],
    }]});
    serde_json::to_vec(&body).unwrap_or_default()
}
