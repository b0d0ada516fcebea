//! Endpoint health in answers, as the gateways report it through Redis
//! (each replica's view with a short TTL; the worst fresh one is shown,
//! DESIGN "Routing and resilience"; `limits::health`). Without Redis, and
//! whenever the views cannot be read in time (the views' own timeout, 50 ms
//! as `llmgw serve` sets it), every endpoint is `unknown`: never an error.

use std::sync::atomic::{AtomicBool, Ordering::Relaxed};
use std::sync::Arc;

use storage::domain::routing::EndpointHealth;
use storage::endpoints::ProviderEndpoint;
use storage::providers::ProviderKey;
use uuid::Uuid;

/// Where answers get endpoint health from.
#[derive(Debug, Clone)]
pub(crate) struct HealthReports {
    views: Option<limits::HealthViews>,
    /// The last read failed (logged once until one succeeds).
    failing: Arc<AtomicBool>,
}

impl HealthReports {
    pub fn new(views: Option<limits::HealthViews>) -> Self {
        Self {
            views,
            failing: Arc::default(),
        }
    }

    /// The health of each of the org's `endpoints`, in place.
    pub async fn annotate(&self, org_id: Uuid, endpoints: &mut [&mut ProviderEndpoint]) {
        let seen = match &self.views {
            None => None,
            Some(views) => {
                let ids: Vec<Uuid> = endpoints.iter().map(|e| e.id).collect();
                match views.worst(org_id, &ids).await {
                    Ok(seen) => {
                        if self.failing.swap(false, Relaxed) {
                            tracing::info!("endpoint health is read from Redis again");
                        }
                        Some(seen)
                    }
                    Err(e) => {
                        if !self.failing.swap(true, Relaxed) {
                            tracing::warn!(error = %e, "cannot read endpoint health from Redis; showing it as unknown");
                        }
                        None
                    }
                }
            }
        };
        for (i, e) in endpoints.iter_mut().enumerate() {
            e.health = seen
                .as_ref()
                .and_then(|s| s.get(i).copied())
                .unwrap_or(EndpointHealth::Unknown);
        }
    }

    /// [`HealthReports::annotate`] for every endpoint of `providers`, at once.
    pub async fn annotate_providers(&self, org_id: Uuid, providers: &mut [ProviderKey]) {
        let mut all: Vec<&mut ProviderEndpoint> = providers
            .iter_mut()
            .flat_map(|p| p.endpoints.iter_mut())
            .collect();
        self.annotate(org_id, &mut all).await;
    }
}
