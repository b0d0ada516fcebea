//! In-memory caches of API keys and providers, so a known key costs no
//! database round trip. Changes reach every gateway through PostgreSQL
//! `LISTEN/NOTIFY` (triggers announce them on [`storage::CACHE_CHANNEL`]); a
//! lost listener connection flushes everything on reconnect, and a TTL is the
//! safety net. Concurrent misses for the same entry share one lookup.
//!
//! Invalidation vs. in-flight lookups: an eviction bumps `epoch` and then
//! removes entries under the shard locks; a lookup result is inserted only if
//! the epoch it started under is still current, checked under the shard lock.
//! The epoch is also part of the single-flight key, so a request that arrives
//! after an eviction never joins a lookup started before it (which could
//! answer with the pre-revocation row).

use std::collections::HashMap;
use std::hash::Hash;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, RwLock};
use std::time::{Duration, Instant};

use chrono::{DateTime, Utc};
use storage::domain::{BaseUrl, ProviderStatus};
use storage::limits::{model_allowed, Limits, ModelPattern, Prices};
use storage::providers::ProviderWithToken;
use storage::Db;
use tokio::sync::{OnceCell, Semaphore};
use uuid::Uuid;

use crate::balance::{HealthTable, Upstream};
use crate::error::GatewayError;
use crate::metrics::Metrics;

const SHARDS: usize = 16;
/// Unknown key digests remembered at most (each ~64 bytes).
const NEGATIVE_KEYS_MAX: usize = 16_384;
/// Unknown provider names remembered per organization at most.
const NEGATIVE_PROVIDERS_PER_ORG_MAX: usize = 256;
/// Concurrent database lookups for cache misses (bounds what random keys can cost).
const MISS_LOOKUPS: usize = 8;

fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|p| p.into_inner())
}
fn read<T>(m: &RwLock<T>) -> std::sync::RwLockReadGuard<'_, T> {
    m.read().unwrap_or_else(|p| p.into_inner())
}
fn write<T>(m: &RwLock<T>) -> std::sync::RwLockWriteGuard<'_, T> {
    m.write().unwrap_or_else(|p| p.into_inner())
}

/// Concurrent loads of the same key share one future's result.
struct Flights<K, V> {
    map: Mutex<HashMap<K, Arc<OnceCell<V>>>>,
}

impl<K: Hash + Eq + Clone, V: Clone> Flights<K, V> {
    fn new() -> Self {
        Self {
            map: Mutex::new(HashMap::new()),
        }
    }

    async fn run<F: std::future::Future<Output = V>>(&self, key: K, load: impl FnOnce() -> F) -> V {
        let cell = lock(&self.map).entry(key.clone()).or_default().clone();
        // Removes the flight however this ends, cancellation included, so
        // abandoned lookups cannot pile up.
        let _leave = Leave {
            map: &self.map,
            key,
            cell: cell.clone(),
        };
        cell.get_or_init(load).await.clone()
    }
}

struct Leave<'a, K: Hash + Eq, V> {
    map: &'a Mutex<HashMap<K, Arc<OnceCell<V>>>>,
    key: K,
    cell: Arc<OnceCell<V>>,
}

impl<K: Hash + Eq, V> Drop for Leave<'_, K, V> {
    fn drop(&mut self) {
        let mut map = lock(self.map);
        if map
            .get(&self.key)
            .is_some_and(|c| Arc::ptr_eq(c, &self.cell))
        {
            map.remove(&self.key);
        }
    }
}

/// A cached API key.
#[derive(Debug)]
pub(crate) struct KeyEntry {
    pub id: Uuid,
    pub org_id: Uuid,
    /// `None`: every model; empty: none.
    allowed_models: Option<Vec<ModelPattern>>,
    /// The key's own spend controls, and its organization's.
    pub limits: Limits,
    pub org_limits: Limits,
    expires_at: Option<DateTime<Utc>>,
    revoked: bool,
    loaded: Instant,
}

impl KeyEntry {
    /// Whether this key may call `model` (the client's `{customName}/{modelName}`).
    pub fn allows(&self, model: &str) -> bool {
        model_allowed(self.allowed_models.as_deref(), model)
    }

    /// Whether this key may call every model (`allowed_models: null`).
    pub fn allows_all(&self) -> bool {
        self.allowed_models.is_none()
    }

