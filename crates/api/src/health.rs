//! Endpoint health in answers. The gateways judge each endpoint's health
//! and will report it through Redis (each replica's view with a short TTL;
//! the worst is shown, DESIGN "Routing and resilience"). Until that report
//! exists, and whenever it cannot be read, every endpoint is `unknown`:
//! [`HealthReports::annotate`] is the one place that reader plugs in.

use storage::domain::routing::EndpointHealth;
use storage::endpoints::ProviderEndpoint;
use storage::providers::ProviderKey;
use uuid::Uuid;

/// Where answers get endpoint health from.
#[derive(Debug, Clone, Default)]
pub(crate) struct HealthReports {}

impl HealthReports {
    /// The health of each of the org's `endpoints`, in place. No report is
    /// read yet: `unknown` for all.
    pub async fn annotate(&self, _org_id: Uuid, endpoints: &mut [&mut ProviderEndpoint]) {
        for e in endpoints {
            e.health = EndpointHealth::Unknown;
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
