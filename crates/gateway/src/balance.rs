//! Which of a provider's endpoints takes a request, and what the gateway
//! has seen of each one's health.
//!
//! Balancing is the power of two choices: two endpoints drawn at random in
//! proportion to their weights, the one with fewer requests outstanding per
//! unit of weight wins (a tie goes to the first drawn, so at rest traffic
//! follows the weights). A provider with one endpoint costs no draw.
//!
//! Passive health: [`HealthConfig::eject_after`] failures in a row
//! (connect errors, a connection lost before the answer's head, 5xx
//! statuses) take an endpoint out for a cooldown that doubles with each
//! ejection in a row (up to [`HealthConfig::max_cooldown`]); once it has
//! passed, one probe (`GET /v1/models`) decides whether it is `healthy`
//! again (and its cooldown resets) or ejected once more. While every endpoint of a
//! provider is out, they are still tried (a request gets a chance rather
//! than a certain refusal). Health is per endpoint id and outlives reloads
//! of the provider's cache entry. Each change wakes [`HealthTable::changed`]:
//! `health_report.rs` writes this replica's view to Redis for the settings API.

use std::collections::HashMap;
use std::sync::atomic::{AtomicU32, AtomicU64, AtomicU8, Ordering::Relaxed};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use rand::Rng;
use reqwest::header::HeaderValue;
use storage::domain::routing::EndpointHealth;
use storage::domain::BaseUrl;
use tokio::sync::Notify;
use uuid::Uuid;

use crate::endpoint::Endpoint;

/// One place a provider's requests can go.
pub(crate) struct Upstream {
    pub id: Uuid,
    pub base_url: BaseUrl,
    /// `{base_url}/v1/chat/completions`, parsed once.
    pub chat_url: reqwest::Url,
    /// `Bearer {token}`, marked sensitive (redacted in `Debug`).
    pub auth: HeaderValue,
    /// 1–1000.
    pub weight: u32,
    /// The provider's `connect_ms`, over the client's connect timeout.
    pub connect: Option<Duration>,
    /// Set when the connect-time SSRF policy refuses this base URL.
    pub refused: Option<upstream::UpstreamFailure>,
    pub health: Arc<Health>,
}

impl Upstream {
    /// Where an endpoint's requests go (`None` if the base URL cannot take the path).
    pub fn url(&self, endpoint: Endpoint) -> Option<reqwest::Url> {
        match endpoint {
            Endpoint::ChatCompletions => Some(self.chat_url.clone()),
            e => reqwest::Url::parse(&self.base_url.endpoint(e.path())).ok(),
        }
    }
}

/// An endpoint's state as the API shows it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum State {
    Healthy = 0,
    Ejected = 1,
    Probing = 2,
}

impl State {
    pub fn as_str(self) -> &'static str {
        self.health().as_str()
    }

    pub fn health(self) -> EndpointHealth {
        match self {
            State::Healthy => EndpointHealth::Healthy,
            State::Ejected => EndpointHealth::Ejected,
            State::Probing => EndpointHealth::Probing,
        }
    }
}

/// How health is judged.
#[derive(Debug, Clone, Copy)]
pub struct HealthConfig {
    /// Failures in a row that eject an endpoint.
    pub eject_after: u32,
    /// The first cooldown; each ejection in a row doubles it.
    pub cooldown: Duration,
    pub max_cooldown: Duration,
}

impl Default for HealthConfig {
    fn default() -> Self {
        Self {
            eject_after: 3,
            cooldown: Duration::from_secs(5),
            max_cooldown: Duration::from_secs(60),
        }
    }
}

/// What the gateway has seen of one endpoint.
#[derive(Debug)]
pub(crate) struct Health {
    /// The endpoint's organization (its reports go under its hash tag).
    pub org: Uuid,
    /// Requests sent and not yet answered (the head), for balancing.
    outstanding: AtomicU32,
    /// Failures in a row.
    failures: AtomicU32,
    state: AtomicU8,
    /// While ejected: until when (ms on the table's clock).
    until_ms: AtomicU64,
    /// Ejections in a row (cooldown doubling).
    ejections: AtomicU32,
    /// When a provider entry last took it (ms on the table's clock).
    seen_ms: AtomicU64,
    /// The state last written to Redis ([`NOT_REPORTED`] before the first).
    reported: AtomicU8,
}

/// [`Health::reported`] before anything was.
const NOT_REPORTED: u8 = u8::MAX;