    fn check(self: Arc<Self>) -> Result<Arc<Self>, GatewayError> {
        if self.revoked {
            Err(GatewayError::RevokedKey)
        } else if self.expires_at.is_some_and(|e| e <= Utc::now()) {
            Err(GatewayError::ExpiredKey)
        } else {
            Ok(self)
        }
    }
}

type Lookup<T> = Result<Option<Arc<T>>, ()>;

pub(crate) struct KeyCache {
    shards: Vec<RwLock<HashMap<[u8; 32], Arc<KeyEntry>>>>,
    negative: Mutex<HashMap<[u8; 32], Instant>>,
    flights: Flights<(u64, [u8; 32]), Lookup<KeyEntry>>,
    epoch: AtomicU64,
    limiter: Semaphore,
    ttl: Duration,
}

impl KeyCache {
    pub fn new(ttl: Duration) -> Self {
        Self {
            shards: (0..SHARDS).map(|_| RwLock::new(HashMap::new())).collect(),
            negative: Mutex::new(HashMap::new()),
            flights: Flights::new(),
            epoch: AtomicU64::new(0),
            limiter: Semaphore::new(MISS_LOOKUPS),
            ttl,
        }
    }

    fn shard(&self, digest: &[u8; 32]) -> &RwLock<HashMap<[u8; 32], Arc<KeyEntry>>> {
        &self.shards[usize::from(digest[0]) % SHARDS]
    }

    /// The key for a presented secret's digest, or why it is refused.
    pub async fn authenticate(
        &self,
        db: &Db,
        metrics: &Metrics,
        digest: &[u8; 32],
    ) -> Result<Arc<KeyEntry>, GatewayError> {
        let epoch = self.epoch.load(Ordering::Acquire);
        let stale = read(self.shard(digest)).get(digest).cloned();
        if let Some(e) = &stale {
            if e.loaded.elapsed() < self.ttl {
                metrics.key_hits.fetch_add(1, Ordering::Relaxed);
                return e.clone().check();
            }
        } else if lock(&self.negative)
            .get(digest)
            .is_some_and(|t| t.elapsed() < self.ttl)
        {
            metrics.key_hits.fetch_add(1, Ordering::Relaxed);
            return Err(GatewayError::InvalidKey);
        }
        metrics.key_misses.fetch_add(1, Ordering::Relaxed);
        let found = self
            .flights
            .run((epoch, *digest), || self.load(db, digest, epoch))
            .await;
        match (found, stale) {
            (Ok(Some(e)), _) => e.check(),
            (Ok(None), _) => Err(GatewayError::InvalidKey),
            // Database unreachable: a key seen before keeps working; NOTIFY
            // cannot have told us otherwise while it was down.
            (Err(()), Some(e)) => e.check(),
            (Err(()), None) => Err(GatewayError::Unavailable),
        }
    }

    /// Looks a key up; the result is cached only if no eviction happened since `epoch`.
    async fn load(&self, db: &Db, digest: &[u8; 32], epoch: u64) -> Lookup<KeyEntry> {
        let row = bounded(async {
            let _permit = self.limiter.acquire().await.map_err(|_| ())?;
            db.api_key_by_digest(digest).await.map_err(|e| {
                tracing::warn!(error = %e, "API key lookup failed");
            })
        })
        .await?;
        let Some(row) = row else {
            let mut neg = lock(&self.negative);
            if self.epoch.load(Ordering::Acquire) == epoch {
                if neg.len() >= NEGATIVE_KEYS_MAX {
                    let ttl = self.ttl;
                    neg.retain(|_, t| t.elapsed() < ttl);
                    if neg.len() >= NEGATIVE_KEYS_MAX {
                        neg.clear();
                    }
                }
                neg.insert(*digest, Instant::now());
            }
            return Ok(None);
        };
        let entry = Arc::new(KeyEntry {
            id: row.id,
            org_id: row.org_id,
            allowed_models: row.allowed_models,
            limits: row.limits,
            org_limits: row.org_limits,
            expires_at: row.expires_at,
            revoked: row.revoked_at.is_some(),
            loaded: Instant::now(),
        });
        let mut shard = write(self.shard(digest));
        if self.epoch.load(Ordering::Acquire) == epoch {
            shard.insert(*digest, entry.clone());
        }
        Ok(Some(entry))
    }

