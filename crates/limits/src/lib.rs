//! Spend controls for the gateway: requests per sliding minute, tokens per
//! minute, day and month (reserved at admission, settled with real usage),
//! concurrent requests (leases with a TTL) and a monthly money budget, for
//! an API key and its organization at once (the tighter wins).
//!
//! [`Limiter::redis`] shares the counters between every replica: one Lua
//! script per admission (EVALSHA), time from Redis `TIME`, every key of an
//! org under the hash tag `llmgw:{<org>}:` so Redis Cluster works. A busy
//! key's admission is a grant of several requests that the replica then
//! admits itself for [`Config::hold`] (`grant.rs` says what stays exact).
//! [`Limiter::local`] runs the same rules in process for a single replica,
//! and is what a Redis limiter falls back to when Redis does not answer
//! within the call timeout (fail-open) — or it refuses instead (fail-closed).
//!
//! The gateway calls [`Limiter::admit`] before it forwards a request and
//! [`Lease::settle`] when the request ends; the settings API reads the
//! counters with [`Limiter::consumption`]. A limiter given [`Alerts`] raises
//! one alert per period when a day or month budget's settled usage reaches
//! its soft threshold, and one when it reaches the limit.
//!
//! The crate also holds llmgw's one Redis connection code (`conn.rs`), which
//! [`HealthViews`] uses too: the gateways' views of endpoint health, shared
//! through the same Redis for the settings API to show.

mod alert;
mod conn;
mod grant;
pub mod health;
mod local;
mod remote;

use std::future::Future;
use std::pin::Pin;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Duration;

use rust_decimal::prelude::ToPrimitive;
use rust_decimal::Decimal;
use serde_json::Value;
use uuid::Uuid;

pub use alert::{Alert, AlertStats, Alerts};
pub use health::HealthViews;
pub use local::LocalBackend;
pub use remote::RedisBackend;

pub use domain::limits::Limits;

/// The counter prefixes of a key scope and its org scope, both under the
/// org's hash tag: `llmgw:{<org>}:k:<key>`, `llmgw:{<org>}:o`.
fn prefixes(org: Uuid, key: Uuid) -> [String; 2] {
    [
        format!("llmgw:{{{org}}}:k:{key}"),
        format!("llmgw:{{{org}}}:o"),
    ]
}

/// The script's view of a scope's limits: -1 for none, money in micro-USD.
fn slots(l: &Limits) -> [i64; 6] {
    let c = |v: Option<u64>| v.map_or(-1, |n| n.min(MAX_COUNT) as i64);
    [
        c(l.requests_per_minute),
        c(l.tokens_per_minute),
        c(l.max_concurrent_requests),
        c(l.tokens_per_day),
        c(l.tokens_per_month),
        l.budget_per_month_usd.map_or(-1, micro_usd),
    ]
}

/// The settle script's watch list of a scope: limit and soft threshold of
/// tokens/day, tokens/month and money (micro-USD), -1 when not watched.
fn watch(l: &Limits) -> [i64; 6] {
    let c = |v: u64| v.min(MAX_COUNT) as i64;
    let count = |max: Option<u64>| match max.and_then(|m| Some((m, l.soft_count(m)?))) {
        Some((m, soft)) => [c(m), c(soft)],
        None => [-1, -1],
    };
    let money = match l
        .budget_per_month_usd
        .and_then(|m| Some((m, l.soft_usd(m)?)))
    {
        Some((m, soft)) => [micro_usd(m), micro_usd(soft)],
        None => [-1, -1],
    };
    let [d, m] = [count(l.tokens_per_day), count(l.tokens_per_month)];
    [d[0], d[1], m[0], m[1], money[0], money[1]]
}

/// Margin after a grant's hold before a refused request asks again (the
/// grant's closing settlement is on its way).
const HOLD_SLACK: Duration = Duration::from_millis(15);

/// Counts above this are treated as this (exact in a Lua number).
const MAX_COUNT: u64 = 1 << 52;

/// USD to whole micro-dollars, rounded up (a charge never rounds to free).
pub fn micro_usd(usd: Decimal) -> i64 {
    if usd.is_sign_negative() {
        return 0;
    }
    (usd * Decimal::from(1_000_000))
        .ceil()
        .to_i64()
        .unwrap_or(i64::MAX)
        .min(MAX_COUNT as i64)
}

