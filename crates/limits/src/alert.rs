//! Spend alerts: when settled usage of a day or month budget first reaches
//! its soft threshold, and first reaches the limit, in a period, one event
//! is POSTed as JSON to the operator's webhook (`LLMGW_ALERT_WEBHOOK_URL`).
//! Which settlement raises it is decided where the counters live (a SET NX
//! in `settle.lua`, a flag beside the local counters), so replicas together
//! send each one once. Delivery runs on its own task from a bounded queue:
//! never on a request's path; a full queue drops the event and counts it.

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Duration;

use serde::Serialize;
use serde_json::Value;
use tokio::sync::mpsc;
use uuid::Uuid;

/// Events waiting for delivery before new ones are dropped.
const QUEUE: usize = 1024;
/// Tries per event (the first and two retries).
const ATTEMPTS: u32 = 3;
/// Longest wait for the webhook to answer one try.
const CALL_TIMEOUT: Duration = Duration::from_secs(5);
/// Pause before the second try; doubled before the third.
const BACKOFF: Duration = Duration::from_millis(250);

/// One alert, as the webhook receives it.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct Alert {
    /// `limit.soft_reached` or `limit.reached`.
    #[serde(rename = "type")]
    pub kind: &'static str,
    pub org_id: Uuid,
    /// `null` for an organization's limit.
    pub api_key_id: Option<Uuid>,
    /// `api_key` or `organization`, as `/limits` names them.
    pub scope: &'static str,
    /// `tokens_per_day`, `tokens_per_month` or `budget_per_month_usd`.
    pub limit: &'static str,
    /// Integers; for the money budget decimal strings.
    pub max: Value,
    pub soft: Value,
    /// The settled total of the period when it crossed.
    pub used: Value,
    /// When the period ends (RFC 3339, UTC).
    pub resets_at: String,
}

/// What became of the alerts, for metrics.
#[derive(Debug, Default)]
pub struct AlertStats {
    /// Accepted by the webhook (a 2xx answer).
    pub delivered: AtomicU64,
    /// Given up on after every try.
    pub failed: AtomicU64,
    /// Not queued: the queue was full.
    pub dropped: AtomicU64,
}

/// Where alerts go: cheap to clone, shared by every limiter that raises them.
#[derive(Clone)]
pub struct Alerts {
    tx: mpsc::Sender<Alert>,
    stats: Arc<AlertStats>,
}

impl std::fmt::Debug for Alerts {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Alerts").finish_non_exhaustive()
    }
}

impl Alerts {
    /// POSTs every alert to `url` from a task on the current runtime. The
    /// URL is the operator's, so it is called as configured (no address
    /// rules, no redirects followed).
    pub fn webhook(url: &str) -> Result<Self, String> {
        let url = reqwest::Url::parse(url).map_err(|e| format!("not a URL ({e})"))?;
        if !matches!(url.scheme(), "http" | "https") || url.host_str().is_none() {
            return Err("expected an http(s) URL with a host".into());
        }
        let client = reqwest::Client::builder()
            .timeout(CALL_TIMEOUT)
            .redirect(reqwest::redirect::Policy::none())
            .build()
            .map_err(|e| format!("cannot build the HTTP client ({e})"))?;
        let (tx, rx) = mpsc::channel(QUEUE);
        let stats = Arc::new(AlertStats::default());
        tokio::spawn(deliver(client, url, rx, stats.clone()));
        Ok(Self { tx, stats })
    }

    pub fn stats(&self) -> &AlertStats {
        &self.stats
    }

    /// Queues `alert`, or drops it when the queue is full.
    pub(crate) fn send(&self, alert: Alert) {
        if self.tx.try_send(alert).is_err() {
            self.stats.dropped.fetch_add(1, Ordering::Relaxed);
            tracing::warn!("limits: the alert queue is full; an alert was dropped");
        }
    }
}

async fn deliver(
    client: reqwest::Client,
    url: reqwest::Url,
    mut rx: mpsc::Receiver<Alert>,
    stats: Arc<AlertStats>,
) {
    while let Some(alert) = rx.recv().await {
        let body = match serde_json::to_vec(&alert) {
            Ok(b) => b,
            Err(_) => continue,
        };
        let mut why = String::new();
        let mut delivered = false;
        for attempt in 0..ATTEMPTS {
            if attempt > 0 {
                tokio::time::sleep(BACKOFF * 2u32.pow(attempt - 1)).await;
            }
            let sent = client
                .post(url.clone())
                .header(reqwest::header::CONTENT_TYPE, "application/json")
                .body(body.clone())
                .send()
                .await;
            match sent {
                Ok(r) if r.status().is_success() => {
                    delivered = true;
                    break;
                }
                Ok(r) => why = format!("answered {}", r.status()),
                // The URL may hold a secret (webhook tokens often sit in the path).
                Err(e) => why = e.without_url().to_string(),
            }
        }
        if delivered {
            stats.delivered.fetch_add(1, Ordering::Relaxed);
        } else {
            stats.failed.fetch_add(1, Ordering::Relaxed);
            tracing::warn!(error = %why, kind = alert.kind, limit = alert.limit, org_id = %alert.org_id,
                "limits: the alert webhook did not take an alert; giving up on it");
        }
    }
}