    /// A key changed: forget it (and every unknown digest, which it may now match).
    pub fn evict(&self, id: Uuid) {
        self.epoch.fetch_add(1, Ordering::AcqRel);
        for s in &self.shards {
            write(s).retain(|_, e| e.id != id);
        }
        lock(&self.negative).clear();
    }

    pub fn flush(&self) {
        self.epoch.fetch_add(1, Ordering::AcqRel);
        for s in &self.shards {
            write(s).clear();
        }
        lock(&self.negative).clear();
    }
}

/// A cached provider with what calling it needs, prepared once.
pub(crate) struct ProviderEntry {
    pub id: Uuid,
    pub name: String,
    pub active: bool,
    /// Its endpoints; the first is the provider's own `base_url`/`token`.
    pub upstreams: Vec<Upstream>,
    /// Static extra headers every call carries (values marked sensitive).
    pub headers: Vec<(reqwest::header::HeaderName, reqwest::header::HeaderValue)>,
    /// Its own `first_byte_ms` and `total_ms`, over the global upstream timeout.
    pub first_byte: Option<Duration>,
    pub total: Option<Duration>,
    /// What its models cost (for the money budget).
    pub prices: Prices,
    loaded: Instant,
}

impl std::fmt::Debug for ProviderEntry {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ProviderEntry")
            .field("id", &self.id)
            .field("name", &self.name)
            .field("active", &self.active)
            .field(
                "upstreams",
                &self
                    .upstreams
                    .iter()
                    .map(|u| u.base_url.as_str())
                    .collect::<Vec<_>>(),
            )
            .finish_non_exhaustive()
    }
}

impl ProviderEntry {
    /// The provider's own endpoint (its top-level `base_url` and `token`).
    pub fn primary(&self) -> &Upstream {
        &self.upstreams[0]
    }

    /// The endpoint with this id, else the provider's own (a response's
    /// follow-ups go where it was created, while that endpoint exists).
    pub fn upstream_or_primary(&self, id: Option<Uuid>) -> &Upstream {
        id.and_then(|id| self.upstreams.iter().find(|u| u.id == id))
            .unwrap_or_else(|| self.primary())
    }

    /// Values only this provider's upstreams may see (their tokens), to
    /// redact from anything relayed back.
    pub fn secrets(&self) -> impl Iterator<Item = &[u8]> {
        self.upstreams
            .iter()
            .filter_map(|u| u.auth.as_bytes().strip_prefix(b"Bearer "))
            .chain(self.headers.iter().map(|(_, v)| v.as_bytes()))
    }

    /// The SSRF policy's refusal when it refuses every endpoint.
    pub fn refused(&self) -> Option<upstream::UpstreamFailure> {
        if self.upstreams.iter().all(|u| u.refused.is_some()) {
            self.primary().refused
        } else {
            None
        }
    }

    /// Prepares a provider for calls; `None` when its own URL or token
    /// cannot be used (a further endpoint that cannot is left out, logged).
    pub fn prepare(
        p: ProviderWithToken,
        client: &upstream::UpstreamClient,
        health: &HealthTable,
    ) -> Option<Self> {
        let name = p.provider.name.as_str().to_owned();
        let of = Of {
            org: p.provider.org_id,
            connect: p.provider.timeouts.connect(),
            client,
            health,
            provider: &name,
        };
        let mut upstreams = Vec::with_capacity(p.endpoints.len().max(1));
        if p.endpoints.is_empty() {
            upstreams.push(of.upstream(
                p.provider.id,
                p.provider.base_url,
                p.token.expose_secret(),
                1,
            )?);
        }
        for (i, e) in p.endpoints.into_iter().enumerate() {
            let weight = u32::from(e.weight.get());
            match of.upstream(e.id, e.base_url, e.token.expose_secret(), weight) {
                Some(u) => upstreams.push(u),
                None if i == 0 => return None,
                None => {
                    tracing::error!(provider = %name, endpoint = %e.id, "endpoint has an unusable base URL or token; left out")
                }
            }
        }
        let headers = p
            .headers
            .iter()
            .filter_map(|(n, v)| {
                let name = reqwest::header::HeaderName::from_bytes(n.as_bytes()).ok()?;
                let mut value = reqwest::header::HeaderValue::from_str(v).ok()?;
                value.set_sensitive(true);
                Some((name, value))
            })
            .collect();
        Some(Self {
            id: p.provider.id,
            name,
            active: p.provider.status == ProviderStatus::Active,
            upstreams,
            headers,
            first_byte: p.provider.timeouts.first_byte(),
            total: p.provider.timeouts.total(),
            prices: p.provider.prices,
            loaded: Instant::now(),
        })
    }
}