/// One client request asking to be admitted.
#[derive(Debug, Clone, Copy)]
pub struct Request<'a> {
    pub org: Uuid,
    pub key: Uuid,
    pub key_limits: &'a Limits,
    pub org_limits: &'a Limits,
    /// `max_tokens` (or 0) plus ceil(body bytes / 4).
    pub reserve_tokens: u64,
    /// At the highest price among the request's candidate models.
    pub budget_reserve: Decimal,
}

/// Why a request was refused.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum RefusalKind {
    /// requests_per_minute (429 `rate_limit_exceeded`, type `requests`).
    Requests,
    /// tokens_per_minute (429 `rate_limit_exceeded`, type `tokens`).
    Tokens,
    /// max_concurrent_requests (429 `rate_limit_exceeded`, Retry-After 1).
    Concurrency,
    /// A day or month token budget or the money budget (429 `insufficient_quota`).
    Quota,
    /// Redis did not answer and the limiter fails closed (503).
    Unavailable,
}

/// One `x-ratelimit-*` triple: the tighter scope's limit, what remains, and
/// when the next unit frees.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Window {
    pub limit: u64,
    pub remaining: u64,
    pub reset: Duration,
}

/// The rate-limit headers for the answer: each present only when a limit
/// of that kind applies.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Headers {
    pub requests: Option<Window>,
    pub tokens: Option<Window>,
}

/// A refusal.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Refusal {
    pub kind: RefusalKind,
    /// Whole seconds until a retry can succeed, at least 1.
    pub retry_after_secs: u64,
    pub headers: Headers,
}

/// What [`Limiter::admit`] decided.
#[derive(Debug)]
pub enum Decision {
    Admitted { lease: Lease, headers: Headers },
    Refused(Refusal),
}

/// What a backend is asked to admit (already in the scripts' terms).
#[derive(Debug, Clone)]
pub struct Admission {
    /// Key scope then org scope: `llmgw:{<org>}:k:<key>`, `llmgw:{<org>}:o`.
    pub prefixes: [String; 2],
    pub lease_id: String,
    pub reserve_tokens: i64,
    pub reserve_micro_usd: i64,
    pub lease_ttl: Duration,
    pub limits: [[i64; 6]; 2],
    /// Request units asked for (a grant of several; 1 for one request).
    pub count: i64,
    /// Concurrency slots asked for (0 when no concurrency limit applies).
    pub slots: i64,
    /// How long the replica may use the units: each counts in the sliding
    /// minute as of `now + hold_us`.
    pub hold_us: i64,
}

/// A backend's answer to an admission.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Outcome {
    pub admitted: bool,
    pub kind: Option<RefusalKind>,
    pub retry_after_secs: u64,
    pub headers: Headers,
    /// How long until the last unit another grant holds in the sliding
    /// minute is given back or used (µs; 0: none is held).
    pub held_us: i64,
    /// The UTC second, day number and `YYYYMM` the admission was counted in.
    pub second: i64,
    pub day: i64,
    pub month: i64,
}

/// How a finished request is accounted for.
#[derive(Debug, Clone)]
pub struct Settlement {
    pub prefixes: [String; 2],
    pub lease_id: String,
    pub second: i64,
    pub day: i64,
    pub month: i64,
    /// Used minus reserved (negative when less was used).
    pub token_delta: i64,
    pub micro_usd_delta: i64,
    /// What was reserved at admission: with the delta, what the request is
    /// charged in all (added to the settled totals of the period budgets).
    pub reserve_tokens: i64,
    pub reserve_micro_usd: i64,
    /// Renew the lease for this long instead of settling.
    pub renew: Option<Duration>,
    /// Request units given back unused: the first and last (0, 0: none).
    pub returned: (i64, i64),
    /// The grant's concurrency slots to free (or renew), by number.
    pub slot_ids: Vec<i64>,
    /// Per scope: tokens/min, concurrency, tokens/day, tokens/month, money applied.
    pub flags: [[bool; 5]; 2],
    /// Per scope: limit and soft threshold of tokens/day, tokens/month and
    /// money (micro-USD) watched for alerts, -1 when not watched; `None`
    /// when nothing is (boxed: most settlements watch nothing).
    pub watch: Option<Box<[[i64; 6]; 2]>>,
}

impl Settlement {
    /// Tokens and micro-USD the request is charged in all.
    pub fn charged(&self) -> (i64, i64) {
        (
            self.reserve_tokens + self.token_delta,
            self.reserve_micro_usd + self.micro_usd_delta,
        )
    }
}

/// A day or month budget, as alerts and [`Crossing`]s name it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Budget {
    TokensPerDay,
    TokensPerMonth,
    UsdPerMonth,
}

impl Budget {
    const ALL: [Budget; 3] = [Self::TokensPerDay, Self::TokensPerMonth, Self::UsdPerMonth];

