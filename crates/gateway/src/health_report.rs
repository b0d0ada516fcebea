//! This replica's view of endpoint health, written to Redis for the
//! settings API (`limits::health`): every endpoint it reports
//! ([`HealthTable::to_report`]) every [`limits::health::REFRESH`], and those
//! whose state changed as soon as they change. A background task does it:
//! nothing on the request path waits on Redis, a Redis outage only stops
//! the reports (logged once), and the views expire on their own.

use std::sync::Arc;
use std::time::Duration;

use limits::health::REFRESH;
use limits::HealthViews;
use storage::domain::routing::EndpointHealth;
use tokio::sync::watch;
use tokio::time::Instant;
use uuid::Uuid;

use crate::balance::HealthTable;

/// After reporting changes, the least wait before the next report (a
/// flapping endpoint costs Redis at most this rate).
const CHANGE_GAP: Duration = Duration::from_millis(100);

/// Reports until shutdown, as replica `replica`.
pub(crate) async fn run(
    table: Arc<HealthTable>,
    views: HealthViews,
    replica: String,
    mut shutdown: watch::Receiver<bool>,
) {
    tracing::info!(replica = %replica, "reporting endpoint health to Redis");
    let mut next_full = Instant::now();
    let mut failing = false;
    loop {
        let all = tokio::select! {
            _ = tokio::time::sleep_until(next_full) => true,
            _ = table.changed.notified() => false,
            _ = shutdown.changed() => return,
        };
        if all {
            next_full = Instant::now() + REFRESH;
        }
        match report(&table, &views, &replica, all).await {
            Ok(()) if failing => {
                failing = false;
                tracing::info!("endpoint health reports reach Redis again");
            }
            Err(e) if !failing => {
                failing = true;
                tracing::warn!(error = %e, "cannot report endpoint health to Redis; the settings API shows it as unknown until Redis answers");
            }
            _ => {}
        }
        if !all {
            tokio::time::sleep(CHANGE_GAP).await;
        }
    }
}

/// One round: every endpoint (`all`) or the changed ones, an org at a time.
async fn report(
    table: &HealthTable,
    views: &HealthViews,
    replica: &str,
    all: bool,
) -> Result<(), limits::BackendError> {
    let mut batch = table.to_report(all);
    batch.sort_unstable_by_key(|(_, _, h)| h.org);
    for org in batch.chunk_by(|a, b| a.2.org == b.2.org) {
        let list: Vec<(Uuid, EndpointHealth)> = org
            .iter()
            .map(|(id, state, _)| (*id, state.health()))
            .collect();
        views.report(replica, org[0].2.org, &list).await?;
        for (_, state, h) in org {
            h.reported(*state);
        }
    }
    Ok(())
}
