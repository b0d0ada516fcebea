//! Endpoint health as the gateway replicas see it, shared through Redis.
//!
//! Each replica writes its view of the endpoints it knows with
//! [`HealthViews::report`]: one hash per endpoint,
//! `llmgw:{<org>}:health:<endpoint>` (the org's hash tag, so an org's
//! endpoints share a Cluster slot and go in one script call), one field per
//! replica holding its state and the Redis time it was written. A view
//! counts for [`VIEW_TTL`]; replicas refresh theirs every [`REFRESH`] and on
//! each change, so a replica that stops (or loses Redis) drops out within
//! the TTL. The settings API reads the worst fresh view of each endpoint
//! with [`HealthViews::worst`] (ejected over probing over healthy; none:
//! unknown). Time is Redis `TIME` on both sides, never a replica's clock.

use std::time::Duration;

use domain::routing::EndpointHealth;
use redis::Script;
use uuid::Uuid;

use crate::conn::{ints, RedisConn};
use crate::BackendError;

const REPORT: &str = concat!(include_str!("clock.lua"), include_str!("health_report.lua"));
const READ: &str = concat!(include_str!("clock.lua"), include_str!("health_read.lua"));

/// How long a replica's view of an endpoint counts.
pub const VIEW_TTL: Duration = Duration::from_secs(6);
/// How often a replica writes its whole view again (and at once on a change).
pub const REFRESH: Duration = Duration::from_secs(2);
/// Endpoints per script call at most (longer lists take several).
const KEYS_PER_CALL: usize = 256;

/// The views on Redis: cheap to clone.
#[derive(Clone)]
pub struct HealthViews {
    conn: RedisConn,
    timeout: Duration,
    report: Script,
    read: Script,
}

impl std::fmt::Debug for HealthViews {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("HealthViews")
            .field("timeout", &self.timeout)
            .finish_non_exhaustive()
    }
}

/// The hash of one endpoint's views.
fn key(org: Uuid, endpoint: Uuid) -> String {
    format!("llmgw:{{{org}}}:health:{endpoint}")
}

/// A state as the scripts store it: the worse, the higher.
fn code(h: EndpointHealth) -> i64 {
    match h {
        EndpointHealth::Unknown => 0,
        EndpointHealth::Healthy => 1,
        EndpointHealth::Probing => 2,
        EndpointHealth::Ejected => 3,
    }
}

fn health(code: i64) -> EndpointHealth {
    match code {
        1 => EndpointHealth::Healthy,
        2 => EndpointHealth::Probing,
        3 => EndpointHealth::Ejected,
        _ => EndpointHealth::Unknown,
    }
}

impl HealthViews {
    /// The Redis (one URL) or Redis Cluster (several) of `LLMGW_REDIS_URL`;
    /// connects in the background. No call waits longer than `timeout`.
    pub fn open(urls: &[String], timeout: Duration) -> Result<Self, BackendError> {
        Ok(Self {
            conn: RedisConn::open(urls, timeout, "health")?,
            timeout,
            report: Script::new(REPORT),
            read: Script::new(READ),
        })
    }

    async fn bounded<T>(
        &self,
        call: impl std::future::Future<Output = Result<T, BackendError>>,
    ) -> Result<T, BackendError> {
        tokio::time::timeout(self.timeout, call)
            .await
            .unwrap_or_else(|_| Err(BackendError::Redis("timed out".into())))
    }

    /// Writes replica `replica`'s view of some of `org`'s endpoints
    /// (`Unknown` states are not written).
    pub async fn report(
        &self,
        replica: &str,
        org: Uuid,
        views: &[(Uuid, EndpointHealth)],
    ) -> Result<(), BackendError> {
        let known: Vec<_> = views
            .iter()
            .filter(|(_, h)| *h != EndpointHealth::Unknown)
            .collect();
        self.bounded(async {
            for chunk in known.chunks(KEYS_PER_CALL) {
                let mut inv = self.report.prepare_invoke();
                inv.arg(replica).arg(VIEW_TTL.as_millis() as u64);
                for (endpoint, h) in chunk {
                    inv.key(key(org, *endpoint)).arg(code(*h));
                }
                self.conn.run(inv).await?;
            }
            Ok(())
        })
        .await
    }

    /// The worst fresh view of each of `org`'s `endpoints`, in order;
    /// `Unknown` for one no replica reported within [`VIEW_TTL`]. No
    /// endpoints: no call.
    pub async fn worst(
        &self,
        org: Uuid,
        endpoints: &[Uuid],
    ) -> Result<Vec<EndpointHealth>, BackendError> {
        if endpoints.is_empty() {
            return Ok(Vec::new());
        }
        self.bounded(async {
            let mut out = Vec::with_capacity(endpoints.len());
            for chunk in endpoints.chunks(KEYS_PER_CALL) {
                let mut inv = self.read.prepare_invoke();
                inv.arg(VIEW_TTL.as_millis() as u64);
                for e in chunk {
                    inv.key(key(org, *e));
                }
                let codes = ints(self.conn.run(inv).await?)?;
                if codes.len() != chunk.len() {
                    return Err(BackendError::Redis("unexpected script answer".into()));
                }
                out.extend(codes.into_iter().map(health));
            }
            Ok(out)
        })
        .await
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn states_order_from_healthy_to_ejected_and_round_trip() {
        for h in EndpointHealth::ALL {
            assert_eq!(health(code(h)), h);
        }
        assert!(code(EndpointHealth::Ejected) > code(EndpointHealth::Probing));
        assert!(code(EndpointHealth::Probing) > code(EndpointHealth::Healthy));
        assert!(code(EndpointHealth::Healthy) > code(EndpointHealth::Unknown));
    }
}