    /// The limit's name in `limits`.
    pub fn limit(self) -> &'static str {
        match self {
            Self::TokensPerDay => "tokens_per_day",
            Self::TokensPerMonth => "tokens_per_month",
            Self::UsdPerMonth => "budget_per_month_usd",
        }
    }

    fn index(self) -> usize {
        self as usize
    }
}

/// A settlement that took a watched budget's settled total to its soft
/// threshold or its limit, first in its period (the backend decides "first").
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Crossing {
    /// 0: the key scope, 1: the org scope.
    pub scope: usize,
    pub budget: Budget,
    /// The limit itself (else the soft threshold).
    pub reached: bool,
    /// The settled total after this settlement (tokens, or micro-USD).
    pub total: i64,
}

/// What one scope has used of each kind of limit: what admission compares
/// with (settled usage plus the reservations of requests still running).
/// A counter runs only while its limit is set.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Used {
    /// Requests admitted in the sliding minute.
    pub requests_per_minute: u64,
    /// Tokens of the last 60 seconds.
    pub tokens_per_minute: u64,
    /// Open concurrency leases.
    pub max_concurrent_requests: u64,
    /// Tokens of the current UTC day and month.
    pub tokens_per_day: u64,
    pub tokens_per_month: u64,
    /// Micro-USD of the current UTC month.
    pub micro_usd_per_month: u64,
}

impl Used {
    /// What is used of the integer limit `name` (one of
    /// [`domain::limits::COUNT_LIMITS`]).
    pub fn count(&self, name: &str) -> Option<u64> {
        Some(match name {
            "requests_per_minute" => self.requests_per_minute,
            "tokens_per_minute" => self.tokens_per_minute,
            "max_concurrent_requests" => self.max_concurrent_requests,
            "tokens_per_day" => self.tokens_per_day,
            "tokens_per_month" => self.tokens_per_month,
            _ => return None,
        })
    }

    /// The month's spend in USD.
    pub fn usd(&self) -> Decimal {
        Decimal::new(self.micro_usd_per_month.min(MAX_COUNT) as i64, 6)
    }
}

/// A key's and its organization's counters, read at one instant.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Consumption {
    pub key: Used,
    pub org: Used,
    /// The Unix second they were read at (Redis `TIME` on Redis).
    pub now_s: i64,
}

/// A failure to reach the backend.
#[derive(Debug, thiserror::Error)]
pub enum BackendError {
    /// Redis answered with an error or the connection failed.
    #[error("redis: {0}")]
    Redis(String),
    /// No connection yet (still connecting, or reconnecting).
    #[error("redis: not connected")]
    NotConnected,
}

/// A boxed future, so backends can sit behind one trait object.
pub type BoxFuture<'a, T> = Pin<Box<dyn Future<Output = T> + Send + 'a>>;

/// Where the counters live.
pub trait Backend: Send + Sync + 'static {
    fn admit<'a>(&'a self, a: &'a Admission) -> BoxFuture<'a, Result<Outcome, BackendError>>;
    /// Settles (or renews) and answers the alerts this settlement raises.
    fn settle<'a>(
        &'a self,
        s: &'a Settlement,
    ) -> BoxFuture<'a, Result<Vec<Crossing>, BackendError>>;
    /// Reads the counters of a key scope and its org scope (prefixes as in
    /// [`Admission`]) without changing them.
    fn consumption<'a>(
        &'a self,
        prefixes: &'a [String; 2],
    ) -> BoxFuture<'a, Result<Consumption, BackendError>>;
}

/// Settings of a limiter.
#[derive(Debug, Clone)]
pub struct Config {
    /// Longest wait for Redis on any call (then: fail open or closed).
    pub timeout: Duration,
    /// Redis unreachable: admit on this replica's own counters (true) or refuse.
    pub fail_open: bool,
    /// How long a concurrency slot outlives a process that stopped renewing it.
    pub lease_ttl: Duration,
    /// Where soft-threshold and limit alerts go (`None`: none are raised).
    pub alerts: Option<Alerts>,
    /// With Redis: how long a replica admits a busy key's requests from a
    /// grant before it asks Redis again (zero: every request asks).
    pub hold: Duration,
}

impl Default for Config {
    fn default() -> Self {
        Self {
            timeout: Duration::from_millis(50),
            fail_open: true,
            lease_ttl: Duration::from_secs(30),
            alerts: None,
            hold: Duration::from_millis(50),
        }
    }
}