impl Health {
    fn new(org: Uuid, now_ms: u64) -> Self {
        Self {
            org,
            outstanding: AtomicU32::new(0),
            failures: AtomicU32::new(0),
            state: AtomicU8::new(State::Healthy as u8),
            until_ms: AtomicU64::new(0),
            ejections: AtomicU32::new(0),
            seen_ms: AtomicU64::new(now_ms),
            reported: AtomicU8::new(NOT_REPORTED),
        }
    }

    /// `state` was written to Redis.
    pub fn reported(&self, state: State) {
        self.reported.store(state as u8, Relaxed);
    }

    pub fn state(&self) -> State {
        match self.state.load(Relaxed) {
            1 => State::Ejected,
            2 => State::Probing,
            _ => State::Healthy,
        }
    }

    fn outstanding(&self) -> u64 {
        u64::from(self.outstanding.load(Relaxed))
    }
}

/// One request outstanding on an endpoint, until dropped.
pub(crate) struct Outstanding(Arc<Health>);

impl Outstanding {
    pub fn new(h: &Arc<Health>) -> Self {
        h.outstanding.fetch_add(1, Relaxed);
        Self(h.clone())
    }
}

impl Drop for Outstanding {
    fn drop(&mut self) {
        self.0.outstanding.fetch_sub(1, Relaxed);
    }
}

/// Endpoint health by id, shared by every provider entry of the process.
pub(crate) struct HealthTable {
    map: Mutex<HashMap<Uuid, Arc<Health>>>,
    pub cfg: HealthConfig,
    epoch: Instant,
    /// Ejections since start.
    ejections: AtomicU64,
    /// Woken on every change of an endpoint's state.
    pub changed: Notify,
}

/// Endpoints remembered at most before unused ones are forgotten.
const MAX_TRACKED: usize = 65_536;
/// How long an endpoint no cached provider holds is still reported.
const REPORT_UNUSED_FOR: Duration = Duration::from_secs(600);

impl HealthTable {
    pub fn new(cfg: HealthConfig) -> Self {
        Self {
            map: Mutex::new(HashMap::new()),
            cfg,
            epoch: Instant::now(),
            ejections: AtomicU64::new(0),
            changed: Notify::new(),
        }
    }

    /// The health of endpoint `id` of organization `org` (new endpoints start healthy).
    pub fn of(&self, org: Uuid, id: Uuid) -> Arc<Health> {
        let now = self.now_ms();
        let mut map = self.map.lock().unwrap_or_else(|p| p.into_inner());
        if map.len() >= MAX_TRACKED && !map.contains_key(&id) {
            // Only entries no cached provider holds any more.
            map.retain(|_, h| Arc::strong_count(h) > 1);
        }
        let h = map
            .entry(id)
            .or_insert_with(|| Arc::new(Health::new(org, now)));
        h.seen_ms.store(now, Relaxed);
        h.clone()
    }

    /// The endpoints this replica reports (held by a cached provider, or
    /// taken by one within [`REPORT_UNUSED_FOR`]), with their state; only
    /// those whose state changed since it was last reported unless `all`.
    pub fn to_report(&self, all: bool) -> Vec<(Uuid, State, Arc<Health>)> {
        let now = self.now_ms();
        let idle = REPORT_UNUSED_FOR.as_millis() as u64;
        let map = self.map.lock().unwrap_or_else(|p| p.into_inner());
        map.iter()
            .filter(|(_, h)| {
                Arc::strong_count(h) > 1 || now.saturating_sub(h.seen_ms.load(Relaxed)) < idle
            })
            .map(|(id, h)| (*id, h.state(), h))
            .filter(|(_, state, h)| all || h.reported.load(Relaxed) != *state as u8)
            .map(|(id, state, h)| (id, state, h.clone()))
            .collect()
    }

    /// Endpoints by state (healthy, ejected, probing) and ejections so far, for `/metrics`.
    pub fn counts(&self) -> ([(State, u64); 3], u64) {
        let map = self.map.lock().unwrap_or_else(|p| p.into_inner());
        let mut n = [
            (State::Healthy, 0),
            (State::Ejected, 0),
            (State::Probing, 0),
        ];
        for h in map.values() {
            n[h.state() as usize].1 += 1;
        }
        (n, self.ejections.load(Relaxed))
    }

    fn now_ms(&self) -> u64 {
        self.epoch.elapsed().as_millis() as u64
    }

    /// The endpoint answered (a head that is not a 5xx).
    pub fn succeeded(&self, h: &Health) {
        if h.failures.load(Relaxed) != 0 {
            h.failures.store(0, Relaxed);
        }
    }

