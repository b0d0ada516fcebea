//! Prometheus counters and histograms, hand-written on atomics: a handful of
//! relaxed increments per request, no locks, rendered on scrape.

use std::fmt::Write;
use std::sync::atomic::{AtomicU64, Ordering::Relaxed};
use std::time::Duration;

use limits::RefusalKind;

use crate::balance::HealthTable;
use crate::error::UpstreamErrorKind;

/// Upper bounds of the latency buckets, in microseconds.
const BUCKETS_US: [u64; 18] = [
    500,
    1_000,
    2_500,
    5_000,
    10_000,
    25_000,
    50_000,
    100_000,
    250_000,
    500_000,
    1_000_000,
    2_500_000,
    5_000_000,
    10_000_000,
    30_000_000,
    60_000_000,
    120_000_000,
    300_000_000,
];

#[derive(Default)]
pub(crate) struct Histogram {
    buckets: [AtomicU64; BUCKETS_US.len() + 1],
    sum_us: AtomicU64,
}

impl Histogram {
    pub fn observe(&self, d: Duration) {
        let us = d.as_micros().min(u128::from(u64::MAX)) as u64;
        let i = BUCKETS_US
            .iter()
            .position(|b| us <= *b)
            .unwrap_or(BUCKETS_US.len());
        self.buckets[i].fetch_add(1, Relaxed);
        self.sum_us.fetch_add(us, Relaxed);
    }

    fn render(&self, out: &mut String, name: &str, help: &str) {
        let _ = writeln!(out, "# HELP {name} {help}\n# TYPE {name} histogram");
        let mut cumulative = 0;
        for (i, b) in self.buckets.iter().enumerate() {
            cumulative += b.load(Relaxed);
            match BUCKETS_US.get(i) {
                Some(le) => {
                    let _ = writeln!(
                        out,
                        "{name}_bucket{{le=\"{}\"}} {cumulative}",
                        *le as f64 / 1e6
                    );
                }
                None => {
                    let _ = writeln!(out, "{name}_bucket{{le=\"+Inf\"}} {cumulative}");
                }
            }
        }
        let _ = writeln!(out, "{name}_sum {}", self.sum_us.load(Relaxed) as f64 / 1e6);
        let _ = writeln!(out, "{name}_count {cumulative}");
    }
}

/// Every metric the gateway exposes.
pub(crate) struct Metrics {
    /// Responses by status code (index: status − 100).
    status: Box<[AtomicU64; 500]>,
    pub latency: Histogram,
    pub upstream_ttfb: Histogram,
    upstream_errors: [AtomicU64; UpstreamErrorKind::ALL.len()],
    pub key_hits: AtomicU64,
    pub key_misses: AtomicU64,
    pub provider_hits: AtomicU64,
    pub provider_misses: AtomicU64,
    pub cache_flushes: AtomicU64,
    pub listener_connected: AtomicU64,
    pub rows_written: AtomicU64,
    pub rows_dropped: AtomicU64,
    pub rows_failed: AtomicU64,
    pub streams_canceled: AtomicU64,
    /// Refusals by spend controls, by [`RefusalKind`] (in `LIMITED_KINDS` order).
    limited: [AtomicU64; LIMITED_KINDS.len()],
    pub retries: AtomicU64,
    /// Spans the collector accepted, and spans dropped (queue full, collector slow or down).
    pub spans_exported: AtomicU64,
    pub spans_dropped: AtomicU64,
}

/// Every refusal kind, in the order `/metrics` lists them.
const LIMITED_KINDS: [(RefusalKind, &str); 5] = [
    (RefusalKind::Requests, "requests"),
    (RefusalKind::Tokens, "tokens"),
    (RefusalKind::Concurrency, "concurrency"),
    (RefusalKind::Quota, "quota"),
    (RefusalKind::Unavailable, "unavailable"),
];

impl Default for Metrics {
    fn default() -> Self {
        Self {
            status: Box::new(std::array::from_fn(|_| AtomicU64::new(0))),
            latency: Histogram::default(),
            upstream_ttfb: Histogram::default(),
            upstream_errors: Default::default(),
            key_hits: AtomicU64::new(0),
            key_misses: AtomicU64::new(0),
            provider_hits: AtomicU64::new(0),
            provider_misses: AtomicU64::new(0),
            cache_flushes: AtomicU64::new(0),
            listener_connected: AtomicU64::new(0),
            rows_written: AtomicU64::new(0),
            rows_dropped: AtomicU64::new(0),
            rows_failed: AtomicU64::new(0),
            streams_canceled: AtomicU64::new(0),
            limited: Default::default(),
            retries: AtomicU64::new(0),
            spans_exported: AtomicU64::new(0),
            spans_dropped: AtomicU64::new(0),
        }
    }
}