/// Counts of what the limiter did, for metrics.
#[derive(Debug, Default)]
pub struct Stats {
    /// Calls Redis did not answer in time (or failed).
    pub redis_failures: AtomicU64,
    /// Admissions decided on local counters because Redis did not answer.
    pub fallbacks: AtomicU64,
    /// Admission calls that reached Redis (grants asked for).
    pub redis_admissions: AtomicU64,
    /// Of those, the grants asked for ahead, no request waiting on them.
    pub asked_ahead: AtomicU64,
}

struct Inner {
    remote: Option<Arc<dyn Backend>>,
    local: Arc<LocalBackend>,
    cfg: Config,
    stats: Stats,
    grants: grant::Grants,
}

/// The limiter: cheap to clone, shared by every request.
#[derive(Clone)]
pub struct Limiter {
    inner: Arc<Inner>,
}

impl std::fmt::Debug for Limiter {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Limiter")
            .field("redis", &self.inner.remote.is_some())
            .field("cfg", &self.inner.cfg)
            .finish()
    }
}

impl Limiter {
    /// In-process counters only (a single replica).
    pub fn local(cfg: Config) -> Self {
        Self::with_backend(None, cfg)
    }

    /// Counters on the Redis at `url` (`redis://…`); connects in the
    /// background and reconnects by itself. Until it is connected, calls
    /// behave as when Redis is down.
    pub fn redis(url: &str, cfg: Config) -> Result<Self, BackendError> {
        let backend = RedisBackend::single(url, cfg.timeout)?;
        Ok(Self::with_backend(Some(Arc::new(backend)), cfg))
    }

    /// Counters on a Redis Cluster reached through any of `urls`.
    pub fn redis_cluster(urls: &[String], cfg: Config) -> Result<Self, BackendError> {
        let backend = RedisBackend::cluster(urls, cfg.timeout)?;
        Ok(Self::with_backend(Some(Arc::new(backend)), cfg))
    }

    /// Any backend (tests, alternative stores).
    pub fn with_backend(remote: Option<Arc<dyn Backend>>, cfg: Config) -> Self {
        Self {
            inner: Arc::new(Inner {
                remote,
                local: Arc::new(LocalBackend::default()),
                cfg,
                stats: Stats::default(),
                grants: grant::Grants::default(),
            }),
        }
    }

    pub fn stats(&self) -> &Stats {
        &self.inner.stats
    }

    /// What became of the alerts, when this limiter raises them.
    pub fn alert_stats(&self) -> Option<&AlertStats> {
        self.inner.cfg.alerts.as_ref().map(Alerts::stats)
    }

    /// The counters of `key` and of its organization, read where admission
    /// keeps them (Redis when shared; else this process's own). Waits on
    /// Redis no longer than the configured timeout.
    pub async fn consumption(&self, org: Uuid, key: Uuid) -> Result<Consumption, BackendError> {
        let prefixes = prefixes(org, key);
        let inner = &self.inner;
        match &inner.remote {
            None => Ok(inner.local.consumption_now(&prefixes, local::now_us())),
            Some(remote) => {
                match tokio::time::timeout(inner.cfg.timeout, remote.consumption(&prefixes)).await {
                    Ok(r) => r,
                    Err(_) => Err(BackendError::Redis("timed out".into())),
                }
            }
        }
    }

    /// True when counters are shared through Redis.
    pub fn is_shared(&self) -> bool {
        self.inner.remote.is_some()
    }