    /// The endpoint failed; true when this failure ejected it.
    pub fn failed(&self, h: &Health) -> bool {
        let n = h.failures.fetch_add(1, Relaxed) + 1;
        if n >= self.cfg.eject_after
            && h.state
                .compare_exchange(State::Healthy as u8, State::Ejected as u8, Relaxed, Relaxed)
                .is_ok()
        {
            self.eject(h);
            return true;
        }
        false
    }

    fn eject(&self, h: &Health) {
        self.ejections.fetch_add(1, Relaxed);
        let k = h.ejections.fetch_add(1, Relaxed).min(16);
        let cooldown = self
            .cfg
            .cooldown
            .saturating_mul(1 << k)
            .min(self.cfg.max_cooldown);
        h.until_ms
            .store(self.now_ms() + cooldown.as_millis() as u64, Relaxed);
        h.state.store(State::Ejected as u8, Relaxed);
        self.changed.notify_one();
    }

    /// A probe's verdict on an endpoint in `probing`.
    pub fn probed(&self, h: &Health, ok: bool) {
        if ok {
            h.failures.store(0, Relaxed);
            h.ejections.store(0, Relaxed);
            h.state.store(State::Healthy as u8, Relaxed);
            self.changed.notify_one();
        } else {
            self.eject(h);
        }
    }

    /// Whether `h` may take traffic; an ejected endpoint whose cooldown has
    /// passed moves to `probing` and is returned in `probe` (once).
    fn usable(&self, h: &Health, probe: &mut bool) -> bool {
        match h.state() {
            State::Healthy => true,
            State::Probing => false,
            State::Ejected => {
                if self.now_ms() >= h.until_ms.load(Relaxed)
                    && h.state
                        .compare_exchange(
                            State::Ejected as u8,
                            State::Probing as u8,
                            Relaxed,
                            Relaxed,
                        )
                        .is_ok()
                {
                    *probe = true;
                    self.changed.notify_one();
                }
                false
            }
        }
    }
}

/// The endpoint for the next attempt, among those not `tried` yet; and the
/// endpoints whose cooldown passed and that now need a probe.
pub(crate) fn pick<'a>(
    table: &HealthTable,
    upstreams: &'a [Upstream],
    tried: &[usize],
) -> (Option<usize>, Vec<&'a Upstream>) {
    let mut probes = Vec::new();
    if let [_] = upstreams {
        return ((!tried.contains(&0)).then_some(0), probes);
    }
    let open: Vec<usize> = (0..upstreams.len())
        .filter(|i| !tried.contains(i))
        .collect();
    let mut usable: Vec<usize> = Vec::with_capacity(open.len());
    for &i in &open {
        let mut probe = false;
        if table.usable(&upstreams[i].health, &mut probe) {
            usable.push(i);
        }
        if probe {
            probes.push(&upstreams[i]);
        }
    }
    // Every open endpoint out: try them anyway.
    let from = if usable.is_empty() { &open } else { &usable };
    (two_choices(upstreams, from), probes)
}