impl Metrics {
    pub fn request(&self, status: u16, latency: Duration) {
        if let Some(c) = status
            .checked_sub(100)
            .and_then(|i| self.status.get(usize::from(i)))
        {
            c.fetch_add(1, Relaxed);
        }
        self.latency.observe(latency);
    }

    pub fn limited(&self, kind: RefusalKind) {
        if let Some(i) = LIMITED_KINDS.iter().position(|(k, _)| *k == kind) {
            self.limited[i].fetch_add(1, Relaxed);
        }
    }

    pub fn upstream_error(&self, kind: UpstreamErrorKind) {
        self.upstream_errors[kind as usize].fetch_add(1, Relaxed);
    }

    /// Prometheus text exposition format (0.0.4).
    /// `limiter`'s own counts (Redis failures, local fallbacks) are included.
    pub fn render(
        &self,
        queue_depth: usize,
        queue_capacity: usize,
        limiter: &limits::Limiter,
        health: &HealthTable,
    ) -> String {
        let mut out = String::with_capacity(4096);
        let counter = |out: &mut String, name: &str, help: &str, v: u64| {
            let _ = writeln!(
                out,
                "# HELP {name} {help}\n# TYPE {name} counter\n{name} {v}"
            );
        };
        let _ = writeln!(
            out,
            "# HELP llmgw_gateway_requests_total Gateway responses by HTTP status.\n# TYPE llmgw_gateway_requests_total counter"
        );
        for (i, c) in self.status.iter().enumerate() {
            let v = c.load(Relaxed);
            if v > 0 {
                let _ = writeln!(
                    out,
                    "llmgw_gateway_requests_total{{status=\"{}\"}} {v}",
                    i + 100
                );
            }
        }
        self.latency.render(
            &mut out,
            "llmgw_gateway_request_duration_seconds",
            "Time from request to response head, in seconds.",
        );
        self.upstream_ttfb.render(
            &mut out,
            "llmgw_gateway_upstream_ttfb_seconds",
            "Time from request to the upstream's first byte (head, or first chunk of a stream), in seconds.",
        );
        let _ = writeln!(
            out,
            "# HELP llmgw_gateway_upstream_errors_total Upstream calls that failed, by kind.\n# TYPE llmgw_gateway_upstream_errors_total counter"
        );
        for (kind, c) in UpstreamErrorKind::ALL.iter().zip(&self.upstream_errors) {
            let _ = writeln!(
                out,
                "llmgw_gateway_upstream_errors_total{{kind=\"{}\"}} {}",
                kind.as_str(),
                c.load(Relaxed)
            );
        }
        let _ = writeln!(
            out,
            "# HELP llmgw_gateway_cache_hits_total In-memory cache hits.\n# TYPE llmgw_gateway_cache_hits_total counter\n\
             llmgw_gateway_cache_hits_total{{cache=\"api_key\"}} {}\nllmgw_gateway_cache_hits_total{{cache=\"provider\"}} {}",
            self.key_hits.load(Relaxed),
            self.provider_hits.load(Relaxed)
        );
        let _ = writeln!(
            out,
            "# HELP llmgw_gateway_cache_misses_total In-memory cache misses (database lookups).\n# TYPE llmgw_gateway_cache_misses_total counter\n\
             llmgw_gateway_cache_misses_total{{cache=\"api_key\"}} {}\nllmgw_gateway_cache_misses_total{{cache=\"provider\"}} {}",
            self.key_misses.load(Relaxed),
            self.provider_misses.load(Relaxed)
        );
        counter(
            &mut out,
            "llmgw_gateway_cache_flushes_total",
            "Whole-cache flushes (after the change listener reconnected).",
            self.cache_flushes.load(Relaxed),
        );
        let _ = writeln!(
            out,
            "# HELP llmgw_gateway_cache_listener_connected 1 while the LISTEN connection for cache invalidation is up.\n\
             # TYPE llmgw_gateway_cache_listener_connected gauge\nllmgw_gateway_cache_listener_connected {}",
            self.listener_connected.load(Relaxed)
        );
        let _ = writeln!(
            out,
            "# HELP llmgw_gateway_usage_queue_depth Usage rows waiting to be written.\n# TYPE llmgw_gateway_usage_queue_depth gauge\n\
             llmgw_gateway_usage_queue_depth {queue_depth}\n\
             # HELP llmgw_gateway_usage_queue_capacity Usage rows the queue can hold.\n# TYPE llmgw_gateway_usage_queue_capacity gauge\n\
             llmgw_gateway_usage_queue_capacity {queue_capacity}"
        );
        counter(
            &mut out,
            "llmgw_gateway_trace_spans_exported_total",
            "Trace spans the OTLP collector accepted.",
            self.spans_exported.load(Relaxed),
        );
        counter(
            &mut out,
            "llmgw_gateway_trace_spans_dropped_total",
            "Trace spans dropped: the export queue was full, or the collector failed or was too slow.",
            self.spans_dropped.load(Relaxed),
        );
        counter(
            &mut out,
            "llmgw_gateway_usage_rows_written_total",
            "Usage rows written to request_logs.",
            self.rows_written.load(Relaxed),
        );
        counter(
            &mut out,
            "llmgw_gateway_usage_rows_dropped_total",
            "Usage rows dropped: queue full, or still unwritten when shutdown's flush gave up.",
            self.rows_dropped.load(Relaxed),
        );
        counter(
            &mut out,
            "llmgw_gateway_usage_rows_failed_total",
            "Usage rows the database refused.",
            self.rows_failed.load(Relaxed),
        );
        counter(
            &mut out,
            "llmgw_gateway_streams_canceled_total",
            "Requests whose client went away before the answer ended.",
            self.streams_canceled.load(Relaxed),
        );
        let _ = writeln!(
            out,
            "# HELP llmgw_gateway_limited_total Requests refused by spend controls, by kind.\n# TYPE llmgw_gateway_limited_total counter"
        );
        for ((_, kind), c) in LIMITED_KINDS.iter().zip(&self.limited) {
            let _ = writeln!(
                out,
                "llmgw_gateway_limited_total{{kind=\"{kind}\"}} {}",
                c.load(Relaxed)
            );
        }
        let (states, ejections) = health.counts();
        let _ = writeln!(
            out,
            "# HELP llmgw_gateway_endpoints Provider endpoints this replica has called, by health.\n# TYPE llmgw_gateway_endpoints gauge"
        );
        for (state, n) in states {
            let _ = writeln!(
                out,
                "llmgw_gateway_endpoints{{health=\"{}\"}} {n}",
                state.as_str()
            );
        }
        counter(
            &mut out,
            "llmgw_gateway_endpoint_ejections_total",
            "Endpoints taken out of rotation after failures in a row.",
            ejections,
        );
        counter(
            &mut out,
            "llmgw_gateway_upstream_retries_total",
            "Upstream calls made again after a retryable failure (another endpoint, or a fallback model).",
            self.retries.load(Relaxed),
        );
        {
            let l = limiter;
            let stats = l.stats();
            counter(
                &mut out,
                "llmgw_gateway_limits_redis_failures_total",
                "Limiter calls Redis did not answer in time, or failed.",
                stats.redis_failures.load(Relaxed),
            );
            counter(
                &mut out,
                "llmgw_gateway_limits_local_fallbacks_total",
                "Admissions decided on this replica's own counters because Redis did not answer (fail-open).",
                stats.fallbacks.load(Relaxed),
            );
            let _ = writeln!(
                out,
                "# HELP llmgw_gateway_limits_shared 1 when limits are counted on Redis for every replica, 0 when in process.\n\
                 # TYPE llmgw_gateway_limits_shared gauge\nllmgw_gateway_limits_shared {}",
                u8::from(l.is_shared())
            );
            let _ = writeln!(
                out,
                "# HELP llmgw_gateway_limit_alerts_total Spend alerts for the webhook (LLMGW_ALERT_WEBHOOK_URL), by outcome: delivered, failed after every retry, or dropped from a full queue.\n\
                 # TYPE llmgw_gateway_limit_alerts_total counter"
            );
            let alerts = l.alert_stats();
            let count = |c: fn(&limits::AlertStats) -> &std::sync::atomic::AtomicU64| {
                alerts.map_or(0, |a| c(a).load(Relaxed))
            };
            for (outcome, n) in [
                ("delivered", count(|a| &a.delivered)),
                ("failed", count(|a| &a.failed)),
                ("dropped", count(|a| &a.dropped)),
            ] {
                let _ = writeln!(
                    out,
                    "llmgw_gateway_limit_alerts_total{{outcome=\"{outcome}\"}} {n}"
                );
            }
        }
        out
    }
}