    /// Admits or refuses one request. Never waits on Redis longer than the
    /// configured timeout. With Redis, a busy key's requests are mostly
    /// admitted from a grant this replica holds (see `grant.rs`).
    pub async fn admit(&self, req: &Request<'_>) -> Decision {
        if req.key_limits.is_empty() && req.org_limits.is_empty() {
            return Decision::Admitted {
                lease: Lease::none(),
                headers: Headers::default(),
            };
        }
        let limits = [slots(req.key_limits), slots(req.org_limits)];
        let need = (
            req.reserve_tokens.min(MAX_COUNT) as i64,
            micro_usd(req.budget_reserve),
        );
        let inner = &self.inner;
        let why = match &inner.remote {
            None => None,
            Some(remote) => {
                let pair = (req.org, req.key);
                let drawn = || {
                    let d = inner.grants.draw(pair, &limits, need)?;
                    if d.ask_ahead {
                        self.ask_ahead(remote, req, limits, need);
                    }
                    Some(Decision::Admitted {
                        lease: Lease::held(d.held),
                        headers: d.headers,
                    })
                };
                if let Some(admitted) = drawn() {
                    return admitted;
                }
                // With grants, one request at a time asks for the pair's
                // next one; those queued behind it draw from its answer. One
                // that waited a whole timeout asks for itself. The queue is
                // not Redis: the call to Redis gets its own timeout after it.
                let mut waiting = 0;
                let _turn = if inner.cfg.hold.is_zero() {
                    None
                } else {
                    let until = tokio::time::Instant::now() + inner.cfg.timeout;
                    let turn = inner.grants.my_turn(pair, until).await;
                    if let Some(t) = &turn {
                        if let Some(admitted) = drawn() {
                            return admitted;
                        }
                        waiting = t.waiting;
                    }
                    turn
                };
                match self.ask_grant(remote, req, limits, need, waiting).await {
                    Ok(decision) => return decision,
                    Err(why) => Some(why),
                }
            }
        };
        let a = self.admission(req, limits, need, 1, 1, 0);
        if let Some(why) = why {
            inner.stats.redis_failures.fetch_add(1, Ordering::Relaxed);
            if !inner.cfg.fail_open {
                tracing::warn!(error = %why, "limits: Redis unavailable; refusing (fail-closed)");
                return Decision::Refused(Refusal {
                    kind: RefusalKind::Unavailable,
                    retry_after_secs: 1,
                    headers: Headers::default(),
                });
            }
            inner.stats.fallbacks.fetch_add(1, Ordering::Relaxed);
            tracing::warn!(error = %why, "limits: Redis unavailable; using this replica's own counters (fail-open)");
        }
        let outcome = local_admit(&inner.local, &a);
        if !outcome.admitted {
            return Decision::Refused(refusal(&outcome));
        }
        let (settlement, watching) = self.settlement(req, &a, &outcome);
        let pending = Pending {
            backend: inner.local.clone(),
            timeout: inner.cfg.timeout,
            settlement,
            watching,
        };
        let concurrency = a.limits[0][2] >= 0 || a.limits[1][2] >= 0;
        Decision::Admitted {
            lease: Lease::new(pending, concurrency.then_some(inner.cfg.lease_ttl)),
            headers: outcome.headers,
        }
    }

    /// What a backend is asked: `count` units and `slots` slots (when a
    /// concurrency limit applies), with `need` reserved per unit.
    fn admission(
        &self,
        req: &Request<'_>,
        limits: [[i64; 6]; 2],
        need: (i64, i64),
        count: i64,
        slots: i64,
        hold_us: i64,
    ) -> Admission {
        let concurrency = limits[0][2] >= 0 || limits[1][2] >= 0;
        Admission {
            prefixes: prefixes(req.org, req.key),
            lease_id: Uuid::new_v4().simple().to_string(),
            reserve_tokens: need.0.saturating_mul(count).min(MAX_COUNT as i64),
            reserve_micro_usd: need.1.saturating_mul(count).min(MAX_COUNT as i64),
            lease_ttl: self.inner.cfg.lease_ttl,
            limits,
            count,
            slots: if concurrency { slots } else { 0 },
            hold_us,
        }
    }

    /// Asks Redis for a grant sized from the key's last one and the
    /// requests `waiting` for it; when a grant of several units does not
    /// fit, for one unit (the request alone). Both calls together wait no
    /// longer than the timeout.
    async fn ask_grant(
        &self,
        remote: &Arc<dyn Backend>,
        req: &Request<'_>,
        limits: [[i64; 6]; 2],
        need: (i64, i64),
        waiting: i64,
    ) -> Result<Decision, String> {
        let inner = &self.inner;
        let pair = (req.org, req.key);
        let hold = inner.cfg.hold;
        let size = if hold.is_zero() {
            grant::Size {
                units: 1,
                slots: 1,
                per_unit: need,
            }
        } else {
            inner.grants.size(pair, need, waiting)
        };
        let mut deadline = tokio::time::Instant::now() + inner.cfg.timeout;
        let hold_of = |count: i64| if count > 1 { hold } else { Duration::ZERO };
        let mut a = self.admission(
            req,
            limits,
            size.per_unit,
            size.units,
            size.slots,
            hold_of(size.units).as_micros() as i64,
        );
        let mut waited = false;
        loop {
            let sent = tokio::time::Instant::now();
            inner.stats.redis_admissions.fetch_add(1, Ordering::Relaxed);
            let outcome = match tokio::time::timeout_at(deadline, remote.admit(&a)).await {
                Ok(Ok(o)) => o,
                Ok(Err(e)) => return Err(e.to_string()),
                Err(_) => return Err("timed out".to_owned()),
            };
            if !outcome.admitted {
                if a.count > 1 {
                    a = self.admission(req, limits, need, 1, 1, 0);
                    continue;
                }
                // The minute is full, but grants hold units that may come
                // back unused: ask once more when their holds have ended.
                let held = Duration::from_micros(outcome.held_us.max(0) as u64);
                if outcome.kind == Some(RefusalKind::Requests)
                    && !waited
                    && !held.is_zero()
                    && held <= hold * 2
                {
                    waited = true;
                    tokio::time::sleep(held + HOLD_SLACK).await;
                    deadline = tokio::time::Instant::now() + inner.cfg.timeout;
                    continue;
                }
                return Ok(Decision::Refused(refusal(&outcome)));
            }
            let (held, headers) = self
                .start_grant(remote, req, &a, &outcome, sent, Some(need))
                .expect("a grant started for a request draws its unit");
            return Ok(Decision::Admitted {
                lease: Lease::held(held),
                headers,
            });
        }
    }