/// What every endpoint of a provider being prepared shares.
struct Of<'a> {
    org: Uuid,
    connect: Option<Duration>,
    client: &'a upstream::UpstreamClient,
    health: &'a HealthTable,
    provider: &'a str,
}

impl Of<'_> {
    /// One endpoint ready for calls: URL parsed, token as a header, the SSRF
    /// policy's verdict, its health.
    fn upstream(&self, id: Uuid, base_url: BaseUrl, token: &str, weight: u32) -> Option<Upstream> {
        let chat_url = reqwest::Url::parse(&base_url.endpoint("chat/completions")).ok()?;
        let auth = upstream::bearer(token)?;
        let refused = self.client.check(&base_url).err().map(|e| {
            tracing::info!(provider = self.provider, error = %e, "endpoint refused by the SSRF policy");
            upstream::UpstreamFailure::from(&e)
        });
        Some(Upstream {
            id,
            base_url,
            chat_url,
            auth,
            weight: weight.clamp(1, 1000),
            connect: self.connect,
            refused,
            health: self.health.of(self.org, id),
        })
    }
}

#[derive(Clone)]
enum Slot {
    Found(Arc<ProviderEntry>),
    /// The org has no provider of this name (or it cannot be used).
    Missing(Instant, bool),
}

impl Slot {
    fn fresh(&self, ttl: Duration) -> bool {
        match self {
            Slot::Found(e) => e.loaded.elapsed() < ttl,
            Slot::Missing(t, _) => t.elapsed() < ttl,
        }
    }
}

pub(crate) struct ProviderCache {
    shards: Vec<RwLock<HashMap<Uuid, HashMap<String, Slot>>>>,
    flights: Flights<(u64, Uuid, String), Result<Slot, ()>>,
    epoch: AtomicU64,
    limiter: Semaphore,
    ttl: Duration,
    /// Endpoint health, which outlives each entry.
    health: Arc<HealthTable>,
}

impl ProviderCache {
    pub fn new(ttl: Duration, health: Arc<HealthTable>) -> Self {
        Self {
            shards: (0..SHARDS).map(|_| RwLock::new(HashMap::new())).collect(),
            flights: Flights::new(),
            epoch: AtomicU64::new(0),
            limiter: Semaphore::new(MISS_LOOKUPS),
            ttl,
            health,
        }
    }

    fn shard(&self, org: &Uuid) -> &RwLock<HashMap<Uuid, HashMap<String, Slot>>> {
        &self.shards[usize::from(org.as_bytes()[15]) % SHARDS]
    }

    /// The org's provider called `name`: `Ok(None)` when there is none.
    pub async fn get(
        &self,
        db: &Db,
        client: &upstream::UpstreamClient,
        metrics: &Metrics,
        org: Uuid,
        name: &str,
    ) -> Result<Option<Arc<ProviderEntry>>, GatewayError> {
        let epoch = self.epoch.load(Ordering::Acquire);
        let stale = read(self.shard(&org))
            .get(&org)
            .and_then(|m| m.get(name))
            .cloned();
        let resolve = |slot: Slot| match slot {
            Slot::Found(e) => Ok(Some(e)),
            Slot::Missing(_, false) => Ok(None),
            Slot::Missing(_, true) => Err(GatewayError::ProviderMisconfigured(name.to_owned())),
        };
        if let Some(s) = &stale {
            if s.fresh(self.ttl) {
                metrics.provider_hits.fetch_add(1, Ordering::Relaxed);
                return resolve(s.clone());
            }
        }
        metrics.provider_misses.fetch_add(1, Ordering::Relaxed);
        let found = self
            .flights
            .run((epoch, org, name.to_owned()), || {
                self.load(db, client, org, name, epoch)
            })
            .await;
        match (found, stale) {
            (Ok(slot), _) | (Err(()), Some(slot)) => resolve(slot),
            (Err(()), None) => Err(GatewayError::Unavailable),
        }
    }