/// The power of two choices over `from` (indexes into `upstreams`).
fn two_choices(upstreams: &[Upstream], from: &[usize]) -> Option<usize> {
    match from {
        [] => None,
        [one] => Some(*one),
        _ => {
            let total: u64 = from.iter().map(|&i| u64::from(upstreams[i].weight)).sum();
            let mut rng = rand::thread_rng();
            let mut draw = || {
                let mut x = rng.gen_range(0..total.max(1));
                for &i in from {
                    let w = u64::from(upstreams[i].weight);
                    if x < w {
                        return i;
                    }
                    x -= w;
                }
                from[from.len() - 1]
            };
            let a = draw();
            let b = draw();
            let load = |i: usize| {
                // outstanding / weight, compared without division.
                (
                    upstreams[i].health.outstanding(),
                    u64::from(upstreams[i].weight),
                )
            };
            let ((oa, wa), (ob, wb)) = (load(a), load(b));
            Some(if ob * wa < oa * wb { b } else { a })
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use futures_util::FutureExt;

    fn upstreams(table: &HealthTable, weights: &[u32]) -> Vec<Upstream> {
        weights
            .iter()
            .map(|w| {
                let id = Uuid::new_v4();
                let base_url = BaseUrl::parse("https://example.com").unwrap();
                Upstream {
                    id,
                    chat_url: reqwest::Url::parse("https://example.com/v1/chat/completions")
                        .unwrap(),
                    base_url,
                    auth: HeaderValue::from_static("Bearer x"),
                    weight: *w,
                    connect: None,
                    refused: None,
                    health: table.of(Uuid::nil(), id),
                }
            })
            .collect()
    }

    #[test]
    fn at_rest_traffic_follows_the_weights() {
        let table = HealthTable::new(HealthConfig::default());
        let ups = upstreams(&table, &[1, 3]);
        let mut n = [0u32; 2];
        for _ in 0..20_000 {
            n[pick(&table, &ups, &[]).0.unwrap()] += 1;
        }
        let share = f64::from(n[0]) / 20_000.0;
        assert!((0.23..0.27).contains(&share), "{share}");
    }

    #[test]
    fn the_less_loaded_of_two_wins() {
        let table = HealthTable::new(HealthConfig::default());
        let ups = upstreams(&table, &[1, 1]);
        let _busy: Vec<_> = (0..5).map(|_| Outstanding::new(&ups[0].health)).collect();
        let mut n = [0u32; 2];
        for _ in 0..1000 {
            n[pick(&table, &ups, &[]).0.unwrap()] += 1;
        }
        // Endpoint 0 wins only when drawn twice (a quarter of the time).
        assert!(n[0] < 330, "{n:?}");
    }

    #[test]
    fn failures_eject_then_a_probe_brings_it_back() {
        let table = HealthTable::new(HealthConfig {
            eject_after: 3,
            cooldown: Duration::from_millis(30),
            max_cooldown: Duration::from_secs(1),
        });
        let ups = upstreams(&table, &[1, 1]);
        assert!(!table.failed(&ups[0].health));
        table.succeeded(&ups[0].health);
        for _ in 0..2 {
            assert!(!table.failed(&ups[0].health));
        }
        assert!(table.failed(&ups[0].health), "the third in a row ejects");
        assert_eq!(ups[0].health.state(), State::Ejected);
        for _ in 0..100 {
            assert_eq!(pick(&table, &ups, &[]).0, Some(1));
        }
        // Every endpoint tried but the ejected one: it is still a chance.
        assert_eq!(pick(&table, &ups, &[1]).0, Some(0));
        std::thread::sleep(Duration::from_millis(40));
        let (chosen, probes) = pick(&table, &ups, &[]);
        assert_eq!(chosen, Some(1), "no traffic before the probe");
        assert_eq!(probes.len(), 1);
        assert_eq!(ups[0].health.state(), State::Probing);
        assert!(pick(&table, &ups, &[]).1.is_empty(), "one probe at a time");
        table.probed(&ups[0].health, false);
        assert_eq!(ups[0].health.state(), State::Ejected);
        std::thread::sleep(Duration::from_millis(70));
        let (_, probes) = pick(&table, &ups, &[]);
        assert_eq!(probes.len(), 1, "the doubled cooldown passed");
        table.probed(&ups[0].health, true);
        assert_eq!(ups[0].health.state(), State::Healthy);
        let mut seen = [false; 2];
        for _ in 0..100 {
            seen[pick(&table, &ups, &[]).0.unwrap()] = true;
        }
        assert_eq!(seen, [true, true]);
    }

    #[test]
    fn held_endpoints_are_reported_and_changes_alone_between_refreshes() {
        let table = HealthTable::new(HealthConfig::default());
        let org = Uuid::new_v4();
        let (a, b) = (Uuid::new_v4(), Uuid::new_v4());
        let held = [table.of(org, a), table.of(org, b)];
        let ids = |v: Vec<(Uuid, State, Arc<Health>)>| {
            let mut v: Vec<(Uuid, State)> = v.into_iter().map(|(id, s, _)| (id, s)).collect();
            v.sort_by_key(|(id, _)| *id);
            v
        };
        let mut both = vec![(a, State::Healthy), (b, State::Healthy)];
        both.sort_by_key(|(id, _)| *id);
        assert_eq!(ids(table.to_report(false)), both, "never reported yet");
        for (_, state, h) in table.to_report(true) {
            assert_eq!(h.org, org);
            h.reported(state);
        }
        assert!(table.to_report(false).is_empty(), "nothing changed");
        for _ in 0..3 {
            table.failed(&held[1]);
        }
        assert!(
            table.changed.notified().now_or_never().is_some(),
            "an ejection wakes the reporter"
        );
        assert_eq!(ids(table.to_report(false)), [(b, State::Ejected)]);
        assert_eq!(table.to_report(true).len(), 2);
    }

    #[test]
    fn one_endpoint_costs_no_draw_and_is_tried_once() {
        let table = HealthTable::new(HealthConfig::default());
        let ups = upstreams(&table, &[5]);
        for _ in 0..5 {
            table.failed(&ups[0].health);
        }
        assert_eq!(pick(&table, &ups, &[]).0, Some(0));
        assert_eq!(pick(&table, &ups, &[0]).0, None);
    }
}