    /// Starts the grant Redis answered for `a` (asked for at `sent`) and
    /// keeps it as the pair's open one, drawing the first unit for the
    /// request that asked (`need`); without one, keeps it as the pair's
    /// next grant.
    fn start_grant(
        &self,
        remote: &Arc<dyn Backend>,
        req: &Request<'_>,
        a: &Admission,
        outcome: &Outcome,
        sent: tokio::time::Instant,
        need: Option<(i64, i64)>,
    ) -> Option<(grant::Held, Headers)> {
        let inner = &self.inner;
        let (base, watching) = self.settlement(req, a, outcome);
        let hold = if a.count > 1 {
            inner.cfg.hold
        } else {
            Duration::ZERO
        };
        let terms = grant::Terms {
            limits: a.limits,
            count: a.count,
            slots: a.slots,
            tokens: a.reserve_tokens,
            micro_usd: a.reserve_micro_usd,
            headers: outcome.headers,
            base,
            watching,
            expires: sent + hold,
        };
        let (g, first) = grant::Grant::start(
            terms,
            remote.clone(),
            inner.cfg.timeout,
            inner.cfg.lease_ttl,
            inner.cfg.hold,
            need,
        );
        inner.grants.put((req.org, req.key), g, need.is_none());
        first
    }

    /// Asks Redis in the background for the pair's next grant, when no
    /// other request is asking: the open one is running low. Requests that
    /// find the open one used up meanwhile wait for this answer as for any
    /// request's turn. A refusal or a failure leaves things as they were
    /// (the next request to miss asks, and falls back as usual).
    fn ask_ahead(
        &self,
        remote: &Arc<dyn Backend>,
        req: &Request<'_>,
        limits: [[i64; 6]; 2],
        need: (i64, i64),
    ) {
        let pair = (req.org, req.key);
        let Some(turn) = self.inner.grants.turn_ahead(pair) else {
            return;
        };
        let size = self.inner.grants.size(pair, need, 0);
        if size.units <= 1 {
            return;
        }
        let this = self.clone();
        let remote = remote.clone();
        let (key_limits, org_limits) = (req.key_limits.clone(), req.org_limits.clone());
        let req = *req;
        spawn(async move {
            let _turn = turn;
            let req = Request {
                key_limits: &key_limits,
                org_limits: &org_limits,
                ..req
            };
            let hold_us = this.inner.cfg.hold.as_micros() as i64;
            let a = this.admission(&req, limits, size.per_unit, size.units, size.slots, hold_us);
            let sent = tokio::time::Instant::now();
            let stats = &this.inner.stats;
            stats.redis_admissions.fetch_add(1, Ordering::Relaxed);
            stats.asked_ahead.fetch_add(1, Ordering::Relaxed);
            match tokio::time::timeout(this.inner.cfg.timeout, remote.admit(&a)).await {
                Ok(Ok(outcome)) if outcome.admitted => {
                    this.start_grant(&remote, &req, &a, &outcome, sent, None);
                }
                Ok(Ok(_)) => {}
                Ok(Err(e)) => tracing::debug!(error = %e, "limits: next grant not asked ahead"),
                Err(_) => tracing::debug!("limits: next grant not asked ahead: timed out"),
            }
        });
    }