    async fn load(
        &self,
        db: &Db,
        client: &upstream::UpstreamClient,
        org: Uuid,
        name: &str,
        epoch: u64,
    ) -> Result<Slot, ()> {
        let looked_up = bounded(async {
            let _permit = self.limiter.acquire().await.map_err(|_| ())?;
            Ok(db.provider_by_name(org, name).await)
        })
        .await?;
        let found = match looked_up {
            Ok(found) => found,
            // A token this replica cannot decrypt is a configuration problem,
            // not an outage: answer it like an unusable provider, and cache that.
            Err(storage::StorageError::Crypto(e)) => {
                tracing::error!(error = %e, provider = name, %org, "cannot decrypt provider token");
                return Ok(Slot::Missing(Instant::now(), true));
            }
            Err(e) => {
                tracing::warn!(error = %e, provider = name, "provider lookup failed");
                return Err(());
            }
        };
        let slot = match found {
            None => Slot::Missing(Instant::now(), false),
            Some(p) => match ProviderEntry::prepare(p, client, &self.health) {
                Some(e) => Slot::Found(Arc::new(e)),
                None => {
                    tracing::error!(provider = name, %org, "provider has an unusable base URL or token");
                    Slot::Missing(Instant::now(), true)
                }
            },
        };
        let mut shard = write(self.shard(&org));
        if self.epoch.load(Ordering::Acquire) == epoch {
            let names = shard.entry(org).or_default();
            if matches!(slot, Slot::Found(_)) || names.len() < NEGATIVE_PROVIDERS_PER_ORG_MAX {
                names.insert(name.to_owned(), slot.clone());
            }
        }
        Ok(slot)
    }

    pub fn evict_org(&self, org: Uuid) {
        self.epoch.fetch_add(1, Ordering::AcqRel);
        write(self.shard(&org)).remove(&org);
    }

    pub fn flush(&self) {
        self.epoch.fetch_add(1, Ordering::AcqRel);
        for s in &self.shards {
            write(s).clear();
        }
    }
}

/// How long a cache miss may wait for the database (queueing included)
/// before it is treated as an outage: the cached entry or a 503, never a hang
/// when the database stops answering without closing its connections.
pub(crate) const LOOKUP_TIMEOUT: std::time::Duration = std::time::Duration::from_secs(2);

/// Runs a lookup within [`LOOKUP_TIMEOUT`]; a timeout counts as unreachable.
pub(crate) async fn bounded<T>(
    lookup: impl std::future::Future<Output = Result<T, ()>>,
) -> Result<T, ()> {
    tokio::time::timeout(LOOKUP_TIMEOUT, lookup)
        .await
        .unwrap_or_else(|_| {
            tracing::warn!("database lookup timed out after {LOOKUP_TIMEOUT:?}");
            Err(())
        })
}

#[cfg(test)]
mod tests {
    use super::*;
    use futures_util::FutureExt;

    /// A lookup that started before an eviction must not answer requests
    /// made after it: they are keyed by the newer epoch and load afresh.
    #[tokio::test]
    async fn a_flight_from_an_older_epoch_is_not_joined() {
        let flights: Flights<(u64, u8), &'static str> = Flights::new();
        let (release, wait) = tokio::sync::oneshot::channel::<()>();
        let before = flights.run((0, 7), || async {
            let _ = wait.await;
            "pre-revocation row"
        });
        tokio::pin!(before);
        // Start the old flight and leave it waiting.
        assert!(before.as_mut().now_or_never().is_none());
        // Same epoch: joins the waiting flight.
        let joined = flights.run((0, 7), || async { "a second lookup" });
        tokio::pin!(joined);
        assert!(joined.as_mut().now_or_never().is_none());
        // Newer epoch: its own lookup, answered without waiting for the old one.
        let after = flights
            .run((1, 7), || async { "post-revocation row" })
            .await;
        assert_eq!(after, "post-revocation row");
        let _ = release.send(());
        assert_eq!(before.await, "pre-revocation row");
        assert_eq!(joined.await, "pre-revocation row");
        assert!(
            lock(&flights.map).is_empty(),
            "finished flights are removed"
        );
    }
}