    /// The settlement an admission starts from (nothing used yet), and where
    /// its alerts go when it is watched.
    fn settlement(
        &self,
        req: &Request<'_>,
        a: &Admission,
        outcome: &Outcome,
    ) -> (Settlement, Option<Box<Watching>>) {
        let inner = &self.inner;
        let flags = |l: &[i64; 6]| [l[1] >= 0, l[2] >= 0, l[3] >= 0, l[4] >= 0, l[5] >= 0];
        // Watched only with somewhere to send alerts and a budget with a
        // soft threshold.
        let scopes = [req.key_limits, req.org_limits];
        let watch = inner
            .cfg
            .alerts
            .as_ref()
            .map(|_| scopes.map(watch))
            .filter(|w| w.iter().any(|w| w[1] >= 0 || w[3] >= 0 || w[5] >= 0));
        let watching = inner.cfg.alerts.as_ref().filter(|_| watch.is_some());
        let settlement = Settlement {
            prefixes: a.prefixes.clone(),
            lease_id: a.lease_id.clone(),
            second: outcome.second,
            day: outcome.day,
            month: outcome.month,
            token_delta: 0,
            micro_usd_delta: 0,
            reserve_tokens: a.reserve_tokens,
            reserve_micro_usd: a.reserve_micro_usd,
            renew: None,
            returned: (0, 0),
            slot_ids: if a.slots > 0 { vec![1] } else { Vec::new() },
            flags: [flags(&a.limits[0]), flags(&a.limits[1])],
            watch: watch.map(Box::new),
        };
        let watching = watching.map(|alerts| {
            Box::new(Watching {
                alerts: alerts.clone(),
                org: req.org,
                key: req.key,
                usd_max: scopes.map(|l| l.budget_per_month_usd),
            })
        });
        (settlement, watching)
    }
}

fn refusal(outcome: &Outcome) -> Refusal {
    Refusal {
        kind: outcome.kind.unwrap_or(RefusalKind::Requests),
        retry_after_secs: outcome.retry_after_secs.max(1),
        headers: outcome.headers,
    }
}

fn local_admit(local: &LocalBackend, a: &Admission) -> Outcome {
    local.admit_now(a, local::now_us())
}

/// What a lease settles, and where.
struct Pending {
    backend: Arc<dyn Backend>,
    timeout: Duration,
    settlement: Settlement,
    /// Set when the settlement is watched for alerts.
    watching: Option<Box<Watching>>,
}

/// Where a watched settlement's alerts go, and what they name.
pub(crate) struct Watching {
    alerts: Alerts,
    org: Uuid,
    key: Uuid,
    /// The money budgets as written, so amounts keep their decimal places.
    usd_max: [Option<Decimal>; 2],
}

impl Watching {
    fn alert(&self, s: &Settlement, c: &Crossing) -> Alert {
        let w = s.watch.as_deref().map_or([-1; 6], |w| w[c.scope]);
        let i = c.budget.index() * 2;
        let (max, soft, used) = match (c.budget, self.usd_max[c.scope]) {
            (Budget::UsdPerMonth, Some(like)) => {
                let usd = |micro: i64| {
                    Value::from(domain::limits::usd_like(Decimal::new(micro, 6), like))
                };
                (Value::from(like.to_string()), usd(w[i + 1]), usd(c.total))
            }
            _ => (w[i].into(), w[i + 1].into(), c.total.into()),
        };
        let ends = match c.budget {
            Budget::TokensPerDay => local::day_end(s.day),
            _ => local::month_end(s.month),
        };
        Alert {
            kind: if c.reached {
                "limit.reached"
            } else {
                "limit.soft_reached"
            },
            org_id: self.org,
            api_key_id: (c.scope == 0).then_some(self.key),
            scope: if c.scope == 0 {
                "api_key"
            } else {
                "organization"
            },
            limit: c.budget.limit(),
            max,
            soft,
            used,
            resets_at: chrono::DateTime::from_timestamp(ends, 0)
                .unwrap_or_default()
                .to_rfc3339_opts(chrono::SecondsFormat::AutoSi, true),
        }
    }
}

impl Pending {
    async fn run(mut self, tokens: Option<u64>, cost: Option<Decimal>) {
        let s = &mut self.settlement;
        s.token_delta = tokens.map_or(0, |t| t.min(MAX_COUNT) as i64 - s.reserve_tokens);
        s.micro_usd_delta = cost.map_or(0, |c| micro_usd(c) - s.reserve_micro_usd);
        // Only request counts apply (nothing reserved, no slot held): nothing to settle.
        if s.flags.iter().flatten().all(|f| !f) {
            return;
        }
        settle_and_alert(&*self.backend, self.timeout, s, self.watching.as_deref()).await;
    }
}

/// Sends a settlement (bounded by four call timeouts) and raises the alerts
/// it answers.
pub(crate) async fn settle_and_alert(
    backend: &dyn Backend,
    timeout: Duration,
    s: &Settlement,
    watching: Option<&Watching>,
) {
    match tokio::time::timeout(timeout * 4, backend.settle(s)).await {
        Ok(Ok(crossings)) => {
            if let Some(w) = watching {
                for c in &crossings {
                    w.alerts.send(w.alert(s, c));
                }
            }
        }
        Ok(Err(e)) => {
            tracing::warn!(error = %e, "limits: settling a request failed; its reservation stands")
        }
        Err(_) => {
            tracing::warn!("limits: settling a request timed out; its reservation stands")
        }
    }
}

/// An admitted request's hold on its reservations and concurrency slot.
/// [`Lease::settle`] it when the request ends; dropped unsettled, it is
/// charged its reservation (a client that disconnects still pays).
pub struct Lease {
    pending: Option<Box<Pending>>,
    renewer: Option<tokio::task::JoinHandle<()>>,
    /// Drawn from a grant (counters on Redis).
    held: Option<grant::Held>,
}

impl std::fmt::Debug for Lease {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Lease")
            .field("active", &(self.pending.is_some() || self.held.is_some()))
            .finish()
    }
}

impl Lease {
    fn none() -> Self {
        Self {
            pending: None,
            renewer: None,
            held: None,
        }
    }

    fn held(held: grant::Held) -> Self {
        Self {
            pending: None,
            renewer: None,
            held: Some(held),
        }
    }

    /// A grant's request, ended: what it is charged in all counted into its
    /// grant, and the settlement that leaves to send, if any.
    fn finish_held(
        &mut self,
        tokens: Option<u64>,
        cost: Option<Decimal>,
    ) -> Option<grant::Closing> {
        let h = self.held.take()?;
        let (rt, rm) = h.reserved();
        let tokens = tokens.map_or(rt, |t| t.min(MAX_COUNT) as i64);
        let usd = cost.map_or(rm, micro_usd);
        h.finish(tokens, usd)
    }

    fn new(pending: Pending, renew_every_ttl: Option<Duration>) -> Self {
        let renewer = renew_every_ttl.map(|ttl| {
            let backend = pending.backend.clone();
            let mut s = pending.settlement.clone();
            s.renew = Some(ttl);
            let timeout = pending.timeout;
            tokio::spawn(async move {
                let mut tick = tokio::time::interval((ttl / 3).max(Duration::from_millis(10)));
                tick.tick().await;
                loop {
                    tick.tick().await;
                    let _ = tokio::time::timeout(timeout * 4, backend.settle(&s)).await;
                }
            })
        });
        Self {
            pending: Some(Box::new(pending)),
            renewer,
            held: None,
        }
    }

    /// Settles with the usage the upstream reported (`None`: none was, so
    /// the reservation is charged) and the request's cost, and frees the
    /// concurrency slot.
    pub async fn settle(mut self, tokens: Option<u64>, cost: Option<Decimal>) {
        self.stop_renewing();
        if let Some(c) = self.finish_held(tokens, cost) {
            c.send().await;
        }
        if let Some(p) = self.pending.take() {
            p.run(tokens, cost).await;
        }
    }

    /// [`Lease::settle`] on a task of its own, for a caller that cannot wait
    /// (outside a runtime, the reservation is charged as when dropped).
    pub fn settle_in_background(mut self, tokens: Option<u64>, cost: Option<Decimal>) {
        self.stop_renewing();
        if let Some(c) = self.finish_held(tokens, cost) {
            spawn(c.send());
        }
        if let Some(p) = self.pending.take() {
            spawn(p.run(tokens, cost));
        }
    }

    /// Stops renewing and forgets the lease without settling: what a
    /// process killed mid-request leaves behind (for tests of the TTL).
    #[doc(hidden)]
    pub fn abandon(mut self) {
        self.stop_renewing();
        self.pending = None;
        if let Some(h) = self.held.take() {
            h.abandon();
        }
    }

    fn stop_renewing(&mut self) {
        if let Some(r) = self.renewer.take() {
            r.abort();
        }
    }
}

impl Drop for Lease {
    fn drop(&mut self) {
        self.stop_renewing();
        if let Some(c) = self.finish_held(None, None) {
            spawn(c.send());
        }
        if let Some(p) = self.pending.take() {
            spawn(p.run(None, None));
        }
    }
}

/// Spawns on the current runtime (outside one, the work is dropped: a
/// reservation stands charged).
fn spawn(f: impl Future<Output = ()> + Send + 'static) {
    if let Ok(rt) = tokio::runtime::Handle::try_current() {
        rt.spawn(f);
    }
}
